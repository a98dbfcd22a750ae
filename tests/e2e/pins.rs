//! Pinned definitions (the rug-pull defence) end to end: a server that changes what a
//! tool says after it was approved, seen through sidecars in control-plane mode and
//! standalone; `toolmeshctl pin`, `diff` and `status`; the upstream's own output as
//! proof that a refused call never ran.

use anyhow::{Context, Result};
use serde_json::{Value, json};
use toolmesh_tests::{
    ControlPlane, DemoServer, Everything, IDENTITY, SIDECAR_TOKEN, Sidecar, TempDir,
};

use crate::support::{admin, audit_lines, borrow, eventually, post};

/// One McpServer `name` at `url` with `pins` (YAML lines under `pins:`, indented four
/// spaces), and a policy letting the test identity use every tool and prompt.
fn resources(name: &str, url: &str, pins: &str) -> String {
    format!(
        r#"apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {{name: {name}}}
spec:
  endpoints: [{{url: "{url}"}}]
  allowUnauthenticated: true
  pins:
{pins}---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: agents}}
spec:
  subjects: [{{identity: "{IDENTITY}"}}]
  rules: [{{server: {name}, tools: ["*"], prompts: ["*"]}}]
"#
    )
}

const ROLL_OUT: &str = "    mode: warn\n    unpinned: allow\n";

/// A 2026-07-28 list (`tools/list`, `prompts/list`) at `url`: the names in it.
async fn names(url: &str, method: &str) -> Result<Vec<String>> {
    let h = [
        ("mcp-protocol-version", "2026-07-28".to_owned()),
        ("mcp-method", method.to_owned()),
    ];
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": {"_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"}}}});
    let r = post(url, &borrow(&h), body.to_string()).await?;
    let member = method.split('/').next().unwrap_or_default();
    let list = r.message()["result"][member]
        .as_array()
        .cloned()
        .with_context(|| format!("{method}: {r:?}"))?;
    Ok(list
        .iter()
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect())
}

/// A 2026-07-28 `tools/call` of `echo` at `url`: the JSON-RPC message that came back.
async fn echo(url: &str) -> Result<Value> {
    let r = post(
        url,
        &borrow(&crate::support::modern_headers("echo")),
        crate::support::modern_call(2, "echo", json!({"text": "hi"})),
    )
    .await?;
    Ok(r.message())
}

async fn ready(sidecar: &Sidecar) -> bool {
    eventually(10, || async {
        admin(sidecar, "/ready").await.map(|r| r.0).ok() == Some(200)
    })
    .await
}

