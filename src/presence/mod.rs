//! Presence and typing: who is in a room right now, on every relay, and who is typing.
//!
//! Every relay process keeps the *whole* view: for each room, one entry per connection in it,
//! wherever that connection is (`(relay, connection) → (user, meta)`). Entries of this relay change
//! when its clients join, leave or set their meta; entries of other relays change when they say so
//! on the presence bus ([`bus`], a `LISTEN/NOTIFY` channel of its own). Each relay tells its own
//! clients what changed: `presence_state` once after `joined`, then `presence_diff`s. A user with
//! three tabs is one user with three metas.
//!
//! Nothing here touches the outbox or the change path: the bus is a separate connection, and a
//! local change is applied at once and only *published* in the background.
//!
//! Only connections that joined a room (the join policy let them in) are shown its presence and
//! its typing; a connection that leaves, or loses access, stops seeing it before its `left`.
//!
//! Relays come and go. Each relay gets a fresh random id when it starts and announces itself with
//! a heartbeat; a relay not heard from within the timeout is forgotten together with its
//! connections, so a relay killed with SIGKILL leaves no ghosts, and its restart (a new id) cannot
//! bring the old entries back. A relay that notices it missed some of another's messages (a gap
//! in that relay's sequence numbers, or a relay it has never heard of) asks it for its full state.

pub mod bus;
pub mod signing;
mod typing;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::protocol::{Frame, Room, ServerMessage};
use crate::queue::ClientHandle;
use bus::{Envelope, Op};
use typing::Typing;

/// The largest meta a connection may set (serialized), so that any presence op fits one NOTIFY.
pub const MAX_META_BYTES: usize = 1024;

/// How often a relay says it is alive, how long its silence is tolerated, how long a typing
/// indicator lasts without a refresh; and the limits on what presence costs a relay and its
/// clients, whatever other relays or large rooms send its way.
#[derive(Clone, Debug)]
pub struct PresenceTimings {
    pub heartbeat: Duration,
    pub relay_timeout: Duration,
    pub typing_timeout: Duration,
    /// A `presence_state` lists a room's connections up to about this many bytes (and at most a
    /// quarter of the joiner's send budget); beyond, it says `"truncated": true`. So a room
    /// whose presence grew large never closes a new joiner as too slow.
    pub max_state_bytes: usize,
    /// Connections of other relays held in the view, all rooms together; more are not shown.
    pub max_remote_entries: usize,
    /// This relay sends its full state at most this often, however often it is asked.
    pub resync_interval: Duration,
}

impl Default for PresenceTimings {
    fn default() -> PresenceTimings {
        PresenceTimings {
            heartbeat: Duration::from_secs(5),
            relay_timeout: Duration::from_secs(15),
            typing_timeout: Duration::from_secs(5),
            max_state_bytes: 64 * 1024,
            max_remote_entries: 200_000,
            resync_interval: Duration::from_secs(1),
        }
    }
}

/// A connection in the presence view: which relay it is on, and its id there. The relay's id is
/// shared, not copied into every entry.
type ConnectionKey = (Arc<str>, u64);

/// Why a presence or typing message was refused; the messages are safe to show.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("join the room first")]
    NotJoined,
    #[error("`meta` must be at most {MAX_META_BYTES} bytes of JSON")]
    MetaTooLarge,
}

pub struct Presence {
    /// This relay's id on the bus, fresh at every start.
    node: Arc<str>,
    timings: PresenceTimings,
    state: Mutex<State>,
    /// Ops for the bus to publish, and a nudge when another relay asks for our full state.
    outgoing: mpsc::UnboundedSender<Op>,
    pub(crate) sync_wanted: Notify,
}

#[derive(Default)]
struct State {
    rooms: HashMap<Room, RoomPresence>,
    relays: HashMap<String, RelayState>,
    typing: Typing,
    /// Entries of other relays, all rooms together (bounded by `max_remote_entries`).
    remote_entries: usize,
    /// Joins of other relays not shown because of that bound.
    dropped_entries: u64,
}

