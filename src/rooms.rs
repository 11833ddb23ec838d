//! Rooms: who is listening where, and the one lock that orders joins against deliveries.
//!
//! The reader delivers changes batch by batch (see [`crate::capture`]). A client that joins while a
//! batch is being authorized must not receive half of it: the `joined` reply carries a position,
//! and the promise is "every change after this position, nothing before". So the hub numbers the
//! batches, and a member records the first batch it takes part in:
//!
//! * joining while no batch is in flight: position = the last delivered snapshot, first batch = the
//!   next one;
//! * joining while batch *n* is in flight: position = the end of batch *n*, first batch = *n + 1*.
//!
//! The `joined` reply is queued under the same lock that deliveries take, so it always precedes the
//! member's first event, and `left` always follows its last.
//!
//! A member that resumes (`join` with `since`) first receives the changes it missed, replayed by
//! [`crate::resume`], then the live ones. While the replay runs, live frames for it wait in its
//! `pending` buffer; [`Hub::finish_replay`] appends them to the client's queue under the lock, so
//! the switch-over has no gap and no overlap. A resume only joins once this relay's position
//! covers the client's (a position can come from a relay that is ahead of this one), so every live
//! change is one the client has not seen.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use rustc_hash::FxHashMap;

use crate::capture::outbox::Change;
use crate::capture::position::{Position, Snapshot};
use crate::jwt::Principal;
use crate::presence::Presence;
use crate::protocol::{Frame, Room};
use crate::queue::{Charge, ClientHandle};

/// A connection in a room.
pub struct Member {
    pub client: Arc<ClientHandle>,
    pub principal: Arc<Principal>,
    /// The first batch this member receives.
    first_batch: u64,
    /// Identifies this membership: a replay or a revocation started for an earlier membership of
    /// the same client in the same room must not touch this one.
    pub join_id: u64,
    /// While its missed changes are being replayed, live frames wait here: one buffer for all
    /// the rooms of the join, so they are released in the order they were delivered, which is
    /// commit order across rooms (an SSE stream has one position for all its rooms).
    pending: Option<Arc<Mutex<Pending>>>,
}

#[derive(Default)]
struct Pending {
    frames: Vec<(String, Frame)>,
    /// What they count against the client's budget, as if they were queued.
    held: Charge,
}

impl Member {
    /// Whether the member receives batch `number`: a member that joined while an earlier batch
    /// was in flight has a position past it (see the module comment).
    fn takes_part_in(&self, number: u64) -> bool {
        self.first_batch <= number
    }

    /// Whether its missed changes are still being replayed (live frames then wait in it).
    pub fn is_replaying(&self) -> bool {
        self.pending.is_some()
    }

    /// Queues a live frame, or holds it back while a replay is running. False if it was dropped
    /// (the client is too slow and is being closed). `sync` replies go this way too.
    pub(crate) fn deliver(&mut self, room: &str, frame: Frame) -> bool {
        match &self.pending {
            None => self.client.send(frame),
            Some(pending) => {
                let mut pending = pending.lock().unwrap_or_else(|p| p.into_inner());
                let len = frame.len();
                if !self.client.fits(pending.held, len) {
                    self.client.close_too_slow();
                    return false;
                }
                pending.held.add(len, self.client.max_queued_bytes());
                pending.frames.push((room.to_owned(), frame));
                true
            }
        }
    }
}

pub struct Hub {
    state: Mutex<State>,
    /// Told of every membership change, under this hub's lock (see [`crate::presence`]).
    presence: Arc<Presence>,
}

impl Default for Hub {
    /// A hub whose presence is seen on this relay only.
    fn default() -> Hub {
        Hub::new(Presence::new(Default::default()).0)
    }
}

#[derive(Default)]
struct State {
    rooms: HashMap<Room, HashMap<u64, Member>>,
    /// End of the last fully delivered batch; `None` until the reader has started.
    delivered: Option<Snapshot>,
    /// The batch being delivered now: its number and end.
    in_flight: Option<(u64, Snapshot)>,
    last_batch: u64,
    last_join: u64,
    /// `sync` requests waiting for a batch to cover their position.
    syncs: Vec<crate::sync::Waiting>,
}

