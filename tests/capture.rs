//! Capture: every committed change is read exactly once, in commit order, whatever the
//! interleaving of transactions, the size of rows, or the fate of the relay's connections.

mod common;

use std::time::Duration;

use common::TestRelay;
use serde_json::Value;

fn title(event: &Value) -> &str {
    event["row"]["title"]
        .as_str()
        .unwrap_or_else(|| panic!("no title in {event}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_committing_after_a_younger_one_is_not_skipped() {
    let relay = TestRelay::start().await;
    let mut alice = relay.client("u1").await;
    alice.join("project:1").await;

    // `early` gets the lower outbox id but commits last: an `id > last seen` reader would skip it.
    let early = common::connect(&relay.db_url).await;
    early
        .batch_execute("BEGIN; UPDATE tasks SET title = 'early' WHERE id = 1")
        .await
        .expect("begin");
    relay
        .sql("UPDATE tasks SET title = 'late' WHERE id = 2")
        .await;
    assert_eq!(title(&alice.recv_event().await), "late");

    early.batch_execute("COMMIT").await.expect("commit");
    let event = alice.recv_event().await;
    assert_eq!(title(&event), "early");

    // Both ids are valid resume positions, and nothing else arrives.
    relay
        .sql("UPDATE tasks SET title = 'after' WHERE id = 2")
        .await;
    assert_eq!(title(&alice.recv_event().await), "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_open_transaction_holds_back_nobody() {
    let relay = TestRelay::start().await;
    let mut alice = relay.client("u1").await;
    alice.join("project:1").await;

    let slow = common::connect(&relay.db_url).await;
    slow.batch_execute("BEGIN; INSERT INTO tasks (project_id, title) VALUES (1, 'slow')")
        .await
        .expect("begin");
    for i in 0..5 {
        relay
            .sql(&format!(
                "UPDATE tasks SET title = 'quick {i}' WHERE id = 2"
            ))
            .await;
        assert_eq!(title(&alice.recv_event().await), format!("quick {i}"));
    }
    slow.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(title(&alice.recv_event().await), "slow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_kb_row_arrives_intact() {
    let relay = TestRelay::start().await;
    let mut alice = relay.client("u1").await;
    alice.join("task:1").await;

    // Far beyond NOTIFY's 8000-byte payload limit, with characters JSON must escape.
    let description: String = (0..100_000)
        .map(|i| ["a", "é", "\"", "\\", "\n", "7"][i % 6])
        .collect();
    relay
        .db
        .execute(
            "UPDATE tasks SET description = $1 WHERE id = 1",
            &[&description],
        )
        .await
        .expect("update");
    let event = alice.recv_event().await;
    assert_eq!(
        event["row"]["description"].as_str(),
        Some(description.as_str())
    );
    assert_eq!(
        event["old"]["description"],
        Value::Null,
        "the old description was NULL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_committed_while_the_listen_connection_is_down_are_delivered_after_it_reconnects() {
    // No polling: only the listener's reconnect can trigger the catch-up.
    let relay = TestRelay::start_with(|c| c.poll_interval = Duration::from_secs(3600)).await;
    let mut alice = relay.client("u1").await;
    alice.join("project:1").await;

    // The relay sleeps, waiting for a NOTIFY on the connection we kill.
    assert_eq!(
        common::kill_sleeping_listen_connection(&relay.db).await,
        1,
        "exactly the relay's LISTEN connection"
    );

    for i in 0..20 {
        relay
            .sql(&format!(
                "UPDATE tasks SET title = 'while down {i}' WHERE id = 2"
            ))
            .await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 0..20 {
        assert_eq!(title(&alice.recv_event().await), format!("while down {i}"));
    }
    assert_eq!(
        relay.metric("listener_reconnects_total").await,
        1,
        "one kill, one reconnect"
    );
    relay
        .sql("UPDATE tasks SET title = 'after' WHERE id = 2")
        .await;
    assert_eq!(
        title(&alice.recv_event().await),
        "after",
        "no duplicates, live again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_relay_connection_killed_mid_stream_loses_and_repeats_nothing() {
    let relay = TestRelay::start().await;
    let mut alice = relay.client("u1").await;
    alice.join("project:1").await;

    let writer = {
        let url = relay.db_url.clone();
        tokio::spawn(async move {
            // Named in the connection string, so the kills below can never catch it unnamed.
            let db = common::connect(&format!("{url}?application_name=test-writer")).await;
            for i in 0..200 {
                db.batch_execute(&format!("UPDATE tasks SET title = 'n{i}' WHERE id = 2"))
                    .await
                    .expect("write");
                if i % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    // Kill the relay's connections (LISTEN, reader, authorizer) a few times while writes go on.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        relay
            .sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()
                   AND application_name <> 'test-writer'",
            )
            .await;
    }
    writer.await.expect("writer");
    for i in 0..200 {
        assert_eq!(title(&alice.recv_event().await), format!("n{i}"));
    }
    relay
        .sql("UPDATE tasks SET title = 'fence' WHERE id = 2")
        .await;
    assert_eq!(
        title(&alice.recv_event().await),
        "fence",
        "nothing repeated"
    );
    // The LISTEN connection is always among the killed (reads fail only when a kill lands mid-query).
    assert!(relay.metric("listener_reconnects_total").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sql_library_validates_watches_and_unwatch_stops_capture() {
    let relay = TestRelay::start().await;
    let db = &relay.db;
    let error = |sql: &'static str| async move {
        let err = db.batch_execute(sql).await.expect_err(sql);
        err.as_db_error()
            .map(|e| e.message().to_owned())
            .unwrap_or_default()
    };
    relay
        .sql("CREATE TABLE notes (id int PRIMARY KEY, body text, secret text, owner text)")
        .await;
    relay.sql("CREATE TABLE nopk (body text)").await;
    relay
        .sql("CREATE FUNCTION bad_policy(a int) RETURNS boolean LANGUAGE sql AS 'SELECT true'")
        .await;
    relay
        .sql("CREATE FUNCTION can_read_note(u text, c jsonb, r jsonb) RETURNS boolean LANGUAGE sql AS $$ SELECT r->>'owner' = u $$")
        .await;

    assert!(error("SELECT pgrelay.watch('nopk', ARRAY['x:{body}'])")
        .await
        .contains("primary key"));
    assert!(error("SELECT pgrelay.watch('notes', ARRAY['note:{nope}'])")
        .await
        .contains("nope"));
    assert!(error("SELECT pgrelay.watch('notes', ARRAY['note:{id'])")
        .await
        .contains("brace"));
    assert!(
        error("SELECT pgrelay.watch('notes', ARRAY['note:{id}'], 'bad_policy')")
            .await
            .contains("must be declared")
    );

    relay
        .sql("SELECT pgrelay.watch('notes', ARRAY['user:{owner}'], 'can_read_note', exclude => ARRAY['secret'])")
        .await;
    // Watching again replaces the settings (idempotent for a DBA re-running a script).
    relay
        .sql("SELECT pgrelay.watch('notes', ARRAY['user:{owner}'], 'can_read_note', exclude => ARRAY['secret'])")
        .await;
    let mut alice = relay.client("u1").await;
    alice.join("user:u1").await;
    relay
        .sql("INSERT INTO notes VALUES (1, 'hello', 'hunter2', 'u1'), (2, 'not yours', 'x', 'u2')")
        .await;
    let event = alice.recv_event().await;
    assert_eq!(event["event"], "note_created");
    assert_eq!(
        event["row"],
        serde_json::json!({"id": 1, "body": "hello", "owner": "u1"}),
        "secret excluded"
    );

    relay.sql("SELECT pgrelay.unwatch('notes')").await;
    relay
        .sql("INSERT INTO notes VALUES (3, 'unseen', 'x', 'u1')")
        .await;
    let count: i64 = db
        .query_one(
            "SELECT count(*) FROM pgrelay.changes WHERE tbl = 'notes'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 2, "nothing captured after unwatch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_is_captured_by_one_trigger_call_whatever_its_row_count() {
    let relay = TestRelay::start().await;
    relay
        .sql("INSERT INTO tasks (project_id, title) SELECT 1, 'bulk' FROM generate_series(1, 500)")
        .await;
    let mut tx = common::connect(&relay.db_url).await;
    let tx = tx.transaction().await.expect("begin");
    tx.batch_execute(
        "SET LOCAL track_functions = 'all'; UPDATE tasks SET priority = 1 WHERE project_id = 1",
    )
    .await
    .expect("update");
    let calls: i64 = tx
        .query_one(
            "SELECT calls FROM pg_stat_xact_user_functions
             WHERE funcid = format('pgrelay.capture_%s()', 'tasks'::regclass::oid)::regprocedure",
            &[],
        )
        .await
        .expect("function stats")
        .get(0);
    let captured: i64 = tx
        .query_one(
            "SELECT count(*) FROM pgrelay.changes WHERE xid = pg_current_xact_id()",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    tx.commit().await.expect("commit");
    assert_eq!(
        calls, 1,
        "statement-level trigger: one call for the whole statement"
    );
    assert_eq!(captured, 503, "one change per row (500 + the 3 demo tasks)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_key_change_is_a_deletion_and_a_creation() {
    let relay = TestRelay::start().await;
    let mut bob = relay.client("u2").await;
    bob.join("user:u2").await;
    relay
        .sql("UPDATE project_members SET project_id = 2 WHERE project_id = 1 AND user_id = 'u2'")
        .await;
    let mut seen: Vec<(String, i64)> = Vec::new();
    for _ in 0..2 {
        let e = bob.recv_event().await;
        seen.push((
            e["event"].as_str().unwrap_or_default().to_owned(),
            e["row"]["project_id"].as_i64().unwrap_or(0),
        ));
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            ("project_member_created".to_owned(), 2),
            ("project_member_deleted".to_owned(), 1)
        ]
    );
}

/// What the capture wrote for `tbl`, oldest first: (op, row, old).
async fn recorded(db: &tokio_postgres::Client, tbl: &str) -> Vec<(String, Value, Option<Value>)> {
    db.query(
        "SELECT op, \"row\"::text, old::text FROM pgrelay.changes WHERE tbl = $1 ORDER BY id",
        &[&tbl],
    )
    .await
    .expect("outbox")
    .iter()
    .map(|r| {
        let json = |s: &str| serde_json::from_str::<Value>(s).expect("json");
        (
            r.get::<_, String>(0),
            json(r.get(1)),
            r.get::<_, Option<&str>>(2).map(json),
        )
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_record_only_changed_rows_whatever_the_column_types() {
    let relay = TestRelay::start().await;
    // json and point have no equality operator: rows are compared as a whole, byte for byte.
    relay
        .sql(
            "CREATE TABLE shapes (id int PRIMARY KEY, doc json, at point, n int);
             SELECT pgrelay.watch('shapes', ARRAY['board:1']);
             INSERT INTO shapes VALUES (1, '{\"a\": 1}', '(1,1)', 1), (2, '[]', '(2,2)', 2), (3, NULL, NULL, 3);
             UPDATE shapes SET doc = doc, at = at, n = n;
             UPDATE shapes SET doc = '{\"a\": 2}' WHERE id = 1;
             UPDATE shapes SET at = CASE WHEN id = 2 THEN point(5, 5) ELSE at END, n = n;
             UPDATE shapes SET id = 4, doc = doc WHERE id = 3;",
        )
        .await;
    let ops: Vec<(String, i64)> = recorded(&relay.db, "shapes")
        .await
        .into_iter()
        .map(|(op, row, _)| (op, row["id"].as_i64().unwrap_or(0)))
        .collect();
    let mut ops: Vec<(&str, i64)> = ops.iter().map(|(op, id)| (op.as_str(), *id)).collect();
    // The two records of one statement come in no particular order.
    ops[5..].sort();
    assert_eq!(
        ops,
        [
            ("INSERT", 1),
            ("INSERT", 2),
            ("INSERT", 3),
            // The UPDATE that changed nothing recorded nothing; each later one its changed row.
            ("UPDATE", 1),
            ("UPDATE", 2),
            // A primary-key change: the old row deleted, the new one created.
            ("DELETE", 3),
            ("INSERT", 4),
        ]
    );
    let records = recorded(&relay.db, "shapes").await;
    assert_eq!(
        records[3].2.as_ref().map(|old| &old["doc"]),
        Some(&serde_json::json!({"a": 1})),
        "an UPDATE records the old row"
    );
    assert!(
        records[5..].iter().all(|(_, _, old)| old.is_none()),
        "a deletion and a creation have no old row"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_whose_generation_column_has_no_default_is_upgraded() {
    // Before the generation became the default of pgrelay.changes.gen, the capture functions
    // wrote it themselves; running the library again must add the default before the functions
    // that rely on it.
    let db = common::connect(&common::fresh_database().await).await;
    db.batch_execute("ALTER TABLE pgrelay.changes ALTER COLUMN gen DROP DEFAULT")
        .await
        .expect("old layout");
    db.batch_execute(pgrelay::db::migrate::LIBRARY)
        .await
        .expect("upgrade");
    db.batch_execute(
        "UPDATE tasks SET priority = 1 WHERE id = 1;
         SELECT nextval('pgrelay.generation'), nextval('pgrelay.generation');
         UPDATE tasks SET priority = 2 WHERE id = 1;",
    )
    .await
    .expect("updates");
    let gens: Vec<(i16, String)> = db
        .query(
            "SELECT gen, tableoid::regclass::text FROM pgrelay.changes
             WHERE tbl = 'tasks' AND op = 'UPDATE' ORDER BY id",
            &[],
        )
        .await
        .expect("outbox")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        gens,
        [
            (0, "pgrelay.changes_0".to_owned()),
            (1, "pgrelay.changes_1".to_owned())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_old_values_updates_are_captured_without_them() {
    let relay = TestRelay::start().await;
    relay
        .sql(
            "CREATE TABLE notes (id int PRIMARY KEY, body text);
             CREATE FUNCTION can_read_note(u text, c jsonb, r jsonb) RETURNS boolean LANGUAGE sql AS 'SELECT true';
             SELECT pgrelay.watch('notes', ARRAY['board:1'], 'can_read_note', old_values => false);
             CREATE FUNCTION can_join_board(u text, c jsonb, k text) RETURNS boolean LANGUAGE sql AS 'SELECT true';
             SELECT pgrelay.allow_join('board', 'can_join_board');",
        )
        .await;
    let mut bob = relay.client("u2").await;
    bob.join("board:1").await;
    relay
        .sql("INSERT INTO notes VALUES (1, 'draft'); UPDATE notes SET body = 'final' WHERE id = 1")
        .await;
    assert_eq!(bob.recv_event().await["event"], "note_created");
    let event = bob.recv_event().await;
    assert_eq!(
        (event["event"].as_str(), event["row"]["body"].as_str()),
        (Some("note_updated"), Some("final"))
    );
    assert!(event.get("old").is_none(), "{event}");
    assert_eq!(recorded(&relay.db, "notes").await[1].2, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excluded_columns_are_never_shipped_but_policies_still_see_them() {
    let relay = TestRelay::start().await;
    relay
        .sql(
            "CREATE TABLE notes (id int PRIMARY KEY, owner text, visibility text, body text);
             CREATE FUNCTION can_read_note(u text, c jsonb, r jsonb) RETURNS boolean LANGUAGE sql
                 AS $$ SELECT r->>'visibility' = 'public' OR r->>'owner' = u $$;
             SELECT pgrelay.watch('notes', ARRAY['board:1'], 'can_read_note', exclude => ARRAY['visibility']);
             CREATE FUNCTION can_join_board(u text, c jsonb, k text) RETURNS boolean LANGUAGE sql AS 'SELECT true';
             SELECT pgrelay.allow_join('board', 'can_join_board');",
        )
        .await;
    let mut bob = relay.client("u2").await;
    bob.join("board:1").await;
    relay
        .sql(
            "INSERT INTO notes VALUES (1, 'u1', 'private', 'hidden'), (2, 'u1', 'public', 'shown')",
        )
        .await;
    let event = bob.recv_event().await;
    assert_eq!(
        event["row"],
        serde_json::json!({"id": 2, "owner": "u1", "body": "shown"})
    );
    // Making note 1 public changes only an excluded column: bob still learns the note appeared.
    relay
        .sql("UPDATE notes SET visibility = 'public' WHERE id = 1")
        .await;
    let event = bob.recv_event().await;
    assert_eq!(
        (event["event"].as_str(), event["row"]["body"].as_str()),
        (Some("note_created"), Some("hidden"))
    );
    assert!(event["row"].get("visibility").is_none());
    // Nor do their previous values travel in `old`.
    relay
        .sql(
            "INSERT INTO notes VALUES (3, 'u2', 'draft', 'mine');
             UPDATE notes SET visibility = 'final', body = 'done' WHERE id = 3",
        )
        .await;
    assert_eq!(bob.recv_event().await["event"], "note_created");
    let event = bob.recv_event().await;
    assert_eq!(event["event"], "note_updated");
    assert_eq!(event["old"], serde_json::json!({"body": "mine"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_works_for_unprivileged_roles_other_schemas_and_look_alike_names() {
    let relay = TestRelay::start().await;
    let role = format!("app_{}", std::process::id());
    relay
        .sql(&format!(
            "CREATE SCHEMA a;
             CREATE TABLE a.b (id int PRIMARY KEY, owner text);
             CREATE TABLE public.a_b (id int PRIMARY KEY, owner text);
             CREATE FUNCTION a.can_read_b(u text, c jsonb, r jsonb) RETURNS boolean LANGUAGE sql
                 AS $$ SELECT r->>'owner' = u $$;
             SET search_path = a, public;
             SELECT pgrelay.watch('a.b', ARRAY['user:{{owner}}'], 'can_read_b');
             RESET search_path;
             SELECT pgrelay.watch('public.a_b', ARRAY['user:{{owner}}'], 'a.can_read_b', entity => 'ab');
             DO $$ BEGIN
                 IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN CREATE ROLE {role}; END IF;
             END $$;
             GRANT USAGE ON SCHEMA a TO {role};
             GRANT ALL ON a.b, public.a_b, tasks TO {role};"
        ))
        .await;
    let mut alice = relay.client("u1").await;
    alice.join("user:u1").await;
    // The application's role has no rights on schema pgrelay, yet its writes are captured.
    relay
        .sql(&format!(
            "SET ROLE {role}; INSERT INTO a.b VALUES (1, 'u1'); INSERT INTO public.a_b VALUES (1, 'u1'); RESET ROLE;"
        ))
        .await;
    let first = alice.recv_event().await;
    let second = alice.recv_event().await;
    assert_eq!(
        (first["table"].as_str(), first["event"].as_str()),
        (Some("a.b"), Some("b_created"))
    );
    assert_eq!(
        (second["table"].as_str(), second["event"].as_str()),
        (Some("a_b"), Some("ab_created"))
    );
    // ... but it cannot write the outbox directly (forging events).
    let forged = relay
        .db
        .batch_execute(&format!(
            "SET ROLE {role}; INSERT INTO pgrelay.changes (gen, tbl, entity, op, rooms, \"row\")
             VALUES (0, 'tasks', 'task', 'INSERT', '{{user:u1}}', '{{}}')"
        ))
        .await;
    relay.sql("RESET ROLE").await;
    let refused = forged.expect_err("application roles must not write the outbox");
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "refused for want of privileges (42501), not for some other reason: {refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_read_the_same_outbox_independently() {
    let first = TestRelay::start().await;
    let second = pgrelay::server::Relay::start(common::config(&first.db_url))
        .await
        .expect("second relay");
    let mut on_first = first.client("u1").await;
    on_first.join("task:1").await;
    let url = format!(
        "ws://{}/ws?token={}",
        second.local_addr(),
        common::token("u1")
    );
    let mut on_second = common::WsClient::connect(&url).await.expect("connect");
    assert_eq!(on_second.recv().await["type"], "ready");
    on_second.join("task:1").await;
    for i in 0..50 {
        first
            .sql(&format!("UPDATE tasks SET priority = {i} WHERE id = 1"))
            .await;
    }
    for i in 0..50 {
        assert_eq!(on_first.recv_event().await["row"]["priority"], i);
        assert_eq!(on_second.recv_event().await["row"]["priority"], i);
    }
    second.shutdown().await;
}

fn title_or_priority(event: &Value) -> i64 {
    event["row"]["priority"].as_i64().unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_view_shows_each_relays_backlog() {
    let mut relay =
        TestRelay::start_with(|c| c.maintenance_interval = Duration::from_millis(50)).await;
    // A relay that stopped reading at this point.
    relay.sql("INSERT INTO pgrelay.relays VALUES ('stale:1', now(), now(), pg_current_snapshot()::text, 0)").await;
    for i in 0..5 {
        relay
            .sql(&format!("UPDATE tasks SET priority = {i} WHERE id = 1"))
            .await;
    }
    let lag = |name: &'static str| {
        let db = &relay.db;
        async move {
            db.query_opt(
                "SELECT backlog, alive FROM pgrelay.lag WHERE name LIKE $1",
                &[&name],
            )
            .await
            .expect("lag")
            .map(|r| (r.get::<_, i64>(0), r.get::<_, bool>(1)))
        }
    };
    let mut ours = None;
    for _ in 0..100 {
        ours = lag_of_running(&relay.db).await;
        if ours == Some((0, true)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        ours,
        Some((0, true)),
        "the running relay has delivered everything"
    );
    assert_eq!(
        lag("stale:1").await,
        Some((5, true)),
        "the stale one is 5 changes behind"
    );

    relay.relay.take().expect("running").shutdown().await;
    assert_eq!(
        lag_of_running(&relay.db).await,
        None,
        "a relay that stops cleanly leaves"
    );
}

async fn lag_of_running(db: &tokio_postgres::Client) -> Option<(i64, bool)> {
    db.query_opt(
        "SELECT backlog, alive FROM pgrelay.lag WHERE name <> 'stale:1'",
        &[],
    )
    .await
    .expect("lag")
    .map(|r| (r.get::<_, i64>(0), r.get::<_, bool>(1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_can_come_from_a_lookup_function() {
    let relay = TestRelay::start().await;
    // Comments also go to the room of their task's assignee (a lookup, not a column).
    relay
        .sql(
            "CREATE FUNCTION comment_rooms(r jsonb) RETURNS text[] LANGUAGE sql STABLE AS $$
                 SELECT ARRAY(SELECT 'user:' || t.assignee_id FROM public.tasks t
                              WHERE t.id = (r->>'task_id')::bigint AND t.assignee_id IS NOT NULL)
             $$;
             SELECT pgrelay.watch('comments', rooms => ARRAY['project:{project_id}', 'task:{task_id}'],
                                  policy => 'can_read_comment', room_fn => 'comment_rooms');",
        )
        .await;
    let mut bob = relay.client("u2").await; // assignee of task 1
    bob.join("user:u2").await;
    relay.sql("INSERT INTO comments (task_id, project_id, author_id, body) VALUES (1, 1, 'u1', 'for bob')").await;
    let event = bob.recv_event().await;
    assert_eq!(
        (event["room"].as_str(), event["row"]["body"].as_str()),
        (Some("user:u2"), Some("for bob"))
    );

    let db = &relay.db;
    let bad = db
        .batch_execute("SELECT pgrelay.watch('tasks', ARRAY['x:{id}'], room_fn => 'can_read_task')")
        .await
        .expect_err("wrong signature");
    assert!(bad
        .as_db_error()
        .is_some_and(|e| e.message().contains("RETURNS text[]")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_for_30_seconds_delays_only_itself() {
    let relay = TestRelay::start().await;
    let mut alice = relay.client("u1").await;
    alice.join("project:1").await;
    alice.join("user:u1").await;

    // A batch job writes to another watched table and keeps its transaction open for 30 s.
    let job = common::connect(&relay.db_url).await;
    job.batch_execute(
        "BEGIN; INSERT INTO projects (id, name, owner_id) VALUES (2000, 'batch', 'u1');
                       INSERT INTO project_members VALUES (2000, 'u1', 'owner');",
    )
    .await
    .expect("begin");
    let opened = std::time::Instant::now();
    let mut i = 0;
    while opened.elapsed() < Duration::from_secs(30) {
        let committed = std::time::Instant::now();
        relay
            .sql(&format!("UPDATE tasks SET priority = {i} WHERE id = 1"))
            .await;
        let event = alice.recv_event().await;
        assert_eq!(event["row"]["priority"], i);
        // Normal latency, not "after the long transaction": generous for a loaded CI machine.
        assert!(
            committed.elapsed() < Duration::from_secs(3),
            "delivery waited on the open transaction"
        );
        i += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    job.batch_execute("COMMIT").await.expect("commit");
    // Its own changes arrive when it commits.
    let event = alice.recv_event().await;
    assert_eq!(
        (event["event"].as_str(), event["row"]["project_id"].as_i64()),
        (Some("project_member_created"), Some(2000))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_include_a_column_added_later_is_not_shipped() {
    let relay = TestRelay::start().await;
    relay
        .sql(
            "CREATE TABLE cards (id int PRIMARY KEY, owner text, title text);
             CREATE FUNCTION can_read_card(u text, c jsonb, r jsonb) RETURNS boolean LANGUAGE sql
                 AS $$ SELECT r->>'owner' = u $$;
             SELECT pgrelay.watch('cards', ARRAY['user:{owner}'], 'can_read_card',
                                  include => ARRAY['id', 'owner', 'title']);
             ALTER TABLE cards ADD COLUMN api_key text;",
        )
        .await;
    let mut alice = relay.client("u1").await;
    alice.join("user:u1").await;
    relay
        .sql("INSERT INTO cards VALUES (1, 'u1', 'hello', 'sk-secret')")
        .await;
    let event = alice.recv_event().await;
    assert_eq!(
        event["row"],
        serde_json::json!({"id": 1, "owner": "u1", "title": "hello"})
    );
    relay
        .sql("UPDATE cards SET title = 'bye', api_key = 'sk-other' WHERE id = 1")
        .await;
    let event = alice.recv_event().await;
    assert_eq!(event["old"], serde_json::json!({"title": "hello"}));
    assert_eq!(event["row"]["title"], "bye");
    assert!(event["row"].get("api_key").is_none());
}

// ---------------------------------------------------------------------------------------------
// Wake-ups: writers notify only while a relay sleeps (src/capture/wakeup.rs). Every relay below
// polls once an hour, so only a wake-up can deliver within the tests' 10-second waits.
// ---------------------------------------------------------------------------------------------

const NO_POLL: Duration = Duration::from_secs(3600);

/// Notifications on channel `pgrelay` seen by a connection of our own.
async fn notification_counter(
    url: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let (listener, mut connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let (tx, notifications) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) =
            futures_util::future::poll_fn(|cx| connection.poll_message(cx)).await
        {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                if n.channel() == "pgrelay" {
                    let _ = tx.send(());
                }
            }
        }
    });
    listener
        .batch_execute("LISTEN pgrelay")
        .await
        .expect("listen");
    (listener, notifications)
}

async fn lock(db: &tokio_postgres::Client, function: &str, key: i32) {
    db.execute(
        &format!("SELECT {function}($1, $2)"),
        &[&pgrelay::capture::wakeup::LOCK_CLASS, &key],
    )
    .await
    .unwrap_or_else(|e| panic!("{function}: {e}"));
}

/// Whether this session holds the "writing" lock: it wrote and decided not to notify.
async fn holds_writing(db: &tokio_postgres::Transaction<'_>) -> bool {
    db.query_one(
        "SELECT EXISTS (SELECT FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory'
                          AND classid = $1::int4::oid AND objid = $2::int4::oid AND mode = 'ShareLock')",
        &[
            &pgrelay::capture::wakeup::LOCK_CLASS,
            &pgrelay::capture::wakeup::WRITING,
        ],
    )
    .await
    .expect("pg_locks")
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_notify_only_while_a_relay_sleeps_or_goes_to_sleep() {
    use pgrelay::capture::wakeup::{SLEEPING, WRITING};
    // No relay: the test plays the relay's part with the advisory locks.
    let url = common::fresh_database().await;
    let (_listener, mut notifications) = notification_counter(&url).await;
    let mut writer = common::connect(&url).await;
    let relay = common::connect(&url).await;

    // Nobody sleeps: the writer holds "writing" instead of notifying.
    let tx = writer.transaction().await.expect("begin");
    tx.batch_execute("UPDATE tasks SET priority = 1 WHERE id = 1")
        .await
        .expect("update");
    assert!(
        holds_writing(&tx).await,
        "a writer that did not notify holds writing"
    );
    tx.commit().await.expect("commit");

    // A relay sleeps: the next writer notifies.
    lock(&relay, "pg_advisory_lock_shared", SLEEPING).await;
    writer
        .batch_execute("UPDATE tasks SET priority = 2 WHERE id = 1")
        .await
        .expect("update");
    tokio::time::timeout(common::WAIT, notifications.recv())
        .await
        .expect("a sleeping relay is notified");
    lock(&relay, "pg_advisory_unlock_shared", SLEEPING).await;

    // A relay going to sleep waits for writers that did not notify (its barrier), and every
    // writer that writes meanwhile notifies.
    let mut slow = common::connect(&url).await;
    let slow = slow.transaction().await.expect("begin");
    slow.batch_execute("UPDATE tasks SET priority = 3 WHERE id = 2")
        .await
        .expect("update");
    assert!(holds_writing(&slow).await);
    lock(&relay, "pg_advisory_lock_shared", SLEEPING).await;
    let barrier_db = common::connect(&url).await;
    let mut barrier = tokio::spawn(async move {
        lock(&barrier_db, "pg_advisory_xact_lock", WRITING).await;
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut barrier)
            .await
            .is_err(),
        "the barrier must wait for the writer that did not notify"
    );
    // The sleeping lock is released (as by a relay that woke), yet the waiting barrier alone
    // makes a writer notify.
    lock(&relay, "pg_advisory_unlock_shared", SLEEPING).await;
    let tx = writer.transaction().await.expect("begin");
    tx.batch_execute("UPDATE tasks SET priority = 4 WHERE id = 3")
        .await
        .expect("update");
    assert!(
        !holds_writing(&tx).await,
        "writing is not granted while a barrier waits"
    );
    tx.commit().await.expect("commit");
    tokio::time::timeout(common::WAIT, notifications.recv())
        .await
        .expect("a writer notifies while a barrier waits");
    slow.commit().await.expect("commit");
    tokio::time::timeout(common::WAIT, barrier)
        .await
        .expect("the barrier passes once the writer ended")
        .expect("barrier");
}

/// Whether some session of this database holds (`granted`) or waits for one of pgrelay's
/// advisory locks: `SLEEPING` granted is a relay's sleep announcement, `WRITING` waited for is
/// its barrier.
async fn pgrelay_lock(db: &tokio_postgres::Client, key: i32, granted: bool) -> bool {
    db.query_one(
        "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND granted = $3
                          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                          AND classid = $1::int4::oid AND objid = $2::int4::oid)",
        &[&pgrelay::capture::wakeup::LOCK_CLASS, &key, &granted],
    )
    .await
    .expect("pg_locks")
    .get(0)
}

/// Waits up to 10 s for [`pgrelay_lock`] to be true.
async fn until_pgrelay_lock(db: &tokio_postgres::Client, key: i32, granted: bool) -> bool {
    for _ in 0..400 {
        if pgrelay_lock(db, key, granted).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_committed_while_the_relay_goes_to_sleep_is_delivered_by_a_wakeup() {
    use pgrelay::capture::wakeup::WRITING;
    let relay = TestRelay::start_with(|c| c.poll_interval = NO_POLL).await;
    let mut alice = relay.client("u1").await;
    alice.join("task:1").await;
    // Hold "writing" like a long transaction that did not notify: the relay's next attempt to
    // sleep waits for it, and it must keep delivering meanwhile.
    let held = common::connect(&relay.db_url).await;
    lock(&held, "pg_advisory_lock_shared", WRITING).await;
    relay
        .sql("UPDATE tasks SET priority = 100 WHERE id = 1")
        .await;
    assert_eq!(title_or_priority(&alice.recv_event().await), 100);
    for i in 0..5 {
        // Having read that, the relay is going to sleep: its barrier waits for our lock.
        assert!(
            until_pgrelay_lock(&relay.db, WRITING, false).await,
            "the relay waits for writers before it sleeps"
        );
        relay
            .sql(&format!("UPDATE tasks SET priority = {i} WHERE id = 1"))
            .await;
        assert_eq!(title_or_priority(&alice.recv_event().await), i);
    }
    lock(&held, "pg_advisory_unlock_shared", WRITING).await;
    // Then it sleeps as usual, and wakes for the next change.
    for i in 5..10 {
        relay
            .sql(&format!("UPDATE tasks SET priority = {i} WHERE id = 1"))
            .await;
        assert_eq!(title_or_priority(&alice.recv_event().await), i);
    }
    assert!(relay.metric("reader_wakeups_total").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_woken_while_going_to_sleep_stays_awake_under_sustained_writes() {
    use pgrelay::capture::wakeup::{SLEEPING, WRITING};
    let relay = TestRelay::start_with(|c| c.poll_interval = NO_POLL).await;
    let mut alice = relay.client("u1").await;
    alice.join("project:1").await;
    // A transaction that did not notify is still open, so the relay's next attempt to sleep
    // waits for it (its barrier), with its sleep announced.
    let held = common::connect(&relay.db_url).await;
    lock(&held, "pg_advisory_lock_shared", WRITING).await;
    relay
        .sql("UPDATE tasks SET priority = 0 WHERE id = 1")
        .await;
    alice.recv_event().await;
    assert!(
        until_pgrelay_lock(&relay.db, SLEEPING, true).await,
        "the relay goes to sleep once writes stop"
    );

    // Now writes flow without a pause (each notifies: the barrier waits), and the open
    // transaction ends: the relay must withdraw its announcement while it reads them, or every
    // writer goes on notifying.
    let writer_url = relay.db_url.clone();
    let keep_writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let still = keep_writing.clone();
    let writing = tokio::spawn(async move {
        let writer = common::connect(&writer_url).await;
        let mut commits = 0u64;
        while still.load(std::sync::atomic::Ordering::Relaxed) {
            writer
                .batch_execute("UPDATE tasks SET priority = coalesce(priority, 0) + 1")
                .await
                .expect("update");
            commits += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        commits
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock(&held, "pg_advisory_unlock_shared", WRITING).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut held_in = 0;
    for _ in 0..20 {
        if pgrelay_lock(&relay.db, SLEEPING, true).await {
            held_in += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    keep_writing.store(false, std::sync::atomic::Ordering::Relaxed);
    let commits = writing.await.expect("writer");
    assert!(commits > 100, "the writer kept writing ({commits} commits)");
    assert!(
        held_in <= 10,
        "the sleep stayed announced in {held_in} of 20 samples while changes kept coming"
    );
}

/// Rounds of staggered writers whose transactions stay open for a few milliseconds: some write
/// while the relay is busy (and do not notify) and commit after it went to sleep. Each round ends
/// quietly, so a change whose wake-up was lost would wait for the hourly poll.
async fn staggered_writers_lose_nothing(isolation: &'static str) {
    let relay = TestRelay::start_with(|c| c.poll_interval = NO_POLL).await;
    const WRITERS: usize = 4;
    // One task per writer: REPEATABLE READ writers must not update the same row.
    let ids: Vec<i64> = relay
        .db
        .query(
            "INSERT INTO tasks (project_id, title) SELECT 1, 'w' || i FROM generate_series(1, 4) AS i
             RETURNING id",
            &[],
        )
        .await
        .expect("tasks")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut alice = relay.client("u1").await;
    alice.join("project:1").await;
    // The creations may or may not reach alice (the relay may read them after she joined):
    // skip everything up to a fence.
    relay
        .sql(&format!(
            "UPDATE tasks SET priority = -5 WHERE id = {}",
            ids[0]
        ))
        .await;
    while title_or_priority(&alice.recv_event().await) != -5 {}
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        writers.push(common::connect(&relay.db_url).await);
    }
    let writers: Vec<std::sync::Arc<tokio_postgres::Client>> =
        writers.into_iter().map(std::sync::Arc::new).collect();
    for round in 0..40u64 {
        let mut tasks = Vec::new();
        for (w, db) in writers.iter().enumerate() {
            let db = db.clone();
            let id = ids[w];
            let w = w as u64;
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis((w * 7 + round * 3) % 20)).await;
                let value = (round * 100 + w) as i32;
                db.batch_execute(&format!(
                    "BEGIN ISOLATION LEVEL {isolation};
                     UPDATE tasks SET priority = {value} WHERE id = {id};
                     SELECT pg_sleep({});
                     COMMIT",
                    (5 + (w * 5 + round) % 15) as f64 / 1000.0
                ))
                .await
                .expect("write");
                value
            }));
        }
        let mut expected = Vec::new();
        for task in tasks {
            expected.push(task.await.expect("writer") as i64);
        }
        let mut got = Vec::new();
        for _ in 0..WRITERS {
            got.push(title_or_priority(&alice.recv_event().await));
        }
        expected.sort();
        got.sort();
        assert_eq!(got, expected, "round {round}");
    }
    assert!(
        relay.metric("reader_sleeps_total").await >= 10,
        "the relay slept between rounds"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_racing_a_relay_that_falls_asleep_lose_nothing() {
    staggered_writers_lose_nothing("READ COMMITTED").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeatable_read_writers_racing_a_relay_that_falls_asleep_lose_nothing() {
    staggered_writers_lose_nothing("REPEATABLE READ").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_sleeping_listen_connection_is_killed_still_delivers_at_once() {
    let relay = TestRelay::start_with(|c| c.poll_interval = NO_POLL).await;
    let mut alice = relay.client("u1").await;
    alice.join("task:1").await;
    for round in 0..3 {
        assert_eq!(common::kill_sleeping_listen_connection(&relay.db).await, 1);
        // Written right away, maybe before the listener is back: the write cannot see a
        // sleeping relay, so it does not notify; the relay must find it by itself.
        relay
            .sql(&format!("UPDATE tasks SET priority = {round} WHERE id = 1"))
            .await;
        assert_eq!(title_or_priority(&alice.recv_event().await), round);
    }
    // And it sleeps and wakes normally afterwards.
    assert_eq!(common::kill_sleeping_listen_connection(&relay.db).await, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay
        .sql("UPDATE tasks SET priority = 99 WHERE id = 1")
        .await;
    assert_eq!(title_or_priority(&alice.recv_event().await), 99);
}
