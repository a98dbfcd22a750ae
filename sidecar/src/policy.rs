//! Authorization: the snapshot's rules compiled, per server, into what a decision
//! needs, and the decision itself.
//!
//! The snapshot holds only the policies whose subjects match this sidecar's identity
//! (rendering filtered them), so compiling ignores subjects. Per server, rules are split
//! into deny and allow sides, each indexed per kind: exact names and literal prefixes
//! by hash, `*` always, other globs by scan. A decision is a few hash lookups, with no
//! allocation and no walk over every rule.
//!
//! Semantics (README "Policy"):
//! - `tools/call`, `resources/read`, `resources/subscribe`, `prompts/get` and
//!   `completion/complete` are gated: allowed only if an allow rule covers the name and
//!   no deny rule does (deny beats allow; default deny). A rule's argument conditions
//!   must all hold for the rule to apply.
//! - Everything else is protocol plumbing, allowed when the identity may use the server
//!   at all, i.e. has at least one allow rule for it. A server with none is not routed.
//! - Lists show an item if some allow rule covers its name and no deny rule without
//!   conditions does (whether a conditional rule applies depends on a call's arguments).
//!
//! This module decides; it does not answer requests, count metrics or write audit lines.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;
use toolmesh_proto::glob;
use toolmesh_proto::v1alpha1 as pb;

use crate::mcp::TargetKind;
use crate::ratelimit::Limiter;

/// A compiled name pattern.
#[derive(Debug, Clone)]
enum Pattern {
    Any,
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Glob(Box<str>),
}

impl Pattern {
    fn new(text: &str) -> Pattern {
        if text == "*" {
            return Pattern::Any;
        }
        if glob::is_literal(text) {
            return Pattern::Exact(text.into());
        }
        let inner = |s: &str| glob::is_literal(s).then(|| s.into());
        if let Some(p) = text.strip_suffix('*').and_then(inner) {
            return Pattern::Prefix(p);
        }
        if let Some(s) = text.strip_prefix('*').and_then(inner) {
            return Pattern::Suffix(s);
        }
        Pattern::Glob(text.into())
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(e) => **e == *name,
            Pattern::Prefix(p) => name.starts_with(&**p),
            Pattern::Suffix(s) => name.ends_with(&**s),
            Pattern::Glob(g) => glob::matches(g, name),
        }
    }
}

/// `arguments.<path>` must match a glob. How each JSON value meets it (README,
/// "Argument conditions"):
/// - a string matches as written; a boolean as `true`/`false`;
/// - a number by value: every spelling a JSON reader turns into the same number
///   (`13`, `13.0`, `1.3e1`, `130e-1`) is written the one way [`number_text`] writes
///   it, and a pattern that is a number is written that way too;
/// - an array stands for each of its elements (a server may take one value or many):
///   nested arrays and objects on the path are walked through element by element;
/// - what no glob can judge: a missing member, `null`, an object, an empty array, an
///   integer beyond 2^53 (JavaScript and Python read it differently), a key that
///   differs from the path's only by case or look-alike letters (some servers match
///   keys that way).
///
/// A deny rule's condition holds when any value matches or any cannot be judged; an
/// allow rule's only when there are values and every one matches. So neither wrapping
/// a value in an array nor leaving it out escapes a deny or widens an allow.
#[derive(Debug)]
struct Condition {
    path: Vec<Box<str>>,
    pattern: Pattern,
    /// The pattern as a number, written as [`number_text`] writes numbers, when it is
    /// one (numbers are matched against this).
    number: Option<Pattern>,
}

/// What a condition's values came to.
#[derive(Debug, Default, Clone, Copy)]
struct Leaves {
    matched: bool,
    unmatched: bool,
    unjudgeable: bool,
}

impl Condition {
    fn new(path: &str, matches: &str) -> Condition {
        let number = matches
            .parse::<serde_json::Number>()
            .ok()
            .and_then(|n| number_text(&n))
            .map(|text| Pattern::new(&text));
        Condition {
            path: path.split('.').map(Into::into).collect(),
            pattern: Pattern::new(matches),
            number,
        }
    }

    fn holds(&self, arguments: Option<&Value>, deny: bool) -> bool {
        let mut leaves = Leaves::default();
        match arguments {
            Some(v) => self.walk(v, &self.path, &mut leaves),
            None => leaves.unjudgeable = true,
        }
        if deny {
            leaves.matched || leaves.unjudgeable
        } else {
            leaves.matched && !leaves.unmatched && !leaves.unjudgeable
        }
    }

