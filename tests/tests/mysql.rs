//! MySQL and MariaDB through the agent: a real MariaDB server, real
//! clients (the `mariadb` CLI, sysbench, mysql_async) in a test cgroup
//! whose connections the kernel programs redirect, and hostile peers on
//! both sides.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    process::Output,
    thread::JoinHandle,
    time::Duration,
};

use interceptor_tests::{
    Agent, TestCgroup, free_port,
    mysql::{
        APP_PASSWORD, APP_USER, ED_PASSWORD, ED_USER, MariaDb, mariadb_in, mariadb_script_in,
        mysql_policy, start_agent_with, sysbench_args, sysbench_in,
    },
    run_any, run_ok,
};
use serde_json::Value;

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

fn queries(agent: &Agent) -> Vec<Value> {
    settle(agent);
    agent
        .events()
        .into_iter()
        .filter(|e| e["event"] == "query")
        .collect()
}

/// Waits until every connection so far has its `disconnect` event: a
/// connection's events are written in order, so all of them are there.
fn settle(agent: &Agent) {
    let start = std::time::Instant::now();
    loop {
        let evs = agent.events();
        let n = |kind: &str| evs.iter().filter(|e| e["event"] == kind).count();
        if n("connect") == n("disconnect") {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "connections still open:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_alive(agent: &Agent) {
    let st = agent.status();
    assert!(st.status.success(), "agent status failed:\n{}", agent.log());
}

/// The `mariadb` client at the prompt: allowed and denied statements,
/// `ERROR 1142 (42000)`, and the session keeps working after each denial;
/// `use` (COM_INIT_DB) changes how unqualified names resolve.
#[test]
fn mariadb_cli_allowed_and_denied() {
    let db = MariaDb::start();
    let cg = TestCgroup::new();
    let policy = mysql_policy(
        db.port,
        "default: deny
rules:
  - name: items-read
    kinds: [select]
    tables: [shop.items]
    decision: allow
  - name: switch-database
    kinds: [session]
    decision: allow
  - name: no-secrets
    any_tables: [shop.secrets]
    decision: deny
    message: secrets stay in the vault
  - name: deletes-need-approval
    kinds: [delete]
    decision: approve
",
    );
    let agent = start_agent_with(&policy, &cg, &[]);
    let args = db.client_args(APP_USER, APP_PASSWORD, "shop");
    let out = mariadb_script_in(
        &cg,
        &args,
        "SELECT name FROM items WHERE id = 1;
SELECT secret FROM secrets;
SELECT name FROM items WHERE id = 2;
INSERT INTO log (note) VALUES ('nope');
DELETE FROM items WHERE id = 1;
SELECT name FROM items WHERE id = 3;
use sbtest
SELECT name FROM items WHERE id = 3;
use shop
SELECT 'back', name FROM items WHERE id = 3;
",
    );
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(stdout, "apple\npear\nfig\nback\tfig\n", "{}", show(&out));
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("ERROR")).collect();
    assert_eq!(errors.len(), 4, "{}", show(&out));
    assert!(
        errors.iter().all(|l| l.starts_with("ERROR 1142 (42000)")),
        "{}",
        show(&out)
    );
    assert!(
        errors[0].contains("no-secrets") && errors[0].contains("decision"),
        "{}",
        errors[0]
    );
    assert!(errors[1].contains("decision"), "{}", errors[1]);
    // A rule that holds for approval but names no approvers: refused at
    // once, and says so.
    assert!(
        errors[2].contains("deletes-need-approval") && errors[2].contains("approval"),
        "{}",
        errors[2]
    );
    // After `use sbtest`, `items` is sbtest.items, which no rule allows.
    assert!(errors[3].contains("decision"), "{}", errors[3]);
    assert_eq!(db.sql("SELECT COUNT(*) FROM shop.log").trim(), "0");
    assert_eq!(db.sql("SELECT COUNT(*) FROM shop.items").trim(), "3");

    // Every denial is audited with the decision id the client saw.
    let denied: Vec<Value> = queries(&agent)
        .into_iter()
        .filter(|e| e["decision"] != "allow")
        .collect();
    assert_eq!(denied.len(), 4, "{denied:?}");
    assert_eq!(denied[2]["decision"], "approve");
    assert_eq!(denied[0]["rule"], "no-secrets");
    for (ev, line) in denied.iter().zip(&errors) {
        let id = ev["decision_id"].as_str().unwrap();
        assert!(line.contains(id), "{line} lacks {id}");
        assert_eq!(ev["enforced"], true);
        assert_eq!(ev["db_user"], APP_USER);
    }
    assert_eq!(denied[3]["database"], "sbtest", "{}", denied[3]);
    let session = agent.wait_event("session", |e| e["event"] == "session");
    assert_eq!(session["db_user"], APP_USER);
    assert_eq!(session["database"], "shop");
    assert_alive(&agent);
}

/// Authentication relayed untouched: `mysql_native_password`, the
/// ed25519 plugin reached through an AuthSwitchRequest, and a wrong
/// password, which the server refuses as it would direct.
#[test]
fn authentication_paths() {
    let db = MariaDb::start();
    let cg = TestCgroup::new();
    let agent = start_agent_with(&mysql_policy(db.port, "default: allow\n"), &cg, &[]);
    let out = mariadb_in(
        &cg,
        &db.client_args(ED_USER, ED_PASSWORD, "shop"),
        "SELECT CURRENT_USER(), name FROM items WHERE id = 2",
    );
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(text(&out.stdout), "ed@%\tpear\n");
    let out = mariadb_in(&cg, &db.client_args(APP_USER, "wrong", "shop"), "SELECT 1");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("ERROR 1045 (28000)"),
        "{}",
        show(&out)
    );
    // Clients that would use TLS or compression carry on without.
    let mut args = db.client_args(APP_USER, APP_PASSWORD, "shop");
    args.push("--compress".into());
    let out = mariadb_in(&cg, &args, "SELECT name FROM items WHERE id = 1");
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(text(&out.stdout), "apple\n");
    settle(&agent);
    let eds = agent
        .events()
        .into_iter()
        .filter(|e| e["event"] == "session" && e["db_user"] == ED_USER)
        .count();
    assert_eq!(eds, 1);
    assert_alive(&agent);
}

