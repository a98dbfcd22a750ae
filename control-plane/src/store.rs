//! Where resources live: the [`Store`] trait, and the embedded file-backed store.
//!
//! Every write is validated as a whole set (each resource, then cross-references) with
//! the validation the sidecar uses; a write that would leave an invalid set changes
//! nothing. Readers get a consistent [`ResourceSet`] and a generation counter that
//! moves on every change, to know when to re-render snapshots.
//!
//! [`FileStore`] keeps the set in memory and in `<data-dir>/resources.json`, written to a
//! temporary file, synced and renamed over the old one, so a crash never leaves half a
//! file. Every write is also size-checked: a set that could render a snapshot over
//! [`toolmesh_proto::MAX_SNAPSHOT_BYTES`] is refused ([`StoreError::TooLarge`]). The
//! CRD store (`kubernetes/store.rs`) implements the same trait, read-only.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use toolmesh_proto::resource::{Kind, Resource, ResourceSet, parse_document, validate_set};

/// Why a store refused a write; each knows its gRPC answer ([`StoreError::status`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The resulting set would be invalid (a dangling reference, a bad field).
    #[error("{0}")]
    Invalid(String),
    /// The resulting set could render a snapshot larger than toolmesh delivers.
    #[error(
        "these resources could render a snapshot of {bytes} bytes (for an identity that every policy names), over the limit of {limit} bytes; split policies across identities or remove unused servers and rules"
    )]
    TooLarge { bytes: usize, limit: usize },
    #[error("{0} not found")]
    NotFound(String),
    /// This store is not written through the admin API.
    #[error("{0}")]
    ReadOnly(&'static str),
    /// The write could not be made durable; nothing changed.
    #[error("{0}")]
    Io(String),
}

impl StoreError {
    /// The gRPC answer: the caller's mistake, a precondition, or the server's fault.
    pub fn status(&self) -> tonic::Status {
        match self {
            StoreError::Invalid(_) | StoreError::TooLarge { .. } => {
                tonic::Status::invalid_argument(self.to_string())
            }
            StoreError::NotFound(_) => tonic::Status::not_found(self.to_string()),
            StoreError::ReadOnly(_) => tonic::Status::failed_precondition(self.to_string()),
            StoreError::Io(_) => tonic::Status::unavailable(self.to_string()),
        }
    }
}

/// What the rest of the control plane needs from a store.
pub trait Store: Send + Sync + 'static {
    /// The current resources: a shared, immutable set (cheap to take per render).
    fn resources(&self) -> Arc<ResourceSet>;
    /// Create or update resources, all or nothing; one result line per resource.
    fn apply(&self, resources: Vec<Resource>) -> Result<Vec<String>, StoreError>;
    /// Delete one resource; refused if the remaining set would be invalid.
    fn delete(&self, kind: Kind, name: &str) -> Result<(), StoreError>;
    /// A counter that changes whenever the resources do.
    fn changes(&self) -> watch::Receiver<u64>;
}

type Key = (Kind, String);

/// The embedded default: memory plus one JSON file.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    resources: Mutex<BTreeMap<Key, Resource>>,
    /// The same resources as a validated set, rebuilt once per write for readers.
    set: Mutex<Arc<ResourceSet>>,
    generation: watch::Sender<u64>,
}

fn set_of(map: &BTreeMap<Key, Resource>) -> Result<ResourceSet, String> {
    ResourceSet::new(map.values().cloned()).map_err(|e| e.to_string())
}

