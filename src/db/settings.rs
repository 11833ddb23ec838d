//! The session settings each of the relay's database connections starts with.
//!
//! Every statement the relay sends has a time limit, so that no policy, lock or stuck query can
//! hold a connection (and whoever waits for it) forever. The limit depends on what the
//! connection is for:
//!
//! - pool connections (policies, join checks, status, retention): the configured statement
//!   timeout (`PGRELAY_STATEMENT_TIMEOUT`, 5 s by default);
//! - outbox reads (the reader's batches, replays): [`OUTBOX_READ_TIMEOUT`]. A read streams its
//!   rows while the relay delivers them, and Postgres counts that time against the statement;
//! - the sleep barrier: none. It waits, on purpose, for the writing transactions that did not
//!   notify (see [`crate::capture::wakeup`]), however long they take; the reader serves wake-ups
//!   meanwhile. Set to 0 explicitly so that a role's or database's default cannot break it.
//!
//! Settings go in the startup packet (`options=-c ...`), so they cost no round trip and hold
//! for the connection's whole life, whatever else it is used for.

use std::time::Duration;

use super::Database;

/// How long one outbox read may stream. A batch that takes longer to deliver is read again from
/// where its delivery got to (see [`crate::capture::reader`]), so this bounds a read without
/// losing anything.
pub const OUTBOX_READ_TIMEOUT: Duration = Duration::from_secs(600);

/// `db` with `name = value` set for the whole session (appended to its `options`).
pub fn with_setting(db: &Database, name: &str, value: &str) -> Database {
    db.with_config(|config| {
        let options = config.get_options().unwrap_or_default().to_owned();
        config.options(format!("{options} -c {name}={value}").trim_start());
    })
}

/// `db` whose statements are cancelled after `timeout` (0: never).
pub fn with_statement_timeout(db: &Database, timeout: Duration) -> Database {
    with_setting(db, "statement_timeout", &timeout.as_millis().to_string())
}
