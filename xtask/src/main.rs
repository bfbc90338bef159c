//! sluicegate's development tasks, run as `cargo xtask TASK` (the alias is in
//! .cargo/config.toml):
//!
//! - `e2e`: the end-to-end benchmark (see e2e.rs for its phases and E2E_* settings).

use std::path::{Path, PathBuf};

mod e2e;

/// The workspace root: where the scripts, the bench policy and bench-results/ are.
fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ sits in the workspace root")
}

/// `cargo build --release --bin sluicegate` (the profile `cargo bench --bench e2e` built it with),
/// and the binary's path.
fn build_sluicegate() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--release",
            "--package",
            "sluicegate",
            "--bin",
            "sluicegate",
        ])
        .current_dir(root())
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build --release failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map_or_else(|| root().join("target"), |t| root().join(t));
    target.join("release").join("sluicegate")
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("e2e") => e2e::main(),
        _ => {
            eprintln!("usage: cargo xtask e2e   (the end-to-end benchmark; E2E_* settings in xtask/src/e2e.rs)");
            std::process::exit(2);
        }
    }
}
