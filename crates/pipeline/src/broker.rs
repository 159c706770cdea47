//! The JetStream objects fleetpipe needs, created or updated idempotently at start.
//!
//! * the telemetry stream (file storage, retention, de-duplication window);
//! * the dead-letter stream `FLEETPIPE_DLQ` on `fleetpipe.dlq.<reason>.<stream seq>`;
//! * the latest-state KV bucket `fleetpipe_state` (key `<device>.<sensor>`);
//! * the lease KV bucket `fleetpipe_leases` (the aggregator's single-writer lease);
//! * the API's token KV bucket `fleetpipe_api_tokens` (hashed bearer tokens);
//! * the device configuration KV bucket `fleetpipe_config` (key = device id; direct gets
//!   allowed, which is how a device reads its own key);
//! * the collectors' durable pull consumer, and the stream `FLEETPIPE_ADVISORIES` that
//!   keeps its max-delivery advisories for the collectors to dead-letter those messages.

use std::time::Duration;

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, consumer, kv, stream};

use crate::config::{names, Config, NatsConfig, Retention};

/// The authentication, TLS and inbox settings of `nats`, as connect options. Secrets are
/// read from their files here and go nowhere but into the options.
pub async fn client_options(nats: &NatsConfig) -> Result<async_nats::ConnectOptions> {
    let mut options = if !nats.credentials.is_empty() {
        async_nats::ConnectOptions::with_credentials_file(&nats.credentials)
            .await
            .with_context(|| format!("cannot read credentials {}", nats.credentials))?
    } else {
        async_nats::ConnectOptions::new()
    };
    if !nats.nkey_seed_file.is_empty() {
        let seed = std::fs::read_to_string(&nats.nkey_seed_file)
            .with_context(|| format!("cannot read the nkey seed {}", nats.nkey_seed_file))?;
        let seed = seed.trim();
        // Checked here so a bad file fails with its name rather than at the handshake.
        nkeys::KeyPair::from_seed(seed).map_err(|_| {
            anyhow::anyhow!(
                "{} does not hold an nkey seed (a line starting with SU)",
                nats.nkey_seed_file
            )
        })?;
        options = options.nkey(seed.to_string());
    }
    if !nats.user.is_empty() {
        let password = match &nats.password {
            Some(p) => p.expose().to_string(),
            None => std::fs::read_to_string(&nats.password_file)
                .with_context(|| format!("cannot read the password file {}", nats.password_file))?
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
        };
        options = options.user_and_password(nats.user.clone(), password);
    }
    let tls = &nats.tls;
    if !tls.ca.is_empty() {
        options = options.add_root_certificates(tls.ca.clone().into());
    }
    if !tls.cert.is_empty() {
        options = options.add_client_certificate(tls.cert.clone().into(), tls.key.clone().into());
    }
    if tls.require {
        options = options.require_tls(true);
    }
    if !nats.inbox_prefix.is_empty() {
        options = options.custom_inbox_prefix(&nats.inbox_prefix);
    }
    Ok(options)
}

/// Connects to NATS with reconnect-forever and the credentials and TLS settings the config
/// names (see [`client_options`]).
pub async fn connect(url: &str, config: &Config, name: &str) -> Result<async_nats::Client> {
    let options = client_options(&config.nats)
        .await?
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => tracing::warn!("nats disconnected"),
                async_nats::Event::Connected => tracing::info!("nats connected"),
                // Permission violations among them: a user without a subject it needs.
                async_nats::Event::ServerError(e) => {
                    tracing::warn!(error = %e, "nats server error")
                }
                other => tracing::debug!(event = %other, "nats event"),
            }
        });
    let servers: Vec<&str> = url.split(',').map(str::trim).collect();
    let client = tokio::time::timeout(Duration::from_secs(10), options.connect(servers))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "cannot reach NATS at {url} within 10 s: is nats-server running? \
                 (`fleetpipe up` starts one when no --nats-url is given)"
            )
        })?
        .with_context(|| format!("cannot connect to NATS at {url}"))?;
    Ok(client)
}

/// Handles on the broker objects, after [`ensure`].
pub struct Broker {
    pub js: jetstream::Context,
    pub telemetry: stream::Stream,
    pub state: kv::Store,
    pub leases: kv::Store,
    /// The API's bearer tokens (see `fleetpipe_api::auth::tokens`).
    pub tokens: kv::Store,
    /// Device configurations (see `fleetpipe_device::live`).
    pub device_config: kv::Store,
    pub consumer: consumer::PullConsumer,
}

