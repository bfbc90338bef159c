//! The writer: appends batches to segment files on its own OS thread.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::checkpoint::read_checkpoint;
use super::metrics::gauge_value;
use super::segments::{
    check_segment_versions, create_segment, list_segments_with_sizes, next_number, segment_path,
    sync_dir,
};
use super::{
    encode_frame, frame_len, segment_header, Handoff, Position, SpoolConfig, SpoolEntry,
    SpoolMetrics, SpoolMode, SpooledEntry, SEGMENT_HEADER_LEN, SPOOL_FORMAT_VERSION,
};

/// Capacity the writer's frame buffer keeps once the queue is idle: under load it keeps what a
/// batch needed (no allocation per batch), but a burst's batches (up to several MiB) are not
/// held for good.
pub(super) const IDLE_BUF_CAPACITY: usize = 256 * 1024;
/// A full spool refuses entries on every batch: warn about it at most this often.
const DROP_WARN_INTERVAL: Duration = Duration::from_secs(10);
/// After a disk error the writer drops entries (counted) for this long before it tries the disk
/// again; the wait doubles with each failure up to `DISK_RETRY_MAX`. A full or failing disk then
/// costs a few writes and no new file per batch, and the request path never waits for it.
const DISK_RETRY_MIN: Duration = Duration::from_millis(100);
pub(super) const DISK_RETRY_MAX: Duration = Duration::from_secs(5);
/// Disk errors are logged at most this often, with the counts since the last line.
const DISK_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The writer's file operations that fail when the disk does: the real disk, or in tests one
/// that fails like a full or broken one.
pub(super) trait SegmentIo: Send + fmt::Debug {
    fn write_all(&mut self, file: &mut File, buf: &[u8]) -> io::Result<()>;
    fn sync_data(&mut self, file: &File) -> io::Result<()>;
}

#[derive(Debug)]
struct DiskIo;

impl SegmentIo for DiskIo {
    fn write_all(&mut self, file: &mut File, buf: &[u8]) -> io::Result<()> {
        file.write_all(buf)
    }

    fn sync_data(&mut self, file: &File) -> io::Result<()> {
        file.sync_data()
    }
}

/// The writer is backing off after disk errors.
#[derive(Debug)]
struct DiskTrouble {
    /// Entries are dropped without touching the disk until then.
    retry_at: Instant,
    delay: Duration,
    last_error: Instant,
}

/// Disk errors and the entries they cost since the last log line.
#[derive(Debug, Default)]
struct DiskErrorLog {
    last: Option<Instant>,
    errors: u64,
    dropped: u64,
}

/// Appends to the spool; lives on its own OS thread (all calls block on disk).
#[derive(Debug)]
pub struct SpoolWriter {
    config: SpoolConfig,
    metrics: SpoolMetrics,
    io: Box<dyn SegmentIo>,
    tx: watch::Sender<Position>,
    first_segment: u64,
    segment: u64,
    file: File,
    /// End of the last whole frame written to the current segment (what gets published).
    offset: u64,
    /// Bytes actually in the current file: past `offset` only after a failed write.
    file_len: u64,
    /// A write failed mid-frame and its torn tail could not be cut off: the next append starts
    /// a new segment.
    broken: bool,
    pub(super) buf: Vec<u8>,
    buf_entries: usize,
    /// Where each frame in `buf` starts: (index in the batch, position). Moved to `placed` once
    /// the frames are written.
    buf_placed: Vec<(usize, Position)>,
    /// The entries of the current batch that were written, and where.
    placed: Vec<(usize, Position)>,
    /// Written entries go to the Kafka sender through here too (see [`Handoff`]).
    handoff: Option<Handoff>,
    /// Sealed segments (number, file) with data not yet fsynced.
    unsynced: Vec<(u64, File)>,
    dirty: bool,
    dir_dirty: bool,
    last_sync: Instant,
    /// Rotate mode only: sealed segments (number, size), oldest first, and their total size.
    sealed: VecDeque<(u64, u64)>,
    sealed_bytes: u64,
    last_drop_warn: Option<Instant>,
    trouble: Option<DiskTrouble>,
    error_log: DiskErrorLog,
}

