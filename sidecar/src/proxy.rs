//! The MCP request path: from an agent's HTTP request on `/mcp/<server>` to the
//! upstream's response, relayed.
//!
//! In order: the `Origin` check (DNS-rebinding protection), the active runtime (one
//! atomic load), the route, the body (bounded, JSON only), the envelope and its header
//! rules ([`crate::mcp`]), the endpoint (session affinity when a server has several),
//! then the upstream call. Every refusal is a [`ProxyError`] answered as a JSON-RPC
//! error. The response body is relayed frame by frame; SSE events reach the agent as
//! the upstream sends them.
//!
//! Sessions: the agent never sees an upstream's session id, only the sidecar's sealed
//! one ([`crate::session`]), bound to this identity and server and carrying the
//! endpoint index for affinity. Requests without a session are spread round-robin.
//!
//! Batches (2025-03-26 only) may not carry gated calls or list requests: each of
//! those is decided, rate limited, audited and filtered on its own, which a batch
//! answer (one JSON array, or events in any order) would blur. Send them one by one.
//!
//! The GET stream (the standalone stream, or a POST's stream resumed with
//! `Last-Event-ID`) is filtered for every kind of list, since its events may answer
//! earlier list requests, and refuses the legacy `endpoint` event. An upstream's
//! redirect is refused: the agent would follow it around the sidecar.
//!
//! Every request leaves one audit line, including a request the agent abandons
//! before the answer's head (it may have run upstream): a guard writes it then.
//!
//! Not here: what a decision is ([`crate::policy`]), list rewriting
//! ([`crate::filter`]), the audit stream itself ([`crate::audit`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use metrics::SharedString;

use serde_json::value::RawValue;

use crate::audit::{Audit, Record, Verdict};
use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::filter::{self, Framing, Lists};
use crate::gateway::tokens::{Principal, Refusal};
use crate::identity::Identity;
use crate::mcp::{self, Envelope, Rejection, TargetKind};
use crate::policy::Decision;
use crate::session::Sealer;
use crate::snapshot::{Active, Route, Runtime};
use crate::telemetry::{self, Outcome};
use crate::upstream::{self, Upstream};
pub use toolmesh_proto::origin::is_loopback_authority;

/// Everything the request path shares; built once at startup.
#[derive(Debug)]
pub struct Proxy {
    pub active: Arc<Active>,
    pub upstream: Upstream,
    /// Browser origins allowed besides loopback ones, lowercased, no trailing slash.
    pub allowed_origins: Vec<String>,
    pub max_body_bytes: usize,
    /// Loopback listener: the `Host` must name loopback too (DNS-rebinding protection
    /// for requests that carry no `Origin`, such as a browser's same-origin GET).
    pub loopback_host_only: bool,
    pub audit: Audit,
    /// This sidecar's identity (`--identity`), the subject of every decision in agent
    /// mode.
    pub identity: Identity,
    /// Server-side mode: the caller a request's peer certificate names is the subject,
    /// decided on by its own runtime.
    pub callers: Option<Arc<crate::mesh::Callers>>,
    /// Gateway mode: each request's bearer token names the subject, decided on by the
    /// runtime of the policies that match it.
    pub gateway: Option<Arc<crate::gateway::Gateway>>,
    /// Seals the session ids agents see.
    pub sessions: Sealer,
    /// How long a request body may take to arrive once its head has.
    pub body_read_timeout: std::time::Duration,
    pub in_flight: Arc<InFlight>,
    /// What the aggregated `/mcp` remembers between requests.
    pub aggregate: crate::aggregate::Aggregate,
    /// Tracing on: every request is a SERVER span ([`crate::trace`]).
    pub tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
}

/// Requests being handled and response bodies being relayed: what the admin port's
/// `/idle` (and a legacy sidecar's `preStop` hook, `wait-idle`) waits to see at zero.
#[derive(Debug, Default)]
pub struct InFlight(std::sync::atomic::AtomicUsize);

/// One request or body in flight, until dropped.
#[derive(Debug)]
pub struct Flying(Arc<InFlight>);

impl InFlight {
    pub fn start(self: &Arc<Self>) -> Flying {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Flying(self.clone())
    }

