//! The wire contract between devices and fleetpipe.
//!
//! Devices publish readings on subjects built from a [`SubjectTemplate`] (default
//! `vehicle.{device}.{sensor}`) with one of three payload forms, all accepted on the same
//! subjects and told apart by their first bytes:
//!
//! * a plain decimal number, exactly what the reference design's C publisher sends (`95`,
//!   `87.25`);
//! * a JSON object: `{"value":2.45,"unit":"mm/s","timestamp":"2026-02-15T10:00:00Z","quality":"good"}`;
//! * InfluxDB line protocol, many readings per message (see [`payload`] for the mapping).
//!
//! The sensor [`STATUS_SENSOR`] is reserved for a device's status messages, which are not
//! readings.
//!
//! **Invariant:** this crate does no I/O and no allocation beyond the readings it returns,
//! so the device agent and the simulator can link it on constrained hardware.

pub mod payload;
pub mod subject;
pub mod timestamp;

pub use payload::{decode, encode_json, encode_line_protocol, encode_plain, Decoded, Limits};
pub use subject::{SubjectError, SubjectParts, SubjectTemplate};
pub use timestamp::Timestamp;

/// One sensor value of one device at one instant: the unit everything downstream stores.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Device id, a single subject token (`4613`, `cnc-001`). Shared by the readings of
    /// one message.
    pub device: Name,
    /// Sensor name, one or more tokens joined by `.` (`speed`, `spindle.vibration.rms`).
    /// Shared by the readings of one message that name the same sensor.
    pub sensor: Name,
    /// The value; always finite.
    pub value: f64,
    /// The device's own time when it sent one, else the broker's receive time.
    pub ts: Timestamp,
    /// Unit as sent by the device (`km/h`, `mm/s`), if any.
    pub unit: Option<String>,
    /// Quality flag as sent by the device (`good`, `uncertain`…), if any.
    pub quality: Option<String>,
    /// Extra subject tokens named by the template (`site`, `line`…) and line-protocol tags,
    /// sorted by name, each name once. Part of the series' identity: two readings that
    /// differ only in a tag value belong to two series. Shared, not copied, by the readings
    /// of one line-protocol line.
    pub tags: Tags,
}

/// A device or sensor name: an immutable string that clones without copying, so the
/// readings of one message share one allocation per name (a line-protocol message of 250
/// readings holds one device name and one per field, not 500 strings). Compares, hashes,
/// orders and prints exactly as the `str` it holds.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Name(std::sync::Arc<str>);

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `a` and `b` share one allocation (not merely equal text).
    pub fn ptr_eq(a: &Name, b: &Name) -> bool {
        std::sync::Arc::ptr_eq(&a.0, &b.0)
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Name(s.into())
    }
}

impl From<String> for Name {
    fn from(s: String) -> Self {
        Name(s.into())
    }
}

impl From<&String> for Name {
    fn from(s: &String) -> Self {
        Name(s.as_str().into())
    }
}

impl From<Name> for String {
    fn from(n: Name) -> Self {
        n.0.as_ref().to_owned()
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        &*self.0 == other.as_str()
    }
}

impl PartialEq<Name> for str {
    fn eq(&self, other: &Name) -> bool {
        self == &*other.0
    }
}

impl PartialEq<Name> for &str {
    fn eq(&self, other: &Name) -> bool {
        *self == &*other.0
    }
}

impl PartialEq<Name> for String {
    fn eq(&self, other: &Name) -> bool {
        self.as_str() == &*other.0
    }
}

/// A reading's tags: `(name, value)` pairs sorted by name, each name once. Cheap to clone.
pub type Tags = std::sync::Arc<[(String, String)]>;

/// Sorts `tags` by name, the last value of a repeated name winning: the canonical form
/// [`Reading::tags`] holds.
pub fn canonical_tags(tags: &[(String, String)]) -> Tags {
    if tags.windows(2).all(|w| w[0].0 < w[1].0) {
        return tags.into();
    }
    let map: std::collections::BTreeMap<&str, &str> =
        tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    map.into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Why a payload (or one line of a batch) was refused. The `code` is a stable, short
/// identifier used in dead-letter subjects and metrics; the message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub code: RejectCode,
    pub message: String,
}

/// Stable classification of bad input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectCode {
    /// The subject does not fit the configured template, or a token is not a valid id.
    Subject,
    /// The payload is larger than the configured limit.
    Oversize,
    /// Plain payload that is not a decimal number (and not line protocol either).
    NotANumber,
    /// NaN or ±infinity.
    NonFinite,
    /// JSON that does not parse or has fields of the wrong type.
    Json,
    /// A line of line protocol that does not parse.
    LineProtocol,
    /// A timestamp that cannot be parsed, or is absurdly far in the future or past.
    Timestamp,
    /// Payload is empty or not UTF-8.
    Encoding,
    /// Over a decoding limit of [`Limits`]: too many readings in one message, too many tags
    /// on one reading, a tag key or value too long.
    Limit,
}

impl RejectCode {
    /// The token used in dead-letter subjects (`fleetpipe.dlq.<code>`) and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            RejectCode::Subject => "subject",
            RejectCode::Oversize => "oversize",
            RejectCode::NotANumber => "not_a_number",
            RejectCode::NonFinite => "non_finite",
            RejectCode::Json => "json",
            RejectCode::LineProtocol => "line_protocol",
            RejectCode::Timestamp => "timestamp",
            RejectCode::Encoding => "encoding",
            RejectCode::Limit => "limit",
        }
    }
}

/// Longest [`Reject::message`], in bytes: a longer one is cut and ends with `…`. Messages
/// quote the input they refuse, and a dead letter must not grow with the input.
pub const MAX_REJECT_MESSAGE: usize = 512;

impl Reject {
    pub(crate) fn new(code: RejectCode, message: impl Into<String>) -> Self {
        let mut message: String = message.into();
        if message.len() > MAX_REJECT_MESSAGE {
            let mut cut = MAX_REJECT_MESSAGE - '…'.len_utf8();
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        // Exact capacity, so `Decoded::decoded_bytes` holds each message at its length.
        message.shrink_to_fit();
        Reject { code, message }
    }
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

/// The sensor name of a device's status messages (`vehicle.<device>._status`): what
/// `fleetpipe-agent` reports about itself, such as a refused configuration. It is inside
/// the device's own subjects (so its credentials allow it) and inside the telemetry
/// stream's, but it is not telemetry: [`decode`] yields neither readings nor rejects for
/// it, so a collector acknowledges it and stores nothing.
pub const STATUS_SENSOR: &str = "_status";

/// Whether `token` is a valid device id or sensor-name token: ASCII letters, digits, `-`
/// and `_`, 1 to 128 bytes. Those characters are valid in NATS subjects and KV keys alike.
pub fn is_valid_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 128
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
