//! No row, policy or oversized payload can disconnect, stall or leak to anyone else.
//!
//! Demo data (see tests/common): project 1 has alice (u1, owner), bob (u2, member), carol (u3,
//! viewer); dave (u4) is in no project.

mod common;

use std::time::Duration;

use common::{TestRelay, WsClient};
use serde_json::Value;

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
