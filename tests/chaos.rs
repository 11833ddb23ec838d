//! Chaos: writers keep committing while relays are SIGKILLed and SIGTERMed, every backend is
//! terminated and Postgres restarts; clients that keep resuming, on two relays in turn, end with
//! exactly the changes each may read, once, in commit order. (A test binary of its own: it
//! stops its cluster.)

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::process::Child;
use tokio_tungstenite::tungstenite::Message;

/// A SIGTERMed relay drains for a second (its clients keep receiving, then get 1001), not the
/// default ten.
const RELAY_ARGS: &[&str] = &["--drain-grace", "1s"];

/// The relays' current addresses (a restarted relay listens on a new port).
type Addresses = Arc<Mutex<[String; 2]>>;

/// What a client received: (task id, priority) per event, in order.
type Received = Arc<Mutex<Vec<(i64, i64)>>>;

/// Keeps writing `priority = 1, 2, ...` to one task, reconnecting whenever the database goes
/// away (a write whose commit failed may or may not have happened: the outbox says which).
async fn writer(url: String, task: i64, stop: Arc<AtomicBool>) {
    let mut n = 0i64;
    let mut db: Option<tokio_postgres::Client> = None;
    while !stop.load(Ordering::Relaxed) {
        let client = match &db {
            Some(client) if !client.is_closed() => client,
            _ => match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    db.insert(client)
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        n += 1;
        let write = format!("UPDATE tasks SET priority = {n} WHERE id = {task}");
        if client.batch_execute(&write).await.is_err() {
            db = None;
        }
        tokio::time::sleep(Duration::from_millis(8)).await;
    }
}

/// A client that resumes, on the relays in turn, whenever its connection ends.
async fn resumer(user: &'static str, relays: Addresses, received: Received, stop: Arc<AtomicBool>) {
    let mut last: Option<String> = None;
    let mut turn = 0usize;
    while !stop.load(Ordering::Relaxed) {
        turn += 1;
        let addr = relays.lock().expect("addresses")[turn % 2].clone();
        let url = format!("ws://{addr}/ws?token={}", common::token(user));
        let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio_tungstenite::connect_async(url),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let join = match &last {
            Some(since) => json!({"type": "join", "room": "project:1", "since": since}),
            None => json!({"type": "join", "room": "project:1"}),
        };
        if ws
            .send(Message::Text(join.to_string().into()))
            .await
            .is_err()
        {
            continue;
        }
        // Until the connection ends (or, now and then, a deliberate reconnect elsewhere).
        let until = tokio::time::Instant::now() + Duration::from_millis(2500);
        loop {
            let next = tokio::time::timeout_at(until, ws.next()).await;
            let Ok(Some(Ok(Message::Text(text)))) = next else {
                if matches!(next, Ok(Some(Ok(_)))) {
                    continue;
                }
                break;
            };
            let message: Value = serde_json::from_str(&text).expect("JSON");
            match message["type"].as_str() {
                Some("joined") => {
                    if last.is_some() {
                        assert_eq!(message["recovered"], true, "{user}: {message}");
                    } else {
                        last = message["position"].as_str().map(str::to_owned);
                    }
                }
                Some("event") => {
                    let task = message["row"]["id"].as_i64().expect("task id");
                    let priority = message["row"]["priority"].as_i64().expect("priority");
                    received.lock().expect("received").push((task, priority));
                    last = message["id"].as_str().map(str::to_owned);
                }
                // Not ready, database away, replay failed: resume again.
                Some("error" | "left") => break,
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn kill(relay: &mut Child, signal: &str) {
    let pid = relay.id().expect("running").to_string();
    let status = tokio::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .await
        .expect("kill");
    assert!(status.success());
    let _ = tokio::time::timeout(Duration::from_secs(10), relay.wait()).await;
}

/// Stops the relay in `slot` with `signal` and starts a new one in its place.
async fn restart(relays: &Addresses, db_url: &str, slot: usize, relay: &mut Child, signal: &str) {
    kill(relay, signal).await;
    let (fresh, addr) = common::spawn_relay(db_url, RELAY_ARGS).await;
    *relay = fresh;
    relays.lock().expect("addresses")[slot] = addr;
}

/// What the outbox says was committed to `task`, in commit order (one writer per task).
async fn committed(db: &tokio_postgres::Client, task: i64) -> Vec<i64> {
    db.query(
        "SELECT (\"row\"->>'priority')::int8 FROM pgrelay.changes
         WHERE tbl = 'tasks' AND op = 'UPDATE' AND (\"row\"->>'id')::int8 = $1 ORDER BY id",
        &[&task],
    )
    .await
    .expect("outbox")
    .iter()
    .map(|r| r.get::<_, Option<i64>>(0).expect("a priority"))
    .collect()
}

fn of_task(received: &Received, task: i64) -> Vec<i64> {
    received
        .lock()
        .expect("received")
        .iter()
        .filter(|(t, _)| *t == task)
        .map(|(_, p)| *p)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_clients_on_two_relays_get_everything_once_in_order_through_chaos() {
    let db_url = common::fresh_database().await;
    let (mut a, addr_a) = common::spawn_relay(&db_url, RELAY_ARGS).await;
    let (mut b, addr_b) = common::spawn_relay(&db_url, RELAY_ARGS).await;
    let relays: Addresses = Arc::new(Mutex::new([addr_a, addr_b]));
    let stop_clients = Arc::new(AtomicBool::new(false));
    let stop_writers = Arc::new(AtomicBool::new(false));
    // Alice may read task 1 and the private task 3; bob only task 1.
    let (alice, bob): (Received, Received) = Default::default();
    let clients = [("u1", alice.clone()), ("u2", bob.clone())].map(|(user, received)| {
        tokio::spawn(resumer(
            user,
            relays.clone(),
            received,
            stop_clients.clone(),
        ))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writers =
        [1, 3].map(|task| tokio::spawn(writer(db_url.clone(), task, stop_writers.clone())));

    let terminate_backends = || async {
        let db = common::connect(&db_url).await;
        db.batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .await
        .expect("terminate");
    };
    let pause = || tokio::time::sleep(Duration::from_secs(2));

    pause().await;
    restart(&relays, &db_url, 0, &mut a, "-KILL").await;
    pause().await;
    restart(&relays, &db_url, 1, &mut b, "-TERM").await;
    pause().await;
    terminate_backends().await;
    pause().await;
    common::stop_cluster().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    common::start_cluster_again().await;
    pause().await;
    restart(&relays, &db_url, 1, &mut b, "-KILL").await;
    pause().await;
    terminate_backends().await;
    pause().await;
    restart(&relays, &db_url, 0, &mut a, "-TERM").await;
    pause().await;
    stop_writers.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.expect("writer");
    }

    // The truth: what the outbox holds.
    let db = common::connect(&db_url).await;
    let (public, private) = (committed(&db, 1).await, committed(&db, 3).await);
    assert!(
        public.len() > 100 && private.len() > 100,
        "writers kept committing through it all: {} and {}",
        public.len(),
        private.len()
    );
    let caught_up = || {
        of_task(&alice, 1) == public && of_task(&alice, 3) == private && of_task(&bob, 1) == public
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !caught_up() && tokio::time::Instant::now() < deadline {
        // Stop early if a stream went wrong: a longer one can never become right.
        if of_task(&alice, 1).len() > public.len() || of_task(&bob, 1).len() > public.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_clients.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client");
    }
    let first_difference = |got: &[i64], want: &[i64]| {
        (0..got.len().max(want.len()))
            .find(|&i| got.get(i) != want.get(i))
            .map(|i| (i, got.get(i).copied(), want.get(i).copied()))
    };
    assert_eq!(
        first_difference(&of_task(&alice, 1), &public),
        None,
        "alice, task 1: once each, in commit order"
    );
    assert_eq!(
        first_difference(&of_task(&alice, 3), &private),
        None,
        "alice, task 3: once each, in commit order"
    );
    assert_eq!(
        first_difference(&of_task(&bob, 1), &public),
        None,
        "bob, task 1: once each, in commit order"
    );
    assert!(of_task(&bob, 3).is_empty(), "bob may not read task 3");
    drop((a, b));
}
