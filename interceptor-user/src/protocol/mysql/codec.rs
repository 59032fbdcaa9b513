//! MySQL client/server protocol frames: 3-byte length, sequence id, payload.
//! Framing only: "incomplete" is a normal outcome, every length is checked
//! on the header before anything is buffered, sequence ids are validated
//! (never asserted), and allowed traffic is forwarded as the bytes it
//! arrived as. Payloads of 16 MiB and more arrive as a run of `0xFFFFFF`
//! packets ended by a shorter one; [`Message`] keeps the run's wire bytes
//! and reassembles the payload only when asked.

use std::borrow::Cow;

use bytes::{BufMut as _, Bytes, BytesMut};

/// Largest payload of one packet; a packet this long continues in the next.
pub const MAX_PACKET: usize = 0x00FF_FFFF;
pub const HEADER: usize = 4;

/// Capability flags (the low 32 bits are MySQL's; MariaDB puts its own in
/// the high 32 when the peer does not set `CLIENT_MYSQL`).
pub mod caps {
    /// `CLIENT_LONG_PASSWORD`; MariaDB calls it `CLIENT_MYSQL` and uses its
    /// absence to announce extended (MariaDB) capabilities.
    pub const CLIENT_MYSQL: u64 = 1;
    pub const CONNECT_WITH_DB: u64 = 1 << 3;
    pub const COMPRESS: u64 = 1 << 5;
    pub const LOCAL_FILES: u64 = 1 << 7;
    pub const PROTOCOL_41: u64 = 1 << 9;
    pub const SSL: u64 = 1 << 11;
    pub const SECURE_CONNECTION: u64 = 1 << 15;
    pub const MULTI_STATEMENTS: u64 = 1 << 16;
    pub const PLUGIN_AUTH: u64 = 1 << 19;
    pub const CONNECT_ATTRS: u64 = 1 << 20;
    pub const PLUGIN_AUTH_LENENC_DATA: u64 = 1 << 21;
    pub const SESSION_TRACK: u64 = 1 << 23;
    pub const DEPRECATE_EOF: u64 = 1 << 24;
    /// Lets a session turn result set metadata off: the agent reads it.
    pub const OPTIONAL_RESULTSET_METADATA: u64 = 1 << 25;
    pub const ZSTD_COMPRESSION: u64 = 1 << 26;
    /// Changes COM_QUERY's layout; the agent reads the query text.
    pub const QUERY_ATTRIBUTES: u64 = 1 << 27;
    /// MariaDB: progress reports arrive as ERR packets mid-reply.
    pub const MARIADB_PROGRESS: u64 = 1 << 32;
    pub const MARIADB_COM_MULTI: u64 = 1 << 33;
    pub const MARIADB_STMT_BULK_OPERATIONS: u64 = 1 << 34;
    pub const MARIADB_EXTENDED_TYPE_INFO: u64 = 1 << 35;
    pub const MARIADB_CACHE_METADATA: u64 = 1 << 36;
    pub const MARIADB_BULK_UNIT_RESULTS: u64 = 1 << 37;

    /// What the agent takes out of both sides' capabilities so that it can
    /// read everything that follows: no TLS or compression on the hop to
    /// the agent (TLS comes later), no reply shapes it does not parse.
    pub const CLEARED: u64 = SSL
        | COMPRESS
        | ZSTD_COMPRESSION
        | OPTIONAL_RESULTSET_METADATA
        | QUERY_ATTRIBUTES
        | MARIADB_PROGRESS
        | MARIADB_COM_MULTI
        | MARIADB_STMT_BULK_OPERATIONS
        | MARIADB_CACHE_METADATA
        | MARIADB_BULK_UNIT_RESULTS;
}

/// Server status flags the agent reads in OK and EOF packets.
pub mod status {
    pub const MORE_RESULTS_EXISTS: u16 = 0x0008;
    pub const CURSOR_EXISTS: u16 = 0x0040;
}

/// Command bytes.
pub mod com {
    pub const SLEEP: u8 = 0x00;
    pub const QUIT: u8 = 0x01;
    pub const INIT_DB: u8 = 0x02;
    pub const QUERY: u8 = 0x03;
    pub const FIELD_LIST: u8 = 0x04;
    pub const CREATE_DB: u8 = 0x05;
    pub const DROP_DB: u8 = 0x06;
    pub const REFRESH: u8 = 0x07;
    pub const SHUTDOWN: u8 = 0x08;
    pub const STATISTICS: u8 = 0x09;
    pub const PROCESS_INFO: u8 = 0x0a;
    pub const PROCESS_KILL: u8 = 0x0c;
    pub const PING: u8 = 0x0e;
    pub const CHANGE_USER: u8 = 0x11;
    pub const STMT_PREPARE: u8 = 0x16;
    pub const STMT_EXECUTE: u8 = 0x17;
    pub const STMT_SEND_LONG_DATA: u8 = 0x18;
    pub const STMT_CLOSE: u8 = 0x19;
    pub const STMT_RESET: u8 = 0x1a;
    pub const SET_OPTION: u8 = 0x1b;
    pub const STMT_FETCH: u8 = 0x1c;
    pub const RESET_CONNECTION: u8 = 0x1f;
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("packet with sequence id {got} where {expected} was due")]
    OutOfOrder { expected: u8, got: u8 },
    #[error("message of at least {len} bytes, over the {max}-byte limit")]
    FrameTooLarge { len: usize, max: usize },
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("not a MySQL server greeting (first bytes {0:02x?})")]
    NotMysql(Vec<u8>),
    #[error("unsupported protocol: {0}")]
    Unsupported(&'static str),
}

