//! PostgreSQL's daily partitions of `readings`: the migration from an unpartitioned
//! database, partitions made on demand (late data, several processes at once), and
//! retention by dropping them. Against a real throwaway cluster, one per test binary while
//! tests overlap, one database per test.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fleetpipe_proto::{Reading, Timestamp};
use fleetpipe_store::{open, Point, Range, Record, Retained, Store};
use fleetpipe_testkit::PgServer;

/// 2026-02-15T10:00:00Z.
const T0: i64 = 1_771_149_600_000_000;
const SEC: i64 = 1_000_000;
const MIN: i64 = 60 * SEC;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;
/// 2026-02-15T00:00:00Z, the start of T0's day.
const D0: i64 = T0 - 10 * HOUR;

fn ts(us: i64) -> Timestamp {
    Timestamp::from_micros(us)
}

fn all_time() -> Range {
    Range {
        // PostgreSQL's earliest, 4714-11-24 BC.
        from: ts(-210_866_803_200_000_000),
        to: ts(i64::MAX),
    }
}

fn rec(device: &str, sensor: &str, seq: u64, at: i64, value: f64) -> Record {
    Record {
        seq,
        reading: Reading {
            device: device.into(),
            sensor: sensor.into(),
            value,
            ts: ts(at),
            unit: None,
            quality: None,
            tags: Default::default(),
        },
    }
}

fn point(at: i64, value: f64) -> Point {
    Point {
        ts: ts(at),
        value,
        quality: None,
    }
}

/// One cluster shared by the tests that run at the same time.
fn shared_cluster() -> Option<Arc<PgServer>> {
    static SHARED: Mutex<Weak<PgServer>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(pg) = shared.upgrade() {
        return Some(pg);
    }
    let pg = Arc::new(PgServer::start_or_skip()?);
    *shared = Arc::downgrade(&pg);
    Some(pg)
}

/// A database of its own in the shared cluster.
struct Db {
    pg: Arc<PgServer>,
    name: String,
    url: String,
}

impl Db {
    fn new(name: &str) -> Option<Db> {
        let pg = shared_cluster()?;
        let url = pg.create_database(name);
        Some(Db {
            pg,
            name: name.into(),
            url,
        })
    }

    async fn open(&self) -> Arc<dyn Store> {
        open(&self.url).await.expect("open store")
    }

    /// The rows of `sql`, one line each, fields separated by tabs.
    fn psql(&self, sql: &str) -> String {
        self.pg.psql(&self.name, sql)
    }

    /// The partitions of `readings`, by name.
    fn partitions(&self) -> Vec<String> {
        self.psql(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'readings'::regclass ORDER BY 1",
        )
        .lines()
        .map(str::to_string)
        .collect()
    }
}

