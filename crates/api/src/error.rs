//! The one error type of the HTTP layer: every handler returns `Result<_, ApiError>`, and
//! every error becomes a JSON body `{"error": "..."}` with a stable, human-readable message.
//! Every 503 also carries `Retry-After`: it never comes from the request itself, only from
//! the system behind the API (down, slow or busy), so the same request may succeed later.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use fleetpipe_store::StoreError;
use serde::Serialize;
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What is wrong and, for bad parameters, what is accepted.
    #[schema(example = "limit must be an integer from 0 to 10000, got \"abc\"")]
    pub error: String,
}

/// The 503 of every route but the live stream, in the OpenAPI document: the store is down
/// or slow, too many store queries are in flight, or the request took longer than
/// `api.request_timeout`. Never caused by the request itself.
#[derive(utoipa::ToResponse)]
#[response(
    description = "Unavailable, not because of the request: the store is down or slow, too \
        many store queries are in flight (series), or no answer within `api.request_timeout` \
        (10 s by default). Retry after `Retry-After` seconds.",
    headers(("Retry-After" = u64, description = "Seconds to wait before retrying: 1 when too \
        many queries are in flight, 5 otherwise."))
)]
pub struct UnavailableResponse(pub ErrorBody);

/// Why a request failed. Input problems are 400/404 and say what to fix; failures of the
/// system behind the API are logged with their cause and shown as a short stable message.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A parameter is missing, malformed or out of range (400).
    #[error("{0}")]
    BadRequest(String),
    /// The device, sensor or route does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not for this method (405).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// No token, or one that is not valid (401, with `WWW-Authenticate: Bearer`).
    #[error("{0}")]
    Unauthorized(String),
    /// A valid token whose role does not grant the route (403).
    #[error("{0}")]
    Forbidden(String),
    /// The request conflicts with what exists (409): a token name already taken.
    #[error("{0}")]
    Conflict(String),
    /// The store failed; transient failures are 503, anything else 500, but for a read
    /// naming a sensor with several series, which is the request's fault (400).
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A dependency (store, NATS) did not answer in time (503).
    #[error("{0}")]
    Unavailable(String),
    /// Too much work in flight already: the request was refused before doing any (503,
    /// `Retry-After: 1`).
    #[error("{0}")]
    Busy(String),
    /// The request took longer than `api.request_timeout` (503).
    #[error("no answer within {}; the server is busy, try again shortly", humantime::format_duration(*.0))]
    TimedOut(Duration),
    /// A bug (a task panicked); the cause goes to the log only (500).
    #[error("internal error: {0}")]
    Internal(String),
}

/// `Retry-After` of a 503 for a busy server: a slot frees as soon as one request ends.
pub const RETRY_AFTER_BUSY: u64 = 1;
/// `Retry-After` of any other 503 (the store down or slow, a timeout): long enough not to
/// add to the load of a store that is struggling.
pub const RETRY_AFTER_UNAVAILABLE: u64 = 5;

impl ApiError {
    /// A 400 with the given message.
    pub fn bad(message: impl Into<String>) -> Self {
        ApiError::BadRequest(message.into())
    }

    /// The HTTP status this error maps to.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            // The series endpoint picks one series itself; should a read still name a
            // sensor with several, the request did not say enough: never a 5xx.
            ApiError::Store(StoreError::Ambiguous(_)) => StatusCode::BAD_REQUEST,
            ApiError::Store(e) if e.is_transient() => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(_) | ApiError::Busy(_) | ApiError::TimedOut(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Seconds a client should wait before retrying: set for every 503, never otherwise.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::Busy(_) => Some(RETRY_AFTER_BUSY),
            _ if self.status() == StatusCode::SERVICE_UNAVAILABLE => Some(RETRY_AFTER_UNAVAILABLE),
            _ => None,
        }
    }

    /// What the client sees: the message for input errors, a stable summary otherwise
    /// (the cause, which may name hosts or SQL, goes to the log only).
    fn public_message(&self) -> String {
        match self {
            ApiError::Store(StoreError::Ambiguous(m)) => {
                format!("{m}; pick one with tag=KEY:VALUE or a label, sensor=SENSOR{{KEY=VALUE,…}}")
            }
            ApiError::Store(e) if e.is_transient() => {
                "the store is unavailable; try again shortly".into()
            }
            ApiError::Store(_) => "internal error reading the store".into(),
            ApiError::Internal(_) => "internal error".into(),
            other => other.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, status = status.as_u16(), "api request failed");
        } else {
            tracing::debug!(error = %self, status = status.as_u16(), "api request refused");
        }
        let body = ErrorBody {
            error: self.public_message(),
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let ApiError::Unauthorized(_) = self {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"fleetpipe\""),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_messages() {
        let cases: Vec<(ApiError, u16, &str)> = vec![
            (ApiError::bad("limit is wrong"), 400, "limit is wrong"),
            (
                ApiError::NotFound("device \"x\" not found".into()),
                404,
                "device \"x\" not found",
            ),
            (
                ApiError::Unavailable("store: timeout".into()),
                503,
                "store: timeout",
            ),
            (
                ApiError::Store(StoreError::Task("secret cause".into())),
                503,
                "the store is unavailable; try again shortly",
            ),
            (
                ApiError::Store(StoreError::Invalid("secret".into())),
                500,
                "internal error reading the store",
            ),
            (ApiError::Busy("too many".into()), 503, "too many"),
            (ApiError::Unauthorized("no token".into()), 401, "no token"),
            (
                ApiError::Forbidden("needs admin".into()),
                403,
                "needs admin",
            ),
            (ApiError::Conflict("taken".into()), 409, "taken"),
            (
                ApiError::TimedOut(Duration::from_secs(10)),
                503,
                "no answer within 10s; the server is busy, try again shortly",
            ),
            (
                ApiError::Internal("task panicked".into()),
                500,
                "internal error",
            ),
            (
                ApiError::Store(StoreError::Ambiguous("h1/cpu has 4 series".into())),
                400,
                "h1/cpu has 4 series; pick one with tag=KEY:VALUE or a label, \
                 sensor=SENSOR{KEY=VALUE,…}",
            ),
        ];
        for (err, status, message) in cases {
            assert_eq!(err.status().as_u16(), status, "{err:?}");
            assert_eq!(err.public_message(), message, "{err:?}");
        }
    }

    #[test]
    fn every_503_says_when_to_retry() {
        let cases: Vec<(ApiError, Option<u64>)> = vec![
            (ApiError::bad("x"), None),
            (ApiError::NotFound("x".into()), None),
            (ApiError::Internal("x".into()), None),
            (ApiError::Store(StoreError::Invalid("x".into())), None),
            (ApiError::Store(StoreError::Ambiguous("x".into())), None),
            (ApiError::Busy("x".into()), Some(1)),
            (ApiError::TimedOut(Duration::from_secs(1)), Some(5)),
            (ApiError::Unavailable("x".into()), Some(5)),
            (ApiError::Store(StoreError::Task("x".into())), Some(5)),
        ];
        for (err, want) in cases {
            assert_eq!(err.retry_after(), want, "{err:?}");
            let response = err.into_response();
            let header = response
                .headers()
                .get(header::RETRY_AFTER)
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            assert_eq!(header, want);
        }
    }
}
