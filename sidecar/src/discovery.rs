//! Control-plane mode: snapshots arrive over a gRPC stream instead of from a file.
//!
//! The sidecar says Hello (identity, node, the version it already serves), then for
//! every pushed snapshot: checks it (it is for this identity; upstreams are https when
//! `--require-https-upstreams`), compiles it, persists it to `--state-dir`, swaps it
//! in and ACKs; or NACKs with the reason and keeps serving what it had. A snapshot
//! that cannot be persisted is NACKed too (a restart would otherwise serve an older
//! one than the control plane believes) and tried again with backoff (1 s doubling to
//! 30 s) until it persists, then ACKed with the same nonce; a newer push replaces it.
//!
//! Fail static: when the control plane is away the sidecar keeps its last good
//! snapshot and reconnects with jittered exponential backoff (0.2 s doubling to 30 s).
//! At startup a snapshot persisted by an earlier run is served before the control
//! plane answers, so a restart during an outage does not take tools away. The state
//! file carries a SHA-256 of its contents ([`encode_state`]): protobuf decodes a
//! prefix of a message without complaint, so a file cut short (or with a byte changed)
//! could otherwise load without its later rules. A damaged file is never served:
//! `/ready` says why and the sidecar waits for the control plane.
//!
//! Workload certificates travel on the same stream: when this sidecar needs one
//! (server-side mode, or a snapshot that routes through the mesh) it sends a
//! certificate request for a key it just made, installs the answer into
//! [`Workload`], and asks again at half the certificate's life; a refusal is retried
//! with backoff (2 s doubling to 5 min). A reconnect asks again only when due.
//!
//! This module does not serve traffic; it only feeds [`Active`] and [`Workload`].

use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use toolmesh_proto::v1alpha1 as pb;
use toolmesh_proto::v1alpha1::sidecar_message::Kind as Msg;
use toolmesh_proto::v1alpha1::snapshot_service_client::SnapshotServiceClient;

use crate::snapshot::Active;
use crate::telemetry;
use crate::workload::{self, Workload};

const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const SNAPSHOT_FILE: &str = "snapshot.pb";
/// Opens a state file: format and version.
const STATE_MAGIC: &[u8; 8] = b"TMSNAP1\n";

