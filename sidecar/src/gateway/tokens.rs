//! Gateway mode's inbound authentication: bearer JWTs from trusted issuers, checked as
//! an OAuth 2.1 resource server does, and turned into the caller ([`Principal`]).
//!
//! Each `--issuer` is discovered once (`/.well-known/openid-configuration`, else RFC
//! 8414's `/.well-known/oauth-authorization-server`; the document must name the same
//! issuer), and its key set (`jwks_uri`) is fetched then, every
//! [`KEYS_REFRESH_EVERY`], and when a token names a key id the set lacks (at most once
//! per [`UNKNOWN_KID_REFRESH`] per issuer, so a stream of invented key ids cannot make
//! the gateway hammer the issuer): keys rotate without a restart.
//!
//! A token is accepted only if: it is a compact JWS of at most [`MAX_TOKEN_BYTES`];
//! its `alg` is on [`ALLOWED`] (asymmetric only: never `none`, never an HMAC, so a
//! public key can never be used as a shared secret); its `iss` is a trusted issuer
//! whose published key (by `kid`, or the only key when the token names none; `oct`
//! keys are never taken) verifies the signature and, when the key states an `alg`, it
//! is the token's; `exp` is in the future and `nbf` (if any) in the past, each within
//! `--clock-skew`; `sub` is a string; `aud` names this gateway (`--resource`, or the
//! resource URI of the path asked for, RFC 8707). Checked tokens are kept (by their
//! SHA-256, never their text) until they expire, so a caller's next request costs a
//! hash and a map lookup.
//!
//! Token values are never logged, counted or echoed: errors say what was wrong, not
//! what was sent.
//!
//! Not here: what the caller may do (the gateway's per-subject runtimes, in
//! [`super`]) and the HTTP answers (also [`super`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::identity::Identity;
use crate::snapshot::Runtime;
use crate::upstream::Upstream;

/// Longest bearer token taken (bytes).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Signature algorithms accepted: asymmetric ones only.
pub const ALLOWED: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];
/// How often every issuer's keys are fetched again.
pub const KEYS_REFRESH_EVERY: Duration = Duration::from_secs(300);
/// Shortest time between two fetches of one issuer's keys caused by unknown key ids.
pub const UNKNOWN_KID_REFRESH: Duration = Duration::from_secs(5);
/// Checked tokens kept at most; beyond, expired ones go, then new ones are checked
/// each time (still correct, only slower).
pub const MAX_CACHED_TOKENS: usize = 10_000;
/// Largest discovery document or key set read.
const MAX_DOCUMENT: usize = 1024 * 1024;
/// Time allowed for one discovery or key-set fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The refusal of a token whose `sub` is missing or not a string.
const SUB_NOT_TEXT: &str = "the token's sub is missing or not a string";
/// The `sub` prefix of Kubernetes service-account tokens.
const SERVICE_ACCOUNT: &str = "system:serviceaccount:";

/// Why a request's token was not accepted. The text is safe to show: it never holds
/// the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization: Bearer` credential (RFC 6750 §3.1: no error code).
    Missing,
    /// A token that is not acceptable (`invalid_token`).
    Invalid(&'static str),
    /// A valid token without the scopes the gateway requires (`insufficient_scope`).
    InsufficientScope,
}

/// The caller a checked token names.
#[derive(Debug)]
pub struct Principal {
    /// `<issuer>#<sub>`: what sessions are sealed to and audit lines name.
    pub subject: Identity,
    pub user: Box<str>,
    pub issuer: Arc<str>,
    pub client_id: Option<Box<str>>,
    pub scopes: Vec<Box<str>>,
    /// `<namespace>/<serviceaccount>` for a service-account token of `--kubernetes-issuer`.
    pub identity: Option<Box<str>>,
    /// The token's other claims (for `claims` matchers).
    pub claims: Map<String, Value>,
    /// The audiences naming this gateway (its resource URI, or one of its paths').
    audiences: Vec<Box<str>>,
    /// `exp`, seconds since the epoch.
    expires: u64,
    /// The runtime compiled for this caller's policies, for the snapshot it names.
    pub(super) memo: ArcSwapOption<Runtime>,
}