#[derive(Default)]
struct RoomPresence {
    /// Everyone in the room, on every relay, in a stable order.
    entries: BTreeMap<ConnectionKey, Entry>,
    /// This relay's connections that are shown the room's presence.
    audience: HashMap<u64, Watcher>,
}

/// One connection in a room. `meta` is what the connection set, without the `conn_id` every
/// meta shows: that is derived from the key when the meta is rendered ([`rendered_meta`]), so a
/// connection that never set a meta costs no map at all (an empty `Map` does not allocate; a
/// one-key one is a whole B-tree node, about 600 bytes per membership).
#[derive(Clone, PartialEq)]
struct Entry {
    user: String,
    meta: Map<String, Value>,
}

/// The id that tells a connection's metas apart (`conn_id`).
fn conn_id(key: &ConnectionKey) -> String {
    format!("{}.{}", key.0, key.1)
}

/// A meta as clients and other relays see it: what the connection set, plus its `conn_id`.
fn rendered_meta(key: &ConnectionKey, entry: &Entry) -> Value {
    let mut meta = entry.meta.clone();
    // A meta from another relay may carry its own conn_id (see `stored_meta`): keep it.
    if !meta.contains_key("conn_id") {
        meta.insert("conn_id".into(), Value::String(conn_id(key)));
    }
    Value::Object(meta)
}

/// What to keep of a meta: everything but the `conn_id` [`rendered_meta`] adds back.
fn stored_meta(key: &ConnectionKey, meta: Value) -> Map<String, Value> {
    let mut meta = match meta {
        Value::Object(meta) => meta,
        _ => Map::new(),
    };
    if meta.get("conn_id").and_then(Value::as_str) == Some(conn_id(key).as_str()) {
        meta.remove("conn_id");
    }
    meta
}

struct Watcher {
    client: Arc<ClientHandle>,
    user: String,
}

/// What this relay knows about another one.
struct RelayState {
    heard: Instant,
    /// The sequence number its next message should carry.
    next_seq: u64,
    /// During a full-state transfer: its entries not confirmed yet (they go at the end).
    unconfirmed: Option<HashSet<(Room, u64)>>,
    /// When we last asked it for its full state.
    asked: Option<Instant>,
}

/// Joins and leaves collected per room, sent as one `presence_diff` each.
#[derive(Default)]
struct Diffs(BTreeMap<Room, Diff>);

/// Metas by user: those that arrived, those that went.
#[derive(Default)]
struct Diff {
    joins: Map<String, Value>,
    leaves: Map<String, Value>,
}

impl Diffs {
    fn join(&mut self, room: &Room, key: &ConnectionKey, entry: &Entry) {
        push(
            &mut self.0.entry(room.clone()).or_default().joins,
            key,
            entry,
        );
    }
    fn leave(&mut self, room: &Room, key: &ConnectionKey, entry: &Entry) {
        push(
            &mut self.0.entry(room.clone()).or_default().leaves,
            key,
            entry,
        );
    }
}

fn push(users: &mut Map<String, Value>, key: &ConnectionKey, entry: &Entry) {
    let metas = users
        .entry(entry.user.clone())
        .or_insert_with(|| Value::Array(Vec::new()));
    if let Value::Array(metas) = metas {
        metas.push(rendered_meta(key, entry));
    }
}

