//! The gRPC services: the snapshot stream (sidecars) and the admin API (platform team).
//!
//! Snapshot stream: after authenticating the token and checking the Hello, the control
//! plane renders the identity's snapshot with the shared `render()` and pushes it when
//! its content version differs from what the sidecar has. It then waits for either a
//! store change (debounced, re-rendered, pushed only if this identity's version moved)
//! or a message from the sidecar: an ACK or NACK counts only if it carries the nonce of
//! the latest push, so a late answer to an older push is not mistaken for the newest.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use toolmesh_proto::resource::{Kind, Resource};
use toolmesh_proto::v1alpha1 as pb;
use toolmesh_proto::v1alpha1::admin_service_server::AdminService;
use toolmesh_proto::v1alpha1::sidecar_message::Kind as Msg;
use toolmesh_proto::v1alpha1::snapshot_service_server::SnapshotService;

use crate::auth::{Tokens, bearer};
use crate::fleet::{Fleet, MAX_PAGE, Query};
use crate::kubernetes::identity::TokenReviewer;
use crate::store::{Store, StoreError};

/// How long a burst of store changes is allowed to settle before snapshots are rendered.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// The least time between two certificates issued on one stream.
pub const CERTIFICATE_INTERVAL: Duration = Duration::from_secs(1);

