//! The fleet simulator: thousands to hundreds of thousands of virtual vehicles publishing
//! telemetry to JetStream, for demos and benchmarks.
//!
//! Each vehicle drives a loop around Paris and samples four sensor families at their own
//! rates, as in the reference design: GPS position (`gps.lat`, `gps.lon`) at 1 Hz, `speed`
//! (km/h) at 2 Hz, `soc` (state of charge, %) at 0.2 Hz and `torque` (Nm) at 5 Hz.
//!
//! Devices are multiplexed over a few NATS connections; each connection is one task that
//! walks its devices in a fixed schedule order (a 100 ms tick, every device at its own
//! phase within it), not a task or timer per device. Every message is published through
//! JetStream and its acknowledgement awaited, at most [`SimConfig::max_in_flight`] per
//! connection: that window is the flow control, so when the broker cannot keep up the
//! simulator runs slower instead of queueing without bound or losing messages. A rate cap
//! below the natural rate stretches the tick, so every sensor slows down alike.
//!
//! For benchmarks, [`SimConfig::flat_out`] drops the schedule's clock: rounds follow one
//! another as fast as the acknowledgement window lets them (a rate cap still applies), so
//! the publishers run at what the broker accepts. [`SimConfig::ticks_per_message`] makes a
//! line-protocol device send several ticks of readings per message, as a device or Telegraf
//! flushing a buffer does; flat out, those ticks follow a clock of their own that starts a
//! day back, so a device's messages never cover the same span twice.
//!
//! Start it with [`run`].
//!
//! Module map: `vehicle` (signal models and the route), `schedule` (which device samples
//! which sensor when), `worker` (one connection's publishing task).

mod schedule;
mod vehicle;
mod worker;

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use fleetpipe_proto::{is_valid_token, SubjectTemplate, Timestamp};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use self::schedule::{share_of_fleet, Device};
use self::worker::{Plan, Worker};

/// The name the simulator's connections show in the server's connection list.
pub const CONNECTION_NAME: &str = "fleetpipe-simulate";

/// Sanity limits: beyond them a typo, not a plan (memory is about 200 bytes per device).
const MAX_DEVICES: usize = 100_000_000;
const MAX_CONNECTIONS: usize = 1024;
const MAX_IN_FLIGHT: usize = 1_000_000;
const MAX_ACK_TIMEOUT: Duration = Duration::from_secs(3600);
/// Ten minutes of readings in one message is already far beyond any real buffer.
pub const MAX_TICKS_PER_MESSAGE: usize = 6000;

/// How the simulated devices encode their readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum PayloadForm {
    /// One plain decimal number per message, exactly what the reference design sends.
    #[default]
    #[serde(rename = "plain")]
    Plain,
    /// One JSON reading per message, with unit, device timestamp and quality.
    #[serde(rename = "json")]
    Json,
    /// One InfluxDB line-protocol message per device tick, carrying every sensor due.
    #[serde(rename = "lp")]
    LineProtocol,
}

impl PayloadForm {
    /// The name used on the command line and in JSON output.
    pub const fn as_str(self) -> &'static str {
        match self {
            PayloadForm::Plain => "plain",
            PayloadForm::Json => "json",
            PayloadForm::LineProtocol => "lp",
        }
    }
}

impl fmt::Display for PayloadForm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A payload form name that is not `plain`, `json` or `lp`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown payload form {0:?}: expected plain, json or lp (line protocol)")]
pub struct ParsePayloadFormError(String);

impl FromStr for PayloadForm {
    type Err = ParsePayloadFormError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "plain" => Ok(PayloadForm::Plain),
            "json" => Ok(PayloadForm::Json),
            "lp" | "line-protocol" | "line_protocol" => Ok(PayloadForm::LineProtocol),
            _ => Err(ParsePayloadFormError(s.to_string())),
        }
    }
}

