//! Loads the embedded kernel programs, fills their maps from the policy's
//! targets and attaches them to one cgroup v2 directory. Dropping the
//! [`Redirector`] detaches everything: no redirect outlives the agent.

use std::{
    fs::File,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, RingBuf, SockHash, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SkMsg, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use interceptor_common::{
    AgentConfig, BlockKey, BypassFlow, BypassKey, ConnRecord, MAP_BLOCKED, MAP_BYPASS,
    MAP_BYPASS_FLOWS, MAP_CONFIG, MAP_CONN_BY_ADDR, MAP_CONN_BY_COOKIE, MAP_EXEMPT_TGIDS,
    MAP_NETNS, MAP_NETNS_EVENTS, MAP_TARGETS, MAP_UNIX_CONNS, MAP_UNIX_LISTENERS, MAP_UNIX_TARGETS,
    NetnsState, PROG_CONNECT4, PROG_CONNECT6, PROG_EGRESS, PROG_GETPEERNAME4, PROG_GETPEERNAME6,
    PROG_SK_MSG, PROG_SOCK_OPS, SUN_PATH_MAX, SockKey, TARGET_KEY_PORT_BITS, TargetKey,
    TargetValue, UnixKey, UnixPath, UnixTarget, v6_words,
};

use crate::{
    conn::{NetnsMap, OrigDstLookup, monotonic_ns},
    policy::TargetSpec,
};

mod bypass;
mod unix;

pub use bypass::{BypassMode, bypass_key};

/// The kernel object built by build.rs (aya-build) from `interceptor-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("cannot load the kernel programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("kernel object has no {0}")]
    Missing(&'static str),
    #[error("map {name}: {}", chain(source))]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("program {name}: {}", chain(source))]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a cgroup v2 directory")]
    NotCgroup2 { path: PathBuf },
    #[error("pin dir {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "pin dir {path} serves another cgroup (inode {pinned}, not {wanted}); one agent per pin dir: pick another --pin-dir, or `interceptor detach --pin-dir {path}` first"
    )]
    OtherCgroup {
        path: PathBuf,
        pinned: u64,
        wanted: u64,
    },
    #[error("the local bypass failed its self-test: {0}")]
    BypassTest(String),
    #[error(
        "cannot adopt the programs pinned in {path} (left by another version?): {source}; `interceptor detach --pin-dir {path}` removes them"
    )]
    Adopt {
        path: PathBuf,
        source: Box<EbpfError>,
    },
}

/// An error with its causes, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Where the agent listens and how it marks its own sockets.
#[derive(Clone, Copy, Debug)]
pub struct ListenerConfig {
    pub v4: Option<SocketAddr>,
    pub v6: Option<SocketAddr>,
    pub port: u16,
    pub mark: u32,
    /// The agent's own network namespace and its state there (ready, with
    /// the families it listens on), in force before anything is redirected.
    pub home: (u64, NetnsState),
}

/// What happens to the kernel programs when the agent is gone.
#[derive(Clone, Debug)]
pub struct Pinning {
    /// bpffs directory holding the programs' links and maps (one agent each).
    pub dir: PathBuf,
    /// Fail open: with no agent beating, connects go direct. Fail closed
    /// (false): the programs stay and connects to targets are refused.
    pub fail_open: bool,
    /// A running agent hands its sockets over: its namespaces stay served.
    pub handover: bool,
    /// Directory of the agent's unix listeners (unix targets).
    pub unix_dir: PathBuf,
    /// `--local-bypass`: workload-agent messages skip the TCP stack.
    pub local_bypass: BypassMode,
}

/// Every map, pinned by name in the pin dir.
const MAPS: [&str; 13] = [
    MAP_BYPASS,
    MAP_BYPASS_FLOWS,
    MAP_UNIX_TARGETS,
    MAP_UNIX_CONNS,
    MAP_UNIX_LISTENERS,
    MAP_TARGETS,
    MAP_CONFIG,
    MAP_CONN_BY_COOKIE,
    MAP_CONN_BY_ADDR,
    MAP_EXEMPT_TGIDS,
    MAP_BLOCKED,
    MAP_NETNS,
    MAP_NETNS_EVENTS,
];

/// Every program, in attach order: sock_ops first, so a connect redirected
/// a moment later is already re-keyed; connect last, so nothing is
/// redirected before the rest is in place.
const PROGRAMS: [&str; 6] = [
    PROG_SOCK_OPS,
    PROG_EGRESS,
    PROG_GETPEERNAME4,
    PROG_GETPEERNAME6,
    PROG_CONNECT4,
    PROG_CONNECT6,
];

fn link_pin(dir: &Path, prog: &str) -> PathBuf {
    dir.join(format!("link_{prog}"))
}

