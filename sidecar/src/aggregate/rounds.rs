//! Bridging the other way: a 2025-11-25 agent's request to a server that speaks only
//! 2026-07-28.
//!
//! The request goes upstream statelessly: the agent's own id, its `initialize`
//! capabilities and client info as the 2026 `_meta` envelope, the 2026 headers. A
//! complete answer goes back as it came. An `input_required` answer becomes what a 2025
//! agent understands: the answer turns into an SSE stream, each input request is sent
//! on it as a server request (id `toolmesh:<server>:input-<n>`, answered by the agent
//! like any other), and once every one is answered the sidecar retries the original
//! request with `inputResponses` and the server's `requestState` (which never leaves
//! the sidecar), until the server answers for good. Progress the server streams on the
//! way reaches the agent as it comes.
//!
//! The agent's `notifications/cancelled` for such a request ends it: the rounds stop
//! and the request upstream is closed, which is how a stateless request is cancelled
//! (before the server's first answer arrives, it is only dropped once it does).
//!
//! Not here: input requests other than elicitation, sampling and roots are refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method as HttpMethod, Response};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

use super::parked::error_message;
use super::{
    AgentSession, INPUT_METHODS, InFlightGuard, MAX_REPLY, SERVER_REQUEST, Shape, read_all,
};
use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::filter::{self, Framing};
use crate::mcp;
use crate::proxy::Proxy;
use crate::snapshot::Route;
use crate::stdio::{ENVELOPE_KEYS, json_string, sse_event};

/// Rounds of input one request may take before the sidecar gives up on it.
const MAX_ROUNDS: usize = 16;
/// Input requests in one round, at most.
const MAX_INPUTS: usize = 32;
/// How long the agent has to answer a round's input requests (a person may be asked).
const INPUT_WAIT: Duration = Duration::from_secs(600);

/// An agent's answer to a server request: its `result`, or its `error`.
pub(super) type Answer = Result<Box<RawValue>, Box<RawValue>>;

/// Server requests of bridged rounds the agent has yet to answer, by the id it got.
#[derive(Debug, Default)]
pub(super) struct Pending(Mutex<HashMap<String, oneshot::Sender<Answer>>>);

impl Pending {
    /// Hand the agent's answer to the round waiting for it; false when none waits.
    pub(super) fn answer(&self, id: &str, answer: Answer) -> bool {
        let waiting = self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        waiting.is_some_and(|tx| tx.send(answer).is_ok())
    }

    fn wait_for(&self, id: String) -> oneshot::Receiver<Answer> {
        let (tx, rx) = oneshot::channel();
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        rx
    }

    fn forget(&self, ids: &[String]) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            map.remove(id);
        }
    }
}

/// The 2026 `_meta` envelope members for a 2025 agent, from its `initialize` params:
/// the version, its client info and its capabilities (so the server asks only what
/// the agent can answer).
pub(super) fn envelope(init_params: &RawValue) -> String {
    #[derive(Deserialize, Default)]
    struct Init<'a> {
        #[serde(borrow, default)]
        capabilities: Option<&'a RawValue>,
        #[serde(borrow, default, rename = "clientInfo")]
        client_info: Option<&'a RawValue>,
    }
    let init: Init<'_> = serde_json::from_str(init_params.get()).unwrap_or_default();
    let mut members = format!(
        "\"{}\":\"{}\",\"{}\":{}",
        ENVELOPE_KEYS[0],
        mcp::MODERN_VERSION,
        ENVELOPE_KEYS[2],
        init.capabilities.map_or("{}", RawValue::get)
    );
    if let Some(info) = init.client_info {
        members.push_str(&format!(",\"{}\":{}", ENVELOPE_KEYS[1], info.get()));
    }
    members
}

