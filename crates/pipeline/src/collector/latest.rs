//! Latest-state updates that never go back in time.
//!
//! The state bucket keeps one value per series. Several fetch workers, and several
//! collector processes, may hold readings of the same series at once (a redelivery racing
//! a newer message, two batches whose publishes interleave), so "last put wins" could
//! leave an older reading in the bucket. Every put is therefore a compare-and-set: it
//! carries `Nats-Expected-Last-Subject-Sequence`, the revision the collector believes is
//! current, and the broker refuses it when another put came in between. On a refusal the
//! collector reads the current value and retries only if its own reading is newer, by
//! `(ts, stream sequence)`. The broker serialises puts per key, so whichever order they
//! arrive in, the bucket ends with the newest reading.
//!
//! A per-process map remembers, for each series, the newest `(ts, seq)` and the revision
//! it was stored at (a key hash, not the strings: 32 bytes a series), so the common case
//! costs one put and no read, and a redelivered older reading costs nothing. A key the
//! process has not seen is put with an expected revision of 0 ("no value yet"); when one
//! exists, that costs one read, once per key per process.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, kv};
use async_nats::HeaderMap;
use bytes::Bytes;
use fleetpipe_store::Record;
use tokio::sync::OnceCell;

use crate::config::names;
use crate::state::{self, StateValue};

/// Rounds of read-compare-retry for one key before giving up (the batch is then
/// redelivered). Each round means another writer put a newer revision in between.
const MAX_ROUNDS: usize = 5;

/// What this process knows of one key.
#[derive(Debug, Clone, Copy)]
struct Known {
    ts: i64,
    seq: u64,
    revision: u64,
}

/// One put to make.
pub(crate) struct Update {
    hash: u64,
    key: String,
    ts: i64,
    seq: u64,
    body: Bytes,
}

/// Latest-state writer shared by a process's fetch workers.
pub(crate) struct Latest {
    js: jetstream::Context,
    bucket: OnceCell<kv::Store>,
    // A std mutex: a few map operations per batch, never held across an await.
    known: Mutex<HashMap<u64, Known>>,
    /// Randomly keyed, so a device cannot pick names that collide with another's key.
    hasher: RandomState,
}

impl Latest {
    pub(crate) fn new(js: jetstream::Context) -> Self {
        Latest {
            js,
            bucket: OnceCell::new(),
            known: Mutex::new(HashMap::new()),
            hasher: RandomState::new(),
        }
    }

    /// The newest reading of each series in `records`, leaving out those older than what
    /// this process already stored.
    pub(crate) fn updates(&self, records: &[Record]) -> Vec<Update> {
        let mut newest: HashMap<u64, &Record> = HashMap::new();
        for rec in records {
            let r = &rec.reading;
            let hash = self.hasher.hash_one((&r.device, &r.sensor, &r.tags));
            newest
                .entry(hash)
                .and_modify(|cur| {
                    if (r.ts, rec.seq) >= (cur.reading.ts, cur.seq) {
                        *cur = rec;
                    }
                })
                .or_insert(rec);
        }
        let Ok(known) = self.known.lock() else {
            return Vec::new();
        };
        newest
            .into_iter()
            .filter(|(hash, rec)| match known.get(hash) {
                Some(k) => (rec.reading.ts.as_micros(), rec.seq) > (k.ts, k.seq),
                None => true,
            })
            .map(|(hash, rec)| {
                let r = &rec.reading;
                let mut value = StateValue::from_reading(r);
                value.seq = rec.seq;
                Update {
                    hash,
                    key: state::key(&r.device, &r.sensor, &r.tags),
                    ts: r.ts.as_micros(),
                    seq: rec.seq,
                    body: Bytes::from(serde_json::to_vec(&value).unwrap_or_default()),
                }
            })
            .collect()
    }

    /// Puts every update, each a compare-and-set (see the module docs). True when each one
    /// is stored or known to be older than the bucket's value.
    pub(crate) async fn publish(&self, updates: Vec<Update>) -> bool {
        if updates.is_empty() {
            return true;
        }
        // Pipelined: every put is sent before any acknowledgement is awaited.
        let mut pending = Vec::with_capacity(updates.len());
        for u in updates {
            let expected = self.expected(u.hash);
            match self.put(&u, expected).await {
                Ok(ack) => pending.push((u, ack)),
                Err(e) => {
                    tracing::warn!(error = %e, "latest-state update failed; the batch will be redelivered");
                    return false;
                }
            }
        }
        let mut ok = true;
        for (u, ack) in pending {
            let outcome = match ack.await {
                Ok(ack) => {
                    self.remember(u.hash, u.ts, u.seq, ack.sequence);
                    Ok(())
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    self.resolve_conflict(&u).await
                }
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = outcome {
                tracing::warn!(error = %e, key = %u.key, "latest-state update failed; the batch will be redelivered");
                ok = false;
            }
        }
        ok
    }

    /// After a refused put: reads the current value, and puts ours again only if it is
    /// newer, until the put succeeds or the bucket holds something newer.
    async fn resolve_conflict(&self, u: &Update) -> Result<(), String> {
        let bucket = self.bucket().await?;
        for _ in 0..MAX_ROUNDS {
            let current = bucket
                .entry(u.key.as_str())
                .await
                .map_err(|e| e.to_string())?;
            let expected = match current {
                Some(entry) => {
                    if entry.operation == kv::Operation::Put {
                        if let Ok(v) = serde_json::from_slice::<StateValue>(&entry.value) {
                            if (v.ts, v.seq) >= (u.ts, u.seq) {
                                // The bucket already holds this reading or a newer one.
                                self.remember(u.hash, v.ts, v.seq, entry.revision);
                                return Ok(());
                            }
                        }
                    }
                    entry.revision
                }
                None => 0,
            };
            let ack = self.put(u, expected).await.map_err(|e| e.to_string())?;
            match ack.await {
                Ok(ack) => {
                    self.remember(u.hash, u.ts, u.seq, ack.sequence);
                    return Ok(());
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
        Err(format!(
            "state key {} changed under {MAX_ROUNDS} attempts in a row",
            u.key
        ))
    }

    async fn put(
        &self,
        u: &Update,
        expected: u64,
    ) -> Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            expected.to_string().as_str(),
        );
        let subject = format!("$KV.{}.{}", names::STATE_BUCKET, u.key);
        self.js
            .publish_with_headers(subject, headers, u.body.clone())
            .await
    }

    /// The revision this process last stored for the key, or 0: "no value yet".
    fn expected(&self, hash: u64) -> u64 {
        self.known
            .lock()
            .ok()
            .and_then(|k| k.get(&hash).map(|k| k.revision))
            .unwrap_or(0)
    }

    fn remember(&self, hash: u64, ts: i64, seq: u64, revision: u64) {
        if let Ok(mut known) = self.known.lock() {
            let k = known.entry(hash).or_insert(Known { ts, seq, revision });
            // Acks of one batch can be processed out of order with another's: keep the
            // newest revision, which the broker gave the newest put.
            if revision >= k.revision {
                *k = Known { ts, seq, revision };
            }
        }
    }

    async fn bucket(&self) -> Result<&kv::Store, String> {
        self.bucket
            .get_or_try_init(|| self.js.get_key_value(names::STATE_BUCKET))
            .await
            .map_err(|e| e.to_string())
    }
}
