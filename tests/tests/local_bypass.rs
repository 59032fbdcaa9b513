//! `--local-bypass on`: the workload-agent hop past the TCP stack (sk_msg
//! redirect between the two sockets). Real clients in a test cgroup, real
//! servers, and the corners where handing messages past TCP could reorder,
//! lose or pile them up: pipelines, a switch back to TCP mid-stream,
//! half-closes, a reset, packets over 16 MiB, large COPY both ways and a
//! reader that stops reading.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
    time::{Duration, Instant},
};

use interceptor_tests::{
    Agent, PgServer, TestCgroup,
    mysql::{APP_PASSWORD, APP_USER, MariaDb, mysql_policy, start_agent_with},
    pg_bin, pg_policy, run_any, run_ok, show, text,
};

const BYPASS: [&str; 2] = ["--local-bypass", "on"];
const RULES: &str = "mode: enforce\ndefault: allow\non_parse_error: allow\n";

fn setup() -> (PgServer, TestCgroup, Agent) {
    let pg = PgServer::start();
    let cg = TestCgroup::new();
    let agent = Agent::start_with(&pg_policy(pg.port, RULES), &cg, false, &BYPASS);
    (pg, cg, agent)
}

fn raw(cg: &TestCgroup, pg: &PgServer, args: &[&str]) -> String {
    let out = run_any(
        cg.command(env!("CARGO_BIN_EXE_pg-raw"))
            .args(["127.0.0.1", &pg.port.to_string()])
            .args(args),
    );
    assert!(out.status.success(), "pg-raw {args:?}: {}", show(&out));
    text(&out.stdout)
}

/// `key=N` in a probe's output.
fn field(out: &str, key: &str) -> u64 {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {out}"))
}

fn assert_alive(agent: &Agent) {
    assert!(agent.status().status.success(), "{}", agent.log());
}

#[test]
fn postgres_messages_pass_the_bypass_in_order() {
    let (pg, cg, agent) = setup();
    // Small answers come past TCP entirely: the socket receives (almost)
    // nothing by TCP, and 200 pipelined queries are answered in order.
    let out = raw(&cg, &pg, &["pipeline", "200"]);
    assert!(out.starts_with("ok pipeline 200"), "{out}");
    assert!(
        field(&out, "bytes_received") < 100,
        "the answers came by TCP: {out}"
    );
    // 20,000 pipelined queries: the answers pass the 1 MiB cap while the
    // client is still writing, so the agent's direction goes back to TCP
    // mid-stream; nothing is overtaken.
    let out = raw(&cg, &pg, &["pipeline", "20000"]);
    assert!(out.starts_with("ok pipeline 20000"), "{out}");
    assert!(field(&out, "bytes_received") > 100_000, "{out}");
    // A client that polls and asks FIONREAD before reading sees the
    // answer as over TCP (the kernel counts the bypass's queue there too).
    let out = raw(&cg, &pg, &["readiness"]);
    assert!(out.starts_with("ok readiness poll=1"), "{out}");
    assert!(field(&out, "fionread") >= 5000, "{out}");
    // The server ends the session: its error, then EOF (a FIN by TCP after
    // data past it).
    assert!(raw(&cg, &pg, &["terminated"]).starts_with("ok terminated"));
    // The client half-closes after Terminate: the agent closes too.
    assert!(raw(&cg, &pg, &["halfclose"]).starts_with("ok halfclose"));
    // A reset with an answer in flight: that connection ends, no other.
    assert!(raw(&cg, &pg, &["reset"]).starts_with("ok reset"));
    let out = raw(&cg, &pg, &["pipeline", "10"]);
    assert!(out.starts_with("ok pipeline 10"), "{out}");
    assert_alive(&agent);
    // Every statement was decided and audited as without the bypass.
    let pipelined = agent
        .events()
        .iter()
        .filter(|e| {
            e["event"] == "query"
                && e["query"]
                    .as_str()
                    .is_some_and(|q| q.starts_with("select ") && q.contains("repeat('y'"))
        })
        .count();
    assert_eq!(pipelined, 200 + 20_000 + 10);
}

