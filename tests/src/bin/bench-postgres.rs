//! `cargo xtask bench postgres`: pgbench -S in simple, extended and prepared
//! mode, direct, through a bare TCP relay (socat: the cost of the extra hop
//! alone), through PgBouncer (session mode) and through the agent
//! (parsing and deciding every statement), and the same from a network
//! namespace of its own over a veth (direct and through the agent, which
//! then listens inside that namespace), interleaved in one run; then mode
//! `tls`: simple protocol with every leg over TLS (pgbench with
//! `sslmode=require`; PgBouncer with `client_tls_sslmode`/`server_tls_sslmode`
//! require; agents whose target says `tls.server: require`). Latency
//! at 1 client with every process pinned to CPU 0; throughput at 8 clients
//! unpinned. Prints a Markdown table (also written to target/bench/postgres.md).
//!
//! Environment: BENCH_SECONDS (per run, default 5), BENCH_ROUNDS (default 2),
//! BENCH_ONLY (configurations, e.g. `simple:8,prepared`), BENCH_AGENT_WORKERS
//! (worker counts to compare, one agent each, default `1,2`), BENCH_EXECUTIONS
//! (`audit.executions` modes, default `summary,each`), BENCH_BYPASS
//! (`--local-bypass` settings, default `off,on`: `on` with the first
//! executions mode), BENCH_NETNS (`off` leaves out the network namespace
//! rows), BENCH_COMPARE_BIN and BENCH_COMPARE_NAME (a second build of the
//! agent and its label, measured beside the first agent).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::cast_precision_loss)]

use std::{fs, path::Path, process::Command};

use interceptor_tests::{
    PgServer, TestCgroup,
    bench::{self, PgBouncer},
    pg_bin, pki, run_ok,
};

const POLICY_RULES: &str = "mode: enforce\ndefault: allow\non_parse_error: allow\nrules:\n  - name: no-secrets\n    any_tables: [public.secrets]\n    decision: deny\n  - name: dangerous\n    flags: [file_access, program_exec, role_change, remote_access, admin]\n    decision: deny\n";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path_ {
    Direct,
    /// socat, relaying bytes it never looks at.
    Relay,
    PgBouncer,
    /// The agent at this index of [`bench::agents`].
    Agent(usize),
    /// pgbench in a network namespace of its own (a container's), over a
    /// veth to the server: direct, and through an agent.
    DirectNs,
    AgentNs(usize),
    /// On the host, with every leg over TLS.
    DirectTls,
    PgBouncerTls,
    AgentTls(usize),
}

/// Where pgbench runs and what it connects to.
struct Client<'a> {
    cgroup: Option<&'a TestCgroup>,
    netns: Option<&'a str>,
    host: &'a str,
    port: u16,
    /// `sslmode=require` (else `disable`: the plain rows stay plain).
    tls: bool,
}

/// A workload namespace joined to the host by a veth pair on
/// 169.254.90.0/30 (host .1, namespace .2); removed on drop.
struct BenchNs {
    ns: interceptor_tests::netns::NetNs,
    host_dev: String,
}

impl BenchNs {
    const HOST_ADDR: &str = "169.254.90.1";

    fn new() -> Self {
        let ns = interceptor_tests::netns::NetNs::new("bench");
        let host_dev = format!("ictb{}", std::process::id() % 100_000);
        run_ok(Command::new("ip").args([
            "link", "add", &host_dev, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]));
        run_ok(Command::new("ip").args(["addr", "add", "169.254.90.1/30", "dev", &host_dev]));
        run_ok(Command::new("ip").args(["link", "set", &host_dev, "up"]));
        ns.ip(&["addr", "add", "169.254.90.2/30", "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        Self { ns, host_dev }
    }
}

impl Drop for BenchNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_dev])
            .status();
    }
}

