//! This sidecar's workload identity: a short-lived certificate for mutual TLS between
//! sidecars, and the TLS pieces that present and check such certificates.
//!
//! The key is made here and never leaves the process: [`Workload::request`] makes a
//! key and a PKCS#10 request, [`crate::discovery`] sends the request on the
//! authenticated control-plane stream, and [`Workload::install`] takes the answer once
//! it checks out — the certificate is for this key, names this sidecar's identity as a
//! SPIFFE ID ([`toolmesh_proto::workload`]), and chains to the trust bundle that came
//! with it. The certificate is renewed at half its life; the swap is atomic and the
//! TLS configurations read the current one at each handshake, so nothing is rebuilt.
//!
//! Both directions of sidecar-to-sidecar TLS are here: [`Workload::client_config`]
//! (an agent sidecar reaching a server in the mesh: it presents its certificate and
//! accepts only a server certificate for the identity the snapshot names) and
//! [`Workload::server_config`] (server-side mode: a client certificate from the trust
//! bundle is required; [`Workload::peer_identity`] then names the caller). DNS names
//! play no part: a workload certificate has a URI SAN only.
//!
//! This module does not talk to the control plane and does not decide policy.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use toolmesh_proto::v1alpha1 as pb;
use toolmesh_proto::workload::identity_of;

/// ALPN protocols server-side mode offers.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A certificate in use: the key and chain, what it names, and when it ends.
pub struct Issued {
    key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    /// The SPIFFE ID in the certificate.
    pub spiffe_id: String,
    pub trust_domain: String,
    pub not_after: SystemTime,
    /// Half-way through what was left of its life when it was installed: when a new
    /// one is asked for.
    pub renew_at: SystemTime,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A key made for a certificate request, and the request.
pub struct Request {
    key: rcgen::KeyPair,
    /// DER PKCS#10, sent to the control plane.
    pub csr: Vec<u8>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key never reaches a log line.
        f.debug_struct("Request").finish_non_exhaustive()
    }
}

/// The current workload certificate, if any. Shared by discovery (which renews it)
/// and every TLS configuration that uses it.
pub struct Workload {
    identity: String,
    current: ArcSwapOption<Issued>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workload")
            .field("identity", &self.identity)
            .field("current", &self.current.load())
            .finish()
    }
}

/// The one URI SAN of a certificate, if it has exactly one.
fn uri_san(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let uri = uris.next()?;
    uris.next().is_none().then(|| uri.to_owned())
}

/// The trust domain of a SPIFFE ID.
fn trust_domain(spiffe_id: &str) -> Option<&str> {
    spiffe_id.strip_prefix("spiffe://")?.split('/').next()
}

impl Workload {
    pub fn new(identity: &str) -> Arc<Workload> {
        Arc::new(Workload {
            identity: identity.to_owned(),
            current: ArcSwapOption::empty(),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        })
    }

    pub fn current(&self) -> Option<Arc<Issued>> {
        self.current.load_full()
    }

    /// Whether a certificate is installed (no reference taken).
    pub fn has_certificate(&self) -> bool {
        self.current.load().is_some()
    }

    /// A new key and a request for it.
    pub fn request() -> Result<Request, String> {
        let key = rcgen::KeyPair::generate().map_err(|e| format!("making a key: {e}"))?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .map_err(|e| format!("making a certificate request: {e}"))?;
        Ok(Request {
            csr: csr.der().to_vec(),
            key,
        })
    }

