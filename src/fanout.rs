//! Fan-out: from a chunk of changes to the frames each member of each room receives.
//!
//! Three steps, and the lock is held only for the two quick ones:
//!
//! 1. **Candidates** (under the hub lock): the users listening in the rooms of each change.
//! 2. **Authorize** (no lock, one query): which of them may read each change.
//! 3. **Deliver** (under the hub lock): queue the frames, in commit order. Each frame is
//!    serialized once per room and shared by all its recipients.
//!
//! What a user receives depends on what they may read of an UPDATE (see [`Visibility`]): a row
//! that enters their view arrives as `*_created`, one that leaves it as `*_deleted` with the last
//! values they were allowed to see. A user who may read neither version gets nothing, not even an
//! id.

use std::collections::HashMap;

use rustc_hash::FxHashMap;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::authorize::{AccessCheck, Authorizer, Verdict};
use crate::capture::outbox::{Change, Op};
use crate::capture::position::{Position, PositionCodec, Snapshot};
use crate::jwt::Principal;
use crate::metrics::Metrics;
use crate::rooms::Hub;
use crate::transport::client::ClientHandle;

/// How a change looks to one reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    /// The change as it happened (with `old` on UPDATE).
    AsIs,
    /// The row entered the reader's view: sent as a creation, without old values.
    Appeared,
    /// The row left the reader's view: sent as a deletion of the version they could read.
    Vanished,
}

impl Visibility {
    pub fn of(verdict: &Verdict) -> Option<Visibility> {
        match (verdict.sees_new, verdict.sees_old) {
            (true, false) if verdict.knows_old => Some(Visibility::Appeared),
            (true, _) => Some(Visibility::AsIs),
            (false, true) => Some(Visibility::Vanished),
            (false, false) => None,
        }
    }
}

/// The identity of a batch that deliveries are part of.
pub struct BatchRef<'a> {
    pub number: u64,
    pub since: &'a Snapshot,
    pub upto: &'a Snapshot,
    pub codec: &'a PositionCodec,
}

