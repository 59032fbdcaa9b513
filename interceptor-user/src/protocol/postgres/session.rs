use std::{cell::RefCell, collections::VecDeque};

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::codec::{
    self, CodecError, StartupPacket, decode_header, decode_startup, error_fields, error_response,
};
use super::login::{self, LoginError, ServerCert};
use super::track::{BIND_PREFIX, Tracker};
use crate::{
    policy::{LoginSpec, Secret, ServerTls},
    protocol::{READ_CHUNK, SMALL_READ, make_room},
    proxy::{
        Counted, Guard, Hold, LoginPlan, Outcome, ReadHalf, Refusal, SessionError, Stream,
        Unanswered, Upstream, tls_from_client, tls_to_server,
    },
    tls::Legs,
};

/// How long a client may take to send its startup packet.
const STARTUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Largest server message the agent inspects (ErrorResponse,
/// BackendKeyData, ReadyForQuery); everything else streams through.
const MAX_INSPECTED_SERVER_FRAME: usize = 1024 * 1024;
/// Client input buffered beyond a held message while it awaits approval;
/// beyond this the agent stops reading until the decision.
const MAX_HELD_INPUT: usize = 1024 * 1024;

/// A refused message's stand-in on its way to the server, waiting for the
/// server's error so it can be rewritten into the denial.
struct Poison {
    token: String,
    /// Index of the Sync/Query group it belongs to.
    group: u64,
    error: Bytes,
}

struct Pending {
    poisons: VecDeque<Poison>,
    /// Groups (Query, FunctionCall, Sync) sent to the server.
    groups_sent: u64,
    /// ReadyForQuery received for them.
    groups_done: u64,
    /// The first ReadyForQuery ends authentication, not a client group.
    authenticated: bool,
    /// The server's BackendKeyData, once seen (cancels on a kill).
    backend_key: Option<(u32, Bytes)>,
    /// NoticeResponses for the client about held statements.
    notices: Vec<Bytes>,
    /// The server leg is TLS (so SCRAM channel binding cannot pass).
    server_tls: bool,
    /// The server asked for SASL and the client's SASLInitialResponse has
    /// not been seen yet; true when the server offered a `-PLUS` mechanism.
    sasl: Option<bool>,
    /// Which answer belongs to which message, for the records of
    /// executions and statements.
    track: Tracker,
}

impl Pending {
    fn new(track: Tracker, server_tls: bool) -> Self {
        Self {
            poisons: VecDeque::new(),
            groups_sent: 0,
            groups_done: 0,
            authenticated: false,
            backend_key: None,
            notices: Vec::new(),
            server_tls,
            sasl: None,
            track,
        }
    }
}

/// Serves one client: TLS if it asks (SSLRequest, or PostgreSQL 17's
/// direct TLS), startup, the server leg as the target's `tls.server` says,
/// authentication relayed untouched, then every Query, Parse and
/// FunctionCall decided by the guard.
///
/// # Errors
/// I/O failures, the upstream connect, TLS failures on either leg, and
/// protocol violations by either peer (the client then gets a FATAL error
/// where that is still possible).
pub async fn serve(
    guard: &mut Guard,
    client: Stream,
    upstream: &Upstream,
    counts: &Counted,
) -> Result<(), SessionError> {
    let mut cbuf = BytesMut::with_capacity(SMALL_READ);
    let mut legs = Legs::default();
    let tls = guard.tls_context();
    let target = guard.info.target.clone();
    let mut client = match client {
        // PostgreSQL 17's sslnegotiation=direct starts with a TLS handshake
        // record instead of an SSLRequest (TCP only).
        Stream::Plain(client) => {
            let mut first = [0u8; 1];
            let peeked = tokio::time::timeout(STARTUP_TIMEOUT, client.peek(&mut first))
                .await
                .map_err(|_| {
                    SessionError::ClientProtocol("no startup packet within 60s".into())
                })??;
            if peeked == 0 {
                return Ok(());
            }
            if first[0] == TLS_HANDSHAKE_RECORD {
                let (s, info) = tls_from_client(&tls, &target, upstream.dst, client, true).await?;
                legs.client = Some(info);
                s
            } else {
                Stream::Plain(client)
            }
        }
        other => other,
    };
    // Set up early when the client asks for TLS: it gets TLS only where
    // the agent has it towards the server (or the target says `disable`),
    // so a client that merely prefers TLS carries on in plain text with a
    // plain server, as it would directly.
    let mut early_server = None;
    // The local bypass is joined on the first message, before the reply to
    // it: the client waits for that reply. Not with direct TLS (the
    // ClientHello was not read yet), nor after a pipelined message.
    let mut join = legs.client.is_none();
    let startup = loop {
        let decoded = decode_startup(&mut cbuf);
        if join && matches!(decoded, Ok(Some(_))) {
            join = false;
            if cbuf.is_empty() {
                guard.join_local_bypass(&client);
            }
        }
        match decoded {
            Ok(Some(StartupPacket::Ssl)) => {
                client = match client {
                    Stream::Plain(mut tcp) if cbuf.is_empty() => {
                        // libpq does not show an error sent in answer to
                        // SSLRequest; one that the server leg cannot be set
                        // up waits for the startup packet, inside TLS.
                        let offer =
                            match connect_server(&tls, &target, upstream, &mut legs, false).await {
                                Ok(server) => {
                                    let offer =
                                        server.is_tls() || target.tls.server == ServerTls::Disable;
                                    early_server = Some(Ok(server));
                                    offer
                                }
                                Err(e) => {
                                    early_server = Some(Err(e));
                                    true
                                }
                            };
                        if offer {
                            tcp.write_all(b"S").await?;
                            let (s, info) =
                                tls_from_client(&tls, &target, upstream.dst, tcp, false).await?;
                            legs.client = Some(info);
                            s
                        } else {
                            tcp.write_all(b"N").await?;
                            Stream::Plain(tcp)
                        }
                    }
                    // No TLS on a unix socket (libpq never asks there).
                    Stream::Unix(mut unix) if cbuf.is_empty() => {
                        unix.write_all(b"N").await?;
                        Stream::Unix(unix)
                    }
                    mut other => {
                        // Bytes sent before the handshake would be taken as
                        // if they had come over TLS (CVE-2021-23222).
                        let why = if other.is_tls() {
                            "SSLRequest inside TLS"
                        } else {
                            "data after SSLRequest, before the TLS handshake"
                        };
                        let e = CodecError::Unexpected(why);
                        return Err(fatal(&mut other, &e).await);
                    }
                };
            }
            Ok(Some(StartupPacket::GssEnc)) => {
                // No GSSAPI encryption; the client goes on with TLS or plain.
                client.write_all(b"N").await?;
                client.flush().await?;
            }
            Ok(Some(packet)) => break packet,
            Ok(None) => {
                make_room(&mut cbuf, 0);
                let n = tokio::time::timeout(STARTUP_TIMEOUT, client.read_buf(&mut cbuf))
                    .await
                    .map_err(|_| {
                        SessionError::ClientProtocol("no startup packet within 60s".into())
                    })??;
                if n == 0 {
                    return Ok(());
                }
            }
            Err(e) => return Err(fatal(&mut client, &e).await),
        }
    };
    let startup = match startup {
        StartupPacket::Cancel { pid, secret } => {
            drop(early_server);
            return cancel(guard, upstream, pid, &secret).await;
        }
        StartupPacket::Startup(m) => m,
        StartupPacket::Ssl | StartupPacket::GssEnc => return Ok(()),
    };
    guard.set_session(&startup.user, &startup.database);
    let broker = match guard.plan_login(&startup.user) {
        LoginPlan::Passthrough => None,
        LoginPlan::Brokered(entry) => Some(entry),
        LoginPlan::Refused(msg) => {
            drop(early_server);
            send_fatal(&mut client, "28000", &msg).await;
            return Err(SessionError::Refused(msg));
        }
    };

    let mut server = match early_server {
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            send_fatal(&mut client, "08001", &refusal_text(&e)).await;
            return Err(e);
        }
        None => {
            let client_tls = legs.client.is_some();
            match connect_server(&tls, &target, upstream, &mut legs, client_tls).await {
                Ok(s) => s,
                Err(e) => {
                    send_fatal(&mut client, "08001", &refusal_text(&e)).await;
                    return Err(e);
                }
            }
        }
    };
    if legs.client.is_some() && !server.is_tls() {
        legs.server_plain = Some("tls.server: disable");
    }
    let server_tls = server.is_tls();
    guard.set_tls(legs);
    let secret = match broker.as_ref().map(LoginSpec::password) {
        None => None,
        Some(Ok(secret)) => Some(secret),
        Some(Err(e)) => {
            guard.record_login_failed("secret", None, &e);
            let msg = format!(
                "interceptor: the agent cannot log in as {:?} for this workload: its secret: {e}",
                startup.user
            );
            send_fatal(&mut client, "28000", &msg).await;
            return Err(SessionError::Refused(msg));
        }
    };
    // A brokered session's record waits for the login's outcome.
    if secret.is_none() {
        guard.record_session(startup.application_name.as_deref());
    }
    server.write_all(&startup.bytes).await?;
    counts
        .from_client
        .set(counts.from_client.get() + startup.bytes.len() as u64);
    let from_server = match secret {
        None => BytesMut::with_capacity(SMALL_READ),
        Some(secret) => match broker_login(&mut server, &startup.user, &secret).await {
            Ok((buf, method)) => {
                guard.set_login_method(method);
                guard.record_session(startup.application_name.as_deref());
                buf
            }
            Err(e) => {
                let (code, error) = match &e {
                    LoginError::Refused { code, message } => (Some(code.as_str()), message.clone()),
                    other => (None, other.to_string()),
                };
                guard.record_login_failed("server", code, &error);
                let msg = format!(
                    "interceptor: the server refused the agent's login as {:?}: {error}",
                    startup.user
                );
                send_fatal(&mut client, code.unwrap_or("28000"), &msg).await;
                return Err(SessionError::Refused(msg));
            }
        },
    };

    let pending = RefCell::new(Pending::new(Tracker::new(guard.exec_log()), server_tls));
    let max = guard.max_frame();
    let live = guard.live();
    let result = {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        tokio::try_join!(
            client_to_server(&mut cr, &mut sw, cbuf, guard, &pending, max, counts),
            server_to_client(&mut sr, &mut cw, from_server, &pending, &live, counts),
        )
    };
    match result {
        Ok(_) => {
            let _ = client.shutdown().await;
            Ok(())
        }
        Err(SessionError::ClientProtocol(e)) => {
            let msg = format!("interceptor: invalid message from client: {e}");
            send_fatal(&mut client, "08P01", &msg).await;
            Err(SessionError::ClientProtocol(e))
        }
        Err(SessionError::ServerProtocol(e)) => {
            let msg = format!("interceptor: invalid message from server: {e}");
            send_fatal(&mut client, "08P01", &msg).await;
            Err(SessionError::ServerProtocol(e))
        }
        Err(SessionError::Refused(msg)) => {
            send_fatal(&mut client, "28000", &msg).await;
            Err(SessionError::Refused(msg))
        }
        Err(e) => Err(e),
    }
}