/// The default, `auto`, turns the bypass on where its self-test passes (this
/// kernel), says so in `status` and `agent_start`; `off` leaves it off.
#[test]
fn auto_turns_it_on_where_the_kernel_passes_the_self_test() {
    let pg = PgServer::start();
    let cg = TestCgroup::new();
    let agent = Agent::start(&pg_policy(pg.port, RULES), &cg, false);
    let status = |agent: &Agent| -> serde_json::Value {
        let out = agent.cli(&["status", "--json"]);
        assert!(out.status.success(), "{}", show(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let st = status(&agent);
    assert_eq!(st["local_bypass"], "on", "{}", agent.log());
    // Connections in the bypass now, as a map's occupancy.
    assert_eq!(st["maps"]["BYPASS_FLOWS"]["capacity"], 65_536, "{st}");
    let start = agent.wait_event("agent_start", |e| e["event"] == "agent_start");
    assert_eq!(start["local_bypass"], "on");
    let out = raw(&cg, &pg, &["pipeline", "50"]);
    assert!(field(&out, "bytes_received") < 100, "{out}");
    drop(agent);
    let agent = Agent::start_with(
        &pg_policy(pg.port, RULES),
        &cg,
        false,
        &["--local-bypass", "off"],
    );
    assert_eq!(status(&agent)["local_bypass"], "off");
    let out = raw(&cg, &pg, &["pipeline", "50"]);
    assert!(field(&out, "bytes_received") > 1000, "{out}");
}

#[test]
fn large_copy_both_ways_and_pgbench() {
    let (pg, cg, agent) = setup();
    pg.sql("create table big (i int, t text)");
    // 20 MB in by COPY FROM STDIN: past the cap, back to TCP midway.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("in.tsv");
    let mut data = String::new();
    for i in 0..200_000 {
        data.push_str(&format!("{i}\t{}\n", "c".repeat(90 + i % 17)));
    }
    std::fs::write(&src, &data).unwrap();
    let back = dir.path().join("out.tsv");
    run_ok(pg.psql_in(&cg).args([
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        &format!("\\copy big from '{}'", src.display()),
        "-c",
        &format!(
            "\\copy (select * from big order by i) to '{}'",
            back.display()
        ),
    ]));
    assert_eq!(pg.sql("select count(*) from big").trim(), "200000");
    assert!(
        std::fs::read_to_string(&back).unwrap() == data,
        "COPY came back different"
    );
    // pgbench in every protocol mode.
    let port = pg.port.to_string();
    let conn = ["-h", "127.0.0.1", "-p", &port, "-U", "postgres"];
    pg.pgbench_init(1);
    for mode in ["simple", "extended", "prepared"] {
        let out = run_ok(
            cg.command(pg_bin("pgbench").to_str().unwrap())
                .args(["-n", "-M", mode, "-c", "4", "-j", "2", "-t", "200"])
                .args(conn)
                .arg("postgres"),
        );
        assert!(
            out.contains("number of transactions actually processed: 800/800")
                && out.contains("number of failed transactions: 0"),
            "{mode}: {out}"
        );
    }
    assert_alive(&agent);
}

/// A client that stops reading holds the server back, as over TCP: the
/// bypass does not let the agent queue the answer without bound.
#[test]
fn a_reader_that_stops_holds_the_server_back() {
    let (pg, cg, agent) = setup();
    let mut child = cg
        .command(env!("CARGO_BIN_EXE_pg-raw"))
        .args(["127.0.0.1", &pg.port.to_string(), "slow", "4"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "sent");
    // The 51 MB answer does not fit what the kernel buffers for a stalled
    // TCP reader: the server waits to write.
    let start = Instant::now();
    let waiting = loop {
        let w = pg.sql(
            "select coalesce(wait_event, '') from pg_stat_activity where query like 'select i, repeat(%'",
        );
        if w.trim() == "ClientWrite" || start.elapsed() > Duration::from_secs(3) {
            break w;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(waiting.trim(), "ClientWrite", "{}", agent.log());
    let out = child.wait_with_output().unwrap();
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    assert!(out.status.success(), "{}", show(&out));
    let last = rest.last().cloned().unwrap_or_default();
    assert!(last.starts_with("ok slow rows=50000"), "{rest:?}");
    // Most of it came by TCP, after the cap.
    assert!(field(&last, "bytes_received") > 40_000_000, "{last}");
    assert_alive(&agent);
}

/// MySQL packets over 16 MiB both ways, prepared statements and the rest of
/// the driver's cases.
#[test]
fn mysql_driver_through_the_bypass() {
    let db = MariaDb::start();
    let cg = TestCgroup::new();
    let policy = mysql_policy(
        db.port,
        "default: allow\nrules:\n  - name: no-secrets\n    any_tables: [shop.secrets]\n    decision: deny\n",
    );
    let agent = start_agent_with(&policy, &cg, &BYPASS);
    let out = run_any(cg.command(env!("CARGO_BIN_EXE_mysql-driver")).args([
        db.port.to_string(),
        APP_USER.to_owned(),
        APP_PASSWORD.to_owned(),
    ]));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("ok large-payload\n") && stdout.contains("ok done\n"),
        "{}\nagent:\n{}",
        show(&out),
        agent.log()
    );
    assert_alive(&agent);
}
