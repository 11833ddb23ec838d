//! Two relay processes behind a real HAProxy (Debian's, with `deploy/haproxy.cfg`), each
//! restarted in turn (SIGTERM: drain, then 1001) while clients connected through the load balancer
//! receive a steady stream of changes. Every client reconnects through the load balancer with
//! `since` and must end up with every change exactly once, in order.
//!
//! Skipped, saying so, where `haproxy` is not installed (`.ci/run` installs it).

mod common;

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

const CLIENTS: usize = 6;

fn free_addr() -> String {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    socket.local_addr().expect("addr").to_string()
}

async fn wait_for(url: &str, status: u16) -> bool {
    for _ in 0..400 {
        if common::http_get(url).await.0 == status {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

async fn start_relay(db_url: &str, addr: &str) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args(["serve", "--bind", addr, "--drain-grace", "1s"])
        .env("DATABASE_URL", db_url)
        .env(
            "PGRELAY_JWT_SECRET",
            std::str::from_utf8(common::SECRET).expect("utf8"),
        )
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn a relay");
    assert!(
        wait_for(&format!("http://{addr}/readyz"), 200).await,
        "relay on {addr} ready"
    );
    child
}

/// SIGTERM, then the drain, then exit 0.
async fn stop_relay(mut child: Child) {
    common::sigterm(&child);
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("the relay exits after draining")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
}

/// What one client saw: the `priority` values of task 1, in order, and how often it connected.
struct Seen {
    values: Vec<i64>,
    connections: usize,
}

/// A client that stays joined to `task:1` through the load balancer, reconnecting with `since`
/// whenever its connection ends, until `done` is set and it has seen `last`.
async fn client(
    lb: String,
    user: &'static str,
    done: Arc<AtomicBool>,
    last: Arc<std::sync::atomic::AtomicI64>,
) -> Seen {
    let mut seen = Seen {
        values: Vec::new(),
        connections: 0,
    };
    let mut since: Option<String> = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    'connect: while tokio::time::Instant::now() < deadline {
        if done.load(Ordering::SeqCst) && seen.values.last() == Some(&last.load(Ordering::SeqCst)) {
            break;
        }
        let url = format!("ws://{lb}/ws?token={}", common::token(user));
        let Ok((mut ws, _)) = tokio_tungstenite::connect_async(&url).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        seen.connections += 1;
        let mut join = json!({"type": "join", "room": "task:1"});
        if let Some(since) = &since {
            join["since"] = since.clone().into();
        }
        if ws
            .send(Message::Text(join.to_string().into()))
            .await
            .is_err()
        {
            continue;
        }
        loop {
            let frame = tokio::time::timeout(Duration::from_millis(500), ws.next()).await;
            let message = match frame {
                // Quiet: is everything in?
                Err(_) => {
                    if done.load(Ordering::SeqCst)
                        && seen.values.last() == Some(&last.load(Ordering::SeqCst))
                    {
                        break 'connect;
                    }
                    continue;
                }
                Ok(Some(Ok(Message::Text(text)))) => {
                    serde_json::from_str::<Value>(&text).expect("JSON")
                }
                Ok(Some(Ok(_))) => continue,
                // Closed (1001 from a draining relay) or broken: reconnect and resume.
                Ok(Some(Err(_)) | None) => continue 'connect,
            };
            match message["type"].as_str() {
                Some("joined") => {
                    if since.is_some() {
                        assert_eq!(message["recovered"], true, "{user}: {message}");
                    } else {
                        since = message["position"].as_str().map(str::to_owned);
                    }
                }
                Some("event") => {
                    since = message["id"].as_str().map(str::to_owned);
                    seen.values
                        .push(message["row"]["priority"].as_i64().expect("priority"));
                }
                Some("error") => panic!("{user}: {message}"),
                _ => {}
            }
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_each_replica_behind_haproxy_loses_no_clients_event() {
    if std::process::Command::new("haproxy")
        .arg("-v")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: haproxy is not installed (apt-get install haproxy; .ci/run does)");
        return;
    }
    let db_url = common::fresh_database().await;
    let db = common::connect(&db_url).await;
    let (addr1, addr2, lb) = (free_addr(), free_addr(), free_addr());
    let mut relay1 = start_relay(&db_url, &addr1).await;
    let mut relay2 = start_relay(&db_url, &addr2).await;
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy.cfg");
    let check = std::process::Command::new("haproxy")
        .args(["-c", "-f", config])
        .env("LB_BIND", &lb)
        .env("RELAY1_ADDR", &addr1)
        .env("RELAY2_ADDR", &addr2)
        .output()
        .expect("haproxy -c");
    assert!(
        check.status.success(),
        "deploy/haproxy.cfg is valid: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let _haproxy = Command::new("haproxy")
        .args(["-db", "-f", config])
        .env("LB_BIND", &lb)
        .env("RELAY1_ADDR", &addr1)
        .env("RELAY2_ADDR", &addr2)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start haproxy");
    assert!(
        wait_for(&format!("http://{lb}/readyz"), 200).await,
        "haproxy up"
    );

    let done = Arc::new(AtomicBool::new(false));
    let last = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let users = ["u1", "u2"];
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            tokio::spawn(client(
                lb.clone(),
                users[i % users.len()],
                done.clone(),
                last.clone(),
            ))
        })
        .collect();
    // Every client joined before the first change (their first position precedes it).
    tokio::time::sleep(Duration::from_secs(1)).await;

    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let (writing, last) = (writing.clone(), last.clone());
        tokio::spawn(async move {
            let mut i = 0i64;
            while writing.load(Ordering::SeqCst) {
                i += 1;
                db.execute(
                    "UPDATE tasks SET priority = $1 WHERE id = 1",
                    &[&(i as i32)],
                )
                .await
                .expect("write");
                last.store(i, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            i
        })
    };

    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_relay(relay1).await;
    relay1 = start_relay(&db_url, &addr1).await;
    // Back in HAProxy's rotation (two good checks) before the other one goes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop_relay(relay2).await;
    relay2 = start_relay(&db_url, &addr2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    writing.store(false, Ordering::SeqCst);
    let written = writer.await.expect("writer");
    done.store(true, Ordering::SeqCst);

    let expected: Vec<i64> = (1..=written).collect();
    let mut connections = Vec::new();
    for (i, handle) in clients.into_iter().enumerate() {
        let seen = handle.await.expect("client");
        assert_eq!(
            seen.values, expected,
            "client {i}: every change once, in order ({} connections)",
            seen.connections
        );
        connections.push(seen.connections);
    }
    eprintln!("{written} changes; connections per client: {connections:?}");
    // Both replicas were restarted, and every client was on one of them.
    assert!(
        connections.iter().all(|&c| c > 1),
        "every client resumed on another replica at least once: {connections:?}"
    );
    assert!(
        written > 50,
        "changes kept coming during the restarts: {written}"
    );
    drop((relay1, relay2));
}
