//! Sidecar injection: what the mutating admission webhook does to a pod.
//!
//! [`review`] takes an `AdmissionReview` (v1) body and answers with another: allowed
//! always (a webhook that cannot inject must not block pod creation; see the README),
//! with a JSON Patch when the pod gets a sidecar. [`mutate`] is the decision and the
//! change on the pod as JSON; the patch is the difference, so every field the webhook
//! does not touch (including ones newer than our Kubernetes types) is left alone.
//!
//! A pod gets a sidecar unless it opted out (`toolmesh.dev/inject: "false"` label),
//! uses the host network, is one of the control plane's own pods, or already has one
//! (the `toolmesh.dev/injected` annotation or a container named `toolmesh-sidecar`):
//! running the webhook on its own output changes nothing. Which pods are sent to the
//! webhook at all (namespace label `toolmesh.dev/inject=enabled` or pod label) is the
//! `MutatingWebhookConfiguration`'s selectors' job, in `deploy/`.
//!
//! The sidecar is a native sidecar (an init container with `restartPolicy: Always`,
//! first, with a startup probe on `/ready`, so the agent starts once its tools are
//! reachable), or on clusters without native sidecars the first regular container
//! with a `postStart` hook that waits for `/ready` and a `preStop` hook that waits
//! until the agent's calls have finished (`wait-idle`). `--inject-sidecar-mode auto`
//! (the default) picks native only when the API server and every node's kubelet are
//! 1.29 or newer ([`native_supported`], checked by the control plane in a cluster);
//! the pod annotation `toolmesh.dev/native-sidecar: "false"` forces legacy.
//!
//! MCP server pods opt in with the label `toolmesh.dev/inject: server` and the
//! annotation `toolmesh.dev/server-port` (the server's port on loopback; path
//! `toolmesh.dev/server-path`, default `/mcp`): they get the sidecar in server-side
//! mode (`--mode server`), which accepts only mutual TLS from other sidecars on port
//! 16030 and forwards to the server on loopback.
//!
//! Not here: serving HTTPS (see `serve`), certificates, and which identity a token
//! proves (the control plane checks the projected token, not this pod spec).

use base64::Engine as _;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use serde_json::{Value, json};

/// Name of the injected container.
pub const CONTAINER: &str = "toolmesh-sidecar";
/// Annotation recording what was injected (its presence means "already injected").
pub const INJECTED: &str = "toolmesh.dev/injected";
/// Pod label: `"false"` opts a pod out (`"enabled"` opts it in, via the selectors).
pub const INJECT_LABEL: &str = "toolmesh.dev/inject";
/// Pod annotation: `"false"` asks for a regular container instead of a native sidecar.
pub const NATIVE_ANNOTATION: &str = "toolmesh.dev/native-sidecar";
/// Pod annotation prefix for per-pod resources: `toolmesh.dev/sidecar-cpu-request`,
/// `-cpu-limit`, `-memory-request`, `-memory-limit`.
pub const RESOURCE_ANNOTATION: &str = "toolmesh.dev/sidecar-";
/// Pod annotation: the sidecar's log filter (`--log`).
pub const LOG_ANNOTATION: &str = "toolmesh.dev/log-level";
/// The `toolmesh.dev/inject` label value of MCP server pods (server-side mode).
pub const SERVER_VALUE: &str = "server";
/// Pod annotations of server pods: the MCP server's port and path on loopback.
pub const SERVER_PORT_ANNOTATION: &str = "toolmesh.dev/server-port";
pub const SERVER_PATH_ANNOTATION: &str = "toolmesh.dev/server-path";
/// Where a server-side sidecar accepts mutual TLS from other sidecars.
pub const MESH_PORT: u16 = 16030;
/// Longest a legacy sidecar's `preStop` hook waits for the agent's calls to finish.
const PRESTOP_WAIT_SECONDS: u32 = 25;
/// Label the control plane's own pods carry; they are never injected.
pub const OWN_LABEL: (&str, &str) = ("app.kubernetes.io/name", "toolmesh-control-plane");