/// What to simulate and how hard to push. [`SimConfig::default`] is 100 devices on a local
/// server at natural rates; [`SimConfig::new`] the same against a given server.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The NATS server, e.g. `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// Number of virtual vehicles.
    pub devices: usize,
    /// How readings are encoded.
    pub payload: PayloadForm,
    /// Cap on messages per second for the whole fleet. `None` lets every sensor sample at
    /// its natural rate (9.2 messages/s per vehicle in plain and JSON form). Below the
    /// natural rate the schedule is stretched evenly, so every sensor slows down alike.
    pub rate: Option<f64>,
    /// Stop after this long; `None` runs until the shutdown future resolves.
    pub duration: Option<Duration>,
    /// NATS connections the devices are spread over.
    pub connections: usize,
    /// Unacknowledged JetStream publishes allowed per connection; publishing waits for
    /// acknowledgements beyond that.
    pub max_in_flight: usize,
    /// How long to wait for one acknowledgement before counting it as an error.
    pub ack_timeout: Duration,
    /// The subjects devices publish on. Extra placeholders (`{site}`) get deterministic
    /// values such as `site-1`.
    pub template: SubjectTemplate,
    /// Device ids are this prefix and a zero-padded index: `v00042`.
    pub device_prefix: String,
    /// Seeds every random choice: the same seed gives the same fleet and the same drives.
    pub seed: u64,
    /// Set `Nats-Msg-Id: <device>-<sensor>-<counter>` so the stream de-duplicates. The
    /// counter restarts with every run, so a second run with the same seed inside the
    /// stream's duplicate window is reported as duplicates and not stored.
    pub msg_ids: bool,
    /// Stop after exactly this many messages were published (for tests and benchmarks).
    pub max_messages: Option<u64>,
    /// Ignore the schedule's clock and publish as fast as the broker acknowledges, still
    /// never more than `max_in_flight` unacknowledged per connection. Sensors keep their
    /// relative rates; a `rate` cap still applies. For benchmarks.
    pub flat_out: bool,
    /// Line protocol only: each message carries this many 100 ms ticks of one device's
    /// readings (a line per family and tick, each with its own timestamp), as a device or
    /// Telegraf flushing a buffer does. 1 sends every tick on its own.
    pub ticks_per_message: usize,
    /// Flat-out line protocol: the time of the first tick (default: a day before the run).
    /// A caller running the same fleet again passes the previous run's
    /// [`SimSummary::clock_end`], so the devices' clocks go on from there.
    pub clock_from: Option<Timestamp>,
    /// Closed-loop load: publishing waits while the messages published so far reach the
    /// gate's limit, which the caller raises as the consumer makes progress. For benchmarks
    /// that measure a sustained rate rather than how fast a queue grows.
    pub gate: Option<Arc<PublishGate>>,
    /// Credentials and TLS for a server that requires them; `None`: connect as is.
    pub auth: Option<SimAuth>,
}

/// How the simulator authenticates to a server that requires it.
#[derive(Debug, Clone, Default)]
pub struct SimAuth {
    /// A `.creds` file (user JWT and nkey seed).
    pub credentials_file: Option<std::path::PathBuf>,
    /// The CA that signed the server's certificate; TLS is then required.
    pub ca_file: Option<std::path::PathBuf>,
    /// The inbox prefix its user may subscribe to (JetStream acks come there).
    pub inbox_prefix: Option<String>,
}

/// A limit on the total messages a simulator run may publish, raised from outside (see
/// [`SimConfig::gate`]). Publishers may overshoot it by one message per connection.
#[derive(Debug)]
pub struct PublishGate {
    limit: AtomicU64,
    raised: tokio::sync::Notify,
}

impl PublishGate {
    /// A gate that lets `limit` messages through before it is first raised.
    pub fn new(limit: u64) -> Arc<PublishGate> {
        Arc::new(PublishGate {
            limit: AtomicU64::new(limit),
            raised: tokio::sync::Notify::new(),
        })
    }

    /// Lets publishing continue up to `limit` messages in all (never lowers the limit).
    pub fn raise_to(&self, limit: u64) {
        if self.limit.fetch_max(limit, Ordering::Relaxed) < limit {
            self.raised.notify_waiters();
        }
    }

    /// The current limit.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig::new("nats://127.0.0.1:4222")
    }
}

impl SimConfig {
    /// Defaults against the server at `nats_url`.
    pub fn new(nats_url: impl Into<String>) -> SimConfig {
        SimConfig {
            nats_url: nats_url.into(),
            devices: 100,
            payload: PayloadForm::Plain,
            rate: None,
            duration: None,
            connections: 4,
            max_in_flight: 2048,
            ack_timeout: Duration::from_secs(10),
            template: SubjectTemplate::default(),
            device_prefix: "v".to_string(),
            seed: 1,
            msg_ids: false,
            max_messages: None,
            flat_out: false,
            ticks_per_message: 1,
            clock_from: None,
            gate: None,
            auth: None,
        }
    }

