//! Payload forms and their decoding.
//!
//! One decoder serves all three forms, told apart by the payload's first bytes:
//!
//! | form | example | readings |
//! |---|---|---|
//! | plain | `87.25` | one: the subject's device and sensor, the broker's time |
//! | JSON | `{"value":2.45,"unit":"mm/s","timestamp":"2026-02-15T10:00:00Z","quality":"good"}` | one |
//! | line protocol | `engine,unit=rpm speed=88.5,torque=210i 1771149600000000000` | one per numeric field |
//!
//! JSON: `value` (number) is required; `unit` and `quality` are strings of at most 64 bytes
//! without control characters; `timestamp` is RFC 3339 text or a Unix epoch number in
//! seconds, milliseconds, microseconds or nanoseconds (told apart by magnitude). Other fields
//! are ignored.
//!
//! Line protocol (InfluxDB's, so Telegraf can publish unchanged): each line is
//! `measurement[,tag=v…] field=v[,field=v…] [timestamp]`. The device is always the
//! subject's; the subject's sensor token is not used. Each numeric field becomes a reading
//! whose sensor is `measurement.field`, or just `measurement` when the field is `value`.
//! Floats, `i`/`u` integers and booleans (1/0) are numbers; string fields are refused.
//! Tags are kept on the readings, with the subject's; a tag named twice in a line, or named
//! like one of the subject template's, refuses the line. The timestamp is an integer in the
//! same epoch units as JSON (Telegraf sends nanoseconds). A bad line is refused on its own;
//! the good lines of the same message are kept. A message of nothing but comments is refused.
//!
//! **Repeated points.** Two readings of one message with the same sensor, tags and timestamp
//! (two identical lines without timestamps, a field repeated in a line) would be one point
//! in the store. The later one wins, as in InfluxDB, and the earlier one is dropped with a
//! `line_protocol` reject, so the message is dead-lettered with the reason.
//!
//! **Limits.** A message costs memory in proportion to its size, checked as it is decoded and
//! before anything is built: at most [`Limits::max_readings`] readings (the line that would
//! pass it and every line after it are refused with one `limit` reject saying how many),
//! [`Limits::max_tags`] tags per reading and [`Limits::max_tag_bytes`] per tag key or value
//! (a line over either is refused alone, `limit`). Tags, units and quality flags hold no
//! control character (U+0000–U+001F, U+007F): PostgreSQL text cannot hold NUL, and both
//! stores must accept the same input. A message keeps at most [`MAX_REJECTS`] rejects (not
//! counting the readings limit's) plus one saying how many more there were, each at most
//! [`MAX_REJECT_MESSAGE`](crate::MAX_REJECT_MESSAGE) bytes. [`Decoded::decoded_bytes`]
//! states the resulting bound on what one payload byte can cost.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::mem::size_of;
use std::sync::Arc;

use serde::Deserialize;

use crate::subject::SubjectTemplate;
use crate::timestamp::{Timestamp, EARLIEST};
use crate::{Name, Reading, Reject, RejectCode, Tags};

/// Limits applied while decoding one message. Everything over them is refused with a
/// [`Reject`], never truncated silently.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Payloads longer than this are refused whole. Default 256 KiB.
    pub max_payload_bytes: usize,
    /// How far past the broker's receive time a device timestamp may lie, in microseconds.
    /// Default 5 minutes.
    pub max_future_micros: i64,
    /// How far before the broker's receive time a device timestamp may lie, in
    /// microseconds. Default: no limit. The collectors set it to the raw retention: an older
    /// reading would be deleted at the next prune, and once it was, a redelivery could not be
    /// told from a first delivery, so its rollups could count it twice.
    pub max_past_micros: i64,
    /// Most readings one message may yield. Default 10,000: a Telegraf flush of its default
    /// 1,000 metrics with up to ten fields each, and a twentieth of the collector's queue,
    /// so one message cannot fill it.
    pub max_readings: usize,
    /// Most tags one reading may carry, the subject template's and the line's together.
    /// Default 64: Telegraf's richest inputs (Docker, Kubernetes) attach about 20.
    pub max_tags: usize,
    /// Longest tag key or value, in bytes after unescaping. Default 256: room for any DNS
    /// host name (253), Kubernetes object name (253) or container id (64).
    pub max_tag_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 256 * 1024,
            max_future_micros: 5 * 60 * 1_000_000,
            max_past_micros: i64::MAX,
            max_readings: 10_000,
            max_tags: 64,
            max_tag_bytes: 256,
        }
    }
}

