//! The JSON-RPC envelope parser (`mcp::parse`) on arbitrary request bodies, then the
//! header rules against headers that agree with the body and against none.
#![no_main]

use http::HeaderMap;
use libfuzzer_sys::fuzz_target;
use toolmesh_sidecar::mcp::{self, Envelope};

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = mcp::parse(data) else {
        return;
    };
    let _ = envelope.id();
    let _ = mcp::check_headers(&HeaderMap::new(), &envelope);
    if let Envelope::Single(m) = &envelope {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("mcp-protocol-version", Some("2026-07-28")),
            ("mcp-method", m.method.as_deref()),
            ("mcp-name", m.target.as_deref()),
        ] {
            if let Some(Ok(v)) = value.map(http::HeaderValue::from_str) {
                headers.insert(name, v);
            }
        }
        let _ = mcp::check_headers(&headers, &envelope);
        if let Some(method) = m.method.as_deref() {
            let _ = mcp::is_gated(method);
        }
    }
});
