//! Writes each `McpServer` / `AccessPolicy` object's `Ready` condition, and for an
//! `McpServer` with pins its `Pinned` condition (Lease holder only).
//!
//! The verdicts come from [`super::store`]; an object's status is patched (merge patch
//! on the `status` subresource) only when what it says differs from the verdict, judged
//! against the object as the watch cache has it, so a steady cluster sees no writes and
//! a new leader does not rewrite what its predecessor wrote. `lastTransitionTime` moves
//! only when `status` flips. Failed writes are retried at the next change or resync.
//!
//! `Pinned` is `True` (reason `Matching`) while no sidecar has reported a definition
//! that differs from the server's current pins, `False` (reason `Drifted`) naming them
//! otherwise ([`crate::drift`]); a server without pins has no `Pinned` condition.
//!
//! Not here: deciding the verdicts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::core::object::HasStatus;
use kube::runtime::reflector::{ObjectRef, Store as Cache};
use serde_json::json;
use tokio::sync::watch;
use toolmesh_proto::crd::{AccessPolicyObject, Condition, McpServerObject, ResourceStatus};
use toolmesh_proto::resource::Kind;

use super::store::{KubeStore, Verdict};
use crate::drift::Drifts;

/// How often the holder re-checks every status even when nothing changed.
pub const RESYNC: Duration = Duration::from_secs(60);

/// The status a verdict (and, for a server with pins, what is reported against them:
/// `Some(None)` nothing, `Some(Some(message))` drifts) asks for, given the object's
/// current one; `None` when it already says that.
pub fn wanted(
    verdict: &Verdict,
    pinned: Option<Option<&str>>,
    current: Option<&ResourceStatus>,
) -> Option<ResourceStatus> {
    let mut conditions = vec![condition(
        current,
        "Ready",
        verdict.ready,
        verdict.reason,
        &verdict.message,
    )];
    if let Some(drift) = pinned {
        conditions.push(match drift {
            None => condition(current, "Pinned", true, "Matching", ""),
            Some(message) => condition(current, "Pinned", false, "Drifted", message),
        });
    }
    let same = current.is_some_and(|c| {
        c.observed_generation == verdict.generation
            && c.conditions.len() == conditions.len()
            && c.conditions.iter().zip(&conditions).all(|(a, b)| {
                (&a.type_, &a.status, &a.reason, &a.message)
                    == (&b.type_, &b.status, &b.reason, &b.message)
            })
    });
    (!same).then_some(ResourceStatus {
        observed_generation: verdict.generation,
        conditions,
    })
}

/// A condition of `type_`, keeping its transition time from `current` while its status
/// is the same.
fn condition(
    current: Option<&ResourceStatus>,
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let old = current.and_then(|s| s.conditions.iter().find(|c| c.type_ == type_));
    let since = match old {
        Some(old) if old.status == status => old.last_transition_time.clone(),
        _ => None,
    };
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Some(since.unwrap_or_else(|| super::now().to_string())),
    }
}

/// Patch the statuses that differ; returns how many were written.
pub async fn sync(
    client: &kube::Client,
    namespace: &str,
    store: &KubeStore,
    verdicts: &[Verdict],
    pinned: &BTreeMap<String, Option<String>>,
) -> usize {
    let mut written = 0;
    for v in verdicts {
        let result = match v.kind {
            Kind::McpServer => {
                let pins = pinned.get(&v.name).map(Option::as_deref);
                write::<McpServerObject>(client, namespace, &store.servers, v, pins).await
            }
            Kind::AccessPolicy => {
                write::<AccessPolicyObject>(client, namespace, &store.policies, v, None).await
            }
            Kind::Secret => Ok(false),
        };
        match result {
            Ok(true) => written += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(kind = %v.kind, name = %v.name, error = %e, "status not written")
            }
        }
    }
    written
}

async fn write<K>(
    client: &kube::Client,
    namespace: &str,
    cache: &Cache<K>,
    verdict: &Verdict,
    pinned: Option<Option<&str>>,
) -> Result<bool, kube::Error>
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + HasStatus<Status = ResourceStatus>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    let object = cache.get(&ObjectRef::new(&verdict.name).within(namespace));
    let Some(status) = wanted(
        verdict,
        pinned,
        object.as_deref().and_then(HasStatus::status),
    ) else {
        return Ok(false);
    };
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.patch_status(
        &verdict.name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await?;
    Ok(true)
}

