//! Policy and SQL benchmarks (criterion): fingerprint, full analysis,
//! warm-cache decision, and a 20 MiB bulk INSERT.
//!
//! `cargo bench -p interceptor-user --bench policy` (or `cargo xtask bench`).
use std::{hint::black_box, path::Path, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use interceptor::{
    identity::Identity,
    policy::{DecisionRequest, Engine, PolicyFile, SessionState},
    sql::{self, Dialect, Fingerprint, LexMode, Limits, Resolution, Scratch},
};

const POINT_SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;";
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
    for (name, text) in [("pgbench_point_select", POINT_SELECT), ("join", JOIN)] {
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
    bulk
);
criterion_main!(benches);
