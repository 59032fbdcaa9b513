//! Approvals end to end: statements a rule holds wait for people, who
//! approve or deny them with the `interceptor` CLI as their own unix users;
//! deadlines, quorum, grants and webhooks, with real psql and mariadb in a
//! test cgroup.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    os::unix::fs::PermissionsExt as _,
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    thread::sleep,
    time::{Duration, Instant},
};

use interceptor_tests::{
    Agent, PgServer, TestCgroup, agent_bin,
    mysql::{APP_PASSWORD, APP_USER, MariaDb, mysql_policy},
    pg_bin, pg_policy, run_any, run_ok,
};
use serde_json::Value;

/// Approvers (group `ic-dba`), the workload's user (also in `ic-dba`, to
/// prove it still cannot approve its own statements), and an outsider.
const GROUP: &str = "ic-dba";
const APPROVER1: &str = "ic-approver1";
const APPROVER2: &str = "ic-approver2";
const WORKLOAD: &str = "ic-workload";
const OUTSIDER: &str = "ic-outsider";

fn ensure_users() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(make_users);
}

fn make_users() {
    run_ok(Command::new("groupadd").args(["-f", GROUP]));
    for (user, in_group) in [
        (APPROVER1, true),
        (APPROVER2, true),
        (WORKLOAD, true),
        (OUTSIDER, false),
    ] {
        let exists = run_any(Command::new("id").arg(user)).status.success();
        if !exists {
            let mut c = Command::new("useradd");
            c.args(["-M", "-s", "/usr/sbin/nologin", "-U"]);
            if in_group {
                c.args(["-G", GROUP]);
            }
            run_ok(c.arg(user));
        } else if in_group {
            run_ok(Command::new("usermod").args(["-aG", GROUP, user]));
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn show(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// Lets other users reach the agent's control socket (a test directory).
fn open_socket(agent: &Agent) {
    std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        &agent.control_socket,
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
}

/// The CLI run as `user` (with that user's groups).
fn cli_as(agent: &Agent, user: &str, args: &[&str]) -> Output {
    run_any(
        Command::new("setpriv")
            .args([
                &format!("--reuid={user}"),
                &format!("--regid={user}"),
                "--init-groups",
            ])
            .arg(agent_bin())
            .env("INTERCEPTOR_CONTROL_SOCKET", &agent.control_socket)
            .args(args),
    )
}

/// `interceptor approvals approve|deny ID EXTRA...` as `user`; must succeed.
fn answer(agent: &Agent, user: &str, verb: &str, id: &str, extra: &[&str]) {
    let mut args = vec!["approvals", verb, id];
    args.extend_from_slice(extra);
    let out = cli_as(agent, user, &args);
    assert!(out.status.success(), "{}", show(&out));
}

/// Denies the pending approval of the statement containing `needle`, as
/// an approver, with `reason`; the held client must then fail: returns its
/// stderr.
fn deny_and_fail(agent: &Agent, child: Child, needle: &str, reason: &str) -> String {
    let a = wait_pending(agent, needle);
    answer(
        agent,
        APPROVER2,
        "deny",
        a["id"].as_str().unwrap(),
        &["--reason", reason],
    );
    let out = finish(child);
    assert!(!out.status.success(), "{}", show(&out));
    text(&out.stderr)
}

fn pending(agent: &Agent) -> Vec<Value> {
    let out = agent.cli(&["approvals", "list", "--json"]);
    assert!(out.status.success(), "{}", show(&out));
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// Waits for a pending approval whose statement contains `needle`.
fn wait_pending(agent: &Agent, needle: &str) -> Value {
    let start = Instant::now();
    loop {
        if let Some(a) = pending(agent)
            .into_iter()
            .find(|a| a["query"].as_str().unwrap_or_default().contains(needle))
        {
            return a;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no pending approval for {needle:?}\nagent log:\n{}",
            agent.log()
        );
        sleep(Duration::from_millis(50));
    }
}

/// psql run as the workload's user inside the cgroup, in the background.
fn psql_as_workload(cg: &TestCgroup, pg: &PgServer, sql: &str) -> Child {
    cg.command("setpriv")
        .args([
            &format!("--reuid={WORKLOAD}"),
            &format!("--regid={WORKLOAD}"),
            "--init-groups",
        ])
        .arg(pg_bin("psql"))
        .args(pg.psql_args())
        .args(["-c", sql])
        .current_dir("/")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("client did not finish");
        }
    }
}

fn table_exists(pg: &PgServer, name: &str) -> bool {
    pg.sql(&format!("select to_regclass('public.{name}') is not null"))
        .trim()
        == "t"
}

/// A webhook endpoint: every JSON body it receives.
struct Receiver {
    port: u16,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let b = Arc::clone(&bodies);
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read headers, then Content-Length bytes.
                let body = loop {
                    let Ok(n) = s.read(&mut chunk) else {
                        break None;
                    };
                    if n == 0 {
                        break None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break Some(buf[end + 4..end + 4 + len].to_vec());
                    }
                };
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
                if let Some(body) = body.and_then(|b| serde_json::from_slice(&b).ok()) {
                    b.lock().unwrap().push(body);
                }
            }
        });
        Self { port, bodies }
    }

    fn wait_for(&self, event: &str, needle: &str) -> Value {
        let start = Instant::now();
        loop {
            let found = self
                .bodies
                .lock()
                .unwrap()
                .iter()
                .find(|b| {
                    b["event"] == event
                        && b["approval"]["query"]
                            .as_str()
                            .unwrap_or_default()
                            .contains(needle)
                })
                .cloned();
            if let Some(f) = found {
                return f;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "webhook never got {event} for {needle:?}; got:\n{:#?}",
                self.bodies.lock().unwrap()
            );
            sleep(Duration::from_millis(50));
        }
    }
}

