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
            messages: None,
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
                    .stream()
                    .max_messages_per_batch(self.batch_size)
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
