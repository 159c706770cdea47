//! Query-string parsing with error messages that say what is accepted.
//!
//! Handlers take the raw query and parse it here rather than through axum's `Query`
//! extractor, so that every problem (an unknown or repeated parameter, a bad number, time
//! or duration) becomes a 400 with a precise message instead of a generic rejection.

use std::time::Duration;

use fleetpipe_proto::Timestamp;

use crate::error::ApiError;

/// The decoded parameters of one request, checked against the names an endpoint accepts.
#[derive(Debug)]
pub struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    /// Decodes `raw` (`a=1&b=2`, percent- and `+`-decoded) and refuses names not in
    /// `accepted`, so a typo (`sensors=` for `sensor=`) is reported instead of ignored.
    pub fn parse(raw: Option<&str>, accepted: &[&str]) -> Result<Params, ApiError> {
        let pairs: Vec<(String, String)> = form_urlencoded::parse(raw.unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        if let Some((unknown, _)) = pairs.iter().find(|(k, _)| !accepted.contains(&k.as_str())) {
            return Err(ApiError::bad(format!(
                "unknown parameter {:?}; accepted: {}",
                truncate(unknown),
                if accepted.is_empty() {
                    "none".to_string()
                } else {
                    accepted.join(", ")
                }
            )));
        }
        Ok(Params { pairs })
    }

    /// The value of a parameter that may appear at most once.
    pub fn one<'a>(&'a self, name: &str) -> Result<Option<&'a str>, ApiError> {
        let mut values = self
            .pairs
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str());
        let first = values.next();
        if values.next().is_some() {
            return Err(ApiError::bad(format!(
                "parameter {name:?} is given more than once"
            )));
        }
        Ok(first)
    }

    /// Every value of a parameter that may repeat (`tag=a:1&tag=b:2`).
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.pairs
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Echoes client input in an error message without letting it grow the response.
pub fn truncate(s: &str) -> String {
    const MAX: usize = 100;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(MAX).collect();
        t.push('…');
        t
    }
}

/// An unsigned integer within `0..=max`.
pub fn parse_uint(name: &str, value: &str, max: u64) -> Result<u64, ApiError> {
    match value.parse::<u64>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(ApiError::bad(format!(
            "{name} must be an integer from 0 to {max}, got {:?}",
            truncate(value)
        ))),
    }
}

/// One of a fixed set of words.
pub fn parse_choice<'a>(name: &str, value: &str, choices: &[&'a str]) -> Result<&'a str, ApiError> {
    choices
        .iter()
        .find(|c| **c == value)
        .copied()
        .ok_or_else(|| {
            ApiError::bad(format!(
                "{name} must be one of {}, got {:?}",
                choices.join(", "),
                truncate(value)
            ))
        })
}

/// A point in time: `now`, an RFC 3339 time (`2026-02-15T10:00:00Z`), or a duration back
/// from now (`-10m`, `10m`, `-2h`).
/// Times must lie between 1970-01-01 and 9999-12-31, which every store can represent.
pub fn parse_instant(name: &str, value: &str, now: Timestamp) -> Result<Timestamp, ApiError> {
    let value = value.trim();
    // An unencoded `+01:00` offset arrives as ` 01:00` (a `+` in a query means a space).
    let t = if value == "now" {
        now
    } else if let Some(t) = Timestamp::parse_rfc3339(&value.replace(' ', "+")) {
        t
    } else {
        let back = value.strip_prefix('-').unwrap_or(value);
        match humantime::parse_duration(back) {
            Ok(d) => now.saturating_add_micros(-micros(d)),
            Err(_) => {
                return Err(ApiError::bad(format!(
                    "{name} {:?} is neither an RFC 3339 time (2026-02-15T10:00:00Z; encode + \
                     as %2B) nor a duration back from now (-10m, -2h, now)",
                    truncate(value)
                )))
            }
        }
    };
    if !(0..=LATEST_US).contains(&t.as_micros()) {
        return Err(ApiError::bad(format!(
            "{name} {:?} is outside 1970-01-01..9999-12-31",
            truncate(value)
        )));
    }
    Ok(t)
}

