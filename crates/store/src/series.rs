//! What both backends share on the write path: checking a batch, and the in-process cache
//! of series ids that lets a batch of known series go to the database without a lookup.
//!
//! A series is one `(device, sensor, tags)`: two readings that differ only in a tag value
//! belong to two series (as in InfluxDB and Prometheus). Tags are stored as a JSON object
//! with sorted keys, the one canonical text both backends compare. The row also holds the
//! latest unit a device sent; a reading that carries none leaves it as it is, so a device
//! mixing plain and JSON payloads does not make it flip back and forth.

use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};

use fleetpipe_proto::{Name, Tags, Timestamp};

use crate::hashing::PrehashedMap;
use crate::series_index::{canonical, BySlot, SeriesIndex, SeriesSlot};
use crate::{Record, Result, Snapshot, StoreError};

/// Earliest instant both backends can store: PostgreSQL's `timestamptz` starts at
/// 4714-11-24 BC. SQLite could hold more, but both must accept the same data.
const MIN_TS_MICROS: i64 = -210_866_803_200_000_000;

/// Latest instant both backends store. PostgreSQL's limit (294277 AD) lies beyond what
/// `i64` Unix microseconds reach; one microsecond short of `i64::MAX`, so that every
/// stored reading lies inside some half-open range `[from, to)` — reads, and the embedded
/// store's duplicate check, ask for such ranges, and a reading at `i64::MAX` could be
/// found by neither (a redelivery of it was stored twice).
const MAX_TS_MICROS: i64 = i64::MAX - 1;

/// Refuses a batch holding something no backend can store faithfully, before anything is
/// written: a non-finite value (SQLite turns NaN into NULL), a sequence beyond `i64`, a
/// timestamp PostgreSQL cannot represent, or text with a NUL character (PostgreSQL cannot
/// hold one; SQLite could, but both must accept the same data). Retrying such a batch cannot succeed, so the
/// error is not transient.
pub(crate) fn check_records(batch: &[Record]) -> Result<()> {
    for (i, r) in batch.iter().enumerate() {
        let reading = &r.reading;
        if !reading.value.is_finite() {
            return Err(invalid(i, reading, "value is not finite"));
        }
        if i64::try_from(r.seq).is_err() {
            return Err(invalid(
                i,
                reading,
                "sequence does not fit a signed 64-bit integer",
            ));
        }
        if !ts_in_range(reading.ts) {
            return Err(invalid(i, reading, "timestamp out of range"));
        }
        let texts = [reading.device.as_str(), reading.sensor.as_str()]
            .into_iter()
            .chain(reading.unit.as_deref())
            .chain(reading.quality.as_deref())
            .chain(
                reading
                    .tags
                    .iter()
                    .flat_map(|(k, v)| [k.as_str(), v.as_str()]),
            );
        for text in texts {
            if text.contains('\0') {
                return Err(invalid(
                    i,
                    reading,
                    "text holds a NUL character, which PostgreSQL cannot store",
                ));
            }
        }
    }
    Ok(())
}

/// Like [`check_records`], for snapshot rows.
pub(crate) fn check_snapshots(rows: &[Snapshot]) -> Result<()> {
    for (i, s) in rows.iter().enumerate() {
        if !ts_in_range(s.ts) {
            return Err(StoreError::Invalid(format!(
                "snapshot {i} (device {:?}): timestamp out of range",
                s.device
            )));
        }
        if let Some((sensor, _)) = s.values.iter().find(|(_, v)| !v.is_finite()) {
            return Err(StoreError::Invalid(format!(
                "snapshot {i} (device {:?}): value of {sensor:?} is not finite",
                s.device
            )));
        }
    }
    Ok(())
}

fn ts_in_range(ts: Timestamp) -> bool {
    (MIN_TS_MICROS..=MAX_TS_MICROS).contains(&ts.as_micros())
}

fn invalid(i: usize, r: &fleetpipe_proto::Reading, why: &str) -> StoreError {
    StoreError::Invalid(format!(
        "reading {i} ({}/{} at {}): {why}",
        r.device,
        r.sensor,
        r.ts.as_micros()
    ))
}

