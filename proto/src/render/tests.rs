use super::*;
use crate::resource::{ResourceSet, parse_resources};

const RESOURCES: &str = r#"
apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {name: github}
spec:
  endpoints: [{url: "https://mcp.example.com/mcp"}]
  credential: {header: Authorization, secretRef: {name: github-token, key: token}, prefix: "Bearer "}
---
apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {name: payroll}
spec:
  endpoints: [{url: "http://payroll:8080/mcp"}]
  credential: {header: X-API-Key, secretRef: {name: payroll-key, key: key}}
  timeout: 5s
---
apiVersion: toolmesh.dev/v1alpha1
kind: Secret
metadata: {name: github-token}
data: {token: "gh-secret"}
---
apiVersion: toolmesh.dev/v1alpha1
kind: Secret
metadata: {name: payroll-key}
data: {key: "payroll-secret"}
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {name: triage}
spec:
  subjects: [{identity: "agents/*"}]
  rules:
    - server: github
      tools: ["get_*"]
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {name: finance}
spec:
  subjects: [{identity: "agents/finance"}]
  rules:
    - server: payroll
      tools: ["*"]
      audit: {arguments: true}
"#;

fn set() -> ResourceSet {
    ResourceSet::new(parse_resources(RESOURCES).expect("valid")).expect("set")
}

#[test]
fn an_identity_gets_only_its_servers_and_credentials() {
    let snap = render(&set(), "agents/triage").expect("render");
    assert_eq!(snap.identity, "agents/triage");
    let names: Vec<_> = snap.servers.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["github"]);
    assert_eq!(snap.policies.len(), 1);
    let encoded = format!("{snap:?}");
    assert!(encoded.contains("gh-secret"));
    assert!(
        !encoded.contains("payroll-secret"),
        "another server's credential leaked"
    );

    let finance = render(&set(), "agents/finance").expect("render");
    let names: Vec<_> = finance.servers.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["github", "payroll"]);
    let payroll = &finance.servers[1];
    assert_eq!(payroll.timeout_ms, 5_000);
    let cred = payroll.credential.as_ref().expect("credential");
    assert_eq!(
        (cred.header.as_str(), cred.value.as_str()),
        ("x-api-key", "payroll-secret")
    );
    assert!(finance.policies[0].rules[0].audit_arguments);
}

#[test]
fn an_identity_no_policy_names_gets_nothing() {
    let snap = render(&set(), "humans/bob").expect("render");
    assert!(snap.servers.is_empty());
    assert!(snap.policies.is_empty());
}

#[test]
fn version_is_a_content_hash() {
    let a = render(&set(), "agents/triage").expect("render");
    let b = render(&set(), "agents/triage").expect("render");
    assert_eq!(a.version, b.version);
    assert_eq!(a.version.len(), 16);
    // A change the identity cannot see leaves its version alone...
    let changed = RESOURCES.replacen("payroll-secret", "rotated", 1);
    let set2 = ResourceSet::new(parse_resources(&changed).expect("valid")).expect("set");
    assert_eq!(
        render(&set2, "agents/triage").expect("render").version,
        a.version
    );
    // ...and one it can see changes it.
    assert_ne!(
        render(&set2, "agents/finance").expect("render").version,
        render(&set(), "agents/finance").expect("render").version
    );
}

#[test]
fn redaction_hides_every_credential() {
    let snap = render(&set(), "agents/finance").expect("render");
    let shown = serde_json::to_string(&redacted(&snap)).expect("json");
    assert!(
        !shown.contains("gh-secret") && !shown.contains("payroll-secret"),
        "{shown}"
    );
    assert!(shown.contains(REDACTED));
    assert!(shown.contains("github-token/token"));
}

