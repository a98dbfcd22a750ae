//! The YAML resource model platform teams write: `McpServer`, `AccessPolicy`, `Secret`.
//!
//! Every resource is Kubernetes-shaped (`apiVersion: toolmesh.dev/v1alpha1`, `kind`,
//! `metadata.name`, `spec`, or `data` for a `Secret`). Parsing is strict: unknown
//! fields are errors, and every error names the resource and the field path
//! (`McpServer/github: spec.endpoints[0].url: ...`). Parsing and validating are pure;
//! cross-resource checks (a rule naming a server that does not exist, a credential
//! naming a missing secret) happen in [`validate_set`], which the renderer runs.
//!
//! This module does not read files or talk to a store.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::API_VERSION;

mod validate;
pub use validate::{check_prefixes, validate_set};

/// Default time an upstream gets to answer with a response head. Longer than any MCP
/// client's own request timeout (the TypeScript SDK's is 60 s, the Python SDK reads
/// SSE for up to 300 s), so a slow tool that answers with one JSON body is cut by the
/// agent's client, which knows the call, and never first by the sidecar.
pub const DEFAULT_SERVER_TIMEOUT: Duration = Duration::from_secs(300);

/// A parsed, validated resource.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind")]
pub enum Resource {
    McpServer(McpServer),
    AccessPolicy(AccessPolicy),
    Secret(Secret),
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::McpServer(_) => Kind::McpServer,
            Resource::AccessPolicy(_) => Kind::AccessPolicy,
            Resource::Secret(_) => Kind::Secret,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Resource::McpServer(r) => &r.metadata.name,
            Resource::AccessPolicy(r) => &r.metadata.name,
            Resource::Secret(r) => &r.metadata.name,
        }
    }
}

