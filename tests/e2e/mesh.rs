//! No way around the sidecar: an agent sidecar reaches an MCP server through the
//! server's own sidecar (`--mode server`) over mutual TLS with workload certificates
//! the control plane issued; everything else that knocks on the server-side port — a
//! plain connection, TLS without a certificate, a certificate for an identity no policy
//! names — is refused, and the upstream's own log shows the refused calls never ran.
//! Certificates rotate under load without a failed call.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::json;
use toolmesh_proto::v1alpha1 as pb;
use toolmesh_proto::v1alpha1::sidecar_message::Kind as Msg;
use toolmesh_sidecar::workload::Workload;
use toolmesh_tests::{
    ControlPlane, DemoServer, IDENTITY, OTHER_TOKEN, SERVER_IDENTITY, SERVER_TOKEN, SIDECAR_TOKEN,
    Sidecar, TempDir,
};

use crate::support::{audit_lines, borrow, eventually, modern_call, modern_headers, post};

/// The demo server's credential: held by its server-side sidecar only.
const DEMO_KEY: &str = "demo-key-only-the-server-side-holds";

/// The demo server behind the server-side sidecar at `mesh`, an impostor entry that
/// expects another identity at the same sidecar, and a policy for the test identity.
fn resources(mesh: SocketAddr) -> String {
    format!(
        r#"apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {{name: demo}}
spec:
  endpoints: [{{url: "https://{mesh}/mcp/demo"}}]
  mesh: {{identity: {SERVER_IDENTITY}}}
  credential: {{header: X-Api-Key, secretRef: {{name: demo-key, key: key}}}}
---
apiVersion: toolmesh.dev/v1alpha1
kind: Secret
metadata: {{name: demo-key}}
data: {{key: "{DEMO_KEY}"}}
---
apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {{name: impostor}}
spec:
  endpoints: [{{url: "https://{mesh}/mcp/impostor"}}]
  mesh: {{identity: tools/impostor}}
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: agents}}
spec:
  subjects: [{{identity: "{IDENTITY}"}}]
  rules:
    - server: demo
      tools: ["echo", "add", "request_headers"]
    - server: impostor
      tools: ["echo"]
"#
    )
}

/// A seed that names nothing the sidecars use: a server-side sidecar's port, which the
/// `McpServer` needs, is only known once it is up.
const NOTHING: &str =
    "apiVersion: toolmesh.dev/v1alpha1\nkind: Secret\nmetadata: {name: unused}\ndata: {k: v}\n";

/// A server-side sidecar (`--mode server`, mutual TLS on an ephemeral loopback port) of
/// the control plane at `cp_url`, with `args` naming its server.
async fn server_side(cp_url: &str, args: &[&str]) -> Result<Sidecar> {
    let mut all = vec!["--mode", "server", "--mesh-listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    Sidecar::connect_as(
        TempDir::new("mesh-server")?,
        cp_url,
        SERVER_TOKEN,
        SERVER_IDENTITY,
        &all,
    )
    .await
}

/// `toolmeshctl apply` of `yaml`, or why it failed.
async fn apply(cp: &ControlPlane, yaml: &str) -> Result<()> {
    let (ok, out, err) = cp.ctl(&["apply", "-f", "-"], Some(yaml)).await?;
    if !ok {
        bail!("apply failed: {out}{err}");
    }
    Ok(())
}

/// A control plane, the demo server, its server-side sidecar and an agent sidecar,
/// wired together and ready.
struct Mesh {
    cp: ControlPlane,
    demo: DemoServer,
    server: Sidecar,
    agent: Sidecar,
    _dir: TempDir,
}

impl Mesh {
    async fn start(cp_flags: &[&str]) -> Result<Mesh> {
        let dir = TempDir::new("mesh")?;
        let demo = DemoServer::start(&[]).await?;
        let cp = ControlPlane::start_with(&dir.0.join("cp"), NOTHING, cp_flags).await?;
        let server = server_side(&cp.url(), &["--upstream", &demo.url()]).await?;
        apply(&cp, &resources(server.mcp)).await?;
        let agent = Sidecar::connect(&cp.url(), SIDECAR_TOKEN, &[]).await?;
        let mesh = Mesh {
            cp,
            demo,
            server,
            agent,
            _dir: dir,
        };
        let ready = eventually(20, || async {
            matches!(mesh.call("echo", "ready?").await, Ok((200, Some(_))))
        })
        .await;
        if !ready {
            bail!(
                "the agent never reached the server through the mesh\nserver:\n{}\nagent:\n{}",
                mesh.server.logs(),
                mesh.agent.logs()
            );
        }
        Ok(mesh)
    }

