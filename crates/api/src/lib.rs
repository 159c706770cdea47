//! fleetpipe's HTTP query API and the embedded dashboard.
//!
//! * [`index`] — the in-memory mirror of the latest-state KV bucket that the device,
//!   summary and live endpoints read (a KV watch keeps it current);
//! * [`routes`] — the handlers, built into one router by [`router`];
//! * [`openapi`] — the OpenAPI document, generated from the handlers and [`model`];
//! * [`metrics`] and [`broker_gauges`] — `/metrics`;
//! * [`limits`] — what bounds the work of a request: time, store queries in flight, rows;
//! * [`tags`] — series told apart by their tags: labels (`cpu.usage_idle{cpu=cpu0}`) and
//!   how a request (or `fleetpipe history`) picks one series;
//! * [`auth`] — bearer tokens with roles: the role each route declares in the route table,
//!   checked before its handler; [`auth::tokens`] stores them hashed in a KV bucket and
//!   mirrors it;
//! * [`tls`] — HTTPS from `api.tls_cert` / `api.tls_key`;
//! * [`start`] — everything `fleetpipe serve` and `fleetpipe up` run: the watches, the
//!   broker poller and the server, stopped together.
//!
//! **Invariants:** the API never writes to the store; its one write is the token bucket
//! (the admin routes under `/api/v1/tokens`). Every route declares the role it needs in
//! [`routes::table`]. No input makes a handler fail with a 5xx: bad parameters are 400,
//! unknown things 404, missing or bad tokens 401, too small a role 403; a 5xx means the
//! store or the broker failed, or the server is overloaded (a 503 with `Retry-After`).
//! Every request but the live stream is bounded in time and in rows read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener;
use axum::Router;
use fleetpipe_pipeline::broker::Broker;
use fleetpipe_pipeline::{Config, Stats};
use fleetpipe_proto::Timestamp;
use fleetpipe_store::Store;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod auth;
pub mod broker_gauges;
pub mod error;
pub mod index;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod openapi;
mod params;
pub mod routes;
pub mod tags;
pub mod tls;

pub use auth::{Access, Auth, Role};
pub use broker_gauges::BrokerGauges;
pub use error::ApiError;
pub use index::Index;
pub use limits::Limits;

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
    /// Request timeout, store queries in flight, rows per request.
    pub limits: Limits,
    /// Whether and how requests are authenticated; the tokens.
    pub auth: Auth,
    /// The device configuration bucket (`fleetpipe_config`), for
    /// `/api/v1/devices/{id}/config`; `None` when the process has no broker.
    pub device_config: Option<async_nats::jetstream::kv::Store>,
}

impl AppState {
    /// State with the default online window, no NATS connection, no broker figures and no
    /// authentication.
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
            limits: Limits::default(),
            auth: Auth::none(),
            device_config: None,
        }
    }

    fn online(&self) -> index::Online {
        index::Online::new(Timestamp::now(), self.online_window)
    }

    /// Runs a pass over the whole index off the async threads; see [`Limits::index_pass`].
    async fn index_pass<T, F>(&self, pass: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Index, index::Online) -> T + Send + 'static,
    {
        self.limits
            .index_pass(self.index.clone(), self.online(), pass)
            .await
    }
}

/// The router of every route in [`routes::table`], each behind the check of the access it
/// declares ([`auth::require`]), with JSON 404 and 405 fallbacks. Every route but the
/// long-lived ones ([`routes::LONG_LIVED`]) answers within `state.limits.request_timeout`
/// ([`limits::deadline`]).
pub fn router(state: AppState) -> Router {
    let deadline = axum::middleware::from_fn_with_state(state.limits.clone(), limits::deadline);
    let mut router = Router::new();
    for route in routes::table() {
        let guard = auth::Guard {
            auth: state.auth.clone(),
            access: route.access,
            query_token: route.query_token(),
        };
        let mut handler = route.handler;
        if !routes::LONG_LIVED.contains(&route.path) {
            handler = handler.layer(deadline.clone());
        }
        // Outermost: a request without the right token does no work at all.
        let handler = handler.layer(axum::middleware::from_fn_with_state(guard, auth::require));
        router = router.route(route.path, handler);
    }
    router
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .with_state(state)
}

