//! The `sluicegate` command: parses the arguments and runs the command (`sluicegate::cli`),
//! which returns its exit code with its error.

use std::process::ExitCode;

use clap::Parser;
use sluicegate::cli::{self, Cli};

/// jemalloc, whose background thread returns freed memory to the OS a few seconds after a burst
/// (glibc's malloc kept it resident), at no cost in CPU per request (measured in
/// docs/performance.md).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    match cli::run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            failure.report();
            ExitCode::from(failure.code())
        }
    }
}
