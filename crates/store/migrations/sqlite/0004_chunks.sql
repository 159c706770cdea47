-- fleetpipe schema, version 4 (SQLite): readings as compressed chunks, not one row each.
--
-- Version 3 kept one B-tree row per reading, keyed by series: every commit dirtied about
-- one page per series, and the cost of a reading grew with the table. Now:
--
-- * a write appends what it brought, one row per (write, series) holding that series'
--   new readings encoded (see src/chunk.rs), to `hot`: the rows of one write are
--   consecutive keys, so a commit writes a few pages whatever the number of series;
-- * a sealer moves hot rows into `chunks`, per series and day, up to 1,024 readings
--   each (appending to a series' newest chunk without decoding it), and folds them into
--   `rollups_1m`, in one transaction;
-- * reads merge a series' chunks with its hot rows (one seek per hot write);
-- * retention deletes whole days of chunks.
--
-- Existing readings are moved into chunks by the code that applies this migration, in the
-- same transaction (`readings` is dropped then).

-- One row per write that is not sealed yet, with the time span it covers.
CREATE TABLE hot_writes (
    id     INTEGER PRIMARY KEY,
    -- Readings it brought.
    n      INTEGER NOT NULL,
    min_ts INTEGER NOT NULL,
    max_ts INTEGER NOT NULL
);

CREATE TABLE hot (
    write_id  INTEGER NOT NULL,
    series_id INTEGER NOT NULL,
    n         INTEGER NOT NULL,
    min_ts    INTEGER NOT NULL,
    max_ts    INTEGER NOT NULL,
    data      BLOB    NOT NULL,
    PRIMARY KEY (write_id, series_id)
) WITHOUT ROWID;

-- Sealed readings: a series' chunks never overlap in time, and a chunk never spans two
-- UTC days (`day` is the start of its day, Unix µs).
CREATE TABLE chunks (
    id        INTEGER PRIMARY KEY,
    series_id INTEGER NOT NULL,
    start_ts  INTEGER NOT NULL,
    end_ts    INTEGER NOT NULL,
    -- Sequence of the point at end_ts with the largest sequence: (end_ts, end_seq) is the
    -- chunk's newest reading.
    end_seq   INTEGER NOT NULL,
    -- With end_ts and end_seq, what encoding a next reading needs (src/chunk.rs, State):
    -- the last timestamp delta and the last value's bits, so a seal appends to a chunk
    -- without decoding it.
    end_delta INTEGER NOT NULL,
    end_bits  INTEGER NOT NULL,
    day       INTEGER NOT NULL,
    n         INTEGER NOT NULL,
    data      BLOB    NOT NULL
);
CREATE UNIQUE INDEX chunks_series ON chunks (series_id, start_ts);
CREATE INDEX chunks_day ON chunks (day);

-- Counters of the store itself: 'generation' moves at every write of readings, so a
-- process can tell another one wrote since it last did.
CREATE TABLE store_meta (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO store_meta (name, value) VALUES ('generation', 0);
