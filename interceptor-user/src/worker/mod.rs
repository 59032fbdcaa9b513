//! Accepts redirected connections, finds who made them and where they were
//! going, connects upstream (marked, so never redirected again) and runs the
//! target protocol's session on them.
//!
//! Each worker thread runs its own single-threaded runtime with its own
//! SO_REUSEPORT listener, so a connection's relay never crosses CPUs.
//!
//! This sits above both [`crate::proxy`] (the state and the statement guard
//! the sessions share) and [`crate::protocol`] (the sessions).

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use interceptor_common::ConnRecord;
use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::watch,
};

use crate::{
    audit::AuditEvent,
    conn::{ConnInfo, Netns},
    identity::KernelFacts,
    netns::{Listener, ServeListener},
    policy::Protocol,
    proxy::{Counted, ExecLog, Guard, SessionError, Shared, Stats, Stream, Upstream},
};

pub mod unix;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start worker: {0}")]
    Start(std::io::Error),
}
/// A worker's listeners: its own in the agent's namespace, bound at start,
/// and those the namespace manager hands it later.
pub struct WorkerListeners {
    pub home: Vec<std::net::TcpListener>,
    pub home_netns: Arc<Netns>,
    pub more: tokio::sync::mpsc::UnboundedReceiver<ServeListener>,
    /// Fed by the worker's runtime for the systemd watchdog.
    pub heartbeat: Option<crate::notify::Heartbeat>,
}

/// Runs one worker thread per set of pre-bound listeners until `shutdown`
/// turns true; open connections then get `drain` to finish.
///
/// # Errors
/// When a thread cannot start.
pub fn spawn_workers(
    shared: &Arc<Shared>,
    listeners: Vec<WorkerListeners>,
    shutdown: &watch::Receiver<bool>,
    drain: Duration,
) -> Result<Vec<std::thread::JoinHandle<()>>, WorkerError> {
    let mut handles = Vec::new();
    for (i, set) in listeners.into_iter().enumerate() {
        let shared = Arc::clone(shared);
        let shutdown = shutdown.clone();
        let h = std::thread::Builder::new()
            .name(format!("worker-{i}"))
            .spawn(move || worker(shared, set, shutdown, drain))
            .map_err(WorkerError::Start)?;
        handles.push(h);
    }
    Ok(handles)
}

/// An accepted connection: TCP with its peer address, or unix with the
/// listener it came in on.
enum Client {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream, u32),
}

type Accepted = (Client, Arc<Netns>);

fn worker(
    shared: Arc<Shared>,
    listeners: WorkerListeners,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("worker runtime: {e}");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Accepted>(64);
        let mut accepts = Vec::new();
        let WorkerListeners {
            home,
            home_netns,
            mut more,
            heartbeat,
        } = listeners;
        let heartbeat = heartbeat.map(|h| tokio::task::spawn_local(h.run()));
        for l in home {
            match TcpListener::from_std(l) {
                Ok(l) => accepts.push(tokio::task::spawn_local(accept_loop(
                    Accepting::Tcp(l),
                    tx.clone(),
                    Arc::clone(&home_netns),
                    None,
                    shutdown.clone(),
                ))),
                Err(e) => tracing::error!("listener: {e}"),
            }
        }
        let mut conns = tokio::task::JoinSet::new();
        let handler_shutdown = shutdown.clone();
        loop {
            tokio::select! {
                conn = rx.recv() => match conn {
                    Some((client, netns)) => {
                        let shared = Arc::clone(&shared);
                        let stop = handler_shutdown.clone();
                        conns.spawn_local(handle(shared, client, netns, stop, drain));
                    }
                    None => break,
                },
                Some(l) = more.recv() => {
                    let listener = match l.listener {
                        Listener::Tcp(t) => TcpListener::from_std(t).map(Accepting::Tcp),
                        Listener::Unix { listener, listen_id } => UnixListener::from_std(listener)
                            .map(|u| Accepting::Unix(u, listen_id)),
                    };
                    match listener {
                        Ok(listener) => accepts.push(tokio::task::spawn_local(accept_loop(
                            listener,
                            tx.clone(),
                            l.netns,
                            Some(l.stop),
                            handler_shutdown.clone(),
                        ))),
                        Err(e) => tracing::error!("listener: {e}"),
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        // Accept loops end by themselves on the stop: TCP ones at once (a
        // successor has the listening sockets), unix ones once their
        // backlog is empty (a successor has its own listener on the path
        // by then). What they hand over meanwhile is served.
        drop(tx);
        let mut ending = tokio::task::JoinSet::new();
        for a in accepts {
            ending.spawn_local(a);
        }
        let deadline = tokio::time::sleep(Duration::from_secs(2));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                Some((client, netns)) = rx.recv() => {
                    let shared = Arc::clone(&shared);
                    conns.spawn_local(handle(shared, client, netns, handler_shutdown.clone(), drain));
                }
                r = ending.join_next() => if r.is_none() { break },
                () = &mut deadline => {
                    ending.abort_all();
                    break;
                }
            }
        }
        // Connections accepted before the stop (still in the channel when
        // the select above took the shutdown) are served, not dropped:
        // during a handover their clients would see the agent hang up.
        rx.close();
        while let Some((client, netns)) = rx.recv().await {
            let shared = Arc::clone(&shared);
            conns.spawn_local(handle(
                shared,
                client,
                netns,
                handler_shutdown.clone(),
                drain,
            ));
        }
        if let Some(h) = heartbeat {
            h.abort();
        }
        // Handlers stop by themselves once `drain` has passed; the margin
        // lets them write their disconnect events.
        let _ = tokio::time::timeout(drain + Duration::from_secs(1), async {
            while conns.join_next().await.is_some() {}
        })
        .await;
    });
}

