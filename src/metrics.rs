//! The counters an operator watches, exported at `GET /metrics` in Prometheus' text format.
//!
//! A handful of atomics is all the relay needs; they are bumped on hot paths with relaxed ordering
//! and read only when scraped. Each metric is declared once, in the [`metrics!`] table at the end:
//! its field, its kind and its help text; the exported name follows from the field's.
//!
//! The kinds: [`Counter`], [`Gauge`], [`FloatGauge`], [`Seconds`] (time summed), [`Histogram`]
//! (time distributed over fixed buckets, lock-free), [`Family`] (a counter per label set, for
//! rare events such as closes and errors: a mutex there costs nothing) and [`BuildInfo`].

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

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

/// A value that goes up and down and need not be whole (seconds of lag, say).
#[derive(Default)]
pub struct FloatGauge(AtomicU64);

impl FloatGauge {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }

    fn render(&self, out: &mut String, field: &str, help: &str) {
        write_metric(out, field, "gauge", help, self.get());
    }
}

/// Upper bounds of the histograms' buckets, in seconds: from a millisecond (a policy query on a
/// warm cache) to 30 s (a long replay), roughly ×2.5 apart.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How long something took, counted in fixed buckets (exported as Prometheus' `_bucket`, `_sum`
/// and `_count`). An observation is three relaxed atomic adds: cheap enough per event frame.
#[derive(Default)]
pub struct Histogram {
    /// Observations per bucket, not cumulative; the last one is `+Inf`.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = took.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, field: &str, help: &str) {
        let _ = writeln!(
            out,
            "# HELP pgrelay_{field} {help}\n# TYPE pgrelay_{field} histogram"
        );
        let mut cumulative = 0;
        let bounds = BUCKETS.iter().map(|b| b.to_string());
        for (bound, count) in bounds
            .chain(std::iter::once("+Inf".to_owned()))
            .zip(&self.buckets)
        {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "pgrelay_{field}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        // The count last: a scrape racing an observation then never shows a count above +Inf's.
        let _ = writeln!(
            out,
            "pgrelay_{field}_sum {sum:.6}\npgrelay_{field}_count {}",
            self.count().min(cumulative)
        );
    }
}

