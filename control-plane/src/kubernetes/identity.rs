//! Sidecar identity from a projected service-account token, by `TokenReview`.
//!
//! The injected sidecar presents its pod's projected token (audience `toolmesh` by
//! default). The control plane asks the API server to review it with that audience and
//! accepts it only if the API server says it is authenticated, names a service account
//! (`system:serviceaccount:<namespace>:<name>`), and confirms the audience (an API
//! server that ignores audiences returns none, and is refused: a token minted for some
//! other audience must not open a snapshot stream). The identity is then
//! `<namespace>/<name>`, which the sidecar's Hello must repeat.
//!
//! Verdicts are cached by the token's SHA-256 (never the token itself): accepted ones
//! for the cache TTL, refusals for [`REFUSAL_TTL`] so a reconnect loop with a bad token
//! does not become one API call per attempt. The cache is bounded ([`MAX_CACHED`]).
//!
//! Not here: which snapshot an identity gets (rendering) or the admin token.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};
use tonic::Status;

/// How long a refused token stays refused without asking the API server again.
pub const REFUSAL_TTL: Duration = Duration::from_secs(5);
/// Most verdicts kept; past it, expired ones are dropped, then all of them.
pub const MAX_CACHED: usize = 4096;

type Verdict = Result<String, String>;

/// Reviews tokens with the API server and caches the verdicts.
pub struct TokenReviewer {
    api: Api<TokenReview>,
    audience: String,
    ttl: Duration,
    cache: Mutex<HashMap<[u8; 32], (Verdict, Instant)>>,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audience", &self.audience)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    pub fn new(client: kube::Client, audience: String, ttl: Duration) -> TokenReviewer {
        TokenReviewer {
            api: Api::all(client),
            audience,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The `namespace/serviceaccount` a token stands for.
    pub async fn identity(&self, token: &str) -> Result<String, Status> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        if let Some((verdict, until)) = self.lock().get(&key)
            && *until > now
        {
            return verdict.clone().map_err(Status::unauthenticated);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let answer = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "TokenReview failed");
                Status::unavailable(format!("cannot review the service-account token now: {e}"))
            })?;
        let verdict = judge(&answer, &self.audience);
        let ttl = if verdict.is_ok() {
            self.ttl
        } else {
            REFUSAL_TTL
        };
        {
            let mut cache = self.lock();
            if cache.len() >= MAX_CACHED {
                cache.retain(|_, (_, until)| *until > now);
                if cache.len() >= MAX_CACHED {
                    cache.clear();
                }
            }
            cache.insert(key, (verdict.clone(), now + ttl));
        }
        if let Err(reason) = &verdict {
            tracing::warn!(%reason, "service-account token refused");
        }
        verdict.map_err(Status::unauthenticated)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (Verdict, Instant)>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the API server's answer means for us.
