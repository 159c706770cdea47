//! Counters every component bumps, read by progress lines, `--json` output and (later)
//! the metrics endpoint. Relaxed atomics: each counter is independent, and readers only
//! need eventually consistent totals.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

macro_rules! stats {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Live counters shared by the components of one process.
        #[derive(Debug, Default)]
        pub struct Stats { $($(#[$doc])* pub $name: AtomicU64,)* }

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
    /// Store transactions committed by the collectors.
    batches,
    /// Failed store writes (the messages are redelivered).
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
