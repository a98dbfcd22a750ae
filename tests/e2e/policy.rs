//! Policy enforced by the real sidecar against the real demo server: default deny,
//! deny beats allow, globs and argument conditions, filtered lists (JSON, SSE, pages),
//! rate limits, and an audit line for every request.

use std::time::Duration;

use anyhow::Result;
use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::StreamableHttpClientTransport;
use serde_json::{Value, json};
use toolmesh_tests::{DemoServer, IDENTITY, Sidecar};

use crate::support::{
    Reply, admin, audit_lines, borrow, demo_config, modern_call, modern_headers, post,
};

/// The policy under test, for the demo server at `url`.
fn config(url: &str) -> String {
    demo_config(
        url,
        r#"
    - server: demo
      tools: ["echo", "sleep", "test_*"]
      resources: ["test://static-*"]
      prompts: ["test_simple_prompt"]
    - server: demo
      tools: ["test_error_*", "test_audio_content"]
      action: deny
    - server: demo
      tools: ["request_headers"]
      conditions: [{argument: "mode", matches: "safe-*"}]
      audit: {arguments: true}
    - server: demo
      tools: ["add"]
      rateLimit: {requests: 2, per: 1s}
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {name: someone-else}
spec:
  subjects: [{identity: "other/*"}]
  rules: [{server: demo, tools: ["*"]}]
"#,
    )
}

async fn call(sidecar: &Sidecar, id: u64, tool: &str, args: Value) -> Result<Reply> {
    post(
        &sidecar.url("demo"),
        &borrow(&modern_headers(tool)),
        modern_call(id, tool, args),
    )
    .await
}

