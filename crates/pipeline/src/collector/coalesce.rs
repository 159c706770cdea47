//! At most one latest-state put per key per window (`collector.state_window`).
//!
//! Every state put is a compare-and-set the broker must check (`latest.rs`), and at full
//! rate that check costs nats-server more CPU than the store costs the collector. A series
//! updated several times a window needs only its newest value put, once. So the fetch
//! workers of a process hand their updates to one [`Coalescer`]: a map from key to the
//! newest update not yet put, with the batches waiting for it. One task, [`Coalescer::run`],
//! puts every key of the map at most once a window, through the compare-and-set path, and
//! then tells each waiting batch.
//!
//! A batch is confirmed once every one of its keys is covered by a put the broker
//! confirmed: its own value, or a newer value of the same key (or the bucket already held a
//! newer one). Only then may the writers acknowledge it; if any put covering it fails, it
//! is negatively acknowledged and comes back, as without coalescing.
//!
//! The first update after a quiet window is put at once. A flush does not wait for the
//! previous one's acknowledgements (that would add a round trip to the latency), but a key
//! has one put on its way at a time: its next update waits for it to land, so the next put
//! carries the revision it produced instead of being refused. Memory: the map holds only
//! keys with an update not yet put (at most one entry per series), the keys on their way
//! are at most one per series, and the batches waiting are those the collector holds
//! anyway.
//!
//! A window of 0 turns coalescing off: each batch puts its own updates (the behaviour
//! before the window existed).

use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetpipe_store::hashing::{PrehashedMap, PrehashedSet};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::latest::{Latest, Update};

/// Puts the latest state of a process's batches, coalesced per key and window.
pub(crate) struct Coalescer {
    latest: Arc<Latest>,
    window: Duration,
    // A std mutex: a few map operations per batch and one swap per flush, never held
    // across an await.
    dirty: Mutex<Dirty>,
    /// Wakes the flush task when the map gets an update.
    wake: Notify,
}

/// The keys with an update not put yet.
#[derive(Default)]
struct Dirty {
    keys: PrehashedMap<u64, Pending>,
    /// Keys with a put on its way (their new updates wait in `keys` until it lands).
    flying: PrehashedSet<u64>,
    /// The flush task has stopped: nothing submitted now would ever be put.
    closed: bool,
}

/// The newest update of one key, and the batches it covers.
struct Pending {
    update: Update,
    waiters: Vec<Arc<Waiter>>,
}

/// One batch waiting for the puts covering its keys.
struct Waiter {
    /// Keys of the batch not confirmed yet.
    left: AtomicUsize,
    failed: AtomicBool,
    // A std mutex: taken once, by whoever confirms the last key.
    done: Mutex<Option<oneshot::Sender<bool>>>,
}

impl Waiter {
    fn key_done(&self, ok: bool) {
        if !ok {
            self.failed.store(true, Ordering::Relaxed);
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let done = self.done.lock().ok().and_then(|mut d| d.take());
            if let Some(done) = done {
                let _ = done.send(!self.failed.load(Ordering::Relaxed));
            }
        }
    }
}

/// What a batch waits on for its latest state.
pub(crate) enum Confirmation {
    /// Known already: nothing to put, or the coalescer has stopped.
    Now(bool),
    /// No coalescing: the batch puts its own updates.
    Direct(Arc<Latest>, Vec<Update>),
    /// Told by the flush task; a dropped sender (the task ended) means failure.
    Coalesced(oneshot::Receiver<bool>),
}

impl Confirmation {
    /// True once every update of the batch is covered by a put the broker confirmed.
    pub(crate) async fn confirmed(self) -> bool {
        match self {
            Confirmation::Now(ok) => ok,
            Confirmation::Direct(latest, updates) => latest.publish(updates).await,
            Confirmation::Coalesced(rx) => rx.await.unwrap_or(false),
        }
    }
}

impl Coalescer {
    /// A coalescer putting through `latest`; a `window` of 0 puts each batch on its own.
    pub(crate) fn new(latest: Arc<Latest>, window: Duration) -> Self {
        Coalescer {
            latest,
            window,
            dirty: Mutex::new(Dirty::default()),
            wake: Notify::new(),
        }
    }

