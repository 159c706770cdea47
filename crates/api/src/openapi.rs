//! The OpenAPI 3 document, generated from the handlers' annotations and the response
//! types (see [`crate::model`]).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use crate::routes::{assets, device_config, devices, fleet, live, ops, tokens};

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
            by default; the live stream is exempt), and carries `Retry-After` (seconds). \
            \n\nAuthentication: when the server requires tokens (`api.auth`), every route under \
            `/api/` needs `Authorization: Bearer fpt_…` with a role: `read` for every read and \
            the live stream (which also takes `?access_token=`, for EventSource), `operator` to set a device's configuration, `admin` for \
            tokens; roles are ordered (admin ⊇ operator ⊇ read). `/metrics` needs `read` unless \
            `api.metrics_auth = false`; probes and the dashboard's files are open. A missing or \
            invalid token is a 401 with `WWW-Authenticate: Bearer`, too small a role a 403.",
        license(name = "Apache-2.0")
    ),
    paths(
        devices::list,
        devices::one,
        devices::series,
        device_config::get,
        device_config::put,
        fleet::summary,
        live::live,
        ops::info,
        ops::openapi,
        ops::metrics,
        ops::healthz,
        ops::readyz,
        assets::index,
        assets::asset,
        tokens::list,
        tokens::create,
        tokens::revoke,
    ),
    security(("bearer" = ["read"])),
    modifiers(&BearerScheme),
    components(
        schemas(crate::model::LiveLagged, crate::auth::Role),
        responses(crate::error::UnavailableResponse)
    ),
    tags(
        (name = "devices", description = "Devices, their latest state and history."),
        (name = "fleet", description = "Fleet-wide figures."),
        (name = "live", description = "Live state changes."),
        (name = "operations", description = "Probes, metrics, this document."),
        (name = "dashboard", description = "The built-in web dashboard."),
        (name = "tokens", description = "Bearer tokens of the API (role admin)."),
    )
)]
struct ApiDoc;

/// Declares the `bearer` security scheme the operations refer to.
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("fpt_<id>_<secret>")
                    .description(Some(
                        "A token from `fleetpipe token add NAME --role read|operator|admin` \
                         or POST /api/v1/tokens.",
                    ))
                    .build(),
            ),
        );
        // Every operation that needs a token can be refused for it.
        let global = openapi.security.clone().unwrap_or_default();
        for item in openapi.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.delete,
                &mut item.put,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                let security = op.security.as_ref().unwrap_or(&global);
                // Open: no requirement, or an empty one among the alternatives.
                let empty = SecurityRequirement::default();
                if security.is_empty() || security.contains(&empty) {
                    continue;
                }
                for (status, description) in [
                    ("401", "No bearer token, or one that is not valid (unknown, revoked or mistyped); with `WWW-Authenticate: Bearer`."),
                    ("403", "The token's role does not grant this route."),
                ] {
                    op.responses
                        .responses
                        .entry(status.into())
                        .or_insert_with(|| error_response(description));
                }
            }
        }
    }
}

fn error_response(description: &str) -> RefOr<Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build(),
    )
}

/// The OpenAPI document of every route.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
