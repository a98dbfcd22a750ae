//! Gateway mode against a real authorization server (`oauth2-mock-server`, started by
//! the tests) and the rmcp demo server: tokens by client credentials, by the
//! authorization-code flow with PKCE (the TypeScript SDK client's own OAuth support,
//! discovering the issuer from our 401 and metadata), and minted in every hostile
//! shape (those are the bad-input corpus's, `hostile.rs`). Refusals are checked from
//! the upstream's side too: the demo server logs every call it runs (`call <tool>`).

use anyhow::{Context, Result};
use serde_json::{Value, json};
use toolmesh_tests::{
    Authz, ControlPlane, DemoServer, IDENTITY, OTHER_TOKEN, SIDECAR_TOKEN, Sidecar, TempDir,
    TestPki,
};

use crate::support::{Reply, audit_lines, borrow, eventually, modern_call, modern_headers, post};

/// The demo server (with an upstream credential of its own) and who may use it.
fn config(demo: &DemoServer, issuer: &str) -> String {
    format!(
        r#"apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {{name: demo}}
spec:
  endpoints: [{{url: "{demo}"}}]
  credential: {{header: Authorization, secretRef: {{name: demo-key, key: token}}, prefix: "Bearer "}}
---
apiVersion: toolmesh.dev/v1alpha1
kind: Secret
metadata: {{name: demo-key}}
data: {{token: "upstream-secret"}}
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: alice}}
spec:
  subjects: [{{user: alice, issuer: "{issuer}"}}]
  rules:
    - server: demo
      tools: ["echo", "add", "request_headers"]
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: limited}}
spec:
  subjects: [{{user: "limited-*"}}]
  rules:
    - server: demo
      tools: ["echo"]
      rateLimit: {{requests: 2, per: 1m}}
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: ide-clients}}
spec:
  subjects:
    - {{clientId: ide, scopes: [tools.echo]}}
    - {{user: johndoe, claims: {{amr: pwd}}}}
    - {{issuer: "{issuer}", identity: "ci/*"}}
  rules:
    - server: demo
      tools: ["echo"]
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: workloads}}
spec:
  subjects: [{{identity: "*"}}]
  rules:
    - server: demo
      tools: ["*"]
"#,
        demo = demo.url()
    )
}

/// An authorization server, the demo server, and a gateway in front of it trusting
/// that issuer, requiring the scope `mcp` (also the bad-input corpus's, `hostile.rs`).
pub struct Stack {
    pub authz: Authz,
    pub demo: DemoServer,
    pub gateway: Sidecar,
    /// The gateway's origin (its `--resource`).
    pub origin: String,
}

impl Stack {
    pub async fn start() -> Result<Stack> {
        Self::start_with(&[]).await
    }

