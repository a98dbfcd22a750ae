//! A stdio MCP server, served as Streamable HTTP: server-side mode's `--stdio`.
//!
//! Most MCP servers speak only stdio (one JSON-RPC message per line on stdin and
//! stdout). [`Bridge`] runs one as a child process and serves it on a loopback port at
//! an unguessable path (`/mcp/<random>`) that only this sidecar's request path uses,
//! so the proxy relays to it exactly as to any HTTP upstream: policy, audit, sessions
//! and mutual TLS stay where they are.
//!
//! The child is one MCP session; many HTTP clients share it. The bridge initializes it
//! itself (protocol 2025-11-25, no client capabilities) and answers clients from that:
//! a 2025 client's `initialize` gets the child's result and a fresh `Mcp-Session-Id`
//! (`DELETE` ends it; an unknown one is 404, so the client starts over); a 2026-07-28
//! client's `server/discover` gets the same facts in the discover shape. Every other
//! request is sent to the child under an id of the bridge's own (so two clients' ids
//! never collide) and the answer goes back with the client's id; results are relayed
//! as the child wrote them (a 2026 client reads a result without `resultType` as
//! complete). A request is 2026-07-28 when its `_meta` or `MCP-Protocol-Version` says
//! so; it needs no session.
//!
//! Not carried: requests from the server to the client (sampling, elicitation, roots —
//! the bridge declares no client capabilities, and answers any such request with
//! -32601 at once so the child never waits), the GET stream (405) and the child's
//! notifications (progress, logging, list changes: logged at debug and dropped), and
//! JSON-RPC batches (400). Cancellations are not forwarded.
//!
//! The child is restarted when it exits, after 100 ms doubling to
//! `restart_backoff_max` (reset once a child has run for a minute); calls waiting on a
//! child that exits get a JSON-RPC error at once. Its stderr goes to the log, line by
//! line. Everything is bounded: a line from the child or a request body over
//! `max_message_bytes` is dropped or refused, at most [`MAX_IN_FLIGHT`] calls wait on
//! the child (503 beyond), and stdin is fed through a bounded queue.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::body::{self, Body};

/// Calls that may wait on the child at once.
pub const MAX_IN_FLIGHT: usize = 1024;
/// `Mcp-Session-Id`s kept; the oldest is forgotten beyond this (its client re-initializes).
const MAX_SESSIONS: usize = 10_000;
/// The protocol version the bridge speaks to the child.
const CHILD_VERSION: &str = "2025-11-25";
/// The versions a client may be answered in, oldest first.
const VERSIONS: [&str; 4] = ["2025-03-26", "2025-06-18", "2025-11-25", "2026-07-28"];
/// How long the child has to answer `initialize`.
const INITIALIZE_TIMEOUT: Duration = Duration::from_secs(30);
/// A child that ran this long restarts after the shortest wait again.
const STABLE_AFTER: Duration = Duration::from_secs(60);
const RESTART_FIRST: Duration = Duration::from_millis(100);

/// How the bridge runs its child.
#[derive(Debug, Clone)]
pub struct Options {
    /// Program and arguments; not empty.
    pub command: Vec<String>,
    /// Longest line taken from the child and longest request body taken from a client.
    pub max_message_bytes: usize,
    /// How long a call waits for the child's answer.
    pub request_timeout: Duration,
    /// Longest wait before restarting a child that exited.
    pub restart_backoff_max: Duration,
}

/// A running bridge.
#[derive(Debug)]
pub struct Bridge {
    url: String,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

/// What the child's answer to a call is.
type Answer = Result<Bytes, String>;

/// State the HTTP side and the child's supervisor share.
#[derive(Debug)]
struct Shared {
    options: Options,
    path: String,
    /// The current child's stdin queue; `None` while it is (re)starting.
    stdin: ArcSwapOption<mpsc::Sender<Bytes>>,
    /// The child's `initialize` result, once it has answered.
    initialized: ArcSwapOption<Box<RawValue>>,
    /// Calls sent to the child, by the bridge's id.
    waiting: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    next_id: AtomicU64,
    sessions: Mutex<(HashSet<String>, std::collections::VecDeque<String>)>,
    in_flight: Semaphore,
    child_pid: AtomicU32,
}

/// A JSON-RPC message as the bridge reads it: what it routes on, the rest raw.
#[derive(Debug, Deserialize)]
struct Message {
    id: Option<Box<RawValue>>,
    method: Option<String>,
    params: Option<Box<RawValue>>,
    result: Option<Box<RawValue>>,
    error: Option<Box<RawValue>>,
}

#[derive(Serialize)]
struct Outgoing<'a> {
    jsonrpc: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    params: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a RawValue>,
}

