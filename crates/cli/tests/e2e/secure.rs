//! `fleetpipe up --secure` with other clients: the official C client (core publishes, the
//! reference design's format) and nats-py (JetStream publishes with acks on the device's
//! own inbox prefix) connect with a `.creds` file from `fleetpipe device add` and the
//! local CA, over TLS, and their readings land; each of up's services runs as its own
//! least-privilege user (a permission violation would stop them storing anything), the
//! API with bearer tokens it reads from its bucket as its own user; and no secret the run
//! created (seeds, CA and server keys, an API token) is in its logs.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::api_auth::request;
use crate::support::build_c_client;

/// `fleetpipe up`, stopped with SIGTERM (never SIGKILL, which would leave its managed
/// nats-server behind) when dropped, even by a failing assertion.
struct Up(std::process::Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const C_PUBLISHER: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <nats/nats.h>

int main(int argc, char **argv) {
    natsConnection *conn = NULL;
    natsOptions *opts = NULL;
    if (natsOptions_Create(&opts) != NATS_OK) return 1;
    if (natsOptions_SetURL(opts, argv[1]) != NATS_OK) return 1;
    if (natsOptions_SetUserCredentialsFromFiles(opts, argv[2], NULL) != NATS_OK) return 1;
    if (natsOptions_LoadCATrustedCertificates(opts, argv[3]) != NATS_OK) return 1;
    if (natsOptions_SetSecure(opts, true) != NATS_OK) return 1;
    natsStatus s = natsConnection_Connect(&conn, opts);
    if (s != NATS_OK) { fprintf(stderr, "connect: %s\n", natsStatus_GetText(s)); return 2; }
    char value[32];
    for (int i = 0; i < 20; i++) {
        snprintf(value, sizeof value, "%d", i + atoi(argv[4]));
        if (natsConnection_PublishString(conn, "vehicle.car-c.speed", value) != NATS_OK) return 3;
    }
    if (natsConnection_FlushTimeout(conn, 5000) != NATS_OK) return 4;
    natsConnection_Destroy(conn);
    natsOptions_Destroy(opts);
    return 0;
}
"#;

const PY_PUBLISHER: &str = r#"
import asyncio, ssl, sys
import nats

async def main():
    url, creds, ca, device = sys.argv[1:5]
    tls = ssl.create_default_context(cafile=ca)
    nc = await nats.connect(url, user_credentials=creds, tls=tls, inbox_prefix=f"_INBOX_{device}")
    js = nc.jetstream()
    for i in range(20):
        ack = await js.publish(f"vehicle.{device}.speed", str(100 + i).encode())
        assert ack.stream == "FLEETPIPE_TELEMETRY", ack
    await nc.close()

asyncio.run(main())
"#;

fn skip(var: &str, what: &str) -> bool {
    let skip =
        std::env::var(var).as_deref() == Ok("1") && std::env::var("CI").as_deref() != Ok("true");
    if skip {
        eprintln!("skipping: {var}=1 ({what})");
    }
    skip
}

fn fleetpipe(data: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fleetpipe"));
    c.arg("--data-dir")
        .arg(data)
        .arg("--config")
        .arg(data.parent().unwrap().join("fleetpipe.toml"))
        .args(args)
        .env("FLEETPIPE_LOG", "warn")
        .env_remove("FLEETPIPE_CONFIG")
        .env_remove("FLEETPIPE_NATS_URL");
    c
}

fn run(data: &Path, args: &[&str]) -> std::process::Output {
    fleetpipe(data, args).output().unwrap()
}

/// The latest value of `device`'s speed, through the admin user.
fn speed(data: &Path, url: &str, device: &str) -> Option<f64> {
    let out = run(data, &["--nats-url", url, "state", device, "--json"]);
    let state: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
    state
        .iter()
        .find(|s| s["sensor"] == "speed")
        .and_then(|s| s["value"].as_f64())
}

#[tokio::test(flavor = "multi_thread")]
async fn c_and_python_devices_publish_with_creds_over_tls() {
    if skip("FLEETPIPE_SKIP_C", "needs cc and libnats-dev")
        || skip("FLEETPIPE_SKIP_PY", "needs nats-py")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = fleetpipe_testkit::free_port();
    let url = format!("tls://127.0.0.1:{port}");
    // JetStream refuses a stream larger than it can store: keep the test off the disk's size.
    let config = dir.path().join("fleetpipe.toml");
    std::fs::write(&config, "[stream]\nmax_bytes = 268435456\n").unwrap();
    let http = fleetpipe_testkit::free_port();
    let up_log = dir.path().join("up.log");
    let up = fleetpipe(
        &data,
        &[
            "up",
            "--secure",
            "--nats-port",
            &port.to_string(),
            "--http",
            &format!("127.0.0.1:{http}"),
            "--api-auth",
            "tokens",
        ],
    )
    .env("FLEETPIPE_LOG", "debug")
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&up_log).unwrap())
    .spawn()
    .unwrap();
    let _up = Up(up);
    let started = Instant::now();
    while !run(&data, &["--nats-url", &url, "state", "--json"])
        .status
        .success()
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "up --secure did not start"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let ca = data.join("tls/ca.pem");
    let creds = |device: &str| {
        let path = dir.path().join(format!("{device}.creds"));
        let out = run(
            &data,
            &["device", "add", device, "--out", path.to_str().unwrap()],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        path
    };

    // The official C client.
    let bin = build_c_client(dir.path(), C_PUBLISHER);
    let out = Command::new(&bin)
        .arg(&url)
        .arg(creds("car-c"))
        .arg(&ca)
        .arg("0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "C publisher: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // nats-py, with JetStream acks on the device's own inbox.
    let script = dir.path().join("publish.py");
    std::fs::write(&script, PY_PUBLISHER).unwrap();
    let out = Command::new("python3")
        .arg(&script)
        .arg(&url)
        .arg(creds("car-py"))
        .arg(&ca)
        .arg("car-py")
        .output()
        .expect("python3 is needed");
    assert!(
        out.status.success(),
        "nats-py publisher (pip install nats-py): {}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .rev()
            .take(6)
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Stored by the collectors (their own user), latest state put.
    let started = Instant::now();
    while speed(&data, &url, "car-c") != Some(19.0) || speed(&data, &url, "car-py") != Some(119.0) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the readings did not land"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A device's credentials do not let it publish as another: the server drops car-py's
    // publishes on car-c's subject (values 1000…1019).
    let out = Command::new(&bin)
        .arg(&url)
        .arg(dir.path().join("car-py.creds"))
        .arg(&ca)
        .arg("1000")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the publish itself is not refused client-side"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(speed(&data, &url, "car-c"), Some(19.0));
    let list = run(&data, &["device", "list", "--json"]);
    let list: Vec<serde_json::Value> = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list.len(), 2);

    // The API, as its own NATS user, mirrors the token bucket: a token made by the admin
    // user works within a second; none is a 401.
    let out = run(
        &data,
        &["--nats-url", &url, "token", "add", "ops", "--role", "read"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) =
            request(http, "GET", "/api/v1/devices/car-py", Some(&token), None).await;
        if status == 200 {
            let device: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(device["sensors"]["speed"]["value"], 119.0, "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "GET with a token: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = request(http, "GET", "/api/v1/devices/car-py", None, None).await;
    assert_eq!(status, 401);

    // No secret of the run reaches a log: every seed (operator, accounts, services,
    // devices), the CA's and the server's private keys, the token.
    drop(_up);
    let mut secrets: Vec<String> = vec![token];
    let mut files = vec![
        dir.path().join("car-c.creds"),
        dir.path().join("car-py.creds"),
    ];
    let mut dirs = vec![data.join("security"), data.join("tls")];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for word in text.split(|c: char| !c.is_ascii_alphanumeric()) {
            // nkey seeds: S + O/A/U (operator, account, user) + 56 base32 characters.
            if word.len() == 58 && word.starts_with('S') {
                secrets.push(word.to_string());
            }
        }
        if text.contains("PRIVATE KEY-----") {
            let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
            assert!(body.len() > 40, "{}", file.display());
            secrets.push(body[..40].to_string());
        }
    }
    assert!(
        secrets.len() >= 10,
        "seeds and keys found: {}",
        secrets.len()
    );
    let mut logs = std::fs::read_to_string(&up_log).unwrap();
    logs += &std::fs::read_to_string(data.join("nats/nats-server.log")).unwrap_or_default();
    assert!(logs.len() > 1000, "the logs were captured");
    for secret in &secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "a secret ({}…) is in the logs",
            &secret[..6]
        );
    }
}
