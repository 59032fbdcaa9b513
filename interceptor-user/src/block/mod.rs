//! The kill switch: `interceptor block SELECTOR` stops a workload's database
//! access at once, `interceptor unblock SELECTOR` lifts it.
//!
//! A block acts in three places, so that none of them alone has to be
//! perfect:
//!
//! 1. **Kernel.** The connect4/6 programs look the connecting task up in the
//!    `BLOCKED` map before redirecting a connect *to a target* (nothing else
//!    is ever refused) and return 0, so `connect()` fails with EPERM. Keys
//!    are facts the program can read itself: tgid, uid, comm, the current
//!    cgroup id (`BLOCK_CGROUP`), and the cgroup ids of its ancestors
//!    (`BLOCK_CGROUP_TREE`, a subtree). Each selector is resolved to keys:
//!    - only `uid`/`user` -> one uid key; only `pid` -> one tgid key; only
//!      `comm` -> one comm key (static: no rescans needed);
//!    - only cgroup-path facts (`cgroup` glob, `unit`, `container`,
//!      `pod_uid`) -> the ids of the matching directories under the
//!      attached cgroup (a bounded walk). `container`/`pod_uid` alone cover
//!      whole subtrees (every descendant path carries the same component);
//!      a glob or a unit is decided per directory, so those are exact keys;
//!    - anything else (`exe`, `exe_sha256`, `gid`, mixed conditions, named
//!      identities with such conditions) -> the tgids of matching processes
//!      in the attached cgroup, found by scanning `/proc`;
//!    - a named identity is first turned into its conditions, read from the
//!      current policy each time.
//!
//!    Walks and scans are repeated every [`RESCAN`] while any block is
//!    active, which catches new processes and cgroups.
//! 2. **Agent.** A connection that still reaches the agent (a process that
//!    started between two rescans, a selector the kernel keys cannot
//!    express exactly) is matched against the active blocks right after
//!    its identity is resolved, and refused (`reject` event).
//! 3. **Live connections.** On `block`, every live connection whose
//!    identity matches first has its statement cancelled on the server
//!    (PostgreSQL CancelRequest, MySQL `KILL QUERY`, see [`cancel`]), then is
//!    closed. Cancels run in parallel on short-lived threads; the closes
//!    wait for them only until [`KILL_DEADLINE`] after the command arrived,
//!    so a slow server cannot hold a kill up (its cancel still completes in
//!    the background).
//!
//! Blocks are kept in `blocks.json` in the state directory (written to a
//! temporary file and renamed, so a crash leaves the old or the new list,
//! never half of one), loaded before the agent accepts its first
//! connection, and re-audited on load. A state file that cannot be read
//! stops the agent from starting: starting without its blocks would
//! silently lift them.
//!
//! The selectors, the stored entries and the list the agent checks (2.)
//! are in [`crate::blocklist`], below the proxy that reads them; this
//! module changes them and sits above the proxy, whose live connections it
//! closes (3.).

pub mod cancel;

use std::{
    collections::{HashMap, HashSet},
    io::Write as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use interceptor_common::{
    BLOCK_CGROUP, BLOCK_CGROUP_TREE, BLOCK_COMM, BLOCK_TGID, BLOCK_UID, BlockKey, MAX_BLOCKED,
    comm_words,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    audit::AuditEvent,
    blocklist::{Actor, BlockEntry, CompiledFields, Fields, Selector, selector},
    conn::Caller,
    identity::{Identity, IdentityResolver, parse_cgroup_path},
    proxy::{LiveConn, Shared},
};

/// How often walks and scans are repeated while a block is active.
pub const RESCAN: Duration = Duration::from_millis(150);
/// Live connections are closed at most this long after the command.
pub const KILL_DEADLINE: Duration = Duration::from_millis(90);
/// File name of the state file in `--state-dir`.
pub const STATE_FILE: &str = "blocks.json";
/// Bounds of the cgroup walk.
const MAX_WALK_DEPTH: u32 = 16;
const MAX_WALK_DIRS: u32 = 20_000;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    blocks: Vec<BlockEntry>,
}

