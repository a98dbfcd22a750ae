//! Legacy HTTP+SSE upstreams (MCP 2024-11-05): the sidecar holds the server's GET
//! stream and makes its messages look like Streamable HTTP answers, so that the rest
//! of the aggregate (sessions, bridging, rounds, notification streams) serves such a
//! server as it serves a 2025-11-25 one.
//!
//! - **Opening.** One [`Channel`] per upstream session of the aggregate: a `GET` of the
//!   server's endpoint (`Accept: text/event-stream`, the route's credential added as on
//!   every upstream request), whose first `endpoint` event says where to POST. That
//!   URL is resolved against the stream's and must have the same origin (scheme, host,
//!   port): a server cannot send the sidecar's requests, or its credential, elsewhere.
//!   The agent never sees either URL.
//! - **Requests.** A request is POSTed to the announced URL; its answer is the
//!   stream's message with the same `id` (compared as JSON text). What the aggregate
//!   gets back is a `200 text/event-stream` answer carrying the server's
//!   `notifications/progress` for the request's `progressToken`, then the answer. A
//!   second request with an id already waiting is refused. Notifications and answers
//!   to the server's own requests are POSTed and get `202`.
//! - **Everything else on the stream** (list changes, logging, resource updates, the
//!   server's sampling, elicitation and roots requests) goes to whoever listens
//!   ([`Channel::listen`]: the notification streams of [`super::notify`]); a server
//!   request nobody listens for gets a `-32601` answer at once, and `ping` is
//!   answered here.
//! - **Ending.** When the stream ends or fails, every waiting request gets a
//!   JSON-RPC error and the channel is closed; the next use opens another session
//!   (as for a Streamable HTTP server that lost its session). A POST the server
//!   answers `404` (it forgot the session) closes it too; another error status is
//!   the caller's `502`. Dropping the last handle to a channel closes its stream.
//! - **Bounds.** One event at most [`MAX_REPLY`] bytes (larger: the stream is cut);
//!   a waiting request holds at most [`WAITING_EVENTS`] progress events (later ones
//!   are dropped until the agent reads); listeners lag behind by at most
//!   [`LISTEN_BACKLOG`] messages, then lose the oldest (logged); at most
//!   [`ANSWERS_QUEUED`] answers to the server's own requests wait to be POSTed, one at
//!   a time (beyond, a request goes unanswered).
//!
//! Not here: the 2024-11-05 handshake itself (the aggregate sends `initialize` as
//! for any 2025 server, and the server answers with the version it speaks), and
//! detecting the transport: an `McpServer` declares it (`spec.transport: sse`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method as HttpMethod, Response, StatusCode, Uri};
use http_body::Frame;
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::{broadcast, mpsc};

use super::{MAX_REPLY, accepted, json_post};
use crate::body::{self, Body, BodyError};
use crate::error::ProxyError;
use crate::filter;
use crate::snapshot::Route;
use crate::stdio::{error_answer, sse_event};
use crate::upstream::Upstream;

/// Progress events a waiting request holds before later ones are dropped.
pub(super) const WAITING_EVENTS: usize = 16;
/// Messages a listener may lag behind before it loses the oldest.
pub(super) const LISTEN_BACKLOG: usize = 256;
/// Answers to the server's requests waiting to be POSTed (beyond: not answered).
const ANSWERS_QUEUED: usize = 64;

/// One session with a legacy HTTP+SSE server: its stream, read by a task of its own.
#[derive(Debug)]
pub(super) struct Channel {
    shared: Arc<Shared>,
    reader: tokio::task::JoinHandle<()>,
    /// POSTs the answers to the server's own requests, one at a time.
    answerer: tokio::task::JoinHandle<()>,
    upstream: Upstream,
    route: Arc<Route>,
    /// Where messages are POSTed (the stream's `endpoint` event).
    post: Uri,
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.reader.abort();
        self.answerer.abort();
        self.shared.close();
    }
}

#[derive(Debug)]
struct Shared {
    server: String,
    closed: AtomicBool,
    waiting: Mutex<Waiting>,
    /// What no request waits for; `None` once the stream ended.
    others: Mutex<Option<broadcast::Sender<Arc<str>>>>,
    /// Server requests are answered through this (ping, or nobody to ask); one the
    /// queue has no room for goes unanswered.
    answers: mpsc::Sender<String>,
}

