//! Field-level checks on one resource, and reference checks across a set.
//!
//! Errors are `(field path, message)` pairs; the caller adds kind and name.

use super::{
    AccessPolicy, Kind, McpServer, Resource, ResourceError, ResourceSet, Secret, SubjectSpec,
    is_dns_label, parse_duration,
};

type FieldResult = Result<(), (String, String)>;

fn fail(field: impl Into<String>, message: impl Into<String>) -> FieldResult {
    Err((field.into(), message.into()))
}

pub(super) fn validate_resource(resource: &Resource) -> FieldResult {
    let metadata = match resource {
        Resource::McpServer(r) => &r.metadata,
        Resource::AccessPolicy(r) => &r.metadata,
        Resource::Secret(r) => &r.metadata,
    };
    if !is_dns_label(&metadata.name) {
        return fail(
            "metadata.name",
            format!(
                "{:?} is not a DNS label (lowercase letters, digits and '-', at most 63)",
                metadata.name
            ),
        );
    }
    match resource {
        Resource::McpServer(s) => validate_server(s),
        Resource::AccessPolicy(p) => validate_policy(p),
        Resource::Secret(s) => validate_secret(s),
    }
}

fn validate_server(server: &McpServer) -> FieldResult {
    let spec = &server.spec;
    if spec.endpoints.is_empty() {
        return fail("spec.endpoints", "at least one endpoint is required");
    }
    for (i, ep) in spec.endpoints.iter().enumerate() {
        validate_url(&ep.url).map_err(|m| (format!("spec.endpoints[{i}].url"), m))?;
    }
    if let Some(cred) = &spec.credential {
        if !is_header_name(&cred.header) {
            return fail(
                "spec.credential.header",
                format!("{:?} is not a valid HTTP header name", cred.header),
            );
        }
        if is_reserved_header(&cred.header) {
            return fail(
                "spec.credential.header",
                format!(
                    "{:?} is managed by the proxy and cannot carry a credential",
                    cred.header
                ),
            );
        }
        if !is_dns_label(&cred.secret_ref.name) {
            return fail("spec.credential.secretRef.name", "must name a Secret");
        }
        if cred.secret_ref.key.is_empty() {
            return fail("spec.credential.secretRef.key", "must not be empty");
        }
        if !is_header_value(&cred.prefix) {
            return fail("spec.credential.prefix", "must be printable ASCII");
        }
    }
    if let Some(t) = &spec.timeout {
        parse_duration(t).map_err(|m| ("spec.timeout".to_owned(), m))?;
    }
    if let Some(mesh) = &spec.mesh {
        let id = &mesh.identity;
        if id.is_empty() || id.len() > 253 || id.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return fail(
                "spec.mesh.identity",
                "must be an identity (e.g. namespace/serviceaccount): 1 to 253 bytes, no whitespace or control characters",
            );
        }
        let path = format!("/mcp/{}", server.metadata.name);
        for (i, ep) in spec.endpoints.iter().enumerate() {
            let rest = ep.url.strip_prefix("https://").ok_or_else(|| {
                (
                    format!("spec.endpoints[{i}].url"),
                    "must be https:// when spec.mesh is set: the server-side sidecar only speaks mutual TLS".to_owned(),
                )
            })?;
            let at = rest.find(['/', '?']).unwrap_or(rest.len());
            if rest[at..] != path {
                return fail(
                    format!("spec.endpoints[{i}].url"),
                    format!(
                        "must end in {path} when spec.mesh is set: the server-side sidecar serves the server at that path"
                    ),
                );
            }
        }
    }
    if let Some(pins) = &spec.pins {
        validate_pins(pins)?;
    }
    if spec.mesh.is_some() && spec.transport == super::Transport::Sse {
        return fail(
            "spec.transport",
            "sse cannot be combined with spec.mesh: a server-side sidecar serves Streamable HTTP",
        );
    }
    if let Some(prefix) = &spec.prefix
        && !super::is_prefix(prefix)
    {
        return fail(
            "spec.prefix",
            format!(
                "{prefix:?} is not a prefix: empty, or letters, digits and '-' (not first or last), at most 32"
            ),
        );
    }
    if let Some(oauth) = &spec.oauth {
        validate_oauth(oauth)?;
        if spec.credential.is_some() {
            return fail(
                "spec.oauth",
                "a server has one credential: spec.credential or spec.oauth, not both",
            );
        }
        if spec.mesh.is_some() {
            return fail(
                "spec.oauth",
                "a server in the mesh gets its credential from its server-side sidecar; spec.oauth is for servers outside it",
            );
        }
    }
    if spec.credential.is_none()
        && spec.oauth.is_none()
        && spec.mesh.is_none()
        && !spec.allow_unauthenticated
    {
        return fail(
            "spec.credential",
            "required: without a credential only the sidecar holds, anything that reaches the server can call it around the sidecar; set spec.credential (or spec.oauth), or spec.mesh to put the server behind a server-side sidecar, or spec.allowUnauthenticated: true to accept that",
        );
    }
    Ok(())
}

