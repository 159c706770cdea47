//! Generated inputs for each payload form: near-valid ones (the decoder's every branch, the
//! limits, repeated points) and arbitrary bytes. Whatever comes in, what comes out holds the
//! invariants `check` lists. Case counts keep the whole run to a few seconds in debug builds.

use std::collections::HashSet;

use proptest::prelude::*;
use proptest::sample::select;

use super::*;
use crate::timestamp::EARLIEST;
use crate::MAX_REJECT_MESSAGE;

/// Where a generated payload is published, and with which limits.
#[derive(Debug, Clone)]
struct Case {
    template: &'static str,
    subject: &'static str,
    limits: Limits,
}

fn case() -> impl Strategy<Value = Case> {
    let places = select(vec![
        ("vehicle.{device}.{sensor}", "vehicle.v1.lp"),
        ("acme.{site}.{device}.{sensor}", "acme.munich.cnc-1.lp"),
    ]);
    let tight = Limits {
        max_readings: 7,
        max_tags: 3,
        // The deep template's `munich` just fits.
        max_tag_bytes: 6,
        ..Limits::default()
    };
    let limits = prop_oneof![2 => Just(Limits::default()), 1 => Just(tight)];
    (places, limits).prop_map(|((template, subject), limits)| Case {
        template,
        subject,
        limits,
    })
}

/// Decodes `payload` and checks every invariant of the output.
fn check(case: &Case, payload: &[u8]) -> Result<(), TestCaseError> {
    let template = SubjectTemplate::parse(case.template).unwrap();
    let limits = &case.limits;
    let d = decode(&template, case.subject, payload, RECEIVED, limits);

    prop_assert!(
        !d.readings.is_empty() || !d.rejects.is_empty(),
        "nothing decoded, nothing said"
    );
    prop_assert!(d.readings.len() <= limits.max_readings);
    prop_assert!(
        d.rejects.len() <= MAX_REJECTS + 2,
        "{} rejects",
        d.rejects.len()
    );
    for j in &d.rejects {
        prop_assert!(!j.message.is_empty() && j.message.len() <= MAX_REJECT_MESSAGE);
    }
    let mut points = HashSet::new();
    for r in &d.readings {
        prop_assert!(r.value.is_finite());
        prop_assert!(crate::is_valid_token(&r.device));
        prop_assert!(
            r.sensor.split('.').all(crate::is_valid_token),
            "{:?}",
            r.sensor
        );
        prop_assert!(r.ts >= EARLIEST);
        prop_assert!(r.ts.as_micros() - RECEIVED.as_micros() <= limits.max_future_micros);
        prop_assert!(
            r.tags.windows(2).all(|w| w[0].0 < w[1].0),
            "tags not canonical: {:?}",
            r.tags
        );
        prop_assert!(r.tags.len() <= limits.max_tags);
        for (k, v) in r.tags.iter() {
            for text in [k, v] {
                prop_assert!(!text.is_empty() && text.len() <= limits.max_tag_bytes);
                prop_assert!(!text.bytes().any(|b| b.is_ascii_control()), "{text:?}");
            }
        }
        for label in [&r.unit, &r.quality].into_iter().flatten() {
            prop_assert!(label.len() <= MAX_LABEL_LEN);
            prop_assert!(!label.bytes().any(|b| b.is_ascii_control()), "{label:?}");
        }
        prop_assert!(
            points.insert((&r.sensor, &r.tags[..], r.ts)),
            "repeated point {r:?}"
        );
    }
    let (k, c) = expansion_bound(&template, case.subject);
    let bound = k * payload.len() as f64 + c as f64;
    prop_assert!(
        d.decoded_bytes() as f64 <= bound,
        "{} decoded bytes for {} payload bytes",
        d.decoded_bytes(),
        payload.len()
    );
    Ok(())
}

/// `K` and `C` of [`Decoded::decoded_bytes`]' docs for a subject.
fn expansion_bound(template: &SubjectTemplate, subject: &str) -> (f64, usize) {
    let parts = template.parse_subject(subject).unwrap();
    let t: usize = parts.tags.iter().map(|(k, v)| 48 + k.len() + v.len()).sum();
    (f64::max(97.0, 11.0 + t as f64 / 6.0), 64 * 1024 + t)
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Failures print their input; the shared source tree gets no regression files.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn plain() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => r"[ \t]?[-+]?[0-9]{0,6}(\.[0-9]{0,4})?([eE][-+]?[0-9]{1,3})?[ \n]?",
        1 => select(vec!["NaN", "inf", "-infinity", "1e400", "0x10", "", "1 2"]).prop_map(String::from),
    ]
}

/// A JSON string literal: escapes (control characters among them), Unicode, long ones.
fn json_string() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => r#""[a-zA-Z /°]{0,10}""#,
        2 => r#""([a-zA-Z /°]|\\u00[01][0-9a-f]|\\u007f|\\[nt"\\/]|é|✓){0,10}""#,
        1 => any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        1 => "[a-z]{60,70}".prop_map(|s| format!("\"{s}\"")),
    ]
}

fn json_timestamp() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (0i64..600).prop_map(|s| format!("\"2026-02-15T09:{:02}:{:02}Z\"", s / 60, s % 60)),
        3 => select(vec![1, 1_000, 1_000_000, 1_000_000_000])
            .prop_flat_map(|scale| (1_771_140_000i64..1_771_160_000).prop_map(move |s| s * scale))
            .prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_map(|n| serde_json::to_string(&n).unwrap()),
        1 => select(vec!["\"soon\"", "true", "null", "-1", "1e300"]).prop_map(String::from),
    ]
}

