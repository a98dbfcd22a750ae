use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::*;
use crate::kubernetes::mock::{ApiServer, Call, Cluster, PLURALS};

fn server(name: &str, generation: i64, spec: Value) -> Arc<McpServerObject> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "toolmesh.dev/v1alpha1", "kind": "McpServer",
            "metadata": {"name": name, "namespace": "toolmesh-system", "generation": generation},
            "spec": spec,
        }))
        .expect("McpServer object"),
    )
}

fn policy(name: &str, generation: i64, spec: Value) -> Arc<AccessPolicyObject> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": "toolmesh.dev/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": name, "namespace": "toolmesh-system", "generation": generation},
            "spec": spec,
        }))
        .expect("AccessPolicy object"),
    )
}

fn secret_json(name: &str, data: &[(&str, &[u8])]) -> Value {
    use base64::Engine;
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| {
            (
                (*k).to_owned(),
                json!(base64::engine::general_purpose::STANDARD.encode(v)),
            )
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "toolmesh-system", "resourceVersion": "1"}, "data": data})
}

fn secret(name: &str, data: &[(&str, &[u8])]) -> Arc<KubeSecret> {
    Arc::new(serde_json::from_value(secret_json(name, data)).expect("Secret"))
}

fn with_credential(url: &str) -> Value {
    json!({"endpoints": [{"url": url}], "credential": {"header": "Authorization", "prefix": "Bearer ", "secretRef": {"name": "gh", "key": "token"}}})
}

fn allow_all(servers: &[&str]) -> Value {
    let rules: Vec<Value> = servers
        .iter()
        .map(|s| json!({"server": s, "tools": ["*"]}))
        .collect();
    json!({"subjects": [{"identity": "agents/*"}], "rules": rules})
}

fn verdict<'a>(verdicts: &'a [Verdict], kind: Kind, name: &str) -> &'a Verdict {
    verdicts
        .iter()
        .find(|v| v.kind == kind && v.name == name)
        .unwrap_or_else(|| panic!("no verdict for {kind}/{name}: {verdicts:#?}"))
}

#[test]
fn valid_objects_are_served_with_only_the_secrets_they_name() {
    let mut last = LastGood::new();
    let (set, verdicts) = build(
        &[
            server("github", 1, with_credential("https://mcp.example.com/mcp")),
            server(
                "plain",
                1,
                json!({"endpoints": [{"url": "http://10.0.0.1/mcp"}], "allowUnauthenticated": true}),
            ),
        ],
        &[policy("triage", 1, allow_all(&["github", "plain"]))],
        &[
            secret("gh", &[("token", b"s3cret"), ("other", b"not-needed")]),
            secret("unrelated", &[("password", b"hunter2")]),
        ],
        &mut last,
    );
    validate_set(&set).expect("servable");
    assert_eq!(set.servers.len(), 2);
    assert_eq!(set.policies["triage"].spec.rules.len(), 2);
    assert_eq!(set.secrets.len(), 1, "only the Secret a server names");
    assert_eq!(
        set.secrets["gh"].data,
        BTreeMap::from([("token".to_owned(), "s3cret".to_owned())]),
        "only the key it names"
    );
    assert!(
        verdicts.iter().all(|v| v.ready && v.reason == "Accepted"),
        "{verdicts:#?}"
    );
    assert_eq!(verdicts.len(), 3);
    assert_eq!(
        verdict(&verdicts, Kind::McpServer, "github").generation,
        Some(1)
    );
}

#[test]
fn a_server_without_its_credential_is_not_served_and_rules_about_it_drop_out() {
    let mut last = LastGood::new();
    for (case, secrets) in [
        ("missing secret", vec![]),
        ("missing key", vec![secret("gh", &[("other", b"x")])]),
        ("not text", vec![secret("gh", &[("token", &[0xff, 0xfe])])]),
    ] {
        let (set, verdicts) = build(
            &[
                server("github", 3, with_credential("https://mcp.example.com/mcp")),
                server(
                    "plain",
                    1,
                    json!({"endpoints": [{"url": "http://10.0.0.1/mcp"}], "allowUnauthenticated": true}),
                ),
            ],
            &[policy("triage", 2, allow_all(&["github", "plain"]))],
            &secrets,
            &mut last,
        );
        validate_set(&set).expect("servable");
        assert!(!set.servers.contains_key("github"), "{case}");
        assert!(set.secrets.is_empty(), "{case}");
        let v = verdict(&verdicts, Kind::McpServer, "github");
        assert_eq!(
            (v.ready, v.reason, v.generation),
            (false, "SecretMissing", Some(3)),
            "{case}"
        );
        assert!(v.message.contains("\"gh\""), "{case}: {}", v.message);
        // The policy still applies to the server that is served.
        let rules = &set.policies["triage"].spec.rules;
        assert_eq!(rules.len(), 1, "{case}");
        assert_eq!(rules[0].server, "plain");
        let v = verdict(&verdicts, Kind::AccessPolicy, "triage");
        assert_eq!((v.ready, v.reason), (false, "ServerMissing"), "{case}");
        assert!(
            v.message.contains("spec.rules[0]") && v.message.contains("github"),
            "{}",
            v.message
        );
    }
}

