use std::{sync::Arc, time::Duration};

use serde_json::Value;
use time::OffsetDateTime;

use super::*;
use crate::{
    audit::{AuditConfig, AuditWriter},
    conn::ConnInfo,
    identity::Identity,
    policy::ApprovalSpec,
};

const WORKLOAD_UID: u32 = 1500;

struct Fixture {
    _dir: tempfile::TempDir,
    log: std::path::PathBuf,
    writer: Option<AuditWriter>,
    store: Arc<ApprovalStore>,
    info: ConnInfo,
}

impl Fixture {
    fn new(grants: Option<std::path::PathBuf>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.jsonl");
        let (audit, writer) = AuditWriter::start(AuditConfig::new(&log)).unwrap();
        let store = Arc::new(ApprovalStore::new(audit, grants, "b00t"));
        Self {
            _dir: dir,
            log,
            writer: Some(writer),
            store,
            info: info(7, "/usr/bin/migrate"),
        }
    }

    /// Every audit event so far (stops the writer).
    fn events(mut self) -> Vec<Value> {
        drop(self.store);
        // Tickets held by the test hold the store too; they are gone by now.
        if let Some(w) = self.writer.take() {
            w.finish();
        }
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn info(conn: u64, exe: &str) -> ConnInfo {
    let target: crate::policy::TargetSpec =
        serde_yaml_ng::from_str("{name: pg, protocol: postgres, address: '127.0.0.1:5432'}")
            .unwrap();
    let identity = Identity {
        uid: WORKLOAD_UID,
        gid: WORKLOAD_UID,
        pid: 4242,
        exe: Some(exe.into()),
        cgroup: Some("/jobs".into()),
        ..Identity::default()
    };
    ConnInfo::new(conn, target, "127.0.0.1:5432".parse().unwrap(), identity)
}

fn spec(yaml: &str) -> Arc<ApprovalSpec> {
    Arc::new(serde_yaml_ng::from_str(yaml).unwrap())
}

fn actor(uid: u32, name: &str) -> Actor {
    Actor {
        uid,
        gid: uid,
        pid: Some(1),
        user: Some(name.into()),
    }
}

/// Approves once, without reason or grant.
fn approve_once(
    store: &ApprovalStore,
    actor: &Actor,
    groups: &[String],
    id: &str,
    now: OffsetDateTime,
) -> Result<Value, String> {
    store.approve(actor, groups, id, None, GrantScope::Once, None, now)
}

fn dba() -> Vec<String> {
    vec!["dba".to_owned()]
}

fn hold(f: &Fixture, spec: &Arc<ApprovalSpec>, fp: &str, now: OffsetDateTime) -> Ticket {
    f.store.request(
        &NewApproval {
            info: &f.info,
            decision_id: "d-1",
            db_user: "app",
            database: "shop",
            query: "CREATE TABLE t (a int)",
            logged_query: "CREATE TABLE t (a int)",
            redacted: false,
            fingerprint: fp,
            rule: Some("ddl"),
            spec: Arc::clone(spec),
        },
        now,
    )
}

fn resolved(t: &mut Ticket) -> Option<Resolution> {
    match t.rx.try_recv() {
        Ok(r) => {
            t.done = true;
            Some(r)
        }
        Err(_) => None,
    }
}

#[test]
fn approve_and_deny() {
    let f = Fixture::new(None);
    let now = OffsetDateTime::now_utc();
    let s = spec("{approvers: [dba], timeout: 1m}");
    let mut a = hold(&f, &s, "fp1", now);
    let list = f.store.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], a.id.as_str());
    assert_eq!(list[0]["query"], "CREATE TABLE t (a int)");
    assert_eq!(list[0]["rule"], "ddl");
    assert_eq!(list[0]["identity"]["uid"], WORKLOAD_UID);
    assert!(list[0]["expires_at"].is_string() && list[0]["requested_at"].is_string());
    assert!(resolved(&mut a).is_none());
    let r = f
        .store
        .approve(
            &actor(1, "alice"),
            &dba(),
            &a.id,
            Some("ok"),
            GrantScope::Once,
            None,
            now,
        )
        .unwrap();
    assert_eq!(r["state"], "approved");
    assert!(r["grant"].is_null());
    assert_eq!(resolved(&mut a), Some(Resolution::Approved));
    assert!(f.store.list().is_empty());
    // Deciding twice is an error.
    assert!(
        f.store
            .deny(&actor(1, "alice"), &dba(), &a.id, None)
            .is_err()
    );

