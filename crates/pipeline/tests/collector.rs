//! The collector against a real nats-server and the embedded store, with a store wrapper
//! that refuses, fails or stalls on demand: what it does with a message the store cannot
//! hold, a store outage, a commit slower than the ack wait, and a graceful stop.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use fleetpipe_pipeline::collector::Collector;
use fleetpipe_pipeline::{broker, Config, Stats};
use fleetpipe_proto::Timestamp;
use fleetpipe_store::{
    Point, Range, Record, Resolution, Rollup, SeriesInfo, SeriesKey, Snapshot, Store, StoreError,
};
use fleetpipe_testkit::NatsServer;
use tokio_util::sync::CancellationToken;

/// What the wrapped store does.
#[derive(Default)]
struct Faults {
    /// Refuse (permanently) any batch holding this value.
    refuse_value: Option<f64>,
    /// Fail (with a transient error) any batch holding this value, while the store answers
    /// pings: a message the store refuses under a misleading error.
    suspect_value: Option<f64>,
    /// The store is down: writes and pings fail.
    down: AtomicBool,
    /// Every write sleeps this long first.
    slow: Option<Duration>,
    writes: AtomicU32,
}

struct Faulty {
    inner: Arc<dyn Store>,
    faults: Arc<Faults>,
}

fn transient() -> StoreError {
    StoreError::Task("connection reset (injected)".into())
}

#[async_trait::async_trait]
impl Store for Faulty {
    fn kind(&self) -> &'static str {
        "faulty"
    }
    async fn write_readings(&self, batch: &[Record]) -> fleetpipe_store::Result<u64> {
        self.faults.writes.fetch_add(1, Ordering::Relaxed);
        if let Some(d) = self.faults.slow {
            tokio::time::sleep(d).await;
        }
        if self.faults.down.load(Ordering::Relaxed) {
            return Err(transient());
        }
        let has = |v: Option<f64>| v.is_some_and(|v| batch.iter().any(|r| r.reading.value == v));
        if has(self.faults.refuse_value) {
            return Err(StoreError::Invalid("value refused (injected)".into()));
        }
        if has(self.faults.suspect_value) {
            return Err(transient());
        }
        self.inner.write_readings(batch).await
    }
    async fn write_snapshots(&self, rows: &[Snapshot]) -> fleetpipe_store::Result<u64> {
        self.inner.write_snapshots(rows).await
    }
    async fn series(
        &self,
        device: &str,
        sensor: Option<&str>,
    ) -> fleetpipe_store::Result<Vec<SeriesInfo>> {
        self.inner.series(device, sensor).await
    }
    async fn series_history(
        &self,
        key: &SeriesKey<'_>,
        range: Range,
        limit: usize,
    ) -> fleetpipe_store::Result<Vec<Point>> {
        self.inner.series_history(key, range, limit).await
    }
    async fn series_rollups_at(
        &self,
        key: &SeriesKey<'_>,
        range: Range,
        resolution: Resolution,
    ) -> fleetpipe_store::Result<Vec<Rollup>> {
        self.inner.series_rollups_at(key, range, resolution).await
    }
    async fn snapshots(
        &self,
        device: Option<&str>,
        range: Range,
        limit: usize,
    ) -> fleetpipe_store::Result<Vec<Snapshot>> {
        self.inner.snapshots(device, range, limit).await
    }
    async fn count_readings(&self) -> fleetpipe_store::Result<u64> {
        self.inner.count_readings().await
    }
    async fn prune_readings(&self, before: Timestamp) -> fleetpipe_store::Result<u64> {
        self.inner.prune_readings(before).await
    }
    async fn ping(&self) -> fleetpipe_store::Result<()> {
        if self.faults.down.load(Ordering::Relaxed) {
            return Err(transient());
        }
        self.inner.ping().await
    }
}

/// A collector process: broker objects, a store, the collector's tasks.
struct Rig {
    js: jetstream::Context,
    store: Arc<dyn Store>,
    stats: Arc<Stats>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

fn config(ack_wait: Duration) -> Config {
    let mut c = Config::default();
    c.collector.ack_wait = ack_wait;
    c.collector.batch_size = 100;
    c
}

async fn rig(server: &NatsServer, config: &Config, faults: Arc<Faults>) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let inner = fleetpipe_store::open(dir.path().join("db").to_str().unwrap())
        .await
        .unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let b = broker::ensure(&client, config).await.unwrap();
    let store: Arc<dyn Store> = Arc::new(Faulty {
        inner: inner.clone(),
        faults,
    });
    let stats = Arc::new(Stats::default());
    let collector =
        Arc::new(Collector::new(config, b.js.clone(), b.consumer, store, stats.clone()).unwrap());
    let stop = CancellationToken::new();
    let task = tokio::spawn(collector.run(2, stop.clone()));
    Rig {
        js: b.js,
        store: inner,
        stats,
        stop,
        task,
        _dir: dir,
    }
}