    /// Call `tool` through the agent's sidecar: the status and the result's text.
    async fn call(&self, tool: &str, text: &str) -> Result<(u16, Option<String>)> {
        call_through(&self.agent.url("demo"), tool, text).await
    }

    /// How many times the demo server ran `tool`, by its own log.
    fn ran(&self, tool: &str) -> usize {
        let line = format!("call {tool}");
        self.demo
            .proc
            .output
            .text()
            .lines()
            .filter(|l| *l == line)
            .count()
    }
}

async fn call_through(url: &str, tool: &str, text: &str) -> Result<(u16, Option<String>)> {
    let reply = post(
        url,
        &borrow(&modern_headers(tool)),
        modern_call(1, tool, json!({"text": text, "a": 1, "b": 2})),
    )
    .await?;
    let text = reply.message()["result"]["content"][0]["text"]
        .as_str()
        .map(str::to_owned);
    Ok((reply.status, text))
}

/// A workload certificate for `identity`, asked for on a raw snapshot stream exactly
/// as a sidecar asks: what an attacker holding `token` could get.
async fn certificate(cp: &ControlPlane, token: &str, identity: &str) -> Result<Arc<Workload>> {
    let (tx, mut pushes) = crate::support::snapshot_stream(&cp.url(), token, identity, "raw")
        .await?
        .map_err(|s| anyhow!("refused: {s}"))?;
    let request = Workload::request().map_err(|e| anyhow!(e))?;
    let csr = request.csr.clone();
    tx.send(pb::SidecarMessage {
        kind: Some(Msg::CertificateRequest(pb::CertificateRequest { csr })),
    })
    .await?;
    loop {
        let push = tokio::time::timeout(Duration::from_secs(10), pushes.message())
            .await
            .context("no certificate within 10 s")??
            .context("the stream ended")?;
        if let Some(answer) = push.certificate {
            let workload = Workload::new(identity);
            workload.install(request, &answer).map_err(|e| anyhow!(e))?;
            return Ok(workload);
        }
    }
}

