//! The data-plane benchmark: the same MCP load, in one run on one machine, against
//!
//! - **direct**: `toolmesh-bench-upstream` itself;
//! - **sidecar**: `toolmesh-sidecar` in front of it with a realistic policy (50 rules,
//!   list filtering, rate limits that never trigger, credential injection, audit to a
//!   file);
//! - **nginx**: a plain reverse proxy that does not parse MCP (Debian's nginx, same
//!   worker count as the sidecar), the floor for "any proxy at all".
//!
//! Workloads: a small `tools/call` paced at `--rate` per second (the latency target)
//! and unpaced (throughput); a 1 MiB result; an SSE response of 100 progress events;
//! `tools/list` of 500 tools (filtered by the sidecar); `--clients` concurrent
//! 2025-11-25 sessions (each on its own connection, and sharing 64 connections as an
//! agent's connection pool would) and as many stateless 2026-07-28 clients. The load
//! generator is this process: HTTP/1.1, closed loop (each client sends its next
//! request when the last answer has fully arrived) except the paced run.
//! Every answer is checked (status 200, a JSON-RPC result); failures are counted.
//!
//! Reported per workload and target: throughput, latency percentiles, the proxy's CPU
//! time per 1,000 requests and its peak RSS; then the sidecar's ratios against direct
//! and against nginx. Also: the sidecar's idle RSS and its start-to-ready time from a
//! persisted snapshot (control plane down) and from a config file; and the second hop
//! (agent sidecar → server-side sidecar over mutual TLS → server) against the first,
//! for the paced and unpaced small calls; and gateway mode (a bearer JWT on every
//! request, policies matched per user) against the sidecar path, with 10,000 distinct
//! users' tokens in a minute for its memory; and tracing off, at 10% and at 100%
//! sampling (with `--baseline-sidecar`, also a build without tracing at all); and the
//! 500-tool `tools/list` relayed with every definition checked against its pin against
//! the same list without pins, on one sidecar; and a small call to a server whose
//! credential is an OAuth token the sidecar holds against one with a static header.
//!
//! Build and run with `make bench` (release binaries; installs nginx if missing).
//! It measures; it asserts nothing but that answers are correct.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::process::Command;
use tokio::sync::{Barrier, watch};
use toolmesh_tests::measure::{percentile, sibling, usage};
use toolmesh_tests::{Proc, TempDir};

#[derive(Debug, Clone, Parser)]
#[command(about = "The sidecar against the direct path and nginx, in one run")]
struct Args {
    /// Seconds each closed-loop workload runs against each target.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds of the paced latency run.
    #[arg(long, default_value_t = 10.0)]
    paced_duration: f64,
    /// Requests per second of the paced run.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Concurrent clients of the sessions and stateless workloads.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Worker threads of the sidecar and worker processes of nginx (the same CPU
    /// budget for both proxies).
    #[arg(long, default_value_t = 1)]
    proxy_workers: usize,
    /// Run only these workloads (repeat the flag): call-paced, call, big, sse, list,
    /// sessions, sessions-pooled, stateless, aggregate-call-paced, aggregate-call,
    /// aggregate-list, gateway-call, gateway-call-paced, gateway-users, trace-call,
    /// trace-call-paced, pinned-list, oauth-call, oauth-call-paced.
    #[arg(long = "workload")]
    workloads: Vec<String>,
    /// A sidecar binary built without tracing (e.g. from the commit before it), to
    /// measure what tracing costs when off; the tracing workloads add it as a target.
    #[arg(long, value_name = "PATH")]
    baseline_sidecar: Option<PathBuf>,
    /// Leave nginx out (when it is not installed).
    #[arg(long)]
    no_nginx: bool,
    /// Also write the Markdown report to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

const IDENTITY: &str = "agents/bench";
const SIDECAR_TOKEN: &str = "bench-sidecar-token-0123456789abcdef";
const ADMIN_TOKEN: &str = "bench-admin-token-0123456789abcdef";

/// What a workload asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Call {
    Small,
    Big,
    Progress,
    List,
}

#[derive(Debug, Clone)]
struct Workload {
    name: &'static str,
    what: String,
    call: Call,
    clients: usize,
    /// Total requests per second across clients; `None` is closed loop.
    rate: Option<u32>,
    /// 2025-11-25 sessions (initialize first) instead of stateless 2026-07-28 requests.
    sessions: bool,
    /// Clients share this many connections (default: one each).
    connections: Option<usize>,
    secs: f64,
}

/// Where a workload is sent.
#[derive(Debug)]
struct Target {
    name: &'static str,
    addr: SocketAddr,
    path: &'static str,
    /// The proxy process (none for direct).
    pid: Option<u32>,
    /// Put before tool names (the aggregated `/mcp` shows `bench__small`).
    prefix: &'static str,
    /// Requests sent at once, each on its own connection (and session), counted as one
    /// that ends with the last answer: the direct equivalent of the aggregate's fan-out.
    fan_out: usize,
    /// Bearer tokens sent (gateway mode).
    users: Users,
}

/// Which bearer token a request carries.
#[derive(Debug, Clone, Default)]
enum Users {
    /// None (the sidecar and direct paths).
    #[default]
    None,
    /// Each client its own user.
    PerClient(Arc<Vec<String>>),
    /// Every request the next user: as many distinct users as there are tokens.
    EveryRequest(Arc<Vec<String>>),
}

impl Users {
    fn token(&self, client: usize, clients: usize, id: u64) -> Option<&str> {
        match self {
            Users::None => None,
            Users::PerClient(t) => Some(&t[client % t.len()]),
            Users::EveryRequest(t) => {
                let n = usize::try_from(id).unwrap_or(0) * clients + client;
                Some(&t[n % t.len()])
            }
        }
    }
}

#[derive(Debug, Default)]
struct Outcome {
    ok: u64,
    failed: u64,
    secs: f64,
    latencies: Vec<Duration>,
    cpu_ms_per_1k: Option<f64>,
    peak_rss_kib: Option<u64>,
    error: Option<String>,
}

impl Outcome {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.secs
    }

    fn p(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            Duration::ZERO
        } else {
            percentile(&self.latencies, q)
        }
    }
}

/// The tool a call names (none for a list).
fn tool(call: Call) -> Option<&'static str> {
    match call {
        Call::List => None,
        Call::Small => Some("small"),
        Call::Big => Some("big"),
        Call::Progress => Some("progress"),
    }
}

fn body(call: Call, id: u64, sessions: bool, prefix: &str) -> Bytes {
    let name = tool(call).map(|t| format!("{prefix}{t}"));
    let (method, params) = match call {
        Call::List => ("tools/list", serde_json::json!({})),
        Call::Small => (
            "tools/call",
            serde_json::json!({"name": name, "arguments": {"text": "hello"}}),
        ),
        Call::Big => (
            "tools/call",
            serde_json::json!({"name": name, "arguments": {}}),
        ),
        Call::Progress => (
            "tools/call",
            serde_json::json!({"name": name, "arguments": {}, "_meta": {"progressToken": "p"}}),
        ),
    };
    let mut params = params;
    if !sessions {
        let meta = &mut params["_meta"];
        meta["io.modelcontextprotocol/protocolVersion"] = "2026-07-28".into();
        meta["io.modelcontextprotocol/clientCapabilities"] = serde_json::json!({});
        meta["io.modelcontextprotocol/clientInfo"] =
            serde_json::json!({"name": "toolmesh-bench", "version": "0"});
    }
    Bytes::from(
        serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
            .to_string(),
    )
}

fn request(
    target: &Target,
    call: Call,
    id: u64,
    session: Option<&str>,
    token: Option<&str>,
) -> Result<Request<Full<Bytes>>> {
    let mut req = Request::post(target.path)
        .header(header::HOST, target.addr.to_string())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json, text/event-stream");
    if let Some(token) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    req = match session {
        Some(session) => req
            .header("mcp-protocol-version", "2025-11-25")
            .header("mcp-session-id", session),
        None => {
            let req = req.header("mcp-protocol-version", "2026-07-28").header(
                "mcp-method",
                if call == Call::List {
                    "tools/list"
                } else {
                    "tools/call"
                },
            );
            match tool(call) {
                None => req,
                Some(tool) => req.header("mcp-name", format!("{}{tool}", target.prefix)),
            }
        }
    };
    Ok(req.body(Full::new(body(call, id, session.is_some(), target.prefix)))?)
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(send)
}

