//! The sidecar's command line: every flag, its `TOOLMESH_*` environment variable,
//! its default as a named constant, and the checks that run before anything binds.
//!
//! This module only describes and checks settings; it does not read the config file
//! (see [`crate::standalone`]) or bind sockets (see `main.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use toolmesh_proto::resource::parse_duration;

/// Where the agent's MCP traffic is served. Loopback: only the pod may call it.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:16001";
/// Where `/live`, `/ready`, `/metrics` and `/config` are served.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:16020";
/// Largest request body the sidecar accepts (413 above it).
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// How often the standalone config file is checked for changes.
pub const DEFAULT_CONFIG_POLL: &str = "1s";
/// How long in-flight requests and streams get to finish after SIGTERM.
pub const DEFAULT_DRAIN_TIMEOUT: &str = "15s";
pub const DEFAULT_HEADER_READ_TIMEOUT: &str = "10s";
/// Time a request body gets to arrive once its headers have.
pub const DEFAULT_BODY_READ_TIMEOUT: &str = "30s";
/// Time allowed to open a TCP (and TLS) connection to an upstream.
pub const DEFAULT_CONNECT_TIMEOUT: &str = "5s";
pub const DEFAULT_UPSTREAM_MAX_CONNECTIONS: u32 = 256;
/// Server-side mode: where agent sidecars connect with mutual TLS (every address).
pub const DEFAULT_MESH_LISTEN: &str = "[::]:16030";

/// What the sidecar stands in front of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Next to an agent: serves the pod's MCP clients on loopback (--listen).
    Agent,
    /// Next to an MCP server: accepts only mutual TLS from other sidecars
    /// (--mesh-listen), decides again for the caller the certificate names, and
    /// forwards to the server on loopback (--upstream) or to a child process (--stdio).
    Server,
    /// In front of servers for developers and external clients: serves every address
    /// (--listen), authenticates each request's bearer token (--issuer, --resource) and
    /// decides for its user by the policies with token subjects.
    Gateway,
}

/// Gateway mode: the longest --clock-skew taken.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);
/// Gateway mode: how far a token's exp/nbf may be off by default.
pub const DEFAULT_CLOCK_SKEW: &str = "60s";

/// toolmesh-sidecar: enforces MCP policy next to an agent.
///
/// Serves Streamable HTTP MCP on --listen at /mcp/<server> and relays each request to
/// that server's upstream, carrying both protocol generations (2025-03-26 … 2025-11-25
/// sessions, and 2026-07-28 stateless requests).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "toolmesh-sidecar",
    version,
    about,
    long_about = None,
    after_help = "Also: toolmesh-sidecar wait-ready ADDR SECONDS\n  exits 0 once http://ADDR/ready answers 200, 1 after SECONDS (the postStart hook of injected sidecars on clusters without native sidecars).\nAnd: toolmesh-sidecar wait-idle ADDR SECONDS\n  exits 0 once http://ADDR/idle has answered 200 for a second (no call in flight), or after SECONDS (their preStop hook)."
)]
pub struct Config {
    /// agent: next to an agent pod's MCP clients. server: next to an MCP server, behind
    /// mutual TLS (needs --control-plane, and --upstream or --stdio).
    #[arg(long, env = "TOOLMESH_MODE", value_enum, default_value = "agent")]
    pub mode: Mode,

