//! The audit log end to end: real psql statements through the agent with a
//! tiny blocking queue and small rotated files; `interceptor audit verify`
//! accepts the result and catches records edited, deleted and reordered,
//! also across a rotation boundary; nothing is lost in block mode.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use interceptor_tests::{
    Agent, PgServer, TestCgroup, agent_bin, pg_bin, pg_policy, run_ok, unique,
};
use serde_json::Value;

const SESSIONS: usize = 4;
const STATEMENTS: usize = 120;

fn psql_script(cg: &TestCgroup, pg: &PgServer, script: &str) -> Command {
    let path = std::env::temp_dir().join(unique("psql-script"));
    fs::write(&path, script).unwrap();
    let mut c = cg.command(pg_bin("psql").to_str().unwrap());
    c.args([
        "-X",
        "-Atq",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        "127.0.0.1",
        "-p",
    ])
    .arg(pg.port.to_string())
    .args(["-U", "postgres", "-d", "postgres", "-f"])
    .arg(path);
    c
}

fn verify(files: &[PathBuf]) -> Output {
    Command::new(agent_bin())
        .args(["audit", "verify"])
        .args(files)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The log's files oldest first: `audit.jsonl.N` ... `.1`, then the live file.
fn chain_files(base: &Path) -> Vec<PathBuf> {
    let mut rotated: Vec<(usize, PathBuf)> = fs::read_dir(base.parent().unwrap())
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            let n = p
                .file_name()?
                .to_str()?
                .strip_prefix("audit.jsonl.")?
                .parse()
                .ok()?;
            Some((n, p))
        })
        .collect();
    rotated.sort();
    let mut files: Vec<PathBuf> = rotated.into_iter().rev().map(|(_, p)| p).collect();
    files.push(base.to_owned());
    files
}

fn lines(p: &Path) -> Vec<String> {
    fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(p: &Path, l: &[String]) {
    fs::write(p, l.join("\n") + "\n").unwrap();
}

fn seq(line: &str) -> u64 {
    serde_json::from_str::<Value>(line).unwrap()["seq"]
        .as_u64()
        .unwrap()
}

/// A copy of every file of the log in a fresh directory.
fn copy_log(files: &[PathBuf], case: &str) -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::Builder::new().prefix(case).tempdir().unwrap();
    let copies = files
        .iter()
        .map(|f| {
            let to = dir.path().join(f.file_name().unwrap());
            fs::copy(f, &to).unwrap();
            to
        })
        .collect();
    (dir, copies)
}

/// Tampers with a copy and checks that verify exits 1 naming `file:line`
/// and the record's seq.
fn assert_caught(
    files: &[PathBuf],
    case: &str,
    tamper: impl FnOnce(&[PathBuf]) -> (usize, usize, u64),
    what: &str,
) {
    let (_dir, copies) = copy_log(files, case);
    let (file, line, seq) = tamper(&copies);
    let out = verify(&copies);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{case} not caught: {text}");
    let name = copies[file].display().to_string();
    assert!(
        text.contains(&format!("{name}:{line}: seq {seq}: ")) && text.contains(what),
        "{case}: expected {name}:{line} seq {seq} ({what}), got: {text}"
    );
}

