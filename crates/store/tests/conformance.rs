//! One conformance suite for every [`Store`] backend.
//!
//! Each case is an async fn taking a [`Backend`]; the `conformance!` macro turns every case
//! into one test per backend: SQLite in a temporary directory, and PostgreSQL in a
//! throwaway cluster (one per test binary while tests overlap, one database per test).

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fleetpipe_proto::{Reading, Timestamp};
use fleetpipe_store::{
    open, Point, Range, Record, Resolution, Rollup, SeriesKey, Snapshot, Store, StoreError,
};
use fleetpipe_testkit::PgServer;

/// 2026-02-15T10:00:00Z, on a minute boundary.
const T0: i64 = 1_771_149_600_000_000;
const SEC: i64 = 1_000_000;
const MIN: i64 = 60 * SEC;
const HOUR: i64 = 60 * MIN;

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
            tags: Default::default(),
        },
    }
}

fn with_quality(mut r: Record, q: &str) -> Record {
    r.reading.quality = Some(q.into());
    r
}

fn with_unit(mut r: Record, unit: &str, tags: &[(&str, &str)]) -> Record {
    r.reading.unit = Some(unit.into());
    with_tags(r, tags)
}

fn with_tags(mut r: Record, tags: &[(&str, &str)]) -> Record {
    r.reading.tags = tags
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    r
}

