//! One dense index of the series a process has seen, shared by everything that keeps a
//! little state per series: the store's cache of series ids and the collector's
//! latest-state revisions keep theirs in vectors indexed by it, so a series costs one hash
//! table entry in the process, not one per table (at 2.6 million series, each hash table
//! held about 40 % of free slots on top of its entries, and briefly twice that while it
//! grew).
//!
//! A series is identified by a 128-bit fingerprint of `(device, sensor, canonical tags)`
//! under keys drawn at random for each process (SipHash-1-3): devices choose their names
//! but cannot compute a collision without the keys, and an accidental one among billions
//! of series has a probability below 10⁻¹⁸. Slots are handed out in the order series are
//! first seen, from 0, and never reused; they mean nothing outside the process.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};

use fleetpipe_proto::{canonical_tags, Reading, Tags};
use siphasher::sip128::{Hasher128, SipHasher13};

use crate::hashing::{PrehashedMap, SeriesMemo};
use crate::Record;

/// Where one series is in a [`SeriesIndex`]. As a map key it tells two series apart by
/// their slot, and hashes as its random [`SeriesSlot::hash`], fit for a [`PrehashedMap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeriesSlot {
    slot: u32,
    /// 64 bits of the series' fingerprint: random, so fit for a [`PrehashedMap`] key.
    pub hash: u64,
}

impl Hash for SeriesSlot {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl SeriesSlot {
    /// The series' position in vectors indexed by the index; `None` once the index is
    /// full ([`SeriesIndex::CAPACITY`] series), when callers keep nothing for it.
    pub fn index(&self) -> Option<usize> {
        (self.slot != FULL).then_some(self.slot as usize)
    }
}

/// The slot of a series seen after the index filled up.
const FULL: u32 = u32::MAX;

/// A fingerprint as four 32-bit words: with its `u32` slot a map entry is 20 bytes, where
/// a `u128` key (16-byte aligned) would pad it to 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint([u32; 4]);

impl Hash for Fingerprint {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash64());
    }
}

impl Fingerprint {
    /// Its first 64 bits, already random (see [`crate::hashing`]).
    fn hash64(&self) -> u64 {
        u64::from(self.0[0]) | (u64::from(self.0[1]) << 32)
    }
}

/// Shards of a [`SeriesIndex`]: each grows on its own, so growing one holds a sixteenth
/// of the table twice for a moment (the old and the new), not all of it; and fetch
/// workers and writers rarely wait for one another.
const SHARDS: usize = 16;

/// Series → dense slot, for one process (see the module docs).
#[derive(Debug)]
pub struct SeriesIndex {
    // Std mutexes: taken per series looked up, never across an await.
    shards: [Mutex<PrehashedMap<Fingerprint, u32>>; SHARDS],
    /// The next slot to hand out.
    next: AtomicU32,
    keys: (u64, u64),
    /// Slots handed out at most: [`SeriesIndex::CAPACITY`] but in tests.
    limit: u32,
}

impl Default for SeriesIndex {
    fn default() -> Self {
        // Two outputs of std's randomly keyed SipHash: unpredictable without its keys.
        let random = RandomState::new();
        SeriesIndex {
            shards: Default::default(),
            next: AtomicU32::new(0),
            keys: (random.hash_one(1u8), random.hash_one(2u8)),
            limit: FULL,
        }
    }
}

impl SeriesIndex {
    /// Most series an index holds; later ones get no slot ([`SeriesSlot::index`] is
    /// `None`). Far beyond what a process's memory holds anyway.
    pub const CAPACITY: usize = FULL as usize;

    /// The slot of each record's series, in order, giving new series the next slots.
    pub fn slots(&self, records: &[Record]) -> Vec<SeriesSlot> {
        let mut memo = SeriesMemo::default();
        records
            .iter()
            .map(|rec| memo.key(&rec.reading, |r| self.slot(self.fingerprint(r))))
            .collect()
    }

    fn slot(&self, fp: Fingerprint) -> SeriesSlot {
        // Bits the shard's map does not hash with.
        let shard = &self.shards[fp.0[2] as usize % SHARDS];
        // Entries are only ever inserted whole, so a panic elsewhere under the lock
        // cannot leave the map inconsistent.
        let mut map = shard.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = match map.get(&fp) {
            Some(&slot) => slot,
            None => match self
                .next
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < self.limit).then_some(n + 1)
                }) {
                Ok(slot) => {
                    map.insert(fp, slot);
                    slot
                }
                Err(_) => FULL,
            },
        };
        SeriesSlot {
            slot,
            hash: fp.hash64(),
        }
    }

    /// An index that hands out at most `limit` slots, to test what happens past
    /// [`SeriesIndex::CAPACITY`].
    #[cfg(test)]
    pub(crate) fn with_limit(limit: u32) -> Self {
        SeriesIndex {
            limit,
            ..SeriesIndex::default()
        }
    }

    /// Series with a slot so far.
    pub fn len(&self) -> usize {
        self.next.load(Ordering::Relaxed) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn fingerprint(&self, r: &Reading) -> Fingerprint {
        let mut h = SipHasher13::new_with_keys(self.keys.0, self.keys.1);
        (r.device.as_str(), r.sensor.as_str(), &*canonical(&r.tags)).hash(&mut h);
        let n = h.finish128().as_u128();
        Fingerprint([
            n as u32,
            (n >> 32) as u32,
            (n >> 64) as u32,
            (n >> 96) as u32,
        ])
    }
}

