//! TLS on both legs end to end: a PostgreSQL server with `ssl=on` that
//! accepts TCP logins only over TLS (`hostssl`), a MariaDB with a server
//! certificate, certificates made by the test (rcgen), and real clients
//! (psql, pgbench, mariadb, sysbench, a hand-written direct-TLS client) in
//! a test cgroup whose connections the agent terminates on both legs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    os::unix::fs::PermissionsExt as _,
    process::{Command, Output, Stdio},
    time::Duration,
};

use interceptor_tests::{
    Agent, PgServer, TestCgroup,
    mysql::{
        APP_PASSWORD, APP_USER, MariaDb, mariadb_in, mysql_policy, start_agent_with, sysbench_args,
    },
    pg_bin, pg_policy,
    pki::{TestCa, ids},
    run_any, run_ok, show, text, wait_exit, wait_for,
};
use serde_json::Value;

const SCRAM_USER: &str = "scram";
const SCRAM_PASSWORD: &str = "scram-Secret-3";

/// A PostgreSQL server with TLS whose TCP logins must use TLS; `scram`
/// logs in with SCRAM-SHA-256, everyone else by trust.
struct TlsPg {
    pg: PgServer,
    ca: TestCa,
}

fn tls_pg() -> TlsPg {
    let ca = TestCa::new("Test server CA");
    let cert = ca.issue(
        "pg-server",
        &["127.0.0.1", "::1", "localhost"],
        Some(ids("postgres")),
    );
    let hba = format!(
        "local all all trust\n\
         hostssl all {SCRAM_USER} 127.0.0.1/32 scram-sha-256\n\
         hostssl all {SCRAM_USER} ::1/128 scram-sha-256\n\
         hostssl all all 127.0.0.1/32 trust\n\
         hostssl all all ::1/128 trust\n"
    );
    let pg = PgServer::start_with(
        &[
            "ssl=on".to_owned(),
            format!("ssl_cert_file={}", cert.cert.display()),
            format!("ssl_key_file={}", cert.key.display()),
        ],
        Some(&hba),
    );
    pg.sql(&format!(
        "CREATE ROLE {SCRAM_USER} LOGIN PASSWORD '{SCRAM_PASSWORD}';
         CREATE TABLE secrets (v text); INSERT INTO secrets VALUES ('s3cr3t');
         CREATE TABLE items (v text); INSERT INTO items VALUES ('apple');
         GRANT SELECT ON items TO {SCRAM_USER};"
    ));
    TlsPg { pg, ca }
}

const PG_RULES: &str = "mode: enforce\ndefault: allow\non_parse_error: allow\nrules:\n  - name: no-secrets\n    any_tables: [public.secrets]\n    decision: deny\n    message: secrets are off limits\n  - name: tls-ddl\n    kinds: [ddl]\n    decision: approve\n    approval: {approvers: [root], timeout: 60s}\n";

/// psql in `cg` with a libpq connection string.
fn psql(cg: &TestCgroup, conninfo: &str, sql: &str) -> Output {
    run_any(cg.command(pg_bin("psql").to_str().unwrap()).args([
        "-X",
        "-At",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        conninfo,
        "-c",
        sql,
    ]))
}

fn conninfo(port: u16, extra: &str) -> String {
    format!("host=127.0.0.1 port={port} user=postgres dbname=postgres {extra}")
}

fn agent_ca(agent: &Agent) -> String {
    agent.dir.path().join("state/ca.crt").display().to_string()
}

fn sessions(agent: &Agent) -> Vec<Value> {
    agent
        .events()
        .into_iter()
        .filter(|e| e["event"] == "session")
        .collect()
}