fn telemetry_config(config: &Config) -> Result<stream::Config> {
    let s = &config.stream;
    Ok(stream::Config {
        name: s.name.clone(),
        description: Some("fleetpipe telemetry from devices".into()),
        subjects: config.capture_subjects()?,
        retention: match s.retention {
            Retention::Interest => stream::RetentionPolicy::Interest,
            Retention::Limits => stream::RetentionPolicy::Limits,
        },
        // Refuse new messages when full rather than drop old unprocessed ones: publishers
        // that use acks keep their data and retry, so nothing accepted is lost.
        discard: stream::DiscardPolicy::New,
        max_age: s.max_age,
        max_bytes: s.max_bytes,
        duplicate_window: s.duplicate_window,
        storage: stream::StorageType::File,
        num_replicas: s.replicas,
        ..Default::default()
    })
}

/// The collectors' durable pull consumer as `ensure` creates it.
pub fn consumer_config(config: &Config) -> consumer::pull::Config {
    let c = &config.collector;
    consumer::pull::Config {
        durable_name: Some(c.durable.clone()),
        description: Some("fleetpipe collectors".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: c.ack_wait,
        // Bad input is dead-lettered by the collectors, and they wait out store outages
        // without spending deliveries: a message delivered this often crashed or stalled
        // collectors every time. The broker then stops delivering it and announces it; the
        // collectors dead-letter it (see `max_deliveries_consumer`), so it is not lost.
        max_deliver: c.max_deliver,
        max_ack_pending: c.max_ack_pending,
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    }
}

/// The subject of JetStream's advisories for messages the collectors' consumer gave up on.
fn max_deliveries_subject(config: &Config) -> String {
    format!(
        "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}",
        config.stream.name, config.collector.durable
    )
}

/// The stream that keeps max-delivery advisories (core NATS messages, lost while nobody
/// listens) until a collector has dead-lettered the message each one names.
async fn ensure_advisories(js: &jetstream::Context, config: &Config) -> Result<()> {
    js.create_or_update_stream(stream::Config {
        name: names::ADVISORY_STREAM.into(),
        description: Some(
            "fleetpipe: advisories of telemetry messages to dead-letter after max deliveries"
                .into(),
        ),
        subjects: vec![max_deliveries_subject(config)],
        retention: stream::RetentionPolicy::WorkQueue,
        max_age: Duration::from_secs(30 * 24 * 3600),
        max_bytes: 64 * 1024 * 1024,
        storage: stream::StorageType::File,
        num_replicas: config.stream.replicas,
        ..Default::default()
    })
    .await
    .context("cannot create or update the advisory stream")?;
    let stream = js.get_stream(names::ADVISORY_STREAM).await?;
    ensure_consumer(
        &stream,
        consumer::pull::Config {
            durable_name: Some(names::ADVISORY_CONSUMER.into()),
            description: Some("fleetpipe collectors: max-delivery advisories".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            ..Default::default()
        },
    )
    .await?;
    Ok(())
}

/// The durable consumer of the advisory stream, which [`ensure`] created.
pub async fn max_deliveries_consumer(js: &jetstream::Context) -> Result<consumer::PullConsumer> {
    js.get_stream(names::ADVISORY_STREAM)
        .await?
        .get_consumer(names::ADVISORY_CONSUMER)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open consumer {}: {e}", names::ADVISORY_CONSUMER))
}

/// Creates or updates every object fleetpipe needs. Safe to run from every process at
/// every start.
pub async fn ensure(client: &async_nats::Client, config: &Config) -> Result<Broker> {
    let js = jetstream::new(client.clone());
    let telemetry_cfg = telemetry_config(config)?;
    js.create_or_update_stream(telemetry_cfg.clone())
        .await
        .with_context(|| {
            format!(
                "cannot create or update stream {} capturing {:?} (is JetStream enabled on the server? \
                 does another stream already capture these subjects?)",
                telemetry_cfg.name, telemetry_cfg.subjects
            )
        })?;
    let telemetry = js.get_stream(&telemetry_cfg.name).await?;

    js.create_or_update_stream(stream::Config {
        name: names::DLQ_STREAM.into(),
        description: Some(
            "fleetpipe dead letters: input that could not be stored, with the reason in headers"
                .into(),
        ),
        subjects: vec![format!("{}.>", names::DLQ_SUBJECT_PREFIX)],
        retention: stream::RetentionPolicy::Limits,
        max_age: Duration::from_secs(30 * 24 * 3600),
        max_bytes: 1024 * 1024 * 1024,
        duplicate_window: Duration::from_secs(120),
        storage: stream::StorageType::File,
        num_replicas: config.stream.replicas,
        ..Default::default()
    })
    .await
    .context("cannot create or update the dead-letter stream")?;

    let state = ensure_bucket(
        &js,
        config,
        kv::Config {
            bucket: names::STATE_BUCKET.into(),
            description: "fleetpipe latest state: <device>.<sensor> -> last reading".into(),
            history: 1,
            ..Default::default()
        },
        "latest-state KV bucket",
    )
    .await?;

    let leases = ensure_bucket(
        &js,
        config,
        kv::Config {
            bucket: names::LEASE_BUCKET.into(),
            description: "fleetpipe single-writer leases".into(),
            history: 1,
            max_age: config.aggregator.lease_ttl,
            ..Default::default()
        },
        "lease KV bucket",
    )
    .await?;

    let tokens = ensure_bucket(
        &js,
        config,
        kv::Config {
            bucket: names::TOKEN_BUCKET.into(),
            description: "fleetpipe API tokens: <id> -> name, role, sha256 of the secret".into(),
            history: 1,
            ..Default::default()
        },
        "API token KV bucket",
    )
    .await?;

    let device_config = ensure_bucket(
        &js,
        config,
        kv::Config {
            bucket: names::CONFIG_BUCKET.into(),
            description: "fleetpipe device configurations: <device> -> live settings (TOML)".into(),
            // A few revisions, to see what changed; devices read the newest by direct get
            // (the client sets allow_direct on KV buckets).
            history: 5,
            max_value_size: 64 * 1024,
            ..Default::default()
        },
        "device configuration KV bucket",
    )
    .await?;

    ensure_advisories(&js, config).await?;
    let consumer = ensure_consumer(&telemetry, consumer_config(config)).await?;
    Ok(Broker {
        js,
        telemetry,
        state,
        leases,
        tokens,
        device_config,
        consumer,
    })
}

/// Creates or updates a KV bucket: `bucket` with file storage and the stream's replicas;
/// `what` names it in the error.
async fn ensure_bucket(
    js: &jetstream::Context,
    config: &Config,
    bucket: kv::Config,
    what: &str,
) -> Result<kv::Store> {
    js.create_or_update_key_value(kv::Config {
        storage: stream::StorageType::File,
        num_replicas: config.stream.replicas,
        ..bucket
    })
    .await
    .with_context(|| format!("cannot create or update the {what}"))
}

/// Opens a KV bucket [`ensure`] made; `hint` says how to make it.
async fn open_bucket(js: &jetstream::Context, name: &str, hint: &str) -> Result<kv::Store> {
    js.get_key_value(name)
        .await
        .with_context(|| format!("cannot open KV bucket {name}: {hint}"))
}

/// Opens the handles on the objects [`ensure`] made, creating or changing nothing: what a
/// least-privilege service user can do (stream and consumer info only).
pub async fn open(client: &async_nats::Client, config: &Config) -> Result<Broker> {
    let js = jetstream::new(client.clone());
    let hint = "run `fleetpipe init` (with an admin user) first";
    let telemetry = js
        .get_stream(&config.stream.name)
        .await
        .with_context(|| format!("cannot open stream {}: {hint}", config.stream.name))?;
    let state = open_bucket(&js, names::STATE_BUCKET, hint).await?;
    let leases = open_bucket(&js, names::LEASE_BUCKET, hint).await?;
    let tokens = open_bucket(&js, names::TOKEN_BUCKET, hint).await?;
    let device_config = open_bucket(&js, names::CONFIG_BUCKET, hint).await?;
    let consumer = telemetry
        .get_consumer(&config.collector.durable)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot open consumer {}: {e}; {hint}",
                config.collector.durable
            )
        })?;
    Ok(Broker {
        js,
        telemetry,
        state,
        leases,
        tokens,
        device_config,
        consumer,
    })
}

