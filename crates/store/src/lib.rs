//! Storage for fleetpipe: raw readings, per-minute rollups and per-device snapshots.
//!
//! One [`Store`] trait, two backends: [`sqlite`] (embedded, the default, no server needed)
//! and [`postgres`] (production). One conformance suite (`tests/conformance.rs`) runs
//! against both.
//!
//! **Invariants**
//! * A write is durable when it returns `Ok`: callers acknowledge JetStream messages only
//!   after that.
//! * A series is `(device, sensor, tags)`: readings that differ only in a tag value belong
//!   to different series.
//! * Writes are idempotent. A reading is identified by `(series, ts, seq)` where `seq` is
//!   the JetStream stream sequence of the message that carried it, so a redelivered
//!   message never produces a second reading, and rollups count each reading once
//!   (PostgreSQL updates them in the same statement, from the rows actually inserted; the
//!   embedded store never holds a reading twice, folds readings into the rollups when it
//!   seals them, and adds the unsealed ones to rollup reads).
//! * A write is visible to reads as soon as it returns.
//! * Snapshots are identified by `(device, ts)`; writing the same tick twice is a no-op.
//! * Retention never stalls writers: a prune deletes in transactions of at most
//!   [`PRUNE_CHUNK`] rows, after recording the table's horizon; writes skip readings older
//!   than the raw horizon, so a redelivery of pruned data is not counted twice in the
//!   rollups.
//! * SQL schema lives in versioned migrations under `migrations/<backend>/`, applied at open.

use std::collections::BTreeMap;
use std::sync::Arc;

use fleetpipe_proto::{Reading, Tags, Timestamp};

mod chunk;
pub mod hashing;
mod migrations;
mod pg_tls;
pub mod postgres;
mod series;
pub mod series_index;
pub mod sqlite;

/// A reading together with the stream sequence of the message that carried it.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub seq: u64,
    pub reading: Reading,
}

/// One row of the aggregator's output: the latest value of each sensor of one device at
/// one tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub device: String,
    pub ts: Timestamp,
    pub values: BTreeMap<String, f64>,
}

/// Names one series: a device's sensor with one tag set (in any order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeriesKey<'a> {
    pub device: &'a str,
    pub sensor: &'a str,
    pub tags: &'a [(String, String)],
}

impl<'a> SeriesKey<'a> {
    /// The series of `device`'s `sensor` without tags.
    pub fn new(device: &'a str, sensor: &'a str) -> Self {
        SeriesKey {
            device,
            sensor,
            tags: &[],
        }
    }

    /// The same device and sensor with these tags.
    pub fn with_tags(self, tags: &'a [(String, String)]) -> Self {
        SeriesKey { tags, ..self }
    }

    /// The tags as stored: a JSON object with sorted keys.
    pub(crate) fn tags_json(&self) -> String {
        series::tags_to_json(&fleetpipe_proto::canonical_tags(self.tags))
    }
}

/// One stored series, as listed by [`Store::series`].
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesInfo {
    pub device: String,
    pub sensor: String,
    /// Canonical: sorted by name.
    pub tags: Tags,
    /// The latest unit a reading of it carried.
    pub unit: Option<String>,
}

impl SeriesInfo {
    pub fn key(&self) -> SeriesKey<'_> {
        SeriesKey {
            device: &self.device,
            sensor: &self.sensor,
            tags: &self.tags,
        }
    }
}

/// Most series [`Store::series`] returns: a device has a handful of sensors, each with a
/// few tag sets; a listing this long means a tag is used as a value (a timestamp, an id).
pub const MAX_SERIES_LISTED: usize = 1000;

/// One stored raw reading, as returned by [`Store::history`].
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub ts: Timestamp,
    pub value: f64,
    pub quality: Option<String>,
}

/// One rollup of one series: the readings of one minute, or of one hour.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollup {
    /// Start of the minute (or hour).
    pub start: Timestamp,
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
    /// The value with the latest timestamp in the minute.
    pub last: f64,
}

/// How much time one rollup covers. Both are kept as readings are stored (minutes for
/// ranges up to a few days, hours for months), and agree: an hour is the fold of its
/// minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resolution {
    Minute,
    Hour,
}

impl Resolution {
    /// The width of a bucket in microseconds.
    pub fn micros(self) -> i64 {
        match self {
            Resolution::Minute => 60_000_000,
            Resolution::Hour => 3_600_000_000,
        }
    }

    /// The start of the bucket holding `ts` (Unix µs).
    pub fn start_of(self, ts: i64) -> i64 {
        ts - ts.rem_euclid(self.micros())
    }
}

/// A time range, `from` inclusive, `to` exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub from: Timestamp,
    pub to: Timestamp,
}