impl Principal {
    /// Whether the token was issued for the resource at `path` (or for the gateway as
    /// a whole).
    pub fn audience_allows(&self, resource: &str, path: &str) -> bool {
        let path = path.trim_end_matches('/');
        self.audiences.iter().any(|aud| {
            let aud = aud.trim_end_matches('/');
            aud == resource
                || aud
                    .strip_prefix(resource)
                    .is_some_and(|rest| !rest.is_empty() && rest == path)
        })
    }
}

/// The trusted issuers and the checked-token cache.
#[derive(Debug)]
pub struct Verifier {
    /// Every trusted issuer: `--issuer`s first, then the snapshot's ([`Verifier::trust`]).
    issuers: ArcSwap<Vec<Arc<Issuer>>>,
    /// How many of `issuers` are `--issuer`s.
    flagged: usize,
    /// The gateway's resource URI (`--resource`), no trailing slash.
    resource: String,
    skew: Duration,
    required_scopes: Vec<String>,
    kubernetes_issuer: Option<String>,
    cache: Mutex<HashMap<[u8; 32], Arc<Principal>>>,
    upstream: Upstream,
}

#[derive(Debug)]
struct Issuer {
    url: Arc<str>,
    keys: ArcSwap<Keys>,
    /// When the keys were last fetched for an unknown key id.
    asked: Mutex<Option<Instant>>,
    /// Whether a first fetch of its keys has ended (well or not).
    tried: std::sync::atomic::AtomicBool,
    /// One fetch at a time.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Keys {
    by_kid: HashMap<String, Key>,
    /// Keys without a `kid`.
    unnamed: Vec<Key>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("kids", &self.by_kid.keys().collect::<Vec<_>>())
            .field("unnamed", &self.unnamed.len())
            .finish()
    }
}

struct Key {
    decoding: DecodingKey,
    /// The `alg` the key is published for, if it says.
    alg: Option<Algorithm>,
}

/// What `Verifier::new` needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub issuers: Vec<String>,
    pub resource: String,
    pub skew: Duration,
    pub required_scopes: Vec<String>,
    pub kubernetes_issuer: Option<String>,
}

impl Issuer {
    /// An issuer whose keys are yet to be fetched; `tried` says whether readiness
    /// should wait for a first fetch.
    fn new(url: &str, tried: bool) -> Arc<Issuer> {
        Arc::new(Issuer {
            url: url.trim_end_matches('/').into(),
            keys: ArcSwap::default(),
            asked: Mutex::new(None),
            tried: std::sync::atomic::AtomicBool::new(tried),
            fetching: tokio::sync::Mutex::new(()),
        })
    }
}

impl Verifier {
    pub fn new(settings: Settings, upstream: Upstream) -> Verifier {
        Verifier {
            issuers: ArcSwap::from_pointee(
                settings
                    .issuers
                    .iter()
                    .map(|url| Issuer::new(url, false))
                    .collect(),
            ),
            flagged: settings.issuers.len(),
            resource: settings.resource.trim_end_matches('/').to_owned(),
            skew: settings.skew,
            required_scopes: settings.required_scopes,
            kubernetes_issuer: settings
                .kubernetes_issuer
                .map(|k| k.trim_end_matches('/').to_owned()),
            cache: Mutex::new(HashMap::new()),
            upstream,
        }
    }

    /// The trusted issuers' URLs, as `authorization_servers` lists them.
    pub fn issuer_urls(&self) -> Vec<String> {
        self.issuers
            .load()
            .iter()
            .map(|i| i.url.to_string())
            .collect()
    }

