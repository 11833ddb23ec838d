//! `pgrelay demo simulate`: realistic activity on the demo schema, written with SQL as an
//! application's API would write it (the relay is not involved: it sees the changes like any
//! others). Cards move between columns, tasks are created (some private) and finished, comments
//! are added, and old done tasks are cleared so the board stays readable.

use std::time::Duration;

use anyhow::Context;
use rand::seq::IndexedRandom;
use rand::Rng;
use tokio_postgres::Client;

const TITLES: [&str; 12] = [
    "Draft the press release",
    "Review the pricing page",
    "Fix the signup email",
    "Call the venue",
    "Prepare the demo script",
    "Update the roadmap",
    "Check the budget",
    "Order the banners",
    "Answer the partner",
    "Plan the retro",
    "Record the walkthrough",
    "Sort the backlog",
];
const COMMENTS: [&str; 8] = [
    "On it.",
    "Can we do this by Friday?",
    "Done on my side, please review.",
    "Blocked on the budget.",
    "Looks good to me.",
    "I added notes to the doc.",
    "Moving this to next week.",
    "Who owns this?",
];
/// A project with more tasks than this has its oldest done task deleted.
const MAX_TASKS: i64 = 12;

/// Writes one change every `1 / rate` seconds until `duration` (forever if `None`) or Ctrl-C.
pub async fn run(database_url: &str, rate: f64, duration: Option<Duration>) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .context("connecting to the database")?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::warn!(error = %err, "database connection closed");
        }
    });
    let every = Duration::from_secs_f64(1.0 / rate.clamp(0.1, 1000.0));
    let until = duration.map(|d| tokio::time::Instant::now() + d);
    let mut ticks = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        if until.is_some_and(|u| tokio::time::Instant::now() >= u) {
            return Ok(());
        }
        // A failed step (the database restarting, say) is reported and the next one tried.
        match step(&client).await {
            Ok(what) => println!("{what}"),
            Err(err) if client.is_closed() => return Err(err),
            Err(err) => eprintln!("pgrelay demo simulate: {err:#}"),
        }
    }
}

/// One realistic change; returns what it did.
pub async fn step(client: &Client) -> anyhow::Result<String> {
    // The random choices are made before any await: the generator is not Send.
    let (project, roll, title, comment, private) = {
        let mut rng = rand::rng();
        (
            rng.random_range(1..=2i64),
            rng.random_range(0..100u32),
            *TITLES.choose(&mut rng).unwrap_or(&TITLES[0]),
            *COMMENTS.choose(&mut rng).unwrap_or(&COMMENTS[0]),
            rng.random_bool(0.2),
        )
    };
    let count: i64 = client
        .query_one(
            "SELECT count(*) FROM tasks WHERE project_id = $1",
            &[&project],
        )
        .await?
        .try_get(0)?;
    if count > MAX_TASKS {
        let deleted = client
            .execute(
                "DELETE FROM tasks WHERE id = (SELECT id FROM tasks WHERE project_id = $1
                   ORDER BY (status = 'done') DESC, updated_at NULLS FIRST, id LIMIT 1)",
                &[&project],
            )
            .await?;
        return Ok(format!("project {project}: cleared {deleted} old task"));
    }
    match roll {
        0..=49 => {
            // Work flows forward (todo → doing → done), and now and then a done task reopens.
            let moved = client
                .query_opt(
                    "UPDATE tasks SET updated_at = now(), status = CASE status
                        WHEN 'todo' THEN 'doing' WHEN 'doing' THEN 'done' ELSE 'todo' END
                      WHERE id = (SELECT id FROM tasks WHERE project_id = $1 ORDER BY random() LIMIT 1)
                      RETURNING id, status",
                    &[&project],
                )
                .await?;
            Ok(match moved {
                Some(row) => {
                    let (id, status): (i64, String) = (row.try_get(0)?, row.try_get(1)?);
                    format!("project {project}: moved task {id} to {status}")
                }
                None => format!("project {project}: no task to move"),
            })
        }
        50..=69 => {
            let row = client
                .query_one(
                    "INSERT INTO tasks (project_id, title, status, priority, assignee_id, created_by, is_private, created_at, updated_at)
                     SELECT $1, $2, 'todo', (random() * 3)::int,
                            (SELECT user_id FROM project_members WHERE project_id = $1 ORDER BY random() LIMIT 1),
                            (SELECT owner_id FROM projects WHERE id = $1), $3, now(), now()
                     RETURNING id",
                    &[&project, &title, &private],
                )
                .await?;
            let id: i64 = row.try_get(0)?;
            let kind = if private { "private task" } else { "task" };
            Ok(format!("project {project}: created {kind} {id} {title:?}"))
        }
        _ => {
            let added = client
                .execute(
                    "INSERT INTO comments (task_id, project_id, author_id, body, created_at, updated_at)
                     SELECT t.id, t.project_id,
                            (SELECT user_id FROM project_members WHERE project_id = t.project_id ORDER BY random() LIMIT 1),
                            $2, now(), now()
                       FROM tasks t WHERE t.project_id = $1 ORDER BY random() LIMIT 1",
                    &[&project, &comment],
                )
                .await?;
            Ok(format!("project {project}: {added} comment {comment:?}"))
        }
    }
}
