//! Peers we did not write: the reference server `server-everything`, and agents built
//! on the official Python and TypeScript SDKs. Each runs direct and through the
//! sidecar; the two runs must give the agent the same answers.

use anyhow::Result;
use serde_json::{Value, json};
use tokio::process::Command;
use toolmesh_tests::{
    DemoServer, Everything, Sidecar, js_dir, node22, python, standalone_config, workspace_root,
};

/// Run one SDK client script with a plan (`typescript`, `python`, or `python-modern`:
/// the Python SDK speaking 2026-07-28); returns its JSON report.
pub(crate) async fn run_client(kind: &str, url: &str, plan: &Value) -> Result<Value> {
    let mut cmd = match kind {
        "python" | "python-modern" => {
            let mut c = Command::new(python()?);
            c.arg(workspace_root().join("tests/python/client.py"));
            c
        }
        _ => {
            let mut c = Command::new(node22()?);
            c.arg(js_dir().join("client.mjs"));
            c
        }
    };
    cmd.arg(url).arg(plan.to_string());
    if kind == "python-modern" {
        cmd.arg("modern");
    }
    crate::support::client_report(cmd, &format!("{kind} client")).await
}

fn everything_plan() -> Value {
    json!({
        "echo": ["echo", {"message": "through the mesh"}],
        "sum": ["get-sum", {"a": 2, "b": 40}],
        "progress": ["trigger-long-running-operation", {"duration": 1, "steps": 3}],
        "sampling": ["trigger-sampling-request", {"prompt": "Capital of France?"}],
        "elicitation": ["trigger-elicitation-request", {}],
    })
}

async fn direct_and_through(kind: &str) -> Result<()> {
    let everything = Everything::start().await?;
    let sidecar = Sidecar::start(&standalone_config("everything", &everything.url()), &[]).await?;
    let plan = everything_plan();
    let direct = run_client(kind, &everything.url(), &plan).await?;
    let through = run_client(kind, &sidecar.url("everything"), &plan).await?;
    assert_eq!(
        direct, through,
        "the sidecar changed what the {kind} agent saw"
    );
    assert_eq!(through["steps"]["echo"]["text"], "Echo: through the mesh");
    assert!(
        through["steps"]["sampling"]["text"]
            .as_str()
            .unwrap_or_default()
            .contains("Paris")
    );
    assert_eq!(
        through["seen"],
        json!({"progress": 3, "sampling": 1, "elicitation": 1}),
        "{through}"
    );
    assert!(
        through["tools"].as_array().is_some_and(|t| t.len() > 10),
        "{through}"
    );
    Ok(())
}

#[tokio::test]
async fn python_sdk_agent_with_server_everything() -> Result<()> {
    direct_and_through("python").await
}

#[tokio::test]
async fn typescript_sdk_agent_with_server_everything() -> Result<()> {
    direct_and_through("typescript").await
}

#[tokio::test]
async fn python_sdk_agent_with_the_demo_server() -> Result<()> {
    let server = DemoServer::start(&[]).await?;
    let sidecar = Sidecar::start(&standalone_config("demo", &server.url()), &[]).await?;
    let plan = json!({
        "echo": ["echo", {"text": "hi"}],
        "progress": ["test_tool_with_progress", {}],
        "sampling": ["test_sampling", {"prompt": "Capital?"}],
        "elicitation": ["test_elicitation", {"message": "Who?"}],
    });
    let direct = run_client("python", &server.url(), &plan).await?;
    let through = run_client("python", &sidecar.url("demo"), &plan).await?;
    assert_eq!(direct, through);
    assert_eq!(through["steps"]["sampling"]["text"], "LLM response: Paris");
    assert!(
        through["steps"]["elicitation"]["text"]
            .as_str()
            .unwrap_or_default()
            .contains("action=decline")
    );
    assert_eq!(
        through["seen"],
        json!({"progress": 3, "sampling": 1, "elicitation": 1}),
        "{through}"
    );
    Ok(())
}
