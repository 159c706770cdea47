//! The agent's configuration: a TOML file, then `FLEETPIPE_AGENT_*` environment variables
//! for the basics, checked in one place that reports every problem.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetpipe_device::live::{LiveConfig, SensorSettings, MAX_HEARTBEAT, MAX_RATE_HZ};
use fleetpipe_device::publish::buffer::MIN_BUFFER_BYTES;
use fleetpipe_proto::{is_valid_token, SubjectTemplate, STATUS_SENSOR};
use serde::Deserialize;

/// Where the agent looks for its configuration when neither `--config` nor
/// `FLEETPIPE_AGENT_CONFIG` says.
pub const DEFAULT_PATH: &str = "/etc/fleetpipe-agent/agent.toml";
/// Most sensors one agent runs.
pub const MAX_SENSORS: usize = 256;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The device id: one subject token (`truck-042`).
    pub device: String,
    /// NATS servers; more are discovered from the cluster.
    #[serde(default = "default_urls")]
    pub urls: Vec<String>,
    /// The device's `.creds` file (from `fleetpipe device add`).
    #[serde(default)]
    pub credentials: Option<PathBuf>,
    /// CA certificate(s) to verify the servers with (PEM); implies TLS.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM), when the servers ask for one.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// The telemetry subject template, as the pipeline's `subjects.template`.
    #[serde(default = "default_template")]
    pub subject_template: String,
    /// Values of the template's extra placeholders (`site = "paris"`).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The inbox prefix for replies; default `_INBOX_<device>`, what device credentials
    /// allow.
    #[serde(default)]
    pub inbox_prefix: Option<String>,
    /// Follow the device's key in the KV bucket `fleetpipe_config`.
    #[serde(default = "yes")]
    pub live_config: bool,
    #[serde(default)]
    pub buffer: BufferConfig,
    #[serde(default)]
    pub publish: PublishConfig,
    /// The sensors, each with its source.
    #[serde(default, rename = "sensor")]
    pub sensors: Vec<SensorConfig>,
}

/// The on-disk buffer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// Directory of the buffer and the status file.
    #[serde(default = "default_buffer_dir")]
    pub dir: PathBuf,
    /// Most bytes the buffer holds; the oldest unsent readings are dropped (and counted)
    /// beyond it.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// How often appended readings and the acknowledged position are fsynced.
    #[serde(default = "one_second", with = "duration_text")]
    pub sync_interval: Duration,
}

/// Publishing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishConfig {
    /// Most messages awaiting their acknowledgement.
    #[serde(default = "default_window")]
    pub window: usize,
    /// How long to wait for one acknowledgement.
    #[serde(default = "five_seconds", with = "duration_text")]
    pub ack_timeout: Duration,
    /// Readings waiting this long are sent together (line protocol when several).
    #[serde(default = "default_batch_interval", with = "duration_text")]
    pub batch_interval: Duration,
    /// The telemetry stream's duplicate window (`stream.duplicate_window`): a resend later
    /// than this after the first send is counted as a possible duplicate.
    #[serde(default = "two_minutes", with = "duration_text")]
    pub duplicate_window: Duration,
}

/// One sensor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorConfig {
    /// Name: one or more tokens joined by `.` (`cpu_temp`, `engine.rpm`).
    pub name: String,
    /// `file`, `command`, `lines` or `simulated`.
    pub source: String,
    /// `file` and `lines`: the path to read.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// `command`: program and arguments; its output is a number.
    #[serde(default)]
    pub command: Vec<String>,
    /// `command`: longest run (default: the sampling period, at most 10 s).
    #[serde(default, with = "opt_duration_text")]
    pub timeout: Option<Duration>,
    /// `simulated`: `sine`, `random_walk` or `counter`.
    #[serde(default)]
    pub signal: Option<String>,
    /// `simulated` `sine`: the period of the wave.
    #[serde(default, with = "opt_duration_text")]
    pub period: Option<Duration>,
    /// `simulated`: the wave's amplitude or the walk's step.
    #[serde(default)]
    pub amplitude: Option<f64>,
    /// value = raw × scale + offset (`file`, `command`, `lines`; `simulated`: offset only).
    #[serde(default = "one")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
    /// Samples per second.
    #[serde(default = "one")]
    pub rate_hz: f64,
    #[serde(default)]
    pub unit: Option<String>,
    /// Publish only on a change beyond this (0: every sample).
    #[serde(default)]
    pub deadband: f64,
    /// With a deadband, publish at least this often.
    #[serde(default = "one_minute", with = "duration_text")]
    pub heartbeat: Duration,
    #[serde(default = "yes")]
    pub enabled: bool,
}

