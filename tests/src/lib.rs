//! Harness for the end-to-end tests: a test cgroup, real database servers on
//! loopback ports, and the agent attached to that cgroup only.
//!
//! Every guard cleans up in `Drop`. Failures panic with context; nothing is
//! skipped: without root these tests fail, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

pub mod bench;

use std::{
    fs,
    net::TcpListener,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread::sleep,
    time::{Duration, Instant},
};

use serde_json::Value;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Panics unless running as root: attaching programs and moving processes
/// between cgroups need it.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "end-to-end tests need root (they attach eBPF programs to a test cgroup)"
    );
}

/// A unique name for this test process and call.
#[must_use]
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The cgroup v2 mount point, from `/proc/self/mountinfo`.
#[must_use]
pub fn cgroup2_root() -> PathBuf {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .find_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            if post.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            Some(PathBuf::from(pre.split_whitespace().nth(4)?))
        })
        .expect("no cgroup2 mount in /proc/self/mountinfo")
}

/// A port nobody listens on right now.
#[must_use]
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Output bytes as text.
#[must_use]
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A command's status and both streams, for assertion messages.
#[must_use]
pub fn show(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// Polls `cond` every 50 ms until it holds; panics naming `what` after
/// `limit`.
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for a spawned client to exit (panics after `limit`) and collects
/// its output.
pub fn wait_exit(mut child: std::process::Child, limit: Duration) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < limit,
            "client still running after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// `GET /metrics` from an agent's metrics address on loopback: the whole
/// answer, which must be a 200.
#[must_use]
pub fn scrape(port: u16) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

/// A cgroup made for one test; only the test's own clients go in it.
pub struct TestCgroup {
    pub path: PathBuf,
    /// Path relative to the cgroup v2 root, as `/proc/PID/cgroup` shows it.
    pub rel: String,
}

impl TestCgroup {
    #[must_use]
    pub fn new() -> Self {
        Self::with_prefix("interceptor-test")
    }

    /// A cgroup whose name starts with `prefix`.
    #[must_use]
    pub fn with_prefix(prefix: &str) -> Self {
        require_root();
        let name = unique(prefix);
        let path = cgroup2_root().join(&name);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        Self {
            path,
            rel: format!("/{name}"),
        }
    }

    /// `cmd` run as a process of this cgroup (a shell moves itself in, then execs).
    #[must_use]
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("echo $$ > \"$0\" && exec \"$@\"")
            .arg(self.path.join("cgroup.procs"))
            .arg(program);
        c
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            let procs = fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if fs::remove_dir(&self.path).is_ok() {
                return;
            }
            sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove test cgroup {}", self.path.display());
    }
}

/// Runs a command, panicking with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns its whole output, whatever the status.
pub fn run_any(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

fn user_ids(name: &str) -> (u32, u32) {
    let u = nix::unistd::User::from_name(name)
        .unwrap()
        .unwrap_or_else(|| panic!("no user {name}: run `cargo xtask setup`"));
    (u.uid.as_raw(), u.gid.as_raw())
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        sleep(Duration::from_millis(50));
    }
}

