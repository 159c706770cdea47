//! Storage for fleetpipe: raw readings, per-minute rollups and per-device snapshots.
//!
//! One [`Store`] trait, two backends: [`sqlite`] (embedded, the default, no server needed)
//! and [`postgres`] (production). One conformance suite (`tests/conformance.rs`) runs
//! against both.
//!
//! **Invariants**
//! * A write is durable when it returns `Ok`: callers acknowledge JetStream messages only
//!   after that.
//! * Writes are idempotent. A reading is identified by `(device, sensor, ts, seq)` where
//!   `seq` is the JetStream stream sequence of the message that carried it, so a redelivered
//!   message never produces a second row, and rollups count each reading once (they are
//!   updated in the same transaction, from the rows actually inserted).
//! * Snapshots are identified by `(device, ts)`; writing the same tick twice is a no-op.
//! * SQL schema lives in versioned migrations under `migrations/<backend>/`, applied at open.

use std::collections::BTreeMap;
use std::sync::Arc;

use fleetpipe_proto::{Reading, Timestamp};

mod migrations;
pub mod postgres;
mod series;
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

/// One stored raw reading, as returned by [`Store::history`].
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub ts: Timestamp,
    pub value: f64,
    pub quality: Option<String>,
}

/// One per-minute rollup of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollup {
    /// Start of the minute.
    pub minute: Timestamp,
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
    /// The value with the latest timestamp in the minute.
    pub last: f64,
}

/// A time range, `from` inclusive, `to` exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub from: Timestamp,
    pub to: Timestamp,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres: {0}")]
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
}

impl StoreError {
    /// True when retrying the same write later may succeed (connection lost, database
    /// busy). Callers leave the messages unacknowledged so JetStream redelivers them.
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            StoreError::Migration { .. } | StoreError::Url { .. } | StoreError::Invalid(_)
        )
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The storage interface every backend implements; see the crate docs for its invariants.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// `"sqlite"` or `"postgres"`.
    fn kind(&self) -> &'static str;

    /// Durably and idempotently writes a batch of readings and updates their per-minute
    /// rollups in the same transaction. Returns how many readings were new.
    async fn write_readings(&self, batch: &[Record]) -> Result<u64>;

    /// Durably and idempotently writes one tick's snapshot rows. Returns how many were new.
    async fn write_snapshots(&self, rows: &[Snapshot]) -> Result<u64>;

    /// Raw readings of one series in `range`, oldest first, at most `limit`.
    async fn history(
        &self,
        device: &str,
        sensor: &str,
        range: Range,
        limit: usize,
    ) -> Result<Vec<Point>>;

    /// Per-minute rollups of one series whose minute starts in `range`, oldest first.
    async fn rollups(&self, device: &str, sensor: &str, range: Range) -> Result<Vec<Rollup>>;

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
    /// how many were deleted.
    async fn prune_readings(&self, before: Timestamp) -> Result<u64>;

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