/// Authorizes and queues one chunk of changes (in commit order) to the members of their rooms.
pub async fn deliver(
    hub: &Hub,
    authorizer: &Authorizer,
    metrics: &Metrics,
    batch: &BatchRef<'_>,
    changes: &[Change],
) -> anyhow::Result<()> {
    // 1. Candidates.
    let mut principals: Vec<Arc<Principal>> = Vec::new();
    let mut principal_of_client: FxHashMap<u64, u32> = FxHashMap::default();
    let mut pairs: Vec<(u32, u32)> = Vec::new();
    {
        let state = hub.lock();
        for (change_ix, change) in changes.iter().enumerate() {
            let mut seen: Vec<u32> = Vec::new();
            for room in &change.rooms {
                let Some(members) = state.rooms.get(room.as_str()) else {
                    continue;
                };
                for member in members.values().filter(|m| m.first_batch <= batch.number) {
                    let ix = *principal_of_client
                        .entry(member.client.id)
                        .or_insert_with(|| {
                            principals.push(member.principal.clone());
                            (principals.len() - 1) as u32
                        });
                    if !seen.contains(&ix) {
                        seen.push(ix);
                        pairs.push((change_ix as u32, ix));
                    }
                }
            }
        }
    }

    // 2. Authorize.
    let verdicts = authorizer.readers(changes, &principals, &pairs).await?;
    let visible: FxHashMap<(u32, u32), Visibility> = verdicts
        .verdicts
        .iter()
        .filter_map(|v| Visibility::of(v).map(|vis| ((v.change, v.principal), vis)))
        .collect();
    metrics
        .deliveries_denied
        .add((pairs.len() - visible.len()) as u64);

    // 3. Deliver.
    let mut recheck: HashMap<(String, u64, u64), Arc<Principal>> = HashMap::new();
    let mut delivered = 0u64;
    // Each client's frames of this chunk, in commit order. They are queued back to back at the
    // end, so its writer wakes once and writes them with one flush: the busier the relay, the
    // bigger the chunks, and the fewer system calls each delivery costs.
    let mut outgoing: FxHashMap<u64, (Arc<ClientHandle>, Vec<Utf8Bytes>)> = FxHashMap::default();
    {
        let mut state = hub.lock();
        for (change_ix, change) in changes.iter().enumerate() {
            let id = batch.codec.seal(&Position::Within {
                since: batch.since.clone(),
                upto: batch.upto.clone(),
                change_id: change.id,
            });
            for room in &change.rooms {
                let Some(members) = state.rooms.get_mut(room.as_str()) else {
                    continue;
                };
                let mut frames: [Option<Utf8Bytes>; 3] = Default::default();
                for member in members
                    .values_mut()
                    .filter(|m| m.first_batch <= batch.number)
                {
                    let Some(&principal) = principal_of_client.get(&member.client.id) else {
                        continue; // joined after step 1 began: its position starts after this batch
                    };
                    let pair = (change_ix as u32, principal);
                    let Some(&visibility) = visible.get(&pair) else {
                        // Denied: maybe this member has lost access to the room itself. Not
                        // when the answer came from memory for an UPDATE that left what the
                        // policy reads alone: then neither the row nor anything the policy
                        // reads elsewhere changed since that answer (such changes make answers
                        // forgotten), and the first such denial was looked into. Without this,
                        // a private task denied to most of a project's room cost a join check
                        // per member per change.
                        if verdicts.judged.contains(&pair) || !change.policy.unchanged() {
                            recheck.insert(
                                (room.clone(), member.client.id, member.join_id),
                                member.principal.clone(),
                            );
                        }
                        continue;
                    };
                    if visibility == Visibility::Vanished {
                        recheck.insert(
                            (room.clone(), member.client.id, member.join_id),
                            member.principal.clone(),
                        );
                    }
                    let slot = &mut frames[visibility as usize];
                    let frame = match slot {
                        Some(frame) => frame.clone(),
                        None => slot
                            .insert(event_frame(room, &id, change, visibility)?)
                            .clone(),
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
        // Still under the lock, so a `left` or a new `joined` cannot slip between these frames.
        // A client that takes fewer is too slow: it is being closed, and resumes from its last
        // event.
        for (client, frames) in outgoing.into_values() {
            delivered += client.send_all(frames) as u64;
        }
    }
    metrics.events_delivered.add(delivered);

    // 4. Revoke: members who were denied a change, or saw a row leave their view, may have lost
    // access to the room. Ask the join policy once for all of them; those refused leave the room.
    if !recheck.is_empty() {
        let checking = std::time::Instant::now();
        metrics.access_rechecks.add(recheck.len() as u64);
        revoke_lost_access(hub, authorizer, metrics, recheck).await;
        metrics.access_recheck_time.add(checking.elapsed());
    }
    Ok(())
}

async fn revoke_lost_access(
    hub: &Hub,
    authorizer: &Authorizer,
    metrics: &Metrics,
    recheck: HashMap<(String, u64, u64), Arc<Principal>>,
) {
    let (memberships, checks): (Vec<u64>, Vec<AccessCheck>) = recheck
        .into_iter()
        .map(|((room, client, join_id), principal)| (join_id, (room, client, principal)))
        .unzip();
    let allowed = match authorizer.still_allowed(&checks).await {
        Ok(allowed) => allowed,
        Err(err) => {
            // Nothing leaks meanwhile: every event is authorized on its own. Retried next time.
            tracing::warn!(error = %format!("{err:#}"), "re-checking room access failed");
            return;
        }
    };
    for (((room, client, _), allowed), join_id) in checks.iter().zip(allowed).zip(memberships) {
        let Some(room) = crate::protocol::Room::parse(room) else {
            continue;
        };
        // Only the membership that was checked: the client may have left and joined again since.
        if !allowed && hub.revoke(&room, *client, join_id) {
            metrics.revocations.inc();
        }
    }
}

#[derive(Serialize)]
struct EventFrame<'a> {
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
    ts: &'a str,
}

/// The `event` message for one room, as a reader with this visibility sees the change.
pub fn event_frame(
    room: &str,
    id: &str,
    change: &Change,
    visibility: Visibility,
) -> anyhow::Result<Utf8Bytes> {
    let suffix = |op: Op| match op {
        Op::Insert => "created",
        Op::Update => "updated",
        Op::Delete => "deleted",
    };
    let (op, row, old): (Op, Box<RawValue>, Option<&RawValue>) = match visibility {
        Visibility::AsIs => (change.op, change.row.clone(), change.old.as_deref()),
        Visibility::Appeared => (Op::Insert, change.row.clone(), None),
        Visibility::Vanished => (Op::Delete, previous_row(change)?, None),
    };
    let frame = EventFrame {
        kind: "event",
        room,
        id,
        event: format!("{}_{}", change.entity, suffix(op)),
        table: &change.table,
        op: op.as_str(),
        row: &row,
        old,
        ts: &change.ts,
    };
    Ok(serde_json::to_string(&frame)?.into())
}

/// The row as it was before an UPDATE: the new row with the changed columns put back.
fn previous_row(change: &Change) -> anyhow::Result<Box<RawValue>> {
    let mut row: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(change.row.get())?;
    if let Some(old) = &change.old {
        let old: serde_json::Map<String, serde_json::Value> = serde_json::from_str(old.get())?;
        row.extend(old);
    }
    Ok(RawValue::from_string(serde_json::to_string(&row)?)?)
}
