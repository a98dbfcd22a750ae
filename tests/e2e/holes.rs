//! Policy holes, tried the way an attacker would against servers we did not write:
//! the TypeScript SDK's `McpServer` (`tests/js/server.mjs`: sessions, a resource
//! template, `InMemoryEventStore` resumption, the legacy HTTP+SSE transport) and the
//! rmcp demo server, each behind the real sidecar. Every refusal is checked from the
//! server's side too (its log of what it executed), next to a positive control.

use anyhow::{Context, Result};
use futures::StreamExt;
use serde_json::{Value, json};
use toolmesh_tests::{DemoServer, IDENTITY, Sidecar, TsServer};

use crate::support::{Reply, audit_lines, borrow, eventually, modern_call, modern_headers, post};

const PROTOCOL: &str = "2025-11-25";

/// `ts` (TypeScript SDK server), `legacy` (its HTTP+SSE endpoint) and `demo` (rmcp),
/// with the rules under test for `agents/*`.
fn config(ts: &TsServer, demo: &DemoServer) -> String {
    format!(
        r#"apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {{name: ts}}
spec:
  endpoints: [{{url: "{ts}"}}]
  allowUnauthenticated: true
---
apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {{name: legacy}}
spec:
  endpoints: [{{url: "{legacy}"}}]
  allowUnauthenticated: true
---
apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {{name: redirect}}
spec:
  endpoints: [{{url: "{redirect}"}}]
  allowUnauthenticated: true
---
apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {{name: demo}}
spec:
  endpoints: [{{url: "{demo}"}}]
  allowUnauthenticated: true
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: holes}}
spec:
  subjects: [{{identity: "agents/*"}}]
  rules:
    - server: ts
      tools: ["echo", "write_file"]
      resources: ["docs://public/*"]
      prompts: ["public_prompt"]
    - server: ts
      tools: ["write_file"]
      action: deny
      conditions: [{{argument: "path", matches: "/etc/*"}}]
    - server: ts
      tools: ["echo"]
      action: deny
      conditions: [{{argument: "n", matches: "13"}}]
    - server: ts
      resources: ["docs://public/files/keys"]
      action: deny
    - server: legacy
      tools: ["*"]
    - server: redirect
      tools: ["*"]
    - server: demo
      tools: ["add", "echo", "sleep", "request_headers"]
      resources: ["test://static-*"]
    - server: demo
      tools: ["add"]
      action: deny
      conditions: [{{argument: "a", matches: "13"}}]
"#,
        ts = ts.url(),
        legacy = ts.legacy_url(),
        redirect = ts.url().replace("/mcp", "/redirect"),
        demo = demo.url(),
    )
}

struct Upstreams {
    ts: TsServer,
    demo: DemoServer,
}

impl Upstreams {
    async fn start() -> Result<Upstreams> {
        Ok(Upstreams {
            ts: TsServer::start().await?,
            demo: DemoServer::start(&[]).await?,
        })
    }

    async fn sidecar(&self, identity: &str, extra: &[&str]) -> Result<Sidecar> {
        Sidecar::start_as(identity, &config(&self.ts, &self.demo), extra).await
    }
}

/// A 2025-11-25 session opened by raw POSTs, as an SDK client opens one.
struct Session {
    url: String,
    id: String,
}

impl Session {
    async fn open(url: &str) -> Result<Session> {
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": PROTOCOL, "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"}}});
        let r = post(url, &[], init.to_string()).await?;
        let id = r
            .headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .with_context(|| format!("no session id: {r:?}"))?
            .to_owned();
        let session = Session {
            url: url.to_owned(),
            id,
        };
        let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        session.send(&note.to_string()).await?;
        Ok(session)
    }

    fn headers(&self) -> [(&str, &str); 2] {
        [
            ("mcp-session-id", self.id.as_str()),
            ("mcp-protocol-version", PROTOCOL),
        ]
    }

