//! The operators' side against a real agent and server: the live and
//! offline tail, the workloads view, metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use interceptor_tests::{Agent, PgServer, TestCgroup, agent_bin, pg_policy, run_any, scrape};
use serde_json::Value;

const RULES: &str = "mode: enforce\ndefault: allow\non_parse_error: allow\nidentities:\n  shell-tools:\n    comm: psql\nrules:\n  - name: no-drops\n    kinds: [ddl]\n    decision: deny\n";

fn psql(cg: &TestCgroup, pg: &PgServer, sql: &str) -> std::process::Output {
    run_any(pg.psql_in(cg).args(["-Atq", "-c", sql]))
}

/// Lines of a child's stdout, read on a thread so the test can time out.
fn lines_of(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

#[test]
fn live_tail_streams_matching_decisions_and_offline_tail_filters_files() {
    let pg = PgServer::start();
    let cg = TestCgroup::new();
    let mut agent = Agent::start(&pg_policy(pg.port, RULES), &cg, false);
    psql(&cg, &pg, "select 'before'");

    // Follow only denials, as JSON, with no history; of this cgroup's
    // workloads, a field `query` records do not carry (the agent looks it up
    // in the connection's `connect` record).
    let in_cgroup = format!("cgroup={}", cg.rel);
    let mut follower = Command::new(agent_bin())
        .env("INTERCEPTOR_CONTROL_SOCKET", &agent.control_socket)
        .args(["tail", "-f", "-n", "0", "--json", "--decision", "deny"])
        .args(["--identity", &in_cgroup])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(&mut follower);
    // The follower is subscribed once the agent has answered it; give the
    // request a moment to arrive.
    std::thread::sleep(Duration::from_millis(300));
    psql(&cg, &pg, "select 'allowed'");
    let out = psql(&cg, &pg, "drop table if exists nothing_here");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-drops"));
    let line = lines
        .recv_timeout(Duration::from_secs(5))
        .expect("the live tail printed no denial");
    let ev: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(ev["decision"], "deny", "{ev}");
    assert_eq!(ev["rule"], "no-drops");
    assert_eq!(ev["identity"]["comm"], "psql");
    assert_eq!(ev["identities"], serde_json::json!(["shell-tools"]));
    // The record's identity is brief: the whole one is in its `connect`.
    assert!(ev["identity"].get("cgroup").is_none(), "{ev}");
    assert!(ev["identity"]["pid"].is_u64(), "{ev}");
    // Nothing but denials came through.
    assert!(lines.recv_timeout(Duration::from_millis(300)).is_err());
    follower.kill().unwrap();
    let _ = follower.wait();

    // Without -f: the last N matching events, then exit.
    let out = agent.cli(&[
        "tail",
        "-n",
        "2",
        "--event",
        "query",
        "--json",
        "--identity",
        &in_cgroup,
    ]);
    assert!(out.status.success(), "{out:?}");
    let evs: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(evs.len(), 2, "{evs:?}");
    assert_eq!(evs[1]["decision"], "deny");
    assert!(evs[0]["seq"].as_u64() < evs[1]["seq"].as_u64());
    // The readable form names decision, identity, target, rule and query.
    let out = agent.cli(&["tail", "--decision", "deny", "--color", "never"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("DENY")
            && text.contains("psql[")
            && text.contains("-> pg")
            && text.contains("rule=no-drops")
            && text.contains("drop table"),
        "{text}"
    );

    // Offline, after the agent is gone: same filters over the file.
    agent.stop();
    let log = agent.audit_log.to_str().unwrap().to_owned();
    let out = run_any(Command::new(agent_bin()).args([
        "tail",
        "--file",
        &log,
        "-n",
        "100",
        "--json",
        "--identity",
        &in_cgroup,
        "--decision",
        "allow",
    ]));
    let evs: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(evs.len() >= 2, "{evs:?}");
    assert!(
        evs.iter()
            .all(|e| e["decision"] == "allow" && e["identity"]["comm"] == "psql")
    );
    // A workload that made none of them finds none.
    let out = run_any(Command::new(agent_bin()).args([
        "tail",
        "--file",
        &log,
        "--json",
        "--identity",
        "cgroup=/elsewhere",
        "--event",
        "query",
    ]));
    assert!(out.stdout.is_empty(), "{out:?}");
    let out = run_any(Command::new(agent_bin()).args([
        "tail",
        "--file",
        &log,
        "--event",
        "agent_start",
        "--event",
        "agent_stop",
        "-o",
        "table",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("TIME") && text.contains("agent_start") && text.contains("agent_stop"),
        "{text}"
    );
    // A closed pipe is a normal end, not a panic.
    let out = run_any(Command::new("sh").arg("-c").arg(format!(
        "{} tail --file {log} -n 100000 -o table | head -1",
        agent_bin().display()
    )));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{out:?}"
    );
}

#[test]
fn identities_lists_live_workloads_with_their_decisions() {
    let pg = PgServer::start();
    let cg = TestCgroup::new();
    let agent = Agent::start(&pg_policy(pg.port, RULES), &cg, false);
    // One psql that denies once, then holds its connection open.
    let mut sleeper = pg
        .psql_in(&cg)
        .args([
            "-Atq",
            "-c",
            "drop table if exists x",
            "-c",
            "select 1",
            "-c",
            "select pg_sleep(30)",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let workload = loop {
        let out = agent.cli(&["identities", "--json"]);
        assert!(out.status.success(), "{out:?}");
        let all: Value = serde_json::from_slice(&out.stdout).unwrap();
        let found =
            all.as_array().unwrap().iter().find(|w| {
                w["comm"] == "psql" && w["statements"]["allow"].as_u64().unwrap_or(0) >= 2
            });
        if let Some(w) = found {
            break w.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no psql workload: {all}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(workload["connections"], 1, "{workload}");
    assert_eq!(workload["statements"]["deny"], 1, "{workload}");
    assert_eq!(workload["identities"], serde_json::json!(["shell-tools"]));
    assert_eq!(workload["pids"], serde_json::json!([sleeper.id()]));
    assert_eq!(workload["targets"], serde_json::json!(["pg"]));
    let text = String::from_utf8_lossy(&agent.cli(&["identities"]).stdout).into_owned();
    assert!(
        text.contains("shell-tools") && text.contains("psql"),
        "{text}"
    );
    sleeper.kill().unwrap();
    let _ = sleeper.wait();
}

fn wait_metric(port: u16, want: &str) -> String {
    let start = Instant::now();
    loop {
        let text = scrape(port);
        if text.contains(want) {
            return text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no {want:?} in\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn metrics_count_decisions_connections_and_reloads() {
    let pg = PgServer::start();
    let cg = TestCgroup::new();
    let port = interceptor_tests::free_port().to_string();
    let agent = Agent::start_with(
        &pg_policy(pg.port, RULES),
        &cg,
        false,
        &["--metrics", &format!("127.0.0.1:{port}")],
    );
    let port: u16 = port.parse().unwrap();
    psql(&cg, &pg, "select 1");
    psql(&cg, &pg, "drop table if exists nothing_here");
    let text = wait_metric(
        port,
        "interceptor_decisions_total{target=\"pg\",identity=\"shell-tools\",decision=\"deny\"} 1",
    );
    assert!(
        text.contains(
            "interceptor_decisions_total{target=\"pg\",identity=\"shell-tools\",decision=\"allow\"}"
        ),
        "{text}"
    );
    for want in [
        "interceptor_connections_total 2",
        "interceptor_decision_seconds_count",
        "interceptor_kernel_map_entries{map=\"TARGETS\"} 2",
        "interceptor_policy_generation 1",
        "interceptor_policy_last_reload_success 1",
        "interceptor_audit_dropped_total 0",
        "interceptor_audit_queue_capacity 65536",
    ] {
        assert!(text.contains(want), "{want}\n{text}");
    }
    // A broken policy on reload is rejected, and the metrics say so.
    std::fs::write(&agent.policy, "version: 1\nrules: [oops\n").unwrap();
    wait_metric(port, "interceptor_policy_last_reload_success 0");
    std::fs::write(&agent.policy, pg_policy(pg.port, RULES)).unwrap();
    wait_metric(port, "interceptor_policy_generation 2");
}

#[test]
fn the_demo_runs_as_described() {
    let out = run_any(Command::new(env!("CARGO_BIN_EXE_demo")).env("INTERCEPTOR_BIN", agent_bin()));
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for want in [
        "ALLOW",
        "DENY",
        "APPROVE",
        "ERROR 1142",
        "42501",
        "ok: ",
        "cleaning up",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
}

/// `cargo xtask build --pgo`'s training workload runs (through the agent
/// under test here, not an instrumented one): every workload passes and
/// both targets' statements are recorded.
#[test]
fn the_pgo_training_workload_runs() {
    let out = run_any(
        Command::new(env!("CARGO_BIN_EXE_pgo-train"))
            .env("INTERCEPTOR_BIN", agent_bin())
            .env("PGO_TRAIN_SECONDS", "1"),
    );
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{text}");
    for want in [
        "pgbench tpcb-like simple tls=true: done",
        "sysbench oltp_read_write ps-mode=auto: done",
        "query records for pg (each)",
        "query records for maria (summary)",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
}