    /// [`Stack::start`] with `extra` gateway flags.
    pub async fn start_with(extra: &[&str]) -> Result<Stack> {
        let authz = Authz::start().await?;
        let demo = DemoServer::start(&[]).await?;
        let mut flags = vec!["--required-scope", "mcp"];
        flags.extend_from_slice(extra);
        let gateway =
            Sidecar::start_gateway(&config(&demo, &authz.issuer), &authz.issuer, &flags).await?;
        let origin = format!("http://{}", gateway.mcp);
        // Ready: the snapshot is loaded.
        let ready = eventually(10, || async {
            reqwest::get(gateway.admin_url("/ready"))
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        anyhow::ensure!(ready, "gateway not ready:\n{}", gateway.logs());
        Ok(Stack {
            authz,
            demo,
            gateway,
            origin,
        })
    }

    /// A token for `sub` naming this gateway, with the required scope.
    pub async fn token(&self, sub: &str) -> Result<String> {
        self.authz
            .mint(json!({"sub": sub, "aud": self.origin, "scope": "mcp"}))
            .await
    }

    /// A 2026-07-28 `tools/call` of the demo server's `tool` with `token`.
    async fn call(&self, token: Option<&str>, tool: &str, arguments: Value) -> Result<Reply> {
        let mut headers = modern_headers(tool);
        if let Some(token) = token {
            headers.push(("authorization", format!("Bearer {token}")));
        }
        post(
            &self.gateway.url("demo"),
            &borrow(&headers),
            modern_call(1, tool, arguments),
        )
        .await
    }

    /// A token from the issuer's token endpoint for the client `ide` (client
    /// credentials, HTTP Basic), for the demo server's path (RFC 8707 `resource`).
    async fn client_credentials(&self, scope: &str) -> Result<String> {
        let form: String = [
            ("grant_type", "client_credentials"),
            ("scope", scope),
            ("resource", &self.gateway.url("demo")),
        ]
        .iter()
        .map(|(k, v)| format!("{k}={}", form_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
        let issued: Value = reqwest::Client::new()
            .post(format!("{}/token", self.authz.issuer))
            .basic_auth("ide", Some("secret"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await?
            .json()
            .await?;
        issued["access_token"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no access_token in {issued}"))
    }

    /// How many times the demo server ran `tool`.
    pub fn ran(&self, tool: &str) -> usize {
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

/// `application/x-www-form-urlencoded` text for one value.
fn form_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            b' ' => "+".to_owned(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

fn challenge(reply: &Reply) -> String {
    reply
        .headers
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_request_without_a_token_learns_where_to_get_one() -> Result<()> {
    let s = Stack::start().await?;
    let reply = s.call(None, "echo", json!({"text": "x"})).await?;
    assert_eq!(reply.status, 401, "{}", reply.text);
    let header = challenge(&reply);
    let metadata = format!("{}/.well-known/oauth-protected-resource/mcp/demo", s.origin);
    assert_eq!(
        header,
        format!("Bearer scope=\"mcp\", resource_metadata=\"{metadata}\"")
    );
    let doc: Value = reqwest::get(&metadata).await?.json().await?;
    assert_eq!(doc["resource"], format!("{}/mcp/demo", s.origin));
    assert_eq!(doc["authorization_servers"], json!([s.authz.issuer]));
    assert_eq!(doc["scopes_supported"], json!(["mcp"]));
    assert_eq!(doc["bearer_methods_supported"], json!(["header"]));
    let root: Value = reqwest::get(format!("{}/.well-known/oauth-protected-resource", s.origin))
        .await?
        .json()
        .await?;
    assert_eq!(root["resource"], s.origin);
    let elsewhere = reqwest::get(format!(
        "{}/.well-known/oauth-protected-resource/admin",
        s.origin
    ))
    .await?;
    assert_eq!(elsewhere.status(), 404);
    // A token without the required scope: 403 insufficient_scope.
    let unscoped = s
        .authz
        .mint(json!({"sub": "alice", "aud": s.origin, "scope": "other"}))
        .await?;
    let reply = s
        .call(Some(&unscoped), "echo", json!({"text": "x"}))
        .await?;
    assert_eq!(reply.status, 403, "{}", reply.text);
    assert!(challenge(&reply).starts_with("Bearer error=\"insufficient_scope\", scope=\"mcp\""));
    assert_eq!(s.ran("echo"), 0, "nothing ran for a refused token");
    Ok(())
}

#[tokio::test]
async fn each_user_is_decided_for_and_audited_as_themselves() -> Result<()> {
    let s = Stack::start().await?;
    let alice = s.token("alice").await?;
    let bob = s.token("bob").await?;
    let reply = s.call(Some(&alice), "add", json!({"a": 1, "b": 2})).await?;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert!(reply.text.contains('3'), "{}", reply.text);
    // Bob has no policy: the server is not there for him.
    let reply = s.call(Some(&bob), "add", json!({"a": 1, "b": 2})).await?;
    assert_eq!(reply.status, 404, "{}", reply.text);
    // A user named like a workload is not one: identity subjects never match tokens.
    let agent = s.token("agents/test").await?;
    let reply = s.call(Some(&agent), "add", json!({"a": 1, "b": 2})).await?;
    assert_eq!(reply.status, 404, "{}", reply.text);
    // Alice may not call what her policy does not name.
    let reply = s.call(Some(&alice), "sleep", json!({"ms": 1})).await?;
    assert_eq!(reply.error_code(), Some(-32088), "{}", reply.text);
    assert_eq!(s.ran("add"), 1, "only alice's call ran");
    assert_eq!(s.ran("sleep"), 0);

    // The aggregate shows each user their own tools.
    let list = |token: String| {
        let url = format!("{}/mcp", s.origin);
        async move {
            let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientCapabilities": {},
                "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"}}}});
            let headers = [
                ("mcp-protocol-version", "2026-07-28".to_owned()),
                ("mcp-method", "tools/list".to_owned()),
                ("authorization", format!("Bearer {token}")),
            ];
            let reply = post(&url, &borrow(&headers), body.to_string()).await?;
            let names: Vec<String> = reply.message()["result"]["tools"]
                .as_array()
                .context("tools")?
                .iter()
                .filter_map(|t| t["name"].as_str().map(str::to_owned))
                .collect();
            anyhow::Ok(names)
        }
    };
    let mut alices = list(alice.clone()).await?;
    alices.sort();
    assert_eq!(alices, ["demo__add", "demo__echo", "demo__request_headers"]);
    assert!(list(bob.clone()).await?.is_empty());

    let alices_line = || {
        audit_lines(&s.gateway)
            .into_iter()
            .find(|l| l["name"] == "add" && l["decision"] == "allowed")
    };
    eventually(5, || async { alices_line().is_some() }).await;
    let add = alices_line().context("alice's audit line")?;
    assert_eq!(add["user"], "alice");
    assert_eq!(add["issuer"], s.authz.issuer.as_str());
    assert_eq!(add["subject"], format!("{}#alice", s.authz.issuer));
    let logs = s.gateway.logs();
    for token in [&alice, &bob] {
        assert!(!logs.contains(token.as_str()), "a token reached the logs");
    }
    Ok(())
}

#[tokio::test]
async fn sessions_and_rate_limits_belong_to_one_user() -> Result<()> {
    let s = Stack::start().await?;
    // Rate limits: each user has their own bucket of two.
    let one = s.token("limited-one").await?;
    let two = s.token("limited-two").await?;
    for _ in 0..2 {
        let reply = s.call(Some(&one), "echo", json!({"text": "x"})).await?;
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    let reply = s.call(Some(&one), "echo", json!({"text": "x"})).await?;
    assert_eq!(reply.status, 429, "{}", reply.text);
    let reply = s.call(Some(&two), "echo", json!({"text": "x"})).await?;
    assert_eq!(
        reply.status, 200,
        "another user's budget is their own: {}",
        reply.text
    );
    assert_eq!(s.ran("echo"), 3);

    // Sessions: alice's session id is nobody else's.
    let alice = s.token("alice").await?;
    let johndoe = s
        .authz
        .mint(
            json!({"sub": "johndoe", "aud": s.origin, "scope": "mcp", "claims": {"amr": ["pwd"]}}),
        )
        .await?;
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"}}});
    let bearer = |t: &str| format!("Bearer {t}");
    let reply = post(
        &s.gateway.url("demo"),
        &[("authorization", &bearer(&alice))],
        init.to_string(),
    )
    .await?;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let session = reply
        .headers
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .context("session id")?
        .to_owned();
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "in alice's session"}}});
    let headers = |t: &str| {
        vec![
            ("authorization", bearer(t)),
            ("mcp-session-id", session.clone()),
            ("mcp-protocol-version", "2025-11-25".to_owned()),
        ]
    };
    let reply = post(
        &s.gateway.url("demo"),
        &borrow(&headers(&johndoe)),
        call.to_string(),
    )
    .await?;
    assert_eq!(reply.status, 404, "another user's session: {}", reply.text);
    assert_eq!(s.ran("echo"), 3, "nothing ran in a borrowed session");
    let reply = post(
        &s.gateway.url("demo"),
        &borrow(&headers(&alice)),
        call.to_string(),
    )
    .await?;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(s.ran("echo"), 4);
    Ok(())
}

#[tokio::test]
async fn the_users_token_never_reaches_the_upstream() -> Result<()> {
    let s = Stack::start().await?;
    let alice = s.token("alice").await?;
    let reply = s.call(Some(&alice), "request_headers", json!({})).await?;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let text = reply.message()["result"]["content"][0]["text"]
        .as_str()
        .context("headers text")?
        .to_owned();
    let seen: Value = serde_json::from_str(&text)?;
    assert_eq!(seen["authorization"], "Bearer upstream-secret", "{seen}");
    assert!(
        !text.contains(&alice),
        "the user's token reached the upstream"
    );
    Ok(())
}

#[tokio::test]
async fn client_credentials_and_rotated_keys_work_without_a_restart() -> Result<()> {
    let s = Stack::start().await?;
    // A token from the token endpoint, for the client `ide`, audience by RFC 8707.
    let token = s.client_credentials("mcp tools.echo").await?;
    let reply = s
        .call(Some(&token), "echo", json!({"text": "from ide"}))
        .await?;
    assert_eq!(reply.status, 200, "{}", reply.text);
    // The same client without the policy's scope matches no policy.
    let narrow = s.client_credentials("mcp").await?;
    let reply = s.call(Some(&narrow), "echo", json!({"text": "x"})).await?;
    assert_eq!(reply.status, 404, "{}", reply.text);
    // A token for another path of this gateway is not one for this path.
    let elsewhere = s
        .authz
        .mint(json!({"sub": "alice", "aud": format!("{}/mcp/other", s.origin), "scope": "mcp"}))
        .await?;
    let reply = s
        .call(Some(&elsewhere), "echo", json!({"text": "x"}))
        .await?;
    assert_eq!(reply.status, 401, "{}", reply.text);

    // The issuer rotates its key: a token signed with the new one gets through once
    // the gateway has fetched the keys again, without a restart.
    s.authz.rotate().await?;
    let rotated = s.token("alice").await?;
    let accepted = eventually(20, || async {
        s.call(Some(&rotated), "echo", json!({"text": "rotated"}))
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    assert!(
        accepted,
        "rotated key never accepted:\n{}",
        s.gateway.logs()
    );
    Ok(())
}

#[tokio::test]
async fn the_typescript_sdk_client_finds_the_issuer_and_gets_through() -> Result<()> {
    let s = Stack::start().await?;
    let node = toolmesh_tests::node22()?;
    let out = tokio::process::Command::new(node)
        .arg(toolmesh_tests::js_dir().join("oauth_client.mjs"))
        .arg(s.gateway.url("demo"))
        .kill_on_drop(true)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "client failed:\n{stdout}\n{stderr}\n{}",
        s.gateway.logs()
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .with_context(|| format!("report in {stdout}"))?;
    // It met our 401, found the issuer through the metadata, ran the
    // authorization-code flow with PKCE, and came back with a token.
    assert_eq!(report["unauthorizedFirst"], true, "{report}");
    assert_eq!(report["issuer"], s.authz.issuer.as_str(), "{report}");
    assert_eq!(report["tools"], json!(["echo"]), "{report}");
    assert_eq!(report["echo"], "through the gateway", "{report}");
    assert_eq!(s.ran("echo"), 1);
    let johndoes = || {
        audit_lines(&s.gateway)
            .iter()
            .any(|l| l["user"] == "johndoe" && l["name"] == "echo" && l["decision"] == "allowed")
    };
    assert!(
        eventually(5, || async { johndoes() }).await,
        "no audit line for johndoe's call"
    );
    Ok(())
}

#[tokio::test]
async fn a_service_account_token_is_matched_as_namespace_and_name() -> Result<()> {
    let authz = Authz::start().await?;
    let demo = DemoServer::start(&[]).await?;
    let gateway = Sidecar::start_gateway(
        &config(&demo, &authz.issuer),
        &authz.issuer,
        &["--kubernetes-issuer", &authz.issuer],
    )
    .await?;
    let origin = format!("http://{}", gateway.mcp);
    let call = |sub: &'static str| {
        let (authz, url, origin) = (&authz, gateway.url("demo"), origin.clone());
        async move {
            let token = authz.mint(json!({"sub": sub, "aud": origin})).await?;
            let mut headers = modern_headers("echo");
            headers.push(("authorization", format!("Bearer {token}")));
            post(
                &url,
                &borrow(&headers),
                modern_call(1, "echo", json!({"text": "sa"})),
            )
            .await
        }
    };
    let ok = eventually(10, || async {
        call("system:serviceaccount:ci:deployer")
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    assert!(ok, "ci/deployer refused:\n{}", gateway.logs());
    // Another namespace, and a user who only looks like a service account's ns/sa.
    assert_eq!(
        call("system:serviceaccount:prod:deployer").await?.status,
        404
    );
    assert_eq!(call("ci/deployer").await?.status, 404);
    Ok(())
}

#[tokio::test]
async fn the_gateway_serves_tls_from_certificate_files() -> Result<()> {
    let authz = Authz::start().await?;
    let demo = DemoServer::start(&[]).await?;
    let dir = TempDir::new("gateway-tls")?;
    let pki = TestPki::new(&dir.0)?;
    let (cert, key) = (
        pki.cert.display().to_string(),
        pki.key.display().to_string(),
    );
    let gateway = Sidecar::start_gateway_at(
        "https",
        &config(&demo, &authz.issuer),
        &authz.issuer,
        &["--tls-cert", &cert, "--tls-key", &key],
    )
    .await?;
    let origin = format!("https://{}", gateway.mcp);
    let ca = &pki.ca;
    let curl = |args: Vec<String>| async move {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(ca)
            .args(args)
            .output()
            .await
            .context("running curl")?;
        anyhow::ensure!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        anyhow::Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let doc: Value = serde_json::from_str(
        &curl(vec![format!(
            "{origin}/.well-known/oauth-protected-resource/mcp/demo"
        )])
        .await?,
    )?;
    assert_eq!(doc["resource"], format!("{origin}/mcp/demo"));
    let token = authz.mint(json!({"sub": "alice", "aud": origin})).await?;
    let answer = curl(vec![
        "-H".into(),
        format!("authorization: Bearer {token}"),
        "-H".into(),
        "content-type: application/json".into(),
        "-H".into(),
        "accept: application/json, text/event-stream".into(),
        "-H".into(),
        "mcp-protocol-version: 2026-07-28".into(),
        "-H".into(),
        "mcp-method: tools/call".into(),
        "-H".into(),
        "mcp-name: echo".into(),
        "--data-binary".into(),
        modern_call(1, "echo", json!({"text": "over tls"})),
        format!("{origin}/mcp/demo"),
    ])
    .await?;
    assert!(answer.contains("over tls"), "{answer}");
    // Plain HTTP on the TLS port gets nowhere.
    let plain = reqwest::get(format!(
        "http://{}/.well-known/oauth-protected-resource",
        gateway.mcp
    ))
    .await;
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status() != 200));
    Ok(())
}

#[tokio::test]
async fn a_gateway_gets_its_snapshot_from_the_control_plane_and_only_if_named() -> Result<()> {
    let authz = Authz::start().await?;
    let demo = DemoServer::start(&[]).await?;
    let dir = TempDir::new("cp-gateway")?;
    // The issuer comes from the control plane (--gateway-issuer), not the gateway.
    let cp = ControlPlane::start_with(
        &dir.0,
        &config(&demo, &authz.issuer),
        &[
            "--gateway-identity",
            IDENTITY,
            "--gateway-issuer",
            &authz.issuer,
        ],
    )
    .await?;
    let gateway = Sidecar::connect_gateway(&cp.url(), SIDECAR_TOKEN, IDENTITY, None).await?;
    let origin = format!("http://{}", gateway.mcp);
    let token = authz.mint(json!({"sub": "alice", "aud": origin})).await?;
    let mut headers = modern_headers("add");
    headers.push(("authorization", format!("Bearer {token}")));
    let served = eventually(10, || async {
        post(
            &gateway.url("demo"),
            &borrow(&headers),
            modern_call(1, "add", json!({"a": 2, "b": 3})),
        )
        .await
        .is_ok_and(|r| r.status == 200 && r.text.contains('5'))
    })
    .await;
    assert!(served, "alice not served:\n{}", gateway.logs());
    let metadata: Value = reqwest::get(format!("{origin}/.well-known/oauth-protected-resource"))
        .await?
        .json()
        .await?;
    assert_eq!(metadata["authorization_servers"], json!([authz.issuer]));
    // The snapshot it got is a gateway's: token policies only (the workload policy
    // stays with sidecars), the upstream credential, redacted in /config.
    let config: Value = reqwest::get(gateway.admin_url("/config"))
        .await?
        .json()
        .await?;
    let names: Vec<&str> = config["policies"]
        .as_array()
        .context("policies")?
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["alice", "ide-clients", "limited"], "{config}");
    assert!(!config.to_string().contains("upstream-secret"));
    let (ok, out, _) = cp.ctl(&["status"], None).await?;
    assert!(ok);
    let line = out
        .lines()
        .find(|l| l.starts_with(IDENTITY))
        .context("status line")?;
    assert!(line.contains("gateway"), "{out}");

    // An identity the control plane does not name may not be a gateway.
    let other =
        Sidecar::connect_gateway(&cp.url(), OTHER_TOKEN, "other/agent", Some(&authz.issuer))
            .await?;
    let refused = eventually(10, || async {
        other.logs().contains("may not receive gateway snapshots")
    })
    .await;
    assert!(refused, "{}", other.logs());
    let ready = reqwest::get(other.admin_url("/ready")).await?.status();
    assert_eq!(ready, 503, "a refused gateway has nothing to serve");
    Ok(())
}