/// Most rejects one message keeps; past them, one more reject says how many were left out.
pub const MAX_REJECTS: usize = 100;

/// The outcome of decoding one message: zero or more readings and zero or more rejects.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Decoded {
    pub readings: Vec<Reading>,
    pub rejects: Vec<Reject>,
}

impl Decoded {
    /// An estimate of the memory the readings and rejects hold, in bytes: each one's inline
    /// size plus the capacity of its strings, and each name and tag list once however many
    /// readings share it. For bounding a queue by bytes.
    ///
    /// One message of `p` payload bytes on a subject whose template tags take `T` bytes (48
    /// per tag plus its name and value) decodes to at most `K·p + C` bytes, with
    /// `K = max(97, 11 + T/6)` (97 while `T ≤ 500`) and `C = 64 KiB + T`:
    ///
    /// * the densest line-protocol reading is a field `x=1,`: 4 payload bytes for a
    ///   `Reading` (112 bytes inline) with, at worst, a sensor name of its own (16 bytes
    ///   and measurement ≤ 128 bytes, `.`, key; the device name is the message's): at most
    ///   258 / 4 < 97 bytes per payload byte;
    /// * a line with tags of its own gets a new list: 48 bytes per `,k=v` (4 payload bytes or
    ///   more), a copy of the subject's tags and a 16-byte header, (16 + 50 + T) / 6 bytes
    ///   per byte of `a,t=v `;
    /// * `C` is one plain or JSON reading (sensor ≤ 1,031 bytes, unit and quality ≤ 64
    ///   each: under 1.5 KiB plus `T`) and the rejects: at most [`MAX_REJECTS`] + 2, each at
    ///   most 32 + [`MAX_REJECT_MESSAGE`](crate::MAX_REJECT_MESSAGE) bytes.
    ///
    /// [`Limits::max_readings`] caps it too: with the default limits and template, one
    /// message holds at most 10,000 × 513 bytes of readings plus 11 bytes of tags per
    /// payload byte, about 8 MB.
    pub fn decoded_bytes(&self) -> usize {
        let readings: usize = self
            .readings
            .iter()
            .map(|r| {
                size_of::<Reading>()
                    + r.unit.as_ref().map_or(0, String::capacity)
                    + r.quality.as_ref().map_or(0, String::capacity)
            })
            .sum();
        let rejects: usize = self
            .rejects
            .iter()
            .map(|j| size_of::<Reject>() + j.message.capacity())
            .sum();
        readings + rejects + self.tags_bytes() + self.names_bytes()
    }

    /// The bytes of the readings' device and sensor names, each once however many readings
    /// share it.
    fn names_bytes(&self) -> usize {
        let mut seen: HashSet<*const u8> = HashSet::new();
        let mut total = 0;
        for r in &self.readings {
            for name in [&r.device, &r.sensor] {
                if seen.insert(name.as_ptr()) {
                    total += 2 * size_of::<usize>() + name.len();
                }
            }
        }
        total
    }

    /// The bytes of the readings' tag lists, each list once however many readings share it.
    fn tags_bytes(&self) -> usize {
        let list_bytes = |tags: &[(String, String)]| {
            2 * size_of::<usize>()
                + std::mem::size_of_val(tags)
                + tags
                    .iter()
                    .map(|(k, v)| k.capacity() + v.capacity())
                    .sum::<usize>()
        };
        let mut seen: HashSet<*const ()> = HashSet::new();
        let mut last: *const () = std::ptr::null();
        let mut total = 0;
        for r in &self.readings {
            // Readings of one line are consecutive: look a list up once per run.
            let list = Arc::as_ptr(&r.tags).cast::<()>();
            if list != last {
                last = list;
                if seen.insert(list) {
                    total += list_bytes(&r.tags);
                }
            }
        }
        total
    }
}

/// Longest `unit` or `quality` string accepted.
const MAX_LABEL_LEN: usize = 64;

/// Decodes one message. Never panics; every problem becomes a [`Reject`].
pub fn decode(
    template: &SubjectTemplate,
    subject: &str,
    payload: &[u8],
    received: Timestamp,
    limits: &Limits,
) -> Decoded {
    let mut out = Decoded::default();
    decode_into(template, subject, payload, received, limits, &mut out);
    out
}