    async fn send(&self, body: &str) -> Result<Reply> {
        post(&self.url, &self.headers(), body.to_owned()).await
    }

    /// A request whose `params` are the raw JSON text `params` (numbers as spelled).
    async fn request(&self, method: &str, params: &str) -> Result<Reply> {
        self.send(&format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"{method}","params":{params}}}"#
        ))
        .await
    }
}

fn refused(r: &Reply, status: u16, code: i64) {
    assert_eq!((r.status, r.error_code()), (status, Some(code)), "{r:?}");
}

#[tokio::test]
async fn conditions_compare_values_by_meaning_on_both_servers() -> Result<()> {
    let up = Upstreams::start().await?;
    let sidecar = up.sidecar(IDENTITY, &[]).await?;
    let ts = Session::open(&sidecar.url("ts")).await?;

    let ok = ts
        .request(
            "tools/call",
            r#"{"name":"write_file","arguments":{"path":"/srv/ok"}}"#,
        )
        .await?;
    assert!(ok.text.contains("/srv/ok"), "{ok:?}");
    for args in [
        r#"{"path":"/etc/passwd"}"#,
        r#"{"path":["/etc/passwd"]}"#,
        r#"{"path":[["/srv/x","/etc/passwd"]]}"#,
        r#"{"path":[]}"#,
        r#"{"path":null}"#,
        r#"{"path":{"to":"/etc/passwd"}}"#,
        r#"{}"#,
        r#"{"path":"/srv/x","Path":"/etc/passwd"}"#,
    ] {
        let r = ts
            .request(
                "tools/call",
                &format!(r#"{{"name":"write_file","arguments":{args}}}"#),
            )
            .await?;
        assert_eq!(r.message()["error"]["code"], -32088, "{args}: {r:?}");
    }
    for n in ["13", "13.0", "1.3e1", "130e-1", "[13]", "[12,13]"] {
        let r = ts
            .request(
                "tools/call",
                &format!(r#"{{"name":"echo","arguments":{{"text":"x","n":{n}}}}}"#),
            )
            .await?;
        assert_eq!(r.message()["error"]["code"], -32088, "n={n}: {r:?}");
    }
    let twelve = ts
        .request(
            "tools/call",
            r#"{"name":"echo","arguments":{"text":"twelve","n":12}}"#,
        )
        .await?;
    assert!(twelve.text.contains("twelve"), "{twelve:?}");
    let logs = up.ts.logs();
    assert_eq!(logs.matches("call write_file").count(), 1, "{logs}");
    assert_eq!(logs.matches("call echo").count(), 1, "{logs}");
    assert!(!logs.contains("/etc/passwd"), "{logs}");

    // The rmcp server: `add` with a = 13 in any spelling is denied.
    let demo = sidecar.url("demo");
    for a in ["13.0", "1.3e1", "[13]"] {
        let body = modern_call(1, "add", json!({})).replace(
            r#""arguments":{}"#,
            &format!(r#""arguments":{{"a":{a},"b":1}}"#),
        );
        let r = post(&demo, &borrow(&modern_headers("add")), body).await?;
        refused(&r, 200, -32088);
    }
    let r = post(
        &demo,
        &borrow(&modern_headers("add")),
        modern_call(2, "add", json!({"a": 12, "b": 1})),
    )
    .await?;
    assert_eq!(r.message()["result"]["content"][0]["text"], "13", "{r:?}");
    assert_eq!(up.demo.proc.output.text().matches("call add").count(), 1);
    Ok(())
}

#[tokio::test]
async fn resource_uris_are_judged_as_the_server_resolves_them() -> Result<()> {
    let up = Upstreams::start().await?;
    let sidecar = up.sidecar(IDENTITY, &[]).await?;
    let ts = Session::open(&sidecar.url("ts")).await?;
    let read = |uri: &str| json!({"uri": uri}).to_string();

    for uri in ["docs://public/readme", "docs://public/files/guide"] {
        let r = ts.request("resources/read", &read(uri)).await?;
        assert!(
            r.text.contains("contents of docs://public/"),
            "{uri}: {r:?}"
        );
    }
    for uri in [
        "docs://public/../secret/keys",
        "docs://public/files/%2e%2e/%2e%2e/secret/keys",
        "docs://public/./../secret/keys",
        "DOCS://secret/keys",
        "docs://public/\t../secret/keys",
        " docs://secret/keys",
    ] {
        let r = ts.request("resources/read", &read(uri)).await?;
        refused(&r, 400, -32600);
    }
    let r = ts
        .request("resources/read", &read("docs://secret/keys"))
        .await?;
    assert_eq!(r.message()["error"]["code"], -32088, "{r:?}");

    let complete = |uri: &str| {
        json!({"ref": {"type": "ref/resource", "uri": uri},
               "argument": {"name": "name", "value": "g"}})
        .to_string()
    };
    let r = ts
        .request(
            "completion/complete",
            &complete("docs://public/files/{name}"),
        )
        .await?;
    assert!(r.text.contains("guide"), "{r:?}");
    // Completion values name resources: `keys` names a denied one and is dropped,
    // though the server offered it.
    let all = json!({"ref": {"type": "ref/resource", "uri": "docs://public/files/{name}"},
                     "argument": {"name": "name", "value": ""}});
    let r = ts.request("completion/complete", &all.to_string()).await?;
    assert_eq!(
        r.message()["result"]["completion"]["values"],
        json!(["guide"]),
        "{r:?}"
    );
    let direct = Session::open(&up.ts.url()).await?;
    let r = direct
        .request("completion/complete", &all.to_string())
        .await?;
    assert_eq!(
        r.message()["result"]["completion"]["values"],
        json!(["guide", "keys"]),
        "{r:?}"
    );
    let r = ts
        .request("resources/read", &read("docs://public/files/keys"))
        .await?;
    assert_eq!(r.message()["error"]["code"], -32088, "{r:?}");
    let r = ts
        .request(
            "completion/complete",
            &complete("docs://secret/files/{name}"),
        )
        .await?;
    assert_eq!(r.message()["error"]["code"], -32088, "{r:?}");
    let r = ts
        .request(
            "completion/complete",
            &complete("docs://public/../secret/files/{name}"),
        )
        .await?;
    refused(&r, 400, -32600);

    let logs = up.ts.logs();
    assert!(logs.contains("read docs://public/readme"), "{logs}");
    assert!(!logs.contains("docs://secret"), "{logs}");

    // The rmcp server reads URIs as strings: same refusals, same proof.
    let demo = Session::open(&sidecar.url("demo")).await?;
    for (uri, status) in [
        ("test://static-text", 200),
        ("test://static-text/../../template/1/data", 400),
        ("TEST://template/1/data", 400),
    ] {
        let r = demo.request("resources/read", &read(uri)).await?;
        assert_eq!(r.status, status, "{uri}: {r:?}");
    }
    let demo_logs = up.demo.proc.output.text();
    assert!(demo_logs.contains("read test://static-text"), "{demo_logs}");
    assert!(!demo_logs.contains("template"), "{demo_logs}");
    Ok(())
}

/// Read an SSE response until `done` holds for the text so far, or 5 s pass.
async fn read_until(resp: reqwest::Response, done: impl Fn(&str) -> bool) -> (String, bool) {
    let mut text = String::new();
    let mut stream = resp.bytes_stream();
    let deadline = tokio::time::sleep(std::time::Duration::from_secs(5));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            chunk = stream.next() => match chunk {
                Some(Ok(bytes)) => {
                    text.push_str(&String::from_utf8_lossy(&bytes));
                    if done(&text) {
                        return (text, false);
                    }
                }
                Some(Err(_)) => return (text, true),
                None => return (text, false),
            },
            () = &mut deadline => return (text, false),
        }
    }
}

#[tokio::test]
async fn lists_reach_the_agent_filtered_on_every_path() -> Result<()> {
    let up = Upstreams::start().await?;
    let sidecar = up.sidecar(IDENTITY, &[]).await?;
    let ts = Session::open(&sidecar.url("ts")).await?;

    // The list itself, on the POST's stream.
    let list = ts.request("tools/list", "{}").await?;
    assert!(list.text.contains("write_file"), "{list:?}");
    assert!(!list.text.contains("delete_file"), "{list:?}");

    // The same answer replayed on a resumed GET stream (the SDK's event store keeps
    // it behind the priming event's id).
    let priming = list
        .text
        .lines()
        .find_map(|l| l.strip_prefix("id:"))
        .map(|id| id.trim().to_owned())
        .context("no event id on the list stream")?;
    let resp = reqwest::Client::new()
        .get(sidecar.url("ts"))
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &ts.id)
        .header("mcp-protocol-version", PROTOCOL)
        .header("last-event-id", &priming)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let (replayed, _) = read_until(resp, |t| t.contains("write_file")).await;
    assert!(replayed.contains("write_file"), "not replayed: {replayed}");
    assert!(!replayed.contains("delete_file"), "{replayed}");

    // Batches may not carry list requests or gated calls.
    let batch_headers = [
        ("mcp-session-id", ts.id.as_str()),
        ("mcp-protocol-version", "2025-03-26"),
    ];
    for batch in [
        json!([{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}]),
        json!([{"jsonrpc": "2.0", "id": 1, "method": "ping"},
               {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": "batched"}}}]),
    ] {
        let r = post(&sidecar.url("ts"), &batch_headers, batch.to_string()).await?;
        refused(&r, 400, -32600);
    }
    assert!(!up.ts.logs().contains("batched"));

    // The legacy HTTP+SSE transport hands out an endpoint for the agent's POSTs: the
    // sidecar refuses the stream instead of steering the agent to it.
    let resp = reqwest::Client::new()
        .get(sidecar.url("legacy"))
        .header("accept", "text/event-stream")
        .send()
        .await?;
    let (text, failed) = read_until(resp, |t| t.contains("messages")).await;
    assert!(failed, "the stream should end with an error: {text}");
    assert!(!text.contains("messages"), "{text}");
    Ok(())
}

#[tokio::test]
async fn an_upstream_cannot_redirect_the_agent_around_the_sidecar() -> Result<()> {
    let up = Upstreams::start().await?;
    let sidecar = up.sidecar(IDENTITY, &[]).await?;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": PROTOCOL, "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"}}});
    let resp = client
        .post(sidecar.url("redirect"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(init.to_string())
        .send()
        .await?;
    assert_eq!(resp.status(), 502);
    assert!(resp.headers().get("location").is_none());
    assert!(resp.headers().get("link").is_none());
    let v: Value = resp.json().await?;
    assert_eq!(v["error"]["code"], -32085, "{v}");
    assert_eq!(v["error"]["data"]["retryable"], false, "{v}");
    let logs = up.ts.logs();
    assert!(logs.contains("redirected"), "{logs}");
    assert!(
        !logs.contains("session opened"),
        "the agent went to /mcp: {logs}"
    );
    Ok(())
}

#[tokio::test]
async fn sessions_belong_to_the_identity_that_opened_them() -> Result<()> {
    let up = Upstreams::start().await?;
    let a = up.sidecar("agents/a", &[]).await?;
    let b = up.sidecar("agents/b", &[]).await?;
    let session = Session::open(&a.url("ts")).await?;
    let upstream_id = up
        .ts
        .logs()
        .lines()
        .find_map(|l| l.strip_prefix("session opened "))
        .context("the server opened no session")?
        .to_owned();
    assert!(
        !session.id.contains(&upstream_id),
        "the upstream id leaked: {}",
        session.id
    );

    let call = |text: &str| {
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
               "params": {"name": "echo", "arguments": {"text": text, "n": 1}}})
        .to_string()
    };
    // B holds A's session id (or the upstream's own): useless for calls, answers, ends.
    for id in [session.id.as_str(), upstream_id.as_str()] {
        let headers = [("mcp-session-id", id), ("mcp-protocol-version", PROTOCOL)];
        let r = post(&b.url("ts"), &headers, call("from-b")).await?;
        refused(&r, 404, -32084);
        let answer = json!({"jsonrpc": "2.0", "id": "elicit-1", "result": {"action": "accept"}});
        let r = post(&b.url("ts"), &headers, answer.to_string()).await?;
        refused(&r, 404, -32084);
        let r = reqwest::Client::new()
            .delete(b.url("ts"))
            .header("mcp-session-id", id)
            .header("mcp-protocol-version", PROTOCOL)
            .send()
            .await?;
        assert_eq!(r.status(), 404);
    }
    // The raw upstream id through A is not A's session either.
    let forged = [
        ("mcp-session-id", upstream_id.as_str()),
        ("mcp-protocol-version", PROTOCOL),
    ];
    refused(
        &post(&a.url("ts"), &forged, call("forged")).await?,
        404,
        -32084,
    );

    // A's session still works: nothing B did reached it.
    let r = session.send(&call("from-a")).await?;
    assert!(r.text.contains("from-a"), "{r:?}");
    let logs = up.ts.logs();
    assert!(
        !logs.contains("from-b") && !logs.contains("forged"),
        "{logs}"
    );
    assert!(!logs.contains("session closed"), "{logs}");

    // The same against the rmcp server.
    let demo_session = Session::open(&a.url("demo")).await?;
    let headers = [
        ("mcp-session-id", demo_session.id.as_str()),
        ("mcp-protocol-version", PROTOCOL),
    ];
    refused(
        &post(&b.url("demo"), &headers, call("from-b")).await?,
        404,
        -32084,
    );
    let r = demo_session.send(&call("demo-from-a")).await?;
    assert!(r.text.contains("demo-from-a"), "{r:?}");
    assert_eq!(up.demo.proc.output.text().matches("call echo").count(), 1);
    Ok(())
}

#[tokio::test]
async fn what_is_forwarded_is_what_was_judged() -> Result<()> {
    let up = Upstreams::start().await?;
    let sidecar = up.sidecar(IDENTITY, &[]).await?;
    let ts = Session::open(&sidecar.url("ts")).await?;

    // Keys a case-insensitive server could read instead of the judged one.
    for params in [
        r#"{"name":"echo","Name":"delete_file","arguments":{"text":"x"}}"#,
        "{\"name\":\"echo\",\"NAME\":\"delete_file\",\"arguments\":{\"text\":\"x\"}}",
        r#"{"name":"echo","arguments":{"text":"x"},"Arguments":{"path":"/etc/passwd"}}"#,
    ] {
        refused(&ts.request("tools/call", params).await?, 400, -32600);
    }
    assert!(!up.ts.logs().contains("call"), "{}", up.ts.logs());

    // Bodies the sidecar did not judge as sent: compressed, or not UTF-8.
    let url = sidecar.url("demo");
    let body = modern_call(1, "echo", json!({"text": "x"}));
    for (name, value) in [
        ("content-encoding", "gzip"),
        ("content-type", "application/json; charset=utf-16"),
    ] {
        let mut req = reqwest::Client::new()
            .post(&url)
            .header("accept", "application/json, text/event-stream");
        for (k, v) in modern_headers("echo") {
            req = req.header(k, v);
        }
        if name != "content-type" {
            req = req.header("content-type", "application/json");
        }
        let resp = req.header(name, value).body(body.clone()).send().await?;
        assert_eq!(resp.status(), 415, "{name}: {value}");
        let v: Value = resp.json().await?;
        assert_eq!(v["error"]["code"], -32083);
    }

    // Forwarding headers from the agent never reach the upstream.
    let mut headers = modern_headers("request_headers");
    headers.push(("x-forwarded-for", "10.9.9.9".to_owned()));
    headers.push(("forwarded", "for=10.9.9.9".to_owned()));
    headers.push(("x-real-ip", "10.9.9.9".to_owned()));
    let r = post(
        &url,
        &borrow(&headers),
        modern_call(2, "request_headers", json!({})),
    )
    .await?;
    assert!(r.text.contains("mcp-method"), "{r:?}");
    assert!(!r.text.contains("10.9.9.9"), "{r:?}");
    assert_eq!(up.demo.proc.output.text().matches("call echo").count(), 0);
    Ok(())
}

#[tokio::test]
async fn abandoned_calls_are_audited_and_lines_stay_bounded() -> Result<()> {
    let up = Upstreams::start().await?;
    let sidecar = up.sidecar(IDENTITY, &[]).await?;
    let url = sidecar.url("demo");

    // The agent gives up before the answer's head: the call still ran upstream.
    let abandoned = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", "tools/call")
        .header("mcp-name", "sleep")
        .timeout(std::time::Duration::from_millis(200))
        .body(modern_call(1, "sleep", json!({"ms": 1000})))
        .send()
        .await;
    assert!(abandoned.is_err(), "{abandoned:?}");
    let audited = eventually(5, || async {
        audit_lines(&sidecar)
            .iter()
            .any(|l| l["name"] == "sleep" && l["status"] == 499 && l["decision"] == "allowed")
    })
    .await;
    assert!(
        audited,
        "no audit line for the abandoned call:\n{}",
        sidecar.logs()
    );
    assert!(up.demo.proc.output.text().contains("call sleep"));

    // A huge request id does not make a huge audit line.
    let id = "x".repeat(200_000);
    let body = modern_call(2, "echo", json!({"text": "long id"}))
        .replace("\"id\":2", &format!("\"id\":\"{id}\""));
    let r = post(&url, &borrow(&modern_headers("echo")), body).await?;
    assert_eq!(r.status, 200, "{r:?}");
    let found = eventually(5, || async {
        audit_lines(&sidecar).iter().any(|l| {
            l["name"] == "echo"
                && l["request_id"]
                    .as_str()
                    .is_some_and(|s| s.len() < 300 && s.contains("200002 bytes"))
        })
    })
    .await;
    assert!(found, "{}", sidecar.logs().len());
    assert!(sidecar.logs().lines().all(|l| l.len() < 10_000));
    Ok(())
}

#[tokio::test]
async fn slow_oversized_and_rebinding_requests_get_clear_answers() -> Result<()> {
    let up = Upstreams::start().await?;
    let sidecar = up
        .sidecar(
            IDENTITY,
            &["--max-body-bytes", "1048576", "--body-read-timeout", "1s"],
        )
        .await?;
    let url = sidecar.url("demo");

    // Over the limit: the client finishes uploading and reads a JSON-RPC error.
    let big = modern_call(1, "echo", json!({"text": "y".repeat(3 * 1024 * 1024)}));
    let r = post(&url, &borrow(&modern_headers("echo")), big).await?;
    refused(&r, 413, -32082);

    // A body that stops arriving.
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Vec<u8>, std::io::Error>>();
    tx.unbounded_send(Ok(b"{\"jsonrpc\":\"2.0\",".to_vec()))?;
    let started = std::time::Instant::now();
    let resp = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(reqwest::Body::wrap_stream(rx))
        .send()
        .await?;
    assert_eq!(resp.status(), 408);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    drop(tx);

    // The admin port's /config is for loopback hosts only (DNS rebinding).
    let resp = reqwest::Client::new()
        .get(sidecar.admin_url("/config"))
        .header("host", "evil.example:16020")
        .send()
        .await?;
    assert_eq!(resp.status(), 403);
    let resp = reqwest::get(sidecar.admin_url("/config")).await?;
    assert_eq!(resp.status(), 200);
    Ok(())
}
