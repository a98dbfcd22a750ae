//! Upstream OAuth access tokens (`McpServer.spec.oauth`): obtained by the sidecar,
//! cached until shortly before they expire, sent as `Authorization: Bearer …`.
//!
//! Two grants:
//! - **client credentials** (RFC 6749 §4.4): the sidecar authenticates as the
//!   server's client (HTTP Basic with the client id and the secret from the snapshot);
//! - **token exchange** (RFC 8693): the sidecar presents the pod's own token (the file
//!   `--subject-token-file` names, read at each exchange, since projected tokens
//!   rotate) and receives one for the server's audience, so the server sees which
//!   workload acts, and no long-lived secret needs to be in the snapshot at all.
//!
//! In gateway mode a token-exchange server trades each caller's own (validated) token
//! instead, so the upstream sees the user: one cached token per caller (by the SHA-256
//! of the caller's token, at most 10,000 callers per server).
//!
//! One [`TokenSource`] per server, kept across snapshot swaps that leave its `oauth`
//! alone. Reading the current token is one atomic load; a refresh is done by one
//! request at a time (the others wait for it and take its token: no thundering herd at
//! the token endpoint). A token is refreshed when less than half its lifetime, or one
//! minute, is left; if the endpoint fails then, the old token serves until it expires.
//! When an upstream answers 401, [`TokenSource::invalidate`] drops the token it was
//! sent, and [`crate::upstream`] sends the request once more with a new one.
//!
//! Tokens and client secrets are never logged, never in `/config`, and never reach the
//! agent (the agent's own `Authorization` is dropped before the upstream, and
//! `WWW-Authenticate` before the agent).
//!
//! Not here: sending requests (the client is [`crate::upstream::Upstream`]'s).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use metrics::counter;
use serde::Deserialize;
use toolmesh_proto::v1alpha1 as pb;

use crate::error::ProxyError;
use crate::telemetry;
use crate::upstream::Upstream;

/// Largest token endpoint answer read.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;
/// Time the token endpoint has to answer.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime assumed when the endpoint says none (`expires_in` is only recommended).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);

/// The pod's own token for token exchange (`--subject-token-file`), set at start.
static SUBJECT_TOKEN_FILE: OnceLock<PathBuf> = OnceLock::new();

/// Use the token in `path` as the subject of token exchanges.
pub fn set_subject_token_file(path: PathBuf) {
    let _ = SUBJECT_TOKEN_FILE.set(path);
}

/// A token and when it is due.
#[derive(Debug)]
struct Token {
    /// `Bearer <token>`, marked sensitive.
    header: HeaderValue,
    refresh_at: Instant,
    expires_at: Instant,
}

/// Most callers whose exchanged tokens a gateway keeps per server; past it, slots
/// whose token expired are dropped, then the whole map (tokens are fetched again).
const MAX_CALLERS: usize = 10_000;

/// One token and the lock its refresh takes.
#[derive(Debug, Default)]
struct Slot {
    current: ArcSwapOption<Token>,
    refreshing: tokio::sync::Mutex<()>,
}

/// One server's access token (and, in gateway mode with token exchange, one per
/// caller).
#[derive(Debug)]
pub struct TokenSource {
    server: Arc<str>,
    config: pb::OAuth,
    own: Slot,
    /// Gateway mode, token exchange: by SHA-256 of the caller's token.
    callers: Mutex<HashMap<[u8; 32], Arc<Slot>>>,
}

fn registry() -> &'static Mutex<HashMap<Arc<str>, Arc<TokenSource>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<Arc<str>, Arc<TokenSource>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    token_type: String,
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct TokenError {
    error: String,
    error_description: Option<String>,
}

impl TokenSource {
    /// The source for `server` with `config`: the one kept when its config is the
    /// same (its token stays), else a new one.
    pub fn for_server(server: &str, config: &pb::OAuth) -> Arc<TokenSource> {
        let mut registry = registry().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(kept) = registry.get(server)
            && kept.config == *config
        {
            return kept.clone();
        }
        let fresh = Arc::new(TokenSource {
            server: Arc::from(server),
            config: config.clone(),
            own: Slot::default(),
            callers: Mutex::new(HashMap::new()),
        });
        registry.insert(fresh.server.clone(), fresh.clone());
        fresh
    }

