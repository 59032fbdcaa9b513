//! Workloads in network namespaces of their own (containers, pods): real
//! namespaces joined by veth pairs on link-local addresses, real servers
//! reached over them, real psql, pgbench and mariadb inside the namespace
//! and the test cgroup, real eBPF.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::HashSet,
    process::{Command, Output, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use interceptor_tests::{
    Agent, PgServer, TestCgroup,
    mysql::{APP_PASSWORD, APP_USER, MariaDb},
    netns::NetNs,
    pg_bin, run_any, run_ok,
};
use serde_json::Value;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// psql inside `ns` and `cg`, against `pg`, one command.
fn psql(ns: &NetNs, cg: &TestCgroup, pg: &PgServer, sql: &str) -> Command {
    let mut c = ns.command_in(cg, pg_bin("psql").to_str().unwrap());
    c.args(pg.psql_args())
        .args(["-v", "VERBOSITY=verbose", "-Atc", sql]);
    c
}

fn status(agent: &Agent) -> Value {
    let out = agent.cli(&["status", "--json"]);
    assert!(out.status.success(), "status: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn guests(agent: &Agent) -> usize {
    status(agent)["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["host"] != true)
        .count()
}

fn agent_fds(agent: &Agent) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", agent.pid().unwrap()))
        .unwrap()
        .count()
}

fn agent_threads(agent: &Agent) -> usize {
    std::fs::read_dir(format!("/proc/{}/task", agent.pid().unwrap()))
        .unwrap()
        .count()
}

fn map_entries(agent: &Agent, map: &str) -> u64 {
    status(agent)["maps"][map]["entries"].as_u64().unwrap()
}

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        sleep(Duration::from_millis(100));
    }
}

/// A server namespace and a workload namespace joined by a veth pair on
/// 169.254.`net`.0/24 (server .1, workload .2).
fn pod(net: u8) -> (NetNs, NetNs) {
    let srv = NetNs::new("srv");
    let wl = NetNs::new("wl");
    wl.link(
        "eth0",
        &format!("169.254.{net}.2/24"),
        &srv,
        "eth0",
        Some(&format!("169.254.{net}.1/24")),
    );
    (srv, wl)
}

