//! The official MCP conformance suite (`@modelcontextprotocol/conformance`), every
//! server scenario, run against the demo server directly and through the sidecar.
//! Every scenario that passes direct must pass through the sidecar; the table is
//! printed and written to `target/conformance.md`.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use tokio::process::Command;
use toolmesh_tests::{DemoServer, Sidecar, js_dir, node22, standalone_config, workspace_root};

/// Run the suite against `url`; scenario name → passed.
async fn suite(url: &str) -> Result<BTreeMap<String, bool>> {
    let out = Command::new(node22()?)
        .arg(js_dir().join("node_modules/@modelcontextprotocol/conformance/dist/index.js"))
        .args(["server", "--suite", "all", "--url", url])
        .kill_on_drop(true)
        .output()
        .await
        .context("running the conformance suite")?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let summary = text.split("=== SUMMARY ===").nth(1).context(text.clone())?;
    let mut results = BTreeMap::new();
    for line in summary.lines() {
        // "✓ name: 1 passed, 0 failed" or "✗ name: 0 passed, 1 failed"
        let (mark, rest) = match (line.strip_prefix('✓'), line.strip_prefix('✗')) {
            (Some(rest), _) => (true, rest),
            (_, Some(rest)) => (false, rest),
            _ => continue,
        };
        let Some((name, counts)) = rest.trim().split_once(": ") else {
            continue;
        };
        let failed = counts
            .split(", ")
            .find_map(|c| c.strip_suffix(" failed"))
            .and_then(|n| n.trim().parse::<u32>().ok());
        if let Some(failed) = failed {
            results.insert(name.to_owned(), mark && failed == 0);
        }
    }
    Ok(results)
}

/// The table of both runs (also written to `target/<file>`), and the scenarios that
/// pass direct but not `through`.
fn compare(
    direct: &BTreeMap<String, bool>,
    through: &BTreeMap<String, bool>,
    column: &str,
    file: &str,
) -> (String, Vec<String>) {
    let mut table = format!("| scenario | direct | {column} |\n|---|---|---|\n");
    let mark = |r: Option<&bool>| match r {
        Some(true) => "pass",
        Some(false) => "FAIL",
        None => "not run",
    };
    for name in direct
        .keys()
        .chain(through.keys().filter(|k| !direct.contains_key(*k)))
    {
        table += &format!(
            "| {name} | {} | {} |\n",
            mark(direct.get(name)),
            mark(through.get(name))
        );
    }
    println!("{table}");
    let _ = std::fs::write(workspace_root().join("target").join(file), &table);
    assert!(
        direct.values().filter(|p| **p).count() >= 30,
        "the demo server should pass the suite:\n{table}"
    );
    let regressions = direct
        .iter()
        .filter(|(name, passed)| **passed && through.get(*name) != Some(&true))
        .map(|(name, _)| name.clone())
        .collect();
    (table, regressions)
}

#[tokio::test]
async fn every_scenario_that_passes_direct_passes_through_the_sidecar() -> Result<()> {
    let server = DemoServer::start(&[]).await?;
    let sidecar = Sidecar::start(&standalone_config("demo", &server.url()), &[]).await?;
    let direct = suite(&server.url()).await?;
    let through = suite(&sidecar.url("demo")).await?;
    let (table, regressions) = compare(&direct, &through, "through the sidecar", "conformance.md");
    assert!(
        regressions.is_empty(),
        "fail only through the sidecar: {regressions:?}\n{table}\n{}",
        sidecar.logs()
    );
    Ok(())
}

/// The aggregate fronting the demo server unprefixed and a second server under a
/// prefix: what the suite sees must be the demo server, plus `other__…` names it
/// never asks for.
#[tokio::test]
async fn every_scenario_that_passes_direct_passes_through_the_aggregate() -> Result<()> {
    let server = DemoServer::start(&[]).await?;
    let other = DemoServer::start(&[]).await?;
    let demo = standalone_config("demo", &server.url()).replace(
        "  allowUnauthenticated: true\n",
        "  allowUnauthenticated: true\n  prefix: \"\"\n",
    );
    let other =
        standalone_config("other", &other.url()).replace("name: tests", "name: tests-other");
    let sidecar = Sidecar::start(&format!("{demo}---\n{other}"), &[]).await?;
    let direct = suite(&server.url()).await?;
    let through = suite(&format!("http://{}/mcp", sidecar.mcp)).await?;
    let (table, regressions) = compare(
        &direct,
        &through,
        "through the aggregate",
        "conformance-aggregate.md",
    );
    assert!(
        regressions.is_empty(),
        "fail only through the aggregate: {regressions:?}\n{table}\n{}",
        sidecar.logs()
    );
    Ok(())
}
