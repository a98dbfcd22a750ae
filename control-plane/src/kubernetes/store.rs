//! The CRD store: resources are Kubernetes objects, watched in one namespace.
//!
//! Three kube-rs reflectors (watch caches) follow the `McpServer` and `AccessPolicy`
//! objects and the `Secret`s of the namespace. After any change (debounced by
//! [`crate::service::DEBOUNCE`]) the whole set is rebuilt with the same parsing and
//! validation as YAML resources, and readers get it through the [`Store`] trait, exactly
//! as from the embedded store. Every replica does this on its own from the shared API
//! server state; nothing here writes to the API server (status writes are
//! [`super::status`]'s, on the Lease holder).
//!
//! The API server has already accepted every object, so a bad one cannot be refused
//! here the way `toolmeshctl apply` refuses it; instead each object gets a verdict (its
//! `Ready` condition) and the set keeps only what can be served safely:
//! - an object that fails validation keeps serving its last valid version, if this
//!   process saw one, else it is left out;
//! - an `McpServer` whose credential Secret or key is missing (or not UTF-8 text) is
//!   left out: it would be reached without its credential;
//! - an `McpServer` whose prefix on `/mcp` or server-side identity another one (earlier
//!   by name) already has is left out (`Conflict`): a set with both could not be served;
//! - an `AccessPolicy` rule naming an `McpServer` that is not served is dropped from the
//!   copy served (it could match no call anyway); the policy's other rules apply.
//!
//! Only Secrets that a served `McpServer` names are read into the set.
//!
//! Not here: writing status, or deciding which identity sees what (rendering).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret as KubeSecret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::runtime::reflector::{self, Store as Cache};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::{Notify, watch};
use toolmesh_proto::API_VERSION;
use toolmesh_proto::crd::{AccessPolicyObject, McpServerObject};
use toolmesh_proto::resource::{Kind, Resource, ResourceSet, Secret, parse_document, validate_set};

use crate::store::{Store, StoreError};

/// What the control plane makes of one object: its `Ready` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub kind: Kind,
    pub name: String,
    /// The object's `metadata.generation` this verdict is about.
    pub generation: Option<i64>,
    pub ready: bool,
    /// `Accepted`, `Invalid`, `SecretMissing`, `Conflict`, `ServerMissing`.
    pub reason: &'static str,
    pub message: String,
}

/// The last valid version of each object this process has seen.
type LastGood = HashMap<(Kind, String), Resource>;

