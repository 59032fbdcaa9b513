use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{
    codec::{
        self, ClientHello, CodecError, HEADER, MAX_PACKET, Message, caps, com, command_name,
        decode_header, decode_message, err_packet, quote_ident,
    },
    login::{self, LoggedIn},
    reply::{Expect, Reply, Results, Step},
};
use crate::{
    policy::{LoginSpec, ServerTls},
    protocol::{LoginError, READ_CHUNK, SMALL_READ, make_room},
    proxy::{
        Completion, Counted, ExecLog, Guard, Hold, LoginPlan, Outcome, Prepared, Refusal,
        SessionError, Stream, Upstream, tls_from_client, tls_to_server,
    },
    tls::Legs,
};

/// How long the server may take to greet, and the client to answer.
const GREETING_TIMEOUT: Duration = Duration::from_secs(10);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest greeting, handshake response or authentication packet.
const MAX_HANDSHAKE: usize = 64 * 1024;
/// Client input buffered while a statement awaits approval; beyond this the
/// agent stops reading until the decision.
const MAX_HELD_INPUT: usize = 1024 * 1024;

/// ER_TABLEACCESS_DENIED_ERROR: how every denial looks to clients.
const ER_DENIED: u16 = 1142;
const DENIED_STATE: &str = "42000";
const ER_HANDSHAKE_ERROR: u16 = 1043;
/// ER_ACCESS_DENIED_ERROR: a login refused (by the agent or, for a
/// brokered one, the server).
const ER_ACCESS_DENIED: u16 = 1045;
const ACCESS_STATE: &str = "28000";
const ER_NET_PACKET_TOO_LARGE: u16 = 1153;
const ER_NET_PACKETS_OUT_OF_ORDER: u16 = 1156;
const ER_NET_READ_ERROR: u16 = 1158;
const NET_STATE: &str = "08S01";

/// MariaDB's COM_STMT_EXECUTE id for "the statement prepared last".
const LAST_PREPARED: u32 = u32::MAX;

/// Serves one client: the handshake with capabilities adjusted,
/// authentication relayed untouched, then every command decided.
///
/// # Errors
/// I/O failures, the upstream connect, and protocol violations by either
/// peer (the client then gets an ERR packet where that is still possible).
pub async fn serve(
    guard: &mut Guard,
    mut client: Stream,
    upstream: &Upstream,
    counts: &Counted,
) -> Result<(), SessionError> {
    // The client sends nothing before the server's greeting.
    guard.join_local_bypass(&client);
    let server = match upstream.connect().await {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("interceptor: {e}");
            let _ = client
                .write_all(&err_packet(0, ER_HANDSHAKE_ERROR, None, &msg))
                .await;
            return Err(e);
        }
    };
    let max = guard.max_frame();
    let log = guard.exec_log();
    let mut session = Session {
        log,
        guard,
        client: &mut client,
        server,
        upstream,
        seq_delta: 0,
        counts,
        cbuf: BytesMut::with_capacity(SMALL_READ),
        sbuf: BytesMut::with_capacity(SMALL_READ),
        max,
        caps: 0,
        scramble: Vec::new(),
        server_plugin: None,
        statements: HashMap::new(),
        last_prepared: None,
    };
    session.run().await
}

/// One client connection and its server connection.
struct Session<'a> {
    guard: &'a mut Guard,
    /// Where executions of prepared statements are reported.
    log: ExecLog,
    client: &'a mut Stream,
    server: Stream,
    upstream: &'a Upstream,
    /// During the handshake, the server's sequence ids minus the client's:
    /// a TLS switch takes one packet (the SSL request) on its leg only.
    seq_delta: u8,
    counts: &'a Counted,
    /// Bytes from the client not yet forwarded or refused.
    cbuf: BytesMut,
    /// Bytes from the server not yet forwarded.
    sbuf: BytesMut,
    max: usize,
    /// Capabilities both sides agreed on, after the agent's adjustment.
    caps: u64,
    /// The greeting's nonce and default plugin: a brokered login answers
    /// them (COM_CHANGE_USER too).
    scramble: Vec<u8>,
    server_plugin: Option<String>,
    /// Prepared statements the agent allowed, by the server's ids, with
    /// the decision that allowed them.
    statements: HashMap<u32, Prepared>,
    /// The last COM_STMT_PREPARE's statement, if the agent allowed it and
    /// the server accepted it (MariaDB executes id 0xFFFFFFFF as this).
    last_prepared: Option<u32>,
}

/// How a reply ended.
struct Finished {
    ok: bool,
    prepared: Option<u32>,
    /// What each result said (rows, error).
    results: Results,
}

/// An execution sent to the server: reported as unfinished if the
/// session ends before its reply does.
struct InFlight<'a> {
    log: &'a ExecLog,
    prepared: Prepared,
    started: Instant,
    done: Option<Completion>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let done = self.done.unwrap_or(Completion::Unfinished);
        self.log.executed(self.prepared, done, self.started);
    }
}

