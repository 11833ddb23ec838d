//! What a relay needs to run, independent of where it came from (flags, environment, tests).

use std::net::SocketAddr;
use std::time::Duration;

use crate::jwt::Verifier;

pub struct RelayConfig {
    pub database_url: String,
    pub bind: SocketAddr,
    pub verifier: Verifier,
    /// Read the outbox at least this often, notifications or not (a safety net for a lost wake-up).
    pub poll_interval: Duration,
    /// How often to run outbox retention (`pgrelay.maintain()`).
    pub maintenance_interval: Duration,
    pub pool_size: usize,
    /// How often every room membership is re-checked against its join policy.
    pub recheck_interval: Duration,
    pub limits: Limits,
    /// Browser origins allowed to connect (`Origin` header); empty = any.
    pub allowed_origins: Vec<String>,
    pub presence: crate::presence::PresenceTimings,
    /// Development mode only: serve the live board and its demo endpoints ([`crate::demo`]).
    pub demo: Option<crate::demo::Demo>,
    /// Longest a database statement of the relay may run (`statement_timeout` on its
    /// connections). A policy that runs longer for some row is denied for that row, and nothing
    /// else waits for it; see [`crate::authorize`].
    pub statement_timeout: Duration,
    pub replay: ReplayBudget,
}

/// What replays (resuming clients) may use, apart from everything else (see [`crate::resume`]).
#[derive(Clone, Debug)]
pub struct ReplayBudget {
    /// Database queries for replays at once, relay-wide (outbox reads and their authorization):
    /// the rest of the pool stays free for joins and live delivery.
    pub reads: usize,
    /// Replays served at once, relay-wide; more wait their turn, in arrival order.
    pub running: usize,
    /// Replays of one user served at once; more wait their turn, in arrival order.
    pub per_user: usize,
    /// Bytes of outbox pages kept in memory for replays to share.
    pub window_bytes: usize,
    /// A replay whose client takes nothing for this long is closed with 4008 (resumable).
    pub stall: Duration,
}

impl Default for ReplayBudget {
    fn default() -> ReplayBudget {
        ReplayBudget {
            reads: 2,
            running: 1024,
            per_user: 4,
            window_bytes: 64 * 1024 * 1024,
            stall: Duration::from_secs(10),
        }
    }
}

/// Per-connection limits.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Larger client messages close the connection with 1009.
    pub max_message_bytes: usize,
    /// More joins get `too_many_rooms`.
    pub max_rooms_per_connection: usize,
    /// A client with more than this waiting to be sent is closed with 4008.
    pub max_queued_bytes: usize,
    /// Time to send `auth` when the upgrade carried no token.
    pub auth_timeout: Duration,
    /// Client messages per second per connection, and the burst allowed above it.
    pub messages_per_second: u32,
    pub message_burst: u32,
    /// Join attempts per second per connection (each costs a policy query), and the burst.
    pub joins_per_second: u32,
    pub join_burst: u32,
    /// Open connections (WebSocket and SSE) per user.
    pub max_connections_per_user: usize,
    /// The relay pings every connection this often ...
    pub ping_interval: Duration,
    /// ... and closes one it has heard nothing from (not even a pong) for this long.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_message_bytes: 64 * 1024,
            max_rooms_per_connection: 100,
            max_queued_bytes: 1024 * 1024,
            auth_timeout: Duration::from_secs(10),
            messages_per_second: 20,
            message_burst: 40,
            joins_per_second: 10,
            join_burst: 20,
            max_connections_per_user: 20,
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl RelayConfig {
    /// Defaults for everything but the database and the key.
    pub fn new(database_url: String, verifier: Verifier) -> RelayConfig {
        RelayConfig {
            database_url,
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            verifier,
            poll_interval: Duration::from_secs(1),
            maintenance_interval: Duration::from_secs(10),
            pool_size: 16,
            recheck_interval: Duration::from_secs(30),
            limits: Limits::default(),
            allowed_origins: Vec::new(),
            presence: Default::default(),
            replay: ReplayBudget::default(),
            demo: None,
            statement_timeout: Duration::from_secs(5),
        }
    }
}

/// Parses a duration such as `250ms`, `90s`, `15m`, `1h` or `7d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?} (try 250ms, 30s, 15m, 1h, 7d)"))?;
    let millis = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "invalid duration unit in {text:?} (use ms, s, m, h or d)"
            ))
        }
    };
    Ok(Duration::from_millis(n.saturating_mul(millis)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("h").is_err());
    }
}
