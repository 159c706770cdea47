//! Process and machine figures from `/proc` (Linux; `None` elsewhere): a process's RSS and
//! CPU time, the machine's busy time, the managed nats-server's pid, and where a run was
//! measured.

use std::path::Path;

use serde::Serialize;

/// CPU seconds of the three processes on the machine (Linux only).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(super) struct Cpu {
    pub(super) nats_server: Option<f64>,
    /// The bench process: the publishers, and in the ceiling phase the ack-and-discard
    /// consumer.
    pub(super) bench: Option<f64>,
    pub(super) collector: Option<f64>,
    /// Everything else on the machine: other work running at the same time skews the
    /// figures, so it is measured rather than assumed away.
    pub(super) other: Option<f64>,
}

impl Cpu {
    pub(super) fn now(nats: Option<u32>, collector: Option<u32>) -> Cpu {
        let mut cpu = Cpu {
            nats_server: nats.and_then(cpu_secs),
            bench: cpu_secs(std::process::id()),
            collector: collector.and_then(cpu_secs),
            other: None,
        };
        // Until `cores_between`, `other` holds the machine's total busy seconds.
        cpu.other = machine_busy_secs();
        cpu
    }

    /// CPU used between two readings, as cores busy over `secs`.
    pub(super) fn cores_between(a: &Cpu, b: &Cpu, secs: f64) -> Cpu {
        let d = |x: Option<f64>, y: Option<f64>| match (x, y) {
            (Some(x), Some(y)) if secs > 0.0 => Some((y - x).max(0.0) / secs),
            _ => None,
        };
        let ours = [
            d(a.nats_server, b.nats_server),
            d(a.bench, b.bench),
            d(a.collector, b.collector),
        ];
        let other =
            d(a.other, b.other).map(|busy| (busy - ours.iter().flatten().sum::<f64>()).max(0.0));
        Cpu {
            nats_server: ours[0],
            bench: ours[1],
            collector: ours[2],
            other,
        }
    }
}

pub(super) fn kb_to_mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// Where the figures were measured; the load average says whether something else ran.
pub(super) struct Machine {
    pub(super) nats_server: String,
    load_start: Option<f64>,
}

#[derive(Debug, Serialize)]
pub(super) struct MachineFigures {
    pub(super) cpus: usize,
    pub(super) memory_mb: Option<u64>,
    pub(super) kernel: Option<String>,
    pub(super) nats_server: String,
    pub(super) load_average_start: Option<f64>,
    pub(super) load_average_end: Option<f64>,
}

impl Machine {
    pub(super) fn probe(nats_bin: &Path) -> Machine {
        let version = std::process::Command::new(nats_bin)
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let version = version.rsplit(' ').next().unwrap_or("unknown").to_string();
        Machine {
            nats_server: version,
            load_start: load_average(),
        }
    }

    pub(super) fn finish(self) -> MachineFigures {
        let mem_kb = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:").and_then(parse_kb))
        });
        MachineFigures {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_mb: mem_kb.map(|kb| kb / 1024),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|s| s.trim().to_string()),
            nats_server: self.nats_server,
            load_average_start: self.load_start,
            load_average_end: load_average(),
        }
    }
}

fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`); `None` off Linux.
pub(super) fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
            .and_then(parse_kb)
    })
}

/// User plus system CPU seconds of a process, from `/proc/<pid>/stat`.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks())
}

/// Busy CPU seconds of the whole machine since boot (all but idle and iowait), from
/// `/proc/stat`.
fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .map(|t| t.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: u64 = ticks.iter().take(8).sum::<u64>() - ticks.get(3)? - ticks.get(4)?;
    Some(busy as f64 / clock_ticks())
}

/// `sysconf(_SC_CLK_TCK)`: 100 on every Linux we know of; `getconf` confirms.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The process whose command line mentions `path` (the managed nats-server, by its
/// config file under the bench's temporary directory).
pub(super) fn find_pid_with_arg(path: &Path) -> Option<u32> {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline)
            .contains(&needle)
            .then_some(pid)
    })
}

fn parse_kb(s: &str) -> Option<u64> {
    s.trim().strip_suffix("kB")?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_status_fields_parse() {
        assert_eq!(parse_kb("   52340 kB"), Some(52340));
        assert_eq!(parse_kb("x"), None);
        assert!(proc_status_kb(std::process::id(), "VmRSS").is_some_and(|kb| kb > 0));
    }
}