    /// Trust `more` (the snapshot's issuers) besides the `--issuer`s, from now on; an
    /// issuer no longer listed is no longer trusted. Issuers kept keep their keys; a
    /// new one's keys are fetched on its first token. A URL that is not an issuer URL
    /// (https, or http on loopback) is logged and left out.
    pub fn trust(&self, more: &[String]) {
        let current = self.issuers.load_full();
        let mut next: Vec<Arc<Issuer>> = current.iter().take(self.flagged).cloned().collect();
        for url in more {
            let url = url.trim_end_matches('/');
            if next.iter().any(|i| *i.url == *url) {
                continue;
            }
            if let Err(e) = crate::config::gateway_url("issuer", url, false) {
                tracing::warn!(error = %e, "an issuer of the snapshot is not used");
                continue;
            }
            let kept = current.iter().skip(self.flagged).find(|i| *i.url == *url);
            next.push(kept.cloned().unwrap_or_else(|| Issuer::new(url, true)));
        }
        let same = next.len() == current.len()
            && next
                .iter()
                .zip(current.iter())
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if !same {
            tracing::info!(issuers = ?next.iter().map(|i| &*i.url).collect::<Vec<_>>(), "trusted issuers");
            self.issuers.store(Arc::new(next));
        }
    }

    /// An issuer whose keys have not been asked for yet, if any: the gateway is not
    /// ready before (tokens would be refused for want of keys). An issuer that could not
    /// be reached does not hold readiness back: it was asked.
    pub fn first_fetch_pending(&self) -> Option<String> {
        self.issuers
            .load()
            .iter()
            .find(|i| !i.tried.load(std::sync::atomic::Ordering::Relaxed))
            .map(|i| i.url.to_string())
    }

    /// Fetch every issuer's keys now and every [`KEYS_REFRESH_EVERY`] (a task that runs
    /// until aborted). A failed fetch keeps the keys held and is logged.
    pub async fn keep_keys_fresh(self: Arc<Self>) {
        let mut tick = tokio::time::interval(KEYS_REFRESH_EVERY);
        loop {
            tick.tick().await;
            for issuer in self.issuers.load_full().iter() {
                if let Err(e) = self.refresh(issuer).await {
                    tracing::warn!(issuer = %issuer.url, error = %e, "cannot fetch the issuer's keys");
                }
                issuer
                    .tried
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// The caller `headers` authenticate, for a request on `path`.
    pub async fn authenticate(
        &self,
        headers: &http::HeaderMap,
        path: &str,
    ) -> Result<Arc<Principal>, Refusal> {
        let token = bearer(headers)?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = unix_now();
        let cached = {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.get(&digest).cloned()
        };
        let principal = match cached {
            Some(p) if p.expires + self.skew.as_secs() > now => p,
            _ => {
                let principal = Arc::new(self.verify(token, now).await?);
                self.remember(digest, principal.clone(), now);
                principal
            }
        };
        if !principal.audience_allows(&self.resource, path) {
            return Err(Refusal::Invalid(
                "the token's audience is not this resource",
            ));
        }
        if !self
            .required_scopes
            .iter()
            .all(|s| principal.scopes.iter().any(|have| **have == **s))
        {
            return Err(Refusal::InsufficientScope);
        }
        Ok(principal)
    }

    fn remember(&self, digest: [u8; 32], principal: Arc<Principal>, now: u64) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED_TOKENS {
            let skew = self.skew.as_secs();
            cache.retain(|_, p| p.expires + skew > now);
        }
        if cache.len() < MAX_CACHED_TOKENS {
            cache.insert(digest, principal);
        }
    }

    /// Checked tokens held (for tests and `/metrics`).
    pub fn cached(&self) -> usize {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Check `token` fully, fetching the issuer's keys again first if the token names
    /// a key not held.
    async fn verify(&self, token: &str, now: u64) -> Result<Principal, Refusal> {
        let (header, issuer) = self.issuer_of(token)?;
        if !issuer.has_key(header.kid.as_deref()) {
            issuer.refresh_for_unknown_kid(self).await;
        }
        drop(issuer);
        self.check(token, now)
    }

    /// The token's header, once its algorithm is one accepted, and the trusted issuer
    /// it claims (read before the signature is checked only to pick whose keys check it).
    fn issuer_of(&self, token: &str) -> Result<(jsonwebtoken::Header, Arc<Issuer>), Refusal> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| Refusal::Invalid("not a signed JWT"))?;
        if !ALLOWED.contains(&header.alg) {
            return Err(Refusal::Invalid(
                "the token's signature algorithm is not accepted",
            ));
        }
        let claimed = unverified_issuer(token)?;
        let issuer = self
            .trusted(&claimed)
            .ok_or(Refusal::Invalid("the token's issuer is not trusted"))?;
        Ok((header, issuer))
    }

    /// The trusted issuer `url` names (a trailing `/` aside), if any.
    fn trusted(&self, url: &str) -> Option<Arc<Issuer>> {
        let url = url.trim_end_matches('/');
        self.issuers.load().iter().find(|i| *i.url == *url).cloned()
    }

    /// Check `token` with the keys held now (`now`: seconds since the epoch): header,
    /// issuer, key, signature, claims. What [`Verifier::authenticate`] does on a token
    /// it has not seen, without fetching keys or looking at the audience's path.
    pub fn check(&self, token: &str, now: u64) -> Result<Principal, Refusal> {
        let (header, issuer) = self.issuer_of(token)?;
        let keys = issuer.keys.load();
        let key = keys
            .find(header.kid.as_deref())
            .ok_or(Refusal::Invalid("no key of the issuer matches the token"))?;
        if key.alg.is_some_and(|alg| alg != header.alg) {
            return Err(Refusal::Invalid("the key is not for the token's algorithm"));
        }
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.leeway = self.skew.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // The audience is checked here against the gateway, per path in `authenticate`.
        validation.validate_aud = false;
        validation.set_issuer(&[&*issuer.url]);
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &validation)
            .map_err(|e| Refusal::Invalid(reason(&e)))?;
        self.principal(&issuer, data.claims, now)
    }

