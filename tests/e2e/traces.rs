//! OpenTelemetry traces from the real sidecar to a real OTLP/gRPC receiver: the SERVER
//! span under the agent's parent (header or `_meta`), its MCP attributes, the CLIENT
//! span whose context the upstream receives in the header and in `_meta` (the demo
//! server reports what it got), a denied call's span, an SSE stream's span, parent-
//! based sampling, and the body left byte for byte when tracing is off.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use toolmesh_tests::otlp::{Collector, Received};
use toolmesh_tests::{ControlPlane, DemoServer, IDENTITY, SIDECAR_TOKEN, Sidecar, TempDir};

use crate::support::{audit_lines, borrow, demo_config, modern_call, modern_headers, post};

const AGENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const AGENT_SPAN: &str = "00f067aa0ba902b7";

fn agent_parent(flags: &str) -> String {
    format!("00-{AGENT_TRACE}-{AGENT_SPAN}-{flags}")
}

const RULES: &str = r#"
    - server: demo
      tools: ["echo", "stream", "request_meta", "request_headers"]"#;

/// The demo server and a sidecar exporting to `collector` with `extra` flags.
async fn traced(collector: &Collector, extra: &[&str]) -> Result<(DemoServer, Sidecar)> {
    let server = DemoServer::start(&[]).await?;
    let endpoint = collector.url();
    let mut args = vec!["--otlp-endpoint", endpoint.as_str()];
    args.extend_from_slice(extra);
    let sidecar = Sidecar::start_with_env(
        IDENTITY,
        &demo_config(&server.url(), RULES),
        &args,
        &[("OTEL_BSP_SCHEDULE_DELAY", "50")],
    )
    .await?;
    Ok((server, sidecar))
}