/// Attached kernel programs and the map the agent reads identities from.
pub struct Redirector {
    // Holds the programs (and their pinned links' fds).
    ebpf: Mutex<Option<Ebpf>>,
    links: Mutex<Vec<PinnedLink>>,
    pinning: Pinning,
    /// Whether the programs were adopted from a previous agent.
    adopted: bool,
    by_addr: Mutex<HashMap<MapData, SockKey, ConnRecord>>,
    targets: Mutex<LpmTrie<MapData, TargetKey, TargetValue>>,
    blocked: Mutex<HashMap<MapData, BlockKey, u32>>,
    netns: Mutex<HashMap<MapData, u64, NetnsState>>,
    netns_events: Mutex<Option<RingBuf<MapData>>>,
    cgroup: PathBuf,
    unix_targets: Mutex<HashMap<MapData, [u8; SUN_PATH_MAX], UnixTarget>>,
    unix_conns: Mutex<HashMap<MapData, UnixKey, ConnRecord>>,
    unix_listeners: Mutex<HashMap<MapData, [u8; SUN_PATH_MAX], UnixPath>>,
    /// Why unix targets cannot be served here (`None`: they can).
    unix_unsupported: Option<String>,
    /// Where the agent's unix listeners are.
    unix_dir: PathBuf,
    home_netns: u64,
    /// The sockhash the agent adds its accepted sockets to, when the local
    /// bypass is on.
    bypass: Option<Mutex<SockHash<MapData, BypassKey>>>,
    /// Why `--local-bypass auto` left it off.
    bypass_off: Option<String>,
}

