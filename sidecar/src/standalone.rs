//! Standalone mode: the configuration comes from a local YAML file instead of a
//! control plane.
//!
//! The file is read, parsed and rendered with the same code the control plane uses
//! ([`toolmesh_proto::render`]), so a file and a control plane holding the same
//! resources give the same snapshot. It is polled: a change of its bytes triggers a
//! reload. Polling (rather than inotify) follows editors that replace the file and
//! Kubernetes ConfigMap symlink swaps alike, and costs one small read per interval.
//!
//! A file that cannot be read, parsed, validated or compiled is rejected with one log
//! line naming the problem and a metric; the configuration already active keeps
//! serving. This module does not serve anything itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use toolmesh_proto::resource::ResourceSet;
use toolmesh_proto::v1alpha1 as pb;

use crate::snapshot::Active;
use crate::telemetry;

/// Read, validate and render the file at `path` for `identity`.
pub fn load(path: &Path, identity: &str) -> Result<pb::Snapshot, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    render(&text, identity, false)
}

/// Render for a sidecar `identity`, or (`gateway`) for a gateway running as it.
fn render(text: &str, identity: &str, gateway: bool) -> Result<pb::Snapshot, String> {
    let resources = toolmesh_proto::parse_resources(text).map_err(|e| e.to_string())?;
    let set = ResourceSet::new(resources).map_err(|e| e.to_string())?;
    let rendered = if gateway {
        toolmesh_proto::render::render_gateway(&set, identity)
    } else {
        toolmesh_proto::render(&set, identity)
    };
    rendered.map_err(|e| e.to_string())
}

/// Watches one file and keeps `active` in step with it.
#[derive(Debug)]
pub struct Watcher {
    path: PathBuf,
    identity: String,
    /// Gateway mode: render the gateway's snapshot (token policies) instead.
    gateway: bool,
    active: Arc<Active>,
    /// Hash of the bytes last looked at, valid or not: an unchanged bad file is
    /// reported once, not every interval.
    seen: Option<[u8; 32]>,
}

impl Watcher {
    pub fn new(path: PathBuf, identity: String, active: Arc<Active>) -> Self {
        Watcher {
            path,
            identity,
            gateway: false,
            active,
            seen: None,
        }
    }

    /// Render the gateway's snapshot from the file ([`toolmesh_proto::render::render_gateway`]).
    pub fn for_gateway(mut self) -> Self {
        self.gateway = true;
        self
    }

    /// Look at the file once; apply it if its bytes changed. Returns an error (already
    /// logged and counted) when the new content was rejected.
    pub fn check(&mut self) -> Result<(), String> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) => {
                // A missing file during an editor's rename dance is normal; report it
                // once per distinct state.
                let marker = [0u8; 32];
                if self.seen != Some(marker) {
                    self.seen = Some(marker);
                    return self.reject(format!("{}: {e}", self.path.display()));
                }
                return Ok(());
            }
        };
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if self.seen == Some(hash) {
            return Ok(());
        }
        self.seen = Some(hash);
        let result = std::str::from_utf8(&bytes)
            .map_err(|_| format!("{}: not UTF-8", self.path.display()))
            .and_then(|text| render(text, &self.identity, self.gateway))
            .and_then(|snapshot| {
                self.active
                    .apply(&snapshot)
                    .map(|changed| (snapshot, changed))
            });
        match result {
            Ok((snapshot, changed)) => {
                if changed {
                    tracing::info!(
                        version = %snapshot.version,
                        servers = snapshot.servers.len(),
                        policies = snapshot.policies.len(),
                        file = %self.path.display(),
                        "configuration loaded"
                    );
                }
                Ok(())
            }
            Err(problem) => self.reject(problem),
        }
    }

    fn reject(&self, problem: String) -> Result<(), String> {
        telemetry::config_rejected();
        if self.active.is_loaded() {
            tracing::error!(%problem, "configuration rejected; the previous one keeps serving");
        } else {
            tracing::error!(%problem, "configuration rejected; no configuration is loaded");
        }
        Err(problem)
    }

    /// Poll forever.
    pub async fn run(mut self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _ = self.check();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {name: demo}
spec:
  endpoints: [{url: "http://127.0.0.1:9/mcp"}]
  allowUnauthenticated: true
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {name: all}
spec:
  subjects: [{identity: "agents/*"}]
  rules: [{server: demo, tools: ["*"]}]
"#;

    #[test]
    fn good_then_bad_then_good_again() {
        let dir = std::env::temp_dir().join(format!("toolmesh-standalone-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("config.yaml");
        std::fs::write(&path, GOOD).expect("write");
        let active = Arc::new(Active::default());
        let mut w = Watcher::new(path.clone(), "agents/a".into(), active.clone());
        w.check().expect("good file loads");
        let v1 = active.current().expect("loaded").version.clone();

        std::fs::write(&path, GOOD.replace("endpoints", "endpointz")).expect("write");
        let err = w.check().expect_err("bad file is rejected");
        assert!(err.contains("endpointz"), "{err}");
        assert_eq!(active.current().expect("still loaded").version, v1);
        // The same bad bytes are not reported again.
        w.check().expect("unchanged file is not re-reported");

        std::fs::write(&path, GOOD.replace("9/mcp", "10/mcp")).expect("write");
        w.check().expect("fixed file loads");
        assert_ne!(active.current().expect("loaded").version, v1);
        std::fs::remove_dir_all(&dir).ok();
    }
}
