-- fleetpipe schema, version 3 (PostgreSQL): how far back each table has been pruned.
--
-- One row per pruned table ('readings', 'rollups_1m', 'snapshots'), written by a prune
-- before it deletes anything: rows older than `horizon` may be gone. The readings' horizon
-- tells the API to answer older ranges from the rollups, and makes writes skip readings
-- older than it (a redelivery of pruned data would otherwise be counted twice in the
-- rollups). It only moves forward.
CREATE TABLE retention_horizons (
    name    text        PRIMARY KEY,
    horizon timestamptz NOT NULL
);
