//! `/api/v1/devices`, `/api/v1/devices/{id}` and `/api/v1/devices/{id}/series`.

use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::Json;
use fleetpipe_proto::{is_valid_token, Timestamp};
use fleetpipe_store::{Point, Range, Resolution, Rollup, SeriesInfo};

use crate::error::{ApiError, ErrorBody, UnavailableResponse};
use crate::index::{ListQuery, SortKey};
use crate::limits::QuerySlot;
use crate::model::{Device, DeviceList, Series, SeriesPoint, SeriesSource};
use crate::params::{
    micros, parse_choice, parse_duration, parse_instant, parse_uint, truncate, Params,
};
use crate::tags::{self, Pick};
use crate::AppState;

/// Devices per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: u64 = 100;
/// The largest `limit` accepted.
pub const MAX_LIMIT: u64 = 10_000;
/// The largest `offset` accepted.
const MAX_OFFSET: u64 = u32::MAX as u64;

/// Ranges longer than this are served from rollups.
pub const RAW_MAX_RANGE: Duration = Duration::from_secs(6 * 3600);
/// Most raw points returned; a range holding more is served from rollups.
pub const RAW_CAP: usize = 10_000;
/// Ranges longer than this are served in buckets of an hour at least, from the hourly
/// rollups.
pub const HOURLY_RANGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Most rollup buckets returned; longer ranges get wider buckets.
pub const MAX_BUCKETS: u64 = 10_000;
/// Longest range a series request may ask for.
pub const MAX_RANGE: Duration = Duration::from_secs(366 * 24 * 3600);
/// Default range when `from` is absent: the last hour.
const DEFAULT_SPAN: Duration = Duration::from_secs(3600);
const MINUTE_US: i64 = 60_000_000;
const HOUR_US: i64 = 60 * MINUTE_US;

/// A device id from the path; a malformed one (bad percent-encoding) is just not found.
fn device_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    match path {
        Ok(Path(id)) => Ok(id),
        Err(_) => Err(ApiError::NotFound(
            "device not found (the id is not valid UTF-8)".into(),
        )),
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("device {:?} not found", truncate(id)))
}

/// A `tag` parameter: `KEY:VALUE` (split at the first `:`), with a name and value a stored
/// tag can have ([`tags::check_tag`]).
fn parse_tag(t: &str) -> Result<(String, String), ApiError> {
    match t.split_once(':') {
        Some((k, v)) if !k.is_empty() => match tags::check_tag(k, v) {
            None => Ok((k.to_string(), v.to_string())),
            Some(problem) => Err(ApiError::bad(format!("tag {:?}: {problem}", truncate(t)))),
        },
        _ => Err(ApiError::bad(format!(
            "tag must be KEY:VALUE (site:munich), got {:?}",
            truncate(t)
        ))),
    }
}

