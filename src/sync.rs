//! `sync`: telling a client that its room's stream has reached a position.
//!
//! An API that writes can return `pgrelay.position()` from after its write; the client sends
//! `{"type":"sync","room":R,"position":P}` and the relay answers `synced` once every change
//! visible in P that the client may read in R has been queued to it, i.e. right after the frames
//! of the read batch whose end snapshot covers P (or at once, if the batches delivered so far
//! already cover it). Since `synced` travels in the same queue as the events, its arrival means
//! they have all arrived before it, including when the write itself was invisible to the user
//! (then nothing arrives, and `synced` says that nothing will).
//!
//! Nothing is sent periodically: a waiting request costs one entry until the next batch ends,
//! which is at most the reader's poll interval away (and the request wakes the reader).

use std::collections::HashMap;

use crate::capture::position::{Position, Snapshot};
use crate::protocol::{Frame, Room, ServerMessage};
use crate::queue::ClientHandle;
use crate::rooms::Member;
use crate::subscribe::Subscriptions;

/// Requests one connection may have waiting at once (each is answered within one batch).
const MAX_WAITING_PER_CLIENT: usize = 64;

/// A `sync` not answered yet: its reply goes out once the delivered snapshot covers `target`.
pub struct Waiting {
    client_id: u64,
    join_id: u64,
    room: Room,
    target: Snapshot,
    reply: Frame,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error("`position`: not a valid position")]
    BadPosition,
    #[error("not in this room")]
    NotJoined,
    #[error("too many sync requests waiting; wait for the answers")]
    TooMany,
}

/// Handles a client's `sync`: queues `synced` now, or when the batch that covers the position ends.
pub fn request(
    app: &Subscriptions,
    client: &ClientHandle,
    room: &Room,
    position: &str,
    reference: Option<&str>,
) -> Result<(), SyncError> {
    let target = match app.codec.open(position) {
        // Everything of a position inside a batch is visible in that batch's end.
        Ok(Position::At(snapshot)) | Ok(Position::Within { upto: snapshot, .. }) => snapshot,
        Err(_) => return Err(SyncError::BadPosition),
    };
    let reply = ServerMessage::Synced {
        room: room.as_str(),
        position,
        reference,
    }
    .to_frame();
    let waiting = app.hub.sync(room, client.id, target, reply)?;
    if waiting {
        // Do not leave it to the poll interval: the next read covers any position issued so far.
        app.wake.notify_one();
    }
    Ok(())
}

/// The members of each room, as the hub keeps them.
pub type Members = HashMap<Room, HashMap<u64, Member>>;

/// Under the hub lock ([`crate::rooms::Hub::sync`]): queues the reply at once if the delivered
/// batches cover `target`, else keeps it waiting; returns whether it waits.
pub fn answer_or_wait(
    rooms: &mut Members,
    delivered: Option<&Snapshot>,
    syncs: &mut Vec<Waiting>,
    (room, client_id): (&Room, u64),
    target: Snapshot,
    reply: Frame,
) -> Result<bool, SyncError> {
    let member = rooms
        .get_mut(room)
        .and_then(|members| members.get_mut(&client_id))
        .ok_or(SyncError::NotJoined)?;
    if delivered.is_some_and(|d| d.covers(&target)) {
        // Through the member: while it replays missed changes, the reply waits behind them.
        member.deliver(room.as_str(), reply);
        return Ok(false);
    }
    if syncs.iter().filter(|w| w.client_id == client_id).count() >= MAX_WAITING_PER_CLIENT {
        return Err(SyncError::TooMany);
    }
    syncs.push(Waiting {
        client_id,
        join_id: member.join_id,
        room: room.clone(),
        target,
        reply,
    });
    Ok(true)
}

/// Under the hub lock, when a batch ending at `upto` has been delivered: answers every request
/// it covers, after the batch's frames. Requests of members that left are dropped.
pub fn batch_delivered(rooms: &mut Members, syncs: &mut Vec<Waiting>, upto: &Snapshot) {
    if syncs.is_empty() {
        return;
    }
    syncs.retain(|waiting| {
        if !upto.covers(&waiting.target) {
            return true;
        }
        let member = rooms
            .get_mut(&waiting.room)
            .and_then(|members| members.get_mut(&waiting.client_id))
            .filter(|member| member.join_id == waiting.join_id);
        if let Some(member) = member {
            member.deliver(waiting.room.as_str(), waiting.reply.clone());
        }
        false
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::jwt::Principal;
    use crate::rooms::Hub;

    fn snapshot(text: &str) -> Snapshot {
        Snapshot::from_pg(text).expect("snapshot")
    }

    #[tokio::test]
    async fn synced_waits_for_the_batch_that_covers_the_position_and_follows_its_frames() {
        let hub = Hub::default();
        hub.start_at(snapshot("10:10:"));
        let room = Room::parse("project:1").expect("room");
        let (client, mut queue) = ClientHandle::new(1 << 20);
        let client = Arc::new(client);
        let principal = Arc::new(Principal {
            user: "u1".into(),
            claims: serde_json::json!({}),
            expires_at: u64::MAX,
        });
        hub.join(
            std::slice::from_ref(&room),
            &client,
            &principal,
            None,
            |_, _| "joined".into(),
        )
        .expect("join");
        assert_eq!(
            queue
                .frames
                .try_recv()
                .map(|f| f.as_str().to_owned())
                .as_deref(),
            Some("joined")
        );

        // Covered already: answered at once.
        assert_eq!(
            hub.sync(&room, client.id, snapshot("9:9:"), "old".into()),
            Ok(false)
        );
        assert_eq!(
            queue
                .frames
                .try_recv()
                .map(|f| f.as_str().to_owned())
                .as_deref(),
            Some("old")
        );

        // Transaction 12 is not visible yet: waits for a batch whose end covers it.
        assert_eq!(
            hub.sync(&room, client.id, snapshot("13:13:"), "new".into()),
            Ok(true)
        );
        hub.begin_batch(&snapshot("12:12:"));
        hub.end_batch(snapshot("12:12:"));
        assert!(
            queue.frames.try_recv().is_none(),
            "12:12: does not cover 13:13:"
        );
        hub.begin_batch(&snapshot("14:14:"));
        client.send("event".into());
        hub.end_batch(snapshot("14:14:"));
        assert_eq!(
            queue
                .frames
                .try_recv()
                .map(|f| f.as_str().to_owned())
                .as_deref(),
            Some("event")
        );
        assert_eq!(
            queue
                .frames
                .try_recv()
                .map(|f| f.as_str().to_owned())
                .as_deref(),
            Some("new"),
            "after the batch's frames"
        );

        let other = Room::parse("project:2").expect("room");
        assert_eq!(
            hub.sync(&other, client.id, snapshot("1:1:"), "x".into()),
            Err(SyncError::NotJoined)
        );
    }
}