/// While leading, keep every status equal to its verdict.
pub async fn run(
    client: kube::Client,
    namespace: String,
    store: Arc<KubeStore>,
    drifts: Arc<Drifts>,
    mut leading: watch::Receiver<bool>,
) {
    let mut verdicts = store.verdicts();
    let mut reported = drifts.changes();
    loop {
        if *leading.borrow_and_update() {
            let current = verdicts.borrow_and_update().clone();
            reported.borrow_and_update();
            let pinned = drifts.by_server(&crate::store::Store::resources(store.as_ref()));
            let n = sync(&client, &namespace, &store, &current, &pinned).await;
            if n > 0 {
                tracing::info!(written = n, "resource status updated");
            }
        }
        tokio::select! {
            changed = verdicts.changed() => if changed.is_err() { return },
            changed = reported.changed() => if changed.is_err() { return },
            changed = leading.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(RESYNC) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::mock::{ApiServer, Call, Cluster};
    use serde_json::{Value, json};

    fn verdict(ready: bool, reason: &'static str, generation: i64) -> Verdict {
        Verdict {
            kind: Kind::McpServer,
            name: "github".into(),
            generation: Some(generation),
            ready,
            reason,
            message: if ready {
                String::new()
            } else {
                "spec.credential.secretRef: gone".into()
            },
        }
    }

    #[test]
    fn status_moves_only_when_the_verdict_does_and_keeps_its_transition_time() {
        let first = wanted(&verdict(true, "Accepted", 1), None, None).expect("no status yet");
        assert_eq!(first.observed_generation, Some(1));
        assert_eq!(first.conditions[0].status, "True");
        let t0 = first.conditions[0].last_transition_time.clone();
        assert!(t0.as_deref().is_some_and(|t| t.ends_with('Z')), "{t0:?}");
        assert_eq!(
            wanted(&verdict(true, "Accepted", 1), None, Some(&first)),
            None,
            "unchanged"
        );

        let regen =
            wanted(&verdict(true, "Accepted", 2), None, Some(&first)).expect("new generation");
        assert_eq!(
            regen.conditions[0].last_transition_time, t0,
            "still True: same transition"
        );
        let broken =
            wanted(&verdict(false, "SecretMissing", 2), None, Some(&regen)).expect("flipped");
        assert_eq!(broken.conditions[0].status, "False");
        assert_eq!(broken.conditions[0].reason, "SecretMissing");
    }

    #[test]
    fn a_server_with_pins_says_whether_anything_drifted() {
        let v = verdict(true, "Accepted", 1);
        let matching = wanted(&v, Some(None), None).expect("no status yet");
        let pinned = &matching.conditions[1];
        assert_eq!(
            (
                pinned.type_.as_str(),
                pinned.status.as_str(),
                pinned.reason.as_str()
            ),
            ("Pinned", "True", "Matching")
        );
        assert_eq!(wanted(&v, Some(None), Some(&matching)), None);
        let message = "1 definition(s) differ from the pins: tool echo drifted (description)";
        let drifted = wanted(&v, Some(Some(message)), Some(&matching)).expect("flipped");
        assert_eq!(
            drifted.conditions[0], matching.conditions[0],
            "Ready untouched"
        );
        assert_eq!(
            (
                drifted.conditions[1].status.as_str(),
                drifted.conditions[1].reason.as_str()
            ),
            ("False", "Drifted")
        );
        assert_eq!(drifted.conditions[1].message, message);
        // Pins removed: the condition goes.
        assert_eq!(
            wanted(&v, None, Some(&drifted)).map(|s| s.conditions.len()),
            Some(1)
        );
    }

    fn server_object(status: Option<Value>) -> Value {
        let mut object = json!({
            "apiVersion": "toolmesh.dev/v1alpha1", "kind": "McpServer",
            "metadata": {"name": "github", "namespace": "toolmesh-system", "generation": 4, "resourceVersion": "7"},
            "spec": {"endpoints": [{"url": "https://mcp.example.com/mcp"}], "credential": {"header": "X-Key", "secretRef": {"name": "gh", "key": "token"}}},
        });
        if let Some(status) = status {
            object["status"] = status;
        }
        object
    }

    #[tokio::test]
    async fn the_leader_patches_only_statuses_that_differ() {
        let cluster = Cluster::default();
        cluster.put("mcpservers", vec![server_object(None)]);
        cluster.put("accesspolicies", vec![]);
        cluster.put("secrets", vec![]);
        let api = ApiServer::new({
            let cluster = cluster.clone();
            move |call: &Call| cluster.answer(call)
        });
        let client = api.client();
        let store = KubeStore::start(client.clone(), "toolmesh-system")
            .await
            .expect("synced");
        let verdicts = store.verdicts().borrow().clone();
        assert_eq!(
            sync(
                &client,
                "toolmesh-system",
                &store,
                &verdicts,
                &BTreeMap::new()
            )
            .await,
            1
        );
        let patches: Vec<Call> = api
            .calls()
            .into_iter()
            .filter(|c| c.method == "PATCH")
            .collect();
        assert_eq!(patches.len(), 1, "{patches:#?}");
        let patch = &patches[0];
        assert_eq!(
            patch.path.split('?').next(),
            Some("/apis/toolmesh.dev/v1alpha1/namespaces/toolmesh-system/mcpservers/github/status")
        );
        assert_eq!(patch.content_type, "application/merge-patch+json");
        let condition = &patch.body["status"]["conditions"][0];
        assert_eq!(patch.body["status"]["observedGeneration"], 4);
        assert_eq!(
            (condition["type"].as_str(), condition["status"].as_str()),
            (Some("Ready"), Some("False"))
        );
        assert_eq!(condition["reason"], "SecretMissing");
        assert!(
            condition["message"]
                .as_str()
                .is_some_and(|m| m.contains("\"gh\"")),
            "{condition}"
        );

        // Once the object carries that status, nothing more is written.
        let written = patch.body["status"].clone();
        cluster
            .send(
                "mcpservers",
                json!({"type": "MODIFIED", "object": server_object(Some(written))}),
            )
            .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while store
            .servers
            .state()
            .first()
            .is_none_or(|s| s.status.is_none())
        {
            assert!(tokio::time::Instant::now() < deadline, "status never seen");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            sync(
                &client,
                "toolmesh-system",
                &store,
                &verdicts,
                &BTreeMap::new()
            )
            .await,
            0
        );
        assert_eq!(
            api.calls().iter().filter(|c| c.method == "PATCH").count(),
            1
        );
    }
}
