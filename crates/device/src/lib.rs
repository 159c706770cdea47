//! fleetpipe's device side.
//!
//! * [`simulate`] — the fleet simulator: thousands to hundreds of thousands of virtual
//!   vehicles publishing telemetry through JetStream, for demos and benchmarks.
//!
//! **Invariant:** this crate links NATS and the wire contract ([`fleetpipe_proto`]) only:
//! no storage, no HTTP, no pipeline, so it stays small enough for the edge.

#![warn(missing_docs)]

pub mod simulate;
