//! Shared pieces of the end-to-end tests: a demo server with a sidecar in front, and
//! a raw JSON-RPC POST helper.

use anyhow::Result;
use serde_json::Value;
use toolmesh_tests::{DemoServer, Sidecar, standalone_config};

/// The demo server and a sidecar routing `/mcp/demo` to it.
pub struct Stack {
    pub server: DemoServer,
    pub sidecar: Sidecar,
}

impl Stack {
    pub async fn start() -> Result<Stack> {
        Self::start_with(&[], &[]).await
    }

    pub async fn start_with(server_args: &[&str], sidecar_args: &[&str]) -> Result<Stack> {
        let server = DemoServer::start(server_args).await?;
        let sidecar =
            Sidecar::start(&standalone_config("demo", &server.url()), sidecar_args).await?;
        Ok(Stack { server, sidecar })
    }

    pub fn url(&self) -> String {
        self.sidecar.url("demo")
    }
}

/// The McpServer `demo` at `url` and one AccessPolicy for `agents/*` whose `rules:`
/// value is `rules` (YAML, flow or block style).
pub fn demo_config(url: &str, rules: &str) -> String {
    format!(
        r#"apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {{name: demo}}
spec:
  endpoints: [{{url: "{url}"}}]
  allowUnauthenticated: true
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: triage}}
spec:
  subjects: [{{identity: "agents/*"}}]
  rules:{rules}
"#
    )
}

/// A response as the tests look at it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }

    /// The JSON-RPC message of a JSON or single-event SSE body.
    pub fn message(&self) -> Value {
        if let Ok(v) = serde_json::from_str(&self.text) {
            return v;
        }
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
            .find(|v| v.get("result").is_some() || v.get("error").is_some())
            .unwrap_or(Value::Null)
    }

    pub fn error_code(&self) -> Option<i64> {
        self.json()["error"]["code"].as_i64()
    }
}

/// POST `body` to `url` with the usual MCP headers plus `headers`.
pub async fn post(
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<reqwest::Body>,
) -> Result<Reply> {
    let mut req = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.body(body).send().await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await?;
    Ok(Reply {
        status,
        headers,
        text,
    })
}

/// A `tools/call` for `name` in the 2026-07-28 shape.
pub fn modern_call(id: u64, name: &str, arguments: Value) -> String {
    serde_json::json!({
        "jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": name, "arguments": arguments, "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"}
        }}
    })
    .to_string()
}

/// Headers of a well-formed 2026-07-28 `tools/call` for `name`.
pub fn modern_headers(name: &str) -> Vec<(&'static str, String)> {
    vec![
        ("mcp-protocol-version", "2026-07-28".to_owned()),
        ("mcp-method", "tools/call".to_owned()),
        ("mcp-name", name.to_owned()),
    ]
}

/// Borrow a header list for [`post`].
pub fn borrow<'a>(h: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    h.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Fetch an admin path.
/// A 2026-07-28 `tools/call` of `tool` on the `demo` server through `sidecar`:
/// (HTTP status, JSON-RPC error code if any).
pub async fn call_demo(sidecar: &Sidecar, tool: &str) -> Result<(u16, Option<i64>)> {
    let r = post(
        &sidecar.url("demo"),
        &borrow(&modern_headers(tool)),
        modern_call(1, tool, serde_json::json!({"text": "x", "a": 1, "b": 2})),
    )
    .await?;
    Ok((r.status, r.error_code()))
}

pub async fn admin(sidecar: &Sidecar, path: &str) -> Result<(u16, String)> {
    let resp = reqwest::get(sidecar.admin_url(path)).await?;
    Ok((resp.status().as_u16(), resp.text().await?))
}

/// Poll `f` until it returns true or `secs` pass.
pub async fn eventually<F, Fut>(secs: u64, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// The audit lines a sidecar wrote to its output (stdout, interleaved with its logs).
pub fn audit_lines(sidecar: &Sidecar) -> Vec<Value> {
    sidecar
        .logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("decision").is_some())
        .collect()
}

/// The sender for ACKs and the pushes of a snapshot stream.
pub type SnapshotStream = (
    tokio::sync::mpsc::Sender<toolmesh_proto::v1alpha1::SidecarMessage>,
    tonic::Streaming<toolmesh_proto::v1alpha1::SnapshotPush>,
);

/// Open a raw snapshot stream as a sidecar would, Hello sent: the stream, or the
/// control plane's refusal.
pub async fn snapshot_stream(
    url: &str,
    token: &str,
    identity: &str,
    node: &str,
) -> Result<Result<SnapshotStream, tonic::Status>> {
    use toolmesh_proto::v1alpha1 as pb;
    use toolmesh_proto::v1alpha1::sidecar_message::Kind as Msg;
    let channel = tonic::transport::Channel::from_shared(url.to_owned())?
        .connect()
        .await?;
    let mut client =
        toolmesh_proto::v1alpha1::snapshot_service_client::SnapshotServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(pb::SidecarMessage {
        kind: Some(Msg::Hello(pb::Hello {
            identity: identity.into(),
            node: node.into(),
            version: String::new(),
            gateway: false,
        })),
    })
    .await?;
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(match client.stream(req).await {
        Ok(r) => Ok((tx, r.into_inner())),
        Err(status) => Err(status),
    })
}

/// Run an MCP client program that prints one JSON report as its last stdout line (the
/// SDK clients in `tests/js` and `tests/python`): the report, or what went wrong.
pub async fn client_report(mut cmd: tokio::process::Command, what: &str) -> Result<Value> {
    use anyhow::Context as _;
    cmd.kill_on_drop(true);
    let out = tokio::time::timeout(std::time::Duration::from_secs(90), cmd.output())
        .await
        .with_context(|| format!("{what} timed out"))??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        anyhow::bail!(
            "{what} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("{what} printed {stdout}"))
}