#[test]
fn namespaced_workloads_beside_host_ones_first_connect_denials_and_identity() {
    let cg = TestCgroup::new();
    let (srv, wl) = pod(71);
    let pg_pod = PgServer::start_in(Some(&srv.name), "169.254.71.1");
    let maria = MariaDb::start_in(Some(&srv.name), "169.254.71.1");
    let pg_host = PgServer::start();
    pg_pod.sql("create table orders(id int); insert into orders values (1),(2); create table payroll(salary int);");
    pg_host.sql("create table orders(id int); insert into orders values (7);");
    let policy = format!(
        "version: 1\ndefault: allow\ntargets:\n  - {{name: pg-host, protocol: postgres, address: '127.0.0.1:{}'}}\n  - {{name: pg-pod, protocol: postgres, address: '169.254.71.1:{}'}}\n  - {{name: maria-pod, protocol: mysql, address: '169.254.71.1:{}'}}\nrules:\n  - {{name: no-payroll, any_tables: ['*payroll*', '*secrets*'], decision: deny}}\n",
        pg_host.port, pg_pod.port, maria.port
    );
    let agent = Agent::start(&policy, &cg, false);
    assert_eq!(guests(&agent), 0);

    // The first connect from a namespace the agent has never seen, next to a
    // host process holding a connection open.
    let mut host = cg.command(pg_bin("psql").to_str().unwrap());
    host.args(pg_host.psql_args())
        .args(["-Atc", "select pg_sleep(1); select sum(id) from orders"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let host = host.spawn().unwrap();
    let started = Instant::now();
    let out = run_any(&mut psql(&wl, &cg, &pg_pod, "select sum(id) from orders"));
    let first = started.elapsed();
    assert!(
        out.status.success(),
        "first connect from a new namespace: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout).trim(), "3");
    let host = host.wait_with_output().unwrap();
    assert!(host.status.success(), "host psql: {}", text(&host.stderr));
    assert_eq!(text(&host.stdout).trim().lines().last(), Some("7"));
    eprintln!("first connect from a new namespace answered in {first:?}");

    let events = agent.events();
    let ready = events
        .iter()
        .find(|e| e["event"] == "netns_ready")
        .expect("netns_ready audited");
    let connects: Vec<&Value> = events.iter().filter(|e| e["event"] == "connect").collect();
    let pod_conn = connects
        .iter()
        .find(|e| e["target"] == "pg-pod")
        .expect("pod connect audited");
    let host_conn = connects
        .iter()
        .find(|e| e["target"] == "pg-host")
        .expect("host connect audited");
    assert_eq!(pod_conn["identity"]["netns_cookie"], ready["netns_cookie"]);
    assert_eq!(pod_conn["identity"]["netns_inode"], ready["netns_inode"]);
    assert_ne!(
        host_conn["identity"]["netns_cookie"],
        pod_conn["identity"]["netns_cookie"]
    );
    let inode = std::fs::metadata(format!("/run/netns/{}", wl.name))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    assert_eq!(ready["netns_inode"], inode);
    assert_eq!(guests(&agent), 1);

    // A denial from inside the namespace, with the right SQLSTATE.
    let out = run_any(&mut psql(&wl, &cg, &pg_pod, "select * from payroll"));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("42501"), "{}", text(&out.stderr));
    // MariaDB from inside: allowed and denied (1142).
    let mut args = maria.client_args(APP_USER, APP_PASSWORD, "shop");
    args.extend(["-N".into(), "-B".into(), "-e".into()]);
    let mut c = wl.command_in(&cg, "mariadb");
    c.args(&args).arg("select count(*) from items");
    let out = run_any(&mut c);
    assert!(out.status.success(), "mariadb: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "3");
    let mut c = wl.command_in(&cg, "mariadb");
    c.args(&args).arg("select * from secrets");
    let out = run_any(&mut c);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("1142"), "{}", text(&out.stderr));

    // pgbench inside the namespace, through the agent: zero failures.
    run_ok(
        srv.command(pg_bin("pgbench").to_str().unwrap())
            .args(["-i", "-q", "-s", "1", "-h", "169.254.71.1", "-p"])
            .arg(pg_pod.port.to_string())
            .args(["-U", "postgres", "postgres"]),
    );
    for mode in ["simple", "prepared"] {
        let mut c = wl.command_in(&cg, pg_bin("pgbench").to_str().unwrap());
        c.args([
            "-n",
            "-S",
            "-M",
            mode,
            "-c",
            "2",
            "-j",
            "2",
            "-t",
            "100",
            "-h",
            "169.254.71.1",
            "-p",
        ])
        .arg(pg_pod.port.to_string())
        .args(["-U", "postgres", "postgres"]);
        let out = run_ok(&mut c);
        assert!(out.contains("failed transactions: 0"), "{out}");
        assert!(out.contains("processed: 200/200"), "{out}");
    }
    let n = agent
        .events()
        .iter()
        .filter(|e| {
            e["event"] == "query" && e["identity"]["comm"] == "pgbench" && e["target"] == "pg-pod"
        })
        .count();
    assert!(n >= 100, "pgbench statements audited: {n}");

    // `identities` shows the namespace.
    let mut c = wl.command_in(&cg, pg_bin("psql").to_str().unwrap());
    c.args(pg_pod.psql_args())
        .args(["-Atc", "select pg_sleep(2)"]);
    let mut sleeper = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let has_netns = || {
        let out = agent.cli(&["identities", "--json"]);
        let ids: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        ids.as_array().is_some_and(|a| {
            a.iter().any(|w| {
                w["netns"]
                    .as_array()
                    .is_some_and(|n| n.contains(&Value::from(inode)))
            })
        })
    };
    wait_for(
        "identities to show the namespace",
        Duration::from_secs(10),
        has_netns,
    );
    let _ = sleeper.wait();
}

#[test]
fn two_namespaces_with_identical_addresses_each_reach_their_own_server() {
    let cg = TestCgroup::new();
    // Two "pods" with the very same addresses, each with its own server at
    // the same address.
    let (srv_a, wl_a) = pod(77);
    let (srv_b, wl_b) = pod(77);
    let pg_a = PgServer::start_in(Some(&srv_a.name), "169.254.77.1");
    let pg_b = PgServer::start_in(Some(&srv_b.name), "169.254.77.1");
    pg_a.sql("create table who(name text); insert into who values ('a');");
    pg_b.sql("create table who(name text); insert into who values ('b');");
    // One source port per namespace: both clients are 127.0.0.1:40000 to the
    // agent, so only the namespace tells their kernel records apart. (The
    // agent's upstream socket in the namespace shares the port: connect()
    // only needs the 4-tuple unique.)
    for ns in [&wl_a, &wl_b] {
        ns.sysctl("net.ipv4.ip_local_port_range", "40000 40000");
    }
    let policy = format!(
        "version: 1\ndefault: allow\ntargets:\n  - {{name: a, protocol: postgres, address: '169.254.77.1:{}'}}\n  - {{name: b, protocol: postgres, address: '169.254.77.1:{}'}}\n",
        pg_a.port, pg_b.port
    );
    let agent = Agent::start(&policy, &cg, false);
    let spawn = |ns: &NetNs, pg: &PgServer| {
        psql(ns, &cg, pg, "select pg_sleep(0.5); select name from who")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // One round: the single port sits in TIME_WAIT afterwards.
    for round in 0..1 {
        let a = spawn(&wl_a, &pg_a);
        let b = spawn(&wl_b, &pg_b);
        let (a, b): (Output, Output) =
            (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        assert!(a.status.success(), "round {round} a: {}", text(&a.stderr));
        assert!(b.status.success(), "round {round} b: {}", text(&b.stderr));
        assert_eq!(text(&a.stdout).lines().last(), Some("a"));
        assert_eq!(text(&b.stdout).lines().last(), Some("b"));
    }
    let connects: Vec<Value> = agent
        .events()
        .into_iter()
        .filter(|e| e["event"] == "connect")
        .collect();
    assert_eq!(connects.len(), 2);
    for c in &connects {
        assert_eq!(c["identity"]["comm"], "psql");
    }
    let cookies = |t: &str| -> HashSet<u64> {
        connects
            .iter()
            .filter(|e| e["target"] == t)
            .map(|e| e["identity"]["netns_cookie"].as_u64().unwrap())
            .collect()
    };
    let (ca, cb) = (cookies("a"), cookies("b"));
    assert_eq!((ca.len(), cb.len()), (1, 1), "{connects:?}");
    assert!(ca.is_disjoint(&cb));
    // Statements landed on the connection and target they were sent on.
    for e in agent.events().iter().filter(|e| e["event"] == "query") {
        let conn = connects.iter().find(|c| c["conn"] == e["conn"]).unwrap();
        assert_eq!(conn["target"], e["target"]);
    }
}

#[test]
fn a_blocked_workload_in_a_namespace_is_refused_in_the_kernel() {
    let cg = TestCgroup::new();
    let (srv, wl) = pod(73);
    let pg = PgServer::start_in(Some(&srv.name), "169.254.73.1");
    let policy = format!(
        "version: 1\ndefault: allow\ntargets:\n  - {{name: pg-pod, protocol: postgres, address: '169.254.73.1:{}'}}\n",
        pg.port
    );
    let agent = Agent::start(&policy, &cg, false);
    let out = run_any(&mut psql(&wl, &cg, &pg, "select 1"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = agent.cli(&["block", "comm=psql", "--reason", "netns test"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before = agent
        .events()
        .iter()
        .filter(|e| e["event"] == "connect")
        .count();
    let out = run_any(&mut psql(&wl, &cg, &pg, "select 1"));
    assert!(!out.status.success(), "blocked psql got through");
    assert!(
        text(&out.stderr).contains("Operation not permitted"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        agent
            .events()
            .iter()
            .filter(|e| e["event"] == "connect")
            .count(),
        before
    );
    let out = agent.cli(&["unblock", "comm=psql"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run_any(&mut psql(&wl, &cg, &pg, "select 1"));
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// How many namespaces the churn test makes (fewer with
/// `INTERCEPTOR_NETNS_CHURN`).
fn churn_count() -> usize {
    std::env::var("INTERCEPTOR_NETNS_CHURN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

#[test]
fn namespaces_churned_leave_nothing_behind() {
    let cg = TestCgroup::new();
    // One server namespace with a bridge; every workload namespace gets a
    // port on it, connects once through the agent, and is destroyed.
    let srv = NetNs::new("srv");
    srv.ip(&["link", "add", "br0", "type", "bridge"]);
    srv.ip(&["addr", "add", "169.254.74.1/24", "dev", "br0"]);
    srv.ip(&["link", "set", "br0", "up"]);
    let pg = PgServer::start_in(Some(&srv.name), "169.254.74.1");
    let policy = format!(
        "version: 1\ndefault: allow\ntargets:\n  - {{name: pg-pod, protocol: postgres, address: '169.254.74.1:{}'}}\n",
        pg.port
    );
    let agent = Agent::start(&policy, &cg, false);
    // Let the agent settle (its worker runtimes start their blocking pools
    // on the first connection): one namespace first, then measure.
    let warm = |i: usize| {
        let wl = NetNs::new("churn");
        let port = format!("p{i}");
        wl.link(
            "eth0",
            &format!("169.254.74.{}/24", 2 + i % 250),
            &srv,
            &port,
            None,
        );
        srv.ip(&["link", "set", &port, "master", "br0"]);
        let out = run_any(&mut psql(&wl, &cg, &pg, "select 1"));
        assert!(
            out.status.success(),
            "namespace {i}: {}\nagent log:\n{}\nlast events:\n{:#?}",
            text(&out.stderr),
            agent.log(),
            // Enough to hold this namespace's netns_ready, connect and
            // disconnect (or reject) and the previous namespace's GC.
            agent.events().iter().rev().take(24).collect::<Vec<_>>()
        );
        assert_eq!(text(&out.stdout).trim(), "1");
    };
    warm(0);
    wait_for(
        "the first namespace to be forgotten",
        Duration::from_secs(15),
        || guests(&agent) == 0,
    );
    let (fds, threads) = (agent_fds(&agent), agent_threads(&agent));
    let netns_entries = map_entries(&agent, "NETNS");
    let n = churn_count();
    let start = Instant::now();
    for i in 1..=n {
        warm(i);
    }
    eprintln!(
        "{n} namespaces created, used and destroyed in {:?}",
        start.elapsed()
    );
    let served = agent
        .events()
        .iter()
        .filter(|e| e["event"] == "netns_ready")
        .count();
    assert_eq!(served, n + 1, "every namespace served once");
    wait_for(
        "every namespace to be forgotten",
        Duration::from_secs(20),
        || guests(&agent) == 0 && map_entries(&agent, "NETNS") == netns_entries,
    );
    wait_for(
        "fds back to where they were",
        Duration::from_secs(10),
        || agent_fds(&agent) <= fds,
    );
    // Idle blocking-pool threads (identity lookups) end after 10 s.
    wait_for(
        "threads back to where they were",
        Duration::from_secs(15),
        || agent_threads(&agent) <= threads,
    );
    let gone = agent
        .events()
        .iter()
        .filter(|e| e["event"] == "netns_gone")
        .count();
    assert_eq!(gone, n + 1);
    eprintln!(
        "before/after: fds {fds}/{}, threads {threads}/{}, netns map entries {netns_entries}/{}",
        agent_fds(&agent),
        agent_threads(&agent),
        map_entries(&agent, "NETNS")
    );
}