impl SpoolWriter {
    /// Creates the directory if needed, scans existing segments (to set the bytes/segments
    /// gauges), starts a fresh segment. Returns the writer and a watch receiver of the writer's
    /// position: everything strictly before it is complete, whole frames. Fails with
    /// [`NewerFormat`](super::NewerFormat), before writing anything, if a segment or the
    /// checkpoint is of a newer format version than this build's.
    pub fn open(
        config: SpoolConfig,
        metrics: SpoolMetrics,
    ) -> io::Result<(SpoolWriter, watch::Receiver<Position>)> {
        Self::open_with(config, metrics, Box::new(DiskIo))
    }

    pub(super) fn open_with(
        config: SpoolConfig,
        metrics: SpoolMetrics,
        io: Box<dyn SegmentIo>,
    ) -> io::Result<(SpoolWriter, watch::Receiver<Position>)> {
        fs::create_dir_all(&config.dir)?;
        let existing = list_segments_with_sizes(&config.dir)?;
        // Before anything is written: a newer build's spool is left exactly as it is.
        let numbers: Vec<u64> = existing.iter().map(|&(n, _)| n).collect();
        check_segment_versions(&config.dir, &numbers)?;
        // Above the checkpoint too: a reader skips what lies below it.
        let highest = numbers
            .last()
            .copied()
            .max(read_checkpoint(&config.dir)?.map(|p| p.segment));
        let first = next_number(highest)?;
        let file = create_segment(&config.dir, first)?;
        let total: u64 = existing.iter().map(|&(_, size)| size).sum();
        metrics.bytes.set(gauge_value(total));
        metrics.segments.set(gauge_value(existing.len() as u64 + 1));
        let (sealed, sealed_bytes) = match config.mode {
            SpoolMode::Rotate => (VecDeque::from(existing), total),
            SpoolMode::Hold => (VecDeque::new(), 0),
        };
        let (tx, rx) = watch::channel(Position {
            segment: first,
            offset: 0,
        });
        let writer = SpoolWriter {
            config,
            metrics,
            io,
            tx,
            first_segment: first,
            segment: first,
            file,
            offset: 0,
            file_len: 0,
            broken: false,
            buf: Vec::new(),
            buf_entries: 0,
            buf_placed: Vec::new(),
            placed: Vec::new(),
            handoff: None,
            unsynced: Vec::new(),
            dirty: false,
            dir_dirty: true,
            last_sync: Instant::now(),
            sealed,
            sealed_bytes,
            last_drop_warn: None,
            trouble: None,
            error_log: DiskErrorLog::default(),
        };
        Ok((writer, rx))
    }

    /// The first segment number this writer wrote: entries in lower segments were written by an
    /// earlier process (replay).
    pub fn first_segment(&self) -> u64 {
        self.first_segment
    }

    /// Appends a batch with one write per segment touched (page cache, no fsync), rolls to a new
    /// segment when the next entry would take the current one past `segment_bytes`, enforces
    /// `max_bytes` per mode, then publishes the new position. Returns how many were written; the
    /// rest were dropped and counted in `dropped_full` (spool full in Hold mode, an entry larger
    /// than `max_bytes`, or a key/route over `u16::MAX` bytes). Entries are judged one by one:
    /// after one is refused, a smaller one may still fit.
    ///
    /// On an I/O error the entries already written stay published (and will be read); the
    /// others are lost, counted in `dropped_error` and logged at a limited rate. The torn tail of
    /// the failed write is cut off so the segment is appended to again (a new segment only if
    /// that fails), and for a growing delay after each error batches are dropped and counted
    /// without touching the disk, returning an error.
    pub fn append_batch(&mut self, entries: &[SpoolEntry]) -> io::Result<usize> {
        let result = self.write_batch(entries);
        self.publish();
        result
    }