/// Every device with its latest state; filter, sort, paginate.
#[utoipa::path(
    get,
    path = "/api/v1/devices",
    tag = "devices",
    params(
        ("prefix" = Option<String>, Query, description = "Only ids starting with this.", example = "v00"),
        ("tag" = Option<Vec<String>>, Query, description = "Only devices with this tag, as `KEY:VALUE`; repeat for several (all must match).", example = "site:munich"),
        ("online" = Option<bool>, Query, description = "Only online (`true`) or offline (`false`) devices."),
        ("sort" = Option<String>, Query, description = "`id` (default) or `last_seen`."),
        ("order" = Option<String>, Query, description = "`asc` (default) or `desc`."),
        ("limit" = Option<u64>, Query, description = "Page size, 0 to 10000; default 100."),
        ("offset" = Option<u64>, Query, description = "Devices to skip; default 0."),
    ),
    responses(
        (status = 200, description = "A page of devices and the number matching in all.", body = DeviceList),
        (status = 400, description = "A parameter is unknown, repeated or invalid.", body = ErrorBody),
        (status = 503, response = UnavailableResponse),
    )
)]
pub async fn list(
    State(st): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<DeviceList>, ApiError> {
    let p = Params::parse(
        query.as_deref(),
        &[
            "prefix", "tag", "online", "sort", "order", "limit", "offset",
        ],
    )?;
    let limit = match p.one("limit")? {
        Some(v) => parse_uint("limit", v, MAX_LIMIT)?,
        None => DEFAULT_LIMIT,
    };
    let offset = match p.one("offset")? {
        Some(v) => parse_uint("offset", v, MAX_OFFSET)?,
        None => 0,
    };
    let tags = p.all("tag").map(parse_tag).collect::<Result<Vec<_>, _>>()?;
    let online = match p.one("online")? {
        Some(v) => Some(parse_choice("online", v, &["true", "false"])? == "true"),
        None => None,
    };
    let sort = match p.one("sort")? {
        Some(v) => match parse_choice("sort", v, &["id", "last_seen"])? {
            "last_seen" => SortKey::LastSeen,
            _ => SortKey::Id,
        },
        None => SortKey::Id,
    };
    let descending = match p.one("order")? {
        Some(v) => parse_choice("order", v, &["asc", "desc"])? == "desc",
        None => false,
    };
    let q = ListQuery {
        prefix: p.one("prefix")?.unwrap_or_default().to_string(),
        tags,
        online,
        sort,
        descending,
        limit: limit as usize,
        offset: offset as usize,
    };
    // Off the async threads: filtering and sorting may walk every device.
    let (total, items) = st
        .index_pass(move |index, online| index.list(&q, online))
        .await?;
    Ok(Json(DeviceList {
        total,
        limit,
        offset,
        items,
    }))
}

/// One device's latest state.
#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}",
    tag = "devices",
    params(("id" = String, Path, description = "Device id.", example = "v00042")),
    responses(
        (status = 200, description = "The device.", body = Device),
        (status = 400, description = "A query parameter was given (none are accepted).", body = ErrorBody),
        (status = 404, description = "No such device.", body = ErrorBody),
    )
)]
pub async fn one(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Json<Device>, ApiError> {
    let id = device_id(path)?;
    Params::parse(query.as_deref(), &[])?;
    st.index
        .device(&id, st.online())
        .map(Json)
        .ok_or_else(|| not_found(&id))
}

/// Where a series is read from: raw readings, or rollups merged into buckets of this many
/// µs: a multiple of a minute read from the per-minute rollups, or, for an hour or more, a
/// multiple of an hour read from the hourly ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Raw,
    Rollups { bucket_us: i64 },
}

/// The rule, documented in the OpenAPI description and the README: rollups when `step` is
/// at least 60 s or the range is longer than 6 h; otherwise raw readings (and rollups
/// after all when the range holds more than [`RAW_CAP`] of them, see [`rollup_plan`]).
pub fn plan(from: Timestamp, to: Timestamp, step: Option<Duration>) -> Plan {
    let span = to.as_micros().saturating_sub(from.as_micros());
    let coarse_step = step.is_some_and(|s| s >= Duration::from_secs(60));
    if coarse_step || span > micros(RAW_MAX_RANGE) {
        rollup_plan(from, to, step)
    } else {
        Plan::Raw
    }
}

/// Rollup buckets: `step` rounded up to whole minutes, at least one minute (an hour for
/// ranges longer than [`HOURLY_RANGE`]), and wide enough that the range holds at most
/// [`MAX_BUCKETS`]; a bucket of an hour or more is rounded up to whole hours (it is read
/// from the hourly rollups: a month is 720 rows rather than 43,200).
pub fn rollup_plan(from: Timestamp, to: Timestamp, step: Option<Duration>) -> Plan {
    let span = u64::try_from(to.as_micros().saturating_sub(from.as_micros())).unwrap_or(0);
    let minute = MINUTE_US as u64;
    let round_up = |us: u64, unit: u64| us.div_ceil(unit).max(1).saturating_mul(unit);
    let from_step = step.map_or(minute, |s| round_up(micros(s) as u64, minute));
    let from_span = round_up(span.div_ceil(MAX_BUCKETS), minute);
    let floor = if span > micros(HOURLY_RANGE) as u64 {
        HOUR_US as u64
    } else {
        minute
    };
    let mut bucket = from_step.max(from_span).max(floor);
    if bucket >= HOUR_US as u64 {
        bucket = round_up(bucket, HOUR_US as u64);
    }
    Plan::Rollups {
        bucket_us: i64::try_from(bucket).unwrap_or(i64::MAX),
    }
}

/// The rollups buckets of `bucket_us` are merged from: hourly when it is a whole number
/// of hours.
pub fn resolution(bucket_us: i64) -> Resolution {
    if bucket_us % HOUR_US == 0 {
        Resolution::Hour
    } else {
        Resolution::Minute
    }
}

