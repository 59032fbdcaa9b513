//! `interceptor run`: the agent's lifecycle. Listeners are bound before the
//! programs attach (so the first redirected connect finds a listener), the
//! programs are detached before anything else on shutdown (so no connection
//! is redirected to an agent that is going away).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use clap::Args;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::{
    audit::{AuditConfig, AuditEvent, AuditWriter},
    block::{KillSwitch, Scope},
    conn::{self, Caller, Netns},
    control::{self, Handler, Reply, Request},
    ebpf::{ListenerConfig, Redirector},
    identity::{IdentityResolver, cgroup2_mount},
    netns::NetnsManager,
    notify,
    policy::{AuditSettings, EMBEDDED_DEFAULT, Engine, NameChange, PolicyFile, TargetDest},
    proxy::{self, Limits, Shared},
    worker::{self, WorkerListeners},
};

const SYSTEM_POLICY: &str = "/etc/interceptor/policy.yaml";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/interceptor";
/// Where the agent's unix listeners (for unix socket targets) live.
pub const DEFAULT_UNIX_DIR: &str = "/run/interceptor/unix";

/// What workloads get while no agent serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FailMode {
    /// The programs stay pinned: connects to targets are refused.
    Closed,
    /// Connects go direct (unguarded, unaudited).
    Open,
}

impl FailMode {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
        }
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Policy file [default: /etc/interceptor/policy.yaml, else the embedded policies/default.yaml].
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// cgroup v2 directory whose processes are redirected [default: the cgroup v2 mount root].
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Address the agent listens on for redirected connections; the other
    /// loopback family is also served on the same port when available.
    #[arg(long, default_value = "127.0.0.1:15432")]
    pub listen: SocketAddr,
    /// Audit log (JSON Lines, appended, hash-chained); rotated files are
    /// FILE.1 (newest) ... FILE.N, as the policy's `audit:` section says.
    #[arg(long, default_value = "/var/log/interceptor/audit.jsonl")]
    pub audit_log: PathBuf,
    /// Worker threads, each with its own runtime and listener [default: half
    /// the CPUs, at least 1].
    #[arg(long)]
    pub workers: Option<usize>,
    /// SO_MARK put on the agent's upstream sockets so they are never redirected.
    #[arg(long, default_value_t = 0x1e5c_0001)]
    pub mark: u32,
    /// Executables larger than this many bytes are not hashed (exe_sha256 is null).
    #[arg(long, default_value_t = 512 * 1024 * 1024)]
    pub max_exe_hash_bytes: u64,
    /// On shutdown, how long open connections may finish before they are closed (seconds).
    #[arg(long, default_value_t = 5.0)]
    pub drain_timeout: f64,
    /// Largest client message (PostgreSQL Query/Parse/FunctionCall, MySQL
    /// command) buffered for a decision; larger ones are a protocol error.
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    pub max_frame_bytes: usize,
    /// Longest query text kept in an audit event, in bytes.
    #[arg(long, default_value_t = 4096)]
    pub audit_query_max: usize,
    /// Serve Prometheus metrics on this address (`GET /metrics`), e.g. 127.0.0.1:9464.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Directory of the agent's persistent state (`blocks.json`: the kill
    /// switch's active blocks, re-applied at start; `grants.json`: standing
    /// approval grants).
    #[arg(long, default_value = "/var/lib/interceptor")]
    pub state_dir: PathBuf,
    /// While no agent serves (stopped, crashed, killed): `closed` keeps the
    /// kernel programs pinned so connects to targets are refused; `open`
    /// lets them go direct (a SIGTERM detaches at once; a dead agent's
    /// heartbeat goes stale within a second).
    #[arg(long, value_enum, default_value = "closed")]
    pub fail_mode: FailMode,
    /// bpffs directory where the programs' links and maps are pinned; one
    /// agent per pin dir. An agent started on a pin dir adopts what is
    /// there (no second set of programs).
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Directory of the agent's unix listeners, one per unix socket target
    /// (`address: unix:/path`): the kernel redirects a workload's connect to
    /// the target's path to its listener here.
    #[arg(long, default_value = DEFAULT_UNIX_DIR)]
    pub unix_dir: PathBuf,
    /// Messages between a workload and the agent skip the TCP stack (an
    /// `sk_msg` program hands each one to the other socket's receive
    /// queue); the agent-server hop stays TCP. A direction with more than 1
    /// MiB unanswered goes back to TCP for the rest of its connection.
    /// `auto` turns it on when a self-test at start shows the kernel
    /// delivers bypassed bytes as TCP would (poll, FIONREAD, FIN order).
    #[arg(long, value_enum, default_value = "auto")]
    pub local_bypass: crate::ebpf::BypassMode,
    /// Log filter for the agent's own diagnostics on stderr (tracing syntax).
    #[arg(long, env = "INTERCEPTOR_LOG", default_value = "info")]
    pub log: String,
}

