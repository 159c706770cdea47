//! The managed nats-server in secure mode (JWT accounts, TLS) against real clients: what a
//! device may and may not do, what each service user can do, TLS refusals, revocation.
//! One server for every case, in one test, to keep it fast.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use fleetpipe_pipeline::aggregator::Aggregator;
use fleetpipe_pipeline::collector::Collector;
use fleetpipe_pipeline::nats_server::{self, ManagedNats, ManagedOptions};
use fleetpipe_pipeline::security::perms::DEVICE_CONFIG_BUCKET;
use fleetpipe_pipeline::security::tls::TlsFiles;
use fleetpipe_pipeline::security::{Secure, Service};
use fleetpipe_pipeline::{broker, Config, Stats};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A client and what the server told it (errors, disconnects).
struct Watched {
    client: async_nats::Client,
    events: mpsc::UnboundedReceiver<String>,
}

impl Watched {
    /// Waits for an event containing `needle` (case-insensitive), skipping others.
    async fn expect(&mut self, needle: &str, what: &str) {
        let needle = needle.to_lowercase();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.events.recv()).await {
                Ok(Some(e)) if e.to_lowercase().contains(&needle) => return,
                Ok(Some(_)) => continue,
                _ => panic!("{what}: no event containing {needle:?} within 5 s"),
            }
        }
    }

    /// Every server error so far.
    fn errors(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            if e.starts_with("error") {
                out.push(e);
            }
        }
        out
    }
}

async fn connect(url: &str, options: async_nats::ConnectOptions) -> Result<Watched, String> {
    let (tx, events) = mpsc::unbounded_channel();
    let client = options
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                let text = match event {
                    async_nats::Event::ServerError(e) => format!("error: {e}"),
                    other => format!("event: {other}"),
                };
                let _ = tx.send(text);
            }
        })
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Watched { client, events })
}

fn device_options(secure: &Secure, creds: &str, id: &str) -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::with_credentials(creds)
        .unwrap()
        .add_root_certificates(secure.ca_cert().to_path_buf())
        .require_tls(true)
        .custom_inbox_prefix(format!("_INBOX_{id}"))
        .max_reconnects(Some(3))
}

fn direct_get_subject(id: &str) -> String {
    format!(
        "$JS.API.DIRECT.GET.KV_{b}.$KV.{b}.{id}",
        b = DEVICE_CONFIG_BUCKET
    )
}

