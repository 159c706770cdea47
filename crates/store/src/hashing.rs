//! Hashing helpers for the per-reading hot paths: maps keyed by series fingerprints, and a
//! memo that hashes a series once per run of readings sharing its names.
//!
//! A series fingerprint is a randomly keyed SipHash of `(device, sensor, tags)`, already
//! uniformly distributed, so hashing it again to place it in a `HashMap` only costs time:
//! [`PrehashedMap`] uses its bits as they are. Only keys that are such hashes may go in one
//! (not ids, counters or anything a device chooses).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use fleetpipe_proto::{Name, Reading};

/// A hasher that passes on `u64` keys that are already random (keyed hashes); a tuple of
/// them is folded.
#[derive(Debug, Default, Clone, Copy)]
pub struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = self.0.rotate_left(29) ^ n;
    }

    /// Not used by the keys this is meant for; folds the bytes so any key still works.
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
    }
}

/// A map keyed by series fingerprints (see the module docs).
pub type PrehashedMap<K, V> = HashMap<K, V, BuildHasherDefault<Prehashed>>;

/// A set of series fingerprints (see the module docs).
pub type PrehashedSet<K> = HashSet<K, BuildHasherDefault<Prehashed>>;

/// Slots of a [`SeriesMemo`]: a line-protocol message names a handful of sensors.
const MEMO_SLOTS: usize = 16;

/// Remembers the fingerprint of the series of recent readings by the identity of their
/// names and tags: the readings of one message share their device name, their sensor
/// names and (per line) their tags, so a run of them is hashed once, not once a reading.
///
/// Identity is only meaningful while the readings are alive: the memo borrows the readings
/// it has seen for `'a`, so none of their names can be freed and its address reused by
/// another name while the memo exists.
pub struct SeriesMemo<'a, K> {
    slots: [Option<(&'a Reading, K)>; MEMO_SLOTS],
}

impl<'a, K: Copy> Default for SeriesMemo<'a, K> {
    fn default() -> Self {
        SeriesMemo {
            slots: [None; MEMO_SLOTS],
        }
    }
}

impl<'a, K: Copy> SeriesMemo<'a, K> {
    /// The fingerprint of `r`'s series: remembered when a reading sharing its names and
    /// tags came shortly before, else `compute(r)`.
    pub fn key(&mut self, r: &'a Reading, compute: impl FnOnce(&Reading) -> K) -> K {
        let slot = (r.sensor.as_ptr() as usize >> 4) % MEMO_SLOTS;
        if let Some((seen, key)) = self.slots[slot] {
            if Name::ptr_eq(&seen.sensor, &r.sensor)
                && Name::ptr_eq(&seen.device, &r.device)
                && Arc::ptr_eq(&seen.tags, &r.tags)
            {
                return key;
            }
        }
        let key = compute(r);
        self.slots[slot] = Some((r, key));
        key
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use fleetpipe_proto::Timestamp;

    use super::*;

    fn reading(device: &Name, sensor: &Name, tags: &fleetpipe_proto::Tags) -> Reading {
        Reading {
            device: device.clone(),
            sensor: sensor.clone(),
            value: 1.0,
            ts: Timestamp::from_micros(0),
            unit: None,
            quality: None,
            tags: tags.clone(),
        }
    }

    #[test]
    fn the_memo_hashes_a_series_once_per_shared_names_and_never_confuses_two() {
        let (d, s, t) = (Name::from("d1"), Name::from("speed"), Arc::from(vec![]));
        // Equal text in other allocations: another run, hashed again, same fingerprint.
        let (d2, s2) = (Name::from("d1"), Name::from("speed"));
        let other_tags: fleetpipe_proto::Tags = Arc::from(vec![("k".into(), "v".into())]);
        let readings = [
            reading(&d, &s, &t),
            reading(&d, &s, &t),
            reading(&d2, &s2, &t),
            reading(&d, &s, &other_tags),
            reading(&d, &s, &t),
        ];
        let hasher = std::collections::hash_map::RandomState::new();
        let mut computed = 0;
        let mut memo = SeriesMemo::default();
        let keys: Vec<u64> = readings
            .iter()
            .map(|r| {
                memo.key(r, |r| {
                    computed += 1;
                    hasher.hash_one((&r.device, &r.sensor, &r.tags))
                })
            })
            .collect();
        assert_eq!(
            computed, 4,
            "the second reading shares the first's names and tags"
        );
        assert_eq!(keys[0], keys[1]);
        assert_eq!(keys[0], keys[2], "the same text is the same series");
        assert_ne!(keys[0], keys[3], "other tags are another series");
        assert_eq!(keys[0], keys[4]);
    }

    #[test]
    fn prehashed_maps_take_fingerprints_and_tuples_of_them() {
        let mut map: PrehashedMap<(u64, u64), u32> = PrehashedMap::default();
        let mut set: PrehashedSet<u64> = PrehashedSet::default();
        for i in 0..10_000u64 {
            let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            map.insert((h, !h), i as u32);
            set.insert(h);
        }
        assert_eq!(map.len(), 10_000);
        assert_eq!(set.len(), 10_000);
        let h = 77u64.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        assert_eq!(map.get(&(h, !h)), Some(&77));
    }
}
