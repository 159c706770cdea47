//! The raw-readings layout of the embedded store (schema version 4): a hot area that
//! takes each write as a few consecutive rows, sealed into per-series chunks.
//!
//! **Write** (`write`, under the writer lock, one transaction): a batch's readings are
//! grouped by series and sorted; readings already stored are dropped; what is left goes to
//! `hot` as one row per series, all keyed by the write's id, so the rows of a write are
//! consecutive keys and a commit dirties a few pages, not one per series. Rollups are not
//! touched: reads add the hot readings themselves, the sealer folds them in.
//!
//! **Exactly once**: this process remembers, per series, the newest `(ts, seq)` stored
//! and the newest when it learned the series (its base, rounded up to the second), and the stream sequences of the
//! messages it wrote readings of ([`Newest`]). A reading newer than the newest cannot be
//! stored yet, so in-order data costs a map lookup; one between the base and the newest
//! from a message this process never wrote is new too (only this process wrote past the
//! base): two fetch workers' batches of one device interleaving cost no lookup. The rest
//! (a redelivery, data older than the base) is checked against what is stored in its time
//! span, chunks and hot rows. All of it is forgotten when another process wrote since
//! this one last did (`store_meta.generation`), and a series this process has not written
//! is looked up once (a series created by the write has nothing stored).
//!
//! **Seal** (`seal`, on the sealer thread, one transaction): the oldest hot writes are
//! read, grouped per series, folded into `rollups_1m`, and placed into chunks: appended to
//! the series' newest chunk while it has room and is of the same day (SQL concatenation of
//! the encoded readings: the chunk is not decoded), merged with the chunks they overlap
//! otherwise (late data), then the hot rows are deleted. A crash at any point
//! leaves either the hot rows or the chunks, never both or neither.
//!
//! **Read**: a series' chunks in the range (they never span a day, so the index bounds the
//! search) plus its hot rows (one seek per hot write whose span meets the range), in one
//! read transaction so that a seal committing meanwhile cannot hide or double a reading.

use std::collections::{HashMap, HashSet};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::chunk::{self, Pt};
use crate::{Resolution, Result};

/// Most readings in a chunk.
pub(super) const CHUNK_POINTS: usize = 1024;

/// A seal appends to a series' newest chunk only while it holds fewer readings than this:
/// SQLite rewrites a whole row to extend it, so appending to a large chunk would write it
/// again and again (measured: 190 bytes of WAL per reading with 1,024). Past it, a seal
/// starts a new chunk.
const APPEND_BELOW: usize = 128;

/// Unix microseconds in a day: chunks never span two UTC days, so retention deletes
/// whole days.
pub(super) const DAY: i64 = 86_400_000_000;

pub(super) fn day_of(ts: i64) -> i64 {
    ts - ts.rem_euclid(DAY)
}

/// Column `i` of `row`, a blob.
fn blob<'a>(row: &'a rusqlite::Row<'_>, i: usize) -> Result<&'a [u8]> {
    row.get_ref(i)?
        .as_blob()
        .map_err(|e| crate::StoreError::Task(format!("chunk column {i} is not a blob: {e}")))
}

/// What this process knows of the readings stored (see the module docs).
#[derive(Default)]
pub(super) struct Newest {
    map: BySeries,
    /// Stream sequences of the readings this process wrote since `map` was last emptied.
    written: Seqs,
    /// `store_meta.generation` after this process's last write.
    generation: i64,
}

/// One series as this process knows it: nothing stored is newer than `newest`, and what
/// is newer than `base` was written by this process (`base` was the newest when it
/// learned the series, or nothing for one it created).
#[derive(Debug, Clone, Copy)]
struct Known {
    base: Base,
    newest: (i64, i64),
}

/// [`Known::base`] in 4 bytes (a series' entry is 24 bytes, not 32): the key of a whole
/// second at or after it, in Unix time from 1970 to 2106. Rounding up only shrinks the
/// span taken as written by this process alone, which costs at worst a lookup, never a
/// wrong answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Base(u32);

impl Base {
    /// Nothing stored when the series was learned: all of it is this process's.
    const NOTHING: Base = Base(0);
    /// Beyond 2106: nothing is taken as this process's alone.
    const ALL: Base = Base(u32::MAX);

    const SECOND: i64 = 1_000_000;

    /// The base for what was the newest stored, `key`.
    fn at_or_after(key: (i64, i64)) -> Base {
        if key == NOTHING {
            return Base::NOTHING;
        }
        let (ts, _) = key;
        let second = ts.div_euclid(Self::SECOND) + i64::from(ts.rem_euclid(Self::SECOND) != 0);
        // Before 1970: 1970 is after it.
        match u32::try_from(second.max(0) + 1) {
            Ok(n) if n < u32::MAX => Base(n),
            _ => Base::ALL,
        }
    }

    /// The `(ts, seq)` it stands for: at or after the one it was made from.
    fn key(self) -> (i64, i64) {
        match self {
            Base::NOTHING => NOTHING,
            Base::ALL => (i64::MAX, i64::MAX),
            Base(n) => ((i64::from(n) - 1) * Self::SECOND, i64::MAX),
        }
    }
}

