//! An UPDATE's `old` (the previous values of the changed columns) is worked out by the relay from
//! the whole old row (src/capture/changed.rs). It must be what `pgrelay.changes_between()` says in
//! SQL, byte for byte, and never hold a column the watch hides.

mod common;

use pgrelay::capture::outbox::{self, Batch, Op};
use pgrelay::capture::position::Snapshot;

async fn snapshot(db: &tokio_postgres::Client) -> Snapshot {
    outbox::current_snapshot(db).await.expect("snapshot")
}

/// (id, op, old) of every change between two snapshots, as the relay reads them.
async fn relay_reads(
    db: &tokio_postgres::Client,
    since: &Snapshot,
    upto: &Snapshot,
) -> Vec<(i64, &'static str, Option<String>)> {
    let statement = db.prepare(outbox::READ_BATCH).await.expect("prepare");
    let mut batch = Batch::read(db, &statement, since, Some(upto), None)
        .await
        .expect("read");
    let mut changes = Vec::new();
    loop {
        let chunk = batch.next_chunk(7).await.expect("chunk");
        if chunk.is_empty() {
            return changes;
        }
        changes.extend(
            chunk
                .into_iter()
                .map(|c| (c.id, c.op.as_str(), c.old.map(|o| o.get().to_owned()))),
        );
    }
}

