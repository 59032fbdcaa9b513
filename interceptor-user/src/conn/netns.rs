//! Network namespaces as handles: the one a connection came from, entered
//! to make its side connections, and the kernel map of the served ones.

use std::{
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    os::unix::fs::MetadataExt as _,
    sync::OnceLock,
};

use interceptor_common::NetnsState;

/// A network namespace, held open by the agent (or the agent's own).
#[derive(Debug)]
pub struct Netns {
    /// The kernel's netns cookie (`SO_NETNS_COOKIE`, `bpf_get_netns_cookie`).
    pub cookie: u64,
    /// The namespace file's inode, as `ls -l /proc/PID/ns/net` shows it.
    pub inode: u64,
    /// `None` for the agent's own namespace: no `setns` needed.
    fd: Option<OwnedFd>,
}

/// The agent's own namespace, opened once at start so threads can return to it.
static HOME: OnceLock<OwnedFd> = OnceLock::new();

/// Opens a namespace file (`/proc/PID/ns/net`).
///
/// # Errors
/// When the file cannot be opened.
pub fn open_ns(path: &str) -> std::io::Result<OwnedFd> {
    Ok(std::fs::File::open(path)?.into())
}

impl Netns {
    /// The agent's own namespace, identified by one of its sockets.
    ///
    /// # Errors
    /// When the namespace file cannot be opened or the cookie read.
    pub fn home(sock: &impl std::os::fd::AsFd) -> std::io::Result<Self> {
        let fd = open_ns("/proc/thread-self/ns/net")?;
        let inode = std::fs::File::from(fd.try_clone()?).metadata()?.ino();
        let _ = HOME.set(fd);
        Ok(Self {
            cookie: netns_cookie(sock)?,
            inode,
            fd: None,
        })
    }

    /// A workload's namespace, held open by `fd`.
    #[must_use]
    pub fn guest(cookie: u64, inode: u64, fd: OwnedFd) -> Self {
        Self {
            cookie,
            inode,
            fd: Some(fd),
        }
    }

    /// The open namespace file; `None` for the agent's own.
    #[must_use]
    pub fn fd(&self) -> Option<&OwnedFd> {
        self.fd.as_ref()
    }

    /// Whether this is the agent's own namespace.
    #[must_use]
    pub fn is_home(&self) -> bool {
        self.fd.is_none()
    }

    /// Runs `f` with the calling thread in this namespace, then returns the
    /// thread to the agent's own. Sockets made by `f` stay in this
    /// namespace.
    ///
    /// # Errors
    /// When the namespace cannot be entered, or `f` fails.
    pub fn enter<T>(&self, f: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
        let Some(fd) = &self.fd else {
            return f();
        };
        let home = HOME
            .get()
            .ok_or_else(|| std::io::Error::other("agent namespace not recorded"))?;
        nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        let r = f();
        if let Err(e) = nix::sched::setns(home.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET) {
            // A thread stuck in a workload's namespace would open the next
            // connection's sockets there: nothing safe is left to do.
            tracing::error!("cannot return to the agent's network namespace: {e}; aborting");
            std::process::abort();
        }
        r
    }
}

/// `SO_NETNS_COOKIE` of a socket (kernel >= 5.14).
///
/// # Errors
/// When the kernel does not report it.
pub fn netns_cookie(sock: &impl std::os::fd::AsFd) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<u64>()).unwrap_or(8);
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which is
    // a live u64 of that size; the fd is borrowed for the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The kernel's netns map, behind a trait so the manager runs without eBPF
/// in unit tests.
pub trait NetnsMap: Send + Sync {
    /// Sets a namespace's state.
    ///
    /// # Errors
    /// When the kernel refuses the update.
    fn set_netns(&self, cookie: u64, state: NetnsState) -> Result<(), String>;
    /// Forgets a namespace.
    fn remove_netns(&self, cookie: u64);
    /// Every entry.
    fn netns_entries(&self) -> Vec<(u64, NetnsState)>;
}
