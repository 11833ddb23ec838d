//! `pgrelay migrate`: installs the trigger library (`sql/`) and the example schema (`migrations/`).
//!
//! The SQL files are compiled into the binary, so the relay and the library it expects always
//! match. Every file is idempotent and runs in its own transaction; running migrate twice, or from
//! two relays at once, is safe (the library takes an advisory lock).

use anyhow::Context;

/// The trigger library.
pub const LIBRARY: &str = include_str!("../../sql/pgrelay.sql");

/// The example task-app schema, in order.
pub const EXAMPLE_SCHEMA: &[(&str, &str)] = &[(
    "001_task_app.sql",
    include_str!("../../migrations/001_task_app.sql"),
)];

/// A few users, projects and tasks for the walkthrough (loaded once into a new embedded database).
pub const DEMO_DATA: &str = include_str!("../../migrations/demo/seed.sql");

/// Installs the library and, unless `library_only`, the example schema.
pub async fn migrate(database_url: &str, library_only: bool) -> anyhow::Result<()> {
    run_files(database_url, &library_files(library_only)).await
}

/// Loads the demo data.
pub async fn load_demo_data(database_url: &str) -> anyhow::Result<()> {
    run_files(database_url, &[("demo/seed.sql", DEMO_DATA)]).await
}

/// True when the trigger library is installed in the database.
pub async fn library_installed(client: &tokio_postgres::Client) -> anyhow::Result<bool> {
    let row = client
        .query_one(
            "SELECT to_regprocedure('pgrelay.read_batch(pg_snapshot,pg_snapshot)') IS NOT NULL",
            &[],
        )
        .await?;
    Ok(row.try_get(0)?)
}

fn library_files(library_only: bool) -> Vec<(&'static str, &'static str)> {
    let mut files = vec![("sql/pgrelay.sql", LIBRARY)];
    if !library_only {
        files.extend(EXAMPLE_SCHEMA.iter().map(|(name, sql)| (*name, *sql)));
    }
    files
}

async fn run_files(database_url: &str, files: &[(&str, &str)]) -> anyhow::Result<()> {
    let (mut client, connection) = super::Database::from_url(database_url)?
        .connect()
        .await
        .context("connecting to DATABASE_URL")?;
    let io = tokio::spawn(connection);
    for (name, sql) in files {
        let tx = client.transaction().await?;
        tx.batch_execute(sql)
            .await
            .with_context(|| format!("running {name}"))?;
        tx.commit()
            .await
            .with_context(|| format!("committing {name}"))?;
        tracing::info!(file = name, "applied");
    }
    drop(client);
    let _ = io.await;
    Ok(())
}