    pub fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Flying {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The audit subject of a gateway request whose token was refused.
const UNAUTHENTICATED: &str = "(unauthenticated)";

/// Request bodies over the limit are still read (and discarded) up to this many
/// bytes, so the client, still uploading, gets to read its 413 instead of a reset.
pub const DRAIN_LIMIT: u64 = 64 * 1024 * 1024;
/// Longest request id written to an audit line as sent; a longer one is cut.
const MAX_AUDIT_ID: usize = 128;
/// Largest `arguments` written to an audit line (with `audit: {arguments: true}`).
const MAX_AUDIT_ARGUMENTS: usize = 16 * 1024;

/// What is known about a request, filled in as the path learns it; it labels the
/// metrics and becomes the audit line.
pub(crate) struct Ctx {
    /// Who is asking: this sidecar's identity, or (server-side mode) the caller, or
    /// (gateway mode) the token's `<issuer>#<sub>`.
    pub(crate) subject: Identity,
    /// Gateway mode: the caller's checked token.
    pub(crate) principal: Option<Arc<Principal>>,
    pub(crate) server: SharedString,
    pub(crate) method: &'static str,
    /// The JSON-RPC method as sent (bounded), for the audit line.
    pub(crate) rpc_method: Option<String>,
    pub(crate) kind: Option<&'static str>,
    pub(crate) name: Option<String>,
    pub(crate) decision: Verdict,
    pub(crate) rule: Option<Arc<str>>,
    pub(crate) request_id: Option<Box<RawValue>>,
    pub(crate) session: Option<String>,
    pub(crate) arguments: Option<Box<RawValue>>,
    /// Tracing off: the agent's W3C trace id (its `traceparent`), for the audit line.
    pub(crate) trace_id: Option<Box<str>>,
    /// Tracing on: this request's SERVER span.
    pub(crate) trace: Option<Box<crate::trace::Server>>,
    /// What the response must be filtered for, if anything.
    pub(crate) lists: Option<Lists>,
    /// The called definition does not match its server's pins (see [`crate::pin`]).
    pub(crate) pin: Option<String>,
}

impl Ctx {
    /// A request's context; `tracer` when tracing is on, `started` its arrival.
    fn new(
        req: &Request<Incoming>,
        subject: Identity,
        tracer: Option<&opentelemetry_sdk::trace::SdkTracer>,
        started: Instant,
    ) -> Ctx {
        let trace = tracer.map(|tracer| {
            let arrived = std::time::SystemTime::now()
                .checked_sub(started.elapsed())
                .unwrap_or_else(std::time::SystemTime::now);
            Box::new(crate::trace::Server::new(tracer, req.headers(), arrived))
        });
        Ctx {
            subject,
            principal: None,
            server: telemetry::UNKNOWN_SERVER,
            method: match *req.method() {
                Method::GET => "(get)",
                Method::DELETE => "(delete)",
                _ => "other",
            },
            rpc_method: None,
            kind: None,
            name: None,
            decision: Verdict::Rejected,
            rule: None,
            request_id: None,
            session: req
                .headers()
                .get(mcp::HEADER_SESSION)
                .and_then(|v| v.to_str().ok())
                .map(truncate),
            arguments: None,
            // With tracing on, the audit line takes its ids from the span instead.
            trace_id: req
                .headers()
                .get("traceparent")
                .filter(|_| trace.is_none())
                .and_then(|v| crate::audit::trace_id(v.as_bytes()))
                .map(Into::into),
            trace,
            lists: None,
            pin: None,
        }
    }

    /// The body is read: the SERVER span starts, its parent the body's `_meta` trace
    /// context if it carries one, else the header's.
    pub(crate) fn trace_from(
        &mut self,
        headers: &http::HeaderMap,
        message: Option<&mcp::Message<'_>>,
    ) {
        if let Some(trace) = &mut self.trace {
            if let Some((traceparent, tracestate)) = message.and_then(|m| m.trace_context()) {
                trace.meta(&traceparent, tracestate.as_deref());
            }
            trace.start(headers);
        }
    }
}

fn kind_name(kind: TargetKind) -> &'static str {
    match kind {
        TargetKind::Tool => "tool",
        TargetKind::Resource => "resource",
        TargetKind::Prompt => "prompt",
    }
}

/// A request's audit line and metrics, written exactly once: by [`Pending::finish`],
/// or on drop when the agent went away before the answer's head.
struct Pending<'p> {
    proxy: &'p Proxy,
    ctx: Ctx,
    started: Instant,
    finished: bool,
}