/// The kinds of resource, as written in `kind:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    McpServer,
    AccessPolicy,
    Secret,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::McpServer, Kind::AccessPolicy, Kind::Secret];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::McpServer => "McpServer",
            Kind::AccessPolicy => "AccessPolicy",
            Kind::Secret => "Secret",
        }
    }

    /// Every name a person may use for the kind: singular, plural and the short name
    /// the CRDs declare (`kubectl get mcps`), in lowercase.
    pub fn names(self) -> &'static [&'static str] {
        match self {
            Kind::McpServer => &["mcpserver", "mcpservers", "mcps"],
            Kind::AccessPolicy => &["accesspolicy", "accesspolicies", "mcpap"],
            Kind::Secret => &["secret", "secrets"],
        }
    }

    /// The kind `text` names, in any case.
    pub fn from_name(text: &str) -> Option<Kind> {
        let lower = text.to_ascii_lowercase();
        Kind::ALL
            .into_iter()
            .find(|k| k.names().contains(&lower.as_str()))
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// DNS label (RFC 1123): lowercase letters, digits and `-`, at most 63 characters.
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An upstream MCP server reachable over Streamable HTTP.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct McpServer {
    #[serde(default = "api_version")]
    pub api_version: String,
    pub metadata: Metadata,
    pub spec: McpServerSpec,
}

/// Where the server is and how the sidecar reaches it.
// With the `kube` feature this also derives the custom resource `crd::McpServerObject`,
// whose OpenAPI schema comes from this type.
// Each printcolumn(...) repeats the same keys, which clippy takes for a mistake.
#[allow(clippy::duplicated_attributes)]
#[cfg_attr(feature = "kube", derive(kube::CustomResource, schemars::JsonSchema))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "toolmesh.dev",
        version = "v1alpha1",
        kind = "McpServer",
        doc = "An upstream MCP server reachable over Streamable HTTP; agents reach it at /mcp/<name>.",
        root = "McpServerObject",
        crates(
            kube_core = "::kube::core",
            k8s_openapi = "::k8s_openapi",
            schemars = "::schemars",
            serde = "::serde",
            serde_json = "::serde_json"
        ),
        namespaced,
        status = "crate::crd::ResourceStatus",
        shortname = "mcps",
        category = "toolmesh",
        printcolumn(
            name = "Ready",
            type_ = "string",
            json_path = r#".status.conditions[?(@.type=="Ready")].status"#
        ),
        printcolumn(
            name = "Reason",
            type_ = "string",
            json_path = r#".status.conditions[?(@.type=="Ready")].reason"#
        ),
        printcolumn(
            name = "Unauthenticated",
            type_ = "boolean",
            json_path = ".spec.allowUnauthenticated"
        ),
        printcolumn(
            name = "Pinned",
            type_ = "string",
            json_path = r#".status.conditions[?(@.type=="Pinned")].status"#
        ),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        )
    )
)]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct McpServerSpec {
    /// One or more Streamable HTTP endpoints of the same server.
    #[cfg_attr(feature = "kube", schemars(length(min = 1)))]
    pub endpoints: Vec<EndpointSpec>,
    /// A header the sidecar adds to every upstream request, its value from a `Secret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialSpec>,
    /// Time allowed for the upstream's response head, e.g. `30s` (default 5m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Accept that the server needs no credential. Without a credential only the
    /// sidecar holds, anything that reaches the server (an agent skipping its sidecar
    /// among them) can call it: validation refuses a server without `credential`
    /// unless this says so, and `kubectl get mcps` shows it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_unauthenticated: bool,
    /// The server runs behind a server-side sidecar (`--mode server`): agent sidecars
    /// reach it over mutual TLS with their workload certificates, and it decides again
    /// for each caller. The endpoints must then be `https://…/mcp/<name>` URLs of that
    /// sidecar. A server in the mesh needs no credential: the server-side sidecar
    /// refuses every connection without a workload certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<MeshSpec>,
    /// What the aggregated endpoint `/mcp` puts before this server's tool and prompt
    /// names: an agent sees `<prefix>__<name>`. Absent: the server's name. `""`: no
    /// prefix, for a server whose names must stay as they are (at most one such
    /// server). Letters, digits and `-`, at most 32; unique across servers.
    #[cfg_attr(feature = "kube", schemars(regex(pattern = PREFIX_PATTERN)))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// How the endpoints speak MCP: `streamable-http` (the default: 2025-03-26 and
    /// later, 2026-07-28) or `sse`, the legacy HTTP+SSE transport of 2024-11-05, where
    /// each endpoint URL is the server's GET stream (often `…/sse`) and the stream
    /// announces where to POST. The sidecar holds that stream and serves agents of
    /// both generations in front of it; agents never learn the server's address.
    #[serde(default, skip_serializing_if = "Transport::is_default")]
    pub transport: Transport,
    /// Approved tool and prompt definitions (the rug-pull defence): each sidecar checks
    /// every list it relays against them, hides what drifted (and, unless `unpinned:
    /// allow`, what has no pin) and refuses its calls. Absent: definitions are not
    /// checked. `toolmeshctl pin` proposes them; see the README's "Pinned definitions".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pins: Option<Box<PinsSpec>>,
    /// An OAuth 2.0 access token the sidecar obtains, caches until shortly before it
    /// expires, and sends as `Authorization: Bearer …` (instead of `credential`):
    /// client credentials, or an RFC 8693 token exchange of the pod's own identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth: Option<Box<OAuthSpec>>,
}

/// `McpServer.spec.oauth`.
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OAuthSpec {
    /// `client-credentials` (RFC 6749 §4.4: the sidecar is the client) or
    /// `token-exchange` (RFC 8693: the sidecar trades the pod's own token, its
    /// `--subject-token-file`, for one for this server, so the server sees who acts).
    pub grant: Grant,
    /// The authorization server's token endpoint (`https://`; `http://` only on
    /// loopback).
    #[cfg_attr(feature = "kube", schemars(regex(pattern = r"^https?://.+")))]
    pub token_url: String,
    /// The client id the sidecar authenticates as (required for `client-credentials`;
    /// with `token-exchange`, only if the authorization server wants client
    /// authentication).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client_id: String,
    /// The client secret (HTTP Basic authentication at the token endpoint). Sent only
    /// to sidecars that may use this server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_ref: Option<SecretRef>,
    /// Scopes asked for (`scope`, space-separated on the wire).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// `audience` asked for (RFC 8693; many servers also read it with client
    /// credentials).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub audience: String,
    /// `resource` asked for (RFC 8707): the server's URI, the audience of the token.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource: String,
}

