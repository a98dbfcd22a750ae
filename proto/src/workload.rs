//! Workload identities as SPIFFE IDs: the one mapping between a toolmesh identity
//! (an AccessPolicy subject) and the URI SAN of its workload certificate.
//!
//! An identity of the Kubernetes shape `<namespace>/<serviceaccount>` (two DNS-style
//! segments) is `spiffe://<trust domain>/ns/<namespace>/sa/<serviceaccount>`, the form
//! Istio and Linkerd use; any other identity (a bootstrap token's, outside Kubernetes)
//! is `spiffe://<trust domain>/id/<identity>` with every byte outside
//! `[A-Za-z0-9._~-]` percent-encoded (upper-case hex). Reading a URI back accepts only
//! the exact text this module writes, so two spellings can never name one identity.
//!
//! This module does no cryptography and holds no certificates.

/// The trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A trust domain: lower-case letters, digits, `.`, `-`, `_`, at most 255 bytes.
pub fn is_trust_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= 255
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

fn is_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"._~-".contains(&b)
}

/// The SPIFFE ID of `identity` in `trust_domain`.
pub fn spiffe_id(trust_domain: &str, identity: &str) -> String {
    if let Some((ns, sa)) = identity.split_once('/')
        && is_segment(ns)
        && is_segment(sa)
    {
        return format!("spiffe://{trust_domain}/ns/{ns}/sa/{sa}");
    }
    let mut out = format!("spiffe://{trust_domain}/id/");
    for b in identity.bytes() {
        if unreserved(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The identity a SPIFFE ID names, if it is in `trust_domain` and spelled exactly as
/// [`spiffe_id`] spells it.
pub fn identity_of(trust_domain: &str, uri: &str) -> Option<String> {
    let path = uri
        .strip_prefix("spiffe://")?
        .strip_prefix(trust_domain)?
        .strip_prefix('/')?;
    let identity = if let Some(rest) = path.strip_prefix("ns/") {
        let (ns, sa) = rest.split_once("/sa/")?;
        format!("{ns}/{sa}")
    } else {
        decode(path.strip_prefix("id/")?)?
    };
    (spiffe_id(trust_domain, &identity) == uri).then_some(identity)
}

fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_identities_take_the_istio_form_and_read_back() {
        let id = spiffe_id("cluster.local", "agents/triage");
        assert_eq!(id, "spiffe://cluster.local/ns/agents/sa/triage");
        assert_eq!(
            identity_of("cluster.local", &id).as_deref(),
            Some("agents/triage")
        );
    }

    #[test]
    fn other_identities_are_escaped_and_read_back() {
        for identity in ["laptop", "Team A/bot", "a/b/c", "ünï/x", "%41", "a/"] {
            let id = spiffe_id("td", identity);
            assert!(id.starts_with("spiffe://td/id/"), "{id}");
            assert!(!id[15..].contains('/'), "{id}");
            assert_eq!(identity_of("td", &id).as_deref(), Some(identity), "{id}");
        }
    }

    #[test]
    fn other_spellings_and_other_domains_name_nobody() {
        for uri in [
            "spiffe://cluster.local/ns/agents/sa/triage/extra",
            "spiffe://cluster.local/id/agents%2Ftriage",
            "spiffe://cluster.local/id/%6c",
            "spiffe://cluster.local/id/%4",
            "spiffe://cluster.local/ns/Agents/sa/triage",
            "spiffe://cluster.localx/ns/agents/sa/triage",
            "spiffe://other/ns/agents/sa/triage",
            "SPIFFE://cluster.local/ns/agents/sa/triage",
            "spiffe://cluster.local/ns//sa/triage",
            "https://cluster.local/ns/agents/sa/triage",
        ] {
            assert_eq!(identity_of("cluster.local", uri), None, "{uri}");
        }
    }

    #[test]
    fn trust_domains_are_checked() {
        assert!(is_trust_domain("cluster.local"));
        assert!(!is_trust_domain("Cluster.local"));
        assert!(!is_trust_domain("a/b"));
        assert!(!is_trust_domain(""));
    }
}