impl std::fmt::Debug for Redirector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirector")
            .field("cgroup", &self.cgroup)
            .finish()
    }
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> EbpfError {
    move |source| EbpfError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> EbpfError {
    move |source| EbpfError::Program { name, source }
}

/// The LPM keys for a target: port, then the (IPv4-mapped) address prefix;
/// one per address a DNS-named or Service target has now.
#[must_use]
pub fn target_keys(spec: &TargetSpec) -> Vec<Key<TargetKey>> {
    spec.address
        .prefixes()
        .into_iter()
        .map(|(net, bits, port)| {
            Key::new(
                TARGET_KEY_PORT_BITS + u32::from(bits),
                TargetKey {
                    port_be: port.to_be(),
                    _pad: 0,
                    addr: net.octets(),
                },
            )
        })
        .collect()
}

/// The kernel's view of the agent: listener addresses in `bpf_sock_addr` layout.
#[must_use]
pub fn agent_config(l: &ListenerConfig) -> AgentConfig {
    let ip4 = match l.v4.map(|a| a.ip()) {
        Some(IpAddr::V4(v4)) => u32::from_ne_bytes(v4.octets()),
        _ => 0,
    };
    let ip6 = match l.v6.map(|a| a.ip()) {
        Some(IpAddr::V6(v6)) => v6_words(v6.octets()),
        _ => [0; 4],
    };
    AgentConfig {
        listen_ip4: ip4,
        listen_ip6: ip6,
        listen_port_be: l.port.to_be(),
        _pad: 0,
        has_v4: u32::from(l.v4.is_some()),
        has_v6: u32::from(l.v6.is_some()),
        mark: l.mark,
        enabled: 1,
        fail_open: 0,
        local_bypass: 0,
        heartbeat_ns: 0,
        cgroup_ino: 0,
    }
}

impl Redirector {
    /// Loads the programs, fills the maps and attaches to `cgroup`.
    ///
    /// # Errors
    /// When the kernel refuses a program or map, or `cgroup` is not a cgroup
    /// v2 directory.
    pub fn attach(
        cgroup: &Path,
        targets: &[TargetSpec],
        listener: &ListenerConfig,
        pinning: &Pinning,
    ) -> Result<Self, EbpfError> {
        check_cgroup2(cgroup)?;
        raise_memlock();
        let dir = &pinning.dir;
        let dir_err = |source| EbpfError::PinDir {
            path: dir.clone(),
            source,
        };
        mount_bpffs(dir)?;
        std::fs::create_dir_all(dir).map_err(dir_err)?;
        check_bpffs(dir)?;
        let cgroup_ino =
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(cgroup).map_err(|source| {
                EbpfError::Cgroup {
                    path: cgroup.to_owned(),
                    source,
                }
            })?);
        // Links left pinned by an agent that stopped (fail closed) or died:
        // adopt them, never add a second set to the cgroup.
        let adopted = link_pin(dir, PROG_CONNECT4).exists();
        let mut loader = EbpfLoader::new();
        for name in MAPS {
            loader.map_pin_path(name, dir.join(name));
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| {
            let e = EbpfError::from(e);
            if adopted {
                EbpfError::Adopt {
                    path: dir.clone(),
                    source: Box::new(e),
                }
            } else {
                e
            }
        })?;
        // The sk_msg program is on the sockhash before sock_ops may put a
        // socket there (a socket takes the map's programs when it joins).
        let (bypass, bypass_off) = match pinning.local_bypass {
            BypassMode::Off => (None, None),
            mode => match start_bypass(&mut ebpf, listener.home.0, mode == BypassMode::Auto) {
                Ok(map) => (Some(Mutex::new(map)), None),
                Err(e) if mode == BypassMode::Auto => {
                    tracing::info!("local bypass off: {e}");
                    (None, Some(e.to_string()))
                }
                Err(e) => return Err(e),
            },
        };

        {
            let map = ebpf
                .map_mut(MAP_EXEMPT_TGIDS)
                .ok_or(EbpfError::Missing(MAP_EXEMPT_TGIDS))?;
            let mut exempt: HashMap<_, u32, u32> =
                HashMap::try_from(map).map_err(map_err(MAP_EXEMPT_TGIDS))?;
            // A previous agent's tgid is nobody's once it exited (or soon
            // someone else's); one still draining keeps its exemption.
            let stale: Vec<u32> = exempt
                .keys()
                .filter_map(Result::ok)
                .filter(|t| !Path::new(&format!("/proc/{t}")).exists())
                .collect();
            for tgid in stale {
                let _ = exempt.remove(&tgid);
            }
            exempt
                .insert(std::process::id(), 1, 0)
                .map_err(map_err(MAP_EXEMPT_TGIDS))?;
        }
        {
            let map = ebpf
                .map_mut(MAP_CONFIG)
                .ok_or(EbpfError::Missing(MAP_CONFIG))?;
            let mut cfg: Array<_, AgentConfig> =
                Array::try_from(map).map_err(map_err(MAP_CONFIG))?;
            let pinned = cfg.get(&0, 0).map_err(map_err(MAP_CONFIG))?;
            if adopted && pinned.cgroup_ino != 0 && pinned.cgroup_ino != cgroup_ino {
                return Err(EbpfError::OtherCgroup {
                    path: dir.clone(),
                    pinned: pinned.cgroup_ino,
                    wanted: cgroup_ino,
                });
            }
            let mut c = agent_config(listener);
            c.fail_open = u32::from(pinning.fail_open);
            c.heartbeat_ns = monotonic_ns();
            c.cgroup_ino = cgroup_ino;
            c.local_bypass = u32::from(bypass.is_some());
            cfg.set(0, c, 0).map_err(map_err(MAP_CONFIG))?;
        }
        let mut netns: HashMap<MapData, u64, NetnsState> = HashMap::try_from(
            ebpf.take_map(MAP_NETNS)
                .ok_or(EbpfError::Missing(MAP_NETNS))?,
        )
        .map_err(map_err(MAP_NETNS))?;
        // Namespaces a previous agent served lost their listeners with it:
        // found again on their next connect.
        let stale: Vec<u64> = if pinning.handover {
            Vec::new()
        } else {
            netns.keys().filter_map(Result::ok).collect()
        };
        for cookie in stale {
            let _ = netns.remove(&cookie);
        }
        netns
            .insert(listener.home.0, listener.home.1, 0)
            .map_err(map_err(MAP_NETNS))?;
        let netns_events = RingBuf::try_from(
            ebpf.take_map(MAP_NETNS_EVENTS)
                .ok_or(EbpfError::Missing(MAP_NETNS_EVENTS))?,
        )
        .map_err(map_err(MAP_NETNS_EVENTS))?;

        // Targets are filled after the programs attach (set_targets): until
        // then the programs match nothing, so nothing is redirected early.
        // (An adopted set keeps redirecting the targets it had meanwhile.)
        let fd = File::open(cgroup).map_err(|source| EbpfError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        // Attached as bpf_links (kernel >= 5.7), which always coexist with
        // other programs on the cgroup; the kernel refuses attach flags on
        // links, so the mode must be the flagless `Single`. Each link is
        // pinned, so it outlives the agent; an adopted link gets the new
        // program with bpf_link_update: no moment without a program.
        let mode = CgroupAttachMode::Single;
        let mut links = Vec::new();
        for name in PROGRAMS {
            let path = link_pin(dir, name);
            let prog = ebpf.program_mut(name).ok_or(EbpfError::Missing(name))?;
            let link = if name == PROG_SOCK_OPS {
                let prog: &mut SockOps = prog.try_into().map_err(prog_err(name))?;
                prog.load().map_err(prog_err(name))?;
                if path.exists() {
                    update_link(&path, prog.fd().map_err(prog_err(name))?)?
                } else {
                    let id = prog.attach(&fd, mode).map_err(prog_err(name))?;
                    pin(
                        FdLink::try_from(prog.take_link(id).map_err(prog_err(name))?),
                        &path,
                    )?
                }
            } else if name == PROG_EGRESS {
                let prog: &mut CgroupSkb = prog.try_into().map_err(prog_err(name))?;
                prog.load().map_err(prog_err(name))?;
                if path.exists() {
                    update_link(&path, prog.fd().map_err(prog_err(name))?)?
                } else {
                    let id = prog
                        .attach(&fd, CgroupSkbAttachType::Egress, mode)
                        .map_err(prog_err(name))?;
                    pin(
                        FdLink::try_from(prog.take_link(id).map_err(prog_err(name))?),
                        &path,
                    )?
                }
            } else {
                let prog: &mut CgroupSockAddr = prog.try_into().map_err(prog_err(name))?;
                prog.load().map_err(prog_err(name))?;
                if path.exists() {
                    update_link(&path, prog.fd().map_err(prog_err(name))?)?
                } else {
                    let id = prog.attach(&fd, mode).map_err(prog_err(name))?;
                    pin(
                        FdLink::try_from(prog.take_link(id).map_err(prog_err(name))?),
                        &path,
                    )?
                }
            };
            links.push(link);
        }

        // The unix hooks, where the kernel has them (6.7+); loaded by hand.
        let unix_unsupported = unix::kfuncs()
            .and_then(|k| unix::load(OBJECT, dir, k))
            .and_then(|progs| {
                progs.iter().try_for_each(|p| {
                    unix::attach(
                        p,
                        std::os::fd::AsRawFd::as_raw_fd(&fd),
                        &link_pin(dir, p.name),
                    )
                })
            })
            .err();
        if let Some(why) = &unix_unsupported {
            tracing::info!("unix socket targets unavailable: {why}");
        }
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(EbpfError::Missing(name))
        };
        let unix_targets = HashMap::try_from(take(&mut ebpf, MAP_UNIX_TARGETS)?)
            .map_err(map_err(MAP_UNIX_TARGETS))?;
        let unix_conns =
            HashMap::try_from(take(&mut ebpf, MAP_UNIX_CONNS)?).map_err(map_err(MAP_UNIX_CONNS))?;
        let unix_listeners = HashMap::try_from(take(&mut ebpf, MAP_UNIX_LISTENERS)?)
            .map_err(map_err(MAP_UNIX_LISTENERS))?;
        let by_addr_map = ebpf
            .take_map(MAP_CONN_BY_ADDR)
            .ok_or(EbpfError::Missing(MAP_CONN_BY_ADDR))?;
        let by_addr = HashMap::try_from(by_addr_map).map_err(map_err(MAP_CONN_BY_ADDR))?;
        let targets_map = ebpf
            .take_map(MAP_TARGETS)
            .ok_or(EbpfError::Missing(MAP_TARGETS))?;
        let trie = LpmTrie::try_from(targets_map).map_err(map_err(MAP_TARGETS))?;
        let blocked_map = ebpf
            .take_map(MAP_BLOCKED)
            .ok_or(EbpfError::Missing(MAP_BLOCKED))?;
        let blocked = HashMap::try_from(blocked_map).map_err(map_err(MAP_BLOCKED))?;
        let me = Self {
            ebpf: Mutex::new(Some(ebpf)),
            links: Mutex::new(links),
            pinning: pinning.clone(),
            adopted,
            by_addr: Mutex::new(by_addr),
            targets: Mutex::new(trie),
            blocked: Mutex::new(blocked),
            netns: Mutex::new(netns),
            netns_events: Mutex::new(Some(netns_events)),
            cgroup: cgroup.to_owned(),
            unix_targets: Mutex::new(unix_targets),
            unix_conns: Mutex::new(unix_conns),
            unix_listeners: Mutex::new(unix_listeners),
            unix_unsupported,
            unix_dir: pinning.unix_dir.clone(),
            home_netns: listener.home.0,
            bypass,
            bypass_off,
        };
        me.set_targets(targets)?;
        Ok(me)
    }

    /// Makes the kernel redirect exactly these targets (on start and on
    /// policy reload). Target ids are positions in `targets`.
    ///
    /// # Errors
    /// When the kernel refuses a map update.
    pub fn set_targets(&self, targets: &[TargetSpec]) -> Result<(), EbpfError> {
        let mut trie = self
            .targets
            .lock()
            .map_err(|_| EbpfError::Missing("targets lock"))?;
        // A name that resolves to an address some other target also holds
        // leaves that key to the earlier target, as listed.
        let mut wanted: Vec<(Key<TargetKey>, TargetValue)> = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            let value = TargetValue {
                target_id: u32::try_from(i).unwrap_or(u32::MAX),
                protocol: t.protocol.wire_id(),
            };
            for key in target_keys(t) {
                if !wanted
                    .iter()
                    .any(|(w, _)| w.prefix_len() == key.prefix_len() && w.data() == key.data())
                {
                    wanted.push((key, value));
                }
            }
        }
        let stale: Vec<_> = trie
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                !wanted
                    .iter()
                    .any(|(w, _)| w.prefix_len() == k.prefix_len() && w.data() == k.data())
            })
            .collect();
        // Stale keys go first to make room; a key that stays is overwritten
        // in place, never absent.
        for k in stale {
            trie.remove(&k).map_err(map_err(MAP_TARGETS))?;
        }
        for (key, value) in &wanted {
            trie.insert(key, *value, 0).map_err(map_err(MAP_TARGETS))?;
        }
        drop(trie);
        self.set_unix_targets(targets)
    }

    /// Why unix socket targets cannot be served on this kernel, if so.
    #[must_use]
    pub fn unix_unsupported(&self) -> Option<&str> {
        self.unix_unsupported.as_deref()
    }

    /// The agent's unix listener for each unix target, in the kernel's map.
    fn set_unix_targets(&self, targets: &[TargetSpec]) -> Result<(), EbpfError> {
        let mut map = self
            .unix_targets
            .lock()
            .map_err(|_| EbpfError::Missing("unix targets lock"))?;
        let mut wanted = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            let Some(path) = t.address.unix() else {
                continue;
            };
            let (listen_id, listen) = crate::conn::unix_listener(&self.unix_dir, path);
            let (Some(key), Some(listen)) = (unix_path(path), unix_path(&listen)) else {
                tracing::warn!("unix target {}: path too long", path.display());
                continue;
            };
            let value = UnixTarget {
                target: TargetValue {
                    target_id: u32::try_from(i).unwrap_or(u32::MAX),
                    protocol: t.protocol.wire_id(),
                },
                listen_id,
                _pad: 0,
                home_netns: self.home_netns,
                listen,
            };
            wanted.push((key.path, value));
        }
        let stale: Vec<[u8; SUN_PATH_MAX]> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.iter().any(|(w, _)| w == k))
            .collect();
        for k in stale {
            map.remove(&k).map_err(map_err(MAP_UNIX_TARGETS))?;
        }
        for (k, v) in &wanted {
            map.insert(k, v, 0).map_err(map_err(MAP_UNIX_TARGETS))?;
        }
        drop(map);
        // What getpeername shows for each listener: the target's path.
        let mut map = self
            .unix_listeners
            .lock()
            .map_err(|_| EbpfError::Missing("unix listeners lock"))?;
        let shown: Vec<([u8; SUN_PATH_MAX], UnixPath)> = targets
            .iter()
            .filter_map(|t| t.address.unix())
            .filter_map(|path| {
                let bound = crate::conn::unix_bound_name(&self.unix_dir, path);
                Some((unix_path(&bound)?.path, unix_path(path)?))
            })
            .collect();
        let stale: Vec<[u8; SUN_PATH_MAX]> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !shown.iter().any(|(w, _)| w == k))
            .collect();
        for k in stale {
            map.remove(&k).map_err(map_err(MAP_UNIX_LISTENERS))?;
        }
        for (k, v) in &shown {
            map.insert(k, v, 0).map_err(map_err(MAP_UNIX_LISTENERS))?;
        }
        Ok(())
    }

    /// Makes the kernel refuse connects to targets from exactly these
    /// blocked tgids, uids, comms and cgroups (the kill switch). Entries
    /// already present stay untouched, so a connect racing the update is
    /// never let through by a remove-then-insert.
    ///
    /// # Errors
    /// When the kernel refuses a map update (e.g. the map is full).
    pub fn set_blocked(&self, keys: &std::collections::HashSet<BlockKey>) -> Result<(), EbpfError> {
        let mut map = self
            .blocked
            .lock()
            .map_err(|_| EbpfError::Missing("blocked lock"))?;
        let present: Vec<BlockKey> = map.keys().filter_map(Result::ok).collect();
        for k in keys {
            if !present.contains(k) {
                map.insert(k, 1, 0).map_err(map_err(MAP_BLOCKED))?;
            }
        }
        for k in present.iter().filter(|k| !keys.contains(k)) {
            map.remove(k).map_err(map_err(MAP_BLOCKED))?;
        }
        Ok(())
    }

    /// Detaches every program and removes the pin dir (fail open, or an
    /// uninstall); connections from then on go direct.
    pub fn detach(&self) {
        if let Err(e) = unpin_all(&self.pinning.dir) {
            tracing::warn!("{e}");
        }
        self.release();
    }

    /// Lets go of the programs without detaching them (fail closed): they
    /// stay pinned, and connects to targets are refused until an agent
    /// serves again.
    pub fn release(&self) {
        let ebpf = match self.ebpf.lock() {
            Ok(mut g) => g.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        drop(ebpf);
        if let Ok(mut links) = self.links.lock() {
            links.clear();
        }
    }

    /// Whether the local bypass is on, and when `auto` left it off, why.
    #[must_use]
    pub fn local_bypass(&self) -> (bool, Option<&str>) {
        (self.bypass.is_some(), self.bypass_off.as_deref())
    }

    /// Whether the programs were adopted from a previous agent's pin dir.
    #[must_use]
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The agent is alive: fail-open programs keep redirecting.
    pub fn heartbeat(&self) {
        if let Ok(mut guard) = self.ebpf.lock()
            && let Some(ebpf) = guard.as_mut()
            && let Some(map) = ebpf.map_mut(MAP_CONFIG)
            && let Ok(mut cfg) = Array::<_, AgentConfig>::try_from(map)
            && let Ok(mut c) = cfg.get(&0, 0)
        {
            c.heartbeat_ns = monotonic_ns();
            let _ = cfg.set(0, c, 0);
        }
    }

    #[must_use]
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The ring buffer of connects from namespaces not served yet, for the
    /// namespace manager (once).
    #[must_use]
    pub fn take_netns_events(&self) -> Option<RingBuf<MapData>> {
        self.netns_events.lock().ok()?.take()
    }

    /// Entries in the kernel maps worth watching, with their capacity:
    /// redirected sockets still open (by cookie) and configured targets.
    /// The by-address map is left out: counting it would hold the lock the
    /// accept path takes.
    #[must_use]
    pub fn occupancy(&self) -> Vec<(&'static str, usize, u32)> {
        let mut out = Vec::new();
        if let Ok(guard) = self.ebpf.lock()
            && let Some(ebpf) = guard.as_ref()
        {
            if let Some(n) = keys::<u64, ConnRecord>(ebpf, MAP_CONN_BY_COOKIE) {
                out.push((MAP_CONN_BY_COOKIE, n, interceptor_common::MAX_CONNS));
            }
            // Connections in the local bypass now (one flow each).
            if self.bypass.is_some()
                && let Some(n) = keys::<BypassKey, BypassFlow>(ebpf, MAP_BYPASS_FLOWS)
            {
                out.push((MAP_BYPASS_FLOWS, n, interceptor_common::MAX_BYPASS));
            }
        }
        if let Ok(trie) = self.targets.lock() {
            out.push((
                MAP_TARGETS,
                trie.keys().filter(Result::is_ok).count(),
                interceptor_common::MAX_TARGETS,
            ));
        }
        if let Ok(blocked) = self.blocked.lock() {
            out.push((
                MAP_BLOCKED,
                blocked.keys().filter(Result::is_ok).count(),
                interceptor_common::MAX_BLOCKED,
            ));
        }
        if let Ok(netns) = self.netns.lock() {
            out.push((
                MAP_NETNS,
                netns.keys().filter(Result::is_ok).count(),
                interceptor_common::MAX_NETNS,
            ));
        }
        out
    }
}