#[test]
fn a_server_side_identity_gets_every_callers_rules_for_its_server_only() {
    let text = format!(
        "{RESOURCES}\n---\napiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {{name: files}}\nspec:\n  endpoints: [{{url: \"https://files:16030/mcp/files\"}}]\n  mesh: {{identity: tools/files}}\n  credential: {{header: X-Api-Key, secretRef: {{name: payroll-key, key: key}}}}\n---\napiVersion: toolmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: readers}}\nspec:\n  subjects: [{{identity: \"agents/*\"}}, {{identity: ops/bot}}]\n  rules:\n    - server: files\n      tools: [\"read_*\"]\n    - server: github\n      tools: [\"*\"]\n"
    );
    let set = ResourceSet::new(parse_resources(&text).expect("parses")).expect("set");
    // The agent's snapshot routes to files through the mesh.
    let agent = render(&set, "agents/triage").expect("renders");
    let files = agent
        .servers
        .iter()
        .find(|s| s.name == "files")
        .expect("routed");
    assert_eq!(
        files.mesh.as_ref().map(|m| m.identity.as_str()),
        Some("tools/files")
    );
    // Its credential is not the agent's to hold: the server-side sidecar injects it.
    assert!(files.credential.is_none());
    assert!(!format!("{agent:?}").contains("payroll-secret"));
    assert!(agent.served.is_empty());
    // The server-side sidecar's: files, with the readers policy's subjects and only its
    // rule for files (not github's, nor other policies').
    let server = render(&set, "tools/files").expect("renders");
    assert!(server.servers.is_empty() && server.policies.is_empty());
    assert_eq!(server.served.len(), 1);
    let served = &server.served[0];
    assert_eq!(served.name, "files");
    assert_eq!(
        served.credential.as_ref().map(|c| c.value.as_str()),
        Some("payroll-secret")
    );
    assert!(!format!("{:?}", redacted(&server)).contains("payroll-secret"));
    assert_eq!(served.policies.len(), 1);
    assert_eq!(served.policies[0].subjects, ["agents/*", "ops/bot"]);
    let policy = served.policies[0].policy.as_ref().expect("policy");
    assert_eq!(policy.name, "readers");
    assert_eq!(policy.rules.len(), 1);
    assert_eq!(policy.rules[0].server, "files");
    assert!(largest_snapshot_bytes(&set) >= prost::Message::encoded_len(&server));
}

const TOKEN_POLICY: &str = r#"
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {name: developers}
spec:
  subjects:
    - {user: "*@example.com", issuer: "https://idp.example.com", scopes: [mcp]}
    - {identity: "agents/finance"}
  rules:
    - server: payroll
      tools: ["read_*"]
"#;

fn set_with_tokens() -> ResourceSet {
    let text = format!("{RESOURCES}{TOKEN_POLICY}");
    ResourceSet::new(parse_resources(&text).expect("valid")).expect("set")
}

#[test]
fn a_gateway_gets_token_policies_with_their_token_subjects_only() {
    let snap = render_gateway(&set_with_tokens(), "toolmesh/gateway").expect("render");
    let names: Vec<_> = snap.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["developers"], "workload-only policies stay out");
    let subjects = &snap.policies[0].subjects;
    assert_eq!(subjects.len(), 1, "the workload subject is not a gateway's");
    assert_eq!(subjects[0].user, "*@example.com");
    assert_eq!(subjects[0].scopes, ["mcp"]);
    let servers: Vec<_> = snap.servers.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(servers, ["payroll"]);
    assert!(format!("{snap:?}").contains("payroll-secret"));
    assert!(!format!("{snap:?}").contains("gh-secret"));
}

#[test]
fn a_token_subject_never_matches_a_workload() {
    // agents/finance gets the developers policy through its identity subject, and no
    // subjects travel to a sidecar.
    let finance = render(&set_with_tokens(), "agents/finance").expect("render");
    let names: Vec<_> = finance.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["developers", "finance", "triage"]);
    assert!(finance.policies.iter().all(|p| p.subjects.is_empty()));
    // A user glob that would match the identity's text does not make it a user.
    let other = render(&set_with_tokens(), "alice@example.com").expect("render");
    assert!(other.policies.is_empty());
}
