//! The embedded store's encoding of a run of one series' readings: a few bytes a reading
//! instead of a B-tree row.
//!
//! A chunk is a stream of points sorted by `(ts, seq)`, each encoded against the one
//! before it (Gorilla's idea, at byte granularity: simpler, and decoding never shifts
//! across bytes):
//! * the timestamp as delta-of-delta (regular sampling costs one byte), the sequence as a
//!   delta, both zigzag LEB128 varints;
//! * the value as the XOR with the previous value's bits: a 0 byte when unchanged,
//!   otherwise a control byte (leading zero bytes, significant bytes) and the significant
//!   bytes; the control byte's top bit says a quality flag follows (length and text).
//!
//! The stream has no header: a chunk is extended by appending the encoding of newer
//! points, given the [`State`] its last point left (kept next to the chunk), without
//! decoding it. The count is kept next to it too.
//!
//! Decoding checks every length against the input, so a damaged blob is an error, never a
//! panic or an allocation larger than the blob implies.

use crate::{Result, StoreError};

/// One stored reading of a series.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Pt {
    pub ts: i64,
    pub seq: i64,
    pub value: f64,
    pub quality: Option<String>,
}

impl Pt {
    pub(crate) fn key(&self) -> (i64, i64) {
        (self.ts, self.seq)
    }
}

/// What encoding the next point needs of the points before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct State {
    pub ts: i64,
    pub delta: i64,
    pub seq: i64,
    pub bits: u64,
}

/// Set in a value's control byte when a quality flag follows.
const QUALITY: u8 = 0x80;

/// Encodes `points` (sorted by `(ts, seq)`: any order round-trips, sorted compresses) as
/// a new chunk.
pub(crate) fn encode(points: &[Pt]) -> Vec<u8> {
    let mut out = Vec::with_capacity(points.len() * 5);
    let mut state = State::default();
    append(&mut state, points, &mut out);
    out
}

/// Appends the encoding of `points` to `out`, continuing from `state` (that of the
/// chunk's last point, or the default for a new chunk), and advances it.
pub(crate) fn append(state: &mut State, points: &[Pt], out: &mut Vec<u8>) {
    for p in points {
        let delta = p.ts.wrapping_sub(state.ts);
        put_ivarint(out, delta.wrapping_sub(state.delta));
        put_ivarint(out, p.seq.wrapping_sub(state.seq));
        let bits = p.value.to_bits();
        let x = bits ^ state.bits;
        let flag = if p.quality.is_some() { QUALITY } else { 0 };
        if x == 0 {
            out.push(flag);
        } else {
            let lead = x.leading_zeros() / 8;
            let trail = x.trailing_zeros() / 8;
            let len = 8 - lead - trail;
            // `len` is 1..=8 and `lead` 0..=7: never 0, and the top bit stays free.
            out.push(flag | ((lead as u8) << 4) | len as u8);
            let bytes = (x >> (trail * 8)).to_le_bytes();
            out.extend_from_slice(&bytes[..len as usize]);
        }
        if let Some(q) = &p.quality {
            put_uvarint(out, q.len() as u64);
            out.extend_from_slice(q.as_bytes());
        }
        *state = State {
            ts: p.ts,
            delta,
            seq: p.seq,
            bits,
        };
    }
}

/// Decodes a chunk, appending its points to `out`; returns the state after its last.
pub(crate) fn decode_into(data: &[u8], out: &mut Vec<Pt>) -> Result<State> {
    let mut r = Reader { data, at: 0 };
    let mut s = State::default();
    while r.at < data.len() {
        let delta = s.delta.wrapping_add(r.ivarint()?);
        let ts = s.ts.wrapping_add(delta);
        let seq = s.seq.wrapping_add(r.ivarint()?);
        let control = r.byte()?;
        let mut bits = s.bits;
        let value_control = control & !QUALITY;
        if value_control != 0 {
            let (lead, len) = (
                u32::from(value_control >> 4),
                u32::from(value_control & 0x0f),
            );
            if len == 0 || len > 8 || lead + len > 8 {
                return Err(corrupt("bad value control byte"));
            }
            let trail = 8 - lead - len;
            let mut bytes = [0u8; 8];
            bytes[..len as usize].copy_from_slice(r.take(len as usize)?);
            bits ^= u64::from_le_bytes(bytes) << (trail * 8);
        }
        let quality = if control & QUALITY != 0 {
            let len = r.uvarint()?;
            let text = r.take(usize::try_from(len).map_err(|_| corrupt("quality length"))?)?;
            let text = std::str::from_utf8(text).map_err(|_| corrupt("quality is not UTF-8"))?;
            Some(text.to_string())
        } else {
            None
        };
        out.push(Pt {
            ts,
            seq,
            value: f64::from_bits(bits),
            quality,
        });
        s = State {
            ts,
            delta,
            seq,
            bits,
        };
    }
    Ok(s)
}

