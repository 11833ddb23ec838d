//! The wire protocol: every JSON message's shape, room names, error and close codes.
//!
//! Messages to clients leave this module as [`Frame`]s: the JSON text, shared by every recipient,
//! with its type and resume position beside it, so a transport that needs them (SSE's `event:`
//! and `id:` lines) does not parse the text back.
//!
//! Incoming frames are parsed in two steps, so that every malformed message gets a precise
//! `bad_request` (and its `ref` back) instead of a generic failure: first as any JSON object, to
//! find `type` and `ref`, then as the message that `type` names.

use axum::extract::ws::Utf8Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::capture::outbox::Op;

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

/// A valid room name: `^[a-z_]+:[A-Za-z0-9_.:-]{1,128}$` (see `docs/protocol.md`).
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

    /// The part before the first colon (`project` for `project:42`): which join policy decides.
    pub fn kind(&self) -> &str {
        self.0.split_once(':').map_or(&*self.0, |(kind, _)| kind)
    }
}

/// Error codes of `error` messages (see `docs/protocol.md`).
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

/// WebSocket close codes (see `docs/protocol.md`).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const UNAUTHORIZED: u16 = 4001;
    pub const TOO_SLOW: u16 = 4008;
    pub const RATE_LIMITED: u16 = 4029;
}

/// Replies and notices from the relay (change events are [`Event`]s).
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
    /// Who is in the room, sent after `joined`: user → their connections' metas.
    PresenceState {
        room: &'a str,
        users: &'a Map<String, Value>,
        /// The room has more connections than one `presence_state` lists: this many in all.
        #[serde(skip_serializing_if = "Option::is_none")]
        connections: Option<usize>,
        /// Only some of them are listed (see `max_state_bytes` in [`crate::presence`]).
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
    },
    PresenceDiff {
        room: &'a str,
        joins: &'a Map<String, Value>,
        leaves: &'a Map<String, Value>,
    },
    Typing {
        room: &'a str,
        user: &'a str,
        typing: bool,
    },
}

impl ServerMessage<'_> {
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn to_frame(&self) -> Frame {
        let text = self.to_json();
        let (kind, position) = match self {
            ServerMessage::Ready { .. } => (Kind::Ready, None),
            ServerMessage::Joined { position, .. } => {
                (Kind::Joined, locate(&text, ",\"position\":\"", position))
            }
            ServerMessage::Left { .. } => (Kind::Left, None),
            ServerMessage::Pong { .. } => (Kind::Pong, None),
            ServerMessage::Error { .. } => (Kind::Error, None),
            ServerMessage::PresenceState { .. } => (Kind::PresenceState, None),
            ServerMessage::PresenceDiff { .. } => (Kind::PresenceDiff, None),
            ServerMessage::Typing { .. } => (Kind::Typing, None),
            ServerMessage::Synced { .. } => (Kind::Synced, None),
        };
        Frame {
            text: text.into(),
            kind,
            position,
        }
    }
}

/// A change, as one reader sees it: the `event` message.
#[derive(Debug)]
pub struct Event<'a> {
    pub room: &'a str,
    /// Its resume position.
    pub id: &'a str,
    /// Singular name of the table's rows: `task` makes `task_created`.
    pub entity: &'a str,
    pub table: &'a str,
    pub op: Op,
    pub row: &'a RawValue,
    pub old: Option<&'a RawValue>,
    /// `row` holds only the primary key: the row was over its table's `max_event_bytes`.
    pub truncated: bool,
    pub ts: &'a str,
}

#[derive(Serialize)]
struct EventFields<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    room: &'a str,
    id: &'a str,
    event: String,
    table: &'a str,
    op: &'static str,
    row: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    old: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    truncated: bool,
    ts: &'a str,
}

