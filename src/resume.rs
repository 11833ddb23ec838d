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
//! 3. **Replay** what lies between: the rest of `P`'s own batch, then `P → J`, for the client's
//!    rooms, authorized as the user is *now*, in commit order. Then the held-back live changes
//!    follow ([`crate::rooms::Hub::finish_replay`]).
//!
//! Replays are served by [`Replays`], on a budget of their own, so that a storm of them (every
//! client of a restarted relay coming back at once) or a user who opens replays and never reads
//! them costs everyone else nothing:
//!
//! * **Shared reads.** The outbox is read through [`crate::history`]: one read of a range serves
//!   every replay that needs it, and replays waiting on the same page are authorized together,
//!   one policy query for all of their users (as the live path does for a room).
//! * **No connection held while waiting for a client.** A page is read, the connection given
//!   back, and only then is anything sent.
//! * **Bounded.** At most `reads` replay queries run at once relay-wide (the rest of the pool is
//!   for joins and live delivery), at most `running` replays are served at once, and at most
//!   `per_user` of one user's; the others wait their turn in arrival order (the client has its
//!   `joined` and simply receives the replay later). Nothing fails for being over budget.
//! * **A slow consumer like any other.** A replay is paced to what its client reads; a client
//!   that takes nothing for `stall` is closed with 4008 and resumes later from its last id.
//!
//! Replayed events carry positions naming the part of the history they were read from (see
//! [`crate::history`]), so a client that drops again during the replay resumes from any of them
//! without loss or repeats.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::Pool;
use tokio::sync::{oneshot, OnceCell, OwnedSemaphorePermit, Semaphore};

use crate::authorize::Authorizer;
use crate::backoff::Backoff;
use crate::capture::position::{Position, PositionCodec, Seen, Snapshot};
use crate::config::ReplayBudget;
use crate::fanout::{event_frame, Visibility};
use crate::history::{History, Page, Part};
use crate::jwt::Principal;
use crate::metrics::Metrics;
use crate::protocol::{Frame, Room};
use crate::queue::ClientHandle;
use crate::rooms::Hub;

/// What a position means here and now.
#[derive(Debug, Clone)]
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
    pub client: Arc<ClientHandle>,
    pub principal: Arc<Principal>,
    pub rooms: Vec<Room>,
    pub seen: Seen,
    /// The position the client joined at: live delivery starts after it.
    pub until: Snapshot,
    /// The membership this replay serves (see `Hub::join`).
    pub join_id: u64,
}

/// How often a failed replay read or authorization is tried before the client is told
/// (`left`, `replay_failed`), and the pauses between tries (see [`crate::backoff`]): together
/// several seconds, about what a database restart takes.
const ATTEMPTS: u32 = 10;
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LONGEST_RETRY: Duration = Duration::from_secs(2);

/// Replayed frames are queued this many bytes at a time, or a quarter of the client's queue if
/// that is less (each batch takes the hub's lock once).
const BATCH_BYTES: usize = 64 * 1024;

/// Frames of a replay waiting to be queued, with their rooms.
#[derive(Default)]
struct Batch {
    frames: Vec<(Room, Frame)>,
    bytes: usize,
}

/// Serves every replay of a relay (see the module comment).
pub struct Replays {
    pub history: History,
    authorizer: Authorizer,
    hub: Arc<Hub>,
    codec: PositionCodec,
    metrics: Arc<Metrics>,
    budget: ReplayBudget,
    running: Arc<Semaphore>,
    users: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Authorization requests waiting for a query, by page (see [`Replays::judge`]).
    judging: Arc<Mutex<HashMap<usize, Vec<Ask>>>>,
    /// Positions resolved in the last [`RESOLVED_FOR`], or being resolved (see
    /// [`Replays::resolve`]).
    resolved: Mutex<HashMap<String, Resolving>>,
    pool: Pool,
}

/// A resolution shared by the joins that asked for the same position at about the same time.
struct Resolving {
    at: std::time::Instant,
    answer: Arc<OnceCell<Resolution>>,
}

/// How long a resolution is reused. Clients of one room come back with the same last id, and
/// a storm of them should cost one lookup, not one each. Retention moving meanwhile is caught
/// by the replay, which checks every page it reads.
const RESOLVED_FOR: Duration = Duration::from_secs(1);
/// Resolutions remembered at most (older ones are dropped first when over).
const MAX_RESOLVED: usize = 10_000;

