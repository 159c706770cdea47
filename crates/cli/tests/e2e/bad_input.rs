//! Every kind of bad input lands in the dead-letter stream with its reason, and the good
//! readings around it are stored.

use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_dead_lettered_with_its_reason() {
    let env = Env::sqlite();
    env.run(&["init"]);
    let js = env.js().await;
    let far_future = "2099-01-01T00:00:00Z";
    // (subject, payload, expected reason code); None for good input.
    let cases: Vec<(&str, String, Option<&str>)> = vec![
        ("vehicle.g1.speed", "95".into(), None),
        ("vehicle.b1.speed", "fast".into(), Some("not_a_number")),
        ("vehicle.g1.speed", "87.25".into(), None),
        ("vehicle.b2.speed", "NaN".into(), Some("non_finite")),
        ("vehicle.b3.speed", "inf".into(), Some("non_finite")),
        ("vehicle.b4.speed", r#"{"value":"95"}"#.into(), Some("json")),
        (
            "vehicle.b5.speed",
            r#"{"value":1,"unit":7}"#.into(),
            Some("json"),
        ),
        ("vehicle.b6.speed", r#"{"value":1"#.into(), Some("json")),
        ("vehicle.b7", "95".into(), Some("subject")),
        ("vehicle.b8.a.b.c.d.e.f.g.h.i", "95".into(), Some("subject")),
        ("vehicle.b9.speed", "x".repeat(5000), Some("oversize")),
        (
            "vehicle.b10.lp",
            "engine rpm=fast".into(),
            Some("line_protocol"),
        ),
        (
            "vehicle.b11.speed",
            format!(r#"{{"value":1,"timestamp":"{far_future}"}}"#),
            Some("timestamp"),
        ),
        ("vehicle.b12.speed", "".into(), Some("encoding")),
        // A batch with one bad line: the good lines are stored, the message dead-lettered.
        (
            "vehicle.g2.lp",
            "engine rpm=1\nengine temp=oops\nsoc value=80".into(),
            Some("line_protocol"),
        ),
        (
            "vehicle.g1.soc",
            r#"{"value":55.5,"unit":"%"}"#.into(),
            None,
        ),
    ];
    let msgs: Vec<(String, String)> = cases
        .iter()
        .map(|(s, p, _)| (s.to_string(), p.clone()))
        .collect();
    publish_all(&js, &msgs).await;
    let _collector = env.spawn(&["collect"]);

    let store = env.store().await;
    // 95, 87.25, 55.5, and the two good lines of the mixed batch.
    assert_eq!(wait_for_count(&*store, 5, Duration::from_secs(30)).await, 5);
    let good = stored_values(
        &*store,
        [
            ("g1".to_string(), "speed".to_string()),
            ("g1".to_string(), "soc".to_string()),
            ("g2".to_string(), "engine.rpm".to_string()),
            ("g2".to_string(), "soc".to_string()),
        ],
    )
    .await;
    assert_eq!(good[&("g1".into(), "speed".into())], vec![95.0, 87.25]);
    assert_eq!(good[&("g1".into(), "soc".into())], vec![55.5]);
    assert_eq!(good[&("g2".into(), "engine.rpm".into())], vec![1.0]);
    assert_eq!(good[&("g2".into(), "soc".into())], vec![80.0]);

    let expected: Vec<(&str, &str)> = cases
        .iter()
        .filter_map(|(s, _, code)| code.map(|c| (*s, c)))
        .collect();
    let mut letters = Vec::new();
    for _ in 0..100 {
        let out = env.run(&["dead-letters", "--json", "--limit", "100"]);
        letters = serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap();
        if letters.len() >= expected.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut got: Vec<(String, String)> = letters
        .iter()
        .map(|l| {
            (
                l["subject"].as_str().unwrap().to_string(),
                l["codes"][0].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut want: Vec<(String, String)> = expected
        .iter()
        .map(|(s, c)| (s.to_string(), c.to_string()))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    for l in &letters {
        assert!(!l["reason"].as_str().unwrap().is_empty(), "{l}");
    }
    let oversize = letters
        .iter()
        .find(|l| l["codes"][0] == "oversize")
        .unwrap();
    assert_eq!(
        oversize["payload"].as_str().unwrap().len(),
        5000,
        "payload kept whole"
    );
    let future = letters
        .iter()
        .find(|l| l["codes"][0] == "timestamp")
        .unwrap();
    assert!(future["reason"].as_str().unwrap().contains("2099"));
}
