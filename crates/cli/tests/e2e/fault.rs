//! The fault-injection acceptance test: over a million readings, in plain, JSON and
//! line-protocol messages (the line protocol with tags), go through two `fleetpipe collect`
//! processes into PostgreSQL while one collector is SIGKILLed and restarted every few
//! seconds, nats-server is killed and restarted once, and PostgreSQL is stopped for 30 s.
//! Every reading must be stored exactly once, with its value and tags.
//!
//! * Publishers use JetStream with acks, a bounded window and a `Nats-Msg-Id` per message,
//!   and retry a message until the broker acknowledges it (the broker drops a retry of a
//!   message it already stored: the stream's duplicate window is two minutes).
//! * Most readings travel in line-protocol messages of 160 readings each: 8 CPUs (tags that
//!   differ only in `cpu`) × 4 fields × 5 explicit timestamps, so a million readings take
//!   about 66,000 messages.
//! * The check is one SQL query grouped by series over `readings_v`: per series (device,
//!   sensor, tags) the count and two exact sums over its readings (timestamp and value, or
//!   the value alone for plain readings, whose timestamp is the broker's), compared with
//!   what was published. A series that differs is then fetched row by row to name the
//!   missing and duplicated readings and the messages that carried them.
//!
//! The collectors' stderr is kept in files under the test's directory; on failure the test
//! prints their tails and keeps the directory.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::collectors_consumer;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use fleetpipe_pipeline::config::names;
use fleetpipe_testkit::{NatsServer, PgServer};
use futures::stream::{FuturesUnordered, StreamExt};

/// Devices; each publishes plain, JSON and line-protocol messages.
const DEVICES: usize = 100;
/// Rounds: each device publishes one plain and one JSON message per round.
const ROUNDS: usize = 300;
/// Each device publishes one line-protocol message every `LP_EVERY` rounds.
const LP_EVERY: usize = 5;
/// The line-protocol messages: `CPUS` lines per timestamp, `STEPS` timestamps per message,
/// `FIELDS` readings per line.
const CPUS: usize = 8;
const STEPS: usize = 5;
const FIELDS: [&str; 4] = ["usage_user", "usage_system", "usage_idle", "usage_iowait"];

/// Publishing is spread over this long, so that every fault hits it.
const PUBLISH_FOR: Duration = Duration::from_secs(100);
/// Publishes awaiting their ack.
const WINDOW: usize = 512;
/// How long one message may take to be acknowledged, retries included, before the test
/// gives up: well inside the stream's two-minute duplicate window.
const PUBLISH_GIVE_UP: Duration = Duration::from_secs(60);
/// The collector that is killed: SIGKILLed every 2 to 5 s (it varies), restarted at once.
const FIRST_KILL: Duration = Duration::from_secs(3);
/// nats-server: SIGKILLed at this time, started again (same port, same store) after
/// `NATS_DOWN_FOR`.
const NATS_DOWN_AT: Duration = Duration::from_secs(20);
const NATS_DOWN_FOR: Duration = Duration::from_secs(2);
/// PostgreSQL: stopped at this time for `PG_DOWN_FOR`.
const PG_DOWN_AT: Duration = Duration::from_secs(45);
const PG_DOWN_FOR: Duration = Duration::from_secs(30);
/// Once publishing is over: how long to wait for the last readings, and for any progress.
const DRAIN_DEADLINE: Duration = Duration::from_secs(360);
const STALL_AFTER: Duration = Duration::from_secs(90);

/// Redelivery after a SIGKILL comes after `ack_wait`; keep it short.
const CONFIG: &str = r#"
[collector]
ack_wait = "4s"
"#;

/// The sums compare `x = ts_µs · 10⁶ + 4·value` (or `4·value` for plain readings): values
/// are multiples of 0.25 below 250,000, so `4·value` is an integer below 10⁶. The second
/// sum is of `(x mod P) · A mod P`, which catches a lost reading and a duplicate that the
/// first sum would balance out.
const P: u128 = (1 << 61) - 1;
const A: u128 = 1_442_695_040_888_963_407;
const CODES: u64 = 1_000_000;

/// A series: device, sensor, tags.
type SeriesId = (String, String, BTreeMap<String, String>);

/// One message to publish.
struct Msg {
    subject: String,
    payload: Bytes,
    id: String,
}

/// One expected reading: its timestamp (`None` for the broker's), `4·value`, and the index
/// of the message carrying it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct Expected {
    ts: Option<i64>,
    code: u64,
    msg: usize,
}

