//! The tee: every request/response pair becomes a record on its way to Kafka.
//!
//! ```text
//! request path ──try_send──▶ bounded queue ──▶ spool writer thread ──▶ segment files
//!                                                     │ hand-off (memory)       │
//!                       Kafka producer task ◀─────────┴── tails the spool ◀─────┘
//!                       (acked ⇒ segment deleted; no Kafka ⇒ the spool is a rotating log)
//! ```
//! The hand-off only saves reading back what was just written: the sender takes a record from
//! it only when it is the very next one in the spool ([`spool::Handoff`]).
//! The request path never waits: a full queue drops the record, counted and logged. It checks
//! the provenance tags a request carried before queueing its record (bounded per record and per
//! second), so a flood of tags cannot take the writer's time from everyone's records.

pub(crate) mod alert;
pub(crate) mod kafka;
pub(crate) mod metrics;
pub mod record;
pub mod spool;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use alert::Alert;
use metrics::TeeMetrics;
use record::{EncodeContext, Exchange, ExchangeError, InboundTags, VerifyBudget};
use spool::{SpoolEntry, SpoolWriter};

use crate::config::settings::SpoolSettings;

/// Most records the writer encodes and appends in one write (with large bodies, a batch is
/// held in memory twice: captured and encoded).
const WRITE_BATCH: usize = 128;
/// A batch also ends once its encoded records pass this size: a record of a large batched
/// response (one decision per row) can be several times its captured bodies.
const WRITE_BATCH_BYTES: usize = 4 << 20;

/// How long the writer, woken from an empty queue, lets records gather before it writes them.
/// While it lingers the request path enqueues without waking it, so at moderate rates a
/// record costs a fraction of a wake-up and of a write instead of one each; the delay is far
/// below the fsync interval that bounds what a crash can lose anyway.
const WRITE_LINGER: Duration = Duration::from_millis(5);

/// What goes through the queue to the spool.
#[derive(Debug)]
pub enum TeeItem {
    Exchange(Box<Exchange>, InboundTags),
    Alert(Box<Alert>),
}

impl TeeItem {
    fn captured_bytes(&self) -> usize {
        match self {
            TeeItem::Exchange(e, _) => e.captured_bytes(),
            TeeItem::Alert(_) => 512,
        }
    }

    fn encode(&self, ctx: &EncodeContext) -> SpoolEntry {
        match self {
            TeeItem::Exchange(e, inbound) => e.encode_checked(ctx, inbound),
            TeeItem::Alert(a) => a.encode(ctx),
        }
    }
}

/// The request path's handle on the tee. Cheap to clone; `send` never blocks.
#[derive(Clone, Debug)]
pub struct TeeSender {
    tx: SyncSender<TeeItem>,
    queued_bytes: Arc<AtomicUsize>,
    max_bytes: usize,
    metrics: TeeMetrics,
    drops: Arc<DropLog>,
    inbound_tags: InboundTagCounter,
    verify_budget: Arc<VerifyBudget>,
    /// Shutdown's grace period is over: requests still in flight are being cut.
    cutting: Arc<AtomicBool>,
}

type InboundTagCounter = prometheus_client::metrics::family::Family<
    metrics::RouteKind,
    prometheus_client::metrics::counter::Counter,
>;

impl TeeSender {
    /// Checks the exchange's inbound tags, then hands it to the spool writer, or drops it
    /// (counted) if the queue is full.
    pub fn send(&self, mut exchange: Box<Exchange>) {
        if self.cutting.load(Ordering::Relaxed)
            && !exchange.complete
            && exchange
                .error
                .as_ref()
                .is_none_or(|e| e.code == "client_disconnected")
        {
            // Not the client: the proxy cut it.
            exchange.error = Some(ExchangeError {
                code: "shutdown",
                message: "cut at the end of the shutdown grace period".into(),
                grpc_status: None,
            });
        }
        let inbound = exchange.check_inbound_tags(&self.verify_budget, &self.inbound_tags);
        self.push(TeeItem::Exchange(exchange, inbound));
    }

    /// Shutdown's grace period is over: the records of exchanges that end unfinished from now
    /// on (with no error of their own) say `shutdown`. Call it before cutting the connections;
    /// the writer is still open then, so their records reach the spool.
    pub fn cut_in_flight(&self) {
        self.cutting.store(true, Ordering::Relaxed);
    }

    /// Hands an alert to the spool writer (same queue, same guarantees).
    pub fn send_alert(&self, alert: Alert) {
        self.push(TeeItem::Alert(Box::new(alert)));
    }

