use std::collections::HashMap;

use super::*;

struct NoPrevious;
impl LimiterSource for NoPrevious {
    fn limiter(&self, _: &[u8]) -> Option<Arc<Limiter>> {
        None
    }
}

struct Previous(HashMap<Vec<u8>, Arc<Limiter>>);
impl LimiterSource for Previous {
    fn limiter(&self, f: &[u8]) -> Option<Arc<Limiter>> {
        self.0.get(f).cloned()
    }
}

fn rule(server: &str, tools: &[&str], deny: bool) -> pb::Rule {
    pb::Rule {
        server: server.into(),
        tools: tools.iter().map(|t| (*t).into()).collect(),
        action: if deny {
            pb::Action::Deny
        } else {
            pb::Action::Allow
        } as i32,
        ..Default::default()
    }
}

fn policy(rules: Vec<pb::Rule>) -> Vec<pb::Policy> {
    vec![pb::Policy {
        name: "triage".into(),
        rules,
        subjects: Vec::new(),
    }]
}

fn compile(policies: &[pb::Policy]) -> ServerPolicy {
    ServerPolicy::compile("github", policies, &NoPrevious, &mut Vec::new())
}

fn allowed(p: &ServerPolicy, name: &str, args: Option<&str>) -> bool {
    let raw = args.map(|a| RawValue::from_string(a.to_owned()).expect("json"));
    matches!(
        p.decide(TargetKind::Tool, name, raw.as_deref()),
        Decision::Allow(_)
    )
}

#[test]
fn default_deny_globs_and_deny_beats_allow() {
    let p = compile(&policy(vec![
        rule("github", &["get_*", "list_*", "search_code"], false),
        rule("github", &["get_secret*"], true),
        rule("other", &["*"], false),
    ]));
    assert!(p.usable());
    assert!(allowed(&p, "get_issue", None));
    assert!(allowed(&p, "search_code", None));
    assert!(!allowed(&p, "search_codes", None));
    assert!(!allowed(&p, "delete_repo", None), "default deny");
    assert!(!allowed(&p, "get_secrets", None), "deny beats allow");
    match p.decide(TargetKind::Tool, "get_secret", None) {
        Decision::Deny(Some(r)) => assert_eq!(&*r.id, "triage/rules[1]"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        p.decide(TargetKind::Tool, "nope", None),
        Decision::Deny(None)
    ));
    // Tools rules say nothing about prompts or resources.
    assert!(matches!(
        p.decide(TargetKind::Prompt, "get_issue", None),
        Decision::Deny(None)
    ));
}

#[test]
fn a_server_with_only_deny_rules_is_not_usable() {
    assert!(!compile(&policy(vec![rule("github", &["*"], true)])).usable());
    assert!(!compile(&policy(vec![rule("other", &["*"], false)])).usable());
}

