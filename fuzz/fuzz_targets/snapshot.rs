//! Snapshot decoding as a sidecar does it with bytes from the control plane or its
//! persisted `snapshot.pb`: protobuf decode, compile, recompile on top of itself, and
//! the redacted `/config` rendering.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use toolmesh_proto::v1alpha1 as pb;
use toolmesh_sidecar::snapshot::Runtime;

fuzz_target!(|data: &[u8]| {
    let Ok(snapshot) = pb::Snapshot::decode(data) else {
        return;
    };
    let Ok(runtime) = Runtime::compile(&snapshot, None) else {
        return;
    };
    let _ = runtime.config_json();
    let _ = Runtime::compile(&snapshot, Some(&runtime));
});