    let mut b = hold(&f, &s, "fp1", now);
    f.store
        .deny(&actor(2, "bob"), &dba(), &b.id, Some("not now"))
        .unwrap();
    match resolved(&mut b) {
        Some(Resolution::Denied { reason }) => {
            assert!(reason.contains("denied by bob: not now"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    drop((a, b));
    let events = f.events();
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(
        names,
        [
            "approval_requested",
            "approval_granted",
            "approval_requested",
            "approval_denied"
        ]
    );
    assert_eq!(events[1]["actor"]["user"], "alice");
    assert_eq!(events[1]["actor"]["uid"], 1);
    assert_eq!(events[3]["reason"], "not now");
    assert_eq!(events[0]["identity"]["uid"], WORKLOAD_UID);
}

#[test]
fn who_may_approve() {
    let f = Fixture::new(None);
    let now = OffsetDateTime::now_utc();
    let s = spec("{approvers: [dba], required: 2}");
    let mut t = hold(&f, &s, "fp", now);
    // Not in the group.
    let e = approve_once(&f.store, &actor(3, "eve"), &["users".into()], &t.id, now).unwrap_err();
    assert!(e.contains("none of the approver groups"), "{e}");
    // The workload's own uid, even in the group.
    let e = approve_once(&f.store, &actor(WORKLOAD_UID, "svc"), &dba(), &t.id, now).unwrap_err();
    assert!(e.contains("never approve its own"), "{e}");
    // Two distinct approvers are needed; the same one twice is not two.
    let r = approve_once(&f.store, &actor(1, "alice"), &dba(), &t.id, now).unwrap();
    assert_eq!(r["state"], "pending");
    assert!(resolved(&mut t).is_none());
    assert!(approve_once(&f.store, &actor(1, "alice"), &dba(), &t.id, now).is_err());
    assert!(resolved(&mut t).is_none());
    let r = approve_once(&f.store, &actor(2, "bob"), &dba(), &t.id, now).unwrap();
    assert_eq!(r["state"], "approved");
    assert_eq!(resolved(&mut t), Some(Resolution::Approved));
    drop(t);
    let events = f.events();
    assert_eq!(
        events
            .iter()
            .filter(|e| e["event"] == "approval_refused")
            .count(),
        2
    );
    assert!(events.iter().any(|e| e["event"] == "approval_recorded"));
}

#[test]
fn timeout_and_escalation() {
    let f = Fixture::new(None);
    let now = OffsetDateTime::now_utc();
    let plain = spec("{approvers: [dba], timeout: 2s}");
    let mut t = hold(&f, &plain, "fp", now);
    f.store.tick(now + Duration::from_secs(1));
    assert!(resolved(&mut t).is_none());
    f.store.tick(now + Duration::from_secs(2));
    match resolved(&mut t) {
        Some(Resolution::Denied { reason }) => assert!(reason.contains("within 2s"), "{reason}"),
        other => panic!("{other:?}"),
    }

    let esc =
        spec("{approvers: [dba], timeout: 2s, escalate_to: [oncall], escalation_timeout: 10s}");
    let mut e = hold(&f, &esc, "fp", now);
    // Before escalation, oncall may not decide.
    assert!(approve_once(&f.store, &actor(9, "olga"), &["oncall".into()], &e.id, now).is_err());
    f.store.tick(now + Duration::from_secs(3));
    assert!(resolved(&mut e).is_none());
    assert_eq!(f.store.list()[0]["escalated"], true);
    f.store.tick(now + Duration::from_secs(13));
    assert!(matches!(resolved(&mut e), Some(Resolution::Denied { .. })));

    // Escalated, oncall may approve.
    let mut e2 = hold(&f, &esc, "fp", now);
    f.store.tick(now + Duration::from_secs(3));
    approve_once(&f.store, &actor(9, "olga"), &["oncall".into()], &e2.id, now).unwrap();
    assert_eq!(resolved(&mut e2), Some(Resolution::Approved));
    drop((t, e, e2));
    let events = f.events();
    let count = |n: &str| events.iter().filter(|e| e["event"] == n).count();
    assert_eq!(count("approval_expired"), 2);
    assert_eq!(count("approval_escalated"), 2);
    assert_eq!(count("approval_granted"), 1);
}

#[test]
fn dropping_the_ticket_withdraws() {
    let f = Fixture::new(None);
    let now = OffsetDateTime::now_utc();
    let t = hold(&f, &spec("{approvers: [dba]}"), "fp", now);
    let id = t.id.clone();
    drop(t);
    assert!(f.store.list().is_empty());
    assert!(approve_once(&f.store, &actor(1, "alice"), &dba(), &id, now).is_err());
    let events = f.events();
    assert!(events.iter().any(|e| e["event"] == "approval_withdrawn"));
}

#[test]
fn grants_match_expire_and_persist() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/grants.json");
    let f = Fixture::new(Some(path.clone()));
    let now = OffsetDateTime::now_utc();
    let s = spec("{approvers: [dba], required: 2}");
    let mut t = hold(&f, &s, "fp1", now);
    // Two approvers: the narrowest scope and shortest time win.
    f.store
        .approve(
            &actor(1, "alice"),
            &dba(),
            &t.id,
            None,
            GrantScope::Identity,
            Some(Duration::from_secs(7200)),
            now,
        )
        .unwrap();
    let r = f
        .store
        .approve(
            &actor(2, "bob"),
            &dba(),
            &t.id,
            None,
            GrantScope::Fingerprint,
            Some(Duration::from_secs(60)),
            now,
        )
        .unwrap();
    assert_eq!(r["grant"]["scope"], "fingerprint");
    assert_eq!(resolved(&mut t), Some(Resolution::Approved));
    let info = f.info.clone();
    let use_ = |fp: &str, rule: Option<&str>, i: &ConnInfo, at: OffsetDateTime| {
        f.store.use_grant(i, "d-2", rule, fp, at).is_some()
    };
    // Same workload (another pid), same shape, same rule, same target.
    let mut again = info.clone();
    Arc::make_mut(&mut again.identity).pid = 9999;
    let later = now + Duration::from_secs(30);
    assert!(use_("fp1", Some("ddl"), &again, later));
    assert!(!use_("fp2", Some("ddl"), &info, later), "other shape");
    assert!(!use_("fp1", Some("other"), &info, later), "other rule");
    assert!(
        !use_("fp1", Some("ddl"), &self::info(8, "/bin/other"), later),
        "other exe"
    );
    assert!(
        !use_("fp1", Some("ddl"), &info, now + Duration::from_secs(61)),
        "expired"
    );
    // Persisted and reloaded by a new store.
    let text = std::fs::read_to_string(&path).unwrap();
    let file: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(file["version"], 1);
    assert_eq!(file["grants"][0]["fingerprint"], "fp1");
    let (audit, _w) = AuditWriter::start(AuditConfig::new(dir.path().join("a2.jsonl"))).unwrap();
    let reloaded = ApprovalStore::new(audit, Some(path.clone()), "b2");
    assert_eq!(reloaded.grants(later).len(), 1);
    let gid = reloaded.grants(later)[0].id.clone();
    reloaded.revoke(&actor(1, "alice"), &gid).unwrap();
    assert!(reloaded.grants(later).is_empty());
    let file: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(file["grants"].as_array().unwrap().len(), 0);

    // An identity grant covers every shape of the rule.
    let mut u = hold(&f, &spec("{approvers: [dba]}"), "fp3", now);
    f.store
        .approve(
            &actor(1, "alice"),
            &dba(),
            &u.id,
            None,
            GrantScope::Identity,
            None,
            now,
        )
        .unwrap();
    assert_eq!(resolved(&mut u), Some(Resolution::Approved));
    assert!(use_("fp-anything", Some("ddl"), &info, later));
    assert!(!use_(
        "fp-anything",
        Some("ddl"),
        &info,
        now + DEFAULT_GRANT
    ));
    drop((t, u));
    let events = f.events();
    assert!(events.iter().filter(|e| e["event"] == "grant_used").count() >= 2);
}

#[test]
fn a_corrupt_state_file_means_no_grants() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grants.json");
    std::fs::write(&path, "{not json").unwrap();
    let (audit, _w) = AuditWriter::start(AuditConfig::new(dir.path().join("a.jsonl"))).unwrap();
    let store = ApprovalStore::new(audit, Some(path), "b");
    assert!(store.grants(OffsetDateTime::now_utc()).is_empty());
}

#[test]
fn redacted_text_in_events_and_webhooks() {
    let f = Fixture::new(None);
    let now = OffsetDateTime::now_utc();
    let t = f.store.request(
        &NewApproval {
            info: &f.info,
            decision_id: "d-9",
            db_user: "app",
            database: "shop",
            query: "INSERT INTO t VALUES ('s3cr3t')",
            logged_query: "INSERT INTO t VALUES ('')",
            redacted: true,
            fingerprint: "fp",
            rule: Some("ddl"),
            spec: spec("{approvers: [dba]}"),
        },
        now,
    );
    // Approvers see the statement; webhooks and the log do not see literals.
    assert_eq!(
        f.store.list()[0]["query"],
        "INSERT INTO t VALUES ('s3cr3t')"
    );
    let hooked = f.store.lock().pending[&t.id].notify_view();
    assert_eq!(hooked["query"], "INSERT INTO t VALUES ('')");
    drop(t);
    let events = f.events();
    assert!(events.iter().all(|e| !e.to_string().contains("s3cr3t")));
    assert_eq!(events[0]["query"], "INSERT INTO t VALUES ('')");
}
