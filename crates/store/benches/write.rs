//! The collectors' store write: one transaction per batch, readings plus their rollups, in
//! the embedded SQLite store on a real file (WAL, `synchronous=FULL`: one fsync per
//! commit). Series are known (cached), as in steady state. Throughput is in readings.
//!
//! PostgreSQL needs a server and is measured end to end by `fleetpipe bench --store`.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fleetpipe_proto::{Reading, Timestamp};
use fleetpipe_store::Record;

const SENSORS: [&str; 5] = ["gps.lat", "gps.lon", "speed", "soc", "torque"];

/// `n` readings spread over `devices` vehicles, with fresh stream sequences so every
/// iteration inserts new rows rather than hitting the idempotency check.
fn batch(n: usize, devices: usize, seq: &AtomicU64, now: Timestamp) -> Vec<Record> {
    (0..n)
        .map(|i| {
            let seq = seq.fetch_add(1, Ordering::Relaxed);
            Record {
                seq,
                reading: Reading {
                    device: format!("v{:05}", i % devices).into(),
                    sensor: SENSORS[(i / devices) % SENSORS.len()].into(),
                    value: (seq % 1000) as f64 * 0.25,
                    ts: now.saturating_add_micros(seq as i64),
                    unit: None,
                    quality: None,
                    tags: Default::default(),
                },
            }
        })
        .collect()
}

fn write(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.db");
    let store = rt
        .block_on(fleetpipe_store::open(path.to_str().unwrap()))
        .unwrap();
    let seq = AtomicU64::new(1);
    let now = Timestamp::now();

    let mut group = c.benchmark_group("sqlite_write_readings");
    group.sample_size(20);
    // (readings, devices): a batch over as many series as readings (a plain-payload batch
    // from a large fleet: every row lands on its own B-tree page) or over few series (line
    // protocol from a few devices: rows of a series share pages).
    for (n, devices) in [(100, 20), (2000, 400), (2000, 20), (10_000, 2000)] {
        // Warm the series cache so the measured batches take the steady-state path.
        rt.block_on(store.write_readings(&batch(n, devices, &seq, now)))
            .unwrap();
        group.throughput(Throughput::Elements(n as u64));
        let series = devices * SENSORS.len();
        group.bench_function(format!("batch_{n}_over_{}_series", series.min(n)), |b| {
            b.iter_batched(
                || batch(n, devices, &seq, now),
                |records| {
                    let new = rt.block_on(store.write_readings(&records)).unwrap();
                    assert_eq!(new, n as u64);
                    black_box(new)
                },
                criterion::BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, write);
criterion_main!(benches);