fn validate_oauth(oauth: &super::OAuthSpec) -> FieldResult {
    let url = &oauth.token_url;
    let loopback = ["http://127.0.0.1", "http://localhost", "http://[::1]"]
        .iter()
        .any(|p| {
            url.strip_prefix(p)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '/']))
        });
    if !(url.starts_with("https://") || loopback) {
        return fail(
            "spec.oauth.tokenUrl",
            format!(
                "{url:?}: must be https:// (http:// only on loopback): the client secret and the tokens cross it"
            ),
        );
    }
    validate_url(url).map_err(|m| ("spec.oauth.tokenUrl".to_owned(), m))?;
    if oauth.grant == super::Grant::ClientCredentials
        && (oauth.client_id.is_empty() || oauth.client_secret_ref.is_none())
    {
        return fail(
            "spec.oauth",
            "grant client-credentials needs clientId and clientSecretRef",
        );
    }
    if oauth.client_secret_ref.is_some() && oauth.client_id.is_empty() {
        return fail("spec.oauth.clientId", "required with clientSecretRef");
    }
    if let Some(r) = &oauth.client_secret_ref {
        if !is_dns_label(&r.name) {
            return fail("spec.oauth.clientSecretRef.name", "must name a Secret");
        }
        if r.key.is_empty() {
            return fail("spec.oauth.clientSecretRef.key", "must not be empty");
        }
    }
    for (i, scope) in oauth.scopes.iter().enumerate() {
        // RFC 6749 §3.3: printable ASCII but space, '"' and '\\'.
        if scope.is_empty()
            || !scope
                .bytes()
                .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
        {
            return fail(
                format!("spec.oauth.scopes[{i}]"),
                format!("{scope:?} is not a scope token"),
            );
        }
    }
    let printable = |t: &str| t.bytes().all(|b| (0x20..0x7f).contains(&b));
    if !printable(&oauth.client_id) || !printable(&oauth.audience) || !printable(&oauth.resource) {
        return fail(
            "spec.oauth",
            "clientId, audience and resource must be printable ASCII",
        );
    }
    Ok(())
}

fn validate_pins(pins: &super::PinsSpec) -> FieldResult {
    use crate::pin::{Kind, is_digest, is_fingerprint};
    for (list, kind, map) in [
        ("tools", Kind::Tool, &pins.tools),
        ("prompts", Kind::Prompt, &pins.prompts),
    ] {
        for (name, pin) in map {
            let at = format!("spec.pins.{list}[{name:?}]");
            if name.is_empty() {
                return fail(format!("spec.pins.{list}"), "a name must not be empty");
            }
            if !is_digest(&pin.digest) {
                return fail(
                    format!("{at}.digest"),
                    format!(
                        "{:?} is not a digest: sha256: and 64 lowercase hex digits",
                        pin.digest
                    ),
                );
            }
            for (field, fingerprint) in &pin.fields {
                if !kind.fields().contains(&field.as_str()) {
                    return fail(
                        format!("{at}.fields"),
                        format!(
                            "{field:?} is not pinned; pinned members are {}",
                            kind.fields().join(", ")
                        ),
                    );
                }
                if !is_fingerprint(fingerprint) {
                    return fail(
                        format!("{at}.fields.{field}"),
                        format!("{fingerprint:?} is not a fingerprint: 16 lowercase hex digits"),
                    );
                }
            }
        }
    }
    Ok(())
}

