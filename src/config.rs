//! What a relay needs to run ([`RelayConfig`]), and the settings an operator gives `pgrelay serve`
//! ([`Settings`]) that fill it in.
//!
//! Every limit and timeout an operator may need is a field of [`Settings`], with its flag, its
//! environment variable and its default in one `#[arg]` attribute, so that `pgrelay serve --help`
//! lists them all. Values are written as people write them: durations `500ms`, `10s`, `15m`, sizes
//! `64KiB`, `1MiB`. A value that does not parse, or that cannot work with the others, stops
//! startup with exit code 2 and a message naming the setting.
//!
//! **Adding a setting** is one change in this file and one in the docs:
//! 1. a field of [`Settings`]: doc comment (the help text), `#[arg(long, env = "PGRELAY_...",
//!    default_value = "...", value_parser = ...)]`, using the parsers below;
//! 2. a line in [`Settings::apply`] that writes it into [`RelayConfig`] (and, if it constrains
//!    another setting, a check there that returns [`SettingError`]);
//! 3. a row in `docs/configuration.md` (a test compares that table with `--help`).
//!
//! The defaults live in the `#[arg]` attributes; [`Limits::default`] and [`RelayConfig::new`]
//! (what tests and embedders start from) must agree with them, which a test checks.

use std::net::SocketAddr;
use std::time::Duration;

use crate::jwt::Verifier;

