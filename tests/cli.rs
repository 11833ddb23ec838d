//! The `pgrelay` command line (README.md, Commands): what it prints and how it exits.

mod common;

use std::process::Stdio;
use std::time::Duration;

use pgrelay::jwt::Verifier;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn pgrelay() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pgrelay"));
    command
        .env_remove("DATABASE_URL")
        .env_remove("PGRELAY_JWT_SECRET")
        // SIGTERM ends serve at once here; tests/drain.rs covers the grace period.
        .env("PGRELAY_DRAIN_GRACE", "0s")
        .kill_on_drop(true);
    command
}

#[tokio::test]
async fn token_prints_a_verifiable_jwt_with_extra_claims() {
    let out = pgrelay()
        .args([
            "token",
            "--sub",
            "u7",
            "--ttl",
            "5m",
            "--claim",
            "role=admin",
            "--claim",
            "level=3",
        ])
        .env("PGRELAY_JWT_SECRET", "s3cret")
        .output()
        .await
        .expect("run");
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).expect("utf8");
    let principal = Verifier::from_secret(b"s3cret")
        .verify(token.trim())
        .expect("valid");
    assert_eq!(principal.user, "u7");
    assert_eq!(principal.claims["role"], "admin");
    assert_eq!(principal.claims["level"], 3, "JSON values stay JSON");
    assert!(principal.remaining() <= Duration::from_secs(300));
}

#[tokio::test]
async fn bad_configuration_exits_2_with_a_message() {
    let db = common::empty_database().await;
    // A database without the library.
    let out = pgrelay()
        .args(["serve", "--bind", "127.0.0.1:0"])
        .env("DATABASE_URL", &db)
        .env("PGRELAY_JWT_SECRET", "x")
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pgrelay migrate"));
    // A real database but no key.
    let out = pgrelay()
        .args(["serve"])
        .env("DATABASE_URL", &db)
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PGRELAY_JWT_SECRET"));
    // Nonsense flags.
    let out = pgrelay()
        .args(["serve", "--bind", "nowhere"])
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn migrate_is_idempotent_and_serve_stops_cleanly_on_sigterm() {
    let db = common::empty_database().await;
    for _ in 0..2 {
        let out = pgrelay()
            .args(["migrate", "--library-only"])
            .env("DATABASE_URL", &db)
            .output()
            .await
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let client = common::connect(&db).await;
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename IN ('tasks', 'changes')",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        tables, 1,
        "--library-only installs pgrelay.changes but not the example tables"
    );
    for _ in 0..2 {
        let out = pgrelay()
            .args(["migrate"])
            .env("DATABASE_URL", &db)
            .output()
            .await
            .expect("run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let mut serve = pgrelay()
        .args(["serve", "--bind", "127.0.0.1:0"])
        .env("DATABASE_URL", &db)
        .env("PGRELAY_JWT_SECRET", "x")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(serve.stderr.take().expect("stderr")).lines();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("serve logs")
            .expect("read")
            .expect("serve exited early");
        if line.contains("reading changes") {
            break;
        }
    }
    assert_eq!(common::terminate(&mut serve).await, Some(0));
}

#[tokio::test]
async fn tail_prints_each_change_as_a_json_line() {
    let db = common::fresh_database().await;
    let mut tail = pgrelay()
        .args(["tail", "--room", "task:2"])
        .env("DATABASE_URL", &db)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(tail.stdout.take().expect("stdout")).lines();
    let client = common::connect(&db).await;
    // tail starts from "now": write until it has certainly started (each write a new value: an
    // UPDATE that changes nothing is not a change).
    let mut attempt = 0;
    let line = loop {
        attempt += 1;
        let sql = format!(
            "UPDATE tasks SET title = 'other room {attempt}' WHERE id = 1;
             UPDATE tasks SET title = 'tailed {attempt}' WHERE id = 2"
        );
        client.batch_execute(&sql).await.expect("update");
        if let Ok(line) = tokio::time::timeout(Duration::from_millis(500), lines.next_line()).await
        {
            break line.expect("read").expect("a line");
        }
        assert!(attempt < 40, "tail printed nothing");
    };
    let change: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
    let title = change["row"]["title"].as_str().unwrap_or_default();
    assert!(
        title.starts_with("tailed"),
        "only the room's changes: {change}"
    );
    assert_eq!(change["op"], "UPDATE");
    assert!(change["id"].as_str().is_some_and(|id| id.contains('~')));
}