/// One replay's question about a page: which of these changes may its user read?
struct Ask {
    principal: Arc<Principal>,
    changes: Vec<u32>,
    answer: oneshot::Sender<anyhow::Result<Vec<Option<Visibility>>>>,
}

impl Replays {
    /// `pool` for short statements (resolving positions), `read_pool` for outbox reads.
    pub fn new(
        pool: Pool,
        read_pool: Pool,
        authorizer: Authorizer,
        hub: Arc<Hub>,
        codec: PositionCodec,
        metrics: Arc<Metrics>,
        budget: ReplayBudget,
    ) -> Replays {
        Replays {
            history: History::new(
                read_pool,
                budget.reads,
                budget.window_bytes,
                metrics.clone(),
            ),
            authorizer,
            hub,
            codec,
            metrics,
            running: Arc::new(Semaphore::new(budget.running.max(1))),
            budget,
            users: Mutex::default(),
            judging: Arc::default(),
            resolved: Mutex::default(),
            pool,
        }
    }

    /// [`resolve`], shared by the joins that bring the same position within [`RESOLVED_FOR`].
    pub async fn resolve(&self, position: &Position) -> Result<Resolution, ResolveError> {
        let key = position.to_string();
        let answer = {
            let mut resolved = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
            let now = std::time::Instant::now();
            if resolved.len() >= MAX_RESOLVED {
                resolved.retain(|_, r| now.duration_since(r.at) < RESOLVED_FOR);
            }
            let fresh = |r: &Resolving| now.duration_since(r.at) < RESOLVED_FOR;
            match resolved.get(&key) {
                Some(r) if fresh(r) => r.answer.clone(),
                _ => {
                    let answer = Arc::new(OnceCell::new());
                    let resolving = Resolving {
                        at: now,
                        answer: answer.clone(),
                    };
                    resolved.insert(key, resolving);
                    answer
                }
            }
        };
        answer
            .get_or_try_init(|| resolve(&self.pool, position))
            .await
            .cloned()
    }

