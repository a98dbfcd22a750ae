//! The stdio bridge: an MCP server that only speaks stdio, run as a child process and
//! served as Streamable HTTP on a loopback port, so server-side mode relays to it as
//! to any HTTP upstream (policy, audit and TLS stay with the proxy in front).
//!
//! # What it does
//!
//! - **The child.** `Options::command` is spawned with stdin, stdout and stderr piped.
//!   stdout carries newline-delimited JSON-RPC; a line longer than
//!   `max_message_bytes` is dropped with a warning (never buffered beyond that
//!   bound). stderr is logged line by line (`info`; lines cut at 8 KiB, with a
//!   `warn`). Once per child start the bridge itself runs the handshake
//!   (`initialize` asking for 2025-11-25, `clientInfo` `toolmesh-stdio-bridge`, no
//!   client capabilities; then `notifications/initialized`) and caches the
//!   `InitializeResult`. Requests wait (up to `request_timeout`) while a child starts.
//! - **Restarts.** When the child exits (or closes its stdout, or fails its handshake)
//!   its exit status is logged, every request in flight to it gets the JSON-RPC error
//!   `-32603` "the stdio server exited; retry" at once, and a new child is started
//!   after a backoff: 100 ms, doubling per consecutive failure up to
//!   `restart_backoff_max`, back to 100 ms after a child that initialized and lived
//!   10 s. Shutdown closes the child's stdin, waits up to 3 s, then kills it, and
//!   always reaps it (`kill_on_drop` as a last resort).
//! - **Ids.** Every forwarded request gets a fresh numeric child-side id (one counter
//!   per bridge, so ids of different clients never collide); the answer's `id` is put
//!   back to the client's own, byte for byte. A `params._meta.progressToken` is
//!   rewritten the same way (to the child-side id) and restored in the child's
//!   `notifications/progress`. `params`, `result` and `error` are relayed as raw JSON,
//!   never re-serialized; only a `params._meta` is rebuilt (see below).
//! - **2025 generation** (2025-03-26, 2025-06-18, 2025-11-25; sessions): `initialize`
//!   is answered from the cache with a new random `Mcp-Session-Id` (at most 4096 live
//!   ids, the least recently used forgotten first). The answered `protocolVersion` is
//!   the client's requested version when it is one of those three and not newer than
//!   the child's; otherwise the child's own version (a client asking for something
//!   newer or unknown gets what the child speaks). Other requests need a known session
//!   id (missing: 400, unknown: 404 so the client initializes again); `DELETE` ends a
//!   session (200). `notifications/initialized` is swallowed, `notifications/cancelled`
//!   is translated to the child-side id of that session's request, other
//!   notifications are forwarded; all get 202. Client responses get 202 (the bridge
//!   never asks the client anything).
//! - **2026-07-28 generation** (stateless): `server/discover` is answered from the
//!   cache (`supportedVersions` the three 2025 versions and 2026-07-28, the child's
//!   `capabilities` and `instructions`, its `serverInfo` under `_meta`
//!   `io.modelcontextprotocol/serverInfo`, `ttlMs` 0, `cacheScope` private). Other
//!   requests are forwarded like 2025 ones; their results get `resultType: "complete"`
//!   (and `ttlMs` 0 / `cacheScope` private on list and read results) when the child, a
//!   2025-era server, left them out. Another modern version gets `-32022` with the
//!   supported list (HTTP 400). A stateless client cancels by closing its request
//!   (below); its `notifications/cancelled` is dropped, since its ids are not unique
//!   across clients.
//! - **Telling generations apart** exactly as the proxy does
//!   ([`crate::mcp::check_headers`]): a request is 2026-07-28 when its
//!   `MCP-Protocol-Version` header, or else its
//!   `params._meta["io.modelcontextprotocol/protocolVersion"]`, names 2026-07-28 or
//!   later (and its `Mcp-Method`/`Mcp-Name` headers must then agree with the body).
//!   `initialize` is always the 2025 handshake; a session id on a modern request is
//!   ignored.
//! - **`_meta` towards the child.** The child was initialized in the 2025 generation,
//!   so the 2026 envelope keys (`io.modelcontextprotocol/protocolVersion`,
//!   `…/clientInfo`, `…/clientCapabilities`) are removed from `params._meta` before
//!   forwarding: a dual-era child (the Python SDK 2.x) refuses requests carrying the
//!   version key on a handshake connection. Every other `_meta` key goes through.
//! - **Answers.** Forwarded requests are answered `application/json`, or, when the
//!   client accepts `text/event-stream` and the request carries a progress token, as
//!   an SSE stream of the child's progress notifications then the response. A client
//!   that goes away (or times out) before the answer makes the bridge send the child
//!   `notifications/cancelled` for its request. Requests the child sends its client
//!   are answered by the bridge at once: `ping` with `{}`, anything else (sampling,
//!   roots, elicitation) with `-32601`. The child's other notifications (logging,
//!   list changes, resource updates) are dropped.
//! - **Bounds.** Request bodies up to `max_message_bytes` (413 above); at most 1024
//!   requests in flight to the child (503 with `Retry-After` above); the child's stdin
//!   is fed through a bounded queue; a child not ready within `request_timeout`
//!   gives 503. Answers decided before a request reaches the child are HTTP statuses
//!   with a JSON-RPC error body; outcomes after (the child exited, `request_timeout`
//!   passed) are JSON-RPC errors in a 200 answer.
//! - **The URL** is `http://127.0.0.1:PORT/mcp/<random token>`; any other path is 404,
//!   so other containers of the pod cannot use the port by accident.
//!
//! # What it does not do
//!
//! No server-to-client requests (the bridge declares no client capabilities), no GET
//! stream (GET is 405, so the child's unsolicited notifications go nowhere), no
//! resumption, no JSON-RPC batches (400 with `-32600`), no `input_required` rounds
//! (a 2025-era child never asks).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method as HttpMethod, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::body::{self, Body};
use crate::mcp::{self, Envelope, Kind, Method, Rejection};

/// How the bridge runs its child.
#[derive(Debug, Clone)]
pub struct Options {
    /// Program and arguments; must not be empty.
    pub command: Vec<String>,
    /// Bound on one line from the child and on one request body.
    pub max_message_bytes: usize,
    /// How long a request waits for the child's answer (including a child that is
    /// still starting).
    pub request_timeout: Duration,
    /// Cap of the restart backoff (which starts at 100 ms and doubles).
    pub restart_backoff_max: Duration,
}

/// The protocol version the bridge asks its child for.
pub const CHILD_VERSION: &str = "2025-11-25";
/// The session-based versions served over HTTP, oldest first.
pub const LEGACY_VERSIONS: [&str; 3] = ["2025-03-26", "2025-06-18", CHILD_VERSION];
/// JSON-RPC code of a request whose child exited before answering.
pub const CHILD_EXITED: i64 = -32603;
/// JSON-RPC code for a protocol version the bridge does not serve (2026-07-28).
pub const UNSUPPORTED_VERSION: i64 = -32022;
/// At most this many requests wait on the child at once.
pub const MAX_IN_FLIGHT: usize = 1024;
const METHOD_NOT_FOUND: i64 = -32601;

const MAX_SESSIONS: usize = 4096;
const OUTBOX: usize = 256;
const PROGRESS_QUEUE: usize = 64;
const STDERR_LINE: usize = 8 * 1024;
const READ_CHUNK: usize = 64 * 1024;
const BACKOFF_START: Duration = Duration::from_millis(100);
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
const MIN_INIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the child's pipes get to deliver what is left once it exited.
const PIPE_DRAIN: Duration = Duration::from_secs(1);
const HTTP_DRAIN: Duration = Duration::from_secs(2);
const HEADER_READ: Duration = Duration::from_secs(10);
/// `_meta` keys of the 2026-07-28 envelope, removed before a request reaches the child.
pub(crate) const ENVELOPE_KEYS: [&str; 3] = [
    mcp::META_PROTOCOL_VERSION,
    "io.modelcontextprotocol/clientInfo",
    "io.modelcontextprotocol/clientCapabilities",
];

// ---------------------------------------------------------------------------------
// The bridge handle.

/// A running bridge: the child process and its HTTP front. Dropping it stops both
/// in the background; [`Bridge::shutdown`] stops them and waits.
pub struct Bridge {
    url: String,
    shared: Arc<Shared>,
    stop_http: watch::Sender<bool>,
    stop_child: watch::Sender<bool>,
    http: Option<JoinHandle<()>>,
    supervisor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("url", &self.url)
            .field("child_pid", &self.child_pid())
            .finish_non_exhaustive()
    }
}

