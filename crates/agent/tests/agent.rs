//! `fleetpipe-agent` against real nats-servers: outages, SIGKILL, a full buffer, a
//! cluster losing the agent's node, live configuration, device permissions.
//!
//! Every test runs the real binary with a config file in a temp dir and checks what
//! reached the telemetry stream (created by the pipeline's own `broker::ensure`), decoded
//! with the wire contract. Sensors are `counter` signals (0, 1, 2… per sensor and agent
//! start), so loss, duplicates and order show directly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use fleetpipe_pipeline::broker;
use fleetpipe_pipeline::config::Config as PipelineConfig;
use fleetpipe_proto::{decode, Limits, SubjectTemplate, Timestamp};
use fleetpipe_testkit::{free_port, NatsCluster, NatsServer};
use futures::StreamExt;

const BIN: &str = env!("CARGO_BIN_EXE_fleetpipe-agent");

/// A running agent.
struct Agent {
    child: Option<Child>,
    dir: PathBuf,
    config: PathBuf,
}

impl Agent {
    /// Writes `config` into `dir` and starts the agent on it.
    fn start(dir: &Path, config: &str) -> Agent {
        let path = dir.join("agent.toml");
        std::fs::write(&path, config).unwrap();
        let mut agent = Agent {
            child: None,
            dir: dir.to_path_buf(),
            config: path,
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let child = Command::new(BIN)
            .arg("--config")
            .arg(&self.config)
            .env("FLEETPIPE_AGENT_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start fleetpipe-agent");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and waits for the agent to finish.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
            panic!(
                "the agent did not stop within 10 s of SIGTERM:\n{}",
                self.log()
            );
        }
    }

