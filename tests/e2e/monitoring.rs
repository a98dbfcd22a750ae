//! `deploy/monitoring/`: the alerting rules pass `promtool check rules` and their unit
//! tests (`promtool test rules`), and every metric the alerts and the Grafana dashboard
//! name is exported by the real binaries: a control plane and a sidecar connected to
//! it are scraped after calls that are allowed, denied, rate limited and failed
//! upstream.

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use serde_json::json;
use toolmesh_tests::{
    ControlPlane, DemoServer, IDENTITY, SIDECAR_TOKEN, Sidecar, TempDir, workspace_root,
};

use crate::support::{admin, borrow, call_demo, eventually, modern_call, modern_headers, post};

async fn promtool(args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new("promtool")
        .args(args)
        .current_dir(workspace_root().join("deploy/monitoring"))
        .output()
        .await
        .context("running promtool (install it: apt-get install prometheus)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(out.status.success(), "promtool {args:?}:\n{text}");
    Ok(text)
}

/// The `toolmesh_*` names in `text` (a histogram's `_bucket` stands for the histogram).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("toolmesh_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The metric names a `/metrics` page exports (histograms under their own name too).
fn exported(page: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in page.lines() {
        let name = match line.strip_prefix("# TYPE ") {
            Some(typed) => typed.split(' ').next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        };
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            names.insert(name.to_owned());
        }
    }
    names
}

#[tokio::test]
async fn the_alerts_pass_their_unit_tests_and_name_only_exported_metrics() -> Result<()> {
    let checked = promtool(&["check", "rules", "alerts.yaml"]).await?;
    assert!(checked.contains("SUCCESS: 11 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "alerts_test.yaml"]).await?;
    assert!(tested.contains("SUCCESS"), "{tested}");

    // A control plane, a sidecar connected to it, and calls of every outcome.
    let demo = DemoServer::start(&[]).await?;
    let seed = format!(
        r#"apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {{name: demo}}
spec:
  endpoints: [{{url: "{}"}}]
  allowUnauthenticated: true
---
apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {{name: down}}
spec:
  endpoints: [{{url: "http://127.0.0.1:9/mcp"}}]
  allowUnauthenticated: true
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: agents}}
spec:
  subjects: [{{identity: "{IDENTITY}"}}]
  rules:
    - {{server: demo, tools: [echo], rateLimit: {{requests: 1, per: 1m}}}}
    - {{server: down, tools: ["*"]}}
"#,
        demo.url()
    );
    let dir = TempDir::new("monitoring")?;
    let cp = ControlPlane::start(&dir.0, 0, &seed).await?;
    let sidecar = Sidecar::connect(&cp.url(), SIDECAR_TOKEN, &[]).await?;
    let ready = eventually(10, || async {
        admin(&sidecar, "/ready").await.is_ok_and(|r| r.0 == 200)
    })
    .await;
    assert!(ready, "{}", sidecar.logs());
    assert_eq!(call_demo(&sidecar, "echo").await?, (200, None));
    assert_eq!(call_demo(&sidecar, "echo").await?.0, 429, "rate limited");
    assert_eq!(call_demo(&sidecar, "add").await?, (200, Some(-32088)));
    let failed = post(
        &sidecar.url("down"),
        &borrow(&modern_headers("echo")),
        modern_call(1, "echo", json!({})),
    )
    .await?;
    assert_eq!(failed.status, 502, "{}", failed.text);

    let cp_admin: std::net::SocketAddr = cp
        .proc
        .output
        .text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "listening")
        .and_then(|v| v["admin"].as_str()?.parse().ok())
        .context("the control plane's admin address")?;
    let mut exported_names = exported(&admin(&sidecar, "/metrics").await?.1);
    exported_names.extend(exported(
        &reqwest::get(format!("http://{cp_admin}/metrics"))
            .await?
            .text()
            .await?,
    ));

    let root = workspace_root().join("deploy/monitoring");
    let alerts = std::fs::read_to_string(root.join("alerts.yaml"))?;
    let dashboard = std::fs::read_to_string(root.join("dashboard.json"))?;
    let parsed: serde_json::Value = serde_json::from_str(&dashboard)?;
    assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 10));
    let used: BTreeSet<String> = metric_names(&alerts)
        .into_iter()
        .chain(metric_names(&dashboard))
        .collect();
    assert!(used.len() >= 12, "{used:?}");
    let missing: Vec<&String> = used
        .iter()
        .filter(|n| !exported_names.contains(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "named by the alerts or the dashboard but exported by neither binary: {missing:?}\nexported: {exported_names:?}"
    );
    Ok(())
}
