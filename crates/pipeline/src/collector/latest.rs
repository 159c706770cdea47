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
//! The process remembers, for each series, the newest `(ts, seq)` and the revision it was
//! stored at (24 bytes a series, in a vector indexed by the store's series index: no
//! strings and no hash table of its own), so the common case
//! costs one put and no read, and a redelivered older reading costs nothing. A key the
//! process has not seen is put with an expected revision of 0 ("no value yet"); when one
//! exists, that costs one read, once per key per process.

use std::sync::{Arc, Mutex};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, kv};
use async_nats::HeaderMap;
use bytes::Bytes;
use fleetpipe_proto::Reading;
use fleetpipe_store::hashing::PrehashedMap;
use fleetpipe_store::series_index::{BySlot, SeriesIndex, SeriesSlot};
use fleetpipe_store::Record;
use tokio::sync::OnceCell;

use super::acks::{Ack, AckMux, WRONG_LAST_SEQUENCE};
use crate::config::names;
use crate::state::{self, StateValue};

/// Rounds of read-compare-retry for one key before giving up (the batch is then
/// redelivered). Each round means another writer put a newer revision in between.
const MAX_ROUNDS: usize = 5;

/// The header that makes a put a compare-and-set: `expected` is the key's last revision,
/// 0 for "no value yet".
fn expectation(expected: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        "Nats-Expected-Last-Subject-Sequence",
        expected.to_string().as_str(),
    );
    headers
}

/// What this process knows of one key.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Known {
    ts: i64,
    seq: u64,
    revision: u64,
}

impl Known {
    /// Nothing known: no stored value has revision 0.
    const NONE: Known = Known {
        ts: 0,
        seq: 0,
        revision: 0,
    };
}

/// One put to make: the newest reading of one series in a batch. Its key and value are
/// built only when it is put: most updates are superseded by a newer one of the same
/// series in the coalescer first.
pub(crate) struct Update {
    /// The series in the store's series index.
    slot: SeriesSlot,
    /// The series, as a map key (a keyed hash of device, sensor, tags).
    pub(super) hash: u64,
    /// What orders two readings of a series: `(ts, seq)`, the larger is newer.
    ts: i64,
    seq: u64,
    reading: Reading,
}

impl Update {
    /// The state bucket's key.
    fn key(&self) -> String {
        let r = &self.reading;
        state::key(&r.device, &r.sensor, &r.tags)
    }

    /// The value to put.
    fn body(&self) -> Bytes {
        let mut value = StateValue::from_reading(&self.reading);
        value.seq = self.seq;
        Bytes::from(serde_json::to_vec(&value).unwrap_or_default())
    }

    /// True when `self` is a newer reading of its series than `other`.
    pub(super) fn is_newer_than(&self, other: &Update) -> bool {
        (self.ts, self.seq) > (other.ts, other.seq)
    }
}

/// Latest-state writer shared by a process's fetch workers.
pub(crate) struct Latest {
    js: jetstream::Context,
    bucket: OnceCell<kv::Store>,
    acks: OnceCell<AckMux>,
    /// The store's series index, which [`Latest::known`] is indexed by.
    index: Arc<SeriesIndex>,
    // A std mutex: a few lookups per batch, never held across an await.
    known: Mutex<BySlot<Known>>,
}

impl Latest {
    pub(crate) fn new(js: jetstream::Context, index: Arc<SeriesIndex>) -> Self {
        Latest {
            js,
            bucket: OnceCell::new(),
            acks: OnceCell::new(),
            index,
            known: Mutex::new(BySlot::new(Known::NONE)),
        }
    }

