use super::*;

const RECEIVED: Timestamp = Timestamp(1_771_149_600_000_000); // 2026-02-15T10:00:00Z

fn run(subject: &str, payload: &str) -> Decoded {
    decode(
        &SubjectTemplate::default(),
        subject,
        payload.as_bytes(),
        RECEIVED,
        &Limits::default(),
    )
}

/// (sensor, value, ts) of each reading, and the reject codes.
fn summary(d: &Decoded) -> (Vec<(String, f64, i64)>, Vec<&'static str>) {
    (
        d.readings
            .iter()
            .map(|r| (r.sensor.to_string(), r.value, r.ts.as_micros()))
            .collect(),
        d.rejects.iter().map(|r| r.code.as_str()).collect(),
    )
}

#[test]
#[allow(clippy::type_complexity)] // a table of cases reads best inline
fn good_payloads() {
    let r = RECEIVED.as_micros();
    let cases: &[(&str, &str, &[(&str, f64, i64)])] = &[
        ("vehicle.4613.speed", "95", &[("speed", 95.0, r)]),
        ("vehicle.4613.speed", "87.25\n", &[("speed", 87.25, r)]),
        ("vehicle.4613.soc", "-1.5e2", &[("soc", -150.0, r)]),
        (
            "vehicle.4613.speed",
            r#"{"value": 2.45}"#,
            &[("speed", 2.45, r)],
        ),
        (
            "vehicle.4613.speed",
            r#"{"value":2.45,"unit":"mm/s","timestamp":"2026-02-15T09:59:00Z","quality":"good","machine_id":"x"}"#,
            &[("speed", 2.45, r - 60_000_000)],
        ),
        (
            "vehicle.4613.speed",
            r#"{"value":1,"timestamp":1771149590}"#,
            &[("speed", 1.0, r - 10_000_000)],
        ),
        (
            "vehicle.4613.speed",
            r#"{"value":1,"timestamp":1771149590500}"#,
            &[("speed", 1.0, r - 9_500_000)],
        ),
        (
            "vehicle.4613.lp",
            "engine speed=88.5,torque=210i,on=t 1771149599000000000\nsoc value=80",
            &[
                ("engine.speed", 88.5, r - 1_000_000),
                ("engine.torque", 210.0, r - 1_000_000),
                ("engine.on", 1.0, r - 1_000_000),
                ("soc", 80.0, r),
            ],
        ),
        (
            "vehicle.4613.lp",
            "# comment\n\ncpu,host=a\\ b,cpu=cpu0 usage_idle=99.5 1771149599",
            &[("cpu.usage_idle", 99.5, r - 1_000_000)],
        ),
    ];
    for (subject, payload, want) in cases {
        let d = run(subject, payload);
        let want: Vec<_> = want
            .iter()
            .map(|(s, v, t)| (s.to_string(), *v, *t))
            .collect();
        assert_eq!(summary(&d), (want, vec![]), "{payload}");
        assert!(d.readings.iter().all(|r| r.device == "4613"));
    }
}

#[test]
fn json_labels_and_lp_tags_are_kept() {
    let d = run(
        "vehicle.v1.temp",
        r#"{"value":20,"unit":"C","quality":"uncertain"}"#,
    );
    assert_eq!(d.readings[0].unit.as_deref(), Some("C"));
    assert_eq!(d.readings[0].quality.as_deref(), Some("uncertain"));
    let d = run("vehicle.v1.lp", "cpu,host=a\\ b,cpu=cpu0 usage=1");
    assert_eq!(
        &d.readings[0].tags[..],
        // Sorted by name: the canonical form.
        [("cpu".into(), "cpu0".into()), ("host".into(), "a b".into())]
    );
    let deep = SubjectTemplate::parse("acme.{site}.{device}.{sensor}").unwrap();
    let d = decode(
        &deep,
        "acme.munich.cnc-1.motor.current",
        b"3.5",
        RECEIVED,
        &Limits::default(),
    );
    assert_eq!(d.readings[0].sensor, "motor.current");
    assert_eq!(&d.readings[0].tags[..], [("site".into(), "munich".into())]);
}