impl Bridge {
    /// Spawn the child, bind `127.0.0.1:0` and serve. Returns once the HTTP side is
    /// listening; the child may still be starting (requests then wait for it). Fails
    /// when the options are unusable, the port cannot be bound or the program cannot
    /// be started at all.
    pub async fn start(options: Options) -> Result<Bridge, String> {
        if options.command.is_empty() {
            return Err("--stdio: no command given".to_owned());
        }
        if options.max_message_bytes == 0 {
            return Err("--stdio: the message size bound must be positive".to_owned());
        }
        let token = random_token()?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| format!("--stdio: cannot bind 127.0.0.1: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("--stdio: no local address: {e}"))?;
        let first = spawn_child(&options.command)?;
        let (outbox, outbox_rx) = mpsc::channel(OUTBOX);
        let (phase, _) = watch::channel(Phase::default());
        let path = format!("/mcp/{token}");
        let shared = Arc::new(Shared {
            options,
            path: path.clone(),
            state: Mutex::new(State::default()),
            phase,
            outbox,
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            next_id: AtomicU64::new(1),
            child_pid: AtomicU32::new(0),
        });
        let (stop_child, stop_child_rx) = watch::channel(false);
        let supervisor = tokio::spawn(supervise(shared.clone(), first, outbox_rx, stop_child_rx));
        let (stop_http, stop_http_rx) = watch::channel(false);
        let front = shared.clone();
        let http = tokio::spawn(crate::listener::serve(
            "stdio",
            listener,
            None,
            move |req, _peer| {
                let shared = front.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            },
            stop_http_rx,
            HTTP_DRAIN,
            HEADER_READ,
        ));
        let url = format!("http://{addr}{path}");
        tracing::info!(addr = %addr, command = ?shared.options.command, "stdio bridge listening");
        Ok(Bridge {
            url,
            shared,
            stop_http,
            stop_child,
            http: Some(http),
            supervisor: Some(supervisor),
        })
    }

    /// `http://127.0.0.1:PORT/mcp/<random-token>`: the only path served.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The process id of the current child, if one is running.
    pub fn child_pid(&self) -> Option<u32> {
        match self.shared.child_pid.load(Ordering::Relaxed) {
            0 => None,
            pid => Some(pid),
        }
    }

    /// Stop accepting requests (those in flight get a moment to finish), close the
    /// child's stdin, wait up to 3 s for it to exit, then kill it; returns once the
    /// child is reaped.
    pub async fn shutdown(mut self) {
        let _ = self.stop_http.send(true);
        if let Some(http) = self.http.take() {
            let _ = http.await;
        }
        let _ = self.stop_child.send(true);
        if let Some(supervisor) = self.supervisor.take() {
            let _ = supervisor.await;
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        // Without `shutdown`, the tasks still stop (and reap the child) on their own.
        let _ = self.stop_http.send(true);
        let _ = self.stop_child.send(true);
    }
}

// ---------------------------------------------------------------------------------
// Shared state.

/// The child's state as requests wait on it.
#[derive(Debug, Clone, Copy, Default)]
struct Phase {
    /// The current (or last) child's number, from 1.
    epoch: u64,
    /// Initialized and taking requests.
    ready: bool,
    /// The bridge is shutting down.
    stopped: bool,
}

#[derive(Debug)]
struct Shared {
    options: Options,
    path: String,
    state: Mutex<State>,
    phase: watch::Sender<Phase>,
    outbox: mpsc::Sender<Outgoing>,
    permits: Arc<Semaphore>,
    next_id: AtomicU64,
    child_pid: AtomicU32,
}

#[derive(Debug, Default)]
struct State {
    /// The epoch of the child that is running (`None` between children).
    running: Option<u64>,
    /// The running child finished its handshake.
    ready: bool,
    /// The last child's `InitializeResult`.
    init: Option<Arc<Init>>,
    /// Requests sent to the child, by child-side id.
    pending: HashMap<u64, Pending>,
    /// (session, client id as sent) → child-side id, for `notifications/cancelled`.
    by_client: HashMap<(String, String), u64>,
    /// Live session ids → last use.
    sessions: HashMap<String, Instant>,
}

/// One line for the child's stdin, for the child of `epoch` only.
#[derive(Debug)]
struct Outgoing {
    epoch: u64,
    line: Bytes,
}

#[derive(Debug)]
struct Pending {
    epoch: u64,
    reply: oneshot::Sender<Result<ChildReply, Gone>>,
    /// Where progress notifications go, with the client's own token.
    progress: Option<(mpsc::Sender<Bytes>, Box<RawValue>)>,
    cancel_key: Option<(String, String)>,
}

/// The child's answer to one request.
#[derive(Debug)]
struct ChildReply {
    result: Option<Box<RawValue>>,
    error: Option<Box<RawValue>>,
}

/// Why a request got no answer from the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gone {
    Exited,
    ShuttingDown,
}

/// What the child said about itself in its `InitializeResult`.
#[derive(Debug, Deserialize)]
struct Init {
    #[serde(rename = "protocolVersion")]
    protocol_version: String,
    capabilities: Box<RawValue>,
    #[serde(rename = "serverInfo")]
    server_info: Box<RawValue>,
    #[serde(default)]
    instructions: Option<Box<RawValue>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; should it ever, keep serving.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Record a request to the child of `pending.epoch`; refused when that child is
    /// gone (or, unless `handshake`, not yet initialized).
    fn register(&self, child_id: u64, pending: Pending, handshake: bool) -> Result<(), Gone> {
        let mut state = self.state();
        if state.running != Some(pending.epoch) || !(state.ready || handshake) {
            return Err(Gone::Exited);
        }
        if let Some(key) = &pending.cancel_key {
            state.by_client.insert(key.clone(), child_id);
        }
        state.pending.insert(child_id, pending);
        Ok(())
    }

    /// Take a request out of the pending set (answered, abandoned).
    fn take(&self, child_id: u64) -> Option<Pending> {
        let mut state = self.state();
        let pending = state.pending.remove(&child_id);
        if let Some(key) = pending.as_ref().and_then(|p| p.cancel_key.as_ref()) {
            state.by_client.remove(key);
        }
        pending
    }

    /// Forget a request the client gave up on; tell the child if it was still waiting.
    fn abandon(&self, child_id: u64) {
        if let Some(p) = self.take(child_id) {
            let line = cancelled_line(child_id, "the client went away or timed out");
            self.send_now(p.epoch, line);
        }
    }

    /// Queue a line without waiting (notifications, answers to the child); dropped
    /// with a warning when the queue is full.
    fn send_now(&self, epoch: u64, line: String) {
        let msg = Outgoing {
            epoch,
            line: Bytes::from(line),
        };
        if self.outbox.try_send(msg).is_err() {
            tracing::warn!(
                epoch,
                "stdin queue full; dropped a message for the stdio server"
            );
        }
    }

    /// Fail every request to the child of `epoch` (it exited, or the bridge stops).
    fn fail_pending(&self, epoch: u64, why: Gone) {
        let failed: Vec<Pending> = {
            let mut state = self.state();
            if state.running == Some(epoch) {
                state.running = None;
                state.ready = false;
            }
            let ids: Vec<u64> = state
                .pending
                .iter()
                .filter(|(_, p)| p.epoch == epoch)
                .map(|(id, _)| *id)
                .collect();
            let failed: Vec<Pending> = ids
                .iter()
                .filter_map(|id| state.pending.remove(id))
                .collect();
            for key in failed.iter().filter_map(|p| p.cancel_key.as_ref()) {
                state.by_client.remove(key);
            }
            failed
        };
        if !failed.is_empty() {
            tracing::warn!(
                epoch,
                requests = failed.len(),
                "failing the requests in flight to the stdio server"
            );
        }
        for p in failed {
            let _ = p.reply.send(Err(why));
        }
    }

    /// One line from the child's stdout.
    fn dispatch(&self, epoch: u64, line: &[u8]) {
        match classify(line) {
            Ok(FromChild::Response { id, result, error }) => self.answer(id, result, error),
            Ok(FromChild::Notification { method, params }) => {
                if method == "notifications/progress" {
                    self.progress(params);
                } else {
                    tracing::debug!(%method, "dropped a notification from the stdio server (no stream to carry it)");
                }
            }
            Ok(FromChild::Request { id, method }) => {
                tracing::info!(%method, "the stdio server asked its client something; the bridge answers");
                self.send_now(epoch, answer_child_request(id, &method));
            }
            Err(why) => {
                tracing::warn!(epoch, %why, line = %preview(line), "unreadable line from the stdio server; dropped");
            }
        }
    }

    fn answer(&self, id: Option<u64>, result: Option<&RawValue>, error: Option<&RawValue>) {
        let Some(id) = id else {
            tracing::warn!(
                "response from the stdio server with an id the bridge never sent; dropped"
            );
            return;
        };
        let Some(pending) = self.take(id) else {
            tracing::debug!(
                id,
                "late response from the stdio server (request cancelled or timed out)"
            );
            return;
        };
        let reply = ChildReply {
            result: result.map(ToOwned::to_owned),
            error: error.map(ToOwned::to_owned),
        };
        let _ = pending.reply.send(Ok(reply));
    }

    fn progress(&self, params: Option<&RawValue>) {
        let Some(child_id) = params.and_then(progress_token) else {
            return;
        };
        let route = {
            let state = self.state();
            state
                .pending
                .get(&child_id)
                .and_then(|p| p.progress.as_ref())
                .map(|(tx, token)| (tx.clone(), token.clone()))
        };
        let (Some((tx, token)), Some(params)) = (route, params) else {
            return;
        };
        match progress_event(params, &token) {
            // A client that does not keep up loses progress, never the answer.
            Ok(event) => {
                let _ = tx.try_send(event);
            }
            Err(e) => tracing::debug!(error = %e, "progress notification not relayed"),
        }
    }
}

// ---------------------------------------------------------------------------------
// The child process.

fn spawn_child(command: &[String]) -> Result<Child, String> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| "--stdio: no command given".to_owned())?;
    Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("--stdio: cannot start {program:?}: {e}"))
}

