//! Real servers for tests, each on a free port with a temporary directory, stopped on drop.
//!
//! * [`NatsServer`] — `nats-server` with JetStream; [`NatsCluster`], several routed into a
//!   JetStream cluster.
//! * [`PgServer`] — a throwaway PostgreSQL cluster (`initdb` + `pg_ctl`).
//!
//! Tests that need PostgreSQL call [`PgServer::start_or_skip`]: it fails the test when the
//! server cannot start, except when `FLEETPIPE_SKIP_PG=1` is set (never in CI), where it
//! returns `None` and the test prints that it skipped.

mod nats;
mod postgres;

pub use nats::{nats_server_bin, NatsCluster, NatsServer};
pub use postgres::PgServer;

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    try_free_port().expect("bind an ephemeral port on 127.0.0.1")
}

/// [`free_port`] for callers that report the failure rather than panic (`fleetpipe bench`).
pub fn try_free_port() -> std::io::Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
}
