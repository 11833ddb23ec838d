//! Who sends `NOTIFY pgrelay`: only writers that commit while a relay sleeps.
//!
//! A NOTIFY costs its transaction a cluster-wide lock that Postgres holds from just before the
//! commit until after its WAL flush, so notifying writers commit one at a time instead of in
//! groups (see docs/dba.md). But a wake-up is only useful to a relay that is waiting for one: a
//! relay busy reading batch after batch finds new changes by itself. So relays announce when they
//! sleep, and the capture functions (`sql/pgrelay.sql`) notify only then. Two advisory locks, in
//! the two-key form so that they cannot collide with an application's one-key (`bigint`) locks:
//!
//! - `(LOCK_CLASS, SLEEPING)`: a relay that waits for a NOTIFY holds it in SHARE mode, on its
//!   LISTEN connection (session level: a relay that crashes or loses that connection releases
//!   it, and the listener wakes the reader when its connection goes).
//! - `(LOCK_CLASS, WRITING)`: a writing transaction that decides *not* to notify holds it in
//!   SHARE mode until it ends (`pg_try_advisory_xact_lock_shared`).
//!
//! A writer, after each statement that captured rows: if it cannot take `WRITING` (a relay is
//! going to sleep right now) it notifies; else if it cannot take `SLEEPING` exclusively for an
//! instant (a relay sleeps) it notifies; else it does not.
//!
//! A relay, once a read found nothing: takes `SLEEPING` (shared), then waits for `WRITING`
//! exclusively on a second connection and releases it at once (the *barrier*), then reads once
//! more, then waits for a NOTIFY. Woken, it releases `SLEEPING` and reads until a read is empty.
//!
//! Why no change is left unannounced. Take a writer W that did not notify: it took `WRITING` at
//! t1, then found `SLEEPING` free at t2 > t1, and holds `WRITING` until it ends. A relay R that
//! waits for a NOTIFY took `SLEEPING` at r1 and has held it since; `SLEEPING` was free at t2, so
//! t2 < r1. R's barrier was granted at g > r1, when nobody held `WRITING`; W held it from
//! t1 < t2 < r1 < g, so W had ended by g. Postgres releases a transaction's locks only after its
//! commit is visible, so the read R makes after g sees W's changes. Every other writer that commits
//! while R sleeps notifies, and R is listening. While a barrier waits, the exclusive request
//! queued on `WRITING` makes every new writer's `pg_try_advisory_xact_lock_shared` fail, so they
//! notify and the barrier waits only for writers that were already running; meanwhile the reader
//! keeps serving NOTIFYs, so a transaction that stays open for an hour delays nobody but itself.
//!
//! The same holds for REPEATABLE READ and SERIALIZABLE writers (advisory locks are not MVCC, and
//! the barrier waits for the transaction's end, whatever its snapshot), for writes in savepoints
//! (a lock taken in a subtransaction is kept by its parent when it commits and released with its
//! changes when it rolls back) and for several relays (each holds `SLEEPING` shared; their
//! barriers queue behind each other). A writer that collides with another writer's instant on
//! `SLEEPING` just notifies once more than needed.

use std::sync::Arc;

use anyhow::Context;
use tokio_postgres::Client;

/// First key of pgrelay's advisory locks: the bytes `pgrl`. Applications that use two-key
/// advisory locks must not use this first key.
pub const LOCK_CLASS: i32 = 0x7067_726c;
/// Second key: held (shared) by relays waiting for a NOTIFY.
pub const SLEEPING: i32 = 1;
/// Second key: held (shared) by writing transactions that did not notify.
pub const WRITING: i32 = 2;

/// This relay's announcement that it sleeps: `SLEEPING` held on the LISTEN connection.
pub struct Sleeping {
    listen: Arc<Client>,
}

impl Sleeping {
    /// Takes `SLEEPING` (shared) on the LISTEN connection. Writers hold it exclusively only for an
    /// instant; the connection's `lock_timeout` bounds the wait should one ever keep it.
    pub async fn announce(listen: Arc<Client>) -> anyhow::Result<Sleeping> {
        listen
            .execute(
                "SELECT pg_advisory_lock_shared($1, $2)",
                &[&LOCK_CLASS, &SLEEPING],
            )
            .await
            .context("announcing sleep on the LISTEN connection")?;
        Ok(Sleeping { listen })
    }

    /// Whether the LISTEN connection closed, which released the lock (and lost notifications).
    pub fn lost(&self) -> bool {
        self.listen.is_closed()
    }

    /// Withdraws the announcement. A closed connection has released the lock already.
    pub async fn end(self) {
        if self.lost() {
            return;
        }
        let released = self
            .listen
            .execute(
                "SELECT pg_advisory_unlock_shared($1, $2)",
                &[&LOCK_CLASS, &SLEEPING],
            )
            .await;
        if let Err(err) = released {
            // The connection is going away, which releases the lock too.
            tracing::debug!(error = %err, "releasing the sleep announcement failed");
        }
    }
}

/// Waits until every transaction that holds `WRITING` (a writer that decided not to notify) has
/// ended. Runs on its own connection: the wait lasts as long as the longest such transaction.
pub async fn barrier(connection: Arc<Client>) -> anyhow::Result<()> {
    // An implicit transaction: the lock is granted, then released by its commit.
    connection
        .execute(
            "SELECT pg_advisory_xact_lock($1, $2)",
            &[&LOCK_CLASS, &WRITING],
        )
        .await
        .context("waiting for writers that did not notify")?;
    Ok(())
}