/// Namespace and peer address of an accepted socket as the kernel keyed it.
#[must_use]
pub fn sock_key(netns_cookie: u64, peer: SocketAddr) -> SockKey {
    let ip: Ipv6Addr = match peer.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    SockKey {
        netns_cookie,
        addr: ip.octets(),
        port: peer.port(),
        _pad: 0,
        _pad2: 0,
    }
}

impl NetnsMap for Redirector {
    fn set_netns(&self, cookie: u64, state: NetnsState) -> Result<(), String> {
        let mut map = self.netns.lock().map_err(|_| "netns lock".to_owned())?;
        map.insert(cookie, state, 0).map_err(|e| e.to_string())
    }

    fn remove_netns(&self, cookie: u64) {
        if let Ok(mut map) = self.netns.lock() {
            let _ = map.remove(&cookie);
        }
    }

    fn netns_entries(&self) -> Vec<(u64, NetnsState)> {
        self.netns.lock().map_or_else(
            |_| Vec::new(),
            |map| map.iter().filter_map(Result::ok).collect(),
        )
    }
}

/// `path` as the kernel programs hold it; `None` when it does not fit.
fn unix_path(path: &Path) -> Option<UnixPath> {
    use std::os::unix::ffi::OsStrExt as _;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= SUN_PATH_MAX {
        return None;
    }
    let mut p = UnixPath::ZERO;
    p.path[..bytes.len()].copy_from_slice(bytes);
    p.len = u32::try_from(bytes.len()).ok()?;
    Some(p)
}

