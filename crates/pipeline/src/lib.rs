//! fleetpipe's server side: the JetStream objects ([`broker`]), the managed nats-server
//! ([`nats_server`]), the collectors ([`collector`]), the snapshot aggregator
//! ([`aggregator`]), configuration ([`config`]) and the counters they share ([`stats`]).

pub mod aggregator;
pub mod broker;
pub mod collector;
pub mod config;
pub mod inspect;
pub mod nats_server;
pub mod security;
pub mod state;
pub mod stats;

pub use config::Config;
pub use stats::{Stats, StatsSnapshot};
