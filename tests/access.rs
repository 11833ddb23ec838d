//! Who may see what, over time: positions only pgrelay can make, and access that ends the moment
//! it is taken away (events, presence and typing alike).

mod common;

use std::time::Duration;

use common::{SseClient, TestRelay, WsClient};
use pgrelay::capture::position::{Position, PositionCodec, Snapshot};
use serde_json::{json, Value};

/// The relay's codec for this database (the key every relay and `pgrelay.position()` share).
async fn codec(relay: &TestRelay) -> PositionCodec {
    let key: Vec<u8> = relay
        .db
        .query_one("SELECT position_key FROM pgrelay.secrets", &[])
        .await
        .expect("key")
        .get(0);
    PositionCodec::new(&key.try_into().expect("32 bytes"))
}

/// `pgrelay.position()` and the snapshot it stands for, from one repeatable-read transaction.
async fn position_and_snapshot(relay: &TestRelay) -> (String, Snapshot) {
    let row = relay
        .db
        .query_one(
            "SELECT pgrelay.position(), pg_current_snapshot()::text",
            &[],
        )
        .await
        .expect("position");
    let snapshot = Snapshot::from_pg(row.get(1)).expect("snapshot");
    (row.get(0), snapshot)
}

/// Sends a `join` with `since` and returns the reply (skipping presence).
async fn join_since(client: &mut WsClient, room: &str, since: &str) -> Value {
    client
        .send(json!({"type": "join", "room": room, "since": since, "ref": "j"}))
        .await;
    client.recv().await
}

/// `pgrelay.position()` seals in SQL exactly as the relay does: the same token for the same
/// snapshot, opaque, and resumable on any relay of the database, where it replays exactly what
/// the snapshot lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgrelay_position_is_sealed_like_the_relays_and_resumes_on_every_relay() {
    let first = TestRelay::start().await;
    let second = TestRelay::start_on(first.db_url.clone(), |_| {}).await;
    // A transaction in progress puts an xid in the snapshot's in-progress list.
    let in_flight = common::connect(&first.db_url).await;
    in_flight
        .batch_execute("BEGIN; UPDATE tasks SET title = 'in flight' WHERE id = 1")
        .await
        .expect("begin");
    let (position, snapshot) = position_and_snapshot(&first).await;
    assert!(
        position.starts_with('q') && !position.contains('.'),
        "sealed, not a plain snapshot: {position}"
    );
    let codec = codec(&first).await;
    assert_eq!(
        codec.seal(&Position::At(snapshot.clone())),
        position,
        "SQL and the relay seal the same snapshot to the same token"
    );
    assert_eq!(codec.open(&position), Ok(Position::At(snapshot)));

    in_flight.batch_execute("COMMIT").await.expect("commit");
    first
        .sql("UPDATE tasks SET title = 'after' WHERE id = 2")
        .await;
    // Either relay accepts it, and the other relay's event ids too.
    let mut alice = second.client("u1").await;
    let joined = join_since(&mut alice, "project:1", &position).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(alice.recv_event().await["row"]["title"], "in flight");
    let after = alice.recv_event().await;
    assert_eq!(after["row"]["title"], "after");
    let id = after["id"].as_str().expect("id").to_owned();
    first
        .sql("UPDATE tasks SET title = 'later' WHERE id = 2")
        .await;
    let mut bob = first.client("u1").await;
    let joined = join_since(&mut bob, "project:1", &id).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(bob.recv_event().await["row"]["title"], "later");
}

/// Whatever pgrelay did not seal is refused: a plain snapshot (even a current, resumable one), a
/// token with one character changed, garbage. WebSocket answers `bad_request`, SSE 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_snapshots_and_tampered_tokens_are_bad_requests() {
    let relay = TestRelay::start().await;
    let (sealed, snapshot) = position_and_snapshot(&relay).await;
    let mut tampered = sealed.clone().into_bytes();
    let at = tampered.len() / 2;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("ascii");
    let plain = snapshot.to_string();

    let mut alice = relay.client("u1").await;
    for since in ["729.729.", plain.as_str(), tampered.as_str(), "q", "pAAAA"] {
        let reply = join_since(&mut alice, "project:1", since).await;
        assert_eq!(reply["type"], "error", "{since}: {reply}");
        assert_eq!(reply["code"], "bad_request", "{since}: {reply}");
        assert_eq!(reply["ref"], "j");
    }
    let joined = join_since(&mut alice, "project:1", &sealed).await;
    assert_eq!(joined["recovered"], true, "{joined}");

    let token = common::token("u1");
    for since in ["729.729.", plain.as_str(), tampered.as_str()] {
        let path = format!("/sse?rooms=project:1&token={token}");
        let sse = SseClient::connect(relay.addr(), &path, Some(since)).await;
        assert_eq!(sse.status, 400, "Last-Event-ID: {since}");
    }
}

