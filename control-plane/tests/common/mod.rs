//! What the control plane's integration tests share (each test crate uses a part).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// The `kubernetes-validate` that `make deps` installs into the test venv.
pub fn kubernetes_validate() -> PathBuf {
    let tool = workspace_root().join(".cache/venv/bin/kubernetes-validate");
    assert!(
        tool.exists(),
        "{} is missing: run `make deps`",
        tool.display()
    );
    tool
}
