//! Foundation: the kernel programs redirect a test cgroup's PostgreSQL
//! connections to the agent, which relays them and records who connected.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use interceptor_tests::{
    Agent, PgServer, TestCgroup, pg_bin, pg_policy, run_any, run_ok, sha256_file,
};

fn connects(agent: &Agent) -> usize {
    agent
        .events()
        .iter()
        .filter(|e| e["event"] == "connect")
        .count()
}

#[test]
fn psql_in_cgroup_goes_through_agent_with_attested_identity() {
    let pg = PgServer::start();
    let cg = TestCgroup::new();
    // The agent runs inside the very cgroup it redirects: its own upstream
    // connection must be exempt, or it would loop back to itself.
    let mut agent = Agent::start(&pg_policy(pg.port, "default: allow\n"), &cg, true);

    let status = String::from_utf8(agent.status().stdout).unwrap();
    assert!(status.contains(&cg.path.display().to_string()), "{status}");
    assert!(
        status.contains(&format!("pg postgres 127.0.0.1:{}", pg.port)),
        "{status}"
    );

    // psql with an unchanged connection string, inside the cgroup.
    let out = run_ok(
        cg.command(pg_bin("psql").to_str().unwrap())
            .args(pg.psql_args())
            .args(["-Atc", "select 40 + 2"]),
    );
    assert_eq!(out.trim(), "42");

    let ev = agent.wait_event("connect from psql", |e| {
        e["event"] == "connect" && e["identity"]["comm"] == "psql"
    });
    let id = &ev["identity"];
    let psql = pg_bin("psql");
    assert_eq!(id["exe"], psql.to_str().unwrap(), "{ev}");
    assert_eq!(id["exe_sha256"], sha256_file(&psql), "{ev}");
    assert_eq!(id["cgroup"], cg.rel, "{ev}");
    assert!(
        id["pid"].as_u64().unwrap() > 0 && id["tgid"].as_u64().unwrap() > 0,
        "{ev}"
    );
    assert_eq!(id["uid"], 0);
    assert_eq!(id["user"], "root");
    assert!(
        id["cmdline"].as_str().unwrap().contains("select 40 + 2"),
        "{ev}"
    );
    assert_eq!(ev["dst"], format!("127.0.0.1:{}", pg.port));
    assert_eq!(ev["target"], "pg");
    assert_eq!(ev["protocol"], "postgres");
    assert!(ev["ts"].as_str().unwrap().ends_with('Z'));

    let conn = ev["conn"].clone();
    let bye = agent.wait_event("disconnect", |e| {
        e["event"] == "disconnect" && e["conn"] == conn
    });
    assert!(bye["bytes"]["from_client"].as_u64().unwrap() > 0, "{bye}");
    assert!(bye["bytes"]["from_server"].as_u64().unwrap() > 0, "{bye}");
    assert!(bye["duration_us"].as_u64().is_some(), "{bye}");

    // seq strictly increases.
    let seqs: Vec<u64> = agent
        .events()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // A client outside the cgroup is not redirected.
    let before = connects(&agent);
    assert_eq!(pg.sql("select 7").trim(), "7");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        connects(&agent),
        before,
        "a client outside the cgroup was redirected"
    );

    // A clean exit fails closed: the programs stay, the next connection to
    // the target is refused (never direct); `detach` uninstalls them and
    // the one after goes direct.
    assert!(
        agent.stop().success(),
        "agent exit status:\n{}",
        agent.log()
    );
    let last = agent.events().last().cloned().unwrap();
    assert_eq!(last["event"], "agent_stop", "{last}");
    let refused = run_any(
        cg.command(pg_bin("psql").to_str().unwrap())
            .args(pg.psql_args())
            .args(["-Atc", "select 'direct'"]),
    );
    assert!(
        !refused.status.success(),
        "went direct while failing closed"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("refused"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let out = agent.detach();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!agent.pin_dir.exists());
    let out = run_ok(
        cg.command(pg_bin("psql").to_str().unwrap())
            .args(pg.psql_args())
            .args(["-Atc", "select 'direct'"]),
    );
    assert_eq!(out.trim(), "direct");
}

