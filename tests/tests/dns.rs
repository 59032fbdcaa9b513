//! Targets given by DNS name: the agent runs in a private mount namespace
//! whose `/etc/hosts` is a temporary file the test rewrites (the machine's
//! own file and resolver are never touched); real PostgreSQL servers on
//! 127.0.0.1 and 127.0.0.2 share one port; real psql in the test cgroup;
//! real eBPF.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{fs, path::Path, process::Output};

use interceptor_tests::{Agent, PgServer, TestCgroup, free_port, run_any};
use serde_json::Value;

const HBA: &str = "local all all trust\nhost all all 127.0.0.0/8 trust\n";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn server(listen: &str, port: u16) -> PgServer {
    PgServer::start_port(None, listen, &[], Some(HBA), port)
}

/// Rewrites the agent's hosts file in place (the bind mount follows the
/// inode, so no rename).
fn hosts(path: &Path, entries: &[(&str, &str)]) {
    let mut t = String::from("127.0.0.1 localhost\n::1 localhost\n");
    for (ip, name) in entries {
        t.push_str(&format!("{ip} {name}\n"));
    }
    fs::write(path, t).unwrap();
}

fn policy(name: &str, port: u16) -> String {
    format!(
        "version: 1\nresolve_every: 1s\ndefault: allow\ntargets:\n  - {{name: db, protocol: postgres, address: '{name}:{port}'}}\nrules:\n  - {{name: no-ddl, kinds: [ddl], decision: deny}}\n"
    )
}

/// A DDL statement from the test cgroup: denied (42501) when redirected,
/// run by the server when not.
fn drop_table(pg: &PgServer, cg: &TestCgroup) -> Output {
    run_any(
        pg.psql_in(cg)
            .args(["-v", "ON_ERROR_STOP=1", "-Atc", "drop table if exists nope"]),
    )
}

fn denied(out: &Output) -> bool {
    !out.status.success()
        && (text(&out.stderr).contains("42501")
            || text(&out.stderr).contains("interceptor: denied by rule"))
}

