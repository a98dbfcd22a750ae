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
    "gateway.networking.k8s.io/v1",    // deploy/kubernetes/gateway/httproute.yaml
    "toolmesh.dev/v1alpha1",           // ours: checked against crds.yaml below
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
    // CRDs (2), Namespace, ServiceAccount, RBAC (6), Deployment, PDB, Service, webhook;
    // the examples' Namespace, ServiceAccount, Deployment, Secret; the gateway's
    // ServiceAccount, Deployment, Service, PDB, HPA, Ingress.
    assert!(
        validated >= 2 * 24,
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

/// Run `crd_schema.py` (the CRDs' openAPIV3Schema, checked with jsonschema) on `files`.
fn check_against_crds(files: &[PathBuf]) -> (bool, String) {
    let root = common::workspace_root();
    let python = root.join(".cache/venv/bin/python");
    let out = std::process::Command::new(&python)
        .arg(root.join("control-plane/tests/crd_schema.py"))
        .arg(root.join("deploy/kubernetes/base/crds.yaml"))
        .args(files)
        .output()
        .expect("run crd_schema.py");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn example_resources_pass_the_crd_schemas_and_the_control_planes_validation() {
    let root = common::workspace_root();
    let example = root.join("deploy/kubernetes/examples/resources.yaml");
    let mesh = root.join("deploy/kubernetes/examples/mesh-server.yaml");
    let developers = root.join("deploy/kubernetes/examples/developers.yaml");
    let (ok, text) = check_against_crds(&[example.clone(), mesh.clone(), developers.clone()]);
    assert!(ok, "{text}");
    assert!(text.contains("6 checked, 0 failed"), "{text}");

    // The same objects pass the control plane's own validation (what `status` reports).
    let yaml = std::fs::read_to_string(&example).expect("example")
        + "\n---\n"
        + &std::fs::read_to_string(&mesh).expect("example")
        + "\n---\n"
        + &std::fs::read_to_string(&developers).expect("example");
    let mut ours = String::new();
    for doc in yaml.split("\n---\n") {
        if doc.contains("apiVersion: toolmesh.dev/") {
            ours.push_str("---\n");
            // The embedded store's YAML has no namespaces.
            ours.push_str(&doc.replace("  namespace: toolmesh-system\n", ""));
            ours.push('\n');
        }
    }
    ours.push_str("---\napiVersion: toolmesh.dev/v1alpha1\nkind: Secret\nmetadata: {name: github-token}\ndata: {token: x}\n");
    let parsed = toolmesh_proto::parse_resources(&ours).expect("valid resources");
    let set = toolmesh_proto::resource::ResourceSet::new(parsed).expect("set");
    toolmesh_proto::resource::validate_set(&set).expect("consistent");

    // And the schema check can fail: what the API server would refuse, it refuses.
    let bad = std::env::temp_dir().join(format!("toolmesh-bad-crs-{}.yaml", std::process::id()));
    std::fs::write(
        &bad,
        "apiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {name: a}\nspec: {endpoints: []}\n---\n\
         apiVersion: toolmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: b}\nspec:\n  subjects: [{identity: x}]\n  rules: [{server: Not_A_Name, action: maybe}]\n---\n\
         apiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {name: c}\nspec: {endpoints: [{url: ftp://x}], credential: {header: X}}\n",
    )
    .expect("write");
    let (ok, text) = check_against_crds(std::slice::from_ref(&bad));
    std::fs::remove_file(&bad).ok();
    assert!(!ok, "{text}");
    for expected in [
        "McpServer/a: spec.endpoints",
        "AccessPolicy/b: spec.rules.0.server",
        "AccessPolicy/b: spec.rules.0.action",
        "McpServer/c: spec.endpoints.0.url",
        "McpServer/c: spec.credential: 'secretRef' is a required property",
        "3 checked, 3 failed",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}
