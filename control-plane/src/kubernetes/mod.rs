//! Running inside Kubernetes: the API server as the store, service accounts as identity.
//!
//! - [`identity`]: sidecar identity from a projected service-account token (TokenReview).
//! - [`store`]: the CRD store: `McpServer` and `AccessPolicy` objects plus the `Secret`s
//!   they name, watched in one namespace, behind the same [`crate::store::Store`] trait as
//!   the embedded store.
//! - [`lease`]: a `coordination.k8s.io` Lease so that work which must run once (status
//!   writes, the webhook's CA bundle) runs on one replica while all of them serve.
//! - [`status`]: writing each resource's `Ready` condition (the Lease holder only).
//! - [`tls`]: the self-managed CA: a Secret holding the CA and serving certificate that
//!   every replica serves from, and the webhook's `caBundle` kept equal to that CA.
//!
//! Not here: the admission webhook's injection rules ([`crate::inject`]) or its listener
//! ([`crate::webhook`]); they need no API access.

pub mod identity;
pub mod lease;
#[cfg(test)]
pub(crate) mod mock;
pub mod status;
pub mod store;
pub mod tls;

use std::time::Duration;

/// Flags for running against a Kubernetes API server (part of `serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct KubeArgs {
    /// Where resources come from: `file` (the embedded store in --data-dir, written by
    /// `toolmeshctl apply`) or `kubernetes` (McpServer and AccessPolicy objects and the
    /// Secrets they name, in --namespace; `toolmeshctl apply` is then refused).
    #[arg(long, env = "TOOLMESH_CP_STORE", default_value = "file", value_parser = ["file", "kubernetes"])]
    pub store: String,
    /// How sidecars prove who they are: `tokens` (the bootstrap tokens in --tokens) or
    /// `kubernetes` (the pod's projected service-account token, checked by TokenReview
    /// for the audience --inject-token-audience; identity `namespace/serviceaccount`).
    #[arg(long, env = "TOOLMESH_CP_SIDECAR_AUTH", default_value = "tokens", value_parser = ["tokens", "kubernetes"])]
    pub sidecar_auth: String,
    /// Namespace holding the McpServer/AccessPolicy objects, their Secrets, the Lease and
    /// the self-managed TLS Secret. Default: the control plane's own namespace.
    #[arg(long, env = "TOOLMESH_CP_NAMESPACE", value_name = "NAME")]
    pub namespace: Option<String>,
    /// How long an accepted service-account token is trusted before it is reviewed again.
    #[arg(long, env = "TOOLMESH_CP_TOKEN_CACHE_TTL", default_value = "60s", value_parser = toolmesh_proto::resource::parse_duration, value_name = "DURATION")]
    pub token_cache_ttl: Duration,
    /// This replica's name in the Lease (default: the pod name, from the hostname).
    #[arg(long, env = "TOOLMESH_CP_POD_NAME", value_name = "NAME")]
    pub pod_name: Option<String>,
    /// The coordination.k8s.io Lease that picks the one replica doing once-only work.
    #[arg(
        long,
        env = "TOOLMESH_CP_LEASE",
        default_value = "toolmesh-control-plane",
        value_name = "NAME"
    )]
    pub lease: String,
    /// Self-managed TLS: the Secret (in --namespace) holding a CA and a serving
    /// certificate for --tls-names, created by the Lease holder if missing. Every replica
    /// serves gRPC and the webhook with it, injected sidecars trust its CA, and the
    /// Lease holder keeps --webhook-configuration's caBundle equal to it. Replaces
    /// --tls-cert/--tls-key and --webhook-cert/--webhook-key.
    #[arg(long, env = "TOOLMESH_CP_TLS_SECRET", value_name = "NAME")]
    pub tls_secret: Option<String>,
    /// DNS names the self-managed serving certificate is for (the Service's names).
    #[arg(
        long,
        env = "TOOLMESH_CP_TLS_NAMES",
        value_delimiter = ',',
        default_value = "toolmesh-control-plane.toolmesh-system.svc,toolmesh-control-plane.toolmesh-system.svc.cluster.local",
        value_name = "NAMES"
    )]
    pub tls_names: Vec<String>,
    /// The MutatingWebhookConfiguration whose caBundle the Lease holder keeps equal to
    /// the self-managed CA (with --tls-secret).
    #[arg(
        long,
        env = "TOOLMESH_CP_WEBHOOK_CONFIGURATION",
        default_value = "toolmesh-sidecar-injector",
        value_name = "NAME"
    )]
    pub webhook_configuration: String,
}

impl KubeArgs {
    /// Whether anything needs an API client.
    pub fn in_cluster(&self) -> bool {
        self.store == "kubernetes" || self.sidecar_auth == "kubernetes" || self.tls_secret.is_some()
    }
}

/// A client from the pod's service account (or a kubeconfig when run outside a cluster),
/// and the namespace to work in.
pub async fn connect(args: &KubeArgs) -> Result<(kube::Client, String), String> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("Kubernetes API: {e}"))?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    Ok((client, namespace))
}

/// The holder name this replica uses in the Lease.
pub fn holder(args: &KubeArgs) -> String {
    args.pod_name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| format!("toolmesh-control-plane-{}", std::process::id()))
    })
}

/// Now, as the API's timestamp type.
pub(crate) fn now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

/// How often `--inject-sidecar-mode auto` looks at the cluster's versions again.
pub const VERSIONS_EVERY: Duration = Duration::from_secs(300);

/// `--inject-sidecar-mode auto`: keep `native` saying whether the API server and every
/// node's kubelet run native sidecars. A check that fails leaves the last answer (at
/// start: no, so pods get legacy sidecars rather than hang in `Init`).
pub async fn watch_native_sidecars(
    client: kube::Client,
    native: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use k8s_openapi::api::core::v1::Node;
    let nodes: kube::Api<Node> = kube::Api::all(client.clone());
    loop {
        let checked = async {
            let api = client
                .apiserver_version()
                .await
                .map_err(|e| format!("API server version: {e}"))?;
            let api_minor = crate::inject::minor_version(&format!("{}.{}", api.major, api.minor));
            let full = nodes
                .list(&kube::api::ListParams::default())
                .await
                .map_err(|e| format!("nodes: {e}"))?;
            let kubelets: Vec<String> = full
                .items
                .iter()
                .map(|n| {
                    n.status
                        .as_ref()
                        .and_then(|s| s.node_info.as_ref())
                        .map(|i| i.kubelet_version.clone())
                        .unwrap_or_default()
                })
                .collect();
            let refs: Vec<&str> = kubelets.iter().map(String::as_str).collect();
            Ok::<_, String>((
                crate::inject::native_supported(api_minor, &refs),
                api,
                kubelets,
            ))
        };
        match checked.await {
            Ok((supported, api, kubelets)) => {
                let before = native.swap(supported, std::sync::atomic::Ordering::Relaxed);
                if before != supported || !supported {
                    tracing::info!(
                        native = supported,
                        api_server = %api.git_version,
                        nodes = kubelets.len(),
                        oldest_kubelet = %kubelets.iter().min_by_key(|k| crate::inject::minor_version(k)).cloned().unwrap_or_default(),
                        "sidecar injection mode (auto) chosen"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?VERSIONS_EVERY, "cannot check the cluster's versions for --inject-sidecar-mode auto; keeping the last answer");
            }
        }
        tokio::time::sleep(VERSIONS_EVERY).await;
    }
}
