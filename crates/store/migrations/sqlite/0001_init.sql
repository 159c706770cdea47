-- fleetpipe schema, version 1 (SQLite).
--
-- Timestamps are INTEGER microseconds since the Unix epoch (UTC), exactly what
-- `fleetpipe_proto::Timestamp` holds. No foreign keys: SQLite does not enforce them unless
-- asked, and checking one per reading would cost more than the bug it could catch (series
-- rows are never deleted).

-- One row per (device, sensor): readings refer to it by a small integer instead of
-- repeating two strings per row.
CREATE TABLE series (
    id     INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    sensor TEXT NOT NULL,
    unit   TEXT,
    -- JSON object of tag name to value, keys sorted; '{}' when there are none.
    tags   TEXT NOT NULL DEFAULT '{}',
    UNIQUE (device, sensor)
);

-- Raw readings. The key is what makes writes idempotent: `seq` is the JetStream sequence
-- of the message that carried the reading, so a redelivery hits the same key.
CREATE TABLE readings (
    series_id INTEGER NOT NULL,
    ts        INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    value     REAL    NOT NULL,
    quality   TEXT,
    PRIMARY KEY (series_id, ts, seq)
) WITHOUT ROWID;

-- Per-minute aggregates, updated in the same transaction as the readings they count.
-- `last_ts`/`last_seq` identify the reading `last` came from, so a later write can tell
-- whether its own reading is newer.
CREATE TABLE rollups_1m (
    series_id INTEGER NOT NULL,
    minute    INTEGER NOT NULL,
    count     INTEGER NOT NULL,
    sum       REAL    NOT NULL,
    min       REAL    NOT NULL,
    max       REAL    NOT NULL,
    last      REAL    NOT NULL,
    last_ts   INTEGER NOT NULL,
    last_seq  INTEGER NOT NULL,
    PRIMARY KEY (series_id, minute)
) WITHOUT ROWID;

-- The aggregator's per-device snapshots: a JSON object of sensor name to number.
CREATE TABLE snapshots (
    device   TEXT    NOT NULL,
    ts       INTEGER NOT NULL,
    "values" TEXT    NOT NULL,
    PRIMARY KEY (device, ts)
) WITHOUT ROWID;

-- Snapshot queries across all devices scan by time.
CREATE INDEX snapshots_ts ON snapshots (ts);
