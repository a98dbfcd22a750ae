//! `toolmesh-bench-upstream`: a deliberately fast MCP server for the benchmark, so
//! that what the benchmark measures is the path in front of it, not the server.
//!
//! Plain hyper, HTTP/1.1, every answer prebuilt at start (only the JSON-RPC id is
//! spliced in). It speaks just enough MCP for the benchmark's workloads, in both
//! generations: `initialize` (2025-11-25; answers with an `Mcp-Session-Id`, and later
//! requests of that generation must carry one), `server/discover` (2026-07-28, naming
//! both generations, so a sidecar relays rather than bridges), notifications (202),
//! `tools/list`
//! (`--tools`, 500 by default: `t000`..`t499`; with `ttlMs` when `--list-ttl-ms` is
//! set) and `tools/call` of
//!
//! - `small`: a one-line text result;
//! - `big`: a 1 MiB text result;
//! - `progress`: an SSE response of 100 `notifications/progress` events, one frame
//!   each, then the result.
//!
//! `POST /token` answers any form with the same bearer token (an hour's lifetime): the
//! token endpoint of the benchmark's OAuth route, counted in `GET /token-requests`.
//!
//! Anything else gets a JSON-RPC error. It is not a conforming MCP server (no
//! capability negotiation, no resources or prompts); `toolmesh-demo-server` is that.
//! Prints `listening on http://ADDR/mcp` once it accepts connections.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::value::RawValue;

#[derive(Debug, Parser)]
#[command(about = "A fast MCP server for benchmarks (prebuilt answers)")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Tools in the `tools/list` answer.
    #[arg(long, default_value_t = 500)]
    tools: usize,
    /// `ttlMs` the `tools/list` result carries (how long a client may keep it); none
    /// when 0.
    #[arg(long, default_value_t = 0)]
    list_ttl_ms: u64,
}

/// Progress events before the result of `progress`.
const EVENTS: usize = 100;
/// Size of the text in the `big` result.
const BIG: usize = 1024 * 1024;

type Body = BoxBody<Bytes, Infallible>;

/// A prebuilt JSON-RPC response: `head` + id + `tail`.
#[derive(Debug)]
struct Canned {
    head: Bytes,
    tail: Bytes,
}

