//! The production backend: PostgreSQL (14 or newer) through a connection pool.
//!
//! **Layout.** `readings` is partitioned by range on `ts`, one partition per UTC day
//! (`readings_p20261130`, migration 0004), with the key `(series_id, ts, seq)` in each:
//! the key holds the partition key, so idempotence is exact. `rollups_1m`, `snapshots`,
//! `series` and `retention_horizons` are plain tables; `readings_v` joins readings with
//! their series for people and Grafana.
//!
//! **Writes.** A batch of readings of known series is written with one statement, so one
//! round trip: the readings go in as arrays (`UNNEST`), and the same statement folds the
//! rows it actually inserted into the per-minute rollups. (A binary `COPY` into a staging
//! table followed by the same insert was measured too, and was slower: see `write_rows`.)
//! Series ids come from an in-process cache; unknown series cost one or two extra round
//! trips, once. So do days: the first batch that needs a day's partition creates it (SQL
//! function `readings_partition`, safe from any number of processes), and the process
//! remembers the days it has seen. Data older than the raw horizon never gets that far
//! (`RawHorizon::admit`); late data for any newer day gets its partition.
//!
//! **Retention.** A prune of readings records the horizon, detaches (`CONCURRENTLY`: no
//! reader or writer waits) and drops every partition wholly older than it, and deletes in
//! chunks only in the one partition the horizon falls into. It also creates today's and
//! tomorrow's partitions ahead, so that at midnight writers find the new day ready
//! instead of attaching it while a prune detaches an old one.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::error::Error as StdError;
use std::time::Duration;

use crate::pg_tls::PgTls;
use bytes::BytesMut;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use fleetpipe_proto::Timestamp;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};

use crate::migrations::{self, POSTGRES as MIGRATIONS};
use crate::series::{
    check_records, check_snapshots, tags_from_json, Pending, Plan, Resolved, SeriesCache,
};
use crate::{
    Point, Range, Record, Resolution, Result, Rollup, SeriesInfo, SeriesKey, Snapshot, Store,
    StoreError, MAX_SERIES_LISTED,
};

/// Connections kept by the pool.
const POOL_SIZE: usize = 16;

/// Key of the advisory lock that serialises migrations across processes.
const MIGRATION_LOCK: i64 = 0x666c_6565_7470_6970; // "fleetpip"

/// A [`Store`] in a PostgreSQL database. Cheap to clone; clones share the pool and cache.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    series: std::sync::Arc<SeriesCache>,
    horizon: std::sync::Arc<crate::RawHorizon>,
    days: std::sync::Arc<KnownDays>,
}