/// Where the injected sidecar serves agents, and its admin port (probes, metrics):
/// outside Istio's 15000-15090 and Linkerd's 4140-4191, so the meshes can run side by
/// side.
pub const MCP_PORT: u16 = 16001;
pub const ADMIN_PORT: u16 = 16020;
/// The sidecar's own user and group: no application container may run as it, so a
/// traffic-capture rule can one day tell the sidecar's connections from the agent's
/// (as Istio does with 1337). Not distroless's default app uid (65532).
pub const SIDECAR_UID: i64 = 16100;
/// Hosts that must never go through an HTTP proxy: the agent reaches its sidecar on
/// loopback.
const NO_PROXY_HOSTS: &str = "127.0.0.1,localhost,::1";
/// The annotation `kubectl logs` and `exec` read to pick a container by default.
const DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";
const TOKEN_DIR: &str = "/var/run/secrets/toolmesh";
/// The projected token presented in token exchanges (`--inject-subject-token-audience`),
/// in TOKEN_DIR.
const SUBJECT_TOKEN: &str = "subject-token";
const STATE_DIR: &str = "/var/lib/toolmesh";

/// How sidecars are injected: the control plane's `--inject-*` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Image of the injected sidecar.
    #[arg(
        long = "inject-image",
        env = "TOOLMESH_INJECT_IMAGE",
        default_value = "ghcr.io/toolmesh/toolmesh-sidecar:0.1.0"
    )]
    pub image: String,
    /// Control plane URL the injected sidecars connect to.
    #[arg(
        long = "inject-control-plane",
        env = "TOOLMESH_INJECT_CONTROL_PLANE",
        default_value = "https://toolmesh-control-plane.toolmesh-system.svc:16010"
    )]
    pub control_plane: String,
    /// Audience of the projected service-account token the sidecar presents.
    #[arg(
        long = "inject-token-audience",
        env = "TOOLMESH_INJECT_TOKEN_AUDIENCE",
        default_value = "toolmesh"
    )]
    pub audience: String,
    /// Sidecar CPU request (pod annotation `toolmesh.dev/sidecar-cpu-request` overrides).
    #[arg(
        long = "inject-cpu-request",
        env = "TOOLMESH_INJECT_CPU_REQUEST",
        default_value = "50m"
    )]
    pub cpu_request: String,
    /// Sidecar CPU limit (`toolmesh.dev/sidecar-cpu-limit`).
    #[arg(
        long = "inject-cpu-limit",
        env = "TOOLMESH_INJECT_CPU_LIMIT",
        default_value = "1"
    )]
    pub cpu_limit: String,
    /// Sidecar memory request (`toolmesh.dev/sidecar-memory-request`).
    #[arg(
        long = "inject-memory-request",
        env = "TOOLMESH_INJECT_MEMORY_REQUEST",
        default_value = "32Mi"
    )]
    pub memory_request: String,
    /// Sidecar memory limit (`toolmesh.dev/sidecar-memory-limit`).
    #[arg(
        long = "inject-memory-limit",
        env = "TOOLMESH_INJECT_MEMORY_LIMIT",
        default_value = "128Mi"
    )]
    pub memory_limit: String,
    /// Sidecar log filter (`toolmesh.dev/log-level`).
    // Its own id: the binary's global `--log` is `log`, and two args with one id make
    // clap drop the global one from `serve`.
    #[arg(
        id = "inject_log",
        long = "inject-log",
        env = "TOOLMESH_INJECT_LOG",
        default_value = "info"
    )]
    pub log: String,
    /// native: an init container with restartPolicy Always (Kubernetes 1.29+). legacy:
    /// a regular container with postStart/preStop wait hooks. auto: native when the API
    /// server and every node's kubelet are 1.29 or newer (checked every 5 minutes in a
    /// cluster), legacy otherwise and while unknown.
    #[arg(
        long = "inject-sidecar-mode",
        env = "TOOLMESH_INJECT_SIDECAR_MODE",
        value_enum,
        default_value = "auto"
    )]
    pub mode: SidecarMode,
    /// What auto mode found: whether this cluster runs native sidecars (unknown: no).
    #[arg(skip)]
    pub cluster_native: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// PEM CA the injected sidecars trust for the control plane's TLS (set as their
    /// `TOOLMESH_CA_PEM`), e.g. the cert-manager CA's `ca.crt`. With --tls-secret the
    /// self-managed CA is used and this is not needed. Default: the system roots.
    #[arg(
        long = "inject-ca-file",
        env = "TOOLMESH_INJECT_CA_FILE",
        value_name = "FILE"
    )]
    pub ca_file: Option<std::path::PathBuf>,
    /// The CA's PEM text: read from --inject-ca-file (or the self-managed CA) at start.
    #[arg(skip)]
    pub ca_pem: Option<String>,
    /// An OTLP/gRPC collector the injected sidecars export traces to (their
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, with the pod's namespace and name as resource
    /// attributes). Default: no tracing.
    #[arg(
        id = "inject_otlp_endpoint",
        long = "inject-otlp-endpoint",
        env = "TOOLMESH_INJECT_OTLP_ENDPOINT",
        value_name = "URL",
        value_parser = toolmesh_proto::otel::parse_endpoint
    )]
    pub otlp_endpoint: Option<String>,
    /// The injected sidecars' --trace-sampling (0 to 1). Default: every trace.
    #[arg(
        id = "inject_trace_sampling",
        long = "inject-trace-sampling",
        env = "TOOLMESH_INJECT_TRACE_SAMPLING",
        value_name = "RATIO",
        value_parser = toolmesh_proto::otel::parse_ratio
    )]
    pub trace_sampling: Option<f64>,
    /// Give injected sidecars a second projected service-account token with this
    /// audience (the authorization server's), as their `--subject-token-file`: what
    /// they present in RFC 8693 token exchanges for `McpServer`s with
    /// `spec.oauth.grant: token-exchange`. Default: none (token exchange unavailable).
    #[arg(
        id = "inject_subject_token_audience",
        long = "inject-subject-token-audience",
        env = "TOOLMESH_INJECT_SUBJECT_TOKEN_AUDIENCE",
        value_name = "AUDIENCE",
        value_parser = parse_audience
    )]
    pub subject_token_audience: Option<String>,
}

