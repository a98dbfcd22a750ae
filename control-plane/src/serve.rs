//! `toolmesh-control-plane serve`: the store, the gRPC services and the admin port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tonic::transport::Server;
use toolmesh_proto::v1alpha1::admin_service_server::AdminServiceServer;
use toolmesh_proto::v1alpha1::snapshot_service_server::SnapshotServiceServer;

use crate::auth::Tokens;
use crate::kubernetes::identity::TokenReviewer;
use crate::kubernetes::lease::Elector;
use crate::kubernetes::store::KubeStore;
use crate::kubernetes::{status, tls};
use crate::service::{Admin, ControlPlane, Snapshots};
use crate::store::{FileStore, Store};

/// Flags of `serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// gRPC address (snapshot stream and admin API).
    #[arg(
        long,
        env = "TOOLMESH_CP_LISTEN",
        default_value = "0.0.0.0:16010",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,
    /// Admin HTTP address: /live, /ready, /metrics.
    #[arg(
        long,
        env = "TOOLMESH_CP_ADMIN_LISTEN",
        default_value = "0.0.0.0:16014",
        value_name = "ADDR"
    )]
    pub admin_listen: SocketAddr,
    /// Directory of the embedded store (created if missing; survives restarts).
    #[arg(
        long,
        env = "TOOLMESH_CP_DATA_DIR",
        default_value = "/var/lib/toolmesh",
        value_name = "DIR"
    )]
    pub data_dir: PathBuf,
    /// Tokens file: the admin token and one bootstrap token per sidecar identity (with
    /// --sidecar-auth kubernetes, only the admin token is used).
    #[arg(long, env = "TOOLMESH_CP_TOKENS", value_name = "FILE")]
    pub tokens: PathBuf,
    /// Resource files (or directories of *.yaml) applied at startup, like
    /// `toolmeshctl apply`; unchanged resources stay unchanged.
    #[arg(long, env = "TOOLMESH_CP_SEED", value_name = "PATH")]
    pub seed: Vec<PathBuf>,
    /// Serve gRPC in plaintext (local development only). Without it, --tls-cert and
    /// --tls-key (or --tls-secret) are required.
    #[arg(long, env = "TOOLMESH_CP_DEV")]
    pub dev: bool,
    /// PEM certificate chain for gRPC TLS.
    #[arg(long, env = "TOOLMESH_CP_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for gRPC TLS.
    #[arg(long, env = "TOOLMESH_CP_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// How long a disconnected sidecar stays in `toolmeshctl status` before it is
    /// forgotten (pod churn would otherwise grow the fleet without bound).
    #[arg(long, env = "TOOLMESH_CP_FLEET_EXPIRY", default_value = "1h", value_parser = toolmesh_proto::resource::parse_duration, value_name = "DURATION")]
    pub fleet_expiry: std::time::Duration,
    /// An identity glob (repeatable, or comma-separated) that may connect as a gateway
    /// (`toolmesh-sidecar --mode gateway`) and receive gateway snapshots: every policy
    /// with a token subject and the credentials of the servers they name. None by
    /// default: no identity may.
    #[arg(
        long = "gateway-identity",
        env = "TOOLMESH_CP_GATEWAY_IDENTITIES",
        value_delimiter = ',',
        value_name = "GLOB"
    )]
    pub gateway_identities: Vec<String>,
    /// An issuer (repeatable, or comma-separated) whose tokens every gateway accepts
    /// besides its own `--issuer`s: sent in gateway snapshots, so the platform team
    /// changes it in one place. `https://` (or `http://` on loopback), no query or
    /// fragment.
    #[arg(
        long = "gateway-issuer",
        env = "TOOLMESH_CP_GATEWAY_ISSUERS",
        value_delimiter = ',',
        value_name = "URL"
    )]
    pub gateway_issuers: Vec<String>,
    /// Export OpenTelemetry traces (apply and push spans) over OTLP/gRPC to this
    /// collector URL. Without it, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` name one; with none of them tracing is off.
    #[arg(long, value_name = "URL", value_parser = toolmesh_proto::otel::parse_endpoint)]
    pub otlp_endpoint: Option<String>,
    /// The share of new traces recorded (0 to 1). Default: what `OTEL_TRACES_SAMPLER`
    /// says, else every trace.
    #[arg(long, env = "TOOLMESH_CP_TRACE_SAMPLING", value_parser = toolmesh_proto::otel::parse_ratio, value_name = "RATIO")]
    pub trace_sampling: Option<f64>,
    /// Time a new gRPC connection has to send its first bytes; silent ones are closed.
    #[arg(long, env = "TOOLMESH_CP_FIRST_BYTES_TIMEOUT", default_value = "10s", value_parser = toolmesh_proto::resource::parse_duration, value_name = "DURATION")]
    pub first_bytes_timeout: std::time::Duration,
    /// A gRPC connection that sends nothing for this long is closed (sidecars send an
    /// HTTP/2 keepalive every 30 s, and the control plane pings every 60 s).
    #[arg(long, env = "TOOLMESH_CP_IDLE_TIMEOUT", default_value = "5m", value_parser = toolmesh_proto::resource::parse_duration, value_name = "DURATION")]
    pub idle_timeout: std::time::Duration,
    /// gRPC connections that may wait for their first bytes at once; more are closed
    /// at once, so idle connections cannot use up the file descriptors.
    #[arg(
        long,
        env = "TOOLMESH_CP_MAX_PENDING_CONNECTIONS",
        default_value_t = 256,
        value_name = "N"
    )]
    pub max_pending_connections: usize,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    #[command(flatten)]
    pub webhook: crate::webhook::WebhookArgs,
    #[command(flatten)]
    pub kube: crate::kubernetes::KubeArgs,
}

