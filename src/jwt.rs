//! Tokens: who a connection belongs to, until when.
//!
//! Clients present a JWT whose `sub` is the user id and whose `exp` ends the session. The whole
//! claim set is handed to the SQL policies (as `claims jsonb`), so a policy can use tenant or role
//! claims without the relay knowing about them.
//!
//! Keys: an HS256 secret (`PGRELAY_JWT_SECRET`), or a PEM public key
//! (`PGRELAY_JWT_PUBLIC_KEY_FILE`), which fixes the algorithm family so that a token signed with
//! the public key as an HMAC secret (the classic RS/HS confusion) is refused.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

/// The authenticated user of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: String,
    /// All claims of the token, as the policies receive them.
    pub claims: Value,
    /// Seconds since the Unix epoch.
    pub expires_at: u64,
}

impl Principal {
    /// Time left before the token expires (zero if it already has).
    pub fn remaining(&self) -> Duration {
        Duration::from_secs(self.expires_at.saturating_sub(now_secs()))
    }

    pub fn expires_at_iso(&self) -> String {
        let at = time::OffsetDateTime::from_unix_timestamp(self.expires_at as i64)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        at.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    }
}

/// Why a token was refused. The message is safe to show the client; it never contains the token.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidToken(String);

/// Verifies tokens with one configured key.
#[derive(Clone)]
pub struct Verifier {
    key: Arc<DecodingKey>,
    validation: Arc<Validation>,
}

impl Verifier {
    /// HS256 with a shared secret.
    /// HS256/384/512 with a shared secret.
    pub fn from_secret(secret: &[u8]) -> Verifier {
        use Algorithm::*;
        Self::new(DecodingKey::from_secret(secret), vec![HS256, HS384, HS512])
    }

    /// Also require this `iss` claim.
    pub fn with_issuer(mut self, issuer: &str) -> Verifier {
        let validation = Arc::make_mut(&mut self.validation);
        validation.set_issuer(&[issuer]);
        validation.required_spec_claims.insert("iss".into());
        self
    }

    /// Also require this audience in `aud`.
    pub fn with_audience(mut self, audience: &str) -> Verifier {
        let validation = Arc::make_mut(&mut self.validation);
        validation.set_audience(&[audience]);
        validation.validate_aud = true;
        validation.required_spec_claims.insert("aud".into());
        self
    }

    /// A PEM public key: RSA (RS256/384/512, PS*), EC (ES256/384) or Ed25519 (EdDSA).
    pub fn from_public_key_pem(pem: &[u8]) -> anyhow::Result<Verifier> {
        use Algorithm::*;
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Self::new(
                key,
                vec![RS256, RS384, RS512, PS256, PS384, PS512],
            ));
        }
        if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            return Ok(Self::new(key, vec![ES256, ES384]));
        }
        let key = DecodingKey::from_ed_pem(pem)
            .context("not an RSA, EC or Ed25519 public key in PEM form")?;
        Ok(Self::new(key, vec![EdDSA]))
    }

    fn new(key: DecodingKey, algorithms: Vec<Algorithm>) -> Verifier {
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        Verifier {
            key: Arc::new(key),
            validation: Arc::new(validation),
        }
    }

    pub fn verify(&self, token: &str) -> Result<Principal, InvalidToken> {
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|e| InvalidToken(describe(e.kind())))?;
        let claims = data.claims;
        let user = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(InvalidToken("`sub` must be a non-empty string".into())),
        };
        let expires_at = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or_else(|| InvalidToken("`exp` must be a number of seconds".into()))?;
        Ok(Principal {
            user,
            claims: Value::Object(claims),
            expires_at,
        })
    }
}

fn describe(kind: &jsonwebtoken::errors::ErrorKind) -> String {
    use jsonwebtoken::errors::ErrorKind::*;
    match kind {
        ExpiredSignature => "token expired".into(),
        ImmatureSignature => "token not valid yet (nbf)".into(),
        InvalidSignature => "invalid signature".into(),
        InvalidAlgorithm => "algorithm not accepted".into(),
        InvalidIssuer => "wrong issuer (iss)".into(),
        InvalidAudience => "wrong audience (aud)".into(),
        MissingRequiredClaim(claim) => format!("missing required claim `{claim}`"),
        InvalidToken | Base64(_) | Json(_) | Utf8(_) => "malformed token".into(),
        _ => "invalid token".into(),
    }
}

/// Mints an HS256 token (for `pgrelay token`, development and tests).
pub fn mint(
    secret: &[u8],
    user: &str,
    ttl: Duration,
    extra: &Map<String, Value>,
) -> anyhow::Result<String> {
    let now = now_secs();
    let mut claims = extra.clone();
    claims.insert("sub".into(), user.into());
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), (now + ttl.as_secs()).into());
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .context("signing the token")
}