/// What can change live, per sensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Effective {
    pub enabled: bool,
    pub rate_hz: f64,
    pub deadband: f64,
    pub heartbeat: Duration,
}

impl SensorConfig {
    /// The file's settings with `live`'s on top.
    pub fn effective(&self, live: Option<&SensorSettings>) -> Effective {
        let mut e = Effective {
            enabled: self.enabled,
            rate_hz: self.rate_hz,
            deadband: self.deadband,
            heartbeat: self.heartbeat,
        };
        if let Some(l) = live {
            e.enabled = l.enabled.unwrap_or(e.enabled);
            e.rate_hz = l.rate_hz.unwrap_or(e.rate_hz);
            e.deadband = l.deadband.unwrap_or(e.deadband);
            e.heartbeat = l.heartbeat().unwrap_or(e.heartbeat);
        }
        e
    }
}

const fn yes() -> bool {
    true
}
const fn one() -> f64 {
    1.0
}
fn default_urls() -> Vec<String> {
    vec!["nats://127.0.0.1:4222".into()]
}
fn default_template() -> String {
    "vehicle.{device}.{sensor}".into()
}
fn default_buffer_dir() -> PathBuf {
    PathBuf::from("/var/lib/fleetpipe-agent")
}
const fn default_max_bytes() -> u64 {
    64 * 1024 * 1024
}
const fn default_window() -> usize {
    64
}
const fn one_second() -> Duration {
    Duration::from_secs(1)
}
const fn five_seconds() -> Duration {
    Duration::from_secs(5)
}
const fn one_minute() -> Duration {
    Duration::from_secs(60)
}
const fn two_minutes() -> Duration {
    Duration::from_secs(120)
}
const fn default_batch_interval() -> Duration {
    Duration::from_millis(100)
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            dir: default_buffer_dir(),
            max_bytes: default_max_bytes(),
            sync_interval: one_second(),
        }
    }
}

impl Default for PublishConfig {
    fn default() -> Self {
        PublishConfig {
            window: default_window(),
            ack_timeout: five_seconds(),
            batch_interval: default_batch_interval(),
            duplicate_window: two_minutes(),
        }
    }
}

/// The environment variables the agent reads, so a caller can pass them in (tests do).
pub type Env = BTreeMap<String, String>;

/// The process environment's `FLEETPIPE_AGENT_*` variables.
pub fn process_env() -> Env {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("FLEETPIPE_AGENT_"))
        .collect()
}