/// An audience for a projected token: non-empty printable ASCII without spaces.
fn parse_audience(text: &str) -> Result<String, String> {
    if !text.is_empty() && text.len() <= 253 && text.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "{text:?}: an audience is 1 to 253 printable characters without spaces"
        ))
    }
}

/// How the sidecar container is added (`--inject-sidecar-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SidecarMode {
    Auto,
    Native,
    Legacy,
}

/// The first minor version of Kubernetes (1.x) whose API server and kubelet run native
/// sidecars by default (the `SidecarContainers` feature, beta and on since 1.29).
pub const NATIVE_SIDECARS_SINCE: u32 = 29;

/// `v1.30.2`, `1.29+`, `v1.31.0-eks-a737599` → minor version 30, 29, 31.
pub fn minor_version(text: &str) -> Option<u32> {
    let rest = text.trim().trim_start_matches('v');
    let (major, rest) = rest.split_once('.')?;
    if major != "1" {
        return None;
    }
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Whether native sidecars work on a cluster whose API server reports `api_minor` and
/// whose nodes run `kubelets`: every one of them 1.29 or newer. A kubelet that cannot
/// be read counts as too old (a pod scheduled there would hang in `Init`).
pub fn native_supported(api_minor: Option<u32>, kubelets: &[&str]) -> bool {
    api_minor.is_some_and(|m| m >= NATIVE_SIDECARS_SINCE)
        && !kubelets.is_empty()
        && kubelets
            .iter()
            .all(|k| minor_version(k).is_some_and(|m| m >= NATIVE_SIDECARS_SINCE))
}

impl Settings {
    /// Whether sidecars are injected as native ones (before any pod annotation).
    pub fn native(&self) -> bool {
        match self.mode {
            SidecarMode::Native => true,
            SidecarMode::Legacy => false,
            SidecarMode::Auto => self
                .cluster_native
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

impl Default for Settings {
    /// What the flags give when none is passed (one list of defaults: clap's).
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            settings: Settings,
        }
        <Flags as clap::Parser>::parse_from(["toolmesh-control-plane"]).settings
    }
}

/// A pod with the sidecar injected, and what the pod author should hear (shown by
/// `kubectl` as admission warnings).
#[derive(Debug, Clone, PartialEq)]
pub struct Injected {
    pub pod: Value,
    pub warnings: Vec<String>,
}

/// Why a pod was not injected: left alone, or refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotInjected {
    Skip(Skip),
    /// The pod is refused (admission denied), with the reason.
    Refused(String),
}

impl From<Skip> for NotInjected {
    fn from(skip: Skip) -> Self {
        NotInjected::Skip(skip)
    }
}

/// Why a pod was left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    OptedOut,
    HostNetwork,
    ControlPlane,
    AlreadyInjected,
    /// No `spec` object, or container lists that are not lists.
    NotAPod,
}

