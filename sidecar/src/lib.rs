//! toolmesh-sidecar: the data plane that runs next to an agent.
//!
//! An agent's MCP client talks Streamable HTTP to `127.0.0.1:16001/mcp/<server>`;
//! the sidecar checks the request ([`mcp`]), finds the server in the active
//! configuration ([`snapshot`]) and relays it to the upstream ([`upstream`]), streaming
//! the answer back ([`body`]). [`policy`] decides, [`filter`] trims lists, [`uri`]
//! reads resource URIs as servers do, [`session`] seals the session ids agents see,
//! [`audit`] writes one line per request. [`proxy`] is that path end to end; [`listener`] accepts
//! and drains connections; [`admin`] serves health, metrics and the redacted config;
//! [`standalone`] feeds the configuration from a local file; [`telemetry`] names every
//! metric; [`trace`] makes the OpenTelemetry spans; [`error`] every answer the sidecar
//! gives on its own; [`config`] every flag.
//! Server-side mode (`--mode server`): [`workload`] holds the certificate for mutual
//! TLS, [`mesh`] decides for the caller the certificate names, [`stdio`] runs a stdio
//! server as a child process. Gateway mode (`--mode gateway`): [`gateway`]
//! authenticates each request's bearer token and decides for its user.
//!
//! [`serve`] wires them together on listeners it is given and stops when its shutdown
//! future resolves, owning every task it starts; [`run`] binds, installs the metrics
//! recorder and waits for SIGTERM/SIGINT; `main.rs` only parses flags and sets up
//! logging.

pub mod admin;
pub mod aggregate;
pub mod audit;
pub mod body;
pub mod config;
pub mod discovery;
pub mod error;
pub mod filter;
pub mod gateway;
pub mod identity;
pub mod listener;
pub mod mcp;
pub mod mesh;
pub mod oauth;
pub mod pin;
pub mod policy;
pub mod proxy;
pub mod ratelimit;
pub mod session;
pub mod snapshot;
pub mod standalone;
pub mod stdio;
pub mod telemetry;
pub mod trace;
pub mod upstream;
pub mod uri;
pub mod workload;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Config;

/// The sockets the sidecar serves, bound before [`serve`] (tests bind `127.0.0.1:0`).
#[derive(Debug)]
pub struct Listeners {
    pub mcp: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Bind `--listen` (server-side mode: `--mesh-listen`) and `--admin-listen`,
    /// naming the flag in an error.
    pub async fn bind(config: &Config) -> Result<Listeners, String> {
        let mcp = match config.mode {
            config::Mode::Agent | config::Mode::Gateway => {
                listener::bind("--listen", config.listen).await?
            }
            config::Mode::Server => listener::bind("--mesh-listen", config.mesh_listen).await?,
        };
        Ok(Listeners {
            mcp,
            admin: listener::bind("--admin-listen", config.admin_listen).await?,
        })
    }
}

/// Run the sidecar until SIGTERM or SIGINT; returns once drained. What `main.rs`
/// calls: installs the global metrics recorder, binds, then [`serve`]s.
pub async fn run(config: Config) -> Result<(), String> {
    let metrics = telemetry::install().map_err(|e| format!("metrics: {e}"))?;
    let listeners = Listeners::bind(&config).await?;
    serve(config, listeners, metrics, shutdown_signal()).await
}

/// `--stdio`: the longest line taken from the child (a result can be large).
const STDIO_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// `--stdio`: how long a call waits for the child (the server's `spec.timeout` applies
/// on the proxy's side too).
const STDIO_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);
/// `--stdio`: the longest wait before restarting a child that exited.
const STDIO_RESTART_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// At shutdown, how long queued spans get to reach the collector.
const TRACE_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

