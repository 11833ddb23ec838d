//! Typing indicators: throttled where they start, expiring everywhere.
//!
//! A client says `typing: true` while its user types (repeating it every second or two) and
//! `typing: false` when they stop. Keystroke-rate chatter must not become bus traffic, so the
//! relay the user is connected to relays at most one message per [`MIN_GAP`] per user and room,
//! and a repeated `true` at most once per [`REFRESH`]. Every relay expires an indicator that was
//! not refreshed within the typing timeout, so a client that vanishes mid-word stops "typing"
//! everywhere on its own.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::protocol::Room;

/// At most four typing messages per second per user per room are relayed.
pub const MIN_GAP: Duration = Duration::from_millis(250);
/// A `true` that only refreshes is relayed at most once a second.
pub const REFRESH: Duration = Duration::from_secs(1);

type Key = (Room, String);

#[derive(Default)]
pub struct Typing {
    /// Who is typing where, until when.
    active: HashMap<Key, Instant>,
    /// For users on this relay: when their last typing message was relayed, and what it said.
    relayed: HashMap<Key, (Instant, bool)>,
}

impl Typing {
    /// Whether a typing message from a user on this relay should be relayed.
    pub fn allow(&mut self, room: &Room, user: &str, typing: bool, now: Instant) -> bool {
        let key = (room.clone(), user.to_owned());
        if let Some(&(at, said)) = self.relayed.get(&key) {
            let since = now.duration_since(at);
            let repeat = said == typing && self.active.contains_key(&key) == typing;
            if since < MIN_GAP || (repeat && (!typing || since < REFRESH)) {
                return false;
            }
        }
        self.relayed.insert(key, (now, typing));
        true
    }

    /// Records a user's typing state; true if it changed (the room should be told).
    pub fn set(&mut self, room: &Room, user: &str, typing: bool, deadline: Instant) -> bool {
        let key = (room.clone(), user.to_owned());
        if typing {
            self.active.insert(key, deadline).is_none()
        } else {
            self.active.remove(&key).is_some()
        }
    }

    pub fn is_typing(&self, room: &Room, user: &str) -> bool {
        self.active.contains_key(&(room.clone(), user.to_owned()))
    }

    pub fn clear(&mut self, room: &Room, user: &str) {
        self.active.remove(&(room.clone(), user.to_owned()));
    }

    /// The users typing in a room.
    pub fn typing_in<'a>(&'a self, room: &'a Room) -> impl Iterator<Item = &'a String> + 'a {
        self.active
            .keys()
            .filter(move |(r, _)| r == room)
            .map(|(_, user)| user)
    }

    /// Removes and returns the indicators that ran out; forgets throttles that no longer matter.
    pub fn expired(&mut self, now: Instant) -> Vec<(Room, String)> {
        let expired: Vec<Key> = self
            .active
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(key, _)| key.clone())
            .collect();
        for key in &expired {
            self.active.remove(key);
        }
        self.relayed
            .retain(|_, (at, _)| now.duration_since(*at) < REFRESH);
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room() -> Room {
        Room::parse("task:1").expect("room")
    }

    #[test]
    fn changes_are_relayed_at_most_every_gap_and_refreshes_once_a_second() {
        let mut typing = Typing::default();
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(5);
        assert!(typing.allow(&room(), "u1", true, t0));
        typing.set(&room(), "u1", true, deadline);
        assert!(
            !typing.allow(&room(), "u1", false, t0 + Duration::from_millis(100)),
            "too soon"
        );
        assert!(
            !typing.allow(&room(), "u1", true, t0 + Duration::from_millis(500)),
            "a refresh within a second"
        );
        assert!(
            typing.allow(&room(), "u1", false, t0 + Duration::from_millis(600)),
            "a change after the gap"
        );
        typing.set(&room(), "u1", false, deadline);
        assert!(
            !typing.allow(&room(), "u1", false, t0 + Duration::from_secs(2)),
            "a repeated false says nothing new"
        );
        assert!(
            typing.allow(&room(), "u2", true, t0),
            "users are independent"
        );
    }

    #[test]
    fn indicators_expire_without_a_refresh() {
        let mut typing = Typing::default();
        let t0 = Instant::now();
        assert!(typing.set(&room(), "u1", true, t0 + Duration::from_secs(5)));
        assert!(
            !typing.set(&room(), "u1", true, t0 + Duration::from_secs(6)),
            "a refresh is not a change"
        );
        assert!(typing.expired(t0 + Duration::from_secs(5)).is_empty());
        assert_eq!(
            typing.expired(t0 + Duration::from_secs(6)),
            vec![(room(), "u1".to_owned())]
        );
        assert!(!typing.is_typing(&room(), "u1"));
    }
}
