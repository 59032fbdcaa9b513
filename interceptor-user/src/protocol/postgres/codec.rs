//! PostgreSQL frames (protocol 3.x): the untagged startup-phase packets and
//! the tagged messages after them. Framing only: "incomplete" is a normal
//! outcome, lengths are checked on the header before anything is buffered,
//! and allowed traffic is forwarded as the bytes it arrived as.

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};

/// Protocol 3.0 in a StartupMessage.
pub const PROTOCOL_3_0: u32 = 196_608;
pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;
pub const CANCEL_REQUEST: u32 = 80_877_102;
/// Largest startup packet the server itself accepts.
pub const MAX_STARTUP: usize = 10_000;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("invalid message length {len} for message type {tag:?}")]
    BadLength { tag: char, len: u32 },
    #[error("message of type {tag:?} is {len} bytes, over the {max}-byte limit")]
    FrameTooLarge { tag: char, len: usize, max: usize },
    #[error("invalid startup packet length {0}")]
    BadStartupLength(u32),
    #[error("unsupported frontend protocol {major}.{minor}")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("malformed {0} message")]
    Malformed(&'static str),
    #[error("{0}")]
    Unexpected(&'static str),
}

/// Header of a tagged message: type byte and total size on the wire
/// (type byte + length word + body).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    pub total: usize,
}

/// Reads a tagged message header. `Ok(None)` when fewer than 5 bytes are
/// there. The length is validated against `max` before anything is buffered.
///
/// # Errors
/// A length below 4 or above `max`.
pub fn decode_header(buf: &[u8], max: usize) -> Result<Option<Header>, CodecError> {
    let Some(h) = buf.get(..5) else {
        return Ok(None);
    };
    let tag = h[0];
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
    if len < 4 {
        return Err(CodecError::BadLength {
            tag: char::from(tag),
            len,
        });
    }
    let total = len as usize + 1;
    if total > max {
        return Err(CodecError::FrameTooLarge {
            tag: char::from(tag),
            len: total,
            max,
        });
    }
    Ok(Some(Header { tag, total }))
}

/// A whole tagged message with its direction's meaning left to the caller
/// (`'D'` is Describe from a client and DataRow from a server).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    /// The whole message, header included: forwarded as is.
    pub bytes: Bytes,
}

impl Frame {
    /// The message body after the 5-byte header.
    #[must_use]
    pub fn body(&self) -> &[u8] {
        self.bytes.get(5..).unwrap_or_default()
    }
}

/// Splits one complete tagged message off `buf`.
///
/// # Errors
/// As [`decode_header`].
pub fn decode_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, CodecError> {
    let Some(h) = decode_header(buf, max)? else {
        return Ok(None);
    };
    if buf.len() < h.total {
        buf.reserve(h.total - buf.len());
        return Ok(None);
    }
    Ok(Some(Frame {
        tag: h.tag,
        bytes: buf.split_to(h.total).freeze(),
    }))
}

/// The first packet of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartupPacket {
    Ssl,
    GssEnc,
    Cancel { pid: u32, secret: Bytes },
    Startup(StartupMessage),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartupMessage {
    /// The packet as received, forwarded unchanged.
    pub bytes: Bytes,
    pub user: String,
    pub database: String,
    pub application_name: Option<String>,
}

/// Splits the first packet (length word, then a code) off `buf`.
///
/// # Errors
/// A length outside 8..=10000, an unknown code or protocol, or a startup
/// message whose parameters are not NUL-terminated pairs.
pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>, CodecError> {
    let Some(h) = buf.get(..8) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    let code = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    if !(8..=MAX_STARTUP as u32).contains(&len) {
        return Err(CodecError::BadStartupLength(len));
    }
    if buf.len() < len as usize {
        return Ok(None);
    }
    // A copy, not a view: the startup message is kept for the whole
    // session, and a view would keep the connection's first read buffer
    // (4 KiB) alive with it.
    let packet = Bytes::copy_from_slice(&buf[..len as usize]);
    buf.advance(len as usize);
    match code {
        SSL_REQUEST if len == 8 => Ok(Some(StartupPacket::Ssl)),
        GSSENC_REQUEST if len == 8 => Ok(Some(StartupPacket::GssEnc)),
        // Protocol 3.2 allows longer cancel keys than 4 bytes.
        CANCEL_REQUEST if len >= 16 => {
            let pid = u32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
            Ok(Some(StartupPacket::Cancel {
                pid,
                secret: packet.slice(12..),
            }))
        }
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => Err(CodecError::BadStartupLength(len)),
        c if c >> 16 == 3 => parse_startup(packet).map(|m| Some(StartupPacket::Startup(m))),
        c => Err(CodecError::UnsupportedProtocol {
            major: (c >> 16) as u16,
            minor: (c & 0xffff) as u16,
        }),
    }
}

