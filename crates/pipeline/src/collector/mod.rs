//! Collectors: any number of identical workers, in any number of processes, sharing the
//! durable pull consumer on the telemetry stream (JetStream's form of a queue group).
//!
//! Inside one process the work is a two-stage pipeline:
//!
//! 1. **fetch** workers take whatever batch the consumer has ready (waiting at most
//!    `collector.batch_wait` for more), decode it, and at once publish the latest state and
//!    the dead letters, so the latest state never waits for the store;
//! 2. **writers** take decoded batches, merge every batch already waiting into one store
//!    transaction (group commit: under load, transactions grow instead of queueing), then
//!    acknowledge each batch whose publishes also succeeded, and negatively acknowledge the
//!    others, which come back; the store's idempotent writes make the second pass harmless.
//!
//! Between the stages a bounded channel: a slow store holds the fetch workers back, and
//! `collector.max_ack_pending` bounds what is in flight, so memory stays flat under overload
//! while the backlog waits in JetStream.
//!
//! **Architecture invariant:** only this module acknowledges telemetry messages, and only
//! after the durable write of everything they carry (rows, latest state, dead letters).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream::{self, consumer::PullConsumer, AckKind, Message};
use async_nats::HeaderMap;
use bytes::Bytes;
use fleetpipe_proto::payload::decode_into;
use fleetpipe_proto::{Limits, Reject, SubjectTemplate, Timestamp};
use fleetpipe_store::{Record, Store};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

mod pull;

pub use pull::BatchPuller;

use crate::config::{names, Config};
use crate::state::{self, StateValue};
use crate::stats::Stats;

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

/// How long a failed batch waits before the broker redelivers it.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// A decoded batch on its way from a fetch worker to a writer.
struct DecodedBatch {
    messages: Vec<Message>,
    records: Vec<Record>,
    dead_letters: u64,
    /// The latest-state and dead-letter publishes, started by the fetch worker: true when
    /// the broker stored them all.
    published: JoinHandle<bool>,
    /// This batch's share of [`MAX_QUEUED_READINGS`], returned once it is written.
    queued: Option<OwnedSemaphorePermit>,
}

/// Most decoded readings held in one process between the fetch workers and the writers
/// (about 150 bytes each). A fetch worker waits for room before handing over a batch, so
/// a store slower than the broker holds the fetch workers back and the backlog stays in
/// JetStream: memory is flat however large the backlog and however many readings a
/// message carries.
const MAX_QUEUED_READINGS: usize = 200_000;

/// Shared by the workers of one process.
pub struct Collector {
    consumer: PullConsumer,
    js: jetstream::Context,
    store: Arc<dyn Store>,
    template: SubjectTemplate,
    limits: Limits,
    batch_size: usize,
    batch_wait: Duration,
    stats: Arc<Stats>,
    /// Hash of state key → timestamp last published by this process, so an older reading
    /// (a redelivery, or an earlier message in a later batch) never overwrites a newer state.
    /// A std mutex: held for a few hash-map operations per batch, never across an await.
    published_state: Mutex<HashMap<u64, i64>>,
    /// Randomly keyed, so a device cannot pick a name that collides with another's key.
    state_keys: RandomState,
    /// Room for [`MAX_QUEUED_READINGS`].
    queue_room: Arc<Semaphore>,
}

impl Collector {
    pub fn new(
        config: &Config,
        js: jetstream::Context,
        consumer: PullConsumer,
        store: Arc<dyn Store>,
        stats: Arc<Stats>,
    ) -> Result<Self> {
        Ok(Collector {
            consumer,
            js,
            store,
            template: config.template()?,
            limits: config.limits(),
            batch_size: config.collector.batch_size,
            batch_wait: config.collector.batch_wait,
            stats,
            published_state: Mutex::new(HashMap::new()),
            state_keys: RandomState::new(),
            queue_room: Arc::new(Semaphore::new(MAX_QUEUED_READINGS)),
        })
    }