impl PgStore {
    /// Connects to the database `url` names (`postgres://user:pass@host:port/db`) and
    /// applies pending migrations.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, POOL_SIZE).await
    }

    /// Like [`PgStore::connect`], with a pool of its own of at most `pool_size`
    /// connections (at least one), for a second handle on the same database whose work
    /// must neither wait for the first one's connections nor hold them: the HTTP API in
    /// `fleetpipe up` reads through a small pool next to the collectors' (see
    /// `fleetpipe_api::open_store`).
    pub async fn connect_with(url: &str, pool_size: usize) -> Result<Self> {
        let bad_url = |reason: String| StoreError::Url {
            url: redact(url),
            reason,
        };
        // TLS as libpq's sslmode, sslrootcert, sslcert and sslkey ask (`pg_tls`).
        let (rest, tls) = PgTls::split(url).map_err(bad_url)?;
        let mut config: tokio_postgres::Config =
            rest.parse().map_err(|e| bad_url(format!("{e}")))?;
        config.ssl_mode(tls.ssl_mode());
        let manager = Manager::from_config(
            config,
            tls.connector().map_err(bad_url)?,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        let store = PgStore {
            pool,
            series: Default::default(),
            horizon: std::sync::Arc::new(crate::RawHorizon::new(None)),
            days: Default::default(),
        };
        store.migrate().await?;
        store.horizon.advance(store.load_raw_horizon().await?);
        Ok(store)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client> {
        self.pool.get().await.map_err(pool_error)
    }

    /// The raw horizon stored by the last prune of readings, if any (Unix µs).
    async fn load_raw_horizon(&self) -> Result<Option<i64>> {
        read_raw_horizon(&self.client().await?).await
    }

    /// What of `batch` to write: the readings at or after the raw horizon (see
    /// [`crate::RawHorizon::admit`]), re-read from the database now and then, as other
    /// processes prune it too.
    async fn admit<'a>(&self, batch: &'a [Record]) -> std::borrow::Cow<'a, [Record]> {
        if self.horizon.refresh_due() {
            match self.load_raw_horizon().await {
                Ok(stored) => self.horizon.advance(stored),
                Err(e) => tracing::debug!(error = %e, "cannot re-read the raw horizon"),
            }
        }
        self.horizon.admit(batch)
    }

    /// The readings side of a prune up to `before`: creates today's and tomorrow's
    /// partitions ahead (see the module doc), drops every partition wholly older than
    /// `before` (each one a chunk of `report`), and returns the partition `before` falls
    /// into, if any, where older rows are deleted row by row.
    async fn drop_old_partitions(
        &self,
        client: &deadpool_postgres::Client,
        before: PgTimestamp,
        report: &mut crate::PruneReport,
    ) -> Result<Option<String>> {
        let today = day_of(Timestamp::now().as_micros());
        ensure_partitions(client, &self.days, &BTreeSet::from([today, today + 1])).await?;
        let mut straddling = None;
        let mut dropped = false;
        for row in client.query(READINGS_PARTITIONS, &[&before]).await? {
            let name: String = row.try_get(0)?;
            let upper: PgTimestamp = row.try_get(2)?;
            if upper.0 > before.0 {
                straddling = Some(name);
                continue;
            }
            let start = std::time::Instant::now();
            // CONCURRENTLY: readers and writers of `readings` go on meanwhile. It cannot
            // run in a transaction, so each statement commits on its own. FINALIZE ends a
            // detach that was interrupted.
            let how = if row.try_get(3)? {
                "FINALIZE"
            } else {
                "CONCURRENTLY"
            };
            client
                .batch_execute(&format!(
                    "ALTER TABLE readings DETACH PARTITION {name} {how}"
                ))
                .await?;
            let deleted = drop_detached(client, &name).await?;
            report.chunk(deleted, start.elapsed());
            dropped = true;
        }
        for row in client.query(DETACHED_PARTITIONS, &[&before]).await? {
            let name: String = row.try_get(0)?;
            let start = std::time::Instant::now();
            let deleted = drop_detached(client, &name).await?;
            report.chunk(deleted, start.elapsed());
            dropped = true;
        }
        if dropped {
            // Other processes learn it from the error their next insert into a dropped
            // day gets (see `write_readings`).
            self.days.forget();
        }
        Ok(straddling)
    }

    /// Writes `rows` (in key order) and their rollups, after making sure the partitions
    /// of their days exist. Returns how many readings were new.
    async fn insert(&self, client: &deadpool_postgres::Client, rows: &[Row<'_>]) -> Result<u64> {
        if rows.is_empty() {
            return Ok(0);
        }
        let days: BTreeSet<i64> = rows.iter().map(|r| day_of(r.ts)).collect();
        ensure_partitions(client, &self.days, &days).await?;
        write_rows(client, rows).await
    }

    async fn migrate(&self) -> Result<()> {
        let mut client = self.client().await?;
        for m in MIGRATIONS {
            let version = i32::try_from(m.version).map_err(|_| StoreError::Migration {
                version: m.version,
                reason: "version does not fit an integer".into(),
            })?;
            let tx = client.transaction().await?;
            // Held until commit: two processes starting together would otherwise both see
            // the migration missing and both apply it.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                     version    integer PRIMARY KEY,
                     applied_at timestamptz NOT NULL DEFAULT now()
                 )",
            )
            .await?;
            let newest: Option<i32> = tx
                .query_one("SELECT max(version) FROM schema_migrations", &[])
                .await?
                .try_get(0)?;
            migrations::check_not_newer(newest.map(i64::from), MIGRATIONS)?;
            let applied: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = $1)",
                    &[&version],
                )
                .await?
                .try_get(0)?;
            if !applied {
                tx.batch_execute(m.sql)
                    .await
                    .map_err(|e| StoreError::Migration {
                        version: m.version,
                        reason: e.to_string(),
                    })?;
                tx.execute(
                    "INSERT INTO schema_migrations (version) VALUES ($1)",
                    &[&version],
                )
                .await?;
                tracing::info!(version = m.version, "applied postgres migration");
            }
            tx.commit().await?;
        }
        Ok(())
    }
}

fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => StoreError::Postgres(e),
        other => StoreError::Pool(other.to_string()),
    }
}

/// The URL with its password, if any, replaced by `***`, for error messages.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// Unix microseconds as PostgreSQL's binary `timestamptz` (microseconds since
/// 2000-01-01): exact both ways, with no detour through calendar types.
#[derive(Debug, Clone, Copy)]
struct PgTimestamp(i64);

/// 2000-01-01T00:00:00Z in Unix microseconds.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

impl From<Timestamp> for PgTimestamp {
    fn from(ts: Timestamp) -> Self {
        PgTimestamp(ts.as_micros())
    }
}

