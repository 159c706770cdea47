use std::os::unix::fs::PermissionsExt as _;

use super::*;

fn template() -> SubjectTemplate {
    SubjectTemplate::parse(fleetpipe_proto::subject::DEFAULT_TEMPLATE).unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_second_init_keeps_every_key() {
    let tmp = tempfile::tempdir().unwrap();
    let config = Config::default();
    let a = Secure::init(tmp.path(), &config, &[]).unwrap();
    let files: Vec<PathBuf> = [
        "operator.nk",
        "system-account.nk",
        "account.nk",
        "account-signing.nk",
    ]
    .iter()
    .map(|n| tmp.path().join("security").join(n))
    .chain(Service::ALL.iter().map(|s| a.creds_path(*s)))
    .chain([a.tls.ca_key.clone(), a.tls.server_key.clone()])
    .collect();
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let account_jwt = a.account_jwt().unwrap();
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    assert_eq!(mode(&tmp.path().join("security")), 0o700);
    assert_eq!(mode(&tmp.path().join("security/creds")), 0o700);
    assert_eq!(mode(&tmp.path().join("tls")), 0o700);

    let b = Secure::init(tmp.path(), &config, &[]).unwrap();
    let after: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(
        before == after,
        "a second init changed a key or a credential"
    );
    assert_eq!(b.account_jwt().unwrap(), account_jwt);
    assert_eq!(a.account_public_key(), b.account_public_key());
    let opened = Secure::open(tmp.path()).unwrap();
    assert_eq!(opened.account_public_key(), a.account_public_key());
    // Debug shows public keys only.
    let shown = format!("{opened:?}");
    for seed in &before[..4] {
        assert!(
            !shown.contains(std::str::from_utf8(seed).unwrap().trim()),
            "{shown}"
        );
    }

    // Another stream name changes the collector's permissions: same key, new JWT.
    let mut other = config.clone();
    other.stream.name = "OTHER".into();
    let collector = a.creds_path(Service::Collector);
    let (old_jwt, old_seed) =
        jwt::parse_creds(&std::fs::read_to_string(&collector).unwrap()).unwrap();
    Secure::init(tmp.path(), &other, &[]).unwrap();
    let (new_jwt, new_seed) =
        jwt::parse_creds(&std::fs::read_to_string(&collector).unwrap()).unwrap();
    assert_eq!(old_seed, new_seed);
    assert_ne!(old_jwt, new_jwt);
    let claims: Claims<UserNats> = jwt::decode(&new_jwt).unwrap();
    assert!(claims
        .nats
        .publish
        .allow
        .iter()
        .any(|s| s.contains("OTHER")));
    assert_eq!(claims.iss, a.signing.public_key());
    assert_eq!(claims.nats.issuer_account, a.account_public_key());
}

#[test]
fn open_without_material_says_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let err = Secure::open(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("fleetpipe up --secure"), "{err}");
}