/// Accepts on one listener until the worker stops or, for a namespace's
/// listener, the namespace manager lets it go (`stop` fires or is dropped).
enum Accepting {
    Tcp(TcpListener),
    Unix(UnixListener, u32),
}

impl Accepting {
    /// At the stop: a unix listener's queued connections are accepted and
    /// handed on (nothing new reaches it once a successor renamed its own
    /// listener over the path); a TCP listener's stay queued for the
    /// successor that holds the same socket.
    async fn drain(&self, tx: &tokio::sync::mpsc::Sender<Accepted>, netns: &Arc<Netns>) {
        let Self::Unix(l, id) = self else { return };
        while let Ok(Ok((s, _))) = tokio::time::timeout(Duration::from_millis(5), l.accept()).await
        {
            if tx
                .send((Client::Unix(s, *id), Arc::clone(netns)))
                .await
                .is_err()
            {
                return;
            }
        }
    }

    async fn accept(&self) -> std::io::Result<Client> {
        match self {
            Self::Tcp(l) => l.accept().await.map(|(s, peer)| Client::Tcp(s, peer)),
            Self::Unix(l, id) => l.accept().await.map(|(s, _)| Client::Unix(s, *id)),
        }
    }
}

async fn accept_loop(
    listener: Accepting,
    tx: tokio::sync::mpsc::Sender<Accepted>,
    netns: Arc<Netns>,
    stop: Option<tokio::sync::oneshot::Receiver<()>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let stopped = async {
        match stop {
            Some(rx) => {
                let _ = rx.await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stopped);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut stopped => return,
            _ = shutdown.wait_for(|s| *s) => {
                listener.drain(&tx, &netns).await;
                return;
            }
        };
        match accepted {
            Ok(client) => {
                if tx.send((client, Arc::clone(&netns))).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Original destination from the kernel record.
#[must_use]
pub fn orig_dst(rec: &ConnRecord) -> SocketAddr {
    let ip = std::net::Ipv6Addr::from(rec.orig_addr);
    let port = u16::from_be(rec.orig_port_be);
    match ip.to_ipv4_mapped() {
        Some(v4) => SocketAddr::new(v4.into(), port),
        None => SocketAddr::new(ip.into(), port),
    }
}

#[must_use]
pub fn kernel_facts(rec: &ConnRecord) -> KernelFacts {
    KernelFacts {
        pid: rec.pid,
        tgid: rec.tgid,
        uid: rec.uid,
        gid: rec.gid,
        comm: rec.comm,
        cgroup_id: rec.cgroup_id,
        netns_cookie: rec.netns_cookie,
    }
}

/// Decrements the live count however the handler ends.
struct LiveGuard<'a>(&'a Stats);

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Serialize)]
struct Bytes {
    from_client: u64,
    from_server: u64,
}

/// The kernel's record of an accepted connection, and the client as a
/// stream; for a unix connection, the listener's id.
fn lookup(
    shared: &Shared,
    client: Client,
    netns: &Netns,
) -> (Option<ConnRecord>, String, Stream, Option<u32>) {
    match client {
        Client::Tcp(s, peer) => {
            let _ = s.set_nodelay(true);
            (
                shared.lookup.take(netns.cookie, peer),
                peer.to_string(),
                Stream::Plain(s),
                None,
            )
        }
        Client::Unix(s, listen_id) => {
            // The connecting process, as the kernel recorded it at connect.
            let tgid = s
                .peer_cred()
                .ok()
                .and_then(|c| c.pid())
                .and_then(|p| u32::try_from(p).ok());
            let rec = tgid.and_then(|t| shared.lookup.take_unix(netns.cookie, t, listen_id));
            let peer = format!(
                "unix pid {}",
                tgid.map_or_else(|| "?".into(), |t| t.to_string())
            );
            (rec, peer, Stream::Unix(s), Some(listen_id))
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    client: Client,
    netns: Arc<Netns>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let id = shared.next_conn_id();
    let (rec, peer, client, unix_listener) = lookup(&shared, client, &netns);
    let Some(rec) = rec else {
        // Someone connected to the listener directly: there is no original
        // destination to relay to.
        shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
        shared.audit.record(
            AuditEvent::new("reject")
                .with("conn", id)
                .with("peer", peer)
                .with("netns_cookie", netns.cookie)
                .with(
                    "reason",
                    "connection was not redirected by the kernel programs",
                ),
        );
        return;
    };
    shared.stats.total.fetch_add(1, Ordering::Relaxed);
    shared.stats.live.fetch_add(1, Ordering::Relaxed);
    let _live = LiveGuard(&shared.stats);
    let started = Instant::now();
    let dst = orig_dst(&rec);
    let engine = shared.engine.load_full();
    let policy = engine.file();
    let target = match unix_listener {
        // The target whose path this listener serves (the record's index
        // first: a reload may have moved it).
        Some(listen_id) => {
            let serves = |t: &&crate::policy::TargetSpec| {
                t.address
                    .unix()
                    .is_some_and(|p| crate::conn::unix_listen_id(p) == listen_id)
            };
            policy
                .targets
                .get(rec.target_id as usize)
                .filter(serves)
                .or_else(|| policy.targets.iter().find(serves))
                .cloned()
        }
        None => policy
            .targets
            .get(rec.target_id as usize)
            .filter(|t| t.address.contains(dst))
            .or_else(|| policy.target_for(dst).map(|(_, t)| t))
            .cloned(),
    };
    let facts = kernel_facts(&rec);
    let mut identity = {
        let shared = Arc::clone(&shared);
        tokio::task::spawn_blocking(move || shared.identities.resolve(&facts))
            .await
            .unwrap_or_default()
    };
    identity.netns_inode = netns.inode;
    let Some(target) = target else {
        shared.audit.record(
            AuditEvent::new("reject")
                .with("conn", id)
                .with("dst", dst.to_string())
                .with("identity", &identity)
                .with("reason", "destination is no longer a target of the policy"),
        );
        return;
    };
    if let Some(block) = shared.blocks.matching(&identity, &engine) {
        // The kill switch, behind the kernel's: a process that started
        // since the last rescan, or a selector the kernel keys only
        // approximate.
        shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
        shared.audit.record(
            AuditEvent::new("reject")
                .with("conn", id)
                .with("dst", dst.to_string())
                .with("target", &target.name)
                .with("identity", &identity)
                .with("block", &block.entry.selector)
                .with("reason", format!("blocked ({})", block.entry.selector)),
        );
        return;
    }
    let names = engine.bind_identity(&identity).names;
    let info = ConnInfo::named(id, target, dst, identity, names).in_netns(Arc::clone(&netns));
    shared.audit.record(info.event("connect"));
    let registered = shared.registry.insert(info);
    // A block published between the check above and the insert swept the
    // registry without this connection: look once more.
    if let Some(block) = shared
        .blocks
        .matching(&registered.live.info.identity, &engine)
    {
        registered
            .live
            .kill(&format!("blocked ({})", block.entry.selector));
    }

    let counts = Counted::default();
    let upstream = Upstream {
        dst,
        mark: shared.mark,
        timeout: shared.connect_timeout,
        netns,
        unix: registered
            .live
            .info
            .target
            .address
            .unix()
            .map(std::path::Path::to_owned),
    };
    let mut guard = Guard::with_live(Arc::clone(&shared), Arc::clone(&registered.live));
    // Summary windows are written when the connection ends, however it
    // ends (a handler dropped at the agent's exit included).
    let summaries = FlushOnDrop(guard.exec_log());
    let protocol = guard.info.target.protocol;
    // Each protocol's session on the heap: the task then holds only the
    // one it runs (the two differ by 2.5 KB), which an idle connection's
    // memory shows.
    let session = async {
        match protocol {
            Protocol::Postgres => {
                Box::pin(crate::protocol::postgres::serve(
                    &mut guard, client, &upstream, &counts,
                ))
                .await
            }
            Protocol::Mysql => {
                Box::pin(crate::protocol::mysql::serve(
                    &mut guard, client, &upstream, &counts,
                ))
                .await
            }
        }
    };
    let stopping = async {
        let _ = shutdown.wait_for(|s| *s).await;
        tokio::time::sleep(drain).await;
    };
    let killed = registered.live.killed();
    // Biased, the session first: every wake-up of the connection's task
    // is almost always its traffic, and the unbiased form draws a random
    // number per poll to pick an order.
    let error = tokio::select! {
        biased;
        r = session => r.err(),
        () = stopping => Some(SessionError::Shutdown),
        reason = killed => Some(SessionError::Killed(reason)),
    };
    // The session (and with it any execution still in flight) is over:
    // its summaries come before the disconnect.
    summaries.0.flush();
    match &error {
        Some(SessionError::ClientProtocol(e) | SessionError::ServerProtocol(e)) => {
            shared
                .audit
                .record(guard.info.event("protocol_error").with("error", e));
        }
        Some(SessionError::Tls { leg, error }) => {
            shared.audit.record(
                guard
                    .info
                    .event("tls_error")
                    .with("leg", leg)
                    .with("error", error),
            );
        }
        _ => {}
    }

    let mut ev = guard
        .info
        .event("disconnect")
        .with(
            "bytes",
            Bytes {
                from_client: counts.from_client.get(),
                from_server: counts.from_server.get(),
            },
        )
        .with("duration_us", elapsed_us(started));
    if let Some(e) = error {
        ev = ev.with("error", e.to_string());
    }
    shared.audit.record(ev);
}

/// Writes a connection's open summary windows when dropped.
struct FlushOnDrop(ExecLog);

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        self.0.flush();
    }
}
fn elapsed_us(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{conn::OrigDstLookup, identity::IdentityResolver, policy::Engine, proxy::Limits};

    #[test]
    fn orig_dst_unmaps_v4() {
        let mut rec = ConnRecord::ZERO;
        rec.orig_addr = std::net::Ipv4Addr::new(10, 1, 2, 3)
            .to_ipv6_mapped()
            .octets();
        rec.orig_port_be = 5432u16.to_be();
        assert_eq!(orig_dst(&rec), "10.1.2.3:5432".parse().unwrap());
        rec.orig_addr = std::net::Ipv6Addr::LOCALHOST.octets();
        assert_eq!(orig_dst(&rec), "[::1]:5432".parse().unwrap());
    }

    /// The original-destination lookup as a table: the proxy core runs
    /// without root and without eBPF.
    struct Table(std::sync::Mutex<std::collections::HashMap<SocketAddr, ConnRecord>>);

    impl OrigDstLookup for Table {
        fn take(&self, _: u64, peer: SocketAddr) -> Option<ConnRecord> {
            self.0.lock().ok()?.remove(&peer)
        }
    }

    /// A stand-in PostgreSQL server: trust auth, answers every Query with
    /// CommandComplete, and a stand-in query as PostgreSQL would (missing
    /// relation).
    async fn fake_postgres(listener: TcpListener) {
        use crate::protocol::postgres::codec::{self, frame};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut s, _) = listener.accept().await.unwrap();
        loop {
            let mut len = [0u8; 4];
            s.read_exact(&mut len).await.unwrap();
            let mut rest = vec![0u8; u32::from_be_bytes(len) as usize - 4];
            s.read_exact(&mut rest).await.unwrap();
            // The agent asks for TLS first (tls.server: prefer): no.
            if rest[..4] != codec::SSL_REQUEST.to_be_bytes() {
                break;
            }
            s.write_all(b"N").await.unwrap();
        }
        s.write_all(&frame(b'R', &[0, 0, 0, 0])).await.unwrap();
        s.write_all(&frame(b'Z', b"I")).await.unwrap();
        let mut buf = bytes::BytesMut::new();
        loop {
            while let Some(f) = codec::decode_frame(&mut buf, 1 << 20).unwrap() {
                if f.tag == b'X' {
                    return;
                }
                let sql = codec::query_sql(f.body()).unwrap();
                if let Some(rel) = sql.strip_prefix("SELECT FROM pg_catalog.") {
                    let msg = format!(
                        "relation \"pg_catalog.{}\" does not exist",
                        rel.trim_matches('"')
                    );
                    s.write_all(&codec::error_response(
                        b'E', "ERROR", "42P01", &msg, None, None,
                    ))
                    .await
                    .unwrap();
                } else {
                    s.write_all(&frame(b'C', b"SELECT 1\0")).await.unwrap();
                }
                s.write_all(&frame(b'Z', b"I")).await.unwrap();
            }
            if s.read_buf(&mut buf).await.unwrap() == 0 {
                return;
            }
        }
    }

    async fn read_until_ready(c: &mut TcpStream) -> Vec<crate::protocol::postgres::codec::Frame> {
        use tokio::io::AsyncReadExt as _;
        let mut buf = bytes::BytesMut::new();
        let mut frames = Vec::new();
        loop {
            while let Some(f) =
                crate::protocol::postgres::codec::decode_frame(&mut buf, 1 << 20).unwrap()
            {
                let done = f.tag == b'Z';
                frames.push(f);
                if done {
                    return frames;
                }
            }
            assert!(c.read_buf(&mut buf).await.unwrap() > 0, "closed early");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn proxy_core_decides_and_rejects_without_ebpf() {
        use crate::protocol::postgres::codec;
        use tokio::io::AsyncWriteExt as _;
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let server_addr = server.local_addr().unwrap();
                tokio::task::spawn_local(fake_postgres(server));
                let policy = crate::policy::PolicyFile::parse(
                    &format!(
                        "version: 1\nmode: enforce\ndefault: allow\ntargets:\n  - {{name: pg, protocol: postgres, address: '{server_addr}'}}\nrules:\n  - {{name: no-drops, kinds: [ddl], decision: deny}}\n"
                    ),
                    std::path::Path::new("test"),
                )
                .unwrap();
                let dir = tempfile::tempdir().unwrap();
                let (audit, writer) = crate::audit::AuditWriter::start(crate::audit::AuditConfig::new(dir.path().join("a.jsonl"))).unwrap();
                let table = Arc::new(Table(std::sync::Mutex::default()));
                let shared = Arc::new(Shared::new(
                    Engine::new(policy).unwrap(),
                    audit,
                    table.clone(),
                    IdentityResolver::new(None, 1 << 20),
                    0,
                    Limits::default(),
                ));
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let agent_addr = listener.local_addr().unwrap();
                let home = Arc::new(Netns::home(&listener).unwrap());
                let (_stop_tx, stop) = watch::channel(false);

                // A connection the "kernel" recorded.
                let mut client = TcpStream::connect(agent_addr).await.unwrap();
                let (stream, peer) = listener.accept().await.unwrap();
                let mut rec = ConnRecord::ZERO;
                let std::net::IpAddr::V4(ip) = server_addr.ip() else { unreachable!() };
                rec.orig_addr = ip.to_ipv6_mapped().octets();
                rec.orig_port_be = server_addr.port().to_be();
                rec.tgid = std::process::id();
                rec.pid = rec.tgid;
                table.0.lock().unwrap().insert(peer, rec);
                let task = tokio::task::spawn_local(handle(Arc::clone(&shared), Client::Tcp(stream, peer), Arc::clone(&home), stop.clone(), Duration::ZERO));

                let mut startup = 196_608u32.to_be_bytes().to_vec();
                startup.extend_from_slice(b"user\0app\0\0");
                let mut packet = u32::try_from(startup.len() + 4).unwrap().to_be_bytes().to_vec();
                packet.extend(startup);
                client.write_all(&packet).await.unwrap();
                assert_eq!(read_until_ready(&mut client).await.len(), 2);
                client.write_all(&codec::query_message("SELECT 1")).await.unwrap();
                let tags: Vec<u8> = read_until_ready(&mut client).await.iter().map(|f| f.tag).collect();
                assert_eq!(tags, b"CZ");
                client.write_all(&codec::query_message("DROP TABLE orders")).await.unwrap();
                let reply = read_until_ready(&mut client).await;
                let err = codec::error_fields(reply[0].body());
                assert_eq!(err.code, Some("42501"));
                assert!(err.message.unwrap().contains("no-drops"), "{err:?}");
                client.write_all(&codec::frame(b'X', &[])).await.unwrap();
                drop(client);
                task.await.unwrap();

                // A connection nobody recorded is turned away.
                let _stray = TcpStream::connect(agent_addr).await.unwrap();
                let (stream, peer) = listener.accept().await.unwrap();
                handle(Arc::clone(&shared), Client::Tcp(stream, peer), home, stop, Duration::ZERO).await;
                assert_eq!(shared.stats.rejected.load(Ordering::Relaxed), 1);
                assert_eq!(shared.stats.denied.load(Ordering::Relaxed), 1);
                drop(shared);
                writer.finish();
                let log = std::fs::read_to_string(dir.path().join("a.jsonl")).unwrap();
                assert!(log.contains("\"event\":\"reject\""), "{log}");
                assert!(log.contains("\"decision\":\"deny\""), "{log}");
            })
            .await;
    }
}
