//! PostgreSQL through the agent: real psql, pgbench and tokio-postgres in a
//! test cgroup against a real server; denials as SQLSTATE 42501 with the
//! session left exactly as after a server error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use interceptor_tests::{Agent, PgServer, TestCgroup, pg_bin, pg_policy, run_any, run_ok};

const RULES: &str = "mode: enforce\ndefault: allow\non_parse_error: allow\nrules:\n  - name: no-secrets\n    any_tables: [public.secrets]\n    decision: deny\n    message: secrets are off limits\n";

fn setup() -> (PgServer, TestCgroup, Agent) {
    let pg = PgServer::start();
    pg.sql("CREATE TABLE secrets (v text); INSERT INTO secrets VALUES ('s3cr3t')");
    let cg = TestCgroup::new();
    let agent = Agent::start(&pg_policy(pg.port, RULES), &cg, false);
    (pg, cg, agent)
}

#[test]
fn psql_denials_keep_the_session_usable_in_and_out_of_transactions() {
    let (pg, cg, agent) = setup();
    let script = "\\set VERBOSITY verbose\n\
        select 'a1';\n\
        select * from secrets;\n\
        select 'a2';\n\
        begin;\n\
        select 'b1';\n\
        select v from secrets;\n\
        select 'b2';\n\
        rollback;\n\
        select 'c1';\n";
    let out = run_any(pg.psql_in(&cg).args(["-Atq", "-f"]).arg(write_tmp(script)));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        ["a1", "a2", "b1", "c1"],
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        !stdout.contains("s3cr3t") && !stdout.contains("b2"),
        "{stdout}"
    );
    // Denials: 42501 naming the rule and the decision; then 25P02 inside the
    // failed transaction, exactly as the server would answer.
    assert_eq!(stderr.matches("ERROR:  42501").count(), 2, "{stderr}");
    assert!(
        stderr.contains("no-secrets")
            && stderr.contains("secrets are off limits")
            && stderr.contains("decision "),
        "{stderr}"
    );
    assert!(stderr.contains("ERROR:  25P02"), "{stderr}");
    // Nothing of the denied statements reached the table.
    assert_eq!(pg.sql("select seq_scan + coalesce(idx_scan, 0) from pg_stat_user_tables where relname = 'secrets'").trim(), "0");
    // Audited: two denials with the rule, enforced.
    let ev = agent.wait_event("a denied query", |e| {
        e["event"] == "query" && e["decision"] == "deny"
    });
    assert_eq!(ev["rule"], "no-secrets", "{ev}");
    assert_eq!(ev["enforced"], true);
    assert_eq!(ev["db_user"], "postgres");
    assert_eq!(ev["database"], "postgres");
    assert_eq!(ev["identity"]["comm"], "psql");
    assert!(
        ev["eval_us"].is_u64() && ev["fingerprint"].is_string() && ev["kind"].is_string(),
        "{ev}"
    );
}

