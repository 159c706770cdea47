//! Command-line arguments. Every global option can also come from a `FLEETPIPE_*`
//! environment variable; both override the config file.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "fleetpipe",
    version,
    about = "Real-time telemetry collection for fleets of vehicles and machines, on NATS JetStream.",
    long_about = "Real-time telemetry collection for fleets of vehicles and machines, on NATS JetStream.\n\n\
        Devices publish readings on `vehicle.<device>.<sensor>` (configurable) as a plain number, \
        a JSON object or InfluxDB line protocol. Collectors store them exactly once; the latest \
        state lives in a JetStream KV bucket; the aggregator writes a snapshot row per device per \
        interval.\n\nStart everything on one machine with a simulated fleet:\n  fleetpipe up --simulate 1000",
    after_help = "Configuration: a TOML file (--config, FLEETPIPE_CONFIG, or ./fleetpipe.toml), \
        overridden by FLEETPIPE_* environment variables, overridden by flags. \
        `fleetpipe config` prints the effective configuration."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Config file (TOML). Default: ./fleetpipe.toml when it exists.
    #[arg(long, global = true, env = "FLEETPIPE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// NATS server URL(s), comma-separated. Without it, `up` starts a managed nats-server
    /// and other commands connect to nats://127.0.0.1:<nats.port>.
    #[arg(long, global = true, env = "FLEETPIPE_NATS_URL", value_name = "URL")]
    pub nats_url: Option<String>,
    /// Store URL: postgres://… or sqlite://PATH. Default: sqlite://<data-dir>/fleetpipe.db.
    #[arg(long, global = true, env = "FLEETPIPE_STORE", value_name = "URL")]
    pub store: Option<String>,
    /// Directory for the managed nats-server and the embedded store.
    #[arg(long, global = true, env = "FLEETPIPE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Subject template devices publish on.
    #[arg(
        long,
        global = true,
        env = "FLEETPIPE_SUBJECT_TEMPLATE",
        value_name = "TEMPLATE"
    )]
    pub subject_template: Option<String>,
    /// Collectors put each latest-state key at most once per this window
    /// (collector.state_window; 0 turns coalescing off).
    #[arg(
        long,
        global = true,
        env = "FLEETPIPE_STATE_WINDOW",
        value_name = "DURATION",
        value_parser = parse_duration
    )]
    pub state_window: Option<Duration>,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, global = true, env = "FLEETPIPE_LOG", default_value = "info")]
    pub log: String,
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "FLEETPIPE_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the whole system on one machine: nats-server (unless --nats-url), collectors,
    /// aggregator, the HTTP API and dashboard and, with --simulate, a simulated fleet.
    /// Ctrl-C stops it in order.
    Up(UpArgs),
    /// Run collector workers: JetStream → store + latest state, bad input → dead letters.
    Collect(CollectArgs),
    /// Run the snapshot aggregator (several replicas may run; one writes).
    Aggregate(AggregateArgs),
    /// Run the HTTP API and the dashboard alone (reads NATS and the store).
    Serve(ServeArgs),
    /// Publish simulated vehicle telemetry.
    Simulate(SimulateArgs),
    /// Measure the pipeline against the broker's own ceiling, on a nats-server of its own.
    #[command(long_about = BENCH_ABOUT)]
    Bench(BenchArgs),
    /// Create or update the broker objects and migrate the store, then exit.
    Init,
    /// Print the latest state of every device, or of one.
    State(StateArgs),
    /// Print stored readings of one sensor.
    History(HistoryArgs),
    /// Print the newest dead letters with their reasons.
    DeadLetters(DeadLettersArgs),
    /// Print the effective configuration after files, environment and flags.
    Config(JsonArg),
    /// Manage the HTTP API's bearer tokens (add, list, revoke).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Devices: credentials (add, revoke, list; after `fleetpipe up --secure` made the keys
    /// under the data directory) and live configuration (`device config set|get`).
    #[command(subcommand)]
    Device(crate::device_cmd::DeviceCommand),
}

