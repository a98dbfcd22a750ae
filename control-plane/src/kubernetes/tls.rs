//! The self-managed CA: TLS for the webhook and gRPC without cert-manager.
//!
//! One Secret (type `kubernetes.io/tls`, keys `ca.crt`, `ca.key`, `tls.crt`, `tls.key`) in the
//! control plane's namespace holds a CA and a serving certificate for the Service's DNS
//! names, signed by it. Whichever replica finds the Secret missing creates it; a second
//! replica racing to do the same gets 409 Conflict and reads the winner's, so all
//! replicas serve the same certificate. Sidecars are injected trusting `ca.crt`, and the
//! Lease holder keeps the `MutatingWebhookConfiguration`'s `caBundle` equal to it (a
//! `kubectl apply` of the manifests that clears it is undone within [`RECONCILE`]).
//!
//! Rotation is by hand: delete the Secret and restart the control plane's pods (new
//! sidecars trust the new CA; running ones keep the old until restarted). Validity: CA
//! ten years, serving certificate five.
//!
//! Not here: the listeners that use the material.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

/// How often the Lease holder checks the webhook's caBundle.
pub const RECONCILE: Duration = Duration::from_secs(30);

/// PEM texts of the CA and the serving certificate and key.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    pub ca: String,
    pub cert: String,
    pub key: String,
    /// The CA's key (`ca.key`), which signs workload certificates; absent in Secrets
    /// made before it was kept.
    pub ca_key: Option<String>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key never reaches a log line.
        f.debug_struct("Material")
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

/// A new CA and a serving certificate for `names`, signed by it.
pub fn generate(names: &[String]) -> Result<Material, String> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    use time::{Duration, OffsetDateTime};
    let err = |e: rcgen::Error| format!("generating the CA: {e}");
    // A day of slack for clocks behind ours.
    let from = OffsetDateTime::now_utc() - Duration::days(1);
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "toolmesh control plane CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = from;
    ca.not_after = from + Duration::days(10 * 365);
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate().map_err(err)?;
    let mut leaf = CertificateParams::new(names.to_vec()).map_err(err)?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        names
            .first()
            .map_or("toolmesh-control-plane", String::as_str),
    );
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.not_before = from;
    leaf.not_after = from + Duration::days(5 * 365);
    let cert = leaf.signed_by(&key, &issuer).map_err(err)?;
    Ok(Material {
        ca: ca_cert.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
        ca_key: Some(issuer.key().serialize_pem()),
    })
}

fn from_secret(secret: &Secret) -> Result<Material, String> {
    let name = secret.metadata.name.as_deref().unwrap_or_default();
    let field = |key: &str| -> Result<String, String> {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .ok_or_else(|| format!("Secret {name}: no {key}"))?;
        String::from_utf8(bytes.0.clone()).map_err(|_| format!("Secret {name}: {key} is not PEM"))
    };
    Ok(Material {
        ca: field("ca.crt")?,
        cert: field("tls.crt")?,
        key: field("tls.key")?,
        ca_key: field("ca.key").ok(),
    })
}

/// The material in Secret `name`, created first if it does not exist.
pub async fn ensure(api: &Api<Secret>, name: &str, names: &[String]) -> Result<Material, String> {
    let err = |e: kube::Error| format!("Secret {name}: {e}");
    if let Some(secret) = api.get_opt(name).await.map_err(err)? {
        return from_secret(&secret);
    }
    let material = generate(names)?;
    let mut data = BTreeMap::from([
        (
            "ca.crt".to_owned(),
            ByteString(material.ca.clone().into_bytes()),
        ),
        (
            "tls.crt".to_owned(),
            ByteString(material.cert.clone().into_bytes()),
        ),
        (
            "tls.key".to_owned(),
            ByteString(material.key.clone().into_bytes()),
        ),
    ]);
    if let Some(ca_key) = &material.ca_key {
        data.insert("ca.key".to_owned(), ByteString(ca_key.clone().into_bytes()));
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "toolmesh-control-plane".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(data),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %name, "created the self-managed CA and serving certificate");
            Ok(material)
        }
        // Another replica made it first: use theirs.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let secret = api.get(name).await.map_err(err)?;
            from_secret(&secret)
        }
        Err(e) => Err(err(e)),
    }
}

