//! Promises of docs/security.md and docs/dba.md that no other test file covers: tokens never reach
//! the relay's logs, revocation applies to what a returning client replays, and the relay runs
//! with exactly the privileges docs/dba.md lists.

mod common;

use std::time::Duration;

use common::{expiring_at, now, signed, token, SseClient, TestRelay, WsClient, SECRET};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_appear_in_the_relays_logs() {
    let db = common::fresh_database().await;
    let log_path = std::env::temp_dir().join(format!("pgrelay-log-{}.txt", std::process::id()));
    let log = std::fs::File::create(&log_path).expect("log file");
    // Everything pgrelay logs, at its most verbose, and its libraries' debug output.
    let (mut relay, addr) = common::spawn_relay_with(&db, &[], |command| {
        command.env("RUST_LOG", "pgrelay=trace,debug").stderr(log);
    })
    .await;

    let t = now();
    let valid = [
        token("u1"),
        token("u2"),
        token("u3"),
        expiring_at("u1", t + 900),
    ];
    let refused = [
        signed(json!({"sub": "u1", "exp": t + 60}), b"not-the-secret"),
        signed(json!({"sub": "u1", "exp": t - 5}), SECRET),
        signed(json!({"exp": t + 60}), SECRET),
        "eyJub3QiOiJhIGp3dCJ9.c2VjcmV0LWxvb2tpbmc.Z2FyYmFnZS1zaWduYXR1cmU".to_owned(),
    ];
    // Valid tokens: in the URL, in the header, in a first message, in a refresh, for SSE.
    common::client_at(&addr, "u1").await.join("project:1").await;
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{addr}/ws"
        ))
        .expect("request");
    request.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", valid[1]).parse().expect("header"),
    );
    let (_by_header, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("header auth");
    let mut by_message = WsClient::connect(&format!("ws://{addr}/ws"))
        .await
        .expect("connect");
    by_message
        .send(json!({"type": "auth", "token": valid[2]}))
        .await;
    assert_eq!(by_message.recv().await["type"], "ready");
    let mut refreshing = WsClient::connect(&format!("ws://{addr}/ws?token={}", valid[0]))
        .await
        .expect("connect");
    assert_eq!(refreshing.recv().await["type"], "ready");
    refreshing
        .send(json!({"type": "auth", "token": valid[3]}))
        .await;
    assert_eq!(refreshing.recv().await["type"], "ready");
    let relay_addr: std::net::SocketAddr = addr.parse().expect("address");
    let sse = SseClient::connect(
        relay_addr,
        &format!("/sse?rooms=user:u2&token={}", valid[1]),
        None,
    )
    .await;
    assert_eq!(sse.status, 200);

    // Refused tokens, the same ways.
    for bad in &refused {
        assert!(
            WsClient::connect(&format!("ws://{addr}/ws?token={bad}"))
                .await
                .is_err(),
            "refused at the upgrade"
        );
        let sse =
            SseClient::connect(relay_addr, &format!("/sse?rooms=user:u1&token={bad}"), None).await;
        assert_eq!(sse.status, 401);
        let mut client = WsClient::connect(&format!("ws://{addr}/ws"))
            .await
            .expect("connect");
        client.send(json!({"type": "auth", "token": bad})).await;
        assert_eq!(client.recv().await["code"], "unauthorized");
        // A refresh with a bad token, on an authenticated connection.
        refreshing.send(json!({"type": "auth", "token": bad})).await;
        assert_eq!(refreshing.recv().await["code"], "unauthorized");
        refreshing = WsClient::connect(&format!("ws://{addr}/ws?token={}", valid[0]))
            .await
            .expect("connect");
        assert_eq!(refreshing.recv().await["type"], "ready");
    }

    // A clean shutdown, so that everything the relay meant to log is in the file.
    assert_eq!(common::terminate(&mut relay).await, Some(0));
    let logged = std::fs::read_to_string(&log_path).expect("log");
    let _ = std::fs::remove_file(&log_path);

    assert!(
        logged.lines().count() > 20,
        "the relay logged almost nothing, so this test proves nothing:\n{logged}"
    );
    for token in valid.iter().chain(&refused) {
        // The whole token, and its signature alone (the part that makes it a credential).
        let signature = token.rsplit('.').next().expect("signature");
        for secret in [token.as_str(), signature] {
            if let Some(at) = logged.find(secret) {
                let line = logged[..at].lines().count();
                panic!(
                    "a token is in the log, line {line}: {}",
                    logged
                        .lines()
                        .nth(line.saturating_sub(1))
                        .unwrap_or_default()
                );
            }
        }
    }
    assert!(
        !logged.contains("token="),
        "a request URL with its token parameter is in the log"
    );
}