/// Reads the state file; a missing file is no blocks.
///
/// # Errors
/// An unreadable or malformed file, or a stored selector that no longer
/// parses.
pub fn load_state(path: &Path) -> Result<Vec<BlockEntry>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read block state {}: {e}", path.display())),
    };
    let file: StateFile = serde_json::from_str(&text)
        .map_err(|e| format!("malformed block state {}: {e}", path.display()))?;
    if file.version != 1 {
        return Err(format!(
            "block state {}: unsupported version {}",
            path.display(),
            file.version
        ));
    }
    for b in &file.blocks {
        Selector::parse(&b.selector)
            .map_err(|e| format!("block state {}: {:?}: {e}", path.display(), b.selector))?;
    }
    Ok(file.blocks)
}

/// Writes the state file atomically (temporary file, fsync, rename).
///
/// # Errors
/// When the directory or file cannot be written.
pub fn save_state(path: &Path, blocks: &[BlockEntry]) -> Result<(), String> {
    let err = |e: std::io::Error| format!("cannot write block state {}: {e}", path.display());
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let body = serde_json::to_vec_pretty(&StateFile {
        version: 1,
        blocks: blocks.to_vec(),
    })
    .map_err(|e| e.to_string())?;
    let tmp = dir.join(format!(".{STATE_FILE}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself must survive a crash.
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

/// Where blocked keys go: the kernel map (or a table in tests).
pub trait BlockMap: Send + Sync {
    /// Makes the map hold exactly `keys`.
    ///
    /// # Errors
    /// A message when the update fails.
    fn set_blocked(&self, keys: &HashSet<BlockKey>) -> Result<(), String>;
}

impl BlockMap for crate::ebpf::Redirector {
    fn set_blocked(&self, keys: &HashSet<BlockKey>) -> Result<(), String> {
        Self::set_blocked(self, keys).map_err(|e| e.to_string())
    }
}

/// The part of the host a block can reach: the attached cgroup.
#[derive(Clone, Debug)]
pub struct Scope {
    /// The cgroup v2 mount.
    pub root: Option<PathBuf>,
    /// The directory the programs are attached to.
    pub attached: PathBuf,
}

impl Scope {
    /// The attached cgroup as `/proc/PID/cgroup` shows paths (`/` for the root).
    fn attached_rel(&self) -> Option<String> {
        let root = self.root.as_ref()?;
        let rel = self.attached.strip_prefix(root).ok()?;
        Some(format!("/{}", rel.to_string_lossy()))
    }

    fn contains(&self, cgroup: &str) -> bool {
        match self.attached_rel() {
            Some(r) if r == "/" => true,
            Some(r) => cgroup == r || cgroup.starts_with(&format!("{r}/")),
            None => false,
        }
    }
}

/// Kernel keys for one selector, and whether they need rescans.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub keys: HashSet<BlockKey>,
    pub dynamic: bool,
}

fn uid_of(user: &str) -> Result<u32, String> {
    nix::unistd::User::from_name(user)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
        .ok_or_else(|| format!("no such user {user:?}"))
}

/// A comm as `bpf_get_current_comm` fills it (NUL padded).
#[must_use]
pub fn comm_key(comm: &str) -> BlockKey {
    let mut c = [0u8; 16];
    let n = comm.len().min(selector::MAX_COMM);
    c[..n].copy_from_slice(&comm.as_bytes()[..n]);
    BlockKey {
        kind: BLOCK_COMM,
        _pad: 0,
        value: comm_words(c),
    }
}

/// Resolves conditions to kernel keys (see the module docs).
///
/// # Errors
/// A user name that does not exist, or `uid` and `user` naming different
/// accounts.
pub fn plan(f: &CompiledFields, scope: &Scope, procs: &ProcScan) -> Result<Plan, String> {
    let x = &f.fields;
    let mut p = Plan::default();
    let uid = match (&x.user, x.uid) {
        (Some(u), Some(n)) => {
            let found = uid_of(u)?;
            if found != n {
                return Err(format!("user {u:?} is uid {found}, not {n}"));
            }
            Some(n)
        }
        (Some(u), None) => Some(uid_of(u)?),
        (None, n) => n,
    };
    let rest_after = |g: Fields| g == Fields::default();
    if x.is_empty() {
        // An identity without conditions covers every workload.
        if let Some(id) = inode(&scope.attached) {
            p.keys.insert(BlockKey::number(BLOCK_CGROUP_TREE, id));
        }
    } else if rest_after(Fields {
        uid: None,
        user: None,
        ..x.clone()
    }) {
        if let Some(uid) = uid {
            p.keys.insert(BlockKey::number(BLOCK_UID, u64::from(uid)));
        }
    } else if rest_after(Fields {
        pid: None,
        ..x.clone()
    }) {
        if let Some(pid) = x.pid {
            p.keys.insert(BlockKey::number(BLOCK_TGID, u64::from(pid)));
        }
    } else if rest_after(Fields {
        comm: None,
        ..x.clone()
    }) {
        if let Some(c) = &x.comm {
            p.keys.insert(comm_key(c));
        }
    } else if x.only_cgroup_facts() {
        p.dynamic = true;
        let tree = x.cgroup.is_none() && x.unit.is_none();
        let kind = if tree {
            BLOCK_CGROUP_TREE
        } else {
            BLOCK_CGROUP
        };
        if let Some(root) = &scope.root {
            walk(root, &scope.attached, 0, &mut 0, &mut |rel, ino| {
                let facts = parse_cgroup_path(rel);
                if f.cgroup_facts_match(
                    Some(rel),
                    facts.unit.as_deref(),
                    facts.container.as_deref(),
                    facts.pod_uid.as_deref(),
                ) {
                    p.keys.insert(BlockKey::number(kind, ino));
                }
            });
        }
    } else {
        p.dynamic = true;
        for id in procs.matching(f, scope) {
            p.keys
                .insert(BlockKey::number(BLOCK_TGID, u64::from(id.tgid)));
        }
    }
    Ok(p)
}

fn inode(p: &Path) -> Option<u64> {
    std::fs::metadata(p).ok().map(|m| m.ino())
}

/// Depth-first walk of cgroup directories under `dir`, bounded in depth
/// and directories visited; calls `f(path relative to root, cgroup id)`.
fn walk(root: &Path, dir: &Path, depth: u32, visited: &mut u32, f: &mut dyn FnMut(&str, u64)) {
    *visited += 1;
    if depth > MAX_WALK_DEPTH || *visited > MAX_WALK_DIRS {
        return;
    }
    let Some(ino) = inode(dir) else { return };
    let Ok(rel) = dir.strip_prefix(root) else {
        return;
    };
    f(&format!("/{}", rel.to_string_lossy()), ino);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            walk(root, &e.path(), depth + 1, visited, f);
        }
    }
}

