//! `fleetpipe bench`: end-to-end figures against the broker's own ceiling, in one run on one
//! machine.
//!
//! Everything runs against a nats-server the bench starts itself, in a temporary directory
//! on a free port, with the telemetry stream exactly as `broker::ensure` makes it:
//!
//! 1. **ceiling** — the simulator into a second durable pull consumer that acks and
//!    discards (same batch size, same pull loop as the collectors, no decode, no store);
//! 2. **pipeline** — the same load through `fleetpipe collect`, run as a child process so
//!    its peak RSS (`VmHWM`) is its own;
//! 3. **latency** — background load at half the pipeline's rate plus probe readings with
//!    known values: publish → latest state (a KV watch), publish → row queryable (polling
//!    `Store::history`);
//! 4. **overload** — the publishers flat out, with nothing holding them back, through the
//!    same collector: the backlog grows in JetStream while the collector's RSS is watched;
//! 5. **accounting** — readings acknowledged by the stream against rows stored, dead
//!    letters, redeliveries.
//!
//! In the ceiling and pipeline phases the load is closed-loop: the publishers are held to
//! at most [`BACKLOG_BOUND`] messages ahead of what the consumer has acknowledged, so each
//! phase measures the rate the consumer sustains, not how fast a queue grows (flat-out
//! publishers would take broker time from the consumer, by an amount that varies from run
//! to run). Rates are what the consumer acknowledged per second while the publishers ran
//! (from the consumer's own counters, after a short warm-up). The targets of issue 4 are
//! printed with the measured figures; missing one is not an error, losing or duplicating a
//! reading is.

use std::future::IntoFuture;
use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use async_nats::jetstream::{self, consumer, consumer::PullConsumer, kv};
use fleetpipe_device::simulate::{self, PayloadForm, PublishGate, SimConfig, SimStats, SimSummary};
use fleetpipe_pipeline::broker;
use fleetpipe_pipeline::collector::BatchPuller;
use fleetpipe_pipeline::config::names;
use fleetpipe_pipeline::nats_server::{self, ManagedNats};
use fleetpipe_pipeline::state::{self, StateValue};
use fleetpipe_pipeline::Config;
use fleetpipe_proto::{encode_json, encode_line_protocol, encode_plain, Timestamp};
use fleetpipe_store::{Range, Store};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::args::BenchArgs;
use crate::output::{print_json, thousands};

/// The durable consumer of the ceiling phase; removed before the pipeline phase.
const CEILING_CONSUMER: &str = "fleetpipe-bench-ceiling";
/// The probe readings' series: a device of its own, so the fleet never overwrites it.
const PROBE_DEVICE: &str = "bench-probe";
const PROBE_SENSOR: &str = "latency";
/// Closed-loop load: most messages the publishers may be ahead of the consumer's acks.
/// Several of the consumer's batches, so it never waits for work.
const BACKLOG_BOUND: u64 = 20_000;
/// How often the closed loop reads the consumer's acks and moves the publishers' limit.
const GATE_EVERY: Duration = Duration::from_millis(20);
/// How often the consumer, the collector's RSS and the backlog are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// How often the probe series is read back from the store.
const HISTORY_POLL: Duration = Duration::from_millis(10);
/// A drain that makes no progress for this long is stuck.
const DRAIN_STALL: Duration = Duration::from_secs(120);
/// Probes not visible after this long count as not seen.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the bench. `store` is the `--store` flag (or `FLEETPIPE_STORE`): the bench never
/// writes into the store a config file names, only into one given explicitly or a
/// temporary SQLite file.
pub async fn run(mut config: Config, store: Option<String>, a: BenchArgs) -> Result<()> {
    let payload: PayloadForm = a.payload.parse()?;
    if a.devices == 0 {
        bail!("--devices must be at least 1");
    }
    if a.probes == 0 {
        bail!("--probes must be at least 1");
    }
    if a.latency_rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        bail!("--latency-rate must be a positive number of messages per second");
    }
    if a.duration < Duration::from_secs(1) {
        bail!("--duration must be at least 1s");
    }
    if let Some(w) = a.workers {
        config.collector.workers = w;
    }
    let baseline = a.baseline.as_deref().map(read_baseline).transpose()?;
    let dir = TempDir::new()?;
    config.data_dir = dir.path().to_path_buf();
    config.store.url =
        store.unwrap_or_else(|| format!("sqlite://{}", dir.path().join("bench.db").display()));
    config.nats.port = free_port()?;
    config.nats.url = String::new();
    config.validate()?;
    if std::env::var_os("FLEETPIPE_NATS_URL").is_some() {
        eprintln!("note: FLEETPIPE_NATS_URL is ignored; the bench starts its own nats-server");
    }

    let bin = nats_server::find_binary(&config.nats.server_bin)?;
    let server = ManagedNats::start(&bin, dir.path(), config.nats.port).await?;
    config.nats.url = server.url();
    let machine = Machine::probe(&bin);
    let bench = Bench {
        progress: Progress::new(),
        nats_pid: find_pid_with_arg(&dir.path().join("nats")),
        config,
        payload,
        dir: dir.path().to_path_buf(),
        a,
    };
    let outcome = tokio::select! {
        r = bench.run(machine, baseline) => r,
        // Ctrl-C or SIGTERM: stop the collector child and nats-server on the way out.
        _ = crate::commands::shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
    };
    server.stop().await;
    drop(dir);
    let report = outcome?;
    if bench.a.json {
        print_json(&report)?;
    } else {
        print_report(&report);
    }
    let r = &report.accounting;
    if r.lost > 0 || r.duplicates > 0 {
        bail!(
            "{} readings lost and {} duplicated: the pipeline broke its guarantee",
            r.lost,
            r.duplicates
        );
    }
    Ok(())
}

struct Bench {
    config: Config,
    /// The managed nats-server's pid, for its CPU time.
    nats_pid: Option<u32>,
    a: BenchArgs,
    payload: PayloadForm,
    dir: PathBuf,
    progress: Progress,
}

