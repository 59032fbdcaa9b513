//! Secretless workloads end to end: a PostgreSQL server with `ssl=on` and
//! `scram-sha-256` for every TCP login, a target whose `logins:` entry lets
//! the agent log in as `etl_rw` for the identities named there, and real
//! clients (psql, pgbench, tokio-postgres) that hold no password at all.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use interceptor_tests::{
    Agent, PgServer, TestCgroup, agent_bin, pg_bin,
    pki::{TestCa, ids},
    run_any, run_ok, show, text, wait_exit, wait_for,
};
use serde_json::Value;

const USER: &str = "etl_rw";
const FIRST: &str = "etl-Pass-1";
const SECOND: &str = "etl-Pass-2";
const OTHER_USER: &str = "reports";
const OTHER_PASSWORD: &str = "reports-Pass-9";

/// A server that wants SCRAM for every TCP login (TLS or not), with a
/// certificate signed by the test's CA.
fn scram_pg() -> (PgServer, TestCa) {
    let ca = TestCa::new("Login test CA");
    let cert = ca.issue(
        "pg-server",
        &["127.0.0.1", "localhost"],
        Some(ids("postgres")),
    );
    let hba = "local all all trust\n\
               hostssl all all 127.0.0.1/32 scram-sha-256\n\
               host all all 127.0.0.1/32 scram-sha-256\n";
    let pg = PgServer::start_with(
        &[
            "ssl=on".to_owned(),
            format!("ssl_cert_file={}", cert.cert.display()),
            format!("ssl_key_file={}", cert.key.display()),
            "password_encryption=scram-sha-256".to_owned(),
        ],
        Some(hba),
    );
    pg.sql(&format!(
        "CREATE ROLE {USER} LOGIN PASSWORD '{FIRST}';
         CREATE ROLE {OTHER_USER} LOGIN PASSWORD '{OTHER_PASSWORD}';
         GRANT ALL ON SCHEMA public TO {USER};
         CREATE TABLE secrets (v text); INSERT INTO secrets VALUES ('s3cr3t');
         GRANT SELECT ON secrets TO {USER};"
    ));
    (pg, ca)
}

