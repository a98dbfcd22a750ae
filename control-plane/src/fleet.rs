//! The sidecars the control plane knows: who is connected, what was sent, what was
//! acknowledged or refused, and what could not be delivered. Feeds `toolmeshctl
//! status` and the metrics.
//!
//! Entries are kept after a sidecar disconnects (its last known state is useful when
//! asking "who NACKed"), for `--fleet-expiry`; then they are forgotten, so pod churn
//! leaves a bounded fleet. `toolmesh_cp_connected_sidecars` counts live connections.
//! Entries are not persisted across control-plane restarts. Listing is paged and
//! filtered, so an answer stays bounded however large the fleet.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use toolmesh_proto::glob;
use toolmesh_proto::v1alpha1::SidecarStatus;

/// How long a disconnected sidecar's entry is kept by default.
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(3600);
/// The most entries one status page holds.
pub const MAX_PAGE: usize = 1000;

/// Seconds from a snapshot push to its ACK (histogram).
pub const PUSH_TO_ACK: &str = "toolmesh_cp_push_to_ack_seconds";
/// Its buckets: from 1 ms to a minute.
pub const PUSH_TO_ACK_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Where a fleet entry stands, as the `state` label of `toolmesh_cp_sidecars`:
/// `acked` (has the latest push), `pending` (connected, not yet answered it),
/// `nacked` (refused it), `disconnected`.
const STATES: [&str; 4] = ["acked", "pending", "nacked", "disconnected"];

fn state(s: &SidecarStatus) -> usize {
    if !s.connected {
        3
    } else if !s.nack_reason.is_empty() && s.nacked_version == s.sent_version {
        2
    } else if !s.sent_version.is_empty() && s.acked_version == s.sent_version {
        0
    } else {
        1
    }
}

/// One entry per (identity, node); a reconnecting sidecar takes its entry over.
#[derive(Debug)]
pub struct Fleet {
    inner: Mutex<Inner>,
    expiry: Duration,
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet::new(DEFAULT_EXPIRY)
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// The status and the connection that owns the entry.
    sidecars: BTreeMap<(String, String), (u64, SidecarStatus)>,
    connected: usize,
    /// Entries per [`State`], kept in step with every change.
    states: [usize; STATES.len()],
    /// When disconnected entries were last swept (Unix seconds).
    swept: u64,
}

/// Which entries a status page holds.
#[derive(Debug, Default, Clone)]
pub struct Query {
    /// A glob on the identity; empty matches all.
    pub identity: String,
    pub disconnected_only: bool,
    pub limit: usize,
    /// The page starts after this (identity, node).
    pub after: Option<(String, String)>,
}

