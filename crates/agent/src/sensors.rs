//! Sensors: where a value comes from, and one task per sensor that samples it at its own
//! rate, applies the deadband and hands samples to the batcher. The rate, the deadband and
//! whether it runs come from a `watch` channel, so a live change applies at once, without
//! restarting anything.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetpipe_device::publish::batch::Sample;
use fleetpipe_proto::Timestamp;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::config::{Effective, SensorConfig};

/// Longest output read from a file or a command, and longest line.
const MAX_READ: u64 = 4096;
/// Longest a command may run whatever the rate.
const MAX_COMMAND_TIME: Duration = Duration::from_secs(10);

/// Counters shared by the sensor tasks.
#[derive(Debug, Default)]
pub struct SensorStats {
    /// Samples taken.
    pub samples: AtomicU64,
    /// Samples handed on for publishing (the rest fell inside the deadband).
    pub emitted: AtomicU64,
    /// Reads that failed (file missing, command failed, not a number).
    pub read_errors: AtomicU64,
}

/// Where values come from.
enum Source {
    File {
        path: PathBuf,
    },
    Command {
        argv: Vec<String>,
        timeout: Option<Duration>,
    },
    /// The newest line read by a background task, and a count of lines so far.
    Lines {
        latest: Arc<Mutex<(u64, Option<f64>)>>,
        seen: u64,
    },
    Sine {
        amplitude: f64,
        period: Duration,
        start: Instant,
    },
    RandomWalk {
        step: f64,
        value: f64,
    },
    Counter {
        next: f64,
    },
}

impl Source {
    fn new(cfg: &SensorConfig, stop: &watch::Receiver<bool>) -> Source {
        match cfg.source.as_str() {
            "file" => Source::File {
                path: cfg.path.clone().unwrap_or_default(),
            },
            "command" => Source::Command {
                argv: cfg.command.clone(),
                timeout: cfg.timeout,
            },
            "lines" => {
                let latest = Arc::new(Mutex::new((0, None)));
                tokio::spawn(read_lines(
                    cfg.name.clone(),
                    cfg.path.clone().unwrap_or_default(),
                    latest.clone(),
                    stop.clone(),
                ));
                Source::Lines { latest, seen: 0 }
            }
            _ => match cfg.signal.as_deref().unwrap_or("sine") {
                "counter" => Source::Counter { next: 0.0 },
                "random_walk" => Source::RandomWalk {
                    step: cfg.amplitude.unwrap_or(1.0),
                    value: 0.0,
                },
                _ => Source::Sine {
                    amplitude: cfg.amplitude.unwrap_or(1.0),
                    period: cfg.period.unwrap_or(Duration::from_secs(60)),
                    start: Instant::now(),
                },
            },
        }
    }

    /// The raw value, `Ok(None)` when there is nothing new (`lines`).
    async fn read(&mut self, period: Duration) -> Result<Option<f64>, String> {
        match self {
            Source::File { path } => {
                let file = tokio::fs::File::open(&*path)
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                let mut text = String::new();
                file.take(MAX_READ)
                    .read_to_string(&mut text)
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                parse_number(&text).map(Some)
            }
            Source::Command { argv, timeout } => {
                let limit = timeout.unwrap_or(period).min(MAX_COMMAND_TIME);
                run_command(argv, limit).await.map(Some)
            }
            Source::Lines { latest, seen } => {
                let (count, value) = *latest.lock().map_err(|_| "poisoned".to_string())?;
                if count == *seen {
                    return Ok(None);
                }
                *seen = count;
                Ok(value)
            }
            Source::Sine {
                amplitude,
                period,
                start,
            } => {
                let t = start.elapsed().as_secs_f64() / period.as_secs_f64();
                Ok(Some(*amplitude * (t * std::f64::consts::TAU).sin()))
            }
            Source::RandomWalk { step, value } => {
                *value += *step * (rand_unit() * 2.0 - 1.0);
                Ok(Some(*value))
            }
            Source::Counter { next } => {
                let v = *next;
                *next += 1.0;
                Ok(Some(v))
            }
        }
    }
}

/// A cheap uniform number in [0, 1) from the clock and a counter (no RNG dependency for
/// a demo signal).
fn rand_unit() -> f64 {
    static STATE: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    let mut x = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// The first whitespace-separated token of `text` as a finite number.
pub fn parse_number(text: &str) -> Result<f64, String> {
    let token = text.split_whitespace().next().unwrap_or("");
    match token.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!(
            "not a number: {:?}",
            token.chars().take(40).collect::<String>()
        )),
    }
}

async fn run_command(argv: &[String], limit: Duration) -> Result<f64, String> {
    let (program, args) = argv.split_first().ok_or("empty command")?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let work = async {
        let mut text = String::new();
        stdout
            .take(MAX_READ)
            .read_to_string(&mut text)
            .await
            .map_err(|e| format!("{program}: {e}"))?;
        let status = child.wait().await.map_err(|e| format!("{program}: {e}"))?;
        if !status.success() {
            return Err(format!("{program} exited with {status}"));
        }
        parse_number(&text)
    };
    match tokio::time::timeout(limit, work).await {
        Ok(r) => r,
        // Dropping the child kills it (kill_on_drop); tokio reaps it in the background.
        Err(_) => Err(format!("{program} took longer than {limit:?}")),
    }
}

