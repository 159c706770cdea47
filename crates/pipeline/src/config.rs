//! Configuration: a TOML file, then `FLEETPIPE_*` environment variables and command-line
//! flags on top (the CLI applies those), then one validation pass that reports every
//! problem at once.
//!
//! Durations are written as text (`"250ms"`, `"7d"`), sizes as integers in bytes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetpipe_proto::{Limits, SubjectTemplate};
use serde::{Deserialize, Serialize};

/// The whole configuration. Every field has a default, so an empty file is valid.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the managed nats-server and the embedded store keep their files.
    pub data_dir: PathBuf,
    pub nats: NatsConfig,
    pub subjects: SubjectsConfig,
    pub stream: StreamConfig,
    pub collector: CollectorConfig,
    pub aggregator: AggregatorConfig,
    pub store: StoreConfig,
    pub state: StateConfig,
    pub api: ApiConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated for a cluster. Empty: `fleetpipe up` manages its own
    /// nats-server under `data_dir`.
    pub url: String,
    /// Client port of the managed nats-server.
    pub port: u16,
    /// Path of the `nats-server` binary for the managed server; empty: search `PATH`.
    pub server_bin: String,
    /// File holding NATS credentials (`.creds`: a user JWT and its nkey seed), if the
    /// server requires them. At most one of `credentials`, `nkey_seed_file` and `user`.
    pub credentials: String,
    /// File holding an nkey seed (`SU…`) to authenticate with.
    pub nkey_seed_file: String,
    /// User name for user/password authentication; the password comes from
    /// `password_file` or the `FLEETPIPE_NATS_PASSWORD` environment variable.
    pub user: String,
    /// File holding the password for `user` (its first line).
    pub password_file: String,
    /// The password for `user` from the environment (`FLEETPIPE_NATS_PASSWORD`), set by
    /// the CLI; never in a file, never printed.
    #[serde(skip)]
    pub password: Option<Secret>,
    /// Prefix of this client's reply subjects (`_INBOX_collector`), for users whose
    /// permissions allow only their own inbox. Empty: the client's default, `_INBOX`.
    pub inbox_prefix: String,
    /// Create or update the broker objects at start (`broker::ensure`). Turn it off for a
    /// least-privilege service user, after `fleetpipe init` with an admin user.
    pub ensure: bool,
    pub tls: NatsTlsConfig,
}

/// TLS towards NATS.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NatsTlsConfig {
    /// PEM file of the CA(s) that signed the server's certificate (in addition to the
    /// system's roots).
    pub ca: String,
    /// Client certificate (PEM), for servers that verify clients; with `key`.
    pub cert: String,
    /// The client certificate's private key (PEM).
    pub key: String,
    /// Refuse to talk to a server without TLS.
    pub require: bool,
}