/// A database left by the previous schema version (3, unpartitioned readings) keeps its
/// readings, rollups, grants and view when migration 4 partitions it.
#[tokio::test(flavor = "multi_thread")]
async fn a_v3_database_keeps_its_readings() {
    let Some(db) = Db::new("v3_to_v4") else {
        return;
    };
    let v3 = [
        include_str!("../migrations/postgres/0001_init.sql"),
        include_str!("../migrations/postgres/0002_series_tags.sql"),
        include_str!("../migrations/postgres/0003_retention.sql"),
    ]
    .join("\n");
    // Readings on three days, one of them long ago and one before year 1, a rollup, and a
    // Grafana role that may read the table and the view.
    db.psql(&format!(
        "{v3};
         CREATE TABLE schema_migrations (version integer PRIMARY KEY,
                                         applied_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO schema_migrations (version) VALUES (1), (2), (3);
         INSERT INTO series (id, device, sensor, unit) VALUES (7, 'd', 's', 'V');
         INSERT INTO readings (series_id, ts, seq, value, quality) VALUES
             (7, to_timestamp({t0} / 1e6), 1, 1.5, 'good'),
             (7, to_timestamp({t0} / 1e6), 2, 2.5, NULL),
             (7, to_timestamp({t1} / 1e6), 3, 3.5, NULL),
             (7, to_timestamp(946684799.999999), 4, 4.5, NULL),
             (7, '0044-03-15 12:00:00+00 BC', 5, 5.5, NULL);
         INSERT INTO rollups_1m VALUES
             (7, to_timestamp({t0} / 1e6), 2, 4.0, 1.5, 2.5, 2.5, to_timestamp({t0} / 1e6), 2);
         DROP ROLE IF EXISTS v3_reader;
         CREATE ROLE v3_reader;
         GRANT SELECT ON readings, readings_v TO v3_reader;",
        t0 = T0,
        t1 = T0 + DAY + HOUR,
    ));

    let store = db.open().await;
    assert_eq!(
        db.psql("SELECT max(version) FROM schema_migrations").trim(),
        "5"
    );
    // Version 5 folded the minute into its hour.
    assert_eq!(
        db.psql("SELECT count || ' ' || last || ' ' || last_seq FROM rollups_1h")
            .trim(),
        "2 2.5 2"
    );
    assert_eq!(
        db.partitions(),
        [
            "readings_p19991231",
            "readings_p20260215",
            "readings_p20260216",
            "readings_pbc00440315"
        ]
    );
    assert_eq!(store.count_readings().await.unwrap(), 5);
    let history = store.history("d", "s", all_time(), 10).await.unwrap();
    let at: Vec<i64> = history.iter().map(|p| p.ts.as_micros()).collect();
    assert_eq!(
        at,
        [
            -63_517_780_800_000_000, // 0044-03-15 12:00:00+00 BC
            946_684_799_999_999,
            T0,
            T0,
            T0 + DAY + HOUR
        ]
    );
    assert_eq!(history[2].quality.as_deref(), Some("good"));
    // The key still deduplicates, the rollups are as they were, and new writes add to them.
    let again = [
        rec("d", "s", 1, T0, 1.5),
        rec("d", "s", 3, T0 + DAY + HOUR, 3.5),
    ];
    assert_eq!(store.write_readings(&again).await.unwrap(), 0);
    assert_eq!(
        store
            .write_readings(&[rec("d", "s", 9, T0 + SEC, 9.0)])
            .await
            .unwrap(),
        1
    );
    let rollups = store.rollups("d", "s", all_time()).await.unwrap();
    assert_eq!((rollups[0].count, rollups[0].max), (3, 9.0));
    // The view reads the new table, and the role can still read both.
    assert_eq!(
        db.psql("SELECT count(*), min(unit) FROM readings_v").trim(),
        "6\tV"
    );
    assert_eq!(
        db.psql(
            "SELECT has_table_privilege('v3_reader', 'readings', 'SELECT'),
                    has_table_privilege('v3_reader', 'readings_v', 'SELECT')"
        )
        .trim(),
        "t\tt"
    );
    assert_eq!(
        db.psql("SELECT count(*) FROM pg_class WHERE relname = 'readings_unpartitioned'")
            .trim(),
        "0"
    );
}

/// A late reading for a day no partition covers yet gets one, from any number of writers
/// (here two stores, as two processes would be) at once.
#[tokio::test(flavor = "multi_thread")]
async fn late_data_creates_the_partition_of_its_day() {
    let Some(db) = Db::new("late_data") else {
        return;
    };
    let store = db.open().await;
    assert_eq!(
        store
            .write_readings(&[rec("d", "s", 1, T0, 1.0)])
            .await
            .unwrap(),
        1
    );
    assert_eq!(db.partitions(), ["readings_p20260215"]);
    // A reading from ten days before, in a batch with one of today.
    let late = [
        rec("d", "s", 2, T0 - 10 * DAY, 2.0),
        rec("d", "s", 3, T0 + 1, 3.0),
    ];
    assert_eq!(store.write_readings(&late).await.unwrap(), 2);
    assert_eq!(
        db.partitions(),
        ["readings_p20260205", "readings_p20260215"]
    );
    assert_eq!(store.write_readings(&late).await.unwrap(), 0);
    assert_eq!(
        store.history("d", "s", all_time(), 10).await.unwrap(),
        [
            point(T0 - 10 * DAY, 2.0),
            point(T0, 1.0),
            point(T0 + 1, 3.0)
        ]
    );

    // Two processes, eight writers each, every batch touching the same 30 new days.
    let other = db.open().await;
    let mut tasks = Vec::new();
    for w in 0..16u64 {
        let store = Arc::clone(if w % 2 == 0 { &store } else { &other });
        tasks.push(tokio::spawn(async move {
            let batch: Vec<Record> = (0..30u64)
                .map(|d| rec("d", "late", w * 100 + d, T0 - (40 + d as i64) * DAY, 1.0))
                .collect();
            store.write_readings(&batch).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("join").expect("write"), 30);
    }
    assert_eq!(db.partitions().len(), 32);
}

/// A prune drops the partitions wholly older than its horizon, deletes only the older
/// rows of the one it falls into, and counts what it removed exactly.
#[tokio::test(flavor = "multi_thread")]
async fn prune_drops_whole_partitions() {
    let Some(db) = Db::new("prune_drops") else {
        return;
    };
    let store = db.open().await;
    // Three days, 6,000 readings each, two a minute on 50 series... and the third day's
    // readings start at midnight, so a horizon at noon falls into it.
    let mut seq = 0;
    for day in 0..3 {
        let batch: Vec<Record> = (0..6_000i64)
            .map(|i| {
                seq += 1;
                let at = D0 + day * DAY + (i / 50) * 12 * MIN + i % 50;
                rec(&format!("dev-{}", i % 50), "v", seq, at, i as f64)
            })
            .collect();
        assert_eq!(store.write_readings(&batch).await.unwrap(), 6_000);
    }
    assert_eq!(
        db.partitions(),
        [
            "readings_p20260215",
            "readings_p20260216",
            "readings_p20260217"
        ]
    );
    let rollups_before = store.rollups("dev-7", "v", all_time()).await.unwrap();

    let before = D0 + 2 * DAY + 12 * HOUR;
    let report = store.prune(Retained::Readings, ts(before)).await.unwrap();
    // Day 3 kept its readings from noon on: 60 of the 120 per series.
    assert_eq!(report.deleted, 6_000 + 6_000 + 3_000, "{report:?}");
    // The horizon, two drops, then the straddling partition's chunks.
    assert!(report.chunks >= 4, "{report:?}");
    println!("{report:?}");
    let parts = db.partitions();
    assert!(
        !parts.contains(&"readings_p20260215".to_string()),
        "{parts:?}"
    );
    assert!(
        !parts.contains(&"readings_p20260216".to_string()),
        "{parts:?}"
    );
    assert!(
        parts.contains(&"readings_p20260217".to_string()),
        "{parts:?}"
    );
    // Dropped, not just detached.
    assert_eq!(
        db.psql("SELECT count(*) FROM pg_class WHERE relname IN ('readings_p20260215', 'readings_p20260216')")
            .trim(),
        "0"
    );
    // Today's and tomorrow's partitions are made ahead.
    let today = Timestamp::now().as_micros().div_euclid(DAY);
    for day in [today, today + 1] {
        let name = db.psql(&format!(
            "SELECT 'readings_p' || to_char(DATE '1970-01-01' + {day}, 'YYYYMMDD')"
        ));
        assert!(parts.contains(&name.trim().to_string()), "{parts:?}");
    }
    assert_eq!(store.count_readings().await.unwrap(), 3_000);
    let left = store.history("dev-7", "v", all_time(), 1000).await.unwrap();
    assert_eq!(left.len(), 60);
    assert!(left.iter().all(|p| p.ts.as_micros() >= before));
    assert_eq!(left[0].ts.as_micros(), before + 7);
    assert_eq!(
        store.rollups("dev-7", "v", all_time()).await.unwrap(),
        rollups_before
    );

    // Nothing left to do, and a redelivery of the dropped days is skipped.
    let again = store.prune(Retained::Readings, ts(before)).await.unwrap();
    assert_eq!(again.deleted, 0);
    let old = [rec("dev-7", "v", 1, D0 + 5 * MIN, 1.0)];
    assert_eq!(store.write_readings(&old).await.unwrap(), 0);

    // A prune cut short between detach and drop leaves a detached table: the next one
    // drops it.
    let later = before + DAY;
    let batch: Vec<Record> = (0..10u64)
        .map(|i| rec("dev-7", "v", 100_000 + i, before + 6 * HOUR + i as i64, 1.0))
        .collect();
    assert_eq!(store.write_readings(&batch).await.unwrap(), 10);
    db.psql("ALTER TABLE readings DETACH PARTITION readings_p20260217");
    // One of a day the horizon does not cover is not the prune's to drop.
    db.psql("CREATE TABLE readings_p20300101 (LIKE readings)");
    let report = store.prune(Retained::Readings, ts(later)).await.unwrap();
    assert_eq!(report.deleted, 3_010, "{report:?}");
    assert_eq!(
        db.psql(
            "SELECT string_agg(relname, ' ') FROM pg_class
             WHERE relname IN ('readings_p20260217', 'readings_p20300101')"
        )
        .trim(),
        "readings_p20300101"
    );
    assert_eq!(store.count_readings().await.unwrap(), 0);
}

/// A process whose partition cache still holds a day another process's prune dropped
/// writes late data for it as if it had known the horizon: skipped, not refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_prune_elsewhere_does_not_refuse_late_writes() {
    let Some(db) = Db::new("prune_elsewhere") else {
        return;
    };
    let writer = db.open().await;
    let pruner = db.open().await;
    assert_eq!(
        writer
            .write_readings(&[rec("d", "s", 1, T0, 1.0)])
            .await
            .unwrap(),
        1
    );
    let report = pruner
        .prune(Retained::Readings, ts(D0 + DAY))
        .await
        .unwrap();
    assert_eq!(report.deleted, 1);
    // The writer has not re-read the horizon yet (it does every 30 s) and thinks the
    // day's partition is there.
    let late = [
        rec("d", "s", 2, T0 + SEC, 2.0),
        rec("d", "s", 3, D0 + DAY + HOUR, 3.0),
    ];
    assert_eq!(writer.write_readings(&late).await.unwrap(), 1);
    assert_eq!(
        writer.history("d", "s", all_time(), 10).await.unwrap(),
        [point(D0 + DAY + HOUR, 3.0)]
    );
    assert_eq!(writer.raw_horizon().await.unwrap(), Some(ts(D0 + DAY)));
}

/// Not a test: how fast batches of 1,000 to 50,000 readings (1,000 devices, two sensors
/// each, series known) are written.
/// `cargo test --release -p fleetpipe-store --test postgres_scale -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn measure_write_batches() {
    let Some(db) = Db::new("measure_batches") else {
        return;
    };
    let store = db.open().await;
    let mut seq = 0u64;
    let mut round = 0i64;
    for (size, rounds) in [(1_000u64, 40), (10_000, 15), (50_000, 7)] {
        let mut batch = || -> Vec<Record> {
            round += 1;
            (0..size)
                .map(|i| {
                    seq += 1;
                    let device = format!("dev-{:04}", i % 1000);
                    let sensor = ["speed", "engine.rpm"][(i / 1000 % 2) as usize];
                    let at = T0 + round * MIN + (i / 2000) as i64 * 10_000;
                    rec(&device, sensor, seq, at, i as f64)
                })
                .collect()
        };
        // Series and partition known, as in steady state.
        store.write_readings(&batch()).await.unwrap();
        let mut times: Vec<Duration> = Vec::new();
        for _ in 0..rounds {
            let records = batch();
            let start = Instant::now();
            assert_eq!(store.write_readings(&records).await.unwrap(), size);
            times.push(start.elapsed());
        }
        times.sort();
        let median = times[times.len() / 2];
        println!(
            "postgres: batches of {size} readings: median {median:?} ({:.0} readings/s), \
             best {:?}",
            size as f64 / median.as_secs_f64(),
            times[0]
        );
    }
}
