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
//! - [`config`]: static settings (flags, env, file); the policy, its validation and diff.
//! - [`proxy`]: the data plane; bodies stream through while [`proxy::body`] captures a copy
//!   and times out a side that goes quiet; deciding routes read the response and decide (its
//!   `decision` module); HTTP/2 goes upstream over a pool of h2c connections (`pool`).
//! - [`decide`]: score extraction, adaptive thresholds, limit windows, exploration; the
//!   compiled route table that carries their state across policy reloads.
//! - [`provenance`]: signed tags, the key directory, verification.
//! - [`tee`]: the record and alerts, the disk spool (write-ahead log), the Kafka sender.
//! - [`control`]: the admin port, the upstream readiness probe, policy reloads.
//! - [`audit`]: `sluicegate audit` (depends only on records and tag verification).
//! - [`telemetry`]: metrics and logging.
//! - [`app`]: builds and starts all of it, owns shutdown. [`demo`] runs it in front of a
//!   built-in stand-in model.
//!
//! Dependency direction: `proxy` uses `decide`, `provenance`, `config` and a tee sender; it
//! never imports `control`, `audit` or the Kafka producer. `control` changes state only by
//! swapping the policy snapshot.
#![forbid(unsafe_code)]

pub mod app;
pub mod audit;
pub mod cli;
pub mod config;
pub mod control;
pub mod decide;
pub mod demo;
pub mod policy;
pub mod provenance;
pub mod proxy;
pub mod tee;
pub mod telemetry;
pub mod testing;
