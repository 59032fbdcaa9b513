use super::*;
use crate::{
    conn::OrigDstLookup,
    identity::IdentityResolver,
    policy::{Engine, PolicyFile},
    proxy::Limits,
};

struct NoLookup;
impl OrigDstLookup for NoLookup {
    fn take(&self, _: u64, _: std::net::SocketAddr) -> Option<interceptor_common::ConnRecord> {
        None
    }
}

#[derive(Default)]
struct Table(Mutex<HashSet<BlockKey>>);
impl BlockMap for Table {
    fn set_blocked(&self, keys: &HashSet<BlockKey>) -> Result<(), String> {
        *self.0.lock().unwrap() = keys.clone();
        Ok(())
    }
}

const POLICY: &str = "version: 1\ntargets:\n  - {name: pg, protocol: postgres, address: '127.0.0.1:5432'}\nidentities:\n  app: {uid: 4242}\n  me: {comm: blocktest}\n";

fn shared(dir: &Path) -> (Arc<Shared>, crate::audit::AuditWriter) {
    let (audit, writer) =
        crate::audit::AuditWriter::start(crate::audit::AuditConfig::new(dir.join("a.jsonl")))
            .unwrap();
    let engine = Engine::new(PolicyFile::parse(POLICY, Path::new("t")).unwrap()).unwrap();
    let shared = Arc::new(Shared::new(
        engine,
        audit,
        Arc::new(NoLookup),
        IdentityResolver::new(None, 1 << 20),
        0,
        Limits::default(),
    ));
    (shared, writer)
}

fn caller() -> Caller {
    Caller {
        uid: 0,
        gid: 0,
        pid: Some(1),
        user: Some("root".into()),
    }
}

fn scope() -> Scope {
    Scope {
        root: None,
        attached: PathBuf::from("/nonexistent"),
    }
}

#[test]
fn state_file_round_trips_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub").join(STATE_FILE);
    assert!(load_state(&path).unwrap().is_empty());
    let blocks = vec![BlockEntry {
        selector: "uid=1000 comm=psql".into(),
        reason: Some("incident 7".into()),
        actor: Some(Actor {
            uid: 0,
            gid: 0,
            pid: Some(9),
            user: Some("root".into()),
        }),
        since: "2026-11-28T00:00:00.000000Z".into(),
    }];
    save_state(&path, &blocks).unwrap();
    assert_eq!(load_state(&path).unwrap(), blocks);
    // Only the file itself is left behind, no temporary.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [STATE_FILE]);
    save_state(&path, &[]).unwrap();
    assert!(load_state(&path).unwrap().is_empty());
}

#[test]
fn bad_state_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    for (text, want) in [
        ("{", "malformed"),
        ("{\"version\": 2, \"blocks\": []}", "version"),
        (
            "{\"version\": 1, \"blocks\": [{\"selector\": \"colour=red\", \"since\": \"x\"}]}",
            "unknown selector key",
        ),
        (
            "{\"version\": 1, \"blocks\": [], \"extra\": 1}",
            "malformed",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let e = load_state(&path).unwrap_err();
        assert!(e.contains(want), "{text}: {e}");
    }
}

#[test]
fn plans_pick_the_cheapest_exact_kernel_keys() {
    let resolver = IdentityResolver::new(None, 1 << 20);
    let procs = ProcScan::new(&resolver);
    let f = |s: &str| match Selector::parse(s).unwrap() {
        Selector::Fields(f) => *f,
        Selector::Named(_) => unreachable!(),
    };
    let p = plan(&f("uid=1000"), &scope(), &procs).unwrap();
    assert_eq!(p.keys, HashSet::from([BlockKey::number(BLOCK_UID, 1000)]));
    assert!(!p.dynamic);
    let p = plan(&f("user=root"), &scope(), &procs).unwrap();
    assert_eq!(p.keys, HashSet::from([BlockKey::number(BLOCK_UID, 0)]));
    assert!(
        plan(&f("user=root uid=5"), &scope(), &procs)
            .unwrap_err()
            .contains("uid 0")
    );
    assert!(
        plan(&f("user=no-such-user-here"), &scope(), &procs)
            .unwrap_err()
            .contains("no such user")
    );
    let p = plan(&f("pid=77"), &scope(), &procs).unwrap();
    assert_eq!(p.keys, HashSet::from([BlockKey::number(BLOCK_TGID, 77)]));
    let p = plan(&f("comm=psql"), &scope(), &procs).unwrap();
    let mut c = [0u8; 16];
    c[..4].copy_from_slice(b"psql");
    assert_eq!(p.keys.iter().next().unwrap().value, comm_words(c));
    // Mixed conditions need a process scan; outside any scope it finds none.
    let p = plan(&f("uid=0 comm=psql"), &scope(), &procs).unwrap();
    assert!(p.dynamic && p.keys.is_empty());
}

