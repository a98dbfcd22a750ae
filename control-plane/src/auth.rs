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
//! Hello must match. In a cluster, sidecars present service-account tokens instead
//! ([`crate::kubernetes::identity`]); the admin token still comes from here.

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

/// The token of an `authorization: Bearer <token>` header.
pub fn bearer(metadata: &MetadataMap) -> Result<&str, Status> {
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
        // One token, one holder: a shared token would make the identity ambiguous.
        let mut holders: BTreeMap<&str, &str> = BTreeMap::new();
        holders.insert(&file.admin, "admin");
        for (identity, token) in &file.sidecars {
            if let Some(other) = holders.insert(token, identity) {
                problems.push(format!(
                    "sidecars.{identity}: the same token as {other}; every holder needs its own"
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

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Tokens, String> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("toolmesh-tokens-{}-{n}.yaml", std::process::id()));
        std::fs::write(&path, text).expect("write");
        let tokens = Tokens::load(&path);
        std::fs::remove_file(&path).ok();
        tokens
    }

    fn bearing(token: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii"),
        );
        m
    }

    #[test]
    fn the_quickstart_tokens_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/tokens.yaml");
        let tokens = Tokens::load(&path).expect("example tokens");
        assert_eq!(
            tokens
                .sidecar(&bearing("quickstart-sidecar-token-change-me"))
                .expect("known"),
            "agents/demo"
        );
        assert!(format!("{tokens:?}").contains("agents/demo"));
        assert!(
            !format!("{tokens:?}").contains("change-me"),
            "tokens are never printed"
        );
    }

    #[test]
    fn a_token_stands_for_one_identity_and_the_admin_token_only_for_admin() {
        let tokens = load(
            "admin: admin-token-0123456789\nsidecars:\n  a/one: token-one-0123456789\n  b/two: token-two-0123456789\n",
        )
        .expect("valid");
        assert_eq!(
            tokens
                .sidecar(&bearing("token-one-0123456789"))
                .expect("one"),
            "a/one"
        );
        assert_eq!(
            tokens
                .sidecar(&bearing("token-two-0123456789"))
                .expect("two"),
            "b/two"
        );
        for wrong in ["token-one-012345678", "admin-token-0123456789", ""] {
            let err = tokens.sidecar(&bearing(wrong)).expect_err(wrong);
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
        }
        assert!(tokens.sidecar(&MetadataMap::new()).is_err());
        assert!(tokens.admin(&bearing("admin-token-0123456789")).is_ok());
        assert!(tokens.admin(&bearing("token-one-0123456789")).is_err());
    }

    #[test]
    fn short_or_shared_tokens_are_refused_with_the_entry_named() {
        let err = load("admin: short\nsidecars:\n  a/one: also-short\n").expect_err("short");
        assert!(
            err.contains("admin:") && err.contains("sidecars.a/one"),
            "{err}"
        );
        let err = load(
            "admin: admin-token-0123456789\nsidecars:\n  a/one: shared-token-0123456789\n  b/two: shared-token-0123456789\n",
        ).expect_err("shared");
        assert!(
            err.contains("sidecars.b/two") && err.contains("a/one"),
            "{err}"
        );
        assert!(
            load("admin: admin-token-0123456789\nsidecars:\n  a/one: admin-token-0123456789\n")
                .is_err()
        );
        assert!(
            load("admin: admin-token-0123456789\nextra: 1\n").is_err(),
            "unknown fields are refused"
        );
    }
}
