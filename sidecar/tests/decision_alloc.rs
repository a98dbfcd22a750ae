//! A `tools/call` decision allocates nothing, even against a large policy.

mod fixture;

use std::alloc::System;

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use toolmesh_sidecar::mcp::TargetKind;
use toolmesh_sidecar::policy::Decision;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

#[test]
fn tools_call_decisions_do_not_allocate() {
    let policies = fixture::policies();
    let policy = fixture::server_policy(&policies, 42);
    let names = [
        "get_57_issue",
        "delete_3_repo",
        "tool_99",
        "unknown_tool",
        "list_0_x",
    ];
    let region = Region::new(GLOBAL);
    let mut allowed = 0;
    for _ in 0..1000 {
        for name in names {
            if matches!(
                policy.decide(TargetKind::Tool, name, None),
                Decision::Allow(_)
            ) {
                allowed += 1;
            }
        }
    }
    let stats = region.change();
    assert_eq!(allowed, 3000, "get_57_*, tool_99 and list_0_* are allowed");
    assert_eq!(stats.allocations, 0, "{stats:?}");
}
