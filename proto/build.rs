//! Compiles the snapshot schema with the vendored protoc, so a fresh machine
//! needs nothing beyond cargo.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // set_var is unsafe in edition 2024: hand protoc to prost-build directly.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    config.type_attribute(".", "#[derive(serde::Serialize)]");
    config.type_attribute(".", "#[serde(rename_all = \"camelCase\")]");
    // `/config` shows an action as `allow`/`deny`, not as its enum number.
    config.field_attribute(
        "toolmesh.v1alpha1.Rule.action",
        "#[serde(serialize_with = \"crate::render::action_name\")]",
    );
    // Maps as BTreeMaps: encoded in key order, so a snapshot's content hash (its
    // version) does not depend on a HashMap's random order.
    config.btree_map(["."]);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Small initial stream buffers: see src/codec.rs.
        .codec_path("crate::codec::LeanCodec")
        .compile_with_config(
            config,
            &[
                "toolmesh/v1alpha1/snapshot.proto",
                "toolmesh/v1alpha1/control.proto",
            ],
            &["."],
        )?;
    println!("cargo:rerun-if-changed=toolmesh/v1alpha1");
    Ok(())
}
