//! Running the sidecar: hot reload, readiness, upstream failure, admin endpoints,
//! graceful shutdown.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{Value, json};
use toolmesh_tests::{Sidecar, standalone_config};

use crate::support::{Stack, admin, borrow, eventually, modern_call, modern_headers, post};

async fn echo(url: &str) -> Result<u16> {
    Ok(post(
        url,
        &borrow(&modern_headers("echo")),
        modern_call(1, "echo", json!({"text": "x"})),
    )
    .await?
    .status)
}

#[tokio::test]
async fn hot_reload_swaps_valid_files_and_keeps_serving_through_bad_ones() -> Result<()> {
    let stack = Stack::start().await?;
    let sidecar = &stack.sidecar;
    assert_eq!(echo(&stack.url()).await?, 200);
    let (_, before) = admin(sidecar, "/ready").await?;

    sidecar.write_config(&standalone_config("renamed", &stack.server.url()))?;
    let moved = eventually(10, || async {
        echo(&sidecar.url("renamed")).await.ok() == Some(200)
    })
    .await;
    assert!(moved, "the new server name is served: {}", sidecar.logs());
    assert_eq!(echo(&stack.url()).await?, 404, "the old name is gone");
    let (_, after) = admin(sidecar, "/ready").await?;
    assert_ne!(before, after, "/ready names the new version");

    // An invalid file: one log line naming the field, a metric, and nothing changes.
    let bad = standalone_config("renamed", &stack.server.url()).replace("endpoints", "endpointz");
    sidecar.write_config(&bad)?;
    let logged = eventually(10, || async { sidecar.logs().contains("endpointz") }).await;
    assert!(logged, "{}", sidecar.logs());
    let line = sidecar
        .logs()
        .lines()
        .find(|l| l.contains("endpointz"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        line.contains("configuration rejected") && line.contains("McpServer/renamed"),
        "{line}"
    );
    assert_eq!(
        echo(&sidecar.url("renamed")).await?,
        200,
        "the previous config keeps serving"
    );
    let (ready, _) = admin(sidecar, "/ready").await?;
    assert_eq!(ready, 200);
    let (_, metrics) = admin(sidecar, "/metrics").await?;
    assert!(
        metrics.contains("toolmesh_config_load_failures_total 1"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn not_ready_until_a_valid_config_arrives() -> Result<()> {
    let stack = Stack::start().await?;
    let good = standalone_config("late", &stack.server.url());
    let sidecar = Sidecar::start("kind: Nonsense\n", &[]).await?;
    let (status, body) = admin(&sidecar, "/ready").await?;
    assert_eq!(status, 503, "{body}");
    let r = post(
        &sidecar.url("late"),
        &[],
        r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,
    )
    .await?;
    assert_eq!((r.status, r.error_code()), (503, Some(-32087)), "{r:?}");
    assert_eq!(r.headers["retry-after"], "1");

    sidecar.write_config(&good)?;
    assert!(
        eventually(10, || async {
            admin(&sidecar, "/ready").await.map(|r| r.0).ok() == Some(200)
        })
        .await
    );
    assert_eq!(echo(&sidecar.url("late")).await?, 200);
    Ok(())
}

#[tokio::test]
async fn a_dead_upstream_is_a_clear_502_not_a_dead_sidecar() -> Result<()> {
    let mut stack = Stack::start().await?;
    stack.server.proc.terminate().await?;
    let r = post(
        &stack.url(),
        &borrow(&modern_headers("echo")),
        modern_call(7, "echo", json!({})),
    )
    .await?;
    assert_eq!((r.status, r.error_code()), (502, Some(-32085)), "{r:?}");
    assert_eq!(r.json()["id"], 7, "the error answers the request's id");
    assert_eq!(r.json()["error"]["data"]["retryable"], true);
    let (_, metrics) = admin(&stack.sidecar, "/metrics").await?;
    assert!(
        metrics.contains(r#"toolmesh_upstream_errors_total{server="demo",kind="connect"} 1"#),
        "{metrics}"
    );
    assert_eq!(admin(&stack.sidecar, "/live").await?.0, 200);
    Ok(())
}

#[tokio::test]
async fn admin_endpoints() -> Result<()> {
    let stack = Stack::start().await?;
    assert_eq!(echo(&stack.url()).await?, 200);
    let s = &stack.sidecar;
    assert_eq!(admin(s, "/live").await?.0, 200);
    let (status, ready) = admin(s, "/ready").await?;
    assert_eq!(status, 200);
    let (_, config) = admin(s, "/config").await?;
    let config: Value = serde_json::from_str(&config)?;
    assert!(
        ready.contains(config["version"].as_str().unwrap_or("?")),
        "{ready} vs {config}"
    );
    assert_eq!(config["identity"], toolmesh_tests::IDENTITY);
    assert_eq!(config["servers"][0]["name"], "demo");
    let (_, metrics) = admin(s, "/metrics").await?;
    for name in [
        "toolmesh_requests_total{server=\"demo\",method=\"tools/call\",outcome=\"ok\"} 1",
        "toolmesh_request_duration_seconds_bucket{server=\"demo\",method=\"tools/call\"",
        "toolmesh_active_streams{server=\"demo\"} 0",
        "toolmesh_config_info{version=",
        "toolmesh_config_last_load_timestamp_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    assert_eq!(admin(s, "/nope").await?.0, 404);
    let r = reqwest::Client::new()
        .post(s.admin_url("/ready"))
        .send()
        .await?;
    assert_eq!(r.status(), 405);
    Ok(())
}

#[tokio::test]
async fn sigterm_drains_in_flight_calls_then_exits() -> Result<()> {
    let mut stack = Stack::start_with(&[], &["--drain-timeout", "10s"]).await?;
    let url = stack.url();
    let slow = tokio::spawn(async move {
        let started = Instant::now();
        let r = post(
            &url,
            &borrow(&modern_headers("sleep")),
            modern_call(1, "sleep", json!({"ms": 1500})),
        )
        .await;
        (r, started.elapsed())
    });
    // The call is in flight once the upstream has it.
    let in_flight = eventually(5, || async {
        stack.server.proc.output.text().contains("call sleep")
    })
    .await;
    assert!(in_flight, "the call never reached the upstream");
    let pid = stack.sidecar.proc.pid().expect("running");
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;

    // While draining: not ready, and no new connections on the MCP port.
    let draining = eventually(5, || async {
        admin(&stack.sidecar, "/ready").await.map(|r| r.0).ok() == Some(503)
    })
    .await;
    assert!(draining, "{}", stack.sidecar.logs());
    // The listener closes right after /ready turns (two steps of one shutdown).
    let mcp = stack.sidecar.mcp;
    let closed = eventually(5, || async {
        tokio::net::TcpStream::connect(mcp).await.is_err()
    })
    .await;
    assert!(closed, "listener closed");

    let (reply, took) = slow.await?;
    let reply = reply?;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.message()["result"]["content"][0]["text"],
        "slept 1500 ms"
    );
    assert!(took >= Duration::from_millis(1500));
    let status = tokio::time::timeout(Duration::from_secs(10), stack.sidecar.proc.wait()).await??;
    assert!(status.success(), "{status}");
    assert!(
        stack.sidecar.logs().contains("all connections drained"),
        "{}",
        stack.sidecar.logs()
    );
    Ok(())
}

#[tokio::test]
async fn wait_ready_returns_once_the_sidecar_is_ready_and_fails_after_its_deadline() -> Result<()> {
    // What the injected postStart hook runs on clusters without native sidecars.
    let stack = Stack::start().await?;
    let binary = toolmesh_tests::binary("toolmesh-sidecar");
    let ok = tokio::process::Command::new(&binary)
        .args(["wait-ready", &stack.sidecar.admin.to_string(), "5"])
        .status()
        .await?;
    assert!(ok.success(), "{ok}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let started = Instant::now();
    let failed = tokio::process::Command::new(&binary)
        .args(["wait-ready", &closed.to_string(), "1"])
        .output()
        .await?;
    assert_eq!(failed.status.code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(String::from_utf8_lossy(&failed.stderr).contains("did not answer 200"));
    Ok(())
}

/// The library's entry point, served in this process: the same request path, started
/// on listeners the test bound, stopped by a future, every task ended when it returns.
#[tokio::test]
async fn a_sidecar_served_in_process_relays_audits_and_stops_cleanly() -> Result<()> {
    let server = toolmesh_tests::DemoServer::start(&[]).await?;
    let sidecar =
        toolmesh_tests::InProcessSidecar::start(&standalone_config("demo", &server.url()), &[])
            .await?;
    let ready = eventually(5, || async {
        reqwest::get(sidecar.admin_url("/ready"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready, "the config loaded");
    let r = post(
        &sidecar.url("demo"),
        &borrow(&modern_headers("echo")),
        modern_call(1, "echo", json!({"text": "in process"})),
    )
    .await?;
    assert_eq!(
        r.message()["result"]["content"][0]["text"],
        "in process",
        "{r:?}"
    );

    let mcp = sidecar.mcp;
    let started = Instant::now();
    let audit = sidecar.stop().await?;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        audit
            .iter()
            .any(|l| l["name"] == "echo" && l["decision"] == "allowed" && l["status"] == 200),
        "{audit:?}"
    );
    // Its port is closed: nothing it started outlives it.
    assert!(tokio::net::TcpStream::connect(mcp).await.is_err());
    Ok(())
}

/// A Job's agent beside a sidecar that is not a native one ends it with POST
/// /shutdown; nobody else can.
#[tokio::test]
async fn post_shutdown_from_the_pod_drains_and_exits_and_from_elsewhere_is_refused() -> Result<()> {
    let mut stack = Stack::start().await?;
    let client = reqwest::Client::new();
    let url = stack.sidecar.admin_url("/shutdown");
    let r = client.get(&url).send().await?;
    assert_eq!(r.status(), 405);
    let r = client
        .post(&url)
        .header("host", "evil.example:16020")
        .send()
        .await?;
    assert_eq!(r.status(), 403);
    assert_eq!(echo(&stack.url()).await?, 200, "still serving");

    let r = client.post(&url).send().await?;
    assert_eq!(r.status(), 202);
    let status = tokio::time::timeout(Duration::from_secs(10), stack.sidecar.proc.wait()).await??;
    assert!(status.success(), "{status}");
    assert!(
        stack
            .sidecar
            .logs()
            .contains("shutdown requested on the admin port")
    );
    Ok(())
}

#[tokio::test]
async fn wait_idle_returns_once_the_agents_last_call_has_finished() -> Result<()> {
    // What a legacy sidecar's preStop hook runs: the sidecar keeps serving until the
    // agent's calls are done.
    let stack = Stack::start().await?;
    let binary = toolmesh_tests::binary("toolmesh-sidecar");
    let (status, body) = admin(&stack.sidecar, "/idle").await?;
    assert_eq!((status, body.as_str()), (200, "idle\n"));
    let url = stack.url();
    let call = tokio::spawn(async move {
        let headers = modern_headers("sleep");
        post(
            &url,
            &borrow(&headers),
            modern_call(1, "sleep", serde_json::json!({"ms": 2500})),
        )
        .await
    });
    let busy = eventually(5, || async {
        admin(&stack.sidecar, "/idle")
            .await
            .is_ok_and(|(s, _)| s == 503)
    })
    .await;
    assert!(busy, "the call in flight never showed on /idle");
    let started = Instant::now();
    let waited = tokio::process::Command::new(&binary)
        .args(["wait-idle", &stack.sidecar.admin.to_string(), "20"])
        .status()
        .await?;
    assert!(waited.success(), "{waited}");
    assert!(
        call.is_finished(),
        "wait-idle returned while the call was in flight"
    );
    assert_eq!(call.await??.status, 200);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    // A sidecar that never goes idle does not hold the pod past the deadline.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let started = Instant::now();
    let gave_up = tokio::process::Command::new(&binary)
        .args(["wait-idle", &closed.to_string(), "1"])
        .output()
        .await?;
    assert!(gave_up.status.success());
    assert!(started.elapsed() < Duration::from_secs(5));
    Ok(())
}
