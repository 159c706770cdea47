//! Stage 2, the writers: group commit, then acknowledge.
//!
//! A writer takes every decoded batch waiting and writes their readings in one store
//! transaction. What happens when the write fails depends on why:
//!
//! * **the store is unavailable** (`StoreError::is_transient`, and the store does not answer
//!   a ping): the writer waits and tries again, for as long as it takes, while the
//!   keepalive (`inflight.rs`) keeps the messages from being redelivered. Nothing is
//!   negatively acknowledged, so an outage never spends a message's delivery count.
//! * **the store refuses the data** (a permanent error): the group is split in halves and
//!   each half written on its own, down to the single message the store refuses. That
//!   message is dead-lettered with the store's reason (code `store`) and acknowledged;
//!   every other message is stored and acknowledged. Writes are idempotent, so writing a
//!   half again after a partial failure is harmless.
//! * **a "transient" error keeps coming back while the store answers pings**: it may be
//!   data refused under a misleading error, or a store failing for everyone (out of
//!   space). The group is split the same way, but a single message is dead-lettered only
//!   if the store took other writes since it was tried; otherwise the writer keeps trying,
//!   so a store-wide failure never empties the stream into the dead-letter stream.
//!
//! Only after the readings are stored, and the latest state and dead letters of the batch
//! are confirmed by the broker, is a message acknowledged; a batch whose publishes failed
//! is negatively acknowledged and comes back.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use fleetpipe_store::{Record, StoreError};
use tokio_util::sync::CancellationToken;

use super::dead_letter::DeadLetter;
use super::{Collector, DecodedBatch};
use crate::stats::Stats;

/// How long a failed batch waits before the broker redelivers it.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Longest a store write may take before it counts as failed (and is tried again: writes
/// are idempotent, so one that still commits later is harmless). It bounds how long a
/// working collector can go without progress, see `inflight.rs`.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(300);

/// How long messages handed back at a stop wait before they are delivered again: longer
/// than a pull request stays open (`pull.rs`), so they go to another collector.
const STOP_DELAY: Duration = Duration::from_secs(2);

/// Attempts at a write that fails with a transient error while the store answers pings,
/// before the write is treated as refused and split.
const ATTEMPTS_WHILE_UP: u32 = 3;

/// Longest wait between two attempts while the store is down.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// One message of a group, and its readings in the group's concatenated records.
struct Unit {
    batch: usize,
    message: usize,
    records: Range<usize>,
}

/// How a write ended.
enum Failure {
    /// The store refuses these readings; retrying cannot help.
    Refused(StoreError),
    /// A "transient" error that keeps coming back while the store answers pings: either
    /// these readings are refused under a misleading error, or the store is failing for
    /// everyone (out of space). Splitting tells which.
    Suspect(StoreError),
    /// The process is stopping while the store is unavailable.
    Stopping,
}

impl Collector {
    /// Writes a group of batches and acknowledges, dead-letters or negatively
    /// acknowledges each of their messages.
    pub(super) async fn commit(&self, mut group: Vec<DecodedBatch>, shutdown: &CancellationToken) {
        // The first batch's records, without a copy; the others' after them.
        let mut records: Vec<Record> = group
            .first_mut()
            .map(|b| std::mem::take(&mut b.records))
            .unwrap_or_default();
        records.reserve(group.iter().map(|b| b.records.len()).sum());
        let mut units = Vec::new();
        for (b, batch) in group.iter_mut().enumerate() {
            let base = if b == 0 { 0 } else { records.len() };
            for (m, span) in batch.spans.iter().enumerate() {
                units.push(Unit {
                    batch: b,
                    message: m,
                    records: base + span.start..base + span.end,
                });
            }
            records.append(&mut batch.records);
        }
        // Per unit: why the store refused it, if it did.
        let refused = match self.store_isolating(&records, &units, shutdown).await {
            Ok(refused) => refused,
            Err(_) => {
                // Stopping while the store is unavailable: hand everything back, after the
                // open pull requests of this process have closed.
                for batch in group {
                    nak_all(&batch.messages, Some(STOP_DELAY)).await;
                    self.inflight.done(batch.inflight);
                }
                return;
            }
        };
        let mut refused_in: Vec<Vec<(usize, String)>> = vec![Vec::new(); group.len()];
        for (unit, why) in units.iter().zip(refused) {
            if let Some(why) = why {
                refused_in[unit.batch].push((unit.message, why));
            }
        }
        for (batch, refused) in group.into_iter().zip(refused_in) {
            self.finish(batch, refused).await;
        }
    }