impl Presence {
    /// A presence view for this relay, and the stream of ops its bus publishes.
    pub fn new(timings: PresenceTimings) -> (Arc<Presence>, mpsc::UnboundedReceiver<Op>) {
        let (outgoing, ops) = mpsc::unbounded_channel();
        let presence = Presence {
            node: format!("{:016x}", rand::random::<u64>()).into(),
            timings,
            state: Mutex::default(),
            outgoing,
            sync_wanted: Notify::new(),
        };
        (Arc::new(presence), ops)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn timings(&self) -> &PresenceTimings {
        &self.timings
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish(&self, op: Op) {
        // The bus outlives every connection; if it is gone the relay is stopping.
        let _ = self.outgoing.send(op);
    }

    /// A connection joined `room` (called under the hub's lock, after its `joined`): it is shown
    /// the room's presence, and shown to everyone else in it. Joining again only resends the state.
    pub fn joined(&self, room: &Room, client: &Arc<ClientHandle>, user: &str) {
        if !client.sees_presence {
            return;
        }
        let mut state = self.lock();
        let presence = state.rooms.entry(room.clone()).or_default();
        presence.audience.insert(
            client.id,
            Watcher {
                client: client.clone(),
                user: user.to_owned(),
            },
        );
        let key = (self.node.clone(), client.id);
        let fresh = !presence.entries.contains_key(&key);
        if fresh {
            let entry = Entry {
                user: user.to_owned(),
                meta: Map::new(),
            };
            presence.entries.insert(key.clone(), entry.clone());
            let mut diffs = Diffs::default();
            diffs.join(room, &key, &entry);
            send_diffs(&state.rooms, diffs, Some(client.id));
            self.publish(Op::join(
                room,
                client.id,
                &entry.user,
                &rendered_meta(&key, &entry),
            ));
        }
        if let Some(presence) = state.rooms.get(room) {
            let limit = self
                .timings
                .max_state_bytes
                .min(client.max_queued_bytes() / 4);
            client.send(presence_state(room, presence, limit));
        }
        // Who is typing right now.
        let typing_now: Vec<String> = state.typing.typing_in(room).cloned().collect();
        for typist in typing_now.iter().filter(|u| u.as_str() != user) {
            client.send(typing_message(room, typist, true));
        }
    }

    /// A connection left `room`, for whatever reason (called under the hub's lock, before its
    /// `left`): it sees no more of the room, and the others see it go.
    pub fn left(&self, room: &Room, client_id: u64) {
        let mut state = self.lock();
        let Some(presence) = state.rooms.get_mut(room) else {
            return;
        };
        presence.audience.remove(&client_id);
        let key = (self.node.clone(), client_id);
        let removed = presence.entries.remove(&key);
        let mut diffs = Diffs::default();
        if let Some(entry) = &removed {
            diffs.leave(room, &key, entry);
            self.publish(Op::Leave {
                room: room.as_str().to_owned(),
                connection: client_id,
            });
        }
        finish(&mut state, diffs);
    }

    /// Replaces a connection's meta in a room it joined.
    pub fn set_meta(
        &self,
        room: &Room,
        client_id: u64,
        meta: Map<String, Value>,
    ) -> Result<(), PresenceError> {
        let size = serde_json::to_string(&meta).map_or(usize::MAX, |s| s.len());
        if size > MAX_META_BYTES {
            return Err(PresenceError::MetaTooLarge);
        }
        let mut state = self.lock();
        let key = (self.node.clone(), client_id);
        let entry = state
            .rooms
            .get_mut(room)
            .and_then(|p| p.entries.get_mut(&key))
            .ok_or(PresenceError::NotJoined)?;
        let mut meta = meta;
        // The relay sets conn_id; one the client sent is replaced.
        meta.remove("conn_id");
        let new = Entry {
            user: entry.user.clone(),
            meta,
        };
        let old = std::mem::replace(entry, new.clone());
        if old == new {
            return Ok(());
        }
        let mut diffs = Diffs::default();
        diffs.leave(room, &key, &old);
        diffs.join(room, &key, &new);
        send_diffs(&state.rooms, diffs, None);
        self.publish(Op::join(
            room,
            client_id,
            &new.user,
            &rendered_meta(&key, &new),
        ));
        Ok(())
    }

    /// A connection's user is typing (or stopped) in a room it joined. Too frequent changes are
    /// dropped (see [`typing`]); the rest reach the room's other users here and on every relay.
    pub fn typing(&self, room: &Room, client_id: u64, typing: bool) -> Result<(), PresenceError> {
        let mut state = self.lock();
        let user = state
            .rooms
            .get(room)
            .and_then(|p| p.entries.get(&(self.node.clone(), client_id)))
            .map(|entry| entry.user.clone())
            .ok_or(PresenceError::NotJoined)?;
        if !state.typing.allow(room, &user, typing, Instant::now()) {
            return Ok(());
        }
        self.apply_typing(&mut state, room, &user, typing);
        self.publish(Op::Typing {
            room: room.as_str().to_owned(),
            user,
            typing,
        });
        Ok(())
    }

    fn apply_typing(&self, state: &mut State, room: &Room, user: &str, typing: bool) {
        let deadline = Instant::now() + self.timings.typing_timeout;
        if state.typing.set(room, user, typing, deadline) {
            tell_typing(&state.rooms, room, user, typing);
        }
    }

    /// Everything this relay contributes to the view, for another relay that asked.
    pub fn local_entries(&self) -> Vec<Op> {
        let state = self.lock();
        let mut ops = Vec::new();
        for (room, presence) in &state.rooms {
            for (key, entry) in &presence.entries {
                if key.0 == self.node {
                    ops.push(Op::join(
                        room,
                        key.1,
                        &entry.user,
                        &rendered_meta(key, entry),
                    ));
                }
            }
        }
        ops
    }

    /// Applies a message from another relay's bus. Returns the relays whose full state we
    /// should ask for (we missed some of their messages).
    pub fn apply(&self, envelope: Envelope) -> Option<String> {
        if *envelope.node == *self.node {
            return None;
        }
        let now = Instant::now();
        let mut state = self.lock();
        // A relay publishes in order, from one connection: a number below the next one
        // expected is a message heard before, replayed by someone else. It changes nothing.
        if state
            .relays
            .get(&envelope.node)
            .is_some_and(|relay| envelope.seq < relay.next_seq)
        {
            return None;
        }
        let mut diffs = Diffs::default();
        if envelope.bye {
            forget_relay(&mut state, &envelope.node, &mut diffs);
            finish(&mut state, diffs);
            return None;
        }
        if envelope
            .want
            .as_deref()
            .is_some_and(|w| w == "*" || *w == *self.node)
        {
            self.sync_wanted.notify_one();
        }
        let known = state.relays.contains_key(&envelope.node);
        let relay = state
            .relays
            .entry(envelope.node.clone())
            .or_insert_with(|| RelayState {
                heard: now,
                next_seq: envelope.seq,
                unconfirmed: None,
                asked: None,
            });
        relay.heard = now;
        let in_order = relay.next_seq == envelope.seq;
        relay.next_seq = envelope.seq + 1;
        let mut ask = None;
        let sync = envelope.sync;
        if sync.is_some_and(bus::Sync::begins) {
            // A full state begins: everything the relay had is unconfirmed until it ends.
            let unconfirmed = state
                .rooms
                .iter()
                .flat_map(|(room, p)| {
                    p.entries
                        .keys()
                        .filter(|(node, _)| **node == *envelope.node)
                        .map(move |(_, c)| (room.clone(), *c))
                })
                .collect();
            if let Some(relay) = state.relays.get_mut(&envelope.node) {
                relay.unconfirmed = Some(unconfirmed);
            }
        } else if !in_order || !known {
            // A relay we never heard of, or one we missed messages from (perhaps part of a
            // transfer): we do not know all of its connections.
            if let Some(relay) = state.relays.get_mut(&envelope.node) {
                relay.unconfirmed = None;
            }
            ask = self.ask(&mut state, &envelope.node, now);
        }
        for op in envelope.ops {
            self.apply_op(&mut state, &envelope.node, op, &mut diffs);
        }
        if sync.is_some_and(bus::Sync::ends) {
            let unconfirmed = state
                .relays
                .get_mut(&envelope.node)
                .and_then(|r| r.unconfirmed.take())
                .unwrap_or_default();
            for (room, connection) in unconfirmed {
                remove_entry(
                    &mut state,
                    &room,
                    &(envelope.node.as_str().into(), connection),
                    &mut diffs,
                );
            }
        }
        finish(&mut state, diffs);
        ask
    }

    /// Whether to ask `node` for its full state now (not more than once a second).
    fn ask(&self, state: &mut State, node: &str, now: Instant) -> Option<String> {
        let relay = state.relays.get_mut(node)?;
        if relay
            .asked
            .is_some_and(|at| now.duration_since(at) < Duration::from_secs(1))
        {
            return None;
        }
        relay.asked = Some(now);
        Some(node.to_owned())
    }

    fn apply_op(&self, state: &mut State, node: &str, op: Op, diffs: &mut Diffs) {
        match op {
            Op::Join {
                room,
                connection,
                user,
                meta,
            } => {
                let Some(room) = Room::parse(&room) else {
                    return;
                };
                if let Some(unconfirmed) = state
                    .relays
                    .get_mut(node)
                    .and_then(|r| r.unconfirmed.as_mut())
                {
                    unconfirmed.remove(&(room.clone(), connection));
                }
                let key: ConnectionKey = (node.into(), connection);
                let entry = Entry {
                    user,
                    meta: stored_meta(&key, meta),
                };
                let known = state
                    .rooms
                    .get(&room)
                    .is_some_and(|p| p.entries.contains_key(&key));
                if !known {
                    if state.remote_entries >= self.timings.max_remote_entries {
                        state.dropped_entries += 1;
                        return;
                    }
                    state.remote_entries += 1;
                }
                let presence = state.rooms.entry(room.clone()).or_default();
                let previous = presence.entries.insert(key.clone(), entry.clone());
                if previous.as_ref() != Some(&entry) {
                    if let Some(previous) = &previous {
                        diffs.leave(&room, &key, previous);
                    }
                    diffs.join(&room, &key, &entry);
                }
            }
            Op::Leave { room, connection } => {
                if let Some(room) = Room::parse(&room) {
                    remove_entry(state, &room, &(node.into(), connection), diffs);
                }
            }
            Op::Typing { room, user, typing } => {
                if let Some(room) = Room::parse(&room) {
                    self.apply_typing(state, &room, &user, typing);
                }
            }
        }
    }

    /// Forgets relays not heard from within the timeout, and ends typing that was not refreshed.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut state = self.lock();
        let silent: Vec<String> = state
            .relays
            .iter()
            .filter(|(_, r)| now.duration_since(r.heard) > self.timings.relay_timeout)
            .map(|(node, _)| node.clone())
            .collect();
        let mut diffs = Diffs::default();
        for node in silent {
            tracing::info!(relay = %node, "relay silent; removing its connections from presence");
            forget_relay(&mut state, &node, &mut diffs);
        }
        for (room, user) in state.typing.expired(now) {
            tell_typing(&state.rooms, &room, &user, false);
        }
        finish(&mut state, diffs);
    }

    /// How many other relays the view knows, how many connections it holds (all relays), and
    /// how many joins of other relays it did not show (see `max_remote_entries`).
    pub fn size(&self) -> (usize, usize, u64) {
        let state = self.lock();
        let connections = state.rooms.values().map(|p| p.entries.len()).sum();
        (state.relays.len(), connections, state.dropped_entries)
    }
}

/// Removes an entry of another relay.
fn remove_entry(state: &mut State, room: &Room, key: &ConnectionKey, diffs: &mut Diffs) {
    if let Some(entry) = state
        .rooms
        .get_mut(room)
        .and_then(|p| p.entries.remove(key))
    {
        state.remote_entries -= 1;
        diffs.leave(room, key, &entry);
    }
}

fn forget_relay(state: &mut State, node: &str, diffs: &mut Diffs) {
    state.relays.remove(node);
    for (room, presence) in &mut state.rooms {
        let gone: Vec<ConnectionKey> = presence
            .entries
            .keys()
            .filter(|(n, _)| &**n == node)
            .cloned()
            .collect();
        for key in gone {
            if let Some(entry) = presence.entries.remove(&key) {
                state.remote_entries -= 1;
                diffs.leave(room, &key, &entry);
            }
        }
    }
}

/// Sends the collected diffs; a user whose last connection left a room stops typing there; empty
/// rooms are dropped.
fn finish(state: &mut State, diffs: Diffs) {
    let mut stopped = Vec::new();
    for (room, diff) in &diffs.0 {
        let Some(presence) = state.rooms.get(room) else {
            continue;
        };
        for user in diff.leaves.keys() {
            let still_here = presence.entries.values().any(|e| &e.user == user);
            if !still_here && state.typing.is_typing(room, user) {
                stopped.push((room.clone(), user.clone()));
            }
        }
    }
    send_diffs(&state.rooms, diffs, None);
    for (room, user) in stopped {
        state.typing.clear(&room, &user);
        tell_typing(&state.rooms, &room, &user, false);
    }
    state
        .rooms
        .retain(|_, p| !p.entries.is_empty() || !p.audience.is_empty());
}

/// A `presence_diff` lists at most about this many bytes of metas; a bigger change (a relay
/// with thousands of connections in a room went away) is sent as several diffs, its leaves
/// before its joins, so that no single diff closes a member as too slow.
const MAX_DIFF_BYTES: usize = 32 * 1024;

fn send_diffs(rooms: &HashMap<Room, RoomPresence>, diffs: Diffs, except: Option<u64>) {
    for (room, Diff { joins, leaves }) in diffs.0 {
        let Some(presence) = rooms.get(&room) else {
            continue;
        };
        if presence.audience.is_empty() {
            continue;
        }
        let empty = Map::new();
        let leaves = split_metas(leaves);
        let joins = split_metas(joins);
        // Usually one diff, leaves and joins together; a big one in parts, leaves first.
        let parts: Vec<(&Metas, &Metas)> =
            if let ([leaves], [joins]) = (leaves.as_slice(), joins.as_slice()) {
                vec![(joins, leaves)]
            } else {
                let leaving = leaves.iter().filter(|p| !p.is_empty());
                let joining = joins.iter().filter(|p| !p.is_empty());
                leaving
                    .map(|part| (&empty, part))
                    .chain(joining.map(|part| (part, &empty)))
                    .collect()
            };
        for (joins, leaves) in parts {
            let frame = ServerMessage::PresenceDiff {
                room: room.as_str(),
                joins,
                leaves,
            }
            .to_frame();
            for (id, watcher) in &presence.audience {
                if Some(*id) != except {
                    watcher.client.send(frame.clone());
                }
            }
        }
    }
}

/// Each user's metas, as in `presence_state` and `presence_diff`.
type Metas = Map<String, Value>;

/// Metas by user, in parts of at most about [`MAX_DIFF_BYTES`] (a user's metas stay together).
fn split_metas(users: Map<String, Value>) -> Vec<Map<String, Value>> {
    let mut parts = vec![Map::new()];
    let mut bytes = 0;
    for (user, metas) in users {
        let size = user.len() + serde_json::to_string(&metas).map_or(0, |m| m.len());
        if bytes > 0 && bytes + size > MAX_DIFF_BYTES {
            parts.push(Map::new());
            bytes = 0;
        }
        bytes += size;
        if let Some(part) = parts.last_mut() {
            part.insert(user, metas);
        }
    }
    parts
}

fn tell_typing(rooms: &HashMap<Room, RoomPresence>, room: &Room, user: &str, typing: bool) {
    let Some(presence) = rooms.get(room) else {
        return;
    };
    let frame = typing_message(room, user, typing);
    for watcher in presence.audience.values().filter(|w| w.user != user) {
        watcher.client.send(frame.clone());
    }
}

fn typing_message(room: &Room, user: &str, typing: bool) -> Frame {
    ServerMessage::Typing {
        room: room.as_str(),
        user,
        typing,
    }
    .to_frame()
}

/// The room's presence for a joiner, listing connections up to `limit` bytes of metas. Beyond
/// that it says `"truncated": true` and how many connections there are in all: the diffs that
/// follow still apply (a leave of someone not listed changes nothing).
fn presence_state(room: &Room, presence: &RoomPresence, limit: usize) -> Frame {
    let mut users = Map::new();
    let mut bytes = 0;
    let mut truncated = false;
    for (key, entry) in &presence.entries {
        let meta = rendered_meta(key, entry);
        // The meta, the user's name and the quotes and commas around them.
        bytes += serde_json::to_string(&meta).map_or(0, |m| m.len()) + entry.user.len() + 6;
        if bytes > limit {
            truncated = true;
            break;
        }
        if let Value::Array(metas) = users
            .entry(entry.user.clone())
            .or_insert_with(|| Value::Array(Vec::new()))
        {
            metas.push(meta);
        }
    }
    ServerMessage::PresenceState {
        room: room.as_str(),
        users: &users,
        connections: truncated.then_some(presence.entries.len()),
        truncated,
    }
    .to_frame()
}

/// Runs [`Presence::sweep`] ten times a second until `shutdown`, and updates the gauges.
pub async fn sweep(
    presence: Arc<Presence>,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut every = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = every.tick() => {
                presence.sweep();
                let (relays, connections, dropped) = presence.size();
                metrics.presence_relays.set(relays as u64);
                metrics.presence_connections.set(connections as u64);
                metrics.presence_entries_dropped.set(dropped);
            }
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::ClientQueue;
    use serde_json::json;

    fn frames(queue: &mut ClientQueue) -> Vec<Value> {
        std::iter::from_fn(|| queue.frames.try_recv())
            .map(|f| serde_json::from_str(f.as_str()).expect("json"))
            .collect()
    }

    fn from_relay(node: &str, seq: u64, ops: Vec<Op>) -> Envelope {
        Envelope {
            node: node.into(),
            seq,
            ops,
            sync: None,
            want: None,
            bye: false,
        }
    }

    fn remote_join(connection: u64) -> Op {
        Op::Join {
            room: "task:1".into(),
            connection,
            user: format!("u{connection}"),
            meta: json!({"status": "x".repeat(100)}),
        }
    }

    #[test]
    fn other_relays_entries_are_bounded_and_replayed_messages_change_nothing() {
        let (presence, _published) = Presence::new(PresenceTimings {
            max_remote_entries: 2,
            ..Default::default()
        });
        let ops = (1..=3).map(remote_join).collect();
        presence.apply(from_relay("other", 1, ops));
        assert_eq!(presence.size(), (1, 2, 1), "two shown, one dropped");
        // A leave makes room again.
        let leave = Op::Leave {
            room: "task:1".into(),
            connection: 1,
        };
        presence.apply(from_relay("other", 2, vec![leave]));
        presence.apply(from_relay("other", 3, vec![remote_join(3)]));
        assert_eq!(presence.size(), (1, 2, 1));
        // The relay's first message, heard again, does not bring connection 1 back.
        presence.apply(from_relay("other", 1, vec![remote_join(1)]));
        let bye = Envelope {
            bye: true,
            ..from_relay("other", 2, Vec::new())
        };
        presence.apply(bye);
        assert_eq!(presence.size(), (1, 2, 1), "nor does an old message end it");
    }

    #[test]
    fn a_relay_leaving_with_many_connections_is_told_in_bounded_diffs() {
        let (presence, _published) = Presence::new(Default::default());
        let room = Room::parse("task:1").expect("room");
        let (client, mut queue) = ClientHandle::websocket(1 << 20);
        let client = Arc::new(client);
        presence.joined(&room, &client, "u0");
        let ops = (1..=1000).map(remote_join).collect();
        presence.apply(from_relay("other", 1, ops));
        let _ = frames(&mut queue);
        presence.apply(Envelope {
            bye: true,
            ..from_relay("other", 2, Vec::new())
        });
        let diffs = frames(&mut queue);
        assert!(diffs.len() > 1, "in parts");
        let mut gone = 0;
        for diff in &diffs {
            assert!(diff.to_string().len() <= MAX_DIFF_BYTES + 1024);
            assert_eq!(diff["joins"], json!({}));
            gone += diff["leaves"].as_object().map_or(0, |l| l.len());
        }
        assert_eq!(gone, 1000, "every connection left");
    }

    #[test]
    fn a_large_rooms_presence_state_is_cut_to_the_joiners_budget() {
        let (presence, _published) = Presence::new(Default::default());
        let room = Room::parse("task:1").expect("room");
        let ops = (1..=100).map(remote_join).collect();
        presence.apply(from_relay("other", 1, ops));
        let (client, mut queue) = ClientHandle::websocket(16 * 1024);
        let client = Arc::new(client);
        presence.joined(&room, &client, "u1");
        let frame = queue.frames.try_recv().expect("presence_state");
        assert!(
            frame.as_str().len() <= 4 * 1024 + 200,
            "{} bytes",
            frame.as_str().len()
        );
        let state: Value = serde_json::from_str(frame.as_str()).expect("json");
        assert_eq!(state["truncated"], true);
        assert_eq!(state["connections"], 101);
        assert!(!client.is_closing());
    }

    /// Metas are kept without their conn_id (it costs a map per membership) and shown with it:
    /// clients and other relays see exactly what they saw before.
    #[test]
    fn metas_are_shown_with_their_conn_id_local_and_remote() {
        let (presence, mut published) = Presence::new(Default::default());
        let room = Room::parse("task:1").expect("room");
        let (client, mut queue) = ClientHandle::websocket(1 << 20);
        let client = Arc::new(client);
        presence.joined(&room, &client, "u1");
        let own = format!("{}.{}", presence.node(), client.id);
        let state = frames(&mut queue);
        assert_eq!(state[0]["users"], json!({"u1": [{"conn_id": own}]}));
        let Ok(Op::Join { meta, .. }) = published.try_recv() else {
            panic!("the join is published");
        };
        assert_eq!(
            meta,
            json!({"conn_id": own}),
            "other relays see the conn_id"
        );

        // A client cannot choose its conn_id.
        let mut meta = Map::new();
        meta.insert("status".into(), json!("editing"));
        meta.insert("conn_id".into(), json!("forged"));
        presence.set_meta(&room, client.id, meta).expect("joined");
        let diff = frames(&mut queue);
        assert_eq!(diff[0]["leaves"], json!({"u1": [{"conn_id": own}]}));
        assert_eq!(
            diff[0]["joins"],
            json!({"u1": [{"conn_id": own, "status": "editing"}]})
        );

        // Another relay's metas come with their conn_id, and leave with the same one.
        let join = |meta: Value| Op::Join {
            room: "task:1".into(),
            connection: 5,
            user: "u2".into(),
            meta,
        };
        presence.apply(from_relay(
            "other",
            1,
            vec![join(json!({"conn_id": "other.5"}))],
        ));
        assert_eq!(
            frames(&mut queue)[0]["joins"],
            json!({"u2": [{"conn_id": "other.5"}]})
        );
        // ... even one that is not built the way this relay builds them.
        presence.apply(from_relay(
            "other",
            2,
            vec![join(json!({"conn_id": "x", "a": 1}))],
        ));
        let diff = frames(&mut queue);
        assert_eq!(diff[0]["leaves"], json!({"u2": [{"conn_id": "other.5"}]}));
        assert_eq!(diff[0]["joins"], json!({"u2": [{"conn_id": "x", "a": 1}]}));
        // Re-announcing the same meta (a full-state transfer) changes nothing.
        presence.apply(from_relay(
            "other",
            3,
            vec![join(json!({"conn_id": "x", "a": 1}))],
        ));
        assert!(
            frames(&mut queue).is_empty(),
            "no diff for an unchanged meta"
        );
    }
}
