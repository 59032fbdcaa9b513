//! `cargo xtask bench mysql`: sysbench oltp_point_select, prepared
//! (`--db-ps-mode=auto`) and not (`disable`), direct, through a bare TCP
//! relay (socat: the cost of the extra hop alone) and through the agent
//! (deciding and auditing every statement), interleaved in one run. Latency
//! at 1 thread with every process pinned to CPU 0; throughput at 8 threads
//! unpinned. Prints a Markdown table (also target/bench/mysql.md).
//!
//! Environment: BENCH_SECONDS (per run, default 5), BENCH_ROUNDS (default 2),
//! BENCH_ONLY (configurations, e.g. `text:8`), BENCH_AGENT_WORKERS (worker
//! counts to compare, one agent each, default `1,2`), BENCH_EXECUTIONS
//! (`audit.executions` modes, default `summary,each`), BENCH_BYPASS
//! (`--local-bypass` settings, default `off,on`), BENCH_COMPARE_BIN and
//! BENCH_COMPARE_NAME (a second build of the agent and its label).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_precision_loss)]

use std::process::Command;

use interceptor_tests::{
    TestCgroup, bench,
    mysql::{APP_PASSWORD, APP_USER, MariaDb, mysql_policy},
    run_ok,
};

const POLICY_RULES: &str = "mode: enforce\ndefault: allow\non_parse_error: allow\nrules:\n  - name: no-secrets\n    any_tables: [shop.secrets]\n    decision: deny\n  - name: dangerous\n    flags: [file_access, program_exec, role_change, remote_access, admin]\n    decision: deny\n";

/// The way a row's queries take to the server.
#[derive(Clone, Copy)]
enum Via<'a> {
    Direct,
    Relay,
    Agent(&'a bench::BenchAgent),
}

fn sysbench(port: u16, cg: Option<&TestCgroup>, pinned: bool, args: &[String]) -> String {
    let mut cmd = match (cg, pinned) {
        (Some(cg), true) => {
            let mut c = cg.command("taskset");
            c.args(["-c", "0", "sysbench"]);
            c
        }
        (Some(cg), false) => cg.command("sysbench"),
        (None, true) => {
            let mut c = Command::new("taskset");
            c.args(["-c", "0", "sysbench"]);
            c
        }
        (None, false) => Command::new("sysbench"),
    };
    cmd.arg("oltp_point_select")
        .args([
            "--db-driver=mysql",
            "--mysql-host=127.0.0.1",
            &format!("--mysql-port={port}"),
            &format!("--mysql-user={APP_USER}"),
            &format!("--mysql-password={APP_PASSWORD}"),
            "--mysql-db=sbtest",
            "--mysql-ssl=off",
            "--tables=1",
            "--table-size=10000",
        ])
        .args(args);
    run_ok(&mut cmd)
}

/// (tps, avg ms, p99 ms) from sysbench's report.
fn parse(out: &str) -> (f64, f64, f64) {
    let field = |prefix: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.trim_start_matches('(').parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let tps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("transactions:"))
        .and_then(|v| v.split('(').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    (tps, field("avg:"), field("99th percentile:"))
}

fn main() {
    let (secs, rounds) = bench::settings();
    let db = MariaDb::start();
    sysbench(db.port, None, false, &["prepare".into()]);
    let relay = bench::Relay::start(db.port);
    let agents = bench::agents(&mysql_policy(db.port, POLICY_RULES));
    let db_pid: u32 = std::fs::read_to_string(db.dir.join("mysqld.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut pids = vec![db_pid, relay.pid()];
    let server_cpu = bench::CpuGroup::adopt(db_pid);
    pids.extend(agents.iter().map(|a| a.agent.pid().unwrap()));
    let modes = [("prepared", "auto"), ("text", "disable")];
    let configs = [(1u32, true), (8u32, false)];
    let mut paths: Vec<(&str, Via)> = vec![("direct", Via::Direct), ("socat", Via::Relay)];
    paths.extend(agents.iter().map(|a| (a.name.as_str(), Via::Agent(a))));
    let mut rows = Vec::new();
    for (mode, _) in modes {
        for (threads, pinned) in configs {
            if !bench::selected(mode, threads) {
                continue;
            }
            for &(p, _) in &paths {
                rows.push(bench::Row::new(mode, threads, pinned, p));
            }
        }
    }
    for round in 0..rounds {
        for (mode, ps) in modes {
            for (threads, pinned) in configs {
                if !bench::selected(mode, threads) {
                    continue;
                }
                bench::pin(&pids, if pinned { "0" } else { "0-1" });
                for &(p, via) in &paths {
                    let args = [
                        format!("--db-ps-mode={ps}"),
                        format!("--threads={threads}"),
                        format!("--time={secs}"),
                        "--percentile=99".into(),
                        "run".into(),
                    ];
                    let (port, cgroup, proxy) = match via {
                        Via::Direct => (db.port, None, None),
                        Via::Relay => (relay.port, None, Some(bench::Proxy::Group(&relay.cpu))),
                        Via::Agent(a) => (
                            db.port,
                            Some(&a.cgroup),
                            a.agent.pid().map(bench::Proxy::Process),
                        ),
                    };
                    let config = (mode, threads, p);
                    let (tps, avg, p99) =
                        bench::measure(&mut rows, config, proxy, &server_cpu, secs, || {
                            let out = sysbench(port, cgroup, pinned, &args);
                            assert!(
                                out.contains("ignored errors:                      0"),
                                "{p} {mode}: errors:\n{out}"
                            );
                            parse(&out)
                        });
                    eprintln!(
                        "round {round} {mode} t={threads} {p}: tps {tps:.0} avg {avg:.3} ms p99 {p99:.3} ms"
                    );
                }
            }
        }
    }
    bench::finish("mysql", &rows, &pids, &agents);
}
