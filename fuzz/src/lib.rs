//! What the fuzz targets share: a compiled route to filter and forward with, and a
//! way to turn fuzz bytes into an HTTP header map.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use toolmesh_proto::v1alpha1 as pb;
use toolmesh_sidecar::snapshot::{Route, Runtime};

/// A route `s` with a credential, whose policy shows tools `a*` and `t?`, resources
/// `file:///ok/*` and prompt `p`.
pub fn route() -> Arc<Route> {
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
        }],
        policies: vec![pb::Policy {
            name: "p".into(),
            rules: vec![pb::Rule {
                server: "s".into(),
                tools: vec!["a*".into(), "t?".into()],
                resources: vec!["file:///ok/*".into()],
                prompts: vec!["p".into()],
                ..Default::default()
            }],
        }],
    };
    let runtime = Runtime::compile(&snapshot, None).expect("the fixed snapshot compiles");
    runtime.route("s").expect("route s").clone()
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
