//! The dead-letter stream: what the collectors refuse, with the reason.
//!
//! A dead letter is the original payload published on `fleetpipe.dlq.<code>.<stream seq>`
//! with the reasons in headers. Three kinds of refusal end here:
//!
//! * input the decoder refuses (`not_a_number`, `json`, `limit`, …);
//! * `store`: a message whose readings the store refuses for good (found by splitting the
//!   failed write down to the one message, see `write.rs`);
//! * `max_deliveries`: a message delivered `collector.max_deliver` times without being
//!   processed, i.e. one that made collectors crash or stall. JetStream stops delivering
//!   it, keeps it in the stream and publishes an advisory; a stream captures those
//!   advisories so none is missed while no collector runs, and one collector takes each,
//!   dead-letters the message and deletes it from the telemetry stream.
//!
//! A message is dead-lettered once: the `Nats-Msg-Id` drops a repeat inside the stream's
//! duplicate window, and a redelivered message (one delivered before, maybe long ago)
//! first looks for its dead letter by subject.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use fleetpipe_proto::Timestamp;
use futures::StreamExt;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::headers;
use crate::config::names;
use crate::stats::Stats;
use std::sync::Arc;

/// One dead letter to publish.
pub(crate) struct DeadLetter {
    pub subject: String,
    pub payload: Bytes,
    /// Telemetry stream sequence of the original message.
    pub seq: u64,
    pub received: Timestamp,
    /// Stable codes, the first one names the subject.
    pub codes: Vec<String>,
    pub reason: String,
    /// The message was delivered before: its dead letter may exist already.
    pub redelivered: bool,
}

impl DeadLetter {
    /// The dead-letter subject: `fleetpipe.dlq.<first code>.<stream seq>`.
    pub(crate) fn dlq_subject(&self) -> String {
        let code = self.codes.first().map(String::as_str).unwrap_or("unknown");
        format!("{}.{code}.{}", names::DLQ_SUBJECT_PREFIX, self.seq)
    }

    /// Publishes it and waits for the broker to store it.
    pub(crate) async fn publish(self, js: jetstream::Context) -> Result<(), String> {
        let subject = self.dlq_subject();
        if self.redelivered && exists(&js, &subject).await {
            return Ok(());
        }
        let mut h = HeaderMap::new();
        h.insert(headers::REASON, header_safe(&self.reason).as_str());
        h.insert(headers::CODES, self.codes.join(",").as_str());
        h.insert(headers::SUBJECT, header_safe(&self.subject).as_str());
        h.insert(headers::STREAM_SEQ, self.seq.to_string().as_str());
        h.insert(headers::RECEIVED, self.received.to_rfc3339().as_str());
        // Sequence and receive time: the same message redelivered gets the same id.
        h.insert(
            "Nats-Msg-Id",
            format!("dlq-{}-{}", self.seq, self.received.as_micros()).as_str(),
        );
        tracing::debug!(subject = %self.subject, reason = %self.reason, "dead letter");
        let ack = js
            .publish_with_headers(subject, h, self.payload)
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map(|_| ()).map_err(|e| e.to_string())
    }
}

/// Whether the dead-letter stream holds a message on `subject`.
async fn exists(js: &jetstream::Context, subject: &str) -> bool {
    let Ok(stream) = js.get_stream(names::DLQ_STREAM).await else {
        return false;
    };
    stream
        .get_last_raw_message_by_subject(subject)
        .await
        .is_ok()
}

/// Header values cannot hold line breaks; keep them bounded too.
pub(crate) fn header_safe(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1024)
        .collect();
    out.truncate(out.trim_end().len());
    out
}

/// The part of JetStream's max-deliveries advisory we use.
#[derive(Deserialize)]
struct MaxDeliveries {
    stream_seq: u64,
    deliveries: u64,
}