/// Send one request and read the whole answer; an error unless it is a 200 carrying
/// a JSON-RPC result. Returns the response's `Mcp-Session-Id`, if any.
async fn exchange(
    send: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<Option<String>> {
    send.ready().await?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    if status == 202 {
        // A notification's answer: no body to check.
        let _ = resp.into_body().collect().await?;
        return Ok(None);
    }
    let session = resp
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = resp.into_body();
    let (mut head, mut tail) = (Vec::new(), Bytes::new());
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if head.len() < 128 {
                head.extend_from_slice(&data[..data.len().min(128)]);
            }
            tail = data;
        }
    }
    let found = |b: &[u8]| b.windows(8).any(|w| w == b"\"result\"");
    let tail = &tail[tail.len().saturating_sub(512)..];
    if status != 200 || !(found(&head) || found(tail)) {
        bail!(
            "{status}: {}",
            String::from_utf8_lossy(&head[..head.len().min(200)])
        );
    }
    Ok(session)
}

type Shared = Arc<tokio::sync::Mutex<SendRequest<Full<Bytes>>>>;

/// A client's connection: its own, or one of a pool it shares with other sessions (as
/// an agent process with many sessions and a connection pool would).
enum Conn {
    Own(SendRequest<Full<Bytes>>),
    Shared(Shared),
}

impl Conn {
    async fn exchange(&mut self, req: Request<Full<Bytes>>) -> Result<Option<String>> {
        match self {
            Conn::Own(send) => exchange(send, req).await,
            Conn::Shared(shared) => exchange(&mut *shared.lock().await, req).await,
        }
    }

    /// After a failure the connection may be broken: replace it.
    async fn reconnect(&mut self, addr: SocketAddr) -> Result<()> {
        match self {
            Conn::Own(send) => *send = connect(addr).await?,
            Conn::Shared(shared) => *shared.lock().await = connect(addr).await?,
        }
        Ok(())
    }
}

/// One client: connect (and open a session), wait for the others, then send until
/// the deadline. Returns latencies and failures.
async fn client(
    target: Arc<Target>,
    w: Arc<Workload>,
    index: usize,
    pool: Option<Arc<Vec<Shared>>>,
    ready: Arc<Barrier>,
    mut go: watch::Receiver<Option<Instant>>,
) -> Result<(Vec<Duration>, u64, Option<String>)> {
    let mut sends = Vec::with_capacity(target.fan_out);
    let mut sessions = Vec::with_capacity(target.fan_out);
    for _ in 0..target.fan_out.max(1) {
        let mut send = match &pool {
            Some(pool) => Conn::Shared(pool[index % pool.len()].clone()),
            None => Conn::Own(connect(target.addr).await?),
        };
        sessions.push(if w.sessions {
            Some(open_session(&mut send, &target).await?)
        } else {
            None
        });
        sends.push(send);
    }
    ready.wait().await;
    let start = loop {
        if let Some(at) = *go.borrow_and_update() {
            break at;
        }
        go.changed().await?;
    };
    let deadline = start + Duration::from_secs_f64(w.secs);
    let mut latencies = Vec::with_capacity(4096);
    let (mut failed, mut error) = (0u64, None);
    let mut pace = w.rate.map(|rate| {
        let every = Duration::from_secs_f64(w.clients as f64 / rate as f64);
        // Spread the clients over the period so the load is even.
        let offset = every.mul_f64(index as f64 / w.clients as f64);
        let mut interval = tokio::time::interval_at((start + offset).into(), every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        interval
    });
    let mut id = 1u64;
    loop {
        if let Some(pace) = &mut pace {
            pace.tick().await;
        }
        if Instant::now() >= deadline {
            break;
        }
        id += 1;
        let token = target.users.token(index, w.clients, id);
        let reqs = sessions
            .iter()
            .map(|session| request(&target, w.call, id, session.as_deref(), token))
            .collect::<Result<Vec<_>>>()?;
        let sent = Instant::now();
        let answers = futures::future::join_all(
            sends
                .iter_mut()
                .zip(reqs)
                .map(|(send, req)| send.exchange(req)),
        )
        .await;
        let elapsed = sent.elapsed();
        match answers.into_iter().find_map(Result::err) {
            None => latencies.push(elapsed),
            Some(e) => {
                failed += 1;
                error.get_or_insert_with(|| e.to_string());
                for send in &mut sends {
                    send.reconnect(target.addr).await?;
                }
            }
        }
    }
    Ok((latencies, failed, error))
}

/// Open a 2025-11-25 session on `send`: its id.
async fn open_session(send: &mut Conn, target: &Target) -> Result<String> {
    let init = serde_json::json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "toolmesh-bench", "version": "0"}}});
    let req = Request::post(target.path)
        .header(header::HOST, target.addr.to_string())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json, text/event-stream")
        .body(Full::new(Bytes::from(init.to_string())))?;
    let session = send
        .exchange(req)
        .await?
        .context("initialize answered without a session id")?;
    let note = Request::post(target.path)
        .header(header::HOST, target.addr.to_string())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-11-25")
        .header("mcp-session-id", &session)
        .body(Full::new(Bytes::from_static(
            br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        )))?;
    send.exchange(note).await?;
    Ok(session)
}

/// Sample a process's RSS every 10 ms until `stop`; the peak in KiB.
fn sample_rss(pid: u32, mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut peak = 0;
        loop {
            if let Ok((_, rss, _)) = usage(pid) {
                peak = peak.max(rss);
            }
            tokio::select! {
                _ = stop.changed() => return peak,
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    })
}

async fn run(target: Arc<Target>, w: &Workload) -> Result<Outcome> {
    let w = Arc::new(w.clone());
    let ready = Arc::new(Barrier::new(w.clients + 1));
    let (go_tx, go) = watch::channel(None);
    let pool = match w.connections {
        Some(n) => {
            let mut pool = Vec::with_capacity(n);
            for _ in 0..n {
                pool.push(Arc::new(tokio::sync::Mutex::new(
                    connect(target.addr).await?,
                )));
            }
            Some(Arc::new(pool))
        }
        None => None,
    };
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..w.clients {
        clients.spawn(client(
            target.clone(),
            w.clone(),
            i,
            pool.clone(),
            ready.clone(),
            go.clone(),
        ));
    }
    // Every client connected (and initialized) before the clock starts.
    tokio::select! {
        _ = ready.wait() => {}
        Some(done) = clients.join_next() => {
            done??;
            bail!("a client ended before the start");
        }
    }
    let (stop_tx, stop) = watch::channel(false);
    let sampler = target.pid.map(|pid| sample_rss(pid, stop));
    let cpu_before = match target.pid {
        Some(pid) => Some(usage(pid)?.2),
        None => None,
    };
    let started = Instant::now();
    go_tx.send_replace(Some(started));
    let mut out = Outcome::default();
    while let Some(done) = clients.join_next().await {
        let (latencies, failed, error) = done??;
        out.ok += latencies.len() as u64;
        out.latencies.extend(latencies);
        out.failed += failed;
        if out.error.is_none() {
            out.error = error;
        }
    }
    out.secs = started.elapsed().as_secs_f64();
    if let (Some(pid), Some(before)) = (target.pid, cpu_before) {
        let cpu = usage(pid)?.2 - before;
        out.cpu_ms_per_1k = Some(cpu * 1000.0 / (out.ok.max(1) as f64 / 1000.0));
    }
    stop_tx.send_replace(true);
    if let Some(sampler) = sampler {
        out.peak_rss_kib = Some(sampler.await?);
    }
    out.latencies.sort_unstable();
    Ok(out)
}

/// The sidecar's resources: the bench server (with a credential) among ten others,
/// and one policy of 50 rules for this identity.
fn resources(upstream: &str) -> String {
    let mut yaml = format!(
        "apiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {{name: bench}}\nspec:\n  endpoints: [{{url: \"{upstream}\"}}]\n  credential: {{header: Authorization, secretRef: {{name: bench-token, key: token}}, prefix: \"Bearer \"}}\n---\napiVersion: toolmesh.dev/v1alpha1\nkind: Secret\nmetadata: {{name: bench-token}}\ndata: {{token: \"bench-upstream-credential\"}}\n"
    );
    for i in 0..10 {
        let _ = write!(
            yaml,
            "---\napiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {{name: other-{i}}}\nspec:\n  endpoints: [{{url: \"http://127.0.0.1:9/mcp\"}}]\n  allowUnauthenticated: true\n"
        );
    }
    yaml.push_str("---\napiVersion: toolmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: bench-agents}\nspec:\n  subjects: [{identity: \"agents/*\"}]\n  rules:\n");
    for i in 0..45 {
        let _ = writeln!(
            yaml,
            "    - {{server: other-{}, tools: [\"tool{i}_*\", \"x{i}\"]{}}}",
            i % 10,
            match i % 3 {
                0 => ", conditions: [{argument: \"mode\", matches: \"safe-*\"}]".to_owned(),
                1 => ", rateLimit: {requests: 100, per: 1s}".to_owned(),
                _ => String::new(),
            }
        );
    }
    yaml.push_str(
        "    - {server: bench, tools: [\"t4*\"], action: deny}\n\
         \x20   - {server: bench, tools: [\"t0*\", \"t1*\", \"t2*\", \"t3*\", \"t4*\"]}\n\
         \x20   - {server: bench, tools: [\"small\"], rateLimit: {requests: 100000000, per: 1s}}\n\
         \x20   - {server: bench, tools: [\"big\", \"progress\"], rateLimit: {requests: 100000000, per: 1s, scope: rule}}\n\
         \x20   - {server: bench, tools: [\"echo*\"], audit: {arguments: true}}\n",
    );
    yaml
}

