//! The JSON documents the API returns. The OpenAPI schemas are derived from these types,
//! so the document cannot drift from what the handlers serialize.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One device: its latest value of every sensor.
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
    /// Subject-template and line-protocol tags of the device's readings (`site`, `line`…).
    pub tags: BTreeMap<String, String>,
    /// Sensor name → latest value.
    pub sensors: BTreeMap<String, SensorValue>,
}

/// The latest value of one sensor.
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
}

/// The history of one sensor of one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Series {
    /// The device id.
    pub device: String,
    /// The sensor name.
    pub sensor: String,
    /// Unit of the sensor's latest value, when known.
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
    /// Sensor name → statistics over the latest value of every device that has it.
    pub sensors: BTreeMap<String, SensorStats>,
    /// Messages held in the dead-letter stream (or, before the broker has been polled,
    /// dead letters routed by this process).
    pub dead_letters: u64,
}

/// Statistics over the latest values of one sensor across the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SensorStats {
    /// Devices reporting this sensor.
    pub count: u64,
    /// Smallest latest value.
    pub min: f64,
    /// Mean of the latest values.
    pub avg: f64,
    /// Largest latest value.
    pub max: f64,
}

/// The `data` of a `state` event on the live stream: a sensor's new latest value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LiveState {
    /// The device id.
    pub device: String,
    /// The sensor name.
    pub sensor: String,
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