fn validate_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("{url:?} must start with http:// or https://"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    if authority.contains('@') {
        return Err(format!(
            "{url:?} carries user info; use spec.credential for upstream credentials"
        ));
    }
    if url.contains('#') {
        return Err(format!("{url:?} must not have a fragment"));
    }
    if url.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(format!("{url:?} contains whitespace or control characters"));
    }
    Ok(())
}

fn validate_policy(policy: &AccessPolicy) -> FieldResult {
    let spec = &policy.spec;
    if spec.subjects.is_empty() {
        return fail("spec.subjects", "at least one subject is required");
    }
    for (i, s) in spec.subjects.iter().enumerate() {
        validate_subject(s)
            .map_err(|(field, message)| (format!("spec.subjects[{i}]{field}"), message))?;
    }
    if spec.rules.is_empty() {
        return fail("spec.rules", "at least one rule is required");
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        let at = |f: &str| format!("spec.rules[{i}].{f}");
        if !is_dns_label(&rule.server) {
            return fail(
                at("server"),
                format!("{:?} does not name an McpServer", rule.server),
            );
        }
        for (list, name) in [
            (&rule.tools, "tools"),
            (&rule.resources, "resources"),
            (&rule.prompts, "prompts"),
        ] {
            if let Some(j) = list.iter().position(|g| g.is_empty()) {
                return fail(at(&format!("{name}[{j}]")), "must not be empty");
            }
        }
        if let Some(rl) = &rule.rate_limit {
            if rl.requests == 0 {
                return fail(at("rateLimit.requests"), "must be at least 1");
            }
            parse_duration(&rl.per).map_err(|m| (at("rateLimit.per"), m))?;
        }
        for (j, c) in rule.conditions.iter().enumerate() {
            if c.argument.is_empty() || c.argument.split('.').any(str::is_empty) {
                return fail(
                    at(&format!("conditions[{j}].argument")),
                    format!("{:?} is not a dotted argument path", c.argument),
                );
            }
        }
    }
    Ok(())
}

/// One subject; the field named is relative to it (`.user`, `.claims.groups`).
fn validate_subject(s: &SubjectSpec) -> FieldResult {
    if s.identity.is_empty() && !s.is_token() {
        return fail(
            "",
            "names nobody: give identity, or a token matcher (user, issuer, clientId, scopes, claims)",
        );
    }
    if !s.identity.is_empty() && s.is_token() && s.issuer.is_empty() {
        return fail(
            ".identity",
            "beside token matchers, identity names service accounts and needs issuer (the cluster's)",
        );
    }
    for (field, text) in [
        (".identity", &s.identity),
        (".user", &s.user),
        (".issuer", &s.issuer),
        (".clientId", &s.client_id),
    ] {
        if text.len() > MAX_SUBJECT_TEXT || text.chars().any(char::is_control) {
            return fail(
                field,
                "must be at most 1024 bytes, without control characters",
            );
        }
    }
    let url = |t: &str| t.starts_with("https://") || t.starts_with("http://");
    if !(s.issuer.is_empty() || url(&s.issuer)) {
        return fail(".issuer", format!("{:?} is not an issuer URL", s.issuer));
    }
    if let Some(j) = s
        .scopes
        .iter()
        .position(|x| x.is_empty() || x.contains(char::is_whitespace))
    {
        return fail(
            format!(".scopes[{j}]"),
            "must be one scope: not empty, no spaces",
        );
    }
    for (claim, glob) in &s.claims {
        if claim.is_empty() || glob.is_empty() {
            return fail(
                format!(".claims.{claim}"),
                "neither the claim nor its glob may be empty",
            );
        }
        if RESERVED_CLAIMS.contains(&claim.as_str()) {
            return fail(
                format!(".claims.{claim}"),
                "is matched by its own field (user, issuer, clientId, scopes) or is not for matching",
            );
        }
    }
    Ok(())
}