pub struct RelayConfig {
    pub database_url: String,
    pub bind: SocketAddr,
    pub verifier: Verifier,
    /// Read the outbox at least this often, notifications or not (a safety net for a lost wake-up).
    pub poll_interval: Duration,
    /// How often to run outbox retention (`pgrelay.maintain()`) and report status.
    pub maintenance_interval: Duration,
    pub pool_size: usize,
    /// How long a task waits for a pooled database connection, or for a new one to open.
    pub pool_timeout: Duration,
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
#[derive(Clone, Debug, PartialEq)]
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
    /// An SSE stream gets a comment line this often, so proxies do not close it as idle.
    pub sse_keepalive: Duration,
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
            sse_keepalive: Duration::from_secs(15),
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
            pool_timeout: Duration::from_secs(10),
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

/// The limits and timeouts of `pgrelay serve` (flattened into its arguments).
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Limits and timeouts")]
pub struct Settings {
    /// Database connections in the pool (policy queries, joins, replays, retention).
    #[arg(long, env = "PGRELAY_POOL_SIZE", default_value = "16", value_name = "N", value_parser = parse_count::<usize>)]
    pub pool_size: usize,
    /// How long a request waits for a pooled database connection, or for a new one to open.
    #[arg(long, env = "PGRELAY_POOL_TIMEOUT", default_value = "10s", value_name = "DURATION", value_parser = parse_interval)]
    pub pool_timeout: Duration,
    /// Read the outbox at least this often even without a notification.
    #[arg(long, env = "PGRELAY_POLL_INTERVAL", default_value = "1s", value_name = "DURATION", value_parser = parse_interval)]
    pub poll_interval: Duration,
    /// Longest any database statement of the relay may run (policies included): a read policy
    /// that takes longer for a row is denied for that row, a join policy fails that join.
    #[arg(long, env = "PGRELAY_STATEMENT_TIMEOUT", default_value = "5s", value_name = "DURATION", value_parser = parse_interval)]
    pub statement_timeout: Duration,
    /// How often every room membership is put to its join policy again (what the outbox cannot
    /// show: changes made with triggers disabled, a policy replaced without the event trigger).
    #[arg(long, env = "PGRELAY_RECHECK_INTERVAL", default_value = "30s", value_name = "DURATION", value_parser = parse_interval)]
    pub recheck_interval: Duration,
    /// How often to run outbox retention (pgrelay.maintain()) and report this relay's status.
    #[arg(long, env = "PGRELAY_MAINTENANCE_INTERVAL", default_value = "10s", value_name = "DURATION", value_parser = parse_interval)]
    pub maintenance_interval: Duration,
    /// A connection with more than this waiting to be sent is closed (4008) and resumes.
    #[arg(long, env = "PGRELAY_QUEUE_BUDGET", default_value = "1MiB", value_name = "SIZE", value_parser = parse_size)]
    pub queue_budget: usize,
    /// Largest client message; a larger one closes the connection (1009).
    #[arg(long, env = "PGRELAY_MAX_MESSAGE_SIZE", default_value = "64KiB", value_name = "SIZE", value_parser = parse_size)]
    pub max_message_size: usize,
    /// Rooms one connection may be in (more joins get `too_many_rooms`; SSE: rooms per stream).
    #[arg(long, env = "PGRELAY_MAX_ROOMS_PER_CONNECTION", default_value = "100", value_name = "N", value_parser = parse_count::<usize>)]
    pub max_rooms_per_connection: usize,
    /// Open connections (WebSocket and SSE together) per user.
    #[arg(long, env = "PGRELAY_MAX_CONNECTIONS_PER_USER", default_value = "20", value_name = "N", value_parser = parse_count::<usize>)]
    pub max_connections_per_user: usize,
    /// Client messages per second per connection (beyond it: `rate_limited`, then 4029).
    #[arg(long, env = "PGRELAY_MESSAGE_RATE", default_value = "20", value_name = "N", value_parser = parse_count::<u32>)]
    pub message_rate: u32,
    /// Messages a connection may send at once above the rate.
    #[arg(long, env = "PGRELAY_MESSAGE_BURST", default_value = "40", value_name = "N", value_parser = parse_count::<u32>)]
    pub message_burst: u32,
    /// Joins per second per connection, and SSE streams opened per second per user (each asks
    /// the join policy).
    #[arg(long, env = "PGRELAY_JOIN_RATE", default_value = "10", value_name = "N", value_parser = parse_count::<u32>)]
    pub join_rate: u32,
    /// Joins (or SSE opens) allowed at once above the rate.
    #[arg(long, env = "PGRELAY_JOIN_BURST", default_value = "20", value_name = "N", value_parser = parse_count::<u32>)]
    pub join_burst: u32,
    /// Time a WebSocket client has to send `auth` when the upgrade carried no token (then 4001).
    #[arg(long, env = "PGRELAY_AUTH_TIMEOUT", default_value = "10s", value_name = "DURATION", value_parser = parse_interval)]
    pub auth_timeout: Duration,
    /// The relay pings every WebSocket this often.
    #[arg(long, env = "PGRELAY_PING_INTERVAL", default_value = "25s", value_name = "DURATION", value_parser = parse_interval)]
    pub ping_interval: Duration,
    /// A WebSocket silent this long (not even a pong) is closed; longer than the ping interval.
    #[arg(long, env = "PGRELAY_IDLE_TIMEOUT", default_value = "60s", value_name = "DURATION", value_parser = parse_interval)]
    pub idle_timeout: Duration,
    /// An idle SSE stream gets a comment line this often, so proxies keep it open.
    #[arg(long, env = "PGRELAY_SSE_KEEPALIVE", default_value = "15s", value_name = "DURATION", value_parser = parse_interval)]
    pub sse_keepalive: Duration,
    /// How often this relay tells the others it is alive (presence); a relay silent for three
    /// intervals is dropped from presence everywhere.
    #[arg(long, env = "PGRELAY_PRESENCE_HEARTBEAT", default_value = "5s", value_name = "DURATION", value_parser = parse_interval)]
    pub presence_heartbeat: Duration,
    /// On SIGTERM/SIGINT: how long to keep serving open connections (with /readyz at 503 and new
    /// connections refused) before closing them with 1001. A second signal ends it early; 0s
    /// closes at once. (Read by `serve` itself, not part of [`RelayConfig`].)
    #[arg(long, env = "PGRELAY_DRAIN_GRACE", default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    pub drain_grace: Duration,
    /// A typing indicator not refreshed for this long ends by itself.
    #[arg(long, env = "PGRELAY_TYPING_TIMEOUT", default_value = "5s", value_name = "DURATION", value_parser = parse_interval)]
    pub typing_timeout: Duration,
    /// A `presence_state` lists a room's connections up to this many bytes, then says
    /// `"truncated": true`.
    #[arg(long, env = "PGRELAY_PRESENCE_MAX_STATE_BYTES", default_value = "64KiB", value_name = "SIZE", value_parser = parse_size)]
    pub presence_max_state_bytes: usize,
    /// Connections of other relays held in this relay's presence view (all rooms).
    #[arg(long, env = "PGRELAY_PRESENCE_MAX_REMOTE_ENTRIES", default_value = "200000", value_name = "N", value_parser = parse_count::<usize>)]
    pub presence_max_remote_entries: usize,
    /// This relay sends its full presence state to the others at most this often.
    #[arg(long, env = "PGRELAY_PRESENCE_RESYNC_INTERVAL", default_value = "1s", value_name = "DURATION", value_parser = parse_interval)]
    pub presence_resync_interval: Duration,
    /// Largest presence `meta` a connection may set, as JSON (at most 4KiB: every presence
    /// change must fit one NOTIFY).
    #[arg(long, env = "PGRELAY_MAX_PRESENCE_META", default_value = "1KiB", value_name = "SIZE", value_parser = parse_size)]
    pub max_presence_meta: usize,
    /// Database queries replays may run at once (outbox reads and their authorization); the rest
    /// of the pool is kept for joins and live delivery.
    #[arg(long, env = "PGRELAY_REPLAY_READS", default_value = "2", value_name = "N", value_parser = parse_count::<usize>)]
    pub replay_reads: usize,
    /// Replays served at once; more wait their turn in arrival order.
    #[arg(long, env = "PGRELAY_REPLAYS", default_value = "1024", value_name = "N", value_parser = parse_count::<usize>)]
    pub replays: usize,
    /// Replays of one user served at once; more wait their turn in arrival order.
    #[arg(long, env = "PGRELAY_REPLAYS_PER_USER", default_value = "4", value_name = "N", value_parser = parse_count::<usize>)]
    pub replays_per_user: usize,
    /// Memory for outbox pages kept for replays to share.
    #[arg(long, env = "PGRELAY_REPLAY_WINDOW", default_value = "64MiB", value_name = "SIZE", value_parser = parse_size)]
    pub replay_window: usize,
    /// A replay whose client takes nothing for this long is closed with 4008 (resumable).
    #[arg(long, env = "PGRELAY_REPLAY_STALL", default_value = "10s", value_name = "DURATION", value_parser = parse_interval)]
    pub replay_stall: Duration,
}

/// A setting that parsed but cannot work, with the flag and variable that set it.
#[derive(Debug, thiserror::Error)]
#[error("{flag} ({env}): {problem}")]
pub struct SettingError {
    pub flag: &'static str,
    pub env: &'static str,
    pub problem: String,
}

/// The bus's NOTIFY payload limit leaves this much for a meta (the envelope takes the rest).
const MAX_PRESENCE_META: usize = 4096;
/// A client's `auth` message carries its token: smaller limits would lock clients out.
const MIN_MESSAGE_SIZE: usize = 1024;

impl Settings {
    /// Checks the settings against each other (before anything starts).
    pub fn check(&self) -> Result<(), SettingError> {
        let refuse = |flag, env, problem: String| SettingError { flag, env, problem };
        if self.idle_timeout <= self.ping_interval {
            return Err(refuse(
                "--idle-timeout",
                "PGRELAY_IDLE_TIMEOUT",
                format!(
                    "must be longer than the ping interval ({:?}), or every quiet client is closed",
                    self.ping_interval
                ),
            ));
        }
        if self.max_presence_meta > MAX_PRESENCE_META {
            return Err(refuse(
                "--max-presence-meta",
                "PGRELAY_MAX_PRESENCE_META",
                format!(
                    "at most {MAX_PRESENCE_META} bytes (a presence change must fit one NOTIFY)"
                ),
            ));
        }
        if self.max_message_size < MIN_MESSAGE_SIZE {
            return Err(refuse(
                "--max-message-size",
                "PGRELAY_MAX_MESSAGE_SIZE",
                format!("at least {MIN_MESSAGE_SIZE} bytes (an `auth` message carries a token)"),
            ));
        }
        Ok(())
    }