#[derive(Default)]
struct ExpectedSeries {
    unit: Option<&'static str>,
    readings: Vec<Expected>,
}

/// The sums of a series as the SQL query computes them.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Sums {
    count: u64,
    sum_x: u128,
    sum_h: u128,
}

fn x_of(ts: Option<i64>, code: u64) -> u128 {
    ts.map_or(0, |t| t as u128) * 1_000_000 + code as u128
}

fn h_of(x: u128) -> u128 {
    (x % P) * A % P
}

impl ExpectedSeries {
    fn sums(&self) -> Sums {
        let mut s = Sums {
            count: 0,
            sum_x: 0,
            sum_h: 0,
        };
        for r in &self.readings {
            let x = x_of(r.ts, r.code);
            s.count += 1;
            s.sum_x += x;
            s.sum_h += h_of(x);
        }
        s
    }
}

fn value(code: u64) -> String {
    fleetpipe_proto::payload::encode_plain(code as f64 / 4.0)
}

fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Every message, in publishing order, and the readings each series must end up with.
/// Line-protocol and JSON timestamps count from `base_us`, a day ago (inside the raw
/// retention, far from the future limit).
fn generate(base_us: i64) -> (Vec<Msg>, HashMap<SeriesId, ExpectedSeries>) {
    let mut msgs = Vec::new();
    let mut series: HashMap<SeriesId, ExpectedSeries> = HashMap::new();
    let push = |series: &mut HashMap<SeriesId, ExpectedSeries>,
                id: SeriesId,
                unit: Option<&'static str>,
                r: Expected| {
        let s = series.entry(id).or_default();
        s.unit = unit;
        s.readings.push(r);
    };
    for round in 0..ROUNDS {
        for d in 0..DEVICES {
            let device = format!("d{d:03}");
            // Plain: the broker's timestamp; values distinct within the series.
            let code = (round * 4 + 1) as u64;
            push(
                &mut series,
                (device.clone(), "speed".into(), BTreeMap::new()),
                None,
                Expected {
                    ts: None,
                    code,
                    msg: msgs.len(),
                },
            );
            msgs.push(Msg {
                subject: format!("vehicle.{device}.speed"),
                payload: Bytes::from(value(code)),
                id: format!("plain-{device}-{round}"),
            });
            // JSON with a unit and a timestamp in microseconds.
            let ts = base_us + round as i64 * 1_000_000 + 250_000 + d as i64;
            let code = (round * 4 + 2 + d) as u64 % CODES;
            push(
                &mut series,
                (device.clone(), "soc".into(), BTreeMap::new()),
                Some("%"),
                Expected {
                    ts: Some(ts),
                    code,
                    msg: msgs.len(),
                },
            );
            msgs.push(Msg {
                subject: format!("vehicle.{device}.soc"),
                payload: Bytes::from(format!(
                    r#"{{"value":{},"unit":"%","timestamp":{ts}}}"#,
                    value(code)
                )),
                id: format!("json-{device}-{round}"),
            });
            // Line protocol: CPUS × STEPS lines of FIELDS fields, nanosecond timestamps.
            if round % LP_EVERY == 0 {
                let m = round / LP_EVERY;
                let mut text = String::new();
                for k in 0..STEPS {
                    let step = m * STEPS + k;
                    let ts = base_us + step as i64 * 1_000_000;
                    for cpu in 0..CPUS {
                        let cpu_name = format!("cpu{cpu}");
                        text.push_str(&format!("cpu,cpu={cpu_name},host=h{d:03} "));
                        for (f, field) in FIELDS.iter().enumerate() {
                            let code = ((step * 37 + cpu * 5 + f * 3 + d) as u64) % CODES;
                            if f > 0 {
                                text.push(',');
                            }
                            text.push_str(&format!("{field}={}", value(code)));
                            push(
                                &mut series,
                                (
                                    device.clone(),
                                    format!("cpu.{field}"),
                                    tags(&[("cpu", &cpu_name), ("host", &format!("h{d:03}"))]),
                                ),
                                None,
                                Expected {
                                    ts: Some(ts),
                                    code,
                                    msg: msgs.len(),
                                },
                            );
                        }
                        text.push_str(&format!(" {}\n", ts * 1000));
                    }
                }
                msgs.push(Msg {
                    subject: format!("vehicle.{device}.cpu"),
                    payload: Bytes::from(text),
                    id: format!("lp-{device}-{m}"),
                });
            }
        }
    }
    (msgs, series)
}

