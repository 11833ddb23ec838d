//! Remembered policy answers: ask the database once per user and kind of row, not once per change.
//!
//! Without memory, every change costs one policy evaluation per listener: a task update in a room
//! of 80 members is 80 SQL function calls, and Postgres, not the relay, caps the fan-out. Most of
//! those calls repeat an earlier answer, because a policy looks at few columns (a task's project,
//! privacy, assignee and creator) and at slowly changing tables (memberships).
//!
//! A DBA who declares what a policy reads (`pgrelay.watch(policy_columns => ...,
//! policy_tables => ...)`) lets the relay remember its answers. `pgrelay.read_batch` labels each change
//! with a *policy key*: the policy and the values of the declared columns, taken from the full row.
//! An answer is remembered per (table, policy key, principal), where a principal is a user with
//! one exact set of claims, so a refreshed token with other claims is judged afresh.
//!
//! # Staying right
//!
//! * **Row changes.** A task made private has another key, so it is judged afresh.
//! * **Changes to the tables a policy reads.** They arrive through the outbox in commit order, like
//!   every other change. Before a chunk of changes is judged, the answers that any change in it
//!   makes stale (`flush`) are forgotten, so every change committed after a membership change is
//!   judged with the membership as it is now. Changes before it in the same chunk are judged with
//!   the newer memberships too, which can only withhold what the user no longer may read.
//! * **Races.** A replay judges changes beside the live reader, and its query may have started
//!   before a membership change was forgotten. Every forgetting starts a new *generation*; answers
//!   are kept only if no generation began while they were being computed.
//! * **Invalidations.** A `TRUNCATE` of a watched table and a replaced function (with the event
//!   trigger installed) come through the outbox as invalidations: every answer is forgotten.
//! * **What the outbox cannot show** (disabled triggers, a function replaced without the event
//!   trigger): answers are forgotten after [`MAX_AGE`] at the latest. Each policy key's answers expire at a random point
//!   in the second half of that age, so a busy relay re-asks a little at a time instead of
//!   everything at once (which stalled delivery for a second every minute).
//! * **Failures.** A pair whose policy raised an error is denied this time and not remembered.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustc_hash::FxHashMap;
use tokio::time::Instant;

use super::Verdict;
use crate::capture::outbox::Change;
use crate::jwt::Principal;

/// Longest an answer is trusted without a change that confirms or invalidates it.
pub const MAX_AGE: Duration = Duration::from_secs(60);

/// Remembered answers beyond which everything is forgotten (a bound on memory, ~50 bytes each).
const MAX_ANSWERS: usize = 4_000_000;

#[derive(Default)]
pub struct VerdictCache {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    generation: u64,
    /// When the generation began; a new one begins at least every [`MAX_AGE`].
    since: Option<Instant>,
    /// Ids are never reused (`next_id` only grows), so an answer left behind by a forgotten
    /// principal can never be taken for someone else's.
    principals: HashMap<PrincipalKey, Interned>,
    next_id: u64,
    /// table → policy key → answers per principal.
    answers: HashMap<String, HashMap<String, Answers>>,
    count: usize,
}

struct Interned {
    id: u64,
    seen: Instant,
}

/// One policy key's answers, and when they stop being trusted.
struct Answers {
    expires: Instant,
    /// By interned id (the relay's own numbers: a fast hash is safe here).
    by_principal: FxHashMap<u64, bool>,
}

/// A principal compared by content: connections of one user with identical claims share answers.
struct PrincipalKey(Arc<Principal>);

impl PartialEq for PrincipalKey {
    fn eq(&self, other: &PrincipalKey) -> bool {
        *self.0 == *other.0
    }
}
impl Eq for PrincipalKey {}
impl Hash for PrincipalKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.user.hash(state);
        self.0.expires_at.hash(state);
    }
}

/// What the cache knew about a chunk: verdicts for the pairs it could answer, the pairs to ask
/// the database about, and the generation to hand back to [`VerdictCache::remember`].
pub struct Recalled {
    pub verdicts: Vec<Verdict>,
    pub unknown: Vec<(u32, u32)>,
    pub generation: u64,
    principal_ids: Vec<u64>,
}

