//! The aggregator: the reference design's snapshot writer, done right.
//!
//! Every `interval` (down to 100 ms) it writes one row per device holding the latest value
//! of each of its sensors, stamped with the tick's time. It keeps an in-memory mirror of the
//! latest-state bucket through a KV watch, so a cycle never has to read the bucket.
//!
//! * Ticks are aligned to wall-clock multiples of the interval, and rows are keyed by
//!   `(device, tick)`, so a restarted or newly elected writer never duplicates a row.
//! * Cycles run one after another in a single task: a cycle that overruns makes the next
//!   tick(s) be skipped and counted, never stacked.
//! * Several replicas may run; only the holder of the `aggregator` lease (a KV key with a
//!   TTL, renewed by the holder) writes. When the holder dies, its lease expires and a
//!   standby takes over within the TTL plus one renewal period.
//! * The writer also prunes raw readings past their retention.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use fleetpipe_proto::Timestamp;
use fleetpipe_store::{Snapshot, Store};
use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::state::{split_key, StateValue};
use crate::stats::Stats;

/// The lease key in the lease bucket.
const LEASE_KEY: &str = "aggregator";
/// How often the writer prunes raw readings.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// device → sensor → latest value.
type Mirror = HashMap<String, BTreeMap<String, f64>>;

pub struct Aggregator {
    state: kv::Store,
    store: Arc<dyn Store>,
    lease: Lease,
    interval: Duration,
    raw_retention: Duration,
    stats: Arc<Stats>,
}

impl Aggregator {
    pub fn new(
        config: &Config,
        state: kv::Store,
        leases: kv::Store,
        store: Arc<dyn Store>,
        stats: Arc<Stats>,
    ) -> Self {
        Aggregator {
            state,
            store,
            lease: Lease::new(leases, LEASE_KEY, config.aggregator.lease_ttl),
            interval: config.aggregator.interval,
            raw_retention: config.store.raw_retention,
            stats,
        }
    }

    /// Runs until `shutdown` is cancelled, then releases the lease so a standby takes over
    /// at once.
    pub async fn run(mut self, shutdown: CancellationToken) {
        // A std mutex: the watch task and the tick take it for map updates and one copy,
        // never across an await.
        let mirror: Arc<Mutex<Mirror>> = Arc::default();
        // Set once the mirror holds every key the bucket had at start: writing before that
        // would store partial rows.
        let loaded = Arc::new(AtomicBool::new(false));
        let watcher = tokio::spawn(watch_state(
            self.state.clone(),
            mirror.clone(),
            loaded.clone(),
            shutdown.clone(),
        ));
        let interval_us = self.interval.as_micros() as i64;
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_tick: Option<i64> = None;
        let mut next_prune = Instant::now() + PRUNE_EVERY;
        let pruning = Arc::new(AtomicBool::new(false));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let now = Timestamp::now().as_micros();
            let tick = now - now.rem_euclid(interval_us);
            if let Some(last) = last_tick {
                if tick <= last {
                    continue;
                }
                let missed = (tick - last) / interval_us - 1;
                if missed > 0 {
                    Stats::add(&self.stats.aggregator_skipped, missed as u64);
                }
            }
            last_tick = Some(tick);
            if !loaded.load(Ordering::Acquire) {
                continue;
            }
            if !self.lease.hold().await {
                Stats::add(&self.stats.aggregator_standby, 1);
                continue;
            }
            let rows = snapshot_rows(&mirror, Timestamp::from_micros(tick));
            match self.store.write_snapshots(&rows).await {
                Ok(new) => {
                    Stats::add(&self.stats.aggregator_ticks, 1);
                    Stats::add(&self.stats.aggregator_rows, new);
                }
                Err(e) => {
                    Stats::add(&self.stats.aggregator_errors, 1);
                    tracing::warn!(error = %e, "snapshot write failed");
                }
            }
            if Instant::now() >= next_prune {
                next_prune = Instant::now() + PRUNE_EVERY;
                self.spawn_prune(&pruning);
            }
        }
        self.lease.release().await;
        watcher.abort();
    }

    /// Prunes raw readings in the background, at most one prune at a time.
    fn spawn_prune(&self, pruning: &Arc<AtomicBool>) {
        if pruning.swap(true, Ordering::AcqRel) {
            return;
        }
        let store = self.store.clone();
        let before =
            Timestamp::now().saturating_add_micros(-(self.raw_retention.as_micros() as i64));
        let pruning = pruning.clone();
        tokio::spawn(async move {
            match store.prune_readings(before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "pruned raw readings past retention"),
                Err(e) => tracing::warn!(error = %e, "pruning raw readings failed"),
            }
            pruning.store(false, Ordering::Release);
        });
    }
}

