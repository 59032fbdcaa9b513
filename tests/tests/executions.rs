//! Every execution accounted for: executions of prepared statements and
//! portals (PostgreSQL Execute, MySQL COM_STMT_EXECUTE) in the audit log,
//! as `executions` summaries or one `execute` record each, with the
//! server's rows and errors; simple-protocol `query` records carry them
//! too. Real pgbench, sysbench, tokio-postgres and mysql_async in a test
//! cgroup against real servers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, HashMap},
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use interceptor_tests::{
    Agent, PgServer, TestCgroup,
    mysql::{MariaDb, mysql_policy, start_agent_with, sysbench_args, sysbench_in},
    pg_bin, pg_policy, run_any, run_ok, scrape,
};
use serde_json::Value;

fn policy_for(mode: &str) -> String {
    format!("mode: enforce\ndefault: allow\non_parse_error: allow\naudit:\n  executions: {mode}\n")
}

/// Waits until every connection so far has its `disconnect` event (a
/// connection's summaries are written before it).
fn settle(agent: &Agent) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let evs = agent.events();
        let n = |kind: &str| evs.iter().filter(|e| e["event"] == kind).count();
        if n("connect") == n("disconnect") {
            return evs;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "connections still open:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Connections of `comm`.
fn conns_of(evs: &[Value], comm: &str) -> Vec<u64> {
    evs.iter()
        .filter(|e| e["event"] == "connect" && e["identity"]["comm"] == comm)
        .map(|e| e["conn"].as_u64().unwrap())
        .collect()
}

/// Executions per connection: the sum of `count` of `executions` records
/// and the number of `execute` records.
fn executions_by_conn(evs: &[Value]) -> (BTreeMap<u64, u64>, BTreeMap<u64, u64>) {
    let mut summary = BTreeMap::new();
    let mut each = BTreeMap::new();
    for e in evs {
        let conn = e["conn"].as_u64().unwrap_or(0);
        match e["event"].as_str() {
            Some("executions") => {
                *summary.entry(conn).or_default() += e["count"].as_u64().unwrap();
            }
            Some("execute") => *each.entry(conn).or_default() += 1,
            _ => {}
        }
    }
    (summary, each)
}

/// Rewrites the policy file and waits until the agent has loaded it.
fn reload(agent: &Agent, policy: &str) {
    let loaded = |evs: &[Value]| {
        evs.iter()
            .filter(|e| e["event"] == "policy" && e["status"] == "loaded")
            .count()
    };
    let before = loaded(&agent.events());
    std::fs::write(&agent.policy, policy).unwrap();
    let start = Instant::now();
    while loaded(&agent.events()) == before {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "policy not reloaded:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every execution links to the decision of its statement on the same
/// connection.
fn assert_linked(evs: &[Value]) {
    let decided: HashMap<(u64, &str), &Value> = evs
        .iter()
        .filter(|e| e["event"] == "query")
        .map(|e| {
            (
                (
                    e["conn"].as_u64().unwrap(),
                    e["decision_id"].as_str().unwrap(),
                ),
                e,
            )
        })
        .collect();
    for e in evs
        .iter()
        .filter(|e| e["event"] == "execute" || e["event"] == "executions")
    {
        let id = e["decision_id"].as_str().unwrap_or_else(|| panic!("{e}"));
        let q = decided
            .get(&(e["conn"].as_u64().unwrap(), id))
            .unwrap_or_else(|| panic!("no query record for {e}"));
        assert_eq!(q["decision"], e["decision"], "{e}");
    }
}

/// A server with pgbench's tables, a test cgroup and an agent in summary
/// mode serving metrics on the returned port.
fn pgbench_setup() -> (PgServer, TestCgroup, Agent, u16) {
    let pg = PgServer::start();
    pg.pgbench_init(1);
    let cg = TestCgroup::new();
    let metrics = interceptor_tests::free_port();
    let agent = Agent::start_with(
        &pg_policy(pg.port, &policy_for("summary")),
        &cg,
        false,
        &["--metrics", &format!("127.0.0.1:{metrics}")],
    );
    (pg, cg, agent, metrics)
}

/// Waits until the agent's metrics on `port` carry the line `want`.
fn wait_metric(port: u16, want: &str) {
    let start = Instant::now();
    loop {
        let text = scrape(port);
        if text.contains(want) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no {want:?} in\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pgbench(cg: &TestCgroup, pg: &PgServer, transactions: u32) {
    pgbench_in(cg, pg, "prepared", transactions);
}

fn pgbench_in(cg: &TestCgroup, pg: &PgServer, mode: &str, transactions: u32) {
    let mut c = cg.command(pg_bin("pgbench").to_str().unwrap());
    c.args(["-n", "-M", mode, "-c", "2", "-j", "2", "-t"])
        .arg(transactions.to_string())
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
        ])
        .arg("postgres");
    let out = run_ok(&mut c);
    let want = format!(
        "number of transactions actually processed: {0}/{0}",
        2 * transactions
    );
    assert!(out.contains(&want), "{out}");
    assert!(out.contains("number of failed transactions: 0"), "{out}");
}

/// pgbench `-M extended`, TPC-B: each statement is parsed (the unnamed
/// statement), bound and executed once in its Sync group, so it is one
/// `query` record with the server's answer, and no execution records;
/// metrics count each execution all the same.
#[test]
fn pgbench_extended_statements_are_one_record_each() {
    let (pg, cg, agent, metrics) = pgbench_setup();
    pgbench_in(&cg, &pg, "extended", 100);
    let evs = settle(&agent);
    let conns = conns_of(&evs, "pgbench");
    let mine = |e: &&Value| e["conn"].as_u64().is_some_and(|c| conns.contains(&c));
    let queries: Vec<&Value> = evs
        .iter()
        .filter(mine)
        .filter(|e| e["event"] == "query")
        .collect();
    // Besides the 2 x 100 x 7 statements, pgbench's own start-up queries.
    let tpcb: Vec<&&Value> = queries
        .iter()
        .filter(|e| {
            e["query"].as_str().is_some_and(|q| {
                q.starts_with("UPDATE pgbench_")
                    || q.starts_with("SELECT abalance")
                    || q.starts_with("INSERT INTO pgbench_history")
                    || q == "BEGIN"
                    || q == "END"
            })
        })
        .collect();
    assert_eq!(
        tpcb.len(),
        2 * 100 * 7,
        "of {} query records",
        queries.len()
    );
    for q in &tpcb {
        assert_eq!(q["outcome"], "ok", "{q}");
        let text = q["query"].as_str().unwrap();
        let rows = if text.starts_with("BEGIN") || text.starts_with("END") {
            Value::Null
        } else {
            Value::from(1)
        };
        assert_eq!(q["rows"], rows, "{q}");
    }
    assert!(
        !evs.iter()
            .filter(mine)
            .any(|e| e["event"] == "executions" || e["event"] == "execute"),
        "execution records for statements run once"
    );
    assert_linked(&evs);
    let want = format!(
        "interceptor_executions_total{{target=\"pg\",identity=\"\",decision=\"allow\"}} {}",
        2 * 100 * 7
    );
    wait_metric(metrics, &want);
}

/// pgbench `-M prepared`, TPC-B (7 statements a transaction, BEGIN and END
/// included, each prepared once per connection): the executions in the
/// log are exactly the statements run, per connection, in summary mode,
/// in each mode (after a reload), and none with `off`.
#[test]
fn pgbench_prepared_executions_counted_exactly_per_connection() {
    let (pg, cg, agent, metrics) = pgbench_setup();

    pgbench(&cg, &pg, 150);
    let evs = settle(&agent);
    let conns = conns_of(&evs, "pgbench");
    let (summary, each) = executions_by_conn(&evs);
    let clients: Vec<u64> = conns
        .iter()
        .copied()
        .filter(|c| summary.contains_key(c))
        .collect();
    assert_eq!(clients.len(), 2, "{summary:?}");
    for c in &clients {
        assert_eq!(summary[c], 150 * 7, "conn {c}: {summary:?}");
    }
    assert!(each.is_empty(), "{each:?}");
    // Rows: the SELECT of each transaction returns one row, the three
    // UPDATEs and the INSERT affect one each.
    let rows: u64 = evs
        .iter()
        .filter(|e| e["event"] == "executions")
        .map(|e| e["rows"].as_u64().unwrap())
        .sum();
    assert_eq!(rows, 2 * 150 * 5);
    assert!(
        evs.iter()
            .filter(|e| e["event"] == "executions")
            .all(|e| e["errors"] == 0 && e["first"].is_string() && e["last"].is_string())
    );
    assert_linked(&evs);

    reload(&agent, &pg_policy(pg.port, &policy_for("each")));
    let before = evs.len();
    pgbench(&cg, &pg, 60);
    let evs = settle(&agent);
    let new = &evs[before..];
    let (summary, each) = executions_by_conn(new);
    assert!(summary.is_empty(), "{summary:?}");
    assert_eq!(each.len(), 2, "{each:?}");
    for (c, n) in &each {
        assert_eq!(*n, 60 * 7, "conn {c}: {each:?}");
    }
    assert!(
        new.iter()
            .filter(|e| e["event"] == "execute")
            .all(|e| e["outcome"] == "ok" && e["duration_us"].is_u64()),
    );
    assert_linked(&evs);

    // Metrics count every execution of both runs.
    let want = format!(
        "interceptor_executions_total{{target=\"pg\",identity=\"\",decision=\"allow\"}} {}",
        2 * (150 + 60) * 7
    );
    wait_metric(metrics, &want);

    reload(&agent, &pg_policy(pg.port, &policy_for("off")));
    let before = evs.len();
    pgbench(&cg, &pg, 20);
    let evs = settle(&agent);
    let (summary, each) = executions_by_conn(&evs[before..]);
    assert!(
        summary.is_empty() && each.is_empty(),
        "{summary:?} {each:?}"
    );

    // The operator's views: metrics count every execution, `tail` shows
    // and filters them.
    let out = agent.cli(&["tail", "--event", "executions", "-n", "3"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(
        text.lines()
            .all(|l| l.contains("executions") && l.contains("count=")),
        "{text}"
    );
    let out = agent.cli(&["tail", "--event", "execute", "-n", "2", "-o", "json"]);
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["event"], "execute");
    }
}

/// Records of one connection of the `pg-exec cases` run, by the text of
/// the statement their decision was about.
fn by_statement<'a>(evs: &'a [Value], event: &str) -> HashMap<String, Vec<&'a Value>> {
    let text: HashMap<&str, &str> = evs
        .iter()
        .filter(|e| e["event"] == "query")
        .map(|e| {
            (
                e["decision_id"].as_str().unwrap(),
                e["query"].as_str().unwrap(),
            )
        })
        .collect();
    let mut out: HashMap<String, Vec<&Value>> = HashMap::new();
    for e in evs.iter().filter(|e| e["event"] == event) {
        let id = e["decision_id"].as_str().unwrap();
        out.entry(text[id].to_owned()).or_default().push(e);
    }
    out
}

fn rows_of(records: &[&Value]) -> Vec<u64> {
    records
        .iter()
        .map(|e| e["rows"].as_u64().unwrap_or(u64::MAX))
        .collect()
}

/// tokio-postgres: rows for INSERT, SELECT, UPDATE, DELETE and COPY, a
/// portal fetched in parts (one record per Execute), a constraint
/// violation recorded with its SQLSTATE, and simple queries' records with
/// rows and error; the summary of the same run adds up the same.
#[test]
fn postgres_rows_errors_and_portals() {
    let pg = PgServer::start();
    let cg = TestCgroup::new();
    let agent = Agent::start(&pg_policy(pg.port, &policy_for("each")), &cg, false);
    let run = |agent: &Agent| {
        let out = run_any(cg.command(env!("CARGO_BIN_EXE_pg-exec")).args([
            "127.0.0.1",
            &pg.port.to_string(),
            "cases",
        ]));
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
            "pg-exec failed:\n{}\n{}\nagent log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            agent.log()
        );
        settle(agent)
    };
    let evs = run(&agent);
    let exec = by_statement(&evs, "execute");
    let insert = &exec["INSERT INTO exec_items VALUES ($1, $2)"];
    assert_eq!(insert.len(), 11, "{insert:?}");
    assert_eq!(
        insert
            .iter()
            .filter(|e| e["outcome"] == "ok" && e["rows"] == 1)
            .count(),
        10
    );
    let failed: Vec<_> = insert.iter().filter(|e| e["outcome"] == "error").collect();
    assert_eq!(failed.len(), 1, "{insert:?}");
    assert_eq!(failed[0]["error"], "23505");
    assert!(failed[0]["rows"].is_null());
    assert_eq!(
        rows_of(&exec["SELECT id FROM exec_items WHERE id > $1"]),
        [10]
    );
    assert_eq!(
        rows_of(&exec["SELECT id FROM exec_items WHERE id >= $1 ORDER BY id"]),
        [3, 3, 3, 1],
        "one record per Execute of the portal"
    );
    assert_eq!(
        rows_of(&exec["UPDATE exec_items SET v = 'b' WHERE id < $1"]),
        [4]
    );
    assert_eq!(rows_of(&exec["DELETE FROM exec_items WHERE id = $1"]), [1]);
    assert_eq!(rows_of(&exec["COPY exec_items FROM STDIN"]), [5]);
    let query = |text: &str| {
        evs.iter()
            .find(|e| e["event"] == "query" && e["query"] == text)
            .unwrap_or_else(|| panic!("no query record for {text}"))
    };
    let q = query("SELECT id FROM exec_items WHERE id > 100");
    assert_eq!(
        (&q["outcome"], &q["rows"]),
        (&Value::from("ok"), &Value::from(5)),
        "{q}"
    );
    let q = query("INSERT INTO exec_items VALUES (101, 'dup')");
    assert_eq!(
        (&q["outcome"], &q["error"]),
        (&Value::from("error"), &Value::from("23505")),
        "{q}"
    );
    let q = query("CREATE TABLE exec_items (id int primary key, v text)");
    assert_eq!(q["outcome"], "ok", "{q}");
    assert!(q["rows"].is_null(), "{q}");
    // A Parse's record says nothing of results: those are its executions'.
    assert!(query("INSERT INTO exec_items VALUES ($1, $2)")["outcome"].is_null());
    assert_linked(&evs);

    // The same run summarised: counts, rows and errors add up alike.
    reload(&agent, &pg_policy(pg.port, &policy_for("summary")));
    let before = evs.len();
    let evs = run(&agent);
    let new = &evs[before..];
    let summary = by_statement(new, "executions");
    let total = |text: &str, key: &str| -> u64 {
        summary[text].iter().map(|e| e[key].as_u64().unwrap()).sum()
    };
    let insert = "INSERT INTO exec_items VALUES ($1, $2)";
    assert_eq!(
        (
            total(insert, "count"),
            total(insert, "rows"),
            total(insert, "errors")
        ),
        (11, 10, 1)
    );
    assert!(summary[insert].iter().any(|e| e["last_error"] == "23505"));
    let portal = "SELECT id FROM exec_items WHERE id >= $1 ORDER BY id";
    assert_eq!((total(portal, "count"), total(portal, "rows")), (4, 10));
    assert_eq!(total("COPY exec_items FROM STDIN", "rows"), 5);
    assert_linked(&evs);
}