impl ToSql for PgTimestamp {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn StdError + Sync + Send>> {
        let pg = self
            .0
            .checked_sub(PG_EPOCH_MICROS)
            .ok_or("timestamp out of PostgreSQL's range")?;
        out.extend_from_slice(&pg.to_be_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for PgTimestamp {
    fn from_sql(
        _: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn StdError + Sync + Send>> {
        let bytes: [u8; 8] = raw.try_into()?;
        // ±infinity come back as i64::MAX/MIN: saturate rather than wrap.
        Ok(PgTimestamp(
            i64::from_be_bytes(bytes).saturating_add(PG_EPOCH_MICROS),
        ))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TIMESTAMPTZ
    }
}

impl PgTimestamp {
    fn into_timestamp(self) -> Timestamp {
        Timestamp::from_micros(self.0)
    }
}

/// The raw horizon stored by the last prune of readings, if any (Unix µs).
async fn read_raw_horizon(client: &deadpool_postgres::Client) -> Result<Option<i64>> {
    let row = client
        .query_opt(
            "SELECT horizon FROM retention_horizons WHERE name = $1",
            &[&crate::Retained::Readings.table()],
        )
        .await?;
    Ok(match row {
        Some(row) => Some(row.try_get::<_, PgTimestamp>(0)?.0),
        None => None,
    })
}

/// One UTC day in microseconds: the span of a partition of `readings`.
const DAY_MICROS: i64 = 86_400_000_000;

/// The UTC day (days since 1970-01-01) of Unix microseconds `ts`.
fn day_of(ts: i64) -> i64 {
    ts.div_euclid(DAY_MICROS)
}

/// The days whose partition of `readings` this process has seen exist, so a batch of
/// known days goes straight to the insert.
#[derive(Default)]
struct KnownDays(std::sync::Mutex<HashSet<i64>>);

impl KnownDays {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        // Held for a lookup or an insert of a few days; a panic cannot leave the set
        // inconsistent, so a poisoned lock is still good.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The days of `days` not known to exist, in order.
    fn unknown(&self, days: &BTreeSet<i64>) -> Vec<i64> {
        let known = self.set();
        days.iter()
            .copied()
            .filter(|d| !known.contains(d))
            .collect()
    }

    fn learn(&self, days: &[i64]) {
        self.set().extend(days);
    }

    /// Forgets every day: a prune (maybe by another process) dropped some.
    fn forget(&self) {
        self.set().clear();
    }
}

/// Creates (when missing) the partitions of the UTC days `$1` (their midnights); see
/// `readings_partition` in migration 0004.
const ENSURE_PARTITIONS: &str = "
SELECT readings_partition((d AT TIME ZONE 'UTC')::date)
FROM UNNEST($1::timestamptz[]) AS u(d)";

/// Makes sure the partitions of `days` exist, asking the database only about the days
/// this process has not seen yet. Commits on its own: an empty partition is harmless.
async fn ensure_partitions(
    client: &deadpool_postgres::Client,
    known: &KnownDays,
    days: &BTreeSet<i64>,
) -> Result<()> {
    let unknown = known.unknown(days);
    if unknown.is_empty() {
        return Ok(());
    }
    let midnights: Vec<PgTimestamp> = unknown
        .iter()
        .map(|d| PgTimestamp(d * DAY_MICROS))
        .collect();
    let stmt = client.prepare_cached(ENSURE_PARTITIONS).await?;
    client.execute(&stmt, &[&midnights]).await?;
    known.learn(&unknown);
    Ok(())
}

/// True for PostgreSQL's "no partition of relation found for row": a check violation
/// that names no constraint (a real one names it). The partition of a day this process
/// knew was dropped since, by a prune in another process.
fn is_missing_partition(e: &StoreError) -> bool {
    let StoreError::Postgres(e) = e else {
        return false;
    };
    e.as_db_error()
        .is_some_and(|db| *db.code() == SqlState::CHECK_VIOLATION && db.constraint().is_none())
}

/// One reading as written: its series id and the key, value and quality.
#[derive(Debug, Clone, Copy)]
struct Row<'a> {
    series: i64,
    /// Unix microseconds.
    ts: i64,
    seq: i64,
    value: f64,
    quality: Option<&'a str>,
}

/// The batch as rows in key order, so concurrent writers of overlapping batches (a
/// redelivery racing the original) take index locks in the same order and wait instead
/// of deadlocking.
fn rows<'a>(batch: &'a [Record], plan: &Plan, resolved: &[Resolved]) -> Result<Vec<Row<'a>>> {
    let mut rows = Vec::with_capacity(batch.len());
    for (record, &series) in batch.iter().zip(&plan.refs) {
        let seq = i64::try_from(record.seq)
            .map_err(|_| StoreError::Invalid(format!("sequence {}", record.seq)))?;
        let r = &record.reading;
        rows.push(Row {
            series: Plan::id(series, resolved),
            ts: r.ts.as_micros(),
            seq,
            value: r.value,
            quality: r.quality.as_deref(),
        });
    }
    rows.sort_unstable_by_key(|r| (r.series, r.ts, r.seq));
    Ok(rows)
}

/// Writes `rows` (in key order) and their rollups in one statement, so one transaction;
/// returns how many were new.
///
/// The readings go in as five arrays. A binary `COPY` into a temporary staging table
/// (`ON COMMIT DELETE ROWS`), then the same insert-and-fold from it, was measured against
/// this (PostgreSQL 15 with fsync off, release build, 1,000 devices × 2 sensors, series
/// and partitions known; two runs each): COPY wrote about 50,000 readings/s against
/// 67,000–94,000 for batches of 1,000 (its extra round trips and staging table cost
/// 5–10 ms a batch), 95,000–106,000 against 143,000–152,000 for 10,000, and
/// 132,000–140,000 against 140,000–148,000 for 50,000. So arrays it is.
async fn write_rows(client: &deadpool_postgres::Client, rows: &[Row<'_>]) -> Result<u64> {
    let mut ids = Vec::with_capacity(rows.len());
    let mut ts = Vec::with_capacity(rows.len());
    let mut seqs = Vec::with_capacity(rows.len());
    let mut values = Vec::with_capacity(rows.len());
    let mut qualities = Vec::with_capacity(rows.len());
    for r in rows {
        ids.push(r.series);
        ts.push(PgTimestamp(r.ts));
        seqs.push(r.seq);
        values.push(r.value);
        qualities.push(r.quality);
    }
    let stmt = client.prepare_cached(WRITE_READINGS).await?;
    let new: i64 = client
        .query_one(&stmt, &[&ids, &ts, &seqs, &values, &qualities])
        .await?
        .try_get(0)?;
    Ok(u64::try_from(new).unwrap_or(0))
}

// The conflict clause of a rollup upsert on `(series_id, $bucket)`: counts add up, `last`
// moves only to a strictly newer (ts, seq).
macro_rules! rollup_upsert {
    ($bucket:literal) => {
        concat!(
            "ON CONFLICT (series_id, ",
            $bucket,
            ") DO UPDATE SET
        count = r.count + EXCLUDED.count,
        sum = r.sum + EXCLUDED.sum,
        min = LEAST(r.min, EXCLUDED.min),
        max = GREATEST(r.max, EXCLUDED.max),
        last = CASE WHEN (EXCLUDED.last_ts, EXCLUDED.last_seq) > (r.last_ts, r.last_seq)
                    THEN EXCLUDED.last ELSE r.last END,
        last_ts = CASE WHEN (EXCLUDED.last_ts, EXCLUDED.last_seq) > (r.last_ts, r.last_seq)
                       THEN EXCLUDED.last_ts ELSE r.last_ts END,
        last_seq = CASE WHEN (EXCLUDED.last_ts, EXCLUDED.last_seq) > (r.last_ts, r.last_seq)
                        THEN EXCLUDED.last_seq ELSE r.last_seq END"
        )
    };
}
/// Inserts a batch of readings and folds the ones actually inserted into the rollups, in
/// one statement (so atomically): minutes from the inserted rows, hours from those
/// minutes. A batch may hold several readings of the same (series, minute): the GROUP BY
/// merges them before the upsert. `last` moves only to a strictly newer (ts, seq).
const WRITE_READINGS: &str = concat!(
    "
WITH ins AS (
    INSERT INTO readings (series_id, ts, seq, value, quality)
    SELECT * FROM UNNEST($1::bigint[], $2::timestamptz[], $3::bigint[], $4::float8[], $5::text[])
    ON CONFLICT DO NOTHING
    RETURNING series_id, ts, seq, value
), agg AS (
    SELECT series_id,
           date_trunc('minute', ts, 'UTC') AS minute,
           count(*) AS count,
           sum(value) AS sum,
           min(value) AS min,
           max(value) AS max,
           (array_agg(value ORDER BY ts DESC, seq DESC))[1] AS last,
           max(ts) AS last_ts,
           (array_agg(seq ORDER BY ts DESC, seq DESC))[1] AS last_seq
    FROM ins
    GROUP BY 1, 2
    ORDER BY 1, 2
), up AS (
    INSERT INTO rollups_1m AS r
        (series_id, minute, count, sum, min, max, last, last_ts, last_seq)
    SELECT * FROM agg
    ",
    rollup_upsert!("minute"),
    "
), up_h AS (
    INSERT INTO rollups_1h AS r
        (series_id, hour, count, sum, min, max, last, last_ts, last_seq)
    SELECT series_id,
           date_trunc('hour', minute, 'UTC'),
           sum(count),
           sum(sum),
           min(min),
           max(max),
           (array_agg(last ORDER BY last_ts DESC, last_seq DESC))[1],
           max(last_ts),
           (array_agg(last_seq ORDER BY last_ts DESC, last_seq DESC))[1]
    FROM agg
    GROUP BY 1, 2
    ORDER BY 1, 2
    ",
    rollup_upsert!("hour"),
    "
)
SELECT count(*) FROM ins"
);

/// The ids of series `(device, sensor, tags)`, each returned with its position (from 1)
/// in the arrays. jsonb equality compares tags as a set.
const SELECT_SERIES: &str = "
SELECT s.id, s.unit, k.i
FROM UNNEST($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS k(device, sensor, tags, i)
JOIN series s ON s.device = k.device AND s.sensor = k.sensor AND s.tags = k.tags::jsonb";

const INSERT_SERIES: &str = "
INSERT INTO series (device, sensor, unit, tags)
SELECT device, sensor, unit, tags::jsonb
FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) AS u(device, sensor, unit, tags)
ON CONFLICT (device, sensor, tags) DO NOTHING
RETURNING id, device, sensor, tags::text";

const UPDATE_SERIES: &str = "
UPDATE series AS s SET unit = u.unit
FROM UNNEST($1::bigint[], $2::text[]) AS u(id, unit)
WHERE s.id = u.id";

/// Rounds of look-up-then-insert before giving up on resolving series ids. A round only
/// misses a series when another writer created it between our two statements, so the
/// second round finds it.
const RESOLVE_ROUNDS: usize = 3;

/// Finds or creates the batch's pending series, and updates those whose unit changed.
/// Each statement commits on its own: a series row without readings is harmless.
async fn resolve_series(
    client: &deadpool_postgres::Client,
    pending: &[Pending],
) -> Result<Vec<Resolved>> {
    // Sorted, so concurrent writers creating overlapping sets of series lock their keys
    // in the same order and cannot deadlock.
    let mut missing: Vec<usize> = (0..pending.len()).collect();
    missing.sort_unstable_by_key(|&i| {
        (
            &pending[i].device,
            &pending[i].sensor,
            &pending[i].tags_json,
        )
    });
    let mut resolved: Vec<Option<Resolved>> = vec![None; pending.len()];
    let mut updates = Vec::new();
    for _ in 0..RESOLVE_ROUNDS {
        let (devices, sensors, tags) = keys(pending, &missing);
        let stmt = client.prepare_cached(SELECT_SERIES).await?;
        for row in client.query(&stmt, &[&devices, &sensors, &tags]).await? {
            let position: i64 = row.try_get(2)?;
            let Some(&i) = usize::try_from(position - 1)
                .ok()
                .and_then(|p| missing.get(p))
            else {
                continue;
            };
            let merged = pending[i].merge(row.try_get(0)?, row.try_get(1)?);
            if merged.changed {
                updates.push(merged.resolved.clone());
            }
            resolved[i] = Some(merged.resolved);
        }
        missing.retain(|&i| resolved[i].is_none());
        if missing.is_empty() {
            break;
        }
        let (devices, sensors, tags) = keys(pending, &missing);
        let units: Vec<Option<&str>> = missing
            .iter()
            .map(|&i| pending[i].unit.as_deref())
            .collect();
        let stmt = client.prepare_cached(INSERT_SERIES).await?;
        // Rows come back for the series this statement created; the others (created
        // meanwhile by another writer) are found by the next round's select.
        let created = client
            .query(&stmt, &[&devices, &sensors, &units, &tags])
            .await?;
        let mut by_key: HashMap<(&str, &str), Vec<(String, i64)>> = HashMap::new();
        for row in &created {
            by_key
                .entry((row.try_get(1)?, row.try_get(2)?))
                .or_default()
                .push((row.try_get(3)?, row.try_get(0)?));
        }
        for &i in &missing {
            let p = &pending[i];
            let Some(rows) = by_key.get(&(p.device.as_str(), p.sensor.as_str())) else {
                continue;
            };
            // jsonb prints its own text; compare as parsed tags.
            if let Some((_, id)) = rows
                .iter()
                .find(|(t, _)| tags_from_json(t).as_slice() == &p.tags[..])
            {
                resolved[i] = Some(p.created(*id));
            }
        }
        missing.retain(|&i| resolved[i].is_none());
        if missing.is_empty() {
            break;
        }
    }
    if !updates.is_empty() {
        updates.sort_unstable_by_key(|r| r.id);
        let ids: Vec<i64> = updates.iter().map(|r| r.id).collect();
        let units: Vec<Option<&str>> = updates.iter().map(|r| r.unit.as_deref()).collect();
        let stmt = client.prepare_cached(UPDATE_SERIES).await?;
        client.execute(&stmt, &[&ids, &units]).await?;
    }
    resolved
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            StoreError::Task(format!(
                "could not resolve series ids after {RESOLVE_ROUNDS} rounds"
            ))
        })
}

