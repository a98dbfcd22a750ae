//! Pinned definitions (`pin::Pinned`): any bytes as the list item named `echo` of a
//! server whose pins approve one definition of it. An item is shown only if it is
//! that definition (its canonical form's digest is the pin's), whatever its key order,
//! spelling or duplicates; a hidden item's calls are refused from then on; an
//! unpinned name is never shown nor callable. Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use toolmesh_proto::pin::{Kind, digest};
use toolmesh_proto::v1alpha1 as pb;
use toolmesh_sidecar::mcp::TargetKind;
use toolmesh_sidecar::pin::Pinned;

const APPROVED: &str = r#"{"name":"echo","description":"Returns its text","inputSchema":{"type":"object","properties":{"text":{"type":"string"}}}}"#;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let approved: serde_json::Value = serde_json::from_str(APPROVED).expect("JSON");
    let pin = digest(Kind::Tool, &approved).expect("digest");
    let pins = pb::Pins {
        tools: [(
            "echo".to_owned(),
            pb::Pin {
                digest: pin.clone(),
                fields: Default::default(),
            },
        )]
        .into(),
        ..Default::default()
    };
    let pinned = Pinned::for_server("fuzz", &pins);
    let shown = pinned.admit(TargetKind::Tool, "echo", raw);
    let live = serde_json::from_str::<serde_json::Value>(raw)
        .ok()
        .and_then(|v| digest(Kind::Tool, &v).ok());
    assert_eq!(shown, live.as_deref() == Some(pin.as_str()), "{raw}");
    assert_eq!(pinned.call(TargetKind::Tool, "echo").is_none(), shown, "{raw}");
    assert!(!pinned.admit(TargetKind::Tool, "other", raw));
    assert!(pinned.call(TargetKind::Tool, "other").is_some());
});