impl Bench {
    async fn run(&self, machine: Machine, baseline: Option<Baseline>) -> Result<Report> {
        let client =
            broker::connect(&self.config.nats.url, &self.config, "fleetpipe-bench").await?;
        let broker = broker::ensure(&client, &self.config).await?;
        self.progress.note(&format!(
            "fleetpipe bench: {} devices, {} payload, {} per phase, nats-server {} on {}",
            thousands(self.a.devices as u64),
            self.payload,
            humantime::format_duration(self.a.duration),
            machine.nats_server,
            self.config.nats.url
        ));

        // 1. Ceiling: no collectors' consumer while it runs, or its interest would keep
        //    every message for the pipeline phase.
        broker
            .telemetry
            .delete_consumer(&self.config.collector.durable)
            .await
            .context("cannot remove the collectors' consumer for the ceiling phase")?;
        let ceiling = self.ceiling(&broker.telemetry).await?;
        broker
            .telemetry
            .delete_consumer(CEILING_CONSUMER)
            .await
            .context("cannot remove the ceiling consumer")?;
        broker.telemetry.purge().await?;

        // 2. Pipeline: the collectors' consumer again, and a collector process on it.
        let broker2 = broker::ensure(&client, &self.config).await?;
        let mut consumer = broker2.consumer.clone();
        let store = fleetpipe_store::open(&self.config.store_url())
            .await
            .context("cannot open the store")?;
        let stored_before = store.count_readings().await?;
        let puts_before = state_puts(&broker.js).await?;
        let mut collector = Collector::spawn(&self.config, &self.dir).await?;
        collector.wait_ready(&mut consumer).await?;
        let pid = Some(collector.pid);
        let pipeline = self
            .throughput("pipeline", &mut consumer, pid, Load::Sustained)
            .await?;
        self.drain("pipeline", &mut consumer, pid).await?;
        let puts = state_puts(&broker.js).await?.saturating_sub(puts_before);

        // 3. Latency at half the pipeline's rate.
        let half = self
            .a
            .latency_rate
            .unwrap_or(pipeline.messages_per_sec().0 / 2.0)
            .max(1.0);
        let latency = self.latency(half, &mut consumer, pid).await?;
        self.drain("latency", &mut consumer, pid).await?;

        // 4. Overload: nothing holds the publishers back.
        let overload = self
            .throughput("overload", &mut consumer, pid, Load::FlatOut)
            .await?;
        let drained = self.drain("overload", &mut consumer, pid).await?;

        // 4. Accounting.
        let rss_peak_kb = proc_status_kb(collector.pid, "VmHWM");
        let counters = collector.stop().await?;
        let stored = store.count_readings().await?.saturating_sub(stored_before);
        let dlq = broker
            .js
            .get_stream(names::DLQ_STREAM)
            .await?
            .info()
            .await?
            .state
            .messages;
        let published = pipeline.sim.readings
            + latency.sim.readings
            + latency.probes_acked
            + overload.sim.readings;
        let publish_errors =
            pipeline.sim.errors + latency.sim.errors + latency.probe_errors + overload.sim.errors;
        let accounting = Accounting {
            published_readings: published,
            stored,
            lost: published.saturating_sub(stored),
            duplicates: stored.saturating_sub(published),
            exact: publish_errors == 0,
            publish_errors,
            dead_letters: dlq,
            redelivered: counter(&counters, "redelivered"),
            duplicates_skipped: counter(&counters, "readings_duplicate"),
            collector_stored: counter(&counters, "readings_stored"),
            store_errors: counter(&counters, "store_errors"),
            nats_errors: counter(&counters, "nats_errors"),
        };
        if !accounting.exact {
            self.progress.note(&format!(
                "{publish_errors} publishes failed: a failed publish may or may not have been \
                 stored, so lost/duplicated are approximate"
            ));
        }

        let ceiling_fig = ceiling.figures(None);
        let mut pipeline_fig = pipeline.figures(None);
        pipeline_fig.state_updates = Some(StateUpdates {
            puts,
            per_message: ratio(puts as f64, pipeline.sim.published as f64),
        });
        let rss = RssFigures::from(&overload.samples, rss_peak_kb);
        let mut report = Report {
            devices: self.a.devices,
            payload: self.payload.as_str(),
            ticks_per_message: self.ticks_per_message(),
            readings_per_message: pipeline.readings_per_message(),
            duration_secs: self.a.duration.as_secs_f64(),
            workers: self.config.collector.workers,
            batch_size: self.config.collector.batch_size,
            connections: self.a.connections,
            store: store.kind(),
            collector: "child process (fleetpipe collect); RSS from /proc/<pid>/status",
            ratio: ratio(pipeline_fig.messages_per_sec, ceiling_fig.messages_per_sec),
            ceiling: ceiling_fig,
            pipeline: pipeline_fig,
            latency: latency.figures(),
            overload: overload.figures(Some(drained)),
            rss,
            accounting,
            baseline: None,
            targets: Vec::new(),
            machine: machine.finish(),
        };
        if let Some(b) = baseline {
            report.baseline = Some(BaselineFigures {
                devices: b.devices,
                readings_per_sec: b.readings_per_sec,
                ratio: ratio(report.pipeline.readings_per_sec, b.readings_per_sec),
            });
        }
        report.targets = targets(&report);
        Ok(report)
    }

    fn ticks_per_message(&self) -> usize {
        match self.payload {
            PayloadForm::LineProtocol => self.a.lp_ticks,
            _ => 1,
        }
    }

    /// The simulator without its schedule's clock (at `rate` when given) for `duration`, or
    /// until `stop`.
    fn sim_config(&self, rate: Option<f64>, duration: Option<Duration>) -> Result<SimConfig> {
        let mut sim = SimConfig::new(self.config.nats.url.clone());
        sim.devices = self.a.devices;
        sim.payload = self.payload;
        sim.connections = self.a.connections;
        sim.template = self.config.template()?;
        sim.flat_out = true;
        sim.rate = rate;
        sim.duration = duration;
        sim.ticks_per_message = self.ticks_per_message();
        Ok(sim)
    }

    /// Phase 1: closed-loop publishers into a consumer that acks and discards, configured as
    /// the collectors' one.
    async fn ceiling(&self, telemetry: &jetstream::stream::Stream) -> Result<PhaseRun> {
        let c = &self.config.collector;
        let mut consumer: PullConsumer = telemetry
            .create_consumer(consumer::pull::Config {
                durable_name: Some(CEILING_CONSUMER.into()),
                description: Some("fleetpipe bench: ack and discard".into()),
                ..broker::consumer_config(&self.config)
            })
            .await
            .context("cannot create the ceiling consumer")?;
        let stop = CancellationToken::new();
        let workers: Vec<_> = (0..c.workers)
            .map(|_| {
                tokio::spawn(ack_and_discard(
                    consumer.clone(),
                    c.batch_size,
                    c.batch_wait,
                    stop.clone(),
                ))
            })
            .collect();
        let run = self
            .throughput("ceiling", &mut consumer, None, Load::Sustained)
            .await;
        let drained = match &run {
            Ok(_) => self.drain("ceiling", &mut consumer, None).await.map(|_| ()),
            Err(_) => Ok(()),
        };
        stop.cancel();
        for w in workers {
            let _ = tokio::time::timeout(Duration::from_secs(35), w).await;
        }
        drained?;
        run
    }