impl Pending<'_> {
    fn finish(&mut self, status: u16, error_code: Option<i64>, outcome: Outcome) {
        self.finished = true;
        let elapsed = self.started.elapsed();
        telemetry::request(&self.ctx.server, self.ctx.method, outcome, elapsed);
        let ids = self.trace_finish(status, error_code, outcome);
        let ctx = &self.ctx;
        let server = ctx.server.to_string();
        let request_id = ctx.request_id.as_deref().map(|id| capped(id, MAX_AUDIT_ID));
        let arguments = ctx
            .arguments
            .as_deref()
            .map(|a| capped(a, MAX_AUDIT_ARGUMENTS));
        self.proxy.audit.record(&Record {
            time: humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            subject: ctx.subject.as_str(),
            user: ctx.principal.as_ref().map(|p| &*p.user),
            client_id: ctx.principal.as_ref().and_then(|p| p.client_id.as_deref()),
            issuer: ctx.principal.as_ref().map(|p| &*p.issuer),
            server: &server,
            method: ctx.rpc_method.as_deref().unwrap_or(ctx.method),
            kind: ctx.kind,
            name: ctx.name.as_deref(),
            decision: ctx.decision,
            rule: ctx.rule.as_deref(),
            status,
            error_code,
            latency_ms: elapsed.as_secs_f64() * 1000.0,
            request_id: request_id.as_deref(),
            session: ctx.session.as_deref(),
            arguments: arguments.as_deref(),
            trace_id: ids
                .as_ref()
                .map(crate::trace::Ids::trace)
                .or(ctx.trace_id.as_deref()),
            span_id: ids.as_ref().map(crate::trace::Ids::span),
            pin: ctx.pin.as_deref(),
            pin_digest: None,
        });
    }

    /// Tracing on: name and attribute the SERVER span; its trace and span ids for the
    /// audit line.
    fn trace_finish(
        &mut self,
        status: u16,
        error_code: Option<i64>,
        outcome: Outcome,
    ) -> Option<crate::trace::Ids> {
        let ctx = &mut self.ctx;
        let trace = ctx.trace.as_mut()?;
        trace.finish(crate::trace::Finish {
            method: ctx.rpc_method.as_deref().unwrap_or(ctx.method),
            kind: ctx.kind,
            name: ctx.name.as_deref(),
            request_id: ctx.request_id.as_deref(),
            session: ctx.session.as_deref(),
            server: &ctx.server,
            subject: ctx.subject.as_str(),
            decision: ctx.decision.as_str(),
            rule: ctx.rule.as_deref(),
            outcome: outcome.as_str(),
            status,
            error_code,
        });
        Some(trace.ids())
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.finished {
            // 499, as proxies log a client that closed before the answer.
            self.finish(499, None, Outcome::Abandoned);
        }
    }
}

/// `raw` as is when it is at most `max` bytes; otherwise a JSON string saying what it
/// was (for an id: its first characters), so one request cannot make a huge line.
fn capped(raw: &RawValue, max: usize) -> std::borrow::Cow<'_, RawValue> {
    let text = raw.get();
    if text.len() <= max {
        return std::borrow::Cow::Borrowed(raw);
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let shown = format!("{}… ({} bytes)", &text[..cut], text.len());
    let value = serde_json::to_string(&shown)
        .ok()
        .and_then(|s| RawValue::from_string(s).ok());
    match value {
        Some(v) => std::borrow::Cow::Owned(v),
        None => std::borrow::Cow::Borrowed(raw),
    }
}

