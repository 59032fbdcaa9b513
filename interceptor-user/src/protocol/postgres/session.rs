use std::{cell::RefCell, collections::VecDeque};

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};

use super::codec::{
    self, CodecError, StartupPacket, decode_header, decode_startup, error_fields, error_response,
};
use crate::proxy::{Counted, Guard, Hold, Outcome, Refusal, SessionError, Upstream};

/// How long a client may take to send its startup packet.
const STARTUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Largest server message the agent inspects (ErrorResponse,
/// BackendKeyData, ReadyForQuery); everything else streams through.
const MAX_INSPECTED_SERVER_FRAME: usize = 1024 * 1024;
const READ_CHUNK: usize = 64 * 1024;
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

#[derive(Default)]
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
}

/// Serves one client: startup, authentication relayed untouched, then
/// every Query, Parse and FunctionCall decided by the guard.
///
/// # Errors
/// I/O failures, the upstream connect, and protocol violations by either
/// peer (the client then gets a FATAL 08P01 where that is still possible).
pub async fn serve(
    guard: &mut Guard,
    client: &mut TcpStream,
    upstream: &Upstream,
    counts: &Counted,
) -> Result<(), SessionError> {
    let mut cbuf = BytesMut::with_capacity(8192);
    let startup = loop {
        match decode_startup(&mut cbuf) {
            Ok(Some(StartupPacket::Ssl | StartupPacket::GssEnc)) => {
                // The workload-to-agent hop never leaves the host: no TLS
                // here, the client carries on in plain text (sslmode=prefer).
                client.write_all(b"N").await?;
            }
            Ok(Some(packet)) => break packet,
            Ok(None) => {
                let n = tokio::time::timeout(STARTUP_TIMEOUT, client.read_buf(&mut cbuf))
                    .await
                    .map_err(|_| {
                        SessionError::ClientProtocol("no startup packet within 60s".into())
                    })??;
                if n == 0 {
                    return Ok(());
                }
            }
            Err(e) => return Err(fatal(client, &e).await),
        }
    };
    let startup = match startup {
        StartupPacket::Cancel { pid, secret } => {
            return cancel(guard, upstream, pid, &secret).await;
        }
        StartupPacket::Startup(m) => m,
        StartupPacket::Ssl | StartupPacket::GssEnc => return Ok(()),
    };
    guard.set_session(&startup.user, &startup.database);
    guard.record_session(startup.application_name.as_deref());

    let mut server = upstream.connect().await?;
    server.write_all(&startup.bytes).await?;
    counts
        .from_client
        .set(counts.from_client.get() + startup.bytes.len() as u64);

    let pending = RefCell::new(Pending::default());
    let max = guard.max_frame();
    let live = guard.live();
    let result = {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        tokio::try_join!(
            client_to_server(&mut cr, &mut sw, cbuf, guard, &pending, max, counts),
            server_to_client(&mut sr, &mut cw, &pending, &live, counts),
        )
    };
    match result {
        Ok(_) => Ok(()),
        Err(SessionError::ClientProtocol(e)) => {
            let msg = format!("interceptor: invalid message from client: {e}");
            let _ = client
                .write_all(&error_response(b'E', "FATAL", "08P01", &msg, None, None))
                .await;
            Err(SessionError::ClientProtocol(e))
        }
        Err(SessionError::ServerProtocol(e)) => {
            let msg = format!("interceptor: invalid message from server: {e}");
            let _ = client
                .write_all(&error_response(b'E', "FATAL", "08P01", &msg, None, None))
                .await;
            Err(SessionError::ServerProtocol(e))
        }
        Err(e) => Err(e),
    }
}

async fn fatal(client: &mut TcpStream, e: &CodecError) -> SessionError {
    let msg = format!("interceptor: invalid startup packet: {e}");
    let _ = client
        .write_all(&error_response(b'E', "FATAL", "08P01", &msg, None, None))
        .await;
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

/// Counts and drops the `upto` bytes already forwarded, then reads more;
/// returns the bytes read (0 at end of stream).
async fn refill<R>(
    r: &mut R,
    buf: &mut BytesMut,
    upto: usize,
    counter: &std::cell::Cell<u64>,
) -> std::io::Result<usize>
where
    R: AsyncRead + Unpin,
{
    counter.set(counter.get() + upto as u64);
    buf.advance(upto);
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(READ_CHUNK);
    }
    r.read_buf(buf).await
}

async fn client_to_server<R, W>(
    r: &mut R,
    w: &mut W,
    mut buf: BytesMut,
    guard: &mut Guard,
    pending: &RefCell<Pending>,
    max: usize,
    counts: &Counted,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut scan = Scanner::default();
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
            if !matches!(h.tag, b'Q' | b'P' | b'F') {
                if h.tag == b'S' {
                    pending.borrow_mut().groups_sent += 1;
                }
                scan.pass(h);
                continue;
            }
            if buf.len() - pos < h.total {
                buf.reserve(h.total - (buf.len() - pos));
                break;
            }
            let refusal = match decide(guard, h.tag, &buf[pos + 5..pos + h.total])? {
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
                    // Let server_to_client (same task) see the notice now.
                    tokio::task::yield_now().await;
                    held(r, &mut buf, &mut hold, pos + h.total + MAX_HELD_INPUT).await?
                }
            };
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
            if h.tag != b'P' {
                // Query and FunctionCall each end a group (one ReadyForQuery).
                pending.borrow_mut().groups_sent += 1;
            }
            pos += h.total;
        }
        w.write_all(&buf[out..pos]).await?;
        if refill(r, &mut buf, pos, &counts.from_client).await? == 0 {
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

/// Decides one Query, Parse or FunctionCall.
fn decide(guard: &mut Guard, tag: u8, body: &[u8]) -> Result<Outcome, SessionError> {
    let bad = |e: CodecError| SessionError::ClientProtocol(e.to_string());
    match tag {
        b'Q' => Ok(guard.check(codec::query_sql(body).map_err(bad)?)),
        b'P' => Ok(guard.check(codec::parse_message(body).map_err(bad)?.sql)),
        _ => {
            let oid = codec::function_call_oid(body).map_err(bad)?;
            Ok(guard.check_call(&format!("oid:{oid}")))
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

async fn server_to_client<R, W>(
    r: &mut R,
    w: &mut W,
    pending: &RefCell<Pending>,
    live: &crate::proxy::LiveConn,
    counts: &Counted,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut scan = Scanner::default();
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
                b'K' => !pending.borrow().authenticated,
                b'E' => !pending.borrow().poisons.is_empty(),
                _ => false,
            };
            if !inspect {
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
            if h.tag == b'K' {
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
                        live.set_cancel_key(crate::proxy::CancelKey::Postgres {
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
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(READ_CHUNK);
        }
        // The read also ends when a notice is waiting (client_to_server,
        // polled in the same task, yields right after queueing one).
        let read = {
            let mut read = std::pin::pin!(r.read_buf(&mut buf));
            std::future::poll_fn(|cx| {
                if scan.skip == 0 && !pending.borrow().notices.is_empty() {
                    return std::task::Poll::Ready(None);
                }
                read.as_mut().poll(cx).map(Some)
            })
            .await
        };
        if let Some(n) = read
            && n? == 0
        {
            w.shutdown().await?;
            return Ok(());
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