/// `toolmesh-control-plane serve --dev` seeded with `seed`, with tokens for the
/// benchmark's agent identity and `others` (identity, token): the process and its URL.
async fn start_control_plane(
    dir: &Path,
    seed: &str,
    others: &[(&str, &str)],
) -> Result<(Proc, String)> {
    let seed_file = dir.join("seed.yaml");
    std::fs::write(&seed_file, seed)?;
    let mut tokens =
        format!("admin: \"{ADMIN_TOKEN}\"\nsidecars:\n  {IDENTITY}: \"{SIDECAR_TOKEN}\"\n");
    for (identity, token) in others {
        let _ = writeln!(tokens, "  {identity}: \"{token}\"");
    }
    let tokens_file = dir.join("tokens.yaml");
    std::fs::write(&tokens_file, tokens)?;
    let mut cmd = Command::new(sibling("toolmesh-control-plane")?);
    cmd.args([
        "serve",
        "--dev",
        "--log",
        "warn,toolmesh_control_plane::serve=info",
    ])
    .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
    .arg("--data-dir")
    .arg(dir.join("store"))
    .arg("--tokens")
    .arg(&tokens_file)
    .arg("--seed")
    .arg(&seed_file)
    .stdin(Stdio::null());
    let mut cp = Proc::spawn("toolmesh-control-plane", cmd)?;
    let grpc: SocketAddr = cp
        .wait_for("its listening line", |line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            (v["message"] == "listening").then(|| v["grpc"].as_str()?.parse().ok())?
        })
        .await?;
    Ok((cp, format!("http://{grpc}")))
}

/// Rounds of the two-hop comparison (targets take turns within each).
const TWO_HOP_ROUNDS: u32 = 3;

/// The identity of the two-hop run's server-side sidecar.
const SERVER_IDENTITY: &str = "tools/bench";
const SERVER_TOKEN: &str = "bench-server-token-0123456789abcdef";

/// The second hop: an agent sidecar reaching the upstream directly (`hop1`) and through
/// a server-side sidecar over mutual TLS (`hop2`), with the direct path, in one run.
async fn two_hop(args: &Args, direct: &Arc<Target>, upstream: &str) -> Result<String> {
    let dir = TempDir::new("bench-two-hop")?;
    let mesh = free_port()?;
    let seed = format!(
        "apiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {{name: hop1}}\nspec:\n  endpoints: [{{url: \"{upstream}\"}}]\n  allowUnauthenticated: true\n---\napiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {{name: hop2}}\nspec:\n  endpoints: [{{url: \"https://127.0.0.1:{mesh}/mcp/hop2\"}}]\n  mesh: {{identity: {SERVER_IDENTITY}}}\n---\napiVersion: toolmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: agents}}\nspec:\n  subjects: [{{identity: \"agents/*\"}}]\n  rules:\n    - {{server: hop1, tools: [\"*\"]}}\n    - {{server: hop2, tools: [\"*\"]}}\n"
    );
    let (_cp, url) = start_control_plane(&dir.0, &seed, &[(SERVER_IDENTITY, SERVER_TOKEN)]).await?;
    let server_token = dir.0.join("server.token");
    std::fs::write(&server_token, SERVER_TOKEN)?;
    let agent_token = dir.0.join("agent.token");
    std::fs::write(&agent_token, SIDECAR_TOKEN)?;

    let server_admin = free_port()?;
    let mut cmd = Command::new(sibling("toolmesh-sidecar")?);
    cmd.args([
        "--mode",
        "server",
        "--identity",
        SERVER_IDENTITY,
        "--log",
        "warn",
    ])
    .args(["--control-plane", &url, "--upstream", upstream])
    .args(["--mesh-listen", &format!("127.0.0.1:{mesh}")])
    .args(["--admin-listen", &format!("127.0.0.1:{server_admin}")])
    .args(["--workers", &args.proxy_workers.to_string()])
    .arg("--token-file")
    .arg(&server_token)
    // Audit to files, as in the other workloads: on stdout, every line would also
    // wake this process (the load generator) through the pipe it reads logs from,
    // twice per request through two hops and once through one.
    .arg("--audit-file")
    .arg(dir.0.join("server-audit.jsonl"));
    let (server, _) = time_to_ready(cmd, server_admin).await?;
    let (mcp, admin) = (free_port()?, free_port()?);
    let mut cmd = sidecar_command(args, mcp, admin)?;
    cmd.args(["--control-plane", &url])
        .arg("--token-file")
        .arg(&agent_token)
        .arg("--audit-file")
        .arg(dir.0.join("agent-audit.jsonl"));
    let (agent, _) = time_to_ready(cmd, admin).await?;
    let addr: SocketAddr = ([127, 0, 0, 1], mcp).into();
    let pid = agent.pid().context("agent sidecar pid")?;
    let targets = [
        direct.clone(),
        Arc::new(Target {
            name: "one hop",
            addr,
            path: "/mcp/hop1",
            pid: Some(pid),
            prefix: "",
            fan_out: 1,
            users: Users::None,
        }),
        Arc::new(Target {
            name: "two hops",
            addr,
            path: "/mcp/hop2",
            pid: Some(pid),
            prefix: "",
            fan_out: 1,
            users: Users::None,
        }),
    ];
    let mut report = format!(
        "## Two hops: agent sidecar → server-side sidecar (mutual TLS) → server\n\n\
         The same agent sidecar routes `hop1` straight to the upstream and `hop2` through a \
         server-side sidecar ({} worker(s)) over mutual TLS with workload certificates; CPU \
         and RSS columns are the agent sidecar's. Server-side sidecar RSS after the run: see below.\n\n",
        args.proxy_workers
    );
    for w in workloads(args)
        .into_iter()
        .filter(|w| w.name == "call-paced" || w.name == "call")
    {
        // Rounds, the targets taking turns, so a slow spell of the machine falls on all
        // three alike; the table merges the rounds.
        let round = Workload {
            secs: w.secs / TWO_HOP_ROUNDS as f64,
            ..w.clone()
        };
        let mut merged: Vec<Outcome> = targets.iter().map(|_| Outcome::default()).collect();
        let mut ratios = Vec::new();
        for _ in 0..TWO_HOP_ROUNDS {
            let mut p50 = Vec::new();
            for (target, total) in targets.iter().zip(merged.iter_mut()) {
                let mut outcome = run(target.clone(), &round)
                    .await
                    .with_context(|| format!("{} via {}", w.name, target.name))?;
                p50.push(outcome.p(0.5).as_secs_f64() * 1e6);
                total.ok += outcome.ok;
                total.failed += outcome.failed;
                total.secs += outcome.secs;
                total.latencies.append(&mut outcome.latencies);
                total.cpu_ms_per_1k = outcome.cpu_ms_per_1k;
                total.peak_rss_kib = total.peak_rss_kib.max(outcome.peak_rss_kib);
                if total.error.is_none() {
                    total.error = outcome.error;
                }
            }
            ratios.push((p50[2] - p50[1]) / (p50[1] - p50[0]));
        }
        for total in &mut merged {
            total.latencies.sort_unstable();
        }
        let results: Vec<(&Target, Outcome)> =
            targets.iter().map(|t| t.as_ref()).zip(merged).collect();
        report.push_str(&table(&w, &results));
        let p50 = |i: usize| results[i].1.p(0.5).as_secs_f64() * 1e6;
        let (first, second) = (p50(1) - p50(0), p50(2) - p50(1));
        let rounds: Vec<String> = ratios.iter().map(|r| format!("{r:.2}×")).collect();
        let _ = writeln!(
            report,
            "\nAdded p50 latency: first hop {first:+.0} µs, second hop {second:+.0} µs (second ÷ first {}; by round: {}).\n",
            ratio(second, first),
            rounds.join(", ")
        );
    }
    let server_rss = usage(server.pid().context("server sidecar pid")?)?.1;
    let _ = writeln!(
        report,
        "Server-side sidecar RSS after the run: {:.1} MiB.\n",
        server_rss as f64 / 1024.0
    );
    Ok(report)
}

