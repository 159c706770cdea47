//! The publishing core the simulator and the agent share.
//!
//! * [`Publisher`] — JetStream publishes with a `Nats-Msg-Id` each and a bounded window of
//!   outstanding acknowledgements: a slow broker slows the caller down instead of growing
//!   a queue.
//! * [`buffer`] — a bounded on-disk log of messages, each with a stable index, that
//!   survives restarts and power cuts; the oldest are dropped (and counted) when it is full.
//! * [`spool`] — drives a [`buffer::Buffer`] through a [`Publisher`]: sends in order,
//!   advances the acknowledged cursor in order, and on any failure goes back to the oldest
//!   unacknowledged message and sends again with the same ids (the stream de-duplicates).
//! * [`batch`] — turns readings into messages: one JSON reading, or a line-protocol batch
//!   at high rates.

pub mod batch;
pub mod buffer;
pub mod spool;

use std::future::{Future, IntoFuture};
use std::pin::Pin;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::{self, publish::PublishAck};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};

/// One message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// The subject, e.g. `vehicle.4613.speed`.
    pub subject: String,
    /// The payload as the wire contract defines it (plain, JSON or line protocol).
    pub payload: Bytes,
    /// `Nats-Msg-Id`: the stream drops a second message with the same id inside its
    /// duplicate window. `None` publishes without one.
    pub msg_id: Option<String>,
    /// Readings the message carries, for counters.
    pub readings: u64,
}

/// The outcome of one publish, with the caller's token.
#[derive(Debug)]
pub struct Acked {
    /// What the caller passed to [`Publisher::publish`].
    pub token: u64,
    /// Readings the message carried.
    pub readings: u64,
    /// The broker's acknowledgement (`duplicate` set when the id was seen before), or why
    /// none came.
    pub result: Result<PublishAck, PublishError>,
}

type AckFuture = Pin<Box<dyn Future<Output = Acked> + Send>>;

/// JetStream publishes with at most `window` acknowledgements outstanding.
pub struct Publisher {
    js: jetstream::Context,
    window: usize,
    in_flight: FuturesUnordered<AckFuture>,
}

impl Publisher {
    /// A publisher over `js` allowing `window` (at least 1) unacknowledged messages. Build
    /// `js` with [`context`] so that the client never waits on a limit of its own.
    pub fn new(js: jetstream::Context, window: usize) -> Publisher {
        Publisher {
            js,
            window: window.max(1),
            in_flight: FuturesUnordered::new(),
        }
    }

    /// Whether another message may be published now.
    pub fn has_room(&self) -> bool {
        self.in_flight.len() < self.window
    }

    /// Acknowledgements outstanding.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Publishes `msg`; its acknowledgement comes later from [`Publisher::next_ack`] with
    /// `token`. Callers keep to the window (see [`Publisher::has_room`]); the window is not
    /// enforced here so that a caller can decide what to do meanwhile. A failure to hand the
    /// message to the client is returned at once.
    pub async fn publish(&mut self, token: u64, msg: Outgoing) -> Result<(), PublishError> {
        let Outgoing {
            subject,
            payload,
            msg_id,
            readings,
        } = msg;
        let ack = match msg_id {
            Some(id) => {
                let mut headers = HeaderMap::new();
                headers.insert(NATS_MESSAGE_ID, id);
                self.js
                    .publish_with_headers(subject, headers, payload)
                    .await?
            }
            None => self.js.publish(subject, payload).await?,
        };
        self.in_flight
            .push(Box::pin(ack.into_future().map(move |result| Acked {
                token,
                readings,
                result,
            })));
        Ok(())
    }

    /// The next acknowledgement (or failure), in whatever order they come; `None` when
    /// nothing is outstanding. Each is bounded by the context's timeout.
    pub async fn next_ack(&mut self) -> Option<Acked> {
        self.in_flight.next().await
    }

    /// An acknowledgement that has already arrived, without waiting.
    pub fn ready_ack(&mut self) -> Option<Acked> {
        self.in_flight.next().now_or_never().flatten()
    }

    /// Forgets every outstanding acknowledgement; returns how many there were.
    pub fn abandon(&mut self) -> usize {
        let n = self.in_flight.len();
        self.in_flight.clear();
        n
    }
}

/// A JetStream context for a [`Publisher`] with `window`: acknowledgements time out after
/// `ack_timeout`, and the client's own in-flight limit is no lower than the window, so
/// `publish` never waits on it.
pub fn context(
    client: async_nats::Client,
    window: usize,
    ack_timeout: std::time::Duration,
) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(ack_timeout)
        .max_ack_inflight(window.max(1))
        .backpressure_on_inflight(true)
        .build(client)
}
