//! Raw HTTP through the sidecar: what SDK clients never send, and what must never
//! cross it.

use std::time::Duration;

use anyhow::Result;
use futures::StreamExt;
use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::{Value, json};
use toolmesh_tests::{DemoServer, Sidecar};

use crate::support::{Stack, admin, borrow, modern_call, modern_headers, post};

const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"raw","version":"0"}}}"#;
const V: (&str, &str) = ("mcp-protocol-version", "2025-11-25");

#[tokio::test]
async fn modern_headers_must_agree_with_the_body() -> Result<()> {
    let stack = Stack::start().await?;
    let url = stack.url();

    let ok = post(
        &url,
        &borrow(&modern_headers("echo")),
        modern_call(1, "echo", json!({"text": "hi"})),
    )
    .await?;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.message()["result"]["content"][0]["text"], "hi", "{ok:?}");

    // The header names a harmless tool, the body a different one: refused, with the
    // request's id and MCP's header-mismatch code, before reaching the upstream.
    let smuggled = post(
        &url,
        &borrow(&modern_headers("test_simple_text")),
        modern_call(2, "echo", json!({"text": "x"})),
    )
    .await?;
    assert_eq!(smuggled.status, 400, "{smuggled:?}");
    assert_eq!(smuggled.error_code(), Some(-32020));
    assert_eq!(smuggled.json()["id"], 2);
    let message = smuggled.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains("test_simple_text") && message.contains("echo"),
        "{message}"
    );

    let mut no_name = modern_headers("echo");
    no_name.pop();
    let missing = post(
        &url,
        &borrow(&no_name),
        modern_call(3, "echo", json!({"text": "x"})),
    )
    .await?;
    assert_eq!(
        (missing.status, missing.error_code()),
        (400, Some(-32020)),
        "{missing:?}"
    );

    let mut wrong_method = modern_headers("echo");
    wrong_method[1].1 = "tools/list".into();
    let wrong = post(
        &url,
        &borrow(&wrong_method),
        modern_call(4, "echo", json!({})),
    )
    .await?;
    assert_eq!(
        (wrong.status, wrong.error_code()),
        (400, Some(-32020)),
        "{wrong:?}"
    );

    // A legacy request may omit the headers, but one it sends must agree too.
    let legacy_smuggle = post(
        &url,
        &[V, ("mcp-name", "test_simple_text")],
        r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"}}}"#,
    )
    .await?;
    assert_eq!(
        (legacy_smuggle.status, legacy_smuggle.error_code()),
        (400, Some(-32020))
    );

    let (_, metrics) = admin(&stack.sidecar, "/metrics").await?;
    assert!(
        metrics.contains(
            r#"toolmesh_requests_total{server="demo",method="tools/call",outcome="rejected"} 4"#
        ),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_no_harm() -> Result<()> {
    let stack = Stack::start_with(&[], &["--max-body-bytes", "2048"]).await?;
    let url = stack.url();
    let ping = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;

    let r = post(&url, &[], "{not json").await?;
    assert_eq!((r.status, r.error_code()), (400, Some(-32700)), "{r:?}");

    let r = post(&url, &[V], format!("[{ping},{ping}]")).await?;
    assert_eq!((r.status, r.error_code()), (400, Some(-32600)), "{r:?}");
    assert!(r.text.contains("batch"), "{r:?}");

    let r = post(&url, &[], r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#).await?;
    assert_eq!((r.status, r.error_code()), (400, Some(-32600)), "{r:?}");

    let r = post(&stack.sidecar.url("nope"), &[], ping).await?;
    assert_eq!((r.status, r.error_code()), (404, Some(-32081)), "{r:?}");
    assert!(r.text.contains("known servers: demo"), "{r:?}");

    let r = post(
        &format!("http://{}/elsewhere", stack.sidecar.mcp),
        &[],
        ping,
    )
    .await?;
    assert_eq!((r.status, r.error_code()), (404, Some(-32081)), "{r:?}");

    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"pad":"{}"}}}}"#,
        "x".repeat(4096)
    );
    let r = post(&url, &[], big).await?;
    assert_eq!((r.status, r.error_code()), (413, Some(-32082)), "{r:?}");

    let r = post(&url, &[("origin", "http://evil.example.com")], ping).await?;
    assert_eq!((r.status, r.error_code()), (403, Some(-32080)), "{r:?}");
    let r = post(&url, &[("host", "evil.example.com")], ping).await?;
    assert_eq!(
        (r.status, r.error_code()),
        (403, Some(-32080)),
        "DNS rebinding without Origin: {r:?}"
    );
    let r = post(&url, &[("origin", "http://localhost:1234")], ping).await?;
    assert_ne!(r.status, 403, "loopback origins are fine: {r:?}");

    let r = post(&url, &[V, ("mcp-session-id", "no-such-session")], ping).await?;
    assert_eq!(
        r.status, 404,
        "the upstream's unknown-session answer is relayed: {r:?}"
    );

    let r = reqwest::Client::new()
        .post(&url)
        .header("content-type", "text/plain")
        .body(ping)
        .send()
        .await?;
    assert_eq!(r.status(), 415);
    let r = reqwest::Client::new().put(&url).body(ping).send().await?;
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, POST, DELETE");

    // A body that ends early, garbage bytes, an empty body: answers, no crash.
    let r = post(&url, &[], &b"\xff\xfe\x00"[..]).await?;
    assert_eq!(r.status, 400);
    let r = post(&url, &[], "").await?;
    assert_eq!(r.status, 400);

    let (live, _) = admin(&stack.sidecar, "/live").await?;
    assert_eq!(live, 200);
    assert!(!stack.sidecar.logs().contains("panicked"));
    Ok(())
}