    /// Runs the simulator for one phase while sampling `consumer` (and the collector's
    /// RSS); with [`Load::Rate`], until its token is cancelled rather than for `--duration`.
    async fn throughput(
        &self,
        phase: &'static str,
        consumer: &mut PullConsumer,
        pid: Option<u32>,
        load: Load,
    ) -> Result<PhaseRun> {
        let (rate, stop) = match &load {
            Load::Rate(rate, stop) => (Some(*rate), Some(stop.clone())),
            Load::Sustained | Load::FlatOut => (None, None),
        };
        let duration = stop.is_none().then_some(self.a.duration);
        let mut sim = self.sim_config(rate, duration)?;
        let closed_loop = CancellationToken::new();
        let _stop_loop = closed_loop.clone().drop_guard();
        if matches!(load, Load::Sustained) {
            let gate = PublishGate::new(BACKLOG_BOUND);
            sim.gate = Some(gate.clone());
            tokio::spawn(hold_to_backlog(consumer.clone(), gate, closed_loop));
        }
        let latest: Arc<Mutex<SimStats>> = Arc::default();
        let shared = latest.clone();
        let shutdown = stop.clone().unwrap_or_default();
        let mut handle = tokio::spawn(simulate::run(
            sim,
            shutdown.cancelled_owned(),
            move |s: &SimStats| {
                if let Ok(mut g) = shared.lock() {
                    *g = s.clone();
                }
            },
        ));
        let mut samples = Vec::new();
        let mut ticker = tokio::time::interval(SAMPLE_EVERY);
        let summary: SimSummary = loop {
            tokio::select! {
                joined = &mut handle => {
                    let summary = joined.context("simulator task")??;
                    samples.push(Sample::take(consumer, pid, self.nats_pid).await?);
                    break summary;
                }
                _ = ticker.tick() => {
                    let s = Sample::take(consumer, pid, self.nats_pid).await?;
                    let sim = latest.lock().map(|g| g.clone()).unwrap_or_default();
                    self.progress.phase_line(phase, &s, &samples, &sim, self.a.duration);
                    samples.push(s);
                }
            }
        };
        self.progress.end_line();
        Ok(PhaseRun {
            sim: summary.stats,
            samples,
            warmup: (self.a.duration / 4).min(Duration::from_secs(1)),
        })
    }

    /// Waits until the consumer has nothing pending or unacknowledged, as long as it makes
    /// progress. Returns how long it took.
    async fn drain(
        &self,
        phase: &str,
        consumer: &mut PullConsumer,
        pid: Option<u32>,
    ) -> Result<Duration> {
        let started = Instant::now();
        let mut last_progress = started;
        let mut last_acked = 0;
        loop {
            let s = Sample::take(consumer, pid, self.nats_pid).await?;
            if s.pending == 0 && s.ack_pending == 0 {
                self.progress.end_line();
                return Ok(started.elapsed());
            }
            if s.acked != last_acked {
                last_acked = s.acked;
                last_progress = Instant::now();
            } else if last_progress.elapsed() > DRAIN_STALL {
                bail!(
                    "{phase}: the consumer made no progress for {} s with {} messages waiting",
                    DRAIN_STALL.as_secs(),
                    s.pending + s.ack_pending
                );
            }
            self.progress.drain_line(phase, &s, started.elapsed());
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    }

    /// Phase 3: background load at `rate` messages/s and probes with known values.
    async fn latency(
        &self,
        rate: f64,
        consumer: &mut PullConsumer,
        pid: Option<u32>,
    ) -> Result<LatencyRun> {
        let stop = CancellationToken::new();
        let probes = Probes {
            config: self.config.clone(),
            payload: self.payload,
            n: self.a.probes,
            duration: self.a.duration,
        };
        let probes = async {
            // The background load settles first.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let result = probes.on_own_thread().await;
            stop.cancel();
            result
        };
        let background = self.throughput("latency", consumer, pid, Load::Rate(rate, stop.clone()));
        let (probes, background) = tokio::join!(probes, background);
        let probes = probes?;
        let background = background?;
        Ok(LatencyRun {
            rate,
            sim: background.sim,
            ..probes
        })
    }
}

/// The latency probes: a client of its own (connection, store handle, thread and runtime),
/// so the load generator's tasks never delay a probe or the time it is seen.
struct Probes {
    config: Config,
    payload: PayloadForm,
    n: usize,
    duration: Duration,
}

impl Probes {
    async fn on_own_thread(self) -> Result<LatencyRun> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("bench-probes".into())
            .spawn(move || {
                let result = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("cannot start the probes' runtime")
                    .and_then(|rt| rt.block_on(self.run()));
                let _ = tx.send(result);
            })
            .context("cannot start the probes' thread")?;
        rx.await.context("the probes' thread stopped")?
    }

    async fn run(self) -> Result<LatencyRun> {
        let client = broker::connect(
            &self.config.nats.url,
            &self.config,
            "fleetpipe-bench-probes",
        )
        .await?;
        let js = jetstream::new(client);
        let state = js
            .get_key_value(names::STATE_BUCKET)
            .await
            .context("cannot open the latest-state bucket")?;
        let store = fleetpipe_store::open(&self.config.store_url())
            .await
            .context("cannot open the store")?;
        self.probes(&js, &state, store).await
    }