impl FileStore {
    /// Open (or create) the store in `dir`.
    pub fn open(dir: &Path) -> Result<FileStore, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("--data-dir {}: {e}", dir.display()))?;
        let path = dir.join("resources.json");
        let mut resources = BTreeMap::new();
        match std::fs::read(&path) {
            Ok(bytes) => {
                let docs: Vec<serde_json::Value> = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                for (i, doc) in docs.into_iter().enumerate() {
                    let r =
                        parse_document(i, doc).map_err(|e| format!("{}: {e}", path.display()))?;
                    resources.insert((r.kind(), r.name().to_owned()), r);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
        let set = Arc::new(set_of(&resources).map_err(|e| format!("{}: {e}", path.display()))?);
        Ok(FileStore {
            path,
            set: Mutex::new(set),
            resources: Mutex::new(resources),
            generation: watch::channel(0).0,
        })
    }

    fn persist(&self, map: &BTreeMap<Key, Resource>) -> Result<(), StoreError> {
        let docs: Vec<&Resource> = map.values().collect();
        let bytes = serde_json::to_vec_pretty(&docs).map_err(|e| StoreError::Io(e.to_string()))?;
        let tmp = self.path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            // Secrets live in this file: owner-only.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| StoreError::Io(format!("{}: {e}", self.path.display())))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, Resource>> {
        self.resources.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commit `next` if it is a valid set: persist, swap, signal.
    fn commit(
        &self,
        current: &mut BTreeMap<Key, Resource>,
        next: BTreeMap<Key, Resource>,
    ) -> Result<(), StoreError> {
        let set = set_of(&next).map_err(StoreError::Invalid)?;
        validate_set(&set).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let bytes = toolmesh_proto::render::largest_snapshot_bytes(&set);
        if bytes > toolmesh_proto::MAX_SNAPSHOT_BYTES {
            return Err(StoreError::TooLarge {
                bytes,
                limit: toolmesh_proto::MAX_SNAPSHOT_BYTES,
            });
        }
        self.persist(&next)?;
        *current = next;
        *self.set.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        self.generation.send_modify(|g| *g += 1);
        Ok(())
    }
}

impl Store for FileStore {
    fn resources(&self) -> Arc<ResourceSet> {
        self.set.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn apply(&self, resources: Vec<Resource>) -> Result<Vec<String>, StoreError> {
        let mut current = self.lock();
        let mut next = current.clone();
        let mut results = Vec::with_capacity(resources.len());
        for r in resources {
            let key = (r.kind(), r.name().to_owned());
            let verb = match next.get(&key) {
                None => "created",
                Some(old) if *old == r => "unchanged",
                Some(_) => "configured",
            };
            results.push(format!("{}/{} {verb}", key.0, key.1));
            next.insert(key, r);
        }
        if next != *current {
            self.commit(&mut current, next)?;
        }
        Ok(results)
    }

    fn delete(&self, kind: Kind, name: &str) -> Result<(), StoreError> {
        let mut current = self.lock();
        let mut next = current.clone();
        if next.remove(&(kind, name.to_owned())).is_none() {
            return Err(StoreError::NotFound(format!("{kind}/{name}")));
        }
        self.commit(&mut current, next)
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: &str = "apiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {name: s}\nspec:\n  endpoints: [{url: \"http://127.0.0.1:1/mcp\"}]\n  credential: {header: X-Key, secretRef: {name: k, key: v}}\n";
    const SECRET: &str =
        "apiVersion: toolmesh.dev/v1alpha1\nkind: Secret\nmetadata: {name: k}\ndata: {v: \"x\"}\n";

    fn parse(text: &str) -> Vec<Resource> {
        toolmesh_proto::parse_resources(text).expect("valid yaml")
    }

    #[test]
    fn writes_are_validated_persisted_and_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("toolmesh-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = FileStore::open(&dir).expect("open");
        let changes = store.changes();

        // A server whose secret does not exist: refused, nothing stored.
        let err = store
            .apply(parse(SERVER))
            .expect_err("dangling secret")
            .to_string();
        assert!(
            err.contains("McpServer/s") && err.contains("secretRef"),
            "{err}"
        );
        assert!(store.resources().servers.is_empty());

        let both = format!("{SERVER}---\n{SECRET}");
        assert_eq!(
            store.apply(parse(&both)).expect("valid"),
            ["McpServer/s created", "Secret/k created"]
        );
        assert_eq!(
            store.apply(parse(&both)).expect("again"),
            ["McpServer/s unchanged", "Secret/k unchanged"]
        );
        assert!(changes.has_changed().expect("open channel"));
        let mode = std::fs::metadata(dir.join("resources.json"))
            .expect("stored")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600,
            "secrets inside"
        );

        // Deleting the secret a server uses would break the set.
        assert!(store.delete(Kind::Secret, "k").is_err());
        assert!(store.delete(Kind::McpServer, "nope").is_err());

        let reopened = FileStore::open(&dir).expect("reopen");
        assert_eq!(reopened.resources().servers.len(), 1);
        reopened.delete(Kind::McpServer, "s").expect("delete");
        assert!(
            FileStore::open(&dir)
                .expect("reopen")
                .resources()
                .servers
                .is_empty()
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    /// 5,000 policies of 20 tools each (one team each, one shared server): what an
    /// apply, the size check and a render cost. Prints the numbers
    /// (`cargo test --release -p toolmesh-control-plane five_thousand -- --nocapture`).
    #[test]
    fn five_thousand_policies_of_twenty_tools() {
        use std::fmt::Write as _;
        let dir = std::env::temp_dir().join(format!("toolmesh-5k-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = FileStore::open(&dir).expect("open");
        let mut yaml = format!("{SERVER}---\n{SECRET}");
        for i in 0..5000 {
            let tools: Vec<String> = (0..20).map(|t| format!("\"tool_{t:02}_*\"")).collect();
            let _ = write!(
                yaml,
                "---\napiVersion: toolmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: team-{i}}}\nspec:\n  subjects: [{{identity: \"team-{i}/*\"}}]\n  rules: [{{server: s, tools: [{}]}}]\n",
                tools.join(", ")
            );
        }
        let started = std::time::Instant::now();
        let resources = parse(&yaml);
        let parsed = started.elapsed();
        let started = std::time::Instant::now();
        store.apply(resources).expect("applied");
        let applied = started.elapsed();
        let set = store.resources();
        let started = std::time::Instant::now();
        let largest = toolmesh_proto::render::largest_snapshot_bytes(&set);
        let sized = started.elapsed();
        let started = std::time::Instant::now();
        let one = toolmesh_proto::render(&set, "team-42/agent").expect("render");
        let rendered = started.elapsed();
        println!(
            "5,000 policies x 20 tools: {} KiB of YAML parsed in {parsed:?}, applied (validated, size-checked, persisted) in {applied:?}; largest snapshot {} KiB (checked in {sized:?}); one identity's snapshot {} bytes rendered in {rendered:?}",
            yaml.len() / 1024,
            largest / 1024,
            prost::Message::encoded_len(&one),
        );
        assert!(largest < toolmesh_proto::MAX_SNAPSHOT_BYTES);
        assert_eq!(one.policies.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
