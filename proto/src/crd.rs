//! The Kubernetes custom resources: `McpServer` and `AccessPolicy` as CRDs (feature `kube`).
//!
//! The objects ([`McpServerObject`], [`AccessPolicyObject`]) are derived by kube-rs from
//! the same spec types the YAML resource model uses, so the CRD's OpenAPI schema, the
//! embedded store and the sidecar can never disagree on a field. The schema carries the
//! checks an API server can do on its own (required fields, enums, non-empty lists, name
//! and URL patterns); the rest (durations, globs, header names, cross-references) is
//! [`crate::resource`]'s validation, whose verdict the control plane writes to `status`.
//!
//! Credentials are not a CRD: in a cluster they are Kubernetes `Secret`s, referenced by
//! name from `spec.credential.secretRef`.
//!
//! This module does no I/O: it defines types and renders the CRD manifests.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::CustomResourceExt;
use serde::{Deserialize, Serialize};

pub use crate::resource::{AccessPolicyObject, McpServerObject};

/// `status` of both kinds, written by the control plane (one replica: the Lease holder).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: whether sidecars are being served this resource as written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A condition in the usual Kubernetes shape.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The condition's name, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One CamelCase word saying why, e.g. `Invalid`, `SecretMissing`.
    #[serde(default)]
    pub reason: String,
    /// What a person should know, naming the field at fault.
    #[serde(default)]
    pub message: String,
    /// RFC 3339 time the status last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

/// The CRD manifests, in the order they should be applied.
pub fn definitions() -> Vec<CustomResourceDefinition> {
    vec![McpServerObject::crd(), AccessPolicyObject::crd()]
}

/// The CRD manifests as one multi-document YAML text (what `deploy/` ships).
pub fn definitions_yaml() -> Result<String, String> {
    let mut out = String::from(
        "# Generated from the Rust spec types (toolmesh-proto, feature `kube`) by\n\
         # `toolmesh-control-plane crds`. Do not edit: a test compares this file with the\n\
         # generator's output.\n",
    );
    for crd in definitions() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd).map_err(|e| e.to_string())?);
    }
    Ok(out)
}