    /// Hold `jwks` (a key set document) as `issuer`'s keys, as a fetch would; for
    /// tests and fuzzing, which have no issuer to fetch from.
    pub fn hold_keys(&self, issuer: &str, jwks: &[u8]) -> Result<(), String> {
        let issuer = self
            .trusted(issuer)
            .ok_or_else(|| format!("{issuer} is not an --issuer"))?;
        issuer.keys.store(Arc::new(parse_keys(jwks)?));
        Ok(())
    }

    fn principal(
        &self,
        issuer: &Issuer,
        mut claims: Map<String, Value>,
        now: u64,
    ) -> Result<Principal, Refusal> {
        let Some(Value::String(user)) = claims.remove("sub") else {
            return Err(Refusal::Invalid(SUB_NOT_TEXT));
        };
        let expires = claims
            .get("exp")
            .and_then(Value::as_f64)
            .filter(|e| e.is_finite() && *e >= 0.0)
            // Whole seconds; a fraction only makes the token expire sooner.
            .map(|e| e.floor() as u64)
            .ok_or(Refusal::Invalid("the token's exp is not a number"))?;
        if expires + self.skew.as_secs() <= now {
            return Err(Refusal::Invalid("the token has expired"));
        }
        let audiences: Vec<Box<str>> = match claims.get("aud") {
            Some(Value::String(a)) => vec![a.as_str().into()],
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .map(Into::into)
                .collect(),
            _ => Vec::new(),
        };
        let audiences: Vec<Box<str>> = audiences
            .into_iter()
            .filter(|a| a.trim_end_matches('/').starts_with(&self.resource))
            .collect();
        if audiences.is_empty() {
            return Err(Refusal::Invalid(
                "the token's audience is not this resource",
            ));
        }
        let client_id = match (claims.get("client_id"), claims.get("azp")) {
            (Some(Value::String(c)), _) | (None, Some(Value::String(c))) => Some(c.as_str().into()),
            _ => None,
        };
        let scopes: Vec<Box<str>> = match (claims.get("scope"), claims.get("scp")) {
            (Some(Value::String(s)), _) => s.split_whitespace().map(Into::into).collect(),
            (None, Some(Value::Array(items))) => items
                .iter()
                .filter_map(Value::as_str)
                .map(Into::into)
                .collect(),
            (None, Some(Value::String(s))) => s.split_whitespace().map(Into::into).collect(),
            _ => Vec::new(),
        };
        let identity = (self.kubernetes_issuer.as_deref() == Some(&*issuer.url))
            .then(|| service_account(&user))
            .flatten();
        for reserved in ["iss", "aud", "exp", "nbf", "iat", "jti", "scope", "scp"] {
            claims.remove(reserved);
        }
        Ok(Principal {
            subject: Identity::new(&format!("{}#{user}", issuer.url)),
            user: user.into(),
            issuer: issuer.url.clone(),
            client_id,
            scopes,
            identity,
            claims,
            audiences,
            expires,
            memo: ArcSwapOption::empty(),
        })
    }

