//! The embedded store's encoding of a run of one series' readings: a few bytes a reading
//! instead of a B-tree row.
//!
//! A chunk holds points sorted by `(ts, seq)`, column after column:
//! * the count, then timestamps as delta-of-delta (regular sampling costs one byte a
//!   point), sequences as deltas, both zigzag LEB128 varints;
//! * values as the XOR with the previous value's bits, byte-aligned: a 0 byte when
//!   unchanged, otherwise a control byte (leading zero bytes, significant bytes) and the
//!   significant bytes (Gorilla's idea, at byte granularity: simpler, and decoding never
//!   shifts across bytes);
//! * quality flags, which few readings carry, as a count and `(index, text)` pairs.
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

/// Encodes `points`, which must be sorted by `(ts, seq)` (not checked: any order
/// round-trips, sorted order compresses).
pub(crate) fn encode(points: &[Pt]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + points.len() * 5);
    put_uvarint(&mut out, points.len() as u64);
    let (mut prev_ts, mut prev_delta) = (0i64, 0i64);
    for (i, p) in points.iter().enumerate() {
        match i {
            0 => put_ivarint(&mut out, p.ts),
            1 => {
                prev_delta = p.ts.wrapping_sub(prev_ts);
                put_ivarint(&mut out, prev_delta);
            }
            _ => {
                let delta = p.ts.wrapping_sub(prev_ts);
                put_ivarint(&mut out, delta.wrapping_sub(prev_delta));
                prev_delta = delta;
            }
        }
        prev_ts = p.ts;
    }
    let mut prev_seq = 0i64;
    for p in points {
        put_ivarint(&mut out, p.seq.wrapping_sub(prev_seq));
        prev_seq = p.seq;
    }
    let mut prev_bits = 0u64;
    for p in points {
        let bits = p.value.to_bits();
        let x = bits ^ prev_bits;
        prev_bits = bits;
        if x == 0 {
            out.push(0);
            continue;
        }
        let lead = x.leading_zeros() / 8;
        let trail = x.trailing_zeros() / 8;
        let len = 8 - lead - trail;
        // `len` is 1..=8 and `lead` 0..=7, so the control byte is never 0.
        out.push(((lead as u8) << 4) | len as u8);
        let bytes = (x >> (trail * 8)).to_le_bytes();
        out.extend_from_slice(&bytes[..len as usize]);
    }
    let flagged = points.iter().filter(|p| p.quality.is_some()).count();
    put_uvarint(&mut out, flagged as u64);
    for (i, p) in points.iter().enumerate() {
        if let Some(q) = &p.quality {
            put_uvarint(&mut out, i as u64);
            put_uvarint(&mut out, q.len() as u64);
            out.extend_from_slice(q.as_bytes());
        }
    }
    out
}

/// Decodes a chunk, appending its points to `out`.
pub(crate) fn decode_into(data: &[u8], out: &mut Vec<Pt>) -> Result<()> {
    let mut r = Reader { data, at: 0 };
    let n = r.uvarint()?;
    // Every point takes at least three bytes (timestamp, sequence, value).
    if n > (data.len() as u64) / 3 + 1 {
        return Err(corrupt("count larger than the chunk"));
    }
    let n = n as usize;
    let base = out.len();
    out.reserve(n);
    let (mut ts, mut delta) = (0i64, 0i64);
    for i in 0..n {
        let v = r.ivarint()?;
        match i {
            0 => ts = v,
            1 => {
                delta = v;
                ts = ts.wrapping_add(delta);
            }
            _ => {
                delta = delta.wrapping_add(v);
                ts = ts.wrapping_add(delta);
            }
        }
        out.push(Pt {
            ts,
            seq: 0,
            value: 0.0,
            quality: None,
        });
    }
    let mut seq = 0i64;
    for p in &mut out[base..] {
        seq = seq.wrapping_add(r.ivarint()?);
        p.seq = seq;
    }
    let mut bits = 0u64;
    for p in &mut out[base..] {
        let control = r.byte()?;
        if control != 0 {
            let (lead, len) = (u32::from(control >> 4), u32::from(control & 0x0f));
            if len == 0 || len > 8 || lead + len > 8 {
                return Err(corrupt("bad value control byte"));
            }
            let trail = 8 - lead - len;
            let mut bytes = [0u8; 8];
            bytes[..len as usize].copy_from_slice(r.take(len as usize)?);
            bits ^= u64::from_le_bytes(bytes) << (trail * 8);
        }
        p.value = f64::from_bits(bits);
    }
    let flagged = r.uvarint()?;
    if flagged > n as u64 {
        return Err(corrupt("more quality flags than points"));
    }
    for _ in 0..flagged {
        let i = r.uvarint()?;
        let len = r.uvarint()?;
        let text = r.take(usize::try_from(len).map_err(|_| corrupt("quality length"))?)?;
        let text = std::str::from_utf8(text).map_err(|_| corrupt("quality is not UTF-8"))?;
        let p = usize::try_from(i)
            .ok()
            .and_then(|i| out.get_mut(base + i).filter(|_| i < n))
            .ok_or_else(|| corrupt("quality index out of range"))?;
        p.quality = Some(text.to_string());
    }
    if r.at != data.len() {
        return Err(corrupt("trailing bytes"));
    }
    Ok(())
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
        for cut in 0..data.len() {
            assert!(decode(&data[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = data.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
        // A huge count in a tiny blob is refused before anything is reserved.
        assert!(decode(&[0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
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
