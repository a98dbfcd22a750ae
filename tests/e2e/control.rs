//! The control plane and sidecars in control-plane mode: live policy changes, what a
//! sidecar is sent, refusals, and fail-static behaviour when the control plane is away.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use toolmesh_proto::v1alpha1 as pb;
use toolmesh_tests::{
    ControlPlane, DemoServer, IDENTITY, OTHER_TOKEN, SIDECAR_TOKEN, Sidecar, TempDir,
};

use crate::support::{admin, call_demo, eventually, snapshot_stream};

/// The demo server, a secret for it, and a policy allowing `tools` to the test identity.
fn resources(url: &str, tools: &str) -> String {
    format!(
        r#"apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {{name: demo}}
spec:
  endpoints: [{{url: "{url}"}}]
  credential: {{header: X-Api-Key, secretRef: {{name: demo-key, key: key}}}}
---
apiVersion: toolmesh.dev/v1alpha1
kind: Secret
metadata: {{name: demo-key}}
data: {{key: "demo-secret-value-1"}}
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: agents}}
spec:
  subjects: [{{identity: "{IDENTITY}"}}]
  rules: [{{server: demo, tools: {tools}}}]
"#
    )
}

/// A second server only `other/agent` may use, with its own secret.
const OTHER: &str = r#"apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {name: private}
spec:
  endpoints: [{url: "https://private.example.com/mcp"}]
  credential: {header: Authorization, secretRef: {name: private-key, key: key}, prefix: "Bearer "}
---
apiVersion: toolmesh.dev/v1alpha1
kind: Secret
metadata: {name: private-key}
data: {key: "other-identity-secret-value"}
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {name: other}
spec:
  subjects: [{identity: "other/*"}]
  rules: [{server: private, tools: ["*"]}]
"#;

