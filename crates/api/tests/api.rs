//! The HTTP API through its router (no socket, `oneshot`), with a real SQLite store in a
//! temporary directory and an index filled directly; a watch against a real nats-server;
//! and a schema-driven fuzz run against a running server.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use fleetpipe_api::{router, AppState, Index, Limits};
use fleetpipe_pipeline::state::StateValue;
use fleetpipe_pipeline::Stats;
use fleetpipe_proto::{Reading, Timestamp};
use fleetpipe_store::{
    Point, Range, Record, Resolution, Rollup, SeriesInfo, SeriesKey, Snapshot, Store, StoreError,
};
use futures::StreamExt;
use serde_json::Value;
use tower::ServiceExt;

const SEC: i64 = 1_000_000;
const MIN: i64 = 60 * SEC;
const HOUR: i64 = 60 * MIN;
const DEVICES: i64 = 20;

/// A router over a SQLite store and an index of 20 devices:
/// * `v000NN`, sensors `speed` (km/h), `soc` (%), `gps.lat`, `gps.lon`, last seen `NN × 4 s`
///   ago (so `v00000`..`v00007` are online), tag `site` = `munich` for even NN, `paris`
///   for odd;
/// * in the store: `v00001`/`speed` every 10 s over the last 8 h; `v00002`/`speed` every
///   0.25 s over the last hour (more than the raw cap); `ghost`/`speed` (in the store
///   only, not in the index) over the last 10 min.
struct Fixture {
    _dir: tempfile::TempDir,
    state: AppState,
    now: i64,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("api.db").display());
        let store = fleetpipe_store::open(&url).await.unwrap();
        let now = Timestamp::now().as_micros();
        let index = Arc::new(Index::new());
        for i in 0..DEVICES {
            let device = format!("v{i:05}");
            let ts = now - i * 4 * SEC;
            let site = if i % 2 == 0 { "munich" } else { "paris" };
            for (sensor, value, unit) in [
                ("speed", 10.0 * i as f64, Some("km/h")),
                ("soc", 100.0 - i as f64, Some("%")),
                ("gps.lat", 48.0 + i as f64 / 100.0, None),
                ("gps.lon", 2.0 + i as f64 / 100.0, None),
            ] {
                index.apply_put(&device, sensor, state(value, ts, unit, &[("site", site)]));
            }
        }
        index.mark_ready();

        let mut records = Vec::new();
        let mut seq = 0;
        let mut push = |device: &str, sensor: &str, ts: i64, value: f64| {
            seq += 1;
            records.push(Record {
                seq,
                reading: Reading {
                    device: device.into(),
                    sensor: sensor.into(),
                    value,
                    ts: Timestamp::from_micros(ts),
                    unit: Some("km/h".into()),
                    quality: None,
                    tags: Default::default(),
                },
            });
        };
        for k in 0..(8 * 360) {
            push(
                "v00001",
                "speed",
                now - 8 * HOUR + k * 10 * SEC,
                k as f64 % 100.0,
            );
        }
        for k in 0..(4 * 3600) {
            push("v00002", "speed", now - HOUR + k * SEC / 4, 1.0);
        }
        for k in 0..60 {
            push("ghost", "speed", now - 10 * MIN + k * 10 * SEC, 5.0);
        }
        for chunk in records.chunks(5000) {
            store.write_readings(chunk).await.unwrap();
        }
        let state = AppState::new(index, store, Arc::new(Stats::default()));
        Fixture {
            _dir: dir,
            state,
            now,
        }
    }

    fn app(&self) -> Router {
        router(self.state.clone())
    }
}

fn state(value: f64, ts: i64, unit: Option<&str>, tags: &[(&str, &str)]) -> StateValue {
    StateValue {
        value,
        ts,
        unit: unit.map(str::to_string),
        quality: None,
        tags: tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        seq: 0,
    }
}

async fn request(app: &Router, method: &str, uri: &str) -> (StatusCode, String, Vec<u8>) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let content_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, content_type, body.to_vec())
}

async fn get_json(app: &Router, uri: &str) -> (StatusCode, Value) {
    let (status, content_type, body) = request(app, "GET", uri).await;
    assert!(
        content_type.starts_with("application/json"),
        "{uri}: content type {content_type:?}"
    );
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{uri}: not JSON ({e}): {}", String::from_utf8_lossy(&body)));
    (status, value)
}

/// Asserts a 400 (or other error) whose message mentions `needle`.
async fn assert_error(app: &Router, uri: &str, want: StatusCode, needle: &str) {
    let (status, body) = get_json(app, uri).await;
    assert_eq!(status, want, "{uri}: {body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(
        message.contains(needle),
        "{uri}: error {message:?} does not mention {needle:?}"
    );
}

fn ids(body: &Value) -> Vec<&str> {
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------
// devices

#[tokio::test]
async fn devices_default_listing() {
    let f = Fixture::new().await;
    let (status, body) = get_json(&f.app(), "/api/v1/devices").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["total"], 20);
    assert_eq!(body["limit"], 100);
    assert_eq!(body["offset"], 0);
    let ids = ids(&body);
    assert_eq!(ids.len(), 20);
    assert_eq!(ids[0], "v00000");
    assert!(ids.windows(2).all(|w| w[0] < w[1]));

    let d = &body["items"][3];
    assert_eq!(d["id"], "v00003");
    assert_eq!(d["online"], true);
    assert_eq!(d["tags"], serde_json::json!({"site": "paris"}));
    let last_seen = Timestamp::from_micros(f.now - 12 * SEC).to_rfc3339();
    assert_eq!(d["last_seen"], last_seen.as_str());
    assert_eq!(
        d["sensors"]["speed"],
        serde_json::json!({"value": 30.0, "ts": last_seen, "unit": "km/h"})
    );
    assert_eq!(d["sensors"]["gps.lat"]["unit"], Value::Null);
    assert_eq!(body["items"][19]["online"], false);
}

#[tokio::test]
async fn devices_filters_sort_and_pages() {
    let f = Fixture::new().await;
    let app = f.app();
    let cases: &[(&str, u64, &[&str])] = &[
        ("prefix=v0001", 10, &["v00010", "v00011"]),
        (
            "tag=site:munich&limit=3",
            10,
            &["v00000", "v00002", "v00004"],
        ),
        (
            "tag=site%3Aparis&prefix=v0001&limit=2",
            5,
            &["v00011", "v00013"],
        ),
        ("tag=site:munich&tag=site:paris", 0, &[]),
        ("tag=site:berlin", 0, &[]),
        ("sort=last_seen&limit=2", 20, &["v00019", "v00018"]),
        (
            "sort=last_seen&order=desc&limit=2",
            20,
            &["v00000", "v00001"],
        ),
        ("order=desc&limit=1", 20, &["v00019"]),
        ("limit=2&offset=5", 20, &["v00005", "v00006"]),
        ("offset=100", 20, &[]),
        ("limit=0", 20, &[]),
        (
            "online=true",
            8,
            &[
                "v00000", "v00001", "v00002", "v00003", "v00004", "v00005", "v00006", "v00007",
            ],
        ),
        ("online=false&limit=1", 12, &["v00008"]),
        ("prefix=", 20, &["v00000"]),
        ("prefix=zzz", 0, &[]),
    ];
    for (query, total, want) in cases {
        let uri = format!("/api/v1/devices?{query}");
        let (status, body) = get_json(&app, &uri).await;
        assert_eq!(status, StatusCode::OK, "{uri}: {body}");
        assert_eq!(body["total"], *total, "{uri}");
        let got = ids(&body);
        assert_eq!(&got[..want.len().min(got.len())], *want, "{uri}");
    }
    let (_, body) = get_json(&app, "/api/v1/devices?limit=10000").await;
    assert_eq!(body["limit"], 10000);
}

#[tokio::test]
async fn devices_bad_parameters() {
    let f = Fixture::new().await;
    let app = f.app();
    let cases = [
        ("limit=10001", "limit must be an integer from 0 to 10000"),
        ("limit=abc", "limit"),
        ("limit=-1", "limit"),
        ("limit=", "limit"),
        ("offset=-5", "offset"),
        ("offset=1.5", "offset"),
        ("sort=name", "sort must be one of id, last_seen"),
        ("order=up", "order must be one of asc, desc"),
        ("online=maybe", "online must be one of true, false"),
        ("tag=site", "tag must be KEY:VALUE"),
        ("tag=:munich", "tag must be KEY:VALUE"),
        (
            "tag=site:mun%01ich",
            "the tag value holds a control character",
        ),
        (
            "tag=si%0Ate:munich",
            "the tag name holds a control character",
        ),
        ("limit=1&limit=2", "\"limit\" is given more than once"),
        (
            "sensor=speed",
            "unknown parameter \"sensor\"; accepted: prefix, tag",
        ),
    ];
    for (query, needle) in cases {
        assert_error(
            &app,
            &format!("/api/v1/devices?{query}"),
            StatusCode::BAD_REQUEST,
            needle,
        )
        .await;
    }
}

