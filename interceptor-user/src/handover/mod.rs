//! Restart without a gap: a new agent takes the running agent's listening
//! sockets (the agent's own and those in workload network namespaces, with
//! the namespaces' fds) over a unix `SOCK_SEQPACKET` socket in the state
//! directory, as `SCM_RIGHTS`. The sockets themselves change hands, so no
//! connection queued on them is lost, and none is refused: both agents
//! accept from them until the old one stops accepting, then it drains its
//! own connections and exits. The new agent opens the audit log only once
//! the old one has exited, so the hash chain has one writer at a time.

use std::{
    io::{IoSlice, IoSliceMut},
    net::{SocketAddr, TcpListener},
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
};

use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, accept, bind, connect, listen, recvmsg, sendmsg, socket,
};
use serde::{Deserialize, Serialize};

/// Largest header; fds per message stay below the kernel's SCM_MAX_FD (253).
const MAX_MESSAGE: usize = 64 * 1024;
const MAX_FDS: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("handover socket {path}: {source}")]
    Socket { path: String, source: nix::Error },
    #[error("handover: {0}")]
    Protocol(String),
}

/// One message: what the fds that come with it are.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Message {
    /// The agent's own listeners.
    Home {
        pid: u32,
        port: u16,
    },
    /// A workload namespace: its fd first, then its listeners.
    Guest {
        cookie: u64,
        inode: u64,
        families: u32,
        listen: Vec<SocketAddr>,
    },
    End,
}

/// A namespace's listeners, as handed over.
pub struct GuestSockets {
    pub cookie: u64,
    pub inode: u64,
    pub families: u32,
    pub listen: Vec<SocketAddr>,
    pub ns: OwnedFd,
    pub listeners: Vec<TcpListener>,
}

/// Everything a running agent hands over.
pub struct Sockets {
    /// The old agent's pid, to wait for its exit.
    pub pid: u32,
    pub port: u16,
    pub home: Vec<TcpListener>,
    pub guests: Vec<GuestSockets>,
}

fn sock_err(path: &Path) -> impl Fn(nix::Error) -> HandoverError + '_ {
    move |source| HandoverError::Socket {
        path: path.display().to_string(),
        source,
    }
}

fn send(fd: &OwnedFd, msg: &Message, fds: &[RawFd]) -> Result<(), HandoverError> {
    let body = serde_json::to_vec(msg).map_err(|e| HandoverError::Protocol(e.to_string()))?;
    let iov = [IoSlice::new(&body)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<UnixAddr>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
        .map_err(|e| HandoverError::Protocol(format!("send: {e}")))?;
    Ok(())
}

fn recv(fd: &OwnedFd) -> Result<(Message, Vec<OwnedFd>), HandoverError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<UnixAddr>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| HandoverError::Protocol(format!("receive: {e}")))?;
    let mut fds = Vec::new();
    for c in msg
        .cmsgs()
        .map_err(|e| HandoverError::Protocol(e.to_string()))?
    {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for r in raw {
                // SAFETY: the kernel installed these fds in this process for
                // us alone (SCM_RIGHTS); each is owned exactly once here.
                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
            }
        }
    }
    let n = msg.bytes;
    if msg.flags.contains(MsgFlags::MSG_TRUNC) || msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(HandoverError::Protocol("message truncated".into()));
    }
    let body = buf.get(..n).unwrap_or_default();
    let m = serde_json::from_slice(body).map_err(|e| HandoverError::Protocol(e.to_string()))?;
    Ok((m, fds))
}

fn seqpacket() -> nix::Result<OwnedFd> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// Takes the sockets of the agent serving `path`, if one does. `None` when
/// nobody listens there (no agent, or one that died: its socket file is
/// removed).
///
/// # Errors
/// When an agent answers but the exchange fails.
pub fn take(path: &Path) -> Result<Option<Sockets>, HandoverError> {
    let fd = seqpacket().map_err(sock_err(path))?;
    let addr = UnixAddr::new(path).map_err(sock_err(path))?;
    if let Err(e) = connect(fd.as_raw_fd(), &addr) {
        if matches!(e, nix::Error::ECONNREFUSED) {
            let _ = std::fs::remove_file(path);
        }
        return Ok(None);
    }
    send(&fd, &Message::End, &[])?;
    let mut out = Sockets {
        pid: 0,
        port: 0,
        home: Vec::new(),
        guests: Vec::new(),
    };
    loop {
        let (msg, fds) = recv(&fd)?;
        match msg {
            Message::Home { pid, port } => {
                out.pid = pid;
                out.port = port;
                out.home.extend(fds.into_iter().map(TcpListener::from));
            }
            Message::Guest {
                cookie,
                inode,
                families,
                listen,
            } => {
                let mut fds = fds.into_iter();
                let ns = fds
                    .next()
                    .ok_or_else(|| HandoverError::Protocol("guest without its namespace".into()))?;
                out.guests.push(GuestSockets {
                    cookie,
                    inode,
                    families,
                    listen,
                    ns,
                    listeners: fds.map(TcpListener::from).collect(),
                });
            }
            Message::End => return Ok(Some(out)),
        }
    }
}

