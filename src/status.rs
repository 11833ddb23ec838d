//! Status: each relay reports how far it has delivered to `pgrelay.relays`, so that a DBA can see
//! backlog and lag per relay in the `pgrelay.lag` view.
//!
//! A relay writes only its own row (named host:pid), every few seconds, and deletes it on a clean
//! shutdown: relays never wait for each other. It reads its own backlog and lag back from the
//! view in the same round, for `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::rooms::Hub;

pub async fn run(
    pool: Pool,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let name = format!("{}:{}", hostname(), std::process::id());
    loop {
        if let Some(position) = hub.delivered() {
            let connections = metrics.connections.get() as i32;
            match report(&pool, &name, &position.to_pg(), connections).await {
                Ok((backlog, lag)) => {
                    metrics.outbox_backlog_changes.set(backlog);
                    metrics.outbox_lag_seconds.set(lag);
                }
                Err(err) => {
                    tracing::debug!(error = %format!("{err:#}"), "could not report status")
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shutdown.cancelled() => break,
        }
    }
    if let Ok(client) = pool.get().await {
        let _ = client
            .execute("DELETE FROM pgrelay.relays WHERE name = $1", &[&name])
            .await;
    }
}

/// Upserts this relay's row, then returns its backlog (changes) and lag (seconds) from
/// `pgrelay.lag`.
async fn report(
    pool: &Pool,
    name: &str,
    position: &str,
    connections: i32,
) -> anyhow::Result<(u64, f64)> {
    let client = pool.get().await?;
    client
        .execute(
            "INSERT INTO pgrelay.relays (name, started_at, seen_at, position, connections)
             VALUES ($1, now(), now(), $2, $3)
             ON CONFLICT (name) DO UPDATE
                SET seen_at = now(), position = excluded.position, connections = excluded.connections",
            &[&name, &position, &connections],
        )
        .await?;
    let row = client
        .query_one(
            "SELECT backlog, extract(epoch FROM lag)::float8 FROM pgrelay.lag WHERE name = $1",
            &[&name],
        )
        .await?;
    let backlog: i64 = row.try_get(0)?;
    Ok((u64::try_from(backlog).unwrap_or(0), row.try_get(1)?))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "relay".into())
}