#[derive(Debug, Default)]
struct Waiting {
    /// By the request's id, as JSON text.
    by_id: HashMap<String, Waiter>,
    /// A waiting request's id by its progress token (JSON text).
    by_token: HashMap<String, String>,
}

#[derive(Debug)]
struct Waiter {
    tx: mpsc::Sender<Bytes>,
    token: Option<String>,
}

/// The parts of a message the channel reads.
#[derive(Deserialize)]
struct Shape<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    method: Option<&'a str>,
    #[serde(borrow, default)]
    params: Option<Params<'a>>,
}

#[derive(Deserialize)]
struct Params<'a> {
    #[serde(borrow, default, rename = "progressToken")]
    progress_token: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "_meta")]
    meta: Option<Meta<'a>>,
}

#[derive(Deserialize)]
struct Meta<'a> {
    #[serde(borrow, default, rename = "progressToken")]
    progress_token: Option<&'a RawValue>,
}

impl Channel {
    /// Open the stream of `route`'s endpoint `endpoint` and wait (up to the route's
    /// timeout) for the URL it announces.
    pub(super) async fn open(
        upstream: &Upstream,
        route: &Arc<Route>,
        endpoint: usize,
    ) -> Result<Channel, ProxyError> {
        let failed = |reason: String| ProxyError::UpstreamFailed {
            server: route.name.clone(),
            reason,
        };
        let base = route.endpoints[endpoint].uri.clone();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
        let resp = upstream
            .send(route, base.clone(), HttpMethod::GET, headers, Bytes::new())
            .await?;
        if !resp.status().is_success() {
            return Err(failed(format!(
                "its SSE stream answered HTTP {}",
                resp.status()
            )));
        }
        if resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| filter::Framing::of(v.as_bytes()))
            != Some(filter::Framing::Sse)
        {
            return Err(failed(
                "its endpoint is not an SSE stream (is spec.transport right?)".to_owned(),
            ));
        }
        let mut body = body::incoming(resp.into_body());
        let mut buf = BytesMut::new();
        let announced = tokio::time::timeout(route.timeout, async {
            loop {
                while let Some(end) = filter::event_end(&buf) {
                    let (event, data) = next_event(&mut buf, end);
                    if event == "endpoint" {
                        return Ok(data);
                    }
                }
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            buf.extend_from_slice(&data);
                        }
                        if buf.len() > MAX_REPLY {
                            return Err("an event over the size limit".to_owned());
                        }
                    }
                    Some(Err(e)) => return Err(e.to_string()),
                    None => return Err("the stream ended before an endpoint event".to_owned()),
                }
            }
        })
        .await
        .map_err(|_| {
            failed(format!(
                "no endpoint event within {} ms",
                route.timeout.as_millis()
            ))
        })?
        .map_err(&failed)?;
        let post = same_origin(&base, announced.trim()).map_err(&failed)?;
        let (others, _) = broadcast::channel(LISTEN_BACKLOG);
        let (answers, answer_rx) = mpsc::channel(ANSWERS_QUEUED);
        let shared = Arc::new(Shared {
            server: route.name.clone(),
            closed: AtomicBool::new(false),
            waiting: Mutex::new(Waiting::default()),
            others: Mutex::new(Some(others)),
            answers,
        });
        let reader = tokio::spawn(read_stream(shared.clone(), body, buf, route.name.clone()));
        let answerer = tokio::spawn(answer_server(
            answer_rx,
            upstream.clone(),
            route.clone(),
            post.clone(),
        ));
        tracing::debug!(server = %route.name, "legacy SSE session opened");
        Ok(Channel {
            shared,
            reader,
            answerer,
            upstream: upstream.clone(),
            route: route.clone(),
            post,
        })
    }

    /// The stream ended (or the server forgot the session): open another.
    pub(super) fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Relaxed)
    }

    /// Send one message; for a request, the answer as a Streamable HTTP server gives it
    /// (module docs).
    pub(super) async fn send(&self, body: Bytes) -> Result<Response<Body>, ProxyError> {
        if self.is_closed() {
            return Err(self.gone());
        }
        let shape: Shape<'_> =
            serde_json::from_slice(&body).map_err(|e| ProxyError::InvalidRequest(e.to_string()))?;
        let waiter = match (shape.id, shape.method) {
            (Some(id), Some(_)) => Some(self.wait_for(id.get(), progress_token(&shape))?),
            _ => None,
        };
        // A failed POST drops the waiter, which takes the request off the list.
        let status = post(&self.upstream, &self.route, &self.post, body).await?;
        // The server forgot the session: the caller opens another and sends again
        // (nothing ran).
        if status == StatusCode::NOT_FOUND {
            self.shared.close();
            return Ok(Response::builder()
                .status(status)
                .body(body::empty())
                .unwrap_or_else(|_| Response::new(body::empty())));
        }
        if !status.is_success() {
            return Err(ProxyError::UpstreamFailed {
                server: self.route.name.clone(),
                reason: format!("its message endpoint answered HTTP {status}"),
            });
        }
        let Some((rx, guard)) = waiter else {
            return Ok(accepted());
        };
        let mut resp = Response::new(Answer { rx, _guard: guard }.boxed());
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        Ok(resp)
    }

    /// Register a request waiting for its answer.
    fn wait_for(
        &self,
        id: &str,
        token: Option<String>,
    ) -> Result<(mpsc::Receiver<Bytes>, WaitGuard), ProxyError> {
        // Room for every progress event it may hold and the answer.
        let (tx, rx) = mpsc::channel(WAITING_EVENTS + 1);
        let mut waiting = self.shared.lock_waiting();
        if waiting.by_id.contains_key(id) {
            return Err(ProxyError::InvalidRequest(format!(
                "a request with id {} is already in flight",
                crate::proxy::truncate(id)
            )));
        }
        if let Some(token) = &token {
            waiting.by_token.insert(token.clone(), id.to_owned());
        }
        waiting.by_id.insert(id.to_owned(), Waiter { tx, token });
        Ok((
            rx,
            WaitGuard {
                shared: self.shared.clone(),
                id: id.to_owned(),
            },
        ))
    }

    /// Messages no request waits for, as an SSE stream (`None` once the server's stream
    /// ended).
    pub(super) fn listen(&self) -> Option<Response<Body>> {
        let mut rx = self
            .shared
            .others
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()?
            .subscribe();
        let (tx, body_rx) = mpsc::channel::<Bytes>(16);
        let server = self.shared.server.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    m = rx.recv() => m,
                    () = tx.closed() => return,
                };
                match message {
                    Ok(text) => {
                        if tx.send(sse_event(&text)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(lost)) => {
                        tracing::warn!(%server, lost, "a listener fell behind the server's stream; messages lost");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        let mut resp = Response::new(body::Channel { rx: body_rx }.boxed());
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        Some(resp)
    }

    fn gone(&self) -> ProxyError {
        ProxyError::UpstreamFailed {
            server: self.route.name.clone(),
            reason: "its SSE stream ended".to_owned(),
        }
    }
}

impl Shared {
    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stream is over: waiting requests get an error, listeners their end.
    fn close(&self) {
        if self.closed.swap(true, Ordering::Relaxed) {
            return;
        }
        let waiters: Vec<(String, Waiter)> = {
            let mut waiting = self.lock_waiting();
            waiting.by_token.clear();
            waiting.by_id.drain().collect()
        };
        for (id, waiter) in waiters {
            let error = error_answer(
                &id,
                -32603,
                &format!(
                    "the SSE stream of server {} ended before it answered; retry",
                    self.server
                ),
            );
            let _ = waiter.tx.try_send(sse_event(&error));
        }
        self.others.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// One message of the server's stream, to whoever it is for.
    fn dispatch(&self, text: &str) {
        let Ok(shape) = serde_json::from_str::<Shape<'_>>(text) else {
            tracing::debug!(server = %self.server, "a message on the SSE stream that is not JSON-RPC; dropped");
            return;
        };
        match (shape.id, shape.method) {
            // An answer: the end of a waiting request's stream.
            (Some(id), None) => {
                let waiter = {
                    let mut waiting = self.lock_waiting();
                    let waiter = waiting.by_id.remove(id.get());
                    if let Some(token) = waiter.as_ref().and_then(|w| w.token.as_ref()) {
                        waiting.by_token.remove(token);
                    }
                    waiter
                };
                match waiter {
                    // Room is kept for it (wait_for).
                    Some(w) => drop(w.tx.try_send(sse_event(text))),
                    None => {
                        tracing::debug!(server = %self.server, "an answer nobody waits for; dropped")
                    }
                }
            }
            (None, Some("notifications/progress")) => {
                let waiter = progress_token(&shape).and_then(|token| {
                    let waiting = self.lock_waiting();
                    let id = waiting.by_token.get(&token)?;
                    waiting.by_id.get(id).map(|w| w.tx.clone())
                });
                match waiter {
                    // The last place is the answer's.
                    Some(tx) if tx.capacity() > 1 => drop(tx.try_send(sse_event(text))),
                    Some(_) => {}
                    None => drop(self.broadcast(text)),
                }
            }
            (Some(id), Some("ping")) => {
                let _ = self.answers.try_send(format!(
                    "{{\"jsonrpc\":\"2.0\",\"id\":{},\"result\":{{}}}}",
                    id.get()
                ));
            }
            (Some(id), Some(method)) => {
                if !self.broadcast(text) {
                    let _ = self.answers.try_send(error_answer(
                        id.get(),
                        -32601,
                        &format!("{method}: no agent stream is open to take it"),
                    ));
                }
            }
            (None, _) => {
                self.broadcast(text);
            }
        }
    }

    /// Hand `text` to the listeners; whether any took it.
    fn broadcast(&self, text: &str) -> bool {
        let others = self.others.lock().unwrap_or_else(|e| e.into_inner());
        others
            .as_ref()
            .is_some_and(|tx| tx.send(Arc::from(text)).is_ok())
    }
}

/// Takes a request off the waiting list when its answer is read or dropped.
#[derive(Debug)]
struct WaitGuard {
    shared: Arc<Shared>,
    id: String,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        let mut waiting = self.shared.lock_waiting();
        if let Some(waiter) = waiting.by_id.remove(&self.id)
            && let Some(token) = waiter.token
        {
            waiting.by_token.remove(&token);
        }
    }
}

