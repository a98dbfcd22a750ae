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
//! Session affinity: with one endpoint, session ids pass through untouched. With
//! several, the sidecar prefixes the id the agent sees with the endpoint's index
//! (`2.<upstream id>`) and routes on it, so affinity needs no table and survives a
//! sidecar restart. Requests without a session are spread round-robin.
//!
//! Not here: policy decisions, rate limits and audit (later modules hook in between
//! the envelope and the upstream call).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use metrics::SharedString;

use serde_json::value::RawValue;

use crate::audit::{Audit, Record};
use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::filter::{self, Framing, ListKind};
use crate::mcp::{self, Envelope, Rejection, TargetKind};
use crate::policy::Decision;
use crate::snapshot::{Active, Route, Runtime};
use crate::telemetry;
use crate::upstream::{self, Upstream};

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
    /// This sidecar's identity (`--identity`), the subject of every decision.
    pub identity: Arc<str>,
}

/// What is known about a request, filled in as the path learns it; it labels the
/// metrics and becomes the audit line.
struct Ctx {
    server: SharedString,
    method: &'static str,
    /// The JSON-RPC method as sent (bounded), for the audit line.
    rpc_method: Option<String>,
    kind: Option<&'static str>,
    name: Option<String>,
    decision: &'static str,
    rule: Option<Arc<str>>,
    request_id: Option<Box<RawValue>>,
    session: Option<String>,
    arguments: Option<Box<RawValue>>,
    list: Option<ListKind>,
}

impl Ctx {
    fn new(req: &Request<Incoming>) -> Ctx {
        Ctx {
            server: telemetry::UNKNOWN_SERVER,
            method: match *req.method() {
                Method::GET => "(get)",
                Method::DELETE => "(delete)",
                _ => "other",
            },
            rpc_method: None,
            kind: None,
            name: None,
            decision: "rejected",
            rule: None,
            request_id: None,
            session: req
                .headers()
                .get(mcp::HEADER_SESSION)
                .and_then(|v| v.to_str().ok())
                .map(truncate),
            arguments: None,
            list: None,
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

impl Proxy {
    /// The hyper service function.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let mut ctx = Ctx::new(&req);
        let (response, error_code, outcome) = match self.route_and_forward(req, &mut ctx).await {
            Ok(resp) => {
                let outcome = match resp.status().as_u16() {
                    100..=399 => "ok",
                    400..=499 => "client_error",
                    _ => "upstream_error",
                };
                (resp, None, outcome)
            }
            Err(error) => {
                tracing::debug!(server = %ctx.server, error = %error, "request refused");
                let (code, outcome) = (error.code(), error.outcome());
                (
                    error.into_response(ctx.request_id.as_deref()),
                    Some(code),
                    outcome,
                )
            }
        };
        let elapsed = started.elapsed();
        telemetry::request(&ctx.server, ctx.method, outcome, elapsed);
        let server = ctx.server.to_string();
        self.audit.record(&Record {
            time: humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            subject: &self.identity,
            server: &server,
            method: ctx.rpc_method.as_deref().unwrap_or(ctx.method),
            kind: ctx.kind,
            name: ctx.name.as_deref(),
            decision: ctx.decision,
            rule: ctx.rule.as_deref(),
            status: response.status().as_u16(),
            error_code,
            latency_ms: elapsed.as_secs_f64() * 1000.0,
            request_id: ctx.request_id.as_deref(),
            session: ctx.session.as_deref(),
            arguments: ctx.arguments.as_deref(),
        });
        Ok(response)
    }

    async fn route_and_forward(
        &self,
        req: Request<Incoming>,
        ctx: &mut Ctx,
    ) -> Result<Response<Body>, ProxyError> {
        if let Some(origin) = req.headers().get(header::ORIGIN)
            && !self.origin_allowed(origin)
        {
            let shown = String::from_utf8_lossy(origin.as_bytes()).into_owned();
            return Err(ProxyError::OriginForbidden(shown));
        }
        if self.loopback_host_only
            && let Some(host) = request_host(&req)
            && !is_loopback_authority(host)
        {
            return Err(ProxyError::HostForbidden(truncate(host)));
        }
        let server = server_name(req.uri().path())?;
        let runtime = self.active.current().ok_or(ProxyError::NotReady)?;
        let route = lookup(&runtime, server)?;
        ctx.server = route.label.clone();

        let method = req.method().clone();
        let (parts, incoming) = req.into_parts();
        let body = match method {
            Method::POST => {
                let body = self.read_body(&parts.headers, incoming).await?;
                let envelope = mcp::parse(&body).map_err(rejection)?;
                ctx.request_id = envelope.id().map(|id| id.to_owned());
                match &envelope {
                    Envelope::Single(m) => {
                        ctx.method = m
                            .method
                            .as_deref()
                            .map_or("(response)", telemetry::method_label);
                        ctx.rpc_method = m.method.as_deref().map(truncate);
                        ctx.list = m.method.as_deref().and_then(ListKind::of);
                    }
                    Envelope::Batch(_) => ctx.method = "(batch)",
                }
                mcp::check_headers(&parts.headers, &envelope).map_err(rejection)?;
                ctx.decision = "plumbing";
                match &envelope {
                    Envelope::Single(m) => authorize(&route, &self.identity, m, ctx)?,
                    Envelope::Batch(messages) => {
                        for m in messages {
                            authorize(&route, &self.identity, m, ctx)?;
                        }
                    }
                }
                body
            }
            Method::GET | Method::DELETE => {
                ctx.decision = "plumbing";
                Bytes::new()
            }
            other => return Err(ProxyError::MethodNotAllowed(other.to_string())),
        };

        let mut headers = parts.headers;
        let endpoint = pick_endpoint(&route, &mut headers)?;
        let uri = route.endpoints[endpoint].uri.clone();
        let upstream_resp = self
            .upstream
            .send(&route, uri, method, headers, body)
            .await?;

        let (mut parts, incoming) = upstream_resp.into_parts();
        upstream::clean_response_headers(&mut parts.headers);
        if route.endpoints.len() > 1 {
            tag_session(&mut parts.headers, endpoint);
        }
        let done = telemetry::stream_started(&route.label);
        let relayed = body::relay(incoming, done);
        let body = match ctx.list.filter(|l| route.policy.filters(l.kind)) {
            None => relayed,
            Some(list) => filter_list(&mut parts, relayed, &route, list).await?,
        };
        Ok(Response::from_parts(parts, body))
    }

    async fn read_body(
        &self,
        headers: &http::HeaderMap,
        incoming: Incoming,
    ) -> Result<Bytes, ProxyError> {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ProxyError::UnsupportedMediaType);
        }
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body_bytes as u64) {
            return Err(ProxyError::BodyTooLarge(self.max_body_bytes));
        }
        match Limited::new(incoming, self.max_body_bytes).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                Err(ProxyError::BodyTooLarge(self.max_body_bytes))
            }
            Err(e) => Err(ProxyError::BodyRead(e.to_string())),
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