/// Processes read from `/proc` once per rescan, shared by every block that
/// needs them; fields that cost (exe, its hash) only when asked.
pub struct ProcScan<'a> {
    resolver: &'a IdentityResolver,
    proc_root: PathBuf,
    cache: Mutex<Option<Vec<Identity>>>,
    users: Mutex<HashMap<u32, Option<String>>>,
}

impl<'a> ProcScan<'a> {
    #[must_use]
    pub fn new(resolver: &'a IdentityResolver) -> Self {
        Self {
            resolver,
            proc_root: PathBuf::from("/proc"),
            cache: Mutex::new(None),
            users: Mutex::new(HashMap::new()),
        }
    }

    /// Processes in scope matching `f`.
    #[must_use]
    pub fn matching(&self, f: &CompiledFields, scope: &Scope) -> Vec<Identity> {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let all = cache.get_or_insert_with(|| self.scan(scope));
        all.iter()
            .filter_map(|base| {
                let mut id = base.clone();
                if f.fields.needs_exe() {
                    let dir = self.proc_root.join(id.tgid.to_string());
                    id.exe = std::fs::read_link(dir.join("exe"))
                        .ok()
                        .map(|p| p.to_string_lossy().into_owned());
                    if f.fields.exe_sha256.is_some() {
                        id.exe_sha256 = self.resolver.exe_sha256_of(id.tgid);
                    }
                }
                f.matches(&id).then_some(id)
            })
            .collect()
    }

