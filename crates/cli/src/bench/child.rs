//! The `fleetpipe collect` child process the pipeline, latency and overload phases run
//! through: started with the bench's configuration, stopped with SIGTERM for its counters.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use async_nats::jetstream::consumer::PullConsumer;
use fleetpipe_pipeline::Config;
use tokio::time::Instant;

/// The `fleetpipe collect` child process.
pub(super) struct Collector {
    child: tokio::process::Child,
    pub(super) pid: u32,
}

impl Collector {
    /// Starts `fleetpipe collect --json` with the bench's effective configuration in a file
    /// and no `FLEETPIPE_*` variables, so it uses exactly the same settings.
    pub(super) async fn spawn(config: &Config, dir: &Path) -> Result<Collector> {
        let conf = dir.join("fleetpipe-bench.toml");
        std::fs::write(&conf, toml::to_string(config)?)
            .with_context(|| format!("cannot write {}", conf.display()))?;
        let exe = std::env::current_exe().context("cannot find the fleetpipe binary")?;
        let mut cmd = tokio::process::Command::new(exe);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("FLEETPIPE_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .arg("--config")
            .arg(&conf)
            .args(["--log", "warn", "collect", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start `fleetpipe collect`")?;
        let pid = child.id().context("collector exited at once")?;
        Ok(Collector { child, pid })
    }

    /// Waits until a collector worker has a pull request waiting on the consumer.
    pub(super) async fn wait_ready(&mut self, consumer: &mut PullConsumer) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("`fleetpipe collect` exited at start ({status})");
            }
            if consumer.info().await?.num_waiting > 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("`fleetpipe collect` did not start pulling within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then its `--json` counters.
    pub(super) async fn stop(self) -> Result<serde_json::Value> {
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        let out = tokio::time::timeout(Duration::from_secs(60), self.child.wait_with_output())
            .await
            .context("`fleetpipe collect` did not stop within 60 s")??;
        if !out.status.success() {
            bail!("`fleetpipe collect` exited with {}", out.status);
        }
        serde_json::from_slice(&out.stdout).context("cannot read the collector's counters")
    }
}

/// A counter of the collector's `--json` output; 0 when it is missing.
pub(super) fn counter(v: &serde_json::Value, name: &str) -> u64 {
    v.get(name).and_then(serde_json::Value::as_u64).unwrap_or(0)
}
