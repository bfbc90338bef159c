//! Write-ahead spool: the tee appends records here before they are sent to Kafka, so a killed
//! process loses nothing that reached the spool (the README's "Delivery guarantees").
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

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

/// The spool's on-disk format version, written in every segment header (dead letters too) and
/// in the checkpoint. This build reads versions 0 (headerless segments) up to this one and
/// refuses newer ones with [`NewerFormat`] (see the module docs, "Versions").
pub const SPOOL_FORMAT_VERSION: u32 = 1;

/// Length of a segment header: magic, version, CRC-32.
pub const SEGMENT_HEADER_LEN: usize = 12;
const SEGMENT_MAGIC: [u8; 4] = *b"SGSV";

/// File extension of segment files.
pub const SEGMENT_EXT: &str = "seg";

/// Name of the dead-letter subdirectory of a spool directory.
pub const DEAD_LETTER_DIR: &str = "dead-letter";

/// Name of the acknowledged-position checkpoint in a spool directory.
pub const CHECKPOINT_FILE: &str = "acked.ckpt";
const CHECKPOINT_TMP: &str = "acked.ckpt.tmp";
const CHECKPOINT_MAGIC: [u8; 3] = *b"SGA";
const CHECKPOINT_LEN: usize = 4 + 8 + 8 + 4;
/// The checkpoint's fourth byte: `b'0'` + the format version (`b'1'`, as before versions).
const CHECKPOINT_VERSION_BYTE: u8 = {
    assert!(SPOOL_FORMAT_VERSION <= (u8::MAX - b'0') as u32);
    b'0' + SPOOL_FORMAT_VERSION as u8
};
/// How much of a checkpoint is read: enough for a newer version's to be recognised.
const CHECKPOINT_MAX_READ: u64 = 4096;

const MAGIC: [u8; 4] = 0x3153_4753_u32.to_le_bytes();
const HEADER_LEN: usize = 12;
/// kind + timestamp + key length + route length.
const MIN_BODY_LEN: usize = 1 + 8 + 2 + 2;
const SEGMENT_NAME_DIGITS: usize = 20;
/// Reader buffer granularity; also how far a resync scan looks at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Capacity the writer's frame buffer keeps once the queue is idle: under load it keeps what a
/// batch needed (no allocation per batch), but a burst's batches (up to several MiB) are not
/// held for good.
const IDLE_BUF_CAPACITY: usize = 256 * 1024;
/// A full spool refuses entries on every batch: warn about it at most this often.
const DROP_WARN_INTERVAL: Duration = Duration::from_secs(10);
/// After a disk error the writer drops entries (counted) for this long before it tries the disk
/// again; the wait doubles with each failure up to `DISK_RETRY_MAX`. A full or failing disk then
/// costs a few writes and no new file per batch, and the request path never waits for it.
const DISK_RETRY_MIN: Duration = Duration::from_millis(100);
const DISK_RETRY_MAX: Duration = Duration::from_secs(5);
/// Disk errors are logged at most this often, with the counts since the last line.
const DISK_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What an entry is: a request/response record or a limit alert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A request/response record (`sluicegate.record.v1`).
    Record,
    /// A limit alert (`sluicegate.alert.v1`).
    Alert,
}

impl EntryKind {
    fn to_byte(self) -> u8 {
        match self {
            EntryKind::Record => 0,
            EntryKind::Alert => 1,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(EntryKind::Record),
            1 => Some(EntryKind::Alert),
            _ => None,
        }
    }
}

/// One spooled entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolEntry {
    /// Record or alert.
    pub kind: EntryKind,
    /// Request time (the Kafka message timestamp), milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Kafka key (the prediction id); at most `u16::MAX` bytes.
    pub key: String,
    /// Route name; at most `u16::MAX` bytes.
    pub route: String,
    /// The JSON document.
    pub payload: Vec<u8>,
}

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

/// Counters shared by writer and reader (prometheus-client types, cheap clones of Arc'd atomics).
#[derive(Clone, Debug, Default)]
pub struct SpoolMetrics {
    /// Total bytes of segment files on disk (the writer adds, deleters subtract).
    pub bytes: Gauge,
    /// Number of segment files on disk.
    pub segments: Gauge,
    /// Entries appended.
    pub spooled: Counter,
    /// Entries refused: spool full (Hold mode), larger than `max_bytes`, or key/route too long.
    pub dropped_full: Counter,
    /// Segments deleted unread in Rotate mode.
    pub segments_rotated: Counter,
    /// Torn or corrupt regions skipped by a reader (one per skipped run of bytes).
    pub corrupt_skipped: Counter,
    /// Entries moved to the dead-letter file.
    pub dead_lettered: Counter,
    /// Entries lost to disk errors (written and failed, or dropped while the writer backs off).
    pub dropped_error: Counter,
    /// Failed segment writes and fsyncs.
    pub write_errors: Counter,
    /// 1 from a disk error until a write succeeds again.
    pub disk_error: Gauge,
    /// Entries the Kafka sender took from the writer's [`Handoff`] instead of reading them back.
    pub sent_from_memory: Counter,
}

impl SpoolMetrics {
    /// Registers the metrics; with a registry prefixed `sluicegate_tee` the names are
    /// `sluicegate_tee_spool_bytes`, `sluicegate_tee_records_spooled_total`, etc.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "spool_bytes",
            "Bytes of spool segment files on disk",
            self.bytes.clone(),
        );
        registry.register(
            "spool_segments",
            "Spool segment files on disk",
            self.segments.clone(),
        );
        registry.register(
            "records_spooled",
            "Entries appended to the spool",
            self.spooled.clone(),
        );
        registry.register(
            "records_dropped_spool_full",
            "Entries refused by the spool (full, or too large)",
            self.dropped_full.clone(),
        );
        registry.register(
            "spool_segments_rotated",
            "Spool segments deleted unread to make room (no Kafka)",
            self.segments_rotated.clone(),
        );
        registry.register(
            "spool_corrupt_frames",
            "Torn or corrupt spool regions skipped while reading",
            self.corrupt_skipped.clone(),
        );
        registry.register(
            "records_dead_lettered",
            "Entries set aside in the dead-letter file",
            self.dead_lettered.clone(),
        );
        registry.register(
            "records_dropped_spool_error",
            "Records lost because the spool could not be written (disk error)",
            self.dropped_error.clone(),
        );
        registry.register(
            "spool_write_errors",
            "Failed spool writes and fsyncs",
            self.write_errors.clone(),
        );
        registry.register(
            "spool_disk_error",
            "1 from a spool disk error until a write succeeds again",
            self.disk_error.clone(),
        );
        registry.register(
            "records_sent_from_memory",
            "Records the Kafka sender sent as the spool writer handed them over, without reading them back from disk",
            self.sent_from_memory.clone(),
        );
    }
}

/// Size in bytes of `entry`'s frame, or `None` if it cannot be framed (key or route longer than
/// `u16::MAX` bytes, or a body over `u32::MAX` bytes).
pub fn frame_len(entry: &SpoolEntry) -> Option<usize> {
    u16::try_from(entry.key.len()).ok()?;
    u16::try_from(entry.route.len()).ok()?;
    let body = MIN_BODY_LEN
        .checked_add(entry.key.len())?
        .checked_add(entry.route.len())?
        .checked_add(entry.payload.len())?;
    u32::try_from(body).ok()?;
    body.checked_add(HEADER_LEN)
}

/// Encodes one frame, appending it to `out` (used by benches and tests too). Appends nothing
/// for an entry that cannot be framed (see [`frame_len`]).
pub fn encode_frame(entry: &SpoolEntry, out: &mut Vec<u8>) {
    let (Ok(key_len), Ok(route_len)) = (
        u16::try_from(entry.key.len()),
        u16::try_from(entry.route.len()),
    ) else {
        return;
    };
    let Some(Ok(body_len)) = frame_len(entry).map(|n| u32::try_from(n - HEADER_LEN)) else {
        return;
    };
    out.reserve(HEADER_LEN + MIN_BODY_LEN + entry.payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&body_len.to_le_bytes());
    let crc_at = out.len();
    out.extend_from_slice(&[0; 4]);
    let body_at = out.len();
    out.push(entry.kind.to_byte());
    out.extend_from_slice(&entry.timestamp_ms.to_le_bytes());
    out.extend_from_slice(&key_len.to_le_bytes());
    out.extend_from_slice(entry.key.as_bytes());
    out.extend_from_slice(&route_len.to_le_bytes());
    out.extend_from_slice(entry.route.as_bytes());
    out.extend_from_slice(&entry.payload);
    let crc = crc32fast::hash(&out[body_at..]);
    out[crc_at..body_at].copy_from_slice(&crc.to_le_bytes());
}

fn le_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(..4)?.try_into().ok()?))
}

/// Decodes a body whose CRC already matched; `None` if malformed.
fn decode_body(body: &[u8]) -> Option<SpoolEntry> {
    let (&kind, rest) = body.split_first()?;
    let kind = EntryKind::from_byte(kind)?;
    let (ts, rest) = rest.split_at_checked(8)?;
    let timestamp_ms = i64::from_le_bytes(ts.try_into().ok()?);
    let (key, rest) = take_str(rest)?;
    let (route, payload) = take_str(rest)?;
    Some(SpoolEntry {
        kind,
        timestamp_ms,
        key,
        route,
        payload: payload.to_vec(),
    })
}

