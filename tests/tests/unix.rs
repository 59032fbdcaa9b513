//! Unix-domain socket targets end to end: PostgreSQL's `.s.PGSQL.PORT` and
//! MariaDB's `mysqld.sock` as `address: unix:/path`. A workload in the test
//! cgroup connects to the server's own socket path, as local jobs and admin
//! tools do; `cgroup/connect_unix` sends it to the agent, which decides
//! every statement and relays to the real socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{process::Stdio, time::Duration};

use interceptor_tests::{
    Agent, PgServer, TestCgroup, mysql::MariaDb, pg_bin, run_any, show, text, wait_exit,
};
use serde_json::Value;

fn events(agent: &Agent, event: &str) -> Vec<Value> {
    agent
        .events()
        .into_iter()
        .filter(|e| e["event"] == event)
        .collect()
}

/// A python3 one-off inside `cg`: connects to the unix socket `path`,
/// prints what getpeername says, sends `send` and prints what comes back
/// (until the peer closes or 5 s pass).
fn raw_unix(cg: &TestCgroup, path: &str, send: &[u8]) -> std::process::Output {
    let script = r"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
print('peer', s.getpeername(), flush=True)
s.sendall(bytes.fromhex(sys.argv[2]))
s.settimeout(5)
out = b''
try:
    while True:
        b = s.recv(4096)
        if not b:
            break
        out += b
except Exception as e:
    print('recv', e)
print('got', out.hex(), flush=True)
";
    let hex: String = send.iter().map(|b| format!("{b:02x}")).collect();
    run_any(cg.command("python3").args(["-c", script, path, &hex]))
}