#[test]
fn rotated_chain_verifies_loses_nothing_in_block_mode_and_catches_tampering() {
    let pg = PgServer::start();
    let cg = TestCgroup::new();
    let policy = pg_policy(
        pg.port,
        "mode: enforce\ndefault: allow\non_parse_error: allow\naudit:\n  overflow: block\n  queue: 4\n  rotate_bytes: 32768\n  retain: 1000\n",
    );
    let mut agent = Agent::start(&policy, &cg, false);

    // Several sessions at once: many senders on a queue of 4.
    let sessions: Vec<_> = (0..SESSIONS)
        .map(|s| {
            let script: String = (0..STATEMENTS)
                .map(|i| format!("select 'm-{s}-{i}' as marker;\n"))
                .collect();
            let mut cmd = psql_script(&cg, &pg, &script);
            std::thread::spawn(move || run_ok(&mut cmd))
        })
        .collect();
    for (s, h) in sessions.into_iter().enumerate() {
        let out = h.join().unwrap();
        assert_eq!(out.lines().count(), STATEMENTS, "session {s}: {out}");
    }
    assert!(agent.stop().success(), "{}", agent.log());

    let files = chain_files(&agent.audit_log);
    assert!(
        files.len() >= 5,
        "expected several rotations, got {files:?}"
    );

    // Every statement's query event is there, exactly once.
    let all: Vec<Value> = files
        .iter()
        .flat_map(|f| lines(f))
        .map(|l| serde_json::from_str(&l).unwrap())
        .collect();
    for s in 0..SESSIONS {
        for i in 0..STATEMENTS {
            let marker = format!("'m-{s}-{i}'");
            let n = all
                .iter()
                .filter(|e| {
                    e["event"] == "query" && e["query"].as_str().unwrap_or("").contains(&marker)
                })
                .count();
            assert_eq!(n, 1, "query event for {marker}");
        }
    }
    assert!(all.iter().all(|e| e["event"] != "gap"));
    assert_eq!(all.first().unwrap()["event"], "agent_start");
    assert_eq!(all.last().unwrap()["event"], "agent_stop");

    // Unbroken: from the base path (siblings found) and from the files in
    // any order.
    let out = verify(std::slice::from_ref(&agent.audit_log));
    assert!(out.status.success(), "{}", stdout(&out));
    let summary = stdout(&out);
    assert!(
        summary.starts_with(&format!(
            "ok: {} records in {} file(s), seq 1..{}",
            all.len(),
            files.len(),
            all.len()
        )),
        "{summary}"
    );
    let mut shuffled = files.clone();
    shuffled.reverse();
    shuffled.swap(0, 2);
    let out = verify(&shuffled);
    assert!(out.status.success(), "{}", stdout(&out));

    // files: [.N, ..., .2, .1, live]; pick two rotated files in the middle.
    let (older, newer) = (1, 2);

    assert_caught(
        &files,
        "edited",
        |c| {
            let mut l = lines(&c[older]);
            let i = l.len() / 2;
            let s = seq(&l[i]);
            l[i] = l[i].replacen("\"event\":\"", "\"event\":\"x", 1);
            write_lines(&c[older], &l);
            (older, i + 1, s)
        },
        "edited",
    );
    assert_caught(
        &files,
        "deleted",
        |c| {
            let mut l = lines(&c[older]);
            let i = l.len() / 2;
            let next = seq(&l[i + 1]);
            l.remove(i);
            write_lines(&c[older], &l);
            (older, i + 1, next)
        },
        "deleted",
    );
    assert_caught(
        &files,
        "swapped",
        |c| {
            let mut l = lines(&c[newer]);
            let i = l.len() / 2;
            l.swap(i, i + 1);
            let s = seq(&l[i]);
            write_lines(&c[newer], &l);
            (newer, i + 1, s)
        },
        "reordered",
    );
    assert_caught(
        &files,
        "swapped-across-rotation",
        |c| {
            let mut lo = lines(&c[older]);
            let mut ln = lines(&c[newer]);
            let last = lo.len() - 1;
            std::mem::swap(&mut lo[last], &mut ln[0]);
            let s = seq(&lo[last]);
            write_lines(&c[older], &lo);
            write_lines(&c[newer], &ln);
            (older, last + 1, s)
        },
        "deleted",
    );
    assert_caught(
        &files,
        "deleted-across-rotation",
        |c| {
            let mut ln = lines(&c[newer]);
            let next = seq(&ln[1]);
            ln.remove(0);
            write_lines(&c[newer], &ln);
            (newer, 1, next)
        },
        "deleted",
    );
}

#[test]
fn redaction_applies_on_reload_and_writer_settings_wait_for_restart() {
    let pg = PgServer::start();
    let cg = TestCgroup::new();
    let base = "mode: enforce\ndefault: allow\non_parse_error: allow\n";
    let mut agent = Agent::start(&pg_policy(pg.port, base), &cg, false);
    run_ok(&mut psql_script(&cg, &pg, "select 'plain-value';\n"));
    agent.wait_event("the plain query", |e| {
        e["event"] == "query" && e["query"].as_str().unwrap_or("").contains("plain-value")
    });

    fs::write(
        &agent.policy,
        pg_policy(
            pg.port,
            &format!("{base}audit:\n  queue: 8\n  redact_literals: true\n"),
        ),
    )
    .unwrap();
    let ev = agent.wait_event("the reload", |e| {
        e["event"] == "policy" && e["status"] == "loaded"
    });
    assert_eq!(ev["audit_restart_required"], serde_json::json!(["queue"]));

    run_ok(&mut psql_script(
        &cg,
        &pg,
        "select 'top-secret' as a, 42424242 as b;\ncreate role tmp_r password 'hunter2-secret';\n",
    ));
    let ev = agent.wait_event("the redacted query", |e| {
        e["event"] == "query" && e["query"].as_str().unwrap_or("").starts_with("select ''")
    });
    assert_eq!(ev["query"], "select '' as a , 0 as b");
    agent.wait_event("the redacted create role", |e| {
        e["event"] == "query" && e["query"] == "create role tmp_r password ''"
    });
    assert!(agent.stop().success());
    let log = fs::read_to_string(&agent.audit_log).unwrap();
    for secret in ["top-secret", "42424242", "hunter2"] {
        assert!(!log.contains(secret), "{secret} reached the log");
    }
    let out = verify(std::slice::from_ref(&agent.audit_log));
    assert!(out.status.success(), "{}", stdout(&out));
}
