//! Who may see what, over time: positions only pgrelay can make, and access that ends the moment
//! it is taken away (events, presence and typing alike).

mod common;

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
