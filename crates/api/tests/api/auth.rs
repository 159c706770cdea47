//! Authentication: every route of the table enforces the access it declares (401 without
//! a token or with a bad one, 403 with too small a role, 2xx with enough), tokens live in
//! a real KV bucket and are revoked live across replicas, the live stream's query token,
//! the token routes, and HTTPS.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::response::Response;
use axum::Router;
use fleetpipe_api::auth::tokens::{self, CreatedToken};
use fleetpipe_api::auth::TokenSet;
use fleetpipe_api::routes::{table, Route};
use fleetpipe_api::{router, Access, AppState, Auth, Role};
use fleetpipe_testkit::NatsServer;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::{wait_until, Fixture};

/// A token bucket on a real nats-server, one token per role, and a set mirroring it.
pub(crate) struct Tokens {
    pub _server: NatsServer,
    pub bucket: kv::Store,
    pub device_config: kv::Store,
    pub set: Arc<TokenSet>,
    pub by_role: Vec<(Role, String)>,
    pub stop: CancellationToken,
}

impl Tokens {
    pub async fn new() -> Tokens {
        let server = NatsServer::start();
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let bucket = js
            .create_key_value(kv::Config {
                bucket: fleetpipe_pipeline::config::names::TOKEN_BUCKET.into(),
                history: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        let device_config = js
            .create_key_value(kv::Config {
                bucket: fleetpipe_pipeline::config::names::CONFIG_BUCKET.into(),
                history: 5,
                ..Default::default()
            })
            .await
            .unwrap();
        device_config
            .put("v00001", "[sensors.speed]\nrate_hz = 2.0\n".into())
            .await
            .unwrap();
        let mut by_role = Vec::new();
        for role in Role::ALL {
            let t = tokens::create(&bucket, &format!("test-{role}"), role)
                .await
                .unwrap();
            by_role.push((role, t.token));
        }
        let (set, stop) = mirror(&bucket);
        wait_until(|| set.is_ready() && set.len() == 3).await;
        Tokens {
            _server: server,
            bucket,
            device_config,
            set,
            by_role,
            stop,
        }
    }

    pub fn token(&self, role: Role) -> &str {
        &self.by_role.iter().find(|(r, _)| *r == role).unwrap().1
    }

    /// `state` with tokens required, checked against this bucket.
    pub fn required(&self, state: &AppState) -> AppState {
        AppState {
            auth: Auth::tokens(self.set.clone(), Some(self.bucket.clone())),
            device_config: Some(self.device_config.clone()),
            ..state.clone()
        }
    }
}

impl Drop for Tokens {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A token set kept current by its own watch, as one API replica has.
fn mirror(bucket: &kv::Store) -> (Arc<TokenSet>, CancellationToken) {
    let set = Arc::new(TokenSet::new());
    let stop = CancellationToken::new();
    tokio::spawn(tokens::watch(bucket.clone(), set.clone(), stop.clone()));
    (set, stop)
}

/// A well-formed token that was never issued.
const FORGED: &str = "fpt_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

/// A request that each route of the table answers with a 2xx when allowed. A route
/// without one here fails the test: add it when adding a route.
async fn sample(route: &Route, t: &Tokens, n: usize) -> (String, Option<String>) {
    let uri = match (route.method.clone(), route.path) {
        (Method::GET, "/") => "/".to_string(),
        (Method::GET, "/assets/{*path}") => "/assets/app.js".into(),
        (Method::GET, "/api/v1/devices") => "/api/v1/devices".into(),
        (Method::GET, "/api/v1/devices/{id}") => "/api/v1/devices/v00001".into(),
        (Method::GET, "/api/v1/devices/{id}/series") => {
            "/api/v1/devices/v00001/series?sensor=speed".into()
        }
        (Method::GET, "/api/v1/devices/{id}/config") => "/api/v1/devices/v00001/config".into(),
        (Method::PUT, "/api/v1/devices/{id}/config") => {
            let body = format!("[sensors.speed]\nrate_hz = {}.0\n", n % 10 + 1);
            return ("/api/v1/devices/v00001/config".into(), Some(body));
        }
        (Method::GET, "/api/v1/fleet/summary") => "/api/v1/fleet/summary".into(),
        (Method::GET, "/api/v1/live") => "/api/v1/live".into(),
        (Method::GET, "/api/v1/info") => "/api/v1/info".into(),
        (Method::GET, "/api/v1/openapi.json") => "/api/v1/openapi.json".into(),
        (Method::GET, "/api/v1/tokens") => "/api/v1/tokens".into(),
        (Method::POST, "/api/v1/tokens") => {
            let body = format!(r#"{{"name":"sample-{n}","role":"read"}}"#);
            return ("/api/v1/tokens".into(), Some(body));
        }
        (Method::DELETE, "/api/v1/tokens/{id}") => {
            let victim = tokens::create(&t.bucket, &format!("victim-{n}"), Role::Read)
                .await
                .unwrap();
            format!("/api/v1/tokens/{}", victim.info.id)
        }
        (Method::GET, "/metrics") => "/metrics".into(),
        (Method::GET, "/healthz") => "/healthz".into(),
        (Method::GET, "/readyz") => "/readyz".into(),
        (m, p) => panic!("no sample request for {m} {p}: add one to tests/api/auth.rs"),
    };
    (uri, None)
}

/// Sends a request; the response with its body unread (the live stream never ends).
async fn send(
    app: &Router,
    method: &Method,
    uri: &str,
    authorization: Option<&str>,
    body: Option<&str>,
) -> Response {
    let mut req = Request::builder().method(method.clone()).uri(uri);
    if let Some(a) = authorization {
        req = req.header(header::AUTHORIZATION, a);
    }
    if body.is_some() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    app.clone().oneshot(req).await.unwrap()
}

async fn get(app: &Router, uri: &str) -> Response {
    send(app, &Method::GET, uri, None, None).await
}

async fn post(app: &Router, authorization: &str, body: &str) -> Response {
    send(
        app,
        &Method::POST,
        "/api/v1/tokens",
        Some(authorization),
        Some(body),
    )
    .await
}

async fn json(resp: Response) -> Value {
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
}

/// Asserts a refusal: the status, a JSON error, and for a 401 the challenge.
async fn assert_refused(resp: Response, want: StatusCode, what: &str) {
    assert_eq!(resp.status(), want, "{what}");
    if want == StatusCode::UNAUTHORIZED {
        let challenge = resp.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
        assert!(challenge.starts_with("Bearer"), "{what}: {challenge}");
    }
    let body = json(resp).await;
    assert!(
        body["error"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {body}"
    );
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test]
async fn every_route_declares_its_access() {
    let mut open = Vec::new();
    for route in table() {
        match route.access {
            Access::Open => open.push(route.path),
            Access::Metrics => assert_eq!(route.path, "/metrics"),
            Access::Role(_) => {}
        }
        if route.path.starts_with("/api/") {
            assert!(
                matches!(route.access, Access::Role(_)),
                "{} {} is under /api/ and needs no role",
                route.method,
                route.path
            );
        }
        if route.path.starts_with("/api/v1/tokens") {
            assert_eq!(route.access, Access::Role(Role::Admin), "{}", route.path);
        }
    }
    assert_eq!(open, ["/", "/assets/{*path}", "/healthz", "/readyz"]);
}

#[tokio::test]
async fn every_route_enforces_its_role() {
    let f = Fixture::new().await;
    let t = Tokens::new().await;
    let app = router(t.required(&f.state));
    let mut checked = 0;
    for (n, route) in table().iter().enumerate() {
        let needed = match route.access {
            Access::Open => None,
            Access::Metrics => Some(Role::Read),
            Access::Role(r) => Some(r),
        };
        let what = |case: &str| format!("{} {}: {case}", route.method, route.path);
        if let Some(needed) = needed {
            let (uri, body) = sample(route, &t, n).await;
            let body = body.as_deref();
            let m = &route.method;
            let r = send(&app, m, &uri, None, body).await;
            assert_refused(r, StatusCode::UNAUTHORIZED, &what("no token")).await;
            for bad in [
                bearer(FORGED),
                bearer("nonsense"),
                bearer(&t.token(Role::Admin)[..40]),
                "Basic dXNlcjpwYXNz".into(),
                "Bearer".into(),
            ] {
                let r = send(&app, m, &uri, Some(&bad), body).await;
                assert_refused(r, StatusCode::UNAUTHORIZED, &what(&bad)).await;
            }
            for role in Role::ALL.into_iter().filter(|r| *r < needed) {
                let r = send(&app, m, &uri, Some(&bearer(t.token(role))), body).await;
                assert_refused(r, StatusCode::FORBIDDEN, &what(role.as_str())).await;
            }
        }
        // Enough (or no) role: answered. A DELETE removes its sample, so one each.
        for role in Role::ALL
            .into_iter()
            .filter(|r| needed.is_none_or(|n| *r >= n))
        {
            let (uri, body) = sample(route, &t, n * 10 + role as usize).await;
            let r = send(
                &app,
                &route.method,
                &uri,
                Some(&bearer(t.token(role))),
                body.as_deref(),
            )
            .await;
            assert!(
                r.status().is_success(),
                "{}: {}",
                what(role.as_str()),
                r.status()
            );
        }
        if needed.is_none() {
            let (uri, body) = sample(route, &t, n).await;
            let r = send(&app, &route.method, &uri, None, body.as_deref()).await;
            assert!(r.status().is_success(), "{}", what("open, no token"));
        }
        checked += 1;
    }
    assert_eq!(checked, table().len());

    // Metrics open by configuration.
    let open_metrics = router(AppState {
        auth: Auth {
            metrics_auth: false,
            ..Auth::tokens(t.set.clone(), None)
        },
        ..f.state.clone()
    });
    let r = send(&open_metrics, &Method::GET, "/metrics", None, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = send(&open_metrics, &Method::GET, "/api/v1/devices", None, None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Authentication off: every route answers without a token (a stale one is ignored).
    let off = router(AppState {
        auth: Auth {
            bucket: Some(t.bucket.clone()),
            ..Auth::none()
        },
        device_config: Some(t.device_config.clone()),
        ..f.state.clone()
    });
    for (n, route) in table().iter().enumerate() {
        for (k, authorization) in [None, Some(bearer(FORGED))].into_iter().enumerate() {
            let (uri, body) = sample(route, &t, 1000 + 2 * n + k).await;
            let r = send(
                &off,
                &route.method,
                &uri,
                authorization.as_deref(),
                body.as_deref(),
            )
            .await;
            assert!(
                r.status().is_success(),
                "auth off: {} {uri}: {}",
                route.method,
                r.status()
            );
        }
    }
}

#[tokio::test]
async fn tokens_loading_is_a_503_not_a_401() {
    let f = Fixture::new().await;
    let app = router(AppState {
        auth: Auth::tokens(Arc::new(TokenSet::new()), None),
        ..f.state.clone()
    });
    let r = send(
        &app,
        &Method::GET,
        "/api/v1/devices",
        Some(&bearer(FORGED)),
        None,
    )
    .await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().contains_key(header::RETRY_AFTER));
    let r = send(&app, &Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(r).await["tokens"], "loading");
    let r = send(&app, &Method::GET, "/healthz", None, None).await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_live_stream_takes_its_token_in_the_query() {
    let f = Fixture::new().await;
    let t = Tokens::new().await;
    let app = router(t.required(&f.state));
    let read = t.token(Role::Read);

    // Taken out before the handler: its filters still work, no "unknown parameter".
    let r = get(
        &app,
        &format!("/api/v1/live?device=v00003&access_token={read}"),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let body = r.into_body();
    let ts = fleetpipe_proto::Timestamp::now().as_micros();
    f.state
        .index
        .apply_put("v00004", "speed", super::state(1.0, ts, None, &[]));
    f.state
        .index
        .apply_put("v00003", "speed", super::state(2.0, ts, None, &[]));
    let events = super::read_events(body, 1).await;
    assert_eq!(events[0].1["device"], "v00003");

    for uri in [
        format!("/api/v1/live?access_token={FORGED}"),
        "/api/v1/live?access_token=".to_string(),
        "/api/v1/live?device=v1".to_string(),
    ] {
        assert_refused(get(&app, &uri).await, StatusCode::UNAUTHORIZED, &uri).await;
    }
    let twice = format!("/api/v1/live?access_token={read}&access_token={read}");
    assert_refused(get(&app, &twice).await, StatusCode::BAD_REQUEST, "twice").await;
    // No other route takes it.
    for path in ["/api/v1/devices", "/api/v1/fleet/summary", "/metrics"] {
        let uri = format!("{path}?access_token={read}");
        assert_refused(get(&app, &uri).await, StatusCode::UNAUTHORIZED, &uri).await;
    }
    // The header wins over the query.
    let r = send(
        &app,
        &Method::GET,
        &format!("/api/v1/live?access_token={read}"),
        Some(&bearer(FORGED)),
        None,
    )
    .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // Authentication off: a leftover token in the query is ignored, not a 400.
    let off = router(f.state.clone());
    let r = send(
        &off,
        &Method::GET,
        "/api/v1/live?access_token=old",
        None,
        None,
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn token_routes() {
    let f = Fixture::new().await;
    let t = Tokens::new().await;
    let app = router(t.required(&f.state));
    let admin = bearer(t.token(Role::Admin));
    let r = post(&app, &admin, r#"{"name":"grafana","role":"read"}"#).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let created = json(r).await;
    let token = created["token"].as_str().unwrap().to_string();
    assert_eq!(created["role"], "read");
    assert_eq!(created["name"], "grafana");
    let id = created["id"].as_str().unwrap().to_string();
    assert!(token.starts_with(&format!("fpt_{id}_")));
    // Usable at once on the replica that created it.
    let r = send(
        &app,
        &Method::GET,
        "/api/v1/devices",
        Some(&bearer(&token)),
        None,
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);

    let r = send(&app, &Method::GET, "/api/v1/tokens", Some(&admin), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let list = json(r).await;
    let text = list.to_string();
    let names: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["grafana", "test-admin", "test-operator", "test-read"]
    );
    let secret = &token[4 + 16 + 1..];
    assert!(!text.contains(secret) && !text.contains("sha256"), "{text}");

    for (body, status, needle) in [
        (r#"{"name":"grafana","role":"read"}"#, 409, "already exists"),
        (r#"{"name":"x","role":"root"}"#, 400, "role"),
        (r#"{"name":"a b","role":"read"}"#, 400, "letters, digits"),
        (r#"{"name":"","role":"read"}"#, 400, "letters, digits"),
        (r#"{"name":"x"}"#, 400, "role"),
        (r#"{"name":"x","role":"read","extra":1}"#, 400, "extra"),
        ("not json", 400, "must be JSON"),
        ("", 400, "must be JSON"),
        ("[]", 400, "must be JSON"),
    ] {
        let r = post(&app, &admin, body).await;
        assert_eq!(r.status().as_u16(), status, "{body}");
        let m = json(r).await["error"].as_str().unwrap().to_string();
        assert!(m.contains(needle), "{body}: {m}");
    }
    let big = format!(r#"{{"name":"{}","role":"read"}}"#, "x".repeat(5000));
    let r = post(&app, &admin, &big).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    for (uri, status) in [
        ("/api/v1/tokens/0123456789abcdef", 404),
        ("/api/v1/tokens/grafana", 404),
        ("/api/v1/tokens/%00", 404),
    ] {
        let r = send(&app, &Method::DELETE, uri, Some(&admin), None).await;
        assert_eq!(r.status().as_u16(), status, "{uri}");
    }
    let r = send(
        &app,
        &Method::DELETE,
        &format!("/api/v1/tokens/{id}"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(json(r).await["name"], "grafana");
    let r = send(
        &app,
        &Method::GET,
        "/api/v1/devices",
        Some(&bearer(&token)),
        None,
    )
    .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "revoked at once here");
    let r = send(&app, &Method::PUT, "/api/v1/tokens", Some(&admin), None).await;
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    let m = json(r).await["error"].as_str().unwrap().to_string();
    assert!(m.contains("use GET or POST"), "{m}");
}

#[tokio::test]
async fn revocation_reaches_every_replica_within_a_second() {
    let f = Fixture::new().await;
    let t = Tokens::new().await;
    // Two replicas, each with its own mirror of the bucket.
    let (other_set, other_stop) = mirror(&t.bucket);
    wait_until(|| other_set.is_ready()).await;
    let a = router(t.required(&f.state));
    let b = router(AppState {
        auth: Auth::tokens(other_set.clone(), Some(t.bucket.clone())),
        ..f.state.clone()
    });
    let created: CreatedToken = tokens::create(&t.bucket, "ops", Role::Operator)
        .await
        .unwrap();
    let auth = bearer(&created.token);
    let status = |app: &Router| {
        let app = app.clone();
        let auth = auth.clone();
        async move {
            send(&app, &Method::GET, "/api/v1/devices", Some(&auth), None)
                .await
                .status()
        }
    };
    let started = Instant::now();
    while status(&a).await != StatusCode::OK || status(&b).await != StatusCode::OK {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "not accepted within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Revoked by name, as `fleetpipe token revoke ops` does.
    tokens::revoke(&t.bucket, "ops").await.unwrap();
    let revoked = Instant::now();
    while status(&a).await != StatusCode::UNAUTHORIZED
        || status(&b).await != StatusCode::UNAUTHORIZED
    {
        assert!(
            revoked.elapsed() < Duration::from_secs(1),
            "still accepted 1 s after revocation"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "revocation effective on both replicas in {:?}",
        revoked.elapsed()
    );
    // The others are untouched.
    let r = send(
        &b,
        &Method::GET,
        "/api/v1/devices",
        Some(&bearer(t.token(Role::Read))),
        None,
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    other_stop.cancel();
}

#[tokio::test]
async fn cli_level_token_functions() {
    let t = Tokens::new().await;
    assert!(matches!(
        tokens::create(&t.bucket, "test-read", Role::Admin).await,
        Err(tokens::TokenError::NameTaken(_))
    ));
    assert!(matches!(
        tokens::create(&t.bucket, "bad name", Role::Admin).await,
        Err(tokens::TokenError::InvalidName(_))
    ));
    let listed = tokens::list(&t.bucket).await.unwrap();
    assert_eq!(listed.len(), 3);
    let id = listed[0].id.clone();
    let revoked = tokens::revoke(&t.bucket, &id).await.unwrap();
    assert_eq!(revoked.id, id);
    assert!(matches!(
        tokens::revoke(&t.bucket, &id).await,
        Err(tokens::TokenError::NotFound(_))
    ));
    wait_until(|| t.set.len() == 2).await;
}

// ---------------------------------------------------------------------------------------
// HTTPS

mod https {
    use super::*;
    use std::path::Path;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

    /// A server certificate for 127.0.0.1 and localhost, and the CA that signed it, made
    /// as `fleetpipe up --secure` makes its own.
    fn certificate(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
        let files = fleetpipe_pipeline::security::tls::TlsFiles::under(dir);
        files.ensure(&[]).unwrap();
        (files.server_cert, files.server_key, files.ca_cert)
    }

    async fn https_get(
        addr: std::net::SocketAddr,
        roots: &rustls::RootCertStore,
        path: &str,
        token: Option<&str>,
    ) -> String {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
        tls.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn https_with_tokens() {
        let f = Fixture::new().await;
        let t = Tokens::new().await;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, ca) = certificate(dir.path());
        let config = fleetpipe_api::tls::server_config(&cert, &key).unwrap();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let listener = fleetpipe_api::tls::TlsListener::new(tcp, config).unwrap();
        let state = t.required(&f.state);
        let server = tokio::spawn(fleetpipe_api::serve(listener, state.clone()));

        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&ca).unwrap())
            .unwrap();
        let health = https_get(addr, &roots, "/healthz", None).await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        let refused = https_get(addr, &roots, "/api/v1/devices", None).await;
        assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
        let ok = https_get(
            addr,
            &roots,
            "/api/v1/devices/v00001",
            Some(t.token(Role::Read)),
        )
        .await;
        assert!(
            ok.starts_with("HTTP/1.1 200") && ok.contains("\"id\":\"v00001\""),
            "{ok}"
        );

        // Plain HTTP on the HTTPS port gets no answer; a silent client does not block others.
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await;
        assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
        let again = https_get(addr, &roots, "/healthz", None).await;
        assert!(again.starts_with("HTTP/1.1 200"), "{again}");
        let _ = silent.write_all(b"").await;

        // Bad files are refused with the path, never the key's contents.
        let err = fleetpipe_api::tls::server_config(&key, &cert)
            .unwrap_err()
            .to_string();
        assert!(err.contains("key.pem") || err.contains("cert.pem"), "{err}");
        let err = fleetpipe_api::tls::server_config(&dir.path().join("none"), &key)
            .unwrap_err()
            .to_string();
        assert!(err.contains("certificate chain"), "{err}");

        state.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the https server stops at shutdown")
            .unwrap()
            .unwrap();
    }
}