/// Serialises tags (already sorted by key, as [`Pending`] and [`Cached`] hold them) as a
/// JSON object.
pub(crate) fn tags_to_json(tags: &[(String, String)]) -> String {
    let map: BTreeMap<&str, &str> = tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    // A map of strings always serialises.
    serde_json::to_string(&map).unwrap_or_else(|_| "{}".to_string())
}

/// Parses tags as stored. Anything but an object of strings (someone edited the row by
/// hand) counts as no tags, so the next reading that carries tags rewrites it.
pub(crate) fn tags_from_json(json: &str) -> Vec<(String, String)> {
    match serde_json::from_str::<BTreeMap<String, String>>(json) {
        Ok(map) => map.into_iter().collect(),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring malformed series tags");
            Vec::new()
        }
    }
}

/// What the cache knows about one series: its id, and a fingerprint of the unit of its
/// committed row, 8 bytes in a vector indexed by the process's [`SeriesIndex`] (2.6
/// million series: 21 MB). The fingerprint only decides whether to rewrite the row's unit,
/// so 32 bits are plenty; a series id beyond `u32` (four billion series) is simply not
/// cached. Ids start at 1, so id 0 marks a series not cached.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Cached {
    id: u32,
    unit: u32,
}

impl Cached {
    const NONE: Cached = Cached { id: 0, unit: 0 };
}

/// How a reading of a batch refers to its series.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SeriesRef {
    /// Known, committed, and its unit and tags need no update.
    Id(i64),
    /// Index into [`Plan::pending`]: the backend resolves (and maybe updates) it first.
    Pending(usize),
}

/// A series the backend must look up, create or update before writing the batch.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    /// Where the series is in the process's [`SeriesIndex`].
    pub slot: SeriesSlot,
    pub device: Name,
    pub sensor: Name,
    /// Canonical (sorted by name, one value per name): part of the series' identity.
    pub tags: Tags,
    /// The same as stored, a JSON object with sorted keys.
    pub tags_json: String,
    /// The latest unit the batch carries for it, if any.
    pub unit: Option<String>,
}

/// The row a pending series ends up with, to be remembered once committed.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub id: i64,
    pub unit: Option<String>,
    /// Created by this write: nothing of it is stored yet.
    pub created: bool,
}

/// A pending series merged with the row found in the database.
pub(crate) struct Merged {
    pub resolved: Resolved,
    /// True when the row must be updated to `resolved`'s unit and tags.
    pub changed: bool,
}

impl Pending {
    /// Merges with the stored row: a unit the batch carries wins, none keeps the stored one.
    pub(crate) fn merge(&self, id: i64, db_unit: Option<String>) -> Merged {
        let unit = self.unit.clone().or(db_unit.clone());
        let changed = unit != db_unit;
        Merged {
            resolved: Resolved {
                id,
                unit,
                created: false,
            },
            changed,
        }
    }

    /// The row a newly created series gets.
    pub(crate) fn created(&self, id: i64) -> Resolved {
        Resolved {
            id,
            unit: self.unit.clone(),
            created: true,
        }
    }
}

/// A batch's series, split into those the cache resolved and those the backend must.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// One per record of the batch, in order.
    pub refs: Vec<SeriesRef>,
    pub pending: Vec<Pending>,
}

impl Plan {
    /// The series id of record `i`'s series, once `resolved` (one per pending) is known.
    pub(crate) fn id(r: SeriesRef, resolved: &[Resolved]) -> i64 {
        match r {
            SeriesRef::Id(id) => id,
            SeriesRef::Pending(p) => resolved[p].id,
        }
    }
}

/// In-process cache `(device, sensor, tags) → series`, shared by every write.
///
/// It only ever holds committed rows (entries are added after the transaction that wrote
/// them commits) and series rows are never deleted, so an entry is never stale in a way
/// that matters: at worst its unit lags behind a concurrent writer's, and the next reading
/// that carries a different one updates the row again.
///
/// Series are found through the process's [`SeriesIndex`] (fingerprints, not strings: see
/// its docs); units are kept as fingerprints, only to notice a change.
#[derive(Debug)]
pub(crate) struct SeriesCache {
    index: Arc<SeriesIndex>,
    // A std mutex: lookups and inserts are short, never held across an await, and a
    // batch takes it once, not once per reading.
    cached: Mutex<BySlot<Cached>>,
    /// Randomly keyed, for unit fingerprints.
    units: RandomState,
}

