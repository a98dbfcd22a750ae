//! The JSON-RPC envelope parser (`mcp::parse`) on arbitrary request bodies, then what
//! the request path does with what it read: the policy decision on the call's target
//! and arguments, and the header rules.
//!
//! The header rules are checked both ways: headers a conforming client derives from
//! the body (`Mcp-Method`, `Mcp-Name`, base64-wrapped when not plain ASCII) are always
//! accepted, and a method or name header that disagrees with the body never is.
#![no_main]

use base64::Engine as _;
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use toolmesh_sidecar::mcp::{self, Envelope, Message, Rejection, TargetKind};
use toolmesh_sidecar::policy::Decision;

/// What a header value can carry as is (visible ASCII, no surrounding blanks).
fn plain(text: &str) -> bool {
    text.bytes().all(|b| (b' '..=b'~').contains(&b))
        && text.trim() == text
        && !text.starts_with("=?base64?")
}

/// `Mcp-Name` as a client writes it.
fn name_header(name: &str) -> HeaderValue {
    let text = if plain(name) {
        name.to_owned()
    } else {
        let b64 = base64::engine::general_purpose::STANDARD.encode(name);
        format!("=?base64?{b64}?=")
    };
    HeaderValue::from_str(&text).expect("plain ASCII or base64")
}

/// The headers a conforming client sends with `m` (`None` if it cannot send them).
fn client_headers(m: &Message<'_>) -> Option<HeaderMap> {
    let version = m.meta_version.as_deref().unwrap_or(mcp::MODERN_VERSION);
    let mut headers = HeaderMap::new();
    if !plain(version) {
        return None;
    }
    headers.insert(mcp::HEADER_PROTOCOL_VERSION, version.parse().ok()?);
    if let Some(method) = m.method.as_deref() {
        if !plain(method) {
            return None;
        }
        headers.insert(mcp::HEADER_METHOD, method.parse().ok()?);
    }
    match m.target.as_deref() {
        Some(target) => {
            headers.insert(mcp::HEADER_NAME, name_header(target));
        }
        // A call without a target is not one a conforming client sends.
        None if m.rpc.is_some_and(|r| r.name_required()) => {
            return None;
        }
        None => {}
    }
    Some(headers)
}

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = mcp::parse(data) else {
        return;
    };
    let _ = envelope.id();
    let _ = mcp::check_headers(&HeaderMap::new(), &envelope);
    let route = toolmesh_fuzz::route();
    let messages: Vec<&Message<'_>> = match &envelope {
        Envelope::Single(m) => vec![m],
        Envelope::Batch(messages) => messages.iter().collect(),
    };
    for m in messages {
        if let Some(method) = m.rpc {
            let _ = (method.is_gated(), method.list(), method.name());
        }
        if let Some(subject) = &m.acts_on {
            let decision = route
                .policy
                .decide(subject.kind, &subject.name, m.arguments);
            // `d*` is denied when `repo` matches `secret/*`: however an upstream reads
            // the arguments, an allowed call must not name such a repo.
            if subject.kind == TargetKind::Tool
                && subject.name.starts_with('d')
                && matches!(decision, Decision::Allow(_))
            {
                let repo = m
                    .arguments
                    .and_then(|a| toolmesh_fuzz::lenient_json(a.get()))
                    .and_then(|a| a.get("repo")?.as_str().map(str::to_owned));
                assert!(
                    !repo.as_deref().is_some_and(|r| r.starts_with("secret/")),
                    "{} allowed with repo {repo:?}",
                    subject.name
                );
            }
        }
    }
    let Envelope::Single(m) = &envelope else {
        return;
    };
    let Some(headers) = client_headers(m) else {
        return;
    };
    let version = m.meta_version.as_deref().unwrap_or(mcp::MODERN_VERSION);
    assert_eq!(
        mcp::check_headers(&headers, &envelope),
        Ok(mcp::is_modern(version)),
        "a conforming client's headers {headers:?} are refused"
    );
    if let Some(method) = m.method.as_deref() {
        let mut wrong = headers.clone();
        let other = format!("{method}x").parse().expect("plain");
        wrong.insert(mcp::HEADER_METHOD, other);
        assert!(
            matches!(
                mcp::check_headers(&wrong, &envelope),
                Err(Rejection::Header(_))
            ),
            "a wrong Mcp-Method is accepted"
        );
    }
    if let Some(target) = m.target.as_deref() {
        let mut wrong = headers;
        wrong.insert(mcp::HEADER_NAME, name_header(&format!("{target}x")));
        assert!(
            matches!(
                mcp::check_headers(&wrong, &envelope),
                Err(Rejection::Header(_))
            ),
            "a wrong Mcp-Name is accepted"
        );
    }
});
