//! Control-plane mode: snapshots arrive over a gRPC stream instead of from a file.
//!
//! The sidecar says Hello (identity, node, the version it already serves), then for
//! every pushed snapshot: checks it (it is for this identity; upstreams are https when
//! `--require-https-upstreams`), compiles and swaps it in, persists it to `--state-dir`,
//! and ACKs; or NACKs with the reason and keeps serving what it had.
//!
//! Fail static: when the control plane is away the sidecar keeps its last good
//! snapshot and reconnects with jittered exponential backoff (0.2 s doubling to 30 s).
//! At startup a snapshot persisted by an earlier run is served before the control
//! plane answers, so a restart during an outage does not take tools away.
//!
//! This module does not serve traffic; it only feeds [`Active`].

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

const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const SNAPSHOT_FILE: &str = "snapshot.pb";

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
}

/// An error and its sources, `outer: inner: root` (tonic's own text stops at the
/// outermost, e.g. "transport error", which hides a TLS or DNS cause).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let next = inner.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = inner.source();
    }
    text
}

/// A gRPC status as the code, the message and any transport cause.
fn status(s: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", s.code(), s.message());
    if let Some(cause) = std::error::Error::source(s) {
        text.push_str(": ");
        text.push_str(&chain(cause));
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
    /// Serve the snapshot an earlier run persisted, if there is a usable one.
    pub fn load_persisted(&self) {
        let Some(path) = self.state_path() else {
            return;
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read the persisted snapshot");
                return;
            }
        };
        let result = pb::Snapshot::decode(bytes.as_slice())
            .map_err(|e| e.to_string())
            .and_then(|s| vet(&s, &self.identity, self.require_https).map(|()| s))
            .and_then(|s| self.active.apply(&s).map(|_| s));
        match result {
            Ok(s) => {
                tracing::info!(version = %s.version, file = %path.display(), "serving the persisted snapshot until the control plane answers")
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "ignoring the persisted snapshot")
            }
        }
    }

    fn state_path(&self) -> Option<PathBuf> {
        self.state_dir.as_ref().map(|d| d.join(SNAPSHOT_FILE))
    }

    fn persist(&self, snapshot: &pb::Snapshot) {
        let Some(path) = self.state_path() else {
            return;
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
            file.write_all(&snapshot.encode_to_vec())?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = write(&path) {
            tracing::warn!(file = %path.display(), error = %e, "cannot persist the snapshot");
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
                Err(e) if self.active.is_loaded() => {
                    tracing::warn!(url = %self.url, error = %e, retry_in = ?backoff, "control plane unreachable; serving the last good snapshot")
                }
                Err(e) => {
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
            .map_err(|e| format!("connect: {}", chain(&e)))
    }

    async fn session(&self) -> Result<(), String> {
        let token = std::fs::read_to_string(&self.token_file)
            .map_err(|e| format!("--token-file {}: {e}", self.token_file.display()))?;
        let auth: MetadataValue<_> = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| "--token-file: not a valid token".to_owned())?;
        let mut client = SnapshotServiceClient::new(self.channel().await?);
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
        };
        send(&tx, Msg::Hello(hello)).await?;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request.metadata_mut().insert("authorization", auth);
        let mut pushes = client
            .stream(request)
            .await
            .map_err(|s| status(&s))?
            .into_inner();
        telemetry::control_plane_connected(true);
        tracing::info!(url = %self.url, "connected to the control plane");
        while let Some(push) = pushes.message().await.map_err(|s| status(&s))? {
            let Some(snapshot) = push.snapshot else {
                continue;
            };
            let version = snapshot.version.clone();
            let result = vet(&snapshot, &self.identity, self.require_https)
                .and_then(|()| self.active.apply(&snapshot));
            match result {
                Ok(changed) => {
                    if changed {
                        tracing::info!(%version, servers = snapshot.servers.len(), "snapshot applied");
                    }
                    self.persist(&snapshot);
                    send(
                        &tx,
                        Msg::Ack(pb::Ack {
                            version,
                            nonce: push.nonce,
                        }),
                    )
                    .await?;
                }
                Err(reason) => {
                    telemetry::config_rejected();
                    telemetry::snapshot_nacked();
                    tracing::error!(%version, %reason, "snapshot refused; the previous one keeps serving");
                    send(
                        &tx,
                        Msg::Nack(pb::Nack {
                            version,
                            nonce: push.nonce,
                            reason,
                        }),
                    )
                    .await?;
                }
            }
        }
        Ok(())
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