    /// Server-side mode: the MCP server's own Streamable HTTP URL, on loopback (e.g.
    /// http://127.0.0.1:8080/mcp). The server must listen on loopback only, or agents
    /// can reach it around this sidecar.
    #[arg(
        long,
        env = "TOOLMESH_UPSTREAM",
        value_name = "URL",
        conflicts_with = "stdio"
    )]
    pub upstream: Option<String>,

    /// Server-side mode: run the MCP server given after `--` (e.g. `-- npx -y
    /// @modelcontextprotocol/server-filesystem /data`) as a child process speaking
    /// stdio, restarted with backoff when it exits, and serve it as Streamable HTTP.
    #[arg(long, env = "TOOLMESH_STDIO")]
    pub stdio: bool,

    /// The stdio server's command and arguments (after `--`).
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,

    /// Server-side mode: address of the mutual-TLS listener other sidecars connect to.
    #[arg(long, env = "TOOLMESH_MESH_LISTEN", default_value = DEFAULT_MESH_LISTEN, value_name = "ADDR")]
    pub mesh_listen: SocketAddr,

    /// Server-side mode: this pod's IP (injected sidecars get it from the pod's status).
    /// The sidecar checks every minute that the server behind --upstream does not also
    /// answer on it; while it does, agents can reach the server around this sidecar
    /// and /ready says so (503).
    #[arg(long, env = "TOOLMESH_POD_IP", value_name = "IP")]
    pub pod_ip: Option<std::net::IpAddr>,

    /// Standalone mode: multi-document YAML file of McpServer, AccessPolicy and Secret
    /// resources. Watched; a valid change is swapped in, an invalid one is logged and
    /// ignored.
    #[arg(
        long,
        env = "TOOLMESH_CONFIG",
        value_name = "FILE",
        conflicts_with = "control_plane"
    )]
    pub config: Option<PathBuf>,

    /// Control-plane mode: gRPC URL of toolmesh-control-plane (https:// for TLS, http://
    /// for a --dev control plane). Snapshots are validated, swapped in, ACKed or NACKed.
    #[arg(long, env = "TOOLMESH_CONTROL_PLANE", value_name = "URL")]
    pub control_plane: Option<String>,

    /// File holding this sidecar's bootstrap token for the control plane.
    #[arg(long, env = "TOOLMESH_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// PEM CA certificate that signs the control plane's TLS certificate (default: the
    /// system roots).
    #[arg(long, env = "TOOLMESH_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,

    /// The same as --ca-file, as PEM text (what the injection webhook sets from the
    /// control plane's own CA). Both may be given: either CA is trusted.
    #[arg(
        long,
        env = "TOOLMESH_CA_PEM",
        value_name = "PEM",
        hide_env_values = true,
        allow_hyphen_values = true
    )]
    pub ca_pem: Option<String>,

    /// This sidecar's name in `toolmeshctl status` (e.g. the pod name).
    #[arg(long, env = "TOOLMESH_NODE", default_value = "", value_name = "NAME")]
    pub node: String,

    /// Directory where the last good snapshot is kept, so a restarted sidecar serves at
    /// once even while the control plane is unreachable.
    #[arg(long, env = "TOOLMESH_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Refuse (NACK) snapshots that route to plain-http upstreams.
    #[arg(long, env = "TOOLMESH_REQUIRE_HTTPS_UPSTREAMS")]
    pub require_https_upstreams: bool,

    /// The subject this pod is (matched against AccessPolicy subjects), e.g. agents/triage.
    #[arg(long, env = "TOOLMESH_IDENTITY", value_name = "NAME")]
    pub identity: String,

    /// Gateway mode: an OAuth 2.1 / OpenID issuer whose access tokens (JWTs) are
    /// accepted, e.g. https://idp.example.com; repeat (or comma-separate) for several.
    /// Its keys are found by discovery and refreshed as they rotate. With
    /// --control-plane, the control plane's --gateway-issuers are trusted too.
    #[arg(
        long = "issuer",
        env = "TOOLMESH_ISSUERS",
        value_delimiter = ',',
        value_name = "URL"
    )]
    pub issuers: Vec<String>,

    /// Gateway mode: this gateway's resource URI as clients reach it (an origin, e.g.
    /// https://mcp.example.com). Tokens must name it, or the URI of the MCP path asked
    /// for, in `aud` (RFC 8707); the protected-resource metadata names it.
    #[arg(long, env = "TOOLMESH_RESOURCE", value_name = "URL")]
    pub resource: Option<String>,

    /// Gateway mode: a scope every token must carry (else 403 insufficient_scope);
    /// repeat or comma-separate. Listed in the metadata and challenges.
    #[arg(
        long = "required-scope",
        env = "TOOLMESH_REQUIRED_SCOPES",
        value_delimiter = ',',
        value_name = "SCOPE"
    )]
    pub required_scopes: Vec<String>,

    /// Gateway mode: how far a token's exp and nbf may be off (at most 5m).
    #[arg(long, env = "TOOLMESH_CLOCK_SKEW", default_value = DEFAULT_CLOCK_SKEW, value_parser = parse_duration, value_name = "DURATION")]
    pub clock_skew: Duration,

    /// Gateway mode: the issuer (one of --issuer) that is the cluster's, whose
    /// service-account tokens (`sub` system:serviceaccount:<ns>:<sa>) subjects match as
    /// `identity: <ns>/<sa>` beside `issuer`.
    #[arg(long, env = "TOOLMESH_KUBERNETES_ISSUER", value_name = "URL")]
    pub kubernetes_issuer: Option<String>,

    /// Gateway mode: PEM certificate chain to serve TLS with on --listen (with
    /// --tls-key). Both files are looked at again every 30s and a renewed pair is
    /// served from the next handshake (a pair that does not load is logged; the
    /// previous one keeps serving). Without them the gateway speaks plain HTTP, for a
    /// TLS-terminating load balancer in front.
    #[arg(
        long,
        env = "TOOLMESH_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// Gateway mode: the PEM private key of --tls-cert.
    #[arg(
        long,
        env = "TOOLMESH_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// Address for agent MCP traffic.
    #[arg(long, env = "TOOLMESH_LISTEN", default_value = DEFAULT_LISTEN, value_name = "ADDR")]
    pub listen: SocketAddr,

    /// Address for the admin endpoints (/live, /ready, /metrics, /config).
    #[arg(long, env = "TOOLMESH_ADMIN_LISTEN", default_value = DEFAULT_ADMIN_LISTEN, value_name = "ADDR")]
    pub admin_listen: SocketAddr,

    /// Allow --listen on a non-loopback address. Without authentication every client
    /// that can reach the port acts as this identity: only for trusted networks.
    #[arg(long, env = "TOOLMESH_ALLOW_NON_LOOPBACK")]
    pub allow_non_loopback: bool,

    /// Extra browser origins allowed to call the MCP endpoint (comma-separated, e.g.
    /// https://app.example.com). Loopback origins are always allowed; requests without
    /// an Origin header (non-browser clients) are always allowed.
    #[arg(
        long,
        env = "TOOLMESH_ALLOWED_ORIGINS",
        value_delimiter = ',',
        value_name = "ORIGIN"
    )]
    pub allowed_origins: Vec<String>,

    /// Threads serving requests; 0 means one per CPU the process may use (its cgroup
    /// limit included). A sidecar usually gets 1 or 2.
    #[arg(long, env = "TOOLMESH_WORKERS", default_value_t = 0, value_name = "N")]
    pub workers: usize,

    /// Largest accepted request body in bytes; larger requests get 413.
    #[arg(long, env = "TOOLMESH_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES, value_name = "BYTES")]
    pub max_body_bytes: usize,

    /// How often the --config file is checked for changes.
    #[arg(long, env = "TOOLMESH_CONFIG_POLL_INTERVAL", default_value = DEFAULT_CONFIG_POLL, value_parser = parse_duration, value_name = "DURATION")]
    pub config_poll_interval: Duration,

    /// After SIGTERM: how long in-flight requests and open streams get to finish.
    #[arg(long, env = "TOOLMESH_DRAIN_TIMEOUT", default_value = DEFAULT_DRAIN_TIMEOUT, value_parser = parse_duration, value_name = "DURATION")]
    pub drain_timeout: Duration,

    /// Time a client gets to send a request's headers once it starts a request (HTTP/1.1); a client slower than that is disconnected (slow-loris protection).
    #[arg(long, env = "TOOLMESH_HEADER_READ_TIMEOUT", default_value = DEFAULT_HEADER_READ_TIMEOUT, value_parser = parse_duration, value_name = "DURATION")]
    pub header_read_timeout: Duration,

    /// Time a client gets to send a request's whole body once its headers arrived; a slower one gets 408 (slow-body protection).
    #[arg(long, env = "TOOLMESH_BODY_READ_TIMEOUT", default_value = DEFAULT_BODY_READ_TIMEOUT, value_parser = parse_duration, value_name = "DURATION")]
    pub body_read_timeout: Duration,

    /// Time allowed to connect to an upstream (TCP and TLS).
    #[arg(long, env = "TOOLMESH_CONNECT_TIMEOUT", default_value = DEFAULT_CONNECT_TIMEOUT, value_parser = parse_duration, value_name = "DURATION")]
    pub connect_timeout: Duration,

    /// Requests in flight to one upstream server at once, and so (over HTTP/1.1) its
    /// open connections; more wait for one to finish, within the server's timeout. A
    /// streamed answer holds its place until it ends.
    #[arg(long, env = "TOOLMESH_UPSTREAM_MAX_CONNECTIONS", default_value_t = DEFAULT_UPSTREAM_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..=65_536), value_name = "N")]
    pub upstream_max_connections: u32,

    /// The pod's own token (e.g. a projected service-account token whose audience the
    /// authorization server accepts), presented as the subject of RFC 8693 token
    /// exchanges for servers with `spec.oauth.grant: token-exchange`. Read at each
    /// exchange, so a rotated token is picked up.
    #[arg(long, env = "TOOLMESH_SUBJECT_TOKEN_FILE", value_name = "FILE")]
    pub subject_token_file: Option<PathBuf>,

    /// Write audit lines (one JSON object per MCP request) to this file, appending,
    /// instead of stdout.
    #[arg(long, env = "TOOLMESH_AUDIT_FILE", value_name = "FILE")]
    pub audit_file: Option<PathBuf>,

    /// Export OpenTelemetry traces over OTLP/gRPC to this collector URL (e.g.
    /// http://otel-collector:4317). Without it, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` name one; with none of them tracing is off.
    #[arg(long, value_name = "URL", value_parser = toolmesh_proto::otel::parse_endpoint)]
    pub otlp_endpoint: Option<String>,

    /// The share of new traces recorded (0 to 1), parent-based: a request whose agent
    /// sent a trace context follows the agent's sampling decision. Default: what
    /// `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG` say, else every trace.
    #[arg(long, env = "TOOLMESH_TRACE_SAMPLING", value_parser = toolmesh_proto::otel::parse_ratio, value_name = "RATIO")]
    pub trace_sampling: Option<f64>,

    /// Log filter (tracing-subscriber EnvFilter syntax), e.g. info or toolmesh_sidecar=debug.
    #[arg(
        long,
        env = "TOOLMESH_LOG",
        default_value = "info",
        value_name = "FILTER"
    )]
    pub log: String,

    /// Log format.
    #[arg(long, env = "TOOLMESH_LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    pub log_format: String,
}