/// Run children one after another until told to stop.
async fn supervise(
    shared: Arc<Shared>,
    first: Child,
    mut outbox: mpsc::Receiver<Outgoing>,
    mut stop: watch::Receiver<bool>,
) {
    let mut next = Some(first);
    let mut backoff = BACKOFF_START;
    let cap = shared.options.restart_backoff_max.max(BACKOFF_START);
    let mut epoch = 0u64;
    loop {
        epoch += 1;
        let child = match next.take() {
            Some(child) => Ok(child),
            None => spawn_child(&shared.options.command),
        };
        match child {
            Ok(child) => {
                let run = run_child(&shared, epoch, child, &mut outbox, &mut stop).await;
                if run.stopped {
                    break;
                }
                if run.healthy {
                    backoff = BACKOFF_START;
                }
            }
            Err(e) => tracing::error!(error = %e, "stdio server did not start"),
        }
        tracing::info!(delay = ?backoff, "restarting the stdio server");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        backoff = backoff.saturating_mul(2).min(cap);
    }
    shared.phase.send_modify(|p| {
        p.ready = false;
        p.stopped = true;
    });
    shared.child_pid.store(0, Ordering::Relaxed);
    tracing::info!("stdio bridge stopped");
}

/// How one child's life ended.
#[derive(Debug)]
struct Run {
    stopped: bool,
    healthy: bool,
}

enum Ended {
    Exited(std::io::Result<std::process::ExitStatus>),
    Stop,
}

/// What woke a child's loop.
enum Event {
    Exited(std::io::Result<std::process::ExitStatus>),
    Stop,
    Handshake(Result<Init, String>),
    StdoutClosed,
    Outgoing(Option<Outgoing>),
}

async fn run_child(
    shared: &Arc<Shared>,
    epoch: u64,
    mut child: Child,
    outbox: &mut mpsc::Receiver<Outgoing>,
    stop: &mut watch::Receiver<bool>,
) -> Run {
    let pid = child.id().unwrap_or(0);
    shared.child_pid.store(pid, Ordering::Relaxed);
    {
        let mut state = shared.state();
        state.running = Some(epoch);
        state.ready = false;
    }
    shared.phase.send_modify(|p| {
        p.epoch = epoch;
        p.ready = false;
    });
    tracing::info!(pid, epoch, "stdio server started");
    let started = Instant::now();
    let mut stdin = child.stdin.take();
    let mut reader = child
        .stdout
        .take()
        .map(|out| tokio::spawn(read_stdout(shared.clone(), epoch, out)));
    let stderr = child
        .stderr
        .take()
        .map(|err| tokio::spawn(log_stderr(err, pid)));
    let handshake = handshake(shared, epoch);
    tokio::pin!(handshake);
    let mut handshaking = true;
    let mut initialized = false;

    let ended = loop {
        let event = tokio::select! {
            status = child.wait() => Event::Exited(status),
            _ = stop.wait_for(|s| *s) => Event::Stop,
            outcome = &mut handshake, if handshaking => Event::Handshake(outcome),
            () = task_done(reader.as_mut()), if reader.is_some() => Event::StdoutClosed,
            msg = outbox.recv() => Event::Outgoing(msg),
        };
        match event {
            Event::Exited(status) => break Ended::Exited(status),
            Event::Stop | Event::Outgoing(None) => break Ended::Stop,
            Event::Handshake(Ok(init)) => {
                handshaking = false;
                initialized = true;
                mark_ready(shared, epoch, init);
            }
            Event::Handshake(Err(e)) => {
                handshaking = false;
                tracing::warn!(pid, epoch, error = %e, "stdio server failed its handshake; killing it");
                let _ = child.start_kill();
            }
            Event::StdoutClosed => {
                reader = None;
                tracing::warn!(pid, epoch, "stdio server closed its stdout; killing it");
                let _ = child.start_kill();
            }
            Event::Outgoing(Some(msg)) => {
                if msg.epoch != epoch {
                    continue; // for a child that is gone; its request was failed
                }
                let Some(pipe) = stdin.as_mut() else { continue };
                let written = tokio::select! {
                    written = write_line(pipe, &msg.line) => written,
                    _ = stop.wait_for(|s| *s) => break Ended::Stop,
                    status = child.wait() => break Ended::Exited(status),
                };
                if let Err(e) = written {
                    tracing::warn!(pid, epoch, error = %e, "cannot write to the stdio server");
                    stdin = None;
                }
            }
        }
    };

    // No new requests for this child from here on.
    shared.state().ready = false;
    shared.phase.send_modify(|p| p.ready = false);
    let stopped = match ended {
        Ended::Exited(status) => {
            match status {
                Ok(s) => {
                    tracing::warn!(pid, epoch, status = %s, uptime = ?started.elapsed(), "stdio server exited");
                }
                Err(e) => {
                    tracing::warn!(pid, epoch, error = %e, "stdio server: cannot read its exit status");
                }
            }
            false
        }
        Ended::Stop => {
            drop(stdin.take());
            if tokio::time::timeout(SHUTDOWN_GRACE, child.wait())
                .await
                .is_err()
            {
                tracing::warn!(pid, epoch, grace = ?SHUTDOWN_GRACE, "stdio server still running after its stdin closed; killing it");
                let _ = child.start_kill();
            }
            let _ = child.wait().await;
            tracing::info!(pid, epoch, "stdio server stopped");
            true
        }
    };
    drop(stdin);
    // Let the last lines it wrote reach their requests, then fail the rest.
    if let Some(reader) = reader {
        finish_task(reader).await;
    }
    let why = if stopped {
        Gone::ShuttingDown
    } else {
        Gone::Exited
    };
    shared.fail_pending(epoch, why);
    if let Some(stderr) = stderr {
        finish_task(stderr).await;
    }
    shared.child_pid.store(0, Ordering::Relaxed);
    Run {
        stopped,
        healthy: initialized && started.elapsed() >= HEALTHY_AFTER,
    }
}

/// Resolves when the task finishes (never, without one).
async fn task_done(task: Option<&mut JoinHandle<()>>) {
    match task {
        Some(task) => {
            let _ = task.await;
        }
        None => std::future::pending().await,
    }
}

/// Await a pipe task for at most [`PIPE_DRAIN`] (a grandchild may hold the pipe
/// open), then end it.
async fn finish_task(mut task: JoinHandle<()>) {
    if tokio::time::timeout(PIPE_DRAIN, &mut task).await.is_err() {
        task.abort();
        let _ = task.await;
    }
}

async fn write_line(pipe: &mut ChildStdin, line: &[u8]) -> std::io::Result<()> {
    pipe.write_all(line).await?;
    pipe.flush().await
}

fn mark_ready(shared: &Shared, epoch: u64, init: Init) {
    tracing::info!(
        epoch,
        protocol = %init.protocol_version,
        server = %init.server_info.get(),
        "stdio server initialized"
    );
    {
        let mut state = shared.state();
        if state.running != Some(epoch) {
            return;
        }
        state.init = Some(Arc::new(init));
        state.ready = true;
    }
    shared.phase.send_modify(|p| {
        if p.epoch == epoch {
            p.ready = true;
        }
    });
}

/// The bridge's own `initialize` and `notifications/initialized` with a new child.
async fn handshake(shared: &Shared, epoch: u64) -> Result<Init, String> {
    let id = shared.next_id();
    let (reply, answer) = oneshot::channel();
    let pending = Pending {
        epoch,
        reply,
        progress: None,
        cancel_key: None,
    };
    shared
        .register(id, pending, true)
        .map_err(|_| "the stdio server exited".to_owned())?;
    let limit = shared.options.request_timeout.max(MIN_INIT_TIMEOUT);
    let exchange = async {
        let line = Bytes::from(initialize_line(id));
        shared
            .outbox
            .send(Outgoing { epoch, line })
            .await
            .map_err(|_| "the bridge is stopping".to_owned())?;
        match answer.await {
            Ok(Ok(reply)) => Ok(reply),
            _ => Err("the stdio server exited".to_owned()),
        }
    };
    let reply = match tokio::time::timeout(limit, exchange).await {
        Ok(reply) => reply?,
        Err(_) => {
            shared.take(id);
            return Err(format!("no answer to initialize within {limit:?}"));
        }
    };
    let init = init_from_reply(&reply)?;
    let line =
        Bytes::from_static(b"{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}\n");
    shared
        .outbox
        .send(Outgoing { epoch, line })
        .await
        .map_err(|_| "the bridge is stopping".to_owned())?;
    Ok(init)
}

fn initialize_line(id: u64) -> String {
    let params = serde_json::json!({
        "protocolVersion": CHILD_VERSION,
        "capabilities": {},
        "clientInfo": {"name": "toolmesh-stdio-bridge", "version": env!("CARGO_PKG_VERSION")},
    });
    format!("{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"initialize\",\"params\":{params}}}\n")
}

fn init_from_reply(reply: &ChildReply) -> Result<Init, String> {
    if let Some(error) = &reply.error {
        return Err(format!(
            "initialize failed: {}",
            preview(error.get().as_bytes())
        ));
    }
    let result = reply
        .result
        .as_ref()
        .ok_or_else(|| "initialize answered without a result".to_owned())?;
    serde_json::from_str(result.get()).map_err(|e| format!("unreadable InitializeResult: {e}"))
}

async fn read_stdout(shared: Arc<Shared>, epoch: u64, mut out: impl AsyncRead + Unpin) {
    let max = shared.options.max_message_bytes;
    let mut lines = LineBuf::new(max);
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        let n = match out.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(epoch, error = %e, "cannot read the stdio server's stdout");
                break;
            }
        };
        lines.feed(&chunk[..n], |line| match line {
            Line::Complete(bytes) => shared.dispatch(epoch, bytes),
            Line::TooLong { len, .. } => tracing::warn!(
                epoch,
                bytes = len,
                limit = max,
                "line from the stdio server exceeds the message size bound; dropped"
            ),
        });
    }
}