/// Like [`decode`], appending to `out` so a batch can reuse one buffer. The limits apply to
/// what this message appends.
pub fn decode_into(
    template: &SubjectTemplate,
    subject: &str,
    payload: &[u8],
    received: Timestamp,
    limits: &Limits,
    out: &mut Decoded,
) {
    let parts = match template.parse_subject(subject) {
        Ok(parts) => parts,
        Err(e) => {
            return out
                .rejects
                .push(Reject::new(RejectCode::Subject, e.to_string()))
        }
    };
    if parts.sensor == crate::STATUS_SENSOR {
        // A device's status message: not telemetry, nothing to store or dead-letter.
        return;
    }
    if let Err(e) = check_subject_tags(&parts.tags, limits) {
        return out.rejects.push(e);
    }
    if payload.len() > limits.max_payload_bytes {
        return out.rejects.push(Reject::new(
            RejectCode::Oversize,
            format!(
                "payload is {} bytes, the limit is {}",
                payload.len(),
                limits.max_payload_bytes
            ),
        ));
    }
    let Ok(text) = std::str::from_utf8(payload) else {
        return out
            .rejects
            .push(Reject::new(RejectCode::Encoding, "payload is not UTF-8"));
    };
    let text = text.trim();
    let subject_tags: Vec<(String, String)> = parts
        .tags
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let ctx = Context {
        device: parts.device.into(),
        subject_tags: &subject_tags,
        tags: crate::canonical_tags(&subject_tags),
        received,
        limits,
    };
    if text.is_empty() {
        out.rejects
            .push(Reject::new(RejectCode::Encoding, "payload is empty"));
    } else if text.starts_with('{') {
        match decode_json(text, parts.sensor, &ctx) {
            Ok(r) => out.readings.push(r),
            Err(e) => out.rejects.push(e),
        }
    } else if let Ok(value) = text.parse::<f64>() {
        match finite(value) {
            Ok(value) => {
                out.readings
                    .push(ctx.reading(parts.sensor.into(), value, received, None, None))
            }
            Err(e) => out.rejects.push(e),
        }
    } else if text.contains(' ') && text.contains('=') {
        decode_line_protocol(text, &ctx, out);
    } else {
        out.rejects.push(Reject::new(
            RejectCode::NotANumber,
            format!(
                "payload {:?} is not a decimal number, a JSON object or line protocol",
                preview(text)
            ),
        ));
    }
}

/// The subject's tags obey the limits on tags too, and hold no control character (a NATS
/// subject can carry one).
fn check_subject_tags(tags: &[(&str, &str)], limits: &Limits) -> Result<(), Reject> {
    if tags.len() > limits.max_tags {
        return Err(Reject::new(
            RejectCode::Limit,
            format!(
                "the subject has {} tags, the limit is {} per reading",
                tags.len(),
                limits.max_tags
            ),
        ));
    }
    for (name, value) in tags {
        if value.len() > limits.max_tag_bytes {
            return Err(Reject::new(
                RejectCode::Limit,
                format!(
                    "subject tag {name} is {} bytes, the limit is {}",
                    value.len(),
                    limits.max_tag_bytes
                ),
            ));
        }
        if let Some(c) = control_char(value) {
            return Err(Reject::new(
                RejectCode::Subject,
                format!("subject tag {name} holds the control character {c}"),
            ));
        }
    }
    Ok(())
}

struct Context<'a> {
    device: Name,
    /// The subject's tags as the template names them, in subject order.
    subject_tags: &'a [(String, String)],
    /// The same, canonical, shared by the readings of a plain or JSON payload and of the
    /// lines without tags of their own.
    tags: Tags,
    received: Timestamp,
    limits: &'a Limits,
}

impl Context<'_> {
    fn reading(
        &self,
        sensor: Name,
        value: f64,
        ts: Timestamp,
        unit: Option<String>,
        quality: Option<String>,
    ) -> Reading {
        Reading {
            device: self.device.clone(),
            sensor,
            value,
            ts,
            unit,
            quality,
            tags: self.tags.clone(),
        }
    }

    fn check_time(&self, ts: Timestamp) -> Result<Timestamp, Reject> {
        if ts < EARLIEST {
            return Err(Reject::new(
                RejectCode::Timestamp,
                format!("timestamp {ts} is before 2000: is the device clock set?"),
            ));
        }
        if self.received.as_micros().saturating_sub(ts.as_micros()) > self.limits.max_past_micros {
            return Err(Reject::new(
                RejectCode::Timestamp,
                format!(
                    "timestamp {ts} is more than {} days before the broker received it ({}): \
                     older than the raw retention (store.raw_retention), it would be deleted at \
                     once; raise the retention to load older data",
                    self.limits.max_past_micros / 86_400_000_000,
                    self.received
                ),
            ));
        }
        if ts.as_micros() - self.received.as_micros() > self.limits.max_future_micros {
            return Err(Reject::new(
                RejectCode::Timestamp,
                format!(
                    "timestamp {ts} is more than {} s after the broker received it ({})",
                    self.limits.max_future_micros / 1_000_000,
                    self.received
                ),
            ));
        }
        Ok(ts)
    }
}

