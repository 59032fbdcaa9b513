//! `cargo xtask bench postgres`: pgbench -S in simple, extended and prepared
//! mode, direct, through PgBouncer (session mode) and through the agent
//! (parsing and deciding every statement), interleaved in one run. Latency
//! at 1 client with every process pinned to CPU 0; throughput at 8 clients
//! unpinned. Prints a Markdown table (also written to target/bench/postgres.md).
//!
//! Environment: BENCH_SECONDS (per run, default 5), BENCH_ROUNDS (default 2),
//! BENCH_ONLY (configurations, e.g. `simple:8,prepared`), BENCH_AGENT_WORKERS
//! (worker counts to compare, one agent each, default `1,2`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_precision_loss)]

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use interceptor_tests::{PgServer, TestCgroup, bench, free_port, pg_bin, pg_policy, run_ok};

const POLICY_RULES: &str = "mode: enforce\ndefault: allow\non_parse_error: allow\nrules:\n  - name: no-secrets\n    any_tables: [public.secrets]\n    decision: deny\n  - name: dangerous\n    flags: [file_access, program_exec, role_change, remote_access, admin]\n    decision: deny\n";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path_ {
    Direct,
    PgBouncer,
    /// The agent at this index of [`bench::agents`].
    Agent(usize),
}

struct PgBouncer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PgBouncer {
    fn start(pg_port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pw = nix::unistd::User::from_name("postgres").unwrap().unwrap();
        let port = free_port();
        let d = dir.path();
        fs::write(d.join("userlist.txt"), "\"postgres\" \"\"\n").unwrap();
        fs::write(
            d.join("pgbouncer.ini"),
            format!(
                "[databases]\npostgres = host=127.0.0.1 port={pg_port} dbname=postgres\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = trust\nauth_file = {}/userlist.txt\npool_mode = session\nmax_client_conn = 200\ndefault_pool_size = 20\nunix_socket_dir = {}\nlogfile = {}/pgbouncer.log\n",
                d.display(),
                d.display(),
                d.display()
            ),
        )
        .unwrap();
        for f in ["userlist.txt", "pgbouncer.ini", ""] {
            nix::unistd::chown(&d.join(f), Some(pw.uid), Some(pw.gid)).unwrap();
        }
        let child = Command::new(pgbouncer_bin())
            .arg(d.join("pgbouncer.ini"))
            .uid(pw.uid.as_raw())
            .gid(pw.gid.as_raw())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let me = Self {
            child,
            port,
            _dir: dir,
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return me;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("pgbouncer did not start");
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pgbouncer_bin() -> PathBuf {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("pgbouncer not installed: run `cargo xtask setup`")
}

fn run_pgbench(
    cg: Option<&TestCgroup>,
    port: u16,
    mode: &str,
    clients: u32,
    secs: u64,
    pinned: bool,
    log_dir: &Path,
) -> (f64, f64, f64) {
    let _ = fs::remove_dir_all(log_dir);
    fs::create_dir_all(log_dir).unwrap();
    let pgbench = pg_bin("pgbench");
    let mut cmd = match (cg, pinned) {
        (Some(cg), true) => {
            let mut c = cg.command("taskset");
            c.args(["-c", "0"]).arg(&pgbench);
            c
        }
        (Some(cg), false) => cg.command(pgbench.to_str().unwrap()),
        (None, true) => {
            let mut c = Command::new("taskset");
            c.args(["-c", "0"]).arg(&pgbench);
            c
        }
        (None, false) => Command::new(&pgbench),
    };
    let jobs = clients.min(2).to_string();
    cmd.args([
        "-n",
        "-S",
        "-M",
        mode,
        "-c",
        &clients.to_string(),
        "-j",
        &jobs,
        "-T",
        &secs.to_string(),
    ])
    .args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        "postgres",
        "-l",
        "--log-prefix",
    ])
    .arg(log_dir.join("tx"))
    .arg("postgres")
    .current_dir(log_dir);
    let out = run_ok(&mut cmd);
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    let tps = out
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no tps in {out}"));
    let avg = out
        .lines()
        .find_map(|l| l.strip_prefix("latency average = "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    let mut lat: Vec<f64> = Vec::new();
    for f in fs::read_dir(log_dir).unwrap().flatten() {
        let text = fs::read_to_string(f.path()).unwrap_or_default();
        lat.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok()),
        );
    }
    lat.sort_by(f64::total_cmp);
    let p99 = if lat.is_empty() {
        f64::NAN
    } else {
        lat[(lat.len() * 99 / 100).min(lat.len() - 1)] / 1000.0
    };
    (tps, avg, p99)
}

fn main() {
    let (secs, rounds) = bench::settings();
    let pg = PgServer::start();
    run_ok(Command::new(pg_bin("pgbench")).args([
        "-i",
        "-q",
        "-s",
        "10",
        "-h",
        "127.0.0.1",
        "-p",
        &pg.port.to_string(),
        "-U",
        "postgres",
        "postgres",
    ]));
    pg.sql("CREATE TABLE secrets (v text)");
    let bouncer = PgBouncer::start(pg.port);
    let agents = bench::agents(&pg_policy(pg.port, POLICY_RULES));
    let log_dir = std::env::temp_dir().join(interceptor_tests::unique("bench-pgbench"));
    let mut pids = vec![pg.pid(), bouncer.child.id()];
    pids.extend(agents.iter().map(|a| a.agent.pid().unwrap()));

    let mut paths = vec![Path_::Direct, Path_::PgBouncer];
    paths.extend((0..agents.len()).map(Path_::Agent));
    let name = |p: Path_| match p {
        Path_::Direct => "direct",
        Path_::PgBouncer => "pgbouncer",
        Path_::Agent(i) => agents[i].name.as_str(),
    };
    let configs = [(1u32, true), (8u32, false)];
    let modes = ["simple", "extended", "prepared"];
    let mut rows = Vec::new();
    for &mode in &modes {
        for &(clients, pinned) in &configs {
            if !bench::selected(mode, clients) {
                continue;
            }
            for &p in &paths {
                rows.push(bench::Row::new(mode, clients, pinned, name(p)));
            }
        }
    }
    for round in 0..rounds {
        for &mode in &modes {
            for &(clients, pinned) in &configs {
                if !bench::selected(mode, clients) {
                    continue;
                }
                bench::pin(&pids, if pinned { "0" } else { "0-1" });
                for &p in &paths {
                    let (cgroup, port, proxy) = match p {
                        Path_::Direct => (None, pg.port, None),
                        Path_::PgBouncer => (None, bouncer.port, Some(bouncer.child.id())),
                        Path_::Agent(i) => {
                            (Some(&agents[i].cgroup), pg.port, agents[i].agent.pid())
                        }
                    };
                    let config = (mode, clients, name(p));
                    let (tps, avg, p99) = bench::measure(&mut rows, config, proxy, secs, || {
                        run_pgbench(cgroup, port, mode, clients, secs, pinned, &log_dir)
                    });
                    eprintln!(
                        "round {round} {mode} c={clients} {}: tps {tps:.0} avg {avg:.3} ms p99 {p99:.3} ms",
                        name(p)
                    );
                }
            }
        }
    }
    bench::finish("postgres", &rows, &pids, &agents);
    let _ = fs::remove_dir_all(&log_dir);
}