/// A 2026-07-28 call of `tool` with `headers` added and `meta` merged into `_meta`.
async fn call(
    sidecar: &Sidecar,
    tool: &str,
    arguments: Value,
    headers: &[(&'static str, String)],
    meta: Value,
) -> Result<crate::support::Reply> {
    let mut body: Value = serde_json::from_str(&modern_call(7, tool, arguments))?;
    if let (Some(target), Some(extra)) = (
        body["params"]["_meta"].as_object_mut(),
        meta.as_object().cloned(),
    ) {
        target.extend(extra);
    }
    let mut all = modern_headers(tool);
    all.extend(headers.iter().cloned());
    post(&sidecar.url("demo"), &borrow(&all), body.to_string()).await
}

/// The JSON text a demo tool answered with.
fn tool_json(reply: &crate::support::Reply) -> Result<Value> {
    let message = reply.message();
    let text = message["result"]["content"][0]["text"]
        .as_str()
        .with_context(|| format!("no tool text in {}", reply.text))?;
    Ok(serde_json::from_str(text)?)
}

fn server_span(spans: &[Received], trace: &str) -> Option<Received> {
    spans
        .iter()
        .find(|s| s.is_server() && s.trace_id() == trace)
        .cloned()
}

#[tokio::test]
async fn a_call_is_a_server_span_under_the_agents_parent_and_the_upstream_gets_the_client_span()
-> Result<()> {
    let collector = Collector::start().await?;
    let (_server, sidecar) = traced(&collector, &[]).await?;

    // The agent's context in the header: the upstream sees a new parent, in the header
    // and in `_meta`, in the agent's trace.
    let reply = call(
        &sidecar,
        "request_meta",
        json!({}),
        &[("traceparent", agent_parent("01"))],
        json!({}),
    )
    .await?;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let meta = tool_json(&reply)?;
    let sent = meta["traceparent"]
        .as_str()
        .context("no _meta.traceparent")?;
    assert!(
        sent.starts_with(&format!("00-{AGENT_TRACE}-")) && sent.ends_with("-01"),
        "{meta}"
    );
    assert!(
        !sent.contains(AGENT_SPAN),
        "the agent's span is not the upstream's parent: {sent}"
    );
    // The rest of `_meta` reached the server as sent.
    assert_eq!(
        meta["io.modelcontextprotocol/protocolVersion"], "2026-07-28",
        "{meta}"
    );

    let spans = collector
        .wait_for(10, |s| s.trace_id() == AGENT_TRACE && s.is_client())
        .await;
    let client = spans.first().context("no CLIENT span")?.clone();
    let server = server_span(&collector.spans(), AGENT_TRACE).context("no SERVER span")?;
    assert_eq!(server.service, "toolmesh-sidecar");
    assert_eq!(
        server.parent_id(),
        AGENT_SPAN,
        "the agent's span is the parent"
    );
    assert_eq!(client.parent_id(), server.span_id(), "CLIENT under SERVER");
    assert_eq!(
        sent,
        format!("00-{AGENT_TRACE}-{}-01", client.span_id()),
        "the upstream's parent is the CLIENT span"
    );
    assert_eq!(server.span.name, "tools/call request_meta");
    for (key, value) in [
        ("mcp.method.name", "tools/call"),
        ("gen_ai.tool.name", "request_meta"),
        ("gen_ai.operation.name", "execute_tool"),
        ("jsonrpc.request.id", "7"),
        ("mcp.protocol.version", "2026-07-28"),
        ("server.address", "127.0.0.1"),
        ("network.protocol.name", "http"),
        ("http.response.status_code", "200"),
        ("toolmesh.decision", "allowed"),
        ("toolmesh.subject", IDENTITY),
        ("toolmesh.server", "demo"),
        ("toolmesh.outcome", "ok"),
    ] {
        assert_eq!(
            server.attr(key).as_deref(),
            Some(value),
            "{key}: {server:?}"
        );
    }
    assert_eq!(
        server.attr("server.port"),
        Some(sidecar.mcp.port().to_string())
    );
    assert!(server.error().is_none(), "{server:?}");
    assert_eq!(client.span.name, "tools/call request_meta");
    assert_eq!(
        client.attr("gen_ai.tool.name").as_deref(),
        Some("request_meta")
    );
    assert!(client.attr("server.port").is_some(), "{client:?}");
    assert_eq!(
        client.attr("http.response.status_code").as_deref(),
        Some("200")
    );

    // The header the upstream got names the same CLIENT span (a second call: the
    // demo server reports headers and `_meta` from separate tools).
    let reply = call(
        &sidecar,
        "request_headers",
        json!({}),
        &[
            ("traceparent", agent_parent("01")),
            ("tracestate", "agent=1".to_owned()),
        ],
        json!({}),
    )
    .await?;
    let headers = tool_json(&reply)?;
    let header = headers["traceparent"]
        .as_str()
        .context("no traceparent header")?;
    let clients = collector
        .wait_for(10, |s| {
            s.is_client() && s.span.name == "tools/call request_headers"
        })
        .await;
    let client = clients
        .first()
        .context("no CLIENT span for request_headers")?;
    assert_eq!(header, format!("00-{AGENT_TRACE}-{}-01", client.span_id()));
    assert_eq!(
        headers["tracestate"], "agent=1",
        "tracestate passed on: {headers}"
    );

    // `_meta`'s context (the MCP-level one) takes precedence over the header's.
    let meta_trace = "0af7651916cd43dd8448eb211c80319c";
    let meta_parent = format!("00-{meta_trace}-b7ad6b7169203331-01");
    let reply = call(
        &sidecar,
        "echo",
        json!({"text": "hi"}),
        &[("traceparent", agent_parent("01"))],
        json!({"traceparent": meta_parent}),
    )
    .await?;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let spans = collector
        .wait_for(10, |s| s.is_server() && s.trace_id() == meta_trace)
        .await;
    let server = spans.first().context("no SERVER span in _meta's trace")?;
    assert_eq!(server.parent_id(), "b7ad6b7169203331");

    // A trace key spelled so a case-insensitive server (Go's encoding/json) would read
    // it after ours never reaches the upstream: what it received holds ours alone.
    let reply = call(
        &sidecar,
        "request_meta",
        json!({}),
        &[("traceparent", agent_parent("01"))],
        json!({"TraceParent": "00-99999999999999999999999999999999-9999999999999999-01"}),
    )
    .await?;
    let received = tool_json(&reply)?;
    let keys: Vec<&String> = received
        .as_object()
        .context("_meta")?
        .keys()
        .filter(|k| k.to_ascii_lowercase().starts_with("trace"))
        .collect();
    assert_eq!(keys, ["traceparent"], "{received}");
    assert!(
        received["traceparent"]
            .as_str()
            .is_some_and(|t| t.starts_with(&format!("00-{AGENT_TRACE}-"))),
        "{received}"
    );

    // Audit lines carry the SERVER span's ids.
    let (trace, span) = (server.trace_id(), server.span_id());
    let found = crate::support::eventually(10, || {
        let lines = audit_lines(&sidecar);
        let (trace, span) = (trace.clone(), span.clone());
        async move {
            lines
                .iter()
                .any(|l| l["trace_id"] == trace.as_str() && l["span_id"] == span.as_str())
        }
    })
    .await;
    assert!(
        found,
        "no audit line with the span's ids: {}",
        sidecar.logs()
    );
    Ok(())
}

#[tokio::test]
async fn a_denied_call_span_says_why_and_nothing_went_upstream() -> Result<()> {
    let collector = Collector::start().await?;
    let (_server, sidecar) = traced(&collector, &[]).await?;
    let trace = "11111111111111111111111111111111";
    let reply = call(
        &sidecar,
        "add",
        json!({"a": 1, "b": 2}),
        &[("traceparent", format!("00-{trace}-{AGENT_SPAN}-01"))],
        json!({}),
    )
    .await?;
    assert_eq!(reply.error_code(), Some(-32088), "{}", reply.text);
    let spans = collector.wait_for(10, |s| s.trace_id() == trace).await;
    let server = server_span(&spans, trace).context("no SERVER span")?;
    assert_eq!(server.attr("toolmesh.decision").as_deref(), Some("denied"));
    assert_eq!(server.attr("toolmesh.outcome").as_deref(), Some("denied"));
    assert_eq!(server.attr("error.type").as_deref(), Some("-32088"));
    assert_eq!(
        server.attr("rpc.response.status_code").as_deref(),
        Some("-32088")
    );
    let why = server.error().context("a denied span is an error")?;
    assert!(
        why.contains("add"),
        "the status says what was refused: {why}"
    );
    // Give a CLIENT span time to arrive if there were one: there is none.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !collector
            .spans()
            .iter()
            .any(|s| s.trace_id() == trace && s.is_client()),
        "a denied call made no upstream request"
    );
    Ok(())
}

#[tokio::test]
async fn an_sse_calls_span_covers_the_stream() -> Result<()> {
    let collector = Collector::start().await?;
    let (_server, sidecar) = traced(&collector, &[]).await?;
    let trace = "22222222222222222222222222222222";
    let reply = call(
        &sidecar,
        "stream",
        json!({"count": 4, "interval_ms": 200}),
        &[("traceparent", format!("00-{trace}-{AGENT_SPAN}-01"))],
        json!({"progressToken": "p"}),
    )
    .await?;
    assert!(
        reply.text.contains("notifications/progress"),
        "an SSE answer: {}",
        reply.text
    );
    let spans = collector.wait_for(10, |s| s.trace_id() == trace).await;
    let server = server_span(&spans, trace).context("no SERVER span")?;
    // Four events 200 ms apart (the first at once): the span lasts until the stream's
    // end, not its head.
    assert!(
        server.duration() >= Duration::from_millis(550),
        "{:?}",
        server.duration()
    );
    let spans = collector
        .wait_for(10, |s| s.trace_id() == trace && s.is_client())
        .await;
    let client = spans.first().context("no CLIENT span")?;
    assert!(
        client.duration() >= Duration::from_millis(550),
        "{:?}",
        client.duration()
    );
    Ok(())
}

#[tokio::test]
async fn sampling_follows_the_agent_and_unsampled_requests_tell_the_upstream_so() -> Result<()> {
    let collector = Collector::start().await?;
    let (_server, sidecar) = traced(&collector, &["--trace-sampling", "0"]).await?;

    // No parent, ratio 0: nothing recorded, and the body reaches the upstream as sent,
    // but its header says "not sampled", so the server's own spans follow the decision.
    let reply = call(&sidecar, "request_headers", json!({}), &[], json!({})).await?;
    let headers = tool_json(&reply)?;
    let sent = headers["traceparent"]
        .as_str()
        .context("no traceparent header")?
        .to_owned();
    assert!(sent.ends_with("-00"), "not sampled: {sent}");
    let reply = call(&sidecar, "request_meta", json!({}), &[], json!({})).await?;
    assert!(
        tool_json(&reply)?.get("traceparent").is_none(),
        "an unsampled request's body is not rewritten"
    );
    // An unsampled agent context goes on as the agent sent it.
    let unsampled_parent = agent_parent("00");
    let reply = call(
        &sidecar,
        "request_headers",
        json!({}),
        &[("traceparent", unsampled_parent.clone())],
        json!({}),
    )
    .await?;
    assert_eq!(tool_json(&reply)?["traceparent"], unsampled_parent.as_str());

    // A sampled parent is followed whatever the ratio.
    let trace = "33333333333333333333333333333333";
    call(
        &sidecar,
        "echo",
        json!({"text": "x"}),
        &[("traceparent", format!("00-{trace}-{AGENT_SPAN}-01"))],
        json!({}),
    )
    .await?;
    let spans = collector.wait_for(10, |s| s.trace_id() == trace).await;
    assert!(server_span(&spans, trace).is_some(), "{spans:?}");
    let unsampled = sent.split('-').nth(1).unwrap_or_default().to_owned();
    assert!(
        !collector.spans().iter().any(|s| s.trace_id() == unsampled),
        "an unsampled trace was exported"
    );
    Ok(())
}

#[tokio::test]
async fn tracing_off_leaves_the_agents_context_and_body_as_sent() -> Result<()> {
    let server = DemoServer::start(&[]).await?;
    let sidecar = Sidecar::start(&demo_config(&server.url(), RULES), &[]).await?;
    let parent = agent_parent("01");
    let reply = call(
        &sidecar,
        "request_meta",
        json!({}),
        &[],
        json!({"traceparent": parent, "tracestate": "a=b"}),
    )
    .await?;
    let meta = tool_json(&reply)?;
    assert_eq!(meta["traceparent"], parent.as_str());
    assert_eq!(meta["tracestate"], "a=b");
    let reply = call(
        &sidecar,
        "request_headers",
        json!({}),
        &[("traceparent", parent.clone())],
        json!({}),
    )
    .await?;
    assert_eq!(tool_json(&reply)?["traceparent"], parent.as_str());
    // The audit line still names the agent's trace.
    let named = crate::support::eventually(10, || {
        let lines = audit_lines(&sidecar);
        async move { lines.iter().any(|l| l["trace_id"] == AGENT_TRACE) }
    })
    .await;
    assert!(named, "{}", sidecar.logs());
    Ok(())
}

#[tokio::test]
async fn the_control_planes_apply_span_links_to_the_pushes_it_caused() -> Result<()> {
    let collector = Collector::start().await?;
    let server = DemoServer::start(&[]).await?;
    let dir = TempDir::new("cp-traces")?;
    let endpoint = collector.url();
    let cp = ControlPlane::start_with_env(
        &dir.0,
        &demo_config(&server.url(), RULES),
        &["--otlp-endpoint", &endpoint],
        &[("OTEL_BSP_SCHEDULE_DELAY", "50")],
    )
    .await?;
    let _sidecar = Sidecar::connect(&cp.url(), SIDECAR_TOKEN, &[]).await?;
    // The first push (no apply caused it) is answered.
    let first = collector
        .wait_for(15, |s| {
            s.span.name == "toolmesh.push" && s.attr("toolmesh.answer").as_deref() == Some("ack")
        })
        .await;
    assert!(!first.is_empty(), "the connect's push and its ACK");

    let change = demo_config(
        &server.url(),
        r#"
    - server: demo
      tools: ["echo"]"#,
    );
    let (ok, out, err) = cp.ctl(&["apply", "-f", "-"], Some(&change)).await?;
    assert!(ok, "{out}{err}");
    let applies = collector
        .wait_for(15, |s| s.span.name == "toolmesh.apply")
        .await;
    let apply = applies.first().context("no apply span")?.clone();
    assert_eq!(apply.service, "toolmesh-control-plane");
    assert!(apply.is_server());
    assert!(apply.error().is_none(), "{apply:?}");
    let pushes = collector
        .wait_for(15, |s| {
            s.span.name == "toolmesh.push"
                && s.span
                    .links
                    .iter()
                    .any(|l| l.span_id == apply.span.span_id && l.trace_id == apply.span.trace_id)
        })
        .await;
    let push = pushes.first().context("no push linked to the apply")?;
    assert_eq!(push.attr("toolmesh.identity").as_deref(), Some(IDENTITY));
    assert_eq!(
        push.attr("toolmesh.answer").as_deref(),
        Some("ack"),
        "{push:?}"
    );
    assert_eq!(
        push.attr("toolmesh.generation"),
        apply.attr("toolmesh.generation")
    );
    Ok(())
}

#[tokio::test]
async fn a_collector_that_never_answers_costs_requests_nothing_and_spans_are_counted_as_dropped()
-> Result<()> {
    // Accepts connections and never says a word: every export waits for its timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", silent.local_addr()?);
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            open.push(conn);
        }
    });
    let server = DemoServer::start(&[]).await?;
    let sidecar = Sidecar::start_with_env(
        IDENTITY,
        &demo_config(&server.url(), RULES),
        &["--otlp-endpoint", &endpoint],
        &[
            ("OTEL_BSP_MAX_QUEUE_SIZE", "8"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4"),
            ("OTEL_BSP_SCHEDULE_DELAY", "10"),
        ],
    )
    .await?;
    let started = std::time::Instant::now();
    for i in 0..60 {
        let reply = call(
            &sidecar,
            "echo",
            json!({"text": format!("{i}")}),
            &[],
            json!({}),
        )
        .await?;
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "60 calls took {took:?}: the export must not hold requests up"
    );
    let dropped = crate::support::eventually(10, || async {
        let (_, page) = crate::support::admin(&sidecar, "/metrics")
            .await
            .unwrap_or_default();
        page.lines().any(|l| {
            l.starts_with("toolmesh_trace_spans_total{result=\"dropped\"}")
                && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) >= Some(1.0)
        })
    })
    .await;
    assert!(dropped, "spans that found the queue full are counted");
    held.abort();
    Ok(())
}

