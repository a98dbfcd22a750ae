//! The aggregated `/mcp`: three servers we did not all write (`server-everything`, the
//! rmcp demo server, the TypeScript SDK's server) behind one endpoint, used by the
//! official TypeScript and Python SDK clients in both generations.

use anyhow::{Context, Result};
use serde_json::{Value, json};
use toolmesh_tests::{DemoServer, Everything, PyServer, Sidecar, TsServer};

use crate::peers::run_client;
use crate::support::{audit_lines, borrow, eventually, modern_headers, post};

/// One `McpServer` document: `name` at `url`, no credential, with `more` spec fields.
fn server(name: &str, url: &str, more: &str) -> String {
    format!(
        "apiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {{name: {name}}}\nspec: {{endpoints: [{{url: \"{url}\"}}], allowUnauthenticated: true{more}}}\n---\n"
    )
}

/// The tests' `AccessPolicy` with `rules` (YAML flow mappings, one per line).
fn policy(rules: &[&str]) -> String {
    let rules: Vec<String> = rules.iter().map(|r| format!("    - {r}\n")).collect();
    format!(
        "apiVersion: toolmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: tests}}\nspec:\n  subjects: [{{identity: \"agents/*\"}}]\n  rules:\n{}",
        rules.concat()
    )
}

/// `everything` as `ev__…`, the demo server under its own name, the TypeScript server
/// unprefixed; everything allowed but `get-sum` and the TypeScript server's secrets.
fn config(everything: &str, demo: &str, ts: &str) -> String {
    [
        server("everything", everything, ", timeout: 20s, prefix: ev"),
        server("demo", demo, ", timeout: 20s"),
        server("ts", ts, ", timeout: 20s, prefix: \"\""),
        policy(&[
            r#"{server: everything, tools: ["*"], prompts: ["*"], resources: ["*"]}"#,
            "{server: everything, action: deny, tools: [get-sum]}",
            r#"{server: demo, tools: ["*"], prompts: ["*"], resources: ["*"]}"#,
            r#"{server: ts, tools: [echo], prompts: [public_prompt], resources: ["docs://public/**"]}"#,
        ]),
    ]
    .concat()
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
    // The 2025 server's sampling and elicitation requests reach the agent as
    // input_required rounds; its answers go back to the server that asked.
    let plan = json!({
        "ev-echo": ["ev__echo", {"message": "one endpoint"}],
        "demo-echo": ["demo__echo", {"text": "hi"}],
        "ts-echo": ["echo", {"text": "unprefixed"}],
        "progress": ["ev__trigger-long-running-operation", {"duration": 1, "steps": 3}],
        "ev-sampling": ["ev__trigger-sampling-request", {"prompt": "Capital of France?"}],
        "ev-elicitation": ["ev__trigger-elicitation-request", {}],
    });
    let report = run_client("python-modern", &url, &plan).await?;
    assert_eq!(report["version"], "2026-07-28", "{report}");
    check_report("python-modern", &report);
    assert!(
        report["steps"]["ev-sampling"]["text"]
            .as_str()
            .is_some_and(|t| t.contains("Paris")),
        "{report}"
    );
    assert_eq!(
        report["steps"]["ev-elicitation"]["error"], false,
        "{report}"
    );
    assert_eq!(
        report["seen"],
        json!({"progress": 3, "sampling": 1, "elicitation": 1}),
        "{report}"
    );
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

/// The data of the next SSE event on `resp` containing `needle`, within `secs`.
async fn event_with(
    resp: &mut reqwest::Response,
    buf: &mut String,
    needle: &str,
    secs: u64,
) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim_start)
                .collect();
            let data = data.join("\n");
            if data.contains(needle) {
                return serde_json::from_str(&data).ok();
            }
        }
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .ok()?
            .ok()??;
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
}