impl Default for SeriesCache {
    fn default() -> Self {
        SeriesCache {
            index: Arc::default(),
            cached: Mutex::new(BySlot::new(Cached::NONE)),
            units: RandomState::new(),
        }
    }
}

impl SeriesCache {
    /// The index the cache finds series by, for others to keep state per series by.
    pub(crate) fn index(&self) -> Arc<SeriesIndex> {
        self.index.clone()
    }

    fn unit(&self, unit: Option<&str>) -> u32 {
        self.units.hash_one(unit) as u32
    }

    /// Resolves every record's series from the cache; records whose series is unknown, or
    /// whose unit or tags differ from the stored ones, become [`Pending`].
    pub(crate) fn plan(&self, batch: &[Record]) -> Result<Plan> {
        let slots = self.index.slots(batch);
        let cached = self
            .cached
            .lock()
            .map_err(|_| StoreError::Task("series cache mutex poisoned".into()))?;
        let mut plan = Plan {
            refs: Vec::with_capacity(batch.len()),
            pending: Vec::new(),
        };
        let mut pending_index: PrehashedMap<SeriesSlot, usize> = PrehashedMap::default();
        for (record, slot) in batch.iter().zip(slots) {
            let r = &record.reading;
            let hit = cached
                .get(slot)
                .filter(|c| r.unit.is_none() || self.unit(r.unit.as_deref()) == c.unit);
            if let Some(c) = hit {
                plan.refs.push(SeriesRef::Id(i64::from(c.id)));
                continue;
            }
            let idx = *pending_index.entry(slot).or_insert_with(|| {
                let tags = canonical(&r.tags);
                plan.pending.push(Pending {
                    slot,
                    device: r.device.clone(),
                    sensor: r.sensor.clone(),
                    tags_json: tags_to_json(&tags),
                    tags,
                    unit: None,
                });
                plan.pending.len() - 1
            });
            let p = &mut plan.pending[idx];
            if r.unit.is_some() {
                p.unit.clone_from(&r.unit);
            }
            plan.refs.push(SeriesRef::Pending(idx));
        }
        Ok(plan)
    }

