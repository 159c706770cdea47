//! A fleetpipe deployment for one test: nats-server, store, config, processes; with
//! [`Env::secure_sqlite`], a nats-server with JWT authentication and TLS, where every
//! command runs as its own least-privilege user.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use fleetpipe_pipeline::nats_server::{ManagedNats, ManagedOptions};
use fleetpipe_pipeline::security::{Secure, Service};
use fleetpipe_pipeline::Config;
use fleetpipe_store::{Range, Store};
use fleetpipe_testkit::{NatsServer, PgServer};

/// The environment's nats-server.
pub enum Nats {
    Plain(NatsServer),
    /// `fleetpipe up --secure`'s server, and the material it was made with.
    Secure {
        server: Box<ManagedNats>,
        secure: Box<Secure>,
    },
}

impl Nats {
    pub fn url(&self) -> String {
        match self {
            Nats::Plain(s) => s.url(),
            Nats::Secure { server, .. } => server.url(),
        }
    }
}

pub struct Env {
    pub nats: Nats,
    pub dir: tempfile::TempDir,
    pub store_url: String,
    _pg: Option<PgServer>,
}

/// Settings that make redelivery after a crash quick enough for a test; a 1 GiB stream,
/// as JetStream refuses one larger than three quarters of the free disk.
const TEST_CONFIG: &str = r#"
[stream]
max_bytes = 1073741824

[collector]
ack_wait = "2s"
batch_size = 500
max_payload_bytes = 4096
"#;

impl Env {
    pub fn sqlite() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store_url = format!("sqlite://{}", dir.path().join("fleetpipe.db").display());
        Self::with(dir, store_url, None)
    }

    /// `None` only when `FLEETPIPE_SKIP_PG=1` outside CI.
    pub fn postgres(db: &str) -> Option<Env> {
        let pg = PgServer::start_or_skip()?;
        let url = pg.create_database(db);
        Some(Self::with(tempfile::tempdir().unwrap(), url, Some(pg)))
    }

    fn with(dir: tempfile::TempDir, store_url: String, pg: Option<PgServer>) -> Env {
        std::fs::write(dir.path().join("fleetpipe.toml"), TEST_CONFIG).unwrap();
        Env {
            nats: Nats::Plain(NatsServer::start()),
            dir,
            store_url,
            _pg: pg,
        }
    }

    /// The embedded store behind a nats-server in secure mode (JWT accounts, TLS), as
    /// `fleetpipe up --secure` makes it: `init` and the test's own client run as the admin
    /// user, `collect` as the collector, `aggregate` as the aggregator, `serve` as the API
    /// (each with a config file of its own, `<user>.toml`).
    pub async fn secure_sqlite() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store_url = format!("sqlite://{}", dir.path().join("fleetpipe.db").display());
        let base = Config::from_toml(TEST_CONFIG).unwrap();
        let data = dir.path().join("data");
        let secure = Secure::init(&data, &base, &[]).unwrap();
        for service in Service::ALL {
            let config = secure.service_config(&base, service);
            std::fs::write(
                dir.path().join(format!("{}.toml", service.name())),
                toml::to_string(&config).unwrap(),
            )
            .unwrap();
        }
        let server = ManagedNats::start(
            &fleetpipe_testkit::nats_server_bin(),
            &data,
            ManagedOptions {
                secure: Some(&secure),
                ..ManagedOptions::loopback(fleetpipe_testkit::free_port())
            },
        )
        .await
        .unwrap();
        Env {
            nats: Nats::Secure {
                server: Box::new(server),
                secure: Box::new(secure),
            },
            dir,
            store_url,
            _pg: None,
        }
    }

    /// The PostgreSQL server of a `postgres` environment (to stop and restart it).
    pub fn pg(&self) -> Option<&PgServer> {
        self._pg.as_ref()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("fleetpipe.toml")
    }

    /// The config file `fleetpipe <args>` runs with: in a secure environment, its
    /// service's user.
    fn config_for(&self, args: &[&str]) -> PathBuf {
        match &self.nats {
            Nats::Plain(_) => self.config_path(),
            Nats::Secure { .. } => {
                let service = match args.first() {
                    Some(&"collect") => Service::Collector,
                    Some(&"aggregate") => Service::Aggregator,
                    Some(&"serve") => Service::Api,
                    _ => Service::Admin,
                };
                self.dir.path().join(format!("{}.toml", service.name()))
            }
        }
    }

    /// `fleetpipe <args>` wired to this environment.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_fleetpipe"));
        c.args(["--nats-url", &self.nats.url(), "--store", &self.store_url])
            .arg("--config")
            .arg(self.config_for(args))
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(args)
            .env("FLEETPIPE_LOG", "warn")
            .env_remove("FLEETPIPE_CONFIG");
        c
    }

    /// Starts a long-running subcommand; killed when the guard drops.
    pub fn spawn(&self, args: &[&str]) -> Proc {
        let child = self
            .cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Proc(Some(child))
    }

    /// Starts a long-running subcommand logging at `level` into the file `log`; killed when
    /// the guard drops.
    pub fn spawn_logged(&self, args: &[&str], level: &str, log: &std::path::Path) -> Proc {
        let file = std::fs::File::create(log).unwrap();
        let child = self
            .cmd(args)
            .env("FLEETPIPE_LOG", level)
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .unwrap();
        Proc(Some(child))
    }

    /// Runs a subcommand to completion and returns its stdout; panics on failure.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.cmd(args).output().unwrap();
        assert!(
            out.status.success(),
            "fleetpipe {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A JetStream context on this environment's server (as the admin user when secure).
    pub async fn js(&self) -> jetstream::Context {
        let client = match &self.nats {
            Nats::Plain(s) => async_nats::connect(s.url()).await.unwrap(),
            Nats::Secure { server, secure } => secure
                .connect_options(Service::Admin)
                .unwrap()
                .connect(server.url())
                .await
                .unwrap(),
        };
        jetstream::new(client)
    }

    pub async fn store(&self) -> Arc<dyn Store> {
        fleetpipe_store::open(&self.store_url).await.unwrap()
    }
}

