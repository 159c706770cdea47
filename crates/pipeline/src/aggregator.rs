//! The aggregator: the reference design's snapshot writer, done right.
//!
//! Every `interval` (100 ms to 1 h) it writes one row per device holding the latest value
//! of each of its sensors, stamped with the tick's time. It keeps an in-memory mirror of the
//! latest-state bucket through a KV watch, so a cycle never has to read the bucket.
//!
//! * Ticks are aligned to wall-clock multiples of the interval, and rows are keyed by
//!   `(device, tick)`, so a restarted or newly elected writer never duplicates a row.
//! * Cycles run one after another in a single task, each started by sleeping until the next
//!   tick: a cycle that overruns makes the next tick(s) be skipped and counted, never
//!   stacked.
//! * Several replicas may run; only the holder of the `aggregator` lease writes. The lease
//!   is a KV key whose bucket's max age is the TTL: the holder creates it, then renews it
//!   by compare-and-set every third of the TTL from a task of its own, whatever the
//!   interval (an interval longer than the TTL is fine). When the holder dies, its lease
//!   expires and a standby takes over within the TTL plus one renewal period.
//! * **Fencing.** The key cannot expire before the TTL has run from the moment its last
//!   successful renewal (or creation) was sent. The writer keeps that moment, writes a
//!   tick only while `now < confirmed + ttl - LEASE_MARGIN`, and gives the write only the
//!   time left (a write that runs out is abandoned, logged and counted as an error). A
//!   writer that can no longer prove it holds the lease (paused, cut off from NATS, its key
//!   taken over) thus stops writing before anyone else can acquire it; a renewal refused
//!   because the key changed ends the lease at once.
//! * The writer also enforces retention, at its first tick and every [`MAINTAIN_EVERY`]
//!   after: raw readings, rollups and snapshots past `store.*_retention` are pruned (in
//!   short chunks, see [`Store::prune`]), and latest-state keys whose value is older than
//!   `state.max_idle` are purged from the bucket, each only if unchanged since it was seen
//!   (a purge conditioned on its revision), so a fresh reading is never lost. The mirrors
//!   (this one, the API's) see the purge and drop the sensor.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use fleetpipe_proto::Timestamp;
use fleetpipe_store::{Retained, Snapshot, Store};
use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::state::{label, sensor_of, split_key, StateValue};
use crate::stats::Stats;

/// The lease key in the lease bucket.
const LEASE_KEY: &str = "aggregator";
/// How often the writer enforces retention (prunes the store, purges idle state keys).
pub const MAINTAIN_EVERY: Duration = Duration::from_secs(60);
/// A writer stops writing this long before its lease could expire: room for a write that
/// its deadline abandons but the store still commits, and for clocks that tick at slightly
/// different rates here and on the NATS server. `aggregator.lease_ttl` must be at least
/// three times this, so that a lease survives one failed renewal.
pub const LEASE_MARGIN: Duration = Duration::from_millis(250);
/// Idle state keys purged at the same time.
const PURGES_IN_FLIGHT: usize = 32;

/// The in-memory copy of the latest-state bucket.
#[derive(Default)]
struct Mirror {
    /// device → series (the key's part after the device) → its label in a snapshot row
    /// (the sensor, with its tags when it has any: `cpu.usage{cpu=cpu0}`) and latest value.
    devices: HashMap<String, BTreeMap<String, (String, f64)>>,
    /// Every key (opaque here) → the timestamp of its value (Unix µs) and its revision,
    /// for the idle purge.
    keys: HashMap<String, (i64, u64)>,
}

/// How long each kind of data is kept.
#[derive(Debug, Clone, Copy)]
struct Retention {
    raw: Duration,
    rollups: Duration,
    snapshots: Duration,
    state_idle: Duration,
}

