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

use serde_json::value::RawValue;

use crate::authorize::{Authorizer, Verdict};
use crate::capture::outbox::{Change, Op};
use crate::capture::position::{Position, PositionCodec};
use crate::capture::reader::{BatchRef, Delivered};
use crate::jwt::Principal;
use crate::metrics::Metrics;
use crate::protocol::{Event, Frame};
use crate::rooms::{Hub, Membership};

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

/// Authorizes and queues one chunk of changes (in commit order) to the members of their rooms.
/// Fails only when the database is unreachable (then nothing of the chunk was delivered).
pub async fn deliver(
    hub: &Hub,
    authorizer: &Authorizer,
    metrics: &Metrics,
    codec: &PositionCodec,
    batch: &BatchRef<'_>,
    changes: &[Change],
) -> anyhow::Result<Delivered> {
    // 1. Candidates.
    let mut principals: Vec<Arc<Principal>> = Vec::new();
    let mut principal_of_client: FxHashMap<u64, u32> = FxHashMap::default();
    let mut pairs: Vec<(u32, u32)> = Vec::new();
    let mut seen: (usize, Vec<u32>) = (usize::MAX, Vec::new());
    hub.candidates(batch.number, changes, |change_ix, member| {
        if seen.0 != change_ix {
            seen = (change_ix, Vec::new());
        }
        let ix = *principal_of_client
            .entry(member.client.id)
            .or_insert_with(|| {
                principals.push(member.principal.clone());
                (principals.len() - 1) as u32
            });
        if !seen.1.contains(&ix) {
            seen.1.push(ix);
            pairs.push((change_ix as u32, ix));
        }
    });

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
    let mut ids: (usize, String) = (usize::MAX, String::new());
    let delivered = hub.deliver(
        batch.number,
        changes,
        |frames: &mut [Option<Frame>; 3], change_ix, room, member| {
            let change = &changes[change_ix];
            let Some(&principal) = principal_of_client.get(&member.client.id) else {
                return Ok(None); // joined after step 1 began: its position starts after this batch
            };
            let pair = (change_ix as u32, principal);
            let Some(&visibility) = visible.get(&pair) else {
                // Denied: maybe this member has lost access to the room itself. Not when the
                // answer came from memory for an UPDATE that left what the policy reads alone:
                // then neither the row nor anything the policy reads elsewhere changed since
                // that answer (such changes make answers forgotten), and the first such denial
                // was looked into. Without this, a private task denied to most of a project's
                // room cost a join check per member per change.
                if verdicts.judged.contains(&pair) || !change.policy.unchanged() {
                    recheck.insert(
                        (room.to_owned(), member.client.id, member.join_id),
                        member.principal.clone(),
                    );
                }
                return Ok(None);
            };
            if visibility == Visibility::Vanished {
                recheck.insert(
                    (room.to_owned(), member.client.id, member.join_id),
                    member.principal.clone(),
                );
            }
            if ids.0 != change_ix {
                ids = (
                    change_ix,
                    codec.seal(&Position::Within {
                        since: batch.since.clone(),
                        upto: batch.upto.clone(),
                        change_id: change.id,
                    }),
                );
            }
            let slot = &mut frames[visibility as usize];
            Ok(Some(match slot {
                Some(frame) => frame.clone(),
                None => slot
                    .insert(event_frame(room, &ids.1, change, visibility)?)
                    .clone(),
            }))
        },
    )?;
    metrics.events_delivered.add(delivered);

    // 4. Revoke (see `crate::recheck`): members who were denied a change, or saw a row leave
    // their view, may have lost access to the room; so may every member of the rooms whose join
    // policy reads a table that changed, and everyone after an invalidation. Asked once the
    // chunk is delivered, so a removed member still gets the change that removed it (when it may
    // read it) and then `left`; presence and typing end with it.
    let mut memberships: Vec<Membership> = recheck
        .into_iter()
        .filter_map(|((room, client, join_id), principal)| {
            Some(Membership {
                room: crate::protocol::Room::parse(&room)?,
                client,
                join_id,
                principal,
            })
        })
        .collect();
    let everyone = changes.iter().any(|c| c.control);
    let mut kinds: Vec<&str> = changes
        .iter()
        .flat_map(|c| c.policy.recheck.iter().map(String::as_str))
        .collect();
    kinds.sort_unstable();
    kinds.dedup();
    if everyone || !kinds.is_empty() {
        let named = |m: &Membership| (m.room.clone(), m.client, m.join_id);
        let already: std::collections::HashSet<_> = memberships.iter().map(named).collect();
        let more = hub.memberships(|room| everyone || kinds.contains(&room.kind()));
        memberships.extend(more.into_iter().filter(|m| !already.contains(&named(m))));
    }
    crate::recheck::recheck_or_log(hub, authorizer, metrics, &memberships, "after a change").await;
    Ok(Delivered {
        timed_out: verdicts.timed_out,
    })
}

/// The `event` message for one room, as a reader with this visibility sees the change.
///
/// A change whose row and old values together are longer than its table's `max_event_bytes`
/// goes out with only the primary key in `row`, no `old`, and `"truncated": true`: the client
/// refetches the row. (Who may see it was decided on the whole row, in the database.)
pub fn event_frame(
    room: &str,
    id: &str,
    change: &Change,
    visibility: Visibility,
) -> anyhow::Result<Frame> {
    let (op, row, old): (Op, Box<RawValue>, Option<&RawValue>) = match visibility {
        Visibility::AsIs => (change.op, change.row.clone(), change.old.as_deref()),
        Visibility::Appeared => (Op::Insert, change.row.clone(), None),
        Visibility::Vanished => (Op::Delete, previous_row(change)?, None),
    };
    let size = row.get().len() + old.map_or(0, |o| o.get().len());
    let truncated = size > change.max_event_bytes;
    let (row, old) = if truncated {
        (key_of(&row, &change.key_columns)?, None)
    } else {
        (row, old)
    };
    Event {
        room,
        id,
        entity: &change.entity,
        table: &change.table,
        op,
        row: &row,
        old,
        truncated,
        ts: &change.ts,
    }
    .to_frame()
}

/// Just the key columns of a row (the other values are skipped over, never copied).
fn key_of(row: &RawValue, key_columns: &[String]) -> anyhow::Result<Box<RawValue>> {
    let columns: std::collections::BTreeMap<String, &RawValue> = serde_json::from_str(row.get())?;
    let key: std::collections::BTreeMap<&String, &RawValue> = columns
        .iter()
        .filter(|(column, _)| key_columns.contains(column))
        .map(|(column, value)| (column, *value))
        .collect();
    Ok(RawValue::from_string(serde_json::to_string(&key)?)?)
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
