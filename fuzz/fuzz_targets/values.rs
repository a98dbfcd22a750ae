//! Argument values: a number in every spelling a JSON reader turns into the same value
//! gets the same decision, for a deny and an allow condition on it; wrapping it in an
//! array never escapes the deny.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use toolmesh_proto::v1alpha1 as pb;
use toolmesh_sidecar::mcp::TargetKind;
use toolmesh_sidecar::policy::{Decision, LimiterSource, ServerPolicy, number_text};

struct NoPrevious;
impl LimiterSource for NoPrevious {
    fn limiter(&self, _: &[u8]) -> Option<std::sync::Arc<toolmesh_sidecar::ratelimit::Limiter>> {
        None
    }
}

fn policy(deny: bool, pattern: &str) -> ServerPolicy {
    let rule = |action: pb::Action, conditions: Vec<pb::ArgumentCondition>| pb::Rule {
        server: "s".into(),
        tools: vec!["t".into()],
        action: action as i32,
        conditions,
        ..Default::default()
    };
    let condition = vec![pb::ArgumentCondition {
        path: "n".into(),
        matches: pattern.into(),
    }];
    let rules = if deny {
        vec![rule(pb::Action::Allow, vec![]), rule(pb::Action::Deny, condition)]
    } else {
        vec![rule(pb::Action::Allow, condition)]
    };
    let rules: Vec<_> = rules.iter().enumerate().map(|(i, r)| ("p", i, r)).collect();
    ServerPolicy::compile_rules(rules, &NoPrevious, &mut Vec::new())
}

fn allowed(p: &ServerPolicy, n: &str) -> bool {
    let Ok(args) = RawValue::from_string(format!(r#"{{"n":{n}}}"#)) else {
        return false;
    };
    matches!(p.decide(TargetKind::Tool, "t", Some(&args)), Decision::Allow(_))
}

fuzz_target!(|data: (f64, f64, bool)| {
    let (value, other, same) = data;
    if !value.is_finite() || !other.is_finite() {
        return;
    }
    // The pattern: the value itself, or another number.
    let target = if same { value } else { other };
    let Some(pattern) = serde_json::Number::from_f64(target).and_then(|n| number_text(&n)) else {
        return;
    };
    let mut spellings = vec![format!("{value:?}"), format!("{value:e}"), format!("{value:E}")];
    if value.fract() == 0.0 && value.abs() < 9.0e15 {
        let i = value as i64;
        spellings.push(format!("{i}"));
        spellings.push(format!("{i}.000"));
        spellings.push(format!("{}e-2", i as i128 * 100));
    }
    for deny in [true, false] {
        let p = policy(deny, &pattern);
        let first = allowed(&p, &spellings[0]);
        for s in &spellings[1..] {
            assert_eq!(allowed(&p, s), first, "deny={deny} pattern={pattern} {} vs {s}", spellings[0]);
        }
        if deny && !first {
            assert!(!allowed(&p, &format!("[{}]", spellings[0])), "an array escaped the deny");
        }
    }
});