/// `McpServer.spec.oauth.grant`.
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Grant {
    #[default]
    ClientCredentials,
    TokenExchange,
}

impl McpServerSpec {
    /// Every Secret this server's spec names: `(field path, reference)`.
    pub fn secret_refs(&self) -> Vec<(&'static str, &SecretRef)> {
        let mut refs = Vec::new();
        if let Some(c) = &self.credential {
            refs.push(("spec.credential.secretRef", &c.secret_ref));
        }
        if let Some(r) = self
            .oauth
            .as_ref()
            .and_then(|o| o.client_secret_ref.as_ref())
        {
            refs.push(("spec.oauth.clientSecretRef", r));
        }
        refs
    }
}

/// `McpServer.spec.pins`.
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PinsSpec {
    /// `enforce` (the default): a tool or prompt whose definition no longer matches its
    /// pin is hidden from lists and its calls and gets are refused. `warn`: it is relayed,
    /// and the drift only counted, audited and reported, for rolling pins out.
    #[serde(default, skip_serializing_if = "PinMode::is_default")]
    pub mode: PinMode,
    /// What happens to a tool or prompt that has no pin: `hide` (the default: hidden,
    /// its calls refused, like a drifted one) or `allow` (relayed; still reported, so
    /// `toolmeshctl pin` can propose a pin for it).
    #[serde(default, skip_serializing_if = "Unpinned::is_default")]
    pub unpinned: Unpinned,
    /// Tool name → its approved definition.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tools: BTreeMap<String, PinSpec>,
    /// Prompt name → its approved definition.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub prompts: BTreeMap<String, PinSpec>,
}

/// `McpServer.spec.pins.mode`.
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PinMode {
    /// Hide what drifted and refuse its calls.
    #[default]
    Enforce,
    /// Relay it; count, audit and report the drift.
    Warn,
}

impl PinMode {
    fn is_default(&self) -> bool {
        *self == PinMode::Enforce
    }
}

/// `McpServer.spec.pins.unpinned`.
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Unpinned {
    /// Treat a definition without a pin as drifted.
    #[default]
    Hide,
    /// Relay it.
    Allow,
}

impl Unpinned {
    fn is_default(&self) -> bool {
        *self == Unpinned::Hide
    }
}

/// One approved definition.
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PinSpec {
    /// `sha256:<64 hex>` of the definition's canonical form (RFC 8785 over its pinned
    /// members): what decides whether the live definition still matches.
    #[cfg_attr(feature = "kube", schemars(regex(pattern = r"^sha256:[0-9a-f]{64}$")))]
    pub digest: String,
    /// Pinned member (`description`, `inputSchema`, …) → 16 hex digits of its own
    /// digest. Optional: it only lets a drift name the members that changed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
}

/// `McpServer.spec.transport`.
#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// One POST endpoint (MCP 2025-03-26 and later).
    #[default]
    StreamableHttp,
    /// A GET stream announcing a POST endpoint (MCP 2024-11-05).
    Sse,
}

impl Transport {
    fn is_default(&self) -> bool {
        *self == Transport::StreamableHttp
    }
}

impl McpServerSpec {
    /// The prefix the aggregate uses for the server named `name`.
    pub fn effective_prefix<'a>(&'a self, name: &'a str) -> &'a str {
        self.prefix.as_deref().unwrap_or(name)
    }
}

/// What `spec.prefix` may be: empty, or letters, digits and `-` (no `_`, so the first
/// `__` of an exposed name always ends the prefix).
pub const PREFIX_PATTERN: &str = r"^([A-Za-z0-9]([-A-Za-z0-9]{0,30}[A-Za-z0-9])?)?$";