impl Config {
    /// Reads `path`, applies `env`, and checks everything. The error lists every problem.
    pub fn load(path: &Path, env: &Env) -> Result<Config, Vec<String>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![format!("cannot read {}: {e}", path.display())])?;
        let mut cfg: Config =
            toml::from_str(&text).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        cfg.apply_env(env);
        let problems = cfg.problems();
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(problems)
        }
    }

    /// `FLEETPIPE_AGENT_DEVICE`, `_URLS` (comma-separated), `_CREDENTIALS`, `_CA`,
    /// `_BUFFER_DIR` override the file.
    pub fn apply_env(&mut self, env: &Env) {
        if let Some(v) = env.get("FLEETPIPE_AGENT_DEVICE") {
            self.device = v.clone();
        }
        if let Some(v) = env.get("FLEETPIPE_AGENT_URLS") {
            self.urls = v.split(',').map(|u| u.trim().to_string()).collect();
        }
        if let Some(v) = env.get("FLEETPIPE_AGENT_CREDENTIALS") {
            self.credentials = Some(PathBuf::from(v));
        }
        if let Some(v) = env.get("FLEETPIPE_AGENT_CA") {
            self.ca = Some(PathBuf::from(v));
        }
        if let Some(v) = env.get("FLEETPIPE_AGENT_BUFFER_DIR") {
            self.buffer.dir = PathBuf::from(v);
        }
    }

    /// The parsed template (valid after [`Config::load`]).
    pub fn template(&self) -> SubjectTemplate {
        SubjectTemplate::parse(&self.subject_template).unwrap_or_default()
    }

    /// The inbox prefix in use.
    pub fn inbox_prefix(&self) -> String {
        self.inbox_prefix
            .clone()
            .unwrap_or_else(|| format!("_INBOX_{}", self.device))
    }

    /// Where the agent writes its status (`fleetpipe-agent status` reads it).
    pub fn status_path(&self) -> PathBuf {
        self.buffer.dir.join("status.json")
    }

    /// Where the last good live configuration is kept, for a start without a link.
    pub fn live_cache_path(&self) -> PathBuf {
        self.buffer.dir.join("live-config.toml")
    }

    /// Every problem, each naming its setting.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !is_valid_token(&self.device) {
            p.push(format!(
                "device {:?} must be 1 to 128 letters, digits, '-' or '_'",
                self.device
            ));
        }
        if self.urls.is_empty() || self.urls.iter().any(|u| u.trim().is_empty()) {
            p.push("urls must list at least one server, none empty".into());
        }
        for (name, path) in [
            ("credentials", &self.credentials),
            ("ca", &self.ca),
            ("client_cert", &self.client_cert),
            ("client_key", &self.client_key),
        ] {
            if let Some(path) = path {
                if !path.is_file() {
                    p.push(format!("{name} {} is not a readable file", path.display()));
                }
            }
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            p.push("client_cert and client_key go together".into());
        }
        match SubjectTemplate::parse(&self.subject_template) {
            Ok(t) => {
                let names: Vec<&str> = t.tag_names().collect();
                for n in &names {
                    if !self.tags.contains_key(*n) {
                        p.push(format!("tags.{n}: the subject template needs a value"));
                    }
                }
                for (k, v) in &self.tags {
                    if !names.contains(&k.as_str()) {
                        p.push(format!(
                            "tags.{k}: not a placeholder of the subject template"
                        ));
                    } else if !is_valid_token(v) {
                        p.push(format!("tags.{k} {v:?} must be a subject token"));
                    }
                }
            }
            Err(e) => p.push(format!("subject_template: {e}")),
        }
        if let Some(prefix) = &self.inbox_prefix {
            if prefix.is_empty() || prefix.contains(['*', '>', ' ']) {
                p.push(format!("inbox_prefix {prefix:?} is not a subject prefix"));
            }
        }
        if self.buffer.max_bytes < MIN_BUFFER_BYTES {
            p.push(format!(
                "buffer.max_bytes must be at least {MIN_BUFFER_BYTES}"
            ));
        }
        if self.buffer.sync_interval.is_zero()
            || self.buffer.sync_interval > Duration::from_secs(60)
        {
            p.push("buffer.sync_interval must be above 0 and at most 60s".into());
        }
        let pb = &self.publish;
        if !(1..=10_000).contains(&pb.window) {
            p.push("publish.window must be between 1 and 10000".into());
        }
        if pb.ack_timeout < Duration::from_millis(100) || pb.ack_timeout > Duration::from_secs(300)
        {
            p.push("publish.ack_timeout must be between 100ms and 5m".into());
        }
        if pb.batch_interval > Duration::from_secs(60) {
            p.push("publish.batch_interval must be at most 60s".into());
        }
        if self.sensors.is_empty() {
            p.push("no [[sensor]]: nothing to publish".into());
        }
        if self.sensors.len() > MAX_SENSORS {
            p.push(format!("at most {MAX_SENSORS} sensors"));
        }
        let mut seen = std::collections::HashSet::new();
        for s in &self.sensors {
            sensor_problems(s, &mut p);
            if !seen.insert(s.name.as_str()) {
                p.push(format!("sensor {:?} is defined twice", s.name));
            }
        }
        p
    }

    /// Problems of a live configuration against these sensors.
    pub fn live_problems(&self, live: &LiveConfig) -> Vec<String> {
        let mut p = live.problems();
        for name in live.sensors.keys() {
            if !self.sensors.iter().any(|s| &s.name == name) {
                p.push(format!("sensors.{name}: this device has no such sensor"));
            }
        }
        p
    }
}