    /// Starts the replay on its own task. On failure the client is told its rooms' replay failed
    /// (`left`, reason `replay_failed`), and it resumes again with its last id.
    pub fn start(self: &Arc<Self>, replay: Replay) {
        let replays = self.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let replayed = replays.run(&replay).await;
            // From the join to the hand-over to live delivery, waiting for a turn included.
            replays.metrics.replay_seconds.observe(started.elapsed());
            if let Err(err) = replayed {
                tracing::warn!(error = %format!("{err:#}"), "replay failed; the client must resume again");
                replays.metrics.replay_failures.inc();
                for room in &replay.rooms {
                    replays.hub.end_membership(
                        room,
                        replay.client.id,
                        replay.join_id,
                        "replay_failed",
                    );
                }
            }
        });
    }

    async fn run(&self, replay: &Replay) -> anyhow::Result<()> {
        self.metrics.replays_waiting.inc();
        let turn = self.wait_for_turn(replay).await;
        self.metrics.replays_waiting.dec();
        let Some(_turn) = turn else {
            return Ok(()); // the client went away while waiting
        };
        self.metrics.replays_running.inc();
        let served = self.serve(replay).await;
        self.metrics.replays_running.dec();
        if served? {
            self.hub
                .finish_replay(&replay.rooms, &replay.client, replay.join_id)
                .await;
        }
        Ok(())
    }

    /// A turn within the user's and the relay's budget, in arrival order; `None` if the client
    /// goes away first.
    async fn wait_for_turn(&self, replay: &Replay) -> Option<Turn<'_>> {
        let user = replay.principal.user.clone();
        let mine = {
            let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
            users
                .entry(user.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(self.budget.per_user.max(1))))
                .clone()
        };
        let mut turn = Turn {
            replays: self,
            user,
            permits: Vec::new(),
        };
        for semaphore in [mine, self.running.clone()] {
            let acquire = semaphore.acquire_owned();
            tokio::pin!(acquire);
            loop {
                tokio::select! {
                    permit = &mut acquire => {
                        turn.permits.push(permit.ok()?);
                        break;
                    }
                    () = tokio::time::sleep(Duration::from_millis(100)) => {
                        if replay.client.is_closing() {
                            return None;
                        }
                    }
                }
            }
        }
        Some(turn)
    }

    /// Sends what the client missed; false if the replay ended early (the client went away,
    /// left the rooms, or stalled and is being closed).
    async fn serve(&self, replay: &Replay) -> anyhow::Result<bool> {
        let seen = &replay.seen;
        // The rest of the client's batch, then everything up to the join position.
        let mut stretches = Vec::new();
        match &seen.within {
            Some((upto, _)) => {
                stretches.push((seen.since.clone(), upto.clone()));
                stretches.push((upto.clone(), replay.until.clone()));
            }
            None => stretches.push((seen.since.clone(), replay.until.clone())),
        }
        for (from, to) in stretches {
            for part in self.history.plan(&from, &to) {
                if !self.serve_part(replay, &part).await? {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    async fn serve_part(&self, replay: &Replay, part: &Part) -> anyhow::Result<bool> {
        let key = part.key();
        let mut after = None;
        loop {
            let page = retried(|| self.history.page(&part.since, &part.upto, after)).await?;
            // Retention may have moved since the position was checked.
            anyhow::ensure!(
                part.keep_from.xmin() >= page.horizon,
                "the position fell out of retention during the replay"
            );
            let wanted: Vec<u32> = page
                .changes
                .iter()
                .enumerate()
                .filter(|(_, c)| {
                    part.keeps(c.xid)
                        && !replay.seen.contains(c.xid, (c.txn_last, c.id))
                        && replay
                            .rooms
                            .iter()
                            .any(|r| c.rooms.iter().any(|c| c == r.as_str()))
                })
                .map(|(i, _)| i as u32)
                .collect();
            if !wanted.is_empty() {
                let visible =
                    retried(|| self.judge(&page, &replay.principal, wanted.clone())).await?;
                let mut batch = Batch::default();
                for (&ix, visibility) in wanted.iter().zip(visible) {
                    let Some(visibility) = visibility else {
                        continue;
                    };
                    self.frames(replay, part, &key, &page, ix, visibility, &mut batch)?;
                    let full = batch.bytes >= BATCH_BYTES.min(replay.client.max_queued_bytes() / 4);
                    if full && !self.flush(replay, &mut batch).await {
                        return Ok(false);
                    }
                }
                if !self.flush(replay, &mut batch).await {
                    return Ok(false);
                }
            }
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(true),
            }
        }
    }

    /// Adds the frames of one change to `batch`, one for each of the client's rooms it is in.
    #[allow(clippy::too_many_arguments)]
    fn frames(
        &self,
        replay: &Replay,
        part: &Part,
        key: &Arc<str>,
        page: &Page,
        ix: u32,
        visibility: Visibility,
        batch: &mut Batch,
    ) -> anyhow::Result<()> {
        let change = &page.changes[ix as usize];
        let mut id = None;
        for room in replay
            .rooms
            .iter()
            .filter(|r| change.rooms.iter().any(|c| c == r.as_str()))
        {
            let frame = page.frame(ix, visibility as u8, key, room.as_str(), || {
                let id = id.get_or_insert_with(|| {
                    self.codec.seal(&Position::Within {
                        since: part.keep_from.clone(),
                        upto: part.keep_to.clone(),
                        change_id: change.id,
                    })
                });
                event_frame(room.as_str(), id, change, visibility)
            })?;
            batch.bytes += frame.len();
            batch.frames.push((room.clone(), frame));
        }
        Ok(())
    }

    /// Queues the batch, paced to what the client reads, under one hold of the hub's lock (the
    /// live path takes it too). False if the replay must end: the client went away, left a
    /// room, or read nothing for `stall` (it is then closed as too slow).
    async fn flush(&self, replay: &Replay, batch: &mut Batch) -> bool {
        if batch.frames.is_empty() {
            return true;
        }
        let bytes = std::mem::take(&mut batch.bytes);
        let frames = std::mem::take(&mut batch.frames);
        let paced = tokio::time::timeout(self.budget.stall, replay.client.wait_for_room(bytes));
        if paced.await.is_err() {
            self.metrics.replay_stalls.inc();
            replay.client.close_too_slow();
            return false;
        }
        let count = frames.len() as u64;
        if replay.client.is_closing()
            || !self
                .hub
                .replay_send_all(&replay.client, replay.join_id, frames)
        {
            return false;
        }
        self.metrics.events_delivered.add(count);
        true
    }

    /// Which of `changes` (indexes into the page) the user may read, and how. Replays asking
    /// about the same page at about the same time share one query: the first one's request
    /// waits for a turn of the read budget, and whoever asks meanwhile is answered with it.
    async fn judge(
        &self,
        page: &Arc<Page>,
        principal: &Arc<Principal>,
        changes: Vec<u32>,
    ) -> anyhow::Result<Vec<Option<Visibility>>> {
        let (answer, answered) = oneshot::channel();
        let key = Arc::as_ptr(page) as usize;
        let first = {
            let mut judging = self.judging.lock().unwrap_or_else(|p| p.into_inner());
            let asks = judging.entry(key).or_default();
            asks.push(Ask {
                principal: principal.clone(),
                changes,
                answer,
            });
            asks.len() == 1
        };
        if first {
            // On a task of its own: the others wait on it, whatever becomes of this replay.
            tokio::spawn(judge_together(
                self.authorizer.clone(),
                self.history.reads.clone(),
                self.judging.clone(),
                page.clone(),
            ));
        }
        answered
            .await
            .context("the authorization of a replay was dropped")?
    }
}

/// Answers every [`Ask`] about `page` that arrived until the read budget gave it a turn, with
/// one policy query.
async fn judge_together(
    authorizer: Authorizer,
    reads: Arc<Semaphore>,
    judging: Arc<Mutex<HashMap<usize, Vec<Ask>>>>,
    page: Arc<Page>,
) {
    let key = Arc::as_ptr(&page) as usize;
    let permit = reads.acquire_owned().await;
    // Let the replays woken with this one ask too.
    tokio::task::yield_now().await;
    let asks = judging
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&key)
        .unwrap_or_default();
    if permit.is_err() {
        return; // the relay is stopping: the askers see their answer dropped
    }
    let principals: Vec<Arc<Principal>> = asks.iter().map(|a| a.principal.clone()).collect();
    let pairs: Vec<(u32, u32)> = asks
        .iter()
        .enumerate()
        .flat_map(|(p, ask)| ask.changes.iter().map(move |&c| (c, p as u32)))
        .collect();
    let verdicts = authorizer
        .readers_of_past(&page.changes, &principals, &pairs)
        .await;
    drop(permit);
    match verdicts {
        Ok(verdicts) => {
            let visible: HashMap<(u32, u32), Visibility> = verdicts
                .verdicts
                .iter()
                .filter_map(|v| Visibility::of(v).map(|vis| ((v.change, v.principal), vis)))
                .collect();
            for (p, ask) in asks.into_iter().enumerate() {
                let answer = ask
                    .changes
                    .iter()
                    .map(|&c| visible.get(&(c, p as u32)).copied())
                    .collect();
                let _ = ask.answer.send(Ok(answer));
            }
        }
        Err(err) => {
            for ask in asks {
                let _ = ask.answer.send(Err(anyhow::anyhow!("{err:#}")));
            }
        }
    }
}

/// A replay's place in the budget; gives it back when dropped.
struct Turn<'a> {
    replays: &'a Replays,
    user: String,
    permits: Vec<OwnedSemaphorePermit>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.permits.clear();
        // Forget the user's semaphore once nobody holds or waits for it (each holds a clone).
        let mut users = self.replays.users.lock().unwrap_or_else(|p| p.into_inner());
        if users
            .get(&self.user)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            users.remove(&self.user);
        }
    }
}

/// Runs `attempt` until it succeeds, [`ATTEMPTS`] times at most, pausing longer each time: a
/// database restart or a broken connection should cost a replay a moment, not the client a
/// failure it must handle.
async fn retried<T, F, Fut>(mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut backoff = Backoff::new(FIRST_RETRY, LONGEST_RETRY);
    let mut tries = 1;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(err) if tries >= ATTEMPTS => return Err(err),
            Err(err) => {
                tracing::debug!(error = %format!("{err:#}"), "a replay query failed; retrying");
                tokio::time::sleep(backoff.next_wait()).await;
                tries += 1;
            }
        }
    }
}