    /// Discover `issuer` (first time) and fetch its keys.
    async fn refresh(&self, issuer: &Issuer) -> Result<(), String> {
        let _one = issuer.fetching.lock().await;
        let jwks_uri = self.discover(&issuer.url).await?;
        let body = self
            .upstream
            .fetch(&jwks_uri, MAX_DOCUMENT, FETCH_TIMEOUT)
            .await?;
        let keys = parse_keys(&body)?;
        tracing::info!(issuer = %issuer.url, keys = keys.by_kid.len() + keys.unnamed.len(), "issuer keys loaded");
        issuer.keys.store(Arc::new(keys));
        Ok(())
    }

    /// The issuer's `jwks_uri`, from its metadata document.
    async fn discover(&self, issuer: &str) -> Result<String, String> {
        let (origin, path) = split_origin(issuer);
        let candidates = [
            format!("{issuer}/.well-known/openid-configuration"),
            format!("{origin}/.well-known/oauth-authorization-server{path}"),
        ];
        let mut last = String::new();
        for url in candidates {
            match self.upstream.fetch(&url, MAX_DOCUMENT, FETCH_TIMEOUT).await {
                Ok(body) => {
                    let doc: Value = serde_json::from_slice(&body)
                        .map_err(|e| format!("{url}: not JSON: {e}"))?;
                    let named = doc
                        .get("issuer")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    if named.trim_end_matches('/') != issuer {
                        return Err(format!(
                            "{url} names issuer {named:?}, not {issuer:?} (refused: a metadata document must describe its own issuer)"
                        ));
                    }
                    return doc
                        .get("jwks_uri")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                        .ok_or_else(|| format!("{url}: no jwks_uri"));
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

impl Issuer {
    fn has_key(&self, kid: Option<&str>) -> bool {
        self.keys.load().find(kid).is_some()
    }

    /// Fetch the keys again for a token naming a key not held, unless that was done
    /// less than [`UNKNOWN_KID_REFRESH`] ago; then only wait for a fetch under way (the
    /// requests arriving while the keys are fetched get the new keys too).
    async fn refresh_for_unknown_kid(&self, verifier: &Verifier) {
        let fetch = {
            let mut asked = self.asked.lock().unwrap_or_else(|p| p.into_inner());
            let recent = asked.is_some_and(|at| at.elapsed() < UNKNOWN_KID_REFRESH);
            if !recent {
                *asked = Some(Instant::now());
            }
            !recent
        };
        if !fetch {
            drop(self.fetching.lock().await);
            return;
        }
        if let Err(e) = verifier.refresh(self).await {
            tracing::warn!(issuer = %self.url, error = %e, "cannot fetch the issuer's keys");
        }
    }
}

impl Keys {
    fn find(&self, kid: Option<&str>) -> Option<&Key> {
        match kid {
            Some(kid) => self.by_kid.get(kid),
            // A token without a kid: only an issuer with one key unnamed, or one key
            // in all, leaves no doubt which key is meant.
            None => match (self.unnamed.as_slice(), self.by_kid.len()) {
                ([only], 0) => Some(only),
                ([], 1) => self.by_kid.values().next(),
                _ => None,
            },
        }
    }
}

/// A key set's signing keys; `oct` (shared-secret) keys, encryption keys and keys this
/// build cannot read are skipped.
fn parse_keys(body: &[u8]) -> Result<Keys, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("key set: not JSON: {e}"))?;
    let Some(items) = doc.get("keys").and_then(Value::as_array) else {
        return Err("key set: no keys array".to_owned());
    };
    let mut keys = Keys::default();
    for item in items {
        let text = |k: &str| item.get(k).and_then(Value::as_str);
        if !matches!(text("kty"), Some("RSA" | "EC" | "OKP"))
            || text("use").is_some_and(|u| u != "sig")
        {
            continue;
        }
        let alg = match text("alg") {
            None => None,
            Some(name) => match name.parse::<Algorithm>() {
                Ok(alg) if ALLOWED.contains(&alg) => Some(alg),
                _ => continue,
            },
        };
        let Ok(jwk) = serde_json::from_value::<jsonwebtoken::jwk::Jwk>(item.clone()) else {
            continue;
        };
        let Ok(decoding) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        let key = Key { decoding, alg };
        match text("kid") {
            Some(kid) => {
                keys.by_kid.insert(kid.to_owned(), key);
            }
            None => keys.unnamed.push(key),
        }
    }
    Ok(keys)
}

/// The `Authorization: Bearer` token of a request: exactly one such header, the
/// scheme in any case, a token of RFC 6750's characters and bounded length.
pub fn bearer(headers: &http::HeaderMap) -> Result<&str, Refusal> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(Refusal::Missing);
    };
    if values.next().is_some() {
        return Err(Refusal::Invalid("more than one Authorization header"));
    }
    let text = value
        .to_str()
        .map_err(|_| Refusal::Invalid("the Authorization header is not text"))?;
    let (scheme, token) = text.split_once(' ').unwrap_or((text, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Refusal::Missing);
    }
    let token = token.trim_matches(' ');
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
        return Err(Refusal::Invalid("the bearer token is empty or too long"));
    }
    let b64token = |c: char| c.is_ascii_alphanumeric() || "-._~+/=".contains(c);
    if !token.chars().all(b64token) {
        return Err(Refusal::Invalid(
            "the bearer token has characters a token cannot hold",
        ));
    }
    Ok(token)
}

