//! The embedded backend: one SQLite file, no server.
//!
//! SQLite calls block, so every one runs on tokio's blocking pool, never on the async
//! runtime. Writes go through a single connection (SQLite admits one writer at a time
//! anyway); reads use their own connections, which in WAL mode see the last committed
//! state without waiting for a write in progress.
//!
//! Checkpoints (copying the WAL back into the database file) run on a thread of their own
//! every [`CHECKPOINT_EVERY`], not inside a commit as SQLite's automatic checkpoint does, so
//! a commit rarely waits for one, and a page written many times between two checkpoints is
//! copied once. The thread first copies without blocking anyone, then, once the WAL holds
//! [`WAL_RESET_FRAMES`], takes the writer for the few frames committed meanwhile: only a
//! checkpoint that catches up with the last commit lets the next one start the WAL over, so
//! without that step the WAL of a store that is never idle would grow without end.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use fleetpipe_proto::Timestamp;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use crate::chunk::Pt;
use crate::migrations::{self, SQLITE as MIGRATIONS};
use crate::series::{
    check_records, check_snapshots, tags_from_json, Pending, Plan, Resolved, SeriesCache, SeriesRef,
};

mod chunked;
use crate::{
    Point, Range, Record, Resolution, Result, Rollup, SeriesInfo, SeriesKey, Snapshot, Store,
    StoreError, MAX_SERIES_LISTED,
};

/// How long a statement waits for another process's lock before failing with "busy".
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle reader connections kept open; more are opened when reads run concurrently.
const MAX_IDLE_READERS: usize = 4;

/// How often the checkpointer thread copies the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// Frames (pages) in the WAL from which the checkpointer finishes a checkpoint under the
/// writer lock, so that the next commit starts the WAL over (16 MB of 4 KB pages).
const WAL_RESET_FRAMES: i64 = 4096;

/// After a checkpoint, a WAL file larger than this is truncated to it.
const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// Between two seal transactions, so that writes waiting for the writer get it first.
const SEAL_PAUSE: Duration = Duration::from_millis(2);

/// Most chunks one prune transaction deletes or rewrites (a chunk holds up to
/// `chunked::CHUNK_POINTS` readings).
const PRUNE_CHUNKS: i64 = 500;

/// Marks a reading without a quality flag in [`Row::quality`].
const NO_QUALITY: u32 = u32::MAX;

/// How often the sealer moves the hot area into chunks (see `chunked.rs`): reads seek
/// once per hot write, so this bounds their cost; each seal rewrites the newest chunk of
/// every series it touches, so sealing much more often costs more.
const SEAL_EVERY: Duration = Duration::from_secs(5);

/// Readings written since the last seal that wake the sealer before [`SEAL_EVERY`].
const SEAL_POINTS: u64 = 262_144;

/// The sealer leaves this process's writes of the last this long in the hot area: writes
/// commit out of stream order, and the one holding older readings, if it came after the
/// seal, would be late data merged into sealed chunks. Those that commit within this of
/// each other are sealed together (see `chunked::seal_group`).
const SEAL_HOLD: Duration = Duration::from_secs(1);

/// About the most readings one seal round moves (a round plans its series once).
const SEAL_TX_POINTS: u64 = 131_072;

/// Most series one seal transaction moves: it holds the writer meanwhile, and its cost is
/// mostly per series (the rollup upserts and the chunk appends), so this bounds how long a
/// write can wait for a seal (sealing 5,000 series at once held the writer 300 ms).
const SEAL_TX_SERIES: usize = 500;

/// A [`Store`] in one SQLite file. Cheap to clone; clones share the connections.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
    horizon: Arc<crate::RawHorizon>,
}

struct Inner {
    // A std mutex around the one writer connection: `rusqlite::Connection` is not `Sync`,
    // SQLite serialises writers anyway (queueing them here is cheaper than letting them
    // spin on SQLITE_BUSY), and it is only ever locked on a blocking-pool thread, never
    // across an await.
    writer: Arc<Mutex<Connection>>,
    /// `None` for an in-memory database, which other connections cannot see: reads then
    /// go through the writer.
    readers: Option<ReaderPool>,
    series: SeriesCache,
    /// Per series, the newest reading stored; only used under the writer lock.
    newest: Mutex<chunked::Newest>,
    /// Started by the first write of readings: a process that only reads never seals.
    sealer: OnceLock<Sealer>,
    /// `None` for an in-memory database (no WAL).
    _checkpointer: Option<Checkpointer>,
}

/// The thread that seals the hot area (see `chunked.rs`) every [`SEAL_EVERY`], or sooner
/// once [`SEAL_POINTS`] readings were written; stops when dropped.
struct Sealer {
    wake: Arc<(Mutex<bool>, std::sync::Condvar)>,
    /// Readings written since the thread last started a seal.
    written: Arc<AtomicU64>,
    /// This process's writes of the last [`SEAL_HOLD`], oldest first.
    recent: Arc<Recent>,
}

/// Hot writes by when they committed, for [`SEAL_HOLD`].
#[derive(Default)]
struct Recent(Mutex<VecDeque<(i64, Instant)>>);

impl Recent {
    fn committed(&self, write_id: i64) {
        let now = Instant::now();
        if let Ok(mut log) = self.0.lock() {
            Self::forget_old(&mut log, now);
            log.push_back((write_id, now));
        }
    }

    /// The oldest write of the last [`SEAL_HOLD`] (`i64::MAX`: none): seal only before it.
    fn held_from(&self) -> i64 {
        let Ok(mut log) = self.0.lock() else {
            return i64::MAX;
        };
        Self::forget_old(&mut log, Instant::now());
        log.front().map_or(i64::MAX, |&(id, _)| id)
    }

    fn forget_old(log: &mut VecDeque<(i64, Instant)>, now: Instant) {
        while log
            .front()
            .is_some_and(|&(_, at)| now.duration_since(at) >= SEAL_HOLD)
        {
            log.pop_front();
        }
    }
}