    fn status(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.dir.join("buffer/status.json")).unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Waits until `check` holds on the status file, or fails with the log.
    async fn wait_status(
        &self,
        what: &str,
        within: Duration,
        check: impl Fn(&serde_json::Value) -> bool,
    ) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if check(&self.status()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "{what}: not within {within:?}; status {}\nlog:\n{}",
            self.status(),
            tail(&self.log())
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// An agent config: `sensors` counters at `hz`, buffer in `dir/buffer`.
fn config(device: &str, urls: &str, dir: &Path, sensors: usize, hz: f64, extra: &str) -> String {
    let mut c = format!(
        "device = \"{device}\"\nurls = [{}]\n{extra}\n[buffer]\ndir = \"{}\"\n",
        urls.split(',')
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(", "),
        dir.join("buffer").display()
    );
    for i in 0..sensors {
        c.push_str(&format!(
            "[[sensor]]\nname = \"s{i}\"\nsource = \"simulated\"\nsignal = \"counter\"\nrate_hz = {hz}\nunit = \"n\"\n"
        ));
    }
    c
}

/// The pipeline's broker objects, with a test consumer of our own on `device`'s subjects.
async fn ensure(url: &str, replicas: usize) -> jetstream::Context {
    let mut cfg = PipelineConfig::default();
    cfg.stream.replicas = replicas;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let client = connect(url).await;
        match broker::ensure(&client, &cfg).await {
            Ok(b) => return b.js,
            // A fresh cluster needs a moment to elect its JetStream meta leader.
            Err(e) if Instant::now() < deadline => {
                eprintln!("ensure: {e:#}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("ensure: {e:#}"),
        }
    }
}

/// Connects to comma-separated `urls`, with the user and password of the first if any.
async fn connect(urls: &str) -> async_nats::Client {
    let addrs: Vec<async_nats::ServerAddr> = urls.split(',').map(|u| u.parse().unwrap()).collect();
    let mut options = async_nats::ConnectOptions::new();
    if let Some(a) = addrs.iter().find(|a| a.username().is_some()) {
        options = options.user_and_password(
            a.username().unwrap().to_string(),
            a.password().unwrap_or_default().to_string(),
        );
    }
    options.connect(addrs).await.expect("connect")
}

async fn test_consumer(js: &jetstream::Context, device: &str) -> consumer::PullConsumer {
    let stream = js.get_stream("FLEETPIPE_TELEMETRY").await.expect("stream");
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(format!("test-{device}")),
            filter_subject: format!("vehicle.{device}.>"),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .expect("consumer")
}

/// One reading as the collector would see it.
#[derive(Debug, Clone, PartialEq)]
struct Got {
    value: f64,
    ts: i64,
    unit: Option<String>,
}

/// Reads (and acks) everything the consumer has, waiting until nothing new comes for
/// `quiet`: readings per sensor in stream order.
async fn drain(c: &consumer::PullConsumer, quiet: Duration) -> BTreeMap<String, Vec<Got>> {
    let template = SubjectTemplate::default();
    let mut out: BTreeMap<String, Vec<Got>> = BTreeMap::new();
    // In a cluster that just lost a node the consumer may be electing a leader (503s).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let msgs: Vec<_> = match c.fetch().max_messages(1000).expires(quiet).messages().await {
            Ok(batch) => batch.collect().await,
            Err(e) if Instant::now() < deadline => {
                eprintln!("fetch: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => panic!("fetch: {e}"),
        };
        if msgs.is_empty() {
            return out;
        }
        for m in msgs {
            let m = match m {
                Ok(m) => m,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("fetch: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(e) => panic!("fetch: {e}"),
            };
            let d = decode(
                &template,
                &m.subject,
                &m.payload,
                Timestamp::now(),
                &Limits::default(),
            );
            assert!(d.rejects.is_empty(), "rejects: {:?}", d.rejects);
            for r in d.readings {
                out.entry(r.sensor.to_string()).or_default().push(Got {
                    value: r.value,
                    ts: r.ts.as_micros(),
                    unit: r.unit,
                });
            }
            m.ack().await.expect("ack");
        }
    }
}

/// Checks one sensor's readings: runs of 0, 1, 2… (one run per agent start), timestamps
/// strictly increasing; returns the run lengths.
fn runs(sensor: &str, got: &[Got]) -> Vec<u64> {
    let mut runs = Vec::new();
    let mut expect = 0.0;
    let mut last_ts = i64::MIN;
    for (i, g) in got.iter().enumerate() {
        assert!(
            g.ts > last_ts,
            "{sensor}: reading {i} not after the previous one: {:?}",
            &got[i.saturating_sub(2)..=i]
        );
        last_ts = g.ts;
        if g.value == 0.0 && i > 0 {
            runs.push(expect as u64);
            expect = 0.0;
        }
        assert_eq!(
            g.value,
            expect,
            "{sensor}: reading {i} is {} where {expect} was due (lost or duplicated): {:?}",
            g.value,
            &got[i.saturating_sub(3)..(i + 3).min(got.len())]
        );
        expect += 1.0;
    }
    runs.push(expect as u64);
    runs
}

/// The issue's outage: 10 sensors × 10 Hz, the server down for 60 s, the agent SIGKILLed
/// and restarted in the middle of it: every reading arrives once, in order, with the
/// device's timestamps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_of_60s_and_a_sigkill_lose_nothing_and_duplicate_nothing() {
    let mut server = NatsServer::start();
    let js = ensure(&server.url(), 1).await;
    let consumer = test_consumer(&js, "out1").await;
    let dir = tempfile::tempdir().unwrap();
    let started = Timestamp::now().as_micros();
    let mut agent = Agent::start(
        dir.path(),
        &config("out1", &server.url(), dir.path(), 10, 10.0, ""),
    );
    agent
        .wait_status("acknowledged readings", Duration::from_secs(10), |s| {
            s["counters"]["readings_acknowledged"].as_u64() > Some(100)
        })
        .await;

    server.kill();
    let outage = Instant::now();
    agent
        .wait_status("the link seen down", Duration::from_secs(10), |s| {
            s["link"]["connected"] == false
        })
        .await;
    tokio::time::sleep(Duration::from_secs(25)).await;
    let before_kill = agent.status();
    assert!(
        before_kill["buffer"]["pending_messages"].as_u64() > Some(100),
        "{before_kill}"
    );
    agent.kill();
    agent.spawn();
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(outage.elapsed())).await;
    server.restart();
    agent
        .wait_status("the buffer replayed", Duration::from_secs(30), |s| {
            s["link"]["connected"] == true && s["buffer"]["pending_messages"].as_u64() == Some(0)
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    agent.stop();
    let status = agent.status();
    assert_eq!(status["buffer"]["dropped_messages"], 0, "{status}");

    let got = drain(&consumer, Duration::from_secs(2)).await;
    assert_eq!(got.len(), 10, "sensors: {:?}", got.keys());
    for (sensor, readings) in &got {
        let runs = runs(sensor, readings);
        // Two agent starts; the first ran ~30 s at 10 Hz, offline for most of it.
        assert_eq!(runs.len(), 2, "{sensor}: runs {runs:?}");
        assert!(
            runs[0] >= 250,
            "{sensor}: the first run has {} readings",
            runs[0]
        );
        assert!(
            runs[1] >= 250,
            "{sensor}: the second run has {} readings",
            runs[1]
        );
        assert!(readings[0].ts >= started, "device timestamps");
        assert_eq!(
            readings[0].unit.as_deref(),
            Some("n"),
            "the unit goes with the first reading"
        );
    }
    // The readings sampled offline are there: a second-by-second coverage of the outage.
    let ts: Vec<i64> = got["s0"].iter().map(|g| g.ts).collect();
    let gaps = ts.windows(2).filter(|w| w[1] - w[0] > 1_500_000).count();
    assert!(
        gaps <= 1,
        "only the restart may leave a gap of over 1.5 s: {gaps}"
    );
}

/// A full buffer drops the oldest readings, counts them, and shows the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_drops_the_oldest_and_counts_them() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let extra = "[publish]\nbatch_interval = \"10ms\"";
    let mut cfg = config("full1", &url, dir.path(), 10, 50.0, extra);
    cfg = cfg.replace("[buffer]\n", "[buffer]\nmax_bytes = 32768\n");
    let mut agent = Agent::start(dir.path(), &cfg);
    agent
        .wait_status("dropped readings counted", Duration::from_secs(30), |s| {
            s["buffer"]["dropped_readings"].as_u64() > Some(100)
        })
        .await;
    let out = Command::new(BIN)
        .args(["status", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("dropped when full"), "{text}");
    assert!(agent.status()["buffer"]["bytes"].as_u64() <= Some(32768));

    // What is left arrives once the server is there: the newest, not the oldest.
    let server = NatsServer::start_with(port, &[]);
    let js = ensure(&server.url(), 1).await;
    let consumer = test_consumer(&js, "full1").await;
    agent
        .wait_status("the buffer replayed", Duration::from_secs(30), |s| {
            s["buffer"]["pending_messages"].as_u64() == Some(0) && s["link"]["connected"] == true
        })
        .await;
    agent.stop();
    let got = drain(&consumer, Duration::from_secs(1)).await;
    let first = got["s0"][0].value;
    assert!(
        first > 0.0,
        "the oldest readings were dropped, so s0 starts later: {first}"
    );
    let dropped = agent.status()["buffer"]["dropped_readings"]
        .as_u64()
        .unwrap();
    let total: usize = got.values().map(Vec::len).sum();
    let emitted = agent.status()["counters"]["readings_emitted"]
        .as_u64()
        .unwrap();
    assert_eq!(
        total as u64 + dropped,
        emitted,
        "every reading is either delivered or counted as dropped"
    );
}

/// A 3-node cluster: given one URL the agent learns the others; its node is killed; it is
/// back on another within a few seconds, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_learns_the_cluster_and_survives_its_node() {
    let mut cluster = NatsCluster::start(3);
    let js = ensure(&cluster.urls(), 3).await;
    let consumer = test_consumer(&js, "clu1").await;
    let dir = tempfile::tempdir().unwrap();
    let first = cluster.nodes[0].url();
    let mut agent = Agent::start(
        dir.path(),
        &config("clu1", &first, dir.path(), 10, 10.0, ""),
    );
    agent
        .wait_status(
            "connected, the others discovered",
            Duration::from_secs(15),
            |s| {
                s["link"]["connected"] == true
                    && s["link"]["known_servers"]
                        .as_array()
                        .is_some_and(|k| k.len() >= 2)
                    && s["counters"]["readings_acknowledged"].as_u64() > Some(50)
            },
        )
        .await;
    cluster.nodes[0].kill();
    let killed = Instant::now();
    let port = cluster.nodes[0].port().to_string();
    agent
        .wait_status(
            "reconnected to another node",
            Duration::from_secs(10),
            |s| {
                s["link"]["connected"] == true
                    && s["link"]["server"]
                        .as_str()
                        .is_some_and(|srv| !srv.contains(&format!(":{port} ")))
            },
        )
        .await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(5), "reconnecting took {took:?}");
    agent
        .wait_status("caught up", Duration::from_secs(30), |s| {
            s["buffer"]["pending_messages"].as_u64() == Some(0)
                && s["counters"]["readings_acknowledged"].as_u64() > Some(300)
        })
        .await;
    agent.stop();
    let log = agent.log();
    assert!(log.contains("reconnected to nats"), "{}", tail(&log));
    let got = drain(&consumer, Duration::from_secs(2)).await;
    assert_eq!(got.len(), 10);
    for (sensor, readings) in &got {
        assert_eq!(
            runs(sensor, readings).len(),
            1,
            "one agent run, no gap, no duplicate"
        );
    }
}

/// A rate change in KV shows in the data within a second; an invalid value is refused
/// with its reason (status file and status subject) and the old one keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_configuration_applies_within_a_second_and_bad_values_are_refused() {
    let server = NatsServer::start();
    let js = ensure(&server.url(), 1).await;
    let consumer = test_consumer(&js, "cfg1").await;
    let kv = js
        .get_key_value("fleetpipe_config")
        .await
        .expect("config bucket");
    let client = connect(&server.url()).await;
    let mut status_sub = client.subscribe("vehicle.cfg1._status").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(
        dir.path(),
        &config("cfg1", &server.url(), dir.path(), 2, 2.0, ""),
    );
    agent
        .wait_status("running", Duration::from_secs(10), |s| {
            s["counters"]["readings_acknowledged"].as_u64() > Some(4)
        })
        .await;

    let put_at = Timestamp::now().as_micros();
    let rev = kv
        .put(
            "cfg1",
            "[sensors.s0]\nrate_hz = 20.0\n[sensors.s1]\nenabled = false\n".into(),
        )
        .await
        .unwrap();
    agent
        .wait_status("applied", Duration::from_secs(5), |s| {
            s["config"]["revision"].as_u64() == Some(rev)
        })
        .await;
    let applied = tokio::time::timeout(Duration::from_secs(5), status_sub.next())
        .await
        .unwrap()
        .unwrap();
    let applied: serde_json::Value = serde_json::from_slice(&applied.payload).unwrap();
    assert_eq!(applied["config_revision"].as_u64(), Some(rev));
    tokio::time::sleep(Duration::from_secs(2)).await;

    let bad_rev = kv
        .put(
            "cfg1",
            "[sensors.s0]\nrate_hz = -1\n[sensors.nope]\nenabled = true\n".into(),
        )
        .await
        .unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(5), status_sub.next())
        .await
        .unwrap()
        .unwrap();
    let refused: serde_json::Value = serde_json::from_slice(&refused.payload).unwrap();
    assert_eq!(
        refused["refused_revision"].as_u64(),
        Some(bad_rev),
        "{refused}"
    );
    assert_eq!(refused["config_revision"].as_u64(), Some(rev), "{refused}");
    let reason = refused["refused_reason"].as_str().unwrap();
    assert!(
        reason.contains("rate_hz") && reason.contains("nope"),
        "{reason}"
    );
    agent
        .wait_status("refusal in the status file", Duration::from_secs(3), |s| {
            s["config"]["refused_revision"].as_u64() == Some(bad_rev)
        })
        .await;
    let bad_at = Timestamp::now().as_micros();
    tokio::time::sleep(Duration::from_secs(2)).await;
    agent.stop();

    let got = drain(&consumer, Duration::from_secs(1)).await;
    let s0: Vec<i64> = got["s0"].iter().map(|g| g.ts).collect();
    // 20 Hz within a second of the put: the first 50 ms gap comes by put + 1 s.
    let fast = s0
        .windows(2)
        .find(|w| w[0] >= put_at - 500_000 && w[1] - w[0] < 100_000)
        .expect("s0 never sped up");
    assert!(
        fast[1] <= put_at + 1_000_000,
        "s0 sped up {} ms after the put",
        (fast[1] - put_at) / 1000
    );
    // And still 20 Hz after the refused value.
    let after: Vec<&[i64]> = s0.windows(2).filter(|w| w[0] > bad_at).collect();
    assert!(
        after.len() >= 30 && after.iter().all(|w| w[1] - w[0] < 100_000),
        "{after:?}"
    );
    // s1 was disabled: nothing after the put (but a second for the change).
    assert!(got["s1"].iter().all(|g| g.ts < put_at + 1_000_000));
    for (sensor, readings) in &got {
        runs(sensor, readings);
    }
}

/// With exactly the permissions `fleetpipe device add` grants
/// (`security::perms::device_permissions`): publish `vehicle.<ID>.>` and the direct get of
/// its configuration key, subscribe `_INBOX_<ID>.>` and `$KV.fleetpipe_config.<ID>`.
/// Written as a user with those permissions in a server config;
/// `works_with_credentials_from_fleetpipe_device_add` below does the same with a `.creds`
/// file from `fleetpipe device add`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_with_device_permissions_and_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let id = "perm1";
    let conf = dir.path().join("server.conf");
    std::fs::write(
        &conf,
        format!(
            r#"authorization {{
  users = [
    {{ user: admin, password: admin }}
    {{ user: {id}, password: secret, permissions: {{
        publish: {{ allow: ["vehicle.{id}.>", "$JS.API.DIRECT.GET.KV_fleetpipe_config.$KV.fleetpipe_config.{id}"] }}
        subscribe: {{ allow: ["_INBOX_{id}.>", "$KV.fleetpipe_config.{id}"] }}
    }} }}
  ]
}}
"#
        ),
    )
    .unwrap();
    let port = free_port();
    let server = NatsServer::start_with(port, &["-c".to_string(), conf.display().to_string()]);
    let admin_url = format!("nats://admin:admin@127.0.0.1:{port}");
    let js = ensure(&admin_url, 1).await;
    let consumer = test_consumer(&js, id).await;
    let kv = js.get_key_value("fleetpipe_config").await.unwrap();
    let rev = kv
        .put(id, "[sensors.s0]\nrate_hz = 5.0\n".into())
        .await
        .unwrap();
    let url = format!("nats://{id}:secret@127.0.0.1:{}", server.port());
    let mut agent = Agent::start(dir.path(), &config(id, &url, dir.path(), 2, 2.0, ""));
    follows_its_configuration(&mut agent, &kv, id, rev, Duration::from_secs(10), &consumer).await;
    let _ = server;
}

