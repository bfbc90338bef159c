//! sluicegate: a low-latency sidecar proxy for model servers.
//!
//! # Architecture
//!
//! ```text
//! client ─▶ proxy::server (HTTP/1.1 + h2c) ─▶ proxy::Proxy::handle ─▶ upstream model server
//!                                                  │ (one policy snapshot per request)
//!           client ◀── streamed response ◀─────────┤
//!                                                  └─▶ tee::TeeSender (bounded, never waits)
//!                                                        ─▶ spool writer thread ─▶ segments
//!                                                        ─▶ tee::kafka sender thread ─▶ Kafka
//! ```
//! # Layers
//!
//! Each module uses only modules listed before it here, bottom up (`layers_only_point_down`,
//! a test in this file, reads `src/` and fails on an edge that points up, or on a module
//! missing from the list):
//!
//! 1. [`oip`]: the Open Inference Protocol's gRPC messages and gRPC message framing;
//!    imports nothing from the crate.
//! 2. [`config`]: static settings (flags, env, file) and the policy as written: plain specs,
//!    their validation and diff.
//! 3. [`provenance`]: signed tags, the key directory, verification.
//! 4. [`testing`]: the stand-in model server that tests, benchmarks and the demo run against.
//! 5. [`decide`]: score extraction, adaptive thresholds, limit windows, exploration; the
//!    route table that carries their state across policy reloads; fleet limits' local token
//!    budgets and the Redis client that leases them (called only from a background task).
//! 6. [`tee`]: the record and alerts, the disk spool (write-ahead log), the Kafka sender, and
//!    their metrics. It reads the policy only through a per-snapshot record context.
//! 7. [`policy`]: the policy in force, compiled from its spec: routes, tag keys, the tee's
//!    record context; swapped whole on reload.
//! 8. [`telemetry`]: the metrics registry (each area registers its own), the data plane's and
//!    the policy's metrics, logging.
//! 9. [`proxy`]: the data plane; bodies stream through while [`proxy::body`] captures a copy
//!    and times out a side that goes quiet; deciding routes read the response and decide (its
//!    `decision` module); HTTP/2 goes upstream over a pool of h2c connections (`pool`).
//! 10. [`control`]: the admin port, the upstream readiness probe, policy reloads, the fleet
//!     limits' refill task.
//! 11. [`audit`]: `sluicegate audit` (records and tag verification).
//! 12. [`app`]: builds and starts all of it, owns shutdown.
//! 13. [`demo`]: the proxy in front of the stand-in model.
//! 14. [`cli`]: the command line.
//!
//! So `proxy` never imports `control`, `audit` or `app`, and `control` changes the data plane
//! only by swapping the policy snapshot.
//!
//! # Names
//!
//! What an operator writes is a `…Spec` in [`config::policy`] (`RouteSpec`, `ThresholdSpec`,
//! `LimitSpec`…); the runtime state compiled from it drops the suffix ([`decide::Route`],
//! [`decide::Threshold`], [`decide::Limit`], [`policy::Policy`]). A leaf algorithm's own
//! settings are `…Params` ([`decide::threshold::AdaptiveThresholdParams`]).
#![forbid(unsafe_code)]
// What tests, benches and the binary need is `pub`; the rest is `pub(crate)`, and this lint keeps it so.
#![warn(unreachable_pub)]

mod app;
pub mod audit;
pub mod cli;
pub mod config;
mod control;
pub mod decide;
pub mod demo;
pub mod oip;
pub mod policy;
pub mod provenance;
pub mod proxy;
pub mod tee;
pub mod telemetry;
pub mod testing;

#[cfg(test)]
mod layers;