/// Serves `state` on `listener` (a `TcpListener`, or a [`tls::TlsListener`] for HTTPS)
/// until `state.shutdown` is cancelled, then lets requests in flight finish (live streams
/// end at once).
pub async fn serve<L>(listener: L, state: AppState) -> std::io::Result<()>
where
    L: Listener,
    L::Addr: std::fmt::Debug,
{
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
    /// `api.tls_cert` / `api.tls_key` cannot be used.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// The running API of `fleetpipe serve` / `fleetpipe up`.
pub struct RunningApi {
    addr: SocketAddr,
    https: bool,
    stop: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
    background: Vec<JoinHandle<()>>,
}

/// Binds `config.api.http` and starts the state and token watches, the broker poller and
/// the server (HTTPS when `api.tls_cert` is set). Says in the log whether requests need a
/// token.
pub async fn start(
    config: &Config,
    client: async_nats::Client,
    broker: &Broker,
    store: Arc<dyn Store>,
    stats: Arc<Stats>,
) -> Result<RunningApi, StartError> {
    let tls = if config.api.tls_cert.is_empty() {
        None
    } else {
        Some(tls::server_config(
            std::path::Path::new(&config.api.tls_cert),
            std::path::Path::new(&config.api.tls_key),
        )?)
    };
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
    let tokens = Arc::new(auth::TokenSet::new());
    let background = vec![
        tokio::spawn(index::watch(
            broker.state.clone(),
            index.clone(),
            stop.clone(),
        )),
        tokio::spawn(auth::tokens::watch(
            broker.tokens.clone(),
            tokens.clone(),
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
    let auth = Auth {
        required: config.api.tokens_required(),
        metrics_auth: config.api.metrics_auth,
        tokens,
        bucket: Some(broker.tokens.clone()),
    };
    if auth.required {
        tracing::info!(
            addr = %local,
            metrics = if auth.metrics_auth { "token" } else { "open" },
            "api requires bearer tokens (fleetpipe token add NAME --role read)"
        );
    } else if local.ip().is_loopback() {
        tracing::info!("API is unauthenticated on {local} (loopback only; api.auth = \"tokens\" requires tokens)");
    } else {
        tracing::warn!(
            "API is unauthenticated on {local}, beyond loopback (api.allow_unauthenticated_remote)"
        );
    }
    let state = AppState {
        nats: Some(client),
        broker: gauges,
        online_window: config.api.online_window,
        tile_url: config.api.tile_url.as_str().into(),
        shutdown: stop.clone(),
        limits: Limits::from_config(&config.api),
        auth,
        device_config: Some(broker.device_config.clone()),
        ..AppState::new(index, store, stats)
    };
    let server = match tls {
        Some(tls) => {
            let listener =
                tls::TlsListener::new(listener, tls).map_err(|source| StartError::Bind {
                    addr: addr.clone(),
                    source,
                })?;
            tokio::spawn(serve(listener, state))
        }
        None => tokio::spawn(serve(listener, state)),
    };
    Ok(RunningApi {
        addr: local,
        https: !config.api.tls_cert.is_empty(),
        stop,
        server,
        background,
    })
}

/// Opens the API's own handle on the store `url` names, for a process that also writes to
/// it (`fleetpipe up`), so that the API's reads neither wait for the writers' connections nor
/// hold them:
/// * PostgreSQL: a pool of its own, of `api.max_concurrent_queries` connections (every
///   query the limit admits has one) plus one for the readiness probe;
/// * SQLite: a second handle on the same file. Its reads use reader connections of its own
///   (as any handle's do); its writer connection stays idle, the API never writing; the
///   migrations are already applied by the first handle, so opening only reads their
///   version; its checkpointer's passive checkpoints never block a writer (one meeting
///   another checkpoint's lock simply skips its turn).
pub async fn open_store(
    url: &str,
    api: &fleetpipe_pipeline::config::ApiConfig,
) -> Result<Arc<dyn Store>, fleetpipe_store::StoreError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let pool_size = api.max_concurrent_queries.saturating_add(1);
        let store = fleetpipe_store::postgres::PgStore::connect_with(url, pool_size).await?;
        Ok(Arc::new(store))
    } else {
        fleetpipe_store::open(url).await
    }
}

impl RunningApi {
    /// The address actually bound (resolves port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, or `https://ADDR`.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
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
