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
//! reachable), or on clusters without native sidecars (`--inject-legacy-sidecars`, or
//! the pod annotation `toolmesh.dev/native-sidecar: "false"`) the first regular
//! container with a `postStart` hook that waits for `/ready`.
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
    /// Inject a regular container with a wait hook instead of a native sidecar, for
    /// clusters older than Kubernetes 1.29.
    #[arg(
        long = "inject-legacy-sidecars",
        env = "TOOLMESH_INJECT_LEGACY_SIDECARS"
    )]
    pub legacy: bool,
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
    let native = !settings.legacy && annotation(NATIVE_ANNOTATION) != Some("false");
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
    if native {
        sidecar["restartPolicy"] = json!("Always");
        sidecar["startupProbe"] = json!({
            "httpGet": ready["httpGet"], "periodSeconds": 1, "failureThreshold": 120,
        });
    } else {
        // The kubelet starts the next container only when this hook returns.
        sidecar["lifecycle"] = json!({"postStart": {"exec": {"command": [
            "toolmesh-sidecar", "wait-ready", format!("127.0.0.1:{ADMIN_PORT}"), "120",
        ]}}});
    }

    let mut out = pod.clone();
    let first_app = pod["spec"]["containers"][0]["name"]
        .as_str()
        .map(str::to_owned);
    let Some(spec) = out["spec"].as_object_mut() else {
        return Err(Skip::NotAPod.into());
    };
    // Agents learn where their tools are, and never send loopback through a proxy.
    if let Some(containers) = spec.get_mut("containers").and_then(Value::as_array_mut) {
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
        volumes.push(
            json!({"name": "toolmesh-token", "projected": {"defaultMode": 0o444, "sources": [{"serviceAccountToken": {
            "audience": settings.audience, "expirationSeconds": 3600, "path": "token"}}]}}),
        );
    }
    let record = json!({
        "mode": if native { "native" } else { "legacy" },
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
