//! One conformance suite for every [`Store`] backend.
//!
//! Each case is an async fn taking a [`Backend`]; the `conformance!` macro turns every case
//! into one test per backend: SQLite in a temporary directory, and PostgreSQL in a
//! throwaway cluster (one per test binary while tests overlap, one database per test).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fleetpipe_proto::{Reading, Timestamp};
use fleetpipe_store::{open, Point, Range, Record, Rollup, Snapshot, Store, StoreError};
use fleetpipe_testkit::PgServer;

/// 2026-02-15T10:00:00Z, on a minute boundary.
const T0: i64 = 1_771_149_600_000_000;
const SEC: i64 = 1_000_000;
const MIN: i64 = 60 * SEC;

fn ts(us: i64) -> Timestamp {
    Timestamp::from_micros(us)
}

fn range(from: i64, to: i64) -> Range {
    Range {
        from: ts(from),
        to: ts(to),
    }
}

fn all_time() -> Range {
    range(0, i64::MAX)
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
            tags: Vec::new(),
        },
    }
}

fn with_quality(mut r: Record, q: &str) -> Record {
    r.reading.quality = Some(q.into());
    r
}

fn with_unit(mut r: Record, unit: &str, tags: &[(&str, &str)]) -> Record {
    r.reading.unit = Some(unit.into());
    r.reading.tags = tags
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    r
}

fn point(at: i64, value: f64, quality: Option<&str>) -> Point {
    Point {
        ts: ts(at),
        value,
        quality: quality.map(str::to_string),
    }
}

fn snap(device: &str, at: i64, values: &[(&str, f64)]) -> Snapshot {
    Snapshot {
        device: device.into(),
        ts: ts(at),
        values: values.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    }
}

/// A backend under test: its URL (opened through [`fleetpipe_store::open`], so dispatch is
/// exercised too) and a raw-SQL side door for what the trait does not expose.
struct Backend {
    kind: &'static str,
    url: String,
    _guard: Guard,
}

enum Guard {
    Sqlite(#[allow(dead_code)] tempfile::TempDir),
    Postgres(#[allow(dead_code)] Arc<PgServer>),
}

/// One PostgreSQL cluster shared by the tests that run at the same time; it stops when
/// the last of them drops it (a static would never be dropped, leaking the server).
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

impl Backend {
    fn sqlite() -> Backend {
        let dir = tempfile::tempdir().expect("temp dir");
        // A nested path: open must create the directories.
        let url = format!("sqlite://{}/data/db/fleet.db", dir.path().display());
        Backend {
            kind: "sqlite",
            url,
            _guard: Guard::Sqlite(dir),
        }
    }

    fn postgres(test: &str) -> Option<Backend> {
        let pg = shared_cluster()?;
        let url = pg.create_database(&format!("t_{test}"));
        Some(Backend {
            kind: "postgres",
            url,
            _guard: Guard::Postgres(pg),
        })
    }

    async fn open(&self) -> Arc<dyn Store> {
        let store = open(&self.url).await.expect("open store");
        assert_eq!(store.kind(), self.kind);
        store
    }

    /// First column of the first row of `sql`, as text (`None` for NULL or no row).
    async fn sql(&self, sql: &str) -> Option<String> {
        if self.kind == "sqlite" {
            let path = self.url.trim_start_matches("sqlite://").to_string();
            let sql = sql.to_string();
            tokio::task::spawn_blocking(move || {
                use rusqlite::types::ValueRef;
                let conn = rusqlite::Connection::open(path).expect("raw sqlite");
                let mut stmt = conn.prepare(&sql).expect("prepare");
                let mut rows = stmt.query([]).expect("query");
                let row = rows.next().expect("step")?;
                match row.get_ref(0).expect("column 0") {
                    ValueRef::Null => None,
                    ValueRef::Integer(i) => Some(i.to_string()),
                    ValueRef::Real(f) => Some(f.to_string()),
                    ValueRef::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(_) => Some("<blob>".into()),
                }
            })
            .await
            .expect("raw sqlite task")
        } else {
            let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                .await
                .expect("raw postgres");
            tokio::spawn(conn);
            let messages = client.simple_query(sql).await.expect("raw query");
            messages.into_iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => {
                    Some(row.get(0).map(str::to_string))
                }
                _ => None,
            })?
        }
    }
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $case() {
                    let backend = super::Backend::sqlite();
                    super::$case(&backend).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $case() {
                    let Some(backend) = super::Backend::postgres(stringify!($case)) else {
                        return;
                    };
                    super::$case(&backend).await;
                }
            )*
        }
    };
}