/// A packet header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub len: usize,
    pub seq: u8,
}

/// Reads a packet header; `None` when fewer than 4 bytes are there.
#[must_use]
pub fn decode_header(buf: &[u8]) -> Option<Header> {
    let h = buf.get(..HEADER)?;
    Some(Header {
        len: usize::from(h[0]) | usize::from(h[1]) << 8 | usize::from(h[2]) << 16,
        seq: h[3],
    })
}

/// One logical message: a packet, or a run of `0xFFFFFF` packets ended by a
/// shorter one, with consecutive sequence ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The packets as received, headers included: forwarded as is.
    pub bytes: Bytes,
    pub first_seq: u8,
    pub last_seq: u8,
    /// Total payload length.
    pub len: usize,
}

impl Message {
    /// The payload, reassembled when the message spans several packets.
    #[must_use]
    pub fn payload(&self) -> Cow<'_, [u8]> {
        let single = HEADER + self.len == self.bytes.len();
        if single {
            return Cow::Borrowed(self.bytes.get(HEADER..).unwrap_or_default());
        }
        let mut out = Vec::with_capacity(self.len);
        let mut rest = &self.bytes[..];
        while let Some(h) = decode_header(rest) {
            let end = (HEADER + h.len).min(rest.len());
            out.extend_from_slice(rest.get(HEADER..end).unwrap_or_default());
            rest = rest.get(end..).unwrap_or_default();
        }
        Cow::Owned(out)
    }

    /// First payload byte (the command byte of a client message).
    #[must_use]
    pub fn first_byte(&self) -> Option<u8> {
        if self.len == 0 {
            return None;
        }
        self.bytes.get(HEADER).copied()
    }
}

/// Splits one whole message off `buf`. `seq` is the sequence id its first
/// packet must carry. Each packet's length is checked against `max` (the
/// running total) on its header, before the packet is waited for.
///
/// # Errors
/// A sequence id out of order, or a total over `max`.
pub fn decode_message(
    buf: &mut BytesMut,
    seq: u8,
    max: usize,
) -> Result<Option<Message>, CodecError> {
    let mut pos = 0usize;
    let mut total = 0usize;
    let mut expected = seq;
    loop {
        let Some(h) = decode_header(&buf[pos..]) else {
            return Ok(None);
        };
        if h.seq != expected {
            return Err(CodecError::OutOfOrder {
                expected,
                got: h.seq,
            });
        }
        total += h.len;
        if total > max {
            return Err(CodecError::FrameTooLarge { len: total, max });
        }
        let end = pos + HEADER + h.len;
        if buf.len() < end {
            buf.reserve(end - buf.len());
            return Ok(None);
        }
        pos = end;
        if h.len < MAX_PACKET {
            let bytes = buf.split_to(pos).freeze();
            return Ok(Some(Message {
                bytes,
                first_seq: seq,
                last_seq: h.seq,
                len: total,
            }));
        }
        expected = h.seq.wrapping_add(1);
    }
}

/// A packet with `payload`, split into `0xFFFFFF` packets when it is that
/// long or longer.
#[must_use]
pub fn packet(seq: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + HEADER);
    let mut seq = seq;
    let mut rest = payload;
    loop {
        let n = rest.len().min(MAX_PACKET);
        let len = u32::try_from(n).unwrap_or(0).to_le_bytes();
        out.put_slice(&len[..3]);
        out.put_u8(seq);
        out.put_slice(&rest[..n]);
        rest = &rest[n..];
        seq = seq.wrapping_add(1);
        if n < MAX_PACKET {
            return out.freeze();
        }
    }
}

/// An ERR packet. Without `sqlstate` (before the handshake, when the
/// client does not yet expect one) the `#` marker is left out.
#[must_use]
pub fn err_packet(seq: u8, code: u16, sqlstate: Option<&str>, message: &str) -> Bytes {
    let mut p = Vec::with_capacity(message.len() + 9);
    p.push(0xff);
    p.extend_from_slice(&code.to_le_bytes());
    if let Some(state) = sqlstate {
        p.push(b'#');
        let mut s = [b'H', b'Y', b'0', b'0', b'0'];
        for (d, c) in s.iter_mut().zip(state.bytes()) {
            *d = c;
        }
        p.extend_from_slice(&s);
    }
    p.extend_from_slice(message.as_bytes());
    // An ERR is never the head of a multi-packet run: cut the message.
    p.truncate(MAX_PACKET - 1);
    packet(seq, &p)
}

/// Fields of an ERR packet (protocol 4.1 layout).
#[derive(Debug, PartialEq, Eq)]
pub struct ErrPacket<'a> {
    pub code: u16,
    pub sqlstate: Option<&'a [u8]>,
    pub message: &'a [u8],
}

#[must_use]
pub fn err_fields(payload: &[u8]) -> Option<ErrPacket<'_>> {
    let (&0xff, rest) = payload.split_first()? else {
        return None;
    };
    let code = u16::from_le_bytes([*rest.first()?, *rest.get(1)?]);
    let rest = rest.get(2..)?;
    match rest.split_first() {
        Some((b'#', tail)) if tail.len() >= 5 => Some(ErrPacket {
            code,
            sqlstate: tail.get(..5),
            message: tail.get(5..).unwrap_or_default(),
        }),
        _ => Some(ErrPacket {
            code,
            sqlstate: None,
            message: rest,
        }),
    }
}

