//! The connection to NATS: several URLs, servers discovered from the cluster, reconnects
//! forever with a jittered backoff, and every connect and disconnect logged with the
//! server's address. A `watch` channel tells the rest whether the link is up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow_lite::Context as _;
use fleetpipe_device::publish::spool::backoff;
use tokio::sync::watch;

use crate::config::Config;

/// What the link did, for the status file.
#[derive(Debug, Default)]
pub struct LinkStats {
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    /// The server connected to (`host:port`, name), and the servers known from the cluster.
    pub server: Mutex<Option<String>>,
    pub known_servers: Mutex<Vec<String>>,
    /// Unix seconds of the last change.
    pub since: AtomicU64,
}

/// The name the agent's connection shows in the server's connection list.
pub fn connection_name(device: &str) -> String {
    format!("fleetpipe-agent {device}")
}

/// Connects (or keeps trying in the background: the agent starts without a link and
/// buffers) and returns the client and a `watch` of whether the link is up.
pub async fn connect(
    cfg: &Config,
    stats: Arc<LinkStats>,
) -> Result<(async_nats::Client, watch::Receiver<bool>), String> {
    let (up_tx, up_rx) = watch::channel(false);
    let up_tx = Arc::new(up_tx);
    let client_cell: Arc<OnceLock<async_nats::Client>> = Arc::new(OnceLock::new());
    let mut options = async_nats::ConnectOptions::new()
        .name(connection_name(&cfg.device))
        .custom_inbox_prefix(cfg.inbox_prefix())
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        // The backoff between attempts, jittered so that a fleet does not come back in
        // lockstep after a server restart.
        .reconnect_delay_callback(|attempts| {
            backoff(
                attempts as u32,
                Duration::from_millis(250),
                Duration::from_secs(10),
            )
        });
    let (cell, tx, st) = (client_cell.clone(), up_tx.clone(), stats.clone());
    options = options.event_callback(move |event| {
        let (cell, tx, st) = (cell.clone(), tx.clone(), st.clone());
        async move {
            match event {
                async_nats::Event::Connected => {
                    let (server, known) = cell.get().map_or((String::new(), vec![]), |c| {
                        let info = c.server_info();
                        (
                            format!("{}:{} ({})", info.host, info.port, info.server_name),
                            info.connect_urls.clone(),
                        )
                    });
                    let first = st.connects.fetch_add(1, Ordering::Relaxed) == 0;
                    tracing::info!(
                        server = %server,
                        discovered = ?known,
                        "{}", if first { "connected to nats" } else { "reconnected to nats" }
                    );
                    set(&st.server, Some(server));
                    set(&st.known_servers, known);
                    st.since.store(unix_now(), Ordering::Relaxed);
                    tx.send_replace(true);
                }
                async_nats::Event::Disconnected => {
                    st.disconnects.fetch_add(1, Ordering::Relaxed);
                    let server = st
                        .server
                        .lock()
                        .ok()
                        .and_then(|s| s.clone())
                        .unwrap_or_default();
                    tracing::warn!(server = %server, "disconnected from nats");
                    st.since.store(unix_now(), Ordering::Relaxed);
                    tx.send_replace(false);
                }
                async_nats::Event::LameDuckMode => {
                    tracing::warn!(
                        "nats server entering lame duck mode: it will close the connection"
                    )
                }
                other => tracing::info!(event = %other, "nats event"),
            }
        }
    });
    if let Some(path) = &cfg.credentials {
        options = options
            .credentials_file(path)
            .await
            .context(format!("cannot read credentials {}", path.display()))?;
    }
    if let Some(ca) = &cfg.ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&cfg.client_cert, &cfg.client_key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let urls: Vec<async_nats::ServerAddr> = cfg
        .urls
        .iter()
        .map(|u| u.parse::<async_nats::ServerAddr>())
        .collect::<Result<_, _>>()
        .context("bad NATS URL".to_string())?;
    // async-nats ignores a user and password in the URL: pass them on (the first URL's).
    if let Some(addr) = urls.iter().find(|a| a.username().is_some()) {
        options = options.user_and_password(
            addr.username().unwrap_or_default().to_string(),
            addr.password().unwrap_or_default().to_string(),
        );
    }
    let client = options
        .connect(urls)
        .await
        .context("cannot connect to NATS".to_string())?;
    let _ = client_cell.set(client.clone());
    // The Connected event may have fired before the cell was set: fill in the server.
    if client.connection_state() == async_nats::connection::State::Connected {
        let info = client.server_info();
        set(
            &stats.server,
            Some(format!(
                "{}:{} ({})",
                info.host, info.port, info.server_name
            )),
        );
        set(&stats.known_servers, info.connect_urls.clone());
        up_tx.send_replace(true);
    }
    Ok((client, up_rx))
}

fn set<T>(m: &Mutex<T>, value: T) {
    if let Ok(mut g) = m.lock() {
        *g = value;
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `Result` context without pulling in anyhow.
mod anyhow_lite {
    pub trait Context<T> {
        fn context(self, what: String) -> Result<T, String>;
    }
    impl<T, E: std::fmt::Display> Context<T> for Result<T, E> {
        fn context(self, what: String) -> Result<T, String> {
            self.map_err(|e| format!("{what}: {e}"))
        }
    }
}
