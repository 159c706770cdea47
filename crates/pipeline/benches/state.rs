//! The latest-state update the collectors make for every key of a batch: the KV key and
//! the JSON value (`StateValue`). The KV put itself is a JetStream publish, measured end to
//! end by `fleetpipe bench`. Throughput is in readings.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fleetpipe_pipeline::state::{self, StateValue};
use fleetpipe_proto::{Reading, Timestamp};

fn state_update(c: &mut Criterion) {
    let now = Timestamp::now();
    let reading = |i: usize, unit: Option<&str>| Reading {
        device: format!("v{:06}", i / 5).into(),
        sensor: ["gps.lat", "gps.lon", "speed", "soc", "torque"][i % 5].into(),
        value: 87.25 + i as f64,
        ts: now,
        unit: unit.map(str::to_string),
        quality: unit.map(|_| "good".to_string()),
        tags: Default::default(),
    };
    let plain: Vec<Reading> = (0..2000).map(|i| reading(i, None)).collect();
    let json: Vec<Reading> = (0..2000).map(|i| reading(i, Some("km/h"))).collect();

    let mut group = c.benchmark_group("state_update");
    for (name, batch) in [("plain_batch_2000", &plain), ("json_batch_2000", &json)] {
        group.throughput(Throughput::Elements(batch.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut bytes = 0;
                for r in batch.iter() {
                    let key = state::key(&r.device, &r.sensor, &r.tags);
                    let body = serde_json::to_vec(&StateValue::from_reading(r)).unwrap();
                    bytes += key.len() + body.len();
                }
                black_box(bytes)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, state_update);
criterion_main!(benches);
