//! History: the outbox ranges replays read, read once and shared by every replay that needs them.
//!
//! After a restart or a network blip, hundreds of clients come back at once with positions from
//! the same few batches, and each must be given what it missed. Reading the outbox once per
//! client would cost clients × changes; this module makes it cost about the changes missed.
//!
//! A replay needs the changes between two snapshots, `from → to`. Snapshots are ordered in time
//! (a later one sees every transaction an earlier one saw, [`Snapshot::covers`]), and the changes
//! of a range are exactly those of its parts: `A → Z` is `A → X` then `X → Z` for any `X` between,
//! and, since everything in `A → X` committed before `X` was taken and everything in `X → Z`
//! after, the parts in turn are in commit order. Nor must a part be read for itself: the changes
//! of `C → Y` are those of a range `A → Z` around it whose transactions `Y` sees and `C` does not.
//!
//! So [`History::plan`] splits a replay's `from → to` at the ends of the ranges already known
//! here, and takes each part from a known range around it, filtered, or reads it as a range of
//! its own that later replays share. Ranges are read in [`Page`]s of at most [`PAGE_CHANGES`]
//! changes, several pages a query, on a pooled connection that is given back before anything is
//! sent to anyone: a replay waits for its client holding a page in memory, never a connection. Pages are
//! kept in a window bounded in bytes (least recently used go first) and read again if needed.
//! Concurrent requests for a page that is being read wait for that read.
//!
//! Exactly once and in order, then, comes down to three facts: the parts of a plan tile
//! `from → to` without overlap; a part's changes are filtered by visibility in its own two
//! snapshots; and within a page, changes are in commit-order key `(txn_last, id)` as the reader
//! sorts them. A replayed event's position names its part (`C~Y~id`), which is a valid batch of
//! its own, so a client that drops mid-replay resumes from it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use deadpool_postgres::Pool;
use tokio::sync::{OnceCell, Semaphore};

use crate::capture::outbox::{self, Change};
use crate::capture::position::Snapshot;
use crate::metrics::Metrics;
use crate::protocol::Frame;

/// Changes per page: what a replay holds in memory while its client reads.
pub const PAGE_CHANGES: usize = 1000;
/// Pages one query reads at most (the first is the one asked for; see [`History::read`]).
const PAGES_PER_READ: usize = 16;
/// Ranges remembered for planning (their pages may have been evicted and are read again).
const MAX_RANGES: usize = 512;

/// `$1` since, `$2` upto, `$3`/`$4` the commit-order key the read starts after, `$5` how many.
/// The columns are those of [`outbox::READ_BATCH`], so rows convert the same way; the retention
/// horizon comes first in every row, and alone in an empty page.
const READ_PAGE: &str = concat!(
    "SELECT $2::text, (h.horizon)::text, ",
    outbox::change_columns!(),
    r#"
FROM pgrelay.retention AS h
LEFT JOIN LATERAL (
    SELECT * FROM pgrelay.read_batch($1::text::pg_snapshot, $2::text::pg_snapshot) AS b
    WHERE (b.txn_last, b.id) > ($3::int8, $4::int8)
    ORDER BY b.txn_last, b.id
    LIMIT $5
) AS c ON true
ORDER BY c.txn_last, c.id
"#
);

/// One page of a range: up to [`PAGE_CHANGES`] changes in commit order.
pub struct Page {
    pub changes: Vec<Change>,
    /// Where the next page starts (after this key); `None`: the range ends here.
    pub next: Option<(i64, i64)>,
    /// Retention's horizon when the page was read: a part whose start is older may be missing
    /// changes removed before they were read.
    pub horizon: u64,
    bytes: usize,
    /// Event frames built for replays of this page, shared by the replays that send the same
    /// change, in the same part, room and visibility (most of a storm's clients): by change and
    /// visibility, then part and room.
    frames: Mutex<HashMap<(u32, u8), Vec<BuiltFrame>>>,
}

/// A frame built for a part (its key) and a room.
type BuiltFrame = (Arc<str>, String, Frame);

