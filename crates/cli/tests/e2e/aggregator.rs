//! The aggregator at 100 ms over 10,000 devices: a full row set every tick, one writer
//! among two replicas, and a quick takeover when the writer dies.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fleetpipe_proto::Timestamp;
use fleetpipe_store::Range;

use crate::support::*;

const DEVICES: usize = 10_000;
const INTERVAL_US: i64 = 100_000;

#[tokio::test(flavor = "multi_thread")]
async fn aggregator_at_100ms_one_writer_and_takeover() {
    let env = Env::sqlite();
    env.run(&["init"]);
    let js = env.js().await;
    let mut state = Vec::with_capacity(DEVICES * 2);
    let ts = Timestamp::now().as_micros();
    for d in 0..DEVICES {
        for (sensor, value) in [("speed", d as f64), ("soc", 50.0)] {
            state.push((
                format!("$KV.fleetpipe_state.a{d:05}.{sensor}"),
                format!(r#"{{"value":{value},"ts":{ts}}}"#),
            ));
        }
    }
    publish_all(&js, &state).await;

    let args = ["aggregate", "--interval", "100ms", "--json"];
    let mut a = env.spawn(&args);
    let mut b = env.spawn(&args);
    let store = env.store().await;
    // Wait for ten ticks (not a fixed time: a loaded machine is slower to start).
    let waited = Instant::now();
    loop {
        let rows = store
            .snapshots(None, all_time(), 10 * DEVICES)
            .await
            .unwrap();
        if rows.len() >= 10 * DEVICES || waited.elapsed() > Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Who writes? The lease holder is `<host>-<pid>-<nonce>`.
    let leases = js.get_key_value("fleetpipe_leases").await.unwrap();
    let holder = leases
        .get("aggregator")
        .await
        .unwrap()
        .expect("a lease holder");
    let holder = String::from_utf8(holder.to_vec()).unwrap();
    let pid: u32 = holder.rsplit('-').nth(1).unwrap().parse().unwrap();
    let (writer, standby) = if pid == a.pid() {
        (&mut a, &mut b)
    } else {
        assert_eq!(pid, b.pid(), "lease held by {holder}");
        (&mut b, &mut a)
    };

    let rows = store.snapshots(None, all_time(), 10_000_000).await.unwrap();
    let mut per_tick: BTreeMap<i64, usize> = BTreeMap::new();
    for r in &rows {
        *per_tick.entry(r.ts.as_micros()).or_default() += 1;
        assert_eq!(r.values.len(), 2);
        assert_eq!(r.values["soc"], 50.0);
    }
    eprintln!("{} ticks written in {:?}", per_tick.len(), waited.elapsed());
    assert!(
        per_tick.len() >= 10,
        "only {} ticks in 30 s",
        per_tick.len()
    );
    for (tick, n) in &per_tick {
        assert_eq!(tick % INTERVAL_US, 0, "ticks are aligned to the interval");
        assert_eq!(*n, DEVICES, "tick {tick} has a row for every device");
    }

    // Kill the writer; the standby takes over once the lease expires.
    let killed_at = Timestamp::now();
    let started = Instant::now();
    writer.kill();
    let takeover = loop {
        let newer = store
            .snapshots(
                None,
                Range {
                    from: killed_at.saturating_add_micros(INTERVAL_US),
                    to: Timestamp::from_micros(i64::MAX / 2),
                },
                1,
            )
            .await
            .unwrap();
        if !newer.is_empty() {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no takeover in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("standby took over after {takeover:?}");
    assert!(
        takeover < Duration::from_secs(10),
        "takeover took {takeover:?}"
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    let counters: serde_json::Value = serde_json::from_str(&standby.stop()).unwrap();
    assert!(
        counters["aggregator_standby"].as_u64().unwrap() > 0,
        "{counters}"
    );
    assert!(
        counters["aggregator_ticks"].as_u64().unwrap() > 0,
        "{counters}"
    );
    assert_eq!(counters["aggregator_errors"], 0);
}