fn write_tmp(text: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(interceptor_tests::unique("psql-script"));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn pgbench_in_all_protocol_modes_has_no_failures() {
    let (pg, cg, agent) = setup();
    let port = pg.port.to_string();
    pg.pgbench_init(1);
    for mode in ["simple", "extended", "prepared"] {
        for select_only in [true, false] {
            let mut c = cg.command(pg_bin("pgbench").to_str().unwrap());
            c.args([
                "-n",
                "-M",
                mode,
                "-c",
                "2",
                "-j",
                "2",
                "-t",
                "100",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
            ]);
            if select_only {
                c.arg("-S");
            }
            c.arg("postgres");
            let out = run_ok(&mut c);
            assert!(
                out.contains("number of transactions actually processed: 200/200"),
                "{mode}: {out}"
            );
            assert!(
                out.contains("number of failed transactions: 0"),
                "{mode}: {out}"
            );
        }
    }
    // They really went through the agent, statement by statement.
    let n = agent
        .events()
        .iter()
        .filter(|e| e["event"] == "query" && e["identity"]["comm"] == "pgbench")
        .count();
    assert!(n >= 6 * 200, "only {n} pgbench statements audited");
}

#[test]
fn rust_driver_prepared_pipelined_copy_cancel_and_denial() {
    let (pg, cg, agent) = setup();
    let out = run_any(
        cg.command(env!("CARGO_BIN_EXE_pg-driver"))
            .args(["127.0.0.1", &pg.port.to_string()]),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "driver failed:\n{stdout}\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    for step in [
        "prepared",
        "pipeline",
        "pipeline-denial",
        "copy",
        "cancel",
        "usable",
    ] {
        assert!(
            stdout.lines().any(|l| l == format!("ok {step}")),
            "{step} missing:\n{stdout}"
        );
    }
    agent.wait_event("the cancel", |e| e["event"] == "cancel");
    agent.wait_event("the denial", |e| {
        e["event"] == "query" && e["decision"] == "deny" && e["identity"]["comm"] == "pg-driver"
    });
}

#[test]
fn hostile_clients_get_errors_and_the_agent_keeps_serving() {
    let (pg, cg, agent) = setup();
    let script = format!(
        r#"
import socket, struct
P = {port}
def conn():
    return socket.create_connection(("127.0.0.1", P), timeout=10)
def read_all(s):
    out = b""
    while True:
        try:
            d = s.recv(65536)
        except ConnectionResetError:
            break
        if not d:
            break
        out += d
    return out
def startup(s):
    body = struct.pack("!I", 196608) + b"user\0postgres\0database\0postgres\0\0"
    s.sendall(struct.pack("!I", len(body) + 4) + body)
    buf = b""
    while b"Z\0\0\0\x05" not in buf:
        d = s.recv(65536)
        assert d, buf
        buf += d
# 1. garbage before the startup packet
s = conn(); s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"); r = read_all(s)
print("garbage", r[:1] == b"E" and b"08P01" in r)
# 2. a malformed frame after authentication (length 2)
s = conn(); startup(s); s.sendall(b"Q\0\0\0\x02"); r = read_all(s)
print("malformed", b"08P01" in r)
# 3. an oversized length
s = conn(); startup(s); s.sendall(b"Q\x7f\xff\xff\xff" + b"SELECT 1"); r = read_all(s)
print("oversized", b"08P01" in r)
# 4. a Query whose body is not NUL-terminated
s = conn(); startup(s); s.sendall(b"Q\0\0\0\x0cSELECT 1"); r = read_all(s)
print("unterminated", b"08P01" in r)
# 5. disconnect in the middle of a frame
s = conn(); startup(s); s.sendall(b"Q\0\0\0\x20SELE"); s.close()
print("midframe", True)
"#,
        port = pg.port
    );
    let out = run_ok(cg.command("python3").args(["-c", &script]));
    for case in [
        "garbage",
        "malformed",
        "oversized",
        "unterminated",
        "midframe",
    ] {
        assert!(
            out.lines().any(|l| l == format!("{case} True")),
            "{case}:\n{out}\nagent log:\n{}",
            agent.log()
        );
    }
    agent.wait_event("protocol errors audited", |e| {
        e["event"] == "protocol_error"
    });
    let n = agent
        .events()
        .iter()
        .filter(|e| e["event"] == "protocol_error")
        .count();
    assert!(n >= 4, "{n} protocol_error events");
    // The agent is unaffected: status is fine and psql still works.
    assert!(agent.status().status.success());
    let ok = run_ok(pg.psql_in(&cg).args(["-Atc", "select 'still here'"]));
    assert_eq!(ok.trim(), "still here");
}

#[test]
fn shadow_mode_forwards_everything_and_records_what_would_be_denied() {
    let pg = PgServer::start();
    pg.sql("CREATE TABLE secrets (v text); INSERT INTO secrets VALUES ('s3cr3t')");
    let cg = TestCgroup::new();
    let rules = RULES.replace("mode: enforce", "mode: shadow");
    let agent = Agent::start(&pg_policy(pg.port, &rules), &cg, false);
    let out = run_ok(pg.psql_in(&cg).args(["-Atc", "select v from secrets"]));
    assert_eq!(out.trim(), "s3cr3t");
    let ev = agent.wait_event("the shadow denial", |e| {
        e["event"] == "query" && e["decision"] == "deny"
    });
    assert_eq!(ev["enforced"], false, "{ev}");
    assert_eq!(ev["rule"], "no-secrets", "{ev}");
}

#[test]
fn function_call_messages_are_decided() {
    // psql's \lo_import drives libpq's large-object API, which speaks the
    // FunctionCall message.
    let (pg, cg, agent) = setup();
    let file = std::env::temp_dir().join(interceptor_tests::unique("lo"));
    std::fs::write(&file, b"large object payload").unwrap();
    let out = run_ok(
        pg.psql_in(&cg)
            .args(["-Atc"])
            .arg(format!("\\lo_import {}", file.display())),
    );
    assert!(out.contains("lo_import"), "{out}");
    agent.wait_event("a FunctionCall decision", |e| {
        e["event"] == "query"
            && e["query"]
                .as_str()
                .is_some_and(|q| q.contains("FunctionCall"))
    });
    let _ = std::fs::remove_file(file);
}