/// The set to serve and the verdicts, from the objects as they are now.
pub fn build(
    servers: &[Arc<McpServerObject>],
    policies: &[Arc<AccessPolicyObject>],
    secrets: &[Arc<KubeSecret>],
    last_good: &mut LastGood,
) -> (ResourceSet, Vec<Verdict>) {
    let mut verdicts = Vec::new();
    let mut present = BTreeSet::new();
    // The object read as a YAML resource would be: its verdict, and what to serve.
    let mut parsed = |kind: Kind, meta: &ObjectMeta, spec: serde_json::Value| {
        let name = meta.name.clone().unwrap_or_default();
        present.insert((kind, name.clone()));
        let doc = json!({"apiVersion": API_VERSION, "kind": kind.as_str(), "metadata": {"name": name}, "spec": spec});
        let key = (kind, name.clone());
        let (resource, ready, reason, message) = match parse_document(0, doc) {
            Ok(r) => {
                last_good.insert(key, r.clone());
                (Some(r), true, "Accepted", String::new())
            }
            Err(e) => match last_good.get(&key) {
                Some(old) => (
                    Some(old.clone()),
                    false,
                    "Invalid",
                    format!("{e}; the previous valid version is still served"),
                ),
                None => (None, false, "Invalid", format!("{e}; not served")),
            },
        };
        verdicts.push(Verdict {
            kind,
            name,
            generation: meta.generation,
            ready,
            reason,
            message,
        });
        resource
    };
    let mut set = ResourceSet::default();
    for s in servers {
        let spec = serde_json::to_value(&s.spec).unwrap_or_default();
        if let Some(Resource::McpServer(r)) = parsed(Kind::McpServer, &s.metadata, spec) {
            set.servers.insert(r.metadata.name.clone(), r);
        }
    }
    for p in policies {
        let spec = serde_json::to_value(&p.spec).unwrap_or_default();
        if let Some(Resource::AccessPolicy(r)) = parsed(Kind::AccessPolicy, &p.metadata, spec) {
            set.policies.insert(r.metadata.name.clone(), r);
        }
    }
    // Objects gone from the cluster are gone for good.
    last_good.retain(|key, _| present.contains(key));

    // Credentials: servers whose Secret cannot supply the value are not served.
    let by_name: HashMap<String, &KubeSecret> = secrets
        .iter()
        .map(|s| (kube::ResourceExt::name_any(s.as_ref()), s.as_ref()))
        .collect();
    let mut unserved = Vec::new();
    for (name, server) in &set.servers {
        for (field, r) in server.spec.secret_refs() {
            let (secret, key) = (&r.name, &r.key);
            let value = by_name
                .get(secret)
                .ok_or_else(|| format!("Secret {secret:?} does not exist in this namespace"))
                .and_then(|s| {
                    s.data
                        .as_ref()
                        .and_then(|d| d.get(key))
                        .ok_or_else(|| format!("Secret {secret:?} has no key {key:?}"))
                })
                .and_then(|v| {
                    String::from_utf8(v.0.clone())
                        .map_err(|_| format!("Secret {secret:?} key {key:?} is not UTF-8 text"))
                });
            match value {
                Ok(value) => {
                    let entry = set.secrets.entry(secret.clone()).or_insert_with(|| Secret {
                        api_version: API_VERSION.to_owned(),
                        metadata: toolmesh_proto::resource::Metadata {
                            name: secret.clone(),
                            labels: BTreeMap::new(),
                            annotations: BTreeMap::new(),
                        },
                        data: BTreeMap::new(),
                    });
                    entry.data.insert(key.clone(), value);
                }
                Err(why) => unserved.push((name.clone(), format!("{field}: {why}"))),
            }
        }
    }
    for (name, why) in unserved {
        set.servers.remove(&name);
        if let Some(v) = verdicts
            .iter_mut()
            .find(|v| v.kind == Kind::McpServer && v.name == name)
        {
            v.ready = false;
            v.reason = "SecretMissing";
            v.message = format!("{why}; not served until it does");
        }
    }

    // What must be unique across servers (the names on the aggregated /mcp, a
    // server-side sidecar's identity): a server that takes what one earlier by name has
    // is not served, so the others still change as they should.
    let mut prefixes: HashMap<&str, &str> = HashMap::new();
    let mut identities: HashMap<&str, &str> = HashMap::new();
    let mut conflicts = Vec::new();
    for (name, server) in &set.servers {
        let prefix = server.spec.effective_prefix(name);
        if let Some(other) = prefixes.get(prefix) {
            let what = if prefix.is_empty() {
                format!(
                    "McpServer {other:?} is unprefixed too: /mcp can show only one server's names as they are"
                )
            } else {
                format!(
                    "McpServer {other:?} already uses the prefix {prefix:?}: their names would collide on /mcp"
                )
            };
            conflicts.push((name.clone(), format!("spec.prefix: {what}")));
            continue;
        }
        if let Some(mesh) = &server.spec.mesh {
            if let Some(other) = identities.get(mesh.identity.as_str()) {
                conflicts.push((
                    name.clone(),
                    format!(
                        "spec.mesh.identity: McpServer {other:?} already runs as {:?}: a server-side sidecar serves one server",
                        mesh.identity
                    ),
                ));
                continue;
            }
            identities.insert(&mesh.identity, name);
        }
        prefixes.insert(prefix, name);
    }
    for (name, why) in conflicts {
        set.servers.remove(&name);
        if let Some(v) = verdicts
            .iter_mut()
            .find(|v| v.kind == Kind::McpServer && v.name == name)
        {
            v.ready = false;
            v.reason = "Conflict";
            v.message = format!("{why}; not served until one of them changes");
        }
    }

    // Rules about servers that are not served match nothing: serve the policy without them.
    for (name, policy) in &mut set.policies {
        let mut dangling = Vec::new();
        let mut i = 0;
        policy.spec.rules.retain(|rule| {
            let keep = set.servers.contains_key(&rule.server);
            if !keep {
                dangling.push(format!("spec.rules[{i}] names McpServer {:?}", rule.server));
            }
            i += 1;
            keep
        });
        if dangling.is_empty() {
            continue;
        }
        if let Some(v) = verdicts
            .iter_mut()
            .find(|v| v.kind == Kind::AccessPolicy && v.name == *name)
            && v.ready
        {
            v.ready = false;
            v.reason = "ServerMissing";
            v.message = format!(
                "{}, which is not served (missing or not ready); those rules have no effect until it is, the others apply",
                dangling.join("; ")
            );
        }
    }
    (set, verdicts)
}