fn write_secret(path: &Path, secret: &str, mode: u32) {
    std::fs::write(path, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn policy(port: u16, secret: &Path) -> String {
    format!(
        "version: 1
mode: enforce
default: allow
on_parse_error: allow
identities:
  etl: {{comm: psql}}
  bench: {{comm: pgbench}}
  driver: {{comm: pg-exec}}
targets:
  - name: pg
    protocol: postgres
    address: 127.0.0.1:{port}
    logins:
      - db_user: {USER}
        identities: [etl, bench, driver]
        password_file: {}
      - db_user: {OTHER_USER}
        identities: [bench]
        password_env: INTERCEPTOR_TEST_REPORTS_PASSWORD
rules:
  - name: no-secrets
    any_tables: [public.secrets]
    decision: deny
  - name: ddl-approval
    identities: [etl]
    kinds: [ddl]
    decision: approve
    approval: {{approvers: [root], timeout: 60s}}
",
        secret.display()
    )
}

/// `program` (psql or a copy of it under another name) in `cg`, with no
/// password anywhere: no PGPASSWORD, no .pgpass.
fn psql_as(
    cg: &TestCgroup,
    port: u16,
    program: &Path,
    user: &str,
    extra: &str,
    sql: &str,
) -> Output {
    run_any(
        cg.command(program.to_str().unwrap())
            .env_remove("PGPASSWORD")
            .env("PGPASSFILE", "/nonexistent")
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(format!(
                "host=127.0.0.1 port={port} user={user} dbname=postgres {extra}"
            ))
            .args(["-c", sql]),
    )
}

fn events(agent: &Agent, event: &str) -> Vec<Value> {
    agent
        .events()
        .into_iter()
        .filter(|e| e["event"] == event)
        .collect()
}

#[test]
fn brokered_logins_need_no_password_and_only_the_named_identities_get_them() {
    let (pg, _ca) = scram_pg();
    let cg = TestCgroup::new();
    let secrets = tempfile::tempdir().unwrap();
    let secret = secrets.path().join(USER);
    write_secret(&secret, FIRST, 0o600);
    let policy = policy(pg.port, &secret);
    // The env secret is the agent's own environment.
    let agent = Agent::start_wrapped(
        &policy,
        &cg,
        &[],
        &[],
        &[("INTERCEPTOR_TEST_REPORTS_PASSWORD", OTHER_PASSWORD.as_ref())],
    );
    let psql = pg_bin("psql");

    // Directly, without a password, the server says no.
    let direct = run_any(
        Command::new(&psql)
            .env("PGPASSFILE", "/nonexistent")
            .args(["-X", "-At", "-w", "-d"])
            .arg(format!(
                "host=127.0.0.1 port={} user={USER} dbname=postgres sslmode=disable",
                pg.port
            ))
            .args(["-c", "select 1"]),
    );
    assert!(!direct.status.success(), "{}", show(&direct));

    // Through the agent: plain client leg, TLS server leg (tls.server:
    // prefer finds it), so SCRAM-SHA-256-PLUS bound to the agent's leg.
    let out = psql_as(
        &cg,
        pg.port,
        &psql,
        USER,
        "sslmode=disable",
        "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()",
    );
    assert_eq!(
        text(&out.stdout).trim(),
        format!("{USER}|t"),
        "{}",
        show(&out)
    );
    // TLS on both legs.
    let out = psql_as(
        &cg,
        pg.port,
        &psql,
        USER,
        "sslmode=require",
        "select 'both-legs'",
    );
    assert_eq!(text(&out.stdout).trim(), "both-legs", "{}", show(&out));
    // The audit writer is asynchronous: wait for both records.
    wait_for("two session records", Duration::from_secs(5), || {
        events(&agent, "session").len() >= 2
    });
    let sessions = events(&agent, "session");
    let brokered: Vec<&Value> = sessions
        .iter()
        .filter(|s| s["login"] == "brokered")
        .collect();
    assert_eq!(brokered.len(), 2, "{sessions:?}");
    for s in &brokered {
        assert_eq!(s["login_entry"]["db_user"], USER, "{s}");
        assert_eq!(s["login_entry"]["method"], "SCRAM-SHA-256-PLUS", "{s}");
        assert!(
            s["login_entry"]["secret"]
                .as_str()
                .unwrap()
                .starts_with("file:"),
            "{s}"
        );
    }
    assert!(brokered[1]["tls"]["client"].is_object(), "{}", brokered[1]);

    // A denial on a brokered session.
    let out = psql_as(&cg, pg.port, &psql, USER, "", "select * from secrets");
    assert!(!out.status.success(), "{}", show(&out));
    assert!(text(&out.stderr).contains("no-secrets"), "{}", show(&out));
    assert!(!text(&out.stdout).contains("s3cr3t"), "{}", show(&out));

    // An approval on a brokered session: the statement waits until root
    // approves it (the workload runs as nobody: nobody approves their own
    // statements).
    let waiting = cg
        .command("setpriv")
        .env("HOME", "/nonexistent")
        .env("PGPASSFILE", "/nonexistent")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(&psql)
        .args(["-X", "-At", "-d"])
        .arg(format!(
            "host=127.0.0.1 port={} user={USER} dbname=postgres",
            pg.port
        ))
        .args(["-c", "create table held_one (v int)"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = agent.wait_pending_approval();
    let out = agent.cli(&["approvals", "approve", &id, "--reason", "login test"]);
    assert!(out.status.success(), "{}", show(&out));
    let out = wait_exit(waiting, Duration::from_secs(10));
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        pg.sql("select tableowner from pg_tables where tablename = 'held_one'")
            .trim(),
        USER
    );

    // Cancel still works: the workload's key is the server's own.
    let sleeper = cg
        .command(psql.to_str().unwrap())
        .env("PGPASSFILE", "/nonexistent")
        .args(["-X", "-At", "-d"])
        .arg(format!(
            "host=127.0.0.1 port={} user={USER} dbname=postgres",
            pg.port
        ))
        .args(["-c", "select pg_sleep(30)"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sleepers = || {
        pg.sql("select count(*) from pg_stat_activity where query like 'select pg_sleep%' and state = 'active'")
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    wait_for("pg_sleep on the server", Duration::from_secs(15), || {
        sleepers() == 1
    });
    // `identities` says the live psql logs in brokered.
    let identities = text(&agent.cli(&["identities"]).stdout);
    assert!(identities.contains("etl_rw (brokered)"), "{identities}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(sleeper.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = wait_exit(sleeper, Duration::from_secs(10));
    assert!(
        text(&out.stderr).contains("canceling statement due to user request"),
        "{}",
        show(&out)
    );

    // Another binary asking for the same user: 28000, audited.
    let bin = tempfile::tempdir().unwrap();
    let rogue = bin.path().join("rogue");
    std::fs::copy(&psql, &rogue).unwrap();
    let out = psql_as(&cg, pg.port, &rogue, USER, "", "select 1");
    assert!(!out.status.success(), "{}", show(&out));
    let err = text(&out.stderr);
    assert!(
        err.contains(USER) && err.contains("only for identity etl, bench, driver"),
        "{}",
        show(&out)
    );
    let refused = agent.wait_event("login_refused", |e| e["event"] == "login_refused");
    assert_eq!(refused["db_user"], USER, "{refused}");
    assert_eq!(refused["identity"]["comm"], "rogue", "{refused}");
    // psql is not `bench`: refused as `reports`; pgbench is, by env secret.
    let out = psql_as(&cg, pg.port, &psql, OTHER_USER, "", "select 1");
    assert!(
        text(&out.stderr).contains("only for identity bench"),
        "{}",
        show(&out)
    );
    let out = run_any(
        cg.command(pg_bin("pgbench").to_str().unwrap())
            .env("PGPASSFILE", "/nonexistent")
            .args(["-n", "-t", "5", "-f"])
            .arg(write_script(bin.path(), "select current_user;"))
            .args(["-h", "127.0.0.1", "-p"])
            .arg(pg.port.to_string())
            .args(["-U", OTHER_USER, "postgres"]),
    );
    assert!(out.status.success(), "{}", show(&out));

    // Rotation: the server's password and the file change; the next login
    // uses the new secret, with no reload.
    pg.sql(&format!("ALTER ROLE {USER} PASSWORD '{SECOND}'"));
    let out = psql_as(&cg, pg.port, &psql, USER, "", "select 'stale'");
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("the server refused the agent's login as \"etl_rw\"")
            && text(&out.stderr).contains("password authentication failed"),
        "{}",
        show(&out)
    );
    let failed = agent.wait_event("login_failed", |e| e["event"] == "login_failed");
    assert_eq!(failed["stage"], "server", "{failed}");
    assert_eq!(failed["code"], "28P01", "{failed}");
    write_secret(&secret, SECOND, 0o600);
    let out = psql_as(&cg, pg.port, &psql, USER, "", "select 'rotated'");
    assert_eq!(text(&out.stdout).trim(), "rotated", "{}", show(&out));

    // A secret file others can read is not used, and says why.
    write_secret(&secret, SECOND, 0o644);
    let out = psql_as(&cg, pg.port, &psql, USER, "", "select 1");
    assert!(
        text(&out.stderr).contains("readable by group or others"),
        "{}",
        show(&out)
    );
    let check = run_any(
        Command::new(agent_bin())
            .args(["policy", "check"])
            .arg(write_policy(bin.path(), &policy)),
    );
    assert!(!check.status.success(), "{}", show(&check));
    assert!(
        text(&check.stderr).contains("readable by group or others"),
        "{}",
        show(&check)
    );
    write_secret(&secret, SECOND, 0o600);

    // pgbench and tokio-postgres, no password: zero errors.
    run_ok(
        cg.command(pg_bin("pgbench").to_str().unwrap())
            .env("PGPASSFILE", "/nonexistent")
            .args(["-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p"])
            .arg(pg.port.to_string())
            .args(["-U", USER, "postgres"]),
    );
    let out = run_any(
        cg.command(pg_bin("pgbench").to_str().unwrap())
            .env("PGPASSFILE", "/nonexistent")
            .args([
                "-n",
                "-S",
                "-C",
                "-c",
                "2",
                "-j",
                "2",
                "-T",
                "3",
                "-h",
                "127.0.0.1",
                "-p",
            ])
            .arg(pg.port.to_string())
            .args(["-U", USER, "postgres"]),
    );
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        text(&out.stdout).contains("number of failed transactions: 0"),
        "{}",
        show(&out)
    );
    let exec = PathBuf::from(env!("CARGO_BIN_EXE_pg-exec"));
    let out = run_any(
        cg.command(exec.to_str().unwrap())
            .env("PGUSER", USER)
            .args(["127.0.0.1", &pg.port.to_string(), "cases"]),
    );
    assert!(out.status.success(), "{}", show(&out));
    assert!(text(&out.stdout).contains("ok"), "{}", show(&out));

    // The kill switch refuses brokered logins at once, in the kernel
    // (EPERM at connect).
    let out = agent.cli(&["block", "comm=psql", "--reason", "login test"]);
    assert!(out.status.success(), "{}", show(&out));
    let out = psql_as(&cg, pg.port, &psql, USER, "", "select 1");
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("Operation not permitted"),
        "{}",
        show(&out)
    );
    assert!(agent.cli(&["unblock", "comm=psql"]).status.success());

    // The secrets appear nowhere: not in the audit log, the agent's
    // diagnostics, status or the policy test output.
    let log = std::fs::read_to_string(&agent.audit_log).unwrap();
    let status = text(&agent.status().stdout);
    let diagnostics = agent.log();
    for secret in [FIRST, SECOND, OTHER_PASSWORD] {
        assert!(!log.contains(secret), "secret in the audit log");
        assert!(!diagnostics.contains(secret), "secret in the diagnostics");
        assert!(!status.contains(secret), "secret in status");
    }
}

fn write_script(dir: &Path, sql: &str) -> PathBuf {
    let p = dir.join("script.sql");
    std::fs::write(&p, sql).unwrap();
    p
}

fn write_policy(dir: &Path, policy: &str) -> PathBuf {
    let p = dir.join("policy.yaml");
    std::fs::write(&p, policy).unwrap();
    p
}

const MY_USER: &str = "etl_rw";
const MY_ED_USER: &str = "ed_rw";
const MY_ED_PASSWORD: &str = "ed-Pass-7";

fn mysql_logins_policy(port: u16, secret: &Path) -> String {
    format!(
        "version: 1
mode: enforce
default: allow
on_parse_error: allow
identities:
  etl: {{comm: mariadb}}
  bench: {{comm: sysbench}}
  driver: {{comm: mysql-driver}}
targets:
  - name: maria
    protocol: mysql
    address: 127.0.0.1:{port}
    logins:
      - db_user: {MY_USER}
        identities: [etl, bench, driver]
        password_file: {}
      - db_user: {MY_ED_USER}
        identities: [etl]
        password_env: INTERCEPTOR_TEST_ED_PASSWORD
rules:
  - name: no-secrets
    any_tables: [shop.secrets]
    decision: deny
  - name: ddl-approval
    identities: [etl]
    kinds: [ddl]
    decision: approve
    approval: {{approvers: [root], timeout: 60s}}
",
        secret.display()
    )
}

/// `mariadb` (or a copy under another name) in `cg` as `user`, with no
/// password: no `-p`, no option files.
fn mariadb_as(
    cg: &TestCgroup,
    port: u16,
    program: &Path,
    user: &str,
    extra: &[&str],
    sql: &str,
) -> Output {
    run_any(
        cg.command(program.to_str().unwrap())
            .args(["--no-defaults", "--protocol=tcp", "-h127.0.0.1"])
            .arg(format!("-P{port}"))
            .arg(format!("-u{user}"))
            .args(extra)
            .args(["-N", "-B", "-e", sql]),
    )
}

/// MariaDB: the agent logs in with mysql_native_password and ed25519
/// (an AuthSwitchRequest), over TLS and not; COM_CHANGE_USER is brokered
/// too; the same refusals, rotation and secrecy as PostgreSQL's.
#[test]
#[allow(clippy::too_many_lines)]
fn mysql_brokered_logins_native_ed25519_change_user_and_refusals() {
    use interceptor_tests::mysql::{MariaDb, sysbench_args};
    let ca = TestCa::new("Login test MariaDB CA");
    let cert = ca.issue("maria", &["127.0.0.1", "localhost"], Some(ids("mysql")));
    let db = MariaDb::start_with(&[
        format!("--ssl-cert={}", cert.cert.display()),
        format!("--ssl-key={}", cert.key.display()),
        format!("--ssl-ca={}", ca.cert.display()),
    ]);
    db.sql(&format!(
        "CREATE USER '{MY_USER}'@'%' IDENTIFIED BY '{FIRST}';
         GRANT ALL ON *.* TO '{MY_USER}'@'%';
         CREATE USER '{MY_ED_USER}'@'%' IDENTIFIED VIA ed25519 USING PASSWORD('{MY_ED_PASSWORD}');
         GRANT SELECT ON shop.* TO '{MY_ED_USER}'@'%';"
    ));
    let cg = TestCgroup::new();
    let secrets = tempfile::tempdir().unwrap();
    let secret = secrets.path().join(MY_USER);
    write_secret(&secret, FIRST, 0o600);
    let policy = mysql_logins_policy(db.port, &secret);
    let agent = Agent::start_wrapped(
        &policy,
        &cg,
        &[],
        &[],
        &[("INTERCEPTOR_TEST_ED_PASSWORD", MY_ED_PASSWORD.as_ref())],
    );
    let mariadb = PathBuf::from(
        run_ok(Command::new("sh").args(["-c", "command -v mariadb"]))
            .trim()
            .to_owned(),
    );

    // Directly, without a password: 1045.
    let direct = run_any(
        Command::new(&mariadb)
            .args(["--no-defaults", "--protocol=tcp", "-h127.0.0.1"])
            .arg(format!("-P{}", db.port))
            .arg(format!("-u{MY_USER}"))
            .args(["-e", "select 1"]),
    );
    assert!(text(&direct.stderr).contains("1045"), "{}", show(&direct));

    // Through the agent, no password: native, then ed25519, each plain
    // and with TLS on both legs.
    let check = "select current_user(); show session status like 'Ssl_version'";
    for (user, extra) in [
        (MY_USER, &[][..]),
        (MY_USER, &["--ssl"][..]),
        (MY_ED_USER, &[][..]),
        (MY_ED_USER, &["--ssl"][..]),
    ] {
        let out = mariadb_as(&cg, db.port, &mariadb, user, extra, check);
        assert!(out.status.success(), "{user} {extra:?}: {}", show(&out));
        let stdout = text(&out.stdout);
        assert!(stdout.starts_with(&format!("{user}@%")), "{}", show(&out));
        // The server leg is TLS either way (tls.server: prefer).
        assert!(stdout.contains("TLSv1.3"), "{}", show(&out));
    }
    wait_for("four session records", Duration::from_secs(5), || {
        events(&agent, "session").len() >= 4
    });
    let sessions = events(&agent, "session");
    let methods: Vec<&str> = sessions
        .iter()
        .map(|s| {
            assert_eq!(s["login"], "brokered", "{s}");
            s["login_entry"]["method"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        methods,
        [
            "mysql_native_password",
            "mysql_native_password",
            "client_ed25519",
            "client_ed25519"
        ],
        "{sessions:?}"
    );
    assert!(sessions[1]["tls"]["client"].is_object(), "{}", sessions[1]);
    assert!(
        sessions[2]["login_entry"]["secret"]
            .as_str()
            .unwrap()
            .starts_with("env:"),
        "{}",
        sessions[2]
    );

    // A denial on a brokered session.
    let out = mariadb_as(
        &cg,
        db.port,
        &mariadb,
        MY_USER,
        &[],
        "select secret from shop.secrets",
    );
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("1142") && text(&out.stderr).contains("no-secrets"),
        "{}",
        show(&out)
    );
    assert!(!text(&out.stdout).contains("hunter2"), "{}", show(&out));

    // An approval on a brokered session, from a workload running as nobody.
    let waiting = cg
        .command("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(&mariadb)
        .args(["--no-defaults", "--protocol=tcp", "-h127.0.0.1"])
        .arg(format!("-P{}", db.port))
        .arg(format!("-u{MY_USER}"))
        .args(["-e", "create table shop.held_one (v int)"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = agent.wait_pending_approval();
    let out = agent.cli(&["approvals", "approve", &id, "--reason", "login test"]);
    assert!(out.status.success(), "{}", show(&out));
    let out = wait_exit(waiting, Duration::from_secs(10));
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        db.sql("select count(*) from information_schema.tables where table_name = 'held_one'")
            .trim(),
        "1"
    );

    // Another binary asking for the same user: 1045, audited.
    let bin = tempfile::tempdir().unwrap();
    let rogue = bin.path().join("rogue");
    std::fs::copy(&mariadb, &rogue).unwrap();
    let out = mariadb_as(&cg, db.port, &rogue, MY_USER, &[], "select 1");
    assert!(!out.status.success(), "{}", show(&out));
    let err = text(&out.stderr);
    assert!(
        err.contains("1045")
            && err.contains(MY_USER)
            && err.contains("only for identity etl, bench, driver"),
        "{}",
        show(&out)
    );
    let refused = agent.wait_event("login_refused", |e| e["event"] == "login_refused");
    assert_eq!(refused["db_user"], MY_USER, "{refused}");
    assert_eq!(refused["identity"]["comm"], "rogue", "{refused}");
    // Even with the right password: the entry binds the user to identities.
    let out = mariadb_as(
        &cg,
        db.port,
        &rogue,
        MY_USER,
        &[&format!("-p{FIRST}")],
        "select 1",
    );
    assert!(text(&out.stderr).contains("1045"), "{}", show(&out));

    // Rotation: a wrong secret is the server's 1045, said and audited;
    // the rotated file is used by the next login.
    db.sql(&format!(
        "ALTER USER '{MY_USER}'@'%' IDENTIFIED BY '{SECOND}'"
    ));
    let out = mariadb_as(&cg, db.port, &mariadb, MY_USER, &[], "select 'stale'");
    assert!(!out.status.success(), "{}", show(&out));
    let err = text(&out.stderr);
    assert!(
        err.contains("1045")
            && err.contains("the server refused the agent's login as \"etl_rw\"")
            && err.contains("Access denied"),
        "{}",
        show(&out)
    );
    let failed = agent.wait_event("login_failed", |e| e["event"] == "login_failed");
    assert_eq!(failed["stage"], "server", "{failed}");
    assert_eq!(failed["code"], "1045", "{failed}");
    write_secret(&secret, SECOND, 0o600);
    let out = mariadb_as(&cg, db.port, &mariadb, MY_USER, &[], "select 'rotated'");
    assert_eq!(text(&out.stdout).trim(), "rotated", "{}", show(&out));

    // A secret file others can read is not used.
    write_secret(&secret, SECOND, 0o644);
    let out = mariadb_as(&cg, db.port, &mariadb, MY_USER, &[], "select 1");
    assert!(
        text(&out.stderr).contains("readable by group or others"),
        "{}",
        show(&out)
    );
    write_secret(&secret, SECOND, 0o600);

    // mysql_async with an empty password: prepared statements, 16 MiB
    // payloads, COM_RESET_CONNECTION and a brokered COM_CHANGE_USER.
    let driver = PathBuf::from(env!("CARGO_BIN_EXE_mysql-driver"));
    let out =
        run_any(
            cg.command(driver.to_str().unwrap())
                .args([&db.port.to_string(), MY_USER, ""]),
        );
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        text(&out.stdout).contains("ok reset-and-change-user"),
        "{}",
        show(&out)
    );
    // Its login and its COM_CHANGE_USER were both the agent's.
    wait_for(
        "the driver's two session records",
        Duration::from_secs(5),
        || {
            events(&agent, "session")
                .iter()
                .filter(|s| s["identity"]["comm"] == "mysql-driver")
                .count()
                >= 2
        },
    );
    for s in events(&agent, "session")
        .iter()
        .filter(|s| s["identity"]["comm"] == "mysql-driver")
    {
        assert_eq!(s["login"], "brokered", "{s}");
        assert_eq!(s["login_entry"]["method"], "mysql_native_password", "{s}");
    }

    // sysbench, no password: zero errors.
    run_ok(
        Command::new("sysbench")
            .arg("oltp_point_select")
            .args(sysbench_args(&db))
            .args(["--tables=1", "--table-size=1000", "prepare"]),
    );
    let out =
        run_ok(
            cg.command("sysbench")
                .arg("oltp_point_select")
                .args(sysbench_args(&db).into_iter().filter(|a| {
                    !a.starts_with("--mysql-user") && !a.starts_with("--mysql-password")
                }))
                .arg(format!("--mysql-user={MY_USER}"))
                .args([
                    "--tables=1",
                    "--table-size=1000",
                    "--threads=2",
                    "--events=2000",
                    "--time=0",
                    "run",
                ]),
        );
    let line = |key: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("no {key:?} in sysbench output:\n{out}"))
            .to_owned()
    };
    assert!(line("ignored errors:").contains(" 0 "), "{out}");
    assert!(line("reconnects:").contains(" 0 "), "{out}");

    // The kill switch refuses brokered logins at once, in the kernel.
    let out = agent.cli(&["block", "comm=mariadb", "--reason", "login test"]);
    assert!(out.status.success(), "{}", show(&out));
    let out = mariadb_as(&cg, db.port, &mariadb, MY_USER, &[], "select 1");
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("2002") || text(&out.stderr).contains("Can't connect"),
        "{}",
        show(&out)
    );
    assert!(agent.cli(&["unblock", "comm=mariadb"]).status.success());

    // The secrets appear nowhere.
    let log = std::fs::read_to_string(&agent.audit_log).unwrap();
    let status = text(&agent.status().stdout);
    let diagnostics = agent.log();
    for secret in [FIRST, SECOND, MY_ED_PASSWORD] {
        assert!(!log.contains(secret), "secret in the audit log");
        assert!(!diagnostics.contains(secret), "secret in the diagnostics");
        assert!(!status.contains(secret), "secret in status");
    }
}