fn tag_vec(tags: &[(&str, &str)]) -> Vec<(String, String)> {
    tags.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
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

    /// Runs statements (several, `;`-separated) for their effect.
    async fn exec(&self, sql: &str) {
        if self.kind == "sqlite" {
            let path = self.url.trim_start_matches("sqlite://").to_string();
            if let Some(dir) = std::path::Path::new(&path).parent() {
                std::fs::create_dir_all(dir).expect("create dir");
            }
            let sql = sql.to_string();
            tokio::task::spawn_blocking(move || {
                let conn = rusqlite::Connection::open(path).expect("raw sqlite");
                conn.execute_batch(&sql).expect("exec");
            })
            .await
            .expect("raw sqlite task")
        } else {
            let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                .await
                .expect("raw postgres");
            tokio::spawn(conn);
            client.batch_execute(sql).await.expect("exec");
        }
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
    unit_follows_the_latest_and_tags_tell_series_apart,
    readings_differing_only_in_a_tag_are_all_stored,
    a_v1_database_keeps_its_data,
    invalid_batches_are_refused_whole,
    refusals_by_the_database_are_permanent,
    concurrent_overlapping_writers_count_once,
    empty_batches_are_fine,
    redelivery_after_prune_counts_once,
    prune_is_chunked,
    staged_and_compacted_data_read_as_one,
    a_replayed_day_lands_in_order,
    any_interleaving_matches_a_model,
    the_last_instant_is_stored_once_and_readable,
    pruning_rollups_drops_whole_hours,
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
            start: ts(T0),
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
    // Each case twice: as written, and compacted after every batch (the embedded store
    // then finds earlier readings in chunks, and folds rollups when it seals).
    for (i, case) in ROLLUP_CASES
        .iter()
        .enumerate()
        .flat_map(|(i, c)| [(i, c), (i + 100, c)])
    {
        let compact = i >= 100;
        let device = format!("case-{i}");
        for (batch, &new) in case.batches.iter().zip(case.new) {
            let records: Vec<Record> = batch
                .iter()
                .map(|&(seq, offset, value)| rec(&device, "v", seq, T0 + offset, value))
                .collect();
            assert_eq!(
                store.write_readings(&records).await.unwrap(),
                new,
                "{} (compacted: {compact}): new readings",
                case.name
            );
            if compact {
                store.compact().await.unwrap();
            }
        }
        let got = store.rollups(&device, "v", all_time()).await.unwrap();
        let want: Vec<Rollup> = case
            .want
            .iter()
            .map(|&(minute, count, min, max, avg, last)| Rollup {
                start: ts(T0 + minute),
                count,
                min,
                max,
                avg,
                last,
            })
            .collect();
        assert_eq!(got.len(), want.len(), "{} ({compact}): {got:?}", case.name);
        for (g, w) in got.iter().zip(&want) {
            assert!(
                g.start == w.start
                    && g.count == w.count
                    && g.min == w.min
                    && g.max == w.max
                    && g.last == w.last
                    && (g.avg - w.avg).abs() < 1e-12,
                "{} (compacted: {compact}): got {g:?}, want {w:?}",
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
            .map(|r| (r.start.as_micros() - T0) / MIN)
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
    // Each version once.
    assert_eq!(
        b.sql("SELECT count(*) FROM schema_migrations").await,
        b.sql("SELECT max(version) FROM schema_migrations").await,
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

async fn unit_follows_the_latest_and_tags_tell_series_apart(b: &Backend) {
    let store = b.open().await;
    let unit = || b.sql("SELECT unit FROM series WHERE device = 'd' AND sensor = 's'");
    let a3 = [("site", "a"), ("line", "3")];
    let first = with_unit(rec("d", "s", 1, T0, 1.0), "mm/s", &a3);
    store.write_readings(&[first]).await.unwrap();
    assert_eq!(unit().await, Some("mm/s".into()));

    // A reading without a unit (a plain payload) leaves it alone.
    let plain = with_tags(rec("d", "s", 2, T0 + SEC, 2.0), &a3);
    assert_eq!(store.write_readings(&[plain]).await.unwrap(), 1);
    assert_eq!(unit().await, Some("mm/s".into()));

    // Tags in another order are the same tags, so the same series; a new unit replaces
    // the old one.
    let changed = with_unit(
        rec("d", "s", 3, T0 + 2 * SEC, 3.0),
        "in/s",
        &[("line", "3"), ("site", "a")],
    );
    store.write_readings(&[changed]).await.unwrap();
    assert_eq!(unit().await, Some("in/s".into()));
    assert_eq!(b.sql("SELECT count(*) FROM series").await, Some("1".into()));

    // Another store on the same database (a fresh cache) finds the same series.
    let other = b.open().await;
    let again = with_tags(
        rec("d", "s", 4, T0 + 3 * SEC, 4.0),
        &[("site", "a"), ("line", "3")],
    );
    assert_eq!(other.write_readings(&[again]).await.unwrap(), 1);
    assert_eq!(b.sql("SELECT count(*) FROM series").await, Some("1".into()));

    // One tag value differs: another series, even with the same time and sequence.
    let line4 = with_tags(
        rec("d", "s", 4, T0 + 3 * SEC, 5.0),
        &[("site", "a"), ("line", "4")],
    );
    assert_eq!(other.write_readings(&[line4]).await.unwrap(), 1);
    assert_eq!(b.sql("SELECT count(*) FROM series").await, Some("2".into()));
    let a3_tags = tag_vec(&a3);
    let key = SeriesKey::new("d", "s").with_tags(&a3_tags);
    let values: Vec<f64> = store
        .series_history(&key, all_time(), 100)
        .await
        .unwrap()
        .iter()
        .map(|p| p.value)
        .collect();
    assert_eq!(values, [1.0, 2.0, 3.0, 4.0]);
    let line4_tags = tag_vec(&[("line", "4"), ("site", "a")]);
    let key4 = SeriesKey::new("d", "s").with_tags(&line4_tags);
    assert_eq!(
        store.series_history(&key4, all_time(), 100).await.unwrap(),
        [point(T0 + 3 * SEC, 5.0, None)]
    );
    assert_eq!(
        store.series_rollups(&key4, all_time()).await.unwrap()[0].count,
        1
    );
    // Naming the sensor alone is ambiguous now, and says why.
    let err = store.history("d", "s", all_time(), 10).await.unwrap_err();
    assert!(!err.is_transient());
    assert!(err.to_string().contains("2 series"), "{err}");
    let listed = store.series("d", Some("s")).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(&listed[0].tags[..], &a3_tags_sorted()[..]);
    assert_eq!(listed[0].unit.as_deref(), Some("in/s"));
    assert!(store.series("d", Some("x")).await.unwrap().is_empty());
    assert_eq!(store.series("d", None).await.unwrap().len(), 2);
}

fn a3_tags_sorted() -> Vec<(String, String)> {
    tag_vec(&[("line", "3"), ("site", "a")])
}

/// Telegraf's case: one message (one sequence), one timestamp, lines that differ only in
/// a tag. Every reading is its own series; none is a "duplicate".
async fn readings_differing_only_in_a_tag_are_all_stored(b: &Backend) {
    let store = b.open().await;
    let mut batch = Vec::new();
    for cpu in ["cpu0", "cpu1", "cpu2", "cpu3"] {
        for (field, v) in [("usage_idle", 90.5), ("usage_user", 0.25)] {
            batch.push(with_tags(
                rec("h1", &format!("cpu.{field}"), 7, T0, v),
                &[("cpu", cpu), ("host", "h1")],
            ));
        }
    }
    batch.push(with_tags(
        rec("h1", "mem.used_percent", 7, T0, 42.5),
        &[("host", "h1")],
    ));
    assert_eq!(store.write_readings(&batch).await.unwrap(), 9);
    assert_eq!(store.count_readings().await.unwrap(), 9);
    // Redelivered: nothing new.
    assert_eq!(store.write_readings(&batch).await.unwrap(), 0);
    assert_eq!(store.series("h1", None).await.unwrap().len(), 9);
    let cpu2 = tag_vec(&[("host", "h1"), ("cpu", "cpu2")]);
    let key = SeriesKey::new("h1", "cpu.usage_user").with_tags(&cpu2);
    assert_eq!(
        store.series_history(&key, all_time(), 10).await.unwrap(),
        [point(T0, 0.25, None)]
    );
}

/// A database written by the version before tags identified series keeps its data.
async fn a_v1_database_keeps_its_data(b: &Backend) {
    let (init, tags) = if b.kind == "sqlite" {
        (
            include_str!("../migrations/sqlite/0001_init.sql"),
            r#"'{"site":"a"}'"#,
        )
    } else {
        (
            include_str!("../migrations/postgres/0001_init.sql"),
            r#"'{"site":"a"}'::jsonb"#,
        )
    };
    let (ts0, applied_at, now) = if b.kind == "sqlite" {
        (T0.to_string(), "TEXT NOT NULL", "'2026-01-01T00:00:00Z'")
    } else {
        (
            format!("to_timestamp({T0} / 1e6)"),
            "timestamptz NOT NULL DEFAULT now()",
            "now()",
        )
    };
    b.exec(&format!(
        "{init};
         CREATE TABLE schema_migrations (version integer PRIMARY KEY, applied_at {applied_at});
         INSERT INTO schema_migrations (version, applied_at) VALUES (1, {now});
         INSERT INTO series (id, device, sensor, unit, tags) VALUES (7, 'd', 's', 'V', {tags});
         INSERT INTO readings (series_id, ts, seq, value) VALUES (7, {ts0}, 1, 1.5);
         INSERT INTO rollups_1m (series_id, minute, count, sum, min, max, last, last_ts, last_seq)
             VALUES (7, {ts0}, 1, 1.5, 1.5, 1.5, 1.5, {ts0}, 1);
         INSERT INTO snapshots (device, ts, \"values\") VALUES ('d', {ts0}, '{{\"s\":1.5}}');"
    ))
    .await;
    let store = b.open().await;
    let site_a = tag_vec(&[("site", "a")]);
    let key = SeriesKey::new("d", "s").with_tags(&site_a);
    assert_eq!(
        store.series_history(&key, all_time(), 10).await.unwrap(),
        [point(T0, 1.5, None)]
    );
    // Its snapshot is still there, by device and by time.
    let snapshot = snap("d", T0, &[("s", 1.5)]);
    assert_eq!(
        store.snapshots(Some("d"), all_time(), 10).await.unwrap(),
        std::slice::from_ref(&snapshot)
    );
    assert_eq!(
        store.snapshots(None, all_time(), 10).await.unwrap(),
        [snapshot]
    );
    // Its minutes were folded into hours.
    let one = Rollup {
        start: ts(T0),
        count: 1,
        min: 1.5,
        max: 1.5,
        avg: 1.5,
        last: 1.5,
    };
    for resolution in [Resolution::Minute, Resolution::Hour] {
        assert_eq!(
            store
                .series_rollups_at(&key, all_time(), resolution)
                .await
                .unwrap(),
            std::slice::from_ref(&one)
        );
    }
    // Its readings still deduplicate, and another tag value is another series now.
    let same = with_tags(rec("d", "s", 1, T0, 1.5), &[("site", "a")]);
    assert_eq!(store.write_readings(&[same]).await.unwrap(), 0);
    let site_b = with_tags(rec("d", "s", 1, T0, 2.5), &[("site", "b")]);
    assert_eq!(store.write_readings(&[site_b]).await.unwrap(), 1);
    assert_eq!(b.sql("SELECT count(*) FROM series").await, Some("2".into()));
}

async fn invalid_batches_are_refused_whole(b: &Backend) {
    let store = b.open().await;
    let good = rec("d", "s", 1, T0, 1.0);
    let bad: Vec<(&str, Record)> = vec![
        ("NaN", rec("d", "s", 2, T0 + SEC, f64::NAN)),
        ("infinity", rec("d", "s", 2, T0 + SEC, f64::INFINITY)),
        ("seq beyond i64", rec("d", "s", u64::MAX, T0 + SEC, 1.0)),
        ("ts before 4713 BC", rec("d", "s", 2, i64::MIN, 1.0)),
        (
            "NUL in a unit",
            with_unit(rec("d", "s", 2, T0, 1.0), "m\0s", &[]),
        ),
        (
            "NUL in a tag",
            with_tags(rec("d", "s", 2, T0, 1.0), &[("k", "a\0b")]),
        ),
        (
            "NUL in a quality",
            with_quality(rec("d", "s", 2, T0, 1.0), "\0"),
        ),
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

/// What the database itself refuses (here a constraint an operator added) is a permanent
/// error, which the collectors isolate and dead-letter; the store keeps working.
async fn refusals_by_the_database_are_permanent(b: &Backend) {
    let store = b.open().await;
    if b.kind == "sqlite" {
        // The embedded store keeps values inside encoded chunks, out of a trigger's
        // sight; an operator's trigger on series rows refuses the same way.
        b.exec(
            "CREATE TRIGGER refuse_666 BEFORE INSERT ON series WHEN NEW.sensor = 's666'
             BEGIN SELECT RAISE(ABORT, 'refuse_666: sensor s666 refused'); END;",
        )
        .await;
    } else {
        b.exec("ALTER TABLE readings ADD CONSTRAINT refuse_666 CHECK (value <> 666)")
            .await;
    }
    let refused = if b.kind == "sqlite" {
        rec("d", "s666", 2, T0, 666.0)
    } else {
        rec("d", "s", 2, T0, 666.0)
    };
    let err = store
        .write_readings(&[rec("d", "s", 1, T0, 1.0), refused])
        .await
        .expect_err("refused by the database");
    assert!(!err.is_transient(), "{err:?}");
    // The reason names what refused it (a dead letter carries this text).
    assert!(err.to_string().contains("refuse_666"), "{err}");
    assert_eq!(store.count_readings().await.unwrap(), 0);
    assert_eq!(
        store
            .write_readings(&[rec("d", "s", 1, T0, 1.0)])
            .await
            .unwrap(),
        1
    );
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

async fn redelivery_after_prune_counts_once(b: &Backend) {
    use fleetpipe_store::Retained;
    let store = b.open().await;
    assert_eq!(store.raw_horizon().await.unwrap(), None);
    // Two minutes, a reading every 10 s; the first minute is pruned.
    let batch: Vec<Record> = (0..12u64)
        .map(|k| rec("d", "s", k + 1, T0 + k as i64 * 10 * SEC, k as f64))
        .collect();
    assert_eq!(store.write_readings(&batch).await.unwrap(), 12);
    let counts = |rollups: Vec<Rollup>| -> Vec<u64> { rollups.iter().map(|r| r.count).collect() };
    let rollups = store.rollups("d", "s", all_time()).await.unwrap();
    assert_eq!(counts(rollups.clone()), vec![6, 6]);

    let report = store.prune(Retained::Readings, ts(T0 + MIN)).await.unwrap();
    assert_eq!(report.deleted, 6);
    assert_eq!(store.raw_horizon().await.unwrap(), Some(ts(T0 + MIN)));
    // The same records again (a redelivery): the pruned half is skipped, the rest known.
    assert_eq!(store.write_readings(&batch).await.unwrap(), 0);
    assert_eq!(store.count_readings().await.unwrap(), 6);
    assert_eq!(store.rollups("d", "s", all_time()).await.unwrap(), rollups);

    // A new reading older than the horizon is not stored either; a newer one is.
    let late = [
        rec("d", "s", 100, T0 + 5 * SEC, 1.0),
        rec("d", "s", 101, T0 + MIN + 5 * SEC, 2.0),
    ];
    assert_eq!(store.write_readings(&late).await.unwrap(), 1);
    assert_eq!(
        counts(store.rollups("d", "s", all_time()).await.unwrap()),
        vec![6, 7]
    );

    // Another process on the same database knows the horizon from the start.
    let other = b.open().await;
    assert_eq!(other.write_readings(&batch).await.unwrap(), 0);
    assert_eq!(other.raw_horizon().await.unwrap(), Some(ts(T0 + MIN)));
    assert_eq!(
        counts(other.rollups("d", "s", all_time()).await.unwrap()),
        vec![6, 7]
    );

    // The horizon never moves back; pruning other tables leaves it alone.
    store.prune(Retained::Readings, ts(T0)).await.unwrap();
    store
        .prune(Retained::Rollups, ts(T0 + 2 * MIN))
        .await
        .unwrap();
    assert_eq!(store.raw_horizon().await.unwrap(), Some(ts(T0 + MIN)));
}

/// Prunes 200,000 readings (and rollups and snapshots) in chunks, and prints how long the
/// longest chunk held the writer: a figure to read, not a test of speed.
async fn prune_is_chunked(b: &Backend) {
    use fleetpipe_store::{Retained, PRUNE_CHUNK};
    const SERIES: u64 = 100;
    // 2,000 readings a second apart per series before the cutoff, one after.
    const OLD: u64 = 2_000;
    let store = b.open().await;
    let mut seq = 0;
    for first in (0..SERIES).step_by(10) {
        let mut batch = Vec::new();
        for series in first..first + 10 {
            for k in 0..=OLD {
                seq += 1;
                let device = format!("dev-{series:03}");
                batch.push(rec(&device, "v", seq, T0 + k as i64 * SEC, k as f64));
            }
        }
        assert_eq!(
            store.write_readings(&batch).await.unwrap(),
            batch.len() as u64
        );
    }
    let cutoff = T0 + OLD as i64 * SEC;
    let report = store.prune(Retained::Readings, ts(cutoff)).await.unwrap();
    println!(
        "{}: pruned {} readings in {} transactions; longest pause {:?}",
        b.kind, report.deleted, report.chunks, report.longest_pause
    );
    assert_eq!(report.deleted, SERIES * OLD);
    if b.kind == "sqlite" {
        // Readings are pruned a chunk of readings at a time (a few hundred chunks a
        // transaction), after the transaction that records the horizon.
        assert!(report.chunks >= 2, "{report:?}");
    } else {
        assert!(
            report.chunks > SERIES * OLD / PRUNE_CHUNK,
            "{report:?}: chunks of at most {PRUNE_CHUNK}"
        );
    }
    assert_eq!(store.count_readings().await.unwrap(), SERIES);
    let left = store.history("dev-042", "v", all_time(), 10).await.unwrap();
    assert_eq!(left, vec![point(cutoff, OLD as f64, None)]);

    // Rollups by the start of their minute: each series covers minutes 0 to 33.
    let report = store
        .prune(Retained::Rollups, ts(T0 + 10 * MIN))
        .await
        .unwrap();
    assert_eq!(report.deleted, SERIES * 10);
    let rollups = store.rollups("dev-099", "v", all_time()).await.unwrap();
    assert_eq!(rollups.len(), 24);
    assert_eq!(rollups[0].start, ts(T0 + 10 * MIN));

    // Snapshots: 12 ticks of 1,000 devices, the first 6 pruned.
    for tick in 0..12 {
        let rows: Vec<Snapshot> = (0..1000)
            .map(|d| snap(&format!("dev-{d:04}"), T0 + tick * SEC, &[("v", 1.0)]))
            .collect();
        store.write_snapshots(&rows).await.unwrap();
    }
    let report = store
        .prune(Retained::Snapshots, ts(T0 + 6 * SEC))
        .await
        .unwrap();
    assert_eq!(report.deleted, 6000);
    let first = store.snapshots(None, all_time(), 1).await.unwrap();
    assert_eq!(first[0].ts, ts(T0 + 6 * SEC));
    assert_eq!(
        store
            .prune(Retained::Snapshots, ts(T0 + 6 * SEC))
            .await
            .unwrap()
            .deleted,
        0
    );
    assert_eq!(store.raw_horizon().await.unwrap(), Some(ts(cutoff)));
}

/// Readings written before and after a compaction read as one series, whoever asks
/// (this process or another one that knows nothing yet), and writing any of them again
/// adds nothing.
async fn staged_and_compacted_data_read_as_one(b: &Backend) {
    let store = b.open().await;
    let r = |i: u64| rec("d", "s", i + 1, T0 + i as i64 * SEC, i as f64);
    let first: Vec<Record> = (0..10).map(r).collect();
    let second: Vec<Record> = (10..20).map(r).collect();
    assert_eq!(store.write_readings(&first).await.unwrap(), 10);
    store.compact().await.unwrap();
    assert_eq!(store.write_readings(&second).await.unwrap(), 10);
    let want: Vec<Point> = (0..20)
        .map(|i| point(T0 + i * SEC, i as f64, None))
        .collect();
    assert_eq!(
        store.history("d", "s", all_time(), 100).await.unwrap(),
        want
    );
    assert_eq!(
        store
            .history("d", "s", range(T0 + 8 * SEC, T0 + 12 * SEC), 100)
            .await
            .unwrap(),
        want[8..12]
    );
    assert_eq!(
        store.history("d", "s", all_time(), 15).await.unwrap(),
        want[..15]
    );
    let rollup = |count: u64, max: f64| Rollup {
        start: ts(T0),
        count,
        min: 0.0,
        max,
        avg: max / 2.0,
        last: max,
    };
    assert_eq!(
        store.rollups("d", "s", all_time()).await.unwrap(),
        [rollup(20, 19.0)]
    );
    // Redeliveries of both halves, to this process and to one that just opened.
    assert_eq!(store.write_readings(&first).await.unwrap(), 0);
    assert_eq!(store.write_readings(&second).await.unwrap(), 0);
    let other = b.open().await;
    assert_eq!(other.write_readings(&second).await.unwrap(), 0);
    assert_eq!(other.write_readings(&first).await.unwrap(), 0);
    // A late reading between the two halves, then everything compacted.
    let late = rec("d", "s", 99, T0 + 9 * SEC + SEC / 2, 100.0);
    assert_eq!(
        other
            .write_readings(std::slice::from_ref(&late))
            .await
            .unwrap(),
        1
    );
    // The first process learns another one wrote, and still finds the late one stored.
    assert_eq!(store.write_readings(&[late]).await.unwrap(), 0);
    other.compact().await.unwrap();
    store.compact().await.unwrap();
    let history = store.history("d", "s", all_time(), 100).await.unwrap();
    assert_eq!(history.len(), 21);
    assert_eq!(history[10], point(T0 + 9 * SEC + SEC / 2, 100.0, None));
    assert_eq!(store.count_readings().await.unwrap(), 21);
    let rollups = store.rollups("d", "s", all_time()).await.unwrap();
    assert_eq!(rollups.len(), 1);
    assert_eq!(
        (rollups[0].count, rollups[0].max, rollups[0].last),
        (21, 100.0, 19.0)
    );
    assert_eq!(store.write_readings(&first).await.unwrap(), 0);
}

/// An edge site replays a day after the next one was stored: the older day's readings
/// land, in order, across the day boundary, and retention drops the old day whole.
async fn a_replayed_day_lands_in_order(b: &Backend) {
    use fleetpipe_store::Retained;
    const DAY: i64 = 86_400 * SEC;
    // Midnight UTC before T0.
    let day0 = T0 - T0.rem_euclid(DAY);
    let store = b.open().await;
    let every = 10 * MIN;
    // Today (day0 + 1 day): every 10 minutes; written first.
    let today: Vec<Record> = (0..144u64)
        .map(|k| {
            rec(
                "edge",
                "t",
                10_000 + k,
                day0 + DAY + k as i64 * every,
                k as f64,
            )
        })
        .collect();
    assert_eq!(store.write_readings(&today).await.unwrap(), 144);
    store.compact().await.unwrap();
    // Yesterday, replayed in batches of 24, newest batch first, the last ones crossing
    // into today by a minute.
    let yesterday: Vec<Record> = (0..145u64)
        .map(|k| {
            rec(
                "edge",
                "t",
                20_000 + k,
                day0 + k as i64 * every + MIN,
                -(k as f64),
            )
        })
        .collect();
    for (i, chunk) in yesterday.rchunks(24).enumerate() {
        assert_eq!(
            store.write_readings(chunk).await.unwrap(),
            chunk.len() as u64
        );
        if i % 2 == 0 {
            store.compact().await.unwrap();
        }
    }
    // The whole replay again: nothing new.
    assert_eq!(store.write_readings(&yesterday).await.unwrap(), 0);
    store.compact().await.unwrap();
    let history = store.history("edge", "t", all_time(), 1000).await.unwrap();
    assert_eq!(history.len(), 289);
    assert!(
        history.windows(2).all(|w| w[0].ts < w[1].ts),
        "in time order"
    );
    assert_eq!(history[0], point(day0 + MIN, 0.0, None));
    assert_eq!(history[144], point(day0 + DAY, 0.0, None));
    assert_eq!(history[145], point(day0 + DAY + MIN, -144.0, None));
    let rollups = store.rollups("edge", "t", all_time()).await.unwrap();
    assert_eq!(rollups.iter().map(|r| r.count).sum::<u64>(), 289);
    assert_eq!(store.count_readings().await.unwrap(), 289);
    // Retention up to today's first reading: yesterday goes, today stays.
    let report = store
        .prune(Retained::Readings, ts(day0 + DAY))
        .await
        .unwrap();
    assert_eq!(report.deleted, 144);
    assert_eq!(store.count_readings().await.unwrap(), 145);
    let history = store.history("edge", "t", all_time(), 1000).await.unwrap();
    assert_eq!(history[0], point(day0 + DAY, 0.0, None));
}

/// Random batches — in order, redelivered, late, out of order, across series — written
/// with compactions and reopenings in between, against a model: every read answers what
/// the model says, and every reading is counted once.
async fn any_interleaving_matches_a_model(b: &Backend) {
    use std::collections::BTreeMap;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    // Every reading that will ever be written: 6 series, 400 readings each, 3 s apart in
    // runs of 100 that start 50 minutes apart (so they span four hours), a few sharing a
    // timestamp (and told apart by their sequence).
    let mut all: Vec<Record> = Vec::new();
    let mut seq = 0;
    for k in 0..400i64 {
        for s in 0..6 {
            seq += 1;
            let at = T0 + k * 3 * SEC + k / 100 * 50 * MIN - if k % 50 == 7 { 3 * SEC } else { 0 };
            all.push(rec(
                &format!("m{s}"),
                "v",
                seq,
                at,
                (seq * 7 % 101) as f64 - 50.0,
            ));
        }
    }
    let mut store = b.open().await;
    let mut model: BTreeMap<(String, i64, u64), f64> = BTreeMap::new();
    let mut cursor = 0;
    for round in 0..120 {
        let batch: Vec<Record> = match next(4) {
            // The next readings in order.
            0 | 1 => {
                let n = 1 + next(40) as usize;
                let end = (cursor + n).min(all.len());
                let batch = all[cursor..end].to_vec();
                cursor = end;
                batch
            }
            // A redelivery of something already written, maybe partly new.
            2 if cursor > 0 => {
                let start = next(cursor as u64) as usize;
                let end = (start + 1 + next(30) as usize).min(all.len());
                all[start..end].to_vec()
            }
            // Anything, shuffled: late and out-of-order data.
            _ => {
                let mut batch: Vec<Record> = (0..next(30))
                    .map(|_| all[next(all.len() as u64) as usize].clone())
                    .collect();
                for i in (1..batch.len()).rev() {
                    batch.swap(i, next(i as u64 + 1) as usize);
                }
                batch
            }
        };
        let mut new = 0;
        for r in &batch {
            let key = (
                r.reading.device.to_string(),
                r.reading.ts.as_micros(),
                r.seq,
            );
            if model.insert(key, r.reading.value).is_none() {
                new += 1;
            }
        }
        assert_eq!(
            store.write_readings(&batch).await.unwrap(),
            new,
            "round {round}"
        );
        match next(10) {
            0..=2 => store.compact().await.unwrap(),
            3 => store = b.open().await,
            _ => {}
        }
    }
    assert_eq!(store.count_readings().await.unwrap(), model.len() as u64);
    for s in 0..6 {
        let device = format!("m{s}");
        let want: Vec<(i64, f64)> = model
            .range((device.clone(), i64::MIN, 0)..(device.clone(), i64::MAX, u64::MAX))
            .map(|((_, at, _), &v)| (*at, v))
            .collect();
        let got: Vec<(i64, f64)> = store
            .history(&device, "v", all_time(), 10_000)
            .await
            .unwrap()
            .into_iter()
            .map(|p| (p.ts.as_micros(), p.value))
            .collect();
        assert_eq!(got, want, "{device}");
        // Rollups: count, sum, min and max per minute and per hour, and `last` by
        // (ts, seq).
        for (resolution, width) in [(Resolution::Minute, MIN), (Resolution::Hour, HOUR)] {
            let key = SeriesKey::new(&device, "v");
            let rollups = store
                .series_rollups_at(&key, all_time(), resolution)
                .await
                .unwrap();
            let mut buckets: BTreeMap<i64, Vec<(i64, u64, f64)>> = BTreeMap::new();
            for ((_, at, seq), &v) in
                model.range((device.clone(), i64::MIN, 0)..(device.clone(), i64::MAX, u64::MAX))
            {
                buckets
                    .entry(at - at.rem_euclid(width))
                    .or_default()
                    .push((*at, *seq, v));
            }
            assert_eq!(rollups.len(), buckets.len(), "{device} {resolution:?}");
            for (r, (start, points)) in rollups.iter().zip(&buckets) {
                let values: Vec<f64> = points.iter().map(|p| p.2).collect();
                let last = points.iter().max_by_key(|p| (p.0, p.1)).unwrap().2;
                assert_eq!(r.start, ts(*start));
                assert_eq!(r.count, points.len() as u64, "{device} {start}");
                assert_eq!(r.min, values.iter().cloned().fold(f64::MAX, f64::min));
                assert_eq!(r.max, values.iter().cloned().fold(f64::MIN, f64::max));
                assert_eq!(r.last, last);
                let avg = values.iter().sum::<f64>() / values.len() as f64;
                assert!(
                    (r.avg - avg).abs() < 1e-9,
                    "{device} {start}: {} vs {avg}",
                    r.avg
                );
            }
        }
    }
}

/// A rollup prune deletes the minutes before the horizon and the hours wholly before it:
/// the hour it falls in keeps counting its earlier minutes.
async fn pruning_rollups_drops_whole_hours(b: &Backend) {
    let store = b.open().await;
    let at = [50, 70, 89, 130].map(|m| T0 + m * MIN);
    let batch: Vec<Record> = at
        .iter()
        .enumerate()
        .map(|(k, &at)| rec("d", "s", k as u64 + 1, at, k as f64))
        .collect();
    store.write_readings(&batch).await.unwrap();
    store.compact().await.unwrap();
    let key = SeriesKey::new("d", "s");
    let starts = |rollups: Vec<Rollup>| -> Vec<(i64, u64)> {
        rollups
            .iter()
            .map(|r| ((r.start.as_micros() - T0) / MIN, r.count))
            .collect()
    };
    let hours = store
        .series_rollups_at(&key, all_time(), Resolution::Hour)
        .await
        .unwrap();
    assert_eq!(starts(hours), [(0, 1), (60, 2), (120, 1)]);

    let report = store
        .prune(fleetpipe_store::Retained::Rollups, ts(T0 + 80 * MIN))
        .await
        .unwrap();
    // Two minutes (50 and 70) and one hour (10:00).
    assert_eq!(report.deleted, 3);
    let minutes = store.series_rollups(&key, all_time()).await.unwrap();
    assert_eq!(starts(minutes), [(89, 1), (130, 1)]);
    let hours = store
        .series_rollups_at(&key, all_time(), Resolution::Hour)
        .await
        .unwrap();
    assert_eq!(starts(hours), [(60, 2), (120, 1)]);
    // A range picks hours by their start.
    let hours = store
        .series_rollups_at(&key, range(T0 + 61 * MIN, T0 + 3 * HOUR), Resolution::Hour)
        .await
        .unwrap();
    assert_eq!(starts(hours), [(120, 1)]);
}

/// The latest instant a store accepts is readable and deduplicated like any other; one
/// microsecond later is refused.
async fn the_last_instant_is_stored_once_and_readable(b: &Backend) {
    let store = b.open().await;
    let last = rec("edge", "t", 7, i64::MAX - 1, 1.5);
    assert_eq!(
        store
            .write_readings(std::slice::from_ref(&last))
            .await
            .unwrap(),
        1
    );
    store.compact().await.unwrap();
    assert_eq!(
        store
            .write_readings(std::slice::from_ref(&last))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store.history("edge", "t", all_time(), 10).await.unwrap(),
        [point(i64::MAX - 1, 1.5, None)]
    );
    assert_eq!(store.count_readings().await.unwrap(), 1);
    let err = store
        .write_readings(&[rec("edge", "t", 8, i64::MAX, 1.5)])
        .await
        .expect_err("beyond the last instant");
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
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

/// Not a test: how long one aggregator tick of 5,000 device snapshots takes to write as
/// the table fills (`cargo test --release -p fleetpipe-store --test conformance
/// measure_snapshot_ticks -- --ignored --nocapture`).
#[tokio::test]
#[ignore]
async fn measure_snapshot_ticks() {
    let mut backends = vec![Backend::sqlite()];
    backends.extend(Backend::postgres("measure_snap"));
    let ticks: i64 = std::env::var("TICKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    for b in &backends {
        let store = b.open().await;
        let mut times = Vec::new();
        let started = Instant::now();
        for t in 0..ticks {
            let rows: Vec<Snapshot> = (0..5_000)
                .map(|d| {
                    snap(
                        &format!("v{d:05}"),
                        T0 + t * SEC,
                        &[
                            ("speed", (d + t) as f64 * 0.5),
                            ("soc", 80.0 - t as f64 * 0.01),
                            ("torque", 120.5),
                            ("lat", 48.1 + d as f64 * 1e-4),
                            ("lon", 11.5 + t as f64 * 1e-5),
                        ],
                    )
                })
                .collect();
            let start = Instant::now();
            assert_eq!(store.write_snapshots(&rows).await.unwrap(), 5_000);
            times.push(start.elapsed());
        }
        let total = started.elapsed();
        let first: Duration = times[..10].iter().sum::<Duration>() / 10;
        let last: Duration = times[times.len() - 10..].iter().sum::<Duration>() / 10;
        let read = Instant::now();
        let one = store
            .snapshots(Some("v04999"), range(T0, T0 + ticks * SEC), 100_000)
            .await
            .unwrap();
        println!(
            "{}: {ticks} ticks of 5,000 snapshots in {total:?}: first 10 ticks {first:?} each, \
             last 10 {last:?} each; one device's {} rows read in {:?}",
            b.kind,
            one.len(),
            read.elapsed()
        );
    }
}