/// sysbench through the agent: prepared and unprepared point selects and
/// the read-write mix, with zero errors.
#[test]
fn sysbench_through_the_agent() {
    let db = MariaDb::start();
    let cg = TestCgroup::new();
    let policy = mysql_policy(
        db.port,
        "default: allow
rules:
  - name: dangerous
    flags: [file_access, program_exec, admin]
    decision: deny
",
    );
    let agent = start_agent_with(&policy, &cg, &[]);
    let common = ["--tables=2", "--table-size=2000"];
    // The tables are set up directly (this process is in no test cgroup):
    // sysbench's bulk INSERTs of thousands of rows are over the policy
    // engine's token limit, and setting up is not what is measured.
    run_ok(
        std::process::Command::new("sysbench")
            .arg("oltp_read_write")
            .args(sysbench_args(&db))
            .args(common)
            .arg("prepare"),
    );
    let runs: [(&str, &[&str]); 3] = [
        (
            "oltp_point_select",
            &["--db-ps-mode=auto", "--threads=4", "--events=20000"],
        ),
        (
            "oltp_point_select",
            &["--db-ps-mode=disable", "--threads=4", "--events=20000"],
        ),
        ("oltp_read_write", &["--threads=1", "--events=300"]),
    ];
    for (test, args) in runs {
        let out = run_ok(
            sysbench_in(&cg, &db, test, &common)
                .args(args)
                .args(["--time=0", "run"]),
        );
        let line = |key: &str| {
            out.lines()
                .find(|l| l.trim_start().starts_with(key))
                .unwrap_or_else(|| panic!("no {key:?} in sysbench output:\n{out}"))
                .to_owned()
        };
        assert!(
            line("ignored errors:").contains(" 0 "),
            "{test} {args:?}:\n{out}"
        );
        assert!(
            line("reconnects:").contains(" 0 "),
            "{test} {args:?}:\n{out}"
        );
    }
    settle(&agent);
    let evs = agent.events();
    let connects = evs
        .iter()
        .filter(|e| e["event"] == "connect" && e["identity"]["comm"] == "sysbench")
        .count();
    assert!(connects >= 6, "{connects} sysbench connections");
    assert!(
        !evs.iter()
            .any(|e| e["event"] == "query" && e["decision"] == "deny"),
        "a sysbench statement was denied"
    );
    assert!(
        !evs.iter().any(|e| e["event"] == "protocol_error"),
        "protocol errors: {:?}",
        evs.iter()
            .filter(|e| e["event"] == "protocol_error")
            .collect::<Vec<_>>()
    );
    assert_alive(&agent);
}