#[tokio::test]
async fn one_device() {
    let f = Fixture::new().await;
    let app = f.app();
    let (status, body) = get_json(&app, "/api/v1/devices/v00007").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["id"], "v00007");
    assert_eq!(body["sensors"].as_object().unwrap().len(), 4);
    assert_eq!(body["sensors"]["soc"]["value"], 93.0);

    let (status, body) = get_json(&app, "/api/v1/devices/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        body,
        serde_json::json!({"error": "device \"nope\" not found"})
    );
    // Not valid UTF-8 once decoded: not a device either.
    assert_error(
        &app,
        "/api/v1/devices/%FF%FE",
        StatusCode::NOT_FOUND,
        "not found",
    )
    .await;
    assert_error(
        &app,
        "/api/v1/devices/v00001?verbose=1",
        StatusCode::BAD_REQUEST,
        "unknown parameter \"verbose\"; accepted: none",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// series

#[tokio::test]
async fn series_raw_and_rollups() {
    let f = Fixture::new().await;
    let app = f.app();

    // 10 minutes: raw readings.
    let (status, body) =
        get_json(&app, "/api/v1/devices/v00001/series?sensor=speed&from=-10m").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["source"], "raw");
    assert_eq!(body["device"], "v00001");
    assert_eq!(body["sensor"], "speed");
    assert_eq!(body["unit"], "km/h");
    assert!(body.get("step").is_none());
    let points = body["points"].as_array().unwrap();
    assert!((59..=61).contains(&points.len()), "{}", points.len());
    assert_eq!(points[0].as_object().unwrap().len(), 2, "{}", points[0]);
    assert!(points[0]["ts"].as_str().unwrap() < points[1]["ts"].as_str().unwrap());

    // Longer than 6 h: rollups per minute.
    let (_, body) = get_json(&app, "/api/v1/devices/v00001/series?sensor=speed&from=-8h").await;
    assert_eq!(body["source"], "rollup_1m");
    assert_eq!(body["step"], 60);
    let points = body["points"].as_array().unwrap();
    assert!((479..=481).contains(&points.len()), "{}", points.len());
    let p = &points[10];
    for field in ["ts", "value", "min", "max", "count", "last"] {
        assert!(p.get(field).is_some(), "{p} lacks {field}");
    }
    assert_eq!(p["count"], 6);
    let total: u64 = points.iter().map(|p| p["count"].as_u64().unwrap()).sum();
    assert_eq!(total, 8 * 360);

    // A step of a minute or more: rollups in buckets of the step.
    let (_, body) = get_json(
        &app,
        "/api/v1/devices/v00001/series?sensor=speed&from=-1h&step=5m",
    )
    .await;
    assert_eq!(body["source"], "rollup_1m");
    assert_eq!(body["step"], 300);
    let points = body["points"].as_array().unwrap();
    assert!((12..=13).contains(&points.len()), "{}", points.len());
    // A step under a minute keeps raw readings.
    let (_, body) = get_json(
        &app,
        "/api/v1/devices/v00001/series?sensor=speed&from=-2m&step=10",
    )
    .await;
    assert_eq!(body["source"], "raw");

    // One hour holding more raw readings than the cap: rollups after all.
    let (_, body) = get_json(&app, "/api/v1/devices/v00002/series?sensor=speed&from=-1h").await;
    assert_eq!(body["source"], "rollup_1m");
    let (_, body) = get_json(&app, "/api/v1/devices/v00002/series?sensor=speed&from=-20m").await;
    assert_eq!(body["source"], "raw");
    let n = body["points"].as_array().unwrap().len();
    assert!((4780..=4800).contains(&n), "{n}");

    // Absolute times, an explicit `to`, and `+` offsets encoded or not.
    let from = Timestamp::from_micros(f.now - 30 * MIN).to_rfc3339();
    let to = Timestamp::from_micros(f.now - 20 * MIN).to_rfc3339();
    let (status, body) = get_json(
        &app,
        &format!("/api/v1/devices/v00001/series?sensor=speed&from={from}&to={to}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["from"], from.as_str());
    assert_eq!(body["to"], to.as_str());
    assert_eq!(body["points"].as_array().unwrap().len(), 60);
    // A month before now, with an offset instead of `Z`.
    let month_ago = Timestamp::from_micros(f.now - 30 * 24 * HOUR).to_rfc3339();
    let month_ago = month_ago.trim_end_matches('Z');
    for offset in ["%2B00:00", "+00:00"] {
        let uri =
            format!("/api/v1/devices/v00001/series?sensor=speed&from={month_ago}{offset}&to=now");
        let (status, body) = get_json(&app, &uri).await;
        // A long range, so hourly rollups.
        assert_eq!(status, StatusCode::OK, "{uri}: {body}");
        assert_eq!(body["source"], "rollup_1h");
        assert_eq!(body["step"], 3600);
    }

    // A device known only to the store still has a history; a known sensor with no data
    // in range is an empty series.
    let (status, body) = get_json(&app, "/api/v1/devices/ghost/series?sensor=speed").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["points"].as_array().unwrap().len(), 60);
    // The unit the store last saw, the latest state having none.
    assert_eq!(body["unit"], "km/h");
    assert_eq!(body["tags"], serde_json::json!({}));
    let (status, body) = get_json(&app, "/api/v1/devices/v00005/series?sensor=soc").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["unit"], "%");
    assert_eq!(body["points"], serde_json::json!([]));
}

/// Once raw readings before some instant are pruned, a range starting before it is served
/// from rollups, which are kept longer, rather than answering with a hole.
#[tokio::test]
async fn series_before_the_raw_horizon_come_from_rollups() {
    let f = Fixture::new().await;
    let app = f.app();
    let url = "/api/v1/devices/v00001/series?sensor=speed&from=-50m";
    let (_, body) = get_json(&app, url).await;
    assert_eq!(body["source"], "raw");
    f.state
        .store
        .prune_readings(Timestamp::from_micros(f.now - 30 * 60 * SEC))
        .await
        .unwrap();
    let (status, body) = get_json(&app, url).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["source"], "rollup_1m");
    let points = body["points"].as_array().unwrap();
    assert!((49..=51).contains(&points.len()), "{}", points.len());
    // After the horizon, raw readings as before.
    let (_, body) = get_json(&app, "/api/v1/devices/v00001/series?sensor=speed&from=-20m").await;
    assert_eq!(body["source"], "raw");
}