conformance!(
    round_trip_is_exact,
    same_batch_twice_is_a_no_op,
    partial_overlap_counts_only_new,
    rollups_aggregate_new_readings,
    rollups_range_is_by_minute_start,
    snapshots_are_idempotent_and_filtered,
    history_range_is_half_open_and_limited,
    prune_keeps_rollups,
    reopening_applies_nothing_twice,
    newer_schema_is_refused,
    many_series_in_one_batch,
    odd_names_stay_distinct,
    unit_and_tags_follow_the_latest,
    invalid_batches_are_refused_whole,
    concurrent_overlapping_writers_count_once,
    empty_batches_are_fine,
);

async fn round_trip_is_exact(b: &Backend) {
    let store = b.open().await;
    store.ping().await.expect("ping");
    let speed = [
        with_quality(rec("4613", "speed", 1, T0, 95.0), "good"),
        rec("4613", "speed", 2, T0 + SEC, 0.1 + 0.2),
        with_quality(
            rec("4613", "speed", 3, T0 + 2 * SEC + 1, -1.0e-300),
            "uncertain",
        ),
        rec("4613", "speed", 4, T0 + 3 * SEC, f64::MAX),
        rec("4613", "speed", 5, T0 + 4 * SEC, f64::MIN_POSITIVE),
    ];
    let mut batch = speed.to_vec();
    batch.push(rec("4613", "rpm", 6, T0, 900.0));
    assert_eq!(store.write_readings(&batch).await.unwrap(), 6);

    let got = store
        .history("4613", "speed", all_time(), 100)
        .await
        .unwrap();
    let want = vec![
        point(T0, 95.0, Some("good")),
        point(T0 + SEC, 0.1 + 0.2, None),
        point(T0 + 2 * SEC + 1, -1.0e-300, Some("uncertain")),
        point(T0 + 3 * SEC, f64::MAX, None),
        point(T0 + 4 * SEC, f64::MIN_POSITIVE, None),
    ];
    assert_eq!(got, want);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(
            g.value.to_bits(),
            w.value.to_bits(),
            "bit-exact {}",
            w.value
        );
    }
    assert_eq!(
        store.history("4613", "rpm", all_time(), 100).await.unwrap(),
        vec![point(T0, 900.0, None)]
    );
    assert!(store
        .history("9999", "speed", all_time(), 100)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.count_readings().await.unwrap(), 6);
}

async fn same_batch_twice_is_a_no_op(b: &Backend) {
    let store = b.open().await;
    let batch: Vec<Record> = (0..10)
        .map(|i| rec("d1", "temp", 100 + i, T0 + i as i64 * 15 * SEC, i as f64))
        .collect();
    assert_eq!(store.write_readings(&batch).await.unwrap(), 10);
    let rollups = store.rollups("d1", "temp", all_time()).await.unwrap();
    assert_eq!(rollups.len(), 3);

    assert_eq!(store.write_readings(&batch).await.unwrap(), 0);
    assert_eq!(store.count_readings().await.unwrap(), 10);
    assert_eq!(
        store.rollups("d1", "temp", all_time()).await.unwrap(),
        rollups
    );
}

