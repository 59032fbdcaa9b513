//! Shared pieces of the benchmark drivers (`cargo xtask bench`): CPU
//! pinning, medians over interleaved rounds, and the Markdown report.
#![allow(clippy::cast_precision_loss)]

use std::{
    fmt::Write as _,
    fs,
    path::Path,
    process::{Command, Stdio},
};

/// Pins `pids`, their threads and their children to `cpus` (taskset list).
pub fn pin(pids: &[u32], cpus: &str) {
    let mut all: Vec<u32> = pids.to_vec();
    for &p in pids {
        all.extend(children(p));
    }
    for p in all {
        let _ = Command::new("taskset")
            .args(["-a", "-cp", cpus, &p.to_string()])
            .stdout(Stdio::null())
            .status();
    }
}

/// The median; with an even count, the mean of the middle two.
#[must_use]
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 0 => f64::midpoint(v[n / 2 - 1], v[n / 2]),
        n => v[n / 2],
    }
}

/// Measurements of one configuration on one path, one value per round.
#[derive(Clone, Debug)]
pub struct Row {
    pub mode: String,
    pub clients: u32,
    pub pinned: bool,
    pub path: String,
    pub tps: Vec<f64>,
    pub avg_ms: Vec<f64>,
    pub p_ms: Vec<f64>,
    /// The proxy's own CPU time per transaction, user and system, in µs.
    pub cpu_us: Vec<(f64, f64)>,
    /// The database server's CPU time per transaction (all its processes
    /// and threads), user and system, in µs.
    pub server_us: Vec<(f64, f64)>,
}

impl Row {
    #[must_use]
    pub fn new(mode: &str, clients: u32, pinned: bool, path: &str) -> Self {
        Self {
            mode: mode.to_owned(),
            clients,
            pinned,
            path: path.to_owned(),
            tps: Vec::new(),
            avg_ms: Vec::new(),
            p_ms: Vec::new(),
            cpu_us: Vec::new(),
            server_us: Vec::new(),
        }
    }

    fn same_config(&self, other: &Self) -> bool {
        self.mode == other.mode && self.clients == other.clients && self.pinned == other.pinned
    }
}

/// The Markdown table: medians, and ratios against the `baseline` path of
/// the same configuration. `pct` names the latency percentile column.
#[must_use]
pub fn table(rows: &[Row], baseline: &str, pct: &str) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| mode | clients | CPUs | path | tps | avg latency | {pct} latency | tps vs {baseline} | added avg latency vs {baseline} | proxy CPU per query (user) | server CPU per query (user) |"
    );
    let _ = writeln!(t, "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let Some(base) = rows.iter().find(|b| b.path == baseline && b.same_config(r)) else {
            continue;
        };
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {:.0} | {:.1} µs | {:.1} µs | {:.2} | {:+.1} µs | {} | {} |",
            r.mode,
            r.clients,
            if r.pinned { "1 (pinned)" } else { "2" },
            r.path,
            median(&r.tps),
            median(&r.avg_ms) * 1000.0,
            median(&r.p_ms) * 1000.0,
            median(&r.tps) / median(&base.tps),
            (median(&r.avg_ms) - median(&base.avg_ms)) * 1000.0,
            cpu_cell(&r.cpu_us),
            cpu_cell(&r.server_us),
        );
    }
    t
}

/// Prints the table and writes it to `target/bench/NAME.md`.
pub fn report(name: &str, table: &str) {
    println!("{table}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.join("target/bench"));
    if let Some(out) = out {
        let _ = fs::create_dir_all(&out);
        let _ = fs::write(out.join(format!("{name}.md")), table);
    }
}

/// `total µs (user µs)`, medians; `—` when not measured.
fn cpu_cell(v: &[(f64, f64)]) -> String {
    if v.is_empty() {
        return "—".to_owned();
    }
    let total: Vec<f64> = v.iter().map(|(u, s)| u + s).collect();
    let user: Vec<f64> = v.iter().map(|(u, _)| *u).collect();
    format!("{:.1} µs ({:.1})", median(&total), median(&user))
}

/// CPU time process `pid` has used so far, all threads: (user, system)
/// in µs, from `/proc/PID/stat`.
#[must_use]
pub fn cpu_us(pid: u32) -> (f64, f64) {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which ends at the last ')': utime and
    // stime are fields 14 and 15 of the whole line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    match f.as_slice() {
        [u, s] => (u * 1e6 / ticks, s * 1e6 / ticks),
        _ => (0.0, 0.0),
    }
}