/// PostgreSQL binaries directory (Debian layout).
#[must_use]
pub fn pg_bin(tool: &str) -> PathBuf {
    let base = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = fs::read_dir(base)
        .unwrap_or_else(|e| panic!("{}: {e}: run `cargo xtask setup`", base.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    versions.sort();
    versions
        .last()
        .expect("no PostgreSQL installed")
        .join("bin")
        .join(tool)
}

/// A PostgreSQL server of the test's own, on a loopback port, trust auth.
pub struct PgServer {
    pub port: u16,
    /// The address clients reach it at over TCP.
    pub host: String,
    dir: PathBuf,
    child: Child,
}

impl PgServer {
    #[must_use]
    pub fn start() -> Self {
        Self::start_in(None, "127.0.0.1,::1")
    }

    /// A server in the network namespace `netns` (`ip netns` name; `None`:
    /// the host's), listening on `listen` (PostgreSQL's `listen_addresses`;
    /// the first is what clients use).
    #[must_use]
    pub fn start_in(netns: Option<&str>, listen: &str) -> Self {
        Self::start_full(netns, listen, &[], None)
    }

    /// On the host's loopback, with extra `-c name=value` settings and, if
    /// given, this `pg_hba.conf` instead of initdb's (trust for
    /// everything); files the settings name must be readable by user
    /// postgres.
    #[must_use]
    pub fn start_with(settings: &[String], hba: Option<&str>) -> Self {
        Self::start_full(None, "127.0.0.1,::1", settings, hba)
    }

    /// [`PgServer::start_in`] and [`PgServer::start_with`] together.
    #[must_use]
    pub fn start_full(
        netns: Option<&str>,
        listen: &str,
        settings: &[String],
        hba: Option<&str>,
    ) -> Self {
        Self::start_port(netns, listen, settings, hba, free_port())
    }

    /// [`PgServer::start_full`] on a given port (two servers on different
    /// loopback addresses may share one).
    #[must_use]
    pub fn start_port(
        netns: Option<&str>,
        listen: &str,
        settings: &[String],
        hba: Option<&str>,
        port: u16,
    ) -> Self {
        require_root();
        let (uid, gid) = user_ids("postgres");
        let dir = std::env::temp_dir().join(unique("interceptor-pg"));
        fs::create_dir_all(&dir).unwrap();
        nix::unistd::chown(&dir, Some(uid.into()), Some(gid.into())).unwrap();
        let data = dir.join("data");
        run_ok(
            Command::new(pg_bin("initdb"))
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "-D",
                ])
                .arg(&data)
                .uid(uid)
                .gid(gid)
                .current_dir(&dir),
        );
        if let Some(hba) = hba {
            fs::write(data.join("pg_hba.conf"), hba).unwrap();
        }
        if netns.is_some() || listen.contains("169.254.") {
            // Clients in the test's namespaces come from link-local addresses.
            let hba = data.join("pg_hba.conf");
            let mut text = fs::read_to_string(&hba).unwrap();
            text.push_str("\nhost all all 169.254.0.0/16 trust\n");
            fs::write(&hba, text).unwrap();
        }
        let log = fs::File::create(dir.join("server.log")).unwrap();
        nix::unistd::chown(&dir.join("server.log"), Some(uid.into()), Some(gid.into())).unwrap();
        let mut cmd = match netns {
            // `ip netns exec` needs root; the server drops to postgres after.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "setpriv"])
                    .arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .args(["--clear-groups", "--"])
                    .arg(pg_bin("postgres"));
                c
            }
            None => {
                let mut c = Command::new(pg_bin("postgres"));
                c.uid(uid).gid(gid);
                c
            }
        };
        let child = cmd
            .arg("-D")
            .arg(&data)
            .args([
                "-p",
                &port.to_string(),
                "-c",
                &format!("listen_addresses={listen}"),
                "-c",
                "fsync=off",
            ])
            .args(["-c", "max_connections=200", "-c", "shared_buffers=64MB"])
            .args(settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .arg("-k")
            .arg(&dir)
            .current_dir(&dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let host = listen.split(',').next().unwrap_or("127.0.0.1").to_owned();
        let server = Self {
            port,
            host,
            dir,
            child,
        };
        wait_until(
            "postgres to accept connections",
            Duration::from_secs(30),
            || {
                Command::new(pg_bin("pg_isready"))
                    .arg("-h")
                    .arg(&server.dir)
                    .args(["-p", &port.to_string(), "-q"])
                    .status()
                    .is_ok_and(|s| s.success())
            },
        );
        server
    }

    /// The directory of the server's unix socket (`.s.PGSQL.PORT`).
    #[must_use]
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The postmaster's pid.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `psql` connection arguments for this server over TCP.
    fn conn_args(&self) -> Vec<String> {
        [
            "-X",
            "-h",
            &self.host,
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
        ]
        .iter()
        .map(ToString::to_string)
        .collect()
    }

    /// `psql` arguments reaching this server over TCP, unchanged by the
    /// agent, stopping at the first error.
    #[must_use]
    pub fn psql_args(&self) -> Vec<String> {
        let mut a = self.conn_args();
        a.extend(["-v".to_owned(), "ON_ERROR_STOP=1".to_owned()]);
        a
    }

    /// `psql` run inside `cg` (so redirected through the agent), connected
    /// to this server; add `-c SQL`, `-f FILE` and output flags.
    #[must_use]
    pub fn psql_in(&self, cg: &TestCgroup) -> Command {
        let mut c = cg.command(pg_bin("psql").to_str().unwrap());
        c.args(self.conn_args());
        c
    }

    /// `pgbench -i -q -s SCALE` directly against this server (the test
    /// process is in no test cgroup), on its TCP port.
    pub fn pgbench_init(&self, scale: u32) {
        run_ok(Command::new(pg_bin("pgbench")).args([
            "-i",
            "-q",
            "-s",
            &scale.to_string(),
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "postgres",
        ]));
    }

    /// Runs SQL directly (not redirected: the test process is in no test
    /// cgroup), over the server's unix socket, so from any namespace.
    pub fn sql(&self, sql: &str) -> String {
        run_ok(
            Command::new(pg_bin("psql"))
                .arg("-h")
                .arg(&self.dir)
                .args([
                    "-X",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                ])
                .args(["-v", "ON_ERROR_STOP=1", "-Atc", sql]),
        )
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT);
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A tokio-postgres client for the driver binaries run inside a test
/// cgroup: `HOST PORT` from the command line (returned with the remaining
/// arguments), database `postgres`, user `$PGUSER` or `postgres`, the connection driven on a
/// task of its own.
pub async fn pg_client_from_args() -> (tokio_postgres::Client, Vec<String>) {
    let mut args = std::env::args().skip(1);
    let host = args.next().expect("usage: HOST PORT ...");
    let port = args.next().expect("usage: HOST PORT ...");
    // PGUSER names another user (no password: the agent may log in for it).
    let user = std::env::var("PGUSER").unwrap_or_else(|_| "postgres".into());
    let conninfo = format!("host={host} port={port} user={user} dbname=postgres");
    let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("connection error: {e}");
        }
    });
    (client, args.collect())
}