    fn walk(&self, value: &Value, path: &[Box<str>], leaves: &mut Leaves) {
        if let Value::Array(items) = value {
            if items.is_empty() {
                leaves.unjudgeable = true;
            }
            items.iter().for_each(|item| self.walk(item, path, leaves));
            return;
        }
        let Some((key, rest)) = path.split_first() else {
            match self.leaf(value) {
                Some(true) => leaves.matched = true,
                Some(false) => leaves.unmatched = true,
                None => leaves.unjudgeable = true,
            }
            return;
        };
        let Value::Object(members) = value else {
            leaves.unjudgeable = true;
            return;
        };
        if members
            .keys()
            .any(|k| **k != **key && crate::mcp::keys_fold_equal(k, key))
        {
            leaves.unjudgeable = true;
        }
        match members.get(&**key) {
            Some(next) => self.walk(next, rest, leaves),
            None => leaves.unjudgeable = true,
        }
    }

    /// Whether one scalar matches; `None` when no glob can judge it.
    fn leaf(&self, value: &Value) -> Option<bool> {
        match value {
            Value::String(s) => Some(self.pattern.matches(s)),
            Value::Bool(b) => Some(self.pattern.matches(if *b { "true" } else { "false" })),
            Value::Number(n) => {
                let text = number_text(n)?;
                Some(self.number.as_ref().unwrap_or(&self.pattern).matches(&text))
            }
            Value::Null | Value::Object(_) | Value::Array(_) => None,
        }
    }
}

/// Largest integer every JSON reader holds exactly (JavaScript's `Number.MAX_SAFE_INTEGER`).
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// A number written one way for every spelling of its value: an integer in
/// JavaScript's safe range as an integer (`13`, `-0` as `0`), any other value as
/// Rust's shortest text that reads back as the same `f64` (`0.5`, `0.1`). `None` for
/// integers beyond the safe range: JavaScript rounds them, Python keeps them exact.
pub fn number_text(n: &serde_json::Number) -> Option<String> {
    let v = n.as_f64()?;
    if !v.is_finite() {
        return None;
    }
    if v.fract() == 0.0 {
        if v.abs() > MAX_SAFE_INTEGER {
            return None;
        }
        // In range, so the cast is exact.
        #[allow(clippy::cast_possible_truncation)]
        return Some((v as i64).to_string());
    }
    Some(v.to_string())
}

/// One rule, compiled.
#[derive(Debug)]
pub struct Rule {
    /// `<policy>/rules[<index>]`, as named in errors, audit lines and metrics.
    pub id: Arc<str>,
    deny: bool,
    tools: Vec<Pattern>,
    resources: Vec<Pattern>,
    prompts: Vec<Pattern>,
    conditions: Vec<Condition>,
    /// The rule's rate limit, carried across snapshot swaps while the rule is unchanged.
    pub limiter: Option<Arc<Limiter>>,
    pub audit_arguments: bool,
}

impl Rule {
    fn patterns(&self, kind: TargetKind) -> &[Pattern] {
        match kind {
            TargetKind::Tool => &self.tools,
            TargetKind::Resource => &self.resources,
            TargetKind::Prompt => &self.prompts,
        }
    }
}

/// Where the rules covering a name are found without scanning every rule: exact
/// names and literal prefixes (`get_*`) by hash lookup, `*` rules always, and the rare
/// suffix and general globs by scan.
#[derive(Debug, Default)]
struct Index {
    exact: HashMap<Box<str>, Vec<u32>>,
    prefix: HashMap<Box<str>, Vec<u32>>,
    /// The distinct lengths of the prefixes, so a name is looked up once per length.
    prefix_lens: Vec<usize>,
    any: Vec<u32>,
    other: Vec<(u32, Pattern)>,
}

impl Index {
    fn add(&mut self, rule: u32, pattern: &Pattern) {
        match pattern {
            Pattern::Any => self.any.push(rule),
            Pattern::Exact(e) => self.exact.entry(e.clone()).or_default().push(rule),
            Pattern::Prefix(p) => {
                if !self.prefix_lens.contains(&p.len()) {
                    self.prefix_lens.push(p.len());
                }
                self.prefix.entry(p.clone()).or_default().push(rule);
            }
            Pattern::Suffix(_) | Pattern::Glob(_) => self.other.push((rule, pattern.clone())),
        }
    }