/// Splits a u16-length-prefixed UTF-8 string off the front of `b`.
fn take_str(b: &[u8]) -> Option<(String, &[u8])> {
    let (len, rest) = b.split_at_checked(2)?;
    let len = usize::from(u16::from_le_bytes(len.try_into().ok()?));
    let (s, rest) = rest.split_at_checked(len)?;
    Some((String::from_utf8(s.to_vec()).ok()?, rest))
}

/// A spool file written by a newer build, in a format this build does not know. It is refused,
/// never skipped: skipping would drop its records (or, for a checkpoint, resend them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewerFormat {
    /// The segment or checkpoint file.
    pub path: PathBuf,
    /// The version it says it is in (above [`SPOOL_FORMAT_VERSION`]).
    pub version: u32,
}

impl NewerFormat {
    /// The `NewerFormat` that `e` carries, if it is one.
    pub fn of(e: &io::Error) -> Option<&NewerFormat> {
        e.get_ref()?.downcast_ref()
    }

    fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, self)
    }
}

impl fmt::Display for NewerFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is in spool format version {}, but this build of sluicegate reads versions up to \
             {SPOOL_FORMAT_VERSION}: a newer sluicegate wrote it. Run that version (or a later \
             one) on this spool, or move the spool directory aside and start on an empty one \
             (nothing is deleted: its records wait there for a build that reads them)",
            self.path.display(),
            self.version,
        )
    }
}

impl std::error::Error for NewerFormat {}

/// The header a segment of format `version` starts with (tests and tools write other versions).
pub fn segment_header(version: u32) -> [u8; SEGMENT_HEADER_LEN] {
    let mut header = [0; SEGMENT_HEADER_LEN];
    header[..4].copy_from_slice(&SEGMENT_MAGIC);
    header[4..8].copy_from_slice(&version.to_le_bytes());
    let crc = crc32fast::hash(&header[..8]);
    header[8..].copy_from_slice(&crc.to_le_bytes());
    header
}

/// What the first bytes of a segment say about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SegmentStart {
    /// Too few bytes yet to tell: a segment still being written.
    Unknown,
    /// Frames from offset `data` on. `version`: 0 for a headerless segment (frames from 0);
    /// `None` for a torn or corrupt start, read as frames from 0, so the damaged bytes are
    /// skipped and counted as a damaged frame's are.
    Frames { version: Option<u32>, data: u64 },
    /// A header from a newer build.
    Newer(u32),
}

/// Reads the start of a segment: up to its first [`SEGMENT_HEADER_LEN`] bytes. `whole`: no more
/// bytes will come (a sealed segment), so a short start is torn rather than unfinished.
fn segment_start(b: &[u8], whole: bool) -> SegmentStart {
    if b.get(..MAGIC.len()) == Some(&MAGIC[..]) {
        return SegmentStart::Frames {
            version: Some(0),
            data: 0,
        };
    }
    if b.len() >= SEGMENT_HEADER_LEN && b[..4] == SEGMENT_MAGIC {
        let version = le_u32(&b[4..]).unwrap_or(0);
        if le_u32(&b[8..]) == Some(crc32fast::hash(&b[..8])) && version > 0 {
            return if version > SPOOL_FORMAT_VERSION {
                SegmentStart::Newer(version)
            } else {
                SegmentStart::Frames {
                    version: Some(version),
                    data: SEGMENT_HEADER_LEN as u64,
                }
            };
        }
    } else if !whole {
        let n = b.len().min(4);
        if b[..n] == SEGMENT_MAGIC[..n] || b[..n] == MAGIC[..n] {
            return SegmentStart::Unknown;
        }
    }
    SegmentStart::Frames {
        version: None,
        data: 0,
    }
}