fn status(agent: &Agent) -> Value {
    let out = agent.cli(&["status", "--json"]);
    assert!(out.status.success(), "status: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn resolved(agent: &Agent) -> Value {
    status(agent)["targets"][0]["resolved"]["addresses"].clone()
}

fn connects_to(agent: &Agent, dst: &str) -> usize {
    agent
        .events()
        .iter()
        .filter(|e| e["event"] == "connect" && e["dst"] == dst)
        .count()
}

#[test]
fn a_named_target_follows_its_name() {
    let port = free_port();
    let one = server("127.0.0.1", port);
    let two = server("127.0.0.2", port);
    let cg = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hosts");
    let name = "db.interceptor.test";
    hosts(&file, &[("127.0.0.1", name)]);
    let agent = Agent::start_hosts(&policy(name, port), &cg, &[], &file);

    // The name resolves to the first server: redirected, decided as `db`.
    let ev = agent.wait_event("the first resolution", |e| e["event"] == "target_resolved");
    assert_eq!(ev["target"], "db");
    assert_eq!(ev["name"], name);
    assert_eq!(ev["added"], serde_json::json!(["127.0.0.1"]));
    assert_eq!(ev["removed"], serde_json::json!([]));
    assert_eq!(resolved(&agent), serde_json::json!(["127.0.0.1"]));
    let out = drop_table(&one, &cg);
    assert!(denied(&out), "{}", text(&out.stderr));
    let dst1 = format!("127.0.0.1:{port}");
    let dst2 = format!("127.0.0.2:{port}");
    let c = agent.wait_event("a connect to the first server", |e| {
        e["event"] == "connect" && e["dst"] == dst1.as_str()
    });
    assert_eq!(c["target"], "db", "{c}");
    // The second server's address is no target yet.
    let out = drop_table(&two, &cg);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(connects_to(&agent, &dst2), 0);
    let txt = agent.cli(&["status"]);
    let txt = text(&txt.stdout);
    assert!(txt.contains("resolved to 127.0.0.1 at "), "{txt}");

    // The name moves to the second server: after the interval, new
    // connections there are redirected and the old address is no target.
    hosts(&file, &[("127.0.0.2", name)]);
    let ev = agent.wait_event("the move", |e| {
        e["event"] == "target_resolved" && e["added"] == serde_json::json!(["127.0.0.2"])
    });
    assert_eq!(ev["removed"], serde_json::json!(["127.0.0.1"]), "{ev}");
    assert_eq!(resolved(&agent), serde_json::json!(["127.0.0.2"]));
    let out = drop_table(&two, &cg);
    assert!(denied(&out), "{}", text(&out.stderr));
    let c = agent.wait_event("a connect to the second server", |e| {
        e["event"] == "connect" && e["dst"] == dst2.as_str()
    });
    assert_eq!(c["target"], "db", "{c}");
    let before = connects_to(&agent, &dst1);
    let out = drop_table(&one, &cg);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(connects_to(&agent, &dst1), before);

    // Resolution breaks: the last addresses stay in force, audited.
    hosts(&file, &[]);
    let ev = agent.wait_event("the failure", |e| e["event"] == "target_resolve_failed");
    assert_eq!(ev["target"], "db");
    assert_eq!(ev["addresses"], serde_json::json!(["127.0.0.2"]), "{ev}");
    assert!(ev["error"].is_string(), "{ev}");
    assert_eq!(resolved(&agent), serde_json::json!(["127.0.0.2"]));
    let out = drop_table(&two, &cg);
    assert!(denied(&out), "{}", text(&out.stderr));
    let st = status(&agent);
    assert!(
        st["targets"][0]["resolved"]["last_error"].is_string(),
        "{st}"
    );
}

#[test]
fn a_name_with_two_addresses_redirects_both() {
    let port = free_port();
    let one = server("127.0.0.1", port);
    let two = server("127.0.0.2", port);
    let cg = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hosts");
    let name = "pair.interceptor.test";
    hosts(&file, &[("127.0.0.1", name), ("127.0.0.2", name)]);
    let agent = Agent::start_hosts(&policy(name, port), &cg, &[], &file);
    assert_eq!(
        resolved(&agent),
        serde_json::json!(["127.0.0.1", "127.0.0.2"])
    );
    for pg in [&one, &two] {
        let out = drop_table(pg, &cg);
        assert!(denied(&out), "{}", text(&out.stderr));
    }
    let targets: Vec<Value> = agent
        .events()
        .into_iter()
        .filter(|e| e["event"] == "connect")
        .map(|e| e["target"].clone())
        .collect();
    assert_eq!(targets, [Value::from("db"), Value::from("db")]);
}

/// 1,000 targets (500 CIDRs, 500 names of two addresses each): the
/// policy loads (start, and a reload measured from the file's change to
/// its `policy` event) and the last name still redirects. Prints the
/// times; the README quotes them.
#[test]
fn a_thousand_targets_load_and_redirect() {
    let port = free_port();
    let one = server("127.0.0.1", port);
    let cg = TestCgroup::new();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hosts");
    let mut entries = Vec::new();
    let mut targets = String::new();
    for i in 0..500u32 {
        targets.push_str(&format!(
            "  - {{name: net{i}, protocol: postgres, address: '10.{}.{}.0/24:{port}'}}\n",
            i / 256,
            i % 256
        ));
    }
    let names: Vec<String> = (0..499).map(|i| format!("n{i}.interceptor.test")).collect();
    let ips: Vec<(String, String)> = (0..499u32)
        .map(|i| {
            (
                format!("10.200.{}.{}", i / 250, i % 250 + 1),
                format!("fd00::{:x}", i + 1),
            )
        })
        .collect();
    for (i, n) in names.iter().enumerate() {
        entries.push((ips[i].0.as_str(), n.as_str()));
        entries.push((ips[i].1.as_str(), n.as_str()));
        targets.push_str(&format!(
            "  - {{name: name{i}, protocol: postgres, address: '{n}:{port}'}}\n"
        ));
    }
    let last = "last.interceptor.test";
    entries.push(("127.0.0.1", last));
    targets.push_str(&format!(
        "  - {{name: last, protocol: postgres, address: '{last}:{port}'}}\n"
    ));
    hosts(&file, &entries);
    let policy = format!(
        "version: 1\nresolve_every: 30s\ndefault: allow\ntargets:\n{targets}rules:\n  - {{name: no-ddl, kinds: [ddl], decision: deny}}\n"
    );
    let started = std::time::Instant::now();
    let agent = Agent::start_hosts(&policy, &cg, &[], &file);
    let start_time = started.elapsed();
    let st = status(&agent);
    assert_eq!(st["targets"].as_array().unwrap().len(), 1000);
    assert_eq!(
        st["maps"]["TARGETS"]["entries"],
        500 + 499 * 2 + 1,
        "{}",
        st["maps"]
    );
    let out = drop_table(&one, &cg);
    assert!(denied(&out), "{}", text(&out.stderr));
    let c = agent.wait_event("a connect", |e| e["event"] == "connect");
    assert_eq!(c["target"], "last", "{c}");

    // A reload of the same 1,000 targets (one rule more).
    let before = agent.events().len();
    let changed = std::time::Instant::now();
    fs::write(
        &agent.policy,
        format!("{policy}  - {{name: no-copy, kinds: [copy], decision: deny}}\n"),
    )
    .unwrap();
    let mut reload = None;
    while reload.is_none() {
        reload = agent.events()[before..]
            .iter()
            .find(|e| e["event"] == "policy")
            .cloned();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(changed.elapsed().as_secs() < 20, "no reload");
    }
    let reload_time = changed.elapsed();
    assert_eq!(reload.unwrap()["status"], "loaded");
    eprintln!(
        "1000 targets (500 CIDRs, 500 names, {} map entries): agent start to ready {start_time:?}; reload seen {reload_time:?} after the write (includes up to 1s of file polling)",
        500 + 499 * 2 + 1
    );
}
