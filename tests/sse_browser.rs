//! Server-Sent Events as a browser's `EventSource` uses them: only change events carry an `id`
//! (the browser remembers the last one of any message), a multi-room stream is in one commit
//! order, a revoked room reaches `onmessage`, cross-origin pages may open it, and a new stream
//! resumes with `?since=`.

mod common;

use std::time::Duration;

use common::{SseClient, SseMessage, TestRelay};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn priority(event: &Value) -> i64 {
    event["row"]["priority"]
        .as_i64()
        .unwrap_or_else(|| panic!("no priority in {event}"))
}

/// What an `EventSource` keeps across reconnects: the id of the last message that had one.
#[derive(Default)]
struct LastEventId(Option<String>);

impl LastEventId {
    fn saw(&mut self, message: &SseMessage) {
        if let Some(id) = &message.id {
            self.0 = Some(id.clone());
        }
    }
}

fn data(message: &SseMessage) -> Value {
    serde_json::from_str(&message.data).expect("JSON data")
}

/// Sends a raw request and returns the status and the response headers (lower-cased names).
async fn head(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while !response.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(common::WAIT, stream.read(&mut buf))
            .await
            .expect("a response")
            .expect("read");
        assert!(n > 0, "the connection closed before the headers");
        response.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&response);
    let (head, _) = text.split_once("\r\n\r\n").expect("headers");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// (a) and (e): `joined` has no id, so a stream that drops right after it resumes from where the
/// browser really was; and a new stream resumes with `?since=`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_dropped_right_after_joined_still_gets_its_replay() {
    let relay = TestRelay::start().await;
    let rooms = format!("/sse?rooms=task:2&token={}", common::token("u2"));
    let mut browser = LastEventId::default();
    let mut sse = SseClient::connect(relay.addr(), &rooms, None).await;
    let joined = sse.next().await;
    assert_eq!(joined.event.as_deref(), Some("joined"));
    assert_eq!(joined.id, None, "only change events carry an id");
    relay
        .sql("UPDATE tasks SET priority = 0 WHERE id = 2")
        .await;
    let message = sse.next().await;
    browser.saw(&message);
    assert_eq!(priority(&data(&message)), 0);
    drop(sse);

    for i in 1..=300 {
        relay
            .sql(&format!("UPDATE tasks SET priority = {i} WHERE id = 2"))
            .await;
    }
    // A new EventSource (a fresh page, a fresh token): the position goes in the URL.
    let since = browser.0.clone().expect("an id");
    let path = format!("{rooms}&since={since}");
    let mut sse = SseClient::connect(relay.addr(), &path, None).await;
    assert_eq!(sse.status, 200);
    let joined = sse.next().await;
    assert_eq!(data(&joined)["recovered"], true, "{}", joined.data);
    let mut browser = LastEventId::default(); // a new EventSource remembers nothing yet
    browser.saw(&joined);
    // It drops right after `joined`; the browser reconnects to the same URL with what it kept.
    drop(sse);
    let mut sse = SseClient::connect(relay.addr(), &path, browser.0.as_deref()).await;
    assert_eq!(sse.next().await.event.as_deref(), Some("joined"));
    for i in 1..=300 {
        let (_, event) = sse.next_event().await;
        assert_eq!(priority(&event), i, "the whole replay, once, in order");
    }
}

/// (e): when both are present, `Last-Event-ID` (what this stream delivered) wins over `?since=`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_wins_over_since() {
    let relay = TestRelay::start().await;
    let rooms = format!("/sse?rooms=task:2&token={}", common::token("u2"));
    let mut sse = SseClient::connect(relay.addr(), &rooms, None).await;
    sse.next().await; // joined
    let mut ids = Vec::new();
    for i in 0..4 {
        relay
            .sql(&format!("UPDATE tasks SET priority = {i} WHERE id = 2"))
            .await;
        ids.push(sse.next_event().await.0);
    }
    drop(sse);
    let path = format!("{rooms}&since={}", ids[0]);
    // `since` alone resumes a new stream.
    let mut sse = SseClient::connect(relay.addr(), &path, None).await;
    sse.next().await; // joined
    assert_eq!(priority(&sse.next_event().await.1), 1, "after since");
    drop(sse);
    let mut sse = SseClient::connect(relay.addr(), &path, Some(&ids[2])).await;
    sse.next().await; // joined
    relay
        .sql("UPDATE tasks SET priority = 4 WHERE id = 2")
        .await;
    assert_eq!(
        priority(&sse.next_event().await.1),
        3,
        "after Last-Event-ID"
    );
    assert_eq!(priority(&sse.next_event().await.1), 4);
}