/// Longest identity, user, issuer or client id a subject may hold.
const MAX_SUBJECT_TEXT: usize = 1024;
/// Claims a subject may not match under `claims`: each has its own field, or says
/// nothing about who the caller is.
const RESERVED_CLAIMS: &[&str] = &[
    "sub",
    "iss",
    "aud",
    "exp",
    "nbf",
    "iat",
    "jti",
    "scope",
    "scp",
    "client_id",
    "azp",
];

fn validate_secret(secret: &Secret) -> FieldResult {
    for (key, value) in &secret.data {
        if key.is_empty() {
            return fail("data", "keys must not be empty");
        }
        // Secrets end up in header values: refuse what would be a header injection.
        if !is_header_value(value) {
            // The message names the key, never the value.
            return fail(
                format!("data.{key}"),
                "must be printable ASCII (no control characters)",
            );
        }
    }
    Ok(())
}

/// Cross-resource checks: every rule names an existing server, every credential an
/// existing secret and key.
pub fn validate_set(set: &ResourceSet) -> Result<(), ResourceError> {
    let mut meshed: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
    for server in set.servers.values() {
        let Some(mesh) = &server.spec.mesh else {
            continue;
        };
        if let Some(other) = meshed.insert(&mesh.identity, &server.metadata.name) {
            return Err(ResourceError::Field {
                kind: Kind::McpServer,
                name: server.metadata.name.clone(),
                field: "spec.mesh.identity".to_owned(),
                message: format!(
                    "McpServer {other:?} already runs as {:?}: a server-side sidecar serves one server",
                    mesh.identity
                ),
            });
        }
    }
    check_prefixes(set.servers.values().map(|s| {
        (
            s.metadata.name.as_str(),
            s.spec.effective_prefix(&s.metadata.name),
        )
    }))
    .map_err(|(name, message)| ResourceError::Field {
        kind: Kind::McpServer,
        name: name.to_owned(),
        field: "spec.prefix".to_owned(),
        message,
    })?;
    for server in set.servers.values() {
        for (field, r) in server.spec.secret_refs() {
            let err = |message: String| ResourceError::Field {
                kind: Kind::McpServer,
                name: server.metadata.name.clone(),
                field: field.to_owned(),
                message,
            };
            let secret = set
                .secrets
                .get(&r.name)
                .ok_or_else(|| err(format!("Secret {:?} does not exist", r.name)))?;
            if !secret.data.contains_key(&r.key) {
                return Err(err(format!("Secret {:?} has no key {:?}", r.name, r.key)));
            }
        }
    }
    for policy in set.policies.values() {
        for (i, rule) in policy.spec.rules.iter().enumerate() {
            if !set.servers.contains_key(&rule.server) {
                return Err(ResourceError::Field {
                    kind: Kind::AccessPolicy,
                    name: policy.metadata.name.clone(),
                    field: format!("spec.rules[{i}].server"),
                    message: format!("McpServer {:?} does not exist", rule.server),
                });
            }
        }
    }
    Ok(())
}

/// Names on the aggregated `/mcp` must not collide: every server's prefix (given as
/// `(server, effective prefix)`) is unique, and at most one server goes unprefixed.
/// On a collision, the later server and a message naming the earlier one.
pub fn check_prefixes<'a>(
    servers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<(), (&'a str, String)> {
    let mut seen: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
    for (name, prefix) in servers {
        if let Some(other) = seen.insert(prefix, name) {
            let message = if prefix.is_empty() {
                format!(
                    "McpServer {other:?} is unprefixed too: the aggregated /mcp can expose only one server's names as they are"
                )
            } else {
                format!(
                    "McpServer {other:?} already uses the prefix {prefix:?}: their tools and prompts would collide on /mcp"
                )
            };
            return Err((name, message));
        }
    }
    Ok(())
}

fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_header_value(value: &str) -> bool {
    value.bytes().all(|b| (b' '..=b'~').contains(&b))
}

/// Headers the proxy owns: a credential must not be able to override them.
fn is_reserved_header(name: &str) -> bool {
    const RESERVED: &[&str] = &[
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "mcp-session-id",
        "mcp-protocol-version",
        "mcp-method",
        "mcp-name",
        "last-event-id",
    ];
    RESERVED.iter().any(|r| name.eq_ignore_ascii_case(r))
}