impl Page {
    /// The frame for change `ix` as seen with `visibility` in `room`, for a replay of `part`
    /// (whose key names it): built by `make` once, then shared.
    pub fn frame(
        &self,
        ix: u32,
        visibility: u8,
        part: &Arc<str>,
        room: &str,
        make: impl FnOnce() -> anyhow::Result<Frame>,
    ) -> anyhow::Result<Frame> {
        let lock = || self.frames.lock().unwrap_or_else(|p| p.into_inner());
        let find = |built: &[BuiltFrame]| {
            built
                .iter()
                .find(|(p, r, _)| p == part && r == room)
                .map(|(_, _, f)| f.clone())
        };
        if let Some(frame) = lock().get(&(ix, visibility)).and_then(|b| find(b)) {
            return Ok(frame);
        }
        let frame = make()?;
        let mut frames = lock();
        let built = frames.entry((ix, visibility)).or_default();
        if let Some(theirs) = find(built) {
            return Ok(theirs);
        }
        built.push((part.clone(), room.to_owned(), frame.clone()));
        Ok(frame)
    }
}

/// A range `since → upto` to read, and the part `keep_from → keep_to` of it a replay wants.
#[derive(Clone, Debug)]
pub struct Part {
    pub since: Snapshot,
    pub upto: Snapshot,
    pub keep_from: Snapshot,
    pub keep_to: Snapshot,
}

impl Part {
    /// What tells replays of the same part apart from others (their events' positions differ).
    pub fn key(&self) -> Arc<str> {
        format!("{}~{}", self.keep_from.to_pg(), self.keep_to.to_pg()).into()
    }

    /// Whether a change of the range (its transaction) belongs to the part.
    pub fn keeps(&self, xid: u64) -> bool {
        !self.keep_from.is_visible(xid) && self.keep_to.is_visible(xid)
    }
}

/// `a` and `b` see the same transactions: the same point in the history of commits.
fn same(a: &Snapshot, b: &Snapshot) -> bool {
    a.covers(b) && b.covers(a)
}

/// `a` strictly before `b`.
fn before(a: &Snapshot, b: &Snapshot) -> bool {
    b.covers(a) && !a.covers(b)
}

type PageKey = (String, String, Option<(i64, i64)>);

struct Slot {
    page: OnceCell<Arc<Page>>,
    used: AtomicU64,
}

#[derive(Default)]
struct Window {
    pages: HashMap<PageKey, Arc<Slot>>,
    /// Ranges read or being read, oldest first.
    ranges: Vec<(Snapshot, Snapshot)>,
    bytes: usize,
}

pub struct History {
    pool: Pool,
    /// The relay's budget of database work for replays, shared with their authorization.
    pub reads: Arc<Semaphore>,
    window: Mutex<Window>,
    max_bytes: usize,
    clock: AtomicU64,
    metrics: Arc<Metrics>,
}