    /// [`Self::append_batch`] that takes the entries (leaving `entries` empty) and, with a
    /// [`Handoff`] set, offers the written ones to it before publishing the new position, so
    /// a sender woken by the position finds them there.
    pub fn append_owned(&mut self, entries: &mut Vec<SpoolEntry>) -> io::Result<usize> {
        let result = self.write_batch(entries);
        if let Some(handoff) = &self.handoff {
            let mut placed = self.placed.iter().peekable();
            let written = entries.drain(..).enumerate().filter_map(|(i, entry)| {
                let &(_, pos) = placed.next_if(|&&(at, _)| at == i)?;
                Some(SpooledEntry { pos, entry })
            });
            handoff.offer(written);
        }
        entries.clear();
        self.publish();
        result
    }

    /// The queue is idle: gives back the frame buffer's capacity past [`IDLE_BUF_CAPACITY`].
    pub fn release_idle_buffers(&mut self) {
        self.buf.shrink_to(IDLE_BUF_CAPACITY);
    }

    /// Offers every entry written from now on to `handoff` (see [`Self::append_owned`]).
    pub fn set_handoff(&mut self, handoff: Handoff) {
        self.handoff = Some(handoff);
    }

    /// Publishes the position after the last whole frame written.
    fn publish(&mut self) {
        let pos = Position {
            segment: self.segment,
            offset: self.offset,
        };
        self.tx.send_if_modified(|p| {
            let changed = *p != pos;
            *p = pos;
            changed
        });
    }

    /// Writes a batch (see [`Self::append_batch`]) and notes in `placed` where each written
    /// entry went; publishes nothing.
    fn write_batch(&mut self, entries: &[SpoolEntry]) -> io::Result<usize> {
        self.placed.clear();
        self.buf_placed.clear();
        if self
            .trouble
            .as_ref()
            .is_some_and(|t| Instant::now() < t.retry_at)
        {
            self.lost(entries.len());
            return Err(io::Error::other(
                "spool disk error: writes paused, entries dropped",
            ));
        }
        let mut written = 0;
        let mut dropped = 0;
        let result = self.append_inner(entries, &mut written, &mut dropped);
        self.metrics.spooled.inc_by(written as u64);
        if dropped > 0 {
            self.metrics.dropped_full.inc_by(dropped as u64);
            if self
                .last_drop_warn
                .is_none_or(|t| t.elapsed() >= DROP_WARN_INTERVAL)
            {
                self.last_drop_warn = Some(Instant::now());
                tracing::warn!(
                    dropped,
                    total_dropped = self.metrics.dropped_full.get(),
                    mode = ?self.config.mode,
                    "spool full or entries too large; entries dropped"
                );
            }
        }
        match result {
            Ok(()) => {
                self.recovered();
                Ok(written)
            }
            Err(e) => {
                self.disk_error("write", &e, entries.len() - written - dropped);
                Err(e)
            }
        }
    }

    /// Counts entries lost to the disk.
    fn lost(&mut self, entries: usize) {
        self.metrics.dropped_error.inc_by(entries as u64);
        self.error_log.dropped += entries as u64;
    }

    /// Books a failed write or fsync: counted, the writes paused for a growing delay, logged at
    /// most every `DISK_ERROR_LOG_INTERVAL` with the counts since the last line.
    fn disk_error(&mut self, op: &'static str, e: &io::Error, lost: usize) {
        self.metrics.write_errors.inc();
        self.metrics.disk_error.set(1);
        self.lost(lost);
        let delay = self
            .trouble
            .as_ref()
            .map_or(DISK_RETRY_MIN, |t| (t.delay * 2).min(DISK_RETRY_MAX));
        let now = Instant::now();
        self.trouble = Some(DiskTrouble {
            retry_at: now + delay,
            delay,
            last_error: now,
        });
        let log = &mut self.error_log;
        log.errors += 1;
        if log
            .last
            .is_none_or(|t| t.elapsed() >= DISK_ERROR_LOG_INTERVAL)
        {
            tracing::error!(
                op,
                error = %e,
                errors = log.errors,
                dropped = log.dropped,
                retry_in = ?delay,
                "spool disk error: records dropped until the disk takes writes again"
            );
            log.last = Some(Instant::now());
            log.errors = 0;
            log.dropped = 0;
        }
    }

