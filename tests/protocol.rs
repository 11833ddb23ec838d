//! The WebSocket protocol at its edges: authentication, bad input, limits, shutdown.
//! Every bad input gets the documented error or close code, and nothing else is affected.

mod common;

use std::time::Duration;

use common::{
    close_code, expiring_at, iso, now, now_exact, signed, token, TestRelay, WsClient, SECRET,
};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, Message};

/// A WebSocket connection with `token` in the URL (its `ready` not read yet).
async fn connect_with(relay: &TestRelay, token: &str) -> WsClient {
    WsClient::connect(&format!("{}?token={token}", relay.ws_url()))
        .await
        .expect("connect")
}

/// Tokens that must be refused, and why.
fn bad_tokens() -> Vec<(&'static str, String)> {
    let t = now();
    vec![
        (
            "forged",
            signed(json!({"sub": "u1", "exp": t + 60}), b"not-the-secret"),
        ),
        (
            "expired",
            signed(json!({"sub": "u1", "exp": t - 5}), SECRET),
        ),
        ("no sub", signed(json!({"exp": t + 60}), SECRET)),
        ("no exp", signed(json!({"sub": "u1"}), SECRET)),
        ("garbage", "garbage".to_owned()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_at_the_upgrade_is_answered_with_401() {
    let relay = TestRelay::start().await;
    for (why, token) in bad_tokens() {
        let url = format!("{}?token={token}", relay.ws_url());
        match WsClient::connect(&url).await {
            Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401, "{why}"),
            Err(other) => panic!("{why}: unexpected error {other:?}"),
            Ok(_) => panic!("{why}: the upgrade succeeded"),
        }
    }
    // The Authorization header works like the query parameter.
    let mut request = tungstenite::client::IntoClientRequest::into_client_request(relay.ws_url())
        .expect("request");
    request.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", token("u2")).parse().expect("header"),
    );
    let (mut stream, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("header auth");
    let ready = futures_util::StreamExt::next(&mut stream)
        .await
        .expect("frame")
        .expect("ok");
    let ready: Value = serde_json::from_str(ready.to_text().expect("text")).expect("json");
    assert_eq!(ready["user"], "u2");
    assert_eq!(
        relay.metric("auth_failures_total").await,
        5,
        "one per bad token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticating_by_message_refreshing_and_refusing() {
    let relay = TestRelay::start().await;
    let mut client = WsClient::connect(&relay.ws_url()).await.expect("connect");

    client
        .send(json!({"type": "join", "room": "project:1", "ref": "early"}))
        .await;
    let reply = client.recv().await;
    assert_eq!(
        (reply["code"].as_str(), reply["ref"].as_str()),
        (Some("unauthorized"), Some("early"))
    );

    let first_exp = now() + 600;
    client
        .send(json!({"type": "auth", "token": expiring_at("u1", first_exp), "ref": "a1"}))
        .await;
    let ready = client.recv().await;
    assert_eq!(
        (
            ready["type"].as_str(),
            ready["user"].as_str(),
            ready["ref"].as_str(),
            ready["expires_at"].as_str()
        ),
        (
            Some("ready"),
            Some("u1"),
            Some("a1"),
            Some(iso(first_exp).as_str())
        )
    );
    client.join("project:1").await;

    // A fresh token of the same user extends the session; another user's is refused.
    let later_exp = first_exp + 3000;
    client
        .send(json!({"type": "auth", "token": expiring_at("u1", later_exp), "ref": "a2"}))
        .await;
    let refreshed = client.recv().await;
    assert_eq!(
        (refreshed["type"].as_str(), refreshed["expires_at"].as_str()),
        (Some("ready"), Some(iso(later_exp).as_str())),
        "{refreshed}"
    );
    client
        .send(json!({"type": "auth", "token": token("u2"), "ref": "a3"}))
        .await;
    let refused = client.recv().await;
    assert_eq!(
        (refused["code"].as_str(), refused["ref"].as_str()),
        (Some("unauthorized"), Some("a3"))
    );
    relay
        .sql("UPDATE tasks SET title = 'still alice' WHERE id = 2")
        .await;
    assert_eq!(client.recv_event().await["row"]["title"], "still alice");

    // An invalid token in a message: an error, then close 4001.
    client
        .send(json!({"type": "auth", "token": "garbage", "ref": "a4"}))
        .await;
    let error = client.recv().await;
    assert_eq!(
        (error["code"].as_str(), error["ref"].as_str()),
        (Some("unauthorized"), Some("a4"))
    );
    assert_eq!(client.closed().await, close_code(4001));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_auth_in_time_and_an_expiring_token_close_with_4001() {
    let relay = TestRelay::start_with(|c| c.limits.auth_timeout = Duration::from_millis(300)).await;
    let connected = std::time::Instant::now();
    let mut silent = WsClient::connect(&relay.ws_url()).await.expect("connect");
    assert_eq!(silent.closed().await, close_code(4001));
    assert!(
        connected.elapsed() >= Duration::from_millis(300),
        "not before the authentication timeout"
    );

    let exp = now() + 2;
    let mut client = connect_with(&relay, &expiring_at("u1", exp)).await;
    assert_eq!(client.recv().await["type"], "ready");
    client.join("project:1").await;
    assert_eq!(client.closed().await, close_code(4001));
    common::assert_ended_at_expiry(exp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_extends_the_session_past_the_first_tokens_expiry() {
    let relay = TestRelay::start().await;
    let first_exp = now() + 2;
    let mut client = connect_with(&relay, &expiring_at("u1", first_exp)).await;
    assert_eq!(client.recv().await["expires_at"], iso(first_exp));
    client.join("project:1").await;
    let later_exp = first_exp + 60;
    client
        .send(json!({"type": "auth", "token": expiring_at("u1", later_exp)}))
        .await;
    assert_eq!(client.recv().await["expires_at"], iso(later_exp));

    // Well past the first token's expiry, the session is open and still receives changes.
    let past = first_exp as f64 + 1.5 - now_exact();
    client
        .expect_nothing(Duration::from_secs_f64(past.max(0.0)))
        .await;
    relay
        .sql("UPDATE tasks SET title = 'after the first exp' WHERE id = 1")
        .await;
    assert_eq!(
        client.recv_event().await["row"]["title"],
        "after the first exp"
    );
    assert_eq!(relay.metric("connections").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_bad_request_and_the_connection_keeps_working() {
    let relay = TestRelay::start().await;
    let mut alice = relay.client("u1").await;
    alice.join("project:1").await;
    let mut bob = relay.client("u2").await;
    bob.join("project:1").await;

    let cases: Vec<(Message, Option<&str>)> = vec![
        (Message::Text("{not json".into()), None),
        (Message::Text("[1,2,3]".into()), None),
        (
            Message::Text(r#"{"type":"dance","ref":"r1"}"#.into()),
            Some("r1"),
        ),
        (Message::Text(r#"{"ref":"r2"}"#.into()), Some("r2")),
        (
            Message::Text(r#"{"type":"join","ref":"r3"}"#.into()),
            Some("r3"),
        ),
        (
            Message::Text(r#"{"type":"join","room":"Project 1","ref":"r4"}"#.into()),
            Some("r4"),
        ),
        (
            Message::Text(
                r#"{"type":"join","room":"project:1","since":"tampered","ref":"r5"}"#.into(),
            ),
            Some("r5"),
        ),
        (
            Message::Text(
                r#"{"type":"typing","room":"project:1","typing":"yes","ref":"r6"}"#.into(),
            ),
            Some("r6"),
        ),
        (Message::Binary(vec![0, 159, 146, 150].into()), None),
    ];
    for (message, reference) in cases {
        let shown = format!("{message:?}");
        alice.send_raw(message).await;
        let reply = alice.recv().await;
        assert_eq!(reply["type"], "error", "{shown}: {reply}");
        assert_eq!(reply["code"], "bad_request", "{shown}: {reply}");
        assert_eq!(reply["ref"].as_str(), reference, "{shown}: {reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    alice.ping().await;
    // Still joined, still receiving; and bob never noticed anything.
    relay
        .sql("UPDATE tasks SET title = 'unaffected' WHERE id = 1")
        .await;
    assert_eq!(alice.recv_event().await["row"]["title"], "unaffected");
    assert_eq!(bob.recv_event().await["row"]["title"], "unaffected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_and_unknown_rooms_are_refused_and_the_connection_keeps_working() {
    let relay = TestRelay::start().await;
    let mut dave = relay.client("u4").await;
    for room in ["project:1", "task:1", "user:u1", "nope:1", "project:abc"] {
        dave.send(json!({"type": "join", "room": room, "ref": room}))
            .await;
        let reply = dave.recv().await;
        assert_eq!(
            (reply["code"].as_str(), reply["ref"].as_str()),
            (Some("forbidden"), Some(room)),
            "{reply}"
        );
    }
    dave.join("user:u4").await;
    relay
        .sql("INSERT INTO project_members VALUES (2, 'u4', 'member')")
        .await;
    assert_eq!(dave.recv_event().await["event"], "project_member_created");
    assert_eq!(relay.metric("joins_forbidden_total").await, 5);

    // A private task's room is closed to members who may not read it.
    let mut carol = relay.client("u3").await;
    carol.send(json!({"type": "join", "room": "task:3"})).await;
    assert_eq!(carol.recv().await["code"], "forbidden");
    carol.join("task:1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_too_many_rooms_and_oversized_messages() {
    let relay = TestRelay::start_with(|c| c.limits.max_rooms_per_connection = 2).await;
    let mut alice = relay.client("u1").await;
    alice.join("project:1").await;
    alice.join("task:1").await;
    alice.join("task:1").await; // joining again is not a new room
    alice
        .send(json!({"type": "join", "room": "task:2", "ref": "x"}))
        .await;
    let reply = alice.recv().await;
    assert_eq!(
        (reply["code"].as_str(), reply["ref"].as_str()),
        (Some("too_many_rooms"), Some("x"))
    );
    alice.ping().await;

    let mut bob = relay.client("u2").await;
    let huge = json!({"type": "ping", "pad": "x".repeat(70 * 1024)});
    bob.send(huge).await;
    assert_eq!(bob.closed().await, close_code(1009));
    alice.ping().await; // others unaffected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_with_4008_and_others_carry_on() {
    let relay = TestRelay::start_with(|c| c.limits.max_queued_bytes = 64 * 1024).await;
    let mut stalled = relay.client("u1").await;
    stalled.join("project:1").await;
    let mut reader = relay.client("u2").await;
    reader.join("project:1").await;

    // Large events until the stalled client's queue overflows (the socket buffers absorb the first
    // few megabytes); the reader keeps up throughout.
    let big = "x".repeat(200_000);
    for i in 0.. {
        assert!(i < 400, "the stalled client was never closed");
        relay.describe_task_1(&big, i).await;
        let event = reader.recv_event().await;
        assert!(event["row"]["description"]
            .as_str()
            .is_some_and(|d| d.ends_with(&i.to_string())));
        // The relay gives up on the stalled client without waiting for it to read anything.
        if relay.metric("slow_consumer_disconnects_total").await >= 1 {
            break;
        }
    }
    // ... and the client, reading now, finds the 4008 close after what the socket held.
    assert_eq!(stalled.closed().await, close_code(4008));
    assert_eq!(
        relay.metric("slow_consumer_disconnects_total").await,
        1,
        "only the stalled client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_still_closed_when_its_token_expires() {
    let relay = TestRelay::start().await;
    let exp = now() + 3;
    let mut stalled = connect_with(&relay, &expiring_at("u1", exp)).await;
    stalled
        .send(json!({"type": "join", "room": "project:1"}))
        .await;
    // Changes keep coming for this client, which reads none of them; they stay far below its
    // 1 MiB queue, so nothing but the expiry may close it.
    let writes = 100;
    for i in 0..writes {
        relay
            .sql(&format!("UPDATE tasks SET priority = {i} WHERE id = 1"))
            .await;
    }
    // The session ends at expiry without the client having read a single frame.
    wait_for_metric(&relay, "connections", |v| v == 0).await;
    assert!(now_exact() >= exp as f64, "not before the token expired");
    assert_eq!(relay.metric("slow_consumer_disconnects_total").await, 0);
    // Reading now, the client finds what was sent to it, then the 4001 close (and no 4008).
    assert_eq!(stalled.recv().await["type"], "ready");
    assert_eq!(stalled.recv().await["type"], "joined");
    for i in 0..writes {
        assert_eq!(stalled.recv_event().await["row"]["priority"], i);
    }
    assert_eq!(stalled.closed().await, close_code(4001));
}

async fn wait_for_metric(relay: &TestRelay, name: &str, done: impl Fn(u64) -> bool) {
    for _ in 0..300 {
        if done(relay.metric(name).await) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "metric {name} never reached the expected value (now {})",
        relay.metric(name).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_every_socket_with_1001() {
    let mut relay = TestRelay::start().await;
    let mut alice = relay.client("u1").await;
    alice.join("project:1").await;
    let mut bob = relay.client("u2").await;
    let running = relay.relay.take().expect("running");
    let stopping = tokio::spawn(running.shutdown());
    assert_eq!(alice.closed().await, close_code(1001));
    assert_eq!(bob.closed().await, close_code(1001));
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("bounded")
        .expect("join");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_endpoints() {
    let relay = TestRelay::start().await;
    let base = format!("http://{}", relay.addr());
    assert_eq!(
        common::http_get(&format!("{base}/healthz")).await,
        (200, "ok".to_owned())
    );
    assert_eq!(common::http_get(&format!("{base}/readyz")).await.0, 200);
    let mut alice = relay.client("u1").await;
    alice.join("project:1").await;
    relay
        .sql("UPDATE tasks SET title = 'counted' WHERE id = 1")
        .await;
    alice.recv_event().await;
    let (status, metrics) = common::http_get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("# TYPE pgrelay_events_delivered_total counter"),
        "{metrics}"
    );
    assert_eq!(relay.metric("connections").await, 1);
    assert_eq!(relay.metric("events_delivered_total").await, 1);
    assert_eq!(relay.metric("listener_connected").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_says_recovered_only_when_since_was_given() {
    let relay = TestRelay::start().await;
    let mut alice = relay.client("u1").await;
    let joined = alice.join("project:1").await;
    assert!(
        joined.get("recovered").is_none(),
        "no since, no recovered: {joined}"
    );
    let position = joined["position"].as_str().expect("position").to_owned();
    let resumed = alice.join_since("task:1", &position).await;
    assert_eq!(resumed["recovered"], true, "{resumed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_racing_a_batch_gets_every_change_after_its_position_and_none_before() {
    let relay = TestRelay::start().await;
    // Writes stream in while clients join; each client must receive exactly the suffix of
    // changes after its joined position, in order.
    let writer = {
        let url = relay.db_url.clone();
        tokio::spawn(async move {
            let db = common::connect(&url).await;
            for i in 0..300 {
                db.batch_execute(&format!("UPDATE tasks SET priority = {i} WHERE id = 1"))
                    .await
                    .expect("write");
            }
        })
    };
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut c = relay.client("u2").await;
        let position = c.join("task:1").await["position"]
            .as_str()
            .expect("position")
            .to_owned();
        clients.push((c, position));
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    writer.await.expect("writer");
    relay
        .sql("UPDATE tasks SET priority = -1 WHERE id = 1")
        .await;
    async fn priorities_until_the_end(c: &mut WsClient) -> Vec<i64> {
        let mut seen = Vec::new();
        loop {
            let e = c.recv_event().await;
            match e["row"]["priority"].as_i64().expect("priority") {
                -1 => return seen,
                p => seen.push(p),
            }
        }
    }
    for (mut c, position) in clients {
        let live = priorities_until_the_end(&mut c).await;
        for pair in live.windows(2) {
            assert_eq!(pair[1], pair[0] + 1, "gap or duplicate after {}", pair[0]);
        }
        // What the outbox holds after the joined position, replayed on another connection:
        // the live client got exactly that, so it missed nothing after it and got nothing
        // committed before it.
        let mut replay = relay.client("u2").await;
        let joined = replay.join_since("task:1", &position).await;
        assert_eq!(joined["recovered"], true, "{joined}");
        assert_eq!(
            live,
            priorities_until_the_end(&mut replay).await,
            "the live client's changes are exactly those after its position"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_get_rate_limited_then_closed_with_4029_and_others_carry_on() {
    let relay = TestRelay::start_with(|c| {
        c.limits.messages_per_second = 5;
        c.limits.message_burst = 5;
        c.limits.joins_per_second = 1;
        c.limits.join_burst = 2;
    })
    .await;
    let mut calm = relay.client("u1").await;

    let mut joiner = relay.client("u2").await;
    joiner.join("project:1").await;
    joiner.join("task:1").await;
    joiner
        .send(json!({"type": "join", "room": "task:2", "ref": "j3"}))
        .await;
    let reply = joiner.recv().await;
    assert_eq!(
        (reply["code"].as_str(), reply["ref"].as_str()),
        (Some("rate_limited"), Some("j3"))
    );

    let mut flood = relay.client("u2").await;
    for _ in 0..100 {
        // The relay may close the connection before the flood ends.
        let ping = Message::Text(json!({"type": "ping"}).to_string().into());
        if futures_util::SinkExt::send(&mut flood.stream, ping)
            .await
            .is_err()
        {
            break;
        }
    }
    let mut pongs = 0;
    let mut limited = 0;
    loop {
        match tokio::time::timeout(
            common::WAIT,
            futures_util::StreamExt::next(&mut flood.stream),
        )
        .await
        {
            Ok(Some(Ok(Message::Text(text)))) => {
                let m: Value = serde_json::from_str(&text).expect("json");
                match m["type"].as_str() {
                    Some("pong") => pongs += 1,
                    Some("error") if m["code"] == "rate_limited" => limited += 1,
                    _ => panic!("unexpected {m}"),
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(4029));
                break;
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected pongs, rate_limited, then 4029; got {other:?}"),
        }
    }
    assert!(
        (5..=10).contains(&pongs),
        "about the burst got through: {pongs}"
    );
    assert_eq!(limited, 1, "one error, not one per dropped message");
    calm.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_user_are_limited_across_websocket_and_sse() {
    let relay = TestRelay::start_with(|c| c.limits.max_connections_per_user = 2).await;
    let first = relay.client("u1").await;
    let path = format!("/sse?rooms=user:u1&token={}", token("u1"));
    let sse = common::SseClient::connect(relay.addr(), &path, None).await;
    assert_eq!(sse.status, 200);
    let mut third = WsClient::connect(&format!("{}?token={}", relay.ws_url(), token("u1")))
        .await
        .expect("connect");
    let error = third.recv().await;
    assert_eq!(error["code"], "rate_limited");
    assert_eq!(third.closed().await, close_code(4029));
    assert_eq!(
        common::SseClient::connect(relay.addr(), &path, None)
            .await
            .status,
        429
    );
    // Other users are not affected, and closing one connection frees a slot.
    relay.client("u2").await;
    drop(first);
    let mut again = None;
    for _ in 0..100 {
        let mut c = WsClient::connect(&format!("{}?token={}", relay.ws_url(), token("u1")))
            .await
            .expect("connect");
        if c.recv().await["type"] == "ready" {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "the slot was released");
}

/// Every SSE stream joins all its rooms when it opens, so opening streams is rate limited per
/// user, and closing them gives nothing back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_sse_streams_is_rate_limited_per_user() {
    let relay = TestRelay::start_with(|c| {
        c.limits.joins_per_second = 1;
        c.limits.join_burst = 2;
    })
    .await;
    let path = |user: &str| format!("/sse?rooms=user:{user}&token={}", token(user));
    for _ in 0..2 {
        let stream = common::SseClient::connect(relay.addr(), &path("u1"), None).await;
        assert_eq!(stream.status, 200);
    } // both closed again
    let refused = common::SseClient::connect(relay.addr(), &path("u1"), None).await;
    assert_eq!(
        refused.status, 429,
        "closing streams does not refill the budget"
    );
    let other = common::SseClient::connect(relay.addr(), &path("u2"), None).await;
    assert_eq!(other.status, 200, "other users are not affected");
    let mut again = 0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        again = common::SseClient::connect(relay.addr(), &path("u1"), None)
            .await
            .status;
        if again == 200 {
            break;
        }
    }
    assert_eq!(again, 200, "the budget refills");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_after_the_idle_timeout_and_a_live_one_is_not() {
    let relay = TestRelay::start_with(|c| {
        c.limits.ping_interval = Duration::from_millis(100);
        c.limits.idle_timeout = Duration::from_millis(600);
    })
    .await;
    let mut live = relay.client("u1").await;
    let mut silent = relay.client("u2").await;
    // The live client reads (and so answers the relay's pings) for well over the timeout.
    live.expect_nothing(Duration::from_millis(1500)).await;
    live.ping().await;
    // The silent one read nothing and answered no ping: the relay has closed it (1000, "idle
    // timeout"); only the live client remains.
    wait_for_metric(&relay, "connections", |n| n == 1).await;
    // (Reading now, the client's library may trip over its own pending pongs before it sees the
    // close frame, so either ending is accepted here.)
    assert!(matches!(
        silent.closed().await,
        common::Ended::Closed(None | Some(1000))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_from_other_origins_are_refused() {
    let relay =
        TestRelay::start_with(|c| c.allowed_origins = vec!["https://app.example".to_owned()]).await;
    let connect = |origin: Option<&'static str>| {
        let url = format!("{}?token={}", relay.ws_url(), token("u1"));
        async move {
            let mut request =
                tungstenite::client::IntoClientRequest::into_client_request(url).expect("request");
            if let Some(origin) = origin {
                request
                    .headers_mut()
                    .insert("Origin", origin.parse().expect("header"));
            }
            tokio_tungstenite::connect_async(request).await.map(|_| ())
        }
    };
    match connect(Some("https://evil.example")).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
        other => panic!("expected 403, got {other:?}"),
    }
    assert!(connect(Some("https://app.example")).await.is_ok());
    assert!(
        connect(None).await.is_ok(),
        "non-browser clients send no Origin"
    );
}
