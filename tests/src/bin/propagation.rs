//! Propagation benchmark: how long a policy change takes to reach a fleet of sidecars.
//!
//! Starts the real `toolmesh-control-plane` (next to this binary; build both with
//! `make bench-propagation`), opens N snapshot streams from this one process, each
//! with its own identity, token and TCP connection, as N sidecars would, and ACKs every
//! push. Then, for a few rounds, applies a change through the admin API that alters
//! every identity's snapshot and measures, per simulated sidecar, the time from just
//! before the `Apply` call until its ACK for the new snapshot is sent (this includes the
//! control plane's debounce), and the time until the control plane's fleet status shows
//! every sidecar ACKed. Reports p50/p99/max and the control plane's peak RSS and CPU.
//!
//! It does not simulate what a real sidecar does with a snapshot (compiling it takes
//! microseconds and happens in parallel across pods); it measures the control plane.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use toolmesh_proto::v1alpha1 as pb;
use toolmesh_proto::v1alpha1::admin_service_client::AdminServiceClient;
use toolmesh_proto::v1alpha1::sidecar_message::Kind as Msg;
use toolmesh_proto::v1alpha1::snapshot_service_client::SnapshotServiceClient;
use toolmesh_tests::measure::{percentile, sibling, usage};
use toolmesh_tests::{Proc, TempDir};

#[derive(Debug, Parser)]
#[command(about = "Time for a policy change to reach N sidecars through the control plane")]
struct Args {
    /// Fleet sizes to measure, one control plane each (repeat the flag).
    #[arg(long = "sidecars", default_values_t = [1000usize])]
    sidecars: Vec<usize>,
    /// Changes applied per fleet size.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Servers in the store (each with a credential), all allowed to every sidecar.
    #[arg(long, default_value_t = 20)]
    servers: usize,
    /// Streams opened at once while the fleet connects.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
}

const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";

fn token(i: usize) -> String {
    format!("bench-sidecar-token-{i:08}")
}

fn identity(i: usize) -> String {
    format!("bench/sidecar-{i}")
}

/// The store: `servers` servers with secrets and one policy for `bench/*`.
fn resources(servers: usize, round: usize) -> String {
    let mut yaml = String::new();
    for s in 0..servers {
        yaml.push_str(&format!(
            "apiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {{name: server-{s}}}\nspec:\n  endpoints: [{{url: \"http://10.0.0.{}:8080/mcp\"}}]\n  credential: {{header: X-Api-Key, secretRef: {{name: key-{s}, key: key}}}}\n---\napiVersion: toolmesh.dev/v1alpha1\nkind: Secret\nmetadata: {{name: key-{s}}}\ndata: {{key: \"secret-value-{s}\"}}\n---\n",
            s % 250 + 1
        ));
    }
    let rules: Vec<String> = (0..servers)
        .map(|s| format!("{{server: server-{s}, tools: [\"echo\", \"tool-{round}\"]}}"))
        .collect();
    yaml.push_str(&format!(
        "apiVersion: toolmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: fleet}}\nspec:\n  subjects: [{{identity: \"bench/*\"}}]\n  rules: [{}]\n",
        rules.join(", ")
    ));
    yaml
}

/// A push as one simulated sidecar received and ACKed it.
struct Acked {
    at: Instant,
}

/// One simulated sidecar: connect, hello, ACK every push, report it.
async fn sidecar(
    i: usize,
    endpoint: Endpoint,
    acked: mpsc::UnboundedSender<Acked>,
    gate: Arc<Semaphore>,
) -> Result<()> {
    let permit = gate.acquire_owned().await?;
    let channel = endpoint.connect().await.context("connect")?;
    let mut client = SnapshotServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    let hello = pb::Hello {
        identity: identity(i),
        node: format!("node-{i}"),
        version: String::new(),
        gateway: false,
    };
    tx.send(pb::SidecarMessage {
        kind: Some(Msg::Hello(hello)),
    })
    .await?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {}", token(i)).parse()?);
    let mut pushes = client.stream(request).await?.into_inner();
    drop(permit);
    while let Some(push) = pushes.message().await? {
        let version = push.snapshot.map(|s| s.version).unwrap_or_default();
        tx.send(pb::SidecarMessage {
            kind: Some(Msg::Ack(pb::Ack {
                version,
                nonce: push.nonce,
            })),
        })
        .await?;
        let _ = acked.send(Acked { at: Instant::now() });
    }
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Wait until `n` ACK reports arrive; their times, relative to `since`.
async fn collect(
    acked: &mut mpsc::UnboundedReceiver<Acked>,
    n: usize,
    since: Instant,
    limit: Duration,
) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + limit;
    while times.len() < n {
        match tokio::time::timeout_at(deadline, acked.recv()).await {
            Ok(Some(a)) => times.push(a.at.saturating_duration_since(since)),
            Ok(None) => bail!("every simulated sidecar stream ended"),
            Err(_) => bail!(
                "only {} of {n} sidecars ACKed within {limit:?}",
                times.len()
            ),
        }
    }
    times.sort_unstable();
    Ok(times)
}