struct Agent {
    shared: Arc<Shared>,
    kill_switch: Arc<KillSwitch>,
    cgroup: PathBuf,
    policy_source: String,
    audit_log: PathBuf,
    listen: Vec<SocketAddr>,
    started_at: String,
    feed: Arc<control::tail::Feed>,
    netns: Arc<NetnsManager>,
    redirector: Arc<Redirector>,
    fail_mode: FailMode,
    pin_dir: PathBuf,
}

impl Handler for Agent {
    fn handle(&self, caller: &Caller, req: Request) -> Result<Reply, String> {
        match req {
            req @ (Request::ApprovalsList
            | Request::Approve { .. }
            | Request::Deny { .. }
            | Request::GrantsList
            | Request::GrantRevoke { .. }) => {
                control::approvals::handle(&self.shared.approvals, caller, req).map(Reply::from)
            }
            Request::Tail {
                filter,
                last,
                follow,
            } => Ok(control::tail::serve(
                &self.feed,
                // Recent records may sit in rotated files.
                crate::audit::chain_order(std::slice::from_ref(&self.audit_log)),
                filter,
                last,
                follow,
            )),
            Request::Identities => {
                let engine = self.shared.engine.load();
                Ok(Value::Array(proxy::workloads(&self.shared.registry.all(), &engine)).into())
            }
            Request::Block { selector, reason } => self
                .kill_switch
                .block(caller, &selector, reason)
                .map(Reply::from),
            Request::Unblock { selector } => {
                self.kill_switch.unblock(caller, &selector).map(Reply::from)
            }
            Request::Blocks => Ok(self.kill_switch.list().into()),
            Request::Status => {
                let engine = self.shared.engine.load();
                let policy = engine.file();
                let stats = &self.shared.stats;
                let audit = self.shared.audit.stats();
                Ok(json!({
                    "pid": std::process::id(),
                    "started_at": self.started_at,
                    "cgroup": self.cgroup.display().to_string(),
                    "policy": self.policy_source,
                    "mode": policy.mode,
                    "fail_mode": self.fail_mode.as_str(),
                    "local_bypass": local_bypass_status(&self.redirector),
                    "pin_dir": self.pin_dir.display().to_string(),
                    "audit_log": self.audit_log.display().to_string(),
                    "listen": self.listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "targets": policy.targets.iter().map(target_status).collect::<Vec<_>>(),
                    "resolve_every_ms": u64::try_from(policy.resolve_every().as_millis()).unwrap_or(u64::MAX),
                    "namespaces": self.netns.served(),
                    "maps": self.redirector.occupancy().into_iter().map(|(name, entries, capacity)| {
                        (name.to_owned(), json!({"entries": entries, "capacity": capacity}))
                    }).collect::<serde_json::Map<_, _>>(),
                    "connections": {
                        "live": stats.live.load(Ordering::Relaxed),
                        "total": stats.total.load(Ordering::Relaxed),
                        "rejected": stats.rejected.load(Ordering::Relaxed),
                    },
                    "audit": {
                        "written": audit.written(),
                        "dropped": audit.dropped(),
                        "write_errors": audit.write_errors(),
                        "queue_depth": audit.queue_depth(),
                        "queue_capacity": audit.queue_capacity(),
                    },
                })
                .into())
            }
        }
    }
}

/// Figures the metrics read when scraped.
struct AgentGauges {
    shared: Arc<Shared>,
    redirector: Arc<Redirector>,
}

impl control::metrics::Gauges for AgentGauges {
    #[allow(clippy::cast_precision_loss)] // counters far below 2^53
    fn gauges(&self) -> Vec<(&'static str, &'static str, f64)> {
        let s = &self.shared.stats;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
        let a = self.shared.audit.stats();
        let memory = crate::control::metrics::memory();
        vec![
            (
                "connections_live",
                "Connections being relayed now.",
                get(&s.live),
            ),
            (
                "connections_total",
                "Redirected connections accepted since start.",
                get(&s.total),
            ),
            (
                "connections_rejected_total",
                "Connections turned away (not redirected by the kernel programs, or no target).",
                get(&s.rejected),
            ),
            (
                "statements_refused_total",
                "Statements and commands refused on the wire since start.",
                get(&s.denied),
            ),
            (
                "audit_queue_depth",
                "Audit records waiting for the writer.",
                a.queue_depth() as f64,
            ),
            (
                "audit_queue_capacity",
                "Audit records the queue holds before `audit.overflow` applies.",
                a.queue_capacity() as f64,
            ),
            (
                "audit_written_total",
                "Audit records written.",
                a.written() as f64,
            ),
            (
                "audit_dropped_total",
                "Audit records dropped on a full queue (overflow: drop).",
                a.dropped() as f64,
            ),
            (
                "audit_write_errors_total",
                "Audit writes or flushes that failed.",
                a.write_errors() as f64,
            ),
            (
                "resident_bytes",
                "The agent's resident memory.",
                memory.0 as f64,
            ),
            (
                "allocator_committed_bytes",
                "Memory the allocator (mimalloc) holds committed, by its own account.",
                memory.1 as f64,
            ),
        ]
    }