/// The `iss` a token claims, read before its signature is checked only to pick whose
/// keys check it.
fn unverified_issuer(token: &str) -> Result<String, Refusal> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or(Refusal::Invalid("not a signed JWT"))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| Refusal::Invalid("not a signed JWT"))?;
    #[derive(serde::Deserialize)]
    struct Iss {
        iss: Option<String>,
    }
    let claims: Iss = serde_json::from_slice(&bytes)
        .map_err(|_| Refusal::Invalid("the token's claims are not JSON"))?;
    claims
        .iss
        .ok_or(Refusal::Invalid("the token names no issuer"))
}

/// What a failed check says (never the token).
fn reason(e: &jsonwebtoken::errors::Error) -> &'static str {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => "the token has expired",
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)",
        ErrorKind::InvalidSignature => "the token's signature does not verify",
        ErrorKind::InvalidIssuer => "the token's issuer is not trusted",
        ErrorKind::InvalidAlgorithm => "the key is not for the token's algorithm",
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "sub" => SUB_NOT_TEXT,
            "exp" => "the token has no exp",
            "iss" => "the token has no iss",
            _ => "the token has no aud",
        },
        _ => "the token is malformed",
    }
}

/// `ns/sa` of a `system:serviceaccount:<ns>:<sa>` subject.
fn service_account(sub: &str) -> Option<Box<str>> {
    let (ns, sa) = sub.strip_prefix(SERVICE_ACCOUNT)?.split_once(':')?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains(':')).then(|| format!("{ns}/{sa}").into())
}

