//! Sealed positions: the only positions a client is given, and the only ones it may give back.
//!
//! A position names a point in the stream of all changes (see [`super::position`]). In the clear it
//! would tell a user how many changes and transactions happened between two of their events,
//! including ones they may not read, and a client could name any point it likes (a change id it
//! guessed, a snapshot from nowhere). So every position leaves pgrelay sealed: encrypted, so it
//! reveals nothing, and authenticated, so only positions pgrelay made are accepted. A client that
//! sends anything else (a plain snapshot, a token changed by one bit, another database's token)
//! gets `bad_request`.
//!
//! Both the relay and the database seal: the relay its event ids and `joined` positions,
//! `pgrelay.position()` the snapshot of the calling transaction (`sql/pgrelay.sql`). Postgres can
//! do this only with `pgcrypto`, which has HMAC-SHA256 and AES-CBC but no AEAD mode, so the
//! construction is one both sides can build from those two, encrypt-then-MAC:
//!
//! ```text
//!   keys   enc = HMAC(k, "pgrelay position enc"), iv = HMAC(k, "pgrelay position iv"),
//!          mac = HMAC(k, "pgrelay position mac")          k = pgrelay.secrets.position_key
//!   iv     = HMAC(iv, plain)[..16]                         synthetic: same position, same token
//!   body   = AES-256-CBC(enc, iv, PKCS#7(plain))
//!   tag    = HMAC(mac, iv || body)[..16]
//!   token  = "q" base64url(iv || body || tag)             no padding
//! ```
//!
//! * **Deterministic**, like SIV modes: the IV is a keyed hash of the plaintext, so one change has
//!   the same id in every room and on every relay, and the only thing two tokens reveal is whether
//!   they are equal. (A random IV would make each seal different and gain nothing here.)
//! * **The tag is checked before anything is decrypted**, in constant time, so a tampered token
//!   never reaches the padding check: no padding oracle.
//! * **One key for all relays and the database**, generated at install in `pgrelay.secrets`: every
//!   relay loads it at start, so replicas accept each other's positions with no configuration.
//!
//! Tokens sealed by earlier versions (`p…`, AES-256-GCM-SIV with the same key and binary form) are
//! still opened, so positions clients hold survive an upgrade. Nothing new is sealed that way.

use std::sync::Arc;

use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::position::{from_bytes, to_bytes, BadPosition, Position, MAX_POSITION_TEXT};

type HmacSha256 = Hmac<Sha256>;

/// Tokens of this codec start with this letter (plain positions start with a digit).
const SEALED: char = 'q';
/// Tokens of the codec before this one (AES-256-GCM-SIV, fixed nonce): opened, never made.
const LEGACY: char = 'p';

/// The IV and the tag: 128 bits each (HMAC-SHA256 truncated, as in RFC 4868's choices).
const IV_LEN: usize = 16;
const TAG_LEN: usize = 16;
const BLOCK: usize = 16;

/// Seals positions for clients, and opens what clients send back.
#[derive(Clone)]
pub struct PositionCodec {
    keys: Arc<Keys>,
}

struct Keys {
    enc: aes::Aes256,
    iv: HmacSha256,
    mac: HmacSha256,
    legacy: aes_gcm_siv::Aes256GcmSiv,
}