/// Poll the fleet status until `n` sidecars are connected and have ACKed what was sent.
async fn all_acked(admin: &mut AdminServiceClient<Channel>, n: usize) -> Result<()> {
    loop {
        // The whole fleet, page by page.
        let mut fleet = Vec::new();
        let mut page_token = String::new();
        loop {
            let mut req = tonic::Request::new(pb::StatusRequest {
                page_token,
                ..Default::default()
            });
            req.metadata_mut()
                .insert("authorization", format!("Bearer {ADMIN_TOKEN}").parse()?);
            let page = admin.status(req).await?.into_inner();
            fleet.extend(page.sidecars);
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let done = fleet
            .iter()
            .filter(|s| {
                s.connected && !s.sent_version.is_empty() && s.acked_version == s.sent_version
            })
            .count();
        if done >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn measure(args: &Args, n: usize) -> Result<()> {
    let dir = TempDir::new("propagation")?;
    let tokens = dir.0.join("tokens.yaml");
    let mut text = format!("admin: \"{ADMIN_TOKEN}\"\nsidecars:\n");
    for i in 0..n {
        text.push_str(&format!("  {}: \"{}\"\n", identity(i), token(i)));
    }
    std::fs::write(&tokens, text)?;
    let seed = dir.0.join("seed.yaml");
    std::fs::write(&seed, resources(args.servers, 0))?;

    let binary = sibling("toolmesh-control-plane")?;
    let mut cmd = tokio::process::Command::new(&binary);
    cmd.args([
        "serve",
        "--dev",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--log",
        "warn,toolmesh_control_plane::serve=info",
    ])
    .arg("--data-dir")
    .arg(dir.0.join("store"))
    .arg("--tokens")
    .arg(&tokens)
    .arg("--seed")
    .arg(&seed)
    .stdin(Stdio::null());
    let mut cp = Proc::spawn("toolmesh-control-plane", cmd)
        .with_context(|| format!("{} (run `make bench-propagation`)", binary.display()))?;
    let grpc: std::net::SocketAddr = cp
        .wait_for("its listening line", |line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            (v["message"] == "listening").then(|| v["grpc"].as_str()?.parse().ok())?
        })
        .await?;
    let pid = cp.pid().context("control plane pid")?;
    let url = format!("http://{grpc}");
    let (_, idle_rss, _) = usage(pid)?;

    let (tx, mut acked) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency));
    let endpoint = Endpoint::from_shared(url.clone())?.connect_timeout(Duration::from_secs(10));
    let started = Instant::now();
    let mut fleet = tokio::task::JoinSet::new();
    for i in 0..n {
        fleet.spawn(sidecar(i, endpoint.clone(), tx.clone(), gate.clone()));
    }
    drop(tx);
    let connect = tokio::select! {
        times = collect(&mut acked, n, started, Duration::from_secs(120)) => times?,
        Some(failed) = fleet.join_next() => bail!("a simulated sidecar stopped: {:?}", failed?),
    };
    let mut admin = AdminServiceClient::new(Endpoint::from_shared(url)?.connect().await?);
    all_acked(&mut admin, n).await?;
    let (_, connected_rss, cpu_before) = usage(pid)?;
    println!(
        "\n{n} sidecars x {} servers: all connected and ACKed their first snapshot in {} ms; control plane RSS {:.1} MiB idle, {:.1} MiB with the fleet",
        args.servers,
        ms(*connect.last().context("no sidecars")?),
        idle_rss as f64 / 1024.0,
        connected_rss as f64 / 1024.0,
    );
    println!(
        "{:>6} {:>10} {:>10} {:>10} {:>10} {:>16}",
        "round", "p50 ms", "p90 ms", "p99 ms", "max ms", "cp all-acked ms"
    );

    let mut every = Vec::with_capacity(n * args.rounds);
    for round in 1..=args.rounds {
        let mut req = tonic::Request::new(pb::ApplyRequest {
            yaml: resources(args.servers, round).into_bytes(),
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {ADMIN_TOKEN}").parse()?);
        let since = Instant::now();
        admin.apply(req).await?;
        let times = tokio::select! {
            times = collect(&mut acked, n, since, Duration::from_secs(60)) => times?,
            Some(failed) = fleet.join_next() => bail!("a simulated sidecar stopped: {:?}", failed?),
        };
        all_acked(&mut admin, n).await?;
        let seen = since.elapsed();
        println!(
            "{round:>6} {:>10} {:>10} {:>10} {:>10} {:>16}",
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.9)),
            ms(percentile(&times, 0.99)),
            ms(*times.last().context("no times")?),
            ms(seen)
        );
        every.extend(times);
        // Let the fleet settle so rounds do not overlap.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    every.sort_unstable();
    let (peak, _, cpu_after) = usage(pid)?;
    println!(
        "{:>6} {:>10} {:>10} {:>10} {:>10}",
        "all",
        ms(percentile(&every, 0.5)),
        ms(percentile(&every, 0.9)),
        ms(percentile(&every, 0.99)),
        ms(*every.last().context("no times")?)
    );
    println!(
        "control plane: peak RSS {:.1} MiB; CPU {:.2} s for {} rounds ({:.2} ms per sidecar per change)",
        peak as f64 / 1024.0,
        cpu_after - cpu_before,
        args.rounds,
        (cpu_after - cpu_before) * 1000.0 / (n * args.rounds) as f64
    );
    fleet.abort_all();
    cp.terminate().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    println!(
        "propagation benchmark: {} rounds per fleet size; latency from just before Apply to each sidecar's ACK (includes the 50 ms debounce)",
        args.rounds
    );
    for &n in &args.sidecars {
        measure(&args, n).await?;
    }
    Ok(())
}