/// Decodes a chunk.
pub(crate) fn decode(data: &[u8]) -> Result<Vec<Pt>> {
    let mut out = Vec::new();
    decode_into(data, &mut out)?;
    Ok(out)
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Task(format!("damaged chunk in the store: {what}"))
}

fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_ivarint(out: &mut Vec<u8>, v: i64) {
    put_uvarint(out, ((v << 1) ^ (v >> 63)) as u64);
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8> {
        let b = *self.data.get(self.at).ok_or_else(|| corrupt("truncated"))?;
        self.at += 1;
        Ok(b)
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(len)
            .filter(|&end| end <= self.data.len())
            .ok_or_else(|| corrupt("truncated"))?;
        let bytes = &self.data[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn uvarint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(corrupt("varint too long"))
    }

    fn ivarint(&mut self) -> Result<i64> {
        let u = self.uvarint()?;
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pt(ts: i64, seq: i64, value: f64) -> Pt {
        Pt {
            ts,
            seq,
            value,
            quality: None,
        }
    }

    #[test]
    fn regular_sampling_is_small() {
        let points: Vec<Pt> = (0..1000)
            .map(|i| pt(1_700_000_000_000_000 + i * 1_000_000, 5000 + i * 7, 20.5))
            .collect();
        let data = encode(&points);
        // A byte each for timestamp, sequence and value.
        assert!(data.len() < 3 * 1000 + 40, "{} bytes", data.len());
        assert_eq!(decode(&data).unwrap(), points);
    }

    #[test]
    fn appending_equals_encoding_at_once() {
        let points: Vec<Pt> = (0..300)
            .map(|i| Pt {
                quality: (i % 7 == 0).then(|| format!("q{i}")),
                ..pt(
                    1_700_000_000_000_000 + i * 1_000_003 + (i % 3),
                    i * 2,
                    (i as f64).sin(),
                )
            })
            .collect();
        let whole = encode(&points);
        for cut in [0, 1, 2, 150, 299, 300] {
            let mut data = encode(&points[..cut]);
            let mut state = decode_into(&data, &mut Vec::new()).unwrap();
            append(&mut state, &points[cut..], &mut data);
            assert_eq!(data, whole, "cut at {cut}");
            assert_eq!(state, decode_into(&whole, &mut Vec::new()).unwrap());
        }
    }

    #[test]
    fn edge_values_round_trip() {
        let mut points: Vec<Pt> = [
            (i64::MIN, 0, f64::MIN_POSITIVE),
            (-1, i64::MAX, -0.0),
            (0, 1, 0.0),
            (1, i64::MIN, f64::MAX),
            (i64::MAX, 3, -f64::MAX),
            (i64::MAX, 3, 1e-300),
        ]
        .into_iter()
        .map(|(ts, seq, v)| pt(ts, seq, v))
        .collect();
        points[2].quality = Some("bad ✓".into());
        points[5].quality = Some(String::new());
        let back = decode(&encode(&points)).unwrap();
        assert_eq!(back.len(), points.len());
        for (a, b) in back.iter().zip(&points) {
            assert_eq!(
                (a.ts, a.seq, a.value.to_bits(), &a.quality),
                (b.ts, b.seq, b.value.to_bits(), &b.quality)
            );
        }
        assert_eq!(decode(&encode(&[])).unwrap(), vec![]);
    }

    #[test]
    fn damage_is_an_error_not_a_panic() {
        let points: Vec<Pt> = (0..50).map(|i| pt(i * 10, i, i as f64 * 1.5)).collect();
        let data = encode(&points);
        // A cut inside a point is an error; at a point's end, fewer points (the count kept
        // next to the chunk tells).
        for cut in 0..data.len() {
            if let Ok(points) = decode(&data[..cut]) {
                assert!(points.len() < 50, "cut at {cut}");
            }
        }
        let mut inside = 0;
        for cut in 0..data.len() {
            inside += usize::from(decode(&data[..cut]).is_err());
        }
        assert!(inside > 50, "most cuts fall inside a point");
        // A varint longer than 64 bits is refused.
        assert!(decode(&[0xff; 11]).is_err());
    }

    proptest! {
        #[test]
        fn any_points_round_trip(
            raw in prop::collection::vec(
                (any::<i64>(), any::<i64>(), any::<u64>(), prop::option::of("[a-z]{0,5}")),
                0..200,
            )
        ) {
            let points: Vec<Pt> = raw
                .into_iter()
                .map(|(ts, seq, bits, quality)| Pt { ts, seq, value: f64::from_bits(bits), quality })
                .collect();
            let back = decode(&encode(&points)).unwrap();
            prop_assert_eq!(back.len(), points.len());
            for (a, b) in back.iter().zip(&points) {
                prop_assert_eq!((a.ts, a.seq, a.value.to_bits(), &a.quality), (b.ts, b.seq, b.value.to_bits(), &b.quality));
            }
        }

        #[test]
        fn any_bytes_decode_or_fail_cleanly(data in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&data);
        }
    }
}