fn json() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        4 => r"-?[0-9]{1,5}(\.[0-9]{1,3})?",
        1 => select(vec!["\"95\"", "null", "1e999", "true", "[]"]).prop_map(String::from),
    ];
    let member = |name: &'static str, p: f64, value: BoxedStrategy<String>| {
        proptest::option::weighted(p, value.prop_map(move |v| format!("\"{name}\":{v}")))
    };
    (
        member("value", 0.95, value.boxed()),
        member("unit", 0.5, json_string().boxed()),
        member("timestamp", 0.5, json_timestamp().boxed()),
        member("quality", 0.5, json_string().boxed()),
        member("extra", 0.3, json_string().boxed()),
        proptest::bool::weighted(0.1),
    )
        .prop_map(|(v, u, t, q, x, truncated)| {
            let members: Vec<String> = [v, u, t, q, x].into_iter().flatten().collect();
            let text = format!("{{{}}}", members.join(","));
            let mut cut = if truncated {
                text.len() / 2
            } else {
                text.len()
            };
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text[..cut].to_string()
        })
}

/// Tag keys and values: mostly tokens, some with escapes, quotes, control characters,
/// Unicode or over the tight limits; `site` names the deep template's tag.
fn lp_text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[a-z0-9_-]{1,6}",
        1 => Just("site".to_string()),
        2 => r#"([a-z]|\\[ ,=]|[ ,="\\]|\x00|\t|\x7f|é|✓){1,6}"#,
        1 => "[a-z]{250,300}",
    ]
}

fn lp_field_value() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => r"-?[0-9]{1,4}(\.[0-9]{1,3})?",
        2 => "[0-9]{1,3}[iu]",
        1 => select(vec!["t", "F", "true", "NaN", "inf", "1e999", "abc", "\"s, t\"", ""])
            .prop_map(String::from),
    ]
}

fn lp_line() -> impl Strategy<Value = String> {
    // Few measurements, field keys and timestamps, so points repeat.
    let measurement = prop_oneof![8 => "[a-c]", 1 => "[a-z0-9_-]{1,6}", 1 => lp_text()];
    let key = prop_oneof![6 => "[a-c]", 2 => Just("value".to_string()), 1 => lp_text()];
    let tag = (lp_text(), lp_text()).prop_map(|(k, v)| format!(",{k}={v}"));
    let field = (key, lp_field_value()).prop_map(|(k, v)| format!("{k}={v}"));
    let ts = prop_oneof![
        3 => Just(String::new()),
        3 => Just(" 1771149599000000000".to_string()),
        2 => (1_771_149_590i64..1_771_149_600).prop_map(|s| format!(" {s}")),
        1 => r" [0-9]{1,20}",
        1 => r" [-a-z0-9]{1,4}",
    ];
    let line = (
        measurement,
        proptest::collection::vec(tag, 0..5),
        proptest::collection::vec(field, 1..6),
        ts,
    )
        .prop_map(|(m, tags, fields, ts)| format!("{m}{} {}{ts}", tags.concat(), fields.join(",")));
    prop_oneof![
        10 => line,
        1 => Just("# a comment".to_string()),
        1 => "[ -~]{0,30}",
    ]
}

fn lp() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(lp_line(), 1..24),
        select(vec!["\n", "\r\n", "\n\n"]),
    )
        .prop_map(|(lines, sep)| lines.join(sep))
}

/// Long lines of short fields and tags: the densest payloads, against the limits and the
/// expansion bound.
fn lp_dense() -> impl Strategy<Value = String> {
    let line = (
        "[a-z]{1,3}",
        proptest::collection::vec("[a-z0-9]{1,2}", 0..80),
        proptest::collection::vec("[a-zA-Z0-9]{1,2}", 1..300),
        proptest::option::of(1_771_149_000i64..1_771_149_600),
    )
        .prop_map(|(m, tags, keys, ts)| {
            let tags: String = tags.iter().map(|t| format!(",{t}={t}")).collect();
            let fields: Vec<String> = keys.iter().map(|k| format!("{k}=1")).collect();
            let ts = ts.map(|t| format!(" {t}")).unwrap_or_default();
            format!("{m}{tags} {}{ts}", fields.join(","))
        });
    proptest::collection::vec(line, 1..40).prop_map(|lines| lines.join("\n"))
}

proptest! {
    #![proptest_config(config(1_000))]

    #[test]
    fn plain_payloads(payload in plain(), case in case()) {
        check(&case, payload.as_bytes())?;
    }

    #[test]
    fn json_payloads(payload in json(), case in case()) {
        check(&case, payload.as_bytes())?;
    }

    #[test]
    fn line_protocol_payloads(payload in lp(), case in case()) {
        check(&case, payload.as_bytes())?;
    }

    #[test]
    fn arbitrary_bytes(payload in proptest::collection::vec(any::<u8>(), 0..300), case in case()) {
        check(&case, &payload)?;
    }

    #[test]
    fn bytes_of_the_payload_alphabet(
        payload in proptest::collection::vec(
            select(b"0123456789.,= {}\"\\\n\tabcxyzei-+:TZ#\0".to_vec()),
            0..300,
        ),
        case in case(),
    ) {
        check(&case, &payload)?;
    }
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn dense_line_protocol(payload in lp_dense(), case in case()) {
        check(&case, payload.as_bytes())?;
    }
}