    /// The newest reading of each series in `records`, leaving out those older than what
    /// this process already stored.
    pub(crate) fn updates(&self, records: &[Record]) -> Vec<Update> {
        let mut newest: PrehashedMap<SeriesSlot, &Record> = PrehashedMap::default();
        for (rec, slot) in records.iter().zip(self.index.slots(records)) {
            let r = &rec.reading;
            newest
                .entry(slot)
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
            .filter(|(slot, rec)| match known.get(*slot) {
                Some(k) => (rec.reading.ts.as_micros(), rec.seq) > (k.ts, k.seq),
                None => true,
            })
            .map(|(slot, rec)| Update {
                slot,
                hash: slot.hash,
                ts: rec.reading.ts.as_micros(),
                seq: rec.seq,
                reading: rec.reading.clone(),
            })
            .collect()
    }

    /// Puts every update, each a compare-and-set (see the module docs). True when each one
    /// is stored or known to be older than the bucket's value.
    pub(crate) async fn publish(&self, updates: Vec<Update>) -> bool {
        self.put_all(&updates).await.into_iter().all(|ok| ok)
    }

    /// Puts every update, each a compare-and-set (see the module docs). Per update, true
    /// when it is stored or known to be older than the bucket's value.
    ///
    /// The puts go out together and their acknowledgements come back on one subscription
    /// (`acks.rs`); a conflict, rare, is resolved key by key.
    pub(crate) async fn put_all(&self, updates: &[Update]) -> Vec<bool> {
        let mut results = vec![true; updates.len()];
        let mut sent = Vec::with_capacity(updates.len());
        let mut messages = Vec::with_capacity(updates.len());
        for (i, u) in updates.iter().enumerate() {
            // Expect a revision only together with the knowledge that its value is older:
            // another batch of this process may have stored a newer reading meanwhile.
            let expected = match self.known(u.slot) {
                Some(k) if (k.ts, k.seq) >= (u.ts, u.seq) => continue,
                Some(k) => k.revision,
                None => 0,
            };
            messages.push((self.subject(u), expectation(expected), u.body()));
            sent.push(i);
        }
        if sent.is_empty() {
            return results;
        }
        let mux = match self.acks().await {
            Ok(mux) => mux,
            Err(e) => {
                tracing::warn!(error = %e, "latest-state update failed; the batch will be redelivered");
                return vec![false; updates.len()];
            }
        };
        let acks = mux.publish_all(messages).await;
        let mut conflicts = Vec::new();
        for (&i, ack) in sent.iter().zip(acks) {
            let u = &updates[i];
            match ack {
                Some(Ack::Stored(seq)) => self.remember(u.slot, u.ts, u.seq, seq),
                Some(Ack::Refused(WRONG_LAST_SEQUENCE, _)) => conflicts.push(i),
                Some(Ack::Refused(code, why)) => {
                    tracing::warn!(code, error = %why, key = %u.key(), "latest-state update refused; the batch will be redelivered");
                    results[i] = false;
                }
                None => {
                    tracing::warn!(key = %u.key(), "latest-state update not acknowledged; the batch will be redelivered");
                    results[i] = false;
                }
            }
        }
        for i in conflicts {
            let u = &updates[i];
            if let Err(e) = self.resolve_conflict(u).await {
                tracing::warn!(error = %e, key = %u.key(), "latest-state update failed; the batch will be redelivered");
                results[i] = false;
            }
        }
        results
    }

    fn subject(&self, u: &Update) -> String {
        format!("$KV.{}.{}", names::STATE_BUCKET, u.key())
    }

    async fn acks(&self) -> Result<&AckMux, String> {
        self.acks
            .get_or_try_init(|| AckMux::new(self.js.client()))
            .await
    }

    /// After a refused put: reads the current value, and puts ours again only if it is
    /// newer, until the put succeeds or the bucket holds something newer.
    async fn resolve_conflict(&self, u: &Update) -> Result<(), String> {
        let bucket = self.bucket().await?;
        for _ in 0..MAX_ROUNDS {
            let current = bucket.entry(u.key()).await.map_err(|e| e.to_string())?;
            let expected = match current {
                Some(entry) => {
                    if entry.operation == kv::Operation::Put {
                        if let Ok(v) = serde_json::from_slice::<StateValue>(&entry.value) {
                            if (v.ts, v.seq) >= (u.ts, u.seq) {
                                // The bucket already holds this reading or a newer one.
                                self.remember(u.slot, v.ts, v.seq, entry.revision);
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
                    self.remember(u.slot, u.ts, u.seq, ack.sequence);
                    return Ok(());
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
        Err(format!(
            "state key {} changed under {MAX_ROUNDS} attempts in a row",
            u.key()
        ))
    }

    async fn put(
        &self,
        u: &Update,
        expected: u64,
    ) -> Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError> {
        self.js
            .publish_with_headers(self.subject(u), expectation(expected), u.body())
            .await
    }

    /// What this process last stored or saw for the key.
    fn known(&self, slot: SeriesSlot) -> Option<Known> {
        self.known.lock().ok().and_then(|k| k.get(slot))
    }

    fn remember(&self, slot: SeriesSlot, ts: i64, seq: u64, revision: u64) {
        if let Ok(mut known) = self.known.lock() {
            // Acks of one batch can be processed out of order with another's: keep the
            // newest revision, which the broker gave the newest put.
            if known.get(slot).is_none_or(|k| revision >= k.revision) {
                known.set(slot, Known { ts, seq, revision });
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

#[cfg(test)]
mod tests {
    use super::*;
    use fleetpipe_proto::{Reading, Timestamp};
    use fleetpipe_testkit::NatsServer;
    use std::sync::Arc;

    fn record(device: &str, ts: i64, seq: u64, cpu: &str) -> Record {
        Record {
            seq,
            reading: Reading {
                device: device.into(),
                sensor: "cpu.usage".into(),
                value: ts as f64,
                ts: Timestamp::from_micros(ts),
                unit: None,
                quality: None,
                tags: vec![("cpu".to_string(), cpu.to_string())].into(),
            },
        }
    }

    async fn stored_ts(bucket: &kv::Store, key: &str) -> i64 {
        let v = bucket.get(key).await.unwrap().expect("a value");
        serde_json::from_slice::<StateValue>(&v).unwrap().ts
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_state_never_goes_back_in_time() {
        let server = NatsServer::start();
        let client = async_nats::connect(server.url()).await.unwrap();
        let broker = crate::broker::ensure(&client, &crate::Config::default())
            .await
            .unwrap();
        let key = state::key("d", "cpu.usage", &[("cpu".to_string(), "cpu0".to_string())]);
        // Two collector processes.
        let (a, b) = (
            Latest::new(broker.js.clone(), Arc::default()),
            Latest::new(broker.js.clone(), Arc::default()),
        );
        assert!(a.publish(a.updates(&[record("d", 2_000, 2, "cpu0")])).await);
        // B has never seen the key: its older reading must not overwrite A's.
        assert!(b.publish(b.updates(&[record("d", 1_000, 1, "cpu0")])).await);
        assert_eq!(stored_ts(&broker.state, &key).await, 2_000);
        // B's newer one does.
        assert!(b.publish(b.updates(&[record("d", 3_000, 3, "cpu0")])).await);
        assert_eq!(stored_ts(&broker.state, &key).await, 3_000);
        // A still believes its own revision is current: its put is refused, it reads the
        // newer value, and leaves it.
        assert!(a.publish(a.updates(&[record("d", 2_500, 4, "cpu0")])).await);
        assert_eq!(stored_ts(&broker.state, &key).await, 3_000);
        // A redelivery of what A already stored costs nothing.
        assert!(a.updates(&[record("d", 2_000, 2, "cpu0")]).is_empty());
        // Same timestamp: the later stream sequence wins.
        assert!(a.publish(a.updates(&[record("d", 3_000, 9, "cpu0")])).await);
        let v = broker.state.get(&key).await.unwrap().unwrap();
        assert_eq!(serde_json::from_slice::<StateValue>(&v).unwrap().seq, 9);

        // Batches whose publishes race, in one process and across two: for each of 50
        // series, the newest reading wins whatever the order the puts reach the broker.
        let mut tasks = Vec::new();
        let (a, b) = (Arc::new(a), Arc::new(b));
        for round in 0..4i64 {
            for latest in [&a, &b] {
                let latest = latest.clone();
                let records: Vec<Record> = (0..50)
                    .map(|i| {
                        let ts = 10_000 + (round * 7 + i) % 4 * 1_000;
                        record("r", ts, (round * 100 + i) as u64, &format!("cpu{i}"))
                    })
                    .collect();
                tasks.push(tokio::spawn(async move {
                    latest.publish(latest.updates(&records)).await
                }));
            }
        }
        for t in tasks {
            assert!(t.await.unwrap());
        }
        for i in 0..50 {
            let key = state::key("r", "cpu.usage", &[("cpu".to_string(), format!("cpu{i}"))]);
            let newest = (0..4)
                .map(|round| 10_000 + (round * 7 + i) % 4 * 1_000)
                .max();
            assert_eq!(Some(stored_ts(&broker.state, &key).await), newest, "cpu{i}");
        }
    }

    /// More puts in flight across batches than the client's in-flight-ack limit (5,000):
    /// each batch must still finish (sending everything before awaiting any ack would
    /// deadlock here).
    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_batches_beyond_the_ack_limit_finish() {
        let server = NatsServer::start();
        let client = async_nats::connect(server.url()).await.unwrap();
        let broker = crate::broker::ensure(&client, &crate::Config::default())
            .await
            .unwrap();
        let latest = Arc::new(Latest::new(broker.js.clone(), Arc::default()));
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let latest = latest.clone();
                tokio::spawn(async move {
                    let records: Vec<Record> = (0..1_500)
                        .map(|i| record(&format!("d{t}"), 1_000, i, &format!("cpu{i}")))
                        .collect();
                    latest.publish(latest.updates(&records)).await
                })
            })
            .collect();
        let all = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            futures::future::join_all(tasks),
        )
        .await
        .expect("state puts stalled");
        assert!(all.into_iter().all(|r| r.unwrap()));
        let mut stream = broker
            .js
            .get_stream(format!("KV_{}", names::STATE_BUCKET))
            .await
            .unwrap();
        assert_eq!(stream.info().await.unwrap().state.messages, 12_000);
    }
}