#[tokio::test]
async fn a_gateway_span_names_the_user_and_a_refused_token_gets_one_too() -> Result<()> {
    let collector = Collector::start().await?;
    let endpoint = collector.url();
    let s = crate::gateway::Stack::start_with(&["--otlp-endpoint", &endpoint]).await?;
    let alice = s.token("alice").await?;
    let (allowed, refused) = (
        "55555555555555555555555555555555",
        "66666666666666666666666666666666",
    );
    let send = |token: Option<String>, trace: &'static str| {
        let url = s.gateway.url("demo");
        async move {
            let mut headers = modern_headers("add");
            headers.push(("traceparent", format!("00-{trace}-{AGENT_SPAN}-01")));
            if let Some(token) = token {
                headers.push(("authorization", format!("Bearer {token}")));
            }
            post(
                &url,
                &borrow(&headers),
                modern_call(1, "add", json!({"a": 1, "b": 2})),
            )
            .await
        }
    };
    assert_eq!(send(Some(alice), allowed).await?.status, 200);
    assert_eq!(send(None, refused).await?.status, 401);
    // The gateway exports on the default schedule (5 s).
    let spans = collector
        .wait_for(20, |s| s.trace_id() == allowed && s.is_server())
        .await;
    let span = spans.first().context("no SERVER span for alice's call")?;
    assert_eq!(
        span.attr("toolmesh.subject"),
        Some(format!("{}#alice", s.authz.issuer))
    );
    assert_eq!(span.attr("toolmesh.decision").as_deref(), Some("allowed"));
    assert_eq!(span.parent_id(), AGENT_SPAN);
    let spans = collector
        .wait_for(20, |s| s.trace_id() == refused && s.is_server())
        .await;
    let span = spans
        .first()
        .context("no SERVER span for the refused token")?;
    assert_eq!(
        span.attr("toolmesh.subject").as_deref(),
        Some("(unauthenticated)")
    );
    assert_eq!(
        span.attr("http.response.status_code").as_deref(),
        Some("401")
    );
    assert_eq!(span.error().as_deref(), Some("no bearer token"), "{span:?}");
    Ok(())
}

