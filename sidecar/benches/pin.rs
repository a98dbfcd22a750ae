//! What pinning costs per list item on the relay path: the steady case (the server
//! sends the bytes it sent before: one lookup and one comparison) and a definition seen
//! for the first time (parsed, put in canonical form, hashed).
//!
//! `cargo bench -p toolmesh-sidecar --bench pin` prints nanoseconds per item. The
//! whole-sidecar figure (a 500-tool list with and without pins) is in
//! docs/benchmarks.md.

#[path = "support/timing.rs"]
mod timing;

use std::hint::black_box;

use toolmesh_proto::pin::{Kind, digest};
use toolmesh_proto::v1alpha1 as pb;
use toolmesh_sidecar::mcp::TargetKind;
use toolmesh_sidecar::pin::Pinned;

const TOOLS: usize = 500;

fn definition(i: usize) -> String {
    format!(
        r#"{{"name":"t{i:03}","description":"Benchmark tool number {i}, which does nothing useful","inputSchema":{{"type":"object","properties":{{"text":{{"type":"string"}}}}}}}}"#
    )
}

fn main() {
    let items: Vec<(String, String)> = (0..TOOLS)
        .map(|i| (format!("t{i:03}"), definition(i)))
        .collect();
    let tools = items
        .iter()
        .map(|(name, raw)| {
            let value = serde_json::from_str(raw).expect("JSON");
            let pin = pb::Pin {
                digest: digest(Kind::Tool, &value).expect("digest"),
                fields: Default::default(),
            };
            (name.clone(), pin)
        })
        .collect();
    let pins = pb::Pins {
        tools,
        ..Default::default()
    };
    let pinned = Pinned::for_server("bench", &pins);
    let steady = timing::best_ns(200, 5, || {
        for (name, raw) in &items {
            black_box(pinned.admit(TargetKind::Tool, name, raw));
        }
    }) / TOOLS as f64;
    println!("an item seen before (steady server): {steady:.0} ns");
    // Two spellings of one definition, alternating: each call sees other bytes than the
    // last, so each is parsed, put in canonical form and hashed.
    let (name, raw) = &items[0];
    let spaced = raw.replacen(':', ": ", 1);
    let mut flip = false;
    let fresh = timing::best_ns(20_000, 5, || {
        flip = !flip;
        let raw = if flip { raw } else { &spaced };
        black_box(pinned.admit(TargetKind::Tool, name, raw));
    });
    println!("an item whose bytes changed (parsed, canonical form, SHA-256): {fresh:.0} ns");
}
