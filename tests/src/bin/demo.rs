//! `cargo xtask demo`: a newcomer's first five minutes. Starts a throwaway
//! PostgreSQL and MariaDB on loopback ports, the agent on a cgroup of its
//! own with `policies/demo.yaml`, and runs a short scripted batch job in
//! that cgroup while the live tail shows every decision: allowed reads and
//! writes, a refused DROP, a refused unbounded DELETE, and a schema change
//! held until it is approved. Its MariaDB steps hold no password: the agent
//! logs in for the job, and a copy of `mariadb` under another name asking
//! for the same user is refused. Then it verifies the audit log, says where
//! a copy is kept, and cleans everything up, also on Ctrl-C.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread::sleep,
    time::{Duration, Instant},
};

use interceptor_tests::{
    Agent, PgServer, TestCgroup, agent_bin,
    mysql::{APP_PASSWORD, APP_USER, MariaDb},
    pg_bin, run_any, unique,
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: i32) {
    STOP.store(true, Ordering::SeqCst);
}

fn stopped() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// The unprivileged user the batch job runs as: never the approver.
const JOB_USER: &str = "nobody";

fn say(text: &str) {
    eprintln!("\n\x1b[1m== {text}\x1b[0m");
}

/// A step of the batch job: `program args` as `nobody`, inside the cgroup.
fn job(cg: &TestCgroup, program: &str, args: &[String]) -> Command {
    let user = nix::unistd::User::from_name(JOB_USER)
        .unwrap()
        .expect("user nobody");
    let mut c = cg.command("setpriv");
    c.arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .arg("--clear-groups")
        .arg(program)
        .args(args);
    c
}

fn psql_args(pg: &PgServer, sql: &str) -> Vec<String> {
    let mut a = pg.psql_args();
    a.retain(|x| x != "-v" && x != "ON_ERROR_STOP=1");
    // Verbose errors show the SQLSTATE of a denial (42501).
    a.extend([
        "-v".to_owned(),
        "VERBOSITY=verbose".to_owned(),
        "-Atc".to_owned(),
        sql.to_owned(),
    ]);
    a
}

/// Shows a step's output; returns whether it ended as `want` says.
fn expect(out: &std::process::Output, want: Want) -> bool {
    show(out);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = match want {
        Want::Runs => out.status.success(),
        Want::Refused => !out.status.success() && text.contains("interceptor: denied"),
        Want::LoginRefused => !out.status.success() && text.contains("ERROR 1045"),
    };
    if !ok {
        eprintln!("   \x1b[31munexpected: this step should have {want:?}\x1b[0m");
    }
    ok
}

#[derive(Clone, Copy, Debug)]
enum Want {
    Runs,
    Refused,
    LoginRefused,
}

fn show(out: &std::process::Output) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for line in text.lines() {
        eprintln!("   job> {line}");
    }
}

fn cli(agent: &Agent, args: &[&str]) -> std::process::Output {
    run_any(
        Command::new(agent_bin())
            .env("INTERCEPTOR_CONTROL_SOCKET", &agent.control_socket)
            .args(args),
    )
}

/// Waits for the held statement to be listed; returns its approval id.
fn pending_id(agent: &Agent) -> Option<String> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) && !stopped() {
        let out = cli(agent, &["approvals", "list", "--json"]);
        if let Ok(serde_json::Value::Array(list)) = serde_json::from_slice(&out.stdout)
            && let Some(id) = list.first().and_then(|a| a["id"].as_str())
        {
            return Some(id.to_owned());
        }
        sleep(Duration::from_millis(200));
    }
    None
}

/// Runs a held statement in the background, approves it as this (root)
/// user, and shows how it ended; returns whether it ran.
fn approve_flow(agent: &Agent, mut held: Command) -> bool {
    let child: Child = held
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = child;
    let Some(id) = pending_id(agent) else {
        eprintln!("   \x1b[31m(no pending approval appeared)\x1b[0m");
        let _ = child.kill();
        let _ = child.wait();
        return false;
    };
    let list = cli(agent, &["approvals", "list"]);
    eprint!("{}", String::from_utf8_lossy(&list.stdout));
    eprintln!("   $ interceptor approvals approve {id} --reason 'reviewed in the demo'");
    sleep(Duration::from_secs(1));
    show(&cli(
        agent,
        &[
            "approvals",
            "approve",
            &id,
            "--reason",
            "reviewed in the demo",
        ],
    ));
    expect(&child.wait_with_output().unwrap(), Want::Runs)
}

fn main() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        let action = nix::sys::signal::SigAction::new(
            nix::sys::signal::SigHandler::Handler(on_signal),
            nix::sys::signal::SaFlags::empty(),
            nix::sys::signal::SigSet::empty(),
        );
        let _ = nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGINT, &action);
        let _ = nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGTERM, &action);
    }
    let code = demo();
    std::process::exit(code);
}