/// Path of the agent binary under test.
#[must_use]
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("INTERCEPTOR_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let p = root.join("target/release/interceptor");
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask test` (it builds it)",
        p.display()
    );
    p
}

/// The agent, attached to a test cgroup only.
pub struct Agent {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub listen_port: u16,
    pub control_socket: PathBuf,
    pub audit_log: PathBuf,
    pub policy: PathBuf,
    /// The agent's pin dir under /sys/fs/bpf, its own unless the test
    /// passed `--pin-dir`; detached when the agent is dropped.
    pub pin_dir: PathBuf,
    /// The agent's unix listeners (outside its private temp dir, so that
    /// workloads of any user reach them); removed when it is dropped.
    pub unix_dir: PathBuf,
}

impl Agent {
    /// Starts the agent on `cgroup` with `policy` (YAML text); with
    /// `inside`, the agent itself runs in that cgroup (to prove it never
    /// redirects its own upstream connections).
    #[must_use]
    pub fn start(policy: &str, cgroup: &TestCgroup, inside: bool) -> Self {
        Self::start_with(policy, cgroup, inside, &[])
    }

    /// [`Agent::start`] with extra `interceptor run` arguments.
    #[must_use]
    pub fn start_with(policy: &str, cgroup: &TestCgroup, inside: bool, extra: &[&str]) -> Self {
        Self::launch(policy, cgroup, inside, extra, &[], &[])
    }

    /// [`Agent::start_with`] (not inside the cgroup) run through `wrapper`
    /// (a program and its arguments that then exec the agent, e.g.
    /// `setpriv`), with `env` added to its environment.
    #[must_use]
    pub fn start_wrapped(
        policy: &str,
        cgroup: &TestCgroup,
        extra: &[&str],
        wrapper: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Self {
        Self::launch(policy, cgroup, false, extra, wrapper, env)
    }

    /// [`Agent::start_with`] (not inside the cgroup), the agent seeing
    /// `hosts` as its `/etc/hosts`: it runs in a private mount namespace
    /// (`unshare --mount`, private propagation) with that file bind-mounted
    /// over `/etc/hosts`, so the machine's own file and resolver stay
    /// untouched. Rewrite `hosts` in place (not by rename) to change what
    /// the agent resolves.
    #[must_use]
    pub fn start_hosts(policy: &str, cgroup: &TestCgroup, extra: &[&str], hosts: &Path) -> Self {
        let hosts = hosts.to_str().unwrap();
        Self::start_wrapped(
            policy,
            cgroup,
            extra,
            &[
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                "mount --bind \"$0\" /etc/hosts && exec \"$@\"",
                hosts,
            ],
            &[],
        )
    }

    fn launch(
        policy: &str,
        cgroup: &TestCgroup,
        inside: bool,
        extra: &[&str],
        wrapper: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Self {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let policy_path = dir.path().join("policy.yaml");
        fs::write(&policy_path, policy).unwrap();
        let control_socket = dir.path().join("control.sock");
        let given = |flag: &str| {
            extra
                .iter()
                .position(|a| *a == flag)
                .and_then(|i| extra.get(i + 1))
                .map(|v| (*v).to_owned())
        };
        let audit_log =
            given("--audit-log").map_or_else(|| dir.path().join("audit.jsonl"), PathBuf::from);
        let listen_port = given("--listen")
            .and_then(|l| l.rsplit_once(':').and_then(|(_, p)| p.parse().ok()))
            .unwrap_or_else(free_port);
        let mut cmd = if inside {
            let mut c = cgroup.command(agent_bin().to_str().unwrap());
            c.arg("run");
            c
        } else if let Some((program, args)) = wrapper.split_first() {
            let mut c = Command::new(program);
            c.args(args).arg(agent_bin()).arg("run");
            c
        } else {
            let mut c = Command::new(agent_bin());
            c.arg("run");
            c
        };
        cmd.envs(env.iter().copied());
        cmd.arg("--cgroup").arg(&cgroup.path);
        if given("--listen").is_none() {
            cmd.arg("--listen").arg(format!("127.0.0.1:{listen_port}"));
        }
        if given("--audit-log").is_none() {
            cmd.arg("--audit-log").arg(&audit_log);
        }
        cmd.arg("--policy")
            .arg(&policy_path)
            .arg("--control-socket")
            .arg(&control_socket)
            .args(["--drain-timeout", "1"])
            .args(if extra.contains(&"--workers") {
                &[][..]
            } else {
                &["--workers", "2"][..]
            })
            .args(extra);
        // Never the host's /var/lib/interceptor: a test's blocks stay its own.
        if !extra.contains(&"--state-dir") {
            cmd.arg("--state-dir").arg(dir.path().join("state"));
        }
        // Never the host's /sys/fs/bpf/interceptor either.
        let pin_dir = match extra.iter().position(|a| *a == "--pin-dir") {
            Some(i) => PathBuf::from(extra[i + 1]),
            None => {
                let p = PathBuf::from("/sys/fs/bpf").join(unique("interceptor-test"));
                cmd.arg("--pin-dir").arg(&p);
                p
            }
        };
        let unix_dir = match extra.iter().position(|a| *a == "--unix-dir") {
            Some(i) => PathBuf::from(extra[i + 1]),
            None => {
                let p = std::env::temp_dir().join(unique("interceptor-unix"));
                cmd.arg("--unix-dir").arg(&p);
                p
            }
        };
        cmd.stdout(Stdio::null())
            .stderr(fs::File::create(dir.path().join("agent.log")).unwrap());
        let child = cmd.spawn().unwrap();
        let mut agent = Self {
            child: Some(child),
            dir,
            listen_port,
            control_socket,
            audit_log,
            policy: policy_path,
            pin_dir,
            unix_dir,
        };
        let start = Instant::now();
        loop {
            if agent.status().status.success() {
                break;
            }
            if let Some(st) = agent.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited early ({st}):\n{}", agent.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "agent not ready:\n{}",
                agent.log()
            );
            sleep(Duration::from_millis(50));
        }
        agent
    }

    /// The agent's pid, while it runs.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent's stderr so far.
    #[must_use]
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// `interceptor status` against this agent.
    #[must_use]
    pub fn status(&self) -> Output {
        self.cli(&["status"])
    }

    /// Runs an `interceptor` subcommand against this agent.
    #[must_use]
    pub fn cli(&self, args: &[&str]) -> Output {
        run_any(
            Command::new(agent_bin())
                .env("INTERCEPTOR_CONTROL_SOCKET", &self.control_socket)
                .args(args),
        )
    }

    /// Every audit event so far. A last line without its newline is one
    /// the writer is still writing: left for the next look.
    #[must_use]
    pub fn events(&self) -> Vec<Value> {
        let log = fs::read_to_string(&self.audit_log).unwrap_or_default();
        let whole = log.rfind('\n').map_or("", |end| &log[..end]);
        whole
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad audit line {l:?}: {e}"))
            })
            .collect()
    }

    /// `query` records whose line also contains `member` (e.g.
    /// `"target":"pg"`; empty for all) in the live audit file and the
    /// rotated ones (FILE.1, FILE.2, ...), without parsing them.
    #[must_use]
    pub fn query_records(&self, member: &str) -> usize {
        let base = self.audit_log.display().to_string();
        std::iter::once(base.clone())
            .chain((1..).map(|n| format!("{base}.{n}")))
            .map_while(|f| fs::read_to_string(f).ok())
            .map(|text| {
                text.lines()
                    .filter(|l| l.contains("\"event\":\"query\"") && l.contains(member))
                    .count()
            })
            .sum()
    }

    /// Waits for an audit event matching `pred` and returns it.
    /// Waits (15 s at most) until the agent holds a statement for approval
    /// and returns the first pending approval's id.
    #[must_use]
    pub fn wait_pending_approval(&self) -> String {
        let mut id = String::new();
        wait_for(
            "the approval to be pending",
            Duration::from_secs(15),
            || {
                let out = self.cli(&["approvals", "list", "--json"]);
                let list: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                match list.as_array().and_then(|a| a.first()) {
                    Some(a) => {
                        id = a["id"].as_str().unwrap().to_owned();
                        true
                    }
                    None => false,
                }
            },
        );
        id
    }

    pub fn wait_event(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let mut found = None;
        let start = Instant::now();
        while found.is_none() {
            found = self.events().into_iter().find(|e| pred(e));
            if found.is_none() {
                assert!(
                    start.elapsed() < Duration::from_secs(15),
                    "no audit event {what}; events:\n{}\nagent log:\n{}",
                    self.events()
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("\n"),
                    self.log()
                );
                sleep(Duration::from_millis(50));
            }
        }
        found.unwrap()
    }

    /// SIGTERM, then waits; returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agent already stopped");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("agent did not stop on SIGTERM:\n{}", self.log());
            }
            sleep(Duration::from_millis(50));
        }
    }
}

impl Agent {
    /// SIGKILL: the agent dies without cleaning up anything.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("agent already stopped");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// `interceptor detach --pin-dir` for this agent's pin dir.
    #[must_use]
    pub fn detach(&self) -> Output {
        run_any(
            Command::new(agent_bin())
                .arg("detach")
                .arg("--pin-dir")
                .arg(&self.pin_dir),
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        // Fail closed leaves the programs pinned: a test leaves nothing.
        let _ = self.detach();
        let _ = fs::remove_dir_all(&self.unix_dir);
    }
}

/// A policy with a PostgreSQL target on `port` (IPv4 and IPv6 loopback)
/// and the rest as `extra` YAML.
#[must_use]
pub fn pg_policy(port: u16, extra: &str) -> String {
    format!(
        "version: 1\ntargets:\n  - name: pg\n    protocol: postgres\n    address: 127.0.0.1:{port}\n  - name: pg6\n    protocol: postgres\n    address: '[::1]:{port}'\n{extra}"
    )
}

/// sha256 of a file, hex.
#[must_use]
pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(fs::read(path).unwrap());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

pub mod mysql;
pub mod netns;
pub mod pki;
