//! Render resources + an identity into that identity's snapshot.
//!
//! The one function both the control plane and the sidecar's standalone mode use, so
//! that what a sidecar enforces never depends on where its config came from. A
//! snapshot holds only what the identity needs: the policies whose subjects match
//! it, the servers those policies name, and the credentials of those servers alone.
//! Its version is a content hash: rendering the same inputs twice gives the same
//! version, and any change that identity can observe gives a new one.

use prost::Message;
use sha2::{Digest, Sha256};

use crate::resource::{
    ActionSpec, DEFAULT_SERVER_TIMEOUT, McpServer, RateLimitScope, ResourceError, ResourceSet,
    RuleSpec, SubjectSpec, Transport, parse_duration, validate_set,
};
use crate::v1alpha1 as pb;

/// Render the snapshot for `identity` from a validated resource set.
pub fn render(set: &ResourceSet, identity: &str) -> Result<pb::Snapshot, ResourceError> {
    validate_set(set)?;
    let policies: Vec<pb::Policy> = set
        .policies
        .values()
        .filter(|p| p.spec.subjects.iter().any(|s| s.matches_workload(identity)))
        .map(|p| pb::Policy {
            name: p.metadata.name.clone(),
            rules: p.spec.rules.iter().map(render_rule).collect(),
            subjects: Vec::new(),
        })
        .collect();
    let servers = named_servers(set, &policies);
    let served = set
        .servers
        .values()
        .filter(|s| s.spec.mesh.as_ref().is_some_and(|m| m.identity == identity))
        .map(|s| render_served(set, s))
        .collect();
    let mut snapshot = pb::Snapshot {
        version: String::new(),
        identity: identity.to_owned(),
        servers,
        policies,
        served,
        issuers: Vec::new(),
    };
    snapshot.version = content_version(&snapshot);
    Ok(snapshot)
}

/// Render the snapshot of a gateway running as `identity`: every policy with a token
/// subject (`user`, `issuer`, `clientId`, `scopes`, `claims`), carrying those subjects
/// alone, which the gateway matches per request; the servers they name, with their
/// credentials. Workload subjects stay out: a gateway never acts for a sidecar.
pub fn render_gateway(set: &ResourceSet, identity: &str) -> Result<pb::Snapshot, ResourceError> {
    validate_set(set)?;
    let policies: Vec<pb::Policy> = set
        .policies
        .values()
        .filter_map(|p| {
            let subjects: Vec<pb::Subject> = p
                .spec
                .subjects
                .iter()
                .filter(|s| s.is_token())
                .map(render_subject)
                .collect();
            (!subjects.is_empty()).then(|| pb::Policy {
                name: p.metadata.name.clone(),
                rules: p.spec.rules.iter().map(render_rule).collect(),
                subjects,
            })
        })
        .collect();
    let servers = named_servers(set, &policies);
    let mut snapshot = pb::Snapshot {
        version: String::new(),
        identity: identity.to_owned(),
        servers,
        policies,
        served: Vec::new(),
        issuers: Vec::new(),
    };
    snapshot.version = content_version(&snapshot);
    Ok(snapshot)
}

/// The servers `policies` name, rendered, in name order.
fn named_servers(set: &ResourceSet, policies: &[pb::Policy]) -> Vec<pb::Server> {
    let mut names: Vec<&str> = policies
        .iter()
        .flat_map(|p| p.rules.iter().map(|r| r.server.as_str()))
        .collect();
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .filter_map(|n| set.servers.get(n))
        .map(|s| render_server(set, s))
        .collect()
}

