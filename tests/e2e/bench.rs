//! A smoke run of the benchmark binary (`make bench` runs it in full, in release): the
//! list and paced-call workloads for half a second against the direct path and a real
//! sidecar, so a change that breaks the harness, or makes the sidecar answer a
//! workload wrongly, fails here and not only on the next benchmark run.

use std::time::Duration;

use toolmesh_tests::{TempDir, binary};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_runs_and_every_answer_is_correct() -> anyhow::Result<()> {
    let dir = TempDir::new("bench-smoke")?;
    let report = dir.0.join("report.md");
    let mut cmd = tokio::process::Command::new(binary("toolmesh-bench"));
    cmd.args(["--workload", "list", "--workload", "call-paced"])
        .args([
            "--duration",
            "0.5",
            "--paced-duration",
            "0.5",
            "--rate",
            "200",
        ])
        .args(["--no-nginx", "--out"])
        .arg(&report)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(240), cmd.output()).await??;
    anyhow::ensure!(
        output.status.success(),
        "the benchmark failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(&report)?;
    for workload in ["### list —", "### call-paced —"] {
        let section = text
            .split(workload)
            .nth(1)
            .ok_or_else(|| anyhow::anyhow!("no {workload} section in:\n{text}"))?;
        for path in ["direct", "sidecar"] {
            let row = section
                .lines()
                .find(|l| l.starts_with(&format!("| {path} |")))
                .ok_or_else(|| anyhow::anyhow!("{workload}: no {path} row"))?;
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            // | path | req/s | p50 | … | failed |
            let rate: f64 = cells[2].parse()?;
            let failed = cells[cells.len() - 2];
            assert!(rate > 0.0, "{workload} {path}: no requests answered: {row}");
            assert_eq!(failed, "0", "{workload} {path}: failed answers: {row}");
        }
    }
    Ok(())
}