impl Proxy {
    /// The hyper service function (agent mode).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        self.handle_from(req, None).await
    }

    /// The hyper service function; in server-side mode `peer` is what the TLS
    /// handshake verified.
    pub async fn handle_from(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: Option<&crate::listener::PeerTls>,
    ) -> Result<Response<Body>, Infallible> {
        let _flying = self.in_flight.start();
        let started = Instant::now();
        if self.tracer.is_some() {
            // Boxed: with tracing off, the request future (hyper allocates one per
            // connection) need not have room for the traced one as well.
            Ok(Box::pin(crate::trace::scope(self.handle_traced(req, peer, started))).await)
        } else {
            Ok(self.handle_traced(req, peer, started).await)
        }
    }

    async fn handle_traced(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: Option<&crate::listener::PeerTls>,
        started: Instant,
    ) -> Response<Body> {
        if let Some(gateway) = &self.gateway {
            return Box::pin(self.handle_gateway(gateway, req, started)).await;
        }
        // Server-side mode: the caller its certificate names; a peer that names none is
        // refused (and audited under this sidecar's identity).
        let (subject, caller_known) = match self.callers.as_ref().map(|c| c.identify(peer)) {
            None => (self.identity.clone(), true),
            Some(Some(caller)) => (caller, true),
            Some(None) => {
                telemetry::mesh_refused("identity");
                (self.identity.clone(), false)
            }
        };
        let ctx = Ctx::new(&req, subject, self.tracer.as_ref(), started);
        let result = if caller_known {
            Ok(req)
        } else {
            Err(ProxyError::UnknownPeer)
        };
        self.serve_as(ctx, result, started).await
    }

    /// Gateway mode: the metadata document, or the request served for the caller its
    /// token names, or the token refused (401/403, audited, counted). `started` is when
    /// the request arrived: its latency includes checking the token.
    async fn handle_gateway(
        self: &Arc<Self>,
        gateway: &crate::gateway::Gateway,
        req: Request<Incoming>,
        started: Instant,
    ) -> Response<Body> {
        let path = req.uri().path();
        if path.starts_with(crate::gateway::METADATA_PATH) {
            return match (req.method(), gateway.metadata(path)) {
                (&Method::GET, Some(document)) => document,
                (&Method::GET, None) => ProxyError::UnknownPath(truncate(path)).into_response(None),
                (other, _) => ProxyError::MethodNotAllowed(other.to_string()).into_response(None),
            };
        }
        gateway.follow_issuers();
        match gateway.tokens.authenticate(req.headers(), path).await {
            Ok(principal) => {
                telemetry::gateway_auth("accepted");
                let mut ctx = Ctx::new(
                    &req,
                    principal.subject.clone(),
                    self.tracer.as_ref(),
                    started,
                );
                ctx.principal = Some(principal);
                self.serve_as(ctx, Ok(req), started).await
            }
            Err(refusal) => {
                telemetry::gateway_auth(match refusal {
                    Refusal::Missing => "missing",
                    Refusal::Invalid(_) => "invalid",
                    Refusal::InsufficientScope => "insufficient_scope",
                });
                let response = gateway.refuse(&refusal, path);
                let mut pending = Pending {
                    proxy: self,
                    ctx: Ctx::new(
                        &req,
                        Identity::new(UNAUTHENTICATED),
                        self.tracer.as_ref(),
                        started,
                    ),
                    started,
                    finished: false,
                };
                if let Some(trace) = &mut pending.ctx.trace {
                    trace.refused(match refusal {
                        Refusal::Missing => "no bearer token".to_owned(),
                        Refusal::Invalid(why) => format!("token refused: {why}"),
                        Refusal::InsufficientScope => "token lacks the required scope".to_owned(),
                    });
                }
                pending.finish(response.status().as_u16(), None, Outcome::Rejected);
                response
            }
        }
    }

    /// Serve `req` (or answer the refusal already reached) for `ctx`'s subject; one
    /// audit line and the request metrics (timed from `started`), whatever happens.
    async fn serve_as(
        self: &Arc<Self>,
        ctx: Ctx,
        req: Result<Request<Incoming>, ProxyError>,
        started: Instant,
    ) -> Response<Body> {
        let mut pending = Pending {
            proxy: self,
            ctx,
            started,
            finished: false,
        };
        let result = match req {
            Ok(req) => self.route_and_forward(req, &mut pending.ctx).await,
            Err(e) => Err(e),
        };
        let (response, error_code, outcome) = match result {
            Ok(resp) => {
                let outcome = Outcome::of_status(resp.status().as_u16());
                (resp, None, outcome)
            }
            Err(error) => {
                tracing::debug!(server = %pending.ctx.server, error = %error, "request refused");
                if let Some(trace) = &mut pending.ctx.trace {
                    trace.refused(error.to_string());
                }
                let (code, outcome) = (error.code(), error.outcome());
                (
                    error.into_response(pending.ctx.request_id.as_deref()),
                    Some(code),
                    outcome,
                )
            }
        };
        pending.finish(response.status().as_u16(), error_code, outcome);
        // Tracing on: the request's span ends when its answer does (an SSE stream too).
        match pending.ctx.trace.as_mut().and_then(|t| t.hold()) {
            None => response,
            Some(span) => response.map(|body| body::holding(body, span)),
        }
    }

    async fn route_and_forward(
        self: &Arc<Self>,
        req: Request<Incoming>,
        ctx: &mut Ctx,
    ) -> Result<Response<Body>, ProxyError> {
        // Every Origin, not only the first: a server may read another one.
        if let Some(origin) = req
            .headers()
            .get_all(header::ORIGIN)
            .iter()
            .find(|o| !self.origin_allowed(o))
        {
            let shown = String::from_utf8_lossy(origin.as_bytes());
            return Err(ProxyError::OriginForbidden(truncate(&shown)));
        }
        if self.loopback_host_only {
            check_loopback_host(&req)?;
        }
        let path = req.uri().path();
        let runtime = match (&self.callers, &self.gateway, &ctx.principal) {
            (Some(callers), _, _) => callers.runtime_for(&ctx.subject)?,
            (None, Some(gateway), Some(principal)) => gateway.runtime_for(principal)?,
            // A gateway decides for a caller only.
            (None, Some(_), None) => return Err(ProxyError::NotReady),
            (None, None, _) => self.active.current().ok_or(ProxyError::NotReady)?,
        };
        if self.callers.is_none() && (path == "/mcp" || path == "/mcp/") {
            let subject = ctx.subject.clone();
            return Box::pin(self.aggregate(req, &subject, &runtime, ctx)).await;
        }
        let server = server_name(path)?;
        let route = lookup(&runtime, server)?;
        ctx.server = route.label.clone();

        let method = req.method().clone();
        let (parts, incoming) = req.into_parts();
        // A 2025 agent's handshake, kept in case the server turns out to refuse it.
        let mut handshake = None;
        let body = match method {
            Method::POST => {
                let body = self.read_body(&parts.headers, incoming).await?;
                let envelope = mcp::parse(&body).map_err(rejection)?;
                ctx.request_id = envelope.id().map(|id| id.to_owned());
                ctx.trace_from(
                    &parts.headers,
                    match &envelope {
                        Envelope::Single(m) => Some(m),
                        Envelope::Batch(_) => None,
                    },
                );
                match &envelope {
                    Envelope::Single(m) => {
                        ctx.method = m.rpc.map_or("(response)", mcp::Method::name);
                        ctx.rpc_method = m.method.as_deref().map(truncate);
                    }
                    Envelope::Batch(_) => ctx.method = "(batch)",
                }
                let modern = mcp::check_headers(&parts.headers, &envelope).map_err(rejection)?;
                // A 2026-07-28 request for a server that speaks only 2025 revisions is
                // bridged (learnt once per snapshot; an atomic load after that).
                if modern
                    && self.callers.is_none()
                    && matches!(envelope, Envelope::Single(_))
                    // Unknown (the server cannot be asked): relayed, to fail as it fails.
                    && self.generation(&route).await == Some(false)
                {
                    ctx.decision = Verdict::Plumbing;
                    return Box::pin(self.bridge(&runtime, &route, &parts.headers, &body, ctx))
                        .await;
                }
                // A 2025 request for a server learnt to speak only 2026-07-28: bridged
                // the other way.
                if !modern && self.callers.is_none() {
                    if route.holds_sessions() {
                        ctx.decision = Verdict::Plumbing;
                        return Box::pin(self.bridge_legacy(
                            &runtime,
                            &route,
                            &method,
                            &parts.headers,
                            &body,
                            ctx,
                        ))
                        .await;
                    }
                    if let Envelope::Single(m) = &envelope
                        && m.kind == mcp::Kind::Request
                        && m.rpc == Some(mcp::Method::Initialize)
                    {
                        handshake = Some(body.clone());
                    }
                }
                match &envelope {
                    Envelope::Single(m) => {
                        ctx.decision = Verdict::Plumbing;
                        let subject = ctx.subject.clone();
                        authorize(&route, &subject, m, ctx)?;
                        ctx.lists = response_filter(&route, m);
                    }
                    // Refused before anything is decided: no token is taken.
                    Envelope::Batch(messages) => {
                        check_batch(messages)?;
                        ctx.decision = Verdict::Plumbing;
                    }
                }
                body
            }
            Method::GET | Method::DELETE => {
                ctx.decision = Verdict::Plumbing;
                ctx.trace_from(&parts.headers, None);
                if self.callers.is_none() && route.holds_sessions() {
                    return Box::pin(self.bridge_legacy(
                        &runtime,
                        &route,
                        &method,
                        &parts.headers,
                        &Bytes::new(),
                        ctx,
                    ))
                    .await;
                }
                Bytes::new()
            }
            other => return Err(ProxyError::MethodNotAllowed(other.to_string())),
        };

        // What is left (a 2026 agent's batch) cannot reach a server only the sidecar's
        // stream speaks to.
        if route.sse {
            return Err(ProxyError::InvalidRequest(format!(
                "server {} speaks the legacy HTTP+SSE transport; send one message per request",
                route.name
            )));
        }
        let mut headers = parts.headers;
        let endpoint = self.open_session(&ctx.subject, &route, &mut headers)?;
        let uri = route.endpoints[endpoint].uri.clone();
        let stream = method == Method::GET;
        let upstream_resp = self
            .upstream
            .send(&route, uri, method, headers, body)
            .await?;
        // The server refused a 2025 handshake: if it speaks 2026-07-28, it speaks
        // nothing else, and the agent's session is the sidecar's (learnt once per
        // snapshot; a dual-era server's handshake is relayed as it was).
        if let Some(body) = handshake
            && upstream_resp.status().is_client_error()
            && self.generation(&route).await == Some(true)
        {
            route.learn_modern_only();
            return Box::pin(self.bridge_legacy(
                &runtime,
                &route,
                &Method::POST,
                &http::HeaderMap::new(),
                &body,
                ctx,
            ))
            .await;
        }
        if upstream_resp.status().is_redirection() {
            return Err(ProxyError::UpstreamFailed {
                server: route.name.clone(),
                reason: format!(
                    "it answered {} (a redirect), which would send the agent around the sidecar",
                    upstream_resp.status()
                ),
            });
        }

        let (mut parts, incoming) = upstream_resp.into_parts();
        upstream::clean_response_headers(&mut parts.headers);
        self.seal_session(&ctx.subject, &route, endpoint, &mut parts.headers);
        // Tracing on: the upstream request's span ends when its body does.
        let span = parts.extensions.remove::<crate::trace::Held>();
        // The request's place among those in flight to the server lasts as long as the
        // body it relays.
        let place = parts.extensions.remove::<upstream::InFlight>();
        let done = {
            let streaming = telemetry::stream_started(&route.label);
            let flying = self.in_flight.start();
            move || {
                streaming();
                drop(flying);
                drop(span);
                drop(place);
            }
        };
        let relayed = body::relay(incoming, done);
        let body = if stream {
            filter_stream(&mut parts, relayed, &route)
        } else {
            match ctx.lists.take() {
                None => relayed,
                Some(lists) => filter_list(&mut parts, relayed, &route, lists).await?,
            }
        };
        Ok(Response::from_parts(parts, body))
    }

    pub(crate) async fn read_body(
        &self,
        headers: &http::HeaderMap,
        incoming: Incoming,
    ) -> Result<Bytes, ProxyError> {
        check_content_type(headers)?;
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > DRAIN_LIMIT) {
            // Too much to read and discard: answer now (hyper closes the connection).
            return Err(ProxyError::BodyTooLarge(self.max_body_bytes));
        }
        let limit = self.max_body_bytes;
        let read = async move {
            let mut body = incoming;
            let (mut first, mut rest): (Option<Bytes>, Option<bytes::BytesMut>) = (None, None);
            let mut total: u64 = 0;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| ProxyError::BodyRead(e.to_string()))?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                total += data.len() as u64;
                if total > limit as u64 {
                    // Over the limit: keep reading, keep nothing, up to the drain limit.
                    first = None;
                    rest = None;
                    if total > DRAIN_LIMIT {
                        break;
                    }
                    continue;
                }
                match (&mut first, &mut rest) {
                    (None, None) => first = Some(data),
                    (Some(head), None) => {
                        let mut buf = bytes::BytesMut::with_capacity(head.len() + data.len());
                        buf.extend_from_slice(head);
                        buf.extend_from_slice(&data);
                        first = None;
                        rest = Some(buf);
                    }
                    (_, Some(buf)) => buf.extend_from_slice(&data),
                }
            }
            if total > limit as u64 {
                return Err(ProxyError::BodyTooLarge(limit));
            }
            Ok(match (first, rest) {
                (_, Some(buf)) => buf.freeze(),
                (Some(head), None) => head,
                (None, None) => Bytes::new(),
            })
        };
        match tokio::time::timeout(self.body_read_timeout, read).await {
            Ok(result) => result,
            Err(_) => Err(ProxyError::BodyTimeout(
                u64::try_from(self.body_read_timeout.as_millis()).unwrap_or(u64::MAX),
            )),
        }
    }

    /// The endpoint for this request. An agent's session id must be one this sidecar
    /// sealed for this identity and server; the upstream gets its own id back.
    fn open_session(
        &self,
        subject: &Identity,
        route: &Route,
        headers: &mut http::HeaderMap,
    ) -> Result<usize, ProxyError> {
        let mut sessions = headers.get_all(mcp::HEADER_SESSION).iter();
        let Some(agent) = sessions.next() else {
            return Ok(route.pick());
        };
        // Two session ids: the upstream might take one and the check the other.
        if sessions.next().is_some() {
            return Err(ProxyError::InvalidRequest(
                "more than one Mcp-Session-Id header".to_owned(),
            ));
        }
        let (endpoint, upstream_id) = self
            .sessions
            .open(
                subject.as_str(),
                &route.name,
                route.endpoints.len(),
                agent.as_bytes(),
            )
            .ok_or(ProxyError::UnknownSession)?;
        headers.insert(mcp::HEADER_SESSION, upstream_id);
        Ok(endpoint)
    }

    /// Replace the upstream's session id in a response with the sealed one.
    fn seal_session(
        &self,
        subject: &Identity,
        route: &Route,
        endpoint: usize,
        headers: &mut http::HeaderMap,
    ) {
        let Some(upstream_id) = headers.get(mcp::HEADER_SESSION) else {
            return;
        };
        match self.sessions.seal(
            subject.as_str(),
            &route.name,
            endpoint,
            upstream_id.as_bytes(),
        ) {
            Some(sealed) => {
                headers.insert(mcp::HEADER_SESSION, sealed);
            }
            None => {
                tracing::warn!(server = %route.name, "upstream session id too long to seal; dropped");
                headers.remove(mcp::HEADER_SESSION);
            }
        }
    }

    /// No `Origin` (non-browser clients), a loopback origin, or one on the allowlist.
    fn origin_allowed(&self, origin: &HeaderValue) -> bool {
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        let origin = origin.trim_end_matches('/');
        is_loopback_origin(origin)
            || self
                .allowed_origins
                .iter()
                .any(|o| o.eq_ignore_ascii_case(origin))
    }
}