    /// Hands over the updates of one batch (from [`Latest::updates`]: one per key).
    pub(crate) fn submit(&self, updates: Vec<Update>) -> Confirmation {
        if updates.is_empty() {
            return Confirmation::Now(true);
        }
        if self.window.is_zero() {
            return Confirmation::Direct(self.latest.clone(), updates);
        }
        let (done, rx) = oneshot::channel();
        let waiter = Arc::new(Waiter {
            left: AtomicUsize::new(updates.len()),
            failed: AtomicBool::new(false),
            done: Mutex::new(Some(done)),
        });
        {
            let Ok(mut dirty) = self.dirty.lock() else {
                return Confirmation::Now(false);
            };
            if dirty.closed {
                return Confirmation::Now(false);
            }
            for update in updates {
                match dirty.keys.entry(update.hash) {
                    Entry::Occupied(mut e) => {
                        let pending = e.get_mut();
                        if update.is_newer_than(&pending.update) {
                            pending.update = update;
                        }
                        pending.waiters.push(waiter.clone());
                    }
                    Entry::Vacant(e) => {
                        e.insert(Pending {
                            update,
                            waiters: vec![waiter.clone()],
                        });
                    }
                }
            }
        }
        self.wake.notify_one();
        Confirmation::Coalesced(rx)
    }

    /// The flush task: every window at most, puts each waiting key that has no put on its
    /// way, without waiting for the previous flush's acknowledgements; at `stop`, waits for
    /// the puts on their way and puts what is left. Stop it only after every batch was
    /// submitted (the collector stops it after its writers); anything submitted afterwards
    /// fails.
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) {
        if self.window.is_zero() {
            return;
        }
        // Whatever way this ends (a panic included), batches still waiting fail rather
        // than wait forever.
        let _close = CloseOnDrop(&self);
        // Dropped before `_close`: aborted flushes fail their batches too.
        let mut flights = JoinSet::new();
        let mut last: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = stop.cancelled() => break,
            }
            if let Some(last) = last {
                tokio::select! {
                    _ = tokio::time::sleep_until(last + self.window) => {}
                    _ = stop.cancelled() => break,
                }
            }
            while flights.try_join_next().is_some() {}
            let keys = self.take_ready();
            if keys.is_empty() {
                continue; // all of them are on their way; their landing wakes us
            }
            last = Some(Instant::now());
            let me = self.clone();
            flights.spawn(async move { me.flush(keys).await });
        }
        while flights.join_next().await.is_some() {}
        let rest = self.take(true);
        self.flush(rest).await;
    }

    /// Takes the waiting keys that have no put on its way, and marks them on their way.
    /// One put per key at a time: a second would carry the revision the first replaces,
    /// and be refused.
    fn take_ready(&self) -> Vec<Pending> {
        let Ok(mut dirty) = self.dirty.lock() else {
            return Vec::new();
        };
        let Dirty { keys, flying, .. } = &mut *dirty;
        let ready: Vec<Pending> = if flying.is_empty() {
            keys.drain().map(|(_, p)| p).collect()
        } else {
            let hashes: Vec<u64> = keys
                .keys()
                .filter(|h| !flying.contains(*h))
                .copied()
                .collect();
            hashes.iter().filter_map(|h| keys.remove(h)).collect()
        };
        flying.extend(ready.iter().map(|p| p.update.hash));
        ready
    }

    /// Takes every waiting key; with `close`, refuses what comes after.
    fn take(&self, close: bool) -> Vec<Pending> {
        let Ok(mut dirty) = self.dirty.lock() else {
            return Vec::new();
        };
        dirty.closed |= close;
        dirty.keys.drain().map(|(_, p)| p).collect()
    }

    /// Puts one update per key and tells the batches each one covers.
    async fn flush(&self, keys: Vec<Pending>) {
        if keys.is_empty() {
            return;
        }
        let (updates, waiters): (Vec<Update>, Vec<Vec<Arc<Waiter>>>) =
            keys.into_iter().map(|p| (p.update, p.waiters)).unzip();
        let _landing = Landing {
            coalescer: self,
            hashes: updates.iter().map(|u| u.hash).collect(),
        };
        let results = self.latest.put_all(&updates).await;
        for (ok, waiters) in results.into_iter().zip(waiters) {
            for w in waiters {
                w.key_done(ok);
            }
        }
    }
}

/// Marks a flush's keys as no longer on their way (also when the flush is aborted), and
/// wakes the flush task if some of them got a newer update meanwhile.
struct Landing<'a> {
    coalescer: &'a Coalescer,
    hashes: Vec<u64>,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        let Ok(mut dirty) = self.coalescer.dirty.lock() else {
            return;
        };
        let mut again = false;
        for h in &self.hashes {
            dirty.flying.remove(h);
            again |= dirty.keys.contains_key(h);
        }
        drop(dirty);
        if again {
            self.coalescer.wake.notify_one();
        }
    }
}

