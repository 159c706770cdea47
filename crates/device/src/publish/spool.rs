//! Store and forward: every message goes to the [`Buffer`] first, and is sent from there
//! in order through a [`Publisher`], whatever the link does.
//!
//! The spool keeps two positions in the log: the oldest unacknowledged message (the
//! buffer's cursor) and the next one to send. Acknowledgements may come in any order; the
//! cursor advances over the ones that have all arrived. On any failure (an ack timing
//! out, the connection breaking, no stream answering) the spool forgets what is in flight,
//! waits for the link and a backoff with jitter, and sends again from the cursor with the
//! same ids: what the stream already holds is acknowledged as a duplicate and not stored
//! again, as long as it comes back within the stream's duplicate window (see
//! [`SpoolStats::late_resends`]).
//!
//! The link going down counts as a failure at once for whatever is in flight: a publish
//! the old server never got has no reply coming, and waiting for its acknowledgement to
//! time out would let later messages through on the new connection first, so that the
//! stream would hold them out of order.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::buffer::Buffer;
use super::{Acked, Outgoing, Publisher};

/// A message for the spool: subject, payload, readings.
#[derive(Debug, Clone)]
pub struct Message {
    /// The subject to publish on.
    pub subject: String,
    /// The payload (JSON or line protocol).
    pub payload: String,
    /// Readings it carries.
    pub readings: u32,
}

/// How the spool behaves.
#[derive(Debug, Clone)]
pub struct SpoolConfig {
    /// Prefix of every `Nats-Msg-Id` (the device id): ids are `<prefix>-<run>-<index>`.
    pub id_prefix: String,
    /// How often appended records and the cursor are made durable.
    pub sync_interval: Duration,
    /// Longest wait for one publish to be handed to the client.
    pub publish_timeout: Duration,
    /// The stream's duplicate window: messages sent again later than this after their
    /// first send may be stored twice, and are counted in [`SpoolStats::late_resends`].
    pub duplicate_window: Duration,
    /// First and longest backoff after a failure (jittered ±25 %).
    pub backoff_min: Duration,
    /// Longest backoff.
    pub backoff_max: Duration,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            id_prefix: String::new(),
            sync_interval: Duration::from_secs(1),
            publish_timeout: Duration::from_secs(5),
            duplicate_window: Duration::from_secs(120),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Counters and gauges a status report reads. Relaxed atomics: statistics only.
#[derive(Debug, Default)]
pub struct SpoolStats {
    /// Messages handed to the broker (resends included).
    pub published: AtomicU64,
    /// Messages acknowledged for the first time (duplicates not counted).
    pub acknowledged: AtomicU64,
    /// Readings in those messages.
    pub readings_acknowledged: AtomicU64,
    /// Acknowledgements saying the stream already had the message (a resend).
    pub duplicates: AtomicU64,
    /// Failed publishes and acknowledgements.
    pub failures: AtomicU64,
    /// Times the spool went back to the oldest unacknowledged message.
    pub rewinds: AtomicU64,
    /// Messages in flight when a failure came that were sent again more than the
    /// duplicate window after their first send: the stream may hold them twice.
    pub late_resends: AtomicU64,
    /// Messages and readings dropped because the buffer was full.
    pub dropped_messages: AtomicU64,
    /// Readings in the dropped messages.
    pub dropped_readings: AtomicU64,
    /// Messages in the buffer not acknowledged yet, and the buffer's bytes on disk.
    pub buffered: AtomicU64,
    /// Bytes the buffer holds on disk.
    pub buffer_bytes: AtomicU64,
    /// Buffer I/O errors (a message that could not be written is counted as dropped).
    pub buffer_errors: AtomicU64,
    /// Whether the link is up as far as the spool knows.
    pub link_up: AtomicBool,
    /// The latest failure, for a status report.
    pub last_error: Mutex<Option<String>>,
}

impl SpoolStats {
    fn note_error(&self, e: impl std::fmt::Display) {
        let text = e.to_string();
        if let Ok(mut last) = self.last_error.lock() {
            if last.as_deref() != Some(text.as_str()) {
                tracing::warn!(error = %text, "publish failed");
            }
            *last = Some(text);
        }
    }
}

/// One message sent and not acknowledged yet.
struct InFlight {
    index: u64,
    done: bool,
}

/// The store-and-forward sender. Run it with [`Spool::run`].
pub struct Spool {
    buffer: Buffer,
    publisher: Publisher,
    cfg: SpoolConfig,
    link: watch::Receiver<bool>,
    stats: Arc<SpoolStats>,
    in_flight: VecDeque<InFlight>,
    send_next: u64,
    /// After a failure: no sending before this instant.
    hold_until: Option<Instant>,
    failures_in_a_row: u32,
    /// Messages abandoned at a failure and not sent again yet: when the oldest was first
    /// sent, how many, and the index after the last.
    abandoned: Option<(Instant, u64, u64)>,
    first_sent: Option<Instant>,
}

impl Spool {
    /// A spool sending `buffer`'s messages through `publisher` while `link` is `true`.
    pub fn new(
        buffer: Buffer,
        publisher: Publisher,
        cfg: SpoolConfig,
        link: watch::Receiver<bool>,
        stats: Arc<SpoolStats>,
    ) -> Spool {
        let send_next = buffer.acked();
        let spool = Spool {
            buffer,
            publisher,
            cfg,
            link,
            stats,
            in_flight: VecDeque::new(),
            send_next,
            hold_until: None,
            failures_in_a_row: 0,
            abandoned: None,
            first_sent: None,
        };
        spool.publish_gauges();
        spool
    }

