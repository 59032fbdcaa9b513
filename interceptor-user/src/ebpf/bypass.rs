//! The local bypass (`--local-bypass`): what the agent does on its side,
//! and the self-test that decides `auto`.
//!
//! The kernel side is in the `sk_msg` program and sock_ops (see
//! interceptor-ebpf). A socket in the bypass stops receiving by TCP, so
//! whether a workload still sees its input the way it would over TCP
//! (`poll` readiness, `FIONREAD`, a FIN after the last byte) depends on the
//! kernel's sockmap code, which changed over the years. `auto` therefore
//! tries the bypass on a connection of the agent's own before any workload
//! joins: both ends in the sockhash, bytes each way, then a half-close, and
//! checks what a workload would see. Any difference leaves it off.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd as _, AsRawFd as _},
    time::Duration,
};

use aya::maps::{HashMap, MapData, SockHash};
use interceptor_common::{BypassFlow, BypassKey};

/// `--local-bypass`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BypassMode {
    /// On where the self-test passes, else off (the reason is logged,
    /// audited in `agent_start` and shown by `status`).
    Auto,
    /// On; the agent does not start if the kernel refuses the program.
    On,
    Off,
}

impl BypassMode {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::On => "on",
            Self::Off => "off",
        }
    }
}

/// The [`BypassKey`] of a socket from its own address and its peer's.
#[must_use]
pub fn bypass_key(netns_cookie: u64, local: SocketAddr, peer: SocketAddr) -> BypassKey {
    let mapped = |a: SocketAddr| match a.ip() {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    };
    BypassKey {
        netns_cookie,
        local_addr: mapped(local),
        remote_addr: mapped(peer),
        local_port: local.port(),
        remote_port: peer.port(),
        _pad: 0,
    }
}

/// The [`BypassKey`] of a TCP socket in the network namespace
/// `netns_cookie`, from its own and its peer's addresses.
pub(super) fn key_of(netns_cookie: u64, s: socket2::SockRef<'_>) -> Result<BypassKey, String> {
    let addr = |a: std::io::Result<socket2::SockAddr>| {
        a.map_err(|e| e.to_string())?
            .as_socket()
            .ok_or_else(|| "not an IP socket".to_owned())
    };
    Ok(bypass_key(
        netns_cookie,
        addr(s.local_addr())?,
        addr(s.peer_addr())?,
    ))
}

/// Runs the self-test on a loopback connection of the agent's own, in its
/// network namespace (`netns_cookie`); `Err` says what differed.
///
/// # Errors
/// When the kernel refuses the sockets, a message does not pass the
/// bypass, or the receiving side does not see it as it would over TCP.
pub fn self_test(
    sockets: &mut SockHash<MapData, BypassKey>,
    flows: &mut HashMap<&mut MapData, BypassKey, BypassFlow>,
    netns_cookie: u64,
) -> Result<(), String> {
    let io = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("listen"))?;
    let workload =
        TcpStream::connect(listener.local_addr().map_err(io("listen"))?).map_err(io("connect"))?;
    let (agent, _) = listener.accept().map_err(io("accept"))?;
    let flow = key_of(netns_cookie, socket2::SockRef::from(&workload))?;
    flows
        .insert(flow, BypassFlow::default(), 0)
        .map_err(|e| format!("flow map: {e}"))?;
    let result = (|| {
        for s in [&workload, &agent] {
            sockets
                .insert(
                    key_of(netns_cookie, socket2::SockRef::from(s))?,
                    s.as_fd().as_raw_fd(),
                    0,
                )
                .map_err(|e| format!("sockhash: {e}"))?;
        }
        exchange(&workload, &agent, b'w')?;
        exchange(&agent, &workload, b'a')?;
        // A FIN by TCP after bytes past it: the bytes, then EOF.
        (&workload).write_all(&[b'f'; 100]).map_err(io("write"))?;
        workload
            .shutdown(std::net::Shutdown::Write)
            .map_err(io("shutdown"))?;
        let mut rest = Vec::new();
        agent
            .set_read_timeout(Some(Duration::from_secs(1)))
            .map_err(io("timeout"))?;
        (&agent).read_to_end(&mut rest).map_err(io("read to EOF"))?;
        if rest != [b'f'; 100] {
            return Err(format!(
                "after a half-close, {} bytes arrived instead of 100",
                rest.len()
            ));
        }
        Ok(())
    })();
    let _ = flows.remove(&flow);
    result
}

/// Sends from `from` to `to` and checks what `to` sees: readable by
/// `poll`, `FIONREAD` counting the bytes, the bytes themselves, and none of
/// them received by TCP (so they did pass the bypass).
fn exchange(from: &TcpStream, to: &TcpStream, byte: u8) -> Result<(), String> {
    let sent = [byte; 1000];
    let mut w = from;
    w.write_all(&sent).map_err(|e| format!("write: {e}"))?;
    let mut fds = [libc::pollfd {
        fd: to.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: one valid pollfd, its count passed.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, 1000) };
    if ready != 1 {
        return Err("poll did not report the bytes as readable".into());
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let r = unsafe { libc::ioctl(to.as_raw_fd(), libc::FIONREAD, &raw mut queued) };
    if r != 0 || queued != 1000 {
        return Err(format!("FIONREAD counted {queued} of 1000 queued bytes"));
    }
    let mut got = [0u8; 1000];
    let mut r = to;
    r.read_exact(&mut got).map_err(|e| format!("read: {e}"))?;
    if got != sent {
        return Err("the bytes arrived changed".into());
    }
    let by_tcp = tcp_bytes_received(to)?;
    if by_tcp != 0 {
        return Err(format!(
            "{by_tcp} bytes came by TCP: the kernel did not redirect them"
        ));
    }
    Ok(())
}

fn tcp_bytes_received(s: &TcpStream) -> Result<u64, String> {
    // SAFETY: getsockopt into a zeroed tcp_info of the size passed.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>())
            .map_err(|e| e.to_string())?;
        let r = libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        );
        if r != 0 {
            return Err(format!("TCP_INFO: {}", std::io::Error::last_os_error()));
        }
        Ok(info.tcpi_bytes_received)
    }
}