/// The state file for `snapshot`: [`STATE_MAGIC`], the SHA-256 of the encoded
/// snapshot, the encoded snapshot.
pub fn encode_state(snapshot: &pb::Snapshot) -> Vec<u8> {
    use sha2::Digest;
    let payload = snapshot.encode_to_vec();
    let mut out = Vec::with_capacity(STATE_MAGIC.len() + 32 + payload.len());
    out.extend_from_slice(STATE_MAGIC);
    out.extend_from_slice(&sha2::Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    out
}

/// The snapshot in a state file, if the file is whole.
pub fn decode_state(bytes: &[u8]) -> Result<pb::Snapshot, String> {
    use sha2::Digest;
    let rest = bytes
        .strip_prefix(STATE_MAGIC.as_slice())
        .ok_or("not a toolmesh state file (or from an older version)")?;
    if rest.len() < 32 {
        return Err(format!("cut short at {} bytes", bytes.len()));
    }
    let (sum, payload) = rest.split_at(32);
    if sha2::Sha256::digest(payload).as_slice() != sum {
        return Err(format!(
            "checksum mismatch ({} bytes): the file is damaged",
            bytes.len()
        ));
    }
    pb::Snapshot::decode(payload)
        .map_err(|e| format!("checksum matches but it does not decode: {e}"))
}

/// Everything control-plane mode needs.
#[derive(Debug)]
pub struct Discovery {
    pub url: String,
    pub token_file: PathBuf,
    pub ca_file: Option<PathBuf>,
    pub ca_pem: Option<String>,
    pub identity: String,
    pub node: String,
    pub state_dir: Option<PathBuf>,
    pub require_https: bool,
    pub active: Arc<Active>,
    /// This sidecar's workload certificate, asked for on the stream and renewed at
    /// half-life when [`Discovery::always_certify`] or a snapshot routes through the
    /// mesh.
    pub workload: Arc<Workload>,
    /// Server-side mode: a certificate is needed whatever the snapshot says.
    pub always_certify: bool,
    /// Gateway mode: ask for the gateway snapshot (the control plane must allow this
    /// identity to be a gateway).
    pub gateway: bool,
}

/// Where a workload certificate request stands on one stream.
#[derive(Debug)]
struct Certifying {
    /// The request sent and not answered yet, and when it was sent.
    outstanding: Option<(workload::Request, tokio::time::Instant)>,
    /// After a refusal: not before this, and the wait that led to it.
    retry: Option<(tokio::time::Instant, Duration)>,
}

/// An unanswered certificate request is given up after this long.
const CERTIFICATE_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// First wait after a refused certificate request (doubling to [`CERTIFICATE_RETRY_MAX`]).
const CERTIFICATE_RETRY_START: Duration = Duration::from_secs(2);
const CERTIFICATE_RETRY_MAX: Duration = Duration::from_secs(300);

/// A gRPC status as the code, the message and any transport cause.
fn status(s: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", s.code(), s.message());
    if let Some(cause) = std::error::Error::source(s) {
        text.push_str(": ");
        text.push_str(&toolmesh_proto::error_chain(cause));
    }
    text
}

/// Checks a snapshot must pass before it is compiled.
pub fn vet(snapshot: &pb::Snapshot, identity: &str, require_https: bool) -> Result<(), String> {
    if snapshot.identity != identity {
        return Err(format!(
            "snapshot is for identity {:?}, this sidecar is {identity:?}",
            snapshot.identity
        ));
    }
    if require_https {
        for server in &snapshot.servers {
            if let Some(e) = server
                .endpoints
                .iter()
                .find(|e| !e.url.starts_with("https://"))
            {
                return Err(format!(
                    "server {}: endpoint {} is not https (--require-https-upstreams)",
                    server.name, e.url
                ));
            }
        }
    }
    Ok(())
}

impl Discovery {
    /// Serve the snapshot an earlier run persisted, if there is a usable one. A file
    /// that is there but damaged is refused loudly: logged, counted, and `/ready`
    /// says why until the control plane sends a snapshot.
    pub fn load_persisted(&self) {
        let Some(path) = self.state_path() else {
            return;
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                telemetry::state_file_error("unreadable");
                let problem = format!("persisted snapshot {} unreadable: {e}", path.display());
                tracing::error!(file = %path.display(), error = %e, "cannot read the persisted snapshot; waiting for the control plane");
                self.active.set_problem(Some(problem));
                return;
            }
        };
        let result = decode_state(&bytes)
            .and_then(|s| vet(&s, &self.identity, self.require_https).map(|()| s))
            .and_then(|s| self.active.apply(&s).map(|_| s));
        match result {
            Ok(s) => {
                tracing::info!(version = %s.version, file = %path.display(), "serving the persisted snapshot until the control plane answers")
            }
            Err(e) => {
                telemetry::state_file_error("damaged");
                tracing::error!(file = %path.display(), error = %e, "refused the persisted snapshot; waiting for the control plane");
                self.active.set_problem(Some(format!(
                    "persisted snapshot {} refused: {e}; waiting for the control plane",
                    path.display()
                )));
            }
        }
    }

    fn state_path(&self) -> Option<PathBuf> {
        self.state_dir.as_ref().map(|d| d.join(SNAPSHOT_FILE))
    }

    /// Write the state file (whole, or not at all).
    fn persist(&self, snapshot: &pb::Snapshot) -> Result<(), String> {
        let Some(path) = self.state_path() else {
            return Ok(());
        };
        let write = |path: &Path| -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("pb.tmp");
            // The snapshot holds this identity's credentials: owner-only, and synced
            // before the rename so a crash leaves the old file or the new one, whole.
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            let written = file
                .write_all(&encode_state(snapshot))
                .and_then(|()| file.sync_all());
            if let Err(e) = written {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            std::fs::rename(&tmp, path)
        };
        write(&path).map_err(|e| {
            telemetry::state_file_error("persist");
            format!("cannot persist the snapshot to {}: {e}", path.display())
        })
    }

    /// Check, compile, persist and serve one pushed snapshot: `Ok(changed)`, or the
    /// reason to NACK it and whether trying again later may succeed.
    fn take(&self, snapshot: &pb::Snapshot) -> Result<bool, (String, bool)> {
        vet(snapshot, &self.identity, self.require_https).map_err(|r| (r, false))?;
        let runtime = self.active.prepare(snapshot).map_err(|r| (r, false))?;
        // Persisted before it serves: what a restart would load is never older than
        // what was acknowledged.
        self.persist(snapshot).map_err(|e| (e, true))?;
        Ok(match runtime {
            Some(runtime) => {
                self.active.install(runtime);
                true
            }
            None => false,
        })
    }

    /// Whether this sidecar needs a workload certificate now.
    fn wants_certificate(&self) -> bool {
        self.always_certify || self.active.current().is_some_and(|r| r.meshed)
    }

    /// When to send the next certificate request, if one is needed.
    fn certificate_due(&self, state: &Certifying) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        if let Some((_, sent)) = &state.outstanding {
            return Some(*sent + CERTIFICATE_ANSWER_TIMEOUT);
        }
        if !self.wants_certificate() {
            return None;
        }
        let renew = match self.workload.current() {
            None => now,
            Some(issued) => {
                let left = issued
                    .renew_at
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                now + left
            }
        };
        Some(match state.retry {
            Some((at, _)) => renew.max(at),
            None => renew,
        })
    }

    /// Send a certificate request (or give up on an unanswered one).
    async fn certify(
        &self,
        state: &mut Certifying,
        tx: &mpsc::Sender<pb::SidecarMessage>,
    ) -> Result<(), String> {
        if state.outstanding.take().is_some() {
            tracing::warn!(timeout = ?CERTIFICATE_ANSWER_TIMEOUT, "the control plane did not answer the certificate request; asking again");
        }
        let request = workload::Workload::request()?;
        let csr = request.csr.clone();
        state.outstanding = Some((request, tokio::time::Instant::now()));
        send(tx, Msg::CertificateRequest(pb::CertificateRequest { csr })).await
    }

    /// Take the control plane's answer to the outstanding certificate request.
    fn certified(&self, state: &mut Certifying, answer: &pb::WorkloadCertificate) {
        let Some((request, _)) = state.outstanding.take() else {
            tracing::debug!("a certificate nobody asked for; ignored");
            return;
        };
        match self.workload.install(request, answer) {
            Ok(issued) => {
                telemetry::workload_certificate(Some(issued.not_after));
                tracing::info!(spiffe_id = %issued.spiffe_id, expires = %humantime::format_rfc3339_seconds(issued.not_after), "workload certificate installed");
                state.retry = None;
            }
            Err(reason) => {
                telemetry::workload_certificate(None);
                let wait = state.retry.map_or(CERTIFICATE_RETRY_START, |(_, w)| {
                    (w * 2).min(CERTIFICATE_RETRY_MAX)
                });
                tracing::error!(%reason, retry_in = ?wait, "no workload certificate");
                state.retry = Some((tokio::time::Instant::now() + wait, wait));
            }
        }
    }

    /// Stay connected forever.
    pub async fn run(self) {
        let mut backoff = BACKOFF_START;
        loop {
            let outcome = self.session().await;
            telemetry::control_plane_connected(false);
            match outcome {
                Ok(()) => {
                    tracing::warn!(url = %self.url, "control plane closed the stream; reconnecting");
                    backoff = BACKOFF_START;
                }
                Err(Failure::Refused(e)) => {
                    tracing::error!(url = %self.url, error = %e, retry_in = ?backoff, "the control plane was reached and refused this sidecar: check --token-file and --identity");
                }
                Err(Failure::Other(e)) if self.active.is_loaded() => {
                    tracing::warn!(url = %self.url, error = %e, retry_in = ?backoff, "control plane unreachable; serving the last good snapshot")
                }
                Err(Failure::Other(e)) => {
                    tracing::warn!(url = %self.url, error = %e, retry_in = ?backoff, "control plane unreachable and no snapshot yet; not ready")
                }
            }
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn channel(&self) -> Result<Channel, String> {
        let mut endpoint = Channel::from_shared(self.url.clone())
            .map_err(|e| format!("--control-plane: {e}"))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if self.url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_enabled_roots();
            if let Some(ca) = &self.ca_file {
                let pem =
                    std::fs::read(ca).map_err(|e| format!("--ca-file {}: {e}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some(pem) = &self.ca_pem {
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| format!("TLS: {e}"))?;
        }
        endpoint
            .connect()
            .await
            .map_err(|e| format!("connect: {}", toolmesh_proto::error_chain(&e)))
    }

    async fn session(&self) -> Result<(), Failure> {
        let token = std::fs::read_to_string(&self.token_file)
            .map_err(|e| format!("--token-file {}: {e}", self.token_file.display()))?;
        let auth: MetadataValue<_> = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| "--token-file: not a valid token".to_owned())?;
        let mut client = SnapshotServiceClient::new(self.channel().await?)
            .max_decoding_message_size(toolmesh_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(toolmesh_proto::MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel(8);
        let has = self
            .active
            .current()
            .map(|r| r.version.clone())
            .unwrap_or_default();
        let hello = pb::Hello {
            identity: self.identity.clone(),
            node: self.node.clone(),
            version: has,
            gateway: self.gateway,
        };
        send(&tx, Msg::Hello(hello)).await?;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request.metadata_mut().insert("authorization", auth);
        let mut pushes = client
            .stream(request)
            .await
            .map_err(|s| match s.code() {
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                    Failure::Refused(status(&s))
                }
                _ => Failure::Other(status(&s)),
            })?
            .into_inner();
        telemetry::control_plane_connected(true);
        tracing::info!(url = %self.url, "connected to the control plane");
        // A push that could not be persisted, retried with backoff until it can (or a
        // newer push replaces it); its NACK was sent once.
        let mut pending: Option<(pb::SnapshotPush, Duration)> = None;
        let mut certifying = Certifying {
            outstanding: None,
            retry: None,
        };
        // Drifts from pinned definitions: every one seen so far on each connection (a
        // restarted control plane learns them again), then each new one.
        let mut drift_added = crate::pin::subscribe();
        let mut drifts_sent = 0;
        for drift in crate::pin::reports_from(0) {
            drifts_sent += 1;
            send(&tx, Msg::Drift(drift)).await?;
        }
        loop {
            let retry_in = pending.as_ref().map(|(_, wait)| *wait);
            let certificate_due = self.certificate_due(&certifying);
            // A push from the stream, or the pending one again (`Some(previous wait)`).
            let (push, retried) = tokio::select! {
                message = pushes.message() => match message.map_err(|s| status(&s))? {
                    Some(push) => (push, None),
                    None => return Ok(()),
                },
                () = sleep_or_never(retry_in) => match pending.take() {
                    Some((push, wait)) => (push, Some(wait)),
                    None => continue,
                },
                () = sleep_until_or_never(certificate_due) => {
                    self.certify(&mut certifying, &tx).await?;
                    continue;
                }
                Ok(()) = drift_added.changed() => {
                    for drift in crate::pin::reports_from(drifts_sent) {
                        drifts_sent += 1;
                        send(&tx, Msg::Drift(drift)).await?;
                    }
                    continue;
                }
            };
            if let Some(answer) = &push.certificate {
                self.certified(&mut certifying, answer);
            }
            let Some(snapshot) = &push.snapshot else {
                continue;
            };
            pending = None;
            let version = snapshot.version.clone();
            match self.take(snapshot) {
                Ok(changed) => {
                    if retried.is_some() {
                        tracing::info!(%version, "snapshot persisted on retry and applied");
                    } else if changed {
                        tracing::info!(%version, servers = snapshot.servers.len(), "snapshot applied");
                    }
                    let ack = pb::Ack {
                        version,
                        nonce: push.nonce,
                    };
                    send(&tx, Msg::Ack(ack)).await?;
                }
                // Already NACKed once: try again later, quietly.
                Err((reason, _)) if let Some(wait) = retried => {
                    let wait = (wait * 2).min(BACKOFF_MAX);
                    tracing::warn!(%version, %reason, retry_in = ?wait, "still cannot persist the snapshot");
                    pending = Some((push, wait));
                }
                Err((reason, retry)) => {
                    telemetry::config_rejected();
                    telemetry::snapshot_nacked();
                    tracing::error!(%version, %reason, "snapshot refused; the previous one keeps serving");
                    let nack = pb::Nack {
                        version,
                        nonce: push.nonce.clone(),
                        reason,
                    };
                    send(&tx, Msg::Nack(nack)).await?;
                    if retry {
                        pending = Some((push, PERSIST_RETRY_START));
                    }
                }
            }
        }
    }
}

/// Why a session with the control plane ended.
#[derive(Debug)]
enum Failure {
    /// It answered, and refused this sidecar's token or identity.
    Refused(String),
    /// It could not be reached, or the stream broke.
    Other(String),
}

impl From<String> for Failure {
    fn from(e: String) -> Failure {
        Failure::Other(e)
    }
}

/// First wait before a snapshot that could not be persisted is tried again.
const PERSIST_RETRY_START: Duration = Duration::from_secs(1);

async fn sleep_or_never(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_or_never(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn send(tx: &mpsc::Sender<pb::SidecarMessage>, kind: Msg) -> Result<(), String> {
    tx.send(pb::SidecarMessage { kind: Some(kind) })
        .await
        .map_err(|_| "stream closed".to_owned())
}

/// `d` scaled by a random factor in [0.5, 1.5), so a fleet does not reconnect in step.
fn jitter(d: Duration) -> Duration {
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let factor = 0.5 + (random % 1000) as f64 / 1000.0;
    d.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_state_file_is_never_read() {
        let snapshot = pb::Snapshot {
            version: "v1".into(),
            identity: "agents/a".into(),
            policies: vec![
                pb::Policy {
                    name: "allow".into(),
                    rules: vec![pb::Rule {
                        server: "s".into(),
                        tools: vec!["*".into()],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                pb::Policy {
                    name: "deny".into(),
                    rules: vec![pb::Rule {
                        server: "s".into(),
                        tools: vec!["delete_*".into()],
                        action: pb::Action::Deny as i32,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let file = encode_state(&snapshot);
        assert_eq!(decode_state(&file).expect("whole"), snapshot);
        // Every cut, and every byte changed, is refused.
        for len in 0..file.len() {
            assert!(decode_state(&file[..len]).is_err(), "cut at {len}");
        }
        for i in 0..file.len() {
            let mut bad = file.clone();
            bad[i] ^= 0x01;
            assert!(decode_state(&bad).is_err(), "byte {i} flipped");
        }
        // A bare protobuf (the old format) is refused too.
        assert!(decode_state(&snapshot.encode_to_vec()).is_err());
    }

    #[test]
    fn a_full_disk_is_a_persist_error_and_leaves_no_partial_file() {
        let dir = std::env::temp_dir().join(format!("toolmesh-full-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        // Writes to /dev/full fail with ENOSPC, as on a full volume.
        std::os::unix::fs::symlink("/dev/full", dir.join("snapshot.pb.tmp")).expect("symlink");
        let discovery = Discovery {
            url: String::new(),
            token_file: PathBuf::new(),
            ca_file: None,
            ca_pem: None,
            identity: "agents/a".into(),
            node: String::new(),
            state_dir: Some(dir.clone()),
            require_https: false,
            active: Arc::new(Active::default()),
            workload: Workload::new("agents/a"),
            always_certify: false,
            gateway: false,
        };
        let snapshot = pb::Snapshot {
            version: "v1".into(),
            identity: "agents/a".into(),
            ..Default::default()
        };
        let (reason, retry) = discovery.take(&snapshot).expect_err("NACKed");
        assert!(reason.contains("cannot persist") && retry, "{reason}");
        assert!(
            !discovery.active.is_loaded(),
            "a NACKed snapshot changes nothing"
        );
        assert!(!dir.join("snapshot.pb").exists());
        // With room again it persists, serves and the file reads back whole.
        discovery.take(&snapshot).expect("taken");
        assert!(discovery.active.is_loaded());
        let file = std::fs::read(dir.join("snapshot.pb")).expect("file");
        assert_eq!(decode_state(&file).expect("whole"), snapshot);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn vets_identity_and_https() {
        let mut s = pb::Snapshot {
            identity: "agents/a".into(),
            servers: vec![pb::Server {
                name: "s".into(),
                endpoints: vec![pb::Endpoint {
                    url: "http://x/mcp".into(),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(vet(&s, "agents/a", false).is_ok());
        assert!(
            vet(&s, "agents/b", false)
                .expect_err("other identity")
                .contains("agents/b")
        );
        assert!(
            vet(&s, "agents/a", true)
                .expect_err("http")
                .contains("not https")
        );
        s.servers[0].endpoints[0].url = "https://x/mcp".into();
        assert!(vet(&s, "agents/a", true).is_ok());
        let j = jitter(Duration::from_secs(10));
        assert!(j >= Duration::from_secs(5) && j < Duration::from_secs(15));
    }
}
