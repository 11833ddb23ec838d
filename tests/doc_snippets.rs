//! The SQL snippets of README.md and docs/*.md run as written.
//!
//! Every block fenced ```` ```sql ```` in those files is pasted into `psql` (with
//! `ON_ERROR_STOP`, as a DBA would paste it) against a throwaway database with the trigger
//! library, the example schema and the demo data installed. The blocks of one file run in the
//! order they appear, in one database of their own, so a block may build on the ones before it,
//! as a reader following the page does. A failure names the file and line psql stopped at (the
//! end of the failing statement), with psql's message.
//!
//! Blocks that are not meant to run (query output, sketches of a message, psql sessions with
//! their results) are fenced ```` ```text ```` (or `json`, `sh`) instead: only `sql` blocks are
//! promised to run.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::sql_snippets;
use tokio::io::AsyncWriteExt;

fn documents() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    docs.insert(0, root.join("README.md"));
    docs
}

/// Runs `sql` in psql; on failure, the line (within `sql`, from 1) psql names, and its output.
async fn psql(url: &str, sql: &str) -> Result<(), (Option<usize>, String)> {
    let mut child = tokio::process::Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql (from the PostgreSQL client binaries) must be on the PATH");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(sql.as_bytes()).await.expect("write");
    drop(stdin);
    let output = child.wait_with_output().await.expect("psql");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.success() {
        return Ok(());
    }
    // psql:<stdin>:3: ERROR:  ...
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("psql:<stdin>:"))
        .and_then(|rest| rest.split(':').next())
        .and_then(|n| n.parse().ok());
    Err((line, stderr))
}

#[test]
fn the_snippet_parser_finds_sql_blocks_only() {
    let markdown = "text\n```sql\nSELECT 1;\n```\n```text\nnot sql\n```\n  ```sql\n  SELECT 2;\n  SELECT 3;\n  ```\n";
    let found = sql_snippets(markdown);
    assert_eq!(
        found
            .iter()
            .map(|s| (s.line, s.sql.as_str()))
            .collect::<Vec<_>>(),
        vec![(3, "SELECT 1;\n"), (9, "  SELECT 2;\n  SELECT 3;\n")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sql_snippet_of_the_readme_and_the_docs_runs_as_written() {
    let mut failures = Vec::new();
    let mut count = 0;
    for path in documents() {
        let text = std::fs::read_to_string(&path).expect("read");
        let snippets = sql_snippets(&text);
        if snippets.is_empty() {
            continue;
        }
        let shown = path
            .strip_prefix(env!("CARGO_MANIFEST_DIR"))
            .unwrap_or(&path)
            .display()
            .to_string();
        let db = common::fresh_database().await;
        for snippet in snippets {
            count += 1;
            if let Err((line, message)) = psql(&db, &snippet.sql).await {
                let at = snippet.line + line.map_or(0, |l| l.saturating_sub(1));
                failures.push(format!("{shown}:{at}: {}", message.trim()));
            }
        }
    }
    // README.md's "Capturing your own tables" and the docs' watch/allow_join/maintenance examples.
    assert!(count >= 8, "only {count} sql snippets found");
    assert!(
        failures.is_empty(),
        "{} of {count} sql snippets fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
