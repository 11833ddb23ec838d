//! The counters an operator watches, exported at `GET /metrics` in Prometheus' text format.
//!
//! A handful of atomics is all the relay needs; they are bumped on hot paths with relaxed ordering
//! and read only when scraped. Each metric is declared once, in the [`metrics!`] table at the end:
//! its field, its kind and its help text; the exported name follows from the field's.

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

    fn render(&self, out: &mut String, field: &str, help: &str) {
        write_metric(out, &format!("{field}_total"), "counter", help, self.get());
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

    fn render(&self, out: &mut String, field: &str, help: &str) {
        let value = format!("{:.6}", self.get());
        write_metric(out, &format!("{field}_total"), "counter", help, value);
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

    fn render(&self, out: &mut String, field: &str, help: &str) {
        write_metric(out, field, "gauge", help, self.get());
    }
}

fn write_metric(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    value: impl std::fmt::Display,
) {
    let _ = writeln!(
        out,
        "# HELP pgrelay_{name} {help}\n# TYPE pgrelay_{name} {kind}\npgrelay_{name} {value}"
    );
}

/// Declares [`Metrics`] from one line per metric: its field, its kind and, as its doc comment,
/// the help text. The exported name is `pgrelay_` and the field's name, with `_total` after
/// counters (and after the seconds sums, whose fields end in `_seconds`), as Prometheus names them.
macro_rules! metrics {
    ($($(#[doc = $help:literal])+ $field:ident: $kind:ident,)+) => {
        #[derive(Default)]
        pub struct Metrics {
            $($(#[doc = $help])+ pub $field: $kind,)+
        }

        impl Metrics {
            /// Renders every metric in the Prometheus text exposition format.
            pub fn render(&self) -> String {
                let mut out = String::new();
                $(
                    let help = [$($help.trim()),+].join(" ");
                    self.$field.render(&mut out, stringify!($field), &help);
                )+
                out
            }
        }
    };
}

metrics! {
    /// Open client connections.
    connections: Gauge,
    /// 1 while the LISTEN connection is up.
    listener_connected: Gauge,
    /// Times the LISTEN connection was lost and reopened.
    listener_reconnects: Counter,
    /// NOTIFY wake-ups received from writers (they notify only while a relay sleeps).
    notifications: Counter,
    /// 1 while the last outbox read succeeded.
    reader_healthy: Gauge,
    /// Changes read from the outbox.
    changes_read: Counter,
    /// Time the reader spent waiting for outbox reads (query and rows).
    outbox_read_seconds: Seconds,
    /// Time the reader spent authorizing and queuing changes; with outbox_read_seconds_total, how
    /// busy the reader is.
    fanout_seconds: Seconds,
    /// Outbox batches read.
    batches_read: Counter,
    /// Times the reader found nothing new and slept until a NOTIFY (writers notify only then).
    reader_sleeps: Counter,
    /// Times the reader announced it was going to sleep (writers notify from then until it reads
    /// again).
    reader_sleep_announcements: Counter,
    /// Times a NOTIFY (or a join that needed a fresher read) woke the sleeping reader.
    reader_wakeups: Counter,
    /// Reads made right after a read that found changes, without waiting for a wake-up.
    back_to_back_reads: Counter,
    /// Reads made because the poll interval passed that found changes: wake-ups should have
    /// announced them (rare races aside, growth means lost wake-ups).
    poll_reads_with_changes: Counter,
    /// Times the reader could not announce its sleep or wait for non-notifying writers (it then
    /// polls every 100 ms).
    reader_sleep_failures: Counter,
    /// Failed outbox reads (retried).
    read_errors: Counter,
    /// Event frames queued to clients.
    events_delivered: Counter,
    /// Room members a change was withheld from by the read policy.
    deliveries_denied: Counter,
    /// (change, user) read-policy answers taken from the relay's memory.
    policy_answers_remembered: Counter,
    /// (change, user) read-policy answers asked of the database.
    policy_answers_asked: Counter,
    /// Times a change made a table's remembered policy answers stale.
    policy_invalidations: Counter,
    /// (change, user) pairs denied because the read policy failed for them (an error or the
    /// statement timeout); the relay logs each with table, op, change and user.
    policy_errors: Counter,
    /// Successful joins.
    joins: Counter,
    /// Joins refused by the join policy.
    joins_forbidden: Counter,
    /// Rejected tokens.
    auth_failures: Counter,
    /// Connections closed with 4008 because their send queue overflowed.
    slow_consumer_disconnects: Counter,
    /// Error replies sent to clients.
    client_errors: Counter,
    /// Resumes whose replay failed (the client was told to resume again).
    replay_failures: Counter,
    /// Pages of outbox ranges read from the database for replays.
    replay_pages_read: Counter,
    /// Replay pages served from memory or from a read another replay started.
    replay_pages_shared: Counter,
    /// Changes read from the database for replays.
    replay_changes_read: Counter,
    /// Replays being served now.
    replays_running: Gauge,
    /// Replays waiting for their user's or the relay's replay budget.
    replays_waiting: Gauge,
    /// Replays whose client stopped reading: closed with 4008 (resumable).
    replay_stalls: Counter,
    /// Members removed from a room because they lost access (left, reason revoked).
    revocations: Counter,
    /// Room memberships whose join policy was asked again after a denied change.
    access_rechecks: Counter,
    /// Part of fanout_seconds_total spent asking join policies again after denied changes.
    access_recheck_seconds: Seconds,
    /// Times the relay found the outbox's retention had removed changes it had not read yet.
    retention_gaps: Counter,
    /// 1 while the presence bus (LISTEN pgrelay_presence) is connected.
    presence_bus_connected: Gauge,
    /// Other relays heard from on the presence bus within the timeout.
    presence_relays: Gauge,
    /// Connections in the presence view, on all relays, counted once per room.
    presence_connections: Gauge,
    /// Full presence states requested from another relay after missing its messages.
    presence_resyncs: Counter,
    /// Presence bus messages ignored because no relay of this database signed them.
    presence_bus_rejected: Counter,
    /// Connections of other relays not shown in presence, so far, because the view held
    /// PGRELAY_PRESENCE_MAX_REMOTE_ENTRIES.
    presence_entries_dropped: Gauge,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported_under_its_prometheus_name() {
        let metrics = Metrics::default();
        metrics
            .fanout_seconds
            .add(std::time::Duration::from_millis(1500));
        metrics.joins.add(3);
        let text = metrics.render();
        for name in [
            "connections",
            "listener_connected",
            "notifications_total",
            "listener_reconnects_total",
            "reader_healthy",
            "changes_read_total",
            "outbox_read_seconds_total",
            "fanout_seconds_total",
            "access_recheck_seconds_total",
            "batches_read_total",
            "reader_sleeps_total",
            "reader_sleep_announcements_total",
            "reader_wakeups_total",
            "back_to_back_reads_total",
            "poll_reads_with_changes_total",
            "reader_sleep_failures_total",
            "read_errors_total",
            "events_delivered_total",
            "policy_answers_remembered_total",
            "policy_answers_asked_total",
            "policy_invalidations_total",
            "policy_errors_total",
            "deliveries_denied_total",
            "joins_total",
            "joins_forbidden_total",
            "auth_failures_total",
            "slow_consumer_disconnects_total",
            "client_errors_total",
            "retention_gaps_total",
            "access_rechecks_total",
            "revocations_total",
            "replay_failures_total",
            "replay_pages_read_total",
            "replay_pages_shared_total",
            "replay_changes_read_total",
            "replays_running",
            "replays_waiting",
            "replay_stalls_total",
            "presence_bus_connected",
            "presence_relays",
            "presence_connections",
            "presence_resyncs_total",
            "presence_bus_rejected_total",
            "presence_entries_dropped",
        ] {
            let name = format!("pgrelay_{name}");
            assert!(text.contains(&format!("\n{name} ")), "{name} is exported");
            assert!(text.contains(&format!("# HELP {name} ")), "{name} has help");
        }
        assert!(text.contains("pgrelay_fanout_seconds_total 1.500000\n"));
        assert!(text.contains("# TYPE pgrelay_joins_total counter\npgrelay_joins_total 3\n"));
        assert!(text.contains("# TYPE pgrelay_connections gauge\n"));
        assert_eq!(text.matches("# TYPE").count(), 44, "one each");
    }
}