/// Flags of the workload CA (certificates for sidecar-to-sidecar mutual TLS).
#[derive(Debug, Clone, clap::Args)]
pub struct WorkloadArgs {
    /// The SPIFFE trust domain of workload certificates
    /// (spiffe://<domain>/ns/<namespace>/sa/<serviceaccount>).
    #[arg(long, env = "TOOLMESH_CP_TRUST_DOMAIN", default_value = toolmesh_proto::workload::DEFAULT_TRUST_DOMAIN, value_name = "DOMAIN")]
    pub trust_domain: String,
    /// PEM CA certificate that signs workload certificates (read again at every
    /// signing). Without it, the self-managed Secret's CA signs them (--tls-secret), or
    /// with --dev a CA made in memory at start; otherwise none are issued.
    #[arg(
        long,
        env = "TOOLMESH_CP_WORKLOAD_CA_CERT",
        value_name = "FILE",
        requires = "workload_ca_key"
    )]
    pub workload_ca_cert: Option<PathBuf>,
    /// PEM private key of --workload-ca-cert.
    #[arg(
        long,
        env = "TOOLMESH_CP_WORKLOAD_CA_KEY",
        value_name = "FILE",
        requires = "workload_ca_cert"
    )]
    pub workload_ca_key: Option<PathBuf>,
    /// PEM CA certificates trusted besides the signing CA, sent to every sidecar with
    /// its certificate: during a CA rollover, the other CA (repeatable).
    #[arg(long, env = "TOOLMESH_CP_WORKLOAD_TRUST_BUNDLE", value_name = "FILE")]
    pub workload_trust_bundle: Vec<PathBuf>,
    /// Lifetime of a workload certificate; sidecars renew at half of it.
    #[arg(long, env = "TOOLMESH_CP_WORKLOAD_CERT_TTL", default_value = crate::workload::DEFAULT_TTL, value_parser = toolmesh_proto::resource::parse_duration, value_name = "DURATION")]
    pub workload_cert_ttl: std::time::Duration,
}