/// Data kept for a limited time and deleted by [`Store::prune`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Retained {
    /// Raw readings, by timestamp.
    Readings,
    /// Per-minute rollups, by the start of their minute.
    Rollups,
    /// The aggregator's snapshots, by tick.
    Snapshots,
}

impl Retained {
    /// The table, which is also the row's name in `retention_horizons`.
    pub fn table(self) -> &'static str {
        match self {
            Retained::Readings => "readings",
            Retained::Rollups => "rollups_1m",
            Retained::Snapshots => "snapshots",
        }
    }
}

/// Most rows one prune transaction deletes: a prune is a series of short transactions,
/// and writers get in between (with SQLite, the writer lock is released after each).
pub const PRUNE_CHUNK: u64 = 5_000;

/// What one [`Store::prune`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Rows deleted.
    pub deleted: u64,
    /// Transactions committed (recording the horizon, then at most [`PRUNE_CHUNK`] rows
    /// each).
    pub chunks: u64,
    /// The longest of those transactions: the longest stretch the prune held SQLite's
    /// writer (others' commits wait that long at most), or ran one PostgreSQL statement.
    pub longest_pause: std::time::Duration,
}

impl PruneReport {
    pub(crate) fn chunk(&mut self, deleted: u64, pause: std::time::Duration) {
        self.deleted += deleted;
        self.chunks += 1;
        self.longest_pause = self.longest_pause.max(pause);
    }
}

/// How often a store re-reads the raw horizon from the database, to learn of prunes made
/// by another process on the same database.
const HORIZON_REFRESH: std::time::Duration = std::time::Duration::from_secs(30);

/// The raw retention horizon as this process knows it (see [`Store::raw_horizon`]): read
/// at open, advanced by this store's prunes, and re-read every [`HORIZON_REFRESH`].
pub(crate) struct RawHorizon {
    /// Unix microseconds; `i64::MIN` while nothing was ever pruned.
    micros: std::sync::atomic::AtomicI64,
    /// When the database was last asked.
    checked: std::sync::Mutex<std::time::Instant>,
}

impl RawHorizon {
    pub(crate) fn new(stored: Option<i64>) -> Self {
        RawHorizon {
            micros: std::sync::atomic::AtomicI64::new(stored.unwrap_or(i64::MIN)),
            checked: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }

    pub(crate) fn get(&self) -> Option<Timestamp> {
        let micros = self.micros.load(std::sync::atomic::Ordering::SeqCst);
        (micros != i64::MIN).then(|| Timestamp::from_micros(micros))
    }

    /// Moves the horizon forward to `to` (never back).
    pub(crate) fn advance(&self, to: Option<i64>) {
        if let Some(to) = to {
            self.micros
                .fetch_max(to, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// True when the database should be asked again; then the caller does it, and other
    /// callers keep using the value in memory meanwhile.
    pub(crate) fn refresh_due(&self) -> bool {
        let Ok(mut checked) = self.checked.lock() else {
            return false;
        };
        if checked.elapsed() < HORIZON_REFRESH {
            return false;
        }
        *checked = std::time::Instant::now();
        true
    }

    /// The records of `batch` at or after the horizon (borrowed when that is all of them).
    /// Older ones may have been pruned already: writing them again would store them a
    /// second time and count them twice in the rollups.
    pub(crate) fn admit<'a>(&self, batch: &'a [Record]) -> std::borrow::Cow<'a, [Record]> {
        let horizon = self.micros.load(std::sync::atomic::Ordering::SeqCst);
        let newer = |r: &Record| r.reading.ts.as_micros() >= horizon;
        if batch.iter().all(newer) {
            return std::borrow::Cow::Borrowed(batch);
        }
        let kept: Vec<Record> = batch.iter().filter(|r| newer(r)).cloned().collect();
        tracing::debug!(
            skipped = batch.len() - kept.len(),
            horizon = %Timestamp::from_micros(horizon),
            "skipped readings older than the raw retention horizon (already pruned or about to be)"
        );
        std::borrow::Cow::Owned(kept)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres: {}", postgres_message(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("postgres pool: {0}")]
    Pool(String),
    #[error("migration {version} failed: {reason}")]
    Migration { version: u32, reason: String },
    #[error("bad store URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("store task failed: {0}")]
    Task(String),
    /// The batch holds something no backend can store faithfully (a non-finite value, a
    /// sequence beyond `i64`, a timestamp outside PostgreSQL's range). Nothing was written.
    #[error("invalid data: {0}")]
    Invalid(String),
    /// A read named a device and sensor that has several series (tag sets).
    #[error("{0}")]
    Ambiguous(String),
}

impl StoreError {
    /// True when retrying the same write later may succeed (connection lost, database
    /// busy or out of space). False when the data itself is refused (text the database
    /// cannot hold, a value out of range, a row too large) or the request is wrong: the
    /// collectors then isolate the message that causes it and dead-letter it.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Migration { .. }
            | StoreError::Url { .. }
            | StoreError::Invalid(_)
            | StoreError::Ambiguous(_) => false,
            StoreError::Sqlite(e) => sqlite_is_transient(e),
            StoreError::Postgres(e) => postgres_is_transient(e),
            StoreError::Pool(_) | StoreError::Task(_) => true,
        }
    }

    /// True when the database could not be reached at all (refused or lost connection,
    /// pool timeout), as opposed to one that answered with an error (a wrong password, a
    /// missing database): a service starting during an outage waits for the first, and
    /// stops at once on the second.
    pub fn is_unreachable(&self) -> bool {
        match self {
            StoreError::Postgres(e) => e.code().is_none(),
            StoreError::Pool(_) => true,
            _ => false,
        }
    }
}

/// What PostgreSQL said, not just tokio-postgres's "db error": the message, the detail
/// and the constraint, so a dead letter or a log line says what refused the data.
fn postgres_message(e: &tokio_postgres::Error) -> String {
    let Some(db) = e.as_db_error() else {
        return match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        };
    };
    let mut out = format!("{} ({})", db.message(), db.code().code());
    if let Some(detail) = db.detail() {
        out.push_str(": ");
        out.push_str(detail);
    }
    if let Some(constraint) = db.constraint() {
        out.push_str(&format!(" [constraint {constraint}]"));
    }
    out
}

