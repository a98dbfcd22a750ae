//! Server requests of a 2025-11-25 server, for a 2026-07-28 agent: `input_required`.
//!
//! A bridged call (a 2026 agent, a server that speaks only 2025 revisions) runs on an
//! upstream session; when the server asks the client something during it (sampling,
//! elicitation, roots), the 2026 agent has no stream to be asked on. The sidecar ends
//! the agent's answer with an `input_required` result instead, carrying the server's
//! request as an input request, and keeps the upstream exchange (its stream, still
//! open) parked under a `requestState` of its own. The agent retries the call with
//! `inputResponses` and that state; the sidecar gives the server its answer (with the
//! server's id, on the same session) and goes on relaying the parked stream as the
//! retry's answer, until the server's result (or its next request: another round).
//!
//! The state is sealed to the agent's identity like a session id and names one parked
//! exchange, taken once: an agent cannot resume another's call, replay an answered
//! round, or move a round to another server, tool or prompt (the retry must be the
//! same request, decided again by policy). Parked exchanges expire after
//! [`PARK_TIME`]; at most [`MAX_PARKED`] wait at once (beyond, the server's request is
//! refused, as it would be without this).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::Response;
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Agent, INPUT_METHODS, MAX_REPLY, Rewrite, Shape};
use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::filter;
use crate::mcp::Method;
use crate::proxy::Proxy;
use crate::snapshot::Route;
use crate::stdio::{json_string, sse_event};

/// How long a parked exchange waits for the agent's retry.
pub(super) const PARK_TIME: Duration = Duration::from_secs(600);
/// Parked exchanges at most, for all agents.
pub(super) const MAX_PARKED: usize = 1024;
/// The "server" a `requestState` is sealed for (no server has this name).
const STATE_SCOPE: &str = "/mcp#requestState";

/// One upstream exchange waiting for the agent's answers.
struct Parked {
    subject: String,
    route: Arc<Route>,
    method: Method,
    /// The tool, prompt or resource the call is about.
    target: String,
    /// The id the call went upstream with (its final answer carries it).
    upstream_id: String,
    /// The server's requests asked in this round: input key, the server's own id.
    asked: Vec<(String, Box<RawValue>)>,
    rest: Stream,
    expires: Instant,
}

/// An upstream answer stream and what of it is read but not yet relayed.
pub(super) struct Stream {
    pub body: Body,
    pub buf: BytesMut,
}

/// Exchanges parked for their agents' retries, by token.
#[derive(Default)]
pub(super) struct ParkedCalls(Mutex<HashMap<String, Parked>>);

impl std::fmt::Debug for ParkedCalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map_or(0, |m| m.len());
        f.debug_struct("ParkedCalls").field("waiting", &n).finish()
    }
}

impl ParkedCalls {
    /// Park `parked` under `token`; false when too many wait.
    fn park(&self, token: String, parked: Parked) -> bool {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        map.retain(|_, p| p.expires > now);
        if map.len() >= MAX_PARKED {
            return false;
        }
        map.insert(token, parked);
        true
    }

    fn take(&self, token: &str) -> Option<Parked> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(token).filter(|p| p.expires > Instant::now())
    }
}

/// What a bridged call is, for the stream that relays its answer.
pub(super) struct Call {
    pub subject: String,
    pub route: Arc<Route>,
    pub method: Method,
    pub target: String,
    pub upstream_id: String,
    pub agent_id: Box<RawValue>,
    pub lists: Option<filter::Lists>,
}

/// A retry's `inputResponses` and `requestState`, when it carries them.
#[derive(Deserialize)]
pub(super) struct Retry<'a> {
    #[serde(borrow, rename = "inputResponses", default)]
    responses: Option<HashMap<String, &'a RawValue>>,
    #[serde(rename = "requestState", default)]
    state: Option<String>,
}

impl<'a> Retry<'a> {
    /// From a request's params: `None` when it is a first try.
    pub(super) fn of(params: Option<&'a RawValue>) -> Option<Retry<'a>> {
        let retry: Retry<'a> = serde_json::from_str(params?.get()).ok()?;
        retry.state.is_some().then_some(retry)
    }
}

impl Proxy {
    /// Relay a bridged call's SSE answer to a 2026 agent: notifications as they come,
    /// the server's result with the agent's id, and a server request as an
    /// `input_required` result that parks the rest of the exchange (module docs).
    pub(super) fn relay_bridged(self: &Arc<Self>, call: Call, stream: Stream) -> Response<Body> {
        let (tx, rx) = mpsc::channel::<Bytes>(16);
        let proxy = self.clone();
        tokio::spawn(crate::trace::carry(async move {
            proxy.pump_bridged(call, stream, tx).await
        }));
        super::notify::stream(body::Channel { rx }.boxed())
    }

