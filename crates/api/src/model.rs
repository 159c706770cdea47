//! The JSON documents the API returns. The OpenAPI schemas are derived from these types,
//! so the document cannot drift from what the handlers serialize.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One device: the latest value of each of its series (a sensor with one tag set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Device {
    /// The device id: the `{device}` token of its subjects.
    #[schema(example = "v00042")]
    pub id: String,
    /// Time of the device's newest reading (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub last_seen: String,
    /// True when `last_seen` is within the online window (`api.online_window`, 30 s by
    /// default).
    pub online: bool,
    /// Subject-template and line-protocol tags of the device's readings (`site`, `line`…):
    /// every name seen, with the value its latest reading carried. Series are told apart
    /// by their own tags, in `sensors`.
    pub tags: BTreeMap<String, String>,
    /// Series label → latest value. A series without tags is named by its sensor
    /// (`speed`); one with tags by a label, Prometheus style: the sensor and its tags
    /// sorted by name, `cpu.usage_idle{cpu=cpu0,host=h1}` (a `\`, `,`, `=`, `{` or `}` in a
    /// tag name or value is escaped with `\`), and its entry also has `sensor` and
    /// `tags`. Either form is accepted back as the `sensor` of the series endpoint.
    #[schema(example = json!({
        "speed": {"value": 88.5, "ts": "2026-02-15T10:00:00Z", "unit": "km/h"},
        "cpu.usage_idle{cpu=cpu0,host=h1}": {
            "value": 97.5, "ts": "2026-02-15T10:00:00Z", "unit": null,
            "sensor": "cpu.usage_idle", "tags": {"cpu": "cpu0", "host": "h1"}
        }
    }))]
    pub sensors: BTreeMap<String, SensorValue>,
}

/// The latest value of one series.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SensorValue {
    /// The latest reading.
    pub value: f64,
    /// When the value was measured (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub ts: String,
    /// Unit as sent by the device; null when it sent none.
    pub unit: Option<String>,
    /// Quality flag as sent by the device, when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<String>,
    /// The sensor name, for a series with tags (its key in `sensors` is a label); absent
    /// for the series without tags, named by its sensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "cpu.usage_idle")]
    pub sensor: Option<String>,
    /// The series' tags; absent when it has none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(example = json!({"cpu": "cpu0", "host": "h1"}))]
    pub tags: BTreeMap<String, String>,
}

/// A page of devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeviceList {
    /// How many devices match the filters (all pages).
    pub total: u64,
    /// The page size used.
    pub limit: u64,
    /// Devices skipped before this page.
    pub offset: u64,
    /// This page, in the requested order.
    pub items: Vec<Device>,
}

/// Where the points of a series come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SeriesSource {
    /// Raw readings, one point each.
    Raw,
    /// Per-minute rollups, merged into buckets of `step` seconds.
    #[serde(rename = "rollup_1m")]
    Rollup1m,
    /// Hourly rollups, merged into buckets of `step` seconds (a whole number of hours).
    #[serde(rename = "rollup_1h")]
    Rollup1h,
}

/// The history of one series: a sensor of one device, with one tag set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Series {
    /// The device id.
    pub device: String,
    /// The sensor name (without tags, even when asked for by a label).
    pub sensor: String,
    /// The series' tags (`{}` for a series without tags).
    #[schema(example = json!({"cpu": "cpu0", "host": "h1"}))]
    pub tags: BTreeMap<String, String>,
    /// Unit of the series' latest value, when known.
    pub unit: Option<String>,
    /// Where the points come from (the server's choice, see the endpoint's description).
    pub source: SeriesSource,
    /// Start of the range (inclusive, RFC 3339).
    #[schema(format = DateTime)]
    pub from: String,
    /// End of the range (exclusive, RFC 3339).
    #[schema(format = DateTime)]
    pub to: String,
    /// Bucket width in seconds (rollups only): a multiple of 60.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// Oldest first.
    pub points: Vec<SeriesPoint>,
}

/// One point of a series. Raw points have `ts` and `value`; rollup points also have
/// `min`, `max`, `count` and `last`, and `value` is the average.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SeriesPoint {
    /// The reading's time, or the start of the bucket (RFC 3339).
    #[schema(format = DateTime)]
    pub ts: String,
    /// The reading, or the bucket's average.
    pub value: f64,
    /// Smallest reading in the bucket (rollups only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Largest reading in the bucket (rollups only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Readings in the bucket (rollups only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// The value with the latest timestamp in the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<f64>,
}

/// Fleet-wide counts and per-sensor statistics over the latest values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FleetSummary {
    /// Devices in the latest state.
    pub devices: u64,
    /// Devices with a reading within the online window.
    pub online: u64,
    /// `devices - online`.
    pub offline: u64,
    /// Sensor name → statistics over the latest value of every series of it, across
    /// devices and tag sets (the four `cpu.usage_idle` series of a host add four values).
    pub sensors: BTreeMap<String, SensorStats>,
    /// Messages held in the dead-letter stream (or, before the broker has been polled,
    /// dead letters routed by this process).
    pub dead_letters: u64,
}

/// Statistics over the latest values of one sensor across the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SensorStats {
    /// Latest values counted: one per series, so one per device reporting the sensor
    /// unless tags tell several series of it apart on a device.
    pub count: u64,
    /// Smallest latest value.
    pub min: f64,
    /// Mean of the latest values.
    pub avg: f64,
    /// Largest latest value.
    pub max: f64,
}

/// The `data` of a `state` event on the live stream: a series' new latest value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LiveState {
    /// The device id.
    pub device: String,
    /// The sensor name.
    pub sensor: String,
    /// The series' tags; absent for a series without tags. With `sensor`, they give the
    /// series' key in the device's `sensors` (its label).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(example = json!({"cpu": "cpu0", "host": "h1"}))]
    pub tags: BTreeMap<String, String>,
    /// The new latest value.
    pub value: f64,
    /// When it was measured (RFC 3339, UTC).
    #[schema(format = DateTime)]
    pub ts: String,
    /// Unit as sent by the device; null when it sent none.
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<String>,
}

/// The `data` of a `lagged` event: this client read too slowly and missed events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LiveLagged {
    /// Events this client missed.
    pub dropped: u64,
}

/// Liveness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    #[schema(example = "ok")]
    pub status: String,
}

/// Readiness: each dependency's state, and the reason when not ready.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    /// True when every check passes.
    pub ready: bool,
    /// `connected`, `disconnected`, `pending` or `not used`.
    pub nats: String,
    /// `ok`, or why the store did not answer.
    pub store: String,
    /// `ready`, or `loading` while the latest state is being replayed.
    pub index: String,
    /// `ready`, `loading` while the API tokens are being replayed, or `not required`.
    pub tokens: String,
    /// Why the process is not ready (absent when it is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Settings the dashboard needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Info {
    /// fleetpipe version.
    pub version: String,
    /// `sqlite` or `postgres`.
    pub store: String,
    /// Seconds after its newest reading that a device counts as offline.
    pub online_window_s: u64,
    /// Map tile URL template; empty when the map should draw without tiles.
    pub tile_url: String,
}
