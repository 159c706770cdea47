//! Follows the device's key in the KV bucket `fleetpipe_config` with what device
//! credentials allow: a core subscription on the key's subject says a put happened, and a
//! direct get reads the newest value with its revision (also at start, after every
//! reconnect and every minute, so nothing missed while offline is missed for good). The
//! notice can come before the stream has stored the put, so after one the key is read
//! again every 100 ms for up to a second until a new revision shows.
//!
//! A value is applied at once to the sensor tasks' settings (their `watch` channels), or
//! refused with its reason: the last good one stays in force. Either way the agent
//! publishes a [`DeviceStatus`] on its status subject, and keeps the last good value in
//! the buffer directory so that a restart without a link starts with it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{Client, StatusCode};
use bytes::Bytes;
use fleetpipe_device::live::{config_subject, direct_get_subject, DeviceStatus, LiveConfig};
use fleetpipe_proto::Timestamp;
use futures::{FutureExt as _, StreamExt as _};
use tokio::sync::watch;

use crate::config::{Config, Effective};

/// Safety net: read the key this often even without a notification.
const POLL: Duration = Duration::from_secs(60);
const GET_TIMEOUT: Duration = Duration::from_secs(3);
/// Wait before reading again after a failed read.
const RETRY: Duration = Duration::from_millis(500);
/// A put's notice (a core message on the key's subject) can arrive before the stream has
/// stored the put, so a read right after it may still find the old value: read again
/// this often, this many times (a second in all), before waiting for the next notice or
/// the poll.
const NOTICE_RETRY: Duration = Duration::from_millis(100);
const NOTICE_RETRIES: u32 = 10;

/// The live configuration's state, for the status file.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LiveState {
    /// KV revision in force; 0 when the file's settings alone apply.
    pub revision: u64,
    pub refused_revision: Option<u64>,
    pub refused_reason: Option<String>,
    /// Revisions applied since start.
    pub applied: u64,
}

/// The newest value of the key: `Ok(None)` when there is none (or it was deleted).
async fn fetch(client: &Client, device: &str) -> Result<Option<(u64, Bytes)>, String> {
    let request = client.request(direct_get_subject(device), Bytes::new());
    let msg = tokio::time::timeout(GET_TIMEOUT, request)
        .await
        .map_err(|_| "direct get timed out".to_string())?
        .map_err(|e| format!("direct get failed: {e}"))?;
    if msg.status == Some(StatusCode::NOT_FOUND) {
        return Ok(None);
    }
    if let Some(status) = msg.status {
        if status != StatusCode::OK {
            return Err(format!(
                "direct get answered {status} {}",
                msg.description.unwrap_or_default()
            ));
        }
    }
    let headers = msg.headers.unwrap_or_default();
    let op = headers.get("KV-Operation").map(|v| v.as_str().to_string());
    if matches!(op.as_deref(), Some("DEL" | "PURGE")) {
        return Ok(None);
    }
    let revision = headers
        .get("Nats-Sequence")
        .and_then(|v| v.as_str().parse::<u64>().ok())
        .ok_or("direct get answer without Nats-Sequence")?;
    Ok(Some((revision, msg.payload)))
}

/// The live-configuration task.
pub struct Live {
    pub cfg: Arc<Config>,
    pub client: Client,
    pub link: watch::Receiver<bool>,
    pub sensors: Vec<watch::Sender<Effective>>,
    pub state: Arc<Mutex<LiveState>>,
    pub status_subject: String,
}