/// (b): live changes held back during a replay are released in commit order across the rooms of
/// the stream, not room by room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_room_stream_resumes_in_one_commit_order() {
    // A small queue, so the replay is paced to a slowly reading client and live changes pile up.
    let relay = TestRelay::start_with(|c| c.limits.max_queued_bytes = 256 * 1024).await;
    let path = format!("/sse?rooms=project:1,task:1&token={}", common::token("u1"));
    let mut sse = SseClient::connect(relay.addr(), &path, None).await;
    sse.next().await;
    sse.next().await;
    relay
        .sql("UPDATE tasks SET priority = 0 WHERE id = 2")
        .await;
    let (last, _) = sse.next_event().await;
    drop(sse);
    let read_before = relay.metric("changes_read_total").await;

    // Task 1 is in both rooms, task 2 only in project:1: seq n goes to task 1 + n % 2.
    let backlog = 3000;
    relay
        .sql(&format!(
            "DO $$ BEGIN FOR i IN 1..{backlog} LOOP
                 UPDATE tasks SET priority = i WHERE id = 1 + i % 2;
             END LOOP; END $$"
        ))
        .await;
    // Once the relay has read the backlog, all of it comes by replay, paced to the reader (live,
    // it would overflow the small queue at once).
    tokio::time::timeout(common::WAIT, async {
        while relay.metric("changes_read_total").await < read_before + backlog as u64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the relay reads the backlog");
    let live = 100;
    let writer = {
        let url = relay.db_url.clone();
        tokio::spawn(async move {
            let db = common::connect(&url).await;
            for i in backlog + 1..=backlog + live {
                db.batch_execute(&format!(
                    "UPDATE tasks SET priority = {i} WHERE id = 1 + {i} % 2"
                ))
                .await
                .expect("write");
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    let mut sse = SseClient::connect(relay.addr(), &path, Some(&last)).await;
    for _ in 0..2 {
        let joined = sse.next().await;
        assert_eq!(data(&joined)["recovered"], true, "{joined:?}");
    }
    let mut expected = Vec::new();
    for i in 1..=backlog + live {
        expected.push(i);
        if (1 + i % 2) == 1 {
            expected.push(i); // once per room
        }
    }
    let mut got = Vec::new();
    let mut ids = Vec::new();
    while got.len() < expected.len() {
        let next = tokio::time::timeout(Duration::from_secs(5), sse.next_event()).await;
        let Ok((id, event)) = next else {
            panic!("stalled after {} of {} events", got.len(), expected.len());
        };
        got.push(priority(&event));
        ids.push(id);
        if got.len() < 600 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    writer.await.expect("writer");
    if let Some(at) = (0..got.len()).find(|&i| got[i] != expected[i]) {
        let window = at.saturating_sub(3)..(at + 6).min(got.len());
        panic!(
            "every change once per room, in commit order: at {at} got {:?}, expected {:?}",
            &got[window.clone()],
            &expected[window]
        );
    }
    // One id per change: the two copies of a change share it, and ids never repeat otherwise.
    let mut distinct = ids.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), (backlog + live) as usize);
}

/// (c): a revoked room reaches `onmessage` (an unnamed message, `type: left`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_room_reaches_onmessage() {
    let relay = TestRelay::start().await;
    let path = format!("/sse?rooms=project:1&token={}", common::token("u2"));
    let mut sse = SseClient::connect(relay.addr(), &path, None).await;
    sse.next().await;
    relay
        .sql("DELETE FROM project_members WHERE project_id = 1 AND user_id = 'u2'")
        .await;
    relay
        .sql("UPDATE tasks SET priority = 7 WHERE id = 2")
        .await;
    let left = loop {
        let message = sse.next().await;
        if data(&message)["type"] == "left" {
            break message;
        }
        assert_eq!(message.event, None, "{message:?}");
    };
    assert_eq!(left.event, None, "onmessage sees it: {left:?}");
    assert_eq!(left.id, None, "not a position");
    assert_eq!(data(&left)["reason"], "revoked");
}

/// (d): CORS for the allowed origins, preflight included; other origins get none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_origins_may_open_streams_cross_origin() {
    let relay =
        TestRelay::start_with(|c| c.allowed_origins = vec!["http://app.test:3000".into()]).await;
    let path = format!("/sse?rooms=project:1&token={}", common::token("u1"));
    let app = ("Origin", "http://app.test:3000");
    let (status, headers) = head(
        relay.addr(),
        "GET",
        &path,
        &[app, ("Accept", "text/event-stream")],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        Some("http://app.test:3000")
    );
    assert_eq!(
        header(&headers, "access-control-allow-credentials"),
        Some("true")
    );

    let (status, headers) = head(
        relay.addr(),
        "OPTIONS",
        &path,
        &[
            app,
            ("Access-Control-Request-Method", "GET"),
            ("Access-Control-Request-Headers", "last-event-id"),
        ],
    )
    .await;
    assert_eq!(status, 204, "{headers:?}");
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        Some("http://app.test:3000")
    );
    assert!(header(&headers, "access-control-allow-headers")
        .is_some_and(|h| h.contains("last-event-id")));
    assert!(header(&headers, "access-control-allow-methods").is_some_and(|h| h.contains("GET")));

    // A refusal is readable by the page too (it can tell a bad token from a network failure).
    let (status, headers) = head(relay.addr(), "GET", "/sse?rooms=project:1", &[app]).await;
    assert_eq!(status, 401);
    assert!(header(&headers, "access-control-allow-origin").is_some());

    let evil = ("Origin", "http://evil.test");
    let (status, headers) = head(relay.addr(), "GET", &path, &[evil]).await;
    assert_eq!(status, 403);
    assert_eq!(header(&headers, "access-control-allow-origin"), None);
    let (status, headers) = head(
        relay.addr(),
        "OPTIONS",
        &path,
        &[evil, ("Access-Control-Request-Method", "GET")],
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(header(&headers, "access-control-allow-origin"), None);
}
