//! `fleetpipe bench` against nothing but what it starts itself: the figures are there and
//! nothing was lost or stored twice. No speed is asserted; the targets are the bench's
//! own output, not a test's.

use std::process::Command;

#[test]
fn bench_runs_end_to_end_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fleetpipe"))
        .args([
            "bench",
            "--devices",
            "50",
            "--duration",
            "2s",
            "--probes",
            "50",
        ])
        .arg("--json")
        .current_dir(tmp.path())
        .env("TMPDIR", tmp.path())
        .env("FLEETPIPE_LOG", "warn")
        .env_remove("FLEETPIPE_CONFIG")
        .env_remove("FLEETPIPE_STORE")
        .env_remove("FLEETPIPE_NATS_URL")
        .env_remove("FLEETPIPE_DATA_DIR")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fleetpipe bench failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stderr}"));
    let num = |pointer: &str| {
        report
            .pointer(pointer)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or_else(|| panic!("{pointer} missing in {report:#}"))
    };
    for pointer in [
        "/ceiling/messages_per_sec",
        "/ceiling/readings_per_sec",
        "/pipeline/messages_per_sec",
        "/pipeline/readings_per_sec",
        "/ratio",
        "/latency/state_ms/p50",
        "/latency/state_ms/p99",
        "/latency/state_ms/max",
        "/latency/history_ms/p50",
        "/latency/history_ms/p99",
        "/latency/history_ms/max",
        "/rss/peak_mb",
        "/overload/messages_per_sec",
        "/overload/backlog_peak",
    ] {
        assert!(num(pointer) >= 0.0, "{pointer} in {report:#}");
    }
    assert!(num("/overload/published_messages") > 0.0, "{report:#}");
    // Closed loop: the publishers stay within 20,000 messages (and one per connection) of
    // the consumer's acknowledgements, so the undelivered backlog never exceeds that.
    for phase in ["ceiling", "pipeline"] {
        let peak = num(&format!("/{phase}/backlog_peak"));
        assert!(peak <= 20_000.0 + 4.0, "{phase} backlog {peak}: {report:#}");
    }
    let acc = |field: &str| num(&format!("/accounting/{field}"));
    assert!(acc("published_readings") > 0.0, "{report:#}");
    assert_eq!(acc("stored"), acc("published_readings"), "{report:#}");
    assert_eq!(acc("lost"), 0.0, "{report:#}");
    assert_eq!(acc("duplicates"), 0.0, "{report:#}");
    assert_eq!(acc("dead_letters"), 0.0, "{report:#}");
    assert_eq!(num("/latency/state_ms/seen"), 50.0, "{report:#}");
    assert_eq!(num("/latency/history_ms/seen"), 50.0, "{report:#}");
    assert!(
        report["targets"].as_array().is_some_and(|t| !t.is_empty()),
        "{report:#}"
    );
    // The temporary nats-server store and SQLite file are gone.
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
