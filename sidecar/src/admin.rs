//! The admin port: `/live`, `/ready`, `/metrics` and `/config`.
//!
//! `/live` answers as long as the process serves HTTP. `/ready` is 200 once a
//! configuration is loaded (server-side mode: and a workload certificate, and a
//! snapshot that names a server to serve) and until shutdown begins (then 503, so Kubernetes stops
//! routing and the agent stops starting new calls). `/metrics` is the Prometheus text
//! page. `/config` is the active snapshot with every credential value redacted, and
//! still only for loopback: it is answered to a loopback peer that addressed a
//! loopback `Host` (so a web page that rebinds a DNS name to 127.0.0.1 cannot read
//! it), even when the port listens pod-wide for Prometheus and the kubelet.
//!
//! `/idle` is 200 when no MCP request is being handled and no response stream is
//! open (503 with the count otherwise): a legacy sidecar's `preStop` hook
//! (`toolmesh-sidecar wait-idle`) waits for it, so the agent's last calls finish
//! before the sidecar is told to stop.
//!
//! `POST /shutdown` (loopback only, like `/config`) drains and stops the sidecar as
//! SIGTERM does: for agents whose pod must end when they do (a Job) and whose sidecar
//! is not a native one.
//!
//! This module serves no MCP traffic.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::body::{self, Body};
use crate::snapshot::Active;

#[derive(Debug)]
pub struct Admin {
    pub active: Arc<Active>,
    /// Server-side mode: not ready until a workload certificate is installed (no
    /// client could complete a handshake before).
    pub workload: Option<Arc<crate::workload::Workload>>,
    /// Server-side mode with `--pod-ip`: not ready while the server answers there.
    pub exposure: Option<Arc<crate::mesh::Exposure>>,
    pub metrics: PrometheusHandle,
    /// Requests and relayed bodies not finished, for `/idle`.
    pub in_flight: Arc<crate::proxy::InFlight>,
    /// Set when shutdown begins.
    pub draining: Arc<AtomicBool>,
    /// Notified by `POST /shutdown`: the sidecar drains and exits as on SIGTERM.
    pub shutdown: Arc<tokio::sync::Notify>,
    /// Gateway mode: not ready until every issuer's keys were asked for once.
    pub gateway: Option<Arc<crate::gateway::Gateway>>,
}

impl Admin {
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: std::net::SocketAddr,
    ) -> Result<Response<Body>, Infallible> {
        if req.uri().path() == "/shutdown" {
            return Ok(self.shutdown(&req, peer));
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return Ok(resp);
        }
        Ok(match req.uri().path() {
            "/live" => text(StatusCode::OK, "live\n"),
            "/idle" => match self.in_flight.count() {
                0 => text(StatusCode::OK, "idle\n"),
                n => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{n} requests or response streams in flight\n"),
                ),
            },
            "/ready" => self.ready(),
            "/metrics" => {
                let mut resp = text(StatusCode::OK, self.metrics.render());
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            }
            "/config" if !loopback_only(&req, peer) => text(
                StatusCode::FORBIDDEN,
                "/config is served to loopback clients addressing a loopback host only\n",
            ),
            "/config" => match self.active.current() {
                Some(runtime) => {
                    let mut resp = Response::new(body::full(runtime.config_json()));
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    resp
                }
                None => text(StatusCode::SERVICE_UNAVAILABLE, "no configuration loaded\n"),
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /live, /ready, /idle, /metrics, /config (or POST /shutdown)\n",
            ),
        })
    }

    /// `POST /shutdown`, from this pod only: how an agent that is done (a Job, with a
    /// sidecar that is not a native one) ends its sidecar so the pod can complete.
    fn shutdown(&self, req: &Request<Incoming>, peer: std::net::SocketAddr) -> Response<Body> {
        if req.method() != Method::POST {
            let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            return resp;
        }
        if !loopback_only(req, peer) {
            return text(
                StatusCode::FORBIDDEN,
                "/shutdown is served to loopback clients addressing a loopback host only\n",
            );
        }
        tracing::info!("shutdown requested on the admin port");
        self.shutdown.notify_one();
        text(StatusCode::ACCEPTED, "shutting down\n")
    }

    fn ready(&self) -> Response<Body> {
        if self.draining.load(Ordering::Relaxed) {
            text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
        } else if let Some(runtime) = self.active.current() {
            match &self.workload {
                Some(w) if !w.has_certificate() => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no workload certificate yet (asked of the control plane)\n",
                ),
                Some(_) if let Some(at) = self.exposure.as_ref().and_then(|e| e.exposed()) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the MCP server also answers on {at}: agents can reach it around this sidecar; make it listen on 127.0.0.1 only\n"
                    ),
                ),
                None if let Some(pending) = self
                    .gateway
                    .as_ref()
                    .and_then(|g| g.tokens.first_fetch_pending()) =>
                {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "config {}: the keys of issuer {pending} are being fetched\n",
                            runtime.version
                        ),
                    )
                }
                Some(_) if runtime.served.is_empty() => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "config {}: no McpServer names {:?} in spec.mesh.identity\n",
                        runtime.version, runtime.identity
                    ),
                ),
                _ => text(
                    StatusCode::OK,
                    format!("ready: config {}\n", runtime.version),
                ),
            }
        } else if let Some(problem) = self.active.problem() {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no configuration loaded: {problem}\n"),
            )
        } else {
            text(StatusCode::SERVICE_UNAVAILABLE, "no configuration loaded\n")
        }
    }
}

/// A loopback peer that addressed a loopback host (the MCP port's own Host rule).
fn loopback_only(req: &Request<Incoming>, peer: std::net::SocketAddr) -> bool {
    peer.ip().is_loopback() && crate::proxy::check_loopback_host(req).is_ok()
}

fn text(status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<Body> {
    let mut resp = Response::new(body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