/// [`Known`] per series id. Series ids are SQLite rowids, handed out in order and never
/// deleted, so a vector indexed by id holds them densely: 24 bytes a series, where a hash
/// map took 41 at best and twice that while it grew (2.6 million series: 62 MB instead of
/// 172 MB, and no doubling). An id that would leave the vector mostly empty (a row
/// inserted by hand with a huge id) goes to a map instead; once the vector has grown past
/// it, its map entry is no longer read, which only forgets it (a forgotten series costs
/// one lookup of what is stored, never a wrong answer).
#[derive(Default)]
struct BySeries {
    dense: Vec<Known>,
    sparse: HashMap<i64, Known>,
}

impl BySeries {
    /// Marks a free slot of `dense`: no stored reading has this newest key, as timestamps
    /// stop one microsecond short of `i64::MAX` (`series::MAX_TS_MICROS`).
    const FREE: Known = Known {
        base: Base::ALL,
        newest: (i64::MAX, i64::MAX),
    };

    /// Largest `dense` may grow for `id`: twice what it holds plus some room.
    fn dense_index(&self, id: i64) -> Option<usize> {
        let index = usize::try_from(id).ok()?;
        (index < self.dense.len().saturating_mul(2) + 65_536).then_some(index)
    }

    fn get(&self, id: i64) -> Option<Known> {
        match self.dense_index(id) {
            Some(i) => self
                .dense
                .get(i)
                .copied()
                .filter(|k| k.newest != Self::FREE.newest),
            None => self.sparse.get(&id).copied(),
        }
    }

    fn insert(&mut self, id: i64, known: Known) {
        match self.dense_index(id) {
            Some(i) => {
                if i >= self.dense.len() {
                    self.dense.resize(i + 1, Self::FREE);
                }
                self.dense[i] = known;
            }
            None => {
                self.sparse.insert(id, known);
            }
        }
    }

    fn clear(&mut self) {
        self.dense.clear();
        self.sparse.clear();
    }
}

/// Nothing: older than every reading.
const NOTHING: (i64, i64) = (i64::MIN, i64::MIN);

/// A set of stream sequences as disjoint ranges: messages arrive mostly in order, so a
/// few ranges hold millions. Bounded: past [`Seqs::MAX_RANGES`] the lowest range is
/// forgotten, and what is forgotten only costs a lookup later (never a wrong answer:
/// "maybe written" is the safe side).
struct Seqs {
    /// Start → end, both inclusive.
    ranges: std::collections::BTreeMap<i64, i64>,
    /// Sequences at or below it may have been written.
    floor: i64,
}

impl Default for Seqs {
    fn default() -> Self {
        Seqs {
            ranges: Default::default(),
            floor: i64::MIN,
        }
    }
}

impl Seqs {
    const MAX_RANGES: usize = 65_536;

    fn may_contain(&self, seq: i64) -> bool {
        seq <= self.floor
            || self
                .ranges
                .range(..=seq)
                .next_back()
                .is_some_and(|(_, &end)| seq <= end)
    }

    fn insert(&mut self, seq: i64) {
        if self.may_contain(seq) {
            return;
        }
        let below = self
            .ranges
            .range(..seq)
            .next_back()
            .filter(|(_, &end)| end == seq - 1)
            .map(|(&start, _)| start);
        let above = seq.checked_add(1).and_then(|n| self.ranges.remove(&n));
        let start = below.unwrap_or(seq);
        self.ranges.insert(start, above.unwrap_or(seq));
        if self.ranges.len() > Self::MAX_RANGES {
            if let Some((_, end)) = self.ranges.pop_first() {
                self.floor = self.floor.max(end);
            }
        }
    }

    fn clear(&mut self) {
        self.ranges.clear();
        self.floor = i64::MIN;
    }
}

/// One series' share of a write: its readings sorted by `(ts, seq)`, without repeats.
pub(super) struct Group {
    pub series: i64,
    /// Created by this write: nothing of it is stored.
    pub created: bool,
    pub points: Vec<Pt>,
}

/// Writes a batch (see the module docs) in the open transaction `tx`; returns how many
/// readings were new. `newest` is updated only by [`Committed::apply`] once `tx` commits.
pub(super) fn write(
    tx: &Connection,
    newest: &mut Newest,
    groups: Vec<Group>,
) -> Result<(u64, Committed)> {
    let generation: i64 = tx.query_row(
        "SELECT value FROM store_meta WHERE name = 'generation'",
        [],
        |r| r.get(0),
    )?;
    if generation != newest.generation {
        // Another process wrote: what this one remembers may be behind.
        newest.map.clear();
        newest.written.clear();
        newest.generation = generation;
    }
    let mut rows: Vec<(i64, usize, i64, i64, Vec<u8>)> = Vec::with_capacity(groups.len());
    let mut updates = Vec::with_capacity(groups.len());
    let mut seqs = Vec::new();
    let mut new = 0u64;
    let (mut min_ts, mut max_ts) = (i64::MAX, i64::MIN);
    for g in groups {
        let known = match (g.created, newest.map.get(g.series)) {
            (true, _) => Known {
                base: Base::NOTHING,
                newest: NOTHING,
            },
            (false, Some(k)) => k,
            (false, None) => {
                let stored = newest_stored(tx, g.series)?.unwrap_or(NOTHING);
                Known {
                    base: Base::at_or_after(stored),
                    newest: stored,
                }
            }
        };
        let points = only_new(tx, g.series, g.points, known, &newest.written)?;
        let (Some(first), Some(last)) = (points.first(), points.last()) else {
            // Nothing new (a redelivery): still remember what was looked up.
            updates.push((g.series, known));
            continue;
        };
        updates.push((
            g.series,
            Known {
                base: known.base,
                newest: known.newest.max(last.key()),
            },
        ));
        seqs.extend(points.iter().map(|p| p.seq));
        min_ts = min_ts.min(first.ts);
        max_ts = max_ts.max(last.ts);
        new += points.len() as u64;
        rows.push((
            g.series,
            points.len(),
            first.ts,
            last.ts,
            chunk::encode(&points),
        ));
    }
    if rows.is_empty() {
        // Nothing written: no generation to move, only what was looked up to remember.
        return Ok((
            0,
            Committed {
                updates,
                ..Committed::default()
            },
        ));
    }
    let write_id: i64 = tx
        .prepare_cached(
            "INSERT INTO hot_writes (n, min_ts, max_ts) VALUES (?1, ?2, ?3) RETURNING id",
        )?
        .query_row(params![new as i64, min_ts, max_ts], |r| r.get(0))?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO hot (write_id, series_id, n, min_ts, max_ts, data)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for (series, n, first, last, data) in &rows {
            insert.execute(params![write_id, series, *n as i64, first, last, data])?;
        }
    }
    let generation: i64 = tx.query_row(
        "UPDATE store_meta SET value = value + 1 WHERE name = 'generation' RETURNING value",
        [],
        |r| r.get(0),
    )?;
    Ok((
        new,
        Committed {
            generation: Some(generation),
            write_id: Some(write_id),
            updates,
            seqs,
            points: new,
        },
    ))
}

