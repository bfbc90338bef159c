//! Write-ahead spool: the tee appends records here before they are sent to Kafka, so a killed
//! process loses nothing that reached the spool (docs/reliability.md, "Delivery guarantees").
//!
//! A [`SpoolWriter`] (on its own OS thread) appends batches of entries to segment files and
//! publishes, through a `watch` channel, the [`Position`] before which everything is whole
//! frames. A [`SpoolReader`] (the Kafka producer) tails the segments up to that position and
//! deletes a segment once every entry in it was acknowledged. Without Kafka ([`SpoolMode::Rotate`])
//! the spool is a rotating log whose oldest segment is removed when full; with Kafka
//! ([`SpoolMode::Hold`]) a full spool refuses new entries. [`DeadLetter`] sets aside entries the
//! broker will never accept, in the same format.
//!
//! # On-disk format
//!
//! - Segments are `DIR/{n:020}.seg` (20 zero-padded decimal digits), numbered from 1 upward. A
//!   writer never appends to an existing segment (its tail may be torn by a crash): it starts one
//!   numbered above the highest present. Other names in `DIR` (such as `dead-letter/`) are ignored.
//! - A segment starts with a header: magic `b"SGSV"`, the format version `u32` LE
//!   ([`SPOOL_FORMAT_VERSION`]), CRC-32 (IEEE, as computed by `crc32fast`) of those 8 bytes as
//!   `u32` LE — 12 bytes, written with the segment's first frames (an empty segment has no
//!   header yet).
//! - Then frames: magic `u32` LE `0x3153_4753` (`b"SGS1"`), body length `u32` LE, CRC-32 of the
//!   body as `u32` LE, then the body.
//! - Body: kind `u8` (0 = record, 1 = alert; other values make the frame corrupt), timestamp
//!   milliseconds `i64` LE, key length `u16` LE, key (UTF-8), route length `u16` LE, route
//!   (UTF-8), then the payload (JSON) to the end of the body.
//! - Dead letters are segments too (header and frames) in `DIR/dead-letter/{n:020}.seg`, one
//!   file per [`DeadLetter`] lifetime (created on its first append, numbered above the highest
//!   present), so a [`SpoolReader`] opened on `DIR/dead-letter` reads them. The reason is
//!   logged, not stored.
//! - The producer's acknowledged prefix is checkpointed in `DIR/acked.ckpt` (written to
//!   `DIR/acked.ckpt.tmp`, fsynced, renamed): magic `b"SGA"` followed by the format version as
//!   one byte `b'0' + version` (so `b"SGA1"`), segment `u64` LE, offset `u64` LE, CRC-32 of those
//!   20 bytes as `u32` LE. Every entry before that position was acknowledged, so a new reader
//!   starts there. A missing, torn or corrupt checkpoint is ignored (everything still in the
//!   segments is sent again). A writer numbers its segments above the checkpoint's, so a stale
//!   checkpoint can never cover entries written after it.
//!
//! A reader skips (and counts) torn or corrupt frames and resynchronises on the next magic whose
//! frame verifies, so damage never hides the frames behind it. A torn or corrupt segment header
//! is skipped and counted the same way (its frames are then read as version 1).
//!
//! # Versions: upgrades and rollbacks
//!
//! A spool on a volume outlives the build that wrote it, across a rollout and a rollback. Each
//! segment says which format it is in; the rule is:
//!
//! - A build reads every version up to its own [`SPOOL_FORMAT_VERSION`], and headerless
//!   segments: version 0, written before segments had a header (its frames are version 1's).
//!   So a new build replays an older build's spool, segment by segment, in any mix.
//! - A segment or checkpoint of a newer version is refused, never skipped as corrupt (skipping
//!   would drop its records, or for a checkpoint resend them): opening a [`SpoolWriter`], a
//!   [`SpoolReader`] or (through the writer) `sluicegate serve` fails with [`NewerFormat`],
//!   naming the file, its version and the newest this build reads. `spool cat` refuses too.
//!   Dead-letter segments carry the same header and rule; `serve` only adds new dead-letter
//!   files (its own version) and never reads old ones, so a newer one stops `spool cat
//!   --dead-letter`, not `serve`.
//! - A version's first 12 header bytes (magic, version, CRC) and the checkpoint's `b"SGA"`,
//!   version byte and trailing CRC-32 of all the bytes before it stay as they are in every
//!   version, so an older build can always tell a newer file from a damaged one.
//! - Bump [`SPOOL_FORMAT_VERSION`] with any change an older build would misread (frames, body,
//!   checkpoint). A change an older build reads correctly needs no bump.

mod checkpoint;
mod dead_letter;
mod frame;
mod handoff;
mod metrics;
mod reader;
mod segments;
#[cfg(test)]
mod tests;
mod writer;

use std::path::PathBuf;
use std::time::Duration;

pub use checkpoint::{read_checkpoint, CHECKPOINT_FILE};
pub use dead_letter::{DeadLetter, DEAD_LETTER_DIR};
pub use frame::{
    encode_frame, frame_len, segment_header, EntryKind, NewerFormat, SpoolEntry,
    SEGMENT_HEADER_LEN, SPOOL_FORMAT_VERSION,
};
pub use handoff::Handoff;
pub use metrics::SpoolMetrics;
pub use reader::SpoolReader;
pub use segments::SEGMENT_EXT;
pub use writer::SpoolWriter;

/// A place in the spool: segment number and byte offset within it. Ordered (segment, offset).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    /// Segment number (the file name).
    pub segment: u64,
    /// Byte offset within the segment.
    pub offset: u64,
}

impl Position {
    /// Reads everything present (`spool cat`).
    pub const END: Position = Position {
        segment: u64::MAX,
        offset: u64::MAX,
    };
}

/// What a full spool gives up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpoolMode {
    /// No Kafka: the oldest segment is removed when full.
    Rotate,
    /// Kafka: new entries are refused when full.
    Hold,
}

/// Spool settings.
#[derive(Clone, Debug)]
pub struct SpoolConfig {
    /// Spool directory (created if missing).
    pub dir: PathBuf,
    /// Cap on the total size of segment files.
    pub max_bytes: u64,
    /// A segment is sealed once the next entry would take it past this size.
    pub segment_bytes: u64,
    /// Longest time appended data stays in the page cache only.
    pub fsync_interval: Duration,
    /// What to do when full.
    pub mode: SpoolMode,
}

/// An entry read back, with where it sits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpooledEntry {
    /// Where the entry's frame starts; pass it to [`SpoolReader::ack`].
    pub pos: Position,
    /// The entry.
    pub entry: SpoolEntry,
}
