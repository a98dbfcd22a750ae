//! The control plane in cluster mode, end to end: the real control plane binary
//! (`--store kubernetes --sidecar-auth kubernetes --tls-secret`) against the stand-in
//! API server of `toolmesh_tests::kube_api` (no real API server can run here), real
//! sidecars presenting "service-account tokens" over TLS from the self-managed CA, and
//! the rmcp demo server behind them.

use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine as _;
use serde_json::{Value, json};
use toolmesh_tests::kube_api::FakeApiServer;
use toolmesh_tests::{DemoServer, Proc, Sidecar, TempDir, binary};

use crate::support::{admin, call_demo, eventually};

const NS: &str = "toolmesh-system";

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn server(url: &str) -> Value {
    json!({
        "apiVersion": "toolmesh.dev/v1alpha1", "kind": "McpServer",
        "metadata": {"name": "demo", "namespace": NS},
        "spec": {"endpoints": [{"url": url}], "credential": {"header": "X-Api-Key", "secretRef": {"name": "demo-key", "key": "key"}},
            // Pins being rolled out: nothing hidden, what sidecars see is reported.
            "pins": {"mode": "warn", "unpinned": "allow"}},
    })
}

fn policy(tools: &[&str]) -> Value {
    json!({
        "apiVersion": "toolmesh.dev/v1alpha1", "kind": "AccessPolicy",
        "metadata": {"name": "triage", "namespace": NS},
        "spec": {"subjects": [{"identity": "agents/triage"}], "rules": [{"server": "demo", "tools": tools}]},
    })
}

fn webhook_configuration() -> Value {
    let hook = |name: &str| {
        json!({"name": name, "admissionReviewVersions": ["v1"], "sideEffects": "None",
               "clientConfig": {"service": {"name": "toolmesh-control-plane", "namespace": NS, "path": "/inject", "port": 443}}})
    };
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "toolmesh-sidecar-injector", "resourceVersion": "1"},
        "webhooks": [hook("namespace.inject.toolmesh.dev"), hook("pod.inject.toolmesh.dev")],
    })
}

async fn ready(sidecar: &Sidecar, secs: u64) -> bool {
    eventually(secs, || async {
        admin(sidecar, "/ready").await.map(|r| r.0).ok() == Some(200)
    })
    .await
}