impl OrigDstLookup for Redirector {
    fn take(&self, netns_cookie: u64, peer: SocketAddr) -> Option<ConnRecord> {
        let key = sock_key(netns_cookie, peer);
        let mut map = self.by_addr.lock().ok()?;
        let rec = map.get(&key, 0).ok()?;
        // The entry has served its purpose; the kernel drops its cookie twin
        // when the socket closes.
        let _ = map.remove(&key);
        Some(rec)
    }

    fn take_unix(&self, netns_cookie: u64, tgid: u32, listen_id: u32) -> Option<ConnRecord> {
        let key = UnixKey {
            netns_cookie,
            tgid,
            listen_id,
        };
        // Left in place: threads of one process connecting at once share
        // the key, and each connect rewrote it before its accept; the LRU
        // map ages entries out.
        let map = self.unix_conns.lock().ok()?;
        map.get(&key, 0).ok()
    }

    fn join_bypass(&self, netns_cookie: u64, socket: BorrowedFd<'_>) {
        let Some(bypass) = &self.bypass else {
            return;
        };
        let Ok(key) = bypass::key_of(netns_cookie, socket2::SockRef::from(&socket)) else {
            return;
        };
        if let Ok(mut map) = bypass.lock() {
            // Refused when the client already closed (not established) or
            // the map is full: the connection stays on TCP.
            if let Err(e) = map.insert(key, socket.as_raw_fd(), 0) {
                tracing::debug!("local bypass: {e}");
            }
        }
    }
}