/// The authority the agent addressed: HTTP/2's `:authority`, else the `Host` header.
fn request_host(req: &Request<Incoming>) -> Option<&str> {
    req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    })
}

/// `http(s)://localhost|127.0.0.1|[::1][:port]`.
fn is_loopback_origin(origin: &str) -> bool {
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(is_loopback_authority)
}

/// `localhost|127.0.0.1|[::1][:port]`.
fn is_loopback_authority(rest: &str) -> bool {
    let host = if let Some(v6) = rest.strip_prefix('[') {
        match v6.split_once(']') {
            Some((host, port)) if port.is_empty() || is_port(port) => return host == "::1",
            _ => return false,
        }
    } else {
        match rest.split_once(':') {
            Some((host, port)) if is_port(port) => host,
            Some(_) => return false,
            None => rest,
        }
    };
    host.eq_ignore_ascii_case("localhost") || host == "127.0.0.1"
}

fn is_port(text: &str) -> bool {
    text.strip_prefix(':')
        .unwrap_or(text)
        .parse::<u16>()
        .is_ok()
}

/// `/mcp/<server>` (a trailing slash is tolerated) → `<server>`.
fn server_name(path: &str) -> Result<&str, ProxyError> {
    path.strip_prefix("/mcp/")
        .map(|rest| rest.strip_suffix('/').unwrap_or(rest))
        .filter(|name| !name.is_empty() && !name.contains('/'))
        .ok_or_else(|| ProxyError::UnknownPath(truncate(path)))
}

