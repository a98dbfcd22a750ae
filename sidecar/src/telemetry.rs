//! Metric names, their descriptions, and the Prometheus recorder.
//!
//! Every metric the sidecar exports is named here, so the README's metrics list and
//! the code cannot drift apart silently. Label values are bounded: the server label is
//! a configured server name (or `(unknown)`, or `(aggregate)` for what the aggregated
//! `/mcp` answers itself), the method label one of the MCP methods
//! in the method table ([`crate::mcp::Method::name`]) or a fixed placeholder, never
//! free text from the network.
//!
//! This module does not serve `/metrics` (see [`crate::admin`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{
    SharedString, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "toolmesh_requests_total";
pub const REQUEST_DURATION: &str = "toolmesh_request_duration_seconds";
pub const UPSTREAM_ERRORS: &str = "toolmesh_upstream_errors_total";
pub const ACTIVE_STREAMS: &str = "toolmesh_active_streams";
pub const CONFIG_INFO: &str = "toolmesh_config_info";
pub const CONFIG_LOAD_FAILURES: &str = "toolmesh_config_load_failures_total";
pub const CONFIG_LAST_LOAD: &str = "toolmesh_config_last_load_timestamp_seconds";
pub const POLICY_DECISIONS: &str = "toolmesh_policy_decisions_total";
pub const RATE_LIMITED: &str = "toolmesh_rate_limited_total";
pub const AUDIT_DROPPED: &str = "toolmesh_audit_dropped_total";
pub const CONTROL_PLANE_CONNECTED: &str = "toolmesh_control_plane_connected";
pub const SNAPSHOT_NACKS: &str = "toolmesh_snapshot_nacks_total";
pub const STATE_FILE_ERRORS: &str = "toolmesh_state_file_errors_total";
pub const MESH_REFUSED: &str = "toolmesh_mesh_connections_refused_total";
pub const WORKLOAD_CERT_EXPIRY: &str = "toolmesh_workload_certificate_expiry_timestamp_seconds";
pub const WORKLOAD_CERT_RENEWALS: &str = "toolmesh_workload_certificate_renewals_total";
pub const UPSTREAM_EXPOSED: &str = "toolmesh_mesh_upstream_exposed";
pub const AGGREGATE_LIST_FAILURES: &str = "toolmesh_aggregate_list_failures_total";
pub const AGGREGATE_LIST_CACHE: &str = "toolmesh_aggregate_list_cache_total";
pub const AGGREGATE_READ_CACHE: &str = "toolmesh_aggregate_read_cache_total";
pub const GATEWAY_AUTH: &str = "toolmesh_gateway_authentications_total";
pub const TRACE_SPANS: &str = "toolmesh_trace_spans_total";
pub const PIN_DRIFTS: &str = "toolmesh_pin_drifts_total";
pub const TOKEN_REQUESTS: &str = "toolmesh_upstream_token_requests_total";

/// How a request ended, as the `outcome` label of `toolmesh_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 1xx-3xx from the upstream.
    Ok,
    /// 4xx from the upstream.
    ClientError,
    /// 5xx from the upstream, or it could not be reached or failed.
    UpstreamError,
    /// Refused by the sidecar before any decision (bad input, unknown server, …).
    Rejected,
    /// Refused by policy.
    Denied,
    /// Refused by a rate limit.
    RateLimited,
    /// No configuration loaded yet.
    Unavailable,
    /// The agent went away before the answer's head.
    Abandoned,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ClientError => "client_error",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Rejected => "rejected",
            Outcome::Denied => "denied",
            Outcome::RateLimited => "rate_limited",
            Outcome::Unavailable => "unavailable",
            Outcome::Abandoned => "abandoned",
        }
    }

    /// The outcome of an upstream answer with `status`.
    pub fn of_status(status: u16) -> Outcome {
        match status {
            100..=399 => Outcome::Ok,
            400..=499 => Outcome::ClientError,
            _ => Outcome::UpstreamError,
        }
    }
}

/// The server label of requests for a path that names no configured server.
pub const UNKNOWN_SERVER: SharedString = SharedString::const_str("(unknown)");
/// The server label of a request on the aggregated `/mcp` that no one server answers
/// (initialize, lists, discover); calls carry the real server's name.
pub const AGGREGATE_SERVER: SharedString = SharedString::const_str("(aggregate)");

