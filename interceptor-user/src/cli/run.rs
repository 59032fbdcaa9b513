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
    audit::{AuditConfig, AuditEvent, AuditSettings, AuditWriter},
    block::{KillSwitch, Scope},
    control::{self, Caller, Handler, Reply, Request},
    ebpf::{ListenerConfig, Redirector},
    identity::{IdentityResolver, cgroup2_mount},
    policy::{EMBEDDED_DEFAULT, Engine, PolicyFile},
    proxy::{self, Limits, Shared},
};

const SYSTEM_POLICY: &str = "/etc/interceptor/policy.yaml";

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
}

impl Handler for Agent {
    fn handle(&self, caller: &Caller, req: Request) -> Result<Reply, String> {
        match req {
            req @ (Request::ApprovalsList
            | Request::Approve { .. }
            | Request::Deny { .. }
            | Request::GrantsList
            | Request::GrantRevoke { .. }) => {
                crate::approval::handle(&self.shared.approvals, caller, req).map(Reply::from)
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
                    "audit_log": self.audit_log.display().to_string(),
                    "listen": self.listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "targets": policy.targets.iter().map(|t| json!({
                        "name": t.name,
                        "protocol": t.protocol.as_str(),
                        "address": t.address.to_string(),
                    })).collect::<Vec<_>>(),
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
                .filter(|a| proxy::bind_listener(*a).is_ok());
            (Some(listen), v6)
        }
        IpAddr::V6(v6) => {
            let v4 = v6
                .is_loopback()
                .then(|| SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port))
                .filter(|a| proxy::bind_listener(*a).is_ok());
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

fn run_inner(args: &RunArgs, control_socket: &Path) -> Result<(), String> {
    let (policy, policy_source) = load_policy(args.policy.as_deref())?;
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

    // Bind every listener before attaching so no redirected connect is refused.
    let mut listeners = Vec::new();
    for _ in 0..workers.max(1) {
        let set = addrs
            .iter()
            .map(|a| proxy::bind_listener(*a))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        listeners.push(set);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let guard = rt.enter();
    let control_listener = control::bind(control_socket).map_err(|e| e.to_string())?;

    let feed = control::tail::Feed::new();
    let metrics = control::metrics::Metrics::new();
    let metrics_listener = match args.metrics {
        Some(addr) => Some(
            rt.block_on(control::metrics::bind(addr))
                .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?,
        ),
        None => None,
    };
    let audit_settings = policy.audit.clone();
    let (audit, audit_writer) = AuditWriter::start(AuditConfig {
        path: args.audit_log.clone(),
        settings: audit_settings.clone(),
        taps: vec![feed.clone(), metrics.clone()],
    })
    .map_err(|e| e.to_string())?;
    let redirector = Arc::new(
        Redirector::attach(
            &cgroup,
            &policy.targets,
            &ListenerConfig {
                v4,
                v6,
                port: args.listen.port(),
                mark: args.mark,
            },
        )
        .map_err(|e| {
            let _ = std::fs::remove_file(control_socket);
            e.to_string()
        })?,
    );
    let targets: Vec<Value> = policy
        .targets
        .iter()
        .map(|t| json!({"name": t.name, "protocol": t.protocol.as_str(), "address": t.address.to_string()}))
        .collect();
    let engine = Engine::new(policy).map_err(|e| e.to_string())?;
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
        .with_grants_file(args.state_dir.join("grants.json")),
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
    let handles =
        proxy::spawn_workers(&shared, listeners, &shutdown_rx, drain).map_err(|e| e.to_string())?;

    let agent = Arc::new(Agent {
        shared: Arc::clone(&shared),
        kill_switch: Arc::clone(&kill_switch),
        cgroup: cgroup.clone(),
        policy_source: policy_source.clone(),
        audit_log: args.audit_log.clone(),
        listen: addrs.clone(),
        started_at: crate::audit::format_ts(time::OffsetDateTime::now_utc()),
        feed,
    });
    audit.record(
        AuditEvent::new("agent_start")
            .with("pid", std::process::id())
            .with("cgroup", cgroup.display().to_string())
            .with("policy", &policy_source)
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
        audit_settings,
    ));
    let rescanner = rt.spawn(Arc::clone(&kill_switch).rescan_loop());
    let signal = rt.block_on(wait_for_signal());
    reloader.abort();
    rescanner.abort();
    deadlines.abort();
    tracing::info!("{signal}: detaching and shutting down");

    // Detach first: from now on new connections go direct.
    redirector.detach();
    server.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    let _ = std::fs::remove_file(control_socket);
    let _ = shutdown_tx.send(true);
    for h in handles {
        let _ = h.join();
    }
    audit.record(AuditEvent::new("agent_stop").with("signal", signal));
    // The writer finishes once the last sender is gone: the control tasks
    // hold some, and they only go with the runtime.
    drop(guard);
    rt.shutdown_timeout(Duration::from_secs(1));
    drop(kill_switch);
    drop(shared);
    drop(audit);
    audit_writer.finish();
    Ok(())
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
        let result = PolicyFile::load(&path)
            .map_err(|e| e.to_string())
            .and_then(|file| Engine::new(file).map_err(|e| e.to_string()))
            .and_then(|engine| {
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
                shared.engine.store(Arc::new(engine));
                tracing::info!("policy reloaded from {} ({trigger})", path.display());
                shared.audit.record(ev);
            }
            Err(e) => {
                tracing::error!("policy reload rejected, previous policy stays in force: {e}");
                shared
                    .audit
                    .record(ev.with("status", "rejected").with("error", e));
            }
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