impl Skip {
    pub fn reason(self) -> &'static str {
        match self {
            Skip::OptedOut => "opted out (label toolmesh.dev/inject=false)",
            Skip::HostNetwork => "uses the host network",
            Skip::ControlPlane => "is a toolmesh control plane pod",
            Skip::AlreadyInjected => "already has the sidecar",
            Skip::NotAPod => "has no usable pod spec",
        }
    }
}

fn str_at<'a>(pod: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(pod, |v, k| v.get(k))?.as_str()
}

fn has_container(pod: &Value, list: &str) -> bool {
    pod["spec"][list]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["name"] == CONTAINER))
}

/// Whether `pod` should be left alone, and why.
pub fn skip(pod: &Value) -> Option<Skip> {
    if str_at(pod, &["metadata", "labels", INJECT_LABEL]) == Some("false") {
        return Some(Skip::OptedOut);
    }
    if pod["spec"]["hostNetwork"] == json!(true) {
        return Some(Skip::HostNetwork);
    }
    if str_at(pod, &["metadata", "labels", OWN_LABEL.0]) == Some(OWN_LABEL.1) {
        return Some(Skip::ControlPlane);
    }
    if pod["metadata"]["annotations"].get(INJECTED).is_some()
        || has_container(pod, "containers")
        || has_container(pod, "initContainers")
    {
        return Some(Skip::AlreadyInjected);
    }
    None
}

/// Is `text` a Kubernetes resource quantity (`50m`, `1`, `128Mi`, `1.5Gi`, `2e3`)?
/// An invalid one in the sidecar's spec would make the API server refuse the pod.
fn is_quantity(text: &str) -> bool {
    const SUFFIXES: &[&str] = &[
        "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "n", "u", "m", "k", "M", "G", "T", "P", "E", "",
    ];
    let number_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    let exponent = suffix.strip_prefix(['e', 'E']).is_some_and(|e| {
        !e.is_empty()
            && e.trim_start_matches(['+', '-'])
                .bytes()
                .all(|b| b.is_ascii_digit())
    });
    let digits = number.trim_start_matches(['+', '-']);
    !digits.is_empty()
        && digits.bytes().filter(|b| *b == b'.').count() <= 1
        && digits.bytes().any(|b| b.is_ascii_digit())
        && !digits[1..].contains(['+', '-'])
        && (exponent || SUFFIXES.contains(&suffix))
}

