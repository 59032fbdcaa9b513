//! When the agent dies: fail closed (connects to targets refused at once,
//! never direct), fail open (direct), a new agent adopting the pinned
//! programs without adding a second set, and `detach`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    process::{Command, Output},
    thread::sleep,
    time::{Duration, Instant},
};

use interceptor_tests::{
    Agent, PgServer, TestCgroup, free_port, pg_bin, pg_policy, run_any, run_ok, scrape, unique,
};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn psql(cg: &TestCgroup, pg: &PgServer, sql: &str) -> Output {
    run_any(
        cg.command(pg_bin("psql").to_str().unwrap())
            .args(pg.psql_args())
            .args(["-Atc", sql]),
    )
}

/// The programs attached to the cgroup, one line each, as bpftool lists them.
fn attached(cg: &TestCgroup) -> Vec<String> {
    let out = run_any(
        Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&cg.path),
    );
    assert!(out.status.success(), "bpftool: {}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .filter(|l| l.contains("interceptor_"))
        .map(str::to_owned)
        .collect()
}

fn connects(agent: &Agent) -> usize {
    agent
        .events()
        .iter()
        .filter(|e| e["event"] == "connect")
        .count()
}

#[test]
fn fail_closed_kill_9_refuses_and_a_new_agent_adopts_the_programs() {
    let pg = PgServer::start();
    let cg = TestCgroup::new();
    let policy = pg_policy(pg.port, "default: allow\n");
    let pin = std::path::PathBuf::from("/sys/fs/bpf").join(unique("interceptor-test"));
    let pin_arg = pin.to_str().unwrap().to_owned();
    let extra = ["--pin-dir", pin_arg.as_str()];
    let mut first = Agent::start_with(&policy, &cg, false, &extra);
    assert_eq!(attached(&cg).len(), 6, "{:?}", attached(&cg));
    let out = psql(&cg, &pg, "select 1");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before =
        pg.sql("select count(*) from pg_stat_activity where backend_type = 'client backend'");

    first.kill9();
    let start = Instant::now();
    let out = psql(&cg, &pg, "select 'direct'");
    let took = start.elapsed();
    assert!(
        !out.status.success(),
        "went direct with no agent: {}",
        text(&out.stdout)
    );
    assert!(
        text(&out.stderr).contains("refused"),
        "{}",
        text(&out.stderr)
    );
    assert!(took < Duration::from_secs(1), "refusal took {took:?}");
    // The programs are still there, unchanged.
    assert_eq!(attached(&cg).len(), 6);
    assert_eq!(
        pg.sql("select count(*) from pg_stat_activity where backend_type = 'client backend'"),
        before,
        "the refused client reached the server"
    );

    // A new agent on the same pin dir adopts them: service is back, with
    // exactly one set of programs on the cgroup. The time it takes is the
    // gap a crash costs under `Restart=always` (plus systemd's RestartSec).
    let restart = Instant::now();
    let second = Agent::start_with(&policy, &cg, false, &extra);
    eprintln!(
        "refused for {:?} after kill -9 until a restarted agent served again",
        restart.elapsed() + took
    );
    let out = psql(&cg, &pg, "select 'back'");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "back");
    // The audit writer is asynchronous: wait for the record.
    let start = Instant::now();
    while connects(&second) == 0 && start.elapsed() < Duration::from_secs(5) {
        sleep(Duration::from_millis(50));
    }
    assert_eq!(connects(&second), 1);
    let attached_now = attached(&cg);
    assert_eq!(attached_now.len(), 6, "{attached_now:?}");
    let start = second
        .events()
        .into_iter()
        .find(|e| e["event"] == "agent_start")
        .unwrap();
    assert_eq!(start["adopted"], true);
    assert_eq!(start["fail_mode"], "closed");

    // A clean stop fails closed too; detach uninstalls. (The pin dir is
    // the second agent's now: the first's guard must not detach it.)
    first.pin_dir = std::path::PathBuf::from("/nonexistent");
    drop(first);
    let mut second = second;
    assert!(second.stop().success());
    let out = psql(&cg, &pg, "select 1");
    assert!(!out.status.success());
    let out = second.detach();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!pin.exists(), "pin dir left behind");
    assert!(attached(&cg).is_empty(), "{:?}", attached(&cg));
    let out = psql(&cg, &pg, "select 'direct'");
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn fail_open_kill_9_goes_direct() {
    let pg = PgServer::start();
    let cg = TestCgroup::new();
    let policy = pg_policy(pg.port, "default: allow\n");
    let mut agent = Agent::start_with(&policy, &cg, false, &["--fail-mode", "open"]);
    let out = psql(&cg, &pg, "select 1");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(connects(&agent), 1);
    agent.kill9();
    // The heartbeat goes stale within a second; then connects go direct.
    let start = Instant::now();
    loop {
        let out = psql(&cg, &pg, "select 'direct'");
        if out.status.success() {
            assert_eq!(text(&out.stdout).trim(), "direct");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "still refused after {:?}: {}",
            start.elapsed(),
            text(&out.stderr)
        );
        sleep(Duration::from_millis(100));
    }
    eprintln!("direct {:?} after kill -9", start.elapsed());
    assert_eq!(connects(&agent), 1, "the dead agent saw it");
}

