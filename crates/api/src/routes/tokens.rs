//! `/api/v1/tokens`: list, create and revoke the API's bearer tokens (role `admin`). The
//! API's one write path: it writes the token bucket, never the store.

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use utoipa::ToSchema;

use crate::auth::tokens::{self, CreatedToken, TokenError, TokenInfo};
use crate::auth::Role;
use crate::error::{ApiError, ErrorBody, UnavailableResponse};
use crate::params::{truncate, Params};
use crate::AppState;

/// The tokens, by name.
#[derive(Debug, Clone, serde::Serialize, Deserialize, ToSchema)]
pub struct TokenList {
    pub items: Vec<TokenInfo>,
}

/// What `POST /api/v1/tokens` takes.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// Unique; 1 to 64 letters, digits, `-`, `_`, `.` or `@`.
    #[schema(example = "grafana")]
    pub name: String,
    pub role: Role,
}

/// Largest request body accepted: a name and a role.
const MAX_BODY: usize = 4096;

fn bucket(st: &AppState) -> Result<&async_nats::jetstream::kv::Store, ApiError> {
    st.auth
        .bucket
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable("token storage is not available".into()))
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::InvalidName(m) => ApiError::BadRequest(m),
            e @ TokenError::NameTaken(_) => ApiError::Conflict(e.to_string()),
            e @ TokenError::NotFound(_) => ApiError::NotFound(e.to_string()),
            e @ (TokenError::Broker(_) | TokenError::Random) => {
                ApiError::Unavailable(e.to_string())
            }
        }
    }
}

/// Every token: id, name, role, creation time; never a secret or a hash.
#[utoipa::path(
    get,
    path = "/api/v1/tokens",
    tag = "tokens",
    security(("bearer" = ["admin"])),
    responses(
        (status = 200, description = "The tokens, by name.", body = TokenList),
        (status = 400, description = "A query parameter was given (none are accepted).", body = ErrorBody),
        (status = 503, response = UnavailableResponse),
    )
)]
pub async fn list(
    State(st): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<TokenList>, ApiError> {
    Params::parse(query.as_deref(), &[])?;
    let items = tokens::list(bucket(&st)?).await?;
    Ok(Json(TokenList { items }))
}

/// Creates a token; the answer holds the token itself, shown this once.
#[utoipa::path(
    post,
    path = "/api/v1/tokens",
    tag = "tokens",
    security(("bearer" = ["admin"])),
    request_body = NewToken,
    responses(
        (status = 201, description = "Created. `token` is the bearer token, shown this once.", body = CreatedToken),
        (status = 400, description = "The body is not `{\"name\", \"role\"}` or the name is invalid.", body = ErrorBody),
        (status = 409, description = "A token has this name already.", body = ErrorBody),
        (status = 503, response = UnavailableResponse),
    )
)]
pub async fn create(
    State(st): State<AppState>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    Params::parse(query.as_deref(), &[])?;
    if body.len() > MAX_BODY {
        return Err(ApiError::bad(format!(
            "the body is over {MAX_BODY} bytes; send {{\"name\": …, \"role\": …}}"
        )));
    }
    let new: NewToken = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad(format!(
            "the body must be JSON {{\"name\": \"…\", \"role\": \"read\"|\"operator\"|\"admin\"}}: {}",
            truncate(&e.to_string())
        ))
    })?;
    let created: CreatedToken = tokens::create(bucket(&st)?, &new.name, new.role).await?;
    // Usable at once on this replica; the others learn it from the watch.
    if let Ok(Some(value)) = bucket(&st)?.get(&created.info.id).await {
        if let Ok(record) = serde_json::from_slice(&value) {
            st.auth.tokens.insert(&created.info.id, record);
        }
    }
    tracing::info!(id = %created.info.id, role = %created.info.role, "api token created");
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// Revokes a token: every API replica refuses it within a second.
#[utoipa::path(
    delete,
    path = "/api/v1/tokens/{id}",
    tag = "tokens",
    security(("bearer" = ["admin"])),
    params(("id" = String, Path, description = "The token's id (as listed).", example = "3f9a0c1d2b4e5f60")),
    responses(
        (status = 200, description = "Revoked; the token as it was.", body = TokenInfo),
        (status = 404, description = "No token has this id.", body = ErrorBody),
        (status = 503, response = UnavailableResponse),
    )
)]
pub async fn revoke(
    State(st): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Json<TokenInfo>, ApiError> {
    Params::parse(query.as_deref(), &[])?;
    let Ok(Path(id)) = id else {
        return Err(ApiError::NotFound("no such token".into()));
    };
    if !tokens::is_id(&id) {
        return Err(ApiError::NotFound(format!(
            "no token with id {:?} (an id is 16 hex digits, as listed)",
            truncate(&id)
        )));
    }
    let revoked = tokens::revoke_id(bucket(&st)?, &id).await?;
    st.auth.tokens.remove(&revoked.id);
    tracing::info!(id = %revoked.id, "api token revoked");
    Ok(Json(revoked))
}
