//! What several layers share about a connection: the caller on the control
//! socket ([`Caller`]), a redirected connection's facts ([`ConnInfo`],
//! [`CancelKey`]), the kernel's record of where it was going
//! ([`OrigDstLookup`]), and the few socket and namespace primitives
//! ([`Netns`], [`NetnsMap`], [`bind_listener`], [`monotonic_ns`]) that the
//! eBPF loader, the namespace manager, the proxy and the kill switch all
//! use.
//!
//! Layering: a module of this crate imports only modules of lower layers,
//! never one of its own layer or above. Bottom to top:
//!
//! 1. `handover`, `notify`, `identity`, `sql`: leaves;
//! 2. `policy` (its file format includes the `audit:` and `tls:` sections);
//! 3. `audit` (records the policy's decisions), `tls`;
//! 4. `conn`, this module (a connection's info carries its identity, target
//!    and audit members);
//! 5. `ebpf` (the loader), `netns` (the namespace manager), `blocklist`
//!    (the active blocks), `approval`;
//! 6. `proxy`: the state, statement guard and live registry sessions share;
//! 7. `protocol`: the sessions, which ask the guard;
//! 8. `worker` (accepts connections and runs their sessions), `block` (the
//!    kill switch: closes live connections), `control` (the control socket);
//! 9. `cli`.
//!
//! A type that modules of one layer, or a lower and a higher one, both need
//! moves down here rather than making either import the other. The test in
//! `layers.rs` keeps this order.

mod info;
mod netns;

use std::net::SocketAddr;

use interceptor_common::ConnRecord;
use serde::Serialize;

pub use info::ConnInfo;
pub use netns::{Netns, NetnsMap, netns_cookie, open_ns};

/// Who sent a request, as the kernel reports it (`SO_PEERCRED`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// The uid's user name, when it has one.
    pub user: Option<String>,
}

impl Caller {
    /// The caller as recorded in audit events (`actor`).
    #[must_use]
    pub fn from_ids(uid: u32, gid: u32, pid: Option<i32>) -> Self {
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name);
        Self {
            uid,
            gid,
            pid,
            user,
        }
    }

    /// Names of every group the caller belongs to (primary and
    /// supplementary, from the group database).
    #[must_use]
    pub fn groups(&self) -> Vec<String> {
        let mut gids = vec![nix::unistd::Gid::from_raw(self.gid)];
        if let Some(name) = &self.user
            && let Ok(cname) = std::ffi::CString::new(name.as_str())
            && let Ok(all) = nix::unistd::getgrouplist(&cname, gids[0])
        {
            gids = all;
        }
        let mut names: Vec<String> = gids
            .into_iter()
            .filter_map(|g| nix::unistd::Group::from_gid(g).ok().flatten())
            .map(|g| g.name)
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// Finds the kernel's record of a redirected connection from the accepted
/// socket's peer address (linkerd2-proxy's `OrigDstAddr` pattern): the eBPF
/// map in production, a table in tests.
pub trait OrigDstLookup: Send + Sync {
    /// Returns and forgets the record for `peer` in the network namespace
    /// `netns_cookie` (peer addresses repeat across namespaces).
    fn take(&self, netns_cookie: u64, peer: SocketAddr) -> Option<ConnRecord>;

    /// The record of a unix connection, by the connecting process
    /// (`SO_PEERCRED`'s pid, the kernel's tgid) and the agent's listener it
    /// arrived on: the latest connect of that process to that target, made
    /// before this accept (threads connecting at once share it; what
    /// differs between them is the thread's pid and comm).
    fn take_unix(&self, _netns_cookie: u64, _tgid: u32, _listen_id: u32) -> Option<ConnRecord> {
        None
    }

    /// With `--local-bypass on`, adds the agent's end of an accepted TCP
    /// connection in the network namespace `netns_cookie` to the kernel's
    /// bypass; otherwise nothing. Called before the agent's first write to
    /// the client and while the client waits for it, so nothing the client
    /// sent over TCP can be overtaken by what it sends past TCP.
    fn join_bypass(&self, _netns_cookie: u64, _socket: std::os::fd::BorrowedFd<'_>) {}
}

/// The agent's listener for the unix target `path`: a stable id (the
/// first four bytes of the path's SHA-256, the same in every agent) and
/// the socket path in `dir` the kernel redirects to.
#[must_use]
pub fn unix_listener(dir: &std::path::Path, path: &std::path::Path) -> (u32, std::path::PathBuf) {
    let id = unix_listen_id(path);
    (id, dir.join(format!("{id:08x}.sock")))
}

/// The name the listener for `path` is bound under (then renamed to
/// [`unix_listener`]'s path): what `getpeername` reports for it, the same
/// for every agent.
#[must_use]
pub fn unix_bound_name(dir: &std::path::Path, path: &std::path::Path) -> std::path::PathBuf {
    dir.join(format!("{:08x}.bound", unix_listen_id(path)))
}

/// The id of [`unix_listener`].
#[must_use]
pub fn unix_listen_id(path: &std::path::Path) -> u32 {
    use sha2::Digest as _;
    use std::os::unix::ffi::OsStrExt as _;
    let h = sha2::Sha256::digest(path.as_os_str().as_bytes());
    u32::from_be_bytes([h[0], h[1], h[2], h[3]])
}

/// Binds the unix listener at `at`, reachable by every workload (mode
/// 0666: who may connect is the policy's business), replacing an older
/// one atomically (bound under the name `bound`, then renamed over it):
/// a predecessor's listener keeps what it accepted, new connects come here.
///
/// # Errors
/// When the directory or socket cannot be made.
pub fn bind_unix_listener(
    bound: &std::path::Path,
    at: &std::path::Path,
) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = at.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let _ = std::fs::remove_file(bound);
    let l = std::os::unix::net::UnixListener::bind(bound)?;
    std::fs::set_permissions(bound, std::fs::Permissions::from_mode(0o666))?;
    std::fs::rename(bound, at)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// How the server can be told to stop what a connection is running.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "protocol", rename_all = "snake_case")]
pub enum CancelKey {
    /// From the server's BackendKeyData; used in a CancelRequest.
    Postgres { pid: u32, secret: Vec<u8> },
    /// The server's connection (thread) id, for `KILL QUERY`.
    Mysql { thread_id: u32 },
}

/// At most `max` bytes of `s`, cut on a character boundary.
#[must_use]
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A listening socket that could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct ListenError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds one listening socket with SO_REUSEPORT (one per worker).
///
/// # Errors
/// When the address cannot be bound.
pub fn bind_listener(addr: SocketAddr) -> Result<std::net::TcpListener, ListenError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| ListenError { addr, source };
    let sock =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    sock.set_reuse_address(true).map_err(err)?;
    sock.set_reuse_port(true).map_err(err)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true).map_err(err)?;
    }
    sock.set_nonblocking(true).map_err(err)?;
    sock.bind(&addr.into()).map_err(err)?;
    sock.listen(1024).map_err(err)?;
    Ok(sock.into())
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns`.
#[must_use]
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn truncates_on_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
