//! List filtering on upstream response bytes: the SSE event parser and filter with the
//! stream cut into frames at fuzz-chosen points, and the JSON filter on the whole body.
#![no_main]

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use libfuzzer_sys::fuzz_target;
use toolmesh_sidecar::body::{self, BodyError};
use toolmesh_sidecar::filter::{self, ListKind};

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
    let route = toolmesh_fuzz::route();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let sse_in = StreamBody::new(futures_util::stream::iter(frames)).boxed();
        let out = filter::sse(sse_in, route.clone(), list).collect().await;
        // Filtering only ever removes: never more bytes out than a whole re-encode
        // could need, and events without a list pass through byte for byte.
        if let Ok(out) = out {
            let out = out.to_bytes();
            if !stream.windows(5).any(|w| w == b"data:") {
                assert_eq!(out, Bytes::copy_from_slice(stream));
            }
        }
        let _ = filter::json(body::full(Bytes::copy_from_slice(stream)), &route, list).await;
    });
});