    /// Acknowledges a stored batch, after its publishes and the dead letters of the
    /// messages the store refused.
    async fn finish(&self, batch: DecodedBatch, refused: Vec<(usize, String)>) {
        let mut published = batch.published.await.unwrap_or(false);
        let mut dead = 0;
        for (m, why) in &refused {
            let msg = &batch.messages[*m];
            let Ok(info) = msg.info() else { continue };
            tracing::warn!(subject = %msg.subject, reason = %why, "the store refused a message; dead-lettering it");
            let letter = DeadLetter {
                subject: msg.subject.to_string(),
                payload: msg.payload.clone(),
                seq: info.stream_sequence,
                received: fleetpipe_proto::Timestamp::from_offset_date_time(info.published),
                codes: vec!["store".into()],
                reason: format!("the store refused it: {why}"),
                redelivered: info.delivered > 1,
            };
            match letter.publish(self.js.clone()).await {
                Ok(()) => {
                    dead += 1;
                    Stats::add(&self.stats.store_refused, 1);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "dead letter failed; the batch will be redelivered");
                    published = false;
                }
            }
        }
        if !published {
            Stats::add(&self.stats.nats_errors, 1);
            nak_all(&batch.messages, Some(RETRY_DELAY)).await;
        } else {
            Stats::add(&self.stats.dead_letters, batch.dead_letters + dead);
            let acks = futures::future::join_all(batch.messages.iter().map(|m| m.ack())).await;
            self.inflight.progress();
            if acks.iter().any(Result::is_err) {
                // Stored; an unacknowledged message is redelivered and deduplicated.
                Stats::add(&self.stats.nats_errors, 1);
                tracing::warn!("some acknowledgements failed; those messages will be redelivered");
            }
        }
        self.inflight.done(batch.inflight);
    }

    /// Writes `records`, splitting around the messages the store refuses. Returns, per
    /// unit, the store's reason for refusing it.
    async fn store_isolating(
        &self,
        records: &[Record],
        units: &[Unit],
        shutdown: &CancellationToken,
    ) -> Result<Vec<Option<String>>, Failure> {
        let mut refused = vec![None; units.len()];
        // Parts to write, and how many attempts a suspect failure gets: the whole group
        // gets several, the halves of a suspect part one (the doubt is already there).
        let mut todo = vec![(0..units.len(), ATTEMPTS_WHILE_UP)];
        let writes_before = self.store_writes.load(Ordering::Relaxed);
        while let Some((part, patience)) = todo.pop() {
            let (first, last) = (&units[part.start], &units[part.end - 1]);
            let slice = &records[first.records.start..last.records.end];
            if slice.is_empty() {
                continue;
            }
            match self.store_retrying(slice, patience, shutdown).await {
                Ok(()) => {}
                Err(Failure::Refused(e)) if part.len() == 1 => {
                    refused[part.start] = Some(e.to_string());
                }
                // One message, and the store took other writes since this group began: it
                // is this message the store cannot take.
                Err(Failure::Suspect(e))
                    if part.len() == 1
                        && self.store_writes.load(Ordering::Relaxed) > writes_before =>
                {
                    refused[part.start] = Some(e.to_string());
                }
                // One message, and nothing at all was written meanwhile: the store is
                // failing for everyone; keep trying, patiently.
                Err(Failure::Suspect(_)) if part.len() == 1 => todo.push((part, ATTEMPTS_WHILE_UP)),
                Err(Failure::Refused(e) | Failure::Suspect(e)) => {
                    tracing::info!(error = %e, messages = part.len(), "the store refused a write; splitting it to find the message");
                    let mid = part.start + part.len() / 2;
                    todo.push((mid..part.end, 1));
                    todo.push((part.start..mid, 1));
                }
                Err(Failure::Stopping) => return Err(Failure::Stopping),
            }
        }
        Ok(refused)
    }

    /// Writes `records`, waiting out store outages (see the module docs).
    async fn store_retrying(
        &self,
        records: &[Record],
        patience: u32,
        shutdown: &CancellationToken,
    ) -> Result<(), Failure> {
        let mut backoff = Duration::from_millis(250);
        let mut attempts_while_up = 0;
        loop {
            let started = std::time::Instant::now();
            let written = tokio::time::timeout(WRITE_TIMEOUT, self.store.write_readings(records))
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::Task(format!(
                        "the write took longer than {} s",
                        WRITE_TIMEOUT.as_secs()
                    )))
                });
            self.stats.store_write.observe(started.elapsed());
            self.inflight.progress();
            let e = match written {
                Ok(new) => {
                    self.store_writes.fetch_add(1, Ordering::Relaxed);
                    let n = records.len() as u64;
                    Stats::add(&self.stats.readings_stored, new);
                    Stats::add(&self.stats.readings_duplicate, n - new.min(n));
                    Stats::add(&self.stats.batches, 1);
                    return Ok(());
                }
                Err(e) => e,
            };
            Stats::add(&self.stats.store_errors, 1);
            if !e.is_transient() {
                return Err(Failure::Refused(e));
            }
            if self.store.ping().await.is_ok() {
                attempts_while_up += 1;
                if attempts_while_up >= patience {
                    return Err(Failure::Suspect(e));
                }
            }
            tracing::warn!(error = %e, readings = records.len(), retry_in = ?backoff, "store write failed; retrying");
            tokio::select! {
                _ = shutdown.cancelled() => return Err(Failure::Stopping),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// Negatively acknowledges every message, to be redelivered after `delay` (at once when
/// `None`).
pub(super) async fn nak_all(batch: &[Message], delay: Option<Duration>) {
    let _ = futures::future::join_all(batch.iter().map(|m| m.ack_with(AckKind::Nak(delay)))).await;
}