/// A client that ran its executions and stays connected: nothing is lost
/// when the agent stops (SIGTERM: drain, then the connection is cut), in
/// summary mode (the open window is written) and in each mode.
#[test]
fn postgres_executions_survive_agent_shutdown() {
    let pg = PgServer::start();
    for mode in ["summary", "each"] {
        let cg = TestCgroup::new();
        let mut agent = Agent::start(&pg_policy(pg.port, &policy_for(mode)), &cg, false);
        let mut child = cg
            .command(env!("CARGO_BIN_EXE_pg-exec"))
            .args(["127.0.0.1", &pg.port.to_string(), "hold", "250"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "{}", agent.log());
        // `identities` counts the live workload's executions.
        let out = agent.cli(&["identities", "--json"]);
        let ids: Value = serde_json::from_slice(&out.stdout).unwrap();
        let me = ids
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["comm"] == "pg-exec")
            .unwrap_or_else(|| panic!("{ids}"));
        assert_eq!(me["executions"], 250, "{me}");
        // Stop at once, well inside the summary's one-second window.
        assert!(agent.stop().success());
        let _ = child.kill();
        let _ = child.wait();
        let evs = agent.events();
        let conn = conns_of(&evs, "pg-exec")[0];
        let (summary, each) = executions_by_conn(&evs);
        let got = if mode == "summary" { &summary } else { &each };
        assert_eq!(got.get(&conn).copied(), Some(250), "{mode}: {got:?}");
        // Written before the connection's disconnect and the agent's stop.
        let pos = |pred: &dyn Fn(&Value) -> bool| evs.iter().rposition(pred).unwrap();
        let last_exec =
            pos(&|e| e["conn"] == conn && (e["event"] == "execute" || e["event"] == "executions"));
        let disconnect = pos(&|e| e["conn"] == conn && e["event"] == "disconnect");
        assert!(last_exec < disconnect, "{mode}");
        assert_eq!(evs.last().unwrap()["event"], "agent_stop");
        let verify = run_any(
            Command::new(interceptor_tests::agent_bin())
                .args(["audit", "verify"])
                .arg(&agent.audit_log),
        );
        assert!(
            verify.status.success(),
            "{}",
            String::from_utf8_lossy(&verify.stdout)
        );
    }
}