/// Closes the coalescer and fails the batches still waiting (their senders are dropped).
struct CloseOnDrop<'a>(&'a Coalescer);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        drop(self.0.take(true));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::names;
    use crate::state::{self, StateValue};
    use async_nats::jetstream;
    use fleetpipe_proto::{Reading, Timestamp};
    use fleetpipe_store::Record;
    use fleetpipe_testkit::NatsServer;

    fn record(device: &str, ts: i64, seq: u64) -> Record {
        Record {
            seq,
            reading: Reading {
                device: device.into(),
                sensor: "speed".into(),
                value: ts as f64,
                ts: Timestamp::from_micros(ts),
                unit: None,
                quality: None,
                tags: Default::default(),
            },
        }
    }

    /// Puts the state bucket has taken so far.
    async fn puts(js: &jetstream::Context) -> u64 {
        let mut stream = js
            .get_stream(format!("KV_{}", names::STATE_BUCKET))
            .await
            .unwrap();
        stream.info().await.unwrap().state.last_sequence
    }

    async fn stored_ts(broker: &crate::broker::Broker, device: &str) -> i64 {
        let key = state::key(device, "speed", &[]);
        let v = broker.state.get(&key).await.unwrap().expect("a value");
        serde_json::from_slice::<StateValue>(&v).unwrap().ts
    }

    async fn broker(server: &NatsServer) -> crate::broker::Broker {
        let client = async_nats::connect(server.url()).await.unwrap();
        crate::broker::ensure(&client, &crate::Config::default())
            .await
            .unwrap()
    }

    /// Forty batches updating one key (out of order) and a second key within one window:
    /// one put per key, the newest value, and every batch confirmed.
    #[tokio::test(flavor = "multi_thread")]
    async fn many_updates_of_a_key_in_a_window_make_one_put() {
        let server = NatsServer::start();
        let broker = broker(&server).await;
        let latest = Arc::new(Latest::new(broker.js.clone(), Arc::default()));
        let coalescer = Arc::new(Coalescer::new(latest.clone(), Duration::from_millis(50)));
        // Submitted before the flush task starts, so all of it falls in its first window.
        let batches: Vec<Confirmation> = (0..40i64)
            .map(|i| {
                let ts = 1_000 + (i * 17) % 40;
                let mut records = vec![record("a", ts, i as u64)];
                if i % 4 == 0 {
                    records.push(record("b", ts, i as u64));
                }
                coalescer.submit(latest.updates(&records))
            })
            .collect();
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (coalescer, stop) = (coalescer.clone(), stop.clone());
            async move { coalescer.run(stop).await }
        });
        for batch in batches {
            assert!(batch.confirmed().await);
        }
        assert_eq!(puts(&broker.js).await, 2);
        assert_eq!(stored_ts(&broker, "a").await, 1_039);
        assert_eq!(stored_ts(&broker, "b").await, 1_036);

        // A batch behind what is stored needs no put; a newer one does.
        assert!(
            coalescer
                .submit(latest.updates(&[record("a", 1_001, 100)]))
                .confirmed()
                .await
        );
        assert!(
            coalescer
                .submit(latest.updates(&[record("a", 2_000, 101)]))
                .confirmed()
                .await
        );
        assert_eq!(puts(&broker.js).await, 3);
        assert_eq!(stored_ts(&broker, "a").await, 2_000);

        // After the stop nothing waits forever: a late batch fails at once (and would be
        // redelivered).
        stop.cancel();
        task.await.unwrap();
        assert!(
            !coalescer
                .submit(latest.updates(&[record("a", 3_000, 102)]))
                .confirmed()
                .await
        );
    }

    /// Batches waiting when the flush task stops are put before it ends.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_stop_flushes_what_is_waiting() {
        let server = NatsServer::start();
        let broker = broker(&server).await;
        let latest = Arc::new(Latest::new(broker.js.clone(), Arc::default()));
        let coalescer = Arc::new(Coalescer::new(latest.clone(), Duration::from_secs(3600)));
        let stop = CancellationToken::new();
        stop.cancel();
        let batch = coalescer.submit(latest.updates(&[record("a", 1_000, 1)]));
        coalescer.clone().run(stop).await;
        assert!(batch.confirmed().await);
        assert_eq!(stored_ts(&broker, "a").await, 1_000);
    }

    /// A window of 0: each batch puts its own updates at once, no flush task needed.
    #[tokio::test(flavor = "multi_thread")]
    async fn window_zero_puts_every_batch() {
        let server = NatsServer::start();
        let broker = broker(&server).await;
        let latest = Arc::new(Latest::new(broker.js.clone(), Arc::default()));
        let coalescer = Arc::new(Coalescer::new(latest.clone(), Duration::ZERO));
        coalescer.clone().run(CancellationToken::new()).await; // returns at once
        for i in 0..5 {
            let batch = coalescer.submit(latest.updates(&[record("a", 1_000 + i, i as u64)]));
            assert!(matches!(batch, Confirmation::Direct(..)));
            assert!(batch.confirmed().await);
        }
        assert_eq!(puts(&broker.js).await, 5);
        assert_eq!(stored_ts(&broker, "a").await, 1_004);
    }
}
