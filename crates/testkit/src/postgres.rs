use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Name of the database [`PgServer::start`] creates and [`PgServer::url`] points at.
const DEFAULT_DB: &str = "fleetpipe";

/// Superuser of the throwaway cluster. `initdb -U` names it explicitly, so it is the same
/// whether the tests run as root (the server then runs as the `postgres` OS user) or as
/// anyone else (whose OS name would otherwise become the superuser's).
const SUPERUSER: &str = "postgres";

/// How many free ports to try when another process grabs ours between `free_port` and
/// the server's bind.
const START_ATTEMPTS: usize = 5;

/// A throwaway PostgreSQL cluster: `initdb` into a temporary directory, a server on a free
/// loopback port with trust authentication and no fsync, and one database. Stopped
/// (`pg_ctl stop -m immediate`) and deleted on drop.
pub struct PgServer {
    /// Holds `data/`, `sock/` and `server.log`; removed on drop, after the server stops.
    dir: tempfile::TempDir,
    bins: Bins,
    /// Running as root: initdb and the server refuse to, so they run as `postgres`.
    as_postgres: bool,
    port: u16,
}

impl PgServer {
    /// Starts a cluster and creates the database [`PgServer::url`] names. Panics with a
    /// hint when the PostgreSQL server binaries are missing: tests need the real thing.
    pub fn start() -> PgServer {
        let bins = Bins::find();
        for program in ["initdb", "pg_ctl", "createdb"] {
            if !bins.path(program).is_file() {
                panic!("{}", missing_hint(program));
            }
        }
        let as_postgres = running_as_root();
        let dir = tempfile::Builder::new()
            .prefix("fleetpipe-pg-")
            .tempdir()
            .unwrap_or_else(|e| panic!("create a temp dir for PostgreSQL: {e}"));
        std::fs::create_dir(dir.path().join("sock"))
            .unwrap_or_else(|e| panic!("create the PostgreSQL socket dir: {e}"));
        if as_postgres {
            hand_to_postgres_user(dir.path());
        }
        let mut server = PgServer {
            dir,
            bins,
            as_postgres,
            port: 0,
        };
        server.initdb();
        server.start_server();
        server.create_database(DEFAULT_DB);
        server
    }