impl Session<'_> {
    async fn run(&mut self) -> Result<(), SessionError> {
        if !self.handshake().await? {
            return Ok(());
        }
        while let Some(msg) = self.next_command().await? {
            if !self.command(msg).await? {
                break;
            }
        }
        let _ = self.server.shutdown().await;
        let _ = self.client.flush().await;
        let _ = self.client.shutdown().await;
        Ok(())
    }

    /// Greeting, handshake response and authentication. False when the
    /// session ends there (the server refused the client, or either left).
    async fn handshake(&mut self) -> Result<bool, SessionError> {
        let greeting = loop {
            // Anything but a first packet of plausible size is no greeting.
            if let Some(h) = decode_header(&self.sbuf)
                && (h.seq != 0 || h.len == 0 || h.len > MAX_HANDSHAKE)
            {
                let e = CodecError::NotMysql(self.sbuf.iter().take(16).copied().collect());
                return Err(self.bad_greeting(&e.to_string()).await);
            }
            match decode_message(&mut self.sbuf, 0, MAX_HANDSHAKE) {
                Ok(Some(m)) => break m,
                Ok(None) => {}
                Err(e) => return Err(self.bad_greeting(&e.to_string()).await),
            }
            make_room(&mut self.sbuf, 0);
            let read = tokio::time::timeout(GREETING_TIMEOUT, self.server.read_buf(&mut self.sbuf));
            match read.await {
                Ok(Ok(0)) => {
                    return Err(self
                        .bad_greeting("the server closed the connection before greeting")
                        .await);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    return Err(self
                        .bad_greeting("the server sent no greeting within 10s")
                        .await);
                }
            }
        };
        self.count_server(greeting.bytes.len());
        if greeting.first_byte() == Some(0xff) {
            // "Too many connections", "Host is blocked": the server's word.
            self.client.write_all(&greeting.bytes).await?;
            self.client.flush().await?;
            return Ok(false);
        }
        let mut bytes = BytesMut::from(&greeting.bytes[..]);
        let payload = bytes.get_mut(HEADER..).unwrap_or_default();
        // TLS is offered to the client only where the agent has it towards
        // the server too (or the target says `disable`): a client that
        // merely prefers TLS then carries on in plain text with a plain
        // server, as it would directly.
        let disable = self.guard.info.target.tls.server == ServerTls::Disable;
        // Never on a unix socket: the agent has no TLS there.
        let unix = self.client.is_unix();
        let server_info = match codec::adjust_greeting(payload).and_then(|g| {
            if !unix && (disable || g.capabilities & caps::SSL != 0) {
                codec::offer_ssl(payload)?;
            }
            Ok(g)
        }) {
            Ok(g) => g,
            Err(e) => return Err(self.bad_greeting(&e.to_string()).await),
        };
        self.guard
            .live()
            .set_cancel_key(crate::conn::CancelKey::Mysql {
                thread_id: server_info.connection_id,
            });
        self.client.write_all(&bytes).await?;
        self.client.flush().await?;

        let offered = !unix && (disable || server_info.capabilities & caps::SSL != 0);
        let mut legs = Legs::default();
        let mut expect_seq = 1u8;
        let (response, mut bytes, hello) = loop {
            let Some(m) = self.handshake_packet(expect_seq).await? else {
                return Ok(false);
            };
            self.count_client(m.bytes.len());
            let reply_seq = m.last_seq.wrapping_add(1);
            let mut bytes = BytesMut::from(&m.bytes[..]);
            let hello = if m.first_seq == m.last_seq {
                codec::adjust_handshake_response(bytes.get_mut(HEADER..).unwrap_or_default())
            } else {
                Err(CodecError::Malformed("handshake response"))
            };
            match hello {
                Ok(ClientHello::Response(r)) => break (m, bytes, r),
                Ok(ClientHello::SslRequest)
                    if offered && legs.client.is_none() && self.cbuf.is_empty() =>
                {
                    let Some(tcp) = self.client.take_plain() else {
                        return Err(SessionError::client_tls("no plain socket to upgrade"));
                    };
                    let target = self.guard.info.target.clone();
                    let tls = self.guard.tls_context();
                    let (s, info) =
                        tls_from_client(&tls, &target, self.upstream.dst, tcp, false).await?;
                    *self.client = s;
                    legs.client = Some(info);
                    expect_seq = reply_seq;
                }
                Ok(ClientHello::SslRequest) => {
                    // Bytes sent before the handshake would be taken as if
                    // they had come over TLS.
                    let e = CodecError::Malformed(
                        "SSL request (not offered, repeated, or followed by data before the TLS handshake)",
                    );
                    return Err(self.client_violation(reply_seq, &e).await);
                }
                Err(e) => return Err(self.client_violation(reply_seq, &e).await),
            }
        };
        let reply_seq = response.last_seq.wrapping_add(1);
        self.caps = hello.capabilities & server_info.capabilities;
        self.scramble = server_info.scramble;
        self.server_plugin = server_info.auth_plugin;
        self.guard
            .set_session(&hello.user, hello.database.as_deref().unwrap_or(""));
        let broker = match self.guard.plan_login(&hello.user) {
            LoginPlan::Passthrough => None,
            LoginPlan::Brokered(entry) => Some(entry),
            LoginPlan::Refused(msg) => {
                self.access_denied(reply_seq, &msg).await;
                return Err(SessionError::Refused(msg));
            }
        };
        let server_ssl = server_info.capabilities & caps::SSL != 0;
        if let Err(e) = self.server_leg(server_ssl, &mut bytes, &mut legs).await {
            let msg = match &e {
                SessionError::Refused(m) => m.clone(),
                e => format!("interceptor: {e}"),
            };
            let _ = self
                .client
                .write_all(&err_packet(
                    reply_seq,
                    ER_HANDSHAKE_ERROR,
                    Some(NET_STATE),
                    &msg,
                ))
                .await;
            let _ = self.client.flush().await;
            return Err(e);
        }
        // The response goes on with the server leg's sequence id; replies
        // come back renumbered for the client until authentication ends.
        let server_seq = 1 + u8::from(self.server.is_tls());
        self.seq_delta = server_seq.wrapping_sub(response.last_seq);
        if let Some(b) = bytes.get_mut(3) {
            *b = server_seq;
        }
        self.guard.set_tls(legs);
        if let Some(entry) = broker {
            self.seq_delta = 0;
            let response = bytes.get(HEADER..).unwrap_or_default().to_vec();
            let first =
                |plugin: &str, auth: &[u8]| codec::response_with_auth(&response, plugin, auth);
            self.broker(&entry, server_seq, reply_seq, first).await?;
            self.guard.record_session(hello.program_name.as_deref());
            return Ok(true);
        }
        self.guard.record_session(hello.program_name.as_deref());
        self.server.write_all(&bytes).await?;
        let done = self.reply(Expect::Auth, reply_seq, None).await;
        self.seq_delta = 0;
        Ok(done?.ok)
    }

    /// The agent's own login as `entry`'s user: `first` builds the packet
    /// carrying its first answer (the handshake response or COM_CHANGE_USER,
    /// sent with sequence id `seq`), the exchange runs to the server's OK,
    /// and the client gets that OK with `reply_seq`. Whatever the client
    /// answered itself is never sent. A failure is audited and the client
    /// told (error 1045, or the server's own error number); the session
    /// then ends.
    async fn broker(
        &mut self,
        entry: &LoginSpec,
        seq: u8,
        reply_seq: u8,
        first: impl FnOnce(&str, &[u8]) -> Result<Vec<u8>, CodecError>,
    ) -> Result<(), SessionError> {
        let user = entry.db_user.clone();
        let secret = match entry.password() {
            Ok(s) => s,
            Err(e) => {
                self.guard.record_login_failed("secret", None, &e);
                let msg = format!(
                    "interceptor: the agent cannot log in as {user:?} for this workload: its secret: {e}"
                );
                self.access_denied(reply_seq, &msg).await;
                return Err(SessionError::Refused(msg));
            }
        };
        let tls = self.server.is_tls();
        let plugin = login::first_plugin(self.server_plugin.as_deref(), tls);
        let scramble = self.scramble.clone();
        let attempt = async {
            let auth = login::answer(plugin, &scramble, &secret, tls)?;
            let payload = first(plugin, &auth)
                .map_err(|e| LoginError::Unsupported(format!("the client's packet: {e}")))?;
            self.server.write_all(&codec::packet(seq, &payload)).await?;
            self.server.flush().await?;
            let exchange = login::login(
                &mut self.server,
                &mut self.sbuf,
                seq.wrapping_add(1),
                plugin,
                scramble.clone(),
                &secret,
                tls,
            );
            tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange)
                .await
                .unwrap_or_else(|_| {
                    Err(LoginError::Protocol(format!(
                        "no answer to the login within {}s",
                        HANDSHAKE_TIMEOUT.as_secs()
                    )))
                })
        };
        match attempt.await {
            Ok(LoggedIn { ok, method }) => {
                self.guard.set_login_method(method);
                let ok = codec::packet(reply_seq, &ok);
                self.count_server(ok.len());
                self.client.write_all(&ok).await?;
                self.client.flush().await?;
                Ok(())
            }
            Err(e) => {
                let (code, error) = match &e {
                    LoginError::Refused { code, message } => (Some(code.as_str()), message.clone()),
                    other => (None, other.to_string()),
                };
                self.guard.record_login_failed("server", code, &error);
                let msg = format!(
                    "interceptor: the server refused the agent's login as {user:?}: {error}"
                );
                let number = code
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(ER_ACCESS_DENIED);
                let _ = self
                    .client
                    .write_all(&err_packet(reply_seq, number, Some(ACCESS_STATE), &msg))
                    .await;
                let _ = self.client.flush().await;
                Err(SessionError::Refused(msg))
            }
        }
    }

    /// Error 1045 to the client: a login the agent refuses.
    async fn access_denied(&mut self, seq: u8, msg: &str) {
        let _ = self
            .client
            .write_all(&err_packet(seq, ER_ACCESS_DENIED, Some(ACCESS_STATE), msg))
            .await;
        let _ = self.client.flush().await;
    }

    /// A whole handshake packet from the client with sequence id `seq`;
    /// `None` when the client left without sending one.
    ///
    /// The first packet is read exactly, never beyond its end: a client
    /// that asks for TLS sends its ClientHello right after the SSL request
    /// without waiting, and those bytes belong to the TLS handshake.
    async fn handshake_packet(&mut self, seq: u8) -> Result<Option<Message>, SessionError> {
        let exact = seq == 1;
        loop {
            match decode_message(&mut self.cbuf, seq, MAX_HANDSHAKE) {
                Ok(Some(m)) => return Ok(Some(m)),
                Ok(None) => {}
                Err(e) => return Err(self.client_violation(seq.wrapping_add(1), &e).await),
            }
            let want = decode_header(&self.cbuf)
                .map_or(HEADER, |h| HEADER + h.len)
                .saturating_sub(self.cbuf.len())
                .max(1);
            let mut chunk = [0u8; 4096];
            let limit = if exact {
                want.min(chunk.len())
            } else {
                chunk.len()
            };
            let read = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                let n = self.client.read(&mut chunk[..limit]).await?;
                self.cbuf.extend_from_slice(&chunk[..n]);
                Ok::<usize, std::io::Error>(n)
            });
            match read.await {
                Ok(Ok(0)) => {
                    if self.cbuf.is_empty() {
                        return Ok(None);
                    }
                    return Err(mid_packet(&self.cbuf));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    return Err(SessionError::ClientProtocol(
                        "no handshake response within 60s".into(),
                    ));
                }
            }
        }
    }

    /// Switches the server leg to TLS as the target's `tls.server` says
    /// (the SSL request packet, then the handshake); `response` is the
    /// client's handshake response, whose capabilities then say TLS too.
    async fn server_leg(
        &mut self,
        server_ssl: bool,
        response: &mut BytesMut,
        legs: &mut Legs,
    ) -> Result<(), SessionError> {
        let target = self.guard.info.target.clone();
        let mode = target.tls.server;
        let dst = self.upstream.dst;
        let client_tls = legs.client.is_some();
        let use_tls = match mode {
            ServerTls::Disable => {
                if client_tls {
                    legs.server_plain = Some("tls.server: disable");
                }
                false
            }
            _ if server_ssl => true,
            m if m.requires_tls() => {
                return Err(SessionError::Refused(format!(
                    "interceptor: the server at {dst} does not offer TLS, and target {:?} has tls.server: {m}",
                    target.name
                )));
            }
            _ if client_tls => {
                return Err(SessionError::Refused(format!(
                    "interceptor: this connection uses TLS, but the server at {dst} does not offer TLS; \
                     the agent does not send it on in clear (set tls.server: disable on target {:?} to allow that)",
                    target.name
                )));
            }
            _ => false,
        };
        if !use_tls {
            return Ok(());
        }
        let payload = response.get_mut(HEADER..).unwrap_or_default();
        codec::request_ssl(payload);
        let request = codec::ssl_request(payload).ok_or(SessionError::ClientProtocol(
            "short handshake response".into(),
        ))?;
        self.server.write_all(&codec::packet(1, &request)).await?;
        let Some(tcp) = self.server.take_plain() else {
            return Err(SessionError::server_tls("no plain socket to upgrade"));
        };
        let tls = self.guard.tls_context();
        let (s, info) = tls_to_server(&tls, &target, dst, tcp).await?;
        self.server = s;
        legs.server = Some(info);
        Ok(())
    }

    /// Tells the client the server is no MySQL server, before its greeting.
    async fn bad_greeting(&mut self, why: &str) -> SessionError {
        let msg = format!(
            "interceptor: the server at {} did not greet as a MySQL server: {why}",
            self.guard.info.dst
        );
        let _ = self
            .client
            .write_all(&err_packet(0, ER_HANDSHAKE_ERROR, None, &msg))
            .await;
        let _ = self.client.flush().await;
        SessionError::ServerProtocol(why.to_owned())
    }

    /// Tells the client what it did wrong, then ends the session.
    async fn client_violation(&mut self, seq: u8, e: &CodecError) -> SessionError {
        let code = match e {
            CodecError::OutOfOrder { .. } => ER_NET_PACKETS_OUT_OF_ORDER,
            CodecError::FrameTooLarge { .. } => ER_NET_PACKET_TOO_LARGE,
            _ => ER_NET_READ_ERROR,
        };
        let msg = format!("interceptor: invalid packet from client: {e}");
        let _ = self
            .client
            .write_all(&err_packet(seq, code, Some(NET_STATE), &msg))
            .await;
        let _ = self.client.flush().await;
        SessionError::ClientProtocol(e.to_string())
    }

    /// Tells the client the server broke the protocol, then ends the session.
    async fn server_violation(&mut self, seq: u8, e: &CodecError) -> SessionError {
        let msg = format!("interceptor: invalid reply from server: {e}");
        let _ = self
            .client
            .write_all(&err_packet(seq, ER_NET_READ_ERROR, Some(NET_STATE), &msg))
            .await;
        let _ = self.client.flush().await;
        SessionError::ServerProtocol(e.to_string())
    }

    /// Pushes out what TLS buffered on either leg before waiting for input
    /// (nothing to do on plain TCP).
    async fn flush(&mut self) -> std::io::Result<()> {
        self.client.flush().await?;
        self.server.flush().await
    }

    fn count_client(&self, n: usize) {
        let c = &self.counts.from_client;
        c.set(c.get() + n as u64);
    }

    fn count_server(&self, n: usize) {
        let c = &self.counts.from_server;
        c.set(c.get() + n as u64);
    }

    /// The client's next whole command; `None` when either side is done.
    /// While waiting, whatever the server sends unasked is passed on (an
    /// ERR before it closes the connection) or is a violation.
    async fn next_command(&mut self) -> Result<Option<Message>, SessionError> {
        loop {
            match decode_message(&mut self.cbuf, 0, self.max) {
                Ok(Some(m)) => return Ok(Some(m)),
                Ok(None) => {}
                Err(e) => {
                    let seq = decode_header(&self.cbuf).map_or(1, |h| h.seq.wrapping_add(1));
                    return Err(self.client_violation(seq, &e).await);
                }
            }
            self.flush().await?;
            if self.cbuf.is_empty()
                && self.sbuf.is_empty()
                && self.client.waits_unbuffered()
                && self.server.waits_unbuffered()
            {
                // Between commands, while both sides are silent, no read
                // buffers are held: an idle connection holds little.
                crate::protocol::release(&mut self.cbuf);
                crate::protocol::release(&mut self.sbuf);
                tokio::select! {
                    r = self.client.wait_input() => r?,
                    r = self.server.wait_input() => r?,
                }
            }
            make_room(&mut self.cbuf, 0);
            make_room(&mut self.sbuf, 0);
            tokio::select! {
                n = self.client.read_buf(&mut self.cbuf) => {
                    if n? == 0 {
                        if self.cbuf.is_empty() {
                            return Ok(None);
                        }
                        return Err(mid_packet(&self.cbuf));
                    }
                }
                n = self.server.read_buf(&mut self.sbuf) => {
                    if n? == 0 {
                        let _ = self.client.shutdown().await;
                        return Ok(None);
                    }
                    self.unsolicited().await?;
                }
            }
        }
    }

    /// Server packets between replies: only an ERR (a server says why it
    /// closes the connection) is passed on.
    async fn unsolicited(&mut self) -> Result<(), SessionError> {
        while let Some(h) = decode_header(&self.sbuf) {
            let Some(&first) = self.sbuf.get(HEADER) else {
                return Ok(());
            };
            if first != 0xff {
                let e =
                    CodecError::Malformed("packet from the server while no command was running");
                return Err(self.server_violation(0, &e).await);
            }
            if self.sbuf.len() < HEADER + h.len {
                self.sbuf.reserve(HEADER + h.len - self.sbuf.len());
                return Ok(());
            }
            let p = self.sbuf.split_to(HEADER + h.len);
            self.count_server(p.len());
            self.client.write_all(&p).await?;
        }
        Ok(())
    }

    /// Sends a whole client message on to the server.
    async fn forward(&mut self, msg: &Message) -> Result<(), SessionError> {
        self.count_client(msg.bytes.len());
        self.server.write_all(&msg.bytes).await?;
        Ok(())
    }

    /// Answers a refused command in the server's place.
    async fn refuse(&mut self, msg: &Message, r: &Refusal) -> Result<(), SessionError> {
        self.count_client(msg.bytes.len());
        let seq = msg.last_seq.wrapping_add(1);
        let err = err_packet(seq, ER_DENIED, Some(DENIED_STATE), &r.message);
        self.client.write_all(&err).await?;
        Ok(())
    }

    /// Decides `sql` for `msg`; forwards it and relays the reply when
    /// allowed. `None` when refused.
    async fn decided(
        &mut self,
        msg: &Message,
        sql: &str,
        expect: Expect,
    ) -> Result<Option<Finished>, SessionError> {
        // A COM_QUERY's records wait for the server's answer to each
        // statement.
        let (outcome, mut records) = if msg.payload().first() == Some(&com::QUERY) {
            self.guard.check_query(sql)
        } else {
            (self.guard.check(sql), None)
        };
        let refusal = match outcome {
            Outcome::Forward => None,
            Outcome::Refuse(r) => Some(r),
            Outcome::Hold(mut hold) => self.held(&mut hold).await?,
        };
        match refusal {
            None => {
                self.forward(msg).await?;
                let seq = msg.last_seq.wrapping_add(1);
                let finished = self.reply(expect, seq, Some(sql)).await?;
                if let Some(mut r) = records.take() {
                    for c in finished.results.iter() {
                        r.answer(c);
                    }
                    r.finish();
                }
                Ok(Some(finished))
            }
            Some(r) => {
                self.refuse(msg, &r).await?;
                Ok(None)
            }
        }
    }

    /// Waits while a statement awaits approval. MySQL has no channel to
    /// tell the client, which simply waits. Client input is buffered, not
    /// acted on; the client hanging up ends the session (and withdraws the
    /// approval when `hold` drops).
    async fn held(&mut self, hold: &mut Hold) -> Result<Option<Refusal>, SessionError> {
        self.flush().await?;
        loop {
            let room = self.cbuf.len() < self.max.min(MAX_HELD_INPUT);
            if room && self.cbuf.capacity() - self.cbuf.len() < 1024 {
                self.cbuf.reserve(8192);
            }
            tokio::select! {
                r = hold.wait() => return Ok(r),
                n = self.client.read_buf(&mut self.cbuf), if room => {
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

    /// Forwards a command the policy has nothing to say about and relays
    /// its reply (`Expect` `None`: the command has none).
    async fn passed(
        &mut self,
        msg: &Message,
        expect: Option<Expect>,
    ) -> Result<Option<Finished>, SessionError> {
        self.forward(msg).await?;
        match expect {
            Some(e) => {
                let seq = msg.last_seq.wrapping_add(1);
                Ok(Some(self.reply(e, seq, None).await?))
            }
            None => Ok(None),
        }
    }

    /// Refuses a message that is no statement (an unsupported command, a
    /// statement id the agent never allowed).
    async fn refuse_other(
        &mut self,
        msg: &Message,
        what: &str,
        reason: &str,
    ) -> Result<(), SessionError> {
        let r = self.guard.refuse(what, reason);
        self.refuse(msg, &r).await
    }

    /// The statement a prepared-statement command names, if the agent
    /// allowed it.
    fn allowed_statement(&self, id: u32) -> Option<(u32, Prepared)> {
        let id = if id == LAST_PREPARED {
            self.last_prepared?
        } else {
            id
        };
        self.statements.get(&id).map(|p| (id, *p))
    }

    fn forget_statements(&mut self) {
        self.statements.clear();
        self.last_prepared = None;
        // The server deallocated them: their windows end here.
        self.log.flush();
    }

    /// After COM_CHANGE_USER succeeded: a fresh session as the new user.
    fn changed_user(&mut self, change: &codec::ChangeUser) {
        self.forget_statements();
        self.guard
            .reset_session(&change.user, change.database.as_deref().unwrap_or(""));
        self.guard.record_session(None);
    }

    /// Handles one command. False when the session ends (COM_QUIT).
    #[allow(clippy::too_many_lines)]
    async fn command(&mut self, msg: Message) -> Result<bool, SessionError> {
        let payload = msg.payload();
        let Some((&cmd, body)) = payload.split_first() else {
            let e = CodecError::Malformed("empty command packet");
            return Err(self
                .client_violation(msg.last_seq.wrapping_add(1), &e)
                .await);
        };
        let statement = match cmd {
            com::STMT_EXECUTE
            | com::STMT_FETCH
            | com::STMT_RESET
            | com::STMT_SEND_LONG_DATA
            | com::STMT_CLOSE => match codec::statement_id(&payload) {
                Some(id) => id,
                None => {
                    let e = CodecError::Malformed("statement command too short");
                    return Err(self
                        .client_violation(msg.last_seq.wrapping_add(1), &e)
                        .await);
                }
            },
            _ => 0,
        };
        match cmd {
            com::QUIT => {
                self.forward(&msg).await?;
                return Ok(false);
            }
            com::QUERY => {
                let sql = String::from_utf8_lossy(body);
                let new_db = use_database(&sql);
                let done = self.decided(&msg, &sql, Expect::Results).await?;
                if let (Some(Finished { ok: true, .. }), Some(db)) = (done, new_db) {
                    self.guard.set_database(&db);
                }
            }
            com::STMT_PREPARE => {
                let sql = String::from_utf8_lossy(body);
                self.last_prepared = None;
                if let Some(Finished {
                    ok: true,
                    prepared: Some(id),
                    ..
                }) = self.decided(&msg, &sql, Expect::Prepare).await?
                {
                    let prepared = self.guard.last_decision();
                    if let Some(old) = self.statements.insert(id, prepared) {
                        // The server reused an id it had freed.
                        self.log.closed(old);
                    }
                    self.last_prepared = Some(id);
                }
            }
            com::STMT_EXECUTE => {
                if let Some((_, prepared)) = self.allowed_statement(statement) {
                    let log = self.log.clone();
                    let mut flight = InFlight {
                        log: &log,
                        prepared,
                        started: Instant::now(),
                        done: None,
                    };
                    if let Some(f) = self.passed(&msg, Some(Expect::Results)).await? {
                        flight.done = Some(f.results.completion());
                    }
                } else {
                    let what = format!("{} of statement {statement}", command_name(cmd));
                    self.refuse_other(&msg, &what, &unknown_statement(statement))
                        .await?;
                }
            }
            com::STMT_FETCH | com::STMT_RESET => {
                if self.allowed_statement(statement).is_some() {
                    let expect = match cmd {
                        com::STMT_EXECUTE => Expect::Results,
                        com::STMT_FETCH => Expect::Rows,
                        _ => Expect::OnePacket,
                    };
                    self.passed(&msg, Some(expect)).await?;
                } else {
                    let what = format!("{} of statement {statement}", command_name(cmd));
                    self.refuse_other(&msg, &what, &unknown_statement(statement))
                        .await?;
                }
            }
            com::STMT_SEND_LONG_DATA => {
                // No reply either way: data for a statement the agent never
                // allowed goes nowhere, and its execute is refused.
                if self.allowed_statement(statement).is_some() {
                    self.passed(&msg, None).await?;
                } else {
                    let what = format!("COM_STMT_SEND_LONG_DATA of statement {statement}");
                    let _ = self.guard.refuse(&what, &unknown_statement(statement));
                    self.count_client(msg.bytes.len());
                }
            }
            com::STMT_CLOSE => {
                if let Some((id, prepared)) = self.allowed_statement(statement) {
                    self.statements.remove(&id);
                    if self.last_prepared == Some(id) {
                        self.last_prepared = None;
                    }
                    self.log.closed(prepared);
                    self.passed(&msg, None).await?;
                } else {
                    self.count_client(msg.bytes.len());
                }
            }
            com::INIT_DB => {
                let db = String::from_utf8_lossy(body).into_owned();
                let before = self.guard.database.clone();
                let sql = format!("USE {}", quote_ident(&db));
                match self.decided(&msg, &sql, Expect::OnePacket).await? {
                    Some(Finished { ok: true, .. }) => self.guard.set_database(&db),
                    Some(_) => self.guard.set_database(&before),
                    None => {}
                }
            }
            com::FIELD_LIST => {
                let table = codec::cstr(body).map_or(body, |(t, _)| t);
                let sql = format!(
                    "SHOW COLUMNS FROM {}",
                    quote_ident(&String::from_utf8_lossy(table))
                );
                self.decided(&msg, &sql, Expect::Rows).await?;
            }
            com::CREATE_DB | com::DROP_DB => {
                let verb = if cmd == com::CREATE_DB {
                    "CREATE"
                } else {
                    "DROP"
                };
                let sql = format!(
                    "{verb} DATABASE {}",
                    quote_ident(&String::from_utf8_lossy(body))
                );
                self.decided(&msg, &sql, Expect::OnePacket).await?;
            }
            com::REFRESH => {
                let sql = refresh_sql(body.first().copied().unwrap_or(0));
                self.decided(&msg, &sql, Expect::OnePacket).await?;
            }
            com::SHUTDOWN => {
                self.decided(&msg, "SHUTDOWN", Expect::OnePacket).await?;
            }
            com::PROCESS_INFO => {
                self.decided(&msg, "SHOW PROCESSLIST", Expect::Results)
                    .await?;
            }
            com::PROCESS_KILL => {
                let Some(id) = body.get(..4) else {
                    let e = CodecError::Malformed("COM_PROCESS_KILL");
                    return Err(self
                        .client_violation(msg.last_seq.wrapping_add(1), &e)
                        .await);
                };
                let id = u32::from_le_bytes([id[0], id[1], id[2], id[3]]);
                self.decided(&msg, &format!("KILL {id}"), Expect::OnePacket)
                    .await?;
            }
            com::PING | com::STATISTICS | com::SET_OPTION => {
                self.passed(&msg, Some(Expect::OnePacket)).await?;
            }
            com::CHANGE_USER => {
                let change = match codec::change_user(&payload, self.caps) {
                    Ok(c) => c,
                    Err(e) => {
                        return Err(self
                            .client_violation(msg.last_seq.wrapping_add(1), &e)
                            .await);
                    }
                };
                let reply_seq = msg.last_seq.wrapping_add(1);
                match self.guard.plan_login(&change.user) {
                    LoginPlan::Passthrough => {
                        if let Some(Finished { ok: true, .. }) =
                            self.passed(&msg, Some(Expect::Auth)).await?
                        {
                            self.changed_user(&change);
                        }
                    }
                    // The server never saw the command; the session ends
                    // rather than leave the client unsure who it is.
                    LoginPlan::Refused(reason) => {
                        self.access_denied(reply_seq, &reason).await;
                        return Err(SessionError::Refused(reason));
                    }
                    LoginPlan::Brokered(entry) => {
                        let caps = self.caps;
                        let first = |plugin: &str, auth: &[u8]| {
                            codec::change_user_with_auth(&payload, caps, plugin, auth)
                        };
                        self.broker(&entry, 0, reply_seq, first).await?;
                        self.changed_user(&change);
                    }
                }
            }
            com::RESET_CONNECTION => {
                if let Some(Finished { ok: true, .. }) =
                    self.passed(&msg, Some(Expect::OnePacket)).await?
                {
                    self.forget_statements();
                    let (user, db) = (self.guard.db_user.clone(), self.guard.database.clone());
                    self.guard.reset_session(&user, &db);
                }
            }
            other => {
                let name = command_name(other);
                let reason = format!("{name} is not supported through the agent");
                self.refuse_other(&msg, &name, &reason).await?;
            }
        }
        Ok(true)
    }

    /// Relays the server's reply to a command (or the authentication
    /// exchange) to the client, following its grammar to find its end.
    /// `statement` is the SQL it answers, for LOCAL INFILE requests.
    async fn reply(
        &mut self,
        expect: Expect,
        seq: u8,
        statement: Option<&str>,
    ) -> Result<Finished, SessionError> {
        let mut reply = Reply::new(expect, seq, self.caps & caps::DEPRECATE_EOF != 0);
        // Bytes of a streamed packet still to come.
        let mut skip = 0usize;
        // A refused LOCAL INFILE: the rest of the reply is dropped and the
        // client gets this ERR in its place.
        let mut refused = None;
        loop {
            let mut pos = 0usize;
            let mut ended = None;
            let mut event = None;
            while pos < self.sbuf.len() {
                if skip > 0 {
                    let n = skip.min(self.sbuf.len() - pos);
                    pos += n;
                    skip -= n;
                    continue;
                }
                let Some(mut h) = decode_header(&self.sbuf[pos..]) else {
                    break;
                };
                h.seq = h.seq.wrapping_sub(self.seq_delta);
                let start = pos + HEADER;
                let end = (start + h.len).min(self.sbuf.len());
                let step = match reply.feed(h, &self.sbuf[start..end]) {
                    Ok(s) => s,
                    Err(e) => {
                        let seq = reply.next_seq();
                        return Err(self.server_violation(seq, &e).await);
                    }
                };
                if self.seq_delta != 0 && !matches!(step, Step::NeedMore) {
                    // Renumbered once, as the header is consumed.
                    self.sbuf[pos + 3] = h.seq;
                }
                match step {
                    Step::NeedMore => {
                        self.sbuf.reserve(start + h.len - self.sbuf.len());
                        break;
                    }
                    Step::More => {
                        skip = start + h.len - end;
                        pos = end;
                    }
                    Step::Done { ok } => {
                        pos = start + h.len;
                        ended = Some(ok);
                        break;
                    }
                    Step::LocalInfile => {
                        event = Some((step, pos, h.seq));
                        pos = start + h.len;
                        break;
                    }
                    Step::ClientTurn => {
                        pos = start + h.len;
                        event = Some((step, pos, h.seq));
                        break;
                    }
                }
            }
            // Forward what was read, except a LOCAL INFILE request, which
            // is decided first.
            let forward_to = match event {
                Some((Step::LocalInfile, at, _)) => at,
                _ => pos,
            };
            if refused.is_none() && forward_to > 0 {
                self.client.write_all(&self.sbuf[..forward_to]).await?;
            }
            self.count_server(pos);
            let request = self.sbuf.get(forward_to + HEADER..pos).map(<[u8]>::to_vec);
            self.sbuf.advance(pos);
            match event {
                Some((Step::LocalInfile, _, req_seq)) => {
                    let request = request.unwrap_or_default();
                    let file = String::from_utf8_lossy(request.get(1..).unwrap_or_default());
                    let statement = statement.unwrap_or_default();
                    match self.guard.check_local_infile(statement, &file) {
                        Outcome::Forward if refused.is_none() => {
                            self.client
                                .write_all(&codec::packet(req_seq, &request))
                                .await?;
                            self.send_local_file(&mut reply).await?;
                        }
                        outcome => {
                            // The server gets an empty file; the client
                            // never sees the request, only the denial.
                            let next = reply.next_seq();
                            let _ = reply.client_packet(next);
                            self.server.write_all(&codec::packet(next, &[])).await?;
                            if refused.is_none() {
                                let message = match outcome {
                                    Outcome::Refuse(r) => r.message,
                                    Outcome::Forward | Outcome::Hold(_) => String::new(),
                                };
                                refused = Some(err_packet(
                                    req_seq,
                                    ER_DENIED,
                                    Some(DENIED_STATE),
                                    &message,
                                ));
                            }
                        }
                    }
                    reply.resume();
                    continue;
                }
                Some((Step::ClientTurn, _, _)) => {
                    self.client_turn(&mut reply).await?;
                    continue;
                }
                _ => {}
            }
            if let Some(ok) = ended {
                if !self.sbuf.is_empty() {
                    let e = CodecError::Malformed("data after the end of a reply");
                    return Err(self.server_violation(reply.next_seq(), &e).await);
                }
                if let Some(err) = refused {
                    self.client.write_all(&err).await?;
                    return Ok(Finished {
                        ok: false,
                        prepared: None,
                        results: reply.take_results(),
                    });
                }
                return Ok(Finished {
                    ok,
                    prepared: reply.prepared().map(|p| p.statement_id),
                    results: reply.take_results(),
                });
            }
            if self.sbuf.capacity() - self.sbuf.len() < 4096 {
                self.sbuf.reserve(READ_CHUNK);
            }
            self.flush().await?;
            if self.server.read_buf(&mut self.sbuf).await? == 0 {
                return Err(SessionError::ServerProtocol(
                    "the server closed the connection in the middle of a reply".into(),
                ));
            }
        }
    }

    /// One client packet within an authentication exchange.
    async fn client_turn(&mut self, reply: &mut Reply) -> Result<(), SessionError> {
        let msg = loop {
            match decode_message(&mut self.cbuf, reply.next_seq(), MAX_HANDSHAKE) {
                Ok(Some(m)) => break m,
                Ok(None) => {}
                Err(e) => return Err(self.client_violation(reply.next_seq(), &e).await),
            }
            self.flush().await?;
            make_room(&mut self.cbuf, 0);
            if self.client.read_buf(&mut self.cbuf).await? == 0 {
                return Err(if self.cbuf.is_empty() {
                    SessionError::ClientProtocol("connection closed during authentication".into())
                } else {
                    mid_packet(&self.cbuf)
                });
            }
        };
        let mut seq = msg.first_seq;
        loop {
            if let Err(e) = reply.client_packet(seq) {
                return Err(self.client_violation(seq.wrapping_add(1), &e).await);
            }
            if seq == msg.last_seq {
                break;
            }
            seq = seq.wrapping_add(1);
        }
        if self.seq_delta == 0 {
            return self.forward(&msg).await;
        }
        let bytes = renumber(&msg.bytes, self.seq_delta);
        self.count_client(bytes.len());
        self.server.write_all(&bytes).await?;
        Ok(())
    }

    /// Streams the client's LOCAL INFILE data to the server: packets up to
    /// an empty one, each checked for its sequence id, none buffered whole.
    async fn send_local_file(&mut self, reply: &mut Reply) -> Result<(), SessionError> {
        let mut continuing = false;
        loop {
            while self.cbuf.len() < HEADER {
                self.read_client_within("sending a local file").await?;
            }
            let Some(h) = decode_header(&self.cbuf) else {
                continue;
            };
            if let Err(e) = reply.client_packet(h.seq) {
                return Err(self.client_violation(h.seq.wrapping_add(1), &e).await);
            }
            let mut left = HEADER + h.len;
            while left > 0 {
                if self.cbuf.is_empty() {
                    self.read_client_within("sending a local file").await?;
                }
                let n = left.min(self.cbuf.len());
                self.server.write_all(&self.cbuf[..n]).await?;
                self.cbuf.advance(n);
                self.count_client(n);
                left -= n;
            }
            if h.len == 0 && !continuing {
                return Ok(());
            }
            continuing = h.len == MAX_PACKET;
        }
    }

    async fn read_client_within(&mut self, doing: &str) -> Result<(), SessionError> {
        if self.cbuf.capacity() - self.cbuf.len() < 4096 {
            self.cbuf.reserve(READ_CHUNK);
        }
        self.flush().await?;
        if self.client.read_buf(&mut self.cbuf).await? == 0 {
            return Err(SessionError::ClientProtocol(format!(
                "connection closed while {doing}"
            )));
        }
        Ok(())
    }
}

/// `packets` with `delta` added to every packet's sequence id.
fn renumber(packets: &[u8], delta: u8) -> BytesMut {
    let mut out = BytesMut::from(packets);
    let mut at = 0;
    while let Some(h) = out.get(at..).and_then(decode_header) {
        if let Some(b) = out.get_mut(at + 3) {
            *b = b.wrapping_add(delta);
        }
        at += HEADER + h.len;
    }
    out
}

fn mid_packet(pending: &[u8]) -> SessionError {
    SessionError::ClientProtocol(format!(
        "connection closed in the middle of a packet ({} bytes pending)",
        pending.len()
    ))
}

fn unknown_statement(id: u32) -> String {
    format!(
        "prepared statement {id} was not allowed by this agent (never prepared through it, refused, or closed)"
    )
}

/// The database a lone `USE name` statement switches to.
fn use_database(sql: &str) -> Option<String> {
    let s = sql.trim().trim_end_matches(';').trim_end();
    if !s.get(..3)?.eq_ignore_ascii_case("use") {
        return None;
    }
    let rest = s.get(3..)?;
    if !rest.starts_with(|c: char| c.is_ascii_whitespace() || c == '`') {
        return None;
    }
    let name = rest.trim_start();
    if let Some(quoted) = name.strip_prefix('`') {
        let inner = quoted.strip_suffix('`')?;
        let unescaped = inner.replace("``", "`");
        // A lone backtick inside means it was not one identifier.
        return (!unescaped.is_empty() && !inner.replace("``", "").contains('`'))
            .then_some(unescaped);
    }
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '$');
    plain.then(|| name.to_owned())
}

/// The SQL equivalent of COM_REFRESH's flags, for the policy.
fn refresh_sql(flags: u8) -> String {
    const WHAT: [(u8, &str); 7] = [
        (0x01, "PRIVILEGES"),
        (0x02, "LOGS"),
        (0x04, "TABLES"),
        (0x08, "HOSTS"),
        (0x10, "STATUS"),
        (0x40, "SLAVE"),
        (0x80, "MASTER"),
    ];
    let names: Vec<&str> = WHAT
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, n)| *n)
        .collect();
    if names.is_empty() {
        "FLUSH TABLES".to_owned()
    } else {
        format!("FLUSH {}", names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renumbering_moves_every_packet() {
        let mut two = codec::packet(2, b"abc").to_vec();
        two.extend_from_slice(&codec::packet(3, b""));
        let up = renumber(&two, 1);
        assert_eq!((up[3], up[HEADER + 3 + 3]), (3, 4));
        let down = renumber(&up, 1u8.wrapping_neg());
        assert_eq!(&down[..], &two[..]);
        // A truncated tail is left alone, never a panic.
        let cut = renumber(&two[..5], 1);
        assert_eq!(cut[3], 3);
    }

    #[test]
    fn use_statements() {
        assert_eq!(use_database("USE shop").as_deref(), Some("shop"));
        assert_eq!(use_database(" use `my db`; ").as_deref(), Some("my db"));
        assert_eq!(use_database("use `a``b`").as_deref(), Some("a`b"));
        assert_eq!(use_database("USE shop; DROP TABLE x"), None);
        assert_eq!(use_database("user_defined()"), None);
        assert_eq!(use_database("USE"), None);
        assert_eq!(use_database("use `a` `b`"), None);
    }

    #[test]
    fn refresh_flags() {
        assert_eq!(refresh_sql(0x05), "FLUSH PRIVILEGES, TABLES");
        assert_eq!(refresh_sql(0), "FLUSH TABLES");
    }

    /// The session between a scripted client and a scripted server, without
    /// root or eBPF: forwarding, pipelining, denials that never reach the
    /// server, prepared statement ids, a rogue LOCAL INFILE request.
    mod relay {
        use std::{cell::RefCell, rc::Rc, sync::Arc};

        use bytes::BytesMut;
        use tokio::{
            io::{AsyncReadExt as _, AsyncWriteExt as _},
            net::{TcpListener, TcpStream},
        };

        use crate::{
            conn::ConnInfo,
            identity::Identity,
            policy::{Engine, PolicyFile},
            protocol::mysql::codec::{self, Message, decode_message, err_fields, packet},
            proxy::{Counted, Guard, Limits, Shared, Upstream},
        };

        const OK: &[u8] = &[0, 0, 0, 2, 0, 0, 0];
        const EOF: &[u8] = &[0xfe, 0, 0, 2, 0];
        const COLDEF: &[u8] = b"\x03def\0\0\0\x01a\0\x0c\x3f\0\x01\0\0\0\x08\x81\0\0\0\0";

        struct NoLookup;
        impl crate::conn::OrigDstLookup for NoLookup {
            fn take(
                &self,
                _: u64,
                _: std::net::SocketAddr,
            ) -> Option<interceptor_common::ConnRecord> {
                None
            }
        }

        async fn read_message(s: &mut TcpStream, buf: &mut BytesMut, seq: u8) -> Option<Message> {
            loop {
                if let Some(m) = decode_message(buf, seq, 1 << 26).unwrap() {
                    return Some(m);
                }
                if s.read_buf(buf).await.unwrap() == 0 {
                    return None;
                }
            }
        }

        fn greeting() -> Vec<u8> {
            let mut g = vec![10];
            g.extend_from_slice(b"5.5.5-10.11.0-MariaDB\0");
            g.extend_from_slice(&9u32.to_le_bytes());
            g.extend_from_slice(b"12345678\0");
            let caps: u32 = 0x1 | 0x8 | 0x20 | 0x80 | 0x200 | 0x800 | 0x8000 | 0x000f_0000;
            g.extend_from_slice(&caps.to_le_bytes()[..2]);
            g.push(33);
            g.extend_from_slice(&2u16.to_le_bytes());
            g.extend_from_slice(&caps.to_le_bytes()[2..]);
            g.push(21);
            g.extend_from_slice(&[0; 10]);
            g.extend_from_slice(b"abcdefghijkl\0mysql_native_password\0");
            g
        }

        /// Answers commands; records each command's payload.
        async fn server(listener: TcpListener, seen: Rc<RefCell<Vec<Vec<u8>>>>) {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = BytesMut::new();
            s.write_all(&packet(0, &greeting())).await.unwrap();
            let hello = read_message(&mut s, &mut buf, 1).await.unwrap();
            let caps = u32::from_le_bytes(hello.payload()[..4].try_into().unwrap());
            assert_eq!(caps & (0x800 | 0x20), 0, "TLS and compression cleared");
            s.write_all(&packet(2, OK)).await.unwrap();
            while let Some(m) = read_message(&mut s, &mut buf, 0).await {
                let p = m.payload().into_owned();
                seen.borrow_mut().push(p.clone());
                let mut out = Vec::new();
                let mut seq = 1u8;
                let mut put = |payload: &[u8]| {
                    out.extend_from_slice(&packet(seq, payload));
                    seq = seq.wrapping_add(1);
                };
                match p.first() {
                    Some(1) => return,
                    Some(3) if p.ends_with(b"ROGUE") => {
                        s.write_all(&packet(1, b"\xfb/etc/passwd")).await.unwrap();
                        let data = read_message(&mut s, &mut buf, 2).await.unwrap();
                        assert_eq!(data.len, 0, "the agent sent an empty file");
                        seen.borrow_mut().push(b"<empty file>".to_vec());
                        out.extend_from_slice(&packet(3, OK));
                    }
                    Some(3 | 0x17) => {
                        for p in [&[1][..], COLDEF, EOF, b"\x011", EOF] {
                            put(p);
                        }
                    }
                    Some(0x16) => {
                        put(&[0, 7, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0]);
                        for p in [COLDEF, EOF, COLDEF, EOF] {
                            put(p);
                        }
                    }
                    Some(0x19) => {}
                    _ => put(OK),
                }
                s.write_all(&out).await.unwrap();
            }
        }

        /// Reads `n` reply packets; returns their payloads.
        async fn replies(c: &mut TcpStream, buf: &mut BytesMut, n: usize) -> Vec<Vec<u8>> {
            let mut out = Vec::new();
            let mut seq = 1u8;
            for _ in 0..n {
                let m = read_message(c, buf, seq).await.expect("reply");
                seq = m.last_seq.wrapping_add(1);
                out.push(m.payload().into_owned());
            }
            out
        }

        fn denial(p: &[u8]) -> String {
            let e = err_fields(p).expect("an ERR packet");
            assert_eq!((e.code, e.sqlstate), (1142, Some(&b"42000"[..])));
            String::from_utf8_lossy(e.message).into_owned()
        }

        #[tokio::test(flavor = "current_thread")]
        async fn scripted_session() {
            let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let dst = upstream.local_addr().unwrap();
            let seen = Rc::new(RefCell::new(Vec::new()));
            let local = tokio::task::LocalSet::new();
            local
                .run_until(async move {
                    let srv = tokio::task::spawn_local(server(upstream, Rc::clone(&seen)));
                    let policy = PolicyFile::parse(
                        &format!(
                            "version: 1\ndefault: allow\ntargets:\n  - {{name: m, protocol: mysql, address: '{dst}', tls: {{server: disable}}}}\nrules:\n  - {{name: no-drops, kinds: [ddl], decision: deny}}\n"
                        ),
                        std::path::Path::new("test"),
                    )
                    .unwrap();
                    let dir = tempfile::tempdir().unwrap();
                    let (audit, writer) =
                        crate::audit::AuditWriter::start(crate::audit::AuditConfig::new(dir.path().join("a.jsonl"))).unwrap();
                    let engine = Engine::new(policy).unwrap();
                    let target = engine.file().targets[0].clone();
                    let shared = Arc::new(Shared::new(
                        engine,
                        audit,
                        Arc::new(NoLookup),
                        crate::identity::IdentityResolver::new(None, 1 << 20),
                        0,
                        Limits::default(),
                    ));
                    let mut guard = Guard::new(
                        Arc::clone(&shared),
                        ConnInfo::new(1, target, dst, Identity::default()),
                    );
                    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
                    let mut client = TcpStream::connect(front.local_addr().unwrap()).await.unwrap();
                    let (agent_side, _) = front.accept().await.unwrap();
                    let up = Upstream {
                        dst,
                        mark: 0,
                        timeout: std::time::Duration::from_secs(5),
                        netns: Arc::new(crate::conn::Netns::home(&front).unwrap()),
                        unix: None,
                    };
                    let session = tokio::task::spawn_local(async move {
                        let counts = Counted::default();
                        super::super::serve(&mut guard, crate::proxy::Stream::Plain(agent_side), &up, &counts)
                            .await
                    });

                    let mut buf = BytesMut::new();
                    let g = read_message(&mut client, &mut buf, 0).await.unwrap();
                    let info = codec::adjust_greeting(&mut g.payload().into_owned()).unwrap();
                    // TLS offered by the agent, compression cleared.
                    assert_eq!(info.capabilities & (0x800 | 0x20), 0x800);
                    let mut hello = (0x200u32 | 0x8000 | 0x80000 | 0x20).to_le_bytes().to_vec();
                    hello.extend_from_slice(&(1u32 << 24).to_le_bytes());
                    hello.push(33);
                    hello.extend_from_slice(&[0; 23]);
                    hello.extend_from_slice(b"app\0\0mysql_native_password\0");
                    client.write_all(&packet(1, &hello)).await.unwrap();
                    let ok = read_message(&mut client, &mut buf, 2).await.unwrap();
                    assert_eq!(ok.payload()[0], 0);

                    // A query, then two commands pipelined in one write.
                    client.write_all(&packet(0, b"\x03SELECT 1")).await.unwrap();
                    assert_eq!(replies(&mut client, &mut buf, 5).await[3], b"\x011");
                    let mut two = packet(0, b"\x0e").to_vec();
                    two.extend_from_slice(&packet(0, b"\x03SELECT 1"));
                    client.write_all(&two).await.unwrap();
                    assert_eq!(replies(&mut client, &mut buf, 1).await[0][0], 0);
                    assert_eq!(replies(&mut client, &mut buf, 5).await.len(), 5);

                    // Denied: the client hears it, the server never does.
                    client.write_all(&packet(0, b"\x03DROP TABLE t")).await.unwrap();
                    let msg = denial(&replies(&mut client, &mut buf, 1).await[0]);
                    assert!(msg.contains("no-drops"), "{msg}");

                    // Prepared statements: ids learnt from the server.
                    client.write_all(&packet(0, b"\x16SELECT ?")).await.unwrap();
                    let prep = replies(&mut client, &mut buf, 5).await;
                    assert_eq!(prep[0][1], 7);
                    let exec = |id: u32| {
                        let mut p = vec![0x17];
                        p.extend_from_slice(&id.to_le_bytes());
                        p.extend_from_slice(&[0, 1, 0, 0, 0]);
                        packet(0, &p)
                    };
                    client.write_all(&exec(7)).await.unwrap();
                    assert_eq!(replies(&mut client, &mut buf, 5).await.len(), 5);
                    client.write_all(&exec(8)).await.unwrap();
                    let msg = denial(&replies(&mut client, &mut buf, 1).await[0]);
                    assert!(msg.contains("statement 8"), "{msg}");
                    client.write_all(&exec(u32::MAX)).await.unwrap();
                    assert_eq!(replies(&mut client, &mut buf, 5).await.len(), 5);
                    // A refused prepare, then "execute the last prepared".
                    client.write_all(&packet(0, b"\x16DROP TABLE x")).await.unwrap();
                    denial(&replies(&mut client, &mut buf, 1).await[0]);
                    client.write_all(&exec(u32::MAX)).await.unwrap();
                    denial(&replies(&mut client, &mut buf, 1).await[0]);
                    // Closing 7 forgets it.
                    let mut close = vec![0x19];
                    close.extend_from_slice(&7u32.to_le_bytes());
                    client.write_all(&packet(0, &close)).await.unwrap();
                    client.write_all(&exec(7)).await.unwrap();
                    denial(&replies(&mut client, &mut buf, 1).await[0]);

                    // A server asking for a file nobody named.
                    client.write_all(&packet(0, b"\x03SELECT ROGUE")).await.unwrap();
                    let msg = denial(&replies(&mut client, &mut buf, 1).await[0]);
                    assert!(msg.contains("/etc/passwd"), "{msg}");
                    client.write_all(&packet(0, b"\x0e")).await.unwrap();
                    assert_eq!(replies(&mut client, &mut buf, 1).await[0][0], 0);

                    client.write_all(&packet(0, b"\x01")).await.unwrap();
                    srv.await.unwrap();
                    session.await.unwrap().unwrap();
                    let seen: Vec<String> = seen
                        .borrow()
                        .iter()
                        .map(|p| String::from_utf8_lossy(p).into_owned())
                        .collect();
                    assert!(seen.iter().all(|p| !p.contains("DROP")), "{seen:?}");
                    assert_eq!(seen.iter().filter(|p| p.starts_with('\x17')).count(), 2);
                    assert!(seen.contains(&"<empty file>".to_owned()), "{seen:?}");
                    assert_eq!(shared.stats.denied.load(std::sync::atomic::Ordering::Relaxed), 6);
                    drop(shared);
                    writer.finish();
                })
                .await;
        }
    }
}