fn snapshot_rows(mirror: &Mutex<Mirror>, ts: Timestamp) -> Vec<Snapshot> {
    let Ok(m) = mirror.lock() else {
        return Vec::new();
    };
    m.iter()
        .map(|(device, values)| Snapshot {
            device: device.clone(),
            ts,
            values: values.clone(),
        })
        .collect()
}

/// Keeps `mirror` equal to the state bucket, re-watching after errors.
async fn watch_state(
    state: kv::Store,
    mirror: Arc<Mutex<Mirror>>,
    loaded: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        if let Ok(status) = state.status().await {
            if status.values() == 0 {
                loaded.store(true, Ordering::Release);
            }
        }
        // With history: the last value of every key first, then changes.
        let mut watch = match state.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the state bucket; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(entry) = watch.next().await {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "state watch failed; re-watching");
                    break;
                }
            };
            if entry.delta == 0 {
                // The last of the replayed values (and every live change after it).
                loaded.store(true, Ordering::Release);
            }
            let Some((device, sensor)) = split_key(&entry.key) else {
                continue;
            };
            let Ok(mut m) = mirror.lock() else { return };
            match entry.operation {
                kv::Operation::Put => {
                    if let Ok(v) = serde_json::from_slice::<StateValue>(&entry.value) {
                        m.entry(device.to_string())
                            .or_default()
                            .insert(sensor.to_string(), v.value);
                    }
                }
                kv::Operation::Delete | kv::Operation::Purge => {
                    if let Some(sensors) = m.get_mut(device) {
                        sensors.remove(sensor);
                        if sensors.is_empty() {
                            m.remove(device);
                        }
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A single-writer lease: a KV key created by the holder and renewed by compare-and-set
/// on its revision. The bucket's max age is the TTL, so an unrenewed lease disappears.
struct Lease {
    kv: kv::Store,
    key: &'static str,
    holder: String,
    ttl: Duration,
    revision: Option<u64>,
    next_attempt: Instant,
}

impl Lease {
    fn new(kv: kv::Store, key: &'static str, ttl: Duration) -> Self {
        Lease {
            kv,
            key,
            holder: format!(
                "{}-{}-{:x}",
                hostname(),
                std::process::id(),
                Timestamp::now().as_micros() & 0xffff_ffff
            ),
            ttl,
            revision: None,
            next_attempt: Instant::now(),
        }
    }

    /// True when this process holds the lease, renewing or acquiring it when due.
    async fn hold(&mut self) -> bool {
        let now = Instant::now();
        if now < self.next_attempt {
            return self.revision.is_some();
        }
        // Renew well before expiry; retry acquisition at the same pace.
        self.next_attempt = now + self.ttl / 3;
        let value = self.holder.clone().into();
        match self.revision {
            Some(rev) => match self.kv.update(self.key, value, rev).await {
                Ok(r) => self.revision = Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "lost the aggregator lease");
                    self.revision = None;
                }
            },
            None => {
                if let Ok(r) = self.kv.create(self.key, value).await {
                    tracing::info!(holder = %self.holder, "acquired the aggregator lease; writing snapshots");
                    self.revision = Some(r);
                }
            }
        }
        self.revision.is_some()
    }

    async fn release(&mut self) {
        if let Some(rev) = self.revision.take() {
            if let Err(e) = self.kv.delete_expect_revision(self.key, Some(rev)).await {
                tracing::debug!(error = %e, "lease release failed; it will expire");
            }
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "host".into())
}