/// A Rust driver (mysql_async): server-side prepared statements, a refused
/// prepare, multi-statements with a denied part, payloads over 16 MiB, a
/// transaction with a denial inside, reset and change-user.
#[test]
fn driver_cases_through_the_agent() {
    let db = MariaDb::start();
    let cg = TestCgroup::new();
    let policy = mysql_policy(
        db.port,
        "default: allow
rules:
  - name: no-secrets
    any_tables: [shop.secrets]
    decision: deny
",
    );
    let agent = start_agent_with(&policy, &cg, &[]);
    let out = run_any(cg.command(env!("CARGO_BIN_EXE_mysql-driver")).args([
        db.port.to_string(),
        APP_USER.to_owned(),
        APP_PASSWORD.to_owned(),
    ]));
    assert!(
        out.status.success(),
        "{}\nagent:\n{}",
        show(&out),
        agent.log()
    );
    let stdout = text(&out.stdout);
    for case in [
        "connect",
        "prepared",
        "prepare-denied",
        "multi-statement",
        "large-payload",
        "transaction",
        "reset-and-change-user",
        "done",
    ] {
        assert!(stdout.contains(&format!("ok {case}\n")), "{stdout}");
    }
    let qs = queries(&agent);
    // The prepared statement was decided once, at prepare, not per execute.
    let prepared = qs
        .iter()
        .filter(|e| e["query"] == "SELECT id, name FROM items WHERE id > ? ORDER BY id")
        .count();
    assert_eq!(prepared, 1, "{qs:?}");
    // The 17 MiB statement was analysed and its audit text truncated.
    let big = qs
        .iter()
        .find(|e| {
            e["query"]
                .as_str()
                .is_some_and(|q| q.starts_with("INSERT INTO blobs VALUES (1, 'xxx"))
        })
        .expect("no audit event for the 17 MiB insert");
    assert!(big["query"].as_str().unwrap().len() <= 4096);
    assert_eq!(big["decision"], "allow");
    let denials = qs.iter().filter(|e| e["decision"] == "deny").count();
    assert!(denials >= 4, "{denials} denials");
    // change-user recorded the new session facts.
    agent.wait_event("session after change-user", |e| {
        e["event"] == "session" && e["database"] == "sbtest"
    });
    assert_eq!(
        db.sql("SELECT COUNT(*) FROM shop.log WHERE note = 'multi'")
            .trim(),
        "0"
    );
    assert!(
        !agent
            .events()
            .iter()
            .any(|e| e["event"] == "protocol_error"),
        "{}",
        agent.log()
    );
    assert_alive(&agent);
}

/// LOAD DATA LOCAL INFILE: the file flows when the policy allows the
/// statement; the statement is refused when the policy denies file access.
#[test]
fn local_infile_follows_the_policy() {
    let db = MariaDb::start();
    let cg = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes.csv");
    std::fs::write(&file, "one\ntwo\nthree\n").unwrap();
    let load = format!(
        "LOAD DATA LOCAL INFILE '{}' INTO TABLE log (note)",
        file.display()
    );
    let mut args = db.client_args(APP_USER, APP_PASSWORD, "shop");
    args.push("--local-infile=1".into());
    {
        let agent = start_agent_with(&mysql_policy(db.port, "default: allow\n"), &cg, &[]);
        let out = mariadb_in(&cg, &args, &load);
        assert!(out.status.success(), "{}", show(&out));
        assert_eq!(db.sql("SELECT COUNT(*) FROM shop.log").trim(), "3");
        let ev = agent.wait_event("local_infile", |e| e["event"] == "local_infile");
        assert_eq!(ev["decision"], "allow", "{ev}");
    }
    let agent = start_agent_with(
        &mysql_policy(
            db.port,
            "default: allow
rules:
  - name: no-files
    flags: [file_access]
    decision: deny
",
        ),
        &cg,
        &[],
    );
    let out = mariadb_in(&cg, &args, &load);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("ERROR 1142 (42000)") && text(&out.stderr).contains("no-files"),
        "{}",
        show(&out)
    );
    assert_eq!(db.sql("SELECT COUNT(*) FROM shop.log").trim(), "3");
    assert_alive(&agent);
}

// ---------------------------------------------------------------------------
// Hostile peers.

/// A hand-written MySQL client (run inside the cgroup): one scenario per
/// run, `PASS <name>` when the agent answered as it should.
const RAW_CLIENT: &str = r#"
import socket, struct, sys
port, scenario = int(sys.argv[1]), sys.argv[2]

def pkt(seq, payload):
    return struct.pack('<I', len(payload))[:3] + bytes([seq]) + payload

def exact(s, n):
    b = b''
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError('closed after %r' % b)
        b += c
    return b

def read(s):
    h = exact(s, 4)
    return h[3], exact(s, h[0] | h[1] << 8 | h[2] << 16)

def closed(s):
    s.settimeout(10)
    try:
        return s.recv(1) == b''
    except ConnectionResetError:
        return True