/// What a write teaches [`Newest`], applied once its transaction committed.
#[derive(Default)]
pub(super) struct Committed {
    generation: Option<i64>,
    /// The `hot_writes` id of what it wrote, if it wrote anything.
    pub write_id: Option<i64>,
    updates: Vec<(i64, Known)>,
    /// Stream sequences of the readings it stored.
    seqs: Vec<i64>,
    /// Readings it added to the hot area.
    pub points: u64,
}

impl Committed {
    pub(super) fn apply(self, newest: &mut Newest) {
        if let Some(g) = self.generation {
            newest.generation = g;
        }
        for (series, known) in self.updates {
            newest.map.insert(series, known);
        }
        for seq in self.seqs {
            newest.written.insert(seq);
        }
    }
}

/// `points` (sorted) without those already stored. Newer than `known.newest`: new.
/// Newer than `known.base` from a message this process never wrote a reading of: new
/// too, as only this process wrote readings newer than the base (readings of one message
/// arriving out of order with another message's, two fetch workers racing). The rest is
/// looked up in the store.
fn only_new(
    tx: &Connection,
    series: i64,
    points: Vec<Pt>,
    known: Known,
    written: &Seqs,
) -> Result<Vec<Pt>> {
    let cut = points.partition_point(|p| p.key() <= known.newest);
    let base = known.base.key();
    let doubt = |p: &Pt| p.key() <= base || written.may_contain(p.seq);
    let Some(first) = points[..cut].iter().position(doubt) else {
        return Ok(points);
    };
    let last = points[..cut].iter().rposition(doubt).unwrap_or(first);
    let stored: HashSet<(i64, i64)> = series_points(
        tx,
        series,
        points[first].ts,
        points[last].ts.saturating_add(1),
    )?
    .iter()
    .map(Pt::key)
    .collect();
    let mut out = Vec::with_capacity(points.len());
    for (i, p) in points.into_iter().enumerate() {
        if i >= cut || !doubt(&p) || !stored.contains(&p.key()) {
            out.push(p);
        }
    }
    Ok(out)
}

