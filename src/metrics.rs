//! The counters an operator watches, exported at `GET /metrics` in Prometheus' text format.
//!
//! A handful of atomics is all the relay needs; they are bumped on hot paths with relaxed ordering
//! and read only when scraped.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonically increasing count.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Time spent, summed: exported in seconds, kept in nanoseconds.
#[derive(Default)]
pub struct Seconds(AtomicU64);

impl Seconds {
    pub fn add(&self, spent: std::time::Duration) {
        self.0.fetch_add(
            spent.as_nanos().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }
    pub fn get(&self) -> f64 {
        self.0.load(Ordering::Relaxed) as f64 / 1e9
    }
}

/// A value that goes up and down.
#[derive(Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct Metrics {
    pub connections: Gauge,
    pub listener_connected: Gauge,
    pub listener_reconnects: Counter,
    pub notifications: Counter,
    pub reader_healthy: Gauge,
    pub changes_read: Counter,
    pub outbox_read_time: Seconds,
    pub fanout_time: Seconds,
    pub batches_read: Counter,
    pub reader_sleeps: Counter,
    pub reader_sleep_announcements: Counter,
    pub reader_wakeups: Counter,
    pub back_to_back_reads: Counter,
    pub poll_reads_with_changes: Counter,
    pub reader_sleep_failures: Counter,
    pub read_errors: Counter,
    pub events_delivered: Counter,
    pub deliveries_denied: Counter,
    pub policy_answers_remembered: Counter,
    pub policy_answers_asked: Counter,
    pub policy_invalidations: Counter,
    pub joins: Counter,
    pub joins_forbidden: Counter,
    pub auth_failures: Counter,
    pub slow_consumer_disconnects: Counter,
    pub client_errors: Counter,
    pub replay_failures: Counter,
    pub replay_pages_read: Counter,
    pub replay_pages_shared: Counter,
    pub replay_changes_read: Counter,
    pub replays_running: Gauge,
    pub replays_waiting: Gauge,
    pub replay_stalls: Counter,
    pub revocations: Counter,
    pub access_rechecks: Counter,
    pub access_recheck_time: Seconds,
    pub retention_gaps: Counter,
    pub presence_bus_connected: Gauge,
    pub presence_relays: Gauge,
    pub presence_connections: Gauge,
    pub presence_resyncs: Counter,
}

