//! The presence bus: relays tell each other about their connections over `NOTIFY pgrelay_presence`.
//!
//! Postgres is already the one thing every relay shares, so the bus needs nothing new in a
//! deployment. Each relay holds one connection of its own for it (never one of the change path),
//! which both `LISTEN`s and publishes. Publishing from a single connection, one transaction at a
//! time, keeps each relay's messages in order for everyone; sequence numbers let a receiver notice
//! that it missed some (its connection dropped) and ask for the sender's full state.
//!
//! Traffic stays small: ops queued while a publish is in flight go out together, an op superseded
//! before it was sent (a meta set twice, a join followed by a leave) is not sent at all, and each
//! message is packed up to [`MAX_PAYLOAD`] bytes (NOTIFY refuses 8000). An idle relay sends one
//! heartbeat per interval.
//!
//! Life of a relay on the bus: connect, `LISTEN`, say hello (everyone answers with their full
//! state) and publish our own full state (peers may have dropped us while we were away); then
//! publish ops and heartbeats; say goodbye at shutdown. A lost connection is retried with backoff.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::poll_fn;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use super::signing::BusKey;
use super::Presence;
use crate::backoff::Backoff;
use crate::metrics::Metrics;
use crate::protocol::Room;

/// The channel presence travels on (the change path uses `pgrelay`).
pub const CHANNEL: &str = "pgrelay_presence";

/// The largest message published (Postgres refuses NOTIFY payloads of 8000 bytes or more; the
/// signature adds 44).
pub const MAX_PAYLOAD: usize = 7000;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One change to the view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "k")]
pub enum Op {
    /// A connection is in a room with this meta (a join, or a new meta).
    #[serde(rename = "j")]
    Join {
        #[serde(rename = "r")]
        room: String,
        #[serde(rename = "c")]
        connection: u64,
        #[serde(rename = "u")]
        user: String,
        #[serde(rename = "m")]
        meta: Value,
    },
    #[serde(rename = "l")]
    Leave {
        #[serde(rename = "r")]
        room: String,
        #[serde(rename = "c")]
        connection: u64,
    },
    #[serde(rename = "t")]
    Typing {
        #[serde(rename = "r")]
        room: String,
        #[serde(rename = "u")]
        user: String,
        #[serde(rename = "t")]
        typing: bool,
    },
}

impl Op {
    pub fn join(room: &Room, connection: u64, user: &str, meta: &Value) -> Op {
        Op::Join {
            room: room.as_str().to_owned(),
            connection,
            user: user.to_owned(),
            meta: meta.clone(),
        }
    }

    /// Ops with the same key describe the same thing; only the last one queued matters.
    fn key(&self) -> (u8, &str, &str, u64) {
        match self {
            Op::Join {
                room, connection, ..
            }
            | Op::Leave { room, connection } => (0, room, "", *connection),
            Op::Typing { room, user, .. } => (1, room, user, 0),
        }
    }
}

/// Marks the messages of a full-state transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sync {
    /// The first message of several.
    Begin,
    More,
    Last,
    /// The whole state in one message.
    Whole,
}

impl Sync {
    pub fn begins(self) -> bool {
        matches!(self, Sync::Begin | Sync::Whole)
    }
    pub fn ends(self) -> bool {
        matches!(self, Sync::Last | Sync::Whole)
    }
}

/// One NOTIFY payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(rename = "n")]
    pub node: String,
    #[serde(rename = "s")]
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ops: Vec<Op>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<Sync>,
    /// Asks a relay (or `*`, all) for its full state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub want: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bye: bool,
}

/// Numbers and packs a relay's outgoing presence messages.
struct Packer {
    node: String,
    seq: u64,
}

impl Packer {
    fn envelope(&mut self) -> Envelope {
        self.seq += 1;
        Envelope {
            node: self.node.clone(),
            seq: self.seq,
            ops: Vec::new(),
            sync: None,
            want: None,
            bye: false,
        }
    }