/// [`PREFIX_PATTERN`] as code.
pub fn is_prefix(prefix: &str) -> bool {
    prefix.is_empty()
        || (prefix.len() <= 32
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !prefix.starts_with('-')
            && !prefix.ends_with('-'))
}

#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshSpec {
    /// The identity the server-side sidecar runs as (`<namespace>/<serviceaccount>` in a
    /// cluster): its certificate must name it, and it is sent this server's policies.
    pub identity: String,
}

#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointSpec {
    /// `http://` or `https://` URL of the server's MCP endpoint.
    #[cfg_attr(feature = "kube", schemars(regex(pattern = r"^https?://.+")))]
    pub url: String,
}

#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CredentialSpec {
    /// Header name, e.g. `Authorization` or `X-API-Key`.
    pub header: String,
    /// The Secret (and key in it) holding the value.
    pub secret_ref: SecretRef,
    /// Text put before the secret's value, e.g. `"Bearer "`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecretRef {
    /// The Secret's name (in a cluster: a Kubernetes Secret in the control plane's namespace).
    #[cfg_attr(
        feature = "kube",
        schemars(regex(pattern = DNS_LABEL_PATTERN))
    )]
    pub name: String,
    /// The key inside the Secret's data.
    #[cfg_attr(feature = "kube", schemars(length(min = 1)))]
    pub key: String,
}

/// Credentials, in plain text, for standalone and embedded-store setups.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Secret {
    #[serde(default = "api_version")]
    pub api_version: String,
    pub metadata: Metadata,
    /// Key → secret value.
    pub data: BTreeMap<String, String>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never let a secret's value reach a log line through `{:?}`.
        f.debug_struct("Secret")
            .field("metadata", &self.metadata)
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Who may use which servers, tools, resources and prompts.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AccessPolicy {
    #[serde(default = "api_version")]
    pub api_version: String,
    pub metadata: Metadata,
    pub spec: AccessPolicySpec,
}

/// Who the policy is about (subjects) and what they may or may not do (rules).
// With the `kube` feature this also derives the custom resource
// `crd::AccessPolicyObject`, whose OpenAPI schema comes from this type.
// Each printcolumn(...) repeats the same keys, which clippy takes for a mistake.
#[allow(clippy::duplicated_attributes)]
#[cfg_attr(feature = "kube", derive(kube::CustomResource, schemars::JsonSchema))]
#[cfg_attr(
    feature = "kube",
    kube(
        group = "toolmesh.dev",
        version = "v1alpha1",
        kind = "AccessPolicy",
        doc = "Who may use which servers, tools, resources and prompts. Default deny: what no rule allows is refused, and a deny rule wins.",
        root = "AccessPolicyObject",
        plural = "accesspolicies",
        crates(
            kube_core = "::kube::core",
            k8s_openapi = "::k8s_openapi",
            schemars = "::schemars",
            serde = "::serde",
            serde_json = "::serde_json"
        ),
        namespaced,
        status = "crate::crd::ResourceStatus",
        shortname = "mcpap",
        category = "toolmesh",
        printcolumn(
            name = "Ready",
            type_ = "string",
            json_path = r#".status.conditions[?(@.type=="Ready")].status"#
        ),
        printcolumn(
            name = "Reason",
            type_ = "string",
            json_path = r#".status.conditions[?(@.type=="Ready")].reason"#
        ),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        )
    )
)]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AccessPolicySpec {
    /// Who this policy is about; at least one.
    #[cfg_attr(feature = "kube", schemars(length(min = 1)))]
    pub subjects: Vec<SubjectSpec>,
    /// What they may (or may not) do; at least one rule.
    #[cfg_attr(feature = "kube", schemars(length(min = 1)))]
    pub rules: Vec<RuleSpec>,
}

