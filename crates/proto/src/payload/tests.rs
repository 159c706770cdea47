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
            .map(|r| (r.sensor.clone(), r.value, r.ts.as_micros()))
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