#[test]
#[allow(clippy::too_many_lines)]
fn unix_socket_targets_are_decided_like_tcp() {
    let pg = PgServer::start();
    pg.sql(
        "CREATE TABLE secrets (v text); INSERT INTO secrets VALUES ('s3cr3t');
         CREATE TABLE items (id int); INSERT INTO items VALUES (1), (2);",
    );
    let my = MariaDb::start();
    let dir = pg.socket_dir().display().to_string();
    let pg_path = format!("{dir}/.s.PGSQL.{}", pg.port);
    let my_path = my.socket.display().to_string();
    let policy = format!(
        "version: 1
default: allow
on_parse_error: deny
targets:
  - name: pg-local
    protocol: postgres
    address: unix:{pg_path}
  - name: maria-local
    protocol: mysql
    address: unix:{my_path}
rules:
  - name: no-secrets
    any_tables: [public.secrets, shop.secrets]
    decision: deny
  - name: ddl-approval
    kinds: [ddl]
    decision: approve
    approval: {{approvers: [root], timeout: 60s}}
"
    );
    let cg = TestCgroup::new();
    let agent = Agent::start(&policy, &cg, false);
    let psql = pg_bin("psql");
    let psql_at = |sql: &str| {
        run_any(
            cg.command(psql.to_str().unwrap())
                .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", &dir, "-p"])
                .arg(pg.port.to_string())
                .args(["-U", "postgres", "-d", "postgres", "-c", sql]),
        )
    };

    // psql -h DIR: the server's own socket, decided by the agent.
    let out = psql_at("select count(*) from items");
    assert_eq!(text(&out.stdout).trim(), "2", "{}", show(&out));
    let connect = agent.wait_event("connect", |e| {
        e["event"] == "connect" && e["target"] == "pg-local"
    });
    assert_eq!(connect["dst"], format!("unix:{pg_path}"), "{connect}");
    assert_eq!(connect["identity"]["comm"], "psql", "{connect}");
    let q = agent.wait_event("query", |e| {
        e["event"] == "query"
            && e["target"] == "pg-local"
            && e["query"] == "select count(*) from items"
    });
    assert_eq!(q["decision"], "allow", "{q}");

    // A denial, over the socket.
    let out = psql_at("select * from secrets");
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("interceptor: denied by rule \"no-secrets\""),
        "{}",
        show(&out)
    );
    assert!(!text(&out.stdout).contains("s3cr3t"));

    // An approval: held until root approves (the workload runs as nobody:
    // nobody approves their own statements).
    let held = cg
        .command("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(&psql)
        .args(["-X", "-At", "-h", &dir, "-p"])
        .arg(pg.port.to_string())
        .args([
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-c",
            "create table held_unix (v int)",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = agent.wait_pending_approval();
    assert!(
        agent
            .cli(&["approvals", "approve", &id, "--reason", "unix test"])
            .status
            .success()
    );
    let out = wait_exit(held, Duration::from_secs(10));
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        pg.sql("select count(*) from pg_tables where tablename = 'held_unix'")
            .trim(),
        "1"
    );

    // Garbage gets a FATAL (an ErrorResponse, 'E') and a clean close,
    // audited, and the agent goes on.
    let out = raw_unix(&cg, &pg_path, b"\x00\x00\x00\x08garbage!");
    let stdout = text(&out.stdout);
    assert!(stdout.contains("got 45"), "{}", show(&out));
    // getpeername shows the server's path, not the agent's listener.
    assert!(
        stdout.contains(&format!("peer {pg_path}\n")),
        "{}",
        show(&out)
    );
    agent.wait_event("protocol_error", |e| {
        e["event"] == "protocol_error" && e["target"] == "pg-local"
    });
    let out = psql_at("select 'still serving'");
    assert_eq!(text(&out.stdout).trim(), "still serving", "{}", show(&out));

    // MariaDB's socket: mariadb --socket, decided the same way.
    let mariadb = |sql: &str| {
        run_any(
            cg.command("mariadb")
                .args(["--no-defaults", "-uroot", "-N", "-B"])
                .arg(format!("--socket={my_path}"))
                .args(["-e", sql]),
        )
    };
    let out = mariadb("select name from shop.items where id = 2");
    assert_eq!(text(&out.stdout).trim(), "pear", "{}", show(&out));
    let out = mariadb("select secret from shop.secrets");
    assert!(
        text(&out.stderr).contains("ERROR 1142") && text(&out.stderr).contains("no-secrets"),
        "{}",
        show(&out)
    );
    let connect = agent.wait_event("connect", |e| {
        e["event"] == "connect" && e["target"] == "maria-local"
    });
    assert_eq!(connect["dst"], format!("unix:{my_path}"), "{connect}");

    // Outside the cgroup, the same socket is untouched (the test process).
    assert_eq!(pg.sql("select count(*) from secrets").trim(), "1");

    // The kill switch refuses the unix connect in the kernel.
    assert!(
        agent
            .cli(&["block", "comm=psql", "--reason", "unix test"])
            .status
            .success()
    );
    let out = psql_at("select 1");
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("Operation not permitted"),
        "{}",
        show(&out)
    );
    assert!(agent.cli(&["unblock", "comm=psql"]).status.success());
    assert_eq!(text(&psql_at("select 3").stdout).trim(), "3");

    // Nothing got past unseen: every statement the workloads ran is in the
    // log as a decision.
    let queries = events(&agent, "query");
    assert!(
        queries
            .iter()
            .any(|q| q["query"] == "select secret from shop.secrets" && q["decision"] == "deny"),
        "{queries:?}"
    );
}

/// Fail closed: with the agent killed, a connect to a unix target is
/// refused, never sent straight to the server.
#[test]
fn unix_targets_fail_closed_when_the_agent_dies() {
    let pg = PgServer::start();
    let dir = pg.socket_dir().display().to_string();
    let path = format!("{dir}/.s.PGSQL.{}", pg.port);
    let policy = format!(
        "version: 1\ndefault: allow\ntargets:\n  - name: pg-local\n    protocol: postgres\n    address: unix:{path}\n"
    );
    let cg = TestCgroup::new();
    let mut agent = Agent::start(&policy, &cg, false);
    let psql = pg_bin("psql");
    let run = || {
        run_any(
            cg.command(psql.to_str().unwrap())
                .args(["-X", "-At", "-h", &dir, "-p"])
                .arg(pg.port.to_string())
                .args(["-U", "postgres", "-d", "postgres", "-c", "select 'through'"]),
        )
    };
    assert_eq!(text(&run().stdout).trim(), "through");
    agent.kill9();
    let out = run();
    assert!(!out.status.success(), "{}", show(&out));
    assert!(!text(&out.stdout).contains("through"), "{}", show(&out));
}