#[tokio::test]
async fn a_call_bridged_to_a_2026_only_server_is_traced_through() -> Result<()> {
    // A 2025 agent and a server that speaks only 2026-07-28 (the Python SDK's): the
    // sidecar holds the session and sends the call statelessly; that request is a
    // CLIENT span under the call's SERVER span, and so is the retry of a call that
    // asked the agent something, sent by a task of its own.
    let collector = Collector::start().await?;
    let py = toolmesh_tests::PyServer::start().await?;
    let yaml = format!(
        "apiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {{name: py}}\nspec: {{endpoints: [{{url: \"{}\"}}], allowUnauthenticated: true, timeout: 20s}}\n---\napiVersion: toolmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: tests}}\nspec:\n  subjects: [{{identity: \"agents/*\"}}]\n  rules:\n    - {{server: py, tools: [echo, greet]}}\n",
        py.url()
    );
    let endpoint = collector.url();
    let sidecar = Sidecar::start_with_env(
        IDENTITY,
        &yaml,
        &["--otlp-endpoint", &endpoint],
        &[("OTEL_BSP_SCHEDULE_DELAY", "50")],
    )
    .await?;
    let url = sidecar.url("py");
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {"elicitation": {"form": {}}},
        "clientInfo": {"name": "raw", "version": "0"}}});
    let reply = post(&url, &[], init.to_string()).await?;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let session = reply
        .headers
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .context("a session from the sidecar")?
        .to_owned();
    let base = [
        ("mcp-session-id", session.as_str()),
        ("mcp-protocol-version", "2025-11-25"),
    ];
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    post(&url, &base, initialized.to_string()).await?;
    let trace = "77777777777777777777777777777777";
    let parent = format!("00-{trace}-{AGENT_SPAN}-01");
    let mut headers = base.to_vec();
    headers.push(("traceparent", parent.as_str()));
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "bridged"}}});
    let reply = post(&url, &headers, call.to_string()).await?;
    assert!(reply.text.contains("bridged"), "{}", reply.text);
    let servers = collector
        .wait_for(10, |s| s.trace_id() == trace && s.is_server())
        .await;
    let server = servers.first().context("no SERVER span")?;
    assert_eq!(server.parent_id(), AGENT_SPAN);
    let clients = collector
        .wait_for(10, |s| {
            s.trace_id() == trace && s.is_client() && s.parent_id() == server.span_id()
        })
        .await;
    let client = clients
        .iter()
        .find(|c| c.attr("mcp.method.name").as_deref() == Some("tools/call"))
        .with_context(|| format!("no tools/call CLIENT span under the SERVER span: {clients:?}"))?;
    assert_eq!(client.attr("gen_ai.tool.name").as_deref(), Some("echo"));

    // A call that asks the agent something (elicitation): the retry that carries the
    // answer is sent by the rounds' own task, and is a child of the same span.
    let trace = "88888888888888888888888888888888";
    let parent = format!("00-{trace}-{AGENT_SPAN}-01");
    let call = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "greet", "arguments": {}}});
    let mut req = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("traceparent", parent.as_str());
    for (k, v) in base {
        req = req.header(k, v);
    }
    let mut stream = req.body(call.to_string()).send().await?;
    let mut seen = String::new();
    let asked = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let Some(chunk) = stream.chunk().await? else {
                anyhow::bail!("the stream ended before the question: {seen}");
            };
            seen.push_str(&String::from_utf8_lossy(&chunk));
            let question = seen
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
                .find(|m| m["method"] == "elicitation/create");
            if let Some(q) = question {
                return anyhow::Ok(q["id"].clone());
            }
        }
    })
    .await??;
    let answer = json!({"jsonrpc": "2.0", "id": asked, "result": {"action": "decline"}});
    let reply = post(&url, &base, answer.to_string()).await?;
    assert!(reply.status < 300, "{}", reply.text);
    let rest = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(chunk) = stream.chunk().await? {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if seen.contains("action=decline") {
                break;
            }
        }
        anyhow::Ok(())
    })
    .await;
    assert!(rest.is_ok() && seen.contains("action=decline"), "{seen}");
    let servers = collector
        .wait_for(10, |s| {
            s.trace_id() == trace && s.is_server() && s.span.name.contains("greet")
        })
        .await;
    let server = servers.first().context("no SERVER span for greet")?.clone();
    let rounds = |spans: &[Received]| {
        spans
            .iter()
            .filter(|c| {
                c.is_client()
                    && c.parent_id() == server.span_id()
                    && c.attr("gen_ai.tool.name").as_deref() == Some("greet")
            })
            .count()
    };
    let both = crate::support::eventually(10, || {
        let n = rounds(&collector.spans());
        async move { n >= 2 }
    })
    .await;
    assert!(
        both,
        "the first round and the retry, both under the call's span: {:?}",
        collector
            .spans()
            .iter()
            .filter(|s| s.trace_id() == trace)
            .collect::<Vec<_>>()
    );
    Ok(())
}