impl Live {
    /// Applies the cached value, if any, before the link is up.
    pub fn apply_cached(&mut self) {
        let Ok(text) = std::fs::read_to_string(self.cfg.live_cache_path()) else {
            return;
        };
        let (rev, body) = text.split_once('\n').unwrap_or(("0", ""));
        let rev = rev.trim_start_matches("# revision ").parse().unwrap_or(0);
        if let Ok(live) = LiveConfig::parse(body) {
            if self.cfg.live_problems(&live).is_empty() {
                self.install(&live, rev);
                tracing::info!(revision = rev, "live configuration from the cache");
            }
        }
    }

    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let device = self.cfg.device.clone();
        let mut sub = loop {
            // Subscribing only queues the SUB; it goes out when the link is up.
            match self.client.subscribe(config_subject(&device)).await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot subscribe to the configuration key");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => return,
                    }
                }
            }
        };
        let mut poll = tokio::time::interval(POLL);
        let mut due = true;
        let mut link_open = true;
        // Reads left to find the put a notice announced (see NOTICE_RETRIES).
        let mut notices = 0;
        let mut retry_in = RETRY;
        loop {
            if *stop.borrow() {
                return;
            }
            if due && *self.link.borrow() {
                due = false;
                match fetch(&self.client, &device).await {
                    Ok(value) => {
                        if self.consider(value).await {
                            notices = 0;
                        } else if notices > 0 {
                            notices -= 1;
                            due = true;
                            retry_in = NOTICE_RETRY;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot read the live configuration");
                        due = true;
                        retry_in = RETRY;
                    }
                }
            }
            let retry = async {
                if due {
                    tokio::time::sleep(retry_in).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                m = sub.next() => {
                    if m.is_none() { return; }
                    due = true;
                    notices = NOTICE_RETRIES;
                    // Several puts in a row: read once, the newest.
                    while let Some(Some(_)) = sub.next().now_or_never() {}
                }
                changed = self.link.changed(), if link_open => {
                    link_open = changed.is_ok();
                    due = true;
                }
                _ = poll.tick() => due = true,
                () = retry => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Applies `value` if it is new and valid, refuses it otherwise. False when it is what
    /// this agent already has (applied or refused, or no value for no value).
    async fn consider(&mut self, value: Option<(u64, Bytes)>) -> bool {
        let current = self
            .state
            .lock()
            .map(|s| (s.revision, s.refused_revision))
            .unwrap_or_default();
        let Some((revision, body)) = value else {
            if current.0 != 0 {
                tracing::info!("live configuration deleted: the file's settings apply");
                self.install(&LiveConfig::default(), 0);
                let _ = std::fs::remove_file(self.cfg.live_cache_path());
                self.report().await;
                return true;
            }
            return false;
        };
        if revision == current.0 || Some(revision) == current.1 {
            return false;
        }
        let text = String::from_utf8_lossy(&body);
        let parsed = LiveConfig::from_toml(&text)
            .map_err(|e| vec![e])
            .and_then(|live| {
                let p = self.cfg.live_problems(&live);
                if p.is_empty() {
                    Ok(live)
                } else {
                    Err(p)
                }
            });
        match parsed {
            Ok(live) => {
                self.install(&live, revision);
                tracing::info!(revision, "live configuration applied");
                let cache = format!("# revision {revision}\n{text}");
                if let Err(e) = write_atomic(&self.cfg.live_cache_path(), cache.as_bytes()) {
                    tracing::warn!(error = %e, "cannot cache the live configuration");
                }
            }
            Err(problems) => {
                let reason = problems.join("; ");
                tracing::warn!(revision, reason = %reason, "live configuration refused; the last good one stays");
                if let Ok(mut s) = self.state.lock() {
                    s.refused_revision = Some(revision);
                    s.refused_reason = Some(reason);
                }
            }
        }
        self.report().await;
        true
    }

    fn install(&mut self, live: &LiveConfig, revision: u64) {
        for (tx, sensor) in self.sensors.iter().zip(&self.cfg.sensors) {
            let e = sensor.effective(live.sensors.get(&sensor.name));
            tx.send_if_modified(|old| {
                let changed = *old != e;
                *old = e;
                changed
            });
        }
        if let Ok(mut s) = self.state.lock() {
            s.revision = revision;
            s.refused_revision = None;
            s.refused_reason = None;
            s.applied += 1;
        }
    }

    /// Publishes the state on the status subject (a core publish: the telemetry stream
    /// captures it, and the collectors store nothing for it).
    async fn report(&self) {
        let s = self.state.lock().map(|s| s.clone()).unwrap_or_default();
        let status = DeviceStatus {
            device: self.cfg.device.clone(),
            config_revision: s.revision,
            refused_revision: s.refused_revision,
            refused_reason: s.refused_reason,
            at: Timestamp::now().to_rfc3339(),
        };
        if let Ok(body) = serde_json::to_vec(&status) {
            if let Err(e) = self
                .client
                .publish(self.status_subject.clone(), body.into())
                .await
            {
                tracing::debug!(error = %e, "cannot publish the status");
            }
        }
    }
}

/// Writes `path` through a temporary file, fsynced and renamed.
pub fn write_atomic(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
