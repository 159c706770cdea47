//! The in-memory index of the latest state: a mirror of the `fleetpipe_state` KV bucket,
//! kept current by a KV watch, that the device, summary and live endpoints read instead of
//! the bucket. Every update is also sent to the live broadcast that feeds `/api/v1/live`.
//!
//! Devices are kept in a `BTreeMap` by id, so a prefix filter is a range scan and listing
//! by id needs no sort. Sensor names are interned to small integers, so the fleet summary
//! is one pass over plain arrays (100k devices in a few milliseconds).
//!
//! **Series.** A device holds one entry per KV key, i.e. per series: the key's series part
//! (`speed`, or `cpu.usage_idle.=<hash>` for a tagged series; see
//! [`fleetpipe_pipeline::state`]) is unique within the device, and deletes go by it. An
//! entry shows with its real sensor name ([`sensor_of`]) and, when its key is a tagged
//! one, the tags of its value; a device's `sensors` map names it by its label
//! ([`crate::tags::label`]): `speed`, `cpu.usage_idle{cpu=cpu0,host=h1}`.
//!
//! Passes over every device (listing, summary) take the lock for [`SCAN_CHUNK`] devices at
//! a time and sort outside it, so the watch's updates never wait long behind a request;
//! see [`Index`] for why that matters.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use async_nats::jetstream::kv;
use fleetpipe_pipeline::state::{sensor_of, split_key, StateValue};
use fleetpipe_proto::Timestamp;
use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::model::{Device, LiveState, SensorStats, SensorValue};

/// Events the live broadcast holds for its slowest reader; a reader further behind skips
/// ahead and is told how many it missed. Bounds the memory of the live stream whatever the
/// number or speed of clients.
pub const LIVE_CAPACITY: usize = 4096;

/// A state change as sent to live clients: the JSON `data` is serialized once, the
/// device and sensor (its name, whatever the series' tags) are kept for filtering.
#[derive(Debug, Clone)]
pub struct LiveEvent {
    pub device: Arc<str>,
    pub sensor: Arc<str>,
    /// A [`LiveState`] document.
    pub json: Arc<str>,
}

/// Decides whether a device is online: its newest reading is at most `window` old.
#[derive(Debug, Clone, Copy)]
pub struct Online {
    now: i64,
    window: i64,
}

impl Online {
    /// Online means a reading within `window` before `now`.
    pub fn new(now: Timestamp, window: Duration) -> Self {
        Online {
            now: now.as_micros(),
            window: crate::params::micros(window),
        }
    }

    fn is(&self, last_seen: i64) -> bool {
        self.now.saturating_sub(last_seen) <= self.window
    }
}

/// How to order a device listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    Id,
    LastSeen,
}

/// Filters, order and page of a device listing.
#[derive(Debug, Clone)]
pub struct ListQuery {
    /// Only ids starting with this (empty: all).
    pub prefix: String,
    /// Only devices having every one of these tags with exactly this value.
    pub tags: Vec<(String, String)>,
    /// Only online (`Some(true)`) or offline (`Some(false)`) devices.
    pub online: Option<bool>,
    pub sort: SortKey,
    pub descending: bool,
    pub limit: usize,
    pub offset: usize,
}

/// One series of a sensor as the index knows it: see [`Index::series_of`].
#[derive(Debug, Clone, PartialEq)]
pub struct IndexedSeries {
    /// Canonical (sorted by name); empty for the series without tags.
    pub tags: Vec<(String, String)>,
    /// The unit of its latest value.
    pub unit: Option<String>,
}

/// Fleet-wide counts over the index.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub devices: u64,
    pub online: u64,
    pub sensors: BTreeMap<String, SensorStats>,
}

/// Devices a pass over the index reads per acquisition of the read lock: a few tens of
/// microseconds of work, the longest the watch's next update can wait for a request.
pub const SCAN_CHUNK: usize = 1024;

/// Devices whose full views (every sensor, cloned) a listing builds per acquisition of the
/// read lock.
const VIEW_CHUNK: usize = 256;

