//! fleetpipe's device side.
//!
//! * [`publish`] — the publishing core the simulator and `fleetpipe-agent` share: acked,
//!   windowed JetStream publishes, a bounded on-disk buffer replayed in order with stable
//!   `Nats-Msg-Id`s, and readings batched as line protocol at high rates.
//! * [`live`] — a device's live configuration in the KV bucket `fleetpipe_config`, shared
//!   by the agent, the CLI and the API, and the status a device reports back.
//! * [`simulate`] — the fleet simulator: thousands to hundreds of thousands of virtual
//!   vehicles publishing telemetry through JetStream, for demos and benchmarks.
//!
//! **Invariant:** this crate links NATS and the wire contract ([`fleetpipe_proto`]) only:
//! no storage, no HTTP, no pipeline, so it stays small enough for the edge.

#![warn(missing_docs)]

pub mod live;
pub mod publish;
pub mod simulate;