    /// Checks the configuration, reporting every problem at once.
    pub fn validate(&self) -> Result<(), SimError> {
        let mut problems = Vec::new();
        let mut within = |name: &str, value: usize, max: usize| {
            if value == 0 || value > max {
                problems.push(format!("{name} must be between 1 and {max}, not {value}"));
            }
        };
        within("devices", self.devices, MAX_DEVICES);
        within("connections", self.connections, MAX_CONNECTIONS);
        within("max_in_flight", self.max_in_flight, MAX_IN_FLIGHT);
        within(
            "ticks_per_message",
            self.ticks_per_message,
            MAX_TICKS_PER_MESSAGE,
        );
        if self.ticks_per_message > 1 && self.payload != PayloadForm::LineProtocol {
            problems.push(format!(
                "ticks_per_message applies to line protocol only, not to {} payloads",
                self.payload
            ));
        }
        if self.ack_timeout.is_zero() || self.ack_timeout > MAX_ACK_TIMEOUT {
            problems.push(format!(
                "ack_timeout must be longer than zero and at most {} s",
                MAX_ACK_TIMEOUT.as_secs()
            ));
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0) {
                problems.push(format!("rate must be a positive number, not {rate}"));
            }
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            problems.push("duration must be longer than zero".to_string());
        }
        let example = self.device_id(self.devices.saturating_sub(1));
        if !is_valid_token(&example) {
            problems.push(format!(
                "device_prefix {:?} gives ids like {example:?}: use letters, digits, '-' or '_'",
                self.device_prefix
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SimError::Config(problems))
        }
    }

    /// The id of device `index`: the prefix and the index padded to at least 5 digits,
    /// wide enough for the whole fleet so ids sort in index order.
    pub fn device_id(&self, index: usize) -> String {
        let width = id_width(self.devices);
        format!("{}{index:0width$}", self.device_prefix)
    }
}

/// Digits in device ids for a fleet of `devices`: at least 5, enough for the largest index.
fn id_width(devices: usize) -> usize {
    devices.saturating_sub(1).to_string().len().max(5)
}

/// Counters of a run so far; handed to the progress callback once a second.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SimStats {
    /// Messages handed to the connection (the broker has not necessarily stored them yet).
    pub published: u64,
    /// Messages the stream acknowledged, duplicates included.
    pub acknowledged: u64,
    /// Publishes that failed, acknowledgements that reported an error or timed out.
    pub errors: u64,
    /// Acknowledgements saying the stream already held that `Nats-Msg-Id`.
    pub duplicates: u64,
    /// Readings in the published messages; a line-protocol message carries several.
    pub readings: u64,
    /// Published messages still waiting for their acknowledgement.
    pub in_flight: u64,
    /// Seconds since the simulator started publishing.
    pub elapsed_secs: f64,
    /// Messages published per second: since the previous report in progress reports,
    /// over the whole run in a [`SimSummary`].
    pub publish_rate: f64,
    /// Acknowledgements per second, over the same span as `publish_rate`.
    pub ack_rate: f64,
    /// Readings published per second, over the same span as `publish_rate`.
    pub readings_rate: f64,
    /// The most recent error, to show why `errors` grows.
    pub last_error: Option<String>,
}

/// Why a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The shutdown future resolved (Ctrl-C).
    Shutdown,
    /// [`SimConfig::duration`] elapsed.
    Duration,
    /// [`SimConfig::max_messages`] were published.
    MaxMessages,
}

/// The outcome of a run: final counters with rates over the whole run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimSummary {
    /// Final counters; every acknowledgement has arrived or timed out.
    #[serde(flatten)]
    pub stats: SimStats,
    /// Why the run ended.
    pub stopped_by: StopReason,
    /// Devices simulated.
    pub devices: usize,
    /// Connections used.
    pub connections: usize,
    /// Payload form used.
    pub payload: PayloadForm,
    /// Flat-out line protocol: the newest device timestamp published (Unix microseconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_end: Option<i64>,
}