impl Sealer {
    fn start(writer: Arc<Mutex<Connection>>) -> Result<Sealer> {
        let wake = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let written = Arc::new(AtomicU64::new(0));
        let recent = Arc::new(Recent::default());
        let (flag, count, held) = (Arc::clone(&wake), Arc::clone(&written), Arc::clone(&recent));
        std::thread::Builder::new()
            .name("sqlite-sealer".into())
            .spawn(move || {
                let (lock, cv) = &*flag;
                loop {
                    {
                        let Ok(stopped) = lock.lock() else { return };
                        if *stopped {
                            return;
                        }
                        let idle = |stopped: &mut bool| {
                            !*stopped && count.load(Ordering::Relaxed) < SEAL_POINTS
                        };
                        let Ok((stopped, _)) = cv.wait_timeout_while(stopped, SEAL_EVERY, idle)
                        else {
                            return;
                        };
                        if *stopped {
                            return;
                        }
                    }
                    count.store(0, Ordering::Relaxed);
                    if let Err(e) = seal_all(&writer, || held.held_from()) {
                        tracing::warn!(error = %e, "sealing the hot area failed; retrying");
                    }
                }
            })
            .map_err(|e| StoreError::Task(format!("cannot start the sqlite sealer: {e}")))?;
        Ok(Sealer {
            wake,
            written,
            recent,
        })
    }

    /// Counts readings just written (by hot write `write_id`), waking the thread when
    /// enough are waiting.
    fn wrote(&self, write_id: Option<i64>, points: u64) {
        if let Some(id) = write_id {
            self.recent.committed(id);
        }
        if self.written.fetch_add(points, Ordering::Relaxed) + points >= SEAL_POINTS {
            self.wake.1.notify_all();
        }
    }
}

impl Drop for Sealer {
    fn drop(&mut self) {
        let (lock, cv) = &*self.wake;
        if let Ok(mut stopped) = lock.lock() {
            *stopped = true;
        }
        cv.notify_all();
    }
}

/// Seals the hot area's writes before `held_from()` (asked again at every round): rounds
/// of about [`SEAL_TX_POINTS`] readings, each in transactions of at most
/// [`SEAL_TX_SERIES`] series, taking the writer for each.
fn seal_all(writer: &Mutex<Connection>, held_from: impl Fn() -> i64) -> Result<()> {
    let lock = || {
        writer
            .lock()
            .map_err(|_| StoreError::Task("sqlite writer mutex poisoned".into()))
    };
    loop {
        let started = std::time::Instant::now();
        let below = held_from();
        let planned = chunked::plan_round(&*lock()?, SEAL_TX_POINTS, SEAL_TX_SERIES, below)?;
        let Some(round) = planned else {
            return Ok(());
        };
        let planning = started.elapsed();
        let (mut longest, mut groups, mut late) = (Duration::ZERO, 0, 0);
        for &(first, last) in &round.groups {
            let held = std::time::Instant::now();
            late += chunked::seal_group(&mut *lock()?, &round, first, last)?.late;
            longest = longest.max(held.elapsed());
            groups += 1;
            // The writer lock is not fair: without a pause this thread would take it
            // back at once, and a write would wait for the whole round instead of one
            // group.
            std::thread::sleep(SEAL_PAUSE);
        }
        tracing::debug!(
            writes = round.writes,
            readings = round.points,
            groups,
            late_series = late,
            planning = ?planning,
            longest = ?longest,
            took = ?started.elapsed(),
            "sealed hot readings into chunks"
        );
    }
}

/// The thread that checkpoints the WAL; stops (after a last checkpoint) when dropped.
struct Checkpointer {
    stop: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

impl Checkpointer {
    fn start(path: &str, writer: Arc<Mutex<Connection>>) -> Result<Checkpointer> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let stop = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let flag = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                let (lock, wake) = &*flag;
                let mut stopped = match lock.lock() {
                    Ok(g) => g,
                    Err(_) => return,
                };
                loop {
                    let done = *stopped;
                    // PASSIVE: copies what no reader still needs, never blocks a writer.
                    // Returns the frames in the WAL and how many of them are copied.
                    let passive = |c: &Connection| {
                        c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                        })
                        .map_err(
                            |e| tracing::warn!(error = %e, "sqlite checkpoint failed; retrying"),
                        )
                        .ok()
                    };
                    // The rest between two commits, once the WAL is large enough to be worth
                    // the short wait it costs the writer.
                    // (A passive checkpoint reports the frames as of its start, all copied
                    // when no reader held it back: the commits made meanwhile do not show.)
                    if let Some((frames, _copied)) = passive(&conn) {
                        if frames >= WAL_RESET_FRAMES {
                            if let Ok(w) = writer.lock() {
                                passive(&w);
                            }
                        }
                    }
                    if done {
                        return;
                    }
                    stopped = match wake.wait_timeout(stopped, CHECKPOINT_EVERY) {
                        Ok((g, _)) => g,
                        Err(_) => return,
                    };
                }
            })
            .map_err(|e| StoreError::Task(format!("cannot start the sqlite checkpointer: {e}")))?;
        Ok(Checkpointer { stop })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let (lock, wake) = &*self.stop;
        if let Ok(mut stopped) = lock.lock() {
            *stopped = true;
        }
        wake.notify_all();
    }
}

struct ReaderPool {
    path: String,
    // Short critical sections (push/pop), so a std mutex.
    idle: Mutex<Vec<Connection>>,
}

impl SqliteStore {
    /// Opens (creating if needed, with its parent directory) the database at `path`,
    /// switches it to WAL with full fsync on commit, and applies pending migrations.
    /// `:memory:` gives a private in-memory database, handy in tests.
    pub async fn open(path: &str) -> Result<Self> {
        let path = path.to_string();
        let inner = Arc::new(blocking(move || Inner::open(path)).await?);
        let stored = {
            let inner = Arc::clone(&inner);
            blocking(move || inner.read(load_raw_horizon)).await?
        };
        Ok(SqliteStore {
            inner,
            horizon: Arc::new(crate::RawHorizon::new(stored)),
        })
    }

    /// What of `batch` to write: the readings at or after the raw horizon (see
    /// [`crate::RawHorizon::admit`]), re-read from the database now and then, as another
    /// process may prune it too.
    async fn admit<'a>(&self, batch: &'a [Record]) -> std::borrow::Cow<'a, [Record]> {
        if self.horizon.refresh_due() {
            match self.read(load_raw_horizon).await {
                Ok(stored) => self.horizon.advance(stored),
                Err(e) => tracing::debug!(error = %e, "cannot re-read the raw horizon"),
            }
        }
        self.horizon.admit(batch)
    }

    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.read(f)).await
    }

    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner, &mut Connection) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            let mut conn = inner.writer()?;
            f(&inner, &mut conn)
        })
        .await
    }
}

