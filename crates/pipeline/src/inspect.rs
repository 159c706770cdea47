//! Read paths for operators and tests: the latest state and the dead letters.

use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use serde::Serialize;

use crate::collector::headers;
use crate::config::names;
use crate::state::{sensor_of, split_key, StateValue};

/// One series' latest value.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StateEntry {
    pub device: String,
    /// The sensor, without the key's tag hash: a sensor with several tag sets has one
    /// entry per tag set, told apart by `tags`.
    pub sensor: String,
    #[serde(flatten)]
    pub state: StateValue,
}

/// Checks a device id given by an operator before it becomes part of a subject filter or
/// a query: `>`, `*` or `.` in it would widen a filter to other devices.
pub fn check_device(device: &str) -> Result<()> {
    if !fleetpipe_proto::is_valid_token(device) {
        anyhow::bail!(
            "invalid device id {device:?}: a device id is 1 to 128 ASCII letters, digits, \
             '-' and '_'"
        );
    }
    Ok(())
}

/// Checks a sensor name given by an operator: tokens as in a device id, joined by `.`.
pub fn check_sensor(sensor: &str) -> Result<()> {
    if !sensor.split('.').all(fleetpipe_proto::is_valid_token) {
        anyhow::bail!(
            "invalid sensor {sensor:?}: a sensor is one or more tokens of ASCII letters, \
             digits, '-' and '_', joined by '.'"
        );
    }
    Ok(())
}

/// The latest state of every series (of one device, or all), sorted by device, sensor and
/// tags. An invalid device id is an error.
pub async fn latest_state(state: &kv::Store, device: Option<&str>) -> Result<Vec<StateEntry>> {
    let filter = match device {
        Some(d) => {
            check_device(d)?;
            format!("{d}.>")
        }
        None => ">".to_string(),
    };
    // With history: the last value of each key, then changes (which we do not wait for).
    let mut watch = state.watch_with_history(filter).await?;
    let mut out = Vec::new();
    // The watch first replays the last value of each key, the last of them with delta 0;
    // an empty result sends nothing, hence the idle timeout.
    while let Ok(Some(entry)) = tokio::time::timeout(Duration::from_millis(500), watch.next()).await
    {
        let entry = entry?;
        if entry.operation == kv::Operation::Put {
            if let (Some((device, series)), Ok(state)) = (
                split_key(&entry.key),
                serde_json::from_slice::<StateValue>(&entry.value),
            ) {
                out.push(StateEntry {
                    device: device.to_string(),
                    sensor: sensor_of(series).to_string(),
                    state,
                });
            }
        }
        if entry.delta == 0 {
            break;
        }
    }
    out.sort_by(|a, b| {
        (&a.device, &a.sensor, &a.state.tags).cmp(&(&b.device, &b.sensor, &b.state.tags))
    });
    Ok(out)
}

/// One entry of the dead-letter stream.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadLetter {
    /// Sequence in the dead-letter stream.
    pub seq: u64,
    /// Subject the device published on.
    pub subject: String,
    pub codes: Vec<String>,
    pub reason: String,
    pub received: String,
    /// The original payload (lossy UTF-8).
    pub payload: String,
}

/// The newest `limit` dead letters, oldest first.
pub async fn dead_letters(js: &jetstream::Context, limit: usize) -> Result<Vec<DeadLetter>> {
    let mut stream = js.get_stream(names::DLQ_STREAM).await?;
    let info = stream.info().await?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut out = Vec::new();
    if info.state.messages == 0 || limit == 0 {
        return Ok(out);
    }
    let start = last.saturating_sub(limit as u64 - 1).max(first).max(1);
    for seq in start..=last {
        let Ok(msg) = stream.get_raw_message(seq).await else {
            continue; // deleted or aged out
        };
        let header = |name: &str| {
            msg.headers
                .get(name)
                .map(|v| v.as_str().to_string())
                .unwrap_or_default()
        };
        out.push(DeadLetter {
            seq,
            subject: header(headers::SUBJECT),
            codes: header(headers::CODES)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            reason: header(headers::REASON),
            received: header(headers::RECEIVED),
            payload: String::from_utf8_lossy(&msg.payload).into_owned(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_and_sensors_are_checked() {
        for ok in ["4613", "cnc-001", "a_b"] {
            check_device(ok).unwrap();
        }
        for bad in ["", ">", "*", "a.*", "x.y", "a b", "a>"] {
            let e = check_device(bad).unwrap_err().to_string();
            assert!(e.contains("letters, digits, '-' and '_'"), "{e}");
        }
        check_sensor("spindle.vibration.rms").unwrap();
        for bad in ["", "a.", ".a", "cpu.>", "*", "a b"] {
            assert!(check_sensor(bad).is_err(), "{bad:?}");
        }
    }
}