/// On a loopback listener, the authority the agent addressed (HTTP/2's `:authority`
/// and every `Host` header) must name loopback too: DNS-rebinding protection for
/// requests without an `Origin`. More than one `Host` is refused outright.
pub fn check_loopback_host(req: &Request<Incoming>) -> Result<(), ProxyError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::HostForbidden(
            "more than one Host header".to_owned(),
        ));
    }
    let authority = req.uri().authority().map(|a| a.as_str());
    let host = first.map(|h| {
        h.to_str()
            .map_err(|_| ProxyError::HostForbidden("(not ASCII)".to_owned()))
    });
    for name in authority.into_iter().chain(host.transpose()?) {
        if !is_loopback_authority(name) {
            return Err(ProxyError::HostForbidden(truncate(name)));
        }
    }
    Ok(())
}

/// The request body must be JSON in UTF-8, sent as is: a body the sidecar did not
/// decode (`Content-Encoding`), or one in another charset, is not what it would judge.
fn check_content_type(headers: &http::HeaderMap) -> Result<(), ProxyError> {
    let media = |text: &str| ProxyError::UnsupportedMediaType(text.to_owned());
    let mut types = headers.get_all(header::CONTENT_TYPE).iter();
    let value = types
        .next()
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| media("content-type must be application/json"))?;
    if types.next().is_some() {
        return Err(media("more than one Content-Type header"));
    }
    let mut params = value.split(';');
    if !params
        .next()
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
    {
        return Err(media("content-type must be application/json"));
    }
    for param in params {
        let Some((name, charset)) = param.split_once('=') else {
            continue;
        };
        let charset = charset.trim().trim_matches('"');
        if name.trim().eq_ignore_ascii_case("charset")
            && !charset.eq_ignore_ascii_case("utf-8")
            && !charset.eq_ignore_ascii_case("utf8")
        {
            return Err(media("the request body must be UTF-8 (charset=utf-8)"));
        }
    }
    for encoding in headers.get_all(header::CONTENT_ENCODING) {
        if !encoding
            .to_str()
            .is_ok_and(|e| e.trim().eq_ignore_ascii_case("identity"))
        {
            return Err(media(
                "Content-Encoding is not accepted: send the request body uncompressed",
            ));
        }
    }
    Ok(())
}

