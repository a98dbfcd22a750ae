//! What the fuzz targets share: a compiled route to filter, decide and forward with,
//! fuzz bytes turned into an HTTP header map, and the oracles the targets check the
//! sidecar against: an SSE parser that follows the WHATWG rules the agents' clients
//! use, and a JSON reader as lenient as the most lenient of those clients.

use std::sync::{Arc, LazyLock};

use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use toolmesh_proto::v1alpha1 as pb;
use toolmesh_sidecar::filter::ListKind;
use toolmesh_sidecar::snapshot::{Route, Runtime};

/// A route `s` with a credential. Its policy shows tools `a*` and `t?` (but denies
/// `ax`), allows `c*` only when `arguments.repo` matches `ok/*`, allows `d*` unless
/// `arguments.repo` matches `secret/*`, and shows resources `file:///ok/*` and prompt
/// `p`. No rate limit: a run must not depend on the last.
pub fn route() -> Arc<Route> {
    static ROUTE: LazyLock<Arc<Route>> = LazyLock::new(|| {
        let rule = |tools: &[&str], action: pb::Action| pb::Rule {
            server: "s".into(),
            tools: tools.iter().map(|t| (*t).to_owned()).collect(),
            action: action as i32,
            ..Default::default()
        };
        let snapshot = pb::Snapshot {
            version: "v1".into(),
            identity: "agents/fuzz".into(),
            servers: vec![pb::Server {
                name: "s".into(),
                endpoints: vec![pb::Endpoint {
                    url: "http://127.0.0.1:1/mcp".into(),
                }],
                credential: Some(pb::Credential {
                    header: "authorization".into(),
                    value: "Bearer fuzz".into(),
                    source: "t/token".into(),
                }),
                timeout_ms: 1000,
                mesh: None,
                prefix: None,
                transport: 0,
                pins: None,
                oauth: None,
            }],
            policies: vec![pb::Policy {
                name: "p".into(),
                rules: vec![
                    pb::Rule {
                        resources: vec!["file:///ok/*".into()],
                        prompts: vec!["p".into()],
                        ..rule(&["a*", "t?"], pb::Action::Allow)
                    },
                    rule(&["ax"], pb::Action::Deny),
                    pb::Rule {
                        conditions: vec![pb::ArgumentCondition {
                            path: "repo".into(),
                            matches: "ok/*".into(),
                        }],
                        ..rule(&["c*"], pb::Action::Allow)
                    },
                    rule(&["d*"], pb::Action::Allow),
                    pb::Rule {
                        conditions: vec![pb::ArgumentCondition {
                            path: "repo".into(),
                            matches: "secret/*".into(),
                        }],
                        ..rule(&["d*"], pb::Action::Deny)
                    },
                ],
                subjects: Vec::new(),
            }],
            served: Vec::new(),
            issuers: Vec::new(),
        };
        let runtime = Runtime::compile(&snapshot, None).expect("the fixed snapshot compiles");
        runtime.route("s").expect("route s").clone()
    });
    ROUTE.clone()
}

/// Headers from `name: value` lines (invalid names or values are skipped, as hyper
/// would have refused them before the sidecar saw them).
pub fn headers(text: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in text.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            map.append(name, value);
        }
    }
    map
}

/// Split fuzz input at the first blank line: (header lines, body).
pub fn split_head(data: &[u8]) -> (&[u8], &[u8]) {
    match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[]),
    }
}

/// The data of every event a WHATWG-conforming `EventSource` parser dispatches for
/// `stream` (UTF-8 decoded with replacement, a leading BOM dropped, lines ended by CR,
/// LF or CRLF, an unterminated last event discarded).
pub fn sse_events(stream: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(stream);
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut events = Vec::new();
    let mut data = String::new();
    let mut rest = text;
    while let Some(end) = rest.find(['\r', '\n']) {
        let line = &rest[..end];
        let after = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + after..];
        if line.is_empty() {
            if !data.is_empty() {
                data.pop(); // the last LF
                events.push(std::mem::take(&mut data));
            }
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        if field == "data" {
            data.push_str(value);
            data.push('\n');
        }
    }
    events
}

