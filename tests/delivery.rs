//! Changes reach exactly the users who may read them, in the rooms they joined, in commit order.
//!
//! Demo data (see tests/common): project 1 has alice (u1, owner), bob (u2, member), carol (u3,
//! viewer); dave (u4) is in no project. Task 3 is private, created by and assigned to alice.
//!
//! To prove that something was *not* delivered, tests commit a "fence" change that everyone in the
//! room may see and check that it is the next thing a client receives: events arrive in commit
//! order, so anything withheld before the fence would otherwise have come first.

mod common;

use std::collections::BTreeSet;

use common::TestRelay;
use serde_json::{json, Value};

const FENCE: &str = "UPDATE tasks SET priority = coalesce(priority, 0) + 1 WHERE id = 1";

fn assert_is_fence(event: &Value) {
    assert_eq!(
        event["event"], "task_updated",
        "expected the fence, got {event}"
    );
    assert_eq!(event["row"]["id"], 1, "expected the fence, got {event}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_changes_have_the_documented_shape_and_reach_both_rooms() {
    let relay = TestRelay::start().await;
    let mut alice = relay.client("u1").await;
    let joined = alice.join("project:1").await;
    assert!(
        joined["position"].as_str().is_some_and(|p| !p.is_empty()),
        "{joined}"
    );
    alice.join("task:1").await;

    relay
        .sql("UPDATE tasks SET status = 'done' WHERE id = 1")
        .await;
    let first = alice.recv_event().await;
    let second = alice.recv_event().await;
    let rooms: BTreeSet<&str> = [&first, &second]
        .iter()
        .map(|e| e["room"].as_str().expect("room"))
        .collect();
    assert_eq!(rooms, BTreeSet::from(["project:1", "task:1"]));
    assert_eq!(first["id"], second["id"], "one change, one position");
    for event in [&first, &second] {
        assert_eq!(event["type"], "event");
        assert_eq!(event["event"], "task_updated");
        assert_eq!(event["table"], "tasks");
        assert_eq!(event["op"], "UPDATE");
        assert_eq!(event["row"]["id"], 1);
        assert_eq!(event["row"]["status"], "done");
        assert_eq!(event["row"]["title"], "Write the announcement");
        assert_eq!(
            event["old"],
            json!({"status": "todo"}),
            "old has exactly the changed columns"
        );
        assert!(
            event["ts"].as_str().is_some_and(|ts| ts.contains('T')),
            "ISO 8601 ts: {event}"
        );
        // Sealed: an id says nothing about how many other changes happened in between.
        assert!(
            event["id"]
                .as_str()
                .is_some_and(|id| id.starts_with('q') && !id.contains('~')),
            "{event}"
        );
    }

    relay
        .sql("INSERT INTO tasks (project_id, title, created_by) VALUES (1, 'New', 'u2')")
        .await;
    let created = alice.recv_event().await;
    assert_eq!(
        (
            created["event"].as_str(),
            created["op"].as_str(),
            created["room"].as_str()
        ),
        (Some("task_created"), Some("INSERT"), Some("project:1"))
    );
    assert_eq!(created["row"]["title"], "New");
    assert!(created.get("old").is_none(), "INSERT has no old: {created}");

    relay.sql("DELETE FROM tasks WHERE title = 'New'").await;
    let deleted = alice.recv_event().await;
    assert_eq!(
        (deleted["event"].as_str(), deleted["op"].as_str()),
        (Some("task_deleted"), Some("DELETE"))
    );
    assert_eq!(deleted["row"]["title"], "New", "DELETE carries the old row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_watched_table_publishes_to_its_rooms() {
    let relay = TestRelay::start().await;
    let mut alice = relay.client("u1").await;
    alice.join("project:1").await;
    alice.join("task:1").await;
    let mut dave = relay.client("u4").await;
    dave.join("user:u4").await;

    relay
        .sql("UPDATE projects SET name = 'Launch v2' WHERE id = 1")
        .await;
    let e = alice.recv_event().await;
    assert_eq!(
        (e["event"].as_str(), e["table"].as_str(), e["room"].as_str()),
        (Some("project_updated"), Some("projects"), Some("project:1"))
    );
    assert_eq!(e["old"], json!({"name": "Launch"}));

    relay.sql("INSERT INTO comments (task_id, project_id, author_id, body) VALUES (1, 1, 'u2', 'On it')").await;
    let mut comment_rooms = BTreeSet::new();
    for _ in 0..2 {
        let e = alice.recv_event().await;
        assert_eq!(
            (e["event"].as_str(), e["table"].as_str()),
            (Some("comment_created"), Some("comments"))
        );
        assert_eq!(e["row"]["body"], "On it");
        comment_rooms.insert(e["room"].as_str().expect("room").to_owned());
    }
    assert_eq!(
        comment_rooms,
        BTreeSet::from(["project:1".to_owned(), "task:1".to_owned()])
    );

    // Adding dave to the project reaches the project's room and dave's own room.
    relay
        .sql("INSERT INTO project_members (project_id, user_id, role) VALUES (1, 'u4', 'member')")
        .await;
    let e = alice.recv_event().await;
    assert_eq!(
        (e["event"].as_str(), e["room"].as_str()),
        (Some("project_member_created"), Some("project:1"))
    );
    let e = dave.recv_event().await;
    assert_eq!(
        (e["event"].as_str(), e["room"].as_str()),
        (Some("project_member_created"), Some("user:u4"))
    );
    assert_eq!(
        e["row"],
        json!({"project_id": 1, "user_id": "u4", "role": "member"})
    );

    // Removing him: he learns it in his own room although he is no longer a member.
    relay
        .sql("DELETE FROM project_members WHERE user_id = 'u4'")
        .await;
    let e = dave.recv_event().await;
    assert_eq!(
        (e["event"].as_str(), e["op"].as_str()),
        (Some("project_member_deleted"), Some("DELETE"))
    );
    let e = alice.recv_event().await;
    assert_eq!(e["event"], "project_member_deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_see_what_the_policy_allows_and_nobody_else_sees_anything() {
    let relay = TestRelay::start().await;
    let mut alice = relay.client("u1").await; // owner; creator and assignee of private task 3
    let mut bob = relay.client("u2").await; // member
    let mut carol = relay.client("u3").await; // viewer
    for client in [&mut alice, &mut bob, &mut carol] {
        client.join("project:1").await;
    }
    // dave is in no project: he may not even join.
    let mut dave = relay.client("u4").await;
    dave.send(json!({"type": "join", "room": "project:1"}))
        .await;
    assert_eq!(dave.recv().await["code"], "forbidden");

    // A public task: every member.
    relay
        .sql("UPDATE tasks SET title = 'Public news' WHERE id = 2")
        .await;
    for client in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(client.recv_event().await["row"]["title"], "Public news");
    }

    // A private task and its comment: only alice; bob and carol get neither, not even an id.
    relay
        .sql("UPDATE tasks SET title = 'Secret terms' WHERE id = 3")
        .await;
    relay.sql("INSERT INTO comments (task_id, project_id, author_id, body) VALUES (3, 1, 'u1', 'psst')").await;
    relay.sql(FENCE).await;
    assert_eq!(alice.recv_event().await["row"]["title"], "Secret terms");
    assert_eq!(alice.recv_event().await["row"]["body"], "psst");
    assert_is_fence(&alice.recv_event().await);
    assert_is_fence(&bob.recv_event().await);
    assert_is_fence(&carol.recv_event().await);

    // Assigned to bob, the private task and its comments reach him too, but still not carol.
    relay
        .sql("UPDATE tasks SET assignee_id = 'u2' WHERE id = 3")
        .await;
    relay.sql("INSERT INTO comments (task_id, project_id, author_id, body) VALUES (3, 1, 'u2', 'got it')").await;
    relay.sql(FENCE).await;
    let appeared = bob.recv_event().await;
    assert_eq!(
        (appeared["event"].as_str(), appeared["row"]["id"].as_i64()),
        (Some("task_created"), Some(3)),
        "the task entered bob's view: {appeared}"
    );
    assert_eq!(bob.recv_event().await["row"]["body"], "got it");
    assert_is_fence(&bob.recv_event().await);
    assert_eq!(alice.recv_event().await["event"], "task_updated");
    assert_eq!(alice.recv_event().await["row"]["body"], "got it");
    assert_is_fence(&alice.recv_event().await);
    assert_is_fence(&carol.recv_event().await);

    // Project 2 is carol's: nothing of it reaches alice, bob, or dave.
    dave.join("user:u4").await;
    relay
        .sql("UPDATE tasks SET title = 'Hire fast' WHERE id = 4")
        .await;
    relay.sql(FENCE).await;
    assert_is_fence(&alice.recv_event().await);
    assert_is_fence(&bob.recv_event().await);
    // Dave's fence: a change of his own room, committed after everything above.
    relay
        .sql("INSERT INTO project_members VALUES (2, 'u4', 'member')")
        .await;
    assert_is_membership_of(&dave.recv().await, "u4");
}

/// The `project_member_created` event a user receives in their own room: a fence for a user
/// who is in no room the test's other changes go to.
fn assert_is_membership_of(message: &Value, user: &str) {
    assert_eq!(
        (
            message["event"].as_str(),
            message["room"].as_str(),
            message["row"]["user_id"].as_str()
        ),
        (
            Some("project_member_created"),
            Some(format!("user:{user}").as_str()),
            Some(user)
        ),
        "expected the membership fence, got {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_leaving_a_users_view_arrives_as_a_deletion_and_returning_as_a_creation() {
    let relay = TestRelay::start().await;
    let mut alice = relay.client("u1").await;
    let mut bob = relay.client("u2").await;
    alice.join("project:1").await;
    bob.join("project:1").await;

    relay
        .sql("UPDATE tasks SET is_private = true WHERE id = 2")
        .await;
    let mut gone = bob.recv_event().await;
    if gone["event"] == "project_member_created" {
        gone = bob.recv_event().await;
    }
    assert_eq!(
        (gone["event"].as_str(), gone["op"].as_str()),
        (Some("task_deleted"), Some("DELETE")),
        "{gone}"
    );
    assert_eq!(
        gone["row"]["is_private"], false,
        "bob gets the version he could see"
    );
    assert!(gone.get("old").is_none());
    let full = alice.recv_event().await;
    assert_eq!(
        (full["event"].as_str(), full["old"].clone()),
        (Some("task_updated"), json!({"is_private": false}))
    );

    relay
        .sql("UPDATE tasks SET is_private = false, title = 'Venue booked' WHERE id = 2")
        .await;
    let back = bob.recv_event().await;
    assert_eq!(
        (back["event"].as_str(), back["op"].as_str()),
        (Some("task_created"), Some("INSERT")),
        "{back}"
    );
    assert_eq!(back["row"]["title"], "Venue booked");
    assert!(
        back.get("old").is_none(),
        "old values bob could not see are not sent: {back}"
    );
    assert_eq!(alice.recv_event().await["event"], "task_updated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_moved_between_projects_reaches_both_project_rooms() {
    let relay = TestRelay::start().await;
    relay
        .sql("INSERT INTO project_members VALUES (2, 'u1', 'member')")
        .await;
    let mut alice = relay.client("u1").await; // in both projects
    let mut bob = relay.client("u2").await; // only in project 1
    alice.join("project:1").await;
    alice.join("project:2").await;
    bob.join("project:1").await;

    relay
        .sql("UPDATE tasks SET project_id = 2 WHERE id = 1")
        .await;
    // The membership insert above may be delivered after alice joined (it is a change like any
    // other); skip it.
    let mut rooms = BTreeSet::new();
    while rooms.len() < 2 {
        let e = alice.recv_event().await;
        if e["event"] == "project_member_created" {
            continue;
        }
        assert_eq!(e["event"], "task_updated");
        rooms.insert(e["room"].as_str().expect("room").to_owned());
    }
    assert_eq!(
        rooms,
        BTreeSet::from(["project:1".to_owned(), "project:2".to_owned()])
    );
    let gone = bob.recv_event().await;
    assert_eq!(
        (gone["event"].as_str(), gone["row"]["project_id"].as_i64()),
        (Some("task_deleted"), Some(1)),
        "bob sees the task leave project 1, and not where it went: {gone}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactions_events_arrive_together_in_statement_order_and_rollbacks_never() {
    let relay = TestRelay::start().await;
    let mut alice = relay.client("u1").await;
    alice.join("project:1").await;

    relay
        .sql("BEGIN; UPDATE tasks SET title = 'never' WHERE id = 1; ROLLBACK;")
        .await;
    relay
        .sql(
            "BEGIN;
             INSERT INTO tasks (project_id, title) VALUES (1, 'a');
             UPDATE tasks SET title = 'b' WHERE id = 2;
             SAVEPOINT s; UPDATE tasks SET title = 'rolled back' WHERE id = 1; ROLLBACK TO SAVEPOINT s;
             DELETE FROM comments WHERE id = 1;
             COMMIT;",
        )
        .await;
    let events: Vec<String> = [
        alice.recv_event().await,
        alice.recv_event().await,
        alice.recv_event().await,
    ]
    .iter()
    .map(|e| e["event"].as_str().expect("event").to_owned())
    .collect();
    assert_eq!(events, ["task_created", "task_updated", "comment_deleted"]);
    relay.sql(FENCE).await;
    assert_is_fence(&alice.recv_event().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_a_room_stops_its_events() {
    let relay = TestRelay::start().await;
    let mut alice = relay.client("u1").await;
    alice.join("project:1").await;
    alice.join("task:2").await;
    alice
        .send(json!({"type": "leave", "room": "project:1", "ref": "l1"}))
        .await;
    assert_eq!(
        alice.recv().await,
        json!({"type": "left", "room": "project:1", "reason": "requested", "ref": "l1"})
    );

    relay
        .sql("UPDATE tasks SET title = 'unseen' WHERE id = 1")
        .await;
    relay
        .sql("UPDATE tasks SET title = 'seen' WHERE id = 2")
        .await;
    let e = alice.recv_event().await;
    assert_eq!(
        (e["room"].as_str(), e["row"]["title"].as_str()),
        (Some("task:2"), Some("seen"))
    );

    alice
        .send(json!({"type": "leave", "room": "project:1", "ref": "l2"}))
        .await;
    let reply = alice.recv().await;
    assert_eq!(
        (reply["code"].as_str(), reply["ref"].as_str()),
        (Some("not_joined"), Some("l2"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_touching_many_rows_delivers_every_row_in_order() {
    let relay = TestRelay::start().await;
    let mut alice = relay.client("u1").await;
    alice.join("project:1").await;
    relay.sql("INSERT INTO tasks (project_id, title) SELECT 1, 'bulk ' || i FROM generate_series(1, 2500) AS i").await;
    for i in 1..=2500 {
        let e = alice.recv_event().await;
        assert_eq!(
            e["row"]["title"],
            format!("bulk {i}"),
            "row {i} out of order"
        );
    }
    relay.sql(FENCE).await;
    assert_is_fence(&alice.recv_event().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_throws_denies_only_the_failing_user_and_row() {
    let relay = TestRelay::start().await;
    relay
        .sql(
            "CREATE TABLE docs (id int PRIMARY KEY, level text);
             CREATE FUNCTION can_read_doc(u text, c jsonb, r jsonb) RETURNS boolean LANGUAGE sql
                 AS $$ SELECT (c->>'level')::int >= (r->>'level')::int $$;
             SELECT pgrelay.watch('docs', ARRAY['board:1'], 'can_read_doc');
             CREATE FUNCTION can_join_board(u text, c jsonb, k text) RETURNS boolean LANGUAGE sql AS 'SELECT true';
             SELECT pgrelay.allow_join('board', 'can_join_board');",
        )
        .await;
    let connect = |level: &str| {
        let mut claims = serde_json::Map::new();
        claims.insert("level".into(), json!(level));
        let token = pgrelay::jwt::mint(
            common::SECRET,
            "u1",
            std::time::Duration::from_secs(600),
            &claims,
        )
        .expect("token");
        format!("{}?token={token}", relay.ws_url())
    };
    let mut good = common::WsClient::connect(&connect("5"))
        .await
        .expect("connect");
    let mut broken = common::WsClient::connect(&connect("not a number"))
        .await
        .expect("connect");
    for client in [&mut good, &mut broken] {
        assert_eq!(client.recv().await["type"], "ready");
        client.join("board:1").await;
    }
    broken.join("user:u1").await; // for the fence below
                                  // One statement, so one chunk: a row the policy cannot read, and rows it can.
    relay
        .sql("INSERT INTO docs VALUES (1, '1'), (2, 'oops'), (3, '3'), (4, '9')")
        .await;
    relay.sql("INSERT INTO docs VALUES (5, '2')").await;
    let ids: Vec<i64> = [
        good.recv_event().await,
        good.recv_event().await,
        good.recv_event().await,
    ]
    .iter()
    .map(|e| e["row"]["id"].as_i64().expect("id"))
    .collect();
    assert_eq!(
        ids,
        [1, 3, 5],
        "row 2 throws, row 4 is above level 5; the rest arrives"
    );
    // The user whose claim breaks the policy gets nothing, and the connection stays healthy:
    // the next thing it receives is a change committed after the docs, in its own room.
    relay
        .sql("INSERT INTO project_members VALUES (2, 'u1', 'member')")
        .await;
    assert_is_membership_of(&broken.recv().await, "u1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_loses_access_is_told_and_receives_nothing_more() {
    let relay = TestRelay::start().await;
    let mut alice = relay.client("u1").await;
    alice.join("project:1").await;
    let mut bob = relay.client("u2").await;
    for room in ["project:1", "task:1", "task:2", "user:u2"] {
        bob.join(room).await;
    }

    // Task 2 made private: bob sees it leave, then loses its room, but stays in the project.
    relay
        .sql("UPDATE tasks SET is_private = true WHERE id = 2")
        .await;
    let mut got: Vec<(String, String)> = Vec::new();
    for _ in 0..3 {
        let m = bob.recv().await;
        let what = m["event"]
            .as_str()
            .or(m["reason"].as_str())
            .unwrap_or_default()
            .to_owned();
        got.push((m["room"].as_str().unwrap_or_default().to_owned(), what));
    }
    got.sort();
    assert_eq!(
        got,
        [
            ("project:1".to_owned(), "task_deleted".to_owned()),
            ("task:2".to_owned(), "revoked".to_owned()),
            ("task:2".to_owned(), "task_deleted".to_owned()),
        ]
    );
    assert_eq!(alice.recv_event().await["event"], "task_updated");

    // Removed from the project: bob learns it (his own membership row), then is out of the rooms.
    relay
        .sql("DELETE FROM project_members WHERE project_id = 1 AND user_id = 'u2'")
        .await;
    let mut removed = BTreeSet::new();
    for _ in 0..2 {
        let e = bob.recv_event().await;
        assert_eq!(e["event"], "project_member_deleted");
        removed.insert(e["room"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(
        removed,
        BTreeSet::from(["project:1".to_owned(), "user:u2".to_owned()])
    );
    alice.recv_event().await;

    relay.sql(FENCE).await; // task 1, in project:1 and task:1
    let mut left = BTreeSet::new();
    for _ in 0..2 {
        let m = bob.recv().await;
        assert_eq!(
            (m["type"].as_str(), m["reason"].as_str()),
            (Some("left"), Some("revoked")),
            "{m}"
        );
        left.insert(m["room"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(
        left,
        BTreeSet::from(["project:1".to_owned(), "task:1".to_owned()])
    );
    assert_is_fence(&alice.recv_event().await);

    relay.sql(FENCE).await;
    assert_is_fence(&alice.recv_event().await);
    // Nothing in between: the next thing bob receives is a change committed after the fence.
    relay
        .sql("INSERT INTO project_members VALUES (2, 'u2', 'member')")
        .await;
    assert_is_membership_of(&bob.recv().await, "u2");
    assert_eq!(
        relay.metric("revocations_total").await,
        3,
        "task:2, project:1, task:1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_policy_that_throws_fails_only_that_join_among_concurrent_ones() {
    let relay = TestRelay::start().await;
    // Carol's joins make the policy throw; joins are checked in batches, and hers must not take
    // the others down with it.
    relay
        .sql(
            "CREATE OR REPLACE FUNCTION can_join_project(user_id text, claims jsonb, key text)
             RETURNS boolean LANGUAGE sql STABLE AS $$
                 SELECT CASE WHEN $1 = 'u3' THEN length($1) / 0 = 1
                             ELSE project_role($1, $3::bigint) IS NOT NULL END
             $$;",
        )
        .await;
    let (_clients, outcomes) = relay
        .join_at_once(&["u1", "u2", "u3", "u4"], "project:1")
        .await;
    assert_eq!(outcomes, ["joined", "joined", "internal", "forbidden"]);
}

/// Remembered policy answers (`policy_columns`/`policy_tables` in the example schema) must never
/// outlive the membership they were computed from: the next change after a removal is judged
/// afresh, even for a row whose answer was remembered a moment before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_answer_is_forgotten_when_the_membership_changes() {
    let relay = TestRelay::start().await;
    let mut alice = relay.client("u1").await;
    alice.join("project:1").await;
    let mut bob = relay.client("u2").await;
    bob.join("project:1").await;

    // Task 1 twice: the second time bob's answer comes from memory.
    for _ in 0..2 {
        relay.sql(FENCE).await;
        assert_is_fence(&bob.recv_event().await);
        assert_is_fence(&alice.recv_event().await);
    }
    assert_eq!(
        relay.metric("policy_answers_remembered_total").await,
        2,
        "the second fence was judged from memory, for both"
    );

    let stale_before = relay.metric("policy_invalidations_total").await;
    relay
        .sql("DELETE FROM project_members WHERE project_id = 1 AND user_id = 'u2'")
        .await;
    assert_eq!(bob.recv_event().await["event"], "project_member_deleted");
    alice.recv_event().await;
    assert_eq!(
        relay.metric("policy_invalidations_total").await - stale_before,
        4,
        "the removal makes stale the answers of the four tables whose policies read memberships"
    );

    // The same task, the same policy key: bob must not get it, and loses the room.
    relay.sql(FENCE).await;
    let left = bob.recv().await;
    assert_eq!(
        (left["type"].as_str(), left["reason"].as_str()),
        (Some("left"), Some("revoked")),
        "{left}"
    );
    assert_is_fence(&alice.recv_event().await);
    // Nothing else came: joined to his own room, the next thing bob receives is a change
    // committed after everything above.
    bob.join("user:u2").await;
    relay
        .sql("INSERT INTO project_members VALUES (2, 'u2', 'member')")
        .await;
    assert_is_membership_of(&bob.recv().await, "u2");
}

/// A member denied the same private task again and again is asked about the room once: a denial
/// from memory, for an update that left what the policy reads alone, says nothing new (re-checking
/// such members once took 40% of a busy reader's time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_denial_does_not_ask_the_join_policy_again() {
    let relay = TestRelay::start().await;
    let mut bob = relay.client("u2").await;
    bob.join("project:1").await;
    // Task 3 is private to alice.
    for n in 1..=3 {
        relay
            .sql(&format!("UPDATE tasks SET priority = {n} WHERE id = 3"))
            .await;
        relay.sql(FENCE).await;
        assert_is_fence(&bob.recv_event().await);
    }
    assert_eq!(
        relay.metric("access_rechecks_total").await,
        1,
        "only the first denial, which the database decided"
    );
    assert_eq!(
        relay.metric("policy_answers_remembered_total").await,
        4,
        "the second and third update and fence"
    );

    // Removed from the project: the next denial is judged afresh, and bob leaves the room.
    relay
        .sql("DELETE FROM project_members WHERE project_id = 1 AND user_id = 'u2'")
        .await;
    assert_eq!(bob.recv_event().await["event"], "project_member_deleted");
    relay
        .sql("UPDATE tasks SET priority = 9 WHERE id = 3")
        .await;
    let left = bob.recv().await;
    assert_eq!(
        (left["type"].as_str(), left["reason"].as_str()),
        (Some("left"), Some("revoked")),
        "{left}"
    );
}

/// A comment's answers depend on its task (`policy_tables => tasks`): once the task turns
/// private, the next comment on it is judged afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_answer_is_forgotten_when_a_table_the_policy_reads_changes() {
    let relay = TestRelay::start().await;
    let mut bob = relay.client("u2").await;
    bob.join("project:1").await;
    let comment =
        "INSERT INTO comments (task_id, project_id, author_id, body) VALUES (2, 1, 'u1', 'hi')";
    for _ in 0..2 {
        relay.sql(comment).await;
        assert_eq!(bob.recv_event().await["event"], "comment_created");
    }

    relay
        .sql("UPDATE tasks SET is_private = true WHERE id = 2")
        .await;
    assert_eq!(bob.recv_event().await["event"], "task_deleted");
    relay.sql(comment).await;
    relay.sql(FENCE).await;
    assert_is_fence(&bob.recv_event().await);
}

/// A policy that reads a table nobody watches cannot be remembered: the relay would never hear of
/// that table's changes. Declaring it in `policy_tables` keeps every change judged afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_of_a_policy_reading_an_unwatched_table_are_never_remembered() {
    let relay = TestRelay::start().await;
    common::notes_board(
        &relay,
        ", policy_columns => ARRAY['id'], policy_tables => ARRAY['readers'::regclass]",
    )
    .await;
    let mut alice = relay.client("u1").await;
    let mut bob = relay.client("u2").await;
    for client in [&mut alice, &mut bob] {
        client.join("board:1").await;
    }
    relay.sql("INSERT INTO notes VALUES (1, 'a')").await;
    relay.sql("UPDATE notes SET body = 'b' WHERE id = 1").await;
    for client in [&mut alice, &mut bob] {
        assert_eq!(client.recv_event().await["event"], "note_created");
        assert_eq!(client.recv_event().await["event"], "note_updated");
    }

    relay.sql("DELETE FROM readers WHERE user_id = 'u2'").await;
    relay.sql("UPDATE notes SET body = 'c' WHERE id = 1").await;
    assert_eq!(alice.recv_event().await["row"]["body"], "c");
    // The update was withheld: back among the readers, bob's next event is the one after it.
    relay
        .sql("INSERT INTO readers VALUES ('u2'); UPDATE notes SET body = 'd' WHERE id = 1")
        .await;
    assert_eq!(bob.recv_event().await["row"]["body"], "d");
    assert_eq!(alice.recv_event().await["row"]["body"], "d");
    assert_eq!(relay.metric("policy_answers_remembered_total").await, 0);
}

/// `pgrelay.watch` refuses policy inputs it cannot honour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_refuses_policy_columns_the_table_does_not_have() {
    let relay = TestRelay::start().await;
    let err = relay
        .try_sql(
            "SELECT pgrelay.watch('tasks', ARRAY['task:{id}'], 'can_read_task',
                                  policy_columns => ARRAY['project_id', 'no_such_column'])",
        )
        .await
        .expect_err("an unknown column is refused");
    assert!(err.contains("no_such_column"), "{err}");
    let err = relay
        .try_sql("SELECT pgrelay.watch('tasks', ARRAY['task:{id}'], policy_columns => ARRAY['id'])")
        .await
        .expect_err("inputs without a policy are refused");
    assert!(err.contains("give the policy"), "{err}");
}
