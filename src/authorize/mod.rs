//! Authorization: the database decides who may see what.
//!
//! The rules are SQL functions (`pgrelay.can_read`, `pgrelay.can_join`; see `sql/pgrelay.sql`), so a
//! DBA changes them without touching the relay. The relay's job is to ask efficiently: one query
//! answers a whole chunk of changes for every user listening in their rooms, sent as parallel
//! arrays of (change, user) pairs. Policies are evaluated on the change's own row, as it was
//! written, and on current memberships, so a revoked user stops receiving at once.
//!
//! For an UPDATE the policy is asked twice, about the new row and about the old one, because a
//! change can move a row into or out of a user's view (a task made private, moved to another
//! project). [`Verdict`] carries both answers; [`crate::fanout`] turns them into events.
//!
//! One policy evaluation failing (say, a claim or a column the function cannot cast) must not stop
//! delivery to anyone else. When the batched query fails with an error from a policy, the relay
//! splits the (change, user) pairs in halves until it has found the failing ones, denies exactly
//! those, and logs them; everybody else receives their changes.
//!
//! Most answers repeat: [`cache`] remembers them per user and kind of row, for tables whose policy
//! declared what it reads, and forgets them when a change they depend on comes through the outbox.
//! Only what it does not know goes to the database.
//!
//! Joins are batched too: join checks queue up while the previous queries run and are answered
//! together (`pgrelay.can_join` over arrays), so a thousand clients reconnecting at once cost a
//! handful of queries. If a batch fails, its checks are retried one by one, so a policy that
//! throws for one user fails only that user's join.

pub mod cache;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use anyhow::Context;
use deadpool_postgres::Pool;
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::capture::outbox::Change;
use crate::jwt::Principal;
use crate::metrics::Metrics;
use crate::protocol::Room;
use crate::rooms::Membership;
use cache::VerdictCache;

/// What one user may see of one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub change: u32,
    pub principal: u32,
    /// May read the row as it is now (the old row for a DELETE).
    pub sees_new: bool,
    /// UPDATE: could read the row as it was before.
    pub sees_old: bool,
    /// UPDATE: the change recorded old values, so `sees_old` was actually evaluated.
    pub knows_old: bool,
}

/// `$6`: per change, whether the old version needs its own evaluation (otherwise it shares the
/// new one's answer: an UPDATE that left the policy's declared columns alone).
///
/// Each `OFFSET 0` is a fence. The inner one keeps the pairs joined before any policy runs:
/// without it the planner may push `sees_new OR sees_old` below the join with the pairs and
/// evaluate every policy for every user with every change of the chunk, twenty times the calls
/// the pairs need. The outer one keeps `sees_new` evaluated once although it is used twice.
static READERS: LazyLock<String> =
    LazyLock::new(|| readers_query("pgrelay.can_read", "false", "sees_new OR sees_old"));

/// [`READERS`] with each policy call guarded (`pgrelay.can_read_guarded`): a policy that raises
/// an error answers with its SQLSTATE instead of failing the whole query, so one query tells
/// every failing pair of a chunk apart. The guard costs a subtransaction per call, so it is only
/// asked after [`READERS`] failed. Answers are `'t'`, `'f'` or a SQLSTATE; a statement timeout is
/// not caught (it cancels the statement, whose answers are then found by halving).
static READERS_GUARDED: LazyLock<String> = LazyLock::new(|| {
    readers_query(
        "pgrelay.can_read_guarded",
        "'f'",
        "sees_new <> 'f' OR sees_old <> 'f'",
    )
});