impl VerdictCache {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Forgets the answers that any of `changes` may have made wrong. Returns the number of tables
    /// whose answers were forgotten.
    pub fn flush(&self, changes: &[Change]) -> usize {
        if changes.iter().any(|c| c.control) {
            return self.forget_all();
        }
        let mut tables: Vec<&str> = changes
            .iter()
            .flat_map(|c| c.policy.flush.iter().map(String::as_str))
            .collect();
        if tables.is_empty() {
            return 0;
        }
        tables.sort_unstable();
        tables.dedup();
        let mut state = self.lock();
        for table in &tables {
            if let Some(answers) = state.answers.remove(*table) {
                state.count -= answers
                    .values()
                    .map(|a| a.by_principal.len())
                    .sum::<usize>();
            }
        }
        // Even with nothing remembered yet: a query running now must not store what it computes.
        state.generation += 1;
        tables.len()
    }

    /// Forgets every answer (an invalidation the outbox carries: a `TRUNCATE`, a replaced
    /// function). Returns the number of tables whose answers were forgotten.
    pub fn forget_all(&self) -> usize {
        let mut state = self.lock();
        let tables = state.answers.len();
        state.answers.clear();
        state.count = 0;
        state.generation += 1;
        tables
    }

    /// Splits `pairs` into verdicts known from memory and pairs the database must judge.
    pub fn recall(
        &self,
        changes: &[Change],
        principals: &[Arc<Principal>],
        pairs: &[(u32, u32)],
    ) -> Recalled {
        let mut state = self.lock();
        state.expire();
        let now = Instant::now();
        let principal_ids: Vec<u64> = principals.iter().map(|p| state.intern(p, now)).collect();
        // Each change's answers by principal, for its new and (UPDATE) old version.
        let lookup = |table: &str, key: &Option<String>| {
            key.as_ref()
                .and_then(|key| state.answers.get(table)?.get(key.as_str()))
                .filter(|answers| answers.expires > now)
                .map(|answers| &answers.by_principal)
        };
        let per_change: Vec<_> = changes
            .iter()
            .map(|c| {
                let new = lookup(&c.table, &c.policy.key);
                let old = c
                    .policy
                    .knows_old
                    .then(|| lookup(&c.table, &c.policy.key_old));
                (new, old)
            })
            .collect();
        let mut verdicts = Vec::new();
        let mut unknown = Vec::new();
        for &(change, principal) in pairs {
            let id = principal_ids[principal as usize];
            let (new, old) = &per_change[change as usize];
            let sees_new = new.and_then(|answers| answers.get(&id).copied());
            let sees_old = match old {
                None => Some(false),
                Some(answers) => answers.and_then(|a| a.get(&id).copied()),
            };
            match (sees_new, sees_old) {
                (Some(sees_new), Some(sees_old)) => {
                    if sees_new || sees_old {
                        verdicts.push(Verdict {
                            change,
                            principal,
                            sees_new,
                            sees_old,
                            knows_old: old.is_some(),
                        });
                    }
                }
                _ => unknown.push((change, principal)),
            }
        }
        let generation = state.generation;
        Recalled {
            verdicts,
            unknown,
            generation,
            principal_ids,
        }
    }

    /// Remembers the database's answers for `asked` (minus `failed`), unless answers were
    /// forgotten since `recalled` was made: those answers may predate the change that did it.
    pub fn remember(
        &self,
        recalled: &Recalled,
        changes: &[Change],
        asked: &[(u32, u32)],
        answered: &[Verdict],
        failed: &[(u32, u32)],
    ) {
        let mut state = self.lock();
        if state.generation != recalled.generation {
            return;
        }
        let failed: std::collections::HashSet<&(u32, u32)> = failed.iter().collect();
        let seen: HashMap<(u32, u32), &Verdict> = answered
            .iter()
            .map(|v| ((v.change, v.principal), v))
            .collect();
        for pair in asked {
            if failed.contains(pair) {
                continue;
            }
            let change = &changes[pair.0 as usize];
            let id = recalled.principal_ids[pair.1 as usize];
            let verdict = seen.get(pair);
            if let Some(key) = &change.policy.key {
                let sees = verdict.is_some_and(|v| v.sees_new);
                state.store(&change.table, key, id, sees);
            }
            if let (true, Some(key)) = (change.policy.knows_old, &change.policy.key_old) {
                let sees = verdict.is_some_and(|v| v.sees_old);
                state.store(&change.table, key, id, sees);
            }
        }
    }
}

