//! `sluicegate tag verify` and `sluicegate tag keygen`.

use std::path::{Path, PathBuf};

use clap::builder::PossibleValue;
use clap::Subcommand;

use super::{Exit, Failure};
use crate::provenance::{self, Algorithm, KeyRing};

#[derive(Subcommand)]
pub(super) enum TagCommand {
    /// Decode and verify a tag: prints it, or why it is invalid (exit 1).
    Verify {
        /// The `sluicegate-tag` value.
        token: String,
        /// The key directory (public keys suffice for Ed25519 tags).
        #[arg(long, env = "SLUICEGATE_TAG_KEYS_DIR")]
        keys: PathBuf,
    },
    /// Write a new key into a key directory.
    Keygen {
        /// The key id (also the file name).
        #[arg(long)]
        id: String,
        /// `ed25519` or `hmac-sha256`.
        #[arg(
            long,
            default_value = "ed25519",
            ignore_case = true,
            hide_possible_values = true
        )]
        algorithm: Algorithm,
        /// The key directory.
        #[arg(long)]
        dir: PathBuf,
    },
}

/// `--algorithm`'s values: the names `Algorithm::from_str` reads (`hs256` as an alias).
impl clap::ValueEnum for Algorithm {
    fn value_variants<'a>() -> &'a [Self] {
        &[Algorithm::Ed25519, Algorithm::HmacSha256]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            Algorithm::Ed25519 => PossibleValue::new("ed25519"),
            Algorithm::HmacSha256 => PossibleValue::new("hmac-sha256").alias("hs256"),
        })
    }
}

pub(super) fn run(command: TagCommand) -> Result<(), Failure> {
    match command {
        TagCommand::Verify { token, keys } => verify(token.trim(), &keys),
        TagCommand::Keygen { id, algorithm, dir } => {
            let paths = provenance::generate_key(&dir, &id, algorithm)
                .map_err(|e| Failure::new(Exit::Failure, e))?;
            for p in paths {
                println!("wrote {}", p.display());
            }
            Ok(())
        }
    }
}

/// Prints the tag's claims, or why it is invalid (exit 1) and what it claims.
fn verify(token: &str, keys: &Path) -> Result<(), Failure> {
    let pretty = |claims| serde_json::to_string_pretty(&claims).expect("claims serialize");
    match load_keys(keys)?.verify(token) {
        Ok(claims) => {
            println!("valid");
            println!("{}", pretty(claims));
            Ok(())
        }
        Err(e) => {
            println!("invalid ({}): {e}", e.kind());
            if let Ok(claims) = provenance::decode_unverified(token) {
                println!("it claims (unverified):");
                println!("{}", pretty(claims));
            }
            Err(Failure::silent(Exit::Failure))
        }
    }
}

/// The key directory, or every problem with it (exit 64).
pub(super) fn load_keys(dir: &Path) -> Result<KeyRing, Failure> {
    KeyRing::load_dir(dir).map_err(|errors| {
        let lines = errors.iter().map(|e| format!("sluicegate: {e}")).collect();
        Failure::lines(Exit::Usage, lines)
    })
}