fn finite(value: f64) -> Result<f64, Reject> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(Reject::new(
            RejectCode::NonFinite,
            format!("value {value} is not finite"),
        ))
    }
}

/// The first 64 characters of `text`, for error messages.
fn preview(text: &str) -> &str {
    match text.char_indices().nth(64) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

/// The first control character of `text` (U+0000–U+001F, U+007F), written `U+0000`: text the
/// stores cannot all hold (PostgreSQL refuses NUL) or that would corrupt logs and headers.
fn control_char(text: &str) -> Option<String> {
    text.bytes()
        .find(u8::is_ascii_control)
        .map(|b| format!("U+{b:04X}"))
}

#[derive(Deserialize)]
struct JsonReading<'a> {
    value: f64,
    #[serde(borrow, default)]
    unit: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    timestamp: Option<JsonTime<'a>>,
    #[serde(borrow, default)]
    quality: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum JsonTime<'a> {
    Number(f64),
    #[serde(borrow)]
    Text(Cow<'a, str>),
}

fn decode_json(text: &str, sensor: &str, ctx: &Context<'_>) -> Result<Reading, Reject> {
    let json: JsonReading<'_> = serde_json::from_str(text)
        .map_err(|e| Reject::new(RejectCode::Json, format!("bad JSON reading: {e}")))?;
    let value = finite(json.value)?;
    let ts = match json.timestamp {
        None => ctx.received,
        Some(JsonTime::Number(n)) => Timestamp::from_epoch_number(n).ok_or_else(|| {
            Reject::new(RejectCode::Timestamp, format!("timestamp {n} is not valid"))
        })?,
        Some(JsonTime::Text(s)) => Timestamp::parse_rfc3339(&s).ok_or_else(|| {
            Reject::new(
                RejectCode::Timestamp,
                format!("timestamp {:?} is not RFC 3339", preview(&s)),
            )
        })?,
    };
    let ts = ctx.check_time(ts)?;
    let unit = json_label("unit", json.unit)?;
    let quality = json_label("quality", json.quality)?;
    Ok(ctx.reading(sensor.into(), value, ts, unit, quality))
}

/// A JSON `unit` or `quality`: short, and text every store can hold.
fn json_label(name: &str, label: Option<Cow<'_, str>>) -> Result<Option<String>, Reject> {
    let Some(label) = label else {
        return Ok(None);
    };
    if label.len() > MAX_LABEL_LEN {
        return Err(Reject::new(
            RejectCode::Json,
            format!("{name} is longer than {MAX_LABEL_LEN} bytes"),
        ));
    }
    if let Some(c) = control_char(&label) {
        return Err(Reject::new(
            RejectCode::Json,
            format!("{name} holds the control character {c}"),
        ));
    }
    Ok(Some(label.into_owned()))
}

/// Why a line was not decoded.
enum LineError {
    /// The line is refused on its own.
    Refused(Reject),
    /// The line would take the message past [`Limits::max_readings`].
    TooManyReadings,
}

impl From<Reject> for LineError {
    fn from(reject: Reject) -> Self {
        LineError::Refused(reject)
    }
}

/// Keeps the first [`MAX_REJECTS`] rejects of a message and counts the others, so that a
/// message of 80,000 bad lines makes a dead letter of a hundred reasons, not 80,000.
#[derive(Default)]
struct RejectSink {
    kept: usize,
    left_out: usize,
    left_out_codes: Vec<RejectCode>,
}

impl RejectSink {
    /// Adds a reject, building its message only if it is kept.
    fn push(
        &mut self,
        rejects: &mut Vec<Reject>,
        code: RejectCode,
        message: impl FnOnce() -> String,
    ) {
        if self.kept < MAX_REJECTS {
            self.kept += 1;
            rejects.push(Reject::new(code, message()));
        } else {
            self.left_out += 1;
            if !self.left_out_codes.contains(&code) {
                self.left_out_codes.push(code);
            }
        }
    }

    /// Adds the reject that counts those left out, if any.
    fn finish(self, rejects: &mut Vec<Reject>) {
        let Some(&code) = self.left_out_codes.first() else {
            return;
        };
        let codes: Vec<&str> = self.left_out_codes.iter().map(|c| c.as_str()).collect();
        rejects.push(Reject::new(
            code,
            format!(
                "and {} more problems not listed (at most {MAX_REJECTS} are; codes: {})",
                self.left_out,
                codes.join(", ")
            ),
        ));
    }
}

fn decode_line_protocol(text: &str, ctx: &Context<'_>, out: &mut Decoded) {
    let start = out.readings.len();
    let mut sink = RejectSink::default();
    // The first reading of each decoded line and the line's number, to name repeated points.
    let mut line_starts: Vec<(usize, usize)> = Vec::new();
    // The tag section of the last line with tags, and its tags: consecutive lines of one
    // series share them.
    let mut last_tags: Option<(&str, Tags)> = None;
    let mut names = Names {
        device: ctx.device.clone(),
        sensors: Vec::new(),
    };
    let mut lines = text.lines().enumerate();
    let mut data_lines = 0;
    while let Some((n, line)) = lines.next() {
        let line = line.trim();
        if !is_data_line(line) {
            continue;
        }
        data_lines += 1;
        let room = ctx
            .limits
            .max_readings
            .saturating_sub(out.readings.len() - start);
        let first = out.readings.len();
        let decoded = decode_line(
            line,
            ctx,
            room,
            &mut last_tags,
            &mut names,
            &mut out.readings,
        );
        match decoded {
            Ok(()) => line_starts.push((first, n + 1)),
            Err(LineError::Refused(e)) => sink.push(&mut out.rejects, e.code, || {
                format!("line {}: {} (in {:?})", n + 1, e.message, preview(line))
            }),
            Err(LineError::TooManyReadings) => {
                let skipped = 1 + lines.filter(|(_, l)| is_data_line(l.trim())).count();
                let (lines, were) = if skipped == 1 {
                    ("line", "was")
                } else {
                    ("lines", "were")
                };
                out.rejects.push(Reject::new(
                    RejectCode::Limit,
                    format!(
                        "line {}: over the limit of {} readings per message; {skipped} {lines} \
                         from this one on {were} not decoded",
                        n + 1,
                        ctx.limits.max_readings
                    ),
                ));
                break;
            }
        }
    }
    if data_lines == 0 {
        // Nothing silent: a message without a line to decode is refused.
        sink.push(&mut out.rejects, RejectCode::LineProtocol, || {
            "no line to decode, only comments".into()
        });
    }
    drop_repeated_points(out, start, &line_starts, &mut sink);
    sink.finish(&mut out.rejects);
}

fn is_data_line(line: &str) -> bool {
    !line.is_empty() && !line.starts_with('#')
}

fn lp_err(message: impl Into<String>) -> Reject {
    Reject::new(RejectCode::LineProtocol, message)
}

fn limit_err(message: impl Into<String>) -> Reject {
    Reject::new(RejectCode::Limit, message)
}

/// Splits `s` at the first unescaped `sep` outside double quotes.
fn split_unescaped(s: &str, sep: u8) -> (&str, Option<&str>) {
    let bytes = s.as_bytes();
    let mut in_quotes = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 1,
            b'"' => in_quotes = !in_quotes,
            b if b == sep && !in_quotes => return (&s[..i], Some(&s[i + 1..])),
            _ => {}
        }
        i += 1;
    }
    (s, None)
}

