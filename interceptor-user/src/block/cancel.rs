//! Stopping a blocked connection's statement on the server, before its
//! client side is closed (a closed client does not stop a running
//! statement).
//!
//! - PostgreSQL: a CancelRequest with the session's own BackendKeyData on a
//!   new connection to the same server; no credentials needed.
//! - MySQL/MariaDB: `KILL QUERY <thread id>` over a side connection that
//!   logs in with the target's `admin` credentials (`mysql_native_password`,
//!   following an AuthSwitchRequest to it). MariaDB lets an account kill
//!   its own threads, so the workload's own database user is enough; any
//!   other needs the CONNECTION ADMIN (MariaDB) or CONNECTION_ADMIN/SUPER
//!   (MySQL) privilege.
//!
//! Plain blocking sockets with short timeouts: these run on their own
//! threads, a handful per block command, never on the data path. Every
//! socket carries the agent's SO_MARK so the kernel programs let it go
//! direct. Peer input is bounded and never trusted: a bad server is an
//! error value, not a panic.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use socket2::{Domain, Socket, Type};

use crate::{
    conn::{CancelKey, Netns},
    policy::AdminSpec,
    protocol::mysql::login::native_scramble,
};

/// Connect, read and write timeout of each side connection.
pub const TIMEOUT: Duration = Duration::from_millis(1000);
/// Largest server packet read on a side connection.
const MAX_PACKET: usize = 64 * 1024;
const CANCEL_REQUEST_CODE: u32 = 80_877_102;

/// Sends the cancel for one connection.
///
/// # Errors
/// A message saying why the server could not be asked.
pub fn cancel(to: &Server, key: &CancelKey, admin: Option<&AdminSpec>) -> Result<(), String> {
    match key {
        CancelKey::Postgres { pid, secret } => postgres_cancel(to, *pid, secret),
        CancelKey::Mysql { thread_id } => {
            let admin = admin.ok_or(
                "no admin credentials for this target: the statement was not cancelled on the server",
            )?;
            let password = admin.password()?;
            let password = password.expose();
            mysql_kill_query(to, &admin.user, password, *thread_id)
        }
    }
}

/// The server of a connection to cancel, and where to reach it from.
pub struct Server {
    pub dst: SocketAddr,
    pub mark: u32,
    /// The workload's network namespace: the side connection takes the
    /// same route as the connection it cancels.
    pub netns: Option<std::sync::Arc<Netns>>,
    /// A unix target's socket path (then `dst` is unused).
    pub unix: Option<std::path::PathBuf>,
}

/// A side connection to the server.
enum Side {
    Tcp(TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Read for Side {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Side {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => s.flush(),
            Self::Unix(s) => s.flush(),
        }
    }
}

fn connect(to: &Server) -> Result<Side, String> {
    if let Some(path) = &to.unix {
        // The agent's own connect: exempt from the unix hook by its tgid.
        let e = |err: std::io::Error| format!("connect to unix:{}: {err}", path.display());
        let s = std::os::unix::net::UnixStream::connect(path).map_err(e)?;
        s.set_read_timeout(Some(TIMEOUT))
            .and_then(|()| s.set_write_timeout(Some(TIMEOUT)))
            .map_err(e)?;
        return Ok(Side::Unix(s));
    }
    let (dst, mark) = (to.dst, to.mark);
    let e = |what: &str, err: std::io::Error| format!("{what} {dst}: {err}");
    let make = || Socket::new(Domain::for_address(dst), Type::STREAM, None);
    let sock = match &to.netns {
        Some(ns) => ns.enter(make),
        None => make(),
    }
    .map_err(|err| e("socket for", err))?;
    if mark != 0 {
        sock.set_mark(mark).map_err(|err| e("SO_MARK for", err))?;
    }
    sock.connect_timeout(&dst.into(), TIMEOUT)
        .map_err(|err| e("connect to", err))?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(TIMEOUT)))
        .and_then(|()| s.set_nodelay(true))
        .map_err(|err| e("socket options for", err))?;
    Ok(Side::Tcp(s))
}

