//! Other clients feed fleetpipe unchanged: the official C client publishing the reference
//! design's exact format, and nats-py publishing JSON.

use std::process::Command;
use std::time::Duration;

use fleetpipe_proto::Timestamp;

use crate::support::*;

/// The reference design's publisher: plain core-NATS publishes of the value as text.
const C_PUBLISHER: &str = r#"
#include <stdio.h>
#include <nats/nats.h>

int main(int argc, char **argv) {
    natsConnection *conn = NULL;
    if (natsConnection_ConnectTo(&conn, argv[1]) != NATS_OK) return 1;
    char subject[64], value[32];
    for (int i = 0; i < 200; i++) {
        snprintf(subject, sizeof subject, "vehicle.%d.speed", 4600 + i % 20);
        snprintf(value, sizeof value, (i % 2) ? "%d.25" : "%d", i);
        if (natsConnection_PublishString(conn, subject, value) != NATS_OK) return 2;
    }
    if (natsConnection_FlushTimeout(conn, 5000) != NATS_OK) return 3;
    natsConnection_Destroy(conn);
    return 0;
}
"#;

fn skip(var: &str, what: &str) -> bool {
    let skip =
        std::env::var(var).as_deref() == Ok("1") && std::env::var("CI").as_deref() != Ok("true");
    if skip {
        eprintln!("skipping: {var}=1 ({what})");
    }
    skip
}

#[tokio::test(flavor = "multi_thread")]
async fn official_c_client_publishes_the_seed_format() {
    if skip(
        "FLEETPIPE_SKIP_C",
        "the C client test needs cc and libnats-dev",
    ) {
        return;
    }
    let env = Env::sqlite();
    env.run(&["init"]);
    let bin = build_c_client(env.dir.path(), C_PUBLISHER);
    let _collector = env.spawn(&["collect"]);
    let status = Command::new(&bin).arg(env.nats.url()).status().unwrap();
    assert!(status.success(), "C publisher failed: {status}");

    let store = env.store().await;
    assert_eq!(
        wait_for_count(&*store, 200, Duration::from_secs(30)).await,
        200
    );
    let series = (0..20).map(|d| (format!("{}", 4600 + d), "speed".to_string()));
    let got = stored_values(&*store, series).await;
    for d in 0..20usize {
        let want: Vec<f64> = (0..200usize)
            .filter(|i| i % 20 == d)
            .map(|i| {
                if i % 2 == 1 {
                    i as f64 + 0.25
                } else {
                    i as f64
                }
            })
            .collect();
        assert_eq!(got[&(format!("{}", 4600 + d), "speed".to_string())], want);
    }
    // The latest state as in the reference design's KV bucket.
    let state: Vec<serde_json::Value> =
        serde_json::from_str(&env.run(&["state", "4619", "--json"])).unwrap();
    assert_eq!(state.len(), 1);
    assert_eq!(state[0]["value"], 199.25);
}

const PY_PUBLISHER: &str = r#"
import asyncio, json, sys
import nats

async def main():
    nc = await nats.connect(sys.argv[1])
    js = nc.jetstream()
    for i in range(50):
        body = {"value": 2.45 + i, "unit": "mm/s", "timestamp": f"{sys.argv[2]}{i:02d}Z", "quality": "good"}
        await js.publish(f"acme.munich.hall-a.line-1.cnc-{i % 5:03d}.spindle.vibration.rms", json.dumps(body).encode())
    await nc.close()

asyncio.run(main())
"#;

#[tokio::test(flavor = "multi_thread")]
async fn nats_py_publishes_json_on_a_deep_template() {
    if skip(
        "FLEETPIPE_SKIP_PY",
        "the nats-py test needs python3 with nats-py",
    ) {
        return;
    }
    let env = Env::sqlite();
    let template = [
        "--subject-template",
        "acme.{site}.{area}.{line}.{device}.{sensor}",
    ];
    // The template flag is global: pass it before the subcommand's own flags.
    let run = |args: &[&str]| {
        let mut all = template.to_vec();
        all.extend_from_slice(args);
        env.run(&all)
    };
    run(&["init"]);
    let script = env.dir.path().join("publish.py");
    std::fs::write(&script, PY_PUBLISHER).unwrap();
    let mut collector = {
        let mut all = template.to_vec();
        all.push("collect");
        env.spawn(&all)
    };
    // An hour ago, to the minute (`2026-11-30T09:15:`): within the raw retention.
    let minute = {
        let t = Timestamp::now().as_micros() - 3_600_000_000;
        Timestamp::from_micros(t - t.rem_euclid(60_000_000)).to_rfc3339()[..17].to_string()
    };
    let out = Command::new("python3")
        .arg(&script)
        .arg(env.nats.url())
        .arg(&minute)
        .output()
        .expect("python3 is needed");
    assert!(
        out.status.success(),
        "nats-py publisher failed (pip install nats-py): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = env.store().await;
    assert_eq!(
        wait_for_count(&*store, 50, Duration::from_secs(30)).await,
        50
    );
    let points = store
        .history("cnc-003", "spindle.vibration.rms", all_time(), 100)
        .await
        .unwrap();
    let got: Vec<(String, f64, Option<String>)> = points
        .iter()
        .map(|p| (p.ts.to_rfc3339(), p.value, p.quality.clone()))
        .collect();
    let want: Vec<(String, f64, Option<String>)> = (0..50)
        .filter(|i| i % 5 == 3)
        .map(|i| {
            (
                format!("{minute}{i:02}Z"),
                2.45 + i as f64,
                Some("good".to_string()),
            )
        })
        .collect();
    assert_eq!(got, want);
    let state: Vec<serde_json::Value> =
        serde_json::from_str(&run(&["state", "cnc-003", "--json"])).unwrap();
    assert_eq!(state[0]["sensor"], "spindle.vibration.rms");
    assert_eq!(state[0]["unit"], "mm/s");
    collector.stop();
}