    /// A write succeeded. A nearly full disk fails and succeeds by turns, so the back-off (and
    /// its growing delay) ends only once no error came for `DISK_RETRY_MAX`; then it says so,
    /// with what the errors cost since the last line.
    fn recovered(&mut self) {
        let Some(t) = &self.trouble else {
            return;
        };
        self.metrics.disk_error.set(0);
        if t.last_error.elapsed() < DISK_RETRY_MAX {
            return;
        }
        self.trouble = None;
        let log = &mut self.error_log;
        tracing::warn!(
            errors = log.errors,
            dropped = log.dropped,
            "spool writes succeed again"
        );
        log.errors = 0;
        log.dropped = 0;
    }

    fn append_inner(
        &mut self,
        entries: &[SpoolEntry],
        written: &mut usize,
        dropped: &mut usize,
    ) -> io::Result<()> {
        if self.broken && !entries.is_empty() {
            self.cut_torn_tail();
            if self.broken {
                self.roll()?;
            }
        }
        const HEADER: u64 = SEGMENT_HEADER_LEN as u64;
        for (index, entry) in entries.iter().enumerate() {
            // Alone in a new segment, behind its header, it must fit the spool.
            let len = match frame_len(entry) {
                Some(len) if HEADER + len as u64 <= self.config.max_bytes => len as u64,
                _ => {
                    *dropped += 1;
                    continue;
                }
            };
            let pending = self.buf.len() as u64;
            let current = self.file_len + pending;
            let rolls = current > 0 && current + len > self.config.segment_bytes;
            // The first frame of a segment brings the segment's header.
            let needed = if current == 0 || rolls {
                HEADER + len
            } else {
                len
            };
            if self.config.mode == SpoolMode::Hold {
                // The reader deletes acked segments and lowers the gauge: that is our room.
                let on_disk = u64::try_from(self.metrics.bytes.get()).unwrap_or(0);
                if on_disk.saturating_add(pending).saturating_add(needed) > self.config.max_bytes {
                    *dropped += 1;
                    continue;
                }
            }
            if rolls {
                *written += self.flush()?;
                self.roll()?;
            }
            if self.config.mode == SpoolMode::Rotate {
                self.make_room(needed);
            }
            if self.file_len == 0 && self.buf.is_empty() {
                // In the same write as the first frames: no syscall of its own, and a write
                // that fails takes its header with it (cut off, then written again).
                self.buf
                    .extend_from_slice(&segment_header(SPOOL_FORMAT_VERSION));
            }
            let offset = self.file_len + self.buf.len() as u64;
            self.buf_placed.push((
                index,
                Position {
                    segment: self.segment,
                    offset,
                },
            ));
            encode_frame(entry, &mut self.buf);
            self.buf_entries += 1;
        }
        *written += self.flush()?;
        Ok(())
    }

