//! Every answer the sidecar gives instead of the upstream's, in one place.
//!
//! Each error knows its HTTP status, its JSON-RPC error code, which side failed
//! (the agent, the upstream, or the sidecar itself) and whether retrying is safe.
//! The body is always a JSON-RPC error response carrying the request's id when it
//! was readable, so an MCP client surfaces the message instead of a bare status.
//! Messages never contain secrets or upstream credentials.

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde_json::value::RawValue;

use crate::body::{self, Body};
use crate::identity::Identity;

/// JSON-RPC error codes. `-32700`/`-32600`/`-32602` are JSON-RPC's, `-32020` is MCP's own
/// header-mismatch code (2026-07-28); `-32080..=-32089` are the sidecar's, chosen clear
/// of the codes MCP defines. The README's "Error answers" table lists them all.
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const HEADER_MISMATCH: i64 = -32020;
    pub const ORIGIN_FORBIDDEN: i64 = -32080;
    pub const UNKNOWN_SERVER: i64 = -32081;
    pub const BODY_TOO_LARGE: i64 = -32082;
    pub const UNSUPPORTED_MEDIA_TYPE: i64 = -32083;
    pub const UNKNOWN_SESSION: i64 = -32084;
    pub const UPSTREAM_UNAVAILABLE: i64 = -32085;
    pub const UPSTREAM_TIMEOUT: i64 = -32086;
    pub const NOT_READY: i64 = -32087;
    pub const NOT_PERMITTED: i64 = -32088;
    pub const RATE_LIMITED: i64 = -32089;
}