/// The latest state of every device, shared by the watch task (the only writer) and the
/// request handlers.
pub struct Index {
    /// A std `RwLock`, never held across an await; readers (requests) run in parallel, and
    /// the one writer (the watch) holds it for a single update at a time.
    ///
    /// No reader holds it for long either, and not only for the watch's sake: std's lock
    /// (futex-based on Linux) is write-preferring, so once the watch waits for the write
    /// lock, every new reader queues behind it. A read pass over 100k devices holding the
    /// lock throughout would stall the watch (and the live stream it feeds) for the whole
    /// pass, and with it every request that reads the index, each blocking an async worker
    /// thread meanwhile. Hence passes over every device go by chunks of [`SCAN_CHUNK`]
    /// (`scan`), sort what they copied out after releasing the lock, and run on the
    /// blocking pool (`Limits::index_pass`); what requests do on async threads under the
    /// lock is a lookup or two.
    ///
    /// Releasing the lock between chunks is not enough by itself: the unlock wakes the
    /// waiting writer, but a reader that locks again at once gets in before the writer has
    /// woken up, chunk after chunk (a test showed the watch waiting for the whole pass). So
    /// the writer announces itself in `writers`, and a pass steps aside between two chunks
    /// until it has had its turn.
    inner: RwLock<Inner>,
    /// Writers waiting for the lock (the watch: 0 or 1).
    writers: AtomicUsize,
    live: broadcast::Sender<LiveEvent>,
    /// Set once the watch has replayed every key the bucket held when it started.
    ready: AtomicBool,
}

#[derive(Default)]
struct Inner {
    /// By id; `Arc<str>` so that a listing copies its matches out of the lock cheaply.
    devices: BTreeMap<Arc<str>, DeviceEntry>,
    /// Interned sensor names (without a key's tag hash): id → name and name → id. Only
    /// grows; bounded by the number of distinct sensor names, which is small.
    sensor_names: Vec<String>,
    sensor_ids: HashMap<String, u32>,
    /// Number of keys (series) held.
    keys: usize,
}

#[derive(Default)]
struct DeviceEntry {
    /// Newest `ts` of its sensors, µs.
    last_seen: i64,
    tags: BTreeMap<String, String>,
    sensors: Vec<SensorEntry>,
}

/// One series (one KV key) of a device.
struct SensorEntry {
    /// The interned sensor name.
    id: u32,
    /// `None` for a key without a tag hash: the series without tags (a vehicle's
    /// `speed`), which costs no more than one pointer.
    tagged: Option<Box<Tagged>>,
    value: f64,
    ts: i64,
    unit: Option<String>,
    quality: Option<String>,
}

/// What a series with tags adds to its entry.
struct Tagged {
    /// The key's tag hash, after `.=`: with the sensor id, the entry's identity.
    hash: Box<str>,
    /// The tags of its latest value, sorted by name.
    tags: Vec<(String, String)>,
}

impl SensorEntry {
    fn is(&self, id: u32, hash: Option<&str>) -> bool {
        self.id == id && self.tagged.as_ref().map(|t| &*t.hash) == hash
    }

    fn tags(&self) -> &[(String, String)] {
        self.tagged.as_ref().map_or(&[], |t| &t.tags)
    }
}