#[test]
fn tls_postgres_require_verify_full_plain_workload_denial_and_kill_switch() {
    let TlsPg { pg, ca: _ca } = tls_pg();
    let cg = TestCgroup::new();
    let agent = Agent::start(&pg_policy(pg.port, PG_RULES), &cg, false);

    // The agent's CA was made in --state-dir, its key private.
    let key = agent.dir.path().join("state/ca.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // sslmode=require: no configuration at all.
    let out = psql(
        &cg,
        &conninfo(pg.port, "sslmode=require"),
        "select 'req-ok'",
    );
    assert_eq!(text(&out.stdout).trim(), "req-ok", "{}", show(&out));
    // verify-full against the agent's CA (certificate issued for 127.0.0.1).
    let ca = agent_ca(&agent);
    let out = psql(
        &cg,
        &conninfo(pg.port, &format!("sslmode=verify-full sslrootcert={ca}")),
        "select 'full-ok'",
    );
    assert_eq!(text(&out.stdout).trim(), "full-ok", "{}", show(&out));
    // A plain workload reaches the TLS-only server: the agent's server leg
    // is TLS (tls.server: prefer found it).
    let out = psql(
        &cg,
        &conninfo(pg.port, "sslmode=disable"),
        "select 'plain-ok'",
    );
    assert_eq!(text(&out.stdout).trim(), "plain-ok", "{}", show(&out));
    // Directly, the same plain login is refused by the server.
    let direct = run_any(Command::new(pg_bin("psql")).args([
        "-X",
        "-At",
        "-d",
        &conninfo(pg.port, "sslmode=disable"),
        "-c",
        "select 1",
    ]));
    assert!(
        text(&direct.stderr).contains("no encryption"),
        "{}",
        show(&direct)
    );

    // Denials over TLS: 42501, nothing reaches the table.
    let out = psql(
        &cg,
        &conninfo(pg.port, "sslmode=require"),
        "select * from secrets",
    );
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("no-secrets") && !text(&out.stdout).contains("s3cr3t"),
        "{}",
        show(&out)
    );

    // Approvals over TLS: the statement waits, root approves it (the
    // workload runs as nobody: nobody approves their own statements).
    let waiting = cg
        .command("setpriv")
        .env("HOME", "/nonexistent")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(pg_bin("psql"))
        .args([
            "-X",
            "-At",
            "-d",
            &conninfo(pg.port, "sslmode=require"),
            "-c",
            "create table t_tls (v int)",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = agent.wait_pending_approval();
    let out = agent.cli(&["approvals", "approve", &id, "--reason", "tls test"]);
    assert!(out.status.success(), "{}", show(&out));
    let out = wait_exit(waiting, Duration::from_secs(10));
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        pg.sql("select count(*) from pg_tables where tablename = 't_tls'")
            .trim(),
        "1"
    );

    // Audit: both legs per session.
    let s = sessions(&agent);
    let tls_both = s
        .iter()
        .find(|e| e["tls"]["client"].is_object() && e["tls"]["server"].is_object())
        .unwrap_or_else(|| panic!("no session with TLS on both legs: {s:?}"));
    let client = &tls_both["tls"]["client"];
    let server = &tls_both["tls"]["server"];
    assert_eq!(client["version"], "TLSv1.3", "{tls_both}");
    assert!(
        client["cipher"].as_str().unwrap().starts_with("TLS13_"),
        "{tls_both}"
    );
    assert_eq!(client["issued_by_agent_ca"], true, "{tls_both}");
    assert_eq!(client["direct"], false, "{tls_both}");
    assert!(
        client["subject"].as_str().unwrap().contains("127.0.0.1"),
        "{tls_both}"
    );
    assert!(
        server["version"].as_str().unwrap().starts_with("TLSv1."),
        "{tls_both}"
    );
    assert_eq!(server["server_cert_verified"], false, "{tls_both}");
    assert_eq!(server["mode"], "prefer", "{tls_both}");
    assert!(
        server["subject"].as_str().unwrap().contains("CN=127.0.0.1"),
        "{tls_both}"
    );
    assert!(
        s.iter()
            .any(|e| e["tls"]["client"].is_null() && e["tls"]["server"].is_object()),
        "no plain-client session with a TLS server leg: {s:?}"
    );

    // The kill switch over TLS: cancel on the server, connection closed.
    let sleeper = cg
        .command(pg_bin("psql").to_str().unwrap())
        .args([
            "-X",
            "-At",
            "-d",
            &conninfo(pg.port, "sslmode=require"),
            "-c",
            "select pg_sleep(30)",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sleepers = || {
        pg.sql("select count(*) from pg_stat_activity where query like 'select pg_sleep%' and state = 'active'")
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    wait_for("pg_sleep on the server", Duration::from_secs(15), || {
        sleepers() == 1
    });
    let out = agent.cli(&["block", "comm=psql", "--reason", "tls incident"]);
    assert!(out.status.success(), "{}", show(&out));
    let out = wait_exit(sleeper, Duration::from_secs(3));
    assert!(
        !out.status.success(),
        "psql survived the block: {}",
        show(&out)
    );
    wait_for("backend gone", Duration::from_secs(3), || sleepers() == 0);
    let block = agent.wait_event("block", |e| e["event"] == "block");
    assert_eq!(block["connections_closed"], 1, "{block}");
    assert_eq!(block["cancels_sent"], 1, "{block}");
    let out = agent.cli(&["unblock", "comm=psql"]);
    assert!(out.status.success(), "{}", show(&out));
    let out = psql(
        &cg,
        &conninfo(pg.port, "sslmode=require"),
        "select 'after-ok'",
    );
    assert_eq!(text(&out.stdout).trim(), "after-ok", "{}", show(&out));
}

#[test]
fn tls_postgres_configured_certificates_and_server_verification() {
    let TlsPg { pg, ca: server_ca } = tls_pg();
    let cg = TestCgroup::new();
    // The certificate workloads see, from a CA of the operator's.
    let workload_ca = TestCa::new("Test workload CA");
    let agent_cert = workload_ca.issue("agent", &["127.0.0.1", "::1"], None);
    let sca = server_ca.cert.display();
    let policy = format!(
        "version: 1\ntargets:
  - name: pg
    protocol: postgres
    address: 127.0.0.1:{port}
    tls: {{server: verify-full, server_ca: {sca}, cert: {cert}, key: {key}}}
  - name: pg6
    protocol: postgres
    address: '[::1]:{port}'
    tls: {{server: verify-full, server_ca: {sca}, server_name: wrong.example}}
{PG_RULES}",
        port = pg.port,
        cert = agent_cert.cert.display(),
        key = agent_cert.key.display(),
    );
    let agent = Agent::start(&policy, &cg, false);

    let wca = workload_ca.cert.display();
    let out = psql(
        &cg,
        &conninfo(pg.port, &format!("sslmode=verify-full sslrootcert={wca}")),
        "select 'configured-ok'",
    );
    assert_eq!(text(&out.stdout).trim(), "configured-ok", "{}", show(&out));
    let s = agent.wait_event("a verified session", |e| {
        e["event"] == "session" && e["tls"]["server"]["server_cert_verified"] == true
    });
    assert_eq!(s["tls"]["client"]["issued_by_agent_ca"], false, "{s}");
    assert_eq!(s["tls"]["server"]["mode"], "verify-full", "{s}");
    // The agent's own CA did not issue it: a workload trusting only that CA
    // refuses the agent.
    let out = psql(
        &cg,
        &conninfo(
            pg.port,
            &format!("sslmode=verify-full sslrootcert={}", agent_ca(&agent)),
        ),
        "select 1",
    );
    assert!(!out.status.success(), "{}", show(&out));

    // verify-full with a name the server's certificate does not carry: the
    // workload gets a clear FATAL, the failure is audited.
    let out = psql(
        &cg,
        "host=::1 port=PORT user=postgres dbname=postgres sslmode=require"
            .replace("PORT", &pg.port.to_string())
            .as_str(),
        "select 1",
    );
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        err.contains("TLS on the server leg") && err.contains("certificate"),
        "{}",
        show(&out)
    );
    let ev = agent.wait_event("a server-leg tls_error", |e| {
        e["event"] == "tls_error" && e["leg"] == "server"
    });
    assert!(
        ev["error"].as_str().unwrap().contains("wrong.example"),
        "{ev}"
    );
    // The agent is unaffected.
    let out = psql(
        &cg,
        &conninfo(pg.port, &format!("sslmode=verify-full sslrootcert={wca}")),
        "select 'still-ok'",
    );
    assert_eq!(text(&out.stdout).trim(), "still-ok", "{}", show(&out));
}

#[test]
fn tls_postgres_channel_binding_gets_a_clear_error() {
    let TlsPg { pg, ca: _ca } = tls_pg();
    let cg = TestCgroup::new();
    let agent = Agent::start(&pg_policy(pg.port, PG_RULES), &cg, false);
    let scram = |extra: &str| {
        let ci = format!(
            "host=127.0.0.1 port={} user={SCRAM_USER} password={SCRAM_PASSWORD} dbname=postgres sslmode=require {extra}",
            pg.port
        );
        psql(&cg, &ci, "select v from items")
    };
    for binding in ["channel_binding=require", ""] {
        let out = scram(binding);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{binding}: {}", show(&out));
        assert!(
            err.contains("SCRAM channel binding cannot pass through the agent")
                && err.contains("channel_binding=disable"),
            "{binding}: {}",
            show(&out)
        );
    }
    let out = scram("channel_binding=disable");
    assert_eq!(text(&out.stdout).trim(), "apple", "{}", show(&out));
    let ev = agent.wait_event("the refusal audited", |e| {
        e["event"] == "disconnect"
            && e["error"]
                .as_str()
                .is_some_and(|s| s.contains("channel binding"))
    });
    assert_eq!(ev["identity"]["comm"], "psql", "{ev}");
}

fn probe(cg: &TestCgroup, args: &[&str]) -> Output {
    run_any(cg.command(env!("CARGO_BIN_EXE_pg-tls-probe")).args(args))
}

/// Direct TLS (PostgreSQL 17's `sslnegotiation=direct`): the installed
/// libpq 15 cannot send it, so a Rust client (tokio-rustls) does. Then the
/// bad inputs: each closes its own connection, is audited, and leaves the
/// agent serving.
#[test]
fn tls_postgres_direct_tls_and_bad_input() {
    let TlsPg { pg, ca: _ca } = tls_pg();
    let cg = TestCgroup::new();
    let agent = Agent::start(&pg_policy(pg.port, PG_RULES), &cg, false);
    let port = pg.port.to_string();
    let ca = agent_ca(&agent);

    let out = probe(&cg, &["direct", "127.0.0.1", &port, &ca]);
    assert_eq!(text(&out.stdout).trim(), "direct-ok", "{}", show(&out));
    let s = agent.wait_event("a direct TLS session", |e| {
        e["event"] == "session" && e["tls"]["client"]["direct"] == true
    });
    assert_eq!(s["tls"]["client"]["alpn"], "postgresql", "{s}");
    assert!(s["tls"]["server"].is_object(), "{s}");

    let tls_errors = |agent: &Agent| {
        agent
            .events()
            .into_iter()
            .filter(|e| e["event"] == "tls_error")
            .map(|e| e["error"].as_str().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
    };
    let out = probe(&cg, &["direct-no-alpn", "127.0.0.1", &port, &ca]);
    assert!(out.status.success(), "{}", show(&out));
    wait_for("no-ALPN refusal audited", Duration::from_secs(5), || {
        tls_errors(&agent).iter().any(|e| e.contains("ALPN"))
    });

    let out = probe(&cg, &["plaintext-after-s", "127.0.0.1", &port]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(!text(&out.stdout).contains("R"), "{}", show(&out));
    let out = probe(&cg, &["garbage", "127.0.0.1", &port]);
    assert!(out.status.success(), "{}", show(&out));
    wait_for("handshake failures audited", Duration::from_secs(5), || {
        tls_errors(&agent).len() >= 3
    });
    let out = probe(&cg, &["pipelined", "127.0.0.1", &port]);
    assert!(
        text(&out.stdout).contains("data after SSLRequest"),
        "{}",
        show(&out)
    );
    let out = probe(&cg, &["stall", "127.0.0.1", &port]);
    let said = text(&out.stdout);
    assert!(said.contains("closed after 1"), "{}", show(&out));
    wait_for("the timeout audited", Duration::from_secs(5), || {
        tls_errors(&agent)
            .iter()
            .any(|e| e.contains("did not complete the TLS handshake within 10s"))
    });
    // Unaffected.
    let out = psql(&cg, &conninfo(pg.port, "sslmode=require"), "select 'alive'");
    assert_eq!(text(&out.stdout).trim(), "alive", "{}", show(&out));
    assert_eq!(
        agent
            .events()
            .iter()
            .filter(|e| e["event"] == "tls_error")
            .count(),
        tls_errors(&agent).len()
    );
}

#[test]
fn tls_pgbench_over_tls_has_no_failures() {
    let TlsPg { pg, ca: _ca } = tls_pg();
    let cg = TestCgroup::new();
    let agent = Agent::start(&pg_policy(pg.port, PG_RULES), &cg, false);
    let port = pg.port.to_string();
    pg.pgbench_init(1);
    for mode in ["simple", "prepared"] {
        let out = run_ok(
            cg.command(pg_bin("pgbench").to_str().unwrap())
                .env("PGSSLMODE", "require")
                .args([
                    "-n",
                    "-S",
                    "-M",
                    mode,
                    "-c",
                    "2",
                    "-j",
                    "2",
                    "-t",
                    "200",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "postgres",
                ]),
        );
        assert!(
            out.contains("number of transactions actually processed: 400/400")
                && out.contains("number of failed transactions: 0"),
            "{mode}: {out}"
        );
    }
    let tls_sessions = sessions(&agent)
        .iter()
        .filter(|e| {
            e["identity"]["comm"] == "pgbench"
                && e["tls"]["client"].is_object()
                && e["tls"]["server"].is_object()
        })
        .count();
    assert!(
        tls_sessions >= 4,
        "{tls_sessions} pgbench sessions over TLS"
    );
}

/// A MariaDB with a server certificate (TLS optional on the server).
fn tls_mariadb() -> (MariaDb, TestCa) {
    let ca = TestCa::new("Test MariaDB CA");
    let cert = ca.issue("maria", &["127.0.0.1", "localhost"], Some(ids("mysql")));
    let db = MariaDb::start_with(&[
        format!("--ssl-cert={}", cert.cert.display()),
        format!("--ssl-key={}", cert.key.display()),
        format!("--ssl-ca={}", ca.cert.display()),
    ]);
    (db, ca)
}

#[test]
fn tls_mariadb_ssl_verify_server_cert_denial_and_sysbench() {
    let (db, _ca) = tls_mariadb();
    let cg = TestCgroup::new();
    let policy = mysql_policy(
        db.port,
        "default: allow\nrules:\n  - name: no-secrets\n    any_tables: [shop.secrets]\n    decision: deny\n",
    );
    let agent = start_agent_with(&policy, &cg, &[]);
    let args = db.client_args(APP_USER, APP_PASSWORD, "shop");
    let with = |extra: &[&str]| {
        let mut a = args.clone();
        a.extend(extra.iter().map(|s| (*s).to_owned()));
        a
    };
    // The server leg is TLS in every case: Ssl_cipher is the server's view.
    let sql = "SELECT name FROM items WHERE id = 1; SHOW SESSION STATUS LIKE 'Ssl_version'";
    let ca = agent_ca(&agent);
    for extra in [
        vec!["--ssl"],
        vec![
            "--ssl",
            "--ssl-verify-server-cert",
            &format!("--ssl-ca={ca}"),
        ],
        vec![],
    ] {
        let out = mariadb_in(&cg, &with(&extra), sql);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{extra:?}: {}", show(&out));
        assert!(
            stdout.contains("apple") && stdout.contains("TLSv1."),
            "{extra:?}: {}",
            show(&out)
        );
    }
    // Verifying against a CA that did not issue the agent's certificate fails.
    let other = TestCa::new("Unrelated CA");
    let out = mariadb_in(
        &cg,
        &with(&[
            "--ssl",
            "--ssl-verify-server-cert",
            &format!("--ssl-ca={}", other.cert.display()),
        ]),
        "SELECT 1",
    );
    assert!(!out.status.success(), "{}", show(&out));
    // A denial over TLS.
    let out = mariadb_in(&cg, &with(&["--ssl"]), "SELECT secret FROM secrets");
    assert!(
        !out.status.success() && text(&out.stderr).contains("1142"),
        "{}",
        show(&out)
    );
    let s = sessions(&agent);
    let both = s
        .iter()
        .find(|e| e["tls"]["client"].is_object() && e["tls"]["server"].is_object())
        .unwrap_or_else(|| panic!("no MySQL session with TLS on both legs: {s:?}"));
    assert!(
        both["tls"]["client"]["version"]
            .as_str()
            .unwrap()
            .starts_with("TLSv1."),
        "{both}"
    );
    assert_eq!(both["tls"]["client"]["issued_by_agent_ca"], true, "{both}");

    // sysbench over TLS, zero errors.
    run_ok(
        Command::new("sysbench")
            .arg("oltp_point_select")
            .args(sysbench_args(&db))
            .args(["--tables=1", "--table-size=1000", "prepare"]),
    );
    // sysbench 1.0 with --mysql-ssl=on reads client-key.pem,
    // client-cert.pem and cacert.pem from its working directory.
    let sb = tempfile::tempdir().unwrap();
    let client_ca = TestCa::new("Test client CA");
    let client = client_ca.issue("client", &["sysbench"], None);
    std::fs::copy(&client.cert, sb.path().join("client-cert.pem")).unwrap();
    std::fs::copy(&client.key, sb.path().join("client-key.pem")).unwrap();
    std::fs::copy(&ca, sb.path().join("cacert.pem")).unwrap();
    for ps in ["auto", "disable"] {
        let out = run_ok(
            cg.command("sysbench")
                .current_dir(sb.path())
                .arg("oltp_point_select")
                .args(
                    sysbench_args(&db)
                        .iter()
                        .filter(|a| !a.starts_with("--mysql-ssl")),
                )
                .args([
                    "--mysql-ssl=on",
                    "--tables=1",
                    "--table-size=1000",
                    "--threads=2",
                    "--events=2000",
                    "--time=0",
                    &format!("--db-ps-mode={ps}"),
                    "run",
                ]),
        );
        let line = |key: &str| {
            out.lines()
                .find(|l| l.trim_start().starts_with(key))
                .unwrap_or_else(|| panic!("no {key:?} in sysbench output:\n{out}"))
                .to_owned()
        };
        assert!(line("ignored errors:").contains(" 0 "), "{ps}:\n{out}");
        assert!(line("reconnects:").contains(" 0 "), "{ps}:\n{out}");
    }
    let n = sessions(&agent)
        .iter()
        .filter(|e| e["identity"]["comm"] == "sysbench" && e["tls"]["client"].is_object())
        .count();
    assert!(n >= 4, "{n} sysbench sessions over TLS");
}
