-- fleetpipe schema, version 5 (SQLite): hourly rollups next to the per-minute ones.
--
-- A month of one series is 43,200 minutes but 720 hours: ranges of days and months read
-- this table. The sealer folds each reading into both, in the transaction that moves it
-- into chunks, so an hour is always the fold of its minutes. Existing minutes are folded
-- here; `last` is the value of the minute with the newest (last_ts, last_seq).
CREATE TABLE rollups_1h (
    series_id INTEGER NOT NULL,
    -- Start of the hour, Unix microseconds.
    hour      INTEGER NOT NULL,
    count     INTEGER NOT NULL,
    sum       REAL    NOT NULL,
    min       REAL    NOT NULL,
    max       REAL    NOT NULL,
    last      REAL    NOT NULL,
    last_ts   INTEGER NOT NULL,
    last_seq  INTEGER NOT NULL,
    PRIMARY KEY (series_id, hour)
) WITHOUT ROWID;

INSERT INTO rollups_1h (series_id, hour, count, sum, min, max, last, last_ts, last_seq)
SELECT series_id, hour, sum(count), sum(sum), min(min), max(max),
       max(CASE WHEN newest = 1 THEN last END),
       max(last_ts),
       max(CASE WHEN newest = 1 THEN last_seq END)
FROM (
    SELECT series_id,
           minute - ((minute % 3600000000) + 3600000000) % 3600000000 AS hour,
           count, sum, min, max, last, last_ts, last_seq,
           row_number() OVER (
               PARTITION BY series_id, minute - ((minute % 3600000000) + 3600000000) % 3600000000
               ORDER BY last_ts DESC, last_seq DESC
           ) AS newest
    FROM rollups_1m
)
GROUP BY series_id, hour;