#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SubjectSpec {
    /// Identity glob, e.g. `agents/triage` or `agents/*`. Alone, it names workloads
    /// (sidecars, by their `--identity` or certificate). Beside `issuer`, it names the
    /// Kubernetes service accounts whose tokens that issuer signs, as
    /// `<namespace>/<serviceaccount>` (gateway mode).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub identity: String,
    /// Gateway mode: the token's `sub` (the user), a glob.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// Gateway mode: the token's issuer (`iss`), exactly; one of the gateway's
    /// `--issuer`s.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub issuer: String,
    /// Gateway mode: the OAuth client the token was issued to (`client_id`, else
    /// `azp`), a glob.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client_id: String,
    /// Gateway mode: scopes the token must all carry (`scope`, space-separated, or
    /// `scp`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// Gateway mode: claims the token must carry, each matching its glob (a string as
    /// written, a number or boolean as JSON writes it, an array when any element does).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub claims: std::collections::BTreeMap<String, String>,
}

impl SubjectSpec {
    /// Whether this subject is about callers presenting a token (gateway mode): it
    /// sets any matcher besides `identity`. Such a subject never matches a workload.
    pub fn is_token(&self) -> bool {
        !(self.user.is_empty()
            && self.issuer.is_empty()
            && self.client_id.is_empty()
            && self.scopes.is_empty()
            && self.claims.is_empty())
    }

    /// Whether this subject names the workload `identity` (a sidecar).
    pub fn matches_workload(&self, identity: &str) -> bool {
        !self.is_token()
            && !self.identity.is_empty()
            && crate::glob::matches(&self.identity, identity)
    }
}

#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleSpec {
    /// The `McpServer` this rule is about.
    #[cfg_attr(
        feature = "kube",
        schemars(regex(pattern = DNS_LABEL_PATTERN))
    )]
    pub server: String,
    /// Tool name globs (`*` any run of characters, `?` one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
    /// Resource URI globs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<String>,
    /// Prompt name globs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompts: Vec<String>,
    /// `allow` (default) or `deny`; deny beats allow. An allow rule listing no tools,
    /// resources or prompts grants the server's plumbing (initialize, lists) only.
    #[serde(default)]
    pub action: ActionSpec,
    /// A token-bucket limit on the calls this rule allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// Conditions on `params.arguments`; all must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<ConditionSpec>,
    /// What audit lines record for calls this rule covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditSpec>,
}

#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionSpec {
    #[default]
    Allow,
    Deny,
}

#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// Calls allowed per window; at least 1.
    #[cfg_attr(feature = "kube", schemars(range(min = 1)))]
    pub requests: u32,
    /// Window, e.g. `1m`, `10s`.
    pub per: String,
    /// `tool` (default): a budget per tool, resource or prompt the rule covers;
    /// `rule`: one budget shared by every call the rule covers (a server-level limit).
    #[serde(default)]
    pub scope: RateLimitScope,
}

#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitScope {
    #[default]
    Tool,
    Rule,
}

#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConditionSpec {
    /// Dotted path into the call's arguments, e.g. `repo`.
    pub argument: String,
    /// Glob the argument's string value must match.
    pub matches: String,
}

#[cfg_attr(feature = "kube", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuditSpec {
    /// Log the call's arguments (off by default: they may hold personal data).
    #[serde(default)]
    pub arguments: bool,
}

fn api_version() -> String {
    API_VERSION.to_owned()
}

/// Why a resource (or a set of them) was refused. Always names where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    #[error("document {index} (line {line}): not valid YAML: {message}")]
    Yaml {
        index: usize,
        line: usize,
        message: String,
    },
    #[error("{bytes} bytes of YAML is more than the {limit} bytes read at once")]
    TooLarge { bytes: usize, limit: usize },
    #[error("document {index}: {field}: {message}")]
    Document {
        index: usize,
        field: String,
        message: String,
    },
    #[error("{kind}/{name}: {field}: {message}")]
    Field {
        kind: Kind,
        name: String,
        field: String,
        message: String,
    },
}

