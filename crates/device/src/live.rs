//! The live part of a device's configuration, kept in the KV bucket
//! [`CONFIG_BUCKET`] under the device's id, and what the device reports back.
//!
//! The value is TOML that adjusts sensors the device's own configuration file defines:
//!
//! ```toml
//! [sensors.cpu_temp]
//! enabled = true
//! rate_hz = 2.0        # samples per second
//! deadband = 0.5       # publish only on a change beyond it…
//! heartbeat = "30s"    # …or when this long has passed since the last one
//! ```
//!
//! It cannot add sensors or change their sources: whoever may write the bucket may not run
//! commands or read files on a device. A device refuses a value that does not parse, has a
//! bad setting or names a sensor it does not have, keeps the last good one, and reports the
//! refusal on its status subject ([`status_subject`]).
//!
//! With its own credentials a device reads only its own key: a core subscription on
//! [`config_subject`] tells it of changes, and a direct get ([`direct_get_subject`]) reads
//! the value and its revision (a KV watch is a consumer, which a permission cannot limit
//! to one key).

use std::collections::BTreeMap;
use std::time::Duration;

use fleetpipe_proto::{SubjectError, SubjectTemplate, STATUS_SENSOR};
use serde::{Deserialize, Serialize};

/// The KV bucket of device configurations, key = device id.
pub const CONFIG_BUCKET: &str = "fleetpipe_config";
/// Longest configuration value accepted.
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;
/// Highest sampling rate a sensor may have.
pub const MAX_RATE_HZ: f64 = 1000.0;
/// Longest heartbeat.
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(24 * 3600);

/// The subject a put of `device`'s configuration is published on (core subscription).
pub fn config_subject(device: &str) -> String {
    format!("$KV.{CONFIG_BUCKET}.{device}")
}

/// The JetStream direct-get subject that returns the newest value of `device`'s key.
pub fn direct_get_subject(device: &str) -> String {
    format!(
        "$JS.API.DIRECT.GET.KV_{CONFIG_BUCKET}.{}",
        config_subject(device)
    )
}

/// The subject `device` reports its status on: its sensor [`STATUS_SENSOR`] under the
/// telemetry template (`vehicle.<device>._status`), inside its publish permission.
pub fn status_subject(
    template: &SubjectTemplate,
    device: &str,
    tags: &[(&str, &str)],
) -> Result<String, SubjectError> {
    template.format(device, STATUS_SENSOR, tags)
}

/// A device's live configuration.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LiveConfig {
    /// Settings per sensor name; sensors not named keep their file settings.
    #[serde(default)]
    pub sensors: BTreeMap<String, SensorSettings>,
}

/// What may change about a sensor while the device runs. Unset fields keep the file's.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SensorSettings {
    /// Whether the sensor is sampled at all.
    pub enabled: Option<bool>,
    /// Samples per second, above 0 and at most [`MAX_RATE_HZ`].
    pub rate_hz: Option<f64>,
    /// Publish only when the value moved more than this since the last published one
    /// (0: every sample).
    pub deadband: Option<f64>,
    /// With a deadband, publish at least this often (`"30s"`, `"5m"`).
    pub heartbeat: Option<String>,
}

impl SensorSettings {
    /// The heartbeat as a duration, if set and valid.
    pub fn heartbeat(&self) -> Option<Duration> {
        self.heartbeat
            .as_deref()
            .and_then(|h| humantime::parse_duration(h).ok())
    }
}

impl LiveConfig {
    /// Parses a value without checking the settings (see [`LiveConfig::problems`]).
    pub fn from_toml(text: &str) -> Result<LiveConfig, String> {
        if text.len() > MAX_CONFIG_BYTES {
            return Err(format!(
                "configuration is {} bytes, the limit is {MAX_CONFIG_BYTES}",
                text.len()
            ));
        }
        toml::from_str(text).map_err(|e| e.to_string().trim().replace('\n', " "))
    }

    /// Parses and checks a value, reporting every problem at once.
    pub fn parse(text: &str) -> Result<LiveConfig, Vec<String>> {
        let cfg = LiveConfig::from_toml(text).map_err(|e| vec![e])?;
        let problems = cfg.problems();
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(problems)
        }
    }

    /// Every problem with the values (not whether the sensors exist: only the device knows).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, s) in &self.sensors {
            if let Some(r) = s.rate_hz {
                if !(r > 0.0 && r <= MAX_RATE_HZ) {
                    problems.push(format!(
                        "sensors.{name}.rate_hz must be above 0 and at most {MAX_RATE_HZ}, not {r}"
                    ));
                }
            }
            if let Some(d) = s.deadband {
                if !(d.is_finite() && d >= 0.0) {
                    problems.push(format!(
                        "sensors.{name}.deadband must be 0 or more, not {d}"
                    ));
                }
            }
            if let Some(h) = &s.heartbeat {
                match humantime::parse_duration(h) {
                    Ok(d) if !d.is_zero() && d <= MAX_HEARTBEAT => {}
                    Ok(_) => problems.push(format!(
                        "sensors.{name}.heartbeat must be above 0 and at most 24h, not {h:?}"
                    )),
                    Err(e) => problems.push(format!("sensors.{name}.heartbeat {h:?}: {e}")),
                }
            }
        }
        problems
    }
}

/// What a device publishes on its status subject: the configuration it runs and, when it
/// refused one, which and why.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct DeviceStatus {
    /// The device id.
    pub device: String,
    /// The revision of the KV value in force (0: none, the file's settings alone).
    pub config_revision: u64,
    /// The revision refused last, if the newest value was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_revision: Option<u64>,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_reason: Option<String>,
    /// The device's time of the report, RFC 3339.
    pub at: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_reports_every_problem() {
        let ok = LiveConfig::parse(
            "[sensors.t]\nrate_hz = 2.0\ndeadband = 0.5\nheartbeat = \"30s\"\n[sensors.u]\nenabled = false\n",
        )
        .unwrap();
        assert_eq!(ok.sensors["t"].heartbeat(), Some(Duration::from_secs(30)));
        assert_eq!(ok.sensors["u"].enabled, Some(false));
        let bad =
            LiveConfig::parse("[sensors.t]\nrate_hz = 0\ndeadband = -1\nheartbeat = \"soon\"\n")
                .unwrap_err();
        assert_eq!(bad.len(), 3, "{bad:?}");
        let unknown = LiveConfig::parse("[sensors.t]\nsource = \"command\"\n").unwrap_err();
        assert!(unknown[0].contains("unknown field"), "{unknown:?}");
    }

    #[test]
    fn subjects() {
        assert_eq!(
            direct_get_subject("d-1"),
            "$JS.API.DIRECT.GET.KV_fleetpipe_config.$KV.fleetpipe_config.d-1"
        );
        let t = SubjectTemplate::default();
        assert_eq!(
            status_subject(&t, "d-1", &[]).unwrap(),
            "vehicle.d-1._status"
        );
    }
}