    /// Like [`PgServer::start`], with TLS on: `cert` and `key` (PEM files) are the
    /// server's certificate and key, and clients must use TLS (`hostssl` only).
    pub fn start_tls(cert: &Path, key: &Path) -> PgServer {
        let bins = Bins::find();
        let as_postgres = running_as_root();
        let dir = tempfile::Builder::new()
            .prefix("fleetpipe-pg-")
            .tempdir()
            .unwrap_or_else(|e| panic!("create a temp dir for PostgreSQL: {e}"));
        std::fs::create_dir(dir.path().join("sock")).unwrap();
        let mut server = PgServer {
            dir,
            bins,
            as_postgres,
            port: 0,
        };
        if as_postgres {
            hand_to_postgres_user(server.dir.path());
        }
        server.initdb();
        let data = server.data();
        std::fs::copy(cert, data.join("server.crt")).unwrap();
        std::fs::copy(key, data.join("server.key")).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        conf.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(data.join("postgresql.conf"), conf).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
        )
        .unwrap();
        if as_postgres {
            hand_to_postgres_user(server.dir.path());
        }
        server.start_server();
        server.create_database(DEFAULT_DB);
        server
    }

    /// [`PgServer::start`], except that it returns `None` (and says so) when
    /// `FLEETPIPE_SKIP_PG=1` is set outside CI (`CI` is not `true`), for machines without
    /// PostgreSQL. In CI a missing PostgreSQL always fails the test.
    pub fn start_or_skip() -> Option<PgServer> {
        let skip = std::env::var("FLEETPIPE_SKIP_PG").is_ok_and(|v| v == "1");
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        if skip && !ci {
            println!("skipping: FLEETPIPE_SKIP_PG=1");
            return None;
        }
        Some(PgServer::start())
    }

    /// `postgres://postgres@127.0.0.1:PORT/fleetpipe`.
    pub fn url(&self) -> String {
        self.db_url(DEFAULT_DB)
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates another database in the same cluster and returns its URL, so tests can
    /// share one server and still not see each other's data. `name` must be a plain
    /// identifier (lowercase letters, digits, `_`).
    pub fn create_database(&self, name: &str) -> String {
        let plain = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        assert!(plain, "database name {name:?} is not a plain identifier");
        // A client program: it connects over TCP like any test would, so it can run as
        // whoever we are.
        let out = Command::new(self.bins.path("createdb"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", SUPERUSER, "--maintenance-db=postgres", name])
            .env_remove("PGPASSWORD")
            .output()
            .unwrap_or_else(|e| panic!("cannot run createdb: {e}"));
        check(&out, &format!("createdb {name}"));
        self.db_url(name)
    }

    fn db_url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// A command for a server-side program (initdb, pg_ctl), as `postgres` when root.
    fn server_command(&self, program: &str) -> Command {
        let bin = self.bins.path(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin);
            c
        } else {
            Command::new(bin)
        };
        // The server user may not be allowed into our working directory.
        cmd.current_dir(self.dir.path());
        cmd
    }

    /// How server programs are run, for error messages.
    fn via(&self) -> &'static str {
        if self.as_postgres {
            " (as root, through `runuser -u postgres`)"
        } else {
            ""
        }
    }

    fn initdb(&self) {
        let out = self
            .server_command("initdb")
            .arg("-D")
            .arg(self.data())
            .args(["-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync")
            .output()
            .unwrap_or_else(|e| panic!("cannot run initdb{}: {e}", self.via()));
        check(&out, "initdb");
    }

    fn start_server(&mut self) {
        for _ in 0..START_ATTEMPTS {
            self.port = crate::free_port();
            match self.pg_ctl_start() {
                Ok(()) => return,
                Err(log) => {
                    if !log.contains("could not bind") && !log.contains("already in use") {
                        panic!("{log}");
                    }
                }
            }
        }
        panic!("PostgreSQL could not bind a free port in {START_ATTEMPTS} attempts");
    }

    /// `pg_ctl start` on `self.port`, waiting until the server accepts connections. On
    /// failure, what pg_ctl and the server's log said.
    fn pg_ctl_start(&self) -> Result<(), String> {
        // Only this attempt's log tells why it failed.
        let _ = std::fs::remove_file(self.log());
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -F -c max_connections=200",
            self.port,
            self.dir.path().join("sock").display()
        );
        let out = self
            .server_command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.log())
            .args(["-w", "-t", "60", "-o", &options, "start"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run pg_ctl{}: {e}", self.via()));
        if out.status.success() {
            return Ok(());
        }
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        Err(format!(
            "pg_ctl start failed: {}\n{}\nserver log:\n{log}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// Stops the server (`pg_ctl stop -m fast`: open sessions are ended, their
    /// transactions rolled back), keeping its data, for a test of a database outage.
    /// [`PgServer::restart`] brings it back. Panics when pg_ctl fails.
    pub fn stop(&self) {
        let out = self
            .server_command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "fast", "-w", "-t", "60", "stop"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run pg_ctl{}: {e}", self.via()));
        check(&out, "pg_ctl stop");
    }

    /// Starts the server again after [`PgServer::stop`], on the same port and data
    /// directory, and waits until it accepts connections. Panics when it cannot start
    /// (another process took the port meanwhile, for instance).
    pub fn restart(&self) {
        if let Err(e) = self.pg_ctl_start() {
            panic!("restarting PostgreSQL on port {}: {e}", self.port);
        }
    }

    /// Runs `sql` in database `db` with `psql` (unaligned, tuples only, fields separated
    /// by a tab, stopping at the first error) and returns its output: one line per row.
    /// For checks that would take many round trips through the store's API. Panics when
    /// psql fails.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bins.path("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", SUPERUSER, "-d", db])
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-F",
                "\t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .env_remove("PGPASSWORD")
            .output()
            .unwrap_or_else(|e| panic!("cannot run psql: {e}"));
        check(&out, &format!("psql {sql:?}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.port == 0 {
            return; // never started
        }
        // Immediate: the data is thrown away, so there is nothing to flush.
        let _ = self
            .server_command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        // `dir` is removed when the field drops, now that the server is gone.
    }
}

/// Where the PostgreSQL programs live.
struct Bins {
    /// `None`: look them up on `PATH`.
    dir: Option<PathBuf>,
}

impl Bins {
    /// `$FLEETPIPE_PG_BINDIR`, else `pg_config --bindir`, else the newest
    /// `/usr/lib/postgresql/*/bin` (Debian and Ubuntu keep the server binaries there, off
    /// `PATH`), else `PATH`.
    fn find() -> Bins {
        let has_initdb = |d: &Path| d.join("initdb").is_file();
        if let Some(dir) = std::env::var_os("FLEETPIPE_PG_BINDIR") {
            return Bins {
                dir: Some(PathBuf::from(dir)),
            };
        }
        let from_pg_config = Command::new("pg_config")
            .arg("--bindir")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
            .filter(|d| has_initdb(d));
        let dir = from_pg_config.or_else(|| newest_debian_bindir().filter(|d| has_initdb(d)));
        Bins { dir }
    }

    /// The program's full path. On `PATH` when no directory was found; a program that is
    /// nowhere comes back as a path that does not exist.
    fn path(&self, program: &str) -> PathBuf {
        match &self.dir {
            Some(d) => d.join(program),
            None => std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths)
                .map(|d| d.join(program))
                .find(|p| p.is_file())
                .unwrap_or_else(|| PathBuf::from(program)),
        }
    }
}

/// The `/usr/lib/postgresql/<version>/bin` with the highest numeric version.
fn newest_debian_bindir() -> Option<PathBuf> {
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .max_by_key(|(version, _)| *version)
        .map(|(_, dir)| dir)
}

/// Whether this process runs as root, asked of `id -u` to stay free of libc.
fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Gives `dir` (and what is in it) to the `postgres` OS user, which initdb and the server
/// run as when we are root.
fn hand_to_postgres_user(dir: &Path) {
    let out = Command::new("chown")
        .args(["-R", "postgres:"])
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run chown: {e}"));
    if !out.status.success() {
        panic!(
            "running as root, PostgreSQL must run as the `postgres` user, but chown to it \
             failed (`apt-get install postgresql` creates that user): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn missing_hint(program: &str) -> String {
    format!(
        "cannot find the PostgreSQL program `{program}`. Tests need a real PostgreSQL server: \
         install it (`apt-get install postgresql`) or set FLEETPIPE_PG_BINDIR to the directory \
         holding initdb and pg_ctl (or set FLEETPIPE_SKIP_PG=1 to skip these tests outside CI)"
    )
}

fn check(out: &Output, what: &str) {
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