/// The newest `(ts, seq)` stored for `series`, in chunks or hot rows.
fn newest_stored(conn: &Connection, series: i64) -> Result<Option<(i64, i64)>> {
    let sealed: Option<(i64, i64)> = conn
        .prepare_cached(
            "SELECT end_ts, end_seq FROM chunks WHERE series_id = ?1
             ORDER BY start_ts DESC LIMIT 1",
        )?
        .query_row([series], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let mut top = sealed;
    let mut stmt = conn.prepare_cached(
        "SELECT h.data FROM hot_writes w CROSS JOIN hot h
             ON h.write_id = w.id AND h.series_id = ?1
         WHERE h.max_ts >= ?2",
    )?;
    let mut rows = stmt.query(params![series, top.map_or(i64::MIN, |t| t.0)])?;
    while let Some(row) = rows.next()? {
        let points = chunk::decode(blob(row, 0)?)?;
        if let Some(last) = points.last() {
            top = Some(top.map_or(last.key(), |t| t.max(last.key())));
        }
    }
    Ok(top)
}

/// The readings of `series` with `from <= ts < to`, sorted by `(ts, seq)`: chunks and hot
/// rows. Call inside a transaction (see the module docs).
pub(super) fn series_points(conn: &Connection, series: i64, from: i64, to: i64) -> Result<Vec<Pt>> {
    let mut out = Vec::new();
    if from >= to {
        return Ok(out);
    }
    {
        // A chunk never spans two days, so one that ends at or after `from` starts after
        // `from - DAY`: the index range stays short however old the series.
        let mut stmt = conn.prepare_cached(
            "SELECT data FROM chunks
             WHERE series_id = ?1 AND start_ts > ?2 AND start_ts < ?3 AND end_ts >= ?4
             ORDER BY start_ts",
        )?;
        let mut rows = stmt.query(params![series, from.saturating_sub(DAY), to, from])?;
        while let Some(row) = rows.next()? {
            chunk::decode_into(blob(row, 0)?, &mut out)?;
        }
    }
    let sealed = out.len();
    hot_series_points(conn, series, from, to, &mut out)?;
    out.retain(|p| p.ts >= from && p.ts < to);
    if out.len() > sealed || !out.windows(2).all(|w| w[0].key() < w[1].key()) {
        out.sort_unstable_by_key(Pt::key);
    }
    Ok(out)
}

/// Appends the hot readings of `series` from the hot rows whose span meets
/// `[from, to)` (not filtered further, not sorted).
pub(super) fn hot_series_points(
    conn: &Connection,
    series: i64,
    from: i64,
    to: i64,
    out: &mut Vec<Pt>,
) -> Result<()> {
    let mut stmt = conn.prepare_cached(
        "SELECT h.data FROM hot_writes w CROSS JOIN hot h
             ON h.write_id = w.id AND h.series_id = ?1
         WHERE w.max_ts >= ?2 AND w.min_ts < ?3 AND h.max_ts >= ?2 AND h.min_ts < ?3",
    )?;
    let mut rows = stmt.query(params![series, from, to])?;
    while let Some(row) = rows.next()? {
        chunk::decode_into(blob(row, 0)?, out)?;
    }
    Ok(())
}

/// Readings in the hot area and in chunks.
pub(super) fn count(conn: &Connection) -> Result<u64> {
    let n: i64 = conn.query_row(
        "SELECT (SELECT coalesce(sum(n), 0) FROM chunks) + (SELECT coalesce(sum(n), 0) FROM hot)",
        [],
        |r| r.get(0),
    )?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// What one [`seal`] did.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Sealed {
    pub writes: u64,
    pub points: u64,
    pub series: u64,
    /// Series whose readings were merged into chunks already sealed (late data).
    pub late: u64,
}

/// One seal round: the oldest hot writes, up to about `max_points` readings (at least one
/// write), and the series they hold, cut into groups sealed one transaction each.
pub(super) struct Round {
    /// The newest write the round covers.
    pub upto: i64,
    /// Its writes and readings.
    pub writes: u64,
    pub points: u64,
    /// Inclusive ranges of series ids, each holding at most the group size of them.
    pub groups: Vec<(i64, i64)>,
    /// The hot rows of the [`LATER_WRITES`] writes after `upto`, as `(series, write,
    /// min_ts)` sorted: those of a group's series that overlap what it seals come along.
    pub later: Vec<(i64, i64, i64)>,
}

/// Writes after a round's last that a seal looks at for rows to take along (see
/// [`seal_group`]): a write that commits out of order does so within a few writes, as
/// only the fetch workers and writers of one process race.
const LATER_WRITES: i64 = 8;

/// Plans a round of the writes before `below` (`None`: nothing to seal). Reads only.
pub(super) fn plan_round(
    conn: &Connection,
    max_points: u64,
    group_series: usize,
    below: i64,
) -> Result<Option<Round>> {
    let (mut writes, mut points, mut upto, mut newest) = (0u64, 0u64, None, i64::MIN);
    {
        let mut stmt =
            conn.prepare_cached("SELECT id, n, max_ts FROM hot_writes WHERE id < ?1 ORDER BY id")?;
        let mut rows = stmt.query([below])?;
        while let Some(row) = rows.next()? {
            let (id, n, max_ts): (i64, i64, i64) = (row.get(0)?, row.get(1)?, row.get(2)?);
            if upto.is_some() && points + n as u64 > max_points {
                break;
            }
            upto = Some(id);
            writes += 1;
            points += n as u64;
            newest = newest.max(max_ts);
        }
    }
    let Some(upto) = upto else {
        return Ok(None);
    };
    let mut series: Vec<i64> = conn
        .prepare_cached(
            "SELECT DISTINCT h.series_id FROM hot_writes w CROSS JOIN hot h ON h.write_id = w.id
             WHERE w.id <= ?1",
        )?
        .query_map([upto], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    series.sort_unstable();
    let groups = series
        .chunks(group_series.max(1))
        .map(|g| (g[0], g[g.len() - 1]))
        .collect();
    // Their spans only (reading their data would cost more than the seal itself), and only
    // of writes holding a reading older than the round's newest (in order, none does).
    let mut later: Vec<(i64, i64, i64)> = conn
        .prepare_cached(
            "SELECT h.series_id, h.write_id, h.min_ts FROM
                 (SELECT id, min_ts FROM hot_writes WHERE id > ?1 ORDER BY id LIMIT ?2) w
                 CROSS JOIN hot h ON h.write_id = w.id
             WHERE w.min_ts <= ?3",
        )?
        .query_map([upto, LATER_WRITES, newest], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    later.sort_unstable();
    Ok(Some(Round {
        upto,
        writes,
        points,
        groups,
        later,
    }))
}

/// Moves the hot readings of series `first..=last` from writes up to `upto` into chunks
/// and rollups, in one transaction, and forgets the writes left with no hot rows. A
/// group's readings are its series' alone, so a transaction touches a bounded number of
/// series (the cost of a seal is mostly per series) and a write waits for one group at
/// most. Sealing a group again (another round got there first) finds nothing.
///
/// A later write's rows of these series come along when they hold readings older than the
/// newest sealed: writes commit out of stream order (two writers race, and a fetch
/// worker's batch can take longer to decode than the next one), and such a row sealed in
/// a later round would be late data, merged into chunks already written (measured in lp
/// runs: hundreds to thousands of the 5,000 series in one round out of five). Sealed
/// together, both are appended in order.
pub(super) fn seal_group(
    conn: &mut Connection,
    round: &Round,
    first: i64,
    last: i64,
) -> Result<Sealed> {
    let upto = round.upto;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut report = Sealed::default();
    let mut by_series: HashMap<i64, Vec<Pt>> = HashMap::new();
    {
        let mut stmt = tx.prepare_cached(
            "SELECT h.series_id, h.data FROM hot_writes w CROSS JOIN hot h
                 ON h.write_id = w.id AND h.series_id BETWEEN ?2 AND ?3
             WHERE w.id <= ?1",
        )?;
        let mut rows = stmt.query(params![upto, first, last])?;
        while let Some(row) = rows.next()? {
            let series: i64 = row.get(0)?;
            let points = by_series.entry(series).or_default();
            let before = points.len();
            chunk::decode_into(blob(row, 1)?, points)?;
            report.points += (points.len() - before) as u64;
        }
    }
    let mut later: Vec<(i64, i64)> = Vec::new();
    {
        let mut stmt =
            tx.prepare_cached("SELECT data FROM hot WHERE write_id = ?1 AND series_id = ?2")?;
        let from = round.later.partition_point(|&(series, ..)| series < first);
        // The newest reading this group seals of the candidate's series, taken before any
        // later row of it comes along (candidates are sorted by series).
        let mut newest: Option<(i64, Option<i64>)> = None;
        for &(series, write, min_ts) in &round.later[from..] {
            if series > last {
                break;
            }
            if newest.is_none_or(|(s, _)| s != series) {
                let ts = by_series
                    .get(&series)
                    .and_then(|points| points.iter().map(|p| p.ts).max());
                newest = Some((series, ts));
            }
            if newest.and_then(|(_, ts)| ts).is_none_or(|ts| min_ts > ts) {
                continue;
            }
            let mut rows = stmt.query([write, series])?;
            // Gone if a concurrent seal (a compaction) took it.
            if let Some(row) = rows.next()? {
                let points = by_series.entry(series).or_default();
                let before = points.len();
                chunk::decode_into(blob(row, 0)?, points)?;
                report.points += (points.len() - before) as u64;
                later.push((write, series));
            }
        }
    }
    let mut series: Vec<i64> = by_series.keys().copied().collect();
    series.sort_unstable();
    report.series = series.len() as u64;
    for id in series {
        let mut points = by_series.remove(&id).unwrap_or_default();
        points.sort_unstable_by_key(Pt::key);
        // Hot rows hold no reading twice (writes drop what is stored); a repeat here
        // would mean a bug, and keeping one copy is the right repair.
        points.dedup_by_key(|p| p.key());
        fold_rollups(&tx, id, &points)?;
        if place(&tx, id, points)? {
            report.late += 1;
        }
    }
    tx.prepare_cached(
        "DELETE FROM hot WHERE (write_id, series_id) IN (
             SELECT h.write_id, h.series_id FROM hot_writes w CROSS JOIN hot h
                 ON h.write_id = w.id AND h.series_id BETWEEN ?2 AND ?3
             WHERE w.id <= ?1)",
    )?
    .execute(params![upto, first, last])?;
    {
        let mut delete =
            tx.prepare_cached("DELETE FROM hot WHERE write_id = ?1 AND series_id = ?2")?;
        for (write, series) in &later {
            delete.execute([write, series])?;
        }
    }
    let through = later.iter().map(|&(w, _)| w).fold(upto, i64::max);
    report.writes = tx
        .prepare_cached(
            "DELETE FROM hot_writes WHERE id <= ?1
                 AND NOT EXISTS (SELECT 1 FROM hot h WHERE h.write_id = hot_writes.id)",
        )?
        .execute([through])? as u64;
    tx.commit()?;
    Ok(report)
}

// `last` moves only to a strictly newer (ts, seq): merging in an older batch late leaves
// it alone. `{table}`/`{bucket}`: `rollups_1m`/`minute` or `rollups_1h`/`hour`.
macro_rules! upsert_rollup {
    ($table:literal, $bucket:literal) => {
        concat!(
            "INSERT INTO ", $table, " AS r
                 (series_id, ", $bucket, ", count, sum, min, max, last, last_ts, last_seq)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (series_id, ", $bucket, ") DO UPDATE SET
                 count = r.count + excluded.count,
                 sum = r.sum + excluded.sum,
                 min = min(r.min, excluded.min),
                 max = max(r.max, excluded.max),
                 last = CASE WHEN (excluded.last_ts, excluded.last_seq) > (r.last_ts, r.last_seq)
                             THEN excluded.last ELSE r.last END,
                 last_ts = CASE WHEN (excluded.last_ts, excluded.last_seq) > (r.last_ts, r.last_seq)
                                THEN excluded.last_ts ELSE r.last_ts END,
                 last_seq = CASE WHEN (excluded.last_ts, excluded.last_seq) > (r.last_ts, r.last_seq)
                                 THEN excluded.last_seq ELSE r.last_seq END"
        )
    };
}
const UPSERT_MINUTE: &str = upsert_rollup!("rollups_1m", "minute");
const UPSERT_HOUR: &str = upsert_rollup!("rollups_1h", "hour");

/// Aggregate of some readings of one series in one bucket (a minute or an hour).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Agg {
    /// Start of the bucket.
    pub start: i64,
    pub count: i64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub last: f64,
    pub last_key: (i64, i64),
}

impl Agg {
    fn first(start: i64, p: &Pt) -> Agg {
        Agg {
            start,
            count: 1,
            sum: p.value,
            min: p.value,
            max: p.value,
            last: p.value,
            last_key: p.key(),
        }
    }

    fn add(&mut self, p: &Pt) {
        self.count += 1;
        self.sum += p.value;
        self.min = self.min.min(p.value);
        self.max = self.max.max(p.value);
        if p.key() > self.last_key {
            self.last = p.value;
            self.last_key = p.key();
        }
    }

    /// Folds in another aggregate of the same bucket.
    pub(super) fn merge(&mut self, o: &Agg) {
        self.count += o.count;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        if o.last_key > self.last_key {
            self.last = o.last;
            self.last_key = o.last_key;
        }
    }
}

/// Aggregates of `points` (sorted by time) per bucket of `resolution`, oldest first.
pub(super) fn by_bucket(points: &[Pt], resolution: Resolution) -> Vec<Agg> {
    let mut out: Vec<Agg> = Vec::new();
    for p in points {
        let start = resolution.start_of(p.ts);
        match out.last_mut() {
            Some(a) if a.start == start => a.add(p),
            _ => out.push(Agg::first(start, p)),
        }
    }
    out
}

/// Folds `points` (sorted by time, none counted yet) into the series' minutes and hours.
fn fold_rollups(tx: &Connection, series: i64, points: &[Pt]) -> Result<()> {
    for (resolution, sql) in [
        (Resolution::Minute, UPSERT_MINUTE),
        (Resolution::Hour, UPSERT_HOUR),
    ] {
        let mut upsert = tx.prepare_cached(sql)?;
        for a in by_bucket(points, resolution) {
            upsert.execute(params![
                series,
                a.start,
                a.count,
                a.sum,
                a.min,
                a.max,
                a.last,
                a.last_key.0,
                a.last_key.1
            ])?;
        }
    }
    Ok(())
}

/// The newest chunk of a series that starts at or before some instant, without its data.
struct Tail {
    id: i64,
    day: i64,
    n: usize,
    state: chunk::State,
}

/// Puts `points` (sorted, none stored yet) into the chunks of `series`: appended to its
/// newest chunk when they all come after it (the common case, without decoding it),
/// merged with the chunks they overlap otherwise. True when they were merged.
fn place(tx: &Connection, series: i64, points: Vec<Pt>) -> Result<bool> {
    let Some(first) = points.first() else {
        return Ok(false);
    };
    let from = first.ts;
    let tail = tx
        .prepare_cached(
            "SELECT id, day, n, end_ts, end_seq, end_delta, end_bits FROM chunks
             WHERE series_id = ?1 AND start_ts <= ?2 ORDER BY start_ts DESC LIMIT 1",
        )?
        .query_row(params![series, from], |r| {
            Ok(Tail {
                id: r.get(0)?,
                day: r.get(1)?,
                n: r.get::<_, i64>(2)? as usize,
                state: chunk::State {
                    ts: r.get(3)?,
                    seq: r.get(4)?,
                    delta: r.get(5)?,
                    bits: r.get::<_, i64>(6)? as u64,
                },
            })
        })
        .optional()?;
    let last_key = points[points.len() - 1].key();
    let later: Option<i64> = tx
        .prepare_cached(
            "SELECT start_ts FROM chunks WHERE series_id = ?1 AND start_ts > ?2
             ORDER BY start_ts LIMIT 1",
        )?
        .query_row(params![series, from], |r| r.get(0))
        .optional()?;
    let after_tail = tail
        .as_ref()
        .is_none_or(|t| (t.state.ts, t.state.seq) < first.key());
    if after_tail && later.is_none_or(|start| start > last_key.0) {
        extend(tx, series, tail, &points)?;
        return Ok(false);
    }
    merge(tx, series, tail.map(|t| t.id), points)?;
    Ok(true)
}

/// Appends `points`, which come after every stored reading of `series` in their span, to
/// `tail` while it has room and is of the same day, then starts new chunks.
fn extend(tx: &Connection, series: i64, tail: Option<Tail>, points: &[Pt]) -> Result<()> {
    let mut rest = points;
    if let Some(mut t) = tail {
        let mut room = if t.n < APPEND_BELOW {
            CHUNK_POINTS.saturating_sub(t.n).min(rest.len())
        } else {
            0
        };
        // Same day only, and never a cut inside a run of one timestamp (the next chunk
        // would start where this one ends).
        room = rest[..room].partition_point(|p| day_of(p.ts) == t.day);
        while room > 0 && room < rest.len() && rest[room].ts == rest[room - 1].ts {
            room -= 1;
        }
        if room > 0 {
            let mut bytes = Vec::with_capacity(room * 5);
            chunk::append(&mut t.state, &rest[..room], &mut bytes);
            tx.prepare_cached(
                "UPDATE chunks SET data = CAST(data || ?2 AS BLOB), n = n + ?3, end_ts = ?4, end_seq = ?5,
                     end_delta = ?6, end_bits = ?7
                 WHERE id = ?1",
            )?
            .execute(params![
                t.id,
                bytes,
                room as i64,
                t.state.ts,
                t.state.seq,
                t.state.delta,
                t.state.bits as i64
            ])?;
            rest = &rest[room..];
        }
    }
    insert_all(tx, series, rest)
}

/// Late or out-of-order readings: decodes the chunks of `series` they overlap (and
/// `tail`, the one starting before them), merges, and writes the result back.
fn merge(tx: &Connection, series: i64, tail: Option<i64>, points: Vec<Pt>) -> Result<()> {
    let (from, to) = (points[0].ts, points[points.len() - 1].ts);
    let mut old: Vec<i64> = Vec::new();
    let mut merged: Vec<Pt> = Vec::new();
    {
        let mut stmt = tx.prepare_cached(
            "SELECT id, data FROM chunks
             WHERE series_id = ?1 AND (id = ?2 OR (start_ts > ?3 AND start_ts <= ?4))
             ORDER BY start_ts",
        )?;
        let mut rows = stmt.query(params![series, tail.unwrap_or(-1), from, to])?;
        while let Some(row) = rows.next()? {
            old.push(row.get(0)?);
            chunk::decode_into(blob(row, 1)?, &mut merged)?;
        }
    }
    merged.extend(points);
    merged.sort_unstable_by_key(Pt::key);
    merged.dedup_by_key(|p| p.key());
    let mut delete = tx.prepare_cached("DELETE FROM chunks WHERE id = ?1")?;
    for id in old {
        delete.execute([id])?;
    }
    insert_all(tx, series, &merged)
}

/// Cuts sorted readings into chunks: a new one at each day, and at most [`CHUNK_POINTS`]
/// each. Two pieces never start at the same timestamp (the key of a chunk): a cut inside
/// a run of equal timestamps moves past it.
fn split(points: &[Pt]) -> Vec<&[Pt]> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < points.len() {
        let day = day_of(points[start].ts);
        let mut end = start + 1;
        while end < points.len() && day_of(points[end].ts) == day {
            if end - start >= CHUNK_POINTS && points[end].ts != points[end - 1].ts {
                break;
            }
            end += 1;
        }
        out.push(&points[start..end]);
        start = end;
    }
    out
}