/// The verdict query with `policy` as the policy call, `no` as its "no", and `answered` as what
/// makes a pair worth returning.
fn readers_query(policy: &str, no: &str, answered: &str) -> String {
    format!(
        r#"
SELECT change_ix, principal_ix, sees_new, sees_old, knows_old
FROM (
    SELECT v.change_ix, v.principal_ix, v.knows_old, v.sees_new,
           CASE WHEN NOT v.knows_old THEN {no}
                WHEN v.judge_old THEN {policy}(v.tbl, v.user_id, v.claims, v."row" || v.old)
                ELSE v.sees_new
           END AS sees_old
    FROM (
        SELECT x.*, {policy}(x.tbl, x.user_id, x.claims, x."row") AS sees_new
        FROM (
            SELECT p.change_ix, p.principal_ix, c.tbl, c."row", c.old, u.user_id, u.claims,
                   ch.judge_old, (c.op = 'UPDATE' AND c.old IS NOT NULL AND c.old <> '{{}}') AS knows_old
            FROM unnest($1::int4[], $2::int4[]) AS p(change_ix, principal_ix)
            JOIN unnest($3::int8[], $6::bool[]) WITH ORDINALITY AS ch(change_id, judge_old, ix)
              ON ch.ix = p.change_ix
            JOIN pgrelay.changes AS c ON c.id = ch.change_id
            JOIN unnest($4::text[], $5::jsonb[]) WITH ORDINALITY AS u(user_id, claims, ix)
              ON u.ix = p.principal_ix
            OFFSET 0
        ) AS x
        OFFSET 0
    ) AS v
) AS answers
WHERE {answered}
"#
    )
}

#[derive(Clone)]
pub struct Authorizer {
    pool: Pool,
    /// Join checks wait here for the next batch (see [`batch_joins`]).
    joins: mpsc::UnboundedSender<JoinCheck>,
    cache: Arc<VerdictCache>,
    metrics: Arc<Metrics>,
}

/// The verdicts for a chunk, and which (change, principal) pairs the database judged for it.
/// The others were remembered answers, and a remembered denial for an UPDATE that left what the
/// policy reads alone says nothing new about the member's access (see [`crate::fanout`]).
pub struct Verdicts {
    pub verdicts: Vec<Verdict>,
    pub judged: FxHashSet<(u32, u32)>,
    /// A query for this chunk ran past the statement timeout: the caller should hand over fewer
    /// changes at a time for a while.
    pub timed_out: bool,
}

/// A join to check, and where to send the answer.
struct JoinCheck {
    principal: Arc<Principal>,
    room: Room,
    answer: oneshot::Sender<anyhow::Result<bool>>,
}

/// Join checks answered by one query at most, and such queries running at once.
const MAX_JOIN_BATCH: usize = 500;
const JOIN_BATCHES_IN_FLIGHT: usize = 2;

impl Authorizer {
    /// An authorizer on `pool`; starts the task that batches join checks (it ends with the last
    /// clone of the authorizer).
    pub fn new(pool: Pool, metrics: Arc<Metrics>) -> Authorizer {
        let (joins, pending) = mpsc::unbounded_channel();
        tokio::spawn(batch_joins(pool.clone(), pending));
        Authorizer {
            pool,
            joins,
            cache: Arc::default(),
            metrics,
        }
    }

    /// May this user join this room? Concurrent joins share one policy query: a burst of
    /// reconnecting clients costs Postgres a few queries, not one per join.
    pub async fn can_join(&self, principal: &Arc<Principal>, room: &Room) -> anyhow::Result<bool> {
        let (answer, answered) = oneshot::channel();
        let check = JoinCheck {
            principal: principal.clone(),
            room: room.clone(),
            answer,
        };
        self.joins
            .send(check)
            .map_err(|_| anyhow::anyhow!("the relay is stopping"))?;
        answered
            .await
            .map_err(|_| anyhow::anyhow!("the join check was dropped"))?
    }

    /// For each membership: may its user still join the room? One query for all.
    pub async fn still_allowed(&self, checks: &[Membership]) -> anyhow::Result<Vec<bool>> {
        let asks: Vec<(&str, &Principal)> = checks
            .iter()
            .map(|c| (c.room.as_str(), &*c.principal))
            .collect();
        join_answers(&self.pool, &asks).await
    }

    /// Evaluates the read policy for each `(change index, principal index)` pair (0-based) and
    /// returns the pairs that see something: from memory where it can, from the database for
    /// the rest.
    pub async fn readers(
        &self,
        changes: &[Change],
        principals: &[Arc<Principal>],
        pairs: &[(u32, u32)],
    ) -> anyhow::Result<Verdicts> {
        // What any of these changes makes stale must not judge the changes that follow it.
        let forgotten = self.cache.flush(changes);
        self.metrics.policy_invalidations.add(forgotten as u64);
        self.judge(changes, principals, pairs).await
    }

