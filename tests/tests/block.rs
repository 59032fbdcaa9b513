//! The kill switch end to end: `interceptor block` cancels a running
//! statement on the server, closes the connection, makes the kernel refuse
//! new connects with EPERM, survives a restart, and `unblock` lifts it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    process::{Child, Command, Output, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use interceptor_tests::{
    Agent, PgServer, TestCgroup,
    mysql::{APP_PASSWORD, APP_USER, MariaDb, mariadb_in},
    pg_bin, pg_policy, run_any,
};
use serde_json::Value;

const ALLOW: &str = "mode: enforce\ndefault: allow\non_parse_error: allow\n";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn psql_in(cg: &TestCgroup, pg: &PgServer, sql: &str) -> Command {
    let mut c = cg.command(pg_bin("psql").to_str().unwrap());
    c.args(pg.psql_args()).args(["-Atc", sql]);
    c
}

fn spawn(mut cmd: Command) -> Child {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `cond`, panicking with `what` after `limit`.
fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// Waits for the child to exit; returns its output and how long it took.
fn wait_exit(child: Child, limit: Duration) -> (Output, Duration) {
    let start = Instant::now();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("client {pid} still running after {limit:?}"))
        .unwrap();
    (out, start.elapsed())
}

fn cli_ok(agent: &Agent, args: &[&str]) -> String {
    let out = agent.cli(args);
    assert!(
        out.status.success(),
        "interceptor {args:?} failed:\n{}{}\nagent log:\n{}",
        text(&out.stdout),
        text(&out.stderr),
        agent.log()
    );
    text(&out.stdout)
}

fn count(agent: &Agent, event: &str) -> usize {
    agent
        .events()
        .iter()
        .filter(|e| e["event"] == event)
        .count()
}

fn pg_sleepers(pg: &PgServer) -> u32 {
    pg.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND pid <> pg_backend_pid()",
    )
    .trim()
    .parse()
    .unwrap()
}

/// A connect the kernel refused: the client fails with EPERM and the agent
/// never sees it.
fn assert_refused_by_kernel(out: &Output, agent: &Agent, connects_before: usize) {
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "client succeeded while blocked");
    assert!(
        stderr.contains("Operation not permitted") || stderr.contains("(1)"),
        "expected EPERM from connect, got:\n{stderr}"
    );
    assert_eq!(count(agent, "connect"), connects_before, "agent saw it");
}

