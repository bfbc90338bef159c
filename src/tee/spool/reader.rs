//! The reader: tails the segments, resynchronises past damage, books acknowledgements.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use prometheus_client::metrics::counter::Counter;

use super::checkpoint::{read_checkpoint, write_checkpoint};
use super::frame::{
    decode_body, le_u32, segment_start, SegmentStart, HEADER_LEN, MAGIC, MIN_BODY_LEN,
};
use super::metrics::gauge_value;
use super::segments::{check_segment_versions, list_segments, segment_path};
use super::{
    frame_len, NewerFormat, Position, SpoolEntry, SpoolMetrics, SpooledEntry, SEGMENT_HEADER_LEN,
};

/// Reader buffer granularity; also how far a resync scan looks at a time.
const READ_CHUNK: usize = 64 * 1024;

/// An open segment being read, with a read-ahead buffer that lets a resync look forward.
#[derive(Debug)]
struct SegmentCursor {
    number: u64,
    file: File,
    /// Bytes of the file from `buf_at`; the file's read position is always at their end.
    buf: Vec<u8>,
    buf_at: u64,
    /// Where the next frame starts.
    pos: u64,
    /// The segment's start (its header, if any) was read and `pos` is past it.
    started: bool,
}

impl SegmentCursor {
    fn new(number: u64, file: File) -> Self {
        SegmentCursor {
            number,
            file,
            buf: Vec::new(),
            buf_at: 0,
            pos: 0,
            started: false,
        }
    }

    /// Forgets what was read ahead, so the next read comes from the file.
    fn reread(&mut self) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(0))?;
        self.buf.clear();
        self.buf_at = 0;
        Ok(())
    }

    /// Up to `len` bytes of the file from `start`, fewer at end of file or at `cap`. Never
    /// buffers bytes at or past `cap`: in the active segment they may be half-written.
    fn window(&mut self, start: u64, len: usize, cap: u64) -> io::Result<&[u8]> {
        let end = start.saturating_add(len as u64).min(cap);
        if start >= end {
            return Ok(&[]);
        }
        let buf_end = self.buf_at + self.buf.len() as u64;
        if start < self.buf_at || start > buf_end {
            self.file.seek(SeekFrom::Start(start))?;
            self.buf.clear();
            self.buf_at = start;
        } else {
            let consumed = (start - self.buf_at) as usize;
            if consumed >= READ_CHUNK || consumed == self.buf.len() {
                self.buf.drain(..consumed);
                self.buf_at = start;
                if self.buf.capacity() > 4 * READ_CHUNK && self.buf.len() < READ_CHUNK {
                    // Give back the memory of one huge frame.
                    self.buf.shrink_to(2 * READ_CHUNK);
                }
            }
        }
        let buf_end = self.buf_at + self.buf.len() as u64;
        if buf_end < end {
            let target = end.max(buf_end.saturating_add(READ_CHUNK as u64)).min(cap);
            let mut filled = self.buf.len();
            self.buf.resize(filled + (target - buf_end) as usize, 0);
            while filled < self.buf.len() {
                match self.file.read(&mut self.buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        self.buf.truncate(filled);
                        return Err(e);
                    }
                }
            }
            self.buf.truncate(filled);
        }
        let from = (start - self.buf_at) as usize;
        let to = ((end - self.buf_at) as usize).min(self.buf.len());
        Ok(self.buf.get(from..to).unwrap_or(&[]))
    }

    /// The frame at `at` if it is whole before `limit` and verifies: (entry, frame length).
    fn frame_at(&mut self, at: u64, limit: u64) -> io::Result<Option<(SpoolEntry, u64)>> {
        let header = self.window(at, HEADER_LEN, limit)?;
        if header.len() < HEADER_LEN || header[..4] != MAGIC {
            return Ok(None);
        }
        let (Some(body_len), Some(crc)) = (le_u32(&header[4..]), le_u32(&header[8..])) else {
            return Ok(None);
        };
        let frame_len = HEADER_LEN as u64 + u64::from(body_len);
        let Ok(frame_usize) = usize::try_from(frame_len) else {
            return Ok(None);
        };
        // Checked before reading so a corrupt length never makes us buffer past the limit.
        if (body_len as usize) < MIN_BODY_LEN || limit.saturating_sub(at) < frame_len {
            return Ok(None);
        }
        let frame = self.window(at, frame_usize, limit)?;
        if frame.len() < frame_usize {
            return Ok(None);
        }
        let body = &frame[HEADER_LEN..];
        if crc32fast::hash(body) != crc {
            return Ok(None);
        }
        Ok(decode_body(body).map(|entry| (entry, frame_len)))
    }

    /// Finds the first frame at or after `from` that verifies: (offset, entry, frame length).
    fn resync(&mut self, from: u64, limit: u64) -> io::Result<Option<(u64, SpoolEntry, u64)>> {
        let mut at = from;
        while limit.saturating_sub(at) >= HEADER_LEN as u64 {
            let chunk = self.window(at, READ_CHUNK, limit)?;
            if chunk.len() < MAGIC.len() {
                break;
            }
            match chunk.windows(MAGIC.len()).position(|w| w == MAGIC) {
                Some(i) => {
                    let candidate = at + i as u64;
                    if let Some((entry, len)) = self.frame_at(candidate, limit)? {
                        return Ok(Some((candidate, entry, len)));
                    }
                    at = candidate + 1;
                }
                // Overlap so a magic split across chunks is still seen.
                None => at += (chunk.len() - (MAGIC.len() - 1)) as u64,
            }
        }
        Ok(None)
    }

    /// Reads frames before `limit` into `out` until it holds `max` entries.
    fn read_frames(
        &mut self,
        limit: u64,
        max: usize,
        out: &mut Vec<SpooledEntry>,
        corrupt: &Counter,
    ) -> io::Result<()> {
        while out.len() < max && self.pos < limit {
            let at = self.pos;
            let found = match self.frame_at(at, limit)? {
                Some((entry, len)) => Some((at, entry, len)),
                None => {
                    let found = self.resync(at + 1, limit)?;
                    let skipped_to = found.as_ref().map_or(limit, |&(next, _, _)| next);
                    corrupt.inc();
                    tracing::warn!(
                        segment = self.number,
                        offset = at,
                        skipped = skipped_to - at,
                        "skipped torn or corrupt spool bytes"
                    );
                    found
                }
            };
            match found {
                Some((at, entry, len)) => {
                    out.push(SpooledEntry {
                        pos: Position {
                            segment: self.number,
                            offset: at,
                        },
                        entry,
                    });
                    self.pos = at + len;
                }
                None => self.pos = limit,
            }
        }
        Ok(())
    }
}

