//! Subjects devices publish on, described by a template.
//!
//! A template is a dot-separated list of tokens, each either a literal (`vehicle`) or a
//! placeholder (`{device}`). `{device}` and `{sensor}` are required; `{sensor}` comes last
//! and takes every remaining token, so `spindle.vibration.rms` is one sensor. Any other
//! placeholder (`{site}`, `{line}`) is kept as a tag on the reading.

use crate::is_valid_token;

/// The default, the reference design's `vehicle.<id>.<sensor>`.
pub const DEFAULT_TEMPLATE: &str = "vehicle.{device}.{sensor}";

/// Most tokens a sensor name may have; deeper subjects are refused.
const MAX_SENSOR_TOKENS: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(String),
    Device,
    Sensor,
    Tag(String),
}

/// A parsed subject template; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectTemplate {
    source: String,
    tokens: Vec<Token>,
}

/// What a subject says: which device, which sensor, and the template's extra tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectParts<'a> {
    pub device: &'a str,
    /// The sensor, possibly several tokens joined by `.`.
    pub sensor: &'a str,
    pub tags: Vec<(&'a str, &'a str)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("invalid subject template {template:?}: {reason}")]
    Template { template: String, reason: String },
    #[error("subject {subject:?} does not match template {template:?}: {reason}")]
    Mismatch {
        subject: String,
        template: String,
        reason: String,
    },
    #[error("cannot build a subject: {0}")]
    Format(String),
}

