//! The integration tests, one binary: each module used to be a binary of its own, and each
//! linked the library and librdkafka again. Run one area with `cargo test --test it decide::`.

mod common;

mod audit;
mod config_examples;
mod decide;
mod deploy;
mod faults;
mod fuzz;
mod grpc;
mod kafka_mock;
mod kafka_tansu;
mod proxy;
mod reload;
mod tee_spool;