/// One client's membership of one room, as the access re-checks see it ([`crate::recheck`]).
#[derive(Clone)]
pub struct Membership {
    pub room: Room,
    pub client: u64,
    /// Which membership: a revocation must not end a later one of the same client and room.
    pub join_id: u64,
    pub principal: Arc<Principal>,
}

/// Why a join could not be registered (yet).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("the relay is not connected to the database yet")]
    Starting,
    /// The client's position is ahead of what this relay has delivered; retry shortly.
    #[error("the relay has not caught up with this position yet")]
    Behind,
}

impl Hub {
    pub fn new(presence: Arc<Presence>) -> Hub {
        Hub {
            state: Mutex::default(),
            presence,
        }
    }

    pub fn presence(&self) -> &Arc<Presence> {
        &self.presence
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain maps behind; keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The end of the last fully delivered batch.
    pub fn delivered(&self) -> Option<Snapshot> {
        self.lock().delivered.clone()
    }

    /// The reader's starting point.
    pub fn start_at(&self, snapshot: Snapshot) {
        self.lock().delivered = Some(snapshot);
    }

    /// Announces the batch that ends at `upto` and returns its number. Retrying the same batch
    /// after an error keeps its number, so members that joined meanwhile still skip it.
    pub fn begin_batch(&self, upto: &Snapshot) -> u64 {
        let mut state = self.lock();
        if let Some((n, end)) = &state.in_flight {
            if end == upto {
                return *n;
            }
        }
        state.last_batch += 1;
        let n = state.last_batch;
        state.in_flight = Some((n, upto.clone()));
        n
    }

    pub fn end_batch(&self, upto: Snapshot) {
        let mut state = self.lock();
        state.in_flight = None;
        let State { rooms, syncs, .. } = &mut *state;
        crate::sync::batch_delivered(rooms, syncs, &upto);
        state.delivered = Some(upto);
    }

    /// Calls `visit(change index, member)` for every member of every room of each change that
    /// takes part in batch `number`, in order, under the lock (a member in two of a change's
    /// rooms is visited twice).
    pub fn candidates(
        &self,
        number: u64,
        changes: &[Change],
        mut visit: impl FnMut(usize, &Member),
    ) {
        let state = self.lock();
        for (change_ix, change) in changes.iter().enumerate() {
            for room in &change.rooms {
                let Some(members) = state.rooms.get(room.as_str()) else {
                    continue;
                };
                for member in members.values().filter(|m| m.takes_part_in(number)) {
                    visit(change_ix, member);
                }
            }
        }
    }

    /// Queues to every member of each change's rooms that takes part in batch `number` the frame
    /// `frame_for(scratch, change index, room, member)` picks for it (none: it gets nothing),
    /// in commit order, and returns how many frames were queued. `scratch` starts afresh for
    /// each room of each change, so a frame can be built once per room and shared.
    ///
    /// Each client's frames of these changes are queued back to back at the end, still under the
    /// lock, so a `left` or a new `joined` cannot slip between them and its writer wakes once and
    /// writes them with one flush: the busier the relay, the bigger the chunks, and the fewer
    /// system calls each delivery costs. A client that takes fewer is too slow: it is being
    /// closed, and resumes from its last event.
    pub fn deliver<S: Default>(
        &self,
        number: u64,
        changes: &[Change],
        mut frame_for: impl FnMut(&mut S, usize, &str, &Member) -> anyhow::Result<Option<Frame>>,
    ) -> anyhow::Result<u64> {
        let mut delivered = 0u64;
        let mut outgoing: FxHashMap<u64, (Arc<ClientHandle>, Vec<Frame>)> = FxHashMap::default();
        let mut state = self.lock();
        for (change_ix, change) in changes.iter().enumerate() {
            for room in &change.rooms {
                let Some(members) = state.rooms.get_mut(room.as_str()) else {
                    continue;
                };
                let mut scratch = S::default();
                for member in members.values_mut().filter(|m| m.takes_part_in(number)) {
                    let Some(frame) = frame_for(&mut scratch, change_ix, room, member)? else {
                        continue;
                    };
                    if member.is_replaying() {
                        delivered += u64::from(member.deliver(room, frame));
                    } else {
                        outgoing
                            .entry(member.client.id)
                            .or_insert_with(|| (member.client.clone(), Vec::new()))
                            .1
                            .push(frame);
                    }
                }
            }
        }
        for (client, frames) in outgoing.into_values() {
            delivered += client.send_all(frames) as u64;
        }
        Ok(delivered)
    }

    /// A `sync` request: `reply` is queued to the member once the delivered batches cover
    /// `target` (see [`crate::sync`]); returns whether it waits.
    pub fn sync(
        &self,
        room: &Room,
        client_id: u64,
        target: Snapshot,
        reply: Frame,
    ) -> Result<bool, crate::sync::SyncError> {
        let mut state = self.lock();
        let State {
            rooms,
            delivered,
            syncs,
            ..
        } = &mut *state;
        crate::sync::answer_or_wait(
            rooms,
            delivered.as_ref(),
            syncs,
            (room, client_id),
            target,
            reply,
        )
    }

    /// Adds the client to the rooms and queues `reply(room, position)` for each, atomically with
    /// respect to deliveries, and returns the position: the member receives every change after
    /// it, in all the rooms. With `resume_from`, the member starts in replay mode (see
    /// [`Hub::finish_replay`]), and only if the position covers that snapshot. Joining a room
    /// again replaces the membership.
    pub fn join(
        &self,
        rooms: &[Room],
        client: &Arc<ClientHandle>,
        principal: &Arc<Principal>,
        resume_from: Option<&Snapshot>,
        reply: impl Fn(&Room, &Position) -> Frame,
    ) -> Result<(Snapshot, u64), NotReady> {
        let mut state = self.lock();
        let (position, first_batch) = match (&state.in_flight, &state.delivered) {
            (Some((n, upto)), _) => (upto.clone(), n + 1),
            (None, Some(delivered)) => (delivered.clone(), state.last_batch + 1),
            (None, None) => return Err(NotReady::Starting),
        };
        if resume_from.is_some_and(|from| !position.covers(from)) {
            return Err(NotReady::Behind);
        }
        let at = Position::At(position.clone());
        state.last_join += 1;
        let join_id = state.last_join;
        let pending = resume_from.map(|_| Arc::new(Mutex::new(Pending::default())));
        for room in rooms {
            let member = Member {
                client: client.clone(),
                principal: principal.clone(),
                first_batch,
                join_id,
                pending: pending.clone(),
            };
            state
                .rooms
                .entry(room.clone())
                .or_default()
                .insert(client.id, member);
            client.send(reply(room, &at));
            self.presence.joined(room, client, &principal.user);
        }
        Ok((position, join_id))
    }

    /// Queues a replayed frame to a member that is still replaying; false if it left meanwhile.
    pub fn replay_send(&self, room: &str, client_id: u64, join_id: u64, frame: Frame) -> bool {
        let state = self.lock();
        match state.rooms.get(room).and_then(|m| m.get(&client_id)) {
            Some(member) if member.join_id == join_id && member.is_replaying() => {
                member.client.send(frame)
            }
            _ => false,
        }
    }

    /// Queues replayed frames, in order, to a join that is still replaying, under one hold of
    /// the lock; false (and nothing queued) if the client left one of their rooms meanwhile, or
    /// fewer were queued than given (it is too slow and being closed).
    pub fn replay_send_all(
        &self,
        client: &ClientHandle,
        join_id: u64,
        frames: Vec<(Room, Frame)>,
    ) -> bool {
        let state = self.lock();
        let still = |room: &Room| {
            state
                .rooms
                .get(room)
                .and_then(|m| m.get(&client.id))
                .is_some_and(|m| m.join_id == join_id && m.is_replaying())
        };
        if !frames.iter().all(|(room, _)| still(room)) {
            return false;
        }
        let count = frames.len();
        client.send_all(frames.into_iter().map(|(_, frame)| frame)) == count
    }

    /// Ends a join's replay: the live frames that waited are queued after the replayed ones, in
    /// the order they were delivered (one buffer for all the join's rooms), paced like the
    /// replay. Frames that arrive meanwhile keep waiting behind them, so the members leave replay
    /// mode only once nothing is held back. A frame for a room the client has left is dropped.
    pub async fn finish_replay(&self, rooms: &[Room], client: &ClientHandle, join_id: u64) {
        loop {
            let frames = {
                let mut state = self.lock();
                let Some(pending) = rooms.iter().find_map(|room| {
                    let member = state.rooms.get(room)?.get(&client.id)?;
                    (member.join_id == join_id).then(|| member.pending.clone())?
                }) else {
                    return;
                };
                let mut pending = pending.lock().unwrap_or_else(|p| p.into_inner());
                if pending.frames.is_empty() {
                    for room in rooms {
                        let member = state
                            .rooms
                            .get_mut(room)
                            .and_then(|m| m.get_mut(&client.id))
                            .filter(|m| m.join_id == join_id);
                        if let Some(member) = member {
                            member.pending = None;
                        }
                    }
                    return;
                }
                pending.held = Charge::default();
                std::mem::take(&mut pending.frames)
            };
            for (room, frame) in frames {
                client.wait_for_room(frame.len()).await;
                if client.is_closing() {
                    return;
                }
                self.replay_send(&room, client.id, join_id, frame);
            }
        }
    }

    /// Removes the client's membership in the room if `which` picks it, dropping the room once
    /// empty and telling presence; the one way a member leaves.
    fn remove_member(
        &self,
        state: &mut State,
        room: &Room,
        client_id: u64,
        which: impl FnOnce(&Member) -> bool,
    ) -> Option<Member> {
        let members = state.rooms.get_mut(room)?;
        if !members.get(&client_id).is_some_and(which) {
            return None;
        }
        let member = members.remove(&client_id);
        if members.is_empty() {
            state.rooms.remove(room);
        }
        self.presence.left(room, client_id);
        member
    }

    /// Removes the client from the room, queuing `reply` under the lock; false if it was not there.
    pub fn leave(&self, room: &Room, client: &ClientHandle, reply: impl FnOnce() -> Frame) -> bool {
        let mut state = self.lock();
        if self
            .remove_member(&mut state, room, client.id, |_| true)
            .is_none()
        {
            return false;
        }
        client.send(reply());
        true
    }

    /// Removes a member who lost access and tells it (`left`, reason `revoked`); false if it was
    /// not in the room.
    pub fn revoke(&self, room: &Room, client_id: u64, join_id: u64) -> bool {
        self.end_membership(room, client_id, join_id, "revoked")
    }

    /// Removes one particular membership (`join_id`), telling the client why (`left`).
    pub fn end_membership(&self, room: &Room, client_id: u64, join_id: u64, reason: &str) -> bool {
        let mut state = self.lock();
        let Some(member) =
            self.remove_member(&mut state, room, client_id, |m| m.join_id == join_id)
        else {
            return false;
        };
        let left = crate::protocol::ServerMessage::Left {
            room: room.as_str(),
            reason,
            reference: None,
        };
        member.client.send(left.to_frame());
        true
    }

    /// Which of `rooms` the client is still a member of (it may have been revoked from some).
    pub fn still_in(&self, client_id: u64, rooms: &[Room]) -> Vec<Room> {
        let state = self.lock();
        rooms
            .iter()
            .filter(|room| {
                state
                    .rooms
                    .get(*room)
                    .is_some_and(|m| m.contains_key(&client_id))
            })
            .cloned()
            .collect()
    }

    /// The memberships of the rooms `wanted` names (all of them: live, replaying, and those that
    /// joined while a batch was in flight).
    pub fn memberships(&self, wanted: impl Fn(&Room) -> bool) -> Vec<Membership> {
        let state = self.lock();
        state
            .rooms
            .iter()
            .filter(|(room, _)| wanted(room))
            .flat_map(|(room, members)| {
                members.values().map(move |m| Membership {
                    room: room.clone(),
                    client: m.client.id,
                    join_id: m.join_id,
                    principal: m.principal.clone(),
                })
            })
            .collect()
    }

    /// One client's memberships.
    pub fn memberships_of(&self, client_id: u64) -> Vec<Membership> {
        let state = self.lock();
        state
            .rooms
            .iter()
            .filter_map(|(room, members)| {
                let m = members.get(&client_id)?;
                Some(Membership {
                    room: room.clone(),
                    client: client_id,
                    join_id: m.join_id,
                    principal: m.principal.clone(),
                })
            })
            .collect()
    }

    /// Asks every connected member to close (they resume with their positions).
    pub fn close_all(&self, request: crate::queue::CloseRequest) {
        let state = self.lock();
        for member in state.rooms.values().flat_map(|m| m.values()) {
            member.client.close(request);
        }
    }

    /// A refreshed token: later authorization uses its claims.
    pub fn update_principal(&self, client_id: u64, rooms: &[Room], principal: &Arc<Principal>) {
        let mut state = self.lock();
        for room in rooms {
            if let Some(member) = state
                .rooms
                .get_mut(room)
                .and_then(|m| m.get_mut(&client_id))
            {
                member.principal = principal.clone();
            }
        }
    }

    /// Forgets a closed connection.
    pub fn disconnect(&self, client_id: u64, rooms: &[Room]) {
        let mut state = self.lock();
        for room in rooms {
            if self
                .remove_member(&mut state, room, client_id, |_| true)
                .is_none()
            {
                // Presence is told all the same: it ignores a connection it does not list.
                self.presence.left(room, client_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member that resumes while live changes keep coming, with events bigger than its whole
    /// queue: the held-back frames are released at the pace the client reads, never all at once.
    #[tokio::test]
    async fn live_frames_held_during_a_replay_are_released_at_the_readers_pace() {
        let hub = Hub::default();
        hub.start_at(Snapshot::from_pg("10:10:").expect("snapshot"));
        let room = Room::parse("task:1").expect("room");
        let (client, mut queue) = ClientHandle::new(4000);
        let client = Arc::new(client);
        let principal = Arc::new(Principal {
            user: "u1".into(),
            claims: serde_json::json!({}),
            expires_at: u64::MAX,
        });
        let from = Snapshot::from_pg("5:5:").expect("snapshot");
        let (_, join_id) = hub
            .join(
                std::slice::from_ref(&room),
                &client,
                &principal,
                Some(&from),
                |_, _| Frame::from("joined"),
            )
            .expect("join");
        let big = |n: usize| Frame::from(format!("{n}{}", "x".repeat(1500)).as_str());
        assert!(
            hub.replay_send(room.as_str(), client.id, join_id, big(0)),
            "replayed"
        );
        for n in 1..3 {
            let mut state = hub.lock();
            let member = state
                .rooms
                .get_mut(&room)
                .and_then(|m| m.get_mut(&client.id));
            assert!(
                member.expect("member").deliver(room.as_str(), big(n)),
                "held back, not dropped"
            );
        }
        let reading = client.clone();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < 4 {
                let frame = queue.frames.recv().await.expect("a frame");
                got.push(frame.as_str()[..1].to_owned());
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                reading.sent(&frame);
            }
            got
        });
        hub.finish_replay(std::slice::from_ref(&room), &client, join_id)
            .await;
        assert!(!client.is_closing(), "a client that reads is never closed");
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), reader)
            .await
            .expect("the reader got every frame")
            .expect("reader");
        assert_eq!(
            got,
            ["j", "0", "1", "2"],
            "joined, then the held frames in order"
        );
    }
}