pub struct Aggregator {
    state: kv::Store,
    store: Arc<dyn Store>,
    lease: Lease,
    interval: Duration,
    retention: Retention,
    maintain_every: Duration,
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
            retention: Retention {
                raw: config.store.raw_retention,
                rollups: config.store.rollup_retention,
                snapshots: config.store.snapshot_retention,
                state_idle: config.state.max_idle,
            },
            maintain_every: MAINTAIN_EVERY,
            stats,
        }
    }

    /// Runs until `shutdown` is cancelled, then releases the lease so a standby takes over
    /// at once.
    pub async fn run(self, shutdown: CancellationToken) {
        let Aggregator {
            state,
            store,
            lease,
            interval,
            retention,
            maintain_every,
            stats,
        } = self;
        // A std mutex: the watch task and the tick take it for map updates and one copy,
        // never across an await.
        let mirror: Arc<Mutex<Mirror>> = Arc::default();
        // Set once the mirror holds every key the bucket had at start: writing before that
        // would store partial rows.
        let loaded = Arc::new(AtomicBool::new(false));
        let watcher = tokio::spawn(watch_state(
            state.clone(),
            mirror.clone(),
            loaded.clone(),
            shutdown.clone(),
        ));
        // The lease lives on its own schedule, and is released only after the last write.
        let fence = lease.fence();
        let stop_lease = CancellationToken::new();
        let _stop_lease_on_drop = stop_lease.clone().drop_guard();
        let keeper = tokio::spawn(lease.keep(stop_lease.clone()));

        let interval_us = i64::try_from(interval.as_micros())
            .unwrap_or(i64::MAX)
            .max(1);
        let mut last_tick: Option<i64> = None;
        let mut next_maintenance = Instant::now();
        let maintaining = Arc::new(AtomicBool::new(false));
        let mut writing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(until_next_tick(interval_us)) => {}
            }
            let now = Timestamp::now().as_micros();
            let tick = now - now.rem_euclid(interval_us);
            if let Some(last) = last_tick {
                if tick <= last {
                    continue;
                }
                let missed = (tick - last) / interval_us - 1;
                if missed > 0 {
                    Stats::add(&stats.aggregator_skipped, missed as u64);
                }
            }
            last_tick = Some(tick);
            if !loaded.load(Ordering::Acquire) {
                continue;
            }
            let Some(deadline) = fence.deadline() else {
                if writing {
                    tracing::warn!("stopped writing snapshots: the lease is not provably ours");
                    writing = false;
                }
                Stats::add(&stats.aggregator_standby, 1);
                continue;
            };
            writing = true;
            let rows = snapshot_rows(&mirror, Timestamp::from_micros(tick));
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, store.write_snapshots(&rows)).await {
                Ok(Ok(new)) => {
                    Stats::add(&stats.aggregator_ticks, 1);
                    Stats::add(&stats.aggregator_rows, new);
                }
                Ok(Err(e)) => {
                    Stats::add(&stats.aggregator_errors, 1);
                    tracing::warn!(error = %e, "snapshot write failed");
                }
                Err(_) => {
                    Stats::add(&stats.aggregator_errors, 1);
                    tracing::warn!(
                        tick = %Timestamp::from_micros(tick),
                        "snapshot write abandoned: it would have outlasted the lease"
                    );
                }
            }
            if Instant::now() >= next_maintenance {
                next_maintenance = Instant::now() + maintain_every;
                if !maintaining.swap(true, Ordering::AcqRel) {
                    let (store, state, mirror) = (store.clone(), state.clone(), mirror.clone());
                    let maintaining = maintaining.clone();
                    // In the background, one pass at a time.
                    tokio::spawn(async move {
                        maintain(store.as_ref(), &state, &mirror, retention).await;
                        maintaining.store(false, Ordering::Release);
                    });
                }
            }
        }
        stop_lease.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), keeper).await;
        watcher.abort();
    }
}

/// How long until the next wall-clock multiple of the interval. Sleeping that long before
/// every cycle keeps the cycles on the ticks however the clocks drift, and after a late
/// cycle resumes at the next tick (the ones in between are counted as skipped).
fn until_next_tick(interval_us: i64) -> Duration {
    let now = Timestamp::now().as_micros();
    let left = interval_us - now.rem_euclid(interval_us);
    Duration::from_micros(u64::try_from(left).unwrap_or(0))
}

/// `d` before now, saturating (retentions are validated, but never overflow here).
fn ago(d: Duration) -> Timestamp {
    let us = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
    Timestamp::now().saturating_add_micros(-us)
}