    /// Records committed series rows.
    pub(crate) fn remember(&self, pending: &[Pending], resolved: &[Resolved]) -> Result<()> {
        let mut cached = self
            .cached
            .lock()
            .map_err(|_| StoreError::Task("series cache mutex poisoned".into()))?;
        for (p, r) in pending.iter().zip(resolved) {
            let Ok(id) = u32::try_from(r.id) else {
                continue;
            };
            let unit = self.unit(r.unit.as_deref());
            cached.set(p.slot, Cached { id, unit });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::series_index::record;

    fn t(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Tags are part of a series' identity, compared as a set.
    #[test]
    fn series_identity() {
        let cached = &[("line", "3"), ("site", "a")];
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[("line", "3"), ("site", "a")], true),
            (&[("site", "a"), ("line", "3")], true),
            (&[("site", "a"), ("line", "4")], false),
            (&[("site", "a")], false),
            (&[], false),
            (&[("site", "a"), ("site", "a")], false),
            (&[("site", "b"), ("line", "3"), ("site", "a")], true),
            (&[("site", "a"), ("line", "3"), ("zone", "1")], false),
        ];
        let index = SeriesIndex::default();
        let key = |tags: &[(&str, &str)]| index.slots(&[record("d", "s", tags)])[0];
        for (given, want) in cases {
            assert_eq!(key(given) == key(cached), *want, "{given:?}");
        }
        let slots = index.slots(&[record("a", "b.c", &[]), record("a.b", "c", &[])]);
        assert_ne!(slots[0], slots[1]);
        let cache = SeriesCache::default();
        assert_ne!(cache.unit(None), cache.unit(Some("")));
    }

    #[test]
    fn readings_differing_only_in_a_tag_are_two_series() {
        let cache = SeriesCache::default();
        let cpu = |cpu: &str| record("h1", "cpu.usage_idle", &[("cpu", cpu), ("host", "h1")]);
        let batch = [cpu("cpu0"), cpu("cpu1"), cpu("cpu0")];
        let plan = cache.plan(&batch).unwrap();
        assert_eq!(plan.pending.len(), 2);
        assert_eq!(plan.pending[1].tags_json, r#"{"cpu":"cpu1","host":"h1"}"#);
    }

    /// A committed series is resolved from the cache next time, unless its id does not fit
    /// the entry: then it stays pending (looked up each time), never wrongly resolved.
    #[test]
    fn remembered_series_resolve_unless_their_id_is_too_large() {
        let speed = |device: &str| record(device, "speed", &[]);
        let cache = SeriesCache::default();
        let batch = [speed("small"), speed("large")];
        let plan = cache.plan(&batch).unwrap();
        let resolved = [7, i64::from(u32::MAX) + 1].map(|id| Resolved {
            id,
            unit: None,
            created: true,
        });
        cache.remember(&plan.pending, &resolved).unwrap();
        let plan = cache.plan(&batch).unwrap();
        assert!(matches!(plan.refs[0], SeriesRef::Id(7)));
        assert!(matches!(plan.refs[1], SeriesRef::Pending(0)));
        assert_eq!(std::mem::size_of::<Cached>(), 8);
    }

    /// Series the index has no slot for (past its capacity) are never cached: they are
    /// looked up on every write, and each keeps its own id.
    #[test]
    fn series_without_a_slot_are_resolved_every_time() {
        let speed = |device: &str| record(device, "speed", &[]);
        let cache = SeriesCache {
            index: Arc::new(SeriesIndex::with_limit(1)),
            ..SeriesCache::default()
        };
        let batch = [speed("a"), speed("b"), speed("c"), speed("b")];
        let plan = cache.plan(&batch).unwrap();
        assert_eq!(plan.pending.len(), 3, "b twice is one pending series");
        assert!(matches!(plan.refs[3], SeriesRef::Pending(1)));
        let resolved = [1, 2, 3].map(|id| Resolved {
            id,
            unit: None,
            created: true,
        });
        cache.remember(&plan.pending, &resolved).unwrap();
        let plan = cache.plan(&batch).unwrap();
        assert!(matches!(plan.refs[0], SeriesRef::Id(1)));
        assert!(matches!(plan.refs[1], SeriesRef::Pending(0)));
        assert!(matches!(plan.refs[2], SeriesRef::Pending(1)));
        assert!(matches!(plan.refs[3], SeriesRef::Pending(0)));
        assert_eq!(plan.pending.len(), 2);
        assert_eq!(plan.pending[1].device.as_str(), "c");
    }

    #[test]
    fn buckets_start_at_or_before_their_readings() {
        use crate::Resolution::{Hour, Minute};
        let cases = [
            (Minute, 0, 0),
            (Minute, 59_999_999, 0),
            (Minute, 60_000_000, 60_000_000),
            (Minute, -1, -60_000_000),
            (Minute, 1_771_149_659_000_001, 1_771_149_600_000_000),
            (Hour, 3_599_999_999, 0),
            (Hour, -1, -3_600_000_000),
            (Hour, 1_771_153_199_999_999, 1_771_149_600_000_000),
        ];
        for (resolution, ts, want) in cases {
            assert_eq!(resolution.start_of(ts), want, "{resolution:?} {ts}");
        }
        for resolution in [Minute, Hour] {
            for ts in [MIN_TS_MICROS, MAX_TS_MICROS] {
                let start = resolution.start_of(ts);
                assert!(start <= ts && ts - start < resolution.micros());
                assert_eq!(start % resolution.micros(), 0);
            }
        }
    }

    #[test]
    fn tags_json_round_trip() {
        let tags = t(&[("line", "3"), ("site", "a\"b")]);
        assert_eq!(tags_from_json(&tags_to_json(&tags)), tags);
        assert_eq!(tags_to_json(&[]), "{}");
        assert!(tags_from_json("[1]").is_empty());
    }
}
