//! What a connection's protocol session runs on: the state all workers
//! share ([`Shared`]), the statement guard between a session and the policy
//! ([`Guard`]), the live connections ([`Registry`]), the upstream connect
//! (marked, so never redirected again) and the TLS handshakes of both legs.
//! Sessions ([`crate::protocol`]) use these; the workers
//! ([`crate::worker`]) accept connections and run the sessions.

use std::{
    cell::Cell,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::net::{TcpSocket, TcpStream};

use crate::{
    approval::ApprovalStore,
    audit::AuditLog,
    blocklist::BlockList,
    conn::{Netns, OrigDstLookup},
    identity::IdentityResolver,
    policy::{Engine, Protocol, TargetSpec},
    tls::{LegInfo, TlsContext},
};

mod executions;
mod guard;
mod registry;
mod stream;

pub use executions::{Completion, ExecLog, Prepared, ServerError, Tally, command_tag_rows};
pub use guard::{Guard, Hold, LoginPlan, Outcome, Refusal, Unanswered};
pub use registry::{DecisionCounts, LiveConn, Registered, Registry, SessionFacts, workloads};
pub use stream::{ReadHalf, Stream, WriteHalf};

/// Connection counters, read by `interceptor status`.
#[derive(Debug, Default)]
pub struct Stats {
    pub live: AtomicU64,
    pub total: AtomicU64,
    pub rejected: AtomicU64,
    pub denied: AtomicU64,
}

/// Limits and sizes of the data path.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest client message the agent buffers to decide (PostgreSQL Query,
    /// Parse, FunctionCall; MySQL command); larger is a protocol error.
    pub max_frame: usize,
    /// Longest query text kept in an audit event, in bytes.
    pub audit_query_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: 256 * 1024 * 1024,
            audit_query_max: 4096,
        }
    }
}

/// Everything a connection handler needs, shared by all workers.
pub struct Shared {
    pub engine: ArcSwap<Engine>,
    pub audit: AuditLog,
    pub lookup: Arc<dyn OrigDstLookup>,
    pub identities: IdentityResolver,
    pub stats: Stats,
    /// The live connections.
    pub registry: Arc<Registry>,
    /// Active kill-switch blocks, checked once per connection.
    pub blocks: BlockList,
    pub mark: u32,
    pub connect_timeout: Duration,
    pub max_frame: usize,
    pub audit_query_max: usize,
    /// Prefix of decision ids, unique per agent start.
    pub boot_id: String,
    /// Pending approvals and standing grants.
    pub approvals: Arc<ApprovalStore>,
    /// The agent's CA and the TLS configurations of both legs.
    pub tls: Arc<TlsContext>,
    next_conn: AtomicU64,
    /// The policy's `audit.executions` ([`crate::policy::Executions`] as a
    /// number), read once per execution.
    executions: AtomicU8,
}

impl Shared {
    #[must_use]
    pub fn new(
        engine: Engine,
        audit: AuditLog,
        lookup: Arc<dyn OrigDstLookup>,
        identities: IdentityResolver,
        mark: u32,
        limits: Limits,
    ) -> Self {
        let boot = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let boot_id = format!("{:08x}", boot & 0xffff_ffff);
        let approvals = Arc::new(ApprovalStore::new(audit.clone(), None, &boot_id));
        let executions = AtomicU8::new(engine.file().audit.executions.as_u8());
        Self {
            engine: ArcSwap::from_pointee(engine),
            audit,
            lookup,
            identities,
            stats: Stats::default(),
            registry: Arc::default(),
            blocks: BlockList::default(),
            mark,
            connect_timeout: Duration::from_secs(10),
            max_frame: limits.max_frame,
            audit_query_max: limits.audit_query_max,
            boot_id,
            approvals,
            tls: Arc::default(),
            next_conn: AtomicU64::new(1),
            executions,
        }
    }

    /// A new connection's id, unique per agent start.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// What the log keeps of executions now.
    #[must_use]
    pub fn executions_mode(&self) -> crate::policy::Executions {
        crate::policy::Executions::from_u8(self.executions.load(Ordering::Relaxed))
    }