/// State shared by both services.
pub struct ControlPlane {
    pub store: Arc<dyn Store>,
    pub tokens: Tokens,
    /// Set with `--sidecar-auth kubernetes`: sidecars present service-account tokens.
    pub reviewer: Option<TokenReviewer>,
    pub fleet: Fleet,
    /// Definitions sidecars saw that do not match their server's pins.
    pub drifts: Arc<crate::drift::Drifts>,
    /// Signs sidecars' workload certificates; `None`: none are issued.
    pub ca: Option<crate::workload::Ca>,
    /// Who may be a gateway, and the issuers gateways trust.
    gateways: Gateways,
    /// Tracing on: apply and push spans.
    pub traces: Option<crate::trace::Traces>,
    next_conn: AtomicU64,
    /// Flipped once on shutdown: every open stream ends with UNAVAILABLE so that the
    /// server's graceful shutdown is not held open by streams that never finish.
    stopping: watch::Sender<bool>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl ControlPlane {
    pub fn new(
        store: Arc<dyn Store>,
        tokens: Tokens,
        reviewer: Option<TokenReviewer>,
        fleet_expiry: Duration,
        ca: Option<crate::workload::Ca>,
        gateways: Gateways,
        traces: Option<crate::trace::Traces>,
    ) -> Arc<ControlPlane> {
        Arc::new(ControlPlane {
            store,
            tokens,
            reviewer,
            fleet: Fleet::new(fleet_expiry),
            drifts: Arc::default(),
            ca,
            gateways,
            traces,
            next_conn: AtomicU64::new(1),
            stopping: watch::channel(false).0,
        })
    }

    /// Ask every open snapshot stream to end; sidecars reconnect elsewhere or later.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Resolves once [`ControlPlane::stop`] has been called.
    pub async fn stopped(&self) {
        let mut rx = self.stopping.subscribe();
        // An error means the sender is gone, which only happens when `self` is.
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// The snapshot of `identity`: a sidecar's, or (`gateway`) a gateway's.
    fn render(&self, identity: &str, gateway: bool) -> Result<pb::Snapshot, Status> {
        let resources = self.store.resources();
        let rendered = if gateway {
            toolmesh_proto::render::render_gateway(&resources, identity).map(|mut snapshot| {
                snapshot.issuers.clone_from(&self.gateways.issuers);
                snapshot.version = toolmesh_proto::render::content_version(&snapshot);
                snapshot
            })
        } else {
            toolmesh_proto::render(&resources, identity)
        };
        rendered.map_err(|e| Status::internal(format!("rendering {identity}: {e}")))
    }

    /// Whether `identity` may receive gateway snapshots (every policy with a token
    /// subject, and the credentials of the servers they name).
    fn may_be_gateway(&self, identity: &str) -> bool {
        self.gateways
            .identities
            .iter()
            .any(|g| toolmesh_proto::glob::matches(g, identity))
    }
}

/// Gateways (`toolmesh-sidecar --mode gateway`): which identities may be one
/// (`--gateway-identity` globs), and the issuers their snapshots tell them to trust
/// (`--gateway-issuer`), besides their own `--issuer`s.
#[derive(Debug, Clone, Default)]
pub struct Gateways {
    pub identities: Vec<String>,
    pub issuers: Vec<String>,
}

/// The service types tonic serves; both wrap the same shared state.
#[derive(Debug, Clone)]
pub struct Snapshots(pub Arc<ControlPlane>);
#[derive(Debug, Clone)]
pub struct Admin(pub Arc<ControlPlane>);

type PushStream = Pin<Box<dyn Stream<Item = Result<pb::SnapshotPush, Status>> + Send>>;

#[tonic::async_trait]
impl SnapshotService for Snapshots {
    type StreamStream = PushStream;

    async fn stream(
        &self,
        request: Request<Streaming<pb::SidecarMessage>>,
    ) -> Result<Response<PushStream>, Status> {
        let identity = match &self.0.reviewer {
            Some(reviewer) => reviewer.identity(bearer(request.metadata())?).await?,
            None => self.0.tokens.sidecar(request.metadata())?,
        };
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(pb::SidecarMessage {
                kind: Some(Msg::Hello(h)),
            }) => h,
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        if hello.identity != identity {
            return Err(Status::permission_denied(format!(
                "this token is for identity {identity:?}, not {:?}",
                hello.identity
            )));
        }
        if hello.gateway && !self.0.may_be_gateway(&identity) {
            tracing::warn!(%identity, "refused a gateway snapshot to an identity --gateway-identity does not name");
            return Err(Status::permission_denied(format!(
                "identity {identity:?} may not receive gateway snapshots (the control plane's --gateway-identity does not name it)"
            )));
        }
        let node = if hello.node.is_empty() {
            "(unnamed)".to_owned()
        } else {
            hello.node.clone()
        };
        let conn = self.0.next_conn.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%identity, %node, version = %hello.version, gateway = hello.gateway, "sidecar connected");
        self.0.fleet.connect(&identity, &node, conn, hello.gateway);
        let mut changes = self.0.store.changes();
        let seen = *changes.borrow_and_update();
        let session = Session {
            changes,
            seen,
            push_span: None,
            cp: self.0.clone(),
            identity,
            node,
            conn,
            gateway: hello.gateway,
            // What the sidecar says it has is not believed (its state file may be
            // damaged, or older than it thinks): every connection gets a push.
            has: String::new(),
            pushes: 0,
            nonce: String::new(),
            pushed_at: None,
            render: true,
            last_certificate: None,
            servers: None,
            ended: None,
            inbound,
        };
        // The session is the response body's state: no task or channel per sidecar, and
        // when the sidecar goes away hyper drops the body and with it the session.
        let pushes = futures_util::stream::unfold(session, |mut session| async move {
            let push = session.next().await?;
            Some((push, session))
        });
        Ok(Response::new(Box::pin(pushes)))
    }
}

/// One sidecar's stream: what it has, the latest push's nonce, and its inbound half.
struct Session {
    cp: Arc<ControlPlane>,
    identity: String,
    node: String,
    conn: u64,
    /// A gateway's stream: it gets the gateway snapshot.
    gateway: bool,
    /// The version the sidecar has (or was last sent).
    has: String,
    pushes: u64,
    /// Nonce of the latest push: only an answer carrying it counts.
    nonce: String,
    /// When the latest push was sent, until its ACK (`toolmesh_cp_push_to_ack_seconds`).
    pushed_at: Option<tokio::time::Instant>,
    /// Whether to render before waiting again (at start and after a store change).
    render: bool,
    /// The store change this stream last rendered after.
    seen: u64,
    /// The servers of the snapshot last rendered for this identity (drift reports are
    /// taken only for those); `None` until one is.
    servers: Option<std::collections::BTreeSet<String>>,
    /// Tracing on: the latest push's span, until the sidecar answers it.
    push_span: Option<opentelemetry_sdk::trace::Span>,
    /// When the latest certificate request was answered (one a second at most).
    last_certificate: Option<tokio::time::Instant>,
    /// Why the stream ended, once it has; logged when the session is dropped.
    ended: Option<String>,
    changes: watch::Receiver<u64>,
    inbound: Streaming<pb::SidecarMessage>,
}

impl Session {
    /// The next message for the sidecar; `None` ends the stream.
    async fn next(&mut self) -> Option<Result<pb::SnapshotPush, Status>> {
        loop {
            if self.ended.is_some() {
                return None;
            }
            if std::mem::take(&mut self.render) {
                if let Some(push) = self.render() {
                    return Some(Ok(push));
                }
            }
            tokio::select! {
                () = self.cp.stopped() => {
                    self.ended = Some("control plane stopping".to_owned());
                    return Some(Err(Status::unavailable("control plane shutting down")));
                }
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        self.ended = Some("store closed".to_owned());
                        continue;
                    }
                    tokio::time::sleep(DEBOUNCE).await;
                    self.seen = *self.changes.borrow_and_update();
                    self.render = true;
                }
                message = self.inbound.message() => {
                    if let Some(push) = self.answer(message) {
                        return Some(Ok(push));
                    }
                }
            }
        }
    }

    /// Render this identity's snapshot; a push if its version moved and it can be
    /// delivered. Why it cannot is kept in the fleet entry, for `toolmeshctl status`.
    fn render(&mut self) -> Option<pb::SnapshotPush> {
        let undeliverable = |why: String| {
            tracing::error!(identity = %self.identity, node = %self.node, error = %why, "cannot deliver the snapshot");
            metrics::counter!("toolmesh_cp_undeliverable_snapshots_total").increment(1);
            self.cp
                .fleet
                .update(&self.identity, &self.node, self.conn, |s| {
                    s.delivery_error = why;
                });
        };
        let snapshot = match self.cp.render(&self.identity, self.gateway) {
            Ok(snapshot) => snapshot,
            Err(status) => {
                undeliverable(status.message().to_owned());
                return None;
            }
        };
        self.servers = Some(snapshot.servers.iter().map(|s| s.name.clone()).collect());
        if snapshot.version == self.has {
            return None;
        }
        let bytes = prost::Message::encoded_len(&snapshot);
        if bytes > toolmesh_proto::MAX_SNAPSHOT_BYTES {
            undeliverable(format!(
                "snapshot {} is {bytes} bytes, over the limit of {} bytes; the sidecar keeps its previous one",
                snapshot.version,
                toolmesh_proto::MAX_SNAPSHOT_BYTES
            ));
            return None;
        }
        self.pushes += 1;
        self.nonce = format!("{}-{}", self.conn, self.pushes);
        self.pushed_at = Some(tokio::time::Instant::now());
        self.has.clone_from(&snapshot.version);
        metrics::counter!("toolmesh_cp_snapshots_pushed_total").increment(1);
        if let Some(traces) = &self.cp.traces {
            let span = traces.push(self.seen, &self.identity, &self.node, &snapshot.version);
            if let Some(earlier) = self.push_span.replace(span) {
                crate::trace::answered(earlier, Some("superseded by a newer push".to_owned()));
            }
        }
        let version = &self.has;
        self.cp
            .fleet
            .update(&self.identity, &self.node, self.conn, |s| {
                s.sent_version.clone_from(version);
                s.delivery_error.clear();
            });
        Some(pb::SnapshotPush {
            snapshot: Some(snapshot),
            nonce: self.nonce.clone(),
            certificate: None,
        })
    }

    /// Answer a certificate request: a certificate for the stream's identity, or why not.
    fn certify(&mut self, csr: &[u8]) -> pb::SnapshotPush {
        let refused = |error: String| {
            // Ca::sign counts its own answers; these never reach it.
            metrics::counter!("toolmesh_cp_workload_certificates_total", "result" => "refused")
                .increment(1);
            pb::WorkloadCertificate {
                error,
                ..Default::default()
            }
        };
        let now = tokio::time::Instant::now();
        let certificate = match &self.cp.ca {
            _ if self
                .last_certificate
                .is_some_and(|at| now.duration_since(at) < CERTIFICATE_INTERVAL) =>
            {
                refused(format!(
                    "one certificate request per {CERTIFICATE_INTERVAL:?} per stream; retry later"
                ))
            }
            None => refused(
                "this control plane issues no workload certificates: start it with --workload-ca-cert and --workload-ca-key (or --tls-secret)".to_owned(),
            ),
            Some(ca) => {
                let issued = ca.sign(&self.identity, csr);
                if issued.error.is_empty() {
                    let expires = std::time::SystemTime::now() + ca.ttl();
                    let at = expires
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    self.cp
                        .fleet
                        .update(&self.identity, &self.node, self.conn, |s| {
                            s.certificate_expires = at;
                        });
                }
                issued
            }
        };
        self.last_certificate = Some(now);
        pb::SnapshotPush {
            snapshot: None,
            nonce: String::new(),
            certificate: Some(certificate),
        }
    }

    /// Take in a drift report: only for a server this identity's snapshot holds.
    fn drifted(&mut self, drift: pb::Drift) {
        let (server, name) = (drift.server.clone(), drift.name.clone());
        let Some(servers) = &self.servers else {
            tracing::debug!(identity = %self.identity, %server, "drift report before any snapshot was rendered; not taken");
            return;
        };
        let resources = self.cp.store.resources();
        match self
            .cp
            .drifts
            .report(&self.identity, servers, &resources, drift)
        {
            Ok(true) => tracing::warn!(
                identity = %self.identity,
                %server,
                name = %name.chars().take(200).collect::<String>(),
                "a sidecar saw a definition that does not match the server's pins"
            ),
            Ok(false) => {}
            Err(why) => {
                tracing::debug!(identity = %self.identity, %server, %why, "drift report not taken")
            }
        }
    }

    /// Take in an ACK or NACK (ignoring stale ones), or note why the stream ended; a
    /// certificate request is answered with the push returned.
    fn answer(
        &mut self,
        message: Result<Option<pb::SidecarMessage>, Status>,
    ) -> Option<pb::SnapshotPush> {
        if let Ok(Some(pb::SidecarMessage {
            kind: Some(Msg::CertificateRequest(request)),
        })) = &message
        {
            return Some(self.certify(&request.csr));
        }
        if let Ok(Some(pb::SidecarMessage {
            kind: Some(Msg::Drift(drift)),
        })) = message
        {
            self.drifted(drift);
            return None;
        }
        let (identity, node) = (&self.identity, &self.node);
        match message {
            Ok(Some(pb::SidecarMessage {
                kind: Some(Msg::Ack(ack)),
            })) if ack.nonce == self.nonce => {
                // The latest push is taken: an earlier refusal is no longer a problem.
                if let Some(at) = self.pushed_at.take() {
                    metrics::histogram!(crate::fleet::PUSH_TO_ACK)
                        .record(at.elapsed().as_secs_f64());
                }
                if let Some(span) = self.push_span.take() {
                    crate::trace::answered(span, None);
                }
                self.cp.fleet.update(identity, node, self.conn, |s| {
                    s.acked_version = ack.version;
                    s.nacked_version.clear();
                    s.nack_reason.clear();
                });
            }
            Ok(Some(pb::SidecarMessage {
                kind: Some(Msg::Nack(nack)),
            })) if nack.nonce == self.nonce => {
                tracing::warn!(%identity, %node, version = %nack.version, reason = %nack.reason, "sidecar refused a snapshot");
                metrics::counter!("toolmesh_cp_nacks_total").increment(1);
                if let Some(span) = self.push_span.take() {
                    crate::trace::nacked(span, &nack.reason);
                }
                self.cp.fleet.update(identity, node, self.conn, |s| {
                    s.nacked_version = nack.version;
                    s.nack_reason = nack.reason;
                });
            }
            // A stale ACK/NACK (older nonce) or a repeated Hello: nothing to do.
            Ok(Some(_)) => {}
            Ok(None) => self.ended = Some("sidecar closed the stream".to_owned()),
            Err(e) => self.ended = Some(format!("stream error: {}", e.message())),
        }
        None
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let reason = self.ended.as_deref().unwrap_or("response stream dropped");
        tracing::info!(identity = %self.identity, node = %self.node, %reason, "sidecar disconnected");
        if let Some(span) = self.push_span.take() {
            crate::trace::answered(span, Some(format!("no answer: {reason}")));
        }
        self.cp
            .fleet
            .disconnect(&self.identity, &self.node, self.conn);
    }
}

