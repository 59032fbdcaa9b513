//! Policy and SQL benchmarks (criterion): fingerprint, full analysis,
//! warm-cache decision, a 20 MiB bulk INSERT, and one statement through a
//! connection's guard (decision, decision id, audit record queued for the
//! writer thread): the per-statement work of the data path.
//!
//! `cargo bench -p interceptor-user --bench policy` (or `cargo xtask bench`).
use std::{hint::black_box, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use interceptor::{
    audit::{AuditConfig, AuditWriter},
    conn::{ConnInfo, OrigDstLookup},
    identity::{Identity, IdentityResolver},
    policy::{DecisionRequest, Engine, PolicyFile, SessionState},
    proxy::{Guard, Outcome, Shared},
    sql::{self, Dialect, Fingerprint, LexMode, Limits, Resolution, Scratch},
};

const POINT_SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;";
/// sqlparser cannot read `FOR NO KEY UPDATE`: PostgreSQL's grammar does.
const FALLBACK: &str = "SELECT o.id, c.name FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.id = 42 FOR NO KEY UPDATE OF o SKIP LOCKED";
const DDL: &str = "ALTER TABLE orders ADD CONSTRAINT orders_customer_fk FOREIGN KEY (customer_id) REFERENCES customers (id)";
const JOIN: &str = "WITH recent AS (SELECT * FROM orders WHERE created_at > now() - interval '1 day') \
    SELECT c.name, count(*), sum(i.price) FROM recent r JOIN customers c ON c.id = r.customer_id \
    JOIN order_items i ON i.order_id = r.id WHERE c.country IN ('FR', 'DE', 'IT') \
    GROUP BY c.name ORDER BY 3 DESC LIMIT 50";

const POLICY: &str = r#"
version: 1
mode: enforce
default: deny
on_parse_error: deny
targets:
  - {name: bench, protocol: postgres, address: 127.0.0.1:5432}
identities:
  bench: {uid: 1000, comm: pgbench}
  other: {cgroup: "/other/*"}
rules:
  - name: dangerous
    flags: [file_access, program_exec, role_change, remote_access, admin]
    decision: deny
  - name: no-unbounded-writes
    kinds: [update, delete]
    where: absent
    decision: deny
  - name: other-reads
    identities: [other]
    kinds: [select]
    tables: ["public.report_*"]
    decision: allow
  - name: pgbench
    identities: [bench]
    kinds: [select, insert, update, tcl]
    tables: ["public.pgbench_*"]
    decision: allow
"#;

fn canonical(sql: &str, out: &mut String, scratch: &mut Scratch) -> Fingerprint {
    sql::normalize(
        sql,
        LexMode::default_for(Dialect::Postgres),
        false,
        out,
        scratch,
    );
    Fingerprint::of(out, Dialect::Postgres)
}

fn fingerprint(c: &mut Criterion) {
    let mut out = String::new();
    let mut scratch = Scratch::default();
    c.bench_function("fingerprint/pgbench_point_select", |b| {
        b.iter(|| canonical(black_box(POINT_SELECT), &mut out, &mut scratch));
    });
    c.bench_function("fingerprint/join", |b| {
        b.iter(|| canonical(black_box(JOIN), &mut out, &mut scratch));
    });
    c.bench_function("split/three_statements", |b| {
        let msg =
            "BEGIN; UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 7; COMMIT;";
        b.iter(|| sql::split(black_box(msg), Dialect::Postgres));
    });
}

fn analysis(c: &mut Criterion) {
    let ctx = Resolution {
        dialect: Dialect::Postgres,
        schemas: vec!["public".into()],
        unknown: false,
    };
    let limits = Limits::default();
    let mut scratch = Scratch::default();
    // New shapes: sqlparser alone; PostgreSQL's grammar where sqlparser
    // cannot read the statement; both, for DDL (the grammar adds the
    // relations sqlparser's tree leaves out).
    for (name, text) in [
        ("pgbench_point_select", POINT_SELECT),
        ("join", JOIN),
        ("pg_grammar_fallback", FALLBACK),
        ("ddl_both_parsers", DDL),
    ] {
        c.bench_function(&format!("analyze/{name}"), |b| {
            let mut out = String::new();
            b.iter(|| {
                let info = sql::normalize(
                    black_box(text),
                    LexMode::default_for(Dialect::Postgres),
                    false,
                    &mut out,
                    &mut scratch,
                );
                let _ = Fingerprint::of(&out, Dialect::Postgres);
                sql::analyze(&out, &info, Dialect::Postgres, &limits).resolve(&ctx)
            });
        });
    }
}

fn bulk(c: &mut Criterion) {
    let blob = "x".repeat(20 << 20);
    let insert = format!("INSERT INTO blobs (id, data) VALUES (1, '{blob}')");
    let ctx = Resolution {
        dialect: Dialect::Postgres,
        schemas: vec!["public".into()],
        unknown: false,
    };
    let limits = Limits::default();
    let mut g = c.benchmark_group("bulk");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.bench_function("analyze/insert_20mib_literal", |b| {
        let mut out = String::new();
        let mut scratch = Scratch::default();
        b.iter(|| {
            let spans = sql::split(black_box(&insert), Dialect::Postgres);
            let info = sql::normalize(
                spans[0].text(&insert),
                LexMode::default_for(Dialect::Postgres),
                false,
                &mut out,
                &mut scratch,
            );
            let _ = Fingerprint::of(&out, Dialect::Postgres);
            sql::analyze(&out, &info, Dialect::Postgres, &limits).resolve(&ctx)
        });
    });
    g.finish();
}

fn decision(c: &mut Criterion) {
    let file = PolicyFile::parse(POLICY, Path::new("bench")).unwrap_or_else(|e| panic!("{e}"));
    let engine = Engine::new(file).unwrap_or_else(|e| panic!("{e}"));
    let identity = Identity {
        uid: 1000,
        comm: "pgbench".into(),
        ..Identity::default()
    };
    let binding = engine.bind_identity(&identity);
    let mut session = SessionState::default();
    let req = DecisionRequest {
        identity: &identity,
        binding: &binding,
        target: "bench",
        db_user: "bench",
        database: "bench",
        sql: POINT_SELECT,
    };
    // Warm the per-thread caches.
    let v = engine.decide(&req, &mut session);
    assert!(!v.blocks(), "{}", v.reason);
    c.bench_function("decide/warm_pgbench_point_select", |b| {
        b.iter(|| engine.decide(black_box(&req), &mut session));
    });
    let join = DecisionRequest { sql: JOIN, ..req };
    let _ = engine.decide(&join, &mut session);
    c.bench_function("decide/warm_join", |b| {
        b.iter(|| engine.decide(black_box(&join), &mut session));
    });
}

struct NoLookup;

impl OrigDstLookup for NoLookup {
    fn take(&self, _: u64, _: SocketAddr) -> Option<interceptor_common::ConnRecord> {
        None
    }
}

/// One pgbench point select through a connection's guard, as the data path
/// does it: decided, given its decision id, its `query` record (with a
/// systemd service's identity) queued for the audit writer, which writes
/// the hash-chained log to a file on its own thread meanwhile.
fn statement(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (audit, writer) = AuditWriter::start(AuditConfig::new(dir.path().join("audit.jsonl")))
        .unwrap_or_else(|e| panic!("{e}"));
    let file = PolicyFile::parse(POLICY, Path::new("bench")).unwrap_or_else(|e| panic!("{e}"));
    let target = file.targets[0].clone();
    let engine = Engine::new(file).unwrap_or_else(|e| panic!("{e}"));
    let shared = Arc::new(Shared::new(
        engine,
        audit,
        Arc::new(NoLookup),
        IdentityResolver::new(None, 1 << 20),
        0,
        interceptor::proxy::Limits::default(),
    ));
    let identity = Identity {
        pid: 4242,
        tgid: 4242,
        uid: 1000,
        gid: 1000,
        user: Some("bench".into()),
        comm: "pgbench".into(),
        exe: Some("/usr/lib/postgresql/15/bin/pgbench".into()),
        exe_sha256: Some("9f2c".repeat(16)),
        cmdline: Some("pgbench -S -T 60 -c 8 -M simple postgres".into()),
        cgroup: Some("/system.slice/reports.service".into()),
        unit: Some("reports.service".into()),
        cgroup_id: 8812,
        netns_cookie: 4096,
        ..Identity::default()
    };
    let dst = "127.0.0.1:5432".parse().unwrap_or_else(|e| panic!("{e}"));
    let info = ConnInfo::named(1, target, dst, identity, vec!["bench".into()]);
    let mut guard = Guard::new(Arc::clone(&shared), info);
    guard.set_session("bench", "bench");
    let mut aid = 0u32;
    let mut sql = String::new();
    c.bench_function("statement/pgbench_point_select", |b| {
        b.iter(|| {
            aid = aid.wrapping_add(7919) % 100_000;
            sql.clear();
            sql.push_str("SELECT abalance FROM pgbench_accounts WHERE aid = ");
            sql.push_str(&aid.to_string());
            sql.push(';');
            let outcome = guard.check(black_box(&sql));
            assert!(matches!(outcome, Outcome::Forward));
        });
    });
    drop(guard);
    drop(shared);
    writer.finish();
}

fn target_matching(c: &mut Criterion) {
    let policy = PolicyFile::parse(
        "version: 1\ntargets:\n  - {name: a, protocol: postgres, address: 10.0.0.0/8:5432}\n  - {name: b, protocol: postgres, address: 10.1.2.3:5432}\n",
        Path::new("bench"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let dst = "10.1.2.3:5432".parse().unwrap_or_else(|e| panic!("{e}"));
    c.bench_function("target_for", |b| {
        b.iter(|| policy.target_for(black_box(dst)))
    });
}

criterion_group!(
    benches,
    fingerprint,
    analysis,
    decision,
    target_matching,
    statement,
    bulk
);
criterion_main!(benches);