def err(p):
    assert p[0] == 0xff, p
    return struct.unpack('<H', p[1:3])[0], p[3:].decode('utf8', 'replace')

CAPS = 0x1 | 0x8 | 0x200 | 0x2000 | 0x8000 | 0x20000 | 0x80000

def login(s, user=b'nopw'):
    seq, g = read(s)
    assert seq == 0 and g[0] == 10, g
    resp = struct.pack('<IIB', CAPS, 1 << 24, 33) + bytes(23)
    resp += user + b'\0' + b'\0' + b'shop\0' + b'mysql_native_password\0'
    s.sendall(pkt(1, resp))
    seq, ok = read(s)
    assert (seq, ok[0]) == (2, 0), (seq, ok)

def ping(s):
    s.sendall(pkt(0, b'\x0e'))
    seq, p = read(s)
    assert (seq, p[0]) == (1, 0), (seq, p)

s = socket.create_connection(('127.0.0.1', port))
if scenario == 'garbage-hello':
    read(s)
    s.sendall(b'GET / HTTP/1.1\r\nHost: db\r\n\r\n')
    seq, p = read(s)
    code, msg = err(p)
    assert code == 1156 and 'interceptor' in msg, (code, msg)
    assert closed(s)
    print('PASS', scenario)
    sys.exit(0)
login(s)
if scenario == 'ping':
    ping(s)
elif scenario == 'empty':
    s.sendall(pkt(0, b''))
    code, msg = err(read(s)[1])
    assert code == 1158, (code, msg)
    assert closed(s)
elif scenario == 'sequence':
    s.sendall(pkt(5, b'\x03SELECT 1'))
    seq, p = read(s)
    code, msg = err(p)
    assert (seq, code) == (6, 1156) and 'sequence id 5' in msg, (seq, code, msg)
    assert closed(s)
elif scenario == 'oversize':
    s.sendall(b'\xff\xff\xff\x00')
    code, msg = err(read(s)[1])
    assert code == 1153 and 'limit' in msg, (code, msg)
    assert closed(s)
elif scenario == 'short-execute':
    s.sendall(pkt(0, b'\x17\x01'))
    code, msg = err(read(s)[1])
    assert code == 1158, (code, msg)
    assert closed(s)
elif scenario == 'unknown-statement':
    s.sendall(pkt(0, b'\x17' + struct.pack('<IBI', 42, 0, 1)))
    seq, p = read(s)
    code, msg = err(p)
    assert (seq, code) == (1, 1142) and 'not allowed' in msg, (seq, code, msg)
    assert p[3:9] == b'#42000', p
    # Long data for it goes nowhere (it has no reply), the session goes on.
    s.sendall(pkt(0, b'\x18' + struct.pack('<IH', 42, 0) + b'data'))
    ping(s)
elif scenario == 'unknown-command':
    s.sendall(pkt(0, b'\x12' + struct.pack('<IHI', 4, 0, 1) + b'binlog.000001'))
    seq, p = read(s)
    code, msg = err(p)
    assert (seq, code) == (1, 1142) and 'COM_BINLOG_DUMP' in msg, (seq, code, msg)
    ping(s)
