//! The status file: the link, the buffer and the counters, rewritten atomically every
//! second in the buffer directory; `fleetpipe-agent status` prints it.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use fleetpipe_device::publish::spool::SpoolStats;
use serde::{Deserialize, Serialize};

use crate::link::{unix_now, LinkStats};
use crate::live::LiveState;
use crate::sensors::SensorStats;

/// What the status file holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub device: String,
    pub pid: u32,
    /// Unix seconds when the file was written.
    pub updated: u64,
    pub link: LinkStatus,
    pub buffer: BufferStatus,
    pub counters: Counters,
    pub config: ConfigStatus,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LinkStatus {
    pub connected: bool,
    pub server: Option<String>,
    /// Servers the cluster told the agent about.
    pub known_servers: Vec<String>,
    pub connects: u64,
    pub disconnects: u64,
    /// Unix seconds of the last connect or disconnect.
    pub since: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BufferStatus {
    /// Messages waiting for an acknowledgement.
    pub pending_messages: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    /// Dropped unsent because the buffer was full (over the buffer directory's life).
    pub dropped_messages: u64,
    pub dropped_readings: u64,
    pub errors: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counters {
    pub samples: u64,
    pub readings_emitted: u64,
    pub read_errors: u64,
    pub published: u64,
    pub acknowledged: u64,
    pub readings_acknowledged: u64,
    pub duplicates: u64,
    pub failures: u64,
    pub rewinds: u64,
    pub late_resends: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConfigStatus {
    pub revision: u64,
    pub refused_revision: Option<u64>,
    pub refused_reason: Option<String>,
}

/// The shared statistics the status is made of.
pub struct Sources {
    pub device: String,
    pub max_bytes: u64,
    pub link: Arc<LinkStats>,
    pub spool: Arc<SpoolStats>,
    pub sensors: Arc<SensorStats>,
    pub live: Arc<Mutex<LiveState>>,
}

impl Sources {
    pub fn snapshot(&self) -> Status {
        let r = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let (sp, l, se) = (&self.spool, &self.link, &self.sensors);
        let live = self.live.lock().map(|s| s.clone()).unwrap_or_default();
        Status {
            device: self.device.clone(),
            pid: std::process::id(),
            updated: unix_now(),
            link: LinkStatus {
                connected: sp.link_up.load(Ordering::Relaxed),
                server: l.server.lock().ok().and_then(|s| s.clone()),
                known_servers: l
                    .known_servers
                    .lock()
                    .map(|k| k.clone())
                    .unwrap_or_default(),
                connects: r(&l.connects),
                disconnects: r(&l.disconnects),
                since: r(&l.since),
            },
            buffer: BufferStatus {
                pending_messages: r(&sp.buffered),
                bytes: r(&sp.buffer_bytes),
                max_bytes: self.max_bytes,
                dropped_messages: r(&sp.dropped_messages),
                dropped_readings: r(&sp.dropped_readings),
                errors: r(&sp.buffer_errors),
            },
            counters: Counters {
                samples: r(&se.samples),
                readings_emitted: r(&se.emitted),
                read_errors: r(&se.read_errors),
                published: r(&sp.published),
                acknowledged: r(&sp.acknowledged),
                readings_acknowledged: r(&sp.readings_acknowledged),
                duplicates: r(&sp.duplicates),
                failures: r(&sp.failures),
                rewinds: r(&sp.rewinds),
                late_resends: r(&sp.late_resends),
                last_error: sp.last_error.lock().ok().and_then(|e| e.clone()),
            },
            config: ConfigStatus {
                revision: live.revision,
                refused_revision: live.refused_revision,
                refused_reason: live.refused_reason,
            },
        }
    }

    /// Writes the status file.
    pub fn write(&self, path: &Path) {
        match serde_json::to_vec_pretty(&self.snapshot()) {
            Ok(body) => {
                if let Err(e) = write_file(path, &body) {
                    tracing::debug!(error = %e, "cannot write the status file");
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot encode the status"),
        }
    }
}

/// Temporary file then rename: a reader sees the old file or the new one. Not fsynced:
/// it is rewritten every second, and a power cut losing it loses nothing.
fn write_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

/// Reads the status file.
pub fn read(path: &Path) -> Result<Status, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read {}: {e} (is the agent running?)",
            path.display()
        )
    })?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The human form of `fleetpipe-agent status`.
pub fn render(s: &Status) -> String {
    let age = unix_now().saturating_sub(s.updated);
    let stale = if age > 5 {
        format!("  (written {age} s ago: is the agent running?)")
    } else {
        String::new()
    };
    let link = if s.link.connected {
        format!("connected to {}", s.link.server.as_deref().unwrap_or("?"))
    } else {
        "DISCONNECTED".to_string()
    };
    let c = &s.counters;
    let b = &s.buffer;
    let mut out = format!(
        "device     {}  (pid {}){stale}\n\
         link       {link}, {} connects, {} disconnects\n\
         servers    {}\n\
         buffer     {} messages waiting, {} of {} bytes; dropped when full: {} messages, {} readings\n\
         readings   {} sampled, {} emitted, {} acknowledged ({} messages, {} duplicates)\n\
         failures   {} publish failures, {} rewinds, {} read errors, {} buffer errors, {} late resends\n\
         config     revision {}",
        s.device,
        s.pid,
        s.link.connects,
        s.link.disconnects,
        if s.link.known_servers.is_empty() { "-".to_string() } else { s.link.known_servers.join(", ") },
        b.pending_messages,
        b.bytes,
        b.max_bytes,
        b.dropped_messages,
        b.dropped_readings,
        c.samples,
        c.readings_emitted,
        c.readings_acknowledged,
        c.acknowledged,
        c.duplicates,
        c.failures,
        c.rewinds,
        c.read_errors,
        b.errors,
        c.late_resends,
        s.config.revision,
    );
    if let (Some(rev), Some(reason)) = (s.config.refused_revision, &s.config.refused_reason) {
        out.push_str(&format!("; refused revision {rev}: {reason}"));
    }
    if let Some(e) = &c.last_error {
        out.push_str(&format!("\nlast error {e}"));
    }
    out.push('\n');
    out
}
