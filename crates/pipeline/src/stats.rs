//! Counters every component bumps, read by progress lines, `--json` output and the
//! metrics endpoint. Relaxed atomics: each counter is independent, and readers only
//! need eventually consistent totals.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

macro_rules! stats {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Live counters shared by the components of one process.
        #[derive(Debug, Default)]
        pub struct Stats {
            $($(#[$doc])* pub $name: AtomicU64,)*
            /// Duration of the collectors' store writes (not part of [`StatsSnapshot`]).
            pub store_write: LatencyHistogram,
        }

        /// A copy of [`Stats`] at one moment.
        #[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
        pub struct StatsSnapshot { $($(#[$doc])* pub $name: u64,)* }

        impl Stats {
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name.load(Relaxed),)* }
            }
        }
    };
}

stats! {
    /// Telemetry messages the collectors received.
    messages,
    /// Messages received more than once (after a crash or a failed write).
    redelivered,
    /// Readings written as new rows.
    readings_stored,
    /// Readings that were already stored (a redelivery); not written twice.
    readings_duplicate,
    /// Messages routed to the dead-letter stream.
    dead_letters,
    /// Messages whose readings the store refused for good, dead-lettered (code `store`).
    store_refused,
    /// Messages dead-lettered after `collector.max_deliver` deliveries (code
    /// `max_deliveries`).
    max_deliveries,
    /// Store transactions committed by the collectors.
    batches,
    /// Failed store writes (retried, or split to find a message the store refuses).
    store_errors,
    /// Failed broker operations (state, dead letters, acks); the messages are redelivered.
    nats_errors,
    /// Snapshot cycles the aggregator completed.
    aggregator_ticks,
    /// Snapshot rows the aggregator wrote.
    aggregator_rows,
    /// Ticks skipped because the previous cycle ran late (never stacked).
    aggregator_skipped,
    /// Ticks this replica let pass because another replica holds the writer lease.
    aggregator_standby,
    /// Failed snapshot writes.
    aggregator_errors,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}

/// Upper bounds, in seconds, of [`LatencyHistogram`]'s buckets (a last `+Inf` is implied).
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A fixed-bucket latency histogram on relaxed atomics: cheap enough to observe on every
/// store write, and read by the metrics endpoint without locking.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Per-bucket (not cumulative) counts; the last one is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

/// A copy of a [`LatencyHistogram`] at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, count in this bucket)`, not cumulative; the last bound is
    /// `f64::INFINITY`.
    pub buckets: Vec<(f64, u64)>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl LatencyHistogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let bounds = LATENCY_BUCKETS.iter().copied().chain([f64::INFINITY]);
        HistogramSnapshot {
            buckets: bounds
                .zip(&self.buckets)
                .map(|(le, n)| (le, n.load(Relaxed)))
                .collect(),
            sum_seconds: self.sum_micros.load(Relaxed) as f64 / 1e6,
            count: self.count.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets.len(), LATENCY_BUCKETS.len() + 1);
        assert_eq!(s.buckets[0], (0.0005, 1));
        assert_eq!(s.buckets[3], (0.005, 1));
        assert_eq!(s.buckets.last(), Some(&(f64::INFINITY, 1)));
        assert!((s.sum_seconds - 60.0033).abs() < 1e-9);
    }
}
