//! `/api/v1/live`: Server-Sent Events of state changes.
//!
//! Each client reads the index's broadcast through its own receiver. The broadcast keeps
//! the last [`LIVE_CAPACITY`](crate::index::LIVE_CAPACITY) events; a client that falls
//! further behind skips ahead and gets a `lagged` event saying how many it missed, so a
//! slow client costs no memory beyond that ring. The response body is only produced as
//! fast as the client reads it.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::header::{HeaderName, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use futures::{Stream, StreamExt};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::broadcast::Receiver;

use crate::error::{ApiError, ErrorBody};
use crate::index::LiveEvent;
use crate::model::{LiveLagged, LiveState};
use crate::params::{truncate, Params};
use crate::AppState;

/// Which events a client wants.
#[derive(Debug, Clone, Default)]
struct Filter {
    device: Option<String>,
    sensors: Option<Vec<String>>,
}

impl Filter {
    fn matches(&self, e: &LiveEvent) -> bool {
        self.device.as_deref().is_none_or(|d| d == &*e.device)
            && self
                .sensors
                .as_ref()
                .is_none_or(|list| list.iter().any(|s| s == &*e.sensor))
    }
}

/// A live stream of state changes as Server-Sent Events.
#[utoipa::path(
    get,
    path = "/api/v1/live",
    tag = "live",
    description = "Server-Sent Events: one `state` event per change of a series' latest \
        value, `data` a LiveState document; a series with tags has them in `tags` (its key \
        in the device's `sensors` is then the label `sensor{k=v,…}`). A client that reads \
        too slowly misses events \
        and receives a `lagged` event (`{\"dropped\": N}`) instead. Comments are sent as \
        keep-alives every 15 s.",
    params(
        ("device" = Option<String>, Query, description = "Only this device.", example = "v00042"),
        ("sensor" = Option<String>, Query, description = "Only these sensors, comma-separated: sensor names, each with every series (tag set) of it.", example = "speed,soc"),
    ),
    responses(
        (status = 200, description = "An endless event stream.", content_type = "text/event-stream", body = LiveState),
        (status = 400, description = "A parameter is unknown, repeated or empty.", body = ErrorBody),
    )
)]
pub async fn live(
    State(st): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    let p = Params::parse(query.as_deref(), &["device", "sensor"])?;
    let device = match p.one("device")? {
        Some("") => return Err(ApiError::bad("device must not be empty")),
        Some(d) => Some(d.to_string()),
        None => None,
    };
    let sensors = match p.one("sensor")? {
        Some(list) => {
            let names: Vec<String> = list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            if names.is_empty() {
                return Err(ApiError::bad(format!(
                    "sensor must name sensors, comma-separated (speed,soc), got {:?}",
                    truncate(list)
                )));
            }
            Some(names)
        }
        None => None,
    };
    let events = events(st.index.subscribe(), Filter { device, sensors })
        .take_until(st.shutdown.clone().cancelled_owned());
    let sse = Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)));
    // Tell reverse proxies (nginx) not to buffer the stream.
    let no_buffering = (
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    Ok(([no_buffering], sse))
}

fn events(
    rx: Receiver<LiveEvent>,
    filter: Filter,
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold((rx, filter), |(mut rx, filter)| async move {
        loop {
            match rx.recv().await {
                Ok(e) if filter.matches(&e) => {
                    let event = Event::default().event("state").data(&*e.json);
                    return Some((Ok(event), (rx, filter)));
                }
                Ok(_) => continue,
                Err(RecvError::Lagged(dropped)) => {
                    let data = serde_json::to_string(&LiveLagged { dropped }).unwrap_or_default();
                    let event = Event::default().event("lagged").data(data);
                    return Some((Ok(event), (rx, filter)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    })
}