#[derive(Args, Debug, Clone)]
pub struct JsonArg {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    /// Also run a simulated fleet of this many vehicles.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub simulate: usize,
    #[command(flatten)]
    pub sim: SimOptions,
    /// Collector workers.
    #[arg(long, env = "FLEETPIPE_WORKERS")]
    pub workers: Option<usize>,
    /// Client port of the managed nats-server.
    #[arg(long, env = "FLEETPIPE_NATS_PORT")]
    pub nats_port: Option<u16>,
    /// Aggregator interval (e.g. 1s, 100ms).
    #[arg(long, value_parser = parse_duration)]
    pub interval: Option<Duration>,
    /// Address of the HTTP API and dashboard (IP:PORT; port 0 picks a free one).
    /// Default: api.http, 127.0.0.1:8080.
    #[arg(long, env = "FLEETPIPE_HTTP", value_name = "ADDR")]
    pub http: Option<String>,
    #[command(flatten)]
    pub api: ApiArgs,
    /// Run the managed nats-server with JWT authentication and TLS: an operator, accounts,
    /// a local CA (<data-dir>/tls/ca.pem) and per-service credentials are created under the
    /// data directory at the first start and reused after; each service connects with its
    /// own least-privilege user. Devices need credentials: `fleetpipe device add ID`.
    #[arg(long, env = "FLEETPIPE_SECURE")]
    pub secure: bool,
    /// Client address of the managed nats-server (IP:PORT). Anything but loopback requires
    /// --secure. Default: 127.0.0.1:<--nats-port>.
    #[arg(long, env = "FLEETPIPE_NATS_LISTEN", value_name = "ADDR")]
    pub nats_listen: Option<std::net::SocketAddr>,
    /// With --secure: another name or IP address devices reach the server by, put in its
    /// certificate next to localhost, 127.0.0.1 and ::1 (repeat for several).
    #[arg(long = "tls-name", value_name = "NAME", requires = "secure")]
    pub tls_names: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on (IP:PORT; port 0 picks a free one). Default: api.http,
    /// 127.0.0.1:8080.
    #[arg(long, env = "FLEETPIPE_HTTP", value_name = "ADDR")]
    pub http: Option<String>,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// How the HTTP API authenticates and whether it serves HTTPS.
#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// Bearer tokens: `tokens`, `none`, or `auto` (none on a loopback address, tokens
    /// otherwise). Default: api.auth, auto.
    #[arg(long, env = "FLEETPIPE_API_AUTH", value_name = "MODE")]
    pub api_auth: Option<fleetpipe_pipeline::config::ApiAuth>,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key).
    #[arg(long, env = "FLEETPIPE_API_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<String>,
    /// The certificate's PEM private key.
    #[arg(long, env = "FLEETPIPE_API_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<String>,
}

impl ApiArgs {
    /// Puts the options given over the configuration's `api` section.
    pub fn apply(&self, api: &mut fleetpipe_pipeline::config::ApiConfig) {
        if let Some(mode) = self.api_auth {
            api.auth = mode;
        }
        if let Some(cert) = &self.tls_cert {
            api.tls_cert = cert.clone();
        }
        if let Some(key) = &self.tls_key {
            api.tls_key = key.clone();
        }
    }
}

#[derive(Subcommand, Debug, Clone)]
pub enum TokenCommand {
    /// Create a token and print it, this once: it is stored only as a hash.
    Add(TokenAddArgs),
    /// List the tokens (never their secrets).
    List(JsonArg),
    /// Revoke a token by name or id; every API replica refuses it within a second.
    Revoke(TokenRevokeArgs),
}

#[derive(Args, Debug, Clone)]
pub struct TokenAddArgs {
    /// What the token is for (unique): letters, digits, '-', '_', '.', '@'.
    pub name: String,
    /// read (every read, the live stream), operator (also device configuration and
    /// alerts) or admin (also devices and tokens).
    #[arg(long)]
    pub role: fleetpipe_api::Role,
    /// Print JSON (with the token) instead of the token alone.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct TokenRevokeArgs {
    /// The token's name or id.
    pub name_or_id: String,
}

#[derive(Args, Debug, Clone)]
pub struct CollectArgs {
    /// Collector workers in this process.
    #[arg(long, env = "FLEETPIPE_WORKERS")]
    pub workers: Option<usize>,
    /// Print a JSON summary of the counters at exit.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct AggregateArgs {
    /// Time between snapshot rows (minimum 100ms).
    #[arg(long, value_parser = parse_duration)]
    pub interval: Option<Duration>,
    /// Print a JSON summary of the counters at exit.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct SimOptions {
    /// Payload form: plain (the seed's C publisher), json, or lp (line protocol batches).
    #[arg(long, default_value = "plain")]
    pub payload: String,
    /// Cap on messages per second for the whole fleet (default: each sensor's own rate).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Stop publishing after this long (e.g. 30s, 5m); under `up`, the rest keeps running
    /// until Ctrl-C.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// NATS connections the virtual devices share.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
}

