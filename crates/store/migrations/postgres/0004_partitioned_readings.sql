-- fleetpipe schema, version 4 (PostgreSQL): raw readings partitioned by day.
--
-- `readings` becomes a table partitioned by range on `ts`, one partition per UTC day
-- (`readings_p20261130` holds 2026-11-30T00:00Z up to, not including, 2026-12-01T00:00Z).
-- Retention then drops whole days (a catalog change) instead of deleting rows one by one,
-- and a day's rows and index pages sit together. The key stays (series_id, ts, seq): it
-- holds the partition key, so the unique index is one per partition and idempotence is
-- exact across the table. Writers create the partition of a day when a batch first needs
-- it (`readings_partition` below); there is no DEFAULT partition, whose rows every new
-- partition would have to be checked against.
--
-- Existing rows move into the partitions of their days, in this one transaction.

-- The old table keeps its rows until they have moved; its key index gives its name up.
ALTER TABLE readings RENAME TO readings_unpartitioned;
ALTER INDEX readings_pkey RENAME TO readings_unpartitioned_pkey;

CREATE TABLE readings (
    series_id bigint           NOT NULL,
    ts        timestamptz      NOT NULL,
    seq       bigint           NOT NULL,
    value     double precision NOT NULL,
    quality   text,
    PRIMARY KEY (series_id, ts, seq)
) PARTITION BY RANGE (ts);

-- Creates the partition of `readings` for the UTC day `day` unless it exists, and returns
-- its name: `readings_pYYYYMMDD` (`readings_pbcYYYYMMDD` before year 1). Safe to call from
-- any number of sessions at once: a transaction-scoped advisory lock makes them take
-- turns, and the later ones find the partition made. The table is created on its own and
-- then attached: ATTACH PARTITION takes only a SHARE UPDATE EXCLUSIVE lock on `readings`,
-- so neither reads nor writes wait for it (CREATE TABLE ... PARTITION OF would lock the
-- whole table, and queue every reader and writer behind the longest running query).
CREATE FUNCTION readings_partition(day date) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    name  text := 'readings_p'
                  || CASE WHEN day < DATE '0001-01-01' THEN 'bc' ELSE '' END
                  || to_char(day, 'YYYYMMDD');
    lower timestamptz := day::timestamp AT TIME ZONE 'UTC';
    upper timestamptz := (day + 1)::timestamp AT TIME ZONE 'UTC';
BEGIN
    PERFORM pg_advisory_xact_lock(7380385375773024626); -- "fleetpar"
    IF to_regclass(quote_ident(name)) IS NULL THEN
        -- LIKE copies the columns, the key and any CHECK constraint added to `readings`
        -- since, all of which ATTACH requires.
        EXECUTE format('CREATE TABLE %I (LIKE readings INCLUDING ALL)', name);
        EXECUTE format('ALTER TABLE readings ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                       name, lower, upper);
    END IF;
    RETURN name;
END
$$;

SELECT readings_partition(day)
FROM (SELECT DISTINCT (ts AT TIME ZONE 'UTC')::date AS day FROM readings_unpartitioned) d;

INSERT INTO readings (series_id, ts, seq, value, quality)
SELECT series_id, ts, seq, value, quality FROM readings_unpartitioned;

-- Rebinds the view to the new table (the same columns), keeping its owner and grants.
CREATE OR REPLACE VIEW readings_v AS
SELECT r.ts, s.device, s.sensor, r.value, s.unit, r.quality, s.tags
FROM readings r
JOIN series s ON s.id = r.series_id;

-- Whoever could read the old table (a Grafana role, say) can read the new one.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN
        SELECT a.privilege_type, a.is_grantable,
               CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                    ELSE quote_ident(pg_get_userbyid(a.grantee)) END AS grantee
        FROM pg_class c, aclexplode(c.relacl) a
        WHERE c.oid = 'readings_unpartitioned'::regclass AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('GRANT %s ON readings TO %s%s', g.privilege_type, g.grantee,
                       CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    END LOOP;
END
$$;

DROP TABLE readings_unpartitioned;

-- Statistics for the new partitions now rather than at autovacuum's next visit.
ANALYZE readings;
