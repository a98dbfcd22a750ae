//! Gateway mode (`--mode gateway`): the same `/mcp/<server>` paths and aggregated
//! `/mcp` as a sidecar, for many callers at once, each authenticated by a bearer token
//! (an OAuth 2.1 resource server, [`tokens`]) and decided for by the policies whose
//! subjects match that caller.
//!
//! - **Who.** A checked token is the request's subject, `<issuer>#<sub>`: decisions,
//!   sealed sessions (a session id opened by one user is refused for another), rate
//!   limit buckets and audit lines are that caller's.
//! - **Which rules.** The gateway's snapshot holds every policy with a token subject
//!   (`user`, `issuer`, `clientId`, `scopes`, `claims`, and `identity` beside `issuer`
//!   for Kubernetes service accounts). A caller's runtime is compiled from the
//!   policies that match it, once per distinct set of policies and snapshot version
//!   (callers with the same policies share it), and remembered on the caller's cached
//!   token: the request path does an atomic load. Rate limiters are shared by rule
//!   across these runtimes and keyed inside by caller, so each caller has its own
//!   buckets (`scope: rule` one per caller for the whole rule).
//! - **Discovery.** `/.well-known/oauth-protected-resource` (and its path-suffixed
//!   forms for `/mcp` and `/mcp/<server>`, RFC 9728) name the resource and the trusted
//!   issuers; a request without an acceptable token gets 401 with
//!   `WWW-Authenticate: Bearer resource_metadata="…"`, one without the required
//!   scopes 403 `insufficient_scope`.
//!
//! Not here: the relay itself ([`crate::proxy`]), the aggregate ([`crate::aggregate`]).

pub mod tokens;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use toolmesh_proto::v1alpha1 as pb;

use crate::body::{self, Body};
use crate::error::ProxyError;
use crate::policy::LimiterSource;
use crate::ratelimit::Limiter;
use crate::snapshot::{Active, Runtime};
use tokens::{Principal, Refusal, Verifier};

/// Distinct sets of policies kept compiled; beyond it a caller's runtime is compiled
/// for its token alone (still remembered there).
const MAX_POLICY_SETS: usize = 4096;
/// Where the protected-resource metadata is served (RFC 9728 §3).
pub const METADATA_PATH: &str = "/.well-known/oauth-protected-resource";

/// Gateway mode's state: the verifier and the runtimes compiled per policy set.
#[derive(Debug)]
pub struct Gateway {
    pub tokens: Arc<Verifier>,
    /// The gateway's resource URI (`--resource`), no trailing slash.
    resource: String,
    /// Scopes every token must carry (`--required-scope`), shown in challenges.
    scopes: Vec<String>,
    active: Arc<Active>,
    compiled: ArcSwap<Compiled>,
    /// The snapshot version whose issuers the verifier trusts.
    trusted: ArcSwap<String>,
    /// Serializes compiling; readers never take it.
    writer: Mutex<Limiters>,
}

/// Runtimes by the indices of the policies they hold, for one snapshot version.
#[derive(Debug, Default)]
struct Compiled {
    version: String,
    by_policies: HashMap<Vec<u32>, Arc<Runtime>>,
}

/// Rate limiters by rule fingerprint: this version's, and the previous version's
/// (unchanged rules keep their buckets across a swap).
#[derive(Debug, Default)]
struct Limiters {
    version: String,
    current: HashMap<Vec<u8>, Arc<Limiter>>,
    previous: HashMap<Vec<u8>, Arc<Limiter>>,
}

impl LimiterSource for Limiters {
    fn limiter(&self, fingerprint: &[u8]) -> Option<Arc<Limiter>> {
        self.current
            .get(fingerprint)
            .or_else(|| self.previous.get(fingerprint))
            .cloned()
    }
}

impl Gateway {
    pub fn new(
        tokens: Arc<Verifier>,
        resource: &str,
        scopes: Vec<String>,
        active: Arc<Active>,
    ) -> Gateway {
        Gateway {
            tokens,
            resource: resource.trim_end_matches('/').to_owned(),
            scopes,
            active,
            compiled: ArcSwap::default(),
            trusted: ArcSwap::default(),
            writer: Mutex::new(Limiters::default()),
        }
    }