    fn maps(&self) -> Vec<(&'static str, usize, u32)> {
        self.redirector.occupancy()
    }
}

fn load_policy(path: Option<&Path>) -> Result<(PolicyFile, String), String> {
    if let Some(p) = path {
        return PolicyFile::load(p)
            .map(|f| (f, p.display().to_string()))
            .map_err(|e| e.to_string());
    }
    let system = Path::new(SYSTEM_POLICY);
    if system.exists() {
        return PolicyFile::load(system)
            .map(|f| (f, SYSTEM_POLICY.to_owned()))
            .map_err(|e| e.to_string());
    }
    PolicyFile::parse(EMBEDDED_DEFAULT, Path::new("<embedded default.yaml>"))
        .map(|f| (f, "embedded default".to_owned()))
        .map_err(|e| e.to_string())
}

/// The addresses to listen on: the one given, plus the other family's
/// loopback on the same port when it is a loopback address.
fn listen_addrs(listen: SocketAddr) -> (Option<SocketAddr>, Option<SocketAddr>) {
    let port = listen.port();
    match listen.ip() {
        IpAddr::V4(v4) => {
            let v6 = v4
                .is_loopback()
                .then(|| SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port))
                .filter(|a| conn::bind_listener(*a).is_ok());
            (Some(listen), v6)
        }
        IpAddr::V6(v6) => {
            let v4 = v6
                .is_loopback()
                .then(|| SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port))
                .filter(|a| conn::bind_listener(*a).is_ok());
            (v4, Some(listen))
        }
    }
}

pub fn run(args: &RunArgs, control_socket: &Path) -> i32 {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    match run_inner(args, control_socket) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("interceptor: {e}");
            1
        }
    }
}

/// Each relayed connection holds two descriptors: the soft limit goes up
/// to the hard one (as the service unit's `LimitNOFILE` would), so an agent
/// started by hand is not capped at the usual 1024.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!("cannot raise the open files limit from {soft} to {hard}: {e}");
    }
}

