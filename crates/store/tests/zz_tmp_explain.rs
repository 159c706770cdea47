use fleetpipe_testkit::PgServer;
#[tokio::test]
async fn explain() {
    let pg = PgServer::start();
    let url = pg.create_database("x");
    let store = fleetpipe_store::open(&url).await.unwrap();
    drop(store);
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client.batch_execute("INSERT INTO series (device, sensor) SELECT 'd'||i, 's' FROM generate_series(1,1000) i;
      INSERT INTO readings SELECT s.id, now() - make_interval(secs => k), k, 1.0 FROM series s, generate_series(1,200) k;
      INSERT INTO rollups_1m SELECT s.id, date_trunc('minute', now()) - make_interval(mins => k), 1, 1,1,1,1, now(), 1 FROM series s, generate_series(1,100) k;
      INSERT INTO snapshots SELECT 'd'||i, now() - make_interval(secs => k), '{}' FROM generate_series(1,100) i, generate_series(1,100) k;
      ANALYZE;").await.unwrap();
    for sql in ["
WITH doomed AS (
    SELECT r.series_id, r.ts, r.seq
    FROM series s
    CROSS JOIN LATERAL (
        SELECT series_id, ts, seq FROM readings
        WHERE series_id = s.id AND ts < now() - interval '100 seconds'
        ORDER BY ts, seq
        LIMIT 5000
    ) r
    WHERE s.id >= -9223372036854775808
    ORDER BY s.id
    LIMIT 5000
), gone AS (
    DELETE FROM readings d USING doomed
    WHERE d.series_id = doomed.series_id AND d.ts = doomed.ts AND d.seq = doomed.seq
    RETURNING d.series_id
)
SELECT count(*), max(series_id) FROM gone", "
WITH doomed AS (
    SELECT device, ts FROM snapshots WHERE ts < now() - interval '50 seconds' ORDER BY ts LIMIT 5000
), gone AS (
    DELETE FROM snapshots d USING doomed
    WHERE d.device = doomed.device AND d.ts = doomed.ts
    RETURNING 1
)
SELECT count(*), 1::bigint FROM gone"] {
        for row in client.simple_query(&format!("EXPLAIN ANALYZE {sql}")).await.unwrap() {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = row { println!("{}", r.get(0).unwrap()); }
        }
        println!("----");
    }
}