/// Runs blocking SQLite work off the async runtime.
async fn blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Task(format!("sqlite task: {e}")))?
}

impl Inner {
    fn open(path: String) -> Result<Inner> {
        create_parent_dir(&path)?;
        // Processes opening a new file together race to switch it to WAL and migrate it;
        // SQLite may answer busy at once where waiting could deadlock (the busy handler is
        // then not called), so the setup, idempotent, is tried again for a while.
        let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
        loop {
            match Self::open_once(&path) {
                Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)))
                    if f.code == rusqlite::ErrorCode::DatabaseBusy
                        && std::time::Instant::now() < deadline =>
                {
                    // Jittered by the clock, so that two openers do not retry in step.
                    let jitter = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| u64::from(d.subsec_micros()) % 80);
                    std::thread::sleep(Duration::from_millis(20 + jitter));
                }
                other => return other,
            }
        }
    }

    fn open_once(path: &str) -> Result<Inner> {
        let path = path.to_string();
        let mut conn = Connection::open(&path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        let in_memory = mode.eq_ignore_ascii_case("memory");
        if !in_memory && !mode.eq_ignore_ascii_case("wal") {
            // Still correct and durable, but readers will wait behind writers.
            tracing::warn!(%path, journal_mode = %mode, "sqlite could not switch to WAL");
        }
        // FULL: in WAL mode, NORMAL may lose the last commits on power loss, and we
        // acknowledge messages as soon as a commit returns. A 48 MiB page cache: 16 MiB
        // cost 1,000-device runs 3-7 % of their rate, 48 measured the same as 64 while a
        // collector holding 2.6 million series stays under 400 MB (BENCHMARKS.md).
        conn.execute_batch(
            "PRAGMA synchronous = FULL;
             PRAGMA temp_store = MEMORY;
             PRAGMA cache_size = -49152;",
        )?;
        // Room for every statement the writer prepares (about 30), so none is parsed again.
        conn.set_prepared_statement_cache_capacity(64);
        stable_plans(&conn)?;
        migrate(&mut conn)?;
        let checkpointer = if in_memory {
            None
        } else {
            // The checkpointer thread takes over from SQLite's automatic checkpoints.
            conn.execute_batch(&format!(
                "PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = {WAL_SIZE_LIMIT};"
            ))?;
            Some(())
        };
        let writer = Arc::new(Mutex::new(conn));
        let checkpointer = match checkpointer {
            Some(()) => Some(Checkpointer::start(&path, Arc::clone(&writer))?),
            None => None,
        };
        Ok(Inner {
            _checkpointer: checkpointer,
            writer,
            readers: (!in_memory).then(|| ReaderPool {
                path,
                idle: Mutex::new(Vec::new()),
            }),
            series: SeriesCache::default(),
            newest: Mutex::default(),
            sealer: OnceLock::new(),
        })
    }

    fn writer(&self) -> Result<MutexGuard<'_, Connection>> {
        self.writer
            .lock()
            .map_err(|_| StoreError::Task("sqlite writer mutex poisoned".into()))
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let Some(pool) = &self.readers else {
            let conn = self.writer()?;
            return f(&conn);
        };
        let idle = pool
            .idle
            .lock()
            .map_err(|_| StoreError::Task("sqlite reader pool mutex poisoned".into()))?
            .pop();
        let conn = match idle {
            Some(conn) => conn,
            None => open_reader(&pool.path)?,
        };
        let result = f(&conn);
        if let Ok(mut idle) = pool.idle.lock() {
            if idle.len() < MAX_IDLE_READERS {
                idle.push(conn);
            }
        }
        result
    }
}

fn create_parent_dir(path: &str) -> Result<()> {
    // URIs (`file:…`) and `:memory:` name no directory of ours to create.
    if path == ":memory:" || path.starts_with("file:") {
        return Ok(());
    }
    match Path::new(path).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Url {
                url: path.to_string(),
                reason: format!("cannot create directory {}: {e}", dir.display()),
            })
        }
        _ => Ok(()),
    }
}

fn open_reader(path: &str) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Read-write flags with query_only rather than a read-only open: a read-only
    // connection cannot always use the WAL's shared-memory file.
    conn.execute_batch("PRAGMA query_only = ON; PRAGMA cache_size = -16384;")?;
    stable_plans(&conn)?;
    Ok(conn)
}

/// Turns on the query planner stability guarantee: without it, SQLite (built with STAT4)
/// re-prepares a cached statement whenever a bound value might change its plan, which
/// made parsing SQL the largest cost of sealing (measured: a quarter of its CPU).
fn stable_plans(conn: &Connection) -> Result<()> {
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<()> {
    // Up to date needs no lock: a process opening the store while collectors commit
    // back to back would otherwise wait for the write lock, and could time out.
    let has_table: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'schema_migrations')",
        [],
        |r| r.get(0),
    )?;
    if has_table {
        let newest: Option<i64> =
            conn.query_row("SELECT max(version) FROM schema_migrations", [], |r| {
                r.get(0)
            })?;
        migrations::check_not_newer(newest, MIGRATIONS)?;
        if newest == Some(i64::from(migrations::latest(MIGRATIONS))) {
            return Ok(());
        }
    }
    for m in MIGRATIONS {
        // IMMEDIATE takes the write lock up front, so two processes opening the same new
        // file apply each migration once.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    INTEGER PRIMARY KEY,
                 applied_at TEXT NOT NULL
             )",
        )?;
        let newest: Option<i64> =
            tx.query_row("SELECT max(version) FROM schema_migrations", [], |r| {
                r.get(0)
            })?;
        migrations::check_not_newer(newest, MIGRATIONS)?;
        let applied: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = ?1)",
            [m.version],
            |r| r.get(0),
        )?;
        if !applied {
            tx.execute_batch(m.sql).map_err(|e| StoreError::Migration {
                version: m.version,
                reason: e.to_string(),
            })?;
            if m.version == 4 {
                chunked::convert_v3(&tx).map_err(|e| StoreError::Migration {
                    version: m.version,
                    reason: format!("moving readings into chunks: {e}"),
                })?;
            }
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at)
                 VALUES (?1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
                [m.version],
            )?;
            tracing::info!(version = m.version, "applied sqlite migration");
        }
        tx.commit()?;
    }
    Ok(())
}

