//! The network namespaces the agent serves.
//!
//! The kernel programs rewrite a workload's connect to the agent's loopback
//! listener *in the workload's own network namespace* (a container's or
//! pod's `127.0.0.1` is its own). So the agent keeps one listener in each
//! namespace its workloads connect from, opened by entering the namespace
//! with `setns` on a thread of its own (what service meshes do for in-pod
//! redirection), and connects upstream from that same namespace, so the
//! server is reached exactly as the workload would have reached it.
//!
//! Discovery is on demand and never loses the first connect: connect4/6
//! mark an unknown namespace pending in the kernel's netns map and announce
//! it on a ring buffer; the kernel holds that connect's SYN until the
//! manager here has listened and marked the namespace ready (a millisecond
//! or two). A namespace no process is in any more is forgotten: map entry
//! first, listeners after a grace period, so nothing is left behind.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    os::fd::{AsFd as _, OwnedFd},
    os::unix::fs::MetadataExt as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use interceptor_common::{
    NETNS_FAILED, NETNS_HAS_V4, NETNS_HAS_V6, NETNS_PENDING, NETNS_READY, NetnsEvent, NetnsState,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::{
    audit::{AuditEvent, AuditLog},
    conn::{Netns, NetnsMap, bind_listener, monotonic_ns, netns_cookie, open_ns},
};

/// A failed namespace is retried after this long.
const FAILED_RETRY: Duration = Duration::from_secs(5);
/// A namespace no process is in keeps its listeners this long after its
/// map entry went, for SYNs already on their way.
const GONE_GRACE: Duration = Duration::from_secs(2);
/// How often pending entries are swept (events lost on a full ring).
const SWEEP_EVERY: Duration = Duration::from_millis(200);
/// How often `/proc` is scanned for namespaces nobody uses any more.
const GC_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open the network namespace of task {tgid}/{pid}: {source}")]
    Open {
        tgid: u32,
        pid: u32,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace: {0}")]
    Enter(nix::Error),
    #[error("cannot listen on {addr} in the namespace: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the task left the namespace before the agent could enter it")]
    Moved,
    #[error("kernel map: {0}")]
    Map(String),
}

/// A listener for a worker to serve, until `stop` fires or is dropped.
pub struct ServeListener {
    pub listener: Listener,
    pub netns: Arc<Netns>,
    pub stop: oneshot::Receiver<()>,
}

/// A listening socket a worker accepts on.
pub enum Listener {
    Tcp(std::net::TcpListener),
    /// The agent's listener for one unix target (see
    /// [`crate::conn::unix_listener`]).
    Unix {
        listener: std::os::unix::net::UnixListener,
        listen_id: u32,
    },
}

struct Served {
    netns: Arc<Netns>,
    families: u32,
    /// Duplicates of the listeners the workers serve, for a handover.
    listeners: Vec<std::net::TcpListener>,
    /// Dropping these stops the listeners.
    _stops: Vec<oneshot::Sender<()>>,
    listen: Vec<SocketAddr>,
    since: time::OffsetDateTime,
    /// When a scan first found no process in it.
    gone_since: Option<Instant>,
}

/// One served namespace, as `status` shows it.
#[derive(Debug, Serialize)]
pub struct ServedInfo {
    pub netns_cookie: u64,
    pub netns_inode: u64,
    pub host: bool,
    pub listen: Vec<String>,
    pub since: String,
}

/// Finds, serves and forgets network namespaces.
pub struct NetnsManager {
    v4: Option<SocketAddr>,
    v6: Option<SocketAddr>,
    kernel: Arc<dyn NetnsMap>,
    workers: Vec<mpsc::UnboundedSender<ServeListener>>,
    next_worker: AtomicUsize,
    audit: AuditLog,
    home: Arc<Netns>,
    served: Mutex<HashMap<u64, Served>>,
    stop: AtomicBool,
    proc_root: std::path::PathBuf,
}

impl NetnsManager {
    /// A manager that hands listeners to `workers` round-robin. The home
    /// namespace's listeners are the workers' own, bound at start.
    #[must_use]
    pub fn new(
        listen: (Option<SocketAddr>, Option<SocketAddr>),
        kernel: Arc<dyn NetnsMap>,
        workers: Vec<mpsc::UnboundedSender<ServeListener>>,
        audit: AuditLog,
        home: Arc<Netns>,
    ) -> Self {
        let mut served = HashMap::new();
        served.insert(
            home.cookie,
            Served {
                netns: Arc::clone(&home),
                families: families_of(listen.0.is_some(), listen.1.is_some()),
                listeners: Vec::new(),
                _stops: Vec::new(),
                listen: listen.0.into_iter().chain(listen.1).collect(),
                since: time::OffsetDateTime::now_utc(),
                gone_since: None,
            },
        );
        Self {
            v4: listen.0,
            v6: listen.1,
            kernel,
            workers,
            next_worker: AtomicUsize::new(0),
            audit,
            home,
            served: Mutex::new(served),
            stop: AtomicBool::new(false),
            proc_root: std::path::PathBuf::from("/proc"),
        }
    }

    /// The agent's own namespace.
    #[must_use]
    pub fn home(&self) -> &Arc<Netns> {
        &self.home
    }

    /// The kernel state of the home namespace, set before anything is redirected.
    #[must_use]
    pub fn home_state(&self) -> NetnsState {
        NetnsState {
            state: NETNS_READY,
            families: families_of(self.v4.is_some(), self.v6.is_some()),
            since_ns: 0,
            tgid: 0,
            pid: 0,
        }
    }

    /// Served namespaces, for `status`.
    #[must_use]
    pub fn served(&self) -> Vec<ServedInfo> {
        let Ok(served) = self.served.lock() else {
            return Vec::new();
        };
        let mut out: Vec<ServedInfo> = served
            .values()
            .map(|s| ServedInfo {
                netns_cookie: s.netns.cookie,
                netns_inode: s.netns.inode,
                host: s.netns.is_home(),
                listen: s.listen.iter().map(ToString::to_string).collect(),
                since: crate::audit::format_ts(s.since),
            })
            .collect();
        out.sort_by_key(|s| (!s.host, s.netns_inode));
        out
    }

    /// The inode of a served namespace, by cookie.
    #[must_use]
    pub fn inode_of(&self, cookie: u64) -> Option<u64> {
        self.served.lock().ok()?.get(&cookie).map(|s| s.netns.inode)
    }

    /// Asks the manager thread to end.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// The manager's loop: events from the ring buffer, a sweep of the map
    /// for missed ones, and a scan for namespaces nobody uses. Returns when
    /// [`NetnsManager::shutdown`] is called.
    pub fn run(&self, mut events: Option<aya::maps::RingBuf<aya::maps::MapData>>) {
        let mut last_sweep = Instant::now();
        let mut last_gc = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            if let Some(ring) = events.as_mut() {
                wait_readable(ring, Duration::from_millis(50));
                let mut batch = Vec::new();
                while let Some(item) = ring.next() {
                    if let Some(ev) = parse_event(&item) {
                        batch.push(ev);
                    }
                }
                for ev in batch {
                    self.serve(ev.netns_cookie, ev.tgid, ev.pid);
                }
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
            if last_sweep.elapsed() >= SWEEP_EVERY {
                last_sweep = Instant::now();
                self.sweep();
            }
            if last_gc.elapsed() >= GC_EVERY {
                last_gc = Instant::now();
                self.gc();
            }
        }
    }

    /// Pending entries whose event was lost, and failed ones due a retry.
    fn sweep(&self) {
        let now = monotonic_ns();
        for (cookie, st) in self.kernel.netns_entries() {
            match st.state {
                NETNS_PENDING => self.serve(cookie, st.tgid, st.pid),
                NETNS_FAILED
                    if now.saturating_sub(st.since_ns)
                        > u64::try_from(FAILED_RETRY.as_nanos()).unwrap_or(u64::MAX) =>
                {
                    self.kernel.remove_netns(cookie);
                }
                _ => {}
            }
        }
    }

    /// Serves the namespace `cookie` that task `tgid`/`pid` connected from.
    pub fn serve(&self, cookie: u64, tgid: u32, pid: u32) {
        if let Ok(mut served) = self.served.lock()
            && let Some(s) = served.get_mut(&cookie)
        {
            // Known (the kernel re-announced it: a stale pending entry, or
            // one the grace period had removed): ready again.
            s.gone_since = None;
            let families = s.families;
            drop(served);
            let _ = self.kernel.set_netns(cookie, ready(families));
            return;
        }
        match self.open(cookie, tgid, pid) {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(
                    netns_cookie = cookie,
                    tgid,
                    pid,
                    "cannot serve namespace: {e}"
                );
                let _ = self.kernel.set_netns(
                    cookie,
                    NetnsState {
                        state: NETNS_FAILED,
                        families: 0,
                        since_ns: monotonic_ns(),
                        tgid,
                        pid,
                    },
                );
                self.audit.record(
                    AuditEvent::new("netns_failed")
                        .with("netns_cookie", cookie)
                        .with("pid", tgid)
                        .with("error", e.to_string()),
                );
            }
        }
    }

    fn open(&self, cookie: u64, tgid: u32, pid: u32) -> Result<(), NetnsError> {
        let open_err = |source| NetnsError::Open { tgid, pid, source };
        let fd = open_ns(&format!("/proc/{tgid}/task/{pid}/ns/net"))
            .or_else(|_| open_ns(&format!("/proc/{tgid}/ns/net")))
            .map_err(open_err)?;
        let inode = std::fs::File::from(fd.try_clone().map_err(open_err)?)
            .metadata()
            .map_err(open_err)?
            .ino();
        let mut netns = Netns::guest(cookie, inode, fd);
        let mut listeners = Vec::new();
        let mut families = 0;
        let mut last_err = None;
        for (addr, bit) in [(self.v4, NETNS_HAS_V4), (self.v6, NETNS_HAS_V6)] {
            let Some(addr) = addr else { continue };
            match netns.enter(|| bind_listener(addr).map_err(std::io::Error::other)) {
                Ok(l) => {
                    families |= bit;
                    listeners.push((addr, l));
                }
                Err(source) => last_err = Some(NetnsError::Listen { addr, source }),
            }
        }
        let Some((_, first)) = listeners.first() else {
            return Err(last_err.unwrap_or(NetnsError::Moved));
        };
        let actual = netns_cookie(first).map_err(open_err)?;
        if actual != cookie {
            // The task changed namespace since its connect: the one it
            // left cannot be found from here.
            return Err(NetnsError::Moved);
        }
        netns.cookie = actual;
        let netns = Arc::new(netns);
        let worker = self.next_worker.fetch_add(1, Ordering::Relaxed) % self.workers.len().max(1);
        let mut stops = Vec::new();
        let mut listen = Vec::new();
        let mut dups = Vec::new();
        for (addr, listener) in listeners {
            if let Ok(d) = listener.try_clone() {
                dups.push(d);
            }
            let (tx, rx) = oneshot::channel();
            let Some(w) = self.workers.get(worker) else {
                return Err(NetnsError::Map("no worker".into()));
            };
            if w.send(ServeListener {
                listener: Listener::Tcp(listener),
                netns: Arc::clone(&netns),
                stop: rx,
            })
            .is_err()
            {
                return Err(NetnsError::Map("worker gone".into()));
            }
            stops.push(tx);
            listen.push(addr);
        }
        if let Ok(mut served) = self.served.lock() {
            served.insert(
                cookie,
                Served {
                    netns: Arc::clone(&netns),
                    families,
                    listeners: dups,
                    _stops: stops,
                    listen: listen.clone(),
                    since: time::OffsetDateTime::now_utc(),
                    gone_since: None,
                },
            );
        }
        // Listening sockets queue connections before the worker accepts:
        // ready at once.
        self.kernel
            .set_netns(cookie, ready(families))
            .map_err(NetnsError::Map)?;
        tracing::info!(
            netns_cookie = cookie,
            netns_inode = inode,
            tgid,
            "serving network namespace"
        );
        self.audit.record(
            AuditEvent::new("netns_ready")
                .with("netns_cookie", cookie)
                .with("netns_inode", inode)
                .with("pid", tgid)
                .with(
                    "listen",
                    listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
                ),
        );
        Ok(())
    }

    /// Runs `f` over every served workload namespace, for a handover: its
    /// description, its fd and its listeners.
    pub fn for_handover<R>(
        &self,
        f: impl FnOnce(
            Vec<(
                crate::handover::GuestOffer<'_>,
                &OwnedFd,
                Vec<&std::net::TcpListener>,
            )>,
        ) -> R,
    ) -> Option<R> {
        let served = self.served.lock().ok()?;
        let guests = served
            .values()
            .filter_map(|s| {
                let fd = s.netns.fd()?;
                Some((
                    crate::handover::GuestOffer {
                        cookie: s.netns.cookie,
                        inode: s.netns.inode,
                        families: s.families,
                        listen: &s.listen,
                    },
                    fd,
                    s.listeners.iter().collect(),
                ))
            })
            .collect();
        Some(f(guests))
    }

    /// Serves the namespaces a previous agent handed over, and forgets the
    /// kernel's entries for any it served that did not come along.
    pub fn adopt(&self, guests: Vec<crate::handover::GuestSockets>) {
        for g in guests {
            let netns = Arc::new(Netns::guest(g.cookie, g.inode, g.ns));
            let worker =
                self.next_worker.fetch_add(1, Ordering::Relaxed) % self.workers.len().max(1);
            let mut stops = Vec::new();
            let mut dups = Vec::new();
            for listener in g.listeners {
                if let Ok(d) = listener.try_clone() {
                    dups.push(d);
                }
                let (tx, rx) = oneshot::channel();
                if let Some(w) = self.workers.get(worker)
                    && w.send(ServeListener {
                        listener: Listener::Tcp(listener),
                        netns: Arc::clone(&netns),
                        stop: rx,
                    })
                    .is_ok()
                {
                    stops.push(tx);
                }
            }
            if let Ok(mut served) = self.served.lock() {
                served.insert(
                    g.cookie,
                    Served {
                        netns,
                        families: g.families,
                        listeners: dups,
                        _stops: stops,
                        listen: g.listen,
                        since: time::OffsetDateTime::now_utc(),
                        gone_since: None,
                    },
                );
            }
            let _ = self.kernel.set_netns(g.cookie, ready(g.families));
        }
        let served: HashSet<u64> = self
            .served
            .lock()
            .map(|s| s.keys().copied().collect())
            .unwrap_or_default();
        for (cookie, st) in self.kernel.netns_entries() {
            if st.state == NETNS_READY && !served.contains(&cookie) {
                self.kernel.remove_netns(cookie);
            }
        }
    }

    /// Forgets namespaces no process is in: the map entry first, the
    /// listeners (and the agent's hold on the namespace) after a grace
    /// period.
    fn gc(&self) {
        let has_guests = self
            .served
            .lock()
            .is_ok_and(|s| s.values().any(|x| !x.netns.is_home()));
        if !has_guests {
            return;
        }
        let live = self.live_inodes();
        let mut gone = Vec::new();
        if let Ok(mut served) = self.served.lock() {
            for (cookie, s) in served.iter_mut() {
                if s.netns.is_home() {
                    continue;
                }
                if live.contains(&s.netns.inode) {
                    if s.gone_since.take().is_some() {
                        let _ = self.kernel.set_netns(*cookie, ready(s.families));
                    }
                    continue;
                }
                match s.gone_since {
                    None => {
                        s.gone_since = Some(Instant::now());
                        self.kernel.remove_netns(*cookie);
                    }
                    Some(t) if t.elapsed() >= GONE_GRACE => gone.push(*cookie),
                    Some(_) => {}
                }
            }
            for cookie in &gone {
                if let Some(s) = served.remove(cookie) {
                    self.audit.record(
                        AuditEvent::new("netns_gone")
                            .with("netns_cookie", *cookie)
                            .with("netns_inode", s.netns.inode),
                    );
                }
            }
        }
    }

    /// Inodes of the network namespaces of every process (and thread group
    /// leader) on the host.
    fn live_inodes(&self) -> HashSet<u64> {
        let mut out = HashSet::new();
        let Ok(dir) = std::fs::read_dir(&self.proc_root) else {
            return out;
        };
        for entry in dir.flatten() {
            let name = entry.file_name();
            if !name
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            {
                continue;
            }
            if let Ok(m) = std::fs::metadata(entry.path().join("ns/net")) {
                out.insert(m.ino());
            }
        }
        out
    }
}