/// What happened when, printed as it happens and again at the end.
#[derive(Clone)]
struct Events {
    t0: Instant,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Events {
    fn new(t0: Instant) -> Events {
        Events {
            t0,
            lines: Default::default(),
        }
    }

    fn note(&self, what: impl AsRef<str>) {
        let line = format!(
            "[{:7.1}s] {}",
            self.t0.elapsed().as_secs_f64(),
            what.as_ref()
        );
        eprintln!("{line}");
        self.lines.lock().unwrap().push(line);
    }
}

/// The counters of a collector's `--json` output that matter here.
fn brief(counters: &Result<serde_json::Value, String>) -> String {
    match counters {
        Err(e) => e.clone(),
        Ok(v) => [
            "messages",
            "readings_stored",
            "readings_duplicate",
            "redelivered",
            "dead_letters",
            "store_errors",
            "nats_errors",
        ]
        .iter()
        .map(|k| format!("{k} {}", v[k]))
        .collect::<Vec<_>>()
        .join(", "),
    }
}

/// One `fleetpipe collect --json` process, started again as often as needed; each run's
/// stderr goes to `collector-<name>-<run>.log`, its stdout to `….out`.
struct Collector {
    name: &'static str,
    dir: PathBuf,
    base: Vec<String>,
    child: Option<Child>,
    runs: usize,
}

impl Collector {
    fn new(name: &'static str, dir: &Path, base: Vec<String>) -> Collector {
        Collector {
            name,
            dir: dir.to_path_buf(),
            base,
            child: None,
            runs: 0,
        }
    }

    fn file(&self, run: usize, ext: &str) -> PathBuf {
        self.dir
            .join(format!("collector-{}-{run:02}.{ext}", self.name))
    }