async fn log_stderr(mut err: impl AsyncRead + Unpin, pid: u32) {
    let mut lines = LineBuf::new(STDERR_LINE);
    let mut chunk = vec![0u8; READ_CHUNK];
    while let Ok(n) = err.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        lines.feed(&chunk[..n], |line| match line {
            Line::Complete(bytes) => {
                tracing::info!(pid, line = %String::from_utf8_lossy(bytes), "stdio server stderr");
            }
            Line::TooLong { prefix, len } => tracing::warn!(
                pid,
                bytes = len,
                line = %String::from_utf8_lossy(prefix),
                "stdio server stderr (line cut)"
            ),
        });
    }
}

// ---------------------------------------------------------------------------------
// Bounded lines.

/// A line cut from a byte stream.
#[derive(Debug, PartialEq, Eq)]
enum Line<'a> {
    /// A whole line, without its `\n` (or `\r\n`).
    Complete(&'a [u8]),
    /// A line over the bound: its first `max` bytes and its full length.
    TooLong { prefix: &'a [u8], len: usize },
}

/// Splits a byte stream into lines of at most `max` bytes, holding at most `max`
/// bytes of a line that is still coming. Blank lines are skipped.
#[derive(Debug)]
struct LineBuf {
    buf: Vec<u8>,
    max: usize,
    /// Length so far of a line that went over `max` (its tail is skipped).
    over: Option<usize>,
}

impl LineBuf {
    fn new(max: usize) -> LineBuf {
        LineBuf {
            buf: Vec::new(),
            max,
            over: None,
        }
    }

    fn feed(&mut self, mut chunk: &[u8], mut on_line: impl FnMut(Line<'_>)) {
        while !chunk.is_empty() {
            let newline = chunk.iter().position(|b| *b == b'\n');
            let (part, rest) = match newline {
                Some(i) => (&chunk[..i], Some(&chunk[i + 1..])),
                None => (chunk, None),
            };
            match self.over.as_mut() {
                Some(len) => *len += part.len(),
                None if self.buf.len() + part.len() > self.max => {
                    let room = self.max - self.buf.len();
                    self.buf.extend_from_slice(&part[..room]);
                    self.over = Some(self.max + part.len() - room);
                }
                None => self.buf.extend_from_slice(part),
            }
            let Some(rest) = rest else { return };
            match self.over.take() {
                Some(len) => on_line(Line::TooLong {
                    prefix: &self.buf,
                    len,
                }),
                None => {
                    let line = self.buf.strip_suffix(b"\r").unwrap_or(&self.buf);
                    if !line.iter().all(u8::is_ascii_whitespace) {
                        on_line(Line::Complete(line));
                    }
                }
            }
            self.buf.clear();
            chunk = rest;
        }
    }
}

// ---------------------------------------------------------------------------------
// Messages: what the child sends, what it is sent.

/// A line from the child, read as far as the bridge needs.
#[derive(Debug)]
enum FromChild<'a> {
    /// An answer; `id` is `None` when it is not one of the bridge's numeric ids.
    Response {
        id: Option<u64>,
        result: Option<&'a RawValue>,
        error: Option<&'a RawValue>,
    },
    Notification {
        method: Cow<'a, str>,
        params: Option<&'a RawValue>,
    },
    /// A request to the client (sampling, roots, elicitation, ping).
    Request {
        id: &'a RawValue,
        method: Cow<'a, str>,
    },
}

fn classify(line: &[u8]) -> Result<FromChild<'_>, String> {
    let text = std::str::from_utf8(line).map_err(|_| "not UTF-8".to_owned())?;
    let m: crate::mcp::RawMessage<'_> =
        serde_json::from_str(text).map_err(|e| format!("not a JSON-RPC message: {e}"))?;
    match (m.method, m.id) {
        (Some(method), Some(id)) => Ok(FromChild::Request { id, method }),
        (Some(method), None) => Ok(FromChild::Notification {
            method,
            params: m.params,
        }),
        (None, id) if m.result.is_some() || m.error.is_some() => Ok(FromChild::Response {
            id: id.and_then(|id| id.get().parse().ok()),
            result: m.result,
            error: m.error,
        }),
        (None, _) => Err("neither a request, a notification nor a response".to_owned()),
    }
}

/// The bridge's answer to a request the child sent its client.
fn answer_child_request(id: &RawValue, method: &str) -> String {
    if method == "ping" {
        return format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{},\"result\":{{}}}}\n",
            id.get()
        );
    }
    let message = format!(
        "the stdio bridge's client does not support {method:?} (no client capabilities were declared)"
    );
    format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":{},\"error\":{{\"code\":{METHOD_NOT_FOUND},\"message\":{}}}}}\n",
        id.get(),
        json_string(&message)
    )
}

fn cancelled_line(child_id: u64, reason: &str) -> String {
    format!(
        "{{\"jsonrpc\":\"2.0\",\"method\":\"notifications/cancelled\",\"params\":{{\"requestId\":{child_id},\"reason\":{}}}}}\n",
        json_string(reason)
    )
}

/// A request as the child gets it: the child-side id, the method, the params.
fn child_request(child_id: u64, method: &str, params: Option<&str>) -> String {
    let params = params
        .map(|p| format!(",\"params\":{p}"))
        .unwrap_or_default();
    format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":{child_id},\"method\":{}{params}}}\n",
        json_string(method)
    )
}

fn child_notification(method: &str, params: Option<&str>) -> String {
    let params = params
        .map(|p| format!(",\"params\":{p}"))
        .unwrap_or_default();
    format!(
        "{{\"jsonrpc\":\"2.0\",\"method\":{}{params}}}\n",
        json_string(method)
    )
}

/// `params` as the child gets them, and the client's progress token if there was one.
type ChildParams<'a> = (Option<Cow<'a, str>>, Option<Box<RawValue>>);

/// `params` for the child: the 2026 envelope keys removed from `_meta`, and a progress
/// token replaced by `child_id`. Params without `_meta` go through untouched.
fn rewrite_params(params: Option<&RawValue>, child_id: u64) -> Result<ChildParams<'_>, String> {
    #[derive(Deserialize)]
    struct HasMeta<'a> {
        #[serde(borrow, default, rename = "_meta")]
        meta: Option<&'a RawValue>,
    }
    let Some(params) = params else {
        return Ok((None, None));
    };
    let has: HasMeta<'_> =
        serde_json::from_str(params.get()).map_err(|e| format!("\"params\": {e}"))?;
    let Some(meta) = has.meta else {
        return Ok((Some(Cow::Borrowed(params.get())), None));
    };
    let mut meta: BTreeMap<String, Box<RawValue>> = serde_json::from_str(meta.get())
        .map_err(|e| format!("\"params._meta\" must be an object: {e}"))?;
    for key in ENVELOPE_KEYS {
        meta.remove(key);
    }
    let token = meta.remove("progressToken");
    if token.is_some() {
        let ours = RawValue::from_string(child_id.to_string()).map_err(|e| e.to_string())?;
        meta.insert("progressToken".to_owned(), ours);
    }
    let mut all: BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(params.get()).map_err(|e| format!("\"params\": {e}"))?;
    if meta.is_empty() {
        all.remove("_meta");
    } else {
        let meta = serde_json::value::to_raw_value(&meta).map_err(|e| e.to_string())?;
        all.insert("_meta".to_owned(), meta);
    }
    let text = serde_json::to_string(&all).map_err(|e| e.to_string())?;
    Ok((Some(Cow::Owned(text)), token))
}

/// The child-side request id a progress notification's token names.
fn progress_token(params: &RawValue) -> Option<u64> {
    #[derive(Deserialize)]
    struct Token<'a> {
        #[serde(borrow, rename = "progressToken")]
        token: &'a RawValue,
    }
    let t: Token<'_> = serde_json::from_str(params.get()).ok()?;
    t.token.get().parse().ok()
}

/// A child's progress notification as the client gets it: its own token back, as one
/// SSE event.
fn progress_event(params: &RawValue, client_token: &RawValue) -> Result<Bytes, String> {
    let mut all: BTreeMap<String, Box<RawValue>> =
        serde_json::from_str(params.get()).map_err(|e| e.to_string())?;
    all.insert("progressToken".to_owned(), client_token.to_owned());
    let params = serde_json::to_string(&all).map_err(|e| e.to_string())?;
    let message = format!(
        "{{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{params}}}"
    );
    Ok(sse_event(&message))
}

pub(crate) fn sse_event(message: &str) -> Bytes {
    Bytes::from(format!("event: message\ndata: {message}\n\n"))
}

/// The child's answer with the client's id back; for a 2026-07-28 request (`modern`
/// names its method) the result completed to that generation's shape.
fn client_response(id: &RawValue, reply: &ChildReply, modern: Option<Method>) -> String {
    match (&reply.result, &reply.error) {
        (_, Some(error)) => format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{},\"error\":{}}}",
            id.get(),
            error.get()
        ),
        (Some(result), None) => {
            let result = match modern {
                Some(method) => complete_modern_result(method, result.get()),
                None => Cow::Borrowed(result.get()),
            };
            format!(
                "{{\"jsonrpc\":\"2.0\",\"id\":{},\"result\":{result}}}",
                id.get()
            )
        }
        (None, None) => error_text(
            Some(id),
            CHILD_EXITED,
            "the stdio server answered without a result or an error",
        ),
    }
}

