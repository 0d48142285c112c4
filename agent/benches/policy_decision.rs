//! One policy decision on the proxy's hot path: `Authorizer::decide` for a workload that 20 of a
//! 1,000-policy set select (the set: `support/policy_set.rs`). The goal is a median under 1 µs.
//!
//! `cargo bench -p ferry-agent --bench policy_decision`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};

#[path = "support/policy_set.rs"]
mod policy_set;

use policy_set::TARGET;

/// Benchmarks the mTLS call, the plaintext call and the longest walk (no policy matches).
fn decide(c: &mut Criterion) {
    let a = policy_set::authorizer();
    let cases = policy_set::cases();
    let mut group = c.benchmark_group("policy_decision");
    // `cases` lists these three first.
    for (id, case) in ["mtls_allowed", "plaintext_allowed", "mtls_no_allow_match"].into_iter().zip(&cases) {
        let conn = case.connection();
        // A benchmark of the wrong decision would measure nothing useful.
        case.check(&a, &a.decide(TARGET, &conn));
        group.bench_function(id, |b| b.iter(|| a.decide(black_box(TARGET), black_box(&conn))));
    }
    group.finish();
}

criterion_group!(benches, decide);
criterion_main!(benches);