    /// Puts a policy in force: the engine, and the audit settings read on
    /// the data path.
    pub fn publish(&self, engine: Engine) {
        self.executions
            .store(engine.file().audit.executions.as_u8(), Ordering::Relaxed);
        self.engine.store(Arc::new(engine));
    }

    /// Writes the open `executions` summary windows of every live
    /// connection: once a second, and at shutdown.
    pub fn flush_executions(&self) {
        for live in self.registry.all() {
            Tally::flush(self, &live, None);
        }
    }

    /// Flushes the summary windows every second, until dropped.
    pub async fn flush_executions_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.flush_executions();
        }
    }

    /// The same, with the TLS state given (the CA of `--state-dir`).
    #[must_use]
    pub fn with_tls(mut self, tls: TlsContext) -> Self {
        self.tls = Arc::new(tls);
        self
    }

    /// The same, with grants kept in `grants_file` (loaded now, saved on
    /// every change).
    #[must_use]
    pub fn with_grants_file(mut self, grants_file: std::path::PathBuf) -> Self {
        self.approvals = Arc::new(ApprovalStore::new(
            self.audit.clone(),
            Some(grants_file),
            &self.boot_id,
        ));
        self
    }
}

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("upstream connect to {dst} failed: {source}")]
    Connect {
        dst: SocketAddr,
        source: std::io::Error,
    },
    #[error("upstream connect to unix:{} failed: {source}", path.display())]
    ConnectUnix {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("client protocol violation: {0}")]
    ClientProtocol(String),
    #[error("server protocol violation: {0}")]
    ServerProtocol(String),
    #[error("agent shutting down")]
    Shutdown,
    #[error("closed by the agent: {0}")]
    Killed(String),
    /// A TLS handshake or record failed on one leg (`client`, `server`).
    #[error("TLS on the {leg} leg: {error}")]
    Tls { leg: &'static str, error: String },
    /// The agent refused the session and told the client why.
    #[error("{0}")]
    Refused(String),
}

impl SessionError {
    #[must_use]
    pub fn client_tls(error: impl std::fmt::Display) -> Self {
        Self::Tls {
            leg: "client",
            error: error.to_string(),
        }
    }

    #[must_use]
    pub fn server_tls(error: impl std::fmt::Display) -> Self {
        Self::Tls {
            leg: "server",
            error: error.to_string(),
        }
    }
}

/// The real server a redirected connection was going to, reached from the
/// workload's own network namespace.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub dst: SocketAddr,
    pub mark: u32,
    pub timeout: Duration,
    pub netns: Arc<Netns>,
    /// A unix target's socket path: connected to instead of `dst`.
    pub unix: Option<std::path::PathBuf>,
}

impl Upstream {
    /// Connects, marked so the kernel programs let it go direct (a unix
    /// connect goes direct because the agent makes it: its tgid is exempt).
    ///
    /// # Errors
    /// When the connect fails or times out.
    pub async fn connect(&self) -> Result<Stream, SessionError> {
        if let Some(path) = &self.unix {
            let connect = tokio::net::UnixStream::connect(path);
            let s = tokio::time::timeout(self.timeout, connect)
                .await
                .unwrap_or_else(|_| {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connect timed out",
                    ))
                })
                .map_err(|source| SessionError::ConnectUnix {
                    path: path.clone(),
                    source,
                })?;
            return Ok(Stream::Unix(s));
        }
        let s = connect_upstream(self.dst, self.mark, self.timeout, &self.netns)
            .await
            .map_err(|source| SessionError::Connect {
                dst: self.dst,
                source,
            })?;
        let _ = s.set_nodelay(true);
        Ok(Stream::Plain(s))
    }
}

