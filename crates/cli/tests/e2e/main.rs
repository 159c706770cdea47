//! End-to-end tests: the real `fleetpipe` binary against a real nats-server and a real
//! store (embedded SQLite, and PostgreSQL started by the test). One test binary for the
//! crate keeps link times down.

mod aggregator;
mod api_auth;
mod bad_input;
mod bench;
mod browser;
mod clients;
mod device_config;
mod exactly_once;
mod fault;
mod hardening;
mod secure;
mod serve;
mod support;