/// The CancelRequest packet (protocol 3.2 keys may be longer than 4 bytes).
#[must_use]
pub fn cancel_request(pid: u32, secret: &[u8]) -> Vec<u8> {
    let len = u32::try_from(12 + secret.len()).unwrap_or(u32::MAX);
    let mut p = Vec::with_capacity(12 + secret.len());
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    p.extend_from_slice(&pid.to_be_bytes());
    p.extend_from_slice(secret);
    p
}

fn postgres_cancel(to: &Server, pid: u32, secret: &[u8]) -> Result<(), String> {
    let dst = to.dst;
    let mut s = connect(to)?;
    s.write_all(&cancel_request(pid, secret))
        .map_err(|e| format!("sending CancelRequest to {dst}: {e}"))?;
    // The server acts on the request and closes without answering; waiting
    // for that makes sure it was read before the client side goes.
    let mut sink = [0u8; 64];
    let _ = s.read(&mut sink);
    Ok(())
}

fn read_packet(s: &mut Side) -> Result<(u8, Vec<u8>), String> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head)
        .map_err(|e| format!("reading from the server: {e}"))?;
    let len = usize::from(head[0]) | usize::from(head[1]) << 8 | usize::from(head[2]) << 16;
    if len > MAX_PACKET {
        return Err(format!("server packet of {len} bytes is too large"));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)
        .map_err(|e| format!("reading from the server: {e}"))?;
    Ok((head[3], body))
}

fn write_packet(s: &mut Side, seq: u8, body: &[u8]) -> Result<(), String> {
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes();
    let mut p = Vec::with_capacity(4 + body.len());
    p.extend_from_slice(&[len[0], len[1], len[2], seq]);
    p.extend_from_slice(body);
    s.write_all(&p)
        .map_err(|e| format!("writing to the server: {e}"))
}

/// Error text of an ERR packet.
fn err_text(body: &[u8]) -> String {
    let code = body
        .get(1..3)
        .map_or(0, |c| u16::from_le_bytes([c[0], c[1]]));
    let mut msg = body.get(3..).unwrap_or_default();
    if msg.first() == Some(&b'#') {
        msg = msg.get(6..).unwrap_or_default();
    }
    format!("server error {code}: {}", String::from_utf8_lossy(msg))
}

/// The nonce of a protocol-10 greeting (20 bytes, both parts).
pub fn greeting_nonce(g: &[u8]) -> Result<Vec<u8>, String> {
    let bad = || "malformed server greeting".to_owned();
    if g.first() == Some(&0xff) {
        return Err(err_text(g));
    }
    if g.first() != Some(&10) {
        return Err(format!(
            "unsupported protocol version {:?}",
            g.first().copied()
        ));
    }
    let nul = g.iter().skip(1).position(|b| *b == 0).ok_or_else(bad)? + 1;
    // version NUL, thread id (4), nonce part 1 (8), filler (1), caps (2),
    // charset (1), status (2), caps upper (2), nonce length (1), reserved (10).
    let p1 = nul + 1 + 4;
    let mut nonce = g.get(p1..p1 + 8).ok_or_else(bad)?.to_vec();
    let p2 = p1 + 8 + 1 + 2 + 1 + 2 + 2 + 1 + 10;
    // Part 2 is 12 bytes and a NUL for mysql_native_password.
    nonce.extend_from_slice(g.get(p2..p2 + 12).ok_or_else(bad)?);
    Ok(nonce)
}

fn handshake_response(user: &str, auth: &[u8]) -> Vec<u8> {
    const LONG_PASSWORD: u32 = 1;
    const PROTOCOL_41: u32 = 1 << 9;
    const TRANSACTIONS: u32 = 1 << 13;
    const SECURE_CONNECTION: u32 = 1 << 15;
    const PLUGIN_AUTH: u32 = 1 << 19;
    let caps = LONG_PASSWORD | PROTOCOL_41 | TRANSACTIONS | SECURE_CONNECTION | PLUGIN_AUTH;
    let mut b = Vec::with_capacity(64 + user.len());
    b.extend_from_slice(&caps.to_le_bytes());
    b.extend_from_slice(&(16u32 << 20).to_le_bytes());
    // utf8mb4_general_ci
    b.push(45);
    b.extend_from_slice(&[0u8; 23]);
    b.extend_from_slice(user.as_bytes());
    b.push(0);
    b.push(u8::try_from(auth.len()).unwrap_or(0));
    b.extend_from_slice(auth);
    b.extend_from_slice(b"mysql_native_password\0");
    b
}

