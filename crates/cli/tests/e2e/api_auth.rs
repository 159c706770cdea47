//! The authenticated API end to end: `fleetpipe token add|list|revoke` against the real
//! broker, `fleetpipe serve --api-auth tokens` refusing and accepting requests, tokens made
//! through the API, revocation by the command line reaching the server within a second, an
//! open API refused beyond loopback; and the server's debug log, captured for the whole
//! run, never holds a token, a secret or a token's name.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// One request on a fresh connection: the status and the body (the head alone for the
/// live stream, which never ends); status 0 when nothing listens.
pub(crate) async fn request(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)).await else {
        return (0, String::new()); // not listening yet
    };
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let body = body.map_or(String::new(), |b| {
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )
    });
    let body = if body.is_empty() { "\r\n".into() } else { body };
    let req = format!("{method} {path} HTTP/1.1\r\nHost: t\r\n{auth}Connection: close\r\n{body}");
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .map_or(0, |r| r.unwrap_or(0));
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if path.starts_with("/api/v1/live") && raw.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

async fn wait_status(port: u16, path: &str, token: Option<&str>, want: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = request(port, "GET", path, token, None).await;
        if status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "GET {path}: {status} {body}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_end_to_end_and_never_logged() {
    let env = Env::sqlite();
    env.run(&["init"]);
    let mut secrets: Vec<String> = Vec::new();

    // Made by the command line: printed once on stdout, nothing about it on stderr.
    let out = env
        .cmd(&["token", "add", "e2e-admin-name", "--role", "admin"])
        .env("FLEETPIPE_LOG", "debug")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let admin = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(admin.starts_with("fpt_"), "{admin}");
    assert!(!String::from_utf8_lossy(&out.stderr).contains(&admin));
    let read: Value = serde_json::from_str(&env.run(&[
        "token",
        "add",
        "e2e-read-name",
        "--role",
        "read",
        "--json",
    ]))
    .unwrap();
    let read = read["token"].as_str().unwrap().to_string();
    secrets.extend([admin.clone(), read.clone()]);
    let out = env
        .cmd(&["token", "add", "e2e-read-name", "--role", "read"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a name is unique");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    let port = fleetpipe_testkit::free_port();
    let http = format!("127.0.0.1:{port}");
    let mut serve = env.spawn_logged(
        &["serve", "--http", &http, "--api-auth", "tokens"],
        "debug",
        &log,
    );
    wait_status(port, "/readyz", None, 200, Duration::from_secs(30)).await;

    // Refused without a token or with a bad one, allowed with one.
    assert_eq!(
        request(port, "GET", "/api/v1/devices", None, None).await.0,
        401
    );
    let forged = format!("{}x", &read[..read.len() - 1]);
    assert_eq!(
        request(port, "GET", "/api/v1/devices", Some(&forged), None)
            .await
            .0,
        401
    );
    assert_eq!(
        request(port, "GET", "/api/v1/devices", Some(&read), None)
            .await
            .0,
        200
    );
    assert_eq!(request(port, "GET", "/metrics", None, None).await.0, 401);
    assert_eq!(
        request(port, "GET", "/metrics", Some(&read), None).await.0,
        200
    );
    assert_eq!(
        request(port, "GET", "/api/v1/tokens", Some(&read), None)
            .await
            .0,
        403
    );
    let live = format!("/api/v1/live?device=x&access_token={read}");
    assert_eq!(request(port, "GET", &live, None, None).await.0, 200);

    // Made through the API.
    let (status, body) = request(
        port,
        "POST",
        "/api/v1/tokens",
        Some(&admin),
        Some(r#"{"name":"e2e-api-name","role":"operator"}"#),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let made: Value = serde_json::from_str(&body).unwrap();
    let operator = made["token"].as_str().unwrap().to_string();
    secrets.push(operator.clone());
    assert_eq!(
        request(port, "GET", "/api/v1/info", Some(&operator), None)
            .await
            .0,
        200
    );

    // Listed by the command line without secrets.
    let list = env.run(&["token", "list", "--json"]);
    let listed: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 3, "{list}");
    for s in &secrets {
        assert!(
            !list.contains(&s[4 + 16 + 1..]),
            "token list shows a secret"
        );
    }
    assert!(!list.contains("sha256"));
    let table = env.run(&["token", "list"]);
    assert!(
        table.contains("e2e-api-name") && table.contains("operator"),
        "{table}"
    );

    // Revoked by name on the command line: the server refuses it within a second.
    env.run(&["token", "revoke", "e2e-read-name"]);
    let revoked = Instant::now();
    wait_status(
        port,
        "/api/v1/devices",
        Some(&read),
        401,
        Duration::from_secs(1),
    )
    .await;
    println!("revocation seen by the server in {:?}", revoked.elapsed());
    // And through the API, by id.
    let id = made["id"].as_str().unwrap();
    let path = format!("/api/v1/tokens/{id}");
    assert_eq!(
        request(port, "DELETE", &path, Some(&admin), None).await.0,
        200
    );
    assert_eq!(
        request(port, "GET", "/api/v1/info", Some(&operator), None)
            .await
            .0,
        401
    );
    assert_eq!(
        request(port, "GET", "/api/v1/info", Some(&admin), None)
            .await
            .0,
        200
    );

    serve.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("api requires bearer tokens"), "{text}");
    assert!(
        text.contains("api token created"),
        "the log is captured: {text}"
    );
    for s in &secrets {
        assert!(!text.contains(s.as_str()), "a token is in the server's log");
        assert!(
            !text.contains(&s[4 + 16 + 1..]),
            "a secret is in the server's log"
        );
    }
    for name in ["e2e-admin-name", "e2e-read-name", "e2e-api-name"] {
        assert!(
            !text.contains(name),
            "the token name {name} is in the server's log"
        );
    }
}

#[test]
fn an_open_api_beyond_loopback_is_refused() {
    let env = Env::sqlite();
    let out = env
        .cmd(&["serve", "--http", "0.0.0.0:0", "--api-auth", "none"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a loopback address"), "{err}");
}