fn run_inner(args: &RunArgs, control_socket: &Path) -> Result<(), String> {
    raise_fd_limit();
    let (mut policy, policy_source) = load_policy(args.policy.as_deref())?;
    crate::kube::check_policy(&policy).map_err(|e| format!("{policy_source}: {e}"))?;
    let cgroup_root = cgroup2_mount();
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => cgroup_root
            .clone()
            .ok_or("no cgroup v2 mount found in /proc/self/mountinfo; pass --cgroup")?,
    };
    if args.listen.port() == 0 {
        return Err("--listen needs a fixed port: the kernel programs redirect to it".into());
    }
    let (v4, v6) = listen_addrs(args.listen);
    let addrs: Vec<SocketAddr> = v4.into_iter().chain(v6).collect();
    let workers = args.workers.unwrap_or_else(|| {
        default_workers(std::thread::available_parallelism().map_or(1, usize::from))
    });

    // A running agent on this state dir hands its listening sockets over
    // (restart without a gap); otherwise bind every listener before
    // attaching so no redirected connect is refused.
    let handover_path = args.state_dir.join("handover.sock");
    let _ = std::fs::create_dir_all(&args.state_dir);
    // Unix listeners exist before the kernel redirects to them, and before
    // a running agent is asked to hand over: from here new unix connects
    // queue on ours, and it serves what queued on its own.
    let unix_listeners = Arc::new(worker::unix::UnixListeners::new(&args.unix_dir));
    unix_listeners.sync(&policy.targets)?;
    let mut taken = crate::handover::take(&handover_path).map_err(|e| e.to_string())?;
    let mut listeners: Vec<Vec<std::net::TcpListener>> = Vec::new();
    if let Some(t) = taken.as_mut() {
        if t.port != args.listen.port() {
            return Err(format!(
                "the running agent (pid {}) listens on port {}: start the new one with that --listen port",
                t.pid, t.port
            ));
        }
        listeners.resize_with(workers.max(1), Vec::new);
        let n = listeners.len();
        for (i, l) in std::mem::take(&mut t.home).into_iter().enumerate() {
            if let Some(set) = listeners.get_mut(i % n) {
                set.push(l);
            }
        }
        tracing::info!(pid = t.pid, "taking over from the running agent");
    } else {
        for _ in 0..workers.max(1) {
            let set = addrs
                .iter()
                .map(|a| conn::bind_listener(*a))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            listeners.push(set);
        }
    }
    // Our own copies, for handing them to a successor.
    let home_dups: Vec<std::net::TcpListener> = listeners
        .iter()
        .flatten()
        .filter_map(|l| l.try_clone().ok())
        .collect();
    let home = Arc::new(
        listeners
            .first()
            .and_then(|set| set.first())
            .ok_or("no listener")
            .and_then(|l| {
                Netns::home(l).map_err(|_| "cannot identify the agent's network namespace")
            })
            .map_err(|e| format!("{e} (SO_NETNS_COOKIE needs kernel >= 5.14)"))?,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let guard = rt.enter();
    if taken.is_some() {
        // The old agent answers on it until we take the path over.
        let _ = std::fs::remove_file(control_socket);
    }
    let control_listener = control::bind(control_socket).map_err(|e| e.to_string())?;

    let live = Arc::new(crate::audit::LiveConnections::default());
    let feed = control::tail::Feed::new(Arc::clone(&live));
    let metrics = control::metrics::Metrics::new();
    let metrics_listener = match args.metrics {
        Some(addr) => Some(
            // SO_REUSEPORT, like the data listeners: during a handover (a
            // DaemonSet surge on a host-network port) the old agent still
            // holds the address until it exits.
            conn::bind_listener(addr)
                .map_err(|e| e.to_string())
                .and_then(|l| tokio::net::TcpListener::from_std(l).map_err(|e| e.to_string()))
                .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?,
        ),
        None => None,
    };
    let audit_settings = policy.audit.clone();
    let audit_config = AuditConfig {
        path: args.audit_log.clone(),
        settings: audit_settings.clone(),
        taps: vec![feed.clone(), metrics.clone()],
        live,
    };
    // One writer at a time: after a handover, the log opens once the old
    // agent (still draining, still writing) has exited.
    let (audit, audit_writer) = match taken.as_ref().map(|t| t.pid) {
        Some(pid) => AuditWriter::start_after(audit_config, move || wait_exit(pid)),
        None => AuditWriter::start(audit_config),
    }
    .map_err(|e| e.to_string())?;
    // Names resolve and Services are listed before the programs attach, so
    // the kernel starts with their addresses.
    let (watchers, service_reports) = crate::kube::Watchers::new(args.mark);
    let watchers = Arc::new(watchers);
    rt.block_on(watchers.prepare(&mut policy))
        .map_err(|e| e.to_string())?;
    resolve_names(&policy, &audit);
    let redirector = Arc::new(
        Redirector::attach(
            &cgroup,
            &policy.targets,
            &ListenerConfig {
                v4,
                v6,
                port: args.listen.port(),
                mark: args.mark,
                home: (
                    home.cookie,
                    interceptor_common::NetnsState {
                        state: interceptor_common::NETNS_READY,
                        families: (u32::from(v4.is_some()) * interceptor_common::NETNS_HAS_V4)
                            | (u32::from(v6.is_some()) * interceptor_common::NETNS_HAS_V6),
                        since_ns: 0,
                        tgid: 0,
                        pid: 0,
                    },
                ),
            },
            &crate::ebpf::Pinning {
                dir: args.pin_dir.clone(),
                fail_open: args.fail_mode == FailMode::Open,
                handover: taken.is_some(),
                unix_dir: args.unix_dir.clone(),
                local_bypass: args.local_bypass,
            },
        )
        .map_err(|e| {
            let _ = std::fs::remove_file(control_socket);
            e.to_string()
        })?,
    );
    if let Err(e) = unix_supported(&redirector, &policy) {
        let _ = std::fs::remove_file(control_socket);
        redirector.release();
        return Err(e);
    }
    let targets: Vec<Value> = policy
        .targets
        .iter()
        .map(|t| json!({"name": t.name, "protocol": t.protocol.as_str(), "address": t.address.to_string()}))
        .collect();
    let engine = Engine::new(policy).map_err(|e| e.to_string())?;
    // The CA that issues the certificates workloads see (ca.crt, ca.key).
    let tls =
        crate::tls::TlsContext::in_state_dir(&args.state_dir).map_err(|e| format!("TLS: {e}"))?;
    let shared = Arc::new(
        Shared::new(
            engine,
            audit.clone(),
            redirector.clone(),
            IdentityResolver::new(cgroup_root.clone(), args.max_exe_hash_bytes),
            args.mark,
            Limits {
                max_frame: args.max_frame_bytes,
                audit_query_max: args.audit_query_max,
            },
        )
        .with_grants_file(args.state_dir.join("grants.json"))
        .with_tls(tls),
    );
    // Stored blocks are in force before the first connection is accepted.
    let kill_switch = Arc::new(
        KillSwitch::start(
            Arc::clone(&shared),
            redirector.clone(),
            &args.state_dir,
            Scope {
                root: cgroup_root.clone(),
                attached: cgroup.clone(),
            },
        )
        .inspect_err(|_| {
            let _ = std::fs::remove_file(control_socket);
        })?,
    );
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let drain = Duration::from_secs_f64(args.drain_timeout.max(0.0));
    let mut senders = Vec::new();
    let mut worker_sets = Vec::new();
    // systemd's watchdog (Type=notify, WatchdogSec=): pinged only while
    // every worker runtime and the control runtime keep ticking.
    let mut watchdog = notify::Watchdog::from_env();
    for (i, set) in listeners.into_iter().enumerate() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        senders.push(tx);
        worker_sets.push(WorkerListeners {
            home: set,
            home_netns: Arc::clone(&home),
            more: rx,
            heartbeat: watchdog
                .as_mut()
                .map(|w| w.heartbeat(&format!("worker-{i}"))),
        });
    }
    if let Some(first) = senders.first() {
        unix_listeners.serve_with(first.clone(), Arc::clone(&home));
    }
    let handles = worker::spawn_workers(&shared, worker_sets, &shutdown_rx, drain)
        .map_err(|e| e.to_string())?;
    let netns = Arc::new(NetnsManager::new(
        (v4, v6),
        redirector.clone(),
        senders,
        audit.clone(),
        Arc::clone(&home),
    ));
    if let Some(t) = taken.take() {
        netns.adopt(t.guests);
    }
    let netns_thread = {
        let netns = Arc::clone(&netns);
        let events = redirector.take_netns_events();
        std::thread::Builder::new()
            .name("netns".into())
            .spawn(move || netns.run(events))
            .map_err(|e| format!("cannot start the namespace thread: {e}"))?
    };

    let agent = Arc::new(Agent {
        shared: Arc::clone(&shared),
        kill_switch: Arc::clone(&kill_switch),
        cgroup: cgroup.clone(),
        policy_source: policy_source.clone(),
        audit_log: args.audit_log.clone(),
        listen: addrs.clone(),
        started_at: crate::audit::format_ts(time::OffsetDateTime::now_utc()),
        feed,
        netns: Arc::clone(&netns),
        redirector: Arc::clone(&redirector),
        fail_mode: args.fail_mode,
        pin_dir: args.pin_dir.clone(),
    });
    audit.record(
        AuditEvent::new("agent_start")
            .with("pid", std::process::id())
            .with("cgroup", cgroup.display().to_string())
            .with("policy", &policy_source)
            .with("fail_mode", args.fail_mode.as_str())
            .with("local_bypass", local_bypass_status(&redirector))
            .with("pin_dir", args.pin_dir.display().to_string())
            .with("adopted", redirector.adopted())
            .with(
                "listen",
                addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            )
            .with("targets", targets),
    );
    tracing::info!(
        cgroup = %cgroup.display(),
        listen = ?addrs,
        policy = %policy_source,
        "interceptor ready"
    );
    let control_beat = watchdog
        .as_mut()
        .map(|w| rt.spawn(w.heartbeat("control").run()));
    let watchdog = watchdog
        .map(notify::Watchdog::start)
        .transpose()
        .map_err(|e| format!("cannot start the watchdog thread: {e}"))?;
    notify::ready(&format!("serving {}", cgroup.display()));

    let server = rt.spawn(control::serve(control_listener, agent));
    let metrics_server = metrics_listener.map(|l| {
        let gauges = Arc::new(AgentGauges {
            shared: Arc::clone(&shared),
            redirector: Arc::clone(&redirector),
        });
        rt.spawn(control::metrics::serve(l, metrics, gauges))
    });
    let deadlines = rt.spawn(Arc::clone(&shared.approvals).run_deadlines());
    let reload_path = args.policy.clone().or_else(|| {
        Path::new(SYSTEM_POLICY)
            .exists()
            .then(|| PathBuf::from(SYSTEM_POLICY))
    });
    let reloader = rt.spawn(reload_loop(
        reload_path,
        Arc::clone(&shared),
        Arc::clone(&redirector),
        Arc::clone(&unix_listeners),
        Arc::clone(&watchers),
        audit_settings,
    ));
    let resolver = rt.spawn(resolve_loop(Arc::clone(&shared), Arc::clone(&redirector)));
    let services = rt.spawn(service_loop(
        Arc::clone(&shared),
        Arc::clone(&redirector),
        service_reports,
    ));
    let rescanner = rt.spawn(Arc::clone(&kill_switch).rescan_loop());
    let heart = {
        let redirector = Arc::clone(&redirector);
        rt.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(
                interceptor_common::HEARTBEAT_EVERY_MS,
            ));
            loop {
                tick.tick().await;
                redirector.heartbeat();
            }
        })
    };
    // A successor asks for our sockets here.
    let (handed_tx, handed_rx) = tokio::sync::oneshot::channel::<()>();
    let handover_listener =
        crate::handover::listen_at(&handover_path).map_err(|e| e.to_string())?;
    {
        // Weak: the thread waits in accept for the agent's whole life and
        // must not keep the manager (and its audit sender) alive past it.
        let netns = Arc::downgrade(&netns);
        let port = args.listen.port();
        std::thread::Builder::new()
            .name("handover".into())
            .spawn(move || {
                let conn = match crate::handover::accept_successor(&handover_listener) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!("{e}");
                        return;
                    }
                };
                let Some(netns) = netns.upgrade() else { return };
                let sent = netns.for_handover(|guests| {
                    crate::handover::give(
                        &conn,
                        &crate::handover::Offer {
                            port,
                            home: &home_dups,
                            guests,
                        },
                    )
                });
                match sent {
                    Some(Ok(())) => {
                        let _ = handed_tx.send(());
                    }
                    Some(Err(e)) => tracing::error!("{e}"),
                    None => tracing::error!("handover: namespace table unavailable"),
                }
            })
            .map_err(|e| format!("cannot start the handover thread: {e}"))?;
    }
    let summaries = rt.spawn(Arc::clone(&shared).flush_executions_loop());
    let signal = rt.block_on(async {
        tokio::select! {
            s = wait_for_signal() => s,
            Ok(()) = handed_rx => "handover",
        }
    });
    let handed_over = signal == "handover";
    reloader.abort();
    rescanner.abort();
    resolver.abort();
    services.abort();
    drop(watchers);
    heart.abort();
    deadlines.abort();
    tracing::info!("{signal}: detaching and shutting down");
    notify::stopping(&format!("{signal}: shutting down"));
    if let Some(w) = watchdog {
        w.stop();
    }
    if let Some(b) = control_beat {
        b.abort();
    }

    // Fail open: detach first, so from now on new connections go direct.
    // Fail closed: the programs stay pinned; from now on connects to
    // targets are refused until an agent serves again.
    // Handed over: the successor has updated the links and serves our
    // sockets; leave everything in place.
    match args.fail_mode {
        FailMode::Open if !handed_over => redirector.detach(),
        _ => redirector.release(),
    }
    netns.shutdown();
    let _ = netns_thread.join();
    server.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    if !handed_over {
        // After a handover both paths are the successor's.
        let _ = std::fs::remove_file(control_socket);
        let _ = std::fs::remove_file(&handover_path);
    }
    let _ = shutdown_tx.send(true);
    for h in handles {
        let _ = h.join();
    }
    // Every connection wrote its own summaries as it ended; a handler cut
    // short by the workers' deadline leaves its windows here.
    summaries.abort();
    shared.flush_executions();
    audit.record(AuditEvent::new("agent_stop").with("signal", signal));
    // The writer finishes once the last sender is gone: the control tasks
    // hold some, and they only go with the runtime.
    drop(guard);
    rt.shutdown_timeout(Duration::from_secs(1));
    drop(kill_switch);
    drop(shared);
    // The namespace manager holds an audit sender too.
    drop(netns);
    drop(audit);
    audit_writer.finish();
    Ok(())
}