/// A counter per set of label values, such as `{transport="ws",code="4008"}`. The label names
/// are the family's; values come from the relay's own closed sets (codes, transports), so there
/// are few of them.
pub struct Family<const N: usize> {
    labels: [&'static str; N],
    counts: Mutex<BTreeMap<[String; N], u64>>,
}

impl<const N: usize> Family<N> {
    pub fn new(labels: [&'static str; N]) -> Family<N> {
        Family {
            labels,
            counts: Mutex::default(),
        }
    }

    pub fn inc(&self, values: [&str; N]) {
        let key = values.map(str::to_owned);
        *self.lock().entry(key).or_default() += 1;
    }

    pub fn get(&self, values: [&str; N]) -> u64 {
        let key = values.map(str::to_owned);
        self.lock().get(&key).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<[String; N], u64>> {
        // A count cannot be left half-updated: keep going after a panic.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn render(&self, out: &mut String, field: &str, help: &str) {
        let name = format!("pgrelay_{field}_total");
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (values, count) in self.lock().iter() {
            let labels: Vec<String> = self
                .labels
                .iter()
                .zip(values)
                .map(|(label, value)| format!("{label}=\"{}\"", escape(value)))
                .collect();
            let _ = writeln!(out, "{name}{{{}}} {count}", labels.join(","));
        }
    }
}

/// A label value as the text format wants it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `pgrelay_build_info{version="..."} 1`: which build is running, for dashboards and alerts.
#[derive(Default)]
pub struct BuildInfo;

impl BuildInfo {
    fn render(&self, out: &mut String, field: &str, help: &str) {
        let version = env!("CARGO_PKG_VERSION");
        let _ = writeln!(
            out,
            "# HELP pgrelay_{field} {help}\n# TYPE pgrelay_{field} gauge\npgrelay_{field}{{version=\"{version}\"}} 1"
        );
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
/// the help text; a kind without a `Default` (a [`Family`], which names its labels) follows with
/// `= its constructor`. The exported name is `pgrelay_` and the field's name, with `_total` after
/// counters (and after the seconds sums, whose fields end in `_seconds`, and the families), as
/// Prometheus names them.
macro_rules! metrics {
    ($($(#[doc = $help:literal])+ $field:ident: $kind:ty $(= $init:expr)?,)+) => {
        pub struct Metrics {
            $($(#[doc = $help])+ pub $field: $kind,)+
        }

        impl Default for Metrics {
            fn default() -> Metrics {
                Metrics {
                    $($field: metrics!(@init $($init)?),)+
                }
            }
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
    (@init) => { Default::default() };
    (@init $init:expr) => { $init };
}

metrics! {
    /// The running build (its version as a label), always 1.
    build_info: BuildInfo,
    /// Open client connections.
    connections: Gauge,
    /// Connections opened, by transport (ws, sse).
    connections_opened: Family<1> = Family::new(["transport"]),
    /// Connections closed, by transport and close code (SSE streams by the WebSocket code of the
    /// same reason; 1006: the connection was lost without a close).
    connections_closed: Family<2> = Family::new(["transport", "code"]),
    /// Error messages and refusals sent to clients, by transport and protocol error code.
    errors_sent: Family<2> = Family::new(["transport", "code"]),
    /// From a change's time in the outbox (its `ts`: when the writing statement ran, so at most
    /// its transaction's duration before the commit) to its event frame being written to the
    /// client's socket (WebSocket: flushed; SSE: handed to the HTTP stream). Live events only:
    /// replayed ones are old by design.
    event_latency_seconds: Histogram,
    /// Read-policy queries (pgrelay.can_read over a chunk of changes and their readers), each
    /// from asking for a pooled connection to the last row.
    policy_query_seconds: Histogram,
    /// Replays of resuming clients, from the join to the hand-over to live delivery (waiting for
    /// the replay budget included; paced by how fast the client reads).
    replay_seconds: Histogram,
    /// Changes committed that this relay has not delivered yet, as of its last status report
    /// (every maintenance interval).
    outbox_backlog_changes: Gauge,
    /// Age of the oldest change this relay has not delivered yet (0 when caught up), as of its
    /// last status report.
    outbox_lag_seconds: FloatGauge,
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
            "outbox_backlog_changes",
            "outbox_lag_seconds",
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
        for family in [
            "build_info",
            "connections_opened_total",
            "connections_closed_total",
            "errors_sent_total",
            "event_latency_seconds",
            "policy_query_seconds",
            "replay_seconds",
        ] {
            let name = format!("pgrelay_{family}");
            assert!(text.contains(&format!("# HELP {name} ")), "{name} has help");
        }
        assert!(text.contains(&format!(
            "\npgrelay_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
        assert_eq!(text.matches("# TYPE").count(), 53, "one each");
    }

    #[test]
    fn every_metric_is_documented_for_operators() {
        let docs = include_str!("../docs/dba.md");
        let text = Metrics::default().render();
        for line in text.lines() {
            if let Some(typed) = line.strip_prefix("# TYPE ") {
                let name = typed.split(' ').next().unwrap_or_default();
                assert!(
                    docs.contains(&format!("| `{name}` |"))
                        || docs.contains(&format!("| `{name}{{")),
                    "docs/dba.md lists {name}"
                );
            }
        }
    }

    #[test]
    fn histograms_export_cumulative_buckets_a_sum_and_a_count() {
        let metrics = Metrics::default();
        for millis in [2, 3, 40, 60_000] {
            metrics
                .policy_query_seconds
                .observe(std::time::Duration::from_millis(millis));
        }
        let text = metrics.render();
        let name = "pgrelay_policy_query_seconds";
        assert!(text.contains(&format!("# TYPE {name} histogram\n")));
        assert!(text.contains(&format!("{name}_bucket{{le=\"0.001\"}} 0\n")));
        assert!(text.contains(&format!("{name}_bucket{{le=\"0.0025\"}} 1\n")));
        assert!(text.contains(&format!("{name}_bucket{{le=\"0.005\"}} 2\n")));
        assert!(text.contains(&format!("{name}_bucket{{le=\"0.05\"}} 3\n")));
        assert!(text.contains(&format!("{name}_bucket{{le=\"30\"}} 3\n")));
        assert!(text.contains(&format!("{name}_bucket{{le=\"+Inf\"}} 4\n")));
        assert!(text.contains(&format!("{name}_sum 60.045000\n")));
        assert!(text.contains(&format!("{name}_count 4\n")));
    }

    #[test]
    fn families_export_one_sample_per_label_set() {
        let metrics = Metrics::default();
        metrics.connections_closed.inc(["ws", "4008"]);
        metrics.connections_closed.inc(["ws", "4008"]);
        metrics.connections_closed.inc(["sse", "1001"]);
        let text = metrics.render();
        assert!(text.contains("# TYPE pgrelay_connections_closed_total counter\n"));
        assert!(
            text.contains("\npgrelay_connections_closed_total{transport=\"ws\",code=\"4008\"} 2\n")
        );
        assert!(text
            .contains("\npgrelay_connections_closed_total{transport=\"sse\",code=\"1001\"} 1\n"));
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