fn families_of(v4: bool, v6: bool) -> u32 {
    (if v4 { NETNS_HAS_V4 } else { 0 }) | (if v6 { NETNS_HAS_V6 } else { 0 })
}

fn ready(families: u32) -> NetnsState {
    NetnsState {
        state: NETNS_READY,
        families,
        since_ns: monotonic_ns(),
        tgid: 0,
        pid: 0,
    }
}

fn parse_event(item: &[u8]) -> Option<NetnsEvent> {
    let cookie = u64::from_ne_bytes(item.get(0..8)?.try_into().ok()?);
    let tgid = u32::from_ne_bytes(item.get(8..12)?.try_into().ok()?);
    let pid = u32::from_ne_bytes(item.get(12..16)?.try_into().ok()?);
    Some(NetnsEvent {
        netns_cookie: cookie,
        tgid,
        pid,
    })
}

fn wait_readable(ring: &aya::maps::RingBuf<aya::maps::MapData>, timeout: Duration) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(ring.as_fd(), PollFlags::POLLIN)];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let _ = poll(&mut fds, PollTimeout::from(ms));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Map(Mutex<HashMap<u64, NetnsState>>);

    impl NetnsMap for Map {
        fn set_netns(&self, cookie: u64, state: NetnsState) -> Result<(), String> {
            self.0.lock().unwrap().insert(cookie, state);
            Ok(())
        }
        fn remove_netns(&self, cookie: u64) {
            self.0.lock().unwrap().remove(&cookie);
        }
        fn netns_entries(&self) -> Vec<(u64, NetnsState)> {
            self.0
                .lock()
                .unwrap()
                .iter()
                .map(|(k, v)| (*k, *v))
                .collect()
        }
    }

    #[test]
    fn events_parse_from_ring_bytes() {
        let mut b = 7u64.to_ne_bytes().to_vec();
        b.extend(11u32.to_ne_bytes());
        b.extend(12u32.to_ne_bytes());
        let ev = parse_event(&b).unwrap();
        assert_eq!((ev.netns_cookie, ev.tgid, ev.pid), (7, 11, 12));
        assert!(parse_event(&b[..15]).is_none());
    }

    #[test]
    fn an_unreachable_task_marks_the_namespace_failed_and_a_known_one_ready() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, writer) =
            crate::audit::AuditWriter::start(crate::audit::AuditConfig::new(dir.path().join("a")))
                .unwrap();
        let sock = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let home = Arc::new(Netns::home(&sock).unwrap());
        let map = Arc::new(Map::default());
        let (tx, _rx) = mpsc::unbounded_channel();
        let m = NetnsManager::new(
            (Some("127.0.0.1:1".parse().unwrap()), None),
            map.clone(),
            vec![tx],
            audit,
            Arc::clone(&home),
        );
        // No such task: failed, audited, refused by the kernel until retried.
        m.serve(42, u32::MAX - 1, u32::MAX - 1);
        assert_eq!(map.0.lock().unwrap()[&42].state, NETNS_FAILED);
        // The home namespace is known: re-announcing it makes it ready.
        m.serve(home.cookie, 1, 1);
        assert_eq!(map.0.lock().unwrap()[&home.cookie].state, NETNS_READY);
        assert_eq!(m.served().len(), 1);
        drop(m);
        writer.finish();
        let log = std::fs::read_to_string(dir.path().join("a")).unwrap();
        assert!(log.contains("\"event\":\"netns_failed\""), "{log}");
    }
}
