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
//! JSON: `value` (number) is required; `unit` and `quality` are strings; `timestamp` is RFC
//! 3339 text or a Unix epoch number in seconds, milliseconds, microseconds or nanoseconds
//! (told apart by magnitude). Other fields are ignored.
//!
//! Line protocol (InfluxDB's, so Telegraf can publish unchanged): each line is
//! `measurement[,tag=v…] field=v[,field=v…] [timestamp]`. The device is always the
//! subject's; the subject's sensor token is not used. Each numeric field becomes a reading
//! whose sensor is `measurement.field`, or just `measurement` when the field is `value`.
//! Floats, `i`/`u` integers and booleans (1/0) are numbers; string fields are refused.
//! Tags are kept on the readings. The timestamp is an integer in the same epoch units as
//! JSON (Telegraf sends nanoseconds). A bad line is refused on its own; the good lines of the
//! same message are kept.

use std::borrow::Cow;

use serde::Deserialize;

use crate::subject::SubjectTemplate;
use crate::timestamp::{Timestamp, EARLIEST};
use crate::{Reading, Reject, RejectCode};

/// Limits applied while decoding.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Payloads longer than this are refused whole.
    pub max_payload_bytes: usize,
    /// How far past the broker's receive time a device timestamp may lie, in microseconds.
    pub max_future_micros: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 256 * 1024,
            max_future_micros: 5 * 60 * 1_000_000,
        }
    }
}

/// The outcome of decoding one message: zero or more readings and zero or more rejects.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Decoded {
    pub readings: Vec<Reading>,
    pub rejects: Vec<Reject>,
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

/// Like [`decode`], appending to `out` so a batch can reuse one buffer.
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
    let ctx = Context {
        device: parts.device,
        tags: &parts.tags,
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
            Ok(value) => out.readings.push(ctx.reading(
                parts.sensor.to_string(),
                value,
                received,
                None,
                None,
            )),
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

struct Context<'a> {
    device: &'a str,
    tags: &'a [(&'a str, &'a str)],
    received: Timestamp,
    limits: &'a Limits,
}

impl Context<'_> {
    fn reading(
        &self,
        sensor: String,
        value: f64,
        ts: Timestamp,
        unit: Option<String>,
        quality: Option<String>,
    ) -> Reading {
        Reading {
            device: self.device.to_string(),
            sensor,
            value,
            ts,
            unit,
            quality,
            tags: self
                .tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn check_time(&self, ts: Timestamp) -> Result<Timestamp, Reject> {
        if ts < EARLIEST {
            return Err(Reject::new(
                RejectCode::Timestamp,
                format!("timestamp {ts} is before 2000: is the device clock set?"),
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
    let label = |name: &str, v: Option<Cow<'_, str>>| match v {
        Some(s) if s.len() > MAX_LABEL_LEN => Err(Reject::new(
            RejectCode::Json,
            format!("{name} is longer than {MAX_LABEL_LEN} bytes"),
        )),
        other => Ok(other.map(Cow::into_owned)),
    };
    let unit = label("unit", json.unit)?;
    let quality = label("quality", json.quality)?;
    Ok(ctx.reading(sensor.to_string(), value, ts, unit, quality))
}

fn decode_line_protocol(text: &str, ctx: &Context<'_>, out: &mut Decoded) {
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Err(e) = decode_line(line, ctx, out) {
            out.rejects.push(Reject::new(
                e.code,
                format!("line {}: {} (in {:?})", n + 1, e.message, preview(line)),
            ));
        }
    }
}

fn lp_err(message: impl Into<String>) -> Reject {
    Reject::new(RejectCode::LineProtocol, message)
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

/// Removes line-protocol backslash escapes (`\,`, `\ `, `\=`).
fn unescape(s: &str) -> Cow<'_, str> {
    if s.contains('\\') {
        Cow::Owned(
            s.replace("\\,", ",")
                .replace("\\ ", " ")
                .replace("\\=", "="),
        )
    } else {
        Cow::Borrowed(s)
    }
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
        .map_err(|_| format!("field value {raw:?} is not a number"))
}

fn parse_lp_timestamp(raw: &str) -> Result<Timestamp, Reject> {
    let n: i64 = raw.parse().map_err(|_| {
        Reject::new(
            RejectCode::Timestamp,
            format!("timestamp {raw:?} is not an integer"),
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

fn decode_line(line: &str, ctx: &Context<'_>, out: &mut Decoded) -> Result<(), Reject> {
    let (series, rest) = split_unescaped(line, b' ');
    let rest = rest.ok_or_else(|| lp_err("no field set"))?.trim_start();
    let (fields, ts_raw) = split_unescaped(rest, b' ');
    let ts = match ts_raw.map(str::trim).filter(|s| !s.is_empty()) {
        Some(raw) => ctx.check_time(parse_lp_timestamp(raw)?)?,
        None => ctx.received,
    };

    let (measurement, mut tag_rest) = split_unescaped(series, b',');
    let measurement = unescape(measurement);
    if !crate::is_valid_token(&measurement) {
        return Err(lp_err(format!(
            "measurement {measurement:?} must be letters, digits, '-' or '_'"
        )));
    }
    let mut tags: Vec<(String, String)> = ctx
        .tags
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    while let Some(t) = tag_rest {
        let (pair, next) = split_unescaped(t, b',');
        tag_rest = next;
        let (k, v) = split_unescaped(pair, b'=');
        match v {
            Some(v) if !k.is_empty() && !v.is_empty() => {
                tags.push((unescape(k).into_owned(), unescape(v).into_owned()))
            }
            _ => return Err(lp_err(format!("tag {pair:?} is not key=value"))),
        }
    }

    let start = out.readings.len();
    let mut field_rest = Some(fields);
    while let Some(f) = field_rest {
        let (pair, next) = split_unescaped(f, b',');
        field_rest = next;
        let (key, value) = split_unescaped(pair, b'=');
        let key = unescape(key);
        let value = value.ok_or_else(|| lp_err(format!("field {pair:?} is not key=value")))?;
        if !crate::is_valid_token(&key) {
            out.readings.truncate(start);
            return Err(lp_err(format!(
                "field key {key:?} must be letters, digits, '-' or '_'"
            )));
        }
        let value = match parse_field_value(value) {
            Ok(v) => finite(v),
            Err(msg) => Err(lp_err(format!("field {key}: {msg}"))),
        };
        let value = match value {
            Ok(v) => v,
            Err(e) => {
                out.readings.truncate(start);
                return Err(e);
            }
        };
        let sensor = if key == "value" {
            measurement.to_string()
        } else {
            format!("{measurement}.{key}")
        };
        out.readings.push(Reading {
            device: ctx.device.to_string(),
            sensor,
            value,
            ts,
            unit: None,
            quality: None,
            tags: tags.clone(),
        });
    }
    Ok(())
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