/// The workload CA these flags (and the self-managed Secret) describe, if any.
fn workload_ca(
    args: &ServeArgs,
    managed: Option<&tls::Material>,
) -> Result<Option<crate::workload::Ca>, String> {
    let w = &args.workload;
    if !toolmesh_proto::workload::is_trust_domain(&w.trust_domain) {
        return Err(format!(
            "--trust-domain {:?}: lower-case letters, digits, '.', '-' and '_' only",
            w.trust_domain
        ));
    }
    if w.workload_cert_ttl < std::time::Duration::from_secs(2) {
        return Err("--workload-cert-ttl: must be at least 2s".into());
    }
    let source = match (&w.workload_ca_cert, &w.workload_ca_key, managed) {
        (Some(cert), Some(key), _) => crate::workload::Source::Files {
            cert: cert.clone(),
            key: key.clone(),
        },
        (
            _,
            _,
            Some(tls::Material {
                ca,
                ca_key: Some(key),
                ..
            }),
        ) => crate::workload::Source::Pem {
            cert: ca.clone(),
            key: key.clone(),
        },
        _ if args.dev => {
            let (cert, key) = crate::workload::generate(&w.trust_domain)?;
            tracing::warn!(
                "--dev: workload certificates are signed by a CA made in memory; restarting the control plane invalidates them"
            );
            crate::workload::Source::Pem { cert, key }
        }
        _ => {
            tracing::info!(
                "no workload CA (--workload-ca-cert/--workload-ca-key): sidecars get no workload certificates"
            );
            return Ok(None);
        }
    };
    crate::workload::Ca::new(
        source,
        w.workload_trust_bundle.clone(),
        w.trust_domain.clone(),
        w.workload_cert_ttl,
    )
    .map(Some)
}

/// Read resource files and directories (*.yaml, *.yml, sorted): each file's path and
/// text. All together they may hold at most [`toolmesh_proto::resource::MAX_YAML_BYTES`].
pub fn read_sources(paths: &[PathBuf]) -> Result<Vec<(PathBuf, String)>, String> {
    let mut sources = Vec::new();
    let mut total = 0usize;
    for path in paths {
        let mut files = Vec::new();
        if path.is_dir() {
            let entries =
                std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))?;
            for entry in entries.flatten() {
                let p = entry.path();
                if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                    files.push(p);
                }
            }
            files.sort();
        } else {
            files.push(path.clone());
        }
        for file in files {
            let text =
                std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            total += text.len();
            if total > toolmesh_proto::resource::MAX_YAML_BYTES {
                return Err(format!(
                    "{}: the files add up to more than {} bytes, the most applied at once; apply them in parts",
                    file.display(),
                    toolmesh_proto::resource::MAX_YAML_BYTES
                ));
            }
            sources.push((file, text));
        }
    }
    Ok(sources)
}

/// Parse every source on its own, so an error names the file and the document in it.
pub fn parse_sources(
    sources: &[(PathBuf, String)],
) -> Result<Vec<toolmesh_proto::Resource>, String> {
    let mut out = Vec::new();
    for (path, text) in sources {
        out.extend(
            toolmesh_proto::parse_resources(text)
                .map_err(|e| format!("{}: {e}", path.display()))?,
        );
    }
    Ok(out)
}

/// The sources as one YAML stream (what an apply request carries).
pub fn join_sources(sources: &[(PathBuf, String)]) -> String {
    let mut text = String::with_capacity(sources.iter().map(|(_, t)| t.len() + 5).sum());
    for (_, part) in sources {
        text.push_str("\n---\n");
        text.push_str(part);
    }
    text
}

/// Where the gRPC and webhook serving certificates come from.
struct Pems {
    grpc: Option<crate::certs::Source>,
    webhook: Option<crate::certs::Source>,
}

fn read(flag: &str, path: &std::path::Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
}

/// Where TLS comes from: the self-managed CA's Secret, or files.
fn pems(args: &ServeArgs, managed: Option<&tls::Material>) -> Result<Pems, String> {
    if let Some(m) = managed {
        if args.tls_cert.is_some() || args.webhook.webhook_cert.is_some() || args.dev {
            return Err("--tls-secret replaces --tls-cert/--tls-key, --webhook-cert/--webhook-key and --dev".into());
        }
        let pair = crate::certs::Source::Pem {
            cert: m.cert.clone().into_bytes(),
            key: m.key.clone().into_bytes(),
        };
        return Ok(Pems {
            grpc: Some(pair.clone()),
            webhook: args.webhook.webhook_listen.map(|_| pair),
        });
    }
    let grpc = match (&args.tls_cert, &args.tls_key, args.dev) {
        (Some(cert), Some(key), _) => Some(crate::certs::Source::Files {
            cert: cert.clone(),
            key: key.clone(),
        }),
        (None, None, true) => None,
        _ => {
            return Err(
                "TLS is required: pass --tls-cert and --tls-key (or --tls-secret in a cluster, or --dev for plaintext on a laptop)"
                    .into(),
            );
        }
    };
    let w = &args.webhook;
    let webhook = match (w.webhook_listen, &w.webhook_cert, &w.webhook_key) {
        (None, _, _) => None,
        (Some(_), Some(cert), Some(key)) => Some(crate::certs::Source::Files {
            cert: cert.clone(),
            key: key.clone(),
        }),
        (Some(_), _, _) => {
            return Err(
                "--webhook-listen needs --webhook-cert and --webhook-key (or --tls-secret)".into(),
            );
        }
    };
    Ok(Pems { grpc, webhook })
}

