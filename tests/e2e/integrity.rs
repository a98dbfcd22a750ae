//! Control plane and fleet integrity, with the real binaries: a damaged state file is
//! never served, a snapshot that cannot be persisted is NACKed, limits agree from
//! apply to delivery, directories of any size apply and seed, a churning fleet stays
//! bounded, idle connections cannot starve the control plane, and toolmeshctl says
//! which step failed.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::mpsc;
use toolmesh_proto::v1alpha1 as pb;
use toolmesh_proto::v1alpha1::admin_service_client::AdminServiceClient;
use toolmesh_proto::v1alpha1::sidecar_message::Kind as Msg;
use toolmesh_tests::{
    ADMIN_TOKEN, ControlPlane, DemoServer, IDENTITY, SIDECAR_TOKEN, Sidecar, TempDir, binary,
    toolmeshctl,
};

use crate::support::{admin, call_demo, eventually, snapshot_stream};

/// The demo server and two policies for the test identity: one allowing `tools`, and
/// a later one denying `add` (the rule a cut state file would lose).
fn resources(url: &str, tools: &str) -> String {
    format!(
        r#"apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {{name: demo}}
spec:
  endpoints: [{{url: "{url}"}}]
  allowUnauthenticated: true
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: a-allow}}
spec:
  subjects: [{{identity: "{IDENTITY}"}}]
  rules: [{{server: demo, tools: {tools}}}]
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: z-deny}}
spec:
  subjects: [{{identity: "{IDENTITY}"}}]
  rules: [{{server: demo, tools: ["add"], action: deny}}]