/// Events YAML anchors may record, and aliases replay, in one text. Anchors spare
/// repetition in a written file (`tools: &all ["*"]`, then `resources: *all`), but
/// nested anchors record every event once per enclosing anchor, and nested aliases
/// multiply: at serde-saphyr's defaults (a million each) 500 bytes of aliases took a
/// tenth of a second to refuse, and 50 KB of anchors a third. At this bound either
/// costs less than parsing 64 KiB of plain YAML; written files stay far below it.
pub const MAX_ANCHOR_EVENTS: usize = 10_000;

/// The most YAML read at once (one apply, one seed, one config file): documents are
/// bounded by bytes, not by count.
pub const MAX_YAML_BYTES: usize = crate::MAX_SNAPSHOT_BYTES;

/// Parse a multi-document YAML text into validated resources.
///
/// Documents are split at `---` lines and parsed one by one, so an error names the
/// document (counted from 0, empty ones not counted) and its first line. The first bad document stops the parse: a
/// config is taken whole or not at all.
pub fn parse_resources(text: &str) -> Result<Vec<Resource>, ResourceError> {
    if text.len() > MAX_YAML_BYTES {
        return Err(ResourceError::TooLarge {
            bytes: text.len(),
            limit: MAX_YAML_BYTES,
        });
    }
    let mut out = Vec::new();
    for (index, (line, doc)) in documents(text).into_iter().enumerate() {
        let options = serde_saphyr::options! {
            budget: serde_saphyr::budget! {
                max_recorded_anchor_events: MAX_ANCHOR_EVENTS,
            },
            alias_limits: serde_saphyr::alias_limits! {
                max_total_replayed_events: MAX_ANCHOR_EVENTS,
            },
        };
        let parsed: Result<Option<serde_json::Value>, _> =
            serde_saphyr::from_str_with_options(doc, options);
        let value = parsed.map_err(|_| ResourceError::Yaml {
            index,
            line,
            message: yaml_error_at(line, doc),
        })?;
        match value {
            None | Some(serde_json::Value::Null) => continue,
            Some(doc) => out.push(parse_document(index, doc)?),
        }
    }
    Ok(out)
}

/// The parser's message for a bad document, its line numbers counted in the whole
/// text (the document is parsed again behind `line - 1` blank lines: only on error).
fn yaml_error_at(line: usize, doc: &str) -> String {
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_recorded_anchor_events: MAX_ANCHOR_EVENTS,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: MAX_ANCHOR_EVENTS,
        },
    };
    let padded = format!("{}{doc}", "\n".repeat(line.saturating_sub(1)));
    match serde_saphyr::from_str_with_options::<Option<serde_json::Value>>(&padded, options) {
        Err(e) => e.to_string(),
        Ok(_) => "unreadable".to_owned(),
    }
}

/// The documents of a YAML stream with the line each starts on (1-based): split at
/// lines that are `---` (alone, or followed by a space or tab, content may follow on
/// the line) and after `...` lines. Such a line can only be a document marker: inside
/// a block scalar or a flow collection content is indented, and a `---` at column 0
/// ends the document for every YAML parser. Documents holding only blank lines,
/// comments and directives are left out (so a file that opens with `---` is one
/// document, not two).
fn documents(text: &str) -> Vec<(usize, &str)> {
    // (first line, body start, end) of each document.
    let mut bounds = Vec::new();
    let (mut line, mut start, mut offset) = (1, 0, 0);
    for (n, raw) in text.split_inclusive('\n').enumerate() {
        let bare = raw.trim_end_matches(['\n', '\r']);
        let opens = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if opens || bare == "..." {
            bounds.push((line, start, offset));
            (line, start) = if opens {
                (n + 1, offset + 3)
            } else {
                (n + 2, offset + raw.len())
            };
        }
        offset += raw.len();
    }
    bounds.push((line, start, text.len()));
    let content = |doc: &str| {
        doc.lines().any(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#') && !t.starts_with('%')
        })
    };
    bounds
        .into_iter()
        .filter_map(|(line, start, end)| {
            let doc = text.get(start..end)?;
            content(doc).then_some((line, doc))
        })
        .collect()
}

