//! The injection webhook against golden AdmissionReview fixtures
//! (`tests/fixtures/inject/`): what goes on the wire (base64 JSON Patch), the patched
//! pod as Kubernetes would store it (applied with `json-patch`, read back as a
//! `k8s_openapi` Pod, and validated strictly by `kubernetes-validate` against the
//! Kubernetes 1.33 and 1.37 schemas), and idempotency (the webhook on its own output
//! changes nothing).

mod common;

use std::path::{Path, PathBuf};

use base64::Engine as _;
use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{Value, json};
use toolmesh_control_plane::inject::{self, Settings, SidecarMode};

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/inject")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).expect("fixture");
    serde_json::from_str(&text).expect("fixture JSON")
}

/// Send `review` through the webhook; the response, and the patched pod if patched.
fn answer(review: &Value, settings: &Settings) -> (Value, Option<Value>) {
    let body = serde_json::to_vec(review).expect("encode");
    let wire = inject::review(&body, settings).expect("an answer");
    let response: Value = serde_json::from_slice(&wire).expect("JSON answer");
    assert_eq!(response["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(response["kind"], "AdmissionReview");
    assert_eq!(response["response"]["uid"], review["request"]["uid"]);
    assert_eq!(response["response"]["allowed"], true);
    let Some(patch) = response["response"].get("patch") else {
        assert!(response["response"].get("patchType").is_none());
        return (response, None);
    };
    assert_eq!(response["response"]["patchType"], "JSONPatch");
    // On the wire the patch is a base64 string, as the API server requires.
    let encoded = patch.as_str().expect("patch is a base64 string");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("valid base64");
    let patch: json_patch::Patch = serde_json::from_slice(&decoded).expect("a JSON Patch");
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).expect("the patch applies to the request object");
    (response, Some(pod))
}

fn sidecar(pod: &Pod, native: bool) -> Container {
    let spec = pod.spec.as_ref().expect("spec");
    let list = if native {
        spec.init_containers.as_ref()
    } else {
        Some(&spec.containers)
    };
    let first = list
        .and_then(|l| l.first())
        .expect("a first container")
        .clone();
    assert_eq!(first.name, inject::CONTAINER);
    first
}

/// Strict schema validation with the `kubernetes-validate` that `make deps` installs.
fn validate_strictly(name: &str, pod: &Value) {
    let tool = common::kubernetes_validate();
    let dir: PathBuf = common::workspace_root().join("target/inject-fixtures");
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join(format!("{name}.json"));
    // The API server fills in a generated name; the validator needs one.
    let mut pod = pod.clone();
    if pod["metadata"].get("name").is_none() {
        let generated = format!(
            "{}x7k2q",
            pod["metadata"]["generateName"].as_str().unwrap_or("pod-")
        );
        pod["metadata"]["name"] = json!(generated);
    }
    std::fs::write(&file, serde_json::to_vec_pretty(&pod).expect("encode")).expect("write");
    for version in ["1.33.0", "1.37.0"] {
        let out = std::process::Command::new(&tool)
            .args(["--strict", "-k", version])
            .arg(&file)
            .output()
            .expect("run kubernetes-validate");
        assert!(
            out.status.success(),
            "{name} is not a valid Pod for Kubernetes {version}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The webhook on its own output: no patch.
fn assert_idempotent(review: &Value, patched: &Value, settings: &Settings) {
    let mut again = review.clone();
    again["request"]["object"] = patched.clone();
    let (_, repatched) = answer(&again, settings);
    assert_eq!(repatched, None, "a second pass changed the pod");
}

#[test]
fn a_deployment_created_pod_gets_a_native_sidecar_and_its_agents_the_mcp_url() {
    let settings = native();
    let review = fixture("deployment-pod");
    let (_, patched) = answer(&review, &settings);
    let patched = patched.expect("injected");
    validate_strictly("deployment-pod", &patched);
    let pod: Pod = serde_json::from_value(patched.clone()).expect("a Pod");
    // No name or namespace in the object: nothing in the patch depends on them.
    assert_eq!(pod.metadata.name, None);
    let c = sidecar(&pod, true);
    assert_eq!(c.restart_policy.as_deref(), Some("Always"));
    assert_eq!(c.image.as_deref(), Some(settings.image.as_str()));
    let probe = c.startup_probe.expect("startup probe");
    assert_eq!(
        probe.http_get.map(|h| h.path),
        Some(Some("/ready".to_owned()))
    );
    let security = c.security_context.clone().expect("security context");
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let capabilities = security.capabilities.clone().expect("capabilities");
    assert_eq!(capabilities.drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(capabilities.add, None);
    let args = c.args.expect("args");
    assert!(
        args.windows(2)
            .any(|w| w == ["--control-plane", settings.control_plane.as_str()])
    );
    let spec = pod.spec.expect("spec");
    let volumes = spec.volumes.expect("volumes");
    let token = volumes
        .iter()
        .find(|v| v.name == "toolmesh-token")
        .and_then(|v| v.projected.as_ref())
        .and_then(|p| p.sources.as_ref())
        .and_then(|s| s.first())
        .and_then(|s| s.service_account_token.as_ref())
        .expect("projected token");
    assert_eq!(token.audience.as_deref(), Some("toolmesh"));
    assert!(
        volumes
            .iter()
            .any(|v| v.name == "toolmesh-state" && v.empty_dir.is_some())
    );
    let agent = &spec.containers[0];
    assert_eq!(agent.name, "agent");
    let env = agent.env.as_ref().expect("env");
    assert!(env.iter().any(|e| e.name == "MODEL"), "existing env kept");
    // First, so the author's own entries can use $(TOOLMESH_MCP_URL).
    assert_eq!(env[0].name, "TOOLMESH_MCP_URL");
    assert_eq!(env[0].value.as_deref(), Some("http://127.0.0.1:16001/mcp"));
    for name in ["NO_PROXY", "no_proxy"] {
        assert!(
            env.iter()
                .any(|e| e.name == name && e.value.as_deref() == Some("127.0.0.1,localhost,::1")),
            "{name}"
        );
    }
    // Outside Istio's 15000-15090: both meshes can run; the admin port on both stacks.
    assert!(
        args.windows(2)
            .any(|w| w == ["--admin-listen", "[::]:16020"])
    );
    assert_eq!(security.run_as_user, Some(inject::SIDECAR_UID));
    let projected = volumes
        .iter()
        .find(|v| v.name == "toolmesh-token")
        .and_then(|v| v.projected.as_ref())
        .expect("projected");
    assert_eq!(projected.default_mode, Some(0o444));
    let annotations = pod.metadata.annotations.expect("annotations");
    assert_eq!(
        annotations
            .get("kubectl.kubernetes.io/default-container")
            .map(String::as_str),
        Some("agent"),
        "kubectl logs/exec go to the agent"
    );
    let record = annotations
        .get(inject::INJECTED)
        .cloned()
        .expect("injected annotation");
    assert_eq!(
        serde_json::from_str::<Value>(&record).expect("JSON")["mode"],
        "native"
    );
    assert_idempotent(&review, &patched, &settings);
}

#[test]
fn existing_init_containers_run_after_the_sidecar_and_existing_env_is_not_duplicated() {
    let settings = native();
    let review = fixture("existing-init-containers");
    let (_, patched) = answer(&review, &settings);
    let patched = patched.expect("injected");
    validate_strictly("existing-init-containers", &patched);
    let pod: Pod = serde_json::from_value(patched.clone()).expect("a Pod");
    let spec = pod.spec.as_ref().expect("spec");
    let init: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(init, [inject::CONTAINER, "fetch-prompts"]);
    let urls = spec.containers[0]
        .env
        .iter()
        .flatten()
        .filter(|e| e.name == "TOOLMESH_MCP_URL")
        .count();
    assert_eq!(urls, 1);
    let volumes: Vec<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(volumes, ["prompts", "toolmesh-state", "toolmesh-token"]);
    let annotations = pod.metadata.annotations.expect("annotations");
    assert_eq!(annotations.get("team").map(String::as_str), Some("search"));
    assert_idempotent(&review, &patched, &settings);
}

#[test]
fn legacy_mode_uses_a_regular_container_with_a_wait_hook_and_honours_pod_overrides() {
    let settings = native();
    let review = fixture("legacy-mode");
    let (_, patched) = answer(&review, &settings);
    let patched = patched.expect("injected");
    validate_strictly("legacy-mode", &patched);
    let pod: Pod = serde_json::from_value(patched.clone()).expect("a Pod");
    let c = sidecar(&pod, false);
    assert_eq!(c.restart_policy, None);
    let hook = c
        .lifecycle
        .and_then(|l| l.post_start)
        .and_then(|p| p.exec)
        .and_then(|e| e.command)
        .expect("postStart exec");
    assert_eq!(hook[..2], ["toolmesh-sidecar", "wait-ready"]);
    let limits = c.resources.and_then(|r| r.limits).expect("limits");
    assert_eq!(limits.get("memory").map(|q| q.0.as_str()), Some("256Mi"));
    let log = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "TOOLMESH_LOG")
        .and_then(|e| e.value.clone());
    assert_eq!(log.as_deref(), Some("debug"));
    let agent = &pod.spec.expect("spec").containers[1];
    assert_eq!(agent.name, "agent");
    // A Job's agent can end a sidecar that is not a native one.
    let shutdown = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "TOOLMESH_SHUTDOWN_URL")
        .and_then(|e| e.value.clone());
    assert_eq!(shutdown.as_deref(), Some("http://127.0.0.1:16020/shutdown"));
    assert_idempotent(&review, &patched, &settings);

    // The same pod on a cluster configured for legacy sidecars, no annotation needed.
    let mut plain = review.clone();
    plain["request"]["object"]["metadata"]["annotations"] = json!({});
    let legacy = Settings {
        mode: SidecarMode::Legacy,
        ..native()
    };
    let (_, patched) = answer(&plain, &legacy);
    let pod: Pod = serde_json::from_value(patched.expect("injected")).expect("a Pod");
    sidecar(&pod, false);
}

#[test]
fn opted_out_host_network_and_control_plane_pods_are_allowed_unchanged() {
    let settings = native();
    for name in ["opt-out", "host-network", "control-plane-pod"] {
        let (response, patched) = answer(&fixture(name), &settings);
        assert_eq!(patched, None, "{name} was patched: {response}");
    }
}

#[test]
fn bodies_that_are_not_admission_requests_are_errors_not_panics() {
    let settings = native();
    for body in [
        &b""[..],
        b"{}",
        b"[]",
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"x"}}"#,
    ] {
        assert!(
            inject::review(body, &settings).is_err(),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    // A request without an object (e.g. a DELETE) is allowed without a patch.
    let mut review = fixture("opt-out");
    review["request"]["object"] = Value::Null;
    review["request"]["operation"] = json!("DELETE");
    let (_, patched) = answer(&review, &settings);
    assert_eq!(patched, None);
}

#[test]
fn sidecars_are_told_which_ca_signs_the_control_plane_when_one_is_set() {
    let review = fixture("deployment-pod");
    let env_of = |settings: &Settings| {
        let (_, patched) = answer(&review, settings);
        let pod: Pod = serde_json::from_value(patched.expect("injected")).expect("a Pod");
        sidecar(&pod, true).env.unwrap_or_default()
    };
    assert!(
        env_of(&native())
            .iter()
            .all(|e| e.name != "TOOLMESH_CA_PEM"),
        "no CA set: the system roots"
    );
    let ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let settings = Settings {
        ca_pem: Some(ca.to_owned()),
        ..native()
    };
    let env = env_of(&settings);
    let set: Vec<_> = env.iter().filter(|e| e.name == "TOOLMESH_CA_PEM").collect();
    assert_eq!(set.len(), 1);
    assert_eq!(set[0].value.as_deref(), Some(ca));
    let (_, patched) = answer(&review, &settings);
    let patched = patched.expect("injected");
    validate_strictly("deployment-pod-with-ca", &patched);
    assert_idempotent(&review, &patched, &settings);
}

#[test]
fn bad_annotations_fall_back_to_defaults_with_a_warning() {
    let settings = native();
    let mut review = fixture("legacy-mode");
    let annotations = &mut review["request"]["object"]["metadata"]["annotations"];
    annotations["toolmesh.dev/sidecar-memory-limit"] = json!("256 MB");
    annotations["toolmesh.dev/sidecar-cpu-request"] = json!("1.5.0");
    annotations["toolmesh.dev/log-level"] = json!("debug; rm -rf /");
    let (response, patched) = answer(&review, &settings);
    let patched = patched.expect("still injected");
    validate_strictly("bad-annotations", &patched);
    let warnings = response["response"]["warnings"]
        .as_array()
        .expect("warnings");
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(warnings.iter().any(|w| {
        w.as_str()
            .is_some_and(|w| w.contains("sidecar-memory-limit"))
    }));
    let pod: Pod = serde_json::from_value(patched).expect("a Pod");
    let c = sidecar(&pod, false);
    let resources = c.resources.expect("resources");
    let limits = resources.limits.expect("limits");
    assert_eq!(limits.get("memory").map(|q| q.0.as_str()), Some("128Mi"));
    let requests = resources.requests.expect("requests");
    assert_eq!(requests.get("cpu").map(|q| q.0.as_str()), Some("50m"));
    let log = c.env.iter().flatten().find(|e| e.name == "TOOLMESH_LOG");
    assert_eq!(log.and_then(|e| e.value.as_deref()), Some("info"));
    // Good ones are kept.
    for quantity in ["100m", "1", "1.5", "128Mi", "2Gi", "1e3", "500k"] {
        let mut ok = fixture("legacy-mode");
        ok["request"]["object"]["metadata"]["annotations"]["toolmesh.dev/sidecar-cpu-limit"] =
            json!(quantity);
        let (response, _) = answer(&ok, &settings);
        assert!(response["response"].get("warnings").is_none(), "{quantity}");
    }
}

#[test]
fn an_app_container_running_as_the_sidecars_uid_is_refused() {
    let settings = native();
    let mut review = fixture("deployment-pod");
    review["request"]["object"]["spec"]["containers"][0]["securityContext"] =
        json!({"runAsUser": inject::SIDECAR_UID});
    let body = serde_json::to_vec(&review).expect("encode");
    let wire = inject::review(&body, &settings).expect("an answer");
    let response: Value = serde_json::from_slice(&wire).expect("JSON");
    assert_eq!(response["response"]["allowed"], false);
    let message = response["response"]["status"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.contains("16100") && message.contains("agent"),
        "{response}"
    );
    assert!(response["response"].get("patch").is_none());
    // The same uid for the whole pod is refused too.
    let mut pod_level = fixture("deployment-pod");
    pod_level["request"]["object"]["spec"]["securityContext"] =
        json!({"runAsUser": inject::SIDECAR_UID});
    let body = serde_json::to_vec(&pod_level).expect("encode");
    let response: Value =
        serde_json::from_slice(&inject::review(&body, &settings).expect("answer")).expect("JSON");
    assert_eq!(response["response"]["allowed"], false);
}

#[test]
fn the_mcp_url_comes_before_entries_that_use_it_and_no_proxy_keeps_loopback_direct() {
    let settings = native();
    let mut review = fixture("deployment-pod");
    review["request"]["object"]["spec"]["containers"][0]["env"] = json!([
        {"name": "HTTPS_PROXY", "value": "http://proxy.corp:3128"},
        {"name": "NO_PROXY", "value": ".corp.internal"},
        {"name": "TOOLS_URL", "value": "$(TOOLMESH_MCP_URL)/github"},
    ]);
    let (_, patched) = answer(&review, &settings);
    let patched = patched.expect("injected");
    validate_strictly("env-order", &patched);
    let pod: Pod = serde_json::from_value(patched.clone()).expect("a Pod");
    let env = pod.spec.expect("spec").containers[0]
        .env
        .clone()
        .expect("env");
    let at = |name: &str| env.iter().position(|e| e.name == name).expect(name);
    assert!(at("TOOLMESH_MCP_URL") < at("TOOLS_URL"), "{env:?}");
    let no_proxy = env
        .iter()
        .find(|e| e.name == "NO_PROXY")
        .and_then(|e| e.value.clone());
    assert_eq!(
        no_proxy.as_deref(),
        Some("127.0.0.1,localhost,::1,.corp.internal")
    );
    assert_eq!(env.iter().filter(|e| e.name == "NO_PROXY").count(), 1);
    assert_idempotent(&review, &patched, &settings);
}

/// The flags' defaults, with native sidecars chosen (auto mode picks legacy outside a
/// cluster, where nothing says the nodes run 1.29).
fn native() -> Settings {
    Settings {
        mode: SidecarMode::Native,
        ..Settings::default()
    }
}

#[test]
fn an_mcp_server_pod_gets_a_server_side_sidecar_in_front_of_its_loopback_port() {
    let settings = native();
    let review = fixture("server-pod");
    let (_, patched) = answer(&review, &settings);
    let patched = patched.expect("injected");
    validate_strictly("server-pod", &patched);
    let pod: Pod = serde_json::from_value(patched.clone()).expect("a Pod");
    let c = sidecar(&pod, true);
    let args = c.args.clone().expect("args");
    assert_eq!(
        args[10..],
        [
            "--mode",
            "server",
            "--upstream",
            "http://127.0.0.1:8080/mcp",
            "--mesh-listen",
            "[::]:16030"
        ]
    );
    let ports: Vec<i32> = c.ports.iter().flatten().map(|p| p.container_port).collect();
    assert_eq!(ports, [16020, 16030]);
    // It learns the pod's IP, to check the server does not listen there too.
    let pod_ip = c.env.iter().flatten().find(|e| e.name == "TOOLMESH_POD_IP");
    let field = pod_ip
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(field, Some("status.podIP"));
    // The server's own container is not an agent: no MCP URL is pushed into it.
    let server = &pod.spec.as_ref().expect("spec").containers[0];
    assert!(server.env.is_none(), "{:?}", server.env);
    assert!(
        patched["metadata"]["annotations"][inject::INJECTED]
            .as_str()
            .is_some_and(|r| r.contains("\"role\":\"server\""))
    );
    assert_idempotent(&review, &patched, &settings);

    // Without a usable port the pod is refused, not left unprotected.
    for (port, says) in [
        (None, "needs the annotation"),
        (Some("0"), "not a usable port"),
        (Some("16030"), "not a usable port"),
        (Some("http"), "not a usable port"),
    ] {
        let mut bad = review.clone();
        let annotations = &mut bad["request"]["object"]["metadata"]["annotations"];
        match port {
            None => annotations[inject::SERVER_PORT_ANNOTATION] = Value::Null,
            Some(p) => annotations[inject::SERVER_PORT_ANNOTATION] = json!(p),
        }
        if port.is_none() {
            annotations
                .as_object_mut()
                .expect("map")
                .remove(inject::SERVER_PORT_ANNOTATION);
        }
        let body = serde_json::to_vec(&bad).expect("encode");
        let wire: Value =
            serde_json::from_slice(&inject::review(&body, &settings).expect("answer"))
                .expect("json");
        assert_eq!(wire["response"]["allowed"], false, "{port:?}");
        let message = wire["response"]["status"]["message"]
            .as_str()
            .unwrap_or_default();
        assert!(message.contains(says), "{port:?}: {message}");
    }
    let mut bad_path = review.clone();
    bad_path["request"]["object"]["metadata"]["annotations"][inject::SERVER_PATH_ANNOTATION] =
        json!("mcp x");
    let body = serde_json::to_vec(&bad_path).expect("encode");
    let wire: Value =
        serde_json::from_slice(&inject::review(&body, &settings).expect("answer")).expect("json");
    assert_eq!(wire["response"]["allowed"], false);
}

#[test]
fn auto_mode_injects_native_sidecars_only_where_every_node_runs_them() {
    use inject::{minor_version, native_supported};
    assert_eq!(minor_version("v1.30.2"), Some(30));
    assert_eq!(minor_version("1.29+"), Some(29));
    assert_eq!(minor_version("v1.31.0-eks-a737599"), Some(31));
    assert_eq!(minor_version("v2.0.0"), None);
    assert_eq!(minor_version("garbage"), None);
    assert!(native_supported(Some(33), &["v1.33.1", "v1.29.0"]));
    // One old kubelet (a node pool behind), an old API server, an unreadable version or
    // no nodes seen: legacy, so no pod hangs in Init.
    assert!(!native_supported(Some(33), &["v1.33.1", "v1.28.9"]));
    assert!(!native_supported(Some(28), &["v1.33.1"]));
    assert!(!native_supported(Some(33), &["v1.33.1", ""]));
    assert!(!native_supported(None, &["v1.33.1"]));
    assert!(!native_supported(Some(33), &[]));

    // The webhook follows what auto mode found.
    let auto = Settings::default();
    assert_eq!(auto.mode, SidecarMode::Auto);
    let review = fixture("deployment-pod");
    let (_, patched) = answer(&review, &auto);
    let pod: Pod = serde_json::from_value(patched.expect("injected")).expect("a Pod");
    let legacy = sidecar(&pod, false);
    let pre_stop = legacy
        .lifecycle
        .and_then(|l| l.pre_stop)
        .and_then(|p| p.exec)
        .and_then(|e| e.command)
        .expect("preStop exec");
    assert_eq!(
        pre_stop[..3],
        ["toolmesh-sidecar", "wait-idle", "127.0.0.1:16020"]
    );
    auto.cluster_native
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let (_, patched) = answer(&review, &auto);
    let pod: Pod = serde_json::from_value(patched.expect("injected")).expect("a Pod");
    sidecar(&pod, true);
}
