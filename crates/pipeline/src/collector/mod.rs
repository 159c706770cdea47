//! Collectors: any number of identical workers, in any number of processes, sharing the
//! durable pull consumer on the telemetry stream (JetStream's form of a queue group).
//!
//! Inside one process the work is a two-stage pipeline:
//!
//! 1. **fetch** workers take whatever batch the consumer has ready (waiting at most
//!    `collector.batch_wait` for more), decode it in chunks, and at once hand the latest
//!    state to the process's coalescer (`coalesce.rs`, which puts each key at most once per
//!    `collector.state_window` through `latest.rs`) and publish the dead letters
//!    (`dead_letter.rs`), so the latest state never waits for the store;
//! 2. **writers** (`write.rs`) take decoded batches, merge every batch already waiting into
//!    one store transaction (group commit: under load, transactions grow instead of
//!    queueing), wait out store outages, isolate and dead-letter a message the store
//!    refuses, then acknowledge each batch whose publishes also succeeded, and negatively
//!    acknowledge the others, which come back; the store's idempotent writes make the
//!    second pass harmless.
//!
//! Between the stages a channel bounded by the memory decoding allocated: a slow store
//! holds the fetch workers back, and `collector.max_ack_pending` bounds what is in flight,
//! so memory stays flat under overload while the backlog waits in JetStream. Every message
//! in hand gets "in progress" acknowledgements (`inflight.rs`), so nothing is redelivered
//! while it waits; a stop hands back, negatively acknowledged, what was sent but not taken.
//!
//! **Architecture invariant:** only this module acknowledges telemetry messages, and only
//! after the durable write of everything they carry (rows, latest state, dead letters).

use std::ops::Range;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream::{self, consumer::PullConsumer, Message};
use fleetpipe_proto::payload::decode_into;
use fleetpipe_proto::{Limits, Name, Reject, SubjectTemplate, Timestamp};
use fleetpipe_store::{Record, Store};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod acks;
mod coalesce;
mod dead_letter;
mod inflight;
mod latest;
mod pull;
mod write;

pub use pull::BatchPuller;

use crate::config::Config;
use crate::stats::Stats;
use coalesce::Coalescer;
use dead_letter::DeadLetter;
use inflight::InFlight;
use latest::Latest;

/// Headers on every dead letter.
pub mod headers {
    /// Human-readable reasons, `; `-separated.
    pub const REASON: &str = "Fleetpipe-Reason";
    /// Stable reason codes, `,`-separated (`not_a_number`, `json`, …).
    pub const CODES: &str = "Fleetpipe-Codes";
    /// The subject the device published on.
    pub const SUBJECT: &str = "Fleetpipe-Subject";
    /// The telemetry stream sequence of the original message.
    pub const STREAM_SEQ: &str = "Fleetpipe-Stream-Seq";
    /// When the broker received the original message (RFC 3339).
    pub const RECEIVED: &str = "Fleetpipe-Received";
}

/// A decoded batch on its way from a fetch worker to a writer.
pub(crate) struct DecodedBatch {
    messages: Vec<Message>,
    /// Per message, the range of its readings in `records`.
    spans: Vec<Range<usize>>,
    records: Vec<Record>,
    dead_letters: u64,
    /// The latest-state and dead-letter publishes, started by the fetch worker: true when
    /// the broker stored them all (for the latest state: a put covering each key, see
    /// `coalesce.rs`).
    published: JoinHandle<bool>,
    /// This batch's share of [`MAX_QUEUED_KIB`], returned once it is written.
    queued: Option<OwnedSemaphorePermit>,
    /// Its registration for keepalives.
    inflight: u64,
}

/// Most memory, in KiB, that decoded readings may take in one process between the fetch
/// workers and the writers (an estimate of what decoding allocated, see
/// [`record_bytes`]). A fetch worker waits for room before handing over a batch, so a
/// store slower than the broker holds the fetch workers back and the backlog stays in
/// JetStream: memory is flat however large the backlog and however many readings a
/// message carries.
const MAX_QUEUED_KIB: usize = 24 * 1024;