/// Deletes readings older than `before` from chunks: whole days first, then the chunks of
/// `before`'s day that start before it, rewritten, in transactions of at most `limit`
/// chunks. Returns (readings deleted, chunks touched) for the transaction it ran, or
/// `None` when nothing was left to delete.
pub(super) fn prune_step(
    conn: &mut Connection,
    before: i64,
    limit: i64,
) -> Result<Option<(u64, u64)>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut deleted = 0u64;
    let mut touched = 0u64;
    {
        let mut whole = tx.prepare_cached(
            "DELETE FROM chunks WHERE id IN (SELECT id FROM chunks WHERE day < ?1 LIMIT ?2)
             RETURNING n",
        )?;
        let mut rows = whole.query(params![day_of(before), limit])?;
        while let Some(row) = rows.next()? {
            deleted += row.get::<_, i64>(0)? as u64;
            touched += 1;
        }
    }
    if touched == 0 {
        let straddling: Vec<(i64, i64, Vec<u8>)> = tx
            .prepare_cached(
                "SELECT id, series_id, data FROM chunks WHERE day = ?1 AND start_ts < ?2 LIMIT ?3",
            )?
            .query_map(params![day_of(before), before, limit], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        for (id, series, data) in straddling {
            let points = chunk::decode(&data)?;
            let kept: Vec<Pt> = points.iter().filter(|p| p.ts >= before).cloned().collect();
            deleted += (points.len() - kept.len()) as u64;
            touched += 1;
            tx.execute("DELETE FROM chunks WHERE id = ?1", [id])?;
            insert_all(&tx, series, &kept)?;
        }
    }
    tx.commit()?;
    Ok((touched > 0).then_some((deleted, touched)))
}

