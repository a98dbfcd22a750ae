//! Upstream credentials beyond a static header (`McpServer.spec.oauth`), against a real
//! authorization server (`oauth2-mock-server`, with RFC 8693 token exchange added by
//! `tests/js/authz.mjs`): client-credentials tokens obtained once under load, cached,
//! refreshed before they expire and replaced after a 401; token exchange of the pod's
//! own token, so the upstream sees who acts. The upstream (the rmcp demo server) shows
//! what it was sent; the sidecar's logs and `/config` never hold a token or secret.

use anyhow::{Context, Result};
use base64::Engine as _;
use serde_json::{Value, json};
use toolmesh_tests::{Authz, DemoServer, IDENTITY, Sidecar, TempDir};

use crate::support::{admin, borrow, modern_call, modern_headers, post};

const CLIENT_SECRET: &str = "demo-client-secret-0123456789";
const AUDIENCE: &str = "http://demo.example/mcp";

/// The demo server at `url` with `oauth` (YAML lines under `oauth:`), a Secret for
/// the client secret, and every tool allowed for the test identity.
fn resources(url: &str, oauth: &str) -> String {
    format!(
        r#"apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {{name: demo}}
spec:
  endpoints: [{{url: "{url}"}}]
  oauth:
{oauth}---
apiVersion: toolmesh.dev/v1alpha1
kind: Secret
metadata: {{name: demo-oauth}}
data: {{secret: "{CLIENT_SECRET}"}}
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: agents}}
spec:
  subjects: [{{identity: "{IDENTITY}"}}]
  rules: [{{server: demo, tools: ["*"]}}]
"#
    )
}

/// The bearer token the upstream received with a `request_headers` call through
/// `sidecar`, and its claims.
async fn upstream_token(sidecar: &Sidecar) -> Result<(String, Value)> {
    let r = post(
        &sidecar.url("demo"),
        &borrow(&modern_headers("request_headers")),
        modern_call(1, "request_headers", json!({})),
    )
    .await?;
    let text = r.message()["result"]["content"][0]["text"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("{r:?}"))?;
    let headers: Value = serde_json::from_str(&text)?;
    let token = headers["authorization"]
        .as_str()
        .and_then(|v| v.strip_prefix("Bearer "))
        .with_context(|| format!("no bearer token upstream: {headers}"))?
        .to_owned();
    let payload = token.split('.').nth(1).context("not a JWT")?;
    let claims =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?)?;
    Ok((token, claims))
}

/// Make the demo server refuse `token` from now on.
async fn revoke(server: &DemoServer, token: &str) -> Result<()> {
    reqwest::Client::new()
        .post(format!("http://{}/revoke-token", server.addr))
        .body(token.to_owned())
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}

/// How often the demo server refused a revoked token.
fn refusals(server: &DemoServer) -> usize {
    server
        .proc
        .output
        .text()
        .matches("refused a revoked token")
        .count()
}

async fn hits(authz: &Authz, grant: &str) -> Result<u64> {
    Ok(authz.hits().await?[grant].as_u64().unwrap_or(0))
}

/// Nothing the sidecar shows or logs holds `secret`.
async fn never_shown(sidecar: &Sidecar, secret: &str) -> Result<()> {
    let (_, config) = admin(sidecar, "/config").await?;
    assert!(!config.contains(secret), "/config shows a secret");
    assert!(!sidecar.logs().contains(secret), "the logs hold a secret");
    Ok(())
}

#[tokio::test]
async fn client_credentials_are_fetched_once_refreshed_before_expiry_and_renewed_after_a_401()
-> Result<()> {
    let authz = Authz::start().await?;
    let server = DemoServer::start(&[]).await?;
    let oauth = format!(
        "    grant: client-credentials\n    tokenUrl: \"{}/token\"\n    clientId: toolmesh-demo\n    clientSecretRef: {{name: demo-oauth, key: secret}}\n    scopes: [mcp.read, mcp.call]\n    resource: \"{AUDIENCE}\"\n",
        authz.issuer
    );
    let sidecar = Sidecar::start(&resources(&server.url(), &oauth), &[]).await?;

    // Fifty calls at once: one token request, every call carries its token.
    let calls = (0..50).map(|_| upstream_token(&sidecar));
    let seen = futures::future::try_join_all(calls).await?;
    assert_eq!(hits(&authz, "client_credentials").await?, 1);
    let (token, claims) = seen[0].clone();
    assert!(seen.iter().all(|(t, _)| *t == token), "one token for all");
    assert_eq!(claims["sub"], "toolmesh-demo");
    assert_eq!(claims["aud"], AUDIENCE);
    assert_eq!(claims["scope"], "mcp.read mcp.call");
    never_shown(&sidecar, &token).await?;
    never_shown(&sidecar, CLIENT_SECRET).await?;
    let (_, metrics) = admin(&sidecar, "/metrics").await?;
    assert!(
        metrics.contains(
            r#"toolmesh_upstream_token_requests_total{grant="client_credentials",result="ok"} 1"#
        ),
        "{metrics}"
    );

    // The upstream refuses the token: one refresh, the call sent again, answered.
    revoke(&server, &token).await?;
    let (renewed, _) = upstream_token(&sidecar).await?;
    assert_ne!(renewed, token);
    assert_eq!(hits(&authz, "client_credentials").await?, 2);
    assert_eq!(refusals(&server), 1);

    // Short-lived tokens are refreshed before they expire, not after a refusal.
    authz.set_ttl(4).await?;
    revoke(&server, &renewed).await?;
    let (short, _) = upstream_token(&sidecar).await?;
    assert_eq!(hits(&authz, "client_credentials").await?, 3);
    tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
    let (next, _) = upstream_token(&sidecar).await?;
    assert_ne!(next, short, "refreshed at half its 4 s life");
    assert_eq!(hits(&authz, "client_credentials").await?, 4);
    assert_eq!(refusals(&server), 2, "the refresh came before any refusal");
    Ok(())
}