/// Methods whose 2026-07-28 results carry cache hints (`ttlMs`, `cacheScope`).
fn cacheable(method: Method) -> bool {
    matches!(
        method,
        Method::ToolsList
            | Method::PromptsList
            | Method::ResourcesList
            | Method::ResourcesTemplatesList
            | Method::ResourcesRead
    )
}

/// Add what a 2026-07-28 result must have and a 2025-era child leaves out:
/// `resultType` "complete", and for cacheable methods `ttlMs` 0 and `cacheScope`
/// "private". Members the child sent are kept; a result that is not an object is
/// returned as is.
pub(crate) fn complete_modern_result(method: Method, result: &str) -> Cow<'_, str> {
    #[derive(Deserialize)]
    struct Present {
        #[serde(default, rename = "resultType")]
        result_type: Option<serde::de::IgnoredAny>,
        #[serde(default, rename = "ttlMs")]
        ttl_ms: Option<serde::de::IgnoredAny>,
        #[serde(default, rename = "cacheScope")]
        cache_scope: Option<serde::de::IgnoredAny>,
    }
    let Some(rest) = result.trim_start().strip_prefix('{') else {
        return Cow::Borrowed(result);
    };
    let Ok(present) = serde_json::from_str::<Present>(result) else {
        return Cow::Borrowed(result);
    };
    let mut add = Vec::new();
    if present.result_type.is_none() {
        add.push("\"resultType\":\"complete\"");
    }
    if cacheable(method) {
        if present.ttl_ms.is_none() {
            add.push("\"ttlMs\":0");
        }
        if present.cache_scope.is_none() {
            add.push("\"cacheScope\":\"private\"");
        }
    }
    if add.is_empty() {
        return Cow::Borrowed(result);
    }
    let sep = if rest.trim_start().starts_with('}') {
        ""
    } else {
        ","
    };
    Cow::Owned(format!("{{{}{sep}{rest}", add.join(",")))
}

/// The protocol version answered to a 2025-generation `initialize`: the client's when
/// it is a served version not newer than the child's, else the child's own.
fn negotiate_version<'a>(requested: Option<&'a str>, child: &'a str) -> &'a str {
    match requested {
        Some(r) if LEGACY_VERSIONS.contains(&r) && r <= child => r,
        _ => child,
    }
}

fn initialize_result(init: &Init, version: &str) -> String {
    let mut out = format!(
        "{{\"protocolVersion\":{},\"capabilities\":{},\"serverInfo\":{}",
        json_string(version),
        init.capabilities.get(),
        init.server_info.get()
    );
    if let Some(instructions) = &init.instructions {
        out.push_str(",\"instructions\":");
        out.push_str(instructions.get());
    }
    out.push('}');
    out
}

pub(crate) fn supported_versions() -> Vec<&'static str> {
    let mut versions = LEGACY_VERSIONS.to_vec();
    versions.push(mcp::MODERN_VERSION);
    versions
}

fn discover_result(init: &Init) -> String {
    let mut out = format!(
        "{{\"resultType\":\"complete\",\"supportedVersions\":{},\"capabilities\":{}",
        serde_json::Value::from(supported_versions()),
        init.capabilities.get()
    );
    if let Some(instructions) = &init.instructions {
        out.push_str(",\"instructions\":");
        out.push_str(instructions.get());
    }
    out.push_str(",\"ttlMs\":0,\"cacheScope\":\"private\",\"_meta\":{\"io.modelcontextprotocol/serverInfo\":");
    out.push_str(init.server_info.get());
    out.push_str("}}");
    out
}

pub(crate) fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// The start of a line, for a log message.
fn preview(bytes: &[u8]) -> String {
    let cut = bytes.len().min(200);
    String::from_utf8_lossy(&bytes[..cut]).into_owned()
}

fn random_token() -> Result<String, String> {
    let mut bytes = [0u8; 18];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "no system randomness".to_owned())?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

// ---------------------------------------------------------------------------------
// Generations.

/// Which protocol generation a request belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Generation {
    /// 2025-03-26 … 2025-11-25: `initialize` and sessions.
    Sessions,
    /// 2026-07-28: stateless.
    Stateless,
}

/// Tell a request's generation (and check its headers against its body) as the proxy
/// does; a modern version other than 2026-07-28 is refused.
fn generation(headers: &HeaderMap, envelope: &Envelope<'_>) -> Result<Generation, Refusal> {
    let modern = mcp::check_headers(headers, envelope).map_err(Refusal::from)?;
    if !modern {
        return Ok(Generation::Sessions);
    }
    let header = headers
        .get(mcp::HEADER_PROTOCOL_VERSION)
        .and_then(|v| v.to_str().ok());
    let meta = match envelope {
        Envelope::Single(m) => m.meta_version.as_deref(),
        Envelope::Batch(_) => None,
    };
    match header.or(meta) {
        Some(v) if v != mcp::MODERN_VERSION => Err(Refusal::Version(v.to_owned())),
        _ => Ok(Generation::Stateless),
    }
}

// ---------------------------------------------------------------------------------
// HTTP.

/// An answer the bridge gives itself, before a request reaches the child.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    Parse(String),
    Invalid(String),
    Header(String),
    Batch,
    Version(String),
    TooLarge,
    MissingSession,
    UnknownSession,
    Busy,
    NotReady,
    Stopping,
}

impl From<Rejection> for Refusal {
    fn from(r: Rejection) -> Refusal {
        match r {
            Rejection::Parse(m) => Refusal::Parse(m),
            Rejection::Invalid(m) => Refusal::Invalid(m),
            Rejection::Header(m) => Refusal::Header(m),
        }
    }
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::Parse(_)
            | Refusal::Invalid(_)
            | Refusal::Header(_)
            | Refusal::Batch
            | Refusal::Version(_)
            | Refusal::MissingSession => StatusCode::BAD_REQUEST,
            Refusal::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::UnknownSession => StatusCode::NOT_FOUND,
            Refusal::Busy | Refusal::NotReady | Refusal::Stopping => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    fn code(&self) -> i64 {
        use crate::error::code;
        match self {
            Refusal::Parse(_) => code::PARSE_ERROR,
            Refusal::Invalid(_) | Refusal::Batch | Refusal::MissingSession => code::INVALID_REQUEST,
            Refusal::Header(_) => code::HEADER_MISMATCH,
            Refusal::Version(_) => UNSUPPORTED_VERSION,
            Refusal::TooLarge => code::BODY_TOO_LARGE,
            Refusal::UnknownSession => code::UNKNOWN_SESSION,
            Refusal::Busy | Refusal::NotReady | Refusal::Stopping => code::UPSTREAM_UNAVAILABLE,
        }
    }

    fn message(&self) -> String {
        match self {
            Refusal::Parse(m) => format!("request body is not valid JSON: {m}"),
            Refusal::Invalid(m) => format!("invalid JSON-RPC request: {m}"),
            Refusal::Header(m) => m.clone(),
            Refusal::Batch => {
                "JSON-RPC batches are not supported by the stdio bridge; send one message per request"
                    .to_owned()
            }
            Refusal::Version(v) => format!("Unsupported protocol version {v:?}"),
            Refusal::TooLarge => "request body exceeds the message size bound".to_owned(),
            Refusal::MissingSession => {
                "missing Mcp-Session-Id header (send initialize first)".to_owned()
            }
            Refusal::UnknownSession => "unknown or expired session; initialize again".to_owned(),
            Refusal::Busy => "too many requests in flight to the stdio server; retry".to_owned(),
            Refusal::NotReady => "the stdio server is starting; retry".to_owned(),
            Refusal::Stopping => "the stdio bridge is shutting down".to_owned(),
        }
    }

    fn data(&self) -> Option<String> {
        match self {
            Refusal::Version(v) => Some(
                serde_json::json!({"requested": v, "supported": supported_versions()}).to_string(),
            ),
            _ => None,
        }
    }

    fn into_response(self, id: Option<&RawValue>) -> Response<Body> {
        let body = error_text_with(id, self.code(), &self.message(), self.data().as_deref());
        let mut resp = json_response(self.status(), body);
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

fn error_text(id: Option<&RawValue>, code: i64, message: &str) -> String {
    error_text_with(id, code, message, None)
}

fn error_text_with(id: Option<&RawValue>, code: i64, message: &str, data: Option<&str>) -> String {
    error_answer_with(id.map_or("null", RawValue::get), code, message, data)
}

/// A JSON-RPC error answer to the request whose id is `id` (raw JSON text).
pub(crate) fn error_answer(id: &str, code: i64, message: &str) -> String {
    error_answer_with(id, code, message, None)
}

fn error_answer_with(id: &str, code: i64, message: &str, data: Option<&str>) -> String {
    let data = data.map(|d| format!(",\"data\":{d}")).unwrap_or_default();
    format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"error\":{{\"code\":{code},\"message\":{}{data}}}}}",
        json_string(message)
    )
}

fn json_response(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(body::full(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn accepted() -> Response<Body> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::ACCEPTED;
    resp
}

async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    if req.uri().path() != shared.path {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    match *req.method() {
        HttpMethod::POST => post(shared, req).await,
        HttpMethod::DELETE => delete(shared, req.headers()),
        _ => {
            let mut resp = plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "use POST (the stdio bridge offers no GET stream)\n",
            );
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST, DELETE"));
            resp
        }
    }
}

fn session_header(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(mcp::HEADER_SESSION)
        .and_then(|v| v.to_str().ok())
}

fn delete(shared: &Shared, headers: &HeaderMap) -> Response<Body> {
    let Some(session) = session_header(headers) else {
        return Refusal::MissingSession.into_response(None);
    };
    let mut state = shared.state();
    if state.sessions.remove(session).is_none() {
        return Refusal::UnknownSession.into_response(None);
    }
    state.by_client.retain(|(s, _), _| s != session);
    plain(StatusCode::OK, "")
}

/// Read a request body of at most `max` bytes within `limit`.
async fn read_body(body: Incoming, max: usize, limit: Duration) -> Result<Bytes, Refusal> {
    let collect = http_body_util::Limited::new(body, max).collect();
    let collected = tokio::time::timeout(limit, collect)
        .await
        .map_err(|_| Refusal::Invalid("request body not received in time".to_owned()))?;
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Refusal::TooLarge),
        Err(e) => Err(Refusal::Invalid(format!(
            "cannot read the request body: {e}"
        ))),
    }
}

