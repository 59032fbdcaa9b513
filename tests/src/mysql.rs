//! MySQL-side harness: a MariaDB server of the test's own on a loopback
//! port, with real users and passwords (so authentication is exercised,
//! including an AuthSwitchRequest), and helpers for the agent in front of
//! it.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use crate::{Agent, TestCgroup, free_port, require_root, run_ok, unique};

/// A user with `mysql_native_password` and every privilege.
pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app-Secret-1";
/// A user with `ed25519`: the server asks the client to switch plugins.
pub const ED_USER: &str = "ed";
pub const ED_PASSWORD: &str = "ed-Secret-2";
/// A user without a password, for hand-written protocol clients.
pub const NOPW_USER: &str = "nopw";

/// A MariaDB server on 127.0.0.1, its data in a throwaway directory.
pub struct MariaDb {
    pub port: u16,
    /// The address clients reach it at over TCP.
    pub host: String,
    pub dir: PathBuf,
    pub socket: PathBuf,
    child: Child,
}

fn mysql_ids() -> (u32, u32) {
    let u = nix::unistd::User::from_name("mysql")
        .unwrap()
        .expect("no user mysql: run `cargo xtask setup` (installs mariadb-server)");
    (u.uid.as_raw(), u.gid.as_raw())
}

impl MariaDb {
    #[must_use]
    pub fn start() -> Self {
        Self::start_in(None, "127.0.0.1")
    }

    /// A server in the network namespace `netns` (`ip netns` name; `None`:
    /// the host's) bound to `bind`. Root's SQL goes over the unix socket,
    /// which works from any namespace.
    #[must_use]
    pub fn start_in(netns: Option<&str>, bind: &str) -> Self {
        Self::start_full(netns, bind, &[])
    }

    /// On the host's loopback, with extra `mariadbd` options (files they
    /// name must be readable by user mysql).
    #[must_use]
    pub fn start_with(options: &[String]) -> Self {
        Self::start_full(None, "127.0.0.1", options)
    }

    fn start_full(netns: Option<&str>, bind: &str, options: &[String]) -> Self {
        require_root();
        let (uid, gid) = mysql_ids();
        let dir = std::env::temp_dir().join(unique("interceptor-mariadb"));
        fs::create_dir_all(&dir).unwrap();
        nix::unistd::chown(&dir, Some(uid.into()), Some(gid.into())).unwrap();
        let data = dir.join("data");
        // Each server its own tmpdir: a starting server deletes the `#sql`
        // files it finds there, which breaks others sharing /tmp.
        let tmp = dir.join("tmp");
        fs::create_dir_all(&tmp).unwrap();
        nix::unistd::chown(&tmp, Some(uid.into()), Some(gid.into())).unwrap();
        let tmpdir = format!("--tmpdir={}", tmp.display());
        run_ok(
            Command::new("mariadb-install-db")
                .arg("--no-defaults")
                .arg("--auth-root-authentication-method=normal")
                .arg(format!("--datadir={}", data.display()))
                .args(["--user=mysql", "--skip-test-db", "--skip-name-resolve"])
                .arg(&tmpdir)
                .current_dir(&dir),
        );
        let port = free_port();
        let socket = dir.join("mysqld.sock");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "mariadbd"]);
                c
            }
            None => Command::new("mariadbd"),
        };
        let child = cmd
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", dir.join("mysqld.pid").display()))
            .arg(format!("--log-error={}", dir.join("error.log").display()))
            .arg(format!("--port={port}"))
            .arg(&tmpdir)
            .args([
                &format!("--bind-address={bind}"),
                "--user=mysql",
                "--skip-name-resolve",
                "--skip-log-bin",
                "--max-allowed-packet=64M",
                "--max-connections=300",
                "--innodb-buffer-pool-size=64M",
                "--innodb-flush-log-at-trx-commit=0",
                "--local-infile=1",
                "--plugin-load-add=auth_ed25519",
            ])
            .args(options)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Self {
            port,
            host: bind.to_owned(),
            dir,
            socket,
            child,
        };
        let start = Instant::now();
        loop {
            let ok = Command::new("mariadb-admin")
                .arg("--no-defaults")
                .arg(format!("--socket={}", server.socket.display()))
                .args(["-uroot", "ping"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "mariadbd did not start:\n{}",
                fs::read_to_string(server.dir.join("error.log")).unwrap_or_default()
            );
            sleep(Duration::from_millis(100));
        }
        server.sql(&format!(
            "CREATE DATABASE shop; CREATE DATABASE sbtest;
             CREATE USER '{APP_USER}'@'%' IDENTIFIED BY '{APP_PASSWORD}';
             GRANT ALL ON *.* TO '{APP_USER}'@'%';
             CREATE USER '{ED_USER}'@'%' IDENTIFIED VIA ed25519 USING PASSWORD('{ED_PASSWORD}');
             GRANT ALL ON shop.* TO '{ED_USER}'@'%';
             CREATE USER '{NOPW_USER}'@'%';
             GRANT SELECT ON shop.* TO '{NOPW_USER}'@'%';
             CREATE TABLE shop.items (id INT PRIMARY KEY, name VARCHAR(64));
             INSERT INTO shop.items VALUES (1, 'apple'), (2, 'pear'), (3, 'fig');
             CREATE TABLE shop.secrets (id INT PRIMARY KEY, secret VARCHAR(64));
             INSERT INTO shop.secrets VALUES (1, 'hunter2');
             CREATE TABLE shop.blobs (id INT PRIMARY KEY, body LONGBLOB);
             CREATE TABLE shop.log (id INT AUTO_INCREMENT PRIMARY KEY, note VARCHAR(64));"
        ));
        server
    }

    /// Runs SQL as root over the socket (never redirected); tab-separated
    /// output without column names.
    pub fn sql(&self, sql: &str) -> String {
        run_ok(
            Command::new("mariadb")
                .arg("--no-defaults")
                .arg(format!("--socket={}", self.socket.display()))
                .args(["-uroot", "-N", "-B", "-e", sql]),
        )
    }

    /// `mariadb` client arguments reaching this server over TCP as `user`.
    #[must_use]
    pub fn client_args(&self, user: &str, password: &str, database: &str) -> Vec<String> {
        let mut args = vec![
            "--no-defaults".to_owned(),
            "--protocol=tcp".to_owned(),
            format!("-h{}", self.host),
            format!("-P{}", self.port),
            format!("-u{user}"),
            format!("-p{password}"),
        ];
        if !database.is_empty() {
            args.push(database.to_owned());
        }
        args
    }

    /// The server's error log so far.
    #[must_use]
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if start.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            sleep(Duration::from_millis(50));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A policy with a MySQL target `maria` on `port` and the rest as `extra`.
#[must_use]
pub fn mysql_policy(port: u16, extra: &str) -> String {
    format!(
        "version: 1\ntargets:\n  - name: maria\n    protocol: mysql\n    address: 127.0.0.1:{port}\n{extra}"
    )
}