    fn grant(&self) -> pb::o_auth::Grant {
        pb::o_auth::Grant::try_from(self.config.grant).unwrap_or_default()
    }

    /// Does this source exchange tokens (and so may take a caller's as the subject)?
    pub fn exchanges(&self) -> bool {
        self.grant() == pb::o_auth::Grant::TokenExchange
    }

    /// The slot for `caller` (a gateway caller's token to exchange).
    fn caller_slot(&self, caller: &str) -> Arc<Slot> {
        use sha2::Digest as _;
        let key: [u8; 32] = sha2::Sha256::digest(caller.as_bytes()).into();
        let mut callers = self.callers.lock().unwrap_or_else(|e| e.into_inner());
        if !callers.contains_key(&key) && callers.len() >= MAX_CALLERS {
            let now = Instant::now();
            callers.retain(|_, s| {
                s.current
                    .load()
                    .as_ref()
                    .is_some_and(|t| now < t.expires_at)
            });
            if callers.len() >= MAX_CALLERS {
                callers.clear();
            }
        }
        callers.entry(key).or_default().clone()
    }

    /// The `Authorization` value to send now: the cached token, or a new one. `caller`
    /// is the gateway caller's own token, exchanged instead of the pod's.
    pub async fn header(
        &self,
        upstream: &Upstream,
        caller: Option<&str>,
    ) -> Result<HeaderValue, ProxyError> {
        match caller {
            None => self.header_in(&self.own, upstream, None).await,
            Some(c) => self.header_in(&self.caller_slot(c), upstream, caller).await,
        }
    }

    async fn header_in(
        &self,
        slot: &Slot,
        upstream: &Upstream,
        caller: Option<&str>,
    ) -> Result<HeaderValue, ProxyError> {
        if let Some(token) = slot.current.load().as_ref()
            && Instant::now() < token.refresh_at
        {
            return Ok(token.header.clone());
        }
        let _one_at_a_time = slot.refreshing.lock().await;
        // Whoever held the lock may have refreshed it.
        let current = slot.current.load_full();
        if let Some(token) = &current
            && Instant::now() < token.refresh_at
        {
            return Ok(token.header.clone());
        }
        match self.fetch(upstream, caller).await {
            Ok(token) => {
                let header = token.header.clone();
                slot.current.store(Some(Arc::new(token)));
                Ok(header)
            }
            Err(reason) => {
                tracing::warn!(server = %self.server, %reason, "no access token from the token endpoint");
                match current {
                    // Due, not expired: it serves while the endpoint is away.
                    Some(token) if Instant::now() < token.expires_at => Ok(token.header.clone()),
                    _ => Err(ProxyError::UpstreamUnavailable {
                        server: self.server.to_string(),
                        reason: format!("no access token: {reason}"),
                    }),
                }
            }
        }
    }

    /// The upstream refused `sent`: forget it, so the next [`TokenSource::header`]
    /// fetches another (unless a newer one already replaced it).
    pub fn invalidate(&self, caller: Option<&str>, sent: &HeaderValue) {
        let forget = |slot: &Slot| {
            slot.current.rcu(|current| match current {
                Some(token) if token.header == sent => None,
                other => other.clone(),
            });
        };
        match caller {
            None => forget(&self.own),
            Some(c) => forget(&self.caller_slot(c)),
        }
    }

    async fn fetch(&self, upstream: &Upstream, caller: Option<&str>) -> Result<Token, String> {
        let grant = self.grant();
        let c = &self.config;
        let (form, basic) = self.form(grant, caller)?;
        let sent = Instant::now();
        let answer = upstream
            .post_form(&c.token_url, basic, form, MAX_TOKEN_RESPONSE, TOKEN_TIMEOUT)
            .await;
        self.taken(grant, sent, answer)
    }