struct State {
    set: Arc<ResourceSet>,
    verdicts: Arc<Vec<Verdict>>,
}

/// The CRD store (see the module docs).
pub struct KubeStore {
    state: Mutex<State>,
    generation: watch::Sender<u64>,
    verdicts: watch::Sender<Arc<Vec<Verdict>>>,
    pub servers: Cache<McpServerObject>,
    pub policies: Cache<AccessPolicyObject>,
    secrets: Cache<KubeSecret>,
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore").finish_non_exhaustive()
    }
}

/// Keep a reflector's cache filled; every event (or error, retried with backoff) wakes
/// the rebuild.
fn follow<K>(api: Api<K>, changed: Arc<Notify>) -> Cache<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::warn!(%kind, error = %e, "watch failed; retrying");
            }
            changed.notify_one();
        }
    });
    reader
}

impl KubeStore {
    /// Start watching `namespace` and return once every cache has its first full list
    /// (so no sidecar is ever served an empty set just because the lists were slow).
    pub async fn start(client: kube::Client, namespace: &str) -> Result<Arc<KubeStore>, String> {
        let changed = Arc::new(Notify::new());
        let store = Arc::new(KubeStore {
            state: Mutex::new(State {
                set: Arc::new(ResourceSet::default()),
                verdicts: Arc::default(),
            }),
            generation: watch::channel(0).0,
            verdicts: watch::channel(Arc::default()).0,
            servers: follow(Api::namespaced(client.clone(), namespace), changed.clone()),
            policies: follow(Api::namespaced(client.clone(), namespace), changed.clone()),
            secrets: follow(Api::namespaced(client, namespace), changed.clone()),
        });
        let ready = async {
            store.servers.wait_until_ready().await?;
            store.policies.wait_until_ready().await?;
            store.secrets.wait_until_ready().await
        };
        ready
            .await
            .map_err(|e| format!("watching namespace {namespace}: {e}"))?;
        let mut last_good = LastGood::new();
        store.rebuild(&mut last_good);
        tokio::spawn({
            let store = Arc::downgrade(&store);
            async move {
                loop {
                    changed.notified().await;
                    tokio::time::sleep(crate::service::DEBOUNCE).await;
                    let Some(store) = store.upgrade() else { return };
                    store.rebuild(&mut last_good);
                }
            }
        });
        Ok(store)
    }

    fn rebuild(&self, last_good: &mut LastGood) {
        let (set, verdicts) = build(
            &self.servers.state(),
            &self.policies.state(),
            &self.secrets.state(),
            last_good,
        );
        if let Err(e) = validate_set(&set) {
            // `build` leaves no dangling reference; if it ever did, keep what serves.
            tracing::error!(error = %e, "rebuilt resource set is invalid; keeping the previous one");
            return;
        }
        let verdicts = Arc::new(verdicts);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let moved = !same(&state.set, &set);
        if moved {
            state.set = Arc::new(set);
            tracing::info!(
                servers = state.set.servers.len(),
                policies = state.set.policies.len(),
                "resources changed"
            );
        }
        if *state.verdicts != *verdicts {
            state.verdicts = verdicts.clone();
            self.verdicts.send_replace(verdicts);
        }
        drop(state);
        if moved {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// The latest verdicts, for the status writer.
    pub fn verdicts(&self) -> watch::Receiver<Arc<Vec<Verdict>>> {
        self.verdicts.subscribe()
    }
}

fn same(a: &ResourceSet, b: &ResourceSet) -> bool {
    a.servers == b.servers && a.policies == b.policies && a.secrets == b.secrets
}

impl Store for KubeStore {
    fn resources(&self) -> Arc<ResourceSet> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set
            .clone()
    }

    fn apply(&self, _: Vec<Resource>) -> Result<Vec<String>, StoreError> {
        Err(StoreError::ReadOnly(READ_ONLY))
    }

    fn delete(&self, _: Kind, _: &str) -> Result<(), StoreError> {
        Err(StoreError::ReadOnly(READ_ONLY))
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

const READ_ONLY: &str = "this control plane reads its resources from Kubernetes (--store kubernetes): change them with kubectl apply/delete, credentials are Kubernetes Secrets";

#[cfg(test)]
mod tests;