/// Reads `client`'s messages (presence included) until one satisfies `done`; returns it and
/// what came before it.
async fn until(client: &mut WsClient, done: impl Fn(&Value) -> bool) -> (Value, Vec<Value>) {
    let mut before = Vec::new();
    loop {
        let message = client.recv_any().await;
        if done(&message) {
            return (message, before);
        }
        before.push(message);
    }
}

fn has_user(message: &Value, part: &str, user: &str) -> bool {
    message[part].get(user).is_some()
}

/// Joins `room` and returns the client's view of it once `others` are all present.
async fn join_and_see(client: &mut WsClient, room: &str, others: &[&str]) {
    client.skip_presence = false;
    client.send(json!({"type": "join", "room": room})).await;
    let (joined, _) = until(client, |m| m["type"] == "joined").await;
    assert_eq!(joined["room"], room);
    let mut present: Vec<String> = Vec::new();
    while !others.iter().all(|u| present.iter().any(|p| p == u)) {
        let message = client.recv_any().await;
        let users = match message["type"].as_str() {
            Some("presence_state") => &message["users"],
            Some("presence_diff") => &message["joins"],
            _ => continue,
        };
        if let Some(users) = users.as_object() {
            present.extend(users.keys().cloned());
        }
    }
}

/// Deleting a membership, and nothing else, ends the removed member's room at that change: it
/// gets the `project_member_deleted` it may read, then `left` `revoked`, then nothing more of the
/// room (no presence, no typing); the others see it leave and stop typing, on every relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_leaves_at_the_change_with_its_presence_and_typing() {
    let a = TestRelay::start().await;
    let b = TestRelay::start_on(a.db_url.clone(), |_| {}).await;
    let mut alice = a.client("u1").await;
    join_and_see(&mut alice, "project:1", &["u1"]).await;
    let mut bob = b.client("u2").await;
    join_and_see(&mut bob, "project:1", &["u1", "u2"]).await;
    until(&mut alice, |m| {
        m["type"] == "presence_diff" && has_user(m, "joins", "u2")
    })
    .await;
    bob.send(json!({"type": "typing", "room": "project:1", "typing": true}))
        .await;
    until(&mut alice, |m| m["type"] == "typing" && m["user"] == "u2").await;

    a.sql("DELETE FROM project_members WHERE project_id = 1 AND user_id = 'u2'")
        .await;
    let (left, before) = until(&mut bob, |m| m["type"] == "left").await;
    assert_eq!(left["reason"], "revoked", "{left}");
    assert_eq!(left["room"], "project:1");
    let events: Vec<&Value> = before.iter().filter(|m| m["type"] != "pong").collect();
    assert!(
        events.iter().all(|m| m["type"] == "event"),
        "nothing but the change before left: {events:?}"
    );
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["event"], "project_member_deleted");

    // The others see bob go, and stop seeing him type.
    let (_, seen) = until(&mut alice, |m| {
        m["type"] == "presence_diff" && has_user(m, "leaves", "u2")
    })
    .await;
    let stopped = json!({"type": "typing", "room": "project:1", "user": "u2", "typing": false});
    // (On a slow machine the indicator may have run out on its own before.)
    if !seen.contains(&stopped) {
        let (typing, _) = until(&mut alice, |m| m["type"] == "typing").await;
        assert_eq!(typing, stopped);
    }

    // Nothing of the room reaches bob any more.
    alice
        .send(json!({"type": "presence", "room": "project:1", "meta": {"after": true}}))
        .await;
    alice
        .send(json!({"type": "typing", "room": "project:1", "typing": true}))
        .await;
    let mut carol = a.client("u3").await;
    join_and_see(&mut carol, "project:1", &["u1", "u3"]).await;
    bob.send(json!({"type": "typing", "room": "project:1", "typing": true, "ref": "t"}))
        .await;
    assert_eq!(bob.recv_any().await["code"], "not_joined");
    bob.ping().await;
    bob.expect_nothing(Duration::from_millis(500)).await;
}

