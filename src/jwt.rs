//! Tokens: who a connection belongs to, until when.
//!
//! Clients present a JWT whose `sub` is the user id and whose `exp` ends the session. The whole
//! claim set is handed to the SQL policies (as `claims jsonb`), so a policy can use tenant or role
//! claims without the relay knowing about them.
//!
//! Keys: an HMAC secret (`PGRELAY_JWT_SECRET`), or `PGRELAY_JWT_PUBLIC_KEY_FILE`: a PEM public key
//! or a JWKS document with several keys chosen by the token's `kid`, reloaded when the file
//! changes; or `PGRELAY_JWT_JWKS_URL`, a JWKS document fetched from an identity provider and
//! refreshed (see [`crate::jwks`]). A key accepts only its own algorithm family, so a token signed with a public key as an
//! HMAC secret (the classic RS/HS confusion), or with `alg: none`, is refused.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

use crate::jwks::JwksSource;

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

/// Verifies tokens against the configured key or keys. Cloning shares the keys, so a reload (see
/// [`watch_key_file`]) reaches every clone.
#[derive(Clone)]
pub struct Verifier {
    keys: Arc<RwLock<Keys>>,
    /// Claims rules (required claims, `iss`, `aud`); the algorithms come from the key used.
    validation: Arc<Validation>,
    /// Where the keys are fetched from, for keys from a JWKS URL.
    remote: Option<Arc<JwksSource>>,
}

/// The refusal for a token whose `kid` no key has (what makes a JWKS URL be fetched again).
const UNKNOWN_KID: &str = "unknown key (kid)";

#[derive(Default)]
struct Keys {
    /// JWKS keys by `kid`.
    by_kid: HashMap<String, Key>,
    /// The key for tokens without `kid`: the secret, the PEM key, or a JWKS's only key.
    default: Option<Key>,
}

#[derive(Clone)]
struct Key {
    decoding: Arc<DecodingKey>,
    /// What this key may verify: its family only, so no token passes with another family's
    /// algorithm (RS/HS confusion, `none`).
    algorithms: Vec<Algorithm>,
}

impl Verifier {
    /// HS256/384/512 with a shared secret.
    pub fn from_secret(secret: &[u8]) -> Verifier {
        use Algorithm::*;
        Self::with_keys(Keys::single(
            DecodingKey::from_secret(secret),
            vec![HS256, HS384, HS512],
        ))
    }

    /// A PEM public key: RSA (RS256/384/512, PS*), EC (ES256/384) or Ed25519 (EdDSA).
    pub fn from_public_key_pem(pem: &[u8]) -> anyhow::Result<Verifier> {
        Ok(Self::with_keys(Keys::from_pem(pem)?))
    }

    /// A PEM public key or a JWKS document (`{"keys": [...]}`), read from a file.
    pub fn from_key_file(path: &std::path::Path) -> anyhow::Result<Verifier> {
        Ok(Self::with_keys(Keys::from_file(path)?))
    }

    /// Keys from a JWKS URL, fetched now (an error if that fails: there is nothing to verify
    /// tokens with yet).
    pub async fn from_jwks_url(source: JwksSource) -> anyhow::Result<Verifier> {
        let keys = Keys::fetch(&source).await?;
        let mut verifier = Self::with_keys(keys);
        verifier.remote = Some(Arc::new(source));
        Ok(verifier)
    }

    /// The JWKS URL the keys come from, if they do.
    pub fn jwks_source(&self) -> Option<&Arc<JwksSource>> {
        self.remote.as_ref()
    }

    /// Fetches the JWKS URL again (no-op without one); on error the keys in use stay.
    pub async fn refetch(&self) -> anyhow::Result<()> {
        if let Some(source) = &self.remote {
            let keys = Keys::fetch(source).await?;
            *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        }
        Ok(())
    }

    /// Whether tokens must carry a configured `iss` or `aud`.
    pub fn checks_issuer_or_audience(&self) -> bool {
        self.validation.iss.is_some() || self.validation.validate_aud
    }