/// The best of interleaved rounds: the highest throughput and, separately, the
/// lowest latency at each percentile (what the path can do, not the machine's noise).
fn best(rounds: Vec<Outcome>) -> Outcome {
    let mut out = Outcome::default();
    let mut best_rps = -1.0;
    let mut best_p50 = Duration::MAX;
    for o in rounds {
        out.failed += o.failed;
        if out.error.is_none() {
            out.error.clone_from(&o.error);
        }
        if o.p(0.5) < best_p50 {
            best_p50 = o.p(0.5);
            out.latencies.clone_from(&o.latencies);
        }
        if o.rps() > best_rps {
            best_rps = o.rps();
            (out.ok, out.secs) = (o.ok, o.secs);
            (out.cpu_ms_per_1k, out.peak_rss_kib) = (o.cpu_ms_per_1k, o.peak_rss_kib);
        }
    }
    out
}

/// Rows of `results`, and `a ÷ b` rows for each pair in `ratios`.
fn compare_table(title: &str, results: &[(&Target, Outcome)], ratios: &[(&str, &str)]) -> String {
    let mut t = format!(
        "### {title}\n\n| path | req/s | p50 | p90 | p99 | failed |\n|---|---:|---:|---:|---:|---:|\n"
    );
    for (target, o) in results {
        let _ = writeln!(
            t,
            "| {} | {:.0} | {} | {} | {} | {} |",
            target.name,
            o.rps(),
            us(o.p(0.5)),
            us(o.p(0.9)),
            us(o.p(0.99)),
            o.failed
        );
    }
    let find = |name: &str| results.iter().find(|(t, _)| t.name == name).map(|(_, o)| o);
    for (a, b) in ratios {
        let (Some(x), Some(y)) = (find(a), find(b)) else {
            continue;
        };
        let lat = |q| {
            format!(
                "{} ({:+.0} µs)",
                ratio(x.p(q).as_secs_f64(), y.p(q).as_secs_f64()),
                (x.p(q).as_secs_f64() - y.p(q).as_secs_f64()) * 1e6
            )
        };
        let _ = writeln!(
            t,
            "| {a} ÷ {b} | {} | {} | {} | {} | |",
            ratio(x.rps(), y.rps()),
            lat(0.5),
            lat(0.9),
            lat(0.99)
        );
    }
    for (target, o) in results {
        if let Some(e) = &o.error {
            let _ = writeln!(t, "\n{}: {} failed; first: `{e}`", target.name, o.failed);
        }
    }
    t
}

/// Rounds each comparison of the aggregate runs, interleaved.
const AGGREGATE_ROUNDS: usize = 2;

/// The aggregated `/mcp` against `/mcp/bench` on one sidecar (2025-11-25 sessions, the
/// best of interleaved rounds); and `tools/list` of 10 servers × 50 tools through the
/// aggregate, from its cache (the servers give a `ttlMs`) and without one, against one
/// such server's list direct.
async fn aggregate(args: &Args, config: &Path, audit: &Path) -> Result<String> {
    let mut report = String::from("## The aggregated `/mcp`\n\n");
    let (mut sidecar, addr) = start_sidecar(args, config, audit).await?;
    let pid = sidecar.pid().context("sidecar pid")?;
    let per_server = Arc::new(Target {
        name: "per-server",
        addr,
        path: "/mcp/bench",
        pid: Some(pid),
        prefix: "",
        fan_out: 1,
        users: Users::None,
    });
    let through = Arc::new(Target {
        name: "aggregate",
        addr,
        path: "/mcp",
        pid: Some(pid),
        prefix: "bench__",
        fan_out: 1,
        users: Users::None,
    });
    let calls = [
        Workload {
            name: "aggregate-call-paced",
            what: format!(
                "small `tools/call` in 2025-11-25 sessions, {} requests/s over 10 connections",
                args.rate
            ),
            call: Call::Small,
            clients: 10,
            rate: Some(args.rate),
            sessions: true,
            connections: None,
            secs: args.paced_duration,
        },
        Workload {
            name: "aggregate-call",
            what: "small `tools/call` in 2025-11-25 sessions, 16 connections, closed loop".into(),
            call: Call::Small,
            clients: 16,
            rate: None,
            sessions: true,
            connections: None,
            secs: args.duration,
        },
    ];
    for w in calls
        .iter()
        .filter(|w| args.workloads.is_empty() || args.workloads.iter().any(|n| n == w.name))
    {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..AGGREGATE_ROUNDS {
            a.push(run(per_server.clone(), w).await.context("per-server")?);
            b.push(run(through.clone(), w).await.context("aggregate")?);
        }
        let results = [(per_server.as_ref(), best(a)), (through.as_ref(), best(b))];
        let t = compare_table(
            &format!("{} — {}", w.name, w.what),
            &results,
            &[("aggregate", "per-server")],
        );
        println!("{t}");
        report.push_str(&t);
        report.push('\n');
    }
    sidecar.terminate().await?;

    let list = Workload {
        name: "aggregate-list",
        what: "`tools/list` of 10 servers × 50 tools, 2025-11-25 sessions, 200 requests/s over 4 connections".into(),
        call: Call::List,
        clients: 4,
        rate: Some(200),
        sessions: true,
        connections: None,
        secs: args.duration,
    };
    if !(args.workloads.is_empty() || args.workloads.iter().any(|n| n == list.name)) {
        return Ok(report);
    }
    let (_cached_up, cached_addr) =
        start_upstream(&["--tools", "50", "--list-ttl-ms", "60000"]).await?;
    let (_fresh_up, fresh_addr) = start_upstream(&["--tools", "50"]).await?;
    let dir = TempDir::new("bench-aggregate")?;
    let ten = |upstream: SocketAddr| {
        let mut yaml = String::new();
        for i in 0..10 {
            let _ = write!(
                yaml,
                "apiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {{name: s{i}}}\nspec: {{endpoints: [{{url: \"http://{upstream}/mcp\"}}], allowUnauthenticated: true}}\n---\n"
            );
        }
        yaml.push_str("apiVersion: toolmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: all}\nspec:\n  subjects: [{identity: \"agents/*\"}]\n  rules:\n");
        for i in 0..10 {
            let _ = writeln!(yaml, "    - {{server: s{i}, tools: [\"*\"]}}");
        }
        yaml
    };
    let (cached_config, fresh_config) = (dir.0.join("cached.yaml"), dir.0.join("fresh.yaml"));
    std::fs::write(&cached_config, ten(cached_addr))?;
    std::fs::write(&fresh_config, ten(fresh_addr))?;
    let (cached_sidecar, cached) = start_sidecar(args, &cached_config, audit).await?;
    let (fresh_sidecar, fresh) = start_sidecar(args, &fresh_config, audit).await?;
    let target = |name, addr, pid, fan_out| {
        Arc::new(Target {
            name,
            addr,
            path: "/mcp",
            pid,
            prefix: "",
            fan_out,
            users: Users::None,
        })
    };
    // The aggregate asks its ten servers at once: the time the slowest of them takes
    // then is the ten lists sent directly at once, until the last answer.
    let targets = [
        target("one server, direct", fresh_addr, None, 1),
        target("ten lists at once, direct", fresh_addr, None, 10),
        target("aggregate, cached", cached, cached_sidecar.pid(), 1),
        target("aggregate, uncached", fresh, fresh_sidecar.pid(), 1),
    ];
    let mut rounds: Vec<Vec<Outcome>> = targets.iter().map(|_| Vec::new()).collect();
    for _ in 0..AGGREGATE_ROUNDS {
        for (i, t) in targets.iter().enumerate() {
            rounds[i].push(run(t.clone(), &list).await.with_context(|| t.name)?);
        }
    }
    let results: Vec<(&Target, Outcome)> = targets
        .iter()
        .map(AsRef::as_ref)
        .zip(rounds.into_iter().map(best))
        .collect();
    let t = compare_table(
        &format!("{} — {}", list.name, list.what),
        &results,
        &[
            ("aggregate, uncached", "aggregate, cached"),
            ("aggregate, uncached", "one server, direct"),
            ("aggregate, uncached", "ten lists at once, direct"),
        ],
    );
    println!("{t}");
    report.push_str(&t);
    report.push('\n');
    Ok(report)
}

/// Rounds of the side-by-side comparisons below, interleaved.
const SIDE_BY_SIDE_ROUNDS: usize = 3;