/// POST a `tools/call` for `tool` to `addr` over TLS with `config` (HTTP/1.1): the
/// status and body, or where it failed.
async fn post_tls(
    config: rustls::ClientConfig,
    addr: SocketAddr,
    path: &str,
    tool: &str,
) -> Result<(u16, String)> {
    let mut config = config;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("mesh.invalid")?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let mut request = http::Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(Full::new(Bytes::from(modern_call(
            7,
            tool,
            json!({"a": 1, "b": 2, "text": "t"}),
        ))))?;
    for (k, v) in modern_headers(tool) {
        request.headers_mut().insert(k, v.parse()?);
    }
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Accepts any server certificate: a client that only wants to get in.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[tokio::test]
async fn the_agent_reaches_a_server_only_through_both_sidecars() -> Result<()> {
    let mesh = Mesh::start(&[]).await?;

    // The call works, end to end, and the server-side sidecar decided it again for the
    // identity the agent sidecar's certificate names.
    assert_eq!(
        mesh.call("echo", "hello").await?,
        (200, Some("hello".to_owned()))
    );
    let decided = |server: &Sidecar| {
        audit_lines(server)
            .iter()
            .any(|l| l["subject"] == IDENTITY && l["name"] == "echo" && l["decision"] == "allowed")
    };
    let audited = eventually(5, || async { decided(&mesh.server) }).await;
    assert!(audited, "{}", mesh.server.logs());

    // The credential is injected on the server's side, once; the agent's sidecar never
    // held it.
    let (_, headers) = mesh.call("request_headers", "").await?;
    let headers: serde_json::Value = serde_json::from_str(&headers.context("headers")?)?;
    assert_eq!(headers["x-api-key"], DEMO_KEY, "{headers}");
    let config = reqwest::get(mesh.agent.admin_url("/config"))
        .await?
        .text()
        .await?;
    assert!(
        config.contains("\"mesh\"") && !config.contains("demo-key"),
        "{config}"
    );
    let config = reqwest::get(mesh.server.admin_url("/config"))
        .await?
        .text()
        .await?;
    assert!(
        config.contains("demo-key/key") && !config.contains(DEMO_KEY),
        "{config}"
    );

    // The fleet view shows both sidecars' certificates, and how long they have left.
    let (ok, status, err) = mesh.cp.ctl(&["status"], None).await?;
    assert!(ok, "{err}");
    for identity in [IDENTITY, SERVER_IDENTITY] {
        let line = status
            .lines()
            .find(|l| l.starts_with(identity))
            .with_context(|| format!("{identity} not in\n{status}"))?;
        assert!(line.contains("11h5") || line.contains("12h00m"), "{status}");
    }

    // "The agent" skipping its sidecar: plain HTTP to the server-side port gets no MCP
    // answer at all.
    let plain = post(
        &format!("http://{}/mcp/demo", mesh.server.mcp),
        &borrow(&modern_headers("add")),
        modern_call(1, "add", json!({"a": 1, "b": 2})),
    )
    .await;
    assert!(
        plain.is_err() || plain.as_ref().is_ok_and(|r| r.status != 200),
        "{plain:?}"
    );

    // TLS without a client certificate: the handshake is refused.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let anonymous = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider.clone())))
        .with_no_client_auth();
    let refused = post_tls(anonymous, mesh.server.mcp, "/mcp/demo", "add").await;
    assert!(refused.is_err(), "{refused:?}");

    // A valid workload certificate for an identity no policy names: the TLS handshake
    // succeeds (it is a workload of the mesh) and the second decision refuses it.
    let other = certificate(&mesh.cp, OTHER_TOKEN, "other/agent").await?;
    let (status, body) = post_tls(
        other
            .client_config(SERVER_IDENTITY)
            .map_err(|e| anyhow!(e))?,
        mesh.server.mcp,
        "/mcp/demo",
        "add",
    )
    .await?;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("-32081"), "{body}");
    // The control plane signs only the identity the token stands for.
    let asked_for_more = certificate(&mesh.cp, OTHER_TOKEN, IDENTITY).await;
    assert!(
        asked_for_more.is_err(),
        "a token for other/agent got a stream as {IDENTITY}"
    );

    // The agent sidecar checks the server too: an McpServer that expects another
    // identity at the same port is refused at the handshake, and nothing runs.
    let before = mesh.ran("echo");
    let impostor = post(
        &mesh.agent.url("impostor"),
        &borrow(&modern_headers("echo")),
        modern_call(1, "echo", json!({"text": "x"})),
    )
    .await?;
    assert_eq!(impostor.status, 502, "{}", impostor.text);
    assert!(
        impostor.text.contains("tools/impostor"),
        "{}",
        impostor.text
    );
    assert_eq!(mesh.ran("echo"), before);

    // From the upstream's side: `add` was only ever attempted around the agent's
    // sidecar, and never ran.
    assert_eq!(mesh.ran("add"), 0, "{}", mesh.demo.proc.output.text());
    assert!(mesh.ran("echo") >= 2);
    let metrics = reqwest::get(mesh.server.admin_url("/metrics"))
        .await?
        .text()
        .await?;
    assert!(
        metrics.lines().any(|l| l
            .starts_with("toolmesh_mesh_connections_refused_total{reason=\"handshake\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn workload_certificates_rotate_under_load_without_a_failed_call() -> Result<()> {
    // Four-second certificates: renewed every two seconds on both sides.
    let mesh = Arc::new(Mesh::start(&["--workload-cert-ttl", "4s"]).await?);
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..4 {
        let mesh = mesh.clone();
        workers.spawn(async move {
            let mut calls = 0u32;
            while tokio::time::Instant::now() < until {
                let text = format!("w{worker}-{calls}");
                let got = mesh.call("echo", &text).await?;
                if got != (200, Some(text.clone())) {
                    bail!("call {text} failed: {got:?}");
                }
                calls += 1;
            }
            Ok(calls)
        });
    }
    let mut total = 0;
    while let Some(done) = workers.join_next().await {
        total += done??;
    }
    assert!(total > 100, "only {total} calls");
    for sidecar in [&mesh.agent, &mesh.server] {
        let metrics = reqwest::get(sidecar.admin_url("/metrics"))
            .await?
            .text()
            .await?;
        let renewals: f64 = metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix("toolmesh_workload_certificate_renewals_total{result=\"issued\"} ")
            })
            .context("no renewals metric")?
            .parse()?;
        // Renewed at half-life: every 2 s, five times during the load alone.
        assert!(
            renewals >= 3.0,
            "{renewals} certificates in 10 s of 4 s ones"
        );
    }
    // A new connection after all those rotations is accepted: the current
    // certificate, not the first, is what is presented and checked.
    let late = certificate(&mesh.cp, SIDECAR_TOKEN, IDENTITY).await?;
    let (status, body) = post_tls(
        late.client_config(SERVER_IDENTITY)
            .map_err(|e| anyhow!(e))?,
        mesh.server.mcp,
        "/mcp/demo",
        "echo",
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    Ok(())
}

/// `server-everything` (stdio) behind a server-side sidecar's `--stdio`, reached from
/// an agent sidecar: the process tree, and the child's pid.
struct StdioMesh {
    _cp: ControlPlane,
    server: Sidecar,
    agent: Sidecar,
    _dir: TempDir,
}

impl StdioMesh {
    async fn start() -> Result<StdioMesh> {
        let dir = TempDir::new("mesh-stdio")?;
        let cp = ControlPlane::start_with(&dir.0.join("cp"), NOTHING, &[]).await?;
        let node = toolmesh_tests::node22()?;
        let everything = toolmesh_tests::js_dir()
            .join("node_modules/@modelcontextprotocol/server-everything/dist/index.js");
        let (node, everything) = (node.to_string_lossy(), everything.to_string_lossy());
        let server =
            server_side(&cp.url(), &["--stdio", "--", &node, &everything, "stdio"]).await?;
        let resources = format!(
            "apiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {{name: everything}}\nspec:\n  endpoints: [{{url: \"https://{}/mcp/everything\"}}]\n  mesh: {{identity: {SERVER_IDENTITY}}}\n---\napiVersion: toolmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: agents}}\nspec:\n  subjects: [{{identity: \"{IDENTITY}\"}}]\n  rules:\n    - {{server: everything, tools: [\"*\"], resources: [\"*\"], prompts: [\"*\"]}}\n    - {{server: everything, tools: [\"get-env\"], action: deny}}\n",
            server.mcp
        );
        apply(&cp, &resources).await?;
        let agent = Sidecar::connect(&cp.url(), SIDECAR_TOKEN, &[]).await?;
        let mesh = StdioMesh {
            _cp: cp,
            server,
            agent,
            _dir: dir,
        };
        let ready = eventually(30, || async {
            mesh.echo("ready?").await.is_ok_and(|t| t.is_some())
        })
        .await;
        if !ready {
            bail!(
                "never reached the stdio server\nserver:\n{}\nagent:\n{}",
                mesh.server.logs(),
                mesh.agent.logs()
            );
        }
        Ok(mesh)
    }

    /// A 2026-07-28 `tools/call` of `echo` through both sidecars: the result's text.
    async fn echo(&self, message: &str) -> Result<Option<String>> {
        let reply = post(
            &self.agent.url("everything"),
            &borrow(&modern_headers("echo")),
            modern_call(3, "echo", json!({"message": message})),
        )
        .await?;
        Ok(reply.message()["result"]["content"][0]["text"]
            .as_str()
            .map(str::to_owned))
    }

    /// The pid of the server-side sidecar's child (the stdio server).
    fn child(&self) -> Result<u32> {
        let parent = self.server.proc.pid().context("sidecar pid")?;
        let mut all = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{parent}/task"))? {
            let path = task?.path().join("children");
            all.extend(
                std::fs::read_to_string(path)
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
        all.into_iter()
            .next()
            .context("the stdio server is not running")
    }
}

#[tokio::test]
async fn a_stdio_server_serves_both_sdks_and_both_generations_through_both_sidecars() -> Result<()>
{
    let mesh = StdioMesh::start().await?;
    let url = mesh.agent.url("everything");
    let plan = json!({
        "echo": ["echo", {"message": "through two sidecars"}],
        "sum": ["get-sum", {"a": 2, "b": 40}],
        "progress": ["trigger-long-running-operation", {"duration": 1, "steps": 3}],
    });
    for kind in ["typescript", "python", "python-modern"] {
        let report = crate::peers::run_client(kind, &url, &plan).await?;
        assert_eq!(
            report["steps"]["echo"]["text"], "Echo: through two sidecars",
            "{kind}: {report}"
        );
        assert!(
            report["steps"]["sum"]["text"]
                .as_str()
                .is_some_and(|t| t.contains("42")),
            "{kind}: {report}"
        );
        let tools = report["tools"].as_array().context("tools")?;
        assert!(tools.len() > 5, "{kind}: {report}");
        // Lists are filtered on the way: the denied tool is not offered.
        assert!(!tools.iter().any(|t| t == "get-env"), "{kind}: {report}");
        if kind == "python-modern" {
            assert_eq!(report["version"], "2026-07-28", "{report}");
        }
    }
    // 2026-07-28, stateless: discover, then a call.
    let discover = post(
        &url,
        &[
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "server/discover"),
        ],
        json!({"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"}}}})
        .to_string(),
    )
    .await?;
    assert_eq!(discover.status, 200, "{}", discover.text);
    assert!(
        discover.message()["result"].is_object(),
        "{}",
        discover.text
    );
    assert_eq!(
        mesh.echo("stateless").await?.as_deref(),
        Some("Echo: stateless")
    );
    // The denied tool is refused on the way, whatever the generation.
    let denied = post(
        &url,
        &borrow(&modern_headers("get-env")),
        modern_call(4, "get-env", json!({})),
    )
    .await?;
    assert_eq!(denied.error_code(), Some(-32088), "{}", denied.text);

    // The child crashing is survived: the next calls work once it is restarted.
    let child = mesh.child()?;
    let killed = tokio::process::Command::new("kill")
        .args(["-9", &child.to_string()])
        .status()
        .await?;
    assert!(killed.success());
    let back = eventually(30, || async {
        mesh.echo("after the crash").await.ok().flatten().as_deref()
            == Some("Echo: after the crash")
    })
    .await;
    assert!(back, "{}", mesh.server.logs());
    assert_ne!(mesh.child()?, child, "a new process serves");
    let report = crate::peers::run_client("typescript", &url, &plan).await?;
    assert_eq!(
        report["steps"]["echo"]["text"],
        "Echo: through two sidecars"
    );
    Ok(())
}

