//! `/api/v1/devices/{id}/config`: a device's live configuration in the KV bucket
//! `fleetpipe_config`, which its `fleetpipe-agent` follows (format and checks in
//! `fleetpipe_device::live`). `GET` needs `read`; `PUT` needs `operator` and is the API's
//! second write path (after the token routes): it writes that bucket, never the store.

use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::Json;
use fleetpipe_device::live::{LiveConfig, MAX_CONFIG_BYTES};
use fleetpipe_proto::is_valid_token;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody, UnavailableResponse};
use crate::params::{truncate, Params};
use crate::AppState;

/// A device's configuration as stored.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeviceConfig {
    #[schema(example = "truck-042")]
    pub device: String,
    /// The KV revision; the device reports the one it runs on `vehicle.<id>._status`.
    pub revision: u64,
    /// When it was set, RFC 3339.
    pub created: String,
    /// The TOML text: `[sensors.NAME]` tables with `enabled`, `rate_hz`, `deadband`,
    /// `heartbeat`.
    #[schema(example = "[sensors.cpu_temp]\nrate_hz = 2.0\n")]
    pub config: String,
}

/// What a `PUT` stored.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ConfigStored {
    pub device: String,
    pub revision: u64,
}

fn bucket(st: &AppState) -> Result<&async_nats::jetstream::kv::Store, ApiError> {
    st.device_config.as_ref().ok_or_else(|| {
        ApiError::Unavailable("device configuration storage is not available".into())
    })
}

fn device_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(id) = path.map_err(|_| ApiError::NotFound("no such device".into()))?;
    if !is_valid_token(&id) {
        return Err(ApiError::NotFound(format!(
            "{:?} is not a device id",
            truncate(&id)
        )));
    }
    Ok(id)
}

/// The device's configuration; 404 when it has none (its file's settings apply).
#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}/config",
    tag = "devices",
    params(("id" = String, Path, description = "Device id.")),
    security(("bearer" = ["read"])),
    responses(
        (status = 200, description = "The configuration and its revision.", body = DeviceConfig),
        (status = 400, description = "A query parameter was given (none are accepted).", body = ErrorBody),
        (status = 404, description = "The device has no configuration.", body = ErrorBody),
        (status = 503, response = UnavailableResponse),
    )
)]
pub async fn get(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Json<DeviceConfig>, ApiError> {
    Params::parse(query.as_deref(), &[])?;
    let id = device_id(path)?;
    let entry = bucket(&st)?
        .entry(&id)
        .await
        .map_err(|e| ApiError::Unavailable(format!("cannot read the configuration: {e}")))?;
    let Some(entry) = entry.filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put)
    else {
        return Err(ApiError::NotFound(format!(
            "device {id} has no configuration"
        )));
    };
    Ok(Json(DeviceConfig {
        device: id,
        revision: entry.revision,
        created: entry.created.to_string(),
        config: String::from_utf8_lossy(&entry.value).into_owned(),
    }))
}

/// Sets the device's configuration (TOML in the body). It is checked here for syntax and
/// values; the device checks it against its own sensors, applies it within a second or
/// refuses it, and reports which on `vehicle.<id>._status`.
#[utoipa::path(
    put,
    path = "/api/v1/devices/{id}/config",
    tag = "devices",
    params(("id" = String, Path, description = "Device id.")),
    security(("bearer" = ["operator"])),
    request_body(content = String, content_type = "application/toml",
        description = "`[sensors.NAME]` tables with `enabled`, `rate_hz`, `deadband`, `heartbeat`."),
    responses(
        (status = 200, description = "Stored, with its revision.", body = ConfigStored),
        (status = 400, description = "Not valid TOML, an unknown setting or a bad value: every problem listed.", body = ErrorBody),
        (status = 404, description = "Not a device id.", body = ErrorBody),
        (status = 503, response = UnavailableResponse),
    )
)]
pub async fn put(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Json<ConfigStored>, ApiError> {
    Params::parse(query.as_deref(), &[])?;
    let id = device_id(path)?;
    if body.len() > MAX_CONFIG_BYTES {
        return Err(ApiError::bad(format!(
            "the configuration is over {MAX_CONFIG_BYTES} bytes"
        )));
    }
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::bad("the configuration must be UTF-8 TOML"))?;
    LiveConfig::parse(text).map_err(|p| ApiError::bad(truncate(&p.join("; "))))?;
    let revision = bucket(&st)?
        .put(&id, body)
        .await
        .map_err(|e| ApiError::Unavailable(format!("cannot store the configuration: {e}")))?;
    tracing::info!(device = %id, revision, "device configuration set");
    Ok(Json(ConfigStored {
        device: id,
        revision,
    }))
}
