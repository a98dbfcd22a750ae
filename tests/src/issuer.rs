//! A minimal OpenID issuer in this process, for the benchmark: discovery
//! (`/.well-known/openid-configuration`), a key set with one ES256 key (`/jwks`), and
//! tokens signed with it. The end-to-end tests use a real authorization server
//! (`tests/js/authz.mjs`); the benchmark needs thousands of tokens fast and no Node.

use anyhow::{Context, Result, anyhow};
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
const KID: &str = "bench-key";

/// The issuer's URL (its `iss`) and its signing key; served until dropped.
pub struct Issuer {
    pub url: String,
    key: EcdsaKeyPair,
    rng: SystemRandom,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer").field("url", &self.url).finish()
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Issuer {
    /// Make a key and serve discovery and the key set on `127.0.0.1:0`.
    pub async fn start() -> Result<Issuer> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|e| anyhow!("key: {e}"))?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|e| anyhow!("key: {e}"))?;
        // An uncompressed point: 0x04, x, y.
        let point = key.public_key().as_ref();
        let (x, y) = point
            .get(1..33)
            .zip(point.get(33..65))
            .context("public key")?;
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": KID,
            "x": B64.encode(x), "y": B64.encode(y)}]})
        .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let discovery = serde_json::json!({
            "issuer": url, "jwks_uri": format!("{url}/jwks"),
            "token_endpoint": format!("{url}/token"),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"]})
        .to_string();
        let json = |body: String| {
            move || async move { ([(http::header::CONTENT_TYPE, "application/json")], body) }
        };
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                axum::routing::get(json(discovery)),
            )
            .route("/jwks", axum::routing::get(json(jwks)));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Issuer {
            url,
            key,
            rng,
            server,
        })
    }

    /// A token for `sub` with audience `aud`, valid for an hour.
    pub fn token(&self, sub: &str, aud: &str) -> Result<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let header =
            B64.encode(serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": KID}).to_string());
        let claims = B64.encode(
            serde_json::json!({"iss": self.url, "sub": sub, "aud": aud,
                "iat": now, "exp": now + 3600, "scope": "mcp"})
            .to_string(),
        );
        let signing = format!("{header}.{claims}");
        let signature = self
            .key
            .sign(&self.rng, signing.as_bytes())
            .map_err(|e| anyhow!("sign: {e}"))?;
        Ok(format!("{signing}.{}", B64.encode(signature.as_ref())))
    }
}
