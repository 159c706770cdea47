//! Query latency while the pipeline ingests flat out: one series is seeded with 30 days of
//! history (a reading a minute, the last hour a reading a second), then, for the whole
//! pipeline phase, its last hour of raw readings and its 30 days of hourly rollups (as the
//! series endpoint reads ranges longer than a week) are read through the store, as the API's series endpoint does, four times a second (a few
//! dashboards refreshing: more would measure the queries' own load on the two cores).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fleetpipe_proto::{Reading, Timestamp};
use fleetpipe_store::{Range, Record, Resolution, SeriesKey, Store};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::report::Percentiles;

/// The seeded series; no simulated vehicle has this id.
const DEVICE: &str = "bench-query";
const SENSOR: &str = "v";
const MINUTE: i64 = 60_000_000;
const HOUR: i64 = 60 * MINUTE;
const DAYS: i64 = 30;
/// How often a round of queries starts.
const EVERY: Duration = Duration::from_millis(250);

/// Sequences far above any the bench's stream reaches.
const SEQ_BASE: u64 = 1 << 48;

/// Writes the series' history through a store handle of its own, dropped before the
/// pipeline starts (a handle that writes runs the embedded store's sealer, which would
/// take part of the collector's work into the bench process); returns "now" as seeded.
pub(super) async fn seed(url: &str) -> Result<i64> {
    let store = fleetpipe_store::open(url)
        .await
        .context("cannot open the store to seed the query series")?;
    let now = Timestamp::now().as_micros();
    let start = now - DAYS * 24 * HOUR;
    let record = |i: u64, at: i64| Record {
        seq: SEQ_BASE + i,
        reading: Reading {
            device: DEVICE.into(),
            sensor: SENSOR.into(),
            value: (i % 1000) as f64 * 0.5,
            ts: Timestamp::from_micros(at),
            unit: None,
            quality: None,
            tags: Default::default(),
        },
    };
    let minutes = (DAYS * 24 * 60 - 60) as u64;
    let mut batch = Vec::with_capacity(10_000);
    let times = (0..minutes)
        .map(|m| start + m as i64 * MINUTE)
        .chain((0..3600).map(|s| now - HOUR + s * 1_000_000));
    for (i, at) in times.enumerate() {
        batch.push(record(i as u64, at));
        if batch.len() == 10_000 {
            store
                .write_readings(&batch)
                .await
                .context("seeding the query series")?;
            batch.clear();
        }
    }
    store
        .write_readings(&batch)
        .await
        .context("seeding the query series")?;
    store.compact().await.context("seeding the query series")?;
    Ok(now)
}

/// Query latencies measured during the pipeline phase.
#[derive(Debug, Serialize)]
pub(super) struct QueryFigures {
    /// The last hour of raw readings (3,600 points).
    pub(super) raw_1h_ms: Percentiles,
    pub(super) raw_points: usize,
    /// 30 days of per-minute rollups (43,200 rows).
    pub(super) rollups_30d_ms: Percentiles,
    pub(super) rollup_rows: usize,
    pub(super) errors: u64,
}

/// Queries until `stop` is cancelled.
pub(super) fn spawn(
    store: Arc<dyn Store>,
    now: i64,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<QueryFigures> {
    tokio::spawn(async move {
        let key = SeriesKey::new(DEVICE, SENSOR);
        let hour = Range {
            from: Timestamp::from_micros(now - HOUR),
            to: Timestamp::from_micros(now),
        };
        let month = Range {
            from: Timestamp::from_micros(now - DAYS * 24 * HOUR),
            to: Timestamp::from_micros(now),
        };
        let (mut raw, mut rollups) = (Vec::new(), Vec::new());
        let (mut raw_points, mut rollup_rows, mut errors) = (0, 0, 0);
        let mut ticker = tokio::time::interval(EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.is_cancelled() {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let t = Instant::now();
            match store.series_history(&key, hour, 100_000).await {
                Ok(points) => {
                    raw.push(t.elapsed());
                    raw_points = points.len();
                }
                Err(_) => errors += 1,
            }
            let t = Instant::now();
            match store.series_rollups_at(&key, month, Resolution::Hour).await {
                Ok(rows) => {
                    rollups.push(t.elapsed());
                    rollup_rows = rows.len();
                }
                Err(_) => errors += 1,
            }
        }
        QueryFigures {
            raw_1h_ms: Percentiles::of(&raw),
            raw_points,
            rollups_30d_ms: Percentiles::of(&rollups),
            rollup_rows,
            errors,
        }
    })
}