    /// [`Authorizer::readers`] for changes the live path has already passed (a replay's): every
    /// answer remembered now was computed after they committed, so they make none stale, and
    /// forgetting answers for them would only cost live delivery its remembered answers.
    pub async fn readers_of_past(
        &self,
        changes: &[Change],
        principals: &[Arc<Principal>],
        pairs: &[(u32, u32)],
    ) -> anyhow::Result<Verdicts> {
        self.judge(changes, principals, pairs).await
    }

    async fn judge(
        &self,
        changes: &[Change],
        principals: &[Arc<Principal>],
        pairs: &[(u32, u32)],
    ) -> anyhow::Result<Verdicts> {
        let recalled = self.cache.recall(changes, principals, pairs);
        self.metrics
            .policy_answers_remembered
            .add((pairs.len() - recalled.unknown.len()) as u64);
        self.metrics
            .policy_answers_asked
            .add(recalled.unknown.len() as u64);
        let questions = Questions::of(changes, &recalled.unknown);
        let mut isolation = Isolation::default();
        let answered = if questions.distinct.is_empty() {
            Vec::new()
        } else {
            self.isolating(changes, principals, &questions.distinct, &mut isolation)
                .await?
        };
        let (answered, failed) = questions.spread(&recalled.unknown, answered, &isolation.failed);
        self.metrics.policy_errors.add(failed.len() as u64);
        self.cache
            .remember(&recalled, changes, &recalled.unknown, &answered, &failed);
        let judged = recalled.unknown.iter().copied().collect();
        let mut verdicts = recalled.verdicts;
        verdicts.extend(answered);
        Ok(Verdicts {
            verdicts,
            judged,
            timed_out: isolation.timed_out,
        })
    }