/// The agent's own login on `server` (startup sent), within the startup
/// timeout; what the server sent from its `AuthenticationOk` on.
async fn broker_login(
    server: &mut Stream,
    user: &str,
    secret: &Secret,
) -> Result<(BytesMut, &'static str), LoginError> {
    let cert = server.peer_certificate().map(<[u8]>::to_vec);
    tokio::time::timeout(
        STARTUP_TIMEOUT,
        login::login(server, user, secret, &ServerCert(cert.as_deref())),
    )
    .await
    .unwrap_or_else(|_| {
        Err(LoginError::Protocol(format!(
            "no answer to the login within {}s",
            STARTUP_TIMEOUT.as_secs()
        )))
    })
}

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The agent's connection to the server as `tls.server` says: SSLRequest
/// first unless `disable`; TLS when the server answers `S`. With
/// `client_tls` (the workload is on TLS already) a server without TLS is
/// refused rather than sent the workload's traffic in clear, unless the
/// target says `disable`.
async fn connect_server(
    tls: &crate::tls::TlsContext,
    target: &crate::policy::TargetSpec,
    upstream: &Upstream,
    legs: &mut Legs,
    client_tls: bool,
) -> Result<Stream, SessionError> {
    let stream = upstream.connect().await?;
    let mode = target.tls.server;
    let mut tcp = match stream {
        Stream::Plain(tcp) if mode != ServerTls::Disable => tcp,
        other => return Ok(other),
    };
    let mut request = Vec::with_capacity(8);
    request.extend_from_slice(&8u32.to_be_bytes());
    request.extend_from_slice(&codec::SSL_REQUEST.to_be_bytes());
    tcp.write_all(&request).await?;
    let mut answer = [0u8; 1];
    let read = tokio::time::timeout(crate::tls::HANDSHAKE_TIMEOUT, tcp.read(&mut answer))
        .await
        .map_err(|_| {
            SessionError::server_tls(format!(
                "the server at {} did not answer the SSLRequest within {}s",
                upstream.dst,
                crate::tls::HANDSHAKE_TIMEOUT.as_secs()
            ))
        })??;
    match (read, answer[0]) {
        (1, b'S') => {
            let (s, info) = tls_to_server(tls, target, upstream.dst, tcp).await?;
            legs.server = Some(info);
            Ok(s)
        }
        (1, b'N') if mode.requires_tls() => Err(SessionError::Refused(format!(
            "interceptor: the server at {} does not accept TLS, and target {:?} has tls.server: {mode}",
            upstream.dst, target.name
        ))),
        (1, b'N') if client_tls => Err(SessionError::Refused(format!(
            "interceptor: this connection uses TLS, but the server at {} does not accept TLS; \
             the agent does not send it on in clear (set tls.server: disable on target {:?} to allow that)",
            upstream.dst, target.name
        ))),
        (1, b'N') => Ok(Stream::Plain(tcp)),
        (0, _) => Err(SessionError::ServerProtocol(
            "the server closed the connection after SSLRequest".into(),
        )),
        (_, other) => Err(SessionError::ServerProtocol(format!(
            "the server answered SSLRequest with {other:#04x}"
        ))),
    }
}

