//! The checkpoint of the producer's acknowledged prefix (`DIR/acked.ckpt`).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::Path;

use super::frame::le_u32;
use super::segments::sync_dir;
use super::{NewerFormat, Position, SPOOL_FORMAT_VERSION};

/// Name of the acknowledged-position checkpoint in a spool directory.
pub const CHECKPOINT_FILE: &str = "acked.ckpt";
const CHECKPOINT_TMP: &str = "acked.ckpt.tmp";
pub(super) const CHECKPOINT_MAGIC: [u8; 3] = *b"SGA";
pub(super) const CHECKPOINT_LEN: usize = 4 + 8 + 8 + 4;
/// The checkpoint's fourth byte: `b'0'` + the format version (`b'1'`, as before versions).
pub(super) const CHECKPOINT_VERSION_BYTE: u8 = {
    assert!(SPOOL_FORMAT_VERSION <= (u8::MAX - b'0') as u32);
    b'0' + SPOOL_FORMAT_VERSION as u8
};
/// How much of a checkpoint is read: enough for a newer version's to be recognised.
const CHECKPOINT_MAX_READ: u64 = 4096;

/// The acknowledged position checkpointed in `dir`, or `None` if there is none or it is torn or
/// corrupt (then everything in the segments is sent again: never skip what may be unacked).
/// Fails with [`NewerFormat`] for a whole checkpoint of a newer version.
pub fn read_checkpoint(dir: &Path) -> io::Result<Option<Position>> {
    let path = dir.join(CHECKPOINT_FILE);
    let mut bytes = Vec::with_capacity(CHECKPOINT_LEN + 1);
    let read = File::open(&path).and_then(|f| f.take(CHECKPOINT_MAX_READ).read_to_end(&mut bytes));
    if read.is_err() || bytes.len() < 8 || bytes[..3] != CHECKPOINT_MAGIC {
        return Ok(None);
    }
    // Every version ends with the CRC of the bytes before it: whole and undamaged, or ignored.
    let (fields, crc) = bytes.split_at(bytes.len() - 4);
    if le_u32(crc) != Some(crc32fast::hash(fields)) {
        return Ok(None);
    }
    let version = match bytes[3].checked_sub(b'0') {
        Some(v) if v > 0 => u32::from(v),
        _ => return Ok(None),
    };
    if version > SPOOL_FORMAT_VERSION {
        return Err(NewerFormat { path, version }.into_io());
    }
    if bytes.len() != CHECKPOINT_LEN {
        return Ok(None);
    }
    let field = |at: usize| fields[at..at + 8].try_into().ok().map(u64::from_le_bytes);
    Ok(field(4)
        .zip(field(12))
        .map(|(segment, offset)| Position { segment, offset }))
}

/// Replaces the checkpoint atomically: a crash leaves the old one or the new one, whole.
pub(super) fn write_checkpoint(dir: &Path, pos: Position) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(CHECKPOINT_LEN);
    bytes.extend_from_slice(&CHECKPOINT_MAGIC);
    bytes.push(CHECKPOINT_VERSION_BYTE);
    bytes.extend_from_slice(&pos.segment.to_le_bytes());
    bytes.extend_from_slice(&pos.offset.to_le_bytes());
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    let tmp = dir.join(CHECKPOINT_TMP);
    let mut file = File::create(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_data()?;
    fs::rename(&tmp, dir.join(CHECKPOINT_FILE))?;
    sync_dir(dir)
}
