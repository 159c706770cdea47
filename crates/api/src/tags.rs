//! Series told apart by their tags, as the API and the CLI name and pick them.
//!
//! A series is a device's sensor with one tag set: Telegraf's `cpu,cpu=cpu0,host=h1
//! usage_idle=…` … `cpu=cpu3` are four series of the sensor `cpu.usage_idle`. They are
//! named by a **label**, Prometheus style: the sensor name alone for the series without
//! tags (`speed`), `sensor{k=v,k2=v2}` otherwise, tags sorted by name, a `\`, `,`, `=`,
//! `{` or `}` in a tag name or value escaped with a `\` (`cpu.usage_idle{cpu=cpu0,host=h1}`).
//! [`label`] writes one and [`parse_label`] reads it back.
//!
//! **Picking a series** ([`pick`]): among a sensor's series, those whose tags include every
//! tag asked for; one whose tags are exactly those asked for wins over others that have
//! more (so the label of any series, or a plain sensor name for the series without tags,
//! always names that series); otherwise exactly one must match.

use std::collections::BTreeMap;

/// Longest tag name or value accepted in a filter, in bytes: the decoder refuses longer
/// ones ([`fleetpipe_proto::Limits::max_tag_bytes`]), so no stored series has one.
pub fn max_tag_bytes() -> usize {
    fleetpipe_proto::Limits::default().max_tag_bytes
}

/// Most tag sets an error message lists.
pub const LISTED_TAG_SETS: usize = 10;

pub use fleetpipe_pipeline::state::{label, tag_set, LABEL_ESCAPED as ESCAPED};

/// Why a tag name or value cannot be one of a stored series, or `None`: a name is 1 to
/// [`max_tag_bytes`] bytes, a value at most that, neither with control characters
/// (U+0000–U+001F, U+007F), as the decoder enforces.
pub fn check_tag(key: &str, value: &str) -> Option<String> {
    let max = max_tag_bytes();
    let problem = |what: &str, s: &str| -> Option<String> {
        if s.len() > max {
            Some(format!(
                "the tag {what} is {} bytes long, more than {max}",
                s.len()
            ))
        } else if s.chars().any(char::is_control) {
            Some(format!("the tag {what} holds a control character"))
        } else {
            None
        }
    };
    if key.is_empty() {
        return Some("the tag name is empty".into());
    }
    problem("name", key).or_else(|| problem("value", value))
}

/// Splits `s` into a sensor name and the tags of its label (`cpu{cpu=cpu0}` → `cpu`,
/// `[("cpu","cpu0")]`); a name without `{` has no tags (`None`), `name{}` has an empty
/// set (`Some([])`). The name is not checked here; the tags are ([`check_tag`]).
#[allow(clippy::type_complexity)]
pub fn parse_label(s: &str) -> Result<(&str, Option<Vec<(String, String)>>), String> {
    let Some(open) = s.find('{') else {
        return Ok((s, None));
    };
    let (name, rest) = (&s[..open], &s[open + 1..]);
    let form = "a label is SENSOR{NAME=VALUE,…} (cpu.usage_idle{cpu=cpu0,host=h1}), with \
                '\\', ',', '=', '{' and '}' in names and values escaped by a '\\'";
    let mut tags = Vec::new();
    let (mut key, mut cur) = (None::<String>, String::new());
    let mut chars = rest.chars();
    let mut closed = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e) => cur.push(e),
                None => return Err(format!("it ends with a lone '\\'; {form}")),
            },
            '=' if key.is_none() => key = Some(std::mem::take(&mut cur)),
            ',' | '}' => {
                match key.take() {
                    Some(k) => tags.push((k, std::mem::take(&mut cur))),
                    // `name{}`: no tags at all.
                    None if c == '}' && cur.is_empty() && tags.is_empty() => {}
                    None => {
                        return Err(format!("{:?} is not NAME=VALUE; {form}", cur));
                    }
                }
                if c == '}' {
                    closed = true;
                    break;
                }
            }
            '=' | '{' => return Err(format!("an unescaped {c:?} in a tag; {form}")),
            c => cur.push(c),
        }
    }
    if !closed {
        return Err(format!("its tags do not end with '}}'; {form}"));
    }
    if !chars.as_str().is_empty() {
        return Err(format!("something follows the closing '}}'; {form}"));
    }
    for (k, v) in &tags {
        if let Some(problem) = check_tag(k, v) {
            return Err(problem);
        }
    }
    Ok((name, Some(tags)))
}