/// Merges rollups (oldest first; minutes, or hours when `bucket_us` is a number of hours)
/// into buckets aligned to multiples of `bucket_us` since the epoch: count-weighted
/// average, min of minima, max of maxima, the last value of the newest rollup.
pub fn merge_rollups(rollups: &[Rollup], bucket_us: i64) -> Vec<SeriesPoint> {
    struct Bucket {
        start: i64,
        count: u64,
        sum: f64,
        min: f64,
        max: f64,
        last: f64,
    }
    let mut out: Vec<Bucket> = Vec::new();
    for r in rollups {
        let m = r.start.as_micros();
        let start = m - m.rem_euclid(bucket_us);
        let weighted = r.avg * r.count as f64;
        match out.last_mut() {
            Some(b) if b.start == start => {
                b.count += r.count;
                b.sum += weighted;
                b.min = b.min.min(r.min);
                b.max = b.max.max(r.max);
                b.last = r.last;
            }
            _ => out.push(Bucket {
                start,
                count: r.count,
                sum: weighted,
                min: r.min,
                max: r.max,
                last: r.last,
            }),
        }
    }
    out.into_iter()
        .map(|b| SeriesPoint {
            ts: Timestamp::from_micros(b.start).to_rfc3339(),
            value: if b.count > 0 {
                b.sum / b.count as f64
            } else {
                b.last
            },
            min: Some(b.min),
            max: Some(b.max),
            count: Some(b.count),
            last: Some(b.last),
        })
        .collect()
}

/// The range of rollups a series in buckets of `bucket_us` reads: from the start of the
/// bucket holding `from` (so its first minutes are not left out) to `to`; a 400 when it
/// holds more than `max_rows` rollups (minutes, or hours for buckets of whole hours; one
/// row per minute or hour at most), which bounds the rows read whatever the store holds.
pub fn rollup_range(
    from: Timestamp,
    to: Timestamp,
    bucket_us: i64,
    max_rows: u64,
) -> Result<Range, ApiError> {
    let start = from.as_micros() - from.as_micros().rem_euclid(bucket_us);
    let span = u64::try_from(to.as_micros().saturating_sub(start)).unwrap_or(0);
    let width = resolution(bucket_us).micros();
    let rows = span.div_ceil(width as u64);
    if rows > max_rows {
        let fits = max_rows as f64 * width as f64 / (86_400.0 * 1e6);
        let what = match resolution(bucket_us) {
            Resolution::Minute => "per-minute",
            Resolution::Hour => "hourly",
        };
        return Err(ApiError::bad(format!(
            "the range needs {rows} {what} rollups (from {} to {to}, in buckets of {} s), \
             more than the {max_rows} one request may read (about {fits:.1} days); ask for a \
             shorter range, a step of an hour or more, or split it",
            Timestamp::from_micros(start),
            bucket_us / 1_000_000,
        )));
    }
    Ok(Range {
        from: Timestamp::from_micros(start),
        to,
    })
}

/// The stored series of a device's sensor (every tag set, at most
/// [`fleetpipe_store::MAX_SERIES_LISTED`]) through the request's query slot.
async fn read_series(
    st: &AppState,
    slot: &QuerySlot,
    device: &str,
    sensor: &str,
) -> Result<Vec<SeriesInfo>, ApiError> {
    let (store, device, sensor) = (st.store.clone(), device.to_string(), sensor.to_string());
    slot.read(async move { store.series(&device, Some(&sensor)).await })
        .await
}

/// Raw readings of one series through the request's query slot: at most [`RAW_CAP`] + 1.
async fn read_history(
    st: &AppState,
    slot: &QuerySlot,
    series: &SeriesInfo,
    range: Range,
) -> Result<Vec<Point>, ApiError> {
    let (store, series) = (st.store.clone(), series.clone());
    slot.read(async move {
        store
            .series_history(&series.key(), range, RAW_CAP + 1)
            .await
    })
    .await
}

/// Rollups of one series through the request's query slot; `range` comes from
/// [`rollup_range`], which bounds the rows.
async fn read_rollups(
    st: &AppState,
    slot: &QuerySlot,
    series: &SeriesInfo,
    range: Range,
    resolution: Resolution,
) -> Result<Vec<Rollup>, ApiError> {
    let (store, series) = (st.store.clone(), series.clone());
    slot.read(async move {
        store
            .series_rollups_at(&series.key(), range, resolution)
            .await
    })
    .await
}

