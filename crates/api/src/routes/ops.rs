//! Operations: `/healthz`, `/readyz`, `/metrics`, `/api/v1/info`, `/api/v1/openapi.json`.

use std::sync::LazyLock;
use std::time::Duration;

use async_nats::connection::State as NatsState;
use axum::extract::{RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::error::{ApiError, ErrorBody, UnavailableResponse};
use crate::metrics::{self, FleetpipeCollector};
use crate::model::{Health, Info, Readiness};
use crate::params::Params;
use crate::AppState;

/// How long readiness waits for the store.
const STORE_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Liveness: 200 whenever the process serves requests.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    security(()),
    responses((status = 200, description = "The process is serving.", body = Health))
)]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Readiness: NATS connected, the store answering, the latest state (and the tokens, when
/// required) loaded.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "Ready: NATS connected, store answering, state loaded.", body = Readiness),
        (status = 503, description = "Not ready; `error` says why.", body = Readiness),
    )
)]
pub async fn readyz(State(st): State<AppState>) -> Response {
    let mut problems = Vec::new();
    let nats = match &st.nats {
        None => "not used",
        Some(client) => match client.connection_state() {
            NatsState::Connected => "connected",
            NatsState::Disconnected => "disconnected",
            NatsState::Pending => "pending",
        },
    };
    if nats != "connected" && nats != "not used" {
        problems.push(format!("nats: {nats}"));
    }
    // Within the request timeout, so that a slow store still gets a readiness answer.
    let ping_timeout = STORE_PING_TIMEOUT.min(st.limits.request_timeout / 2);
    let store = match tokio::time::timeout(ping_timeout, st.store.ping()).await {
        Ok(Ok(())) => "ok".to_string(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: store ping failed");
            format!("error: {e}")
        }
        Err(_) => format!(
            "no answer within {}",
            humantime::format_duration(ping_timeout)
        ),
    };
    if store != "ok" {
        problems.push(format!("store: {store}"));
    }
    let index = if st.index.is_ready() {
        "ready"
    } else {
        problems.push("index: the latest state is still loading".into());
        "loading"
    };
    let tokens = if !st.auth.required {
        "not required"
    } else if st.auth.tokens.is_ready() {
        "ready"
    } else {
        problems.push("tokens: the API tokens are still loading".into());
        "loading"
    };
    let ready = problems.is_empty();
    let body = Readiness {
        ready,
        nats: nats.into(),
        store,
        index: index.into(),
        tokens: tokens.into(),
        error: (!ready).then(|| problems.join("; ")),
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Prometheus metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    security((), ("bearer" = ["read"])),
    description = "Prometheus metrics in the OpenMetrics text format: the process's ingest \
        counters (`fleetpipe_messages_total`, `fleetpipe_readings_stored_total`, \
        `fleetpipe_dead_letters_total`, `fleetpipe_store_errors_total`, \
        `fleetpipe_aggregator_*`), the store write latency histogram \
        (`fleetpipe_store_write_seconds`), consumer lag (`fleetpipe_consumer_pending`), \
        dead letters held (`fleetpipe_dead_letter_stream_messages`), messages accepted by \
        the stream (`fleetpipe_stream_received_total`), device counts.",
    responses(
        (status = 200, description = "Metrics.", content_type = "application/openmetrics-text", body = String),
        (status = 503, response = UnavailableResponse),
    )
)]
pub async fn metrics(State(st): State<AppState>) -> Result<Response, ApiError> {
    let collector = FleetpipeCollector {
        stats: st.stats.clone(),
        broker: st.broker.clone(),
        index: st.index.clone(),
        online_window: st.online_window,
        nats_connected: st
            .nats
            .as_ref()
            .map(|c| c.connection_state() == NatsState::Connected),
    };
    // Off the async threads: the device counts are a pass over the whole index.
    let text = st
        .index_pass(move |_, _| metrics::encode(collector))
        .await?
        .map_err(|_| ApiError::Unavailable("cannot encode the metrics".into()))?;
    Ok(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response())
}

/// Settings the dashboard needs.
#[utoipa::path(
    get,
    path = "/api/v1/info",
    tag = "operations",
    responses(
        (status = 200, description = "Version and dashboard settings.", body = Info),
        (status = 400, description = "A query parameter was given (none are accepted).", body = ErrorBody),
    )
)]
pub async fn info(
    State(st): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<Info>, ApiError> {
    Params::parse(query.as_deref(), &[])?;
    Ok(Json(Info {
        version: env!("CARGO_PKG_VERSION").into(),
        store: st.store.kind().into(),
        online_window_s: st.online_window.as_secs(),
        tile_url: st.tile_url.to_string(),
    }))
}

/// The OpenAPI document, serialized once.
static OPENAPI: LazyLock<String> =
    LazyLock::new(|| crate::openapi::document().to_json().unwrap_or_default());

/// This API's OpenAPI 3 document.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3 document.", content_type = "application/json", body = Object))
)]
pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        OPENAPI.as_str(),
    )
        .into_response()
}