#[test]
fn devices_are_issued_refused_reissued_and_revoked() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Secure::init(tmp.path(), &Config::default(), &[]).unwrap();
    let t = template();
    let issued = s
        .issue_devices(&t, &["d1".into(), "d2".into()], false)
        .unwrap();
    let (token, seed) = jwt::parse_creds(&issued[0].creds).unwrap();
    let claims: Claims<UserNats> = jwt::decode(&token).unwrap();
    assert_eq!(claims.sub, issued[0].public_key);
    assert_eq!(
        KeyPair::from_seed(&seed).unwrap().public_key(),
        issued[0].public_key
    );
    assert_eq!(claims.iss, s.signing.public_key());
    assert_eq!(claims.nats.publish.allow[0], "vehicle.d1.>");
    assert!(!format!("{:?}", issued[0]).contains(&seed));

    for bad in ["", "a.b", "a*", ">", "a b", "é", &"x".repeat(129)] {
        assert!(
            s.issue_devices(&t, &[bad.to_string()], false).is_err(),
            "{bad:?}"
        );
    }
    let err = s
        .issue_devices(&t, &["d1".into()], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--force"), "{err}");
    assert!(s
        .issue_devices(&t, &["d3".into(), "d3".into()], false)
        .is_err());

    let again = s.issue_devices(&t, &["d1".into()], true).unwrap();
    assert_eq!(
        again[0].replaced.as_deref(),
        Some(issued[0].public_key.as_str())
    );
    assert!(s.revocations().unwrap().contains_key(&issued[0].public_key));

    let before = s.account_jwt().unwrap();
    let revoked = s.revoke_device("d2").unwrap();
    assert!(revoked.revoked.is_some());
    let after = s.account_jwt().unwrap();
    let (b, a): (Claims<AccountNats>, Claims<AccountNats>) =
        (jwt::decode(&before).unwrap(), jwt::decode(&after).unwrap());
    assert!(a.iat > b.iat, "each account JWT is newer than the last");
    assert_ne!(a.jti, b.jti);
    assert_eq!(a.iss, s.operator.public_key());
    assert!(a.nats.revocations.contains_key(&issued[1].public_key));
    assert!(s.revoke_device("nobody").is_err());

    let list = s.list_devices().unwrap();
    let ids: Vec<&str> = list.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["d1", "d2"]);
    assert!(list[0].revoked.is_none() && list[1].revoked.is_some());
    // A revoked id may be issued again without --force.
    s.issue_devices(&t, &["d2".into()], false).unwrap();
    // A restart (init again) keeps the revocations.
    let s2 = Secure::init(tmp.path(), &Config::default(), &[]).unwrap();
    assert_eq!(s2.revocations().unwrap().len(), 2);
}

#[test]
fn concurrent_issuers_do_not_corrupt_the_registry() {
    let tmp = tempfile::tempdir().unwrap();
    Secure::init(tmp.path(), &Config::default(), &[]).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let dir = tmp.path().to_path_buf();
            std::thread::spawn(move || {
                let s = Secure::open(&dir).unwrap();
                for i in 0..25 {
                    s.issue_devices(&template(), &[format!("t{t}-{i}")], false)
                        .unwrap();
                }
                // Everyone races for the same id: exactly one wins.
                s.issue_devices(&template(), &["shared".into()], false)
                    .is_ok()
            })
        })
        .collect();
    let wins = threads
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|w| *w)
        .count();
    assert_eq!(wins, 1);
    let s = Secure::open(tmp.path()).unwrap();
    assert_eq!(s.list_devices().unwrap().len(), 8 * 25 + 1);
}

/// `cargo test -p fleetpipe-pipeline --release --lib issuing_100k -- --ignored --nocapture`
#[test]
#[ignore = "a bench: issues 100,000 device credentials"]
fn issuing_100k_device_credentials() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Secure::init(tmp.path(), &Config::default(), &[]).unwrap();
    let ids: Vec<String> = (0..100_000).map(|i| format!("v{i:06}")).collect();
    let start = std::time::Instant::now();
    for chunk in ids.chunks(10_000) {
        let issued = s.issue_devices(&template(), chunk, false).unwrap();
        assert_eq!(issued.len(), chunk.len());
    }
    let issue = start.elapsed();
    let start = std::time::Instant::now();
    let one = s
        .issue_devices(&template(), &["one-more".into()], false)
        .unwrap();
    let single = start.elapsed();
    assert_eq!(one.len(), 1);
    let start = std::time::Instant::now();
    assert_eq!(s.list_devices().unwrap().len(), 100_001);
    println!(
        "issued 100,000 device credentials in {:.2} s ({:.0}/s); one more with 100,000 registered: {} ms; listing: {} ms",
        issue.as_secs_f64(),
        100_000.0 / issue.as_secs_f64(),
        single.as_millis(),
        start.elapsed().as_millis()
    );
    assert!(issue < Duration::from_secs(60));
}
