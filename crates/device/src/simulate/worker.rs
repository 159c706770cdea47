//! One connection's task: walks its share of the fleet in schedule order and publishes
//! through JetStream, never more than `max_in_flight` messages unacknowledged.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::{self, publish::PublishAck};
use bytes::Bytes;
use fleetpipe_proto::{encode_json, encode_line_protocol, encode_plain, Timestamp};
use tokio::sync::watch;
use tokio::time::Instant;

#[cfg(doc)]
use super::schedule::share_of_fleet;
use super::schedule::{messages_per_tick, Device, Family, Sample, MAX_SAMPLES, TICK};
use super::{wall_time, PayloadForm, Shared, SimConfig, SimError};
use crate::publish::{Outgoing, Publisher};

/// Failed publishes, before any was acknowledged, after which the run gives up: the setup
/// is wrong (usually no stream), and counting millions of errors would help nobody.
const FAIL_FAST_AFTER: u64 = 16;

/// Longest schedule stretch: with an absurdly low rate cap a tick lasts at most ~28 h.
const MAX_STRETCH: f64 = 1e6;
/// How often a publisher held by a [`super::PublishGate`] looks at its limit again without
/// being woken (a safety net; raising the gate wakes it).
const GATE_RECHECK: Duration = Duration::from_millis(50);

/// Flat out, a line-protocol device's clock starts this long before the run (see
/// [`Plan::tick_time`]).
const FLAT_OUT_HISTORY_MICROS: i64 = 24 * 3600 * 1_000_000;

/// Everything the workers share that does not change during a run.
pub(super) struct Plan {
    /// When the run started; round 0 of the schedule begins here.
    pub(super) start: Instant,
    /// The wall-clock time at `start`, for device timestamps.
    wall_start: Timestamp,
    /// Flat-out line protocol: the time of tick 0 (see [`Plan::tick_time`]).
    clock_origin: Timestamp,
    /// The schedule's tick: 100 ms, stretched evenly when a rate cap is below the natural
    /// rate (never in flat-out mode, where the pacer alone applies the cap).
    tick: Duration,
    cfg: SimConfig,
    id_width: usize,
    tag_names: Vec<String>,
    /// A subject the fleet publishes on, for error messages.
    example_subject: String,
}

impl Plan {
    pub(super) fn new(cfg: &SimConfig) -> Result<Plan, SimError> {
        // With several ticks per message a device always has something due (torque samples
        // every other tick), so it sends one message per round of ticks.
        let per_tick = match cfg.ticks_per_message {
            0 | 1 => messages_per_tick(cfg.payload),
            n => 1.0 / n as f64,
        };
        let natural = cfg.devices as f64 * per_tick / TICK.as_secs_f64();
        let stretch = match cfg.rate {
            Some(cap) if !cfg.flat_out => (natural / cap).clamp(1.0, MAX_STRETCH),
            _ => 1.0,
        };
        let mut plan = Plan {
            start: Instant::now(),
            wall_start: Timestamp::now(),
            clock_origin: Timestamp::now(),
            tick: TICK.mul_f64(stretch),
            cfg: cfg.clone(),
            id_width: super::id_width(cfg.devices),
            tag_names: cfg.template.tag_names().map(str::to_string).collect(),
            example_subject: String::new(),
        };
        let sensor = match cfg.payload {
            PayloadForm::LineProtocol => "lp",
            _ => "speed",
        };
        plan.example_subject = plan.subject(0, &plan.device_id(0), sensor)?;
        Ok(plan)
    }

    /// Restarts the run's clock: round 0 begins now.
    pub(super) fn start_clock(&mut self) {
        self.start = Instant::now();
        self.wall_start = Timestamp::now();
        self.clock_origin = self.cfg.clock_from.unwrap_or_else(|| {
            self.wall_start
                .saturating_add_micros(-FLAT_OUT_HISTORY_MICROS)
        });
    }