/// Splits a key's series part into the sensor and the tag hash, if any.
fn parse_series(series: &str) -> (&str, Option<&str>) {
    let sensor = sensor_of(series);
    // Past the end (no `.=`): `None`.
    (sensor, series.get(sensor.len() + 2..))
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("devices", &self.devices())
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl Default for Index {
    fn default() -> Self {
        Self::new()
    }
}

impl Index {
    /// An empty index, not ready until [`Index::mark_ready`] (the watch calls it).
    pub fn new() -> Self {
        let (live, _) = broadcast::channel(LIVE_CAPACITY);
        Index {
            inner: RwLock::default(),
            live,
            ready: AtomicBool::new(false),
            writers: AtomicUsize::new(0),
        }
    }

    // A panic while holding the lock cannot leave an entry half-written in a way that
    // matters (each update replaces whole values), so a poisoned lock is used as is.
    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.writers.fetch_add(1, Ordering::SeqCst);
        let g = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        self.writers.fetch_sub(1, Ordering::SeqCst);
        g
    }

    /// Between two chunks of a pass: lets a waiting writer take the lock first. It waits
    /// for nothing slower than the chunk some other pass may be reading.
    fn step_aside(&self) {
        while self.writers.load(Ordering::SeqCst) > 0 {
            std::thread::yield_now();
        }
    }

    /// True once the index holds everything the bucket held when the watch started.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Marks the initial replay as complete.
    pub fn mark_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// A receiver of every state change from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.live.subscribe()
    }

    /// Connected live-stream clients.
    pub fn live_clients(&self) -> usize {
        self.live.receiver_count()
    }

    /// Number of devices.
    pub fn devices(&self) -> usize {
        self.read().devices.len()
    }

    /// Number of keys (series).
    pub fn keys(&self) -> usize {
        self.read().keys
    }

    /// Applies one KV entry (the watch calls this). Returns false for an entry that is not
    /// a fleetpipe state value (a malformed key or value), which is skipped.
    pub fn apply_entry(&self, key: &str, operation: kv::Operation, value: &[u8]) -> bool {
        let Some((device, series)) = split_key(key) else {
            return false;
        };
        match operation {
            kv::Operation::Put => match serde_json::from_slice::<StateValue>(value) {
                Ok(v) => {
                    self.apply_put(device, series, v);
                    true
                }
                Err(_) => false,
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                self.apply_delete(device, series);
                true
            }
        }
    }

    /// Sets a series' latest value (creating the device), and sends it to live clients.
    /// `series` is the key's series part: the sensor, followed by `.=<hash>` for a series
    /// with tags (whose tags are then the value's).
    pub fn apply_put(&self, device: &str, series: &str, v: StateValue) {
        let (sensor, hash) = parse_series(series);
        // The tags of the series: a key without a hash is the series without tags (tags in
        // its value, written before series had tags, are only the device's).
        let series_tags: Vec<(String, String)> = match hash {
            Some(_) => v.tags.iter().map(|(k, x)| (k.clone(), x.clone())).collect(),
            None => Vec::new(),
        };
        // Serialized before taking the lock, and only when someone listens.
        let event =
            (self.live.receiver_count() > 0).then(|| live_event(device, sensor, &series_tags, &v));
        {
            let mut g = self.write();
            let id = g.intern(sensor);
            if !g.devices.contains_key(device) {
                g.devices.insert(device.into(), DeviceEntry::default());
            }
            let mut added = false;
            if let Some(d) = g.devices.get_mut(device) {
                for (k, val) in v.tags {
                    if d.tags.get(&k) != Some(&val) {
                        d.tags.insert(k, val);
                    }
                }
                let entry = SensorEntry {
                    id,
                    tagged: hash.map(|h| {
                        Box::new(Tagged {
                            hash: h.into(),
                            tags: series_tags,
                        })
                    }),
                    value: v.value,
                    ts: v.ts,
                    unit: v.unit,
                    quality: v.quality,
                };
                match d.sensors.iter_mut().find(|s| s.is(id, hash)) {
                    Some(s) => *s = entry,
                    None => {
                        d.sensors.push(entry);
                        added = true;
                    }
                }
                d.last_seen = d.sensors.iter().map(|s| s.ts).max().unwrap_or(v.ts);
            }
            if added {
                g.keys += 1;
            }
        }
        if let Some(e) = event {
            // Err only when every client has gone; nothing to do.
            let _ = self.live.send(e);
        }
    }

    /// Removes a series (`series` as for [`Index::apply_put`]), and the device with its
    /// last series.
    pub fn apply_delete(&self, device: &str, series: &str) {
        let (sensor, hash) = parse_series(series);
        let mut g = self.write();
        let Some(&id) = g.sensor_ids.get(sensor) else {
            return;
        };
        let Some(d) = g.devices.get_mut(device) else {
            return;
        };
        let before = d.sensors.len();
        d.sensors.retain(|s| !s.is(id, hash));
        let removed = before - d.sensors.len();
        let empty = d.sensors.is_empty();
        d.last_seen = d.sensors.iter().map(|s| s.ts).max().unwrap_or(0);
        g.keys -= removed;
        if empty {
            g.devices.remove(device);
        }
    }

    /// One device's latest state.
    pub fn device(&self, id: &str, online: Online) -> Option<Device> {
        let g = self.read();
        g.devices.get(id).map(|d| g.view(id, d, online))
    }

    /// Calls `visit` for every device whose id starts with `prefix`, in id order, holding
    /// the read lock for at most [`SCAN_CHUNK`] devices at a time. Not one atomic view: an
    /// update between two chunks shows in the later ones only, as it would had the pass
    /// run a moment earlier or later; each device is seen whole.
    fn scan(&self, prefix: &str, mut visit: impl FnMut(&Arc<str>, &DeviceEntry)) {
        let mut after: Option<Arc<str>> = None;
        loop {
            let g = self.read();
            let lower = match &after {
                Some(id) => Bound::Excluded(&**id),
                None => Bound::Included(prefix),
            };
            let mut seen = 0;
            let mut last = None;
            for (id, d) in g
                .devices
                .range::<str, _>((lower, Bound::Unbounded))
                .take_while(|(id, _)| id.starts_with(prefix))
                .take(SCAN_CHUNK)
            {
                visit(id, d);
                seen += 1;
                last = Some(id);
            }
            if seen < SCAN_CHUNK {
                return;
            }
            after = last.cloned();
            drop(g);
            self.step_aside();
        }
    }

    /// A page of devices and how many match in all. Walks every device with the prefix:
    /// call it off the async threads for large fleets.
    pub fn list(&self, q: &ListQuery, online: Online) -> (u64, Vec<Device>) {
        // Copied out by chunks of the lock (an id is an `Arc`), filtered as they go by.
        let mut matches: Vec<(i64, Arc<str>)> = Vec::new();
        self.scan(&q.prefix, |id, d| {
            if q.tags.iter().all(|(k, v)| d.tags.get(k) == Some(v))
                && q.online.is_none_or(|want| online.is(d.last_seen) == want)
            {
                matches.push((d.last_seen, Arc::clone(id)));
            }
        });
        // Sorted with no lock held. By last_seen, ties by id, so pages are stable; by id
        // they are in order already.
        if q.sort == SortKey::LastSeen {
            matches.sort_unstable();
        }
        if q.descending {
            matches.reverse();
        }
        let total = matches.len() as u64;
        let page: Vec<Arc<str>> = matches
            .into_iter()
            .skip(q.offset)
            .take(q.limit)
            .map(|(_, id)| id)
            .collect();
        let mut items = Vec::with_capacity(page.len());
        for chunk in page.chunks(VIEW_CHUNK) {
            let g = self.read();
            // A device deleted since the scan is left out of the page.
            items.extend(
                chunk
                    .iter()
                    .filter_map(|id| g.devices.get(&**id).map(|d| g.view(id, d, online))),
            );
        }
        (total, items)
    }

    /// Device counts and per-sensor min/avg/max over the latest values. One pass over
    /// every device: call it off the async threads for large fleets. A sensor's figures
    /// cover every series of it, whatever their tags: a device with four tag sets of
    /// `cpu.usage_idle` adds four values (and 4 to its `count`).
    pub fn summary(&self, online: Online) -> Summary {
        #[derive(Clone)]
        struct Acc {
            count: u64,
            sum: f64,
            min: f64,
            max: f64,
        }
        const EMPTY: Acc = Acc {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        };
        // By sensor id; sensor ids only grow, so they stay valid across chunks.
        let mut acc: Vec<Acc> = Vec::new();
        let (mut devices, mut online_count) = (0u64, 0u64);
        self.scan("", |_, d| {
            devices += 1;
            if online.is(d.last_seen) {
                online_count += 1;
            }
            for s in &d.sensors {
                let i = s.id as usize;
                if i >= acc.len() {
                    acc.resize(i + 1, EMPTY);
                }
                let a = &mut acc[i];
                a.count += 1;
                a.sum += s.value;
                a.min = a.min.min(s.value);
                a.max = a.max.max(s.value);
            }
        });
        let g = self.read();
        let sensors = g
            .sensor_names
            .iter()
            .zip(acc)
            .filter(|(_, a)| a.count > 0)
            .map(|(name, a)| {
                let stats = SensorStats {
                    count: a.count,
                    min: a.min,
                    avg: a.sum / a.count as f64,
                    max: a.max,
                };
                (name.clone(), stats)
            })
            .collect();
        Summary {
            devices,
            online: online_count,
            sensors,
        }
    }

    /// The series of a device's sensor (every tag set), with the unit of each latest
    /// value; `None` for an unknown device (an empty list: it lacks the sensor).
    pub fn series_of(&self, device: &str, sensor: &str) -> Option<Vec<IndexedSeries>> {
        let g = self.read();
        let d = g.devices.get(device)?;
        let Some(&id) = g.sensor_ids.get(sensor) else {
            return Some(Vec::new());
        };
        Some(
            d.sensors
                .iter()
                .filter(|s| s.id == id)
                .map(|s| IndexedSeries {
                    tags: s.tags().to_vec(),
                    unit: s.unit.clone(),
                })
                .collect(),
        )
    }
}

