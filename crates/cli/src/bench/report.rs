//! The report: the figures of every phase (serialized as they are for `--json`), the text
//! table, the comparison with a baseline run, and the targets checked against them.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::output::thousands;

use super::phases::Sample;
use super::process::{kb_to_mb, Cpu, MachineFigures};

/// Everything a run measured; `--json` prints it as it is.
#[derive(Debug, Serialize)]
pub(super) struct Report {
    pub(super) devices: usize,
    pub(super) payload: &'static str,
    pub(super) ticks_per_message: usize,
    pub(super) readings_per_message: f64,
    pub(super) duration_secs: f64,
    pub(super) workers: usize,
    pub(super) batch_size: usize,
    pub(super) connections: usize,
    pub(super) store: &'static str,
    pub(super) collector: &'static str,
    pub(super) ceiling: PhaseFigures,
    pub(super) pipeline: PhaseFigures,
    /// Pipeline messages/s over ceiling messages/s.
    pub(super) ratio: f64,
    pub(super) latency: LatencyFigures,
    /// Store reads of one seeded series while the pipeline phase ingests.
    pub(super) queries: super::queries::QueryFigures,
    /// The collector with the publishers flat out.
    pub(super) overload: PhaseFigures,
    pub(super) rss: RssFigures,
    pub(super) accounting: Accounting,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) baseline: Option<BaselineFigures>,
    pub(super) targets: Vec<Target>,
    pub(super) machine: MachineFigures,
}

#[derive(Debug, Serialize)]
pub(super) struct PhaseFigures {
    /// Messages acknowledged by the consumer per second while the publishers ran.
    pub(super) messages_per_sec: f64,
    pub(super) readings_per_sec: f64,
    /// Messages the publishers got acknowledged per second (the stream's intake).
    pub(super) published_per_sec: f64,
    pub(super) published_messages: u64,
    pub(super) published_readings: u64,
    /// Length of the measured window.
    pub(super) window_secs: f64,
    /// With a window of two minutes or more: messages/s over its first and its last
    /// minute, to tell a steady rate from one that falls as the store grows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) first_minute_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) last_minute_per_sec: Option<f64>,
    /// Most messages waiting in JetStream, undelivered, during the phase.
    pub(super) backlog_peak: u64,
    /// Time to work off the backlog after the publishers stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) drain_secs: Option<f64>,
    /// Cores each process kept busy during the window (the machine has `machine.cpus`).
    pub(super) cpu_cores: Cpu,
    /// Microseconds of collector CPU per reading collected: what compares two builds when
    /// the machine's speed, and with it the ceiling, moves between runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) collector_us_per_reading: Option<f64>,
    /// Latest-state KV puts during the phase (and its drain), per message collected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) state_updates: Option<StateUpdates>,
}

#[derive(Debug, Serialize)]
pub(super) struct StateUpdates {
    pub(super) puts: u64,
    pub(super) per_message: f64,
}

#[derive(Debug, Serialize)]
pub(super) struct LatencyFigures {
    pub(super) background_messages_per_sec: f64,
    pub(super) probes: usize,
    /// Publish → the latest-state bucket shows the probe's value (or a newer one).
    pub(super) state_ms: Percentiles,
    /// Publish → the probe's row is returned by `Store::history` (polled every 10 ms).
    pub(super) history_ms: Percentiles,
}

#[derive(Debug, Serialize)]
pub(super) struct Percentiles {
    p50: f64,
    p99: f64,
    max: f64,
    /// Probes that became visible (the others timed out).
    seen: usize,
}

impl Percentiles {
    pub(super) fn of(d: &[Duration]) -> Percentiles {
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
pub(super) struct RssFigures {
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
    pub(super) fn from(samples: &[Sample], peak_kb: Option<u64>) -> RssFigures {
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

#[derive(Debug, Serialize)]
pub(super) struct Accounting {
    /// Readings in messages the stream acknowledged (fleet and probes).
    pub(super) published_readings: u64,
    /// Rows the store gained.
    pub(super) stored: u64,
    pub(super) lost: u64,
    pub(super) duplicates: u64,
    /// False when some publishes failed: those may or may not be stored.
    pub(super) exact: bool,
    pub(super) publish_errors: u64,
    /// Messages in the dead-letter stream.
    pub(super) dead_letters: u64,
    /// Collector counters: redelivered messages and the readings they carried that the
    /// store recognised as already written (idempotent writes, not duplicates).
    pub(super) redelivered: u64,
    pub(super) duplicates_skipped: u64,
    pub(super) collector_stored: u64,
    pub(super) store_errors: u64,
    pub(super) nats_errors: u64,
}

#[derive(Debug, Serialize)]
pub(super) struct BaselineFigures {
    pub(super) devices: u64,
    pub(super) readings_per_sec: f64,
    pub(super) ratio: f64,
}

#[derive(Debug, Serialize)]
pub(super) struct Target {
    name: String,
    target: String,
    measured: String,
    /// `None` when the run could not check it (e.g. no overload happened).
    met: Option<bool>,
}

pub(super) fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// The targets of issue 4 that this run can check.
pub(super) fn targets(r: &Report) -> Vec<Target> {
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
    if let (Some(first), Some(last)) = (
        r.pipeline.first_minute_per_sec,
        r.pipeline.last_minute_per_sec,
    ) {
        add(
            "pipeline: last minute's rate / first minute's",
            "≥ 0.90",
            format!(
                "{:.2} ({} → {} msg/s)",
                ratio(last, first),
                thousands(first as u64),
                thousands(last as u64)
            ),
            Some(last >= 0.9 * first),
        );
    }
    let q = &r.queries;
    add(
        "1 h of raw readings under full ingest, p99",
        "≤ 20 ms",
        format!(
            "{:.1} ms ({} points)",
            q.raw_1h_ms.p99,
            thousands(q.raw_points as u64)
        ),
        Some(q.raw_1h_ms.p99 <= 20.0 && q.errors == 0),
    );
    add(
        "30 days of hourly rollups under full ingest, p99",
        "≤ 50 ms",
        format!(
            "{:.1} ms ({} rows)",
            q.rollups_30d_ms.p99,
            thousands(q.rollup_rows as u64)
        ),
        Some(q.rollups_30d_ms.p99 <= 50.0 && q.errors == 0),
    );
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
pub(super) struct Baseline {
    pub(super) devices: u64,
    pub(super) readings_per_sec: f64,
}

pub(super) fn read_baseline(path: &Path) -> Result<Baseline> {
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

/// The report as text on stdout.
pub(super) fn print_report(r: &Report) {
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
    if let (Some(p), Some(o)) = (
        r.pipeline.collector_us_per_reading,
        r.overload.collector_us_per_reading,
    ) {
        println!(
            "  collector CPU per reading: {p:.2} µs in the pipeline phase, {o:.2} µs in overload"
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
}
