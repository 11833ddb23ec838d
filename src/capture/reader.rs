//! The reader: one task that turns wake-ups into delivered batches.
//!
//! It keeps a single cursor: a snapshot (every change visible in it has been delivered) and, while
//! a batch is in progress, the batch's end and how far into it delivery got. On every wake-up, and at least every poll interval, it
//! reads the next batch and hands it to the fan-out chunk by chunk, advancing the cursor after
//! each chunk. When anything fails (the database restarted, a connection broke), it waits and
//! resumes from the cursor: a batch interrupted half-way is read again between the same two
//! snapshots, and the part already delivered is skipped. Nothing is lost, nothing repeated.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::outbox::{self, Batch};
use super::position::{PositionCodec, Snapshot};
use crate::authorize::Authorizer;
use crate::fanout::{self, BatchRef};
use crate::metrics::Metrics;
use crate::protocol::close;
use crate::rooms::Hub;
use crate::transport::client::CloseRequest;

/// Changes handed to one authorization query.
const CHUNK: usize = 1000;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub struct Reader {
    pub pool: Pool,
    pub hub: Arc<Hub>,
    pub authorizer: Authorizer,
    pub metrics: Arc<Metrics>,
    pub wake: Arc<Notify>,
    /// Read at least this often, even without a notification.
    pub poll_interval: Duration,
    pub codec: PositionCodec,
}

impl Reader {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        let mut cursor = loop {
            let started = tokio::select! {
                started = self.start() => started,
                () = shutdown.cancelled() => return,
            };
            match started {
                Ok(cursor) => break cursor,
                Err(err) => self.failed(&err, &mut backoff, &shutdown).await,
            }
        };
        loop {
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.poll_interval) => {}
                () = shutdown.cancelled() => return,
            }
            loop {
                let read = tokio::select! {
                    read = self.read(&mut cursor) => read,
                    () = shutdown.cancelled() => return,
                };
                match read {
                    Ok(()) => {
                        self.metrics.reader_healthy.set(1);
                        backoff = Backoff::default();
                        break;
                    }
                    Err(err) => self.failed(&err, &mut backoff, &shutdown).await,
                }
            }
        }
    }

    async fn failed(
        &self,
        err: &anyhow::Error,
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) {
        self.metrics.read_errors.inc();
        self.metrics.reader_healthy.set(0);
        tracing::warn!(error = %format!("{err:#}"), "reading changes failed; retrying in {:?}", backoff.0);
        tokio::select! {
            () = tokio::time::sleep(backoff.0) => {}
            () = shutdown.cancelled() => {}
        }
        backoff.0 = (backoff.0 * 2).min(MAX_BACKOFF);
    }

    /// Starts at the database's current snapshot: a new relay delivers what commits from now on
    /// (clients that were away resume with their own positions).
    async fn start(&self) -> anyhow::Result<Cursor> {
        let client = self.pool.get().await?;
        let snapshot = outbox::current_snapshot(&client).await?;
        tracing::info!(position = %snapshot, "reading changes");
        self.hub.start_at(snapshot.clone());
        Ok(Cursor::at(snapshot))
    }

    /// Reads and delivers everything committed since the cursor.
    async fn read(&self, cursor: &mut Cursor) -> anyhow::Result<()> {
        let client = self.pool.get().await?;
        let mut batch = Batch::read(&client, &cursor.since, cursor.upto.as_ref(), None).await?;
        if batch.incomplete() {
            // This relay fell further behind than retention keeps: some changes were removed
            // before it read them. Its clients must not believe their streams are complete.
            tracing::error!(
                "the relay fell behind the outbox's retention; closing its clients so they refetch"
            );
            self.metrics.retention_gaps.inc();
            self.hub.close_all(CloseRequest {
                code: close::TOO_SLOW,
                reason: "relay fell behind; resume with since",
            });
        }
        // From here on a retry reads this same batch, so members that join meanwhile (whose
        // position is its end) keep skipping it.
        cursor.upto = Some(batch.upto.clone());
        let number = self.hub.begin_batch(&batch.upto);
        loop {
            let mut chunk = batch.next_chunk(CHUNK).await?;
            if chunk.is_empty() {
                break;
            }
            self.metrics.changes_read.add(chunk.len() as u64);
            if let Some(done) = cursor.delivered_through {
                // Retrying an interrupted batch: drop what was delivered before.
                chunk.retain(|c| (c.txn_last, c.id) > done);
                if chunk.is_empty() {
                    continue;
                }
            }
            let at = BatchRef {
                number,
                since: &batch.since,
                upto: &batch.upto,
                codec: &self.codec,
            };
            fanout::deliver(&self.hub, &self.authorizer, &self.metrics, &at, &chunk).await?;
            cursor.delivered_through = chunk.last().map(|c| (c.txn_last, c.id));
        }
        self.metrics.batches_read.inc();
        self.hub.end_batch(batch.upto.clone());
        *cursor = Cursor::at(batch.upto);
        Ok(())
    }
}

/// Where the reader is: everything visible in `since` is delivered; when `upto` is set, the batch
/// `since → upto` is being delivered, up to the commit-order key `delivered_through`.
struct Cursor {
    since: Snapshot,
    upto: Option<Snapshot>,
    delivered_through: Option<(i64, i64)>,
}

impl Cursor {
    fn at(since: Snapshot) -> Cursor {
        Cursor {
            since,
            upto: None,
            delivered_through: None,
        }
    }
}

struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff(Duration::from_millis(50))
    }
}
