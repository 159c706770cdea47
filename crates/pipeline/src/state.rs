//! The latest-state KV bucket: key `<device>.<sensor>`, value a small JSON document.

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
}

impl StateValue {
    pub fn from_reading(r: &Reading) -> Self {
        StateValue {
            value: r.value,
            ts: r.ts.as_micros(),
            unit: r.unit.clone(),
            quality: r.quality.clone(),
            tags: r.tags.iter().cloned().collect(),
        }
    }

    pub fn timestamp(&self) -> Timestamp {
        Timestamp::from_micros(self.ts)
    }
}

/// The KV key of a device's sensor. Device ids and sensor tokens are restricted by the
/// wire contract to characters valid in KV keys.
pub fn key(device: &str, sensor: &str) -> String {
    format!("{device}.{sensor}")
}

/// Splits a key back into device and sensor (the sensor may contain dots).
pub fn split_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('.')
}
