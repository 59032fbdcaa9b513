//! A real Podman container (runc, CNI bridge on a link-local network of the
//! test's own, root file system assembled from the host's files) inside the
//! agent's attached cgroup: real psql in the container reaches a real
//! PostgreSQL server on the host through the agent's listener in the
//! container's network namespace.
//!
//! Nothing is skipped: without podman or runc the test fails and says so
//! (`cargo xtask setup` installs both).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    thread::sleep,
    time::{Duration, Instant},
};

use interceptor_tests::{Agent, PgServer, TestCgroup, pg_bin, run_any, run_ok, unique};
use serde_json::Value;

/// The podman network's subnet and the host's (bridge's) address on it.
const SUBNET: &str = "169.254.201.0/24";
const GATEWAY: &str = "169.254.201.1";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn podman() -> Command {
    let mut c = Command::new("podman");
    c.arg("--runtime").arg("runc");
    c
}

fn require_podman() {
    for tool in ["podman", "runc"] {
        let found = run_any(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
            .status
            .success();
        assert!(
            found,
            "{tool} is not installed: run `cargo xtask setup` (installs podman and runc)"
        );
    }
}

/// `podman network create --subnet SUBNET NAME`; removed on drop.
struct PodmanNet {
    name: String,
}

impl PodmanNet {
    fn new() -> Self {
        let name = unique("ict-podman-net");
        run_ok(podman().args(["network", "create", "--subnet", SUBNET, &name]));
        Self { name }
    }
}

impl Drop for PodmanNet {
    fn drop(&mut self) {
        let _ = run_any(podman().args(["network", "rm", "-f", &self.name]));
    }
}

/// A detached container, removed (killed at once) on drop.
struct Container {
    name: String,
    id: String,
}

impl Container {
    fn remove(&self) {
        let _ = run_any(podman().args(["rm", "-f", "-t", "0", &self.name]));
    }

    fn pid(&self) -> i32 {
        run_ok(podman().args(["inspect", "-f", "{{.State.Pid}}", &self.name]))
            .trim()
            .parse()
            .unwrap()
    }

    /// `podman exec` in this container: the process joins the container's
    /// cgroup and network namespace.
    fn exec(&self, args: &[String]) -> Output {
        run_any(
            podman()
                .args(["exec", "-e", "HOME=/tmp", &self.name])
                .args(args),
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.remove();
    }
}

/// runc on this cgroup v1/v2 hybrid host also makes the cgroup parent in
/// every v1 hierarchy (with conmon's cgroup under it); they go on drop, and
/// any leftover child of the cgroup2 parent before the `TestCgroup` goes.
struct V1Parents {
    rel: String,
}

impl Drop for V1Parents {
    fn drop(&mut self) {
        let Ok(dirs) = fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for h in dirs.flatten() {
            let dir = h.path().join(self.rel.trim_start_matches('/'));
            if !dir.is_dir() {
                continue;
            }
            // The cgroup2 parent is the TestCgroup's: only its children here.
            let v2 = h.path().join("cgroup.controllers").exists();
            for _ in 0..30 {
                if let Ok(children) = fs::read_dir(&dir) {
                    for c in children.flatten() {
                        if c.path().is_dir() {
                            let _ = fs::remove_dir(c.path());
                        }
                    }
                }
                if v2 || fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    break;
                }
                sleep(Duration::from_millis(100));
            }
        }
    }
}

/// A temporary root file system: psql and sleep with the libraries `ldd`
/// lists, a minimal /etc.
fn build_rootfs(dir: &Path) {
    let psql = pg_bin("psql");
    for d in ["etc", "tmp", "proc", "sys", "dev", "run", "bin"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    let mut files: Vec<PathBuf> = vec![psql.clone(), PathBuf::from("/bin/sleep")];
    for bin in [psql, PathBuf::from("/bin/sleep")] {
        let out = run_ok(Command::new("ldd").arg(&bin));
        files.extend(
            out.split_whitespace()
                .filter(|w| w.starts_with('/'))
                .map(PathBuf::from),
        );
    }
    // glibc's NSS module for /etc/passwd, where it still is a module.
    for lib in [
        "/lib/x86_64-linux-gnu/libnss_files.so.2",
        "/lib/aarch64-linux-gnu/libnss_files.so.2",
    ] {
        if Path::new(lib).exists() {
            files.push(PathBuf::from(lib));
        }
    }
    for f in files {
        let to = dir.join(f.strip_prefix("/").unwrap());
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::copy(&f, &to).unwrap_or_else(|e| panic!("copy {}: {e}", f.display()));
    }
    fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/tmp:/bin/sh\n").unwrap();
    fs::write(dir.join("etc/group"), "root:x:0:\n").unwrap();
    fs::write(
        dir.join("etc/nsswitch.conf"),
        "passwd: files\ngroup: files\nhosts: files\n",
    )
    .unwrap();
    fs::write(dir.join("etc/hosts"), "127.0.0.1 localhost\n").unwrap();
}

fn guests(agent: &Agent) -> usize {
    let out = agent.cli(&["status", "--json"]);
    assert!(out.status.success(), "status: {}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["host"] != true)
        .count()
}

fn netns_inode(pid: i32) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&fs::metadata(format!("/proc/{pid}/ns/net")).unwrap())
}

#[test]
fn podman_container_through_the_agent_denial_identity_and_cleanup() {
    require_podman();
    // The agent's cgroup, and the container's cgroup parent.
    let cg = TestCgroup::with_prefix("ict-podman");
    let _v1 = V1Parents {
        rel: cg.rel.clone(),
    };
    let rootfs = tempfile::tempdir().unwrap();
    build_rootfs(rootfs.path());
    let net = PodmanNet::new();

    // The container first: its network brings the bridge up with the host's
    // address on it, which the server then listens on.
    let name = unique("ict-podman-c");
    let out = run_any(
        podman()
            .args(["run", "-d", "--name", &name, "--network", &net.name])
            .args([
                "--ulimit",
                "nofile=1000:1000",
                "--ulimit",
                "nproc=1000:1000",
            ])
            .args(["--cgroup-parent", &cg.rel])
            .arg("--rootfs")
            .arg(rootfs.path())
            .args(["/bin/sleep", "600"]),
    );
    assert!(
        out.status.success(),
        "podman run: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let c = Container {
        name,
        id: text(&out.stdout).trim().to_owned(),
    };
    assert_eq!(c.id.len(), 64, "container id {:?}", c.id);
    let pid = c.pid();
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v2 = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("container process has a cgroup v2 path");
    assert_eq!(
        v2,
        format!("{}/libpod-{}", cg.rel, c.id),
        "container not inside the agent's cgroup: {cgroup}"
    );
    let addrs = run_ok(Command::new("ip").args(["-4", "-o", "addr", "show"]));
    assert!(
        addrs.contains(&format!("inet {GATEWAY}/24")),
        "no bridge with {GATEWAY}: {addrs}"
    );

    let pg = PgServer::start_in(None, &format!("127.0.0.1,{GATEWAY}"));
    pg.sql("create table orders(id int); insert into orders values (1),(2),(3); create table payroll(salary int);");
    let policy = format!(
        "version: 1\ndefault: allow\ntargets:\n  - {{name: pg-podman, protocol: postgres, address: '{GATEWAY}:{}'}}\nrules:\n  - {{name: no-payroll, any_tables: ['*payroll*'], decision: deny}}\n",
        pg.port
    );
    let agent = Agent::start(&policy, &cg, false);
    assert_eq!(guests(&agent), 0);

    let psql = |sql: &str| -> Vec<String> {
        [
            pg_bin("psql").to_str().unwrap(),
            "-X",
            "-h",
            GATEWAY,
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            "VERBOSITY=verbose",
            "-Atc",
            sql,
        ]
        .iter()
        .map(ToString::to_string)
        .collect()
    };

    // The first connection from the container's namespace, which the agent
    // has never seen.
    let started = Instant::now();
    let out = c.exec(&psql("select sum(id) from orders"));
    assert!(
        out.status.success(),
        "first connect from the container: {}\nagent log:\n{}",
        text(&out.stderr),
        agent.log()
    );
    assert_eq!(text(&out.stdout).trim(), "6");
    eprintln!(
        "first query from the container answered in {:?}",
        started.elapsed()
    );

    // A denial, with its SQLSTATE.
    let out = c.exec(&psql("select * from payroll"));
    assert!(
        !out.status.success(),
        "payroll allowed: {}",
        text(&out.stdout)
    );
    assert!(text(&out.stderr).contains("42501"), "{}", text(&out.stderr));
    agent.wait_event("deny of payroll", |e| {
        e["event"] == "query" && e["decision"] == "deny"
    });

    // Audit: the connection carries the container's namespace and id.
    let events = agent.events();
    let ready = events
        .iter()
        .find(|e| e["event"] == "netns_ready")
        .expect("netns_ready audited");
    let conn = events
        .iter()
        .find(|e| e["event"] == "connect" && e["target"] == "pg-podman")
        .expect("connect audited");
    let inode = netns_inode(pid);
    assert_eq!(conn["identity"]["netns_inode"], inode, "{conn}");
    assert_eq!(ready["netns_inode"], inode, "{ready}");
    assert_eq!(
        conn["identity"]["netns_cookie"], ready["netns_cookie"],
        "{conn}"
    );
    assert!(
        conn["identity"]["netns_cookie"].as_u64().is_some(),
        "{conn}"
    );
    assert_eq!(conn["identity"]["container"], c.id.as_str(), "{conn}");
    assert_ne!(inode, netns_inode(std::process::id().try_into().unwrap()));
    assert_eq!(guests(&agent), 1);

    // The container removed: the agent forgets its namespace.
    c.remove();
    let start = Instant::now();
    while guests(&agent) != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "namespace of the removed container still served:\n{}",
            agent.log()
        );
        sleep(Duration::from_millis(200));
    }
    eprintln!(
        "namespace forgotten {:?} after the container went",
        start.elapsed()
    );
}