/// docs/protocol.md: a returning client receives each change after `since` that its *current*
/// authorization lets it read; what it could read when it happened but may not now is not
/// replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_applies_to_what_a_returning_client_replays() {
    let relay = TestRelay::start().await;
    common::notes_board(&relay, "").await;
    // Pins are for everyone: the fence.
    relay
        .sql(
            "CREATE TABLE pins (id int PRIMARY KEY);
             CREATE FUNCTION can_read_pin(u text, c jsonb, r jsonb) RETURNS boolean
                 LANGUAGE sql AS 'SELECT true';
             SELECT pgrelay.watch('pins', ARRAY['board:1'], 'can_read_pin');",
        )
        .await;
    let mut bob = relay.client("u2").await;
    let since = bob.join("board:1").await["position"]
        .as_str()
        .expect("position")
        .to_owned();
    drop(bob);

    // While bob is away: a note he may read, then he loses access, then another note.
    relay
        .sql("INSERT INTO notes VALUES (1, 'readable then')")
        .await;
    relay.sql("DELETE FROM readers WHERE user_id = 'u2'").await;
    relay
        .sql("INSERT INTO notes VALUES (2, 'never readable')")
        .await;

    let mut bob = relay.client("u2").await;
    let joined = bob.join_since("board:1", &since).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    // The first thing bob receives is a pin committed after all that: neither note 1 (revoked
    // since) nor note 2 was replayed before it.
    relay.sql("INSERT INTO pins VALUES (1)").await;
    let first = bob.recv().await;
    assert_eq!(
        (first["table"].as_str(), first["row"]["id"].as_i64()),
        (Some("pins"), Some(1)),
        "nothing of what bob may no longer read came before: {first}"
    );
    // Alice, still a reader, resuming from the same position gets both notes, then the pin.
    let mut alice = relay.client("u1").await;
    alice.join_since("board:1", &since).await;
    for expected in [("notes", 1), ("notes", 2), ("pins", 1)] {
        let event = alice.recv_event().await;
        assert_eq!(
            (event["table"].as_str(), event["row"]["id"].as_i64()),
            (Some(expected.0), Some(expected.1)),
            "{event}"
        );
    }
}

/// docs/dba.md, "Privileges": a relay whose role has exactly the grants that section lists
/// (maintenance aside, which it says may run as the owner instead) joins, delivers, resumes and
/// reports its status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_works_with_exactly_the_privileges_the_dba_guide_lists() {
    let db = common::fresh_database().await;
    let database = db.rsplit('/').next().expect("database").to_owned();
    let role = format!("relay_of_{database}");
    // The grants exactly as docs/dba.md writes them, for a role of this test's own.
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/dba.md"))
        .expect("docs/dba.md");
    let grants = common::sql_snippets(&guide)
        .into_iter()
        .find(|s| s.sql.contains("CREATE ROLE pgrelay_relay"))
        .expect("docs/dba.md shows the relay's grants as SQL");
    common::execute(&db, &grants.sql.replace("pgrelay_relay", &role)).await;
    let as_relay = db.replacen("postgres@", &format!("{role}@"), 1);
    assert_ne!(as_relay, db, "the URL names its user");
    // Status reports (and maintenance attempts) every 100 ms.
    let mut relay = TestRelay::start_on(as_relay, |c| {
        c.maintenance_interval = Duration::from_millis(100)
    })
    .await;
    let admin = common::connect(&db).await;

    let mut bob = relay.client("u2").await;
    let position = bob.join("project:1").await["position"]
        .as_str()
        .expect("position")
        .to_owned();
    admin
        .batch_execute("UPDATE tasks SET title = 'least privilege' WHERE id = 1")
        .await
        .expect("update");
    let event = bob.recv_event().await;
    assert_eq!(event["row"]["title"], "least privilege");
    // Resuming reads the outbox too.
    let mut again = relay.client("u2").await;
    let joined = again.join_since("task:1", &position).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    let replayed = again.recv_event().await;
    assert_eq!(
        (replayed["room"].as_str(), replayed["row"]["title"].as_str()),
        (Some("task:1"), Some("least privilege")),
        "{replayed}"
    );
    // A private task stays private: the policies ran, as this role.
    admin
        .batch_execute("UPDATE tasks SET title = 'hidden' WHERE id = 3; UPDATE tasks SET title = 'fence' WHERE id = 1")
        .await
        .expect("update");
    assert_eq!(bob.recv_event().await["row"]["title"], "fence");
    assert_eq!(relay.metric("read_errors_total").await, 0);

    // The relay reports its progress in pgrelay.relays (pgrelay.lag), and a clean shutdown
    // removes its row.
    let reported = || async {
        admin
            .query_one(
                "SELECT count(*) FROM pgrelay.relays WHERE seen_at > now() - interval '1 second'",
                &[],
            )
            .await
            .expect("relays")
            .get::<_, i64>(0)
    };
    let mut seen = 0;
    for _ in 0..100 {
        seen = reported().await;
        if seen > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, 1, "the relay reports its status");
    drop((bob, again));
    relay.relay.take().expect("running").shutdown().await;
    let left: i64 = admin
        .query_one("SELECT count(*) FROM pgrelay.relays", &[])
        .await
        .expect("relays")
        .get(0);
    assert_eq!(left, 0, "a clean shutdown removes the relay's row");
}