/// Is `text` a log filter the sidecar accepts (`info`, `debug,hyper=warn`)? A bad one
/// would make it exit at start, and the pod never start.
fn is_log_filter(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 256
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_,=:.-".contains(&b))
}

/// The uid a container runs as, if its (or the pod's) security context says.
fn run_as_user(container: &Value, pod: &Value) -> Option<i64> {
    container["securityContext"]["runAsUser"]
        .as_i64()
        .or_else(|| pod["spec"]["securityContext"]["runAsUser"].as_i64())
}

/// The pod with the sidecar injected, or why not.
pub fn mutate(pod: &Value, settings: &Settings) -> Result<Injected, NotInjected> {
    if let Some(skip) = skip(pod) {
        return Err(skip.into());
    }
    for list in ["containers", "initContainers"] {
        let runs_as_sidecar = pod["spec"][list]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| run_as_user(c, pod) == Some(SIDECAR_UID));
        if let Some(c) = runs_as_sidecar {
            return Err(NotInjected::Refused(format!(
                "container {} runs as uid {SIDECAR_UID}, which is reserved for the toolmesh sidecar; choose another runAsUser",
                c["name"]
            )));
        }
    }
    let mut warnings = Vec::new();
    let annotation = |name: &str| str_at(pod, &["metadata", "annotations", name]);
    let native = settings.native() && annotation(NATIVE_ANNOTATION) != Some("false");
    let server = if str_at(pod, &["metadata", "labels", INJECT_LABEL]) == Some(SERVER_VALUE) {
        Some(server_upstream(
            annotation(SERVER_PORT_ANNOTATION),
            annotation(SERVER_PATH_ANNOTATION),
        )?)
    } else {
        None
    };
    let mut resource = |what: &str, default: &str| -> Value {
        let name = format!("{RESOURCE_ANNOTATION}{what}");
        match annotation(&name) {
            Some(v) if is_quantity(v) => json!(v),
            Some(v) => {
                warnings.push(format!(
                    "annotation {name}: {v:?} is not a resource quantity; the default {default} is used"
                ));
                json!(default)
            }
            None => json!(default),
        }
    };
    let requests = json!({
        "cpu": resource("cpu-request", &settings.cpu_request),
        "memory": resource("memory-request", &settings.memory_request),
    });
    let limits = json!({
        "cpu": resource("cpu-limit", &settings.cpu_limit),
        "memory": resource("memory-limit", &settings.memory_limit),
    });
    let log = match annotation(LOG_ANNOTATION) {
        Some(v) if is_log_filter(v) => v,
        Some(v) => {
            warnings.push(format!(
                "annotation {LOG_ANNOTATION}: {v:?} is not a log filter (e.g. info, debug); {} is used",
                settings.log
            ));
            &settings.log
        }
        None => &settings.log,
    };
    let ready = json!({"httpGet": {"path": "/ready", "port": ADMIN_PORT}});

    let mut sidecar = json!({
        "name": CONTAINER,
        "image": settings.image,
        "args": [
            "--control-plane", settings.control_plane,
            "--token-file", format!("{TOKEN_DIR}/token"),
            "--state-dir", STATE_DIR,
            // Probes and metrics scrapes come from the node, not from loopback, over
            // IPv4 or IPv6 (`[::]` is both, or IPv4 where the pod has no IPv6). The
            // sidecar serves /config to loopback only. The MCP port stays
            // loopback-only: it serves this pod alone.
            "--admin-listen", format!("[::]:{ADMIN_PORT}"),
            "--workers", "1",
        ],
        "env": [
            {"name": "TOOLMESH_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "TOOLMESH_SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
            {"name": "TOOLMESH_IDENTITY", "value": "$(TOOLMESH_NAMESPACE)/$(TOOLMESH_SERVICE_ACCOUNT)"},
            {"name": "TOOLMESH_NODE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "TOOLMESH_LOG", "value": log},
        ],
        "ports": [{"name": "toolmesh-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"}],
        "resources": {"requests": requests, "limits": limits},
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "toolmesh-state", "mountPath": STATE_DIR},
            {"name": "toolmesh-token", "mountPath": TOKEN_DIR, "readOnly": true},
        ],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": ADMIN_PORT}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/live", "port": ADMIN_PORT}, "periodSeconds": 10},
    });
    if let Some(ca) = &settings.ca_pem
        && let Some(env) = sidecar["env"].as_array_mut()
    {
        env.push(json!({"name": "TOOLMESH_CA_PEM", "value": ca}));
    }
    if let Some(env) = sidecar["env"].as_array_mut() {
        if let Some(endpoint) = &settings.otlp_endpoint {
            env.push(json!({"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": endpoint}));
            env.push(json!({"name": "OTEL_RESOURCE_ATTRIBUTES",
                "value": "k8s.namespace.name=$(TOOLMESH_NAMESPACE),k8s.pod.name=$(TOOLMESH_NODE)"}));
        }
        if let Some(ratio) = settings.trace_sampling {
            env.push(json!({"name": "TOOLMESH_TRACE_SAMPLING", "value": ratio.to_string()}));
        }
        if settings.subject_token_audience.is_some() {
            env.push(json!({"name": "TOOLMESH_SUBJECT_TOKEN_FILE",
                "value": format!("{TOKEN_DIR}/{SUBJECT_TOKEN}")}));
        }
    }
    if let Some(upstream) = &server {
        // Server-side mode: mutual TLS from other sidecars on every address, the
        // server on loopback behind it.
        if let Some(args) = sidecar["args"].as_array_mut() {
            args.extend([
                json!("--mode"),
                json!("server"),
                json!("--upstream"),
                json!(upstream),
                json!("--mesh-listen"),
                json!(format!("[::]:{MESH_PORT}")),
            ]);
        }
        if let Some(ports) = sidecar["ports"].as_array_mut() {
            ports.push(
                json!({"name": "toolmesh-mesh", "containerPort": MESH_PORT, "protocol": "TCP"}),
            );
        }
        // So the sidecar can check the server does not also listen on the pod's IP.
        if let Some(env) = sidecar["env"].as_array_mut() {
            env.push(json!({"name": "TOOLMESH_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}));
        }
    }
    if native {
        sidecar["restartPolicy"] = json!("Always");
        sidecar["startupProbe"] = json!({
            "httpGet": ready["httpGet"], "periodSeconds": 1, "failureThreshold": 120,
        });
    } else {
        let admin = format!("127.0.0.1:{ADMIN_PORT}");
        sidecar["lifecycle"] = json!({
            // The kubelet starts the next container only when this hook returns.
            "postStart": {"exec": {"command": ["toolmesh-sidecar", "wait-ready", admin, "120"]}},
            // At pod deletion every container is told to stop at once: the sidecar
            // waits until the agent's calls have finished before it gets SIGTERM.
            "preStop": {"exec": {"command": [
                "toolmesh-sidecar", "wait-idle", admin, PRESTOP_WAIT_SECONDS.to_string(),
            ]}},
        });
    }

    let mut out = pod.clone();
    let first_app = pod["spec"]["containers"][0]["name"]
        .as_str()
        .map(str::to_owned);
    let Some(spec) = out["spec"].as_object_mut() else {
        return Err(Skip::NotAPod.into());
    };
    // Agents learn where their tools are, and never send loopback through a proxy.
    let agent = server.is_none();
    if let Some(containers) = spec
        .get_mut("containers")
        .and_then(Value::as_array_mut)
        .filter(|_| agent)
    {
        for c in containers.iter_mut() {
            let env = c
                .as_object_mut()
                .map(|c| c.entry("env").or_insert_with(|| json!([])));
            if let Some(env) = env.and_then(Value::as_array_mut) {
                agent_env(env, native);
            }
        }
    }
    let list = if native {
        "initContainers"
    } else {
        "containers"
    };
    match spec.entry(list).or_insert_with(|| json!([])).as_array_mut() {
        Some(list) => list.insert(0, sidecar),
        None => return Err(Skip::NotAPod.into()),
    }
    let volumes = spec.entry("volumes").or_insert_with(|| json!([]));
    if let Some(volumes) = volumes.as_array_mut() {
        volumes.push(json!({"name": "toolmesh-state", "emptyDir": {"sizeLimit": "16Mi"}}));
        // Readable whatever uid the pod's other containers use (the kubelet makes a
        // projected token owner-only otherwise); only the sidecar mounts it.
        let mut sources = vec![json!({"serviceAccountToken": {
            "audience": settings.audience, "expirationSeconds": 3600, "path": "token"}})];
        // Token exchange: the pod's identity for the authorization server.
        if let Some(audience) = &settings.subject_token_audience {
            sources.push(json!({"serviceAccountToken": {
                "audience": audience, "expirationSeconds": 3600, "path": SUBJECT_TOKEN}}));
        }
        volumes.push(json!({"name": "toolmesh-token", "projected": {"defaultMode": 0o444, "sources": sources}}));
    }
    let record = json!({
        "mode": if native { "native" } else { "legacy" },
        "role": if agent { "agent" } else { "server" },
        "image": settings.image,
        "controlPlane": settings.control_plane,
    })
    .to_string();
    let metadata = out["metadata"].as_object_mut();
    if let Some(metadata) = metadata {
        let annotations = metadata.entry("annotations").or_insert_with(|| json!({}));
        if let Some(annotations) = annotations.as_object_mut() {
            annotations.insert(INJECTED.to_owned(), json!(record));
            // `kubectl logs` and `exec` go to the agent, not to the sidecar (which is
            // the first container in legacy mode).
            if let Some(app) = first_app
                && !annotations.contains_key(DEFAULT_CONTAINER)
            {
                annotations.insert(DEFAULT_CONTAINER.to_owned(), json!(app));
            }
        }
    }
    Ok(Injected { pod: out, warnings })
}

/// The server-side sidecar's `--upstream` from a server pod's annotations, or why the
/// pod is refused (a server pod without a usable port would run unprotected or not at
/// all).
fn server_upstream(port: Option<&str>, path: Option<&str>) -> Result<String, NotInjected> {
    let port = match port.map(|p| p.parse::<u16>()) {
        Some(Ok(p)) if p != 0 && p != MESH_PORT && p != ADMIN_PORT => p,
        Some(_) => {
            return Err(NotInjected::Refused(format!(
                "annotation {SERVER_PORT_ANNOTATION}: {:?} is not a usable port (1-65535, not {MESH_PORT} or {ADMIN_PORT}, which the sidecar takes)",
                port.unwrap_or_default()
            )));
        }
        None => {
            return Err(NotInjected::Refused(format!(
                "a pod labelled {INJECT_LABEL}={SERVER_VALUE} needs the annotation {SERVER_PORT_ANNOTATION}: the port its MCP server listens on, on loopback"
            )));
        }
    };
    let path = path.unwrap_or("/mcp");
    let url_safe = |b: u8| b.is_ascii_alphanumeric() || b"/-._~%".contains(&b);
    if !path.starts_with('/') || path.len() > 256 || !path.bytes().all(url_safe) {
        return Err(NotInjected::Refused(format!(
            "annotation {SERVER_PATH_ANNOTATION}: {path:?} is not a URL path (e.g. /mcp)"
        )));
    }
    Ok(format!("http://127.0.0.1:{port}{path}"))
}

/// An agent container's environment with `TOOLMESH_MCP_URL` first (so the author's own
/// entries can use `$(TOOLMESH_MCP_URL)`: Kubernetes expands only earlier entries) and
/// loopback in `NO_PROXY`/`no_proxy` (an HTTP proxy set for the container must not
/// take the agent's calls to its sidecar elsewhere). A `NO_PROXY` from a `valueFrom`
/// is left as it is. Beside a sidecar that is not a native one, also where to end it
/// (`TOOLMESH_SHUTDOWN_URL`): a Job's pod completes only when every container exits.
fn agent_env(env: &mut Vec<Value>, native: bool) {
    if !env.iter().any(|e| e["name"] == "TOOLMESH_MCP_URL") {
        env.insert(
            0,
            json!({"name": "TOOLMESH_MCP_URL", "value": format!("http://127.0.0.1:{MCP_PORT}/mcp")}),
        );
    }
    if !native && !env.iter().any(|e| e["name"] == "TOOLMESH_SHUTDOWN_URL") {
        env.insert(
            1,
            json!({"name": "TOOLMESH_SHUTDOWN_URL", "value": format!("http://127.0.0.1:{ADMIN_PORT}/shutdown")}),
        );
    }
    for name in ["NO_PROXY", "no_proxy"] {
        match env.iter_mut().find(|e| e["name"] == name) {
            None => env.insert(1, json!({"name": name, "value": NO_PROXY_HOSTS})),
            Some(entry) => {
                if let Some(value) = entry["value"].as_str()
                    && !value.split(',').any(|h| h.trim() == "127.0.0.1")
                {
                    entry["value"] = json!(if value.is_empty() {
                        NO_PROXY_HOSTS.to_owned()
                    } else {
                        format!("{NO_PROXY_HOSTS},{value}")
                    });
                }
            }
        }
    }
}

/// Answer an `AdmissionReview` request body. Errors are for bodies that are not an
/// `AdmissionReview` request at all (the caller answers 400).
pub fn review(body: &[u8], settings: &Settings) -> Result<Vec<u8>, String> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
    let request: AdmissionRequest<DynamicObject> = review
        .try_into()
        .map_err(|e| format!("not an AdmissionReview request: {e}"))?;
    let response = AdmissionResponse::from(&request);
    let pod = request
        .object
        .as_ref()
        .map(serde_json::to_value)
        .transpose()
        .map_err(|e| e.to_string())?;
    let where_ = format!(
        "{}/{}",
        request.namespace.as_deref().unwrap_or("-"),
        if request.name.is_empty() {
            "(generated name)"
        } else {
            &request.name
        }
    );
    let mut warnings = Vec::new();
    let patch = match pod.as_ref().map(|pod| (pod, mutate(pod, settings))) {
        Some((pod, Ok(injected))) => {
            tracing::info!(pod = %where_, warnings = injected.warnings.len(), "sidecar injected");
            warnings = injected.warnings;
            Ok(Some(json_patch::diff(pod, &injected.pod)))
        }
        Some((_, Err(NotInjected::Skip(skip)))) => {
            tracing::debug!(pod = %where_, reason = skip.reason(), "not injected");
            Ok(None)
        }
        Some((_, Err(NotInjected::Refused(reason)))) => {
            tracing::warn!(pod = %where_, %reason, "pod refused");
            Err(reason)
        }
        None => Ok(None),
    };
    let mut response = match patch {
        Ok(Some(patch)) => response.with_patch(patch).map_err(|e| e.to_string())?,
        Ok(None) => response,
        Err(reason) => response.deny(reason),
    };
    if !warnings.is_empty() {
        response.warnings = Some(warnings);
    }
    let mut wire = serde_json::to_value(response.into_review()).map_err(|e| e.to_string())?;
    // The API server wants `patch` as base64 (Go's []byte); kube-core serializes its
    // bytes as an array of numbers, so it is re-encoded here.
    if let Some(bytes) = wire["response"]["patch"].as_array() {
        let bytes: Vec<u8> = bytes
            .iter()
            .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect();
        wire["response"]["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    serde_json::to_vec(&wire).map_err(|e| e.to_string())
}