impl Outgoing<'_> {
    fn line(&self) -> Bytes {
        let mut out = serde_json::to_vec(self).unwrap_or_default();
        out.push(b'\n');
        Bytes::from(out)
    }
}

fn message<'a>(id: Option<&'a RawValue>) -> Outgoing<'a> {
    Outgoing {
        jsonrpc: "2.0",
        id,
        method: None,
        params: None,
        result: None,
        error: None,
    }
}

fn raw(text: String) -> Box<RawValue> {
    RawValue::from_string(text)
        .unwrap_or_else(|_| RawValue::from_string("null".into()).unwrap_or_default())
}

impl Bridge {
    /// Start the child and serve it on `127.0.0.1:0`. Returns once the HTTP side
    /// listens; calls before the child has answered `initialize` wait for it (or get a
    /// 503 when it cannot start).
    pub async fn start(options: Options) -> Result<Bridge, String> {
        if options.command.is_empty() {
            return Err("--stdio: no command given".into());
        }
        let mut token = [0u8; 18];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut token)
            .map_err(|_| "no randomness for the stdio bridge's path".to_owned())?;
        let path = format!(
            "/mcp/{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token)
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("stdio bridge: cannot bind loopback: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let shared = Arc::new(Shared {
            options,
            path: path.clone(),
            stdin: ArcSwapOption::empty(),
            initialized: ArcSwapOption::empty(),
            waiting: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            sessions: Mutex::new((HashSet::new(), std::collections::VecDeque::new())),
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
            child_pid: AtomicU32::new(0),
        });
        let (stop, stopped) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(supervise(shared.clone(), stopped.clone()));
        let handler_shared = shared.clone();
        tasks.spawn(crate::listener::serve(
            "stdio",
            listener,
            None,
            move |req, _peer| handle(handler_shared.clone(), req),
            stopped,
            Duration::from_secs(1),
            Duration::from_secs(10),
        ));
        Ok(Bridge {
            url: format!("http://{addr}{path}"),
            shared,
            stop,
            tasks,
        })
    }

    /// Where the proxy sends the server's traffic.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The running child's pid (0 while none runs).
    pub fn child_pid(&self) -> u32 {
        self.shared.child_pid.load(Ordering::Relaxed)
    }

    /// Stop serving, close the child's stdin, give it a few seconds, then kill it.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Run the child, again and again, until told to stop.
async fn supervise(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut wait = RESTART_FIRST;
    loop {
        let started = Instant::now();
        match run_child(&shared, &mut stop).await {
            Ok(status) => {
                tracing::warn!(%status, command = ?shared.options.command, "the stdio server exited")
            }
            Err(e) => {
                tracing::error!(error = %e, command = ?shared.options.command, "the stdio server could not run")
            }
        }
        shared.stdin.store(None);
        shared.child_pid.store(0, Ordering::Relaxed);
        fail_waiting(&shared, "the stdio server exited; retry the call");
        if *stop.borrow() {
            return;
        }
        if started.elapsed() >= STABLE_AFTER {
            wait = RESTART_FIRST;
        }
        tracing::info!(retry_in = ?wait, "restarting the stdio server");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stopped(&mut stop) => return,
        }
        wait = (wait * 2).min(shared.options.restart_backoff_max.max(RESTART_FIRST));
    }
}

/// Resolves once the bridge is told to stop (the guard `wait_for` returns is not held).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn fail_waiting(shared: &Shared, why: &str) {
    let waiting = std::mem::take(&mut *shared.waiting.lock().unwrap_or_else(|p| p.into_inner()));
    for (_, tx) in waiting {
        let _ = tx.send(Err(why.to_owned()));
    }
}

