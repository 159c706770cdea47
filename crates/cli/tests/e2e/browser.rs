//! The dashboard in a real headless browser: `fleetpipe up --simulate 200` with the HTTP
//! API requiring tokens, driven by `web/tests/browser.mjs` (playwright-core and Debian's
//! Chromium). The page asks for a token and signs in with one made by `fleetpipe token
//! add`; the table lists 200 devices, the map shows positions, a device page's speed chart
//! receives live points; logging out asks again. Screenshots land in
//! `<target>/screenshots/`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fleetpipe_testkit::free_port;

use crate::support::*;

const SETUP: &str = "run `eval \"$(scripts/setup.sh test)\"`: it installs Debian's chromium \
     and runs `npm ci` in web/ (or set FLEETPIPE_SKIP_BROWSER=1 to skip this test outside CI)";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `<target>/screenshots`, next to the binary under test's profile directory.
fn screenshot_dir() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_fleetpipe"));
    bin.parent()
        .and_then(Path::parent)
        .map(|target| target.join("screenshots"))
        .unwrap_or_else(|| workspace().join("target/screenshots"))
}

fn skip() -> bool {
    let skip = std::env::var("FLEETPIPE_SKIP_BROWSER").as_deref() == Ok("1")
        && std::env::var("CI").as_deref() != Ok("true");
    if skip {
        eprintln!("skipping: FLEETPIPE_SKIP_BROWSER=1 (the dashboard browser test)");
    }
    skip
}

/// The status line of `GET <path>` on 127.0.0.1:`port`, if the server answers.
fn http_status(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).ok()?;
    let head = String::from_utf8_lossy(&head[..n]);
    head.lines().next().map(str::to_string)
}

#[test]
fn dashboard_in_headless_chromium() {
    if skip() {
        return;
    }
    let chromium =
        std::env::var("FLEETPIPE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "no Chromium at {chromium}: {SETUP}"
    );
    let web = workspace().join("web");
    assert!(
        web.join("node_modules/playwright-core").is_dir(),
        "web/node_modules/playwright-core is missing: {SETUP}"
    );

    let env = Env::sqlite();
    let port = free_port();
    let http = format!("127.0.0.1:{port}");
    let mut up = env.spawn(&[
        "up",
        "--simulate",
        "200",
        "--http",
        &http,
        "--api-auth",
        "tokens",
    ]);

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = up.exited() {
            panic!("fleetpipe up exited ({status}) before its HTTP API answered");
        }
        match http_status(port, "/readyz") {
            Some(line) if line.contains(" 200 ") => break,
            _ if Instant::now() > deadline => {
                panic!("the HTTP API at {http} did not answer in 60 s")
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }

    // Without a token the API refuses; the page will ask for this one.
    assert!(http_status(port, "/api/v1/fleet/summary").is_some_and(|l| l.contains(" 401 ")));
    let token = env.run(&["token", "add", "browser", "--role", "read"]);
    let token = token.trim();
    assert!(token.starts_with("fpt_"), "{token}");

    let shots = screenshot_dir();
    let out = Command::new("node")
        .arg(web.join("tests/browser.mjs"))
        .arg(format!("http://{http}/"))
        .arg(&shots)
        .env("FLEETPIPE_CHROMIUM", &chromium)
        .env("FLEETPIPE_EXPECT_DEVICES", "200")
        .env("FLEETPIPE_TOKEN", token)
        .output()
        .unwrap_or_else(|e| panic!("cannot run node ({e}): install Node.js, then {SETUP}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "the browser test failed ({}):\n{stdout}{stderr}\nscreenshots: {}",
        out.status,
        shots.display()
    );
    up.stop();
}