#[tokio::test]
async fn a_server_listening_beyond_loopback_keeps_its_sidecar_unready() -> Result<()> {
    // Many servers listen on every address by default; on the pod's IP they answer
    // agents directly, around the server-side sidecar. 127.0.0.2 stands in for the
    // pod's IP: a server on 0.0.0.0 answers there, one on 127.0.0.1 does not.
    let dir = TempDir::new("mesh-exposed")?;
    let resources = format!(
        "apiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {{name: demo}}\nspec:\n  endpoints: [{{url: \"https://127.0.0.1:1/mcp/demo\"}}]\n  mesh: {{identity: {SERVER_IDENTITY}}}\n"
    );
    let cp = ControlPlane::start_with(&dir.0.join("cp"), &resources, &[]).await?;
    let mut cmd = tokio::process::Command::new(toolmesh_tests::binary("toolmesh-demo-server"));
    cmd.args(["--listen", "0.0.0.0:0"]);
    let mut everywhere = toolmesh_tests::Proc::spawn("toolmesh-demo-server", cmd)?;
    let port = everywhere
        .wait_for("its listening line", toolmesh_tests::listening_on)
        .await?
        .port();
    let loopback_only = DemoServer::start(&[]).await?;
    let pod_ip = ["--pod-ip", "127.0.0.2", "--upstream"];
    let exposed = format!("http://127.0.0.1:{port}/mcp");
    let exposed = server_side(&cp.url(), &[&pod_ip[..], &[exposed.as_str()]].concat()).await?;
    let contained = loopback_only.url();
    let contained = server_side(&cp.url(), &[&pod_ip[..], &[contained.as_str()]].concat()).await?;
    let ready = |sidecar: &Sidecar| {
        let url = sidecar.admin_url("/ready");
        async move {
            let r = reqwest::get(&url).await?;
            Ok::<_, anyhow::Error>((r.status().as_u16(), r.text().await?))
        }
    };
    let settled = eventually(20, || async {
        ready(&contained).await.is_ok_and(|(s, _)| s == 200)
    })
    .await;
    assert!(settled, "{}", contained.logs());
    let (status, why) = ready(&exposed).await?;
    assert_eq!(status, 503, "{why}");
    assert!(why.contains(&format!("127.0.0.2:{port}")), "{why}");
    let metrics = reqwest::get(exposed.admin_url("/metrics"))
        .await?
        .text()
        .await?;
    assert!(
        metrics
            .lines()
            .any(|l| l == "toolmesh_mesh_upstream_exposed 1"),
        "{metrics}"
    );
    assert!(exposed.logs().contains("also listens on the pod's IP"));
    Ok(())
}