async fn publish(js: &jetstream::Context, messages: &[(String, String)]) {
    let mut acks = Vec::new();
    for (subject, payload) in messages {
        acks.push(
            js.publish(subject.clone(), payload.clone().into())
                .await
                .unwrap(),
        );
    }
    for a in acks {
        a.await.unwrap();
    }
}

/// `n` plain readings of device `d`, values 0..n, one per message.
fn plain(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("vehicle.d{}.speed", i % 10), i.to_string()))
        .collect()
}

async fn wait_for(what: &str, deadline: Duration, mut done: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !done().await {
        assert!(
            started.elapsed() < deadline,
            "{what}: not within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn pending(js: &jetstream::Context) -> (u64, usize) {
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_stream("FLEETPIPE_TELEMETRY")
        .await
        .unwrap()
        .get_consumer("fleetpipe-collectors")
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    (info.num_pending, info.num_ack_pending)
}

async fn dead_letters(js: &jetstream::Context) -> Vec<(String, String)> {
    fleetpipe_pipeline::inspect::dead_letters(js, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.codes.join(","), d.payload))
        .collect()
}

/// One message the store refuses among 300 good ones: it alone is dead-lettered (code
/// `store`), the rest are stored once and acknowledged; nothing stays pending.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_the_store_refuses_is_isolated_and_dead_lettered() {
    let server = NatsServer::start();
    let faults = Arc::new(Faults {
        refuse_value: Some(666.0),
        suspect_value: Some(777.0),
        ..Default::default()
    });
    let r = rig(&server, &config(Duration::from_secs(30)), faults).await;
    let mut messages = plain(300);
    messages[150].1 = "666".into();
    messages[151].1 = "777".into();
    publish(&r.js, &messages).await;
    wait_for("298 readings stored", Duration::from_secs(60), async || {
        r.store.count_readings().await.unwrap() == 298
    })
    .await;
    wait_for("nothing pending", Duration::from_secs(30), async || {
        pending(&r.js).await == (0, 0)
    })
    .await;
    let mut dead = dead_letters(&r.js).await;
    dead.sort();
    assert_eq!(
        dead,
        [
            ("store".to_string(), "666".to_string()),
            ("store".to_string(), "777".to_string())
        ]
    );
    assert_eq!(r.stats.snapshot().store_refused, 2);
    assert_eq!(r.stats.snapshot().readings_duplicate, 0);
    r.stop.cancel();
    r.task.await.unwrap();
}

