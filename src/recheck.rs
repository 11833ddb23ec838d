//! Access re-checks: memberships whose access may have changed are put to the join policy again.
//!
//! Events are authorized one by one against current data, so a user who lost access receives no
//! event they may no longer read. Presence and typing are not rows, though: a member sees who is in
//! the room and who is typing, and is seen there, until the relay removes them. So the relay asks
//! the join policy (`pgrelay.can_join`) again for every membership whose access may have changed,
//! and removes those it now refuses: `left` with reason `revoked`, after which the member gets
//! nothing more of the room, and the others see it leave the room's presence (and stop typing).
//!
//! When access may have changed, and what is re-checked:
//!
//! * **After each chunk of changes** ([`crate::fanout`]): a member denied a change in the room, or
//!   who saw a row leave its view; every member of the rooms of each kind whose join policy reads
//!   a table that changed (`pgrelay.allow_join(policy_tables => ...)`: a removed project member
//!   leaves `project:1` right after the `project_member_deleted` it may still see); every member
//!   after an invalidation (a `TRUNCATE` of a watched table, a replaced function).
//! * **A refreshed token with other claims**: every room of that connection.
//! * **Periodically** ([`periodically`], every `PGRELAY_RECHECK_INTERVAL`, 30 s by default): every
//!   member, for what the outbox cannot show (changes made with triggers disabled, a policy
//!   function replaced where the event trigger could not be installed).
//!
//! A re-check that fails (the database is away) removes nobody and is tried again at the next
//! occasion; nothing leaks meanwhile, since every event is authorized on its own.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::authorize::Authorizer;
use crate::metrics::Metrics;
use crate::rooms::{Hub, Membership};

/// Memberships checked by one query.
const CHECKS_PER_QUERY: usize = 1000;

/// Asks the join policy about each membership and revokes those it refuses. Returns how many
/// were revoked.
pub async fn recheck(
    hub: &Hub,
    authorizer: &Authorizer,
    metrics: &Metrics,
    memberships: &[Membership],
) -> anyhow::Result<usize> {
    let started = std::time::Instant::now();
    metrics.access_rechecks.add(memberships.len() as u64);
    let mut revoked = 0;
    let outcome = async {
        for chunk in memberships.chunks(CHECKS_PER_QUERY) {
            let allowed = authorizer.still_allowed(chunk).await?;
            for (membership, allowed) in chunk.iter().zip(allowed) {
                // Only the membership that was checked: the client may have left and joined
                // again since.
                if !allowed && hub.revoke(&membership.room, membership.client, membership.join_id) {
                    metrics.revocations.inc();
                    revoked += 1;
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    metrics.access_recheck_seconds.add(started.elapsed());
    outcome.map(|()| revoked)
}

/// [`recheck`], logging a failure instead of returning it (the next occasion tries again).
pub async fn recheck_or_log(
    hub: &Hub,
    authorizer: &Authorizer,
    metrics: &Metrics,
    memberships: &[Membership],
    why: &str,
) {
    if memberships.is_empty() {
        return;
    }
    if let Err(err) = recheck(hub, authorizer, metrics, memberships).await {
        tracing::warn!(error = %format!("{err:#}"), why, "re-checking room access failed");
    }
}

/// Re-checks every membership on this relay every `every`, until `shutdown`.
pub async fn periodically(
    hub: Arc<Hub>,
    authorizer: Authorizer,
    metrics: Arc<Metrics>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let everyone = hub.memberships(|_| true);
        recheck_or_log(&hub, &authorizer, &metrics, &everyone, "periodic").await;
    }
}

/// Whether a refreshed token changes what policies may see: its claims other than the times.
pub fn claims_changed(before: &serde_json::Value, after: &serde_json::Value) -> bool {
    let timeless = |claims: &serde_json::Value| {
        let mut claims = claims.clone();
        if let Some(map) = claims.as_object_mut() {
            for time in ["exp", "iat", "nbf", "jti"] {
                map.remove(time);
            }
        }
        claims
    };
    timeless(before) != timeless(after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_refresh_changes_claims_only_beyond_its_times() {
        let before = json!({"sub": "u1", "exp": 1, "iat": 0, "role": "admin"});
        assert!(!claims_changed(
            &before,
            &json!({"sub": "u1", "exp": 9, "iat": 8, "jti": "x", "role": "admin"})
        ));
        assert!(claims_changed(
            &before,
            &json!({"sub": "u1", "exp": 9, "role": "viewer"})
        ));
        assert!(claims_changed(&before, &json!({"sub": "u1", "exp": 9})));
    }
}
