//! The YAML resources parser and validator, then rendering a snapshot for an
//! identity: what the standalone sidecar and the control plane do with a file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use toolmesh_proto::resource::ResourceSet;
use toolmesh_proto::{parse_resources, render};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(resources) = parse_resources(text) else {
        return;
    };
    let Ok(set) = ResourceSet::new(resources) else {
        return;
    };
    for identity in ["agents/a", "agents/fuzz", ""] {
        if let Ok(snapshot) = render(&set, identity) {
            // What renders must compile in a sidecar.
            let _ = toolmesh_sidecar::snapshot::Runtime::compile(&snapshot, None);
        }
    }
});