"#
    )
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn a_damaged_state_file_is_never_served() -> Result<()> {
    let server = DemoServer::start(&[]).await?;
    let dir = TempDir::new("cp")?;
    let port = free_port()?;
    let mut cp = ControlPlane::start(&dir.0, port, &resources(&server.url(), r#"["*"]"#)).await?;
    let url = cp.url();
    let sidecar = Sidecar::connect(&url, SIDECAR_TOKEN, &[]).await?;
    assert!(
        eventually(10, || async {
            call_demo(&sidecar, "echo").await.ok() == Some((200, None))
        })
        .await
    );
    assert_eq!(call_demo(&sidecar, "add").await?, (200, Some(-32088)));
    let state = sidecar.stop().await?;
    cp.proc.terminate().await?;
    let file = state.0.join("state/snapshot.pb");
    let whole = std::fs::read(&file)?;

    // Cut short (here: mid-way, where the deny policy would be lost), a byte changed,
    // or a bare protobuf: each is refused, /ready says why, and nothing is served.
    let mut flipped = whole.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x20;
    let damages = [
        ("cut", whole[..whole.len() * 2 / 3].to_vec()),
        ("flipped", flipped),
        ("bare protobuf", whole[40..].to_vec()),
    ];
    let mut state = state;
    for (what, bytes) in damages {
        std::fs::write(&file, &bytes)?;
        let sidecar = Sidecar::connect_in(state, &url, SIDECAR_TOKEN, &[]).await?;
        let (status, ready) = admin(&sidecar, "/ready").await?;
        assert_eq!(status, 503, "{what}: {ready}");
        assert!(ready.contains("persisted snapshot"), "{what}: {ready}");
        assert_eq!(
            call_demo(&sidecar, "add").await?,
            (503, Some(-32087)),
            "{what}"
        );
        let (_, metrics) = admin(&sidecar, "/metrics").await?;
        assert_eq!(
            metric(
                &metrics,
                "toolmesh_state_file_errors_total{kind=\"damaged\"}"
            ),
            Some(1.0),
            "{what}: {metrics}"
        );
        state = sidecar.stop().await?;
    }
    assert_eq!(
        server.proc.output.text().matches("call add").count(),
        0,
        "the denied call never ran"
    );

    // The control plane comes back: it pushes (it does not believe the version the
    // sidecar announces) and the sidecar serves and persists again.
    std::fs::write(&file, &whole[..whole.len() / 2])?;
    let _cp = ControlPlane::start(&dir.0, port, &resources(&server.url(), r#"["*"]"#)).await?;
    let sidecar = Sidecar::connect_in(state, &url, SIDECAR_TOKEN, &[]).await?;
    assert!(
        eventually(15, || async {
            call_demo(&sidecar, "echo").await.ok() == Some((200, None))
        })
        .await,
        "{}",
        sidecar.logs()
    );
    assert_eq!(call_demo(&sidecar, "add").await?, (200, Some(-32088)));
    assert_eq!(std::fs::read(&file)?, whole, "rewritten whole");
    Ok(())
}

#[tokio::test]
async fn a_snapshot_that_cannot_be_persisted_is_nacked_and_nothing_looser_survives_a_restart()
-> Result<()> {
    let server = DemoServer::start(&[]).await?;
    let dir = TempDir::new("cp")?;
    let port = free_port()?;
    let mut cp = ControlPlane::start(
        &dir.0,
        port,
        &resources(&server.url(), r#"["echo", "sleep"]"#),
    )
    .await?;
    let url = cp.url();
    let sidecar = Sidecar::connect(&url, SIDECAR_TOKEN, &[]).await?;
    assert!(
        eventually(10, || async {
            call_demo(&sidecar, "sleep").await.ok() == Some((200, None))
        })
        .await
    );

    // The state file can no longer be written (as on a full or read-only volume; here
    // a directory stands where the temporary file must go, and root ignores modes).
    let state = sidecar.stop().await?;
    let tmp = state.0.join("state/snapshot.pb.tmp");
    std::fs::create_dir(&tmp)?;
    let sidecar = Sidecar::connect_in(state, &url, SIDECAR_TOKEN, &[]).await?;
    // It serves the persisted snapshot, then the control plane revokes `sleep`.
    assert_eq!(call_demo(&sidecar, "sleep").await?, (200, None));
    let revoke = resources(&server.url(), r#"["echo"]"#);
    let (ok, out, err) = cp.ctl(&["apply", "-f", "-"], Some(&revoke)).await?;
    assert!(ok, "{out}{err}");
    let nacked = eventually(10, || async {
        cp.ctl(&["status"], None)
            .await
            .is_ok_and(|(_, out, _)| out.contains("cannot persist"))
    })
    .await;
    assert!(nacked, "{}", cp.ctl(&["status"], None).await?.1);
    let (_, metrics) = admin(&sidecar, "/metrics").await?;
    assert!(
        metric(
            &metrics,
            "toolmesh_state_file_errors_total{kind=\"persist\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{metrics}"
    );

    // Restart with the control plane down: what loads is the snapshot it had (never
    // an older one than it served before the restart).
    cp.proc.terminate().await?;
    let state = sidecar.stop().await?;
    let sidecar = Sidecar::connect_in(state, &url, SIDECAR_TOKEN, &[]).await?;
    assert_eq!(admin(&sidecar, "/ready").await?.0, 200);
    assert_eq!(call_demo(&sidecar, "echo").await?, (200, None));

    // The control plane comes back while the state file still cannot be written: the
    // push is NACKed again and retried with backoff; once the disk is fixed, the
    // revocation lands, persists and is acknowledged without a reconnect.
    let state = sidecar.stop().await?;
    let cp = ControlPlane::start(&dir.0, port, &revoke).await?;
    let sidecar = Sidecar::connect_in(state, &url, SIDECAR_TOKEN, &[]).await?;
    let nacked = eventually(10, || async {
        cp.ctl(&["status"], None)
            .await
            .is_ok_and(|(_, out, _)| out.contains("cannot persist"))
    })
    .await;
    assert!(nacked, "{}", cp.ctl(&["status"], None).await?.1);
    assert_eq!(
        call_demo(&sidecar, "sleep").await?,
        (200, None),
        "NACKed: unchanged"
    );
    std::fs::remove_dir(tmp_dir(&sidecar))?;
    let revoked = eventually(15, || async {
        call_demo(&sidecar, "sleep").await.ok() == Some((200, Some(-32088)))
    })
    .await;
    assert!(revoked, "{}", sidecar.logs());
    assert!(sidecar.logs().contains("persisted on retry"));
    let acked = eventually(10, || async {
        cp.ctl(&["status"], None)
            .await
            .is_ok_and(|(_, out, _)| !out.contains("cannot persist") && out.contains("yes"))
    })
    .await;
    assert!(acked, "{}", cp.ctl(&["status"], None).await?.1);
    Ok(())
}

/// The temporary state file's path of a sidecar started by `Sidecar::connect_in`.
fn tmp_dir(sidecar: &Sidecar) -> std::path::PathBuf {
    sidecar
        .config
        .parent()
        .map(|d| d.join("state/snapshot.pb.tmp"))
        .unwrap_or_default()
}

/// `n` AccessPolicy files (each opening with `---`, as many do) and the server they name.
fn policy_dir(n: usize) -> Result<TempDir> {
    let dir = TempDir::new("policies")?;
    std::fs::write(
        dir.0.join("0000-server.yaml"),
        "---\napiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {name: s}\nspec:\n  endpoints: [{url: \"http://127.0.0.1:1/mcp\"}]\n  allowUnauthenticated: true\n",
    )?;
    for i in 0..n {
        std::fs::write(
            dir.0.join(format!("p{i:04}.yaml")),
            format!(
                "---\napiVersion: toolmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: p{i}}}\nspec:\n  subjects: [{{identity: \"team-{i}/*\"}}]\n  rules: [{{server: s, tools: [\"get_*\", \"list_*\"]}}]\n"
            ),
        )?;
    }
    Ok(dir)
}

#[tokio::test]
async fn directories_of_any_size_apply_and_seed_and_errors_name_the_file() -> Result<()> {
    let policies = policy_dir(1500)?;
    let dir = TempDir::new("cp")?;
    let cp = ControlPlane::start(&dir.0, 0, "").await?;
    let path = policies.0.to_string_lossy().into_owned();
    let started = Instant::now();
    let (ok, out, err) = cp.ctl(&["apply", "-f", &path], None).await?;
    println!("1,501 files applied in {:?}", started.elapsed());
    assert!(ok, "{err}");
    assert_eq!(out.lines().filter(|l| l.ends_with("created")).count(), 1501);
    let (ok, listed, _) = cp.ctl(&["get", "accesspolicy", "-o", "json"], None).await?;
    assert!(ok);
    let listed: serde_json::Value = serde_json::from_str(&listed)?;
    assert_eq!(listed.as_array().map(Vec::len), Some(1500));

    // Seeded at startup from the same directory.
    let seeded_dir = TempDir::new("cp-seeded")?;
    let mut cmd = ControlPlane::command(&seeded_dir.0, 0, "")?;
    cmd.arg("--seed").arg(&policies.0).arg("--dev");
    let mut seeded = toolmesh_tests::Proc::spawn("toolmesh-control-plane", cmd)?;
    seeded
        .wait_for("its listening line", |l| {
            l.contains("\"listening\"").then_some(())
        })
        .await?;
    assert!(seeded.output.text().matches("seeded").count() >= 1501);

    // One bad file among them: the error names it, and the resource or the document
    // (with its line) in it.
    for (bad, named) in [
        (
            "---\napiVersion: toolmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: bad}\nspec:\n  subjects: [{identity: x}]\n  rulez: []\n",
            "p0700.yaml: AccessPolicy/bad: spec.rulez",
        ),
        (
            "# a comment\n---\nkind: [unclosed\n",
            "p0700.yaml: document 0 (line 2): not valid YAML",
        ),
    ] {
        std::fs::write(policies.0.join("p0700.yaml"), bad)?;
        let (ok, _, err) = cp.ctl(&["apply", "-f", &path], None).await?;
        assert!(!ok && err.contains(named), "{err}");
    }
    Ok(())
}

#[tokio::test]
async fn an_apply_that_could_render_an_oversize_snapshot_is_refused_with_its_size() -> Result<()> {
    let dir = TempDir::new("cp")?;
    let cp = ControlPlane::start(&dir.0, 0, "").await?;
    // One 700 KB secret that 30 servers present: 21 MB in a snapshot that names them all.
    let mut yaml = format!(
        "apiVersion: toolmesh.dev/v1alpha1\nkind: Secret\nmetadata: {{name: big}}\ndata: {{key: \"{}\"}}\n",
        "k".repeat(700_000)
    );
    for i in 0..30 {
        yaml.push_str(&format!(
            "---\napiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {{name: s{i}}}\nspec:\n  endpoints: [{{url: \"https://s{i}.example.com/mcp\"}}]\n  credential: {{header: X-Key, secretRef: {{name: big, key: key}}}}\n---\napiVersion: toolmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: p{i}}}\nspec:\n  subjects: [{{identity: \"team/*\"}}]\n  rules: [{{server: s{i}, tools: [\"*\"]}}]\n"
        ));
    }
    let (ok, _, err) = cp.ctl(&["apply", "-f", "-"], Some(&yaml)).await?;
    assert!(!ok);
    assert!(
        err.contains("bytes") && err.contains(&toolmesh_proto::MAX_SNAPSHOT_BYTES.to_string()),
        "{err}"
    );
    let (_, servers, _) = cp.ctl(&["get", "mcpserver", "-o", "json"], None).await?;
    assert_eq!(servers.trim(), "[]", "nothing was stored");

    // Invalid UTF-8 is the caller's mistake, said so.
    let channel = tonic::transport::Channel::from_shared(cp.url())?
        .connect()
        .await?;
    let mut client = AdminServiceClient::new(channel);
    let mut req = tonic::Request::new(pb::ApplyRequest {
        yaml: b"kind: \xff\xfe\n".to_vec(),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN_TOKEN}").parse()?);
    let status = client.apply(req).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("UTF-8"), "{status:?}");
    Ok(())
}

/// One simulated sidecar lifetime: connect, take the first push, ACK it, go away.
async fn pod_lifetime(url: String, node: String) -> Result<()> {
    let (tx, mut stream) = snapshot_stream(&url, SIDECAR_TOKEN, IDENTITY, &node)
        .await?
        .map_err(|s| anyhow::anyhow!("refused: {s:?}"))?;
    let push = stream.message().await?.context("a push")?;
    tx.send(pb::SidecarMessage {
        kind: Some(Msg::Ack(pb::Ack {
            version: push.snapshot.map(|s| s.version).unwrap_or_default(),
            nonce: push.nonce,
        })),
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn ten_thousand_pod_lifetimes_leave_a_bounded_fleet_and_a_true_gauge() -> Result<()> {
    let server = DemoServer::start(&[]).await?;
    let dir = TempDir::new("cp")?;
    let mut cmd = ControlPlane::command(&dir.0, 0, &resources(&server.url(), r#"["*"]"#))?;
    cmd.args(["--dev", "--fleet-expiry", "1s"]);
    let mut proc = toolmesh_tests::Proc::spawn("toolmesh-control-plane", cmd)?;
    let (grpc, admin_addr): (std::net::SocketAddr, std::net::SocketAddr) = proc
        .wait_for("its listening line", |line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            (v["message"] == "listening").then(|| {
                Some((
                    v["grpc"].as_str()?.parse().ok()?,
                    v["admin"].as_str()?.parse().ok()?,
                ))
            })?
        })
        .await?;
    let url = format!("http://{grpc}");

    // One sidecar stays; 10,000 come and go, 100 at a time.
    let _alive = Sidecar::connect(&url, SIDECAR_TOKEN, &[]).await?;
    let started = Instant::now();
    let (tx, mut rx) = mpsc::channel::<Result<()>>(100);
    let mut launched = 0;
    let mut finished = 0;
    while finished < 10_000 {
        while launched < 10_000 && launched - finished < 100 {
            let (url, tx) = (url.clone(), tx.clone());
            let node = format!("pod-{launched}");
            tokio::spawn(async move {
                let _ = tx.send(pod_lifetime(url, node).await).await;
            });
            launched += 1;
        }
        rx.recv().await.context("a lifetime")??;
        finished += 1;
    }
    println!("10,000 pod lifetimes in {:?}", started.elapsed());

    let metrics_url = format!("http://{admin_addr}/metrics");
    let gauge_is_one = eventually(10, || async {
        let text = match reqwest::get(&metrics_url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => return false,
        };
        metric(&text, "toolmesh_cp_connected_sidecars") == Some(1.0)
    })
    .await;
    assert!(gauge_is_one, "the gauge follows connections");
    // After the expiry only the live sidecar is left, and status says so in one page.
    let forgotten = eventually(10, || async {
        toolmeshctl(&url, None, &["status"], None)
            .await
            .is_ok_and(|(ok, text, _)| ok && text.lines().count() == 2)
    })
    .await;
    let (_, text, _) = toolmeshctl(&url, None, &["status"], None).await?;
    assert!(forgotten, "header and the live sidecar only: {text}");
    assert!(text.contains("test-pod") && text.contains("yes"), "{text}");
    Ok(())
}

#[tokio::test]
async fn idle_connections_cannot_starve_the_control_plane() -> Result<()> {
    let server = DemoServer::start(&[]).await?;
    let dir = TempDir::new("cp")?;
    let port = free_port()?;
    // 256 descriptors for the whole process, 300 idle connections against it.
    let inner = ControlPlane::command(&dir.0, port, &resources(&server.url(), r#"["*"]"#))?;
    let program = inner.as_std().get_program().to_owned();
    let args: Vec<_> = inner.as_std().get_args().map(|a| a.to_owned()).collect();
    let mut cmd = tokio::process::Command::new("prlimit");
    cmd.args(["--nofile=256:256", "--"])
        .arg(program)
        .args(args)
        .args([
            "--dev",
            "--first-bytes-timeout",
            "1s",
            "--max-pending-connections",
            "64",
        ]);
    let mut proc = toolmesh_tests::Proc::spawn("toolmesh-control-plane", cmd)?;
    proc.wait_for("its listening line", |l| {
        l.contains("\"listening\"").then_some(())
    })
    .await?;
    let url = format!("http://127.0.0.1:{port}");

    let mut idle = Vec::new();
    for _ in 0..300 {
        if let Ok(c) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            idle.push(c);
        }
    }
    // A sidecar still gets its snapshot, and the admin API still answers.
    let started = Instant::now();
    let sidecar = Sidecar::connect(&url, SIDECAR_TOKEN, &[]).await?;
    let served = eventually(20, || async {
        call_demo(&sidecar, "echo").await.ok() == Some((200, None))
    })
    .await;
    assert!(served, "{}\n{}", sidecar.logs(), proc.output.text());
    println!(
        "a new sidecar was served {:?} into the flood",
        started.elapsed()
    );
    let (ok, _, err) = toolmeshctl(&url, None, &["status", "--timeout", "5s"], None).await?;
    assert!(ok, "{err}");
    drop(idle);
    Ok(())
}

#[tokio::test]
async fn toolmeshctl_says_which_step_failed() -> Result<()> {
    // A port that accepts and never answers: the connection step times out.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = silent.local_addr()?;
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    // Built (if need be) before the clock starts.
    let toolmeshctl = binary("toolmeshctl");
    let started = Instant::now();
    let out = tokio::process::Command::new(&toolmeshctl)
        .args([
            "status",
            "--timeout",
            "1s",
            "--server",
            &format!("http://{addr}"),
        ])
        .env("TOOLMESH_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .await?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        err.contains("timed out") || err.contains("did not answer"),
        "{err}"
    );
    hold.abort();

    // Nothing listening: the cause is named.
    let closed = free_port()?;
    let out = tokio::process::Command::new(&toolmeshctl)
        .args(["status", "--server", &format!("http://127.0.0.1:{closed}")])
        .env("TOOLMESH_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .await?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("connection refused"), "{err}");
    Ok(())
}