/// A store outage longer than the ack wait: nothing is negatively acknowledged or
/// redelivered (keepalives hold the messages), and everything is stored once when it
/// ends. Then a commit slower than the ack wait: no redelivery either.
#[tokio::test(flavor = "multi_thread")]
async fn outages_and_slow_commits_cause_no_redelivery() {
    let server = NatsServer::start();
    let faults = Arc::new(Faults::default());
    faults.down.store(true, Ordering::Relaxed);
    let r = rig(&server, &config(Duration::from_secs(1)), faults.clone()).await;
    publish(&r.js, &plain(200)).await;
    // Three ack waits of outage.
    wait_for("write attempts", Duration::from_secs(10), async || {
        faults.writes.load(Ordering::Relaxed) >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(r.store.count_readings().await.unwrap(), 0);
    faults.down.store(false, Ordering::Relaxed);
    wait_for("200 readings stored", Duration::from_secs(30), async || {
        r.store.count_readings().await.unwrap() == 200
    })
    .await;
    wait_for("nothing pending", Duration::from_secs(30), async || {
        pending(&r.js).await == (0, 0)
    })
    .await;
    let s = r.stats.snapshot();
    assert_eq!(s.redelivered, 0, "{s:?}");
    assert_eq!(s.readings_duplicate, 0, "{s:?}");
    assert!(s.store_errors >= 2, "{s:?}");
    assert!(dead_letters(&r.js).await.is_empty());
    r.stop.cancel();
    r.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_slower_than_the_ack_wait_is_not_redelivered() {
    let server = NatsServer::start();
    let faults = Arc::new(Faults {
        slow: Some(Duration::from_millis(2500)),
        ..Default::default()
    });
    let r = rig(&server, &config(Duration::from_secs(1)), faults).await;
    publish(&r.js, &plain(50)).await;
    wait_for("50 readings stored", Duration::from_secs(30), async || {
        r.store.count_readings().await.unwrap() == 50
    })
    .await;
    wait_for("nothing pending", Duration::from_secs(30), async || {
        pending(&r.js).await == (0, 0)
    })
    .await;
    let s = r.stats.snapshot();
    assert_eq!(s.redelivered, 0, "{s:?}");
    r.stop.cancel();
    r.task.await.unwrap();
}

/// A graceful stop hands back what the broker sent but the collector did not process, so
/// the next collector gets it at once rather than after the ack wait (30 s here).
#[tokio::test(flavor = "multi_thread")]
async fn a_graceful_stop_hands_back_what_it_pulled() {
    let server = NatsServer::start();
    let cfg = config(Duration::from_secs(30));
    let faults = Arc::new(Faults {
        slow: Some(Duration::from_millis(500)),
        ..Default::default()
    });
    let r = rig(&server, &cfg, faults).await;
    publish(&r.js, &plain(3000)).await;
    wait_for("a first write", Duration::from_secs(10), async || {
        r.stats.snapshot().messages > 0
    })
    .await;
    r.stop.cancel();
    r.task.await.unwrap();
    // Acks and naks are publishes: make sure the broker has them.
    r.js.client().flush().await.unwrap();
    let stored = r.store.count_readings().await.unwrap();
    // Interest retention: the stream holds exactly what was not acknowledged (once the
    // broker has processed the acks, which it does asynchronously).
    let mut stream = r.js.get_stream("FLEETPIPE_TELEMETRY").await.unwrap();
    let mut num_pending = 0;
    wait_for("acks processed", Duration::from_secs(5), async || {
        num_pending = stream.info().await.unwrap().state.messages;
        stored + num_pending == 3000
    })
    .await;
    eprintln!("stored {stored} before stopping, handed back {num_pending}");
    let again = rig(&server, &cfg, Arc::new(Faults::default())).await;
    // The second collector has its own database: it stores exactly the rest, well within
    // the ack wait (30 s) that messages held by the stopped collector would wait out.
    wait_for("the rest stored", Duration::from_secs(10), async || {
        again.store.count_readings().await.unwrap() == num_pending
    })
    .await;
    again.stop.cancel();
    again.task.await.unwrap();
}

/// Latest-state coalescing, off (0) and with a window: batches of 10 messages, so most
/// batches share their keys with batches waiting in the same window. Every message is
/// stored and acknowledged once, nothing is redelivered, and the state holds each device's
/// newest reading. (How many puts the window saved depends on timing: printed, not
/// checked; `coalesce.rs` checks the count.)
#[tokio::test(flavor = "multi_thread")]
async fn coalesced_state_puts_still_acknowledge_every_batch() {
    for window in [Duration::ZERO, Duration::from_millis(300)] {
        let server = NatsServer::start();
        let mut cfg = config(Duration::from_secs(30));
        cfg.collector.batch_size = 10;
        cfg.collector.state_window = window;
        let r = rig(&server, &cfg, Arc::new(Faults::default())).await;
        let messages = plain(500);
        publish(&r.js, &messages).await;
        wait_for("500 readings stored", Duration::from_secs(60), async || {
            r.store.count_readings().await.unwrap() == 500
        })
        .await;
        wait_for("nothing pending", Duration::from_secs(30), async || {
            pending(&r.js).await == (0, 0)
        })
        .await;
        let state = r.js.get_key_value("fleetpipe_state").await.unwrap();
        for d in 0..10 {
            let v = state.get(format!("d{d}.speed")).await.unwrap().unwrap();
            let v: serde_json::Value = serde_json::from_slice(&v).unwrap();
            assert_eq!(v["value"], 490.0 + d as f64, "{window:?} d{d}");
        }
        let puts =
            r.js.get_stream("KV_fleetpipe_state")
                .await
                .unwrap()
                .info()
                .await
                .unwrap()
                .state
                .last_sequence;
        eprintln!("window {window:?}: {puts} state puts for 500 messages");
        let s = r.stats.snapshot();
        assert_eq!((s.redelivered, s.nats_errors), (0, 0), "{s:?}");
        r.stop.cancel();
        r.task.await.unwrap();
    }
}