    /// Runs `workers` fetch workers and as many writers until `shutdown` is cancelled.
    /// Fetch workers finish the batch in hand; writers then write and acknowledge
    /// everything decoded, so a graceful stop leaves nothing half-done.
    pub async fn run(self: Arc<Self>, workers: usize, shutdown: CancellationToken) {
        // Unbounded in batches: `queue_room` bounds it in readings, which is what costs
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
            tokio::spawn(async move { me.write(rx).await })
        }));
        for t in futures::future::join_all(tasks).await {
            if let Err(e) = t {
                tracing::error!(error = %e, "collector task panicked");
            }
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
        );
        while let Some(batch) = puller.next(&shutdown).await {
            let mut decoded = self.decode(batch);
            // Wait for room (the latest state is already on its way).
            let wanted = decoded.records.len().clamp(1, MAX_QUEUED_READINGS);
            let Ok(room) = self
                .queue_room
                .clone()
                .acquire_many_owned(u32::try_from(wanted).unwrap_or(u32::MAX))
                .await
            else {
                return;
            };
            decoded.queued = Some(room);
            if tx.send(decoded).is_err() {
                // The writers are gone (a panic): nothing is acknowledged, all of it
                // comes back after the ack wait.
                tracing::error!(worker = id, "collector writers stopped");
                return;
            }
        }
        tracing::debug!(worker = id, "collector worker stopped");
    }

    /// Decodes a batch and starts publishing its latest state and dead letters.
    fn decode(self: &Arc<Self>, messages: Vec<Message>) -> DecodedBatch {
        Stats::add(&self.stats.messages, messages.len() as u64);
        let mut records = Vec::with_capacity(messages.len());
        let mut dead = Vec::new();
        let mut decoded = fleetpipe_proto::Decoded::default();
        for msg in messages.iter() {
            let Ok(info) = msg.info() else {
                // Not a JetStream delivery (no reply subject): nothing to ack, nothing to store.
                continue;
            };
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
            records.extend(
                decoded
                    .readings
                    .drain(..)
                    .map(|reading| Record { seq, reading }),
            );
            if !decoded.rejects.is_empty() {
                dead.push(self.dead_letter(msg, seq, received, &decoded.rejects));
            }
        }
        let dead_letters = dead.len() as u64;
        let state = self.state_updates(&records);
        let me = self.clone();
        let published = tokio::spawn(async move {
            let (state_ok, dlq) =
                tokio::join!(me.publish_state(state), futures::future::join_all(dead));
            let ok = state_ok && dlq.iter().all(Result::is_ok);
            if !ok {
                Stats::add(&me.stats.nats_errors, 1);
            }
            ok
        });
        DecodedBatch {
            messages,
            records,
            dead_letters,
            published,
            queued: None,
        }
    }

    /// Stage 2: write every decoded batch that is waiting in one transaction, then
    /// acknowledge (or, on any failure, negatively acknowledge) each batch.
    async fn write(
        self: Arc<Self>,
        rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<DecodedBatch>>>,
    ) {
        loop {
            let mut group = Vec::new();
            {
                let mut rx = rx.lock().await;
                let Some(first) = rx.recv().await else { return };
                let mut records = first.records.len();
                group.push(first);
                // Group commit: everything waiting, which MAX_QUEUED_READINGS bounds.
                while records < MAX_QUEUED_READINGS {
                    match rx.try_recv() {
                        Ok(more) => {
                            records += more.records.len();
                            group.push(more);
                        }
                        Err(_) => break,
                    }
                }
            }
            self.commit(group).await;
        }
    }

    async fn commit(&self, mut group: Vec<DecodedBatch>) {
        let mut records = std::mem::take(&mut group[0].records);
        for more in &mut group[1..] {
            records.append(&mut more.records);
        }
        let records = &records;
        let stored = if records.is_empty() {
            true
        } else {
            let started = std::time::Instant::now();
            let written = self.store.write_readings(records).await;
            self.stats.store_write.observe(started.elapsed());
            match written {
                Ok(new) => {
                    Stats::add(&self.stats.readings_stored, new);
                    Stats::add(
                        &self.stats.readings_duplicate,
                        records.len() as u64 - new.min(records.len() as u64),
                    );
                    Stats::add(&self.stats.batches, 1);
                    true
                }
                Err(e) => {
                    tracing::warn!(error = %e, readings = records.len(), "store write failed; the messages will be redelivered");
                    Stats::add(&self.stats.store_errors, 1);
                    false
                }
            }
        };
        for decoded in group {
            let published = decoded.published.await.unwrap_or(false);
            if !stored || !published {
                if !published {
                    // Forget what we thought was published so the redelivery republishes it.
                    if let Ok(mut p) = self.published_state.lock() {
                        p.clear();
                    }
                }
                nak_all(&decoded.messages).await;
                continue;
            }
            Stats::add(&self.stats.dead_letters, decoded.dead_letters);
            let acks = futures::future::join_all(decoded.messages.iter().map(|m| m.ack())).await;
            if acks.iter().any(Result::is_err) {
                // The data is stored; an unacknowledged message is redelivered and deduplicated.
                Stats::add(&self.stats.nats_errors, 1);
                tracing::warn!("some acknowledgements failed; those messages will be redelivered");
            }
        }
    }

    /// The newest reading of each key in `records`, leaving out any older than what this
    /// process already published, as (subject, body) pairs for the state bucket.
    fn state_updates(&self, records: &[Record]) -> Vec<(String, Bytes)> {
        let mut newest: HashMap<(&str, &str), &Record> = HashMap::new();
        for rec in records {
            let r = &rec.reading;
            newest
                .entry((r.device.as_str(), r.sensor.as_str()))
                .and_modify(|cur| {
                    if r.ts >= cur.reading.ts {
                        *cur = rec;
                    }
                })
                .or_insert(rec);
        }
        let Ok(mut published) = self.published_state.lock() else {
            return Vec::new();
        };
        newest
            .into_values()
            .filter(|rec| {
                let r = &rec.reading;
                let key = self
                    .state_keys
                    .hash_one((r.device.as_str(), r.sensor.as_str()));
                let ts = r.ts.as_micros();
                match published.get_mut(&key) {
                    Some(last) if *last > ts => false,
                    Some(last) => {
                        *last = ts;
                        true
                    }
                    None => {
                        published.insert(key, ts);
                        true
                    }
                }
            })
            .map(|rec| {
                let r = &rec.reading;
                let subject = format!(
                    "$KV.{}.{}",
                    names::STATE_BUCKET,
                    state::key(&r.device, &r.sensor)
                );
                let body = serde_json::to_vec(&StateValue::from_reading(r)).unwrap_or_default();
                (subject, Bytes::from(body))
            })
            .collect()
    }

    /// Puts `updates` into the state bucket. True when the broker stored them all.
    ///
    /// All but the last go out as plain publishes, without asking for an acknowledgement;
    /// the last is a JetStream publish whose acknowledgement is awaited. They travel in
    /// order on one connection and the bucket's stream stores them in that order, so the
    /// last one's acknowledgement means the broker has processed the others: one round
    /// trip per batch instead of one per key, and no acknowledgement messages for the
    /// broker to send. A put the broker refuses alone (a message over its size limit)
    /// cannot happen here: state values are a few hundred bytes. Puts written into a
    /// connection that then broke are lost without an error, so a reconnect while the
    /// batch is in flight counts as a failure: the batch is redelivered and republished.
    async fn publish_state(&self, mut updates: Vec<(String, Bytes)>) -> bool {
        let Some((fence_subject, fence_body)) = updates.pop() else {
            return true;
        };
        let client = self.js.client();
        let connects = || client.statistics().connects.load(Ordering::Relaxed);
        let connected = connects();
        for (subject, body) in updates {
            if let Err(e) = client.publish(subject, body).await {
                tracing::warn!(error = %e, "latest-state update failed; the batch will be redelivered");
                return false;
            }
        }
        let fenced = match self.js.publish(fence_subject, fence_body).await {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let fenced = fenced.and_then(|()| {
            if connects() == connected {
                Ok(())
            } else {
                Err("the connection to NATS was re-established during the batch".into())
            }
        });
        match fenced {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "latest-state update failed; the batch will be redelivered");
                false
            }
        }
    }

    /// Publishes the original message to the dead-letter stream with the reasons in
    /// headers. The message id makes a redelivered bad message one dead letter, not two.
    fn dead_letter(
        &self,
        msg: &Message,
        seq: u64,
        received: Timestamp,
        rejects: &[Reject],
    ) -> impl std::future::Future<Output = Result<(), String>> + Send + 'static {
        let codes: Vec<&str> = rejects.iter().map(|r| r.code.as_str()).collect();
        let reason: String = rejects
            .iter()
            .map(|r| r.message.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        let mut h = HeaderMap::new();
        h.insert(headers::REASON, header_safe(&reason).as_str());
        h.insert(headers::CODES, codes.join(",").as_str());
        h.insert(headers::SUBJECT, header_safe(msg.subject.as_str()).as_str());
        h.insert(headers::STREAM_SEQ, seq.to_string().as_str());
        h.insert(headers::RECEIVED, received.to_rfc3339().as_str());
        // Sequence and receive time: the same message redelivered gets the same id.
        h.insert(
            "Nats-Msg-Id",
            format!("dlq-{seq}-{}", received.as_micros()).as_str(),
        );
        tracing::debug!(subject = %msg.subject, %reason, "dead letter");
        let subject = format!("{}.{}", names::DLQ_SUBJECT_PREFIX, codes[0]);
        let payload = msg.payload.clone();
        let js = self.js.clone();
        async move {
            let ack = js
                .publish_with_headers(subject, h, payload)
                .await
                .map_err(|e| e.to_string())?;
            ack.await.map(|_| ()).map_err(|e| e.to_string())
        }
    }
}

/// Header values cannot hold line breaks; keep them bounded too.
fn header_safe(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1024)
        .collect();
    out.truncate(out.trim_end().len());
    out
}

async fn nak_all(batch: &[Message]) {
    let _ = futures::future::join_all(
        batch
            .iter()
            .map(|m| m.ack_with(AckKind::Nak(Some(RETRY_DELAY)))),
    )
    .await;
}
