//! The OpenAPI 3 document, generated from the handlers' annotations and the response
//! types (see [`crate::model`]).

use utoipa::OpenApi;

use crate::routes::{assets, devices, fleet, live, ops};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "fleetpipe",
        description = "Query API of fleetpipe: devices and their latest state, sensor history \
            (raw or per-minute rollups, chosen by the server), a fleet summary, a live stream of \
            state changes, metrics and probes. Errors are JSON `{\"error\": \"...\"}`: 400 for bad \
            parameters (unknown, repeated or invalid ones), 404 for unknown devices and routes. \
            No input yields a 5xx: a 503 means the store is down or slow or the server is busy \
            (too many store queries in flight, or no answer within `api.request_timeout`, 10 s \
            by default; the live stream is exempt), and carries `Retry-After` (seconds).",
        license(name = "Apache-2.0")
    ),
    paths(
        devices::list,
        devices::one,
        devices::series,
        fleet::summary,
        live::live,
        ops::info,
        ops::openapi,
        ops::metrics,
        ops::healthz,
        ops::readyz,
        assets::index,
        assets::asset,
    ),
    components(
        schemas(crate::model::LiveLagged),
        responses(crate::error::UnavailableResponse)
    ),
    tags(
        (name = "devices", description = "Devices, their latest state and history."),
        (name = "fleet", description = "Fleet-wide figures."),
        (name = "live", description = "Live state changes."),
        (name = "operations", description = "Probes, metrics, this document."),
        (name = "dashboard", description = "The built-in web dashboard."),
    )
)]
struct ApiDoc;

/// The OpenAPI document of every route.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
