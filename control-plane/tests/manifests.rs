//! Every manifest in `deploy/kubernetes/` validated strictly (`kubernetes-validate
//! --strict`, installed by `make deps`) against the Kubernetes 1.33 and 1.37 schemas.
//! Kinds from other projects (cert-manager, the Prometheus Operator, kustomize) have no
//! schema there: they are allowed by exact apiVersion, so a typo in a core kind's
//! apiVersion (which the validator only warns about) fails here.

mod common;

use std::path::{Path, PathBuf};

/// apiVersions with no schema in kubernetes-validate, and why they are here.
const THIRD_PARTY: &[&str] = &[
    "kustomize.config.k8s.io/v1beta1", // kustomization.yaml
    "cert-manager.io/v1",              // deploy/kubernetes/cert-manager
    "monitoring.coreos.com/v1",        // deploy/kubernetes/monitoring
];

fn manifests(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("deploy/kubernetes").flatten() {
        let path = entry.path();
        if path.is_dir() {
            manifests(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
}

#[test]
fn every_manifest_is_valid_for_kubernetes_1_33_and_1_37() {
    let tool = common::kubernetes_validate();
    let mut files = Vec::new();
    manifests(
        &common::workspace_root().join("deploy/kubernetes"),
        &mut files,
    );
    files.sort();
    assert!(files.len() >= 10, "{files:?}");
    let mut validated = 0;
    for version in ["1.33.0", "1.37.0"] {
        let out = std::process::Command::new(&tool)
            .args(["--strict", "-k", version])
            .args(&files)
            .output()
            .expect("run kubernetes-validate");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "Kubernetes {version}:\n{text}");
        for line in text.lines() {
            if line.starts_with("INFO") && line.contains(" passed for resource ") {
                validated += 1;
            } else if let Some((_, rest)) = line.split_once("with api version ") {
                let api = rest.split_whitespace().next().unwrap_or_default();
                assert!(
                    THIRD_PARTY.contains(&api),
                    "no schema for {api}: a typo, or a new third-party kind to list:\n{line}"
                );
            } else {
                assert!(!line.starts_with("ERROR"), "{line}");
            }
        }
    }
    // Namespace, ServiceAccount, PVC, Deployment, Service, webhook; the example's three.
    assert!(
        validated >= 2 * 9,
        "only {validated} resources validated:\n{files:?}"
    );
}

#[test]
fn the_shipped_crds_are_what_the_types_generate() {
    let path = common::workspace_root().join("deploy/kubernetes/base/crds.yaml");
    let shipped = std::fs::read_to_string(&path).expect("crds.yaml");
    let generated = toolmesh_proto::crd::definitions_yaml().expect("generate");
    assert!(
        shipped == generated,
        "{} is stale: regenerate it with `toolmesh-control-plane crds > {}`",
        path.display(),
        path.display()
    );
    // Structural and served with a status subresource, as the control plane expects.
    for crd in toolmesh_proto::crd::definitions() {
        let version = &crd.spec.versions[0];
        assert_eq!(crd.spec.scope, "Namespaced");
        assert!(
            version
                .subresources
                .as_ref()
                .is_some_and(|s| s.status.is_some())
        );
        let schema = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("schema");
        assert_eq!(schema.type_.as_deref(), Some("object"));
        assert!(
            schema
                .properties
                .as_ref()
                .is_some_and(|p| p.contains_key("spec"))
        );
    }
}