/// Why the simulator could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The configuration is invalid; every problem is listed.
    #[error("invalid simulator configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    /// The first connection to the server failed (later disconnects are retried forever).
    #[error("cannot connect to NATS at {url}")]
    Connect {
        /// The server address as configured.
        url: String,
        /// What the client library reported.
        #[source]
        source: async_nats::ConnectError,
    },
    /// Nothing answers publishes on the telemetry subjects: no stream captures them.
    #[error(
        "no JetStream stream captures {subject:?} (the server answered \"no responders\"): \
         start `fleetpipe up` or `fleetpipe collect` first, which create the telemetry \
         stream, or create a stream capturing {filter:?}"
    )]
    NoStream {
        /// A subject the fleet publishes on.
        subject: String,
        /// The filter a stream needs to capture the fleet's subjects (`vehicle.>`).
        filter: String,
    },
    /// Every publish failed before anything was acknowledged, for another reason.
    #[error("publishing to JetStream fails and nothing was acknowledged")]
    Publish {
        /// The last failure.
        #[source]
        source: jetstream::context::PublishError,
    },
    /// A simulator task panicked or was cancelled; a bug.
    #[error("a simulator task failed: {0}")]
    Task(String),
}

impl SimError {
    /// Whether the problem is in the setup (configuration, server, stream) rather than a
    /// bug: running again after fixing the setup will work.
    pub fn is_setup_problem(&self) -> bool {
        !matches!(self, SimError::Task(_))
    }
}

/// Counters shared by the connection tasks. Relaxed atomics: they are statistics, read
/// once a second, and no decision depends on their order.
#[derive(Default)]
struct Counters {
    published: AtomicU64,
    acknowledged: AtomicU64,
    duplicates: AtomicU64,
    readings: AtomicU64,
    publish_errors: AtomicU64,
    ack_errors: AtomicU64,
    /// Messages claimed against `max_messages`.
    claimed: AtomicU64,
    /// Set by the first successful acknowledgement; until then failures count towards
    /// giving up early.
    any_acked: AtomicBool,
    early_failures: AtomicU64,
    /// Only the slow path (an error) takes this lock, to keep the latest message.
    last_error: Mutex<Option<String>>,
}

/// What the connection tasks share: counters and the stop signal.
struct Shared {
    counters: Counters,
    stop: watch::Sender<bool>,
    /// The newest flat-out line-protocol tick published (`i64::MIN`: none).
    clock_end: std::sync::atomic::AtomicI64,
}

impl Shared {
    fn request_stop(&self) {
        self.stop.send_replace(true);
    }

    fn snapshot(&self) -> SimStats {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (published, acknowledged, ack_errors) = (
            load(&c.published),
            load(&c.acknowledged),
            load(&c.ack_errors),
        );
        SimStats {
            published,
            acknowledged,
            errors: load(&c.publish_errors) + ack_errors,
            duplicates: load(&c.duplicates),
            readings: load(&c.readings),
            in_flight: published.saturating_sub(acknowledged + ack_errors),
            last_error: c.last_error.lock().map(|e| e.clone()).unwrap_or_default(),
            ..SimStats::default()
        }
    }
}

/// Runs the simulator until `shutdown` resolves, [`SimConfig::duration`] elapses or
/// [`SimConfig::max_messages`] were published, whichever comes first. Then it stops
/// publishing, waits for every outstanding acknowledgement (each bounded by
/// [`SimConfig::ack_timeout`]) and returns the final counters.
///
/// `progress` is called about once a second with the counters so far and the rates since
/// the previous call; a CLI prints a progress line from it. Pass `std::future::pending()`
/// as `shutdown` to run until the duration or message limit, or `tokio::signal::ctrl_c()`
/// (mapped to `()`) to stop on Ctrl-C.
///
/// Fails fast, without publishing further, when the configuration is invalid, the first
/// connection cannot be made, or the first publishes all fail (most often because no
/// stream captures the subjects: [`SimError::NoStream`]). Later errors are counted in
/// [`SimStats::errors`] and the run goes on, riding out reconnects.
pub async fn run<S, P>(cfg: SimConfig, shutdown: S, progress: P) -> Result<SimSummary, SimError>
where
    S: Future<Output = ()> + Send,
    P: FnMut(&SimStats) + Send,
{
    cfg.validate()?;
    let connections = cfg.connections.min(cfg.devices);
    let mut plan = Plan::new(&cfg)?;
    let contexts = connect_all(&cfg, connections).await?;
    let fleets = build_fleet(&cfg, connections).await?;
    // Round 0 starts now that every device exists, so the first second runs at full rate.
    plan.start_clock();
    let plan = Arc::new(plan);

    let (stop, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        counters: Counters::default(),
        stop,
        clock_end: std::sync::atomic::AtomicI64::new(i64::MIN),
    });
    let mut tasks = JoinSet::new();
    for (js, devices) in contexts.into_iter().zip(fleets) {
        let worker = Worker::new(js, devices, plan.clone(), shared.clone());
        tasks.spawn(worker.run());
    }
    tracing::info!(
        devices = cfg.devices,
        connections,
        payload = %cfg.payload,
        rate = ?cfg.rate,
        flat_out = cfg.flat_out,
        "simulator started"
    );

    let start = plan.start;
    let stopped_by =
        supervise(&mut tasks, &shared, start, cfg.duration, shutdown, progress).await?;
    let stats = with_rates(
        shared.snapshot(),
        start,
        &(start, SimStats::default()),
        Instant::now(),
    );
    let summary = SimSummary {
        stats,
        stopped_by,
        devices: cfg.devices,
        connections,
        payload: cfg.payload,
        clock_end: Some(shared.clock_end.load(Ordering::Relaxed)).filter(|&t| t != i64::MIN),
    };
    tracing::info!(
        published = summary.stats.published,
        acknowledged = summary.stats.acknowledged,
        errors = summary.stats.errors,
        "simulator stopped"
    );
    Ok(summary)
}

