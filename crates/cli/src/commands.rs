//! One function per subcommand. Long-running ones stop on Ctrl-C or SIGTERM, in order:
//! sources first (the simulator), then the collectors finish the batch in hand, then the
//! aggregator, then the HTTP API, then the managed nats-server.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use fleetpipe_api::tags::{self, Pick};
use fleetpipe_device::simulate::{self, PayloadForm, SimAuth, SimConfig, SimStats};
use fleetpipe_pipeline::aggregator::Aggregator;
use fleetpipe_pipeline::broker::{self, Broker};
use fleetpipe_pipeline::collector::Collector;
use fleetpipe_pipeline::nats_server::{self, ManagedNats, ManagedOptions};
use fleetpipe_pipeline::security::{Secure, Service};
use fleetpipe_pipeline::{inspect, Config, Stats, StatsSnapshot};
use fleetpipe_proto::Timestamp;
use fleetpipe_store::{Range, Store};
use tokio_util::sync::CancellationToken;

use crate::args::*;
use crate::output::{print_json, thousands};

pub async fn run(cli: Cli) -> Result<()> {
    let mut config = load_config(&cli.global)?;
    if !matches!(
        cli.command,
        Command::Up(_) | Command::Bench(_) | Command::Config(_)
    ) {
        config = local_admin(config);
    }
    match cli.command {
        Command::Up(a) => up(config, a).await,
        Command::Collect(a) => {
            if let Some(w) = a.workers {
                config.collector.workers = w;
            }
            validate(&config)?;
            collect(config, a.json).await
        }
        Command::Aggregate(a) => {
            if let Some(i) = a.interval {
                config.aggregator.interval = i;
            }
            validate(&config)?;
            aggregate(config, a.json).await
        }
        Command::Serve(a) => {
            if let Some(h) = a.http {
                config.api.http = h;
            }
            a.api.apply(&mut config.api);
            validate(&config)?;
            serve(config).await
        }
        Command::Simulate(a) => simulate_cmd(config, a).await,
        Command::Init => init(config).await,
        Command::State(a) => state(config, a).await,
        Command::History(a) => history(config, a).await,
        Command::DeadLetters(a) => dead_letters(config, a).await,
        Command::Bench(a) => crate::bench::run(config, cli.global.store.clone(), a).await,
        Command::Token(a) => crate::token_cmd::run(config, a).await,
        Command::Device(d) => crate::device_cmd::run(config, d).await,
        Command::Config(a) => {
            if a.json {
                print_json(&config)
            } else {
                print!("{}", toml::to_string_pretty(&config)?);
                Ok(())
            }
        }
    }
}

/// File (explicit, or ./fleetpipe.toml when present), then environment and flags.
fn load_config(g: &Global) -> Result<Config> {
    let default_file = Path::new("fleetpipe.toml");
    let mut config = match &g.config {
        Some(path) => Config::from_file(path)?,
        None if default_file.is_file() => Config::from_file(default_file)?,
        None => Config::default(),
    };
    if let Some(u) = &g.nats_url {
        config.nats.url = u.clone();
    }
    if let Some(s) = &g.store {
        config.store.url = s.clone();
    }
    if let Some(d) = &g.data_dir {
        config.data_dir = d.clone();
    }
    if let Some(t) = &g.subject_template {
        config.subjects.template = t.clone();
    }
    if let Some(w) = g.state_window {
        config.collector.state_window = w;
    }
    if let Ok(bin) = std::env::var("FLEETPIPE_NATS_SERVER") {
        config.nats.server_bin = bin;
    }
    if let Ok(p) = std::env::var("FLEETPIPE_NATS_PASSWORD") {
        config.nats.password = Some(fleetpipe_pipeline::config::Secret::new(p));
    }
    Ok(config)
}

