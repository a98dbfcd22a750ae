//! The sidecar-injection webhook as the API server calls it: the real control plane
//! serving `--webhook-listen` over rustls with a certificate from a CA made here,
//! called by a real HTTP client (curl) with that CA, with a golden AdmissionReview.
//! (The injection rules themselves are tested in `control-plane/tests/inject.rs`.)

use anyhow::{Context, Result};
use base64::Engine as _;
use serde_json::Value;
use toolmesh_tests::{ControlPlane, Proc, TempDir, TestPki, workspace_root};

async fn curl(args: &[&str]) -> Result<(bool, String, String)> {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .await
        .context("running curl (install it: apt-get install curl)")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn the_webhook_answers_an_admission_review_over_tls_with_a_base64_patch() -> Result<()> {
    let dir = TempDir::new("webhook")?;
    let pki = TestPki::new(&dir.0)?;
    let mut cmd = ControlPlane::command(&dir.0, 0, "")?;
    cmd.arg("--dev")
        .args(["--inject-sidecar-mode", "native"])
        .args(["--webhook-listen", "127.0.0.1:0", "--webhook-cert"])
        .arg(&pki.cert)
        .arg("--webhook-key")
        .arg(&pki.key);
    let mut cp = Proc::spawn("toolmesh-control-plane", cmd)?;
    let port: u16 = cp
        .wait_for("its listening line", |line| {
            let v: Value = serde_json::from_str(line).ok()?;
            (v["message"] == "listening").then(|| {
                v["webhook"]
                    .as_str()?
                    .parse::<std::net::SocketAddr>()
                    .ok()
                    .map(|a| a.port())
            })?
        })
        .await?;
    let url = format!("https://localhost:{port}/inject");
    let ca = pki.ca.to_string_lossy().into_owned();
    let fixture = workspace_root().join("control-plane/tests/fixtures/inject/deployment-pod.json");
    let data = format!("@{}", fixture.display());

    let (ok, body, err) = curl(&[
        "--fail-with-body",
        "--cacert",
        &ca,
        "-H",
        "content-type: application/json",
        "--data-binary",
        &data,
        &url,
    ])
    .await?;
    assert!(ok, "{err}{body}");
    let review: Value = serde_json::from_str(&body)?;
    let response = &review["response"];
    assert_eq!(response["uid"], "0d7c1e0a-1111-4c53-9f0e-000000000001");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().context("patch is a string")?)?;
    let patch: Value = serde_json::from_slice(&patch)?;
    assert!(
        patch
            .as_array()
            .is_some_and(|ops| ops.iter().any(|op| op["path"] == "/spec/initContainers")),
        "{patch}"
    );

    // Not a review: 400 with the reason. Wrong path: 404. Plain HTTP: no answer.
    for (target, expected) in [
        (url.clone(), "400"),
        (format!("https://localhost:{port}/other"), "404"),
    ] {
        let args = [
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
            &ca,
            "--data-binary",
            "{}",
            &target,
        ];
        let (_, status, _) = curl(&args).await?;
        assert_eq!(status, expected, "{target}");
    }
    let (ok, _, _) = curl(&[
        &format!("http://localhost:{port}/inject"),
        "--data-binary",
        "{}",
    ])
    .await?;
    assert!(!ok, "plain HTTP must not be served");
    // A client that does not trust the CA refuses the certificate.
    let (ok, _, err) = curl(&["--data-binary", "{}", &url]).await?;
    assert!(!ok && err.contains("certificate"), "{err}");
    Ok(())
}