/// Acknowledgement state of one segment (producer reader only).
#[derive(Debug, Default)]
struct SegmentAcks {
    /// Offsets of entries handed out and not yet acknowledged (ordered: the lowest bounds the
    /// acknowledged prefix).
    unacked: BTreeSet<u64>,
    /// The reader read past the end of the sealed segment: nothing more will come from it.
    passed: bool,
}

/// Tails the spool segments (the Kafka producer, and `spool cat`).
#[derive(Debug)]
pub struct SpoolReader {
    dir: PathBuf,
    metrics: SpoolMetrics,
    delete_acked: bool,
    /// Lowest segment number that may still hold unread entries.
    next_segment: u64,
    current: Option<SegmentCursor>,
    acks: BTreeMap<u64, SegmentAcks>,
    /// Producer only: the checkpoint read at open, until the reader reaches its segment.
    resume: Option<Position>,
    /// The position last checkpointed.
    checkpointed: Option<Position>,
}

impl SpoolReader {
    /// Starts at the oldest segment in `dir`. `delete_acked`: true for the producer (deletes
    /// fully acknowledged segments, and starts at the checkpointed position, deleting the
    /// segments below it), false for `spool cat` (reads everything on disk). Open the writer
    /// first: its scan sets the gauges this reader lowers. Never combine `delete_acked` with a
    /// Rotate-mode writer (both would delete and account for the same segments). Fails with
    /// [`NewerFormat`] if a segment (or, for the producer, the checkpoint) is of a newer format
    /// version than this build's.
    pub fn open(dir: &Path, metrics: SpoolMetrics, delete_acked: bool) -> io::Result<SpoolReader> {
        if !fs::metadata(dir)?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not a directory", dir.display()),
            ));
        }
        check_segment_versions(dir, &list_segments(dir)?)?;
        let resume = if delete_acked {
            read_checkpoint(dir)?
        } else {
            None
        };
        Ok(SpoolReader {
            dir: dir.to_path_buf(),
            metrics,
            delete_acked,
            next_segment: 0,
            current: None,
            acks: BTreeMap::new(),
            resume,
            checkpointed: resume,
        })
    }

    /// Everything before this position was acknowledged: the lowest entry handed out and not
    /// acknowledged, else where reading stopped. `None` before anything was read. Acks arrive in
    /// any order; only the contiguous prefix counts.
    pub fn acked_prefix(&self) -> Option<Position> {
        let unacked = self.acks.iter().find_map(|(&segment, a)| {
            a.unacked
                .first()
                .map(|&offset| Position { segment, offset })
        });
        let read = match &self.current {
            Some(c) => Position {
                segment: c.number,
                offset: c.pos,
            },
            None if self.next_segment == 0 => return unacked.or(self.checkpointed),
            None => Position {
                segment: self.next_segment,
                offset: 0,
            },
        };
        Some(unacked.map_or(read, |u| u.min(read)))
    }

    /// Writes the acknowledged prefix to the checkpoint file if it moved (producer only): a
    /// restart resumes there instead of resending what Kafka already has.
    pub fn checkpoint(&mut self) -> io::Result<()> {
        if !self.delete_acked {
            return Ok(());
        }
        let Some(pos) = self.acked_prefix() else {
            return Ok(());
        };
        if self.checkpointed == Some(pos) {
            return Ok(());
        }
        write_checkpoint(&self.dir, pos)?;
        self.checkpointed = Some(pos);
        Ok(())
    }

    /// Reads up to `max` entries strictly before `upto`. Segments numbered below `upto.segment`
    /// are sealed and read to their end; segment `upto.segment` is read up to `upto.offset`.
    /// Returns an empty vec when nothing new is there. Torn or corrupt frames are skipped and
    /// counted (the reader resyncs on the next frame that verifies); segments that disappeared
    /// are skipped. Pass [`Position::END`] to read everything (`spool cat`); a torn tail at the
    /// end of the newest segment (a writer mid-write) is then skipped and counted. A segment of
    /// a newer format version stops the reader there: [`NewerFormat`] once the entries before
    /// it were returned, and on every call after.
    ///
    /// The reader never goes back: an entry whose delivery failed must be kept by the caller,
    /// or re-read by opening a new reader (which starts again at the oldest segment).
    pub fn next_batch(&mut self, upto: Position, max: usize) -> io::Result<Vec<SpooledEntry>> {
        let mut out = Vec::new();
        while out.len() < max {
            if self.current.is_none() && !self.open_next(upto.segment)? {
                break;
            }
            let Some(cursor) = self.current.as_mut() else {
                break;
            };
            if cursor.number > upto.segment {
                // Opened under a later `upto` (a caller mixing positions): nothing is due yet.
                break;
            }
            let sealed = cursor.number < upto.segment;
            let file_len = cursor.file.metadata()?.len();
            let limit = if sealed {
                file_len
            } else {
                upto.offset.min(file_len)
            };
            if !cursor.started {
                let head = cursor.window(0, SEGMENT_HEADER_LEN, limit)?;
                match segment_start(head, sealed) {
                    // The writer has published nothing in it yet.
                    SegmentStart::Unknown => break,
                    SegmentStart::Newer(version) => {
                        // The reader stays here: every later call reads the header again and
                        // fails the same way until the file changes. Nothing is skipped.
                        cursor.reread()?;
                        if out.is_empty() {
                            let path = segment_path(&self.dir, cursor.number);
                            return Err(NewerFormat { path, version }.into_io());
                        }
                        break;
                    }
                    SegmentStart::Frames { data, .. } => {
                        // A checkpoint may have put `pos` further on already.
                        cursor.pos = cursor.pos.max(data);
                        cursor.started = true;
                    }
                }
            }
            let before = out.len();
            cursor.read_frames(limit, max, &mut out, &self.metrics.corrupt_skipped)?;
            let number = cursor.number;
            let finished = cursor.pos >= limit;
            if self.delete_acked {
                for e in &out[before..] {
                    self.acks
                        .entry(number)
                        .or_default()
                        .unacked
                        .insert(e.pos.offset);
                }
            }
            if !(sealed && finished) {
                break;
            }
            self.current = None;
            self.next_segment = number.saturating_add(1);
            if self.delete_acked {
                self.acks.entry(number).or_default().passed = true;
                self.delete_if_done(number)?;
            }
        }
        Ok(out)
    }

    /// Where the next entry would be read from: everything before it was read (or skipped).
    pub fn read_position(&self) -> Position {
        match &self.current {
            Some(c) => Position {
                segment: c.number,
                offset: c.pos,
            },
            None => Position {
                segment: self.next_segment,
                offset: 0,
            },
        }
    }

    /// Books `e`, known to be in the spool (from the writer's [`Handoff`](super::Handoff)), as
    /// read, if it is exactly the next frame this reader would read from disk; the reader then
    /// goes on after it, as if it had read it. A reader that has not started the entry's segment
    /// yet reads from disk (that is where segments are opened and passed).
    pub fn accept(&mut self, e: &SpooledEntry) -> bool {
        let Some(c) = self.current.as_mut() else {
            return false;
        };
        let Some(len) = frame_len(&e.entry) else {
            return false;
        };
        if !c.started || c.number != e.pos.segment || c.pos != e.pos.offset {
            return false;
        }
        c.pos += len as u64;
        if self.delete_acked {
            self.acks
                .entry(c.number)
                .or_default()
                .unacked
                .insert(e.pos.offset);
        }
        true
    }

    /// Opens the lowest segment at or after `next_segment`, if it is at most `upto_segment`.
    fn open_next(&mut self, upto_segment: u64) -> io::Result<bool> {
        loop {
            let next = self.next_segment;
            let Some(number) = list_segments(&self.dir)?.into_iter().find(|&n| n >= next) else {
                return Ok(false);
            };
            if number > upto_segment {
                return Ok(false);
            }
            let resume = self.resume.filter(|r| number <= r.segment);
            if resume.is_some_and(|r| number < r.segment) {
                // Below the checkpoint: every entry in it was acknowledged by an earlier process.
                self.acks.entry(number).or_default().passed = true;
                self.delete_if_done(number)?;
                self.next_segment = number.saturating_add(1);
                continue;
            }
            self.resume = None;
            match File::open(segment_path(&self.dir, number)) {
                Ok(file) => {
                    let mut cursor = SegmentCursor::new(number, file);
                    if let Some(r) = resume {
                        // A checkpoint past the end of the file is not to be trusted: read it all.
                        if r.offset <= cursor.file.metadata()?.len() {
                            cursor.pos = r.offset;
                        }
                    }
                    self.current = Some(cursor);
                    self.next_segment = number;
                    return Ok(true);
                }
                // Rotated away between listing and opening.
                Err(e) if e.kind() == io::ErrorKind::NotFound => match number.checked_add(1) {
                    Some(n) => self.next_segment = n,
                    None => return Ok(false),
                },
                Err(e) => return Err(e),
            }
        }
    }

    /// Marks an entry acknowledged (delivered or dead-lettered). When every entry read from a
    /// sealed segment is acknowledged and the reader has passed its end, the segment file is
    /// deleted and the gauges updated. Acks may arrive in any order; repeated or unknown
    /// positions are ignored.
    pub fn ack(&mut self, pos: Position) -> io::Result<()> {
        if let Some(acks) = self.acks.get_mut(&pos.segment) {
            acks.unacked.remove(&pos.offset);
        }
        self.delete_if_done(pos.segment)
    }

    fn delete_if_done(&mut self, number: u64) -> io::Result<()> {
        let done = matches!(
            self.acks.get(&number),
            Some(a) if a.passed && a.unacked.is_empty()
        );
        if !done || !self.delete_acked {
            return Ok(());
        }
        self.acks.remove(&number);
        let path = segment_path(&self.dir, number);
        let size = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        match fs::remove_file(&path) {
            Ok(()) => {
                self.metrics.bytes.dec_by(gauge_value(size));
                self.metrics.segments.dec();
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}
