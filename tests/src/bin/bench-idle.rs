//! `cargo xtask bench idle`: the memory an idle connection costs the
//! proxy. `BENCH_IDLE_CONNS` (default 1000) connections, opened by
//! tokio-postgres and each used for one query, are then held idle: through
//! the agent (from its test cgroup) and through PgBouncer (session mode),
//! one after the other against the same server. For each proxy: its
//! resident memory (`VmRSS`) before and while they are held, and per
//! connection; for the agent also the allocator's own figure (mimalloc's
//! committed memory, from the agent's metrics). Prints a Markdown table
//! (also written to target/bench/idle.md).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_precision_loss)]

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use interceptor_tests::{
    Agent, PgServer, TestCgroup, bench, bench::PgBouncer, free_port, pg_policy, scrape,
};

const RULES: &str = "mode: enforce\ndefault: allow\non_parse_error: allow\n";

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// A gauge's value from a metrics page.
fn gauge(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{name} missing from the metrics"))
        .round() as u64
}

fn idle_conns_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.with_file_name("idle-conns")
}

/// Opens `n` connections with `cmd` and waits until they are all up.
fn hold(mut cmd: Command, n: usize) -> Child {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), format!("ready {n}"), "idle-conns failed");
    child
}

fn release(mut child: Child) {
    drop(child.stdin.take());
    let _ = child.wait();
}

/// A table row: the proxy, and its memory (resident; the allocator's) at
/// three levels: warmed up, half the connections held, all held.
struct Row {
    path: &'static str,
    rss: (u64, u64, u64),
    alloc: Option<(u64, u64, u64)>,
}

/// Measures at three levels: after a warm-up (connections opened and
/// closed, so that one-time costs such as worker threads' heaps are
/// paid), with `n / 2` connections held, and with all `n` held. The cost
/// per connection is the slope between the last two, so what the warm-up
/// freed and the allocator kept does not hide any of it. `live` reads the
/// proxy's own count of connections from a measurement (0: not checked).
fn levels<M: Copy>(
    n: usize,
    measure: impl Fn() -> M,
    clients: impl Fn(usize) -> Command,
    live: impl Fn(&M) -> u64,
) -> [M; 3] {
    release(hold(clients(100), 100));
    let warm = measure();
    let half = n / 2;
    let a = hold(clients(half), half);
    let mid = measure();
    let b = hold(clients(n - half), n - half);
    let all = measure();
    let counted = live(&all);
    assert!(
        counted == 0 || counted == n as u64,
        "the proxy holds {counted} connections, not {n}"
    );
    release(a);
    release(b);
    [warm, mid, all]
}

fn kib(b: u64) -> String {
    format!("{:.1} KiB", b as f64 / 1024.0)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

fn main() {
    let n: usize = std::env::var("BENCH_IDLE_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let pg = PgServer::start_with(&[format!("max_connections={}", n + 50)], None);
    let settle = || std::thread::sleep(Duration::from_millis(500));
    assert!(n >= 2, "BENCH_IDLE_CONNS: at least 2");
    let mut rows = Vec::new();

    // The agent, its clients in its cgroup.
    {
        let cg = TestCgroup::new();
        let metrics = free_port();
        let agent = Agent::start_with(
            &pg_policy(pg.port, RULES),
            &cg,
            false,
            &["--metrics", &format!("127.0.0.1:{metrics}")],
        );
        let pid = agent.pid().unwrap();
        let measure = || {
            settle();
            let page = scrape(metrics);
            (
                rss(pid),
                gauge(&page, "interceptor_allocator_committed_bytes"),
                gauge(&page, "interceptor_connections_live"),
            )
        };
        let clients = |k: usize| {
            let mut c = cg.command(idle_conns_bin().to_str().unwrap());
            c.args(["127.0.0.1", &pg.port.to_string(), &k.to_string()]);
            c
        };
        let m = levels(n, measure, clients, |m| m.2);
        rows.push(Row {
            path: "interceptor",
            rss: (m[0].0, m[1].0, m[2].0),
            alloc: Some((m[0].1, m[1].1, m[2].1)),
        });
    }

    // PgBouncer, session mode: each client with its server connection.
    {
        let bouncer = PgBouncer::start(pg.port, None, u32::try_from(n + 10).unwrap());
        let pid = bouncer.pid();
        let measure = || {
            settle();
            (rss(pid), 0, 0)
        };
        let clients = |k: usize| {
            let mut c = Command::new(idle_conns_bin());
            c.args(["127.0.0.1", &bouncer.port.to_string(), &k.to_string()]);
            c
        };
        let m = levels(n, measure, clients, |_| 0);
        rows.push(Row {
            path: "pgbouncer",
            rss: (m[0].0, m[1].0, m[2].0),
            alloc: None,
        });
    }

    let mut t = String::from(
        "| path | idle connections | RSS warmed up | RSS held | RSS per connection | allocator warmed up | allocator held | allocator per connection |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let half = u64::try_from(n - n / 2).unwrap();
    let per = |(_, mid, all): (u64, u64, u64)| kib(all.saturating_sub(mid) / half);
    for r in &rows {
        let (a, b, c) = r.alloc.map_or_else(
            || ("—".to_owned(), "—".to_owned(), "—".to_owned()),
            |x| (mib(x.0), mib(x.2), per(x)),
        );
        t.push_str(&format!(
            "| {} | {n} | {} | {} | {} | {a} | {b} | {c} |\n",
            r.path,
            mib(r.rss.0),
            mib(r.rss.2),
            per(r.rss),
        ));
    }
    bench::report("idle", &t);
}