fn sensor_problems(s: &SensorConfig, p: &mut Vec<String>) {
    let n = &s.name;
    let tokens_ok = !n.is_empty() && n.split('.').all(is_valid_token) && n.split('.').count() <= 8;
    if !tokens_ok {
        p.push(format!(
            "sensor {n:?}: the name must be tokens (letters, digits, '-', '_') joined by '.'"
        ));
    } else if n == STATUS_SENSOR || n == "lp" {
        p.push(format!("sensor {n:?}: the name is reserved"));
    }
    let need_path = || {
        if s.path.is_none() {
            Some(format!("sensor {n}: source {:?} needs a path", s.source))
        } else {
            None
        }
    };
    match s.source.as_str() {
        "file" | "lines" => p.extend(need_path()),
        "command" => {
            if s.command.is_empty() {
                p.push(format!(
                    "sensor {n}: source \"command\" needs command = [\"program\", \"arg\"…]"
                ));
            }
        }
        "simulated" => match s.signal.as_deref().unwrap_or("sine") {
            "sine" | "random_walk" | "counter" => {}
            other => p.push(format!(
                "sensor {n}: signal {other:?} is not sine, random_walk or counter"
            )),
        },
        other => p.push(format!(
            "sensor {n}: source {other:?} is not file, command, lines or simulated"
        )),
    }
    if !(s.rate_hz > 0.0 && s.rate_hz <= MAX_RATE_HZ) {
        p.push(format!(
            "sensor {n}: rate_hz must be above 0 and at most {MAX_RATE_HZ}"
        ));
    }
    if !(s.deadband.is_finite() && s.deadband >= 0.0) {
        p.push(format!("sensor {n}: deadband must be 0 or more"));
    }
    if s.heartbeat.is_zero() || s.heartbeat > MAX_HEARTBEAT {
        p.push(format!(
            "sensor {n}: heartbeat must be above 0 and at most 24h"
        ));
    }
    if !(s.scale.is_finite() && s.offset.is_finite()) {
        p.push(format!("sensor {n}: scale and offset must be finite"));
    }
    if s.amplitude.is_some_and(|a| !a.is_finite()) {
        p.push(format!("sensor {n}: amplitude must be finite"));
    }
    if s.period.is_some_and(|d| d.is_zero()) {
        p.push(format!("sensor {n}: period must be above 0"));
    }
    if let Some(u) = &s.unit {
        if u.is_empty() || u.len() > 64 || u.chars().any(char::is_control) {
            p.push(format!(
                "sensor {n}: unit must be 1 to 64 bytes without control characters"
            ));
        }
    }
}

/// Durations as text (`"250ms"`, `"2m"`).
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
    }
}

mod opt_duration_text {
    use std::time::Duration;

    use serde::Deserializer;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::duration_text::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Vec<String>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path, &Env::new())
    }

    #[test]
    fn a_good_file_loads_with_defaults() {
        let cfg = parse(
            r#"device = "d1"
[[sensor]]
name = "cpu_temp"
source = "simulated"
rate_hz = 10
"#,
        )
        .unwrap();
        assert_eq!(cfg.inbox_prefix(), "_INBOX_d1");
        assert_eq!(cfg.publish.window, 64);
        assert_eq!(cfg.sensors[0].heartbeat, Duration::from_secs(60));
    }

    #[test]
    fn every_problem_is_reported() {
        let problems = parse(
            r#"device = "a.b"
urls = []
subject_template = "acme.{site}.{device}.{sensor}"
ca = "/nonexistent/ca.pem"
[buffer]
max_bytes = 10
[[sensor]]
name = "_status"
source = "file"
rate_hz = 0
[[sensor]]
name = "x"
source = "telepathy"
[[sensor]]
name = "x"
source = "command"
"#,
        )
        .unwrap_err();
        let text = problems.join("\n");
        for needle in [
            "device",
            "urls",
            "ca ",
            "tags.site",
            "buffer.max_bytes",
            "reserved",
            "needs a path",
            "rate_hz",
            "telepathy",
            "defined twice",
            "needs command",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
    }

    #[test]
    fn env_overrides_the_basics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(
            &path,
            "device = \"d1\"\n[[sensor]]\nname = \"t\"\nsource = \"simulated\"\n",
        )
        .unwrap();
        let env: Env = [
            ("FLEETPIPE_AGENT_DEVICE", "d2"),
            ("FLEETPIPE_AGENT_URLS", "nats://a:1, nats://b:2"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let cfg = Config::load(&path, &env).unwrap();
        assert_eq!(cfg.device, "d2");
        assert_eq!(cfg.urls, ["nats://a:1", "nats://b:2"]);
    }

    #[test]
    fn live_settings_apply_over_the_file_and_unknown_sensors_are_refused() {
        let cfg =
            parse("device = \"d1\"\n[[sensor]]\nname = \"t\"\nsource = \"simulated\"\n").unwrap();
        let live =
            LiveConfig::parse("[sensors.t]\nrate_hz = 5.0\n[sensors.nope]\nenabled = true\n")
                .unwrap();
        let problems = cfg.live_problems(&live);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("nope"));
        let e = cfg.sensors[0].effective(live.sensors.get("t"));
        assert_eq!((e.rate_hz, e.enabled), (5.0, true));
    }
}
