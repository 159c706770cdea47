//! The fleet simulator against a real nats-server with JetStream.

use std::collections::{BTreeMap, BTreeSet};
use std::future::pending;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use fleetpipe_device::simulate::{self, PayloadForm, SimConfig, SimError, SimSummary, StopReason};
use fleetpipe_proto::{decode, Limits, SubjectTemplate, Timestamp};
use fleetpipe_testkit::NatsServer;
use futures::StreamExt;

const STREAM: &str = "TELEMETRY";

async fn jetstream(server: &NatsServer) -> jetstream::Context {
    let client = async_nats::connect(server.url()).await.expect("connect");
    jetstream::new(client)
}

/// A file-backed stream capturing the default template's subjects, as `fleetpipe up` makes.
async fn create_stream(js: &jetstream::Context) -> stream::Stream {
    js.create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec![SubjectTemplate::default().stream_filter()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("create stream")
}

async fn stored(js: &jetstream::Context) -> u64 {
    let mut stream = js.get_stream(STREAM).await.expect("get stream");
    stream.info().await.expect("stream info").state.messages
}

/// Every message in the stream: subject, payload and `Nats-Msg-Id`.
async fn read_all(js: &jetstream::Context) -> Vec<(String, Vec<u8>, Option<String>)> {
    let n = stored(js).await as usize;
    let stream = js.get_stream(STREAM).await.expect("get stream");
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("create consumer");
    let messages = consumer.messages().await.expect("consume");
    let read = messages.take(n).map(|m| {
        let m = m.expect("message");
        let id = m
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.to_string());
        (m.subject.to_string(), m.payload.to_vec(), id)
    });
    tokio::time::timeout(Duration::from_secs(30), read.collect())
        .await
        .expect("read the stream within 30 s")
}

async fn run(cfg: SimConfig) -> SimSummary {
    tokio::time::timeout(
        Duration::from_secs(60),
        simulate::run(cfg, pending(), |_| {}),
    )
    .await
    .expect("the simulator finishes within 60 s")
    .expect("the simulator runs")
}