#[tokio::test]
async fn token_exchange_gives_the_upstream_a_token_naming_the_pod() -> Result<()> {
    let authz = Authz::start().await?;
    let server = DemoServer::start(&[]).await?;
    let dir = TempDir::new("exchange")?;
    let pod = "system:serviceaccount:agents:test";
    let subject = authz
        .mint(json!({"sub": pod, "aud": "toolmesh-exchange", "expiresIn": 600}))
        .await?;
    let file = dir.0.join("subject-token");
    std::fs::write(&file, &subject)?;
    let oauth = format!(
        "    grant: token-exchange\n    tokenUrl: \"{}/token-exchange\"\n    audience: \"{AUDIENCE}\"\n    scopes: [mcp.call]\n",
        authz.issuer
    );
    let file_arg = file.to_string_lossy().into_owned();
    let sidecar = Sidecar::start(
        &resources(&server.url(), &oauth),
        &["--subject-token-file", &file_arg],
    )
    .await?;
    let (token, claims) = upstream_token(&sidecar).await?;
    assert_eq!(claims["sub"], pod, "{claims}");
    assert_eq!(claims["aud"], AUDIENCE);
    assert_eq!(claims["scope"], "mcp.call");
    let (again, _) = upstream_token(&sidecar).await?;
    assert_eq!(again, token, "cached");
    assert_eq!(
        hits(&authz, "urn:ietf:params:oauth:grant-type:token-exchange").await?,
        1
    );
    never_shown(&sidecar, &token).await?;
    never_shown(&sidecar, &subject).await?;
    // The snapshot holds no secret for it at all.
    let (_, config) = admin(&sidecar, "/config").await?;
    assert!(config.contains("\"clientSecret\": \"\""), "{config}");

    // The upstream refuses the token and the authorization server refuses the new
    // subject: the call is answered -32085 naming the token endpoint's error, and
    // nothing ran on the server.
    let foreign = authz
        .mint(json!({"sub": pod, "aud": "toolmesh-exchange", "foreign": true}))
        .await?;
    std::fs::write(&file, &foreign)?;
    revoke(&server, &token).await?;
    let r = post(
        &sidecar.url("demo"),
        &borrow(&modern_headers("echo")),
        modern_call(2, "echo", json!({"text": "x"})),
    )
    .await?;
    assert_eq!((r.status, r.error_code()), (502, Some(-32085)), "{r:?}");
    assert!(
        r.text.contains("no access token") && r.text.contains("invalid_grant"),
        "{r:?}"
    );
    assert_eq!(server.proc.output.text().matches("call echo").count(), 0);
    assert!(
        sidecar.logs().contains("invalid_grant"),
        "{}",
        sidecar.logs()
    );
    Ok(())
}

#[tokio::test]
async fn a_gateway_exchanges_each_callers_own_token() -> Result<()> {
    let authz = Authz::start().await?;
    let server = DemoServer::start(&[]).await?;
    let yaml = format!(
        r#"apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {{name: demo}}
spec:
  endpoints: [{{url: "{url}"}}]
  oauth: {{grant: token-exchange, tokenUrl: "{issuer}/token-exchange", audience: "{AUDIENCE}"}}
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: users}}
spec:
  subjects: [{{user: "*", issuer: "{issuer}"}}]
  rules: [{{server: demo, tools: ["request_headers"]}}]
"#,
        url = server.url(),
        issuer = authz.issuer
    );
    let gateway = Sidecar::start_gateway(&yaml, &authz.issuer, &[]).await?;
    let origin = format!("http://{}", gateway.mcp);
    let upstream_sub = |user: &'static str| {
        let (authz, gateway, origin) = (&authz, &gateway, &origin);
        async move {
            let caller = authz.mint(json!({"sub": user, "aud": origin})).await?;
            let mut headers = modern_headers("request_headers");
            headers.push(("authorization", format!("Bearer {caller}")));
            let r = post(
                &gateway.url("demo"),
                &borrow(&headers),
                modern_call(1, "request_headers", json!({})),
            )
            .await?;
            let text = r.message()["result"]["content"][0]["text"]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("{r:?}\n{}", gateway.logs()))?;
            let headers: Value = serde_json::from_str(&text)?;
            let token = headers["authorization"]
                .as_str()
                .and_then(|v| v.strip_prefix("Bearer "))
                .context("no bearer token upstream")?
                .to_owned();
            assert_ne!(
                token, caller,
                "the caller's own token never reaches the upstream"
            );
            let payload = token.split('.').nth(1).context("not a JWT")?;
            let claims: Value = serde_json::from_slice(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?,
            )?;
            assert_eq!(claims["aud"], AUDIENCE);
            anyhow::Ok(claims["sub"].as_str().unwrap_or_default().to_owned())
        }
    };
    assert_eq!(upstream_sub("alice").await?, "alice");
    assert_eq!(upstream_sub("bob").await?, "bob");
    // Alice again, with a new token of hers: exchanged again (the cache is by the
    // caller's token, so a token never stands in for another).
    assert_eq!(upstream_sub("alice").await?, "alice");
    assert_eq!(
        hits(&authz, "urn:ietf:params:oauth:grant-type:token-exchange").await?,
        3
    );
    Ok(())
}
