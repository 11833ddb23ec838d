//! No row, policy or oversized payload can disconnect, stall or leak to anyone else.
//!
//! Demo data (see tests/common): project 1 has alice (u1, owner), bob (u2, member), carol (u3,
//! viewer); dave (u4) is in no project.

mod common;

use std::time::Duration;

use common::{TestRelay, WsClient};
use serde_json::{json, Value};

const FENCE: &str = "UPDATE tasks SET priority = coalesce(priority, 0) + 1 WHERE id = 1";

/// A watched table `folders` published to it whose policy
/// walks up the parent chain: a folder is readable when its root is. A cycle makes it recurse
/// until Postgres gives up (`stack depth limit exceeded`).
const FOLDERS: &str = "
    CREATE TABLE folders (id int PRIMARY KEY, parent int);
    CREATE FUNCTION folder_readable(folder int) RETURNS boolean LANGUAGE plpgsql STABLE AS $$
    DECLARE up int;
    BEGIN
        SELECT parent INTO up FROM folders WHERE id = folder;
        IF up IS NULL THEN RETURN true; END IF;
        RETURN folder_readable(up);
    END $$;
    CREATE FUNCTION can_read_folder(u text, c jsonb, r jsonb) RETURNS boolean LANGUAGE sql STABLE
        AS $$ SELECT folder_readable((r->>'id')::int) $$;
    SELECT pgrelay.watch('folders', ARRAY['board:1'], 'can_read_folder');";

/// Rooms `board:*`, which anyone may join.
const BOARD: &str = "
    CREATE FUNCTION can_join_board(u text, c jsonb, k text) RETURNS boolean LANGUAGE sql AS 'SELECT true';
    SELECT pgrelay.allow_join('board', 'can_join_board');";

/// Alice in `board:1` and `project:1`, bob in `board:1`.
async fn board_watchers(relay: &TestRelay) -> (WsClient, WsClient) {
    relay.sql(BOARD).await;
    let mut alice = relay.client("u1").await;
    alice.join("board:1").await;
    alice.join("project:1").await;
    let mut bob = relay.client("u2").await;
    bob.join("board:1").await;
    (alice, bob)
}

