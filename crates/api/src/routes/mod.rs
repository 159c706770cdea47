//! The routes and their handlers. [`table`] is the single list the router is built from,
//! with the access each route needs; the tests that check the OpenAPI document describes
//! every route, and that every route enforces its access, read it too.

use axum::handler::Handler;
use axum::http::{Method, Uri};
use axum::routing::{on, MethodFilter, MethodRouter};

use crate::auth::{Access, Role};
use crate::error::ApiError;
use crate::params::truncate;
use crate::AppState;

pub mod assets;
pub mod device_config;
pub mod devices;
pub mod fleet;
pub mod live;
pub mod ops;
pub mod tokens;

/// Routes that answer with an endless stream: exempt from the request timeout (they are
/// long-lived by design, and cost no store reads; see `live`).
pub const LONG_LIVED: &[&str] = &["/api/v1/live"];

/// One route: a method on a path, its handler, and what it needs from a request.
pub struct Route {
    /// The path, in axum syntax.
    pub path: &'static str,
    pub method: Method,
    /// Who may call it; see [`crate::auth`]. Declared here, for every route, and nowhere
    /// else.
    pub access: Access,
    pub handler: MethodRouter<AppState>,
}

impl Route {
    fn new<H, T>(method: Method, path: &'static str, access: Access, handler: H) -> Route
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).unwrap_or(MethodFilter::GET);
        Route {
            path,
            method,
            access,
            handler: on(filter, handler),
        }
    }

    fn get<H: Handler<T, AppState>, T: 'static>(path: &'static str, access: Access, h: H) -> Route {
        Route::new(Method::GET, path, access, h)
    }

    fn post<H: Handler<T, AppState>, T: 'static>(
        path: &'static str,
        access: Access,
        h: H,
    ) -> Route {
        Route::new(Method::POST, path, access, h)
    }

    fn delete<H: Handler<T, AppState>, T: 'static>(
        path: &'static str,
        access: Access,
        h: H,
    ) -> Route {
        Route::new(Method::DELETE, path, access, h)
    }

    fn put<H: Handler<T, AppState>, T: 'static>(path: &'static str, access: Access, h: H) -> Route {
        Route::new(Method::PUT, path, access, h)
    }

    /// Whether the route takes its token as `?access_token=` too (see [`crate::auth`]).
    pub fn query_token(&self) -> bool {
        LONG_LIVED.contains(&self.path)
    }
}

const READ: Access = Access::Role(Role::Read);
const OPERATOR: Access = Access::Role(Role::Operator);
const ADMIN: Access = Access::Role(Role::Admin);

/// Every route, with the role it needs: the single list the router is built from, which
/// the OpenAPI and authentication tests walk.
pub fn table() -> Vec<Route> {
    vec![
        Route::get("/", Access::Open, assets::index),
        Route::get("/assets/{*path}", Access::Open, assets::asset),
        Route::get("/api/v1/devices", READ, devices::list),
        Route::get("/api/v1/devices/{id}", READ, devices::one),
        Route::get("/api/v1/devices/{id}/series", READ, devices::series),
        Route::get("/api/v1/devices/{id}/config", READ, device_config::get),
        Route::put("/api/v1/devices/{id}/config", OPERATOR, device_config::put),
        Route::get("/api/v1/fleet/summary", READ, fleet::summary),
        Route::get("/api/v1/live", READ, live::live),
        Route::get("/api/v1/info", READ, ops::info),
        Route::get("/api/v1/openapi.json", READ, ops::openapi),
        Route::get("/api/v1/tokens", ADMIN, tokens::list),
        Route::post("/api/v1/tokens", ADMIN, tokens::create),
        Route::delete("/api/v1/tokens/{id}", ADMIN, tokens::revoke),
        Route::get("/metrics", Access::Metrics, ops::metrics),
        Route::get("/healthz", Access::Open, ops::healthz),
        Route::get("/readyz", Access::Open, ops::readyz),
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
    let path = uri.path();
    let allowed: Vec<String> = table()
        .iter()
        .filter(|r| matches_path(r.path, path))
        .map(|r| r.method.to_string())
        .collect();
    let allowed = if allowed.is_empty() {
        "GET".to_string()
    } else {
        allowed.join(" or ")
    };
    ApiError::MethodNotAllowed(format!(
        "{method} is not allowed on {}; use {allowed}",
        truncate(path)
    ))
}

/// Whether a request path matches a route path (`{param}` one segment, `{*rest}` the rest).
fn matches_path(route: &str, path: &str) -> bool {
    let mut want = route.split('/');
    let mut got = path.split('/');
    loop {
        match (want.next(), got.next()) {
            (None, None) => return true,
            (Some(w), Some(_)) if w.starts_with("{*") => return true,
            (Some(w), Some(g)) if (w.starts_with('{') && !g.is_empty()) || w == g => {}
            _ => return false,
        }
    }
}