/// `params._meta` of the request `text` with the envelope `members` in place of any
/// envelope keys it had; `params` made when absent.
pub(super) fn with_envelope(text: &str, members: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Params<'a> {
        #[serde(borrow, default)]
        params: Option<&'a RawValue>,
    }
    #[derive(Deserialize)]
    struct Meta<'a> {
        #[serde(borrow, default, rename = "_meta")]
        meta: Option<&'a RawValue>,
    }
    let params = serde_json::from_str::<Params<'_>>(text).ok()?.params;
    let params = params.map_or("{}", RawValue::get);
    let meta = serde_json::from_str::<Meta<'_>>(params).ok()?.meta;
    let meta = match meta {
        Some(meta) => filter::remove_members(meta.get(), &ENVELOPE_KEYS)?,
        None => "{}".to_owned(),
    };
    let meta = format!(
        "{{{members}{}{}",
        if meta.len() > 2 { "," } else { "" },
        &meta[1..]
    );
    let params = filter::upsert_members(params, &[("_meta", &meta)])?;
    filter::upsert_members(text, &[("params", &params)])
}

/// The request `text` again, carrying the agent's answers and the server's state.
fn with_input(text: &str, responses: &str, state: Option<&RawValue>) -> Option<String> {
    #[derive(Deserialize)]
    struct Params<'a> {
        #[serde(borrow)]
        params: &'a RawValue,
    }
    let params = serde_json::from_str::<Params<'_>>(text).ok()?.params;
    // Only what this round brings: nothing the agent sent in these members goes on.
    let params = filter::remove_members(params.get(), &["inputResponses", "requestState"])?;
    let mut set = vec![("inputResponses", responses)];
    if let Some(state) = state {
        set.push(("requestState", state.get()));
    }
    let params = filter::upsert_members(&params, &set)?;
    filter::upsert_members(text, &[("params", &params)])
}

/// A JSON-RPC answer: its result or its error.
#[derive(Deserialize)]
pub(super) struct Answered<'a> {
    #[serde(borrow, default)]
    pub result: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub error: Option<&'a RawValue>,
}

/// What a server's answer asks for, when it is `input_required`.
#[derive(Deserialize)]
struct InputRequired<'a> {
    #[serde(borrow, rename = "inputRequests", default)]
    requests: HashMap<String, InputRequest<'a>>,
    #[serde(borrow, rename = "requestState", default)]
    state: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct InputRequest<'a> {
    method: String,
    #[serde(borrow, default)]
    params: Option<&'a RawValue>,
}

/// The `input_required` result in an answer (a whole JSON-RPC message), if it is one.
fn input_required(answer: &str) -> Option<InputRequired<'_>> {
    #[derive(Deserialize)]
    struct Message<'a> {
        #[serde(borrow, default)]
        result: Option<&'a RawValue>,
    }
    #[derive(Deserialize)]
    struct Kind<'a> {
        #[serde(borrow, rename = "resultType", default)]
        result_type: Option<&'a str>,
    }
    let result = serde_json::from_str::<Message<'_>>(answer).ok()?.result?;
    let kind: Kind<'_> = serde_json::from_str(result.get()).ok()?;
    if kind.result_type != Some("input_required") {
        return None;
    }
    serde_json::from_str(result.get()).ok()
}

/// How one round's answer arrived: whole, or as a stream still to be read.
enum Step {
    Whole(String),
    Stream(Body),
}

/// One bridged request, for the task that runs its rounds.
pub(super) struct Bridged {
    pub route: Arc<Route>,
    pub session: Arc<AgentSession>,
    pub agent_id: Box<RawValue>,
    /// The 2026 headers the request goes with.
    pub headers: HeaderMap,
    /// The request as sent the first time (agent's id, 2026 envelope).
    pub request: String,
    pub lists: Option<filter::Lists>,
    /// Fires when the agent cancels the request.
    pub cancelled: oneshot::Receiver<()>,
    /// Held until the rounds end: where the agent's cancellation would look.
    pub _in_flight: Option<InFlightGuard>,
}