    /// The device timestamp of `tick` of a device at `phase` in a flat-out line-protocol
    /// run, or `None` in every other run (they stamp readings with the time they are sent).
    ///
    /// Flat out, rounds follow one another faster than real time, so stamping a message's
    /// last tick with the time it is sent would make each message cover again most of the
    /// span the device's previous one did, which no device does (and which makes every
    /// message late data for the store). So the ticks keep their own clock, 100 ms apart from
    /// [`SimConfig::clock_from`] or a day before the run, as an edge site replaying its
    /// buffer would send them; it never runs ahead of the wall clock (once there, messages
    /// overlap again).
    fn tick_time(&self, tick: u64, phase: f64, now: Timestamp) -> Option<Timestamp> {
        if !self.cfg.flat_out || self.cfg.payload != PayloadForm::LineProtocol {
            return None;
        }
        let micros = (tick as f64 + phase) * self.tick.as_secs_f64() * 1e6;
        let at = self.clock_origin.saturating_add_micros(micros as i64);
        Some(at.min(now))
    }

    fn device_id(&self, index: usize) -> String {
        format!("{}{index:0w$}", self.cfg.device_prefix, w = self.id_width)
    }

    /// The subject device `index` publishes `sensor` on. Extra template placeholders get
    /// `<name>-<1..4>`, fixed per device, so a hierarchy has a few sites, lines and so on.
    fn subject(&self, index: usize, id: &str, sensor: &str) -> Result<String, SimError> {
        let formatted = if self.tag_names.is_empty() {
            self.cfg.template.format(id, sensor, &[])
        } else {
            let values: Vec<String> = self
                .tag_names
                .iter()
                .map(|name| format!("{name}-{}", index % 4 + 1))
                .collect();
            let tags: Vec<(&str, &str)> = self
                .tag_names
                .iter()
                .map(String::as_str)
                .zip(values.iter().map(String::as_str))
                .collect();
            self.cfg.template.format(id, sensor, &tags)
        };
        formatted.map_err(|e| SimError::Config(vec![e.to_string()]))
    }
}

/// Whether to go on publishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// One connection's publisher.
pub(super) struct Worker {
    /// This connection's share of the fleet, sorted by phase.
    devices: Vec<Device>,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    /// The shared publishing core: acknowledgements still to come, at most `max_in_flight`.
    publisher: Publisher,
    pacer: Option<Pacer>,
    samples: Vec<Sample>,
}

impl Worker {
    /// A worker publishing for `devices` (from [`share_of_fleet`]) over `js`.
    pub(super) fn new(
        js: jetstream::Context,
        devices: Vec<Device>,
        plan: Arc<Plan>,
        shared: Arc<Shared>,
    ) -> Worker {
        let pacer = plan.cfg.rate.map(|cap| {
            let share = devices.len() as f64 / plan.cfg.devices as f64;
            Pacer::new(cap * share, plan.start)
        });
        Worker {
            publisher: Publisher::new(js, plan.cfg.max_in_flight),
            devices,
            stop: shared.stop.subscribe(),
            plan,
            shared,
            pacer,
            samples: Vec::with_capacity(MAX_SAMPLES),
        }
    }

    /// Publishes until told to stop or the message budget is spent, then waits for the
    /// outstanding acknowledgements.
    pub(super) async fn run(mut self) -> Result<(), SimError> {
        let mut devices = std::mem::take(&mut self.devices);
        let result = self.publish(&mut devices).await;
        // Also after an error: what was published deserves its acknowledgement counted.
        self.drain().await;
        result
    }

    /// Walks the devices in phase order, round after round; a round is one tick, or
    /// `ticks_per_message` ticks in line protocol. When the broker is slow the walk falls
    /// behind; it catches up by at most one round, then simply runs slower. Flat out, the
    /// walk does not wait for the clock at all: only the ack window and the pacer hold it.
    async fn publish(&mut self, devices: &mut [Device]) -> Result<(), SimError> {
        let per_message = self.plan.cfg.ticks_per_message.max(1) as u64;
        // Validated to at most MAX_TICKS_PER_MESSAGE, so it fits.
        let round_len = self.plan.tick * u32::try_from(per_message).unwrap_or(u32::MAX);
        let flat_out = self.plan.cfg.flat_out;
        let mut round_start = self.plan.start;
        for round in 0u64.. {
            let ticks = round * per_message..(round + 1) * per_message;
            for device in devices.iter_mut() {
                if !ticks.clone().any(|tick| device.any_due(tick)) {
                    continue;
                }
                let flow = if flat_out {
                    if self.stopping() {
                        Flow::Stop
                    } else {
                        Flow::Continue
                    }
                } else {
                    self.wait_until(round_start + round_len.mul_f64(device.phase))
                        .await?
                };
                if flow == Flow::Stop
                    || self.tick_device(device, ticks.clone()).await? == Flow::Stop
                {
                    return Ok(());
                }
            }
            let now = Instant::now();
            round_start = (round_start + round_len).max(now.checked_sub(round_len).unwrap_or(now));
        }
        Ok(())
    }