/// sysbench `--db-ps-mode=auto` (point selects as prepared statements):
/// the executions in the log are exactly the selects sysbench ran, per
/// connection (one thread, so one connection), in summary and in each
/// mode; a disconnect mid-window loses nothing.
#[test]
fn sysbench_prepared_executions_counted_exactly() {
    let db = MariaDb::start();
    let cg = TestCgroup::new();
    let agent = start_agent_with(&mysql_policy(db.port, &policy_for("summary")), &cg, &[]);
    let common = ["--tables=1", "--table-size=1000"];
    run_ok(
        Command::new("sysbench")
            .arg("oltp_point_select")
            .args(sysbench_args(&db))
            .args(common)
            .arg("prepare"),
    );
    let run = |events: u32| {
        let out = run_ok(
            sysbench_in(&cg, &db, "oltp_point_select", &common)
                .args(["--db-ps-mode=auto", "--threads=1", "--time=0"])
                .arg(format!("--events={events}"))
                .arg("run"),
        );
        let reads: u64 = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("read:"))
            .unwrap_or_else(|| panic!("{out}"))
            .trim()
            .parse()
            .unwrap();
        assert_eq!(reads, u64::from(events), "{out}");
    };
    run(700);
    let evs = settle(&agent);
    let (summary, each) = executions_by_conn(&evs);
    assert_eq!(
        summary.values().copied().collect::<Vec<_>>(),
        [700],
        "{summary:?}"
    );
    assert!(each.is_empty());
    let rows: u64 = evs
        .iter()
        .filter(|e| e["event"] == "executions")
        .map(|e| e["rows"].as_u64().unwrap())
        .sum();
    assert_eq!(rows, 700, "each point select finds its row");
    assert_linked(&evs);

    reload(&agent, &mysql_policy(db.port, &policy_for("each")));
    let before = evs.len();
    run(400);
    let evs = settle(&agent);
    let (summary, each) = executions_by_conn(&evs[before..]);
    assert!(summary.is_empty(), "{summary:?}");
    assert_eq!(
        each.values().copied().collect::<Vec<_>>(),
        [400],
        "{each:?}"
    );
    assert!(
        evs[before..]
            .iter()
            .filter(|e| e["event"] == "execute")
            .all(|e| e["outcome"] == "ok" && e["rows"] == 1)
    );
    assert_linked(&evs);
}

