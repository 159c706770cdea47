//! The fleet's publishers for one phase: the simulator flat out, at a fixed rate, or held
//! by a [`PublishGate`] to a bounded backlog over the consumer's acknowledgements.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use async_nats::jetstream::consumer::{self, PullConsumer};
use fleetpipe_device::simulate::{self, PublishGate, SimConfig, SimStats, SimSummary};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

/// Closed-loop load: most messages the publishers may be ahead of the consumer's acks.
/// Several of the consumer's batches, so it never waits for work.
pub(super) const BACKLOG_BOUND: u64 = 20_000;
/// How often the closed loop reads the consumer's acks and moves the publishers' limit.
const GATE_EVERY: Duration = Duration::from_millis(20);

/// How a phase's publishers are driven.
pub(super) enum Load {
    /// Closed loop: at most [`BACKLOG_BOUND`] messages ahead of the consumer's acks.
    Sustained,
    /// As fast as the broker acknowledges publishes: the backlog grows when the consumer
    /// is slower.
    FlatOut,
    /// At this many messages/s until the token is cancelled.
    Rate(f64, CancellationToken),
}

/// The simulator running for one phase, driven as its [`Load`] says; the closed loop, if
/// any, stops when this is dropped.
pub(super) struct Publishers {
    task: JoinHandle<Result<SimSummary, simulate::SimError>>,
    /// The simulator's latest counters, for the progress line.
    latest: Arc<Mutex<SimStats>>,
    _closed_loop: DropGuard,
}

impl Publishers {
    /// Starts `sim` under `load`; [`Load::Sustained`] closes the loop over `consumer`.
    pub(super) fn start(mut sim: SimConfig, load: &Load, consumer: &PullConsumer) -> Publishers {
        let closed_loop = CancellationToken::new();
        if matches!(load, Load::Sustained) {
            let gate = PublishGate::new(BACKLOG_BOUND);
            sim.gate = Some(gate.clone());
            tokio::spawn(hold_to_backlog(consumer.clone(), gate, closed_loop.clone()));
        }
        let latest: Arc<Mutex<SimStats>> = Arc::default();
        let shared = latest.clone();
        let shutdown = match load {
            Load::Rate(_, stop) => stop.clone(),
            Load::Sustained | Load::FlatOut => CancellationToken::new(),
        };
        let task = tokio::spawn(simulate::run(
            sim,
            shutdown.cancelled_owned(),
            move |s: &SimStats| {
                if let Ok(mut g) = shared.lock() {
                    *g = s.clone();
                }
            },
        ));
        Publishers {
            task,
            latest,
            _closed_loop: closed_loop.drop_guard(),
        }
    }

    /// The simulator's counters as of its last progress report.
    pub(super) fn stats(&self) -> SimStats {
        self.latest.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// Waits for the simulator to stop (its duration is over, or its token cancelled).
    /// Cancel-safe: the task keeps running if this is dropped.
    pub(super) async fn finished(&mut self) -> Result<SimSummary> {
        Ok((&mut self.task).await.context("simulator task")??)
    }
}

/// The closed loop of [`Load::Sustained`]: keeps raising `gate` to the messages the
/// consumer has acknowledged since the phase began plus [`BACKLOG_BOUND`].
async fn hold_to_backlog(
    mut consumer: PullConsumer,
    gate: Arc<PublishGate>,
    stop: CancellationToken,
) {
    let acked = |info: &consumer::Info| {
        info.delivered
            .consumer_sequence
            .saturating_sub(info.num_ack_pending as u64)
    };
    let Ok(start) = consumer.info().await.map(&acked) else {
        // Without the consumer's counts the loop cannot close: let the publishers run.
        gate.raise_to(u64::MAX);
        return;
    };
    let mut ticker = tokio::time::interval(GATE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if let Ok(info) = consumer.info().await {
            gate.raise_to(acked(info).saturating_sub(start) + BACKLOG_BOUND);
        }
    }
}
