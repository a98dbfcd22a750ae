//! The aggregated `/mcp`: three servers we did not all write (`server-everything`, the
//! rmcp demo server, the TypeScript SDK's server) behind one endpoint, used by the
//! official TypeScript and Python SDK clients in both generations.

use anyhow::Result;
use serde_json::{Value, json};
use toolmesh_tests::{DemoServer, Everything, Sidecar, TsServer};

use crate::peers::run_client;
use crate::support::{audit_lines, borrow, eventually, modern_headers, post};

/// `everything` as `ev__…`, the demo server under its own name, the TypeScript server
/// unprefixed; everything allowed but `get-sum` and the TypeScript server's secrets.
fn config(everything: &str, demo: &str, ts: &str) -> String {
    format!(
        r#"apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {{name: everything}}
spec: {{endpoints: [{{url: "{everything}"}}], allowUnauthenticated: true, timeout: 20s, prefix: ev}}
---
apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {{name: demo}}
spec: {{endpoints: [{{url: "{demo}"}}], allowUnauthenticated: true, timeout: 20s}}
---
apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {{name: ts}}
spec: {{endpoints: [{{url: "{ts}"}}], allowUnauthenticated: true, timeout: 20s, prefix: ""}}
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: tests}}
spec:
  subjects: [{{identity: "agents/*"}}]
  rules:
    - {{server: everything, tools: ["*"], prompts: ["*"], resources: ["*"]}}
    - {{server: everything, action: deny, tools: [get-sum]}}
    - {{server: demo, tools: ["*"], prompts: ["*"], resources: ["*"]}}
    - {{server: ts, tools: [echo], prompts: [public_prompt], resources: ["docs://public/**"]}}
"#
    )
}

fn plan() -> Value {
    json!({
        "ev-echo": ["ev__echo", {"message": "one endpoint"}],
        "demo-echo": ["demo__echo", {"text": "hi"}],
        "ts-echo": ["echo", {"text": "unprefixed"}],
        "progress": ["ev__trigger-long-running-operation", {"duration": 1, "steps": 3}],
        "ev-sampling": ["ev__trigger-sampling-request", {"prompt": "Capital of France?"}],
        "demo-sampling": ["demo__test_sampling", {"prompt": "Capital?"}],
        "demo-elicitation": ["demo__test_elicitation", {"message": "Who?"}],
    })
}

struct Three {
    everything: Everything,
    _demo: DemoServer,
    ts: TsServer,
    sidecar: Sidecar,
}

async fn three() -> Result<Three> {
    let everything = Everything::start().await?;
    let demo = DemoServer::start(&[]).await?;
    let ts = TsServer::start().await?;
    let sidecar = Sidecar::start(&config(&everything.url(), &demo.url(), &ts.url()), &[]).await?;
    Ok(Three {
        everything,
        _demo: demo,
        ts,
        sidecar,
    })
}

fn aggregate_url(sidecar: &Sidecar) -> String {
    format!("http://{}/mcp", sidecar.mcp)
}