#[test]
fn an_invalid_update_keeps_the_last_valid_version_and_a_new_invalid_object_is_left_out() {
    let mut last = LastGood::new();
    let deny = json!({"subjects": [{"identity": "agents/*"}], "rules": [
        {"server": "plain", "tools": ["*"]},
        {"server": "plain", "tools": ["delete_*"], "action": "deny"},
    ]});
    let plain = server(
        "plain",
        1,
        json!({"endpoints": [{"url": "http://10.0.0.1/mcp"}], "allowUnauthenticated": true}),
    );
    let (set, _) = build(
        std::slice::from_ref(&plain),
        &[policy("p", 1, deny.clone())],
        &[],
        &mut last,
    );
    assert_eq!(set.policies["p"].spec.rules.len(), 2);

    // Generation 2 is broken (a bad duration the API server's schema cannot catch): the
    // deny rule of generation 1 keeps applying.
    let mut broken = deny.clone();
    broken["rules"][0]["rateLimit"] = json!({"requests": 5, "per": "soon"});
    let (set, verdicts) = build(
        std::slice::from_ref(&plain),
        &[
            policy("p", 2, broken.clone()),
            policy("fresh", 1, broken.clone()),
        ],
        &[],
        &mut last,
    );
    assert_eq!(
        set.policies["p"].spec,
        serde_json::from_value(deny).expect("spec")
    );
    let v = verdict(&verdicts, Kind::AccessPolicy, "p");
    assert_eq!(
        (v.ready, v.reason, v.generation),
        (false, "Invalid", Some(2))
    );
    assert!(
        v.message.contains("spec.rules[0].rateLimit.per")
            && v.message.contains("previous valid version"),
        "{}",
        v.message
    );
    assert!(
        !set.policies.contains_key("fresh"),
        "never valid: not served"
    );
    assert!(
        verdict(&verdicts, Kind::AccessPolicy, "fresh")
            .message
            .contains("not served")
    );

    // Deleted, then re-created broken: nothing old comes back.
    let _ = build(std::slice::from_ref(&plain), &[], &[], &mut last);
    let (set, _) = build(&[plain], &[policy("p", 1, broken)], &[], &mut last);
    assert!(set.policies.is_empty());
}

#[test]
fn a_server_that_takes_another_ones_prefix_or_identity_is_left_out_alone() {
    let open = |url: &str, more: Value| {
        let mut spec = json!({"endpoints": [{"url": url}], "allowUnauthenticated": true});
        if let (Some(spec), Some(more)) = (spec.as_object_mut(), more.as_object()) {
            spec.extend(more.clone());
        }
        spec
    };
    let servers = [
        server("alpha", 1, open("http://a:1/mcp", json!({"prefix": "gh"}))),
        server("beta", 1, open("http://b:1/mcp", json!({"prefix": "gh"}))),
        server("gamma", 1, open("http://c:1/mcp", json!({}))),
        server(
            "m1",
            1,
            open(
                "https://m:1/mcp/m1",
                json!({"mesh": {"identity": "tools/x"}}),
            ),
        ),
        server(
            "m2",
            1,
            open(
                "https://m:1/mcp/m2",
                json!({"mesh": {"identity": "tools/x"}}),
            ),
        ),
    ];
    let (set, verdicts) = build(
        &servers,
        &[policy("p", 1, allow_all(&["alpha", "beta", "gamma"]))],
        &[],
        &mut LastGood::new(),
    );
    // The rest is served (and validates): one conflict does not hold everything back.
    validate_set(&set).expect("what is served is consistent");
    let served: Vec<&str> = set.servers.keys().map(String::as_str).collect();
    assert_eq!(served, ["alpha", "gamma", "m1"]);
    for (name, field, other) in [
        ("beta", "spec.prefix", "alpha"),
        ("m2", "spec.mesh.identity", "m1"),
    ] {
        let v = verdict(&verdicts, Kind::McpServer, name);
        assert_eq!((v.ready, v.reason), (false, "Conflict"), "{v:?}");
        assert!(
            v.message.contains(field) && v.message.contains(other),
            "{v:?}"
        );
    }
    let p = verdict(&verdicts, Kind::AccessPolicy, "p");
    assert_eq!(p.reason, "ServerMissing", "{p:?}");
}