impl Inner {
    fn intern(&mut self, sensor: &str) -> u32 {
        if let Some(&id) = self.sensor_ids.get(sensor) {
            return id;
        }
        let id = self.sensor_names.len() as u32;
        self.sensor_names.push(sensor.to_string());
        self.sensor_ids.insert(sensor.to_string(), id);
        id
    }

    fn view(&self, id: &str, d: &DeviceEntry, online: Online) -> Device {
        // With each value's time, to settle a clash of labels.
        let mut sensors: BTreeMap<String, (i64, SensorValue)> = BTreeMap::new();
        for s in &d.sensors {
            let Some(name) = self.sensor_names.get(s.id as usize) else {
                continue;
            };
            let (label, sensor, tags) = match &s.tagged {
                None => (name.clone(), None, BTreeMap::new()),
                Some(t) => {
                    let label = if t.tags.is_empty() {
                        // A hashed key whose value lost its tags: its key still tells it
                        // from the others.
                        format!("{name}.={}", t.hash)
                    } else {
                        let tags = t.tags.iter().map(|(k, v)| (k.as_str(), v.as_str()));
                        crate::tags::label(name, tags)
                    };
                    (label, Some(name.clone()), t.tags.iter().cloned().collect())
                }
            };
            // Two keys of one label (the same tags under two hashes, which only a key
            // written by hand can make): the newer value is shown.
            if sensors.get(&label).is_some_and(|(ts, _)| *ts > s.ts) {
                continue;
            }
            let value = SensorValue {
                value: s.value,
                ts: Timestamp::from_micros(s.ts).to_rfc3339(),
                unit: s.unit.clone(),
                quality: s.quality.clone(),
                sensor,
                tags,
            };
            sensors.insert(label, (s.ts, value));
        }
        Device {
            id: id.to_string(),
            last_seen: Timestamp::from_micros(d.last_seen).to_rfc3339(),
            online: online.is(d.last_seen),
            tags: d.tags.clone(),
            sensors: sensors.into_iter().map(|(k, (_, v))| (k, v)).collect(),
        }
    }
}