/// A fetch worker hands over what it has decoded once it holds this much, so one pull of
/// large messages never sits decoded in memory all at once.
const CHUNK_BYTES: usize = MAX_QUEUED_KIB * 1024 / 8;

/// Most bytes of messages one pull asks for: with `max_payload_bytes` messages, a batch of
/// `batch_size` could otherwise be gigabytes.
const MAX_PULL_BYTES: usize = 16 * 1024 * 1024;

/// Shared by the workers of one process.
pub struct Collector {
    consumer: PullConsumer,
    js: jetstream::Context,
    store: Arc<dyn Store>,
    template: SubjectTemplate,
    limits: Limits,
    batch_size: usize,
    batch_wait: Duration,
    ack_wait: Duration,
    telemetry_stream: String,
    stats: Arc<Stats>,
    latest: Arc<Latest>,
    /// Puts `latest`'s updates, at most once per key per `collector.state_window`.
    state: Arc<Coalescer>,
    inflight: InFlight,
    /// Room for [`MAX_QUEUED_KIB`].
    queue_room: Arc<Semaphore>,
    /// Successful store writes so far: tells a store failing for everyone from one that
    /// refuses one message.
    store_writes: AtomicU64,
}

impl Collector {
    pub fn new(
        config: &Config,
        js: jetstream::Context,
        consumer: PullConsumer,
        store: Arc<dyn Store>,
        stats: Arc<Stats>,
    ) -> Result<Self> {
        let latest = Arc::new(Latest::new(js.clone(), store.series_index()));
        Ok(Collector {
            consumer,
            state: Arc::new(Coalescer::new(
                latest.clone(),
                config.collector.state_window,
            )),
            latest,
            js,
            store,
            template: config.template()?,
            limits: config.limits(),
            batch_size: config.collector.batch_size,
            batch_wait: config.collector.batch_wait,
            ack_wait: config.collector.ack_wait,
            telemetry_stream: config.stream.name.clone(),
            stats,
            inflight: InFlight::default(),
            queue_room: Arc::new(Semaphore::new(MAX_QUEUED_KIB)),
            store_writes: AtomicU64::new(0),
        })
    }

