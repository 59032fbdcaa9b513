//! Policy and SQL benchmarks (criterion): fingerprint, full analysis,
//! warm-cache decision.
use criterion::{Criterion, criterion_group, criterion_main};

fn target_matching(c: &mut Criterion) {
    let policy = interceptor::policy::PolicyFile::parse(
        "version: 1\ntargets:\n  - {name: a, protocol: postgres, address: 10.0.0.0/8:5432}\n  - {name: b, protocol: postgres, address: 10.1.2.3:5432}\n",
        std::path::Path::new("bench"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let dst = "10.1.2.3:5432".parse().unwrap_or_else(|e| panic!("{e}"));
    c.bench_function("target_for", |b| {
        b.iter(|| policy.target_for(std::hint::black_box(dst)))
    });
}

criterion_group!(benches, target_matching);
criterion_main!(benches);