/// A handover with a unix target: the successor binds its listener over the
/// same path, the old agent drains, and a pgbench opening a connection per
/// transaction over the socket sees no failure; tail shows the unix
/// connections.
#[test]
fn unix_targets_survive_a_handover() {
    use interceptor_tests::unique;
    let pg = PgServer::start();
    let dir = pg.socket_dir().display().to_string();
    let path = format!("{dir}/.s.PGSQL.{}", pg.port);
    let policy = format!(
        "version: 1\ndefault: allow\ntargets:\n  - name: pg-local\n    protocol: postgres\n    address: unix:{path}\n"
    );
    let cg = TestCgroup::new();
    let state = tempfile::tempdir().unwrap();
    let state_arg = state.path().to_str().unwrap().to_owned();
    let pin = std::path::PathBuf::from("/sys/fs/bpf").join(unique("interceptor-test"));
    let pin_arg = pin.to_str().unwrap().to_owned();
    let unix_dir = std::env::temp_dir().join(unique("interceptor-unix"));
    let unix_arg = unix_dir.to_str().unwrap().to_owned();
    let mut first = Agent::start_with(
        &policy,
        &cg,
        false,
        &[
            "--pin-dir",
            &pin_arg,
            "--state-dir",
            &state_arg,
            "--unix-dir",
            &unix_arg,
        ],
    );
    let listen = format!("127.0.0.1:{}", first.listen_port);
    // pgbench -S needs its tables: made directly (not redirected).
    interceptor_tests::run_ok(
        std::process::Command::new(pg_bin("pgbench"))
            .args(["-i", "-q", "-s", "1", "-h", &dir, "-p"])
            .arg(pg.port.to_string())
            .args(["-U", "postgres", "postgres"]),
    );
    let bench = cg
        .command(pg_bin("pgbench").to_str().unwrap())
        .args([
            "-n", "-S", "-C", "-c", "2", "-j", "2", "-T", "6", "-h", &dir, "-p",
        ])
        .arg(pg.port.to_string())
        .args(["-U", "postgres", "postgres"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let second = Agent::start_with(
        &policy,
        &cg,
        false,
        &[
            "--pin-dir",
            &pin_arg,
            "--state-dir",
            &state_arg,
            "--unix-dir",
            &unix_arg,
            "--listen",
            &listen,
            "--audit-log",
            first.audit_log.to_str().unwrap(),
        ],
    );
    let old = first.child.take().unwrap();
    let out = wait_exit(old, Duration::from_secs(20));
    assert!(out.status.success(), "old agent: {}", first.log());
    let out = bench.wait_with_output().unwrap();
    let report = text(&out.stdout);
    let odd: Vec<Value> = second
        .events()
        .into_iter()
        .filter(|e| e["event"] == "reject" || (e["event"] == "disconnect" && !e["error"].is_null()))
        .collect();
    assert!(
        out.status.success(),
        "pgbench: {report}{}\nodd events: {odd:?}",
        text(&out.stderr)
    );
    assert!(
        report.contains("number of failed transactions: 0"),
        "{report}"
    );
    let tail = text(&second.cli(&["tail", "-n", "50"]).stdout);
    assert!(tail.contains("pg-local"), "{tail}");
    let connects = events(&second, "connect")
        .into_iter()
        .filter(|e| e["dst"] == format!("unix:{path}"))
        .count();
    assert!(connects > 10, "{connects} connects over the socket");
}
