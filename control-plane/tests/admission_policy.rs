//! The ValidatingAdmissionPolicy in `deploy/kubernetes/base/admission-policy.yaml`,
//! its CEL evaluated (with the `cel` crate, as the API server would) against pods the
//! real webhook injected and against the pods it must refuse: no sidecar (opted out,
//! host network, webhook down), look-alike sidecars, an app container running as the
//! sidecar's uid. Ties the policy's expected arguments to what `inject::mutate` writes:
//! change one without the other and this fails.

mod common;

use serde_json::{Value, json};
use toolmesh_control_plane::inject::{self, Settings, SidecarMode};

struct Policy {
    variables: Vec<(String, cel::Program)>,
    validations: Vec<(String, cel::Program)>,
}

fn policy() -> Policy {
    let path = common::workspace_root().join("deploy/kubernetes/base/admission-policy.yaml");
    let text = std::fs::read_to_string(&path).expect("policy file");
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("YAML");
    let vap = docs
        .iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicy")
        .expect("the policy");
    let program = |e: &Value| {
        let source = e["expression"].as_str().expect("expression");
        cel::Program::compile(source).unwrap_or_else(|err| panic!("{source}: {err:?}"))
    };
    Policy {
        variables: vap["spec"]["variables"]
            .as_array()
            .expect("variables")
            .iter()
            .map(|v| (v["name"].as_str().expect("name").to_owned(), program(v)))
            .collect(),
        validations: vap["spec"]["validations"]
            .as_array()
            .expect("validations")
            .iter()
            .map(|v| {
                (
                    v["message"].as_str().expect("message").to_owned(),
                    program(v),
                )
            })
            .collect(),
    }
}

impl Policy {
    /// The messages of the validations `pod` fails (empty: admitted).
    fn refusals(&self, pod: &Value) -> Vec<String> {
        let mut variables = serde_json::Map::new();
        for (name, program) in &self.variables {
            let mut ctx = cel::Context::default();
            ctx.add_variable("object", pod.clone()).expect("object");
            ctx.add_variable("variables", Value::Object(variables.clone()))
                .expect("variables");
            let value = program
                .execute(&ctx)
                .unwrap_or_else(|e| panic!("{name}: {e:?}"));
            variables.insert(name.clone(), value.json().expect("JSON"));
        }
        let mut ctx = cel::Context::default();
        ctx.add_variable("object", pod.clone()).expect("object");
        ctx.add_variable("variables", Value::Object(variables))
            .expect("variables");
        // An expression that does not evaluate to a boolean is a broken policy, not a
        // refusal: it must not count as one.
        self.validations
            .iter()
            .filter(|(message, program)| match program.execute(&ctx) {
                Ok(cel::Value::Bool(admitted)) => !admitted,
                other => panic!("{message}: {other:?}"),
            })
            .map(|(message, _)| message.clone())
            .collect()
    }
}

/// An edit that makes an injected pod a look-alike.
type Change = Box<dyn Fn(&mut Value)>;

fn agent_pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "triage", "namespace": "agents"},
        "spec": {
            "serviceAccountName": "triage",
            "containers": [{"name": "agent", "image": "example.com/agent:1", "env": [{"name": "MODEL", "value": "small"}]}],
        },
    })
}

fn injected(pod: &Value, settings: &Settings) -> Value {
    inject::mutate(pod, settings).expect("injected").pod
}

