//! The collectors' pull loop: batches from the durable consumer, as large as what is ready
//! (or arrives within `batch_wait`), up to `batch_size`, from one pull request at a time
//! (so that a stopping collector can hand back everything it was sent). The bench's ceiling consumer uses
//! the same loop, so the two phases differ only in what is done with a batch.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, PullConsumer};
use async_nats::jetstream::Message;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::stats::Stats;

/// How long one pull request stays open waiting for messages. Each request is read to its
/// end, so the puller always knows what the broker may still send it: a stop hands all of
/// it back. Short, so a stop waits little; an idle puller renews its request this often.
const PULL_EXPIRES: Duration = Duration::from_secs(1);

/// How long messages a stopping collector hands back wait before the broker delivers them
/// again: longer than a request stays open, so they cannot come back to it.
const RELEASE_DELAY: Duration = Duration::from_secs(2);

/// How long to wait before opening the pull stream again after it failed.
const REOPEN_DELAY: Duration = Duration::from_secs(1);

/// Pulls batches from one consumer; one per worker.
pub struct BatchPuller {
    consumer: PullConsumer,
    batch_size: usize,
    batch_wait: Duration,
    stats: Arc<Stats>,
    /// Most bytes one pull asks for; 0: no limit.
    max_bytes: usize,
    messages: Option<pull::Batch>,
}

impl BatchPuller {
    pub fn new(
        consumer: PullConsumer,
        batch_size: usize,
        batch_wait: Duration,
        stats: Arc<Stats>,
    ) -> BatchPuller {
        BatchPuller {
            consumer,
            batch_size,
            batch_wait,
            stats,
            max_bytes: 0,
            messages: None,
        }
    }

    /// Limits each pull to `max_bytes` of messages (at least one message is delivered
    /// whatever its size).
    pub fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Negatively acknowledges what the broker sent this puller and nobody took: a stopping
    /// collector reads its open pull request to the end (at most [`PULL_EXPIRES`]) and hands
    /// every message back, to be delivered again after [`RELEASE_DELAY`] rather than after
    /// the ack wait. (The delay outlasts the request, so nothing comes back to it.)
    pub async fn release(&mut self) {
        let Some(mut messages) = self.messages.take() else {
            return;
        };
        let mut released = 0u64;
        while let Some(m) = messages.next().await {
            if let Ok(m) = m {
                let nak = async_nats::jetstream::AckKind::Nak(Some(RELEASE_DELAY));
                if m.ack_with(nak).await.is_ok() {
                    released += 1;
                }
            }
        }
        if released > 0 {
            tracing::debug!(
                messages = released,
                "handed back messages pulled but not processed"
            );
        }
    }

    /// The next batch (never empty), or `None` once `shutdown` is cancelled. Failures to
    /// pull are logged, counted in `nats_errors`, and retried.
    pub async fn next(&mut self, shutdown: &CancellationToken) -> Option<Vec<Message>> {
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            let messages = match &mut self.messages {
                Some(m) => m,
                None => match self
                    .consumer
                    .batch()
                    .max_messages(self.batch_size)
                    .max_bytes(self.max_bytes)
                    .expires(PULL_EXPIRES)
                    .messages()
                    .await
                {
                    Ok(m) => self.messages.insert(m),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot pull from the telemetry stream; retrying");
                        Stats::add(&self.stats.nats_errors, 1);
                        tokio::select! {
                            _ = shutdown.cancelled() => return None,
                            _ = tokio::time::sleep(REOPEN_DELAY) => continue,
                        }
                    }
                },
            };
            let first = tokio::select! {
                _ = shutdown.cancelled() => return None,
                m = messages.next() => m,
            };
            let mut batch = Vec::with_capacity(self.batch_size);
            match first {
                Some(Ok(m)) => batch.push(m),
                // A status ends the request (409: the byte limit was reached).
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "pull request ended");
                    self.messages = None;
                    continue;
                }
                None => {
                    self.messages = None;
                    continue;
                }
            }
            // Whatever is ready now; with a batch_wait, what arrives until then too.
            let deadline = tokio::time::Instant::now() + self.batch_wait;
            while batch.len() < self.batch_size {
                match tokio::time::timeout_at(deadline, messages.next()).await {
                    Ok(Some(Ok(m))) => batch.push(m),
                    Ok(Some(Err(e))) => tracing::debug!(error = %e, "pull request ended"),
                    Ok(None) | Err(_) => break,
                }
            }
            return Some(batch);
        }
    }
}