    /// The lowest-numbered rule covering `name` for which `applies` holds.
    fn first(&self, name: &str, applies: impl Fn(u32) -> bool) -> Option<u32> {
        let mut best: Option<u32> = None;
        let mut consider = |i: u32| {
            if best.is_none_or(|b| i < b) && applies(i) {
                best = Some(i);
            }
        };
        if let Some(rules) = self.exact.get(name) {
            rules.iter().for_each(|&i| consider(i));
        }
        for &len in &self.prefix_lens {
            if let Some(head) = name.get(..len)
                && let Some(rules) = self.prefix.get(head)
            {
                rules.iter().for_each(|&i| consider(i));
            }
        }
        self.any.iter().for_each(|&i| consider(i));
        for (i, pattern) in &self.other {
            if pattern.matches(name) {
                consider(*i);
            }
        }
        best
    }
}

/// Rules of one action (deny or allow) and their per-kind indexes.
#[derive(Debug, Default)]
struct Side {
    rules: Vec<Rule>,
    index: [Index; 3],
}

impl Side {
    fn push(&mut self, rule: Rule) {
        let n = u32::try_from(self.rules.len()).unwrap_or(u32::MAX);
        for kind in KINDS {
            for pattern in rule.patterns(kind) {
                self.index[kind_index(kind)].add(n, pattern);
            }
        }
        self.rules.push(rule);
    }

    fn first(
        &self,
        kind: TargetKind,
        name: &str,
        applies: impl Fn(&Rule) -> bool,
    ) -> Option<&Rule> {
        self.index[kind_index(kind)]
            .first(name, |i| self.rules.get(i as usize).is_some_and(&applies))
            .and_then(|i| self.rules.get(i as usize))
    }
}

/// The outcome of a decision.
#[derive(Debug, Clone, Copy)]
pub enum Decision<'p> {
    /// Allowed by this rule (whose rate limit, if any, applies).
    Allow(&'p Rule),
    /// Denied by this rule, or by default (`None`).
    Deny(Option<&'p Rule>),
}

/// Every rule that names one server, compiled.
#[derive(Debug, Default)]
pub struct ServerPolicy {
    deny: Side,
    allow: Side,
    /// Per kind: an allow rule with `*`, no conditions, no limit, and no deny rule for
    /// the kind: lists need no filtering and calls no matching.
    open: [bool; 3],
    /// Do any rules have conditions (then a decision parses the arguments)?
    conditional: bool,
}

fn kind_index(kind: TargetKind) -> usize {
    match kind {
        TargetKind::Tool => 0,
        TargetKind::Resource => 1,
        TargetKind::Prompt => 2,
    }
}

const KINDS: [TargetKind; 3] = [TargetKind::Tool, TargetKind::Resource, TargetKind::Prompt];

/// Where a previous snapshot's limiter can be found, so an unchanged rule keeps its
/// buckets.
pub trait LimiterSource {
    fn limiter(&self, fingerprint: &[u8]) -> Option<Arc<Limiter>>;
}

impl ServerPolicy {
    /// Compile the rules naming `server` from every policy of a snapshot.
    /// `limiters` receives `(fingerprint, limiter)` for every limited rule.
    pub fn compile(
        server: &str,
        policies: &[pb::Policy],
        previous: &dyn LimiterSource,
        limiters: &mut Vec<(Vec<u8>, Arc<Limiter>)>,
    ) -> ServerPolicy {
        let rules = policies.iter().flat_map(|policy| {
            let named = policy.rules.iter().enumerate();
            named
                .filter(move |(_, rule)| rule.server == server)
                .map(|(index, rule)| (policy.name.as_str(), index, rule))
        });
        ServerPolicy::compile_rules(rules, previous, limiters)
    }

    /// Compile one server's rules, in snapshot order, each with the name of its policy
    /// and its index there.
    pub fn compile_rules<'a>(
        rules: impl IntoIterator<Item = (&'a str, usize, &'a pb::Rule)>,
        previous: &dyn LimiterSource,
        limiters: &mut Vec<(Vec<u8>, Arc<Limiter>)>,
    ) -> ServerPolicy {
        let mut out = ServerPolicy::default();
        // How often each (policy, rule) has been seen: identical rules get their own
        // buckets, in order.
        let mut seen: HashMap<Vec<u8>, u32> = HashMap::new();
        for (policy, index, rule) in rules {
            let limiter = rule.rate_limit.as_ref().and_then(|rl| {
                let mut fingerprint = fingerprint(policy, rule);
                let occurrence = seen.entry(fingerprint.clone()).or_default();
                fingerprint.extend_from_slice(&occurrence.to_le_bytes());
                *occurrence += 1;
                let limiter = previous.limiter(&fingerprint).or_else(|| {
                    Limiter::new(rl.requests, Duration::from_millis(rl.per_ms), rl.shared)
                        .map(Arc::new)
                })?;
                limiters.push((fingerprint, limiter.clone()));
                Some(limiter)
            });
            let compiled = Rule {
                id: format!("{policy}/rules[{index}]").into(),
                deny: rule.action == pb::Action::Deny as i32,
                tools: rule.tools.iter().map(|p| Pattern::new(p)).collect(),
                resources: rule.resources.iter().map(|p| Pattern::new(p)).collect(),
                prompts: rule.prompts.iter().map(|p| Pattern::new(p)).collect(),
                conditions: rule
                    .conditions
                    .iter()
                    .map(|c| Condition::new(&c.path, &c.matches))
                    .collect(),
                limiter,
                audit_arguments: rule.audit_arguments,
            };
            out.conditional |= !compiled.conditions.is_empty();
            if compiled.deny {
                out.deny.push(compiled);
            } else {
                out.allow.push(compiled);
            }
        }
        for kind in KINDS {
            let no_deny = !out.deny.rules.iter().any(|r| !r.patterns(kind).is_empty());
            let open_allow = out.allow.rules.iter().any(|r| {
                r.conditions.is_empty()
                    && r.limiter.is_none()
                    && r.patterns(kind).iter().any(|p| matches!(p, Pattern::Any))
            });
            out.open[kind_index(kind)] = no_deny && open_allow;
        }
        out
    }

    /// May this identity use the server at all (plumbing, lists)?
    pub fn usable(&self) -> bool {
        !self.allow.rules.is_empty()
    }

    /// Decide a gated call on `name` of `kind`, with the call's raw arguments.
    ///
    /// Arguments the sidecar cannot read unambiguously (see [`read_arguments`]) may
    /// still be read by the upstream, in a way no condition here can be checked
    /// against: the conditions of a deny rule then hold, those of an allow rule fail.
    pub fn decide(
        &self,
        kind: TargetKind,
        name: &str,
        arguments: Option<&RawValue>,
    ) -> Decision<'_> {
        // Arguments are parsed only when some rule looks at them.
        let parsed: Result<Option<Value>, ()> = match arguments {
            Some(a) if self.conditional => read_arguments(a.get()).map(Some).map_err(|_| ()),
            _ => Ok(None),
        };
        let holds = |r: &Rule, deny: bool| match &parsed {
            Ok(args) => r.conditions.iter().all(|c| c.holds(args.as_ref(), deny)),
            Err(()) => r.conditions.is_empty() || deny,
        };
        if let Some(rule) = self.deny.first(kind, name, |r| holds(r, true)) {
            return Decision::Deny(Some(rule));
        }
        match self.allow.first(kind, name, |r| holds(r, false)) {
            Some(rule) => Decision::Allow(rule),
            None => Decision::Deny(None),
        }
    }

    /// Should a list show the item `name` of `kind`?
    pub fn visible(&self, kind: TargetKind, name: &str) -> bool {
        if self.open[kind_index(kind)] {
            return true;
        }
        self.allow.first(kind, name, |_| true).is_some()
            && self
                .deny
                .first(kind, name, |r| r.conditions.is_empty())
                .is_none()
    }

    /// Does a list of `kind` need filtering at all?
    pub fn filters(&self, kind: TargetKind) -> bool {
        !self.open[kind_index(kind)]
    }
}