/// A status page token: the (identity, node) the page ended at, as JSON in base64url.
fn page_token(key: &(String, String)) -> String {
    use base64::Engine as _;
    let json = serde_json::to_vec(&[&key.0, &key.1]).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

fn page_key(token: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()?;
    let [identity, node]: [String; 2] = serde_json::from_slice(&json).ok()?;
    Some((identity, node))
}

fn kind_of(text: &str) -> Result<Kind, Status> {
    Kind::from_name(text).ok_or_else(|| {
        let known: Vec<String> = Kind::ALL
            .iter()
            .map(|k| format!("{k} ({})", k.names().join(", ")))
            .collect();
        Status::invalid_argument(format!(
            "unknown kind {text:?}; known kinds: {}",
            known.join("; ")
        ))
    })
}

/// A resource as the admin API shows it: Secret values redacted.
fn shown(resource: &Resource) -> String {
    let mut v = serde_json::to_value(resource).unwrap_or_default();
    if let Some(data) = v.get_mut("data").and_then(|d| d.as_object_mut()) {
        for value in data.values_mut() {
            *value = toolmesh_proto::render::REDACTED.into();
        }
    }
    v.to_string()
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn apply(
        &self,
        request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        self.0.tokens.admin(request.metadata())?;
        let yaml = std::str::from_utf8(&request.get_ref().yaml).map_err(|e| {
            Status::invalid_argument(format!(
                "the YAML is not UTF-8 (byte {}): resource files must be UTF-8",
                e.valid_up_to()
            ))
        })?;
        let resources = toolmesh_proto::parse_resources(yaml)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let traced = self
            .0
            .traces
            .as_ref()
            .map(|t| (t, t.apply_started(resources.len())));
        let applied = self.0.store.apply(resources);
        if let Some((traces, span)) = traced {
            let generation = *self.0.store.changes().borrow();
            let error = applied.as_ref().err().map(ToString::to_string);
            traces.apply_ended(span, generation, error);
        }
        let results = applied.map_err(|e| e.status())?;
        for line in &results {
            tracing::info!(result = %line, "applied");
        }
        Ok(Response::new(pb::ApplyResponse { results }))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        self.0.tokens.admin(request.metadata())?;
        let req = request.get_ref();
        let kind = kind_of(&req.kind)?;
        let set = self.0.store.resources();
        let all: Vec<Resource> = match kind {
            Kind::McpServer => set
                .servers
                .values()
                .cloned()
                .map(Resource::McpServer)
                .collect(),
            Kind::AccessPolicy => set
                .policies
                .values()
                .cloned()
                .map(Resource::AccessPolicy)
                .collect(),
            Kind::Secret => set
                .secrets
                .values()
                .cloned()
                .map(Resource::Secret)
                .collect(),
        };
        let picked: Vec<String> = all
            .iter()
            .filter(|r| req.name.is_empty() || r.name() == req.name)
            .map(shown)
            .collect();
        if !req.name.is_empty() && picked.is_empty() {
            return Err(Status::not_found(format!("{kind}/{} not found", req.name)));
        }
        Ok(Response::new(pb::GetResponse { resources: picked }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        self.0.tokens.admin(request.metadata())?;
        let req = request.get_ref();
        let kind = kind_of(&req.kind)?;
        self.0.store.delete(kind, &req.name).map_err(|e| match e {
            // The set is fine; it is what would remain that is not (a reference).
            StoreError::Invalid(why) => Status::failed_precondition(why),
            e => e.status(),
        })?;
        tracing::info!(resource = %format!("{kind}/{}", req.name), "deleted");
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.0.tokens.admin(request.metadata())?;
        let req = request.get_ref();
        let query = Query {
            identity: req.identity.clone(),
            disconnected_only: req.disconnected,
            limit: if req.limit == 0 {
                MAX_PAGE
            } else {
                req.limit as usize
            },
            after: match req.page_token.as_str() {
                "" => None,
                token => Some(page_key(token).ok_or_else(|| {
                    Status::invalid_argument("page_token is not one this control plane made")
                })?),
            },
        };
        let page = self.0.fleet.page(&query);
        Ok(Response::new(pb::StatusResponse {
            sidecars: page.sidecars,
            next_page_token: page.next.map(|k| page_token(&k)).unwrap_or_default(),
            total: page.total as u64,
        }))
    }

    async fn drifts(
        &self,
        request: Request<pb::DriftsRequest>,
    ) -> Result<Response<pb::DriftsResponse>, Status> {
        self.0.tokens.admin(request.metadata())?;
        let resources = self.0.store.resources();
        let drifts = self.0.drifts.list(&resources, &request.get_ref().server);
        Ok(Response::new(pb::DriftsResponse { drifts }))
    }
}