elif scenario == 'commands':
    # Replies of every shape, classic EOF packets (no DEPRECATE_EOF).
    s.sendall(pkt(0, b'\x09'))
    seq, p = read(s)
    assert seq == 1 and p.startswith(b'Uptime'), p
    s.sendall(pkt(0, b'\x04items\0'))
    kinds = [read(s)[1][0] for _ in range(3)]
    assert kinds == [3, 3, 0xfe], kinds
    s.sendall(pkt(0, b'\x02shop'))
    assert read(s)[1][0] == 0
    s.sendall(pkt(0, b'\x03SELECT name FROM items WHERE id = 1'))
    got = [read(s) for _ in range(5)]
    assert [g[0] for g in got] == [1, 2, 3, 4, 5], got
    assert got[3][1] == b'\x05apple', got
    s.sendall(pkt(0, b'\x16SELECT ? + 1'))
    seq, ok = read(s)
    assert ok[0] == 0, ok
    stmt, cols, params = struct.unpack('<IHH', ok[1:9])
    assert (cols, params) == (1, 1), ok
    kinds = [read(s)[1][0] for _ in range(4)]
    assert kinds[1] == 0xfe and kinds[3] == 0xfe, kinds
    execute = b'\x17' + struct.pack('<IBI', stmt, 0, 1) + b'\x00\x01\x08\x00' + struct.pack('<q', 41)
    s.sendall(pkt(0, execute))
    got = [read(s)[1] for _ in range(5)]
    assert got[0] == b'\x01' and got[2][0] == 0xfe and got[4][0] == 0xfe, got
    assert got[3][0] == 0 and got[3][2:] == struct.pack('<q', 42), got
    # A read-only cursor: the execute ends after the column definitions,
    # rows come with COM_STMT_FETCH.
    s.sendall(pkt(0, b'\x16SELECT name FROM items WHERE id < ? ORDER BY id'))
    seq, ok = read(s)
    assert ok[0] == 0, ok
    cur = struct.unpack('<I', ok[1:5])[0]
    kinds = [read(s)[1][0] for _ in range(4)]
    assert kinds[1] == 0xfe and kinds[3] == 0xfe, kinds
    s.sendall(pkt(0, b'\x17' + struct.pack('<IBI', cur, 1, 1) + b'\x00\x01\x08\x00' + struct.pack('<q', 3)))
    got = [read(s)[1] for _ in range(3)]
    assert got[0] == b'\x01' and got[2][0] == 0xfe and got[2][3] & 0x40, got
    s.sendall(pkt(0, b'\x1c' + struct.pack('<II', cur, 1)))
    got = [read(s)[1] for _ in range(2)]
    assert got[0] == b'\x00\x00\x05apple' and got[1][0] == 0xfe, got
    s.sendall(pkt(0, b'\x1c' + struct.pack('<II', cur, 5)))
    got = [read(s)[1] for _ in range(2)]
    assert got[0] == b'\x00\x00\x04pear' and got[1][0] == 0xfe, got
    s.sendall(pkt(0, b'\x1a' + struct.pack('<I', cur)))
    assert read(s)[1][0] == 0
    s.sendall(pkt(0, b'\x19' + struct.pack('<I', cur)))
    s.sendall(pkt(0, b'\x1c' + struct.pack('<II', cur, 1)))
    code, msg = err(read(s)[1])
    assert code == 1142, (code, msg)
    s.sendall(pkt(0, b'\x19' + struct.pack('<I', stmt)))
    s.sendall(pkt(0, execute))
    code, msg = err(read(s)[1])
    assert code == 1142 and 'not allowed' in msg, (code, msg)
    s.sendall(pkt(0, b'\x1b\x00\x00'))
    assert read(s)[1][0] in (0, 0xfe)
    s.sendall(pkt(0, b'\x1f'))
    assert read(s)[1][0] == 0
    ping(s)
elif scenario == 'mid-packet':
    s.sendall(b'\x64\x00\x00\x00\x03SELECT')
    s.close()
else:
    raise SystemExit('unknown scenario ' + scenario)
print('PASS', scenario)
"#;

fn write_packet(s: &mut TcpStream, seq: u8, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap().to_le_bytes();
    let mut p = len[..3].to_vec();
    p.push(seq);
    p.extend_from_slice(payload);
    s.write_all(&p).unwrap();
}

fn read_packet(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h).ok()?;
    let len = usize::from(h[0]) | usize::from(h[1]) << 8 | usize::from(h[2]) << 16;
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).ok()?;
    Some((h[3], p))
}

/// A protocol-10 greeting offering TLS and compression (which the agent
/// must take out) with `plugin`.
fn greeting(plugin: &str) -> Vec<u8> {
    let mut g = vec![10];
    g.extend_from_slice(b"5.5.5-10.11.0-MariaDB-fake\0");
    g.extend_from_slice(&77u32.to_le_bytes());
    g.extend_from_slice(b"12345678\0");
    let caps: u32 = 0x1 | 0x8 | 0x20 | 0x80 | 0x200 | 0x800 | 0x2000 | 0x8000 | 0x000f_0000;
    g.extend_from_slice(&caps.to_le_bytes()[..2]);
    g.push(33);
    g.extend_from_slice(&2u16.to_le_bytes());
    g.extend_from_slice(&caps.to_le_bytes()[2..]);
    g.push(21);
    g.extend_from_slice(&[0; 10]);
    g.extend_from_slice(b"abcdefghijkl\0");
    g.extend_from_slice(plugin.as_bytes());
    g.push(0);
    g
}

const OK: &[u8] = &[0, 0, 0, 2, 0, 0, 0];

/// A fake server: one thread answering `conns` connections with `serve`,
/// which says what it saw.
fn fake_server(
    conns: usize,
    serve: impl Fn(&mut TcpStream) -> String + Send + 'static,
) -> (u16, JoinHandle<Vec<String>>) {
    let port = free_port();
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let h = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for _ in 0..conns {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            seen.push(serve(&mut s));
        }
        seen
    });
    (port, h)
}

