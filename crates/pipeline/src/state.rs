//! The latest-state KV bucket: one key per series, value a small JSON document.
//!
//! The key is `<device>.<sensor>` for a series without tags (`4613.speed`, the reference
//! design's), and `<device>.<sensor>.=<hash>` for one with tags, `<hash>` being 16 hex
//! digits of a stable 64-bit hash of its canonical tags (`h1.cpu.usage_idle.=9f…`): tag
//! values may hold characters KV keys cannot, and `=` cannot start a sensor token, so the
//! two forms never meet. The tags themselves are in the value.

use std::collections::BTreeMap;

use fleetpipe_proto::{Reading, Timestamp};
use serde::{Deserialize, Serialize};

/// The value stored under `<device>.<sensor>` in the state bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateValue {
    pub value: f64,
    /// Microseconds since the Unix epoch.
    pub ts: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<String>,
    /// Template tags (`site`, `line`…) and line-protocol tags of the reading.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Telemetry stream sequence of the message that carried the reading: orders two
    /// readings with the same timestamp. 0 when unknown.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub seq: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl StateValue {
    pub fn from_reading(r: &Reading) -> Self {
        StateValue {
            value: r.value,
            ts: r.ts.as_micros(),
            unit: r.unit.clone(),
            quality: r.quality.clone(),
            tags: r.tags.iter().cloned().collect(),
            seq: 0,
        }
    }

    pub fn timestamp(&self) -> Timestamp {
        Timestamp::from_micros(self.ts)
    }
}

/// The KV key of a series (see the module docs). Device ids and sensor tokens are
/// restricted by the wire contract to characters valid in KV keys; `tags` are canonical
/// (sorted by name), as readings carry them.
pub fn key(device: &str, sensor: &str, tags: &[(String, String)]) -> String {
    if tags.is_empty() {
        format!("{device}.{sensor}")
    } else {
        format!("{device}.{sensor}.={:016x}", tags_hash(tags))
    }
}

/// Splits a key into the device and the series within it: the sensor, followed by
/// `.=<hash>` when the series has tags. The series part is unique within the device.
pub fn split_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('.')
}

/// The sensor of a series part as [`split_key`] returns it.
pub fn sensor_of(series: &str) -> &str {
    match series.find(".=") {
        Some(i) => &series[..i],
        None => series,
    }
}

/// How people see a series of a device: its sensor, followed by its tags when it has any,
/// Prometheus style (`cpu.usage_idle{cpu=cpu0,host=h1}`); `\ , = { }` inside a name or
/// value are escaped with `\`, so a label parses back. Names snapshot values, the API's
/// sensor keys and the CLI's output.
pub fn label<'a>(sensor: &str, tags: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut tags = tags.into_iter().peekable();
    if tags.peek().is_none() {
        return sensor.to_string();
    }
    let mut out = sensor.to_string();
    out.push_str(&tag_set(tags));
    out
}

/// A tag set as written in a label: `{k=v,k2=v2}` (in the order given; canonical tags are
/// sorted by name), `{}` for none.
pub fn tag_set<'a>(tags: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::from("{");
    for (i, (k, v)) in tags.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        escape_into(&mut out, k);
        out.push('=');
        escape_into(&mut out, v);
    }
    out.push('}');
    out
}

/// Characters escaped in labels.
pub const LABEL_ESCAPED: &[char] = &['\\', ',', '=', '{', '}'];

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        if LABEL_ESCAPED.contains(&c) {
            out.push('\\');
        }
        out.push(c);
    }
}

/// FNV-1a over the tags, names and values each followed by a 0xff byte (which UTF-8 text
/// never holds): stable across processes and releases, unlike std's randomly keyed
/// hashers, so every collector computes the same key. A device can make two of its own
/// tag sets collide, but only its own: the device id is part of the key.
fn tags_hash(tags: &[(String, String)]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut h = OFFSET;
    for (k, v) in tags {
        for b in k.bytes().chain([0xff]).chain(v.bytes()).chain([0xff]) {
            h = (h ^ u64::from(b)).wrapping_mul(PRIME);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn keys() {
        assert_eq!(key("4613", "speed", &[]), "4613.speed");
        let cpu0 = key(
            "h1",
            "cpu.usage_idle",
            &t(&[("cpu", "cpu0"), ("host", "h1")]),
        );
        let cpu1 = key(
            "h1",
            "cpu.usage_idle",
            &t(&[("cpu", "cpu1"), ("host", "h1")]),
        );
        assert_ne!(cpu0, cpu1);
        // Stable: the same in every process and release.
        assert_eq!(cpu0, "h1.cpu.usage_idle.=3336231c4568dc30");
        // Names and values cannot trade bytes.
        assert_ne!(
            key("d", "s", &t(&[("ab", "c")])),
            key("d", "s", &t(&[("a", "bc")]))
        );
        let (device, series) = split_key(&cpu0).unwrap();
        assert_eq!((device, sensor_of(series)), ("h1", "cpu.usage_idle"));
        assert_eq!(sensor_of("spindle.vibration.rms"), "spindle.vibration.rms");
        let tags: BTreeMap<String, String> =
            t(&[("host", "h1"), ("cpu", "cpu0")]).into_iter().collect();
        let pairs = tags.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        assert_eq!(
            label("cpu.usage_idle", pairs),
            "cpu.usage_idle{cpu=cpu0,host=h1}"
        );
        assert_eq!(label("speed", []), "speed");
        assert_eq!(label("s", [("a,b", "c=d{}\\")]), r"s{a\,b=c\=d\{\}\\}");
        for k in [cpu0, key("d", "s", &t(&[("k", "v with spaces/and.dots")]))] {
            assert!(k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_=./".contains(&b)));
        }
    }
}