async fn partial_overlap_counts_only_new(b: &Backend) {
    let store = b.open().await;
    let r = |i: u64| rec("d1", "temp", i, T0 + i as i64 * SEC, i as f64);
    let first: Vec<Record> = (0..10).map(r).collect();
    let second: Vec<Record> = (5..15).map(r).collect();
    assert_eq!(store.write_readings(&first).await.unwrap(), 10);
    assert_eq!(store.write_readings(&second).await.unwrap(), 5);
    assert_eq!(store.count_readings().await.unwrap(), 15);
    let rollups = store.rollups("d1", "temp", all_time()).await.unwrap();
    assert_eq!(
        rollups,
        vec![Rollup {
            minute: ts(T0),
            count: 15,
            min: 0.0,
            max: 14.0,
            avg: 7.0,
            last: 14.0,
        }]
    );
}

/// One rollup case: batches of `(seq, offset from T0, value)` written in order, how many
/// of each batch are new, and the expected rollups as
/// `(minute offset, count, min, max, avg, last)`.
struct RollupCase {
    name: &'static str,
    batches: &'static [&'static [(u64, i64, f64)]],
    new: &'static [u64],
    want: &'static [(i64, u64, f64, f64, f64, f64)],
}

const ROLLUP_CASES: &[RollupCase] = &[
    RollupCase {
        name: "one batch over two minutes",
        batches: &[&[
            (1, 0, 1.0),
            (2, 30 * SEC, 3.0),
            (3, 60 * SEC, 10.0),
            (4, 90 * SEC, 20.0),
        ]],
        new: &[4],
        want: &[(0, 2, 1.0, 3.0, 2.0, 3.0), (MIN, 2, 10.0, 20.0, 15.0, 20.0)],
    },
    RollupCase {
        name: "out of order within a batch",
        batches: &[&[(3, 50 * SEC, 5.0), (1, 10 * SEC, 1.0), (2, 30 * SEC, 9.0)]],
        new: &[3],
        want: &[(0, 3, 1.0, 9.0, 5.0, 5.0)],
    },
    RollupCase {
        name: "older reading arrives in a later batch",
        batches: &[&[(10, 50 * SEC, 5.0)], &[(11, 20 * SEC, 7.0)]],
        new: &[1, 1],
        want: &[(0, 2, 5.0, 7.0, 6.0, 5.0)],
    },
    RollupCase {
        name: "newer reading arrives in a later batch",
        batches: &[&[(1, 10 * SEC, 1.0)], &[(2, 40 * SEC, 2.0)]],
        new: &[1, 1],
        want: &[(0, 2, 1.0, 2.0, 1.5, 2.0)],
    },
    RollupCase {
        name: "same ts across batches: larger seq wins even when written first",
        batches: &[&[(9, 30 * SEC, 9.0)], &[(4, 30 * SEC, 4.0)]],
        new: &[1, 1],
        want: &[(0, 2, 4.0, 9.0, 6.5, 9.0)],
    },
    RollupCase {
        name: "same ts within a batch: larger seq wins",
        batches: &[&[(4, 30 * SEC, 4.0), (9, 30 * SEC, 9.0), (6, 30 * SEC, 6.0)]],
        new: &[3],
        want: &[(0, 3, 4.0, 9.0, 19.0 / 3.0, 9.0)],
    },
    RollupCase {
        name: "duplicate within one batch counts once",
        batches: &[&[(1, 10 * SEC, 2.0), (1, 10 * SEC, 2.0)]],
        new: &[1],
        want: &[(0, 1, 2.0, 2.0, 2.0, 2.0)],
    },
    RollupCase {
        name: "minute boundary is exact",
        batches: &[&[(1, MIN - 1, 1.0), (2, MIN, 2.0)]],
        new: &[2],
        want: &[(0, 1, 1.0, 1.0, 1.0, 1.0), (MIN, 1, 2.0, 2.0, 2.0, 2.0)],
    },
    RollupCase {
        name: "negative values",
        batches: &[&[(1, 0, -5.0), (2, SEC, -1.0)]],
        new: &[2],
        want: &[(0, 2, -5.0, -1.0, -3.0, -1.0)],
    },
    RollupCase {
        name: "three batches, partly redelivered, across minutes",
        batches: &[
            &[(1, 5 * SEC, 1.0), (2, 65 * SEC, 2.0)],
            &[(2, 65 * SEC, 2.0), (3, 70 * SEC, 3.0), (4, 6 * SEC, 4.0)],
            &[(1, 5 * SEC, 1.0), (5, 119 * SEC, 0.5)],
        ],
        new: &[2, 2, 1],
        want: &[
            (0, 2, 1.0, 4.0, 2.5, 4.0),
            (MIN, 3, 0.5, 3.0, 5.5 / 3.0, 0.5),
        ],
    },
];