    /// Samples one device over `ticks` and publishes what is due, in the configured
    /// payload form (plain and JSON always cover a single tick).
    async fn tick_device(
        &mut self,
        device: &mut Device,
        ticks: std::ops::Range<u64>,
    ) -> Result<Flow, SimError> {
        let id = self.plan.device_id(device.index);
        let ts = wall_time(self.plan.start, self.plan.wall_start, Instant::now());
        match self.plan.cfg.payload {
            PayloadForm::Plain | PayloadForm::Json => {
                let tick = ticks.start;
                let t = (tick as f64 + device.phase) * self.plan.tick.as_secs_f64();
                device.sample(tick, t, &mut self.samples);
                self.send_each(device, &id, ts).await
            }
            PayloadForm::LineProtocol => {
                let last = ticks.end.saturating_sub(1);
                let ts = match self.plan.tick_time(last, device.phase, ts) {
                    Some(at) => {
                        self.shared
                            .clock_end
                            .fetch_max(at.as_micros(), Ordering::Relaxed);
                        at
                    }
                    None => ts,
                };
                self.send_batch(device, &id, ticks, ts).await
            }
        }
    }

    /// One message per reading on the reading's own subject, as the reference design's
    /// sensors do.
    async fn send_each(
        &mut self,
        device: &mut Device,
        id: &str,
        ts: Timestamp,
    ) -> Result<Flow, SimError> {
        for i in 0..self.samples.len() {
            let s = self.samples[i];
            let subject = self.plan.subject(device.index, id, s.sensor)?;
            let body = match self.plan.cfg.payload {
                PayloadForm::Json => encode_json(s.value, Some(s.unit), Some(ts), Some("good")),
                _ => encode_plain(s.value),
            };
            let msg_id = self.msg_id(device, id, s.sensor);
            if self.send(subject, body, msg_id, 1).await? == Flow::Stop {
                return Ok(Flow::Stop);
            }
        }
        Ok(Flow::Continue)
    }

    /// One line-protocol message with a line per family and tick (`gps lat=…,lon=…`), on
    /// the device's `lp` subject; the decoder names the readings `gps.lat`, `speed`… The
    /// last tick carries `ts`; earlier ones are a tick apart before it, as if buffered.
    async fn send_batch(
        &mut self,
        device: &mut Device,
        id: &str,
        ticks: std::ops::Range<u64>,
        ts: Timestamp,
    ) -> Result<Flow, SimError> {
        let tick_secs = self.plan.tick.as_secs_f64();
        let tick_micros = i64::try_from(self.plan.tick.as_micros()).unwrap_or(i64::MAX);
        let last = ticks.end.saturating_sub(1);
        let mut body = String::with_capacity(160 * (ticks.end - ticks.start) as usize);
        let mut readings = 0;
        for tick in ticks {
            let t = (tick as f64 + device.phase) * tick_secs;
            device.sample(tick, t, &mut self.samples);
            let back = i64::try_from(last - tick).unwrap_or(i64::MAX);
            let line_ts =
                ts.saturating_add_micros(back.saturating_mul(tick_micros).saturating_neg());
            for family in Family::ALL {
                let fields: Vec<(&str, f64)> = self
                    .samples
                    .iter()
                    .filter(|s| s.family == family)
                    .map(|s| (s.field, s.value))
                    .collect();
                if !fields.is_empty() {
                    encode_line_protocol(&mut body, family.measurement(), &fields, Some(line_ts));
                }
            }
            readings += self.samples.len() as u64;
        }
        let subject = self.plan.subject(device.index, id, "lp")?;
        let msg_id = self.msg_id(device, id, "lp");
        self.send(subject, body, msg_id, readings).await
    }

