//! Figures only the broker knows (consumer lag, dead letters held, messages received),
//! polled in the background so `/metrics` and the fleet summary never wait on NATS.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use fleetpipe_pipeline::config::names;
use tokio_util::sync::CancellationToken;

/// How often the broker is polled.
pub const POLL_EVERY: Duration = Duration::from_secs(2);
/// How long one poll may take before it is given up (the old figures stay).
const POLL_TIMEOUT: Duration = Duration::from_secs(2);

/// The latest broker figures; relaxed atomics, each figure independent.
#[derive(Debug, Default)]
pub struct BrokerGauges {
    /// Set after the first successful poll; until then the figures mean nothing.
    pub polled: AtomicBool,
    /// Messages in the telemetry stream not yet delivered to the collectors.
    pub consumer_pending: AtomicU64,
    /// Messages delivered to collectors and not yet acknowledged.
    pub consumer_ack_pending: AtomicU64,
    /// Messages held in the dead-letter stream.
    pub dead_letters: AtomicU64,
    /// Last sequence of the telemetry stream: every message it ever accepted.
    pub stream_last_seq: AtomicU64,
}

/// Polls the collectors' consumer and the telemetry and dead-letter streams every
/// [`POLL_EVERY`] until `shutdown`. Failures are logged at debug level and retried: the
/// readiness probe reports a broken connection.
pub async fn poll(
    js: jetstream::Context,
    mut consumer: PullConsumer,
    telemetry_stream: String,
    gauges: Arc<BrokerGauges>,
    shutdown: CancellationToken,
) {
    loop {
        let polled = tokio::time::timeout(POLL_TIMEOUT, async {
            let info = consumer.info().await?;
            gauges.consumer_pending.store(info.num_pending, Relaxed);
            gauges
                .consumer_ack_pending
                .store(info.num_ack_pending as u64, Relaxed);
            let mut dlq = js.get_stream(names::DLQ_STREAM).await?;
            gauges
                .dead_letters
                .store(dlq.info().await?.state.messages, Relaxed);
            let mut telemetry = js.get_stream(&telemetry_stream).await?;
            gauges
                .stream_last_seq
                .store(telemetry.info().await?.state.last_sequence, Relaxed);
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
        .await;
        match polled {
            Ok(Ok(())) => gauges.polled.store(true, Relaxed),
            Ok(Err(e)) => tracing::debug!(error = %e, "broker poll failed"),
            Err(_) => tracing::debug!("broker poll timed out"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(POLL_EVERY) => {}
        }
    }
}