/// Against the managed server of a `fleetpipe up --secure` (no --nats-url or a loopback
/// one, no credentials configured), commands connect as its admin user.
fn local_admin(config: Config) -> Config {
    let n = &config.nats;
    let configured =
        !n.credentials.is_empty() || !n.nkey_seed_file.is_empty() || !n.user.is_empty();
    let local = n.url.is_empty()
        || ["127.0.0.1", "localhost", "[::1]"]
            .iter()
            .any(|h| n.url.contains(&format!("://{h}:")));
    if !local || configured || !ManagedNats::was_secure(&config.data_dir) {
        return config;
    }
    match Secure::open(&config.data_dir) {
        Ok(secure) => secure.service_config(&config, Service::Admin),
        Err(_) => config,
    }
}

pub(crate) fn validate(config: &Config) -> Result<()> {
    config.validate()?;
    Ok(())
}

/// The URL clients connect to when none is configured: the managed server's port.
fn nats_url(config: &Config) -> String {
    if config.nats.url.is_empty() {
        format!("nats://127.0.0.1:{}", config.nats.port)
    } else {
        config.nats.url.clone()
    }
}

async fn open_store(config: &Config) -> Result<Arc<dyn Store>> {
    let url = config.store_url();
    create_store_dir(&url)?;
    fleetpipe_store::open(&url)
        .await
        .with_context(|| format!("cannot open the store at {}", redact(&url)))
}

/// Opens the store for a long-running service (`collect`, `aggregate`): while the database
/// cannot be reached (PostgreSQL restarting), waits and retries instead of exiting, so a
/// collector restarted during an outage starts working when the database is back. Any
/// other error (a wrong password, a bad URL) stops it at once.
async fn open_store_waiting(config: &Config) -> Result<Arc<dyn Store>> {
    let url = config.store_url();
    create_store_dir(&url)?;
    let mut delay = Duration::from_millis(500);
    loop {
        match fleetpipe_store::open(&url).await {
            Ok(store) => return Ok(store),
            Err(e) if e.is_unreachable() => {
                tracing::warn!(error = %e, retry_in = ?delay, store = %redact(&url), "the store is unreachable; waiting for it");
                tokio::select! {
                    _ = shutdown_signal() => anyhow::bail!("stopped while waiting for the store"),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot open the store at {}", redact(&url)))
            }
        }
    }
}

/// Creates the directory of a SQLite store's file.
fn create_store_dir(url: &str) -> Result<()> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        if let Some(parent) = Path::new(path).parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
    }
    Ok(())
}

/// Hides a password in a URL before it is printed.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

pub(crate) async fn connect(config: &Config, name: &str) -> Result<(async_nats::Client, Broker)> {
    let client = broker::connect(&nats_url(config), config, name).await?;
    let b = broker::ensure_or_open(&client, config).await?;
    Ok((client, b))
}

/// Sends what the client still buffers (acks), giving up after 5 s when the server is gone.
async fn flush(client: &async_nats::Client) {
    let _ = tokio::time::timeout(Duration::from_secs(5), client.flush()).await;
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn init(config: Config) -> Result<()> {
    validate(&config)?;
    let (_client, _broker) = connect(&config, "fleetpipe-init").await?;
    let store = open_store(&config).await?;
    eprintln!(
        "broker objects ready on {}; store {} ready ({})",
        nats_url(&config),
        store.kind(),
        redact(&config.store_url())
    );
    Ok(())
}

async fn up(mut config: Config, a: UpArgs) -> Result<()> {
    if a.secure && !config.nats.url.is_empty() {
        bail!(
            "--secure secures the nats-server that `up` manages; with --nats-url, give the \
             credentials and TLS settings in the [nats] section of the configuration"
        );
    }
    if let Some(w) = a.workers {
        config.collector.workers = w;
    }
    if let Some(p) = a.nats_port {
        config.nats.port = p;
    }
    if let Some(i) = a.interval {
        config.aggregator.interval = i;
    }
    if let Some(h) = &a.http {
        config.api.http = h.clone();
    }
    a.api.apply(&mut config.api);
    validate(&config)?;
    let payload: PayloadForm = a.sim.payload.parse()?;

    let listen = a.nats_listen.unwrap_or_else(|| {
        std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, config.nats.port))
    });
    let mut secure = None;
    let managed = if config.nats.url.is_empty() {
        nats_server::check_listen(listen, a.secure)?;
        let bin = nats_server::find_binary(&config.nats.server_bin)?;
        if a.secure {
            let mut names = a.tls_names.clone();
            if !listen.ip().is_unspecified() && !listen.ip().is_loopback() {
                names.push(listen.ip().to_string());
            }
            secure = Some(Secure::init(&config.data_dir, &config, &names)?);
        }
        let options = ManagedOptions {
            listen,
            secure: secure.as_ref(),
        };
        let server = ManagedNats::start(&bin, &config.data_dir, options).await?;
        if let Some(s) = &secure {
            tracing::info!(url = %server.url(), listen = %listen, ca = %s.ca_cert().display(), data = %config.data_dir.display(), "managed nats-server started: JWT authentication and TLS; devices need `fleetpipe device add ID`");
        } else {
            tracing::warn!(url = %server.url(), listen = %listen, data = %config.data_dir.display(), "managed nats-server started UNAUTHENTICATED: anyone who reaches {listen} can publish as any device and read everything (loopback only; --secure adds JWT authentication and TLS)");
        }
        config.nats.url = server.url();
        Some(server)
    } else {
        None
    };
    let result = run_up(&config, &a, payload, secure.as_ref()).await;
    if let Some(server) = managed {
        server.stop().await;
        tracing::info!("managed nats-server stopped");
    }
    result
}