/// What the client is told when the server leg cannot be set up.
fn refusal_text(e: &SessionError) -> String {
    match e {
        SessionError::Refused(m) => m.clone(),
        e => format!("interceptor: {e}"),
    }
}

/// Sends a FATAL ErrorResponse and flushes it (a TLS leg buffers).
async fn send_fatal(client: &mut Stream, code: &str, msg: &str) {
    let _ = client
        .write_all(&error_response(b'E', "FATAL", code, msg, None, None))
        .await;
    let _ = client.flush().await;
    let _ = client.shutdown().await;
}

async fn fatal(client: &mut Stream, e: &CodecError) -> SessionError {
    let msg = format!("interceptor: invalid startup packet: {e}");
    send_fatal(client, "08P01", &msg).await;
    SessionError::ClientProtocol(e.to_string())
}

/// A CancelRequest reaches the agent because the client connected to the
/// original server address, which is redirected like any other: send it on
/// to that same server. The key is the server's own (BackendKeyData passes
/// through untouched), so the server finds the backend itself.
async fn cancel(
    guard: &Guard,
    upstream: &Upstream,
    pid: u32,
    secret: &[u8],
) -> Result<(), SessionError> {
    guard.record_cancel(pid);
    let mut packet = Vec::with_capacity(12 + secret.len());
    packet.extend_from_slice(
        &u32::try_from(12 + secret.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    packet.extend_from_slice(&codec::CANCEL_REQUEST.to_be_bytes());
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(secret);
    let mut server = upstream.connect().await?;
    server.write_all(&packet).await?;
    // The server closes without answering; wait for that so the cancel is
    // delivered before the client's own connection closes.
    let mut sink = [0u8; 64];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server.read(&mut sink)).await;
    Ok(())
}

/// The SQL a refused message is replaced with: fails at parse analysis
/// (so in Parse as well as in Query) with the token in the message, in any
/// server language. pg_catalog can't hold such a relation without
/// allow_system_table_mods.
fn poison_sql(token: &str) -> String {
    format!("SELECT FROM pg_catalog.\"{token}\"")
}

/// Walks received bytes message by message. Messages nobody needs to read
/// are streamed through as they arrive (no whole-message buffering, so a
/// huge DataRow or CopyData costs no memory); the caller asks for the whole
/// of the ones it inspects.
#[derive(Default)]
struct Scanner {
    /// Bytes of a streamed-through message still to come.
    skip: usize,
}

enum Step {
    /// This many bytes belong to a streamed message: forward them.
    Forward(usize),
    /// A message starts here.
    Message(codec::Header),
    /// Not even a header yet.
    NeedMore,
}

impl Scanner {
    fn step(&mut self, buf: &[u8], max: usize) -> Result<Step, CodecError> {
        if self.skip > 0 {
            let n = self.skip.min(buf.len());
            self.skip -= n;
            return Ok(Step::Forward(n));
        }
        Ok(decode_header(buf, max)?.map_or(Step::NeedMore, Step::Message))
    }

    /// Streams the message `h` through.
    fn pass(&mut self, h: codec::Header) {
        self.skip = h.total;
    }

    /// Whether the stream stopped at a message boundary.
    fn at_boundary(&self, buffered: usize) -> bool {
        self.skip == 0 && buffered == 0
    }
}

/// Counts and drops the `upto` bytes already forwarded, then reads more
/// (`last` is what the previous read brought); returns the bytes read (0 at
/// end of stream).
async fn refill(
    r: &mut ReadHalf<'_>,
    buf: &mut BytesMut,
    upto: usize,
    counter: &std::cell::Cell<u64>,
    last: usize,
) -> std::io::Result<usize> {
    counter.set(counter.get() + upto as u64);
    buf.advance(upto);
    read_more(r, buf, last).await
}

/// Reads more into `buf` (`last` is what the previous read brought). With
/// nothing buffered and traffic small, the buffer is given back while the
/// peer is silent: an idle plain connection holds no read buffers.
async fn read_more(
    r: &mut ReadHalf<'_>,
    buf: &mut BytesMut,
    last: usize,
) -> std::io::Result<usize> {
    if buf.is_empty() && last < SMALL_READ / 2 && r.waits_unbuffered() {
        crate::protocol::release(buf);
        r.wait_input().await?;
    }
    make_room(buf, last);
    r.read_buf(buf).await
}

async fn client_to_server<W>(
    r: &mut ReadHalf<'_>,
    w: &mut W,
    mut buf: BytesMut,
    guard: &mut Guard,
    pending: &RefCell<Pending>,
    max: usize,
    counts: &Counted,
) -> Result<(), SessionError>
where
    W: AsyncWrite + Unpin,
{
    let mut scan = Scanner::default();
    let mut last = 0usize;
    loop {
        let mut pos = 0usize;
        // Start of the bytes not yet forwarded.
        let mut out = 0usize;
        while pos < buf.len() {
            let h = match scan.step(&buf[pos..], max) {
                Ok(Step::Forward(n)) => {
                    pos += n;
                    continue;
                }
                Ok(Step::NeedMore) => break,
                Ok(Step::Message(h)) => h,
                Err(e) => return Err(SessionError::ClientProtocol(e.to_string())),
            };
            let sasl_initial = h.tag == b'p' && pending.borrow().sasl.is_some();
            if !matches!(h.tag, b'Q' | b'P' | b'F') && !sasl_initial {
                // Bind, Execute and Close are read for the names at their
                // start (Bind only that far: its values stream through).
                let need = match h.tag {
                    b'B' => h.total.min(5 + BIND_PREFIX),
                    b'E' | b'C' => h.total,
                    _ => 5,
                };
                if buf.len() - pos < need {
                    buf.reserve(need - (buf.len() - pos));
                    break;
                }
                let mut p = pending.borrow_mut();
                if h.tag == b'S' {
                    p.groups_sent += 1;
                }
                p.track.client(h.tag, &buf[pos + 5..pos + need]);
                drop(p);
                scan.pass(h);
                continue;
            }
            if buf.len() - pos < h.total {
                buf.reserve(h.total - (buf.len() - pos));
                break;
            }
            if sasl_initial {
                let mut p = pending.borrow_mut();
                let plus_offered = p.sasl.take().unwrap_or(false);
                if p.server_tls
                    && let Some(why) = channel_binding(&buf[pos + 5..pos + h.total], plus_offered)
                {
                    return Err(SessionError::Refused(channel_binding_message(why)));
                }
                drop(p);
                scan.pass(h);
                continue;
            }
            let (outcome, records) = decide(guard, h.tag, &buf[pos + 5..pos + h.total])?;
            let refusal = match outcome {
                Outcome::Forward => None,
                Outcome::Refuse(r) => Some(r),
                Outcome::Hold(mut hold) => {
                    // What came before goes on; this message and whatever
                    // the client sends after it wait for the decision.
                    w.write_all(&buf[out..pos]).await?;
                    out = pos;
                    let notice = error_response(
                        b'N',
                        "NOTICE",
                        "00000",
                        &hold.notice,
                        Some(
                            "The statement waits for approval; it has not been sent to the server.",
                        ),
                        None,
                    );
                    pending.borrow_mut().notices.push(notice);
                    w.flush().await?;
                    // Let server_to_client (same task) see the notice now.
                    tokio::task::yield_now().await;
                    held(r, &mut buf, &mut hold, pos + h.total + MAX_HELD_INPUT).await?
                }
            };
            let refused = refusal.is_some();
            if let Some(refusal) = refusal {
                let body = &buf[pos + 5..pos + h.total];
                w.write_all(&buf[out..pos]).await?;
                let token = format!("interceptor-denied-{}", refusal.id);
                let stand_in = stand_in(h.tag, body, &poison_sql(&token));
                {
                    let mut p = pending.borrow_mut();
                    let group = p.groups_sent;
                    p.poisons.push_back(Poison {
                        token,
                        group,
                        error: error_response(
                            b'E',
                            "ERROR",
                            "42501",
                            &refusal.message,
                            Some("The statement was not sent to the server."),
                            None,
                        ),
                    });
                }
                w.write_all(&stand_in).await?;
                out = pos + h.total;
            }
            {
                let mut p = pending.borrow_mut();
                match h.tag {
                    b'P' => {
                        let statement = codec::parse_message(&buf[pos + 5..pos + h.total])
                            .map_or("", |m| m.name);
                        let allowed = (!refused).then(|| guard.last_decision());
                        p.track.parse(statement.as_bytes(), allowed, records);
                    }
                    b'Q' => p.track.query(records),
                    _ => p.track.function_call(),
                }
                if h.tag != b'P' {
                    // Query and FunctionCall each end a group (one ReadyForQuery).
                    p.groups_sent += 1;
                }
            }
            pos += h.total;
        }
        w.write_all(&buf[out..pos]).await?;
        w.flush().await?;
        last = refill(r, &mut buf, pos, &counts.from_client, last).await?;
        if last == 0 {
            if !scan.at_boundary(buf.len()) {
                return Err(SessionError::ClientProtocol(
                    "connection closed in the middle of a message".into(),
                ));
            }
            w.shutdown().await?;
            return Ok(());
        }
    }
}

/// Waits while a message awaits approval. Client input is buffered (up to
/// a limit), not acted on; the client hanging up ends the session, which
/// withdraws the approval when `hold` drops.
async fn held<R>(
    r: &mut R,
    buf: &mut BytesMut,
    hold: &mut Hold,
    limit: usize,
) -> Result<Option<Refusal>, SessionError>
where
    R: AsyncRead + Unpin,
{
    loop {
        let room = buf.len() < limit;
        if room && buf.capacity() - buf.len() < 4096 {
            buf.reserve(READ_CHUNK);
        }
        tokio::select! {
            refusal = hold.wait() => return Ok(refusal),
            n = r.read_buf(buf), if room => {
                if n? == 0 {
                    return Err(SessionError::Io(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        format!(
                            "the client left while statement {} waited for approval",
                            hold.approval_id()
                        ),
                    )));
                }
            }
        }
    }
}