async fn post(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let max = shared.options.max_message_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Refusal::TooLarge.into_response(None);
    }
    let bytes = match read_body(body, max, shared.options.request_timeout).await {
        Ok(b) => b,
        Err(r) => return r.into_response(None),
    };
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Refusal::Batch.into_response(None);
    }
    let envelope = match mcp::parse(&bytes) {
        Ok(e) => e,
        Err(r) => return Refusal::from(r).into_response(None),
    };
    let generation = match generation(&parts.headers, &envelope) {
        Ok(g) => g,
        Err(r) => return r.into_response(envelope.id()),
    };
    let Envelope::Single(message) = envelope else {
        return Refusal::Batch.into_response(None);
    };
    let initialize = message.rpc == Some(Method::Initialize);
    let generation = if initialize {
        Generation::Sessions
    } else {
        generation
    };
    let session = match generation {
        Generation::Sessions if !initialize => match check_session(shared, &parts.headers) {
            Ok(s) => Some(s),
            Err(r) => return r.into_response(message.id),
        },
        _ => None,
    };
    match message.kind {
        Kind::Response => accepted(),
        Kind::Notification => {
            notify(shared, &message, session.as_deref());
            accepted()
        }
        Kind::Request => {
            let Some(id) = message.id else {
                return Refusal::Invalid("a request needs an id".to_owned()).into_response(None);
            };
            if initialize {
                return initialize_answer(shared, id, message.params).await;
            }
            if generation == Generation::Stateless && message.rpc == Some(Method::Discover) {
                return discover_answer(shared, id).await;
            }
            let call = Call {
                message: &message,
                id,
                generation,
                session,
                sse: accepts_sse(&parts.headers),
            };
            forward(shared, call).await
        }
    }
}

fn accepts_sse(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("text/event-stream"))
}

/// The session a 2025-generation request names, which must be live.
fn check_session(shared: &Shared, headers: &HeaderMap) -> Result<String, Refusal> {
    let session = session_header(headers).ok_or(Refusal::MissingSession)?;
    let mut state = shared.state();
    match state.sessions.get_mut(session) {
        Some(used) => {
            *used = Instant::now();
            Ok(session.to_owned())
        }
        None => Err(Refusal::UnknownSession),
    }
}

fn new_session(shared: &Shared) -> Result<String, Refusal> {
    let id = random_token().map_err(|_| Refusal::NotReady)?;
    let mut state = shared.state();
    if state.sessions.len() >= MAX_SESSIONS {
        let oldest = state
            .sessions
            .iter()
            .min_by_key(|(_, used)| **used)
            .map(|(s, _)| s.clone());
        if let Some(oldest) = oldest {
            state.sessions.remove(&oldest);
            state.by_client.retain(|(s, _), _| *s != oldest);
        }
    }
    state.sessions.insert(id.clone(), Instant::now());
    Ok(id)
}

/// The cached `InitializeResult`, waiting (up to `request_timeout`) for a first child.
async fn cached_init(shared: &Shared) -> Result<Arc<Init>, Refusal> {
    if let Some(init) = shared.state().init.clone() {
        return Ok(init);
    }
    let deadline = tokio::time::Instant::now() + shared.options.request_timeout;
    wait_ready(shared, deadline).await?;
    shared.state().init.clone().ok_or(Refusal::NotReady)
}

async fn initialize_answer(
    shared: &Shared,
    id: &RawValue,
    params: Option<&RawValue>,
) -> Response<Body> {
    #[derive(Deserialize)]
    struct Requested {
        #[serde(default, rename = "protocolVersion")]
        version: Option<String>,
    }
    let init = match cached_init(shared).await {
        Ok(i) => i,
        Err(r) => return r.into_response(Some(id)),
    };
    let requested = params
        .and_then(|p| serde_json::from_str::<Requested>(p.get()).ok())
        .and_then(|r| r.version);
    let version = negotiate_version(requested.as_deref(), &init.protocol_version);
    let session = match new_session(shared) {
        Ok(s) => s,
        Err(r) => return r.into_response(Some(id)),
    };
    let body = format!(
        "{{\"jsonrpc\":\"2.0\",\"id\":{},\"result\":{}}}",
        id.get(),
        initialize_result(&init, version)
    );
    let mut resp = json_response(StatusCode::OK, body);
    if let Ok(value) = HeaderValue::from_str(&session) {
        resp.headers_mut().insert(mcp::HEADER_SESSION, value);
    }
    tracing::debug!(protocol = version, "stdio bridge session started");
    resp
}

async fn discover_answer(shared: &Shared, id: &RawValue) -> Response<Body> {
    match cached_init(shared).await {
        Ok(init) => json_response(
            StatusCode::OK,
            format!(
                "{{\"jsonrpc\":\"2.0\",\"id\":{},\"result\":{}}}",
                id.get(),
                discover_result(&init)
            ),
        ),
        Err(r) => r.into_response(Some(id)),
    }
}

/// A client notification: swallowed, translated or forwarded (never answered).
fn notify(shared: &Shared, message: &mcp::Message<'_>, session: Option<&str>) {
    let Some(method) = message.method.as_deref() else {
        return;
    };
    let phase = *shared.phase.borrow();
    if !phase.ready {
        tracing::debug!(%method, "stdio server not ready; client notification dropped");
        return;
    }
    let line = match message.rpc {
        Some(Method::NotificationsInitialized) => return,
        Some(Method::NotificationsCancelled) => {
            let Some(session) = session else {
                tracing::debug!(
                    "stateless notifications/cancelled dropped (such clients cancel by closing the request)"
                );
                return;
            };
            match cancel_target(shared, session, message.params) {
                Some(child_id) => cancelled_line(child_id, "cancelled by the client"),
                None => return,
            }
        }
        _ => match rewrite_params(message.params, 0) {
            Ok((params, _)) => child_notification(method, params.as_deref()),
            Err(e) => {
                tracing::debug!(%method, error = %e, "client notification dropped");
                return;
            }
        },
    };
    shared.send_now(phase.epoch, line);
}

/// The child-side id of the request a session's `notifications/cancelled` names.
fn cancel_target(shared: &Shared, session: &str, params: Option<&RawValue>) -> Option<u64> {
    #[derive(Deserialize)]
    struct Cancelled<'a> {
        #[serde(borrow, rename = "requestId")]
        request_id: &'a RawValue,
    }
    let params: Cancelled<'_> = serde_json::from_str(params?.get()).ok()?;
    let key = (session.to_owned(), params.request_id.get().to_owned());
    shared.state().by_client.get(&key).copied()
}

/// Wait until a child is ready (or `deadline`): its epoch.
async fn wait_ready(shared: &Shared, deadline: tokio::time::Instant) -> Result<u64, Refusal> {
    let mut phase = shared.phase.subscribe();
    let ready = phase.wait_for(|p| p.ready || p.stopped);
    match tokio::time::timeout_at(deadline, ready).await {
        Ok(Ok(p)) if p.ready => Ok(p.epoch),
        Ok(_) => Err(Refusal::Stopping),
        Err(_) => Err(Refusal::NotReady),
    }
}

/// A forwarded request until it is answered: unless [`InFlight::finish`]ed, the
/// child is told the client gave up.
struct InFlight {
    shared: Arc<Shared>,
    child_id: u64,
    done: bool,
}

impl InFlight {
    fn finish(mut self) {
        self.done = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.done {
            self.shared.abandon(self.child_id);
        }
    }
}

/// A client request on its way to the child.
struct Call<'m, 'b> {
    message: &'m mcp::Message<'b>,
    id: &'b RawValue,
    generation: Generation,
    session: Option<String>,
    sse: bool,
}

/// How a forwarded request ended, before it becomes text.
type Outcome = Result<Result<ChildReply, Gone>, oneshot::error::RecvError>;

/// The text answered for a forwarded request's outcome.
fn outcome_text(id: &RawValue, outcome: Outcome, modern: Option<Method>) -> String {
    match outcome {
        Ok(Ok(reply)) => client_response(id, &reply, modern),
        Ok(Err(Gone::ShuttingDown)) => error_text(
            Some(id),
            CHILD_EXITED,
            "the stdio server was stopped (the bridge is shutting down)",
        ),
        Ok(Err(Gone::Exited)) | Err(_) => {
            error_text(Some(id), CHILD_EXITED, "the stdio server exited; retry")
        }
    }
}