    fn scan(&self, scope: &Scope) -> Vec<Identity> {
        let Ok(dir) = std::fs::read_dir(&self.proc_root) else {
            return Vec::new();
        };
        let me = std::process::id();
        let mut out = Vec::new();
        for e in dir.flatten() {
            let Some(tgid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if tgid == me {
                continue;
            }
            let p = e.path();
            let Some(cgroup) = std::fs::read_to_string(p.join("cgroup"))
                .ok()
                .and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("0::"))
                        .map(str::to_owned)
                })
            else {
                continue;
            };
            if !scope.contains(&cgroup) {
                continue;
            }
            let Ok(status) = std::fs::read_to_string(p.join("status")) else {
                continue;
            };
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<u32>().ok())
            };
            let (Some(uid), Some(gid)) = (field("Uid:"), field("Gid:")) else {
                continue;
            };
            let comm = std::fs::read_to_string(p.join("comm"))
                .map(|c| c.trim_end_matches('\n').to_owned())
                .unwrap_or_default();
            let user = self
                .users
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(uid)
                .or_insert_with(|| {
                    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                        .ok()
                        .flatten()
                        .map(|u| u.name)
                })
                .clone();
            let facts = parse_cgroup_path(&cgroup);
            out.push(Identity {
                pid: tgid,
                tgid,
                uid,
                gid,
                user,
                comm,
                cgroup: Some(cgroup),
                unit: facts.unit,
                container: facts.container,
                pod_uid: facts.pod_uid,
                ..Identity::default()
            });
        }
        out
    }
}