/// One reading, reduced to what the writer thread needs: no strings, so a batch crosses
/// to the blocking pool without a per-reading allocation.
struct Row {
    series: SeriesRef,
    ts: i64,
    seq: i64,
    value: f64,
    /// Index into [`Rows::qualities`], or [`NO_QUALITY`].
    quality: u32,
}

/// A batch ready for the writer thread.
struct Rows {
    rows: Vec<Row>,
    /// The distinct quality flags of the batch (there are a handful at most).
    qualities: Vec<String>,
    pending: Vec<Pending>,
}

impl Rows {
    fn new(batch: &[Record], plan: Plan) -> Result<Rows> {
        let mut interned: HashMap<&str, u32> = HashMap::new();
        let mut qualities = Vec::new();
        let mut rows = Vec::with_capacity(batch.len());
        for (record, series) in batch.iter().zip(plan.refs) {
            let r = &record.reading;
            let quality = match r.quality.as_deref() {
                None => NO_QUALITY,
                Some(q) => *interned.entry(q).or_insert_with(|| {
                    qualities.push(q.to_string());
                    // A batch cannot hold anywhere near u32::MAX distinct strings.
                    u32::try_from(qualities.len() - 1).unwrap_or(NO_QUALITY)
                }),
            };
            rows.push(Row {
                series,
                ts: r.ts.as_micros(),
                seq: i64::try_from(record.seq)
                    .map_err(|_| StoreError::Invalid(format!("sequence {}", record.seq)))?,
                value: r.value,
                quality,
            });
        }
        Ok(Rows {
            rows,
            qualities,
            pending: plan.pending,
        })
    }
}

/// Writes a batch in one transaction: series, then the new readings into the hot area
/// (see `chunked.rs`). Returns how many readings were new.
fn write_rows(inner: &Inner, conn: &mut Connection, batch: Rows) -> Result<u64> {
    let Rows {
        mut rows,
        qualities,
        pending,
    } = batch;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let resolved = resolve_series(&tx, &pending)?;
    let created: HashSet<i64> = resolved
        .iter()
        .filter(|r| r.created)
        .map(|r| r.id)
        .collect();
    for row in &mut rows {
        row.series = SeriesRef::Id(Plan::id(row.series, &resolved));
    }
    // Two rows with one (series, ts, seq) are copies of one reading (one stream message
    // delivered twice), equal in value: any order of them will do.
    rows.sort_unstable_by_key(|r| (Plan::id(r.series, &resolved), r.ts, r.seq));
    let mut groups: Vec<chunked::Group> = Vec::new();
    for row in &rows {
        let series = Plan::id(row.series, &resolved);
        let point = Pt {
            ts: row.ts,
            seq: row.seq,
            value: row.value,
            quality: qualities.get(row.quality as usize).cloned(),
        };
        match groups.last_mut() {
            Some(g) if g.series == series => {
                if g.points.last().map(Pt::key) != Some(point.key()) {
                    g.points.push(point);
                }
            }
            _ => groups.push(chunked::Group {
                series,
                created: created.contains(&series),
                points: vec![point],
            }),
        }
    }
    let mut newest = inner
        .newest
        .lock()
        .map_err(|_| StoreError::Task("sqlite newest-reading mutex poisoned".into()))?;
    let (new, committed) = chunked::write(&tx, &mut newest, groups)?;
    tx.commit()?;
    let (points, write_id) = (committed.points, committed.write_id);
    committed.apply(&mut newest);
    // Still under the writer lock, so the cache learns series in commit order.
    inner.series.remember(&pending, &resolved)?;
    if let Some(sealer) = inner.sealer.get() {
        sealer.wrote(write_id, points);
    }
    Ok(new)
}

/// Finds, creates or updates the batch's pending series, inside the write transaction.
///
/// A series the cache does not know is most often new (a fleet's first readings), so it is
/// inserted first, and looked up only when the unique key says it exists: one index probe
/// for a new series instead of two. No `RETURNING`: SQLite gathers its rows in an
/// ephemeral table, opened and closed per statement, which cost more than the insert.
fn resolve_series(tx: &Connection, pending: &[Pending]) -> Result<Vec<Resolved>> {
    let mut out = Vec::with_capacity(pending.len());
    if pending.is_empty() {
        return Ok(out);
    }
    let mut insert = tx.prepare_cached(
        "INSERT INTO series (device, sensor, unit, tags) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (device, sensor, tags) DO NOTHING",
    )?;
    let mut select = tx.prepare_cached(
        "SELECT id, unit FROM series WHERE device = ?1 AND sensor = ?2 AND tags = ?3",
    )?;
    let mut update = tx.prepare_cached("UPDATE series SET unit = ?2 WHERE id = ?1")?;
    for p in pending {
        let inserted = insert.execute(params![
            p.device.as_str(),
            p.sensor.as_str(),
            p.unit,
            p.tags_json
        ])?;
        if inserted == 1 {
            out.push(p.created(tx.last_insert_rowid()));
            continue;
        }
        let (id, unit) = select.query_row(
            params![p.device.as_str(), p.sensor.as_str(), p.tags_json],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<String>>(1)?)),
        )?;
        let merged = p.merge(id, unit);
        if merged.changed {
            update.execute(params![id, merged.resolved.unit])?;
        }
        out.push(merged.resolved);
    }
    Ok(out)
}

/// The id of the series `(device, sensor, tags JSON)`, if stored.
fn series_id(conn: &Connection, device: &str, sensor: &str, tags: &str) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached("SELECT id FROM series WHERE device = ?1 AND sensor = ?2 AND tags = ?3")?
        .query_row(params![device, sensor, tags], |r| r.get(0))
        .optional()?)
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn snapshot_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, i64, String)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
}

fn parse_values(device: &str, json: &str) -> Result<std::collections::BTreeMap<String, f64>> {
    serde_json::from_str(json).map_err(|e| {
        StoreError::Task(format!(
            "snapshot of {device:?} holds malformed values: {e}"
        ))
    })
}