    async fn pump_bridged(
        self: Arc<Self>,
        call: Call,
        mut stream: Stream,
        tx: mpsc::Sender<Bytes>,
    ) {
        let rewrite = Rewrite {
            server: call.route.name.clone(),
            agent_id: Some(call.agent_id.clone()),
            modern: Some(call.method),
            prefix_requests: false,
            refuse_server_requests: None,
        };
        loop {
            while let Some(end) = filter::event_end(&stream.buf) {
                let data = super::next_event(&mut stream.buf, end);
                let Ok(shape) = serde_json::from_str::<Shape<'_>>(&data) else {
                    continue;
                };
                let out = match (&shape.method, shape.id) {
                    // A server request: a round for the agent.
                    (Some(method), Some(id)) => {
                        let (method, id) = (method.to_string(), id.to_owned());
                        let answer = self.park(&call, &method, id, &data, stream);
                        let _ = tx.send(sse_event(&answer)).await;
                        return;
                    }
                    (Some(_), None) => data,
                    // The answer (to our id; anything else is not the agent's).
                    (None, Some(id)) if id.get() == call.upstream_id => {
                        let data = match &call.lists {
                            Some(lists) => {
                                lists.filter_text(&call.route, &data).unwrap_or_default()
                            }
                            None => data,
                        };
                        let out = rewrite.message(&data).unwrap_or(data);
                        let _ = tx.send(sse_event(&out)).await;
                        return;
                    }
                    _ => continue,
                };
                if tx.send(sse_event(&out)).await.is_err() {
                    return;
                }
            }
            let frame = tokio::select! {
                frame = stream.body.frame() => frame,
                () = tx.closed() => return,
            };
            let Some(Ok(frame)) = frame else {
                let e = ProxyError::UpstreamFailed {
                    server: call.route.name.clone(),
                    reason: "its answer ended before its result".to_owned(),
                };
                let _ = tx.send(sse_event(&error_message(&call.agent_id, &e))).await;
                return;
            };
            if let Ok(data) = frame.into_data() {
                stream.buf.extend_from_slice(&data);
            }
            if stream.buf.len() > MAX_REPLY {
                tracing::warn!(server = %call.route.name, "an event over the size limit; stream cut");
                return;
            }
        }
    }

    /// Park the exchange at a server request; the message that ends the agent's
    /// answer: `input_required`, or the refusal when it cannot be parked.
    fn park(
        &self,
        call: &Call,
        method: &str,
        server_id: Box<RawValue>,
        request: &str,
        stream: Stream,
    ) -> String {
        #[derive(Deserialize)]
        struct Request<'a> {
            #[serde(borrow, default)]
            params: Option<&'a RawValue>,
        }
        let refuse = |reason: &str| {
            let e = ProxyError::UpstreamFailed {
                server: call.route.name.clone(),
                reason: format!("it asked the client for {method:?}, which {reason}"),
            };
            error_message(&call.agent_id, &e)
        };
        if !INPUT_METHODS.contains(&method) {
            return refuse("no 2026-07-28 client can be asked");
        }
        let Ok(token) = super::random_token() else {
            return refuse("cannot be parked (no randomness)");
        };
        let Some(state) = self
            .sessions
            .seal(&call.subject, STATE_SCOPE, 0, token.as_bytes())
            .and_then(|v| v.to_str().ok().map(str::to_owned))
        else {
            return refuse("cannot be parked");
        };
        let params = serde_json::from_str::<Request<'_>>(request)
            .ok()
            .and_then(|r| r.params)
            .map_or("{}", RawValue::get);
        let key = "0".to_owned();
        let parked = Parked {
            subject: call.subject.clone(),
            route: call.route.clone(),
            method: call.method,
            target: call.target.clone(),
            upstream_id: call.upstream_id.clone(),
            asked: vec![(key.clone(), server_id)],
            rest: stream,
            expires: Instant::now() + PARK_TIME,
        };
        if !self.aggregate.parked.park(token, parked) {
            return refuse("cannot wait: too many calls wait for their agents");
        }
        format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{},\"result\":{{\"resultType\":\"input_required\",\"inputRequests\":{{{}:{{\"method\":{},\"params\":{params}}}}},\"requestState\":{}}}}}",
            call.agent_id.get(),
            json_string(&key),
            json_string(method),
            json_string(&state)
        )
    }

    /// A retry of a parked call: the agent's answers to the server, and the rest of
    /// the server's answer relayed as this request's.
    pub(super) async fn resume(
        self: &Arc<Self>,
        agent: &Agent<'_>,
        call: Call,
        retry: Retry<'_>,
    ) -> Result<Response<Body>, ProxyError> {
        let stale = || {
            ProxyError::InvalidRequest(
                "requestState names no call waiting for this agent (unknown, answered or expired)"
                    .to_owned(),
            )
        };
        let sealed = retry.state.as_deref().ok_or_else(stale)?;
        let (_, token) = self
            .sessions
            .open(&call.subject, STATE_SCOPE, 1, sealed.as_bytes())
            .ok_or_else(stale)?;
        let token = token.to_str().map_err(|_| stale())?;
        let parked = self.aggregate.parked.take(token).ok_or_else(stale)?;
        if parked.subject != call.subject
            || parked.route.name != call.route.name
            || parked.method != call.method
            || parked.target != call.target
        {
            // Taken, so it cannot be tried again: the exchange is dropped.
            return Err(ProxyError::InvalidRequest(
                "requestState belongs to another request".to_owned(),
            ));
        }
        let responses = retry.responses.unwrap_or_default();
        for (key, server_id) in &parked.asked {
            let result = responses.get(key).ok_or_else(|| {
                ProxyError::InvalidRequest(format!("inputResponses has no {key:?}"))
            })?;
            let answer = format!(
                "{{\"jsonrpc\":\"2.0\",\"id\":{},\"result\":{}}}",
                server_id.get(),
                result.get()
            );
            let resp = self
                .post_session(agent, &parked.route, Bytes::from(answer))
                .await?;
            if !resp.status().is_success() {
                return Err(ProxyError::UpstreamFailed {
                    server: parked.route.name.clone(),
                    reason: format!("it took the agent's answer with HTTP {}", resp.status()),
                });
            }
        }
        let call = Call {
            upstream_id: parked.upstream_id,
            ..call
        };
        Ok(self.relay_bridged(call, parked.rest))
    }
}

/// A JSON-RPC error answer to `id` with `e`'s code and message.
pub(super) fn error_message(id: &RawValue, e: &ProxyError) -> String {
    crate::stdio::error_answer(id.get(), e.code(), &e.to_string())
}