fn judge(review: &TokenReview, audience: &str) -> Verdict {
    let status = review
        .status
        .as_ref()
        .ok_or("the API server returned no TokenReview status")?;
    if status.authenticated != Some(true) {
        let why = status.error.as_deref().unwrap_or("not authenticated");
        return Err(format!("service-account token refused: {why}"));
    }
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == audience))
    {
        return Err(format!(
            "the token is not for audience {audience:?} (mount a projected token with that audience)"
        ));
    }
    let username = status
        .user
        .as_ref()
        .and_then(|u| u.username.as_deref())
        .unwrap_or_default();
    let account = username
        .strip_prefix("system:serviceaccount:")
        .ok_or_else(|| format!("{username:?} is not a service account"))?;
    match account.split_once(':') {
        Some((namespace, name))
            if !namespace.is_empty() && !name.is_empty() && !name.contains(':') =>
        {
            Ok(format!("{namespace}/{name}"))
        }
        _ => Err(format!("{username:?} is not a service account")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::mock::{ApiServer, Call};
    use serde_json::json;

    fn reviewed(username: &str, audiences: &[&str]) -> serde_json::Value {
        json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {},
            "status": {"authenticated": true, "user": {"username": username}, "audiences": audiences},
        })
    }

    #[tokio::test]
    async fn a_token_is_reviewed_once_with_our_audience_and_maps_to_its_service_account() {
        let api = ApiServer::new(|call: &Call| {
            let token = call.body["spec"]["token"].as_str().unwrap_or_default();
            match token {
                "token-of-triage" => (
                    200,
                    reviewed("system:serviceaccount:agents:triage", &["toolmesh"]),
                ),
                "token-of-coder" => (
                    200,
                    reviewed("system:serviceaccount:agents:coder", &["toolmesh"]),
                ),
                _ => (
                    201,
                    json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {},
                           "status": {"authenticated": false, "error": "invalid bearer token"}}),
                ),
            }
        });
        let reviewer = TokenReviewer::new(api.client(), "toolmesh".into(), Duration::from_secs(60));

        assert_eq!(
            reviewer.identity("token-of-triage").await.expect("valid"),
            "agents/triage"
        );
        assert_eq!(
            reviewer.identity("token-of-coder").await.expect("valid"),
            "agents/coder",
            "one service account's token never stands for another"
        );
        // Cached: the second use of a token asks nothing.
        assert_eq!(
            reviewer.identity("token-of-triage").await.expect("cached"),
            "agents/triage"
        );
        let err = reviewer.identity("forged").await.expect_err("refused");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("invalid bearer token"), "{err:?}");
        reviewer
            .identity("forged")
            .await
            .expect_err("still refused");

        let calls = api.calls();
        assert_eq!(calls.len(), 3, "{calls:#?}");
        for call in &calls {
            assert_eq!(call.method, "POST");
            assert_eq!(call.path, "/apis/authentication.k8s.io/v1/tokenreviews?");
            assert_eq!(call.body["kind"], "TokenReview");
            assert_eq!(call.body["spec"]["audiences"], json!(["toolmesh"]));
        }
        assert_eq!(
            calls
                .iter()
                .map(|c| c.body["spec"]["token"].clone())
                .collect::<Vec<_>>(),
            [
                json!("token-of-triage"),
                json!("token-of-coder"),
                json!("forged")
            ]
        );
        assert!(
            !format!("{reviewer:?}").contains("token-of"),
            "tokens are never printed"
        );
    }

    #[tokio::test]
    async fn an_api_server_outage_is_unavailable_not_a_refusal_and_is_not_cached() {
        let api =
            ApiServer::new(|_: &Call| (503, json!({"kind": "Status", "message": "etcd down"})));
        let reviewer = TokenReviewer::new(api.client(), "toolmesh".into(), Duration::from_secs(60));
        for _ in 0..2 {
            let err = reviewer.identity("token").await.expect_err("outage");
            assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        }
        assert_eq!(api.calls().len(), 2);
    }

    #[test]
    fn only_service_accounts_with_our_audience_are_accepted() {
        let review = |v: serde_json::Value| -> TokenReview {
            serde_json::from_value(v).expect("TokenReview")
        };
        let ok = review(reviewed(
            "system:serviceaccount:ns:sa",
            &["other", "toolmesh"],
        ));
        assert_eq!(judge(&ok, "toolmesh"), Ok("ns/sa".into()));
        for (case, v) in [
            (
                "no audience echoed",
                reviewed("system:serviceaccount:ns:sa", &[]),
            ),
            (
                "other audience",
                reviewed("system:serviceaccount:ns:sa", &["api"]),
            ),
            ("a user", reviewed("alice@example.com", &["toolmesh"])),
            ("a node", reviewed("system:node:worker-1", &["toolmesh"])),
            (
                "malformed",
                reviewed("system:serviceaccount:ns", &["toolmesh"]),
            ),
            (
                "extra colon",
                reviewed("system:serviceaccount:ns:sa:x", &["toolmesh"]),
            ),
            ("no status", json!({"spec": {}})),
        ] {
            assert!(judge(&review(v), "toolmesh").is_err(), "{case}");
        }
    }
}