fn ids(events: &[Value]) -> Vec<i64> {
    events
        .iter()
        .map(|e| e["row"]["id"].as_i64().unwrap_or(-1))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_overflows_the_stack_denies_its_row_and_everything_else_flows() {
    let relay = TestRelay::start().await;
    relay.sql(FOLDERS).await;
    let (mut alice, mut bob) = board_watchers(&relay).await;

    // One statement, so one chunk: 2 and 3 are each other's parent.
    relay
        .sql("INSERT INTO folders VALUES (1, NULL), (2, 3), (3, 2), (4, 1)")
        .await;
    relay.sql("INSERT INTO folders VALUES (5, 4)").await;
    relay.sql(FENCE).await;

    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(bob.recv_event().await);
    }
    assert_eq!(
        ids(&got),
        [1, 4, 5],
        "the cycle is withheld, the rest flows"
    );
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(alice.recv_event().await);
    }
    assert_eq!(ids(&got[..3]), [1, 4, 5]);
    assert_eq!(got[3]["event"], "task_updated", "other rooms flow too");
    bob.ping().await;
    assert_eq!(
        relay.metric("policy_errors_total").await,
        4,
        "two changes, two users"
    );

    // Later changes are not held back by the bad ones.
    relay.sql("INSERT INTO folders VALUES (6, NULL)").await;
    assert_eq!(ids(&[bob.recv_event().await]), [6]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_runs_past_the_statement_timeout_denies_only_that_row() {
    let relay = TestRelay::start_with(|c| c.statement_timeout = Duration::from_millis(300)).await;
    relay
        .sql(
            "CREATE TABLE notes (id int PRIMARY KEY, slow boolean NOT NULL DEFAULT false);
             CREATE FUNCTION can_read_note(u text, c jsonb, r jsonb) RETURNS boolean
                 LANGUAGE sql STABLE AS $$
                 SELECT CASE WHEN (r->>'slow')::boolean
                             THEN (SELECT true FROM pg_sleep(30)) ELSE true END $$;
             SELECT pgrelay.watch('notes', ARRAY['board:1'], 'can_read_note');",
        )
        .await;
    let (mut alice, mut bob) = board_watchers(&relay).await;

    relay
        .sql("INSERT INTO notes VALUES (1, false), (2, true), (3, false)")
        .await;
    relay.sql(FENCE).await;
    relay.sql("INSERT INTO notes VALUES (4, false)").await;
    assert_eq!(ids(&bob.recv_events(3).await), [1, 3, 4]);
    let got = alice.recv_events(4).await;
    assert_eq!(
        ids(&[got[0].clone(), got[1].clone(), got[3].clone()]),
        [1, 3, 4]
    );
    assert_eq!(got[2]["event"], "task_updated");
    assert_eq!(relay.metric("policy_errors_total").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_policy_that_hangs_fails_only_that_join() {
    let relay = TestRelay::start_with(|c| c.statement_timeout = Duration::from_millis(300)).await;
    // Carol's check never ends by itself; the others are answered (retried alone once their
    // batch timed out with hers).
    relay
        .sql(
            "CREATE OR REPLACE FUNCTION can_join_project(user_id text, claims jsonb, key text)
             RETURNS boolean LANGUAGE sql STABLE AS $$
                 SELECT CASE WHEN $1 = 'u3' THEN (SELECT true FROM pg_sleep(30))
                             ELSE project_role($1, $3::bigint) IS NOT NULL END
             $$;",
        )
        .await;
    let (mut clients, outcomes) = relay
        .join_at_once(&["u1", "u2", "u3", "u4"], "project:1")
        .await;
    assert_eq!(outcomes, ["joined", "joined", "internal", "forbidden"]);
    relay.sql(FENCE).await;
    assert_eq!(clients[0].recv_event().await["event"], "task_updated");
}

/// Project 1's members (alice, bob, carol), each in `project:1`.
async fn project_members(relay: &TestRelay) -> Vec<WsClient> {
    let mut members = Vec::new();
    for user in ["u1", "u2", "u3"] {
        let mut client = relay.client(user).await;
        client.join("project:1").await;
        members.push(client);
    }
    members
}

fn comment(body_bytes: usize) -> String {
    format!(
        "INSERT INTO comments (task_id, project_id, author_id, body) \
         VALUES (1, 1, 'u1', repeat('x', {body_bytes}))"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_larger_than_the_queue_budget_reaches_every_member_without_closing_anyone() {
    let relay = TestRelay::start_with(|c| c.limits.max_queued_bytes = 64 * 1024).await;
    let mut members = project_members(&relay).await;
    // One transaction, so one chunk, queued at once: a small comment, then one larger than the
    // budget (and below max_event_bytes, so whole).
    relay
        .sql(&format!(
            "BEGIN; {}; {}; COMMIT;",
            comment(10),
            comment(100_000)
        ))
        .await;
    relay.sql(FENCE).await;
    for member in &mut members {
        let got = member.recv_events(3).await;
        let bodies: Vec<usize> = got[..2]
            .iter()
            .map(|e| e["row"]["body"].as_str().map_or(0, str::len))
            .collect();
        assert_eq!(bodies, [10, 100_000], "both, whole");
        assert!(got[1].get("truncated").is_none(), "{}", got[1]["op"]);
        assert_eq!(got[2]["event"], "task_updated");
        member.ping().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sixteen_mib_row_reaches_every_member_over_websocket_and_sse() {
    let relay = TestRelay::start().await;
    relay
        .sql(
            "SELECT pgrelay.watch('comments', rooms => ARRAY['project:{project_id}', 'task:{task_id}'],
                                  policy => 'can_read_comment', max_event_bytes => 20 << 20)",
        )
        .await;
    let mut members = project_members(&relay).await;
    let mut sse = common::SseClient::connect(
        relay.addr(),
        &format!("/sse?rooms=project:1&token={}", common::token("u2")),
        None,
    )
    .await;
    assert_eq!(sse.status, 200);
    let _ = sse.next().await; // joined
    const SIXTEEN_MIB: usize = 16 << 20;
    relay.sql(&comment(SIXTEEN_MIB)).await;
    relay.sql(FENCE).await;
    for member in &mut members {
        let got = member.recv_events(2).await;
        assert_eq!(
            got[0]["row"]["body"].as_str().map(str::len),
            Some(SIXTEEN_MIB)
        );
        assert_eq!(got[1]["event"], "task_updated");
    }
    let (_, event) = sse.next_event().await;
    assert_eq!(
        event["row"]["body"].as_str().map(str::len),
        Some(SIXTEEN_MIB)
    );
    let (_, fence) = sse.next_event().await;
    assert_eq!(fence["event"], "task_updated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_over_max_event_bytes_arrives_truncated_to_its_primary_key() {
    let relay = TestRelay::start().await;
    let mut members = project_members(&relay).await;
    // The example schema keeps the default, 1 MiB.
    relay.sql(&comment(1_500_000)).await;
    relay
        .sql("UPDATE comments SET body = body || 'y' WHERE length(body) > 1000000")
        .await;
    relay.sql(&comment(20)).await;
    for member in &mut members {
        let got = member.recv_events(3).await;
        let id = got[0]["row"]["id"].clone();
        assert!(id.is_i64(), "{}", got[0]["row"]);
        for (event, name) in got[..2].iter().zip(["comment_created", "comment_updated"]) {
            assert_eq!(event["event"], name);
            assert_eq!(event["row"], json!({"id": id}), "just the key");
            assert_eq!(event["truncated"], true);
            assert!(event.get("old").is_none(), "no old values");
        }
        assert_eq!(got[2]["row"]["body"].as_str().map(str::len), Some(20));
        assert!(got[2].get("truncated").is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_from_before_max_event_bytes_is_upgraded() {
    // What an install looked like before: no max_event_bytes or key columns, read_batch()
    // without them, watch() without the parameter.
    let url = common::fresh_database().await;
    let db = common::connect(&url).await;
    db.batch_execute(
        "ALTER TABLE pgrelay.watches DROP COLUMN max_event_bytes, DROP COLUMN key_columns;
         DROP FUNCTION pgrelay.read_batch(pg_snapshot, pg_snapshot);
         CREATE FUNCTION pgrelay.read_batch(since pg_snapshot, upto pg_snapshot)
         RETURNS TABLE (id bigint, xid xid8, tbl text, entity text, op text, rooms text[],
                        \"row\" jsonb, old jsonb, ts timestamptz, txn_last bigint,
                        policy_key text, policy_key_old text, knows_old boolean, flush text[])
         LANGUAGE sql STABLE AS 'SELECT NULL::bigint, NULL::xid8, NULL, NULL, NULL, NULL::text[],
             NULL::jsonb, NULL::jsonb, NULL::timestamptz, NULL::bigint, NULL, NULL, NULL::boolean,
             NULL::text[] WHERE false';
         DROP FUNCTION pgrelay.watch(regclass, text[], regproc, text, text[], text[], boolean,
                                     regproc, text[], regclass[], int);
         CREATE FUNCTION pgrelay.watch(tbl regclass, rooms text[], policy regproc DEFAULT NULL,
             entity text DEFAULT NULL, exclude text[] DEFAULT '{}', include text[] DEFAULT NULL,
             old_values boolean DEFAULT true, room_fn regproc DEFAULT NULL,
             policy_columns text[] DEFAULT NULL, policy_tables regclass[] DEFAULT '{}')
         RETURNS void LANGUAGE sql AS 'SELECT';",
    )
    .await
    .expect("the old layout");
    db.batch_execute(pgrelay::db::migrate::LIBRARY)
        .await
        .expect("upgrade");
    let keys: Vec<(String, i32, Vec<String>)> = db
        .query(
            "SELECT name, max_event_bytes, key_columns FROM pgrelay.watches ORDER BY name",
            &[],
        )
        .await
        .expect("watches")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        keys[0],
        ("comments".to_owned(), 1 << 20, vec!["id".to_owned()])
    );
    assert_eq!(
        keys[1].2,
        ["project_id", "user_id"],
        "project_members' key, in order"
    );
    db.batch_execute(
        "SELECT pgrelay.watch('comments', ARRAY['project:{project_id}'], 'can_read_comment',
                              max_event_bytes => 100)",
    )
    .await
    .expect("watch takes max_event_bytes");

    let relay = TestRelay::start_on(url, |_| {}).await;
    let mut members = project_members(&relay).await;
    relay.sql(&comment(200)).await;
    let event = members[0].recv_event().await;
    assert_eq!(event["truncated"], true, "{event}");
}