/// A length-encoded integer and what follows it. `None` when the bytes end
/// first or the prefix is 0xFF (undefined; 0xFB is NULL in rows, not here).
#[must_use]
pub fn lenenc_int(b: &[u8]) -> Option<(u64, &[u8])> {
    let (&first, rest) = b.split_first()?;
    let n = match first {
        0..=0xfa => return Some((u64::from(first), rest)),
        0xfc => 2,
        0xfd => 3,
        0xfe => 8,
        _ => return None,
    };
    let bytes = rest.get(..n)?;
    let mut v = 0u64;
    for (i, byte) in bytes.iter().enumerate() {
        v |= u64::from(*byte) << (8 * i);
    }
    Some((v, rest.get(n..)?))
}

/// A length-encoded string and what follows it.
#[must_use]
pub fn lenenc_bytes(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let (n, rest) = lenenc_int(b)?;
    let n = usize::try_from(n).ok()?;
    Some((rest.get(..n)?, rest.get(n..)?))
}

/// A NUL-terminated string and what follows it.
#[must_use]
pub fn cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = b.iter().position(|c| *c == 0)?;
    Some((&b[..end], b.get(end + 1..)?))
}

/// Status flags of an OK packet (header 0x00, or 0xFE when it ends a
/// result set under `CLIENT_DEPRECATE_EOF`); `None` when too short.
#[must_use]
pub fn ok_status(payload: &[u8]) -> Option<u16> {
    let (_, rest) = payload.split_first()?;
    let (_, rest) = lenenc_int(rest)?;
    let (_, rest) = lenenc_int(rest)?;
    Some(u16::from_le_bytes([*rest.first()?, *rest.get(1)?]))
}

/// Status flags of a classic EOF packet (0xFE, warnings, status).
#[must_use]
pub fn eof_status(payload: &[u8]) -> Option<u16> {
    let s = payload.get(3..5)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

/// COM_STMT_PREPARE_OK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrepareOk {
    pub statement_id: u32,
    pub columns: u16,
    pub params: u16,
}

#[must_use]
pub fn prepare_ok(payload: &[u8]) -> Option<PrepareOk> {
    let p = payload.get(..9)?;
    if p[0] != 0 {
        return None;
    }
    Some(PrepareOk {
        statement_id: u32::from_le_bytes([p[1], p[2], p[3], p[4]]),
        columns: u16::from_le_bytes([p[5], p[6]]),
        params: u16::from_le_bytes([p[7], p[8]]),
    })
}

/// The server's first packet, protocol 10, as the agent reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Greeting {
    pub server_version: String,
    pub connection_id: u32,
    /// Capabilities as the server sent them (MariaDB's extended ones in
    /// the high 32 bits).
    pub capabilities: u64,
    pub auth_plugin: Option<String>,
    /// The nonce (both parts, 20 bytes from MySQL and MariaDB): what a
    /// brokered login's first answer is computed with.
    pub scramble: Vec<u8>,
}

/// Offsets of the capability words in a greeting.
struct GreetingLayout {
    caps_low: usize,
    caps_high: Option<usize>,
    ext: Option<usize>,
}

fn greeting_layout(p: &[u8]) -> Result<(GreetingLayout, Greeting), CodecError> {
    let not_mysql = || CodecError::NotMysql(p.iter().take(16).copied().collect());
    match p.first() {
        Some(10) => {}
        Some(9) => return Err(CodecError::Unsupported("server protocol version 9")),
        _ => return Err(not_mysql()),
    }
    let (version, rest) = cstr(&p[1..]).ok_or_else(not_mysql)?;
    let version_end = p.len() - rest.len();
    // connection id (4), scramble part 1 (8), filler (1), caps low (2)
    let fixed = rest.get(..15).ok_or_else(not_mysql)?;
    if fixed[12] != 0 || version.is_empty() || !version.iter().all(|c| (0x20..0x7f).contains(c)) {
        return Err(not_mysql());
    }
    let caps_low = version_end + 13;
    let mut capabilities = u64::from(u16::from_le_bytes([fixed[13], fixed[14]]));
    let mut layout = GreetingLayout {
        caps_low,
        caps_high: None,
        ext: None,
    };
    let mut auth_plugin = None;
    let mut scramble = fixed[4..12].to_vec();
    // charset (1), status (2), caps high (2), scramble length (1),
    // reserved (10; MariaDB's extended capabilities in its last 4)
    if let Some(more) = rest.get(15..31) {
        layout.caps_high = Some(caps_low + 5);
        capabilities |= u64::from(u16::from_le_bytes([more[3], more[4]])) << 16;
        if capabilities & caps::CLIENT_MYSQL == 0 {
            layout.ext = Some(caps_low + 14);
            capabilities |=
                u64::from(u32::from_le_bytes([more[12], more[13], more[14], more[15]])) << 32;
        }
        let scramble2 = usize::from(more[5]).saturating_sub(8).max(13);
        if capabilities & caps::SECURE_CONNECTION != 0
            && let Some(part) = rest.get(31..31 + scramble2)
        {
            scramble.extend_from_slice(part.strip_suffix(&[0]).unwrap_or(part));
        }
        if capabilities & caps::PLUGIN_AUTH != 0
            && let Some((name, _)) = rest.get(31 + scramble2..).and_then(cstr)
        {
            auth_plugin = Some(String::from_utf8_lossy(name).into_owned());
        }
    }
    Ok((
        layout,
        Greeting {
            server_version: String::from_utf8_lossy(version).into_owned(),
            connection_id: u32::from_le_bytes([fixed[0], fixed[1], fixed[2], fixed[3]]),
            capabilities,
            auth_plugin,
            scramble,
        },
    ))
}