/// `http(s)://localhost|127.0.0.1|[::1][:port]`.
fn is_loopback_origin(origin: &str) -> bool {
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(is_loopback_authority)
}

/// `/mcp/<server>` (a trailing slash is tolerated) → `<server>`.
fn server_name(path: &str) -> Result<&str, ProxyError> {
    path.strip_prefix("/mcp/")
        .map(|rest| rest.strip_suffix('/').unwrap_or(rest))
        .filter(|name| !name.is_empty() && !name.contains('/'))
        .ok_or_else(|| ProxyError::UnknownPath(truncate(path)))
}

/// `text` cut to 200 characters (marked with `…`): what an error or a log line shows of
/// a value that came from the network.
pub fn truncate(text: &str) -> String {
    const MAX: usize = 200;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// Decide one message against the route's policy, recording what was decided.
pub(crate) fn authorize(
    route: &Route,
    subject: &Identity,
    m: &mcp::Message<'_>,
    ctx: &mut Ctx,
) -> Result<(), ProxyError> {
    let Some(method) = m.rpc.filter(|m| m.is_gated()) else {
        return Ok(());
    };
    let label = method.name();
    let Some(target) = &m.acts_on else {
        // A gated call that names nothing: nothing can allow it.
        telemetry::decision(&route.label, label, Verdict::Denied);
        ctx.decision = Verdict::Denied;
        return Err(ProxyError::NotPermitted {
            kind: "call",
            name: format!("{label} without a target"),
            subject: subject.clone(),
            server: route.name.clone(),
        });
    };
    let kind = kind_name(target.kind);
    ctx.kind = Some(kind);
    ctx.name = Some(truncate(&target.name));
    match route.policy.decide(target.kind, &target.name, m.arguments) {
        Decision::Deny(rule) => {
            telemetry::decision(&route.label, label, Verdict::Denied);
            ctx.decision = Verdict::Denied;
            ctx.rule = rule.map(|r| r.id.clone());
            Err(ProxyError::NotPermitted {
                kind,
                name: truncate(&target.name),
                subject: subject.clone(),
                server: route.name.clone(),
            })
        }
        Decision::Allow(rule) => {
            ctx.rule = Some(rule.id.clone());
            if rule.audit_arguments {
                ctx.arguments = m.arguments.map(|a| a.to_owned());
            }
            if let Some(problem) = route
                .pins
                .as_ref()
                .and_then(|p| p.call(target.kind, &target.name))
            {
                let drift = problem.describe();
                ctx.pin = Some(drift.clone());
                if !problem.warn {
                    telemetry::decision(&route.label, label, Verdict::Denied);
                    ctx.decision = Verdict::Denied;
                    return Err(ProxyError::NotPinned {
                        kind,
                        name: truncate(&target.name),
                        server: route.name.clone(),
                        drift,
                    });
                }
            }
            if let Some(limiter) = &rule.limiter
                && let Err(wait) = limiter.acquire(subject.as_str(), &target.name)
            {
                telemetry::decision(&route.label, label, Verdict::RateLimited);
                telemetry::rate_limited(&route.label, SharedString::from(rule.id.clone()));
                ctx.decision = Verdict::RateLimited;
                return Err(ProxyError::RateLimited {
                    kind,
                    name: truncate(&target.name),
                    subject: subject.clone(),
                    rule: rule.id.to_string(),
                    retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1),
                });
            }
            telemetry::decision(&route.label, label, Verdict::Allowed);
            ctx.decision = Verdict::Allowed;
            Ok(())
        }
    }
}