impl History {
    pub fn new(pool: Pool, reads: usize, max_bytes: usize, metrics: Arc<Metrics>) -> History {
        History {
            pool,
            reads: Arc::new(Semaphore::new(reads.max(1))),
            window: Mutex::default(),
            max_bytes,
            clock: AtomicU64::new(0),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        // Maps and counters only: a panic elsewhere cannot leave them half-updated.
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Splits `from → to` into parts, in time order, each taken from a known range around it or
    /// read as a new range (which is then known). Nothing is read yet.
    pub fn plan(&self, from: &Snapshot, to: &Snapshot) -> Vec<Part> {
        let mut window = self.lock();
        let mut parts = Vec::new();
        let mut at = from.clone();
        while before(&at, to) {
            // A known range that holds the next stretch: `since ≤ at < upto`.
            let around = window
                .ranges
                .iter()
                .filter(|(since, upto)| at.covers(since) && before(&at, upto))
                .max_by(|a, b| latest(&a.1, &b.1))
                .cloned();
            let part = match around {
                Some((since, upto)) => {
                    let end = if to.covers(&upto) {
                        upto.clone()
                    } else {
                        to.clone()
                    };
                    Part {
                        since,
                        upto,
                        keep_from: at.clone(),
                        keep_to: end,
                    }
                }
                None => {
                    // Up to the next known start, so the stretch after it is shared.
                    let end = window
                        .ranges
                        .iter()
                        .map(|(since, _)| since)
                        .filter(|since| before(&at, since) && before(since, to))
                        .min_by(|a, b| latest(a, b))
                        .cloned()
                        .unwrap_or_else(|| to.clone());
                    window.ranges.push((at.clone(), end.clone()));
                    if window.ranges.len() > MAX_RANGES {
                        window.ranges.remove(0);
                    }
                    Part {
                        since: at.clone(),
                        upto: end.clone(),
                        keep_from: at.clone(),
                        keep_to: end,
                    }
                }
            };
            at = part.keep_to.clone();
            parts.push(part);
        }
        parts
    }

    /// The page of `since → upto` that starts after `after` (`None`: the first): from the
    /// window, from a read already under way, or read now.
    pub async fn page(
        &self,
        since: &Snapshot,
        upto: &Snapshot,
        after: Option<(i64, i64)>,
    ) -> anyhow::Result<Arc<Page>> {
        let key: PageKey = (since.to_pg(), upto.to_pg(), after);
        let slot = {
            let mut window = self.lock();
            window
                .pages
                .entry(key.clone())
                .or_insert_with(|| {
                    Arc::new(Slot {
                        page: OnceCell::new(),
                        used: AtomicU64::new(0),
                    })
                })
                .clone()
        };
        slot.used.store(
            self.clock.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
        if let Some(page) = slot.page.get() {
            self.metrics.replay_pages_shared.inc();
            return Ok(page.clone());
        }
        let mut fresh = false;
        let page = slot
            .page
            .get_or_try_init(|| {
                fresh = true;
                self.read(&key, after)
            })
            .await?
            .clone();
        if fresh {
            self.keep(&key, page.bytes);
        } else {
            self.metrics.replay_pages_shared.inc();
        }
        Ok(page)
    }

    /// Reads the page of `key` and, in the same query, up to [`PAGES_PER_READ`] - 1 pages after
    /// it, which go into the window for the replays that come next: the query sorts the whole
    /// range whatever its limit, so reading a long range a page per query would sort it again
    /// for every page.
    async fn read(&self, key: &PageKey, after: Option<(i64, i64)>) -> anyhow::Result<Arc<Page>> {
        let permit = self
            .reads
            .acquire()
            .await
            .context("the relay is stopping")?;
        let db = self.pool.get().await.context("no database connection")?;
        let statement = db.prepare_cached(READ_PAGE).await?;
        let (after_txn, after_id) = after.unwrap_or((i64::MIN, i64::MIN));
        let limit = (PAGE_CHANGES * PAGES_PER_READ) as i64;
        let rows = db
            .query(&statement, &[&key.0, &key.1, &after_txn, &after_id, &limit])
            .await
            .context("reading the outbox for a replay")?;
        // The connection goes back to the pool here, before anyone waits for a client.
        drop(db);
        drop(permit);
        let horizon: &str = rows
            .first()
            .context("the replay read returned no row")?
            .try_get(1)?;
        let horizon = horizon.parse().context("unreadable retention horizon")?;
        let mut changes = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some(change) = outbox::change_from_row(row)? {
                changes.push(change);
            }
        }
        self.metrics.replay_changes_read.add(changes.len() as u64);
        // The range goes on past what was read only if the read was cut at its limit.
        let more = changes.len() as i64 == limit;
        let mut pages = Vec::new();
        let mut rest = changes.into_iter().peekable();
        while rest.peek().is_some() || pages.is_empty() {
            let chunk: Vec<Change> = rest.by_ref().take(PAGE_CHANGES).collect();
            let last = rest.peek().is_none();
            let next = if last && !more {
                None
            } else {
                chunk.last().map(|c| (c.txn_last, c.id))
            };
            let bytes = chunk.iter().map(change_bytes).sum::<usize>() + 64;
            pages.push(Arc::new(Page {
                changes: chunk,
                next,
                horizon,
                bytes,
                frames: Mutex::default(),
            }));
        }
        self.metrics.replay_pages_read.add(pages.len() as u64);
        let mut pages = pages.into_iter();
        let first = pages.next().context("a read makes a page")?;
        // The pages after the first: ready for whoever asks for them.
        let mut start = first.next;
        for page in pages {
            let Some(after) = start else { break };
            start = page.next;
            let later: PageKey = (key.0.clone(), key.1.clone(), Some(after));
            let bytes = page.bytes;
            let fresh = {
                let mut window = self.lock();
                let slot = window.pages.entry(later.clone()).or_insert_with(|| {
                    Arc::new(Slot {
                        page: OnceCell::new(),
                        used: AtomicU64::new(self.clock.fetch_add(1, Ordering::Relaxed)),
                    })
                });
                slot.page.set(page).is_ok()
            };
            if fresh {
                self.keep(&later, bytes);
            }
        }
        Ok(first)
    }

    /// Counts a page read into the window, evicting the least recently used ones past the budget.
    fn keep(&self, key: &PageKey, bytes: usize) {
        let mut window = self.lock();
        window.bytes += bytes;
        while window.bytes > self.max_bytes && window.pages.len() > 1 {
            let oldest = window
                .pages
                .iter()
                .filter(|(k, slot)| *k != key && slot.page.initialized())
                .min_by_key(|(_, slot)| slot.used.load(Ordering::Relaxed))
                .map(|(k, _)| k.clone());
            let Some(oldest) = oldest else { break };
            if let Some(slot) = window.pages.remove(&oldest) {
                window.bytes -= slot.page.get().map_or(0, |p| p.bytes);
            }
        }
    }

    /// Bytes of pages in the window.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

/// Orders snapshots by time, for picking the latest or earliest of several.
fn latest(a: &Snapshot, b: &Snapshot) -> std::cmp::Ordering {
    if same(a, b) {
        std::cmp::Ordering::Equal
    } else if b.covers(a) {
        std::cmp::Ordering::Less
    } else {
        std::cmp::Ordering::Greater
    }
}

/// What a change costs the window, about.
fn change_bytes(change: &Change) -> usize {
    let old = change.old.as_ref().map_or(0, |o| o.get().len());
    change.row.get().len() + old + change.table.len() + change.ts.len() + 160
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(text: &str) -> Snapshot {
        Snapshot::from_pg(text).expect("snapshot")
    }

    fn history() -> History {
        let config: tokio_postgres::Config = "host=localhost".parse().expect("config");
        let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
        let pool = Pool::builder(manager)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .expect("pool");
        History::new(pool, 1, 1 << 20, Arc::default())
    }

    fn ends(parts: &[Part]) -> Vec<(String, String, String, String)> {
        parts
            .iter()
            .map(|p| {
                (
                    p.since.to_pg(),
                    p.upto.to_pg(),
                    p.keep_from.to_pg(),
                    p.keep_to.to_pg(),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn plans_tile_the_range_and_share_what_is_known() {
        let history = history();
        let (a, b, c, d) = (
            snap("10:10:"),
            snap("20:20:"),
            snap("30:30:"),
            snap("40:40:"),
        );
        // Nothing known: one range of its own.
        let first = history.plan(&b, &d);
        assert_eq!(ends(&first), ends(&[part(&b, &d, &b, &d)]));
        // Earlier start: its own range up to the known start, then the known one.
        let second = history.plan(&a, &d);
        assert_eq!(
            ends(&second),
            ends(&[part(&a, &b, &a, &b), part(&b, &d, &b, &d)])
        );
        // Inside a known range: a filtered part of it, nothing new.
        let third = history.plan(&c, &d);
        assert_eq!(ends(&third), ends(&[part(&b, &d, &c, &d)]));
        let inner = history.plan(&b, &c);
        assert_eq!(ends(&inner), ends(&[part(&b, &d, &b, &c)]));
        assert!(history.plan(&d, &d).is_empty(), "nothing to replay");
        assert_eq!(history.lock().ranges.len(), 2);
    }

    fn part(since: &Snapshot, upto: &Snapshot, from: &Snapshot, to: &Snapshot) -> Part {
        Part {
            since: since.clone(),
            upto: upto.clone(),
            keep_from: from.clone(),
            keep_to: to.clone(),
        }
    }

    #[test]
    fn a_part_keeps_what_its_own_snapshots_tell_apart() {
        // 25 was still running when `keep_from` was taken and committed before `keep_to`.
        let p = part(
            &snap("10:10:"),
            &snap("40:40:"),
            &snap("25:30:25"),
            &snap("40:40:"),
        );
        assert!(p.keeps(25) && p.keeps(35));
        assert!(!p.keeps(24) && !p.keeps(27) && !p.keeps(12) && !p.keeps(40));
    }
}