/// Reads the server greeting and clears [`caps::CLEARED`] in it, in place
/// (the length does not change).
///
/// # Errors
/// When the payload is not a protocol-10 greeting.
pub fn adjust_greeting(payload: &mut [u8]) -> Result<Greeting, CodecError> {
    let (layout, greeting) = greeting_layout(payload)?;
    clear_bits(payload, layout.caps_low, 2, caps::CLEARED);
    if let Some(at) = layout.caps_high {
        clear_bits(payload, at, 2, caps::CLEARED >> 16);
    }
    if let Some(at) = layout.ext {
        clear_bits(payload, at, 4, caps::CLEARED >> 32);
    }
    Ok(greeting)
}

/// Sets `CLIENT_SSL` in a greeting already adjusted: the agent offers TLS
/// to the client whatever the server does (it terminates TLS itself).
///
/// # Errors
/// When the payload is not a protocol-10 greeting.
pub fn offer_ssl(payload: &mut [u8]) -> Result<(), CodecError> {
    let (layout, _) = greeting_layout(payload)?;
    set_bits(payload, layout.caps_low, 2, caps::SSL);
    Ok(())
}

/// Sets `CLIENT_SSL` in a handshake response (adjusted, so cleared),
/// for a server the agent talks TLS to.
pub fn request_ssl(payload: &mut [u8]) {
    set_bits(payload, 0, 4, caps::SSL);
}

/// The SSL request packet's payload for the server: the first 32 bytes of
/// the handshake response (capabilities with `CLIENT_SSL`, max packet,
/// charset, filler and MariaDB's extended capabilities).
#[must_use]
pub fn ssl_request(response_payload: &[u8]) -> Option<[u8; 32]> {
    let mut out: [u8; 32] = response_payload.get(..32)?.try_into().ok()?;
    set_bits(&mut out, 0, 4, caps::SSL);
    Some(out)
}

fn set_bits(p: &mut [u8], at: usize, width: usize, mask: u64) {
    if let Some(word) = p.get_mut(at..at + width) {
        for (i, b) in word.iter_mut().enumerate() {
            *b |= (mask >> (8 * i)) as u8;
        }
    }
}

/// Clears `mask` in the `width`-byte little-endian word at `at`.
fn clear_bits(p: &mut [u8], at: usize, width: usize, mask: u64) {
    if let Some(word) = p.get_mut(at..at + width) {
        for (i, b) in word.iter_mut().enumerate() {
            *b &= !((mask >> (8 * i)) as u8);
        }
    }
}

/// The client's HandshakeResponse41, as the agent reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeResponse {
    /// Capabilities after the agent's adjustment (MariaDB's extended ones
    /// in the high 32 bits).
    pub capabilities: u64,
    pub user: String,
    pub database: Option<String>,
    pub auth_plugin: Option<String>,
    /// The `program_name` connection attribute, when sent.
    pub program_name: Option<String>,
}

/// What the client's first packet is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientHello {
    /// A short packet asking to switch to TLS.
    SslRequest,
    Response(HandshakeResponse),
}

/// Reads the client's handshake response and clears [`caps::CLEARED`] in
/// it, in place.
///
/// # Errors
/// When it is not a protocol-4.1 response or its fields run past the end.
pub fn adjust_handshake_response(payload: &mut [u8]) -> Result<ClientHello, CodecError> {
    let bad = CodecError::Malformed("handshake response");
    let head = payload.get(..4).ok_or(bad.clone())?;
    let mut capabilities = u64::from(u32::from_le_bytes([head[0], head[1], head[2], head[3]]));
    if capabilities & caps::PROTOCOL_41 == 0 {
        return Err(CodecError::Unsupported("client protocol older than 4.1"));
    }
    if capabilities & caps::SSL != 0 && payload.len() == 32 {
        return Ok(ClientHello::SslRequest);
    }
    // caps (4), max packet (4), charset (1), filler (19), MariaDB's
    // extended capabilities or filler (4)
    let fixed = payload.get(..32).ok_or(bad.clone())?;
    if capabilities & caps::CLIENT_MYSQL == 0 {
        capabilities |= u64::from(u32::from_le_bytes([
            fixed[28], fixed[29], fixed[30], fixed[31],
        ])) << 32;
        clear_bits(payload, 28, 4, caps::CLEARED >> 32);
    }
    clear_bits(payload, 0, 4, caps::CLEARED);
    let capabilities = capabilities & !caps::CLEARED;
    let rest = payload.get(32..).ok_or(bad.clone())?;
    let (user, rest) = cstr(rest).ok_or(bad.clone())?;
    let rest = after_auth(rest, capabilities).ok_or(bad.clone())?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let (database, rest) = if capabilities & caps::CONNECT_WITH_DB != 0 {
        // Some clients end the packet right after the database.
        match cstr(rest) {
            Some((db, tail)) => (Some(text(db)), tail),
            None => (Some(text(rest)), &[][..]),
        }
    } else {
        (None, rest)
    };
    let (auth_plugin, rest) = match (capabilities & caps::PLUGIN_AUTH != 0, cstr(rest)) {
        (true, Some((p, tail))) => (Some(text(p)), tail),
        _ => (None, rest),
    };
    let program_name = if capabilities & caps::CONNECT_ATTRS != 0 {
        connect_attr(rest, b"program_name").map(text)
    } else {
        None
    };
    Ok(ClientHello::Response(HandshakeResponse {
        capabilities,
        user: text(user),
        database: database.filter(|d| !d.is_empty()),
        auth_plugin,
        program_name,
    }))
}