/// Entries of a hash map the loaded object still holds.
fn keys<K: aya::Pod, V: aya::Pod>(ebpf: &Ebpf, name: &str) -> Option<usize> {
    let map = HashMap::<_, K, V>::try_from(ebpf.map(name)?).ok()?;
    Some(map.keys().filter(Result::is_ok).count())
}

/// Attaches the sk_msg program to the bypass sockhash; with `test`, then
/// runs the self-test on it (see [`bypass`]).
fn start_bypass(
    ebpf: &mut Ebpf,
    home_netns: u64,
    test: bool,
) -> Result<SockHash<MapData, BypassKey>, EbpfError> {
    let mut map = SockHash::<_, BypassKey>::try_from(
        ebpf.take_map(MAP_BYPASS)
            .ok_or(EbpfError::Missing(MAP_BYPASS))?,
    )
    .map_err(map_err(MAP_BYPASS))?;
    let prog: &mut SkMsg = ebpf
        .program_mut(PROG_SK_MSG)
        .ok_or(EbpfError::Missing(PROG_SK_MSG))?
        .try_into()
        .map_err(prog_err(PROG_SK_MSG))?;
    prog.load().map_err(prog_err(PROG_SK_MSG))?;
    prog.attach(map.fd()).map_err(prog_err(PROG_SK_MSG))?;
    if test {
        let mut flows = HashMap::try_from(
            ebpf.map_mut(MAP_BYPASS_FLOWS)
                .ok_or(EbpfError::Missing(MAP_BYPASS_FLOWS))?,
        )
        .map_err(map_err(MAP_BYPASS_FLOWS))?;
        bypass::self_test(&mut map, &mut flows, home_netns).map_err(EbpfError::BypassTest)?;
    }
    Ok(map)
}