#[test]
fn scan_and_walk_cover_the_attached_cgroup_only() {
    let Some(root) = crate::identity::cgroup2_mount() else {
        return;
    };
    let mine = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let rel = mine
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap()
        .to_owned();
    let attached = root.join(rel.trim_start_matches('/'));
    let scope = Scope {
        root: Some(root.clone()),
        attached: attached.clone(),
    };
    let resolver = IdentityResolver::new(Some(root), 1 << 20);
    let procs = ProcScan::new(&resolver);
    // The test's own cgroup by glob: exactly its id.
    let f = match Selector::parse(&format!("cgroup={rel}")).unwrap() {
        Selector::Fields(f) => *f,
        Selector::Named(_) => unreachable!(),
    };
    let p = plan(&f, &scope, &procs).unwrap();
    assert!(p.dynamic);
    assert!(
        p.keys
            .contains(&BlockKey::number(BLOCK_CGROUP, inode(&attached).unwrap())),
        "{p:?}"
    );
    // A process scan never includes the agent itself.
    let f = match Selector::parse(&format!("pid={} uid=0", std::process::id())).unwrap() {
        Selector::Fields(f) => *f,
        Selector::Named(_) => unreachable!(),
    };
    assert!(plan(&f, &scope, &procs).unwrap().keys.is_empty());
    // Outside the scope nothing is found.
    assert!(!scope.contains("/definitely/elsewhere") || rel == "/");
}

#[test]
fn kill_switch_blocks_lists_persists_and_unblocks() {
    let dir = tempfile::tempdir().unwrap();
    let (shared, writer) = shared(dir.path());
    let table = Arc::new(Table::default());
    let ks = KillSwitch::start(Arc::clone(&shared), table.clone(), dir.path(), scope()).unwrap();
    // Errors are messages.
    assert!(
        ks.block(&caller(), "nosuch", None)
            .unwrap_err()
            .contains("unknown identity \"nosuch\" (the policy defines: app, me)")
    );
    assert!(ks.block(&caller(), "colour=red", None).is_err());
    assert!(
        ks.unblock(&caller(), "uid=1")
            .unwrap_err()
            .contains("not blocked")
    );

    let r = ks.block(&caller(), "app", Some("incident".into())).unwrap();
    assert_eq!(r["selector"], "app");
    assert_eq!(r["kernel_keys"], 1);
    assert_eq!(r["persisted"], true);
    assert!(
        table
            .0
            .lock()
            .unwrap()
            .contains(&BlockKey::number(BLOCK_UID, 4242))
    );
    assert!(
        ks.block(&caller(), "app", None)
            .unwrap_err()
            .contains("already blocked")
    );
    ks.block(&caller(), "comm=psql uid=7", None).unwrap();
    let engine = shared.engine.load();
    let id = Identity {
        uid: 4242,
        ..Identity::default()
    };
    assert_eq!(
        shared.blocks.matching(&id, &engine).unwrap().entry.selector,
        "app"
    );
    let list = ks.list();
    assert_eq!(list["blocks"].as_array().unwrap().len(), 2);
    assert_eq!(list["blocks"][0]["actor"]["user"], "root");

    // A new agent on the same state directory has the same blocks.
    let table2 = Arc::new(Table::default());
    let ks2 = KillSwitch::start(Arc::clone(&shared), table2.clone(), dir.path(), scope()).unwrap();
    assert_eq!(ks2.list()["blocks"].as_array().unwrap().len(), 2);
    assert!(
        table2
            .0
            .lock()
            .unwrap()
            .contains(&BlockKey::number(BLOCK_UID, 4242))
    );

    // Unblock by the same conditions in another order.
    ks2.unblock(&caller(), "uid=7 comm=psql").unwrap();
    ks2.unblock(&caller(), "app").unwrap();
    assert!(table2.0.lock().unwrap().is_empty());
    assert!(shared.blocks.matching(&id, &engine).is_none());
    assert!(load_state(&dir.path().join(STATE_FILE)).unwrap().is_empty());

    drop((ks, ks2, engine));
    drop(Arc::try_unwrap(shared).ok());
    writer.finish();
    let log = std::fs::read_to_string(dir.path().join("a.jsonl")).unwrap();
    let events: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let blocks: Vec<&Value> = events.iter().filter(|e| e["event"] == "block").collect();
    // Two commands, then two loaded from state by the second agent.
    assert_eq!(blocks.len(), 4, "{log}");
    assert_eq!(blocks[0]["actor"]["uid"], 0);
    assert_eq!(blocks[0]["reason"], "incident");
    assert_eq!(blocks[2]["source"], "state");
    let unblocks = events.iter().filter(|e| e["event"] == "unblock").count();
    assert_eq!(unblocks, 2);
}