/// Waits for the workers to finish, reporting progress every second and telling them to
/// stop on shutdown, at the deadline or when one fails. The workers stop by themselves
/// when the message budget is spent.
async fn supervise<S, P>(
    tasks: &mut JoinSet<Result<(), SimError>>,
    shared: &Shared,
    start: Instant,
    duration: Option<Duration>,
    shutdown: S,
    mut progress: P,
) -> Result<StopReason, SimError>
where
    S: Future<Output = ()> + Send,
    P: FnMut(&SimStats) + Send,
{
    // A duration too long to represent means no deadline.
    let deadline = duration.and_then(|d| start.checked_add(d));
    let second = Duration::from_secs(1);
    let mut ticker = tokio::time::interval_at(start + second, second);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut previous = (start, SimStats::default());
    let mut stopped_by = None;
    let mut failure = None;
    tokio::pin!(shutdown);
    loop {
        let until_deadline = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut shutdown, if stopped_by.is_none() => {
                stopped_by = Some(StopReason::Shutdown);
                shared.request_stop();
            }
            () = until_deadline, if stopped_by.is_none() => {
                stopped_by = Some(StopReason::Duration);
                shared.request_stop();
            }
            joined = tasks.join_next() => match joined {
                None => break,
                // A worker ends unasked only when the message budget is spent.
                Some(Ok(Ok(()))) => {
                    stopped_by.get_or_insert(StopReason::MaxMessages);
                    shared.request_stop();
                }
                Some(Ok(Err(e))) => {
                    failure.get_or_insert(e);
                    shared.request_stop();
                }
                Some(Err(e)) => {
                    failure.get_or_insert(SimError::Task(e.to_string()));
                    shared.request_stop();
                }
            },
            _ = ticker.tick() => {
                let now = Instant::now();
                let stats = with_rates(shared.snapshot(), start, &previous, now);
                progress(&stats);
                previous = (now, stats);
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(stopped_by.unwrap_or(StopReason::MaxMessages)),
    }
}

/// Fills in elapsed time and the rates since `previous`.
fn with_rates(
    mut stats: SimStats,
    start: Instant,
    previous: &(Instant, SimStats),
    now: Instant,
) -> SimStats {
    let span = now.duration_since(previous.0).as_secs_f64().max(1e-9);
    let rate = |now: u64, before: u64| now.saturating_sub(before) as f64 / span;
    stats.elapsed_secs = now.duration_since(start).as_secs_f64();
    stats.publish_rate = rate(stats.published, previous.1.published);
    stats.ack_rate = rate(stats.acknowledged, previous.1.acknowledged);
    stats.readings_rate = rate(stats.readings, previous.1.readings);
    stats
}

/// Creates every connection's share of the fleet, in parallel and off the async threads:
/// half a million devices take a moment.
async fn build_fleet(cfg: &SimConfig, connections: usize) -> Result<Vec<Vec<Device>>, SimError> {
    let (seed, devices) = (cfg.seed, cfg.devices);
    let builds = (0..connections).map(|conn| {
        tokio::task::spawn_blocking(move || share_of_fleet(seed, devices, connections, conn))
    });
    futures::future::try_join_all(builds)
        .await
        .map_err(|e| SimError::Task(e.to_string()))
}

/// Opens one connection per worker, all at once.
async fn connect_all(
    cfg: &SimConfig,
    connections: usize,
) -> Result<Vec<jetstream::Context>, SimError> {
    let attempts = (0..connections).map(|_| connect(cfg));
    futures::future::try_join_all(attempts).await
}

async fn connect(cfg: &SimConfig) -> Result<jetstream::Context, SimError> {
    let mut options = async_nats::ConnectOptions::new();
    if let Some(auth) = &cfg.auth {
        if let Some(creds) = &auth.credentials_file {
            options = async_nats::ConnectOptions::with_credentials_file(creds)
                .await
                .map_err(|e| {
                    SimError::Config(vec![format!(
                        "cannot read credentials {}: {e}",
                        creds.display()
                    )])
                })?;
        }
        if let Some(ca) = &auth.ca_file {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let Some(prefix) = &auth.inbox_prefix {
            options = options.custom_inbox_prefix(prefix);
        }
    }
    let client = options
        .name(CONNECTION_NAME)
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => {
                    tracing::warn!("simulator disconnected from nats")
                }
                async_nats::Event::Connected => tracing::info!("simulator connected to nats"),
                other => tracing::debug!(event = %other, "nats event"),
            }
        })
        .connect(cfg.nats_url.as_str())
        .await
        .map_err(|source| SimError::Connect {
            url: cfg.nats_url.clone(),
            source,
        })?;
    Ok(crate::publish::context(
        client,
        cfg.max_in_flight,
        cfg.ack_timeout,
    ))
}

