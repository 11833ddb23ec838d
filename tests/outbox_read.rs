//! The relay prepares its outbox read once per connection and Postgres keeps that plan. It is
//! often made while the outbox holds little (a fresh install's first data; a partition that
//! maintain() just emptied), so it must not be a plan that is only good for a small outbox: a
//! sequential scan chosen then scans the whole partition on every read once it has filled, and
//! under sustained writes the relay's lag grows with the partition.

mod common;

use pgrelay::capture::outbox;

/// A project with 3,000 tasks, in one transaction.
async fn fill(db: &tokio_postgres::Client) {
    db.batch_execute(
        "INSERT INTO users VALUES ('bulk', 'Bulk') ON CONFLICT DO NOTHING;
         WITH p AS (INSERT INTO projects (name, owner_id) VALUES ('big', 'bulk') RETURNING id)
         INSERT INTO tasks (project_id, title) SELECT p.id, 'task ' || g FROM p, generate_series(1, 3000) AS g",
    )
    .await
    .expect("fill the outbox");
}

#[tokio::test]
async fn a_read_planned_on_a_small_outbox_scans_no_partition_once_it_is_full() {
    let url = common::fresh_database().await;
    let db = common::connect(&url).await;
    // What autovacuum finds after a first bulk load: few transactions of many rows each, so
    // that a sequential scan looks cheaper than the xid index for finding one transaction.
    fill(&db).await;
    db.batch_execute("ANALYZE pgrelay.changes")
        .await
        .expect("analyze");
    db.batch_execute(&format!(
        "SET plan_cache_mode = force_generic_plan;
         PREPARE read_batch(text, text, text[]) AS {}",
        outbox::READ_BATCH
    ))
    .await
    .expect("prepare the relay's read");
    db.batch_execute("EXECUTE read_batch(pg_current_snapshot()::text, NULL, NULL)")
        .await
        .expect("first read: the plan is made now");

    fill(&db).await;
    // A read whose start saw that transaction still running: its changes are found by the
    // probe for running transactions, one half of the read.
    let xid: String = db
        .query_one("SELECT max(xid)::text FROM pgrelay.changes", &[])
        .await
        .expect("the transaction's xid")
        .get(0);
    let xid: u64 = xid.parse().expect("an xid");
    let since = format!("{xid}:{}:{xid}", xid + 1);
    // EXECUTE takes no bind parameters; the snapshot is our own digits.
    let read = format!("EXECUTE read_batch('{since}', NULL, NULL)");
    let rows = db.query(&read, &[]).await.expect("read");
    assert_eq!(
        rows.len(),
        3001,
        "the project and its 3,000 tasks, once each"
    );
    let plan: Vec<String> = db
        .query(&format!("EXPLAIN (ANALYZE, COSTS OFF) {read}"), &[])
        .await
        .expect("explain")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(
        !plan.contains("Seq Scan on changes"),
        "the read scans outbox partitions sequentially:\n{plan}"
    );
}