/// Records a table's retention horizon (`?1` its name, `?2` Unix µs); it never moves back.
const RECORD_HORIZON: &str = "INSERT INTO retention_horizons (name, horizon) VALUES (?1, ?2)
     ON CONFLICT (name) DO UPDATE SET horizon = max(horizon, excluded.horizon)
     RETURNING horizon";

// One prune chunk: at most `?3` rows older than `?2`. Rollups are walked series by series
// from series id `?1` on, along their primary key (`CROSS JOIN` keeps `series` the outer
// loop), and return the series of each deleted row, so that the next chunk starts where
// this one stopped. Snapshots are walked along their `ts` index.
macro_rules! prune_rollups {
    ($table:literal, $bucket:literal) => {
        concat!(
            "DELETE FROM ",
            $table,
            " WHERE (series_id, ",
            $bucket,
            ") IN (
                 SELECT r.series_id, r.",
            $bucket,
            " FROM series s CROSS JOIN ",
            $table,
            " r
                     ON r.series_id = s.id
                 WHERE s.id >= ?1 AND r.",
            $bucket,
            " < ?2 ORDER BY s.id LIMIT ?3)
             RETURNING series_id"
        )
    };
}
const PRUNE_ROLLUPS: &str = prune_rollups!("rollups_1m", "minute");
const PRUNE_HOURS: &str = prune_rollups!("rollups_1h", "hour");
// Need no cursor: return `?1` back.
const PRUNE_SNAPSHOTS: &str = "DELETE FROM snapshots WHERE (ts, device) IN (
         SELECT ts, device FROM snapshots WHERE ts < ?2 ORDER BY ts LIMIT ?3)
     RETURNING ?1";
const PRUNE_SNAPSHOT_TICKS: &str = "DELETE FROM snapshot_ticks WHERE ts IN (
         SELECT ts FROM snapshot_ticks WHERE ts < ?2 ORDER BY ts LIMIT ?3)
     RETURNING ?1";

/// Deletes one chunk (`sql`: [`PRUNE_ROLLUPS`], [`PRUNE_HOURS`], [`PRUNE_SNAPSHOTS`] or
/// [`PRUNE_SNAPSHOT_TICKS`]) in one transaction. Returns how many rows it deleted and the last series it reached.
fn prune_chunk(conn: &mut Connection, sql: &str, before: i64, from: i64) -> Result<(u64, i64)> {
    let limit = i64::try_from(crate::PRUNE_CHUNK).unwrap_or(i64::MAX);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let (mut deleted, mut last) = (0u64, from);
    {
        let mut stmt = tx.prepare_cached(sql)?;
        let mut rows = stmt.query(params![from, before, limit])?;
        while let Some(row) = rows.next()? {
            deleted += 1;
            last = last.max(row.get(0)?);
        }
    }
    tx.commit()?;
    Ok((deleted, last))
}