/// A token refreshed with narrower claims re-checks the connection's rooms at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_with_narrower_claims_rechecks_the_rooms() {
    let relay = TestRelay::start().await;
    relay
        .sql(
            "CREATE FUNCTION can_join_team(user_id text, claims jsonb, key text) RETURNS boolean
             LANGUAGE sql STABLE AS $$ SELECT coalesce(claims -> 'teams' ? key, false) $$;
             SELECT pgrelay.allow_join('team', 'can_join_team');",
        )
        .await;
    let token = |teams: Value| {
        let mut claims = serde_json::Map::new();
        claims.insert("teams".into(), teams);
        pgrelay::jwt::mint(common::SECRET, "u1", Duration::from_secs(3600), &claims).expect("token")
    };
    let url = format!("{}?token={}", relay.ws_url(), token(json!(["red", "blue"])));
    let mut alice = WsClient::connect(&url).await.expect("connect");
    assert_eq!(alice.recv().await["type"], "ready");
    alice.join("team:red").await;
    alice.join("team:blue").await;

    // The same claims with a later expiry re-check nothing worth a `left`.
    alice
        .send(json!({"type": "auth", "token": token(json!(["blue", "red"]))}))
        .await;
    assert_eq!(alice.recv().await["type"], "ready");
    alice
        .send(json!({"type": "auth", "token": token(json!(["blue"]))}))
        .await;
    assert_eq!(alice.recv().await["type"], "ready");
    let left = alice.recv().await;
    assert_eq!(left["type"], "left", "{left}");
    assert_eq!(
        (&left["room"], &left["reason"]),
        (&json!("team:red"), &json!("revoked"))
    );
    alice.ping().await;
    alice
        .send(json!({"type": "typing", "room": "team:blue", "typing": true, "ref": "t"}))
        .await;
    alice.expect_nothing(Duration::from_millis(300)).await;
}

/// A TRUNCATE of a watched table is recorded: relays forget what they remembered and re-check
/// every room (here everyone lost their project).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_forgets_remembered_answers_and_rechecks_the_rooms() {
    let relay = TestRelay::start().await;
    let mut alice = relay.client("u1").await;
    alice.join("project:1").await;
    relay
        .sql("UPDATE tasks SET priority = 7 WHERE id = 1")
        .await;
    assert_eq!(alice.recv_event().await["row"]["priority"], 7);
    let forgotten = relay.metric("policy_invalidations_total").await;

    relay.sql("TRUNCATE project_members").await;
    let left = alice.recv().await;
    assert_eq!(
        (&left["type"], &left["reason"]),
        (&json!("left"), &json!("revoked")),
        "{left}"
    );
    assert!(relay.metric("policy_invalidations_total").await > forgotten);
}

/// `CREATE OR REPLACE` keeps a policy's OID; the event trigger records it, so the next change is
/// judged by the new function, not by what was remembered from the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_replaced_in_place_applies_from_the_next_change() {
    let relay = TestRelay::start().await;
    let mut alice = relay.client("u1").await;
    alice.join("project:1").await;
    for p in [1, 2] {
        relay
            .sql(&format!("UPDATE tasks SET priority = {p} WHERE id = 1"))
            .await;
        assert_eq!(alice.recv_event().await["row"]["priority"], p);
    }
    relay
        .sql(
            "CREATE OR REPLACE FUNCTION can_read_task(user_id text, claims jsonb, \"row\" jsonb)
             RETURNS boolean LANGUAGE sql STABLE AS $$ SELECT false $$",
        )
        .await;
    relay
        .sql("UPDATE tasks SET priority = 3 WHERE id = 1; UPDATE projects SET name = 'marker' WHERE id = 1")
        .await;
    let next = alice.recv_event().await;
    assert_eq!(
        next["event"], "project_updated",
        "the task is hidden now: {next}"
    );
}

/// What the outbox cannot show (a membership deleted with triggers off) is caught by the
/// periodic re-check within its interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_recheck_catches_what_the_outbox_cannot_show() {
    let relay = TestRelay::start_with(|c| c.recheck_interval = Duration::from_millis(300)).await;
    let mut bob = relay.client("u2").await;
    bob.join("project:1").await;
    relay
        .sql(
            "BEGIN; SET LOCAL session_replication_role = replica;
             DELETE FROM project_members WHERE project_id = 1 AND user_id = 'u2'; COMMIT;",
        )
        .await;
    let started = std::time::Instant::now();
    let left = bob.recv().await;
    assert_eq!(
        (&left["type"], &left["reason"]),
        (&json!("left"), &json!("revoked")),
        "{left}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}