/// What follows a handshake response's auth data (lenenc, one length byte,
/// or NUL-terminated, as the capabilities say).
fn after_auth(rest: &[u8], capabilities: u64) -> Option<&[u8]> {
    if capabilities & caps::PLUGIN_AUTH_LENENC_DATA != 0 {
        Some(lenenc_bytes(rest)?.1)
    } else if capabilities & caps::SECURE_CONNECTION != 0 {
        let (&n, tail) = rest.split_first()?;
        tail.get(usize::from(n)..)
    } else {
        Some(cstr(rest)?.1)
    }
}

/// Writes auth data with a one-byte length (a lenenc integer below 251
/// is the same byte).
fn put_auth(out: &mut Vec<u8>, auth: &[u8]) -> Result<(), CodecError> {
    let n = u8::try_from(auth.len())
        .ok()
        .filter(|n| *n < 251)
        .ok_or(CodecError::Malformed("auth data longer than 250 bytes"))?;
    out.push(n);
    out.extend_from_slice(auth);
    Ok(())
}

/// The handshake response `payload` (adjusted) with its auth data replaced
/// by `auth`, an answer in `plugin`: `CLIENT_PLUGIN_AUTH` is set and the
/// plugin named, so the server reads it as such. Everything else (user,
/// database, connection attributes) stays the client's.
///
/// # Errors
/// A malformed response, or a client too old to carry auth data with a
/// length (no `CLIENT_SECURE_CONNECTION`).
pub fn response_with_auth(
    payload: &[u8],
    plugin: &str,
    auth: &[u8],
) -> Result<Vec<u8>, CodecError> {
    let bad = CodecError::Malformed("handshake response");
    let fixed = payload.get(..32).ok_or(bad.clone())?;
    let capabilities = u64::from(u32::from_le_bytes([fixed[0], fixed[1], fixed[2], fixed[3]]));
    if capabilities & (caps::SECURE_CONNECTION | caps::PLUGIN_AUTH_LENENC_DATA) == 0 {
        return Err(CodecError::Unsupported(
            "a client without CLIENT_SECURE_CONNECTION (pre-4.1 auth)",
        ));
    }
    let (user, rest) = cstr(&payload[32..]).ok_or(bad.clone())?;
    let rest = after_auth(rest, capabilities).ok_or(bad.clone())?;
    let (database, rest) = if capabilities & caps::CONNECT_WITH_DB != 0 {
        cstr(rest).map_or((Some(rest), &[][..]), |(d, t)| (Some(d), t))
    } else {
        (None, rest)
    };
    let attrs = if capabilities & caps::PLUGIN_AUTH != 0 {
        cstr(rest).map_or(&[][..], |(_, t)| t)
    } else {
        rest
    };
    let mut out = Vec::with_capacity(payload.len() + auth.len() + plugin.len() + 2);
    out.extend_from_slice(fixed);
    set_bits(&mut out, 0, 4, caps::PLUGIN_AUTH);
    out.extend_from_slice(user);
    out.push(0);
    put_auth(&mut out, auth)?;
    if let Some(db) = database {
        out.extend_from_slice(db);
        out.push(0);
    }
    out.extend_from_slice(plugin.as_bytes());
    out.push(0);
    out.extend_from_slice(attrs);
    Ok(out)
}

/// COM_CHANGE_USER `payload` with its auth data replaced by `auth`, an
/// answer in `plugin` (named when the client sent the fields up to it).
///
/// # Errors
/// A malformed command, or a session without `CLIENT_SECURE_CONNECTION`.
pub fn change_user_with_auth(
    payload: &[u8],
    capabilities: u64,
    plugin: &str,
    auth: &[u8],
) -> Result<Vec<u8>, CodecError> {
    let bad = CodecError::Malformed("COM_CHANGE_USER");
    if capabilities & caps::SECURE_CONNECTION == 0 {
        return Err(CodecError::Unsupported(
            "COM_CHANGE_USER without CLIENT_SECURE_CONNECTION (pre-4.1 auth)",
        ));
    }
    let (user, rest) = payload.get(1..).and_then(cstr).ok_or(bad.clone())?;
    let (&n, tail) = rest.split_first().ok_or(bad.clone())?;
    let rest = tail.get(usize::from(n)..).ok_or(bad.clone())?;
    let (database, rest) = cstr(rest).unwrap_or((rest, &[]));
    let mut out = Vec::with_capacity(payload.len() + auth.len() + plugin.len() + 2);
    out.push(com::CHANGE_USER);
    out.extend_from_slice(user);
    out.push(0);
    put_auth(&mut out, auth)?;
    out.extend_from_slice(database);
    out.push(0);
    // charset (2), then the plugin name and attributes.
    if let Some(charset) = rest.get(..2) {
        out.extend_from_slice(charset);
        if capabilities & caps::PLUGIN_AUTH != 0 {
            let attrs = cstr(&rest[2..]).map_or(&[][..], |(_, t)| t);
            out.extend_from_slice(plugin.as_bytes());
            out.push(0);
            out.extend_from_slice(attrs);
        } else {
            out.extend_from_slice(&rest[2..]);
        }
    }
    Ok(out)
}

/// One connection attribute's value, from the lenenc-prefixed list.
fn connect_attr<'a>(b: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let (mut attrs, _) = lenenc_bytes(b)?;
    while !attrs.is_empty() {
        let (k, rest) = lenenc_bytes(attrs)?;
        let (v, rest) = lenenc_bytes(rest)?;
        if k == key {
            return Some(v);
        }
        attrs = rest;
    }
    None
}