    /// A message's `Nats-Msg-Id`: stored with it, so the same at every resend.
    fn msg_id(&self, run: u64, index: u64) -> String {
        format!("{}-{run:x}-{index}", self.cfg.id_prefix)
    }

    /// Appends what arrives on `input` and sends it, until `input` closes or `stop` turns
    /// true; then makes the buffer durable, and for up to `drain` sends what is still
    /// buffered and takes acknowledgements.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<Message>,
        mut stop: watch::Receiver<bool>,
        drain: Duration,
    ) {
        let mut sync = tokio::time::interval(self.cfg.sync_interval);
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut open = true;
        // A closed channel's `changed()` is ready at once: stop polling it then.
        let (mut stop_open, mut link_open) = (true, true);
        loop {
            self.send_what_we_can().await;
            if *stop.borrow() || !open {
                break;
            }
            let hold = self.hold_until;
            tokio::select! {
                msg = input.recv() => match msg {
                    Some(msg) => {
                        self.append(msg);
                        // Take what else is waiting before sending: one pass, fewer wakeups.
                        while let Ok(msg) = input.try_recv() {
                            self.append(msg);
                        }
                    }
                    None => open = false,
                },
                Some(acked) = self.publisher.next_ack(), if self.publisher.in_flight() > 0 => {
                    self.on_ack(acked);
                }
                _ = sync.tick() => self.sync_off_thread().await,
                changed = self.link.changed(), if link_open => {
                    link_open = changed.is_ok();
                    if link_open {
                        self.rewind_on_link_change();
                    }
                }
                () = sleep_until_opt(hold), if hold.is_some() => {
                    self.hold_until = None;
                }
                changed = stop.changed(), if stop_open => stop_open = changed.is_ok(),
            }
        }
        self.sync();
        // Up to `drain`, go on sending what is buffered and taking acknowledgements: a stop
        // right after a burst (or a slow broker) would otherwise leave the unsent part for
        // the next start, however long the device stays off. What is left stays buffered.
        let deadline = Instant::now() + drain;
        while Instant::now() < deadline {
            // Cut short at the deadline, a record not yet counted as sent stays buffered
            // and goes again, under the same id, at the next start.
            let _ = tokio::time::timeout_at(deadline, self.send_what_we_can()).await;
            if self.publisher.in_flight() == 0 {
                break;
            }
            match tokio::time::timeout_at(deadline, self.publisher.next_ack()).await {
                Ok(Some(acked)) => self.on_ack(acked),
                _ => break,
            }
        }
        self.sync();
    }