/// A call's arguments as conditions see them, refusing what servers read differently:
/// text serde_json cannot read (lone surrogates, numbers beyond `f64`: JavaScript and
/// Python read both) and duplicate keys (first or last wins, depending on the server).
pub fn read_arguments(text: &str) -> Result<Value, serde_json::Error> {
    serde_json::from_str::<Unambiguous>(text).map(|u| u.0)
}

/// A JSON value whose objects hold each key once.
struct Unambiguous(Value);

impl<'de> Deserialize<'de> for Unambiguous {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UnambiguousVisitor).map(Unambiguous)
    }
}

struct UnambiguousVisitor;

impl<'de> Visitor<'de> for UnambiguousVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Unambiguous(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if members.contains_key(&key) {
                return Err(A::Error::custom(format!("duplicate key {key:?}")));
            }
            let Unambiguous(value) = map.next_value()?;
            members.insert(key, value);
        }
        Ok(Value::Object(members))
    }
}

/// Identifies a rule across snapshots: same policy and content, wherever it moved
/// (rules inserted or removed around it keep its buckets; changing the rule itself,
/// its limit included, starts afresh).
fn fingerprint(policy: &str, rule: &pb::Rule) -> Vec<u8> {
    use prost::Message;
    let mut out = Vec::with_capacity(policy.len() + 8 + rule.encoded_len());
    out.extend_from_slice(policy.as_bytes());
    out.push(0);
    rule.encode(&mut out).ok();
    out
}

#[cfg(test)]
mod tests;