/// An `http://` URL whose host is a loopback address.
fn loopback_http_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?} must be http:// (the server is in this pod)"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if !crate::proxy::is_loopback_authority(authority) {
        return Err(format!(
            "{url:?} must name a loopback address (127.0.0.1, [::1] or localhost): \
             a server listening beyond loopback can be reached around this sidecar"
        ));
    }
    Ok(())
}

/// A gateway's own URL flag (`--resource`, `--issuer`), checked as
/// [`toolmesh_proto::origin::check_gateway_url`] does; the error names `flag`.
pub(crate) fn gateway_url(flag: &str, url: &str, origin_only: bool) -> Result<(), String> {
    toolmesh_proto::origin::check_gateway_url(url, origin_only).map_err(|e| format!("{flag}: {e}"))
}

impl Config {
    /// Gateway mode's own checks.
    fn check_gateway(&self, problems: &mut Vec<String>) {
        if self.upstream.is_some() || self.stdio {
            problems.push("--upstream and --stdio: only with --mode server".to_owned());
        }
        if self.issuers.is_empty() && self.control_plane.is_none() {
            problems.push(
                "--mode gateway: at least one --issuer is required (with --control-plane, issuers may come from its --gateway-issuer instead)"
                    .to_owned(),
            );
        }
        for issuer in &self.issuers {
            if let Err(e) = gateway_url("--issuer", issuer, false) {
                problems.push(e);
            }
        }
        match &self.resource {
            None => problems.push(
                "--mode gateway: --resource is required (the URI clients reach this gateway at)"
                    .to_owned(),
            ),
            Some(url) => {
                if let Err(e) = gateway_url("--resource", url, true) {
                    problems.push(e);
                }
            }
        }
        if let Some(k) = &self.kubernetes_issuer
            && !self
                .issuers
                .iter()
                .any(|i| i.trim_end_matches('/') == k.trim_end_matches('/'))
        {
            problems.push(format!(
                "--kubernetes-issuer: {k:?} must also be given as an --issuer"
            ));
        }
        for scope in &self.required_scopes {
            if scope.is_empty()
                || !scope
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
            {
                problems.push(format!("--required-scope: {scope:?} is not a scope"));
            }
        }
        if self.clock_skew > MAX_CLOCK_SKEW {
            problems.push("--clock-skew: must be at most 5m".to_owned());
        }
    }

