//! The toolmesh contract, shared by the control plane and the sidecar.
//!
//! - [`v1alpha1`]: the protobuf snapshot schema (`proto/toolmesh/v1alpha1/snapshot.proto`),
//!   the one description of what a sidecar is told.
//! - [`resource`]: the YAML resource model (`McpServer`, `AccessPolicy`, `Secret`) that
//!   platform teams write, with validation that names the offending field.
//! - [`render`]: the one function that turns a set of resources plus an identity into
//!   that identity's [`v1alpha1::Snapshot`].
//!
//! - [`workload`]: identities as SPIFFE IDs, the names in workload certificates.
//! - [`origin`]: loopback authorities, and gateway mode's issuer and resource URLs.
//! - [`pin`]: pinned tool and prompt definitions: what is pinned, the canonical form
//!   (RFC 8785) and the digest.
//! - [`crd`] (feature `kube`): `McpServer` and `AccessPolicy` as Kubernetes custom
//!   resources, derived from the same spec types.
//! - `certs` (feature `certs`): serving certificates read from files and reloaded when
//!   they change, for every TLS port either binary terminates.
//! - [`otel`] (feature `otel`): OpenTelemetry tracing set up the same way by both
//!   binaries (OTLP export, sampling, the bounded export queue, W3C trace context).
//!
//! Besides `certs` and `otel`, this crate does no I/O and holds no runtime state: it parses,
//! validates and renders.
//! Compiling a snapshot into lookup tables for the request path is the sidecar's job.

#[cfg(feature = "certs")]
pub mod certs;
pub mod codec;
#[cfg(feature = "kube")]
pub mod crd;
pub mod glob;
pub mod origin;
#[cfg(feature = "otel")]
pub mod otel;
pub mod pin;
pub mod render;
pub mod resource;
pub mod workload;

/// Generated protobuf types of the `toolmesh.v1alpha1` package.
#[allow(missing_debug_implementations, clippy::all)]
pub mod v1alpha1 {
    include!(concat!(env!("OUT_DIR"), "/toolmesh.v1alpha1.rs"));
}

pub use render::render;
pub use resource::{Resource, ResourceError, parse_resources};

/// The largest encoded snapshot toolmesh supports. The control plane refuses an apply
/// that could render a larger one for any identity, and shows a snapshot that still
/// grew past it (a CRD store cannot refuse) as undeliverable in `toolmeshctl status`.
pub const MAX_SNAPSHOT_BYTES: usize = 16 * 1024 * 1024;

/// The largest gRPC message either side of every toolmesh gRPC service sends or
/// accepts: a snapshot push (or an apply's YAML, or a page of `get`/`status`) and its
/// envelope. Every client and server sets this one number.
pub const MAX_MESSAGE_BYTES: usize = MAX_SNAPSHOT_BYTES + 64 * 1024;

/// An error and its sources, `outer: inner: root`, each said once: transport errors
/// (tonic's, hyper's) stop their own text at the outermost ("transport error"), which
/// hides the cause a person needs (connection refused, a TLS or DNS failure).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let next = inner.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = inner.source();
    }
    text
}

/// The `apiVersion` every resource carries.
pub const API_VERSION: &str = "toolmesh.dev/v1alpha1";