/// One child's life: spawn, initialize, serve until it exits or the bridge stops.
async fn run_child(
    shared: &Arc<Shared>,
    stop: &mut watch::Receiver<bool>,
) -> Result<std::process::ExitStatus, String> {
    let command = &shared.options.command;
    let mut child: Child = Command::new(&command[0])
        .args(&command[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", command[0]))?;
    shared
        .child_pid
        .store(child.id().unwrap_or_default(), Ordering::Relaxed);
    let max = shared.options.max_message_bytes;
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err("the child's pipes are missing".into());
    };
    let (tx, mut rx) = mpsc::channel::<Bytes>(256);
    let writer = tokio::spawn(async move {
        let mut stdin = stdin;
        while let Some(line) = rx.recv().await {
            if stdin.write_all(&line).await.is_err() || stdin.flush().await.is_err() {
                break;
            }
        }
        // Dropping stdin closes it: a well-behaved server exits then.
    });
    let logger = tokio::spawn(async move {
        let mut stderr = BufReader::new(stderr);
        let mut line = Vec::new();
        while let Ok(Some(fits)) = read_line(&mut stderr, &mut line, 16 * 1024).await {
            let text = String::from_utf8_lossy(&line);
            if fits {
                tracing::info!(target: "toolmesh_sidecar::stdio::server", "{}", text.trim_end());
            } else {
                tracing::warn!(target: "toolmesh_sidecar::stdio::server", "{}… (line cut)", text.trim_end());
            }
        }
    });
    let reader = tokio::spawn(read_child(
        shared.clone(),
        BufReader::new(stdout),
        tx.clone(),
        max,
    ));
    let initialized = initialize(shared, &tx);
    let pid = child.id().unwrap_or_default();
    let serving = async {
        match tokio::time::timeout(INITIALIZE_TIMEOUT, initialized).await {
            Ok(Ok(())) => {
                shared.stdin.store(Some(Arc::new(tx.clone())));
                tracing::info!(pid, "the stdio server is initialized");
            }
            Ok(Err(e)) => tracing::error!(error = %e, "the stdio server refused initialize"),
            Err(_) => {
                tracing::error!(timeout = ?INITIALIZE_TIMEOUT, "the stdio server did not answer initialize")
            }
        }
        std::future::pending::<()>().await;
    };
    let status = tokio::select! {
        status = child.wait() => status.map_err(|e| e.to_string()),
        () = stopped(stop) => {
            shared.stdin.store(None);
            drop(tx);
            writer.abort();
            // stdin closes with the writer: give the server a moment to exit on its own.
            match tokio::time::timeout(Duration::from_secs(3), child.wait()).await {
                Ok(status) => status.map_err(|e| e.to_string()),
                Err(_) => {
                    let _ = child.kill().await;
                    child.wait().await.map_err(|e| e.to_string())
                }
            }
        }
        () = serving => unreachable!("serving never ends"),
    };
    reader.abort();
    logger.abort();
    writer.abort();
    status
}

/// Initialize the child: `initialize`, then `notifications/initialized`.
async fn initialize(shared: &Arc<Shared>, tx: &mpsc::Sender<Bytes>) -> Result<(), String> {
    let params = raw(format!(
        r#"{{"protocolVersion":"{CHILD_VERSION}","capabilities":{{}},"clientInfo":{{"name":"toolmesh-stdio-bridge","version":"{}"}}}}"#,
        env!("CARGO_PKG_VERSION")
    ));
    let answer = call_child(shared, tx, "initialize", Some(&params)).await?;
    let reply: Message = serde_json::from_slice(&answer).map_err(|e| e.to_string())?;
    let result = match (reply.result, reply.error) {
        (Some(result), _) => result,
        (None, Some(error)) => return Err(error.get().to_owned()),
        (None, None) => return Err("an answer with neither result nor error".into()),
    };
    shared.initialized.store(Some(Arc::new(result)));
    let mut note = message(None);
    note.method = Some("notifications/initialized");
    tx.send(note.line())
        .await
        .map_err(|_| "the child's stdin closed".to_owned())
}

/// Send `method` to the child under a fresh id; its whole answer.
async fn call_child(
    shared: &Shared,
    tx: &mpsc::Sender<Bytes>,
    method: &str,
    params: Option<&RawValue>,
) -> Result<Bytes, String> {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let id_raw = raw(id.to_string());
    let mut out = message(Some(&id_raw));
    out.method = Some(method);
    out.params = params;
    let (answer_tx, answer_rx) = oneshot::channel();
    shared
        .waiting
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, answer_tx);
    let forget = || {
        shared
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    };
    if tx.send(out.line()).await.is_err() {
        forget();
        return Err("the stdio server is restarting; retry the call".into());
    }
    match tokio::time::timeout(shared.options.request_timeout, answer_rx).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => Err("the stdio server exited; retry the call".into()),
        Err(_) => {
            forget();
            Err(format!(
                "the stdio server did not answer within {:?}",
                shared.options.request_timeout
            ))
        }
    }
}