/// HMAC-SHA256 of `data` under `key` (any key length is valid for HMAC).
fn hmac(key: &[u8], data: &[&[u8]]) -> [u8; 32] {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for part in data {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

impl PositionCodec {
    /// A codec for the database whose `pgrelay.secrets.position_key` is `key`.
    pub fn new(key: &[u8; 32]) -> PositionCodec {
        let derive = |label: &str| hmac(key, &[label.as_bytes()]);
        let keyed = |k: [u8; 32]| {
            <HmacSha256 as Mac>::new_from_slice(&k).unwrap_or_else(|_| unreachable!())
        };
        let keys = Keys {
            enc: aes::Aes256::new(&derive("pgrelay position enc").into()),
            iv: keyed(derive("pgrelay position iv")),
            mac: keyed(derive("pgrelay position mac")),
            legacy: aes_gcm_siv::KeyInit::new(key.into()),
        };
        PositionCodec {
            keys: Arc::new(keys),
        }
    }

    /// The token a client sees.
    pub fn seal(&self, position: &Position) -> String {
        let keys = &*self.keys;
        let plain = to_bytes(position);
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&keys.iv.clone().chain_update(&plain).finalize().into_bytes()[..IV_LEN]);

        // CBC with PKCS#7 padding (always at least one byte of it), as pgcrypto's
        // `encrypt_iv(..., 'aes-cbc/pad:pkcs')` does.
        let pad = BLOCK - plain.len() % BLOCK;
        let mut out = Vec::with_capacity(IV_LEN + plain.len() + pad + TAG_LEN);
        out.extend_from_slice(&iv);
        let mut previous = iv;
        let mut padded = plain;
        padded.resize(padded.len() + pad, pad as u8);
        for chunk in padded.chunks_exact(BLOCK) {
            let mut block = aes::Block::default();
            for (b, (p, c)) in block.iter_mut().zip(chunk.iter().zip(previous)) {
                *b = p ^ c;
            }
            keys.enc.encrypt_block(&mut block);
            previous.copy_from_slice(&block);
            out.extend_from_slice(&block);
        }
        let tag = keys.mac.clone().chain_update(&out).finalize().into_bytes();
        out.extend_from_slice(&tag[..TAG_LEN]);
        format!(
            "{SEALED}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out)
        )
    }

    /// A position sealed by any relay or `pgrelay.position()` of this database; anything else
    /// (plain, tampered, truncated, another database's) is refused.
    pub fn open(&self, token: &str) -> Result<Position, BadPosition> {
        if token.len() > MAX_POSITION_TEXT {
            return Err(BadPosition);
        }
        let mut chars = token.chars();
        let kind = chars.next().ok_or(BadPosition)?;
        let sealed = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(chars.as_str())
            .map_err(|_| BadPosition)?;
        match kind {
            SEALED => self.open_sealed(&sealed),
            LEGACY => self.open_legacy(&sealed),
            _ => Err(BadPosition),
        }
    }

    fn open_sealed(&self, sealed: &[u8]) -> Result<Position, BadPosition> {
        let keys = &*self.keys;
        let body_len = sealed
            .len()
            .checked_sub(IV_LEN + TAG_LEN)
            .ok_or(BadPosition)?;
        if body_len == 0 || body_len % BLOCK != 0 {
            return Err(BadPosition);
        }
        let (signed, tag) = sealed.split_at(IV_LEN + body_len);
        keys.mac
            .clone()
            .chain_update(signed)
            .verify_truncated_left(tag)
            .map_err(|_| BadPosition)?;
        let (iv, body) = signed.split_at(IV_LEN);
        let mut plain = Vec::with_capacity(body_len);
        let mut previous = iv;
        for chunk in body.chunks_exact(BLOCK) {
            let mut block = aes::Block::default();
            block.copy_from_slice(chunk);
            keys.enc.decrypt_block(&mut block);
            plain.extend(block.iter().zip(previous).map(|(b, c)| b ^ c));
            previous = chunk;
        }
        // Authentic, so the padding is ours; checked anyway rather than trusted.
        let pad = usize::from(*plain.last().ok_or(BadPosition)?);
        if pad == 0
            || pad > BLOCK
            || plain[plain.len() - pad..]
                .iter()
                .any(|&b| b as usize != pad)
        {
            return Err(BadPosition);
        }
        plain.truncate(plain.len() - pad);
        from_bytes(&plain)
    }

    fn open_legacy(&self, sealed: &[u8]) -> Result<Position, BadPosition> {
        use aes_gcm_siv::aead::Aead;
        let plain = self
            .keys
            .legacy
            .decrypt(&Default::default(), sealed)
            .map_err(|_| BadPosition)?;
        from_bytes(&plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_positions_round_trip_and_reveal_nothing() {
        let codec = PositionCodec::new(&[7; 32]);
        for text in [
            "774.774.",
            "100.105.100_103~104.110.104~42",
            "5000000.5000010.5000001~5000012.5000012.~99999999",
        ] {
            let position: Position = text.parse().expect("valid");
            let token = codec.seal(&position);
            assert!(token.starts_with('q') && token.len() < 100, "{token}");
            assert!(!token.contains("774") && !token.contains("42"), "{token}");
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "URL-safe: {token}"
            );
            assert_eq!(codec.open(&token), Ok(position.clone()));
            assert_eq!(codec.seal(&position), token, "deterministic");
        }
        // A snapshot with thousands of transactions in progress still round-trips.
        let xip: Vec<String> = (1000..6000).map(|x| x.to_string()).collect();
        let busy: Position = format!("1000.7000.{}", xip.join("_"))
            .parse()
            .expect("valid");
        assert_eq!(codec.open(&codec.seal(&busy)), Ok(busy));
    }

    #[test]
    fn plain_tampered_and_foreign_tokens_do_not_open() {
        let codec = PositionCodec::new(&[7; 32]);
        // Plain positions, whatever their shape, are not pgrelay's to accept.
        for plain in ["774.774.", "729.729.", "100.105.100_103~104.110.104~42"] {
            assert_eq!(codec.open(plain), Err(BadPosition), "{plain}");
        }
        let token = codec.seal(&"100.105.100_103~104.110.104~42".parse().expect("valid"));
        // Every single changed character, anywhere in the token, is noticed.
        for at in 1..token.len() {
            let mut bytes = token.clone().into_bytes();
            bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
            let flipped = String::from_utf8(bytes).expect("ascii");
            assert_eq!(codec.open(&flipped), Err(BadPosition), "{flipped}");
        }
        assert_eq!(codec.open(&token[..token.len() - 1]), Err(BadPosition));
        assert_eq!(
            PositionCodec::new(&[8; 32]).open(&token),
            Err(BadPosition),
            "another database's key"
        );
        for garbage in [
            "",
            "q",
            "p",
            "q!!!",
            "qAAAA",
            "p____________________________",
        ] {
            assert_eq!(codec.open(garbage), Err(BadPosition), "{garbage}");
        }
        let blocks = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0u8; 64]);
        assert_eq!(codec.open(&format!("q{blocks}")), Err(BadPosition));
    }

    /// Positions sealed before this codec (AES-256-GCM-SIV) still open, with the same key.
    #[test]
    fn tokens_of_the_previous_codec_still_open() {
        use aes_gcm_siv::aead::Aead;
        let key = [7u8; 32];
        let position: Position = "100.105.100_103~104.110.104~42".parse().expect("valid");
        let cipher: aes_gcm_siv::Aes256GcmSiv = aes_gcm_siv::KeyInit::new(&key.into());
        let sealed = cipher
            .encrypt(&Default::default(), to_bytes(&position).as_slice())
            .expect("encrypt");
        let old = format!(
            "p{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sealed)
        );
        let codec = PositionCodec::new(&key);
        assert_eq!(codec.open(&old), Ok(position.clone()));
        assert!(codec.seal(&position).starts_with('q'), "new ones are new");
    }
}
