//! List filtering on upstream response bytes: the SSE event parser and filter with the
//! stream cut into frames at fuzz-chosen points, and the JSON filter on the whole body.
//!
//! Beyond "no panic", what a client makes of the output is checked against the policy:
//! parsed the way agents' clients parse (WHATWG SSE rules, lenient JSON), no event and
//! no body shows a hidden item, and every JSON-RPC object event still arrives, in
//! order, unchanged but for hidden items.
#![no_main]

use std::sync::LazyLock;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use toolmesh_fuzz::{assert_only_visible, list_fields, same_but_filtered, sse_events};
use toolmesh_sidecar::body::{self, BodyError};
use toolmesh_sidecar::filter::{self, ListKind};

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
});

/// A JSON-RPC object as a strict reader sees it (what must get through).
fn object(text: &str) -> Option<Value> {
    serde_json::from_str::<Value>(text)
        .ok()
        .filter(Value::is_object)
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    // Frame sizes 1..=32 from the first byte, repeating.
    let size = usize::from(cut % 32) + 1;
    let frames: Vec<Result<http_body::Frame<Bytes>, BodyError>> = stream
        .chunks(size)
        .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let method = [
        "tools/list",
        "resources/list",
        "prompts/list",
        "resources/templates/list",
    ][usize::from(cut >> 6)];
    let list = ListKind::of(method).expect("a list method");
    let (field, _) = list_fields(method);
    let route = toolmesh_fuzz::route();
    RUNTIME.block_on(async {
        let sse_in = StreamBody::new(futures_util::stream::iter(frames)).boxed();
        if let Ok(out) = filter::sse(sse_in, route.clone(), filter::Lists::One(list)).collect().await {
            let out = out.to_bytes();
            if !stream.windows(5).any(|w| w == b"data:") {
                assert_eq!(out, Bytes::copy_from_slice(stream), "nothing to filter");
            }
            let sent = sse_events(&out);
            for event in &sent {
                assert_only_visible(&route, method, event);
            }
            let mut arrived = sent.iter();
            for event in sse_events(stream) {
                let Some(original) = object(&event) else {
                    continue;
                };
                let found = arrived.any(|e| {
                    *e == event
                        || object(e).is_some_and(|f| same_but_filtered(&original, &f, field))
                });
                assert!(found, "event {event:?} lost or changed: {sent:?}");
            }
        }
        let body = body::full(Bytes::copy_from_slice(stream));
        if let Ok(out) = filter::json(body, &route, &filter::Lists::One(list)).await {
            let text = String::from_utf8_lossy(&out);
            assert_only_visible(&route, method, &text);
            if let Some(original) = std::str::from_utf8(stream).ok().and_then(object) {
                let kept = *out == *stream
                    || object(&text).is_some_and(|f| same_but_filtered(&original, &f, field));
                assert!(kept, "body changed beyond its list: {text:?}");
            }
        }
    });
});
