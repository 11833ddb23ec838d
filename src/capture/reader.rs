//! The reader: one task that turns wake-ups into delivered batches.
//!
//! It keeps a single cursor: a snapshot (every change visible in it has been delivered) and, while
//! a batch is in progress, the batch's end and how far into it delivery got. It reads the next
//! batch and hands it to the fan-out chunk by chunk, advancing the cursor after each chunk, and
//! reads again at once while reads find changes. Only when a read finds nothing does it go to
//! sleep: it announces that it sleeps (so writers start to notify; see [`super::wakeup`]), waits
//! for the writers that did not notify, reads once more, and then waits for a wake-up, or the
//! poll interval as a safety net. When anything fails (the database restarted, a connection broke), it waits and
//! resumes from the cursor: a batch interrupted half-way is read again between the same two
//! snapshots, and the part already delivered is skipped. Nothing is lost, nothing repeated.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use anyhow::Context;
use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::listener::Listening;
use super::outbox::{self, Batch, Change};
use super::position::Snapshot;
use super::wakeup::{self, Sleeping};
use crate::backoff::Backoff;
use crate::metrics::Metrics;

/// Changes handed to one authorization query, at most. After a chunk's authorization ran into
/// the statement timeout, chunks are halved (down to [`MIN_CHUNK`]), and doubled again with each
/// chunk that went fine: a policy that is merely slow for big chunks keeps delivering, in
/// smaller steps, instead of timing out chunk after chunk.
const CHUNK: usize = 1000;
const MIN_CHUNK: usize = 8;
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Once two reads in a row found changes, reads start at most this often (the pause after a read
/// is what is left of it).
const READ_PACE: Duration = Duration::from_millis(5);
/// A reader that found at least [`BUSY_CHANGES`] changes in the last [`BUSY_WINDOW`] or two is
/// busy: it goes to sleep only once its reads, every [`READ_PACE`], have found nothing for
/// [`LINGER`]. Each time a reader goes to sleep, writers notify until it reads again (see
/// [`super::wakeup`]), and notifying writers commit one at a time. Going to sleep at the first
/// empty read made sustained writers notify for nearly every change, which halved their commit
/// rate and kept the reader finding empty reads. A trickle of
/// changes (below about 250 a second) still lets the reader sleep at once, woken for each.
const BUSY_CHANGES: u64 = 25;
const BUSY_WINDOW: Duration = Duration::from_millis(50);
const LINGER: Duration = Duration::from_millis(20);
/// How soon a reader that could not announce its sleep (so writers do not notify) reads again.
const SLEEP_RETRY: Duration = Duration::from_millis(100);

/// The identity of a batch that deliveries are part of.
pub struct BatchRef<'a> {
    /// Its number in this relay's sequence ([`Consumer::begin_batch`]).
    pub number: u64,
    pub since: &'a Snapshot,
    pub upto: &'a Snapshot,
}

/// Where the reader hands what it reads, in commit order: the stages after capture (the relay's
/// is [`crate::pipeline::Pipeline`]).
pub trait Consumer: Send + Sync {
    /// The reader starts at `snapshot`: what committed before it is not delivered.
    fn start_at(&self, snapshot: Snapshot);
    /// Retention removed changes before the reader got to them: streams are incomplete.
    fn changes_lost(&self);
    /// The batch ending at `upto` starts and gets its number (a retried batch keeps its own).
    fn begin_batch(&self, upto: &Snapshot) -> u64;
    /// One chunk of the batch, in commit order; an error makes the reader retry the rest.
    fn deliver(
        &self,
        batch: &BatchRef<'_>,
        changes: &[Change],
    ) -> impl std::future::Future<Output = anyhow::Result<Delivered>> + Send;
    /// Every change of the batch ending at `upto` was delivered.
    fn end_batch(&self, upto: Snapshot);
}

/// How delivering a chunk went, besides succeeding.
#[derive(Debug, Default, Clone, Copy)]
pub struct Delivered {
    /// Authorizing it ran into the statement timeout (see [`crate::authorize`]): smaller chunks
    /// would be safer for a while.
    pub timed_out: bool,
}

pub struct Reader<C> {
    pub pool: Pool,
    /// For the outbox reads, which stream while the batch is delivered (a longer timeout).
    pub read_pool: Pool,
    /// What the reader hands its chunks to.
    pub consumer: C,
    pub metrics: Arc<Metrics>,
    pub wake: Arc<Notify>,
    /// The LISTEN connection, on which the reader announces that it sleeps.
    pub listening: Arc<Listening>,
    /// For the barrier connection (see [`wakeup::barrier`]).
    /// For the barrier connection.
    pub db: crate::db::Database,
    /// Read at least this often, even without a notification.
    pub poll_interval: Duration,
}