/// Parse one document (already decoded from YAML or JSON) into a validated resource.
pub fn parse_document(index: usize, doc: serde_json::Value) -> Result<Resource, ResourceError> {
    let doc_err = |field: &str, message: String| ResourceError::Document {
        index,
        field: field.to_owned(),
        message,
    };
    let obj = doc
        .as_object()
        .ok_or_else(|| doc_err("(root)", "expected a mapping".to_owned()))?;
    match obj.get("apiVersion").and_then(|v| v.as_str()) {
        Some(API_VERSION) => {}
        Some(other) => {
            return Err(doc_err(
                "apiVersion",
                format!("unsupported {other:?}, expected {API_VERSION:?}"),
            ));
        }
        None => return Err(doc_err("apiVersion", "missing".to_owned())),
    }
    let kind = match obj.get("kind").and_then(|v| v.as_str()) {
        Some("McpServer") => Kind::McpServer,
        Some("AccessPolicy") => Kind::AccessPolicy,
        Some("Secret") => Kind::Secret,
        Some(other) => {
            return Err(doc_err(
                "kind",
                format!("unknown kind {other:?}, expected one of McpServer, AccessPolicy, Secret"),
            ));
        }
        None => return Err(doc_err("kind", "missing".to_owned())),
    };
    let name = obj
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("<unnamed>")
        .to_owned();
    let mut body = doc;
    if let Some(map) = body.as_object_mut() {
        map.remove("kind");
    }
    let field_err = |field: String, message: String| ResourceError::Field {
        kind,
        name: name.clone(),
        field,
        message,
    };
    let resource = match kind {
        Kind::McpServer => Resource::McpServer(decode(body, &field_err)?),
        Kind::AccessPolicy => Resource::AccessPolicy(decode(body, &field_err)?),
        Kind::Secret => Resource::Secret(decode(body, &field_err)?),
    };
    validate::validate_resource(&resource).map_err(|(field, message)| field_err(field, message))?;
    Ok(resource)
}

fn decode<T: serde::de::DeserializeOwned>(
    body: serde_json::Value,
    err: &impl Fn(String, String) -> ResourceError,
) -> Result<T, ResourceError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "(root)".to_owned()
        } else {
            path
        };
        err(field, e.into_inner().to_string())
    })
}

/// Parse a duration such as `30s`, `1m`, `500ms`, `1h 30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("invalid duration {text:?}: {e} (examples: 500ms, 30s, 1m)"))?;
    if d.is_zero() {
        return Err(format!(
            "invalid duration {text:?}: must be greater than zero"
        ));
    }
    Ok(d)
}

/// [`is_dns_label`] as a regular expression, for the CRD schemas.
pub const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$";

/// Names that may be used as `metadata.name` (and so in paths and tool prefixes).
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// All resources of one kind, keyed by name, as a set the renderer can look into.
#[derive(Debug, Default, Clone)]
pub struct ResourceSet {
    pub servers: BTreeMap<String, McpServer>,
    pub policies: BTreeMap<String, AccessPolicy>,
    pub secrets: BTreeMap<String, Secret>,
}

impl ResourceSet {
    /// Index resources by kind and name; a name used twice within a kind is an error.
    pub fn new(resources: impl IntoIterator<Item = Resource>) -> Result<Self, ResourceError> {
        let mut set = ResourceSet::default();
        let mut seen = BTreeSet::new();
        for r in resources {
            if !seen.insert((r.kind(), r.name().to_owned())) {
                return Err(ResourceError::Field {
                    kind: r.kind(),
                    name: r.name().to_owned(),
                    field: "metadata.name".to_owned(),
                    message: "defined more than once".to_owned(),
                });
            }
            match r {
                Resource::McpServer(s) => {
                    set.servers.insert(s.metadata.name.clone(), s);
                }
                Resource::AccessPolicy(p) => {
                    set.policies.insert(p.metadata.name.clone(), p);
                }
                Resource::Secret(s) => {
                    set.secrets.insert(s.metadata.name.clone(), s);
                }
            }
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests;