    /// Runs `workers` fetch workers and as many writers until `shutdown` is cancelled.
    /// Fetch workers finish the batch in hand and negatively acknowledge what the broker
    /// sent them meanwhile (so it comes back at once, to another collector); writers then
    /// write and acknowledge everything decoded, so a graceful stop leaves nothing
    /// half-done.
    ///
    /// Once per collector: at the end its latest-state coalescer is closed.
    pub async fn run(self: Arc<Self>, workers: usize, shutdown: CancellationToken) {
        // Unbounded in batches: `queue_room` bounds it in bytes, which is what costs
        // memory. A bound in batches would fill with small batches during one slow commit
        // and hold the fetch workers, and the latest state with them.
        let (tx, rx) = mpsc::unbounded_channel::<DecodedBatch>();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let mut tasks: Vec<JoinHandle<()>> = (0..workers)
            .map(|id| {
                let me = self.clone();
                let shutdown = shutdown.clone();
                let tx = tx.clone();
                tokio::spawn(async move { me.fetch(id, tx, shutdown).await })
            })
            .collect();
        drop(tx);
        tasks.extend((0..workers).map(|_| {
            let me = self.clone();
            let rx = rx.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { me.write(rx, shutdown).await })
        }));
        // The helpers stop once the writers are done, not at the signal: the keepalive
        // must cover the last commits, and the writers wait for the last state puts.
        let helpers = CancellationToken::new();
        let state = {
            let state = self.state.clone();
            let stop = helpers.clone();
            tokio::spawn(async move { state.run(stop).await })
        };
        let keepalive = {
            let me = self.clone();
            let client = self.js.client();
            let every = (self.ack_wait / 3).max(Duration::from_millis(100));
            let stale_after = write::WRITE_TIMEOUT + self.ack_wait;
            let stop = helpers.clone();
            tokio::spawn(async move {
                me.inflight
                    .keepalive(client, every, stale_after, stop)
                    .await
            })
        };
        let advisories = match crate::broker::max_deliveries_consumer(&self.js).await {
            Ok(consumer) => Some(tokio::spawn(dead_letter::max_deliveries_worker(
                self.js.clone(),
                consumer,
                self.telemetry_stream.clone(),
                self.stats.clone(),
                helpers.clone(),
            ))),
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow max-delivery advisories; undeliverable messages will wait in the stream");
                None
            }
        };
        for t in futures::future::join_all(tasks).await {
            if let Err(e) = t {
                tracing::error!(error = %e, "collector task panicked");
            }
        }
        helpers.cancel();
        let _ = state.await;
        let _ = keepalive.await;
        if let Some(a) = advisories {
            let _ = a.await;
        }
    }

    /// Stage 1: pull batches, decode them, start their publishes, hand them to a writer.
    async fn fetch(
        self: Arc<Self>,
        id: usize,
        tx: mpsc::UnboundedSender<DecodedBatch>,
        shutdown: CancellationToken,
    ) {
        tracing::debug!(worker = id, "collector worker started");
        let mut puller = BatchPuller::new(
            self.consumer.clone(),
            self.batch_size,
            self.batch_wait,
            self.stats.clone(),
        )
        .max_bytes(MAX_PULL_BYTES);
        'pull: while let Some(batch) = puller.next(&shutdown).await {
            Stats::add(&self.stats.messages, batch.len() as u64);
            self.inflight.progress();
            // Covers the messages not decoded yet while an earlier chunk waits for room.
            let pulled = self.inflight.register(replies(&batch));
            let mut rest = batch.into_iter().peekable();
            while rest.peek().is_some() {
                let (mut decoded, bytes) = self.decode(&mut rest);
                // Wait for room (the latest state is already on its way).
                let kib = (bytes / 1024).clamp(1, MAX_QUEUED_KIB);
                let Ok(room) = self
                    .queue_room
                    .clone()
                    .acquire_many_owned(u32::try_from(kib).unwrap_or(u32::MAX))
                    .await
                else {
                    break 'pull;
                };
                decoded.queued = Some(room);
                if tx.send(decoded).is_err() {
                    // The writers are gone (a panic): nothing is acknowledged, all of it
                    // comes back after the ack wait.
                    tracing::error!(worker = id, "collector writers stopped");
                    break 'pull;
                }
            }
            self.inflight.done(pulled);
        }
        puller.release().await;
        tracing::debug!(worker = id, "collector worker stopped");
    }

    /// Decodes messages from `messages` until they hold [`CHUNK_BYTES`] of readings or
    /// run out, and starts publishing their latest state and dead letters. Returns the
    /// batch and an estimate of the memory its readings take.
    fn decode(&self, messages: &mut impl Iterator<Item = Message>) -> (DecodedBatch, usize) {
        let mut taken = Vec::new();
        let mut spans = Vec::new();
        let mut records = Vec::new();
        let mut dead = Vec::new();
        let mut bytes = 0usize;
        let mut decoded = fleetpipe_proto::Decoded::default();
        for msg in messages.by_ref() {
            let start = records.len();
            if let Ok(info) = msg.info() {
                if info.delivered > 1 {
                    Stats::add(&self.stats.redelivered, 1);
                }
                let seq = info.stream_sequence;
                let received = Timestamp::from_offset_date_time(info.published);
                decoded.readings.clear();
                decoded.rejects.clear();
                decode_into(
                    &self.template,
                    msg.subject.as_str(),
                    &msg.payload,
                    received,
                    &self.limits,
                    &mut decoded,
                );
                for reading in decoded.readings.drain(..) {
                    let record = Record { seq, reading };
                    bytes += record_bytes(&record, records.get(start..).and_then(<[_]>::last));
                    records.push(record);
                }
                if !decoded.rejects.is_empty() {
                    dead.push(dead_letter(
                        &msg,
                        seq,
                        received,
                        info.delivered > 1,
                        &decoded.rejects,
                    ));
                }
            }
            // else: not a JetStream delivery (no reply subject): nothing to ack or store.
            spans.push(start..records.len());
            taken.push(msg);
            if bytes >= CHUNK_BYTES {
                break;
            }
        }
        let dead_letters = dead.len() as u64;
        let state = self.state.submit(self.latest.updates(&records));
        let inflight = self.inflight.register(replies(&taken));
        let (js, stats) = (self.js.clone(), self.stats.clone());
        let published = tokio::spawn(async move {
            let dlq = futures::future::join_all(dead.into_iter().map(|d| d.publish(js.clone())));
            let (state_ok, dlq) = tokio::join!(state.confirmed(), dlq);
            let ok = state_ok && dlq.iter().all(Result::is_ok);
            if !ok {
                Stats::add(&stats.nats_errors, 1);
            }
            ok
        });
        let batch = DecodedBatch {
            messages: taken,
            spans,
            records,
            dead_letters,
            published,
            queued: None,
            inflight,
        };
        (batch, bytes)
    }

    /// Stage 2: write every decoded batch that is waiting in one transaction, then
    /// acknowledge each batch (see `write.rs`).
    async fn write(
        self: Arc<Self>,
        rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<DecodedBatch>>>,
        shutdown: CancellationToken,
    ) {
        loop {
            let mut group = Vec::new();
            {
                let mut rx = rx.lock().await;
                let Some(first) = rx.recv().await else { return };
                group.push(first);
                // Group commit: everything waiting, which MAX_QUEUED_KIB bounds.
                while let Ok(more) = rx.try_recv() {
                    group.push(more);
                }
            }
            self.commit(group, &shutdown).await;
        }
    }
}

