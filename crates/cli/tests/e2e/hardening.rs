//! The hardening issue, end to end: series told apart by their tags (Telegraf's case), a
//! reading the store refuses does not hold up the others, a message delivered
//! `collector.max_deliver` times is dead-lettered, an enormous line-protocol line is
//! refused without delaying what follows it, and device ids from the command line are
//! checked before they become a subject filter.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use bytes::Bytes;
use fleetpipe_pipeline::state::StateValue;
use futures::{StreamExt, TryStreamExt};

use crate::support::*;

const TELEMETRY_STREAM: &str = "FLEETPIPE_TELEMETRY";
const DURABLE: &str = "fleetpipe-collectors";
const DLQ_STREAM: &str = "FLEETPIPE_DLQ";
const STATE_BUCKET: &str = "fleetpipe_state";

/// A generous deadline for anything the collector should do in well under a second.
const DEADLINE: Duration = Duration::from_secs(30);

/// One dead letter as the broker holds it.
#[derive(Debug)]
struct Letter {
    /// `fleetpipe.dlq.<code>.<stream seq>`.
    dlq_subject: String,
    /// The subject the device published on.
    subject: String,
    codes: Vec<String>,
    reason: String,
    payload: Bytes,
}

/// Every message of the dead-letter stream, oldest first.
async fn letters(js: &jetstream::Context) -> Vec<Letter> {
    let mut stream = js.get_stream(DLQ_STREAM).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        let header = |name: &str| {
            m.headers
                .get(name)
                .map(|v| v.as_str().to_string())
                .unwrap_or_default()
        };
        out.push(Letter {
            dlq_subject: m.subject.to_string(),
            subject: header("Fleetpipe-Subject"),
            codes: header("Fleetpipe-Codes")
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect(),
            reason: header("Fleetpipe-Reason"),
            payload: m.payload.clone(),
        });
    }
    out
}

/// Waits until the dead-letter stream holds at least `want` letters, and returns them.
async fn wait_for_letters(js: &jetstream::Context, want: usize) -> Vec<Letter> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let got = letters(js).await;
        if got.len() >= want || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn collectors(js: &jetstream::Context) -> PullConsumer {
    js.get_stream(TELEMETRY_STREAM)
        .await
        .unwrap()
        .get_consumer(DURABLE)
        .await
        .unwrap()
}

/// Waits until the collectors' consumer has nothing pending and nothing awaiting an ack,
/// and returns (pending, ack pending) as last seen.
async fn wait_drained(js: &jetstream::Context) -> (u64, usize) {
    let mut consumer = collectors(js).await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let info = consumer.info().await.unwrap();
        let seen = (info.num_pending, info.num_ack_pending);
        if seen == (0, 0) || Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The counters `fleetpipe collect --json` prints when it stops.
fn counters(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout:?}"))
}

fn nanos_ago(d: Duration) -> u128 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (now - d).as_nanos()
}

