//! Time per policy decision against a large policy (100 servers x 100 policies).
//!
//! `cargo bench -p toolmesh-sidecar --bench decision` prints nanoseconds per decision
//! for an allowed call, a denied call (deny rule), a default-denied call, and a list
//! visibility check. No external harness: a warm-up, then the best of several timed
//! batches, which is stable enough on a busy 2-core machine.

#[path = "../tests/fixture.rs"]
mod fixture;
#[path = "support/timing.rs"]
mod timing;

use std::hint::black_box;

use toolmesh_sidecar::mcp::TargetKind;

const BATCH: u32 = 200_000;
const ROUNDS: usize = 7;

fn best_ns(f: impl FnMut()) -> f64 {
    timing::best_ns(BATCH, ROUNDS, f)
}

fn main() {
    let policies = fixture::policies();
    let policy = fixture::server_policy(&policies, 42);
    println!(
        "policy: {} servers x {} policies; per server {} rules",
        fixture::SERVERS,
        fixture::POLICIES,
        fixture::POLICIES * 2
    );
    for (label, name) in [
        ("allowed (late rule, prefix glob)", "get_99_issue"),
        ("allowed (early rule, exact)", "tool_0"),
        ("denied by a deny rule", "delete_50_repo"),
        ("denied by default (no rule)", "unknown_tool"),
    ] {
        let ns = best_ns(|| {
            black_box(policy.decide(TargetKind::Tool, black_box(name), None));
        });
        println!("tools/call decision, {label:<34} {ns:>8.1} ns");
    }
    let ns = best_ns(|| {
        black_box(policy.visible(TargetKind::Tool, black_box("get_99_issue")));
    });
    println!("list visibility check                          {ns:>8.1} ns");
}