#[test]
fn argument_conditions() {
    let mut r = rule("github", &["create_issue"], false);
    r.conditions = vec![pb::ArgumentCondition {
        path: "repo.name".into(),
        matches: "acme/*".into(),
    }];
    let p = compile(&policy(vec![r]));
    assert!(allowed(
        &p,
        "create_issue",
        Some(r#"{"repo":{"name":"acme/web"}}"#)
    ));
    assert!(!allowed(
        &p,
        "create_issue",
        Some(r#"{"repo":{"name":"evil/web"}}"#)
    ));
    assert!(!allowed(&p, "create_issue", Some(r#"{"repo":"acme/web"}"#)));
    assert!(!allowed(&p, "create_issue", None));
    // The tool still shows in lists: some arguments may be allowed.
    assert!(p.visible(TargetKind::Tool, "create_issue"));
}

#[test]
fn arguments_servers_read_differently_fail_every_condition_that_could_allow() {
    // Found by the `envelope` fuzz target: with a lone surrogate in `repo`, serde_json
    // could not read the arguments, the deny rule's condition counted as false and the
    // call was allowed; JavaScript and Python servers read `secret/...` and ran it.
    let mut deny = rule("github", &["deploy"], true);
    deny.conditions = vec![pb::ArgumentCondition {
        path: "repo".into(),
        matches: "secret/*".into(),
    }];
    let mut allow_acme = rule("github", &["tag"], false);
    allow_acme.conditions = vec![pb::ArgumentCondition {
        path: "repo".into(),
        matches: "acme/*".into(),
    }];
    let p = compile(&policy(vec![
        rule("github", &["deploy"], false),
        deny,
        allow_acme,
    ]));
    assert!(allowed(&p, "deploy", Some(r#"{"repo":"acme/web"}"#)));
    assert!(!allowed(&p, "deploy", Some(r#"{"repo":"secret/db"}"#)));
    for ambiguous in [
        r#"{"repo":"secret/db\ud800"}"#,
        r#"{"repo":"secret/db","n":1e400}"#,
        r#"{"repo":"secret/db","repo":"acme/web"}"#,
        r#"{"repo":"acme/web","x":{"k":1,"k":2}}"#,
    ] {
        assert!(!allowed(&p, "deploy", Some(ambiguous)), "{ambiguous}");
        // And an allow rule's condition does not hold on them either.
        let acme = ambiguous.replace("secret/db", "acme/x");
        assert!(!allowed(&p, "tag", Some(&acme)), "{acme}");
    }
    // Without arguments (or without `repo`) the upstream may fill in any default: a
    // deny rule's condition holds on what it cannot see.
    assert!(!allowed(&p, "deploy", None));
    assert!(!allowed(&p, "deploy", Some(r#"{"other":1}"#)));
}

fn conditional(deny: bool, path: &str, matches: &str) -> ServerPolicy {
    let mut r = rule("github", &["t"], deny);
    r.conditions = vec![pb::ArgumentCondition {
        path: path.into(),
        matches: matches.into(),
    }];
    let mut rules = vec![r];
    if deny {
        rules.insert(0, rule("github", &["t"], false));
    }
    compile(&policy(rules))
}

#[test]
fn numbers_compare_by_value_in_every_spelling() {
    let deny = conditional(true, "n", "13");
    let allow = conditional(false, "n", "13");
    for spelling in [
        "13",
        "13.0",
        "1.3e1",
        "130e-1",
        "1.30E+1",
        "13.000000000000000001",
    ] {
        let args = format!(r#"{{"n":{spelling}}}"#);
        assert!(!allowed(&deny, "t", Some(&args)), "deny {spelling}");
        assert!(allowed(&allow, "t", Some(&args)), "allow {spelling}");
    }
    for other in ["12", "13.5", "-13", "0", r#""13.0""#] {
        let args = format!(r#"{{"n":{other}}}"#);
        assert!(allowed(&deny, "t", Some(&args)), "deny {other}");
        assert!(!allowed(&allow, "t", Some(&args)), "allow {other}");
    }
    // A pattern written as a number matches its value; a string matches as written.
    let half = conditional(false, "n", "0.50");
    assert!(allowed(&half, "t", Some(r#"{"n":5e-1}"#)));
    assert!(allowed(&half, "t", Some(r#"{"n":"0.50"}"#)));
    assert!(!allowed(&half, "t", Some(r#"{"n":"0.5"}"#)));
    // Zero has one value; integers past 2^53 are read differently by JavaScript and
    // Python, so they cannot allow and do not escape a deny.
    assert!(allowed(
        &conditional(false, "n", "0"),
        "t",
        Some(r#"{"n":-0.0}"#)
    ));
    let big = r#"{"n":9007199254740993}"#;
    assert!(!allowed(&conditional(true, "n", "1*"), "t", Some(big)));
    assert!(!allowed(&conditional(false, "n", "9*"), "t", Some(big)));
    assert!(allowed(
        &conditional(false, "n", "9*"),
        "t",
        Some(r#"{"n":9007199254740991}"#)
    ));
}

#[test]
fn arrays_objects_null_and_missing_values() {
    let deny = conditional(true, "path", "/etc/*");
    let allow = conditional(false, "path", "/srv/*");
    let cases = [
        // (arguments, deny rule lets it through, allow rule lets it through)
        (r#"{"path":"/srv/a"}"#, true, true),
        (r#"{"path":["/srv/a","/srv/b"]}"#, true, true),
        (r#"{"path":["/srv/a","/etc/passwd"]}"#, false, false),
        (r#"{"path":[["/etc/passwd"]]}"#, false, false),
        (r#"{"path":[]}"#, false, false),
        (r#"{"path":null}"#, false, false),
        (r#"{"path":{"value":"/srv/a"}}"#, false, false),
        (r#"{}"#, false, false),
        (r#"{"path":true}"#, true, false),
    ];
    for (args, through_deny, through_allow) in cases {
        assert_eq!(allowed(&deny, "t", Some(args)), through_deny, "deny {args}");
        assert_eq!(
            allowed(&allow, "t", Some(args)),
            through_allow,
            "allow {args}"
        );
    }
    // Paths walk through arrays of objects, element by element.
    let nested = conditional(true, "files.path", "/etc/*");
    assert!(allowed(
        &nested,
        "t",
        Some(r#"{"files":[{"path":"/srv/a"}]}"#)
    ));
    assert!(!allowed(
        &nested,
        "t",
        Some(r#"{"files":[{"path":"/srv/a"},{"path":"/etc/x"}]}"#)
    ));
    assert!(!allowed(
        &nested,
        "t",
        Some(r#"{"files":[{"path":"/srv/a"},{}]}"#)
    ));
}

#[test]
fn keys_a_server_may_fold_together_cannot_be_judged() {
    let deny = conditional(true, "scope", "/etc/*");
    let allow = conditional(false, "scope", "/srv/*");
    for args in [
        r#"{"scope":"/srv/a","Scope":"/etc/passwd"}"#,
        r#"{"scope":"/srv/a","SCOPE":"/etc/passwd"}"#,
        r#"{"scope":"/srv/a","\u017fcope":"/etc/passwd"}"#,
        r#"{"Scope":"/etc/passwd"}"#,
    ] {
        assert!(!allowed(&deny, "t", Some(args)), "deny {args}");
        assert!(!allowed(&allow, "t", Some(args)), "allow {args}");
    }
    assert!(allowed(
        &allow,
        "t",
        Some(r#"{"scope":"/srv/a","other":"x"}"#)
    ));
}

#[test]
fn list_visibility_and_open_kinds() {
    let p = compile(&policy(vec![rule("github", &["*"], false)]));
    assert!(!p.filters(TargetKind::Tool));
    assert!(
        p.filters(TargetKind::Prompt),
        "no prompt rule: prompts are filtered (all hidden)"
    );
    assert!(!p.visible(TargetKind::Prompt, "x"));

    let p = compile(&policy(vec![
        rule("github", &["*"], false),
        rule("github", &["delete_*"], true),
    ]));
    assert!(p.filters(TargetKind::Tool));
    assert!(p.visible(TargetKind::Tool, "get_issue"));
    assert!(!p.visible(TargetKind::Tool, "delete_repo"));
}

#[test]
fn limiters_survive_when_the_rule_is_unchanged() {
    let mut limited = rule("github", &["get_*"], false);
    limited.rate_limit = Some(pb::RateLimit {
        requests: 1,
        per_ms: 60_000,
        shared: false,
    });
    let policies = policy(vec![limited.clone()]);
    let mut first = Vec::new();
    let p1 = ServerPolicy::compile("github", &policies, &NoPrevious, &mut first);
    let Decision::Allow(r) = p1.decide(TargetKind::Tool, "get_issue", None) else {
        panic!("allowed")
    };
    assert!(
        r.limiter
            .as_ref()
            .expect("limited")
            .acquire("me", "get_issue")
            .is_ok()
    );

    let previous = Previous(first.into_iter().collect());
    let p2 = ServerPolicy::compile("github", &policies, &previous, &mut Vec::new());
    let Decision::Allow(r) = p2.decide(TargetKind::Tool, "get_issue", None) else {
        panic!("allowed")
    };
    assert!(
        r.limiter
            .as_ref()
            .expect("limited")
            .acquire("me", "get_issue")
            .is_err(),
        "budget kept"
    );

    let mut changed = limited;
    changed.rate_limit = Some(pb::RateLimit {
        requests: 5,
        per_ms: 60_000,
        shared: false,
    });
    let p3 = ServerPolicy::compile("github", &policy(vec![changed]), &previous, &mut Vec::new());
    let Decision::Allow(r) = p3.decide(TargetKind::Tool, "get_issue", None) else {
        panic!("allowed")
    };
    assert!(
        r.limiter
            .as_ref()
            .expect("limited")
            .acquire("me", "get_issue")
            .is_ok(),
        "a changed rule starts fresh"
    );
}

#[test]
fn a_rule_inserted_above_a_limited_one_does_not_reset_its_buckets() {
    let mut limited = rule("github", &["get_*"], false);
    limited.rate_limit = Some(pb::RateLimit {
        requests: 1,
        per_ms: 60_000,
        shared: false,
    });
    let take = |p: &ServerPolicy| {
        let Decision::Allow(r) = p.decide(TargetKind::Tool, "get_issue", None) else {
            panic!("allowed")
        };
        r.limiter
            .as_ref()
            .expect("limited")
            .acquire("me", "get_issue")
    };
    let mut first = Vec::new();
    let p1 = ServerPolicy::compile(
        "github",
        &policy(vec![limited.clone()]),
        &NoPrevious,
        &mut first,
    );
    assert!(take(&p1).is_ok());
    let previous = Previous(first.into_iter().collect());
    let moved = policy(vec![
        rule("github", &["list_*"], false),
        rule("github", &["delete_*"], true),
        limited.clone(),
    ]);
    let p2 = ServerPolicy::compile("github", &moved, &previous, &mut Vec::new());
    assert!(take(&p2).is_err(), "the budget moved with the rule");

    // Two identical limited rules keep one bucket each, in order.
    let twice = policy(vec![limited.clone(), limited]);
    let mut out = Vec::new();
    ServerPolicy::compile("github", &twice, &NoPrevious, &mut out);
    assert_eq!(out.len(), 2);
    assert_ne!(out[0].0, out[1].0);
}