async fn rollups_aggregate_new_readings(b: &Backend) {
    let store = b.open().await;
    for (i, case) in ROLLUP_CASES.iter().enumerate() {
        let device = format!("case-{i}");
        for (batch, &new) in case.batches.iter().zip(case.new) {
            let records: Vec<Record> = batch
                .iter()
                .map(|&(seq, offset, value)| rec(&device, "v", seq, T0 + offset, value))
                .collect();
            assert_eq!(
                store.write_readings(&records).await.unwrap(),
                new,
                "{}: new readings",
                case.name
            );
        }
        let got = store.rollups(&device, "v", all_time()).await.unwrap();
        let want: Vec<Rollup> = case
            .want
            .iter()
            .map(|&(minute, count, min, max, avg, last)| Rollup {
                minute: ts(T0 + minute),
                count,
                min,
                max,
                avg,
                last,
            })
            .collect();
        assert_eq!(got.len(), want.len(), "{}: {got:?}", case.name);
        for (g, w) in got.iter().zip(&want) {
            assert!(
                g.minute == w.minute
                    && g.count == w.count
                    && g.min == w.min
                    && g.max == w.max
                    && g.last == w.last
                    && (g.avg - w.avg).abs() < 1e-12,
                "{}: got {g:?}, want {w:?}",
                case.name
            );
        }
    }
}

async fn rollups_range_is_by_minute_start(b: &Backend) {
    let store = b.open().await;
    let batch: Vec<Record> = (0..4)
        .map(|m| rec("d", "s", m, T0 + m as i64 * MIN + 30 * SEC, m as f64))
        .collect();
    store.write_readings(&batch).await.unwrap();
    let minutes = |rollups: Vec<Rollup>| -> Vec<i64> {
        rollups
            .iter()
            .map(|r| (r.minute.as_micros() - T0) / MIN)
            .collect()
    };
    let cases = [
        (range(T0, T0 + 4 * MIN), vec![0, 1, 2, 3]),
        (range(T0 + MIN, T0 + 3 * MIN), vec![1, 2]),
        // A range starting inside a minute excludes that minute: its start is earlier.
        (range(T0 + MIN + 1, T0 + 3 * MIN), vec![2]),
        (range(T0 + 4 * MIN, T0 + 9 * MIN), vec![]),
    ];
    for (r, want) in cases {
        let got = minutes(store.rollups("d", "s", r).await.unwrap());
        assert_eq!(got, want, "{r:?}");
    }
}

async fn snapshots_are_idempotent_and_filtered(b: &Backend) {
    let store = b.open().await;
    let rows = vec![
        snap("a", T0, &[("speed", 1.5), ("rpm", 900.0)]),
        snap("b", T0, &[("spindle.vibration.rms", 0.1 + 0.2)]),
        snap("a", T0 + SEC, &[("speed", 2.5)]),
        snap("a", T0 + 2 * SEC, &[]),
    ];
    assert_eq!(store.write_snapshots(&rows).await.unwrap(), 4);
    assert_eq!(store.write_snapshots(&rows).await.unwrap(), 0);
    // Same (device, ts), other values: still a no-op, the first write stands.
    let again = [snap("a", T0, &[("speed", 99.0)])];
    assert_eq!(store.write_snapshots(&again).await.unwrap(), 0);

    let cases: Vec<(Option<&str>, Range, usize, Vec<&Snapshot>)> = vec![
        (
            Some("a"),
            all_time(),
            100,
            vec![&rows[0], &rows[2], &rows[3]],
        ),
        (
            None,
            all_time(),
            100,
            vec![&rows[0], &rows[1], &rows[2], &rows[3]],
        ),
        (None, all_time(), 2, vec![&rows[0], &rows[1]]),
        (
            Some("a"),
            range(T0 + SEC, T0 + 2 * SEC),
            100,
            vec![&rows[2]],
        ),
        (None, range(T0, T0 + SEC), 100, vec![&rows[0], &rows[1]]),
        (Some("b"), range(T0 + 1, i64::MAX), 100, vec![]),
        (Some("zzz"), all_time(), 100, vec![]),
        (Some("a"), all_time(), 0, vec![]),
    ];
    for (device, r, limit, want) in cases {
        let got = store.snapshots(device, r, limit).await.unwrap();
        let want: Vec<Snapshot> = want.into_iter().cloned().collect();
        assert_eq!(got, want, "device {device:?}, {r:?}, limit {limit}");
    }
}