#[test]
fn getpeername_shows_the_original_destination() {
    let pg = PgServer::start();
    let cg = TestCgroup::new();
    let agent = Agent::start(&pg_policy(pg.port, "default: allow\n"), &cg, false);
    // IPv4, IPv4-mapped on an IPv6 socket, and native IPv6.
    let script = format!(
        r#"
import socket
p = {port}
s = socket.create_connection(("127.0.0.1", p)); print(s.getpeername()[1]); s.close()
s = socket.socket(socket.AF_INET6); s.connect(("::ffff:127.0.0.1", p)); print(s.getpeername()[0], s.getpeername()[1]); s.close()
s = socket.socket(socket.AF_INET6); s.connect(("::1", p)); print(s.getpeername()[0], s.getpeername()[1]); s.close()
"#,
        port = pg.port
    );
    let out = run_ok(cg.command("python3").args(["-c", &script]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        vec![
            pg.port.to_string(),
            format!("::ffff:127.0.0.1 {}", pg.port),
            format!("::1 {}", pg.port)
        ]
    );
    // All three really went through the agent.
    for (dst, target) in [
        (format!("127.0.0.1:{}", pg.port), "pg"),
        (format!("[::1]:{}", pg.port), "pg6"),
    ] {
        agent.wait_event(&format!("connect to {dst}"), |e| {
            e["event"] == "connect" && e["dst"] == dst && e["target"] == target
        });
    }
    // None was lost, however fast the client closed.
    let n = agent
        .events()
        .iter()
        .filter(|e| e["event"] == "connect")
        .count();
    assert_eq!(n, 3, "{:?}", agent.events());
    assert!(
        !agent.events().iter().any(|e| e["event"] == "reject"),
        "{:?}",
        agent.events()
    );
}

#[test]
fn status_fails_without_an_agent_and_policy_check_locates_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_any(
        Command::new(interceptor_tests::agent_bin())
            .env("INTERCEPTOR_CONTROL_SOCKET", dir.path().join("none.sock"))
            .arg("status"),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not ready"));

    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "version: 1\ntargets:\n  - name: a\n    protocol: postgres\n    adress: 1.2.3.4:5\n",
    )
    .unwrap();
    let out = run_any(
        Command::new(interceptor_tests::agent_bin())
            .args(["policy", "check"])
            .arg(&bad),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml:5:"), "{err}");
}

#[test]
fn policy_reloads_on_change_and_a_bad_one_keeps_the_old() {
    let pg = PgServer::start();
    let cg = TestCgroup::new();
    let agent = Agent::start(
        &pg_policy(pg.port, "mode: enforce\ndefault: deny\n"),
        &cg,
        false,
    );
    let psql = |sql: &str| {
        run_any(
            cg.command(pg_bin("psql").to_str().unwrap())
                .args(pg.psql_args())
                .args(["-Atc", sql]),
        )
    };
    let denied = psql("select 'one'");
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("42501")
            || String::from_utf8_lossy(&denied.stderr).contains("denied")
    );

    // A valid change takes effect for the next statement.
    std::fs::write(
        &agent.policy,
        pg_policy(pg.port, "mode: enforce\ndefault: allow\n"),
    )
    .unwrap();
    agent.wait_event("policy loaded", |e| {
        e["event"] == "policy" && e["status"] == "loaded"
    });
    let ok = psql("select 'two'");
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout).trim(),
        "two",
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // An invalid one is rejected, audited, and the previous stays in force.
    std::fs::write(
        &agent.policy,
        "version: 1\nrules: [{name: x, decision: maybe}]\n",
    )
    .unwrap();
    let ev = agent.wait_event("policy rejected", |e| {
        e["event"] == "policy" && e["status"] == "rejected"
    });
    assert!(
        ev["error"].as_str().unwrap().contains("policy.yaml"),
        "{ev}"
    );
    let ok = psql("select 'three'");
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "three");
    assert!(agent.status().status.success());
}