/// `toolmesh_aggregate_<cache>_cache_total` for `server` and `result` in a `/metrics`
/// text.
fn cache_count(metrics: &str, cache: &str, server: &str, result: &str) -> f64 {
    let name = format!("toolmesh_aggregate_{cache}_cache_total{{");
    metrics
        .lines()
        .filter(|l| {
            l.starts_with(&name)
                && l.contains(&format!("server=\"{server}\""))
                && l.contains(&format!("result=\"{result}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A 2026-07-28 `resources/read` of `uri` on `url`, with more `params`: its result.
async fn modern_read(url: &str, uri: &str, params: Value) -> Result<Value> {
    let mut params = params;
    params["uri"] = json!(uri);
    params["_meta"] = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"}});
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "resources/read", "params": params});
    let h = [
        ("mcp-protocol-version", "2026-07-28".to_owned()),
        ("mcp-method", "resources/read".to_owned()),
        ("mcp-name", uri.to_owned()),
    ];
    let r = post(url, &borrow(&h), body.to_string()).await?;
    let result = r.message()["result"].clone();
    anyhow::ensure!(result.is_object(), "no result: {r:?}");
    Ok(result)
}

/// A 2026-07-28 `subscriptions/listen` (`body`) on `url`: its stream.
async fn subscriptions_listen(url: &str, body: &Value) -> Result<reqwest::Response> {
    let stream = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "subscriptions/listen")
        .body(body.to_string())
        .send()
        .await?;
    assert_eq!(stream.status(), 200);
    Ok(stream)
}

/// A 2025 session's GET stream on `url`.
async fn get_stream(url: &str, session: &str) -> Result<reqwest::Response> {
    let stream = reqwest::Client::new()
        .get(url)
        .header("accept", "text/event-stream")
        .header("mcp-protocol-version", "2025-11-25")
        .header("mcp-session-id", session)
        .send()
        .await?;
    assert_eq!(stream.status(), 200);
    Ok(stream)
}

/// Call the TypeScript server's `add_tool` (exposed as `tool`) with new names starting
/// `name` until a list change reaches the agent's `stream`: the sidecar opens the
/// servers' streams as the agent's opens, so the first calls may come before.
async fn add_until_changed(
    url: &str,
    session: &str,
    tool: &str,
    name: &str,
    stream: &mut reqwest::Response,
    buf: &mut String,
) -> Result<Option<Value>> {
    for i in 0..20 {
        let r = call(
            url,
            session,
            10 + i,
            tool,
            json!({"text": format!("{name}{i}")}),
        )
        .await?;
        assert!(
            r.message()["result"]["content"][0]["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("added")),
            "{r:?}"
        );
        let changed = event_with(stream, buf, "notifications/tools/list_changed", 1).await;
        if changed.is_some() {
            return Ok(changed);
        }
    }
    Ok(None)
}

fn two_config(demo: &str, ts: &str, demo_allowed: bool) -> String {
    let mut rules = vec![r#"{server: ts, tools: ["*"]}"#];
    if demo_allowed {
        rules.push(r#"{server: demo, tools: ["*"]}"#);
    }
    [
        server("demo", demo, ", timeout: 5s"),
        server("ts", ts, ", timeout: 5s"),
        policy(&rules),
    ]
    .concat()
}

const V2025: (&str, &str) = ("mcp-protocol-version", "2025-11-25");

/// A 2025 session of the aggregate: its sealed id.
async fn initialize(url: &str) -> Result<String> {
    let r = post(
        url,
        &[],
        r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"raw","version":"0"}}}"#,
    )
    .await?;
    assert_eq!(
        r.message()["result"]["protocolVersion"],
        "2025-11-25",
        "{r:?}"
    );
    let session = r
        .headers
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no session id: {r:?}"))?;
    assert!(session.starts_with("tm1."), "sealed: {session}");
    let r = post(
        url,
        &[V2025, ("mcp-session-id", &session)],
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
    )
    .await?;
    assert_eq!(r.status, 202, "{r:?}");
    Ok(session)
}

async fn tool_names(url: &str, session: &str) -> Result<Vec<String>> {
    let r = post(
        url,
        &[V2025, ("mcp-session-id", session)],
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
    )
    .await?;
    let names = r.message()["result"]["tools"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(|t| t["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Ok(names)
}

async fn call(
    url: &str,
    session: &str,
    id: u64,
    name: &str,
    arguments: Value,
) -> Result<crate::support::Reply> {
    let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": name, "arguments": arguments}});
    post(url, &[V2025, ("mcp-session-id", session)], body.to_string()).await
}

#[tokio::test]
async fn a_list_change_on_one_server_reaches_agents_of_both_generations() -> Result<()> {
    let demo = DemoServer::start(&[]).await?;
    let ts = TsServer::start().await?;
    let sidecar = Sidecar::start(&two_config(&demo.url(), &ts.url(), true), &[]).await?;
    let url = aggregate_url(&sidecar);

    // 2025: the session's GET stream carries what the TypeScript server sends on its own.
    let session = initialize(&url).await?;
    let mut stream = get_stream(&url, &session).await?;
    let mut buf = String::new();
    let changed = add_until_changed(
        &url,
        &session,
        "ts__add_tool",
        "fresh",
        &mut stream,
        &mut buf,
    )
    .await?;
    assert!(
        changed.is_some(),
        "no list change reached the agent: {}",
        sidecar.logs()
    );
    let names = tool_names(&url, &session).await?;
    assert!(
        names.iter().any(|n| n.starts_with("ts__fresh")),
        "{names:?}"
    );
    assert!(names.iter().any(|n| n == "demo__echo"), "{names:?}");

    // 2026-07-28: subscriptions/listen is acknowledged first, then carries the list
    // change of the session the sidecar holds with the 2025-only server, tagged.
    let listen = json!({"jsonrpc": "2.0", "id": "sub-1", "method": "subscriptions/listen", "params": {
        "notifications": {"toolsListChanged": true, "resourceSubscriptions": ["docs://x"]},
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}});
    let mut sub = subscriptions_listen(&url, &listen).await?;
    let mut buf = String::new();
    let ack = event_with(&mut sub, &mut buf, "acknowledged", 5).await;
    let ack = ack.ok_or_else(|| anyhow::anyhow!("no acknowledgement"))?;
    assert_eq!(
        ack["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], "sub-1",
        "{ack}"
    );
    assert_eq!(
        ack["params"]["notifications"],
        json!({"toolsListChanged": true}),
        "only what is honoured: {ack}"
    );
    let mut changed = None;
    for i in 0..20 {
        let body = json!({"jsonrpc": "2.0", "id": 100 + i, "method": "tools/call", "params": {
            "name": "ts__add_tool", "arguments": {"text": format!("modern{i}")},
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}});
        let h = crate::support::modern_headers("ts__add_tool");
        let r = post(&url, &borrow(&h), body.to_string()).await?;
        assert!(
            r.message()["result"]["content"][0]["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("added")),
            "{r:?}"
        );
        assert_eq!(r.message()["id"], 100 + i, "the agent's own id back: {r:?}");
        changed = event_with(&mut sub, &mut buf, "notifications/tools/list_changed", 1).await;
        if changed.is_some() {
            break;
        }
    }
    let changed = changed
        .ok_or_else(|| anyhow::anyhow!("no list change on the subscription: {}", sidecar.logs()))?;
    assert_eq!(
        changed["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], "sub-1",
        "{changed}"
    );
    Ok(())
}

#[tokio::test]
async fn a_server_down_is_left_out_and_comes_back_and_policy_changes_apply_live() -> Result<()> {
    let demo = DemoServer::start(&[]).await?;
    let addr = demo.addr;
    let ts = TsServer::start().await?;
    let sidecar = Sidecar::start(&two_config(&demo.url(), &ts.url(), true), &[]).await?;
    let url = aggregate_url(&sidecar);
    let session = initialize(&url).await?;
    let r = call(&url, &session, 2, "demo__echo", json!({"text": "before"})).await?;
    assert_eq!(
        r.message()["result"]["content"][0]["text"],
        "before",
        "{r:?}"
    );

    // The demo server dies: its tools are left out, the other server still answers,
    // and a call to it fails fast with the sidecar's error.
    let mut demo = demo;
    demo.proc.terminate().await?;
    let started = std::time::Instant::now();
    let names = tool_names(&url, &session).await?;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(names.iter().all(|n| !n.starts_with("demo__")), "{names:?}");
    assert!(names.iter().any(|n| n == "ts__echo"), "{names:?}");
    let r = call(&url, &session, 3, "demo__echo", json!({"text": "down"})).await?;
    assert_eq!(r.error_code(), Some(-32085), "{r:?}");
    let (_, metrics) = crate::support::admin(&sidecar, "/metrics").await?;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("toolmesh_aggregate_list_failures_total{")
                && l.contains("server=\"demo\"")),
        "{metrics}"
    );

    // It comes back at the same address (a new process: the session is gone): the
    // same agent session calls it again.
    let mut cmd = tokio::process::Command::new(toolmesh_tests::binary("toolmesh-demo-server"));
    cmd.args(["--listen", &addr.to_string()]);
    let mut again = toolmesh_tests::Proc::spawn("toolmesh-demo-server", cmd)?;
    again
        .wait_for("its listening line", toolmesh_tests::listening_on)
        .await?;
    let r = call(&url, &session, 4, "demo__echo", json!({"text": "after"})).await?;
    assert_eq!(
        r.message()["result"]["content"][0]["text"],
        "after",
        "{r:?}"
    );

    // The policy stops allowing the demo server: its tools vanish from the list live.
    sidecar.write_config(&two_config(&format!("http://{addr}/mcp"), &ts.url(), false))?;
    let gone = crate::support::eventually(10, || async {
        tool_names(&url, &session)
            .await
            .is_ok_and(|names| !names.is_empty() && names.iter().all(|n| !n.starts_with("demo__")))
    })
    .await;
    assert!(gone, "{:?}", tool_names(&url, &session).await?);
    let r = call(&url, &session, 5, "demo__echo", json!({"text": "denied"})).await?;
    assert!(r.error_code().is_some(), "{r:?}");
    Ok(())
}

#[tokio::test]
async fn lists_are_cached_as_long_as_their_servers_say_and_no_longer() -> Result<()> {
    // Two servers that say their list keeps for a minute, one that says nothing.
    let start = |ttl: &'static str| async move {
        let mut cmd =
            tokio::process::Command::new(toolmesh_tests::binary("toolmesh-bench-upstream"));
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--tools",
            "3",
            "--list-ttl-ms",
            ttl,
        ]);
        let mut proc = toolmesh_tests::Proc::spawn("toolmesh-bench-upstream", cmd)?;
        let addr = proc
            .wait_for("its listening line", toolmesh_tests::listening_on)
            .await?;
        anyhow::Ok((proc, format!("http://{addr}/mcp")))
    };
    let (_kept, kept) = start("60000").await?;
    let (_fresh, fresh) = start("0").await?;
    let yaml = |hidden: &str, with_c: bool| {
        let deny = format!("{{server: a, action: deny, tools: [{hidden}]}}");
        let mut rules = vec![
            r#"{server: a, tools: ["*"]}"#,
            &deny,
            r#"{server: b, tools: ["*"]}"#,
        ];
        let mut docs = vec![server("a", &kept, ""), server("b", &kept, "")];
        if with_c {
            rules.push(r#"{server: c, tools: ["*"]}"#);
            docs.push(server("c", &fresh, ""));
        }
        docs.push(policy(&rules));
        docs.concat()
    };
    let sidecar = Sidecar::start(&yaml("t000", true), &[]).await?;
    let url = aggregate_url(&sidecar);
    let list = || async {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}});
        let h = [
            ("mcp-protocol-version", "2026-07-28".to_owned()),
            ("mcp-method", "tools/list".to_owned()),
        ];
        let r = post(&url, &borrow(&h), body.to_string()).await?;
        anyhow::Ok(r.message()["result"].clone())
    };
    let hits = || async {
        let (_, metrics) = crate::support::admin(&sidecar, "/metrics").await?;
        let count = |server| cache_count(&metrics, "list", server, "hit");
        anyhow::Ok((count("a"), count("b"), count("c")))
    };
    let first = list().await?;
    let names = |r: &Value| -> Vec<String> {
        r["tools"]
            .as_array()
            .map(|t| {
                t.iter()
                    .filter_map(|t| t["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(!names(&first).contains(&"a__t000".to_owned()), "{first}");
    assert_eq!(names(&first).len(), 8, "{first}");
    // One server's list may not be kept: neither may the merged one.
    assert_eq!(first["ttlMs"], 0, "{first}");
    assert_eq!(first["cacheScope"], "private", "{first}");
    let second = list().await?;
    assert_eq!(names(&second), names(&first));
    let (a, b, c) = hits().await?;
    assert!(a >= 1.0 && b >= 1.0 && c == 0.0, "hits a={a} b={b} c={c}");

    // A new snapshot is a new cache: the policy's change shows at once.
    sidecar.write_config(&yaml("t001", true))?;
    let changed = crate::support::eventually(10, || async {
        list().await.is_ok_and(|r| {
            let n = names(&r);
            n.contains(&"a__t000".to_owned()) && !n.contains(&"a__t001".to_owned())
        })
    })
    .await;
    assert!(changed, "{}", list().await?);

    // Without the server that says nothing, the merged list keeps as long as the
    // shortest of its parts, and says so.
    sidecar.write_config(&yaml("t001", false))?;
    let kept = crate::support::eventually(10, || async {
        list().await.is_ok_and(|r| {
            r["ttlMs"].as_u64().is_some_and(|t| t > 0 && t <= 60_000)
                && names(&r).iter().all(|n| !n.starts_with("c__"))
        })
    })
    .await;
    assert!(kept, "{}", list().await?);
    Ok(())
}

#[tokio::test]
async fn a_2026_agent_uses_a_2025_only_server_on_its_own_path_too() -> Result<()> {
    let t = three().await?;
    // server-everything speaks only 2025-11-25: the sidecar bridges /mcp/everything.
    let plan = json!({
        "echo": ["echo", {"message": "bridged"}],
        "progress": ["trigger-long-running-operation", {"duration": 1, "steps": 3}],
        "sampling": ["trigger-sampling-request", {"prompt": "Capital of France?"}],
    });
    let report = run_client("python-modern", &t.sidecar.url("everything"), &plan).await?;
    assert_eq!(report["version"], "2026-07-28", "{report}");
    assert_eq!(report["steps"]["echo"]["text"], "Echo: bridged", "{report}");
    assert!(
        report["steps"]["sampling"]["text"]
            .as_str()
            .is_some_and(|t| t.contains("Paris")),
        "{report}"
    );
    assert_eq!(
        report["seen"],
        json!({"progress": 3, "sampling": 1, "elicitation": 0}),
        "{report}"
    );
    let tools: Vec<&str> = report["tools"]
        .as_array()
        .map(|t| t.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(
        tools.contains(&"echo") && !tools.contains(&"get-sum"),
        "{tools:?}"
    );
    assert!(
        tools.iter().all(|t| !t.contains("__")),
        "names as the server gives them: {tools:?}"
    );
    // The same decision as relayed: a denied tool is refused, and never ran.
    let h = crate::support::modern_headers("get-sum");
    let body = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {
        "name": "get-sum", "arguments": {"a": 1, "b": 2},
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}}});
    let r = post(&t.sidecar.url("everything"), &borrow(&h), body.to_string()).await?;
    assert_eq!(r.error_code(), Some(-32088), "{r:?}");
    // The dual-era demo server is still relayed as it is: its list result comes back
    // without the `resultType` a bridge would add (rmcp leaves it out).
    let h = [
        ("mcp-protocol-version", "2026-07-28".to_owned()),
        ("mcp-method", "tools/list".to_owned()),
    ];
    let list = json!({"jsonrpc": "2.0", "id": 10, "method": "tools/list", "params": {
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"}}}});
    let r = post(&t.sidecar.url("demo"), &borrow(&h), list.to_string()).await?;
    let result = &r.message()["result"];
    assert!(
        result["tools"].as_array().is_some_and(|t| !t.is_empty()),
        "{r:?}"
    );
    assert!(
        result.get("resultType").is_none(),
        "relayed, not bridged: {r:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_2025_agent_uses_a_2026_only_server_on_both_paths() -> Result<()> {
    // A server on the Python SDK that refuses the 2025 handshake, beside a 2025 one.
    let py = PyServer::start().await?;
    let demo = DemoServer::start(&[]).await?;
    let yaml = [
        server("py", &py.url(), ", timeout: 20s"),
        server("demo", &demo.url(), ", timeout: 20s"),
        policy(&[
            r#"{server: py, tools: ["*"], prompts: ["*"], resources: ["*"]}"#,
            r#"{server: demo, tools: [echo]}"#,
        ]),
    ]
    .concat();
    let sidecar = Sidecar::start(&yaml, &[]).await?;
    // Directly, a 2025-only client cannot use the server at all.
    let direct = run_client("typescript", &py.url(), &json!({})).await;
    assert!(direct.is_err(), "the server took a 2025 client: {direct:?}");
    // First the server's own path: the first handshake is relayed, refused, and from
    // then on the sidecar holds the agents' sessions, names as the server gives them.
    // Then the aggregate, where the server is known by then.
    let paths = [
        (
            sidecar.url("py"),
            "",
            json!(["capital", "echo", "greet", "sleep", "touch"]),
        ),
        (
            aggregate_url(&sidecar),
            "py__",
            json!([
                "demo__echo",
                "py__capital",
                "py__echo",
                "py__greet",
                "py__sleep",
                "py__touch"
            ]),
        ),
    ];
    for (url, prefix, tools) in &paths {
        // The last two are input_required rounds, answered by the agent as server
        // requests.
        let plan = json!({
            "echo": [format!("{prefix}echo"), {"text": "across generations"}],
            "elicitation": [format!("{prefix}greet"), {}],
            "sampling": [format!("{prefix}capital"), {"prompt": "Capital of France?"}],
        });
        for kind in ["typescript", "python"] {
            let report = run_client(kind, url, &plan).await?;
            assert_eq!(&report["tools"], tools, "{kind} {url}: {report}");
            let steps = &report["steps"];
            let expected = [
                ("echo", "across generations"),
                ("elicitation", "action=decline"),
                ("sampling", "model said: Paris"),
            ];
            for (step, text) in expected {
                assert_eq!(steps[step]["text"], text, "{kind} {url}: {report}");
            }
            assert_eq!(
                report["seen"],
                json!({"progress": 0, "sampling": 1, "elicitation": 1}),
                "{kind} {url}: {report}"
            );
        }
    }
    // From the server's side: each tool ran with the agent's answers, for all four
    // agents.
    let logs = py.logs();
    assert_eq!(
        logs.matches("call greet action=decline").count(),
        4,
        "{logs}"
    );
    assert_eq!(
        logs.matches("call capital sampled=Paris").count(),
        4,
        "{logs}"
    );
    // The direct client, and the first agent's relayed handshake: once per snapshot,
    // not once per agent or use.
    assert_eq!(
        logs.matches("refused POST").count(),
        2,
        "handshakes: {logs}"
    );
    Ok(())
}

#[tokio::test]
async fn a_bridged_round_belongs_to_its_agent_call_and_is_taken_once() -> Result<()> {
    let t = three().await?;
    let url = t.sidecar.url("everything");
    let call = |tool: &str, arguments: Value, retry: Option<(&str, Value)>| {
        let mut params = json!({
            "name": tool,
            "arguments": arguments,
            "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {"sampling": {}},
                "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"}},
        });
        if let Some((state, responses)) = retry {
            params["requestState"] = state.into();
            params["inputResponses"] = responses;
        }
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}).to_string()
    };
    let ask = json!({"prompt": "Capital of France?"});
    let sample = |key: &str| json!({key: {"role": "assistant", "content": {"type": "text", "text": "Paris"}, "model": "m"}});
    let h = crate::support::modern_headers("trigger-sampling-request");
    // The sampling call again, with `state` and the agent's answer under `key`.
    let retry = |state: &str, key: &str| {
        call(
            "trigger-sampling-request",
            ask.clone(),
            Some((state, sample(key))),
        )
    };
    let send = |h: &[(&'static str, String)], body: String| {
        let (url, h) = (url.clone(), h.to_vec());
        async move { post(&url, &borrow(&h), body).await }
    };
    let round = |reply: &crate::support::Reply| -> (String, String) {
        let result = &reply.message()["result"];
        assert_eq!(result["resultType"], "input_required", "{reply:?}");
        let requests = result["inputRequests"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let (key, request) = requests.iter().next().expect("an input request");
        assert_eq!(request["method"], "sampling/createMessage", "{reply:?}");
        let state = result["requestState"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        (key.clone(), state)
    };

    // The server's sampling request arrives as a round.
    let first = send(&h, call("trigger-sampling-request", ask.clone(), None)).await?;
    let (key, state) = round(&first);
    // The state cannot be spent on another tool (and is gone once tried).
    let echo = crate::support::modern_headers("echo");
    let moved = send(
        &echo,
        call(
            "echo",
            json!({"message": "x"}),
            Some((&state, sample(&key))),
        ),
    )
    .await?;
    assert!(
        moved.text.contains("belongs to another request"),
        "{moved:?}"
    );
    let replayed = send(&h, retry(&state, &key)).await?;
    assert!(replayed.text.contains("names no call"), "{replayed:?}");
    // A state the sidecar did not seal names nothing.
    let forged = send(&h, retry("tm1.0.x.y", &key)).await?;
    assert!(forged.text.contains("names no call"), "{forged:?}");

    // A round answered as asked completes the call with the server's result.
    let first = send(&h, call("trigger-sampling-request", ask.clone(), None)).await?;
    let (key, state) = round(&first);
    let done = send(&h, retry(&state, &key)).await?;
    let result = &done.message()["result"];
    assert_eq!(result["resultType"], "complete", "{done:?}");
    assert!(result.to_string().contains("Paris"), "{done:?}");
    // Taken once: the same retry again is refused.
    let again = send(&h, retry(&state, &key)).await?;
    assert!(again.text.contains("names no call"), "{again:?}");
    Ok(())
}

#[tokio::test]
async fn a_long_merged_list_comes_in_pages_that_cover_it_once() -> Result<()> {
    // Two servers of 600 tools: 1,200 on /mcp, more than one page holds.
    let mut procs = Vec::new();
    let mut docs = Vec::new();
    for name in ["a", "b"] {
        let mut cmd =
            tokio::process::Command::new(toolmesh_tests::binary("toolmesh-bench-upstream"));
        cmd.args(["--listen", "127.0.0.1:0", "--tools", "600"]);
        let mut proc = toolmesh_tests::Proc::spawn("toolmesh-bench-upstream", cmd)?;
        let addr = proc
            .wait_for("its listening line", toolmesh_tests::listening_on)
            .await?;
        docs.push(server(name, &format!("http://{addr}/mcp"), ""));
        procs.push(proc);
    }
    docs.push(policy(&[
        r#"{server: a, tools: ["*"]}"#,
        r#"{server: b, tools: ["*"]}"#,
    ]));
    let sidecar = Sidecar::start(&docs.concat(), &[]).await?;
    let url = aggregate_url(&sidecar);
    let h = [
        ("mcp-protocol-version", "2026-07-28".to_owned()),
        ("mcp-method", "tools/list".to_owned()),
    ];
    let page = |cursor: Option<String>| {
        let (url, h) = (url.clone(), h.clone());
        async move {
            let mut params =
                json!({"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}});
            if let Some(cursor) = cursor {
                params["cursor"] = cursor.into();
            }
            let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": params});
            post(&url, &borrow(&h), body.to_string()).await
        }
    };
    let (mut names, mut pages, mut cursor) = (Vec::new(), 0, None);
    loop {
        let r = page(cursor.take()).await?;
        let result = r.message()["result"].clone();
        let tools = result["tools"].as_array().cloned().unwrap_or_default();
        assert!(!tools.is_empty() && tools.len() <= 1000, "{r:?}");
        names.extend(
            tools
                .iter()
                .filter_map(|t| t["name"].as_str().map(str::to_owned)),
        );
        pages += 1;
        match result["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
        assert!(pages < 5, "pages never end");
    }
    assert_eq!(pages, 2);
    let unique: std::collections::BTreeSet<&String> = names.iter().collect();
    assert_eq!((names.len(), unique.len()), (1200, 1200));
    assert!(names.contains(&"a__t000".to_owned()) && names.contains(&"b__t599".to_owned()));
    // A cursor the sidecar did not give is invalid params, as a server would say.
    let r = page(Some("bm90IG91cnM".to_owned())).await?;
    assert_eq!(r.message()["error"]["code"], -32602, "{r:?}");
    drop(procs);
    Ok(())
}

#[tokio::test]
async fn a_2025_agent_cancels_a_call_bridged_to_a_2026_only_server() -> Result<()> {
    let py = PyServer::start().await?;
    let yaml = [
        server("py", &py.url(), ", timeout: 20s"),
        policy(&[r#"{server: py, tools: ["*"]}"#]),
    ]
    .concat();
    let sidecar = Sidecar::start(&yaml, &[]).await?;
    let url = aggregate_url(&sidecar);
    let session = initialize(&url).await?;
    let started = std::time::Instant::now();
    let slow = tokio::spawn({
        let (url, session) = (url.clone(), session.clone());
        async move { call(&url, &session, 7, "py__sleep", json!({"seconds": 5})).await }
    });
    let ran = eventually(10, || async { py.logs().contains("call sleep start") }).await;
    assert!(ran, "{}", py.logs());
    let cancel = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
        "params": {"requestId": 7, "reason": "the user moved on"}});
    let r = post(
        &url,
        &[V2025, ("mcp-session-id", &session)],
        cancel.to_string(),
    )
    .await?;
    assert_eq!(r.status, 202, "{r:?}");
    // The agent's request ends at once, and the server's tool is cancelled: it never
    // finishes its sleep.
    let answered = slow.await??;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "the call outlived its cancellation: {answered:?}"
    );
    let cancelled = eventually(10, || async { py.logs().contains("call sleep cancelled") }).await;
    assert!(cancelled, "{}", py.logs());
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    assert!(!py.logs().contains("call sleep done"), "{}", py.logs());
    Ok(())
}

#[tokio::test]
async fn a_legacy_sse_server_serves_agents_of_both_generations() -> Result<()> {
    // The TypeScript SDK's server on its HTTP+SSE endpoint (2024-11-05 transport),
    // declared as such, beside a Streamable HTTP server.
    let ts = TsServer::start().await?;
    let demo = DemoServer::start(&[]).await?;
    let yaml = [
        server("old", &ts.legacy_url(), ", timeout: 20s, transport: sse"),
        server("demo", &demo.url(), ", timeout: 20s"),
        policy(&[
            r#"{server: old, tools: [echo, add_tool, write_file, "late*"], prompts: [public_prompt], resources: ["docs://public/**"]}"#,
            "{server: old, action: deny, tools: [write_file]}",
            "{server: demo, tools: [echo]}",
        ]),
    ]
    .concat();
    let sidecar = Sidecar::start(&yaml, &[]).await?;
    let url = aggregate_url(&sidecar);

    // SDK clients of both generations, on the server's own path and on the aggregate.
    let paths = [
        (sidecar.url("old"), "", json!(["add_tool", "echo"])),
        (
            url.clone(),
            "old__",
            json!(["demo__echo", "old__add_tool", "old__echo"]),
        ),
    ];
    for (path, prefix, tools) in &paths {
        let plan = json!({"echo": [format!("{prefix}echo"), {"text": "over the old transport"}]});
        for kind in ["typescript", "python", "python-modern"] {
            let report = run_client(kind, path, &plan).await?;
            assert_eq!(&report["tools"], tools, "{kind} {path}: {report}");
            assert_eq!(
                report["steps"]["echo"]["text"], "over the old transport",
                "{kind} {path}: {report}"
            );
        }
    }
    let logs = ts.logs();
    assert_eq!(
        logs.matches("call echo {\"text\":\"over the old transport\"}")
            .count(),
        6,
        "{logs}"
    );

    // A raw 2025 session on the server's own path: the sidecar's, as on the aggregate.
    let own = sidecar.url("old");
    let session = initialize(&own).await?;
    let r = call(&own, &session, 2, "write_file", json!({"path": "/tmp/x"})).await?;
    assert_eq!(r.error_code(), Some(-32088), "denied: {r:?}");
    let read = |id: u64, uri: &str| {
        json!({"jsonrpc": "2.0", "id": id, "method": "resources/read", "params": {"uri": uri}})
            .to_string()
    };
    let h = [V2025, ("mcp-session-id", session.as_str())];
    let r = post(&own, &h, read(3, "docs://public/readme")).await?;
    assert_eq!(
        r.message()["result"]["contents"][0]["text"],
        "contents of docs://public/readme",
        "{r:?}"
    );
    let r = post(&own, &h, read(4, "docs://secret/keys")).await?;
    assert!(r.error_code().is_some(), "a hidden resource: {r:?}");
    let prompt = json!({"jsonrpc": "2.0", "id": 5, "method": "prompts/get", "params": {"name": "public_prompt"}});
    let r = post(&own, &h, prompt.to_string()).await?;
    assert_eq!(
        r.message()["result"]["messages"][0]["content"]["text"],
        "public_prompt",
        "{r:?}"
    );
    let logs = ts.logs();
    assert!(
        !logs.contains("call write_file"),
        "a denied tool ran: {logs}"
    );
    assert!(
        !logs.contains("read docs://secret"),
        "a hidden resource was read: {logs}"
    );

    // A list change the server sends on its stream reaches a 2025 agent's GET stream.
    let session = initialize(&url).await?;
    let mut stream = get_stream(&url, &session).await?;
    let mut buf = String::new();
    let changed = add_until_changed(
        &url,
        &session,
        "old__add_tool",
        "late",
        &mut stream,
        &mut buf,
    )
    .await?;
    assert!(changed.is_some(), "no list change: {}", sidecar.logs());
    let names = tool_names(&url, &session).await?;
    assert!(
        names.iter().any(|n| n.starts_with("old__late")),
        "{names:?}"
    );

    // Nothing the agents got names the server's address or its POST endpoint.
    let r = post(
        &url,
        &[V2025, ("mcp-session-id", &session)],
        r#"{"jsonrpc":"2.0","id":40,"method":"tools/list"}"#,
    )
    .await?;
    assert!(
        !r.text.contains("/messages") && !r.text.contains(&ts.addr.to_string()),
        "{r:?}"
    );
    assert!(
        !buf.contains("/messages") && !buf.contains("endpoint"),
        "{buf}"
    );
    Ok(())
}

#[tokio::test]
async fn a_read_the_server_marks_cacheable_is_kept_for_its_ttl() -> Result<()> {
    // The Python SDK server marks its reads `ttlMs` 60000, `cacheScope` private.
    let py = PyServer::start().await?;
    let yaml = [
        server("py", &py.url(), ", timeout: 20s"),
        policy(&[r#"{server: py, tools: ["*"], resources: ["*"]}"#]),
    ]
    .concat();
    let sidecar = Sidecar::start(&yaml, &[]).await?;
    let url = aggregate_url(&sidecar);
    let read = |params: Value| modern_read(&url, "note://python/readme", params);
    let reads = || py.logs().matches("read note://python/readme").count();
    let first = read(json!({})).await?;
    assert_eq!(first["contents"][0]["text"], "hello from python", "{first}");
    assert_eq!(first["ttlMs"], 60000, "{first}");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let second = read(json!({})).await?;
    assert_eq!(second["contents"], first["contents"], "{second}");
    let left = second["ttlMs"].as_u64().unwrap_or_default();
    assert!((1..60000).contains(&left), "what remains: {second}");
    assert_eq!(reads(), 1, "answered from the cache: {}", py.logs());
    // A retry carrying input responses is its own exchange: never answered from the
    // cache.
    let _ = read(json!({"inputResponses": {}})).await?;
    assert_eq!(reads(), 2, "{}", py.logs());
    let (_, metrics) = crate::support::admin(&sidecar, "/metrics").await?;
    let count = |result| cache_count(&metrics, "read", "py", result);
    assert_eq!((count("hit"), count("miss")), (1.0, 1.0), "{metrics}");
    Ok(())
}

#[tokio::test]
async fn a_2026_agent_subscribes_to_resources_through_the_aggregate() -> Result<()> {
    // The Python SDK server announces resource updates to subscriptions/listen streams
    // (its `touch` tool); the policy shows one of its resources.
    let py = PyServer::start().await?;
    let yaml = [
        server("py", &py.url(), ", timeout: 20s"),
        policy(&[r#"{server: py, tools: ["*"], resources: ["note://python/readme"]}"#]),
    ]
    .concat();
    let sidecar = Sidecar::start(&yaml, &[]).await?;
    let url = aggregate_url(&sidecar);
    let listen = json!({"jsonrpc": "2.0", "id": "sub-9", "method": "subscriptions/listen", "params": {
        "notifications": {"resourceSubscriptions": [
            "note://python/readme", "note://python/secret", "NOTE://python/readme"]},
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"}}}});
    let mut stream = subscriptions_listen(&url, &listen).await?;
    let mut buf = String::new();
    // Only what the policy shows, in the form servers read, is honoured.
    let ack = event_with(&mut stream, &mut buf, "acknowledged", 10)
        .await
        .context("no acknowledgement")?;
    assert_eq!(
        ack["params"]["notifications"]["resourceSubscriptions"],
        json!(["note://python/readme"]),
        "{ack}"
    );
    let touch = |id: u64, uri: &str| {
        let url = url.clone();
        let body = crate::support::modern_call(id, "py__touch", json!({"uri": uri}));
        async move {
            let h = modern_headers("py__touch");
            let r = post(&url, &borrow(&h), body).await?;
            anyhow::ensure!(
                r.message()["result"]["content"][0]["text"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("touched")),
                "{r:?}"
            );
            anyhow::Ok(())
        }
    };
    // The sidecar opens the server's stream as the agent's opens: touch until the
    // update arrives. A resource not subscribed to never comes through.
    // A read the server lets the sidecar keep, kept until the server says it changed.
    let reads = || py.logs().matches("read note://python/readme").count();
    modern_read(&url, "note://python/readme", json!({})).await?;
    modern_read(&url, "note://python/readme", json!({})).await?;
    assert_eq!(reads(), 1, "{}", py.logs());
    let mut updated = None;
    for i in 0..20 {
        touch(100 + i, "note://python/secret").await?;
        touch(200 + i, "note://python/readme").await?;
        updated = event_with(&mut stream, &mut buf, "resources/updated", 1).await;
        if updated.is_some() {
            break;
        }
    }
    let updated = updated.context("no update reached the agent")?;
    assert_eq!(
        updated["params"]["uri"], "note://python/readme",
        "{updated}"
    );
    assert_eq!(
        updated["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], "sub-9",
        "{updated}"
    );
    assert!(!buf.contains("secret"), "{buf}");
    modern_read(&url, "note://python/readme", json!({})).await?;
    assert_eq!(reads(), 2, "read again after the update: {}", py.logs());
    Ok(())
}

#[tokio::test]
async fn a_legacy_server_cannot_point_the_sidecar_at_another_origin() -> Result<()> {
    // Its stream's endpoint event names another port of the same host (a trap that
    // logs whatever reaches it, credential included).
    let hostile = PyServer::start_script("hostile_sse.py").await?;
    let yaml = format!(
        "apiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {{name: old}}\nspec:\n  endpoints: [{{url: \"http://{}/sse\"}}]\n  transport: sse\n  timeout: 5s\n  credential: {{header: Authorization, secretRef: {{name: old-token, key: token}}, prefix: \"Bearer \"}}\n---\napiVersion: toolmesh.dev/v1alpha1\nkind: Secret\nmetadata: {{name: old-token}}\ndata: {{token: \"trap-me-not\"}}\n---\n{}",
        hostile.addr,
        policy(&[r#"{server: old, tools: ["*"]}"#])
    );
    let sidecar = Sidecar::start(&yaml, &[]).await?;
    // A 2025 agent on the server's own path: its session cannot be opened.
    let init = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"raw","version":"0"}}}"#;
    let r = post(&sidecar.url("old"), &[], init).await?;
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.error_code(), Some(-32085), "{r:?}");
    assert!(r.text.contains("another origin"), "{r:?}");
    // A 2026-07-28 agent's call through the aggregate fails the same way.
    let h = modern_headers("old__echo");
    let call = crate::support::modern_call(1, "old__echo", json!({"text": "x"}));
    let r = post(&aggregate_url(&sidecar), &borrow(&h), call).await?;
    assert_eq!(r.error_code(), Some(-32085), "{r:?}");
    // From the server's side: the stream was opened, and
    // nothing ever reached the trap.
    let logs = hostile.logs();
    assert!(logs.contains("stream GET /sse"), "{logs}");
    assert!(!logs.contains("trap"), "{logs}");
    Ok(())
}
