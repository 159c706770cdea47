//! Publish acknowledgements for many JetStream publishes at once, cheaply.
//!
//! The client's own acknowledged publish costs, per message, a permit, a one-shot channel,
//! a fresh inbox, an entry in the connection's request table and two timers: at tens of
//! thousands of latest-state puts a second, that was a quarter of the collector's CPU.
//! Here a batch of publishes shares one wildcard subscription: message `i` of batch `b`
//! asks for its acknowledgement on `<prefix>.<b>.<i>`, one task routes every
//! acknowledgement to its batch, and the batch is told once all of them are in.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::oneshot;

/// JetStream's error code for a failed `Nats-Expected-Last-Subject-Sequence`.
pub(crate) const WRONG_LAST_SEQUENCE: u64 = 10071;

/// How long a batch waits for its acknowledgements (lost ones: a reconnect).
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the broker answered to one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ack {
    /// Stored at this stream sequence.
    Stored(u64),
    /// Refused, with JetStream's error code and description.
    Refused(u64, String),
}

#[derive(Deserialize)]
struct Reply {
    seq: Option<u64>,
    error: Option<ReplyError>,
}

#[derive(Deserialize)]
struct ReplyError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

struct Waiting {
    acks: Vec<Option<Ack>>,
    missing: usize,
    done: Option<oneshot::Sender<Vec<Option<Ack>>>>,
}

/// One wildcard subscription for the acknowledgements of a process's batches.
pub(crate) struct AckMux {
    client: async_nats::Client,
    prefix: String,
    next: AtomicU64,
    // A std mutex: held to insert a batch or record one acknowledgement.
    waiting: Arc<Mutex<HashMap<u64, Waiting>>>,
    _router: tokio::task::JoinHandle<()>,
}

impl AckMux {
    pub(crate) async fn new(client: async_nats::Client) -> Result<AckMux, String> {
        let prefix = client.new_inbox();
        let mut sub = client
            .subscribe(format!("{prefix}.>"))
            .await
            .map_err(|e| e.to_string())?;
        let waiting: Arc<Mutex<HashMap<u64, Waiting>>> = Arc::default();
        let routes = waiting.clone();
        let skip = prefix.len() + 1;
        let router = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some((batch, i)) = msg
                    .subject
                    .get(skip..)
                    .and_then(|rest| rest.split_once('.'))
                    .and_then(|(b, i)| Some((b.parse::<u64>().ok()?, i.parse::<usize>().ok()?)))
                else {
                    continue;
                };
                let ack = match serde_json::from_slice::<Reply>(&msg.payload) {
                    Ok(Reply { error: Some(e), .. }) => Ack::Refused(e.err_code, e.description),
                    Ok(Reply { seq: Some(seq), .. }) => Ack::Stored(seq),
                    _ => Ack::Refused(0, "unreadable acknowledgement".into()),
                };
                let Ok(mut waiting) = routes.lock() else {
                    return;
                };
                let Some(w) = waiting.get_mut(&batch) else {
                    continue; // timed out already
                };
                if let Some(slot) = w.acks.get_mut(i) {
                    if slot.is_none() {
                        *slot = Some(ack);
                        w.missing -= 1;
                    }
                }
                if w.missing == 0 {
                    if let Some(w) = waiting.remove(&batch) {
                        if let Some(done) = w.done {
                            let _ = done.send(w.acks);
                        }
                    }
                }
            }
        });
        Ok(AckMux {
            client,
            prefix,
            next: AtomicU64::new(0),
            waiting,
            _router: router,
        })
    }

    /// Publishes every `(subject, headers, payload)` and waits for all acknowledgements
    /// (at most [`ACK_TIMEOUT`]). Returns one answer per message, `None` for one that
    /// never came.
    pub(crate) async fn publish_all(
        &self,
        messages: Vec<(String, HeaderMap, Bytes)>,
    ) -> Vec<Option<Ack>> {
        let n = messages.len();
        if n == 0 {
            return Vec::new();
        }
        let batch = self.next.fetch_add(1, Ordering::Relaxed);
        let (done, answers) = oneshot::channel();
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.insert(
                batch,
                Waiting {
                    acks: vec![None; n],
                    missing: n,
                    done: Some(done),
                },
            );
        }
        for (i, (subject, headers, payload)) in messages.into_iter().enumerate() {
            let reply = format!("{}.{batch}.{i}", self.prefix);
            if self
                .client
                .publish_with_reply_and_headers(subject, reply, headers, payload)
                .await
                .is_err()
            {
                break;
            }
        }
        match tokio::time::timeout(ACK_TIMEOUT, answers).await {
            Ok(Ok(acks)) => acks,
            _ => {
                // Missing acknowledgements: take what came.
                let w = self.waiting.lock().ok().and_then(|mut w| w.remove(&batch));
                w.map(|w| w.acks).unwrap_or_else(|| vec![None; n])
            }
        }
    }
}

impl Drop for AckMux {
    fn drop(&mut self) {
        self._router.abort();
    }
}
