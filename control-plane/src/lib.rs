//! toolmesh-control-plane: holds the resources and streams each identity its snapshot.
//!
//! - [`store`]: the [`store::Store`] trait and the embedded file-backed store.
//! - [`service`]: the gRPC snapshot stream (sidecars) and admin API (toolmeshctl).
//! - [`auth`]: bootstrap tokens per identity, the admin token.
//! - [`fleet`]: which sidecar runs which version, who refused what.
//! - [`trace`]: apply and push spans (OpenTelemetry, when tracing is on).
//! - [`kubernetes`]: the CRD store, TokenReview identity, the Lease, status writes and
//!   the self-managed CA, for running inside a cluster.
//! - [`inject`]: sidecar injection (the mutating admission webhook's logic).
//! - [`webhook`]: the webhook's HTTPS listener (`POST /inject`).
//! - [`serve`]: wiring it together, plus the admin HTTP port.
//! - [`check`]: offline validation of resource files, with the sidecar's own code.

pub mod auth;
pub use toolmesh_proto::certs;
pub mod conn;
pub mod drift;
pub mod fleet;
pub mod inject;
pub mod kubernetes;
pub mod serve;
pub mod service;
pub mod store;
pub mod trace;
pub mod webhook;
pub mod workload;

use std::path::Path;

use toolmesh_proto::render::redacted;
use toolmesh_proto::resource::ResourceSet;

/// Read and validate `files` as one resource set; with `identity`, render its snapshot.
/// Returns the text to print (the redacted snapshot as JSON, or a summary).
pub fn check(files: &[impl AsRef<Path>], identity: Option<&str>) -> Result<String, String> {
    let paths: Vec<std::path::PathBuf> = files.iter().map(|f| f.as_ref().to_path_buf()).collect();
    let resources = serve::parse_sources(&serve::read_sources(&paths)?)?;
    let count = resources.len();
    let set = ResourceSet::new(resources).map_err(|e| e.to_string())?;
    match identity {
        Some(identity) => {
            let snapshot = toolmesh_proto::render(&set, identity).map_err(|e| e.to_string())?;
            serde_json::to_string_pretty(&redacted(&snapshot)).map_err(|e| e.to_string())
        }
        None => {
            toolmesh_proto::resource::validate_set(&set).map_err(|e| e.to_string())?;
            Ok(format!(
                "ok: {count} resources ({} McpServer, {} AccessPolicy, {} Secret)",
                set.servers.len(),
                set.policies.len(),
                set.secrets.len()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/resources/demo.yaml")
    }

    #[test]
    fn the_shipped_example_is_valid_and_renders_redacted() {
        let summary = check(&[example()], None).expect("example validates");
        assert!(
            summary.starts_with("ok: 4 resources (2 McpServer"),
            "{summary}"
        );
        let snapshot = check(&[example()], Some("agents/demo")).expect("renders");
        assert!(snapshot.contains("\"name\": \"demo\"") && snapshot.contains("<redacted>"));
        assert!(snapshot.contains("\"name\": \"calc\""), "{snapshot}");
        assert!(!snapshot.contains("not-a-real-token"), "{snapshot}");
    }

    #[test]
    fn a_bad_file_names_the_file_and_field() {
        let path =
            std::env::temp_dir().join(format!("toolmesh-cp-check-{}.yaml", std::process::id()));
        let text = std::fs::read_to_string(example()).expect("read example");
        std::fs::write(&path, text.replace("timeout: 30s", "timeout: soon")).expect("write");
        let err = check(&[&path], None).expect_err("invalid");
        assert!(
            err.contains("McpServer/demo") && err.contains("spec.timeout"),
            "{err}"
        );
        std::fs::remove_file(&path).ok();
    }
}