    /// Publishes `n` readings of the probe series, valued 0, 1, 2…, and times when the
    /// latest state shows each (or a newer one) and when each row is queryable.
    async fn probes(
        &self,
        js: &jetstream::Context,
        state: &kv::Store,
        store: Arc<dyn Store>,
    ) -> Result<LatencyRun> {
        let n = self.n;
        let template = self.config.template()?;
        let tags: Vec<(&str, &str)> = template.tag_names().map(|t| (t, "bench")).collect();
        let subject = template.format(PROBE_DEVICE, PROBE_SENSOR, &tags)?;
        let every =
            (self.duration / n as u32).clamp(Duration::from_millis(5), Duration::from_millis(20));
        let done = CancellationToken::new();

        let mut watch = state
            .watch(state::key(PROBE_DEVICE, PROBE_SENSOR))
            .await
            .context("cannot watch the latest-state bucket")?;
        let last = (n - 1) as f64;
        let watch_done = done.clone();
        let watcher = tokio::spawn(async move {
            let mut arrivals: Vec<(Instant, f64)> = Vec::new();
            loop {
                let entry = tokio::select! {
                    _ = watch_done.cancelled() => break,
                    e = watch.next() => e,
                };
                let Some(Ok(entry)) = entry else { break };
                if let Ok(v) = serde_json::from_slice::<StateValue>(&entry.value) {
                    arrivals.push((Instant::now(), v.value));
                    if v.value >= last {
                        break;
                    }
                }
            }
            arrivals
        });

        let since = Timestamp::now().saturating_add_micros(-60_000_000);
        let poll_done = done.clone();
        let poller = tokio::spawn(async move {
            let range = Range {
                from: since,
                to: Timestamp::now().saturating_add_micros(3_600_000_000),
            };
            let mut seen: Vec<Option<Instant>> = vec![None; n];
            let mut left = n;
            while left > 0 && !poll_done.is_cancelled() {
                if let Ok(points) = store
                    .history(PROBE_DEVICE, PROBE_SENSOR, range, n * 2)
                    .await
                {
                    let now = Instant::now();
                    for p in points {
                        let i = p.value as usize;
                        if p.value >= 0.0 && i < n && seen[i].is_none() {
                            seen[i] = Some(now);
                            left -= 1;
                        }
                    }
                }
                tokio::time::sleep(HISTORY_POLL).await;
            }
            seen
        });

        let mut sent: Vec<Option<Instant>> = Vec::with_capacity(n);
        let mut acks = FuturesUnordered::new();
        let mut errors = 0u64;
        let mut ticker = tokio::time::interval(every);
        for i in 0..n {
            ticker.tick().await;
            let body = self.probe_payload(i as f64);
            let at = Instant::now();
            match js.publish(subject.clone(), body.into()).await {
                Ok(ack) => {
                    sent.push(Some(at));
                    acks.push(ack.into_future());
                }
                Err(_) => {
                    errors += 1;
                    sent.push(None);
                }
            }
        }
        let mut acked = 0u64;
        while let Some(r) = acks.next().await {
            match r {
                Ok(_) => acked += 1,
                Err(_) => errors += 1,
            }
        }
        let timeout = done.clone();
        tokio::spawn(async move {
            tokio::time::sleep(PROBE_TIMEOUT).await;
            timeout.cancel();
        });
        let arrivals = watcher.await.context("state watcher")?;
        let rows = poller.await.context("history poller")?;
        done.cancel();

        let mut to_state = Vec::new();
        let mut to_row = Vec::new();
        for (i, at) in sent.iter().enumerate() {
            let Some(at) = *at else { continue };
            if let Some((seen, _)) = arrivals.iter().find(|(_, v)| *v >= i as f64) {
                to_state.push(seen.saturating_duration_since(at));
            }
            if let Some(seen) = rows[i] {
                to_row.push(seen.saturating_duration_since(at));
            }
        }
        Ok(LatencyRun {
            rate: 0.0,
            sim: SimStats::default(),
            probes: n,
            probes_acked: acked,
            probe_errors: errors,
            to_state,
            to_row,
        })
    }

    /// A probe reading in the run's payload form; JSON and line protocol carry the time.
    fn probe_payload(&self, value: f64) -> String {
        let now = Timestamp::now();
        match self.payload {
            PayloadForm::Plain => encode_plain(value),
            PayloadForm::Json => encode_json(value, Some("ms"), Some(now), Some("good")),
            PayloadForm::LineProtocol => {
                let mut body = String::new();
                encode_line_protocol(&mut body, PROBE_SENSOR, &[("value", value)], Some(now));
                body
            }
        }
    }
}

/// How a phase's publishers are driven.
enum Load {
    /// Closed loop: at most [`BACKLOG_BOUND`] messages ahead of the consumer's acks.
    Sustained,
    /// As fast as the broker acknowledges publishes: the backlog grows when the consumer
    /// is slower.
    FlatOut,
    /// At this many messages/s until the token is cancelled.
    Rate(f64, CancellationToken),
}

/// The closed loop of [`Load::Sustained`]: keeps raising `gate` to the messages the
/// consumer has acknowledged since the phase began plus [`BACKLOG_BOUND`].
async fn hold_to_backlog(
    mut consumer: PullConsumer,
    gate: Arc<PublishGate>,
    stop: CancellationToken,
) {
    let acked = |info: &consumer::Info| {
        info.delivered
            .consumer_sequence
            .saturating_sub(info.num_ack_pending as u64)
    };
    let Ok(start) = consumer.info().await.map(&acked) else {
        // Without the consumer's counts the loop cannot close: let the publishers run.
        gate.raise_to(u64::MAX);
        return;
    };
    let mut ticker = tokio::time::interval(GATE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if let Ok(info) = consumer.info().await {
            gate.raise_to(acked(info).saturating_sub(start) + BACKLOG_BOUND);
        }
    }
}

/// The collectors' pull loop without the work: take a batch (same size, same wait), ack
/// every message, repeat.
async fn ack_and_discard(
    consumer: PullConsumer,
    batch_size: usize,
    batch_wait: Duration,
    stop: CancellationToken,
) {
    let mut puller = BatchPuller::new(consumer, batch_size, batch_wait, Arc::default());
    while let Some(batch) = puller.next(&stop).await {
        futures::future::join_all(batch.iter().map(|m| m.ack())).await;
    }
}

/// The `fleetpipe collect` child process.
struct Collector {
    child: tokio::process::Child,
    pid: u32,
}

