//! How a Server-Sent Events stream ends (docs/protocol.md): when its token expires, when the
//! client falls more than its queue's limit behind, and when the relay shuts down. The client
//! then reconnects with a fresh token and `Last-Event-ID`.

mod common;

use std::time::Duration;

use common::{expiring_at, now, now_exact, token, SseClient, TestRelay};

/// Opens `/sse?rooms=project:1` as alice with `token` and reads its `joined` notice.
async fn alice_in_project_1(relay: &TestRelay, token: &str) -> SseClient {
    let path = format!("/sse?rooms=project:1&token={token}");
    let mut stream = SseClient::connect(relay.addr(), &path, None).await;
    assert_eq!(stream.status, 200);
    assert_eq!(stream.next().await.event.as_deref(), Some("joined"));
    stream
}

/// `writes` updates of task 1, each with a 100 kB description ending in its number: events of
/// about 200 kB (the old and the new description).
async fn write_big_descriptions(relay: &TestRelay, writes: usize) {
    let big = "x".repeat(100_000);
    for i in 0..writes {
        relay.describe_task_1(&big, i).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_stream_ends_when_its_token_expires() {
    let relay = TestRelay::start().await;
    let exp = now() + 2;
    let mut stream = alice_in_project_1(&relay, &expiring_at("u1", exp)).await;
    relay
        .sql("UPDATE tasks SET title = 'before expiry' WHERE id = 1")
        .await;
    assert_eq!(stream.next_event().await.1["row"]["title"], "before expiry");

    assert!(stream.ended().await, "the stream outlived its token");
    common::assert_ended_at_expiry(exp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_stream_that_falls_behind_ends_instead_of_skipping_events() {
    let relay = TestRelay::start_with(|c| c.limits.max_queued_bytes = 64 * 1024).await;
    let mut stream = alice_in_project_1(&relay, &token("u1")).await;
    // Far more than the socket buffers and the 64 KiB queue hold (each event carries the old and
    // the new description), while the client reads nothing.
    let writes = 100;
    write_big_descriptions(&relay, writes).await;
    // Reading now: what the buffers held arrives, in order and without a gap, then the end.
    let mut received = 0;
    while let Some(message) = tokio::time::timeout(common::WAIT, stream.next_or_end())
        .await
        .expect("neither an event nor the end")
    {
        let data: serde_json::Value = serde_json::from_str(&message.data).expect("JSON");
        let description = data["row"]["description"].as_str().unwrap_or_default();
        assert!(
            description.ends_with(&format!("x{received}")),
            "event {received} expected, got another"
        );
        received += 1;
    }
    assert!(
        received < writes,
        "every event arrived: the stream never fell behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_stream_ends_when_the_relay_shuts_down() {
    let mut relay = TestRelay::start().await;
    let mut stream = alice_in_project_1(&relay, &token("u1")).await;
    let running = relay.relay.take().expect("running");
    let stopping = tokio::spawn(running.shutdown());
    assert!(stream.ended().await, "the stream outlived the relay");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("bounded")
        .expect("join");
}

/// The WebSocket session notices expiry while its socket is full (its frames are written by a
/// task of their own); an SSE stream must too, or a client that stops reading keeps its
/// connection slot and its rooms past its token's `exp`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "bug: the SSE stream checks its deadline only when hyper polls the body, which it does not while the socket is full (src/transport/sse.rs, being rewritten on the `resume` branch)"]
async fn an_sse_stream_whose_client_stopped_reading_still_ends_at_expiry() {
    let relay = TestRelay::start_with(|c| c.limits.max_queued_bytes = 64 << 20).await;
    let exp = now() + 2;
    let _stalled = alice_in_project_1(&relay, &expiring_at("u1", exp)).await;
    // More than the socket buffers hold, less than the (raised) queue limit: the relay's writes
    // to this client block, and nothing but the expiry may end the stream.
    write_big_descriptions(&relay, 60).await;
    for _ in 0..100 {
        if relay.metric("connections").await == 0 {
            assert!(now_exact() >= exp as f64, "not before expiry");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the stalled stream was still open 10 s after its token expired");
}