/// The CPU time of a process and of every process it forks, those
/// already gone included (PostgreSQL's backends of closed connections,
/// socat's relays): the process is moved into a cgroup of its own, whose
/// `cpu.stat` counts them all. Dropping it moves them back.
pub struct CpuGroup {
    cgroup: crate::TestCgroup,
    home: std::path::PathBuf,
}

impl CpuGroup {
    /// Moves process `pid` and its children into a new cgroup.
    ///
    /// # Panics
    /// When the cgroup cannot be made or the processes moved.
    #[must_use]
    pub fn adopt(pid: u32) -> Self {
        let root = crate::cgroup2_root();
        let own = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or("/")
            .trim_start_matches('/');
        let home = root.join(rel);
        let cgroup = crate::TestCgroup::with_prefix("interceptor-bench-cpu");
        let procs = cgroup.path.join("cgroup.procs");
        for p in std::iter::once(pid).chain(children(pid)) {
            fs::write(&procs, p.to_string())
                .unwrap_or_else(|e| panic!("move {p} into {}: {e}", procs.display()));
        }
        Self { cgroup, home }
    }

    /// CPU time used so far, (user, system) in µs.
    #[must_use]
    pub fn usage_us(&self) -> (f64, f64) {
        let stat = fs::read_to_string(self.cgroup.path.join("cpu.stat")).unwrap_or_default();
        let field = |name: &str| {
            stat.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(f64::NAN)
        };
        (field("user_usec "), field("system_usec "))
    }
}

/// Moves the processes back where they came from, so that the cgroup,
/// removed next, kills none of them.
impl Drop for CpuGroup {
    fn drop(&mut self) {
        let procs = self.cgroup.path.join("cgroup.procs");
        for _ in 0..10 {
            let now = fs::read_to_string(&procs).unwrap_or_default();
            if now.trim().is_empty() {
                return;
            }
            for p in now.lines() {
                let _ = fs::write(self.home.join("cgroup.procs"), p.trim());
            }
        }
    }
}

/// The pids of `pid`'s children.
fn children(pid: u32) -> Vec<u32> {
    Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.trim().parse::<u32>().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Whose CPU time a row's proxy column reads.
#[derive(Clone, Copy)]
pub enum Proxy<'a> {
    /// One process (all its threads).
    Process(u32),
    /// A process and the children it forks.
    Group(&'a CpuGroup),
}

impl Proxy<'_> {
    fn usage_us(self) -> (f64, f64) {
        match self {
            Self::Process(pid) => cpu_us(pid),
            Self::Group(g) => g.usage_us(),
        }
    }
}

/// Runs one measurement with `run` (which returns tps, average and
/// percentile latency in ms, over `secs` seconds) and adds it to its row,
/// with the CPU time `proxy` and the database server used per query
/// meanwhile.
///
/// # Panics
/// When no row matches (a bug in the benchmark's table).
pub fn measure(
    rows: &mut [Row],
    (mode, clients, path): (&str, u32, &str),
    proxy: Option<Proxy<'_>>,
    server: &CpuGroup,
    secs: u64,
    run: impl FnOnce() -> (f64, f64, f64),
) -> (f64, f64, f64) {
    let before = proxy.map(Proxy::usage_us);
    let server_before = server.usage_us();
    let figures = run();
    let server_after = server.usage_us();
    let row = rows
        .iter_mut()
        .find(|r| r.mode == mode && r.clients == clients && r.path == path)
        .unwrap();
    let (tps, avg, p) = figures;
    row.tps.push(tps);
    row.avg_ms.push(avg);
    row.p_ms.push(p);
    let queries = tps * secs as f64;
    if queries > 0.0 {
        row.server_us.push((
            (server_after.0 - server_before.0) / queries,
            (server_after.1 - server_before.1) / queries,
        ));
    }
    if let (Some(proxy), Some(before)) = (proxy, before)
        && queries > 0.0
    {
        let after = proxy.usage_us();
        row.cpu_us.push((
            (after.0 - before.0) / queries,
            (after.1 - before.1) / queries,
        ));
    }
    figures
}