/// A service's own connection and broker handles in secure mode (its user opens, never
/// creates); `None` otherwise, when the services share `up`'s connection.
async fn service_connection(
    config: &Config,
    secure: Option<&Secure>,
    service: Service,
) -> Result<Option<(async_nats::Client, Broker)>> {
    let Some(s) = secure else { return Ok(None) };
    let cfg = s.service_config(config, service);
    let client = broker::connect(
        &cfg.nats.url,
        &cfg,
        &format!("fleetpipe-{}", service.name()),
    )
    .await?;
    let b = broker::open(&client, &cfg)
        .await
        .with_context(|| format!("the {} user cannot open the broker objects", service.name()))?;
    Ok(Some((client, b)))
}

async fn run_up(
    config: &Config,
    a: &UpArgs,
    payload: PayloadForm,
    secure: Option<&Secure>,
) -> Result<()> {
    // In secure mode this is the admin user, which creates the broker objects; each service
    // then connects with its own user.
    let admin_config = match secure {
        Some(s) => s.service_config(config, Service::Admin),
        None => config.clone(),
    };
    let (client, broker) = connect(&admin_config, "fleetpipe-up").await?;
    let api_conn = service_connection(config, secure, Service::Api).await?;
    let collector_conn = service_connection(config, secure, Service::Collector).await?;
    let aggregator_conn = service_connection(config, secure, Service::Aggregator).await?;
    fn pick<'a>(own: &'a Option<(async_nats::Client, Broker)>, shared: &'a Broker) -> &'a Broker {
        own.as_ref().map_or(shared, |(_, b)| b)
    }
    let store = open_store(config).await?;
    // The API reads through a handle of its own (a small pool of its own with PostgreSQL),
    // so its queries never wait for the collectors' connections, nor hold them.
    let url = config.store_url();
    let api_store = fleetpipe_api::open_store(&url, &config.api)
        .await
        .with_context(|| format!("cannot open the store at {} for the API", redact(&url)))?;
    let stats = Arc::new(Stats::default());
    let api_client = api_conn
        .as_ref()
        .map_or_else(|| client.clone(), |(c, _)| c.clone());
    let api = fleetpipe_api::start(
        config,
        api_client,
        pick(&api_conn, &broker),
        api_store,
        stats.clone(),
    )
    .await?;
    tracing::info!("dashboard on {}", api.url());
    tracing::info!(
        nats = %config.nats.url,
        store = %redact(&config.store_url()),
        subjects = ?config.capture_subjects()?,
        workers = config.collector.workers,
        "fleetpipe is up; Ctrl-C stops it"
    );

    let stop_pipeline = CancellationToken::new();
    let cb = pick(&collector_conn, &broker);
    let collector = Arc::new(Collector::new(
        config,
        cb.js.clone(),
        cb.consumer.clone(),
        store.clone(),
        stats.clone(),
    )?);
    let collectors = tokio::spawn(collector.run(config.collector.workers, stop_pipeline.clone()));
    let ab = pick(&aggregator_conn, &broker);
    let aggregator = tokio::spawn(
        Aggregator::new(
            config,
            ab.state.clone(),
            ab.leases.clone(),
            store.clone(),
            stats.clone(),
        )
        .run(stop_pipeline.clone()),
    );

    let stop_sim = CancellationToken::new();
    let sim_stats: Arc<std::sync::Mutex<SimStats>> = Arc::default();
    let simulator = (a.simulate > 0).then(|| {
        let mut sim = SimConfig::new(config.nats.url.clone());
        sim.devices = a.simulate;
        sim.payload = payload;
        sim.rate = a.sim.rate;
        sim.duration = a.sim.duration;
        sim.connections = a.sim.connections;
        sim.auth = match secure {
            Some(s) => sim_auth(&s.service_config(config, Service::Simulator)),
            None => sim_auth(config),
        };
        if let Ok(t) = config.template() {
            sim.template = t;
        }
        let stop = stop_sim.clone();
        let shared = sim_stats.clone();
        tokio::spawn(async move {
            simulate::run(sim, stop.cancelled_owned(), move |s| {
                if let Ok(mut g) = shared.lock() {
                    *g = s.clone();
                }
            })
            .await
        })
    });

    let progress = tokio::spawn(progress_lines(
        stats.clone(),
        broker.consumer.clone(),
        sim_stats.clone(),
    ));
    let mut simulator = simulator;
    tokio::select! {
        _ = shutdown_signal() => tracing::info!("stopping: simulator, then collectors, then aggregator"),
        Some(result) = async { match simulator.as_mut() { Some(h) => Some(h.await), None => None } } => {
            simulator = None;
            match result {
                Ok(Ok(summary)) => tracing::info!(published = summary.stats.published, "simulation finished; still collecting, Ctrl-C stops"),
                Ok(Err(e)) => tracing::error!(error = %e, "simulator stopped"),
                Err(e) => tracing::error!(error = %e, "simulator task failed"),
            }
            shutdown_signal().await;
        }
    }
    stop_sim.cancel();
    if let Some(h) = simulator {
        if let Ok(Ok(summary)) = h.await {
            eprintln!(
                "simulator: published {}, acknowledged {}, errors {}",
                thousands(summary.stats.published),
                thousands(summary.stats.acknowledged),
                summary.stats.errors
            );
        }
    }
    drain(broker.consumer.clone()).await;
    stop_pipeline.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), collectors).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), aggregator).await;
    api.stop(Duration::from_secs(5)).await;
    progress.abort();
    for (c, _) in [&api_conn, &collector_conn, &aggregator_conn]
        .into_iter()
        .flatten()
    {
        flush(c).await;
    }
    flush(&client).await;
    print_counters(&stats.snapshot());
    Ok(())
}