/// Decides one Query, Parse or FunctionCall; a Query on its way to the
/// server comes with its records, which wait for the server's answer.
fn decide(
    guard: &mut Guard,
    tag: u8,
    body: &[u8],
) -> Result<(Outcome, Option<Unanswered>), SessionError> {
    let bad = |e: CodecError| SessionError::ClientProtocol(e.to_string());
    match tag {
        b'Q' => Ok(guard.check_query(codec::query_sql(body).map_err(bad)?)),
        b'P' => Ok(guard.check_parse(codec::parse_message(body).map_err(bad)?.sql)),
        _ => {
            let oid = codec::function_call_oid(body).map_err(bad)?;
            Ok((guard.check_call(&format!("oid:{oid}")), None))
        }
    }
}

/// The message sent instead of a refused one: a Parse of the same statement
/// name for a Parse (so later Binds fail as after any failed Parse), a Query
/// otherwise (a FunctionCall's reply has the same shape: error, then
/// ReadyForQuery).
fn stand_in(tag: u8, body: &[u8], sql: &str) -> Bytes {
    match (tag, codec::parse_message(body)) {
        (b'P', Ok(m)) => codec::parse_frame(m.name, sql),
        _ => codec::query_message(sql),
    }
}

/// Relays the server's messages, starting with what `buf` holds already
/// (a brokered login's `AuthenticationOk` and what came with it).
async fn server_to_client<W>(
    r: &mut ReadHalf<'_>,
    w: &mut W,
    mut buf: BytesMut,
    pending: &RefCell<Pending>,
    live: &crate::proxy::LiveConn,
    counts: &Counted,
) -> Result<(), SessionError>
where
    W: AsyncWrite + Unpin,
{
    let mut scan = Scanner::default();
    let mut last = 0usize;
    loop {
        let mut pos = 0usize;
        let mut out = 0usize;
        while pos < buf.len() {
            let h = match scan.step(&buf[pos..], usize::MAX) {
                Ok(Step::Forward(n)) => {
                    pos += n;
                    continue;
                }
                Ok(Step::NeedMore) => break,
                Ok(Step::Message(h)) => h,
                Err(e) => return Err(SessionError::ServerProtocol(e.to_string())),
            };
            let inspect = match h.tag {
                b'Z' => true,
                b'R' => !pending.borrow().authenticated,
                b'K' => !pending.borrow().authenticated,
                // CommandComplete and ErrorResponse end executions; their
                // tag and code are read.
                b'C' => h.total <= MAX_INSPECTED_SERVER_FRAME,
                b'E' => {
                    let p = pending.borrow();
                    !p.poisons.is_empty() || h.total <= MAX_INSPECTED_SERVER_FRAME
                }
                _ => false,
            };
            if !inspect {
                pending.borrow_mut().track.server(h.tag, None);
                scan.pass(h);
                continue;
            }
            if h.total > MAX_INSPECTED_SERVER_FRAME {
                return Err(SessionError::ServerProtocol(format!(
                    "message {:?} of {} bytes",
                    char::from(h.tag),
                    h.total
                )));
            }
            if buf.len() - pos < h.total {
                break;
            }
            let body = &buf[pos + 5..pos + h.total];
            pending.borrow_mut().track.server(h.tag, Some(body));
            if h.tag == b'R' {
                if let Some(plus) = sasl_offers_plus(body) {
                    pending.borrow_mut().sasl = Some(plus);
                }
            } else if h.tag == b'K' {
                pending.borrow_mut().backend_key = codec::backend_key(body);
            } else if h.tag == b'Z' {
                let mut p = pending.borrow_mut();
                if p.authenticated {
                    p.groups_done += 1;
                    let done = p.groups_done;
                    p.poisons.retain(|x| x.group >= done);
                } else {
                    p.authenticated = true;
                    if let Some((pid, secret)) = p.backend_key.take() {
                        live.set_cancel_key(crate::conn::CancelKey::Postgres {
                            pid,
                            secret: secret.to_vec(),
                        });
                    }
                }
            } else if let Some(replacement) = take_poison(pending, body) {
                w.write_all(&buf[out..pos]).await?;
                w.write_all(&replacement).await?;
                out = pos + h.total;
            }
            pos += h.total;
        }
        w.write_all(&buf[out..pos]).await?;
        w.flush().await?;
        // Notices of held statements go out between whole messages.
        if scan.skip == 0 && !pending.borrow().notices.is_empty() {
            let notices = std::mem::take(&mut pending.borrow_mut().notices);
            for n in notices {
                w.write_all(&n).await?;
            }
            w.flush().await?;
        }
        counts
            .from_server
            .set(counts.from_server.get() + pos as u64);
        buf.advance(pos);
        // The read also ends when a notice is waiting (client_to_server,
        // polled in the same task, yields right after queueing one).
        let read = {
            let mut read = std::pin::pin!(read_more(r, &mut buf, last));
            std::future::poll_fn(|cx| {
                if scan.skip == 0 && !pending.borrow().notices.is_empty() {
                    return std::task::Poll::Ready(None);
                }
                read.as_mut().poll(cx).map(Some)
            })
            .await
        };
        if let Some(n) = read {
            last = n?;
            if last == 0 {
                w.shutdown().await?;
                return Ok(());
            }
        }
    }
}