/// Ends a benchmark: unpins, prints and saves the table, and says how many
/// statements the agents decided and audited (as their logs still hold).
pub fn finish(name: &str, rows: &[Row], pids: &[u32], agents: &[BenchAgent]) {
    pin(pids, "0-1");
    report(name, &table(rows, "direct", "p99"));
    for a in agents {
        let statements = a.agent.query_records("");
        eprintln!(
            "{}: {statements} query records in its audit log (live and rotated files)",
            a.name
        );
    }
}

/// One agent under test, on its own cgroup: the same policy, a different
/// worker count.
pub struct BenchAgent {
    /// The path's name in the table.
    pub name: String,
    pub cgroup: crate::TestCgroup,
    pub agent: crate::Agent,
}

/// Starts one agent per worker count in `BENCH_AGENT_WORKERS` (a comma
/// list, default `1,2`), each attached to its own cgroup, so the run
/// compares worker counts side by side; and one per further
/// `audit.executions` mode in `BENCH_EXECUTIONS` (default `summary,each`:
/// summary on every worker count, each on the first).
///
/// # Panics
/// When an agent does not start.
#[must_use]
pub fn agents(policy: &str) -> Vec<BenchAgent> {
    let counts = env_list("BENCH_AGENT_WORKERS", "1,2");
    // `audit.executions` modes: the default (summary) on every worker
    // count, the others on the first.
    let modes = env_list("BENCH_EXECUTIONS", "summary,each");
    // `--local-bypass`: `on` beside the default mode, on every worker count.
    let bypasses = env_list("BENCH_BYPASS", "off,on");
    let mut combos = Vec::new();
    for (i, mode) in modes.iter().enumerate() {
        for (j, n) in counts.iter().enumerate() {
            for (k, bypass) in bypasses.iter().enumerate() {
                if i == 0 || (j == 0 && k == 0) {
                    combos.push((mode.as_str(), n.as_str(), bypass.as_str()));
                }
            }
        }
    }
    // `BENCH_COMPARE_BIN`: a second build of the agent, measured with the
    // first combination beside the build under test, so an A/B of two
    // builds shares one interleaved run; its rows are labelled
    // `BENCH_COMPARE_NAME`, else the path.
    let compare = std::env::var("BENCH_COMPARE_BIN").ok();
    let mut combos: Vec<_> = combos.into_iter().map(|c| (c, None)).collect();
    if let (Some(bin), Some(&(first, _))) = (compare.as_deref(), combos.first()) {
        combos.push((first, Some(bin)));
    }
    combos
        .into_iter()
        .map(
            |((mode, n, bypass), bin): ((&str, &str, &str), Option<&str>)| {
                let cgroup = crate::TestCgroup::new();
                let policy = format!("{policy}audit:\n  executions: {mode}\n");
                let args = ["--workers", n, "--local-bypass", bypass];
                let agent = match bin {
                    None => crate::Agent::start_with(&policy, &cgroup, false, &args),
                    // The launcher runs `WRAPPER... AGENT run ARGS`: the shell
                    // drops the agent under test and runs `bin run ARGS`.
                    Some(bin) => crate::Agent::start_wrapped(
                        &policy,
                        &cgroup,
                        &args,
                        &["sh", "-c", "shift; exec \"$0\" \"$@\"", bin],
                        &[],
                    ),
                };
                let mut name = match (counts.len(), n) {
                    (1, _) => "interceptor".to_owned(),
                    (_, "1") => "interceptor, 1 worker".to_owned(),
                    _ => format!("interceptor, {n} workers"),
                };
                if modes.len() > 1 {
                    name.push_str(&format!(", executions: {mode}"));
                }
                if bypasses.len() > 1 && bypass == "on" {
                    name.push_str(", local bypass");
                }
                if let Some(bin) = bin {
                    let label =
                        std::env::var("BENCH_COMPARE_NAME").unwrap_or_else(|_| bin.to_owned());
                    name.push_str(&format!(", {label}"));
                }
                BenchAgent {
                    name,
                    cgroup,
                    agent,
                }
            },
        )
        .collect()
}