/// What the answer to `m` must be filtered for: a list the policy trims, or the
/// values of a completion on a resource template (they name resources).
pub(crate) fn response_filter(route: &Route, m: &mcp::Message<'_>) -> Option<Lists> {
    let method = m.rpc?;
    if let Some(list) = method.list() {
        return route.filters(list.kind).then_some(Lists::One(list));
    }
    match &m.acts_on {
        Some(subject)
            if method == mcp::Method::CompletionComplete
                && subject.kind == TargetKind::Resource
                && route.policy.filters(TargetKind::Resource) =>
        {
            filter::Completion::new(&subject.name, m.params?)
                .map(|c| Lists::Completion(Arc::new(c)))
        }
        _ => None,
    }
}

/// Refuse a batch that holds a gated call or a list request (module docs: why).
fn check_batch(messages: &[mcp::Message<'_>]) -> Result<(), ProxyError> {
    let refused = messages
        .iter()
        .filter_map(|m| m.rpc)
        .find(|method| method.is_gated() || method.list().is_some());
    match refused {
        None => Ok(()),
        Some(method) => Err(ProxyError::InvalidRequest(format!(
            "a JSON-RPC batch may not contain {}: send gated calls and list requests one by one",
            method.name()
        ))),
    }
}

/// The GET stream, filtered for every kind of list (see the module docs).
fn filter_stream(parts: &mut http::response::Parts, body: Body, route: &Arc<Route>) -> Body {
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| Framing::of(v.as_bytes()))
        == Some(Framing::Sse);
    if !sse {
        return body;
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    filter::sse(body, route.clone(), Lists::Any)
}

/// Filter a list response (JSON or SSE) down to what the policy lets the agent see.
async fn filter_list(
    parts: &mut http::response::Parts,
    body: Body,
    route: &Arc<Route>,
    lists: Lists,
) -> Result<Body, ProxyError> {
    let framing = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| Framing::of(v.as_bytes()));
    if framing == Some(Framing::Sse) {
        parts.headers.remove(header::CONTENT_LENGTH);
        Ok(filter::sse(body, route.clone(), lists))
    } else if framing == Some(Framing::Json) {
        parts.headers.remove(header::CONTENT_LENGTH);
        let filtered =
            filter::json(body, route, &lists)
                .await
                .map_err(|e| ProxyError::UpstreamFailed {
                    server: route.name.clone(),
                    reason: e.to_string(),
                })?;
        Ok(body::full(filtered))
    } else {
        Ok(body)
    }
}