/// The denial to send instead of this server error, when the error is the
/// one a stand-in provoked.
fn take_poison(pending: &RefCell<Pending>, body: &[u8]) -> Option<Bytes> {
    let fields = error_fields(body);
    let message = fields.message?;
    if fields.code != Some("42P01") {
        return None;
    }
    let mut p = pending.borrow_mut();
    let i = p.poisons.iter().position(|x| message.contains(&x.token))?;
    p.poisons.remove(i).map(|x| x.error)
}

/// For an AuthenticationSASL message: whether the server offers a
/// channel-binding (`-PLUS`) mechanism. `None` for other Authentication
/// messages.
fn sasl_offers_plus(body: &[u8]) -> Option<bool> {
    const AUTH_SASL: u32 = 10;
    let code = u32::from_be_bytes(body.get(..4)?.try_into().ok()?);
    if code != AUTH_SASL {
        return None;
    }
    Some(body[4..].split(|&b| b == 0).any(|m| m.ends_with(b"-PLUS")))
}

/// Why a SASLInitialResponse cannot succeed across the agent's two TLS
/// sessions, if it cannot. The client binds to the certificate it saw (the
/// agent's), the server checks against its own, and the downgrade flag
/// (`y`) is covered by the client's proof, so the agent cannot rewrite it.
fn channel_binding(body: &[u8], plus_offered: bool) -> Option<&'static str> {
    let nul = body.iter().position(|&b| b == 0)?;
    let mechanism = &body[..nul];
    let data = body.get(nul + 5..).unwrap_or_default();
    if mechanism.ends_with(b"-PLUS") || data.starts_with(b"p=") {
        Some("the client chose SCRAM channel binding (SCRAM-SHA-256-PLUS)")
    } else if data.starts_with(b"y") && plus_offered {
        Some(
            "the client supports channel binding but sees no -PLUS mechanism, which the server takes for a downgrade attack",
        )
    } else {
        None
    }
}