    /// Packs ops into as few payloads as fit. With `sync`, the payloads form a full-state
    /// transfer (even with no ops at all: "I have nobody").
    fn pack(&mut self, ops: Vec<Op>, sync: bool) -> Vec<String> {
        let mut chunks: Vec<Vec<String>> = vec![Vec::new()];
        let mut size = 0;
        for op in ops {
            let Ok(text) = serde_json::to_string(&op) else {
                continue;
            };
            if text.len() + 200 > MAX_PAYLOAD {
                tracing::warn!(
                    bytes = text.len(),
                    "presence op too large for the bus; kept local"
                );
                continue;
            }
            if size + text.len() + 200 > MAX_PAYLOAD {
                chunks.push(Vec::new());
                size = 0;
            }
            size += text.len() + 1;
            if let Some(chunk) = chunks.last_mut() {
                chunk.push(text);
            }
        }
        if !sync && chunks.len() == 1 && chunks[0].is_empty() {
            return Vec::new();
        }
        let count = chunks.len();
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, ops)| {
                let mut envelope = self.envelope();
                envelope.sync = sync.then_some(match (i, count) {
                    (_, 1) => Sync::Whole,
                    (0, _) => Sync::Begin,
                    (i, n) if i + 1 == n => Sync::Last,
                    _ => Sync::More,
                });
                // Ops are already JSON: splice them in rather than parse them again.
                let mut text = serde_json::to_string(&envelope).unwrap_or_default();
                text.pop(); // the closing brace
                text.push_str(",\"ops\":[");
                text.push_str(&ops.join(","));
                text.push_str("]}");
                text
            })
            .collect()
    }

    fn single(&mut self, fill: impl FnOnce(&mut Envelope)) -> String {
        let mut envelope = self.envelope();
        fill(&mut envelope);
        serde_json::to_string(&envelope).unwrap_or_default()
    }
}

/// Keeps only the last op per key, in the order of those last ops.
fn coalesce(ops: Vec<Op>) -> Vec<Op> {
    let mut last: HashMap<(u8, &str, &str, u64), usize> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        last.insert(op.key(), i);
    }
    let mut keep: Vec<usize> = last.into_values().collect();
    keep.sort_unstable();
    let mut ops: Vec<Option<Op>> = ops.into_iter().map(Some).collect();
    keep.into_iter().filter_map(|i| ops[i].take()).collect()
}