/// A secret held in memory: `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SubjectsConfig {
    /// Subject template devices publish on; see `fleetpipe_proto::subject`.
    pub template: String,
    /// Subjects the telemetry stream captures. Empty: derived from the template
    /// (`vehicle.>` for the default).
    pub capture: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    pub name: String,
    /// `interest`: a message is kept until the collectors acknowledge it, so the stream is
    /// a bounded buffer in front of the store. `limits`: kept for `max_age`/`max_bytes`
    /// whatever was consumed, so it can be replayed.
    pub retention: Retention,
    #[serde(with = "duration_text")]
    pub max_age: Duration,
    /// -1 for no limit. When full, new publishes are refused (publishers keep their data and
    /// retry) rather than old unprocessed data being dropped.
    pub max_bytes: i64,
    /// Window in which a repeated `Nats-Msg-Id` is dropped by the broker.
    #[serde(with = "duration_text")]
    pub duplicate_window: Duration,
    pub replicas: usize,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Retention {
    Interest,
    Limits,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CollectorConfig {
    /// Durable consumer shared by every collector.
    pub durable: String,
    /// Workers per `fleetpipe collect` process.
    pub workers: usize,
    /// Most messages decoded and written in one store transaction.
    pub batch_size: usize,
    /// How long a worker waits for more messages to fill a batch. 0 (the default) takes what
    /// the consumer has ready: under load batches fill by themselves, and the store merges
    /// waiting batches into one transaction, so waiting only adds latency.
    #[serde(with = "duration_text")]
    pub batch_wait: Duration,
    /// Most messages delivered and not yet acknowledged across all collectors; the broker
    /// stops delivering at this point, which bounds collector memory.
    pub max_ack_pending: i64,
    /// How long the broker waits for an acknowledgement before redelivering. Collectors
    /// extend it for the messages they hold (a slow commit, a store outage).
    #[serde(with = "duration_text")]
    pub ack_wait: Duration,
    /// Deliveries of one message before the broker gives up on it and the collectors
    /// dead-letter it (code `max_deliveries`). Only a message that made collectors crash,
    /// stall past `ack_wait` or stop spends deliveries: store outages do not.
    pub max_deliver: i64,
    /// Payloads larger than this are dead-lettered.
    pub max_payload_bytes: usize,
    /// Device timestamps further than this past the broker's time are dead-lettered.
    #[serde(with = "duration_text")]
    pub max_future: Duration,
    /// Latest-state puts are coalesced: each key is put at most once per this window, with
    /// the newest value the collector process holds. Fewer compare-and-set puts cost the
    /// broker less; the latest state may lag by up to the window. 0 puts every batch's
    /// updates at once; at most [`MAX_STATE_WINDOW`].
    #[serde(with = "duration_text")]
    pub state_window: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorConfig {
    /// Time between snapshot rows; from 100 ms to 1 h.
    #[serde(with = "duration_text")]
    pub interval: Duration,
    /// How long the writer's lease lasts without renewal; a standby takes over after it.
    /// The writer renews it every third of it, on its own schedule, so it may be shorter
    /// than the interval; from 1 s to 1 h.
    #[serde(with = "duration_text")]
    pub lease_ttl: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `postgres://…`, or `sqlite://PATH`. Empty: `sqlite://<data_dir>/fleetpipe.db`.
    pub url: String,
    /// Raw readings older than this are deleted; their rollups are kept (for
    /// `rollup_retention`), and a late reading older than this is not stored at all.
    #[serde(with = "duration_text")]
    pub raw_retention: Duration,
    /// Per-minute rollups older than this are deleted; at least `raw_retention`.
    #[serde(with = "duration_text")]
    pub rollup_retention: Duration,
    /// The aggregator's snapshots older than this are deleted.
    #[serde(with = "duration_text")]
    pub snapshot_retention: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// A sensor whose latest value is older than this leaves the latest-state bucket (and
    /// so the device list and the snapshots); it comes back with its next reading.
    #[serde(with = "duration_text")]
    pub max_idle: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address the HTTP API and dashboard listen on (`IP:PORT`).
    pub http: String,
    /// A device is online when its newest reading is at most this old.
    #[serde(with = "duration_text")]
    pub online_window: Duration,
    /// Map tile URL template for the dashboard (`https://…/{z}/{x}/{y}.png`). Empty: the
    /// map draws positions without tiles, so it works offline.
    pub tile_url: String,
    /// Longest a request may take, the live stream excepted; then 503 with `Retry-After`.
    #[serde(with = "duration_text")]
    pub request_timeout: Duration,
    /// Requests reading the store at once (series); one more gets 503 with
    /// `Retry-After: 1`. Under PostgreSQL, `fleetpipe up` gives the API a pool of this
    /// many connections (and one for readiness) of its own.
    pub max_concurrent_queries: usize,
    /// Most rollup rows (minutes, or hours for buckets of whole hours) one series request
    /// reads; a range needing more is refused with 400 (100,000 minutes: about 69 days).
    pub max_rollup_rows: u64,
    /// Who may use the API: `tokens` (a bearer token with a role on every route but the
    /// probes and the dashboard's files), `none`, or `auto` (the default): `none` when `http`
    /// is a loopback address, `tokens` otherwise. Also `FLEETPIPE_API_AUTH`.
    pub auth: ApiAuth,
    /// With `auth = "none"`, listen beyond loopback anyway (e.g. behind a proxy that
    /// authenticates). Without it, an open API on a non-loopback address is refused.
    pub allow_unauthenticated_remote: bool,
    /// Whether `/metrics` needs a token (role `read`) when tokens are required.
    pub metrics_auth: bool,
    /// PEM file of the certificate chain to serve HTTPS with; empty: plain HTTP.
    pub tls_cert: String,
    /// PEM file of the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub tls_key: String,
}

/// How the API authenticates requests; see [`ApiConfig::auth`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ApiAuth {
    /// `none` on a loopback address, `tokens` on any other.
    #[default]
    Auto,
    /// Every route but the probes and the dashboard's files needs a bearer token.
    Tokens,
    /// No authentication.
    None,
}

impl std::str::FromStr for ApiAuth {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(ApiAuth::Auto),
            "tokens" => Ok(ApiAuth::Tokens),
            "none" => Ok(ApiAuth::None),
            _ => Err(format!(
                "{s:?} is not an API auth mode: auto, tokens or none"
            )),
        }
    }
}

