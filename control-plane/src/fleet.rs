//! The sidecars the control plane knows: who is connected, what was sent, what was
//! acknowledged or refused. Feeds `toolmeshctl status` and the metrics.
//!
//! Entries are kept after a sidecar disconnects (its last known state is useful when
//! asking "who NACKed"); they are not persisted across control-plane restarts.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use toolmesh_proto::v1alpha1::SidecarStatus;

/// One entry per (identity, node); a reconnecting sidecar takes its entry over.
#[derive(Debug, Default)]
pub struct Fleet {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The status and the connection that owns the entry.
    sidecars: BTreeMap<(String, String), (u64, SidecarStatus)>,
    connected: usize,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl Fleet {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connection `conn` of (identity, node) is up and has `version`.
    pub fn connect(&self, identity: &str, node: &str, conn: u64, version: &str) {
        let mut inner = self.lock();
        let (owner, status) = inner
            .sidecars
            .entry((identity.to_owned(), node.to_owned()))
            .or_insert_with(|| {
                let status = SidecarStatus {
                    identity: identity.to_owned(),
                    node: node.to_owned(),
                    ..Default::default()
                };
                (conn, status)
            });
        *owner = conn;
        let was = std::mem::replace(&mut status.connected, true);
        version.clone_into(&mut status.acked_version);
        status.last_seen = now();
        if !was {
            inner.connected += 1;
        }
        gauge(inner.connected);
    }

    /// Connection `conn` ended; ignored if a newer connection took the entry over.
    pub fn disconnect(&self, identity: &str, node: &str, conn: u64) {
        let mut inner = self.lock();
        let key = (identity.to_owned(), node.to_owned());
        if let Some((owner, status)) = inner.sidecars.get_mut(&key)
            && *owner == conn
            && std::mem::replace(&mut status.connected, false)
        {
            inner.connected -= 1;
            gauge(inner.connected);
        }
    }

    /// Change the entry of (identity, node) if connection `conn` still owns it.
    pub fn update(
        &self,
        identity: &str,
        node: &str,
        conn: u64,
        f: impl FnOnce(&mut SidecarStatus),
    ) {
        let mut inner = self.lock();
        let key = (identity.to_owned(), node.to_owned());
        if let Some((owner, status)) = inner.sidecars.get_mut(&key)
            && *owner == conn
        {
            f(status);
            status.last_seen = now();
        }
    }

    pub fn list(&self) -> Vec<SidecarStatus> {
        self.lock()
            .sidecars
            .values()
            .map(|(_, s)| s.clone())
            .collect()
    }
}

fn gauge(connected: usize) {
    metrics::gauge!("toolmesh_cp_connected_sidecars").set(connected as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_disconnect_does_not_hide_the_reconnected_sidecar() {
        let fleet = Fleet::default();
        fleet.connect("ns/a", "pod", 1, "v1");
        fleet.connect("ns/a", "pod", 2, "v1");
        fleet.disconnect("ns/a", "pod", 1);
        fleet.update("ns/a", "pod", 1, |s| s.acked_version = "stale".into());
        let list = fleet.list();
        assert_eq!(list.len(), 1);
        assert!(list[0].connected);
        assert_eq!(list[0].acked_version, "v1");
        assert_eq!(fleet.lock().connected, 1);
        fleet.disconnect("ns/a", "pod", 2);
        assert!(!fleet.list()[0].connected);
        assert_eq!(fleet.lock().connected, 0);
    }
}
