//! Dead letters: entries the broker will never accept, kept in the segment format.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::segments::{create_segment, list_segments, next_number, sync_dir};
use super::{encode_frame, segment_header, SpoolEntry, SpoolMetrics, SPOOL_FORMAT_VERSION};

/// Name of the dead-letter subdirectory of a spool directory.
pub const DEAD_LETTER_DIR: &str = "dead-letter";

/// Entries the broker will never accept, set aside in `DIR/dead-letter/` in the segment format.
#[derive(Debug)]
pub struct DeadLetter {
    dir: PathBuf,
    number: u64,
    file: Option<File>,
    metrics: SpoolMetrics,
    buf: Vec<u8>,
}

impl DeadLetter {
    /// Opens the dead letters of spool directory `dir`, creating `dir/dead-letter`. The file is
    /// created on the first append, numbered above any left by earlier processes.
    pub fn open(dir: &Path, metrics: SpoolMetrics) -> io::Result<DeadLetter> {
        let dir = dir.join(DEAD_LETTER_DIR);
        fs::create_dir_all(&dir)?;
        let number = next_number(list_segments(&dir)?.last().copied())?;
        Ok(DeadLetter {
            dir,
            number,
            file: None,
            metrics,
            buf: Vec::new(),
        })
    }

    /// Appends `entry` and fsyncs (dead letters are rare and must not be lost). `reason` is
    /// logged with `tracing::warn`, not stored.
    pub fn append(&mut self, entry: &SpoolEntry, reason: &str) -> io::Result<()> {
        self.buf.clear();
        encode_frame(entry, &mut self.buf);
        if self.buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "entry cannot be framed (key or route too long)",
            ));
        }
        let file = match self.file.take() {
            Some(file) => file,
            None => {
                let file = create_segment(&self.dir, self.number)?;
                sync_dir(&self.dir)?;
                // A new file's first write brings the segment header.
                self.buf.splice(0..0, segment_header(SPOOL_FORMAT_VERSION));
                file
            }
        };
        let file = self.file.insert(file);
        file.write_all(&self.buf)?;
        file.sync_data()?;
        self.metrics.dead_lettered.inc();
        tracing::warn!(
            key = %entry.key,
            route = %entry.route,
            reason,
            "record moved to the dead-letter file"
        );
        Ok(())
    }
}