/// Moves the readings of a version-3 database (one row each in `readings`) into chunks and
/// drops the table; part of migration 4's transaction. Returns how many it moved.
pub(super) fn convert_v3(tx: &Connection) -> Result<u64> {
    let exists: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'readings')",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(0);
    }
    let mut moved = 0u64;
    {
        let mut stmt = tx.prepare(
            "SELECT series_id, ts, seq, value, quality FROM readings ORDER BY series_id, ts, seq",
        )?;
        let mut rows = stmt.query([])?;
        let mut current: Option<i64> = None;
        let mut points: Vec<Pt> = Vec::new();
        let mut flush = |series: i64, points: &mut Vec<Pt>| -> Result<()> {
            moved += points.len() as u64;
            insert_all(tx, series, points)?;
            points.clear();
            Ok(())
        };
        while let Some(row) = rows.next()? {
            let series: i64 = row.get(0)?;
            if current.is_some_and(|c| c != series) {
                flush(current.unwrap_or(series), &mut points)?;
            }
            current = Some(series);
            points.push(Pt {
                ts: row.get(1)?,
                seq: row.get(2)?,
                value: row.get(3)?,
                quality: row.get(4)?,
            });
            // A series with a long history is written out a chunk at a time.
            if points.len() >= CHUNK_POINTS * 64 {
                let last_ts = points[points.len() - 1].ts;
                let cut = points.partition_point(|p| day_of(p.ts) < day_of(last_ts));
                if cut > 0 {
                    let rest = points.split_off(cut);
                    flush(series, &mut points)?;
                    points = rest;
                }
            }
        }
        if let Some(series) = current {
            flush(series, &mut points)?;
        }
    }
    tx.execute_batch("DROP TABLE readings")?;
    tracing::info!(
        readings = moved,
        "moved the readings of a version-3 store into chunks"
    );
    Ok(moved)
}