    /// Take the control plane's answer to `request`, if it checks out; the previous
    /// certificate stays in use otherwise.
    pub fn install(
        &self,
        request: Request,
        answer: &pb::WorkloadCertificate,
    ) -> Result<Arc<Issued>, String> {
        if !answer.error.is_empty() {
            return Err(format!(
                "the control plane issued no certificate: {}",
                answer.error
            ));
        }
        let leaf = answer
            .chain
            .first()
            .ok_or("the answer has no certificate")?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| format!("the certificate does not parse: {e}"))?;
        if parsed
            .tbs_certificate
            .subject_pki
            .subject_public_key
            .data
            .as_ref()
            != request.key.public_key_raw()
        {
            return Err("the certificate is not for the key this sidecar asked with".into());
        }
        let spiffe_id = uri_san(leaf).ok_or("the certificate has not exactly one URI SAN")?;
        let domain =
            trust_domain(&spiffe_id).ok_or_else(|| format!("{spiffe_id:?} is not a SPIFFE ID"))?;
        if identity_of(domain, &spiffe_id).as_deref() != Some(self.identity.as_str()) {
            return Err(format!(
                "the certificate names {spiffe_id:?}, not this sidecar's identity {:?}",
                self.identity
            ));
        }
        let mut roots = RootCertStore::empty();
        for der in &answer.trust_bundle {
            roots
                .add(CertificateDer::from(der.as_slice()))
                .map_err(|e| format!("the trust bundle: {e}"))?;
        }
        let roots = Arc::new(roots);
        let chain: Vec<CertificateDer<'static>> = answer
            .chain
            .iter()
            .map(|d| CertificateDer::from(d.clone()))
            .collect();
        let end_entity =
            ParsedCertificate::try_from(&chain[0]).map_err(|e| format!("the certificate: {e}"))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &end_entity,
            &roots,
            &chain[1..],
            UnixTime::now(),
            self.provider.signature_verification_algorithms.all,
        )
        .map_err(|e| format!("the certificate does not chain to its trust bundle: {e}"))?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(request.key.serialize_der()));
        let signer = self
            .provider
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| format!("the key: {e}"))?;
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), self.provider.clone())
                .build()
                .map_err(|e| format!("the trust bundle: {e}"))?;
        let not_after = epoch(parsed.validity().not_after.timestamp());
        // Half of what is left from now (the control plane backdates the start for
        // clocks behind its own, which is no part of the certificate's useful life).
        let now = SystemTime::now();
        let left = not_after.duration_since(now).unwrap_or_default();
        let issued = Arc::new(Issued {
            key: Arc::new(CertifiedKey::new(chain, signer)),
            roots,
            client_verifier,
            trust_domain: domain.to_owned(),
            spiffe_id,
            not_after,
            renew_at: now + left / 2,
        });
        self.current.store(Some(issued.clone()));
        Ok(issued)
    }

    /// The identity a peer's verified certificate chain names (in this sidecar's trust
    /// domain), if any.
    pub fn peer_identity(&self, chain: &[CertificateDer<'_>]) -> Option<String> {
        let issued = self.current()?;
        let uri = uri_san(chain.first()?)?;
        identity_of(&issued.trust_domain, &uri)
    }

    /// TLS towards a server-side sidecar running as `server_identity`.
    pub fn client_config(
        self: &Arc<Self>,
        server_identity: &str,
    ) -> Result<rustls::ClientConfig, String> {
        let verifier = Arc::new(PeerIsServer {
            workload: self.clone(),
            expected: server_identity.to_owned(),
        });
        let config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(Presents(self.clone())));
        Ok(config)
    }

    /// TLS for server-side mode: a workload certificate from the trust bundle required.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, String> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(Arc::new(PeerIsWorkload(self.clone())))
            .with_cert_resolver(Arc::new(Presents(self.clone())));
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    fn algorithms(&self) -> &WebPkiSupportedAlgorithms {
        &self.provider.signature_verification_algorithms
    }
}

fn epoch(seconds: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

fn no_certificate() -> rustls::Error {
    rustls::Error::General("this sidecar has no workload certificate yet".into())
}

/// Presents the current certificate, as a client and as a server.
#[derive(Debug)]
struct Presents(Arc<Workload>);

impl rustls::client::ResolvesClientCert for Presents {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|i| i.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for Presents {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|i| i.key.clone())
    }
}

/// Accepts a server certificate from the trust bundle for one identity only.
#[derive(Debug)]
struct PeerIsServer {
    workload: Arc<Workload>,
    expected: String,
}