/// Parses a duration such as `90s`, `15m`, `1h` or `7d`.
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?} (try 30s, 15m, 1h, 7d)"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => {
            return Err(format!(
                "invalid duration unit in {text:?} (use s, m, h or d)"
            ))
        }
    };
    Ok(Duration::from_secs(n.saturating_mul(seconds)))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"test-secret";

    fn sign(claims: Value, alg: Algorithm, secret: &[u8]) -> String {
        jsonwebtoken::encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .expect("sign")
    }

    #[test]
    fn accepts_a_minted_token() {
        let token = mint(SECRET, "u1", Duration::from_secs(60), &Map::new()).expect("mint");
        let p = Verifier::from_secret(SECRET).verify(&token).expect("valid");
        assert_eq!(p.user, "u1");
        assert!(p.remaining() > Duration::from_secs(50));
    }

    #[test]
    fn refuses_bad_tokens_with_a_reason() {
        let v = Verifier::from_secret(SECRET);
        let now = now_secs();
        let cases = [
            (
                sign(
                    serde_json::json!({"sub":"u1","exp":now+60}),
                    Algorithm::HS256,
                    b"other",
                ),
                "invalid signature",
            ),
            (
                sign(
                    serde_json::json!({"sub":"u1","exp":now-10}),
                    Algorithm::HS256,
                    SECRET,
                ),
                "token expired",
            ),
            (
                sign(serde_json::json!({"sub":"u1"}), Algorithm::HS256, SECRET),
                "missing required claim `exp`",
            ),
            (
                sign(serde_json::json!({"exp":now+60}), Algorithm::HS256, SECRET),
                "missing required claim `sub`",
            ),
            (
                sign(
                    serde_json::json!({"sub":"","exp":now+60}),
                    Algorithm::HS256,
                    SECRET,
                ),
                "`sub` must be",
            ),
            (
                sign(
                    serde_json::json!({"sub":"u1","exp":now+60,"nbf":now+600}),
                    Algorithm::HS256,
                    SECRET,
                ),
                "not valid yet",
            ),
            (
                // A valid HS256 token relabelled RS256 (algorithm confusion).
                relabel(
                    &sign(
                        serde_json::json!({"sub":"u1","exp":now+60}),
                        Algorithm::HS256,
                        SECRET,
                    ),
                    "RS256",
                ),
                "algorithm not accepted",
            ),
            ("not.a.token".to_string(), "malformed token"),
            // alg "none": header {"alg":"none"} with an empty signature.
            (
                format!(
                    "{}.{}.",
                    b64(r#"{"alg":"none","typ":"JWT"}"#),
                    b64(&format!(r#"{{"sub":"u1","exp":{}}}"#, now + 60))
                ),
                "",
            ),
        ];
        for (token, reason) in cases {
            let err = v.verify(&token).expect_err(reason);
            assert!(err.to_string().contains(reason), "{reason}: got {err}");
            assert!(
                !err.to_string().contains(&token),
                "the reason must not echo the token"
            );
        }
    }

    fn relabel(token: &str, alg: &str) -> String {
        let rest = token.split_once('.').map(|(_, r)| r).unwrap_or_default();
        format!(
            "{}.{rest}",
            b64(&format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#))
        )
    }

    fn b64(s: &str) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn all_hmac_sizes_are_accepted_and_issuer_and_audience_are_checked() {
        let now = now_secs();
        let claims = serde_json::json!({"sub":"u1","exp":now+60,"iss":"https://auth.example","aud":"pgrelay"});
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            assert!(
                Verifier::from_secret(SECRET)
                    .verify(&sign(claims.clone(), alg, SECRET))
                    .is_ok(),
                "{alg:?}"
            );
        }
        let strict = Verifier::from_secret(SECRET)
            .with_issuer("https://auth.example")
            .with_audience("pgrelay");
        assert!(strict
            .verify(&sign(claims, Algorithm::HS256, SECRET))
            .is_ok());
        let wrong_iss = serde_json::json!({"sub":"u1","exp":now+60,"iss":"https://evil.example","aud":"pgrelay"});
        let err = strict
            .verify(&sign(wrong_iss, Algorithm::HS256, SECRET))
            .expect_err("iss");
        assert!(err.to_string().contains("issuer"), "{err}");
        let wrong_aud =
            serde_json::json!({"sub":"u1","exp":now+60,"iss":"https://auth.example","aud":"other"});
        let err = strict
            .verify(&sign(wrong_aud, Algorithm::HS256, SECRET))
            .expect_err("aud");
        assert!(err.to_string().contains("audience"), "{err}");
        let missing = serde_json::json!({"sub":"u1","exp":now+60});
        assert!(
            strict
                .verify(&sign(missing, Algorithm::HS256, SECRET))
                .is_err(),
            "iss and aud required when configured"
        );
    }

    #[test]
    fn ttls_parse() {
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_ttl("15"), Ok(Duration::from_secs(15)));
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("h").is_err());
    }
}
