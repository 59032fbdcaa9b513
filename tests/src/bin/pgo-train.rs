//! The training workload of `cargo xtask build --pgo`: runs the agent named
//! by `INTERCEPTOR_BIN` (the instrumented build) in front of a throwaway
//! PostgreSQL and MariaDB and drives the paths that run per statement, so
//! the profile the agent writes when it exits says which code is hot.
//!
//! On purpose not the benchmark's workload (pgbench -S, sysbench point
//! select): pgbench's TPC-B-like script (BEGIN, three UPDATEs, a SELECT, an
//! INSERT, END) in simple, extended and prepared mode, the same over TLS on
//! both legs, and sysbench oltp_read_write (point and range selects, sums,
//! ORDER BY, DISTINCT, updates, delete, insert) in text and prepared mode;
//! per-statement audit (`audit.executions: each`) in a last pass.
//!
//! Environment: `PGO_TRAIN_SECONDS` (per workload, default 5).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use interceptor_tests::{
    Agent, PgServer, TestCgroup,
    mysql::{MariaDb, sysbench_args, sysbench_in},
    pg_bin, pki, run_ok,
};

const RULES: &str = "mode: enforce\ndefault: allow\non_parse_error: allow\nrules:\n  - name: no-secrets\n    any_tables: [public.secrets, shop.secrets]\n    decision: deny\n  - name: dangerous\n    flags: [file_access, program_exec, role_change, remote_access, admin]\n    decision: deny\n  - name: bounded-writes\n    kinds: [delete, update]\n    where: absent\n    decision: deny\n";

/// sysbench's tables, the same for `prepare` and `run`.
const SYSBENCH_TABLES: [&str; 2] = ["--tables=1", "--table-size=10000"];

fn pgbench(cg: &TestCgroup, port: u16, mode: &str, tls: bool, secs: u64) {
    let out = run_ok(
        cg.command(pg_bin("pgbench").to_str().unwrap())
            .env("PGSSLMODE", if tls { "require" } else { "disable" })
            .args([
                "-n",
                "-b",
                "tpcb-like",
                "-M",
                mode,
                "-c",
                "4",
                "-j",
                "2",
                "-T",
            ])
            .arg(secs.to_string())
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .arg("postgres"),
    );
    assert!(
        out.contains("number of failed transactions: 0"),
        "pgbench {mode} (tls {tls}):\n{out}"
    );
    eprintln!("pgo-train: pgbench tpcb-like {mode} tls={tls}: done");
}

fn main() {
    let secs: u64 = std::env::var("PGO_TRAIN_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let ca = pki::TestCa::new("PGO training CA");
    let cert = ca.issue("pg", &["127.0.0.1"], Some(pki::ids("postgres")));
    let pg = PgServer::start_with(
        &[
            "ssl=on".to_owned(),
            format!("ssl_cert_file={}", cert.cert.display()),
            format!("ssl_key_file={}", cert.key.display()),
        ],
        None,
    );
    pg.pgbench_init(10);
    pg.sql("CREATE TABLE secrets (v text)");
    let db = MariaDb::start();
    // The tables, made directly (this process is in no test cgroup).
    run_ok(
        Command::new("sysbench")
            .arg("oltp_read_write")
            .args(sysbench_args(&db))
            .args(SYSBENCH_TABLES)
            .arg("prepare"),
    );
    let policy = |executions: &str| {
        format!(
            "version: 1\ntargets:\n  - {{name: pg, protocol: postgres, address: '127.0.0.1:{}'}}\n  - {{name: maria, protocol: mysql, address: '127.0.0.1:{}'}}\naudit:\n  executions: {executions}\n{RULES}",
            pg.port, db.port
        )
    };
    let sysbench_run = |cg: &TestCgroup, ps: &str| {
        let out = run_ok(&mut sysbench_in(
            cg,
            &db,
            "oltp_read_write",
            &[
                SYSBENCH_TABLES[0],
                SYSBENCH_TABLES[1],
                &format!("--db-ps-mode={ps}"),
                "--threads=4",
                &format!("--time={secs}"),
                "run",
            ],
        ));
        // sysbench stops at an error it does not expect (a refusal by the
        // agent among them); the deadlocks it ignores (1213) happen
        // between its own threads now and then.
        assert!(out.contains("transactions:"), "sysbench {ps}:\n{out}");
        eprintln!("pgo-train: sysbench oltp_read_write ps-mode={ps}: done");
    };
    for executions in ["summary", "each"] {
        let cg = TestCgroup::new();
        let mut agent = Agent::start_with(&policy(executions), &cg, false, &["--workers", "2"]);
        if executions == "summary" {
            for mode in ["simple", "extended", "prepared"] {
                pgbench(&cg, pg.port, mode, false, secs);
            }
            pgbench(&cg, pg.port, "simple", true, secs);
            for ps in ["disable", "auto"] {
                sysbench_run(&cg, ps);
            }
        } else {
            pgbench(&cg, pg.port, "prepared", false, secs);
            sysbench_run(&cg, "auto");
        }
        // The traffic went through the agent: statements of both targets
        // were decided and recorded.
        for target in ["pg", "maria"] {
            let n = agent.query_records(&format!("\"target\":\"{target}\""));
            assert!(n > 0, "no query records for {target} ({executions})");
            eprintln!("pgo-train: {n} query records for {target} ({executions})");
        }
        // A clean exit: the instrumented agent writes its profile then.
        let status = agent.stop();
        assert!(status.success(), "agent exit {status}:\n{}", agent.log());
    }
}