#[tokio::test]
async fn service_account_tokens_crd_resources_lease_status_and_the_self_managed_ca() -> Result<()> {
    let demo = DemoServer::start(&[]).await?;
    let api = FakeApiServer::start(NS).await?;
    api.apply("mcpservers", server(&demo.url()));
    api.apply("accesspolicies", policy(&["echo"]));
    api.apply(
        "secrets",
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "demo-key", "namespace": NS}, "data": {"key": b64("demo-secret-value-1")}}),
    );
    api.set_webhook(webhook_configuration());
    api.token(
        "triage-token",
        "system:serviceaccount:agents:triage",
        &["toolmesh"],
    );
    api.token(
        "coder-token",
        "system:serviceaccount:agents:coder",
        &["toolmesh"],
    );
    api.token(
        "api-audience-token",
        "system:serviceaccount:agents:triage",
        &["https://kubernetes.default.svc"],
    );

    let dir = TempDir::new("cp-kube")?;
    let kubeconfig = dir.0.join("kubeconfig");
    api.kubeconfig(&kubeconfig)?;
    let tokens = dir.0.join("tokens.yaml");
    std::fs::write(&tokens, "admin: \"test-admin-token-0123456789\"\n")?;
    let mut cmd = tokio::process::Command::new(binary("toolmesh-control-plane"));
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ])
    .args(["--store", "kubernetes", "--sidecar-auth", "kubernetes"])
    .args(["--tls-secret", "toolmesh-tls", "--tls-names", "localhost"])
    .args(["--pod-name", "cp-0"])
    .arg("--data-dir")
    .arg(dir.0.join("unused"))
    .arg("--tokens")
    .arg(&tokens)
    .env("KUBECONFIG", &kubeconfig)
    .env_remove("KUBERNETES_SERVICE_HOST");
    let mut cp = Proc::spawn("toolmesh-control-plane", cmd)?;
    let port: u16 = cp
        .wait_for("its listening line", |line| {
            let v: Value = serde_json::from_str(line).ok()?;
            (v["message"] == "listening")
                .then(|| v["grpc"].as_str()?.rsplit(':').next()?.parse().ok())?
        })
        .await?;
    let url = format!("https://localhost:{port}");

    // The self-managed CA: created in the API, served by the control plane.
    let secret = api
        .get("secrets", "toolmesh-tls")
        .context("TLS Secret created")?;
    assert_eq!(secret["type"], "kubernetes.io/tls");
    let ca = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(secret["data"]["ca.crt"].as_str().context("ca.crt")?)?,
    )?;
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));

    // A sidecar with its pod's token, trusting the CA as the webhook tells it to.
    let triage = Sidecar::connect_as(
        TempDir::new("sidecar-triage")?,
        &url,
        "triage-token",
        "agents/triage",
        &["--ca-pem", &ca],
    )
    .await?;
    assert!(
        ready(&triage, 15).await,
        "{}\n{}",
        triage.logs(),
        cp.output.text()
    );
    assert_eq!(call_demo(&triage, "echo").await?, (200, None));
    assert_eq!(
        call_demo(&triage, "add").await?,
        (200, Some(-32088)),
        "not allowed yet"
    );

    // kubectl apply of a new policy generation reaches the sidecar through the watch.
    api.apply("accesspolicies", policy(&["echo", "add"]));
    assert!(
        eventually(5, || async {
            call_demo(&triage, "add").await.ok() == Some((200, None))
        })
        .await,
        "{}",
        cp.output.text()
    );

    // A valid token for agents/triage cannot fetch agents/coder's snapshot.
    let impostor = Sidecar::connect_as(
        TempDir::new("sidecar-impostor")?,
        &url,
        "triage-token",
        "agents/coder",
        &["--ca-pem", &ca],
    )
    .await?;
    // A token minted for another audience (the API server's) is refused.
    let wrong_audience = Sidecar::connect_as(
        TempDir::new("sidecar-audience")?,
        &url,
        "api-audience-token",
        "agents/triage",
        &["--ca-pem", &ca],
    )
    .await?;
    // coder's own token works, and its snapshot holds nothing of triage's.
    let coder = Sidecar::connect_as(
        TempDir::new("sidecar-coder")?,
        &url,
        "coder-token",
        "agents/coder",
        &["--ca-pem", &ca],
    )
    .await?;
    assert!(ready(&coder, 15).await, "{}", coder.logs());
    let (status, code) = call_demo(&coder, "echo").await?;
    assert!(
        status != 200 || code.is_some(),
        "coder reached demo: {status} {code:?}"
    );
    assert!(!ready(&impostor, 2).await, "{}", impostor.logs());
    assert!(
        !ready(&wrong_audience, 1).await,
        "{}",
        wrong_audience.logs()
    );
    assert!(
        impostor
            .logs()
            .contains(r#"this token is for identity \"agents/triage\", not \"agents/coder\""#),
        "{}",
        impostor.logs()
    );
    assert!(
        wrong_audience.logs().contains("audience"),
        "{}",
        wrong_audience.logs()
    );

    // What the control plane asked of the API server.
    let reviews: Vec<Value> = api
        .requests()
        .into_iter()
        .filter(|r| r.path == "/apis/authentication.k8s.io/v1/tokenreviews")
        .map(|r| r.body)
        .collect();
    assert!(!reviews.is_empty());
    assert!(
        reviews
            .iter()
            .all(|r| r["spec"]["audiences"] == json!(["toolmesh"])),
        "{reviews:#?}"
    );
    let reviewed_triage = reviews
        .iter()
        .filter(|r| r["spec"]["token"] == "triage-token")
        .count();
    assert!(
        reviewed_triage <= 2,
        "verdicts are cached: {reviewed_triage} reviews of one token"
    );

    // The Lease holder wrote status and the webhook's caBundle.
    assert!(
        eventually(10, || async {
            api.lease()
                .is_some_and(|l| l["spec"]["holderIdentity"] == "cp-0")
                && api.get("mcpservers", "demo").is_some_and(|s| {
                    s["status"]["conditions"][0]["status"] == "True"
                        && s["status"]["conditions"][0]["reason"] == "Accepted"
                })
                && api.webhook().is_some_and(|w| {
                    w["webhooks"].as_array().is_some_and(|h| {
                        h.iter()
                            .all(|h| h["clientConfig"]["caBundle"] == json!(b64(&ca)))
                    })
                })
        })
        .await,
        "lease {:?}\nserver {:?}\nwebhook {:?}\n{}",
        api.lease(),
        api.get("mcpservers", "demo"),
        api.webhook(),
        cp.output.text()
    );

    // What the sidecar lists is reported, and the server's `Pinned` condition says so.
    let pinned = |s: &Value| s["status"]["conditions"][1].clone();
    assert_eq!(
        api.get("mcpservers", "demo")
            .map(|s| pinned(&s)["reason"].clone()),
        Some(json!("Matching"))
    );
    let h = [
        ("mcp-protocol-version", "2026-07-28".to_owned()),
        ("mcp-method", "tools/list".to_owned()),
    ];
    let list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"}}}});
    crate::support::post(
        &triage.url("demo"),
        &crate::support::borrow(&h),
        list.to_string(),
    )
    .await?;
    assert!(
        eventually(10, || async {
            api.get("mcpservers", "demo").is_some_and(|s| {
                let c = pinned(&s);
                c["type"] == "Pinned"
                    && c["status"] == "False"
                    && c["reason"] == "Drifted"
                    && c["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("tool echo unpinned"))
            })
        })
        .await,
        "{:?}",
        api.get("mcpservers", "demo")
    );

    // Deleting the credential stops the server being served; status says why.
    api.delete("secrets", "demo-key");
    assert!(
        eventually(5, || async {
            api.get("mcpservers", "demo")
                .is_some_and(|s| s["status"]["conditions"][0]["reason"] == "SecretMissing")
        })
        .await,
        "{:?}",
        api.get("mcpservers", "demo")
    );
    assert!(
        eventually(5, || async {
            call_demo(&triage, "echo").await.ok() != Some((200, None))
        })
        .await,
        "still served without its credential"
    );

    // On shutdown the Lease is handed back.
    cp.terminate().await?;
    assert!(
        api.lease()
            .is_some_and(|l| l["spec"]["holderIdentity"].is_null()),
        "{:?}",
        api.lease()
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}