    /// Trust the active snapshot's issuers (the control plane's `--gateway-issuer`s)
    /// beside the `--issuer`s, once per snapshot version: an atomic load and a compare
    /// on every request, before its token is checked.
    pub fn follow_issuers(&self) {
        let Some(base) = self.active.current() else {
            return;
        };
        if **self.trusted.load() == base.version {
            return;
        }
        self.tokens.trust(base.issuers());
        self.trusted.store(Arc::new(base.version.clone()));
    }

    /// The runtime deciding for `principal` under the active snapshot.
    pub fn runtime_for(&self, principal: &Principal) -> Result<Arc<Runtime>, ProxyError> {
        let base = self.active.current().ok_or(ProxyError::NotReady)?;
        if let Some(memo) = &*principal.memo.load()
            && memo.version == base.version
        {
            return Ok(memo.clone());
        }
        let chosen: Vec<u32> = base
            .policies()
            .iter()
            .enumerate()
            .filter(|(_, p)| p.subjects.iter().any(|s| matches(s, principal)))
            .map(|(i, _)| u32::try_from(i).unwrap_or(u32::MAX))
            .collect();
        let runtime = self.compiled_for(&base, chosen)?;
        principal.memo.store(Some(runtime.clone()));
        Ok(runtime)
    }

    fn compiled_for(&self, base: &Runtime, chosen: Vec<u32>) -> Result<Arc<Runtime>, ProxyError> {
        let compiled = self.compiled.load();
        if compiled.version == base.version
            && let Some(runtime) = compiled.by_policies.get(&chosen)
        {
            return Ok(runtime.clone());
        }
        let mut limiters = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let compiled = self.compiled.load_full();
        let same_version = compiled.version == base.version;
        if same_version && let Some(runtime) = compiled.by_policies.get(&chosen) {
            return Ok(runtime.clone());
        }
        if limiters.version != base.version {
            limiters.previous = std::mem::take(&mut limiters.current);
            limiters.version = base.version.clone();
        }
        let policies = chosen
            .iter()
            .filter_map(|&i| base.policies().get(i as usize).cloned())
            .collect();
        let mut made = Vec::new();
        let runtime = base
            .narrowed(policies, &*limiters, &mut made)
            .map(Arc::new)
            .map_err(|reason| {
                ProxyError::Misconfigured(format!("compiling a caller's rules: {reason}"))
            })?;
        limiters.current.extend(made);
        let mut next = if same_version {
            HashMap::clone(&compiled.by_policies)
        } else {
            HashMap::new()
        };
        if next.len() < MAX_POLICY_SETS {
            next.insert(chosen, runtime.clone());
            self.compiled.store(Arc::new(Compiled {
                version: base.version.clone(),
                by_policies: next,
            }));
        }
        Ok(runtime)
    }