fn parse_startup(bytes: Bytes) -> Result<StartupMessage, CodecError> {
    let mut params = bytes.get(8..).unwrap_or_default();
    let (mut user, mut database, mut app) = (None, None, None);
    loop {
        let (key, rest) = cstr(params).ok_or(CodecError::Malformed("StartupMessage"))?;
        if key.is_empty() {
            break;
        }
        let (value, rest) = cstr(rest).ok_or(CodecError::Malformed("StartupMessage"))?;
        match key {
            "user" => user = Some(value.to_owned()),
            "database" => database = Some(value.to_owned()),
            "application_name" => app = Some(value.to_owned()),
            _ => {}
        }
        params = rest;
    }
    let user = user.ok_or(CodecError::Malformed("StartupMessage without user"))?;
    Ok(StartupMessage {
        database: database.unwrap_or_else(|| user.clone()),
        user,
        application_name: app,
        bytes,
    })
}

/// A NUL-terminated UTF-8 string at the start of `b`, and what follows it.
#[must_use]
pub fn cstr(b: &[u8]) -> Option<(&str, &[u8])> {
    let end = b.iter().position(|c| *c == 0)?;
    let s = std::str::from_utf8(&b[..end]).ok()?;
    Some((s, &b[end + 1..]))
}

/// Query ('Q'): the SQL text.
///
/// # Errors
/// When the body is not one NUL-terminated string.
pub fn query_sql(body: &[u8]) -> Result<&str, CodecError> {
    match cstr(body) {
        Some((sql, [])) => Ok(sql),
        _ => Err(CodecError::Malformed("Query")),
    }
}

/// Parse ('P'): statement name and SQL text.
#[derive(Debug, PartialEq, Eq)]
pub struct ParseMessage<'a> {
    pub name: &'a str,
    pub sql: &'a str,
}

/// # Errors
/// When the body does not hold name, query and a parameter-type count that fits.
pub fn parse_message(body: &[u8]) -> Result<ParseMessage<'_>, CodecError> {
    let bad = CodecError::Malformed("Parse");
    let (name, rest) = cstr(body).ok_or(bad.clone())?;
    let (sql, rest) = cstr(rest).ok_or(bad.clone())?;
    let n = rest.get(..2).ok_or(bad.clone())?;
    let n = usize::from(u16::from_be_bytes([n[0], n[1]]));
    if rest.len() != 2 + 4 * n {
        return Err(bad);
    }
    Ok(ParseMessage { name, sql })
}

/// FunctionCall ('F'): the function's OID.
///
/// # Errors
/// When the body is shorter than an OID.
pub fn function_call_oid(body: &[u8]) -> Result<u32, CodecError> {
    body.get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(CodecError::Malformed("FunctionCall"))
}

/// BackendKeyData ('K'): process id and secret key.
#[must_use]
pub fn backend_key(body: &[u8]) -> Option<(u32, Bytes)> {
    let pid = body.get(..4)?;
    Some((
        u32::from_be_bytes([pid[0], pid[1], pid[2], pid[3]]),
        Bytes::copy_from_slice(body.get(4..)?),
    ))
}

/// Fields of an ErrorResponse or NoticeResponse.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ErrorFields<'a> {
    pub code: Option<&'a str>,
    pub message: Option<&'a str>,
}

#[must_use]
pub fn error_fields(body: &[u8]) -> ErrorFields<'_> {
    let mut out = ErrorFields::default();
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let Some((value, tail)) = cstr(tail) else {
            break;
        };
        match field {
            b'C' => out.code = Some(value),
            b'M' => out.message = Some(value),
            _ => {}
        }
        rest = tail;
    }
    out
}

/// Builds an ErrorResponse (or NoticeResponse with `tag` `'N'`).
#[must_use]
pub fn error_response(
    tag: u8,
    severity: &str,
    code: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) -> Bytes {
    let mut body = BytesMut::with_capacity(64 + message.len());
    let mut field = |f: u8, v: &str| {
        body.put_u8(f);
        // A NUL inside a field would end it early; never forge structure.
        body.put_slice(v.replace('\0', " ").as_bytes());
        body.put_u8(0);
    };
    field(b'S', severity);
    field(b'V', severity);
    field(b'C', code);
    field(b'M', message);
    if let Some(d) = detail {
        field(b'D', d);
    }
    if let Some(h) = hint {
        field(b'H', h);
    }
    body.put_u8(0);
    frame(tag, &body)
}

/// A tagged message from a body.
#[must_use]
pub fn frame(tag: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(tag);
    out.put_u32(u32::try_from(body.len() + 4).unwrap_or(u32::MAX));
    out.put_slice(body);
    out.freeze()
}

/// A Query message carrying `sql`.
#[must_use]
pub fn query_message(sql: &str) -> Bytes {
    let mut body = Vec::with_capacity(sql.len() + 1);
    body.extend_from_slice(sql.as_bytes());
    body.push(0);
    frame(b'Q', &body)
}