fn demo() -> i32 {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    say("starting a throwaway PostgreSQL and MariaDB on loopback ports");
    let pg = PgServer::start();
    pg.sql(
        "CREATE TABLE orders (id int PRIMARY KEY, status text);
         INSERT INTO orders SELECT g, 'new' FROM generate_series(1, 100) g;
         GRANT ALL ON SCHEMA public TO PUBLIC",
    );
    let my = MariaDb::start();
    my.sql(
        "CREATE DATABASE IF NOT EXISTS shop;
         CREATE TABLE shop.orders (id int PRIMARY KEY, status text);
         INSERT INTO shop.orders VALUES (1, 'new'), (2, 'new'), (3, 'new');",
    );
    eprintln!(
        "   postgres on 127.0.0.1:{}, mariadb on 127.0.0.1:{}",
        pg.port, my.port
    );
    if stopped() {
        return 130;
    }

    // The secret only the agent reads (mode 0600, root's), and a directory
    // for the impostor binary that the job's user can reach.
    let scratch = std::env::temp_dir().join(unique("interceptor-demo"));
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = scratch.join("demo-app");
    std::fs::write(&secret, format!("{APP_PASSWORD}\n")).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let policy = std::fs::read_to_string(root.join("policies/demo.yaml"))
        .unwrap()
        .replace("127.0.0.1:5432", &format!("127.0.0.1:{}", pg.port))
        .replace("127.0.0.1:3306", &format!("127.0.0.1:{}", my.port))
        .replace(
            "/etc/interceptor/secrets/demo-app",
            secret.to_str().unwrap(),
        );
    let cg = TestCgroup::with_prefix("interceptor-demo");
    say(&format!(
        "agent attached to cgroup {} only, with policies/demo.yaml",
        cg.path.display()
    ));
    let agent = Agent::start(&policy, &cg, false);
    eprint!("{}", String::from_utf8_lossy(&agent.status().stdout));

    say("live tail (interceptor tail -f): every decision as it happens");
    let mut tail = Command::new(agent_bin())
        .env("INTERCEPTOR_CONTROL_SOCKET", &agent.control_socket)
        .args([
            "tail",
            "-f",
            "-n",
            "0",
            "--event",
            "query",
            "--event",
            "approval_requested",
            "--event",
            "approval_granted",
            "--event",
            "login_refused",
            "--color",
            "always",
        ])
        .spawn()
        .unwrap();
    sleep(Duration::from_millis(300));

    let mut all_ok = true;
    let steps = [
        ("allowed read", "SELECT count(*) FROM orders", Want::Runs),
        (
            "allowed single-row write",
            "UPDATE orders SET status = 'shipped' WHERE id = 1",
            Want::Runs,
        ),
        (
            "a DROP of a core table: refused",
            "DROP TABLE orders",
            Want::Refused,
        ),
        (
            "an unbounded DELETE: refused",
            "DELETE FROM orders",
            Want::Refused,
        ),
    ];
    for (what, sql, want) in steps {
        if stopped() {
            break;
        }
        say(&format!("PostgreSQL, {what}: {sql}"));
        let psql = pg_bin("psql");
        let out = run_any(&mut job(&cg, psql.to_str().unwrap(), &psql_args(&pg, sql)));
        all_ok &= expect(&out, want);
        sleep(Duration::from_millis(400));
    }
    if !stopped() {
        say("PostgreSQL, a schema change: held until a human approves it");
        all_ok &= approve_flow(
            &agent,
            job(
                &cg,
                pg_bin("psql").to_str().unwrap(),
                &psql_args(&pg, "CREATE TABLE order_notes (order_id int, note text)"),
            ),
        );
    }
    // No -p: the job has no password for `app`; the agent logs in for it.
    let mut my_args = my.client_args(APP_USER, APP_PASSWORD, "shop");
    my_args.retain(|a| !a.starts_with("-p"));
    let impostor = scratch.join("exfil");
    let mariadb = run_any(Command::new("sh").args(["-c", "command -v mariadb"]));
    let _ = std::fs::copy(String::from_utf8_lossy(&mariadb.stdout).trim(), &impostor);
    let impostor = impostor.to_string_lossy().into_owned();
    for (what, program, sql, want) in [
        (
            "a job with no password (the agent logs in as app for it), allowed read",
            "mariadb",
            "SELECT current_user(), count(*) FROM orders",
            Want::Runs,
        ),
        (
            "a DROP of a core table: refused",
            "mariadb",
            "DROP TABLE orders",
            Want::Refused,
        ),
        (
            "another program (a copy of mariadb named exfil) asking to be app: refused",
            impostor.as_str(),
            "SELECT * FROM orders",
            Want::LoginRefused,
        ),
    ] {
        if stopped() {
            break;
        }
        say(&format!("MariaDB, {what}: {sql}"));
        let mut args = my_args.clone();
        args.extend([
            "-N".to_owned(),
            "-B".to_owned(),
            "-e".to_owned(),
            sql.to_owned(),
        ]);
        all_ok &= expect(&run_any(&mut job(&cg, program, &args)), want);
        sleep(Duration::from_millis(400));
    }
    sleep(Duration::from_millis(500));
    let _ = tail.kill();
    let _ = tail.wait();

    let mut agent = agent;
    agent.stop();
    let keep = root.join("target/demo");
    let _ = std::fs::create_dir_all(&keep);
    let copy: PathBuf = keep.join("audit.jsonl");
    let _ = std::fs::copy(&agent.audit_log, &copy);
    say("the audit log: hash-chained JSON Lines");
    let verify = run_any(
        Command::new(agent_bin())
            .args(["audit", "verify"])
            .arg(&copy),
    );
    eprint!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    eprintln!(
        "   a copy is kept at {}\n   verify it:  target/release/interceptor audit verify {}\n   read it:    target/release/interceptor tail --file {} -n 50",
        copy.display(),
        copy.display(),
        copy.display()
    );
    let _ = std::fs::remove_dir_all(&scratch);
    say("cleaning up: agent stopped, servers stopped, cgroup removed");
    if stopped() {
        130
    } else if verify.status.success() && all_ok {
        0
    } else {
        eprintln!("\x1b[31mthe demo did not go as described above\x1b[0m");
        1
    }
}
