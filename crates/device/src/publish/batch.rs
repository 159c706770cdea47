//! Readings into messages: one JSON reading on the sensor's own subject (with its unit
//! and the device's timestamp), or, when several readings are waiting, one line-protocol
//! message on the device's `lp` subject, a line per reading with its timestamp.

use std::collections::HashSet;
use std::sync::Arc;

use fleetpipe_proto::{
    encode_json, encode_line_protocol, SubjectError, SubjectTemplate, Timestamp,
};

use super::spool::Message;

/// Most readings in one line-protocol message (about 40 bytes each: far below NATS'
/// default 1 MiB `max_payload` and the decoder's 10,000).
pub const MAX_BATCH_READINGS: usize = 500;

/// One sampled value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Sensor name: tokens joined by `.`.
    pub sensor: Arc<str>,
    /// The value; finite.
    pub value: f64,
    /// The device's time of the sample. Strictly increasing per sensor (the decoder keeps
    /// one reading per sensor and timestamp in a message).
    pub ts: Timestamp,
    /// Unit, sent with the sensor's JSON readings.
    pub unit: Option<Arc<str>>,
}

/// Encodes samples for one device.
pub struct Batcher {
    template: SubjectTemplate,
    device: String,
    /// Values for the template's extra placeholders.
    tags: Vec<(String, String)>,
    /// Sensors whose unit went out in a JSON message since start (line protocol carries no
    /// unit; the store keeps the last unit a series was sent with).
    units_sent: HashSet<Arc<str>>,
}

impl Batcher {
    /// Checks that the template formats for `device` with `tags`.
    pub fn new(
        template: SubjectTemplate,
        device: &str,
        tags: Vec<(String, String)>,
    ) -> Result<Batcher, SubjectError> {
        let b = Batcher {
            template,
            device: device.to_string(),
            tags,
            units_sent: HashSet::new(),
        };
        b.subject("lp")?;
        Ok(b)
    }

    /// The subject `sensor`'s readings go on.
    pub fn subject(&self, sensor: &str) -> Result<String, SubjectError> {
        let tags: Vec<(&str, &str)> = self
            .tags
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.template.format(&self.device, sensor, &tags)
    }

    /// Forgets which units were sent (after a configuration change that may change them).
    pub fn resend_units(&mut self) {
        self.units_sent.clear();
    }

    /// Turns `samples` (in sampling order) into messages, in order: a lone sample, a
    /// sample whose unit has not gone out yet and a sensor name line protocol cannot
    /// express go as JSON; the rest as line protocol, at most [`MAX_BATCH_READINGS`] a
    /// message. A sample whose subject does not format is returned as a problem.
    pub fn encode(&mut self, samples: &[Sample], out: &mut Vec<Message>) -> Vec<String> {
        let mut problems = Vec::new();
        let batch = samples.len() > 1;
        let mut lp = String::new();
        let mut lp_readings = 0u32;
        for s in samples {
            let unit_due = s.unit.is_some() && !self.units_sent.contains(&s.sensor);
            let lp_name = lp_name(&s.sensor);
            match (batch && !unit_due, lp_name) {
                (true, Some((measurement, field))) => {
                    encode_line_protocol(&mut lp, measurement, &[(field, s.value)], Some(s.ts));
                    lp_readings += 1;
                    if lp_readings as usize >= MAX_BATCH_READINGS {
                        self.flush_lp(&mut lp, &mut lp_readings, out, &mut problems);
                    }
                }
                _ => {
                    // Keep the order of a sensor's readings: what is batched goes first.
                    self.flush_lp(&mut lp, &mut lp_readings, out, &mut problems);
                    match self.subject(&s.sensor) {
                        Ok(subject) => {
                            let payload = encode_json(s.value, s.unit.as_deref(), Some(s.ts), None);
                            out.push(Message {
                                subject,
                                payload,
                                readings: 1,
                            });
                            if s.unit.is_some() {
                                self.units_sent.insert(s.sensor.clone());
                            }
                        }
                        Err(e) => problems.push(format!("sensor {}: {e}", s.sensor)),
                    }
                }
            }
        }
        self.flush_lp(&mut lp, &mut lp_readings, out, &mut problems);
        problems
    }

    fn flush_lp(
        &self,
        lp: &mut String,
        readings: &mut u32,
        out: &mut Vec<Message>,
        problems: &mut Vec<String>,
    ) {
        if *readings == 0 {
            return;
        }
        match self.subject("lp") {
            Ok(subject) => out.push(Message {
                subject,
                payload: std::mem::take(lp),
                readings: *readings,
            }),
            Err(e) => problems.push(e.to_string()),
        }
        lp.clear();
        *readings = 0;
    }
}

/// The line-protocol measurement and field that decode back to `sensor`: `temp` →
/// (`temp`, `value`), `engine.temp` → (`engine`, `temp`); `None` for deeper names and
/// for `x.value` (which would decode as `x`).
fn lp_name(sensor: &str) -> Option<(&str, &str)> {
    match sensor.split_once('.') {
        None => Some((sensor, "value")),
        Some((m, f)) if !f.contains('.') && f != "value" => Some((m, f)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetpipe_proto::{decode, Limits};

    fn sample(sensor: &str, value: f64, ts: i64, unit: Option<&str>) -> Sample {
        Sample {
            sensor: sensor.into(),
            value,
            ts: Timestamp(ts),
            unit: unit.map(Into::into),
        }
    }

    #[test]
    fn batches_decode_back_to_the_same_readings() {
        let template = SubjectTemplate::parse("vehicle.{device}.{sensor}").unwrap();
        let mut b = Batcher::new(template.clone(), "d1", vec![]).unwrap();
        let samples = vec![
            sample("temp", 21.5, 1_700_000_000_000_000, Some("C")),
            sample("temp", 21.6, 1_700_000_000_100_000, Some("C")),
            sample("engine.rpm", 900.0, 1_700_000_000_100_000, None),
            sample("a.b.c", 1.0, 1_700_000_000_100_000, None),
            sample("x", 2.0, 1_700_000_000_200_000, None),
        ];
        let mut out = Vec::new();
        assert!(b.encode(&samples, &mut out).is_empty());
        let subjects: Vec<&str> = out.iter().map(|m| m.subject.as_str()).collect();
        assert_eq!(
            subjects,
            [
                "vehicle.d1.temp",
                "vehicle.d1.lp",
                "vehicle.d1.a.b.c",
                "vehicle.d1.lp"
            ]
        );
        let mut got = Vec::new();
        for m in &out {
            let d = decode(
                &template,
                &m.subject,
                m.payload.as_bytes(),
                Timestamp(1_700_000_000_300_000),
                &Limits::default(),
            );
            assert!(d.rejects.is_empty(), "{:?}", d.rejects);
            assert_eq!(d.readings.len() as u32, m.readings);
            got.extend(
                d.readings
                    .into_iter()
                    .map(|r| (r.sensor, r.value, r.ts.0, r.unit)),
            );
        }
        let want: Vec<_> = samples
            .iter()
            .map(|s| (s.sensor.to_string(), s.value, s.ts.0, None::<String>))
            .collect();
        let got_no_units: Vec<_> = got
            .iter()
            .map(|(s, v, t, _)| (s.to_string(), *v, *t, None))
            .collect();
        assert_eq!(got_no_units, want);
        assert_eq!(got[0].3.as_deref(), Some("C"));
        // A lone reading goes as JSON.
        out.clear();
        b.encode(&[sample("x", 3.0, 1, None)], &mut out);
        assert_eq!(out[0].subject, "vehicle.d1.x");
        assert!(out[0].payload.starts_with('{'));
    }
}
