//! A large policy for the decision benchmark and the no-allocation test: 100 servers,
//! 100 policies, each policy with one allow rule and one deny rule on every server.

#![allow(dead_code)]

use toolmesh_proto::v1alpha1 as pb;
use toolmesh_sidecar::policy::{LimiterSource, ServerPolicy};
use toolmesh_sidecar::ratelimit::Limiter;

pub const SERVERS: usize = 100;
pub const POLICIES: usize = 100;

struct Fresh;
impl LimiterSource for Fresh {
    fn limiter(&self, _: &[u8]) -> Option<std::sync::Arc<Limiter>> {
        None
    }
}

pub fn policies() -> Vec<pb::Policy> {
    (0..POLICIES)
        .map(|p| pb::Policy {
            name: format!("policy-{p}"),
            rules: (0..SERVERS)
                .flat_map(|s| {
                    [
                        pb::Rule {
                            server: format!("server-{s}"),
                            tools: vec![
                                format!("get_{p}_*"),
                                format!("list_{p}_*"),
                                format!("tool_{p}"),
                            ],
                            ..Default::default()
                        },
                        pb::Rule {
                            server: format!("server-{s}"),
                            tools: vec![format!("delete_{p}_*")],
                            action: pb::Action::Deny as i32,
                            ..Default::default()
                        },
                    ]
                })
                .collect(),
            subjects: Vec::new(),
        })
        .collect()
}

/// The compiled rules of one server of the fixture.
pub fn server_policy(policies: &[pb::Policy], server: usize) -> ServerPolicy {
    ServerPolicy::compile(
        &format!("server-{server}"),
        policies,
        &Fresh,
        &mut Vec::new(),
    )
}
