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
//! - [`config`]: static settings (flags, env, file) and the hot policy snapshot.
//! - [`proxy`]: the data plane; bodies stream through while [`proxy::body`] captures a copy.
//! - [`tee`]: the record, the disk spool (write-ahead log), the Kafka sender.
//! - [`control`]: the admin port and the upstream readiness probe.
//! - [`telemetry`]: metrics and logging.
//! - [`app`]: builds and starts all of it, owns shutdown. [`demo`] runs it in front of a
//!   built-in stand-in model.
#![forbid(unsafe_code)]

pub mod app;
pub mod audit;
pub mod config;
pub mod control;
pub mod decide;
pub mod demo;
pub mod provenance;
pub mod proxy;
pub mod tee;
pub mod telemetry;