impl State {
    /// Every [`MAX_AGE`]: a new generation, and principals not seen since are let go. Past [`MAX_ANSWERS`], everything is forgotten.
    fn expire(&mut self) {
        let now = Instant::now();
        if self.count > MAX_ANSWERS {
            self.answers.clear();
            self.principals.clear();
            self.count = 0;
            self.generation += 1;
        }
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) >= MAX_AGE {
            self.generation += 1;
            self.since = Some(now);
            self.principals
                .retain(|_, p| now.duration_since(p.seen) < MAX_AGE);
        }
    }

    fn intern(&mut self, principal: &Arc<Principal>, now: Instant) -> u64 {
        let interned = self
            .principals
            .entry(PrincipalKey(principal.clone()))
            .or_insert_with(|| {
                self.next_id += 1;
                Interned {
                    id: self.next_id,
                    seen: now,
                }
            });
        interned.seen = now;
        interned.id
    }

    fn store(&mut self, table: &str, key: &str, principal: u64, sees: bool) {
        let now = Instant::now();
        let by_key = match self.answers.get_mut(table) {
            Some(by_key) => by_key,
            None => self.answers.entry(table.to_owned()).or_default(),
        };
        let answers = match by_key.get_mut(key) {
            Some(answers) => answers,
            None => by_key.entry(key.to_owned()).or_insert_with(|| Answers {
                expires: now,
                by_principal: FxHashMap::default(),
            }),
        };
        if answers.expires <= now {
            // Expired (or new): start afresh, trusted for half to all of MAX_AGE.
            self.count -= answers.by_principal.len();
            answers.by_principal.clear();
            let half = MAX_AGE / 2;
            answers.expires = now + half + half.mul_f64(rand::random::<f64>());
        }
        if answers.by_principal.insert(principal, sees).is_none() {
            self.count += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::outbox::{Op, PolicyInputs};

    fn change(key: &str, flush: &[&str]) -> Change {
        Change::of_policy(
            Op::Update,
            PolicyInputs {
                key: Some(key.into()),
                flush: flush.iter().map(|t| t.to_string()).collect(),
                ..PolicyInputs::default()
            },
        )
    }

    fn principal(user: &str, level: u32) -> Arc<Principal> {
        Arc::new(Principal {
            user: user.into(),
            claims: serde_json::json!({ "sub": user, "level": level }),
            expires_at: 1,
        })
    }

    fn allow(change: u32, principal: u32) -> Verdict {
        Verdict {
            change,
            principal,
            sees_new: true,
            sees_old: false,
            knows_old: false,
        }
    }

    #[test]
    fn answers_are_recalled_for_the_same_key_and_principal_only() {
        let cache = VerdictCache::default();
        let changes = [change("k1", &[])];
        let people = [principal("u1", 1), principal("u2", 1)];
        let recalled = cache.recall(&changes, &people, &[(0, 0), (0, 1)]);
        assert_eq!(recalled.unknown.len(), 2, "nothing is known at first");
        cache.remember(&recalled, &changes, &recalled.unknown, &[allow(0, 0)], &[]);

        let again = cache.recall(&changes, &people, &[(0, 0), (0, 1)]);
        assert!(again.unknown.is_empty(), "both answers remembered");
        assert_eq!(again.verdicts, [allow(0, 0)], "u2 was denied, u1 allowed");

        // Another key, or the same user with other claims, is judged afresh.
        let other = cache.recall(&[change("k2", &[])], &people, &[(0, 0)]);
        assert_eq!(other.unknown, [(0, 0)]);
        let promoted = cache.recall(&changes, &[principal("u1", 2)], &[(0, 0)]);
        assert_eq!(promoted.unknown, [(0, 0)]);
    }

    #[test]
    fn an_answer_computed_across_an_invalidation_is_not_kept() {
        let cache = VerdictCache::default();
        let changes = [change("k1", &[])];
        let people = [principal("u1", 1)];
        let recalled = cache.recall(&changes, &people, &[(0, 0)]);
        // A membership change is read while the query for `recalled` is still running.
        assert_eq!(cache.flush(&[change("m", &["tasks"])]), 1);
        cache.remember(&recalled, &changes, &recalled.unknown, &[allow(0, 0)], &[]);
        let again = cache.recall(&changes, &people, &[(0, 0)]);
        assert_eq!(again.unknown, [(0, 0)], "the stale answer was dropped");
    }

    #[test]
    fn an_invalidation_from_the_outbox_forgets_everything() {
        let cache = VerdictCache::default();
        let changes = [change("k1", &[])];
        let people = [principal("u1", 1)];
        let recalled = cache.recall(&changes, &people, &[(0, 0)]);
        cache.remember(&recalled, &changes, &recalled.unknown, &[allow(0, 0)], &[]);
        let mut truncated = change("t", &[]);
        truncated.control = true;
        cache.flush(&[truncated]);
        assert_eq!(cache.recall(&changes, &people, &[(0, 0)]).unknown, [(0, 0)]);
    }

    #[test]
    fn invalidation_forgets_only_the_tables_named() {
        let cache = VerdictCache::default();
        let changes = [change("k1", &[])];
        let people = [principal("u1", 1)];
        let recalled = cache.recall(&changes, &people, &[(0, 0)]);
        cache.remember(&recalled, &changes, &recalled.unknown, &[allow(0, 0)], &[]);
        cache.flush(&[change("c", &["comments"])]);
        assert!(cache
            .recall(&changes, &people, &[(0, 0)])
            .unknown
            .is_empty());
        cache.flush(&[change("m", &["tasks"])]);
        assert_eq!(cache.recall(&changes, &people, &[(0, 0)]).unknown, [(0, 0)]);
    }

    #[tokio::test(start_paused = true)]
    async fn answers_expire_within_max_age_but_not_all_at_once() {
        let cache = VerdictCache::default();
        let people = [principal("u1", 1)];
        let changes: Vec<Change> = (0..100).map(|k| change(&format!("k{k}"), &[])).collect();
        let pairs: Vec<(u32, u32)> = (0..100).map(|c| (c, 0)).collect();
        let recalled = cache.recall(&changes, &people, &pairs);
        let yes: Vec<Verdict> = pairs.iter().map(|&(c, p)| allow(c, p)).collect();
        cache.remember(&recalled, &changes, &recalled.unknown, &yes, &[]);
        let unknown = || cache.recall(&changes, &people, &pairs).unknown.len();

        tokio::time::advance(MAX_AGE / 2 - Duration::from_secs(1)).await;
        assert_eq!(unknown(), 0, "nothing expires in the first half");
        tokio::time::advance(MAX_AGE / 4).await;
        let expired = unknown();
        assert!(
            (10..90).contains(&expired),
            "expiries are spread out: {expired} of 100 at three quarters"
        );
        tokio::time::advance(MAX_AGE / 4 + Duration::from_secs(2)).await;
        assert_eq!(unknown(), 100, "nothing outlives MAX_AGE");
    }

    #[test]
    fn a_failed_evaluation_is_not_remembered() {
        let cache = VerdictCache::default();
        let changes = [change("k1", &[])];
        let people = [principal("u1", 1)];
        let recalled = cache.recall(&changes, &people, &[(0, 0)]);
        cache.remember(&recalled, &changes, &recalled.unknown, &[], &[(0, 0)]);
        assert_eq!(cache.recall(&changes, &people, &[(0, 0)]).unknown, [(0, 0)]);
    }

    #[test]
    fn an_update_needs_answers_for_both_versions() {
        let cache = VerdictCache::default();
        let mut moved = change("new", &[]);
        moved.policy.knows_old = true;
        moved.policy.key_old = Some("old".into());
        let changes = [moved];
        let people = [principal("u1", 1)];
        // Known for the new version only (as if from an earlier change): still asked.
        let first = [change("new", &[])];
        let recalled = cache.recall(&first, &people, &[(0, 0)]);
        cache.remember(&recalled, &first, &recalled.unknown, &[allow(0, 0)], &[]);
        let recalled = cache.recall(&changes, &people, &[(0, 0)]);
        assert_eq!(recalled.unknown, [(0, 0)]);
        let left_view = Verdict {
            change: 0,
            principal: 0,
            sees_new: false,
            sees_old: true,
            knows_old: true,
        };
        cache.remember(&recalled, &changes, &recalled.unknown, &[left_view], &[]);
        // Both versions are known now; the fresher answer about the new version replaced the
        // older one.
        let again = cache.recall(&changes, &people, &[(0, 0)]);
        assert!(again.unknown.is_empty());
        assert_eq!(again.verdicts, [left_view]);
    }
}
