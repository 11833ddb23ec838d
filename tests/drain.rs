//! Graceful drain: on SIGTERM a relay turns `/readyz` to 503 at once, refuses new connections,
//! keeps serving the open ones for `--drain-grace`, then closes WebSockets with 1001, ends SSE
//! streams, and exits 0.

mod common;

use std::time::{Duration, Instant};

use common::{close_code, SseClient, WsClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_for_the_grace_period_then_closes_with_1001_and_exits_0() {
    let db_url = common::fresh_database().await;
    let (mut child, addr) = common::spawn_relay(&db_url, &["--drain-grace", "2s"]).await;
    let db = common::connect(&db_url).await;
    let mut alice = common::client_at(&addr, "u1").await;
    alice.join("task:1").await;
    let socket: std::net::SocketAddr = addr.parse().expect("addr");
    let mut sse = SseClient::connect(
        socket,
        &format!("/sse?rooms=task:1&token={}", common::token("u1")),
        None,
    )
    .await;
    assert_eq!(sse.status, 200);

    common::sigterm(&child);
    let signalled = Instant::now();

    // At once: not ready, and new connections are turned away.
    let mut not_ready = false;
    for _ in 0..40 {
        if common::http_get(&format!("http://{addr}/readyz")).await.0 == 503 {
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(not_ready, "/readyz turns 503 right after SIGTERM");
    assert!(signalled.elapsed() < Duration::from_secs(1));
    match WsClient::connect(&format!("ws://{addr}/ws?token={}", common::token("u2"))).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503)
        }
        Err(other) => panic!("expected a 503, got {other}"),
        Ok(_) => panic!("a new WebSocket was accepted while draining"),
    }
    let refused = SseClient::connect(
        socket,
        &format!("/sse?rooms=task:1&token={}", common::token("u2")),
        None,
    )
    .await;
    assert_eq!(refused.status, 503, "a new SSE stream is refused too");

    // The open connections are still served during the grace period.
    db.batch_execute("UPDATE tasks SET title = 'during the drain' WHERE id = 1")
        .await
        .expect("write");
    let event = alice.recv_event().await;
    assert_eq!(event["row"]["title"], "during the drain");
    let (_, event) = sse.next_event().await;
    assert_eq!(event["row"]["title"], "during the drain");

    // Then: 1001, the SSE stream ends, exit 0, and not before the grace period.
    assert_eq!(alice.closed().await, close_code(1001));
    assert!(
        signalled.elapsed() >= Duration::from_millis(1900),
        "closed after {:?}, before the grace period",
        signalled.elapsed()
    );
    assert!(sse.ends().await, "the SSE stream ends");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the relay exits")
        .expect("wait");
    assert_eq!(status.code(), Some(0), "a drained relay exits 0");
}