/// One sidecar routing `/mcp/bench` as the other workloads do, and `path`
/// (`/mcp/<name>`) to the same upstream as the McpServer `name` whose spec ends with
/// `spec` (YAML lines under `spec:`), with a copy of the bench rules `rules` for it:
/// the process, its config's directory, and the two targets, named `labels`.
async fn beside_bench(
    args: &Args,
    upstream: &str,
    audit: &Path,
    (name, path): (&str, &'static str),
    spec: &str,
    rules: &str,
    labels: [&'static str; 2],
) -> Result<(Proc, TempDir, [Arc<Target>; 2])> {
    let mut yaml = resources(upstream).replace(
        rules,
        &format!(
            "{rules}{}",
            rules.replace("server: bench", &format!("server: {name}"))
        ),
    );
    let _ = write!(
        yaml,
        "---\napiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {{name: {name}}}\nspec:\n  endpoints: [{{url: \"{upstream}\"}}]\n{spec}"
    );
    let dir = TempDir::new(&format!("bench-{name}"))?;
    let config = dir.0.join(format!("{name}.yaml"));
    std::fs::write(&config, yaml)?;
    let (sidecar, addr) = start_sidecar(args, &config, audit).await?;
    let target = |name, path| {
        Arc::new(Target {
            name,
            addr,
            path,
            pid: sidecar.pid(),
            prefix: "",
            fan_out: 1,
            users: Users::None,
        })
    };
    let targets = [target(labels[0], "/mcp/bench"), target(labels[1], path)];
    Ok((sidecar, dir, targets))
}

/// `w` against both `targets` in interleaved rounds, the best of each: the table with
/// the second ÷ the first, and each one's CPU and memory.
async fn side_by_side(targets: &[Arc<Target>; 2], w: &Workload, title: &str) -> Result<String> {
    let mut rounds: Vec<Vec<Outcome>> = targets.iter().map(|_| Vec::new()).collect();
    for _ in 0..SIDE_BY_SIDE_ROUNDS {
        for (i, t) in targets.iter().enumerate() {
            rounds[i].push(run(t.clone(), w).await.with_context(|| t.name)?);
        }
    }
    let results: Vec<(&Target, Outcome)> = targets
        .iter()
        .map(AsRef::as_ref)
        .zip(rounds.into_iter().map(best))
        .collect();
    let mut out = compare_table(
        &format!(
            "{title} — {}, best of {SIDE_BY_SIDE_ROUNDS} interleaved rounds",
            w.what
        ),
        &results,
        &[(targets[1].name, targets[0].name)],
    );
    out.push_str(&costs(&results));
    out.push('\n');
    Ok(out)
}

/// The 500-tool `tools/list` through one sidecar twice: `/mcp/bench` as in the other
/// workloads, and `/mcp/pinned`, the same upstream and policy with a pin for every
/// tool (each one matching, so the list is the same 400 tools): what checking every
/// definition costs on the relay path.
async fn pinning(args: &Args, upstream: &str, audit: &Path) -> Result<String> {
    if !(args.workloads.is_empty() || args.workloads.iter().any(|n| n == "pinned-list")) {
        return Ok(String::new());
    }
    let every = Args {
        workloads: Vec::new(),
        ..args.clone()
    };
    let w = workloads(&every)
        .into_iter()
        .find(|w| w.name == "list")
        .context("the list workload")?;
    let addr: SocketAddr = upstream
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .context("upstream URL")?
        .parse()?;
    let direct = Target {
        name: "direct",
        addr,
        path: "/mcp",
        pid: None,
        prefix: "",
        fan_out: 1,
        users: Users::None,
    };
    let mut send = connect(addr).await?;
    let resp = send
        .send_request(request(&direct, Call::List, 1, None, None)?)
        .await?;
    let listed: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await?.to_bytes())?;
    let mut spec = String::from(
        "  credential: {header: Authorization, secretRef: {name: bench-token, key: token}, prefix: \"Bearer \"}\n  pins:\n    tools:\n",
    );
    for tool in listed["result"]["tools"]
        .as_array()
        .context("tools/list result")?
    {
        let name = tool["name"].as_str().context("tool name")?;
        let digest = toolmesh_proto::pin::digest(toolmesh_proto::pin::Kind::Tool, tool)?;
        let _ = writeln!(spec, "      {name}: {{digest: \"{digest}\"}}");
    }
    let rules = "    - {server: bench, tools: [\"t4*\"], action: deny}\n\
         \x20   - {server: bench, tools: [\"t0*\", \"t1*\", \"t2*\", \"t3*\", \"t4*\"]}\n";
    let (mut sidecar, _dir, targets) = beside_bench(
        args,
        upstream,
        audit,
        ("pinned", "/mcp/pinned"),
        &spec,
        rules,
        ["no pins", "500 pins"],
    )
    .await?;
    let mut report = String::from("## Pinned definitions\n\n");
    report.push_str(&side_by_side(&targets, &w, "pinned-list").await?);
    println!("{report}");
    sidecar.terminate().await?;
    Ok(report)
}

/// The small call through one sidecar to `/mcp/bench` (a static `Authorization`
/// header from a Secret) and to `/mcp/oauth` (the same upstream, its token from the
/// upstream's `/token` as `spec.oauth` client credentials, fetched once and cached):
/// what holding an OAuth token costs a call.
async fn oauth_tokens(args: &Args, upstream: &str, audit: &Path) -> Result<String> {
    let names = ["oauth-call", "oauth-call-paced"];
    if !(args.workloads.is_empty() || args.workloads.iter().any(|n| names.contains(&n.as_str()))) {
        return Ok(String::new());
    }
    let base = upstream.strip_suffix("/mcp").context("upstream URL")?;
    let spec = format!(
        "  oauth: {{grant: client-credentials, tokenUrl: \"{base}/token\", clientId: bench, clientSecretRef: {{name: bench-token, key: token}}}}\n"
    );
    let rules =
        "    - {server: bench, tools: [\"small\"], rateLimit: {requests: 100000000, per: 1s}}\n";
    let (mut sidecar, _dir, targets) = beside_bench(
        args,
        upstream,
        audit,
        ("oauth", "/mcp/oauth"),
        &spec,
        rules,
        ["static header", "OAuth token"],
    )
    .await?;
    let mut report = String::from("## Upstream OAuth tokens\n\n");
    for w in small_calls(
        args,
        ["oauth-call", "oauth-call-paced"],
        ("stateless `tools/call`", "connections"),
    )
    .into_iter()
    .filter(|w| args.workloads.is_empty() || args.workloads.iter().any(|n| n == w.name))
    {
        report.push_str(&side_by_side(&targets, &w, w.name).await?);
    }
    let requests = get_text(base, "/token-requests").await?;
    let _ = writeln!(
        report,
        "Token requests the upstream answered over the whole run: {requests}.\n"
    );
    println!("{report}");
    sidecar.terminate().await?;
    Ok(report)
}

/// GET `path` on `base` (`http://host:port`) with this file's own client: the body.
async fn get_text(base: &str, path: &str) -> Result<String> {
    let addr: SocketAddr = base.strip_prefix("http://").context("http URL")?.parse()?;
    let mut send = connect(addr).await?;
    let req = Request::get(path)
        .header(header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))?;
    let resp = send.send_request(req).await?;
    Ok(String::from_utf8_lossy(&resp.into_body().collect().await?.to_bytes()).into_owned())
}

/// Distinct users whose tokens the gateway sees within a minute (the memory run).
const GATEWAY_USERS: usize = 10_000;