/// What happened to one live connection of a new block.
#[derive(Debug, Serialize)]
struct Stopped {
    conn: u64,
    target: String,
    /// `sent`, `not_needed` (no statement can be running yet), `failed`,
    /// or `pending` (still running when the connection was closed).
    cancel: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The kill switch of one agent.
pub struct KillSwitch {
    shared: Arc<Shared>,
    kernel: Arc<dyn BlockMap>,
    state_path: PathBuf,
    scope: Scope,
    entries: Mutex<Vec<BlockEntry>>,
    /// Kernel keys per selector at the last refresh.
    keys: Mutex<HashMap<String, usize>>,
}

impl KillSwitch {
    /// Loads the stored blocks, makes the agent refuse matching
    /// connections, installs their kernel keys and audits them. Call
    /// before the workers accept connections.
    ///
    /// # Errors
    /// When the state file cannot be read (see the module docs).
    pub fn start(
        shared: Arc<Shared>,
        kernel: Arc<dyn BlockMap>,
        state_dir: &Path,
        scope: Scope,
    ) -> Result<Self, String> {
        let state_path = state_dir.join(STATE_FILE);
        let entries = load_state(&state_path)?;
        shared.blocks.publish(&entries);
        let me = Self {
            shared,
            kernel,
            state_path,
            scope,
            entries: Mutex::new(entries.clone()),
            keys: Mutex::default(),
        };
        let refresh = me.refresh_locked(&entries);
        for e in &entries {
            let mut ev = AuditEvent::new("block")
                .with("source", "state")
                .with("selector", &e.selector)
                .with("reason", &e.reason)
                .with("actor", &e.actor)
                .with("since", &e.since)
                .with("kernel_keys", me.key_count(&e.selector));
            if let Some(err) = refresh.get(&e.selector) {
                ev = ev.with("error", err);
            }
            me.shared.audit.record(ev);
        }
        Ok(me)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<BlockEntry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn key_count(&self, selector: &str) -> usize {
        self.keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(selector)
            .copied()
            .unwrap_or(0)
    }

    /// Recomputes and installs every block's kernel keys; returns the
    /// errors by selector (a block whose keys cannot be resolved is still
    /// enforced by the agent).
    fn refresh_locked(&self, entries: &[BlockEntry]) -> HashMap<String, String> {
        let engine = self.shared.engine.load();
        let procs = ProcScan::new(&self.shared.identities);
        let mut all = HashSet::new();
        let mut counts = HashMap::new();
        let mut errors = HashMap::new();
        for e in entries {
            let planned = Selector::parse(&e.selector)
                .map_err(|e| e.to_string())
                .and_then(|s| s.fields(&engine))
                .and_then(|f| plan(&f, &self.scope, &procs));
            match planned {
                Ok(p) => {
                    counts.insert(e.selector.clone(), p.keys.len());
                    all.extend(p.keys);
                }
                Err(err) => {
                    errors.insert(e.selector.clone(), err);
                }
            }
        }
        if all.len() > MAX_BLOCKED as usize {
            tracing::error!(
                "{} kernel block keys exceed the map's {MAX_BLOCKED}; the agent still refuses the rest",
                all.len()
            );
            all = all.into_iter().take(MAX_BLOCKED as usize).collect();
        }
        if let Err(e) = self.kernel.set_blocked(&all) {
            tracing::error!("kernel block map update failed: {e}");
            for e2 in entries {
                errors
                    .entry(e2.selector.clone())
                    .or_insert_with(|| e.clone());
            }
        }
        *self.keys.lock().unwrap_or_else(PoisonError::into_inner) = counts;
        errors
    }

    /// One rescan (new processes and cgroups of dynamic blocks).
    pub fn refresh(&self) {
        let entries = self.lock();
        if entries.is_empty() {
            return;
        }
        self.refresh_locked(&entries);
    }

    /// Rescans every [`RESCAN`] while blocks are active.
    pub async fn rescan_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RESCAN);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.lock().is_empty() {
                continue;
            }
            let me = Arc::clone(&self);
            let _ = tokio::task::spawn_blocking(move || me.refresh()).await;
        }
    }

    /// `interceptor block`.
    ///
    /// # Errors
    /// A bad selector, an unknown identity or user, or an existing block.
    pub fn block(
        &self,
        caller: &Caller,
        text: &str,
        reason: Option<String>,
    ) -> Result<Value, String> {
        let started = Instant::now();
        let selector = Selector::parse(text).map_err(|e| e.to_string())?;
        let engine = self.shared.engine.load_full();
        if let Selector::Named(n) = &selector
            && !engine.file().identities.contains_key(n)
        {
            let mut names: Vec<&String> = engine.file().identities.keys().collect();
            names.sort();
            return Err(format!(
                "unknown identity {n:?} (the policy defines: {}); use key=value for identity fields",
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            ));
        }
        let canonical = selector.canonical();
        // Keys must resolve (e.g. the user exists) before anything changes.
        let fields = selector.fields(&engine)?;
        let procs = ProcScan::new(&self.shared.identities);
        plan(&fields, &self.scope, &procs)?;

        let mut entries = self.lock();
        if let Some(e) = entries.iter().find(|e| e.selector == canonical) {
            return Err(format!("already blocked: {canonical} (since {})", e.since));
        }
        let actor = Actor::from(caller);
        let entry = BlockEntry {
            selector: canonical.clone(),
            reason: reason.clone(),
            actor: Some(actor.clone()),
            since: crate::audit::format_ts(time::OffsetDateTime::now_utc()),
        };
        entries.push(entry);
        // The agent refuses first, then the kernel, then live connections
        // go: a connection registered after the sweep checks the list
        // published before it.
        self.shared.blocks.publish(&entries);
        let errors = self.refresh_locked(&entries);
        let kernel_at_us = elapsed_us(started);
        let persisted = save_state(&self.state_path, &entries);
        drop(entries);

        let conns: Vec<Arc<LiveConn>> = self
            .shared
            .registry
            .all()
            .into_iter()
            .filter(|c| !c.is_killed() && selector.matches(&c.info.identity, &engine))
            .collect();
        let kill_reason = format!("blocked ({canonical})");
        let stopped = self.stop(&conns, &kill_reason, started + KILL_DEADLINE);
        let closed_at_us = elapsed_us(started);
        let cancels_sent = stopped.iter().filter(|s| s.cancel == "sent").count();
        let kernel_keys = self.key_count(&canonical);
        let mut ev = AuditEvent::new("block")
            .with("source", "command")
            .with("selector", &canonical)
            .with("reason", &reason)
            .with("actor", &actor)
            .with("kernel_keys", kernel_keys)
            .with("connections_closed", stopped.len())
            .with("cancels_sent", cancels_sent)
            .with("connections", &stopped)
            .with("kernel_us", kernel_at_us)
            .with("closed_us", closed_at_us);
        if let Some(e) = errors.get(&canonical) {
            ev = ev.with("kernel_error", e);
        }
        if let Err(e) = &persisted {
            ev = ev.with("persist_error", e);
        }
        self.shared.audit.record(ev);
        Ok(json!({
            "selector": canonical,
            "reason": reason,
            "kernel_keys": kernel_keys,
            "kernel_error": errors.get(&canonical),
            "connections_closed": stopped.len(),
            "cancels_sent": cancels_sent,
            "connections": stopped,
            "persisted": persisted.is_ok(),
            "persist_error": persisted.err(),
            "elapsed_us": closed_at_us,
        }))
    }

    /// Cancels each connection's statement (in parallel, until `deadline`),
    /// then closes every connection.
    fn stop(&self, conns: &[Arc<LiveConn>], reason: &str, deadline: Instant) -> Vec<Stopped> {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut stopped: Vec<Stopped> = Vec::with_capacity(conns.len());
        let mut pending = 0usize;
        for c in conns {
            let target = c.info.target.name.clone();
            let Some(key) = c.session().cancel else {
                stopped.push(Stopped {
                    conn: c.info.id,
                    target,
                    cancel: "not_needed",
                    error: None,
                });
                continue;
            };
            stopped.push(Stopped {
                conn: c.info.id,
                target,
                cancel: "pending",
                error: None,
            });
            pending += 1;
            let (id, server, admin) = (
                c.info.id,
                cancel::Server {
                    dst: c.info.dst,
                    mark: self.shared.mark,
                    netns: c.info.netns.clone(),
                    unix: c.info.target.address.unix().map(std::path::Path::to_owned),
                },
                c.info.target.admin.clone(),
            );
            let tx = tx.clone();
            let spawned = std::thread::Builder::new()
                .name("interceptor-cancel".into())
                .spawn(move || {
                    let r = cancel::cancel(&server, &key, admin.as_ref());
                    if let Err(e) = &r {
                        tracing::warn!(conn = id, "server-side cancel failed: {e}");
                    }
                    let _ = tx.send((id, r));
                });
            if let Err(e) = spawned {
                pending -= 1;
                if let Some(s) = stopped.last_mut() {
                    s.cancel = "failed";
                    s.error = Some(format!("cannot start a cancel thread: {e}"));
                }
            }
        }
        drop(tx);
        while pending > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok((id, r)) = rx.recv_timeout(left) else {
                break;
            };
            pending -= 1;
            if let Some(s) = stopped.iter_mut().find(|s| s.conn == id) {
                match r {
                    Ok(()) => s.cancel = "sent",
                    Err(e) => {
                        s.cancel = "failed";
                        s.error = Some(e);
                    }
                }
            }
        }
        for c in conns {
            c.kill(reason);
        }
        stopped
    }

    /// `interceptor unblock`.
    ///
    /// # Errors
    /// A bad selector, or one that is not blocked.
    pub fn unblock(&self, caller: &Caller, text: &str) -> Result<Value, String> {
        let canonical = Selector::parse(text)
            .map_err(|e| e.to_string())?
            .canonical();
        let mut entries = self.lock();
        let Some(pos) = entries.iter().position(|e| e.selector == canonical) else {
            let active: Vec<&str> = entries.iter().map(|e| e.selector.as_str()).collect();
            return Err(format!(
                "not blocked: {canonical} (active blocks: {})",
                if active.is_empty() {
                    "none".to_owned()
                } else {
                    active.join("; ")
                }
            ));
        };
        let removed = entries.remove(pos);
        self.shared.blocks.publish(&entries);
        self.refresh_locked(&entries);
        let persisted = save_state(&self.state_path, &entries);
        drop(entries);
        let actor = Actor::from(caller);
        let mut ev = AuditEvent::new("unblock")
            .with("selector", &canonical)
            .with("actor", &actor)
            .with("reason", &removed.reason)
            .with("blocked_since", &removed.since)
            .with("blocked_by", &removed.actor);
        if let Err(e) = &persisted {
            ev = ev.with("persist_error", e);
        }
        self.shared.audit.record(ev);
        Ok(json!({
            "selector": canonical,
            "blocked_since": removed.since,
            "persisted": persisted.is_ok(),
            "persist_error": persisted.err(),
        }))
    }

    /// `interceptor blocks`.
    #[must_use]
    pub fn list(&self) -> Value {
        let entries = self.lock().clone();
        let blocks: Vec<Value> = entries
            .iter()
            .map(|e| {
                json!({
                    "selector": e.selector,
                    "reason": e.reason,
                    "actor": e.actor,
                    "since": e.since,
                    "kernel_keys": self.key_count(&e.selector),
                })
            })
            .collect();
        json!({ "blocks": blocks, "state_file": self.state_path.display().to_string() })
    }
}

fn elapsed_us(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
