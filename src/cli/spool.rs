//! `sluicegate spool cat`: the spool's records on stdout, through the spool's reader.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;

use super::Failure;
use crate::tee::record::{v1, RECORD_SCHEMA};
use crate::tee::spool::{EntryKind, Position, SpoolMetrics, SpoolReader};

#[derive(Subcommand)]
pub(super) enum SpoolCommand {
    /// Print the spool's records as JSON lines (oldest first). Records that do not read as
    /// sluicegate.record.v1 are printed as stored and counted on stderr.
    Cat {
        /// The spool directory.
        dir: PathBuf,
        /// Print the dead-letter records instead.
        #[arg(long)]
        dead_letter: bool,
    },
}

pub(super) fn run(command: SpoolCommand) -> Result<(), Failure> {
    match command {
        SpoolCommand::Cat { dir, dead_letter } => Ok(cat(&dir, dead_letter)?),
    }
}

fn cat(dir: &Path, dead_letter: bool) -> anyhow::Result<()> {
    let dir = if dead_letter {
        dir.join("dead-letter")
    } else {
        dir.to_owned()
    };
    if !dir.is_dir() {
        anyhow::bail!("{} is not a spool directory", dir.display());
    }
    let metrics = SpoolMetrics::default();
    let mut reader = SpoolReader::open(&dir, metrics.clone(), false)
        .with_context(|| format!("cannot read {}", dir.display()))?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut unreadable = 0u64;
    loop {
        let batch = reader.next_batch(Position::END, 1024)?;
        if batch.is_empty() {
            break;
        }
        for e in batch {
            // Each record is read through the record type; one that does not read is still
            // printed as stored (the spool is evidence), and counted.
            if e.entry.kind == EntryKind::Record
                && serde_json::from_slice::<v1::Record>(&e.entry.payload).is_err()
            {
                unreadable += 1;
            }
            out.write_all(&e.entry.payload)?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    let corrupt = metrics.corrupt_skipped.get();
    if corrupt > 0 {
        eprintln!("sluicegate: skipped {corrupt} torn or corrupt frame(s)");
    }
    if unreadable > 0 {
        eprintln!(
            "sluicegate: {unreadable} record(s) do not read as {RECORD_SCHEMA}, printed as stored"
        );
    }
    Ok(())
}