impl ServerCertVerifier for PeerIsServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let issued = self.workload.current().ok_or_else(no_certificate)?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &issued.roots,
            intermediates,
            now,
            self.workload.algorithms().all,
        )?;
        let named = uri_san(end_entity).and_then(|u| identity_of(&issued.trust_domain, &u));
        if named.as_deref() != Some(self.expected.as_str()) {
            return Err(rustls::Error::General(format!(
                "the server's workload certificate names {}, not {:?} (McpServer spec.mesh.identity)",
                named.map_or("no identity of this trust domain".to_owned(), |n| format!(
                    "{n:?}"
                )),
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.workload.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.workload.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.workload.algorithms().supported_schemes()
    }
}

/// Requires a client certificate from the current trust bundle that names an identity
/// of this trust domain.
#[derive(Debug)]
struct PeerIsWorkload(Arc<Workload>);

impl ClientCertVerifier for PeerIsWorkload {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let issued = self.0.current().ok_or_else(no_certificate)?;
        let verified = issued
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        if uri_san(end_entity)
            .and_then(|u| identity_of(&issued.trust_domain, &u))
            .is_none()
        {
            return Err(rustls::Error::General(
                "the client certificate names no identity of this trust domain".into(),
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.0.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.0.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algorithms().supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };

    /// A CA standing in for the control plane's (which lives in another crate).
    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        der: Vec<u8>,
    }

    impl Ca {
        fn new() -> Ca {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::default();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let cert = params.self_signed(&key).expect("ca");
            Ca {
                der: cert.der().to_vec(),
                issuer: Issuer::new(params, key),
            }
        }

        /// What the control plane answers `request` with, for the SPIFFE ID `uri`.
        fn answer(&self, key: &KeyPair, uri: &str, bundle: &[&Ca]) -> pb::WorkloadCertificate {
            let mut params = CertificateParams::default();
            params.subject_alt_names = vec![SanType::URI(uri.try_into().expect("uri"))];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params.signed_by(key, &self.issuer).expect("signed");
            pb::WorkloadCertificate {
                chain: vec![cert.der().to_vec()],
                trust_bundle: bundle.iter().map(|c| c.der.clone()).collect(),
                error: String::new(),
            }
        }
    }

    fn certified(ca: &Ca, identity: &str) -> Arc<Workload> {
        let workload = Workload::new(identity);
        let request = Workload::request().expect("request");
        let uri = toolmesh_proto::workload::spiffe_id("cluster.local", identity);
        let answer = ca.answer(&request.key, &uri, &[ca]);
        workload.install(request, &answer).expect("installed");
        workload
    }

    #[test]
    fn only_a_certificate_for_this_key_and_identity_from_the_bundle_is_taken() {
        let ca = Ca::new();
        let workload = Workload::new("agents/a");
        let good = "spiffe://cluster.local/ns/agents/sa/a";

        let request = Workload::request().expect("request");
        let other = "spiffe://cluster.local/ns/agents/sa/b";
        let err = workload
            .install(
                Workload::request().expect("r"),
                &ca.answer(&request.key, good, &[&ca]),
            )
            .expect_err("other key");
        assert!(err.contains("not for the key"), "{err}");
        let err = workload
            .install(
                Workload::request().expect("r"),
                &pb::WorkloadCertificate {
                    error: "no CA".into(),
                    ..Default::default()
                },
            )
            .expect_err("refused");
        assert!(err.contains("no CA"), "{err}");
        let request = Workload::request().expect("request");
        let answer = ca.answer(&request.key, other, &[&ca]);
        let err = workload
            .install(request, &answer)
            .expect_err("other identity");
        assert!(err.contains("not this sidecar's identity"), "{err}");
        let request = Workload::request().expect("request");
        let answer = ca.answer(&request.key, good, &[&Ca::new()]);
        let err = workload.install(request, &answer).expect_err("other CA");
        assert!(err.contains("does not chain"), "{err}");
        assert!(
            workload.current().is_none(),
            "nothing refused was installed"
        );

        let request = Workload::request().expect("request");
        let answer = ca.answer(&request.key, good, &[&ca]);
        let issued = workload.install(request, &answer).expect("taken");
        assert_eq!(issued.spiffe_id, good);
        assert!(issued.renew_at < issued.not_after);
    }

    /// A TLS handshake between `client` (expecting `server_identity`) and `server`
    /// over an in-memory pipe: the identity the server saw, or the client's error.
    async fn handshake(
        client: &Arc<Workload>,
        server_identity: &str,
        server: &Arc<Workload>,
    ) -> Result<Option<String>, String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config().expect("server"));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(
            client.client_config(server_identity).expect("client"),
        ));
        let server_side = tokio::spawn({
            let server = server.clone();
            async move {
                let stream = acceptor.accept(b).await.map_err(|e| e.to_string())?;
                let chain = stream.get_ref().1.peer_certificates().map(<[_]>::to_vec);
                Ok::<_, String>(chain.and_then(|c| server.peer_identity(&c)))
            }
        });
        let name = ServerName::try_from("ignored.invalid").expect("name");
        let client_side = connector.connect(name, a).await.map_err(|e| e.to_string());
        let seen = server_side.await.expect("task");
        client_side?;
        seen
    }

    #[tokio::test]
    async fn sidecars_prove_their_identities_to_each_other() {
        let ca = Ca::new();
        let server = certified(&ca, "tools/srv");
        let agent = certified(&ca, "agents/a");
        assert_eq!(
            handshake(&agent, "tools/srv", &server).await,
            Ok(Some("agents/a".to_owned()))
        );
        // The agent expects another server: the certificate is refused.
        let err = handshake(&agent, "tools/other", &server)
            .await
            .expect_err("wrong server");
        assert!(err.contains("tools/other"), "{err}");
        // A client without a certificate, or with one from another CA, gets nowhere.
        let bare = Workload::new("agents/bare");
        assert!(handshake(&bare, "tools/srv", &server).await.is_err());
        let stranger = certified(&Ca::new(), "agents/a");
        assert!(handshake(&stranger, "tools/srv", &server).await.is_err());
    }
}