/// Lets the collectors catch up with what the simulator published, for up to 10 s; what is
/// left waits safely in JetStream for the next start.
async fn drain(mut consumer: async_nats::jetstream::consumer::PullConsumer) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        match consumer.info().await {
            Ok(i) if i.num_pending == 0 && i.num_ack_pending == 0 => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(_) => return,
        }
    }
    tracing::info!("backlog left in JetStream; the next start collects it");
}

fn print_counters(s: &StatsSnapshot) {
    eprintln!(
        "collected {} messages: {} readings stored, {} duplicates skipped, {} dead letters; \
         aggregator wrote {} rows in {} ticks ({} skipped)",
        thousands(s.messages),
        thousands(s.readings_stored),
        thousands(s.readings_duplicate),
        thousands(s.dead_letters),
        thousands(s.aggregator_rows),
        thousands(s.aggregator_ticks),
        thousands(s.aggregator_skipped),
    );
}

/// A status line every 2 s on a terminal, every 10 s otherwise.
async fn progress_lines(
    stats: Arc<Stats>,
    mut consumer: async_nats::jetstream::consumer::PullConsumer,
    sim: Arc<std::sync::Mutex<SimStats>>,
) {
    let every = if std::io::stderr().is_terminal() {
        2
    } else {
        10
    };
    let mut last = stats.snapshot();
    loop {
        tokio::time::sleep(Duration::from_secs(every)).await;
        let now = stats.snapshot();
        let backlog = consumer.info().await.map(|i| i.num_pending).unwrap_or(0);
        let published = sim.lock().map(|s| s.published).unwrap_or(0);
        eprintln!(
            "ingest {}/s │ stored {} │ dead letters {} │ backlog {} │ snapshots {} rows{}",
            thousands((now.messages - last.messages) / every),
            thousands(now.readings_stored),
            thousands(now.dead_letters),
            thousands(backlog),
            thousands(now.aggregator_rows),
            if published > 0 {
                format!(" │ simulated {}", thousands(published))
            } else {
                String::new()
            },
        );
        last = now;
    }
}

