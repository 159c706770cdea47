//! `/metrics`: the process's counters ([`Stats`]), the collectors' store-write latency,
//! the broker figures and the index sizes, encoded on each scrape in the OpenMetrics text
//! format (which Prometheus reads).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use fleetpipe_pipeline::Stats;
use fleetpipe_proto::Timestamp;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::broker_gauges::BrokerGauges;
use crate::index::{Index, Online};

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Reads the shared state on each scrape; holds no metric state of its own.
#[derive(Debug)]
pub struct FleetpipeCollector {
    pub stats: Arc<Stats>,
    pub broker: Arc<BrokerGauges>,
    pub index: Arc<Index>,
    pub online_window: std::time::Duration,
    pub nats_connected: Option<bool>,
}

/// Encodes every metric as OpenMetrics text.
pub fn encode(collector: FleetpipeCollector) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for FleetpipeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let s = self.stats.snapshot();
        let counters: [(&str, &str, u64); 15] = [
            (
                "fleetpipe_messages",
                "Telemetry messages the collectors received.",
                s.messages,
            ),
            (
                "fleetpipe_messages_redelivered",
                "Messages received more than once.",
                s.redelivered,
            ),
            (
                "fleetpipe_readings_stored",
                "Readings written as new rows.",
                s.readings_stored,
            ),
            (
                "fleetpipe_readings_duplicate",
                "Readings already stored (redeliveries), not written twice.",
                s.readings_duplicate,
            ),
            (
                "fleetpipe_dead_letters",
                "Messages this process routed to the dead-letter stream.",
                s.dead_letters,
            ),
            (
                "fleetpipe_store_refused",
                "Messages whose readings the store refused for good, dead-lettered (code store).",
                s.store_refused,
            ),
            (
                "fleetpipe_max_deliveries",
                "Messages dead-lettered after collector.max_deliver deliveries.",
                s.max_deliveries,
            ),
            (
                "fleetpipe_store_batches",
                "Store transactions committed by the collectors.",
                s.batches,
            ),
            (
                "fleetpipe_store_errors",
                "Failed store writes (retried, or split to find a message the store refuses).",
                s.store_errors,
            ),
            (
                "fleetpipe_nats_errors",
                "Failed broker operations (the messages are redelivered).",
                s.nats_errors,
            ),
            (
                "fleetpipe_aggregator_ticks",
                "Snapshot cycles the aggregator completed.",
                s.aggregator_ticks,
            ),
            (
                "fleetpipe_aggregator_rows",
                "Snapshot rows the aggregator wrote.",
                s.aggregator_rows,
            ),
            (
                "fleetpipe_aggregator_skipped",
                "Ticks skipped because the previous cycle overran.",
                s.aggregator_skipped,
            ),
            (
                "fleetpipe_aggregator_standby",
                "Ticks let pass because another replica holds the lease.",
                s.aggregator_standby,
            ),
            (
                "fleetpipe_aggregator_errors",
                "Failed snapshot writes.",
                s.aggregator_errors,
            ),
        ];
        for (name, help, v) in counters {
            counter(&mut enc, name, help, v)?;
        }

        let h = self.stats.store_write.snapshot();
        let seconds = Unit::Seconds;
        enc.encode_descriptor(
            "fleetpipe_store_write",
            "Duration of the collectors' store writes (one transaction per batch).",
            Some(&seconds),
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &h.buckets, None)?;

        let b = &self.broker;
        if b.polled.load(Relaxed) {
            gauge(
                &mut enc,
                "fleetpipe_consumer_pending",
                "Consumer lag: telemetry messages not yet delivered to the collectors.",
                clamp(b.consumer_pending.load(Relaxed)),
            )?;
            gauge(
                &mut enc,
                "fleetpipe_consumer_ack_pending",
                "Messages delivered to collectors and not yet acknowledged.",
                clamp(b.consumer_ack_pending.load(Relaxed)),
            )?;
            gauge(
                &mut enc,
                "fleetpipe_dead_letter_stream_messages",
                "Messages held in the dead-letter stream.",
                clamp(b.dead_letters.load(Relaxed)),
            )?;
            counter(
                &mut enc,
                "fleetpipe_stream_received",
                "Messages the telemetry stream accepted (its last sequence), from every publisher.",
                b.stream_last_seq.load(Relaxed),
            )?;
        }
        if let Some(connected) = self.nats_connected {
            gauge(
                &mut enc,
                "fleetpipe_nats_connected",
                "1 when this process is connected to NATS.",
                i64::from(connected),
            )?;
        }

        let summary = self
            .index
            .summary(Online::new(Timestamp::now(), self.online_window));
        gauge(
            &mut enc,
            "fleetpipe_devices",
            "Devices in the latest state.",
            clamp(summary.devices),
        )?;
        gauge(
            &mut enc,
            "fleetpipe_devices_online",
            "Devices with a reading within the online window.",
            clamp(summary.online),
        )?;
        gauge(
            &mut enc,
            "fleetpipe_state_keys",
            "Device sensors in the latest state.",
            clamp(self.index.keys() as u64),
        )?;
        gauge(
            &mut enc,
            "fleetpipe_live_clients",
            "Clients connected to the live stream.",
            clamp(self.index.live_clients() as u64),
        )?;
        Ok(())
    }
}