/// A target as `status` shows it: a DNS-named or Service one with its
/// addresses now and when they were resolved (a name's as IP addresses, a
/// Service's as ip:port, its endpoints' port being their own).
fn target_status(t: &crate::policy::TargetSpec) -> Value {
    let mut v = json!({
        "name": t.name,
        "protocol": t.protocol.as_str(),
        "address": t.address.to_string(),
    });
    if let Some(svc) = t.address.service() {
        v["service"] = json!(svc.key());
        v["port"] = json!(svc.port);
    }
    if let Some(s) = t.address.watched() {
        v["resolved"] = json!({
            "addresses": address_strings(&t.address, &s.current),
            "resolved_at": s.resolved_at.map(|at| humantime::format_rfc3339_millis(at).to_string()),
            "last_error": s.last_error,
        });
    }
    v
}

/// Addresses as audit records and `status` show them: a DNS name's as IP
/// addresses (they all carry its port), a Service's as ip:port.
fn address_strings(dest: &TargetDest, addrs: &[SocketAddr]) -> Vec<String> {
    match dest {
        TargetDest::Service(_) => addrs.iter().map(ToString::to_string).collect(),
        _ => addrs.iter().map(|a| a.ip().to_string()).collect(),
    }
}

/// Audits what one resolution of a name, or one watch event of a Service,
/// did: a change (`target_resolved`) or a failure (`target_resolve_failed`,
/// the last good addresses staying in force).
fn audit_addresses(
    audit: &crate::audit::AuditLog,
    target: &str,
    dest: &TargetDest,
    outcome: Result<&NameChange, &str>,
) {
    let Some(state) = dest.watched() else { return };
    let (subject_key, subject) = match dest {
        TargetDest::Service(s) => ("service", s.key()),
        TargetDest::Name(n) => ("name", n.host.clone()),
        TargetDest::Net(_) | TargetDest::Unix(_) => return,
    };
    let strings = |v: &[SocketAddr]| address_strings(dest, v);
    let now = strings(&state.current);
    match outcome {
        Ok(change) => {
            tracing::info!(
                target_name = %target,
                "{subject_key} {subject} resolved: added {:?}, removed {:?}",
                strings(&change.added),
                strings(&change.removed),
            );
            audit.record(
                AuditEvent::new("target_resolved")
                    .with("target", target)
                    .with(subject_key, &subject)
                    .with("port", dest.port())
                    .with("added", strings(&change.added))
                    .with("removed", strings(&change.removed))
                    .with("addresses", now),
            );
        }
        Err(error) => {
            tracing::warn!(
                target_name = %target,
                "{subject_key} {subject} does not resolve, last addresses {now:?} stay: {error}"
            );
            audit.record(
                AuditEvent::new("target_resolve_failed")
                    .with("target", target)
                    .with(subject_key, &subject)
                    .with("port", dest.port())
                    .with("error", error)
                    .with("addresses", now),
            );
        }
    }
}