/// Reads the client's handshake response (through the agent) and
/// accepts it; says whether TLS and compression were taken out.
fn accept_login(s: &mut TcpStream, plugin: &str) -> String {
    write_packet(s, 0, &greeting(plugin));
    let Some((1, resp)) = read_packet(s) else {
        return "no handshake response".into();
    };
    let caps = u32::from_le_bytes(resp[..4].try_into().unwrap());
    if caps & (0x800 | 0x20) != 0 {
        return format!("capabilities not adjusted: {caps:#x}");
    }
    String::new()
}

/// Scripted authentication exchanges (caching_sha2_password's fast and
/// full paths, an AuthSwitchRequest) between a hand-written client and a
/// fake server: the agent must relay every byte.
const AUTH_CLIENT: &str = r#"
import socket, struct, sys
port, mode = int(sys.argv[1]), sys.argv[2]
def pkt(seq, payload):
    return struct.pack('<I', len(payload))[:3] + bytes([seq]) + payload
def exact(s, n):
    b = b''
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError(b)
        b += c
    return b
def read(s):
    h = exact(s, 4)
    return h[3], exact(s, h[0] | h[1] << 8 | h[2] << 16)
s = socket.create_connection(('127.0.0.1', port))
seq, g = read(s)
ver_end = g.index(b'\0', 1)
caps = struct.unpack('<H', g[ver_end + 14:ver_end + 16])[0]
# Compression cleared; TLS offered by the agent itself (it terminates it).
assert caps & 0x800 and caps & 0x20 == 0, hex(caps)
# Asks for TLS and compression in a full response: the agent clears both.
CAPS = 0x1 | 0x8 | 0x20 | 0x200 | 0x800 | 0x8000 | 0x80000 | 0x200000
resp = struct.pack('<IIB', CAPS, 1 << 24, 33) + bytes(23) + b'app\0'
resp += bytes([32]) + bytes(range(32)) + b'shop\0caching_sha2_password\0'
s.sendall(pkt(1, resp))
seq, p = read(s)
if mode == 'fast':
    assert (seq, p) == (2, b'\x01\x03'), (seq, p)
    seq, p = read(s)
    assert (seq, p[0]) == (3, 0), (seq, p)
elif mode == 'full':
    assert (seq, p) == (2, b'\x01\x04'), (seq, p)
    s.sendall(pkt(3, b'\x02'))
    seq, p = read(s)
    assert seq == 4 and p.startswith(b'\x01-----BEGIN PUBLIC KEY-----'), (seq, p)
    s.sendall(pkt(5, bytes(i % 256 for i in range(256))))
    seq, p = read(s)
    assert (seq, p[0]) == (6, 0), (seq, p)
elif mode == 'switch':
    assert seq == 2 and p.startswith(b'\xfemysql_native_password\0'), (seq, p)
    s.sendall(pkt(3, bytes(range(100, 120))))
    seq, p = read(s)
    assert (seq, p[0]) == (4, 0), (seq, p)
s.sendall(pkt(0, b'\x03SELECT 1'))
seq, p = read(s)
assert (seq, p) == (1, b'\x01'), (seq, p)
seq, p = read(s)
assert seq == 2 and p.startswith(b'\x03def'), (seq, p)
seq, p = read(s)
assert (seq, p[0]) == (3, 0xfe), (seq, p)
seq, p = read(s)
assert (seq, p) == (4, b'\x011'), (seq, p)
seq, p = read(s)
assert (seq, p[0]) == (5, 0xfe), (seq, p)
s.sendall(pkt(0, b'\x01'))
print('PASS', mode)
"#;

/// Serves one scripted authentication (`mode`) and then `SELECT 1`.
fn auth_server(s: &mut TcpStream, mode: &str) -> String {
    let problem = accept_login(s, "caching_sha2_password");
    if !problem.is_empty() {
        return problem;
    }
    let expect = |s: &mut TcpStream, seq: u8, want: &[u8]| match read_packet(s) {
        Some((got_seq, got)) if got_seq == seq && got == want => String::new(),
        other => format!("expected {seq}:{want:?}, got {other:?}"),
    };
    let problem = match mode {
        "fast" => {
            write_packet(s, 2, &[1, 3]);
            write_packet(s, 3, OK);
            String::new()
        }
        "full" => {
            write_packet(s, 2, &[1, 4]);
            let mut p = expect(s, 3, &[2]);
            write_packet(
                s,
                4,
                b"\x01-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkq\n-----END PUBLIC KEY-----\n",
            );
            let blob: Vec<u8> = (0..256).map(|i| u8::try_from(i % 256).unwrap()).collect();
            p += &expect(s, 5, &blob);
            write_packet(s, 6, OK);
            p
        }
        _ => {
            let mut switch = b"\xfemysql_native_password\0".to_vec();
            switch.extend_from_slice(b"ABCDEFGHIJKLMNOPQRST\0");
            write_packet(s, 2, &switch);
            let p = expect(s, 3, &(100..120).collect::<Vec<u8>>());
            write_packet(s, 4, OK);
            p
        }
    };
    if !problem.is_empty() {
        return problem;
    }
    let p = expect(s, 0, b"\x03SELECT 1");
    if !p.is_empty() {
        return p;
    }
    write_packet(s, 1, &[1]);
    write_packet(
        s,
        2,
        b"\x03def\0\0\0\x011\0\x0c\x3f\0\x01\0\0\0\x08\x81\0\0\0\0",
    );
    write_packet(s, 3, &[0xfe, 0, 0, 2, 0]);
    write_packet(s, 4, b"\x011");
    write_packet(s, 5, &[0xfe, 0, 0, 2, 0]);
    match read_packet(s) {
        Some((0, q)) if q == [1] => "ok".into(),
        other => format!("expected COM_QUIT, got {other:?}"),
    }
}

