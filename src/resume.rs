//! Resume: giving a returning client exactly the changes it missed, then the live ones.
//!
//! A client comes back with a position `P` (the `id` of the last event it received, or
//! `pgrelay.position()` from the transaction that read its data). Three steps:
//!
//! 1. **Resolve** `P`: is everything the client has not seen still in the outbox (retention), and
//!    is `P` one pgrelay could have issued? If not resumable, the client is told to refetch
//!    (`recovered: false`); if not valid, `bad_request`.
//! 2. **Join** at this relay's position `J`, which must cover `P` (a position from a relay that is
//!    ahead makes the join wait a moment). Live changes after `J` are held back for the member.
//! 3. **Replay** what lies between: the rest of `P`'s own batch, then the batch `P → J`, for the
//!    client's rooms, authorized as the user is *now*, in commit order. Then the held-back live
//!    changes follow ([`crate::rooms::Hub::finish_replay`]).
//!
//! Replayed events carry positions in the same batch sequence the client was following, so a
//! client that drops again during the replay resumes from any of them without loss or repeats.

use std::sync::Arc;

use anyhow::Context;
use deadpool_postgres::Pool;

use crate::authorize::Authorizer;
use crate::capture::outbox::{self, Batch};
use crate::capture::position::{Position, PositionCodec, Seen, Snapshot};
use crate::fanout::{event_frame, Visibility};
use crate::jwt::Principal;
use crate::protocol::Room;
use crate::queue::ClientHandle;
use crate::rooms::Hub;

/// What a position means here and now.
#[derive(Debug)]
pub enum Resolution {
    /// Everything the client missed can be replayed.
    Resumable(Seen),
    /// Too old (removed by retention) or from elsewhere: the client must refetch.
    Lost,
}

/// A position that resolves to nothing pgrelay could have issued.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("not a valid position")]
    Invalid,
    #[error(transparent)]
    Database(#[from] anyhow::Error),
}

/// Checks a client's position against the outbox.
pub async fn resolve(pool: &Pool, position: &Position) -> Result<Resolution, ResolveError> {
    let db = pool.get().await.context("no database connection")?;
    let (since, upto) = match position {
        Position::At(snapshot) => (snapshot, snapshot),
        Position::Within { since, upto, .. } => (since, upto),
    };
    let row = db
        .query_one(
            "SELECT pgrelay.resumable($1::text::pg_snapshot) AND pgrelay.resumable($2::text::pg_snapshot)",
            &[&since.to_pg(), &upto.to_pg()],
        )
        .await
        .context("checking the position")?;
    if !row.try_get::<_, bool>(0).context("checking the position")? {
        return Ok(Resolution::Lost);
    }
    let Position::Within { change_id, .. } = position else {
        return Ok(Resolution::Resumable(Seen {
            since: since.clone(),
            within: None,
        }));
    };
    // The named change must exist and belong to the batch; its transaction gives the order key.
    let row = db
        .query_opt(
            "SELECT c.xid::text, (SELECT max(d.id) FROM pgrelay.changes d WHERE d.xid = c.xid)
             FROM pgrelay.changes c WHERE c.id = $1",
            &[change_id],
        )
        .await
        .context("looking up the position's change")?
        .ok_or(ResolveError::Invalid)?;
    let xid: u64 = row
        .try_get::<_, &str>(0)
        .ok()
        .and_then(|x| x.parse().ok())
        .ok_or(ResolveError::Invalid)?;
    let txn_last: i64 = row.try_get(1).map_err(|_| ResolveError::Invalid)?;
    if since.is_visible(xid) || !upto.is_visible(xid) {
        return Err(ResolveError::Invalid);
    }
    Ok(Resolution::Resumable(Seen {
        since: since.clone(),
        within: Some((upto.clone(), (txn_last, *change_id))),
    }))
}

/// Replays the changes a resuming client missed in `rooms`, up to the position it joined at.
pub struct Replay {
    pub pool: Pool,
    pub authorizer: Authorizer,
    pub hub: Arc<Hub>,
    pub client: Arc<ClientHandle>,
    pub principal: Arc<Principal>,
    pub rooms: Vec<Room>,
    pub seen: Seen,
    /// The position the client joined at: live delivery starts after it.
    pub until: Snapshot,
    /// The membership this replay serves (see `Hub::join`).
    pub join_id: u64,
    pub codec: PositionCodec,
}

impl Replay {
    /// Runs the replay, then releases the live changes held back meanwhile. On failure the
    /// caller removes the client from the rooms (it resumes again with its last id).
    pub async fn run(&self) -> anyhow::Result<()> {
        // The rest of the client's batch, then everything up to the join position.
        if let Some((upto, _)) = &self.seen.within {
            self.replay_batch(&self.seen.since, upto).await?;
            self.replay_batch(upto, &self.until).await?;
        } else {
            self.replay_batch(&self.seen.since, &self.until).await?;
        }
        for room in &self.rooms {
            self.hub
                .finish_replay(room, &self.client, self.join_id)
                .await;
        }
        Ok(())
    }

    async fn replay_batch(&self, since: &Snapshot, upto: &Snapshot) -> anyhow::Result<()> {
        if since == upto {
            return Ok(());
        }
        let db = self.pool.get().await.context("no database connection")?;
        let names: Vec<&str> = self.rooms.iter().map(Room::as_str).collect();
        let statement = db.prepare_cached(outbox::READ_BATCH).await?;
        let mut batch = Batch::read(&db, &statement, since, Some(upto), Some(&names)).await?;
        // Retention may have moved since the position was checked.
        anyhow::ensure!(
            !batch.incomplete(),
            "the position fell out of retention during the replay"
        );
        while let Some(chunk) = batch
            .next_kept(500, |c| !self.seen.contains(c.xid, (c.txn_last, c.id)))
            .await?
        {
            let pairs: Vec<(u32, u32)> = (0..chunk.len() as u32).map(|i| (i, 0)).collect();
            let verdicts = self
                .authorizer
                .readers(&chunk, std::slice::from_ref(&self.principal), &pairs)
                .await?;
            let mut visible: Vec<Option<Visibility>> = vec![None; chunk.len()];
            for verdict in &verdicts.verdicts {
                visible[verdict.change as usize] = Visibility::of(verdict);
            }
            for (change, visibility) in chunk.iter().zip(visible) {
                let Some(visibility) = visibility else {
                    continue;
                };
                let id = self.codec.seal(&Position::Within {
                    since: since.clone(),
                    upto: upto.clone(),
                    change_id: change.id,
                });
                for room in self
                    .rooms
                    .iter()
                    .filter(|r| change.rooms.iter().any(|c| c == r.as_str()))
                {
                    let frame = event_frame(room.as_str(), &id, change, visibility)?;
                    // Pace the replay to what the client actually reads.
                    self.client.wait_for_room(frame.as_str().len()).await;
                    // A client that went away, or left the room, ends the replay.
                    if self.client.is_closing()
                        || !self
                            .hub
                            .replay_send(room, self.client.id, self.join_id, frame)
                    {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }
}