fn pg_rules(hook: u16) -> String {
    format!(
        "mode: enforce\ndefault: allow\non_parse_error: allow\nrules:
  - name: main-ddl
    kinds: [ddl]
    tables: [\"public.t_main*\"]
    decision: approve
    approval:
      approvers: [{GROUP}]
      timeout: 60s
      notify: [{{url: \"http://127.0.0.1:{hook}/hook\", format: json}}]
  - name: quick-ddl
    kinds: [ddl]
    tables: [\"public.t_quick*\"]
    decision: approve
    approval:
      approvers: [{GROUP}]
      timeout: 2s
      notify: [{{url: \"http://127.0.0.1:{hook}/hook\", format: json}}]
  - name: two-man-ddl
    kinds: [ddl]
    tables: [\"public.t_two*\"]
    decision: approve
    approval:
      approvers: [{GROUP}]
      required: 2
      timeout: 60s
  - name: fp-ddl
    kinds: [ddl]
    tables: [\"public.t_fp*\"]
    decision: approve
    approval:
      approvers: [{GROUP}]
      timeout: 60s
"
    )
}

fn pg_setup() -> (PgServer, TestCgroup, Agent, Receiver, tempfile::TempDir) {
    ensure_users();
    let hook = Receiver::start();
    let pg = PgServer::start();
    let cg = TestCgroup::new();
    let state = tempfile::tempdir().unwrap();
    let agent = Agent::start_with(
        &pg_policy(pg.port, &pg_rules(hook.port)),
        &cg,
        false,
        &["--state-dir", state.path().to_str().unwrap()],
    );
    open_socket(&agent);
    (pg, cg, agent, hook, state)
}

#[test]
fn postgres_approve_deny_timeout_and_who_may_decide() {
    let (pg, cg, agent, hook, _state) = pg_setup();

    // Approved: listed with its facts, refused for the workload itself and
    // for an outsider, then released by an approver and run.
    let child = psql_as_workload(&cg, &pg, "CREATE TABLE t_main_ok (a int)");
    let a = wait_pending(&agent, "t_main_ok");
    for key in [
        "id",
        "identity",
        "target",
        "query",
        "rule",
        "requested_at",
        "expires_at",
    ] {
        assert!(!a[key].is_null(), "{key} missing in {a}");
    }
    assert_eq!(a["rule"], "main-ddl");
    assert_eq!(a["target"], "pg");
    let id = a["id"].as_str().unwrap();
    let own = cli_as(&agent, WORKLOAD, &["approvals", "approve", id]);
    assert!(!own.status.success(), "{}", show(&own));
    assert!(
        text(&own.stderr).contains("never approve its own"),
        "{}",
        show(&own)
    );
    let outsider = cli_as(&agent, OUTSIDER, &["approvals", "approve", id]);
    assert!(!outsider.status.success(), "{}", show(&outsider));
    assert!(!table_exists(&pg, "t_main_ok"));
    hook.wait_for("approval_requested", "t_main_ok");
    answer(
        &agent,
        APPROVER1,
        "approve",
        id,
        &["--reason", "looks fine"],
    );
    let out = finish(child);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("held for approval"),
        "{}",
        show(&out)
    );
    assert!(table_exists(&pg, "t_main_ok"));
    let granted = agent.wait_event("approval_granted", |e| e["event"] == "approval_granted");
    assert_eq!(granted["actor"]["user"], APPROVER1);
    assert_eq!(granted["reason"], "looks fine");
    let hooked = hook.wait_for("approval_granted", "t_main_ok");
    assert_eq!(hooked["actor"]["user"], APPROVER1);

    // Denied: 42501 with the approver's reason; never run.
    let child = psql_as_workload(&cg, &pg, "CREATE TABLE t_main_no (a int)");
    let err = deny_and_fail(&agent, child, "t_main_no", "not today");
    assert!(
        err.contains("not today") && err.contains("main-ddl"),
        "{err}"
    );
    assert!(!table_exists(&pg, "t_main_no"));
    hook.wait_for("approval_denied", "t_main_no");

    // Nobody answers: denied after the 2s timeout.
    let started = Instant::now();
    let child = psql_as_workload(&cg, &pg, "CREATE TABLE t_quick (a int)");
    let out = finish(child);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(
        text(&out.stderr).contains("not given within"),
        "{}",
        show(&out)
    );
    assert!(!table_exists(&pg, "t_quick"));
    agent.wait_event("approval_expired", |e| e["event"] == "approval_expired");
    hook.wait_for("approval_expired", "t_quick");

    // The client leaves while waiting: the approval is withdrawn.
    let mut child = psql_as_workload(&cg, &pg, "CREATE TABLE t_main_gone (a int)");
    wait_pending(&agent, "t_main_gone");
    child.kill().unwrap();
    let _ = child.wait();
    agent.wait_event("approval_withdrawn", |e| e["event"] == "approval_withdrawn");
    assert!(pending(&agent).is_empty());
    assert!(!table_exists(&pg, "t_main_gone"));
}

#[test]
fn postgres_sqlstate_of_a_denied_approval() {
    let (pg, cg, agent, _hook, _state) = pg_setup();
    let child = cg
        .command("setpriv")
        .args([
            &format!("--reuid={WORKLOAD}"),
            &format!("--regid={WORKLOAD}"),
            "--init-groups",
        ])
        .arg(pg_bin("psql"))
        .args(pg.psql_args())
        .args([
            "-c",
            "\\set VERBOSITY verbose",
            "-c",
            "CREATE TABLE t_main_x (a int)",
        ])
        .current_dir("/")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let a = wait_pending(&agent, "t_main_x");
    answer(&agent, APPROVER1, "deny", a["id"].as_str().unwrap(), &[]);
    let out = finish(child);
    assert!(
        text(&out.stderr).contains("ERROR:  42501"),
        "{}",
        show(&out)
    );
    // The session stays usable after a denial: nothing else was held.
    let out = run_any(
        cg.command(pg_bin("psql").to_str().unwrap())
            .args(pg.psql_args())
            .args(["-Atc", "select 'still fine'"]),
    );
    assert!(text(&out.stdout).contains("still fine"), "{}", show(&out));
}

#[test]
fn postgres_two_approvers_and_fingerprint_grants() {
    let (pg, cg, agent, _hook, state) = pg_setup();

    // required: 2 — one approver is not enough, the same one twice neither.
    let child = psql_as_workload(&cg, &pg, "CREATE TABLE t_two (a int)");
    let a = wait_pending(&agent, "t_two");
    let id = a["id"].as_str().unwrap().to_owned();
    answer(&agent, APPROVER1, "approve", &id, &[]);
    let again = cli_as(&agent, APPROVER1, &["approvals", "approve", &id]);
    assert!(!again.status.success(), "{}", show(&again));
    sleep(Duration::from_millis(300));
    assert!(!table_exists(&pg, "t_two"));
    assert_eq!(
        wait_pending(&agent, "t_two")["approved_by"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    answer(&agent, APPROVER2, "approve", &id, &[]);
    let out = finish(child);
    assert!(out.status.success(), "{}", show(&out));
    assert!(table_exists(&pg, "t_two"));

    // A fingerprint grant for 3s: the same shape runs without asking, then
    // after expiry it is held again.
    let sql = "CREATE TABLE IF NOT EXISTS t_fp (a int)";
    let child = psql_as_workload(&cg, &pg, sql);
    let a = wait_pending(&agent, "t_fp");
    answer(
        &agent,
        APPROVER1,
        "approve",
        a["id"].as_str().unwrap(),
        &["--grant", "fingerprint", "--for", "3s"],
    );
    assert!(finish(child).status.success());
    let grants = agent.cli(&["grants", "list", "--json"]);
    let grants: Value = serde_json::from_slice(&grants.stdout).unwrap();
    assert_eq!(grants.as_array().unwrap().len(), 1, "{grants}");
    assert_eq!(grants[0]["scope"], "fingerprint");
    // Persisted in the state file.
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(state.path().join("grants.json")).unwrap())
            .unwrap();
    assert_eq!(file["grants"][0]["id"], grants[0]["id"]);

    let started = Instant::now();
    let out = finish(psql_as_workload(&cg, &pg, sql));
    assert!(out.status.success(), "{}", show(&out));
    assert!(started.elapsed() < Duration::from_secs(2));
    agent.wait_event("grant_used", |e| e["event"] == "grant_used");

    sleep(Duration::from_millis(3200).saturating_sub(started.elapsed()));
    sleep(Duration::from_millis(500));
    let child = psql_as_workload(&cg, &pg, sql);
    let a = wait_pending(&agent, "t_fp");
    answer(&agent, APPROVER1, "deny", a["id"].as_str().unwrap(), &[]);
    assert!(!finish(child).status.success());

    // Revoking: an identity grant, revoked, holds again.
    let child = psql_as_workload(&cg, &pg, sql);
    let a = wait_pending(&agent, "t_fp");
    answer(
        &agent,
        APPROVER1,
        "approve",
        a["id"].as_str().unwrap(),
        &["--grant", "identity"],
    );
    assert!(finish(child).status.success());
    let grants = agent.cli(&["grants", "list", "--json"]);
    let grants: Value = serde_json::from_slice(&grants.stdout).unwrap();
    let gid = grants[0]["id"].as_str().unwrap();
    let r = agent.cli(&["grants", "revoke", gid]);
    assert!(r.status.success(), "{}", show(&r));
    let child = psql_as_workload(&cg, &pg, sql);
    let a = wait_pending(&agent, "t_fp");
    answer(&agent, APPROVER1, "deny", a["id"].as_str().unwrap(), &[]);
    assert!(!finish(child).status.success());
}

#[test]
fn grants_survive_a_restart() {
    ensure_users();
    let pg = PgServer::start();
    let cg = TestCgroup::new();
    let state = tempfile::tempdir().unwrap();
    let policy = pg_policy(pg.port, &pg_rules(1));
    let args = ["--state-dir", state.path().to_str().unwrap()];
    let sql = "CREATE TABLE IF NOT EXISTS t_fp_r (a int)";
    {
        let agent = Agent::start_with(&policy, &cg, false, &args);
        open_socket(&agent);
        let child = psql_as_workload(&cg, &pg, sql);
        let a = wait_pending(&agent, "t_fp_r");
        let ok = cli_as(
            &agent,
            APPROVER1,
            &[
                "approvals",
                "approve",
                a["id"].as_str().unwrap(),
                "--grant",
                "fingerprint",
                "--for",
                "1h",
            ],
        );
        assert!(ok.status.success(), "{}", show(&ok));
        assert!(finish(child).status.success());
    }
    let agent = Agent::start_with(&policy, &cg, false, &args);
    let out = finish(psql_as_workload(&cg, &pg, sql));
    assert!(out.status.success(), "{}", show(&out));
    agent.wait_event("grant_used", |e| e["event"] == "grant_used");
}

#[test]
fn postgres_extended_protocol_with_a_pipelined_query() {
    let (pg, cg, agent, _hook, _state) = pg_setup();
    let run = |sql: &str| {
        cg.command(env!("CARGO_BIN_EXE_pg-held"))
            .args(["127.0.0.1", &pg.port.to_string(), sql])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let child = run("CREATE TABLE t_main_ext (a int)");
    let a = wait_pending(&agent, "t_main_ext");
    answer(&agent, APPROVER1, "approve", a["id"].as_str().unwrap(), &[]);
    let out = finish(child);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(text(&out.stdout), "ddl ok\nafter 42\n", "{}", show(&out));
    assert!(table_exists(&pg, "t_main_ext"));

    let child = run("CREATE TABLE t_main_ext2 (a int)");
    let a = wait_pending(&agent, "t_main_ext2");
    answer(&agent, APPROVER1, "deny", a["id"].as_str().unwrap(), &[]);
    let out = finish(child);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        text(&out.stdout),
        "ddl error 42501\nafter 42\n",
        "{}",
        show(&out)
    );
    assert!(!table_exists(&pg, "t_main_ext2"));
}

fn mariadb_in_bg(cg: &TestCgroup, db: &MariaDb, sql: &str) -> Child {
    cg.command("mariadb")
        .args(db.client_args(APP_USER, APP_PASSWORD, "shop"))
        .args(["-N", "-B", "-e", sql])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn mysql_approve_deny_and_timeout() {
    ensure_users();
    let hook = Receiver::start();
    let db = MariaDb::start();
    let cg = TestCgroup::new();
    let rules = format!(
        "mode: enforce\ndefault: allow\non_parse_error: allow\nrules:
  - name: main-ddl
    kinds: [ddl]
    tables: [\"shop.m_main*\"]
    decision: approve
    approval:
      approvers: [{GROUP}]
      timeout: 60s
      notify: [{{url: \"http://127.0.0.1:{}/hook\", format: slack}}]
  - name: quick-ddl
    kinds: [ddl]
    tables: [\"shop.m_quick*\"]
    decision: approve
    approval:
      approvers: [{GROUP}]
      timeout: 2s
",
        hook.port
    );
    let state = tempfile::tempdir().unwrap();
    let agent = Agent::start_with(
        &mysql_policy(db.port, &rules),
        &cg,
        false,
        &["--state-dir", state.path().to_str().unwrap()],
    );
    open_socket(&agent);
    let exists = |t: &str| {
        db.sql(&format!(
            "select count(*) from information_schema.tables where table_schema='shop' and table_name='{t}'"
        ))
        .trim()
            == "1"
    };

    let child = mariadb_in_bg(&cg, &db, "CREATE TABLE m_main_ok (a int)");
    let a = wait_pending(&agent, "m_main_ok");
    assert_eq!(a["target"], "maria");
    answer(&agent, APPROVER1, "approve", a["id"].as_str().unwrap(), &[]);
    let out = finish(child);
    assert!(out.status.success(), "{}", show(&out));
    assert!(exists("m_main_ok"));
    // Slack-shaped webhook body.
    let start = Instant::now();
    loop {
        let got = hook.bodies.lock().unwrap().iter().any(|b| {
            b["text"]
                .as_str()
                .is_some_and(|t| t.contains("m_main_ok") && t.contains("Approved"))
        });
        if got {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no slack webhook"
        );
        sleep(Duration::from_millis(50));
    }

    let child = mariadb_in_bg(&cg, &db, "CREATE TABLE m_main_no (a int)");
    let err = deny_and_fail(&agent, child, "m_main_no", "nope");
    assert!(err.contains("1142") && err.contains("nope"), "{err}");
    assert!(!exists("m_main_no"));

    let out = finish(mariadb_in_bg(&cg, &db, "CREATE TABLE m_quick (a int)"));
    assert!(!out.status.success(), "{}", show(&out));
    let err = text(&out.stderr);
    assert!(
        err.contains("1142") && err.contains("not given within"),
        "{err}"
    );
    assert!(!exists("m_quick"));

    // The session stays usable after a denied approval.
    let out = finish(mariadb_in_bg(
        &cg,
        &db,
        "CREATE TABLE m_quick2 (a int); SELECT 'after'",
    ));
    assert!(!text(&out.stdout).contains("after") || out.status.success());
}
