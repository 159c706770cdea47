//! Every reading published is stored exactly once: across many devices and two collectors,
//! through a SIGKILL mid-batch, and while no collector runs at all.

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use fleetpipe_pipeline::StatsSnapshot;

use crate::support::*;

const DEVICES: usize = 1000;

/// (subject, payload) pairs and the (device, sensor, value) readings they carry.
type Messages = Vec<(String, String)>;
type Readings = Vec<(String, String, f64)>;

/// Round `r` of the fleet: one message per device, cycling through the payload forms.
/// Returns the messages and the readings they carry as (device, sensor, value).
fn round(r: usize) -> (Messages, Readings) {
    let mut msgs = Vec::new();
    let mut readings = Vec::new();
    for d in 0..DEVICES {
        let device = format!("d{d:04}");
        let value = (d * 1000 + r) as f64 + 0.25;
        match r % 3 {
            0 => {
                msgs.push((format!("vehicle.{device}.speed"), format!("{value}")));
                readings.push((device, "speed".to_string(), value));
            }
            1 => {
                msgs.push((
                    format!("vehicle.{device}.soc"),
                    format!(r#"{{"value":{value},"unit":"%"}}"#),
                ));
                readings.push((device, "soc".to_string(), value));
            }
            _ => {
                msgs.push((
                    format!("vehicle.{device}.lp"),
                    format!("engine rpm={value},temp={}", value + 1.0),
                ));
                readings.push((device.clone(), "engine.rpm".to_string(), value));
                readings.push((device, "engine.temp".to_string(), value + 1.0));
            }
        }
    }
    (msgs, readings)
}

/// Checks the store holds exactly `expected`, value for value and in order, with rollups
/// counting each reading once.
async fn assert_stored_exactly(env: &Env, expected: &[(String, String, f64)]) {
    let store = env.store().await;
    let n = wait_for_count(&*store, expected.len() as u64, Duration::from_secs(120)).await;
    assert_eq!(n, expected.len() as u64, "readings stored");
    // Nothing more arrives later (no duplicate from a late redelivery).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(store.count_readings().await.unwrap(), expected.len() as u64);

    let mut want: std::collections::HashMap<(String, String), Vec<f64>> = Default::default();
    for (d, s, v) in expected {
        want.entry((d.clone(), s.clone())).or_default().push(*v);
    }
    let got = stored_values(&*store, want.keys().cloned()).await;
    let (mut minutes, mut hours) = (0, 0);
    for (key, values) in &want {
        assert_eq!(got.get(key), Some(values), "values of {key:?}");
        let series = fleetpipe_store::SeriesKey::new(&key.0, &key.1);
        for (resolution, total) in [
            (fleetpipe_store::Resolution::Minute, &mut minutes),
            (fleetpipe_store::Resolution::Hour, &mut hours),
        ] {
            let rollups = store
                .series_rollups_at(&series, all_time(), resolution)
                .await
                .unwrap();
            *total += rollups.iter().map(|r| r.count).sum::<u64>();
        }
    }
    assert_eq!(minutes, expected.len() as u64, "per-minute rollup counts");
    assert_eq!(hours, expected.len() as u64, "hourly rollup counts");
}

fn counters(stdout: &str) -> StatsSnapshot {
    let v: serde_json::Value = serde_json::from_str(stdout).unwrap();
    StatsSnapshot {
        messages: v["messages"].as_u64().unwrap(),
        readings_stored: v["readings_stored"].as_u64().unwrap(),
        dead_letters: v["dead_letters"].as_u64().unwrap(),
        redelivered: v["redelivered"].as_u64().unwrap(),
        ..Default::default()
    }
}

async fn many_devices_two_collectors(env: Env) {
    let js = env.js().await;
    env.run(&["init"]);
    let mut c1 = env.spawn(&["collect", "--json"]);
    let mut c2 = env.spawn(&["collect", "--json"]);
    // Both collectors pulling (two fetch workers each) before anything is published: a
    // collector still opening its store could otherwise find the work all done.
    let started = std::time::Instant::now();
    while collectors_consumer(&js).await.num_waiting < 4 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "both collectors pulling within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut expected = Vec::new();
    for r in 0..12 {
        let (msgs, readings) = round(r);
        publish_all(&js, &msgs).await;
        expected.extend(readings);
    }
    assert_stored_exactly(&env, &expected).await;
    let (a, b) = (counters(&c1.stop()), counters(&c2.stop()));
    assert_eq!(a.readings_stored + b.readings_stored, expected.len() as u64);
    assert!(
        a.messages > 0 && b.messages > 0,
        "both collectors took a share: {a:?} {b:?}"
    );
    assert_eq!(a.dead_letters + b.dead_letters, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn many_devices_two_collectors_sqlite() {
    many_devices_two_collectors(Env::sqlite()).await;
}

/// The same with every process as its own least-privilege user over TLS.
#[tokio::test(flavor = "multi_thread")]
async fn many_devices_two_collectors_secure() {
    many_devices_two_collectors(Env::secure_sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn many_devices_two_collectors_postgres() {
    if let Some(env) = Env::postgres("many_devices") {
        many_devices_two_collectors(env).await;
    }
}

async fn crash_and_downtime(env: Env) {
    let js = env.js().await;
    env.run(&["init"]);
    let store = env.store().await;
    let mut expected = Vec::new();
    let mut collector = env.spawn(&["collect"]);
    // Publish while the collector works, and kill it with SIGKILL mid-stream.
    let mut killed = false;
    for r in 0..15 {
        let (msgs, readings) = round(r);
        publish_all(&js, &msgs).await;
        expected.extend(readings);
        if !killed && store.count_readings().await.unwrap() > 2_000 {
            collector.kill();
            killed = true;
        }
    }
    if !killed {
        collector.kill();
    }
    // More readings while no collector runs at all.
    for r in 15..21 {
        let (msgs, readings) = round(r);
        publish_all(&js, &msgs).await;
        expected.extend(readings);
    }
    assert!(store.count_readings().await.unwrap() < expected.len() as u64);
    let mut c2 = env.spawn(&["collect", "--json"]);
    let mut c3 = env.spawn(&["collect", "--json"]);
    assert_stored_exactly(&env, &expected).await;
    let (a, b) = (counters(&c2.stop()), counters(&c3.stop()));
    eprintln!("after restart: {a:?} {b:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_and_downtime_sqlite() {
    crash_and_downtime(Env::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_and_downtime_secure() {
    crash_and_downtime(Env::secure_sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_and_downtime_postgres() {
    if let Some(env) = Env::postgres("crash") {
        crash_and_downtime(env).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn same_msg_id_is_stored_once() {
    let env = Env::sqlite();
    env.run(&["init"]);
    let js = env.js().await;
    for (id, value) in [("m-1", "10"), ("m-1", "10"), ("m-2", "20"), ("m-1", "10")] {
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", id);
        js.publish_with_headers("vehicle.v1.speed", h, Bytes::from(value))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let _collector = env.spawn(&["collect"]);
    let store = env.store().await;
    assert_eq!(wait_for_count(&*store, 2, Duration::from_secs(30)).await, 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = stored_values(&*store, [("v1".to_string(), "speed".to_string())]).await;
    assert_eq!(
        got[&("v1".to_string(), "speed".to_string())],
        vec![10.0, 20.0]
    );
}