impl Metrics {
    /// Renders every metric in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP pgrelay_{name} {help}\n# TYPE pgrelay_{name} {kind}\npgrelay_{name} {value}"
            );
        };
        metric(
            "connections",
            "gauge",
            "Open client connections.",
            self.connections.get(),
        );
        metric(
            "listener_connected",
            "gauge",
            "1 while the LISTEN connection is up.",
            self.listener_connected.get(),
        );
        metric(
            "notifications_total",
            "counter",
            "NOTIFY wake-ups received from writers (they notify only while a relay sleeps).",
            self.notifications.get(),
        );
        metric(
            "listener_reconnects_total",
            "counter",
            "Times the LISTEN connection was lost and reopened.",
            self.listener_reconnects.get(),
        );
        metric(
            "reader_healthy",
            "gauge",
            "1 while the last outbox read succeeded.",
            self.reader_healthy.get(),
        );
        metric(
            "changes_read_total",
            "counter",
            "Changes read from the outbox.",
            self.changes_read.get(),
        );
        let mut seconds = |name: &str, help: &str, value: f64| {
            let _ = writeln!(
                out,
                "# HELP pgrelay_{name} {help}\n# TYPE pgrelay_{name} counter\npgrelay_{name} {value:.6}"
            );
        };
        seconds(
            "outbox_read_seconds_total",
            "Time the reader spent waiting for outbox reads (query and rows).",
            self.outbox_read_time.get(),
        );
        seconds(
            "fanout_seconds_total",
            "Time the reader spent authorizing and queuing changes; with outbox_read_seconds_total, how busy the reader is.",
            self.fanout_time.get(),
        );
        seconds(
            "access_recheck_seconds_total",
            "Part of fanout_seconds_total spent asking join policies again after denied changes.",
            self.access_recheck_time.get(),
        );
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP pgrelay_{name} {help}\n# TYPE pgrelay_{name} {kind}\npgrelay_{name} {value}"
            );
        };
        metric(
            "batches_read_total",
            "counter",
            "Outbox batches read.",
            self.batches_read.get(),
        );
        metric(
            "reader_sleeps_total",
            "counter",
            "Times the reader found nothing new and slept until a NOTIFY (writers notify only then).",
            self.reader_sleeps.get(),
        );
        metric(
            "reader_sleep_announcements_total",
            "counter",
            "Times the reader announced it was going to sleep (writers notify from then until it reads again).",
            self.reader_sleep_announcements.get(),
        );
        metric(
            "reader_wakeups_total",
            "counter",
            "Times a NOTIFY (or a join that needed a fresher read) woke the sleeping reader.",
            self.reader_wakeups.get(),
        );
        metric(
            "back_to_back_reads_total",
            "counter",
            "Reads made right after a read that found changes, without waiting for a wake-up.",
            self.back_to_back_reads.get(),
        );
        metric(
            "poll_reads_with_changes_total",
            "counter",
            "Reads made because the poll interval passed that found changes: wake-ups should have announced them (rare races aside, growth means lost wake-ups).",
            self.poll_reads_with_changes.get(),
        );
        metric(
            "reader_sleep_failures_total",
            "counter",
            "Times the reader could not announce its sleep or wait for non-notifying writers (it then polls every 100 ms).",
            self.reader_sleep_failures.get(),
        );
        metric(
            "read_errors_total",
            "counter",
            "Failed outbox reads (retried).",
            self.read_errors.get(),
        );
        metric(
            "events_delivered_total",
            "counter",
            "Event frames queued to clients.",
            self.events_delivered.get(),
        );
        metric(
            "policy_answers_remembered_total",
            "counter",
            "(change, user) read-policy answers taken from the relay's memory.",
            self.policy_answers_remembered.get(),
        );
        metric(
            "policy_answers_asked_total",
            "counter",
            "(change, user) read-policy answers asked of the database.",
            self.policy_answers_asked.get(),
        );
        metric(
            "policy_invalidations_total",
            "counter",
            "Times a change made a table's remembered policy answers stale.",
            self.policy_invalidations.get(),
        );
        metric(
            "deliveries_denied_total",
            "counter",
            "Room members a change was withheld from by the read policy.",
            self.deliveries_denied.get(),
        );
        metric(
            "joins_total",
            "counter",
            "Successful joins.",
            self.joins.get(),
        );
        metric(
            "joins_forbidden_total",
            "counter",
            "Joins refused by the join policy.",
            self.joins_forbidden.get(),
        );
        metric(
            "auth_failures_total",
            "counter",
            "Rejected tokens.",
            self.auth_failures.get(),
        );
        metric(
            "slow_consumer_disconnects_total",
            "counter",
            "Connections closed with 4008 because their send queue overflowed.",
            self.slow_consumer_disconnects.get(),
        );
        metric(
            "client_errors_total",
            "counter",
            "Error replies sent to clients.",
            self.client_errors.get(),
        );
        metric(
            "retention_gaps_total",
            "counter",
            "Times the relay found the outbox's retention had removed changes it had not read yet.",
            self.retention_gaps.get(),
        );
        metric(
            "access_rechecks_total",
            "counter",
            "Room memberships whose join policy was asked again after a denied change.",
            self.access_rechecks.get(),
        );
        metric(
            "revocations_total",
            "counter",
            "Members removed from a room because they lost access (left, reason revoked).",
            self.revocations.get(),
        );
        metric(
            "replay_failures_total",
            "counter",
            "Resumes whose replay failed (the client was told to resume again).",
            self.replay_failures.get(),
        );
        metric(
            "replay_pages_read_total",
            "counter",
            "Pages of outbox ranges read from the database for replays.",
            self.replay_pages_read.get(),
        );
        metric(
            "replay_pages_shared_total",
            "counter",
            "Replay pages served from memory or from a read another replay started.",
            self.replay_pages_shared.get(),
        );
        metric(
            "replay_changes_read_total",
            "counter",
            "Changes read from the database for replays.",
            self.replay_changes_read.get(),
        );
        metric(
            "replays_running",
            "gauge",
            "Replays being served now.",
            self.replays_running.get(),
        );
        metric(
            "replays_waiting",
            "gauge",
            "Replays waiting for their user's or the relay's replay budget.",
            self.replays_waiting.get(),
        );
        metric(
            "replay_stalls_total",
            "counter",
            "Replays whose client stopped reading: closed with 4008 (resumable).",
            self.replay_stalls.get(),
        );
        metric(
            "presence_bus_connected",
            "gauge",
            "1 while the presence bus (LISTEN pgrelay_presence) is connected.",
            self.presence_bus_connected.get(),
        );
        metric(
            "presence_relays",
            "gauge",
            "Other relays heard from on the presence bus within the timeout.",
            self.presence_relays.get(),
        );
        metric(
            "presence_connections",
            "gauge",
            "Connections in the presence view, on all relays, counted once per room.",
            self.presence_connections.get(),
        );
        metric(
            "presence_resyncs_total",
            "counter",
            "Full presence states requested from another relay after missing its messages.",
            self.presence_resyncs.get(),
        );
        out
    }
}
