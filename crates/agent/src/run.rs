//! Wires the agent: sensors → batcher → spool (buffer, publisher) → NATS, the live
//! configuration, the status file; stops in that order on SIGTERM or SIGINT.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetpipe_device::live::status_subject;
use fleetpipe_device::publish::batch::{Batcher, Sample, MAX_BATCH_READINGS};
use fleetpipe_device::publish::buffer::Buffer;
use fleetpipe_device::publish::spool::{Message, Spool, SpoolConfig, SpoolStats};
use fleetpipe_device::publish::{context, Publisher};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::link::{self, LinkStats};
use crate::live::{Live, LiveState};
use crate::sensors::{self, SensorStats};
use crate::status::Sources;

/// How long a stop waits for outstanding acknowledgements.
const DRAIN: Duration = Duration::from_secs(2);

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> Result<(), String> {
    let cfg = Arc::new(cfg);
    let buffer = Buffer::open(&cfg.buffer.dir, cfg.buffer.max_bytes).map_err(|e| {
        format!(
            "cannot open the buffer in {}: {e}",
            cfg.buffer.dir.display()
        )
    })?;
    tracing::info!(
        dir = %cfg.buffer.dir.display(),
        pending = buffer.pending(),
        dropped = buffer.dropped().messages,
        "buffer open"
    );
    let link_stats = Arc::new(LinkStats::default());
    let (client, link) = link::connect(&cfg, link_stats.clone()).await?;

    let (stop_tx, stop) = watch::channel(false);
    let spool_stats = Arc::new(SpoolStats::default());
    let sensor_stats = Arc::new(SensorStats::default());
    let live_state = Arc::new(Mutex::new(LiveState::default()));

    // Spool: the one owner of the buffer and the publisher.
    let js = context(client.clone(), cfg.publish.window, cfg.publish.ack_timeout);
    let spool = Spool::new(
        buffer,
        Publisher::new(js, cfg.publish.window),
        SpoolConfig {
            id_prefix: cfg.device.clone(),
            sync_interval: cfg.buffer.sync_interval,
            publish_timeout: cfg.publish.ack_timeout,
            duplicate_window: cfg.publish.duplicate_window,
            ..SpoolConfig::default()
        },
        link.clone(),
        spool_stats.clone(),
    );
    let (msg_tx, msg_rx) = mpsc::channel::<Message>(256);
    let spool_task = tokio::spawn(spool.run(msg_rx, watch::channel(false).1, DRAIN));

    // Batcher.
    let tags: Vec<(String, String)> = cfg.tags.clone().into_iter().collect();
    let batcher = Batcher::new(cfg.template(), &cfg.device, tags.clone())
        .map_err(|e| format!("subject template: {e}"))?;
    let (sample_tx, sample_rx) = mpsc::channel::<Sample>(4096);
    let batch_task = tokio::spawn(batch(
        batcher,
        sample_rx,
        msg_tx,
        cfg.publish.batch_interval,
    ));

    // Sensors, each with its settings channel.
    let mut senders = Vec::new();
    let mut sensor_tasks = Vec::new();
    for s in &cfg.sensors {
        let (tx, rx) = watch::channel(s.effective(None));
        senders.push(tx);
        sensor_tasks.push(tokio::spawn(sensors::run(
            Arc::new(s.clone()),
            rx,
            sample_tx.clone(),
            sensor_stats.clone(),
            stop.clone(),
        )));
    }
    drop(sample_tx);

    // Live configuration.
    let tag_refs: Vec<(&str, &str)> = tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let status_subject = status_subject(&cfg.template(), &cfg.device, &tag_refs)
        .map_err(|e| format!("subject template: {e}"))?;
    let mut live = Live {
        cfg: cfg.clone(),
        client: client.clone(),
        link: link.clone(),
        sensors: senders,
        state: live_state.clone(),
        status_subject,
    };
    live.apply_cached();
    let live_task = cfg
        .live_config
        .then(|| tokio::spawn(live.run(stop.clone())));

    // Status file.
    let sources = Sources {
        device: cfg.device.clone(),
        max_bytes: cfg.buffer.max_bytes,
        link: link_stats,
        spool: spool_stats.clone(),
        sensors: sensor_stats,
        live: live_state,
    };
    let status_path = cfg.status_path();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tracing::info!(device = %cfg.device, sensors = cfg.sensors.len(), "agent started");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                spool_stats.link_up.store(*link.borrow(), Ordering::Relaxed);
                sources.write(&status_path);
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    tracing::info!("stopping: sensors, then the buffer, then the link");
    stop_tx.send_replace(true);
    for t in sensor_tasks {
        let _ = t.await;
    }
    // The batcher flushes and closes the spool's input; the spool syncs and drains.
    let _ = batch_task.await;
    let _ = spool_task.await;
    if let Some(t) = live_task {
        let _ = t.await;
    }
    spool_stats.link_up.store(*link.borrow(), Ordering::Relaxed);
    sources.write(&status_path);
    let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
    tracing::info!("agent stopped");
    Ok(())
}

/// Gathers samples for `interval` and hands them to the spool as messages; flushes and
/// returns when the sensors are gone.
async fn batch(
    mut batcher: Batcher,
    mut input: mpsc::Receiver<Sample>,
    out: mpsc::Sender<Message>,
    interval: Duration,
) {
    let mut pending: Vec<Sample> = Vec::new();
    let mut messages = Vec::new();
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut open = true;
    while open {
        tokio::select! {
            s = input.recv() => match s {
                Some(s) => {
                    pending.push(s);
                    // Bounded: a full batch (or no batching) goes at once.
                    if !interval.is_zero() && pending.len() < MAX_BATCH_READINGS {
                        continue;
                    }
                }
                None => open = false,
            },
            _ = tick.tick() => {}
        }
        if pending.is_empty() {
            continue;
        }
        for p in batcher.encode(&pending, &mut messages) {
            tracing::warn!(problem = %p, "cannot encode a reading");
        }
        pending.clear();
        for m in messages.drain(..) {
            if out.send(m).await.is_err() {
                return;
            }
        }
    }
}
