//! What tracing costs one request in the sidecar's own code and the SDK's span
//! handling (not the export): the SERVER span's life (new, start, finish, audit ids,
//! hold), the CLIENT span with the header and `_meta` written, for a request that is
//! not sampled and for one that is; and `with_meta` alone.
//!
//! `cargo bench -p toolmesh-sidecar --bench trace` prints nanoseconds per request.
//! Ended spans go nowhere (no processor): what exporting costs is in
//! docs/benchmarks.md, measured with the whole sidecar.

#[path = "support/timing.rs"]
mod timing;

use std::hint::black_box;
use std::time::SystemTime;

use bytes::Bytes;
use http::HeaderMap;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use toolmesh_sidecar::trace::{self, Finish, Server};

const BATCH: u32 = 50_000;
const ROUNDS: usize = 5;
const BODY: &[u8] = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"get_issue","arguments":{"repo":"toolmesh/toolmesh","number":42},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;

fn best_ns(f: impl FnMut()) -> f64 {
    timing::best_ns(BATCH, ROUNDS, f)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut headers = HeaderMap::new();
    headers.insert(http::header::HOST, "127.0.0.1:16001".parse().expect("host"));
    headers.insert(
        "mcp-protocol-version",
        "2026-07-28".parse().expect("version"),
    );
    let uri: http::Uri = "http://127.0.0.1:8080/mcp".parse().expect("uri");

    let empty = best_ns(|| {
        black_box(runtime.block_on(trace::scope(async { black_box(1) })));
    });
    println!("scope and block_on alone: {empty:.0} ns");
    for (what, sampler) in [
        ("not sampled", Sampler::AlwaysOff),
        ("sampled", Sampler::AlwaysOn),
    ] {
        let provider = SdkTracerProvider::builder().with_sampler(sampler).build();
        let tracer = provider.tracer("bench");
        let ns = best_ns(|| {
            runtime.block_on(trace::scope(async {
                let mut server = Server::new(&tracer, &headers, SystemTime::now());
                server.start(&headers);
                let (mut up, mut body) = (HeaderMap::new(), Bytes::from_static(BODY));
                let client = trace::client(Some(&tracer), "github", &uri, &mut up, &mut body);
                if let Some(c) = &client {
                    trace::answered(c, 200);
                }
                server.finish(Finish {
                    method: "tools/call",
                    kind: Some("tool"),
                    name: Some("get_issue"),
                    request_id: None,
                    session: None,
                    server: "github",
                    subject: "agents/triage",
                    decision: "allowed",
                    rule: Some("triage/rules[0]"),
                    outcome: "ok",
                    status: 200,
                    error_code: None,
                });
                black_box(server.ids());
                black_box((server.hold(), client, body, up));
            }));
        });
        println!("a request's tracing, {what}: {:.0} ns", ns - empty);
    }
    let ns = best_ns(|| {
        black_box(trace::with_meta(
            BODY,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            None,
        ));
    });
    println!("with_meta alone: {ns:.0} ns");
}