/// What a running agent offers: borrowed for the send.
pub struct Offer<'a> {
    pub port: u16,
    pub home: &'a [TcpListener],
    pub guests: Vec<(GuestOffer<'a>, &'a OwnedFd, Vec<&'a TcpListener>)>,
}

/// A guest namespace's description in an [`Offer`].
pub struct GuestOffer<'a> {
    pub cookie: u64,
    pub inode: u64,
    pub families: u32,
    pub listen: &'a [SocketAddr],
}

/// Listens for a successor at `path` (replacing a stale socket file).
///
/// # Errors
/// When the socket cannot be made or bound.
pub fn listen_at(path: &Path) -> Result<OwnedFd, HandoverError> {
    let _ = std::fs::remove_file(path);
    let fd = seqpacket().map_err(sock_err(path))?;
    let addr = UnixAddr::new(path).map_err(sock_err(path))?;
    bind(fd.as_raw_fd(), &addr).map_err(sock_err(path))?;
    listen(&fd, Backlog::new(4).map_err(sock_err(path))?).map_err(sock_err(path))?;
    Ok(fd)
}

/// Waits for a successor on `listener` (blocking) and returns the
/// connection, once it asked.
///
/// # Errors
/// When accepting fails.
pub fn accept_successor(listener: &OwnedFd) -> Result<OwnedFd, HandoverError> {
    let raw = accept(listener.as_raw_fd())
        .map_err(|e| HandoverError::Protocol(format!("accept: {e}")))?;
    // SAFETY: accept returned a new fd owned by nobody else.
    let conn = unsafe { OwnedFd::from_raw_fd(raw) };
    let (_request, _) = recv(&conn)?;
    Ok(conn)
}

/// Sends `offer` to a successor that asked on `conn`.
///
/// # Errors
/// When sending fails.
pub fn give(conn: &OwnedFd, offer: &Offer<'_>) -> Result<(), HandoverError> {
    for chunk in offer.home.chunks(MAX_FDS) {
        let fds: Vec<RawFd> = chunk.iter().map(|l| l.as_fd().as_raw_fd()).collect();
        send(
            conn,
            &Message::Home {
                pid: std::process::id(),
                port: offer.port,
            },
            &fds,
        )?;
    }
    for (g, ns, listeners) in &offer.guests {
        let mut fds = vec![ns.as_raw_fd()];
        fds.extend(listeners.iter().map(|l| l.as_fd().as_raw_fd()));
        send(
            conn,
            &Message::Guest {
                cookie: g.cookie,
                inode: g.inode,
                families: g.families,
                listen: g.listen.to_vec(),
            },
            &fds,
        )?;
    }
    send(conn, &Message::End, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_change_hands_and_keep_their_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sock");
        assert!(take(&path).unwrap().is_none(), "nobody there yet");
        let server = listen_at(&path).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // A client queued on the old agent's listener before the handover.
        let _queued = std::net::TcpStream::connect(addr).unwrap();
        let home = [l];
        let t = std::thread::spawn(move || {
            let conn = accept_successor(&server).unwrap();
            give(
                &conn,
                &Offer {
                    port: addr.port(),
                    home: &home,
                    guests: Vec::new(),
                },
            )
            .unwrap();
        });
        let got = take(&path).unwrap().unwrap();
        t.join().unwrap();
        assert_eq!((got.port, got.home.len()), (addr.port(), 1));
        assert_eq!(got.pid, std::process::id());
        // The same socket: the queued connection is there to accept.
        let (_s, _) = got.home[0].accept().unwrap();
        assert_eq!(got.home[0].local_addr().unwrap(), addr);
    }
}
