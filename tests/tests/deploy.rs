//! Deployment: the agent under systemd's notify protocol, and with no more
//! privilege than `deploy/interceptor.service` and `deploy/daemonset.yaml`
//! give it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use interceptor_tests::{
    Agent, PgServer, TestCgroup, netns::NetNs, pg_bin, pg_policy, run_ok, sha256_file,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `CapabilityBoundingSet=` of the unit, without the `CAP_` prefixes.
fn unit_capabilities() -> Vec<String> {
    let unit = std::fs::read_to_string(repo().join("deploy/interceptor.service")).unwrap();
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet=");
    let mut caps: Vec<String> = line
        .split_whitespace()
        .map(|c| c.strip_prefix("CAP_").unwrap().to_owned())
        .collect();
    caps.sort();
    caps
}

/// Next notification datagram, or `None` after `timeout`.
fn next(sock: &UnixDatagram, timeout: Duration) -> Option<String> {
    sock.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    sock.recv(&mut buf)
        .ok()
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn systemd_hears_ready_then_watchdog_pings_then_stopping() {
    let pg = PgServer::start();
    let cg = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    // 400 ms: a ping every 200 ms while both workers and the control
    // runtime tick.
    let mut agent = Agent::start_wrapped(
        &pg_policy(pg.port, "default: allow\n"),
        &cg,
        &["--workers", "2"],
        &[],
        &[
            ("NOTIFY_SOCKET", path.as_os_str()),
            ("WATCHDOG_USEC", "400000".as_ref()),
        ],
    );
    // start_wrapped returned once `interceptor status` succeeded; READY=1
    // was sent at that point, not before the control socket was up.
    let ready = next(&sock, Duration::from_secs(5)).expect("no READY=1");
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(ready.contains("STATUS=serving "), "{ready:?}");

    let start = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{pings} watchdog pings in 5 s\n{}",
            agent.log()
        );
        if next(&sock, Duration::from_secs(1)).is_some_and(|m| m.trim() == "WATCHDOG=1") {
            pings += 1;
        }
    }

    assert!(agent.stop().success(), "{}", agent.log());
    let mut seen = Vec::new();
    while let Some(m) = next(&sock, Duration::from_millis(200)) {
        seen.push(m);
    }
    assert!(
        seen.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "{seen:?}"
    );
}

#[test]
fn without_notify_socket_nothing_is_sent_and_the_agent_runs() {
    let pg = PgServer::start();
    let cg = TestCgroup::new();
    // WATCHDOG_USEC alone (no NOTIFY_SOCKET): no heartbeat, no watchdog
    // thread, the agent serves as ever.
    let mut agent = Agent::start_wrapped(
        &pg_policy(pg.port, "default: allow\n"),
        &cg,
        &[],
        &[],
        &[("WATCHDOG_USEC", "400000".as_ref())],
    );
    assert!(agent.status().status.success());
    assert!(!agent.log().contains("watchdog"), "{}", agent.log());
    assert!(agent.stop().success(), "{}", agent.log());
}

/// The agent with only the unit's capabilities (the bounding set of a root
/// process is its whole privilege) guards a workload running as another
/// user on the host (its exe hashed through /proc: CAP_SYS_PTRACE) and one
/// in a network namespace of its own (listener by setns: CAP_SYS_ADMIN).
#[test]
fn the_units_capabilities_are_enough_for_host_and_namespace_workloads() {
    let caps = unit_capabilities();
    let bounding = format!(
        "--bounding-set=-all,{}",
        caps.iter()
            .map(|c| format!("+{}", c.to_lowercase()))
            .collect::<Vec<_>>()
            .join(",")
    );
    let ns = NetNs::new("caps");
    let pg_host = PgServer::start();
    let pg_ns = PgServer::start_in(Some(&ns.name), "127.0.0.1");
    let cg = TestCgroup::new();
    let policy = format!(
        "version: 1\ndefault: allow\ntargets:\n  - {{name: host, protocol: postgres, address: '127.0.0.1:{}'}}\n  - {{name: pod, protocol: postgres, address: '127.0.0.1:{}'}}\n",
        pg_host.port, pg_ns.port
    );
    let mut agent = Agent::start_wrapped(&policy, &cg, &[], &["setpriv", &bounding, "--"], &[]);
    let pid = agent.pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .unwrap()
        .trim();
    assert_eq!(
        u64::from_str_radix(bnd, 16).unwrap().count_ones() as usize,
        caps.len(),
        "CapBnd {bnd} is not the unit's {caps:?}"
    );

    let psql = pg_bin("psql");
    let out = run_ok(
        cg.command("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(&psql)
            .args(pg_host.psql_args())
            .args(["-Atc", "select 'host'"])
            .current_dir("/"),
    );
    assert_eq!(out.trim(), "host");
    let ev = agent.wait_event("connect from nobody", |e| {
        e["event"] == "connect" && e["target"] == "host"
    });
    assert_eq!(ev["identity"]["user"], "nobody", "{ev}");
    assert_eq!(ev["identity"]["exe_sha256"], sha256_file(&psql), "{ev}");

    let out = run_ok(
        ns.command_in(&cg, psql.to_str().unwrap())
            .args(pg_ns.psql_args())
            .args(["-Atc", "select 'pod'"]),
    );
    assert_eq!(out.trim(), "pod");
    agent.wait_event("connect from the namespace", |e| {
        e["event"] == "connect" && e["target"] == "pod"
    });
    assert!(agent.stop().success(), "{}", agent.log());
}

/// The DaemonSet adds exactly the unit's capabilities and drops the rest.
#[test]
fn the_daemonset_asks_for_the_units_capabilities() {
    let manifest = std::fs::read_to_string(repo().join("deploy/daemonset.yaml")).unwrap();
    assert!(!manifest.contains("privileged: true"));
    let add = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("add: ["))
        .expect("capabilities.add in the DaemonSet");
    let mut caps: Vec<String> = add
        .trim_end_matches(']')
        .split(',')
        .map(|c| c.trim().to_owned())
        .collect();
    caps.sort();
    assert_eq!(caps, unit_capabilities());
    assert!(manifest.contains("drop: [ALL]"));
}

/// `cargo xtask image` names the image the DaemonSet runs.
#[test]
fn the_daemonset_runs_the_image_xtask_builds() {
    let manifest = std::fs::read_to_string(repo().join("deploy/daemonset.yaml")).unwrap();
    let image = format!("image: localhost/interceptor:{}", env!("CARGO_PKG_VERSION"));
    assert!(manifest.contains(&image), "{image} not in the DaemonSet");
}
