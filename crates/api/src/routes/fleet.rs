//! `/api/v1/fleet/summary`.

use std::sync::atomic::Ordering::Relaxed;

use axum::extract::{RawQuery, State};
use axum::Json;

use crate::error::{ApiError, ErrorBody, UnavailableResponse};
use crate::model::FleetSummary;
use crate::params::Params;
use crate::AppState;

/// Online/offline counts and min/avg/max of every sensor across the fleet, from the
/// in-memory index (one pass, no store or broker round trip, on the blocking pool). A
/// sensor's figures cover every series of it, whatever its tags: one value per series.
#[utoipa::path(
    get,
    path = "/api/v1/fleet/summary",
    tag = "fleet",
    responses(
        (status = 200, description = "The fleet summary.", body = FleetSummary),
        (status = 400, description = "A query parameter was given (none are accepted).", body = ErrorBody),
        (status = 503, response = UnavailableResponse),
    )
)]
pub async fn summary(
    State(st): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<FleetSummary>, ApiError> {
    Params::parse(query.as_deref(), &[])?;
    let s = st.index_pass(|index, online| index.summary(online)).await?;
    let dead_letters = if st.broker.polled.load(Relaxed) {
        st.broker.dead_letters.load(Relaxed)
    } else {
        st.stats.dead_letters.load(Relaxed)
    };
    Ok(Json(FleetSummary {
        devices: s.devices,
        online: s.online,
        offline: s.devices - s.online,
        sensors: s.sensors,
        dead_letters,
    }))
}
