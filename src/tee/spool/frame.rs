//! The frame and segment-header encoding (see the module docs of `tee::spool`, "On-disk format").

use std::fmt;
use std::io;
use std::path::PathBuf;

/// The spool's on-disk format version, written in every segment header (dead letters too) and
/// in the checkpoint. This build reads versions 0 (headerless segments) up to this one and
/// refuses newer ones with [`NewerFormat`] (see the `tee::spool` module docs,
/// "Versions").
pub const SPOOL_FORMAT_VERSION: u32 = 1;

/// Length of a segment header: magic, version, CRC-32.
pub const SEGMENT_HEADER_LEN: usize = 12;
const SEGMENT_MAGIC: [u8; 4] = *b"SGSV";

pub(super) const MAGIC: [u8; 4] = 0x3153_4753_u32.to_le_bytes();
pub(super) const HEADER_LEN: usize = 12;
/// kind + timestamp + key length + route length.
pub(super) const MIN_BODY_LEN: usize = 1 + 8 + 2 + 2;

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

pub(super) fn le_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(..4)?.try_into().ok()?))
}

/// Decodes a body whose CRC already matched; `None` if malformed.
pub(super) fn decode_body(body: &[u8]) -> Option<SpoolEntry> {
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

    pub(super) fn into_io(self) -> io::Error {
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
pub(super) enum SegmentStart {
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
pub(super) fn segment_start(b: &[u8], whole: bool) -> SegmentStart {
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