impl Collector {
    /// Starts `fleetpipe collect --json` with the bench's effective configuration in a file
    /// and no `FLEETPIPE_*` variables, so it uses exactly the same settings.
    async fn spawn(config: &Config, dir: &Path) -> Result<Collector> {
        let conf = dir.join("fleetpipe-bench.toml");
        std::fs::write(&conf, toml::to_string(config)?)
            .with_context(|| format!("cannot write {}", conf.display()))?;
        let exe = std::env::current_exe().context("cannot find the fleetpipe binary")?;
        let mut cmd = tokio::process::Command::new(exe);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("FLEETPIPE_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .arg("--config")
            .arg(&conf)
            .args(["--log", "warn", "collect", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start `fleetpipe collect`")?;
        let pid = child.id().context("collector exited at once")?;
        Ok(Collector { child, pid })
    }

    /// Waits until a collector worker has a pull request waiting on the consumer.
    async fn wait_ready(&mut self, consumer: &mut PullConsumer) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("`fleetpipe collect` exited at start ({status})");
            }
            if consumer.info().await?.num_waiting > 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("`fleetpipe collect` did not start pulling within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then its `--json` counters.
    async fn stop(self) -> Result<serde_json::Value> {
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        let out = tokio::time::timeout(Duration::from_secs(60), self.child.wait_with_output())
            .await
            .context("`fleetpipe collect` did not stop within 60 s")??;
        if !out.status.success() {
            bail!("`fleetpipe collect` exited with {}", out.status);
        }
        serde_json::from_slice(&out.stdout).context("cannot read the collector's counters")
    }
}

/// Puts the latest-state bucket has taken so far: the last sequence of its stream.
async fn state_puts(js: &jetstream::Context) -> Result<u64> {
    let mut stream = js
        .get_stream(format!("KV_{}", names::STATE_BUCKET))
        .await
        .context("cannot find the latest-state bucket's stream")?;
    Ok(stream.info().await?.state.last_sequence)
}

fn counter(v: &serde_json::Value, name: &str) -> u64 {
    v.get(name).and_then(serde_json::Value::as_u64).unwrap_or(0)
}

/// One look at a consumer (and the collector's memory).
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    /// Messages acknowledged: delivered minus those still awaiting their ack.
    acked: u64,
    /// Messages in the stream not yet delivered: the backlog waiting in JetStream.
    pending: u64,
    ack_pending: u64,
    rss_kb: Option<u64>,
    /// CPU time used so far by nats-server, this process and the collector.
    cpu: Cpu,
}

/// CPU seconds of the three processes on the machine (Linux only).
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Cpu {
    nats_server: Option<f64>,
    /// The bench process: the publishers, and in the ceiling phase the ack-and-discard
    /// consumer.
    bench: Option<f64>,
    collector: Option<f64>,
    /// Everything else on the machine: other work running at the same time skews the
    /// figures, so it is measured rather than assumed away.
    other: Option<f64>,
}

impl Cpu {
    fn now(nats: Option<u32>, collector: Option<u32>) -> Cpu {
        let mut cpu = Cpu {
            nats_server: nats.and_then(cpu_secs),
            bench: cpu_secs(std::process::id()),
            collector: collector.and_then(cpu_secs),
            other: None,
        };
        // Until `cores_between`, `other` holds the machine's total busy seconds.
        cpu.other = machine_busy_secs();
        cpu
    }

    /// CPU used between two readings, as cores busy over `secs`.
    fn cores_between(a: &Cpu, b: &Cpu, secs: f64) -> Cpu {
        let d = |x: Option<f64>, y: Option<f64>| match (x, y) {
            (Some(x), Some(y)) if secs > 0.0 => Some((y - x).max(0.0) / secs),
            _ => None,
        };
        let ours = [
            d(a.nats_server, b.nats_server),
            d(a.bench, b.bench),
            d(a.collector, b.collector),
        ];
        let other =
            d(a.other, b.other).map(|busy| (busy - ours.iter().flatten().sum::<f64>()).max(0.0));
        Cpu {
            nats_server: ours[0],
            bench: ours[1],
            collector: ours[2],
            other,
        }
    }
}

impl Sample {
    async fn take(
        consumer: &mut PullConsumer,
        pid: Option<u32>,
        nats: Option<u32>,
    ) -> Result<Sample> {
        let info = consumer.info().await.context("consumer info")?;
        Ok(Sample {
            at: Instant::now(),
            acked: info
                .delivered
                .consumer_sequence
                .saturating_sub(info.num_ack_pending as u64),
            pending: info.num_pending,
            ack_pending: info.num_ack_pending as u64,
            rss_kb: pid.and_then(|p| proc_status_kb(p, "VmRSS")),
            cpu: Cpu::now(nats, pid),
        })
    }
}

/// What one throughput phase produced.
struct PhaseRun {
    sim: SimStats,
    samples: Vec<Sample>,
    warmup: Duration,
}

impl PhaseRun {
    fn readings_per_message(&self) -> f64 {
        if self.sim.published == 0 {
            1.0
        } else {
            self.sim.readings as f64 / self.sim.published as f64
        }
    }

    /// The measured window: from the first acknowledgement plus the warm-up to the end of
    /// publishing.
    fn window(&self) -> Option<(&Sample, &Sample)> {
        let first = self.samples.iter().find(|s| s.acked > 0)?;
        let from = self
            .samples
            .iter()
            .find(|s| s.at >= first.at + self.warmup)
            .unwrap_or(first);
        let to = self.samples.last()?;
        (to.at > from.at).then_some((from, to))
    }

    /// Acknowledged messages per second over [`PhaseRun::window`]: what the consumer
    /// sustained while the publishers ran.
    fn messages_per_sec(&self) -> (f64, f64) {
        let Some((from, to)) = self.window() else {
            return (0.0, 0.0);
        };
        let secs = to.at.duration_since(from.at).as_secs_f64();
        ((to.acked - from.acked.min(to.acked)) as f64 / secs, secs)
    }

    /// Cores each process kept busy over the window.
    fn cpu_cores(&self) -> Cpu {
        match self.window() {
            Some((from, to)) => Cpu::cores_between(
                &from.cpu,
                &to.cpu,
                to.at.duration_since(from.at).as_secs_f64(),
            ),
            None => Cpu::default(),
        }
    }

    fn figures(&self, drain: Option<Duration>) -> PhaseFigures {
        let (messages_per_sec, window_secs) = self.messages_per_sec();
        let per_message = self.readings_per_message();
        PhaseFigures {
            messages_per_sec,
            readings_per_sec: messages_per_sec * per_message,
            published_per_sec: self.sim.publish_rate,
            published_messages: self.sim.published,
            published_readings: self.sim.readings,
            window_secs,
            backlog_peak: self.samples.iter().map(|s| s.pending).max().unwrap_or(0),
            drain_secs: drain.map(|d| d.as_secs_f64()),
            cpu_cores: self.cpu_cores(),
            state_updates: None,
        }
    }
}

/// What the latency phase produced.
struct LatencyRun {
    rate: f64,
    sim: SimStats,
    probes: usize,
    probes_acked: u64,
    probe_errors: u64,
    to_state: Vec<Duration>,
    to_row: Vec<Duration>,
}

impl LatencyRun {
    fn figures(&self) -> LatencyFigures {
        LatencyFigures {
            background_messages_per_sec: self.rate,
            probes: self.probes,
            state_ms: Percentiles::of(&self.to_state),
            history_ms: Percentiles::of(&self.to_row),
        }
    }
}

#[derive(Debug, Serialize)]
struct Report {
    devices: usize,
    payload: &'static str,
    ticks_per_message: usize,
    readings_per_message: f64,
    duration_secs: f64,
    workers: usize,
    batch_size: usize,
    connections: usize,
    store: &'static str,
    collector: &'static str,
    ceiling: PhaseFigures,
    pipeline: PhaseFigures,
    /// Pipeline messages/s over ceiling messages/s.
    ratio: f64,
    latency: LatencyFigures,
    /// The collector with the publishers flat out.
    overload: PhaseFigures,
    rss: RssFigures,
    accounting: Accounting,
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline: Option<BaselineFigures>,
    targets: Vec<Target>,
    machine: MachineFigures,
}

#[derive(Debug, Serialize)]
struct PhaseFigures {
    /// Messages acknowledged by the consumer per second while the publishers ran.
    messages_per_sec: f64,
    readings_per_sec: f64,
    /// Messages the publishers got acknowledged per second (the stream's intake).
    published_per_sec: f64,
    published_messages: u64,
    published_readings: u64,
    /// Length of the measured window.
    window_secs: f64,
    /// Most messages waiting in JetStream, undelivered, during the phase.
    backlog_peak: u64,
    /// Time to work off the backlog after the publishers stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    drain_secs: Option<f64>,
    /// Cores each process kept busy during the window (the machine has `machine.cpus`).
    cpu_cores: Cpu,
    /// Latest-state KV puts during the phase (and its drain), per message collected.
    #[serde(skip_serializing_if = "Option::is_none")]
    state_updates: Option<StateUpdates>,
}

#[derive(Debug, Serialize)]
struct StateUpdates {
    puts: u64,
    per_message: f64,
}

#[derive(Debug, Serialize)]
struct LatencyFigures {
    background_messages_per_sec: f64,
    probes: usize,
    /// Publish → the latest-state bucket shows the probe's value (or a newer one).
    state_ms: Percentiles,
    /// Publish → the probe's row is returned by `Store::history` (polled every 10 ms).
    history_ms: Percentiles,
}

#[derive(Debug, Serialize)]
struct Percentiles {
    p50: f64,
    p99: f64,
    max: f64,
    /// Probes that became visible (the others timed out).
    seen: usize,
}

impl Percentiles {
    fn of(d: &[Duration]) -> Percentiles {
        let mut ms: Vec<f64> = d.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        // Nearest rank.
        let at = |q: f64| -> f64 {
            if ms.is_empty() {
                return f64::NAN;
            }
            let rank = ((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len());
            ms[rank - 1]
        };
        Percentiles {
            p50: at(0.50),
            p99: at(0.99),
            max: at(1.0),
            seen: ms.len(),
        }
    }
}

#[derive(Debug, Serialize)]
struct RssFigures {
    /// The collector's `VmHWM` at the end of the run.
    peak_mb: Option<f64>,
    /// Largest `VmRSS` in the first and the second half of the overload phase: flat while
    /// the backlog grows means the collector's memory is bounded.
    first_half_mb: Option<f64>,
    second_half_mb: Option<f64>,
    /// `VmRSS` about once a second through the overload phase.
    timeline_mb: Vec<f64>,
}

impl RssFigures {
    fn from(samples: &[Sample], peak_kb: Option<u64>) -> RssFigures {
        let mid = samples.len() / 2;
        let max_of = |s: &[Sample]| s.iter().filter_map(|s| s.rss_kb).max().map(kb_to_mb);
        RssFigures {
            peak_mb: peak_kb.map(kb_to_mb),
            first_half_mb: max_of(&samples[..mid]),
            second_half_mb: max_of(&samples[mid..]),
            timeline_mb: samples
                .iter()
                .step_by(5)
                .filter_map(|s| s.rss_kb)
                .map(|kb| (kb_to_mb(kb) * 10.0).round() / 10.0)
                .collect(),
        }
    }
}

fn kb_to_mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

#[derive(Debug, Serialize)]
struct Accounting {
    /// Readings in messages the stream acknowledged (fleet and probes).
    published_readings: u64,
    /// Rows the store gained.
    stored: u64,
    lost: u64,
    duplicates: u64,
    /// False when some publishes failed: those may or may not be stored.
    exact: bool,
    publish_errors: u64,
    /// Messages in the dead-letter stream.
    dead_letters: u64,
    /// Collector counters: redelivered messages and the readings they carried that the
    /// store recognised as already written (idempotent writes, not duplicates).
    redelivered: u64,
    duplicates_skipped: u64,
    collector_stored: u64,
    store_errors: u64,
    nats_errors: u64,
}

#[derive(Debug, Serialize)]
struct BaselineFigures {
    devices: u64,
    readings_per_sec: f64,
    ratio: f64,
}

#[derive(Debug, Serialize)]
struct Target {
    name: String,
    target: String,
    measured: String,
    /// `None` when the run could not check it (e.g. no overload happened).
    met: Option<bool>,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// The targets of issue 4 that this run can check.
fn targets(r: &Report) -> Vec<Target> {
    let mut t = Vec::new();
    let mut add = |name: &str, target: &str, measured: String, met: Option<bool>| {
        t.push(Target {
            name: name.into(),
            target: target.into(),
            measured,
            met,
        })
    };
    if r.payload == "lp" {
        add(
            "line protocol: readings/s end to end",
            "≥ 1,000,000",
            thousands(r.pipeline.readings_per_sec as u64),
            Some(r.pipeline.readings_per_sec >= 1_000_000.0),
        );
    } else {
        add(
            "pipeline / ceiling (one reading/message)",
            "≥ 0.90",
            format!("{:.2}", r.ratio),
            Some(r.ratio >= 0.9),
        );
    }
    let l = &r.latency;
    add(
        "publish → latest state, p99",
        "≤ 20 ms",
        format!("{:.1} ms", l.state_ms.p99),
        Some(l.state_ms.p99 <= 20.0 && l.state_ms.seen == l.probes),
    );
    add(
        "publish → queryable row, p99",
        "≤ 500 ms",
        format!("{:.1} ms", l.history_ms.p99),
        Some(l.history_ms.p99 <= 500.0 && l.history_ms.seen == l.probes),
    );
    add(
        "collector peak RSS",
        "≤ 400 MB",
        r.rss
            .peak_mb
            .map_or("unknown".into(), |m| format!("{m:.0} MB")),
        r.rss.peak_mb.map(|m| m <= 400.0),
    );
    let a = &r.accounting;
    add(
        "lost / duplicated / dead letters",
        "0 / 0 / 0",
        format!("{} / {} / {}", a.lost, a.duplicates, a.dead_letters),
        Some(a.lost == 0 && a.duplicates == 0 && a.dead_letters == 0),
    );
    // Overloaded: more than a second of work waited in JetStream.
    let overloaded = r.overload.backlog_peak as f64 > r.overload.messages_per_sec.max(1.0);
    let (first, second) = (r.rss.first_half_mb, r.rss.second_half_mb);
    let flat = match (first, second) {
        (Some(f), Some(s)) => Some(s <= f * 1.1 + 16.0),
        _ => None,
    };
    add(
        "overload: RSS flat, nothing lost",
        "RSS ≤ +10% over the phase",
        match (first, second) {
            (Some(f), Some(s)) => format!(
                "{f:.0} → {s:.0} MB, backlog peak {}",
                thousands(r.overload.backlog_peak)
            ),
            _ => "unknown".into(),
        },
        if overloaded {
            flat.map(|f| f && a.lost == 0)
        } else {
            None
        },
    );
    if let Some(b) = &r.baseline {
        add(
            &format!("rate vs {} devices", thousands(b.devices)),
            "≥ 0.90 ×",
            format!(
                "{:.2} × {} readings/s",
                b.ratio,
                thousands(b.readings_per_sec as u64)
            ),
            Some(b.ratio >= 0.9),
        );
    }
    t
}

/// The pipeline rate of a previous `--json` run, to compare fleet sizes.
struct Baseline {
    devices: u64,
    readings_per_sec: f64,
}

fn read_baseline(path: &Path) -> Result<Baseline> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read baseline {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a `fleetpipe bench --json` output",
            path.display()
        )
    })?;
    let rate = v
        .pointer("/pipeline/readings_per_sec")
        .and_then(serde_json::Value::as_f64)
        .with_context(|| format!("{} has no pipeline.readings_per_sec", path.display()))?;
    Ok(Baseline {
        devices: v.get("devices").and_then(|d| d.as_u64()).unwrap_or(0),
        readings_per_sec: rate,
    })
}

/// Where the figures were measured; the load average says whether something else ran.
struct Machine {
    nats_server: String,
    load_start: Option<f64>,
}

#[derive(Debug, Serialize)]
struct MachineFigures {
    cpus: usize,
    memory_mb: Option<u64>,
    kernel: Option<String>,
    nats_server: String,
    load_average_start: Option<f64>,
    load_average_end: Option<f64>,
}

impl Machine {
    fn probe(nats_bin: &Path) -> Machine {
        let version = std::process::Command::new(nats_bin)
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let version = version.rsplit(' ').next().unwrap_or("unknown").to_string();
        Machine {
            nats_server: version,
            load_start: load_average(),
        }
    }

