//! fleetpipe's HTTP query API and the embedded dashboard.
//!
//! * [`index`] — the in-memory mirror of the latest-state KV bucket that the device,
//!   summary and live endpoints read (a KV watch keeps it current);
//! * [`routes`] — the handlers, built into one router by [`router`];
//! * [`openapi`] — the OpenAPI document, generated from the handlers and [`model`];
//! * [`metrics`] and [`broker_gauges`] — `/metrics`;
//! * [`start`] — everything `fleetpipe serve` and `fleetpipe up` run: the watch, the broker
//!   poller and the server, stopped together.
//!
//! **Invariants:** the API only reads: it never writes to the store or the broker. No
//! input makes a handler fail with a 5xx: bad parameters are 400, unknown things 404; a 5xx
//! means the store or the broker failed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use fleetpipe_pipeline::broker::Broker;
use fleetpipe_pipeline::{Config, Stats};
use fleetpipe_proto::Timestamp;
use fleetpipe_store::Store;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod broker_gauges;
pub mod error;
pub mod index;
pub mod metrics;
pub mod model;
pub mod openapi;
mod params;
pub mod routes;

pub use broker_gauges::BrokerGauges;
pub use error::ApiError;
pub use index::Index;

/// What the handlers share. Cheap to clone: handles and `Arc`s.
#[derive(Clone)]
pub struct AppState {
    pub index: Arc<Index>,
    pub store: Arc<dyn Store>,
    /// The NATS connection whose state `/readyz` reports; `None` when the process has none
    /// (tests), which readiness does not count against.
    pub nats: Option<async_nats::Client>,
    /// The counters of the components running in this process.
    pub stats: Arc<Stats>,
    pub broker: Arc<BrokerGauges>,
    /// A device is online when its newest reading is at most this old.
    pub online_window: Duration,
    /// Map tile URL template for the dashboard; empty for none.
    pub tile_url: Arc<str>,
    /// Cancelled at shutdown: ends live streams so the server can stop.
    pub shutdown: CancellationToken,
}

impl AppState {
    /// State with the default online window, no NATS connection and no broker figures.
    pub fn new(index: Arc<Index>, store: Arc<dyn Store>, stats: Arc<Stats>) -> Self {
        AppState {
            index,
            store,
            nats: None,
            stats,
            broker: Arc::default(),
            online_window: fleetpipe_pipeline::config::ApiConfig::default().online_window,
            tile_url: "".into(),
            shutdown: CancellationToken::new(),
        }
    }

    fn online(&self) -> index::Online {
        index::Online::new(Timestamp::now(), self.online_window)
    }
}

/// The router of every route in [`routes::table`], with JSON 404 and 405 fallbacks.
pub fn router(state: AppState) -> Router {
    let mut router = Router::new();
    for (path, handlers) in routes::table() {
        router = router.route(path, handlers);
    }
    router
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .with_state(state)
}

/// Serves `state` on `listener` until `state.shutdown` is cancelled, then lets requests in
/// flight finish (live streams end at once).
pub async fn serve(listener: TcpListener, state: AppState) -> std::io::Result<()> {
    let shutdown = state.shutdown.clone();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The address is taken or not ours; the cause is the `source`.
    #[error(
        "cannot listen on {addr} (is another process using the port? --http ADDR picks another)"
    )]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// The running API of `fleetpipe serve` / `fleetpipe up`.
pub struct RunningApi {
    addr: SocketAddr,
    stop: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
    background: Vec<JoinHandle<()>>,
}

/// Binds `config.api.http` and starts the state watch, the broker poller and the server.
pub async fn start(
    config: &Config,
    client: async_nats::Client,
    broker: &Broker,
    store: Arc<dyn Store>,
    stats: Arc<Stats>,
) -> Result<RunningApi, StartError> {
    let addr = config.api.http.clone();
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: addr.clone(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| StartError::Bind {
        addr: addr.clone(),
        source,
    })?;
    let stop = CancellationToken::new();
    let index = Arc::new(Index::new());
    let gauges = Arc::new(BrokerGauges::default());
    let background = vec![
        tokio::spawn(index::watch(
            broker.state.clone(),
            index.clone(),
            stop.clone(),
        )),
        tokio::spawn(broker_gauges::poll(
            broker.js.clone(),
            broker.consumer.clone(),
            config.stream.name.clone(),
            gauges.clone(),
            stop.clone(),
        )),
    ];
    let state = AppState {
        nats: Some(client),
        broker: gauges,
        online_window: config.api.online_window,
        tile_url: config.api.tile_url.as_str().into(),
        shutdown: stop.clone(),
        ..AppState::new(index, store, stats)
    };
    let server = tokio::spawn(serve(listener, state));
    Ok(RunningApi {
        addr: local,
        stop,
        server,
        background,
    })
}

impl RunningApi {
    /// The address actually bound (resolves port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, ends live streams, waits up to `deadline` for requests in flight,
    /// then stops the watch and the poller.
    pub async fn stop(self, deadline: Duration) {
        self.stop.cancel();
        let server = self.server;
        let abort = server.abort_handle();
        match tokio::time::timeout(deadline, server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "http server failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "http server task failed"),
            Err(_) => {
                tracing::warn!("http requests still running at the deadline; dropping them");
                abort.abort();
            }
        }
        for task in self.background {
            let _ = task.await;
        }
    }
}