/// Which side of the proxy a failure belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Agent,
    Upstream,
    Sidecar,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("request body is not valid JSON: {0}")]
    Parse(String),
    #[error("invalid JSON-RPC request: {0}")]
    InvalidRequest(String),
    /// Params the sidecar answers for itself and cannot take (a list cursor it did
    /// not give): answered as a server would, with MCP's invalid-params code.
    #[error("invalid params: {0}")]
    InvalidParams(String),
    #[error("{0}")]
    HeaderMismatch(String),
    #[error("origin {0:?} is not allowed")]
    OriginForbidden(String),
    #[error("host {0:?} is not allowed on a loopback listener")]
    HostForbidden(String),
    #[error("unknown MCP server {name:?}; known servers: {known}")]
    UnknownServer { name: String, known: String },
    #[error("no MCP endpoint at {0:?}; use /mcp or /mcp/<server>")]
    UnknownPath(String),
    #[error("unknown or expired session")]
    UnknownSession,
    #[error("request body exceeds the limit of {0} bytes")]
    BodyTooLarge(usize),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("method {0} is not allowed on an MCP endpoint (use POST, GET or DELETE)")]
    MethodNotAllowed(String),
    #[error("failed to read the request body: {0}")]
    BodyRead(String),
    #[error("the request body did not arrive within {0} ms")]
    BodyTimeout(u64),
    /// Nothing reached the upstream (it could not be connected to): safe to retry.
    #[error("upstream {server:?} is unavailable: {reason}")]
    UpstreamUnavailable { server: String, reason: String },
    /// The request was sent and then something failed: it may have run upstream.
    #[error("upstream {server:?} failed after the request was sent: {reason}")]
    UpstreamFailed { server: String, reason: String },
    #[error("upstream {server:?} did not answer within {timeout_ms} ms")]
    UpstreamTimeout { server: String, timeout_ms: u64 },
    #[error("no configuration is loaded yet")]
    NotReady,
    /// Server-side mode: the snapshot does not let this sidecar serve (yet).
    #[error("{0}")]
    Misconfigured(String),
    /// Server-side mode: the peer's certificate names no identity of this trust domain.
    #[error("the client certificate names no identity this sidecar trusts")]
    UnknownPeer,
    #[error("{kind} {name:?} is not permitted for {subject:?} on server {server:?}")]
    NotPermitted {
        kind: &'static str,
        name: String,
        subject: Identity,
        server: String,
    },
    /// The server has pins and this definition does not match them ([`crate::pin`]).
    #[error(
        "{kind} {name:?} of server {server:?} is {drift}: its definition does not match the approved pin, so it is refused until the pins are renewed"
    )]
    NotPinned {
        kind: &'static str,
        name: String,
        server: String,
        drift: String,
    },
    #[error(
        "{kind} {name:?} is rate limited for {subject:?} by {rule}; retry in {retry_after_ms} ms"
    )]
    RateLimited {
        kind: &'static str,
        name: String,
        subject: Identity,
        rule: String,
        retry_after_ms: u64,
    },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        use ProxyError::*;
        match self {
            Parse(_) | InvalidRequest(_) | HeaderMismatch(_) | BodyRead(_) => {
                StatusCode::BAD_REQUEST
            }
            OriginForbidden(_) | HostForbidden(_) => StatusCode::FORBIDDEN,
            UnknownServer { .. } | UnknownPath(_) | UnknownSession => StatusCode::NOT_FOUND,
            BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            UpstreamUnavailable { .. } | UpstreamFailed { .. } => StatusCode::BAD_GATEWAY,
            UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            NotReady | Misconfigured(_) => StatusCode::SERVICE_UNAVAILABLE,
            UnknownPeer => StatusCode::FORBIDDEN,
            // A JSON-RPC-level refusal, as a server refusing a call would answer.
            NotPermitted { .. } | NotPinned { .. } | InvalidParams(_) => StatusCode::OK,
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    pub fn code(&self) -> i64 {
        use ProxyError::*;
        match self {
            Parse(_) => code::PARSE_ERROR,
            InvalidRequest(_) | BodyRead(_) | BodyTimeout(_) | MethodNotAllowed(_) => {
                code::INVALID_REQUEST
            }
            InvalidParams(_) => code::INVALID_PARAMS,
            HeaderMismatch(_) => code::HEADER_MISMATCH,
            OriginForbidden(_) | HostForbidden(_) => code::ORIGIN_FORBIDDEN,
            UnknownServer { .. } | UnknownPath(_) => code::UNKNOWN_SERVER,
            UnknownSession => code::UNKNOWN_SESSION,
            BodyTooLarge(_) => code::BODY_TOO_LARGE,
            UnsupportedMediaType(_) => code::UNSUPPORTED_MEDIA_TYPE,
            UpstreamUnavailable { .. } | UpstreamFailed { .. } => code::UPSTREAM_UNAVAILABLE,
            UpstreamTimeout { .. } => code::UPSTREAM_TIMEOUT,
            NotReady | Misconfigured(_) => code::NOT_READY,
            NotPermitted { .. } | NotPinned { .. } | UnknownPeer => code::NOT_PERMITTED,
            RateLimited { .. } => code::RATE_LIMITED,
        }
    }

    pub fn side(&self) -> Side {
        use ProxyError::*;
        match self {
            UpstreamUnavailable { .. } | UpstreamFailed { .. } | UpstreamTimeout { .. } => {
                Side::Upstream
            }
            NotReady | Misconfigured(_) => Side::Sidecar,
            _ => Side::Agent,
        }
    }

    /// Is it safe for the agent to send the same request again? Only when nothing
    /// reached the upstream: after the request was sent (a failure, a timeout waiting
    /// for the answer) a `tools/call` may have run.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ProxyError::NotReady | ProxyError::UpstreamUnavailable { .. }
        )
    }

    /// The metrics `outcome` of this answer.
    pub fn outcome(&self) -> crate::telemetry::Outcome {
        use crate::telemetry::Outcome;
        match self {
            ProxyError::NotPermitted { .. } | ProxyError::NotPinned { .. } => {
                return Outcome::Denied;
            }
            ProxyError::RateLimited { .. } => return Outcome::RateLimited,
            _ => {}
        }
        match self.side() {
            Side::Agent => Outcome::Rejected,
            Side::Upstream => Outcome::UpstreamError,
            Side::Sidecar => Outcome::Unavailable,
        }
    }

    /// The wire answer: status, JSON-RPC error body with the request's id if known.
    pub fn into_response(self, id: Option<&RawValue>) -> http::Response<Body> {
        let mut data =
            serde_json::json!({"source": "toolmesh-sidecar", "retryable": self.retryable()});
        if let ProxyError::RateLimited { retry_after_ms, .. } = &self {
            data["retryAfterMs"] = (*retry_after_ms).into();
        }
        if let ProxyError::NotPinned { drift, .. } = &self {
            data["pin"] = drift.as_str().into();
        }
        let payload = serde_json::json!({
            "jsonrpc": "2.0",
            "id": id,
            "error": {"code": self.code(), "message": self.to_string(), "data": data},
        });
        let bytes = Bytes::from(payload.to_string());
        let mut resp = http::Response::new(body::full(bytes));
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let ProxyError::MethodNotAllowed(_) = self {
            headers.insert(header::ALLOW, HeaderValue::from_static("GET, POST, DELETE"));
        }
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let ProxyError::RateLimited { retry_after_ms, .. } = &self {
            // Whole seconds, rounded up: never invite a retry that will fail again.
            let secs = retry_after_ms.div_ceil(1000).max(1);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
