//! `fleetpipe serve` next to `fleetpipe collect`: the API mirrors the latest state from
//! NATS, reads history from the store, reports broker figures, streams changes live, and
//! stops promptly on SIGTERM with a live client still connected.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// `GET path` on a fresh connection; the status and the body.
async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

async fn get_json(port: u16, path: &str) -> (u16, Value) {
    let (status, body) = http_get(port, path)
        .await
        .unwrap_or_else(|| panic!("GET {path}: no response"));
    let value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"));
    (status, value)
}

/// Polls `path` until `check` accepts the JSON body, for up to 30 s.
async fn eventually(port: u16, path: &str, check: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((status, body)) = http_get(port, path).await {
            if let Ok(v) = serde_json::from_str::<Value>(&body) {
                if check(status, &v) {
                    return v;
                }
                assert!(Instant::now() < deadline, "GET {path}: still {status} {v}");
            }
        }
        assert!(Instant::now() < deadline, "GET {path}: no answer in 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_mirrors_state_history_and_live_changes() {
    let env = Env::sqlite();
    env.run(&["init"]);
    let js = env.js().await;
    let mut msgs = Vec::new();
    for d in 0..20 {
        msgs.push((
            format!("vehicle.s{d:02}.speed"),
            format!(r#"{{"value":{d},"unit":"km/h"}}"#),
        ));
        msgs.push((format!("vehicle.s{d:02}.soc"), format!("{}", 50 + d)));
    }
    msgs.push(("vehicle.bad.speed".into(), "fast".into()));
    publish_all(&js, &msgs).await;
    let _collector = env.spawn(&["collect"]);
    let store = env.store().await;
    assert_eq!(
        wait_for_count(&*store, 40, Duration::from_secs(30)).await,
        40
    );

    let port = fleetpipe_testkit::free_port();
    let mut serve = env.spawn(&["serve", "--http", &format!("127.0.0.1:{port}")]);
    let ready = eventually(port, "/readyz", |status, _| status == 200).await;
    assert_eq!(ready["nats"], "connected");

    // The latest state, replayed from the KV bucket.
    let (status, list) = get_json(port, "/api/v1/devices?prefix=s0&limit=3").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["total"], 10);
    assert_eq!(list["items"][1]["id"], "s01");
    assert_eq!(list["items"][1]["sensors"]["speed"]["unit"], "km/h");
    assert_eq!(list["items"][1]["sensors"]["soc"]["value"], 51.0);
    assert_eq!(list["items"][1]["online"], true);

    // History from the store.
    let (status, series) = get_json(port, "/api/v1/devices/s03/series?sensor=speed&from=-1h").await;
    assert_eq!(status, 200, "{series}");
    assert_eq!(series["source"], "raw");
    assert_eq!(series["points"][0]["value"], 3.0);

    // The dead letter, counted from the broker.
    eventually(port, "/api/v1/fleet/summary", |_, s| {
        s["devices"] == 20 && s["dead_letters"] == 1
    })
    .await;
    let (status, metrics) = http_get(port, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(metrics.contains("fleetpipe_consumer_pending "), "{metrics}");
    assert!(metrics.contains("fleetpipe_devices 20"), "{metrics}");
    let (status, missing) = get_json(port, "/api/v1/devices/nope").await;
    assert_eq!(
        (status, missing["error"].as_str()),
        (404, Some("device \"nope\" not found"))
    );

    // A live client sees a new reading.
    let mut live = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    live.write_all(b"GET /api/v1/live?device=s07&sensor=speed HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut published = false;
    while !seen.contains("event: state") {
        assert!(Instant::now() < deadline, "no live event in 30 s: {seen}");
        if !published && seen.contains("200 OK") {
            publish_all(&js, &[("vehicle.s07.speed".into(), "77.5".into())]).await;
            published = true;
        }
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), live.read(&mut buf)).await
        {
            assert!(n > 0, "live stream closed: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    assert!(
        seen.contains(r#""device":"s07","sensor":"speed","value":77.5"#),
        "{seen}"
    );

    // SIGTERM with the live client still connected: the stream ends and the process
    // exits cleanly (`stop` asserts a successful exit).
    serve.stop();
}
