//! Resume under load: a restarted relay's clients all coming back at once, and a user whose
//! replays never read, must cost seconds and hurt no one else.

mod common;

use std::time::{Duration, Instant};

use common::{TestRelay, WsClient};
use serde_json::{json, Value};

fn priority(event: &Value) -> i64 {
    event["row"]["priority"]
        .as_i64()
        .unwrap_or_else(|| panic!("no priority in {event}"))
}

/// Users `s1..sN`, members of project 1.
async fn members(relay: &TestRelay, n: usize) {
    relay
        .sql(&format!(
            "INSERT INTO users (id, name) SELECT 's' || g, 'storm' FROM generate_series(1, {n}) g;
             INSERT INTO project_members (project_id, user_id, role)
               SELECT 1, 's' || g, 'member' FROM generate_series(1, {n}) g;"
        ))
        .await;
}

async fn connect(addr: std::net::SocketAddr, user: &str) -> WsClient {
    let url = format!("ws://{addr}/ws?token={}", common::token(user));
    let mut client = WsClient::connect(&url).await.expect("connect");
    assert_eq!(client.recv().await["type"], "ready");
    client
}

/// A few hundred clients resume at once after a restart (with a pool of 4 connections): all of
/// them catch up, with nothing lost or repeated, within a bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_relays_clients_all_resume_at_once_and_catch_up_quickly() {
    const CLIENTS: usize = 300;
    const MISSED: i64 = 200;
    let mut relay = TestRelay::start().await;
    members(&relay, CLIENTS).await;
    let addr = relay.addr();
    let mut last_ids = Vec::new();
    let mut clients = Vec::new();
    for n in 1..=CLIENTS {
        let mut client = connect(addr, &format!("s{n}")).await;
        client.join("project:1").await;
        clients.push(client);
    }
    relay
        .sql("UPDATE tasks SET priority = 0 WHERE id = 1")
        .await;
    for client in &mut clients {
        // (The relay may deliver the memberships written above to the first ones to join.)
        let event = loop {
            let event = client.recv_event().await;
            if event["table"] == "tasks" {
                break event;
            }
        };
        assert_eq!(priority(&event), 0);
        last_ids.push(event["id"].as_str().expect("id").to_owned());
    }
    drop(clients);
    relay.relay.take().expect("running").shutdown().await;

    for i in 1..=MISSED {
        relay
            .sql(&format!(
                "UPDATE tasks SET priority = {i} WHERE id = {}",
                1 + i % 2
            ))
            .await;
    }
    let relay = TestRelay::start_on(relay.db_url.clone(), |_| {}).await;
    let addr = relay.addr();
    let started = Instant::now();
    let mut resuming = Vec::new();
    for (n, since) in last_ids.into_iter().enumerate() {
        resuming.push(tokio::spawn(async move {
            let mut client = connect(addr, &format!("s{}", n + 1)).await;
            client
                .send(json!({"type": "join", "room": "project:1", "since": since}))
                .await;
            let joined = client.recv().await;
            assert_eq!(joined["recovered"], true, "{joined}");
            for i in 1..=MISSED {
                let event = client.recv().await;
                assert_eq!(event["type"], "event", "{event}");
                assert_eq!(priority(&event), i, "nothing lost, nothing repeated");
            }
            client.expect_nothing(Duration::from_millis(50)).await;
        }));
    }
    for client in resuming {
        client.await.expect("every client catches up");
    }
    // Generous: this includes 300 debug-build handshakes and joins on a shared machine (about
    // 10 s when it is busy; the replays themselves take well under one).
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "{CLIENTS} clients took {took:?} to catch up"
    );
    assert_eq!(relay.metric("replay_failures_total").await, 0);
    // Shared reads: far fewer changes read than clients x changes.
    let read = relay.metric("replay_changes_read_total").await;
    assert!(
        read < 10 * MISSED as u64,
        "{read} changes read for {CLIENTS} replays of {MISSED}"
    );
}

/// One user opens 18 replays of a big backlog and reads none of them: another user still joins
/// and receives live changes at once, and the stalled replays end as slow consumers (4008).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_replays_of_one_user_stop_no_one_else() {
    let relay = TestRelay::start_with(|c| c.replay.stall = Duration::from_secs(2)).await;
    let mut probe = relay.client("u2").await;
    let old = probe.join("project:1").await["position"]
        .as_str()
        .expect("position")
        .to_owned();
    drop(probe);
    let read_before = relay.metric("changes_read_total").await;
    relay
        .sql(
            "INSERT INTO comments (task_id, project_id, author_id, body)
             SELECT 1, 1, 'u1', repeat('x', 600) || g FROM generate_series(1, 20000) g",
        )
        .await;
    tokio::time::timeout(Duration::from_secs(30), async {
        while relay.metric("changes_read_total").await < read_before + 20_000 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the relay reads the backlog");

    let mut stalled = Vec::new();
    for _ in 0..18 {
        let mut client = relay.client("u2").await;
        client
            .send(json!({"type": "join", "room": "project:1", "since": old}))
            .await;
        stalled.push(client); // and never read again
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut alice = relay.client("u1").await;
    let joined = tokio::time::timeout(Duration::from_secs(5), alice.join("task:2")).await;
    assert!(joined.is_ok(), "another user's join is answered at once");
    relay
        .sql("UPDATE tasks SET priority = 42 WHERE id = 2")
        .await;
    let event = tokio::time::timeout(Duration::from_secs(5), alice.recv_event())
        .await
        .expect("live delivery goes on");
    assert_eq!(priority(&event), 42);

    // The stalled replays are slow consumers: closed with 4008 (resumable), one turn of the
    // user's budget after another.
    tokio::time::timeout(Duration::from_secs(30), async {
        while relay.metric("replay_stalls_total").await < 8 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("stalled replays end");
    assert!(relay.metric("slow_consumer_disconnects_total").await >= 8);
    drop(stalled);
}