    /// Checks clap cannot express. Returns every problem, not just the first.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        match (&self.config, &self.control_plane) {
            (None, None) => problems
                .push("one of --config (standalone) or --control-plane is required".to_owned()),
            (_, Some(url)) => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    problems.push(format!(
                        "--control-plane: {url:?} must start with http:// or https://"
                    ));
                }
                if self.token_file.is_none() {
                    problems.push("--token-file: required with --control-plane".to_owned());
                }
            }
            _ => {}
        }
        if self.mode == Mode::Server {
            if self.control_plane.is_none() {
                problems.push(
                    "--mode server: needs --control-plane (workload certificates come from it)"
                        .to_owned(),
                );
            }
            match (&self.upstream, self.stdio) {
                (None, false) => problems.push(
                    "--mode server: pass --upstream URL (the server on loopback) or --stdio -- COMMAND".to_owned(),
                ),
                (Some(url), _) => {
                    if let Err(e) = loopback_http_url(url) {
                        problems.push(format!("--upstream: {e}"));
                    }
                }
                (None, true) => {}
            }
        } else if self.upstream.is_some() || self.stdio {
            problems.push("--upstream and --stdio: only with --mode server".to_owned());
        }
        if self.mode == Mode::Gateway {
            self.check_gateway(&mut problems);
        } else if !self.issuers.is_empty()
            || self.resource.is_some()
            || self.tls_cert.is_some()
            || !self.required_scopes.is_empty()
            || self.kubernetes_issuer.is_some()
        {
            problems.push(
                "--issuer, --resource, --required-scope, --kubernetes-issuer, --tls-cert: only with --mode gateway"
                    .to_owned(),
            );
        }
        if self.stdio && self.command.is_empty() {
            problems.push("--stdio: give the server's command after `--`".to_owned());
        }
        if !self.stdio && !self.command.is_empty() {
            problems.push(format!(
                "unexpected arguments {:?}: a command after `--` is for --stdio",
                self.command
            ));
        }
        if self.identity.trim().is_empty() {
            problems.push("--identity: must not be empty".to_owned());
        }
        if self.mode == Mode::Agent && !self.listen.ip().is_loopback() && !self.allow_non_loopback {
            problems.push(format!(
                "--listen: {} is not a loopback address; the sidecar serves its pod only \
                 (pass --allow-non-loopback to override)",
                self.listen
            ));
        }
        if self.max_body_bytes < 1024 {
            problems.push("--max-body-bytes: must be at least 1024".to_owned());
        }
        if self.max_body_bytes as u64 > crate::proxy::DRAIN_LIMIT {
            problems.push(format!(
                "--max-body-bytes: must be at most {}",
                crate::proxy::DRAIN_LIMIT
            ));
        }
        for origin in &self.allowed_origins {
            if !(origin.starts_with("http://") || origin.starts_with("https://"))
                || origin.trim_end_matches('/').matches('/').count() != 2
            {
                problems.push(format!(
                    "--allowed-origins: {origin:?} is not an origin (scheme://host[:port])"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every flag has its own id and name (clap checks this only in debug builds, at
    /// the first parse: a clash would stop the binary at start).
    #[test]
    fn the_command_line_is_consistent() {
        <super::Config as clap::CommandFactory>::command().debug_assert();
    }
}