fn live_event(device: &str, sensor: &str, tags: &[(String, String)], v: &StateValue) -> LiveEvent {
    let state = LiveState {
        device: device.to_string(),
        sensor: sensor.to_string(),
        tags: tags.iter().cloned().collect(),
        value: v.value,
        ts: v.timestamp().to_rfc3339(),
        unit: v.unit.clone(),
        quality: v.quality.clone(),
    };
    LiveEvent {
        device: device.into(),
        sensor: sensor.into(),
        json: serde_json::to_string(&state).unwrap_or_default().into(),
    }
}

/// Keeps `index` equal to the state bucket until `shutdown`: replays the last value of
/// every key (`watch_with_history`, unlike `watch_all`, which would only deliver changes
/// from now on), marks the index ready, then applies every change. Re-watches after an
/// error.
pub async fn watch(state: kv::Store, index: Arc<Index>, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        if let Ok(status) = state.status().await {
            // An empty bucket replays nothing, so there is no last entry to wait for.
            if status.values() == 0 {
                index.mark_ready();
            }
        }
        let mut entries = match state.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the state bucket; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = entries.next() => next,
            };
            let entry = match next {
                Some(Ok(e)) => e,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "state watch failed; re-watching");
                    break;
                }
                None => break,
            };
            if !index.apply_entry(&entry.key, entry.operation, &entry.value) {
                tracing::debug!(key = %entry.key, "skipped a state entry that is not a fleetpipe value");
            }
            if entry.delta == 0 && !index.is_ready() {
                index.mark_ready();
                tracing::info!(
                    devices = index.devices(),
                    keys = index.keys(),
                    "latest state loaded"
                );
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const NOW: i64 = 1_771_149_600_000_000;

    fn value(v: f64, ts: i64) -> StateValue {
        StateValue {
            value: v,
            ts,
            unit: Some("km/h".into()),
            quality: None,
            tags: BTreeMap::new(),
            seq: 0,
        }
    }

    fn online() -> Online {
        Online::new(Timestamp::from_micros(NOW), Duration::from_secs(30))
    }

    fn query() -> ListQuery {
        ListQuery {
            prefix: String::new(),
            tags: Vec::new(),
            online: None,
            sort: SortKey::Id,
            descending: false,
            limit: 100,
            offset: 0,
        }
    }

    #[test]
    fn puts_deletes_and_last_seen() {
        let index = Index::new();
        index.apply_put("v1", "speed", value(10.0, NOW - 60_000_000));
        index.apply_put("v1", "soc", value(80.0, NOW - 1_000_000));
        index.apply_put("v2", "speed", value(20.0, NOW - 120_000_000));
        assert_eq!((index.devices(), index.keys()), (2, 3));
        let d = index.device("v1", online()).unwrap();
        assert!(d.online);
        assert_eq!(d.sensors.len(), 2);
        assert_eq!(
            d.last_seen,
            Timestamp::from_micros(NOW - 1_000_000).to_rfc3339()
        );
        index.apply_delete("v1", "soc");
        let d = index.device("v1", online()).unwrap();
        assert!(!d.online, "last_seen falls back to the remaining sensor");
        index.apply_delete("v1", "speed");
        assert_eq!(index.device("v1", online()), None);
        assert_eq!((index.devices(), index.keys()), (1, 1));
        // Deleting what is not there changes nothing.
        index.apply_delete("v9", "speed");
        index.apply_delete("v2", "nope");
        assert_eq!((index.devices(), index.keys()), (1, 1));
    }

    #[test]
    fn entries_from_the_bucket() {
        let index = Index::new();
        let json = br#"{"value":1.5,"ts":1771149600000000,"unit":"V","tags":{"site":"munich"}}"#;
        assert!(index.apply_entry("v1.battery.voltage", kv::Operation::Put, json));
        assert!(!index.apply_entry("nodot", kv::Operation::Put, json));
        assert!(!index.apply_entry("v1.x", kv::Operation::Put, b"not json"));
        let d = index.device("v1", online()).unwrap();
        assert_eq!(d.tags.get("site").map(String::as_str), Some("munich"));
        assert_eq!(d.sensors["battery.voltage"].value, 1.5);
        assert!(index.apply_entry("v1.battery.voltage", kv::Operation::Delete, b""));
        assert_eq!(index.devices(), 0);
    }

    #[test]
    fn listing_filters_sorts_and_pages() {
        let index = Index::new();
        for i in 0..30 {
            let mut v = value(i as f64, NOW - i * 10_000_000);
            v.tags
                .insert("site".into(), if i % 2 == 0 { "a" } else { "b" }.into());
            index.apply_put(&format!("d{i:02}"), "speed", v);
        }
        let ids = |q: &ListQuery| -> (u64, Vec<String>) {
            let (total, items) = index.list(q, online());
            (total, items.into_iter().map(|d| d.id).collect())
        };
        let (total, page) = ids(&ListQuery {
            limit: 3,
            offset: 2,
            ..query()
        });
        assert_eq!(
            (total, page),
            (30, vec!["d02".into(), "d03".into(), "d04".into()])
        );
        let (total, page) = ids(&ListQuery {
            prefix: "d1".into(),
            descending: true,
            limit: 2,
            ..query()
        });
        assert_eq!((total, page), (10, vec!["d19".into(), "d18".into()]));
        let (total, page) = ids(&ListQuery {
            tags: vec![("site".into(), "b".into())],
            sort: SortKey::LastSeen,
            descending: true,
            limit: 2,
            ..query()
        });
        assert_eq!((total, page), (15, vec!["d01".into(), "d03".into()]));
        // Online: readings at most 30 s old, i.e. d00..d03.
        let (total, _) = ids(&ListQuery {
            online: Some(true),
            ..query()
        });
        assert_eq!(total, 4);
        let (total, page) = ids(&ListQuery {
            offset: 1000,
            ..query()
        });
        assert_eq!((total, page.len()), (30, 0));
    }

    #[test]
    fn summary_counts() {
        let index = Index::new();
        index.apply_put("a", "speed", value(10.0, NOW));
        index.apply_put("b", "speed", value(30.0, NOW - 3_600_000_000));
        index.apply_put("b", "soc", value(50.0, NOW - 3_600_000_000));
        let s = index.summary(online());
        assert_eq!((s.devices, s.online), (2, 1));
        let speed = &s.sensors["speed"];
        assert_eq!(
            (speed.count, speed.min, speed.avg, speed.max),
            (2, 10.0, 20.0, 30.0)
        );
        assert_eq!(s.sensors["soc"].count, 1);
        // A sensor removed everywhere disappears from the summary.
        index.apply_delete("b", "soc");
        assert!(!index.summary(online()).sensors.contains_key("soc"));
    }

    #[test]
    fn live_events_reach_subscribers() {
        let index = Index::new();
        index.apply_put("a", "speed", value(1.0, NOW)); // nobody listens: no event built
        let mut rx = index.subscribe();
        index.apply_put("a", "speed", value(2.0, NOW));
        let e = rx.try_recv().unwrap();
        assert_eq!((&*e.device, &*e.sensor), ("a", "speed"));
        let state: LiveState = serde_json::from_str(&e.json).unwrap();
        assert_eq!(state.value, 2.0);
        assert_eq!(state.unit.as_deref(), Some("km/h"));
    }

    #[test]
    fn passes_cross_chunk_boundaries() {
        let index = Index::new();
        let n = 3 * SCAN_CHUNK as i64 + 7;
        for i in 0..n {
            index.apply_put(&format!("d{i:05}"), "speed", value(i as f64, NOW - i));
        }
        index.apply_put("e0", "soc", value(1.0, NOW));
        let (total, items) = index.list(
            &ListQuery {
                prefix: "d".into(),
                sort: SortKey::LastSeen,
                descending: true,
                offset: SCAN_CHUNK - 2,
                limit: 4,
                ..query()
            },
            online(),
        );
        assert_eq!(total, n as u64);
        let ids: Vec<String> = items.into_iter().map(|d| d.id).collect();
        let want: Vec<String> = (SCAN_CHUNK - 2..SCAN_CHUNK + 2)
            .map(|i| format!("d{i:05}"))
            .collect();
        assert_eq!(ids, want);
        let s = index.summary(online());
        assert_eq!(s.devices, n as u64 + 1);
        assert_eq!(s.sensors["speed"].count, n as u64);
        assert_eq!(s.sensors["soc"].count, 1);
    }

    /// An update that arrives during a pass is applied at the next chunk boundary, not
    /// after the pass: the watch is not held behind a long read.
    #[test]
    fn updates_go_through_during_a_pass() {
        let index = Arc::new(Index::new());
        for i in 0..(3 * SCAN_CHUNK) {
            index.apply_put(&format!("d{i:05}"), "speed", value(1.0, NOW));
        }
        let mut writer = None;
        let mut visited_new = false;
        index.scan("", |id, _| {
            if writer.is_none() {
                let (started, wait) = std::sync::mpsc::channel();
                let index = index.clone();
                writer = Some(std::thread::spawn(move || {
                    started.send(()).unwrap();
                    index.apply_put("zzz", "speed", value(2.0, NOW));
                }));
                wait.recv().unwrap();
                // Long enough for the writer to be waiting for the lock this chunk holds.
                std::thread::sleep(Duration::from_millis(50));
            }
            visited_new |= &**id == "zzz";
        });
        writer.unwrap().join().unwrap();
        assert!(visited_new, "the update waited for the whole pass");
    }

    fn tagged(v: f64, tags: &[(&str, &str)]) -> StateValue {
        let mut s = value(v, NOW);
        s.unit = None;
        s.tags = tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        s
    }

    /// Puts a Telegraf-style host: `cpu.usage_idle` for cpu0..cpu3, `mem.used_percent`.
    fn telegraf_host(index: &Index) -> Vec<String> {
        let mut keys = Vec::new();
        for c in 0..4 {
            let cpu = format!("cpu{c}");
            let tags = [("cpu", cpu.as_str()), ("host", "h1")];
            let pairs: Vec<(String, String)> = tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let key = fleetpipe_pipeline::state::key("h1", "cpu.usage_idle", &pairs);
            let json = serde_json::to_vec(&tagged(90.0 + c as f64, &tags)).unwrap();
            assert!(index.apply_entry(&key, kv::Operation::Put, &json));
            keys.push(key);
        }
        let pairs = vec![("host".to_string(), "h1".to_string())];
        let key = fleetpipe_pipeline::state::key("h1", "mem.used_percent", &pairs);
        let json = serde_json::to_vec(&tagged(42.5, &[("host", "h1")])).unwrap();
        assert!(index.apply_entry(&key, kv::Operation::Put, &json));
        keys.push(key);
        keys
    }

    #[test]
    fn series_told_apart_by_tags() {
        let index = Index::new();
        let mut rx = index.subscribe();
        let keys = telegraf_host(&index);
        assert_eq!((index.devices(), index.keys()), (1, 5));
        let d = index.device("h1", online()).unwrap();
        let labels: Vec<&str> = d.sensors.keys().map(String::as_str).collect();
        assert_eq!(
            labels,
            [
                "cpu.usage_idle{cpu=cpu0,host=h1}",
                "cpu.usage_idle{cpu=cpu1,host=h1}",
                "cpu.usage_idle{cpu=cpu2,host=h1}",
                "cpu.usage_idle{cpu=cpu3,host=h1}",
                "mem.used_percent{host=h1}",
            ]
        );
        let cpu2 = &d.sensors["cpu.usage_idle{cpu=cpu2,host=h1}"];
        assert_eq!(cpu2.value, 92.0);
        assert_eq!(cpu2.sensor.as_deref(), Some("cpu.usage_idle"));
        assert_eq!(cpu2.tags["cpu"], "cpu2");
        // A put to one series changes that one only.
        let json = serde_json::to_vec(&tagged(50.0, &[("cpu", "cpu2"), ("host", "h1")])).unwrap();
        assert!(index.apply_entry(&keys[2], kv::Operation::Put, &json));
        let d = index.device("h1", online()).unwrap();
        assert_eq!(d.sensors["cpu.usage_idle{cpu=cpu2,host=h1}"].value, 50.0);
        assert_eq!(d.sensors["cpu.usage_idle{cpu=cpu1,host=h1}"].value, 91.0);
        assert_eq!(index.keys(), 5);

        // The index's series of a sensor, with their tags.
        let series = index.series_of("h1", "cpu.usage_idle").unwrap();
        assert_eq!(series.len(), 4);
        assert_eq!(series[3].tags[0], ("cpu".to_string(), "cpu3".to_string()));
        assert_eq!(index.series_of("h1", "nope"), Some(vec![]));
        assert_eq!(index.series_of("h9", "cpu.usage_idle"), None);

        // Live events name the sensor and carry the tags.
        let e = rx.try_recv().unwrap();
        assert_eq!((&*e.device, &*e.sensor), ("h1", "cpu.usage_idle"));
        let state: LiveState = serde_json::from_str(&e.json).unwrap();
        assert_eq!(state.tags["cpu"], "cpu0");

        // The summary aggregates the tag sets of a sensor.
        let s = index.summary(online());
        assert_eq!(s.sensors["cpu.usage_idle"].count, 4);
        assert_eq!(s.sensors["cpu.usage_idle"].max, 93.0);
        assert_eq!(s.sensors.len(), 2);

        // Deletes go by key: one series at a time.
        assert!(index.apply_entry(&keys[0], kv::Operation::Delete, b""));
        let d = index.device("h1", online()).unwrap();
        assert_eq!(d.sensors.len(), 4);
        assert!(!d.sensors.contains_key("cpu.usage_idle{cpu=cpu0,host=h1}"));
        for key in &keys[1..] {
            assert!(index.apply_entry(key, kv::Operation::Purge, b""));
        }
        assert_eq!((index.devices(), index.keys()), (0, 0));
    }

    #[test]
    fn untagged_and_tagged_series_of_one_sensor() {
        let index = Index::new();
        // A plain key is the series without tags, even if its value (written before series
        // had tags) carries the device's.
        index.apply_put("v1", "speed", tagged(10.0, &[("site", "a")]));
        index.apply_put(
            "v1",
            "speed.=00000000000000ff",
            tagged(20.0, &[("site", "b")]),
        );
        let d = index.device("v1", online()).unwrap();
        assert_eq!(d.sensors["speed"].value, 10.0);
        assert_eq!(d.sensors["speed"].sensor, None);
        assert!(d.sensors["speed"].tags.is_empty());
        assert_eq!(d.sensors["speed{site=b}"].value, 20.0);
        let json = serde_json::to_value(&d.sensors["speed"]).unwrap();
        assert!(
            json.get("tags").is_none() && json.get("sensor").is_none(),
            "{json}"
        );
        let mut tags: Vec<Vec<(String, String)>> = index
            .series_of("v1", "speed")
            .unwrap()
            .into_iter()
            .map(|s| s.tags)
            .collect();
        tags.sort();
        assert_eq!(tags, [vec![], vec![("site".into(), "b".into())]]);
        index.apply_delete("v1", "speed");
        let d = index.device("v1", online()).unwrap();
        assert_eq!(d.sensors.keys().collect::<Vec<_>>(), ["speed{site=b}"]);
        // A hashed key whose value has no tags keeps a label of its own.
        index.apply_put("v1", "speed.=0000000000000001", value(5.0, NOW));
        let d = index.device("v1", online()).unwrap();
        assert_eq!(d.sensors["speed.=0000000000000001"].value, 5.0);
    }

    /// The summary over 100k devices with 5 sensors each. The time is printed, not
    /// asserted: a timed assertion would fail on a loaded machine.
    #[test]
    fn summary_of_100k_devices() {
        let index = Index::new();
        let sensors = ["speed", "soc", "torque", "gps.lat", "gps.lon"];
        for i in 0..100_000i64 {
            let device = format!("v{i:06}");
            for (j, s) in sensors.iter().enumerate() {
                index.apply_put(&device, s, value((i + j as i64) as f64, NOW - i * 1000));
            }
        }
        let started = Instant::now();
        let s = index.summary(online());
        let elapsed = started.elapsed();
        println!("fleet summary of 100k devices x 5 sensors: {elapsed:?}");
        assert_eq!(s.devices, 100_000);
        assert_eq!(s.online, 30_001);
        assert_eq!(s.sensors["speed"].count, 100_000);
        let started = Instant::now();
        let (total, items) = index.list(
            &ListQuery {
                sort: SortKey::LastSeen,
                descending: true,
                ..query()
            },
            online(),
        );
        println!(
            "device list sorted by last_seen over 100k devices: {:?}",
            started.elapsed()
        );
        assert_eq!((total, items.len()), (100_000, 100));
        assert_eq!(items[0].id, "v000000");
    }
}