/// Reads numbers line by line from `path` (a pipe, a serial device, a file being
/// appended), keeping the newest; reopens it a second after it ends or fails.
async fn read_lines(
    name: String,
    path: PathBuf,
    latest: Arc<Mutex<(u64, Option<f64>)>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut warned = false;
    while !*stop.borrow() {
        let work = async {
            let file = tokio::fs::File::open(&path).await?;
            let mut reader = BufReader::with_capacity(4096, file);
            let mut line = Vec::new();
            loop {
                line.clear();
                // Bounded: a line longer than MAX_READ is cut there and refused.
                let n = (&mut reader)
                    .take(MAX_READ)
                    .read_until(b'\n', &mut line)
                    .await?;
                if n == 0 {
                    return Ok::<(), std::io::Error>(());
                }
                let text = String::from_utf8_lossy(&line);
                let value = parse_number(&text).ok();
                if let Ok(mut l) = latest.lock() {
                    l.0 += 1;
                    l.1 = value;
                }
            }
        };
        tokio::select! {
            r = work => {
                if let Err(e) = r {
                    if !warned {
                        tracing::warn!(sensor = %name, path = %path.display(), error = %e, "cannot read lines");
                        warned = true;
                    }
                }
            }
            _ = stop.changed() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Runs one sensor until `stop`: samples at the rate `settings` says, publishes what leaves
/// the deadband (or is due for a heartbeat) with a timestamp strictly after the previous
/// one.
pub async fn run(
    cfg: Arc<SensorConfig>,
    mut settings: watch::Receiver<Effective>,
    out: mpsc::Sender<Sample>,
    stats: Arc<SensorStats>,
    mut stop: watch::Receiver<bool>,
) {
    let mut source = Source::new(&cfg, &stop);
    let name: Arc<str> = cfg.name.as_str().into();
    let unit: Option<Arc<str>> = cfg.unit.as_deref().map(Into::into);
    let mut last_ts = Timestamp(i64::MIN);
    let mut last_sent: Option<(f64, Instant)> = None;
    let mut next = Instant::now();
    let mut warned = false;
    // Without live configuration the settings' sender is gone, and a closed channel's
    // `changed()` is ready at once: stop polling it then.
    let mut live = true;
    loop {
        if *stop.borrow() {
            return;
        }
        let s = *settings.borrow_and_update();
        if !s.enabled {
            tokio::select! {
                changed = settings.changed(), if live => {
                    live = changed.is_ok();
                    next = Instant::now();
                    continue;
                }
                _ = stop.changed() => return,
            }
        }
        let period = Duration::from_secs_f64(1.0 / s.rate_hz);
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            changed = settings.changed(), if live => {
                live = changed.is_ok();
                // A new rate applies from the last sample, at once if that is past.
                if live {
                    let new = *settings.borrow();
                    let p = Duration::from_secs_f64(1.0 / new.rate_hz.max(1e-3));
                    next = next.checked_sub(period).map_or(next, |last| (last + p).max(Instant::now()));
                }
                continue;
            }
            _ = stop.changed() => return,
        }
        let now = Instant::now();
        next += period;
        if next < now {
            // Fell behind (a slow command): skip the missed samples rather than burst.
            next = now + period;
        }
        stats.samples.fetch_add(1, Ordering::Relaxed);
        let raw = match source.read(period).await {
            Ok(Some(v)) => v,
            Ok(None) => continue,
            Err(e) => {
                stats.read_errors.fetch_add(1, Ordering::Relaxed);
                if !warned {
                    tracing::warn!(sensor = %name, error = %e, "sensor read failed");
                    warned = true;
                }
                continue;
            }
        };
        warned = false;
        let value = match &source {
            Source::File { .. } | Source::Command { .. } | Source::Lines { .. } => {
                raw * cfg.scale + cfg.offset
            }
            _ => raw + cfg.offset,
        };
        if !value.is_finite() {
            stats.read_errors.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let due = match last_sent {
            None => true,
            Some((v, at)) => {
                s.deadband <= 0.0 || (value - v).abs() > s.deadband || at.elapsed() >= s.heartbeat
            }
        };
        if !due {
            continue;
        }
        let mut ts = Timestamp::now();
        if ts <= last_ts {
            ts = last_ts.saturating_add_micros(1);
        }
        last_ts = ts;
        last_sent = Some((value, Instant::now()));
        let sample = Sample {
            sensor: name.clone(),
            value,
            ts,
            unit: unit.clone(),
        };
        tokio::select! {
            r = out.send(sample) => if r.is_err() { return; },
            _ = stop.changed() => return,
        }
        stats.emitted.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_parse_from_sysfs_and_commands() {
        assert_eq!(parse_number("48250\n"), Ok(48250.0));
        assert_eq!(parse_number(" 21.5 C\n"), Ok(21.5));
        assert!(parse_number("").is_err());
        assert!(parse_number("NaN").is_err());
        assert!(parse_number("inf").is_err());
    }

    #[tokio::test]
    async fn commands_and_files_are_read_and_bounded() {
        let v = run_command(
            &["sh".into(), "-c".into(), "echo 42".into()],
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(v, Ok(42.0));
        let slow = run_command(&["sleep".into(), "5".into()], Duration::from_millis(100)).await;
        assert!(slow.unwrap_err().contains("longer"));
        let failed = run_command(&["false".into()], Duration::from_secs(5)).await;
        assert!(failed.is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("temp");
        std::fs::write(&path, "48250\n").unwrap();
        let mut s = Source::File { path };
        assert_eq!(s.read(Duration::from_secs(1)).await, Ok(Some(48250.0)));
    }
}