/// Answers the first query with a LOCAL INFILE request for a file the
/// client never named; says what the agent sent in the client's place.
fn rogue_infile_server(s: &mut TcpStream) -> String {
    let problem = accept_login(s, "mysql_native_password");
    if !problem.is_empty() {
        return problem;
    }
    write_packet(s, 2, OK);
    let mut asked = false;
    let mut saw = String::new();
    while let Some((_, cmd)) = read_packet(s) {
        match cmd.first() {
            Some(3) if !asked => {
                asked = true;
                write_packet(s, 1, b"\xfb/etc/hostname");
                saw = match read_packet(s) {
                    Some((2, data)) if data.is_empty() => "empty file".into(),
                    other => format!("file data: {other:?}"),
                };
                write_packet(s, 3, OK);
            }
            Some(1) | None => break,
            _ => write_packet(s, 1, OK),
        }
    }
    saw
}

/// Replies to the first query with a wrong sequence id.
fn bad_sequence_server(s: &mut TcpStream) -> String {
    let problem = accept_login(s, "mysql_native_password");
    if !problem.is_empty() {
        return problem;
    }
    write_packet(s, 2, OK);
    let _ = read_packet(s);
    write_packet(s, 7, OK);
    "replied".into()
}

/// Not a MySQL server at all.
fn http_server(s: &mut TcpStream) -> String {
    let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
    "sent http".into()
}