    /// Verifies like [`Verifier::verify`]; but a token naming a `kid` no key has makes keys
    /// from a JWKS URL be fetched again first (rate-limited), so that a provider's new key
    /// works from its first token.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, InvalidToken> {
        let verified = self.verify(token);
        match (&verified, &self.remote) {
            (Err(err), Some(source)) if err.0 == UNKNOWN_KID => {
                source
                    .for_unknown_kid(|| async {
                        match self.refetch().await {
                            Ok(()) => tracing::info!(url = %source.url(), "fetched the JWKS again for an unknown kid"),
                            Err(err) => tracing::warn!(error = %format!("{err:#}"), "JWKS refetch failed; keeping the keys in use"),
                        }
                    })
                    .await;
                // Also when another token's fetch just ran: it may have brought this key.
                self.verify(token)
            }
            _ => verified,
        }
    }

    /// Reads the key file again; on error the keys in use stay.
    pub fn reload_from(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let keys = Keys::from_file(path)?;
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        Ok(())
    }

    fn with_keys(keys: Keys) -> Verifier {
        let mut validation = Validation::default();
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        Verifier {
            keys: Arc::new(RwLock::new(keys)),
            validation: Arc::new(validation),
            remote: None,
        }
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

    pub fn verify(&self, token: &str) -> Result<Principal, InvalidToken> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| InvalidToken(describe(e.kind())))?;
        let key = {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
            let key = match &header.kid {
                Some(kid) => keys
                    .by_kid
                    .get(kid)
                    .or(keys.default.as_ref().filter(|_| keys.by_kid.is_empty())),
                None => keys.default.as_ref(),
            };
            key.cloned()
                .ok_or_else(|| InvalidToken(UNKNOWN_KID.into()))?
        };
        let mut validation = (*self.validation).clone();
        validation.algorithms = key.algorithms;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &validation)
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

impl Keys {
    fn single(key: DecodingKey, algorithms: Vec<Algorithm>) -> Keys {
        Keys {
            by_kid: HashMap::new(),
            default: Some(Key {
                decoding: Arc::new(key),
                algorithms,
            }),
        }
    }

    fn from_pem(pem: &[u8]) -> anyhow::Result<Keys> {
        use Algorithm::*;
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Keys::single(
                key,
                vec![RS256, RS384, RS512, PS256, PS384, PS512],
            ));
        }
        if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            return Ok(Keys::single(key, vec![ES256, ES384]));
        }
        let key = DecodingKey::from_ed_pem(pem)
            .context("not an RSA, EC or Ed25519 public key in PEM form")?;
        Ok(Keys::single(key, vec![EdDSA]))
    }

    fn from_file(path: &std::path::Path) -> anyhow::Result<Keys> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        if bytes.trim_ascii_start().starts_with(b"{") {
            Keys::from_jwks(&bytes)
                .with_context(|| format!("{} is not a usable JWKS", path.display()))
        } else {
            Keys::from_pem(&bytes)
                .with_context(|| format!("{} is not a usable PEM key", path.display()))
        }
    }

    async fn fetch(source: &JwksSource) -> anyhow::Result<Keys> {
        let document = source.fetch().await?;
        Keys::from_jwks(&document)
            .with_context(|| format!("the JWKS at {} is not usable", source.url()))
    }

    fn from_jwks(json: &[u8]) -> anyhow::Result<Keys> {
        use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
        use Algorithm::*;
        let set: JwkSet = serde_json::from_slice(json)?;
        let mut by_kid = HashMap::new();
        for jwk in &set.keys {
            // Keys published for encryption never verify signatures.
            if matches!(
                jwk.common.public_key_use,
                Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
            ) {
                continue;
            }
            let Some(kid) = &jwk.common.key_id else {
                anyhow::bail!("every key needs a kid");
            };
            let family = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => vec![RS256, RS384, RS512, PS256, PS384, PS512],
                AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                    vec![ES256]
                }
                AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P384 => {
                    vec![ES384]
                }
                AlgorithmParameters::OctetKeyPair(_) => vec![EdDSA],
                _ => anyhow::bail!(
                    "key {kid}: only RSA, EC (P-256, P-384) and Ed25519 public keys are accepted"
                ),
            };
            // A key that names its algorithm accepts only that one.
            let algorithms = match &jwk.common.key_algorithm {
                Some(alg) => {
                    let alg: Algorithm = alg
                        .to_string()
                        .parse()
                        .map_err(|_| anyhow::anyhow!("key {kid}: unknown alg"))?;
                    anyhow::ensure!(
                        family.contains(&alg),
                        "key {kid}: alg does not match the key type"
                    );
                    vec![alg]
                }
                None => family,
            };
            let decoding = DecodingKey::from_jwk(jwk).with_context(|| format!("key {kid}"))?;
            by_kid.insert(
                kid.clone(),
                Key {
                    decoding: Arc::new(decoding),
                    algorithms,
                },
            );
        }
        anyhow::ensure!(!by_kid.is_empty(), "no keys");
        let default = if by_kid.len() == 1 {
            by_kid.values().next().cloned()
        } else {
            None
        };
        Ok(Keys { by_kid, default })
    }
}