#[tokio::test]
async fn a_policy_applied_with_toolmeshctl_is_enforced_within_a_second() -> Result<()> {
    let server = DemoServer::start(&[]).await?;
    let dir = TempDir::new("cp")?;
    let cp = ControlPlane::start(&dir.0, 0, &resources(&server.url(), r#"["echo"]"#)).await?;
    let sidecar = Sidecar::connect(&cp.url(), SIDECAR_TOKEN, &[]).await?;
    assert!(
        eventually(10, || async {
            admin(&sidecar, "/ready").await.map(|r| r.0).ok() == Some(200)
        })
        .await
    );
    assert_eq!(call_demo(&sidecar, "echo").await?, (200, None));
    assert_eq!(call_demo(&sidecar, "add").await?, (200, Some(-32088)));

    let (ok, out, err) = cp
        .ctl(
            &["apply", "-f", "-"],
            Some(&resources(&server.url(), r#"["echo", "add"]"#)),
        )
        .await?;
    assert!(ok, "{err}");
    assert!(
        out.contains("AccessPolicy/agents configured") && out.contains("McpServer/demo unchanged"),
        "{out}"
    );
    let applied = Instant::now();
    let live = eventually(5, || async {
        call_demo(&sidecar, "add").await.ok() == Some((200, None))
    })
    .await;
    let took = applied.elapsed();
    assert!(live, "{}", sidecar.logs());
    assert!(took < Duration::from_secs(1), "enforced after {took:?}");
    println!("policy change enforced {took:?} after toolmeshctl apply returned");

    // The fleet view: who runs what.
    let (ok, status, _) = cp.ctl(&["status"], None).await?;
    assert!(
        ok && status.contains(IDENTITY) && status.contains("test-pod") && status.contains("yes"),
        "{status}"
    );
    let (_, ready) = admin(&sidecar, "/ready").await?;
    let version = ready
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(
        status
            .lines()
            .any(|l| l.contains(IDENTITY) && l.matches(&version).count() == 2),
        "sent and acked {version}:\n{status}"
    );

    // kubectl habits: get, delete (refused while referenced), errors name the field.
    let (ok, yaml, _) = cp.ctl(&["get", "secret", "demo-key"], None).await?;
    assert!(
        ok && yaml.contains("<redacted>") && !yaml.contains("demo-secret-value-1"),
        "{yaml}"
    );
    let (ok, _, err) = cp.ctl(&["delete", "secret", "demo-key"], None).await?;
    assert!(!ok && err.contains("demo-key"), "{err}");
    let bad = resources(&server.url(), r#"["echo"]"#).replace("endpoints", "endpoint");
    let (ok, _, err) = cp.ctl(&["apply", "-f", "-"], Some(&bad)).await?;
    assert!(
        !ok && err.contains("McpServer/demo") && err.contains("endpoint"),
        "{err}"
    );
    assert_eq!(
        call_demo(&sidecar, "add").await?,
        (200, None),
        "a refused apply changes nothing"
    );
    Ok(())
}

/// Open a raw snapshot stream as a sidecar would; return the first push or the error.
async fn first_push(
    cp: &ControlPlane,
    token: &str,
    identity: &str,
) -> Result<Result<pb::Snapshot, tonic::Status>> {
    let (_tx, mut stream) = match snapshot_stream(&cp.url(), token, identity, "probe").await? {
        Ok(opened) => opened,
        Err(status) => return Ok(Err(status)),
    };
    match stream.message().await {
        Ok(Some(push)) => Ok(Ok(push.snapshot.context("push without snapshot")?)),
        Ok(None) => anyhow::bail!("stream ended"),
        Err(status) => Ok(Err(status)),
    }
}

#[tokio::test]
async fn a_sidecar_is_sent_only_its_own_servers_and_credentials() -> Result<()> {
    let dir = TempDir::new("cp")?;
    let seed = format!(
        "{}---\n{OTHER}",
        resources("http://127.0.0.1:9/mcp", r#"["*"]"#)
    );
    let cp = ControlPlane::start(&dir.0, 0, &seed).await?;

    let mine = first_push(&cp, SIDECAR_TOKEN, IDENTITY).await??;
    let sent = format!("{mine:?}");
    assert_eq!(mine.identity, IDENTITY);
    assert_eq!(
        mine.servers
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["demo"]
    );
    assert!(
        sent.contains("demo-secret-value-1"),
        "its own credential is sent"
    );
    assert!(
        !sent.contains("other-identity-secret-value") && !sent.contains("private"),
        "{sent}"
    );

    let theirs = first_push(&cp, OTHER_TOKEN, "other/agent").await??;
    assert_eq!(
        theirs
            .servers
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["private"]
    );
    assert!(!format!("{theirs:?}").contains("demo-secret-value-1"));

    // A token cannot ask for another identity's snapshot, and a wrong token gets nothing.
    let stolen = first_push(&cp, SIDECAR_TOKEN, "other/agent")
        .await?
        .expect_err("refused");
    assert_eq!(stolen.code(), tonic::Code::PermissionDenied, "{stolen:?}");
    let wrong = first_push(&cp, "not-a-valid-token-at-all", IDENTITY)
        .await?
        .expect_err("refused");
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated, "{wrong:?}");
    let sidecar = Sidecar::connect(&cp.url(), "not-a-valid-token-at-all", &[]).await?;
    assert!(
        eventually(10, || async { sidecar.logs().contains("Unauthenticated") }).await,
        "{}",
        sidecar.logs()
    );
    assert_eq!(admin(&sidecar, "/ready").await?.0, 503);
    Ok(())
}

#[tokio::test]
async fn a_refused_snapshot_is_nacked_and_the_old_one_keeps_serving() -> Result<()> {
    let dir = TempDir::new("cp")?;
    let https = resources("https://demo.example.com/mcp", r#"["*"]"#);
    let cp = ControlPlane::start(&dir.0, 0, &https).await?;
    let sidecar =
        Sidecar::connect(&cp.url(), SIDECAR_TOKEN, &["--require-https-upstreams"]).await?;
    assert!(
        eventually(10, || async {
            admin(&sidecar, "/ready").await.map(|r| r.0).ok() == Some(200)
        })
        .await
    );
    let (_, before) = admin(&sidecar, "/ready").await?;

    let plain = resources("http://demo.example.com/mcp", r#"["*"]"#);
    let (ok, _, err) = cp.ctl(&["apply", "-f", "-"], Some(&plain)).await?;
    assert!(ok, "{err}");
    let shown = eventually(5, || async {
        cp.ctl(&["status"], None)
            .await
            .map(|(_, s, _)| s.contains("not https"))
            .unwrap_or(false)
    })
    .await;
    let (_, status, _) = cp.ctl(&["status"], None).await?;
    assert!(shown, "toolmeshctl status shows the NACK reason:\n{status}");
    assert_eq!(
        admin(&sidecar, "/ready").await?.1,
        before,
        "still serving the previous snapshot"
    );
    let (_, metrics) = admin(&sidecar, "/metrics").await?;
    assert!(
        metrics.contains("toolmesh_snapshot_nacks_total 1"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn sidecars_fail_static_when_the_control_plane_is_away() -> Result<()> {
    let server = DemoServer::start(&[]).await?;
    let dir = TempDir::new("cp")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut cp =
        ControlPlane::start(&dir.0, port, &resources(&server.url(), r#"["echo"]"#)).await?;
    let url = cp.url();
    let sidecar = Sidecar::connect(&url, SIDECAR_TOKEN, &[]).await?;
    assert!(
        eventually(10, || async {
            call_demo(&sidecar, "echo").await.ok() == Some((200, None))
        })
        .await
    );

    // Control plane gone: calls keep working.
    cp.proc.terminate().await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(call_demo(&sidecar, "echo").await?, (200, None));
    assert_eq!(admin(&sidecar, "/ready").await?.0, 200);

    // Restart the sidecar while the control plane is still down: it serves at once from
    // the snapshot it persisted.
    let state = sidecar.stop().await?;
    let persisted = std::fs::metadata(state.0.join("state/snapshot.pb"))?.permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&persisted) & 0o777,
        0o600,
        "it holds credentials"
    );
    let sidecar = Sidecar::connect_in(state, &url, SIDECAR_TOKEN, &[]).await?;
    assert_eq!(
        admin(&sidecar, "/ready").await?.0,
        200,
        "{}",
        sidecar.logs()
    );
    assert_eq!(call_demo(&sidecar, "echo").await?, (200, None));
    assert!(sidecar.logs().contains("serving the persisted snapshot"));

    // The control plane comes back (same store, one more tool allowed meanwhile): the
    // sidecar reconnects and catches up.
    let cp = ControlPlane::start(
        &dir.0,
        port,
        &resources(&server.url(), r#"["echo", "add"]"#),
    )
    .await?;
    let caught_up = eventually(40, || async {
        call_demo(&sidecar, "add").await.ok() == Some((200, None))
    })
    .await;
    assert!(caught_up, "{}", sidecar.logs());
    let (_, status, _) = cp.ctl(&["status"], None).await?;
    assert!(status.contains("yes"), "{status}");
    Ok(())
}

#[tokio::test]
async fn the_quickstart_examples_change_what_the_agent_may_call() -> Result<()> {
    let server = DemoServer::start(&[]).await?;
    let calc = DemoServer::start(&["--json-response"]).await?;
    let examples = toolmesh_tests::workspace_root().join("deploy/examples");
    let demo = std::fs::read_to_string(examples.join("resources/demo.yaml"))?;
    // The example names the quickstart's fixed ports; the test's servers have their own.
    let seed = demo
        .replace("http://127.0.0.1:3001/mcp", &server.url())
        .replace("http://127.0.0.1:3002/mcp", &calc.url());
    assert!(
        !seed.contains("127.0.0.1:300"),
        "the example's endpoints moved: update this test"
    );
    let dir = TempDir::new("cp")?;
    let cp = ControlPlane::start(&dir.0, 0, &seed).await?; // agents/* covers IDENTITY
    let sidecar = Sidecar::connect(&cp.url(), SIDECAR_TOKEN, &[]).await?;
    assert!(
        eventually(10, || async {
            call_demo(&sidecar, "add").await.ok() == Some((200, None))
        })
        .await,
        "{}",
        sidecar.logs()
    );
    // The README's aggregate example: both servers through /mcp, calc showing `add`
    // only, each call run by its own server.
    let report = crate::peers::run_client(
        "python",
        &format!("http://{}/mcp", sidecar.mcp),
        &serde_json::json!({
            "hello": ["demo__echo", {"text": "hello through /mcp"}],
            "sum": ["calc__add", {"a": 2, "b": 3}],
        }),
    )
    .await?;
    let tools = &report["tools"];
    for (shown, yes) in [
        ("calc__add", true),
        ("demo__echo", true),
        ("calc__echo", false),
    ] {
        let listed = tools
            .as_array()
            .is_some_and(|t| t.iter().any(|n| n == shown));
        assert_eq!(listed, yes, "{shown}: {report}");
    }
    assert_eq!(
        report["steps"]["hello"]["text"], "hello through /mcp",
        "{report}"
    );
    assert_eq!(report["steps"]["sum"]["text"], "5", "{report}");

    let change = examples.join("changes/echo-only.yaml");
    let (ok, out, err) = cp
        .ctl(&["apply", "-f", &change.to_string_lossy()], None)
        .await?;
    assert!(
        ok && out.contains("AccessPolicy/demo-agents configured"),
        "{out}{err}"
    );
    assert!(
        eventually(5, || async {
            call_demo(&sidecar, "add").await.ok() == Some((200, Some(-32088)))
        })
        .await
    );
    assert_eq!(call_demo(&sidecar, "echo").await?, (200, None));
    Ok(())
}

#[tokio::test]
async fn without_dev_the_control_plane_speaks_tls_and_sidecars_verify_it() -> Result<()> {
    let server = DemoServer::start(&[]).await?;
    let dir = TempDir::new("cp-tls")?;
    let seed = resources(&server.url(), r#"["echo"]"#);

    // Neither --dev nor a certificate: refused before anything listens.
    let mut bare = ControlPlane::command(&dir.0, 0, &seed)?;
    bare.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let out = bare.output().await?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TLS is required"),
        "{out:?}"
    );

    let pki = toolmesh_tests::TestPki::new(&dir.0)?;
    let cp = ControlPlane::start_tls(&dir.0, &seed, &pki).await?;
    assert!(cp.url().starts_with("https://127.0.0.1:"));
    let ca = pki.ca.to_string_lossy().into_owned();
    let sidecar = Sidecar::connect(&cp.url(), SIDECAR_TOKEN, &["--ca-file", &ca]).await?;
    assert!(
        eventually(10, || async {
            call_demo(&sidecar, "echo").await.ok() == Some((200, None))
        })
        .await,
        "{}",
        sidecar.logs()
    );
    let (ok, status, err) = cp.ctl(&["status"], None).await?;
    assert!(ok && status.contains(IDENTITY), "{status}{err}");

    // A sidecar that does not trust the test CA (system roots) refuses the control plane;
    // plaintext to the TLS port gets nowhere either.
    let untrusting = Sidecar::connect(&cp.url(), SIDECAR_TOKEN, &[]).await?;
    let plaintext =
        Sidecar::connect(&cp.url().replace("https://", "http://"), SIDECAR_TOKEN, &[]).await?;
    assert!(
        eventually(10, || async {
            untrusting.logs().contains("UnknownIssuer")
                && plaintext.logs().contains("no snapshot yet")
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        admin(&untrusting, "/ready").await?.0,
        503,
        "{}",
        untrusting.logs()
    );
    assert_eq!(
        admin(&plaintext, "/ready").await?.0,
        503,
        "{}",
        plaintext.logs()
    );
    Ok(())
}