impl Proxy {
    /// The answer to a bridged request whose first response is `first`: relayed when
    /// the server answers at once, else a stream of the rounds (module docs).
    pub(super) async fn rounds(
        self: &Arc<Self>,
        mut bridged: Bridged,
        first: Response<Body>,
    ) -> Result<Response<Body>, ProxyError> {
        let step = match self.step(&bridged.route, &bridged.agent_id, first).await? {
            Step::Whole(text) if input_required(&text).is_none() => {
                let text = match &bridged.lists {
                    Some(lists) => lists
                        .filter_text(&bridged.route, &text)
                        .ok_or_else(|| unreadable(&bridged.route))?,
                    None => text,
                };
                return Ok(super::json_message(text));
            }
            step => step,
        };
        let (tx, rx) = mpsc::channel::<Bytes>(16);
        let proxy = self.clone();
        // The agent's cancellation drops the rounds, and with them the request upstream
        // (closing a stateless request is how it is cancelled).
        let cancelled = std::mem::replace(&mut bridged.cancelled, oneshot::channel().1);
        tokio::spawn(crate::trace::carry(async move {
            tokio::select! {
                () = proxy.run_rounds(bridged, step, tx) => {}
                Ok(()) = cancelled => tracing::debug!("a bridged request was cancelled by its agent"),
            }
        }));
        Ok(super::notify::stream(body::Channel { rx }.boxed()))
    }