/// How many items `split_unescaped` finds in `s` at `sep`, counting no further than
/// `most + 1`: enough to tell that there are too many without looking at the rest.
fn count_items(s: &str, sep: u8, most: usize) -> usize {
    let mut n = 1;
    let mut rest = s;
    while n <= most {
        match split_unescaped(rest, sep) {
            (_, Some(next)) => {
                n += 1;
                rest = next;
            }
            (_, None) => break,
        }
    }
    n
}

/// Removes line-protocol backslash escapes (`\,`, `\ `, `\=`).
fn unescape(s: &str) -> Cow<'_, str> {
    if !s.contains('\\') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(&next @ (',' | ' ' | '='))) => {
                out.push(next);
                chars.next();
            }
            _ => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn parse_field_value(raw: &str) -> Result<f64, String> {
    match raw {
        "t" | "T" | "true" | "True" | "TRUE" => return Ok(1.0),
        "f" | "F" | "false" | "False" | "FALSE" => return Ok(0.0),
        _ => {}
    }
    if raw.starts_with('"') {
        return Err("string fields are not numeric readings".into());
    }
    let number = raw
        .strip_suffix('i')
        .or_else(|| raw.strip_suffix('u'))
        .unwrap_or(raw);
    number
        .parse::<f64>()
        .map_err(|_| format!("field value {:?} is not a number", preview(raw)))
}