impl ApiConfig {
    /// Whether requests need a token: `auth`, with `auto` resolved by the address (an
    /// address that does not parse counts as remote).
    pub fn tokens_required(&self) -> bool {
        match self.auth {
            ApiAuth::Tokens => true,
            ApiAuth::None => false,
            ApiAuth::Auto => !self.is_loopback(),
        }
    }

    /// Whether `http` is a loopback address.
    pub fn is_loopback(&self) -> bool {
        self.http
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback())
    }
}

/// Broker object names that are not configurable, so every fleetpipe process agrees.
pub mod names {
    pub const DLQ_STREAM: &str = "FLEETPIPE_DLQ";
    /// Keeps the telemetry consumer's max-delivery advisories.
    pub const ADVISORY_STREAM: &str = "FLEETPIPE_ADVISORIES";
    pub const ADVISORY_CONSUMER: &str = "fleetpipe-max-deliveries";
    /// Dead letters are published on `fleetpipe.dlq.<reason code>.<stream seq>`.
    pub const DLQ_SUBJECT_PREFIX: &str = "fleetpipe.dlq";
    pub const STATE_BUCKET: &str = "fleetpipe_state";
    pub const LEASE_BUCKET: &str = "fleetpipe_leases";
    /// The API's bearer tokens, hashed: `<token id>` -> name, role, SHA-256 of the secret.
    pub const TOKEN_BUCKET: &str = "fleetpipe_api_tokens";
    /// Device configurations (`fleetpipe-agent` follows its key, the device id).
    pub const CONFIG_BUCKET: &str = "fleetpipe_config";
    /// Subjects fleetpipe uses for itself; the telemetry capture must not overlap them.
    pub const RESERVED_PREFIX: &str = "fleetpipe.";
}

const fn default_port() -> u16 {
    4222
}

const fn default_online_window() -> Duration {
    Duration::from_secs(30)
}

/// Ten times what a reasonable query takes, and well under what a client or proxy waits.
const fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}

/// As many as the collectors' PostgreSQL pool: enough for a few dashboards opening device
/// pages (one series request per sensor) at once.
const fn default_max_concurrent_queries() -> usize {
    16
}

/// About 69 days of minutes; some 5 MB and tens of milliseconds per request.
const fn default_max_rollup_rows() -> u64 {
    100_000
}

/// Short next to the 20 ms publish → latest-state target (BENCHMARKS.md).
const fn default_state_window() -> Duration {
    Duration::from_millis(5)
}

/// Where `fleetpipe serve` and `fleetpipe up` listen unless told otherwise.
pub const DEFAULT_HTTP: &str = "127.0.0.1:8080";

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("data"),
            nats: NatsConfig::default(),
            subjects: SubjectsConfig::default(),
            stream: StreamConfig::default(),
            collector: CollectorConfig::default(),
            aggregator: AggregatorConfig::default(),
            store: StoreConfig::default(),
            state: StateConfig::default(),
            api: ApiConfig::default(),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            http: DEFAULT_HTTP.into(),
            online_window: default_online_window(),
            tile_url: String::new(),
            request_timeout: default_request_timeout(),
            max_concurrent_queries: default_max_concurrent_queries(),
            max_rollup_rows: default_max_rollup_rows(),
            auth: ApiAuth::Auto,
            allow_unauthenticated_remote: false,
            metrics_auth: true,
            tls_cert: String::new(),
            tls_key: String::new(),
        }
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: String::new(),
            port: default_port(),
            server_bin: String::new(),
            credentials: String::new(),
            nkey_seed_file: String::new(),
            user: String::new(),
            password_file: String::new(),
            password: None,
            inbox_prefix: String::new(),
            ensure: true,
            tls: NatsTlsConfig::default(),
        }
    }
}