/// One series a request may mean: known to the store, to the index (the latest state), or
/// both.
struct Candidate {
    /// Canonical tags.
    tags: Vec<(String, String)>,
    unit: Option<String>,
    /// The store's, when it has stored readings of it.
    stored: Option<SeriesInfo>,
}

/// The series of a device's sensor that the store or the index knows: the store's (with
/// the unit of the latest value when the index has it), then the index's that the store
/// has no reading of yet.
fn candidates(stored: Vec<SeriesInfo>, indexed: &[crate::index::IndexedSeries]) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = stored
        .into_iter()
        .map(|s| {
            let latest = indexed.iter().find(|i| i.tags[..] == s.tags[..]);
            Candidate {
                tags: s.tags.to_vec(),
                unit: latest.map_or_else(|| s.unit.clone(), |i| i.unit.clone()),
                stored: Some(s),
            }
        })
        .collect();
    for i in indexed {
        if !out.iter().any(|c| c.tags == i.tags) {
            out.push(Candidate {
                tags: i.tags.clone(),
                unit: i.unit.clone(),
                stored: None,
            });
        }
    }
    out
}

fn tag_sets<'a>(found: impl ExactSizeIterator<Item = &'a Candidate>) -> String {
    tags::list_tag_sets(found.map(|c| &c.tags[..]))
}

