//! The Kafka sender: tails the spool and produces what it finds, at least once.
//!
//! A record leaves the spool only when Kafka acknowledged it or it went to the dead-letter
//! file. Failed or timed-out deliveries are sent again; a fatal producer error (a fenced
//! idempotent producer) rebuilds the producer. It runs on its own thread with its own
//! single-threaded runtime, so neither its file reads nor librdkafka's callbacks share a core
//! schedule with the request path. It polls the producer itself: delivery reports are booked
//! on this thread, with no polling thread of librdkafka's to wake it for each record.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::metrics::TeeMetrics;
use super::spool::{DeadLetter, EntryKind, Handoff, Position, SpoolReader, SpooledEntry};
use crate::config::settings::KafkaSettings;

/// Records read from the spool and not yet acknowledged, at most. Matches the producer's own
/// queue bound below, so memory stays bounded however long Kafka is away.
const MAX_IN_FLIGHT: usize = 10_000;
/// Bytes of records the sender holds in memory (in flight or waiting to be resent), at most:
/// with large bodies the record count alone would let memory grow to hundreds of MiB while
/// Kafka is slower than the traffic. The backlog stays on disk. It also bounds what is in
/// flight, so it must cover the broker's round trip at the traffic's byte rate: measured with
/// ~90 KiB records (16 KiB v2 answers, 421 rows) against tansu at 1,000 req/s, 4 MiB held
/// the sender to 400–530 records/s (tee lag p99 8 s, the spool growing) where 16 MiB keeps up
/// at the 16 KiB closed-loop ceiling (~1,200 req/s, no drops, peak RSS 54–59 MiB). librdkafka's
/// queue below holds the copies of the same records, so it gets the same bound.
const MAX_HELD_BYTES: usize = 16 << 20;
const READ_BATCH: usize = 256;
/// Bytes of just-written records the spool writer hands the sender in memory, at most. While
/// the sender keeps up it holds about one writer batch; when it falls behind, the rest is read
/// from disk. Measured at 1,000 req/s against tansu: 97–99.8% of the records were sent from
/// memory (~1 KiB and ~16 KiB answers), and the sender's CPU per ~90 KiB record fell from
/// 66–99 µs (read back, CRC-checked and copied out of the page cache) to 26–50 µs.
pub(crate) const HANDOFF_BYTES: usize = 4 << 20;
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// Deliveries failing with no acknowledgement for this long while a broker is reachable: the
/// producer is rebuilt (a fresh connection and producer id). It unwedges a producer whose
/// idempotence state a restarted broker lost, whatever error that broker answers with.
const STALL_REBUILD: Duration = Duration::from_secs(20);
/// How often the acknowledged position is checkpointed (and at shutdown): after a crash, a
/// restart resends at most what was acknowledged in this last interval (besides the
/// unacknowledged records, which it must send).
pub(crate) const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Between half and all of `backoff`, at random: the sidecars of a fleet that lost the same
/// broker do not come back to it in step.
fn jittered(backoff: Duration) -> Duration {
    backoff.mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// How long librdkafka lets records gather into one produce request. The request path never
/// waits for Kafka, so this only delays a record's arrival there (and the checkpoint, which
/// runs every second anyway). Measured at 1,000 req/s against tansu, CPU of librdkafka's
/// broker thread per record: 2.7 µs at 5 ms, 1.6 µs at 10 ms, 1.0 µs at 20 ms (~1 KiB
/// answers; about 9% of the proxy's CPU per request at 5 ms); 10 ms takes most of the saving
/// and keeps the tee lag p99 within 32 ms.
const LINGER_MS: &str = "10";

/// Builds the producer configuration: sluicegate's defaults, then the user's properties.
pub(crate) fn producer_config(kafka: &KafkaSettings, max_record_bytes: u64) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.brokers)
        .set("client.id", "sluicegate")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // Uncompressed: profiled in the running proxy at 1,000 req/s of ~16 KiB answers, lz4
        // was 9.7% of all its CPU (the sidecar's CPU is paid on every pod; a topic can
        // compress broker-side, or `compression.type` can be set back).
        .set("compression.type", "none")
        .set("linger.ms", LINGER_MS)
        // librdkafka's own queue: bounded by count and bytes.
        .set("queue.buffering.max.messages", MAX_IN_FLIGHT.to_string())
        .set(
            "queue.buffering.max.kbytes",
            (MAX_HELD_BYTES >> 10).to_string(),
        )
        // Short: a failed delivery is retried from the spool, not held inside librdkafka.
        .set("message.timeout.ms", "30000")
        .set(
            "message.max.bytes",
            (max_record_bytes + (64 << 10)).to_string(),
        );
    for (k, v) in &kafka.properties {
        c.set(k, v);
    }
    c
}