/// Exponential backoff from 100 ms, capped at 5 s: quick after a blip, gentle on a server
/// that stays down.
fn reconnect_delay(attempts: usize) -> Duration {
    let exp = attempts.min(16) as u32;
    Duration::from_millis(100u64.saturating_mul(1 << exp.min(6))).min(Duration::from_secs(5))
}

/// The wall-clock time `at`, from an instant pair taken together at start.
fn wall_time(start: Instant, wall_start: Timestamp, at: Instant) -> Timestamp {
    let micros = at.duration_since(start).as_micros();
    wall_start.saturating_add_micros(i64::try_from(micros).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_forms_parse_and_print() {
        for form in [
            PayloadForm::Plain,
            PayloadForm::Json,
            PayloadForm::LineProtocol,
        ] {
            assert_eq!(form.to_string().parse::<PayloadForm>(), Ok(form));
        }
        assert_eq!("JSON".parse(), Ok(PayloadForm::Json));
        let err = "xml".parse::<PayloadForm>().unwrap_err().to_string();
        assert!(err.contains("plain, json or lp"), "{err}");
    }

    #[test]
    fn device_ids_are_padded_for_the_fleet() {
        let mut cfg = SimConfig::default();
        assert_eq!(cfg.device_id(42), "v00042");
        cfg.devices = 520_000;
        assert_eq!(cfg.device_id(42), "v000042");
    }

    #[test]
    fn validation_reports_every_problem() {
        let cfg = SimConfig {
            devices: 0,
            connections: 0,
            rate: Some(-1.0),
            device_prefix: "a.b".into(),
            ..SimConfig::default()
        };
        match cfg.validate() {
            Err(SimError::Config(problems)) => assert_eq!(problems.len(), 4, "{problems:?}"),
            other => panic!("expected a config error, got {other:?}"),
        }
        let cfg = SimConfig {
            ticks_per_message: 10,
            ..SimConfig::default()
        };
        match cfg.validate() {
            Err(SimError::Config(problems)) => {
                assert!(problems[0].contains("line protocol only"), "{problems:?}")
            }
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn ticks_per_message_is_refused_outside_its_range() {
        let lp = |ticks| SimConfig {
            payload: PayloadForm::LineProtocol,
            ticks_per_message: ticks,
            ..SimConfig::default()
        };
        for ticks in [0, MAX_TICKS_PER_MESSAGE + 1, usize::MAX] {
            match lp(ticks).validate() {
                Err(SimError::Config(problems)) => assert!(
                    problems[0].contains("ticks_per_message must be between 1 and"),
                    "{problems:?}"
                ),
                other => panic!("{ticks}: expected a config error, got {other:?}"),
            }
        }
        assert!(lp(1).validate().is_ok());
        assert!(lp(MAX_TICKS_PER_MESSAGE).validate().is_ok());
    }

    #[test]
    fn reconnect_backoff_grows_and_is_capped() {
        assert_eq!(reconnect_delay(0), Duration::from_millis(100));
        assert!(reconnect_delay(3) > reconnect_delay(1));
        assert_eq!(reconnect_delay(1000), Duration::from_secs(5));
    }
}