/// The same from SQL, for DBAs.
async fn sql_says(
    db: &tokio_postgres::Client,
    since: &Snapshot,
    upto: &Snapshot,
) -> Vec<(i64, &'static str, Option<String>)> {
    db.query(
        "SELECT id, op, old::text FROM pgrelay.changes_between($1::text::pg_snapshot, $2::text::pg_snapshot)",
        &[&since.to_pg(), &upto.to_pg()],
    )
    .await
    .expect("changes_between")
    .iter()
    .map(|r| {
        let op = match r.get::<_, &str>(1) {
            "INSERT" => Op::Insert,
            "UPDATE" => Op::Update,
            _ => Op::Delete,
        };
        (r.get(0), op.as_str(), r.get(2))
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_computes_the_changed_columns_exactly_as_sql_does() {
    let db = common::connect(&common::fresh_database().await).await;
    db.batch_execute(
        r#"CREATE TABLE kinds (id int PRIMARY KEY, n numeric, f float8, doc jsonb, t text,
                               secret text, arr int[], "we""ird name" text, at timestamptz);
           SELECT pgrelay.watch('kinds', ARRAY['board:1'], exclude => ARRAY['secret']);
           CREATE TABLE cards (id int PRIMARY KEY, owner text, title text, api_key text);
           SELECT pgrelay.watch('cards', ARRAY['board:1'], include => ARRAY['id', 'title']);
           INSERT INTO kinds VALUES
               (1, 1.0, 1.5, '{"x": 1.0, "y": [1, "a"]}', 'plain', 's1', '{1,2}', 'w', now()),
               (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
               (3, 100, -0.25, '[]', E'quote " backslash \\ newline \n tab \t', 's3', '{}', '', now());
           INSERT INTO cards VALUES (1, 'u1', 'hello', 'k1');"#,
    )
    .await
    .expect("setup");
    let since = snapshot(&db).await;
    db.batch_execute(
        r#"-- The same numeric in another form: recorded (the rows differ byte for byte) with an
           -- empty `old` (equal as jsonb), in a column and inside a document.
           UPDATE kinds SET n = 1.00 WHERE id = 1;
           UPDATE kinds SET doc = '{"x": 1.000, "y": [1, "a"]}' WHERE id = 1;
           UPDATE kinds SET n = 2, f = 1.25 WHERE id = 1;
           UPDATE kinds SET doc = '{"x": 1.0, "y": [1, "b"]}' WHERE id = 1;
           -- NULL to values and back.
           UPDATE kinds SET n = 0, f = 0, doc = 'null', t = '', arr = '{}', "we""ird name" = 'x' WHERE id = 2;
           UPDATE kinds SET n = NULL, doc = NULL, "we""ird name" = NULL WHERE id = 2;
           -- Only the hidden column: an UPDATE without visible changes.
           UPDATE kinds SET secret = 'changed' WHERE id = 1;
           -- Hidden and visible ones at once; escapes in values.
           UPDATE kinds SET secret = 'again', t = E'new \u00e9 "q"' WHERE id = 3;
           UPDATE kinds SET at = at + interval '1 second', arr = '{3}' WHERE id = 3;
           -- Several rows in one statement, some unchanged (not recorded).
           UPDATE kinds SET f = CASE WHEN id = 3 THEN 7 ELSE f END, t = t;
           -- A key change: a deletion and a creation, neither with `old`.
           UPDATE kinds SET id = 4, n = 5 WHERE id = 2;
           -- With include: the columns not included never show, changed or not.
           UPDATE cards SET title = 'bye', api_key = 'k2' WHERE id = 1;
           UPDATE cards SET owner = 'u2', api_key = 'k3' WHERE id = 1;
           DELETE FROM kinds WHERE id = 3;"#,
    )
    .await
    .expect("updates");
    let upto = snapshot(&db).await;

    let relay = relay_reads(&db, &since, &upto).await;
    let sql = sql_says(&db, &since, &upto).await;
    assert_eq!(relay, sql);

    let mut olds: Vec<&str> = relay
        .iter()
        .filter_map(|(_, _, old)| old.as_deref())
        .collect();
    // (`at` is written in the session's time zone.)
    let at = olds.remove(8);
    assert!(
        at.starts_with(r#"{"at": ""#) && at.ends_with(r#"", "arr": []}"#),
        "{at}"
    );
    assert_eq!(
        olds,
        [
            "{}",
            "{}",
            r#"{"f": 1.5, "n": 1.00}"#,
            r#"{"doc": {"x": 1.000, "y": [1, "a"]}}"#,
            // A jsonb `null` and SQL's NULL are both `null` in the row: `doc` did not change.
            r#"{"f": null, "n": null, "t": null, "arr": null, "we\"ird name": null}"#,
            r#"{"n": 0, "we\"ird name": "x"}"#,
            "{}",
            r#"{"t": "quote \" backslash \\ newline \n tab \t"}"#,
            r#"{"f": -0.25}"#,
            r#"{"title": "hello"}"#,
            "{}",
        ]
    );
    let ops: Vec<&str> = relay.iter().map(|(_, op, _)| *op).collect();
    assert_eq!(
        ops.iter().filter(|op| **op == "UPDATE").count(),
        olds.len() + 1
    );
    assert!(
        ops.contains(&"DELETE") && ops.contains(&"INSERT"),
        "{ops:?}"
    );
    for old in olds.iter().chain([&at]) {
        assert!(
            !old.contains("secret") && !old.contains("owner") && !old.contains("api_key"),
            "a hidden column in {old}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_recorded_with_only_their_changed_columns_read_as_before() {
    // Before the capture recorded whole old rows, `old` held just the changed columns; such
    // changes may still be in the outbox when a relay is upgraded.
    let db = common::connect(&common::fresh_database().await).await;
    let since = snapshot(&db).await;
    db.batch_execute(
        r#"INSERT INTO pgrelay.changes (gen, tbl, entity, op, rooms, "row", old)
           VALUES (0, 'tasks', 'task', 'UPDATE', '{project:1}',
                   '{"id": 1, "title": "new", "status": "done"}', '{"title": "old"}');"#,
    )
    .await
    .expect("insert");
    let upto = snapshot(&db).await;
    let relay = relay_reads(&db, &since, &upto).await;
    assert_eq!(relay, sql_says(&db, &since, &upto).await);
    assert_eq!(relay[0].2.as_deref(), Some(r#"{"title": "old"}"#));
}