/// Dead-letters each message the telemetry consumer gave up on, from the advisories the
/// advisory stream captured, until `shutdown`.
pub(crate) async fn max_deliveries_worker(
    js: jetstream::Context,
    advisories: PullConsumer,
    telemetry_stream: String,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) {
    loop {
        let mut messages = match advisories.messages().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read max-delivery advisories; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                m = messages.next() => m,
            };
            let msg = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "advisory stream error");
                    continue;
                }
                None => break,
            };
            let done = match serde_json::from_slice::<MaxDeliveries>(&msg.payload) {
                Ok(a) => {
                    let r = dead_letter_undeliverable(&js, &telemetry_stream, &a).await;
                    if let Ok(true) = r {
                        Stats::add(&stats.max_deliveries, 1);
                        Stats::add(&stats.dead_letters, 1);
                    }
                    r.map(|_| ())
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a malformed max-delivery advisory");
                    Ok(())
                }
            };
            let ack = match done {
                Ok(()) => msg.ack().await,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot dead-letter an undeliverable message; retrying");
                    msg.ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                        .await
                }
            };
            if let Err(e) = ack {
                tracing::debug!(error = %e, "advisory ack failed; it comes back");
            }
        }
    }
}

/// Moves one message the consumer gave up on to the dead-letter stream. False when it was
/// gone already.
async fn dead_letter_undeliverable(
    js: &jetstream::Context,
    telemetry_stream: &str,
    a: &MaxDeliveries,
) -> Result<bool, String> {
    let stream = js
        .get_stream(telemetry_stream)
        .await
        .map_err(|e| e.to_string())?;
    let msg = match stream.get_raw_message(a.stream_seq).await {
        Ok(m) => m,
        // Already gone (acknowledged late, or dead-lettered by another collector).
        Err(_) => return Ok(false),
    };
    let dead = DeadLetter {
        subject: msg.subject.to_string(),
        payload: msg.payload.clone(),
        seq: a.stream_seq,
        received: Timestamp::from_offset_date_time(msg.time),
        codes: vec!["max_deliveries".into()],
        reason: format!(
            "delivered {} times without being processed: a collector crashed, stalled or \
             was stopped on it each time (collector.max_deliver)",
            a.deliveries
        ),
        redelivered: true,
    };
    dead.publish(js.clone()).await?;
    tracing::warn!(
        seq = a.stream_seq,
        deliveries = a.deliveries,
        "dead-lettered a message the collectors could not process"
    );
    // Dead-lettered: it must not stay in the stream forever (interest retention keeps a
    // message the consumer gave up on).
    if let Err(e) = stream.delete_message(a.stream_seq).await {
        tracing::debug!(error = %e, "undeliverable message already deleted");
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetpipe_testkit::NatsServer;

    fn letter(seq: u64, redelivered: bool) -> DeadLetter {
        DeadLetter {
            subject: "vehicle.v1.speed".into(),
            payload: Bytes::from_static(b"fast"),
            seq,
            received: Timestamp::from_micros(1_771_149_600_000_000),
            codes: vec!["not_a_number".into()],
            reason: "payload \"fast\" is not a decimal number".into(),
            redelivered,
        }
    }

    /// A redelivery that comes after the dead-letter stream's duplicate window (an outage,
    /// a crash) finds the dead letter already there and does not publish it again.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_late_redelivery_is_not_dead_lettered_twice() {
        let server = NatsServer::start();
        let client = async_nats::connect(server.url()).await.unwrap();
        let broker = crate::broker::ensure(&client, &crate::Config::default())
            .await
            .unwrap();
        let js = broker.js;
        let mut config = js
            .get_stream(names::DLQ_STREAM)
            .await
            .unwrap()
            .cached_info()
            .config
            .clone();
        config.duplicate_window = Duration::from_millis(100);
        js.update_stream(config).await.unwrap();
        let count = || async {
            let mut s = js.get_stream(names::DLQ_STREAM).await.unwrap();
            s.info().await.unwrap().state.messages
        };
        letter(7, false).publish(js.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        letter(7, true).publish(js.clone()).await.unwrap();
        assert_eq!(count().await, 1);
        // Without the check the window would not have stopped it: another message is
        // published past the window.
        tokio::time::sleep(Duration::from_millis(300)).await;
        letter(7, false).publish(js.clone()).await.unwrap();
        assert_eq!(count().await, 2);
        let last = js
            .get_stream(names::DLQ_STREAM)
            .await
            .unwrap()
            .get_last_raw_message_by_subject("fleetpipe.dlq.not_a_number.7")
            .await
            .unwrap();
        assert_eq!(&last.payload[..], b"fast");
    }
}
