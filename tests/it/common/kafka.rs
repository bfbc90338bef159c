//! Kafka helpers for tests: a consumer that is not the proxy's own code (an rdkafka consumer in
//! a consumer group), reading records back.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use super::{start_proxy, ProxyProcess};

pub const TOPIC: &str = "predictions";

/// librdkafka's in-process mock cluster: one broker, [`TOPIC`] in 3 partitions.
pub fn mock_cluster() -> MockCluster<'static, DefaultProducerContext> {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, 3, 1).expect("topic");
    cluster
}

/// Starts the proxy in front of `upstream`, teeing to [`TOPIC`] on `brokers`; `extra` flags
/// follow.
pub fn start_teeing(
    upstream: SocketAddr,
    spool: &Path,
    brokers: &str,
    extra: &[&str],
) -> ProxyProcess {
    let mut args = vec!["--kafka-brokers", brokers, "--kafka-topic", TOPIC];
    args.extend_from_slice(extra);
    start_proxy(upstream, spool, &args)
}

/// One message as a consumer sees it.
#[derive(Clone, Debug)]
pub struct Consumed {
    pub key: String,
    pub timestamp_ms: Option<i64>,
    pub headers: HashMap<String, String>,
    pub record: serde_json::Value,
}

/// Reads `topic` from the beginning in a fresh consumer group until `want` distinct keys
/// arrived or `limit` passed. Returns every message read (duplicates included).
pub fn consume(
    brokers: &str,
    topic: &str,
    want: usize,
    limit: Duration,
    extra: &[(&str, &str)],
) -> Vec<Consumed> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-{}", uuid::Uuid::now_v7()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false");
    for (k, v) in extra {
        config.set(*k, *v);
    }
    let consumer: BaseConsumer = config.create().expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    let mut keys = std::collections::HashSet::new();
    while keys.len() < want && Instant::now() < deadline {
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let Ok(msg) = msg else { continue };
        let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
        let mut headers = HashMap::new();
        if let Some(h) = msg.headers() {
            for header in h.iter() {
                headers.insert(
                    header.key.to_owned(),
                    String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        let record =
            serde_json::from_slice(msg.payload().unwrap_or_default()).expect("JSON record");
        keys.insert(key.clone());
        out.push(Consumed {
            key,
            timestamp_ms: msg.timestamp().to_millis(),
            headers,
            record,
        });
    }
    out
}

/// Checks the Kafka contract on what was consumed: key = id, headers, timestamp = request time.
pub fn check_contract(messages: &[Consumed]) {
    for m in messages {
        assert_eq!(m.record["id"], m.key.as_str(), "key is the prediction id");
        assert_eq!(m.headers["sluicegate-schema"], "sluicegate.record.v1");
        assert_eq!(
            m.headers["sluicegate-route"],
            m.record["route"].as_str().unwrap()
        );
        let time = humantime::parse_rfc3339(m.record["time"].as_str().unwrap()).unwrap();
        let ms = time
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert_eq!(
            m.timestamp_ms,
            Some(ms),
            "message timestamp is the request time"
        );
    }
}

/// With Kafka just made unreachable: checks every 500 ms, `checks` times, that the proxy stays
/// ready, then that it saw the outage. Returns the records it had sent by then.
pub async fn stays_ready_through_outage(proxy: &ProxyProcess, checks: u32) -> f64 {
    for _ in 0..checks {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            proxy.ready(),
            "a Kafka outage must not make the proxy unready"
        );
    }
    assert_eq!(
        proxy.metric("sluicegate_tee_kafka_connected"),
        0.0,
        "the outage was seen"
    );
    proxy.metric("sluicegate_tee_records_sent_total")
}

/// Waits up to `sent_within` until `proxy` reports `n` records sent, then [`consume`]s `n` keys
/// of [`TOPIC`] within `read_within`, on a blocking thread so the runtime keeps running.
pub async fn wait_sent_then_consume(
    proxy: &ProxyProcess,
    brokers: &str,
    n: usize,
    sent_within: Duration,
    read_within: Duration,
    config: &[(&str, &str)],
) -> Vec<Consumed> {
    proxy.wait_metric("sluicegate_tee_records_sent_total", n as f64, sent_within);
    let brokers = brokers.to_owned();
    let config: Vec<(String, String)> = config
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let config: Vec<(&str, &str)> = config.iter().map(|(k, v)| (&**k, &**v)).collect();
        consume(&brokers, TOPIC, n, read_within, &config)
    })
    .await
    .unwrap()
}

/// The distinct keys (prediction ids) of `messages`.
pub fn keys(messages: &[Consumed]) -> HashSet<String> {
    messages.iter().map(|m| m.key.clone()).collect()
}

/// How many of `ids` are not among `got`.
pub fn count_missing(ids: &[String], got: &HashSet<String>) -> usize {
    ids.iter().filter(|id| !got.contains(*id)).count()
}

/// How many messages `topic` holds, copies included: read from the beginning by a fresh
/// consumer group until nothing new came for 2 s (at most 60 s). Counted by reading, not from
/// the partitions' watermarks: tansu's do not count records.
pub fn topic_messages(brokers: &str, topic: &str) -> usize {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("count-{}", uuid::Uuid::now_v7()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = Instant::now();
    let mut n = 0;
    while Instant::now() < deadline && (n == 0 || last.elapsed() < Duration::from_secs(2)) {
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(200)) {
            n += 1;
            last = Instant::now();
        }
    }
    n
}

/// 200 requests, every record acknowledged, SIGTERM, a restart on the same spool and one more
/// request: returns (records replayed by the restart, messages in the topic). Without
/// checkpointed acknowledgements the restart resends the whole open segment.
pub async fn graceful_restart_copies(
    upstream: SocketAddr,
    brokers: &str,
    extra: &[&str],
) -> (f64, usize) {
    let spool = super::spool_dir();
    let mut proxy = start_teeing(upstream, spool.path(), brokers, extra);
    let (ids, failed) = super::load(proxy.data, 200, Duration::from_secs(1)).await;
    assert_eq!((ids.len(), failed), (200, 0));
    proxy.wait_metric(
        "sluicegate_tee_records_sent_total",
        200.0,
        Duration::from_secs(30),
    );
    assert!(proxy.sigterm().success());
    let proxy = start_teeing(upstream, spool.path(), brokers, extra);
    // The spool is read oldest first: once this record is sent, any replay was sent before it.
    let (status, _, _) = super::post(
        &super::client(),
        &proxy.url("/v2/models/m/infer"),
        sluicegate::demo::v2_request(1, 0),
    )
    .await;
    assert_eq!(status, 200);
    proxy.wait_metric(
        "sluicegate_tee_records_sent_total",
        1.0,
        Duration::from_secs(30),
    );
    // Deliveries run side by side: let any replay still in flight land.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let replayed = proxy.metric("sluicegate_tee_records_replayed_total");
    let brokers = brokers.to_owned();
    let copies = tokio::task::spawn_blocking(move || topic_messages(&brokers, TOPIC))
        .await
        .unwrap();
    (replayed, copies)
}
