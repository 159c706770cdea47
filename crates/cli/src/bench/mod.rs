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
//!
//! The parts: [`phases`] runs the phases and samples the consumer, [`publishers`] drives the
//! simulator for a phase (the closed loop of a `PublishGate`), [`probes`] times the latency
//! probes, [`child`] is the `fleetpipe collect` child process, [`process`] reads process and
//! machine figures from `/proc`, [`report`] turns the runs into the report (text or JSON,
//! baseline, targets), and [`progress`] is the progress line on stderr.
//!
//! [`BACKLOG_BOUND`]: publishers::BACKLOG_BOUND

mod child;
mod phases;
mod probes;
mod process;
mod progress;
mod publishers;
mod queries;
mod report;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use async_nats::jetstream;
use fleetpipe_device::simulate::{PayloadForm, SimConfig};
use fleetpipe_pipeline::broker;
use fleetpipe_pipeline::config::names;
use fleetpipe_pipeline::nats_server::{self, ManagedNats, ManagedOptions};
use fleetpipe_pipeline::Config;

use crate::args::BenchArgs;
use crate::output::{print_json, thousands};

use child::{counter, Collector};
use phases::CEILING_CONSUMER;
use process::{find_pid_with_arg, proc_status_kb, Machine};
use progress::Progress;
use publishers::Load;
use report::{
    print_report, ratio, read_baseline, targets, Accounting, Baseline, BaselineFigures, Report,
    RssFigures, StateUpdates,
};

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
    let dir = temp_dir()?;
    config.data_dir = dir.path().to_path_buf();
    config.store.url =
        store.unwrap_or_else(|| format!("sqlite://{}", dir.path().join("bench.db").display()));
    config.nats.port =
        fleetpipe_testkit::try_free_port().context("cannot find a free port for nats-server")?;
    config.nats.url = String::new();
    config.validate()?;
    if std::env::var_os("FLEETPIPE_NATS_URL").is_some() {
        eprintln!("note: FLEETPIPE_NATS_URL is ignored; the bench starts its own nats-server");
    }

    let bin = nats_server::find_binary(&config.nats.server_bin)?;
    let server =
        ManagedNats::start(&bin, dir.path(), ManagedOptions::loopback(config.nats.port)).await?;
    config.nats.url = server.url();
    let machine = Machine::probe(&bin);
    let bench = Bench {
        progress: Progress::new(),
        clock: std::sync::Mutex::new(None),
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

/// A directory under the system's temporary directory (`TMPDIR`), removed on drop: the
/// nats-server store, the default SQLite file and the collector's config.
fn temp_dir() -> Result<tempfile::TempDir> {
    let tmp = std::env::temp_dir();
    tempfile::Builder::new()
        .prefix("fleetpipe-bench-")
        .tempdir_in(&tmp)
        .with_context(|| format!("cannot create a temporary directory in {}", tmp.display()))
}

/// One run: its settings and what every phase shares.
struct Bench {
    config: Config,
    /// The managed nats-server's pid, for its CPU time.
    nats_pid: Option<u32>,
    a: BenchArgs,
    payload: PayloadForm,
    dir: PathBuf,
    progress: Progress,
    /// Where the line-protocol devices' clocks ended in the last phase (Unix
    /// microseconds): the next phase goes on from there, so no phase sends readings over
    /// a span another phase already covered.
    clock: std::sync::Mutex<Option<i64>>,
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
        let seeded_at = queries::seed(&self.config.store_url()).await?;
        let store = fleetpipe_store::open(&self.config.store_url())
            .await
            .context("cannot open the store")?;
        let stored_before = store.count_readings().await?;
        let puts_before = state_puts(&broker.js).await?;
        let mut collector = Collector::spawn(&self.config, &self.dir).await?;
        collector.wait_ready(&mut consumer).await?;
        let pid = Some(collector.pid);
        let stop_queries = tokio_util::sync::CancellationToken::new();
        let querying = queries::spawn(
            std::sync::Arc::clone(&store),
            seeded_at,
            stop_queries.clone(),
        );
        let pipeline = self
            .throughput("pipeline", &mut consumer, pid, Load::Sustained)
            .await;
        stop_queries.cancel();
        let queries = querying.await.context("query task")?;
        let pipeline = pipeline?;
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

        // 5. Accounting.
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
            queries,
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
        sim.clock_from = self
            .clock
            .lock()
            .ok()
            .and_then(|c| *c)
            .map(|end| fleetpipe_proto::Timestamp::from_micros(end).saturating_add_micros(1));
        Ok(sim)
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
