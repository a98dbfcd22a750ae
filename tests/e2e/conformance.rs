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

#[tokio::test]
async fn every_scenario_that_passes_direct_passes_through_the_sidecar() -> Result<()> {
    let server = DemoServer::start(&[]).await?;
    let sidecar = Sidecar::start(&standalone_config("demo", &server.url()), &[]).await?;
    let direct = suite(&server.url()).await?;
    let through = suite(&sidecar.url("demo")).await?;

    let mut table = String::from("| scenario | direct | through the sidecar |\n|---|---|---|\n");
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
    let _ = std::fs::write(workspace_root().join("target/conformance.md"), &table);

    assert!(
        direct.values().filter(|p| **p).count() >= 30,
        "the demo server should pass the suite:\n{table}"
    );
    let regressions: Vec<&String> = direct
        .iter()
        .filter(|(name, passed)| **passed && through.get(*name) != Some(&true))
        .map(|(name, _)| name)
        .collect();
    assert!(
        regressions.is_empty(),
        "fail only through the sidecar: {regressions:?}\n{table}\n{}",
        sidecar.logs()
    );
    Ok(())
}
