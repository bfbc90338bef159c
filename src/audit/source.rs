//! Where the audit reads JSON objects from: the spool, a Kafka topic, or a JSON-lines file.
//! Each is handed over as its bytes, for the reader to parse as what it expects.
//!
//! Reading a topic never commits consumer offsets unless asked (`commit`), so a second run sees
//! the same data; it reads each partition up to the end it had when the run started.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use crate::tee::spool::{Position, SpoolMetrics, SpoolReader};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

/// A source of JSON objects.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// `spool:DIR`
    Spool(PathBuf),
    /// `kafka://BROKERS/TOPIC`
    Kafka {
        brokers: String,
        topic: String,
        /// Commit offsets when done (a consumer group that moves on); off by default.
        commit: bool,
        group_id: Option<String>,
        properties: Vec<(String, String)>,
    },
    /// A JSON-lines file.
    File(PathBuf),
}

impl Source {
    /// `spool:DIR`, `kafka://BROKERS/TOPIC`, or a path to a JSON-lines file.
    pub fn parse(s: &str) -> Result<Source, String> {
        if let Some(dir) = s.strip_prefix("spool:") {
            return Ok(Source::Spool(dir.into()));
        }
        if let Some(rest) = s.strip_prefix("kafka://") {
            let (brokers, topic) = rest
                .rsplit_once('/')
                .filter(|(b, t)| !b.is_empty() && !t.is_empty())
                .ok_or_else(|| format!("{s:?}: expected kafka://BROKERS/TOPIC"))?;
            return Ok(Source::Kafka {
                brokers: brokers.into(),
                topic: topic.into(),
                commit: false,
                group_id: None,
                properties: Vec::new(),
            });
        }
        Ok(Source::File(s.into()))
    }

    /// Calls `f` with the bytes of every line, spool entry or message (the caller parses them).
    /// `from_ms` lets a topic start at that time instead of its beginning (the caller filters
    /// by time exactly; this only skips what is surely too old).
    pub fn for_each(&self, from_ms: Option<i64>, f: &mut dyn FnMut(&[u8])) -> anyhow::Result<()> {
        use anyhow::Context;
        match self {
            Source::File(path) => {
                let file = std::fs::File::open(path)
                    .with_context(|| format!("cannot open {}", path.display()))?;
                for line in std::io::BufReader::new(file).lines() {
                    let line = line.with_context(|| format!("cannot read {}", path.display()))?;
                    f(line.as_bytes());
                }
                Ok(())
            }
            Source::Spool(dir) => {
                let mut reader = SpoolReader::open(dir, SpoolMetrics::default(), false)
                    .with_context(|| format!("cannot read the spool at {}", dir.display()))?;
                loop {
                    let batch = reader.next_batch(Position::END, 4096)?;
                    if batch.is_empty() {
                        return Ok(());
                    }
                    for e in batch {
                        f(&e.entry.payload);
                    }
                }
            }
            Source::Kafka {
                brokers,
                topic,
                commit,
                group_id,
                properties,
            } => read_topic(
                &Topic {
                    brokers,
                    topic,
                    commit: *commit,
                    group_id: group_id.as_deref(),
                    properties,
                },
                from_ms,
                f,
            ),
        }
    }
}

/// The topic a [`Source::Kafka`] names, borrowed.
struct Topic<'a> {
    brokers: &'a str,
    topic: &'a str,
    commit: bool,
    group_id: Option<&'a str>,
    properties: &'a [(String, String)],
}

fn read_topic(
    source: &Topic<'_>,
    from_ms: Option<i64>,
    f: &mut dyn FnMut(&[u8]),
) -> anyhow::Result<()> {
    let &Topic {
        brokers,
        topic,
        commit,
        group_id,
        properties,
    } = source;
    use anyhow::Context;
    let timeout = Duration::from_secs(10);
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            group_id
                .map(str::to_owned)
                .unwrap_or_else(|| format!("sluicegate-audit-{}", uuid::Uuid::now_v7())),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest");
    for (k, v) in properties {
        config.set(k, v);
    }
    let consumer: BaseConsumer = config.create().context("cannot create a Kafka consumer")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .with_context(|| format!("cannot read the metadata of topic {topic}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        anyhow::bail!("topic {topic} has no partitions (does it exist?)");
    }
    // The end of each partition now: the run reads up to it and stops.
    let mut ends = std::collections::HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for &p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .with_context(|| format!("cannot read the offsets of {topic}/{p}"))?;
        if high > low {
            ends.insert(p, high);
            assignment.add_partition_offset(topic, p, Offset::Offset(low))?;
        }
    }
    if let Some(ms) = from_ms {
        let mut times = TopicPartitionList::new();
        for &p in ends.keys() {
            times.add_partition_offset(topic, p, Offset::Offset(ms))?;
        }
        let found = consumer.offsets_for_times(times, timeout)?;
        for e in found.elements() {
            match e.offset() {
                Offset::Offset(o) => {
                    assignment.set_partition_offset(topic, e.partition(), Offset::Offset(o))?
                }
                // Nothing at or after that time in this partition.
                _ => {
                    ends.remove(&e.partition());
                }
            }
        }
    }
    if ends.is_empty() {
        return Ok(());
    }
    consumer.assign(&assignment)?;
    let mut positions: std::collections::HashMap<i32, i64> = std::collections::HashMap::new();
    let mut idle = 0;
    while !ends.is_empty() {
        match consumer.poll(Duration::from_millis(500)) {
            None => {
                idle += 1;
                if idle > 60 {
                    anyhow::bail!("no records from {topic} for 30 s before reaching its end");
                }
            }
            Some(Err(e)) => return Err(e).context("reading from Kafka"),
            Some(Ok(msg)) => {
                idle = 0;
                let p = msg.partition();
                positions.insert(p, msg.offset() + 1);
                if let Some(payload) = msg.payload() {
                    f(payload);
                }
                if ends.get(&p).is_some_and(|end| msg.offset() + 1 >= *end) {
                    ends.remove(&p);
                }
            }
        }
    }
    if commit {
        let mut offsets = TopicPartitionList::new();
        for (p, o) in positions {
            offsets.add_partition_offset(topic, p, Offset::Offset(o))?;
        }
        consumer.commit(&offsets, CommitMode::Sync)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!(
            Source::parse("spool:/x").unwrap(),
            Source::Spool("/x".into())
        );
        assert!(matches!(
            Source::parse("kafka://a:1,b:2/preds").unwrap(),
            Source::Kafka { ref brokers, ref topic, .. } if brokers == "a:1,b:2" && topic == "preds"
        ));
        assert!(Source::parse("kafka://nobrokers").is_err());
        assert_eq!(
            Source::parse("train.jsonl").unwrap(),
            Source::File("train.jsonl".into())
        );
    }
}