#[tokio::test]
async fn series_errors() {
    let f = Fixture::new().await;
    let app = f.app();
    let base = "/api/v1/devices/v00001/series";
    let bad = [
        ("", "sensor is required"),
        ("sensor=", "sensor is required"),
        (
            "sensor=speed&from=yesterday",
            "from \"yesterday\" is neither an RFC 3339 time",
        ),
        ("sensor=speed&to=later", "to \"later\" is neither"),
        ("sensor=speed&from=-1h&to=-2h", "must be before to"),
        ("sensor=speed&from=now&to=now", "must be before to"),
        (
            "sensor=speed&from=-400d",
            "must not be longer than 366 days",
        ),
        (
            "sensor=speed&from=1969-01-01T00:00:00Z",
            "outside 1970-01-01..9999-12-31",
        ),
        ("sensor=speed&step=0", "step must be a positive duration"),
        ("sensor=speed&step=fast", "step must be a positive duration"),
        ("sensor=speed&step=-5m", "step must be a positive duration"),
        (
            "sensor=speed&step=400d",
            "step must be a positive duration up to",
        ),
        (
            "sensor=speed&sensor=soc",
            "\"sensor\" is given more than once",
        ),
        ("sensor=sp%00eed", "is not a sensor name"),
        ("sensor=gps..lat", "is not a sensor name"),
        ("sensor=speed%20", "is not a sensor name"),
        (
            "sensor=speed&resolution=1m",
            "unknown parameter \"resolution\"; accepted: sensor, tag, from, to, step",
        ),
    ];
    for (query, needle) in bad {
        assert_error(
            &app,
            &format!("{base}?{query}"),
            StatusCode::BAD_REQUEST,
            needle,
        )
        .await;
    }
    assert_error(
        &app,
        "/api/v1/devices/nope/series?sensor=speed",
        StatusCode::NOT_FOUND,
        "device \"nope\" not found",
    )
    .await;
    assert_error(
        &app,
        "/api/v1/devices/bad%00id/series?sensor=speed",
        StatusCode::NOT_FOUND,
        "not found",
    )
    .await;
    assert_error(
        &app,
        "/api/v1/devices/v00001/series?sensor=altitude",
        StatusCode::NOT_FOUND,
        "device \"v00001\" has no sensor \"altitude\"",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// series told apart by their tags (Telegraf)

/// `cpu.usage_idle{cpu=cpu<c>,host=h1}`'s value: 90 + c, so each series is recognisable.
fn cpu_tags(c: usize) -> Vec<(String, String)> {
    vec![
        ("cpu".to_string(), format!("cpu{c}")),
        ("host".to_string(), "h1".to_string()),
    ]
}

/// What Telegraf's `cpu` and `mem` inputs make of host `h1`: `cpu.usage_idle` for cpu0..cpu3
/// and `mem.used_percent`, all tagged `host=h1`, a reading every 10 s over the last 10
/// minutes in the store, the latest in the index (through their KV keys). Also
/// `cpu.usage_idle` of `cpu4` in the index only (no reading stored yet), and a device
/// `many` with 12 series of `x` told apart by a tag `n`.
async fn add_telegraf_host(state: &AppState, now: i64) {
    let mut records = Vec::new();
    let mut put =
        |device: &str, sensor: &str, tags: &[(String, String)], value: f64, store: bool| {
            let key = fleetpipe_pipeline::state::key(device, sensor, tags);
            let v = StateValue {
                value,
                ts: now,
                unit: Some("%".into()),
                quality: None,
                tags: tags.iter().cloned().collect(),
                seq: 0,
            };
            let json = serde_json::to_vec(&v).unwrap();
            assert!(state.index.apply_entry(
                &key,
                async_nats::jetstream::kv::Operation::Put,
                &json
            ));
            if store {
                for k in 0..60 {
                    records.push(Record {
                        seq: 1_000_000 + records.len() as u64,
                        reading: Reading {
                            device: device.into(),
                            sensor: sensor.into(),
                            value,
                            ts: Timestamp::from_micros(now - 10 * MIN + k * 10 * SEC),
                            unit: Some("%".into()),
                            quality: None,
                            tags: fleetpipe_proto::canonical_tags(tags),
                        },
                    });
                }
            }
        };
    for c in 0..4 {
        put("h1", "cpu.usage_idle", &cpu_tags(c), 90.0 + c as f64, true);
    }
    let host = [("host".to_string(), "h1".to_string())];
    put("h1", "mem.used_percent", &host, 42.5, true);
    put("h1", "cpu.usage_idle", &cpu_tags(4), 94.0, false);
    for n in 0..12 {
        put(
            "many",
            "x",
            &[("n".to_string(), format!("{n:02}"))],
            n as f64,
            true,
        );
    }
    state.store.write_readings(&records).await.unwrap();
}

#[tokio::test]
async fn tagged_series_are_listed_with_their_tags() {
    let f = Fixture::new().await;
    add_telegraf_host(&f.state, f.now).await;
    let app = f.app();
    let (status, body) = get_json(&app, "/api/v1/devices/h1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let sensors = body["sensors"].as_object().unwrap();
    let labels: Vec<&str> = sensors.keys().map(String::as_str).collect();
    assert_eq!(
        labels,
        [
            "cpu.usage_idle{cpu=cpu0,host=h1}",
            "cpu.usage_idle{cpu=cpu1,host=h1}",
            "cpu.usage_idle{cpu=cpu2,host=h1}",
            "cpu.usage_idle{cpu=cpu3,host=h1}",
            "cpu.usage_idle{cpu=cpu4,host=h1}",
            "mem.used_percent{host=h1}",
        ]
    );
    let ts = Timestamp::from_micros(f.now).to_rfc3339();
    assert_eq!(
        sensors["cpu.usage_idle{cpu=cpu2,host=h1}"],
        serde_json::json!({
            "value": 92.0, "ts": ts, "unit": "%",
            "sensor": "cpu.usage_idle", "tags": {"cpu": "cpu2", "host": "h1"}
        })
    );
    let idle: Vec<&Value> = sensors
        .values()
        .filter(|v| v["sensor"] == "cpu.usage_idle")
        .collect();
    assert_eq!(idle.len(), 5);
    assert_eq!(sensors["mem.used_percent{host=h1}"]["tags"]["host"], "h1");
    // Untagged series are unchanged: keyed by the sensor, no `sensor` or `tags`.
    let (_, body) = get_json(&app, "/api/v1/devices/v00001").await;
    assert!(body["sensors"]["speed"].get("tags").is_none(), "{body}");
    assert!(body["sensors"]["speed"].get("sensor").is_none(), "{body}");

    // The list shows them too, and the summary aggregates a sensor's tag sets.
    let (_, body) = get_json(&app, "/api/v1/devices?prefix=h").await;
    assert_eq!(body["items"][0]["sensors"].as_object().unwrap().len(), 6);
    let (_, body) = get_json(&app, "/api/v1/fleet/summary").await;
    assert_eq!(
        body["sensors"]["cpu.usage_idle"],
        serde_json::json!({"count": 5, "min": 90.0, "avg": 92.0, "max": 94.0})
    );
}

#[tokio::test]
async fn series_picked_by_their_tags() {
    let f = Fixture::new().await;
    add_telegraf_host(&f.state, f.now).await;
    let app = f.app();
    let base = "/api/v1/devices/h1/series?from=-15m";
    let values = |body: &Value| -> Vec<f64> {
        body["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["value"].as_f64().unwrap())
            .collect()
    };

    // One tag tells the four apart.
    let (status, body) =
        get_json(&app, &format!("{base}&sensor=cpu.usage_idle&tag=cpu:cpu2")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["sensor"], "cpu.usage_idle");
    assert_eq!(
        body["tags"],
        serde_json::json!({"cpu": "cpu2", "host": "h1"})
    );
    assert_eq!(body["unit"], "%");
    assert_eq!(body["source"], "raw");
    assert_eq!(values(&body), vec![92.0; 60]);
    // Every tag, in any order, and as rollups.
    let (status, body) = get_json(
        &app,
        &format!("{base}&tag=host:h1&sensor=cpu.usage_idle&tag=cpu%3Acpu3&step=1m"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["source"], "rollup_1m");
    assert_eq!(body["tags"]["cpu"], "cpu3");
    let total: u64 = body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["count"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 60);
    assert!(values(&body).iter().all(|v| *v == 93.0));

    // A sensor with one series needs no tag.
    let (status, body) = get_json(&app, &format!("{base}&sensor=mem.used_percent")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["tags"], serde_json::json!({"host": "h1"}));
    assert_eq!(values(&body).len(), 60);

    // Every key of the device's `sensors` names its series (the label form).
    let (_, device) = get_json(&app, "/api/v1/devices/h1").await;
    for (label, latest) in device["sensors"].as_object().unwrap() {
        let q: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("sensor", label)
            .finish();
        let (status, body) = get_json(&app, &format!("{base}&{q}")).await;
        assert_eq!(status, StatusCode::OK, "{label}: {body}");
        assert_eq!(body["sensor"], latest["sensor"], "{label}");
        assert_eq!(body["tags"], latest["tags"], "{label}");
    }
    let (status, body) = get_json(
        &app,
        &format!("{base}&sensor=cpu.usage_idle%7Bcpu%3Dcpu1%2Chost%3Dh1%7D"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(values(&body), vec![91.0; 60]);
    // A series the latest state has but the store has no reading of yet: no points.
    let (status, body) =
        get_json(&app, &format!("{base}&sensor=cpu.usage_idle&tag=cpu:cpu4")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["points"], serde_json::json!([]));
    assert_eq!(body["tags"]["cpu"], "cpu4");

    // No tag, or one every series has: a 400 listing the tag sets and how to pick one.
    for query in ["sensor=cpu.usage_idle", "sensor=cpu.usage_idle&tag=host:h1"] {
        let (status, body) = get_json(&app, &format!("{base}&{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        let message = body["error"].as_str().unwrap();
        for needle in [
            "device \"h1\" has 5 series of sensor \"cpu.usage_idle\"",
            "{cpu=cpu0,host=h1}, {cpu=cpu1,host=h1}, {cpu=cpu2,host=h1}, {cpu=cpu3,host=h1}, \
             {cpu=cpu4,host=h1}",
            "add tag=cpu:cpu0",
            "sensor=cpu.usage_idle{cpu=cpu0,host=h1}",
        ] {
            assert!(
                message.contains(needle),
                "{query}: {message:?} lacks {needle:?}"
            );
        }
    }
    assert_error(
        &app,
        &format!("{base}&sensor=cpu.usage_idle&tag=host:h1"),
        StatusCode::BAD_REQUEST,
        "with the tags {host=h1}",
    )
    .await;
    // At most 10 tag sets are listed.
    assert_error(
        &app,
        "/api/v1/devices/many/series?sensor=x",
        StatusCode::BAD_REQUEST,
        "{n=08}, {n=09}, and 2 more; pick one: add tag=n:00",
    )
    .await;

    // Tags no series has: a 404 saying which tag sets there are.
    for query in [
        "sensor=cpu.usage_idle&tag=cpu:cpu9",
        "sensor=cpu.usage_idle&tag=cpu:cpu0&tag=cpu:cpu1",
        "sensor=cpu.usage_idle%7Bcpu%3Dcpu0%7D&tag=host:h2",
        "sensor=mem.used_percent&tag=cpu:cpu0",
    ] {
        let (status, body) = get_json(&app, &format!("{base}&{query}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{query}: {body}");
        let message = body["error"].as_str().unwrap();
        assert!(message.contains("has no series of sensor"), "{message}");
        assert!(message.contains("its tag sets: {"), "{message}");
    }
    assert_error(
        &app,
        &format!("{base}&sensor=cpu.usage_idle&tag=cpu:cpu9"),
        StatusCode::NOT_FOUND,
        "with the tags {cpu=cpu9}",
    )
    .await;
    // A tag on a device or sensor that does not exist changes nothing to those 404s.
    assert_error(
        &app,
        "/api/v1/devices/h1/series?sensor=disk.free&tag=path:/",
        StatusCode::NOT_FOUND,
        "device \"h1\" has no sensor \"disk.free\"",
    )
    .await;
    assert_error(
        &app,
        "/api/v1/devices/h9/series?sensor=cpu.usage_idle&tag=cpu:cpu0",
        StatusCode::NOT_FOUND,
        "device \"h9\" not found",
    )
    .await;

    // Bad tags and labels: precise 400s.
    let long = "x".repeat(300);
    let (long_value, long_name) = (format!("tag=cpu:{long}"), format!("tag={long}:x"));
    let bad = [
        ("tag=cpu", "tag must be KEY:VALUE"),
        ("tag=:cpu0", "tag must be KEY:VALUE"),
        ("tag=cpu:cpu%000", "the tag value holds a control character"),
        ("tag=c%1Bpu:cpu0", "the tag name holds a control character"),
        (
            long_value.as_str(),
            "the tag value is 300 bytes long, more than 256",
        ),
        (long_name.as_str(), "the tag name is 300 bytes long"),
        (
            "sensor=cpu.usage_idle%7Bcpu%3Dcpu0",
            "is not a series label: its tags do not end",
        ),
        (
            "sensor=cpu.usage_idle%7Bcpu%7D",
            "\"cpu\" is not NAME=VALUE",
        ),
        ("sensor=cpu.usage_idle%7Bcpu%3D0%7Dx", "follows the closing"),
        ("sensor=cpu.usage_idle%7B%3D0%7D", "the tag name is empty"),
        ("sensor=cpu.%7Ba%3Db%7D", "\"cpu.\" is not a sensor name"),
        ("sensor=%7Ba%3Db%7D", "\"\" is not a sensor name"),
    ];
    for (query, needle) in bad {
        let uri = format!("/api/v1/devices/h1/series?sensor=cpu.usage_idle&{query}");
        let uri = if query.starts_with("sensor=") {
            format!("/api/v1/devices/h1/series?{query}")
        } else {
            uri
        };
        assert_error(&app, &uri, StatusCode::BAD_REQUEST, needle).await;
    }
}

#[tokio::test]
async fn live_events_carry_tags() {
    let f = Fixture::new().await;
    let app = f.app();
    let live = open_live(&app, "?device=h1").await;
    let sensor = open_live(&app, "?sensor=cpu.usage_idle").await;
    add_telegraf_host(&f.state, f.now).await;
    let events = read_events(live, 6).await;
    assert_eq!(events.len(), 6);
    let ts = Timestamp::from_micros(f.now).to_rfc3339();
    assert_eq!(
        events[2].1,
        serde_json::json!({
            "device": "h1", "sensor": "cpu.usage_idle",
            "tags": {"cpu": "cpu2", "host": "h1"},
            "value": 92.0, "ts": ts, "unit": "%"
        })
    );
    assert_eq!(events[4].1["tags"], serde_json::json!({"host": "h1"}));
    // The sensor filter takes every tag set of the sensor.
    let events = read_events(sensor, 5).await;
    let cpus: Vec<&str> = events
        .iter()
        .map(|(_, e)| e["tags"]["cpu"].as_str().unwrap())
        .collect();
    assert_eq!(cpus, ["cpu0", "cpu1", "cpu2", "cpu3", "cpu4"]);
}

// ---------------------------------------------------------------------------------------
// fleet summary

#[tokio::test]
async fn fleet_summary() {
    let f = Fixture::new().await;
    let app = f.app();
    f.state.stats.dead_letters.store(7, Relaxed);
    let (status, body) = get_json(&app, "/api/v1/fleet/summary").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["devices"], 20);
    assert_eq!(body["online"], 8);
    assert_eq!(body["offline"], 12);
    assert_eq!(
        body["sensors"]["speed"],
        serde_json::json!({"count": 20, "min": 0.0, "avg": 95.0, "max": 190.0})
    );
    assert_eq!(body["sensors"].as_object().unwrap().len(), 4);
    assert_eq!(body["dead_letters"], 7);

    // Once the broker has been polled, the dead-letter stream's count is the figure.
    f.state.broker.dead_letters.store(42, Relaxed);
    f.state.broker.polled.store(true, Relaxed);
    let (_, body) = get_json(&app, "/api/v1/fleet/summary").await;
    assert_eq!(body["dead_letters"], 42);

    assert_error(
        &app,
        "/api/v1/fleet/summary?site=munich",
        StatusCode::BAD_REQUEST,
        "unknown parameter \"site\"",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// live

/// Reads SSE frames from a body until `n` events arrived (or 5 s passed).
async fn read_events(body: Body, n: usize) -> Vec<(String, Value)> {
    let mut stream = body.into_data_stream();
    let mut text = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while events.len() < n {
        let chunk = match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(c))) => c,
            _ => break,
        };
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let frame: String = text.drain(..end + 2).collect();
            let mut name = String::new();
            let mut data = String::new();
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = v.to_string();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            if !name.is_empty() {
                events.push((name, serde_json::from_str(&data).unwrap()));
            }
        }
    }
    events
}

async fn open_live(app: &Router, query: &str) -> Body {
    let req = Request::get(format!("/api/v1/live{query}"))
        .body(Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let ct = resp.headers()[header::CONTENT_TYPE].to_str().unwrap();
    assert_eq!(ct, "text/event-stream");
    resp.into_body()
}

#[tokio::test]
async fn live_stream_filters() {
    let f = Fixture::new().await;
    let app = f.app();
    let all = open_live(&app, "").await;
    let one_device = open_live(&app, "?device=v00003").await;
    let sensors = open_live(&app, "?sensor=speed,%20soc").await;
    let both = open_live(&app, "?device=v00003&sensor=soc").await;
    let ts = Timestamp::now().as_micros();
    let index = &f.state.index;
    index.apply_put("v00003", "gps.lat", state(48.5, ts, None, &[]));
    index.apply_put("v00004", "speed", state(55.0, ts, Some("km/h"), &[]));
    index.apply_put("v00003", "soc", state(70.0, ts, Some("%"), &[]));

    let got = read_events(all, 3).await;
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|(name, _)| name == "state"));
    assert_eq!(
        got[1].1,
        serde_json::json!({
            "device": "v00004", "sensor": "speed", "value": 55.0,
            "ts": Timestamp::from_micros(ts).to_rfc3339(), "unit": "km/h"
        })
    );
    let sensors_of = |events: &[(String, Value)]| -> Vec<(String, String)> {
        events
            .iter()
            .map(|(_, v)| {
                (
                    v["device"].as_str().unwrap().to_string(),
                    v["sensor"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let pair = |d: &str, s: &str| (d.to_string(), s.to_string());
    assert_eq!(
        sensors_of(&read_events(one_device, 2).await),
        [pair("v00003", "gps.lat"), pair("v00003", "soc")]
    );
    assert_eq!(
        sensors_of(&read_events(sensors, 2).await),
        [pair("v00004", "speed"), pair("v00003", "soc")]
    );
    assert_eq!(
        sensors_of(&read_events(both, 1).await),
        [pair("v00003", "soc")]
    );
}

#[tokio::test]
async fn live_slow_client_skips_ahead() {
    let f = Fixture::new().await;
    let body = open_live(&f.app(), "?device=v00001").await;
    // The client reads nothing while far more events than the buffer holds go by.
    let ts = Timestamp::now().as_micros();
    let n = fleetpipe_api::index::LIVE_CAPACITY + 1000;
    for i in 0..n {
        f.state
            .index
            .apply_put("v00001", "speed", state(i as f64, ts, None, &[]));
    }
    let events = read_events(body, 2).await;
    assert_eq!(events[0].0, "lagged");
    assert_eq!(events[0].1["dropped"], 1000);
    assert_eq!(events[1].0, "state");
    assert_eq!(events[1].1["value"], 1000.0);
}

#[tokio::test]
async fn live_bad_parameters() {
    let f = Fixture::new().await;
    let app = f.app();
    for (query, needle) in [
        ("sensor=", "sensor must name sensors"),
        ("sensor=,,", "sensor must name sensors"),
        ("device=", "device must not be empty"),
        ("device=a&device=b", "given more than once"),
        (
            "devices=v1",
            "unknown parameter \"devices\"; accepted: device, sensor",
        ),
    ] {
        assert_error(
            &app,
            &format!("/api/v1/live?{query}"),
            StatusCode::BAD_REQUEST,
            needle,
        )
        .await;
    }
}

#[tokio::test]
async fn live_streams_end_at_shutdown() {
    let f = Fixture::new().await;
    let body = open_live(&f.app(), "").await;
    f.state.shutdown.cancel();
    let mut stream = body.into_data_stream();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(chunk) = stream.next().await {
            chunk.unwrap();
        }
    })
    .await;
    assert!(end.is_ok(), "the live stream did not end at shutdown");
}

// ---------------------------------------------------------------------------------------
// OpenAPI, probes, metrics, static files, fallbacks

#[tokio::test]
async fn openapi_describes_every_route() {
    let f = Fixture::new().await;
    let (status, doc) = get_json(&f.app(), "/api/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let documented: BTreeSet<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    let routed: BTreeSet<String> = fleetpipe_api::routes::table()
        .into_iter()
        .map(|r| r.path.replace("{*", "{"))
        .collect();
    assert_eq!(documented, routed);
    for route in fleetpipe_api::routes::table() {
        let path = route.path.replace("{*", "{");
        let method = route.method.as_str().to_lowercase();
        let op = &doc["paths"][&path][&method];
        assert!(op.is_object(), "{method} {path} is not documented");
        let ok = ["200", "201"]
            .iter()
            .any(|s| op["responses"][*s].is_object());
        assert!(ok, "{method} {path} lacks a 2xx response");
        // Every path parameter is declared.
        for segment in path.split('/').filter(|s| s.starts_with('{')) {
            let name = segment.trim_matches(|c| c == '{' || c == '}');
            let declared = op["parameters"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["name"] == name && p["in"] == "path"));
            assert!(declared, "{path}: parameter {name} is not declared");
        }
    }
    // The series rule is documented.
    let series = doc["paths"]["/api/v1/devices/{id}/series"]["get"]["description"]
        .as_str()
        .unwrap();
    assert!(
        series.contains("6 h") && series.contains("10,000"),
        "{series}"
    );
    for schema in [
        "Device",
        "DeviceList",
        "Series",
        "FleetSummary",
        "LiveState",
        "ErrorBody",
    ] {
        assert!(doc["components"]["schemas"][schema].is_object(), "{schema}");
    }
}

#[tokio::test]
async fn probes() {
    let f = Fixture::new().await;
    let (status, body) = get_json(&f.app(), "/healthz").await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, serde_json::json!({"status": "ok"}))
    );

    let (status, body) = get_json(&f.app(), "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["ready"], true);
    assert_eq!(body["store"], "ok");
    assert_eq!(body["nats"], "not used");
    assert!(body.get("error").is_none());

    // Not ready while the state is loading.
    let loading = AppState {
        index: Arc::new(Index::new()),
        ..f.state.clone()
    };
    let (status, body) = get_json(&router(loading), "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["index"], "loading");
    assert!(body["error"].as_str().unwrap().contains("still loading"));

    // Not ready when the store fails; healthz does not care.
    let broken = AppState {
        store: Arc::new(DownStore),
        ..f.state.clone()
    };
    let (status, body) = get_json(&router(broken.clone()), "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body["error"].as_str().unwrap().starts_with("store: error"),
        "{body}"
    );
    let (status, _) = get_json(&router(broken.clone()), "/healthz").await;
    assert_eq!(status, StatusCode::OK);
    // A failing store is a 503 with a stable message, never the cause.
    let (status, body) = get_json(
        &router(broken),
        "/api/v1/devices/v00001/series?sensor=speed",
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"], "the store is unavailable; try again shortly");
}

#[tokio::test]
async fn metrics() {
    let f = Fixture::new().await;
    let stats = &f.state.stats;
    stats.messages.store(1234, Relaxed);
    stats.dead_letters.store(5, Relaxed);
    stats.aggregator_skipped.store(2, Relaxed);
    stats.store_write.observe(Duration::from_millis(3));
    let (status, content_type, body) = request(&f.app(), "GET", "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = String::from_utf8(body).unwrap();
    for line in [
        "fleetpipe_messages_total 1234",
        "fleetpipe_dead_letters_total 5",
        "fleetpipe_aggregator_skipped_total 2",
        "fleetpipe_store_write_seconds_count 1",
        "fleetpipe_store_write_seconds_bucket{le=\"0.005\"} 1",
        "fleetpipe_store_write_seconds_bucket{le=\"0.0025\"} 0",
        "fleetpipe_devices 20",
        "fleetpipe_devices_online 8",
        "fleetpipe_state_keys 80",
        "# EOF",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    // Broker figures appear once polled.
    assert!(!text.contains("fleetpipe_consumer_pending"));
    f.state.broker.consumer_pending.store(99, Relaxed);
    f.state.broker.polled.store(true, Relaxed);
    let (_, _, body) = request(&f.app(), "GET", "/metrics").await;
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.lines().any(|l| l == "fleetpipe_consumer_pending 99"),
        "{text}"
    );
}

#[tokio::test]
async fn info() {
    let f = Fixture::new().await;
    let (status, body) = get_json(&f.app(), "/api/v1/info").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["store"], "sqlite");
    assert_eq!(body["online_window_s"], 30);
    assert_eq!(body["tile_url"], "");
    assert_error(
        &f.app(),
        "/api/v1/info?x=1",
        StatusCode::BAD_REQUEST,
        "unknown parameter",
    )
    .await;
}

#[tokio::test]
async fn dashboard_files() {
    let f = Fixture::new().await;
    let app = f.app();
    let (status, content_type, body) = request(&app, "GET", "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "text/html; charset=utf-8");
    assert!(String::from_utf8_lossy(&body).contains("<html"));
    let (status, _, same) = request(&app, "GET", "/assets/index.html").await;
    assert_eq!((status, &same), (StatusCode::OK, &body));

    // Revalidation with the ETag.
    let resp = app
        .clone()
        .oneshot(Request::get("/").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let etag = resp.headers()[header::ETAG].clone();
    let resp = app
        .clone()
        .oneshot(
            Request::get("/")
                .header(header::IF_NONE_MATCH, etag)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);

    // `api.tile_url` is written into the page's tile meta tag when the page has one.
    let with_tiles = router(AppState {
        tile_url: "https://tiles.example/{z}/{x}/{y}.png?a=1&b=\"2\"".into(),
        ..f.state.clone()
    });
    let (status, content_type, page) = request(&with_tiles, "GET", "/").await;
    assert_eq!(
        (status, content_type.as_str()),
        (StatusCode::OK, "text/html; charset=utf-8")
    );
    let page = String::from_utf8(page).unwrap();
    let shipped = String::from_utf8(body.clone()).unwrap();
    if shipped.contains(r#"<meta name="fleetpipe-tile-url" content="">"#) {
        assert!(
            page.contains(
                r#"<meta name="fleetpipe-tile-url" content="https://tiles.example/{z}/{x}/{y}.png?a=1&amp;b=&quot;2&quot;">"#
            ),
            "{page}"
        );
    }

    for missing in [
        "/assets/nope.js",
        "/assets/../Cargo.toml",
        "/assets/%2e%2e/Cargo.toml",
    ] {
        assert_error(&app, missing, StatusCode::NOT_FOUND, "").await;
    }
}

#[path = "api/auth.rs"]
mod auth;

#[tokio::test]
async fn unknown_routes_and_methods() {
    let f = Fixture::new().await;
    let app = f.app();
    for uri in [
        "/nope",
        "/api/v1",
        "/api/v1/devices/",
        "/api/v2/devices",
        "/api/v1/devices/a/b",
    ] {
        assert_error(&app, uri, StatusCode::NOT_FOUND, "no route for GET").await;
    }
    let (status, _, body) = request(&app, "POST", "/api/v1/devices").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        body["error"],
        "POST is not allowed on /api/v1/devices; use GET"
    );
    let (status, _, body) = request(&app, "HEAD", "/api/v1/devices").await;
    assert_eq!((status, body.len()), (StatusCode::OK, 0));
}

/// A store that is down.
struct DownStore;

#[async_trait::async_trait]
impl Store for DownStore {
    fn kind(&self) -> &'static str {
        "down"
    }
    async fn write_readings(&self, _: &[Record]) -> Result<u64, StoreError> {
        Err(down())
    }
    async fn write_snapshots(&self, _: &[Snapshot]) -> Result<u64, StoreError> {
        Err(down())
    }
    async fn history(
        &self,
        _: &str,
        _: &str,
        _: Range,
        _: usize,
    ) -> Result<Vec<Point>, StoreError> {
        Err(down())
    }
    async fn rollups(&self, _: &str, _: &str, _: Range) -> Result<Vec<Rollup>, StoreError> {
        Err(down())
    }
    async fn series(&self, _: &str, _: Option<&str>) -> Result<Vec<SeriesInfo>, StoreError> {
        Err(down())
    }
    async fn series_history(
        &self,
        _: &SeriesKey<'_>,
        _: Range,
        _: usize,
    ) -> Result<Vec<Point>, StoreError> {
        Err(down())
    }
    async fn series_rollups_at(
        &self,
        _: &SeriesKey<'_>,
        _: Range,
        _: Resolution,
    ) -> Result<Vec<Rollup>, StoreError> {
        Err(down())
    }
    async fn snapshots(
        &self,
        _: Option<&str>,
        _: Range,
        _: usize,
    ) -> Result<Vec<Snapshot>, StoreError> {
        Err(down())
    }
    async fn count_readings(&self) -> Result<u64, StoreError> {
        Err(down())
    }
    async fn prune_readings(&self, _: Timestamp) -> Result<u64, StoreError> {
        Err(down())
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Err(down())
    }
}

fn down() -> StoreError {
    StoreError::Task("connection refused".into())
}

// ---------------------------------------------------------------------------------------
// the watch, against a real nats-server

#[tokio::test]
async fn watch_replays_the_bucket_then_follows_it() {
    use async_nats::jetstream::kv;
    use fleetpipe_testkit::NatsServer;

    let mut server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let bucket = js
        .create_key_value(kv::Config {
            bucket: fleetpipe_pipeline::config::names::STATE_BUCKET.into(),
            history: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let ts = Timestamp::now().as_micros();
    let put = |key: &str, v: StateValue| {
        let bucket = bucket.clone();
        let key = key.to_string();
        async move {
            bucket
                .put(key, serde_json::to_vec(&v).unwrap().into())
                .await
                .unwrap();
        }
    };
    // Written before the watch starts: must be replayed (watch_all would miss them).
    for i in 0..50 {
        put(
            &format!("d{i}.speed"),
            state(i as f64, ts, Some("km/h"), &[("site", "x")]),
        )
        .await;
    }
    put("d0.speed", state(100.0, ts, Some("km/h"), &[])).await;
    put("d1.gps.lat", state(48.1, ts, None, &[])).await;

    let dir = tempfile::tempdir().unwrap();
    let store = fleetpipe_store::open(&format!("sqlite://{}/w.db", dir.path().display()))
        .await
        .unwrap();
    let index = Arc::new(Index::new());
    let stop = tokio_util::sync::CancellationToken::new();
    let watch = tokio::spawn(fleetpipe_api::index::watch(
        bucket.clone(),
        index.clone(),
        stop.clone(),
    ));
    let app = router(AppState {
        nats: Some(client.clone()),
        ..AppState::new(index.clone(), store, Arc::new(Stats::default()))
    });
    wait_until(|| index.is_ready()).await;
    assert_eq!(index.devices(), 50);
    assert_eq!(index.keys(), 51);
    let (_, body) = get_json(&app, "/api/v1/devices/d0").await;
    assert_eq!(body["sensors"]["speed"]["value"], 100.0);
    assert_eq!(
        body["tags"],
        serde_json::json!({}),
        "only the last value is replayed"
    );
    let (_, body) = get_json(&app, "/api/v1/devices/d2").await;
    assert_eq!(body["tags"]["site"], "x");
    let (status, body) = get_json(&app, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["nats"], "connected");

    // Changes after the replay reach the index and live clients.
    let live = open_live(&app, "?device=d7").await;
    put("d7.speed", state(77.0, ts + 1, Some("km/h"), &[])).await;
    let events = read_events(live, 1).await;
    assert_eq!(events[0].1["value"], 77.0);
    bucket.delete("d1.gps.lat").await.unwrap();
    wait_until(|| index.keys() == 50).await;

    // Series with tags: a key each; live events carry the tags; deletes go by key.
    let live = open_live(&app, "?device=h1").await;
    let mut keys = Vec::new();
    for c in 0..4 {
        let tags = cpu_tags(c);
        let key = fleetpipe_pipeline::state::key("h1", "cpu.usage_idle", &tags);
        let pairs: Vec<(&str, &str)> = tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        put(&key, state(90.0 + c as f64, ts, None, &pairs)).await;
        keys.push(key);
    }
    let events = read_events(live, 4).await;
    assert_eq!(events[1].1["sensor"], "cpu.usage_idle");
    assert_eq!(
        events[1].1["tags"],
        serde_json::json!({"cpu": "cpu1", "host": "h1"})
    );
    wait_until(|| index.keys() == 54).await;
    let (_, body) = get_json(&app, "/api/v1/devices/h1").await;
    assert_eq!(body["sensors"].as_object().unwrap().len(), 4, "{body}");
    assert_eq!(
        body["sensors"]["cpu.usage_idle{cpu=cpu3,host=h1}"]["value"],
        93.0
    );
    bucket.delete(&keys[3]).await.unwrap();
    wait_until(|| index.keys() == 53).await;
    let (_, body) = get_json(&app, "/api/v1/devices/h1").await;
    let labels: Vec<&String> = body["sensors"].as_object().unwrap().keys().collect();
    assert_eq!(
        labels,
        [
            "cpu.usage_idle{cpu=cpu0,host=h1}",
            "cpu.usage_idle{cpu=cpu1,host=h1}",
            "cpu.usage_idle{cpu=cpu2,host=h1}",
        ]
    );

    // NATS gone: not ready.
    server.kill();
    wait_until(|| client.connection_state() != async_nats::connection::State::Connected).await;
    let (status, body) = get_json(&app, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["error"].as_str().unwrap().contains("nats:"), "{body}");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), watch)
        .await
        .expect("the watch stops at shutdown")
        .unwrap();
}

async fn wait_until(mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// fuzz: random requests built from the OpenAPI document, against a running server

mod fuzz {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const REQUESTS: usize = 3000;
    const CONCURRENCY: usize = 8;

    /// Values worth trying for any parameter: valid forms of every parameter type, edge
    /// numbers, bad times and durations, encoded garbage.
    const VALUES: &[&str] = &[
        "",
        "0",
        "1",
        "-1",
        "100",
        "10000",
        "10001",
        "18446744073709551616",
        "1e9",
        "NaN",
        "true",
        "false",
        "id",
        "last_seen",
        "asc",
        "desc",
        "speed",
        "soc",
        "gps.lat",
        "speed,soc",
        ",",
        "v00001",
        "v0",
        "ghost",
        "site:munich",
        "site:",
        ":",
        "h1",
        "many",
        "cpu.usage_idle",
        "cpu:cpu0",
        "cpu:cpu9",
        "host:h1",
        "cpu.usage_idle%7Bcpu%3Dcpu0%2Chost%3Dh1%7D",
        "cpu.usage_idle%7Bcpu%3Dcpu0",
        "x%7B%7D",
        "speed%7B%5C%7D",
        "%7B",
        "now",
        "-10m",
        "10m",
        "-8h",
        "-366d",
        "-367d",
        "-100y",
        "-999999999999y",
        "5m",
        "59s",
        "60",
        "2026-02-15T10:00:00Z",
        "2026-02-15T10:00:00%2B01:00",
        "2026-02-15T10:00:00+01:00",
        "9999-12-31T23:59:59Z",
        "0000-01-01T00:00:00Z",
        "1969-12-31T23:59:59Z",
        "%00",
        "%FF%FE",
        "%25",
        "%",
        "%zz",
        "a%20b",
        "..%2F..%2Fetc%2Fpasswd",
        "%E2%98%83",
        "'%20OR%201=1--",
        "%3Cscript%3E",
    ];

    /// Bodies worth sending to a route that takes one.
    const BODIES: &[&str] = &[
        "",
        "{}",
        "[]",
        "null",
        "not json",
        r#"{"name":"fuzz","role":"read"}"#,
        r#"{"name":"fuzz","role":"admin"}"#,
        r#"{"name":"fuzz-op","role":"operator"}"#,
        r#"{"name":"","role":"read"}"#,
        r#"{"name":"a b","role":"read"}"#,
        r#"{"name":"x","role":"root"}"#,
        r#"{"name":"x","role":"read","extra":true}"#,
        r#"{"name":7,"role":"read"}"#,
        r#"{"name":"\u0000","role":"read"}"#,
        r#"{"name":"x""#,
    ];

    /// A request built from the document: a documented path and one of its methods (now
    /// and then another), random path parameters, documented query parameters (and
    /// sometimes unknown ones) with random values, a body for a method that takes one; now
    /// and then a mangled path.
    fn target(rng: &mut StdRng, doc: &Value) -> (String, String, Option<&'static str>) {
        let paths: Vec<(&String, &Value)> = doc["paths"].as_object().unwrap().iter().collect();
        let (path, item) = paths[rng.random_range(0..paths.len())];
        let methods: Vec<&String> = item.as_object().unwrap().keys().collect();
        let method = if rng.random_bool(0.05) {
            ["put", "patch", "post", "delete"][rng.random_range(0..4)].to_string()
        } else {
            methods[rng.random_range(0..methods.len())].clone()
        };
        let params: Vec<&Value> = item[&method]["parameters"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        let mut out = String::new();
        for segment in path.split('/').skip(1) {
            out.push('/');
            if segment.starts_with('{') {
                out.push_str(value(rng));
            } else {
                out.push_str(segment);
            }
        }
        if rng.random_bool(0.05) {
            out.push_str(["/", "/x", "//", "/%2F", "/.."][rng.random_range(0..5)]);
        }
        let mut query = Vec::new();
        for p in params.iter().filter(|p| p["in"] == "query") {
            let name = p["name"].as_str().unwrap();
            let required = p["required"] == true;
            let times = if required && rng.random_bool(0.9) {
                1
            } else {
                rng.random_range(0..3)
            };
            for _ in 0..times {
                query.push(format!("{name}={}", value(rng)));
            }
        }
        if rng.random_bool(0.1) {
            query.push(format!("{}={}", value(rng), value(rng)));
        }
        if rng.random_bool(0.05) {
            query.push(format!("access_token={}", value(rng)));
        }
        if !query.is_empty() {
            out.push('?');
            out.push_str(&query.join("&"));
        }
        let body = (method == "post" || method == "put" || method == "patch")
            .then(|| BODIES[rng.random_range(0..BODIES.len())]);
        (method.to_uppercase(), out, body)
    }

    fn value(rng: &mut StdRng) -> &'static str {
        VALUES[rng.random_range(0..VALUES.len())]
    }

    /// Sends one request on a fresh connection and returns the status code. Reads only the
    /// status line, so endless live streams are fine.
    async fn status_of(
        addr: std::net::SocketAddr,
        method: &str,
        target: &str,
        authorization: Option<&str>,
        body: Option<&str>,
    ) -> u16 {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let auth = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
        let body = body.map_or(String::new(), |b| {
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            )
        });
        let body = if body.is_empty() {
            "\r\n".to_string()
        } else {
            body
        };
        let req = format!(
            "{method} {target} HTTP/1.1\r\nHost: fuzz\r\n{auth}Connection: close\r\n{body}"
        );
        conn.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 512];
        while !buf.windows(2).any(|w| w == b"\r\n") {
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(n > 0, "{target}: connection closed without a status line");
            buf.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&buf);
        line.split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{target}: bad status line {line:?}"))
    }

    /// Runs the fuzz against `state` on a socket, each request with one of
    /// `authorizations` (an `Authorization` header, or none), and returns how many of each
    /// status it got. Fails on any 5xx.
    async fn run(state: AppState, authorizations: &[Option<String>]) -> BTreeMap<u16, usize> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(fleetpipe_api::serve(listener, state.clone()));
        let doc: Value =
            serde_json::from_str(&fleetpipe_api::openapi::document().to_json().unwrap()).unwrap();
        let seed = std::env::var("FLEETPIPE_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_f1ee7);
        println!("fuzz seed {seed} (set FLEETPIPE_FUZZ_SEED to replay)");
        let mut rng = StdRng::seed_from_u64(seed);
        let requests: Vec<_> = (0..REQUESTS)
            .map(|_| {
                let (method, target, body) = target(&mut rng, &doc);
                let auth = authorizations[rng.random_range(0..authorizations.len())].clone();
                (method, target, body, auth)
            })
            .collect();
        let started = std::time::Instant::now();
        let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
        let run = async {
            let mut results = futures::stream::iter(requests.iter())
                .map(|(method, target, body, auth)| async move {
                    let status = status_of(addr, method, target, auth.as_deref(), *body).await;
                    (method, target, status)
                })
                .buffer_unordered(CONCURRENCY);
            while let Some((method, t, status)) = results.next().await {
                assert!(status < 500, "{method} {t} -> {status}");
                *statuses.entry(status).or_default() += 1;
            }
        };
        tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .expect("the fuzz run finishes in 2 minutes");
        println!(
            "{REQUESTS} requests in {:?}: statuses {statuses:?}",
            started.elapsed()
        );
        state.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server stops at shutdown")
            .unwrap()
            .unwrap();
        statuses
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_5xx_from_random_requests() {
        let f = Fixture::new().await;
        add_telegraf_host(&f.state, f.now).await;
        // Authentication off, with the token bucket the token routes write to.
        let t = super::auth::Tokens::new().await;
        let state = AppState {
            auth: fleetpipe_api::Auth {
                bucket: Some(t.bucket.clone()),
                ..fleetpipe_api::Auth::none()
            },
            device_config: Some(t.device_config.clone()),
            ..f.state.clone()
        };
        let statuses = run(state, &[None]).await;
        // The generator reaches both successes and refusals.
        assert!(
            statuses.get(&200).copied().unwrap_or(0) > 100,
            "{statuses:?}"
        );
        assert!(
            statuses.get(&400).copied().unwrap_or(0) > 100,
            "{statuses:?}"
        );
    }

    /// The same with tokens required, each request carrying no token, a bad one, or a
    /// token of some role; the token routes write to a real bucket.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_5xx_from_random_requests_with_tokens() {
        use fleetpipe_api::Role;
        let f = Fixture::new().await;
        add_telegraf_host(&f.state, f.now).await;
        let t = super::auth::Tokens::new().await;
        let mut authorizations = vec![
            None,
            Some("Bearer fpt_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into()),
            Some("Bearer x".into()),
            Some("Basic dXNlcjpwYXNz".into()),
            Some("Bearer".into()),
        ];
        for role in Role::ALL {
            authorizations.push(Some(format!("Bearer {}", t.token(role))));
        }
        let statuses = run(t.required(&f.state), &authorizations).await;
        for (status, at_least) in [(200, 100), (400, 50), (401, 300), (403, 10)] {
            assert!(
                statuses.get(&status).copied().unwrap_or(0) > at_least,
                "{status}: {statuses:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// limits: request timeout, store queries in flight, rollup rows

/// The fixture's SQLite store behind a gate: every read waits until [`GatedStore::open`]
/// (writes and pings go straight through). Counts the reads that reached it.
struct GatedStore {
    inner: Arc<dyn Store>,
    open: tokio::sync::watch::Sender<bool>,
    reads: std::sync::atomic::AtomicUsize,
}

impl GatedStore {
    fn closed(inner: Arc<dyn Store>) -> Arc<GatedStore> {
        Arc::new(GatedStore {
            inner,
            open: tokio::sync::watch::Sender::new(false),
            reads: Default::default(),
        })
    }

    fn open(&self) {
        self.open.send_replace(true);
    }

    fn reads(&self) -> usize {
        self.reads.load(Relaxed)
    }

    async fn pass(&self) {
        self.reads.fetch_add(1, Relaxed);
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|open| *open).await;
    }
}

#[async_trait::async_trait]
impl Store for GatedStore {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn write_readings(&self, batch: &[Record]) -> Result<u64, StoreError> {
        self.inner.write_readings(batch).await
    }
    async fn write_snapshots(&self, rows: &[Snapshot]) -> Result<u64, StoreError> {
        self.inner.write_snapshots(rows).await
    }
    async fn history(
        &self,
        device: &str,
        sensor: &str,
        range: Range,
        limit: usize,
    ) -> Result<Vec<Point>, StoreError> {
        self.pass().await;
        self.inner.history(device, sensor, range, limit).await
    }
    async fn rollups(
        &self,
        device: &str,
        sensor: &str,
        range: Range,
    ) -> Result<Vec<Rollup>, StoreError> {
        self.pass().await;
        self.inner.rollups(device, sensor, range).await
    }
    async fn series(
        &self,
        device: &str,
        sensor: Option<&str>,
    ) -> Result<Vec<SeriesInfo>, StoreError> {
        self.pass().await;
        self.inner.series(device, sensor).await
    }
    async fn series_history(
        &self,
        key: &SeriesKey<'_>,
        range: Range,
        limit: usize,
    ) -> Result<Vec<Point>, StoreError> {
        self.pass().await;
        self.inner.series_history(key, range, limit).await
    }
    async fn series_rollups_at(
        &self,
        key: &SeriesKey<'_>,
        range: Range,
        resolution: Resolution,
    ) -> Result<Vec<Rollup>, StoreError> {
        self.pass().await;
        self.inner.series_rollups_at(key, range, resolution).await
    }
    async fn snapshots(
        &self,
        device: Option<&str>,
        range: Range,
        limit: usize,
    ) -> Result<Vec<Snapshot>, StoreError> {
        self.pass().await;
        self.inner.snapshots(device, range, limit).await
    }
    async fn count_readings(&self) -> Result<u64, StoreError> {
        self.inner.count_readings().await
    }
    async fn prune_readings(&self, before: Timestamp) -> Result<u64, StoreError> {
        self.inner.prune_readings(before).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}

/// The fixture's state with other limits and, if given, another store.
fn limited(f: &Fixture, store: Option<Arc<dyn Store>>, limits: Limits) -> AppState {
    AppState {
        store: store.unwrap_or_else(|| f.state.store.clone()),
        limits,
        ..f.state.clone()
    }
}

/// Status, `Retry-After` and JSON body of a GET.
async fn get_retry(app: &Router, uri: &str) -> (StatusCode, Option<String>, Value) {
    let req = Request::get(uri).body(Body::empty()).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().to_string());
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{uri}: not JSON ({e}): {}", String::from_utf8_lossy(&body)));
    (status, retry_after, body)
}

const SERIES_10M: &str = "/api/v1/devices/v00001/series?sensor=speed&from=-10m";

#[tokio::test]
async fn a_slow_store_is_a_503_with_retry_after() {
    let f = Fixture::new().await;
    let gated = GatedStore::closed(f.state.store.clone());
    let state = limited(
        &f,
        Some(gated.clone()),
        Limits::new(Duration::from_secs(10), 4, 100_000),
    );
    let app = router(state.clone());
    tokio::time::pause();
    let started = tokio::time::Instant::now();
    let (status, retry_after, body) = get_retry(&app, SERIES_10M).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(retry_after.as_deref(), Some("5"));
    assert_eq!(
        body["error"],
        "no answer within 10s; the server is busy, try again shortly"
    );
    let waited = started.elapsed();
    assert!(
        (Duration::from_secs(10)..Duration::from_secs(11)).contains(&waited),
        "{waited:?}"
    );
    // The store is still working on the abandoned read, which keeps its slot meanwhile.
    assert_eq!(gated.reads(), 1);
    assert_eq!(state.limits.queries_in_flight(), 1);
    gated.open();
    wait_until(|| state.limits.queries_in_flight() == 0).await;
    let (status, retry_after, body) = get_retry(&app, SERIES_10M).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(retry_after, None);
}

#[tokio::test]
async fn too_many_store_queries_is_a_503_with_retry_after_1() {
    let f = Fixture::new().await;
    let gated = GatedStore::closed(f.state.store.clone());
    let state = limited(
        &f,
        Some(gated.clone()),
        Limits::new(Duration::from_secs(10), 2, 1_000),
    );
    let app = router(state.clone());
    // Two requests reading the store, held there.
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { get_retry(&app, SERIES_10M).await })
        })
        .collect();
    wait_until(|| state.limits.queries_in_flight() == 2).await;

    let (status, retry_after, body) = get_retry(&app, SERIES_10M).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    let message = body["error"].as_str().unwrap();
    assert!(message.contains("busy"), "{message}");
    // Refused before reading anything.
    wait_until(|| gated.reads() >= 2).await;
    let reads = gated.reads();

    // Meanwhile the in-memory endpoints answer, and bad input is still a 400.
    let (status, _) = get_json(&app, "/api/v1/devices?sort=last_seen").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = get_json(&app, "/api/v1/fleet/summary").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = get_json(&app, "/api/v1/devices/v00003").await;
    assert_eq!(status, StatusCode::OK);
    assert_error(
        &app,
        "/api/v1/devices/v00001/series?sensor=speed&from=soon",
        StatusCode::BAD_REQUEST,
        "from \"soon\"",
    )
    .await;
    assert_error(
        &app,
        "/api/v1/devices/v00001/series?sensor=speed&from=-300d",
        StatusCode::BAD_REQUEST,
        "hourly rollups",
    )
    .await;
    assert_eq!(gated.reads(), reads, "refused requests read nothing");

    gated.open();
    for w in waiting {
        let (status, _, body) = w.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["source"], "raw");
    }
    assert_eq!(state.limits.queries_in_flight(), 0);
    let (status, _, _) = get_retry(&app, SERIES_10M).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn rollup_reads_are_bounded_in_rows() {
    let f = Fixture::new().await;
    // A day of minutes at most.
    let app = router(limited(
        &f,
        None,
        Limits::new(Duration::from_secs(10), 16, 1440),
    ));
    let (status, body) =
        get_json(&app, "/api/v1/devices/v00001/series?sensor=speed&from=-23h").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["source"], "rollup_1m");
    let total: u64 = body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["count"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 8 * 360);
    let (status, body) =
        get_json(&app, "/api/v1/devices/v00001/series?sensor=speed&from=-2d").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body["error"].as_str().unwrap();
    for needle in [
        "per-minute rollups",
        "more than the 1440 one request may read (about 1.0 days)",
        "shorter range",
    ] {
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }
    // Wide buckets start the read at the bucket holding `from`: 23 h from noon in
    // buckets of a day read from midnight, 35 hourly rollups.
    const DAY_BUCKETS: &str = "/api/v1/devices/v00001/series?sensor=speed\
        &from=2026-11-20T12:00:00Z&to=2026-11-21T11:00:00Z&step=1d";
    let (status, body) = get_json(&app, DAY_BUCKETS).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["source"], "rollup_1h");
    let app_34 = router(limited(
        &f,
        None,
        Limits::new(Duration::from_secs(10), 16, 34),
    ));
    assert_error(
        &app_34,
        DAY_BUCKETS,
        StatusCode::BAD_REQUEST,
        "needs 35 hourly rollups (from 2026-11-20T00:00:00Z to 2026-11-21T11:00:00Z, in \
         buckets of 86400 s)",
    )
    .await;

    // The default bound: 100,000 minutes (about 69 days) or hours; ranges longer than a
    // week are read in hours, so every range up to the longest (366 days) fits, whatever
    // the step.
    let app = f.app();
    for (from, source) in [
        ("-6d", "rollup_1m"),
        ("-60d&step=5m", "rollup_1h"),
        ("-365d", "rollup_1h"),
    ] {
        let uri = format!("/api/v1/devices/v00001/series?sensor=speed&from={from}");
        let (status, body) = get_json(&app, &uri).await;
        assert_eq!(status, StatusCode::OK, "{uri}: {body}");
        assert_eq!(body["source"], source, "{uri}");
        let total: u64 = body["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["count"].as_u64().unwrap())
            .sum();
        assert_eq!(total, 8 * 360, "{uri}: every stored reading, counted once");
    }
}

#[tokio::test]
async fn the_live_stream_outlives_the_request_timeout() {
    let f = Fixture::new().await;
    let app = router(limited(
        &f,
        None,
        Limits::new(Duration::from_secs(1), 16, 100_000),
    ));
    tokio::time::pause();
    let body = open_live(&app, "?device=v00001").await;
    tokio::time::advance(Duration::from_secs(60)).await;
    let ts = Timestamp::now().as_micros();
    f.state
        .index
        .apply_put("v00001", "speed", state(42.0, ts, Some("km/h"), &[]));
    let events = read_events(body, 1).await;
    assert_eq!(events.len(), 1, "the stream ended at the request timeout");
    assert_eq!(events[0].1["value"], 42.0);
}

#[tokio::test]
async fn busy_and_timeout_503s_are_documented() {
    let doc: Value =
        serde_json::from_str(&fleetpipe_api::openapi::document().to_json().unwrap()).unwrap();
    let unavailable = &doc["components"]["responses"]["UnavailableResponse"];
    assert!(
        unavailable["headers"]["Retry-After"].is_object(),
        "{unavailable}"
    );
    for path in [
        "/api/v1/devices",
        "/api/v1/devices/{id}/series",
        "/api/v1/fleet/summary",
        "/metrics",
    ] {
        let r = &doc["paths"][path]["get"]["responses"]["503"];
        assert_eq!(
            r["$ref"], "#/components/responses/UnavailableResponse",
            "{path}: {r}"
        );
    }
    let series = doc["paths"]["/api/v1/devices/{id}/series"]["get"]["description"]
        .as_str()
        .unwrap();
    assert!(series.contains("api.max_rollup_rows"), "{series}");
}

#[tokio::test]
async fn api_limits_are_configured_in_the_api_section() {
    use fleetpipe_pipeline::Config;
    let c = Config::from_toml(
        "[api]\nrequest_timeout = \"3s\"\nmax_concurrent_queries = 4\nmax_rollup_rows = 20000",
    )
    .unwrap();
    c.validate().unwrap();
    let limits = Limits::from_config(&c.api);
    assert_eq!(limits.request_timeout, Duration::from_secs(3));
    assert_eq!(limits.max_rollup_rows, 20_000);
    for _ in 0..4 {
        std::mem::forget(limits.query_slot().unwrap());
    }
    assert!(limits.query_slot().is_err());

    let d = Config::default().api;
    assert_eq!(
        (
            d.request_timeout,
            d.max_concurrent_queries,
            d.max_rollup_rows
        ),
        (Duration::from_secs(10), 16, 100_000)
    );
    let mut c = Config::default();
    c.api.request_timeout = Duration::from_millis(10);
    c.api.max_concurrent_queries = 0;
    c.api.max_rollup_rows = 60;
    let problems = c.validate().unwrap_err().0;
    assert_eq!(problems.len(), 3, "{problems:?}");
    for key in [
        "api.request_timeout",
        "api.max_concurrent_queries",
        "api.max_rollup_rows",
    ] {
        assert!(problems.iter().any(|p| p.contains(key)), "{problems:?}");
    }
}

/// `fleetpipe up` gives the API a second handle on the SQLite file the collectors write:
/// opening it while the first is in use is safe (the migrations are done), and it sees
/// every commit of the first.
#[tokio::test]
async fn the_api_store_is_a_second_handle_on_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("up.db").display());
    let writer = fleetpipe_store::open(&url).await.unwrap();
    let now = Timestamp::now().as_micros();
    let record = |seq: u64, ts: i64| Record {
        seq,
        reading: Reading {
            device: "v1".into(),
            sensor: "speed".into(),
            value: seq as f64,
            ts: Timestamp::from_micros(ts),
            unit: None,
            quality: None,
            tags: Default::default(),
        },
    };
    writer
        .write_readings(&[record(1, now - MIN)])
        .await
        .unwrap();
    let api = fleetpipe_api::open_store(&url, &fleetpipe_pipeline::config::ApiConfig::default())
        .await
        .unwrap();
    writer.write_readings(&[record(2, now)]).await.unwrap();
    let range = Range {
        from: Timestamp::from_micros(now - HOUR),
        to: Timestamp::from_micros(now + 1),
    };
    let points = api.history("v1", "speed", range, 10).await.unwrap();
    assert_eq!(points.len(), 2);
    api.ping().await.unwrap();
}