    /// Rotate mode: deletes the oldest sealed segments until `len` more bytes fit.
    fn make_room(&mut self, len: u64) {
        let current = self.file_len + self.buf.len() as u64;
        while self.sealed_bytes + current + len > self.config.max_bytes {
            let Some((number, size)) = self.sealed.pop_front() else {
                // Only the current segment is left: keep the newest entries regardless.
                return;
            };
            self.sealed_bytes -= size;
            match fs::remove_file(segment_path(&self.config.dir, number)) {
                // NotFound: removed by hand; in Rotate mode nobody else accounts for it.
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    // Stop counting it rather than retrying on every entry; the gauges keep it.
                    tracing::warn!(segment = number, error = %e, "cannot delete spool segment");
                    continue;
                }
            }
            // Its space is freed only once no handle is left open.
            self.unsynced.retain(|(n, _)| *n != number);
            self.metrics.bytes.dec_by(gauge_value(size));
            self.metrics.segments.dec();
            self.metrics.segments_rotated.inc();
        }
    }

    /// Writes the buffered frames to the current segment; returns how many entries that was.
    fn flush(&mut self) -> io::Result<usize> {
        if self.buf.is_empty() {
            return Ok(0);
        }
        let entries = std::mem::take(&mut self.buf_entries);
        self.dirty = true;
        let result = self.io.write_all(&mut self.file, &self.buf);
        let len = self.buf.len() as u64;
        self.buf.clear();
        match result {
            Ok(()) => {
                self.offset += len;
                self.file_len = self.offset;
                self.metrics.bytes.inc_by(gauge_value(len));
                self.placed.append(&mut self.buf_placed);
                Ok(entries)
            }
            Err(e) => {
                self.buf_placed.clear();
                // Part of it may be on disk: account for it, never append behind it.
                self.broken = true;
                if let Ok(m) = self.file.metadata() {
                    if m.len() > self.file_len {
                        self.metrics
                            .bytes
                            .inc_by(gauge_value(m.len() - self.file_len));
                        self.file_len = m.len();
                    }
                }
                self.cut_torn_tail();
                Err(e)
            }
        }
    }

    /// After a failed write: cuts the file back to its last whole frame, so its space is freed
    /// and the segment is appended to again (a new file per failure would fill the directory).
    /// If the cut fails, `broken` stays set and the next append starts a new segment.
    fn cut_torn_tail(&mut self) {
        let cut = self
            .file
            .set_len(self.offset)
            .and_then(|()| self.file.seek(SeekFrom::Start(self.offset)));
        if cut.is_ok() {
            self.metrics
                .bytes
                .dec_by(gauge_value(self.file_len - self.offset));
            self.file_len = self.offset;
            self.broken = false;
        }
    }

    /// Seals the current segment and starts the next one.
    fn roll(&mut self) -> io::Result<()> {
        let next = next_number(Some(self.segment))?;
        let file = create_segment(&self.config.dir, next)?;
        let old = std::mem::replace(&mut self.file, file);
        if self.dirty {
            // Synced on the next fsync tick, not here: appends never wait for the disk.
            self.unsynced.push((self.segment, old));
        }
        if self.config.mode == SpoolMode::Rotate {
            self.sealed.push_back((self.segment, self.file_len));
            self.sealed_bytes += self.file_len;
        }
        self.segment = next;
        self.offset = 0;
        self.file_len = 0;
        self.broken = false;
        self.dirty = false;
        self.dir_dirty = true;
        self.metrics.segments.inc();
        Ok(())
    }

    /// fsyncs the current segment if `fsync_interval` has elapsed since the last fsync (call it
    /// after every batch and on an idle tick).
    /// A failure is counted and logged (at a limited rate) here, and pauses writes as a failed
    /// write does.
    pub fn maybe_fsync(&mut self) -> io::Result<()> {
        self.close_deleted();
        let pending = self.dirty || self.dir_dirty || !self.unsynced.is_empty();
        if pending && self.last_sync.elapsed() >= self.config.fsync_interval {
            if let Err(e) = self.sync() {
                self.disk_error("fsync", &e, 0);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Closes sealed segments the reader has already deleted: an open handle keeps their space.
    fn close_deleted(&mut self) {
        use std::os::unix::fs::MetadataExt;
        self.unsynced
            .retain(|(_, file)| file.metadata().map_or(true, |m| m.nlink() > 0));
    }

    /// fsync now (shutdown): sealed segments not yet synced, the current one, the directory.
    /// Returns the first error, after trying them all. Nothing is retried: after a failed fsync
    /// the kernel may have dropped the data and a retry would report success, and holding the
    /// handles would keep the space of segments deleted meanwhile.
    pub fn sync(&mut self) -> io::Result<()> {
        let mut result = Ok(());
        for (_, file) in self.unsynced.drain(..) {
            result = result.and(self.io.sync_data(&file));
        }
        if self.dirty {
            result = result.and(self.io.sync_data(&self.file));
            self.dirty = false;
        }
        if self.dir_dirty {
            result = result.and(sync_dir(&self.config.dir));
            self.dir_dirty = false;
        }
        self.last_sync = Instant::now();
        result
    }
}
