//! The wire protocol: the JSON messages of contract §4, room names, error and close codes.
//!
//! Incoming frames are parsed in two steps, so that every malformed message gets a precise
//! `bad_request` (and its `ref` back) instead of a generic failure: first as any JSON object, to
//! find `type` and `ref`, then as the message that `type` names.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A message from the client.
#[derive(Debug, PartialEq)]
pub enum ClientMessage {
    Auth {
        token: String,
    },
    Join {
        room: Room,
        since: Option<String>,
    },
    Leave {
        room: Room,
    },
    Presence {
        room: Room,
        meta: Map<String, Value>,
    },
    Typing {
        room: Room,
        typing: bool,
    },
    Ping,
    /// Answered with `synced` once the room's stream has reached `position` ([`crate::sync`]).
    Sync {
        room: Room,
        position: String,
    },
}

/// A client message that could not be understood, with the `ref` to answer it with.
#[derive(Debug, PartialEq)]
pub struct BadMessage {
    pub reference: Option<String>,
    pub message: String,
}

/// Parses one text frame into a message and its optional `ref`.
pub fn parse(text: &str) -> Result<(ClientMessage, Option<String>), BadMessage> {
    let bad = |reference: Option<String>, message: String| BadMessage { reference, message };
    let object: Map<String, Value> = serde_json::from_str(text)
        .map_err(|e| bad(None, format!("expected a JSON object: {e}")))?;
    let reference = match object.get("ref") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() <= 256 => Some(s.clone()),
        Some(_) => {
            return Err(bad(
                None,
                "`ref` must be a string of at most 256 bytes".into(),
            ))
        }
    };
    let Some(Value::String(kind)) = object.get("type") else {
        return Err(bad(reference, "missing string field `type`".into()));
    };
    let fields = Value::Object(object.clone());
    let parsed = match kind.as_str() {
        "auth" => serde_json::from_value::<AuthFields>(fields)
            .map(|f| ClientMessage::Auth { token: f.token }),
        "join" => serde_json::from_value::<JoinFields>(fields).and_then(|f| {
            Ok(ClientMessage::Join {
                room: room_or_err(f.room)?,
                since: f.since,
            })
        }),
        "leave" => serde_json::from_value::<RoomFields>(fields).and_then(|f| {
            Ok(ClientMessage::Leave {
                room: room_or_err(f.room)?,
            })
        }),
        "presence" => serde_json::from_value::<PresenceFields>(fields).and_then(|f| {
            Ok(ClientMessage::Presence {
                room: room_or_err(f.room)?,
                meta: f.meta,
            })
        }),
        "typing" => serde_json::from_value::<TypingFields>(fields).and_then(|f| {
            Ok(ClientMessage::Typing {
                room: room_or_err(f.room)?,
                typing: f.typing,
            })
        }),
        "ping" => Ok(ClientMessage::Ping),
        "sync" => serde_json::from_value::<SyncFields>(fields).and_then(|f| {
            Ok(ClientMessage::Sync {
                room: room_or_err(f.room)?,
                position: f.position,
            })
        }),
        other => return Err(bad(reference, format!("unknown message type {other:?}"))),
    };
    parsed
        .map(|message| (message, reference.clone()))
        .map_err(|e| bad(reference, format!("invalid `{kind}` message: {e}")))
}

fn room_or_err(name: String) -> Result<Room, serde_json::Error> {
    Room::parse(&name).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "invalid room name {:?} (expected kind:key, e.g. project:42)",
            truncate(&name, 80)
        ))
    })
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[derive(Deserialize)]
struct AuthFields {
    token: String,
}
#[derive(Deserialize)]
struct JoinFields {
    room: String,
    since: Option<String>,
}
#[derive(Deserialize)]
struct RoomFields {
    room: String,
}
#[derive(Deserialize)]
struct PresenceFields {
    room: String,
    meta: Map<String, Value>,
}
#[derive(Deserialize)]
struct SyncFields {
    room: String,
    position: String,
}
#[derive(Deserialize)]
struct TypingFields {
    room: String,
    typing: bool,
}

/// A valid room name: `^[a-z_]+:[A-Za-z0-9_.:-]{1,128}$` (contract §4).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Room(String);

impl std::borrow::Borrow<str> for Room {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl Room {
    pub fn parse(name: &str) -> Option<Room> {
        let (kind, key) = name.split_once(':')?;
        let kind_ok = !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
        let key_ok = (1..=128).contains(&key.len())
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
        (kind_ok && key_ok).then(|| Room(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Error codes of `error` messages (contract §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotJoined,
    RateLimited,
    TooManyRooms,
    Internal,
}

/// WebSocket close codes (contract §4).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const UNAUTHORIZED: u16 = 4001;
    pub const TOO_SLOW: u16 = 4008;
    pub const RATE_LIMITED: u16 = 4029;
}

/// Replies and notices from the relay (events are built in [`crate::fanout`], where they are
/// serialized once per room for all recipients).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage<'a> {
    Ready {
        user: &'a str,
        expires_at: String,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    Joined {
        room: &'a str,
        position: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    Left {
        room: &'a str,
        reason: &'a str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    Pong {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    Synced {
        room: &'a str,
        position: &'a str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
    Error {
        code: ErrorCode,
        message: &'a str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
    },
}

impl ServerMessage<'_> {
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names_follow_the_contract() {
        for ok in [
            "project:42",
            "task:7",
            "user:u1",
            "a_b:x.y:z-1",
            &format!("k:{}", "x".repeat(128)),
        ] {
            assert!(Room::parse(ok).is_some(), "{ok}");
        }
        for bad in [
            "project",
            "project:",
            ":1",
            "Project:1",
            "project:4 2",
            "pro-ject:1",
            "project:ü",
            &format!("k:{}", "x".repeat(129)),
        ] {
            assert!(Room::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn messages_parse_with_their_ref() {
        let (m, r) =
            parse(r#"{"type":"join","room":"project:1","since":"1.2.","ref":"a"}"#).expect("valid");
        assert_eq!(
            m,
            ClientMessage::Join {
                room: Room::parse("project:1").expect("room"),
                since: Some("1.2.".into())
            }
        );
        assert_eq!(r.as_deref(), Some("a"));
        assert_eq!(
            parse(r#"{"type":"ping"}"#).expect("valid").0,
            ClientMessage::Ping
        );
    }

    #[test]
    fn bad_messages_say_what_is_wrong_and_keep_the_ref() {
        let cases = [
            ("not json", None, "expected a JSON object"),
            ("[1,2]", None, "expected a JSON object"),
            (r#"{"ref":"x"}"#, Some("x"), "missing string field `type`"),
            (
                r#"{"type":"dance","ref":"x"}"#,
                Some("x"),
                "unknown message type",
            ),
            (
                r#"{"type":"join","ref":"x"}"#,
                Some("x"),
                "missing field `room`",
            ),
            (r#"{"type":"join","room":"BAD"}"#, None, "invalid room name"),
            (
                r#"{"type":"typing","room":"task:1","typing":"yes"}"#,
                None,
                "invalid `typing` message",
            ),
            (
                r#"{"type":"auth","token":5}"#,
                None,
                "invalid `auth` message",
            ),
        ];
        for (text, reference, fragment) in cases {
            let err = parse(text).expect_err(text);
            assert_eq!(err.reference.as_deref(), reference, "{text}");
            assert!(err.message.contains(fragment), "{text}: {}", err.message);
        }
    }
}
