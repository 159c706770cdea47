//! The collectors' pull loop: batches from the durable consumer, as large as what is ready
//! (or arrives within `batch_wait`), up to `batch_size`. The bench's ceiling consumer uses
//! the same loop, so the two phases differ only in what is done with a batch.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, PullConsumer};
use async_nats::jetstream::Message;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::stats::Stats;

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
    messages: Option<pull::Stream>,
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

    /// Negatively acknowledges, without delay, what the broker already sent this puller
    /// and nobody took: a stopping collector hands it back at once instead of making it
    /// wait out the ack wait.
    pub async fn release(&mut self) {
        let Some(mut messages) = self.messages.take() else {
            return;
        };
        let mut released = 0u64;
        while let Ok(Some(m)) =
            tokio::time::timeout(Duration::from_millis(50), messages.next()).await
        {
            if let Ok(m) = m {
                if m.ack_with(async_nats::jetstream::AckKind::Nak(None))
                    .await
                    .is_ok()
                {
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
                None => match {
                    let stream = self
                        .consumer
                        .stream()
                        .max_messages_per_batch(self.batch_size);
                    if self.max_bytes > 0 {
                        stream.max_bytes_per_batch(self.max_bytes)
                    } else {
                        stream
                    }
                }
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
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
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "pull stream error");
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
                    Ok(Some(Err(e))) => tracing::debug!(error = %e, "pull stream error"),
                    Ok(None) | Err(_) => break,
                }
            }
            return Some(batch);
        }
    }
}