/// The sockets the control plane serves, bound before [`serve`] (tests bind
/// `127.0.0.1:0`).
#[derive(Debug)]
pub struct Listeners {
    pub grpc: tokio::net::TcpListener,
    pub admin: tokio::net::TcpListener,
    /// With `--webhook-listen`.
    pub webhook: Option<tokio::net::TcpListener>,
}

impl Listeners {
    /// Bind `--listen`, `--admin-listen` and `--webhook-listen`, naming the flag in an
    /// error.
    pub async fn bind(args: &ServeArgs) -> Result<Listeners, String> {
        let bind = |flag: &'static str, addr: SocketAddr| async move {
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("{flag} {addr}: {e}"))
        };
        Ok(Listeners {
            grpc: bind("--listen", args.listen).await?,
            admin: bind("--admin-listen", args.admin_listen).await?,
            webhook: match args.webhook.webhook_listen {
                Some(addr) => Some(bind("--webhook-listen", addr).await?),
                None => None,
            },
        })
    }
}

/// `serve` as the binary runs it: bind, install the global metrics recorder, and
/// serve until SIGTERM or SIGINT.
pub async fn run(args: ServeArgs) -> Result<(), String> {
    let listeners = Listeners::bind(&args).await?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(crate::fleet::PUSH_TO_ACK.to_owned()),
            crate::fleet::PUSH_TO_ACK_BUCKETS,
        )
        .map_err(|e| format!("metrics: {e}"))?
        .install_recorder()
        .map_err(|e| format!("metrics: {e}"))?;
    serve(args, listeners, metrics, shutdown()).await
}