impl Canned {
    fn new(result: &str) -> Canned {
        Canned {
            head: Bytes::from_static(br#"{"jsonrpc":"2.0","id":"#),
            tail: Bytes::from(format!(r#","result":{result}}}"#)),
        }
    }

    fn with_id(&self, id: &str) -> Bytes {
        let mut out = Vec::with_capacity(self.head.len() + id.len() + self.tail.len());
        out.extend_from_slice(&self.head);
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&self.tail);
        Bytes::from(out)
    }
}

#[derive(Debug)]
struct Answers {
    initialize: Canned,
    discover: Canned,
    small: Canned,
    big: Canned,
    list: Canned,
    done: Canned,
    progress: Vec<Bytes>,
    sessions: AtomicU64,
}

impl Answers {
    fn new(args: &Args) -> Answers {
        let tools: Vec<String> = (0..args.tools)
            .map(|i| {
                format!(
                    r#"{{"name":"t{i:03}","description":"Benchmark tool number {i}, which does nothing useful","inputSchema":{{"type":"object","properties":{{"text":{{"type":"string"}}}}}}}}"#
                )
            })
            .collect();
        let progress = (1..=EVENTS)
            .map(|i| {
                Bytes::from(format!(
                    "event: message\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{{\"progressToken\":\"p\",\"progress\":{i},\"total\":{EVENTS}}}}}\n\n"
                ))
            })
            .collect();
        Answers {
            initialize: Canned::new(
                r#"{"protocolVersion":"2025-11-25","capabilities":{"tools":{}},"serverInfo":{"name":"toolmesh-bench-upstream","version":"0"}}"#,
            ),
            // Both generations: a sidecar that asks learns it need not bridge.
            discover: Canned::new(
                r#"{"resultType":"complete","supportedVersions":["2025-11-25","2026-07-28"],"capabilities":{"tools":{}},"_meta":{"io.modelcontextprotocol/serverInfo":{"name":"toolmesh-bench-upstream","version":"0"}}}"#,
            ),
            small: Canned::new(r#"{"content":[{"type":"text","text":"ok"}]}"#),
            big: Canned::new(&format!(
                r#"{{"content":[{{"type":"text","text":"{}"}}]}}"#,
                "x".repeat(BIG)
            )),
            list: Canned::new(&format!(
                r#"{{"tools":[{}]{}}}"#,
                tools.join(","),
                if args.list_ttl_ms > 0 {
                    format!(r#","ttlMs":{}"#, args.list_ttl_ms)
                } else {
                    String::new()
                }
            )),
            done: Canned::new(r#"{"content":[{"type":"text","text":"done"}]}"#),
            progress,
            sessions: AtomicU64::new(0),
        }
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    method: &'a str,
    #[serde(borrow, default)]
    params: Option<Params<'a>>,
}

#[derive(Deserialize)]
struct Params<'a> {
    #[serde(borrow, default)]
    name: Option<&'a str>,
}

fn full(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body).boxed());
    *resp.status_mut() = status;
    if !content_type.is_empty() {
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, content_type.parse().expect("static"));
    }
    resp
}

fn error(id: &str, message: &str) -> Response<Body> {
    full(
        StatusCode::OK,
        "application/json",
        Bytes::from(format!(
            r#"{{"jsonrpc":"2.0","id":{id},"error":{{"code":-32601,"message":"{message}"}}}}"#
        )),
    )
}

/// Token requests answered (`POST /token`).
static TOKEN_REQUESTS: AtomicU64 = AtomicU64::new(0);

async fn handle(answers: Arc<Answers>, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&http::Method::POST, "/token") => {
            TOKEN_REQUESTS.fetch_add(1, Ordering::Relaxed);
            return full(
                StatusCode::OK,
                "application/json",
                Bytes::from_static(
                    br#"{"access_token":"bench-access-token","token_type":"Bearer","expires_in":3600}"#,
                ),
            );
        }
        (&http::Method::GET, "/token-requests") => {
            let n = TOKEN_REQUESTS.load(Ordering::Relaxed);
            return full(StatusCode::OK, "text/plain", Bytes::from(n.to_string()));
        }
        _ => {}
    }
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return full(StatusCode::BAD_REQUEST, "", Bytes::new());
    };
    let Ok(envelope) = serde_json::from_slice::<Envelope<'_>>(&body) else {
        return full(StatusCode::BAD_REQUEST, "", Bytes::new());
    };
    let Some(id) = envelope.id.map(RawValue::get) else {
        return full(StatusCode::ACCEPTED, "", Bytes::new()); // a notification
    };
    if envelope.method == "initialize" {
        let n = answers.sessions.fetch_add(1, Ordering::Relaxed);
        let mut resp = full(
            StatusCode::OK,
            "application/json",
            answers.initialize.with_id(id),
        );
        resp.headers_mut().insert(
            "mcp-session-id",
            format!("bench-{n}").parse().expect("ascii"),
        );
        return resp;
    }
    let modern = parts
        .headers
        .get("mcp-protocol-version")
        .is_some_and(|v| v.as_bytes().starts_with(b"2026"));
    if !modern && !parts.headers.contains_key("mcp-session-id") {
        return full(StatusCode::BAD_REQUEST, "", Bytes::new());
    }
    let name = envelope.params.and_then(|p| p.name).unwrap_or_default();
    match (envelope.method, name) {
        ("server/discover", _) => full(
            StatusCode::OK,
            "application/json",
            answers.discover.with_id(id),
        ),
        ("tools/list", _) => full(StatusCode::OK, "application/json", answers.list.with_id(id)),
        ("tools/call", "small") => full(
            StatusCode::OK,
            "application/json",
            answers.small.with_id(id),
        ),
        ("tools/call", "big") => full(StatusCode::OK, "application/json", answers.big.with_id(id)),
        ("tools/call", "progress") => {
            let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = answers
                .progress
                .iter()
                .map(|e| Ok(Frame::data(e.clone())))
                .collect();
            let mut last = b"event: message\ndata: ".to_vec();
            last.extend_from_slice(&answers.done.with_id(id));
            last.extend_from_slice(b"\n\n");
            frames.push(Ok(Frame::data(Bytes::from(last))));
            let mut resp = Response::new(StreamBody::new(futures::stream::iter(frames)).boxed());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                "text/event-stream".parse().expect("static"),
            );
            resp
        }
        _ => error(id, "unknown method or tool"),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        println!("listening on http://{}/mcp", listener.local_addr()?);
        let answers = Arc::new(Answers::new(&args));
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let answers = answers.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let answers = answers.clone();
                    async move { Ok::<_, Infallible>(handle(answers, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
