//! Retention: keeps the outbox at its configured size by calling `pgrelay.maintain()`.
//!
//! All the logic lives in SQL (see `sql/pgrelay.sql`), so a DBA can also run it from a scheduler;
//! every relay calls it periodically and Postgres lets one of them at a time do the work.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

/// Calls `pgrelay.maintain()` every `interval` until `shutdown`.
pub async fn run(pool: Pool, interval: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => return,
        }
        match maintain(&pool).await {
            Ok(did) if did.contains("emptied") || did.contains("rotated") => {
                tracing::info!(did, "outbox retention");
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "outbox retention failed; will retry")
            }
        }
    }
}

async fn maintain(pool: &Pool) -> anyhow::Result<String> {
    let client = pool.get().await?;
    let row = client.query_one("SELECT pgrelay.maintain()", &[]).await?;
    Ok(row.try_get(0)?)
}