/// One retention pass: prunes the store's tables, then purges idle state keys.
async fn maintain(store: &dyn Store, state: &kv::Store, mirror: &Mutex<Mirror>, r: Retention) {
    let tables = [
        (Retained::Readings, r.raw),
        (Retained::Rollups, r.rollups),
        (Retained::Snapshots, r.snapshots),
    ];
    for (what, keep) in tables {
        match store.prune(what, ago(keep)).await {
            Ok(report) if report.deleted > 0 => tracing::info!(
                table = what.table(),
                deleted = report.deleted,
                transactions = report.chunks,
                longest_pause_ms = report.longest_pause.as_secs_f64() * 1e3,
                "pruned rows past retention"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(table = what.table(), error = %e, "pruning failed"),
        }
    }
    let (purged, kept) = purge_idle(state, mirror, r.state_idle).await;
    if purged > 0 || kept > 0 {
        tracing::info!(
            purged,
            kept,
            max_idle = %humantime::format_duration(r.state_idle),
            "purged idle sensors from the latest state (kept: changed meanwhile, or failed)"
        );
    }
}

/// Purges the state keys whose value is older than `max_idle`, each only if its revision
/// is still the one the mirror saw. Returns how many were purged, and how many were not
/// (changed meanwhile, or the purge failed; the next pass tries again).
async fn purge_idle(state: &kv::Store, mirror: &Mutex<Mirror>, max_idle: Duration) -> (u64, u64) {
    let cutoff = ago(max_idle).as_micros();
    let idle: Vec<(String, u64)> = match mirror.lock() {
        Ok(m) => m
            .keys
            .iter()
            .filter(|(_, &(ts, _))| ts < cutoff)
            .map(|(key, &(_, revision))| (key.clone(), revision))
            .collect(),
        Err(_) => return (0, 0),
    };
    let results: Vec<bool> = futures::stream::iter(idle)
        .map(|(key, revision)| async move {
            match state.purge_expect_revision(&key, Some(revision)).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(%key, error = %e, "idle state key not purged");
                    false
                }
            }
        })
        .buffer_unordered(PURGES_IN_FLIGHT)
        .collect()
        .await;
    let purged = results.iter().filter(|&&ok| ok).count() as u64;
    (purged, results.len() as u64 - purged)
}