    /// Checks the settings and writes them into `config`.
    pub fn apply(self, config: &mut RelayConfig) -> Result<(), SettingError> {
        self.check()?;
        config.pool_size = self.pool_size;
        config.pool_timeout = self.pool_timeout;
        config.poll_interval = self.poll_interval;
        config.maintenance_interval = self.maintenance_interval;
        config.statement_timeout = self.statement_timeout;
        config.recheck_interval = self.recheck_interval;
        let limits = &mut config.limits;
        limits.max_queued_bytes = self.queue_budget;
        limits.max_message_bytes = self.max_message_size;
        limits.max_rooms_per_connection = self.max_rooms_per_connection;
        limits.max_connections_per_user = self.max_connections_per_user;
        limits.messages_per_second = self.message_rate;
        limits.message_burst = self.message_burst;
        limits.joins_per_second = self.join_rate;
        limits.join_burst = self.join_burst;
        limits.auth_timeout = self.auth_timeout;
        limits.ping_interval = self.ping_interval;
        limits.idle_timeout = self.idle_timeout;
        limits.sse_keepalive = self.sse_keepalive;
        let presence = &mut config.presence;
        presence.heartbeat = self.presence_heartbeat;
        presence.relay_timeout = 3 * self.presence_heartbeat;
        presence.typing_timeout = self.typing_timeout;
        presence.max_meta_bytes = self.max_presence_meta;
        presence.max_state_bytes = self.presence_max_state_bytes;
        presence.max_remote_entries = self.presence_max_remote_entries;
        presence.resync_interval = self.presence_resync_interval;
        config.replay = ReplayBudget {
            reads: self.replay_reads,
            running: self.replays,
            per_user: self.replays_per_user,
            window_bytes: self.replay_window,
            stall: self.replay_stall,
        };
        Ok(())
    }
}

/// A count of at least 1 (`0` would disable what it limits, or lock everyone out).
pub fn parse_count<T: std::str::FromStr + PartialOrd + From<u8>>(text: &str) -> Result<T, String> {
    match text.trim().parse::<T>() {
        Ok(n) if n >= T::from(1) => Ok(n),
        Ok(_) => Err("must be at least 1".into()),
        Err(_) => Err(format!("{text:?} is not a whole number")),
    }
}

/// A duration that is not zero: an interval of zero would spin, a timeout of zero refuse all.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        Duration::ZERO => Err("must be longer than 0".into()),
        duration => Ok(duration),
    }
}

