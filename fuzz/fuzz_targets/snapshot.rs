//! Snapshot decoding as a sidecar does it with bytes from the control plane or its
//! persisted `snapshot.pb`: protobuf decode, the checks before use, compile, recompile
//! on top of itself (rate limiters carried over), and the redacted `/config` rendering.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use toolmesh_proto::render::REDACTED;
use toolmesh_proto::v1alpha1 as pb;
use toolmesh_sidecar::discovery;
use toolmesh_sidecar::snapshot::Runtime;

fuzz_target!(|data: &[u8]| {
    let Ok(snapshot) = pb::Snapshot::decode(data) else {
        return;
    };
    for require_https in [false, true] {
        let _ = discovery::vet(&snapshot, "agents/fuzz", require_https);
    }
    let Ok(runtime) = Runtime::compile(&snapshot, None) else {
        return;
    };
    // The `/config` document never shows a credential's value.
    let config: serde_json::Value =
        serde_json::from_slice(&runtime.config_json()).expect("/config is JSON");
    for server in config["servers"].as_array().into_iter().flatten() {
        let value = &server["credential"]["value"];
        assert!(value.is_null() || *value == REDACTED, "{value} shown");
    }
    let _ = Runtime::compile(&snapshot, Some(&runtime));
});