/// Resolves every DNS-named target of `file` now (blocking: the system
/// resolver) and audits each change and each failure. Returns whether any
/// name's addresses changed.
fn resolve_names(file: &PolicyFile, audit: &crate::audit::AuditLog) -> bool {
    let mut changed = false;
    for (_, t, name) in file.named_targets() {
        match name.refresh() {
            Ok(change) if change.is_empty() => {}
            Ok(change) => {
                changed = true;
                audit_addresses(audit, &t.name, &t.address, Ok(&change));
            }
            Err(error) => audit_addresses(audit, &t.name, &t.address, Err(&error)),
        }
    }
    changed
}

/// Audits what the Service watchers report and puts changed addresses in
/// the kernel's targets map (the policy in force holds them: its Service
/// targets share the watchers' state).
async fn service_loop(
    shared: Arc<Shared>,
    redirector: Arc<Redirector>,
    mut reports: tokio::sync::mpsc::UnboundedReceiver<crate::kube::Report>,
) {
    use crate::kube::Report;
    while let Some(first) = reports.recv().await {
        let mut changed = false;
        let mut next = Some(first);
        while let Some(r) = next {
            match r {
                Report::Changed {
                    target,
                    service,
                    change,
                } => {
                    changed = true;
                    audit_addresses(
                        &shared.audit,
                        &target,
                        &TargetDest::Service(service),
                        Ok(&change),
                    );
                }
                Report::Failed {
                    target,
                    service,
                    error,
                } => audit_addresses(
                    &shared.audit,
                    &target,
                    &TargetDest::Service(service),
                    Err(&error),
                ),
            }
            next = reports.try_recv().ok();
        }
        if !changed {
            continue;
        }
        // No await between reading the policy in force and setting its
        // targets: a reload (on this runtime) cannot slip in between.
        let engine = shared.engine.load();
        if let Err(e) = redirector.set_targets(&engine.file().targets) {
            tracing::error!("cannot update the kernel's targets after a Service change: {e}");
            shared.audit.record(
                AuditEvent::new("target_resolve_failed")
                    .with("stage", "map")
                    .with("error", e.to_string()),
            );
        }
    }
}