#[test]
fn postgres_block_cancels_closes_refuses_and_unblocks() {
    let pg = PgServer::start();
    let cg = TestCgroup::new();
    let policy = pg_policy(
        pg.port,
        &format!(
            "{ALLOW}identities:\n  test-clients: {{cgroup: '{}'}}\n",
            cg.rel
        ),
    );
    let agent = Agent::start(&policy, &cg, false);

    let sleeper = spawn(psql_in(&cg, &pg, "SELECT pg_sleep(30)"));
    wait_for("pg_sleep on the server", Duration::from_secs(15), || {
        pg_sleepers(&pg) == 1
    });
    let conn = agent.wait_event("connect", |e| e["event"] == "connect");
    assert_eq!(conn["identity"]["comm"], "psql");

    let started = Instant::now();
    let out = cli_ok(&agent, &["block", "comm=psql", "--reason", "incident 42"]);
    assert!(out.contains("blocked: comm=psql"), "{out}");
    let (client, _) = wait_exit(sleeper, Duration::from_secs(3));
    let ended = started.elapsed();
    assert!(!client.status.success(), "psql survived the block");
    assert!(ended < Duration::from_secs(2), "psql ended after {ended:?}");
    // Gone on the server, not only on the client side.
    wait_for("backend gone", Duration::from_secs(2), || {
        pg_sleepers(&pg) == 0
    });

    let block = agent.wait_event("block", |e| e["event"] == "block");
    assert_eq!(block["selector"], "comm=psql");
    assert_eq!(block["reason"], "incident 42");
    assert_eq!(block["actor"]["uid"], 0);
    assert!(block["actor"]["pid"].is_number());
    assert_eq!(block["connections_closed"], 1, "{block}");
    assert_eq!(block["cancels_sent"], 1, "{block}");
    assert!(block["kernel_keys"].as_u64().unwrap() >= 1);
    assert!(
        block["closed_us"].as_u64().unwrap() < 100_000,
        "kill path took {block}"
    );
    // The cancel's error may reach psql, which then quits by itself before
    // the close: either way the session is over.
    let disconnect = agent.wait_event("disconnect", |e| e["event"] == "disconnect");
    if let Some(err) = disconnect["error"].as_str() {
        assert!(
            err.contains("closed by the agent: blocked (comm=psql)"),
            "{disconnect}"
        );
    }
    assert!(
        text(&client.stderr).contains("canceling statement due to user request")
            || disconnect["error"].is_string(),
        "{}",
        text(&client.stderr)
    );

    // New connects are refused in the kernel.
    let connects = count(&agent, "connect");
    let out = run_any(&mut psql_in(&cg, &pg, "select 1"));
    assert_refused_by_kernel(&out, &agent, connects);

    let list = cli_ok(&agent, &["blocks"]);
    assert!(
        list.contains("comm=psql") && list.contains("incident 42"),
        "{list}"
    );
    let json: Value =
        serde_json::from_str(&cli_ok(&agent, &["block", "--list", "--json"])).unwrap();
    assert_eq!(json["blocks"][0]["selector"], "comm=psql");

    // Errors are messages, not crashes.
    let dup = agent.cli(&["block", "comm=psql"]);
    assert!(!dup.status.success());
    assert!(text(&dup.stderr).contains("already blocked"), "{dup:?}");
    let bad = agent.cli(&["block", "colour=red"]);
    assert!(
        text(&bad.stderr).contains("unknown selector key"),
        "{bad:?}"
    );
    let unknown = agent.cli(&["block", "no-such-identity"]);
    assert!(
        text(&unknown.stderr).contains("unknown identity"),
        "{unknown:?}"
    );
    let not = agent.cli(&["unblock", "uid=12345"]);
    assert!(text(&not.stderr).contains("not blocked"), "{not:?}");

    cli_ok(&agent, &["unblock", "comm=psql"]);
    let unblock = agent.wait_event("unblock", |e| e["event"] == "unblock");
    assert_eq!(unblock["selector"], "comm=psql");
    assert_eq!(unblock["actor"]["uid"], 0);
    assert_eq!(
        run_any(&mut psql_in(&cg, &pg, "select 'back'"))
            .status
            .code(),
        Some(0)
    );

    // A named identity of the policy (here: the test cgroup).
    cli_ok(&agent, &["block", "test-clients"]);
    let connects = count(&agent, "connect");
    let out = run_any(&mut psql_in(&cg, &pg, "select 1"));
    assert_refused_by_kernel(&out, &agent, connects);
    cli_ok(&agent, &["unblock", "test-clients"]);
    let out = run_any(&mut psql_in(&cg, &pg, "select 'again'"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "again");
    assert!(agent.status().status.success());
}

#[test]
fn a_process_the_kernel_keys_miss_is_refused_by_the_agent() {
    let pg = PgServer::start();
    let cg = TestCgroup::new();
    let agent = Agent::start(&pg_policy(pg.port, ALLOW), &cg, false);
    // exe selectors are resolved by /proc scans; a psql that starts and
    // connects at once can beat the next rescan, and the agent refuses it.
    let psql = pg_bin("psql");
    let exe = std::fs::canonicalize(&psql).unwrap();
    let selector = format!("exe={}", exe.display());
    cli_ok(&agent, &["block", &selector]);
    let mut refused_by = Vec::new();
    for _ in 0..3 {
        let connects = count(&agent, "connect");
        let rejects = count(&agent, "reject");
        let out = run_any(&mut psql_in(&cg, &pg, "select 1"));
        assert!(!out.status.success(), "psql got through an exe block");
        assert_eq!(count(&agent, "connect"), connects);
        refused_by.push(if count(&agent, "reject") > rejects {
            "agent"
        } else {
            "kernel"
        });
    }
    if refused_by.contains(&"agent") {
        let reject = agent.wait_event("reject", |e| e["event"] == "reject");
        assert_eq!(reject["block"], selector.as_str(), "{reject}");
    }
    cli_ok(&agent, &["unblock", &selector]);
    assert!(run_any(&mut psql_in(&cg, &pg, "select 1")).status.success());
}

#[test]
fn blocks_survive_an_agent_restart() {
    let pg = PgServer::start();
    let cg = TestCgroup::new();
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap().to_owned();
    let extra = ["--state-dir", state_dir.as_str()];
    let policy = pg_policy(pg.port, ALLOW);
    let uid = "uid=0";
    {
        let mut agent = Agent::start_with(&policy, &cg, false, &extra);
        cli_ok(&agent, &["block", uid, "--reason", "persist me"]);
        assert!(state.path().join("blocks.json").exists());
        agent.stop();
    }
    let agent = Agent::start_with(&policy, &cg, false, &extra);
    let loaded = agent.wait_event("block", |e| e["event"] == "block");
    assert_eq!(loaded["source"], "state");
    assert_eq!(loaded["selector"], uid);
    assert_eq!(loaded["reason"], "persist me");
    let connects = count(&agent, "connect");
    let out = run_any(&mut psql_in(&cg, &pg, "select 1"));
    assert_refused_by_kernel(&out, &agent, connects);
    assert!(cli_ok(&agent, &["blocks"]).contains("persist me"));
    cli_ok(&agent, &["unblock", uid]);
    let out = run_any(&mut psql_in(&cg, &pg, "select 1"));
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn sleepers(db: &MariaDb) -> u32 {
    db.sql(
        "SELECT COUNT(*) FROM information_schema.processlist WHERE info LIKE 'SELECT SLEEP(30)%' AND id <> CONNECTION_ID()",
    )
    .trim()
    .parse()
    .unwrap()
}

#[test]
fn mysql_block_kills_the_query_closes_and_refuses() {
    let db = MariaDb::start();
    let cg = TestCgroup::new();
    let secrets = tempfile::tempdir().unwrap();
    let pw_file = secrets.path().join("admin-password");
    std::fs::write(&pw_file, format!("{APP_PASSWORD}\n")).unwrap();
    // A secret file must be the agent's alone.
    std::fs::set_permissions(
        &pw_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let policy = format!(
        "version: 1\ntargets:\n  - name: maria\n    protocol: mysql\n    address: 127.0.0.1:{}\n    admin: {{user: {APP_USER}, password_file: '{}'}}\n{ALLOW}",
        db.port,
        pw_file.display()
    );
    let agent = Agent::start(&policy, &cg, false);
    let args = db.client_args(APP_USER, APP_PASSWORD, "shop");
    let mut cmd = cg.command("mariadb");
    cmd.args(&args).args(["-N", "-B", "-e", "SELECT SLEEP(30)"]);
    let sleeper = spawn(cmd);
    wait_for("SLEEP on the server", Duration::from_secs(15), || {
        sleepers(&db) == 1
    });

    let started = Instant::now();
    cli_ok(&agent, &["block", "comm=mariadb"]);
    let (client, _) = wait_exit(sleeper, Duration::from_secs(3));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "client ended after {:?}",
        started.elapsed()
    );
    assert!(!client.status.success(), "mariadb survived the block");
    wait_for("query gone", Duration::from_secs(2), || sleepers(&db) == 0);
    let block = agent.wait_event("block", |e| e["event"] == "block");
    assert_eq!(block["connections_closed"], 1, "{block}");
    assert_eq!(block["cancels_sent"], 1, "{block}");
    assert_eq!(block["connections"][0]["cancel"], "sent", "{block}");

    let connects = count(&agent, "connect");
    let out = mariadb_in(&cg, &args, "SELECT 1");
    assert_refused_by_kernel(&out, &agent, connects);
    cli_ok(&agent, &["unblock", "comm=mariadb"]);
    let out = mariadb_in(&cg, &args, "SELECT 'back'");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "back");
}

#[test]
fn mysql_without_admin_credentials_still_closes() {
    let db = MariaDb::start();
    let cg = TestCgroup::new();
    let policy = format!(
        "version: 1\ntargets:\n  - name: maria\n    protocol: mysql\n    address: 127.0.0.1:{}\n{ALLOW}",
        db.port
    );
    let agent = Agent::start(&policy, &cg, false);
    let args = db.client_args(APP_USER, APP_PASSWORD, "shop");
    let mut cmd = cg.command("mariadb");
    cmd.args(&args).args(["-N", "-B", "-e", "SELECT SLEEP(30)"]);
    let sleeper = spawn(cmd);
    wait_for("SLEEP on the server", Duration::from_secs(15), || {
        sleepers(&db) == 1
    });
    cli_ok(&agent, &["block", "comm=mariadb"]);
    let (client, _) = wait_exit(sleeper, Duration::from_secs(3));
    assert!(!client.status.success());
    let block = agent.wait_event("block", |e| e["event"] == "block");
    assert_eq!(block["connections_closed"], 1, "{block}");
    assert_eq!(block["cancels_sent"], 0, "{block}");
    assert_eq!(block["connections"][0]["cancel"], "failed", "{block}");
    assert!(
        block["connections"][0]["error"]
            .as_str()
            .unwrap()
            .contains("no admin credentials"),
        "{block}"
    );
    // The statement keeps running on the server until it ends by itself;
    // end it here so the server shuts down promptly.
    for id in db
        .sql("SELECT id FROM information_schema.processlist WHERE info LIKE 'SELECT SLEEP(30)%' AND id <> CONNECTION_ID()")
        .lines()
    {
        let _ = db.sql(&format!("KILL {}", id.trim()));
    }
    cli_ok(&agent, &["unblock", "comm=mariadb"]);
}