#[test]
fn injected_pods_are_admitted_native_and_legacy() {
    let policy = policy();
    let natively = injected(&agent_pod(), &native());
    assert_eq!(policy.refusals(&natively), Vec::<String>::new());
    let legacy = injected(
        &agent_pod(),
        &Settings {
            mode: SidecarMode::Legacy,
            ..native()
        },
    );
    assert_eq!(policy.refusals(&legacy), Vec::<String>::new());
    let with_ca = Settings {
        ca_pem: Some("-----BEGIN CERTIFICATE-----".into()),
        ..native()
    };
    assert_eq!(
        policy.refusals(&injected(&agent_pod(), &with_ca)),
        Vec::<String>::new()
    );
    let traced = Settings {
        otlp_endpoint: Some("http://otel-collector.monitoring:4317".into()),
        trace_sampling: Some(0.1),
        subject_token_audience: Some("https://idp.example.com".into()),
        ..native()
    };
    let pod = injected(&agent_pod(), &traced);
    assert_eq!(policy.refusals(&pod), Vec::<String>::new());
    let env = pod["spec"]["initContainers"][0]["env"].to_string();
    for (name, value) in [
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://otel-collector.monitoring:4317",
        ),
        ("TOOLMESH_TRACE_SAMPLING", "0.1"),
        (
            "TOOLMESH_SUBJECT_TOKEN_FILE",
            "/var/run/secrets/toolmesh/subject-token",
        ),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "k8s.namespace.name=$(TOOLMESH_NAMESPACE),k8s.pod.name=$(TOOLMESH_NODE)",
        ),
    ] {
        assert!(
            env.contains(&format!(r#""name":"{name}","value":"{value}""#)),
            "{name}={value} in {env}"
        );
    }
    // The subject token is a second projected token, for the authorization server.
    let volumes = pod["spec"]["volumes"].to_string();
    assert!(
        volumes.contains(r#""audience":"https://idp.example.com","expirationSeconds":3600,"path":"subject-token""#),
        "{volumes}"
    );
}

#[test]
fn pods_without_the_injected_sidecar_are_refused() {
    let policy = policy();
    // Opted out, host network, or created while the webhook was down: no sidecar.
    let refused = policy.refusals(&agent_pod());
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].contains("must run the toolmesh sidecar"));

    let base = injected(&agent_pod(), &native());
    let look_alikes: Vec<(&str, Change)> = vec![
        (
            "another image",
            Box::new(|p: &mut Value| {
                p["spec"]["initContainers"][0]["image"] = json!("example.com/fake-sidecar:1");
            }),
        ),
        (
            "a command of its own",
            Box::new(|p: &mut Value| {
                p["spec"]["initContainers"][0]["command"] =
                    json!(["/bin/sh", "-c", "sleep infinity"]);
            }),
        ),
        (
            "a local policy file",
            Box::new(|p: &mut Value| {
                if let Some(args) = p["spec"]["initContainers"][0]["args"].as_array_mut() {
                    args.extend([json!("--config"), json!("/tmp/allow-all.yaml")]);
                }
            }),
        ),
        (
            "another control plane",
            Box::new(|p: &mut Value| {
                p["spec"]["initContainers"][0]["args"][1] = json!("http://evil.example:16010");
            }),
        ),
        (
            "flags by environment",
            Box::new(|p: &mut Value| {
                if let Some(env) = p["spec"]["initContainers"][0]["env"].as_array_mut() {
                    env.push(json!({"name": "TOOLMESH_CONFIG", "value": "/tmp/allow-all.yaml"}));
                }
            }),
        ),
        (
            "another user",
            Box::new(|p: &mut Value| {
                p["spec"]["initContainers"][0]["securityContext"]["runAsUser"] = json!(0);
            }),
        ),
        (
            "a second sidecar",
            Box::new(|p: &mut Value| {
                let copy = p["spec"]["initContainers"][0].clone();
                if let Some(list) = p["spec"]["containers"].as_array_mut() {
                    list.push(copy);
                }
            }),
        ),
        (
            "an app as the sidecar's uid",
            Box::new(|p: &mut Value| {
                p["spec"]["containers"][0]["securityContext"] =
                    json!({"runAsUser": inject::SIDECAR_UID});
            }),
        ),
    ];
    for (what, change) in look_alikes {
        let mut pod = base.clone();
        change(&mut pod);
        assert!(!policy.refusals(&pod).is_empty(), "{what} was admitted");
    }
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
fn server_side_sidecars_are_admitted_only_in_front_of_loopback() {
    let policy = policy();
    let mut server = agent_pod();
    server["metadata"]["labels"] = json!({inject::INJECT_LABEL: inject::SERVER_VALUE});
    server["metadata"]["annotations"] = json!({inject::SERVER_PORT_ANNOTATION: "8080"});
    let injected = injected(&server, &native());
    assert_eq!(policy.refusals(&injected), Vec::<String>::new());
    // A server-side sidecar pointed elsewhere than loopback, or listening elsewhere, is
    // not the injected one.
    for (index, value) in [
        (13, "http://10.0.0.7:8080/mcp"),
        (15, "[::]:443"),
        (11, "agent"),
    ] {
        let mut edited = injected.clone();
        edited["spec"]["initContainers"][0]["args"][index] = json!(value);
        let refused = policy.refusals(&edited);
        assert_eq!(refused.len(), 1, "{value}: {refused:?}");
        assert!(refused[0].contains("not the injected one"), "{refused:?}");
    }
    let mut extra = injected.clone();
    if let Some(args) = extra["spec"]["initContainers"][0]["args"].as_array_mut() {
        args.extend([json!("--config"), json!("/tmp/own.yaml")]);
    }
    assert_eq!(policy.refusals(&extra).len(), 1);
}