    fn append(&mut self, msg: Message) {
        if let Err(e) = self
            .buffer
            .append(&msg.subject, msg.payload.as_bytes(), msg.readings)
        {
            self.stats.buffer_errors.fetch_add(1, Ordering::Relaxed);
            self.stats.dropped_messages.fetch_add(1, Ordering::Relaxed);
            self.stats
                .dropped_readings
                .fetch_add(u64::from(msg.readings), Ordering::Relaxed);
            self.stats
                .note_error(format_args!("buffer write failed: {e}"));
        }
        self.publish_gauges();
    }

    fn sync(&mut self) {
        if let Err(e) = self.buffer.sync() {
            self.sync_error(e);
        }
    }

    /// [`Spool::sync`] with the fsyncs on a blocking thread: on slow flash they take
    /// seconds, and the agent's single runtime thread (sensors, link, live configuration)
    /// must not stop for them. The spool itself waits, so nothing touches the buffer
    /// meanwhile.
    async fn sync_off_thread(&mut self) {
        let job = match self.buffer.sync_job() {
            Ok(Some(job)) => job,
            Ok(None) => return,
            Err(e) => return self.sync_error(e),
        };
        let done = tokio::task::spawn_blocking(move || job.run().map(|()| job))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match done {
            Ok(job) => self.buffer.synced(&job),
            Err(e) => {
                self.buffer.sync_failed();
                self.sync_error(e);
            }
        }
    }

    fn sync_error(&self, e: impl std::fmt::Display) {
        self.stats.buffer_errors.fetch_add(1, Ordering::Relaxed);
        self.stats
            .note_error(format_args!("buffer sync failed: {e}"));
    }

    fn publish_gauges(&self) {
        let s = &self.stats;
        let dropped = self.buffer.dropped();
        s.buffered.store(self.buffer.pending(), Ordering::Relaxed);
        s.buffer_bytes.store(self.buffer.bytes(), Ordering::Relaxed);
        // The buffer counts over the directory's life; write errors add to it.
        let errors = s.buffer_errors.load(Ordering::Relaxed);
        s.dropped_messages
            .fetch_max(dropped.messages + errors, Ordering::Relaxed);
        s.dropped_readings
            .fetch_max(dropped.readings, Ordering::Relaxed);
    }