    fn push(&self, item: TeeItem) {
        let size = item.captured_bytes();
        let before = self.queued_bytes.fetch_add(size, Ordering::Relaxed);
        if before + size > self.max_bytes {
            self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            self.dropped();
            return;
        }
        match self.tx.try_send(item) {
            Ok(()) => {
                self.metrics.queued.inc();
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
                self.dropped();
            }
        }
    }

    fn dropped(&self) {
        self.metrics.dropped_queue_full.inc();
        self.drops.record();
    }
}

/// Logs dropped records at most once per interval, with the count since the last line.
#[derive(Debug)]
struct DropLog {
    start: Instant,
    last_logged_s: AtomicU64,
    since_last: AtomicU64,
}

impl DropLog {
    const INTERVAL_S: u64 = 10;

    fn new() -> Self {
        DropLog {
            start: Instant::now(),
            last_logged_s: AtomicU64::new(0),
            since_last: AtomicU64::new(0),
        }
    }

    fn record(&self) {
        let n = self.since_last.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.start.elapsed().as_secs() + Self::INTERVAL_S;
        let last = self.last_logged_s.load(Ordering::Relaxed);
        if now >= last + Self::INTERVAL_S
            && self
                .last_logged_s
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.since_last.fetch_sub(n, Ordering::Relaxed);
            tracing::error!(
                dropped = n,
                "tee queue full: records dropped (the spool cannot keep up)"
            );
        }
    }
}

/// The spool writer: its own OS thread, so a slow disk never stalls the async runtime.
pub struct TeeWriter {
    handle: JoinHandle<()>,
    closing: Arc<AtomicBool>,
}

impl TeeWriter {
    /// Starts the writer thread and returns the request path's sender.
    pub fn spawn(
        spool: SpoolWriter,
        ctx: EncodeContext,
        settings: &SpoolSettings,
        metrics: TeeMetrics,
    ) -> std::io::Result<(TeeSender, TeeWriter)> {
        let (tx, rx) = mpsc::sync_channel(settings.queue_records);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let sender = TeeSender {
            tx,
            queued_bytes: queued_bytes.clone(),
            max_bytes: settings.queue_bytes,
            metrics,
            drops: Arc::new(DropLog::new()),
            inbound_tags: ctx.inbound_tags.clone(),
            verify_budget: Arc::new(VerifyBudget::default()),
            cutting: Arc::new(AtomicBool::new(false)),
        };
        let tick = settings
            .fsync_interval
            .clamp(Duration::from_millis(10), Duration::from_millis(100));
        let closing = Arc::new(AtomicBool::new(false));
        let flag = closing.clone();
        let handle = std::thread::Builder::new()
            .name("sluicegate-spool".into())
            .spawn(move || write_loop(rx, spool, ctx, queued_bytes, tick, &flag))?;
        Ok((sender, TeeWriter { handle, closing }))
    }

    /// Writes what is queued, syncs and stops. Records sent after this are dropped (counted).
    pub fn close(self) {
        self.closing.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
    }
}

fn write_loop(
    rx: mpsc::Receiver<TeeItem>,
    mut spool: SpoolWriter,
    ctx: EncodeContext,
    queued_bytes: Arc<AtomicUsize>,
    tick: Duration,
    closing: &AtomicBool,
) {
    let mut entries: Vec<SpoolEntry> = Vec::with_capacity(WRITE_BATCH);
    loop {
        let waited = rx.try_recv().or_else(|_| {
            let first = rx.recv_timeout(tick)?;
            std::thread::sleep(WRITE_LINGER);
            Ok(first)
        });
        let first = match waited {
            Ok(item) => item,
            Err(RecvTimeoutError::Timeout) => {
                if closing.load(Ordering::Relaxed) {
                    break;
                }
                // A failure is counted and logged by the spool writer.
                let _ = spool.maybe_fsync();
                spool.release_idle_buffers();
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut freed = 0;
        let mut encoded = 0;
        for item in std::iter::once(first).chain(rx.try_iter().take(WRITE_BATCH - 1)) {
            freed += item.captured_bytes();
            let entry = item.encode(&ctx);
            encoded += entry.payload.len();
            entries.push(entry);
            if encoded >= WRITE_BATCH_BYTES {
                break;
            }
        }
        queued_bytes.fetch_sub(freed, Ordering::Relaxed);
        // Records a disk error cost are counted, and logged at a limited rate, by the spool
        // writer, which also backs off: a failing disk never slows the queue's draining.
        let _ = spool.append_owned(&mut entries);
        let _ = spool.maybe_fsync();
    }
    if let Err(e) = spool.sync() {
        tracing::warn!(error = %e, "spool fsync at shutdown failed");
    }
}