/// A waiting request's answer stream: it ends after the answer (the channel's
/// sender is dropped then) and un-registers the request when dropped.
struct Answer {
    rx: mpsc::Receiver<Bytes>,
    _guard: WaitGuard,
}

impl http_body::Body for Answer {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

/// Read the server's stream until it ends, the channel is dropped (the task is
/// aborted) or an event is too large.
async fn read_stream(shared: Arc<Shared>, mut body: Body, mut buf: BytesMut, server: String) {
    let reason = loop {
        while let Some(end) = filter::event_end(&buf) {
            let (event, data) = next_event(&mut buf, end);
            if (event.is_empty() || event == "message") && !data.trim().is_empty() {
                shared.dispatch(&data);
            }
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
                if buf.len() > MAX_REPLY {
                    break "an event over the size limit".to_owned();
                }
            }
            Some(Err(e)) => break e.to_string(),
            None => break "the server ended it".to_owned(),
        }
    };
    tracing::info!(%server, %reason, "legacy SSE stream closed; the next request opens another session");
    shared.close();
}

/// POST the answers to the server's own requests, in order, until the channel goes.
async fn answer_server(
    mut answers: mpsc::Receiver<String>,
    upstream: Upstream,
    route: Arc<Route>,
    uri: Uri,
) {
    while let Some(answer) = answers.recv().await {
        if let Err(e) = post(&upstream, &route, &uri, Bytes::from(answer)).await {
            tracing::debug!(server = %route.name, error = %e, "answering the server's request failed");
        }
    }
}