/// `text` read the way the most lenient agent client reads JSON: a leading BOM
/// ignored, lone UTF-16 surrogate escapes accepted (JavaScript and Python both do).
pub fn lenient_json(text: &str) -> Option<Value> {
    let text = text.trim_start_matches('\u{feff}');
    serde_json::from_str(&replace_lone_surrogates(text)).ok()
}

/// `\uD800`-`\uDFFF` escapes that are not a valid pair, replaced by `\uFFFD`.
fn replace_lone_surrogates(text: &str) -> String {
    let bytes = text.as_bytes();
    let unit = |at: usize| -> Option<u16> {
        let hex = text.get(at + 2..at + 6)?;
        (bytes.get(at) == Some(&b'\\') && bytes.get(at + 1) == Some(&b'u'))
            .then(|| u16::from_str_radix(hex, 16).ok())
            .flatten()
    };
    let mut out = String::with_capacity(text.len());
    let (mut i, mut copied) = (0, 0);
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            match unit(i) {
                Some(0xd800..=0xdbff)
                    if unit(i + 6).is_some_and(|low| (0xdc00..=0xdfff).contains(&low)) =>
                {
                    i += 12;
                }
                Some(0xd800..=0xdfff) => {
                    out.push_str(&text[copied..i]);
                    out.push_str("\\ufffd");
                    i += 6;
                    copied = i;
                }
                // Any other escape is two bytes (`\uXXXX` is skipped 2 at a time too).
                _ => i += 2,
            }
        } else {
            i += 1;
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// Where a list's items and their names are: (`result` member, item key).
pub fn list_fields(method: &str) -> (&'static str, &'static str) {
    match method {
        "tools/list" => ("tools", "name"),
        "prompts/list" => ("prompts", "name"),
        "resources/list" => ("resources", "uri"),
        _ => ("resourceTemplates", "uriTemplate"),
    }
}

/// The list items a client would take from `message` (a JSON-RPC object, or an array
/// of them: some clients accept a batch as the answer to a single request).
fn listed<'v>(message: &'v Value, field: &str) -> Vec<&'v Value> {
    match message {
        Value::Array(messages) => messages.iter().flat_map(|m| listed(m, field)).collect(),
        Value::Object(m) => m
            .get("result")
            .and_then(|r| r.get(field))
            .and_then(Value::as_array)
            .map(|items| items.iter().collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Panics if a client reading `text` as an answer to `method` would see an item the
/// route's policy hides.
pub fn assert_only_visible(route: &Route, method: &str, text: &str) {
    let Some(message) = lenient_json(text) else {
        return;
    };
    let list = ListKind::of(method).expect("a list method");
    let (field, key) = list_fields(method);
    for item in listed(&message, field) {
        let name = item.get(key).and_then(Value::as_str);
        assert!(
            name.is_some_and(|n| route.policy.visible(list.kind, n)),
            "a client sees a hidden {method} item {item} in {text:?}"
        );
    }
}

/// Does `filtered` say what `original` says, less list items (the same members, each
/// list a subsequence of the original one)?
pub fn same_but_filtered(original: &Value, filtered: &Value, field: &str) -> bool {
    let (Value::Object(o), Value::Object(f)) = (original, filtered) else {
        return original == filtered;
    };
    if o.len() != f.len() {
        return false;
    }
    o.iter().all(|(k, ov)| {
        let Some(fv) = f.get(k) else { return false };
        match (k.as_str(), ov, fv) {
            ("result", Value::Object(or), Value::Object(fr)) => {
                or.len() == fr.len()
                    && or
                        .iter()
                        .all(|(rk, rv)| match (rk == field, rv, fr.get(rk)) {
                            (true, Value::Array(oi), Some(Value::Array(fi))) => {
                                let mut rest = oi.iter();
                                fi.iter().all(|item| rest.any(|o| o == item))
                            }
                            (_, rv, Some(fv)) => rv == fv,
                            _ => false,
                        })
            }
            _ => ov == fv,
        }
    })
}