fn snapshot_rows(mirror: &Mutex<Mirror>, ts: Timestamp) -> Vec<Snapshot> {
    let Ok(m) = mirror.lock() else {
        return Vec::new();
    };
    m.devices
        .iter()
        .map(|(device, series)| Snapshot {
            device: device.clone(),
            ts,
            values: series.values().cloned().collect(),
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
            let Ok(mut m) = mirror.lock() else { return };
            apply(&mut m, &entry);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Applies one change of the bucket to the mirror.
fn apply(m: &mut Mirror, entry: &kv::Entry) {
    match entry.operation {
        kv::Operation::Put => {
            let Ok(v) = serde_json::from_slice::<StateValue>(&entry.value) else {
                return;
            };
            m.keys.insert(entry.key.clone(), (v.ts, entry.revision));
            if let Some((device, series)) = split_key(&entry.key) {
                let label = label(
                    sensor_of(series),
                    v.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                );
                m.devices
                    .entry(device.to_string())
                    .or_default()
                    .insert(series.to_string(), (label, v.value));
            }
        }
        kv::Operation::Delete | kv::Operation::Purge => {
            m.keys.remove(&entry.key);
            if let Some((device, sensor)) = split_key(&entry.key) {
                if let Some(sensors) = m.devices.get_mut(device) {
                    sensors.remove(sensor);
                    if sensors.is_empty() {
                        m.devices.remove(device);
                    }
                }
            }
        }
    }
}

/// What the writer knows of its lease: since when it can prove it holds it. Shared by the
/// renewal task, which moves it, and the tick, which reads it.
#[derive(Clone)]
struct Fence {
    /// When the last successful creation or renewal was sent; `None` when not held.
    confirmed: Arc<Mutex<Option<Instant>>>,
    /// How long after `confirmed` the writer may still write: the TTL less the margin.
    valid_for: Duration,
}

impl Fence {
    /// Until when the writer may write, or `None` when it must not.
    fn deadline(&self) -> Option<Instant> {
        let confirmed = (*self.confirmed.lock().ok()?)?;
        let deadline = confirmed + self.valid_for;
        (Instant::now() < deadline).then_some(deadline)
    }

    fn confirm(&self, sent: Instant) {
        if let Ok(mut c) = self.confirmed.lock() {
            *c = Some(sent);
        }
    }

    fn revoke(&self) {
        if let Ok(mut c) = self.confirmed.lock() {
            *c = None;
        }
    }
}

/// What one acquisition or renewal attempt found.
enum Attempt {
    /// The lease is ours, renewed by this attempt.
    Held,
    /// Another replica holds it.
    Standby,
    /// It was ours and is not any more.
    Lost,
    /// Unknown (NATS did not answer): the fence runs out on its own unless a later
    /// renewal succeeds.
    Unknown,
}

/// A single-writer lease: a KV key created by the holder and renewed by compare-and-set
/// on its revision. The bucket's max age is the TTL, so an unrenewed lease disappears.
struct Lease {
    kv: kv::Store,
    key: &'static str,
    holder: String,
    ttl: Duration,
    revision: Option<u64>,
    fence: Fence,
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
            fence: Fence {
                confirmed: Arc::default(),
                valid_for: ttl.saturating_sub(LEASE_MARGIN),
            },
        }
    }

    fn fence(&self) -> Fence {
        self.fence.clone()
    }

    /// Acquires the lease when free and renews it while held, every third of the TTL,
    /// until `stop`; then releases it.
    async fn keep(mut self, stop: CancellationToken) {
        let period = (self.ttl / 3).max(Duration::from_millis(1));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let sent = Instant::now();
            match tokio::time::timeout(period, self.attempt()).await {
                Ok(Attempt::Held) => self.fence.confirm(sent),
                Ok(Attempt::Lost) => self.fence.revoke(),
                Ok(Attempt::Standby | Attempt::Unknown) => {}
                Err(_) => tracing::warn!("the lease renewal timed out; retrying"),
            }
        }
        self.fence.revoke();
        self.release().await;
    }

    async fn attempt(&mut self) -> Attempt {
        let Some(revision) = self.revision else {
            return match self.kv.create(self.key, self.holder.clone().into()).await {
                Ok(r) => {
                    tracing::info!(holder = %self.holder, "acquired the aggregator lease; writing snapshots");
                    self.revision = Some(r);
                    Attempt::Held
                }
                Err(_) => Attempt::Standby,
            };
        };
        match self.renew(revision).await {
            Ok(r) => {
                self.revision = Some(r);
                return Attempt::Held;
            }
            Err(e) if e.kind() != kv::UpdateErrorKind::WrongLastRevision => {
                tracing::warn!(error = %e, "cannot renew the aggregator lease; retrying");
                return Attempt::Unknown;
            }
            Err(_) => {}
        }
        // The key changed. A renewal that timed out may still have gone through, leaving
        // our name at a revision we never saw: then it is still ours.
        if let Ok(Some(entry)) = self.kv.entry(self.key).await {
            if entry.operation == kv::Operation::Put && entry.value == self.holder.as_bytes() {
                if let Ok(r) = self.renew(entry.revision).await {
                    self.revision = Some(r);
                    return Attempt::Held;
                }
            }
        }
        tracing::warn!("lost the aggregator lease; standing by");
        self.revision = None;
        Attempt::Lost
    }

    async fn renew(&self, revision: u64) -> Result<u64, kv::UpdateError> {
        self.kv
            .update(self.key, self.holder.clone().into(), revision)
            .await
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

#[cfg(test)]
mod tests {
    use std::sync::Weak;

    use async_nats::jetstream;
    use fleetpipe_proto::Reading;
    use fleetpipe_store::{Range, Record};
    use fleetpipe_testkit::NatsServer;

    use super::*;

    const DAY_US: i64 = 24 * 3600 * 1_000_000;

    /// One nats-server for the tests that run at the same time; it stops when the last of
    /// them drops it.
    fn shared_nats() -> Arc<NatsServer> {
        static SHARED: Mutex<Weak<NatsServer>> = Mutex::new(Weak::new());
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(server) = shared.upgrade() {
            return server;
        }
        let server = Arc::new(NatsServer::start());
        *shared = Arc::downgrade(&server);
        server
    }

    /// A test's own buckets (on the shared server) and SQLite store.
    struct Setup {
        _nats: Arc<NatsServer>,
        _dir: tempfile::TempDir,
        state: kv::Store,
        leases: kv::Store,
        store: Arc<dyn Store>,
        stats: Arc<Stats>,
    }

    impl Setup {
        async fn new(name: &str, ttl: Duration) -> Setup {
            let nats = shared_nats();
            let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
            let state = js
                .create_key_value(kv::Config {
                    bucket: format!("state_{name}"),
                    history: 1,
                    ..Default::default()
                })
                .await
                .unwrap();
            let leases = js
                .create_key_value(kv::Config {
                    bucket: format!("leases_{name}"),
                    history: 1,
                    max_age: ttl,
                    ..Default::default()
                })
                .await
                .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("fleet.db").display());
            Setup {
                _nats: nats,
                _dir: dir,
                state,
                leases,
                store: fleetpipe_store::open(&url).await.unwrap(),
                stats: Arc::default(),
            }
        }

        fn aggregator(&self, interval: Duration, ttl: Duration) -> Aggregator {
            let mut config = Config::default();
            config.aggregator.interval = interval;
            config.aggregator.lease_ttl = ttl;
            config.validate().unwrap();
            Aggregator::new(
                &config,
                self.state.clone(),
                self.leases.clone(),
                self.store.clone(),
                self.stats.clone(),
            )
        }

        async fn put(&self, key: &str, value: f64, ts: i64) {
            let json = format!(r#"{{"value":{value},"ts":{ts}}}"#);
            self.state.put(key, json.into()).await.unwrap();
        }

        async fn holder(&self) -> Option<String> {
            let value = self.leases.get(LEASE_KEY).await.unwrap()?;
            Some(String::from_utf8(value.to_vec()).unwrap())
        }

        /// The ticks of `device`'s snapshot rows, oldest first.
        async fn ticks(&self, device: &str) -> Vec<i64> {
            let all = Range {
                from: Timestamp::from_micros(0),
                to: Timestamp::from_micros(i64::MAX),
            };
            let rows = self.store.snapshots(Some(device), all, 100_000).await;
            rows.unwrap().iter().map(|s| s.ts.as_micros()).collect()
        }
    }

    /// Polls `done` every 50 ms until it holds, failing after `secs` seconds.
    async fn wait_for<F, Fut>(what: &str, secs: u64, mut done: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !done().await {
            assert!(Instant::now() < deadline, "{what}: not within {secs} s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_interval_longer_than_the_lease_writes_every_tick() {
        let (interval, ttl) = (Duration::from_millis(1500), Duration::from_secs(1));
        let s = Setup::new("every_tick", ttl).await;
        s.put("d1.speed", 42.0, Timestamp::now().as_micros()).await;
        let stop = CancellationToken::new();
        let task = tokio::spawn(s.aggregator(interval, ttl).run(stop.clone()));

        // Three ticks, watching the lease key meanwhile: once taken, it never lapses.
        let mut holder: Option<String> = None;
        let mut lapses = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.ticks("d1").await.len() < 3 {
            assert!(Instant::now() < deadline, "not three ticks in 30 s");
            let now = s.holder().await;
            match &holder {
                None => holder = now,
                Some(h) if now.as_ref() != Some(h) => lapses.push(now),
                Some(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(holder.is_some(), "the lease was never seen held");
        assert!(lapses.is_empty(), "the lease lapsed: {lapses:?}");
        let ticks = s.ticks("d1").await;
        let interval_us = interval.as_micros() as i64;
        for pair in ticks.windows(2) {
            assert_eq!(pair[1] - pair[0], interval_us, "ticks {ticks:?}");
        }

        stop.cancel();
        task.await.unwrap();
        assert_eq!(s.holder().await, None, "released at shutdown");
        let stats = s.stats.snapshot();
        assert_eq!(stats.aggregator_skipped, 0, "{stats:?}");
        assert_eq!(stats.aggregator_errors, 0, "{stats:?}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_writer_whose_lease_is_taken_stops_within_the_ttl() {
        let (interval, ttl) = (Duration::from_millis(100), Duration::from_secs(1));
        let ttl_us = ttl.as_micros() as i64;
        let s = Setup::new("taken", ttl).await;
        s.put("d1.speed", 1.0, Timestamp::now().as_micros()).await;
        let stop = CancellationToken::new();
        let task = tokio::spawn(s.aggregator(interval, ttl).run(stop.clone()));
        wait_for("three ticks", 20, || async {
            s.ticks("d1").await.len() >= 3
        })
        .await;
        let ours = s.holder().await.expect("the writer holds the lease");

        // Another holder takes the key (the writer may re-create it in between: retry)
        // and renews it for twice the TTL.
        let mut revision = loop {
            s.leases.delete(LEASE_KEY).await.unwrap();
            if let Ok(r) = s.leases.create(LEASE_KEY, "usurper".into()).await {
                break r;
            }
        };
        let taken = Timestamp::now().as_micros();
        let until = Instant::now() + ttl * 2;
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(200)).await;
            revision = s
                .leases
                .update(LEASE_KEY, "usurper".into(), revision)
                .await
                .expect("the usurper keeps the lease");
        }
        let late: Vec<i64> = s
            .ticks("d1")
            .await
            .into_iter()
            .filter(|&t| t >= taken + ttl_us)
            .collect();
        assert!(late.is_empty(), "written after losing the lease: {late:?}");
        assert!(s.stats.snapshot().aggregator_standby > 0);

        // Once the usurper stops renewing, its key expires and the writer takes over again.
        let given_up = Timestamp::now().as_micros();
        wait_for("writing again", 20, || async {
            s.ticks("d1").await.last().is_some_and(|&t| t > given_up)
        })
        .await;
        assert_eq!(s.holder().await, Some(ours));
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn idle_sensors_and_expired_rows_go() {
        let (interval, ttl) = (Duration::from_millis(100), Duration::from_secs(1));
        let s = Setup::new("retention", ttl).await;
        let now = Timestamp::now().as_micros();
        let old = now - 31 * DAY_US;
        s.put("gone.speed", 1.0, old).await;
        s.put("mixed.a", 2.0, old).await;
        s.put("mixed.b", 3.0, now).await;
        s.put("fresh.speed", 4.0, now).await;
        // Rows past their retention (30 d by default).
        let reading = Reading {
            device: "x".into(),
            sensor: "s".into(),
            value: 1.0,
            ts: Timestamp::from_micros(old),
            unit: None,
            quality: None,
            tags: Default::default(),
        };
        let record = Record { seq: 1, reading };
        s.store
            .write_readings(std::slice::from_ref(&record))
            .await
            .unwrap();
        let snapshot = Snapshot {
            device: "x".into(),
            ts: Timestamp::from_micros(old),
            values: BTreeMap::from([("s".to_string(), 1.0)]),
        };
        s.store.write_snapshots(&[snapshot]).await.unwrap();

        let stop = CancellationToken::new();
        let mut aggregator = s.aggregator(interval, ttl);
        aggregator.maintain_every = Duration::from_millis(200);
        let task = tokio::spawn(aggregator.run(stop.clone()));
        wait_for("idle keys purged", 20, || async {
            s.state.get("gone.speed").await.unwrap().is_none()
                && s.state.get("mixed.a").await.unwrap().is_none()
        })
        .await;
        assert!(s.state.get("mixed.b").await.unwrap().is_some());
        assert!(s.state.get("fresh.speed").await.unwrap().is_some());

        // The mirror drops them too: later rows hold only the live sensors.
        let purged = Timestamp::now().as_micros();
        wait_for("a row after the purge", 20, || async {
            s.ticks("fresh")
                .await
                .last()
                .is_some_and(|&t| t > purged + 200_000)
        })
        .await;
        let tick = *s.ticks("fresh").await.last().unwrap();
        let at = Range {
            from: Timestamp::from_micros(tick),
            to: Timestamp::from_micros(tick + 1),
        };
        let rows = s.store.snapshots(None, at, 100).await.unwrap();
        let rows: BTreeMap<&str, &BTreeMap<String, f64>> = rows
            .iter()
            .map(|r| (r.device.as_str(), &r.values))
            .collect();
        assert_eq!(
            format!("{rows:?}"),
            r#"{"fresh": {"speed": 4.0}, "mixed": {"b": 3.0}}"#
        );

        // The store was pruned, and a redelivery of the pruned reading is not stored again.
        assert_eq!(s.store.count_readings().await.unwrap(), 0);
        assert!(s.ticks("x").await.is_empty());
        let horizon = s.store.raw_horizon().await.unwrap().expect("a raw horizon");
        assert!(horizon.as_micros() > old);
        assert_eq!(s.store.write_readings(&[record]).await.unwrap(), 0);
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_key_changed_since_it_was_seen_is_not_purged() {
        let s = Setup::new("purge_race", Duration::from_secs(1)).await;
        let old = Timestamp::now().as_micros() - 31 * DAY_US;
        s.put("d.s", 1.0, old).await;
        let seen = s.state.entry("d.s").await.unwrap().unwrap().revision;
        // The mirror saw the old value; a fresh one arrives before the purge.
        let mirror = Mutex::new(Mirror::default());
        mirror
            .lock()
            .unwrap()
            .keys
            .insert("d.s".into(), (old, seen));
        s.put("d.s", 2.0, Timestamp::now().as_micros()).await;
        let max_idle = Duration::from_secs(30 * 24 * 3600);
        assert_eq!(purge_idle(&s.state, &mirror, max_idle).await, (0, 1));
        assert!(s.state.get("d.s").await.unwrap().is_some());
        // Seen at its current revision, it is purged.
        let current = s.state.entry("d.s").await.unwrap().unwrap().revision;
        mirror
            .lock()
            .unwrap()
            .keys
            .insert("d.s".into(), (old, current));
        assert_eq!(purge_idle(&s.state, &mirror, max_idle).await, (1, 0));
        assert!(s.state.get("d.s").await.unwrap().is_none());
    }
}