async fn collect(config: Config, json: bool) -> Result<()> {
    let (client, broker) = connect(&config, "fleetpipe-collect").await?;
    let store = open_store_waiting(&config).await?;
    let stats = Arc::new(Stats::default());
    let stop = CancellationToken::new();
    let collector = Arc::new(Collector::new(
        &config,
        broker.js.clone(),
        broker.consumer.clone(),
        store,
        stats.clone(),
    )?);
    tracing::info!(workers = config.collector.workers, consumer = %config.collector.durable, "collecting; Ctrl-C stops");
    let task = tokio::spawn(collector.run(config.collector.workers, stop.clone()));
    shutdown_signal().await;
    tracing::info!("stopping: finishing the batches in hand");
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
    flush(&client).await;
    if json {
        print_json(&stats.snapshot())
    } else {
        print_counters(&stats.snapshot());
        Ok(())
    }
}

/// The HTTP API and dashboard alone: mirrors the latest state, reads the store.
async fn serve(config: Config) -> Result<()> {
    let (client, broker) = connect(&config, "fleetpipe-serve").await?;
    // As in `up`: with PostgreSQL, a pool sized for the API's limit on queries in flight.
    let url = config.store_url();
    create_store_dir(&url)?;
    let store = fleetpipe_api::open_store(&url, &config.api)
        .await
        .with_context(|| format!("cannot open the store at {}", redact(&url)))?;
    let stats = Arc::new(Stats::default());
    let api = fleetpipe_api::start(&config, client.clone(), &broker, store, stats).await?;
    tracing::info!("dashboard on {}; Ctrl-C stops", api.url());
    shutdown_signal().await;
    tracing::info!("stopping: finishing the requests in hand");
    api.stop(Duration::from_secs(5)).await;
    Ok(())
}

async fn aggregate(config: Config, json: bool) -> Result<()> {
    let (client, broker) = connect(&config, "fleetpipe-aggregate").await?;
    let store = open_store_waiting(&config).await?;
    let stats = Arc::new(Stats::default());
    let stop = CancellationToken::new();
    tracing::info!(interval = %humantime::format_duration(config.aggregator.interval), "aggregating; Ctrl-C stops");
    let task = tokio::spawn(
        Aggregator::new(
            &config,
            broker.state.clone(),
            broker.leases.clone(),
            store,
            stats.clone(),
        )
        .run(stop.clone()),
    );
    shutdown_signal().await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    flush(&client).await;
    if json {
        return print_json(&stats.snapshot());
    }
    print_counters(&stats.snapshot());
    Ok(())
}

