//! PostgreSQL over TLS: a throwaway cluster that takes only TLS connections, with a
//! certificate from a CA made here; the store honours libpq's `sslmode` and
//! `sslrootcert`.

use fleetpipe_store::open;
use fleetpipe_testkit::PgServer;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

/// A CA's PEM certificate, and a server certificate for 127.0.0.1 and localhost signed
/// by it, written under `dir` as `ca.pem`, `server.pem`, `server-key.pem`.
fn certificates(dir: &std::path::Path, name: &str) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.join("server-key.pem"), key.serialize_pem()).unwrap();
}

#[tokio::test]
async fn sslmode_is_honoured() {
    if std::env::var("FLEETPIPE_SKIP_PG").is_ok_and(|v| v == "1")
        && std::env::var("CI").as_deref() != Ok("true")
    {
        println!("skipping: FLEETPIPE_SKIP_PG=1");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours");
    let other = dir.path().join("other");
    for (d, name) in [(&ours, "ours"), (&other, "other")] {
        std::fs::create_dir(d).unwrap();
        certificates(d, name);
    }
    let pg = PgServer::start_tls(&ours.join("server.pem"), &ours.join("server-key.pem"));
    let base = pg.url();
    let ca = ours.join("ca.pem");
    let wrong_ca = other.join("ca.pem");
    let with = |query: &str| format!("{base}?{query}");

    // The server takes TLS only: without it, refused.
    let err = open(&with("sslmode=disable"))
        .await
        .err()
        .expect("plain TCP refused");
    assert!(
        err.to_string().contains("no pg_hba.conf entry") || err.to_string().contains("SSL off"),
        "{err}"
    );

    // TLS, checked against our CA, for the host connected to.
    for query in [
        format!("sslmode=verify-full&sslrootcert={}", ca.display()),
        format!("sslmode=verify-ca&sslrootcert={}", ca.display()),
        // libpq's defaults: TLS when offered, the certificate unchecked.
        "sslmode=require".to_string(),
        String::new(),
    ] {
        let store = open(&with(&query))
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"));
        store.ping().await.unwrap();
        assert_eq!(store.count_readings().await.unwrap(), 0);
        let ssl = pg.psql(
            "fleetpipe",
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE s.ssl AND a.application_name <> 'psql'",
        );
        assert!(ssl.trim().parse::<u64>().unwrap() >= 1, "{query}: {ssl}");
    }

    // A server whose certificate another CA signed is refused when it is checked.
    for query in [
        format!("sslmode=verify-full&sslrootcert={}", wrong_ca.display()),
        format!("sslmode=require&sslrootcert={}", wrong_ca.display()),
    ] {
        let err = open(&with(&query)).await.err().expect("wrong CA refused");
        let text = err.to_string();
        assert!(
            text.to_lowercase().contains("certificate") || text.contains("UnknownIssuer"),
            "{query}: {text}"
        );
    }
    // verify-full checks the name: `localhost` is in the certificate, another name not.
    let by_name = base.replace("127.0.0.1", "localhost");
    let store = open(&format!(
        "{by_name}?sslmode=verify-full&sslrootcert={}",
        ca.display()
    ))
    .await
    .unwrap();
    store.ping().await.unwrap();
}