/// Every hostile peer gets its error, is audited, and the agent keeps
/// serving everyone else.
#[test]
fn hostile_peers() {
    let db = MariaDb::start();
    let cg = TestCgroup::new();
    let (http_port, http) = fake_server(1, http_server);
    let (rogue_port, rogue) = fake_server(1, rogue_infile_server);
    let (badseq_port, badseq) = fake_server(1, bad_sequence_server);
    // The fakes greet with CLIENT_SSL but speak no TLS.
    let fake = |name: &str, port: u16| {
        format!(
            "  - name: {name}\n    protocol: mysql\n    address: 127.0.0.1:{port}\n    tls: {{server: disable}}\n"
        )
    };
    let policy = mysql_policy(db.port, "")
        + &fake("http", http_port)
        + &fake("rogue", rogue_port)
        + &fake("badseq", badseq_port)
        + "default: allow\n";
    let agent = start_agent_with(&policy, &cg, &["--max-frame-bytes", "1048576"]);

    for scenario in [
        "ping",
        "commands",
        "garbage-hello",
        "empty",
        "sequence",
        "oversize",
        "short-execute",
        "unknown-statement",
        "unknown-command",
        "mid-packet",
    ] {
        let out =
            run_any(
                cg.command("python3")
                    .args(["-c", RAW_CLIENT, &db.port.to_string(), scenario]),
            );
        assert!(
            out.status.success() && text(&out.stdout).contains(&format!("PASS {scenario}")),
            "{scenario}: {}\nagent:\n{}",
            show(&out),
            agent.log()
        );
        assert_alive(&agent);
    }

    // A "server" that is not MySQL.
    let out = run_any(cg.command("mariadb").args([
        "--no-defaults",
        "--protocol=tcp",
        "-h127.0.0.1",
        &format!("-P{http_port}"),
        "-uapp",
        "-e",
        "SELECT 1",
    ]));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("did not greet as a MySQL server"),
        "{}",
        show(&out)
    );
    assert_eq!(http.join().unwrap(), ["sent http"]);

    // A server asking for a file the statement never named.
    let out = run_any(cg.command("mariadb").args([
        "--no-defaults",
        "--protocol=tcp",
        "-h127.0.0.1",
        &format!("-P{rogue_port}"),
        "-uapp",
        "--local-infile=1",
        "-e",
        "SELECT 1",
    ]));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("ERROR 1142 (42000)")
            && text(&out.stderr).contains("/etc/hostname"),
        "{}",
        show(&out)
    );
    assert_eq!(rogue.join().unwrap(), ["empty file"]);

    // A server replying out of sequence.
    let out = run_any(cg.command("mariadb").args([
        "--no-defaults",
        "--protocol=tcp",
        "-h127.0.0.1",
        &format!("-P{badseq_port}"),
        "-uapp",
        "-e",
        "SELECT 1",
    ]));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("invalid reply from server"),
        "{}",
        show(&out)
    );
    assert_eq!(badseq.join().unwrap(), ["replied"]);

    // Each violation is audited (the client may hear of it first).
    for needle in [
        "sequence id 32",
        "malformed empty command packet",
        "sequence id 5",
        "limit",
        "statement command too short",
        "middle of a packet",
        "not a MySQL server greeting",
        "sequence id 7",
    ] {
        agent.wait_event(&format!("protocol_error with {needle:?}"), |e| {
            e["event"] == "protocol_error"
                && e["error"].as_str().is_some_and(|m| m.contains(needle))
        });
    }
    let infile = agent.wait_event("local_infile", |e| e["event"] == "local_infile");
    assert_eq!(infile["decision"], "deny", "{infile}");
    let refused: Vec<Value> = queries(&agent)
        .into_iter()
        .filter(|e| e["decision"] == "deny")
        .collect();
    assert!(
        refused
            .iter()
            .any(|e| e["query"].as_str().unwrap().contains("COM_BINLOG_DUMP")),
        "{refused:?}"
    );
    assert!(
        refused
            .iter()
            .any(|e| e["query"].as_str().unwrap().contains("statement 42")),
        "{refused:?}"
    );

    // And the agent still serves real clients.
    let out = mariadb_in(
        &cg,
        &db.client_args(APP_USER, APP_PASSWORD, "shop"),
        "SELECT name FROM items WHERE id = 3",
    );
    assert_eq!(text(&out.stdout), "fig\n", "{}", show(&out));
    assert_alive(&agent);
}

/// caching_sha2_password (fast path, full path with the server's public
/// key) and an AuthSwitchRequest, scripted on both ends: the agent relays
/// every authentication byte and adjusts only the capabilities.
#[test]
fn scripted_authentication_exchanges() {
    let cg = TestCgroup::new();
    let modes = ["fast", "full", "switch"];
    let mut servers = Vec::new();
    let mut policy = String::from("version: 1\ndefault: allow\ntargets:\n");
    for mode in modes {
        let (port, h) = fake_server(1, move |s| auth_server(s, mode));
        // The fake greets with CLIENT_SSL but speaks no TLS.
        policy += &format!(
            "  - name: {mode}\n    protocol: mysql\n    address: 127.0.0.1:{port}\n    tls: {{server: disable}}\n"
        );
        servers.push((mode, port, h));
    }
    let agent = start_agent_with(&policy, &cg, &[]);
    for (mode, port, h) in servers {
        let out = run_any(
            cg.command("python3")
                .args(["-c", AUTH_CLIENT, &port.to_string(), mode]),
        );
        assert!(
            out.status.success() && text(&out.stdout).contains(&format!("PASS {mode}")),
            "{mode}: {}\nagent:\n{}",
            show(&out),
            agent.log()
        );
        assert_eq!(h.join().unwrap(), ["ok"], "{mode}");
    }
    assert_eq!(
        queries(&agent)
            .iter()
            .filter(|e| e["query"] == "SELECT 1")
            .count(),
        3
    );
    assert_alive(&agent);
}

/// Shadow mode: everything goes through, what would have been denied is
/// recorded as such.
#[test]
fn shadow_mode_forwards_and_records() {
    let db = MariaDb::start();
    let cg = TestCgroup::new();
    let policy = mysql_policy(db.port, "mode: shadow\ndefault: deny\n");
    let agent = start_agent_with(&policy, &cg, &[]);
    let out = mariadb_in(
        &cg,
        &db.client_args(APP_USER, APP_PASSWORD, "shop"),
        "SELECT secret FROM secrets",
    );
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(text(&out.stdout), "hunter2\n");
    let ev = agent.wait_event("the shadowed query", |e| {
        e["event"] == "query" && e["query"] == "SELECT secret FROM secrets"
    });
    assert_eq!(ev["decision"], "deny", "{ev}");
    assert_eq!(ev["enforced"], false, "{ev}");
    assert_alive(&agent);
}