/// `tags` in canonical form, without a copy when they already are (the decoder's are).
pub(crate) fn canonical(tags: &Tags) -> Tags {
    if tags.windows(2).all(|w| w[0].0 < w[1].0) {
        tags.clone()
    } else {
        canonical_tags(tags)
    }
}

/// A vector indexed by [`SeriesSlot`]: one `T` per series the process has seen, `empty`
/// for those it holds nothing of yet. Grows to the highest slot stored.
#[derive(Debug)]
pub struct BySlot<T: Copy> {
    items: Vec<T>,
    empty: T,
}

impl<T: Copy + PartialEq> BySlot<T> {
    pub fn new(empty: T) -> Self {
        BySlot {
            items: Vec::new(),
            empty,
        }
    }

    /// What is kept for the series, if anything.
    pub fn get(&self, slot: SeriesSlot) -> Option<T> {
        let item = *self.items.get(slot.index()?)?;
        (item != self.empty).then_some(item)
    }

    /// Keeps `item` for the series (nothing when it has no slot).
    pub fn set(&mut self, slot: SeriesSlot, item: T) {
        let Some(i) = slot.index() else {
            return;
        };
        if i >= self.items.len() {
            self.items.resize(i + 1, self.empty);
        }
        self.items[i] = item;
    }
}

/// A reading of `device`'s `sensor` with `tags`, for tests of series identity.
#[cfg(test)]
pub(crate) fn record(device: &str, sensor: &str, tags: &[(&str, &str)]) -> Record {
    Record {
        seq: 1,
        reading: Reading {
            device: device.into(),
            sensor: sensor.into(),
            value: 1.0,
            ts: fleetpipe_proto::Timestamp::from_micros(0),
            unit: None,
            quality: None,
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
                .into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_slot_per_series_dense_and_stable() {
        let index = SeriesIndex::default();
        let batch = [
            record("d1", "speed", &[]),
            record("d1", "speed", &[("line", "3"), ("site", "a")]),
            // The same tags in another order: the same series.
            record("d1", "speed", &[("site", "a"), ("line", "3")]),
            // Only one tag value differs: another series.
            record("d1", "speed", &[("line", "4"), ("site", "a")]),
            record("d1", "speed", &[]),
            // Names cannot trade bytes.
            record("d1.s", "peed", &[]),
        ];
        let slots = index.slots(&batch);
        let indices: Vec<_> = slots.iter().map(|s| s.index().unwrap()).collect();
        assert_eq!(indices, [0, 1, 1, 2, 0, 3]);
        assert_eq!(slots[1].hash, slots[2].hash);
        assert_ne!(slots[0].hash, slots[3].hash);
        assert_eq!(index.len(), 4);
        // A later batch finds the same slots, in new allocations of the same text.
        let again = index.slots(&[record("d1.s", "peed", &[]), record("d2", "speed", &[])]);
        assert_eq!(again[0], slots[5]);
        assert_eq!(again[1].index(), Some(4));
        // Another process (index) fingerprints under other keys.
        let other = SeriesIndex::default();
        assert_ne!(other.slots(&batch[..1])[0].hash, slots[0].hash);
        assert_eq!(std::mem::size_of::<(Fingerprint, u32)>(), 20);
    }

    #[test]
    fn by_slot_keeps_one_item_per_series_and_nothing_without_a_slot() {
        let index = SeriesIndex::default();
        let slots = index.slots(&[record("a", "s", &[]), record("b", "s", &[])]);
        let mut v = BySlot::new(0u64);
        assert_eq!(v.get(slots[1]), None);
        v.set(slots[1], 7);
        assert_eq!(v.get(slots[1]), Some(7));
        assert_eq!(v.get(slots[0]), None);
        let unplaced = SeriesSlot {
            slot: FULL,
            hash: 1,
        };
        v.set(unplaced, 9);
        assert_eq!(v.get(unplaced), None);
        assert_eq!(v.items.len(), 2, "no room made for a series without a slot");
    }

    /// Past its capacity the index hands out no slots but still tells series apart by
    /// their hash, and keeps the slots it gave.
    #[test]
    fn a_full_index_gives_no_slot_and_keeps_the_ones_it_gave() {
        let index = SeriesIndex::with_limit(2);
        let slots = index.slots(&[
            record("a", "s", &[]),
            record("b", "s", &[]),
            record("c", "s", &[]),
            record("d", "s", &[]),
            record("a", "s", &[]),
        ]);
        let indices: Vec<_> = slots.iter().map(|s| s.index()).collect();
        assert_eq!(indices, [Some(0), Some(1), None, None, Some(0)]);
        assert_ne!(slots[2], slots[3], "two series without a slot stay two");
        assert_eq!(slots[2], index.slots(&[record("c", "s", &[])])[0]);
        assert_eq!(index.len(), 2);
    }
}
