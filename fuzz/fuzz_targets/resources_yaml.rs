//! The YAML resources parser and validator, then rendering a snapshot for an
//! identity: what the standalone sidecar and the control plane (`toolmeshctl apply`)
//! do with a file. Rendering must be deterministic, its snapshot must survive protobuf
//! encoding, and what renders must compile in a sidecar.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use toolmesh_proto::resource::ResourceSet;
use toolmesh_proto::v1alpha1 as pb;
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
        let Ok(snapshot) = render(&set, identity) else {
            continue;
        };
        assert_eq!(render(&set, identity).ok().as_ref(), Some(&snapshot));
        let decoded = pb::Snapshot::decode(snapshot.encode_to_vec().as_slice());
        assert_eq!(decoded.ok().as_ref(), Some(&snapshot));
        let _ = toolmesh_sidecar::snapshot::Runtime::compile(&snapshot, None);
    }
});