/// Pins a freshly attached link.
fn pin(
    link: Result<FdLink, aya::programs::links::LinkError>,
    path: &Path,
) -> Result<PinnedLink, EbpfError> {
    let link = link.map_err(|e| EbpfError::PinDir {
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })?;
    link.pin(path).map_err(|e| EbpfError::PinDir {
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Points the pinned link at `path` to `prog` (`BPF_LINK_UPDATE`, kernel
/// >= 5.7): the cgroup is never without the program.
fn update_link(path: &Path, prog: &aya::programs::ProgramFd) -> Result<PinnedLink, EbpfError> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let err = |source: std::io::Error| EbpfError::PinDir {
        path: path.to_owned(),
        source,
    };
    let link = PinnedLink::from_pin(path).map_err(|e| err(std::io::Error::other(e.to_string())))?;
    let link_fd = bpf_obj_get(path).map_err(err)?;
    bpf_link_update(link_fd.as_raw_fd(), prog.as_fd().as_raw_fd()).map_err(err)?;
    Ok(link)
}

/// `BPF_OBJ_GET`: an fd of a pinned object.
pub(crate) fn bpf_obj_get(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let attr = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
    };
    // SAFETY: `attr` is a valid, fully initialised bpf_attr prefix for
    // BPF_OBJ_GET whose pathname points at a live NUL-terminated string.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &raw const attr,
            std::mem::size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: the kernel just returned this fd, owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// `BPF_LINK_UPDATE`: swaps the program behind a link atomically.
pub(crate) fn bpf_link_update(link_fd: i32, prog_fd: i32) -> std::io::Result<()> {
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let attr = LinkUpdate {
        link_fd: u32::try_from(link_fd).map_err(std::io::Error::other)?,
        new_prog_fd: u32::try_from(prog_fd).map_err(std::io::Error::other)?,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: `attr` is a valid, fully initialised bpf_attr prefix for
    // BPF_LINK_UPDATE; the fds are live for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &raw const attr,
            std::mem::size_of::<LinkUpdate>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Removes what an agent pinned in `dir` (links first: the programs leave
/// the cgroup as soon as no agent holds them), then the directory. Returns
/// what it removed. Only the names the agent pins are touched.
///
/// # Errors
/// When a pin cannot be removed.
pub fn unpin_all(dir: &Path) -> Result<Vec<PathBuf>, EbpfError> {
    let mut removed = Vec::new();
    let names = PROGRAMS
        .iter()
        .chain(unix::PROGRAMS.iter().map(|(p, _)| p))
        .map(|p| link_pin(dir, p))
        .chain(MAPS.iter().map(|m| dir.join(m)));
    for path in names {
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(EbpfError::PinDir { path, source }),
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => removed.push(dir.to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(EbpfError::PinDir {
                path: dir.to_owned(),
                source,
            });
        }
    }
    Ok(removed)
}

/// Where bpffs lives on every distribution that mounts it.
const BPFFS: &str = "/sys/fs/bpf";

/// Mounts bpffs at /sys/fs/bpf when the pin dir is below it and nothing
/// mounted it yet (systemd does at boot on most hosts; minimal VMs and
/// containers may not).
fn mount_bpffs(dir: &Path) -> Result<(), EbpfError> {
    let root = Path::new(BPFFS);
    if !dir.starts_with(root) || check_bpffs(root).is_ok() {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        root,
        Some("bpf"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| EbpfError::PinDir {
        path: root.to_owned(),
        source: std::io::Error::other(format!("cannot mount bpffs: {e}")),
    })?;
    tracing::info!("mounted bpffs at {BPFFS}");
    Ok(())
}

fn check_bpffs(path: &Path) -> Result<(), EbpfError> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let st = nix::sys::statfs::statfs(path).map_err(|e| EbpfError::PinDir {
        path: path.to_owned(),
        source: e.into(),
    })?;
    #[allow(clippy::cast_lossless, clippy::useless_conversion)]
    let magic = i64::from(st.filesystem_type().0);
    if magic == BPF_FS_MAGIC {
        Ok(())
    } else {
        Err(EbpfError::PinDir {
            path: path.to_owned(),
            source: std::io::Error::other("not on a BPF file system (mount bpffs at /sys/fs/bpf)"),
        })
    }
}

fn check_cgroup2(path: &Path) -> Result<(), EbpfError> {
    // cgroup2's magic number, as statfs reports it.
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let st = nix::sys::statfs::statfs(path).map_err(|e| EbpfError::Cgroup {
        path: path.to_owned(),
        source: e.into(),
    })?;
    #[allow(clippy::cast_lossless, clippy::useless_conversion)]
    let magic = i64::from(st.filesystem_type().0);
    if magic == CGROUP2_SUPER_MAGIC {
        Ok(())
    } else {
        Err(EbpfError::NotCgroup2 {
            path: path.to_owned(),
        })
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock() {
    use nix::sys::resource::{Resource, setrlimit};
    let _ = setrlimit(
        Resource::RLIMIT_MEMLOCK,
        libc::RLIM_INFINITY,
        libc::RLIM_INFINITY,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyFile;

    #[test]
    fn target_keys_cover_port_and_prefix() {
        let p = PolicyFile::parse(
            "version: 1\ntargets:\n  - {name: a, protocol: postgres, address: 10.0.0.0/8:5432}\n  - {name: b, protocol: mysql, address: '[::1]:3306'}\n",
            Path::new("t"),
        )
        .unwrap();
        let a = target_keys(&p.targets[0]).remove(0);
        let (plen, data) = (a.prefix_len(), a.data());
        assert_eq!(plen, 32 + 96 + 8);
        assert_eq!(data.port_be, 5432u16.to_be());
        assert_eq!(&data.addr[10..13], &[0xff, 0xff, 10]);
        let b = target_keys(&p.targets[1]).remove(0);
        assert_eq!(b.prefix_len(), 32 + 128);
        assert_eq!(b.data().addr[15], 1);
    }

    #[test]
    fn agent_config_layout() {
        let c = agent_config(&ListenerConfig {
            v4: Some("127.0.0.1:15432".parse().unwrap()),
            v6: None,
            port: 15432,
            mark: 7,
            home: (
                0,
                NetnsState {
                    state: 0,
                    families: 0,
                    since_ns: 0,
                    tgid: 0,
                    pid: 0,
                },
            ),
        });
        assert_eq!(c.listen_ip4.to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(u16::from_be(c.listen_port_be), 15432);
        assert_eq!((c.has_v4, c.has_v6, c.mark, c.enabled), (1, 0, 7, 1));
    }

    #[test]
    fn sock_keys_map_v4() {
        let k = sock_key(9, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(&k.addr[10..], &[0xff, 0xff, 127, 0, 0, 1]);
        assert_eq!((k.port, k.netns_cookie), (40000, 9));
    }
}
