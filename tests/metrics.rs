//! `GET /metrics` after real traffic: the histograms move, and the labelled counts are exact.
//!
//! Demo data (see tests/common): alice (u1) owns project 1, dave (u4) is in no project.

mod common;

use std::time::Duration;

use common::{close_code, http_get, TestRelay, WsClient};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// The value of the sample `name` (with its labels, if any) in a scrape.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|value| value.trim().parse().ok())
}

/// Scrapes until `name` has `expected` (the relay counts some things after the client saw them,
/// a close say), or gives up after 5 s with what it last saw.
async fn wait_for(relay: &TestRelay, name: &str, expected: f64) -> String {
    let url = format!("http://{}/metrics", relay.addr());
    let mut body = String::new();
    for _ in 0..200 {
        body = http_get(&url).await.1;
        if sample(&body, name) == Some(expected) {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "{name} is {:?}, expected {expected}:\n{body}",
        sample(&body, name)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_moves_the_histograms_and_counts_closes_and_errors_by_label() {
    let relay = TestRelay::start_with(|config| {
        config.maintenance_interval = Duration::from_millis(100);
    })
    .await;

    // A live event: latency and one read-policy query.
    let mut alice = relay.client("u1").await;
    let joined = alice.join("project:1").await;
    let position = joined["position"].as_str().expect("position").to_owned();
    relay
        .sql("UPDATE tasks SET status = 'done' WHERE id = 1")
        .await;
    let event = alice.recv_event().await;
    assert_eq!(event["row"]["status"], "done");
    wait_for(&relay, "pgrelay_event_latency_seconds_count", 1.0).await;

    // A resume from before that change: one replay, which is not a live event.
    let mut again = relay.client("u1").await;
    again
        .send(json!({"type": "join", "room": "project:1", "since": position}))
        .await;
    assert_eq!(again.recv().await["type"], "joined");
    let replayed = again.recv_event().await;
    assert_eq!(
        replayed["row"], event["row"],
        "the missed change is replayed"
    );
    wait_for(&relay, "pgrelay_replay_seconds_count", 1.0).await;

    // Errors: a forbidden join and a message that is not JSON.
    let mut dave = relay.client("u4").await;
    dave.send(json!({"type": "join", "room": "project:1", "ref": "j"}))
        .await;
    assert_eq!(dave.recv().await["code"], "forbidden");
    dave.send_raw(Message::Text("not json".into())).await;
    assert_eq!(dave.recv().await["code"], "bad_request");

    // A bad token in `auth`: an error, then 4001.
    let mut stranger = WsClient::connect(&relay.ws_url()).await.expect("connect");
    stranger
        .send(json!({"type": "auth", "token": "not-a-token"}))
        .await;
    assert_eq!(stranger.recv().await["code"], "unauthorized");
    assert_eq!(stranger.closed().await, close_code(4001));

    // An SSE stream refused before it opens.
    let (status, _) = http_get(&format!(
        "http://{}/sse?rooms=project:1&token=nope",
        relay.addr()
    ))
    .await;
    assert_eq!(status, 401);

    let body = wait_for(
        &relay,
        r#"pgrelay_connections_closed_total{transport="ws",code="4001"}"#,
        1.0,
    )
    .await;
    for (name, expected) in [
        (
            r#"pgrelay_errors_sent_total{transport="ws",code="forbidden"}"#,
            1.0,
        ),
        (
            r#"pgrelay_errors_sent_total{transport="ws",code="bad_request"}"#,
            1.0,
        ),
        (
            r#"pgrelay_errors_sent_total{transport="ws",code="unauthorized"}"#,
            1.0,
        ),
        (
            r#"pgrelay_errors_sent_total{transport="sse",code="unauthorized"}"#,
            1.0,
        ),
        (r#"pgrelay_connections_opened_total{transport="ws"}"#, 4.0),
        ("pgrelay_event_latency_seconds_count", 1.0),
        (r#"pgrelay_event_latency_seconds_bucket{le="+Inf"}"#, 1.0),
        ("pgrelay_replay_seconds_count", 1.0),
    ] {
        assert_eq!(sample(&body, name), Some(expected), "{name}:\n{body}");
    }
    let policy_queries = sample(&body, "pgrelay_policy_query_seconds_count").expect("policy");
    assert!(policy_queries >= 1.0, "the read policy was asked:\n{body}");
    let latency = sample(&body, "pgrelay_event_latency_seconds_sum").expect("sum");
    assert!(
        latency > 0.0 && latency < 5.0,
        "latency {latency} s is plausible"
    );
    assert!(body.contains(&format!(
        "pgrelay_build_info{{version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    )));
    // Caught up: the status report (every 100 ms here) finds nothing undelivered.
    let body = wait_for(&relay, "pgrelay_outbox_backlog_changes", 0.0).await;
    assert_eq!(sample(&body, "pgrelay_outbox_lag_seconds"), Some(0.0));
}