#[derive(Args, Debug, Clone)]
pub struct SimulateArgs {
    /// Number of vehicles.
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    #[command(flatten)]
    pub sim: SimOptions,
    /// Stop after exactly this many messages.
    #[arg(long)]
    pub messages: Option<u64>,
    /// Publish as fast as the broker acknowledges instead of at the sensors' own rates (to
    /// load a backlog or measure a consumer; `--rate` still caps it). Line-protocol
    /// messages then carry ticks 100 ms apart from a day back, never ahead of the clock.
    #[arg(long)]
    pub flat_out: bool,
    /// With --payload lp: 100 ms ticks of one vehicle per message, as a device or Telegraf
    /// flushing a buffer (1: each tick on its own; at most 6000).
    #[arg(long, default_value_t = 1, value_name = "TICKS", value_parser = lp_ticks)]
    pub lp_ticks: usize,
    /// Set a Nats-Msg-Id on every message (broker-side de-duplication).
    #[arg(long)]
    pub msg_ids: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

const BENCH_ABOUT: &str = "Measure the pipeline against the broker's own ceiling, in one run on \
    this machine.\n\n\
    Starts its own nats-server (temporary directory, free port) and, unless --store is given, a \
    temporary SQLite store; --nats-url is not used. Then:\n\
    1. ceiling: simulated vehicles publish through JetStream into a consumer that acks and \
    discards (no decode, no storage), held to at most 20,000 messages ahead of it, so the rate \
    is what the consumer sustains;\n\
    2. pipeline: the same load through a `fleetpipe collect` child process (its peak RSS is \
    read from /proc);\n\
    3. latency: background load at half the pipeline's rate, and probe readings timed from \
    publish to the latest-state bucket and to a queryable row (p50/p99/max);\n\
    4. overload: the publishers flat out, nothing holding them back: the backlog grows in \
    JetStream while the collector's memory is watched, then drains;\n\
    5. accounting: readings acknowledged by the stream against rows stored, dead letters.\n\n\
    Prints a table with each target of the benchmark met or missed (--json: one JSON object on \
    stdout); progress goes to stderr. Exits non-zero only when a reading was lost or stored \
    twice. TMPDIR chooses the disk.";

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Simulated vehicles (GPS, speed, state of charge and torque: 5 readings each).
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// Length of each throughput phase (ceiling, pipeline, overload).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Payload form: plain (one number per message), json, or lp (line-protocol batches).
    #[arg(long, default_value = "plain")]
    pub payload: String,
    /// With --payload lp: 100 ms ticks of one vehicle per message (50: five seconds, about
    /// 46 readings, as a device or Telegraf flushing a buffer; at most 6000).
    #[arg(long, default_value_t = 50, value_name = "TICKS", value_parser = lp_ticks)]
    pub lp_ticks: usize,
    /// Collector workers (and ack-and-discard workers in the ceiling phase). Default: the
    /// configuration's collector.workers.
    #[arg(long)]
    pub workers: Option<usize>,
    /// NATS connections the simulated vehicles share.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Latency probes.
    #[arg(long, default_value_t = 300)]
    pub probes: usize,
    /// Background load, in messages/s, while the latency probes run. Default: half the
    /// pipeline's measured rate.
    #[arg(long, value_name = "MSGS_PER_SEC")]
    pub latency_rate: Option<f64>,
    /// A previous run's --json output: also compare the pipeline's readings/s with it
    /// (e.g. 520,000 devices against 1,000).
    #[arg(long, value_name = "FILE")]
    pub baseline: Option<PathBuf>,
    /// Print one JSON object with every figure on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct StateArgs {
    /// Only this device.
    pub device: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct HistoryArgs {
    pub device: String,
    /// A sensor name (`speed`), or a series label with its tags as `fleetpipe state` and
    /// the API show them (`'cpu.usage_idle{cpu=cpu0,host=h1}'`).
    pub sensor: String,
    /// Only the series with this tag; repeat for several (all must match). Needed when
    /// the sensor has several series told apart by their tags (Telegraf's `cpu=cpu0` …).
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Start: a duration back from now (10m, 2h) or an RFC 3339 time.
    #[arg(long, default_value = "10m")]
    pub since: String,
    /// End: a duration back from now or an RFC 3339 time (default: now).
    #[arg(long)]
    pub until: Option<String>,
    /// Most readings to print.
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct DeadLettersArgs {
    /// How many of the newest to print.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. 250ms, 30s, 10m"))
}

/// `--lp-ticks`: from 1 to the simulator's limit, refused by the flag's name.
fn lp_ticks(s: &str) -> Result<usize, String> {
    let max = fleetpipe_device::simulate::MAX_TICKS_PER_MESSAGE;
    match s.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number of ticks from 1 to {max}")),
    }
}