    /// The next `Nats-Msg-Id` of `device` when ids are on: unique per device and run.
    fn msg_id(&self, device: &mut Device, id: &str, sensor: &str) -> Option<String> {
        let seq = device.seq;
        device.seq += 1;
        self.plan
            .cfg
            .msg_ids
            .then(|| format!("{id}-{sensor}-{seq}"))
    }

    /// Publishes one message once the window and the rate cap allow it.
    async fn send(
        &mut self,
        subject: String,
        body: String,
        msg_id: Option<String>,
        readings: u64,
    ) -> Result<Flow, SimError> {
        // The flow control: never more than `max_in_flight` unacknowledged messages, so a
        // slow broker slows the simulator down instead of growing a queue.
        while !self.publisher.has_room() {
            tokio::select! {
                Some(acked) = self.publisher.next_ack() => self.record(acked.result)?,
                _ = self.stop.changed() => {}
            }
            if self.stopping() {
                return Ok(Flow::Stop);
            }
        }
        if self.wait_for_gate().await? == Flow::Stop {
            return Ok(Flow::Stop);
        }
        if let Some(at) = self.pacer.as_mut().map(|p| p.reserve(Instant::now())) {
            if self.wait_until(at).await? == Flow::Stop {
                return Ok(Flow::Stop);
            }
        }
        let counters = &self.shared.counters;
        if let Some(max) = self.plan.cfg.max_messages {
            if counters.claimed.fetch_add(1, Ordering::Relaxed) >= max {
                self.shared.request_stop();
                return Ok(Flow::Stop);
            }
        }

        let msg = Outgoing {
            subject,
            payload: Bytes::from(body),
            msg_id,
            readings,
        };
        match self.publisher.publish(0, msg).await {
            Ok(()) => {
                counters.published.fetch_add(1, Ordering::Relaxed);
                counters.readings.fetch_add(readings, Ordering::Relaxed);
            }
            Err(e) => {
                counters.publish_errors.fetch_add(1, Ordering::Relaxed);
                self.failed(e)?;
            }
        }
        // Poll what has arrived, so counters stay current and the new ack's timeout starts.
        while let Some(acked) = self.publisher.ready_ack() {
            self.record(acked.result)?;
        }
        Ok(Flow::Continue)
    }

    /// With a [`PublishGate`], waits until the fleet's published messages are below its
    /// limit, collecting acknowledgements meanwhile; `Stop` if told to stop.
    async fn wait_for_gate(&mut self) -> Result<Flow, SimError> {
        let Some(gate) = self.plan.cfg.gate.clone() else {
            return Ok(Flow::Continue);
        };
        loop {
            if self.stopping() {
                return Ok(Flow::Stop);
            }
            // The budget spent: stop here. Otherwise, with the gate at the budget, every
            // worker could wait at the gate for a raise that never comes, none of them
            // claiming the message past the budget that stops the run.
            if let Some(max) = self.plan.cfg.max_messages {
                if self.shared.counters.claimed.load(Ordering::Relaxed) >= max {
                    self.shared.request_stop();
                    return Ok(Flow::Stop);
                }
            }
            // Created before the check, so a raise between the check and the wait still
            // wakes it (`notify_waiters` reaches every `Notified` that exists).
            let raised = gate.raised.notified();
            if self.shared.counters.published.load(Ordering::Relaxed) < gate.limit() {
                return Ok(Flow::Continue);
            }
            tokio::select! {
                () = raised => {}
                () = tokio::time::sleep(GATE_RECHECK) => {}
                Some(acked) = self.publisher.next_ack(), if self.publisher.in_flight() > 0 => {
                    self.record(acked.result)?;
                }
                _ = self.stop.changed() => {}
            }
        }
    }