/// POST one message to the announced URL; the status the server answered.
async fn post(
    upstream: &Upstream,
    route: &Route,
    uri: &Uri,
    body: Bytes,
) -> Result<StatusCode, ProxyError> {
    let mut headers = HeaderMap::new();
    json_post(&mut headers);
    let resp = upstream
        .send(route, uri.clone(), HttpMethod::POST, headers, body)
        .await?;
    let status = resp.status();
    // The answer comes on the stream; the POST's own body says nothing.
    drop(resp);
    Ok(status)
}

/// A request's progress token (`params._meta.progressToken`, or the 2024-11-05
/// place `params.progressToken`), as JSON text.
fn progress_token(shape: &Shape<'_>) -> Option<String> {
    let params = shape.params.as_ref()?;
    params
        .meta
        .as_ref()
        .and_then(|m| m.progress_token)
        .or(params.progress_token)
        .map(|t| t.get().to_owned())
}

/// The event name (empty when absent) and data of the event ending at `end` of `buf`,
/// taken off `buf`.
fn next_event(buf: &mut BytesMut, end: usize) -> (String, String) {
    let event = buf.split_to(end);
    let text = String::from_utf8_lossy(&event);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut name = String::new();
    let mut data: Vec<&str> = Vec::new();
    for line in filter::lines(text) {
        if let Some(value) = filter::data_value(line) {
            data.push(value);
        } else if let Some(value) = filter::event_type(line) {
            value.clone_into(&mut name);
        }
    }
    (name, data.join("\n"))
}