fn truncate(text: &str) -> String {
    const MAX: usize = 200;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// Decide one message against the route's policy, recording what was decided.
fn authorize(
    route: &Route,
    subject: &str,
    m: &mcp::Message<'_>,
    ctx: &mut Ctx,
) -> Result<(), ProxyError> {
    let Some(method) = m.method.as_deref().filter(|m| mcp::is_gated(m)) else {
        return Ok(());
    };
    let label = telemetry::method_label(method);
    let Some(target) = &m.subject else {
        // A gated call that names nothing: nothing can allow it.
        telemetry::decision(&route.label, label, "denied");
        ctx.decision = "denied";
        return Err(ProxyError::NotPermitted {
            kind: "call",
            name: format!("{method} without a target"),
            subject: subject.to_owned(),
            server: route.name.clone(),
        });
    };
    let kind = kind_name(target.kind);
    ctx.kind = Some(kind);
    ctx.name = Some(truncate(&target.name));
    match route.policy.decide(target.kind, &target.name, m.arguments) {
        Decision::Deny(rule) => {
            telemetry::decision(&route.label, label, "denied");
            ctx.decision = "denied";
            ctx.rule = rule.map(|r| r.id.clone());
            Err(ProxyError::NotPermitted {
                kind,
                name: truncate(&target.name),
                subject: subject.to_owned(),
                server: route.name.clone(),
            })
        }
        Decision::Allow(rule) => {
            ctx.rule = Some(rule.id.clone());
            if rule.audit_arguments {
                ctx.arguments = m.arguments.map(|a| a.to_owned());
            }
            if let Some(limiter) = &rule.limiter
                && let Err(wait) = limiter.acquire(&target.name)
            {
                telemetry::decision(&route.label, label, "rate_limited");
                telemetry::rate_limited(&route.label, SharedString::from(rule.id.clone()));
                ctx.decision = "rate_limited";
                return Err(ProxyError::RateLimited {
                    kind,
                    name: truncate(&target.name),
                    subject: subject.to_owned(),
                    rule: rule.id.to_string(),
                    retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1),
                });
            }
            telemetry::decision(&route.label, label, "allowed");
            ctx.decision = "allowed";
            Ok(())
        }
    }
}

/// Filter a list response (JSON or SSE) down to what the policy lets the agent see.
async fn filter_list(
    parts: &mut http::response::Parts,
    body: Body,
    route: &Arc<Route>,
    list: ListKind,
) -> Result<Body, ProxyError> {
    let framing = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| Framing::of(v.as_bytes()));
    if framing == Some(Framing::Sse) {
        parts.headers.remove(header::CONTENT_LENGTH);
        Ok(filter::sse(body, route.clone(), list))
    } else if framing == Some(Framing::Json) {
        parts.headers.remove(header::CONTENT_LENGTH);
        let filtered =
            filter::json(body, route, list)
                .await
                .map_err(|e| ProxyError::UpstreamUnavailable {
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

fn rejection(r: Rejection) -> ProxyError {
    match r {
        Rejection::Parse(m) => ProxyError::Parse(m),
        Rejection::Invalid(m) => ProxyError::InvalidRequest(m),
        Rejection::Header(m) => ProxyError::HeaderMismatch(m),
    }
}

/// The endpoint for this request; with several endpoints, strips the affinity prefix
/// from the agent's session id so the upstream sees its own id.
fn pick_endpoint(route: &Route, headers: &mut http::HeaderMap) -> Result<usize, ProxyError> {
    // Two session ids: the upstream might take one and the affinity the other.
    if headers.get_all(mcp::HEADER_SESSION).iter().nth(1).is_some() {
        return Err(ProxyError::InvalidRequest(
            "more than one Mcp-Session-Id header".to_owned(),
        ));
    }
    if route.endpoints.len() <= 1 {
        return Ok(0);
    }
    let Some(session) = headers.get(mcp::HEADER_SESSION) else {
        return Ok(route.pick());
    };
    let parsed = session
        .to_str()
        .ok()
        .and_then(|s| s.split_once('.'))
        .and_then(|(index, rest)| Some((index.parse::<usize>().ok()?, rest)))
        .filter(|(index, _)| *index < route.endpoints.len())
        .and_then(|(index, rest)| Some((index, HeaderValue::from_str(rest).ok()?)));
    let (index, upstream_id) = parsed.ok_or(ProxyError::UnknownSession)?;
    headers.insert(mcp::HEADER_SESSION, upstream_id);
    Ok(index)
}

/// Prefix the upstream's session id with the endpoint index (see the module docs).
fn tag_session(headers: &mut http::HeaderMap, endpoint: usize) {
    if let Some(id) = headers.get(mcp::HEADER_SESSION) {
        let mut tagged = endpoint.to_string().into_bytes();
        tagged.push(b'.');
        tagged.extend_from_slice(id.as_bytes());
        match HeaderValue::from_bytes(&tagged) {
            Ok(v) => {
                headers.insert(mcp::HEADER_SESSION, v);
            }
            Err(_) => {
                headers.remove(mcp::HEADER_SESSION);
            }
        }
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
        assert!(is_loopback_authority("127.0.0.1:15001"));
        assert!(!is_loopback_authority("evil.example.com:15001"));
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
