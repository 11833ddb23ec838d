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

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::capture::position::{Position, Snapshot};
use crate::jwt::Principal;
use crate::protocol::Room;
use crate::transport::client::ClientHandle;

/// A connection in a room.
pub struct Member {
    pub client: Arc<ClientHandle>,
    pub principal: Arc<Principal>,
    /// The first batch this member receives.
    pub first_batch: u64,
}

#[derive(Default)]
pub struct Hub {
    state: Mutex<State>,
}

#[derive(Default)]
pub struct State {
    pub rooms: HashMap<Room, HashMap<u64, Member>>,
    /// End of the last fully delivered batch; `None` until the reader has started.
    delivered: Option<Snapshot>,
    /// The batch being delivered now: its number and end.
    in_flight: Option<(u64, Snapshot)>,
    last_batch: u64,
}

/// The relay has not read its first position from the database yet.
#[derive(Debug, thiserror::Error)]
#[error("the relay is not connected to the database yet")]
pub struct NotReady;

impl Hub {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain maps behind; keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
        state.delivered = Some(upto);
    }

    /// Adds the client to the room and queues `reply(position)` to it, atomically with respect to
    /// deliveries. Joining a room twice keeps one membership and answers again.
    pub fn join(
        &self,
        room: &Room,
        client: &Arc<ClientHandle>,
        principal: &Arc<Principal>,
        reply: impl FnOnce(&Position) -> String,
    ) -> Result<(), NotReady> {
        let mut state = self.lock();
        let (position, first_batch) = match (&state.in_flight, &state.delivered) {
            (Some((n, upto)), _) => (Position::At(upto.clone()), n + 1),
            (None, Some(delivered)) => (Position::At(delivered.clone()), state.last_batch + 1),
            (None, None) => return Err(NotReady),
        };
        let members = state.rooms.entry(room.clone()).or_default();
        members.entry(client.id).or_insert_with(|| Member {
            client: client.clone(),
            principal: principal.clone(),
            first_batch,
        });
        client.send(reply(&position).into());
        Ok(())
    }

    /// Removes the client from the room, queuing `reply` under the lock; false if it was not there.
    pub fn leave(
        &self,
        room: &Room,
        client: &ClientHandle,
        reply: impl FnOnce() -> String,
    ) -> bool {
        let mut state = self.lock();
        let Some(members) = state.rooms.get_mut(room) else {
            return false;
        };
        if members.remove(&client.id).is_none() {
            return false;
        }
        if members.is_empty() {
            state.rooms.remove(room);
        }
        client.send(reply().into());
        true
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
            if let Some(members) = state.rooms.get_mut(room) {
                members.remove(&client_id);
                if members.is_empty() {
                    state.rooms.remove(room);
                }
            }
        }
    }
}
