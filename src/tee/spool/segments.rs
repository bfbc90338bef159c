//! Segment files in a spool directory: their names, listing, creation.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::frame::{segment_start, SegmentStart, SEGMENT_HEADER_LEN};
use super::NewerFormat;

/// File extension of segment files.
pub const SEGMENT_EXT: &str = "seg";

const SEGMENT_NAME_DIGITS: usize = 20;

/// Refuses (with [`NewerFormat`]) if one of `segments` in `dir` was written by a newer build.
/// Only their first bytes are read.
pub(super) fn check_segment_versions(dir: &Path, segments: &[u64]) -> io::Result<()> {
    let mut head = Vec::with_capacity(SEGMENT_HEADER_LEN);
    for &number in segments {
        let path = segment_path(dir, number);
        head.clear();
        match File::open(&path) {
            Ok(file) => file
                .take(SEGMENT_HEADER_LEN as u64)
                .read_to_end(&mut head)?,
            // Deleted between listing and looking.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if let SegmentStart::Newer(version) = segment_start(&head, false) {
            return Err(NewerFormat { path, version }.into_io());
        }
    }
    Ok(())
}

pub(super) fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:020}.{SEGMENT_EXT}"))
}

fn segment_number(name: &OsStr) -> Option<u64> {
    let stem = name
        .to_str()?
        .strip_suffix(SEGMENT_EXT)?
        .strip_suffix('.')?;
    if stem.len() != SEGMENT_NAME_DIGITS || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// Numbers of the segment files in `dir`, ascending.
pub(super) fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut numbers = Vec::new();
    for dirent in fs::read_dir(dir)? {
        let dirent = dirent?;
        let Some(number) = segment_number(&dirent.file_name()) else {
            continue;
        };
        match dirent.file_type() {
            Ok(t) if t.is_file() => numbers.push(number),
            Ok(_) => {}
            // Deleted between listing and looking.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// Segments in `dir` with their sizes, ascending.
pub(super) fn list_segments_with_sizes(dir: &Path) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for number in list_segments(dir)? {
        match fs::metadata(segment_path(dir, number)) {
            Ok(m) => out.push((number, m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

pub(super) fn next_number(existing: Option<u64>) -> io::Result<u64> {
    existing
        .map_or(Some(1), |n| n.checked_add(1))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "segment numbers exhausted"))
}

pub(super) fn create_segment(dir: &Path, number: u64) -> io::Result<File> {
    // create_new: never append to a file someone else (an earlier process) wrote.
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(segment_path(dir, number))
}

/// Makes new directory entries durable, not just the data in them.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
