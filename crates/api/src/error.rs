//! The one error type of the HTTP layer: every handler returns `Result<_, ApiError>`, and
//! every error becomes a JSON body `{"error": "..."}` with a stable, human-readable message.

use axum::http::StatusCode;
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
    /// The store failed; transient failures are 503, anything else 500.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A dependency (store, NATS) did not answer in time (503).
    #[error("{0}")]
    Unavailable(String),
}

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
            ApiError::Store(e) if e.is_transient() => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// What the client sees: the message for input errors, a stable summary otherwise
    /// (the cause, which may name hosts or SQL, goes to the log only).
    fn public_message(&self) -> String {
        match self {
            ApiError::Store(e) if e.is_transient() => {
                "the store is unavailable; try again shortly".into()
            }
            ApiError::Store(_) => "internal error reading the store".into(),
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
        (status, Json(body)).into_response()
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
        ];
        for (err, status, message) in cases {
            assert_eq!(err.status().as_u16(), status, "{err:?}");
            assert_eq!(err.public_message(), message, "{err:?}");
        }
    }
}