/// `https://host[:port]` and the path (`""` or `/…`) of an issuer URL.
fn split_origin(url: &str) -> (&str, &str) {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => url.split_at(after_scheme + i),
        None => (url, ""),
    }
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_str(value).expect("header"),
        );
        h
    }

    #[test]
    fn bearer_tokens_are_read_strictly() {
        assert_eq!(bearer(&http::HeaderMap::new()), Err(Refusal::Missing));
        assert_eq!(bearer(&headers("Basic abc")), Err(Refusal::Missing));
        assert_eq!(bearer(&headers("bearer a.b.c")), Ok("a.b.c"));
        assert!(matches!(
            bearer(&headers("Bearer ")),
            Err(Refusal::Invalid(_))
        ));
        assert!(matches!(
            bearer(&headers("Bearer a b")),
            Err(Refusal::Invalid(_))
        ));
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        assert!(matches!(bearer(&headers(&long)), Err(Refusal::Invalid(_))));
        let mut two = headers("Bearer a");
        two.append(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_static("Bearer b"),
        );
        assert!(matches!(bearer(&two), Err(Refusal::Invalid(_))));
    }

    #[test]
    fn service_accounts_read_as_namespace_and_name() {
        assert_eq!(
            service_account("system:serviceaccount:ci:deployer").as_deref(),
            Some("ci/deployer")
        );
        assert_eq!(service_account("system:serviceaccount:ci"), None);
        assert_eq!(service_account("system:serviceaccount:ci:a:b"), None);
        assert_eq!(service_account("alice"), None);
    }

    #[test]
    fn key_sets_keep_signing_keys_only() {
        let set = br#"{"keys":[
            {"kty":"oct","kid":"hmac","k":"c2VjcmV0"},
            {"kty":"RSA","kid":"enc","use":"enc","n":"AQAB","e":"AQAB"},
            {"kty":"RSA","kid":"hs","alg":"HS256","n":"AQAB","e":"AQAB"},
            {"kty":"RSA","kid":"rsa","alg":"RS256","n":"AQAB","e":"AQAB"}
        ]}"#;
        let keys = parse_keys(set).expect("parses");
        let kids: Vec<_> = keys.by_kid.keys().map(String::as_str).collect();
        assert_eq!(kids, ["rsa"]);
        assert!(
            keys.find(None).is_some(),
            "one key in all: a token without kid uses it"
        );
        assert!(parse_keys(b"{}").is_err());
    }

    #[test]
    fn the_snapshots_issuers_join_and_leave_beside_the_flags() {
        let settings = Settings {
            issuers: vec!["https://flag.example.com".to_owned()],
            resource: "https://gw.example.com".to_owned(),
            skew: Duration::from_secs(60),
            required_scopes: Vec::new(),
            kubernetes_issuer: None,
        };
        let upstream = Upstream::new(
            Duration::from_secs(1),
            crate::workload::Workload::new("test/gateway"),
        );
        let v = Verifier::new(settings, upstream);
        v.trust(&[
            "https://cp.example.com/".to_owned(),
            "ftp://bad.example.com".to_owned(),
            "https://flag.example.com".to_owned(),
        ]);
        assert_eq!(
            v.issuer_urls(),
            ["https://flag.example.com", "https://cp.example.com"]
        );
        let kept = v.issuers.load_full();
        v.trust(&["https://cp.example.com".to_owned()]);
        assert!(
            Arc::ptr_eq(&kept, &v.issuers.load_full()),
            "unchanged: not replaced"
        );
        // A snapshot issuer does not hold readiness back; a flag's first fetch does.
        assert_eq!(
            v.first_fetch_pending().as_deref(),
            Some("https://flag.example.com")
        );
        v.trust(&[]);
        assert_eq!(v.issuer_urls(), ["https://flag.example.com"]);
    }

    #[test]
    fn issuer_origin_and_path_split() {
        assert_eq!(
            split_origin("https://idp.example.com"),
            ("https://idp.example.com", "")
        );
        assert_eq!(
            split_origin("https://idp.example.com/realms/a"),
            ("https://idp.example.com", "/realms/a")
        );
    }

    #[test]
    fn audiences_name_the_gateway_or_the_path_asked_for() {
        let p = Principal {
            subject: Identity::new("x"),
            user: "u".into(),
            issuer: "i".into(),
            client_id: None,
            scopes: Vec::new(),
            identity: None,
            claims: Map::new(),
            audiences: vec!["https://gw.example.com/mcp/github".into()],
            expires: 0,
            memo: ArcSwapOption::empty(),
        };
        assert!(p.audience_allows("https://gw.example.com", "/mcp/github"));
        assert!(!p.audience_allows("https://gw.example.com", "/mcp/payroll"));
        assert!(!p.audience_allows("https://gw.example.com", "/mcp"));
    }
}
