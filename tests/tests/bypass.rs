//! The threat model, tried: each way around the guard that the README says
//! holds is attempted by a workload in the guarded cgroup, and must end up
//! decided and audited.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use interceptor_tests::{Agent, PgServer, TestCgroup, pg_policy, run_ok};

const POLICY: &str =
    "default: allow\nrules:\n  - {name: no-payroll, any_tables: ['*payroll*'], decision: deny}\n";

fn probe(cg: &TestCgroup, pg: &PgServer, mode: &str, sql: &str) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg_probe.py");
    run_ok(
        cg.command("python3")
            .args([script, mode, "127.0.0.1", &pg.port.to_string(), sql]),
    )
    .trim()
    .to_owned()
}

fn denials(agent: &Agent) -> usize {
    agent
        .events()
        .iter()
        .filter(|e| e["event"] == "query" && e["decision"] == "deny")
        .count()
}

#[test]
fn evasive_connects_are_redirected_decided_and_audited() {
    let pg = PgServer::start();
    pg.sql("create table payroll(salary int); insert into payroll values (1)");
    let cg = TestCgroup::new();
    let agent = Agent::start(&pg_policy(pg.port, POLICY), &cg, false);
    // The agent's documented mark, set by a workload with CAP_NET_ADMIN (the
    // test runs as root): the kernel no longer trusts marks.
    for (mode, sql) in [
        ("mark=0x1e5c0001", "select count(*) from payroll"),
        ("tfo", "select count(*) from payroll /* tfo */"),
        ("v4mapped", "select count(*) from payroll /* v4mapped */"),
        ("plain", "select count(*) from payroll /* plain */"),
    ] {
        let before = denials(&agent);
        let out = probe(&cg, &pg, mode, sql);
        assert!(out.starts_with("error 42501"), "{mode}: {out}");
        let start = std::time::Instant::now();
        while denials(&agent) == before {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(5),
                "{mode}: not audited"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    // Allowed statements still run over each path.
    for mode in ["mark=0x1e5c0001", "tfo", "v4mapped"] {
        assert_eq!(probe(&cg, &pg, mode, "select 1"), "ok 1", "{mode}");
    }
}
