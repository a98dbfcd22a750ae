//! Header handling: fuzz header lines (then a blank line, then a body) through the
//! MCP header rules, the upstream header hygiene in both directions, and the choice of
//! list framing from an upstream's `Content-Type`.
#![no_main]

use http::header;
use libfuzzer_sys::fuzz_target;
use toolmesh_sidecar::filter::Framing;
use toolmesh_sidecar::{mcp, upstream};

fuzz_target!(|data: &[u8]| {
    let (head, body) = toolmesh_fuzz::split_head(data);
    let headers = toolmesh_fuzz::headers(head);
    if let Ok(envelope) = mcp::parse(body) {
        let _ = mcp::check_headers(&headers, &envelope);
    }
    for value in headers.get_all(header::CONTENT_TYPE) {
        let _ = Framing::of(value.as_bytes());
    }
    let route = toolmesh_fuzz::route();
    let forwarded = upstream::forward_headers(headers.clone(), &route);
    // The agent's credentials never reach the upstream; the route's always does.
    for name in [header::COOKIE, header::PROXY_AUTHORIZATION, header::HOST, header::FORWARDED] {
        assert!(forwarded.get(&name).is_none(), "{name} forwarded");
    }
    // The sidecar is the edge: no forwarding header of the agent's goes on.
    assert!(forwarded.keys().all(|k| !k.as_str().starts_with("x-forwarded-")));
    let sent: Vec<_> = forwarded.get_all(header::AUTHORIZATION).iter().collect();
    assert_eq!(sent, ["Bearer fuzz"], "exactly the route's credential");
    // Nothing the agent's `Connection` header names goes on (hop-by-hop).
    for value in headers.get_all(header::CONNECTION) {
        for name in value.to_str().unwrap_or_default().split(',') {
            if let Ok(name) = header::HeaderName::from_bytes(name.trim().as_bytes()) {
                assert!(forwarded.get(&name).is_none() || name == header::AUTHORIZATION);
            }
        }
    }
    let mut response = headers;
    upstream::clean_response_headers(&mut response);
    assert!(response.get(header::TRANSFER_ENCODING).is_none());
    // Nothing that would send the agent around the sidecar comes back.
    for name in [header::LOCATION, header::LINK, header::WWW_AUTHENTICATE, header::ALT_SVC] {
        assert!(response.get(&name).is_none(), "{name} relayed");
    }
});