async fn simulate_cmd(config: Config, a: SimulateArgs) -> Result<()> {
    validate(&config)?;
    let mut sim = SimConfig::new(nats_url(&config));
    sim.devices = a.devices;
    sim.payload = a.sim.payload.parse()?;
    sim.rate = a.sim.rate;
    sim.duration = a.sim.duration;
    sim.connections = a.sim.connections;
    sim.max_messages = a.messages;
    sim.flat_out = a.flat_out;
    if a.lp_ticks != 1 && sim.payload != PayloadForm::LineProtocol {
        bail!("--lp-ticks applies to --payload lp only");
    }
    sim.ticks_per_message = a.lp_ticks;
    sim.msg_ids = a.msg_ids;
    sim.template = config.template()?;
    sim.auth = sim_auth(&config);
    let tty = std::io::stderr().is_terminal();
    let quiet = a.json;
    let summary = simulate::run(
        sim,
        async {
            shutdown_signal().await;
        },
        move |s| {
            if quiet {
                return;
            }
            let line = format!(
                "published {} ({}/s) │ acknowledged {} │ errors {}",
                thousands(s.published),
                thousands(s.publish_rate as u64),
                thousands(s.acknowledged),
                s.errors
            );
            if tty {
                eprint!("\r{line}   ");
            } else {
                eprintln!("{line}");
            }
        },
    )
    .await?;
    if tty && !quiet {
        eprintln!();
    }
    if a.json {
        print_json(&summary)?;
    } else {
        let s = &summary.stats;
        println!(
            "published {} messages ({} readings) in {:.1} s: {} acknowledged, {} duplicates, {} errors",
            thousands(s.published),
            thousands(s.readings),
            s.elapsed_secs,
            thousands(s.acknowledged),
            thousands(s.duplicates),
            thousands(s.errors)
        );
    }
    if summary.stats.errors > 0 {
        bail!("{} publishes failed", summary.stats.errors);
    }
    Ok(())
}

/// The simulator's credentials, CA and inbox prefix from `[nats]`.
fn sim_auth(config: &Config) -> Option<SimAuth> {
    let n = &config.nats;
    let path = |s: &str| (!s.is_empty()).then(|| std::path::PathBuf::from(s));
    let auth = SimAuth {
        credentials_file: path(&n.credentials),
        ca_file: path(&n.tls.ca),
        inbox_prefix: (!n.inbox_prefix.is_empty()).then(|| n.inbox_prefix.clone()),
    };
    (auth.credentials_file.is_some() || auth.ca_file.is_some() || auth.inbox_prefix.is_some())
        .then_some(auth)
}

async fn state(config: Config, a: StateArgs) -> Result<()> {
    // Before anything is touched: the device becomes part of a subject filter.
    if let Some(d) = &a.device {
        inspect::check_device(d)?;
    }
    validate(&config)?;
    let (_client, broker) = connect(&config, "fleetpipe-state").await?;
    let entries = inspect::latest_state(&broker.state, a.device.as_deref()).await?;
    if a.json {
        return print_json(&entries);
    }
    if entries.is_empty() {
        eprintln!(
            "no state yet{}",
            a.device
                .map(|d| format!(" for device {d}"))
                .unwrap_or_default()
        );
        return Ok(());
    }
    println!(
        "{:<16} {:<24} {:>14} {:<8} TIME",
        "DEVICE", "SENSOR", "VALUE", "UNIT"
    );
    for e in entries {
        // A sensor with several tag sets has a row per tag set.
        let series = if e.state.tags.is_empty() {
            e.sensor.clone()
        } else {
            let tags: Vec<String> = e
                .state
                .tags
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!("{}{{{}}}", e.sensor, tags.join(","))
        };
        println!(
            "{:<16} {:<24} {:>14} {:<8} {}",
            e.device,
            series,
            e.state.value,
            e.state.unit.as_deref().unwrap_or("-"),
            e.state.timestamp()
        );
    }
    Ok(())
}

/// `10m` (back from now) or an RFC 3339 time.
fn parse_when(s: &str, now: Timestamp) -> Result<Timestamp> {
    if let Some(t) = Timestamp::parse_rfc3339(s) {
        return Ok(t);
    }
    let d = humantime::parse_duration(s)
        .with_context(|| format!("{s:?} is neither a duration (10m, 2h) nor an RFC 3339 time"))?;
    Ok(now.saturating_add_micros(-(d.as_micros() as i64)))
}

/// A `--tag`: `KEY=VALUE` or `KEY:VALUE`, split at the first `=` or `:`.
fn parse_tag_arg(t: &str) -> Result<(String, String)> {
    match t.find(['=', ':']) {
        Some(i) if i > 0 => {
            let (k, v) = (&t[..i], &t[i + 1..]);
            if let Some(problem) = tags::check_tag(k, v) {
                bail!("invalid --tag {t:?}: {problem}");
            }
            Ok((k.to_string(), v.to_string()))
        }
        _ => bail!("--tag must be KEY=VALUE (cpu=cpu0), got {t:?}"),
    }
}