fn parse_lp_timestamp(raw: &str) -> Result<Timestamp, Reject> {
    let n: i64 = raw.parse().map_err(|_| {
        Reject::new(
            RejectCode::Timestamp,
            format!("timestamp {:?} is not an integer", preview(raw)),
        )
    })?;
    // Same magnitudes as JSON epochs, in integer arithmetic to keep nanosecond inputs exact.
    let us = match n {
        n if n < 0 => None,
        n if n < 100_000_000_000 => n.checked_mul(1_000_000),
        n if n < 100_000_000_000_000 => n.checked_mul(1_000),
        n if n < 100_000_000_000_000_000 => Some(n),
        n => Some(n / 1_000),
    };
    us.map(Timestamp::from_micros).ok_or_else(|| {
        Reject::new(
            RejectCode::Timestamp,
            format!("timestamp {raw} is out of range"),
        )
    })
}

/// Decodes one line into `readings`, all of its fields or none. `room` is how many more
/// readings the message may hold.
fn decode_line<'t>(
    line: &'t str,
    ctx: &Context<'_>,
    room: usize,
    last_tags: &mut Option<(&'t str, Tags)>,
    names: &mut Names,
    readings: &mut Vec<Reading>,
) -> Result<(), LineError> {
    let (series, rest) = split_unescaped(line, b' ');
    let rest = rest.ok_or_else(|| lp_err("no field set"))?.trim_start();
    let (fields, ts_raw) = split_unescaped(rest, b' ');
    let ts = match ts_raw.map(str::trim).filter(|s| !s.is_empty()) {
        Some(raw) => ctx.check_time(parse_lp_timestamp(raw)?)?,
        None => ctx.received,
    };

    let (measurement, tag_section) = split_unescaped(series, b',');
    // An escape (`\,`, `\ `, `\=`) always leaves a character no token has: no need to
    // unescape to check.
    if !crate::is_valid_token(measurement) {
        return Err(lp_err(format!(
            "measurement {:?} must be letters, digits, '-' or '_'",
            preview(measurement)
        ))
        .into());
    }
    let tags = match (tag_section, last_tags.as_ref()) {
        (None, _) => ctx.tags.clone(),
        (Some(section), Some((last, tags))) if *last == section => tags.clone(),
        (Some(section), _) => {
            let tags = line_tags(section, ctx)?;
            *last_tags = Some((section, tags.clone()));
            tags
        }
    };

    // A field (`k=v`) takes at least 3 bytes and a comma: count them only when there may be
    // too many, and before building any.
    if (fields.len() + 1) / 4 > room && count_items(fields, b',', room) > room {
        return Err(LineError::TooManyReadings);
    }
    let start = readings.len();
    let pushed = push_fields(fields, measurement, ts, &tags, room, names, readings);
    if pushed.is_err() {
        readings.truncate(start);
    }
    pushed
}

/// The tags of a line with a tag section: the subject's and the line's, canonical.
fn line_tags(section: &str, ctx: &Context<'_>) -> Result<Tags, Reject> {
    let limits = ctx.limits;
    let subject = ctx.subject_tags.len();
    let room = limits.max_tags.saturating_sub(subject);
    // A tag (`k=v`) takes at least 3 bytes and a comma: count them only when there may be
    // too many, and before copying any.
    let most = (section.len() + 1) / 4;
    if most > room && count_items(section, b',', room) > room {
        return Err(limit_err(if subject == 0 {
            format!("more than {room} tags, the limit per reading")
        } else {
            format!(
                "more than {room} tags: with the subject's {subject}, over the limit of {} per \
                 reading",
                limits.max_tags
            )
        }));
    }
    let mut tags: Vec<(String, String)> = Vec::with_capacity(subject + most.min(room));
    tags.extend_from_slice(ctx.subject_tags);
    let mut rest = Some(section);
    while let Some(t) = rest {
        let (pair, next) = split_unescaped(t, b',');
        rest = next;
        match split_unescaped(pair, b'=') {
            (k, Some(v)) if !k.is_empty() && !v.is_empty() => {
                tags.push((tag_text("key", k, limits)?, tag_text("value", v, limits)?))
            }
            _ => return Err(lp_err(format!("tag {:?} is not key=value", preview(pair)))),
        }
    }
    if tags.len() > 1 {
        tags.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = tags.windows(2).find(|w| w[0].0 == w[1].0) {
            let name = &w[0].0;
            return Err(lp_err(if ctx.subject_tags.iter().any(|(k, _)| k == name) {
                format!(
                    "tag {:?} is also a tag of the subject template; a line cannot change it",
                    preview(name)
                )
            } else {
                format!("tag {:?} is given twice", preview(name))
            }));
        }
    }
    Ok(tags.into())
}