/// The encoded size of the largest snapshot `set` can render: one for an identity
/// every policy names, holding every policy and every server they name. Subjects are
/// globs, so the identities that will connect cannot be listed; every real snapshot
/// is a part of this one, so it bounds them all.
pub fn largest_snapshot_bytes(set: &ResourceSet) -> usize {
    let policies: Vec<pb::Policy> = set
        .policies
        .values()
        .map(|p| pb::Policy {
            name: p.metadata.name.clone(),
            rules: p.spec.rules.iter().map(render_rule).collect(),
            // A gateway's snapshot carries token subjects too.
            subjects: p.spec.subjects.iter().map(render_subject).collect(),
        })
        .collect();
    let named: std::collections::BTreeSet<&str> = policies
        .iter()
        .flat_map(|p| p.rules.iter().map(|r| r.server.as_str()))
        .collect();
    let snapshot = pb::Snapshot {
        // The longest a version and an identity get.
        version: "0".repeat(16),
        identity: "x".repeat(253),
        servers: named
            .into_iter()
            .filter_map(|n| set.servers.get(n))
            .map(|s| render_server(set, s))
            .collect(),
        policies,
        // At most one server per mesh identity; the largest one bounds them.
        served: set
            .servers
            .values()
            .filter(|s| s.spec.mesh.is_some())
            .map(|s| render_served(set, s))
            .max_by_key(|s| s.encoded_len())
            .into_iter()
            .collect(),
        issuers: Vec::new(),
    };
    snapshot.encoded_len()
}

/// The content hash of a snapshot, ignoring its `version` field.
pub fn content_version(snapshot: &pb::Snapshot) -> String {
    let mut unversioned = snapshot.clone();
    unversioned.version.clear();
    let digest = Sha256::digest(unversioned.encode_to_vec());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// A server the identity runs behind its server-side sidecar: every policy's rules
/// for it, with the policy's subjects.
fn render_served(set: &ResourceSet, server: &McpServer) -> pb::Served {
    let name = server.metadata.name.as_str();
    let policies = set
        .policies
        .values()
        .filter(|p| p.spec.rules.iter().any(|r| r.server == name))
        .map(|p| pb::SubjectPolicy {
            // Callers here are workloads (their certificates name them).
            subjects: p
                .spec
                .subjects
                .iter()
                .filter(|s| !s.is_token())
                .map(|s| s.identity.clone())
                .collect(),
            policy: Some(pb::Policy {
                name: p.metadata.name.clone(),
                rules: p
                    .spec
                    .rules
                    .iter()
                    .filter(|r| r.server == name)
                    .map(render_rule)
                    .collect(),
                subjects: Vec::new(),
            }),
        })
        .collect();
    pb::Served {
        name: name.to_owned(),
        timeout_ms: server_timeout_ms(server),
        policies,
        credential: render_credential(set, server),
    }
}

fn server_timeout_ms(server: &McpServer) -> u64 {
    let timeout = server
        .spec
        .timeout
        .as_deref()
        .and_then(|t| parse_duration(t).ok())
        .unwrap_or(DEFAULT_SERVER_TIMEOUT);
    u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)
}

fn render_server(set: &ResourceSet, server: &McpServer) -> pb::Server {
    let spec = &server.spec;
    pb::Server {
        name: server.metadata.name.clone(),
        endpoints: spec
            .endpoints
            .iter()
            .map(|e| pb::Endpoint { url: e.url.clone() })
            .collect(),
        // A server in the mesh gets its credential from its own sidecar: agent sidecars
        // never hold it.
        credential: if spec.mesh.is_some() {
            None
        } else {
            render_credential(set, server)
        },
        timeout_ms: server_timeout_ms(server),
        mesh: spec.mesh.as_ref().map(|m| pb::Mesh {
            identity: m.identity.clone(),
        }),
        prefix: spec.prefix.clone(),
        transport: match spec.transport {
            Transport::StreamableHttp => pb::Transport::StreamableHttp,
            Transport::Sse => pb::Transport::Sse,
        }
        .into(),
        pins: spec.pins.as_deref().map(render_pins),
        oauth: spec.oauth.as_deref().map(|o| render_oauth(set, o)),
    }
}

fn render_oauth(set: &ResourceSet, oauth: &crate::resource::OAuthSpec) -> pb::OAuth {
    // validate_set has checked that the secret and key exist.
    let secret = oauth.client_secret_ref.as_ref().and_then(|r| {
        let value = set.secrets.get(&r.name)?.data.get(&r.key)?;
        Some((value.clone(), format!("{}/{}", r.name, r.key)))
    });
    let (client_secret, client_secret_source) = secret.unwrap_or_default();
    pb::OAuth {
        grant: match oauth.grant {
            crate::resource::Grant::ClientCredentials => pb::o_auth::Grant::ClientCredentials,
            crate::resource::Grant::TokenExchange => pb::o_auth::Grant::TokenExchange,
        }
        .into(),
        token_url: oauth.token_url.clone(),
        client_id: oauth.client_id.clone(),
        client_secret,
        client_secret_source,
        scopes: oauth.scopes.clone(),
        audience: oauth.audience.clone(),
        resource: oauth.resource.clone(),
    }
}