#[test]
fn fail_open_stop_detaches_at_once() {
    let pg = PgServer::start();
    let cg = TestCgroup::new();
    let policy = pg_policy(pg.port, "default: allow\n");
    let mut agent = Agent::start_with(&policy, &cg, false, &["--fail-mode", "open"]);
    assert_eq!(attached(&cg).len(), 6);
    assert!(agent.stop().success());
    assert!(!agent.pin_dir.exists());
    assert!(attached(&cg).is_empty());
    let out = psql(&cg, &pg, "select 'direct'");
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn a_new_agent_takes_over_under_load_without_a_failed_connection() {
    let pg = PgServer::start();
    run_ok(
        Command::new(pg_bin("pgbench"))
            .args(["-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p"])
            .arg(pg.port.to_string())
            .args(["-U", "postgres", "postgres"]),
    );
    let cg = TestCgroup::new();
    let policy = pg_policy(pg.port, "default: allow\n");
    let state = tempfile::tempdir().unwrap();
    let state_arg = state.path().to_str().unwrap().to_owned();
    let pin = std::path::PathBuf::from("/sys/fs/bpf").join(unique("interceptor-test"));
    let pin_arg = pin.to_str().unwrap().to_owned();
    // Both agents serve metrics on the same address, as a DaemonSet's
    // host-network pods do during a surge.
    let metrics_port = free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let mut first = Agent::start_with(
        &policy,
        &cg,
        false,
        &[
            "--pin-dir",
            &pin_arg,
            "--state-dir",
            &state_arg,
            "--metrics",
            &metrics,
        ],
    );
    let listen = format!("127.0.0.1:{}", first.listen_port);
    // A new connection per transaction, for the whole handover.
    let mut bench = cg.command(pg_bin("pgbench").to_str().unwrap());
    bench
        .args([
            "-n",
            "-S",
            "-C",
            "-c",
            "2",
            "-j",
            "2",
            "-T",
            "6",
            "-h",
            "127.0.0.1",
            "-p",
        ])
        .arg(pg.port.to_string())
        .args(["-U", "postgres", "postgres"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let bench = bench.spawn().unwrap();
    sleep(Duration::from_secs(2));
    let second = Agent::start_with(
        &policy,
        &cg,
        false,
        &[
            "--pin-dir",
            &pin_arg,
            "--state-dir",
            &state_arg,
            "--listen",
            &listen,
            "--audit-log",
            first.audit_log.to_str().unwrap(),
            "--metrics",
            &metrics,
        ],
    );
    // The old agent drains and exits by itself.
    let mut old = first.child.take().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = old.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the old agent did not exit"
        );
        sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "old agent: {status}\n{}", first.log());
    assert!(scrape(metrics_port).contains("interceptor_"));
    let out = bench.wait_with_output().unwrap();
    let report = text(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench: {report}{}",
        text(&out.stderr)
    );
    assert!(
        report.contains("number of failed transactions: 0"),
        "{report}"
    );
    let processed: usize = report
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    // One log, one chain: the old agent's records, then the new one's.
    let events = second.events();
    let starts: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e["event"] == "agent_start")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(starts.len(), 2);
    let stop = events
        .iter()
        .position(|e| e["event"] == "agent_stop")
        .unwrap();
    assert_eq!(events[stop]["signal"], "handover");
    assert!(stop < starts[1], "the two agents' records interleave");
    let mut seen = std::collections::HashSet::new();
    let mut connects = 0;
    for (i, e) in events.iter().enumerate() {
        if e["event"] == "connect" {
            connects += 1;
            // The old agent's records end with its agent_stop.
            let agent = usize::from(i > stop);
            assert!(
                seen.insert((agent, e["conn"].as_u64().unwrap())),
                "audited twice: {e}"
            );
        }
    }
    let in_second = events[stop..]
        .iter()
        .filter(|e| e["event"] == "connect")
        .count();
    assert!(in_second > 0, "the new agent served nothing");
    assert!(
        connects >= processed,
        "{connects} connects for {processed} transactions"
    );
    let verify = second.cli(&["audit", "verify", first.audit_log.to_str().unwrap()]);
    assert!(verify.status.success(), "{}", text(&verify.stdout));
    assert_eq!(attached(&cg).len(), 6);
    // The first agent's guard must not detach the second's programs.
    first.pin_dir = std::path::PathBuf::from("/nonexistent");
    drop(first);
    drop(second);
    assert!(!pin.exists());
}