/// Runs a fleet of 100 in `form` up to 2,000 messages and checks what the stream holds.
async fn check_payload_form(form: PayloadForm) {
    let server = NatsServer::start();
    let js = jetstream(&server).await;
    create_stream(&js).await;
    let summary = run(SimConfig {
        devices: 100,
        payload: form,
        max_messages: Some(2_000),
        msg_ids: true,
        ..SimConfig::new(server.url())
    })
    .await;

    let s = &summary.stats;
    assert_eq!(summary.stopped_by, StopReason::MaxMessages);
    assert_eq!(summary.payload, form);
    assert_eq!(s.published, 2_000, "{summary:?}");
    assert_eq!(s.acknowledged, s.published, "{summary:?}");
    assert_eq!(
        (s.errors, s.duplicates, s.in_flight),
        (0, 0, 0),
        "{summary:?}"
    );
    assert_eq!(stored(&js).await, s.published);

    let template = SubjectTemplate::default();
    let mut readings = 0;
    let mut sensors = BTreeSet::new();
    let mut devices = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for (subject, payload, id) in read_all(&js).await {
        let parts = template
            .parse_subject(&subject)
            .expect("subject fits the template");
        devices.insert(parts.device.to_string());
        let decoded = decode(
            &template,
            &subject,
            &payload,
            Timestamp::now(),
            &Limits::default(),
        );
        assert!(
            decoded.rejects.is_empty(),
            "{subject} {:?}: {:?}",
            String::from_utf8_lossy(&payload),
            decoded.rejects
        );
        for r in &decoded.readings {
            sensors.insert(r.sensor.clone());
            match r.sensor.as_str() {
                "speed" => assert!((0.0..=130.0).contains(&r.value), "speed {}", r.value),
                "soc" => assert!((0.0..=100.0).contains(&r.value), "soc {}", r.value),
                "gps.lat" => assert!((48.7..49.0).contains(&r.value), "lat {}", r.value),
                "gps.lon" => assert!((2.2..2.5).contains(&r.value), "lon {}", r.value),
                "torque" => assert!((-400.0..=400.0).contains(&r.value)),
                other => panic!("unexpected sensor {other}"),
            }
            if form != PayloadForm::Plain {
                let age = Timestamp::now().as_micros() - r.ts.as_micros();
                assert!(
                    (0..120_000_000).contains(&age),
                    "device timestamp {} is off",
                    r.ts
                );
            }
        }
        readings += decoded.readings.len() as u64;
        let id = id.expect("Nats-Msg-Id is set");
        assert!(
            id.starts_with(&format!("{}-", parts.device)),
            "{id} for {subject}"
        );
        assert!(ids.insert(id), "message ids are unique");
    }
    assert_eq!(readings, s.readings);
    if form == PayloadForm::LineProtocol {
        assert!(readings > s.published, "line protocol batches readings");
    } else {
        assert_eq!(readings, s.published);
    }
    let all: BTreeSet<fleetpipe_proto::Name> = ["gps.lat", "gps.lon", "speed", "soc", "torque"]
        .map(fleetpipe_proto::Name::from)
        .into();
    assert_eq!(sensors, all);
    assert_eq!(devices.len(), 100, "every device publishes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_payloads_are_stored_and_decode() {
    check_payload_form(PayloadForm::Plain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_payloads_are_stored_and_decode() {
    check_payload_form(PayloadForm::Json).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_protocol_payloads_are_stored_and_decode() {
    check_payload_form(PayloadForm::LineProtocol).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sensors_sample_at_their_own_rates() {
    let server = NatsServer::start();
    let js = jetstream(&server).await;
    create_stream(&js).await;
    let summary = run(SimConfig {
        devices: 20,
        duration: Some(Duration::from_secs(4)),
        ..SimConfig::new(server.url())
    })
    .await;
    assert_eq!(summary.stopped_by, StopReason::Duration);
    assert_eq!(summary.stats.errors, 0);
    assert_eq!(stored(&js).await, summary.stats.published);

    let mut per_sensor: BTreeMap<String, u64> = BTreeMap::new();
    for (subject, _, _) in read_all(&js).await {
        let template = SubjectTemplate::default();
        let parts = template.parse_subject(&subject).expect("subject fits");
        *per_sensor.entry(parts.sensor.to_string()).or_default() += 1;
    }
    let n = |s: &str| per_sensor.get(s).copied().unwrap_or_default();
    // Natural rates: torque 5 Hz, speed 2 Hz, GPS 1 Hz, state of charge 0.2 Hz.
    assert!(
        n("torque") > n("speed")
            && n("speed") > n("gps.lat")
            && n("gps.lat") > n("soc")
            && n("soc") > 0,
        "{per_sensor:?}"
    );
    assert_eq!(n("gps.lat"), n("gps.lon"), "a GPS fix is both coordinates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_cap_paces_the_fleet() {
    let server = NatsServer::start();
    let js = jetstream(&server).await;
    create_stream(&js).await;
    // 1,000 vehicles would publish 9,200 messages/s; capped at 500/s for 2 s.
    let summary = run(SimConfig {
        devices: 1_000,
        rate: Some(500.0),
        duration: Some(Duration::from_secs(2)),
        ..SimConfig::new(server.url())
    })
    .await;
    let published = summary.stats.published;
    assert!((500..=1_500).contains(&published), "{summary:?}");
    assert_eq!(summary.stats.acknowledged, published);
    assert_eq!(stored(&js).await, published);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_and_waits_for_every_ack() {
    let server = NatsServer::start();
    let js = jetstream(&server).await;
    create_stream(&js).await;
    let mut reports = Vec::new();
    let shutdown = tokio::time::sleep(Duration::from_millis(2_500));
    let summary = simulate::run(
        SimConfig {
            devices: 500,
            ..SimConfig::new(server.url())
        },
        shutdown,
        |stats| reports.push(stats.clone()),
    )
    .await
    .expect("the simulator runs");
    assert_eq!(summary.stopped_by, StopReason::Shutdown);
    let s = &summary.stats;
    assert!(s.published > 0);
    assert_eq!((s.acknowledged, s.errors, s.in_flight), (s.published, 0, 0));
    assert_eq!(stored(&js).await, s.published);
    assert!(!reports.is_empty(), "progress is reported every second");
    assert!(reports.iter().all(|r| r.published <= s.published));
    assert!(reports.last().is_some_and(|r| r.publish_rate > 0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_with_the_same_seed_is_deduplicated() {
    let server = NatsServer::start();
    let js = jetstream(&server).await;
    create_stream(&js).await;
    // One connection walks the fleet in one fixed order, so both runs send the same ids.
    let cfg = SimConfig {
        devices: 50,
        connections: 1,
        msg_ids: true,
        max_messages: Some(300),
        ..SimConfig::new(server.url())
    };
    let first = run(cfg.clone()).await;
    assert_eq!(first.stats.duplicates, 0);
    let second = run(cfg).await;
    assert_eq!(second.stats.acknowledged, 300);
    assert_eq!(second.stats.duplicates, 300, "{second:?}");
    assert_eq!(stored(&js).await, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_is_a_clear_error() {
    let server = NatsServer::start();
    let started = Instant::now();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        simulate::run(
            SimConfig {
                devices: 100,
                ..SimConfig::new(server.url())
            },
            pending(),
            |_| {},
        ),
    )
    .await
    .expect("fails fast instead of hanging");
    match result {
        Err(e @ SimError::NoStream { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("fleetpipe up") && text.contains("vehicle.>"),
                "{text}"
            );
        }
        other => panic!("expected NoStream, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_a_connect_error() {
    let port = fleetpipe_testkit::free_port();
    let cfg = SimConfig::new(format!("nats://127.0.0.1:{port}"));
    let result = simulate::run(cfg, pending(), |_| {}).await;
    assert!(
        matches!(result, Err(SimError::Connect { .. })),
        "{result:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_with_extra_tokens_get_tag_values() {
    let server = NatsServer::start();
    let js = jetstream(&server).await;
    let template = SubjectTemplate::parse("fleet.{site}.{device}.{sensor}").expect("template");
    js.create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec![template.stream_filter()],
        ..Default::default()
    })
    .await
    .expect("create stream");
    let summary = run(SimConfig {
        devices: 8,
        max_messages: Some(200),
        template: template.clone(),
        ..SimConfig::new(server.url())
    })
    .await;
    assert_eq!(summary.stats.acknowledged, 200);
    for (subject, payload, _) in read_all(&js).await {
        let decoded = decode(
            &template,
            &subject,
            &payload,
            Timestamp::now(),
            &Limits::default(),
        );
        assert!(
            decoded.rejects.is_empty(),
            "{subject}: {:?}",
            decoded.rejects
        );
        let tags = &decoded.readings[0].tags;
        assert!(
            tags[0].0 == "site" && tags[0].1.starts_with("site-"),
            "{tags:?}"
        );
    }
}

/// Throughput with no rate cap: `cargo test -p fleetpipe-device --test simulate --
/// --ignored --nocapture throughput`. Prints the figure, asserts nothing about speed.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement, not a test"]
async fn throughput() {
    for devices in [1_000, 100_000] {
        let server = NatsServer::start();
        let js = jetstream(&server).await;
        create_stream(&js).await;
        let summary = run(SimConfig {
            devices,
            max_messages: Some(200_000),
            ..SimConfig::new(server.url())
        })
        .await;
        let s = &summary.stats;
        println!(
            "{devices} devices: {} messages in {:.2} s = {:.0} messages/s acknowledged, errors {}",
            s.acknowledged, s.elapsed_secs, s.ack_rate, s.errors
        );
        assert_eq!(stored(&js).await, s.acknowledged);
    }
}

/// The reference scale: 520,000 vehicles capped at 1.2 million messages a minute. Run like
/// `throughput`; prints the rate held and the peak memory.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement, not a test"]
async fn reference_scale() {
    let server = NatsServer::start();
    let js = jetstream(&server).await;
    create_stream(&js).await;
    let summary = run(SimConfig {
        devices: 520_000,
        rate: Some(20_000.0),
        duration: Some(Duration::from_secs(10)),
        ..SimConfig::new(server.url())
    })
    .await;
    let s = &summary.stats;
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM"))
                .map(str::to_string)
        })
        .unwrap_or_default();
    println!(
        "520000 devices capped at 20000/s: {} messages in {:.2} s = {:.0}/s, errors {}, {peak}",
        s.acknowledged, s.elapsed_secs, s.ack_rate, s.errors
    );
    assert_eq!(stored(&js).await, s.acknowledged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_is_ridden_out() {
    let mut server = NatsServer::start();
    let js = jetstream(&server).await;
    create_stream(&js).await;
    let cfg = SimConfig {
        devices: 200,
        duration: Some(Duration::from_secs(14)),
        ack_timeout: Duration::from_secs(2),
        ..SimConfig::new(server.url())
    };
    let outage = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_secs(2));
        server.kill();
        std::thread::sleep(Duration::from_secs(2));
        server.restart();
        server
    });
    let mut after_restart = 0;
    let summary = tokio::time::timeout(
        Duration::from_secs(60),
        simulate::run(cfg, pending(), |stats| {
            // Acks counted just after the restart (once, not at every later call): the
            // run must acknowledge more after it, however slowly the client reconnects.
            if stats.elapsed_secs > 6.0 && after_restart == 0 {
                after_restart = stats.acknowledged.max(1);
            }
        }),
    )
    .await
    .expect("the simulator finishes within 60 s")
    .expect("the simulator rides out the outage");
    let server = outage.await.expect("outage task");
    let s = &summary.stats;
    assert_eq!(s.in_flight, 0, "{summary:?}");
    assert_eq!(s.acknowledged + s.errors, s.published, "{summary:?}");
    assert!(
        after_restart > 0 && s.acknowledged > after_restart,
        "{summary:?}"
    );
    let js = jetstream(&server).await;
    assert!(
        stored(&js).await >= s.acknowledged,
        "every acknowledged message is stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flat_out_runs_past_the_natural_rate() {
    let server = NatsServer::start();
    let js = jetstream(&server).await;
    create_stream(&js).await;
    let summary = run(SimConfig {
        devices: 10,
        flat_out: true,
        duration: Some(Duration::from_secs(2)),
        ..SimConfig::new(server.url())
    })
    .await;
    let s = &summary.stats;
    // At natural rates 10 vehicles send 9.2 messages/s each: 184 in 2 s.
    assert!(s.published > 2 * 184, "{summary:?}");
    assert_eq!((s.errors, s.in_flight), (0, 0), "{summary:?}");
    assert_eq!(stored(&js).await, s.published);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line_protocol_messages_carry_several_ticks() {
    let server = NatsServer::start();
    let js = jetstream(&server).await;
    create_stream(&js).await;
    let summary = run(SimConfig {
        devices: 10,
        payload: PayloadForm::LineProtocol,
        ticks_per_message: 20,
        flat_out: true,
        max_messages: Some(50),
        ..SimConfig::new(server.url())
    })
    .await;
    assert_eq!(summary.stats.published, 50, "{summary:?}");
    let template = SubjectTemplate::default();
    let mut readings = 0;
    for (subject, payload, _) in read_all(&js).await {
        let decoded = decode(
            &template,
            &subject,
            &payload,
            Timestamp::now(),
            &Limits::default(),
        );
        assert!(decoded.rejects.is_empty(), "{:?}", decoded.rejects);
        // 20 ticks of 100 ms: torque 10, speed 4, GPS 2 × 2, state of charge 0 or 1.
        assert!(
            (18..=19).contains(&decoded.readings.len()),
            "{} readings in {subject}",
            decoded.readings.len()
        );
        let mut keys: Vec<(String, i64)> = decoded
            .readings
            .iter()
            .map(|r| (r.sensor.to_string(), r.ts.as_micros()))
            .collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), decoded.readings.len(), "one timestamp per tick");
        readings += decoded.readings.len() as u64;
    }
    assert_eq!(readings, summary.stats.readings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_gate_holds_the_fleet_until_it_is_raised() {
    let server = NatsServer::start();
    let js = jetstream(&server).await;
    create_stream(&js).await;
    let gate = simulate::PublishGate::new(300);
    let connections = 4;
    let cfg = SimConfig {
        devices: 200,
        connections,
        flat_out: true,
        max_messages: Some(1_000),
        gate: Some(gate.clone()),
        ..SimConfig::new(server.url())
    };
    let sim = tokio::spawn(simulate::run(cfg, pending(), |_| {}));

    // Flat out, the fleet reaches the limit at once and then stays there.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stored(&js).await < 300 {
        assert!(
            Instant::now() < deadline,
            "the fleet never reached the gate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = stored(&js).await;
    assert!(
        (300..=300 + connections as u64).contains(&held),
        "{held} published with the gate at 300"
    );
    assert!(!sim.is_finished());

    gate.raise_to(1_000);
    let summary = tokio::time::timeout(Duration::from_secs(60), sim)
        .await
        .expect("the simulator finishes within 60 s once the gate is raised")
        .expect("simulator task")
        .expect("the simulator runs");
    assert_eq!(summary.stats.published, 1_000);
    assert_eq!(stored(&js).await, 1_000);
}