/// One tag key or value, unescaped: within [`Limits::max_tag_bytes`] and free of control
/// characters.
fn tag_text(what: &str, raw: &str, limits: &Limits) -> Result<String, Reject> {
    let too_long = |len: usize| {
        limit_err(format!(
            "tag {what} {:?} is {len} bytes, the limit is {}",
            preview(raw),
            limits.max_tag_bytes
        ))
    };
    // Unescaping at most halves the text: refuse what cannot fit before copying it.
    if raw.len() / 2 > limits.max_tag_bytes {
        return Err(too_long(raw.len()));
    }
    let text = unescape(raw);
    if text.len() > limits.max_tag_bytes {
        return Err(too_long(text.len()));
    }
    if let Some(c) = control_char(&text) {
        return Err(lp_err(format!(
            "tag {what} {:?} holds the control character {c}",
            preview(&text)
        )));
    }
    Ok(text.into_owned())
}

/// Pushes a reading per field of a line; on error the caller drops those already pushed.
fn push_fields(
    fields: &str,
    measurement: &str,
    ts: Timestamp,
    tags: &Tags,
    room: usize,
    names: &mut Names,
    readings: &mut Vec<Reading>,
) -> Result<(), LineError> {
    let mut pushed = 0;
    let mut rest = Some(fields);
    while let Some(f) = rest {
        let (pair, next) = split_unescaped(f, b',');
        rest = next;
        let (key, value) = split_unescaped(pair, b'=');
        let value =
            value.ok_or_else(|| lp_err(format!("field {:?} is not key=value", preview(pair))))?;
        // As for the measurement, an escaped key is never a token.
        if !crate::is_valid_token(key) {
            return Err(lp_err(format!(
                "field key {:?} must be letters, digits, '-' or '_'",
                preview(key)
            ))
            .into());
        }
        let value =
            parse_field_value(value).map_err(|msg| lp_err(format!("field {key}: {msg}")))?;
        let value = finite(value)?;
        if pushed == room {
            return Err(LineError::TooManyReadings);
        }
        readings.push(Reading {
            device: names.device.clone(),
            sensor: names.sensor(measurement, key),
            value,
            ts,
            unit: None,
            quality: None,
            tags: tags.clone(),
        });
        pushed += 1;
    }
    Ok(())
}

/// The names a line-protocol message's readings share: its device's, and the sensor names
/// it has built. At most [`SHARED_SENSORS`] of these are kept and looked through: a message
/// naming more sensors builds the others' names for each reading.
struct Names {
    device: Name,
    sensors: Vec<Name>,
}

/// How many sensor names one message shares (a device's batch names a handful).
const SHARED_SENSORS: usize = 32;

impl Names {
    /// The name of field `key` of `measurement`: `measurement.key`, or `measurement` for
    /// the field `value`.
    fn sensor(&mut self, measurement: &str, key: &str) -> Name {
        let is = |name: &str| {
            if key == "value" {
                name == measurement
            } else {
                name.len() == measurement.len() + 1 + key.len()
                    && name.starts_with(measurement)
                    && name.as_bytes()[measurement.len()] == b'.'
                    && name.ends_with(key)
            }
        };
        if let Some(name) = self.sensors.iter().find(|n| is(n)) {
            return name.clone();
        }
        let name: Name = if key == "value" {
            measurement.into()
        } else {
            let mut s = String::with_capacity(measurement.len() + 1 + key.len());
            s.push_str(measurement);
            s.push('.');
            s.push_str(key);
            s.into()
        };
        if self.sensors.len() < SHARED_SENSORS {
            self.sensors.push(name.clone());
        }
        name
    }
}

/// Drops every reading of `out.readings[start..]` that a later one repeats (same sensor, tags
/// and timestamp: one point in the store), with a reject each. `line_starts` maps readings to
/// their lines.
fn drop_repeated_points(
    out: &mut Decoded,
    start: usize,
    line_starts: &[(usize, usize)],
    sink: &mut RejectSink,
) {
    let readings = &out.readings[start..];
    if readings.len() < 2 {
        return;
    }
    let repeats = find_repeats(readings);
    if repeats.is_empty() {
        return;
    }
    let line_of = |i: usize| {
        let k = line_starts.partition_point(|&(first, _)| first <= start + i);
        line_starts[k.saturating_sub(1)].1
    };
    let mut dropped = vec![false; readings.len()];
    for &(earlier, later) in &repeats {
        dropped[earlier] = true;
        let (m, n) = (line_of(earlier), line_of(later));
        let sensor = &readings[later].sensor;
        sink.push(&mut out.rejects, RejectCode::LineProtocol, || {
            if m == n {
                format!(
                    "line {n} gives sensor {sensor} twice (same field, tags and timestamp); \
                     the later value is kept"
                )
            } else {
                format!(
                    "line {n} repeats the point of line {m} (same measurement, tags, field and \
                     timestamp: sensor {sensor}); the later value is kept"
                )
            }
        });
    }
    let mut i = 0;
    out.readings.retain(|_| {
        let keep = i < start || !dropped[i - start];
        i += 1;
        keep
    });
}