    fn start(&mut self) {
        self.runs += 1;
        let child = Command::new(env!("CARGO_BIN_EXE_fleetpipe"))
            .args(&self.base)
            .args(["collect", "--json"])
            .env("FLEETPIPE_LOG", log_directives(self.name))
            .env_remove("FLEETPIPE_CONFIG")
            .stdin(Stdio::null())
            .stdout(File::create(self.file(self.runs, "out")).unwrap())
            .stderr(File::create(self.file(self.runs, "log")).unwrap())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The exit status, if the process ended on its own.
    fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// SIGTERM, then its counters (`--json`), or why there are none.
    fn stop(&mut self) -> Result<serde_json::Value, String> {
        let Some(c) = self.child.take() else {
            return Err("not running".into());
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let out = c.wait_with_output().unwrap();
        if !out.status.success() {
            return Err(format!("exited with {}", out.status));
        }
        let stdout = std::fs::read_to_string(self.file(self.runs, "out")).unwrap_or_default();
        serde_json::from_str(&stdout).map_err(|e| format!("{e}: {stdout:?}"))
    }

    /// The last `n` lines of run `run`'s stderr (a run of lines that differ only in their
    /// timestamp counts as one).
    fn tail(&self, run: usize, n: usize) -> String {
        let text = std::fs::read_to_string(self.file(run, "log")).unwrap_or_default();
        let lines = collapse(text.lines());
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The lines of every run's stderr that are warnings or errors, at most `n` per run
    /// (collapsed as in [`Collector::tail`]).
    fn problems(&self, n: usize) -> String {
        let mut out = String::new();
        for run in 1..=self.runs {
            let text = std::fs::read_to_string(self.file(run, "log")).unwrap_or_default();
            let bad: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("panicked"))
                .collect();
            if !bad.is_empty() {
                let shown = collapse(bad.iter().copied());
                out.push_str(&format!(
                    "--- collector {} run {run}: {} warning/error lines, the last:\n{}\n",
                    self.name,
                    bad.len(),
                    shown[shown.len().saturating_sub(n)..].join("\n")
                ));
            }
        }
        out
    }
}

/// Log lines with each run of lines that differ only in their timestamp (the first word)
/// written once, with how many there were.
fn collapse<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<(String, &'a str, usize)> = Vec::new();
    for line in lines {
        let rest = line.split_once(' ').map_or(line, |(_, rest)| rest);
        match out.last_mut() {
            Some((_, last, n)) if *last == rest => *n += 1,
            _ => out.push((line.to_string(), rest, 1)),
        }
    }
    out.into_iter()
        .map(|(line, _, n)| {
            if n > 1 {
                format!("{line}  (×{n})")
            } else {
                line
            }
        })
        .collect()
}

/// The collectors' log directives: `info`, or `$FLEETPIPE_FAULT_LOG_<NAME>` (collector `a`
/// or `b`) when set, to investigate a failure, e.g. `debug,async_nats=info`.
fn log_directives(name: &str) -> String {
    std::env::var(format!("FLEETPIPE_FAULT_LOG_{}", name.to_uppercase()))
        .unwrap_or_else(|_| "info".into())
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the chaos thread did.
#[derive(Default, Debug)]
struct ChaosReport {
    kills: usize,
    /// Collector runs that ended on their own (they are started again).
    self_exits: Vec<String>,
}

/// When the chaos thread stops: `stop` once the scheduled faults are over, `abort` at once
/// (the test is failing).
#[derive(Default)]
struct ChaosControl {
    stop: AtomicBool,
    abort: AtomicBool,
}

/// Sets `abort` when dropped, so that a panicking test does not leave the chaos thread
/// restarting collectors for the rest of the test binary's life.
struct AbortOnDrop(Arc<ChaosControl>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort.store(true, Ordering::Relaxed);
    }
}

/// Runs the faults on a schedule until told to stop: SIGKILLs `victim` every 2–5 s and
/// starts it again at once, kills nats-server once, stops PostgreSQL once; starts again any
/// collector that exited on its own. Times count from `start`, when publishing starts.
/// Returns once every scheduled fault is over and `stop` is set, or at once on `abort`.
fn chaos(
    events: Events,
    start: Instant,
    victim: &mut Collector,
    steady: &mut Collector,
    nats: &mut NatsServer,
    pg: &PgServer,
    control: &ChaosControl,
) -> ChaosReport {
    let stop = &control.stop;
    let mut report = ChaosReport::default();
    let mut next_kill = FIRST_KILL;
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let (mut nats_done, mut pg_stopped, mut pg_done) = (false, false, false);
    loop {
        let t = start.elapsed();
        let faults_over = nats_done && pg_done;
        if (stop.load(Ordering::Relaxed) && faults_over) || control.abort.load(Ordering::Relaxed) {
            if pg_stopped && !pg_done {
                pg.restart();
            }
            return report;
        }
        if !nats_done && t >= NATS_DOWN_AT {
            events.note(format!("nats-server: SIGKILL (down for {NATS_DOWN_FOR:?})"));
            nats.kill();
            std::thread::sleep(NATS_DOWN_FOR);
            nats.restart();
            events.note("nats-server: started again (same port, same store)");
            nats_done = true;
        }
        if !pg_stopped && t >= PG_DOWN_AT {
            events.note(format!("PostgreSQL: stopping for {PG_DOWN_FOR:?}"));
            pg.stop();
            events.note("PostgreSQL: stopped");
            pg_stopped = true;
        }
        if pg_stopped && !pg_done && t >= PG_DOWN_AT + PG_DOWN_FOR {
            pg.restart();
            events.note("PostgreSQL: started again");
            pg_done = true;
        }
        if !stop.load(Ordering::Relaxed) && t >= next_kill {
            let pid = victim.pid();
            victim.kill();
            victim.start();
            report.kills += 1;
            events.note(format!(
                "collector {}: SIGKILL pid {pid} (kill #{}), started run {}",
                victim.name, report.kills, victim.runs
            ));
            rng = rng
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            next_kill = t + Duration::from_millis(2000 + (rng >> 33) % 3000);
        }
        for c in [&mut *victim, &mut *steady] {
            if let Some(status) = c.exited() {
                let what = format!(
                    "collector {} run {} exited on its own ({status}): {}",
                    c.name,
                    c.runs,
                    c.tail(c.runs, 1)
                );
                events.note(&what);
                report.self_exits.push(what);
                // As a supervisor would: start it again, not in a tight loop.
                std::thread::sleep(Duration::from_secs(2));
                c.start();
                events.note(format!("collector {}: started run {}", c.name, c.runs));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Publishes one message until the broker acknowledges it, with the same `Nats-Msg-Id`
/// every time. Returns the attempts it took and whether the broker called the last one a
/// duplicate. Panics after [`PUBLISH_GIVE_UP`] (past the duplicate window, a retry could
/// be stored twice).
async fn publish_until_acked(js: &jetstream::Context, msg: &Msg) -> (u32, bool) {
    let started = tokio::time::Instant::now();
    let mut attempts = 0;
    loop {
        assert!(
            started.elapsed() < PUBLISH_GIVE_UP,
            "the broker did not acknowledge message {} in {PUBLISH_GIVE_UP:?} ({attempts} attempts)",
            msg.id
        );
        attempts += 1;
        let publish = PublishMessage::build()
            .payload(msg.payload.clone())
            .message_id(&msg.id);
        if let Ok(ack) = js.send_publish(msg.subject.clone(), publish).await {
            if let Ok(ack) = ack.await {
                return (attempts, ack.duplicate);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[derive(Default)]
struct PublishStats {
    acked: AtomicU64,
    retried: AtomicU64,
    duplicates: AtomicU64,
}

/// Publishes `msgs` in order, message `i` no earlier than `i / n` of the way through
/// [`PUBLISH_FOR`], at most [`WINDOW`] awaiting their ack.
async fn publish(js: jetstream::Context, msgs: Arc<Vec<Msg>>, stats: Arc<PublishStats>) {
    let start = tokio::time::Instant::now();
    let n = msgs.len() as u32;
    let mut inflight = FuturesUnordered::new();
    let done = |(attempts, duplicate): (u32, bool)| {
        stats.acked.fetch_add(1, Ordering::Relaxed);
        if attempts > 1 {
            stats.retried.fetch_add(1, Ordering::Relaxed);
        }
        if duplicate {
            stats.duplicates.fetch_add(1, Ordering::Relaxed);
        }
    };
    for i in 0..msgs.len() {
        let due = start + PUBLISH_FOR * i as u32 / n;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(due) => break,
                Some(r) = inflight.next(), if !inflight.is_empty() => done(r),
            }
        }
        while inflight.len() >= WINDOW {
            done(inflight.next().await.unwrap());
        }
        let (js, msgs) = (js.clone(), msgs.clone());
        inflight.push(async move { publish_until_acked(&js, &msgs[i]).await });
    }
    while let Some(r) = inflight.next().await {
        done(r);
    }
}

/// The stored count, or `None` while the store does not answer.
async fn count(store: &dyn fleetpipe_store::Store) -> Option<u64> {
    tokio::time::timeout(Duration::from_secs(5), store.count_readings())
        .await
        .ok()?
        .ok()
}

/// What the database holds of one series.
struct Stored {
    sums: Sums,
    /// The series' unit, `""` for none.
    unit: String,
    /// First and last timestamps, in microseconds.
    min_ts: i64,
    max_ts: i64,
    /// Every value is a multiple of 0.25, as published.
    whole: bool,
}

/// The per-series sums from the database, one query.
fn stored_sums(pg: &PgServer, db: &str) -> HashMap<SeriesId, Stored> {
    let sql = format!(
        "SELECT device, sensor, tags::text, coalesce(unit, ''), count(*), sum(x)::text, \
                sum(mod(mod(x, {P}) * {A}, {P}))::text, min(ts_us)::text, max(ts_us)::text, \
                bool_and(whole) \
         FROM (SELECT device, sensor, tags, unit, \
                      round(extract(epoch FROM ts) * 1000000) AS ts_us, \
                      value * 4 = round(value * 4) AS whole, \
                      CASE WHEN sensor = 'speed' THEN 0 \
                           ELSE round(extract(epoch FROM ts) * 1000000) END * 1000000 \
                        + round(value::numeric * 4) AS x \
               FROM readings_v) r \
         GROUP BY device, sensor, tags, unit"
    );
    let mut out = HashMap::new();
    for line in pg.psql(db, &sql).lines().filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 10, "row {line:?}");
        let tags: BTreeMap<String, String> = serde_json::from_str(f[2]).unwrap();
        let sums = Sums {
            count: f[4].parse().unwrap(),
            sum_x: f[5].parse().unwrap(),
            sum_h: f[6].parse().unwrap(),
        };
        let prev = out.insert(
            (f[0].to_string(), f[1].to_string(), tags),
            Stored {
                sums,
                unit: f[3].to_string(),
                min_ts: f[7].parse().unwrap(),
                max_ts: f[8].parse().unwrap(),
                whole: f[9] == "t",
            },
        );
        assert!(prev.is_none(), "series listed twice (two units?): {line}");
    }
    out
}

/// Fetches one series row by row and says which expected readings are missing and which
/// stored ones are extra or repeated, naming the messages that carried them.
fn diagnose(pg: &PgServer, db: &str, id: &SeriesId, want: &ExpectedSeries, msgs: &[Msg]) -> String {
    let tags_json = serde_json::to_string(&id.2).unwrap();
    let sql = format!(
        "SELECT r.seq, round(extract(epoch FROM r.ts) * 1000000)::text, \
                round(r.value::numeric * 4)::text \
         FROM readings r JOIN series s ON s.id = r.series_id \
         WHERE s.device = '{}' AND s.sensor = '{}' AND s.tags = '{}'::jsonb ORDER BY 2, 1",
        id.0, id.1, tags_json
    );
    let plain = id.1 == "speed";
    // (ts or None for plain readings, 4·value) → the (stream seq, ts) of each row.
    type Rows = HashMap<(Option<i64>, u64), Vec<(u64, i64)>>;
    let mut stored = Rows::new();
    for line in pg.psql(db, &sql).lines().filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split('\t').collect();
        let (seq, ts, code): (u64, i64, u64) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        let key = (if plain { None } else { Some(ts) }, code);
        stored.entry(key).or_default().push((seq, ts));
    }
    let mut report = String::new();
    let mut missing = 0;
    for r in &want.readings {
        match stored.remove(&(r.ts, r.code)) {
            None => {
                missing += 1;
                if missing <= 10 {
                    let m = &msgs[r.msg];
                    report.push_str(&format!(
                        "  missing: ts {:?} value {} from message #{} ({}, id {})\n",
                        r.ts,
                        r.code as f64 / 4.0,
                        r.msg,
                        m.subject,
                        m.id
                    ));
                }
            }
            Some(rows) if rows.len() > 1 => {
                report.push_str(&format!(
                    "  stored {} times: ts {:?} value {} from message #{} ({}): (stream seq, ts) {:?}\n",
                    rows.len(),
                    r.ts,
                    r.code as f64 / 4.0,
                    r.msg,
                    msgs[r.msg].id,
                    rows
                ));
            }
            Some(_) => {}
        }
    }
    if missing > 10 {
        report.push_str(&format!("  … {missing} missing in all\n"));
    }
    for ((ts, code), rows) in stored {
        report.push_str(&format!(
            "  not published: ts {ts:?} value {}: (stream seq, ts) {rows:?}\n",
            code as f64 / 4.0
        ));
    }
    report
}

/// Up to 20 dead letters: their reason codes and subjects.
async fn dead_letters(js: &jetstream::Context) -> (u64, String) {
    let Ok(mut stream) = js.get_stream(names::DLQ_STREAM).await else {
        return (0, "no dead-letter stream".into());
    };
    let info = stream.info().await.unwrap().clone();
    let mut out = String::new();
    let first = info.state.first_sequence;
    for seq in first..first + info.state.messages.min(20) {
        if let Ok(m) = stream.get_raw_message(seq).await {
            let h = |k: &str| m.headers.get(k).map(|v| v.to_string()).unwrap_or_default();
            out.push_str(&format!(
                "  dead letter {seq}: subject {} seq {} codes {} reason {}\n",
                h("Fleetpipe-Subject"),
                h("Fleetpipe-Stream-Seq"),
                h("Fleetpipe-Codes"),
                h("Fleetpipe-Reason")
            ));
        }
    }
    (info.state.messages, out)
}

#[tokio::test(flavor = "multi_thread")]
async fn million_readings_through_kills_and_outages() {
    let Some(pg) = PgServer::start_or_skip() else {
        return;
    };
    let t0 = Instant::now();
    let events = Events::new(t0);
    let db = "fault";
    let store_url = pg.create_database(db);
    let mut nats = NatsServer::start();
    let dir = tempfile::Builder::new()
        .prefix("fleetpipe-fault-")
        .tempdir()
        .unwrap();
    let config = dir.path().join("fleetpipe.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let base: Vec<String> = vec![
        "--nats-url".into(),
        nats.url(),
        "--store".into(),
        store_url.clone(),
        "--config".into(),
        config.display().to_string(),
        "--data-dir".into(),
        dir.path().display().to_string(),
    ];
    let init = Command::new(env!("CARGO_BIN_EXE_fleetpipe"))
        .args(&base)
        .arg("init")
        .env("FLEETPIPE_LOG", "warn")
        .env_remove("FLEETPIPE_CONFIG")
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "fleetpipe init: {}",
        String::from_utf8_lossy(&init.stderr)
    );

    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let base_us = (now_us / 1_000_000 - 86_400) * 1_000_000;
    let (msgs, expected) = generate(base_us);
    let msgs = Arc::new(msgs);
    let total: u64 = expected.values().map(|s| s.readings.len() as u64).sum();
    events.note(format!(
        "{} messages carrying {total} readings in {} series; publishing over {PUBLISH_FOR:?}",
        msgs.len(),
        expected.len()
    ));
    assert!(total >= 1_000_000);

    let store = fleetpipe_store::open(&store_url).await.unwrap();
    let mut victim = Collector::new("a", dir.path(), base.clone());
    let mut steady = Collector::new("b", dir.path(), base.clone());
    victim.start();
    steady.start();

    // The publisher has a connection of its own; it reconnects after the broker restart.
    let publish_stats = Arc::new(PublishStats::default());
    let client = async_nats::connect(nats.url()).await.unwrap();
    let publisher = tokio::spawn(publish(
        jetstream::new(client),
        msgs.clone(),
        publish_stats.clone(),
    ));
    let published_at_start = Instant::now();

    // The faults run on a thread of their own (pg_ctl and process waits block).
    let control = Arc::new(ChaosControl::default());
    let _abort = AbortOnDrop(control.clone());
    let pg = Arc::new(pg);
    let chaos_thread = {
        let (events, control, pg) = (events.clone(), control.clone(), pg.clone());
        std::thread::spawn(move || {
            let report = chaos(
                events,
                published_at_start,
                &mut victim,
                &mut steady,
                &mut nats,
                &pg,
                &control,
            );
            (report, victim, steady, nats)
        })
    };

    // Progress every 5 s until everything is published.
    let mut last_report = Instant::now();
    while !publisher.is_finished() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            events.note(format!(
                "published {} / {} (retried {}), stored {}",
                publish_stats.acked.load(Ordering::Relaxed),
                msgs.len(),
                publish_stats.retried.load(Ordering::Relaxed),
                count(&*store)
                    .await
                    .map_or("? (store unavailable)".into(), |n| n.to_string())
            ));
        }
    }
    publisher.await.unwrap();
    let publish_time = published_at_start.elapsed();
    events.note(format!(
        "all {} messages acknowledged by the broker in {:.1}s ({} needed a retry, {} retries \
         were duplicates the broker dropped); the kills stop",
        msgs.len(),
        publish_time.as_secs_f64(),
        publish_stats.retried.load(Ordering::Relaxed),
        publish_stats.duplicates.load(Ordering::Relaxed)
    ));
    control.stop.store(true, Ordering::Relaxed);
    let (chaos_report, mut victim, mut steady, nats) = chaos_thread.join().unwrap();

    // Wait for the last readings: until the count is reached, the deadline passes, or
    // nothing moves for STALL_AFTER.
    let drain_start = Instant::now();
    let mut stored = 0;
    let mut moved = Instant::now();
    let mut last_note = Instant::now();
    while drain_start.elapsed() < DRAIN_DEADLINE && moved.elapsed() < STALL_AFTER {
        if let Some(n) = count(&*store).await {
            if n != stored {
                moved = Instant::now();
            }
            stored = n;
            if n >= total {
                break;
            }
        }
        if last_note.elapsed() >= Duration::from_secs(5) {
            last_note = Instant::now();
            events.note(format!("draining: stored {stored} / {total}"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let drain_time = drain_start.elapsed();
    events.note(format!(
        "stored {stored} / {total} after {:.1}s of draining",
        drain_time.as_secs_f64()
    ));
    // Nothing more arrives later (no late duplicate from a redelivery).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let settled = count(&*store).await;

    let mut problems = Vec::new();
    if settled != Some(total) {
        problems.push(format!(
            "count_readings: {settled:?} stored, {total} published (after {:.0}s of \
             draining{})",
            drain_time.as_secs_f64(),
            if moved.elapsed() >= STALL_AFTER {
                format!("; no progress for {STALL_AFTER:?}: a stall")
            } else {
                String::new()
            }
        ));
    }

    // The broker: nothing pending, nothing dead-lettered.
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let (dead, dead_list) = dead_letters(&js).await;
    if dead > 0 {
        problems.push(format!("{dead} dead letters:\n{dead_list}"));
    }
    let consumer_info = collectors_consumer(&js).await;
    events.note(format!(
        "consumer: {} pending, {} awaiting ack, {} redelivered; {} kills; dead letters {dead}",
        consumer_info.num_pending,
        consumer_info.num_ack_pending,
        consumer_info.num_redelivered,
        chaos_report.kills
    ));
    if consumer_info.num_pending > 0 || consumer_info.num_ack_pending > 0 {
        problems.push(format!(
            "the consumer still has {} messages to deliver and {} delivered but never \
             acknowledged",
            consumer_info.num_pending, consumer_info.num_ack_pending
        ));
    }

    // Stop the collectors gracefully: their counters (of their last run only).
    let stopping = Instant::now();
    let counters_a = victim.stop();
    let stop_a = stopping.elapsed();
    let counters_b = steady.stop();
    let stop_b = stopping.elapsed() - stop_a;
    for (name, took) in [("a", stop_a), ("b", stop_b)] {
        // A stop finishes the batches in hand: a second or two unless something is stuck
        // (`fleetpipe collect` gives up after 30 s).
        if took > Duration::from_secs(15) {
            problems.push(format!(
                "collector {name} took {:.1}s to stop: its batches in hand were stuck",
                took.as_secs_f64()
            ));
        }
    }
    events.note(format!(
        "counters of collector a's last run: {}; of collector b: {}",
        brief(&counters_a),
        brief(&counters_b)
    ));
    if let Err(e) = &counters_b {
        problems.push(format!("collector b did not stop cleanly: {e}"));
    }

    // Per series: count and sums, one query.
    let check_start = Instant::now();
    let got = stored_sums(&pg, db);
    let plain_window = (
        now_us - 60_000_000,
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as i64,
    );
    let mut bad_series = Vec::new();
    for (id, want) in &expected {
        let sums = want.sums();
        match got.get(id) {
            None => bad_series.push((id.clone(), format!("missing: {} readings", sums.count))),
            Some(have) => {
                let mut why = Vec::new();
                if have.sums.count != sums.count {
                    why.push(format!(
                        "{} readings stored, {} published",
                        have.sums.count, sums.count
                    ));
                } else if have.sums != sums {
                    why.push("as many readings as published, other timestamps or values".into());
                }
                if have.unit != want.unit.unwrap_or("") {
                    why.push(format!("unit {:?}, published {:?}", have.unit, want.unit));
                }
                if !have.whole {
                    why.push("a value is not a multiple of 0.25, as all published ones".into());
                }
                let (min_ts, max_ts) = (have.min_ts, have.max_ts);
                if id.1 == "speed" && (min_ts < plain_window.0 || max_ts > plain_window.1) {
                    why.push(format!(
                        "broker timestamps {min_ts}..{max_ts} outside the run {plain_window:?}"
                    ));
                }
                if !why.is_empty() {
                    bad_series.push((id.clone(), why.join("; ")));
                }
            }
        }
    }
    for id in got.keys() {
        if !expected.contains_key(id) {
            let n = got[id].sums.count;
            bad_series.push((id.clone(), format!("not published: {n} readings")));
        }
    }
    for table in ["rollups_1m", "rollups_1h"] {
        let rollup_count: u64 = pg
            .psql(db, &format!("SELECT coalesce(sum(count), 0) FROM {table}"))
            .trim()
            .parse()
            .unwrap();
        if rollup_count != total {
            problems.push(format!(
                "{table} count {rollup_count} readings, {total} published"
            ));
        }
    }
    events.note(format!(
        "checked {} series in {:.1}s: {} differ",
        expected.len(),
        check_start.elapsed().as_secs_f64(),
        bad_series.len()
    ));
    if !bad_series.is_empty() {
        bad_series.sort_by(|a, b| a.0.cmp(&b.0));
        let mut text = format!(
            "{} series differ from what was published:\n",
            bad_series.len()
        );
        for (id, why) in bad_series.iter().take(20) {
            text.push_str(&format!("{id:?}: {why}\n"));
        }
        for (id, _) in bad_series.iter().take(5) {
            if let Some(want) = expected.get(id) {
                text.push_str(&format!("{id:?}:\n{}", diagnose(&pg, db, id, want, &msgs)));
            }
        }
        problems.push(text);
    }
    if !chaos_report.self_exits.is_empty() {
        events.note(format!(
            "{} collector runs exited on their own (started again)",
            chaos_report.self_exits.len()
        ));
    }

    let elapsed = t0.elapsed();
    eprintln!(
        "fault test: {total} readings in {} messages, {} series; {} SIGKILLs; publishing \
         {:.1}s, draining {:.1}s, total {:.1}s",
        msgs.len(),
        expected.len(),
        chaos_report.kills,
        publish_time.as_secs_f64(),
        drain_time.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    if problems.is_empty() {
        if std::env::var_os("FLEETPIPE_FAULT_KEEP").is_some() {
            eprintln!(
                "FLEETPIPE_FAULT_KEEP: logs kept in {}",
                dir.keep().display()
            );
        }
        return;
    }
    {
        eprintln!(
            "=== events ===\n{}",
            events.lines.lock().unwrap().join("\n")
        );
        for c in [&victim, &steady] {
            eprintln!("{}", c.problems(15));
            eprintln!(
                "--- collector {} run {} (last), tail:\n{}",
                c.name,
                c.runs,
                c.tail(c.runs, 30)
            );
        }
        let kept = dir.keep();
        panic!(
            "fault test failed (collector logs kept in {}):\n{}",
            kept.display(),
            problems.join("\n")
        );
    }
}