/// One page of entries.
#[derive(Debug, Default)]
pub struct Page {
    pub sidecars: Vec<SidecarStatus>,
    /// The key of the last entry, when more entries match.
    pub next: Option<(String, String)>,
    pub total: usize,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

impl Fleet {
    pub fn new(expiry: Duration) -> Fleet {
        let fleet = Fleet {
            inner: Mutex::new(Inner::default()),
            expiry,
        };
        fleet.lock().publish();
        fleet
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connection `conn` of (identity, node) is up. What it already had is not
    /// believed: the control plane pushes its snapshot once per connection.
    pub fn connect(&self, identity: &str, node: &str, conn: u64, gateway: bool) {
        let mut inner = self.lock();
        inner.sweep(self.expiry, now());
        let key = (identity.to_owned(), node.to_owned());
        let before = inner.sidecars.get(&key).map(|(_, s)| state(s));
        let (owner, status) = inner.sidecars.entry(key).or_insert_with(|| {
            let status = SidecarStatus {
                identity: identity.to_owned(),
                node: node.to_owned(),
                ..Default::default()
            };
            (conn, status)
        });
        *owner = conn;
        status.gateway = gateway;
        let was = std::mem::replace(&mut status.connected, true);
        status.acked_version.clear();
        status.last_seen = now();
        let after = state(status);
        if !was {
            inner.connected += 1;
        }
        inner.moved(before, Some(after));
        gauge(inner.connected);
    }

    /// Connection `conn` ended; ignored if a newer connection took the entry over.
    pub fn disconnect(&self, identity: &str, node: &str, conn: u64) {
        let mut inner = self.lock();
        let key = (identity.to_owned(), node.to_owned());
        if let Some((owner, status)) = inner.sidecars.get_mut(&key)
            && *owner == conn
            && status.connected
        {
            let before = state(status);
            status.connected = false;
            status.last_seen = now();
            let after = state(status);
            inner.connected -= 1;
            inner.moved(Some(before), Some(after));
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
            let before = state(status);
            f(status);
            status.last_seen = now();
            let after = state(status);
            inner.moved(Some(before), Some(after));
        }
    }

    /// The entries `query` selects, a page at a time, in (identity, node) order.
    pub fn page(&self, query: &Query) -> Page {
        let mut inner = self.lock();
        inner.sweep(self.expiry, now());
        let limit = query.limit.clamp(1, MAX_PAGE);
        let selected = |status: &SidecarStatus| {
            (query.identity.is_empty() || glob::matches(&query.identity, &status.identity))
                && (!query.disconnected_only || !status.connected)
        };
        let mut page = Page::default();
        // The key of the page's last entry, and whether a selected entry follows it.
        let (mut last, mut more) = (None, false);
        for (key, (_, status)) in &inner.sidecars {
            if !selected(status) {
                continue;
            }
            page.total += 1;
            if query.after.as_ref().is_some_and(|after| key <= after) {
                continue;
            }
            if page.sidecars.len() < limit {
                page.sidecars.push(status.clone());
                last = Some(key);
            } else {
                more = true;
            }
        }
        page.next = last.filter(|_| more).cloned();
        page
    }

    /// Every entry (tests and small fleets).
    pub fn list(&self) -> Vec<SidecarStatus> {
        self.lock()
            .sidecars
            .values()
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// How many entries there are, connected or not.
    pub fn len(&self) -> usize {
        self.lock().sidecars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    /// Forget entries disconnected for longer than `expiry` (at most once a second).
    fn sweep(&mut self, expiry: Duration, now: u64) {
        if now == self.swept {
            return;
        }
        self.swept = now;
        let cutoff = now.saturating_sub(expiry.as_secs());
        let before = self.sidecars.len();
        self.sidecars
            .retain(|_, (_, s)| s.connected || s.last_seen > cutoff);
        if self.sidecars.len() != before {
            // Only disconnected entries go.
            self.states[3] -= before - self.sidecars.len();
            self.publish();
        }
    }

    /// An entry went from state `before` to `after` (`None`: absent).
    fn moved(&mut self, before: Option<usize>, after: Option<usize>) {
        if before == after {
            return;
        }
        if let Some(b) = before {
            self.states[b] -= 1;
        }
        if let Some(a) = after {
            self.states[a] += 1;
        }
        self.publish();
    }

    /// `toolmesh_cp_sidecars{state}`, every state (zeros too).
    fn publish(&self) {
        for (name, count) in STATES.iter().zip(self.states) {
            metrics::gauge!("toolmesh_cp_sidecars", "state" => *name).set(count as f64);
        }
    }
}

fn gauge(connected: usize) {
    metrics::gauge!("toolmesh_cp_connected_sidecars").set(connected as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_counted_by_state_as_they_move() {
        let fleet = Fleet::new(Duration::from_secs(0));
        let states = |f: &Fleet| f.lock().states;
        fleet.connect("ns/a", "pod-a", 1, false);
        fleet.connect("ns/b", "pod-b", 2, false);
        assert_eq!(states(&fleet), [0, 2, 0, 0], "connected, nothing sent yet");
        fleet.update("ns/a", "pod-a", 1, |s| s.sent_version = "v1".into());
        fleet.update("ns/a", "pod-a", 1, |s| s.acked_version = "v1".into());
        fleet.update("ns/b", "pod-b", 2, |s| {
            s.sent_version = "v1".into();
            s.nacked_version = "v1".into();
            s.nack_reason = "bad".into();
        });
        assert_eq!(states(&fleet), [1, 0, 1, 0]);
        fleet.update("ns/a", "pod-a", 1, |s| s.sent_version = "v2".into());
        assert_eq!(states(&fleet), [0, 1, 1, 0], "a new push is pending");
        fleet.disconnect("ns/b", "pod-b", 2);
        assert_eq!(states(&fleet), [0, 1, 0, 1]);
        // Reconnected: the version it refused is still the one it is sent.
        fleet.connect("ns/b", "pod-b", 3, false);
        assert_eq!(states(&fleet), [0, 1, 1, 0]);
        fleet.update("ns/b", "pod-b", 3, |s| {
            s.acked_version = "v1".into();
            s.nack_reason.clear();
        });
        assert_eq!(states(&fleet), [1, 1, 0, 0]);
        fleet.disconnect("ns/a", "pod-a", 1);
        std::thread::sleep(Duration::from_millis(1100));
        // Expiry 0: the disconnected entry is swept at the next look.
        assert_eq!(
            fleet
                .page(&Query {
                    limit: 10,
                    ..Default::default()
                })
                .total,
            1
        );
        assert_eq!(states(&fleet), [1, 0, 0, 0]);
    }

    #[test]
    fn a_late_disconnect_does_not_hide_the_reconnected_sidecar() {
        let fleet = Fleet::default();
        fleet.connect("ns/a", "pod", 1, false);
        fleet.update("ns/a", "pod", 1, |s| s.acked_version = "v1".into());
        fleet.connect("ns/a", "pod", 2, false);
        fleet.update("ns/a", "pod", 2, |s| s.acked_version = "v1".into());
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

    #[test]
    fn ten_thousand_pod_lifetimes_leave_a_bounded_fleet() {
        let fleet = Fleet::new(Duration::from_secs(60));
        for pod in 0..10_000u64 {
            let node = format!("pod-{pod}");
            fleet.connect("ns/agent", &node, pod, false);
            fleet.disconnect("ns/agent", &node, pod);
        }
        fleet.connect("ns/agent", "alive", 20_000, false);
        assert_eq!(fleet.lock().connected, 1);
        // Expiry is judged on the clock: pretend an hour passed.
        let mut inner = fleet.lock();
        let later = now() + 3600;
        inner.swept = 0;
        inner.sweep(Duration::from_secs(60), later);
        assert_eq!(inner.sidecars.len(), 1, "only the connected one is left");
    }

    #[test]
    fn pages_and_filters() {
        let fleet = Fleet::default();
        for i in 0..25u64 {
            let identity = if i % 2 == 0 { "team-a/x" } else { "team-b/y" };
            fleet.connect(identity, &format!("pod-{i:02}"), i, false);
            if i % 5 == 0 {
                fleet.disconnect(identity, &format!("pod-{i:02}"), i);
            }
        }
        let mut query = Query {
            limit: 10,
            ..Default::default()
        };
        let mut seen = Vec::new();
        loop {
            let page = fleet.page(&query);
            assert_eq!(page.total, 25);
            assert!(page.sidecars.len() <= 10);
            seen.extend(page.sidecars.iter().map(|s| s.node.clone()));
            match page.next {
                Some(next) => query.after = Some(next),
                None => break,
            }
        }
        assert_eq!(seen.len(), 25, "every entry once: {seen:?}");
        let a = fleet.page(&Query {
            identity: "team-a/*".into(),
            limit: 100,
            ..Default::default()
        });
        assert_eq!((a.total, a.sidecars.len()), (13, 13));
        assert!(a.next.is_none());
        let gone = fleet.page(&Query {
            disconnected_only: true,
            limit: 100,
            ..Default::default()
        });
        assert_eq!(gone.total, 5);
        assert!(gone.sidecars.iter().all(|s| !s.connected));
        // An exact page: no next token when nothing follows.
        let ten = fleet.page(&Query {
            identity: "team-b/*".into(),
            limit: 12,
            ..Default::default()
        });
        assert_eq!((ten.total, ten.sidecars.len()), (12, 12));
        assert!(ten.next.is_none());
    }
}