/// Set up the store (and, in a cluster, identity, TLS and the Lease), then serve on
/// `listeners` until `shutdown` resolves. Then every snapshot stream is ended, the
/// gRPC, admin and webhook ports drain (at most [`DRAIN`]), the Lease is handed over,
/// and every task this started is ended before it returns. `metrics` renders
/// `/metrics` (the caller installed the recorder: once per process).
pub async fn serve(
    mut args: ServeArgs,
    listeners: Listeners,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let kube = args.kube.clone();
    if kube.store == "kubernetes" && !args.seed.is_empty() {
        return Err("--seed applies to the embedded store; with --store kubernetes, kubectl apply the resources".into());
    }
    let cluster = if kube.in_cluster() {
        Some(crate::kubernetes::connect(&kube).await?)
    } else {
        None
    };
    let managed = match (&cluster, &kube.tls_secret) {
        (Some((client, namespace)), Some(name)) => {
            let api = kube::Api::namespaced(client.clone(), namespace);
            Some(tls::ensure(&api, name, &kube.tls_names).await?)
        }
        _ => None,
    };
    let pems = pems(&args, managed.as_ref())?;
    args.webhook.inject.ca_pem = match (&managed, &args.webhook.inject.ca_file) {
        (Some(m), _) => Some(m.ca.clone()),
        (None, Some(file)) => Some(
            String::from_utf8(read("--inject-ca-file", file)?)
                .map_err(|_| "--inject-ca-file: not PEM text".to_owned())?,
        ),
        (None, None) => None,
    };
    let webhook = match (listeners.webhook, pems.webhook) {
        (Some(listener), Some(source)) => {
            let tls =
                crate::certs::Reloading::new(source, "webhook")?.server_config(&[b"http/1.1"])?;
            Some((listener, tls))
        }
        _ => None,
    };
    let grpc_tls = match pems.grpc {
        Some(source) => {
            Some(crate::certs::Reloading::new(source, "gRPC")?.server_config(&[b"h2"])?)
        }
        None => None,
    };
    let tokens = Tokens::load(&args.tokens)?;
    let mut kube_store = None;
    let store: Arc<dyn Store> = match &cluster {
        Some((client, namespace)) if kube.store == "kubernetes" => {
            tracing::info!(%namespace, "waiting for the first lists of McpServer, AccessPolicy and Secret objects");
            let store = KubeStore::start(client.clone(), namespace).await?;
            kube_store = Some(store.clone());
            store
        }
        _ => Arc::new(FileStore::open(&args.data_dir)?),
    };
    if !args.seed.is_empty() {
        let resources =
            parse_sources(&read_sources(&args.seed)?).map_err(|e| format!("--seed: {e}"))?;
        for line in store.apply(resources).map_err(|e| format!("--seed: {e}"))? {
            tracing::info!(result = %line, "seeded");
        }
    }
    let reviewer = match &cluster {
        Some((client, _)) if kube.sidecar_auth == "kubernetes" => Some(TokenReviewer::new(
            client.clone(),
            args.webhook.inject.audience.clone(),
            kube.token_cache_ttl,
        )),
        _ => None,
    };
    // Failure counters exist from the start at zero, so alerts on `increase()` see the
    // first failure.
    for name in [
        "toolmesh_cp_nacks_total",
        "toolmesh_cp_undeliverable_snapshots_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
    toolmesh_proto::otel::register(TRACE_SPANS);
    for listener in ["grpc", "admin", "webhook"] {
        metrics::counter!("toolmesh_cp_accept_errors_total", "listener" => listener).absolute(0);
    }
    for result in ["issued", "refused"] {
        metrics::counter!("toolmesh_cp_workload_certificates_total", "result" => result)
            .absolute(0);
    }
    for reason in ["pending", "first_bytes", "handshake", "idle"] {
        metrics::counter!("toolmesh_cp_connections_closed_total", "reason" => reason).absolute(0);
    }
    metrics::gauge!("toolmesh_cp_connected_sidecars").set(0.0);
    metrics::gauge!(crate::drift::REPORTS).set(0.0);
    let ca = workload_ca(&args, managed.as_ref())?;
    for issuer in &args.gateway_issuers {
        toolmesh_proto::origin::check_gateway_url(issuer, false)
            .map_err(|e| format!("--gateway-issuer: {e}"))?;
    }
    let tracing_on = toolmesh_proto::otel::Tracing::start(&toolmesh_proto::otel::Settings {
        endpoint: args.otlp_endpoint.clone(),
        sampling: args.trace_sampling,
        service_name: "toolmesh-control-plane",
        spans_metric: TRACE_SPANS,
    })?;
    let cp = ControlPlane::new(
        store,
        tokens,
        reviewer,
        args.fleet_expiry,
        ca,
        crate::service::Gateways {
            identities: args.gateway_identities.clone(),
            issuers: args.gateway_issuers.clone(),
        },
        tracing_on
            .as_ref()
            .map(|t| crate::trace::Traces::new(t.tracer().clone())),
    );
    // Every task started here is owned here: the servers drain, the rest are ended.
    let mut servers = tokio::task::JoinSet::new();
    let mut background = tokio::task::JoinSet::new();
    background.spawn({
        let cp = cp.clone();
        async move {
            shutdown.await;
            cp.stop();
        }
    });

    // Once-only work, on the Lease holder.
    let mut election = None;
    if let Some((client, namespace)) = &cluster {
        let (leading_tx, leading) = tokio::sync::watch::channel(false);
        let elector = Elector::new(
            kube::Api::namespaced(client.clone(), namespace),
            kube.lease.clone(),
            crate::kubernetes::holder(&kube),
        );
        election = Some(tokio::spawn({
            let cp = cp.clone();
            async move { elector.run(leading_tx, cp.stopped()).await }
        }));
        if let Some(store) = kube_store {
            background.spawn(status::run(
                client.clone(),
                namespace.clone(),
                store,
                cp.drifts.clone(),
                leading.clone(),
            ));
        }
        if let Some(m) = &managed {
            background.spawn(tls::keep_ca_bundle(
                kube::Api::all(client.clone()),
                kube.webhook_configuration.clone(),
                m.ca.clone(),
                leading,
            ));
        }
    }

    let (grpc, admin) = (listeners.grpc, listeners.admin);
    let grpc_addr = grpc.local_addr().map_err(|e| e.to_string())?;
    let admin_addr = admin.local_addr().map_err(|e| e.to_string())?;

    servers.spawn(serve_admin(admin, metrics, cp.clone()));
    if let (Some((client, _)), Some(_), crate::inject::SidecarMode::Auto) =
        (&cluster, &webhook, args.webhook.inject.mode)
    {
        background.spawn(crate::kubernetes::watch_native_sidecars(
            client.clone(),
            args.webhook.inject.cluster_native.clone(),
        ));
    }
    let webhook_addr = match webhook {
        Some((listener, tls)) => {
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            let settings = Arc::new(args.webhook.inject.clone());
            let stop = cp.clone();
            servers.spawn(async move {
                crate::webhook::serve(listener, tls, settings, stop.stopped()).await;
            });
            Some(addr.to_string())
        }
        None => None,
    };
    let mut server = Server::builder()
        // Dead peers are found by pings, not only by the idle timeout.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)));
    let secure = grpc_tls.is_some();
    tracing::info!(
        grpc = %grpc_addr,
        admin = %admin_addr,
        webhook = webhook_addr.as_deref().unwrap_or("off"),
        tls = secure,
        store = %kube.store,
        sidecar_auth = %kube.sidecar_auth,
        "listening"
    );
    let serve = server
        .add_service(
            SnapshotServiceServer::new(Snapshots(cp.clone()))
                .max_decoding_message_size(toolmesh_proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(toolmesh_proto::MAX_MESSAGE_BYTES),
        )
        .add_service(
            AdminServiceServer::new(Admin(cp.clone()))
                .max_decoding_message_size(toolmesh_proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(toolmesh_proto::MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            crate::conn::incoming(
                grpc,
                crate::conn::Limits {
                    first_bytes: args.first_bytes_timeout,
                    idle: args.idle_timeout,
                    max_pending: args.max_pending_connections,
                },
                grpc_tls,
            ),
            cp.stopped(),
        );
    // Streams are told to end on shutdown; a peer that does not go away gets DRAIN.
    let deadline = async {
        cp.stopped().await;
        tokio::time::sleep(DRAIN).await;
    };
    let result = tokio::select! {
        served = serve => served.map_err(|e| format!("gRPC server: {e}")),
        () = deadline => {
            tracing::warn!(after = ?DRAIN, "connections still open at the drain deadline; exiting");
            Ok(())
        }
    };
    // The admin and webhook ports stop accepting at the same signal and drain.
    let drained = async { while servers.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN, drained).await.is_err() {
        servers.abort_all();
    }
    // Hand the Lease over rather than make the next holder wait for it to lapse.
    if let Some(election) = election {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), election).await;
    }
    background.abort_all();
    while background.join_next().await.is_some() {}
    if let Some(t) = &tracing_on {
        t.shutdown(DRAIN).await;
    }
    result
}

/// Trace spans by what became of them (see [`toolmesh_proto::otel::register`]).
pub const TRACE_SPANS: &str = "toolmesh_cp_trace_spans_total";

/// How long shutdown waits for open connections before exiting anyway.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}

async fn serve_admin(
    listener: tokio::net::TcpListener,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    cp: Arc<ControlPlane>,
) {
    let mut accepting = crate::conn::Acceptor::new("admin");
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            stream = accepting.accept(&listener) => stream,
            () = cp.stopped() => break,
        };
        let watcher = graceful.watcher();
        let metrics = metrics.clone();
        let cp = cp.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                let stopping = cp.is_stopping();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/live" => (StatusCode::OK, "live\n".to_owned()),
                        "/ready" if stopping => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "shutting down\n".to_owned(),
                        ),
                        "/ready" => (StatusCode::OK, "ready\n".to_owned()),
                        "/metrics" => (StatusCode::OK, metrics.render()),
                        _ => (
                            StatusCode::NOT_FOUND,
                            "try /live, /ready, /metrics\n".to_owned(),
                        ),
                    };
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = status;
                    Ok::<_, Infallible>(resp)
                }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // A scrape or probe that does not send its request in time is dropped.
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10));
            let conn = watcher.watch(
                builder
                    .serve_connection(TokioIo::new(stream), svc)
                    .into_owned(),
            );
            let _ = tokio::time::timeout(std::time::Duration::from_secs(60), conn).await;
        });
    }
    // Open scrapes and probes finish (the caller bounds the wait).
    graceful.shutdown().await;
}