fn channel_binding_message(why: &str) -> String {
    format!(
        "interceptor: SCRAM channel binding cannot pass through the agent: {why}, and the binding \
         covers the TLS certificate this client saw, which is the agent's, not the server's. \
         Connect with channel_binding=disable, or set tls.server: disable on this target \
         (a plain server leg), or let the agent log in to the server for this workload (policy logins)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sasl(mechanisms: &[&str]) -> Vec<u8> {
        let mut body = 10u32.to_be_bytes().to_vec();
        for m in mechanisms {
            body.extend_from_slice(m.as_bytes());
            body.push(0);
        }
        body.push(0);
        body
    }

    fn initial(mechanism: &str, data: &str) -> Vec<u8> {
        let mut body = mechanism.as_bytes().to_vec();
        body.push(0);
        body.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        body.extend_from_slice(data.as_bytes());
        body
    }

    #[test]
    fn sasl_mechanism_lists() {
        assert_eq!(
            sasl_offers_plus(&sasl(&["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])),
            Some(true)
        );
        assert_eq!(sasl_offers_plus(&sasl(&["SCRAM-SHA-256"])), Some(false));
        // AuthenticationOk, MD5 and a short message are not SASL.
        assert_eq!(sasl_offers_plus(&0u32.to_be_bytes()), None);
        assert_eq!(sasl_offers_plus(&[0, 0, 0, 5, 1, 2, 3, 4]), None);
        assert_eq!(sasl_offers_plus(&[0, 0]), None);
    }

    #[test]
    fn channel_binding_choices() {
        let n = "n,,n=,r=abc";
        assert_eq!(channel_binding(&initial("SCRAM-SHA-256", n), true), None);
        assert!(
            channel_binding(
                &initial("SCRAM-SHA-256-PLUS", "p=tls-server-end-point,,n=,r=abc"),
                true
            )
            .unwrap()
            .contains("SCRAM-SHA-256-PLUS")
        );
        // Binding flag without the -PLUS name (a confused client) too.
        assert!(channel_binding(&initial("SCRAM-SHA-256", "p=tls-unique,,n=,r=x"), true).is_some());
        // "y": fine unless the server offered -PLUS (it would call that a
        // downgrade).
        assert_eq!(
            channel_binding(&initial("SCRAM-SHA-256", "y,,n=,r=x"), false),
            None
        );
        assert!(
            channel_binding(&initial("SCRAM-SHA-256", "y,,n=,r=x"), true)
                .unwrap()
                .contains("downgrade")
        );
        // Malformed: no mechanism terminator, nothing to say.
        assert_eq!(channel_binding(b"SCRAM", true), None);
        let msg = channel_binding_message("why");
        assert!(msg.contains("channel_binding=disable") && msg.contains("tls.server: disable"));
    }
}