/// Tracks whether the producer reaches a broker, and logs the changes (not every retry); takes
/// delivery reports.
struct TeeContext {
    metrics: TeeMetrics,
    reported: Reported,
}

/// Deliveries librdkafka reported (by the key the sender gave the record), waiting to be
/// settled. Filled inside [`BaseProducer::poll`], which only the sender's thread calls.
type Reported = Arc<Mutex<Vec<(u64, Outcome)>>>;

impl ProducerContext for TeeContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, key: usize) {
        let outcome = match result {
            Ok(_) => Outcome::Acked,
            Err((err, _)) => classify(err),
        };
        lock(&self.reported).push((key as u64, outcome));
    }
}

impl ClientContext for TeeContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        // librdkafka repeats connection failures every second while Kafka is away; the
        // state changes are logged once, below and in `settle`.
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                tracing::warn!(facility = fac, "librdkafka: {log_message}")
            }
            _ => tracing::debug!(facility = fac, "librdkafka: {log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let KafkaError::Global(RDKafkaErrorCode::AllBrokersDown) = error {
            if self.metrics.kafka_connected.set(0) != 0 {
                tracing::warn!(reason, "lost every Kafka broker; records wait in the spool");
            }
        } else {
            tracing::debug!(error = %error, reason, "kafka client error");
        }
    }
}

type Producer_ = BaseProducer<TeeContext>;

/// What happened to one delivery.
enum Outcome {
    Acked,
    Retry,
    DeadLetter(String),
    Fatal,
}

fn classify(err: &KafkaError) -> Outcome {
    use RDKafkaErrorCode as C;
    match err.rdkafka_error_code() {
        // The broker will never take these: set them aside so they cannot block the rest.
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::InvalidRecord
            | C::MessageBatchTooLarge,
        ) => Outcome::DeadLetter(err.to_string()),
        Some(
            C::Fatal | C::ProducerFenced | C::InvalidProducerEpoch | C::OutOfOrderSequenceNumber,
        ) => Outcome::Fatal,
        _ => Outcome::Retry,
    }
}

/// How often, at most, the sender polls the producer for delivery reports while records are in
/// flight (it also polls whenever it wakes for new records). An acknowledgement only frees the
/// spool and the in-memory bound, so a few milliseconds late costs nothing a client sees.
const DELIVERY_POLL: Duration = Duration::from_millis(5);

/// Records handed to librdkafka and not yet reported, by the key their delivery report carries.
#[derive(Default)]
struct InFlight {
    entries: HashMap<u64, SpooledEntry>,
    next_key: u64,
}