fn lookup(runtime: &Runtime, server: &str) -> Result<Arc<Route>, ProxyError> {
    runtime
        .route(server)
        .cloned()
        .ok_or_else(|| ProxyError::UnknownServer {
            name: truncate(server),
            known: runtime.known_servers().to_owned(),
        })
}

pub(crate) fn rejection(r: Rejection) -> ProxyError {
    match r {
        Rejection::Parse(m) => ProxyError::Parse(m),
        Rejection::Invalid(m) => ProxyError::InvalidRequest(m),
        Rejection::Header(m) => ProxyError::HeaderMismatch(m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_origins() {
        for ok in [
            "http://localhost",
            "http://localhost:3000",
            "https://127.0.0.1:8443",
            "http://[::1]:80",
            "http://LOCALHOST",
        ] {
            assert!(is_loopback_origin(ok), "{ok}");
        }
        for bad in [
            "null",
            "http://evil.com",
            "http://localhost.evil.com",
            "http://127.0.0.1.nip.io",
            "http://localhost:99999",
            "http://localhost:80@evil.com",
            "ftp://localhost",
            "http://[::2]",
        ] {
            assert!(!is_loopback_origin(bad), "{bad}");
        }
        assert!(is_loopback_authority("127.0.0.1:16001"));
        assert!(!is_loopback_authority("evil.example.com:16001"));
    }

    #[test]
    fn server_names_from_paths() {
        assert_eq!(server_name("/mcp/github").ok(), Some("github"));
        assert_eq!(server_name("/mcp/github/").ok(), Some("github"));
        assert!(server_name("/mcp").is_err());
        assert!(server_name("/mcp/").is_err());
        assert!(server_name("/mcp/a/b").is_err());
        assert!(server_name("/other").is_err());
    }
}

#[cfg(test)]
mod future_size {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_of<A, B, F: FnOnce(A, B) -> Fut, Fut>(_: F) -> usize {
        std::mem::size_of::<Fut>()
    }

    #[test]
    fn the_request_future_hyper_keeps_per_connection_stays_small() {
        // hyper's HTTP/1 server allocates room for one request future per connection,
        // busy or idle; before the rare branches (the aggregate, bridging, gateway
        // tokens, OAuth, tracing) were boxed it was 22 KiB: 22 MiB at 1,000 agent
        // connections. Now ~5 KiB; this keeps it from creeping back.
        let size = future_of(Proxy::handle);
        assert!(size <= 7 * 1024, "the request future is {size} bytes");
    }
}