/// History of one sensor: raw readings or per-minute rollups, chosen by the server.
#[utoipa::path(
    get,
    path = "/api/v1/devices/{id}/series",
    tag = "devices",
    description = "History of one series of one device: a sensor with one tag set. The server \
        picks the source and says which in `source`:\n\n\
        * `rollup_1m` or `rollup_1h` when `step` is at least 60 s, or the range is longer \
        than 6 h, or the range holds more than 10,000 raw readings. Rollups are merged into \
        buckets of `step` rounded up to whole minutes (at least 1 min, and wide enough for at \
        most 10,000 buckets); a bucket of an hour or more is rounded up to whole hours and \
        merged from hourly rollups (`rollup_1h`), a shorter one from per-minute rollups \
        (`rollup_1m`). `step` in the response is the bucket width in seconds, and each point \
        has `value` (the average), `min`, `max`, `count` and `last`.\n\
        * `raw` otherwise: every stored reading in the range, oldest first, as `ts` and \
        `value`.\n\n\
        `from` and `to` are RFC 3339 times, `now`, or durations back from now (`-10m`). \
        The range may be at most 366 days.\n\n\
        **Series with tags.** A sensor may have several series on a device, told apart by \
        their tags (Telegraf's `cpu,cpu=cpu0,host=h1 usage_idle=…` to `cpu=cpu3` are four \
        series of `cpu.usage_idle`). `tag=KEY:VALUE` (repeatable) keeps those having every \
        tag given; `sensor` also takes a series label as the device's `sensors` map names it, \
        `cpu.usage_idle{cpu=cpu0,host=h1}` (tags sorted by name; `\\`, `,`, `=`, `{`, `}` \
        escaped with `\\`), whose tags count as given. A series whose tags are exactly those \
        given is the one; otherwise exactly one series must have them all: none is a 404, \
        several a 400 listing their tag sets (up to 10) and saying which tag to add. The \
        answer's `tags` are the series'.\n\n\
        **Bounded reads.** A request reads at most 10,001 raw readings, and at most \
        `api.max_rollup_rows` rollups (100,000 by default: about 69 days of minutes, 11 years of \
        hours): a rollup range needing more (the range from `from`, moved back to the start \
        of its bucket, to `to`, in minutes or hours) is refused with a 400 saying how long a range fits; ask for a \
        shorter range, or split it. At most `api.max_concurrent_queries` (16) requests read \
        the store at once: one more gets a 503 with `Retry-After: 1`; a request that takes \
        longer than `api.request_timeout` (10 s) gets a 503 with `Retry-After: 5`.",
    params(
        ("id" = String, Path, description = "Device id.", example = "v00042"),
        ("sensor" = String, Query, description = "Sensor name, or a series label with its tags (required).", example = "speed"),
        ("tag" = Option<Vec<String>>, Query, description = "Only the series with this tag, as `KEY:VALUE`; repeat for several (all must match).", example = "cpu:cpu0"),
        ("from" = Option<String>, Query, description = "Start (inclusive): RFC 3339, `now`, or a duration back from now (`-10m`). Default: an hour before `to`.", example = "-10m"),
        ("to" = Option<String>, Query, description = "End (exclusive), same forms. Default: now.", example = "now"),
        ("step" = Option<String>, Query, description = "Desired spacing of points: seconds (`60`) or a duration (`5m`). 60 s or more selects rollups.", example = "5m"),
    ),
    responses(
        (status = 200, description = "The series.", body = Series),
        (status = 400, description = "A parameter is missing, unknown, repeated or invalid; several series of the sensor have the tags given (the message lists them); or the range needs more rollup rows than `api.max_rollup_rows`.", body = ErrorBody),
        (status = 404, description = "Unknown device, a sensor the device does not have, or no series of it with the tags given.", body = ErrorBody),
        (status = 503, response = UnavailableResponse),
    )
)]
pub async fn series(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Json<Series>, ApiError> {
    let id = device_id(path)?;
    let p = Params::parse(query.as_deref(), &["sensor", "tag", "from", "to", "step"])?;
    let sensor_param = match p.one("sensor")? {
        Some(s) if !s.is_empty() => s,
        _ => return Err(ApiError::bad("sensor is required, e.g. ?sensor=speed")),
    };
    // Names the wire contract cannot produce have no history; refusing them here also keeps
    // bytes no store accepts (a NUL in PostgreSQL text) away from the store.
    if !is_valid_token(&id) {
        return Err(not_found(&id));
    }
    let (sensor, label_tags) = tags::parse_label(sensor_param).map_err(|problem| {
        ApiError::bad(format!(
            "sensor {:?} is not a series label: {problem}",
            truncate(sensor_param)
        ))
    })?;
    if !sensor.split('.').all(is_valid_token) {
        return Err(ApiError::bad(format!(
            "sensor {:?} is not a sensor name: tokens of letters, digits, '-' or '_', \
             joined by '.' (speed, gps.lat), optionally followed by tags \
             (cpu.usage_idle{{cpu=cpu0}})",
            truncate(sensor)
        )));
    }
    let sensor = sensor.to_string();
    let mut wanted = label_tags.unwrap_or_default();
    for t in p.all("tag") {
        wanted.push(parse_tag(t)?);
    }
    let now = Timestamp::now();
    let to = match p.one("to")? {
        Some(v) => parse_instant("to", v, now)?,
        // Exclusive end: include a reading stamped this very microsecond.
        None => now.saturating_add_micros(1),
    };
    let from = match p.one("from")? {
        Some(v) => parse_instant("from", v, now)?,
        None => to.saturating_add_micros(-micros(DEFAULT_SPAN)),
    };
    if from >= to {
        return Err(ApiError::bad(format!(
            "from ({from}) must be before to ({to})"
        )));
    }
    if to.as_micros().saturating_sub(from.as_micros()) > micros(MAX_RANGE) {
        return Err(ApiError::bad(
            "the range from..to must not be longer than 366 days",
        ));
    }
    let step = match p.one("step")? {
        Some(v) => Some(parse_duration("step", v, MAX_RANGE)?),
        None => None,
    };

    let indexed = st.index.series_of(&id, &sensor);
    let mut plan = plan(from, to, step);
    // Bounded reads: a range needing too many rollups is refused before any store read, so
    // it is a 400 even when the server is busy; then a query slot, or a 503.
    if let Plan::Rollups { bucket_us } = plan {
        rollup_range(from, to, bucket_us, st.limits.max_rollup_rows)?;
    }
    let slot = st.limits.query_slot()?;

    // Which series: the store's and the latest state's, picked by their tags.
    let stored = read_series(&st, &slot, &id, &sensor).await?;
    let found = candidates(stored, indexed.as_deref().unwrap_or_default());
    let chosen = match tags::pick(&found, |c| &c.tags, &wanted) {
        Pick::One(c) => c,
        Pick::None if found.is_empty() => {
            return Err(match indexed {
                None => not_found(&id),
                Some(_) => ApiError::NotFound(format!(
                    "device {:?} has no sensor {:?}",
                    truncate(&id),
                    truncate(&sensor)
                )),
            })
        }
        Pick::None => {
            let asked = tags::tag_set(wanted.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            return Err(ApiError::NotFound(format!(
                "device {:?} has no series of sensor {:?} with the tags {}; its tag sets: {}",
                truncate(&id),
                truncate(&sensor),
                truncate(&asked),
                tag_sets(found.iter())
            )));
        }
        Pick::Several(matches) => {
            let sets: Vec<&[(String, String)]> = matches.iter().map(|c| &c.tags[..]).collect();
            let example = &matches[0].tags;
            let label = tags::label(
                &sensor,
                example.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            );
            let hint = match tags::telling_tag(&sets) {
                Some((k, v)) => format!("add tag={k}:{v}, or "),
                None => String::new(),
            };
            let with = if wanted.is_empty() {
                String::new()
            } else {
                let asked = tags::tag_set(wanted.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                format!(" with the tags {}", truncate(&asked))
            };
            return Err(ApiError::bad(format!(
                "device {:?} has {} series of sensor {:?}{with}, told apart by their tags: {}; \
                 pick one: {hint}name it in full as sensor={}",
                truncate(&id),
                matches.len(),
                truncate(&sensor),
                tag_sets(matches.into_iter()),
                truncate(&label),
            )));
        }
    };

    let mut points = Vec::new();
    // A series only the latest state knows (its first readings are not stored yet) has no
    // history yet.
    let stored = chosen.stored.as_ref();
    // Raw readings before the retention horizon were pruned: the rollups still have them.
    if plan == Plan::Raw && stored.is_some() {
        if let Some(horizon) = st.store.raw_horizon().await? {
            if from < horizon {
                plan = rollup_plan(from, to, step);
            }
        }
    }
    if let (Plan::Raw, Some(series)) = (plan, stored) {
        let raw = read_history(&st, &slot, series, Range { from, to }).await?;
        if raw.len() > RAW_CAP {
            plan = rollup_plan(from, to, step);
        } else {
            points = raw
                .into_iter()
                .map(|r| SeriesPoint {
                    ts: r.ts.to_rfc3339(),
                    value: r.value,
                    min: None,
                    max: None,
                    count: None,
                    last: None,
                })
                .collect();
        }
    }
    if let (Plan::Rollups { bucket_us }, Some(series)) = (plan, stored) {
        let range = rollup_range(from, to, bucket_us, st.limits.max_rollup_rows)?;
        let rollups = read_rollups(&st, &slot, series, range, resolution(bucket_us)).await?;
        points = merge_rollups(&rollups, bucket_us);
    }

    let (source, step) = match plan {
        Plan::Raw => (SeriesSource::Raw, None),
        Plan::Rollups { bucket_us } => {
            let source = match resolution(bucket_us) {
                Resolution::Minute => SeriesSource::Rollup1m,
                Resolution::Hour => SeriesSource::Rollup1h,
            };
            (source, Some((bucket_us / 1_000_000) as u64))
        }
    };
    Ok(Json(Series {
        device: id,
        sensor,
        tags: chosen.tags.iter().cloned().collect(),
        unit: chosen.unit.clone(),
        source,
        from: from.to_rfc3339(),
        to: to.to_rfc3339(),
        step,
        points,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_771_149_600_000_000;
    const MIN: i64 = MINUTE_US;
    const HOUR: i64 = 60 * MIN;

    #[test]
    fn source_rule() {
        let at = |us: i64| Timestamp::from_micros(T0 + us);
        let secs = |s: u64| Some(Duration::from_secs(s));
        let cases: &[(i64, Option<Duration>, Plan)] = &[
            (10 * MIN, None, Plan::Raw),
            (6 * HOUR, None, Plan::Raw),
            (6 * HOUR, secs(59), Plan::Raw),
            (10 * MIN, secs(60), Plan::Rollups { bucket_us: MIN }),
            (10 * MIN, secs(90), Plan::Rollups { bucket_us: 2 * MIN }),
            (6 * HOUR + 1, None, Plan::Rollups { bucket_us: MIN }),
            (24 * HOUR, secs(300), Plan::Rollups { bucket_us: 5 * MIN }),
            // A week in at most 10,000 buckets: 1.008 min, rounded up to 2.
            (7 * 24 * HOUR, None, Plan::Rollups { bucket_us: 2 * MIN }),
            (
                7 * 24 * HOUR,
                secs(60),
                Plan::Rollups { bucket_us: 2 * MIN },
            ),
            // Longer: hours.
            (7 * 24 * HOUR + 1, None, Plan::Rollups { bucket_us: HOUR }),
            (30 * 24 * HOUR, None, Plan::Rollups { bucket_us: HOUR }),
            (30 * 24 * HOUR, secs(300), Plan::Rollups { bucket_us: HOUR }),
            // Steps of an hour or more are whole hours.
            (10 * MIN, secs(3600), Plan::Rollups { bucket_us: HOUR }),
            (
                10 * MIN,
                secs(3601),
                Plan::Rollups {
                    bucket_us: 2 * HOUR,
                },
            ),
            (
                24 * HOUR,
                secs(5400),
                Plan::Rollups {
                    bucket_us: 2 * HOUR,
                },
            ),
            (
                24 * HOUR,
                secs(59 * 60),
                Plan::Rollups {
                    bucket_us: 59 * MIN,
                },
            ),
            (
                30 * 24 * HOUR,
                secs(3600),
                Plan::Rollups { bucket_us: HOUR },
            ),
        ];
        for &(span, step, want) in cases {
            assert_eq!(
                plan(at(0), at(span), step),
                want,
                "span {span} step {step:?}"
            );
        }
        assert_eq!(resolution(59 * MIN), Resolution::Minute);
        assert_eq!(resolution(HOUR), Resolution::Hour);
        assert_eq!(resolution(3 * HOUR), Resolution::Hour);
        assert_eq!(resolution(90 * MIN), Resolution::Minute);
    }

    #[test]
    fn rollup_rows_are_bounded() {
        let at = |us: i64| Timestamp::from_micros(T0 + us);
        // T0 is on a whole hour: a day in minute buckets is 1440 rows.
        let day = rollup_range(at(0), at(24 * HOUR), MIN, 1440).unwrap();
        assert_eq!((day.from, day.to), (at(0), at(24 * HOUR)));
        let err = rollup_range(at(0), at(24 * HOUR + 1), MIN, 1440).unwrap_err();
        assert_eq!(err.status().as_u16(), 400);
        assert!(
            err.to_string().contains("needs 1441 per-minute rollups"),
            "{err}"
        );
        assert!(err.to_string().contains("about 1.0 days"), "{err}");
        // The read starts at the bucket holding `from`: wide buckets read more minutes.
        let r = rollup_range(at(45 * MIN), at(HOUR), 30 * MIN, 30).unwrap();
        assert_eq!(r.from, at(30 * MIN));
        assert!(rollup_range(at(45 * MIN), at(HOUR), 30 * MIN, 29).is_err());
        // Hourly buckets count hours.
        let r = rollup_range(at(30 * MIN), at(HOUR), HOUR, 1).unwrap();
        assert_eq!(r.from, at(0));
        // A year of minutes at the default bound does not fit; 69 days do; a year of hours
        // does, the longest range there is.
        let max = fleetpipe_pipeline::config::ApiConfig::default().max_rollup_rows;
        assert!(rollup_range(at(0), at(366 * 24 * HOUR), 53 * MIN, max).is_err());
        assert!(rollup_range(at(0), at(69 * 24 * HOUR), 10 * MIN, max).is_ok());
        let year = rollup_range(at(0), at(366 * 24 * HOUR), HOUR, 8784).unwrap();
        assert_eq!(year.from, at(0));
        let err = rollup_range(at(0), at(366 * 24 * HOUR), HOUR, 8783).unwrap_err();
        assert!(
            err.to_string().contains("needs 8784 hourly rollups"),
            "{err}"
        );
    }

    #[test]
    fn merging_rollups() {
        let r = |minute: i64, count: u64, min: f64, max: f64, avg: f64, last: f64| Rollup {
            start: Timestamp::from_micros(T0 + minute * MIN),
            count,
            min,
            max,
            avg,
            last,
        };
        let rollups = [
            r(0, 1, 10.0, 10.0, 10.0, 10.0),
            r(1, 3, 0.0, 30.0, 20.0, 5.0),
            r(2, 2, 1.0, 2.0, 1.5, 2.0),
        ];
        let points = merge_rollups(&rollups, 2 * MIN);
        assert_eq!(points.len(), 2);
        assert_eq!(points[0].ts, Timestamp::from_micros(T0).to_rfc3339());
        assert_eq!(points[0].count, Some(4));
        assert_eq!(points[0].value, (10.0 + 60.0) / 4.0);
        assert_eq!((points[0].min, points[0].max), (Some(0.0), Some(30.0)));
        assert_eq!(points[0].last, Some(5.0));
        assert_eq!(points[1].count, Some(2));
        let one_minute = merge_rollups(&rollups, MIN);
        assert_eq!(one_minute.len(), 3);
        assert_eq!(one_minute[1].value, 20.0);
    }
}