    fn finish(self) -> MachineFigures {
        let mem_kb = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:").and_then(parse_kb))
        });
        MachineFigures {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_mb: mem_kb.map(|kb| kb / 1024),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|s| s.trim().to_string()),
            nats_server: self.nats_server,
            load_average_start: self.load_start,
            load_average_end: load_average(),
        }
    }
}

fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`); `None` off Linux.
fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
            .and_then(parse_kb)
    })
}

/// User plus system CPU seconds of a process, from `/proc/<pid>/stat`.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks())
}

/// Busy CPU seconds of the whole machine since boot (all but idle and iowait), from
/// `/proc/stat`.
fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .map(|t| t.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: u64 = ticks.iter().take(8).sum::<u64>() - ticks.get(3)? - ticks.get(4)?;
    Some(busy as f64 / clock_ticks())
}

/// `sysconf(_SC_CLK_TCK)`: 100 on every Linux we know of; `getconf` confirms.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The process whose command line mentions `path` (the managed nats-server, by its
/// config file under the bench's temporary directory).
fn find_pid_with_arg(path: &Path) -> Option<u32> {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline)
            .contains(&needle)
            .then_some(pid)
    })
}

fn parse_kb(s: &str) -> Option<u64> {
    s.trim().strip_suffix("kB")?.trim().parse().ok()
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .context("cannot find a free port for nats-server")?;
    Ok(listener.local_addr()?.port())
}

/// A directory under the system's temporary directory (`TMPDIR`), removed on drop: the
/// nats-server store, the default SQLite file and the collector's config.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("fleetpipe-bench-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Progress on stderr: a line rewritten in place on a terminal, a line a second otherwise.
struct Progress {
    tty: bool,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn note(&self, line: &str) {
        eprintln!("{line}");
    }

    fn line(&self, line: &str) {
        if self.tty {
            eprint!("\r\x1b[2K{line}");
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{line}");
        }
    }

    fn end_line(&self) {
        if self.tty {
            eprintln!();
        }
    }

    /// Once a second (every fifth sample).
    fn phase_line(
        &self,
        phase: &str,
        s: &Sample,
        before: &[Sample],
        sim: &SimStats,
        duration: Duration,
    ) {
        if before.len() % 5 != 4 {
            return;
        }
        let prev = before[before.len() - 4];
        let secs = s.at.duration_since(prev.at).as_secs_f64().max(1e-3);
        let rate = s.acked.saturating_sub(prev.acked) as f64 / secs;
        let rss = s
            .rss_kb
            .map(|kb| format!(" │ collector RSS {:.0} MB", kb_to_mb(kb)))
            .unwrap_or_default();
        let clock = if phase == "latency" {
            format!("{:.0} s", sim.elapsed_secs)
        } else {
            format!("{:.0}/{} s", sim.elapsed_secs, duration.as_secs())
        };
        self.line(&format!(
            "{phase:<8} {clock} │ published {} ({}/s) │ consumed {} ({}/s) │ backlog {}{rss}",
            thousands(sim.published),
            thousands(sim.publish_rate as u64),
            thousands(s.acked),
            thousands(rate as u64),
            thousands(s.pending),
        ));
    }

    fn drain_line(&self, phase: &str, s: &Sample, elapsed: Duration) {
        // A line a second when not on a terminal.
        if !self.tty && elapsed.as_millis() % 1000 >= SAMPLE_EVERY.as_millis() {
            return;
        }
        self.line(&format!(
            "{phase:<8} draining {:.0} s │ backlog {} │ awaiting ack {}",
            elapsed.as_secs_f64(),
            thousands(s.pending),
            thousands(s.ack_pending)
        ));
    }
}

fn print_report(r: &Report) {
    let rate = |x: f64| thousands(x.round() as u64);
    println!(
        "fleetpipe bench: {} devices, {} payload ({:.2} readings/message), {} s per phase, \
         {} collector workers × batch {}, {} store",
        thousands(r.devices as u64),
        r.payload,
        r.readings_per_message,
        r.duration_secs,
        r.workers,
        r.batch_size,
        r.store
    );
    println!();
    println!("                              messages/s    readings/s   backlog peak");
    for (name, p) in [
        ("ceiling (ack and discard)", &r.ceiling),
        ("pipeline (end to end)", &r.pipeline),
        ("overload (flat out)", &r.overload),
    ] {
        println!(
            "  {name:<26} {:>12}  {:>12}  {:>12}",
            rate(p.messages_per_sec),
            rate(p.readings_per_sec),
            thousands(p.backlog_peak)
        );
    }
    println!("  {:<26} {:>12.2}", "pipeline / ceiling", r.ratio);
    println!();
    let cores = |c: Option<f64>| c.map_or("–".to_string(), |c| format!("{c:.2}"));
    println!(
        "  CPU, cores busy of {}         nats-server         bench     collector   other work",
        r.machine.cpus
    );
    for (name, p) in [
        ("ceiling", &r.ceiling),
        ("pipeline", &r.pipeline),
        ("overload", &r.overload),
    ] {
        println!(
            "    {name:<26} {:>12}  {:>12}  {:>12}  {:>11}",
            cores(p.cpu_cores.nats_server),
            cores(p.cpu_cores.bench),
            cores(p.cpu_cores.collector),
            cores(p.cpu_cores.other)
        );
    }
    let other = [
        r.ceiling.cpu_cores.other,
        r.pipeline.cpu_cores.other,
        r.overload.cpu_cores.other,
    ]
    .into_iter()
    .flatten()
    .fold(0.0, f64::max);
    if other > 0.2 {
        println!(
            "  note: other work kept {other:.2} cores busy during the run; the figures are low"
        );
    }
    if let Some(u) = &r.pipeline.state_updates {
        println!(
            "  latest-state puts in the pipeline phase: {} ({:.2} per message)",
            thousands(u.puts),
            u.per_message
        );
    }
    println!();
    let l = &r.latency;
    println!(
        "  latency, {} probes at {} messages/s     p50        p99        max",
        l.probes,
        rate(l.background_messages_per_sec)
    );
    for (name, p) in [
        ("publish → latest state", &l.state_ms),
        ("publish → row queryable", &l.history_ms),
    ] {
        println!(
            "    {name:<36} {:>7.1} ms {:>7.1} ms {:>7.1} ms{}",
            p.p50,
            p.p99,
            p.max,
            if p.seen < l.probes {
                format!("  ({} of {} seen)", p.seen, l.probes)
            } else {
                String::new()
            }
        );
    }
    println!();
    let mb = |m: Option<f64>| m.map_or("?".into(), |m| format!("{m:.0} MB"));
    println!(
        "  collector peak RSS {} (overload phase: {} first half, {} second half)",
        mb(r.rss.peak_mb),
        mb(r.rss.first_half_mb),
        mb(r.rss.second_half_mb)
    );
    if let Some(d) = r.overload.drain_secs {
        println!(
            "  overload: publishers {} messages/s, backlog peak {}, drained in {d:.1} s after \
             they stopped",
            rate(r.overload.published_per_sec),
            thousands(r.overload.backlog_peak)
        );
    }
    let a = &r.accounting;
    println!(
        "  readings acknowledged by the stream {}, stored {}: lost {}, duplicated {}; \
         dead letters {}; redelivered {}{}",
        thousands(a.published_readings),
        thousands(a.stored),
        thousands(a.lost),
        thousands(a.duplicates),
        thousands(a.dead_letters),
        thousands(a.redelivered),
        if a.exact {
            String::new()
        } else {
            format!(" ({} publishes failed: approximate)", a.publish_errors)
        }
    );
    println!();
    println!("targets");
    for t in &r.targets {
        let mark = match t.met {
            Some(true) => "✓",
            Some(false) => "✗",
            None => "–",
        };
        println!(
            "  {mark} {:<42} {:<26} {}",
            t.name,
            t.target,
            if t.met.is_none() {
                format!("{} (not overloaded: not checked)", t.measured)
            } else {
                t.measured.clone()
            }
        );
    }
    let m = &r.machine;
    println!();
    println!(
        "machine: {} CPUs, {} MB, kernel {}, nats-server {}, load average {} → {}",
        m.cpus,
        m.memory_mb.map_or("?".into(), |v| v.to_string()),
        m.kernel.as_deref().unwrap_or("?"),
        m.nats_server,
        m.load_average_start
            .map_or("?".into(), |v| format!("{v:.2}")),
        m.load_average_end.map_or("?".into(), |v| format!("{v:.2}")),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = Percentiles::of(&d);
        assert_eq!((p.p50, p.p99, p.max, p.seen), (50.0, 99.0, 100.0, 100));
        assert!(Percentiles::of(&[]).p99.is_nan());
    }

    #[test]
    fn proc_status_fields_parse() {
        assert_eq!(parse_kb("   52340 kB"), Some(52340));
        assert_eq!(parse_kb("x"), None);
        assert!(proc_status_kb(std::process::id(), "VmRSS").is_some_and(|kb| kb > 0));
    }

    #[test]
    fn the_rate_skips_the_warm_up_and_uses_the_consumer_counts() {
        let t0 = Instant::now();
        let at = |ms: u64, acked: u64| Sample {
            at: t0 + Duration::from_millis(ms),
            acked,
            pending: 0,
            ack_pending: 0,
            rss_kb: None,
            cpu: Cpu::default(),
        };
        let run = PhaseRun {
            sim: SimStats::default(),
            samples: vec![at(0, 0), at(200, 10), at(1200, 1000), at(3200, 5000)],
            warmup: Duration::from_secs(1),
        };
        let (rate, secs) = run.messages_per_sec();
        assert_eq!(secs, 2.0);
        assert_eq!(rate, 2000.0);
    }
}
