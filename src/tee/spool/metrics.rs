//! The spool's metrics.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
    /// Entries the Kafka sender took from the writer's [`Handoff`](super::Handoff) instead of
    /// reading them back.
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

pub(super) fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