    /// The token request's form and its client authentication, if any.
    fn form(
        &self,
        grant: pb::o_auth::Grant,
        caller: Option<&str>,
    ) -> Result<(String, Option<HeaderValue>), String> {
        let c = &self.config;
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        match grant {
            pb::o_auth::Grant::ClientCredentials => {
                form.append_pair("grant_type", "client_credentials");
            }
            pb::o_auth::Grant::TokenExchange => {
                let subject = match caller {
                    Some(caller) => caller.to_owned(),
                    None => {
                        let path = SUBJECT_TOKEN_FILE.get().ok_or(
                            "token exchange needs the pod's own token: start the sidecar with --subject-token-file",
                        )?;
                        std::fs::read_to_string(path)
                            .map_err(|e| format!("--subject-token-file {}: {e}", path.display()))?
                    }
                };
                form.append_pair(
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:token-exchange",
                )
                .append_pair("subject_token", subject.trim())
                .append_pair("subject_token_type", "urn:ietf:params:oauth:token-type:jwt")
                .append_pair(
                    "requested_token_type",
                    "urn:ietf:params:oauth:token-type:access_token",
                );
            }
        }
        if !c.scopes.is_empty() {
            form.append_pair("scope", &c.scopes.join(" "));
        }
        if !c.audience.is_empty() {
            form.append_pair("audience", &c.audience);
        }
        if !c.resource.is_empty() {
            form.append_pair("resource", &c.resource);
        }
        // RFC 6749 §2.3.1: HTTP Basic, each part form-encoded first; a public client
        // names itself in the body.
        let basic = if c.client_secret.is_empty() {
            if !c.client_id.is_empty() {
                form.append_pair("client_id", &c.client_id);
            }
            None
        } else {
            use base64::Engine as _;
            let enc =
                |t: &str| url::form_urlencoded::byte_serialize(t.as_bytes()).collect::<String>();
            let pair = format!("{}:{}", enc(&c.client_id), enc(&c.client_secret));
            let mut value = HeaderValue::from_str(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            ))
            .map_err(|_| "the client id or secret cannot be sent in a header".to_owned())?;
            value.set_sensitive(true);
            Some(value)
        };
        Ok((form.finish(), basic))
    }

    /// What the token endpoint's `answer` to a request sent at `sent` comes to.
    fn taken(
        &self,
        grant: pb::o_auth::Grant,
        sent: Instant,
        answer: Result<(http::StatusCode, bytes::Bytes), String>,
    ) -> Result<Token, String> {
        let c = &self.config;
        let result = answer.and_then(|(status, body)| {
            if status != http::StatusCode::OK {
                // The endpoint's error code is safe to show; its description is its own.
                let why = serde_json::from_slice::<TokenError>(&body)
                    .map(|e| match e.error_description {
                        Some(d) => format!("{}: {}", e.error, crate::proxy::truncate(&d)),
                        None => e.error,
                    })
                    .unwrap_or_default();
                return Err(format!("{} answered {status} {why}", c.token_url));
            }
            let token: TokenResponse = serde_json::from_slice(&body)
                .map_err(|e| format!("{}: not a token response: {e}", c.token_url))?;
            if !token.token_type.eq_ignore_ascii_case("bearer") {
                return Err(format!(
                    "{}: token_type {:?}, not Bearer",
                    c.token_url,
                    crate::proxy::truncate(&token.token_type)
                ));
            }
            let mut header = HeaderValue::from_str(&format!("Bearer {}", token.access_token))
                .map_err(|_| {
                    format!(
                        "{}: the access token cannot be sent in a header",
                        c.token_url
                    )
                })?;
            header.set_sensitive(true);
            let lifetime = token
                .expires_in
                .map_or(DEFAULT_LIFETIME, Duration::from_secs);
            let early = (lifetime / 2).min(Duration::from_secs(60));
            Ok(Token {
                header,
                refresh_at: sent + lifetime - early,
                expires_at: sent + lifetime,
            })
        });
        let grant_label = match grant {
            pb::o_auth::Grant::ClientCredentials => "client_credentials",
            pb::o_auth::Grant::TokenExchange => "token_exchange",
        };
        let outcome = if result.is_ok() { "ok" } else { "error" };
        counter!(telemetry::TOKEN_REQUESTS, "grant" => grant_label, "result" => outcome)
            .increment(1);
        if let Ok(token) = &result {
            tracing::info!(
                server = %self.server,
                grant = grant_label,
                expires_in = ?token.expires_at.saturating_duration_since(sent),
                "access token obtained"
            );
        }
        result
    }
}
