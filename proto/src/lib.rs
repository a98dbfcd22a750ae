//! The toolmesh contract, shared by the control plane and the sidecar.
//!
//! - [`v1alpha1`]: the protobuf snapshot schema (`proto/toolmesh/v1alpha1/snapshot.proto`),
//!   the one description of what a sidecar is told.
//! - [`resource`]: the YAML resource model (`McpServer`, `AccessPolicy`, `Secret`) that
//!   platform teams write, with validation that names the offending field.
//! - [`render`]: the one function that turns a set of resources plus an identity into
//!   that identity's [`v1alpha1::Snapshot`].
//!
//! - [`crd`] (feature `kube`): `McpServer` and `AccessPolicy` as Kubernetes custom
//!   resources, derived from the same spec types.
//!
//! This crate does no I/O and holds no runtime state: it parses, validates and renders.
//! Compiling a snapshot into lookup tables for the request path is the sidecar's job.

pub mod codec;
#[cfg(feature = "kube")]
pub mod crd;
pub mod glob;
pub mod render;
pub mod resource;

/// Generated protobuf types of the `toolmesh.v1alpha1` package.
#[allow(missing_debug_implementations, clippy::all)]
pub mod v1alpha1 {
    include!(concat!(env!("OUT_DIR"), "/toolmesh.v1alpha1.rs"));
}

pub use render::render;
pub use resource::{Resource, ResourceError, parse_resources};

/// The `apiVersion` every resource carries.
pub const API_VERSION: &str = "toolmesh.dev/v1alpha1";
