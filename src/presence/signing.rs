//! Bus messages carry a signature that only relays can make.
//!
//! Any session of the database may `NOTIFY pgrelay_presence` (NOTIFY needs no privilege), and
//! every relay's id is visible to clients in each `conn_id`. Unsigned, a message claiming to come
//! from another relay could remove its users from everyone's view, or add users who are not
//! there. So each payload is `<signature> <message>`, the signature being HMAC-SHA256 of the
//! message under a key derived from `pgrelay.secrets` (which only the relay's role may read;
//! see docs/dba.md). A relay applies only messages whose signature checks, and only in their
//! sender's order (see [`super::Presence::apply`]), so an old message heard again changes
//! nothing.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Signs and checks bus payloads.
#[derive(Clone)]
pub struct BusKey(HmacSha256);

impl BusKey {
    /// The bus key of the database whose position key is `secret`: its own key, so that a
    /// signature says nothing about positions.
    pub fn derive(secret: &[u8; 32]) -> BusKey {
        let mut derive = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
        derive.update(b"pgrelay presence bus");
        let key = derive.finalize().into_bytes();
        BusKey(HmacSha256::new_from_slice(&key).expect("HMAC takes any key length"))
    }

    /// The payload to publish for `message`.
    pub fn sign(&self, message: &str) -> String {
        let mut mac = self.0.clone();
        mac.update(message.as_bytes());
        let signature = mac.finalize().into_bytes();
        format!(
            "{} {message}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signature)
        )
    }

    /// The message of a payload a relay signed with this key; `None` for anything else.
    pub fn open<'a>(&self, payload: &'a str) -> Option<&'a str> {
        let (signature, message) = payload.split_once(' ')?;
        let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(signature)
            .ok()?;
        let mut mac = self.0.clone();
        mac.update(message.as_bytes());
        mac.verify_slice(&signature).ok()?;
        Some(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_payloads_signed_with_the_same_key_open() {
        let key = BusKey::derive(&[7; 32]);
        let payload = key.sign(r#"{"n":"a","s":1}"#);
        assert_eq!(key.open(&payload), Some(r#"{"n":"a","s":1}"#));
        assert_eq!(BusKey::derive(&[8; 32]).open(&payload), None, "another key");
        let forged = payload.replace("\"a\"", "\"b\"");
        assert_eq!(key.open(&forged), None, "a changed message");
        assert_eq!(key.open(r#"{"n":"a","s":1,"bye":true}"#), None, "unsigned");
    }
}