async fn history_range_is_half_open_and_limited(b: &Backend) {
    let store = b.open().await;
    let batch: Vec<Record> = (0..10)
        .map(|k| rec("d", "s", k, T0 + k as i64 * SEC, k as f64))
        .collect();
    store.write_readings(&batch).await.unwrap();
    // (from, to) in seconds after T0, limit, the seconds expected.
    let cases: &[(i64, i64, usize, &[i64])] = &[
        (0, 10, 100, &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
        (2, 5, 100, &[2, 3, 4]),
        (5, 5, 100, &[]),
        (0, 10, 3, &[0, 1, 2]),
        (3, 10, 0, &[]),
        (9, 100, 100, &[9]),
        (-100, 0, 100, &[]),
    ];
    for &(from, to, limit, want) in cases {
        let got: Vec<i64> = store
            .history("d", "s", range(T0 + from * SEC, T0 + to * SEC), limit)
            .await
            .unwrap()
            .iter()
            .map(|p| (p.ts.as_micros() - T0) / SEC)
            .collect();
        assert_eq!(got, want, "[{from}, {to}) limit {limit}");
    }
}

async fn prune_keeps_rollups(b: &Backend) {
    let store = b.open().await;
    let batch: Vec<Record> = (0..6)
        .map(|k| rec("d", "s", k, T0 + k as i64 * 30 * SEC, k as f64))
        .collect();
    store.write_readings(&batch).await.unwrap();
    let rollups = store.rollups("d", "s", all_time()).await.unwrap();
    assert_eq!(rollups.len(), 3);

    assert_eq!(store.prune_readings(ts(T0 + 2 * MIN)).await.unwrap(), 4);
    assert_eq!(store.count_readings().await.unwrap(), 2);
    let left: Vec<i64> = store
        .history("d", "s", all_time(), 100)
        .await
        .unwrap()
        .iter()
        .map(|p| p.ts.as_micros())
        .collect();
    assert_eq!(left, vec![T0 + 2 * MIN, T0 + 2 * MIN + 30 * SEC]);
    assert_eq!(store.rollups("d", "s", all_time()).await.unwrap(), rollups);
    assert_eq!(store.prune_readings(ts(T0 + 2 * MIN)).await.unwrap(), 0);
}

async fn reopening_applies_nothing_twice(b: &Backend) {
    // Two processes starting together on a fresh database.
    let (first, second) = tokio::join!(open(&b.url), open(&b.url));
    let (first, second) = (first.unwrap(), second.unwrap());
    first
        .write_readings(&[rec("d", "s", 1, T0, 1.0)])
        .await
        .unwrap();
    drop((first, second));
    let again = b.open().await;
    assert_eq!(again.count_readings().await.unwrap(), 1);
    assert_eq!(
        b.sql("SELECT count(*) FROM schema_migrations").await,
        Some("1".into())
    );
}

async fn newer_schema_is_refused(b: &Backend) {
    drop(b.open().await);
    b.sql("INSERT INTO schema_migrations (version, applied_at) VALUES (999, CURRENT_TIMESTAMP)")
        .await;
    let err = match open(&b.url).await {
        Ok(_) => panic!("a database from a newer fleetpipe must be refused"),
        Err(e) => e,
    };
    assert!(
        matches!(err, StoreError::Migration { version: 999, .. }),
        "{err}"
    );
    assert!(!err.is_transient());
    assert!(err.to_string().contains("newer"), "{err}");
}

async fn many_series_in_one_batch(b: &Backend) {
    let store = b.open().await;
    let batch = |seq0: u64, devices: std::ops::Range<u32>| -> Vec<Record> {
        let mut out = Vec::new();
        let mut seq = seq0;
        for d in devices {
            for k in 0..5 {
                seq += 1;
                let sensor = if k % 2 == 0 { "speed" } else { "engine.rpm" };
                out.push(rec(
                    &format!("dev-{d:04}"),
                    sensor,
                    seq,
                    T0 + k * SEC,
                    k as f64,
                ));
            }
        }
        out
    };
    let first = batch(0, 0..1000);
    assert_eq!(first.len(), 5000);
    assert_eq!(store.write_readings(&first).await.unwrap(), 5000);
    assert_eq!(store.write_readings(&first).await.unwrap(), 0);
    // Half known series, half new ones, in one batch.
    let second = batch(10_000, 500..1500);
    assert_eq!(store.write_readings(&second).await.unwrap(), 5000);
    assert_eq!(store.count_readings().await.unwrap(), 10_000);
    assert_eq!(
        b.sql("SELECT count(*) FROM series").await,
        Some("3000".into())
    );
    let speed = store
        .history("dev-0999", "speed", all_time(), 100)
        .await
        .unwrap();
    assert_eq!(speed.len(), 6, "dev-0999 is in both batches: {speed:?}");
    let rpm = store
        .rollups("dev-1499", "engine.rpm", all_time())
        .await
        .unwrap();
    assert_eq!(rpm.len(), 1);
    assert_eq!((rpm[0].count, rpm[0].last), (2, 3.0));
}

async fn odd_names_stay_distinct(b: &Backend) {
    let store = b.open().await;
    let sensors = [
        "spindle.vibration.rms",
        "spindle.vibration",
        "spindle",
        "a.b.c.d.e.f",
        "x-y_z.1",
        "o'brien",
        "100%",
        "_",
        "semi;colon",
        "back\\slash",
    ];
    let batch: Vec<Record> = sensors
        .iter()
        .enumerate()
        .map(|(i, s)| rec("cnc-001", s, i as u64, T0, i as f64))
        .collect();
    assert_eq!(
        store.write_readings(&batch).await.unwrap(),
        sensors.len() as u64
    );
    for (i, s) in sensors.iter().enumerate() {
        let got = store.history("cnc-001", s, all_time(), 10).await.unwrap();
        assert_eq!(got, vec![point(T0, i as f64, None)], "sensor {s:?}");
        let rollups = store.rollups("cnc-001", s, all_time()).await.unwrap();
        assert_eq!(rollups.len(), 1, "sensor {s:?}");
    }
    // No pattern matching anywhere: `%` and `_` are plain characters.
    assert!(store
        .history("cnc-001", "spindle.%", all_time(), 10)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .history("cnc-00_", "spindle", all_time(), 10)
        .await
        .unwrap()
        .is_empty());
}

async fn unit_and_tags_follow_the_latest(b: &Backend) {
    let store = b.open().await;
    let unit = || b.sql("SELECT unit FROM series WHERE device = 'd' AND sensor = 's'");
    let tags = || async {
        let text = b
            .sql("SELECT tags FROM series WHERE device = 'd' AND sensor = 's'")
            .await
            .expect("tags");
        serde_json::from_str::<BTreeMap<String, String>>(&text).expect("tags are an object")
    };
    let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };

    let first = with_unit(
        rec("d", "s", 1, T0, 1.0),
        "mm/s",
        &[("site", "a"), ("line", "3")],
    );
    store.write_readings(&[first]).await.unwrap();
    assert_eq!(unit().await, Some("mm/s".into()));
    assert_eq!(tags().await, map(&[("line", "3"), ("site", "a")]));

    // A reading without unit or tags (a plain payload) leaves them alone.
    store
        .write_readings(&[rec("d", "s", 2, T0 + SEC, 2.0)])
        .await
        .unwrap();
    assert_eq!(unit().await, Some("mm/s".into()));
    assert_eq!(tags().await, map(&[("line", "3"), ("site", "a")]));

    // Tags in another order are the same tags; a new unit replaces the old one.
    let changed = with_unit(
        rec("d", "s", 3, T0 + 2 * SEC, 3.0),
        "in/s",
        &[("line", "3"), ("site", "a")],
    );
    store.write_readings(&[changed]).await.unwrap();
    assert_eq!(unit().await, Some("in/s".into()));
    assert_eq!(tags().await, map(&[("line", "3"), ("site", "a")]));

    // Another store on the same database (a fresh cache) sees and updates the same row.
    let other = b.open().await;
    let moved = with_unit(
        rec("d", "s", 4, T0 + 3 * SEC, 4.0),
        "in/s",
        &[("site", "b")],
    );
    other.write_readings(&[moved]).await.unwrap();
    assert_eq!(tags().await, map(&[("site", "b")]));
    assert_eq!(b.sql("SELECT count(*) FROM series").await, Some("1".into()));
    assert_eq!(other.count_readings().await.unwrap(), 4);
}

