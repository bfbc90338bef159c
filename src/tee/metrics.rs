//! The tee's metrics: this module owns them and registers them (under the `tee` prefix the
//! caller gives), the spool's with them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::spool::SpoolMetrics;

/// Labels of a per-route count by kind (the inbound tags found on requests: `direct`,
/// `hidden`, `invalid`, `unverified`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteKind {
    pub route: String,
    pub kind: &'static str,
}

/// The tee's metrics outside the spool itself.
#[derive(Clone, Debug)]
pub struct TeeMetrics {
    /// Records handed to the in-memory queue.
    pub queued: Counter,
    /// Records refused because the in-memory queue was full (the disk could not keep up).
    pub dropped_queue_full: Counter,
    /// Records Kafka acknowledged.
    pub sent: Counter,
    /// Records read from spool segments written by an earlier process.
    pub replayed: Counter,
    /// Deliveries that failed and will be sent again from the spool.
    pub delivery_retries: Counter,
    /// Producers rebuilt after a fatal error.
    pub producer_rebuilds: Counter,
    /// Request time to Kafka acknowledgement.
    pub lag: Histogram,
    /// 1 while the producer reaches at least one broker.
    pub kafka_connected: Gauge,
    pub spool: SpoolMetrics,
}

impl Default for TeeMetrics {
    fn default() -> Self {
        TeeMetrics {
            queued: Counter::default(),
            dropped_queue_full: Counter::default(),
            sent: Counter::default(),
            replayed: Counter::default(),
            delivery_retries: Counter::default(),
            producer_rebuilds: Counter::default(),
            // 1 ms .. ~9 h: lag spans a healthy few ms to a long outage.
            lag: Histogram::new(exponential_buckets(0.001, 2.0, 25)),
            kafka_connected: Gauge::default(),
            spool: SpoolMetrics::default(),
        }
    }
}

impl TeeMetrics {
    /// Registers every tee metric, the spool's included, in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "records_queued",
            "Records handed to the spool queue",
            self.queued.clone(),
        );
        registry.register(
            "records_dropped_queue_full",
            "Records dropped because the queue in front of the spool was full",
            self.dropped_queue_full.clone(),
        );
        registry.register(
            "records_sent",
            "Records acknowledged by Kafka",
            self.sent.clone(),
        );
        registry.register(
            "records_replayed",
            "Records sent from spool segments of an earlier process",
            self.replayed.clone(),
        );
        registry.register(
            "delivery_retries",
            "Deliveries that failed and are sent again from the spool",
            self.delivery_retries.clone(),
        );
        registry.register(
            "producer_rebuilds",
            "Kafka producers rebuilt after a fatal error",
            self.producer_rebuilds.clone(),
        );
        registry.register(
            "lag_seconds",
            "Request time to Kafka acknowledgement",
            self.lag.clone(),
        );
        registry.register(
            "kafka_connected",
            "1 while the producer reaches a Kafka broker",
            self.kafka_connected.clone(),
        );
        self.spool.register(registry);
    }
}