/// Reloads the key file whenever it changes (checked every `every`), until `shutdown`. A file that
/// fails to parse is logged and the keys in use stay.
pub async fn watch_key_file(
    verifier: Verifier,
    path: std::path::PathBuf,
    every: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    // The contents, not the modification time: a rewrite within the file system's timestamp
    // granularity, or an atomic rename that keeps the old time, would not show in the time. Key
    // files are a few kilobytes.
    let contents = |p: &std::path::Path| std::fs::read(p).ok();
    let mut seen = contents(&path);
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        let now = contents(&path);
        if now != seen {
            seen = now;
            match verifier.reload_from(&path) {
                Ok(()) => tracing::info!(path = %path.display(), "reloaded token keys"),
                Err(err) => {
                    tracing::warn!(error = %format!("{err:#}"), "key file changed but could not be used; keeping the old keys")
                }
            }
        }
    }
}

/// Fetches a JWKS URL's keys again every `refresh_every` until `shutdown` (no-op without one).
/// A failed fetch is logged and the keys in use stay.
pub async fn refresh_jwks(verifier: Verifier, shutdown: tokio_util::sync::CancellationToken) {
    let Some(source) = verifier.jwks_source().cloned() else {
        return;
    };
    loop {
        tokio::select! {
            () = tokio::time::sleep(source.options.refresh_every) => {}
            () = shutdown.cancelled() => return,
        }
        match verifier.refetch().await {
            Ok(()) => tracing::debug!(url = %source.url(), "refreshed the JWKS"),
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "JWKS refresh failed; keeping the keys in use")
            }
        }
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
        InvalidKeyFormat => "algorithm not accepted".into(),
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

    const KEY_A: &str = include_str!("../tests/fixtures/ed25519-a.pem");
    const KEY_B: &str = include_str!("../tests/fixtures/ed25519-b.pem");
    const PUB_A: &str = include_str!("../tests/fixtures/ed25519-a.pub.pem");
    const X_A: &str = "GC5AC9E0B3Hm8q6Z6mSFK8OqbUfybMJOCiOrrGRzwsw";
    const X_B: &str = "i5DtJYIZxoeDSTJtwCyDUcHGQ3hovEVVoj_PFyKOcJc";

    fn ed_token(private_pem: &str, kid: Option<&str>) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = kid.map(str::to_owned);
        let claims = serde_json::json!({"sub": "u1", "exp": now_secs() + 60});
        jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_ed_pem(private_pem.as_bytes()).expect("key"),
        )
        .expect("sign")
    }

    fn jwks(keys: &[(&str, &str)]) -> String {
        let keys: Vec<Value> = keys
            .iter()
            .map(|(kid, x)| serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": x}))
            .collect();
        serde_json::json!({ "keys": keys }).to_string()
    }

    #[test]
    fn a_pem_public_key_accepts_its_family_only() {
        let v = Verifier::from_public_key_pem(PUB_A.as_bytes()).expect("pem");
        assert!(v.verify(&ed_token(KEY_A, None)).is_ok());
        assert!(v.verify(&ed_token(KEY_B, None)).is_err(), "another key");
        // The public key used as an HMAC secret: the confusion attack.
        let forged = sign(
            serde_json::json!({"sub":"u1","exp":now_secs()+60}),
            Algorithm::HS256,
            PUB_A.as_bytes(),
        );
        assert_eq!(
            v.verify(&forged).expect_err("confusion").to_string(),
            "algorithm not accepted"
        );
    }

    /// Watches `path` for `v` (checking every 20 ms) until the token is cancelled.
    async fn watching(
        v: &Verifier,
        path: &std::path::Path,
    ) -> (
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let watcher = tokio::spawn(watch_key_file(
            v.clone(),
            path.to_owned(),
            Duration::from_millis(20),
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        (shutdown, watcher)
    }

    /// Whether `v` accepts `token` within two seconds (a reload may be under way).
    async fn accepts_soon(v: &Verifier, token: &str) -> bool {
        for _ in 0..100 {
            if v.verify(token).is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_key_file_rewritten_with_its_old_modification_time_is_still_reloaded() {
        let dir = std::env::temp_dir().join(format!("pgrelay-jwks-mtime-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("jwks.json");
        std::fs::write(&path, jwks(&[("a", X_A)])).expect("write");
        let v = Verifier::from_key_file(&path).expect("jwks");
        let (shutdown, watcher) = watching(&v, &path).await;
        let before = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .expect("mtime");
        std::fs::write(&path, jwks(&[("a", X_A), ("b", X_B)])).expect("write");
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(before))
            .expect("restore the modification time");
        let reloaded = accepts_soon(&v, &ed_token(KEY_B, Some("b"))).await;
        shutdown.cancel();
        let _ = watcher.await;
        let _ = std::fs::remove_dir_all(&dir);
        assert!(reloaded, "the rewritten file was picked up");
    }

    #[tokio::test]
    async fn jwks_keys_are_chosen_by_kid_and_reloaded_when_the_file_changes() {
        let dir = std::env::temp_dir().join(format!("pgrelay-jwks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("jwks.json");
        std::fs::write(&path, jwks(&[("a", X_A)])).expect("write");
        let v = Verifier::from_key_file(&path).expect("jwks");
        assert!(v.verify(&ed_token(KEY_A, Some("a"))).is_ok());
        assert!(
            v.verify(&ed_token(KEY_A, None)).is_ok(),
            "a single key serves tokens without kid"
        );
        assert_eq!(
            v.verify(&ed_token(KEY_B, Some("b")))
                .expect_err("b")
                .to_string(),
            "unknown key (kid)"
        );
        assert!(
            v.verify(&ed_token(KEY_B, Some("a"))).is_err(),
            "signed by b, claiming a"
        );

        // Rotation: b is added, without a restart.
        let (shutdown, watcher) = watching(&v, &path).await;
        std::fs::write(&path, jwks(&[("a", X_A), ("b", X_B)])).expect("write");
        assert!(
            accepts_soon(&v, &ed_token(KEY_B, Some("b"))).await,
            "the new key was picked up"
        );
        assert!(
            v.verify(&ed_token(KEY_A, None)).is_err(),
            "two keys: a token must say which"
        );
        // A key published for encryption is not a signing key.
        let mut with_enc: Value =
            serde_json::from_str(&jwks(&[("a", X_A), ("b", X_B)])).expect("json");
        with_enc["keys"][1]["use"] = "enc".into();
        std::fs::write(&path, with_enc.to_string()).expect("write");
        v.reload_from(&path).expect("reload");
        assert_eq!(
            v.verify(&ed_token(KEY_B, Some("b")))
                .expect_err("enc")
                .to_string(),
            "unknown key (kid)"
        );
        std::fs::write(&path, jwks(&[("a", X_A), ("b", X_B)])).expect("write");
        v.reload_from(&path).expect("reload");
        // A broken file keeps the keys in use.
        std::fs::write(&path, "{ not json").expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(v.verify(&ed_token(KEY_B, Some("b"))).is_ok());
        shutdown.cancel();
        let _ = watcher.await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