    /// Runs the query; when it fails for any reason but a lost database, narrows the failure
    /// down to the pairs that cause it. First one guarded query, which answers every pair whose
    /// policy raised an error with that error; then, if that fails too (a statement timeout is
    /// not something a policy can catch), halves, each asked the same way, down to single
    /// pairs. The failing pairs are denied, logged and added to `isolation`; everyone else gets
    /// their verdicts. Each step asks about fewer pairs, so this always ends: a pair that keeps
    /// failing costs at most one query per halving, never a retry of the chunk.
    fn isolating<'a>(
        &'a self,
        changes: &'a [Change],
        principals: &'a [Arc<Principal>],
        pairs: &'a [(u32, u32)],
        isolation: &'a mut Isolation,
    ) -> futures_util::future::BoxFuture<'a, anyhow::Result<Vec<Verdict>>> {
        Box::pin(async move {
            let err = match self.query(changes, principals, pairs).await {
                Ok(verdicts) => return Ok(verdicts),
                Err(err) if is_connection_failure(&err) => return Err(err),
                Err(err) => err,
            };
            isolation.timed_out |= is_timeout(&err);
            if let [pair] = pairs {
                self.withhold(changes, principals, *pair, &sqlstate(&err), isolation);
                return Ok(Vec::new());
            }
            if !is_timeout(&err) {
                match self.query_guarded(changes, principals, pairs).await {
                    Ok((verdicts, failures)) => {
                        for (pair, code) in failures {
                            self.withhold(changes, principals, pair, &code, isolation);
                        }
                        return Ok(verdicts);
                    }
                    Err(err) if is_connection_failure(&err) => return Err(err),
                    // A library without the guard (not upgraded yet), or a timeout: halve.
                    Err(err) => isolation.timed_out |= is_timeout(&err),
                }
            }
            let (left, right) = pairs.split_at(pairs.len() / 2);
            let mut verdicts = self.isolating(changes, principals, left, isolation).await?;
            verdicts.extend(
                self.isolating(changes, principals, right, isolation)
                    .await?,
            );
            Ok(verdicts)
        })
    }

    /// Denies one pair whose policy failed, and says so: which table, operation, change and
    /// user, and the SQLSTATE. Never the error's message, which may quote the row.
    fn withhold(
        &self,
        changes: &[Change],
        principals: &[Arc<Principal>],
        (change, principal): (u32, u32),
        code: &str,
        isolation: &mut Isolation,
    ) {
        let failed = &changes[change as usize];
        tracing::warn!(
            table = %failed.table,
            op = failed.op.as_str(),
            change = failed.id,
            user = %principals[principal as usize].user,
            sqlstate = code,
            "read policy failed; withholding this change from this user"
        );
        isolation.failed.push((change, principal));
    }

    async fn query(
        &self,
        changes: &[Change],
        principals: &[Arc<Principal>],
        pairs: &[(u32, u32)],
    ) -> anyhow::Result<Vec<Verdict>> {
        let rows = self.ask(&READERS, changes, principals, pairs).await?;
        rows.iter()
            .map(|row| {
                Ok(Verdict {
                    change: (row.try_get::<_, i32>(0)? - 1) as u32,
                    principal: (row.try_get::<_, i32>(1)? - 1) as u32,
                    sees_new: row.try_get::<_, Option<bool>>(2)?.unwrap_or(false),
                    sees_old: row.try_get::<_, Option<bool>>(3)?.unwrap_or(false),
                    knows_old: row.try_get::<_, Option<bool>>(4)?.unwrap_or(false),
                })
            })
            .collect()
    }

    /// [`READERS_GUARDED`]: the verdicts, and the pairs whose policy raised an error, with its
    /// SQLSTATE.
    async fn query_guarded(
        &self,
        changes: &[Change],
        principals: &[Arc<Principal>],
        pairs: &[(u32, u32)],
    ) -> anyhow::Result<(Vec<Verdict>, Vec<((u32, u32), String)>)> {
        let rows = self
            .ask(&READERS_GUARDED, changes, principals, pairs)
            .await?;
        let mut verdicts = Vec::new();
        let mut failures = Vec::new();
        for row in &rows {
            let pair = (
                (row.try_get::<_, i32>(0)? - 1) as u32,
                (row.try_get::<_, i32>(1)? - 1) as u32,
            );
            let answer = |ix: usize| -> anyhow::Result<Result<bool, String>> {
                Ok(match row.try_get::<_, Option<&str>>(ix)? {
                    None | Some("f") => Ok(false),
                    Some("t") => Ok(true),
                    Some(code) => Err(code.to_owned()),
                })
            };
            match (answer(2)?, answer(3)?) {
                (Ok(sees_new), Ok(sees_old)) => verdicts.push(Verdict {
                    change: pair.0,
                    principal: pair.1,
                    sees_new,
                    sees_old,
                    knows_old: row.try_get::<_, Option<bool>>(4)?.unwrap_or(false),
                }),
                (Err(code), _) | (_, Err(code)) => failures.push((pair, code)),
            }
        }
        Ok((verdicts, failures))
    }

    /// Runs one of the verdict queries over these pairs.
    async fn ask(
        &self,
        sql: &str,
        changes: &[Change],
        principals: &[Arc<Principal>],
        pairs: &[(u32, u32)],
    ) -> anyhow::Result<Vec<tokio_postgres::Row>> {
        // unnest ... WITH ORDINALITY counts from 1.
        let change_ix: Vec<i32> = pairs.iter().map(|p| p.0 as i32 + 1).collect();
        let principal_ix: Vec<i32> = pairs.iter().map(|p| p.1 as i32 + 1).collect();
        let change_ids: Vec<i64> = changes.iter().map(|c| c.id).collect();
        let judge_old: Vec<bool> = changes.iter().map(judges_old_separately).collect();
        let users: Vec<&str> = principals.iter().map(|p| p.user.as_str()).collect();
        let claims: Vec<&serde_json::Value> = principals.iter().map(|p| &p.claims).collect();

        let asking = std::time::Instant::now();
        let client = self
            .pool
            .get()
            .await
            .map_err(anyhow::Error::new)
            .context(Unreachable)?;
        let statement = client.prepare_cached(sql).await?;
        let rows = client
            .query(
                &statement,
                &[
                    &change_ix,
                    &principal_ix,
                    &change_ids,
                    &users,
                    &claims,
                    &judge_old,
                ],
            )
            .await;
        // Failed queries too: a policy that times out is what this histogram should show.
        self.metrics.policy_query_seconds.observe(asking.elapsed());
        Ok(rows?)
    }
}

/// What narrowing a failed chunk found.
#[derive(Default)]
struct Isolation {
    /// The (change, principal) pairs whose policy failed.
    failed: Vec<(u32, u32)>,
    /// Some query ran past the statement timeout.
    timed_out: bool,
}

/// No connection could be had from the pool: the database is down or unreachable.
#[derive(Debug)]
struct Unreachable;

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no database connection")
    }
}