impl<C: Consumer> Reader<C> {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
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
        let mut reading = Reading {
            cursor: &mut cursor,
            backoff,
            shutdown: &shutdown,
            recent: RecentChanges::new(),
        };
        let mut barrier_connection = None;
        let mut sleep_failures = 0u32;
        let mut just_read = false;
        loop {
            // Awake: read until a read finds nothing. Writers do not notify meanwhile.
            if !std::mem::take(&mut just_read)
                && self.read_until_empty(&mut reading).await.is_none()
            {
                return;
            }

            // Going to sleep (see `wakeup` for why no change can slip through).
            let sleeping = match self.announce_sleep(&mut barrier_connection).await {
                Ok(sleeping) => {
                    sleep_failures = 0;
                    sleeping
                }
                Err(err) => {
                    // Writers may not notify now: look again soon.
                    self.metrics.reader_sleep_failures.inc();
                    sleep_failures += 1;
                    if sleep_failures == 1 {
                        tracing::warn!(error = %format!("{err:#}"), "cannot announce sleep; polling every {SLEEP_RETRY:?} until it can");
                    } else {
                        tracing::debug!(error = %format!("{err:#}"), "cannot announce sleep");
                    }
                    tokio::select! {
                        () = self.wake.notified() => {}
                        () = tokio::time::sleep(SLEEP_RETRY.min(self.poll_interval)) => {}
                        () = shutdown.cancelled() => return,
                    }
                    continue;
                }
            };
            let Some(ready) = self
                .await_barrier(&mut reading, &sleeping, &mut barrier_connection)
                .await
            else {
                return;
            };
            if !ready {
                sleeping.end().await;
                continue;
            }
            // Every writer that did not notify has ended: one more read sees them all. One
            // read, not reads until one is empty: while the sleep is announced every writer
            // notifies, so under sustained writes the reader must withdraw it as soon as it
            // finds changes, not once they stop (which they may not).
            let Some(found) = self.read_once(&mut reading).await else {
                return;
            };
            if found > 0 || sleeping.lost() {
                // Busy again (or the announcement is gone): stay awake.
                sleeping.end().await;
                continue;
            }

            // Asleep: every writer that commits from now on notifies.
            self.metrics.reader_sleeps.inc();
            let polled = tokio::select! {
                () = self.wake.notified() => false,
                () = tokio::time::sleep(self.poll_interval) => true,
                () = shutdown.cancelled() => return,
            };
            // Withdraw the announcement while reading: from now on writers do not notify, and
            // this relay reads until it finds nothing before it sleeps again.
            let ((), read) = tokio::join!(sleeping.end(), self.read_until_empty(&mut reading));
            let Some(found) = read else {
                return;
            };
            just_read = true;
            if polled {
                if found > 0 {
                    // Only a lost wake-up (or a NOTIFY still in flight) leaves this to the poll.
                    self.metrics.poll_reads_with_changes.inc();
                    tracing::debug!(
                        changes = found,
                        "the poll found changes a wake-up should have announced"
                    );
                }
            } else {
                self.metrics.reader_wakeups.inc();
            }
        }
    }

    /// Reads batch after batch until one is empty (retrying failures); returns how many changes
    /// it read, or `None` at shutdown.
    async fn read_until_empty(&self, reading: &mut Reading<'_>) -> Option<u64> {
        let mut total = 0;
        // While busy: since when reads have found nothing.
        let mut quiet_since: Option<Instant> = None;
        loop {
            let started = Instant::now();
            let n = self.read_once(reading).await?;
            if total > 0 {
                self.metrics.back_to_back_reads.inc();
            }
            if n == 0 {
                let quiet = *quiet_since.get_or_insert_with(Instant::now);
                if !reading.recent.busy() || quiet.elapsed() >= LINGER {
                    return Some(total);
                }
                tokio::select! {
                    () = tokio::time::sleep(READ_PACE) => {}
                    () = reading.shutdown.cancelled() => return None,
                }
                continue;
            }
            quiet_since = None;
            if total > 0 {
                // Two reads in a row found changes: writes are flowing. Let the next batch grow
                // a little: fewer, larger reads leave more of the database to the writers. (A
                // lone change, as from a wake-up, is read at once, and so is whatever follows it
                // right away.) Reads start READ_PACE apart, counted from the start of this one:
                // a read that took longer has let the batch grow already, and pausing after it
                // only makes every change committed meanwhile wait longer.
                tokio::select! {
                    () = tokio::time::sleep_until(started + READ_PACE) => {}
                    () = reading.shutdown.cancelled() => return None,
                }
            }
            total += n;
        }
    }

    /// One read, retried until it succeeds; returns how many changes it read, or `None` at
    /// shutdown.
    async fn read_once(&self, reading: &mut Reading<'_>) -> Option<u64> {
        loop {
            let read = tokio::select! {
                read = self.read(reading.cursor) => read,
                () = reading.shutdown.cancelled() => return None,
            };
            match read {
                Ok(n) => {
                    self.metrics.reader_healthy.set(1);
                    reading.backoff.reset();
                    reading.recent.add(n);
                    return Some(n);
                }
                Err(err) => {
                    self.failed(&err, &mut reading.backoff, reading.shutdown)
                        .await
                }
            }
            if reading.shutdown.is_cancelled() {
                return None;
            }
        }
    }

    /// Takes the `SLEEPING` lock on the LISTEN connection and makes sure a connection for the
    /// barrier is open.
    async fn announce_sleep(
        &self,
        barrier_connection: &mut Option<Arc<Client>>,
    ) -> anyhow::Result<Sleeping> {
        let listen = self
            .listening
            .connection()
            .context("the LISTEN connection is down")?;
        if barrier_connection.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, connection) = self
                .db
                .connect()
                .await
                .context("opening the barrier connection")?;
            tokio::spawn(async move {
                if let Err(err) = connection.await {
                    tracing::debug!(error = %err, "barrier connection closed");
                }
            });
            *barrier_connection = Some(Arc::new(client));
        }
        self.metrics.reader_sleep_announcements.inc();
        Sleeping::announce(listen).await
    }

    /// Waits for the barrier (every writer that did not notify has ended), serving wake-ups
    /// meanwhile: the barrier lasts as long as the longest such transaction. `Some(false)` when
    /// the reader must start over (the barrier failed, or the LISTEN connection was lost).
    async fn await_barrier(
        &self,
        reading: &mut Reading<'_>,
        sleeping: &Sleeping,
        barrier_connection: &mut Option<Arc<Client>>,
    ) -> Option<bool> {
        let Some(connection) = barrier_connection.clone() else {
            return Some(false);
        };
        let barrier = wakeup::barrier(connection);
        tokio::pin!(barrier);
        // Reads that find changes start READ_PACE apart, as when awake; the barrier is noticed
        // meanwhile all the same.
        let mut paced = false;
        let mut next_read = Instant::now();
        loop {
            tokio::select! {
                done = &mut barrier => {
                    return Some(match done {
                        Ok(()) => true,
                        Err(err) => {
                            self.metrics.reader_sleep_failures.inc();
                            tracing::warn!(error = %format!("{err:#}"), "the sleep barrier failed; polling every {SLEEP_RETRY:?} until it passes");
                            *barrier_connection = None;
                            // Not asleep, so nobody notifies: look again soon, not in a loop.
                            tokio::select! {
                                () = self.wake.notified() => {}
                                () = tokio::time::sleep(SLEEP_RETRY.min(self.poll_interval)) => {}
                                () = reading.shutdown.cancelled() => return None,
                            }
                            false
                        }
                    });
                }
                () = tokio::time::sleep_until(next_read), if paced => {
                    paced = false;
                    continue;
                }
                () = self.wake.notified(), if !paced => {}
                () = tokio::time::sleep(self.poll_interval), if !paced => {}
                () = reading.shutdown.cancelled() => return None,
            }
            if sleeping.lost() {
                return Some(false);
            }
            // Writers notify while the barrier waits; deliver what they announce, one read per
            // wake-up. Not until a read is empty: under sustained writes that never happens, and
            // the reader kept its sleep announced while it read, so every writer notified (a few
            // announcements made thousands of NOTIFYs) and their commits queued on the NOTIFY
            // lock. Back in the loop, the barrier has usually passed.
            let started = Instant::now();
            paced = self.read_once(reading).await? > 0;
            next_read = started + READ_PACE;
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
        let wait = backoff.next_wait();
        tracing::warn!(error = %format!("{err:#}"), "reading changes failed; retrying in {wait:?}");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => {}
        }
    }

    /// Starts at the database's current snapshot: a new relay delivers what commits from now on
    /// (clients that were away resume with their own positions).
    async fn start(&self) -> anyhow::Result<Cursor> {
        let client = self.pool.get().await?;
        let snapshot = outbox::current_snapshot(&client).await?;
        tracing::info!(position = %snapshot, "reading changes");
        self.consumer.start_at(snapshot.clone());
        Ok(Cursor::at(snapshot))
    }

    /// Reads and delivers everything committed since the cursor; returns how many changes.
    async fn read(&self, cursor: &mut Cursor) -> anyhow::Result<u64> {
        let reading = Instant::now();
        let client = self.read_pool.get().await?;
        let statement = client.prepare_cached(outbox::READ_BATCH).await?;
        let mut batch = Batch::read(
            &client,
            &statement,
            &cursor.since,
            cursor.upto.as_ref(),
            None,
        )
        .await?;
        self.metrics.outbox_read_seconds.add(reading.elapsed());
        if batch.incomplete() {
            // This relay fell further behind than retention keeps: some changes were removed
            // before it read them. Its clients must not believe their streams are complete.
            tracing::error!(
                "the relay fell behind the outbox's retention; closing its clients so they refetch"
            );
            self.metrics.retention_gaps.inc();
            self.consumer.changes_lost();
        }
        // From here on a retry reads this same batch, so members that join meanwhile (whose
        // position is its end) keep skipping it.
        cursor.upto = Some(batch.upto.clone());
        let number = self.consumer.begin_batch(&batch.upto);
        let mut read = 0;
        loop {
            let reading = Instant::now();
            // Retrying an interrupted batch: skip what was delivered before.
            let done = cursor.delivered_through;
            let chunk = batch
                .next_kept(cursor.chunk, |c| {
                    done.is_none_or(|done| (c.txn_last, c.id) > done)
                })
                .await?;
            self.metrics.outbox_read_seconds.add(reading.elapsed());
            self.metrics.changes_read.add(batch.changes_read() - read);
            read = batch.changes_read();
            let Some(chunk) = chunk else {
                break;
            };
            let at = BatchRef {
                number,
                since: &batch.since,
                upto: &batch.upto,
            };
            let delivered = self.consumer.deliver(&at, &chunk).await?;
            cursor.chunk = if delivered.timed_out {
                (cursor.chunk / 2).max(MIN_CHUNK)
            } else {
                (cursor.chunk * 2).min(CHUNK)
            };
            cursor.delivered_through = chunk.last().map(|c| (c.txn_last, c.id));
        }
        self.metrics.batches_read.inc();
        self.consumer.end_batch(batch.upto.clone());
        let chunk = cursor.chunk;
        *cursor = Cursor::at(batch.upto);
        cursor.chunk = chunk;
        Ok(read)
    }
}