/// Devices, sensors and tags (as JSON) of `set`, as statement arrays.
fn keys<'a>(pending: &'a [Pending], set: &[usize]) -> (Vec<&'a str>, Vec<&'a str>, Vec<&'a str>) {
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for &i in set {
        let p = &pending[i];
        out.0.push(p.device.as_str());
        out.1.push(p.sensor.as_str());
        out.2.push(p.tags_json.as_str());
    }
    out
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Records a table's retention horizon (`$1` its name); it never moves back.
const RECORD_HORIZON: &str = "
INSERT INTO retention_horizons AS h (name, horizon) VALUES ($1, $2)
ON CONFLICT (name) DO UPDATE SET horizon = GREATEST(h.horizon, EXCLUDED.horizon)
RETURNING horizon";

/// Drops a table detached from `readings`, and returns how many readings it held. No
/// one writes to it any more, so the count is exact.
async fn drop_detached(client: &deadpool_postgres::Client, name: &str) -> Result<u64> {
    let count: i64 = client
        .query_one(&format!("SELECT count(*) FROM {name}"), &[])
        .await?
        .try_get(0)?;
    client.batch_execute(&format!("DROP TABLE {name}")).await?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// The partitions of `readings` that start before `$1`, oldest first: the name to use in
/// SQL, the bounds, and whether a detach was left half done (`DETACH ... CONCURRENTLY`
/// interrupted). The bounds are read back from the partition's own definition, in this
/// session's time zone, so they parse back exactly; a partition of another shape (none is
/// made so) is left out, so never dropped.
const READINGS_PARTITIONS: &str = r"
SELECT c.oid::regclass::text, b.m[1]::timestamptz, b.m[2]::timestamptz, i.inhdetachpending
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
CROSS JOIN LATERAL (
    SELECT regexp_match(pg_get_expr(c.relpartbound, c.oid),
                        '^FOR VALUES FROM \(''([^'']*)''\) TO \(''([^'']*)''\)$') AS m
) b
WHERE i.inhparent = 'readings'::regclass AND b.m[1]::timestamptz < $1
ORDER BY 2";

/// Tables named as partitions of `readings` but detached, of days wholly older than `$1`:
/// left by a prune that stopped between its detach and its drop. (A table an operator
/// detached from a newer day is left alone.)
const DETACHED_PARTITIONS: &str = r"
SELECT c.oid::regclass::text
FROM pg_class c
CROSS JOIN LATERAL (
    SELECT regexp_match(c.relname, '^readings_p(bc)?([0-9]{4,})([0-9]{2})([0-9]{2})$') AS m
) n
WHERE c.relkind = 'r' AND NOT c.relispartition AND n.m IS NOT NULL
  AND c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'readings'::regclass)
  AND (make_date(CASE WHEN n.m[1] IS NULL THEN 1 ELSE -1 END * n.m[2]::int,
                 n.m[3]::int, n.m[4]::int) + 1)::timestamp AT TIME ZONE 'UTC' <= $1";

// One prune chunk: at most `$3` rows older than `$2`, deleted by one statement. Readings
// (of the one partition the horizon falls into) and rollups are walked series by series
// from series id `$1` on, along their primary key (no index on time alone: it would cost
// every insert), and the statement returns how many rows it deleted and the last series
// it reached, where the next chunk starts. Snapshots are walked along their `ts` index.
fn prune_readings_sql(partition: &str) -> String {
    format!(
        "
WITH doomed AS (
    SELECT r.series_id, r.ts, r.seq
    FROM series s
    CROSS JOIN LATERAL (
        SELECT series_id, ts, seq FROM {partition}
        WHERE series_id = s.id AND ts < $2
        LIMIT $3
    ) r
    WHERE s.id >= $1
    ORDER BY s.id
    LIMIT $3
), gone AS (
    DELETE FROM {partition} d USING doomed
    WHERE d.series_id = doomed.series_id AND d.ts = doomed.ts AND d.seq = doomed.seq
    RETURNING d.series_id
)
SELECT count(*), max(series_id) FROM gone"
    )
}

// `$table`/`$bucket`: `rollups_1m`/`minute` or `rollups_1h`/`hour`.
macro_rules! prune_rollups {
    ($table:literal, $bucket:literal) => {
        concat!(
            "
WITH doomed AS (
    SELECT r.series_id, r.",
            $bucket,
            "
    FROM series s
    CROSS JOIN LATERAL (
        SELECT series_id, ",
            $bucket,
            " FROM ",
            $table,
            "
        WHERE series_id = s.id AND ",
            $bucket,
            " < $2
        LIMIT $3
    ) r
    WHERE s.id >= $1
    ORDER BY s.id
    LIMIT $3
), gone AS (
    DELETE FROM ",
            $table,
            " d USING doomed
    WHERE d.series_id = doomed.series_id AND d.",
            $bucket,
            " = doomed.",
            $bucket,
            "
    RETURNING d.series_id
)
SELECT count(*), max(series_id) FROM gone"
        )
    };
}
const PRUNE_ROLLUPS: &str = prune_rollups!("rollups_1m", "minute");
const PRUNE_HOURS: &str = prune_rollups!("rollups_1h", "hour");

// Needs no cursor: returns `$1` back.
const PRUNE_SNAPSHOTS: &str = "
WITH doomed AS (
    SELECT device, ts FROM snapshots WHERE ts < $2 ORDER BY ts LIMIT $3
), gone AS (
    DELETE FROM snapshots d USING doomed
    WHERE d.device = doomed.device AND d.ts = doomed.ts
    RETURNING 1
)
SELECT count(*), $1::bigint FROM gone";

#[async_trait::async_trait]
impl Store for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn series_index(&self) -> std::sync::Arc<crate::series_index::SeriesIndex> {
        self.series.index()
    }

    async fn write_readings(&self, batch: &[Record]) -> Result<u64> {
        let admitted = self.admit(batch).await;
        let batch = &admitted[..];
        if batch.is_empty() {
            return Ok(0);
        }
        check_records(batch)?;
        let plan = self.series.plan(batch)?;
        let client = self.client().await?;
        let resolved = if plan.pending.is_empty() {
            Vec::new()
        } else {
            let resolved = resolve_series(&client, &plan.pending).await?;
            self.series.remember(&plan.pending, &resolved)?;
            resolved
        };
        let mut rows = rows(batch, &plan, &resolved)?;
        match self.insert(&client, &rows).await {
            Err(e) if is_missing_partition(&e) => {
                // Another process pruned a day this one still knew, after recording a
                // horizon this one has not read yet: read it, leave out what it covers
                // (as `admit` would have), and write the rest.
                self.days.forget();
                self.horizon.advance(read_raw_horizon(&client).await?);
                if let Some(horizon) = self.horizon.get() {
                    rows.retain(|r| r.ts >= horizon.as_micros());
                }
                self.insert(&client, &rows).await
            }
            other => other,
        }
    }

    async fn write_snapshots(&self, rows: &[Snapshot]) -> Result<u64> {
        if rows.is_empty() {
            return Ok(0);
        }
        check_snapshots(rows)?;
        let mut sorted: Vec<&Snapshot> = rows.iter().collect();
        // Key order, for the same reason as readings.
        sorted.sort_unstable_by(|a, b| (&a.device, a.ts).cmp(&(&b.device, b.ts)));
        let devices: Vec<&str> = sorted.iter().map(|s| s.device.as_str()).collect();
        let ts: Vec<PgTimestamp> = sorted.iter().map(|s| s.ts.into()).collect();
        let values = sorted
            .iter()
            .map(|s| {
                serde_json::to_string(&s.values)
                    .map_err(|e| StoreError::Invalid(format!("snapshot of {:?}: {e}", s.device)))
            })
            .collect::<Result<Vec<String>>>()?;
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO snapshots (device, ts, \"values\")
                 SELECT device, ts, v::jsonb
                 FROM UNNEST($1::text[], $2::timestamptz[], $3::text[]) AS u(device, ts, v)
                 ON CONFLICT DO NOTHING",
            )
            .await?;
        Ok(client.execute(&stmt, &[&devices, &ts, &values]).await?)
    }

    async fn series(&self, device: &str, sensor: Option<&str>) -> Result<Vec<SeriesInfo>> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT device, sensor, tags::text, unit FROM series
                 WHERE device = $1 AND ($2::text IS NULL OR sensor = $2)
                 ORDER BY sensor, tags
                 LIMIT $3",
            )
            .await?;
        let rows = client
            .query(&stmt, &[&device, &sensor, &limit_param(MAX_SERIES_LISTED)])
            .await?;
        rows.iter()
            .map(|r| {
                Ok(SeriesInfo {
                    device: r.try_get(0)?,
                    sensor: r.try_get(1)?,
                    tags: tags_from_json(r.try_get(2)?).into(),
                    unit: r.try_get(3)?,
                })
            })
            .collect()
    }

    async fn series_history(
        &self,
        key: &SeriesKey<'_>,
        range: Range,
        limit: usize,
    ) -> Result<Vec<Point>> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT ts, value, quality FROM readings
                 WHERE series_id = (SELECT id FROM series
                                    WHERE device = $1 AND sensor = $2 AND tags = $6::text::jsonb)
                   AND ts >= $3 AND ts < $4
                 ORDER BY ts, seq
                 LIMIT $5",
            )
            .await?;
        let tags = key.tags_json();
        let rows = client
            .query(
                &stmt,
                &[
                    &key.device,
                    &key.sensor,
                    &PgTimestamp::from(range.from),
                    &PgTimestamp::from(range.to),
                    &limit_param(limit),
                    &tags,
                ],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Point {
                    ts: r.try_get::<_, PgTimestamp>(0)?.into_timestamp(),
                    value: r.try_get(1)?,
                    quality: r.try_get(2)?,
                })
            })
            .collect()
    }

    async fn series_rollups_at(
        &self,
        key: &SeriesKey<'_>,
        range: Range,
        resolution: Resolution,
    ) -> Result<Vec<Rollup>> {
        let client = self.client().await?;
        let sql = match resolution {
            Resolution::Minute => {
                "SELECT minute, count, sum, min, max, last FROM rollups_1m
                 WHERE series_id = (SELECT id FROM series
                                    WHERE device = $1 AND sensor = $2 AND tags = $5::text::jsonb)
                   AND minute >= $3 AND minute < $4
                 ORDER BY minute"
            }
            Resolution::Hour => {
                "SELECT hour, count, sum, min, max, last FROM rollups_1h
                 WHERE series_id = (SELECT id FROM series
                                    WHERE device = $1 AND sensor = $2 AND tags = $5::text::jsonb)
                   AND hour >= $3 AND hour < $4
                 ORDER BY hour"
            }
        };
        let stmt = client.prepare_cached(sql).await?;
        let tags = key.tags_json();
        let rows = client
            .query(
                &stmt,
                &[
                    &key.device,
                    &key.sensor,
                    &PgTimestamp::from(range.from),
                    &PgTimestamp::from(range.to),
                    &tags,
                ],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let count: i64 = r.try_get(1)?;
                let sum: f64 = r.try_get(2)?;
                Ok(Rollup {
                    start: r.try_get::<_, PgTimestamp>(0)?.into_timestamp(),
                    count: u64::try_from(count).unwrap_or(0),
                    min: r.try_get(3)?,
                    max: r.try_get(4)?,
                    avg: sum / count as f64,
                    last: r.try_get(5)?,
                })
            })
            .collect()
    }

    async fn snapshots(
        &self,
        device: Option<&str>,
        range: Range,
        limit: usize,
    ) -> Result<Vec<Snapshot>> {
        let client = self.client().await?;
        let (from, to, limit) = (
            PgTimestamp::from(range.from),
            PgTimestamp::from(range.to),
            limit_param(limit),
        );
        // Two statements rather than `$1 IS NULL OR device = $1`, so each gets a plan
        // that uses the index that fits it.
        let rows = match device {
            Some(d) => {
                let stmt = client
                    .prepare_cached(
                        "SELECT device, ts, \"values\"::text FROM snapshots
                         WHERE device = $1 AND ts >= $2 AND ts < $3
                         ORDER BY ts, device LIMIT $4",
                    )
                    .await?;
                client.query(&stmt, &[&d, &from, &to, &limit]).await?
            }
            None => {
                let stmt = client
                    .prepare_cached(
                        "SELECT device, ts, \"values\"::text FROM snapshots
                         WHERE ts >= $1 AND ts < $2
                         ORDER BY ts, device LIMIT $3",
                    )
                    .await?;
                client.query(&stmt, &[&from, &to, &limit]).await?
            }
        };
        rows.iter()
            .map(|r| {
                let device: String = r.try_get(0)?;
                let json: &str = r.try_get(2)?;
                let values: BTreeMap<String, f64> = serde_json::from_str(json).map_err(|e| {
                    StoreError::Task(format!(
                        "snapshot of {device:?} holds malformed values: {e}"
                    ))
                })?;
                Ok(Snapshot {
                    ts: r.try_get::<_, PgTimestamp>(1)?.into_timestamp(),
                    device,
                    values,
                })
            })
            .collect()
    }

    async fn count_readings(&self) -> Result<u64> {
        let client = self.client().await?;
        let n: i64 = client
            .query_one("SELECT count(*) FROM readings", &[])
            .await?
            .try_get(0)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn prune_readings(&self, before: Timestamp) -> Result<u64> {
        Ok(self.prune(crate::Retained::Readings, before).await?.deleted)
    }

    async fn prune(&self, what: crate::Retained, before: Timestamp) -> Result<crate::PruneReport> {
        // An hour goes once it is wholly before `before`.
        let hours_before = PgTimestamp::from(Timestamp::from_micros(
            Resolution::Hour.start_of(before.as_micros()),
        ));
        let before = PgTimestamp::from(before);
        let mut report = crate::PruneReport::default();
        let mut client = self.client().await?;
        // The horizon first: from then on, writes skip what this prune deletes.
        let start = std::time::Instant::now();
        let horizon: PgTimestamp = client
            .query_one(RECORD_HORIZON, &[&what.table(), &before])
            .await?
            .try_get(0)?;
        report.chunk(0, start.elapsed());
        let walks: Vec<(std::borrow::Cow<'static, str>, PgTimestamp)> = match what {
            crate::Retained::Readings => {
                self.horizon.advance(Some(horizon.0));
                match self
                    .drop_old_partitions(&client, before, &mut report)
                    .await?
                {
                    Some(partition) => vec![(prune_readings_sql(&partition).into(), before)],
                    None => return Ok(report),
                }
            }
            crate::Retained::Rollups => vec![
                (PRUNE_ROLLUPS.into(), before),
                (PRUNE_HOURS.into(), hours_before),
            ],
            crate::Retained::Snapshots => vec![(PRUNE_SNAPSHOTS.into(), before)],
        };
        let limit = i64::try_from(crate::PRUNE_CHUNK).unwrap_or(i64::MAX);
        for (sql, before) in walks {
            // Not cached: a readings prune names the day's partition.
            let stmt = client.prepare(&sql).await?;
            // One short transaction per chunk.
            let mut from = i64::MIN;
            loop {
                let start = std::time::Instant::now();
                let tx = client.transaction().await?;
                // The generic plan walks the keys whatever the bounds (custom plans for the
                // first bounds were several times slower), and the planner's estimate for a
                // whole table can pass the JIT threshold: compiling took longer than a chunk.
                tx.batch_execute(
                    "SET LOCAL jit = off; SET LOCAL plan_cache_mode = force_generic_plan",
                )
                .await?;
                let row = tx.query_one(&stmt, &[&from, &before, &limit]).await?;
                tx.commit().await?;
                let deleted = u64::try_from(row.try_get::<_, i64>(0)?).unwrap_or(0);
                report.chunk(deleted, start.elapsed());
                match row.try_get::<_, Option<i64>>(1)? {
                    Some(last) if deleted >= crate::PRUNE_CHUNK => from = last,
                    _ => break,
                }
            }
        }
        Ok(report)
    }

    async fn raw_horizon(&self) -> Result<Option<Timestamp>> {
        self.horizon.advance(self.load_raw_horizon().await?);
        Ok(self.horizon.get())
    }

    async fn ping(&self) -> Result<()> {
        let client = self.client().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        let cases = [
            (
                "postgres://u:secret@h:5432/db",
                "postgres://u:***@h:5432/db",
            ),
            ("postgres://u@h/db", "postgres://u@h/db"),
            ("postgres://h/db", "postgres://h/db"),
            ("not a url", "not a url"),
        ];
        for (url, want) in cases {
            assert_eq!(redact(url), want);
        }
    }
}
