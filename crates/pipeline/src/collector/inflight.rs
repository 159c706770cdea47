//! Keeps messages in hand from being redelivered while they wait: every message a
//! collector has pulled and not yet acknowledged is registered here, and a keepalive task
//! sends "in progress" (`+WPI`) for every one held longer than a third of `ack_wait`. A slow
//! commit, a queue behind it, or a store outage that the writers wait out therefore never
//! makes the broker hand the same messages to another collector, and never spends their
//! delivery count (which `max_deliver` bounds, to catch messages that crash collectors).
//!
//! Only while the collector shows progress: a store write finished (or failed, or timed
//! out), a batch was acknowledged. Every store write has a deadline, so a working collector
//! shows progress at least that often; one that shows none for longer is wedged (a bug),
//! and its messages are let go, to be redelivered to another collector and counted against
//! `max_deliver`, rather than held forever.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_nats::Subject;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The reply subjects of registered batches.
pub(crate) struct InFlight {
    next: AtomicU64,
    /// When the collector last made progress, in ms since `epoch`.
    progress_ms: AtomicU64,
    epoch: Instant,
    // A std mutex: held to insert or remove one entry, or to copy the old ones out.
    batches: Mutex<HashMap<u64, (Instant, Vec<Subject>)>>,
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight {
            next: AtomicU64::new(0),
            progress_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            batches: Mutex::default(),
        }
    }
}

impl InFlight {
    /// Records that the collector made progress (see the module docs).
    pub(crate) fn progress(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.progress_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long since the collector last made progress.
    fn since_progress(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.progress_ms.load(Ordering::Relaxed)))
    }

    /// Registers the reply subjects of a batch (messages without one cannot be acked and
    /// need no keepalive).
    pub(crate) fn register(&self, replies: Vec<Subject>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut b) = self.batches.lock() {
            b.insert(id, (Instant::now(), replies));
        }
        id
    }

    /// Deregisters a batch, once it is acknowledged or negatively acknowledged.
    pub(crate) fn done(&self, id: u64) {
        if let Ok(mut b) = self.batches.lock() {
            b.remove(&id);
        }
    }

    /// The reply subjects of batches registered before `before`.
    fn older_than(&self, before: Instant) -> Vec<Subject> {
        let Ok(b) = self.batches.lock() else {
            return Vec::new();
        };
        b.values()
            .filter(|(at, _)| *at < before)
            .flat_map(|(_, replies)| replies.iter().cloned())
            .collect()
    }

    /// Number of registered batches (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.batches.lock().map(|b| b.len()).unwrap_or(0)
    }

    /// Sends "in progress" for every message held longer than `every` (a third of
    /// `ack_wait`), every `every`, until `shutdown`, as long as the collector made progress
    /// within `stale_after`.
    pub(crate) async fn keepalive(
        &self,
        client: async_nats::Client,
        every: Duration,
        stale_after: Duration,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some(before) = Instant::now().checked_sub(every) else {
                continue;
            };
            let replies = self.older_than(before);
            if replies.is_empty() {
                continue;
            }
            let idle = self.since_progress();
            if idle > stale_after {
                tracing::error!(messages = replies.len(), idle = ?idle, "the collector made no progress: letting its messages go to another collector");
                continue;
            }
            tracing::debug!(
                messages = replies.len(),
                "extending the ack wait of messages in hand"
            );
            for reply in replies {
                if client.publish(reply, "+WPI".into()).await.is_err() {
                    break; // disconnected: the broker will redeliver, which is harmless
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn only_batches_held_long_are_extended() {
        let f = InFlight::default();
        let a = f.register(vec![Subject::from("$JS.ACK.a")]);
        tokio::time::advance(Duration::from_secs(20)).await;
        let b = f.register(vec![Subject::from("$JS.ACK.b")]);
        let old = f.older_than(Instant::now() - Duration::from_secs(10));
        assert_eq!(old, vec![Subject::from("$JS.ACK.a")]);
        f.done(a);
        f.done(b);
        assert_eq!(f.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn progress_is_tracked() {
        let f = InFlight::default();
        tokio::time::advance(Duration::from_secs(5)).await;
        f.progress();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(f.since_progress(), Duration::from_secs(2));
    }
}