#[test]
fn bad_payloads_are_rejected_with_a_reason() {
    let cases: &[(&str, &str, &str)] = &[
        ("vehicle.4613.speed", "fast", "not_a_number"),
        ("vehicle.4613.speed", "87,25", "not_a_number"),
        ("vehicle.4613.speed", "NaN", "non_finite"),
        ("vehicle.4613.speed", "inf", "non_finite"),
        ("vehicle.4613.speed", "-infinity", "non_finite"),
        ("vehicle.4613.speed", "", "encoding"),
        ("vehicle.4613.speed", "   ", "encoding"),
        ("vehicle.4613.speed", r#"{"value":"95"}"#, "json"),
        ("vehicle.4613.speed", r#"{"value":null}"#, "json"),
        ("vehicle.4613.speed", r#"{"unit":"km/h"}"#, "json"),
        ("vehicle.4613.speed", r#"{"value":1e999}"#, "json"),
        ("vehicle.4613.speed", r#"{"value":1,"unit":5}"#, "json"),
        ("vehicle.4613.speed", r#"{"value":1"#, "json"),
        (
            "vehicle.4613.speed",
            r#"{"value":1,"timestamp":"soon"}"#,
            "timestamp",
        ),
        (
            "vehicle.4613.speed",
            r#"{"value":1,"timestamp":"2099-01-01T00:00:00Z"}"#,
            "timestamp",
        ),
        (
            "vehicle.4613.speed",
            r#"{"value":1,"timestamp":0}"#,
            "timestamp",
        ),
        (
            "vehicle.4613.speed",
            r#"{"value":1,"timestamp":true}"#,
            "json",
        ),
        ("vehicle.4613", "95", "subject"),
        ("vehicle.46$13.speed", "95", "subject"),
        ("vehicle.4613.lp", "engine speed=fast", "line_protocol"),
        ("vehicle.4613.lp", "engine speed=\"fast\"", "line_protocol"),
        (
            "vehicle.4613.lp",
            "engine speed=1 4102444800000000000",
            "timestamp",
        ),
        ("vehicle.4613.lp", "engine speed=1 12x", "timestamp"),
        ("vehicle.4613.lp", "en@gine speed=1", "line_protocol"),
        ("vehicle.4613.lp", "engine,tag speed=1", "line_protocol"),
    ];
    for (subject, payload, code) in cases {
        let d = run(subject, payload);
        assert_eq!(summary(&d), (vec![], vec![*code]), "{payload:?}");
        assert!(!d.rejects[0].message.is_empty());
    }
}

#[test]
fn oversize_and_non_utf8() {
    let limits = Limits {
        max_payload_bytes: 8,
        ..Limits::default()
    };
    let t = SubjectTemplate::default();
    let d = decode(&t, "vehicle.1.speed", b"123456789", RECEIVED, &limits);
    assert_eq!(summary(&d).1, vec!["oversize"]);
    let d = decode(&t, "vehicle.1.speed", &[0xff, 0xfe], RECEIVED, &limits);
    assert_eq!(summary(&d).1, vec!["encoding"]);
}

#[test]
fn a_bad_line_does_not_spoil_the_batch() {
    let d = run("vehicle.1.lp", "a x=1\nb x=oops\nc x=3,y=\"s\"\nd x=4");
    assert_eq!(
        summary(&d),
        (
            vec![
                ("a.x".into(), 1.0, RECEIVED.0),
                ("d.x".into(), 4.0, RECEIVED.0)
            ],
            vec!["line_protocol", "line_protocol"]
        )
    );
    assert!(d.rejects[0].message.starts_with("line 2:"));
}

#[test]
fn encoders_round_trip() {
    let t = SubjectTemplate::default();
    for v in [95.0, 87.25, -0.001, 1e-9] {
        let d = decode(
            &t,
            "vehicle.1.s",
            encode_plain(v).as_bytes(),
            RECEIVED,
            &Limits::default(),
        );
        assert_eq!(d.readings[0].value, v);
    }
    let json = encode_json(2.5, Some("mm/s"), Some(RECEIVED), Some("good"));
    let d = decode(
        &t,
        "vehicle.1.s",
        json.as_bytes(),
        RECEIVED,
        &Limits::default(),
    );
    assert_eq!((d.readings[0].value, d.readings[0].ts), (2.5, RECEIVED));
    let mut lp = String::new();
    encode_line_protocol(
        &mut lp,
        "gps",
        &[("lat", 48.1), ("lon", 11.5)],
        Some(RECEIVED),
    );
    encode_line_protocol(&mut lp, "speed", &[("value", 30.0)], None);
    let d = decode(
        &t,
        "vehicle.1.lp",
        lp.as_bytes(),
        RECEIVED,
        &Limits::default(),
    );
    assert_eq!(
        summary(&d).0,
        vec![
            ("gps.lat".into(), 48.1, RECEIVED.0),
            ("gps.lon".into(), 11.5, RECEIVED.0),
            ("speed".into(), 30.0, RECEIVED.0)
        ]
    );
}

#[test]
fn arbitrary_bytes_never_panic() {
    let t = SubjectTemplate::default();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let alphabet = b"0123456789.,= {}\"\\\nabcxyzei-+:TZ#";
    for _ in 0..20_000 {
        let len = (seed % 40) as usize;
        let mut p = Vec::with_capacity(len);
        for _ in 0..len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            p.push(alphabet[(seed % alphabet.len() as u64) as usize]);
        }
        let d = decode(&t, "vehicle.1.s", &p, RECEIVED, &Limits::default());
        assert!(d.readings.iter().all(|r| r.value.is_finite()));
    }
}

mod generated;

fn run_with(template: &str, subject: &str, payload: &str, limits: &Limits) -> Decoded {
    let template = SubjectTemplate::parse(template).unwrap();
    decode(&template, subject, payload.as_bytes(), RECEIVED, limits)
}

/// The Telegraf case: one flush of a host's cpu and mem inputs in one message, readings
/// told apart by sensor and tags, with and without one shared timestamp.
#[test]
#[allow(clippy::type_complexity)] // a table of cases reads best inline
fn telegraf_flush_is_nine_distinct_points() {
    let mut lines = String::new();
    for cpu in 0..4 {
        lines.push_str(&format!(
            "cpu,cpu=cpu{cpu},host=h1 usage_idle=90.5,usage_user=0.25{{ts}}\n"
        ));
    }
    lines.push_str("mem,host=h1 used_percent=42.5{ts}\n");
    let r = RECEIVED.as_micros();
    let cases: &[(&str, i64)] = &[("", r), (" 1771149599000000000", r - 1_000_000)];
    for &(ts, want_ts) in cases {
        let d = run("vehicle.h1.telegraf", &lines.replace("{ts}", ts));
        let got: Vec<(&str, Vec<(&str, &str)>, f64, i64)> = d
            .readings
            .iter()
            .map(|r| {
                let tags = r.tags.iter().map(|(k, v)| (k.as_str(), v.as_str()));
                (r.sensor.as_str(), tags.collect(), r.value, r.ts.as_micros())
            })
            .collect();
        let mut want = Vec::new();
        for cpu in ["cpu0", "cpu1", "cpu2", "cpu3"] {
            let tags = vec![("cpu", cpu), ("host", "h1")];
            want.push(("cpu.usage_idle", tags.clone(), 90.5, want_ts));
            want.push(("cpu.usage_user", tags, 0.25, want_ts));
        }
        want.push(("mem.used_percent", vec![("host", "h1")], 42.5, want_ts));
        assert_eq!(got, want, "timestamp {ts:?}");
        assert_eq!(d.rejects, vec![], "timestamp {ts:?}");
        let points: std::collections::HashSet<_> = d
            .readings
            .iter()
            .map(|r| (&r.sensor, &r.tags[..], r.ts))
            .collect();
        assert_eq!(points.len(), 9);
        // The two readings of a line share one tag list.
        assert!(std::sync::Arc::ptr_eq(
            &d.readings[0].tags,
            &d.readings[1].tags
        ));
    }
}

/// The line of the hardening issue: 230 KB, 14,000 tags and 14,000 fields. Refused at once
/// by the tag count, before anything is built; and without its tags, by the readings limit.
#[test]
fn the_huge_line_is_refused_quickly_and_cheaply() {
    let mut tags = String::new();
    let mut fields = String::new();
    for i in 0..14_000 {
        tags.push_str(&format!(",t{i}=v"));
        fields.push_str(&format!("{}f{i}=1", if i == 0 { "" } else { "," }));
    }
    let with_tags = format!("m{tags} {fields}");
    let without_tags = format!("m {fields}");
    assert!(with_tags.len() > 200_000, "{}", with_tags.len());
    for (payload, says) in [(&with_tags, "tags"), (&without_tags, "10000 readings")] {
        let started = std::time::Instant::now();
        let d = run("vehicle.1.lp", payload);
        let took = started.elapsed();
        assert_eq!(summary(&d), (vec![], vec!["limit"]), "{}", d.rejects[0]);
        assert!(d.rejects[0].message.contains(says), "{}", d.rejects[0]);
        assert!(took < std::time::Duration::from_secs(1), "took {took:?}");
        assert!(d.decoded_bytes() < 1_000, "{}", d.decoded_bytes());
    }
}

#[test]
fn the_readings_limit_refuses_the_rest_of_the_message_once() {
    let limits = Limits {
        max_readings: 5,
        ..Limits::default()
    };
    let payload = "a x=1,y=2\nb x=1,y=2\n# comment\nc x=1,y=2\nd x=1\n\ne x=1";
    let d = run_with(
        "vehicle.{device}.{sensor}",
        "vehicle.1.lp",
        payload,
        &limits,
    );
    let (readings, codes) = summary(&d);
    let sensors: Vec<&str> = readings.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(sensors, ["a.x", "a.y", "b.x", "b.y"]);
    assert_eq!(codes, ["limit"]);
    assert_eq!(
        d.rejects[0].message,
        "line 4: over the limit of 5 readings per message; 3 lines from this one on were not \
         decoded"
    );

    // The limit is per message, also when a batch appends to one buffer.
    let t = SubjectTemplate::default();
    let mut out = Decoded::default();
    for _ in 0..3 {
        decode_into(
            &t,
            "vehicle.1.lp",
            b"a x=1,y=2,z=3",
            RECEIVED,
            &limits,
            &mut out,
        );
    }
    assert_eq!((out.readings.len(), out.rejects.len()), (9, 0));
}

#[test]
fn rejects_are_bounded_per_message() {
    let payload: String = (0..1_000).map(|i| format!("m{i} x=oops\n")).collect();
    let d = run("vehicle.1.lp", &payload);
    assert_eq!(d.rejects.len(), MAX_REJECTS + 1);
    assert!(d.rejects[..MAX_REJECTS]
        .iter()
        .all(|r| r.code == RejectCode::LineProtocol));
    assert_eq!(
        d.rejects[MAX_REJECTS].to_string(),
        "line_protocol: and 900 more problems not listed (at most 100 are; codes: \
         line_protocol)"
    );
    // Messages quoting long input are cut.
    let long = format!(r#"{{"value":"{}"}}"#, "9".repeat(10_000));
    let d = run("vehicle.1.speed", &long);
    assert_eq!(summary(&d).1, ["json"]);
    let message = &d.rejects[0].message;
    assert!(message.len() <= crate::MAX_REJECT_MESSAGE && message.ends_with('…'));
}

/// Limits on tags, control characters, and tags named twice: the line is refused alone.
#[test]
fn bad_tags_refuse_their_line_alone() {
    let limits = Limits {
        max_tags: 3,
        max_tag_bytes: 8,
        ..Limits::default()
    };
    let deep = "acme.{site}.{device}.{sensor}";
    let cases: &[(&str, &str, &str)] = &[
        // (line, code, part of the message)
        ("m,a=1,b=2,c=3 x=1", "limit", "more than 2 tags"),
        (
            "m,a=123456789 x=1",
            "limit",
            "tag value \"123456789\" is 9 bytes",
        ),
        ("m,abcdefghi=1 x=1", "limit", "tag key"),
        ("m,a=1\\,2345678 x=1", "limit", "is 9 bytes"),
        (
            "m,a=x\u{0}y x=1",
            "line_protocol",
            "control character U+0000",
        ),
        ("m,a\tb=1 x=1", "line_protocol", "control character U+0009"),
        (
            "m,a=\u{7f} x=1",
            "line_protocol",
            "control character U+007F",
        ),
        ("m,a=1,a=2 x=1", "line_protocol", "tag \"a\" is given twice"),
        (
            "m,site=b x=1",
            "line_protocol",
            "also a tag of the subject template",
        ),
    ];
    for (line, code, says) in cases {
        let payload = format!("ok x=1\n{line}\nok y=2");
        let d = run_with(deep, "acme.munich.cnc-1.lp", &payload, &limits);
        let (readings, codes) = summary(&d);
        assert_eq!(readings.len(), 2, "{line:?}: {:?}", d.rejects);
        assert_eq!(codes, [*code], "{line:?}: {:?}", d.rejects);
        assert!(
            d.rejects[0].message.contains(says),
            "{line:?}: {}",
            d.rejects[0]
        );
        assert!(
            d.rejects[0].message.starts_with("line 2: "),
            "{}",
            d.rejects[0]
        );
    }
    // Escapes are undone before the length is checked, and the tags sorted.
    let d = run_with(
        deep,
        "acme.munich.cnc-1.lp",
        "m,b=1\\,234567,a=x x=1",
        &limits,
    );
    assert_eq!(d.rejects, vec![]);
    let tags: Vec<(&str, &str)> = d.readings[0]
        .tags
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(tags, [("a", "x"), ("b", "1,234567"), ("site", "munich")]);
}

#[test]
fn subject_tags_obey_the_tag_rules() {
    let limits = Limits {
        max_tags: 1,
        max_tag_bytes: 8,
        ..Limits::default()
    };
    let cases: &[(&str, &str, &str)] = &[
        (
            "acme.{site}.{device}.{sensor}",
            "acme.123456789.m1.t",
            "limit",
        ),
        (
            "acme.{site}.{device}.{sensor}",
            "acme.a\u{1}b.m1.t",
            "subject",
        ),
        ("{org}.{site}.{device}.{sensor}", "acme.s.m1.t", "limit"),
    ];
    for (template, subject, code) in cases {
        let d = run_with(template, subject, "1", &limits);
        assert_eq!(summary(&d), (vec![], vec![*code]), "{subject:?}");
    }
}

#[test]
fn json_labels_hold_no_control_characters() {
    for payload in [
        r#"{"value":1,"unit":"km\u0000h"}"#,
        r#"{"value":1,"quality":"good\n"}"#,
        r#"{"value":1,"unit":"\u007f"}"#,
        "{\"value\":1,\"unit\":\"a\u{1f}\"}",
    ] {
        let d = run("vehicle.1.speed", payload);
        assert_eq!(summary(&d), (vec![], vec!["json"]), "{payload}");
        assert!(
            d.rejects[0].message.contains("control character"),
            "{}",
            d.rejects[0]
        );
    }
    // Other characters, escaped or not, are kept.
    let d = run(
        "vehicle.1.speed",
        r#"{"value":1,"unit":"\u00b0C","quality":"ok ✓"}"#,
    );
    assert_eq!(d.readings[0].unit.as_deref(), Some("°C"));
    assert_eq!(d.readings[0].quality.as_deref(), Some("ok ✓"));
}

/// Readings of one message with one sensor, tags and timestamp: the later one is kept, the
/// earlier one dropped with a reject naming both lines.
#[test]
#[allow(clippy::type_complexity)] // a table of cases reads best inline
fn repeated_points_keep_the_later_value() {
    let r = RECEIVED.as_micros();
    let ts = " 1771149599000000000";
    let out_of_order = "a x=1 1771149599000000000\na x=2 1771149598000000000\na x=3 1771149599";
    let many: String = (0..40).map(|i| format!("m f{}=1\n", i % 20)).collect();
    let cases: &[(&str, &[(&str, f64, i64)], &[&str])] = &[
        (
            "a x=1\na x=2",
            &[("a.x", 2.0, r)],
            &[
                "line 2 repeats the point of line 1 (same measurement, tags, field and \
               timestamp: sensor a.x); the later value is kept",
            ],
        ),
        (
            "a x=1,y=1,x=2",
            &[("a.y", 1.0, r), ("a.x", 2.0, r)],
            &[
                "line 1 gives sensor a.x twice (same field, tags and timestamp); the later \
               value is kept",
            ],
        ),
        // Tags in another order are the same tags; another timestamp is another point.
        (
            &format!("a,h=1,c=2 x=1{ts}\na,c=2,h=1 x=2{ts}\na,c=2,h=1 x=3"),
            &[("a.x", 2.0, r - 1_000_000), ("a.x", 3.0, r)],
            &["line 2 repeats the point of line 1"],
        ),
        (
            "a value=1\na,h=1 value=2\na value=3\na x=4",
            &[("a", 2.0, r), ("a", 3.0, r), ("a.x", 4.0, r)],
            &["line 3 repeats the point of line 1"],
        ),
        (
            out_of_order,
            &[("a.x", 2.0, r - 2_000_000), ("a.x", 3.0, r - 1_000_000)],
            &["line 3 repeats the point of line 1"],
        ),
        (
            "a x=1\na x=2\na x=3",
            &[("a.x", 3.0, r)],
            &[
                "line 2 repeats the point of line 1",
                "line 3 repeats the point of line 2",
            ],
        ),
    ];
    for (payload, want, says) in cases {
        let d = run("vehicle.1.lp", payload);
        let want: Vec<_> = want
            .iter()
            .map(|(s, v, t)| (s.to_string(), *v, *t))
            .collect();
        assert_eq!(summary(&d).0, want, "{payload}");
        assert_eq!(d.rejects.len(), says.len(), "{payload}: {:?}", d.rejects);
        for (reject, says) in d.rejects.iter().zip(*says) {
            assert_eq!(reject.code, RejectCode::LineProtocol);
            assert!(reject.message.contains(says), "{payload}: {reject}");
        }
    }
    // More readings of one timestamp than are compared pairwise: the same through a map.
    let d = run("vehicle.1.lp", &many);
    assert_eq!((d.readings.len(), d.rejects.len()), (20, 20));
    assert!(d.readings.iter().all(|r| r.value == 1.0));
    assert_eq!(
        d.rejects[0].message.split(" (").next(),
        Some("line 21 repeats the point of line 1")
    );
}

#[test]
fn decoded_bytes_counts_shared_tags_once() {
    let d = run("vehicle.4613.speed", "95");
    let reading = std::mem::size_of::<Reading>();
    assert_eq!(
        reading, 112,
        "the bound in `decoded_bytes`' docs assumes it"
    );
    // The reading, its device and sensor names (16 bytes of counts each), and an empty
    // tag list.
    assert_eq!(d.decoded_bytes(), reading + (16 + 4) + (16 + 5) + 16);
    let d = run("vehicle.4613.lp", "m,h=a x=1,y=2\nm,h=a z=3");
    let tags = 16 + 48 + 2;
    // One device name for the message; three sensors.
    assert_eq!(
        d.decoded_bytes(),
        3 * reading + (16 + 4) + 3 * (16 + 3) + tags
    );
}

#[test]
fn readings_of_one_message_share_their_names() {
    let d = run(
        "vehicle.4613.lp",
        "m x=1,value=2 1771149000\nm x=3,value=4 1771149001\nn x=5 1771149002",
    );
    let r = &d.readings;
    assert_eq!(r.len(), 5);
    let sensors: Vec<&str> = r.iter().map(|r| r.sensor.as_str()).collect();
    assert_eq!(sensors, ["m.x", "m", "m.x", "m", "n.x"]);
    assert!(r.iter().all(|x| x.device.as_ptr() == r[0].device.as_ptr()));
    assert_eq!(r[0].sensor.as_ptr(), r[2].sensor.as_ptr());
    assert_eq!(r[1].sensor.as_ptr(), r[3].sensor.as_ptr());
    assert_ne!(r[0].sensor.as_ptr(), r[4].sensor.as_ptr());
    // Past the names one message shares, each reading builds its own, still right.
    let fields: Vec<String> = (0..40).map(|i| format!("f{i}={i}")).collect();
    let line = format!("m {} 1771149000", fields.join(","));
    let d = run(
        "vehicle.4613.lp",
        &format!("{line}\n{}", line.replace("149000", "149001")),
    );
    assert_eq!(d.readings.len(), 80);
    for (i, r) in d.readings.iter().enumerate() {
        assert_eq!(r.sensor, format!("m.f{}", i % 40));
        assert_eq!(r.value, (i % 40) as f64);
    }
}

/// The worst cases of the bound in [`Decoded::decoded_bytes`]' docs: readings as dense as
/// fields can be, with the longest device and measurement, and as many short tagged lines.
#[test]
fn decoded_bytes_stay_within_the_documented_bound() {
    let no_readings_limit = Limits {
        max_readings: usize::MAX,
        max_payload_bytes: usize::MAX,
        ..Limits::default()
    };
    let long = "d".repeat(128);
    let subject = format!("vehicle.{long}.lp");
    let keys: Vec<char> = ('a'..='z').chain('A'..='Z').chain('0'..='9').collect();
    let mut dense = String::new();
    let mut tagged = String::new();
    let mut untagged_after_tagged = String::new();
    for line in 0..1_000 {
        dense.push_str(&long);
        for (i, k) in keys.iter().enumerate() {
            dense.push_str(&format!("{}{k}=1", if i == 0 { ' ' } else { ',' }));
        }
        dense.push_str(&format!(" {}\n", 1_771_149_000 + line));
        tagged.push_str(&format!("a,t={line} x=1\n"));
        untagged_after_tagged.push_str(&format!("a,t={line} x=1\nb{line} x=1\n"));
    }
    for payload in [&dense, &tagged, &untagged_after_tagged] {
        let d = decode(
            &SubjectTemplate::default(),
            &subject,
            payload.as_bytes(),
            RECEIVED,
            &no_readings_limit,
        );
        let ratio = d.decoded_bytes() as f64 / payload.len() as f64;
        assert!(d.rejects.len() <= MAX_REJECTS + 1, "{:?}", &d.rejects[..2]);
        assert!(ratio <= 97.0, "{ratio}");
    }
}

/// With a raw retention, a reading older than it when the broker received the message is
/// refused (it would be pruned at once); at the edge it is kept. The decision depends on the
/// message alone, so a redelivery decides the same.
#[test]
fn readings_older_than_the_retention_are_refused() {
    const DAY: i64 = 86_400_000_000;
    let limits = Limits {
        max_past_micros: 30 * DAY,
        ..Limits::default()
    };
    let template = SubjectTemplate::parse("vehicle.{device}.{sensor}").unwrap();
    let at = |ts: i64| {
        let t = Timestamp::from_micros(ts).to_rfc3339();
        decode(
            &template,
            "vehicle.v1.speed",
            format!(r#"{{"value":1,"timestamp":"{t}"}}"#).as_bytes(),
            RECEIVED,
            &limits,
        )
    };
    let edge = at(RECEIVED.as_micros() - 30 * DAY);
    assert_eq!((edge.readings.len(), edge.rejects.len()), (1, 0));
    let old = at(RECEIVED.as_micros() - 30 * DAY - 1);
    assert_eq!(old.readings.len(), 0);
    assert_eq!(old.rejects[0].code, RejectCode::Timestamp);
    assert!(
        old.rejects[0].message.contains("raw retention"),
        "{:?}",
        old.rejects
    );
}

#[test]
fn status_messages_are_neither_readings_nor_rejects() {
    for payload in ["{\"config_revision\":3,\"applied\":false}", "anything", ""] {
        let d = run("vehicle.d1._status", payload);
        assert!(d.readings.is_empty() && d.rejects.is_empty(), "{d:?}");
    }
    // Only the exact sensor name: `_status.x` and `x._status` are telemetry.
    assert_eq!(run("vehicle.d1._status.x", "1").readings.len(), 1);
    assert_eq!(run("vehicle.d1.x._status", "1").readings.len(), 1);
}