/// `yaml` as `toolmeshctl pin` printed it, switched from rolling out to enforcing.
fn enforcing(yaml: &str) -> String {
    yaml.lines()
        .filter(|l| !matches!(l.trim(), "mode: warn" | "unpinned: allow"))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[tokio::test]
async fn a_rug_pull_hides_the_tool_refuses_its_call_and_is_reported_once() -> Result<()> {
    let server = DemoServer::start(&[]).await?;
    let dir = TempDir::new("pins")?;
    let cp = ControlPlane::start(&dir.0, 0, &resources("demo", &server.url(), ROLL_OUT)).await?;
    let first = Sidecar::connect(&cp.url(), SIDECAR_TOKEN, &[]).await?;
    let second = Sidecar::connect(&cp.url(), SIDECAR_TOKEN, &[]).await?;
    assert!(ready(&first).await && ready(&second).await);

    // Rolling out (warn, unpinned allowed): every tool passes and is reported.
    let all = names(&first.url("demo"), "tools/list").await?;
    assert!(all.contains(&"echo".to_owned()) && all.len() > 5, "{all:?}");
    let proposed = eventually(10, || async {
        cp.ctl(&["pin", "demo"], None)
            .await
            .is_ok_and(|(ok, out, _)| ok && out.contains("echo:"))
    })
    .await;
    let (ok, pinned, summary) = cp.ctl(&["pin", "demo"], None).await?;
    assert!(proposed, "{summary}\n{pinned}\n{}", first.logs());
    assert!(
        ok && summary.contains(&format!("{} pin(s) added", all.len())),
        "{summary}"
    );
    let (ok, _, err) = cp
        .ctl(&["apply", "-f", "-"], Some(&enforcing(&pinned)))
        .await?;
    assert!(ok, "{err}\n{pinned}");
    let (ok, out, _) = cp.ctl(&["diff", "demo"], None).await?;
    assert!(ok && out.contains("no definition of demo differs"), "{out}");
    let enforced = eventually(10, || async {
        names(&first.url("demo"), "tools/list").await.ok() == Some(all.clone())
            && !admin(&first, "/config")
                .await
                .is_ok_and(|(_, c)| c.contains("\"warn\": true"))
    })
    .await;
    assert!(enforced, "{}", first.logs());
    assert!(echo(&first.url("demo")).await?["result"].is_object());
    let ran = |s: &DemoServer| s.proc.output.text().matches("call echo").count();
    assert_eq!(ran(&server), 1);

    // The server changes what `echo` says.
    reqwest::Client::new()
        .post(format!("http://{}/rug-pull", server.addr))
        .send()
        .await?
        .error_for_status()?;
    for sidecar in [&first, &second] {
        let now = names(&sidecar.url("demo"), "tools/list").await?;
        assert!(!now.contains(&"echo".to_owned()), "{now:?}");
        assert_eq!(now.len(), all.len() - 1, "only echo is hidden: {now:?}");
        let refused = echo(&sidecar.url("demo")).await?;
        assert_eq!(refused["error"]["code"], -32088, "{refused}");
        let message = refused["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("drifted (description)"), "{message}");
        assert_eq!(refused["error"]["data"]["pin"], "drifted (description)");
    }
    assert_eq!(ran(&server), 1, "a refused call reached the server");

    // Counted, audited and logged by each sidecar; reported to the control plane once.
    let (_, metrics) = admin(&first, "/metrics").await?;
    assert!(
        metrics.contains(r#"toolmesh_pin_drifts_total{kind="tool",state="drifted"} 1"#),
        "{metrics}"
    );
    let is_drift = |l: &Value| l["pin"] == "drifted (description)" && l["pin_digest"].is_string();
    let refused = |l: &Value| l["method"] == "tools/call" && l["decision"] == "denied";
    let written = eventually(10, || async {
        let lines = audit_lines(&first);
        lines.iter().any(is_drift) && lines.iter().any(refused)
    })
    .await;
    assert!(written, "{:?}", audit_lines(&first));
    let lines = audit_lines(&first);
    let drift = lines
        .iter()
        .find(|l| is_drift(l))
        .context("the drift line")?;
    assert_eq!(
        (drift["server"].as_str(), drift["name"].as_str()),
        (Some("demo"), Some("echo"))
    );
    assert_eq!(drift["method"], "tools/list");
    let call = lines
        .iter()
        .find(|l| refused(l))
        .context("the refused call's line")?;
    assert_eq!(call["pin"], "drifted (description)");
    let shown = eventually(10, || async {
        cp.ctl(&["status"], None)
            .await
            .is_ok_and(|(_, out, _)| out.contains("drifted (description)"))
    })
    .await;
    assert!(shown);
    let (_, status, _) = cp.ctl(&["status"], None).await?;
    let rows: Vec<&str> = status.lines().filter(|l| l.contains("drifted")).collect();
    assert_eq!(rows.len(), 1, "{status}");
    assert!(
        rows[0].starts_with("demo") && rows[0].contains(" echo "),
        "{status}"
    );
    let (ok, diff, err) = cp.ctl(&["diff", "demo"], None).await?;
    assert!(
        !ok && err.contains("1 definition(s) of demo differ"),
        "{err}"
    );
    assert!(
        diff.contains("tool demo/echo: drifted (description)"),
        "{diff}"
    );
    assert!(diff.contains("~/.ssh/id_rsa"), "{diff}");

    // Approving the new definition is an ordinary apply: it shows again, and the
    // report no longer counts.
    let (ok, renewed, summary) = cp.ctl(&["pin", "demo"], None).await?;
    assert!(ok && summary.contains("1 changed (tool echo)"), "{summary}");
    let (ok, _, err) = cp.ctl(&["apply", "-f", "-"], Some(&renewed)).await?;
    assert!(ok, "{err}");
    let back = eventually(10, || async {
        names(&first.url("demo"), "tools/list").await.ok() == Some(all.clone())
    })
    .await;
    assert!(back, "{}", first.logs());
    assert!(echo(&first.url("demo")).await?["result"].is_object());
    assert_eq!(ran(&server), 2);
    let (_, status, _) = cp.ctl(&["status"], None).await?;
    assert!(!status.contains("drifted"), "{status}");
    Ok(())
}

/// Pins for the demo server's `echo` as it describes itself before a rug pull.
async fn echo_pin(server: &DemoServer) -> Result<String> {
    let h = [
        ("mcp-protocol-version", "2026-07-28".to_owned()),
        ("mcp-method", "tools/list".to_owned()),
    ];
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"}}}});
    let r = post(&server.url(), &borrow(&h), body.to_string()).await?;
    let tools = r.message()["result"]["tools"].clone();
    let echo = tools
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "echo"))
        .context("echo")?;
    let digest = toolmesh_proto::pin::digest(toolmesh_proto::pin::Kind::Tool, echo)?;
    Ok(format!(
        "    tools:\n      echo: {{digest: \"{digest}\"}}\n"
    ))
}

#[tokio::test]
async fn warn_mode_relays_with_an_audit_line_and_unpinned_tools_are_hidden_by_default() -> Result<()>
{
    let server = DemoServer::start(&[]).await?;
    let pin = echo_pin(&server).await?;
    let yaml = |pins: &str| resources("demo", &server.url(), pins);
    // Enforce, unpinned hidden: only echo shows, and an unpinned tool cannot be called.
    let sidecar = Sidecar::start(&yaml(&pin), &[]).await?;
    assert_eq!(
        names(&sidecar.url("demo"), "tools/list").await?,
        vec!["echo"]
    );
    let (status, code) = crate::support::call_demo(&sidecar, "add").await?;
    assert_eq!((status, code), (200, Some(-32088)));
    assert_eq!(server.proc.output.text().matches("call add").count(), 0);
    // Prompts have no pins here either: all hidden.
    assert!(
        names(&sidecar.url("demo"), "prompts/list")
            .await?
            .is_empty()
    );
    // The aggregated /mcp judges the same way: one list, one refusal.
    let aggregate = format!("http://{}/mcp", sidecar.mcp);
    assert_eq!(names(&aggregate, "tools/list").await?, vec!["demo__echo"]);
    let refused = post(
        &aggregate,
        &borrow(&crate::support::modern_headers("demo__add")),
        crate::support::modern_call(3, "demo__add", json!({"a": 1, "b": 2})),
    )
    .await?;
    assert_eq!(refused.message()["error"]["code"], -32088, "{refused:?}");
    assert_eq!(refused.message()["error"]["data"]["pin"], "unpinned");
    assert_eq!(server.proc.output.text().matches("call add").count(), 0);

    // Warn: the drifted echo is relayed and its call runs, both noted.
    sidecar.write_config(&yaml(&format!("    mode: warn\n{pin}")))?;
    let reloaded = eventually(10, || async {
        names(&sidecar.url("demo"), "tools/list")
            .await
            .is_ok_and(|n| n.len() > 1)
    })
    .await;
    assert!(reloaded, "{}", sidecar.logs());
    reqwest::Client::new()
        .post(format!("http://{}/rug-pull", server.addr))
        .send()
        .await?
        .error_for_status()?;
    let listed = names(&sidecar.url("demo"), "tools/list").await?;
    assert!(listed.contains(&"echo".to_owned()), "{listed:?}");
    assert!(echo(&sidecar.url("demo")).await?["result"].is_object());
    assert_eq!(server.proc.output.text().matches("call echo").count(), 1);
    let written = eventually(10, || async {
        audit_lines(&sidecar)
            .iter()
            .any(|l| l["method"] == "tools/call" && l["name"] == "echo")
    })
    .await;
    let lines = audit_lines(&sidecar);
    assert!(written, "{lines:?}");
    let call = lines
        .iter()
        .find(|l| l["method"] == "tools/call" && l["name"] == "echo")
        .context("the call's line")?;
    assert_eq!(call["decision"], "allowed");
    assert_eq!(
        call["pin"], "drifted (definition)",
        "no fingerprints: the whole definition"
    );
    assert!(
        lines.iter().any(|l| l["name"] == "echo"
            && l["pin"] == "drifted (definition)"
            && l["pin_digest"].is_string()),
        "{lines:?}"
    );
    Ok(())
}

#[tokio::test]
async fn pin_and_diff_round_trip_on_server_everything() -> Result<()> {
    let everything = Everything::start().await?;
    let dir = TempDir::new("pins-everything")?;
    let cp = ControlPlane::start(
        &dir.0,
        0,
        &resources("everything", &everything.url(), ROLL_OUT),
    )
    .await?;
    let sidecar = Sidecar::connect(&cp.url(), SIDECAR_TOKEN, &[]).await?;
    assert!(ready(&sidecar).await);
    let url = sidecar.url("everything");
    let tools = names(&url, "tools/list").await?;
    let prompts = names(&url, "prompts/list").await?;
    assert!(
        tools.len() > 5 && !prompts.is_empty(),
        "{tools:?} {prompts:?}"
    );
    let reported = eventually(10, || async {
        cp.ctl(&["pin", "everything"], None)
            .await
            .is_ok_and(|(ok, _, err)| {
                ok && err.contains(&format!("{} pin(s) added", tools.len() + prompts.len()))
            })
    })
    .await;
    assert!(reported, "{}", sidecar.logs());
    let (_, pinned, _) = cp.ctl(&["pin", "everything"], None).await?;
    let (ok, _, err) = cp
        .ctl(&["apply", "-f", "-"], Some(&enforcing(&pinned)))
        .await?;
    assert!(ok, "{err}");
    let (ok, out, err) = cp.ctl(&["diff", "everything"], None).await?;
    assert!(ok, "{out}{err}");
    // Enforced, everything still shows: each definition matches the pin made from it.
    let same = eventually(10, || async {
        let config = admin(&sidecar, "/config")
            .await
            .map(|r| r.1)
            .unwrap_or_default();
        !config.contains("\"allowUnpinned\": true")
            && names(&url, "tools/list").await.ok() == Some(tools.clone())
            && names(&url, "prompts/list").await.ok() == Some(prompts.clone())
    })
    .await;
    assert!(same, "{}", sidecar.logs());
    let (_, metrics) = admin(&sidecar, "/metrics").await?;
    assert!(
        metrics.contains(r#"toolmesh_pin_drifts_total{kind="tool",state="drifted"} 0"#),
        "{metrics}"
    );
    Ok(())
}