/// The agent's TLS handshake with the server over `tcp`, as `target`'s
/// `tls.server` says, within [`crate::tls::HANDSHAKE_TIMEOUT`].
///
/// # Errors
/// `SessionError::Tls` (server leg) when the configuration cannot be made,
/// the handshake fails (a certificate that does not verify, among others)
/// or times out.
pub async fn tls_to_server(
    tls: &TlsContext,
    target: &TargetSpec,
    dst: SocketAddr,
    tcp: TcpStream,
) -> Result<(Stream, LegInfo), SessionError> {
    let config = tls.server_leg(target).map_err(SessionError::server_tls)?;
    let name = crate::tls::server_name(target, dst.ip());
    let connect = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
    let s = tokio::time::timeout(crate::tls::HANDSHAKE_TIMEOUT, connect)
        .await
        .map_err(|_| {
            SessionError::server_tls(format!(
                "the server at {dst} did not complete the TLS handshake within {}s",
                crate::tls::HANDSHAKE_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| {
            SessionError::server_tls(format!("handshake with the server at {dst}: {e}"))
        })?;
    let (_, conn) = s.get_ref();
    let mut info = LegInfo::of(conn);
    info.server_cert_verified = target.tls.server.verifies();
    info.subject = conn
        .peer_certificates()
        .and_then(<[_]>::first)
        .map(crate::tls::subject)
        .unwrap_or_default();
    info.mode = Some(target.tls.server.as_str());
    Ok((Stream::Tls(Box::new(s.into())), info))
}

/// The workload's TLS handshake with the agent over `tcp`; `direct` when
/// it began with a TLS record instead of a request for TLS (PostgreSQL's
/// `sslnegotiation=direct`), which then must negotiate ALPN `postgresql`.
///
/// # Errors
/// `SessionError::Tls` (client leg) when the handshake fails, times out, or
/// a direct connection does not negotiate `postgresql`.
pub async fn tls_from_client(
    tls: &TlsContext,
    target: &TargetSpec,
    dst: SocketAddr,
    tcp: TcpStream,
    direct: bool,
) -> Result<(Stream, LegInfo), SessionError> {
    let leg = tls
        .client_leg(target, dst.ip())
        .map_err(SessionError::client_tls)?;
    let accept = tokio_rustls::TlsAcceptor::from(leg.config).accept(tcp);
    let s = tokio::time::timeout(crate::tls::HANDSHAKE_TIMEOUT, accept)
        .await
        .map_err(|_| {
            SessionError::client_tls(format!(
                "the client did not complete the TLS handshake within {}s",
                crate::tls::HANDSHAKE_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| SessionError::client_tls(format!("handshake with the client: {e}")))?;
    let (_, conn) = s.get_ref();
    let mut info = LegInfo::of(conn);
    if direct && conn.alpn_protocol() != Some(crate::tls::ALPN_POSTGRES) {
        return Err(SessionError::client_tls(
            "direct TLS without ALPN \"postgresql\" (PostgreSQL requires it)",
        ));
    }
    info.subject = leg.subject.to_string();
    info.issued_by_agent_ca = Some(leg.issued);
    info.sni = conn.server_name().map(str::to_owned);
    if target.protocol == Protocol::Postgres {
        info.direct = Some(direct);
    }
    Ok((Stream::Tls(Box::new(s.into())), info))
}

/// Bytes relayed so far each way; kept outside the relay future so they
/// survive its cancellation.
#[derive(Default)]
pub struct Counted {
    pub from_client: Cell<u64>,
    pub from_server: Cell<u64>,
}

/// Connects to the real server with SO_MARK set, so the kernel programs let
/// this socket go direct; the socket is made in `netns` (the workload's), so
/// the server is reached by the route the workload would have taken.
///
/// # Errors
/// When the socket cannot be made or the connect fails or times out.
pub async fn connect_upstream(
    dst: SocketAddr,
    mark: u32,
    timeout: Duration,
    netns: &Netns,
) -> std::io::Result<TcpStream> {
    let sock = netns.enter(|| {
        if dst.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
    })?;
    if mark != 0 {
        socket2::SockRef::from(&sock).set_mark(mark)?;
    }
    tokio::time::timeout(timeout, sock.connect(dst))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}