/// A policy naming unix socket targets needs the kernel's unix hooks.
fn unix_supported(redirector: &Redirector, policy: &PolicyFile) -> Result<(), String> {
    let Some(why) = redirector.unix_unsupported() else {
        return Ok(());
    };
    match policy.targets.iter().find(|t| t.address.unix().is_some()) {
        Some(t) => Err(format!(
            "target {:?} is a unix socket ({}), which this agent cannot guard here: {why}",
            t.name, t.address
        )),
        None => Ok(()),
    }
}

/// Resolves the policy's DNS-named targets every `resolve_every` and puts
/// their addresses in the kernel's targets map when they change.
async fn resolve_loop(shared: Arc<Shared>, redirector: Arc<Redirector>) {
    loop {
        let every = shared.engine.load().file().resolve_every();
        tokio::time::sleep(every).await;
        let engine = shared.engine.load_full();
        if engine.file().named_targets().next().is_none() {
            continue;
        }
        let audit = shared.audit.clone();
        let resolved = {
            let engine = Arc::clone(&engine);
            tokio::task::spawn_blocking(move || resolve_names(engine.file(), &audit)).await
        };
        if !matches!(resolved, Ok(true)) {
            continue;
        }
        // A reload may have replaced the policy meanwhile: it resolved its
        // own names and set its own targets.
        if !Arc::ptr_eq(&engine, &shared.engine.load_full()) {
            continue;
        }
        if let Err(e) = redirector.set_targets(&engine.file().targets) {
            tracing::error!("cannot update the kernel's targets after resolution: {e}");
            shared.audit.record(
                AuditEvent::new("target_resolve_failed")
                    .with("stage", "map")
                    .with("error", e.to_string()),
            );
        }
    }
}

