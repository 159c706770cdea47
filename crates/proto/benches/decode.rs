//! The collectors' first step for every message: subject parsing and payload decoding, in
//! each payload form. Throughput is in readings.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fleetpipe_proto::payload::decode_into;
use fleetpipe_proto::{
    encode_json, encode_line_protocol, Decoded, Limits, SubjectTemplate, Timestamp,
};

fn decode(c: &mut Criterion) {
    let template = SubjectTemplate::default();
    let limits = Limits::default();
    let now = Timestamp::now();
    // Five seconds of one simulated vehicle in line protocol: what `fleetpipe bench
    // --payload lp` sends per message (46 readings).
    let mut lp_batch = String::new();
    for tick in 0..50i64 {
        let ts = Some(now.saturating_add_micros((tick - 50) * 100_000));
        encode_line_protocol(
            &mut lp_batch,
            "torque",
            &[("value", 123.4 + tick as f64)],
            ts,
        );
        if tick % 5 == 0 {
            encode_line_protocol(&mut lp_batch, "speed", &[("value", 87.25)], ts);
        }
        if tick % 10 == 0 {
            encode_line_protocol(
                &mut lp_batch,
                "gps",
                &[("lat", 48.8566), ("lon", 2.3522)],
                ts,
            );
        }
        if tick == 0 {
            encode_line_protocol(&mut lp_batch, "soc", &[("value", 76.5)], ts);
        }
    }
    let mut lp_one = String::new();
    encode_line_protocol(
        &mut lp_one,
        "gps",
        &[("lat", 48.8566), ("lon", 2.3522)],
        Some(now),
    );
    let cases: [(&str, &str, String); 4] = [
        ("plain", "vehicle.v00042.speed", "87.25".to_string()),
        (
            "json",
            "vehicle.v00042.speed",
            encode_json(87.25, Some("km/h"), Some(now), Some("good")),
        ),
        ("lp_one_line", "vehicle.v00042.lp", lp_one),
        ("lp_50_ticks", "vehicle.v00042.lp", lp_batch),
    ];

    let mut group = c.benchmark_group("decode");
    for (name, subject, payload) in &cases {
        let mut out = Decoded::default();
        decode_into(
            &template,
            subject,
            payload.as_bytes(),
            now,
            &limits,
            &mut out,
        );
        assert!(out.rejects.is_empty(), "{name}: {:?}", out.rejects);
        group.throughput(Throughput::Elements(out.readings.len() as u64));
        group.bench_function(*name, |b| {
            b.iter(|| {
                out.readings.clear();
                out.rejects.clear();
                decode_into(
                    &template,
                    black_box(subject),
                    black_box(payload.as_bytes()),
                    now,
                    &limits,
                    &mut out,
                );
                black_box(out.readings.len())
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("subject");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_default_template", |b| {
        b.iter(|| {
            template
                .parse_subject(black_box("vehicle.v00042.gps.lat"))
                .is_ok()
        })
    });
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