/// What [`pick`] found.
#[derive(Debug, PartialEq)]
pub enum Pick<T> {
    /// The one series asked for.
    One(T),
    /// No series has every tag asked for.
    None,
    /// Several do, and none has exactly those tags: they are listed.
    Several(Vec<T>),
}

/// Picks the series asked for by `wanted` tags among `candidates` (one sensor's series);
/// see the module docs.
pub fn pick<'a, T>(
    candidates: &'a [T],
    tags_of: impl Fn(&T) -> &[(String, String)],
    wanted: &[(String, String)],
) -> Pick<&'a T> {
    // The same name twice with two values: nothing has both.
    let mut want: BTreeMap<&str, &str> = BTreeMap::new();
    for (k, v) in wanted {
        if want.insert(k, v).is_some_and(|old| old != v) {
            return Pick::None;
        }
    }
    let has =
        |tags: &[(String, String)], k: &str, v: &str| tags.iter().any(|(a, b)| a == k && b == v);
    let matches: Vec<&T> = candidates
        .iter()
        .filter(|c| want.iter().all(|(k, v)| has(tags_of(c), k, v)))
        .collect();
    // Tags have one value per name, so having every tag wanted and no more is equality.
    if let Some(exact) = matches.iter().find(|c| tags_of(c).len() == want.len()) {
        return Pick::One(exact);
    }
    match matches.len() {
        0 => Pick::None,
        1 => Pick::One(matches[0]),
        _ => Pick::Several(matches),
    }
}

/// Longest tag set [`list_tag_sets`] writes, in characters; a longer one is cut, `…`.
const LISTED_SET_CHARS: usize = 200;