    /// Waits until `at`, collecting acknowledgements meanwhile; `Stop` if told to stop.
    async fn wait_until(&mut self, at: Instant) -> Result<Flow, SimError> {
        loop {
            if self.stopping() {
                return Ok(Flow::Stop);
            }
            if Instant::now() >= at {
                return Ok(Flow::Continue);
            }
            tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                Some(acked) = self.publisher.next_ack(), if self.publisher.in_flight() > 0 => {
                    self.record(acked.result)?;
                }
                _ = self.stop.changed() => {}
            }
        }
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Counts one acknowledgement.
    fn record(&mut self, result: Result<PublishAck, PublishError>) -> Result<(), SimError> {
        let counters = &self.shared.counters;
        match result {
            Ok(ack) => {
                counters.acknowledged.fetch_add(1, Ordering::Relaxed);
                if ack.duplicate {
                    counters.duplicates.fetch_add(1, Ordering::Relaxed);
                }
                if !counters.any_acked.load(Ordering::Relaxed) {
                    counters.any_acked.store(true, Ordering::Relaxed);
                }
                Ok(())
            }
            Err(e) => {
                counters.ack_errors.fetch_add(1, Ordering::Relaxed);
                self.failed(e)
            }
        }
    }

    /// Notes a failed publish; gives up when nothing has worked yet and the failure is not
    /// the kind a reconnect cures.
    fn failed(&self, e: PublishError) -> Result<(), SimError> {
        let counters = &self.shared.counters;
        if let Ok(mut last) = counters.last_error.lock() {
            if last.is_none() {
                tracing::warn!(error = %e, "publish failed");
            } else {
                tracing::debug!(error = %e, "publish failed");
            }
            *last = Some(e.to_string());
        }
        let transient = matches!(
            e.kind(),
            PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe
        );
        if transient || counters.any_acked.load(Ordering::Relaxed) {
            return Ok(());
        }
        if counters.early_failures.fetch_add(1, Ordering::Relaxed) + 1 < FAIL_FAST_AFTER {
            return Ok(());
        }
        Err(match e.kind() {
            PublishErrorKind::StreamNotFound => SimError::NoStream {
                subject: self.plan.example_subject.clone(),
                filter: self.plan.cfg.template.stream_filter(),
            },
            _ => SimError::Publish { source: e },
        })
    }

    /// Waits for every outstanding acknowledgement. Each is bounded by the ack timeout;
    /// the extra deadline only guards against a lost wake-up.
    async fn drain(&mut self) {
        // ack_timeout is validated to at most an hour, so this cannot overflow.
        let deadline = Instant::now() + self.plan.cfg.ack_timeout + Duration::from_secs(1);
        while self.publisher.in_flight() > 0 {
            match tokio::time::timeout_at(deadline, self.publisher.next_ack()).await {
                // Already stopping: a failure here is counted, not acted on.
                Ok(Some(acked)) => drop(self.record(acked.result)),
                Ok(None) => break,
                Err(_) => {
                    let left = self.publisher.abandon() as u64;
                    let counters = &self.shared.counters;
                    counters.ack_errors.fetch_add(left, Ordering::Relaxed);
                    if let Ok(mut last) = counters.last_error.lock() {
                        *last = Some(format!("{left} acknowledgements did not arrive in time"));
                    }
                }
            }
        }
    }
}

/// Spaces messages to a rate, allowing a short burst (the generic cell rate algorithm).
#[derive(Debug)]
struct Pacer {
    interval: Duration,
    tolerance: Duration,
    /// When the next message is due if sent at exactly the rate.
    tat: Instant,
}

impl Pacer {
    fn new(rate: f64, start: Instant) -> Pacer {
        // An interval above a day means a rate nobody asks for; cap it to keep the
        // instant arithmetic far from overflowing.
        let interval = Duration::try_from_secs_f64(1.0 / rate)
            .unwrap_or(Duration::MAX)
            .min(Duration::from_secs(86_400));
        Pacer {
            interval,
            tolerance: interval.max(Duration::from_millis(50)),
            tat: start,
        }
    }