impl Default for SubjectsConfig {
    fn default() -> Self {
        SubjectsConfig {
            template: fleetpipe_proto::subject::DEFAULT_TEMPLATE.to_string(),
            capture: Vec::new(),
        }
    }
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            name: "FLEETPIPE_TELEMETRY".into(),
            retention: Retention::Interest,
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: 10 * 1024 * 1024 * 1024,
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
        }
    }
}

impl Default for CollectorConfig {
    fn default() -> Self {
        CollectorConfig {
            durable: "fleetpipe-collectors".into(),
            workers: 2,
            batch_size: 2000,
            batch_wait: Duration::ZERO,
            max_ack_pending: 50_000,
            ack_wait: Duration::from_secs(30),
            max_deliver: 10,
            max_payload_bytes: Limits::default().max_payload_bytes,
            max_future: Duration::from_secs(300),
            state_window: default_state_window(),
        }
    }
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        AggregatorConfig {
            interval: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(3),
        }
    }
}

const DAY: Duration = Duration::from_secs(24 * 3600);

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: String::new(),
            raw_retention: DAY * 30,
            rollup_retention: DAY * 400,
            snapshot_retention: DAY * 30,
        }
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig { max_idle: DAY * 30 }
    }
}

/// Longest retention (and `state.max_idle`) accepted: 100 years. Anything longer is a typo,
/// and would overflow the microsecond arithmetic that turns it into a time.
pub const MAX_RETENTION: Duration = Duration::from_secs(36_525 * 24 * 3600);

/// Shortest retention (and `state.max_idle`) accepted.
pub const MIN_RETENTION: Duration = Duration::from_secs(60);

/// Longest `collector.state_window` accepted: the latest state is meant to be live.
pub const MAX_STATE_WINDOW: Duration = Duration::from_secs(1);

/// Longest `aggregator.interval` and `aggregator.lease_ttl` accepted.
pub const MAX_AGGREGATOR_PERIOD: Duration = Duration::from_secs(3600);

/// Every problem found in a configuration, so the user can fix them all in one go.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigErrors(pub Vec<String>);

