//! The sidecars the control plane knows: who is connected, what was sent, what was
//! acknowledged or refused. Feeds `toolmeshctl status` and the metrics.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use toolmesh_proto::v1alpha1::SidecarStatus;

/// One entry per (identity, node); a reconnecting sidecar takes its entry over.
#[derive(Debug, Default)]
pub struct Fleet {
    sidecars: Mutex<BTreeMap<(String, String), SidecarStatus>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl Fleet {
    pub fn update(&self, identity: &str, node: &str, f: impl FnOnce(&mut SidecarStatus)) {
        let mut map = self.sidecars.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map
            .entry((identity.to_owned(), node.to_owned()))
            .or_insert_with(|| SidecarStatus {
                identity: identity.to_owned(),
                node: node.to_owned(),
                ..Default::default()
            });
        f(entry);
        entry.last_seen = now();
        let connected = map.values().filter(|s| s.connected).count();
        metrics::gauge!("toolmesh_cp_connected_sidecars").set(connected as f64);
    }

    pub fn list(&self) -> Vec<SidecarStatus> {
        let map = self.sidecars.lock().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }
}
