//! Resume without loss: `join` with `since`, `pgrelay.position()`, relay restarts, several relays,
//! retention, and Server-Sent Events with `Last-Event-ID`.
//!
//! Most tests count with task 1's `priority`: a writer sets it to 0, 1, 2, ... and a client must
//! see every value exactly once, in order, across whatever interruption the test stages.

mod common;

use std::time::Duration;

use common::{SseClient, TestRelay, WsClient};
use serde_json::{json, Value};

fn priority(event: &Value) -> i64 {
    event["row"]["priority"]
        .as_i64()
        .unwrap_or_else(|| panic!("no priority in {event}"))
}

/// Joins `room` with `since` and returns the `joined` reply.
async fn resume(client: &mut WsClient, room: &str, since: &str) -> Value {
    client.join_since(room, since).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_was_away_gets_exactly_what_it_may_read_then_live_ones() {
    let relay = TestRelay::start().await;
    let mut bob = relay.client("u2").await;
    bob.join("project:1").await;
    relay
        .sql("UPDATE tasks SET priority = 0 WHERE id = 1")
        .await;
    let last = bob.recv_event().await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    drop(bob);

    // 1,000 changes while bob is away: half to a private task he may not read, and some to
    // project 2, which is not his room.
    for i in 1..=500 {
        relay
            .sql(&format!(
                "BEGIN; UPDATE tasks SET priority = {i} WHERE id = 1; UPDATE tasks SET priority = {i} WHERE id = 3; COMMIT;"
            ))
            .await;
        if i % 100 == 0 {
            relay
                .sql(&format!("UPDATE tasks SET priority = {i} WHERE id = 4"))
                .await;
        }
    }

    let mut bob = relay.client("u2").await;
    let joined = resume(&mut bob, "project:1", &last).await;
    assert_eq!(joined["recovered"], true);
    for i in 1..=500 {
        let event = bob.recv_event().await;
        assert_eq!(
            (event["row"]["id"].as_i64(), priority(&event)),
            (Some(1), i),
            "{event}"
        );
    }
    relay
        .sql("UPDATE tasks SET priority = -1 WHERE id = 1")
        .await;
    assert_eq!(
        priority(&bob.recv_event().await),
        -1,
        "then live, nothing else"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_while_writes_continue_has_no_gap_and_no_duplicate() {
    let relay = TestRelay::start().await;
    let writer = {
        let url = relay.db_url.clone();
        tokio::spawn(async move {
            let db = common::connect(&url).await;
            for i in 0..400 {
                db.batch_execute(&format!("UPDATE tasks SET priority = {i} WHERE id = 1"))
                    .await
                    .expect("write");
            }
        })
    };
    let mut client = relay.client("u2").await;
    client.join("task:1").await;
    let mut expected: Option<i64> = None;
    let mut resumes = 0;
    loop {
        let event = client.recv_event().await;
        let p = priority(&event);
        if let Some(e) = expected {
            assert_eq!(p, e, "gap or duplicate");
        }
        if p == 399 {
            break;
        }
        expected = Some(p + 1);
        // Every 50 events: drop the connection and resume from the last id, writes going on.
        if p % 50 == 0 {
            let id = event["id"].as_str().expect("id").to_owned();
            client = relay.client("u2").await;
            assert_eq!(resume(&mut client, "task:1", &id).await["recovered"], true);
            resumes += 1;
        }
    }
    writer.await.expect("writer");
    assert!(resumes >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_from_one_relay_resumes_on_another() {
    let first = TestRelay::start().await;
    let second = pgrelay::server::Relay::start(common::config(&first.db_url))
        .await
        .expect("second relay");
    let mut client = first.client("u1").await;
    client.join("project:1").await;
    first
        .sql("UPDATE tasks SET priority = 0 WHERE id = 1")
        .await;
    let id = client.recv_event().await["id"]
        .as_str()
        .expect("id")
        .to_owned();
    drop(client);
    for i in 1..=20 {
        first
            .sql(&format!("UPDATE tasks SET priority = {i} WHERE id = 1"))
            .await;
    }
    let url = format!(
        "ws://{}/ws?token={}",
        second.local_addr(),
        common::token("u1")
    );
    let mut client = WsClient::connect(&url).await.expect("connect");
    assert_eq!(client.recv().await["type"], "ready");
    assert_eq!(
        resume(&mut client, "project:1", &id).await["recovered"],
        true
    );
    for i in 1..=20 {
        assert_eq!(priority(&client.recv_event().await), i);
    }
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_read_with_pgrelay_position_plus_join_since_misses_nothing_and_repeats_nothing() {
    let relay = TestRelay::start().await;
    // In flight while the API reads: not in its data, must be delivered.
    let in_flight = common::connect(&relay.db_url).await;
    in_flight
        .batch_execute("BEGIN; UPDATE tasks SET title = 'in flight' WHERE id = 1")
        .await
        .expect("begin");
    // Committed before the read: in the data, must not be delivered again.
    relay
        .sql("UPDATE tasks SET title = 'already read' WHERE id = 2")
        .await;

    // The API: its data and the position, from one snapshot.
    let mut api = common::connect(&relay.db_url).await;
    let tx = api
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .expect("tx");
    let titles: Vec<String> = tx
        .query(
            "SELECT title FROM tasks WHERE project_id = 1 ORDER BY id",
            &[],
        )
        .await
        .expect("read")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let position: String = tx
        .query_one("SELECT pgrelay.position()", &[])
        .await
        .expect("position")
        .get(0);
    tx.commit().await.expect("commit");
    assert!(
        titles.contains(&"already read".to_owned()) && !titles.contains(&"in flight".to_owned())
    );

    in_flight.batch_execute("COMMIT").await.expect("commit");
    relay
        .sql("UPDATE tasks SET title = 'after' WHERE id = 2")
        .await;

    let mut alice = relay.client("u1").await;
    assert_eq!(
        resume(&mut alice, "project:1", &position).await["recovered"],
        true
    );
    assert_eq!(alice.recv_event().await["row"]["title"], "in flight");
    assert_eq!(alice.recv_event().await["row"]["title"], "after");
    relay
        .sql("UPDATE tasks SET title = 'live' WHERE id = 2")
        .await;
    assert_eq!(alice.recv_event().await["row"]["title"], "live");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_past_retention_are_not_recovered() {
    // Relays report their position at this interval; retention waits for live relays.
    let relay = TestRelay::start_with(|c| {
        c.maintenance_interval = Duration::from_millis(50);
        c.poll_interval = Duration::from_millis(20);
    })
    .await;
    let mut alice = relay.client("u1").await;
    let old = alice.join("project:1").await["position"]
        .as_str()
        .expect("position")
        .to_owned();
    relay
        .sql("UPDATE tasks SET priority = 1 WHERE id = 1")
        .await;
    let event_id = alice.recv_event().await["id"]
        .as_str()
        .expect("id")
        .to_owned();

    // Keep nothing, and let retention run its course: rotate, complete, empty.
    relay.sql("UPDATE pgrelay.retention SET keep = '0'").await;
    let mark: i64 = relay
        .db
        .query_one(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
            &[],
        )
        .await
        .expect("mark")
        .get(0);
    let mut passed = false;
    for _ in 0..200 {
        relay.sql("SELECT pgrelay.maintain()").await;
        let horizon: i64 = relay
            .db
            .query_one("SELECT horizon::text::bigint FROM pgrelay.retention", &[])
            .await
            .expect("horizon")
            .get(0);
        if horizon > mark {
            passed = true;
            break;
        }
        // Retention waits for the relay to report that it has read past each generation.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(passed, "retention never emptied the old generations");
    relay
        .sql("UPDATE tasks SET priority = 2 WHERE id = 1")
        .await;
    alice.recv_event().await;
    for since in [&old, &event_id] {
        let joined = resume(&mut alice, "task:1", since).await;
        assert_eq!(joined["recovered"], false, "{since}: {joined}");
    }
}

/// Well-formed but not issued by pgrelay (a plain snapshot, a change id that is not in the batch
/// it names): `error` `bad_request`, as for any `since` pgrelay did not issue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_pgrelay_did_not_issue_are_refused_with_bad_request() {
    let relay = TestRelay::start().await;
    let mut alice = relay.client("u1").await;
    alice.join("project:1").await;
    for forged in [
        "1.1.~999999999.999999999.~5",
        "3.3.~4.4.~999999",
        "727.727.",
    ] {
        alice
            .send(json!({"type": "join", "room": "task:2", "since": forged, "ref": "f"}))
            .await;
        let reply = alice.recv().await;
        assert_eq!(
            (
                reply["type"].as_str(),
                reply["code"].as_str(),
                reply["ref"].as_str()
            ),
            (Some("error"), Some("bad_request"), Some("f")),
            "{forged}: {reply}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_with_sigkill_and_restarted_loses_and_repeats_nothing() {
    let db_url = common::fresh_database().await;
    let start = || common::spawn_relay(&db_url, &[]);
    let connect = |addr: String| async move { common::client_at(&addr, "u2").await };
    let (mut relay, addr) = start().await;
    let mut client = connect(addr.clone()).await;
    client.join("task:1").await;

    let writer = {
        let url = db_url.clone();
        tokio::spawn(async move {
            let db = common::connect(&url).await;
            for i in 0..300 {
                db.batch_execute(&format!("UPDATE tasks SET priority = {i} WHERE id = 1"))
                    .await
                    .expect("write");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mut last_id = String::new();
    let mut next = 0;
    while next < 60 {
        let event = client.recv_event().await;
        assert_eq!(priority(&event), next);
        last_id = event["id"].as_str().expect("id").to_owned();
        next += 1;
    }
    relay.start_kill().expect("SIGKILL");
    relay.wait().await.expect("reaped");

    let (_relay, addr) = start().await;
    let mut client = connect(addr).await;
    assert_eq!(
        resume(&mut client, "task:1", &last_id).await["recovered"],
        true
    );
    writer.await.expect("writer");
    while next < 300 {
        let event = client.recv_event().await;
        assert_eq!(priority(&event), next, "nothing lost, nothing repeated");
        next += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_delivers_and_resumes_with_last_event_id() {
    let relay = TestRelay::start().await;
    let path = format!("/sse?rooms=project:1,task:1&token={}", common::token("u2"));
    let mut sse = SseClient::connect(relay.addr(), &path, None).await;
    assert_eq!(sse.status, 200);
    let joined = sse.next().await;
    assert_eq!(joined.event.as_deref(), Some("joined"));
    assert_eq!(sse.next().await.event.as_deref(), Some("joined"));

    relay
        .sql("UPDATE tasks SET priority = 0 WHERE id = 2")
        .await;
    let (last_id, event) = sse.next_event().await;
    assert_eq!(
        (event["type"].as_str(), priority(&event)),
        (Some("event"), 0)
    );
    assert_eq!(
        event["id"].as_str(),
        Some(last_id.as_str()),
        "the SSE id is the event's position"
    );
    drop(sse);

    for i in 1..=10 {
        relay
            .sql(&format!("UPDATE tasks SET priority = {i} WHERE id = 2"))
            .await;
    }
    relay
        .sql("UPDATE tasks SET priority = 100 WHERE id = 3")
        .await; // private to alice
    let mut sse = SseClient::connect(relay.addr(), &path, Some(&last_id)).await;
    assert_eq!(sse.status, 200);
    for i in 1..=10 {
        let (_, event) = sse.next_event().await;
        assert_eq!(
            (event["row"]["id"].as_i64(), priority(&event)),
            (Some(2), i)
        );
    }
    relay
        .sql("UPDATE tasks SET priority = 11 WHERE id = 2")
        .await;
    assert_eq!(priority(&sse.next_event().await.1), 11);

    // Same authentication and authorization as WebSocket.
    let no_token = SseClient::connect(relay.addr(), "/sse?rooms=project:1", None).await;
    assert_eq!(no_token.status, 401);
    let dave = format!("/sse?rooms=project:1&token={}", common::token("u4"));
    assert_eq!(
        SseClient::connect(relay.addr(), &dave, None).await.status,
        403
    );
    let bad = format!("/sse?rooms=BAD&token={}", common::token("u2"));
    assert_eq!(
        SseClient::connect(relay.addr(), &bad, None).await.status,
        400
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_closed_for_being_slow_resumes_without_loss() {
    let relay = TestRelay::start_with(|c| c.limits.max_queued_bytes = 64 * 1024).await;
    let read_before = relay.metric("changes_read_total").await;
    let mut slow = relay.client("u2").await;
    // What a client keeps: the joined position, then the id of each event it receives.
    let mut last_id = slow.join("task:1").await["position"]
        .as_str()
        .map(str::to_owned);
    // Big events while the client does not read: its queue overflows and it is closed with 4008.
    let big = "x".repeat(100_000);
    let mut written = 0;
    while relay.metric("slow_consumer_disconnects_total").await == 0 {
        assert!(written < 1000, "never closed");
        relay
            .db
            .execute(
                "UPDATE tasks SET priority = $1, description = $2 WHERE id = 1",
                &[&(written as i32), &format!("{big}{written}")],
            )
            .await
            .expect("update");
        written += 1;
    }
    for i in written..written + 20 {
        relay
            .sql(&format!("UPDATE tasks SET priority = {i} WHERE id = 1"))
            .await;
    }
    let total = written + 20;
    // Each event is bigger than the whole queue, so two live ones back to back would close even a
    // prompt reader. Resume once the relay has read everything: all of it then comes by replay,
    // which is paced to the reader.
    tokio::time::timeout(common::WAIT, async {
        while relay.metric("changes_read_total").await < read_before + total as u64 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the relay reads every change");
    // It reads what reached it, then the close; then it resumes from the last id it saw.
    let mut next = 0;
    loop {
        match tokio::time::timeout(
            common::WAIT,
            futures_util::StreamExt::next(&mut slow.stream),
        )
        .await
        {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text)))) => {
                let event: Value = serde_json::from_str(&text).expect("json");
                assert_eq!(priority(&event), next);
                next += 1;
                last_id = event["id"].as_str().map(str::to_owned);
            }
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame)))) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(4008));
                break;
            }
            other => panic!("expected events then the 4008 close, got {other:?}"),
        }
    }
    let mut again = relay.client("u2").await;
    let since = last_id.expect("a position");
    assert_eq!(
        resume(&mut again, "task:1", &since).await["recovered"],
        true
    );
    while next < total {
        assert_eq!(
            priority(&again.recv_event().await),
            next,
            "nothing lost, nothing repeated"
        );
        next += 1;
    }
}