fn tags(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// 1. Telegraf: lines that differ only in a tag are separate series.

/// A series (sensor, tags) and its values, oldest first.
type Expected = (&'static str, Vec<(String, String)>, Vec<f64>);

/// Telegraf's `cpu` lines for cpu0..cpu3 and a `mem` line, with `ts` appended when given.
fn telegraf(idle: f64, user: f64, mem: f64, ts: Option<u128>) -> String {
    let ts = ts.map(|t| format!(" {t}")).unwrap_or_default();
    let mut lines: Vec<String> = (0..4)
        .map(|c| format!("cpu,cpu=cpu{c},host=h1 usage_idle={idle},usage_user={user}{ts}"))
        .collect();
    lines.push(format!("mem,host=h1 used_percent={mem}{ts}"));
    lines.join("\n")
}

async fn telegraf_series(env: Env) {
    env.run(&["init"]);
    let js = env.js().await;
    let mut collector = env.spawn(&["collect", "--json"]);
    // The first without timestamps (the broker's time, now), the second a minute back.
    publish_all(
        &js,
        &[
            (
                "vehicle.h1.telegraf".into(),
                telegraf(90.5, 0.25, 42.5, None),
            ),
            (
                "vehicle.h1.telegraf".into(),
                telegraf(80.5, 1.25, 40.5, Some(nanos_ago(Duration::from_secs(60)))),
            ),
        ],
    )
    .await;
    let store = env.store().await;
    assert_eq!(wait_for_count(&*store, 18, DEADLINE).await, 18);
    assert_eq!(wait_drained(&js).await, (0, 0));
    assert_eq!(store.count_readings().await.unwrap(), 18);
    let c = counters(&collector.stop());
    assert_eq!(c["readings_stored"], 18, "{c}");
    assert_eq!(c["readings_duplicate"], 0, "{c}");
    assert_eq!(c["dead_letters"], 0, "{c}");
    assert!(letters(&js).await.is_empty());

    // Nine series, each with its tags and both of its readings (older first).
    let cpu = |c: usize| tags(&[("cpu", &format!("cpu{c}")), ("host", "h1")]);
    let mut want: Vec<Expected> = Vec::new();
    for c in 0..4 {
        want.push(("cpu.usage_idle", cpu(c), vec![80.5, 90.5]));
        want.push(("cpu.usage_user", cpu(c), vec![1.25, 0.25]));
    }
    want.push((
        "mem.used_percent",
        tags(&[("host", "h1")]),
        vec![40.5, 42.5],
    ));
    let series = store.series("h1", None).await.unwrap();
    assert_eq!(series.len(), 9, "{series:?}");
    for (sensor, tags, values) in &want {
        let info = series
            .iter()
            .find(|s| s.sensor == *sensor && s.tags[..] == tags[..])
            .unwrap_or_else(|| panic!("no series {sensor} {tags:?} in {series:?}"));
        let points = store
            .series_history(&info.key(), all_time(), 100)
            .await
            .unwrap();
        let got: Vec<f64> = points.iter().map(|p| p.value).collect();
        assert_eq!(&got, values, "{sensor} {tags:?}");
        let rollups = store.series_rollups(&info.key(), all_time()).await.unwrap();
        assert_eq!(rollups.iter().map(|r| r.count).sum::<u64>(), 2);
    }
    // Without tags a sensor with several tag sets is ambiguous; with one it is not.
    let ambiguous = store
        .history("h1", "cpu.usage_idle", all_time(), 100)
        .await
        .unwrap_err();
    assert!(ambiguous.to_string().contains("4 series"), "{ambiguous}");
    let out = env.run(&[
        "history",
        "h1",
        "mem.used_percent",
        "--since",
        "1h",
        "--json",
    ]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.len(), 2, "{out}");

    // The latest state: one key per series, the newest reading (the first message's), its
    // tags in the value.
    let kv = js.get_key_value(STATE_BUCKET).await.unwrap();
    let keys: Vec<String> = kv.keys().await.unwrap().try_collect().await.unwrap();
    let keys: Vec<&String> = keys.iter().filter(|k| k.starts_with("h1.")).collect();
    assert_eq!(keys.len(), 9, "{keys:?}");
    let mut latest: HashMap<(String, Vec<(String, String)>), f64> = HashMap::new();
    for key in keys {
        let body = kv.get(key.as_str()).await.unwrap().unwrap();
        let v: StateValue = serde_json::from_slice(&body).unwrap();
        let sensor = key
            .strip_prefix("h1.")
            .unwrap()
            .split(".=")
            .next()
            .unwrap()
            .to_string();
        let tags: Vec<(String, String)> = v.tags.clone().into_iter().collect();
        assert_eq!(
            key.contains(".="),
            !tags.is_empty(),
            "tagged series have hashed keys: {key}"
        );
        latest.insert((sensor, tags), v.value);
    }
    for (sensor, tags, values) in &want {
        assert_eq!(
            latest.get(&(sensor.to_string(), tags.clone())),
            values.last(),
            "latest {sensor} {tags:?}"
        );
    }
    // `fleetpipe state` names the sensors without the key's hash, with their tags.
    let out = env.run(&["state", "h1", "--json"]);
    let state: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(state.len(), 9, "{out}");
    for e in &state {
        let sensor = e["sensor"].as_str().unwrap();
        assert!(
            ["cpu.usage_idle", "cpu.usage_user", "mem.used_percent"].contains(&sensor),
            "{e}"
        );
        assert_eq!(e["tags"]["host"], "h1", "{e}");
    }
    let idle_cpus: Vec<&str> = state
        .iter()
        .filter(|e| e["sensor"] == "cpu.usage_idle")
        .map(|e| e["tags"]["cpu"].as_str().unwrap())
        .collect();
    assert_eq!(idle_cpus, ["cpu0", "cpu1", "cpu2", "cpu3"]);
    let table = env.run(&["state", "h1"]);
    assert!(
        table.contains("cpu.usage_idle{cpu=cpu3,host=h1}"),
        "{table}"
    );
    assert!(!table.contains(".="), "{table}");
}

#[tokio::test(flavor = "multi_thread")]
async fn telegraf_tagged_series_sqlite() {
    telegraf_series(Env::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn telegraf_tagged_series_postgres() {
    if let Some(env) = Env::postgres("hardening_telegraf") {
        telegraf_series(env).await;
    }
}

// ---------------------------------------------------------------------------------------
// 2. A reading the store refuses is dead-lettered; the others are stored.

/// Makes the store refuse one message; returns the subject to publish it on (with the
/// value 666) and what the dead letter's reason must name.
async fn refuse_666(env: &Env) -> (&'static str, &'static str) {
    if let Some(path) = env.store_url.strip_prefix("sqlite://") {
        // The embedded store keeps values inside encoded chunks, out of a trigger's
        // sight: the operator's trigger refuses a series instead.
        let db = rusqlite::Connection::open(path).unwrap();
        db.execute_batch(
            "CREATE TRIGGER refuse_666 BEFORE INSERT ON series WHEN NEW.sensor = 'refused' \
             BEGIN SELECT RAISE(ABORT, 'series refused'); END;",
        )
        .unwrap();
        ("vehicle.g5.refused", "series refused")
    } else {
        let (client, connection) = tokio_postgres::connect(&env.store_url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let connection = tokio::spawn(connection);
        client
            .batch_execute("ALTER TABLE readings ADD CONSTRAINT refuse_666 CHECK (value <> 666)")
            .await
            .unwrap();
        drop(client);
        let _ = connection.await;
        ("vehicle.g5.speed", "refuse_666")
    }
}

async fn store_refusal(env: Env) {
    env.run(&["init"]);
    let (refused_subject, must_name) = refuse_666(&env).await;
    let js = env.js().await;
    // 1,000 good readings on ten devices; in the middle, 666, which the store refuses, and
    // the issue's NUL bytes, which the decoder refuses (PostgreSQL text cannot hold them).
    let mut msgs = Vec::new();
    let mut want: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for i in 0..1000 {
        let device = format!("g{}", i % 10);
        let value = i as f64 + 0.5;
        msgs.push((format!("vehicle.{device}.speed"), format!("{value}")));
        want.entry(device).or_default().push(value);
        match i {
            250 => msgs.push((
                "vehicle.n1.speed".into(),
                r#"{"value":1,"unit":"km\u0000h"}"#.into(),
            )),
            500 => msgs.push((refused_subject.into(), "666".into())),
            750 => msgs.push(("vehicle.n2.lp".into(), "engine,site=a\0b rpm=1".into())),
            _ => {}
        }
    }
    publish_all(&js, &msgs).await;
    let started = Instant::now();
    let mut collector = env.spawn(&["collect", "--json"]);
    let store = env.store().await;
    assert_eq!(wait_for_count(&*store, 1000, DEADLINE).await, 1000);
    assert_eq!(wait_drained(&js).await, (0, 0), "nothing pending");
    eprintln!("store refusal: drained in {:?}", started.elapsed());
    assert_eq!(store.count_readings().await.unwrap(), 1000);
    let series = want.keys().map(|d| (d.clone(), "speed".to_string()));
    let got = stored_values(&*store, series).await;
    for (device, values) in &want {
        let mut stored = got[&(device.clone(), "speed".to_string())].clone();
        stored.sort_by(f64::total_cmp);
        assert_eq!(&stored, values, "readings of {device}, each once");
    }
    for device in ["n1", "n2"] {
        assert!(store.series(device, None).await.unwrap().is_empty());
    }

    let mut letters = wait_for_letters(&js, 3).await;
    letters.sort_by(|a, b| a.codes.cmp(&b.codes));
    assert_eq!(letters.len(), 3, "{letters:?}");
    let codes: Vec<&str> = letters.iter().map(|l| l.codes[0].as_str()).collect();
    assert_eq!(codes, ["json", "line_protocol", "store"], "{letters:?}");
    let (json, lp, refused) = (&letters[0], &letters[1], &letters[2]);
    assert_eq!(json.subject, "vehicle.n1.speed");
    assert!(json.reason.contains("unit"), "{json:?}");
    assert_eq!(lp.subject, "vehicle.n2.lp");
    assert!(lp.reason.contains("control character"), "{lp:?}");
    assert_eq!(refused.subject, refused_subject);
    assert_eq!(&refused.payload[..], b"666");
    assert!(
        refused.dlq_subject.starts_with("fleetpipe.dlq.store."),
        "{refused:?}"
    );
    let c = counters(&collector.stop());
    assert_eq!(c["readings_stored"], 1000, "{c}");
    assert_eq!(c["store_refused"], 1, "{c}");
    assert_eq!(c["dead_letters"], 3, "{c}");
    // Last: the operator learns which constraint or trigger refused it.
    assert!(
        refused.reason.contains(must_name),
        "the reason should name {must_name:?}: {refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn store_refusal_is_dead_lettered_sqlite() {
    store_refusal(Env::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn store_refusal_is_dead_lettered_postgres() {
    if let Some(env) = Env::postgres("hardening_refusal") {
        store_refusal(env).await;
    }
}

// ---------------------------------------------------------------------------------------
// 3. A message delivered `collector.max_deliver` times is dead-lettered.

#[tokio::test(flavor = "multi_thread")]
async fn max_deliveries_are_dead_lettered() {
    let env = Env::sqlite();
    std::fs::write(
        env.config_path(),
        "[collector]\nack_wait = \"2s\"\nbatch_size = 500\nmax_payload_bytes = 4096\nmax_deliver = 2\n",
    )
    .unwrap();
    env.run(&["init"]);
    let js = env.js().await;
    let seq = js
        .publish("vehicle.md1.speed", Bytes::from_static(b"42"))
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;
    // Two collectors took it and died on it: delivered twice, never acknowledged.
    let consumer = collectors(&js).await;
    for delivery in 1..=2 {
        let mut batch = consumer
            .batch()
            .max_messages(1)
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .unwrap();
        let msg = batch.next().await.expect("delivered").unwrap();
        assert_eq!(msg.info().unwrap().delivered, delivery);
        msg.ack_with(AckKind::Nak(None)).await.unwrap();
    }

    let mut collector = env.spawn(&["collect", "--json"]);
    let letters = wait_for_letters(&js, 1).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let l = &letters[0];
    assert_eq!(l.codes, ["max_deliveries"], "{l:?}");
    assert_eq!(l.dlq_subject, format!("fleetpipe.dlq.max_deliveries.{seq}"));
    assert_eq!(l.subject, "vehicle.md1.speed");
    assert_eq!(&l.payload[..], b"42");
    assert!(l.reason.contains("delivered 2 times"), "{l:?}");

    // Gone from the telemetry stream, and what comes next is stored.
    let stream = js.get_stream(TELEMETRY_STREAM).await.unwrap();
    let deadline = Instant::now() + DEADLINE;
    while stream.get_raw_message(seq).await.is_ok() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        stream.get_raw_message(seq).await.is_err(),
        "still in the stream"
    );
    let good: Vec<(String, String)> = (0..5)
        .map(|i| ("vehicle.md2.speed".to_string(), format!("{i}")))
        .collect();
    publish_all(&js, &good).await;
    let store = env.store().await;
    assert_eq!(wait_for_count(&*store, 5, DEADLINE).await, 5);
    assert_eq!(wait_drained(&js).await, (0, 0));
    assert_eq!(store.count_readings().await.unwrap(), 5, "42 never stored");
    let mut stream = js.get_stream(TELEMETRY_STREAM).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 0);
    let c = counters(&collector.stop());
    assert_eq!(c["max_deliveries"], 1, "{c}");
    assert_eq!(c["readings_stored"], 5, "{c}");
}

// ---------------------------------------------------------------------------------------
// 4. An enormous line-protocol line is refused and does not hold up what follows.

#[tokio::test(flavor = "multi_thread")]
async fn huge_line_is_refused_promptly() {
    let env = Env::sqlite();
    std::fs::write(
        env.config_path(),
        "[collector]\nack_wait = \"2s\"\nbatch_size = 500\nmax_payload_bytes = 262144\n",
    )
    .unwrap();
    env.run(&["init"]);
    let js = env.js().await;
    let mut collector = env.spawn(&["collect", "--json"]);
    // ~14,000 tags and ~14,000 fields on one line.
    let tags: Vec<String> = (0..14_000).map(|i| format!("t{i}=v")).collect();
    let fields: Vec<String> = (0..14_000).map(|i| format!("f{i}=1.5")).collect();
    let line = format!("m,{} {}", tags.join(","), fields.join(","));
    assert!((200_000..262_144).contains(&line.len()), "{}", line.len());
    let mut msgs = vec![("vehicle.big.lp".to_string(), line.clone())];
    msgs.extend((0..10).map(|i| ("vehicle.small.speed".to_string(), format!("{i}"))));
    let started = Instant::now();
    publish_all(&js, &msgs).await;
    let store = env.store().await;
    assert_eq!(wait_for_count(&*store, 10, DEADLINE).await, 10);
    let took = started.elapsed();
    eprintln!("huge line: the 10 readings behind it stored in {took:?}");
    assert!(took < Duration::from_secs(10), "stored after {took:?}");

    let letters = wait_for_letters(&js, 1).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let l = &letters[0];
    assert!(
        ["limit", "line_protocol"].contains(&l.codes[0].as_str()),
        "{:?} {}",
        l.codes,
        l.reason
    );
    assert!(!l.reason.is_empty());
    assert_eq!(l.payload.len(), line.len(), "payload kept whole");
    assert_eq!(wait_drained(&js).await, (0, 0));
    assert_eq!(store.count_readings().await.unwrap(), 10);
    assert!(store.series("big", None).await.unwrap().is_empty());
    let c = counters(&collector.stop());
    assert_eq!(c["dead_letters"], 1, "{c}");
}

// ---------------------------------------------------------------------------------------
// 5. Device ids and simulator settings from the command line are checked before they are
// used.

#[tokio::test(flavor = "multi_thread")]
async fn cli_refuses_invalid_device_ids() {
    let env = Env::sqlite();
    for args in [
        &["state", ">"][..],
        &["state", "a.*"],
        &["state", "*"],
        &["state", "--json", "a.>"],
        &["history", "x.y", "speed"],
        &["history", ">", "speed"],
    ] {
        let out = env.cmd(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "fleetpipe {args:?} succeeded");
        assert!(
            stderr.contains("device id") && stderr.contains("letters, digits, '-' and '_'"),
            "fleetpipe {args:?}: {stderr}"
        );
        assert!(
            out.stdout.is_empty(),
            "fleetpipe {args:?} printed something"
        );
    }
    let out = env.cmd(&["history", "h1", "cpu.>"]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid sensor"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing was touched: no broker objects, no store.
    let js = env.js().await;
    let streams: Vec<String> = js.stream_names().try_collect().await.unwrap();
    assert!(streams.is_empty(), "{streams:?}");
    let db = env.store_url.strip_prefix("sqlite://").unwrap();
    assert!(!std::path::Path::new(db).exists(), "the store was opened");

    // Simulator settings at and past their edges are refused by the flag the user typed.
    for (args, want) in [
        (
            &["simulate", "--payload", "lp", "--lp-ticks", "0"][..],
            "--lp-ticks",
        ),
        (
            &["simulate", "--payload", "lp", "--lp-ticks", "6001"],
            "from 1 to 6000",
        ),
        (
            &[
                "bench",
                "--payload",
                "lp",
                "--lp-ticks",
                "18446744073709551616",
            ],
            "from 1 to 6000",
        ),
        (
            &["simulate", "--lp-ticks", "5"],
            "--lp-ticks applies to --payload lp only",
        ),
    ] {
        let out = env.cmd(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "fleetpipe {args:?} succeeded");
        assert!(
            stderr.contains(want) && !stderr.contains("ticks_per_message"),
            "fleetpipe {args:?}: {stderr}"
        );
    }

    // Valid ids still work.
    assert_eq!(env.run(&["state", "cnc-001_a", "--json"]).trim(), "[]");
    let out = env.run(&["history", "cnc-001_a", "spindle.vibration.rms", "--json"]);
    assert_eq!(out.trim(), "[]");
}

// ---------------------------------------------------------------------------------------
// 6. `fleetpipe history` picks one series by its tags.

#[tokio::test(flavor = "multi_thread")]
async fn history_picks_a_series_by_its_tags() {
    let env = Env::sqlite();
    let store = env.store().await;
    let now = fleetpipe_proto::Timestamp::now().as_micros();
    let mut records = Vec::new();
    for c in 0..4 {
        for k in 0..2 {
            records.push(fleetpipe_store::Record {
                seq: records.len() as u64 + 1,
                reading: fleetpipe_proto::Reading {
                    device: "h1".into(),
                    sensor: "cpu.usage_idle".into(),
                    value: 90.0 + c as f64,
                    ts: fleetpipe_proto::Timestamp::from_micros(now - 60_000_000 + k),
                    unit: None,
                    quality: None,
                    tags: tags(&[("cpu", &format!("cpu{c}")), ("host", "h1")]).into(),
                },
            });
        }
    }
    store.write_readings(&records).await.unwrap();

    let rows = |args: &[&str]| -> Vec<serde_json::Value> {
        let mut all = vec!["history", "h1"];
        all.extend_from_slice(args);
        all.push("--json");
        serde_json::from_str(&env.run(&all)).unwrap()
    };
    for args in [
        &["cpu.usage_idle", "--tag", "cpu=cpu2"][..],
        &["cpu.usage_idle", "--tag", "cpu:cpu2", "--tag", "host=h1"],
        &["cpu.usage_idle{cpu=cpu2,host=h1}"],
    ] {
        let got = rows(args);
        assert_eq!(got.len(), 2, "{args:?}");
        assert_eq!(got[0]["value"], 92.0, "{args:?}");
        assert_eq!(
            got[0]["tags"],
            serde_json::json!({"cpu": "cpu2", "host": "h1"})
        );
    }
    let text = env.run(&["history", "h1", "cpu.usage_idle", "--tag", "cpu=cpu1"]);
    assert!(
        text.starts_with("# h1 cpu.usage_idle{cpu=cpu1,host=h1}\n"),
        "{text}"
    );

    // Not enough tags, or tags no series has: an error listing the tag sets.
    for (args, needles) in [
        (
            &["cpu.usage_idle"][..],
            &[
                "h1 cpu.usage_idle has 4 series",
                "{cpu=cpu0,host=h1}, {cpu=cpu1,host=h1}, {cpu=cpu2,host=h1}, {cpu=cpu3,host=h1}",
                "add --tag cpu=cpu0",
            ][..],
        ),
        (
            &["cpu.usage_idle", "--tag", "cpu=cpu9"],
            &[
                "no series with the tags {cpu=cpu9}",
                "its tag sets: {cpu=cpu0,host=h1}",
            ],
        ),
        (
            &["cpu.usage_idle", "--tag", "cpu"],
            &["--tag must be KEY=VALUE"],
        ),
        (
            &["cpu.usage_idle{cpu"],
            &["invalid sensor", "do not end with '}'"],
        ),
    ] {
        let mut all = vec!["history", "h1"];
        all.extend_from_slice(args);
        let out = env.cmd(&all).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{args:?}: {stderr} lacks {needle:?}"
            );
        }
    }
}

/// A collector (re)started while PostgreSQL is down waits for it instead of exiting, and
/// stores what waited in the stream once the database is back.
#[tokio::test(flavor = "multi_thread")]
async fn a_collector_started_during_a_database_outage_waits_for_it() {
    let Some(env) = Env::postgres("wait_for_db") else {
        return;
    };
    env.run(&["init"]);
    let js = env.js().await;
    let pg = env.pg().expect("a postgres environment");
    pg.stop();
    let mut collector = env.spawn(&["collect"]);
    let msgs: Vec<(String, String)> = (0..10)
        .map(|i| (format!("vehicle.w{i}.speed"), i.to_string()))
        .collect();
    publish_all(&js, &msgs).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        collector.exited().is_none(),
        "the collector gave up while the database was down"
    );
    pg.restart();
    let store = env.store().await;
    assert_eq!(
        wait_for_count(&*store, 10, Duration::from_secs(60)).await,
        10
    );
    collector.stop();
}