fn render_pins(pins: &crate::resource::PinsSpec) -> pb::Pins {
    let each = |map: &std::collections::BTreeMap<String, crate::resource::PinSpec>| {
        map.iter()
            .map(|(name, pin)| {
                let fields = pin
                    .fields
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                (
                    name.clone(),
                    pb::Pin {
                        digest: pin.digest.clone(),
                        fields,
                    },
                )
            })
            .collect()
    };
    pb::Pins {
        warn: pins.mode == crate::resource::PinMode::Warn,
        allow_unpinned: pins.unpinned == crate::resource::Unpinned::Allow,
        tools: each(&pins.tools),
        prompts: each(&pins.prompts),
    }
}

fn render_credential(set: &ResourceSet, server: &McpServer) -> Option<pb::Credential> {
    server.spec.credential.as_ref().and_then(|c| {
        // validate_set has checked that the secret and key exist.
        let value = set
            .secrets
            .get(&c.secret_ref.name)?
            .data
            .get(&c.secret_ref.key)?;
        Some(pb::Credential {
            header: c.header.to_ascii_lowercase(),
            value: format!("{}{}", c.prefix, value),
            source: format!("{}/{}", c.secret_ref.name, c.secret_ref.key),
        })
    })
}

fn render_subject(s: &SubjectSpec) -> pb::Subject {
    pb::Subject {
        identity: s.identity.clone(),
        user: s.user.clone(),
        issuer: s.issuer.clone(),
        client_id: s.client_id.clone(),
        scopes: s.scopes.clone(),
        claims: s.claims.clone(),
    }
}

fn render_rule(rule: &RuleSpec) -> pb::Rule {
    pb::Rule {
        server: rule.server.clone(),
        tools: rule.tools.clone(),
        resources: rule.resources.clone(),
        prompts: rule.prompts.clone(),
        action: match rule.action {
            ActionSpec::Allow => pb::Action::Allow,
            ActionSpec::Deny => pb::Action::Deny,
        } as i32,
        rate_limit: rule.rate_limit.as_ref().map(|rl| pb::RateLimit {
            requests: rl.requests,
            per_ms: parse_duration(&rl.per)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or_default(),
            shared: rl.scope == RateLimitScope::Rule,
        }),
        conditions: rule
            .conditions
            .iter()
            .map(|c| pb::ArgumentCondition {
                path: c.argument.clone(),
                matches: c.matches.clone(),
            })
            .collect(),
        audit_arguments: rule.audit.is_some_and(|a| a.arguments),
    }
}

/// A copy of `snapshot` that is safe to show: credential values replaced.
pub fn redacted(snapshot: &pb::Snapshot) -> pb::Snapshot {
    let mut copy = snapshot.clone();
    for server in &mut copy.servers {
        if let Some(cred) = &mut server.credential {
            cred.value = REDACTED.to_owned();
        }
        if let Some(oauth) = server
            .oauth
            .as_mut()
            .filter(|o| !o.client_secret.is_empty())
        {
            oauth.client_secret = REDACTED.to_owned();
        }
    }
    for served in &mut copy.served {
        if let Some(cred) = &mut served.credential {
            cred.value = REDACTED.to_owned();
        }
    }
    copy
}

/// A rule's `action` as its name (`allow`, `deny`) in JSON dumps such as `/config`.
pub fn action_name<S: serde::Serializer>(action: &i32, out: S) -> Result<S::Ok, S::Error> {
    match pb::Action::try_from(*action) {
        Ok(pb::Action::Allow) => out.serialize_str("allow"),
        Ok(pb::Action::Deny) => out.serialize_str("deny"),
        Err(_) => out.serialize_i32(*action),
    }
}

/// What stands in for a secret in every dump.
pub const REDACTED: &str = "<redacted>";

#[cfg(test)]
mod tests;
