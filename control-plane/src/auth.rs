//! Who is calling: bootstrap tokens for sidecars (one per identity) and the admin
//! token for the platform team, read from a tokens file.
//!
//! ```yaml
//! admin: "a-long-random-string"
//! sidecars:
//!   agents/triage: "another-long-random-string"
//! ```
//!
//! Tokens arrive as `authorization: Bearer <token>` gRPC metadata and are compared in
//! constant time. A sidecar's identity comes from its token alone; what it claims in its
//! Hello must match. The Kubernetes service-account path plugs in here later.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use tonic::Status;
use tonic::metadata::MetadataMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    admin: String,
    #[serde(default)]
    sidecars: BTreeMap<String, String>,
}

/// The loaded tokens.
pub struct Tokens {
    admin: String,
    /// (token, identity)
    sidecars: Vec<(String, String)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a token.
        f.debug_struct("Tokens")
            .field(
                "sidecar_identities",
                &self.sidecars.iter().map(|(_, i)| i).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Shortest token accepted: guessing must not be practical.
const MIN_TOKEN: usize = 16;

fn equal(a: &[u8], b: &[u8]) -> bool {
    // Constant time in the contents (the length is not secret).
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn bearer(metadata: &MetadataMap) -> Result<&str, Status> {
    metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <token>`"))
}

impl Tokens {
    pub fn load(path: &Path) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--tokens {}: {e}", path.display()))?;
        let file: File = serde_saphyr::from_str(&text)
            .map_err(|e| format!("--tokens {}: {e}", path.display()))?;
        let mut problems = Vec::new();
        if file.admin.len() < MIN_TOKEN {
            problems.push(format!(
                "admin: token must be at least {MIN_TOKEN} characters"
            ));
        }
        for (identity, token) in &file.sidecars {
            if token.len() < MIN_TOKEN {
                problems.push(format!(
                    "sidecars.{identity}: token must be at least {MIN_TOKEN} characters"
                ));
            }
        }
        if !problems.is_empty() {
            return Err(format!(
                "--tokens {}: {}",
                path.display(),
                problems.join("; ")
            ));
        }
        Ok(Tokens {
            admin: file.admin,
            sidecars: file.sidecars.into_iter().map(|(i, t)| (t, i)).collect(),
        })
    }

    /// The identity a sidecar's token stands for.
    pub fn sidecar(&self, metadata: &MetadataMap) -> Result<String, Status> {
        let token = bearer(metadata)?;
        // Compare against every token so timing does not tell which one was close.
        let mut found = None;
        for (t, identity) in &self.sidecars {
            if equal(t.as_bytes(), token.as_bytes()) {
                found = Some(identity.clone());
            }
        }
        found.ok_or_else(|| Status::unauthenticated("unknown sidecar token"))
    }

    pub fn admin(&self, metadata: &MetadataMap) -> Result<(), Status> {
        if equal(self.admin.as_bytes(), bearer(metadata)?.as_bytes()) {
            Ok(())
        } else {
            Err(Status::unauthenticated("invalid admin token"))
        }
    }
}
