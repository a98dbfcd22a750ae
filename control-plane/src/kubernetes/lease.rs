//! One replica at a time: a `coordination.k8s.io/v1` Lease.
//!
//! Every replica serves sidecars and admission reviews; work that must happen once
//! (status writes, keeping the webhook's caBundle right) waits for [`Elector::leading`].
//! The usual protocol: create the Lease if it does not exist; renew it while we hold it;
//! take it over when its holder has let it lapse. Every write carries the
//! `resourceVersion` that was read, so two replicas racing for it cannot both win (the
//! loser gets 409 Conflict).
//!
//! Expiry is judged by this replica's own clock: a Lease whose record has not changed
//! for its `leaseDurationSeconds` since we first saw it is free, whatever its
//! `renewTime` says, so clock skew between nodes cannot cause two leaders. A holder that
//! cannot renew (API server unreachable) stops leading once its last renewal is older
//! than [`RENEW_DEADLINE`], before anyone else may take over. On shutdown the holder
//! clears `holderIdentity` so another replica takes over at its next try.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a Lease is valid after each renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// A holder that has not renewed for this long stops acting as leader.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// How often every replica tries: renew, or see whether the Lease is free.
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);

/// Takes part in the election for one Lease.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    holder: String,
    /// The other holder's record as last seen, and when it was first seen so.
    observed: Option<(String, Instant)>,
}

impl Elector {
    pub fn new(api: Api<Lease>, name: String, holder: String) -> Elector {
        Elector {
            api,
            name,
            holder,
            observed: None,
        }
    }

    /// Run the election until `stop` resolves; `leading` says whether we hold the Lease.
    pub async fn run(mut self, leading: watch::Sender<bool>, stop: impl Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        let mut renewed: Option<Instant> = None;
        loop {
            match self.try_once().await {
                Ok(true) => renewed = Some(Instant::now()),
                Ok(false) => renewed = None,
                Err(e) => tracing::warn!(lease = %self.name, error = %e, "Lease not renewed"),
            }
            let now_leading = renewed.is_some_and(|t| t.elapsed() < RENEW_DEADLINE);
            if leading.send_replace(now_leading) != now_leading {
                tracing::info!(lease = %self.name, holder = %self.holder, leading = now_leading, "leadership changed");
            }
            tokio::select! {
                () = tokio::time::sleep(RETRY_PERIOD) => {}
                () = &mut stop => break,
            }
        }
        if *leading.borrow() {
            leading.send_replace(false);
            if let Err(e) = self.release().await {
                tracing::warn!(lease = %self.name, error = %e, "Lease not released");
            }
        }
    }