/// Up to [`LISTED_TAG_SETS`] tag sets, `{k=v,…}`, joined by `, `, then how many more.
pub fn list_tag_sets<'a>(sets: impl ExactSizeIterator<Item = &'a [(String, String)]>) -> String {
    let total = sets.len();
    let mut parts: Vec<String> = sets
        .take(LISTED_TAG_SETS)
        .map(|t| {
            let set = tag_set(t.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            match set.char_indices().nth(LISTED_SET_CHARS) {
                Some((cut, _)) => format!("{}…", &set[..cut]),
                None => set,
            }
        })
        .collect();
    if total > LISTED_TAG_SETS {
        parts.push(format!("and {} more", total - LISTED_TAG_SETS));
    }
    parts.join(", ")
}

/// A tag that tells the first of `sets` from at least one other: the first of its tags,
/// by name, that some other set lacks or has with another value.
pub fn telling_tag(sets: &[&[(String, String)]]) -> Option<(String, String)> {
    let (first, others) = sets.split_first()?;
    first
        .iter()
        .find(|(k, v)| {
            others
                .iter()
                .any(|o| !o.iter().any(|(a, b)| a == k && b == v))
        })
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pairs(tags: &[(String, String)]) -> impl Iterator<Item = (&str, &str)> {
        tags.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    #[test]
    fn labels_round_trip() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            ("speed", &[], "speed"),
            (
                "cpu.usage_idle",
                &[("cpu", "cpu0"), ("host", "h1")],
                "cpu.usage_idle{cpu=cpu0,host=h1}",
            ),
            (
                "m",
                &[("a,b", "x=y"), ("c", "{}\\")],
                r"m{a\,b=x\=y,c=\{\}\\}",
            ),
            ("m", &[("k", "")], "m{k=}"),
            ("m", &[("path", "/a b/ü:1")], "m{path=/a b/ü:1}"),
        ];
        for (sensor, tags, want) in cases {
            let tags = t(tags);
            let got = label(sensor, pairs(&tags));
            assert_eq!(&got, want);
            let (name, parsed) = parse_label(&got).unwrap();
            assert_eq!(name, *sensor);
            assert_eq!(parsed.unwrap_or_default(), tags, "{got}");
        }
        assert_eq!(parse_label("m{}").unwrap(), ("m", Some(vec![])));
        assert_eq!(parse_label("speed").unwrap(), ("speed", None));
    }

    #[test]
    fn bad_labels() {
        for (bad, needle) in [
            ("m{", "do not end with '}'"),
            ("m{a=b", "do not end with '}'"),
            ("m{a=b}x", "follows the closing"),
            ("m{a}", "\"a\" is not NAME=VALUE"),
            ("m{a=b,}", "\"\" is not NAME=VALUE"),
            ("m{,}", "is not NAME=VALUE"),
            ("m{a=b=c}", "unescaped '='"),
            ("m{a{=b}", "unescaped '{'"),
            ("m{a=b\\", "lone '\\'"),
            ("m{=b}", "the tag name is empty"),
            ("m{a=\u{1}}", "control character"),
        ] {
            let err = parse_label(bad).unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
        let long = format!("m{{a={}}}", "x".repeat(max_tag_bytes() + 1));
        assert!(parse_label(&long).unwrap_err().contains("bytes long"));
    }

    #[test]
    fn picking() {
        let cpu = |c: &str| t(&[("cpu", c), ("host", "h1")]);
        let four: Vec<Vec<(String, String)>> = (0..4).map(|i| cpu(&format!("cpu{i}"))).collect();
        fn of(v: &Vec<(String, String)>) -> &[(String, String)] {
            v
        }
        assert_eq!(pick(&four, of, &t(&[("cpu", "cpu2")])), Pick::One(&four[2]));
        assert_eq!(pick(&four, of, &cpu("cpu3")), Pick::One(&four[3]));
        assert_eq!(pick(&four, of, &t(&[("cpu", "cpu9")])), Pick::None);
        assert_eq!(
            pick(&four, of, &t(&[("cpu", "cpu0"), ("cpu", "cpu1")])),
            Pick::None
        );
        match pick(&four, of, &[]) {
            Pick::Several(all) => assert_eq!(all.len(), 4),
            other => panic!("{other:?}"),
        }
        match pick(&four, of, &t(&[("host", "h1")])) {
            Pick::Several(all) => assert_eq!(all.len(), 4),
            other => panic!("{other:?}"),
        }
        // One series: no tags needed. An exact tag set wins over wider ones.
        assert_eq!(pick(&four[..1], of, &[]), Pick::One(&four[0]));
        let mixed = vec![t(&[]), t(&[("site", "a")]), t(&[("site", "a"), ("x", "1")])];
        assert_eq!(pick(&mixed, of, &[]), Pick::One(&mixed[0]));
        assert_eq!(pick(&mixed, of, &t(&[("site", "a")])), Pick::One(&mixed[1]));
        assert_eq!(pick(&mixed, of, &t(&[("x", "1")])), Pick::One(&mixed[2]));
    }

    #[test]
    fn listing_and_hints() {
        let sets: Vec<Vec<(String, String)>> = (0..12)
            .map(|i| t(&[("cpu", &format!("cpu{i}")), ("host", "h1")]))
            .collect();
        let refs: Vec<&[(String, String)]> = sets.iter().map(|s| &s[..]).collect();
        let listed = list_tag_sets(refs.iter().copied());
        assert!(
            listed.starts_with("{cpu=cpu0,host=h1}, {cpu=cpu1,host=h1}"),
            "{listed}"
        );
        assert!(
            listed.ends_with("{cpu=cpu9,host=h1}, and 2 more"),
            "{listed}"
        );
        assert_eq!(
            telling_tag(&refs),
            Some(("cpu".to_string(), "cpu0".to_string()))
        );
        let nested = [t(&[("a", "1")]), t(&[("a", "1"), ("b", "2")])];
        let refs: Vec<&[(String, String)]> = nested.iter().map(|s| &s[..]).collect();
        assert_eq!(telling_tag(&refs), None);
    }

    #[test]
    fn tag_checks() {
        assert_eq!(check_tag("cpu", "cpu0"), None);
        assert_eq!(check_tag("cpu", ""), None);
        assert!(check_tag("", "x").unwrap().contains("name is empty"));
        assert!(check_tag("a\u{7f}", "x")
            .unwrap()
            .contains("name holds a control"));
        assert!(check_tag("a", "x\ny")
            .unwrap()
            .contains("value holds a control"));
        let long = "x".repeat(max_tag_bytes() + 1);
        assert!(check_tag("a", &long)
            .unwrap()
            .contains("value is 257 bytes long"));
    }
}