pub struct Proc(Option<Child>);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The exit status, once the process has ended on its own.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns stdout.
    pub fn stop(&mut self) -> String {
        let Some(c) = self.0.take() else {
            return String::new();
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "process exited with {}", out.status);
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Publishes through JetStream, awaiting every ack (in windows, for speed).
pub async fn publish_all(js: &jetstream::Context, msgs: &[(String, String)]) {
    for chunk in msgs.chunks(1000) {
        let mut acks = Vec::with_capacity(chunk.len());
        for (subject, payload) in chunk {
            acks.push(
                js.publish(subject.clone(), Bytes::from(payload.clone()))
                    .await
                    .unwrap(),
            );
        }
        for ack in acks {
            ack.await.unwrap();
        }
    }
}

/// What the broker says of the collectors' durable consumer (pending, awaiting ack,
/// pull requests waiting…).
pub async fn collectors_consumer(js: &jetstream::Context) -> jetstream::consumer::Info {
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_stream("FLEETPIPE_TELEMETRY")
        .await
        .unwrap()
        .get_consumer("fleetpipe-collectors")
        .await
        .unwrap();
    consumer.info().await.unwrap().clone()
}

/// Waits until the store holds `want` readings (or the deadline passes) and returns the
/// count it saw last.
pub async fn wait_for_count(store: &dyn Store, want: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let n = store.count_readings().await.unwrap();
        if n >= want || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn all_time() -> Range {
    Range {
        from: fleetpipe_proto::Timestamp::from_micros(0),
        to: fleetpipe_proto::Timestamp::from_micros(i64::MAX / 2),
    }
}

/// The values stored per (device, sensor), in time order.
pub async fn stored_values(
    store: &dyn Store,
    series: impl IntoIterator<Item = (String, String)>,
) -> HashMap<(String, String), Vec<f64>> {
    let mut out = HashMap::new();
    for (d, s) in series {
        let points = store.history(&d, &s, all_time(), 1_000_000).await.unwrap();
        out.insert((d, s), points.into_iter().map(|p| p.value).collect());
    }
    out
}

/// Builds a C program against the official NATS C client (`libnats-dev`) in `dir`; returns
/// the executable.
pub fn build_c_client(dir: &std::path::Path, source: &str) -> PathBuf {
    let src = dir.join("publisher.c");
    let bin = dir.join("publisher");
    std::fs::write(&src, source).unwrap();
    let cc = Command::new("cc")
        .arg(&src)
        .arg("-o")
        .arg(&bin)
        .arg("-lnats")
        .output()
        .expect("cc is needed: apt-get install gcc");
    assert!(
        cc.status.success(),
        "cannot build the C publisher (apt-get install libnats-dev): {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    bin
}
