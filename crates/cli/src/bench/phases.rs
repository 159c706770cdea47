//! The phases: the ceiling (an ack-and-discard consumer), a throughput phase (publishers
//! for a while, the consumer sampled every 200 ms), the latency phase, and the drain after
//! each; what a phase produced, and the rate it measured.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use async_nats::jetstream::{self, consumer, consumer::PullConsumer};
use fleetpipe_device::simulate::SimStats;
use fleetpipe_pipeline::broker;
use fleetpipe_pipeline::collector::BatchPuller;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::probes::Probes;
use super::process::{proc_status_kb, Cpu};
use super::publishers::{Load, Publishers};
use super::report::{LatencyFigures, Percentiles, PhaseFigures};
use super::Bench;

/// The durable consumer of the ceiling phase; removed before the pipeline phase.
pub(super) const CEILING_CONSUMER: &str = "fleetpipe-bench-ceiling";

/// How often the consumer, the collector's RSS and the backlog are sampled.
pub(super) const SAMPLE_EVERY: Duration = Duration::from_millis(200);

/// A drain that makes no progress for this long is stuck.
const DRAIN_STALL: Duration = Duration::from_secs(120);

impl Bench {
    /// Phase 1: closed-loop publishers into a consumer that acks and discards, configured as
    /// the collectors' one.
    pub(super) async fn ceiling(&self, telemetry: &jetstream::stream::Stream) -> Result<PhaseRun> {
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
    pub(super) async fn throughput(
        &self,
        phase: &'static str,
        consumer: &mut PullConsumer,
        pid: Option<u32>,
        load: Load,
    ) -> Result<PhaseRun> {
        let (rate, duration) = match &load {
            Load::Rate(rate, _) => (Some(*rate), None),
            Load::Sustained | Load::FlatOut => (None, Some(self.a.duration)),
        };
        let sim = self.sim_config(rate, duration)?;
        let mut publishers = Publishers::start(sim, &load, consumer);
        let mut samples = Vec::new();
        let mut ticker = tokio::time::interval(SAMPLE_EVERY);
        let summary = loop {
            tokio::select! {
                summary = publishers.finished() => {
                    let summary = summary?;
                    samples.push(Sample::take(consumer, pid, self.nats_pid).await?);
                    break summary;
                }
                _ = ticker.tick() => {
                    let s = Sample::take(consumer, pid, self.nats_pid).await?;
                    let sim = publishers.stats();
                    self.progress.phase_line(phase, &s, &samples, &sim, self.a.duration);
                    samples.push(s);
                }
            }
        };
        self.progress.end_line();
        if let (Some(end), Ok(mut clock)) = (summary.clock_end, self.clock.lock()) {
            *clock = Some(end);
        }
        Ok(PhaseRun {
            sim: summary.stats,
            samples,
            warmup: (self.a.duration / 4).min(Duration::from_secs(1)),
        })
    }

    /// Waits until the consumer has nothing pending or unacknowledged, as long as it makes
    /// progress. Returns how long it took.
    pub(super) async fn drain(
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
    pub(super) async fn latency(
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

/// One look at a consumer (and the collector's memory).
#[derive(Debug, Clone, Copy)]
pub(super) struct Sample {
    pub(super) at: Instant,
    /// Messages acknowledged: delivered minus those still awaiting their ack.
    pub(super) acked: u64,
    /// Messages in the stream not yet delivered: the backlog waiting in JetStream.
    pub(super) pending: u64,
    pub(super) ack_pending: u64,
    pub(super) rss_kb: Option<u64>,
    /// CPU time used so far by nats-server, this process and the collector.
    pub(super) cpu: Cpu,
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
pub(super) struct PhaseRun {
    pub(super) sim: SimStats,
    pub(super) samples: Vec<Sample>,
    warmup: Duration,
}

impl PhaseRun {
    pub(super) fn readings_per_message(&self) -> f64 {
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
    pub(super) fn messages_per_sec(&self) -> (f64, f64) {
        let Some((from, to)) = self.window() else {
            return (0.0, 0.0);
        };
        let secs = to.at.duration_since(from.at).as_secs_f64();
        ((to.acked - from.acked.min(to.acked)) as f64 / secs, secs)
    }

    /// Messages/s over the first and the last minute of the window, when it lasts two
    /// minutes or more.
    fn first_and_last_minute(&self) -> Option<(f64, f64)> {
        const MINUTE: Duration = Duration::from_secs(60);
        let (from, to) = self.window()?;
        if to.at.duration_since(from.at) < 2 * MINUTE {
            return None;
        }
        let rate = |a: &Sample, b: &Sample| {
            (b.acked.saturating_sub(a.acked)) as f64 / b.at.duration_since(a.at).as_secs_f64()
        };
        let first_end = self.samples.iter().find(|s| s.at >= from.at + MINUTE)?;
        let last_start = self.samples.iter().rev().find(|s| s.at + MINUTE <= to.at)?;
        Some((rate(from, first_end), rate(last_start, to)))
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

    pub(super) fn figures(&self, drain: Option<Duration>) -> PhaseFigures {
        let (messages_per_sec, window_secs) = self.messages_per_sec();
        let per_message = self.readings_per_message();
        let minutes = self.first_and_last_minute();
        let cpu_cores = self.cpu_cores();
        let readings_per_sec = messages_per_sec * per_message;
        PhaseFigures {
            messages_per_sec,
            readings_per_sec,
            collector_us_per_reading: cpu_cores
                .collector
                .filter(|_| readings_per_sec > 0.0)
                .map(|cores| cores * 1e6 / readings_per_sec),
            published_per_sec: self.sim.publish_rate,
            published_messages: self.sim.published,
            published_readings: self.sim.readings,
            window_secs,
            first_minute_per_sec: minutes.map(|m| m.0),
            last_minute_per_sec: minutes.map(|m| m.1),
            backlog_peak: self.samples.iter().map(|s| s.pending).max().unwrap_or(0),
            drain_secs: drain.map(|d| d.as_secs_f64()),
            cpu_cores,
            state_updates: None,
        }
    }
}

/// What the latency phase produced.
pub(super) struct LatencyRun {
    pub(super) rate: f64,
    pub(super) sim: SimStats,
    pub(super) probes: usize,
    pub(super) probes_acked: u64,
    pub(super) probe_errors: u64,
    pub(super) to_state: Vec<Duration>,
    pub(super) to_row: Vec<Duration>,
}

impl LatencyRun {
    pub(super) fn figures(&self) -> LatencyFigures {
        LatencyFigures {
            background_messages_per_sec: self.rate,
            probes: self.probes,
            state_ms: Percentiles::of(&self.to_state),
            history_ms: Percentiles::of(&self.to_row),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
