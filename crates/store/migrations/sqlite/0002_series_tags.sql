-- fleetpipe schema, version 2 (SQLite): a series is (device, sensor, tags).
--
-- Version 1 had one series per (device, sensor) and kept the latest tags on it, so lines
-- that differ only in a tag (Telegraf's `cpu,cpu=cpu0` … `cpu,cpu=cpu3`) were one series
-- and their readings collided. SQLite cannot drop a table constraint, so the table is
-- rebuilt; ids are kept, so every stored reading and rollup stays with its series, which
-- keeps the tags it had.
CREATE TABLE series_v2 (
    id     INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    sensor TEXT NOT NULL,
    unit   TEXT,
    -- JSON object of tag name to value, keys sorted: the canonical text writes compare.
    tags   TEXT NOT NULL DEFAULT '{}',
    UNIQUE (device, sensor, tags)
);
INSERT INTO series_v2 (id, device, sensor, unit, tags)
SELECT id, device, sensor, unit, tags FROM series;
DROP TABLE series;
ALTER TABLE series_v2 RENAME TO series;