/// Gateway mode against the sidecar path, in one run: the same small stateless call,
/// the gateway with a bearer JWT (ES256, from an issuer in this process) on every
/// request and its policy matched per user; then 10,000 distinct users' tokens in a
/// minute, for the gateway's memory.
async fn gateway(args: &Args, upstream: &str, audit: &Path) -> Result<String> {
    let names = ["gateway-call", "gateway-call-paced", "gateway-users"];
    if !(args.workloads.is_empty() || args.workloads.iter().any(|n| names.contains(&n.as_str()))) {
        return Ok(String::new());
    }
    let mut report = String::from("## Gateway mode\n\n");
    let issuer = toolmesh_tests::issuer::Issuer::start().await?;
    let dir = TempDir::new("bench-gateway")?;
    let sidecar_config = dir.0.join("sidecar.yaml");
    std::fs::write(&sidecar_config, resources(upstream))?;
    let gateway_config = dir.0.join("gateway.yaml");
    let subjects = "subjects: [{identity: \"agents/*\"}]";
    let users = format!(
        "subjects: [{{user: \"user-*\", issuer: \"{}\"}}]",
        issuer.url
    );
    std::fs::write(
        &gateway_config,
        resources(upstream).replace(subjects, &users),
    )?;

    let start_gateway = || async {
        let (mcp, admin) = (free_port()?, free_port()?);
        let mut cmd = Command::new(sibling("toolmesh-sidecar")?);
        cmd.args([
            "--mode",
            "gateway",
            "--identity",
            "bench/gateway",
            "--log",
            "warn",
        ])
        .args(["--listen", &format!("127.0.0.1:{mcp}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--workers", &args.proxy_workers.to_string()])
        .args(["--issuer", &issuer.url])
        .args(["--resource", &format!("http://127.0.0.1:{mcp}")])
        .arg("--config")
        .arg(&gateway_config)
        .arg("--audit-file")
        .arg(audit);
        let (proc, _) = time_to_ready(cmd, admin).await?;
        anyhow::Ok((proc, mcp))
    };
    let tokens = |n: usize, port: u16| -> Result<Arc<Vec<String>>> {
        let aud = format!("http://127.0.0.1:{port}");
        Ok(Arc::new(
            (0..n)
                .map(|i| issuer.token(&format!("user-{i}"), &aud))
                .collect::<Result<_>>()?,
        ))
    };
    let target = |name, port: u16, pid, users| {
        Arc::new(Target {
            name,
            addr: ([127, 0, 0, 1], port).into(),
            path: "/mcp/bench",
            pid,
            prefix: "",
            fan_out: 1,
            users,
        })
    };
    let calls = small_calls(
        args,
        ["gateway-call", "gateway-call-paced"],
        ("stateless `tools/call`", "clients (as many users)"),
    );
    for w in calls
        .iter()
        .filter(|w| args.workloads.is_empty() || args.workloads.iter().any(|n| n == w.name))
    {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..AGGREGATE_ROUNDS {
            let (mut sidecar, addr) = start_sidecar(args, &sidecar_config, audit).await?;
            let through_sidecar = target("sidecar", addr.port(), sidecar.pid(), Users::None);
            a.push(run(through_sidecar, w).await.context("sidecar")?);
            sidecar.terminate().await?;
            let (mut gw, port) = start_gateway().await?;
            let users = Users::PerClient(tokens(w.clients, port)?);
            b.push(
                run(target("gateway", port, gw.pid(), users), w)
                    .await
                    .context("gateway")?,
            );
            gw.terminate().await?;
        }
        let sidecar_dummy = target("sidecar", 0, None, Users::None);
        let gateway_dummy = target("gateway", 0, None, Users::None);
        let results = [
            (sidecar_dummy.as_ref(), best(a)),
            (gateway_dummy.as_ref(), best(b)),
        ];
        let mut t = compare_table(
            &format!("{} — {}", w.name, w.what),
            &results,
            &[("gateway", "sidecar")],
        );
        t.push_str(&costs(&results));
        println!("{t}");
        report.push_str(&t);
        report.push('\n');
    }

    if args.workloads.is_empty() || args.workloads.iter().any(|n| n == "gateway-users") {
        let (mut gw, port) = start_gateway().await?;
        let pid = gw.pid().context("gateway pid")?;
        let made = Instant::now();
        let all = tokens(GATEWAY_USERS, port)?;
        let minted = made.elapsed();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let idle = usage(pid)?.1;
        let w = Workload {
            name: "gateway-users",
            what: format!(
                "{GATEWAY_USERS} distinct users' tokens in a minute, each request the next user"
            ),
            call: Call::Small,
            clients: 10,
            rate: Some(u32::try_from(GATEWAY_USERS / 60 + 1).unwrap_or(u32::MAX)),
            sessions: false,
            connections: None,
            secs: 60.0,
        };
        let o = run(
            target("gateway", port, Some(pid), Users::EveryRequest(all)),
            &w,
        )
        .await?;
        let after = usage(pid)?.1;
        gw.terminate().await?;
        let t = format!(
            "### {} — {}\n\n{} requests ({} failed), p50 {}, p99 {}. Gateway RSS: {:.1} MiB before, peak {:.1} MiB, {:.1} MiB after ({} tokens minted in {:.1} s by the load generator).\n",
            w.name,
            w.what,
            o.ok,
            o.failed,
            us(o.p(0.5)),
            us(o.p(0.99)),
            idle as f64 / 1024.0,
            o.peak_rss_kib.unwrap_or_default() as f64 / 1024.0,
            after as f64 / 1024.0,
            GATEWAY_USERS,
            minted.as_secs_f64()
        );
        println!("{t}");
        report.push_str(&t);
        report.push('\n');
    }
    Ok(report)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_upstream(extra: &[&str]) -> Result<(Proc, SocketAddr)> {
    let mut cmd = Command::new(sibling("toolmesh-bench-upstream")?);
    cmd.args(["--listen", "127.0.0.1:0", "--workers", "1"])
        .args(extra);
    let mut proc = Proc::spawn("toolmesh-bench-upstream", cmd)?;
    let addr = proc
        .wait_for("its listening line", toolmesh_tests::listening_on)
        .await?;
    Ok((proc, addr))
}

fn sidecar_command(args: &Args, mcp: u16, admin: u16) -> Result<Command> {
    Ok(sidecar_command_of(
        &sibling("toolmesh-sidecar")?,
        args,
        mcp,
        admin,
    ))
}

/// [`sidecar_command`] running `binary` (another build of the sidecar).
fn sidecar_command_of(binary: &Path, args: &Args, mcp: u16, admin: u16) -> Command {
    let mut cmd = Command::new(binary);
    cmd.args(["--identity", IDENTITY, "--log", "warn"])
        .args(["--listen", &format!("127.0.0.1:{mcp}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--workers", &args.proxy_workers.to_string()]);
    cmd
}

/// Start `cmd` and time it until `GET /ready` on `admin` answers 200.
async fn time_to_ready(cmd: Command, admin: u16) -> Result<(Proc, Duration)> {
    let started = Instant::now();
    let proc = Proc::spawn("toolmesh-sidecar", cmd)?;
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{admin}/ready");
    loop {
        if let Ok(r) = client.get(&url).send().await
            && r.status() == 200
        {
            return Ok((proc, started.elapsed()));
        }
        if started.elapsed() > Duration::from_secs(10) {
            bail!("not ready after 10 s:\n{}", proc.output.text());
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// Start-to-ready, median and max of `rounds`: from a persisted snapshot with the
/// control plane down, and from a config file.
async fn startup(args: &Args, dir: &Path, upstream: &str) -> Result<String> {
    let (mut cp, url) = start_control_plane(dir, &resources(upstream), &[]).await?;
    let token_file = dir.join("sidecar.token");
    std::fs::write(&token_file, SIDECAR_TOKEN)?;
    let state = dir.join("state");
    let connected = || -> Result<(Command, u16)> {
        let (mcp, admin) = (free_port()?, free_port()?);
        let mut cmd = sidecar_command(args, mcp, admin)?;
        cmd.args(["--control-plane", &url])
            .arg("--token-file")
            .arg(&token_file)
            .arg("--state-dir")
            .arg(&state);
        Ok((cmd, admin))
    };
    // Once with the control plane up, to persist a snapshot.
    let (first, admin) = connected()?;
    let (mut sidecar, online) = time_to_ready(first, admin).await?;
    sidecar.terminate().await?;
    cp.terminate().await?;
    let rounds = 10;
    let mut persisted = Vec::new();
    for _ in 0..rounds {
        // The control plane is gone: its address refuses connections.
        let (cmd, admin) = connected()?;
        let (mut sidecar, took) = time_to_ready(cmd, admin).await?;
        persisted.push(took);
        sidecar.terminate().await?;
    }
    let config = dir.join("config.yaml");
    std::fs::write(&config, resources(upstream))?;
    let mut from_file = Vec::new();
    for _ in 0..rounds {
        let (mcp, admin) = (free_port()?, free_port()?);
        let mut cmd = sidecar_command(args, mcp, admin)?;
        cmd.arg("--config").arg(&config);
        let (mut sidecar, took) = time_to_ready(cmd, admin).await?;
        from_file.push(took);
        sidecar.terminate().await?;
    }
    persisted.sort_unstable();
    from_file.sort_unstable();
    Ok(format!(
        "| start to ready | median | max |\n|---|---:|---:|\n\
         | from a persisted snapshot, control plane down ({rounds} starts) | {} | {} |\n\
         | from a config file ({rounds} starts) | {} | {} |\n\
         | first start, snapshot from the control plane | {} | |\n",
        ms(percentile(&persisted, 0.5)),
        ms(persisted[rounds - 1]),
        ms(percentile(&from_file, 0.5)),
        ms(from_file[rounds - 1]),
        ms(online),
    ))
}

fn nginx_conf(dir: &Path, listen: u16, upstream: SocketAddr, workers: usize) -> String {
    let d = dir.display();
    format!(
        "worker_processes {workers};\n\
         daemon off;\n\
         master_process on;\n\
         pid {d}/nginx.pid;\n\
         error_log stderr warn;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n\
         \x20 access_log off;\n\
         \x20 client_body_temp_path {d}/body;\n\
         \x20 proxy_temp_path {d}/proxy;\n\
         \x20 fastcgi_temp_path {d}/fastcgi;\n\
         \x20 uwsgi_temp_path {d}/uwsgi;\n\
         \x20 scgi_temp_path {d}/scgi;\n\
         \x20 keepalive_requests 100000000;\n\
         \x20 keepalive_timeout 300s;\n\
         \x20 upstream bench {{ server {upstream}; keepalive 1024; keepalive_requests 100000000; }}\n\
         \x20 server {{\n\
         \x20   listen 127.0.0.1:{listen} backlog=1024;\n\
         \x20   location /mcp/bench {{\n\
         \x20     proxy_pass http://bench/mcp;\n\
         \x20     proxy_http_version 1.1;\n\
         \x20     proxy_set_header Connection \"\";\n\
         \x20     proxy_buffering off;\n\
         \x20     proxy_request_buffering off;\n\
         \x20   }}\n\
         \x20 }}\n\
         }}\n"
    )
}

async fn start_nginx(dir: &Path, upstream: SocketAddr, workers: usize) -> Result<(Proc, u16)> {
    let port = free_port()?;
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(dir, port, upstream, workers))?;
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("nginx is not installed (apt-get install nginx-light, or pass --no-nginx)")?;
    let mut cmd = Command::new(nginx);
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg("stderr");
    let proc = Proc::spawn("nginx", cmd)?;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok((proc, port));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("nginx did not listen:\n{}", proc.output.text())
}

/// nginx's worker: the process that does the proxying (the master only supervises).
fn nginx_worker(master: u32) -> Option<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{master}/task/{master}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn workloads(args: &Args) -> Vec<Workload> {
    let w = |name, what: String, call, clients, rate, sessions, secs| Workload {
        name,
        what,
        call,
        clients,
        rate,
        sessions,
        connections: None,
        secs,
    };
    // `--clients` clients making small calls.
    let crowd = |name, what: &str, sessions, connections| Workload {
        connections,
        ..w(
            name,
            format!("{} {what}, small `tools/call`", args.clients),
            Call::Small,
            args.clients,
            None,
            sessions,
            args.duration,
        )
    };
    let all = vec![
        w(
            "call-paced",
            format!(
                "small `tools/call`, {} requests/s over 10 connections",
                args.rate
            ),
            Call::Small,
            10,
            Some(args.rate),
            false,
            args.paced_duration,
        ),
        w(
            "call",
            "small `tools/call`, 16 connections, closed loop".into(),
            Call::Small,
            16,
            None,
            false,
            args.duration,
        ),
        w(
            "big",
            "`tools/call` with a 1 MiB result, 4 connections".into(),
            Call::Big,
            4,
            None,
            false,
            args.duration,
        ),
        w(
            "sse",
            "SSE response of 100 progress events + result, 8 connections".into(),
            Call::Progress,
            8,
            None,
            false,
            args.duration,
        ),
        w(
            "list",
            "`tools/list` of 500 tools (the sidecar filters to 400), 8 connections".into(),
            Call::List,
            8,
            None,
            false,
            args.duration,
        ),
        crowd("sessions", "concurrent 2025-11-25 sessions", true, None),
        crowd(
            "sessions-pooled",
            "concurrent 2025-11-25 sessions sharing 64 connections",
            true,
            Some(64),
        ),
        crowd(
            "stateless",
            "concurrent stateless 2026-07-28 clients",
            false,
            None,
        ),
    ];
    all.into_iter()
        .filter(|w| args.workloads.is_empty() || args.workloads.iter().any(|n| n == w.name))
        .collect()
}

fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        "–".into()
    } else {
        format!("{:.2}×", a / b)
    }
}

fn table(w: &Workload, results: &[(&Target, Outcome)]) -> String {
    let mut t = format!(
        "### {} — {}\n\n| path | req/s | p50 | p90 | p99 | p99.9 | proxy CPU ms / 1k req | proxy peak RSS | failed |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        w.name, w.what
    );
    for (target, o) in results {
        let _ = writeln!(
            t,
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
            target.name,
            o.rps(),
            us(o.p(0.5)),
            us(o.p(0.9)),
            us(o.p(0.99)),
            us(o.p(0.999)),
            o.cpu_ms_per_1k.map_or("–".into(), |c| format!("{c:.1}")),
            o.peak_rss_kib
                .map_or("–".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            o.failed,
        );
    }
    let find = |name| results.iter().find(|(t, _)| t.name == name).map(|(_, o)| o);
    if let Some(side) = find("sidecar") {
        for base in ["direct", "nginx"] {
            let Some(b) = find(base) else { continue };
            let lat = |q| {
                let (s, d) = (side.p(q), b.p(q));
                format!(
                    "{} ({:+.0} µs)",
                    ratio(s.as_secs_f64(), d.as_secs_f64()),
                    (s.as_secs_f64() - d.as_secs_f64()) * 1e6
                )
            };
            let _ = writeln!(
                t,
                "| sidecar ÷ {base} | {} | {} | {} | {} | {} | {} | {} | |",
                ratio(side.rps(), b.rps()),
                lat(0.5),
                lat(0.9),
                lat(0.99),
                lat(0.999),
                match (side.cpu_ms_per_1k, b.cpu_ms_per_1k) {
                    (Some(s), Some(n)) => ratio(s, n),
                    _ => "–".into(),
                },
                match (side.peak_rss_kib, b.peak_rss_kib) {
                    (Some(s), Some(n)) => ratio(s as f64, n as f64),
                    _ => "–".into(),
                },
            );
        }
    }
    for (target, o) in results {
        if let Some(e) = &o.error {
            let _ = writeln!(t, "\n{}: {} failed; first: `{e}`", target.name, o.failed);
        }
    }
    t
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} × {cpu}, Linux {}", kernel.trim())
}

fn main() -> Result<()> {
    let args = Args::parse();
    // The load generator gets its own threads; the proxies are separate processes.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(bench(args))
}

/// Each target's CPU per 1,000 requests and peak RSS, a line each, after a table.
fn costs(results: &[(&Target, Outcome)]) -> String {
    let mut t = String::new();
    for (who, o) in results {
        let _ = writeln!(
            t,
            "\n{}: CPU {:.0} ms per 1,000 requests, peak RSS {:.1} MiB.",
            who.name,
            o.cpu_ms_per_1k.unwrap_or_default(),
            o.peak_rss_kib.unwrap_or_default() as f64 / 1024.0
        );
    }
    t
}

/// The small call closed-loop over 16 `over`, and paced at `--rate` over 10, named
/// `names`: how the gateway and tracing sections compare their targets.
fn small_calls(args: &Args, names: [&'static str; 2], (call, over): (&str, &str)) -> [Workload; 2] {
    [
        Workload {
            name: names[0],
            what: format!("small {call}, 16 {over}, closed loop"),
            call: Call::Small,
            clients: 16,
            rate: None,
            sessions: false,
            connections: None,
            secs: args.duration,
        },
        Workload {
            name: names[1],
            what: format!("small {call}, {} requests/s over 10 {over}", args.rate),
            call: Call::Small,
            clients: 10,
            rate: Some(args.rate),
            sessions: false,
            connections: None,
            secs: args.paced_duration,
        },
    ]
}

/// Rounds of each tracing workload, interleaved; the best of each is reported.
const TRACE_ROUNDS: usize = 3;

/// The sidecar with tracing off, on at 0% (what a request nobody records costs), 10%
/// and 100% sampling (exporting to an
/// OTLP receiver in this process, which counts and drops what it gets), and, given
/// `--baseline-sidecar`, a sidecar without tracing at all: small calls, unpaced and
/// paced, the best of interleaved rounds.
async fn tracing(args: &Args, config: &Path, audit: &Path) -> Result<String> {
    let names = ["trace-call", "trace-call-paced"];
    if !(args.workloads.is_empty() || args.workloads.iter().any(|n| names.contains(&n.as_str()))) {
        return Ok(String::new());
    }
    // A collector that reads exports and does not decode them: what is measured is the
    // sidecar's cost, not a receiver's on the same two cores.
    let collector = toolmesh_tests::otlp::Sink::start().await?;
    let url = collector.url();
    let on = |ratio: &str| {
        vec![
            "--otlp-endpoint".to_owned(),
            url.clone(),
            "--trace-sampling".to_owned(),
            ratio.to_owned(),
        ]
    };
    let mut modes: Vec<(&'static str, Option<PathBuf>, Vec<String>)> = vec![
        ("tracing off", None, Vec::new()),
        ("tracing 0%", None, on("0")),
        ("tracing 10%", None, on("0.1")),
        ("tracing 100%", None, on("1")),
    ];
    let mut ratios = vec![
        ("tracing 0%", "tracing off"),
        ("tracing 10%", "tracing off"),
        ("tracing 100%", "tracing off"),
    ];
    if let Some(baseline) = &args.baseline_sidecar {
        modes.push(("no tracing (baseline)", Some(baseline.clone()), Vec::new()));
        ratios.push(("tracing off", "no tracing (baseline)"));
    }
    let calls = small_calls(
        args,
        ["trace-call", "trace-call-paced"],
        ("`tools/call`", "connections"),
    );
    let mut report = String::from(
        "## Tracing

",
    );
    for w in calls
        .iter()
        .filter(|w| args.workloads.is_empty() || args.workloads.iter().any(|n| n == w.name))
    {
        let mut rounds: Vec<Vec<Outcome>> = modes.iter().map(|_| Vec::new()).collect();
        let mut spans: Vec<(f64, f64)> = modes.iter().map(|_| (0.0, 0.0)).collect();
        let before = collector.exports();
        for _ in 0..TRACE_ROUNDS {
            for (i, (name, binary, extra)) in modes.iter().enumerate() {
                let (mut sidecar, addr, admin) =
                    start_sidecar_with(args, config, audit, binary.as_deref(), extra).await?;
                let through = Arc::new(Target {
                    name,
                    addr,
                    path: "/mcp/bench",
                    pid: sidecar.pid(),
                    prefix: "",
                    fan_out: 1,
                    users: Users::None,
                });
                rounds[i].push(run(through, w).await.with_context(|| name.to_string())?);
                // Give the queue a moment to drain, then read what became of the spans.
                tokio::time::sleep(Duration::from_millis(300)).await;
                let (exported, dropped) = trace_spans(admin).await;
                spans[i].0 += exported;
                spans[i].1 += dropped;
                // SIGTERM: the sidecar flushes its spans before it exits.
                sidecar.terminate().await?;
            }
        }
        let targets: Vec<Arc<Target>> = modes
            .iter()
            .map(|(name, _, _)| {
                Arc::new(Target {
                    name,
                    addr: ([127, 0, 0, 1], 0).into(),
                    path: "",
                    pid: None,
                    prefix: "",
                    fan_out: 1,
                    users: Users::None,
                })
            })
            .collect();
        let results: Vec<(&Target, Outcome)> = targets
            .iter()
            .map(Arc::as_ref)
            .zip(rounds.into_iter().map(best))
            .collect();
        let mut t = compare_table(&format!("{} — {}", w.name, w.what), &results, &ratios);
        t.push_str(&costs(&results));
        for ((name, _, _), (exported, dropped)) in modes.iter().zip(&spans) {
            if exported + dropped > 0.0 {
                let _ = writeln!(
                    t,
                    "\n{name}: {exported:.0} spans exported, {dropped:.0} dropped over {TRACE_ROUNDS} rounds (two per sampled call: SERVER and CLIENT)."
                );
            }
        }
        let _ = writeln!(
            t,
            "\nExports the OTLP endpoint answered: {}.",
            collector.exports() - before
        );
        println!("{t}");
        report.push_str(&t);
        report.push('\n');
    }
    Ok(report)
}

/// `toolmesh_trace_spans_total` of the sidecar whose admin port is `admin`: exported,
/// dropped (0 when unreadable).
async fn trace_spans(admin: u16) -> (f64, f64) {
    let page = match reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let value = |result: &str| {
        let prefix = format!("toolmesh_trace_spans_total{{result=\"{result}\"}} ");
        page.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (value("exported"), value("dropped"))
}

/// A fresh sidecar with the benchmark's resources and audit to `audit`.
async fn start_sidecar(args: &Args, config: &Path, audit: &Path) -> Result<(Proc, SocketAddr)> {
    let (proc, addr, _) = start_sidecar_with(args, config, audit, None, &[]).await?;
    Ok((proc, addr))
}

/// [`start_sidecar`], from `binary` if given, with `extra` flags.
async fn start_sidecar_with(
    args: &Args,
    config: &Path,
    audit: &Path,
    binary: Option<&Path>,
    extra: &[String],
) -> Result<(Proc, SocketAddr, u16)> {
    let (mcp, admin) = (free_port()?, free_port()?);
    let mut cmd = match binary {
        Some(binary) => sidecar_command_of(binary, args, mcp, admin),
        None => sidecar_command(args, mcp, admin)?,
    };
    cmd.args(extra);
    cmd.arg("--config")
        .arg(config)
        .arg("--audit-file")
        .arg(audit);
    let (sidecar, _) = time_to_ready(cmd, admin).await?;
    Ok((sidecar, ([127, 0, 0, 1], mcp).into(), admin))
}

async fn bench(args: Args) -> Result<()> {
    let dir = TempDir::new("bench")?;
    let (_upstream, up) = start_upstream(&[]).await?;
    let upstream_url = format!("http://{up}/mcp");
    let config = dir.0.join("sidecar.yaml");
    std::fs::write(&config, resources(&upstream_url))?;
    let audit = dir.0.join("audit.jsonl");

    let direct = Arc::new(Target {
        name: "direct",
        addr: up,
        path: "/mcp",
        pid: None,
        prefix: "",
        fan_out: 1,
        users: Users::None,
    });
    let nginx_dir = TempDir::new("bench-nginx")?;
    let (_nginx, nginx) = if args.no_nginx {
        (None, None)
    } else {
        let (proc, port) = start_nginx(&nginx_dir.0, up, args.proxy_workers).await?;
        let master = proc.pid().context("nginx pid")?;
        let target = Arc::new(Target {
            name: "nginx",
            addr: ([127, 0, 0, 1], port).into(),
            path: "/mcp/bench",
            pid: nginx_worker(master).or(Some(master)),
            prefix: "",
            fan_out: 1,
            users: Users::None,
        });
        (Some(proc), Some(target))
    };

    let (sidecar, _) = start_sidecar(&args, &config, &audit).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle_rss = usage(sidecar.pid().context("sidecar pid")?)?.1;
    drop(sidecar);

    let mut report = format!(
        "Machine: {}. Proxies: {} worker thread(s)/process(es) each; upstream `toolmesh-bench-upstream` (1 thread); load generator: `toolmesh-bench` (2 threads), all on this machine. Each workload gets a fresh sidecar, so its peak RSS is its own.\n\nSidecar idle RSS: {:.1} MiB.\n\n",
        machine(),
        args.proxy_workers,
        idle_rss as f64 / 1024.0
    );
    println!("{report}");
    for w in workloads(&args) {
        let (mut sidecar, addr) = start_sidecar(&args, &config, &audit).await?;
        let mut targets = vec![
            direct.clone(),
            Arc::new(Target {
                name: "sidecar",
                addr,
                path: "/mcp/bench",
                pid: Some(sidecar.pid().context("sidecar pid")?),
                prefix: "",
                fan_out: 1,
                users: Users::None,
            }),
        ];
        targets.extend(nginx.clone());
        let mut results = Vec::new();
        for target in &targets {
            let outcome = run(target.clone(), &w)
                .await
                .with_context(|| format!("{} via {}", w.name, target.name))?;
            results.push((target.as_ref(), outcome));
        }
        // SIGTERM drains and flushes the audit trail before the next workload.
        sidecar.terminate().await?;
        let t = table(&w, &results);
        println!("{t}");
        report.push_str(&t);
        report.push('\n');
    }
    let lines = std::fs::read_to_string(&audit)
        .map(|a| a.lines().count())
        .unwrap_or(0);
    let line = format!("Audit lines the sidecars wrote: {lines}.\n\n");
    println!("{line}");
    report.push_str(&line);

    let aggregated = aggregate(&args, &config, &audit).await?;
    report.push_str(&aggregated);

    let gateway = gateway(&args, &upstream_url, &audit).await?;
    report.push_str(&gateway);

    let traced = tracing(&args, &config, &audit).await?;
    report.push_str(&traced);

    let pinned = pinning(&args, &upstream_url, &audit).await?;
    report.push_str(&pinned);

    let tokens = oauth_tokens(&args, &upstream_url, &audit).await?;
    report.push_str(&tokens);

    let hops = two_hop(&args, &direct, &upstream_url).await?;
    println!("{hops}");
    report.push_str(&hops);

    let start = startup(&args, &TempDir::new("bench-startup")?.0, &upstream_url).await?;
    println!("{start}");
    report.push_str(&start);
    if let Some(out) = &args.out {
        std::fs::write(out, &report)?;
    }
    Ok(())
}
