//! The stdio bridge (`toolmesh_sidecar::stdio`) in front of the reference server
//! `server-everything` run in stdio mode, driven by the official TypeScript and Python
//! SDK clients and by raw HTTP: both protocol generations, a child killed mid-call,
//! and the HTTP edges (paths, sessions, batches, sizes, shutdown).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use tokio::process::Command;
use toolmesh_sidecar::stdio::{Bridge, Options};
use toolmesh_tests::{js_dir, node22, python};

use crate::support::{Reply, borrow, client_report, modern_call, modern_headers, post};

/// `server-everything` in stdio mode behind a bridge.
async fn bridge(max_message_bytes: usize) -> Result<Bridge> {
    let entry = js_dir().join("node_modules/@modelcontextprotocol/server-everything/dist/index.js");
    ensure!(
        entry.exists(),
        "{} is missing: run `make deps` first",
        entry.display()
    );
    let command = vec![
        node22()?.display().to_string(),
        entry.display().to_string(),
        "stdio".to_owned(),
    ];
    Bridge::start(Options {
        command,
        max_message_bytes,
        request_timeout: Duration::from_secs(30),
        restart_backoff_max: Duration::from_secs(2),
    })
    .await
    .map_err(anyhow::Error::msg)
}

fn plan() -> Value {
    json!({
        "echo": ["echo", {"message": "through the bridge"}],
        "sum": ["get-sum", {"a": 2, "b": 40}],
        "progress": ["trigger-long-running-operation", {"duration": 1, "steps": 3}],
    })
}

/// What both SDK clients must have seen through the bridge.
fn assert_plan_ran(kind: &str, report: &Value) {
    assert_eq!(
        report["steps"]["echo"]["text"], "Echo: through the bridge",
        "{kind}: {report}"
    );
    assert_eq!(
        report["steps"]["sum"]["text"], "The sum of 2 and 40 is 42.",
        "{kind}: {report}"
    );
    assert_eq!(
        report["steps"]["progress"]["text"],
        "Long running operation completed. Duration: 1 seconds, Steps: 3.",
        "{kind}: {report}"
    );
    for step in ["echo", "sum", "progress"] {
        assert_eq!(report["steps"][step]["error"], false, "{kind}: {report}");
    }
    let tools: Vec<&str> = report["tools"]
        .as_array()
        .map(|t| t.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(
        tools.contains(&"echo") && tools.contains(&"get-sum"),
        "{kind}: {report}"
    );
    // The child's progress notifications reached the client (SSE answer), with the
    // client's own progress token back.
    assert_eq!(report["seen"]["progress"], 3, "{kind}: {report}");
}

#[tokio::test]
async fn typescript_sdk_client_through_the_bridge() -> Result<()> {
    let bridge = bridge(4 << 20).await?;
    let report = crate::peers::run_client("typescript", bridge.url(), &plan()).await?;
    assert_plan_ran("typescript", &report);
    bridge.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn python_sdk_client_2025_session_through_the_bridge() -> Result<()> {
    // tests/python/client.py drives a ClientSession with `initialize`: the 2025
    // generation (mcp 2.3 offers 2025-11-25 in its handshake).
    let bridge = bridge(4 << 20).await?;
    let report = crate::peers::run_client("python", bridge.url(), &plan()).await?;
    assert_plan_ran("python", &report);
    bridge.shutdown().await;
    Ok(())
}

/// mcp 2.3's high-level `Client` in its default mode ("auto"): `server/discover` at
/// 2026-07-28, adopted when the answer lists that version, else `initialize`.
const PYTHON_AUTO: &str = r#"
import asyncio, json, sys
from mcp import Client

async def main(url):
    async with Client(url) as client:
        tools = await client.list_tools()
        echo = await client.call_tool("echo", {"message": "stateless python"})
        total = await client.call_tool("get-sum", {"a": 20, "b": 22})
        text = lambda r: "\n".join(c.text for c in r.content if getattr(c, "type", "") == "text")
        return {
            "protocol": client.protocol_version,
            "server": client.server_info.name if client.server_info else None,
            "tools": sorted(t.name for t in tools.tools),
            "echo": text(echo),
            "sum": text(total),
        }

print(json.dumps(asyncio.run(main(sys.argv[1]))))
"#;

#[tokio::test]
async fn python_sdk_client_2026_stateless_through_the_bridge() -> Result<()> {
    let bridge = bridge(4 << 20).await?;
    let mut cmd = Command::new(python()?);
    cmd.arg("-c").arg(PYTHON_AUTO).arg(bridge.url());
    let report = client_report(cmd, "Python client (mode auto)").await?;
    assert_eq!(report["protocol"], "2026-07-28", "{report}");
    assert_eq!(report["server"], "mcp-servers/everything", "{report}");
    assert_eq!(report["echo"], "Echo: stateless python", "{report}");
    assert_eq!(report["sum"], "The sum of 20 and 22 is 42.", "{report}");
    assert!(
        report["tools"]
            .as_array()
            .is_some_and(|t| t.contains(&json!("echo")) && t.contains(&json!("get-sum"))),
        "{report}"
    );
    bridge.shutdown().await;
    Ok(())
}

fn modern_meta() -> Value {
    json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"}
    })
}

