//! The routes and their handlers. [`table`] is the single list the router is built from,
//! and the test that checks the OpenAPI document describes every route reads it too.

use axum::http::{Method, Uri};
use axum::routing::{get, MethodRouter};

use crate::error::ApiError;
use crate::params::truncate;
use crate::AppState;

pub mod assets;
pub mod devices;
pub mod fleet;
pub mod live;
pub mod ops;

/// Routes that answer with an endless stream: exempt from the request timeout (they are
/// long-lived by design, and cost no store reads; see `live`).
pub const LONG_LIVED: &[&str] = &["/api/v1/live"];

/// Every route: its path (axum syntax) and its handlers.
pub fn table() -> Vec<(&'static str, MethodRouter<AppState>)> {
    vec![
        ("/", get(assets::index)),
        ("/assets/{*path}", get(assets::asset)),
        ("/api/v1/devices", get(devices::list)),
        ("/api/v1/devices/{id}", get(devices::one)),
        ("/api/v1/devices/{id}/series", get(devices::series)),
        ("/api/v1/fleet/summary", get(fleet::summary)),
        ("/api/v1/live", get(live::live)),
        ("/api/v1/info", get(ops::info)),
        ("/api/v1/openapi.json", get(ops::openapi)),
        ("/metrics", get(ops::metrics)),
        ("/healthz", get(ops::healthz)),
        ("/readyz", get(ops::readyz)),
    ]
}

/// Unknown routes: 404 with a JSON body.
pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!(
        "no route for {method} {}; the API is described at /api/v1/openapi.json",
        truncate(uri.path())
    ))
}

/// Known routes with another method: 405 with a JSON body.
pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "{method} is not allowed on {}; use GET",
        truncate(uri.path())
    ))
}