impl InFlight {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Everything still in flight, oldest first (for a producer that is gone).
    fn drain_in_order(&mut self) -> Vec<SpooledEntry> {
        let mut left: Vec<_> = self.entries.drain().collect();
        left.sort_unstable_by_key(|(key, _)| *key);
        left.into_iter().map(|(_, entry)| entry).collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Serves librdkafka's events and returns the deliveries reported since the last call. A poll
/// that does not wait serves one event (a delivery report carries many records), so it goes
/// on while reports come, within a bound.
fn poll_reports(producer: &Producer_, reported: &Reported) -> Vec<(u64, Outcome)> {
    let mut out = Vec::new();
    for _ in 0..64 {
        producer.poll(Duration::ZERO);
        let mut new = lock(reported);
        if new.is_empty() {
            break;
        }
        out.append(&mut new);
    }
    out
}

/// After shutdown's drain begins (the writer has closed), the sender gets this long to deliver
/// what is left; the rest stays in the spool for the next start.
pub(crate) const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

/// When the producer last made progress, and when it was last rebuilt.
struct Health {
    last_ack: Instant,
    last_rebuild: Instant,
}

impl Health {
    fn stalled(&self) -> bool {
        self.last_ack.elapsed() > STALL_REBUILD && self.last_rebuild.elapsed() > STALL_REBUILD
    }
}

/// What the sender owes the spool besides the deliveries in flight.
struct Backlog {
    reader: SpoolReader,
    /// Opened at the first record Kafka will never take.
    dead_letter: Option<DeadLetter>,
    /// Failed deliveries, oldest first, sent again from `retry_at` on.
    retry: VecDeque<SpooledEntry>,
    retry_at: Instant,
    backoff: Duration,
    /// Bytes of records in flight or waiting to be resent (bounded by `MAX_HELD_BYTES`).
    held_bytes: usize,
    health: Health,
    /// A delivery failed in a way only a new producer can fix.
    fatal: bool,
    last_checkpoint: Instant,
    /// The last checkpoint failed (logged once until one succeeds).
    checkpoint_failing: bool,
}

impl Backlog {
    /// Checkpoints the acknowledged position (see [`CHECKPOINT_INTERVAL`]).
    fn checkpoint(&mut self) {
        self.last_checkpoint = Instant::now();
        match self.reader.checkpoint() {
            Ok(()) => self.checkpoint_failing = false,
            Err(e) => {
                if !std::mem::replace(&mut self.checkpoint_failing, true) {
                    tracing::warn!(error = %e, "cannot checkpoint the acknowledged spool position; a restart will resend more");
                }
            }
        }
    }
}

/// The Kafka sender task.
pub(crate) struct KafkaSender {
    pub kafka: KafkaSettings,
    pub spool_dir: PathBuf,
    pub max_record_bytes: u64,
    pub metrics: TeeMetrics,
    /// The spool writer's position: everything before it is whole and readable.
    pub written: watch::Receiver<Position>,
    /// Segments below this number were written by an earlier process.
    pub first_live_segment: u64,
    /// What the writer just wrote, to send without reading it back (the writer's
    /// [`SpoolWriter::set_handoff`](super::spool::SpoolWriter::set_handoff)); `None`: every
    /// record is read from disk.
    pub handoff: Option<Handoff>,
}

impl KafkaSender {
    /// Checks the configuration by building a producer (bad properties fail here, at start).
    pub(crate) fn check_config(&self) -> Result<(), KafkaError> {
        self.producer(&Reported::default()).map(|_| ())
    }

    fn producer(&self, reported: &Reported) -> Result<Producer_, KafkaError> {
        producer_config(&self.kafka, self.max_record_bytes).create_with_context(TeeContext {
            metrics: self.metrics.clone(),
            reported: reported.clone(),
        })
    }

    /// Runs the sender on its own thread until, once `drain` is cancelled, everything written
    /// has been delivered or [`SHUTDOWN_DRAIN`] has passed.
    pub(crate) fn spawn(
        self,
        drain: CancellationToken,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("sluicegate-kafka".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("kafka sender runtime");
                rt.block_on(self.run(drain));
            })
    }

    async fn run(mut self, drain: CancellationToken) {
        let reported = Reported::default();
        let mut producer = match self.producer(&reported) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot create kafka producer; records stay in the spool");
                return;
            }
        };
        let reader = match SpoolReader::open(&self.spool_dir, self.metrics.spool.clone(), true) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, dir = %self.spool_dir.display(), "cannot read the spool; records stay in it");
                return;
            }
        };
        let mut b = Backlog {
            reader,
            dead_letter: None,
            retry: VecDeque::new(),
            retry_at: Instant::now(),
            backoff: RETRY_MIN,
            held_bytes: 0,
            health: Health {
                last_ack: Instant::now(),
                last_rebuild: Instant::now(),
            },
            fatal: false,
            last_checkpoint: Instant::now(),
            checkpoint_failing: false,
        };
        let mut in_flight = InFlight::default();
        let mut writer_done = false;
        let mut reader_caught_up = false;
        let mut deadline = None;

        loop {
            if deadline.is_none() && drain.is_cancelled() {
                deadline = Some(Instant::now() + SHUTDOWN_DRAIN);
            }
            if let Some(deadline) = deadline {
                let idle = in_flight.is_empty() && b.retry.is_empty() && reader_caught_up;
                if Instant::now() >= deadline || (idle && writer_done) {
                    break;
                }
            }

            // Book what librdkafka reported since the last round: it may make room, or show
            // that only a new producer can deliver.
            let reports = poll_reports(&producer, &reported);
            if !reports.is_empty() {
                b.fatal = false;
                for (key, outcome) in reports {
                    if let Some(spooled) = in_flight.entries.remove(&key) {
                        self.settle(&mut b, spooled, outcome);
                    }
                }
                let stalled = !b.retry.is_empty() && b.health.stalled();
                let fatal_error = producer.client().fatal_error();
                if b.fatal || stalled || fatal_error.is_some() {
                    let reason = match fatal_error {
                        Some((_, reason)) => reason,
                        None if stalled => {
                            format!("no delivery for {:?}", b.health.last_ack.elapsed())
                        }
                        None => "fatal delivery error".into(),
                    };
                    tracing::warn!(reason, "rebuilding the kafka producer; unacknowledged records are sent again from the spool");
                    // Dropping it purges what it holds; what it acknowledged meanwhile is
                    // booked, everything else still in flight is sent again.
                    drop(producer);
                    let reports = std::mem::take(&mut *lock(&reported));
                    for (key, outcome) in reports {
                        if matches!(outcome, Outcome::Acked) {
                            if let Some(spooled) = in_flight.entries.remove(&key) {
                                self.settle(&mut b, spooled, outcome);
                            }
                        }
                    }
                    b.retry.extend(in_flight.drain_in_order());
                    producer = loop {
                        match self.producer(&reported) {
                            Ok(p) => break p,
                            Err(e) => {
                                tracing::error!(error = %e, "cannot rebuild kafka producer");
                                tokio::time::sleep(RETRY_MAX).await;
                            }
                        }
                    };
                    self.metrics.producer_rebuilds.inc();
                    b.health.last_rebuild = Instant::now();
                }
            }

            // Send: retries first (they are older), then new records, while there is room.
            let now = Instant::now();
            while in_flight.len() < MAX_IN_FLIGHT && now >= b.retry_at {
                let Some(spooled) = b.retry.pop_front() else {
                    break;
                };
                match self.send(&producer, &mut in_flight, spooled) {
                    None => {}
                    Some((spooled, Outcome::Retry | Outcome::Fatal)) => {
                        b.retry.push_front(spooled);
                        b.retry_at = now + RETRY_MIN;
                        break;
                    }
                    Some((spooled, outcome)) => self.settle(&mut b, spooled, outcome),
                }
            }
            reader_caught_up = false;
            if b.retry.is_empty()
                && in_flight.len() < MAX_IN_FLIGHT
                && b.held_bytes < MAX_HELD_BYTES
            {
                let upto = *self.written.borrow();
                let room = (MAX_IN_FLIGHT - in_flight.len()).min(READ_BATCH);
                // From memory while it holds exactly what comes next, then from disk.
                let mut batch = Vec::new();
                if let Some(handoff) = &self.handoff {
                    handoff.take(&mut b.reader, room, &mut batch);
                }
                let from_memory = batch.len();
                let mut read_ok = true;
                if batch.len() < room && b.reader.read_position() < upto {
                    match b.reader.next_batch(upto, room - batch.len()) {
                        Ok(read) => batch.extend(read),
                        Err(e) => {
                            tracing::warn!(error = %e, "spool read failed; retrying");
                            b.retry_at = Instant::now() + RETRY_MAX;
                            read_ok = false;
                        }
                    }
                }
                reader_caught_up = read_ok && batch.len() < room;
                self.metrics
                    .spool
                    .sent_from_memory
                    .inc_by(from_memory as u64);
                for spooled in batch {
                    b.held_bytes += spooled.entry.payload.len();
                    if spooled.pos.segment < self.first_live_segment {
                        self.metrics.replayed.inc();
                    }
                    match self.send(&producer, &mut in_flight, spooled) {
                        None => {}
                        Some((spooled, Outcome::Retry | Outcome::Fatal)) => {
                            b.retry.push_back(spooled);
                            b.retry_at = Instant::now() + RETRY_MIN;
                        }
                        Some((spooled, outcome)) => self.settle(&mut b, spooled, outcome),
                    }
                }
            }

            // Wait for a delivery, new records, a retry slot or the drain signal.
            let sleep_until = if in_flight.len() >= MAX_IN_FLIGHT || b.held_bytes >= MAX_HELD_BYTES
            {
                // Full: only a delivery can make room.
                Instant::now() + DELIVERY_POLL
            } else if b.retry.is_empty() && !reader_caught_up {
                Instant::now() + Duration::from_millis(1)
            } else if b.retry.is_empty() {
                Instant::now() + Duration::from_secs(1)
            } else {
                b.retry_at
            }
            .min(b.last_checkpoint + CHECKPOINT_INTERVAL);
            // Delivery reports come only from polling: while records are in flight, poll often.
            let sleep_until = if in_flight.is_empty() {
                sleep_until
            } else {
                sleep_until.min(Instant::now() + DELIVERY_POLL)
            };
            tokio::select! {
                changed = self.written.changed(), if !writer_done => {
                    if changed.is_err() {
                        writer_done = true;
                    }
                }
                _ = drain.cancelled(), if deadline.is_none() => {}
                _ = tokio::time::sleep_until(sleep_until.into()) => {}
            }
            if b.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL {
                b.checkpoint();
            }
        }
        let _ = producer.flush(Duration::from_millis(100));
        for (key, outcome) in poll_reports(&producer, &reported) {
            if let Some(spooled) = in_flight.entries.remove(&key) {
                self.settle(&mut b, spooled, outcome);
            }
        }
        b.checkpoint();
        let left = in_flight.len() + b.retry.len();
        if left > 0 {
            tracing::warn!(
                unsent = left,
                "shutdown: records not yet acknowledged stay in the spool for the next start"
            );
        }
    }

    /// Hands one record to librdkafka, which reports its delivery by the key it is filed under
    /// in `in_flight`; gives it back, with what to do with it, when librdkafka will not take it.
    fn send(
        &self,
        producer: &Producer_,
        in_flight: &mut InFlight,
        spooled: SpooledEntry,
    ) -> Option<(SpooledEntry, Outcome)> {
        let e = &spooled.entry;
        let (topic, schema) = match e.kind {
            EntryKind::Record => (&self.kafka.topic, super::record::RECORD_SCHEMA),
            EntryKind::Alert => (&self.kafka.alerts_topic, super::alert::ALERT_SCHEMA),
        };
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "sluicegate-schema",
                value: Some(schema),
            })
            .insert(Header {
                key: "sluicegate-route",
                value: Some(e.route.as_str()),
            });
        let key = in_flight.next_key;
        let record = BaseRecord::with_opaque_to(topic, key as usize)
            .key(e.key.as_str())
            .payload(e.payload.as_slice())
            .timestamp(e.timestamp_ms)
            .headers(headers);
        match producer.send(record).map_err(|(err, _)| classify(&err)) {
            Ok(()) => {
                in_flight.next_key += 1;
                in_flight.entries.insert(key, spooled);
                None
            }
            Err(outcome) => Some((spooled, outcome)),
        }
    }

    /// Books a finished delivery: acknowledged records leave the spool, refused ones go to the
    /// dead-letter file, the rest wait in the backlog to be sent again.
    fn settle(&self, b: &mut Backlog, spooled: SpooledEntry, outcome: Outcome) {
        match outcome {
            Outcome::Acked => {
                b.held_bytes = b.held_bytes.saturating_sub(spooled.entry.payload.len());
                b.health.last_ack = Instant::now();
                self.metrics.sent.inc();
                if self.metrics.kafka_connected.set(1) != 1 {
                    tracing::info!("kafka acknowledges records again");
                }
                b.backoff = RETRY_MIN;
                let now_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                let lag_ms = (now_ms - spooled.entry.timestamp_ms).max(0);
                self.metrics.lag.observe(lag_ms as f64 / 1e3);
                self.ack(&mut b.reader, spooled.pos);
            }
            Outcome::DeadLetter(reason) => {
                if b.dead_letter.is_none() {
                    match DeadLetter::open(&self.spool_dir, self.metrics.spool.clone()) {
                        Ok(d) => b.dead_letter = Some(d),
                        Err(e) => tracing::error!(error = %e, "cannot open the dead-letter file"),
                    }
                }
                let written = match b.dead_letter.as_mut() {
                    Some(d) => d.append(&spooled.entry, &reason),
                    None => Err(std::io::Error::other("no dead-letter file")),
                };
                match written {
                    Ok(()) => {
                        b.held_bytes = b.held_bytes.saturating_sub(spooled.entry.payload.len());
                        self.ack(&mut b.reader, spooled.pos)
                    }
                    Err(e) => {
                        // Keep it in the spool rather than lose it.
                        tracing::error!(error = %e, "cannot write the dead-letter file");
                        b.retry.push_back(spooled);
                        b.retry_at = Instant::now() + RETRY_MAX;
                    }
                }
            }
            Outcome::Fatal => {
                b.fatal = true;
                b.retry.push_back(spooled);
            }
            Outcome::Retry => {
                self.metrics.delivery_retries.inc();
                if b.retry.is_empty() {
                    b.retry_at = Instant::now() + jittered(b.backoff);
                    b.backoff = (b.backoff * 2).min(RETRY_MAX);
                }
                b.retry.push_back(spooled);
            }
        }
    }

    fn ack(&self, reader: &mut SpoolReader, pos: Position) {
        if let Err(e) = reader.ack(pos) {
            tracing::warn!(error = %e, "cannot remove a delivered spool segment");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_backoff_is_jittered_within_half_to_all_of_it() {
        let backoff = Duration::from_secs(4);
        let waits: Vec<Duration> = (0..1000).map(|_| jittered(backoff)).collect();
        assert!(waits.iter().all(|w| *w >= backoff / 2 && *w <= backoff));
        let distinct: std::collections::BTreeSet<_> = waits.iter().collect();
        assert!(
            distinct.len() > 900,
            "spread: {} distinct waits",
            distinct.len()
        );
    }
}
