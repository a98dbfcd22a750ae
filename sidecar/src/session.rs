//! Session ids the agent sees: the sidecar's own, bound to who opened the session.
//!
//! An upstream's `Mcp-Session-Id` never reaches the agent as it is. The sidecar hands
//! out `tm1.<endpoint>.<upstream id, base64url>.<tag>`, where the tag is an HMAC-SHA256
//! (truncated to 128 bits) over the identity, the server name, the endpoint index and
//! the upstream id, under a key drawn at random when the process starts. On the way
//! back the tag is checked and the upstream id restored; anything else is an unknown
//! session (404, which tells a client to start a new one). So a session opened through
//! one sidecar, or for one identity or server, is useless through any other: it can
//! neither call tools, answer the server's requests nor end the session. The endpoint
//! index gives session affinity without a table.
//!
//! The key lives only in memory: after a sidecar restart, agents start new sessions.
//! This module does not decide which endpoint a new session goes to (see
//! [`crate::snapshot::Route::pick`]).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderValue;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Marks the format, so a future one can be told apart.
const PREFIX: &str = "tm1.";
/// Bytes of the HMAC kept in the id.
const TAG_BYTES: usize = 16;
/// Longest upstream session id wrapped (the agent's id is about 4/3 of it).
const MAX_UPSTREAM_ID: usize = 1024;

/// Seals upstream session ids for the agent and opens them again.
pub struct Sealer {
    key: hmac::Key,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    /// A sealer with a fresh random key.
    pub fn random() -> Result<Sealer, String> {
        let mut key = [0u8; 32];
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| "no system randomness for the session key".to_owned())?;
        Ok(Sealer::with_key(&key))
    }

    pub fn with_key(key: &[u8]) -> Sealer {
        Sealer {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
    }

    fn tag(&self, identity: &str, server: &str, endpoint: usize, upstream: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        // Length-prefixed, so no two inputs run together into the same bytes.
        for part in [identity.as_bytes(), server.as_bytes()] {
            ctx.update(&(part.len() as u64).to_le_bytes());
            ctx.update(part);
        }
        ctx.update(&(endpoint as u64).to_le_bytes());
        ctx.update(upstream);
        ctx.sign()
    }

    /// The id the agent sees for the upstream's `upstream` id on `endpoint`.
    /// `None` when the upstream's id is too long to wrap.
    pub fn seal(
        &self,
        identity: &str,
        server: &str,
        endpoint: usize,
        upstream: &[u8],
    ) -> Option<HeaderValue> {
        if upstream.len() > MAX_UPSTREAM_ID {
            return None;
        }
        let tag = self.tag(identity, server, endpoint, upstream);
        let tag = tag.as_ref().get(..TAG_BYTES)?;
        let text = format!(
            "{PREFIX}{endpoint}.{}.{}",
            URL_SAFE_NO_PAD.encode(upstream),
            URL_SAFE_NO_PAD.encode(tag)
        );
        HeaderValue::from_str(&text).ok()
    }

    /// The endpoint and upstream id behind an agent's id, if this sidecar made it for
    /// `identity` on `server` and it names one of `endpoints`.
    pub fn open(
        &self,
        identity: &str,
        server: &str,
        endpoints: usize,
        agent: &[u8],
    ) -> Option<(usize, HeaderValue)> {
        let text = std::str::from_utf8(agent).ok()?.strip_prefix(PREFIX)?;
        let mut parts = text.split('.');
        let (endpoint, upstream, tag) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || endpoint.len() > 4 {
            return None;
        }
        let endpoint: usize = endpoint.parse().ok()?;
        if endpoint >= endpoints {
            return None;
        }
        let upstream = URL_SAFE_NO_PAD.decode(upstream).ok()?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        let expected = self.tag(identity, server, endpoint, &upstream);
        let expected = expected.as_ref().get(..TAG_BYTES)?;
        if tag.len() != TAG_BYTES || !constant_time_eq(&tag, expected) {
            return None;
        }
        Some((endpoint, HeaderValue::from_bytes(&upstream).ok()?))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_id_opens_only_for_its_identity_server_and_key() {
        let sealer = Sealer::with_key(b"k1");
        let id = sealer
            .seal("agents/a", "github", 1, b"3f2a-upstream.id")
            .expect("sealed");
        let text = id.to_str().expect("ascii");
        assert!(text.starts_with("tm1.1."), "{text}");
        assert!(!text.contains("3f2a"), "the upstream id is encoded: {text}");
        let (endpoint, upstream) = sealer
            .open("agents/a", "github", 2, id.as_bytes())
            .expect("opens");
        assert_eq!(
            (endpoint, upstream.as_bytes()),
            (1, &b"3f2a-upstream.id"[..])
        );

        assert!(
            sealer
                .open("agents/b", "github", 2, id.as_bytes())
                .is_none()
        );
        assert!(
            sealer
                .open("agents/a", "gitlab", 2, id.as_bytes())
                .is_none()
        );
        assert!(
            sealer
                .open("agents/a", "github", 1, id.as_bytes())
                .is_none(),
            "endpoint gone"
        );
        assert!(
            Sealer::with_key(b"k2")
                .open("agents/a", "github", 2, id.as_bytes())
                .is_none(),
            "another sidecar's key"
        );
    }

    #[test]
    fn forged_and_altered_ids_do_not_open() {
        let sealer = Sealer::with_key(b"k");
        let id = sealer.seal("i", "s", 0, b"abc").expect("sealed");
        let text = id.to_str().expect("ascii").to_owned();
        // Another upstream id under the same tag, another endpoint, a cut tag.
        let other_upstream = text.replace(
            &URL_SAFE_NO_PAD.encode(b"abc"),
            &URL_SAFE_NO_PAD.encode(b"abd"),
        );
        let (head, tag) = text.rsplit_once('.').expect("dots");
        for forged in [
            other_upstream,
            text.replacen("tm1.0.", "tm1.1.", 1),
            format!("{head}.{}", &tag[..tag.len() - 2]),
            format!("{text}.x"),
            "abc".to_owned(),
            "tm1.0.YWJj".to_owned(),
            String::new(),
        ] {
            assert!(
                sealer.open("i", "s", 4, forged.as_bytes()).is_none(),
                "{forged}"
            );
        }
        assert!(sealer.seal("i", "s", 0, &[b'a'; 2000]).is_none());
    }
}
