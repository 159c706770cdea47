-- fleetpipe schema, version 5 (PostgreSQL): hourly rollups next to the per-minute ones.
--
-- A month of one series is 43,200 minutes but 720 hours: ranges of days and months read
-- this table. The statement that inserts readings folds the new ones into both, so an
-- hour is always the fold of its minutes. Existing minutes are folded here; `last` is the
-- value of the minute with the newest (last_ts, last_seq).
CREATE TABLE rollups_1h (
    series_id bigint           NOT NULL,
    hour      timestamptz      NOT NULL,
    count     bigint           NOT NULL,
    sum       double precision NOT NULL,
    min       double precision NOT NULL,
    max       double precision NOT NULL,
    last      double precision NOT NULL,
    last_ts   timestamptz      NOT NULL,
    last_seq  bigint           NOT NULL,
    PRIMARY KEY (series_id, hour)
);

INSERT INTO rollups_1h (series_id, hour, count, sum, min, max, last, last_ts, last_seq)
SELECT series_id,
       date_trunc('hour', minute, 'UTC'),
       sum(count),
       sum(sum),
       min(min),
       max(max),
       (array_agg(last ORDER BY last_ts DESC, last_seq DESC))[1],
       max(last_ts),
       (array_agg(last_seq ORDER BY last_ts DESC, last_seq DESC))[1]
FROM rollups_1m
GROUP BY 1, 2;