/// Histogram buckets for request latency, in seconds: from 100µs to 60s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// Install the global recorder and describe every metric.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.to_owned()), LATENCY_BUCKETS)?
        .install_recorder()?;
    describe_counter!(
        REQUESTS,
        "MCP requests handled, by server, MCP method and outcome (ok, client_error, upstream_error, rejected, denied, rate_limited, unavailable, abandoned)"
    );
    describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Time from request received to response head sent, by server, MCP method and outcome (as toolmesh_requests_total)"
    );
    describe_counter!(
        AGGREGATE_LIST_FAILURES,
        "Servers left out of a list on the aggregated /mcp (failed or timed out), by server and list method"
    );
    describe_counter!(
        AGGREGATE_LIST_CACHE,
        "Server lists the aggregated /mcp took from its cache (hit) or fetched (miss), by server"
    );
    describe_counter!(
        GATEWAY_AUTH,
        "Gateway mode: requests by what their bearer token came to (accepted, missing, invalid, insufficient_scope)"
    );
    describe_counter!(
        AGGREGATE_READ_CACHE,
        "Resource reads the aggregated /mcp answered from its cache (hit) or sent to a 2026-07-28 server (miss), by server"
    );
    describe_counter!(
        UPSTREAM_ERRORS,
        "Upstream failures by server and kind (connect: nothing sent, failed: after the request was sent, timeout)"
    );
    describe_gauge!(
        ACTIVE_STREAMS,
        "Response bodies currently being relayed (SSE streams included), by server"
    );
    describe_gauge!(
        CONFIG_INFO,
        "1 for the active snapshot version, 0 for versions it replaced"
    );
    describe_counter!(
        CONFIG_LOAD_FAILURES,
        "Configurations rejected (unreadable, invalid or unusable); the previous one kept serving"
    );
    describe_gauge!(
        CONFIG_LAST_LOAD,
        metrics::Unit::Seconds,
        "Unix time the active configuration was swapped in"
    );
    describe_counter!(
        POLICY_DECISIONS,
        "Decisions on gated calls (tools/call, resources/read, resources/subscribe, prompts/get, completion/complete) by server, method and outcome (allowed, denied, rate_limited)"
    );
    describe_counter!(
        RATE_LIMITED,
        "Calls refused because their rule's token bucket was empty, by server and rule"
    );
    describe_gauge!(
        CONTROL_PLANE_CONNECTED,
        "1 while the snapshot stream to the control plane is up (control-plane mode)"
    );
    describe_counter!(
        SNAPSHOT_NACKS,
        "Snapshots from the control plane refused (NACKed); the previous one kept serving"
    );
    describe_counter!(
        AUDIT_DROPPED,
        "Audit lines dropped because the writer fell too far behind"
    );
    describe_counter!(
        STATE_FILE_ERRORS,
        "Problems with the --state-dir snapshot file, by kind (unreadable, damaged: refused at start; persist: could not be written, the snapshot was NACKed)"
    );
    describe_counter!(
        MESH_REFUSED,
        "Server-side mode: connections refused, by reason (handshake: no valid workload certificate; timeout: no handshake in time; identity: a certificate naming no identity)"
    );
    describe_gauge!(
        WORKLOAD_CERT_EXPIRY,
        "When this sidecar's workload certificate expires (Unix seconds; 0 while it has none)"
    );
    describe_counter!(
        WORKLOAD_CERT_RENEWALS,
        "Workload certificate requests answered, by result (issued, refused)"
    );
    describe_gauge!(
        UPSTREAM_EXPOSED,
        "Server-side mode with --pod-ip: 1 while the server behind --upstream also answers on the pod's IP (reachable around the sidecar)"
    );
    describe_counter!(
        PIN_DRIFTS,
        "Tool and prompt definitions seen in lists that do not match their server's pins, each distinct one once, by kind (tool, prompt) and state (drifted, unpinned)"
    );
    for kind in ["tool", "prompt"] {
        for state in ["drifted", "unpinned"] {
            counter!(PIN_DRIFTS, "kind" => kind, "state" => state).absolute(0);
        }
    }
    describe_counter!(
        TOKEN_REQUESTS,
        "Requests to OAuth token endpoints for upstream access tokens (spec.oauth), by grant (client_credentials, token_exchange) and result (ok, error)"
    );
    for grant in ["client_credentials", "token_exchange"] {
        for result in ["ok", "error"] {
            counter!(TOKEN_REQUESTS, "grant" => grant, "result" => result).absolute(0);
        }
    }
    toolmesh_proto::otel::register(TRACE_SPANS);
    gauge!(WORKLOAD_CERT_EXPIRY).set(0.0);
    for reason in ["handshake", "timeout", "identity"] {
        counter!(MESH_REFUSED, "reason" => reason).absolute(0);
    }
    for result in ["issued", "refused"] {
        counter!(WORKLOAD_CERT_RENEWALS, "result" => result).absolute(0);
    }
    // Failure counters exist from the start at zero, so alerts on `increase()` see
    // the first failure.
    for counter in [CONFIG_LOAD_FAILURES, SNAPSHOT_NACKS, AUDIT_DROPPED] {
        counter!(counter).absolute(0);
    }
    for kind in ["unreadable", "damaged", "persist"] {
        counter!(STATE_FILE_ERRORS, "kind" => kind).absolute(0);
    }
    Ok(handle)
}