/// SQLite: busy, locked, I/O, full disk and the like pass; a constraint, a value or a
/// row the database refuses does not. Errors rusqlite raises itself (a conversion) are
/// about the data too.
fn sqlite_is_transient(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode as C;
    match e {
        rusqlite::Error::SqliteFailure(f, _) => !matches!(
            f.code,
            C::ConstraintViolation | C::TooBig | C::TypeMismatch | C::ParameterOutOfRange
        ),
        _ => false,
    }
}

/// PostgreSQL: errors of SQLSTATE class 22 (data exception: a NUL in text, a value out of
/// range), 23 (integrity constraint) and 54 (program limit exceeded: a row too large for
/// an index) are about the data; the rest (connection, shutdown, disk full, lock
/// timeouts, serialization) may pass. An error without a SQLSTATE is a lost connection.
fn postgres_is_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(state) => !matches!(&state.code()[..2], "22" | "23" | "54"),
        None => true,
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The storage interface every backend implements; see the crate docs for its invariants.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// `"sqlite"` or `"postgres"`.
    fn kind(&self) -> &'static str;

    /// The index of series this store finds series by, so that callers keeping state per
    /// series (the collector's latest state) share its one hash table. A store that keeps
    /// none returns an index of its own.
    fn series_index(&self) -> Arc<series_index::SeriesIndex> {
        Arc::default()
    }

    /// Durably and idempotently writes a batch of readings; reads and rollups reflect
    /// them as soon as it returns. Returns how many readings were new.
    async fn write_readings(&self, batch: &[Record]) -> Result<u64>;

    /// Durably and idempotently writes one tick's snapshot rows. Returns how many were new.
    async fn write_snapshots(&self, rows: &[Snapshot]) -> Result<u64>;

    /// The series of `device` (of one sensor, or all), ordered by sensor then tags, at most
    /// [`MAX_SERIES_LISTED`].
    async fn series(&self, device: &str, sensor: Option<&str>) -> Result<Vec<SeriesInfo>>;

    /// Raw readings of one series in `range`, oldest first, at most `limit`.
    async fn series_history(
        &self,
        key: &SeriesKey<'_>,
        range: Range,
        limit: usize,
    ) -> Result<Vec<Point>>;

    /// Per-minute rollups of one series whose minute starts in `range`, oldest first.
    async fn series_rollups(&self, key: &SeriesKey<'_>, range: Range) -> Result<Vec<Rollup>> {
        self.series_rollups_at(key, range, Resolution::Minute).await
    }

    /// Rollups of one series at `resolution` whose bucket starts in `range`, oldest first.
    async fn series_rollups_at(
        &self,
        key: &SeriesKey<'_>,
        range: Range,
        resolution: Resolution,
    ) -> Result<Vec<Rollup>>;

    /// Like [`Store::series_history`] for the one series of `device`'s `sensor`, whatever
    /// its tags: empty when there is none, an error naming the tag sets when there are
    /// several.
    async fn history(
        &self,
        device: &str,
        sensor: &str,
        range: Range,
        limit: usize,
    ) -> Result<Vec<Point>> {
        match self.only_series(device, sensor).await? {
            Some(s) => self.series_history(&s.key(), range, limit).await,
            None => Ok(Vec::new()),
        }
    }

    /// Like [`Store::series_rollups`] for the one series of `device`'s `sensor`; see
    /// [`Store::history`].
    async fn rollups(&self, device: &str, sensor: &str, range: Range) -> Result<Vec<Rollup>> {
        match self.only_series(device, sensor).await? {
            Some(s) => self.series_rollups(&s.key(), range).await,
            None => Ok(Vec::new()),
        }
    }

    /// The one series of `device`'s `sensor`, `None` when there is none, an error when
    /// tags tell several apart.
    async fn only_series(&self, device: &str, sensor: &str) -> Result<Option<SeriesInfo>> {
        let mut found = self.series(device, Some(sensor)).await?;
        match found.len() {
            0 | 1 => Ok(found.pop()),
            n => Err(StoreError::Ambiguous(format!(
                "{device}/{sensor} has {n} series, told apart by their tags ({}); name one \
                 with its tags",
                found
                    .iter()
                    .take(5)
                    .map(|s| series::tags_to_json(&s.tags))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// Snapshot rows in `range` (of one device, or all), oldest first, at most `limit`.
    async fn snapshots(
        &self,
        device: Option<&str>,
        range: Range,
        limit: usize,
    ) -> Result<Vec<Snapshot>>;

    /// Total raw readings stored.
    async fn count_readings(&self) -> Result<u64>;

    /// Deletes raw readings older than `before` (rollups and snapshots are kept). Returns
    /// how many were deleted. The backends do it as [`Store::prune`] of
    /// [`Retained::Readings`] does: in chunks, after recording the raw horizon.
    async fn prune_readings(&self, before: Timestamp) -> Result<u64>;

    /// Deletes the rows of `what` older than `before` in transactions of at most
    /// [`PRUNE_CHUNK`] rows, so that writers get in between. First it records `before` as
    /// the table's retention horizon (a horizon never moves back); for readings that is
    /// [`Store::raw_horizon`], and writes skip readings older than it from then on.
    async fn prune(&self, what: Retained, before: Timestamp) -> Result<PruneReport> {
        let _ = before;
        Err(StoreError::Task(format!(
            "the {} store cannot prune {}",
            self.kind(),
            what.table()
        )))
    }

    /// The raw retention horizon: raw readings older than it may have been pruned, so a
    /// range that starts before it is answered from the rollups. `None` while no raw
    /// reading was ever pruned. Read from the database, so it includes prunes made by
    /// other processes. [`Store::write_readings`] skips readings older than the horizon
    /// (as this process last read it): a redelivery of pruned data would otherwise be
    /// stored again and counted twice in the rollups.
    async fn raw_horizon(&self) -> Result<Option<Timestamp>> {
        Ok(None)
    }

    /// Moves what writes left in a staging area into the long-term layout now rather than
    /// in the background (the embedded store seals its hot area into chunks and rollups).
    /// Reads answer the same before and after; tests and benchmarks call it. A no-op
    /// where there is no staging area.
    async fn compact(&self) -> Result<()> {
        Ok(())
    }

    /// Checks the store answers.
    async fn ping(&self) -> Result<()>;
}

/// Opens the store a URL names and applies pending migrations: `postgres://…` or
/// `postgresql://…` for PostgreSQL, `sqlite://PATH` or a plain file path for SQLite.
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(postgres::PgStore::connect(url).await?))
    } else {
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        if path.is_empty() {
            return Err(StoreError::Url {
                url: url.to_string(),
                reason: "no path given".into(),
            });
        }
        Ok(Arc::new(sqlite::SqliteStore::open(path).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_errors_are_classified() {
        use rusqlite::ffi;
        let err =
            |code| StoreError::Sqlite(rusqlite::Error::SqliteFailure(ffi::Error::new(code), None));
        let cases = [
            (ffi::SQLITE_BUSY, true),
            (ffi::SQLITE_LOCKED, true),
            (ffi::SQLITE_IOERR, true),
            (ffi::SQLITE_FULL, true),
            (ffi::SQLITE_CANTOPEN, true),
            (ffi::SQLITE_CONSTRAINT, false),
            (ffi::SQLITE_TOOBIG, false),
            (ffi::SQLITE_MISMATCH, false),
            (ffi::SQLITE_RANGE, false),
        ];
        for (code, transient) in cases {
            assert_eq!(err(code).is_transient(), transient, "code {code}");
        }
        let conversion = rusqlite::Error::IntegralValueOutOfRange(0, 1);
        assert!(!StoreError::Sqlite(conversion).is_transient());
        assert!(StoreError::Pool("timed out".into()).is_transient());
        assert!(!StoreError::Invalid("NaN".into()).is_transient());
    }
}