fn timeout_text(id: &RawValue, limit: Duration) -> String {
    error_text(
        Some(id),
        crate::error::code::UPSTREAM_TIMEOUT,
        &format!("the stdio server did not answer within {limit:?}"),
    )
}

/// Send a request to the child and answer with its reply.
async fn forward(shared: &Arc<Shared>, call: Call<'_, '_>) -> Response<Body> {
    let id = call.id;
    let Ok(permit) = shared.permits.clone().try_acquire_owned() else {
        return Refusal::Busy.into_response(Some(id));
    };
    let limit = shared.options.request_timeout;
    let deadline = tokio::time::Instant::now() + limit;
    let epoch = match wait_ready(shared, deadline).await {
        Ok(e) => e,
        Err(r) => return r.into_response(Some(id)),
    };
    let child_id = shared.next_id();
    let (params, token) = match rewrite_params(call.message.params, child_id) {
        Ok(p) => p,
        Err(e) => return Refusal::Invalid(e).into_response(Some(id)),
    };
    let method = call.message.method.as_deref().unwrap_or_default();
    let line = child_request(child_id, method, params.as_deref());
    let progress = match token {
        Some(token) if call.sse => {
            let (tx, rx) = mpsc::channel(PROGRESS_QUEUE);
            Some(((tx, token), rx))
        }
        _ => None,
    };
    let (reply, answer) = oneshot::channel();
    let (route, events) = match progress {
        Some((route, events)) => (Some(route), Some(events)),
        None => (None, None),
    };
    let pending = Pending {
        epoch,
        reply,
        progress: route,
        cancel_key: call.session.map(|s| (s, id.get().to_owned())),
    };
    let modern = match call.generation {
        Generation::Stateless => call.message.rpc,
        Generation::Sessions => None,
    };
    if shared.register(child_id, pending, false).is_err() {
        let text = error_text(Some(id), CHILD_EXITED, "the stdio server exited; retry");
        return json_response(StatusCode::OK, text);
    }
    let guard = InFlight {
        shared: shared.clone(),
        child_id,
        done: false,
    };
    let line = Bytes::from(line);
    let queued =
        tokio::time::timeout_at(deadline, shared.outbox.send(Outgoing { epoch, line })).await;
    if !matches!(queued, Ok(Ok(()))) {
        return json_response(StatusCode::OK, timeout_text(id, limit));
    }
    if let Some(events) = events {
        let stream = Stream {
            id: id.to_owned(),
            answer,
            events,
            guard,
            permit,
            deadline,
            limit,
            modern,
        };
        return stream.respond();
    }
    let text = match tokio::time::timeout_at(deadline, answer).await {
        Ok(outcome) => {
            guard.finish();
            outcome_text(id, outcome, modern)
        }
        Err(_) => timeout_text(id, limit),
    };
    drop(permit);
    json_response(StatusCode::OK, text)
}

/// A request answered as an SSE stream: its progress events, then its response.
struct Stream {
    id: Box<RawValue>,
    answer: oneshot::Receiver<Result<ChildReply, Gone>>,
    events: mpsc::Receiver<Bytes>,
    guard: InFlight,
    permit: tokio::sync::OwnedSemaphorePermit,
    deadline: tokio::time::Instant,
    limit: Duration,
    modern: Option<Method>,
}

impl Stream {
    fn respond(self) -> Response<Body> {
        let (tx, rx) = mpsc::channel::<Bytes>(PROGRESS_QUEUE);
        tokio::spawn(self.relay(tx));
        let mut resp = Response::new(crate::body::Channel { rx }.boxed());
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        resp
    }

