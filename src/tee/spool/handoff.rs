//! The in-memory hand-off of just-written entries from the writer to the Kafka sender.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::{SpoolReader, SpooledEntry};

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
        for spooled in written {
            let len = spooled.entry.payload.len();
            if q.bytes + len > q.max_bytes {
                break;
            }
            q.bytes += len;
            q.entries.push_back(spooled);
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
            let Some(spooled) = q.entries.pop_front() else {
                break;
            };
            q.bytes -= spooled.entry.payload.len();
            if accepted {
                out.push(spooled);
                taken += 1;
            }
        }
    }
}