    /// One round: true if we hold a freshly renewed Lease afterwards.
    pub async fn try_once(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(super::now());
        let seconds = i32::try_from(LEASE_DURATION.as_secs()).unwrap_or(15);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.holder.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return lost_race(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.as_deref().unwrap_or_default();
        let mine = holder == self.holder;
        if !mine && !holder.is_empty() {
            let record = lease.metadata.resource_version.clone().unwrap_or_default();
            let valid = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(LEASE_DURATION, Duration::from_secs);
            match &self.observed {
                Some((seen, since)) if *seen == record => {
                    if since.elapsed() < valid {
                        return Ok(false);
                    }
                    tracing::info!(lease = %self.name, previous = %holder, "Lease lapsed; taking it over");
                }
                _ => {
                    self.observed = Some((record, Instant::now()));
                    return Ok(false);
                }
            }
        }
        if !mine {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(self.holder.clone());
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(seconds);
        let result = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await;
        if result.is_ok() {
            self.observed = None;
        }
        lost_race(result)
    }

    /// Give the Lease up (only if we still hold it).
    async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.holder.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        lost_race(
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await,
        )
        .map(drop)
    }
}

/// A write that lost an optimistic-concurrency race (409) means someone else holds it.
fn lost_race(result: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::mock::{ApiServer, Call};
    use serde_json::{Value, json};
    use std::sync::{Arc, Mutex};

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/toolmesh-system/leases";

    /// An API server holding (at most) one Lease, with real resourceVersion checks.
    fn lease_server() -> (ApiServer, Arc<Mutex<Option<Value>>>) {
        let stored: Arc<Mutex<Option<Value>>> = Arc::default();
        let api = ApiServer::new({
            let stored = stored.clone();
            move |call: &Call| {
                let mut stored = stored.lock().expect("lock");
                let conflict = (
                    409,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
                );
                let version = |v: &Option<Value>| {
                    v.as_ref().map(|v| {
                        v["metadata"]["resourceVersion"]
                            .as_str()
                            .unwrap_or("0")
                            .to_owned()
                    })
                };
                match call.method.as_str() {
                    "GET" => match stored.clone() {
                        Some(lease) => (200, lease),
                        None => (
                            404,
                            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}),
                        ),
                    },
                    "POST" if stored.is_none() => {
                        let mut lease = call.body.clone();
                        lease["metadata"]["resourceVersion"] = json!("1");
                        *stored = Some(lease.clone());
                        (201, lease)
                    }
                    "POST" => conflict,
                    "PUT" => {
                        let sent = call.body["metadata"]["resourceVersion"]
                            .as_str()
                            .map(str::to_owned);
                        if sent != version(&stored) {
                            return conflict;
                        }
                        let next: u64 = sent.unwrap_or_default().parse().unwrap_or(0) + 1;
                        let mut lease = call.body.clone();
                        lease["metadata"]["resourceVersion"] = json!(next.to_string());
                        *stored = Some(lease.clone());
                        (200, lease)
                    }
                    _ => (405, json!({})),
                }
            }
        });
        (api, stored)
    }

    fn elector(api: &ApiServer, holder: &str) -> Elector {
        Elector::new(
            Api::namespaced(api.client(), "toolmesh-system"),
            "toolmesh-control-plane".into(),
            holder.into(),
        )
    }

    #[tokio::test]
    async fn the_first_replica_creates_the_lease_and_renews_it_the_second_waits() {
        let (api, stored) = lease_server();
        let mut a = elector(&api, "cp-a");
        let mut b = elector(&api, "cp-b");
        assert!(a.try_once().await.expect("a"), "nobody held it");
        assert!(!b.try_once().await.expect("b"), "a holds it");
        assert!(a.try_once().await.expect("a renews"));
        assert!(!b.try_once().await.expect("b"), "renewed: still a's");

        let lease = stored.lock().expect("lock").clone().expect("lease");
        assert_eq!(lease["spec"]["holderIdentity"], "cp-a");
        assert_eq!(lease["spec"]["leaseDurationSeconds"], 15);
        assert_eq!(lease["spec"]["leaseTransitions"], 0);

        let calls: Vec<(String, String)> = api
            .calls()
            .into_iter()
            .map(|c| {
                (
                    c.method,
                    c.path.split('?').next().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let one = format!("{PATH}/toolmesh-control-plane");
        assert_eq!(
            calls,
            [
                ("GET".to_owned(), one.clone()),
                ("POST".to_owned(), PATH.to_owned()),
                ("GET".to_owned(), one.clone()),
                ("GET".to_owned(), one.clone()),
                ("PUT".to_owned(), one.clone()),
                ("GET".to_owned(), one.clone()),
            ]
        );
        // The renewal carried the version it read, so a concurrent writer would get 409.
        let renewal = api
            .calls()
            .into_iter()
            .find(|c| c.method == "PUT")
            .expect("PUT");
        assert_eq!(renewal.body["metadata"]["resourceVersion"], "1");
    }

    #[tokio::test]
    async fn a_lapsed_lease_is_taken_over_a_race_has_one_winner_and_release_frees_it() {
        let (api, stored) = lease_server();
        let mut a = elector(&api, "cp-a");
        assert!(a.try_once().await.expect("a"));
        // a stops renewing. The record must stay unchanged for the lease duration (as
        // seen by b's clock) before b may take it; 1 s here.
        stored.lock().expect("lock").as_mut().expect("lease")["spec"]["leaseDurationSeconds"] =
            json!(1);
        let mut b = elector(&api, "cp-b");
        let mut c = elector(&api, "cp-c");
        assert!(!b.try_once().await.expect("b first look"));
        assert!(!c.try_once().await.expect("c first look"));
        assert!(!b.try_once().await.expect("b too early"));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(b.try_once().await.expect("b takes over"));
        assert!(
            !c.try_once().await.expect("c"),
            "the record moved: c starts waiting again"
        );
        let lease = stored.lock().expect("lock").clone().expect("lease");
        assert_eq!(lease["spec"]["holderIdentity"], "cp-b");
        assert_eq!(lease["spec"]["leaseTransitions"], 1);
        assert!(!a.try_once().await.expect("a comes back"), "a lost it");

        // Two replicas that read the same version: exactly one write wins.
        let before = api.calls().len();
        b.release().await.expect("release");
        assert!(
            stored.lock().expect("lock").as_ref().expect("lease")["spec"]["holderIdentity"]
                .is_null()
        );
        let (ra, rc) = tokio::join!(a.try_once(), c.try_once());
        assert_eq!(
            [ra.expect("a"), rc.expect("c")]
                .iter()
                .filter(|w| **w)
                .count(),
            1,
            "{:#?}",
            &api.calls()[before..]
        );
    }
}