/// Set every webhook's `caBundle` in configuration `name` to `ca`; true if it changed.
pub async fn patch_ca_bundle(
    api: &Api<MutatingWebhookConfiguration>,
    name: &str,
    ca: &str,
) -> Result<bool, kube::Error> {
    let mut config = api.get(name).await?;
    let bundle = ByteString(ca.as_bytes().to_vec());
    let mut changed = false;
    for hook in config.webhooks.iter_mut().flatten() {
        if hook.client_config.ca_bundle.as_ref() != Some(&bundle) {
            hook.client_config.ca_bundle = Some(bundle.clone());
            changed = true;
        }
    }
    if changed {
        // Carries the resourceVersion read: a concurrent edit makes this 409, retried.
        api.replace(name, &PostParams::default(), &config).await?;
        tracing::info!(configuration = %name, "webhook caBundle set to the self-managed CA");
    }
    Ok(changed)
}

/// While leading, keep the webhook's caBundle equal to `ca`.
pub async fn keep_ca_bundle(
    api: Api<MutatingWebhookConfiguration>,
    name: String,
    ca: String,
    mut leading: watch::Receiver<bool>,
) {
    loop {
        if *leading.borrow_and_update()
            && let Err(e) = patch_ca_bundle(&api, &name, &ca).await
        {
            tracing::warn!(configuration = %name, error = %e, "webhook caBundle not set");
        }
        tokio::select! {
            changed = leading.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(RECONCILE) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::mock::{ApiServer, Call};
    use serde_json::{Value, json};
    use std::sync::{Arc, Mutex};

    fn names() -> Vec<String> {
        vec!["toolmesh-control-plane.toolmesh-system.svc".to_owned()]
    }

    #[test]
    fn the_serving_certificate_chains_to_the_ca_for_the_service_names() {
        let m = generate(&names()).expect("generate");
        assert!(m.ca.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(m.key.contains("PRIVATE KEY"));
        assert!(
            !format!("{m:?}").contains("PRIVATE KEY"),
            "the key is never printed"
        );
        // rustls accepts the pair and the chain for the name.
        let ca = rustls::pki_types::CertificateDer::from_pem_slice(m.ca.as_bytes()).expect("ca");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).expect("root");
        let leaf =
            rustls::pki_types::CertificateDer::from_pem_slice(m.cert.as_bytes()).expect("leaf");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("verifier");
        let name = rustls::pki_types::ServerName::try_from(names()[0].clone()).expect("name");
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], rustls::pki_types::UnixTime::now())
            .expect("chains to the CA");
        let other = rustls::pki_types::ServerName::try_from("example.com").expect("name");
        assert!(
            verifier
                .verify_server_cert(&leaf, &[], &other, &[], rustls::pki_types::UnixTime::now())
                .is_err()
        );
    }

    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;

    #[tokio::test]
    async fn racing_replicas_end_up_with_the_same_secret() {
        let stored: Arc<Mutex<Option<Value>>> = Arc::default();
        let api = ApiServer::new({
            let stored = stored.clone();
            move |call: &Call| {
                let mut stored = stored.lock().expect("lock");
                match (call.method.as_str(), stored.clone()) {
                    ("GET", Some(secret)) => (200, secret),
                    ("GET", None) => (
                        404,
                        json!({"kind": "Status", "apiVersion": "v1", "code": 404, "reason": "NotFound"}),
                    ),
                    ("POST", None) => {
                        *stored = Some(call.body.clone());
                        (201, call.body.clone())
                    }
                    _ => (
                        409,
                        json!({"kind": "Status", "apiVersion": "v1", "code": 409, "reason": "AlreadyExists"}),
                    ),
                }
            }
        });
        let secrets: Api<Secret> = Api::namespaced(api.client(), "toolmesh-system");
        let names = names();
        let (a, b) = tokio::join!(
            ensure(&secrets, "toolmesh-tls", &names),
            ensure(&secrets, "toolmesh-tls", &names)
        );
        let (a, b) = (a.expect("a"), b.expect("b"));
        assert_eq!(a, b, "one CA for every replica");
        let posts: Vec<Call> = api
            .calls()
            .into_iter()
            .filter(|c| c.method == "POST")
            .collect();
        assert!(!posts.is_empty());
        let secret = &posts[0].body;
        assert_eq!(
            posts[0].path.split('?').next(),
            Some("/api/v1/namespaces/toolmesh-system/secrets")
        );
        assert_eq!(secret["type"], "kubernetes.io/tls");
        assert_eq!(secret["metadata"]["name"], "toolmesh-tls");
        let keys: Vec<&String> = secret["data"].as_object().expect("data").keys().collect();
        assert_eq!(keys, ["ca.crt", "ca.key", "tls.crt", "tls.key"]);
        // A third replica starting later reads it without writing.
        let before = api.calls().len();
        assert_eq!(
            ensure(&secrets, "toolmesh-tls", &names).await.expect("c"),
            a
        );
        assert!(api.calls()[before..].iter().all(|c| c.method == "GET"));
    }

    #[tokio::test]
    async fn the_ca_bundle_is_written_into_every_webhook_once() {
        let config = Arc::new(Mutex::new(json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "toolmesh-sidecar-injector", "resourceVersion": "3"},
            "webhooks": [
                {"name": "namespace.inject.toolmesh.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                 "clientConfig": {"service": {"name": "toolmesh-control-plane", "namespace": "toolmesh-system", "path": "/inject", "port": 16017}}},
                {"name": "pod.inject.toolmesh.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                 "clientConfig": {"service": {"name": "toolmesh-control-plane", "namespace": "toolmesh-system", "path": "/inject", "port": 16017}, "caBundle": "b2xk"}},
            ],
        })));
        let api = ApiServer::new({
            let config = config.clone();
            move |call: &Call| {
                let mut config = config.lock().expect("lock");
                match call.method.as_str() {
                    "GET" => (200, config.clone()),
                    "PUT"
                        if call.body["metadata"]["resourceVersion"]
                            == config["metadata"]["resourceVersion"] =>
                    {
                        *config = call.body.clone();
                        config["metadata"]["resourceVersion"] = json!("4");
                        (200, config.clone())
                    }
                    _ => (
                        409,
                        json!({"kind": "Status", "apiVersion": "v1", "code": 409, "reason": "Conflict"}),
                    ),
                }
            }
        });
        let hooks: Api<MutatingWebhookConfiguration> = Api::all(api.client());
        let ca = generate(&names()).expect("ca").ca;
        assert!(
            patch_ca_bundle(&hooks, "toolmesh-sidecar-injector", &ca)
                .await
                .expect("patch")
        );
        assert!(
            !patch_ca_bundle(&hooks, "toolmesh-sidecar-injector", &ca)
                .await
                .expect("again")
        );
        let calls = api.calls();
        assert_eq!(
            calls.iter().map(|c| c.method.as_str()).collect::<Vec<_>>(),
            ["GET", "PUT", "GET"],
            "written once"
        );
        assert_eq!(
            calls[1].path.split('?').next(),
            Some(
                "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/toolmesh-sidecar-injector"
            )
        );
        use base64::Engine;
        let expected = base64::engine::general_purpose::STANDARD.encode(&ca);
        for hook in config.lock().expect("lock")["webhooks"]
            .as_array()
            .expect("hooks")
        {
            assert_eq!(hook["clientConfig"]["caBundle"], json!(expected));
            assert_eq!(
                hook["clientConfig"]["service"]["path"], "/inject",
                "nothing else touched"
            );
        }
    }
}