/// The URL an `endpoint` event names, resolved against the stream's URL: refused
/// unless it has the same origin.
fn same_origin(base: &Uri, announced: &str) -> Result<Uri, String> {
    let base_url = url::Url::parse(&base.to_string()).map_err(|e| e.to_string())?;
    let joined = base_url
        .join(announced)
        .map_err(|e| format!("its endpoint event names no URL: {e}"))?;
    if joined.origin() != base_url.origin() {
        return Err(format!(
            "its endpoint event names another origin ({}); refused",
            joined.origin().ascii_serialization()
        ));
    }
    joined
        .as_str()
        .parse()
        .map_err(|e| format!("its endpoint event names no URL: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Uri {
        Uri::from_static("http://127.0.0.1:8080/sse")
    }

    #[test]
    fn the_endpoint_resolves_against_the_stream_url() {
        let cases = [
            (
                "/messages?session_id=ab",
                "http://127.0.0.1:8080/messages?session_id=ab",
            ),
            ("messages/?s=1", "http://127.0.0.1:8080/messages/?s=1"),
            ("http://127.0.0.1:8080/m", "http://127.0.0.1:8080/m"),
        ];
        for (announced, want) in cases {
            let got = same_origin(&base(), announced).expect(announced);
            assert_eq!(got.to_string(), want, "{announced}");
        }
    }

    #[test]
    fn an_endpoint_elsewhere_is_refused() {
        for announced in [
            "http://evil.example/messages",
            "//evil.example/messages",
            "https://127.0.0.1:8080/messages",
            "http://127.0.0.1:8081/messages",
            "http://user@evil.example/m",
        ] {
            let got = same_origin(&base(), announced);
            assert!(got.is_err(), "{announced} was accepted: {got:?}");
        }
    }

    #[test]
    fn events_are_read_with_their_names() {
        let mut buf = BytesMut::from(
            &b"\xef\xbb\xbfevent: endpoint\r\ndata: /m?x=1\r\n\r\ndata: {\"a\":\ndata: 1}\n\n"[..],
        );
        let end = filter::event_end(&buf).expect("an event");
        assert_eq!(
            next_event(&mut buf, end),
            ("endpoint".to_owned(), "/m?x=1".to_owned())
        );
        let end = filter::event_end(&buf).expect("an event");
        assert_eq!(
            next_event(&mut buf, end),
            (String::new(), "{\"a\":\n1}".to_owned())
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn progress_tokens_are_found_in_both_places() {
        let modern: Shape<'_> = serde_json::from_str(
            r#"{"id":1,"method":"tools/call","params":{"_meta":{"progressToken":"t1"}}}"#,
        )
        .expect("JSON");
        assert_eq!(progress_token(&modern).as_deref(), Some("\"t1\""));
        let old: Shape<'_> = serde_json::from_str(
            r#"{"method":"notifications/progress","params":{"progressToken":7,"progress":1}}"#,
        )
        .expect("JSON");
        assert_eq!(progress_token(&old).as_deref(), Some("7"));
    }
}