/// Largest run of readings with one timestamp that [`find_repeats`] compares pairwise.
const PAIRWISE_RUN: usize = 16;

/// Each reading that repeats the point (sensor, tags, timestamp) of an earlier one, as
/// (the latest such earlier reading, the reading), in the order of the later ones.
fn find_repeats(readings: &[Reading]) -> Vec<(usize, usize)> {
    let same_point = |a: &Reading, b: &Reading| a.sensor == b.sensor && same_tags(&a.tags, &b.tags);
    // Readings in time order (a device's usual batch) repeat a point only within a run of
    // one timestamp; short runs are quicker to compare pair by pair than to hash.
    let mut repeats = Vec::new();
    let mut run = 0;
    for j in 1..readings.len() {
        if readings[j].ts < readings[j - 1].ts {
            return find_repeats_hashed(readings);
        }
        if readings[j].ts != readings[run].ts {
            run = j;
            continue;
        }
        if j - run >= PAIRWISE_RUN {
            return find_repeats_hashed(readings);
        }
        if let Some(i) = (run..j)
            .rev()
            .find(|&i| same_point(&readings[i], &readings[j]))
        {
            repeats.push((i, j));
        }
    }
    repeats
}

/// [`find_repeats`] for any order and any number of readings.
fn find_repeats_hashed(readings: &[Reading]) -> Vec<(usize, usize)> {
    // Tag lists compared by content, looked up once per run of readings sharing one list.
    let mut tag_ids: HashMap<&[(String, String)], usize> = HashMap::new();
    let mut points: HashMap<(i64, &str, usize), usize> = HashMap::with_capacity(readings.len());
    let mut repeats = Vec::new();
    let (mut last_tags, mut tag_id): (*const (), usize) = (std::ptr::null(), 0);
    for (i, r) in readings.iter().enumerate() {
        let tags = Arc::as_ptr(&r.tags).cast::<()>();
        if tags != last_tags {
            last_tags = tags;
            let next = tag_ids.len();
            tag_id = *tag_ids.entry(&r.tags[..]).or_insert(next);
        }
        if let Some(earlier) = points.insert((r.ts.as_micros(), r.sensor.as_str(), tag_id), i) {
            repeats.push((earlier, i));
        }
    }
    repeats
}

fn same_tags(a: &Tags, b: &Tags) -> bool {
    Arc::ptr_eq(a, b) || a[..] == b[..]
}

/// Encodes a value the way the reference design's C publisher does: the shortest decimal
/// text that reads back as the same number (`95`, `87.25`).
pub fn encode_plain(value: f64) -> String {
    format!("{value}")
}

/// Encodes a JSON reading.
pub fn encode_json(
    value: f64,
    unit: Option<&str>,
    ts: Option<Timestamp>,
    quality: Option<&str>,
) -> String {
    let mut obj = serde_json::Map::new();
    obj.insert("value".into(), serde_json::json!(value));
    if let Some(u) = unit {
        obj.insert("unit".into(), u.into());
    }
    if let Some(t) = ts {
        obj.insert("timestamp".into(), t.to_rfc3339().into());
    }
    if let Some(q) = quality {
        obj.insert("quality".into(), q.into());
    }
    serde_json::Value::Object(obj).to_string()
}

/// Appends one line of line protocol (`measurement field=v,… ts_ns\n`) to `buf`.
/// `measurement` and field names must be valid tokens.
pub fn encode_line_protocol(
    buf: &mut String,
    measurement: &str,
    fields: &[(&str, f64)],
    ts: Option<Timestamp>,
) {
    use std::fmt::Write;
    buf.push_str(measurement);
    for (i, (k, v)) in fields.iter().enumerate() {
        buf.push(if i == 0 { ' ' } else { ',' });
        let _ = write!(buf, "{k}={v}");
    }
    if let Some(t) = ts {
        let _ = write!(buf, " {}", t.as_micros() as i128 * 1000);
    }
    buf.push('\n');
}

#[cfg(test)]
mod tests;
