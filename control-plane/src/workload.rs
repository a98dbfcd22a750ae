//! The workload CA: short-lived certificates for sidecars, signed over the snapshot
//! stream.
//!
//! A sidecar makes its key itself and sends a PKCS#10 request on its authenticated
//! stream; [`Ca::sign`] checks the request's signature (proof that the sidecar holds
//! the key) and issues a certificate whose only name is the SPIFFE ID of the identity
//! the *stream* authenticated — the names the request asks for are ignored, so a
//! sidecar can never get a certificate for anyone else. Certificates live
//! `--workload-cert-ttl` (hours); sidecars renew at half-life and keep keys in memory.
//!
//! The CA comes from `--workload-ca-cert`/`--workload-ca-key` (read again on every
//! signing, so a renewed CA is picked up without a restart; a pair that does not load
//! keeps the previous one), from the self-managed TLS Secret's `ca.key`, or — with
//! `--dev` — is made in memory at start. The trust bundle sent with every certificate
//! is the signing CA plus `--workload-trust-bundle`: during a CA rollover that file
//! holds the other root, so old and new certificates are both accepted (see
//! docs/kubernetes.md, "Rotating the workload CA").
//!
//! This module does not authenticate sidecars (see [`crate::auth`]) and does not
//! serve anything.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, pem::PemObject};
use toolmesh_proto::v1alpha1 as pb;
use toolmesh_proto::workload::spiffe_id;

/// The default lifetime of a workload certificate.
pub const DEFAULT_TTL: &str = "12h";
/// Certificates start this long before they are issued, for clocks behind ours.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// The largest certificate request taken.
pub const MAX_CSR_BYTES: usize = 8 * 1024;

/// Where the signing CA comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// PEM files, read again at every signing.
    Files { cert: PathBuf, key: PathBuf },
    /// PEM text (the self-managed Secret, or a CA made in memory).
    Pem { cert: String, key: String },
}

struct Loaded {
    issuer: Issuer<'static, KeyPair>,
    ca: Vec<u8>,
}

