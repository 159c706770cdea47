//! Instants on the wire and in storage: microseconds since the Unix epoch, UTC.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Microseconds since 1970-01-01T00:00:00Z. Microseconds are what PostgreSQL's
/// `timestamptz` holds, so a value survives every store unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

/// Timestamps before this (2000-01-01) are refused: they come from unset device clocks.
pub const EARLIEST: Timestamp = Timestamp(946_684_800_000_000);

impl Timestamp {
    pub const fn from_micros(us: i64) -> Self {
        Timestamp(us)
    }

    pub const fn as_micros(self) -> i64 {
        self.0
    }

    /// The current wall-clock time.
    pub fn now() -> Self {
        Self::from_offset_date_time(OffsetDateTime::now_utc())
    }

    pub fn from_offset_date_time(t: OffsetDateTime) -> Self {
        // i128 nanos / 1000 always fits i64 for any year `time` can represent.
        Timestamp((t.unix_timestamp_nanos() / 1000) as i64)
    }

    pub fn to_offset_date_time(self) -> Option<OffsetDateTime> {
        OffsetDateTime::from_unix_timestamp_nanos(self.0 as i128 * 1000).ok()
    }

    /// Parses an RFC 3339 timestamp such as `2026-02-15T10:00:00Z` or `…+01:00`.
    pub fn parse_rfc3339(s: &str) -> Option<Self> {
        OffsetDateTime::parse(s, &Rfc3339)
            .ok()
            .map(Self::from_offset_date_time)
    }

    /// Interprets a Unix epoch number by its magnitude: seconds (below 10^11), milliseconds
    /// (below 10^14), microseconds (below 10^17), otherwise nanoseconds. Fractions are kept
    /// down to the microsecond. Unambiguous for every date from 1973 to 5138.
    pub fn from_epoch_number(n: f64) -> Option<Self> {
        if !n.is_finite() || n < 0.0 {
            return None;
        }
        let us = if n < 1e11 {
            n * 1e6
        } else if n < 1e14 {
            n * 1e3
        } else if n < 1e17 {
            n
        } else {
            n / 1e3
        };
        (us < i64::MAX as f64).then(|| Timestamp(us.round() as i64))
    }

    /// RFC 3339 text with microseconds, in UTC.
    pub fn to_rfc3339(self) -> String {
        self.to_offset_date_time()
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_else(|| format!("@{}us", self.0))
    }

    pub fn saturating_add_micros(self, us: i64) -> Self {
        Timestamp(self.0.saturating_add(us))
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_magnitudes() {
        let cases: &[(f64, i64)] = &[
            (1_771_149_600.0, 1_771_149_600_000_000),
            (1_771_149_600.5, 1_771_149_600_500_000),
            (1_771_149_600_123.0, 1_771_149_600_123_000),
            (1_771_149_600_123_456.0, 1_771_149_600_123_456),
            (1_771_149_600_123_456_789.0, 1_771_149_600_123_457),
        ];
        for &(input, want) in cases {
            let got = Timestamp::from_epoch_number(input).unwrap().as_micros();
            assert!((got - want).abs() <= 1, "{input}: got {got}, want {want}");
        }
        assert_eq!(Timestamp::from_epoch_number(-1.0), None);
        assert_eq!(Timestamp::from_epoch_number(f64::NAN), None);
    }

    #[test]
    fn rfc3339_round_trip() {
        let t = Timestamp::parse_rfc3339("2026-02-15T10:00:00.25+01:00").unwrap();
        assert_eq!(t.as_micros(), 1_771_146_000_250_000);
        assert_eq!(t.to_rfc3339(), "2026-02-15T09:00:00.25Z");
        assert_eq!(Timestamp::parse_rfc3339("yesterday"), None);
    }
}