/// Read SSE events from a streaming response until `stop` says so or 5 s pass.
async fn read_events(resp: reqwest::Response, mut stop: impl FnMut(&str) -> bool) -> Vec<String> {
    let mut events = Vec::new();
    let mut buf = String::new();
    let mut stream = resp.bytes_stream();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline, stream.next()).await {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let done = stop(&event);
            events.push(event);
            if done {
                return events;
            }
        }
    }
    events
}

#[tokio::test]
async fn sessions_streams_resumption_and_session_end() -> Result<()> {
    let stack = Stack::start().await?;
    let url = stack.url();
    let http = reqwest::Client::new();

    let init = post(&url, &[], INIT).await?;
    assert_eq!(init.status, 200, "{init:?}");
    let session = init.headers["mcp-session-id"].to_str()?.to_owned();
    assert_eq!(init.message()["result"]["protocolVersion"], "2025-11-25");
    let h = [V, ("mcp-session-id", session.as_str())];
    let r = post(
        &url,
        &h,
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
    )
    .await?;
    assert_eq!(r.status, 202, "notifications get 202: {r:?}");

    // The GET stream for server-initiated messages opens through the sidecar.
    let get = http
        .get(&url)
        .header("accept", "text/event-stream")
        .header(V.0, V.1)
        .header("mcp-session-id", &session)
        .send()
        .await?;
    assert_eq!(get.status(), 200);
    assert!(
        get.headers()["content-type"]
            .to_str()?
            .starts_with("text/event-stream")
    );
    drop(get);

    // A slow call answered over SSE: take the first event (its id), hang up, and
    // resume with Last-Event-ID on a GET: the result arrives on the new stream.
    let call = r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"sleep","arguments":{"ms":400}}}"#;
    let resp = http
        .post(&url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header(V.0, V.1)
        .header("mcp-session-id", &session)
        .body(call)
        .send()
        .await?;
    assert!(
        resp.headers()["content-type"]
            .to_str()?
            .starts_with("text/event-stream")
    );
    let first = read_events(resp, |_| true).await;
    let last_id = first
        .iter()
        .flat_map(|e| e.lines())
        .find_map(|l| l.strip_prefix("id:"))
        .map(|id| id.trim().to_owned())
        .expect("the upstream primes its stream with an event id");
    let resumed = http
        .get(&url)
        .header("accept", "text/event-stream")
        .header(V.0, V.1)
        .header("mcp-session-id", &session)
        .header("last-event-id", &last_id)
        .send()
        .await?;
    assert_eq!(resumed.status(), 200);
    let events = read_events(resumed, |e| e.contains("slept 400 ms")).await;
    assert!(
        events.iter().any(|e| e.contains("slept 400 ms")),
        "{events:?}"
    );

    // Cancellation is a notification like any other: relayed, answered 202.
    let cancel = r#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":9,"reason":"test"}}"#;
    let r = post(&url, &h, cancel).await?;
    assert_eq!(r.status, 202, "{r:?}");

    // DELETE ends the session; the id is then unknown upstream.
    let del = http
        .delete(&url)
        .header(V.0, V.1)
        .header("mcp-session-id", &session)
        .send()
        .await?;
    assert!(del.status().is_success(), "{}", del.status());
    let after = post(&url, &h, r#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#).await?;
    assert_eq!(after.status, 404, "{after:?}");
    Ok(())
}

#[tokio::test]
async fn agent_credentials_stay_home_and_the_secret_stays_hidden() -> Result<()> {
    const SECRET: &str = "s3cr3t-upstream-value";
    let server = DemoServer::start(&[]).await?;
    let yaml = format!(
        r#"apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {{name: demo}}
spec:
  endpoints: [{{url: "{}"}}]
  credential: {{header: Authorization, secretRef: {{name: demo-token, key: token}}, prefix: "Bearer "}}
---
apiVersion: toolmesh.dev/v1alpha1
kind: Secret
metadata: {{name: demo-token}}
data: {{token: "{SECRET}"}}
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: tests}}
spec:
  subjects: [{{identity: "agents/*"}}]
  rules: [{{server: demo, tools: ["*"]}}]
"#,
        server.url()
    );
    let sidecar = Sidecar::start(&yaml, &[]).await?;
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(sidecar.url("demo"))
            .auth_header("agent-own-token"),
    );
    let client = ().serve(transport).await?;
    let result = client
        .call_tool(CallToolRequestParams::new("request_headers"))
        .await?;
    let text = serde_json::to_value(&result)?["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let seen: Value = serde_json::from_str(&text)?;
    assert_eq!(seen["authorization"], format!("Bearer {SECRET}"), "{seen}");
    assert!(
        !text.contains("agent-own-token"),
        "agent token forwarded: {seen}"
    );
    client.cancel().await?;

    let (_, config) = admin(&sidecar, "/config").await?;
    assert!(
        config.contains("<redacted>") && !config.contains(SECRET),
        "{config}"
    );
    let (_, metrics) = admin(&sidecar, "/metrics").await?;
    assert!(!metrics.contains(SECRET));
    assert!(!sidecar.logs().contains(SECRET), "{}", sidecar.logs());
    Ok(())
}