fn run_pgbench(
    client: &Client<'_>,
    mode: &str,
    clients: u32,
    secs: u64,
    pinned: bool,
    log_dir: &Path,
) -> (f64, f64, f64) {
    let _ = fs::remove_dir_all(log_dir);
    fs::create_dir_all(log_dir).unwrap();
    let pgbench = pg_bin("pgbench");
    // [ip netns exec NS] [taskset -c 0] pgbench, inside the cgroup or not.
    let mut argv: Vec<String> = Vec::new();
    if let Some(ns) = client.netns {
        argv.extend(["ip", "netns", "exec", ns].map(str::to_owned));
    }
    if pinned {
        argv.extend(["taskset", "-c", "0"].map(str::to_owned));
    }
    argv.push(pgbench.to_str().unwrap().to_owned());
    let mut cmd = match client.cgroup {
        Some(cg) => cg.command(&argv[0]),
        None => Command::new(&argv[0]),
    };
    cmd.args(&argv[1..]);
    let jobs = clients.min(2).to_string();
    cmd.env("PGSSLMODE", if client.tls { "require" } else { "disable" });
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
        client.host,
        "-p",
        &client.port.to_string(),
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
    let ns = BenchNs::new();
    let ca = pki::TestCa::new("Bench server CA");
    let server_cert = ca.issue("pg", &["127.0.0.1"], Some(pki::ids("postgres")));
    let bouncer_cert = ca.issue("bouncer", &["127.0.0.1"], Some(pki::ids("postgres")));
    // TLS available, not required: the plain rows stay plain.
    let pg = PgServer::start_full(
        None,
        &format!("127.0.0.1,{}", BenchNs::HOST_ADDR),
        &[
            "ssl=on".to_owned(),
            format!("ssl_cert_file={}", server_cert.cert.display()),
            format!("ssl_key_file={}", server_cert.key.display()),
        ],
        None,
    );
    pg.pgbench_init(10);
    pg.sql("CREATE TABLE secrets (v text)");
    let bouncer = PgBouncer::start(pg.port, None, 200);
    let bouncer_tls = PgBouncer::start(pg.port, Some(&bouncer_cert), 200);
    let relay = bench::Relay::start(pg.port);
    // Plain server legs for the plain rows, TLS for the `tls` rows.
    let policy = |server_tls: &str| {
        format!(
            "version: 1\ntargets:\n  - {{name: pg, protocol: postgres, address: '127.0.0.1:{p}', tls: {{server: {server_tls}}}}}\n  - {{name: pg-netns, protocol: postgres, address: '{}:{p}', tls: {{server: {server_tls}}}}}\n{POLICY_RULES}",
            BenchNs::HOST_ADDR,
            p = pg.port
        )
    };
    let mut agents = bench::agents(&policy("disable"));
    let plain_agents = agents.len();
    agents.extend(bench::agents(&policy("require")));
    let log_dir = std::env::temp_dir().join(interceptor_tests::unique("bench-pgbench"));
    let mut pids = vec![pg.pid(), bouncer.pid(), bouncer_tls.pid(), relay.pid()];
    let server_cpu = bench::CpuGroup::adopt(pg.pid());
    pids.extend(agents.iter().map(|a| a.agent.pid().unwrap()));

    let mut paths = vec![Path_::Direct, Path_::Relay, Path_::PgBouncer];
    paths.extend((0..plain_agents).map(Path_::Agent));
    // `BENCH_NETNS=off` leaves out the network namespace rows (a quicker
    // A/B of the host paths).
    if std::env::var("BENCH_NETNS").as_deref() != Ok("off") {
        paths.push(Path_::DirectNs);
        paths.extend((0..plain_agents).map(Path_::AgentNs));
    }
    let mut tls_paths = vec![Path_::DirectTls, Path_::PgBouncerTls];
    tls_paths.extend((plain_agents..agents.len()).map(Path_::AgentTls));
    let ns_names: Vec<String> = agents
        .iter()
        .map(|a| format!("{} (netns)", a.name))
        .collect();
    let name = |p: Path_| match p {
        Path_::Direct | Path_::DirectTls => "direct",
        Path_::Relay => "socat",
        Path_::PgBouncer | Path_::PgBouncerTls => "pgbouncer",
        Path_::Agent(i) | Path_::AgentTls(i) => agents[i].name.as_str(),
        Path_::DirectNs => "direct (netns)",
        Path_::AgentNs(i) => ns_names[i].as_str(),
    };
    let paths_of = |mode: &str| if mode == "tls" { &tls_paths } else { &paths };
    let configs = [(1u32, true), (8u32, false)];
    let modes = ["simple", "extended", "prepared", "tls"];
    let mut rows = Vec::new();
    for &mode in &modes {
        for &(clients, pinned) in &configs {
            if !bench::selected(mode, clients) {
                continue;
            }
            for &p in paths_of(mode) {
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
                let tls = mode == "tls";
                for &p in paths_of(mode) {
                    let host = |cgroup, port| Client {
                        cgroup,
                        netns: None,
                        host: "127.0.0.1",
                        port,
                        tls,
                    };
                    let in_ns = |cgroup| Client {
                        cgroup,
                        netns: Some(ns.ns.name.as_str()),
                        host: BenchNs::HOST_ADDR,
                        port: pg.port,
                        tls,
                    };
                    let (client, proxy) = match p {
                        Path_::Direct | Path_::DirectTls => (host(None, pg.port), None),
                        Path_::Relay => (
                            host(None, relay.port),
                            Some(bench::Proxy::Group(&relay.cpu)),
                        ),
                        Path_::PgBouncer => (
                            host(None, bouncer.port),
                            Some(bench::Proxy::Process(bouncer.pid())),
                        ),
                        Path_::PgBouncerTls => (
                            host(None, bouncer_tls.port),
                            Some(bench::Proxy::Process(bouncer_tls.pid())),
                        ),
                        Path_::Agent(i) | Path_::AgentTls(i) => (
                            host(Some(&agents[i].cgroup), pg.port),
                            agents[i].agent.pid().map(bench::Proxy::Process),
                        ),
                        Path_::DirectNs => (in_ns(None), None),
                        Path_::AgentNs(i) => (
                            in_ns(Some(&agents[i].cgroup)),
                            agents[i].agent.pid().map(bench::Proxy::Process),
                        ),
                    };
                    let config = (mode, clients, name(p));
                    let (tps, avg, p99) =
                        bench::measure(&mut rows, config, proxy, &server_cpu, secs, || {
                            // The TLS rows use the simple protocol.
                            let protocol = if tls { "simple" } else { mode };
                            run_pgbench(&client, protocol, clients, secs, pinned, &log_dir)
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