/// The raw horizon stored by the last prune of readings, if any.
fn load_raw_horizon(conn: &Connection) -> Result<Option<i64>> {
    Ok(conn
        .query_row(
            "SELECT horizon FROM retention_horizons WHERE name = ?1",
            [crate::Retained::Readings.table()],
            |r| r.get(0),
        )
        .optional()?)
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn series_index(&self) -> Arc<crate::series_index::SeriesIndex> {
        self.inner.series.index()
    }

    async fn write_readings(&self, batch: &[Record]) -> Result<u64> {
        let admitted = self.admit(batch).await;
        let batch = &admitted[..];
        if batch.is_empty() {
            return Ok(0);
        }
        check_records(batch)?;
        let plan = self.inner.series.plan(batch)?;
        let rows = Rows::new(batch, plan)?;
        if self.inner.sealer.get().is_none() {
            let sealer = Sealer::start(Arc::clone(&self.inner.writer))?;
            // A concurrent first write may have won; its sealer is the one kept.
            let _ = self.inner.sealer.set(sealer);
        }
        self.write(move |inner, conn| write_rows(inner, conn, rows))
            .await
    }

    async fn write_snapshots(&self, rows: &[Snapshot]) -> Result<u64> {
        if rows.is_empty() {
            return Ok(0);
        }
        check_snapshots(rows)?;
        let mut owned = Vec::with_capacity(rows.len());
        for s in rows {
            let values = serde_json::to_string(&s.values)
                .map_err(|e| StoreError::Invalid(format!("snapshot of {:?}: {e}", s.device)))?;
            owned.push((s.device.clone(), s.ts.as_micros(), values));
        }
        // In key order: a tick's rows are appended to the table's last pages.
        owned.sort_unstable_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        self.write(move |_, conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut new = 0u64;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO snapshots (ts, device, \"values\") VALUES (?1, ?2, ?3)
                     ON CONFLICT DO NOTHING",
                )?;
                let mut tick = tx.prepare_cached(
                    "INSERT INTO snapshot_ticks (ts) VALUES (?1) ON CONFLICT DO NOTHING",
                )?;
                let mut last_tick = None;
                for (device, ts, values) in &owned {
                    new += insert.execute(params![ts, device, values])? as u64;
                    if last_tick != Some(*ts) {
                        tick.execute([ts])?;
                        last_tick = Some(*ts);
                    }
                }
            }
            tx.commit()?;
            Ok(new)
        })
        .await
    }

    async fn series(&self, device: &str, sensor: Option<&str>) -> Result<Vec<SeriesInfo>> {
        let (device, sensor) = (device.to_string(), sensor.map(str::to_string));
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT device, sensor, tags, unit FROM series
                 WHERE device = ?1 AND (?2 IS NULL OR sensor = ?2)
                 ORDER BY sensor, tags
                 LIMIT ?3",
            )?;
            let rows = stmt.query_map(
                params![device, sensor, limit_param(MAX_SERIES_LISTED)],
                |r| {
                    Ok(SeriesInfo {
                        device: r.get(0)?,
                        sensor: r.get(1)?,
                        tags: tags_from_json(&r.get::<_, String>(2)?).into(),
                        unit: r.get(3)?,
                    })
                },
            )?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn series_history(
        &self,
        key: &SeriesKey<'_>,
        range: Range,
        limit: usize,
    ) -> Result<Vec<Point>> {
        let (device, sensor, tags) = (
            key.device.to_string(),
            key.sensor.to_string(),
            key.tags_json(),
        );
        self.read(move |conn| {
            // One read transaction: a seal committing between the two reads of
            // `series_points` could otherwise hide or double readings.
            let tx = conn.unchecked_transaction()?;
            let Some(series) = series_id(&tx, &device, &sensor, &tags)? else {
                return Ok(Vec::new());
            };
            let mut points =
                chunked::series_points(&tx, series, range.from.as_micros(), range.to.as_micros())?;
            points.truncate(limit);
            Ok(points
                .into_iter()
                .map(|p| Point {
                    ts: Timestamp::from_micros(p.ts),
                    value: p.value,
                    quality: p.quality,
                })
                .collect())
        })
        .await
    }

    async fn series_rollups_at(
        &self,
        key: &SeriesKey<'_>,
        range: Range,
        resolution: Resolution,
    ) -> Result<Vec<Rollup>> {
        let (device, sensor, tags) = (
            key.device.to_string(),
            key.sensor.to_string(),
            key.tags_json(),
        );
        let (from, to) = (range.from.as_micros(), range.to.as_micros());
        let sql = match resolution {
            Resolution::Minute => {
                "SELECT minute, count, sum, min, max, last, last_ts, last_seq FROM rollups_1m
                 WHERE series_id = ?1 AND minute >= ?2 AND minute < ?3
                 ORDER BY minute"
            }
            Resolution::Hour => {
                "SELECT hour, count, sum, min, max, last, last_ts, last_seq FROM rollups_1h
                 WHERE series_id = ?1 AND hour >= ?2 AND hour < ?3
                 ORDER BY hour"
            }
        };
        self.read(move |conn| {
            let tx = conn.unchecked_transaction()?;
            let Some(series) = series_id(&tx, &device, &sensor, &tags)? else {
                return Ok(Vec::new());
            };
            // The sealed readings' rollups, as stored, oldest first.
            let mut buckets: Vec<chunked::Agg> = tx
                .prepare_cached(sql)?
                .query_map(params![series, from, to], |r| {
                    Ok(chunked::Agg {
                        start: r.get(0)?,
                        count: r.get(1)?,
                        sum: r.get(2)?,
                        min: r.get(3)?,
                        max: r.get(4)?,
                        last: r.get(5)?,
                        last_key: (r.get(6)?, r.get(7)?),
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            // Plus the hot readings of those buckets, not folded in yet (a few seconds'
            // worth: they go into the sorted list by search).
            let mut hot = Vec::new();
            let span_end = to.saturating_add(resolution.micros());
            chunked::hot_series_points(&tx, series, from, span_end, &mut hot)?;
            hot.retain(|p| {
                let b = resolution.start_of(p.ts);
                b >= from && b < to
            });
            hot.sort_unstable_by_key(Pt::key);
            for a in chunked::by_bucket(&hot, resolution) {
                match buckets.binary_search_by_key(&a.start, |b| b.start) {
                    Ok(i) => buckets[i].merge(&a),
                    Err(i) => buckets.insert(i, a),
                }
            }
            Ok(buckets
                .into_iter()
                .map(|a| Rollup {
                    start: Timestamp::from_micros(a.start),
                    count: u64::try_from(a.count).unwrap_or(0),
                    min: a.min,
                    max: a.max,
                    avg: a.sum / a.count as f64,
                    last: a.last,
                })
                .collect())
        })
        .await
    }

    async fn snapshots(
        &self,
        device: Option<&str>,
        range: Range,
        limit: usize,
    ) -> Result<Vec<Snapshot>> {
        let device = device.map(str::to_string);
        let (from, to, limit) = (
            range.from.as_micros(),
            range.to.as_micros(),
            limit_param(limit),
        );
        self.read(move |conn| {
            // One device: a seek per tick written in the range (`CROSS JOIN` keeps the
            // ticks the outer loop); all: the range of the table.
            let rows = match &device {
                Some(d) => conn
                    .prepare_cached(
                        "SELECT s.device, s.ts, s.\"values\"
                         FROM snapshot_ticks t CROSS JOIN snapshots s
                             ON s.ts = t.ts AND s.device = ?1
                         WHERE t.ts >= ?2 AND t.ts < ?3
                         ORDER BY t.ts LIMIT ?4",
                    )?
                    .query_map(params![d, from, to, limit], snapshot_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?,
                None => conn
                    .prepare_cached(
                        "SELECT device, ts, \"values\" FROM snapshots
                         WHERE ts >= ?1 AND ts < ?2
                         ORDER BY ts, device LIMIT ?3",
                    )?
                    .query_map(params![from, to, limit], snapshot_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?,
            };
            rows.into_iter()
                .map(|(device, ts, values)| {
                    let values = parse_values(&device, &values)?;
                    Ok(Snapshot {
                        device,
                        ts: Timestamp::from_micros(ts),
                        values,
                    })
                })
                .collect()
        })
        .await
    }

    async fn count_readings(&self) -> Result<u64> {
        self.read(|conn| {
            let tx = conn.unchecked_transaction()?;
            chunked::count(&tx)
        })
        .await
    }

    async fn prune_readings(&self, before: Timestamp) -> Result<u64> {
        Ok(self.prune(crate::Retained::Readings, before).await?.deleted)
    }

    async fn prune(&self, what: crate::Retained, before: Timestamp) -> Result<crate::PruneReport> {
        let before = before.as_micros();
        let mut report = crate::PruneReport::default();
        // The horizon first: from then on, writes skip what this prune deletes.
        let (horizon, pause) = self
            .write(move |_, conn| {
                let start = std::time::Instant::now();
                let horizon: i64 =
                    conn.query_row(RECORD_HORIZON, params![what.table(), before], |r| r.get(0))?;
                Ok((horizon, start.elapsed()))
            })
            .await?;
        report.chunk(0, pause);
        if what == crate::Retained::Readings {
            self.horizon.advance(Some(horizon));
        }
        if what == crate::Retained::Readings {
            // Hot readings first go into chunks, where whole days are dropped; then days
            // older than `before`'s, then the chunks of its day that start before it, a
            // few at a time.
            let writer = Arc::clone(&self.inner.writer);
            blocking(move || seal_all(&writer, || i64::MAX)).await?;
            loop {
                let step = self
                    .write(move |_, conn| {
                        let start = std::time::Instant::now();
                        let step = chunked::prune_step(conn, before, PRUNE_CHUNKS)?;
                        Ok(step.map(|(deleted, _)| (deleted, start.elapsed())))
                    })
                    .await?;
                match step {
                    Some((deleted, pause)) => report.chunk(deleted, pause),
                    None => return Ok(report),
                }
            }
        }
        // One short transaction per chunk; the writer lock is released in between, so
        // the collectors' commits wait for one chunk at most. An hour goes once it is
        // wholly before `before`. The list of ticks is an index: its rows are not counted.
        let walks: &[(&'static str, i64, bool)] = match what {
            crate::Retained::Readings => &[],
            crate::Retained::Rollups => &[
                (PRUNE_ROLLUPS, before, true),
                (PRUNE_HOURS, Resolution::Hour.start_of(before), true),
            ],
            crate::Retained::Snapshots => &[
                (PRUNE_SNAPSHOTS, before, true),
                (PRUNE_SNAPSHOT_TICKS, before, false),
            ],
        };
        for &(sql, before, counted) in walks {
            let mut from = i64::MIN;
            loop {
                let (deleted, last, pause) = self
                    .write(move |_, conn| {
                        let start = std::time::Instant::now();
                        let (deleted, last) = prune_chunk(conn, sql, before, from)?;
                        Ok((deleted, last, start.elapsed()))
                    })
                    .await?;
                report.chunk(if counted { deleted } else { 0 }, pause);
                if deleted < crate::PRUNE_CHUNK {
                    break;
                }
                from = last;
            }
        }
        Ok(report)
    }

    async fn compact(&self) -> Result<()> {
        let writer = Arc::clone(&self.inner.writer);
        blocking(move || seal_all(&writer, || i64::MAX)).await
    }

    async fn raw_horizon(&self) -> Result<Option<Timestamp>> {
        let stored = self.read(load_raw_horizon).await?;
        self.horizon.advance(stored);
        Ok(self.horizon.get())
    }

    async fn ping(&self) -> Result<()> {
        self.read(|conn| {
            conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_checkpointer_thread_copies_the_wal_into_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.db");
        let store = SqliteStore::open(path.to_str().unwrap()).await.unwrap();
        let auto: i64 = store
            .inner
            .writer()
            .unwrap()
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .unwrap();
        assert_eq!(auto, 0, "commits must not checkpoint themselves");
        let before = std::fs::metadata(&path).unwrap().len();
        let records: Vec<Record> = (0..5000u64)
            .map(|i| Record {
                seq: i + 1,
                reading: fleetpipe_proto::Reading {
                    device: format!("d{}", i % 500).into(),
                    sensor: "speed".into(),
                    value: i as f64,
                    ts: Timestamp::from_micros(1_700_000_000_000_000 + i as i64),
                    unit: None,
                    quality: None,
                    tags: Default::default(),
                },
            })
            .collect();
        store.write_readings(&records).await.unwrap();
        // Only a checkpoint grows the database file; the commit went to the WAL.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::fs::metadata(&path).unwrap().len() <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(store.count_readings().await.unwrap(), 5000);
    }

    /// Late readings that reach past the start of a later chunk are merged with it, so a
    /// series' chunks never overlap; reads stay in order either way.
    #[tokio::test]
    async fn late_readings_keep_chunks_apart() {
        const SEC: i64 = 1_000_000;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.db");
        let store = SqliteStore::open(path.to_str().unwrap()).await.unwrap();
        let record = |seq: u64, ts: i64| Record {
            seq,
            reading: fleetpipe_proto::Reading {
                device: "d".into(),
                sensor: "s".into(),
                value: ts as f64,
                ts: fleetpipe_proto::Timestamp::from_micros(ts),
                unit: None,
                quality: None,
                tags: Vec::new().into(),
            },
        };
        // The last minute of one day, then the first minute of the next, sealed apart
        // (chunks never span a day): two chunks.
        let day = 1_771_200_000 * SEC - 1_771_200_000 * SEC % chunked::DAY;
        let before: Vec<Record> = (0..60)
            .map(|i| record(1 + i, day - (60 - i as i64) * SEC))
            .collect();
        let after: Vec<Record> = (0..60)
            .map(|i| record(100 + i, day + 30 * SEC + i as i64 * SEC))
            .collect();
        store.write_readings(&before).await.unwrap();
        store.compact().await.unwrap();
        store.write_readings(&after).await.unwrap();
        store.compact().await.unwrap();
        // Late: between them, up to past the later chunk's start.
        let late: Vec<Record> = (0..60)
            .map(|i| record(200 + i, day - 500_000 + i as i64 * SEC))
            .collect();
        store.write_readings(&late).await.unwrap();
        store.compact().await.unwrap();
        let conn = Connection::open(&path).unwrap();
        let spans: Vec<(i64, i64)> = conn
            .prepare("SELECT start_ts, end_ts FROM chunks ORDER BY start_ts")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<std::result::Result<_, _>>()
            .unwrap();
        assert!(
            spans.windows(2).all(|w| w[0].1 < w[1].0),
            "chunks overlap: {spans:?}"
        );
        let history = store
            .history(
                "d",
                "s",
                crate::Range {
                    from: fleetpipe_proto::Timestamp::from_micros(day - chunked::DAY),
                    to: fleetpipe_proto::Timestamp::from_micros(day + chunked::DAY),
                },
                1000,
            )
            .await
            .unwrap();
        assert_eq!(history.len(), 180);
        assert!(history.windows(2).all(|w| w[0].ts < w[1].ts));
    }

    #[tokio::test]
    async fn the_wal_starts_over_under_constant_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.db");
        let store = SqliteStore::open(path.to_str().unwrap()).await.unwrap();
        let wal = dir.path().join("fleet.db-wal");
        // The WAL header's checkpoint sequence number (bytes 12..16, big-endian) counts the
        // times the WAL started over.
        let restarts = || -> u32 {
            let header = std::fs::read(&wal).unwrap_or_default();
            header
                .get(12..16)
                .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        // Back-to-back commits of 20,000 readings with values that do not compress, for
        // several checkpoint intervals: well over the frames after which the checkpointer
        // makes the WAL start over.
        let started = std::time::Instant::now();
        let mut commits = 0u64;
        let mut bits = 0x9e37_79b9_7f4a_7c15u64;
        let mut first = None;
        while started.elapsed() < CHECKPOINT_EVERY * 6 {
            let records: Vec<Record> = (0..20_000u64)
                .map(|i| {
                    bits ^= bits << 13;
                    bits ^= bits >> 7;
                    bits ^= bits << 17;
                    Record {
                        seq: commits * 20_000 + i + 1,
                        reading: fleetpipe_proto::Reading {
                            device: format!("d{}", i % 500).into(),
                            sensor: "speed".into(),
                            value: f64::from_bits(bits >> 2),
                            ts: Timestamp::from_micros(
                                1_700_000_000_000_000 + (commits * 40 + i / 500) as i64,
                            ),
                            unit: None,
                            quality: None,
                            tags: Default::default(),
                        },
                    }
                })
                .collect();
            store.write_readings(&records).await.unwrap();
            store.compact().await.unwrap();
            first.get_or_insert_with(restarts);
            commits += 1;
        }
        let (before, after) = (first.unwrap_or(0), restarts());
        assert!(
            after > before,
            "the WAL never started over in {commits} commits (checkpoint sequence {before} → {after})"
        );
        let size = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        assert!(
            size <= 2 * WAL_SIZE_LIMIT as u64,
            "the WAL file holds {size} bytes"
        );
    }

    /// Two writes committed out of order (the later one holds the older readings): a round
    /// of the first seals the second's rows of its series along, so neither is late data;
    /// readings older than what is sealed still merge in.
    #[tokio::test]
    async fn a_seal_takes_along_later_writes_of_older_readings() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("fleet.db").to_str().unwrap())
            .await
            .unwrap();
        let records = |seqs: std::ops::Range<u64>, ts0: i64| -> Vec<Record> {
            seqs.enumerate()
                .map(|(i, seq)| Record {
                    seq,
                    reading: fleetpipe_proto::Reading {
                        device: "d1".into(),
                        sensor: "speed".into(),
                        value: seq as f64,
                        ts: Timestamp::from_micros(1_700_000_000_000_000 + ts0 + i as i64),
                        unit: None,
                        quality: None,
                        tags: Default::default(),
                    },
                })
                .collect()
        };
        store.write_readings(&records(101..111, 10)).await.unwrap();
        store.write_readings(&records(1..11, 0)).await.unwrap();
        let seal_first_write = || {
            let mut conn = store.inner.writer().unwrap();
            let first: i64 = conn
                .query_row("SELECT min(id) FROM hot_writes", [], |r| r.get(0))
                .unwrap();
            let round = chunked::plan_round(&conn, SEAL_TX_POINTS, SEAL_TX_SERIES, first + 1)
                .unwrap()
                .unwrap();
            assert_eq!((round.upto, round.writes), (first, 1));
            let (lo, hi) = round.groups[0];
            chunked::seal_group(&mut conn, &round, lo, hi).unwrap()
        };
        let sealed = seal_first_write();
        assert_eq!((sealed.points, sealed.late, sealed.writes), (20, 0, 2));
        let hot: i64 = store
            .inner
            .writer()
            .unwrap()
            .query_row("SELECT count(*) FROM hot", [], |r| r.get(0))
            .unwrap();
        assert_eq!(hot, 0);
        // Inside the span already sealed: merged into the chunk.
        store.write_readings(&records(201..206, 5)).await.unwrap();
        let sealed = seal_first_write();
        assert_eq!((sealed.points, sealed.late), (5, 1));
        assert_eq!(store.count_readings().await.unwrap(), 25);
    }

    #[test]
    fn recent_writes_are_held_for_a_while() {
        let recent = Recent::default();
        assert_eq!(recent.held_from(), i64::MAX);
        recent.committed(7);
        recent.committed(8);
        assert_eq!(recent.held_from(), 7);
        let mut log = recent.0.lock().unwrap();
        Recent::forget_old(&mut log, Instant::now() + SEAL_HOLD);
        assert!(log.is_empty());
    }

    #[tokio::test]
    async fn writer_is_wal_with_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/fleet.db");
        let store = SqliteStore::open(path.to_str().unwrap()).await.unwrap();
        let conn = store.inner.writer().unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(sync, 2, "synchronous = FULL");
    }

    #[tokio::test]
    async fn one_device_snapshots_are_a_seek_per_tick() {
        let store = SqliteStore::open(":memory:").await.unwrap();
        let conn = store.inner.writer().unwrap();
        let plan: Vec<String> = conn
            .prepare(
                "EXPLAIN QUERY PLAN SELECT s.device, s.ts, s.\"values\"
                 FROM snapshot_ticks t CROSS JOIN snapshots s
                     ON s.ts = t.ts AND s.device = ?1
                 WHERE t.ts >= ?2 AND t.ts < ?3
                 ORDER BY t.ts LIMIT ?4",
            )
            .unwrap()
            .query_map(params!["d", 0, 10, 10], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            plan,
            [
                "SEARCH t USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)",
                "SEARCH s USING PRIMARY KEY (ts=? AND device=?)"
            ]
        );
    }

    #[tokio::test]
    async fn prune_chunks_walk_the_keys() {
        let store = SqliteStore::open(":memory:").await.unwrap();
        let conn = store.inner.writer().unwrap();
        let cases = [
            (
                PRUNE_ROLLUPS,
                "r USING PRIMARY KEY (series_id=? AND minute<?)",
            ),
            (PRUNE_HOURS, "r USING PRIMARY KEY (series_id=? AND hour<?)"),
            (PRUNE_SNAPSHOTS, "snapshots USING PRIMARY KEY (ts<?)"),
            (
                PRUNE_SNAPSHOT_TICKS,
                "snapshot_ticks USING INTEGER PRIMARY KEY (rowid<?)",
            ),
        ];
        for (sql, walk) in cases {
            let plan: Vec<String> = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map(params![0, 0, 10], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            assert!(plan.iter().any(|step| step.contains(walk)), "{plan:?}");
            // Every table access is a search: no chunk scans a table.
            assert!(
                !plan.iter().any(|step| step.starts_with("SCAN")),
                "{plan:?}"
            );
        }
    }
}
