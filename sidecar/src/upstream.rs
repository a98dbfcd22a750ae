//! The client side: one pooled hyper client (rustls for https) shared by every route,
//! and the header hygiene applied in both directions.
//!
//! Towards the upstream, the agent's headers are copied except hop-by-hop headers
//! (and any the agent's `Connection` header names), `Host` and `Content-Length`
//! (rewritten by hyper for the upstream), credentials of the agent (`Authorization`,
//! `Proxy-Authorization`, `Cookie`: never passed through), `Origin` (checked here, and
//! meaningless to the upstream), `Accept-Encoding` (bodies stay identity-encoded so
//! the sidecar can read what it relays) and any agent copy of the route's credential
//! header, and the forwarding headers (`Forwarded`, `X-Forwarded-*`: the sidecar is
//! the edge); the route's credential is then inserted, marked sensitive. Towards the
//! agent, hop-by-hop headers are dropped, and so are headers that would point the
//! agent past the sidecar (`Location`, `Link`, `WWW-Authenticate`, …).
//!
//! With tracing on, each request is a CLIENT span and the agent's `traceparent` and
//! `tracestate` give way to that span's, in the headers and in the body's
//! `params._meta` ([`crate::trace`]); with tracing off they pass as sent.
//!
//! This module does not pick the endpoint (see [`crate::proxy`]) and never reads
//! or buffers a response body: it hands the upstream's body back as it arrives.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::error::ProxyError;
use crate::snapshot::Route;
use crate::telemetry;
use crate::workload::Workload;

/// Idle pooled connections are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the legacy ones proxies still see.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];
const LEGACY_HOP_BY_HOP: &[&str] = &["keep-alive", "proxy-connection"];

/// Agent headers that never reach an upstream (besides hop-by-hop ones). The
/// forwarding headers go too: the sidecar is the edge, and an upstream trusting them
/// would believe whatever client address the agent wrote there.
const NOT_FORWARDED: &[HeaderName] = &[
    header::HOST,
    header::CONTENT_LENGTH,
    header::AUTHORIZATION,
    header::COOKIE,
    header::ORIGIN,
    header::ACCEPT_ENCODING,
    header::FORWARDED,
];
/// Agent headers dropped by prefix (`X-Forwarded-For`, `-Host`, `-Proto`, …).
const NOT_FORWARDED_PREFIX: &str = "x-forwarded-";
/// Other forwarding headers proxies set.
const NOT_FORWARDED_OTHER: &[&str] = &["x-real-ip", "x-client-ip", "true-client-ip", "via"];

/// Upstream response headers that point the agent somewhere else: following them
/// would take its next request around the sidecar (to the upstream itself, or to
/// an authorization server for credentials the sidecar injects).
const STEERING: &[HeaderName] = &[
    header::LOCATION,
    header::CONTENT_LOCATION,
    header::LINK,
    header::WWW_AUTHENTICATE,
    header::ALT_SVC,
    header::REFRESH,
];

/// A pooled HTTP client (plain, TLS, or mutual TLS).
pub type Client = HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The shared upstream client, and what mesh routes make theirs from.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: Client,
    /// This sidecar's workload certificate, presented to servers in the mesh.
    workload: Arc<Workload>,
    connect_timeout: Duration,
    /// Tracing on: each request is a CLIENT span carrying its context upstream.
    tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
    /// Gateway mode: the caller's (validated) bearer token is the subject of token
    /// exchanges ([`crate::oauth`]).
    caller_subjects: bool,
    /// Requests in flight to one server at most (`--upstream-max-connections`).
    max_in_flight: usize,
}

/// A request's place among those in flight to its server, carried in the response's
/// extensions: whoever relays the body holds it until the body ends (dropped with
/// the response otherwise).
#[derive(Debug, Clone)]
pub struct InFlight(#[allow(dead_code)] Arc<tokio::sync::OwnedSemaphorePermit>);

fn connector(connect_timeout: Duration) -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http
}

fn pooled(https: HttpsConnector<HttpConnector>) -> Client {
    HyperClient::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(https)
}