/// The reply subjects (for acks and keepalives) of `messages`.
fn replies(messages: &[Message]) -> Vec<async_nats::Subject> {
    messages.iter().filter_map(|m| m.reply.clone()).collect()
}

/// An estimate of the memory a decoded record holds: the struct and its strings, and its
/// names and tags unless it shares them with `previous`, the record before it of the same
/// message (the readings of one message share their device name, those of one line their
/// tags).
fn record_bytes(r: &Record, previous: Option<&Record>) -> usize {
    let reading = &r.reading;
    let previous = previous.map(|p| &p.reading);
    // A name the previous record holds too is counted there.
    let name_bytes = |name: &Name, theirs: Option<&Name>| {
        if theirs.is_some_and(|t| Name::ptr_eq(t, name)) {
            0
        } else {
            2 * std::mem::size_of::<usize>() + name.len()
        }
    };
    let mut n = std::mem::size_of::<Record>()
        + name_bytes(&reading.device, previous.map(|p| &p.device))
        + name_bytes(&reading.sensor, previous.map(|p| &p.sensor))
        + reading.unit.as_ref().map_or(0, String::capacity)
        + reading.quality.as_ref().map_or(0, String::capacity);
    let with_tags = previous.is_none_or(|p| !Arc::ptr_eq(&p.tags, &reading.tags));
    if with_tags {
        n += reading
            .tags
            .iter()
            .map(|(k, v)| std::mem::size_of::<(String, String)>() + k.capacity() + v.capacity())
            .sum::<usize>();
    }
    n
}

/// The dead letter of a message the decoder refused (wholly or in part).
fn dead_letter(
    msg: &Message,
    seq: u64,
    received: Timestamp,
    redelivered: bool,
    rejects: &[Reject],
) -> DeadLetter {
    DeadLetter {
        subject: msg.subject.to_string(),
        payload: msg.payload.clone(),
        seq,
        received,
        codes: rejects
            .iter()
            .map(|r| r.code.as_str().to_string())
            .collect(),
        reason: rejects
            .iter()
            .map(|r| r.message.as_str())
            .collect::<Vec<_>>()
            .join("; "),
        redelivered,
    }
}