/// [`ensure`] when `nats.ensure` is on (the default), else [`open`].
pub async fn ensure_or_open(client: &async_nats::Client, config: &Config) -> Result<Broker> {
    if config.nats.ensure {
        ensure(client, config).await
    } else {
        open(client, config).await
    }
}

async fn ensure_consumer(
    stream: &stream::Stream,
    cfg: consumer::pull::Config,
) -> Result<consumer::PullConsumer> {
    let name = cfg.durable_name.clone().unwrap_or_default();
    match stream.create_consumer(cfg.clone()).await {
        Ok(c) => Ok(c),
        // An existing consumer with other settings: bring it up to date.
        Err(_) => stream
            .update_consumer(cfg)
            .await
            .with_context(|| format!("cannot create or update consumer {name}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetpipe_testkit::NatsServer;

    #[tokio::test]
    async fn ensure_is_idempotent_and_updates_settings() {
        let server = NatsServer::start();
        let client = async_nats::connect(server.url()).await.unwrap();
        let mut config = Config::default();
        ensure(&client, &config).await.unwrap();
        ensure(&client, &config).await.unwrap();
        config.collector.max_ack_pending = 1234;
        config.stream.duplicate_window = Duration::from_secs(60);
        let mut broker = ensure(&client, &config).await.unwrap();
        let info = broker.consumer.info().await.unwrap();
        assert_eq!(info.config.max_ack_pending, 1234);
        let sinfo = broker.telemetry.info().await.unwrap();
        assert_eq!(sinfo.config.duplicate_window, Duration::from_secs(60));
        assert_eq!(sinfo.config.subjects, vec!["vehicle.>".to_string()]);
    }
}