impl Config {
    /// Reads a TOML file. Unknown keys are errors (a typo must not be silently ignored).
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        use anyhow::Context as _;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("in config file {}", path.display()))
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        Ok(toml::from_str(text)?)
    }

    /// Checks every setting and returns all problems at once.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut problems = Vec::new();
        match SubjectTemplate::parse(&self.subjects.template) {
            Ok(t) => {
                for capture in self.capture_subjects_for(&t) {
                    if capture.starts_with(names::RESERVED_PREFIX) || capture == ">" {
                        problems.push(format!(
                            "subjects.capture {capture:?} overlaps fleetpipe's own subjects ({}>)",
                            names::RESERVED_PREFIX
                        ));
                    }
                }
            }
            Err(e) => problems.push(format!("subjects.template: {e}")),
        }
        if self.stream.name.is_empty()
            || !self
                .stream
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            problems.push(format!(
                "stream.name {:?} must be letters, digits, '-' or '_'",
                self.stream.name
            ));
        }
        if self.stream.max_bytes == 0 || self.stream.max_bytes < -1 {
            problems.push("stream.max_bytes must be positive, or -1 for no limit".into());
        }
        if !(1..=5).contains(&self.stream.replicas) {
            problems.push("stream.replicas must be between 1 and 5".into());
        }
        if self.stream.duplicate_window > self.stream.max_age {
            problems.push("stream.duplicate_window must not exceed stream.max_age".into());
        }
        let c = &self.collector;
        if c.workers == 0 || c.workers > 256 {
            problems.push("collector.workers must be between 1 and 256".into());
        }
        if c.batch_size == 0 || c.batch_size > 100_000 {
            problems.push("collector.batch_size must be between 1 and 100000".into());
        }
        if (c.max_ack_pending as usize) < c.batch_size {
            problems.push("collector.max_ack_pending must be at least collector.batch_size".into());
        }
        if c.ack_wait < Duration::from_secs(1) {
            problems.push("collector.ack_wait must be at least 1s".into());
        }
        if !(2..=1000).contains(&c.max_deliver) {
            problems.push(format!(
                "collector.max_deliver is {}, it must be between 2 and 1000",
                c.max_deliver
            ));
        }
        if c.ack_wait > Duration::from_secs(24 * 3600) {
            problems.push("collector.ack_wait must be at most 1 day".into());
        }
        if c.batch_wait > c.ack_wait / 2 {
            problems.push("collector.batch_wait must be under half of collector.ack_wait".into());
        }
        if c.state_window > MAX_STATE_WINDOW {
            problems.push(format!(
                "collector.state_window is {}, it must be from 0s (no coalescing) to {}",
                humantime::format_duration(c.state_window),
                humantime::format_duration(MAX_STATE_WINDOW)
            ));
        }
        if c.max_payload_bytes == 0 {
            problems.push("collector.max_payload_bytes must be positive".into());
        }
        if c.durable.is_empty() || c.durable.contains(['.', '*', '>', ' ']) {
            problems.push(format!(
                "collector.durable {:?} must be a name without '.', '*', '>' or spaces",
                c.durable
            ));
        }
        // The interval and the lease are independent (the lease is renewed on its own
        // schedule), so an interval longer than the lease is fine.
        let a = &self.aggregator;
        if a.interval < Duration::from_millis(100) || a.interval > MAX_AGGREGATOR_PERIOD {
            problems.push(format!(
                "aggregator.interval is {}, it must be from 100ms to 1h",
                humantime::format_duration(a.interval)
            ));
        }
        // Renewed every third of the TTL, a lease survives one failed renewal only if the
        // writer's safety margin is under a third of it.
        let min_ttl = Duration::from_secs(1).max(crate::aggregator::LEASE_MARGIN * 3);
        if a.lease_ttl < min_ttl || a.lease_ttl > MAX_AGGREGATOR_PERIOD {
            problems.push(format!(
                "aggregator.lease_ttl is {}, it must be from {} to 1h",
                humantime::format_duration(a.lease_ttl),
                humantime::format_duration(min_ttl)
            ));
        }
        let retentions = [
            ("store.raw_retention", self.store.raw_retention),
            ("store.rollup_retention", self.store.rollup_retention),
            ("store.snapshot_retention", self.store.snapshot_retention),
            ("state.max_idle", self.state.max_idle),
        ];
        for (name, d) in retentions {
            if d < MIN_RETENTION {
                problems.push(format!(
                    "{name} is {}, it must be at least 1m",
                    humantime::format_duration(d)
                ));
            } else if d > MAX_RETENTION {
                problems.push(format!(
                    "{name} is {}, more than the maximum of 100 years; write e.g. \"30d\"",
                    humantime::format_duration(d)
                ));
            }
        }
        if self.store.rollup_retention < self.store.raw_retention {
            problems.push(
                "store.rollup_retention must be at least store.raw_retention: ranges whose raw \
                 readings are pruned are answered from the rollups"
                    .into(),
            );
        }
        let store_schemes = ["postgres://", "postgresql://", "sqlite://"];
        if !self.store.url.is_empty()
            && !store_schemes.iter().any(|p| self.store.url.starts_with(p))
        {
            problems.push(format!(
                "store.url {:?} must start with postgres://, postgresql:// or sqlite://",
                self.store.url
            ));
        }
        if self.api.http.parse::<std::net::SocketAddr>().is_err() {
            problems.push(format!(
                "api.http {:?} must be IP:PORT, e.g. 127.0.0.1:8080 or 0.0.0.0:8080",
                self.api.http
            ));
        }
        if self.api.online_window < Duration::from_secs(1) {
            problems.push("api.online_window must be at least 1s".into());
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&self.api.request_timeout)
        {
            problems.push("api.request_timeout must be between 1s and 10m".into());
        }
        if !(1..=1024).contains(&self.api.max_concurrent_queries) {
            problems.push("api.max_concurrent_queries must be between 1 and 1024".into());
        }
        // A day at least: a series request falls back from raw readings (at most 6 h) to
        // rollups, which must then fit.
        if !(1440..=10_000_000).contains(&self.api.max_rollup_rows) {
            problems.push(
                "api.max_rollup_rows must be between 1440 (a day of minutes) and 10000000".into(),
            );
        }
        if self.api.auth == ApiAuth::None
            && !self.api.is_loopback()
            && !self.api.allow_unauthenticated_remote
        {
            problems.push(format!(
                "api.auth is \"none\" but api.http {:?} is not a loopback address: anyone who \
                 reaches it could read everything; use api.auth = \"tokens\", listen on \
                 127.0.0.1, or set api.allow_unauthenticated_remote = true (behind a proxy that \
                 authenticates)",
                self.api.http
            ));
        }
        match (self.api.tls_cert.is_empty(), self.api.tls_key.is_empty()) {
            (true, true) => {}
            (false, false) => {
                for (name, path) in [
                    ("api.tls_cert", &self.api.tls_cert),
                    ("api.tls_key", &self.api.tls_key),
                ] {
                    if !Path::new(path).is_file() {
                        problems.push(format!("{name}: file {path:?} does not exist"));
                    }
                }
            }
            _ => problems.push(
                "api.tls_cert and api.tls_key go together: set both to serve HTTPS, or neither"
                    .into(),
            ),
        }
        self.nats.check(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(problems))
        }
    }

    /// The parsed subject template. Call after [`Config::validate`].
    pub fn template(&self) -> anyhow::Result<SubjectTemplate> {
        Ok(SubjectTemplate::parse(&self.subjects.template)?)
    }

    /// Subjects the telemetry stream captures.
    pub fn capture_subjects(&self) -> anyhow::Result<Vec<String>> {
        Ok(self.capture_subjects_for(&self.template()?))
    }

    fn capture_subjects_for(&self, template: &SubjectTemplate) -> Vec<String> {
        if self.subjects.capture.is_empty() {
            vec![template.stream_filter()]
        } else {
            self.subjects.capture.clone()
        }
    }

    /// Decoding limits for the collectors.
    pub fn limits(&self) -> Limits {
        Limits {
            max_payload_bytes: self.collector.max_payload_bytes,
            max_future_micros: self.collector.max_future.as_micros().min(i64::MAX as u128) as i64,
            max_past_micros: self.store.raw_retention.as_micros().min(i64::MAX as u128) as i64,
            ..Limits::default()
        }
    }

    /// The store URL, defaulting to the embedded store under `data_dir`.
    pub fn store_url(&self) -> String {
        if self.store.url.is_empty() {
            format!("sqlite://{}", self.data_dir.join("fleetpipe.db").display())
        } else {
            self.store.url.clone()
        }
    }
}