/// Read one line of at most `max` bytes into `line` (without the newline). `Some(true)`
/// for a whole line, `Some(false)` for one that was too long (the rest is skipped),
/// `None` at the end.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<bool>> {
    line.clear();
    let mut fits = true;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok((!line.is_empty() || !fits).then_some(fits));
        }
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if fits && line.len() + chunk.len() <= max {
            line.extend_from_slice(chunk);
        } else {
            fits = false;
        }
        let used = done.unwrap_or(buf.len());
        reader.consume(used);
        if done.is_some() {
            return Ok(Some(fits));
        }
    }
}

/// The child's stdout: answers go to their callers; requests are refused at once;
/// notifications are dropped.
async fn read_child<R: AsyncBufRead + Unpin>(
    shared: Arc<Shared>,
    mut stdout: R,
    tx: mpsc::Sender<Bytes>,
    max: usize,
) {
    let mut line = Vec::new();
    while let Ok(Some(fits)) = read_line(&mut stdout, &mut line, max).await {
        if !fits {
            tracing::warn!(
                max,
                "a line from the stdio server was longer than the limit; dropped"
            );
            continue;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(msg) = serde_json::from_slice::<Message>(&line) else {
            tracing::warn!("the stdio server wrote a line that is not a JSON-RPC message; dropped");
            continue;
        };
        match (&msg.method, &msg.id) {
            (None, Some(id)) => {
                let waiter = id.get().parse::<u64>().ok().and_then(|id| {
                    shared
                        .waiting
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id)
                });
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(Ok(Bytes::copy_from_slice(&line)));
                    }
                    None => tracing::debug!(id = id.get(), "an answer nobody waits for; dropped"),
                }
            }
            (Some(method), Some(id)) => {
                tracing::debug!(%method, "the stdio server asked the client something; refused");
                let error = raw(format!(
                    r#"{{"code":-32601,"message":"{method:?} is not available through the toolmesh stdio bridge"}}"#
                ).replace("\"\"", "\""));
                let mut out = message(Some(id));
                out.error = Some(&error);
                let _ = tx.send(out.line()).await;
            }
            (Some(method), None) => {
                tracing::debug!(%method, "a notification from the stdio server; dropped")
            }
            (None, None) => {}
        }
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error_response(
    status: StatusCode,
    id: Option<&RawValue>,
    code: i64,
    text: &str,
) -> Response<Body> {
    let error = raw(serde_json::json!({"code": code, "message": text}).to_string());
    let mut out = message(id);
    out.error = Some(&error);
    let mut body = out.line().to_vec();
    body.pop();
    json_response(status, Bytes::from(body))
}

/// Whether a request is 2026-07-28 or later: its header or `_meta` says so.
fn is_modern(headers: &http::HeaderMap, params: Option<&RawValue>) -> bool {
    #[derive(Deserialize)]
    struct Params {
        #[serde(rename = "_meta")]
        meta: Option<HashMap<String, serde_json::Value>>,
    }
    let header = headers
        .get("mcp-protocol-version")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v >= "2026-07-28");
    header
        || params
            .and_then(|p| serde_json::from_str::<Params>(p.get()).ok())
            .and_then(|p| p.meta)
            .and_then(|m| m.get("io.modelcontextprotocol/protocolVersion").cloned())
            .and_then(|v| v.as_str().map(|v| v >= "2026-07-28"))
            .unwrap_or(false)
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    Ok(answer(&shared, req).await)
}