    /// A round's response, read whole when it is JSON (an error answer's HTTP status
    /// becomes a JSON-RPC error, which a 2025 agent reads where it reads answers).
    async fn step(
        &self,
        route: &Arc<Route>,
        id: &RawValue,
        resp: Response<Body>,
    ) -> Result<Step, ProxyError> {
        let framing = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| Framing::of(v.as_bytes()));
        let status = resp.status();
        if status.is_success() && framing == Some(Framing::Sse) {
            return Ok(Step::Stream(resp.into_body()));
        }
        let text =
            read_all(resp.into_body())
                .await
                .map_err(|reason| ProxyError::UpstreamFailed {
                    server: route.name.clone(),
                    reason,
                })?;
        let text = String::from_utf8_lossy(&text);
        let answered = serde_json::from_str::<Answered<'_>>(&text).ok();
        let readable = answered
            .is_some_and(|a| a.error.is_some() || (status.is_success() && a.result.is_some()));
        if !readable {
            return Err(ProxyError::UpstreamFailed {
                server: route.name.clone(),
                reason: format!(
                    "it answered HTTP {status} with no JSON-RPC answer: {}",
                    crate::proxy::truncate(&text)
                ),
            });
        }
        // The agent's id, whatever the server put (a refusal may carry none).
        let text =
            filter::upsert_members(&text, &[("id", id.get())]).ok_or_else(|| unreadable(route))?;
        Ok(Step::Whole(text))
    }

    async fn run_rounds(
        self: Arc<Self>,
        bridged: Bridged,
        mut step: Step,
        tx: mpsc::Sender<Bytes>,
    ) {
        let fail = |e: ProxyError| error_message(&bridged.agent_id, &e);
        for _ in 0..MAX_ROUNDS {
            let answer = match step {
                Step::Whole(text) => text,
                Step::Stream(body) => match relay_until_answer(body, &tx, &bridged.route).await {
                    Some(text) => text,
                    None => {
                        let _ = tx.send(sse_event(&fail(unreadable(&bridged.route)))).await;
                        return;
                    }
                },
            };
            let Some(asked) = input_required(&answer) else {
                let out = match &bridged.lists {
                    Some(lists) => lists.filter_text(&bridged.route, &answer),
                    None => Some(answer),
                };
                let out = out.unwrap_or_else(|| fail(unreadable(&bridged.route)));
                let _ = tx.send(sse_event(&out)).await;
                return;
            };
            let responses = match self.ask_agent(&bridged, &asked, &tx).await {
                Ok(Some(responses)) => responses,
                Ok(None) => return,
                Err(e) => {
                    let _ = tx.send(sse_event(&fail(e))).await;
                    return;
                }
            };
            let Some(retry) = with_input(&bridged.request, &responses, asked.state) else {
                let _ = tx.send(sse_event(&fail(unreadable(&bridged.route)))).await;
                return;
            };
            let route = &bridged.route;
            let uri = route.endpoints[route.pick()].uri.clone();
            let sent = self
                .upstream
                .send(
                    route,
                    uri,
                    HttpMethod::POST,
                    bridged.headers.clone(),
                    Bytes::from(retry),
                )
                .await;
            step = match sent {
                Ok(resp) => match self
                    .step(route, &bridged.agent_id, resp.map(body::incoming))
                    .await
                {
                    Ok(step) => step,
                    Err(e) => {
                        let _ = tx.send(sse_event(&fail(e))).await;
                        return;
                    }
                },
                Err(e) => {
                    let _ = tx.send(sse_event(&fail(e))).await;
                    return;
                }
            };
        }
        let e = ProxyError::UpstreamFailed {
            server: bridged.route.name.clone(),
            reason: format!("it asked for input more than {MAX_ROUNDS} times"),
        };
        let _ = tx.send(sse_event(&fail(e))).await;
    }

    /// Send one round's input requests to the agent and wait for every answer: the
    /// `inputResponses` object, or `None` when the agent went away.
    async fn ask_agent(
        &self,
        bridged: &Bridged,
        asked: &InputRequired<'_>,
        tx: &mpsc::Sender<Bytes>,
    ) -> Result<Option<String>, ProxyError> {
        let refuse = |reason: String| ProxyError::UpstreamFailed {
            server: bridged.route.name.clone(),
            reason,
        };
        if asked.requests.is_empty() || asked.requests.len() > MAX_INPUTS {
            return Err(refuse(format!(
                "it asked for {} inputs in one round (1 to {MAX_INPUTS} can be bridged)",
                asked.requests.len()
            )));
        }
        let pending = &bridged.session.pending;
        let mut ids = Vec::with_capacity(asked.requests.len());
        let mut waits = Vec::with_capacity(asked.requests.len());
        for (key, request) in &asked.requests {
            if !INPUT_METHODS.contains(&request.method.as_str()) {
                pending.forget(&ids);
                return Err(refuse(format!(
                    "it asked for {:?}, which a 2025-11-25 client cannot be asked",
                    crate::proxy::truncate(&request.method)
                )));
            }
            let n = self
                .aggregate
                .next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let id = format!("{SERVER_REQUEST}{}:input-{n}", bridged.route.name);
            waits.push((key.clone(), pending.wait_for(id.clone())));
            let message = format!(
                "{{\"jsonrpc\":\"2.0\",\"id\":{},\"method\":{},\"params\":{}}}",
                json_string(&id),
                json_string(&request.method),
                request.params.map_or("{}", RawValue::get)
            );
            ids.push(id);
            if tx.send(sse_event(&message)).await.is_err() {
                pending.forget(&ids);
                return Ok(None);
            }
        }
        let answers = async {
            let mut responses = Vec::with_capacity(waits.len());
            for (key, wait) in waits {
                match wait.await {
                    Ok(Ok(result)) => responses.push((key, result)),
                    Ok(Err(error)) => {
                        return Err(refuse(format!(
                            "the agent refused its {key:?} input request: {}",
                            crate::proxy::truncate(error.get())
                        )));
                    }
                    Err(_) => return Err(refuse("the agent's session ended".to_owned())),
                }
            }
            Ok(responses)
        };
        let answered = tokio::select! {
            answered = tokio::time::timeout(INPUT_WAIT, answers) => answered,
            () = tx.closed() => {
                pending.forget(&ids);
                return Ok(None);
            }
        };
        pending.forget(&ids);
        let responses = answered.map_err(|_| {
            refuse(format!(
                "the agent did not answer its input requests within {} s",
                INPUT_WAIT.as_secs()
            ))
        })??;
        let members: Vec<String> = responses
            .iter()
            .map(|(key, result)| format!("{}:{}", json_string(key), result.get()))
            .collect();
        Ok(Some(format!("{{{}}}", members.join(","))))
    }
}