/// A Parse message for `name` and `sql`, with no parameter types.
#[must_use]
pub fn parse_frame(name: &str, sql: &str) -> Bytes {
    let mut body = Vec::with_capacity(name.len() + sql.len() + 4);
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    body.extend_from_slice(sql.as_bytes());
    body.push(0);
    body.extend_from_slice(&[0, 0]);
    frame(b'P', &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_bytes() -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
        for s in [
            "user",
            "app",
            "database",
            "orders",
            "application_name",
            "psql",
            "",
        ] {
            body.extend_from_slice(s.as_bytes());
            body.push(0);
        }
        let mut out = u32::try_from(body.len() + 4)
            .unwrap()
            .to_be_bytes()
            .to_vec();
        out.extend(body);
        out
    }

    #[test]
    fn startup_every_prefix_is_incomplete() {
        let full = startup_bytes();
        for i in 0..full.len() {
            let mut b = BytesMut::from(&full[..i]);
            assert_eq!(decode_startup(&mut b).unwrap(), None, "prefix {i}");
        }
        let mut b = BytesMut::from(&full[..]);
        let Some(StartupPacket::Startup(m)) = decode_startup(&mut b).unwrap() else {
            panic!("not a startup message");
        };
        assert_eq!((m.user.as_str(), m.database.as_str()), ("app", "orders"));
        assert_eq!(m.application_name.as_deref(), Some("psql"));
        assert_eq!(&m.bytes[..], &full[..]);
        assert!(b.is_empty());
    }

    #[test]
    fn special_startup_packets() {
        let mut b = BytesMut::from(&[0, 0, 0, 8, 4, 210, 22, 47][..]);
        assert_eq!(decode_startup(&mut b).unwrap(), Some(StartupPacket::Ssl));
        let mut b = BytesMut::from(&[0, 0, 0, 8, 4, 210, 22, 48][..]);
        assert_eq!(decode_startup(&mut b).unwrap(), Some(StartupPacket::GssEnc));
        let mut c = vec![0, 0, 0, 16, 4, 210, 22, 46, 0, 0, 0, 42, 1, 2, 3, 4];
        let mut b = BytesMut::from(&c[..]);
        let Some(StartupPacket::Cancel { pid, secret }) = decode_startup(&mut b).unwrap() else {
            panic!("not a cancel");
        };
        assert_eq!((pid, &secret[..]), (42, &[1, 2, 3, 4][..]));
        c[3] = 12;
        assert!(decode_startup(&mut BytesMut::from(&c[..12])).is_err());
    }

    #[test]
    fn malformed_startup_is_an_error() {
        // Garbage: an HTTP request is a huge length.
        assert!(decode_startup(&mut BytesMut::from(&b"GET / HTTP/1.1\r\n"[..])).is_err());
        // Too short, protocol 2.0, parameters without a terminator.
        assert!(decode_startup(&mut BytesMut::from(&[0, 0, 0, 4, 0, 0, 0, 0][..])).is_err());
        assert!(decode_startup(&mut BytesMut::from(&[0, 0, 0, 8, 0, 2, 0, 0][..])).is_err());
        let mut bad = vec![0, 0, 0, 13, 0, 3, 0, 0];
        bad.extend_from_slice(b"user\0");
        assert!(decode_startup(&mut BytesMut::from(&bad[..])).is_err());
    }

    #[test]
    fn tagged_every_prefix_is_incomplete() {
        let q = query_message("SELECT 1");
        for i in 0..q.len() {
            let mut b = BytesMut::from(&q[..i]);
            assert_eq!(decode_frame(&mut b, 1 << 20).unwrap(), None, "prefix {i}");
        }
        let mut b = BytesMut::from(&q[..]);
        let f = decode_frame(&mut b, 1 << 20).unwrap().unwrap();
        assert_eq!(f.tag, b'Q');
        assert_eq!(query_sql(f.body()).unwrap(), "SELECT 1");
    }

    #[test]
    fn lengths_are_checked_on_the_header() {
        assert!(matches!(
            decode_header(&[b'Q', 0, 0, 0, 3], 100),
            Err(CodecError::BadLength { .. })
        ));
        assert!(matches!(
            decode_header(&[b'Q', 0x7f, 0xff, 0xff, 0xff], 1 << 20),
            Err(CodecError::FrameTooLarge { .. })
        ));
        assert_eq!(decode_header(&[b'Q', 0, 0], 100).unwrap(), None);
    }

    #[test]
    fn parse_messages() {
        let p = parse_frame("s1", "SELECT $1");
        let m = parse_message(&p[5..]).unwrap();
        assert_eq!((m.name, m.sql), ("s1", "SELECT $1"));
        assert!(parse_message(b"s1\0SELECT 1\0\0\x01").is_err());
        assert!(parse_message(b"s1\0SELECT 1").is_err());
        assert!(query_sql(b"SELECT 1").is_err());
        assert!(query_sql(b"SELECT 1\0junk").is_err());
    }

    #[test]
    fn error_responses_round_trip_and_never_forge_fields() {
        let e = error_response(b'E', "ERROR", "42501", "no\0C99999", Some("d"), None);
        let f = error_fields(&e[5..]);
        assert_eq!(f.code, Some("42501"));
        assert_eq!(f.message, Some("no C99999"));
    }
}