/// The agent with nothing but what `fleetpipe device add` issues, against `fleetpipe up
/// --secure` (JWT accounts, TLS): it publishes, acks come to its own inbox, it reads and
/// follows its configuration key, and the server reports no permission violation.
/// Needs the `fleetpipe` binary next to the agent's (`cargo test --workspace` builds it;
/// alone: `cargo build -p fleetpipe` first; FLEETPIPE_BIN overrides its path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_with_credentials_from_fleetpipe_device_add() {
    let fleetpipe = std::env::var_os("FLEETPIPE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(BIN).with_file_name("fleetpipe"));
    assert!(
        fleetpipe.is_file(),
        "{} is missing: run `cargo build -p fleetpipe` first (cargo test --workspace builds it)",
        fleetpipe.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let url = format!("tls://127.0.0.1:{port}");
    std::fs::write(
        dir.path().join("fleetpipe.toml"),
        "[stream]\nmax_bytes = 268435456\n",
    )
    .unwrap();
    let cli = |args: &[&str]| {
        let mut c = Command::new(&fleetpipe);
        c.arg("--data-dir")
            .arg(&data)
            .arg("--config")
            .arg(dir.path().join("fleetpipe.toml"))
            .args(args)
            .env("FLEETPIPE_LOG", "warn");
        c
    };
    let up = cli(&[
        "up",
        "--secure",
        "--nats-port",
        &port.to_string(),
        "--http",
        "127.0.0.1:0",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("fleetpipe up --secure");
    struct Up(Child);
    impl Drop for Up {
        fn drop(&mut self) {
            let _ = Command::new("kill").arg(self.0.id().to_string()).status();
            let _ = self.0.wait();
        }
    }
    let _up = Up(up);
    let started = Instant::now();
    while !cli(&["--nats-url", &url, "state", "--json"])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "up --secure did not start"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let creds = dir.path().join("sec1.creds");
    let out = cli(&["device", "add", "sec1", "--out", creds.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ca = data.join("tls/ca.pem");

    // The operator's side, with fleetpipe's admin user.
    let admin = async_nats::ConnectOptions::new()
        .credentials_file(data.join("security/creds/admin.creds"))
        .await
        .unwrap()
        .add_root_certificates(ca.clone())
        .require_tls(true)
        .connect(url.as_str())
        .await
        .expect("admin connects");
    let js = jetstream::new(admin);
    let consumer = test_consumer(&js, "sec1").await;
    let kv = js.get_key_value("fleetpipe_config").await.unwrap();
    let rev = kv
        .put("sec1", "[sensors.s0]\nrate_hz = 5.0\n".into())
        .await
        .unwrap();

    let extra = format!(
        "credentials = \"{}\"\nca = \"{}\"",
        creds.display(),
        ca.display()
    );
    let mut agent = Agent::start(
        dir.path(),
        &config("sec1", &url, dir.path(), 2, 2.0, &extra),
    );
    follows_its_configuration(
        &mut agent,
        &kv,
        "sec1",
        rev,
        Duration::from_secs(15),
        &consumer,
    )
    .await;
}

/// The end of both permission tests: the agent applied configuration revision `rev` and
/// publishes (within `start`), follows a change to its key, stops, the server logged no
/// permission violation, and both sensors' readings arrived.
async fn follows_its_configuration(
    agent: &mut Agent,
    kv: &async_nats::jetstream::kv::Store,
    id: &str,
    rev: u64,
    start: Duration,
    consumer: &consumer::PullConsumer,
) {
    agent
        .wait_status("configured and publishing", start, |s| {
            s["config"]["revision"].as_u64() == Some(rev)
                && s["counters"]["readings_acknowledged"].as_u64() > Some(10)
        })
        .await;
    let rev2 = kv
        .put(id, "[sensors.s0]\nrate_hz = 10.0\n".into())
        .await
        .unwrap();
    agent
        .wait_status("a change followed", Duration::from_secs(3), |s| {
            s["config"]["revision"].as_u64() == Some(rev2)
        })
        .await;
    agent.stop();
    let log = agent.log();
    assert!(
        !log.to_lowercase().contains("permissions violation"),
        "{}",
        tail(&log)
    );
    assert_eq!(drain(consumer, Duration::from_secs(1)).await.len(), 2);
}
