//! Kafka helpers for tests: a consumer that is not the proxy's own code (an rdkafka consumer in
//! a consumer group), reading records back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};

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
