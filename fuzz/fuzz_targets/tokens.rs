//! Gateway mode's bearer tokens and its challenges. Three readings of the input:
//!
//! - an `Authorization` header value: what `bearer` takes is a bounded token of RFC
//!   6750's characters, and what `check` accepts of it is a token the issuer signed;
//! - the fixture's valid token (alice's) with bytes changed: any change the gateway
//!   still accepts (a second spelling of the signature or of the base64) says exactly
//!   what the issuer signed: the same user, issuer, client and scopes;
//! - a claims object, signed with the issuer's key: what is accepted has a string
//!   `sub`, the trusted issuer, an audience naming the gateway, and has not expired.
//!
//! And for every refusal and the path the input names, the `WWW-Authenticate` value is
//! ASCII text that names the gateway's metadata and never the token.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use http::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use toolmesh_sidecar::gateway::Gateway;
use toolmesh_sidecar::gateway::tokens::{self, Refusal, Settings, Verifier};

const ISSUER: &str = "https://idp.example.com";
const RESOURCE: &str = "https://mcp.example.com";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

struct Fixture {
    verifier: Arc<Verifier>,
    gateway: Gateway,
    key: EcdsaKeyPair,
    rng: SystemRandom,
    /// Alice's token, valid for a day.
    token: String,
}

fn sign(key: &EcdsaKeyPair, rng: &SystemRandom, claims: &[u8]) -> String {
    let header = B64.encode(br#"{"alg":"ES256","typ":"JWT","kid":"k"}"#);
    let signing = format!("{header}.{}", B64.encode(claims));
    let signature = key.sign(rng, signing.as_bytes()).expect("sign");
    format!("{signing}.{}", B64.encode(signature.as_ref()))
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let rng = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("key");
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("key");
        let point = key.public_key().as_ref();
        let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256",
            "kid": "k", "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65])}]});
        let settings = Settings {
            issuers: vec![ISSUER.to_owned()],
            resource: RESOURCE.to_owned(),
            skew: Duration::from_secs(60),
            required_scopes: Vec::new(),
            kubernetes_issuer: None,
        };
        let upstream = toolmesh_sidecar::upstream::Upstream::new(
            Duration::from_secs(1),
            toolmesh_sidecar::workload::Workload::new("fuzz/gateway"),
        );
        let verifier = Arc::new(Verifier::new(settings, upstream));
        verifier
            .hold_keys(ISSUER, jwks.to_string().as_bytes())
            .expect("keys");
        let claims = serde_json::json!({"iss": ISSUER, "sub": "alice", "aud": RESOURCE,
            "exp": tokens::unix_now() + 86_400, "client_id": "ide", "scope": "mcp read"});
        let token = sign(&key, &rng, claims.to_string().as_bytes());
        let gateway = Gateway::new(
            verifier.clone(),
            RESOURCE,
            vec!["mcp".to_owned()],
            Arc::new(toolmesh_sidecar::snapshot::Active::default()),
        );
        Fixture {
            verifier,
            gateway,
            key,
            rng,
            token,
        }
    })
}

/// An accepted variant of alice's token says what the issuer signed.
fn accepted_as_signed(f: &Fixture, token: &str) {
    if let Ok(p) = f.verifier.check(token, tokens::unix_now()) {
        assert_eq!(&*p.user, "alice");
        assert_eq!(&*p.issuer, ISSUER);
        assert_eq!(p.client_id.as_deref(), Some("ide"));
        let scopes: Vec<&str> = p.scopes.iter().map(|s| &**s).collect();
        assert_eq!(scopes, ["mcp", "read"]);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let f = fixture();
    match mode % 3 {
        0 => {
            let Ok(value) = HeaderValue::from_bytes(rest) else {
                return;
            };
            let mut headers = HeaderMap::new();
            headers.insert(AUTHORIZATION, value);
            if let Ok(token) = tokens::bearer(&headers) {
                assert!(!token.is_empty() && token.len() <= tokens::MAX_TOKEN_BYTES);
                assert!(
                    token
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b))
                );
                accepted_as_signed(f, token);
            }
        }
        1 => {
            let mut bytes = f.token.clone().into_bytes();
            for pair in rest.chunks_exact(2) {
                let at = usize::from(pair[0]) * bytes.len() / 256;
                bytes[at] ^= pair[1];
            }
            if let Ok(token) = String::from_utf8(bytes) {
                accepted_as_signed(f, &token);
            }
        }
        _ => {
            let token = sign(&f.key, &f.rng, rest);
            let Ok(p) = f.verifier.check(&token, tokens::unix_now()) else {
                return;
            };
            let claims: serde_json::Value = serde_json::from_slice(rest).expect("accepted claims are JSON");
            assert_eq!(claims["sub"].as_str(), Some(&*p.user));
            assert_eq!(&*p.issuer, ISSUER);
            let exp = claims["exp"].as_f64().expect("exp");
            assert!(exp + 60.0 > tokens::unix_now() as f64, "expired: {exp}");
            let names_us = |a: &serde_json::Value| a.as_str().is_some_and(|a| a.starts_with(RESOURCE));
            let aud = &claims["aud"];
            assert!(
                names_us(aud) || aud.as_array().is_some_and(|all| all.iter().any(names_us)),
                "{claims}"
            );
        }
    }
    // Challenges for the path the input names.
    let path = String::from_utf8_lossy(rest);
    for refusal in [
        Refusal::Missing,
        Refusal::Invalid("the token has expired"),
        Refusal::InsufficientScope,
    ] {
        let value = f.gateway.challenge(&refusal, &path);
        let text = value.to_str().expect("ASCII");
        assert!(text.starts_with("Bearer "), "{text}");
        assert!(text.contains(&format!("resource_metadata=\"{RESOURCE}/.well-known/oauth-protected-resource")), "{text}");
        assert_eq!(text.matches('"').count() % 2, 0, "{text}");
        assert!(!text.contains(&f.token));
    }
});