/// Refuses (with [`NewerFormat`]) if one of `segments` in `dir` was written by a newer build.
/// Only their first bytes are read.
fn check_segment_versions(dir: &Path, segments: &[u64]) -> io::Result<()> {
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

fn segment_path(dir: &Path, number: u64) -> PathBuf {
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
fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
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
fn list_segments_with_sizes(dir: &Path) -> io::Result<Vec<(u64, u64)>> {
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

fn next_number(existing: Option<u64>) -> io::Result<u64> {
    existing
        .map_or(Some(1), |n| n.checked_add(1))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "segment numbers exhausted"))
}

fn create_segment(dir: &Path, number: u64) -> io::Result<File> {
    // create_new: never append to a file someone else (an earlier process) wrote.
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(segment_path(dir, number))
}

/// Makes new directory entries durable, not just the data in them.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

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
fn write_checkpoint(dir: &Path, pos: Position) -> io::Result<()> {
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

fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The writer's file operations that fail when the disk does: the real disk, or in tests one
/// that fails like a full or broken one.
trait SegmentIo: Send + fmt::Debug {
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
    buf: Vec<u8>,
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
    /// [`NewerFormat`], before writing anything, if a segment or the checkpoint is of a newer
    /// format version than this build's.
    pub fn open(
        config: SpoolConfig,
        metrics: SpoolMetrics,
    ) -> io::Result<(SpoolWriter, watch::Receiver<Position>)> {
        Self::open_with(config, metrics, Box::new(DiskIo))
    }

    fn open_with(
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

/// An entry read back, with where it sits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpooledEntry {
    /// Where the entry's frame starts; pass it to [`SpoolReader::ack`].
    pub pos: Position,
    /// The entry.
    pub entry: SpoolEntry,
}

/// Entries the writer just wrote, handed to the Kafka sender in memory so that, while it keeps
/// up, it sends them without reading back what was just written. The spool stays the
/// write-ahead log: the sender takes an entry only when it sits exactly where its reader would
/// read next ([`SpoolReader::accept`]), and the reader's acknowledgement bookkeeping is the
/// same either way. Anything else — a gap left by a full hand-off, a new segment's first entry,
/// a replay — is read from disk as before. Bounded in bytes: when the sender falls behind,
/// newer entries are not offered (they wait on disk) and the ones it has passed are dropped.
#[derive(Clone, Debug)]
pub struct Handoff {
    inner: Arc<Mutex<HandoffQueue>>,
}

#[derive(Debug)]
struct HandoffQueue {
    entries: VecDeque<SpooledEntry>,
    bytes: usize,
    max_bytes: usize,
}

impl Handoff {
    /// A hand-off holding at most `max_bytes` of payloads.
    pub fn new(max_bytes: usize) -> Self {
        Handoff {
            inner: Arc::new(Mutex::new(HandoffQueue {
                entries: VecDeque::new(),
                bytes: 0,
                max_bytes,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HandoffQueue> {
        // The queue is consistent after every statement: a panic elsewhere leaves it usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Offers written entries, in spool order; those past the byte bound are not kept.
    pub fn offer(&self, written: impl Iterator<Item = SpooledEntry>) {
        let mut q = self.lock();
        for entry in written {
            let len = entry.entry.payload.len();
            if q.bytes + len > q.max_bytes {
                break;
            }
            q.bytes += len;
            q.entries.push_back(entry);
        }
    }

    /// Moves to `out` up to `max` entries that come exactly next for `reader` (which books
    /// them as read), dropping those it has already read past. Stops at the first gap.
    pub fn take(&self, reader: &mut SpoolReader, max: usize, out: &mut Vec<SpooledEntry>) {
        let mut q = self.lock();
        let mut taken = 0;
        while taken < max {
            let Some(front) = q.entries.front() else {
                break;
            };
            let accepted = reader.accept(front);
            if !accepted && front.pos >= reader.read_position() {
                break;
            }
            let Some(entry) = q.entries.pop_front() else {
                break;
            };
            q.bytes -= entry.entry.payload.len();
            if accepted {
                out.push(entry);
                taken += 1;
            }
        }
    }
}

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

    /// Books `e`, known to be in the spool (from the writer's [`Handoff`]), as read, if it is
    /// exactly the next frame this reader would read from disk; the reader then goes on after
    /// it, as if it had read it. A reader that has not started the entry's segment yet reads
    /// from disk (that is where segments are opened and passed).
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn entry(i: usize) -> SpoolEntry {
        SpoolEntry {
            kind: if i.is_multiple_of(5) {
                EntryKind::Alert
            } else {
                EntryKind::Record
            },
            timestamp_ms: 1_700_000_000_000 + i as i64,
            key: format!("pred-{i:06}"),
            route: format!("route-{}", i % 3),
            payload: format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(i % 40)).into_bytes(),
        }
    }

    fn config(dir: &Path, mode: SpoolMode, max_bytes: u64, segment_bytes: u64) -> SpoolConfig {
        SpoolConfig {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes,
            fsync_interval: Duration::from_millis(5),
            mode,
        }
    }

    /// Seeded, so failures reproduce.
    struct Rng(fastrand::Rng);

    impl Rng {
        fn new(seed: u64) -> Self {
            Rng(fastrand::Rng::with_seed(seed))
        }

        fn below(&mut self, n: usize) -> usize {
            self.0.usize(..n)
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.0.u8(..)).collect()
        }
    }

    fn disk_bytes(dir: &Path) -> u64 {
        list_segments_with_sizes(dir)
            .unwrap()
            .iter()
            .map(|&(_, s)| s)
            .sum()
    }

    fn segment_numbers(dir: &Path) -> Vec<u64> {
        list_segments(dir).unwrap()
    }

    fn assert_gauges_match_disk(metrics: &SpoolMetrics, dir: &Path) {
        assert_eq!(metrics.bytes.get(), disk_bytes(dir) as i64, "bytes gauge");
        assert_eq!(
            metrics.segments.get(),
            segment_numbers(dir).len() as i64,
            "segments gauge"
        );
    }

    fn read_all(reader: &mut SpoolReader, upto: Position) -> Vec<SpooledEntry> {
        let mut out = Vec::new();
        loop {
            let batch = reader.next_batch(upto, 17).unwrap();
            if batch.is_empty() {
                return out;
            }
            out.extend(batch);
        }
    }

    fn entries_of(read: &[SpooledEntry]) -> Vec<SpoolEntry> {
        read.iter().map(|e| e.entry.clone()).collect()
    }

    fn write_all(writer: &mut SpoolWriter, entries: &[SpoolEntry], batch: usize) {
        for chunk in entries.chunks(batch) {
            assert_eq!(writer.append_batch(chunk).unwrap(), chunk.len());
            writer.maybe_fsync().unwrap();
        }
    }

    /// A sender taking what the writer hands over, and reading from disk what it cannot, gets
    /// every entry once, in order, at the positions a reader of the disk alone sees: across
    /// segment rolls, a hand-off too small for a batch (gaps), and a reader that lags behind.
    /// Acknowledging them all deletes every sealed segment.
    #[test]
    fn handoff_and_disk_together_read_each_entry_once_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let metrics = SpoolMetrics::default();
        let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 2000);
        let (mut w, rx) = SpoolWriter::open(cfg, metrics.clone()).unwrap();
        let handoff = Handoff::new(600);
        w.set_handoff(handoff.clone());
        let mut r = SpoolReader::open(tmp.path(), metrics.clone(), true).unwrap();
        let mut rng = Rng::new(0x5eed);
        let all: Vec<_> = (0..400).map(entry).collect();
        let (mut got, mut from_memory) = (Vec::new(), 0);
        let mut sender_step = |r: &mut SpoolReader, got: &mut Vec<SpooledEntry>, max: usize| {
            let mut batch = Vec::new();
            handoff.take(r, max, &mut batch);
            from_memory += batch.len();
            let upto = *rx.borrow();
            if batch.len() < max && r.read_position() < upto {
                batch.extend(r.next_batch(upto, max - batch.len()).unwrap());
            }
            let n = batch.len();
            got.extend(batch);
            n
        };
        let mut rest = &all[..];
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(rest.len().min(1 + rng.below(9)));
            rest = tail;
            let mut owned = chunk.to_vec();
            assert_eq!(w.append_owned(&mut owned).unwrap(), chunk.len());
            assert!(owned.is_empty());
            // Sometimes the sender keeps up, sometimes it lags a few batches behind.
            if rng.below(3) > 0 {
                sender_step(&mut r, &mut got, 1 + rng.below(12));
            }
        }
        while sender_step(&mut r, &mut got, 16) > 0 {}
        assert!(from_memory > 0, "nothing came from memory");
        assert!(from_memory < all.len(), "nothing came from disk");

        let mut disk = SpoolReader::open(tmp.path(), SpoolMetrics::default(), false).unwrap();
        let on_disk = read_all(&mut disk, *rx.borrow());
        assert_eq!(got, on_disk);
        assert_eq!(entries_of(&got), all);

        for e in &got {
            r.ack(e.pos).unwrap();
        }
        assert_eq!(segment_numbers(tmp.path()), vec![rx.borrow().segment]);
        assert_eq!(r.acked_prefix(), Some(r.read_position()));
    }

    #[test]
    fn round_trip_across_segment_rolls() {
        let tmp = tempfile::tempdir().unwrap();
        let metrics = SpoolMetrics::default();
        let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 1000);
        let (mut w, rx) = SpoolWriter::open(cfg, metrics.clone()).unwrap();
        let all: Vec<_> = (0..300).map(entry).collect();
        write_all(&mut w, &all, 7);
        w.sync().unwrap();
        let upto = *rx.borrow();
        assert!(upto.segment >= 5, "expected several rolls, got {upto:?}");
        assert_eq!(metrics.spooled.get(), 300);
        assert_gauges_match_disk(&metrics, tmp.path());
        for (_, size) in list_segments_with_sizes(tmp.path()).unwrap() {
            assert!(size <= 1000);
        }

        let read_metrics = SpoolMetrics::default();
        let mut r = SpoolReader::open(tmp.path(), read_metrics.clone(), false).unwrap();
        let got = read_all(&mut r, upto);
        assert_eq!(entries_of(&got), all);
        assert!(got.windows(2).all(|p| p[0].pos < p[1].pos));
        assert!(got.iter().all(|e| e.pos < upto));

        let mut cat = SpoolReader::open(tmp.path(), read_metrics.clone(), false).unwrap();
        assert_eq!(entries_of(&read_all(&mut cat, Position::END)), all);
        assert_eq!(read_metrics.corrupt_skipped.get(), 0);
        // A read-only reader deletes nothing.
        assert_gauges_match_disk(&metrics, tmp.path());
    }

    #[test]
    fn reader_tails_writer_thread_without_duplicates_or_gaps() {
        let tmp = tempfile::tempdir().unwrap();
        let metrics = SpoolMetrics::default();
        let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 30, 2000);
        let (mut w, rx) = SpoolWriter::open(cfg, metrics.clone()).unwrap();
        let n = 3000;
        let writer = std::thread::spawn(move || {
            let mut rng = Rng::new(7);
            let mut i = 0;
            while i < n {
                let k = 1 + rng.below(20);
                let batch: Vec<_> = (i..(i + k).min(n)).map(entry).collect();
                assert_eq!(w.append_batch(&batch).unwrap(), batch.len());
                w.maybe_fsync().unwrap();
                i += batch.len();
                if rng.below(4) == 0 {
                    std::thread::yield_now();
                }
            }
            w
        });

        let mut r = SpoolReader::open(tmp.path(), metrics.clone(), true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut next = 0;
        let mut last = None;
        while next < n {
            let upto = *rx.borrow();
            let batch = r.next_batch(upto, 13).unwrap();
            if batch.is_empty() {
                assert!(Instant::now() < deadline, "stuck at entry {next}");
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            for e in batch {
                assert!(e.pos < upto, "{:?} not before {upto:?}", e.pos);
                assert!(Some(e.pos) > last, "positions must increase");
                last = Some(e.pos);
                assert_eq!(e.entry, entry(next));
                next += 1;
                r.ack(e.pos).unwrap();
            }
        }
        let _w = writer.join().unwrap();
        let upto = *rx.borrow();
        assert!(upto.segment > 3);
        assert!(r.next_batch(upto, 10).unwrap().is_empty());
        // Every sealed segment was fully acked: only the writer's active one is left.
        assert_eq!(segment_numbers(tmp.path()), vec![upto.segment]);
        assert_gauges_match_disk(&metrics, tmp.path());
        assert_eq!(metrics.corrupt_skipped.get(), 0);
    }

    #[test]
    fn acks_in_random_order_delete_exactly_the_fully_acked_sealed_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let metrics = SpoolMetrics::default();
        let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 600);
        let (mut w, rx) = SpoolWriter::open(cfg, metrics.clone()).unwrap();
        let all: Vec<_> = (0..80).map(entry).collect();
        write_all(&mut w, &all, 3);
        let upto = *rx.borrow();
        let before = segment_numbers(tmp.path());
        assert!(before.len() > 5);
        let bytes_before = metrics.bytes.get();

        let mut r = SpoolReader::open(tmp.path(), metrics.clone(), true).unwrap();
        let got = read_all(&mut r, upto);
        assert_eq!(entries_of(&got), all);
        // Reading alone deletes nothing: every segment still has unacked entries.
        assert_eq!(segment_numbers(tmp.path()), before);

        let mut unacked: BTreeMap<u64, usize> = BTreeMap::new();
        for e in &got {
            *unacked.entry(e.pos.segment).or_default() += 1;
        }
        let mut order: Vec<usize> = (0..got.len()).collect();
        let mut rng = Rng::new(0x5eed);
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        for idx in order {
            let pos = got[idx].pos;
            r.ack(pos).unwrap();
            *unacked.get_mut(&pos.segment).unwrap() -= 1;
            let expected: Vec<u64> = before
                .iter()
                .copied()
                .filter(|n| *n >= upto.segment || unacked.get(n).copied().unwrap_or(0) > 0)
                .collect();
            assert_eq!(segment_numbers(tmp.path()), expected);
            assert_gauges_match_disk(&metrics, tmp.path());
        }
        // Repeated and unknown acks are harmless.
        r.ack(got[0].pos).unwrap();
        r.ack(Position {
            segment: 999,
            offset: 3,
        })
        .unwrap();
        // The active segment stays even though all its entries are acked.
        assert_eq!(segment_numbers(tmp.path()), vec![upto.segment]);
        assert!(metrics.bytes.get() < bytes_before);
        assert_gauges_match_disk(&metrics, tmp.path());
    }

    #[test]
    fn rotate_mode_drops_oldest_segments_and_keeps_newest() {
        let tmp = tempfile::tempdir().unwrap();
        let metrics = SpoolMetrics::default();
        let cfg = config(tmp.path(), SpoolMode::Rotate, 3000, 700);
        let (mut w, rx) = SpoolWriter::open(cfg, metrics.clone()).unwrap();
        let all: Vec<_> = (0..400).map(entry).collect();
        write_all(&mut w, &all, 5);
        let upto = *rx.borrow();
        assert!(disk_bytes(tmp.path()) <= 3000);
        assert_gauges_match_disk(&metrics, tmp.path());
        let created = upto.segment - w.first_segment() + 1;
        let remaining = segment_numbers(tmp.path()).len() as u64;
        assert!(metrics.segments_rotated.get() > 0);
        assert_eq!(metrics.segments_rotated.get(), created - remaining);
        assert_eq!(metrics.dropped_full.get(), 0);
        assert_eq!(metrics.spooled.get(), 400);

        let mut cat = SpoolReader::open(tmp.path(), SpoolMetrics::default(), false).unwrap();
        let got = entries_of(&read_all(&mut cat, Position::END));
        assert!(!got.is_empty() && got.len() < all.len());
        assert_eq!(got[..], all[all.len() - got.len()..]);
    }

    #[test]
    fn reader_survives_segment_rotated_away_under_it() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path(), SpoolMode::Rotate, 2000, 500);
        let (mut w, _rx) = SpoolWriter::open(cfg, SpoolMetrics::default()).unwrap();
        let all: Vec<_> = (0..200).map(entry).collect();
        write_all(&mut w, &all[..20], 4);
        let mut cat = SpoolReader::open(tmp.path(), SpoolMetrics::default(), false).unwrap();
        let mut got = entries_of(&cat.next_batch(Position::END, 2).unwrap());
        assert_eq!(got, all[..2]);
        write_all(&mut w, &all[20..], 4);
        assert!(
            !segment_numbers(tmp.path()).contains(&1),
            "segment 1 rotated"
        );
        got.extend(entries_of(&read_all(&mut cat, Position::END)));
        assert!(got.windows(2).all(|p| p[0].key < p[1].key), "no duplicates");
        assert_eq!(got.last(), all.last());
    }

    #[test]
    fn hold_mode_refuses_when_full_and_accepts_after_acked_segments_go() {
        let tmp = tempfile::tempdir().unwrap();
        let metrics = SpoolMetrics::default();
        let cfg = config(tmp.path(), SpoolMode::Hold, 3000, 700);
        let (mut w, rx) = SpoolWriter::open(cfg, metrics.clone()).unwrap();
        let mut written = 0;
        for i in 0..200 {
            if w.append_batch(&[entry(i)]).unwrap() == 0 {
                break;
            }
            written += 1;
        }
        assert!(written > 10 && written < 200);
        assert_eq!(metrics.dropped_full.get(), 1);
        assert!(disk_bytes(tmp.path()) <= 3000);
        assert_gauges_match_disk(&metrics, tmp.path());
        let batch: Vec<_> = (500..505).map(entry).collect();
        assert_eq!(w.append_batch(&batch).unwrap(), 0);
        assert_eq!(metrics.dropped_full.get(), 6);

        let mut r = SpoolReader::open(tmp.path(), metrics.clone(), true).unwrap();
        let got = read_all(&mut r, *rx.borrow());
        assert_eq!(
            entries_of(&got),
            (0..written).map(entry).collect::<Vec<_>>()
        );
        for e in &got {
            r.ack(e.pos).unwrap();
        }
        assert_eq!(segment_numbers(tmp.path()), vec![rx.borrow().segment]);
        assert!(metrics.bytes.get() <= 700);
        assert_gauges_match_disk(&metrics, tmp.path());
        assert_eq!(w.append_batch(&batch).unwrap(), 5);
        assert_eq!(metrics.dropped_full.get(), 6);
        let got = read_all(&mut r, *rx.borrow());
        assert_eq!(entries_of(&got), batch);
    }

    /// Frame length of a read entry, to find its bytes in the file.
    fn len_of(e: &SpooledEntry) -> u64 {
        frame_len(&e.entry).unwrap() as u64
    }

    fn patch(path: &Path, at: u64, f: impl FnOnce(&mut u8)) {
        let mut bytes = fs::read(path).unwrap();
        f(&mut bytes[at as usize]);
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn torn_tail_and_corrupt_frames_are_skipped_and_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 800);
        let (mut w, rx) = SpoolWriter::open(cfg, SpoolMetrics::default()).unwrap();
        let all: Vec<_> = (0..80).map(entry).collect();
        write_all(&mut w, &all, 4);
        let upto = *rx.borrow();
        let mut cat = SpoolReader::open(tmp.path(), SpoolMetrics::default(), false).unwrap();
        let got = read_all(&mut cat, upto);
        assert_eq!(entries_of(&got), all);
        let in_segment =
            |n: u64| -> Vec<&SpooledEntry> { got.iter().filter(|e| e.pos.segment == n).collect() };
        let segs = segment_numbers(tmp.path());
        assert!(segs.len() >= 5);
        let mut lost = Vec::new();

        // Torn tail: the last frame of a sealed segment cut in half.
        let s = in_segment(segs[0]);
        let last = *s.last().unwrap();
        let file = OpenOptions::new()
            .write(true)
            .open(segment_path(tmp.path(), segs[0]))
            .unwrap();
        file.set_len(last.pos.offset + len_of(last) / 2).unwrap();
        lost.push(last.entry.clone());

        // One payload byte flipped in the middle of a segment (CRC mismatch).
        let s = in_segment(segs[1]);
        let mid = s[s.len() / 2];
        patch(
            &segment_path(tmp.path(), segs[1]),
            mid.pos.offset + len_of(mid) - 2,
            |b| *b ^= 0xff,
        );
        lost.push(mid.entry.clone());

        // A length field pointing past the end of the segment.
        let s = in_segment(segs[2]);
        let mid = s[s.len() / 2];
        patch(
            &segment_path(tmp.path(), segs[2]),
            mid.pos.offset + 7,
            |b| *b = 0x7f,
        );
        lost.push(mid.entry.clone());

        // Bad magic.
        let s = in_segment(segs[3]);
        let mid = s[1];
        patch(&segment_path(tmp.path(), segs[3]), mid.pos.offset, |b| {
            *b ^= 1
        });
        lost.push(mid.entry.clone());

        let expected: Vec<_> = all.iter().filter(|e| !lost.contains(e)).cloned().collect();
        for upto in [upto, Position::END] {
            let m = SpoolMetrics::default();
            let mut r = SpoolReader::open(tmp.path(), m.clone(), false).unwrap();
            assert_eq!(entries_of(&read_all(&mut r, upto)), expected);
            assert_eq!(m.corrupt_skipped.get(), 4);
        }
    }

    #[test]
    fn garbage_never_panics_and_valid_frames_behind_it_are_found() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 1 << 20);
        let (mut w, rx) = SpoolWriter::open(cfg, SpoolMetrics::default()).unwrap();
        let all: Vec<_> = (0..10).map(entry).collect();
        write_all(&mut w, &all, 10);
        w.sync().unwrap();
        let last = rx.borrow().segment;
        drop(w);

        let mut rng = Rng::new(0xdead_beef);
        let mut junk = rng.bytes(5000);
        for _ in 0..20 {
            // Magic followed by random length and CRC: must not be trusted.
            junk.extend_from_slice(&MAGIC);
            let n = 8 + rng.below(64);
            junk.extend(rng.bytes(n));
        }
        junk.extend_from_slice(&MAGIC);
        junk.extend_from_slice(&5u32.to_le_bytes()); // body shorter than the minimum
        junk.extend_from_slice(&[0; 9]);
        let mut bad_crc = Vec::new();
        encode_frame(&entry(98), &mut bad_crc);
        bad_crc[8] ^= 0x55;
        junk.extend(bad_crc);
        encode_frame(&entry(99), &mut junk);
        junk.extend(rng.bytes(100));
        junk.extend_from_slice(&MAGIC[..2]);
        let mut file = OpenOptions::new()
            .append(true)
            .open(segment_path(tmp.path(), last))
            .unwrap();
        file.write_all(&junk).unwrap();
        fs::write(segment_path(tmp.path(), last + 1), rng.bytes(10_000)).unwrap();
        fs::write(segment_path(tmp.path(), last + 2), b"").unwrap();
        fs::write(segment_path(tmp.path(), last + 3), MAGIC).unwrap();
        // Not segments: must be ignored.
        fs::write(tmp.path().join("notes.txt"), b"hello").unwrap();
        fs::write(tmp.path().join("123.seg"), rng.bytes(50)).unwrap();
        fs::create_dir(segment_path(tmp.path(), last + 4)).unwrap();

        let mut expected = all.clone();
        expected.push(entry(99));
        let m = SpoolMetrics::default();
        let mut cat = SpoolReader::open(tmp.path(), m.clone(), false).unwrap();
        assert_eq!(entries_of(&read_all(&mut cat, Position::END)), expected);
        assert!(m.corrupt_skipped.get() >= 3);

        // A producer passes (and deletes) garbage-only and empty segments too.
        let m = SpoolMetrics::default();
        let mut r = SpoolReader::open(tmp.path(), m.clone(), true).unwrap();
        let upto = Position {
            segment: last + 10,
            offset: 0,
        };
        let got = read_all(&mut r, upto);
        assert_eq!(entries_of(&got), expected);
        for e in &got {
            r.ack(e.pos).unwrap();
        }
        assert!(segment_numbers(tmp.path()).is_empty());
    }

    #[test]
    fn mutated_segments_never_panic_or_invent_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let originals: Vec<_> = (0..6).map(entry).collect();
        let mut headerless = Vec::new();
        for e in &originals {
            encode_frame(e, &mut headerless);
        }
        let mut versioned = segment_header(SPOOL_FORMAT_VERSION).to_vec();
        versioned.extend_from_slice(&headerless);
        let path = segment_path(tmp.path(), 1);
        let mut rng = Rng::new(42);
        for i in 0..300 {
            let base = if i % 2 == 0 { &headerless } else { &versioned };
            let mut bytes = base.clone();
            for _ in 0..1 + rng.below(3) {
                match rng.below(5) {
                    0 => {
                        let i = rng.below(bytes.len().max(1));
                        if let Some(b) = bytes.get_mut(i) {
                            *b ^= 1 << rng.below(8);
                        }
                    }
                    1 => bytes.truncate(rng.below(bytes.len() + 1)),
                    2 => {
                        let at = rng.below(bytes.len() + 1);
                        let n = rng.below(40);
                        let junk = rng.bytes(n);
                        bytes.splice(at..at, junk);
                    }
                    3 => {
                        let at = rng.below(bytes.len() + 1);
                        let end = (at + rng.below(30)).min(bytes.len());
                        let junk = rng.bytes(end - at);
                        bytes.splice(at..end, junk);
                    }
                    _ => {
                        let at = rng.below(bytes.len() + 1);
                        let end = (at + rng.below(60)).min(bytes.len());
                        let copy = bytes[at..end].to_vec();
                        bytes.splice(at..at, copy);
                    }
                }
            }
            fs::write(&path, &bytes).unwrap();
            let mut cat = SpoolReader::open(tmp.path(), SpoolMetrics::default(), false).unwrap();
            for e in read_all(&mut cat, Position::END) {
                assert!(originals.contains(&e.entry), "invented {e:?}");
            }
        }
    }

    #[test]
    fn reopened_writer_starts_new_segment_and_old_entries_are_read_first() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 500);
        let all: Vec<_> = (0..30).map(entry).collect();
        let (mut w1, rx1) = SpoolWriter::open(cfg.clone(), SpoolMetrics::default()).unwrap();
        assert_eq!(w1.first_segment(), 1);
        write_all(&mut w1, &all[..20], 4);
        w1.sync().unwrap();
        let last1 = rx1.borrow().segment;
        drop(w1);
        let last1_len = fs::metadata(segment_path(tmp.path(), last1)).unwrap().len();

        let metrics = SpoolMetrics::default();
        let (mut w2, rx2) = SpoolWriter::open(cfg, metrics.clone()).unwrap();
        assert_eq!(w2.first_segment(), last1 + 1);
        assert_eq!(
            *rx2.borrow(),
            Position {
                segment: last1 + 1,
                offset: 0
            }
        );
        assert_gauges_match_disk(&metrics, tmp.path());
        write_all(&mut w2, &all[20..], 4);
        assert_eq!(
            fs::metadata(segment_path(tmp.path(), last1)).unwrap().len(),
            last1_len,
            "an old segment is never appended to"
        );

        let mut r = SpoolReader::open(tmp.path(), metrics.clone(), true).unwrap();
        let got = read_all(&mut r, *rx2.borrow());
        assert_eq!(entries_of(&got), all);
        let replayed = got
            .iter()
            .filter(|e| e.pos.segment < w2.first_segment())
            .count();
        assert_eq!(replayed, 20);
        for e in &got {
            r.ack(e.pos).unwrap();
        }
        assert_eq!(segment_numbers(tmp.path()), vec![rx2.borrow().segment]);
        assert_gauges_match_disk(&metrics, tmp.path());
    }

    #[test]
    fn dead_letters_are_written_apart_and_read_back() {
        let tmp = tempfile::tempdir().unwrap();
        let metrics = SpoolMetrics::default();
        let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 1 << 20);
        let (mut w, rx) = SpoolWriter::open(cfg, metrics.clone()).unwrap();
        let all: Vec<_> = (0..3).map(entry).collect();
        write_all(&mut w, &all, 3);

        let mut dl = DeadLetter::open(tmp.path(), metrics.clone()).unwrap();
        dl.append(&entry(100), "larger than message.max.bytes")
            .unwrap();
        dl.append(&entry(101), "rejected").unwrap();
        assert_eq!(metrics.dead_lettered.get(), 2);
        let bad = SpoolEntry {
            key: "k".repeat(70_000),
            ..entry(102)
        };
        assert_eq!(
            dl.append(&bad, "x").unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        drop(dl);
        let mut dl = DeadLetter::open(tmp.path(), metrics.clone()).unwrap();
        dl.append(&entry(103), "rejected").unwrap();
        assert_eq!(metrics.dead_lettered.get(), 3);

        // The spool reader ignores the dead-letter directory, and its bytes are not counted.
        let mut r = SpoolReader::open(tmp.path(), metrics.clone(), true).unwrap();
        assert_eq!(entries_of(&read_all(&mut r, *rx.borrow())), all);
        assert_gauges_match_disk(&metrics, tmp.path());

        let dl_dir = tmp.path().join(DEAD_LETTER_DIR);
        assert_eq!(segment_numbers(&dl_dir), vec![1, 2]);
        let mut cat = SpoolReader::open(&dl_dir, SpoolMetrics::default(), false).unwrap();
        assert_eq!(
            entries_of(&read_all(&mut cat, Position::END)),
            vec![entry(100), entry(101), entry(103)]
        );
    }

    #[test]
    fn idle_writer_gives_back_a_burst_s_frame_buffer() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path(), SpoolMode::Rotate, 64 << 20, 16 << 20);
        let (mut w, rx) = SpoolWriter::open(cfg, SpoolMetrics::default()).unwrap();
        let burst: Vec<SpoolEntry> = (0..32)
            .map(|i| SpoolEntry {
                payload: vec![b'7'; 64 * 1024],
                ..entry(i)
            })
            .collect();
        assert_eq!(w.append_batch(&burst).unwrap(), 32);
        assert!(w.buf.capacity() > 2 * 1024 * 1024);
        w.release_idle_buffers();
        assert!(w.buf.capacity() <= IDLE_BUF_CAPACITY);
        // Still writes, and what it wrote is whole.
        assert_eq!(w.append_batch(&[entry(32)]).unwrap(), 1);
        let mut r = SpoolReader::open(tmp.path(), SpoolMetrics::default(), false).unwrap();
        assert_eq!(read_all(&mut r, *rx.borrow()).len(), 33);
    }

    #[test]
    fn oversized_entries_go_alone_or_are_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let metrics = SpoolMetrics::default();
        let cfg = config(tmp.path(), SpoolMode::Hold, 4000, 300);
        let (mut w, rx) = SpoolWriter::open(cfg, metrics.clone()).unwrap();
        let big = SpoolEntry {
            payload: vec![b'7'; 1000],
            ..entry(1)
        };
        let huge = SpoolEntry {
            payload: vec![b'7'; 5000],
            ..entry(2)
        };
        let long_key = SpoolEntry {
            key: "k".repeat(usize::from(u16::MAX) + 1),
            ..entry(3)
        };
        let long_route = SpoolEntry {
            route: "r".repeat(usize::from(u16::MAX) + 1),
            ..entry(4)
        };
        assert_eq!(frame_len(&long_key), None);
        let mut buf = Vec::new();
        encode_frame(&long_route, &mut buf);
        assert!(buf.is_empty());

        let batch = [
            entry(0),
            big.clone(),
            entry(5),
            huge,
            long_key,
            long_route,
            entry(6),
        ];
        assert_eq!(w.append_batch(&batch).unwrap(), 4);
        assert_eq!(metrics.dropped_full.get(), 3);
        assert_eq!(metrics.spooled.get(), 4);
        let mut r = SpoolReader::open(tmp.path(), metrics.clone(), false).unwrap();
        let got = read_all(&mut r, *rx.borrow());
        assert_eq!(
            entries_of(&got),
            vec![entry(0), big.clone(), entry(5), entry(6)]
        );
        let big_seg = got[1].pos.segment;
        assert!(got[0].pos.segment < big_seg && big_seg < got[2].pos.segment);
        assert_eq!(
            got[1].pos.offset, SEGMENT_HEADER_LEN as u64,
            "first behind the header"
        );
    }

    /// A producer's restart: the writer reopened on the same directory, a fresh reader.
    fn restart(
        cfg: &SpoolConfig,
    ) -> (
        SpoolWriter,
        watch::Receiver<Position>,
        SpoolReader,
        SpoolMetrics,
    ) {
        let metrics = SpoolMetrics::default();
        let (w, rx) = SpoolWriter::open(cfg.clone(), metrics.clone()).unwrap();
        let r = SpoolReader::open(&cfg.dir, metrics.clone(), true).unwrap();
        (w, rx, r, metrics)
    }

    #[test]
    fn a_restart_resumes_at_the_checkpoint_of_the_contiguous_acked_prefix() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 600);
        let all: Vec<_> = (0..40).map(entry).collect();
        let (mut w, rx) = SpoolWriter::open(cfg.clone(), SpoolMetrics::default()).unwrap();
        write_all(&mut w, &all, 4);
        let mut r = SpoolReader::open(tmp.path(), SpoolMetrics::default(), true).unwrap();
        let got = read_all(&mut r, *rx.borrow());
        assert_eq!(entries_of(&got), all);
        assert!(got[25].pos.segment > got[0].pos.segment, "spans segments");
        // Acked out of order, all but entry 25: only the prefix before it is checkpointed.
        for e in got.iter().rev().filter(|e| e.entry != all[25]) {
            r.ack(e.pos).unwrap();
        }
        r.checkpoint().unwrap();
        assert_eq!(read_checkpoint(tmp.path()).unwrap(), Some(got[25].pos));
        drop((w, r));
        // Segments acknowledged whole were deleted already, whatever their place.
        let kept = segment_numbers(tmp.path());
        let expected: Vec<_> = got[25..]
            .iter()
            .filter(|e| kept.contains(&e.pos.segment))
            .map(|e| e.entry.clone())
            .collect();
        assert!(expected.len() < 15 && expected[0] == all[25]);

        let (mut w, rx, mut r, metrics) = restart(&cfg);
        assert!(w.first_segment() > got[39].pos.segment);
        let again = read_all(&mut r, *rx.borrow());
        assert_eq!(
            entries_of(&again),
            expected,
            "resent from the first unacked on"
        );
        assert_gauges_match_disk(&metrics, tmp.path());
        assert!(segment_numbers(tmp.path())[0] == got[25].pos.segment);
        for e in &again {
            r.ack(e.pos).unwrap();
        }
        write_all(&mut w, &[entry(40)], 1);
        let got = read_all(&mut r, *rx.borrow());
        assert_eq!(entries_of(&got), vec![entry(40)]);
        r.ack(got[0].pos).unwrap();
        r.checkpoint().unwrap();
        drop((w, r));

        // Everything acked: a graceful restart sends nothing and clears the old segments.
        let (w, rx, mut r, metrics) = restart(&cfg);
        assert!(read_all(&mut r, *rx.borrow()).is_empty());
        assert_eq!(segment_numbers(tmp.path()), vec![w.first_segment()]);
        assert_gauges_match_disk(&metrics, tmp.path());
    }

    #[test]
    fn a_torn_or_corrupt_checkpoint_replays_everything() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 1 << 20);
        let all: Vec<_> = (0..20).map(entry).collect();
        let (mut w, rx) = SpoolWriter::open(cfg.clone(), SpoolMetrics::default()).unwrap();
        write_all(&mut w, &all, 5);
        let mut r = SpoolReader::open(tmp.path(), SpoolMetrics::default(), true).unwrap();
        for e in read_all(&mut r, *rx.borrow()) {
            r.ack(e.pos).unwrap();
        }
        r.checkpoint().unwrap();
        drop((w, r));
        let path = tmp.path().join(CHECKPOINT_FILE);
        let good = fs::read(&path).unwrap();
        assert_eq!(good.len(), CHECKPOINT_LEN);

        let mut flipped = good.clone();
        flipped[13] ^= 0x01;
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        let mut longer = good.clone();
        longer.push(0);
        let mut past_the_end = Vec::new();
        past_the_end.extend_from_slice(&CHECKPOINT_MAGIC);
        past_the_end.push(CHECKPOINT_VERSION_BYTE);
        past_the_end.extend_from_slice(&1u64.to_le_bytes());
        past_the_end.extend_from_slice(&(1u64 << 40).to_le_bytes());
        let crc = crc32fast::hash(&past_the_end);
        past_the_end.extend_from_slice(&crc.to_le_bytes());
        for (what, bytes) in [
            ("empty", Vec::new()),
            ("torn", good[..CHECKPOINT_LEN / 2].to_vec()),
            ("bit flipped", flipped),
            ("bad magic", bad_magic),
            ("trailing byte", longer),
            ("offset past the segment's end", past_the_end),
        ] {
            fs::write(&path, &bytes).unwrap();
            let (_w, rx, mut r, _) = restart(&cfg);
            assert_eq!(entries_of(&read_all(&mut r, *rx.borrow())), all, "{what}");
        }
        fs::write(&path, &good).unwrap();
        let (_w, rx, mut r, _) = restart(&cfg);
        assert!(read_all(&mut r, *rx.borrow()).is_empty());
    }

    #[test]
    fn a_stale_checkpoint_never_covers_entries_written_after_it() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 1 << 20);
        write_checkpoint(
            tmp.path(),
            Position {
                segment: 7,
                offset: 1 << 20,
            },
        )
        .unwrap();
        // No segment left (removed by hand): the writer still numbers above the checkpoint.
        let all: Vec<_> = (0..5).map(entry).collect();
        let (mut w, _, _, _) = restart(&cfg);
        assert_eq!(w.first_segment(), 8);
        write_all(&mut w, &all, 5);
        drop(w);
        let (_w, rx, mut r, _) = restart(&cfg);
        assert_eq!(entries_of(&read_all(&mut r, *rx.borrow())), all);
    }

    /// A disk with `free` bytes left (`None`: no limit) that can also fail every call with EIO.
    #[derive(Debug, Default)]
    struct Disk {
        free: Option<u64>,
        eio: bool,
        writes: u64,
    }

    #[derive(Clone, Debug)]
    struct FaultyIo(std::sync::Arc<std::sync::Mutex<Disk>>);

    const ENOSPC: i32 = 28;
    const EIO: i32 = 5;

    impl SegmentIo for FaultyIo {
        fn write_all(&mut self, file: &mut File, buf: &[u8]) -> io::Result<()> {
            let mut disk = self.0.lock().unwrap();
            disk.writes += 1;
            if disk.eio {
                return Err(io::Error::from_raw_os_error(EIO));
            }
            match disk.free {
                // As a real full disk does: part of the write lands, then ENOSPC.
                Some(free) if free < buf.len() as u64 => {
                    file.write_all(&buf[..free as usize])?;
                    disk.free = Some(0);
                    Err(io::Error::from_raw_os_error(ENOSPC))
                }
                Some(free) => {
                    disk.free = Some(free - buf.len() as u64);
                    file.write_all(buf)
                }
                None => file.write_all(buf),
            }
        }

        fn sync_data(&mut self, file: &File) -> io::Result<()> {
            if self.0.lock().unwrap().eio {
                return Err(io::Error::from_raw_os_error(EIO));
            }
            file.sync_data()
        }
    }

    #[test]
    fn a_full_or_failing_disk_is_backed_off_from_on_the_same_segment_then_recovered() {
        let tmp = tempfile::tempdir().unwrap();
        let metrics = SpoolMetrics::default();
        let disk = std::sync::Arc::new(std::sync::Mutex::new(Disk {
            free: Some(3000),
            ..Disk::default()
        }));
        let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 1000);
        let (mut w, rx) =
            SpoolWriter::open_with(cfg, metrics.clone(), Box::new(FaultyIo(disk.clone()))).unwrap();

        // A batch every 2 ms for a second, on a disk that is full after 3000 bytes.
        let mut next = 0;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(1) {
            let batch: Vec<_> = (next..next + 4).map(entry).collect();
            next += 4;
            let _ = w.append_batch(&batch);
            let _ = w.maybe_fsync();
            std::thread::sleep(Duration::from_millis(2));
        }
        let batches = next / 4;
        let files = segment_numbers(tmp.path()).len();
        let full_at = *rx.borrow();
        let writes = disk.lock().unwrap().writes;
        let errors = metrics.write_errors.get();
        eprintln!(
            "disk full for 1 s, {batches} batches: {errors} failed writes, {writes} writes in all, \
             {files} segment files, {} of {next} entries dropped and counted",
            metrics.dropped_error.get()
        );
        assert!(
            (2..=6).contains(&errors),
            "{errors} failed writes: backed off"
        );
        assert!(files <= 4, "{files} segment files: the open one is reused");
        let spooled = metrics.spooled.get();
        assert!(spooled > 0 && spooled < next as u64 / 10);
        assert_eq!(
            metrics.dropped_error.get() + spooled,
            next as u64,
            "all counted"
        );
        assert_eq!(metrics.dropped_full.get(), 0);
        assert_eq!(metrics.disk_error.get(), 1);
        assert_gauges_match_disk(&metrics, tmp.path());
        let mut r = SpoolReader::open(tmp.path(), metrics.clone(), false).unwrap();
        let got = read_all(&mut r, full_at);
        assert_eq!(got.len() as u64, spooled);
        assert!(got.windows(2).all(|p| p[0].entry.key < p[1].entry.key));
        assert_eq!(got[0].entry, entry(0));
        assert_eq!(metrics.corrupt_skipped.get(), 0, "torn tails were cut off");

        // Space returns: writes resume on the same segment within the longest back-off.
        disk.lock().unwrap().free = None;
        let returned = Instant::now();
        let resume = |w: &mut SpoolWriter, next: &mut usize| loop {
            let batch: Vec<_> = (*next..*next + 4).map(entry).collect();
            *next += 4;
            if w.append_batch(&batch).is_ok() {
                return batch;
            }
            assert!(returned.elapsed() < 2 * DISK_RETRY_MAX);
            std::thread::sleep(Duration::from_millis(10));
        };
        let resumed = resume(&mut w, &mut next);
        eprintln!(
            "writes resumed {:?} after space returned",
            returned.elapsed()
        );
        assert_eq!(metrics.disk_error.get(), 0);
        assert_eq!(rx.borrow().segment, full_at.segment);
        let got = read_all(&mut r, *rx.borrow());
        assert_eq!(entries_of(&got), resumed);

        // EIO: one failed write, then batches dropped without touching the disk.
        disk.lock().unwrap().eio = true;
        assert!(w.append_batch(&[entry(next)]).is_err());
        let writes = disk.lock().unwrap().writes;
        assert!(w.append_batch(&[entry(next + 1)]).is_err());
        assert_eq!(disk.lock().unwrap().writes, writes, "paused");
        assert_eq!(metrics.disk_error.get(), 1);
        next += 2;
        disk.lock().unwrap().eio = false;
        let resumed = resume(&mut w, &mut next);
        assert_eq!(entries_of(&read_all(&mut r, *rx.borrow())), resumed);
        assert_gauges_match_disk(&metrics, tmp.path());
    }

    #[test]
    fn deleted_and_rotated_segments_are_closed_at_once() {
        let open_deleted = |dir: &Path| {
            // Descriptors of this process on deleted files in `dir`.
            fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|d| fs::read_link(d.ok()?.path()).ok())
                .filter(|p| p.to_string_lossy().ends_with(" (deleted)") && p.starts_with(dir))
                .count()
        };
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path(), SpoolMode::Rotate, 3000, 1000);
        cfg.fsync_interval = Duration::from_secs(3600);
        let (mut w, _) = SpoolWriter::open(cfg, SpoolMetrics::default()).unwrap();
        write_all(&mut w, &(0..100).map(entry).collect::<Vec<_>>(), 2);
        assert!(segment_numbers(tmp.path()).len() <= 4);
        assert_eq!(open_deleted(tmp.path()), 0, "rotated segments closed");

        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 1000);
        cfg.fsync_interval = Duration::from_secs(3600);
        let metrics = SpoolMetrics::default();
        let (mut w, rx) = SpoolWriter::open(cfg, metrics.clone()).unwrap();
        write_all(&mut w, &(0..100).map(entry).collect::<Vec<_>>(), 2);
        let mut r = SpoolReader::open(tmp.path(), metrics, true).unwrap();
        for e in read_all(&mut r, *rx.borrow()) {
            r.ack(e.pos).unwrap();
        }
        assert_eq!(segment_numbers(tmp.path()).len(), 1);
        assert!(open_deleted(tmp.path()) > 0);
        w.maybe_fsync().unwrap();
        assert_eq!(open_deleted(tmp.path()), 0, "acked segments closed");
    }

    /// Writes `entries` as the build before versions did: frames only, no segment header.
    fn write_legacy_segment(dir: &Path, number: u64, entries: &[SpoolEntry]) {
        let mut bytes = Vec::new();
        for e in entries {
            encode_frame(e, &mut bytes);
        }
        fs::write(segment_path(dir, number), bytes).unwrap();
    }

    /// Rewrites the header of the segment at `path` to say `version`.
    fn set_version(path: &Path, version: u32) {
        let mut bytes = fs::read(path).unwrap();
        bytes[..SEGMENT_HEADER_LEN].copy_from_slice(&segment_header(version));
        fs::write(path, bytes).unwrap();
    }

    fn listing(dir: &Path) -> Vec<(u64, u64)> {
        list_segments_with_sizes(dir).unwrap()
    }

    #[test]
    fn the_current_version_round_trips_behind_a_header() {
        let header = segment_header(SPOOL_FORMAT_VERSION);
        assert_eq!(&header[..4], b"SGSV");
        assert_eq!(header[4..8], SPOOL_FORMAT_VERSION.to_le_bytes());
        for version in 1..=SPOOL_FORMAT_VERSION {
            assert_eq!(
                segment_start(&segment_header(version), true),
                SegmentStart::Frames {
                    version: Some(version),
                    data: SEGMENT_HEADER_LEN as u64
                }
            );
        }

        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 600);
        let metrics = SpoolMetrics::default();
        let (mut w, rx) = SpoolWriter::open(cfg.clone(), metrics.clone()).unwrap();
        let all: Vec<_> = (0..40).map(entry).collect();
        write_all(&mut w, &all, 3);
        assert_gauges_match_disk(&metrics, tmp.path());
        let segs = segment_numbers(tmp.path());
        assert!(segs.len() > 3);
        for &n in &segs {
            let bytes = fs::read(segment_path(tmp.path(), n)).unwrap();
            assert_eq!(bytes[..SEGMENT_HEADER_LEN], header, "segment {n}");
        }
        let mut dl = DeadLetter::open(tmp.path(), metrics.clone()).unwrap();
        dl.append(&entry(100), "rejected").unwrap();
        dl.append(&entry(101), "rejected").unwrap();
        let dl_dir = tmp.path().join(DEAD_LETTER_DIR);
        let dl_bytes = fs::read(segment_path(&dl_dir, 1)).unwrap();
        assert_eq!(dl_bytes[..SEGMENT_HEADER_LEN], header, "dead letters too");
        let mut cat = SpoolReader::open(&dl_dir, SpoolMetrics::default(), false).unwrap();
        assert_eq!(
            entries_of(&read_all(&mut cat, Position::END)),
            vec![entry(100), entry(101)]
        );

        let mut r = SpoolReader::open(tmp.path(), metrics.clone(), true).unwrap();
        let got = read_all(&mut r, *rx.borrow());
        assert_eq!(entries_of(&got), all);
        let mut first_offsets = BTreeMap::new();
        for e in &got {
            first_offsets.entry(e.pos.segment).or_insert(e.pos.offset);
        }
        assert!(first_offsets
            .values()
            .all(|&o| o == SEGMENT_HEADER_LEN as u64));
        for e in &got[..30] {
            r.ack(e.pos).unwrap();
        }
        r.checkpoint().unwrap();
        let ckpt = fs::read(tmp.path().join(CHECKPOINT_FILE)).unwrap();
        assert_eq!(
            &ckpt[..4],
            b"SGA1",
            "the checkpoint's bytes are as before versions"
        );
        assert_eq!(metrics.corrupt_skipped.get(), 0);
        drop((w, r));
        let (_w, rx, mut r, _) = restart(&cfg);
        assert_eq!(entries_of(&read_all(&mut r, *rx.borrow())), all[30..]);

        // An entry fits alone if it does with its segment's header.
        let tmp = tempfile::tempdir().unwrap();
        let e = entry(7);
        let max = (SEGMENT_HEADER_LEN + frame_len(&e).unwrap()) as u64;
        let metrics = SpoolMetrics::default();
        let (mut w, _) = SpoolWriter::open(
            config(tmp.path(), SpoolMode::Rotate, max - 1, 1 << 20),
            metrics.clone(),
        )
        .unwrap();
        assert_eq!(w.append_batch(std::slice::from_ref(&e)).unwrap(), 0);
        let (mut w, _) = SpoolWriter::open(
            config(tmp.path(), SpoolMode::Hold, max, 1 << 20),
            metrics.clone(),
        )
        .unwrap();
        assert_eq!(w.append_batch(std::slice::from_ref(&e)).unwrap(), 1);
        assert_eq!(disk_bytes(tmp.path()), max);
        assert_eq!(w.append_batch(&[entry(8)]).unwrap(), 0, "full");
    }

    #[test]
    fn a_legacy_headerless_spool_is_replayed_from_its_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 600);
        let old: Vec<_> = (0..30).map(entry).collect();
        write_legacy_segment(tmp.path(), 1, &old[..10]);
        write_legacy_segment(tmp.path(), 2, &old[10..]);
        let m = SpoolMetrics::default();
        let mut cat = SpoolReader::open(tmp.path(), m.clone(), false).unwrap();
        let got = read_all(&mut cat, Position::END);
        assert_eq!(entries_of(&got), old);
        assert_eq!(
            got[10].pos,
            Position {
                segment: 2,
                offset: 0
            },
            "frames from the first byte"
        );
        assert_eq!(m.corrupt_skipped.get(), 0);

        // The older build's checkpoint, byte for byte: acknowledged up to entry 15.
        let mut ckpt = b"SGA1".to_vec();
        ckpt.extend_from_slice(&got[15].pos.segment.to_le_bytes());
        ckpt.extend_from_slice(&got[15].pos.offset.to_le_bytes());
        let crc = crc32fast::hash(&ckpt);
        ckpt.extend_from_slice(&crc.to_le_bytes());
        fs::write(tmp.path().join(CHECKPOINT_FILE), ckpt).unwrap();

        // This build writes versioned segments after them and replays the old ones first, from
        // the old checkpoint on.
        let (mut w, rx, mut r, metrics) = restart(&cfg);
        assert_eq!(w.first_segment(), 3);
        let new: Vec<_> = (30..40).map(entry).collect();
        write_all(&mut w, &new, 5);
        let again = read_all(&mut r, *rx.borrow());
        assert_eq!(entries_of(&again), [&old[15..], &new[..]].concat());
        assert_eq!(metrics.corrupt_skipped.get(), 0);
        for e in &again {
            r.ack(e.pos).unwrap();
        }
        assert_eq!(segment_numbers(tmp.path()), vec![rx.borrow().segment]);
        assert_gauges_match_disk(&metrics, tmp.path());

        // Dead letters of the older build, too.
        let dl_dir = tmp.path().join(DEAD_LETTER_DIR);
        fs::create_dir_all(&dl_dir).unwrap();
        write_legacy_segment(&dl_dir, 1, &old[..2]);
        let mut dl = DeadLetter::open(tmp.path(), SpoolMetrics::default()).unwrap();
        dl.append(&entry(100), "rejected").unwrap();
        let mut cat = SpoolReader::open(&dl_dir, SpoolMetrics::default(), false).unwrap();
        assert_eq!(
            entries_of(&read_all(&mut cat, Position::END)),
            vec![entry(0), entry(1), entry(100)]
        );
    }

    #[test]
    fn a_newer_version_is_refused_never_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 600);
        let all: Vec<_> = (0..40).map(entry).collect();
        let (mut w, rx) = SpoolWriter::open(cfg.clone(), SpoolMetrics::default()).unwrap();
        write_all(&mut w, &all, 4);
        let upto = *rx.borrow();
        drop(w);
        let segs = segment_numbers(tmp.path());
        assert!(segs.len() > 3);
        let path = segment_path(tmp.path(), segs[2]);
        let newer = SPOOL_FORMAT_VERSION + 1;
        let expected = NewerFormat {
            path: path.clone(),
            version: newer,
        };
        let refused = |e: io::Error| {
            assert_eq!(NewerFormat::of(&e), Some(&expected), "{e}");
            e.to_string()
        };
        set_version(&path, newer);

        // Every way in refuses, before touching anything.
        let before = listing(tmp.path());
        let message = refused(SpoolWriter::open(cfg.clone(), SpoolMetrics::default()).unwrap_err());
        eprintln!("{message}");
        for part in [
            path.display().to_string(),
            format!("version {newer}"),
            format!("versions up to {SPOOL_FORMAT_VERSION}"),
            "move the spool directory aside".into(),
        ] {
            assert!(message.contains(&part), "{part:?} not in {message:?}");
        }
        for delete_acked in [true, false] {
            refused(
                SpoolReader::open(tmp.path(), SpoolMetrics::default(), delete_acked).unwrap_err(),
            );
        }
        assert_eq!(listing(tmp.path()), before, "nothing created or deleted");

        // A reader that meets it after opening (someone else writing the spool): the entries
        // before it, then the error on every call, never a skip.
        set_version(&path, SPOOL_FORMAT_VERSION);
        let m = SpoolMetrics::default();
        let mut r = SpoolReader::open(tmp.path(), m.clone(), true).unwrap();
        set_version(&path, newer);
        let mut got = Vec::new();
        let err = loop {
            match r.next_batch(upto, 7) {
                Ok(batch) => {
                    assert!(!batch.is_empty(), "stopped without the error");
                    got.extend(batch);
                }
                Err(e) => break e,
            }
        };
        refused(err);
        assert!(!got.is_empty() && got.iter().all(|e| e.pos.segment < segs[2]));
        assert_eq!(got.last().unwrap().pos.segment, segs[1]);
        for _ in 0..3 {
            refused(r.next_batch(upto, 7).unwrap_err());
        }
        assert_eq!(m.corrupt_skipped.get(), 0);
        // Once the file is one it reads, the same reader goes on where it stopped.
        set_version(&path, SPOOL_FORMAT_VERSION);
        got.extend(read_all(&mut r, upto));
        assert_eq!(entries_of(&got), all);

        // A newer checkpoint stops the writer and the producer (not `spool cat`, which does not
        // read it); a damaged one is ignored as before.
        let mut ckpt = b"SGA".to_vec();
        ckpt.push(b'0' + newer as u8);
        ckpt.extend_from_slice(&[0; 16]);
        let crc = crc32fast::hash(&ckpt);
        ckpt.extend_from_slice(&crc.to_le_bytes());
        let ckpt_path = tmp.path().join(CHECKPOINT_FILE);
        fs::write(&ckpt_path, &ckpt).unwrap();
        let expected = NewerFormat {
            path: ckpt_path.clone(),
            version: newer,
        };
        let refused = |e: io::Error| assert_eq!(NewerFormat::of(&e), Some(&expected), "{e}");
        refused(SpoolWriter::open(cfg.clone(), SpoolMetrics::default()).unwrap_err());
        refused(SpoolReader::open(tmp.path(), SpoolMetrics::default(), true).unwrap_err());
        SpoolReader::open(tmp.path(), SpoolMetrics::default(), false).unwrap();
        ckpt[10] ^= 1;
        fs::write(&ckpt_path, &ckpt).unwrap();
        assert_eq!(read_checkpoint(tmp.path()).unwrap(), None);

        // A newer dead-letter file stops `spool cat --dead-letter`; `serve` only adds its own.
        let dl_dir = tmp.path().join(DEAD_LETTER_DIR);
        let mut dl = DeadLetter::open(tmp.path(), SpoolMetrics::default()).unwrap();
        dl.append(&entry(100), "rejected").unwrap();
        drop(dl);
        set_version(&segment_path(&dl_dir, 1), newer);
        let mut dl = DeadLetter::open(tmp.path(), SpoolMetrics::default()).unwrap();
        dl.append(&entry(101), "rejected").unwrap();
        let e = SpoolReader::open(&dl_dir, SpoolMetrics::default(), false).unwrap_err();
        assert_eq!(NewerFormat::of(&e).unwrap().path, segment_path(&dl_dir, 1));
    }

    #[test]
    fn a_torn_header_is_skipped_and_counted_like_a_torn_frame() {
        let header = segment_header(SPOOL_FORMAT_VERSION);
        // While the segment may still grow, a partial start is waited for, not judged.
        for partial in [&b""[..], &header[..3], &header[..7], &MAGIC[..2]] {
            assert_eq!(segment_start(partial, false), SegmentStart::Unknown);
        }
        let damaged = SegmentStart::Frames {
            version: None,
            data: 0,
        };
        assert_eq!(segment_start(&header[..7], true), damaged);
        let mut flipped = header;
        flipped[5] ^= 1;
        assert_eq!(segment_start(&flipped, true), damaged, "CRC mismatch");

        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path(), SpoolMode::Hold, 1 << 20, 1 << 20);
        let all: Vec<_> = (0..10).map(entry).collect();
        let (mut w, _) = SpoolWriter::open(cfg.clone(), SpoolMetrics::default()).unwrap();
        write_all(&mut w, &all[..5], 5);
        drop(w);
        // Crashes right after a segment was created: the first write cut inside the header (at
        // two places), cut in the first frame behind a whole header, or not begun.
        fs::write(segment_path(tmp.path(), 2), &header[..7]).unwrap();
        fs::write(segment_path(tmp.path(), 3), &header[..3]).unwrap();
        let mut torn_frame = header.to_vec();
        encode_frame(&entry(99), &mut torn_frame);
        torn_frame.truncate(SEGMENT_HEADER_LEN + 5);
        fs::write(segment_path(tmp.path(), 4), torn_frame).unwrap();
        fs::write(segment_path(tmp.path(), 5), b"").unwrap();
        // A flipped bit in a header: the frames behind it are still found.
        let mut damaged_header = flipped.to_vec();
        encode_frame(&entry(98), &mut damaged_header);
        fs::write(segment_path(tmp.path(), 6), damaged_header).unwrap();

        let m = SpoolMetrics::default();
        let mut cat = SpoolReader::open(tmp.path(), m.clone(), false).unwrap();
        let mut expected = all[..5].to_vec();
        expected.push(entry(98));
        assert_eq!(entries_of(&read_all(&mut cat, Position::END)), expected);
        assert_eq!(
            m.corrupt_skipped.get(),
            4,
            "one per damaged segment, none for the empty one"
        );

        let (mut w, rx, mut r, metrics) = restart(&cfg);
        assert_eq!(w.first_segment(), 7);
        write_all(&mut w, &all[5..], 5);
        expected.extend_from_slice(&all[5..]);
        let got = read_all(&mut r, *rx.borrow());
        assert_eq!(entries_of(&got), expected);
        assert_eq!(metrics.corrupt_skipped.get(), 4);
        for e in &got {
            r.ack(e.pos).unwrap();
        }
        assert_eq!(
            segment_numbers(tmp.path()),
            vec![7],
            "the torn ones passed and deleted"
        );
        assert_gauges_match_disk(&metrics, tmp.path());
    }

    #[test]
    fn metric_names_match_the_contract() {
        let metrics = SpoolMetrics::default();
        let mut registry = Registry::with_prefix("sluicegate_tee");
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for name in [
            "sluicegate_tee_spool_bytes",
            "sluicegate_tee_spool_segments",
            "sluicegate_tee_records_spooled_total",
            "sluicegate_tee_records_dropped_spool_full_total",
            "sluicegate_tee_spool_segments_rotated_total",
            "sluicegate_tee_spool_corrupt_frames_total",
            "sluicegate_tee_records_dead_lettered_total",
            "sluicegate_tee_records_dropped_spool_error_total",
            "sluicegate_tee_spool_write_errors_total",
            "sluicegate_tee_spool_disk_error",
            "sluicegate_tee_records_sent_from_memory_total",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{name} "))),
                "{name} missing from:\n{text}"
            );
        }
    }
}