/// COM_CHANGE_USER, as the agent reads it (forwarded unchanged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeUser {
    pub user: String,
    pub database: Option<String>,
}

/// # Errors
/// When user or auth data run past the end.
pub fn change_user(payload: &[u8], capabilities: u64) -> Result<ChangeUser, CodecError> {
    let bad = CodecError::Malformed("COM_CHANGE_USER");
    let rest = payload.get(1..).ok_or(bad.clone())?;
    let (user, rest) = cstr(rest).ok_or(bad.clone())?;
    let rest = if capabilities & caps::SECURE_CONNECTION != 0 {
        let (&n, tail) = rest.split_first().ok_or(bad.clone())?;
        tail.get(usize::from(n)..).ok_or(bad.clone())?
    } else {
        cstr(rest).ok_or(bad.clone())?.1
    };
    let database = match cstr(rest) {
        Some((db, _)) => db,
        None => rest,
    };
    Ok(ChangeUser {
        user: String::from_utf8_lossy(user).into_owned(),
        database: Some(String::from_utf8_lossy(database).into_owned()).filter(|d| !d.is_empty()),
    })
}

/// The statement id of COM_STMT_EXECUTE, SEND_LONG_DATA, CLOSE, RESET and
/// FETCH (right after the command byte).
#[must_use]
pub fn statement_id(payload: &[u8]) -> Option<u32> {
    let b = payload.get(1..5)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Quotes a name as a MySQL identifier.
#[must_use]
pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// A command's name for errors and the audit log.
#[must_use]
pub fn command_name(c: u8) -> Cow<'static, str> {
    let name = match c {
        0x00 => "COM_SLEEP",
        0x01 => "COM_QUIT",
        0x02 => "COM_INIT_DB",
        0x03 => "COM_QUERY",
        0x04 => "COM_FIELD_LIST",
        0x05 => "COM_CREATE_DB",
        0x06 => "COM_DROP_DB",
        0x07 => "COM_REFRESH",
        0x08 => "COM_SHUTDOWN",
        0x09 => "COM_STATISTICS",
        0x0a => "COM_PROCESS_INFO",
        0x0b => "COM_CONNECT",
        0x0c => "COM_PROCESS_KILL",
        0x0d => "COM_DEBUG",
        0x0e => "COM_PING",
        0x0f => "COM_TIME",
        0x10 => "COM_DELAYED_INSERT",
        0x11 => "COM_CHANGE_USER",
        0x12 => "COM_BINLOG_DUMP",
        0x13 => "COM_TABLE_DUMP",
        0x14 => "COM_CONNECT_OUT",
        0x15 => "COM_REGISTER_SLAVE",
        0x16 => "COM_STMT_PREPARE",
        0x17 => "COM_STMT_EXECUTE",
        0x18 => "COM_STMT_SEND_LONG_DATA",
        0x19 => "COM_STMT_CLOSE",
        0x1a => "COM_STMT_RESET",
        0x1b => "COM_SET_OPTION",
        0x1c => "COM_STMT_FETCH",
        0x1d => "COM_DAEMON",
        0x1e => "COM_BINLOG_DUMP_GTID",
        0x1f => "COM_RESET_CONNECTION",
        0xfa => "COM_STMT_BULK_EXECUTE",
        0xfe => "COM_MULTI",
        other => return Cow::Owned(format!("command 0x{other:02x}")),
    };
    Cow::Borrowed(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MariaDB 10.11's greeting (captured), scramble bytes replaced.
    fn mariadb_greeting() -> Vec<u8> {
        let mut p = vec![10];
        p.extend_from_slice(b"5.5.5-10.11.19-MariaDB-0+deb12u1\0");
        p.extend_from_slice(&7u32.to_le_bytes());
        p.extend_from_slice(b"abcdefgh\0");
        // caps low: everything MariaDB sets, CLIENT_MYSQL clear
        p.extend_from_slice(&0xfffeu16.to_le_bytes());
        p.push(45); // charset
        p.extend_from_slice(&2u16.to_le_bytes()); // status
        p.extend_from_slice(&0x81bfu16.to_le_bytes()); // caps high
        p.push(21);
        p.extend_from_slice(&[0; 6]);
        p.extend_from_slice(&0x3du32.to_le_bytes()); // MariaDB extended
        p.extend_from_slice(b"ijklmnopqrst\0");
        p.extend_from_slice(b"mysql_native_password\0");
        p
    }

    fn handshake_response(caps: u32, ext: u32) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&caps.to_le_bytes());
        p.extend_from_slice(&(16u32 << 20).to_le_bytes());
        p.push(45);
        p.extend_from_slice(&[0; 19]);
        p.extend_from_slice(&ext.to_le_bytes());
        p.extend_from_slice(b"app\0");
        p.push(20);
        p.extend_from_slice(&[7; 20]);
        p.extend_from_slice(b"orders\0");
        p.extend_from_slice(b"mysql_native_password\0");
        let attrs: &[&[u8]] = &[b"_os", b"Linux", b"program_name", b"mariadb"];
        let mut a = Vec::new();
        for s in attrs {
            a.push(u8::try_from(s.len()).unwrap());
            a.extend_from_slice(s);
        }
        p.push(u8::try_from(a.len()).unwrap());
        p.extend(a);
        p
    }

    #[test]
    fn ssl_offer_and_request() {
        let mut response = vec![0u8; 40];
        response[..4].copy_from_slice(&u32::try_from(caps::PROTOCOL_41).unwrap().to_le_bytes());
        response[28] = 0x0c;
        request_ssl(&mut response);
        assert_ne!(
            u32::from_le_bytes(response[..4].try_into().unwrap()) & 0x800,
            0
        );
        let req = ssl_request(&response).unwrap();
        assert_eq!(
            &req[..],
            &response[..32],
            "the response's fixed part, SSL set"
        );
        assert!(matches!(
            adjust_handshake_response(&mut req.clone()),
            Ok(ClientHello::SslRequest)
        ));
        assert!(ssl_request(&response[..31]).is_none());
    }

    #[test]
    fn every_prefix_of_a_message_is_incomplete() {
        let q = packet(0, b"\x03SELECT 1");
        for i in 0..q.len() {
            let mut b = BytesMut::from(&q[..i]);
            assert_eq!(
                decode_message(&mut b, 0, 1 << 20).unwrap(),
                None,
                "prefix {i}"
            );
        }
        let mut b = BytesMut::from(&q[..]);
        let m = decode_message(&mut b, 0, 1 << 20).unwrap().unwrap();
        assert_eq!(&m.payload()[..], b"\x03SELECT 1");
        assert_eq!((m.first_seq, m.last_seq, m.len), (0, 0, 9));
        assert!(b.is_empty());
    }

    #[test]
    fn payloads_of_16_mib_and_more_span_packets() {
        for n in [MAX_PACKET - 1, MAX_PACKET, MAX_PACKET + 1, 2 * MAX_PACKET] {
            let payload: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let wire = packet(0, &payload);
            let packets = n / MAX_PACKET + 1;
            assert_eq!(wire.len(), n + HEADER * packets);
            // A prefix cut inside the last header is incomplete.
            let mut b = BytesMut::from(&wire[..wire.len() - 2]);
            assert_eq!(decode_message(&mut b, 0, usize::MAX).unwrap(), None);
            let mut b = BytesMut::from(&wire[..]);
            let m = decode_message(&mut b, 0, usize::MAX).unwrap().unwrap();
            assert_eq!(m.len, n);
            assert_eq!(usize::from(m.last_seq), packets - 1);
            assert!(m.payload()[..] == payload[..]);
            assert_eq!(m.bytes, wire);
        }
    }

    #[test]
    fn sequence_ids_are_validated() {
        let mut b = BytesMut::from(&packet(3, b"\x0e")[..]);
        assert_eq!(
            decode_message(&mut b, 0, 100),
            Err(CodecError::OutOfOrder {
                expected: 0,
                got: 3
            })
        );
        // Second packet of a run with the wrong id.
        let mut wire = BytesMut::new();
        wire.put_slice(&[0xff, 0xff, 0xff, 0]);
        wire.put_slice(&vec![b'a'; MAX_PACKET]);
        wire.put_slice(&[1, 0, 0, 5, b'a']);
        assert!(matches!(
            decode_message(&mut wire, 0, usize::MAX),
            Err(CodecError::OutOfOrder {
                expected: 1,
                got: 5
            })
        ));
    }

    #[test]
    fn lengths_are_checked_on_the_header() {
        // Header alone: too large before a byte of payload arrives.
        let mut b = BytesMut::from(&[0xff, 0xff, 0xff, 0][..]);
        assert!(matches!(
            decode_message(&mut b, 0, 1 << 20),
            Err(CodecError::FrameTooLarge { .. })
        ));
        let mut b = BytesMut::from(&[0x10, 0, 0, 0][..]);
        assert_eq!(decode_message(&mut b, 0, 16).unwrap(), None);
        let mut b = BytesMut::from(&[0x11, 0, 0, 0][..]);
        assert!(decode_message(&mut b, 0, 16).is_err());
    }

    #[test]
    fn greeting_capabilities_are_cleared_in_place() {
        let mut g = mariadb_greeting();
        let before = g.clone();
        let info = adjust_greeting(&mut g).unwrap();
        assert_eq!(info.server_version, "5.5.5-10.11.19-MariaDB-0+deb12u1");
        assert_eq!(info.connection_id, 7);
        assert_eq!(info.auth_plugin.as_deref(), Some("mysql_native_password"));
        assert_ne!(info.capabilities & caps::SSL, 0);
        assert_ne!(info.capabilities & caps::MARIADB_PROGRESS, 0);
        assert_eq!(g.len(), before.len());
        let again = adjust_greeting(&mut g.clone()).unwrap();
        assert_eq!(again.capabilities & caps::CLEARED, 0);
        assert_eq!(
            again.capabilities,
            info.capabilities & !caps::CLEARED,
            "only the cleared bits change"
        );
        assert_ne!(again.capabilities & caps::MARIADB_EXTENDED_TYPE_INFO, 0);
        // The agent's own offer of TLS, on top.
        offer_ssl(&mut g).unwrap();
        let offered = adjust_greeting(&mut g.clone()).unwrap();
        assert_eq!(offered.capabilities, again.capabilities | caps::SSL);
    }

    #[test]
    fn greetings_that_are_not_mysql() {
        for bad in [
            &b"HTTP/1.1 400 Bad Request\r\n"[..],
            b"",
            b"\x0a",
            b"\x0a5.7\0\x01\x02",
            b"SSH-2.0-OpenSSH_9.2p1\r\n",
        ] {
            assert!(adjust_greeting(&mut bad.to_vec()).is_err(), "{bad:?}");
        }
        assert_eq!(
            adjust_greeting(&mut [9, b'x', 0]),
            Err(CodecError::Unsupported("server protocol version 9"))
        );
    }

    #[test]
    fn handshake_response_is_read_and_adjusted() {
        let c = caps::PROTOCOL_41
            | caps::SECURE_CONNECTION
            | caps::CONNECT_WITH_DB
            | caps::PLUGIN_AUTH
            | caps::CONNECT_ATTRS
            | caps::COMPRESS
            | caps::MULTI_STATEMENTS;
        let mut p = handshake_response(u32::try_from(c).unwrap(), 0x3d);
        let len = p.len();
        let ClientHello::Response(r) = adjust_handshake_response(&mut p).unwrap() else {
            panic!("not a response");
        };
        assert_eq!(p.len(), len);
        assert_eq!(r.user, "app");
        assert_eq!(r.database.as_deref(), Some("orders"));
        assert_eq!(r.auth_plugin.as_deref(), Some("mysql_native_password"));
        assert_eq!(r.program_name.as_deref(), Some("mariadb"));
        assert_eq!(r.capabilities & caps::CLEARED, 0);
        assert_ne!(r.capabilities & caps::MULTI_STATEMENTS, 0);
        assert_eq!(p[0] & 0x20, 0, "COMPRESS cleared on the wire");
        assert_eq!(p[28] & 0x01, 0, "MariaDB progress cleared on the wire");
        // Every truncation is an error or a shorter read, never a panic.
        let full = handshake_response(u32::try_from(c).unwrap(), 0);
        for i in 0..full.len() {
            let _ = adjust_handshake_response(&mut full[..i].to_vec());
        }
        assert!(adjust_handshake_response(&mut full[..40].to_vec()).is_err());
    }

    #[test]
    fn ssl_request_and_old_clients() {
        let c = u32::try_from(caps::PROTOCOL_41 | caps::SSL).unwrap();
        let mut p = handshake_response(c, 0);
        p.truncate(32);
        assert_eq!(
            adjust_handshake_response(&mut p).unwrap(),
            ClientHello::SslRequest
        );
        let mut old = handshake_response(0x8000, 0);
        assert!(matches!(
            adjust_handshake_response(&mut old),
            Err(CodecError::Unsupported(_))
        ));
    }

    #[test]
    fn err_packets_round_trip() {
        let e = err_packet(3, 1142, Some("42000"), "interceptor: denied");
        let h = decode_header(&e).unwrap();
        assert_eq!((h.seq, h.len), (3, e.len() - 4));
        let f = err_fields(&e[4..]).unwrap();
        assert_eq!(f.code, 1142);
        assert_eq!(f.sqlstate, Some(&b"42000"[..]));
        assert_eq!(f.message, b"interceptor: denied");
        let pre = err_packet(0, 1043, None, "bad handshake");
        assert_eq!(err_fields(&pre[4..]).unwrap().message, b"bad handshake");
    }

    #[test]
    fn small_decoders() {
        assert_eq!(lenenc_int(&[0xfa]), Some((250, &[][..])));
        assert_eq!(lenenc_int(&[0xfc, 1, 2, 9]), Some((0x0201, &[9][..])));
        assert_eq!(lenenc_int(&[0xfd, 1, 2]), None);
        assert_eq!(lenenc_int(&[0xff]), None);
        assert_eq!(ok_status(&[0, 0, 0, 0x08, 0, 0, 0]), Some(8));
        assert_eq!(ok_status(&[0, 0xfc, 1]), None);
        assert_eq!(eof_status(&[0xfe, 0, 0, 0x40, 0]), Some(0x40));
        let ok = [0, 9, 0, 0, 0, 2, 0, 1, 0, 0, 0, 0];
        assert_eq!(
            prepare_ok(&ok),
            Some(PrepareOk {
                statement_id: 9,
                columns: 2,
                params: 1
            })
        );
        assert_eq!(statement_id(&[0x17, 1, 0, 0]), None);
        assert_eq!(quote_ident("a`b"), "`a``b`");
        let cu = change_user(b"\x11bob\0\x02xxshop\0\x21\0", caps::SECURE_CONNECTION).unwrap();
        assert_eq!(
            (cu.user.as_str(), cu.database.as_deref()),
            ("bob", Some("shop"))
        );
        assert!(change_user(b"\x11bob\0\x09xx", caps::SECURE_CONNECTION).is_err());
    }

    proptest::proptest! {
        /// No peer bytes make the decoders panic; whatever they accept
        /// keeps its length.
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let mut b = BytesMut::from(&bytes[..]);
            let _ = decode_message(&mut b, 0, 200);
            let mut g = bytes.clone();
            if adjust_greeting(&mut g).is_ok() {
                proptest::prop_assert_eq!(g.len(), bytes.len());
            }
            let mut r = bytes.clone();
            let _ = adjust_handshake_response(&mut r);
            proptest::prop_assert_eq!(r.len(), bytes.len());
            let _ = change_user(&bytes, caps::SECURE_CONNECTION);
            let _ = change_user(&bytes, 0);
            let _ = err_fields(&bytes);
            let _ = ok_status(&bytes);
            let _ = prepare_ok(&bytes);
            let _ = lenenc_bytes(&bytes);
        }

        /// A greeting whose bytes after the version are anything.
        #[test]
        fn greetings_never_panic(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..80)) {
            let mut g = b"\x0a8.0.36\0".to_vec();
            g.extend_from_slice(&tail);
            let _ = adjust_greeting(&mut g);
        }
    }
}