    /// Books the next message and says when it may be sent.
    fn reserve(&mut self, now: Instant) -> Instant {
        let tat = self.tat.max(now);
        let at = tat.checked_sub(self.tolerance).map_or(now, |t| t.max(now));
        self.tat = tat + self.interval;
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_holds_the_rate_after_a_short_burst() {
        let start = Instant::now();
        let mut pacer = Pacer::new(100.0, start);
        let times: Vec<Instant> = (0..200).map(|_| pacer.reserve(start)).collect();
        // 50 ms of burst at 10 ms per message, then one every 10 ms.
        assert!(times[..5].iter().all(|&t| t == start));
        let last = times[199].duration_since(start);
        assert!(
            last >= Duration::from_millis(1900) && last <= Duration::from_millis(2000),
            "{last:?}"
        );
    }

    #[test]
    fn pacer_does_not_bank_idle_time() {
        let start = Instant::now();
        let mut pacer = Pacer::new(10.0, start);
        let later = start + Duration::from_secs(60);
        let burst = (0..10).filter(|_| pacer.reserve(later) == later).count();
        assert!(
            burst <= 2,
            "an idle minute must not allow a burst of {burst}"
        );
    }

    #[test]
    fn plan_stretches_the_schedule_for_a_rate_cap() {
        let cfg = SimConfig {
            devices: 1000,
            rate: Some(920.0),
            ..SimConfig::default()
        };
        let plan = Plan::new(&cfg).unwrap();
        // 1000 devices publish 9200 messages/s at natural rates: a tenth of that stretches
        // the tick tenfold.
        assert!(
            (plan.tick.as_secs_f64() - 1.0).abs() < 1e-6,
            "{:?}",
            plan.tick
        );
        assert_eq!(plan.example_subject, "vehicle.v00000.speed");
    }

    #[test]
    fn flat_out_leaves_the_cap_to_the_pacer_and_batches_lengthen_the_round() {
        let flat = SimConfig {
            devices: 1000,
            rate: Some(920.0),
            flat_out: true,
            ..SimConfig::default()
        };
        assert_eq!(Plan::new(&flat).unwrap().tick, TICK);
        // 1000 devices sending one 10-tick message a second: 1000 messages/s, so a cap of
        // 100/s stretches the tick tenfold.
        let batched = SimConfig {
            devices: 1000,
            payload: PayloadForm::LineProtocol,
            ticks_per_message: 10,
            rate: Some(100.0),
            ..SimConfig::default()
        };
        let plan = Plan::new(&batched).unwrap();
        assert!(
            (plan.tick.as_secs_f64() - 1.0).abs() < 1e-6,
            "{:?}",
            plan.tick
        );
    }

    #[test]
    fn flat_out_line_protocol_keeps_its_own_clock() {
        let lp = SimConfig {
            payload: PayloadForm::LineProtocol,
            ticks_per_message: 50,
            flat_out: true,
            ..SimConfig::default()
        };
        let mut plan = Plan::new(&lp).unwrap();
        plan.start_clock();
        let now = plan.wall_start.saturating_add_micros(1_000);
        let day_ago = plan.wall_start.as_micros() - FLAT_OUT_HISTORY_MICROS;
        let at = |tick| plan.tick_time(tick, 0.5, now).unwrap().as_micros();
        assert_eq!(at(0), day_ago + 50_000);
        // Consecutive messages of a device (ticks 0..50, 50..100) do not overlap.
        assert_eq!(at(99) - at(49), 50 * 100_000);
        // Never ahead of the wall clock.
        assert_eq!(at(10_000_000), now.as_micros());
        let scheduled = Plan::new(&SimConfig {
            flat_out: false,
            ..lp.clone()
        })
        .unwrap();
        assert_eq!(scheduled.tick_time(49, 0.5, now), None);
        let plain = Plan::new(&SimConfig {
            flat_out: true,
            ..SimConfig::default()
        })
        .unwrap();
        assert_eq!(plain.tick_time(0, 0.5, now), None);
        // A second run goes on where the first one's clock ended.
        let mut next = Plan::new(&SimConfig {
            clock_from: Some(Timestamp::from_micros(at(99))),
            ..lp
        })
        .unwrap();
        next.start_clock();
        assert_eq!(
            next.tick_time(0, 0.5, now).unwrap().as_micros(),
            at(99) + 50_000
        );
    }

    #[test]
    fn template_tags_get_values() {
        let cfg = SimConfig {
            template: fleetpipe_proto::SubjectTemplate::parse("acme.{site}.{device}.{sensor}")
                .unwrap(),
            ..SimConfig::default()
        };
        let plan = Plan::new(&cfg).unwrap();
        assert_eq!(
            plan.subject(5, "v00005", "gps.lat").unwrap(),
            "acme.site-2.v00005.gps.lat"
        );
    }
}
