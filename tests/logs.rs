//! What the relay logs: JSON lines with `--log-format json`, and never a token, a claim or row
//! data, even at `RUST_LOG=debug`.

mod common;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{http_get, WsClient, SECRET};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A token of `user` that expired a minute ago, correctly signed.
fn expired_token(user: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = json!({"sub": user, "iat": now - 120, "exp": now - 60});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET),
    )
    .expect("sign")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_logs_are_json_and_hold_no_tokens_claims_or_rows() {
    let db = common::fresh_database().await;
    let addr = common::free_address();
    let mut relay = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args(["serve", "--bind", &addr, "--log-format", "json"])
        .env("DATABASE_URL", &db)
        .env(
            "PGRELAY_JWT_SECRET",
            std::str::from_utf8(SECRET).expect("utf8"),
        )
        .env("RUST_LOG", "debug")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let logs = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut lines = BufReader::new(relay.stderr.take().expect("stderr")).lines();
    let collected = logs.clone();
    let collector = tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            collected.lock().expect("logs").push(line);
        }
    });
    let mut ready = false;
    for _ in 0..400 {
        if http_get(&format!("http://{addr}/readyz")).await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ready, "the relay became ready");

    // A claim the policies receive, distinctive enough to find anywhere.
    let mut claims = Map::new();
    claims.insert("email".into(), "claim-canary-5521@example.com".into());
    let valid = pgrelay::jwt::mint(SECRET, "u1", Duration::from_secs(3600), &claims).expect("mint");
    let forged = pgrelay::jwt::mint(b"another secret", "u1", Duration::from_secs(3600), &claims)
        .expect("mint");
    let expired = expired_token("u2");

    // Valid in the URL, joined, receiving a change; the same token again in `auth`.
    let mut alice = WsClient::connect(&format!("ws://{addr}/ws?token={valid}"))
        .await
        .expect("connect");
    assert_eq!(alice.recv().await["type"], "ready");
    alice.join("project:1").await;
    alice.send(json!({"type": "auth", "token": valid})).await;
    assert_eq!(alice.recv().await["type"], "ready");
    let writer = common::connect(&db).await;
    writer
        .batch_execute("UPDATE tasks SET title = 'row-canary-7731' WHERE id = 1")
        .await
        .expect("update");
    let event = alice.recv_event().await;
    assert_eq!(event["row"]["title"], "row-canary-7731");

    // Forged and expired: in the URL (refused before the upgrade), in `auth`, and on SSE.
    for bad in [&forged, &expired] {
        assert!(WsClient::connect(&format!("ws://{addr}/ws?token={bad}"))
            .await
            .is_err());
        let mut client = WsClient::connect(&format!("ws://{addr}/ws"))
            .await
            .expect("connect");
        client.send(json!({"type": "auth", "token": bad})).await;
        assert_eq!(client.recv().await["code"], "unauthorized");
        let (status, _) = http_get(&format!("http://{addr}/sse?rooms=project:1&token={bad}")).await;
        assert_eq!(status, 401);
    }
    drop(alice);

    let pid = relay.id().expect("pid").to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let status = tokio::time::timeout(Duration::from_secs(15), relay.wait())
        .await
        .expect("exits")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
    let _ = tokio::time::timeout(Duration::from_secs(5), collector).await;

    let logs = logs.lock().expect("logs").clone();
    assert!(
        logs.iter().any(|l| l.contains("pgrelay listening")),
        "the relay logged: {logs:#?}"
    );
    for line in &logs {
        let parsed: Value = serde_json::from_str(line)
            .unwrap_or_else(|err| panic!("not a JSON log line ({err}): {line}"));
        assert!(parsed["level"].is_string(), "{line}");
        for (what, secret) in [
            ("the valid token", valid.as_str()),
            ("the forged token", forged.as_str()),
            ("the expired token", expired.as_str()),
            ("a claim", "claim-canary-5521"),
            ("row data", "row-canary-7731"),
        ] {
            assert!(!line.contains(secret), "{what} is in the logs: {line}");
        }
        // The signature alone would do as much harm as the token.
        for token in [&valid, &forged, &expired] {
            let signature = token.rsplit('.').next().unwrap_or_default();
            assert!(
                !line.contains(signature),
                "a signature is in the logs: {line}"
            );
        }
    }
}
