//! Server-side mode: who is calling, and the runtime that decides for them.
//!
//! A server-side sidecar (`--mode server`) stands in front of one MCP server and
//! accepts only mutual TLS ([`crate::workload::Workload::server_config`]). The caller
//! is the identity its certificate names — never a header, never the address. Its
//! snapshot lists the servers it runs (`served`), each with every policy that has a
//! rule for it and those policies' subjects; for each caller, [`Callers`] compiles the
//! runtime of the policies whose subjects match that caller, routed to the local
//! server, and the request path then decides exactly as on the caller's own sidecar:
//! a second decision, audited here under the caller's name.
//!
//! Runtimes are compiled once per caller and snapshot version, not per request: the
//! request path reads a copy-on-write map (one atomic load); a new caller or a new
//! version takes a mutex to compile and publish, and the caller's rate limiters carry
//! over from its previous runtime.
//!
//! [`Exposure`] watches the other way around: a server that listens beyond loopback
//! (on the pod's IP, as many servers do by default) can be reached by agents without
//! passing this sidecar; while it does, the sidecar is not ready.
//!
//! This module does not terminate TLS ([`crate::listener`]) or relay ([`crate::proxy`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::error::ProxyError;
use crate::identity::Identity;
use crate::snapshot::{Active, Runtime};
use crate::workload::Workload;

/// Distinct callers kept compiled; beyond it a caller's runtime is compiled per request
/// (only identities holding a workload certificate get this far).
const MAX_CALLERS: usize = 10_000;

/// The per-caller runtimes of a server-side sidecar.
#[derive(Debug)]
pub struct Callers {
    active: Arc<Active>,
    workload: Arc<Workload>,
    /// The local server's URL (`--upstream`, or the stdio bridge's).
    local: String,
    compiled: ArcSwap<HashMap<String, Arc<Runtime>>>,
    /// Serializes compiling; readers never take it.
    writer: Mutex<()>,
}

impl Callers {
    pub fn new(active: Arc<Active>, workload: Arc<Workload>, local: String) -> Callers {
        Callers {
            active,
            workload,
            local,
            compiled: ArcSwap::default(),
            writer: Mutex::new(()),
        }
    }

    /// The caller a TLS peer's verified certificate chain names, if any: read from the
    /// certificate once per connection, then remembered.
    pub fn identify(&self, peer: Option<&crate::listener::PeerTls>) -> Option<Identity> {
        let peer = peer?;
        peer.identity
            .get_or_init(|| {
                self.workload
                    .peer_identity(&peer.certificates)
                    .map(|id| Identity::new(&id))
            })
            .clone()
    }

    /// The runtime deciding for `caller` under the active snapshot.
    pub fn runtime_for(&self, caller: &Identity) -> Result<Arc<Runtime>, ProxyError> {
        let base = self.active.current().ok_or(ProxyError::NotReady)?;
        if let Some(runtime) = self.compiled.load().get(caller.as_str())
            && runtime.version == base.version
        {
            return Ok(runtime.clone());
        }
        let _writing = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let map = self.compiled.load_full();
        let previous = map.get(caller.as_str());
        if let Some(runtime) = previous
            && runtime.version == base.version
        {
            return Ok(runtime.clone());
        }
        // A server-side sidecar serves one server (validation keeps mesh identities
        // unique); none means the snapshot does not (yet) say this identity runs one.
        let served = base.served.first().ok_or_else(|| {
            ProxyError::Misconfigured(format!(
                "this server-side sidecar runs as {:?}, and no McpServer names it in spec.mesh.identity",
                base.identity
            ))
        })?;
        let runtime = base
            .for_caller(
                served,
                caller.as_str(),
                &self.local,
                previous.map(|r| r.as_ref()),
            )
            .map(Arc::new)
            .map_err(|reason| {
                ProxyError::Misconfigured(format!("compiling the rules for {caller:?}: {reason}"))
            })?;
        if map.len() < MAX_CALLERS || map.contains_key(caller.as_str()) {
            // Other callers' older runtimes stay until they call again: their rate
            // limiters carry over then.
            let mut next = (*map).clone();
            next.insert(caller.as_str().to_owned(), runtime.clone());
            self.compiled.store(Arc::new(next));
        }
        Ok(runtime)
    }
}

/// How often [`Exposure::watch`] knocks on the pod's IP.
pub const EXPOSURE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether the server behind `--upstream` also answers on the pod's IP.
#[derive(Debug, Default)]
pub struct Exposure {
    /// `Some(address)` while the server answers there.
    exposed: std::sync::Mutex<Option<std::net::SocketAddr>>,
}

impl Exposure {
    /// Where the server answers beyond loopback, if it does (for `/ready`).
    pub fn exposed(&self) -> Option<std::net::SocketAddr> {
        *self.exposed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Knock on `pod_ip` at the upstream's port now and every [`EXPOSURE_EVERY`].
    pub async fn watch(self: Arc<Self>, pod_ip: std::net::IpAddr, port: u16) {
        let target = std::net::SocketAddr::new(pod_ip, port);
        loop {
            let connect = tokio::net::TcpStream::connect(target);
            let answers = matches!(
                tokio::time::timeout(std::time::Duration::from_secs(2), connect).await,
                Ok(Ok(_))
            );
            let before = std::mem::replace(
                &mut *self.exposed.lock().unwrap_or_else(|p| p.into_inner()),
                answers.then_some(target),
            );
            crate::telemetry::upstream_exposed(answers);
            if answers && before.is_none() {
                tracing::error!(%target, "the MCP server also listens on the pod's IP: agents can reach it around this sidecar; make it listen on 127.0.0.1 only (not ready until it does)");
            } else if !answers && before.is_some() {
                tracing::info!(%target, "the MCP server no longer answers on the pod's IP");
            }
            tokio::time::sleep(EXPOSURE_EVERY).await;
        }
    }
}