impl SubjectTemplate {
    /// Parses a template such as `acme.{site}.{area}.{line}.{device}.{sensor}`.
    pub fn parse(template: &str) -> Result<Self, SubjectError> {
        let bad = |reason: &str| SubjectError::Template {
            template: template.to_string(),
            reason: reason.to_string(),
        };
        let mut tokens = Vec::new();
        for raw in template.split('.') {
            let token = if let Some(name) = raw.strip_prefix('{').and_then(|r| r.strip_suffix('}'))
            {
                match name {
                    "device" => Token::Device,
                    "sensor" => Token::Sensor,
                    _ if is_valid_token(name) => Token::Tag(name.to_string()),
                    _ => return Err(bad(&format!("placeholder {raw:?} is not a valid name"))),
                }
            } else if is_valid_token(raw) {
                Token::Literal(raw.to_string())
            } else {
                return Err(bad(&format!(
                    "token {raw:?} must be a literal of letters, digits, '-' or '_', or a {{placeholder}}"
                )));
            };
            if tokens.contains(&token) && !matches!(token, Token::Literal(_)) {
                return Err(bad(&format!("placeholder {raw} appears twice")));
            }
            tokens.push(token);
        }
        if !tokens.contains(&Token::Device) {
            return Err(bad("it has no {device} placeholder"));
        }
        if tokens.last() != Some(&Token::Sensor) {
            return Err(bad("{sensor} must be the last token"));
        }
        Ok(SubjectTemplate {
            source: template.to_string(),
            tokens,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The subject filter a stream captures for this template: the literal prefix then `>`
    /// (`vehicle.>`), so subjects with too few tokens are captured too and dead-lettered
    /// rather than silently dropped by the broker. A template that starts with a placeholder
    /// captures `*` per token before the sensor, then `>`.
    pub fn stream_filter(&self) -> String {
        let literal_prefix: Vec<&str> = self
            .tokens
            .iter()
            .map_while(|t| match t {
                Token::Literal(l) => Some(l.as_str()),
                _ => None,
            })
            .collect();
        if literal_prefix.is_empty() {
            let mut parts: Vec<&str> = vec!["*"; self.tokens.len() - 1];
            parts.push(">");
            parts.join(".")
        } else {
            format!("{}.>", literal_prefix.join("."))
        }
    }

    /// Splits a subject into device, sensor and tags, or says why it does not fit.
    pub fn parse_subject<'a>(&'a self, subject: &'a str) -> Result<SubjectParts<'a>, SubjectError> {
        let mismatch = |reason: String| SubjectError::Mismatch {
            subject: subject.to_string(),
            template: self.source.clone(),
            reason,
        };
        let fixed = self.tokens.len() - 1;
        let mut device = None;
        let mut tags = Vec::new();
        let mut rest = subject;
        for (i, token) in self.tokens[..fixed].iter().enumerate() {
            let Some((part, tail)) = rest.split_once('.') else {
                return Err(mismatch(format!(
                    "it has {} tokens, the template needs at least {}",
                    i + 1,
                    fixed + 1
                )));
            };
            rest = tail;
            match token {
                Token::Literal(l) if l == part => {}
                Token::Literal(l) => {
                    return Err(mismatch(format!("token {} is {part:?}, not {l:?}", i + 1)))
                }
                Token::Device if is_valid_token(part) => device = Some(part),
                Token::Device => return Err(mismatch(format!("device id {part:?} is not valid"))),
                Token::Tag(name) if !part.is_empty() => tags.push((name.as_str(), part)),
                Token::Tag(name) => return Err(mismatch(format!("tag {name} is empty"))),
                Token::Sensor => unreachable!("parse() puts {{sensor}} last"),
            }
        }
        let sensor_tokens = rest.split('.').count();
        if sensor_tokens > MAX_SENSOR_TOKENS {
            return Err(mismatch(format!(
                "sensor {rest:?} has {sensor_tokens} tokens, at most {MAX_SENSOR_TOKENS} are allowed"
            )));
        }
        if !rest.split('.').all(is_valid_token) {
            return Err(mismatch(format!("sensor name {rest:?} is not valid")));
        }
        Ok(SubjectParts {
            device: device.unwrap_or_default(),
            sensor: rest,
            tags,
        })
    }

    /// Builds the subject a device publishes a sensor's readings on. `tags` must give a
    /// value for every extra placeholder of the template.
    pub fn format(
        &self,
        device: &str,
        sensor: &str,
        tags: &[(&str, &str)],
    ) -> Result<String, SubjectError> {
        let mut out = String::with_capacity(self.source.len() + device.len() + sensor.len());
        for (i, token) in self.tokens.iter().enumerate() {
            if i > 0 {
                out.push('.');
            }
            match token {
                Token::Literal(l) => out.push_str(l),
                Token::Device => out.push_str(device),
                Token::Sensor => out.push_str(sensor),
                Token::Tag(name) => match tags.iter().find(|(k, _)| k == name) {
                    Some((_, v)) => out.push_str(v),
                    None => {
                        return Err(SubjectError::Format(format!(
                            "template {:?} needs a value for {{{name}}}",
                            self.source
                        )))
                    }
                },
            }
        }
        Ok(out)
    }

    /// Names of the template's extra placeholders, in order.
    pub fn tag_names(&self) -> impl Iterator<Item = &str> {
        self.tokens.iter().filter_map(|t| match t {
            Token::Tag(n) => Some(n.as_str()),
            _ => None,
        })
    }
}

impl Default for SubjectTemplate {
    fn default() -> Self {
        SubjectTemplate::parse(DEFAULT_TEMPLATE).expect("the default template is valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::type_complexity)] // a table of cases reads best inline
    fn parses_subjects() {
        let default = SubjectTemplate::default();
        let deep = SubjectTemplate::parse("acme.{site}.{area}.{line}.{device}.{sensor}").unwrap();
        let leading = SubjectTemplate::parse("{org}.{device}.{sensor}").unwrap();
        let ok: &[(&SubjectTemplate, &str, &str, &str, &[(&str, &str)])] = &[
            (&default, "vehicle.4613.speed", "4613", "speed", &[]),
            (&default, "vehicle.v-1.gps.lat", "v-1", "gps.lat", &[]),
            (
                &deep,
                "acme.munich.hall-a.line-1.cnc-001.spindle.vibration.rms",
                "cnc-001",
                "spindle.vibration.rms",
                &[("site", "munich"), ("area", "hall-a"), ("line", "line-1")],
            ),
            (&leading, "acme.m1.temp", "m1", "temp", &[("org", "acme")]),
        ];
        for (template, subject, device, sensor, tags) in ok {
            let parts = template.parse_subject(subject).unwrap();
            assert_eq!(
                (parts.device, parts.sensor, parts.tags.as_slice()),
                (*device, *sensor, *tags),
                "{subject}"
            );
        }
    }

    #[test]
    fn refuses_subjects_that_do_not_fit() {
        let default = SubjectTemplate::default();
        let bad = [
            "vehicle.4613",
            "truck.4613.speed",
            "vehicle.46:13.speed",
            "vehicle.4613.a.b.c.d.e.f.g.h.i",
            "vehicle.4613.sp@ed",
        ];
        for subject in bad {
            assert!(
                default.parse_subject(subject).is_err(),
                "{subject} should not parse"
            );
        }
    }

    #[test]
    fn refuses_bad_templates() {
        for t in [
            "vehicle.{sensor}",
            "vehicle.{sensor}.{device}",
            "{device}.{device}.{sensor}",
            "vehicle.a b.{device}.{sensor}",
            "vehicle.*.{device}.{sensor}",
        ] {
            assert!(SubjectTemplate::parse(t).is_err(), "{t} should be refused");
        }
    }

    #[test]
    fn stream_filters_and_format() {
        assert_eq!(SubjectTemplate::default().stream_filter(), "vehicle.>");
        let leading = SubjectTemplate::parse("{org}.{device}.{sensor}").unwrap();
        assert_eq!(leading.stream_filter(), "*.*.>");
        let deep = SubjectTemplate::parse("acme.{site}.{device}.{sensor}").unwrap();
        assert_eq!(
            deep.format("cnc-1", "motor.current", &[("site", "munich")])
                .unwrap(),
            "acme.munich.cnc-1.motor.current"
        );
        assert!(deep.format("cnc-1", "x", &[]).is_err());
    }
}