fn unreadable(route: &Route) -> ProxyError {
    ProxyError::UpstreamFailed {
        server: route.name.clone(),
        reason: "its answer cannot be read".to_owned(),
    }
}

/// Relay a round's SSE response to the agent until the answer: notifications go on as
/// they come, server requests (which a stateless exchange cannot carry) are dropped,
/// and the answer is returned, not sent. `None` when the stream ends without one.
async fn relay_until_answer(
    mut body: Body,
    tx: &mpsc::Sender<Bytes>,
    route: &Route,
) -> Option<String> {
    let mut buf = BytesMut::new();
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = tx.closed() => return None,
        };
        let Ok(frame) = frame? else { return None };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        if buf.len() > MAX_REPLY {
            tracing::warn!(server = %route.name, "an event over the size limit; stream cut");
            return None;
        }
        while let Some(end) = filter::event_end(&buf) {
            let data = super::next_event(&mut buf, end);
            let Ok(shape) = serde_json::from_str::<Shape<'_>>(&data) else {
                continue;
            };
            match (&shape.method, shape.id) {
                (None, Some(_)) => return Some(data),
                (Some(_), None) if tx.send(sse_event(&data)).await.is_err() => return None,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_2025_request_gets_the_agents_envelope_in_place_of_its_own() {
        let init = RawValue::from_string(
            r#"{"protocolVersion":"2025-11-25","capabilities":{"sampling":{}},"clientInfo":{"name":"a","version":"1"}}"#
                .to_owned(),
        )
        .expect("test input");
        let members = envelope(&init);
        let text = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"x","_meta":{"progressToken":3,"io.modelcontextprotocol/protocolVersion":"2025-11-25"}}}"#;
        let out: serde_json::Value =
            serde_json::from_str(&with_envelope(text, &members).expect("test input"))
                .expect("test input");
        assert_eq!(out["id"], 7);
        assert_eq!(out["params"]["name"], "x");
        let meta = &out["params"]["_meta"];
        assert_eq!(meta["progressToken"], 3);
        assert_eq!(
            meta["io.modelcontextprotocol/protocolVersion"],
            "2026-07-28"
        );
        assert_eq!(
            meta["io.modelcontextprotocol/clientCapabilities"],
            serde_json::json!({"sampling": {}})
        );
        assert_eq!(meta["io.modelcontextprotocol/clientInfo"]["name"], "a");
        // No params at all: made.
        let bare = with_envelope(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
            &members,
        )
        .expect("test input");
        let bare: serde_json::Value = serde_json::from_str(&bare).expect("test input");
        assert_eq!(
            bare["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"],
            "2026-07-28"
        );
    }

    #[test]
    fn a_retry_carries_the_answers_and_the_servers_state_only_once() {
        let text = r#"{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":"x","inputResponses":{"old":{}},"requestState":"forged"}}"#;
        let state = RawValue::from_string("\"s1\"".to_owned()).expect("test input");
        let out =
            with_input(text, r#"{"k":{"action":"decline"}}"#, Some(&state)).expect("test input");
        let out: serde_json::Value = serde_json::from_str(&out).expect("test input");
        assert_eq!(
            out["params"]["inputResponses"],
            serde_json::json!({"k": {"action": "decline"}})
        );
        assert_eq!(out["params"]["requestState"], "s1");
        assert_eq!(out["params"]["name"], "x");
    }

    #[test]
    fn only_an_input_required_result_starts_a_round() {
        let asked = r#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"input_required","inputRequests":{"k":{"method":"elicitation/create","params":{"message":"?"}}},"requestState":"s"}}"#;
        let round = input_required(asked).expect("test input");
        assert_eq!(round.requests["k"].method, "elicitation/create");
        assert_eq!(round.state.expect("test input").get(), "\"s\"");
        assert!(
            input_required(
                r#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"complete","content":[]}}"#
            )
            .is_none()
        );
        assert!(
            input_required(r#"{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"m"}}"#)
                .is_none()
        );
    }
}