async fn invalid_batches_are_refused_whole(b: &Backend) {
    let store = b.open().await;
    let good = rec("d", "s", 1, T0, 1.0);
    let bad: Vec<(&str, Record)> = vec![
        ("NaN", rec("d", "s", 2, T0 + SEC, f64::NAN)),
        ("infinity", rec("d", "s", 2, T0 + SEC, f64::INFINITY)),
        ("seq beyond i64", rec("d", "s", u64::MAX, T0 + SEC, 1.0)),
        ("ts before 4713 BC", rec("d", "s", 2, i64::MIN, 1.0)),
    ];
    for (name, r) in bad {
        let err = store
            .write_readings(&[good.clone(), r])
            .await
            .expect_err(name);
        assert!(matches!(err, StoreError::Invalid(_)), "{name}: {err}");
        assert!(!err.is_transient(), "{name}");
    }
    assert_eq!(store.count_readings().await.unwrap(), 0);
    let err = store
        .write_snapshots(&[snap("d", T0, &[("s", f64::NAN)])])
        .await
        .expect_err("NaN snapshot");
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
}

async fn concurrent_overlapping_writers_count_once(b: &Backend) {
    let store = b.open().await;
    let batch: Vec<Record> = (0..600u64)
        .map(|i| {
            rec(
                &format!("dev-{}", i % 20),
                ["a", "b", "c"][(i % 3) as usize],
                i,
                T0 + (i as i64 % 7) * 20 * SEC,
                i as f64,
            )
        })
        .collect();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let store = Arc::clone(&store);
        let mut mine = batch.clone();
        if w % 2 == 1 {
            mine.reverse();
        }
        // Each writer sends a different overlapping two thirds of the batch.
        let skip = w * 25;
        let mine: Vec<Record> = mine.into_iter().skip(skip).take(400).collect();
        tasks.push(tokio::spawn(
            async move { store.write_readings(&mine).await },
        ));
    }
    let mut new = 0;
    for t in tasks {
        new += t.await.expect("join").expect("write");
    }
    // Each reading written by anyone was counted exactly once.
    let total = store.count_readings().await.unwrap();
    assert_eq!(new, total);
    let mut rolled = 0;
    for d in 0..20 {
        for s in ["a", "b", "c"] {
            for r in store
                .rollups(&format!("dev-{d}"), s, all_time())
                .await
                .unwrap()
            {
                rolled += r.count;
            }
        }
    }
    assert_eq!(rolled, total);
}