/// Whether an UPDATE's old version needs a policy evaluation of its own. Where the policy declared
/// what it reads and none of it changed, the old version's answer is the new one's.
fn judges_old_separately(change: &Change) -> bool {
    let policy = &change.policy;
    policy.knows_old && (policy.key.is_none() || policy.key != policy.key_old)
}

/// The distinct questions among the pairs the cache could not answer. Changes of one table with
/// the same policy keys get the same answer for the same principal (that is what declaring the
/// keys means), so a chunk with many updates of one task asks about it once per user.
struct Questions {
    /// One (change, principal) pair per question: what the database is asked.
    distinct: Vec<(u32, u32)>,
    /// For each pair given to [`Questions::of`], its question's index in `distinct`.
    asked_by: Vec<usize>,
}

impl Questions {
    fn of(changes: &[Change], pairs: &[(u32, u32)]) -> Questions {
        type Question<'a> = (&'a str, &'a str, Option<&'a str>, u32);
        let mut index: HashMap<Question<'_>, usize> = HashMap::new();
        let mut distinct = Vec::new();
        let mut asked_by = Vec::with_capacity(pairs.len());
        for &(change_ix, principal) in pairs {
            let change = &changes[change_ix as usize];
            let policy = &change.policy;
            let old_key = policy.knows_old.then_some(policy.key_old.as_deref());
            let question = match (policy.key.as_deref(), old_key) {
                (Some(key), None) => Some((change.table.as_str(), key, None, principal)),
                (Some(key), Some(Some(old))) => {
                    Some((change.table.as_str(), key, Some(old), principal))
                }
                // Not declared: every change is its own question.
                _ => None,
            };
            let mut ask = || {
                distinct.push((change_ix, principal));
                distinct.len() - 1
            };
            asked_by.push(match question {
                Some(question) => *index.entry(question).or_insert_with(ask),
                None => ask(),
            });
        }
        Questions { distinct, asked_by }
    }

    /// Gives every pair its question's answer; a question whose evaluation failed fails all its
    /// pairs.
    fn spread(
        &self,
        pairs: &[(u32, u32)],
        answered: Vec<Verdict>,
        failed: &[(u32, u32)],
    ) -> (Vec<Verdict>, Vec<(u32, u32)>) {
        let answers: FxHashMap<(u32, u32), Verdict> = answered
            .into_iter()
            .map(|v| ((v.change, v.principal), v))
            .collect();
        let failed: FxHashSet<(u32, u32)> = failed.iter().copied().collect();
        let mut verdicts = Vec::new();
        let mut failed_pairs = Vec::new();
        for (&(change, principal), &question) in pairs.iter().zip(&self.asked_by) {
            let asked = self.distinct[question];
            if failed.contains(&asked) {
                failed_pairs.push((change, principal));
            } else if let Some(answer) = answers.get(&asked) {
                verdicts.push(Verdict {
                    change,
                    principal,
                    ..*answer
                });
            }
        }
        (verdicts, failed_pairs)
    }
}

/// Trouble with the database itself (down, restarting, the connection lost): the chunk is
/// retried once it is back, and nothing is denied meanwhile. Every other error, whatever its
/// SQLSTATE (a policy's RAISE, a bad cast, `stack depth limit exceeded`, a statement timeout, a
/// missing function), is about the query: it is narrowed to the pairs that cause it and those
/// are denied, so that no row or user can stop delivery to the others.
fn is_connection_failure(err: &anyhow::Error) -> bool {
    if err.downcast_ref::<Unreachable>().is_some() {
        return true;
    }
    let Some(pg) = err
        .chain()
        .find_map(|e| e.downcast_ref::<tokio_postgres::Error>())
    else {
        return false;
    };
    match pg.code() {
        // 08: connection exceptions; 57P01-57P03: the server is shutting down or starting.
        Some(code) => {
            let code = code.code();
            code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
        }
        None => {
            pg.is_closed()
                || std::error::Error::source(pg).is_some_and(|e| e.is::<std::io::Error>())
        }
    }
}

/// A statement cancelled by its timeout (or by a DBA's `pg_cancel_backend`).
fn is_timeout(err: &anyhow::Error) -> bool {
    sqlstate(err) == tokio_postgres::error::SqlState::QUERY_CANCELED.code()
}