/// Parses a size such as `512`, `512B`, `64KiB`, `1MiB` or `1GiB` (`KB`, `MB` and `GB` are
/// powers of 1000); a bare number is bytes. Zero is refused: nothing would fit.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let (n, unit) = number_and_unit(text.trim(), "size", "512KiB, 1MiB")?;
    let unit_bytes: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => {
            return Err(format!(
                "invalid size unit in {text:?} (use B, KiB, MiB or GiB)"
            ))
        }
    };
    match n.checked_mul(unit_bytes).map(usize::try_from) {
        Some(Ok(0)) => Err("must be more than 0 bytes".into()),
        Some(Ok(bytes)) => Ok(bytes),
        _ => Err(format!("size {text:?} is too large")),
    }
}

/// `64KiB` → `(64, "KiB")`; what and examples say what was expected if there is no number.
fn number_and_unit<'a>(
    text: &'a str,
    what: &str,
    examples: &str,
) -> Result<(u64, &'a str), String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n = number
        .parse()
        .map_err(|_| format!("invalid {what} {text:?} (try {examples})"))?;
    Ok((n, unit))
}

/// Parses a duration such as `250ms`, `90s`, `15m`, `1h` or `7d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (n, unit) = number_and_unit(text, "duration", "250ms, 30s, 15m, 1h, 7d")?;
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

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1 parsec").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999GiB").is_err());
        assert_eq!(parse_count::<u32>("3"), Ok(3));
        assert!(parse_count::<u32>("0").is_err());
        assert!(parse_interval("0s").is_err());
    }

    #[derive(clap::Parser)]
    struct Serve {
        #[command(flatten)]
        settings: Settings,
    }

    fn settings(args: &[&str]) -> Settings {
        use clap::Parser;
        let args = std::iter::once("serve").chain(args.iter().copied());
        Serve::try_parse_from(args).expect("parses").settings
    }

    fn config() -> RelayConfig {
        RelayConfig::new(String::new(), Verifier::from_secret(b"x"))
    }

    #[test]
    fn the_defaults_of_the_flags_are_the_defaults_of_the_code() {
        let mut applied = config();
        settings(&[])
            .apply(&mut applied)
            .expect("defaults are valid");
        let coded = config();
        assert_eq!(applied.limits, coded.limits);
        assert_eq!(applied.presence, coded.presence);
        assert_eq!(applied.pool_size, coded.pool_size);
        assert_eq!(applied.pool_timeout, coded.pool_timeout);
        assert_eq!(applied.poll_interval, coded.poll_interval);
        assert_eq!(applied.maintenance_interval, coded.maintenance_interval);
        assert_eq!(applied.statement_timeout, coded.statement_timeout);
        assert_eq!(applied.recheck_interval, coded.recheck_interval);
    }

    #[test]
    fn settings_reach_the_config_and_impossible_ones_are_named() {
        let mut config = config();
        settings(&[
            "--queue-budget",
            "256KiB",
            "--join-rate",
            "3",
            "--typing-timeout",
            "2s",
        ])
        .apply(&mut config)
        .expect("valid");
        assert_eq!(config.limits.max_queued_bytes, 256 * 1024);
        assert_eq!(config.limits.joins_per_second, 3);
        assert_eq!(config.presence.typing_timeout, Duration::from_secs(2));

        let err = settings(&["--ping-interval", "30s", "--idle-timeout", "30s"])
            .apply(&mut config)
            .expect_err("idle timeout must exceed the ping interval");
        assert!(err.to_string().contains("PGRELAY_IDLE_TIMEOUT"), "{err}");
        let err = settings(&["--max-presence-meta", "8KiB"])
            .apply(&mut config)
            .expect_err("must fit a NOTIFY");
        assert!(err.to_string().contains("--max-presence-meta"), "{err}");
    }
}
