//! Network namespaces made by a test: a workload's own (a container's or a
//! pod's, as far as the network goes) and a server's, joined by veth pairs
//! created inside them, on link-local addresses. Nothing is added to the
//! host's own namespace; every namespace goes in `Drop`.

use std::{
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::{TestCgroup, run_any, run_ok};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// `ip netns add`, loopback up, `ip netns del` (its processes killed) on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        crate::require_root();
        let name = format!(
            "ict-{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> String {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command run inside this namespace (not in any test cgroup).
    #[must_use]
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// A command run inside this namespace *and* inside `cg`, so its
    /// connects to targets are redirected: a workload in a container.
    #[must_use]
    pub fn command_in(&self, cg: &TestCgroup, program: &str) -> Command {
        let mut c = cg.command("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Sets a per-namespace sysctl.
    pub fn sysctl(&self, key: &str, value: &str) {
        run_ok(
            self.command("sysctl")
                .args(["-qw", &format!("{key}={value}")]),
        );
    }

    /// Links this namespace to `other` with a veth pair: `dev` here with
    /// `addr` (CIDR), `other_dev` there with `other_addr` (CIDR, or `None`
    /// to leave it unaddressed, e.g. for a bridge port).
    pub fn link(
        &self,
        dev: &str,
        addr: &str,
        other: &NetNs,
        other_dev: &str,
        other_addr: Option<&str>,
    ) {
        run_ok(Command::new("ip").args([
            "link",
            "add",
            dev,
            "netns",
            &self.name,
            "type",
            "veth",
            "peer",
            "name",
            other_dev,
            "netns",
            &other.name,
        ]));
        self.ip(&["addr", "add", addr, "dev", dev]);
        self.ip(&["link", "set", dev, "up"]);
        if let Some(a) = other_addr {
            other.ip(&["addr", "add", a, "dev", other_dev]);
        }
        other.ip(&["link", "set", other_dev, "up"]);
    }

    /// Pids of the processes in this namespace.
    #[must_use]
    pub fn pids(&self) -> Vec<i32> {
        let out = run_any(Command::new("ip").args(["netns", "pids", &self.name]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = run_any(Command::new("ip").args(["netns", "del", &self.name]));
    }
}
