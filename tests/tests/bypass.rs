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

/// io_uring's `IORING_OP_CONNECT` reaches the same cgroup connect hook as
/// connect(2): redirected, decided, audited.
#[test]
fn io_uring_connect_is_redirected_and_decided() {
    let pg = PgServer::start();
    pg.sql("create table payroll(salary int); insert into payroll values (1)");
    let cg = TestCgroup::new();
    let agent = Agent::start(&pg_policy(pg.port, POLICY), &cg, false);
    let probe = env!("CARGO_BIN_EXE_uring-probe");
    let port = pg.port.to_string();
    let out = run_ok(cg.command(probe).args([
        "127.0.0.1",
        &port,
        "select count(*) from payroll /* io_uring */",
    ]));
    assert!(out.starts_with("error 42501"), "{out}");
    // The kernel saw the process (io_uring ran the connect inline).
    let q = agent.wait_event("query", |e| {
        e["event"] == "query" && e["identity"]["comm"] == "uring-probe"
    });
    assert_eq!(q["decision"], "deny", "{q}");
    assert_eq!(
        run_ok(cg.command(probe).args(["127.0.0.1", &port, "select 1"])).trim(),
        "ok 1"
    );
}

/// A workload without root cannot leave the attached cgroup: writing its
/// pid into another cgroup's `cgroup.procs` is refused, and its connects
/// stay redirected and decided.
#[test]
fn an_unprivileged_workload_cannot_leave_the_cgroup() {
    let pg = PgServer::start();
    pg.sql("create table payroll(salary int); insert into payroll values (1)");
    let cg = TestCgroup::new();
    let _agent = Agent::start(&pg_policy(pg.port, POLICY), &cg, false);
    let parent = cg.path.parent().unwrap().join("cgroup.procs");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg_probe.py");
    let shell = format!(
        "if echo $$ > {} 2>/dev/null; then echo moved; else echo refused; fi; \
         exec python3 {script} plain 127.0.0.1 {} 'select count(*) from payroll'",
        parent.display(),
        pg.port
    );
    let out = run_ok(
        cg.command("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .args(["sh", "-c", &shell]),
    );
    assert!(out.starts_with("refused"), "{out}");
    assert!(out.contains("error 42501"), "{out}");
}

/// A server answering on two loopback addresses: a target naming one of
/// them leaves the other open, which `policy check` warns about; a CIDR
/// target covers both.
#[test]
fn other_loopback_addresses_need_a_cidr_target_and_the_check_says_so() {
    let hba = "local all all trust\nhost all all 127.0.0.0/8 trust\n";
    let pg = PgServer::start_full(None, "127.0.0.1,127.0.0.2", &[], Some(hba));
    pg.sql("create table payroll(salary int); insert into payroll values (1)");
    let dir = tempfile::tempdir().unwrap();
    let narrow = dir.path().join("narrow.yaml");
    std::fs::write(
        &narrow,
        format!(
            "version: 1\ntargets:\n  - {{name: pg, protocol: postgres, address: 127.0.0.1:{}}}\n{POLICY}",
            pg.port
        ),
    )
    .unwrap();
    let check = interceptor_tests::run_any(
        std::process::Command::new(interceptor_tests::agent_bin())
            .args(["policy", "check"])
            .arg(&narrow),
    );
    assert!(check.status.success());
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(
        stderr.contains(&format!("127.0.0.2:{}", pg.port))
            && stderr.contains(&format!("127.0.0.0/8:{}", pg.port)),
        "{stderr}"
    );
    let wide = format!(
        "version: 1\ntargets:\n  - {{name: pg, protocol: postgres, address: 127.0.0.0/8:{}}}\n{POLICY}",
        pg.port
    );
    let cg = TestCgroup::new();
    let _agent = Agent::start(&wide, &cg, false);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg_probe.py");
    for host in ["127.0.0.1", "127.0.0.2"] {
        let out = run_ok(cg.command("python3").args([
            script,
            "plain",
            host,
            &pg.port.to_string(),
            "select count(*) from payroll",
        ]));
        assert!(out.starts_with("error 42501"), "{host}: {out}");
    }
}