    async fn relay(self, tx: mpsc::Sender<Bytes>) {
        let Stream {
            id,
            mut answer,
            mut events,
            guard,
            permit,
            deadline,
            limit,
            modern,
        } = self;
        let _permit = permit;
        let sleep = tokio::time::sleep_until(deadline);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                biased;
                Some(event) = events.recv() => {
                    if tx.send(event).await.is_err() {
                        return; // the client went away: `guard` cancels
                    }
                }
                outcome = &mut answer => {
                    guard.finish();
                    // Progress the child sent before its answer goes first.
                    while let Ok(event) = events.try_recv() {
                        let _ = tx.send(event).await;
                    }
                    let _ = tx.send(sse_event(&outcome_text(&id, outcome, modern))).await;
                    return;
                }
                () = &mut sleep => {
                    let _ = tx.send(sse_event(&timeout_text(&id, limit))).await;
                    return;
                }
                () = tx.closed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).expect("valid JSON")
    }

    fn lines(max: usize, chunks: &[&[u8]]) -> Vec<String> {
        let mut buf = LineBuf::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            buf.feed(chunk, |line| {
                out.push(match line {
                    Line::Complete(l) => String::from_utf8_lossy(l).into_owned(),
                    Line::TooLong { prefix, len } => {
                        format!("TOO LONG {len}: {}", String::from_utf8_lossy(prefix))
                    }
                })
            });
        }
        out
    }

    #[test]
    fn lines_are_split_across_chunks_and_crlf_and_blank_lines_handled() {
        assert_eq!(
            lines(100, &[b"{\"a\":", b"1}\n{\"b\"", b":2}\r\n\n  \n{\"c\":3}"]),
            ["{\"a\":1}", "{\"b\":2}"]
        );
    }

    #[test]
    fn a_line_over_the_bound_is_reported_once_and_the_next_one_survives() {
        let out = lines(8, &[b"0123456789", b"abcdef", b"\nok\n"]);
        assert_eq!(out, ["TOO LONG 16: 01234567", "ok"]);
        // Exactly at the bound is fine; one more byte is not.
        assert_eq!(lines(3, &[b"abc\nabcd\n"]), ["abc", "TOO LONG 4: abc"]);
    }

    #[test]
    fn the_buffer_never_holds_more_than_the_bound() {
        let mut buf = LineBuf::new(16);
        for _ in 0..1000 {
            buf.feed(&[b'x'; 1000], |_| {});
        }
        assert!(buf.buf.len() <= 16);
        assert_eq!(buf.over, Some(1_000_000));
    }

    #[test]
    fn requests_get_the_child_side_id_and_params_stay_byte_for_byte() {
        let params = raw(r#"{"name":"echo","arguments":{"b":1,  "a":"x"}}"#);
        let (p, token) = rewrite_params(Some(&params), 42).expect("rewritten");
        assert!(token.is_none());
        assert!(matches!(p, Some(Cow::Borrowed(_))));
        let line = child_request(42, "tools/call", p.as_deref());
        assert_eq!(
            line,
            "{\"jsonrpc\":\"2.0\",\"id\":42,\"method\":\"tools/call\",\"params\":{\"name\":\"echo\",\"arguments\":{\"b\":1,  \"a\":\"x\"}}}\n"
        );
        assert_eq!(
            child_request(7, "tools/list", None),
            "{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"tools/list\"}\n"
        );
    }

    #[test]
    fn progress_tokens_are_rewritten_and_the_2026_envelope_is_removed() {
        let params = raw(
            r#"{"name":"slow","arguments":{"n":1},"_meta":{"progressToken":"tok-1","io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"x"},"io.modelcontextprotocol/clientCapabilities":{},"trace":"keep"}}"#,
        );
        let (p, token) = rewrite_params(Some(&params), 9).expect("rewritten");
        assert_eq!(token.expect("token").get(), "\"tok-1\"");
        let v: serde_json::Value =
            serde_json::from_str(p.as_deref().expect("params")).expect("JSON");
        assert_eq!(
            v,
            serde_json::json!({"name": "slow", "arguments": {"n": 1}, "_meta": {"progressToken": 9, "trace": "keep"}})
        );
        // Only envelope keys: `_meta` goes away entirely.
        let params = raw(r#"{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}"#);
        let (p, token) = rewrite_params(Some(&params), 1).expect("rewritten");
        assert_eq!(p.as_deref(), Some("{}"));
        assert!(token.is_none());
        // A `_meta` that is not an object is refused, not guessed at.
        assert!(rewrite_params(Some(&raw(r#"{"_meta":[1]}"#)), 1).is_err());
    }

    #[test]
    fn progress_is_routed_by_the_child_side_token_and_given_back_the_clients() {
        let params = raw(r#"{"progressToken":17,"progress":1,"total":3}"#);
        assert_eq!(progress_token(&params), Some(17));
        assert_eq!(progress_token(&raw(r#"{"progressToken":"abc"}"#)), None);
        let event = progress_event(&params, &raw("\"client-tok\"")).expect("event");
        let text = String::from_utf8_lossy(&event).into_owned();
        let data = text
            .strip_prefix("event: message\ndata: ")
            .and_then(|t| t.strip_suffix("\n\n"))
            .expect("one SSE event");
        let v: serde_json::Value = serde_json::from_str(data).expect("JSON");
        assert_eq!(v["method"], "notifications/progress");
        assert_eq!(v["params"]["progressToken"], "client-tok");
        assert_eq!(v["params"]["total"], 3);
    }

    #[test]
    fn responses_get_the_clients_id_back() {
        let reply = ChildReply {
            result: Some(raw(r#"{"content":[{"type":"text","text":"hi"}]}"#)),
            error: None,
        };
        assert_eq!(
            client_response(&raw("\"abc\""), &reply, None),
            r#"{"jsonrpc":"2.0","id":"abc","result":{"content":[{"type":"text","text":"hi"}]}}"#
        );
        let reply = ChildReply {
            result: None,
            error: Some(raw(r#"{"code":-32602,"message":"bad"}"#)),
        };
        assert_eq!(
            client_response(&raw("7"), &reply, Some(Method::ToolsCall)),
            r#"{"jsonrpc":"2.0","id":7,"error":{"code":-32602,"message":"bad"}}"#
        );
        let none = ChildReply {
            result: None,
            error: None,
        };
        let v: serde_json::Value =
            serde_json::from_str(&client_response(&raw("7"), &none, None)).expect("JSON");
        assert_eq!(v["error"]["code"], CHILD_EXITED);
    }

    #[test]
    fn modern_results_are_completed_without_touching_what_the_child_sent() {
        assert_eq!(
            complete_modern_result(Method::ToolsCall, r#"{"content":[]}"#),
            r#"{"resultType":"complete","content":[]}"#
        );
        assert_eq!(
            complete_modern_result(Method::ToolsList, r#"{ }"#),
            r#"{"resultType":"complete","ttlMs":0,"cacheScope":"private" }"#
        );
        assert_eq!(
            complete_modern_result(
                Method::ToolsList,
                r#"{"tools":[],"ttlMs":5,"resultType":"complete"}"#
            ),
            r#"{"cacheScope":"private","tools":[],"ttlMs":5,"resultType":"complete"}"#
        );
        let full = r#"{"resultType":"input_required","x":1}"#;
        assert!(matches!(
            complete_modern_result(Method::ToolsCall, full),
            Cow::Borrowed(_)
        ));
        assert_eq!(complete_modern_result(Method::ToolsCall, "[1]"), "[1]");
    }

    #[test]
    fn child_lines_are_classified() {
        let FromChild::Response { id, result, .. } =
            classify(br#"{"jsonrpc":"2.0","id":12,"result":{}}"#).expect("response")
        else {
            panic!("not a response");
        };
        assert_eq!(id, Some(12));
        assert_eq!(result.map(RawValue::get), Some("{}"));
        let FromChild::Response { id, error, .. } =
            classify(br#"{"jsonrpc":"2.0","id":"x","error":{"code":1,"message":"m"}}"#)
                .expect("response")
        else {
            panic!("not a response");
        };
        assert_eq!(id, None);
        assert!(error.is_some());
        assert!(matches!(
            classify(br#"{"jsonrpc":"2.0","method":"notifications/message","params":{}}"#),
            Ok(FromChild::Notification { .. })
        ));
        let Ok(FromChild::Request { id, method }) = classify(
            br#"{"jsonrpc":"2.0","id":"s1","method":"sampling/createMessage","params":{}}"#,
        ) else {
            panic!("not a request");
        };
        let answer = answer_child_request(id, &method);
        let v: serde_json::Value = serde_json::from_str(&answer).expect("JSON");
        assert_eq!(v["id"], "s1");
        assert_eq!(v["error"]["code"], METHOD_NOT_FOUND);
        assert!(answer.ends_with('\n'));
        let ping = answer_child_request(&raw("3"), "ping");
        assert_eq!(ping, "{\"jsonrpc\":\"2.0\",\"id\":3,\"result\":{}}\n");
        for bad in [
            &b"not json"[..],
            b"[1,2]",
            br#"{"jsonrpc":"2.0"}"#,
            b"\xff\xfe",
        ] {
            assert!(classify(bad).is_err(), "{bad:?}");
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).expect("header"));
        }
        h
    }

    fn generation_of(pairs: &[(&'static str, &str)], body: &str) -> Result<Generation, Refusal> {
        let envelope = mcp::parse(body.as_bytes()).map_err(Refusal::from)?;
        generation(&headers(pairs), &envelope)
    }

    #[test]
    fn generations_are_told_apart_by_header_or_meta() {
        let list = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
        assert_eq!(generation_of(&[], list), Ok(Generation::Sessions));
        assert_eq!(
            generation_of(&[("mcp-protocol-version", "2025-11-25")], list),
            Ok(Generation::Sessions)
        );
        assert_eq!(
            generation_of(
                &[
                    ("mcp-protocol-version", "2026-07-28"),
                    ("mcp-method", "tools/list")
                ],
                list
            ),
            Ok(Generation::Stateless)
        );
        let modern = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;
        assert_eq!(
            generation_of(
                &[
                    ("mcp-protocol-version", "2026-07-28"),
                    ("mcp-method", "tools/call"),
                    ("mcp-name", "echo")
                ],
                modern
            ),
            Ok(Generation::Stateless)
        );
        // `_meta` alone says modern, but then the headers are required.
        assert!(matches!(
            generation_of(&[], modern),
            Err(Refusal::Header(_))
        ));
        // Headers must agree with the body.
        assert!(matches!(
            generation_of(
                &[
                    ("mcp-protocol-version", "2026-07-28"),
                    ("mcp-method", "tools/call"),
                    ("mcp-name", "other")
                ],
                modern
            ),
            Err(Refusal::Header(_))
        ));
        // A later modern version than the bridge serves.
        let future = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2027-01-01"}}}"#;
        let refused = generation_of(
            &[
                ("mcp-protocol-version", "2027-01-01"),
                ("mcp-method", "tools/list"),
            ],
            future,
        );
        assert_eq!(refused, Err(Refusal::Version("2027-01-01".to_owned())));
        let refusal = Refusal::Version("2027-01-01".to_owned());
        assert_eq!(refusal.status(), StatusCode::BAD_REQUEST);
        assert_eq!(refusal.code(), UNSUPPORTED_VERSION);
        let data: serde_json::Value =
            serde_json::from_str(&refusal.data().expect("data")).expect("JSON");
        assert_eq!(data["supported"][3], "2026-07-28");
    }

    #[test]
    fn initialize_answers_the_clients_version_when_the_child_speaks_it() {
        assert_eq!(
            negotiate_version(Some("2025-03-26"), "2025-11-25"),
            "2025-03-26"
        );
        assert_eq!(
            negotiate_version(Some("2025-11-25"), "2025-11-25"),
            "2025-11-25"
        );
        assert_eq!(
            negotiate_version(Some("2025-11-25"), "2025-06-18"),
            "2025-06-18"
        );
        assert_eq!(
            negotiate_version(Some("2026-07-28"), "2025-11-25"),
            "2025-11-25"
        );
        assert_eq!(
            negotiate_version(Some("1999-01-01"), "2025-06-18"),
            "2025-06-18"
        );
        assert_eq!(negotiate_version(None, "2025-06-18"), "2025-06-18");
        // A child on an older revision than the client asks for: the child's.
        assert_eq!(
            negotiate_version(Some("2025-06-18"), "2024-11-05"),
            "2024-11-05"
        );
        assert_eq!(
            negotiate_version(Some("2025-06-18"), "2026-07-28"),
            "2025-06-18"
        );
    }

    fn init() -> Init {
        serde_json::from_str(
            r#"{"protocolVersion":"2025-11-25","capabilities":{"tools":{"listChanged":true}},"serverInfo":{"name":"child","version":"1"},"instructions":"use echo","extra":1}"#,
        )
        .expect("init")
    }

    #[test]
    fn discover_is_the_childs_initialize_result_in_the_2026_shape() {
        let v: serde_json::Value = serde_json::from_str(&discover_result(&init())).expect("JSON");
        assert_eq!(
            v,
            serde_json::json!({
                "resultType": "complete",
                "supportedVersions": ["2025-03-26", "2025-06-18", "2025-11-25", "2026-07-28"],
                "capabilities": {"tools": {"listChanged": true}},
                "instructions": "use echo",
                "ttlMs": 0,
                "cacheScope": "private",
                "_meta": {"io.modelcontextprotocol/serverInfo": {"name": "child", "version": "1"}}
            })
        );
        let v: serde_json::Value =
            serde_json::from_str(&initialize_result(&init(), "2025-06-18")).expect("JSON");
        assert_eq!(v["protocolVersion"], "2025-06-18");
        assert_eq!(v["serverInfo"]["name"], "child");
        assert_eq!(v["instructions"], "use echo");
    }

    #[test]
    fn the_bridges_own_messages_are_single_json_lines() {
        for line in [
            initialize_line(1),
            cancelled_line(5, "gone \"quoted\"\n"),
            child_notification("notifications/roots/list_changed", None),
        ] {
            let (body, end) = line.split_at(line.len() - 1);
            assert_eq!(end, "\n");
            assert!(!body.contains('\n'), "{line}");
            let _: serde_json::Value = serde_json::from_str(body).expect("JSON");
        }
        let v: serde_json::Value =
            serde_json::from_str(initialize_line(1).trim_end()).expect("JSON");
        assert_eq!(v["params"]["protocolVersion"], CHILD_VERSION);
        assert_eq!(v["params"]["clientInfo"]["name"], "toolmesh-stdio-bridge");
        assert_eq!(v["params"]["capabilities"], serde_json::json!({}));
    }

    #[test]
    fn error_bodies_carry_the_id_when_it_was_read() {
        let v: serde_json::Value =
            serde_json::from_str(&error_text(Some(&raw("\"a\"")), -1, "m")).expect("JSON");
        assert_eq!(v["id"], "a");
        let v: serde_json::Value = serde_json::from_str(&error_text(None, -1, "m")).expect("JSON");
        assert!(v["id"].is_null());
    }

    #[test]
    fn tokens_are_random_and_url_safe() {
        let a = random_token().expect("token");
        let b = random_token().expect("token");
        assert_ne!(a, b);
        assert_eq!(a.len(), 24);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
    }
}
