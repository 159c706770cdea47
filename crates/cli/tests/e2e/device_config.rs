//! `fleetpipe device config set|get` end to end: the value lands in `fleetpipe_config`,
//! `get` prints it with its revision, a bad file never reaches the bucket, and `set`
//! reports the device's answer on `vehicle.<ID>._status`. (The agent's side — applying,
//! refusing, reporting — is tested in `crates/agent/tests`.)

use std::time::Duration;

use futures::StreamExt;

use crate::support::Env;

#[tokio::test]
async fn device_config_set_get_and_the_devices_answer() {
    let env = Env::sqlite();
    let file = env.dir.path().join("d1.toml");
    std::fs::write(&file, "[sensors.speed]\nrate_hz = 5.0\n").unwrap();
    let f = file.to_str().unwrap();

    // No device listening: stored, "no answer".
    let out = env.run(&[
        "device", "config", "set", "d1", f, "--wait", "500ms", "--json",
    ]);
    let set: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(set["outcome"], "no answer", "{set}");
    let rev = set["revision"].as_u64().unwrap();
    let got: serde_json::Value =
        serde_json::from_str(&env.run(&["device", "config", "get", "d1", "--json"])).unwrap();
    assert_eq!(got["revision"].as_u64(), Some(rev));
    assert_eq!(got["config"], "[sensors.speed]\nrate_hz = 5.0\n");

    // A bad file: every problem, nothing stored.
    std::fs::write(&file, "[sensors.speed]\nrate_hz = -1\ndeadband = -2\n").unwrap();
    let out = env
        .cmd(&["device", "config", "set", "d1", f])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rate_hz") && err.contains("deadband"), "{err}");
    let got: serde_json::Value =
        serde_json::from_str(&env.run(&["device", "config", "get", "d1", "--json"])).unwrap();
    assert_eq!(got["revision"].as_u64(), Some(rev));

    // A device that refuses (a stand-in speaking the agent's status format on a real
    // server): `set` says so and fails.
    let client = async_nats::connect(env.nats.url()).await.unwrap();
    let mut changes = client.subscribe("$KV.fleetpipe_config.d1").await.unwrap();
    client.flush().await.unwrap();
    let device = tokio::spawn(async move {
        let m = changes.next().await.unwrap();
        let _ = m;
        let status = serde_json::json!({
            "device": "d1", "config_revision": 1, "refused_revision": 2,
            "refused_reason": "sensors.nope: this device has no such sensor", "at": "now"
        });
        client
            .publish("vehicle.d1._status", status.to_string().into())
            .await
            .unwrap();
        client.flush().await.unwrap();
    });
    std::fs::write(&file, "[sensors.nope]\nenabled = false\n").unwrap();
    let out = tokio::task::spawn_blocking({
        let mut cmd = env.cmd(&["device", "config", "set", "d1", f, "--wait", "5s"]);
        move || cmd.output().unwrap()
    })
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(5), device)
        .await
        .unwrap()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("REFUSED revision 2") && err.contains("no such sensor"),
        "{err}"
    );
}
