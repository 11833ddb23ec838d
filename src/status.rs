//! Status: each relay reports how far it has delivered to `pgrelay.relays`, so that a DBA can see
//! backlog and lag per relay in the `pgrelay.lag` view.
//!
//! A relay writes only its own row (named host:pid), every few seconds, and deletes it on a clean
//! shutdown: relays never wait for each other.

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
            if let Err(err) = report(&pool, &name, &position.to_pg(), connections).await {
                tracing::debug!(error = %format!("{err:#}"), "could not report status");
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

async fn report(pool: &Pool, name: &str, position: &str, connections: i32) -> anyhow::Result<()> {
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
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "relay".into())
}