/// The workload CA.
pub struct Ca {
    source: Source,
    extra_trust: Vec<PathBuf>,
    trust_domain: String,
    ttl: Duration,
    /// The last CA that loaded (files are read again at every signing).
    loaded: Mutex<std::sync::Arc<Loaded>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key never reaches a log line.
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn load(source: &Source) -> Result<Loaded, String> {
    let (cert, key) = match source {
        Source::Files { cert, key } => (
            std::fs::read_to_string(cert)
                .map_err(|e| format!("--workload-ca-cert {}: {e}", cert.display()))?,
            std::fs::read_to_string(key)
                .map_err(|e| format!("--workload-ca-key {}: {e}", key.display()))?,
        ),
        Source::Pem { cert, key } => (cert.clone(), key.clone()),
    };
    let der = CertificateDer::from_pem_slice(cert.as_bytes())
        .map_err(|e| format!("workload CA certificate: {e}"))?;
    let key = KeyPair::from_pem(&key).map_err(|e| format!("workload CA key: {e}"))?;
    let issuer =
        Issuer::from_ca_cert_der(&der, key).map_err(|e| format!("workload CA certificate: {e}"))?;
    Ok(Loaded {
        issuer,
        ca: der.to_vec(),
    })
}

/// A new self-signed CA (PEM certificate, PEM key) for workload certificates.
pub fn generate(trust_domain: &str) -> Result<(String, String), String> {
    let err = |e: rcgen::Error| format!("generating the workload CA: {e}");
    let from = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let key = KeyPair::generate().map_err(err)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.distinguished_name.push(
        DnType::CommonName,
        format!("toolmesh workload CA {trust_domain}"),
    );
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = from;
    params.not_after = from + time::Duration::days(5 * 365);
    let cert = params.self_signed(&key).map_err(err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

impl Ca {
    /// A CA from `source`; fails if it does not load now.
    pub fn new(
        source: Source,
        extra_trust: Vec<PathBuf>,
        trust_domain: String,
        ttl: Duration,
    ) -> Result<Ca, String> {
        let loaded = std::sync::Arc::new(load(&source)?);
        let ca = Ca {
            source,
            extra_trust,
            trust_domain,
            ttl,
            loaded: Mutex::new(loaded.clone()),
        };
        // The extra roots must load too, or nothing would ever be issued.
        ca.bundle(&loaded)?;
        Ok(ca)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The current signing CA: loaded again from files, or the last good one.
    fn current(&self) -> std::sync::Arc<Loaded> {
        let mut slot = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(self.source, Source::Files { .. }) {
            match load(&self.source) {
                Ok(fresh) => *slot = std::sync::Arc::new(fresh),
                Err(e) => {
                    tracing::error!(error = %e, "the workload CA does not load; signing with the previous one")
                }
            }
        }
        slot.clone()
    }

    /// The DER roots sidecars check workload certificates against: `signing`, then
    /// `--workload-trust-bundle`.
    fn bundle(&self, signing: &Loaded) -> Result<Vec<Vec<u8>>, String> {
        let mut roots = vec![signing.ca.clone()];
        for path in &self.extra_trust {
            let pem = std::fs::read(path)
                .map_err(|e| format!("--workload-trust-bundle {}: {e}", path.display()))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert =
                    cert.map_err(|e| format!("--workload-trust-bundle {}: {e}", path.display()))?;
                if !roots.iter().any(|r| r.as_slice() == cert.as_ref()) {
                    roots.push(cert.to_vec());
                }
            }
        }
        Ok(roots)
    }

    /// How long the certificates this CA issues live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Sign `csr` (DER PKCS#10) for `identity`, the identity the stream authenticated.
    /// The answer carries the error instead when nothing was issued.
    pub fn sign(&self, identity: &str, csr: &[u8]) -> pb::WorkloadCertificate {
        match self.try_sign(identity, csr) {
            Ok(issued) => {
                metrics::counter!("toolmesh_cp_workload_certificates_total", "result" => "issued")
                    .increment(1);
                issued
            }
            Err(error) => {
                tracing::warn!(%identity, %error, "workload certificate refused");
                metrics::counter!("toolmesh_cp_workload_certificates_total", "result" => "refused")
                    .increment(1);
                pb::WorkloadCertificate {
                    error,
                    ..Default::default()
                }
            }
        }
    }

    fn try_sign(&self, identity: &str, csr: &[u8]) -> Result<pb::WorkloadCertificate, String> {
        if csr.len() > MAX_CSR_BYTES {
            return Err(format!(
                "the certificate request is {} bytes, over {MAX_CSR_BYTES}",
                csr.len()
            ));
        }
        let der = CertificateSigningRequestDer::from(csr);
        // Parsing checks the request's signature: the sender holds the key.
        let request = CertificateSigningRequestParams::from_der(&der).map_err(|e| {
            format!("the certificate request is not a valid, signed PKCS#10 request: {e}")
        })?;
        let loaded = self.current();
        let id = spiffe_id(&self.trust_domain, identity);
        let now = time::OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            id.clone()
                .try_into()
                .map_err(|e| format!("SPIFFE ID {id:?}: {e}"))?,
        )];
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = now + self.ttl;
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&request.public_key, &loaded.issuer)
            .map_err(|e| format!("signing: {e}"))?;
        tracing::info!(%identity, spiffe = %id, ttl = ?self.ttl, "workload certificate issued");
        Ok(pb::WorkloadCertificate {
            chain: vec![cert.der().to_vec()],
            trust_bundle: self.bundle(&loaded)?,
            error: String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> Ca {
        let (cert, key) = generate("cluster.local").expect("ca");
        Ca::new(
            Source::Pem { cert, key },
            Vec::new(),
            "cluster.local".into(),
            Duration::from_secs(3600),
        )
        .expect("loads")
    }

    fn request(names: Vec<String>) -> (KeyPair, Vec<u8>) {
        let key = KeyPair::generate().expect("key");
        let csr = CertificateParams::new(names)
            .expect("params")
            .serialize_request(&key)
            .expect("csr");
        (key, csr.der().to_vec())
    }

    #[test]
    fn the_certificate_names_the_authenticated_identity_only() {
        let (_key, csr) = request(vec!["admin.example.com".into()]);
        let issued = ca().sign("agents/triage", &csr);
        assert_eq!(issued.error, "");
        assert_eq!(issued.chain.len(), 1);
        assert_eq!(issued.trust_bundle.len(), 1);
        let (_, cert) = x509_parser::parse_x509_certificate(&issued.chain[0]).expect("parses");
        let san = cert
            .subject_alternative_name()
            .expect("ok")
            .expect("has SAN");
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names, ["URI(spiffe://cluster.local/ns/agents/sa/triage)"]);
        let ttl = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(ttl, 3600 + 300);
    }

    #[test]
    fn a_request_that_is_not_signed_by_its_key_is_refused() {
        let (_key, mut csr) = request(Vec::new());
        let last = csr.len() - 1;
        csr[last] ^= 0xff;
        let issued = ca().sign("agents/triage", &csr);
        assert!(issued.chain.is_empty());
        assert!(issued.error.contains("PKCS#10"), "{}", issued.error);
        let issued = ca().sign("agents/triage", b"garbage");
        assert!(issued.chain.is_empty());
        let issued = ca().sign("agents/triage", &vec![0u8; MAX_CSR_BYTES + 1]);
        assert!(issued.error.contains("over"), "{}", issued.error);
    }
}