async fn empty_batches_are_fine(b: &Backend) {
    let store = b.open().await;
    assert_eq!(store.write_readings(&[]).await.unwrap(), 0);
    assert_eq!(store.write_snapshots(&[]).await.unwrap(), 0);
    assert!(store
        .snapshots(None, all_time(), 10)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .rollups("d", "s", all_time())
        .await
        .unwrap()
        .is_empty());
}

// Backend-specific checks.

#[tokio::test(flavor = "multi_thread")]
async fn open_dispatches_on_the_url() {
    for url in ["", "sqlite://"] {
        let err = open(url).await.err().expect("no path is an error");
        assert!(matches!(err, StoreError::Url { .. }), "{url:?}: {err}");
        assert!(!err.is_transient());
    }
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.db");
    let store = open(plain.to_str().unwrap()).await.unwrap();
    assert_eq!(store.kind(), "sqlite");
    let prefixed = format!("sqlite://{}", dir.path().join("x/prefixed.db").display());
    assert_eq!(open(&prefixed).await.unwrap().kind(), "sqlite");
    let memory = open("sqlite://:memory:").await.unwrap();
    memory
        .write_readings(&[rec("d", "s", 1, T0, 1.0)])
        .await
        .unwrap();
    assert_eq!(
        memory.history("d", "s", all_time(), 1).await.unwrap().len(),
        1
    );

    let err = open("postgresql://u:secret@127.0.0.1:notaport/db")
        .await
        .err()
        .expect("bad port");
    assert!(matches!(err, StoreError::Url { .. }), "{err}");
    assert!(!err.to_string().contains("secret"), "{err}");
    // Nothing listens on port 1: a connection error, worth retrying.
    let err = open("postgres://postgres@127.0.0.1:1/db")
        .await
        .err()
        .expect("nothing listens on port 1");
    assert!(err.is_transient(), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_stores_real_timestamps_and_a_readable_view() {
    let Some(b) = Backend::postgres("view") else {
        return;
    };
    let store = b.open().await;
    let r = with_unit(
        with_quality(
            rec("4613", "speed", 7, T0 + 90 * SEC + 250_000, 95.5),
            "good",
        ),
        "km/h",
        &[],
    );
    store.write_readings(&[r]).await.unwrap();
    assert_eq!(
        b.sql(
            "SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') \
             || ' ' || device || ' ' || sensor || ' ' || value || ' ' || unit || ' ' || quality \
             FROM readings_v"
        )
        .await,
        Some("2026-02-15 10:01:30.250000 4613 speed 95.5 km/h good".into())
    );
    assert_eq!(
        b.sql("SELECT to_char(minute AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') FROM rollups_1m")
            .await,
        Some("2026-02-15 10:01:00".into())
    );
}

/// Not a test: how long one 10,000-reading batch across 1,000 devices takes to write.
/// `cargo test -p fleetpipe-store --test conformance -- --ignored --nocapture measure`
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn measure_write_10k_readings() {
    let mut backends = vec![Backend::sqlite()];
    backends.extend(Backend::postgres("measure"));
    for b in &backends {
        let store = b.open().await;
        let batch = |round: u64| -> Vec<Record> {
            (0..10_000u64)
                .map(|i| {
                    let device = format!("dev-{:04}", i % 1000);
                    let sensor = ["speed", "engine.rpm"][(i / 1000 % 2) as usize];
                    let at = T0 + round as i64 * MIN + (i / 2000) as i64 * SEC;
                    rec(&device, sensor, round * 10_000 + i, at, i as f64)
                })
                .collect()
        };
        let mut times = Vec::new();
        for round in 0..11 {
            let records = batch(round);
            let start = Instant::now();
            assert_eq!(store.write_readings(&records).await.unwrap(), 10_000);
            times.push(start.elapsed());
        }
        let cold = times.remove(0);
        times.sort();
        let median: Duration = times[times.len() / 2];
        println!(
            "{}: 10,000 readings / 1,000 devices: first batch (creates 2,000 series) {:?}, \
             then median {:?} ({:.0} readings/s)",
            b.kind,
            cold,
            median,
            10_000.0 / median.as_secs_f64()
        );
    }
}
