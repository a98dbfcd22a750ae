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

use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::mcp::{self, Envelope, Rejection};
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
}

/// What a request is labelled with in metrics, filled in as it becomes known.
struct Labels {
    server: SharedString,
    method: &'static str,
}

impl Proxy {
    /// The hyper service function.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let mut labels = Labels {
            server: telemetry::UNKNOWN_SERVER,
            method: match *req.method() {
                Method::GET => "(get)",
                Method::DELETE => "(delete)",
                _ => "other",
            },
        };
        let response = match self.route_and_forward(req, &mut labels).await {
            Ok(resp) => resp,
            Err((error, id)) => {
                let outcome = error.outcome();
                tracing::debug!(server = %labels.server, error = %error, "request refused");
                let resp = error.into_response(id.as_deref());
                telemetry::request(&labels.server, labels.method, outcome, started.elapsed());
                return Ok(resp);
            }
        };
        let outcome = match response.status().as_u16() {
            100..=399 => "ok",
            400..=499 => "client_error",
            _ => "upstream_error",
        };
        telemetry::request(&labels.server, labels.method, outcome, started.elapsed());
        Ok(response)
    }

    async fn route_and_forward(
        &self,
        req: Request<Incoming>,
        labels: &mut Labels,
    ) -> Result<Response<Body>, (ProxyError, Option<Box<serde_json::value::RawValue>>)> {
        if let Some(origin) = req.headers().get(header::ORIGIN)
            && !self.origin_allowed(origin)
        {
            let shown = String::from_utf8_lossy(origin.as_bytes()).into_owned();
            return Err((ProxyError::OriginForbidden(shown), None));
        }
        if self.loopback_host_only
            && let Some(host) = request_host(&req)
            && !is_loopback_authority(host)
        {
            return Err((ProxyError::HostForbidden(truncate(host)), None));
        }
        let server = server_name(req.uri().path()).map_err(|e| (e, None))?;
        let runtime = self.active.current().ok_or((ProxyError::NotReady, None))?;
        let route = lookup(&runtime, server).map_err(|e| (e, None))?;
        labels.server = route.label.clone();

        let method = req.method().clone();
        let (parts, incoming) = req.into_parts();
        let mut id = None;
        let body = match method {
            Method::POST => {
                let body = self
                    .read_body(&parts.headers, incoming)
                    .await
                    .map_err(|e| (e, None))?;
                let envelope = mcp::parse(&body).map_err(|r| (rejection(r), None))?;
                id = envelope.id().map(|id| id.to_owned());
                labels.method = match &envelope {
                    Envelope::Single(m) => m
                        .method
                        .as_deref()
                        .map_or("(response)", telemetry::method_label),
                    Envelope::Batch(_) => "(batch)",
                };
                mcp::check_headers(&parts.headers, &envelope)
                    .map_err(|r| (rejection(r), id.clone()))?;
                body
            }
            Method::GET | Method::DELETE => Bytes::new(),
            other => return Err((ProxyError::MethodNotAllowed(other.to_string()), None)),
        };

        let mut headers = parts.headers;
        let endpoint = pick_endpoint(&route, &mut headers).map_err(|e| (e, id.clone()))?;
        let uri = route.endpoints[endpoint].uri.clone();
        let upstream_resp = self
            .upstream
            .send(&route, uri, method, headers, body)
            .await
            .map_err(|e| (e, id))?;

        let (mut parts, incoming) = upstream_resp.into_parts();
        upstream::clean_response_headers(&mut parts.headers);
        if route.endpoints.len() > 1 {
            tag_session(&mut parts.headers, endpoint);
        }
        let done = telemetry::stream_started(&route.label);
        Ok(Response::from_parts(parts, body::relay(incoming, done)))
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