/// Like [`Agent::start`] (outside the cgroup), with extra `run` arguments.
#[must_use]
pub fn start_agent_with(policy: &str, cgroup: &TestCgroup, extra: &[&str]) -> Agent {
    Agent::start_with(policy, cgroup, false, extra)
}

/// Runs `mariadb` inside `cg` with `args`, feeding `-e sql`; returns the
/// whole output (the client's exit status is left to the caller).
#[must_use]
pub fn mariadb_in(cg: &TestCgroup, args: &[String], sql: &str) -> std::process::Output {
    let mut cmd = cg.command("mariadb");
    cmd.args(args).args(["-N", "-B", "-e", sql]);
    crate::run_any(&mut cmd)
}

/// Runs a `mariadb` session inside `cg`, reading `script` from stdin
/// (`--force` carries on after errors, as a person at the prompt would).
#[must_use]
pub fn mariadb_script_in(cg: &TestCgroup, args: &[String], script: &str) -> std::process::Output {
    use std::io::Write as _;
    let mut cmd = cg.command("mariadb");
    cmd.args(args)
        .args(["-N", "-B", "--force"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// sysbench's connection arguments for `db`.
#[must_use]
pub fn sysbench_args(db: &MariaDb) -> Vec<String> {
    vec![
        "--db-driver=mysql".to_owned(),
        "--mysql-host=127.0.0.1".to_owned(),
        format!("--mysql-port={}", db.port),
        format!("--mysql-user={APP_USER}"),
        format!("--mysql-password={APP_PASSWORD}"),
        "--mysql-db=sbtest".to_owned(),
        "--mysql-ssl=off".to_owned(),
    ]
}

/// A `sysbench` command for `test` against `db`, inside `cg`.
#[must_use]
pub fn sysbench_in(cg: &TestCgroup, db: &MariaDb, test: &str, args: &[&str]) -> Command {
    let mut cmd = cg.command("sysbench");
    cmd.arg(test).args(sysbench_args(db)).args(args);
    cmd
}