    /// Sends from `send_next` while the link is up, nothing holds us back and the window
    /// has room.
    async fn send_what_we_can(&mut self) {
        while *self.link.borrow()
            && self.hold_until.is_none()
            && self.publisher.has_room()
            && self.send_next < self.buffer.next_index()
        {
            let record = match self.buffer.read(self.send_next) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    // A record we cannot read will not become readable: skip it, counted.
                    self.stats.buffer_errors.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .note_error(format_args!("buffer read failed: {e}"));
                    self.send_next += 1;
                    continue;
                }
            };
            // Dropped records are skipped: the cursor moved past them.
            if record.index < self.send_next {
                self.send_next = record.index + 1;
                continue;
            }
            let index = record.index;
            let msg = Outgoing {
                subject: record.subject,
                payload: record.payload,
                msg_id: Some(self.msg_id(record.run, index)),
                readings: u64::from(record.readings),
            };
            let sent =
                tokio::time::timeout(self.cfg.publish_timeout, self.publisher.publish(index, msg))
                    .await;
            match sent {
                Ok(Ok(())) => {
                    self.check_late_resend(index);
                    self.stats.published.fetch_add(1, Ordering::Relaxed);
                    self.first_sent.get_or_insert_with(Instant::now);
                    self.in_flight.push_back(InFlight { index, done: false });
                    self.send_next = index + 1;
                }
                Ok(Err(e)) => return self.fail(e),
                Err(_) => return self.fail("publish not accepted by the client in time"),
            }
        }
    }

    fn on_ack(&mut self, acked: Acked) {
        match acked.result {
            Ok(ack) => {
                let Some(pos) = self.in_flight.iter().position(|f| f.index == acked.token) else {
                    // From before a rewind: its copy is in flight again, or acked.
                    return;
                };
                self.in_flight[pos].done = true;
                let s = &self.stats;
                if ack.duplicate {
                    s.duplicates.fetch_add(1, Ordering::Relaxed);
                } else {
                    s.acknowledged.fetch_add(1, Ordering::Relaxed);
                    s.readings_acknowledged
                        .fetch_add(acked.readings, Ordering::Relaxed);
                }
                self.failures_in_a_row = 0;
                let mut upto = None;
                while self.in_flight.front().is_some_and(|f| f.done) {
                    upto = self.in_flight.pop_front().map(|f| f.index + 1);
                }
                if self.in_flight.is_empty() {
                    self.first_sent = None;
                }
                if let Some(upto) = upto {
                    if let Err(e) = self.buffer.ack_below(upto) {
                        self.stats.buffer_errors.fetch_add(1, Ordering::Relaxed);
                        self.stats
                            .note_error(format_args!("buffer prune failed: {e}"));
                    }
                    self.publish_gauges();
                }
            }
            Err(e) => {
                if self.in_flight.iter().any(|f| f.index == acked.token) {
                    self.fail(e);
                }
            }
        }
    }

    /// Forgets what is in flight and goes back to the oldest unacknowledged message after
    /// a backoff.
    fn fail(&mut self, e: impl std::fmt::Display) {
        let s = &self.stats;
        s.failures.fetch_add(1, Ordering::Relaxed);
        s.note_error(e);
        self.rewind();
        self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
        let delay = backoff(
            self.failures_in_a_row,
            self.cfg.backoff_min,
            self.cfg.backoff_max,
        );
        self.hold_until = Some(Instant::now() + delay);
    }

    /// The link went down or came back (or both, between two looks): a publish the old
    /// server never got has no reply coming, and waiting for its acknowledgement to time
    /// out would hold the cursor while later messages go through on the new connection,
    /// out of order. So go back to the cursor now; the ids make the stream drop what it
    /// already holds. Nothing is sent while the link is down.
    fn rewind_on_link_change(&mut self) {
        if self.in_flight.iter().any(|f| !f.done) {
            self.rewind();
        }
    }

    /// Forgets what is in flight and makes the oldest unacknowledged message the next to
    /// send.
    fn rewind(&mut self) {
        self.stats.rewinds.fetch_add(1, Ordering::Relaxed);
        let abandoned = self.in_flight.iter().filter(|f| !f.done).count() as u64;
        if let (Some(at), true, None) = (self.first_sent, abandoned > 0, self.abandoned) {
            self.abandoned = Some((at, abandoned, self.send_next));
        }
        self.publisher.abandon();
        self.in_flight.clear();
        self.first_sent = None;
        self.send_next = self.buffer.acked();
    }

    /// Sending `index` again: if messages abandoned at a failure are being resent after
    /// the duplicate window, the stream may already hold them and store them twice. Say so.
    fn check_late_resend(&mut self, index: u64) {
        let Some((at, n, end)) = self.abandoned else {
            return;
        };
        if index >= end {
            self.abandoned = None;
        } else if at.elapsed() > self.cfg.duplicate_window {
            self.abandoned = None;
            self.stats.late_resends.fetch_add(n, Ordering::Relaxed);
            tracing::warn!(
                messages = n,
                "resending messages first sent longer ago than the stream's duplicate \
                 window: if the broker stored them before the link broke, they are stored twice"
            );
        } else {
            self.abandoned = None;
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Exponential backoff from `min` to `max`, jittered by ±25 % so that a fleet reconnecting
/// at once does not retry in lockstep.
pub fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let exp = attempt.saturating_sub(1).min(16);
    let base = min.saturating_mul(1 << exp).min(max);
    let jitter = 0.75 + rand::random::<f64>() * 0.5;
    base.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_jittered_and_capped() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let first = backoff(1, min, max);
        assert!(first >= Duration::from_millis(75) && first <= Duration::from_millis(125));
        for attempt in [10, 100, u32::MAX] {
            let d = backoff(attempt, min, max);
            assert!(d >= max.mul_f64(0.75) && d <= max.mul_f64(1.25), "{d:?}");
        }
    }
}
