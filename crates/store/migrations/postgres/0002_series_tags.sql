-- fleetpipe schema, version 2 (PostgreSQL): a series is (device, sensor, tags).
--
-- Version 1 had one series per (device, sensor) and kept the latest tags on it, so lines
-- that differ only in a tag (Telegraf's `cpu,cpu=cpu0` … `cpu,cpu=cpu3`) were one series
-- and their readings collided. Existing rows keep their id and the tags they had.
ALTER TABLE series DROP CONSTRAINT series_device_sensor_key;
ALTER TABLE series ADD CONSTRAINT series_device_sensor_tags_key UNIQUE (device, sensor, tags);

-- Tags join the view, last so that existing queries keep their columns.
CREATE OR REPLACE VIEW readings_v AS
SELECT r.ts, s.device, s.sensor, r.value, s.unit, r.quality, s.tags
FROM readings r
JOIN series s ON s.id = r.series_id;