/// Writes sorted readings, none of which any chunk of `series` overlaps, as new chunks.
fn insert_all(tx: &Connection, series: i64, points: &[Pt]) -> Result<()> {
    let mut insert = tx.prepare_cached(
        "INSERT INTO chunks
             (series_id, start_ts, end_ts, end_seq, end_delta, end_bits, day, n, data)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    for piece in split(points) {
        let mut state = chunk::State::default();
        let mut data = Vec::with_capacity(piece.len() * 5);
        chunk::append(&mut state, piece, &mut data);
        insert.execute(params![
            series,
            piece[0].ts,
            state.ts,
            state.seq,
            state.delta,
            state.bits as i64,
            day_of(piece[0].ts),
            piece.len() as i64,
            data
        ])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dense ids live in the vector, far-off and negative ones in the map; a slot never
    /// written reads as unknown; nothing is returned for an id it was not given.
    #[test]
    fn known_by_series() {
        let k = |n: i64| Known {
            base: Base::at_or_after((n, n)),
            newest: (n + 1, n),
        };
        let mut m = BySeries::default();
        for id in [1, 3, -5, 1 << 40, 70_000] {
            m.insert(id, k(id));
        }
        assert_eq!(m.dense.len(), 4);
        assert_eq!(m.sparse.len(), 3);
        for id in [1, 3, -5, 1 << 40, 70_000] {
            assert_eq!(m.get(id).map(|x| x.newest), Some((id + 1, id)), "{id}");
        }
        for id in [0, 2, 4, 69_999, -1, (1 << 40) + 1] {
            assert!(m.get(id).is_none(), "{id}");
        }
        m.clear();
        assert!(m.get(1).is_none() && m.get(1 << 40).is_none());
    }

    /// A base stands for a key at or after the one it was made from, and close to it.
    #[test]
    fn bases_round_up_to_the_second() {
        const S: i64 = Base::SECOND;
        assert_eq!(Base::at_or_after(NOTHING).key(), NOTHING);
        assert_eq!(std::mem::size_of::<Known>(), 24);
        let cases = [
            ((0, 0), (0, i64::MAX)),
            ((1, 5), (S, i64::MAX)),
            ((S, 5), (S, i64::MAX)),
            ((S + 1, i64::MAX), (2 * S, i64::MAX)),
            ((1_771_149_659_000_001, 3), (1_771_149_660 * S, i64::MAX)),
            // Before 1970: 1970.
            ((-1, 0), (0, i64::MAX)),
            ((i64::MIN, i64::MIN + 1), (0, i64::MAX)),
            // Beyond 2106: everything is in doubt.
            ((i64::from(u32::MAX) * S, 0), (i64::MAX, i64::MAX)),
            ((i64::MAX - 1, 0), (i64::MAX, i64::MAX)),
        ];
        for (key, want) in cases {
            let got = Base::at_or_after(key).key();
            assert_eq!(got, want, "{key:?}");
            assert!(got >= key, "{key:?}");
        }
        // The last second it holds.
        let last = (i64::from(u32::MAX) - 2) * S;
        assert_eq!(Base::at_or_after((last, 0)).key(), (last, i64::MAX));
    }

    #[test]
    fn sequence_ranges() {
        let mut s = Seqs::default();
        for seq in [5, 7, 6, 1, 3, 2, 100] {
            s.insert(seq);
        }
        let ranges: Vec<(i64, i64)> = s.ranges.iter().map(|(&a, &b)| (a, b)).collect();
        assert_eq!(ranges, [(1, 3), (5, 7), (100, 100)]);
        for (seq, want) in [
            (0, false),
            (1, true),
            (4, false),
            (7, true),
            (8, false),
            (100, true),
        ] {
            assert_eq!(s.may_contain(seq), want, "{seq}");
        }
        // Bounded: the lowest ranges give way to a floor below which all is "maybe".
        let mut s = Seqs::default();
        for i in 0..(Seqs::MAX_RANGES as i64 + 10) {
            s.insert(i * 2);
        }
        assert_eq!(s.ranges.len(), Seqs::MAX_RANGES);
        assert!(s.may_contain(1));
        assert!(!s.may_contain(Seqs::MAX_RANGES as i64 * 2 + 11));
    }

    fn pt(ts: i64, seq: i64) -> Pt {
        Pt {
            ts,
            seq,
            value: 0.0,
            quality: None,
        }
    }

    #[test]
    fn split_cuts_at_days_and_size_never_inside_a_timestamp() {
        let day0 = 20_000 * DAY;
        let mut points: Vec<Pt> = (0..(CHUNK_POINTS as i64 + 10))
            .map(|i| pt(day0 + i, i))
            .collect();
        // A run of one timestamp across the size cut.
        for (i, p) in points.iter_mut().enumerate().skip(CHUNK_POINTS - 2).take(5) {
            p.ts = day0 + CHUNK_POINTS as i64;
            p.seq = i as i64;
        }
        points.push(pt(day0 + DAY, 0));
        points.push(pt(day0 + DAY + 1, 0));
        let pieces = split(&points);
        let sizes: Vec<usize> = pieces.iter().map(|p| p.len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), points.len());
        assert_eq!(sizes.len(), 3, "{sizes:?}");
        assert_eq!(sizes[2], 2);
        for w in pieces.windows(2) {
            assert!(w[0].last().unwrap().ts < w[1][0].ts);
        }
        for p in &pieces {
            assert_eq!(day_of(p[0].ts), day_of(p[p.len() - 1].ts));
        }
    }
}