/// mysql_async: prepared INSERT, a duplicate key (error 1062, SQLSTATE
/// 23000), SELECT, UPDATE and DELETE rows; COM_QUERY records with rows
/// and errors; COM_STMT_CLOSE writes the statement's summary.
#[test]
fn mysql_rows_and_errors() {
    let db = MariaDb::start();
    let cg = TestCgroup::new();
    let agent = start_agent_with(&mysql_policy(db.port, &policy_for("each")), &cg, &[]);
    let out = run_any(cg.command(env!("CARGO_BIN_EXE_mysql-exec")).args([
        &db.port.to_string(),
        interceptor_tests::mysql::APP_USER,
        interceptor_tests::mysql::APP_PASSWORD,
    ]));
    assert!(
        out.status.success(),
        "mysql-exec failed:\n{}\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    let evs = settle(&agent);
    let exec = by_statement(&evs, "execute");
    let insert = &exec["INSERT INTO exec_items VALUES (?, ?)"];
    assert_eq!(insert.len(), 6, "{insert:?}");
    let failed: Vec<_> = insert.iter().filter(|e| e["outcome"] == "error").collect();
    assert_eq!(failed.len(), 1, "{insert:?}");
    assert_eq!(
        (&failed[0]["error"], &failed[0]["error_code"]),
        (&Value::from("23000"), &Value::from(1062))
    );
    assert_eq!(
        rows_of(&exec["SELECT id FROM exec_items WHERE id > ?"]),
        [5]
    );
    assert_eq!(
        rows_of(&exec["UPDATE exec_items SET v = 'b' WHERE id < ?"]),
        [2]
    );
    assert_eq!(rows_of(&exec["DELETE FROM exec_items WHERE id = ?"]), [1]);
    let query = |text: &str| {
        evs.iter()
            .find(|e| e["event"] == "query" && e["query"] == text)
            .unwrap_or_else(|| panic!("no query record for {text}"))
    };
    let q = query("SELECT id FROM exec_items");
    assert_eq!(
        (&q["outcome"], &q["rows"]),
        (&Value::from("ok"), &Value::from(4)),
        "{q}"
    );
    let q = query("INSERT INTO exec_items VALUES (1, 'dup')");
    assert_eq!(
        (&q["error"], &q["error_code"]),
        (&Value::from("23000"), &Value::from(1062)),
        "{q}"
    );
    assert_linked(&evs);
}
