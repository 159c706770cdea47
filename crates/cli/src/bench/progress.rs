//! Progress on stderr while the phases run: what was published and consumed, the backlog
//! and the collector's RSS, once a second.

use std::io::{IsTerminal, Write as _};
use std::time::Duration;

use fleetpipe_device::simulate::SimStats;

use crate::output::thousands;

use super::phases::{Sample, SAMPLE_EVERY};
use super::process::kb_to_mb;

/// Progress on stderr: a line rewritten in place on a terminal, a line a second otherwise.
pub(super) struct Progress {
    tty: bool,
}

impl Progress {
    pub(super) fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
        }
    }

    pub(super) fn note(&self, line: &str) {
        eprintln!("{line}");
    }

    fn line(&self, line: &str) {
        if self.tty {
            eprint!("\r\x1b[2K{line}");
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{line}");
        }
    }

    pub(super) fn end_line(&self) {
        if self.tty {
            eprintln!();
        }
    }

    /// Once a second (every fifth sample).
    pub(super) fn phase_line(
        &self,
        phase: &str,
        s: &Sample,
        before: &[Sample],
        sim: &SimStats,
        duration: Duration,
    ) {
        if before.len() % 5 != 4 {
            return;
        }
        let prev = before[before.len() - 4];
        let secs = s.at.duration_since(prev.at).as_secs_f64().max(1e-3);
        let rate = s.acked.saturating_sub(prev.acked) as f64 / secs;
        let rss = s
            .rss_kb
            .map(|kb| format!(" │ collector RSS {:.0} MB", kb_to_mb(kb)))
            .unwrap_or_default();
        let clock = if phase == "latency" {
            format!("{:.0} s", sim.elapsed_secs)
        } else {
            format!("{:.0}/{} s", sim.elapsed_secs, duration.as_secs())
        };
        self.line(&format!(
            "{phase:<8} {clock} │ published {} ({}/s) │ consumed {} ({}/s) │ backlog {}{rss}",
            thousands(sim.published),
            thousands(sim.publish_rate as u64),
            thousands(s.acked),
            thousands(rate as u64),
            thousands(s.pending),
        ));
    }

    pub(super) fn drain_line(&self, phase: &str, s: &Sample, elapsed: Duration) {
        // A line a second when not on a terminal.
        if !self.tty && elapsed.as_millis() % 1000 >= SAMPLE_EVERY.as_millis() {
            return;
        }
        self.line(&format!(
            "{phase:<8} draining {:.0} s │ backlog {} │ awaiting ack {}",
            elapsed.as_secs_f64(),
            thousands(s.pending),
            thousands(s.ack_pending)
        ));
    }
}