/// Runs the bus until `shutdown`: publishes this relay's ops, applies everyone else's.
pub async fn run(
    db: crate::db::Database,
    key: BusKey,
    presence: Arc<Presence>,
    mut ops: mpsc::UnboundedReceiver<Op>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    // So a DBA can tell this connection apart in pg_stat_activity.
    let db = db.with_config(|config| {
        config.application_name("pgrelay presence");
    });
    let mut packer = Packer {
        node: presence.node().to_owned(),
        seq: 0,
    };
    let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
    loop {
        let connected = tokio::select! {
            connected = db.connect() => connected,
            () = shutdown.cancelled() => return,
        };
        let failed = match connected {
            Ok((client, connection)) => {
                backoff.reset();
                let session = Session {
                    client,
                    key: &key,
                    presence: &presence,
                    packer: &mut packer,
                    metrics: &metrics,
                };
                let stopping = session.serve(connection, &mut ops, &shutdown).await;
                metrics.presence_bus_connected.set(0);
                if stopping {
                    return;
                }
                None
            }
            Err(err) => Some(err),
        };
        let wait = backoff.next_wait();
        if let Some(err) = failed {
            tracing::warn!(error = %format!("{err:#}"), "presence bus: cannot connect; retrying in {wait:?}");
        }
        // Ops queued while disconnected are covered by the full state sent on reconnecting.
        while ops.try_recv().is_ok() {}
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

struct Session<'a> {
    client: tokio_postgres::Client,
    key: &'a BusKey,
    presence: &'a Presence,
    packer: &'a mut Packer,
    metrics: &'a Metrics,
}

impl Session<'_> {
    /// One connection's life. Returns true when the relay is shutting down.
    async fn serve(
        mut self,
        mut connection: crate::db::connect::Connection,
        ops: &mut mpsc::UnboundedReceiver<Op>,
        shutdown: &CancellationToken,
    ) -> bool {
        let (heard_tx, mut heard) = mpsc::unbounded_channel::<String>();
        let io = tokio::spawn(async move {
            loop {
                match poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if heard_tx.send(n.payload().to_owned()).is_err() {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(err)) => {
                        tracing::warn!(error = %err, "presence bus connection lost");
                        return;
                    }
                    None => return,
                }
            }
        });
        let result = self.converse(ops, &mut heard, shutdown).await;
        io.abort();
        match result {
            Ok(stopping) => stopping,
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "presence bus failed; reconnecting");
                false
            }
        }
    }

    async fn converse(
        &mut self,
        ops: &mut mpsc::UnboundedReceiver<Op>,
        heard: &mut mpsc::UnboundedReceiver<String>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<bool> {
        self.client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await?;
        self.metrics.presence_bus_connected.set(1);
        tracing::info!(relay = self.presence.node(), "presence bus connected");
        let hello = self.packer.single(|e| e.want = Some("*".into()));
        let mut payloads = vec![hello];
        payloads.extend(self.packer.pack(self.presence.local_entries(), true));
        self.publish(payloads).await?;

        let every = self.presence.timings().heartbeat;
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        // Full states go out at most once per resync interval, however many relays ask (or
        // however often one does): each is as many NOTIFYs as this relay has connections.
        let resync = self.presence.timings().resync_interval;
        let mut last_sync = tokio::time::Instant::now();
        let mut sync_due: Option<tokio::time::Instant> = None;
        loop {
            let mut payloads = Vec::new();
            tokio::select! {
                () = shutdown.cancelled() => {
                    let bye = self.packer.single(|e| e.bye = true);
                    let _ = tokio::time::timeout(Duration::from_secs(1), self.publish(vec![bye])).await;
                    return Ok(true);
                }
                payload = heard.recv() => {
                    let Some(payload) = payload else {
                        anyhow::bail!("the connection closed");
                    };
                    self.receive(&payload, &mut payloads);
                    while let Ok(payload) = heard.try_recv() {
                        self.receive(&payload, &mut payloads);
                    }
                }
                () = self.presence.sync_wanted.notified() => {
                    sync_due.get_or_insert(last_sync + resync);
                }
                () = tokio::time::sleep_until(sync_due.unwrap_or_else(tokio::time::Instant::now)), if sync_due.is_some() => {
                    sync_due = None;
                    last_sync = tokio::time::Instant::now();
                    payloads.extend(self.packer.pack(self.presence.local_entries(), true));
                }
                op = ops.recv() => {
                    let Some(op) = op else { return Ok(true) };
                    let mut batch = vec![op];
                    while let Ok(op) = ops.try_recv() {
                        batch.push(op);
                    }
                    payloads.extend(self.packer.pack(coalesce(batch), false));
                }
                _ = heartbeat.tick() => {
                    payloads.push(self.packer.single(|_| {}));
                }
            }
            if !payloads.is_empty() {
                heartbeat.reset();
                self.publish(payloads).await?;
            }
        }
    }

    /// Applies a message from the bus; asks for a relay's full state if we missed some of it.
    fn receive(&mut self, payload: &str, payloads: &mut Vec<String>) {
        let Some(message) = self.key.open(payload) else {
            // Not from a relay of this database (see `signing`).
            self.metrics.presence_bus_rejected.inc();
            tracing::debug!("presence bus: ignoring a message without a valid signature");
            return;
        };
        let envelope: Envelope = match serde_json::from_str(message) {
            Ok(envelope) => envelope,
            Err(err) => {
                tracing::warn!(error = %err, "presence bus: ignoring a malformed message");
                return;
            }
        };
        if let Some(node) = self.presence.apply(envelope) {
            self.metrics.presence_resyncs.inc();
            payloads.push(self.packer.single(|e| e.want = Some(node)));
        }
    }

    /// Sends payloads in one transaction: in order, and all or none.
    async fn publish(&self, payloads: Vec<String>) -> anyhow::Result<()> {
        let payloads: Vec<String> = payloads.iter().map(|p| self.key.sign(p)).collect();
        self.client
            .execute(
                "SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload",
                &[&CHANNEL, &payloads],
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(room: &str, connection: u64, meta: Value) -> Op {
        Op::Join {
            room: room.into(),
            connection,
            user: "u1".into(),
            meta,
        }
    }

    #[test]
    fn only_the_last_op_per_connection_and_room_is_sent() {
        let ops = vec![
            join("task:1", 1, Value::Null),
            join("task:2", 1, Value::Null),
            join("task:1", 1, Value::Bool(true)),
            Op::Leave {
                room: "task:2".into(),
                connection: 1,
            },
        ];
        assert_eq!(
            coalesce(ops),
            vec![
                join("task:1", 1, Value::Bool(true)),
                Op::Leave {
                    room: "task:2".into(),
                    connection: 1
                }
            ]
        );
    }

    #[test]
    fn large_states_are_split_into_numbered_payloads_that_fit_notify() {
        let mut packer = Packer {
            node: "a".into(),
            seq: 0,
        };
        let meta = Value::String("x".repeat(900));
        let ops: Vec<Op> = (0..40).map(|c| join("task:1", c, meta.clone())).collect();
        let payloads = packer.pack(ops.clone(), true);
        assert!(payloads.len() > 1);
        let envelopes: Vec<Envelope> = payloads
            .iter()
            .map(|p| {
                assert!(p.len() < 8000, "{} bytes", p.len());
                serde_json::from_str(p).expect("a valid envelope")
            })
            .collect();
        let seqs: Vec<u64> = envelopes.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=envelopes.len() as u64).collect::<Vec<_>>());
        assert_eq!(envelopes[0].sync, Some(Sync::Begin));
        assert_eq!(envelopes.last().and_then(|e| e.sync), Some(Sync::Last));
        let unpacked: Vec<Op> = envelopes.into_iter().flat_map(|e| e.ops).collect();
        assert_eq!(unpacked, ops);

        let empty = packer.pack(Vec::new(), true);
        let envelope: Envelope = serde_json::from_str(&empty[0]).expect("valid");
        assert_eq!(
            envelope.sync,
            Some(Sync::Whole),
            "an empty state is still a state"
        );
        assert!(packer.pack(Vec::new(), false).is_empty());
    }
}
