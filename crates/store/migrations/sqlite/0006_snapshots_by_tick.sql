-- fleetpipe schema, version 6 (SQLite): snapshots kept in tick order.
--
-- The aggregator writes one row per device per tick. Keyed by (device, ts), a tick's
-- rows went to as many places in the B-tree as there are devices: at 5,000 devices a
-- tick dirtied about 5,000 pages, and took 29 ms on an empty table but 258 ms after ten
-- minutes. Keyed by (ts, device), a tick is appended in a few consecutive pages.
-- `snapshot_ticks` lists the ticks written, so one device's snapshots are read with one
-- seek per tick rather than by scanning every device's rows in the range.
CREATE TABLE snapshots_v6 (
    ts       INTEGER NOT NULL,
    device   TEXT    NOT NULL,
    "values" TEXT    NOT NULL,
    PRIMARY KEY (ts, device)
) WITHOUT ROWID;

INSERT INTO snapshots_v6 (ts, device, "values")
SELECT ts, device, "values" FROM snapshots ORDER BY ts, device;

DROP TABLE snapshots;
ALTER TABLE snapshots_v6 RENAME TO snapshots;

CREATE TABLE snapshot_ticks (
    ts INTEGER PRIMARY KEY
);

INSERT INTO snapshot_ticks (ts) SELECT DISTINCT ts FROM snapshots;