/// A comma-separated list from the environment variable `name`, else
/// from `default`.
fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Whether a configuration is to be measured: `BENCH_ONLY` (for example
/// `simple:8,prepared`) names modes, optionally with a client count; unset
/// measures every configuration.
#[must_use]
pub fn selected(mode: &str, clients: u32) -> bool {
    let Ok(only) = std::env::var("BENCH_ONLY") else {
        return true;
    };
    only.split(',')
        .map(str::trim)
        .any(|item| match item.split_once(':') {
            Some((m, c)) => m == mode && c.parse() == Ok(clients),
            None => item == mode,
        })
}

/// Benchmark length from the environment: (seconds per run, rounds).
#[must_use]
pub fn settings() -> (u64, usize) {
    let secs = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let rounds = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    (secs, rounds)
}

/// A PgBouncer in session mode in front of a PostgreSQL server on
/// loopback; stopped on drop.
pub struct PgBouncer {
    child: std::process::Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl PgBouncer {
    /// Its process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// With `tls` (certificate, key): TLS required from clients and to the
    /// server; up to `clients` clients, each with a server connection of
    /// its own (session mode).
    ///
    /// # Panics
    /// When it is not installed or does not start.
    #[must_use]
    pub fn start(pg_port: u16, tls: Option<&crate::pki::Issued>, clients: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pw = nix::unistd::User::from_name("postgres").unwrap().unwrap();
        let port = crate::free_port();
        let d = dir.path();
        fs::write(d.join("userlist.txt"), "\"postgres\" \"\"\n").unwrap();
        let tls = tls.map_or_else(String::new, |t| {
            format!(
                "client_tls_sslmode = require\nclient_tls_cert_file = {}\nclient_tls_key_file = {}\nserver_tls_sslmode = require\n",
                t.cert.display(),
                t.key.display()
            )
        });
        fs::write(
            d.join("pgbouncer.ini"),
            format!(
                "[databases]\npostgres = host=127.0.0.1 port={pg_port} dbname=postgres\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = trust\nauth_file = {}/userlist.txt\npool_mode = session\nmax_client_conn = {clients}\ndefault_pool_size = {clients}\nunix_socket_dir = {}\nlogfile = {}/pgbouncer.log\n{tls}",
                d.display(),
                d.display(),
                d.display()
            ),
        )
        .unwrap();
        for f in ["userlist.txt", "pgbouncer.ini", ""] {
            nix::unistd::chown(&d.join(f), Some(pw.uid), Some(pw.gid)).unwrap();
        }
        use std::os::unix::process::CommandExt as _;
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
            std::thread::sleep(std::time::Duration::from_millis(50));
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

/// A bare TCP relay: socat, which forks a process per connection that
/// copies bytes both ways and looks at none of them. What any user-space
/// proxy pays for the extra hop, whatever it does with the bytes.
pub struct Relay {
    child: std::process::Child,
    pub port: u16,
    /// socat and its relays.
    pub cpu: CpuGroup,
}

impl Relay {
    /// Relays 127.0.0.1:`port` (a free one) to 127.0.0.1:`target`, with
    /// `TCP_NODELAY` on both legs.
    ///
    /// # Panics
    /// When socat is not installed or does not listen.
    #[must_use]
    pub fn start(target: u16) -> Self {
        let port = crate::free_port();
        let child = Command::new("socat")
            .arg(format!(
                "TCP4-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,nodelay,backlog=256"
            ))
            .arg(format!("TCP4:127.0.0.1:{target},nodelay"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat not installed: run `cargo xtask setup`");
        let cpu = CpuGroup::adopt(child.id());
        let me = Self { child, port, cpu };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return me;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("socat did not listen on {port}");
    }

    /// socat's pid (its relays are its children, and inherit its CPUs).
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The installed `pgbouncer`.
///
/// # Panics
/// When it is not installed.
#[must_use]
pub fn pgbouncer_bin() -> std::path::PathBuf {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
        .expect("pgbouncer not installed: run `cargo xtask setup`")
}
