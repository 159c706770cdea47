//! The latency probes: readings of a series of their own with known values, timed from
//! publish until the latest state shows them and until their rows are queryable.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, kv};
use fleetpipe_device::simulate::{PayloadForm, SimStats};
use fleetpipe_pipeline::broker;
use fleetpipe_pipeline::config::names;
use fleetpipe_pipeline::state::{self, StateValue};
use fleetpipe_pipeline::Config;
use fleetpipe_proto::{encode_json, encode_line_protocol, encode_plain, Timestamp};
use fleetpipe_store::{Range, Store};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::phases::LatencyRun;

/// The probe readings' series: a device of its own, so the fleet never overwrites it.
const PROBE_DEVICE: &str = "bench-probe";
const PROBE_SENSOR: &str = "latency";

/// How often the probe series is read back from the store.
const HISTORY_POLL: Duration = Duration::from_millis(10);

/// Probes not visible after this long count as not seen.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// The latency probes: a client of its own (connection, store handle, thread and runtime),
/// so the load generator's tasks never delay a probe or the time it is seen.
pub(super) struct Probes {
    pub(super) config: Config,
    pub(super) payload: PayloadForm,
    /// How many probes.
    pub(super) n: usize,
    /// The phase's length, over which the probes are spread (5 to 20 ms apart).
    pub(super) duration: Duration,
}

impl Probes {
    pub(super) async fn on_own_thread(self) -> Result<LatencyRun> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("bench-probes".into())
            .spawn(move || {
                let result = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("cannot start the probes' runtime")
                    .and_then(|rt| rt.block_on(self.run()));
                let _ = tx.send(result);
            })
            .context("cannot start the probes' thread")?;
        rx.await.context("the probes' thread stopped")?
    }

    async fn run(self) -> Result<LatencyRun> {
        let client = broker::connect(
            &self.config.nats.url,
            &self.config,
            "fleetpipe-bench-probes",
        )
        .await?;
        let js = jetstream::new(client);
        let state = js
            .get_key_value(names::STATE_BUCKET)
            .await
            .context("cannot open the latest-state bucket")?;
        let store = fleetpipe_store::open(&self.config.store_url())
            .await
            .context("cannot open the store")?;
        self.probes(&js, &state, store).await
    }

    /// Publishes `n` readings of the probe series, valued 0, 1, 2…, and times when the
    /// latest state shows each (or a newer one) and when each row is queryable.
    async fn probes(
        &self,
        js: &jetstream::Context,
        state: &kv::Store,
        store: Arc<dyn Store>,
    ) -> Result<LatencyRun> {
        let n = self.n;
        let template = self.config.template()?;
        let tags: Vec<(&str, &str)> = template.tag_names().map(|t| (t, "bench")).collect();
        let subject = template.format(PROBE_DEVICE, PROBE_SENSOR, &tags)?;
        // The probe readings' tags as the collector keys them: canonical, sorted by name.
        let mut reading_tags: Vec<(String, String)> = tags
            .iter()
            .map(|&(k, v)| (k.to_string(), v.to_string()))
            .collect();
        reading_tags.sort();
        let every =
            (self.duration / n as u32).clamp(Duration::from_millis(5), Duration::from_millis(20));
        let done = CancellationToken::new();

        let mut watch = state
            .watch(state::key(PROBE_DEVICE, PROBE_SENSOR, &reading_tags))
            .await
            .context("cannot watch the latest-state bucket")?;
        let last = (n - 1) as f64;
        let watch_done = done.clone();
        let watcher = tokio::spawn(async move {
            let mut arrivals: Vec<(Instant, f64)> = Vec::new();
            loop {
                let entry = tokio::select! {
                    _ = watch_done.cancelled() => break,
                    e = watch.next() => e,
                };
                let Some(Ok(entry)) = entry else { break };
                if let Ok(v) = serde_json::from_slice::<StateValue>(&entry.value) {
                    arrivals.push((Instant::now(), v.value));
                    if v.value >= last {
                        break;
                    }
                }
            }
            arrivals
        });

        let since = Timestamp::now().saturating_add_micros(-60_000_000);
        let poll_done = done.clone();
        let poller = tokio::spawn(async move {
            let range = Range {
                from: since,
                to: Timestamp::now().saturating_add_micros(3_600_000_000),
            };
            let mut seen: Vec<Option<Instant>> = vec![None; n];
            let mut left = n;
            while left > 0 && !poll_done.is_cancelled() {
                if let Ok(points) = store
                    .history(PROBE_DEVICE, PROBE_SENSOR, range, n * 2)
                    .await
                {
                    let now = Instant::now();
                    for p in points {
                        let i = p.value as usize;
                        if p.value >= 0.0 && i < n && seen[i].is_none() {
                            seen[i] = Some(now);
                            left -= 1;
                        }
                    }
                }
                tokio::time::sleep(HISTORY_POLL).await;
            }
            seen
        });

        let mut sent: Vec<Option<Instant>> = Vec::with_capacity(n);
        let mut acks = FuturesUnordered::new();
        let mut errors = 0u64;
        let mut ticker = tokio::time::interval(every);
        for i in 0..n {
            ticker.tick().await;
            let body = self.probe_payload(i as f64);
            let at = Instant::now();
            match js.publish(subject.clone(), body.into()).await {
                Ok(ack) => {
                    sent.push(Some(at));
                    acks.push(ack.into_future());
                }
                Err(_) => {
                    errors += 1;
                    sent.push(None);
                }
            }
        }
        let mut acked = 0u64;
        while let Some(r) = acks.next().await {
            match r {
                Ok(_) => acked += 1,
                Err(_) => errors += 1,
            }
        }
        let timeout = done.clone();
        tokio::spawn(async move {
            tokio::time::sleep(PROBE_TIMEOUT).await;
            timeout.cancel();
        });
        let arrivals = watcher.await.context("state watcher")?;
        let rows = poller.await.context("history poller")?;
        done.cancel();

        let mut to_state = Vec::new();
        let mut to_row = Vec::new();
        for (i, at) in sent.iter().enumerate() {
            let Some(at) = *at else { continue };
            if let Some((seen, _)) = arrivals.iter().find(|(_, v)| *v >= i as f64) {
                to_state.push(seen.saturating_duration_since(at));
            }
            if let Some(seen) = rows[i] {
                to_row.push(seen.saturating_duration_since(at));
            }
        }
        Ok(LatencyRun {
            rate: 0.0,
            sim: SimStats::default(),
            probes: n,
            probes_acked: acked,
            probe_errors: errors,
            to_state,
            to_row,
        })
    }

    /// A probe reading in the run's payload form; JSON and line protocol carry the time.
    fn probe_payload(&self, value: f64) -> String {
        let now = Timestamp::now();
        match self.payload {
            PayloadForm::Plain => encode_plain(value),
            PayloadForm::Json => encode_json(value, Some("ms"), Some(now), Some("good")),
            PayloadForm::LineProtocol => {
                let mut body = String::new();
                encode_line_protocol(&mut body, PROBE_SENSOR, &[("value", value)], Some(now));
                body
            }
        }
    }
}