impl Upstream {
    pub fn new(connect_timeout: Duration, workload: Arc<Workload>) -> Self {
        let http = connector(connect_timeout);
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match builder.with_provider_and_native_roots(provider.clone()) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "no usable system CA certificates; https upstreams will fail verification");
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map(|b| {
                        b.with_root_certificates(rustls::RootCertStore::empty())
                            .with_no_client_auth()
                    });
                match config {
                    Ok(config) => {
                        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
                    }
                    Err(e) => unreachable!("ring supports the default TLS versions: {e}"),
                }
            }
        };
        let https = builder
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        Upstream {
            client: pooled(https),
            workload,
            connect_timeout,
            tracer: None,
            caller_subjects: false,
            max_in_flight: crate::config::DEFAULT_UPSTREAM_MAX_CONNECTIONS as usize,
        }
    }

    /// At most `n` requests in flight to one server (`--upstream-max-connections`).
    pub fn with_max_connections(mut self, n: u32) -> Self {
        self.max_in_flight = usize::try_from(n.max(1)).unwrap_or(usize::MAX);
        self
    }

    /// Trace every upstream request with `tracer` (tracing on).
    pub fn with_tracer(mut self, tracer: Option<opentelemetry_sdk::trace::SdkTracer>) -> Self {
        self.tracer = tracer;
        self
    }

    /// Gateway mode: exchange each caller's own bearer token (the gateway checked it)
    /// for servers with `spec.oauth.grant: token-exchange`.
    pub fn with_caller_subjects(mut self, on: bool) -> Self {
        self.caller_subjects = on;
        self
    }

    /// The client for `route`: the shared one, or its mesh route's mutual-TLS client.
    fn client_for<'r>(&'r self, route: &'r Route) -> Result<&'r Client, ProxyError> {
        let Some(mesh) = &route.mesh else {
            return Ok(&self.client);
        };
        let made = mesh.client.get_or_init(|| {
            let tls = self.workload.client_config(&mesh.identity)?;
            // HTTP/1.1 only between sidecars: measured, HTTP/2's extra framing and
            // flow control cost ~55 µs p50 per call on the second hop (docs/benchmarks.md).
            let https = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_only()
                .enable_http1()
                .wrap_connector(connector(self.connect_timeout));
            Ok(pooled(https))
        });
        made.as_ref()
            .map_err(|reason| ProxyError::UpstreamUnavailable {
                server: route.name.clone(),
                reason: reason.clone(),
            })
    }

    /// Send one request to `uri` and wait (up to the route's timeout) for the response
    /// head. The body is returned unread.
    pub async fn send(
        &self,
        route: &Route,
        uri: Uri,
        method: Method,
        mut agent_headers: HeaderMap,
        mut body: Bytes,
    ) -> Result<Response<Incoming>, ProxyError> {
        let span = crate::trace::client(
            self.tracer.as_ref(),
            &route.name,
            &uri,
            &mut agent_headers,
            &mut body,
        );
        match self.exchange(route, uri, method, agent_headers, body).await {
            Ok(mut resp) => {
                if let Some(span) = span {
                    crate::trace::answered(&span, resp.status().as_u16());
                    // Held by the response until the proxy hands it to the relayed body.
                    resp.extensions_mut().insert(span);
                }
                Ok(resp)
            }
            Err(e) => {
                let kind = match e {
                    ProxyError::UpstreamTimeout { .. } => "timeout",
                    ProxyError::UpstreamFailed { .. } => "failed",
                    _ => "connect",
                };
                telemetry::upstream_error(&route.label, kind);
                if let Some(span) = span {
                    crate::trace::failed(span, kind, e.to_string());
                }
                Err(e)
            }
        }
    }

    /// GET `url` for the sidecar itself (gateway mode: an issuer's metadata and keys):
    /// a 200 body of at most `limit` bytes, within `timeout`; redirects are not
    /// followed. The error names the URL and what went wrong.
    pub async fn fetch(&self, url: &str, limit: usize, timeout: Duration) -> Result<Bytes, String> {
        let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.uri_mut() = uri;
        req.headers_mut().insert(
            header::ACCEPT,
            http::HeaderValue::from_static("application/json"),
        );
        let fetched = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| toolmesh_proto::error_chain(&e))?;
            if resp.status() != http::StatusCode::OK {
                return Err(format!("answered {}", resp.status()));
            }
            let limited = http_body_util::Limited::new(resp.into_body(), limit);
            http_body_util::BodyExt::collect(limited)
                .await
                .map(|c| c.to_bytes())
                .map_err(|e| format!("reading the body: {e}"))
        };
        match tokio::time::timeout(timeout, fetched).await {
            Ok(result) => result.map_err(|e| format!("{url}: {e}")),
            Err(_) => Err(format!("{url}: no answer within {timeout:?}")),
        }
    }

    /// POST a form to `url` for the sidecar itself (an OAuth token endpoint), with
    /// `authorization` if given: the status and a body of at most `limit` bytes, within
    /// `timeout`. The error names the URL and what went wrong, never the form.
    pub async fn post_form(
        &self,
        url: &str,
        authorization: Option<http::HeaderValue>,
        form: String,
        limit: usize,
        timeout: Duration,
    ) -> Result<(http::StatusCode, Bytes), String> {
        let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let mut req = Request::new(Full::new(Bytes::from(form)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri;
        let headers = req.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        headers.insert(
            header::ACCEPT,
            http::HeaderValue::from_static("application/json"),
        );
        if let Some(value) = authorization {
            headers.insert(header::AUTHORIZATION, value);
        }
        let posted = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| toolmesh_proto::error_chain(&e))?;
            let status = resp.status();
            let limited = http_body_util::Limited::new(resp.into_body(), limit);
            http_body_util::BodyExt::collect(limited)
                .await
                .map(|c| (status, c.to_bytes()))
                .map_err(|e| format!("reading the body: {e}"))
        };
        match tokio::time::timeout(timeout, posted).await {
            Ok(result) => result.map_err(|e| format!("{url}: {e}")),
            Err(_) => Err(format!("{url}: no answer within {timeout:?}")),
        }
    }

    /// [`Upstream::send`] for the sidecar's own questions (which generation a server
    /// speaks): a failure is the caller's to judge, not counted as a failed request.
    pub async fn probe(
        &self,
        route: &Route,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response<Incoming>, ProxyError> {
        self.exchange(route, uri, Method::POST, headers, body).await
    }

    async fn exchange(
        &self,
        route: &Route,
        uri: Uri,
        method: Method,
        agent_headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response<Incoming>, ProxyError> {
        let caller = match &route.oauth {
            // Read as the gateway read it when it checked the token.
            Some(tokens) if self.caller_subjects && tokens.exchanges() => {
                crate::gateway::tokens::bearer(&agent_headers)
                    .ok()
                    .map(str::to_owned)
            }
            _ => None,
        };
        let headers = forward_headers(agent_headers, route);
        match &route.oauth {
            None => self.exchange_once(route, uri, method, headers, body).await,
            // Boxed: the token's state stays out of every other route's request future
            // (which hyper allocates per connection).
            Some(tokens) => {
                let call = (uri, method, headers, body);
                Box::pin(self.exchange_with_token(route, tokens, caller.as_deref(), call)).await
            }
        }
    }

    /// An OAuth route: its token, and on a 401 (the server refused the request before
    /// acting on it, and the whole body is here to send again) one retry with a fresh
    /// token.
    async fn exchange_with_token(
        &self,
        route: &Route,
        tokens: &crate::oauth::TokenSource,
        caller: Option<&str>,
        (uri, method, headers, body): (Uri, Method, HeaderMap, Bytes),
    ) -> Result<Response<Incoming>, ProxyError> {
        let token = tokens.header(self, caller).await?;
        let mut first = headers.clone();
        first.insert(header::AUTHORIZATION, token.clone());
        let resp = self
            .exchange_once(route, uri.clone(), method.clone(), first, body.clone())
            .await?;
        if resp.status() != http::StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        tokens.invalidate(caller, &token);
        let fresh = tokens.header(self, caller).await?;
        if fresh == token {
            return Ok(resp);
        }
        drop(resp);
        tracing::info!(server = %route.name, "the upstream refused its access token; sent again with a new one");
        let mut again = headers;
        again.insert(header::AUTHORIZATION, fresh);
        self.exchange_once(route, uri, method, again, body).await
    }

    async fn exchange_once(
        &self,
        route: &Route,
        uri: Uri,
        method: Method,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response<Incoming>, ProxyError> {
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        let client = self.client_for(route)?;
        if route.mesh.is_some() && !self.workload.has_certificate() {
            return Err(ProxyError::UpstreamUnavailable {
                server: route.name.clone(),
                reason: "this sidecar has no workload certificate yet (it asks the control plane for one)".to_owned(),
            });
        }
        // A place among the requests in flight to this server (waiting for one counts
        // towards the timeout), then the request.
        let permits = route
            .in_flight
            .get_or_init(|| Arc::new(tokio::sync::Semaphore::new(self.max_in_flight)))
            .clone();
        let sent = async move {
            let permit = permits.acquire_owned().await;
            let mut resp = client.request(req).await?;
            if let Ok(permit) = permit {
                resp.extensions_mut().insert(InFlight(Arc::new(permit)));
            }
            Ok::<_, hyper_util::client::legacy::Error>(resp)
        };
        match tokio::time::timeout(route.timeout, sent).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => {
                let reason = toolmesh_proto::error_chain(&e);
                tracing::warn!(server = %route.name, error = %reason, "upstream request failed");
                let server = route.name.clone();
                // Only a failed connect proves the request never left.
                if e.is_connect() {
                    Err(ProxyError::UpstreamUnavailable { server, reason })
                } else {
                    Err(ProxyError::UpstreamFailed { server, reason })
                }
            }
            Err(_) => Err(ProxyError::UpstreamTimeout {
                server: route.name.clone(),
                timeout_ms: u64::try_from(route.timeout.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }
}

/// Remove hop-by-hop headers, including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP) {
        headers.remove(name);
    }
    for name in LEGACY_HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// The headers sent upstream for an agent request on `route`.
/// Takes the agent's map by value and edits it in place: no copy per request.
pub fn forward_headers(mut headers: HeaderMap, route: &Route) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    for name in NOT_FORWARDED {
        headers.remove(name);
    }
    let forwarding: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            k.as_str().starts_with(NOT_FORWARDED_PREFIX)
                || NOT_FORWARDED_OTHER.contains(&k.as_str())
        })
        .cloned()
        .collect();
    for name in forwarding {
        headers.remove(name);
    }
    if let Some(credential) = &route.credential {
        headers.insert(credential.header.clone(), credential.value.clone());
    }
    headers
}

/// Clean an upstream response's headers for the agent: hop-by-hop headers and those
/// that would steer the agent around the sidecar ([`STEERING`]).
pub fn clean_response_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    for name in STEERING {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use toolmesh_proto::v1alpha1 as pb;

    fn route(credential: Option<(&str, &str)>) -> std::sync::Arc<Route> {
        crate::snapshot::test_route(
            credential.map(|(h, v)| pb::Credential {
                header: h.into(),
                value: v.into(),
                source: "x/y".into(),
            }),
            pb::Rule {
                tools: vec!["*".into()],
                ..Default::default()
            },
        )
    }

    #[test]
    fn agent_credentials_and_hop_by_hop_headers_are_dropped() {
        let mut agent = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer agent-token"),
            ("cookie", "a=b"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("host", "127.0.0.1:16001"),
            ("origin", "http://localhost"),
            ("accept-encoding", "gzip"),
            ("mcp-session-id", "abc"),
            ("accept", "application/json, text/event-stream"),
            ("last-event-id", "7"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-host", "evil"),
            ("forwarded", "for=10.0.0.1"),
            ("x-real-ip", "10.0.0.1"),
        ] {
            agent.append(k, HeaderValue::from_static(v));
        }
        let out = forward_headers(agent, &route(None));
        let mut names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["accept", "last-event-id", "mcp-session-id"],
            "{out:?}"
        );
    }

    #[test]
    fn route_credential_replaces_any_agent_copy() {
        let mut agent = HeaderMap::new();
        agent.insert("x-api-key", HeaderValue::from_static("agent-guess"));
        agent.insert("authorization", HeaderValue::from_static("Bearer agent"));
        let out = forward_headers(agent, &route(Some(("x-api-key", "real"))));
        let values: Vec<_> = out.get_all("x-api-key").iter().collect();
        assert_eq!(values, ["real"]);
        assert!(values[0].is_sensitive());
        assert!(out.get("authorization").is_none());
    }
}