async fn history(config: Config, a: HistoryArgs) -> Result<()> {
    inspect::check_device(&a.device)?;
    let (sensor, label_tags) = tags::parse_label(&a.sensor)
        .map_err(|problem| anyhow::anyhow!("invalid sensor {:?}: {problem}", a.sensor))?;
    inspect::check_sensor(sensor)?;
    let mut wanted = label_tags.unwrap_or_default();
    for t in &a.tags {
        wanted.push(parse_tag_arg(t)?);
    }
    validate(&config)?;
    let store = open_store(&config).await?;
    let now = Timestamp::now();
    let from = parse_when(&a.since, now)?;
    let to = match &a.until {
        Some(u) => parse_when(u, now)?,
        None => now.saturating_add_micros(1),
    };
    if from >= to {
        bail!("--since must be before --until");
    }
    // The one series asked for among the sensor's tag sets, as the API's series endpoint
    // picks it; none stored at all is an empty history.
    let found = store.series(&a.device, Some(sensor)).await?;
    let show = |t: &[(String, String)]| tags::tag_set(t.iter().map(|(k, v)| (&**k, &**v)));
    let series = match tags::pick(&found, |s| &s.tags, &wanted) {
        Pick::One(s) => Some(s),
        Pick::None if found.is_empty() => None,
        Pick::None => bail!(
            "{} {sensor} has no series with the tags {}; its tag sets: {}",
            a.device,
            show(&wanted),
            tags::list_tag_sets(found.iter().map(|s| &s.tags[..]))
        ),
        Pick::Several(matches) => {
            let sets: Vec<&[(String, String)]> = matches.iter().map(|s| &s.tags[..]).collect();
            let label = tags::label(sensor, sets[0].iter().map(|(k, v)| (&**k, &**v)));
            let hint = match tags::telling_tag(&sets) {
                Some((k, v)) => format!("add --tag {k}={v}, or "),
                None => String::new(),
            };
            bail!(
                "{} {sensor} has {} series{}, told apart by their tags: {}; pick one: {hint}\
                 name it in full as '{label}'",
                a.device,
                matches.len(),
                if wanted.is_empty() {
                    String::new()
                } else {
                    format!(" with the tags {}", show(&wanted))
                },
                tags::list_tag_sets(sets.iter().copied()),
            )
        }
    };
    let points = match series {
        Some(s) => {
            store
                .series_history(&s.key(), Range { from, to }, a.limit)
                .await?
        }
        None => Vec::new(),
    };
    let series_tags = series.map_or_else(Vec::new, |s| s.tags.to_vec());
    let label = tags::label(sensor, series_tags.iter().map(|(k, v)| (&**k, &**v)));
    if a.json {
        let tag_map: serde_json::Map<String, serde_json::Value> = series_tags
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let rows: Vec<_> = points
            .iter()
            .map(|p| {
                serde_json::json!({
                    "ts": p.ts.to_rfc3339(),
                    "value": p.value,
                    "quality": p.quality,
                    "tags": tag_map,
                })
            })
            .collect();
        return print_json(&rows);
    }
    if points.is_empty() {
        eprintln!(
            "no readings of {} {label} between {from} and {to}",
            a.device
        );
        return Ok(());
    }
    println!("# {} {label}", a.device);
    for p in points {
        println!("{}  {}", p.ts, p.value);
    }
    Ok(())
}

async fn dead_letters(config: Config, a: DeadLettersArgs) -> Result<()> {
    validate(&config)?;
    let (_client, broker) = connect(&config, "fleetpipe-dead-letters").await?;
    let letters = inspect::dead_letters(&broker.js, a.limit).await?;
    if a.json {
        return print_json(&letters);
    }
    if letters.is_empty() {
        eprintln!("no dead letters");
    }
    for d in letters {
        let payload: String = d.payload.chars().take(80).collect();
        println!(
            "#{} {} [{}] {}\n    reason: {}\n    payload: {payload:?}",
            d.seq,
            d.received,
            d.codes.join(","),
            d.subject,
            d.reason
        );
    }
    Ok(())
}
