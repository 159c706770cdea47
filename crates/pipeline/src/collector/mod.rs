//! Collectors: any number of identical workers, in any number of processes, sharing the
//! durable pull consumer on the telemetry stream (JetStream's form of a queue group).
//!
//! Each worker takes a batch of messages, decodes it, writes the readings in one store
//! transaction, publishes the latest state and the dead letters, and only then acknowledges
//! the batch. When anything fails, the batch is negatively acknowledged and comes back;
//! the store's idempotent writes make the second pass harmless.
//!
//! **Architecture invariant:** only this module acknowledges telemetry messages, and only
//! after the durable write of everything they carry.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use async_nats::jetstream::{self, consumer::PullConsumer, AckKind, Message};
use async_nats::HeaderMap;
use bytes::Bytes;
use fleetpipe_proto::payload::decode_into;
use fleetpipe_proto::{Decoded, Limits, Reject, SubjectTemplate, Timestamp};
use fleetpipe_store::{Record, Store};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

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
        })
    }

    /// Runs `workers` workers until `shutdown` is cancelled. Each finishes the batch in hand
    /// before it stops, so a graceful stop leaves nothing half-done.
    pub async fn run(self: Arc<Self>, workers: usize, shutdown: CancellationToken) {
        let tasks: Vec<_> = (0..workers)
            .map(|id| {
                let me = self.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move { me.worker(id, shutdown).await })
            })
            .collect();
        for t in futures::future::join_all(tasks).await {
            if let Err(e) = t {
                tracing::error!(error = %e, "collector worker panicked");
            }
        }
    }

    async fn worker(&self, id: usize, shutdown: CancellationToken) {
        tracing::debug!(worker = id, "collector worker started");
        while !shutdown.is_cancelled() {
            let mut messages = match self
                .consumer
                .stream()
                .max_messages_per_batch(self.batch_size)
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await
            {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(worker = id, error = %e, "cannot pull from the telemetry stream; retrying");
                    Stats::add(&self.stats.nats_errors, 1);
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(RETRY_DELAY) => continue,
                    }
                }
            };
            let mut batch = Vec::with_capacity(self.batch_size);
            loop {
                let first = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    m = messages.next() => m,
                };
                match first {
                    Some(Ok(m)) => batch.push(m),
                    Some(Err(e)) => {
                        tracing::debug!(worker = id, error = %e, "pull stream error");
                        continue;
                    }
                    None => break,
                }
                let deadline = tokio::time::Instant::now() + self.batch_wait;
                while batch.len() < self.batch_size {
                    match tokio::time::timeout_at(deadline, messages.next()).await {
                        Ok(Some(Ok(m))) => batch.push(m),
                        Ok(Some(Err(e))) => tracing::debug!(error = %e, "pull stream error"),
                        Ok(None) | Err(_) => break,
                    }
                }
                self.process(&mut batch).await;
                batch.clear();
            }
        }
        tracing::debug!(worker = id, "collector worker stopped");
    }

    /// Decodes, stores and acknowledges one batch; on any failure negatively acknowledges
    /// it instead, so it is redelivered.
    async fn process(&self, batch: &mut [Message]) {
        Stats::add(&self.stats.messages, batch.len() as u64);
        let mut records = Vec::with_capacity(batch.len());
        let mut dead = Vec::new();
        let mut decoded = Decoded::default();
        for msg in batch.iter() {
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

        if !records.is_empty() {
            let started = std::time::Instant::now();
            let written = self.store.write_readings(&records).await;
            self.stats.store_write.observe(started.elapsed());
            match written {
                Ok(new) => {
                    Stats::add(&self.stats.readings_stored, new);
                    Stats::add(
                        &self.stats.readings_duplicate,
                        records.len() as u64 - new.min(records.len() as u64),
                    );
                    Stats::add(&self.stats.batches, 1);
                }
                Err(e) => {
                    tracing::warn!(error = %e, messages = batch.len(), "store write failed; batch will be redelivered");
                    Stats::add(&self.stats.store_errors, 1);
                    return nak_all(batch).await;
                }
            }
        }

        let dead_count = dead.len() as u64;
        let state = self.publish_state(&records);
        let dlq = futures::future::join_all(dead);
        let (state_ok, dlq_results) = tokio::join!(state, dlq);
        let dlq_ok = dlq_results.iter().all(Result::is_ok);
        if !state_ok || !dlq_ok {
            Stats::add(&self.stats.nats_errors, 1);
            return nak_all(batch).await;
        }
        Stats::add(&self.stats.dead_letters, dead_count);

        let acks = futures::future::join_all(batch.iter().map(|m| m.ack())).await;
        if acks.iter().any(Result::is_err) {
            // The data is stored; an unacknowledged message is redelivered and deduplicated.
            Stats::add(&self.stats.nats_errors, 1);
            tracing::warn!("some acknowledgements failed; those messages will be redelivered");
        }
    }

    /// Publishes the newest reading of each key in the batch to the state bucket, skipping
    /// any older than what this process already published. True when all were stored.
    async fn publish_state(&self, records: &[Record]) -> bool {
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
        let to_publish: Vec<&Record> = {
            let Ok(mut published) = self.published_state.lock() else {
                return false;
            };
            newest
                .into_values()
                .filter(|rec| {
                    let r = &rec.reading;
                    let mut h = DefaultHasher::new();
                    (r.device.as_str(), r.sensor.as_str()).hash(&mut h);
                    let ts = r.ts.as_micros();
                    match published.get_mut(&h.finish()) {
                        Some(last) if *last > ts => false,
                        Some(last) => {
                            *last = ts;
                            true
                        }
                        None => {
                            published.insert(h.finish(), ts);
                            true
                        }
                    }
                })
                .collect()
        };
        let puts = to_publish.into_iter().map(|rec| {
            let r = &rec.reading;
            let subject = format!(
                "$KV.{}.{}",
                names::STATE_BUCKET,
                state::key(&r.device, &r.sensor)
            );
            let body = serde_json::to_vec(&StateValue::from_reading(r)).unwrap_or_default();
            let js = &self.js;
            async move {
                match js.publish(subject, Bytes::from(body)).await {
                    Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            }
        });
        let results = futures::future::join_all(puts).await;
        let failed = results.iter().filter(|r| r.is_err()).count();
        if failed > 0 {
            tracing::warn!(
                failed,
                "latest-state updates failed; batch will be redelivered"
            );
            // Forget what we thought was published so the redelivery republishes it.
            if let Ok(mut published) = self.published_state.lock() {
                published.clear();
            }
        }
        failed == 0
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