#[tokio::test]
async fn calls_are_decided_by_the_policy_and_refusals_never_reach_the_upstream() -> Result<()> {
    let server = DemoServer::start(&[]).await?;
    let sidecar = Sidecar::start(&config(&server.url()), &[]).await?;

    let ok = call(&sidecar, 1, "echo", json!({"text": "hi"})).await?;
    assert_eq!(ok.message()["result"]["content"][0]["text"], "hi", "{ok:?}");

    // Default deny, and deny beats a matching allow glob; both look the same to the agent.
    for (id, tool) in [
        (2, "json_schema_2020_12_tool"),
        (3, "test_error_handling"),
        (4, "no_such_tool"),
    ] {
        let r = call(&sidecar, id, tool, json!({})).await?;
        assert_eq!(
            (r.status, r.error_code()),
            (200, Some(-32088)),
            "{tool}: {r:?}"
        );
        assert_eq!(r.json()["id"], id);
        let message = r.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            message.contains(tool) && message.contains(IDENTITY),
            "{message}"
        );
    }

    // Argument conditions.
    let safe = call(&sidecar, 5, "request_headers", json!({"mode": "safe-read"})).await?;
    assert!(safe.message()["result"].is_object(), "{safe:?}");
    let unsafe_ = call(&sidecar, 6, "request_headers", json!({"mode": "write"})).await?;
    assert_eq!(unsafe_.error_code(), Some(-32088), "{unsafe_:?}");
    let missing = call(&sidecar, 7, "request_headers", json!({})).await?;
    assert_eq!(missing.error_code(), Some(-32088), "{missing:?}");

    // A header naming an allowed tool cannot carry a denied one past the policy.
    let smuggle = post(
        &sidecar.url("demo"),
        &borrow(&modern_headers("echo")),
        modern_call(8, "test_error_handling", json!({})),
    )
    .await?;
    assert_eq!((smuggle.status, smuggle.error_code()), (400, Some(-32020)));

    // Resources and prompts follow their own globs.
    let read = |id: u64, uri: &'static str| {
        let body =
            json!({"jsonrpc": "2.0", "id": id, "method": "resources/read", "params": {"uri": uri}});
        let url = sidecar.url("demo");
        async move {
            post(
                &url,
                &[("mcp-protocol-version", "2025-03-26")],
                body.to_string(),
            )
            .await
        }
    };
    assert_eq!(read(9, "test://static-text").await?.error_code(), None);
    assert_eq!(
        read(10, "test://watched-resource").await?.error_code(),
        Some(-32088)
    );

    let upstream_saw = server.proc.output.text();
    assert!(upstream_saw.contains("call echo") && upstream_saw.contains("call request_headers"));
    for refused in [
        "json_schema_2020_12_tool",
        "test_error_handling",
        "no_such_tool",
    ] {
        assert!(
            !upstream_saw.contains(&format!("call {refused}")),
            "{refused} reached the upstream"
        );
    }
    assert_eq!(upstream_saw.matches("call request_headers").count(), 1);

    let (_, metrics) = admin(&sidecar, "/metrics").await?;
    assert!(metrics.contains(r#"toolmesh_policy_decisions_total{server="demo",method="tools/call",outcome="denied"} 5"#), "{metrics}");

    // Audit lines go to stdout by default, one per request, refusals included.
    let audited =
        crate::support::eventually(5, || async { audit_lines(&sidecar).len() >= 10 }).await;
    assert!(audited, "{}", sidecar.logs());
    let lines = audit_lines(&sidecar);
    let denied = lines
        .iter()
        .find(|l| l["name"] == "test_error_handling")
        .expect("audited");
    assert_eq!(
        (denied["decision"].as_str(), denied["rule"].as_str()),
        (Some("denied"), Some("triage/rules[1]"))
    );
    Ok(())
}

#[tokio::test]
async fn lists_show_only_what_the_agent_may_use() -> Result<()> {
    let expected = [
        "add",
        "echo",
        "request_headers",
        "sleep",
        "test_elicitation",
        "test_elicitation_sep1034_defaults",
        "test_elicitation_sep1330_enums",
        "test_embedded_resource",
        "test_image_content",
        "test_multiple_content_types",
        "test_sampling",
        "test_simple_text",
        "test_tool_with_logging",
        "test_tool_with_progress",
    ];
    // SSE responses, JSON responses, and a server that pages its list three at a time.
    for server_args in [&[][..], &["--json-response"][..], &["--page-size", "3"][..]] {
        let server = DemoServer::start(server_args).await?;
        let sidecar = Sidecar::start(&config(&server.url()), &[]).await?;
        let client = ().serve(StreamableHttpClientTransport::from_uri(sidecar.url("demo"))).await?;
        let mut tools: Vec<String> = client
            .list_all_tools()
            .await?
            .into_iter()
            .map(|t| t.name.to_string())
            .collect();
        tools.sort();
        assert_eq!(tools, expected, "{server_args:?}");
        let resources: Vec<String> = client
            .list_all_resources()
            .await?
            .into_iter()
            .map(|r| r.uri.clone())
            .collect();
        assert_eq!(
            resources,
            ["test://static-text", "test://static-binary"],
            "{server_args:?}"
        );
        let prompts: Vec<String> = client
            .list_all_prompts()
            .await?
            .into_iter()
            .map(|p| p.name.clone())
            .collect();
        assert_eq!(prompts, ["test_simple_prompt"], "{server_args:?}");
        // The session still works for calls after filtered lists.
        let r = client
            .call_tool(CallToolRequestParams::new("test_simple_text"))
            .await?;
        assert!(!r.is_error.unwrap_or(false));
        client.cancel().await?;
    }
    Ok(())
}

#[tokio::test]
async fn rate_limits_hit_after_n_and_recover_after_the_window() -> Result<()> {
    let server = DemoServer::start(&[]).await?;
    let sidecar = Sidecar::start(&config(&server.url()), &[]).await?;
    for id in 1..=2 {
        let r = call(&sidecar, id, "add", json!({"a": 1, "b": 2})).await?;
        assert_eq!(r.message()["result"]["content"][0]["text"], "3", "{r:?}");
    }
    let limited = call(&sidecar, 3, "add", json!({"a": 1, "b": 2})).await?;
    assert_eq!(
        (limited.status, limited.error_code()),
        (429, Some(-32089)),
        "{limited:?}"
    );
    assert_eq!(limited.headers["retry-after"], "1");
    let retry_ms = limited.json()["error"]["data"]["retryAfterMs"]
        .as_u64()
        .unwrap_or(0);
    assert!((1..=1000).contains(&retry_ms), "{limited:?}");
    // Calls the rule does not cover do not count against it.
    assert_eq!(
        call(&sidecar, 4, "echo", json!({"text": "x"}))
            .await?
            .status,
        200
    );
    tokio::time::sleep(Duration::from_millis(retry_ms + 50)).await;
    let again = call(&sidecar, 5, "add", json!({"a": 1, "b": 2})).await?;
    assert_eq!(
        again.message()["result"]["content"][0]["text"],
        "3",
        "{again:?}"
    );
    assert_eq!(server.proc.output.text().matches("call add").count(), 3);

    // A reload that inserts an unrelated rule above the limited one moves the
    // snapshot's version and the rule's position, and keeps its bucket: still empty.
    let _ = call(&sidecar, 6, "add", json!({"a": 1, "b": 2})).await?;
    let (_, before) = admin(&sidecar, "/ready").await?;
    let moved = config(&server.url()).replace(
        "    - server: demo\n      tools: [\"add\"]",
        "    - server: demo\n      tools: [\"never_called\"]\n    - server: demo\n      tools: [\"add\"]",
    );
    assert_ne!(moved, config(&server.url()));
    sidecar.write_config(&moved)?;
    let reloaded = crate::support::eventually(5, || async {
        admin(&sidecar, "/ready")
            .await
            .is_ok_and(|(_, now)| now != before)
    })
    .await;
    assert!(reloaded, "the new version was not applied");
    let after_reload = call(&sidecar, 7, "add", json!({"a": 1, "b": 2})).await?;
    assert_eq!(
        after_reload.status, 429,
        "the budget survived the reload: {after_reload:?}"
    );
    Ok(())
}

#[tokio::test]
async fn every_request_has_an_audit_line_and_none_is_lost_on_shutdown() -> Result<()> {
    let server = DemoServer::start(&[]).await?;
    let dir = toolmesh_tests::TempDir::new("audit")?;
    let audit_file = dir.0.join("audit.jsonl");
    let audit_flag = audit_file.to_string_lossy().into_owned();
    let mut sidecar =
        Sidecar::start(&config(&server.url()), &["--audit-file", &audit_flag]).await?;

    call(
        &sidecar,
        1,
        "echo",
        json!({"text": "secret-looking-argument"}),
    )
    .await?;
    call(&sidecar, 2, "test_error_handling", json!({})).await?;
    call(&sidecar, 3, "request_headers", json!({"mode": "safe-1"})).await?;
    post(&sidecar.url("demo"), &[], "{broken").await?;
    // A W3C trace context: its trace id is recorded (a malformed one would not be).
    post(
        &sidecar.url("nope"),
        &[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )],
        r#"{"jsonrpc":"2.0","id":5,"method":"ping"}"#,
    )
    .await?;
    let burst = 200;
    for i in 0..burst {
        call(&sidecar, 100 + i, "echo", json!({"text": "x"})).await?;
    }
    let status = sidecar.proc.terminate().await?;
    assert!(status.success());

    let text = std::fs::read_to_string(&audit_file)?;
    let lines: Vec<Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(
        lines.len() as u64,
        5 + burst,
        "one line per request, all flushed"
    );
    let first = &lines[0];
    assert_eq!(first["subject"], IDENTITY);
    assert_eq!(first["server"], "demo");
    assert_eq!(first["method"], "tools/call");
    assert_eq!(
        (first["kind"].as_str(), first["name"].as_str()),
        (Some("tool"), Some("echo"))
    );
    assert_eq!(
        (first["decision"].as_str(), first["rule"].as_str()),
        (Some("allowed"), Some("triage/rules[0]"))
    );
    assert_eq!(first["status"], 200);
    assert_eq!(first["request_id"], 1);
    assert!(
        first.get("trace_id").is_none(),
        "no traceparent, no trace id"
    );
    assert_eq!(lines[4]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(first["latency_ms"].as_f64().is_some() && first["time"].as_str().is_some());
    assert!(
        first.get("arguments").is_none() && !text.contains("secret-looking-argument"),
        "arguments only when asked"
    );
    assert_eq!(
        (lines[1]["decision"].as_str(), lines[1]["rule"].as_str()),
        (Some("denied"), Some("triage/rules[1]"))
    );
    assert_eq!(lines[1]["error_code"], -32088);
    assert_eq!(
        lines[2]["arguments"],
        json!({"mode": "safe-1"}),
        "the rule asks for arguments"
    );
    assert_eq!(
        (
            lines[3]["decision"].as_str(),
            lines[3]["error_code"].as_i64()
        ),
        (Some("rejected"), Some(-32700))
    );
    assert_eq!(
        (lines[4]["server"].as_str(), lines[4]["status"].as_u64()),
        (Some("(unknown)"), Some(404))
    );
    Ok(())
}

#[tokio::test]
async fn an_identity_with_no_rules_sees_no_servers() -> Result<()> {
    let server = DemoServer::start(&[]).await?;
    let yaml = config(&server.url()).replace("agents/*", "robots/*");
    let sidecar = Sidecar::start(&yaml, &[]).await?;
    let r = call(&sidecar, 1, "echo", json!({"text": "x"})).await?;
    assert_eq!((r.status, r.error_code()), (404, Some(-32081)), "{r:?}");
    assert!(r.text.contains("known servers: (none)"), "{r:?}");
    Ok(())
}