async fn answer(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    if req.uri().path() != shared.path {
        return error_response(StatusCode::NOT_FOUND, None, -32600, "not found");
    }
    let session = req
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    match *req.method() {
        Method::POST => {}
        Method::DELETE => {
            let known = session.is_some_and(|s| {
                shared
                    .sessions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .0
                    .remove(&s)
            });
            let status = if known {
                StatusCode::OK
            } else {
                StatusCode::NOT_FOUND
            };
            return json_response(status, Bytes::new());
        }
        _ => {
            let mut resp = error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                None,
                -32600,
                "the stdio bridge serves POST and DELETE",
            );
            resp.headers_mut().insert(
                header::ALLOW,
                http::HeaderValue::from_static("POST, DELETE"),
            );
            return resp;
        }
    }
    let (parts, incoming) = req.into_parts();
    let max = shared.options.max_message_bytes;
    let body = match Limited::new(incoming, max).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                None,
                -32600,
                "request body too large",
            );
        }
    };
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return error_response(
            StatusCode::BAD_REQUEST,
            None,
            -32600,
            "batches are not served by the stdio bridge",
        );
    }
    let Ok(msg) = serde_json::from_slice::<Message>(&body) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            None,
            -32700,
            "not a JSON-RPC message",
        );
    };
    let modern = is_modern(&parts.headers, msg.params.as_deref());
    if let Some(s) = &session
        && !modern
        && !shared
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .contains(s)
    {
        return error_response(
            StatusCode::NOT_FOUND,
            msg.id.as_deref(),
            -32600,
            "unknown session; initialize again",
        );
    }
    let Some(method) = msg.method.as_deref() else {
        // A client's answer to a server request: the bridge sends none.
        return json_response(StatusCode::ACCEPTED, Bytes::new());
    };
    let Some(id) = msg.id.as_deref() else {
        if method != "notifications/initialized" && method != "notifications/cancelled" {
            if let Some(tx) = shared.stdin.load_full() {
                let mut out = message(None);
                out.method = Some(method);
                out.params = msg.params.as_deref();
                let _ = tx.send(out.line()).await;
            }
        }
        return json_response(StatusCode::ACCEPTED, Bytes::new());
    };
    let Ok(_permit) = shared.in_flight.try_acquire() else {
        let mut resp = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(id),
            -32603,
            "too many calls waiting on the stdio server",
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        return resp;
    };
    let Some(initialized) = wait_initialized(shared).await else {
        let mut resp = error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(id),
            -32603,
            "the stdio server is not running yet; retry",
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        return resp;
    };
    match method {
        "initialize" => initialize_answer(shared, id, msg.params.as_deref(), &initialized),
        "server/discover" => discover_answer(id, &initialized),
        _ => relay(shared, id, method, msg.params.as_deref()).await,
    }
}

/// The child's `initialize` result, waiting a little while it (re)starts.
async fn wait_initialized(shared: &Shared) -> Option<Arc<Box<RawValue>>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if shared.stdin.load().is_some()
            && let Some(init) = shared.initialized.load_full()
        {
            return Some(init);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Deserialize)]
struct InitializeResult {
    #[serde(rename = "protocolVersion")]
    protocol_version: Option<String>,
    capabilities: Option<Box<RawValue>>,
    #[serde(rename = "serverInfo")]
    server_info: Option<Box<RawValue>>,
    instructions: Option<String>,
}

fn initialize_answer(
    shared: &Shared,
    id: &RawValue,
    params: Option<&RawValue>,
    init: &RawValue,
) -> Response<Body> {
    #[derive(Deserialize)]
    struct Asked {
        #[serde(rename = "protocolVersion")]
        protocol_version: Option<String>,
    }
    let mut result: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(init.get()).unwrap_or_default();
    let child = result
        .get("protocolVersion")
        .and_then(|v| v.as_str())
        .unwrap_or(CHILD_VERSION)
        .to_owned();
    let asked = params
        .and_then(|p| serde_json::from_str::<Asked>(p.get()).ok())
        .and_then(|a| a.protocol_version);
    // A 2025 client is answered in its own version when the child's is newer: the
    // bridge relays what it sends and the differences between them are additive.
    let version = match asked {
        Some(a) if VERSIONS[..3].contains(&a.as_str()) && a.as_str() <= child.as_str() => a,
        _ => child,
    };
    result.insert("protocolVersion".into(), version.into());
    let mut token = [0u8; 24];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut token);
    let session = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token);
    {
        let mut sessions = shared.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if sessions.1.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions.1.pop_front()
        {
            sessions.0.remove(&oldest);
        }
        sessions.0.insert(session.clone());
        sessions.1.push_back(session.clone());
    }
    let result = raw(serde_json::Value::Object(result).to_string());
    let mut out = message(Some(id));
    out.result = Some(&result);
    let mut body = out.line().to_vec();
    body.pop();
    let mut resp = json_response(StatusCode::OK, Bytes::from(body));
    if let Ok(value) = http::HeaderValue::from_str(&session) {
        resp.headers_mut().insert("mcp-session-id", value);
    }
    resp
}