/// Reloads the policy on SIGHUP and when the file changes. A valid policy
/// takes effect for the next statement (and its targets for the next
/// connect); an invalid one is rejected and the previous stays in force.
/// Both are audited. The audit writer's settings only take effect at the
/// next start (`redact_literals` at once): a change is warned about and
/// noted in the `policy` event as `audit_restart_required`.
async fn reload_loop(
    path: Option<PathBuf>,
    shared: Arc<Shared>,
    redirector: Arc<Redirector>,
    unix_listeners: Arc<worker::unix::UnixListeners>,
    watchers: Arc<crate::kube::Watchers>,
    audit_in_force: AuditSettings,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Some(path) = path else {
        // The embedded default never changes.
        return;
    };
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    let stamp = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last = stamp(&path);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let trigger = tokio::select! {
            _ = hup.recv() => "SIGHUP",
            _ = tick.tick() => {
                let now = stamp(&path);
                if now == last {
                    continue;
                }
                last = now;
                "file change"
            }
        };
        let result = match PolicyFile::load(&path)
            .map_err(|e| e.to_string())
            .and_then(|f| {
                crate::kube::check_policy(&f)
                    .map(|()| f)
                    .map_err(|e| format!("{}: {e}", path.display()))
            }) {
            Ok(mut file) => {
                // A reload lists its Services and resolves its names at
                // once, before it takes effect.
                match watchers.prepare(&mut file).await {
                    Err(e) => Err(e.to_string()),
                    Ok(()) => {
                        let audit = shared.audit.clone();
                        tokio::task::spawn_blocking(move || {
                            resolve_names(&file, &audit);
                            file
                        })
                        .await
                        .map_err(|e| e.to_string())
                    }
                }
            }
            Err(e) => Err(e),
        };
        let result = result
            .and_then(|file| Engine::new(file).map_err(|e| e.to_string()))
            .and_then(|engine| {
                unix_supported(&redirector, engine.file())?;
                unix_listeners.sync(&engine.file().targets)?;
                redirector
                    .set_targets(&engine.file().targets)
                    .map_err(|e| e.to_string())?;
                Ok(engine)
            });
        let ev = AuditEvent::new("policy")
            .with("path", path.display().to_string())
            .with("trigger", trigger);
        match result {
            Ok(engine) => {
                let mut ev = ev
                    .with("status", "loaded")
                    .with("targets", engine.file().targets.len())
                    .with("rules", engine.file().rules.len());
                let pending = audit_in_force.restart_needed(&engine.file().audit);
                if !pending.is_empty() {
                    tracing::warn!(
                        "audit settings {} changed: they take effect when the agent restarts",
                        pending.join(", ")
                    );
                    ev = ev.with("audit_restart_required", pending);
                }
                shared.publish(engine);
                watchers.retain(shared.engine.load().file());
                tracing::info!("policy reloaded from {} ({trigger})", path.display());
                shared.audit.record(ev);
            }
            Err(e) => {
                tracing::error!("policy reload rejected, previous policy stays in force: {e}");
                // Watchers started for the rejected file stop.
                watchers.retain(shared.engine.load().file());
                shared
                    .audit
                    .record(ev.with("status", "rejected").with("error", e));
            }
        }
    }
}

/// Blocks until process `pid` has exited (gone, or a zombie).
fn wait_exit(pid: u32) {
    let stat = format!("/proc/{pid}/stat");
    let mut waited = 0u32;
    loop {
        match std::fs::read_to_string(&stat) {
            Err(_) => return,
            // The state follows the parenthesised comm.
            Ok(s)
                if s.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('Z')) =>
            {
                return;
            }
            Ok(_) => {}
        }
        std::thread::sleep(Duration::from_millis(20));
        waited += 1;
        if waited.is_multiple_of(250) {
            tracing::info!(
                pid,
                "waiting for the previous agent to finish draining before opening the audit log"
            );
        }
    }
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers there is no clean way to stop; wait forever
        // rather than exit with programs attached.
        std::future::pending::<()>().await;
        return "none";
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Worker threads when `--workers` is not given: half the CPUs, at least
/// one. The agent shares the host with the workloads and databases it
/// sits between; one worker relays thousands of connections, and fewer
/// workers take more ready sockets per wake-up. On two vCPUs one worker
/// measured as fast as two or faster (README, Benchmarks).
fn default_workers(cpus: usize) -> usize {
    (cpus / 2).max(1)
}

/// `on`, `off`, or `off: WHY` when `auto` left it off.
fn local_bypass_status(redirector: &Redirector) -> String {
    match redirector.local_bypass() {
        (true, _) => "on".to_owned(),
        (false, None) => "off".to_owned(),
        (false, Some(why)) => format!("off: {why}"),
    }
}