/// Logs in and runs `KILL QUERY thread_id`.
fn mysql_kill_query(to: &Server, user: &str, password: &str, thread_id: u32) -> Result<(), String> {
    let mut s = connect(to)?;
    let (_, greeting) = read_packet(&mut s)?;
    let nonce = greeting_nonce(&greeting)?;
    write_packet(
        &mut s,
        1,
        &handshake_response(user, &native_scramble(password, &nonce)),
    )?;
    let mut switched = false;
    loop {
        let (seq, reply) = read_packet(&mut s)?;
        match reply.first() {
            Some(0x00) => break,
            Some(0xff) => return Err(format!("login as {user:?}: {}", err_text(&reply))),
            Some(0xfe) if !switched => {
                // AuthSwitchRequest: plugin name NUL, then its data.
                let body = reply.get(1..).unwrap_or_default();
                let nul = body.iter().position(|b| *b == 0).unwrap_or(body.len());
                let plugin = String::from_utf8_lossy(&body[..nul]).into_owned();
                if plugin != "mysql_native_password" {
                    return Err(format!(
                        "login as {user:?}: the server wants auth plugin {plugin:?}; admin accounts must use mysql_native_password"
                    ));
                }
                let data = body.get(nul + 1..).unwrap_or_default();
                let nonce = data.strip_suffix(&[0]).unwrap_or(data);
                switched = true;
                write_packet(
                    &mut s,
                    seq.wrapping_add(1),
                    &native_scramble(password, nonce),
                )?;
            }
            _ => {
                return Err(format!(
                    "login as {user:?}: unexpected server reply during authentication"
                ));
            }
        }
    }
    let mut query = vec![0x03];
    query.extend_from_slice(format!("KILL QUERY {thread_id}").as_bytes());
    write_packet(&mut s, 0, &query)?;
    let (_, reply) = read_packet(&mut s)?;
    let result = match reply.first() {
        Some(0x00) => Ok(()),
        Some(0xff) => Err(format!("KILL QUERY {thread_id}: {}", err_text(&reply))),
        _ => Err(format!("KILL QUERY {thread_id}: unexpected server reply")),
    };
    // COM_QUIT; the server just closes.
    let _ = write_packet(&mut s, 0, &[0x01]);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greeting() -> Vec<u8> {
        let mut g = vec![10];
        g.extend_from_slice(b"11.8.3-MariaDB\0");
        g.extend_from_slice(&42u32.to_le_bytes());
        g.extend_from_slice(b"abcdefgh");
        g.push(0);
        g.extend_from_slice(&[0xfe, 0xf7, 45, 2, 0, 0xff, 0x81, 21]);
        g.extend_from_slice(&[0; 10]);
        g.extend_from_slice(b"ijklmnopqrst\0");
        g.extend_from_slice(b"mysql_native_password\0");
        g
    }

    #[test]
    fn greeting_nonce_and_truncations() {
        let g = greeting();
        assert_eq!(greeting_nonce(&g).unwrap(), b"abcdefghijklmnopqrst");
        // No prefix of a greeting panics; short ones are errors.
        for n in 0..g.len() - 23 {
            assert!(greeting_nonce(&g[..n]).is_err(), "prefix {n}");
        }
        let mut err = vec![0xff, 0x15, 0x04];
        err.extend_from_slice(b"#28000Access denied");
        assert!(greeting_nonce(&err).unwrap_err().contains("Access denied"));
    }

    #[test]
    fn cancel_request_layout() {
        let p = cancel_request(7, &[1, 2, 3, 4]);
        assert_eq!(
            p,
            [0, 0, 0, 16, 4, 210, 22, 46, 0, 0, 0, 7, 1, 2, 3, 4].to_vec()
        );
    }
}