impl Event<'_> {
    /// Serialized once per room and shared by all its recipients.
    pub fn to_frame(&self) -> anyhow::Result<Frame> {
        let suffix = match self.op {
            Op::Insert => "created",
            Op::Update => "updated",
            Op::Delete => "deleted",
        };
        let text = serde_json::to_string(&EventFields {
            kind: "event",
            room: self.room,
            id: self.id,
            event: format!("{}_{suffix}", self.entity),
            table: self.table,
            op: self.op.as_str(),
            row: self.row,
            old: self.old,
            truncated: self.truncated,
            ts: self.ts,
        })?;
        let position = locate(&text, ",\"id\":\"", self.id);
        Ok(Frame {
            text: text.into(),
            kind: Kind::Event,
            position,
        })
    }
}

/// A message ready to queue: its JSON text (cheap to clone: the bytes are shared), its type, and
/// where in the text its resume position is (an event's `id`, `joined`'s `position`).
#[derive(Debug, Clone)]
pub struct Frame {
    text: Utf8Bytes,
    kind: Kind,
    /// Byte range of the position in `text`.
    position: Option<(u32, u32)>,
}

/// The `type` of a message to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Event,
    Ready,
    Joined,
    Left,
    Pong,
    Error,
    PresenceState,
    PresenceDiff,
    Typing,
    Synced,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Event => "event",
            Kind::Ready => "ready",
            Kind::Joined => "joined",
            Kind::Left => "left",
            Kind::Pong => "pong",
            Kind::Error => "error",
            Kind::PresenceState => "presence_state",
            Kind::PresenceDiff => "presence_diff",
            Kind::Typing => "typing",
            Kind::Synced => "synced",
        }
    }
}

impl Frame {
    pub fn as_str(&self) -> &str {
        self.text.as_str()
    }

    /// Its size, as send queues count it.
    pub fn len(&self) -> usize {
        self.text.as_str().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The resume position the message carries, if any.
    pub fn position(&self) -> Option<&str> {
        let (start, end) = self.position?;
        self.text.as_str().get(start as usize..end as usize)
    }

    pub fn into_text(self) -> Utf8Bytes {
        self.text
    }
}

/// Where `value` follows the first `key` in `text`: the fields before it (`type`, `room`) hold
/// no quotes but their own, so the first match is the message's own field.
fn locate(text: &str, key: &str, value: &str) -> Option<(u32, u32)> {
    let start = text.find(key)? + key.len();
    let end = start + value.len();
    (text.get(start..end) == Some(value))
        .then_some((u32::try_from(start).ok()?, u32::try_from(end).ok()?))
}

#[cfg(test)]
impl From<&str> for Frame {
    /// A frame of any text, for tests of queues.
    fn from(text: &str) -> Frame {
        Frame {
            text: Utf8Bytes::from(text.to_owned()),
            kind: Kind::Event,
            position: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_their_type_and_position_beside_the_text() {
        let row = RawValue::from_string(r#"{"id":"not this one"}"#.into()).expect("json");
        let event = Event {
            room: "task:1",
            id: "p.1-2_3",
            entity: "task",
            table: "tasks",
            op: Op::Update,
            row: &row,
            old: None,
            truncated: false,
            ts: "2026-01-01T00:00:00Z",
        }
        .to_frame()
        .expect("frame");
        assert_eq!(event.kind(), Kind::Event);
        assert_eq!(event.position(), Some("p.1-2_3"));
        let parsed: Value = serde_json::from_str(event.as_str()).expect("json");
        assert_eq!(parsed["type"], "event");
        assert_eq!(parsed["event"], "task_updated");
        assert_eq!(parsed["op"], "UPDATE");

        let joined = ServerMessage::Joined {
            room: "task:1",
            position: "q.9".into(),
            recovered: Some(true),
            reference: Some("r"),
        }
        .to_frame();
        assert_eq!(joined.kind(), Kind::Joined);
        assert_eq!(joined.position(), Some("q.9"));
        let left = ServerMessage::Left {
            room: "task:1",
            reason: "revoked",
            reference: None,
        }
        .to_frame();
        assert_eq!((left.kind(), left.position()), (Kind::Left, None));
    }

    #[test]
    fn room_names_follow_the_documented_pattern() {
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