async fn wait_for(what: &str, deadline: Duration, mut done: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !done().await {
        assert!(
            started.elapsed() < deadline,
            "{what}: not within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secure_server_enforces_every_permission() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.aggregator.interval = Duration::from_millis(100);
    // JetStream refuses a stream larger than it can store: keep the test off the disk's size.
    config.stream.max_bytes = 256 << 20;
    let secure = Secure::init(dir.path(), &config, &[]).unwrap();
    let bin = nats_server::find_binary(&std::env::var("FLEETPIPE_NATS_SERVER").unwrap_or_default())
        .unwrap();
    let port = fleetpipe_testkit::free_port();
    let listen = format!("127.0.0.1:{port}").parse().unwrap();
    let server = ManagedNats::start(
        &bin,
        dir.path(),
        ManagedOptions {
            listen,
            secure: Some(&secure),
        },
    )
    .await
    .unwrap();
    let url = server.url();
    assert!(url.starts_with("tls://"), "{url}");

    // The admin creates the broker objects; a configuration key per device.
    let admin_cfg = secure.service_config(&config, Service::Admin);
    let admin = broker::connect(&url, &admin_cfg, "admin").await.unwrap();
    let b = broker::ensure(&admin, &config).await.unwrap();
    // `ensure` made the configuration bucket.
    let device_config = b.device_config.clone();
    device_config.put("devA", "rate=1".into()).await.unwrap();
    device_config.put("devB", "rate=2".into()).await.unwrap();

    let template = config.template().unwrap();
    let issued = secure
        .issue_devices(&template, &["devA".into(), "devB".into()], false)
        .unwrap();
    let mut a = connect(&url, device_options(&secure, &issued[0].creds, "devA"))
        .await
        .unwrap();
    let a_js = jetstream::new(a.client.clone());

    // Its own subjects, with JetStream acks through its own inbox: fine.
    let ack = a_js
        .publish("vehicle.devA.speed", "42".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(ack.stream, config.stream.name);

    // Another device's subjects: refused by the server, nothing stored.
    a.client
        .publish("vehicle.devB.speed", "666".into())
        .await
        .unwrap();
    a.expect(
        "Permissions Violation for Publish to \"vehicle.devB.speed\"",
        "publish as B",
    )
    .await;
    for subject in ["vehicle.>", "_INBOX.>"] {
        let _sub = a.client.subscribe(subject).await.unwrap();
        a.expect(
            &format!("Permissions Violation for Subscription to \"{subject}\""),
            subject,
        )
        .await;
    }

    // Its own configuration key: a core subscription and direct get work. (The get's
    // reply also proves the server has the subscription before the key changes.)
    let mut changes = a
        .client
        .subscribe(format!("$KV.{DEVICE_CONFIG_BUCKET}.devA"))
        .await
        .unwrap();
    let own = a
        .client
        .request(direct_get_subject("devA"), "".into())
        .await
        .unwrap();
    assert_eq!(&own.payload[..], b"rate=1");
    device_config.put("devA", "rate=5".into()).await.unwrap();
    let change = match tokio::time::timeout(
        Duration::from_secs(5),
        futures::StreamExt::next(&mut changes),
    )
    .await
    {
        Ok(Some(m)) => m,
        other => panic!("no change of A's key: {other:?}; {:?}", a.errors()),
    };
    assert_eq!(&change.payload[..], b"rate=5");
    // B's: refused both ways.
    let b_get = tokio::time::timeout(
        Duration::from_secs(3),
        a.client.request(direct_get_subject("devB"), "".into()),
    )
    .await;
    assert!(!matches!(b_get, Ok(Ok(_))), "A read B's configuration");
    a.expect(
        "Permissions Violation for Publish to \"$JS.API.DIRECT.GET",
        "direct get of B",
    )
    .await;
    let _b_sub = a
        .client
        .subscribe(format!("$KV.{DEVICE_CONFIG_BUCKET}.devB"))
        .await
        .unwrap();
    a.expect(
        "Permissions Violation for Subscription",
        "core sub on B's key",
    )
    .await;

    // The collector, with its own user, stores A's reading; it cannot publish as a device.
    let store_dir = tempfile::tempdir().unwrap();
    let store = fleetpipe_store::open(store_dir.path().join("db").to_str().unwrap())
        .await
        .unwrap();
    let collector_cfg = secure.service_config(&config, Service::Collector);
    let mut collector_client = connect(
        &url,
        broker::client_options(&collector_cfg.nats).await.unwrap(),
    )
    .await
    .unwrap();
    let cb = match broker::ensure_or_open(&collector_client.client, &collector_cfg).await {
        Ok(b) => b,
        Err(e) => panic!("{e:#}: {:?}", collector_client.errors()),
    };
    let stats = Arc::new(Stats::default());
    let stop = CancellationToken::new();
    let collector = Arc::new(
        Collector::new(
            &collector_cfg,
            cb.js.clone(),
            cb.consumer.clone(),
            store.clone(),
            stats.clone(),
        )
        .unwrap(),
    );
    let collecting = tokio::spawn(collector.run(1, stop.clone()));
    let aggregator_cfg = secure.service_config(&config, Service::Aggregator);
    let mut aggregator_client = connect(
        &url,
        broker::client_options(&aggregator_cfg.nats).await.unwrap(),
    )
    .await
    .unwrap();
    let ab = broker::open(&aggregator_client.client, &aggregator_cfg)
        .await
        .unwrap();
    let aggregating = tokio::spawn(
        Aggregator::new(
            &aggregator_cfg,
            ab.state.clone(),
            ab.leases.clone(),
            store.clone(),
            stats.clone(),
        )
        .run(stop.clone()),
    );
    wait_for(
        "A's reading stored by the collector",
        Duration::from_secs(10),
        async || {
            store
                .series("devA", Some("speed"))
                .await
                .is_ok_and(|s| !s.is_empty())
        },
    )
    .await;
    let started = Instant::now();
    while stats.snapshot().aggregator_rows == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the aggregator wrote no snapshot row: {:?}",
            aggregator_client.errors()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        b.state.get("devA.speed").await.unwrap().is_some(),
        "latest state put by the collector"
    );
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), collecting).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), aggregating).await;
    assert_eq!(
        collector_client.errors(),
        Vec::<String>::new(),
        "collector violations"
    );
    assert_eq!(
        aggregator_client.errors(),
        Vec::<String>::new(),
        "aggregator violations"
    );
    collector_client
        .client
        .publish("vehicle.devB.speed", "1".into())
        .await
        .unwrap();
    collector_client
        .expect(
            "Permissions Violation for Publish",
            "collector publishing as a device",
        )
        .await;
    // The simulator's user publishes telemetry, and nothing of the broker's internals.
    let sim_cfg = secure.service_config(&config, Service::Simulator);
    let mut sim = connect(&url, broker::client_options(&sim_cfg.nats).await.unwrap())
        .await
        .unwrap();
    jetstream::new(sim.client.clone())
        .publish("vehicle.sim1.speed", "1".into())
        .await
        .unwrap()
        .await
        .unwrap();
    sim.client
        .publish(format!("$KV.{DEVICE_CONFIG_BUCKET}.devA"), "x".into())
        .await
        .unwrap();
    sim.expect(
        "Permissions Violation for Publish",
        "simulator writing config",
    )
    .await;

    // TLS: a plaintext client and a client trusting another CA are refused.
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    plain
        .write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n")
        .await
        .unwrap();
    // The server answers with its INFO (tls_required), then closes the connection
    // without a PONG.
    let mut answer = vec![0u8; 4096];
    let mut got = String::new();
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(5), plain.read(&mut answer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => got.push_str(&String::from_utf8_lossy(&answer[..n])),
            Err(_) => break false,
        }
    };
    assert!(closed && !got.contains("PONG"), "plaintext answered: {got}");
    assert!(got.contains("\"tls_required\":true"), "{got}");
    let other_ca = tempfile::tempdir().unwrap();
    let other = TlsFiles::under(other_ca.path());
    other.ensure(&[]).unwrap();
    let wrong = async_nats::ConnectOptions::with_credentials(&issued[1].creds)
        .unwrap()
        .add_root_certificates(other.ca_cert.clone())
        .require_tls(true)
        .connection_timeout(Duration::from_secs(3))
        .connect(&url)
        .await;
    assert!(wrong.is_err(), "a client trusting another CA connected");

    // Revocation: A is disconnected within seconds and cannot come back; B still works.
    let started = Instant::now();
    secure.revoke_device("devA").unwrap();
    secure.push_account_jwt(&url).await.unwrap();
    a.expect("disconnected", "A disconnected after revocation")
        .await;
    assert!(started.elapsed() < Duration::from_secs(5));
    let again = async_nats::ConnectOptions::with_credentials(&issued[0].creds)
        .unwrap()
        .add_root_certificates(secure.ca_cert().to_path_buf())
        .require_tls(true)
        .connection_timeout(Duration::from_secs(3))
        .connect(&url)
        .await;
    assert!(again.is_err(), "a revoked device reconnected");
    let b_client = connect(&url, device_options(&secure, &issued[1].creds, "devB"))
        .await
        .unwrap();
    jetstream::new(b_client.client.clone())
        .publish("vehicle.devB.speed", "7".into())
        .await
        .unwrap()
        .await
        .unwrap();
    drop(admin);
    server.stop().await;

    // A restart keeps the revocation (the stored account JWT is preloaded).
    let server = ManagedNats::start(
        &bin,
        dir.path(),
        ManagedOptions {
            listen,
            secure: Some(&Secure::init(dir.path(), &config, &[]).unwrap()),
        },
    )
    .await
    .unwrap();
    let after = async_nats::ConnectOptions::with_credentials(&issued[0].creds)
        .unwrap()
        .add_root_certificates(secure.ca_cert().to_path_buf())
        .require_tls(true)
        .connection_timeout(Duration::from_secs(3))
        .connect(server.url())
        .await;
    assert!(after.is_err(), "a revoked device connected after a restart");
    server.stop().await;
}

#[tokio::test]
async fn an_unauthenticated_server_stays_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let err = ManagedNats::start(
        std::path::Path::new("/nonexistent/nats-server"),
        dir.path(),
        ManagedOptions {
            listen: "0.0.0.0:4222".parse().unwrap(),
            secure: None,
        },
    )
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("--secure"), "{err}");
}