#[tokio::test]
async fn raw_2026_discover_and_stateless_calls() -> Result<()> {
    let bridge = bridge(4 << 20).await?;
    let url = bridge.url().to_owned();

    let discover = json!({"jsonrpc": "2.0", "id": "d1", "method": "server/discover",
        "params": {"_meta": modern_meta()}});
    let headers = [
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "server/discover"),
    ];
    let r = post(&url, &headers, discover.to_string()).await?;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["id"], "d1");
    let result = &v["result"];
    assert_eq!(result["resultType"], "complete", "{v}");
    assert_eq!(
        result["supportedVersions"],
        json!(["2025-03-26", "2025-06-18", "2025-11-25", "2026-07-28"])
    );
    assert!(result["capabilities"]["tools"].is_object(), "{v}");
    assert_eq!(
        result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"],
        "mcp-servers/everything"
    );
    assert!(
        r.headers.get("mcp-session-id").is_none(),
        "stateless: no session"
    );

    // A stateless call: no session, `_meta` and the Mcp-Method/Mcp-Name headers.
    let h = modern_headers("echo");
    let r = post(
        &url,
        &borrow(&h),
        modern_call(41, "echo", json!({"message": "stateless"})),
    )
    .await?;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["id"], 41, "the client's id comes back");
    assert_eq!(v["result"]["content"][0]["text"], "Echo: stateless", "{v}");
    assert_eq!(v["result"]["resultType"], "complete", "{v}");

    let h = modern_headers("get-sum");
    let r = post(
        &url,
        &borrow(&h),
        modern_call(42, "get-sum", json!({"a": 1, "b": 2})),
    )
    .await?;
    assert_eq!(
        r.json()["result"]["content"][0]["text"],
        "The sum of 1 and 2 is 3.",
        "{}",
        r.text
    );

    // List results get the 2026 cache hints the 2025-era child leaves out.
    let list = json!({"jsonrpc": "2.0", "id": 43, "method": "tools/list", "params": {"_meta": modern_meta()}});
    let headers = [
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/list"),
    ];
    let r = post(&url, &headers, list.to_string()).await?;
    let v = r.json();
    assert_eq!(v["result"]["ttlMs"], 0, "{}", r.text);
    assert_eq!(v["result"]["cacheScope"], "private");
    assert!(v["result"]["tools"].as_array().is_some_and(|t| t.len() > 5));

    // Headers that disagree with the body, and a modern version the bridge lacks.
    let h = modern_headers("get-sum");
    let r = post(
        &url,
        &borrow(&h),
        modern_call(44, "echo", json!({"message": "x"})),
    )
    .await?;
    assert_eq!(
        (r.status, r.error_code()),
        (400, Some(-32020)),
        "{}",
        r.text
    );
    let future = json!({"jsonrpc": "2.0", "id": 45, "method": "tools/list",
        "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": "2099-01-01"}}});
    let headers = [
        ("mcp-protocol-version", "2099-01-01"),
        ("mcp-method", "tools/list"),
    ];
    let r = post(&url, &headers, future.to_string()).await?;
    assert_eq!(
        (r.status, r.error_code()),
        (400, Some(-32022)),
        "{}",
        r.text
    );
    assert_eq!(r.json()["error"]["data"]["requested"], "2099-01-01");
    bridge.shutdown().await;
    Ok(())
}

/// `initialize` over raw HTTP: the session id.
async fn raw_session(url: &str) -> Result<String> {
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"}}});
    let r = post(url, &[], init.to_string()).await?;
    ensure!(r.status == 200, "initialize: {} {}", r.status, r.text);
    ensure!(
        r.json()["result"]["protocolVersion"] == "2025-06-18",
        "the client's (older) version is answered: {}",
        r.text
    );
    let session = r
        .headers
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .context("no Mcp-Session-Id")?
        .to_owned();
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let r = post(
        url,
        &[("mcp-session-id", &session)],
        initialized.to_string(),
    )
    .await?;
    ensure!(r.status == 202, "initialized: {}", r.status);
    Ok(session)
}

async fn session_echo(url: &str, session: &str, id: u64, message: &str) -> Result<Reply> {
    let call = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"message": message}}});
    post(
        url,
        &[
            ("mcp-session-id", session),
            ("mcp-protocol-version", "2025-06-18"),
        ],
        call.to_string(),
    )
    .await
}

fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn a_killed_child_is_restarted_and_its_call_in_flight_fails_at_once() -> Result<()> {
    let bridge = bridge(4 << 20).await?;
    let url = bridge.url().to_owned();
    let session = raw_session(&url).await?;
    let r = session_echo(&url, &session, 1, "before").await?;
    assert_eq!(
        r.json()["result"]["content"][0]["text"],
        "Echo: before",
        "{}",
        r.text
    );
    let first = bridge.child_pid().context("a child runs")?;

    // A 20 s call in flight, then the child is killed under it.
    let h = modern_headers("trigger-long-running-operation");
    let slow = modern_call(
        7,
        "trigger-long-running-operation",
        json!({"duration": 20, "steps": 2}),
    );
    let in_flight = {
        let url = url.clone();
        let h = h.clone();
        tokio::spawn(async move { post(&url, &borrow(&h), slow).await })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!in_flight.is_finished(), "the slow call is still running");
    let killed = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-KILL", &first.to_string()])
        .status()?;
    ensure!(status.success(), "kill failed");

    let r = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .context("the call in flight hung after the child died")???;
    assert!(
        killed.elapsed() < Duration::from_secs(3),
        "answered in {:?}",
        killed.elapsed()
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["id"], 7);
    assert_eq!(v["error"]["code"], -32603, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("exited")),
        "{v}"
    );

    // The next calls wait for the restarted child and work: stateless, and on the
    // session opened before (sessions are the bridge's, not the child's).
    let h = modern_headers("echo");
    let r = post(
        &url,
        &borrow(&h),
        modern_call(8, "echo", json!({"message": "after restart"})),
    )
    .await?;
    assert_eq!(
        r.json()["result"]["content"][0]["text"],
        "Echo: after restart",
        "{}",
        r.text
    );
    let r = session_echo(&url, &session, 9, "same session").await?;
    assert_eq!(
        r.json()["result"]["content"][0]["text"],
        "Echo: same session",
        "{}",
        r.text
    );
    let second = bridge.child_pid().context("a new child runs")?;
    assert_ne!(first, second);
    assert!(!process_exists(first), "the killed child was reaped");

    // Shutdown ends (and reaps) the new child.
    bridge.shutdown().await;
    assert!(!process_exists(second), "the child is gone after shutdown");
    Ok(())
}

#[tokio::test]
async fn paths_methods_sessions_batches_and_sizes() -> Result<()> {
    let bridge = bridge(64 * 1024).await?;
    let url = bridge.url().to_owned();
    let base = url
        .rsplit_once("/mcp/")
        .map(|(b, _)| b)
        .context("url shape")?;
    let list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).to_string();

    // Only the unguessable path is served.
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    for path in ["/mcp", "/mcp/", "/mcp/wrong-token", "/", "/mcp/everything"] {
        let r = post(&format!("{base}{path}"), &[], list.clone()).await?;
        assert_eq!(r.status, 404, "{path}");
    }
    let r = post(&format!("{url}/extra"), &[], list.clone()).await?;
    assert_eq!(r.status, 404);

    // No GET stream.
    let r = reqwest::get(&url).await?;
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(
        r.headers().get("allow").and_then(|v| v.to_str().ok()),
        Some("POST, DELETE")
    );

    // 2025 requests need a live session.
    let r = post(&url, &[], list.clone()).await?;
    assert_eq!(
        (r.status, r.error_code()),
        (400, Some(-32600)),
        "{}",
        r.text
    );
    let r = post(&url, &[("mcp-session-id", "nope")], list.clone()).await?;
    assert_eq!(r.status, 404, "{}", r.text);
    let session = raw_session(&url).await?;
    let r = post(&url, &[("mcp-session-id", &session)], list.clone()).await?;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.json()["result"]["tools"].is_array());
    let end = reqwest::Client::new()
        .delete(&url)
        .header("mcp-session-id", &session)
        .send()
        .await?;
    assert_eq!(end.status().as_u16(), 200);
    let r = post(&url, &[("mcp-session-id", &session)], list.clone()).await?;
    assert_eq!(r.status, 404, "an ended session is unknown");

    // Batches are refused; so are bodies over the bound, and non-JSON.
    let batch = format!("[{list}]");
    let r = post(&url, &[], batch).await?;
    assert_eq!(
        (r.status, r.error_code()),
        (400, Some(-32600)),
        "{}",
        r.text
    );
    let big = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"message": "x".repeat(70 * 1024)}}});
    let r = post(&url, &[], big.to_string()).await?;
    assert_eq!(r.status, 413);
    let r = post(&url, &[], "{not json").await?;
    assert_eq!(
        (r.status, r.error_code()),
        (400, Some(-32700)),
        "{}",
        r.text
    );

    // A message the child answers with an error comes back as the child's error.
    let session = raw_session(&url).await?;
    let unknown = json!({"jsonrpc": "2.0", "id": "u", "method": "tools/call",
        "params": {"name": "no-such-tool", "arguments": {}}});
    let r = post(&url, &[("mcp-session-id", &session)], unknown.to_string()).await?;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["id"], "u");
    assert!(
        v["result"]["isError"] == true || v["error"].is_object(),
        "the child's own answer: {v}"
    );
    bridge.shutdown().await;
    Ok(())
}