/// The error's SQLSTATE, or `"-----"` when it came from elsewhere.
fn sqlstate(err: &anyhow::Error) -> String {
    err.chain()
        .find_map(|e| e.downcast_ref::<tokio_postgres::Error>())
        .and_then(|e| e.code())
        .map_or_else(|| "-----".to_owned(), |c| c.code().to_owned())
}

/// Answers join checks in batches: whatever queued while the previous batches ran goes into the
/// next query, so a lone join waits for one query and a burst shares a few.
async fn batch_joins(pool: Pool, mut pending: mpsc::UnboundedReceiver<JoinCheck>) {
    let slots = Arc::new(Semaphore::new(JOIN_BATCHES_IN_FLIGHT));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = pending.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_JOIN_BATCH {
            match pending.try_recv() {
                Ok(check) => batch.push(check),
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            answer_joins(&pool, batch).await;
            drop(slot);
        });
    }
}

/// One query for the batch; if it fails, each check alone, so that a policy that throws for one
/// user's claims fails only that user's join.
async fn answer_joins(pool: &Pool, batch: Vec<JoinCheck>) {
    let asks: Vec<(&str, &Principal)> = batch
        .iter()
        .map(|c| (c.room.as_str(), &*c.principal))
        .collect();
    match join_answers(pool, &asks).await {
        Ok(answers) => {
            for (check, allowed) in batch.into_iter().zip(answers) {
                let _ = check.answer.send(Ok(allowed));
            }
        }
        Err(_) if batch.len() > 1 => {
            for check in batch {
                let ask = [(check.room.as_str(), &*check.principal)];
                let answer = join_answers(pool, &ask).await.map(|a| a[0]);
                let _ = check.answer.send(answer);
            }
        }
        Err(err) => {
            for check in batch {
                let _ = check.answer.send(Err(anyhow::anyhow!("{err:#}")));
            }
        }
    }
}

/// `pgrelay.can_join` for each (room, principal), in order (a policy returning NULL refuses).
async fn join_answers(pool: &Pool, asks: &[(&str, &Principal)]) -> anyhow::Result<Vec<bool>> {
    let rooms: Vec<&str> = asks.iter().map(|a| a.0).collect();
    let users: Vec<&str> = asks.iter().map(|a| a.1.user.as_str()).collect();
    let claims: Vec<&serde_json::Value> = asks.iter().map(|a| &a.1.claims).collect();
    let client = pool.get().await.context("no database connection")?;
    let statement = client
        .prepare_cached(
            "SELECT coalesce(pgrelay.can_join(u, c, r), false)
             FROM unnest($1::text[], $2::jsonb[], $3::text[]) WITH ORDINALITY AS x(u, c, r, ix)
             ORDER BY ix",
        )
        .await?;
    let rows = client
        .query(&statement, &[&users, &claims, &rooms])
        .await
        .context("evaluating the join policy")?;
    let answers: Vec<bool> = rows
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(answers.len() == asks.len(), "one answer per join check");
    Ok(answers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::outbox::{Op, PolicyInputs};

    fn change(key: Option<&str>) -> Change {
        Change::of_policy(
            Op::Insert,
            PolicyInputs {
                key: key.map(str::to_owned),
                ..PolicyInputs::default()
            },
        )
    }

    #[test]
    fn pairs_with_the_same_keys_and_principal_are_asked_once_and_all_answered() {
        let changes = [
            change(Some("k")),
            change(Some("k")),
            change(None),
            change(None),
        ];
        let pairs = [(0, 0), (1, 0), (1, 1), (2, 0), (3, 0)];
        let questions = Questions::of(&changes, &pairs);
        assert_eq!(
            questions.distinct,
            [(0, 0), (1, 1), (2, 0), (3, 0)],
            "change 1 shares change 0's key for principal 0; undeclared changes are never merged"
        );
        let yes = |change, principal| Verdict {
            change,
            principal,
            sees_new: true,
            sees_old: false,
            knows_old: false,
        };
        let (verdicts, failed) = questions.spread(&pairs, vec![yes(0, 0), yes(2, 0)], &[(3, 0)]);
        assert_eq!(verdicts, [yes(0, 0), yes(1, 0), yes(2, 0)]);
        assert_eq!(failed, [(3, 0)], "a failed question fails its pairs");
    }
}