impl NatsConfig {
    /// Adds every problem with the authentication and TLS settings to `problems`.
    fn check(&self, problems: &mut Vec<String>) {
        let files = [
            ("nats.credentials", &self.credentials),
            ("nats.nkey_seed_file", &self.nkey_seed_file),
            ("nats.password_file", &self.password_file),
            ("nats.tls.ca", &self.tls.ca),
            ("nats.tls.cert", &self.tls.cert),
            ("nats.tls.key", &self.tls.key),
        ];
        for (name, path) in files {
            if !path.is_empty() && !Path::new(path).is_file() {
                problems.push(format!("{name}: file {path:?} does not exist"));
            }
        }
        let methods = [
            !self.credentials.is_empty(),
            !self.nkey_seed_file.is_empty(),
            !self.user.is_empty(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            problems.push(
                "nats: set only one of credentials, nkey_seed_file and user (with a password)"
                    .into(),
            );
        }
        let has_password = !self.password_file.is_empty() || self.password.is_some();
        if !self.user.is_empty() && !has_password {
            problems.push(
                "nats.user needs a password: nats.password_file or FLEETPIPE_NATS_PASSWORD".into(),
            );
        }
        if self.user.is_empty() && has_password {
            problems.push("a NATS password is set but nats.user is not".into());
        }
        if self.tls.cert.is_empty() != self.tls.key.is_empty() {
            problems.push("nats.tls.cert and nats.tls.key go together: set both or neither".into());
        }
        if !self.inbox_prefix.is_empty()
            && !self
                .inbox_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            problems.push(format!(
                "nats.inbox_prefix {:?} must be letters, digits, '-' or '_' (no '.', '*', '>')",
                self.inbox_prefix
            ));
        }
    }
}

