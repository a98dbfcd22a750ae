use super::*;

const GOOD: &str = r#"
apiVersion: toolmesh.dev/v1alpha1
kind: McpServer
metadata: {name: github}
spec:
  endpoints: [{url: "https://mcp.example.com/mcp"}]
  credential: {header: Authorization, secretRef: {name: github-token, key: token}, prefix: "Bearer "}
  timeout: 30s
---
apiVersion: toolmesh.dev/v1alpha1
kind: Secret
metadata: {name: github-token}
data: {token: "s3cr3t"}
---
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {name: triage}
spec:
  subjects: [{identity: "agents/triage"}]
  rules:
    - server: github
      tools: ["get_*", "list_*"]
      rateLimit: {requests: 60, per: 1m}
    - server: github
      tools: ["delete_*"]
      action: deny
"#;

fn err_of(yaml: &str) -> String {
    match parse_resources(yaml) {
        Ok(r) => panic!("expected an error, parsed {r:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn parses_the_design_example() {
    let resources = parse_resources(GOOD).expect("valid");
    assert_eq!(resources.len(), 3);
    assert_eq!(resources[0].kind(), Kind::McpServer);
    assert_eq!(resources[2].name(), "triage");
    let Resource::AccessPolicy(p) = &resources[2] else {
        panic!("not a policy")
    };
    assert_eq!(p.spec.rules[1].action, ActionSpec::Deny);
    assert_eq!(
        p.spec.rules[0].rate_limit.as_ref().map(|r| r.requests),
        Some(60)
    );
}

#[test]
fn unknown_field_is_named_with_its_path() {
    let yaml = GOOD.replacen("timeout: 30s", "timeout: 30s\n  retries: 3", 1);
    let e = err_of(&yaml);
    assert!(
        e.starts_with("McpServer/github: spec.retries: unknown field `retries`"),
        "{e}"
    );
}

#[test]
fn bad_values_name_the_field() {
    let cases = [
        (
            GOOD.replacen("https://mcp.example.com/mcp", "ftp://x", 1),
            "McpServer/github: spec.endpoints[0].url:",
        ),
        (
            GOOD.replacen("30s", "soon", 1),
            "McpServer/github: spec.timeout:",
        ),
        (
            GOOD.replacen("per: 1m", "per: 0s", 1),
            "AccessPolicy/triage: spec.rules[0].rateLimit.per:",
        ),
        (
            GOOD.replacen("requests: 60", "requests: -1", 1),
            "AccessPolicy/triage: spec.rules[0].rateLimit.requests:",
        ),
        (
            GOOD.replacen("action: deny", "action: maybe", 1),
            "AccessPolicy/triage: spec.rules[1].action:",
        ),
        (
            GOOD.replacen("{name: github}", "{name: GitHub}", 1),
            "McpServer/GitHub: metadata.name:",
        ),
        (
            GOOD.replacen("kind: Secret", "kind: Secrets", 1),
            "document 1: kind: unknown kind \"Secrets\"",
        ),
        (
            GOOD.replacen("toolmesh.dev/v1alpha1", "v1", 1),
            "document 0: apiVersion: unsupported \"v1\"",
        ),
        (
            GOOD.replacen("header: Authorization", "header: \"Bad Header\"", 1),
            "McpServer/github: spec.credential.header:",
        ),
        (
            GOOD.replacen("header: Authorization", "header: Host", 1),
            "McpServer/github: spec.credential.header:",
        ),
    ];
    for (yaml, want) in cases {
        let e = err_of(&yaml);
        assert!(e.starts_with(want), "want {want:?}, got {e:?}");
    }
}

#[test]
fn secret_values_never_appear_in_errors_or_debug() {
    let yaml = GOOD.replacen("\"s3cr3t\"", "\"s3cr3t\\r\\nX-Evil: 1\"", 1);
    let e = err_of(&yaml);
    assert!(e.contains("Secret/github-token: data.token"), "{e}");
    assert!(!e.contains("s3cr3t"), "{e}");
    let resources = parse_resources(GOOD).expect("valid");
    assert!(!format!("{resources:?}").contains("s3cr3t"));
}

#[test]
fn malformed_yaml_is_an_error_not_a_panic() {
    for text in [
        "a: [",
        "- 1\n- 2",
        "\"unterminated",
        "apiVersion: [1, 2]",
        "::",
    ] {
        assert!(parse_resources(text).is_err(), "{text:?} parsed");
    }
    assert_eq!(parse_resources("").expect("empty is fine"), vec![]);
    assert_eq!(parse_resources("---\n---\n").expect("empty docs"), vec![]);
}

#[test]
fn alias_bombs_are_refused_and_anchors_still_work() {
    // Found by timing the `resources_yaml` fuzz target: nested aliases ("billion
    // laughs") made 500 bytes cost a tenth of a second before they were refused, and
    // nested anchors (each records all it holds) 50 KB a third of a second.
    let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..9 {
        let refs = vec![format!("*a{}", i - 1); 10].join(", ");
        bomb.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    let first = |n: usize| bomb.lines().take(n).collect::<Vec<_>>().join("\n");
    // 13,000 replayed events (a0 to a3) are refused, and so is the whole bomb...
    let too_much = |e: &str| e.contains("alias replay limit") || e.contains("budget breached");
    for text in [first(4), bomb.clone()] {
        let err = parse_resources(&text).expect_err("refused").to_string();
        assert!(too_much(&err), "{err}");
    }
    // 60 anchors around 200 values record 12,000 events: refused too...
    let opens: String = (0..60).map(|i| format!("&n{i} [")).collect();
    let nested = format!("k: {opens}{}{}", vec!["x"; 200].join(","), "]".repeat(60));
    let err = parse_resources(&nested).expect_err("refused").to_string();
    assert!(too_much(&err), "{err}");
    // ...1,300 pass (and the document is then judged on its own).
    let err = parse_resources(&first(3))
        .expect_err("not a resource")
        .to_string();
    assert!(err.contains("apiVersion"), "{err}");
    let policy = r#"
apiVersion: toolmesh.dev/v1alpha1
kind: AccessPolicy
metadata: {name: p}
spec:
  subjects: [{identity: "agents/*"}]
  rules: [{server: s, tools: &all ["*"], resources: *all, prompts: *all}]
"#;
    let parsed = parse_resources(policy).expect("anchors work");
    let Resource::AccessPolicy(p) = &parsed[0] else {
        panic!("{parsed:?}")
    };
    assert_eq!(p.spec.rules[0].prompts, ["*"]);
}

#[test]
fn duplicate_names_are_refused() {
    let twice = format!(
        "{GOOD}\n---\n{}",
        GOOD.split("---").next().unwrap_or_default()
    );
    let resources = parse_resources(&twice).expect("each is valid alone");
    let e = ResourceSet::new(resources)
        .expect_err("duplicate")
        .to_string();
    assert_eq!(e, "McpServer/github: metadata.name: defined more than once");
}

#[test]
fn dangling_references_are_refused() {
    let set = ResourceSet::new(
        parse_resources(&GOOD.replacen("key: token", "key: nope", 1)).expect("valid alone"),
    )
    .expect("set");
    let e = validate_set(&set).expect_err("missing key").to_string();
    assert!(
        e.starts_with("McpServer/github: spec.credential.secretRef:"),
        "{e}"
    );

    let set = ResourceSet::new(
        parse_resources(&GOOD.replacen(
            "- server: github\n      tools: [\"delete_*\"]",
            "- server: gitlab\n      tools: [\"delete_*\"]",
            1,
        ))
        .expect("valid alone"),
    )
    .expect("set");
    let e = validate_set(&set).expect_err("missing server").to_string();
    assert_eq!(
        e,
        "AccessPolicy/triage: spec.rules[1].server: McpServer \"gitlab\" does not exist"
    );
}

#[test]
fn durations() {
    assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert!(parse_duration("0s").is_err());
    assert!(parse_duration("").is_err());
}

const POLICY: &str = "apiVersion: toolmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: p}\nspec:\n  subjects: [{identity: \"a/*\"}]\n  rules: [{server: s, tools: [\"*\"]}]\n";

#[test]
fn documents_are_bounded_by_bytes_not_count() {
    // 1,500 documents, each file opening with `---` as many do.
    let mut text = String::new();
    for i in 0..1500 {
        text.push_str("---\n");
        text.push_str(&POLICY.replace("name: p", &format!("name: p{i}")));
    }
    assert_eq!(parse_resources(&text).expect("1,500 documents").len(), 1500);
    // Comments, blank documents and `...` do not count as documents.
    let text = format!("# header\n---\n\n---\n{POLICY}...\n---\n# nothing\n--- \n{POLICY}");
    assert_eq!(parse_resources(&text).expect("two").len(), 2);
    // Content on the marker line is part of the document.
    let inline = format!(
        "--- {}\n",
        serde_json::to_string(&serde_json::json!({
        "apiVersion": "toolmesh.dev/v1alpha1", "kind": "Secret",
        "metadata": {"name": "k"}, "data": {"v": "x"}}))
        .expect("json")
    );
    assert_eq!(parse_resources(&inline).expect("inline").len(), 1);
    let huge = " ".repeat(MAX_YAML_BYTES + 1);
    assert!(matches!(
        parse_resources(&huge),
        Err(ResourceError::TooLarge { .. })
    ));
}

#[test]
fn a_yaml_error_names_its_document_and_line() {
    let text = format!("{POLICY}---\n{POLICY}---\nkind: [unclosed\n");
    let e = parse_resources(&text)
        .expect_err("bad third document")
        .to_string();
    assert!(e.starts_with("document 2 (line 14): not valid YAML"), "{e}");
    assert!(
        e.contains("line 15 column 7"),
        "lines count in the whole text: {e}"
    );
    let text = format!(
        "---\n{POLICY}---\n{}",
        POLICY.replace("AccessPolicy", "Nope")
    );
    let e = parse_resources(&text).expect_err("bad kind").to_string();
    assert!(e.starts_with("document 1: kind:"), "{e}");
}

#[test]
fn kinds_by_every_name_people_use() {
    for (text, kind) in [
        ("McpServer", Kind::McpServer),
        ("mcpservers", Kind::McpServer),
        ("MCPS", Kind::McpServer),
        ("accesspolicies", Kind::AccessPolicy),
        ("AccessPolicy", Kind::AccessPolicy),
        ("mcpap", Kind::AccessPolicy),
        ("secrets", Kind::Secret),
    ] {
        assert_eq!(Kind::from_name(text), Some(kind), "{text}");
    }
    assert_eq!(Kind::from_name("accesspolicie"), None);
    assert_eq!(Kind::from_name("pods"), None);
}

#[test]
fn a_server_without_a_credential_must_say_it_accepts_that() {
    let server = "apiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {name: open}\nspec:\n  endpoints: [{url: \"http://127.0.0.1:1/mcp\"}]\n";
    let e = parse_resources(server).expect_err("refused").to_string();
    assert!(
        e.starts_with("McpServer/open: spec.credential: required")
            && e.contains("allowUnauthenticated"),
        "{e}"
    );
    let allowed = format!("{server}  allowUnauthenticated: true\n");
    let set = ResourceSet::new(parse_resources(&allowed).expect("accepted")).expect("set");
    validate_set(&set).expect("accepted when it says so");
}

#[test]
fn a_server_in_the_mesh_is_reached_over_https_at_its_own_path() {
    let server = |url: &str| {
        format!(
            "apiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {{name: files}}\nspec:\n  endpoints: [{{url: \"{url}\"}}]\n  mesh: {{identity: tools/files}}\n"
        )
    };
    // No credential needed: the server-side sidecar refuses everything without a
    // workload certificate.
    let ok = parse_resources(&server("https://files.tools.svc:16030/mcp/files")).expect("ok");
    validate_set(&ResourceSet::new(ok).expect("set")).expect("valid");
    for (url, says) in [
        ("http://files.tools.svc:16030/mcp/files", "must be https://"),
        (
            "https://files.tools.svc:16030/mcp",
            "must end in /mcp/files",
        ),
        (
            "https://files.tools.svc:16030/mcp/other",
            "must end in /mcp/files",
        ),
        (
            "https://files.tools.svc:16030/mcp/files?x=1",
            "must end in /mcp/files",
        ),
    ] {
        let e = parse_resources(&server(url)).expect_err(url).to_string();
        assert!(
            e.contains("spec.endpoints[0].url") && e.contains(says),
            "{url}: {e}"
        );
    }
    let blank = server("https://f:1/mcp/files").replace("tools/files", "\"\"");
    let e = parse_resources(&blank)
        .expect_err("empty identity")
        .to_string();
    assert!(e.contains("spec.mesh.identity"), "{e}");
}

#[test]
fn one_server_side_sidecar_identity_serves_one_server() {
    let two = "apiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {name: a}\nspec:\n  endpoints: [{url: \"https://a:1/mcp/a\"}]\n  mesh: {identity: tools/x}\n---\napiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {name: b}\nspec:\n  endpoints: [{url: \"https://b:1/mcp/b\"}]\n  mesh: {identity: tools/x}\n";
    let set = ResourceSet::new(parse_resources(two).expect("each is valid")).expect("set");
    let e = validate_set(&set)
        .expect_err("same identity twice")
        .to_string();
    assert!(
        e.contains("spec.mesh.identity") && e.contains("already runs as"),
        "{e}"
    );
}

#[test]
fn prefixes_on_the_aggregate_never_collide() {
    let server = |name: &str, prefix: Option<&str>| {
        let prefix = prefix.map_or(String::new(), |p| format!(", prefix: \"{p}\""));
        format!(
            "apiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {{name: {name}}}\nspec: {{endpoints: [{{url: \"http://{name}:1/mcp\"}}], allowUnauthenticated: true{prefix}}}\n"
        )
    };
    let set_of = |docs: &[String]| {
        ResourceSet::new(parse_resources(&docs.join("---\n")).expect("each is valid")).expect("set")
    };
    // A prefix that is another server's name, and two unprefixed servers.
    for (docs, named) in [
        (
            vec![server("github", None), server("gh", Some("github"))],
            "already uses the prefix \"github\"",
        ),
        (
            vec![server("a", Some("")), server("b", Some(""))],
            "unprefixed too",
        ),
    ] {
        let e = validate_set(&set_of(&docs))
            .expect_err("collision")
            .to_string();
        assert!(e.contains("spec.prefix") && e.contains(named), "{e}");
    }
    // Distinct prefixes, and one unprefixed server, are fine.
    validate_set(&set_of(&[
        server("github", Some("gh")),
        server("jira", None),
        server("x", Some("")),
    ]))
    .expect("no collision");
    // A prefix with `_` could end inside another name's `__`: refused, as is anything
    // that is not letters, digits and '-'.
    for bad in ["a_b", "a__", "-a", "a-", "a b", "é", &"a".repeat(33)] {
        let e = err_of(&server("s", Some(bad)));
        assert!(e.contains("spec.prefix"), "{bad}: {e}");
    }
    assert!(is_prefix("") && is_prefix("GitHub-2") && !is_prefix("a_b"));
}

#[test]
fn a_legacy_sse_server_is_declared_and_rendered() {
    let yaml = |more: &str| {
        format!(
            "apiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {{name: old}}\nspec:\n  endpoints: [{{url: \"http://old:1/sse\"}}]\n  allowUnauthenticated: true\n{more}---\napiVersion: toolmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: p}}\nspec:\n  subjects: [{{identity: \"agents/a\"}}]\n  rules: [{{server: old, tools: [\"*\"]}}]\n"
        )
    };
    let rendered = |more: &str| {
        let set = ResourceSet::new(parse_resources(&yaml(more)).expect("parses")).expect("set");
        crate::render::render(&set, "agents/a")
            .expect("renders")
            .servers[0]
            .transport
    };
    assert_eq!(
        rendered(""),
        crate::v1alpha1::Transport::StreamableHttp as i32
    );
    assert_eq!(
        rendered("  transport: streamable-http\n"),
        crate::v1alpha1::Transport::StreamableHttp as i32
    );
    assert_eq!(
        rendered("  transport: sse\n"),
        crate::v1alpha1::Transport::Sse as i32
    );
    let e = err_of(&yaml("  transport: websocket\n"));
    assert!(e.contains("spec.transport"), "{e}");
    // A server-side sidecar serves Streamable HTTP: the two do not mix.
    let meshed = "apiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {name: old}\nspec:\n  endpoints: [{url: \"https://old:1/mcp/old\"}]\n  mesh: {identity: tools/old}\n  transport: sse\n";
    let e = err_of(meshed);
    assert!(e.contains("spec.transport") && e.contains("mesh"), "{e}");
}

#[test]
fn subjects_name_someone_and_say_it_plainly() {
    let bad = |subject: &str, field: &str| {
        let text = format!(
            "apiVersion: toolmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: p}}\nspec:\n  subjects: [{subject}]\n  rules: [{{server: s, tools: [\"*\"]}}]\n"
        );
        let err = parse_resources(&text).expect_err(subject);
        let shown = err.to_string();
        assert!(shown.contains(field), "{subject}: {shown}");
    };
    bad("{}", "spec.subjects[0]");
    bad("{identity: a/b, user: alice}", "spec.subjects[0].identity");
    bad("{issuer: \"idp.example.com\"}", "spec.subjects[0].issuer");
    bad(
        "{user: alice, scopes: [\"a b\"]}",
        "spec.subjects[0].scopes[0]",
    );
    bad(
        "{user: alice, claims: {sub: x}}",
        "spec.subjects[0].claims.sub",
    );
    bad(
        "{user: alice, claims: {groups: \"\"}}",
        "spec.subjects[0].claims.groups",
    );
    bad("{user: \"a\\u0000b\"}", "spec.subjects[0].user");
    bad("{usr: alice}", "usr");
    let good = "apiVersion: toolmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: p}\nspec:\n  subjects:\n    - {identity: \"ci/*\", issuer: \"https://kubernetes.default.svc\"}\n    - {user: \"*\", clientId: ide, scopes: [mcp], claims: {groups: platform}}\n  rules: [{server: s, tools: [\"*\"]}]\n";
    parse_resources(good).expect("valid subjects");
}

#[test]
fn pins_are_checked_and_rendered() {
    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let yaml = |pins: &str| {
        format!(
            "apiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {{name: gh}}\nspec:\n  endpoints: [{{url: \"http://gh:1/mcp\"}}]\n  allowUnauthenticated: true\n  pins:\n{pins}---\napiVersion: toolmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: p}}\nspec:\n  subjects: [{{identity: \"agents/a\"}}]\n  rules: [{{server: gh, tools: [\"*\"]}}]\n"
        )
    };
    let good = format!(
        "    mode: warn\n    tools:\n      get_issue: {{digest: \"{D}\", fields: {{description: 0123456789abcdef}}}}\n    prompts:\n      review: {{digest: \"{D}\"}}\n"
    );
    let set = ResourceSet::new(parse_resources(&yaml(&good)).expect("parses")).expect("set");
    let pins = crate::render::render(&set, "agents/a")
        .expect("renders")
        .servers[0]
        .pins
        .clone()
        .expect("pins rendered");
    assert!(pins.warn && !pins.allow_unpinned);
    assert_eq!(pins.tools["get_issue"].digest, D);
    assert_eq!(
        pins.tools["get_issue"].fields["description"],
        "0123456789abcdef"
    );
    assert_eq!(pins.prompts["review"].digest, D);
    for (bad, field) in [
        (
            "    tools:\n      x: {digest: \"sha1:abc\"}\n",
            "spec.pins.tools[\"x\"].digest",
        ),
        (
            &format!(
                "    tools:\n      x: {{digest: \"{}\"}}\n",
                D.to_uppercase().replace("SHA256", "sha256")
            ),
            "spec.pins.tools[\"x\"].digest",
        ),
        (
            &format!(
                "    prompts:\n      x: {{digest: \"{D}\", fields: {{inputSchema: 0123456789abcdef}}}}\n"
            ),
            "spec.pins.prompts[\"x\"].fields",
        ),
        (
            &format!("    tools:\n      x: {{digest: \"{D}\", fields: {{name: \"12\"}}}}\n"),
            "spec.pins.tools[\"x\"].fields.name",
        ),
        ("    mode: audit\n", "spec.pins.mode"),
        ("    unpinned: deny\n", "spec.pins.unpinned"),
    ] {
        let e = err_of(&yaml(bad));
        assert!(e.contains(field), "{bad}: {e}");
    }
}

#[test]
fn oauth_credentials_are_checked_rendered_and_redacted() {
    let yaml = |oauth: &str, more: &str| {
        format!(
            "apiVersion: toolmesh.dev/v1alpha1\nkind: McpServer\nmetadata: {{name: gh}}\nspec:\n  endpoints: [{{url: \"https://gh.example/mcp\"}}]\n  oauth:\n{oauth}{more}---\napiVersion: toolmesh.dev/v1alpha1\nkind: Secret\nmetadata: {{name: gh-oauth}}\ndata: {{secret: \"s3cret-value\"}}\n---\napiVersion: toolmesh.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: p}}\nspec:\n  subjects: [{{identity: \"agents/a\"}}]\n  rules: [{{server: gh, tools: [\"*\"]}}]\n"
        )
    };
    let cc = "    grant: client-credentials\n    tokenUrl: https://idp.example/token\n    clientId: toolmesh\n    clientSecretRef: {name: gh-oauth, key: secret}\n    scopes: [repo, read:org]\n    resource: https://gh.example/mcp\n";
    let set = ResourceSet::new(parse_resources(&yaml(cc, "")).expect("parses")).expect("set");
    let snapshot = crate::render::render(&set, "agents/a").expect("renders");
    let oauth = snapshot.servers[0].oauth.clone().expect("oauth rendered");
    assert_eq!(oauth.client_secret, "s3cret-value");
    assert_eq!(oauth.client_secret_source, "gh-oauth/secret");
    assert_eq!(oauth.scopes, vec!["repo", "read:org"]);
    assert!(snapshot.servers[0].credential.is_none());
    let dump = serde_json::to_string(&crate::render::redacted(&snapshot)).expect("json");
    assert!(
        !dump.contains("s3cret-value") && dump.contains("<redacted>"),
        "{dump}"
    );
    // Token exchange needs no secret at all.
    let te =
        "    grant: token-exchange\n    tokenUrl: https://idp.example/token\n    audience: gh\n";
    let set = ResourceSet::new(parse_resources(&yaml(te, "")).expect("parses")).expect("set");
    let rendered = crate::render::render(&set, "agents/a").expect("renders");
    assert_eq!(
        rendered.servers[0]
            .oauth
            .as_ref()
            .map(|o| o.client_secret.as_str()),
        Some("")
    );
    for (bad, more, field) in [
        (
            "    grant: client-credentials\n    tokenUrl: http://idp.example/token\n    clientId: x\n    clientSecretRef: {name: gh-oauth, key: secret}\n",
            "",
            "spec.oauth.tokenUrl",
        ),
        (
            "    grant: client-credentials\n    tokenUrl: https://idp.example/token\n    clientId: x\n",
            "",
            "spec.oauth",
        ),
        (
            "    grant: token-exchange\n    tokenUrl: https://idp.example/token\n    clientSecretRef: {name: gh-oauth, key: secret}\n",
            "",
            "spec.oauth.clientId",
        ),
        (
            "    grant: token-exchange\n    tokenUrl: https://idp.example/token\n    scopes: [\"a b\"]\n",
            "",
            "spec.oauth.scopes[0]",
        ),
        (
            te,
            "  credential: {header: X-Key, secretRef: {name: gh-oauth, key: secret}}\n",
            "spec.oauth",
        ),
        (
            "    grant: client-credentials\n    tokenUrl: https://idp.example/token\n    clientId: x\n    clientSecretRef: {name: missing, key: secret}\n",
            "",
            "spec.oauth.clientSecretRef",
        ),
        (
            "    grant: password\n    tokenUrl: https://idp.example/token\n",
            "",
            "spec.oauth.grant",
        ),
    ] {
        let e = match parse_resources(&yaml(bad, more)).map(ResourceSet::new) {
            Ok(Ok(set)) => match crate::render::render(&set, "agents/a") {
                Ok(_) => panic!("accepted: {bad}{more}"),
                Err(e) => e.to_string(),
            },
            Ok(Err(e)) | Err(e) => e.to_string(),
        };
        assert!(e.contains(field), "{bad}{more}: {e}");
    }
    // Loopback token endpoints may be plain HTTP (a local authorization server).
    let local = "    grant: token-exchange\n    tokenUrl: http://127.0.0.1:8080/token\n";
    assert!(parse_resources(&yaml(local, "")).is_ok());
}