fn discover_answer(id: &RawValue, init: &RawValue) -> Response<Body> {
    let init: InitializeResult = serde_json::from_str(init.get()).unwrap_or(InitializeResult {
        protocol_version: None,
        capabilities: None,
        server_info: None,
        instructions: None,
    });
    let _ = init.protocol_version;
    let mut result = serde_json::json!({
        "resultType": "complete",
        "supportedVersions": VERSIONS.iter().rev().collect::<Vec<_>>(),
        "capabilities": init.capabilities.map(|c| serde_json::from_str::<serde_json::Value>(c.get()).unwrap_or_default()).unwrap_or_else(|| serde_json::json!({})),
        "ttlMs": 0,
        "cacheScope": "private",
    });
    if let Some(info) = init
        .server_info
        .and_then(|i| serde_json::from_str::<serde_json::Value>(i.get()).ok())
    {
        result["_meta"] = serde_json::json!({"io.modelcontextprotocol/serverInfo": info});
    }
    if let Some(instructions) = init.instructions {
        result["instructions"] = instructions.into();
    }
    let result = raw(result.to_string());
    let mut out = message(Some(id));
    out.result = Some(&result);
    let mut body = out.line().to_vec();
    body.pop();
    json_response(StatusCode::OK, Bytes::from(body))
}

/// Send a client's call to the child and answer with the child's reply, the client's id
/// put back.
async fn relay(
    shared: &Shared,
    id: &RawValue,
    method: &str,
    params: Option<&RawValue>,
) -> Response<Body> {
    let Some(tx) = shared.stdin.load_full() else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(id),
            -32603,
            "the stdio server is restarting; retry",
        );
    };
    match call_child(shared, &tx, method, params).await {
        Ok(answer) => match serde_json::from_slice::<Message>(&answer) {
            Ok(reply) => {
                let mut out = message(Some(id));
                out.result = reply.result.as_deref();
                out.error = reply.error.as_deref();
                if out.result.is_none() && out.error.is_none() {
                    return error_response(
                        StatusCode::OK,
                        Some(id),
                        -32603,
                        "the stdio server's answer had neither result nor error",
                    );
                }
                let mut body = out.line().to_vec();
                body.pop();
                json_response(StatusCode::OK, Bytes::from(body))
            }
            Err(_) => error_response(
                StatusCode::OK,
                Some(id),
                -32603,
                "the stdio server's answer did not parse",
            ),
        },
        Err(why) => error_response(StatusCode::OK, Some(id), -32603, &why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_bounded_and_an_overlong_one_is_skipped_whole() {
        let input: &[u8] = b"short\nthis line is far too long\nok\nlast";
        let mut reader = BufReader::with_capacity(4, input);
        let mut line = Vec::new();
        let mut seen = Vec::new();
        while let Some(fits) = read_line(&mut reader, &mut line, 8).await.expect("read") {
            seen.push((fits, String::from_utf8_lossy(&line).into_owned()));
        }
        // The long line is reported as cut, keeps at most 8 bytes of its start, and
        // does not leak into the next one.
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert_eq!(seen[0], (true, "short".to_owned()));
        assert!(!seen[1].0 && seen[1].1.len() <= 8 && "this line".starts_with(&seen[1].1));
        assert_eq!(seen[2], (true, "ok".to_owned()));
        assert_eq!(seen[3], (true, "last".to_owned()));
    }

    #[test]
    fn a_request_is_modern_by_its_header_or_its_meta() {
        let mut headers = http::HeaderMap::new();
        assert!(!is_modern(&headers, None));
        let meta =
            raw(r#"{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}"#.into());
        assert!(is_modern(&headers, Some(&meta)));
        let old = raw(
            r#"{"_meta":{"io.modelcontextprotocol/protocolVersion":"2025-11-25"},"name":"x"}"#
                .into(),
        );
        assert!(!is_modern(&headers, Some(&old)));
        headers.insert(
            "mcp-protocol-version",
            http::HeaderValue::from_static("2026-07-28"),
        );
        assert!(is_modern(&headers, Some(&old)));
    }

    #[test]
    fn ids_are_put_back_as_the_client_sent_them() {
        let reply: Message = serde_json::from_str(
            r#"{"jsonrpc":"2.0","id":17,"result":{"content":[{"type":"text","text":"hi"}]}}"#,
        )
        .expect("reply");
        let client_id = raw(r#""req-\u00e9 1""#.into());
        let mut out = message(Some(&client_id));
        out.result = reply.result.as_deref();
        let line = out.line();
        assert_eq!(
            std::str::from_utf8(&line).expect("utf8"),
            "{\"jsonrpc\":\"2.0\",\"id\":\"req-\\u00e9 1\",\"result\":{\"content\":[{\"type\":\"text\",\"text\":\"hi\"}]}}\n"
        );
    }
}