/// Serde adapter for durations written as text (`"250ms"`, `"2m"`, `"7d"`).
pub mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Whole days, hours, minutes or seconds as one number and unit (`400d`, `30s`):
    /// humantime's own format counts years of 365.25 days, so 400 days would print as
    /// "1year 1month 4days 7h 26m 24s".
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        let secs = d.as_secs();
        let text = if d.subsec_nanos() != 0 || secs == 0 {
            humantime::format_duration(*d).to_string()
        } else {
            let (n, unit) = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")]
                .into_iter()
                .find(|(u, _)| secs % u == 0)
                .map(|(u, name)| (secs / u, name))
                .unwrap_or((secs, "s"));
            format!("{n}{unit}")
        };
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration ({e}); write e.g. \"250ms\", \"30s\", \"7d\""
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let c = Config::default();
        c.validate().unwrap();
        let text = toml::to_string(&c).unwrap();
        assert_eq!(Config::from_toml(&text).unwrap(), c);
        assert_eq!(Config::from_toml("").unwrap(), c);
        assert_eq!(c.capture_subjects().unwrap(), vec!["vehicle.>"]);
        assert!(c.store_url().starts_with("sqlite://"));
    }

    #[test]
    fn reads_a_file() {
        let c = Config::from_toml(
            r#"
            [subjects]
            template = "acme.{site}.{device}.{sensor}"
            [aggregator]
            interval = "100ms"
            [api]
            http = "0.0.0.0:9090"
            online_window = "1m"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.aggregator.interval, Duration::from_millis(100));
        assert_eq!(c.api.http, "0.0.0.0:9090");
        assert_eq!(c.api.online_window, Duration::from_secs(60));
        assert_eq!(c.capture_subjects().unwrap(), vec!["acme.>"]);
    }

    #[test]
    fn unknown_keys_and_bad_durations_are_refused() {
        let err = Config::from_toml("[collector]\nworkerz = 3").unwrap_err();
        assert!(format!("{err:#}").contains("workerz"), "{err:#}");
        let err = Config::from_toml("[aggregator]\ninterval = \"often\"").unwrap_err();
        assert!(format!("{err:#}").contains("not a duration"), "{err:#}");
    }

    #[test]
    fn every_problem_is_reported() {
        let mut c = Config::default();
        c.subjects.template = "vehicle.{sensor}".into();
        c.aggregator.interval = Duration::from_millis(10);
        c.collector.workers = 0;
        c.store.url = "mysql://x".into();
        c.api.http = "localhost".into();
        c.api.online_window = Duration::from_millis(10);
        let errors = c.validate().unwrap_err().0;
        assert_eq!(errors.len(), 6, "{errors:?}");
        let mut c = Config::default();
        c.subjects.capture = vec!["fleetpipe.>".into()];
        assert_eq!(c.validate().unwrap_err().0.len(), 1);
    }

    #[test]
    fn api_auth_defaults_to_tokens_beyond_loopback() {
        let api = |toml: &str| Config::from_toml(toml).unwrap();
        let c = api("");
        assert_eq!(c.api.auth, ApiAuth::Auto);
        assert!(!c.api.tokens_required(), "loopback: open by default");
        assert!(c.api.metrics_auth);
        for http in ["0.0.0.0:8080", "10.0.0.5:80", "[::]:8080"] {
            let c = api(&format!("[api]\nhttp = \"{http}\""));
            c.validate().unwrap();
            assert!(c.api.tokens_required(), "{http}");
        }
        assert!(api("[api]\nhttp = \"[::1]:8080\"\n").api.is_loopback());
        let c = api("[api]\nauth = \"tokens\"");
        assert!(c.api.tokens_required());
        // An open API beyond loopback only when forced.
        let c = api("[api]\nhttp = \"0.0.0.0:8080\"\nauth = \"none\"");
        let errors = c.validate().unwrap_err().0;
        assert!(errors[0].contains("not a loopback address"), "{errors:?}");
        let c = api(
            "[api]\nhttp = \"0.0.0.0:8080\"\nauth = \"none\"\nallow_unauthenticated_remote = true",
        );
        c.validate().unwrap();
        assert!(!c.api.tokens_required());
        assert!(Config::from_toml("[api]\nauth = \"maybe\"").is_err());
        assert_eq!("tokens".parse::<ApiAuth>(), Ok(ApiAuth::Tokens));
        assert!("open".parse::<ApiAuth>().is_err());
    }

    #[test]
    fn api_tls_needs_both_files() {
        let mut c = Config::default();
        c.api.tls_cert = "/nonexistent/cert.pem".into();
        let errors = c.validate().unwrap_err().0;
        assert!(errors[0].contains("go together"), "{errors:?}");
        c.api.tls_key = "/nonexistent/key.pem".into();
        assert_eq!(c.validate().unwrap_err().0.len(), 2);
    }

    #[test]
    fn nats_auth_problems_are_all_reported_and_secrets_hidden() {
        let mut c = Config::default();
        c.nats.credentials = "/nonexistent/a.creds".into();
        c.nats.user = "svc".into();
        c.nats.tls.cert = "/nonexistent/c.pem".into();
        c.nats.inbox_prefix = "_INBOX.x".into();
        let errors = c.validate().unwrap_err().0;
        assert_eq!(errors.len(), 6, "{errors:?}");
        let mut c = Config::default();
        c.nats.user = "svc".into();
        c.nats.password = Some(Secret::new("hunter2"));
        c.validate().unwrap();
        let shown = format!("{c:?} {}", toml::to_string(&c).unwrap());
        assert!(!shown.contains("hunter2"), "{shown}");
        let back = Config::from_toml(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(back.nats.password, None);
        let c = Config::from_toml("[nats.tls]\nca = \"ca.pem\"\nrequire = true").unwrap();
        assert!(c.nats.tls.require);
    }

    #[test]
    fn the_state_window_is_bounded() {
        for (text, window) in [("0s", Duration::ZERO), ("1s", MAX_STATE_WINDOW)] {
            let c = Config::from_toml(&format!("[collector]\nstate_window = \"{text}\"")).unwrap();
            c.validate().unwrap();
            assert_eq!(c.collector.state_window, window);
        }
        for text in ["1001ms", "1h", "100000000y"] {
            let c = Config::from_toml(&format!("[collector]\nstate_window = \"{text}\"")).unwrap();
            let errors = c.validate().unwrap_err().0;
            assert!(
                errors.len() == 1 && errors[0].contains("collector.state_window is"),
                "{text}: {errors:?}"
            );
        }
        // Listed with the other problems, not instead of them.
        let mut c = Config::default();
        c.collector.state_window = Duration::from_secs(2);
        c.collector.workers = 0;
        assert_eq!(c.validate().unwrap_err().0.len(), 2);
        let err = Config::from_toml("[collector]\nstate_window = \"-5ms\"").unwrap_err();
        assert!(format!("{err:#}").contains("not a duration"), "{err:#}");
    }

    #[test]
    fn aggregator_periods_and_retentions_are_bounded() {
        // An interval longer than the lease is fine: the lease is renewed on its own.
        let c = Config::from_toml(
            r#"
            [aggregator]
            interval = "5s"
            lease_ttl = "1s"
            [store]
            raw_retention = "7d"
            rollup_retention = "2y"
            snapshot_retention = "1h"
            [state]
            max_idle = "12h"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.state.max_idle, Duration::from_secs(12 * 3600));
        assert_eq!(Config::default().store.rollup_retention, DAY * 400);

        // (setting, value, what the message says)
        let cases = [
            ("aggregator", "interval", "2h", "from 100ms to 1h"),
            ("aggregator", "lease_ttl", "500ms", "from 1s to 1h"),
            ("aggregator", "lease_ttl", "100000000y", "from 1s to 1h"),
            ("store", "raw_retention", "0s", "at least 1m"),
            (
                "store",
                "snapshot_retention",
                "100000000y",
                "maximum of 100 years",
            ),
            ("store", "rollup_retention", "101y", "maximum of 100 years"),
            ("state", "max_idle", "0s", "at least 1m"),
            ("state", "max_idle", "1000000000y", "maximum of 100 years"),
        ];
        for (section, key, value, says) in cases {
            let text = format!("[{section}]\n{key} = \"{value}\"");
            let c = Config::from_toml(&text).unwrap();
            let errors = c.validate().unwrap_err().0;
            assert!(
                errors
                    .iter()
                    .any(|e| e.contains(&format!("{section}.{key}")) && e.contains(says)),
                "{text}: {errors:?}"
            );
        }
        let mut c = Config::default();
        c.store.raw_retention = DAY * 500;
        let errors = c.validate().unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("rollup_retention"), "{errors:?}");
    }
}
