//! Serving certificates that may change under a running control plane.
//!
//! cert-manager renews a certificate by rewriting the Secret, and the kubelet updates
//! the mounted files in place; a control plane that read them once at start would serve
//! the old certificate until it expired. Both TLS ports (gRPC and the webhook) take
//! their certificate from a [`Reloading`] resolver instead: given files, it looks at
//! their modification times at most every [`CHECK_EVERY`] during handshakes and loads a
//! changed pair; a pair that does not load (half-written, mismatched) is logged and the
//! previous one keeps serving. Certificates given as PEM (the self-managed CA's Secret)
//! are served as they are.
//!
//! This module builds `rustls` server configurations; it does not accept connections.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// How often, at most, the files are looked at again.
pub const CHECK_EVERY: Duration = Duration::from_secs(30);

/// Where a serving certificate and its key come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// PEM files, reloaded when they change (`--tls-cert`/`--tls-key`, …).
    Files { cert: PathBuf, key: PathBuf },
    /// PEM text held in memory (the self-managed CA's Secret).
    Pem { cert: Vec<u8>, key: Vec<u8> },
}

/// A certificate resolver that follows its files.
#[derive(Debug)]
pub struct Reloading {
    source: Source,
    what: &'static str,
    check_every: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    key: Arc<CertifiedKey>,
    checked: Instant,
    modified: Option<(SystemTime, SystemTime)>,
}

fn load(cert: &[u8], key: &[u8], what: &str) -> Result<Arc<CertifiedKey>, String> {
    let certs = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} certificate: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what} certificate: no PEM certificate found"));
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("{what} key: {e}"))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("{what} key: {e}"))?;
    let certified = CertifiedKey::new(certs, signing);
    certified
        .keys_match()
        .map_err(|e| format!("{what}: the key does not belong to the certificate: {e}"))?;
    Ok(Arc::new(certified))
}

fn modified(cert: &PathBuf, key: &PathBuf) -> Option<(SystemTime, SystemTime)> {
    let time = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((time(cert)?, time(key)?))
}

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

impl Reloading {
    /// Load the pair now (an error here stops the start); `what` names it in logs.
    pub fn new(source: Source, what: &'static str) -> Result<Reloading, String> {
        Reloading::checking_every(source, what, CHECK_EVERY)
    }

    /// Like [`Reloading::new`], looking at the files at most every `check_every`.
    pub fn checking_every(
        source: Source,
        what: &'static str,
        check_every: Duration,
    ) -> Result<Reloading, String> {
        let (key, modified) = match &source {
            Source::Pem { cert, key } => (load(cert, key, what)?, None),
            Source::Files {
                cert,
                key: key_path,
            } => {
                let stamp = modified(cert, key_path);
                let pair = load(&read(cert, what)?, &read(key_path, what)?, what)?;
                (pair, stamp)
            }
        };
        Ok(Reloading {
            source,
            what,
            check_every,
            state: Mutex::new(State {
                key,
                checked: Instant::now(),
                modified,
            }),
        })
    }

    /// The pair to serve, reloaded first if its files changed.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Source::Files { cert, key } = &self.source
            && state.checked.elapsed() >= self.check_every
        {
            state.checked = Instant::now();
            let stamp = modified(cert, key);
            if stamp.is_some() && stamp != state.modified {
                let loaded = read(cert, self.what)
                    .and_then(|c| read(key, self.what).map(|k| (c, k)))
                    .and_then(|(c, k)| load(&c, &k, self.what));
                match loaded {
                    Ok(pair) => {
                        tracing::info!(what = self.what, cert = %cert.display(), "serving certificate reloaded");
                        state.key = pair;
                        state.modified = stamp;
                    }
                    // Half-written or mismatched: keep serving the old pair, try again.
                    Err(e) => {
                        tracing::warn!(what = self.what, error = %e, "serving certificate changed but does not load; keeping the previous one")
                    }
                }
            }
        }
        state.key.clone()
    }

    /// A server configuration serving this pair with `alpn` (e.g. `h2`).
    pub fn server_config(self, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, String> {
        let what = self.what;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("{what} TLS: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(self));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    fn served(r: &Reloading) -> Vec<u8> {
        r.current().cert[0].to_vec()
    }

    #[test]
    fn a_renewed_pair_is_served_and_a_broken_one_is_not() {
        let dir = std::env::temp_dir().join(format!("toolmesh-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        let write = |c: &str, k: &str| {
            std::fs::write(&cert, c).expect("cert");
            std::fs::write(&key, k).expect("key");
        };
        let (c1, k1) = pair("one.example");
        write(&c1, &k1);
        let source = Source::Files {
            cert: cert.clone(),
            key: key.clone(),
        };
        let r = Reloading::checking_every(source, "test", Duration::ZERO).expect("loads");
        let first = served(&r);

        // Renewed in place (a later mtime): the next handshake gets the new one.
        std::thread::sleep(Duration::from_millis(20));
        let (c2, k2) = pair("two.example");
        write(&c2, &k2);
        let second = served(&r);
        assert_ne!(first, second, "reloaded");

        // A certificate with another pair's key: refused, the renewed one stays.
        std::thread::sleep(Duration::from_millis(20));
        write(&c1, &k2);
        assert_eq!(served(&r), second, "a mismatched pair is not served");
        // A half-written file: the same.
        std::thread::sleep(Duration::from_millis(20));
        write("-----BEGIN CERTIFICATE-----\nMIIB", &k2);
        assert_eq!(served(&r), second);

        // At start, a bad pair is an error, not a silent default.
        write(&c1, &k2);
        let source = Source::Files { cert, key };
        assert!(Reloading::new(source, "test").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