/// 9999-12-31T23:59:59.999999Z in µs.
const LATEST_US: i64 = 253_402_300_799_999_999;

/// A positive duration: a number of seconds (`60`) or a duration (`5m`, `30s`).
pub fn parse_duration(name: &str, value: &str, max: Duration) -> Result<Duration, ApiError> {
    let parsed = match value.trim().parse::<u64>() {
        Ok(secs) => Some(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(value.trim()).ok(),
    };
    match parsed {
        Some(d) if !d.is_zero() && d <= max => Ok(d),
        _ => Err(ApiError::bad(format!(
            "{name} must be a positive duration up to {} (60, 30s, 5m, 1h), got {:?}",
            humantime::format_duration(max),
            truncate(value)
        ))),
    }
}

/// A duration in microseconds, saturating.
pub fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp::from_micros(1_771_149_600_000_000); // 2026-02-15T10:00:00Z

    #[test]
    fn instants() {
        let ok: &[(&str, i64)] = &[
            ("now", NOW.as_micros()),
            ("-10m", NOW.as_micros() - 600_000_000),
            ("10m", NOW.as_micros() - 600_000_000),
            ("2026-02-15T09:00:00Z", 1_771_146_000_000_000),
            ("2026-02-15T10:00:00+01:00", 1_771_146_000_000_000),
            ("2026-02-15T10:00:00 01:00", 1_771_146_000_000_000),
        ];
        for (input, want) in ok {
            let got = parse_instant("from", input, NOW).unwrap();
            assert_eq!(got.as_micros(), *want, "{input}");
        }
        for bad in [
            "",
            "yesterday",
            "-",
            "--10m",
            "2026-13-01T00:00:00Z",
            "10 parsecs",
            "-100y",
            "1969-12-31T23:59:59Z",
        ] {
            let err = parse_instant("from", bad, NOW).unwrap_err();
            assert!(err.to_string().starts_with("from "), "{err}");
        }
    }

    #[test]
    fn durations() {
        let max = Duration::from_secs(3600);
        assert_eq!(
            parse_duration("step", "60", max).unwrap(),
            Duration::from_secs(60)
        );
        assert_eq!(
            parse_duration("step", "5m", max).unwrap(),
            Duration::from_secs(300)
        );
        for bad in ["0", "0s", "-5m", "2h", "x", "", "99999999999999999999"] {
            assert!(parse_duration("step", bad, max).is_err(), "{bad}");
        }
    }

    #[test]
    fn params() {
        let p = Params::parse(Some("a=1&b=x%20y&b=z&c=a+b"), &["a", "b", "c"]).unwrap();
        assert_eq!(p.one("a").unwrap(), Some("1"));
        assert_eq!(p.one("c").unwrap(), Some("a b"));
        assert_eq!(p.all("b").collect::<Vec<_>>(), ["x y", "z"]);
        assert!(p.one("b").is_err());
        assert_eq!(p.one("d").unwrap(), None);
        let err = Params::parse(Some("sensors=speed"), &["sensor"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown parameter \"sensors\"; accepted: sensor"
        );
        assert!(Params::parse(None, &[]).is_ok());
        assert!(Params::parse(Some("%ff%fe=1"), &["a"]).is_err());
    }

    #[test]
    fn numbers_and_choices() {
        assert_eq!(parse_uint("limit", "100", 10_000).unwrap(), 100);
        for bad in ["-1", "10001", "1e3", "", "abc"] {
            assert!(parse_uint("limit", bad, 10_000).is_err(), "{bad}");
        }
        assert_eq!(
            parse_choice("sort", "id", &["id", "last_seen"]).unwrap(),
            "id"
        );
        assert!(parse_choice("sort", "name", &["id", "last_seen"]).is_err());
        assert_eq!(truncate(&"x".repeat(500)).chars().count(), 101);
    }
}