/// Record a policy decision on a gated call.
pub fn decision(server: &SharedString, method: &'static str, verdict: crate::audit::Verdict) {
    counter!(POLICY_DECISIONS, "server" => server.clone(), "method" => method, "outcome" => verdict.as_str())
        .increment(1);
}

/// A call refused by `rule`'s rate limit (`rule` is a shared rule id).
pub fn rate_limited(server: &SharedString, rule: SharedString) {
    counter!(RATE_LIMITED, "server" => server.clone(), "rule" => rule).increment(1);
}

pub fn control_plane_connected(up: bool) {
    gauge!(CONTROL_PLANE_CONNECTED).set(if up { 1.0 } else { 0.0 });
}

pub fn snapshot_nacked() {
    counter!(SNAPSHOT_NACKS).increment(1);
}

/// The state file could not be read, was damaged, or could not be written.
pub fn state_file_error(kind: &'static str) {
    counter!(STATE_FILE_ERRORS, "kind" => kind).increment(1);
}

/// Server-side mode refused a connection (`handshake`, `timeout`, `identity`).
pub fn mesh_refused(reason: &'static str) {
    counter!(MESH_REFUSED, "reason" => reason).increment(1);
}

/// A certificate request was answered; `expires` is the new certificate's end.
pub fn workload_certificate(issued: Option<SystemTime>) {
    match issued {
        Some(expires) => {
            counter!(WORKLOAD_CERT_RENEWALS, "result" => "issued").increment(1);
            let at = expires.duration_since(UNIX_EPOCH).unwrap_or_default();
            gauge!(WORKLOAD_CERT_EXPIRY).set(at.as_secs_f64());
        }
        None => counter!(WORKLOAD_CERT_RENEWALS, "result" => "refused").increment(1),
    }
}

/// Whether the server answers on the pod's IP (server-side mode).
pub fn upstream_exposed(exposed: bool) {
    gauge!(UPSTREAM_EXPOSED).set(if exposed { 1.0 } else { 0.0 });
}

pub fn audit_dropped() {
    counter!(AUDIT_DROPPED).increment(1);
}

/// Record that `version` replaced `previous`.
pub fn config_applied(previous: Option<&str>, version: &str) {
    if let Some(previous) = previous {
        gauge!(CONFIG_INFO, "version" => previous.to_owned()).set(0.0);
    }
    gauge!(CONFIG_INFO, "version" => version.to_owned()).set(1.0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    gauge!(CONFIG_LAST_LOAD).set(now.as_secs_f64());
}

pub fn config_rejected() {
    counter!(CONFIG_LOAD_FAILURES).increment(1);
}

/// Record one finished request (at its response head).
/// `server` is a route's precomputed label (an `Arc<str>` inside: cloning it does not
/// allocate) or [`UNKNOWN_SERVER`].
pub fn request(server: &SharedString, method: &'static str, outcome: Outcome, elapsed: Duration) {
    counter!(REQUESTS, "server" => server.clone(), "method" => method, "outcome" => outcome.as_str())
        .increment(1);
    histogram!(REQUEST_DURATION, "server" => server.clone(), "method" => method, "outcome" => outcome.as_str())
        .record(elapsed.as_secs_f64());
}

/// A server left out of a merged list on `/mcp`.
pub fn aggregate_list_failed(server: &SharedString, method: &'static str) {
    counter!(AGGREGATE_LIST_FAILURES, "server" => server.clone(), "method" => method).increment(1);
}

/// A server's part of a merged list taken from the cache (`hit`) or fetched.
/// A hit or miss of one of the aggregate's caches (`AGGREGATE_LIST_CACHE` or
/// `AGGREGATE_READ_CACHE`).
pub fn aggregate_cache(metric: &'static str, server: &SharedString, hit: bool) {
    let result = if hit { "hit" } else { "miss" };
    counter!(metric, "server" => server.clone(), "result" => result).increment(1);
}

/// Gateway mode: one request's authentication `result`.
pub fn gateway_auth(result: &'static str) {
    counter!(GATEWAY_AUTH, "result" => result).increment(1);
}

pub fn upstream_error(server: &SharedString, kind: &'static str) {
    counter!(UPSTREAM_ERRORS, "server" => server.clone(), "kind" => kind).increment(1);
}

/// Count a relayed body as active until the returned guard runs.
pub fn stream_started(server: &SharedString) -> impl FnOnce() + Send + Sync + 'static {
    let g = gauge!(ACTIVE_STREAMS, "server" => server.clone());
    g.increment(1.0);
    move || g.decrement(1.0)
}