    /// The protected-resource metadata document for a `GET` of `path` (under
    /// [`METADATA_PATH`]), or `None` when it names no resource served here.
    pub fn metadata(&self, path: &str) -> Option<Response<Body>> {
        let suffix = path.strip_prefix(METADATA_PATH)?;
        if !(suffix.is_empty() || is_mcp_path(suffix)) {
            return None;
        }
        let document = serde_json::json!({
            "resource": format!("{}{}", self.resource, suffix),
            "authorization_servers": self.tokens.issuer_urls(),
            "bearer_methods_supported": ["header"],
            "scopes_supported": self.scopes,
            "resource_name": "toolmesh gateway",
        });
        let mut resp = Response::new(body::full(Bytes::from(document.to_string())));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=300"),
        );
        Some(resp)
    }

    /// The `WWW-Authenticate` value for a refusal of a request on `path`.
    pub fn challenge(&self, refusal: &Refusal, path: &str) -> HeaderValue {
        let metadata = if is_mcp_path(path) {
            format!(
                "{}{METADATA_PATH}{}",
                self.resource,
                path.trim_end_matches('/')
            )
        } else {
            format!("{}{METADATA_PATH}", self.resource)
        };
        let mut value = String::from("Bearer ");
        match refusal {
            Refusal::Missing => {}
            Refusal::Invalid(why) => {
                value.push_str(&format!(
                    "error=\"invalid_token\", error_description=\"{why}\", "
                ));
            }
            Refusal::InsufficientScope => value.push_str("error=\"insufficient_scope\", "),
        }
        if !self.scopes.is_empty() {
            value.push_str(&format!("scope=\"{}\", ", self.scopes.join(" ")));
        }
        value.push_str(&format!("resource_metadata=\"{metadata}\""));
        // Every part is ASCII without quotes or controls: the resource URI and scopes
        // were checked at startup, the descriptions are fixed strings.
        HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
    }

    /// The answer to a refused token: 401 (403 for missing scopes) with the challenge.
    pub fn refuse(&self, refusal: &Refusal, path: &str) -> Response<Body> {
        let (status, error, description) = match refusal {
            Refusal::Missing => (
                StatusCode::UNAUTHORIZED,
                "invalid_request",
                "a bearer token is required",
            ),
            Refusal::Invalid(why) => (StatusCode::UNAUTHORIZED, "invalid_token", *why),
            Refusal::InsufficientScope => (
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                "the token lacks a scope this gateway requires",
            ),
        };
        let body = serde_json::json!({"error": error, "error_description": description});
        let mut resp = Response::new(body::full(Bytes::from(body.to_string())));
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, self.challenge(refusal, path));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp
    }
}

/// `/mcp`, `/mcp/` or `/mcp/<server>`.
fn is_mcp_path(path: &str) -> bool {
    match path.strip_prefix("/mcp") {
        Some("" | "/") => true,
        Some(rest) => rest.strip_prefix('/').is_some_and(|name| {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        }),
        None => false,
    }
}

/// Whether a token subject matches `principal`: every matcher it sets holds.
pub fn matches(subject: &pb::Subject, principal: &Principal) -> bool {
    use toolmesh_proto::glob;
    let text = |pattern: &str, value: Option<&str>| {
        pattern.is_empty() || value.is_some_and(|v| glob::matches(pattern, v))
    };
    (subject.issuer.is_empty() || *subject.issuer.trim_end_matches('/') == *principal.issuer)
        && text(&subject.user, Some(&principal.user))
        && text(&subject.client_id, principal.client_id.as_deref())
        && text(&subject.identity, principal.identity.as_deref())
        && subject
            .scopes
            .iter()
            .all(|s| principal.scopes.iter().any(|have| **have == **s))
        && subject.claims.iter().all(|(claim, pattern)| {
            principal
                .claims
                .get(claim)
                .is_some_and(|v| claim_matches(pattern, v))
        })
}

/// A claim value against a glob: a string as written, a number or boolean as JSON
/// writes it, an array when any element does; objects and `null` never match.
fn claim_matches(pattern: &str, value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::String(s) => toolmesh_proto::glob::matches(pattern, s),
        Value::Bool(b) => toolmesh_proto::glob::matches(pattern, if *b { "true" } else { "false" }),
        Value::Number(n) => crate::policy::number_text(n)
            .is_some_and(|t| toolmesh_proto::glob::matches(pattern, &t)),
        Value::Array(items) => items
            .iter()
            .any(|item| !item.is_array() && claim_matches(pattern, item)),
        Value::Null | Value::Object(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcp_paths_are_the_served_ones() {
        assert!(is_mcp_path("/mcp"));
        assert!(is_mcp_path("/mcp/"));
        assert!(is_mcp_path("/mcp/github"));
        assert!(!is_mcp_path("/mcp/git/hub"));
        assert!(!is_mcp_path("/mcpx"));
        assert!(!is_mcp_path("/admin"));
    }

    #[test]
    fn claims_match_as_json_writes_them() {
        use serde_json::json;
        assert!(claim_matches("platform", &json!(["dev", "platform"])));
        assert!(!claim_matches("platform", &json!([["platform"]])));
        assert!(claim_matches("13", &json!(13.0)));
        assert!(claim_matches("true", &json!(true)));
        assert!(!claim_matches("*", &json!(null)));
        assert!(!claim_matches("*", &json!({"a": 1})));
    }
}