async fn wait_for(store: &KubeStore, what: &str, done: impl Fn(&ResourceSet) -> bool) {
    let mut changes = store.changes();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done(&store.resources()) {
        tokio::time::timeout_at(deadline, changes.changed())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("store alive");
    }
}

#[tokio::test]
async fn the_store_lists_then_follows_watches_in_its_namespace() {
    let cluster = Cluster::default();
    {
        cluster.put("mcpservers", vec![json!({
            "apiVersion": "toolmesh.dev/v1alpha1", "kind": "McpServer",
            "metadata": {"name": "github", "namespace": "toolmesh-system", "generation": 1, "resourceVersion": "5"},
            "spec": with_credential("https://mcp.example.com/mcp"),
        })]);
        cluster.put("accesspolicies", vec![]);
        cluster.put("secrets", vec![secret_json("gh", &[("token", b"v1")])]);
    }
    let api = ApiServer::new({
        let cluster = cluster.clone();
        move |call: &Call| cluster.answer(call)
    });
    let store = KubeStore::start(api.client(), "toolmesh-system")
        .await
        .expect("synced");
    assert_eq!(
        store.resources().servers.len(),
        1,
        "served from the first lists"
    );
    assert_eq!(store.resources().secrets["gh"].data["token"], "v1");

    // What went on the wire: a list, then a watch from its resourceVersion, per kind,
    // namespaced, for exactly these three resources.
    let calls = api.calls();
    for prefix in [
        "/apis/toolmesh.dev/v1alpha1/namespaces/toolmesh-system/mcpservers?",
        "/apis/toolmesh.dev/v1alpha1/namespaces/toolmesh-system/accesspolicies?",
        "/api/v1/namespaces/toolmesh-system/secrets?",
    ] {
        let mine: Vec<&Call> = calls
            .iter()
            .filter(|c| c.path.starts_with(prefix))
            .collect();
        assert!(mine.iter().all(|c| c.method == "GET"), "{mine:#?}");
        assert!(
            !mine.is_empty() && !mine[0].path.contains("watch=true"),
            "{mine:#?}"
        );
    }
    assert!(
        calls
            .iter()
            .all(|c| c.method == "GET" && PLURALS.contains(&Cluster::plural(&c.path))),
        "nothing else is asked, nothing is written: {calls:#?}"
    );

    let mut rotated = secret_json("gh", &[("token", b"v2")]);
    rotated["metadata"]["resourceVersion"] = json!("11");
    cluster
        .send("secrets", json!({"type": "MODIFIED", "object": rotated}))
        .await;
    let watch = api
        .calls()
        .into_iter()
        .find(|c| c.path.contains("/secrets?") && c.path.contains("watch=true"))
        .expect("secrets watch");
    assert!(watch.path.contains("resourceVersion=10"), "{}", watch.path);

    wait_for(&store, "the rotated secret", |set| {
        set.secrets
            .get("gh")
            .is_some_and(|s| s.data["token"] == "v2")
    })
    .await;

    cluster.send("accesspolicies", json!({"type": "ADDED", "object": {
        "apiVersion": "toolmesh.dev/v1alpha1", "kind": "AccessPolicy",
        "metadata": {"name": "triage", "namespace": "toolmesh-system", "generation": 1, "resourceVersion": "12"},
        "spec": allow_all(&["github"]),
    }})).await;
    wait_for(&store, "the new policy", |set| {
        set.policies.contains_key("triage")
    })
    .await;

    cluster
        .send("secrets", json!({"type": "DELETED", "object": rotated}))
        .await;
    wait_for(&store, "the server to stop being served", |set| {
        set.servers.is_empty()
    })
    .await;
    let verdicts = store.verdicts().borrow().clone();
    assert_eq!(
        verdict(&verdicts, Kind::McpServer, "github").reason,
        "SecretMissing"
    );
    assert_eq!(
        verdict(&verdicts, Kind::AccessPolicy, "triage").reason,
        "ServerMissing"
    );

    // Writes through the store are refused with the way to do it instead.
    let err = store.apply(vec![]).expect_err("read-only").to_string();
    assert!(err.contains("kubectl apply"), "{err}");
}