/// Where the reader is: everything visible in `since` is delivered; when `upto` is set, the batch
/// `since → upto` is being delivered, up to the commit-order key `delivered_through`.
struct Cursor {
    since: Snapshot,
    upto: Option<Snapshot>,
    delivered_through: Option<(i64, i64)>,
    /// How many changes the next chunk may hold (see [`CHUNK`]).
    chunk: usize,
}

impl Cursor {
    fn at(since: Snapshot) -> Cursor {
        Cursor {
            since,
            upto: None,
            delivered_through: None,
            chunk: CHUNK,
        }
    }
}

/// The reader's loop state shared by its phases.
struct Reading<'a> {
    cursor: &'a mut Cursor,
    backoff: Backoff,
    shutdown: &'a CancellationToken,
    recent: RecentChanges,
}

/// How many changes the last reads found: this window's and the one before.
struct RecentChanges {
    window_start: Instant,
    this_window: u64,
    last_window: u64,
}

impl RecentChanges {
    fn new() -> RecentChanges {
        RecentChanges {
            window_start: Instant::now(),
            this_window: 0,
            last_window: 0,
        }
    }

    fn add(&mut self, changes: u64) {
        let elapsed = self.window_start.elapsed();
        if elapsed >= BUSY_WINDOW {
            self.last_window = if elapsed < 2 * BUSY_WINDOW {
                self.this_window
            } else {
                0
            };
            self.this_window = 0;
            self.window_start = Instant::now();
        }
        self.this_window += changes;
    }

    fn busy(&self) -> bool {
        self.this_window + self.last_window >= BUSY_CHANGES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_reader_is_busy_while_changes_keep_coming_and_not_after() {
        let mut recent = RecentChanges::new();
        recent.add(1);
        assert!(!recent.busy(), "a lone change, as from a wake-up");
        for _ in 0..6 {
            tokio::time::advance(Duration::from_millis(5)).await;
            recent.add(4);
        }
        assert!(recent.busy(), "25 changes within a window");
        tokio::time::advance(BUSY_WINDOW).await;
        recent.add(0);
        assert!(recent.busy(), "the window before still counts");
        tokio::time::advance(BUSY_WINDOW).await;
        recent.add(0);
        assert!(!recent.busy(), "two quiet windows");
        tokio::time::advance(10 * BUSY_WINDOW).await;
        recent.add(24);
        assert!(!recent.busy(), "a long pause forgets the window before it");
    }
}