fn check_report(kind: &str, report: &Value) {
    let tools: Vec<&str> = report["tools"]
        .as_array()
        .map(|t| t.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for expected in ["ev__echo", "demo__echo", "echo", "demo__test_sampling"] {
        assert!(
            tools.contains(&expected),
            "{kind}: {expected} missing: {tools:?}"
        );
    }
    for hidden in ["ev__get-sum", "write_file", "delete_file", "get-sum"] {
        assert!(
            !tools.contains(&hidden),
            "{kind}: {hidden} shown: {tools:?}"
        );
    }
    assert!(
        tools
            .iter()
            .all(|t| t.starts_with("ev__") || t.starts_with("demo__") || *t == "echo"),
        "{kind}: every name is prefixed but the unprefixed server's: {tools:?}"
    );
    let steps = &report["steps"];
    assert_eq!(
        steps["ev-echo"]["text"], "Echo: one endpoint",
        "{kind}: {report}"
    );
    assert_eq!(steps["demo-echo"]["text"], "hi", "{kind}: {report}");
    assert_eq!(steps["ts-echo"]["text"], "unprefixed", "{kind}: {report}");
}

#[tokio::test]
async fn sdk_clients_use_three_servers_through_one_endpoint() -> Result<()> {
    let t = three().await?;
    let url = aggregate_url(&t.sidecar);
    for kind in ["typescript", "python"] {
        let report = run_client(kind, &url, &plan()).await?;
        check_report(kind, &report);
        let steps = &report["steps"];
        // Sampling and elicitation from two servers in one session, answered by the agent.
        assert!(
            steps["ev-sampling"]["text"]
                .as_str()
                .unwrap_or_default()
                .contains("Paris"),
            "{kind}: {report}"
        );
        assert_eq!(
            steps["demo-sampling"]["text"], "LLM response: Paris",
            "{kind}: {report}"
        );
        assert!(
            steps["demo-elicitation"]["text"]
                .as_str()
                .unwrap_or_default()
                .contains("action=decline"),
            "{kind}: {report}"
        );
        assert_eq!(
            report["seen"],
            json!({"progress": 3, "sampling": 2, "elicitation": 1}),
            "{kind}: {report}"
        );
    }
    // The unprefixed server ran the calls under their real names.
    assert!(
        t.ts.logs().contains("call echo {\"text\":\"unprefixed\"}"),
        "{}",
        t.ts.logs()
    );
    // Audit and metrics name the real server and tool.
    let audited = || {
        audit_lines(&t.sidecar)
            .iter()
            .any(|l| l["server"] == "ts" && l["name"] == "echo")
    };
    assert!(
        eventually(5, || async { audited() }).await,
        "{}",
        t.sidecar.logs()
    );
    let audit = audit_lines(&t.sidecar);
    assert!(
        audit.iter().any(|l| l["server"] == "everything"
            && l["name"] == "echo"
            && l["decision"] == "allowed"),
        "{audit:?}"
    );
    assert!(
        audit
            .iter()
            .any(|l| l["server"] == "ts" && l["name"] == "echo"),
        "{audit:?}"
    );
    drop(t.everything);
    Ok(())
}

#[tokio::test]
async fn a_2026_agent_uses_2025_and_2026_servers_through_the_aggregate() -> Result<()> {
    let t = three().await?;
    let url = aggregate_url(&t.sidecar);
    // server-everything and the TypeScript server speak only 2025-11-25: bridged. The
    // demo server speaks 2026-07-28: reached statelessly.
    let plan = json!({
        "ev-echo": ["ev__echo", {"message": "one endpoint"}],
        "demo-echo": ["demo__echo", {"text": "hi"}],
        "ts-echo": ["echo", {"text": "unprefixed"}],
        "progress": ["ev__trigger-long-running-operation", {"duration": 1, "steps": 3}],
    });
    let report = run_client("python-modern", &url, &plan).await?;
    assert_eq!(report["version"], "2026-07-28", "{report}");
    check_report("python-modern", &report);
    assert_eq!(report["seen"]["progress"], 3, "{report}");
    Ok(())
}

#[tokio::test]
async fn the_aggregate_decides_on_the_real_server_and_name() -> Result<()> {
    let t = three().await?;
    let url = aggregate_url(&t.sidecar);
    let v = modern_headers("ev__get-sum");
    let call = |id: u64, name: &str, arguments: Value| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {
            "name": name, "arguments": arguments,
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}})
        .to_string()
    };
    // Denied on the real server under its real name: the same decision as /mcp/everything.
    let r = post(
        &url,
        &borrow(&v),
        call(1, "ev__get-sum", json!({"a": 1, "b": 2})),
    )
    .await?;
    assert_eq!(r.error_code(), Some(-32088), "{r:?}");
    let direct = post(
        &t.sidecar.url("everything"),
        &borrow(&modern_headers("get-sum")),
        call(2, "get-sum", json!({"a": 1, "b": 2})),
    )
    .await?;
    assert_eq!(direct.error_code(), Some(-32088), "{direct:?}");
    let denials = || {
        audit_lines(&t.sidecar)
            .into_iter()
            .filter(|l| l["decision"] == "denied")
            .collect::<Vec<Value>>()
    };
    assert!(
        eventually(5, || async { denials().len() >= 2 }).await,
        "{}",
        t.sidecar.logs()
    );
    let denied = denials();
    assert!(
        denied
            .iter()
            .all(|l| l["server"] == "everything" && l["name"] == "get-sum"),
        "{denied:?}"
    );
    assert_eq!(denied.len(), 2, "{denied:?}");

    // A name the header says differently is refused before anything is decided.
    let r = post(
        &url,
        &borrow(&modern_headers("ev__echo")),
        call(3, "ev__get-sum", json!({})),
    )
    .await?;
    assert_eq!(r.error_code(), Some(-32020), "{r:?}");

    // The unprefixed server's tools the policy hides stay hidden and refused, and a
    // name no prefix owns goes to the unprefixed server, where policy decides.
    let r = post(
        &url,
        &borrow(&modern_headers("write_file")),
        call(4, "write_file", json!({"path": "/x"})),
    )
    .await?;
    assert_eq!(r.error_code(), Some(-32088), "{r:?}");
    let r = post(
        &url,
        &borrow(&modern_headers("nope__echo")),
        call(5, "nope__echo", json!({})),
    )
    .await?;
    assert_eq!(r.error_code(), Some(-32088), "{r:?}");
    assert!(!t.ts.logs().contains("call write_file"), "{}", t.ts.logs());

    // server/discover is the sidecar's own answer.
    let discover = json!({"jsonrpc": "2.0", "id": 6, "method": "server/discover", "params": {
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}})
    .to_string();
    let h = [
        ("mcp-protocol-version", "2026-07-28".to_owned()),
        ("mcp-method", "server/discover".to_owned()),
    ];
    let r = post(&url, &borrow(&h), discover).await?;
    let result = &r.json()["result"];
    assert!(
        result["supportedVersions"]
            .as_array()
            .is_some_and(|v| v.contains(&json!("2026-07-28"))),
        "{r:?}"
    );

    // Resources are read from the server that listed them; a secret one is refused.
    let list = json!({"jsonrpc": "2.0", "id": 7, "method": "resources/list", "params": {
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}})
    .to_string();
    let h = [
        ("mcp-protocol-version", "2026-07-28".to_owned()),
        ("mcp-method", "resources/list".to_owned()),
    ];
    let r = post(&url, &borrow(&h), list).await?;
    let uris: Vec<String> = r.json()["result"]["resources"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["uri"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        uris.contains(&"docs://public/readme".to_owned()),
        "{uris:?}"
    );
    assert!(!uris.contains(&"docs://secret/keys".to_owned()), "{uris:?}");
    let read = |id: u64, uri: &str| {
        json!({"jsonrpc": "2.0", "id": id, "method": "resources/read", "params": {
            "uri": uri, "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}})
        .to_string()
    };
    let h = |uri: &str| {
        vec![
            ("mcp-protocol-version", "2026-07-28".to_owned()),
            ("mcp-method", "resources/read".to_owned()),
            ("mcp-name", uri.to_owned()),
        ]
    };
    let r = post(
        &url,
        &borrow(&h("docs://public/readme")),
        read(8, "docs://public/readme"),
    )
    .await?;
    assert!(r.text.contains("contents of docs://public/readme"), "{r:?}");
    let r = post(
        &url,
        &borrow(&h("docs://secret/keys")),
        read(9, "docs://secret/keys"),
    )
    .await?;
    assert!(r.error_code().is_some(), "{r:?}");
    assert!(
        !t.ts.logs().contains("read docs://secret/keys"),
        "{}",
        t.ts.logs()
    );
    Ok(())
}
