//! Header handling: fuzz header lines (then a blank line, then a body) through the
//! MCP header rules and the upstream header hygiene in both directions.
#![no_main]

use libfuzzer_sys::fuzz_target;
use toolmesh_sidecar::{mcp, upstream};

fuzz_target!(|data: &[u8]| {
    let (head, body) = toolmesh_fuzz::split_head(data);
    let headers = toolmesh_fuzz::headers(head);
    if let Ok(envelope) = mcp::parse(body) {
        let _ = mcp::check_headers(&headers, &envelope);
    }
    let route = toolmesh_fuzz::route();
    let forwarded = upstream::forward_headers(headers.clone(), &route);
    // The agent's credentials never reach the upstream; the route's always does.
    assert!(forwarded.get_all("cookie").iter().next().is_none());
    assert_eq!(
        forwarded.get_all("authorization").iter().count(),
        1,
        "exactly the route's credential"
    );
    let mut response = headers;
    upstream::clean_response_headers(&mut response);
});