/// How long the admin port keeps answering after the MCP port has drained.
const ADMIN_DRAIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Serve MCP and admin traffic on `listeners` until `shutdown` resolves, then drain:
/// `/ready` turns 503, the MCP port stops accepting and in-flight requests get
/// `--drain-timeout`, the audit trail is written out, and every task this started
/// is ended before it returns. `metrics` renders `/metrics` (the caller installed the
/// recorder: once per process).
pub async fn serve(
    config: Config,
    listeners: Listeners,
    metrics: PrometheusHandle,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let active = Arc::new(snapshot::Active::default());
    let workload = workload::Workload::new(&config.identity);
    // The configuration source: a file (standalone) or the control plane.
    let source = match (&config.config, &config.control_plane) {
        (Some(file), _) => {
            let mut watcher =
                standalone::Watcher::new(file.clone(), config.identity.clone(), active.clone());
            if config.mode == config::Mode::Gateway {
                watcher = watcher.for_gateway();
            }
            // A bad file at startup is logged; the sidecar serves (not ready) and keeps looking.
            let _ = watcher.check();
            Source::File(watcher)
        }
        (None, Some(url)) => {
            let discovery = discovery::Discovery {
                url: url.clone(),
                token_file: config.token_file.clone().unwrap_or_default(),
                ca_file: config.ca_file.clone(),
                ca_pem: config.ca_pem.clone(),
                identity: config.identity.clone(),
                node: config.node.clone(),
                state_dir: config.state_dir.clone(),
                require_https: config.require_https_upstreams,
                active: active.clone(),
                workload: workload.clone(),
                always_certify: config.mode == config::Mode::Server,
                gateway: config.mode == config::Mode::Gateway,
            };
            discovery.load_persisted();
            Source::ControlPlane(discovery)
        }
        (None, None) => return Err("one of --config or --control-plane is required".into()),
    };

    let mcp_addr = listeners.mcp.local_addr().map_err(|e| e.to_string())?;
    let admin_addr = listeners.admin.local_addr().map_err(|e| e.to_string())?;

    // Server-side mode: where the server is, and the mutual-TLS front door.
    let mut bridge = None;
    let (mut exposure, mut exposure_task) = (None, None);
    let (callers, tls) = match config.mode {
        config::Mode::Agent => (None, None),
        config::Mode::Gateway => match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => {
                let source = toolmesh_proto::certs::Source::Files {
                    cert: cert.clone(),
                    key: key.clone(),
                };
                let tls = toolmesh_proto::certs::Reloading::new(source, "gateway")?
                    .server_config(&[b"h2", b"http/1.1"])?;
                (None, Some(tls))
            }
            _ => (None, None),
        },
        config::Mode::Server => {
            let local = match &config.upstream {
                Some(url) => url.clone(),
                None => {
                    let started = stdio::Bridge::start(stdio::Options {
                        command: config.command.clone(),
                        max_message_bytes: STDIO_MAX_MESSAGE_BYTES,
                        request_timeout: STDIO_REQUEST_TIMEOUT,
                        restart_backoff_max: STDIO_RESTART_MAX,
                    })
                    .await?;
                    let url = started.url().to_owned();
                    bridge = Some(started);
                    url
                }
            };
            if let (Some(ip), Some(port)) =
                (config.pod_ip, upstream_port(config.upstream.as_deref()))
            {
                let watch = Arc::new(mesh::Exposure::default());
                exposure = Some(watch.clone());
                exposure_task = Some((watch, ip, port));
            }
            let callers = mesh::Callers::new(active.clone(), workload.clone(), local);
            (Some(Arc::new(callers)), Some(workload.server_config()?))
        }
    };
    let tracing_on = toolmesh_proto::otel::Tracing::start(&toolmesh_proto::otel::Settings {
        endpoint: config.otlp_endpoint.clone(),
        sampling: config.trace_sampling,
        service_name: "toolmesh-sidecar",
        spans_metric: telemetry::TRACE_SPANS,
    })?;
    let tracer = tracing_on.as_ref().map(|t| t.tracer().clone());
    let upstream = upstream::Upstream::new(config.connect_timeout, workload.clone())
        .with_max_connections(config.upstream_max_connections)
        .with_tracer(tracer.clone())
        .with_caller_subjects(config.mode == config::Mode::Gateway);
    let gateway = (config.mode == config::Mode::Gateway).then(|| {
        let verifier = gateway::tokens::Verifier::new(
            gateway::tokens::Settings {
                issuers: config.issuers.clone(),
                resource: config.resource.clone().unwrap_or_default(),
                skew: config.clock_skew,
                required_scopes: config.required_scopes.clone(),
                kubernetes_issuer: config.kubernetes_issuer.clone(),
            },
            upstream.clone(),
        );
        Arc::new(gateway::Gateway::new(
            Arc::new(verifier),
            config.resource.as_deref().unwrap_or_default(),
            config.required_scopes.clone(),
            active.clone(),
        ))
    });
    let (audit, audit_writer) = audit::Audit::start(config.audit_file.as_deref())?;
    pin::audit_to(audit.clone(), &config.identity);
    if let Some(file) = &config.subject_token_file {
        oauth::set_subject_token_file(file.clone());
    }
    let draining = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(proxy::InFlight::default());
    let proxy = Arc::new(proxy::Proxy {
        active: active.clone(),
        upstream,
        allowed_origins: config
            .allowed_origins
            .iter()
            .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
            .collect(),
        max_body_bytes: config.max_body_bytes,
        loopback_host_only: config.mode == config::Mode::Agent && config.listen.ip().is_loopback(),
        audit,
        identity: identity::Identity::new(&config.identity),
        callers,
        gateway: gateway.clone(),
        sessions: session::Sealer::random()?,
        body_read_timeout: config.body_read_timeout,
        in_flight: in_flight.clone(),
        aggregate: aggregate::Aggregate::default(),
        tracer,
    });
    let asked_to_stop = Arc::new(tokio::sync::Notify::new());
    let admin = Arc::new(admin::Admin {
        active: active.clone(),
        workload: (config.mode == config::Mode::Server).then(|| workload.clone()),
        exposure,
        metrics: metrics.clone(),
        in_flight,
        draining: draining.clone(),
        shutdown: asked_to_stop.clone(),
        gateway: gateway.clone(),
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let mcp_task = tokio::spawn(listener::serve(
        "mcp",
        listeners.mcp,
        tls,
        move |req, peer: listener::Peer| {
            let proxy = proxy.clone();
            async move { proxy.handle_from(req, peer.tls.as_deref()).await }
        },
        stop_rx,
        config.drain_timeout,
        config.header_read_timeout,
    ));
    // The admin port keeps answering (503 on /ready) until the MCP port has drained.
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    let admin_task = tokio::spawn(listener::serve(
        "admin",
        listeners.admin,
        None,
        move |req, peer: listener::Peer| admin.clone().handle(req, peer.addr),
        admin_stop_rx,
        ADMIN_DRAIN,
        config.header_read_timeout,
    ));
    let source_name = match &source {
        Source::File(_) => config
            .config
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        Source::ControlPlane(d) => d.url.clone(),
    };
    // Tasks that run until shutdown, then are ended here.
    let mut background = JoinSet::new();
    match source {
        Source::File(watcher) => {
            background.spawn(watcher.run(config.config_poll_interval));
        }
        Source::ControlPlane(discovery) => {
            background.spawn(discovery.run());
        }
    }
    if let Some(gateway) = &gateway {
        background.spawn(gateway.tokens.clone().keep_keys_fresh());
    }
    if let Some((watch, ip, port)) = exposure_task {
        background.spawn(watch.watch(ip, port));
    }
    background.spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            metrics.run_upkeep();
        }
    });
    tracing::info!(
        mode = ?config.mode,
        mcp = %mcp_addr,
        admin = %admin_addr,
        identity = %config.identity,
        config = %source_name,
        "listening"
    );

    tokio::select! {
        () = shutdown => {}
        () = asked_to_stop.notified() => {}
    }
    tracing::info!(deadline = ?config.drain_timeout, "shutdown requested; draining");
    draining.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let _ = mcp_task.await;
    // Every request has finished or been cut off: write out the audit trail.
    audit_writer.finish().await;
    if let Some(t) = &tracing_on {
        t.shutdown(TRACE_FLUSH).await;
    }
    if let Some(bridge) = bridge {
        bridge.shutdown().await;
    }
    background.abort_all();
    while background.join_next().await.is_some() {}
    let _ = admin_stop_tx.send(true);
    let _ = admin_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// The port of an `http://host:port/…` URL (`--upstream`), 80 when it names none.
fn upstream_port(url: Option<&str>) -> Option<u16> {
    let uri: http::Uri = url?.parse().ok()?;
    Some(uri.port_u16().unwrap_or(80))
}

enum Source {
    File(standalone::Watcher),
    ControlPlane(discovery::Discovery),
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
