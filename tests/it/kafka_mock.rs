//! The tee against librdkafka's in-process mock cluster: fast fault tests (broker down,
//! refused produce requests, SIGKILL with records in the spool).

use std::collections::HashSet;
use std::time::Duration;

use crate::common::kafka::{
    check_contract, count_missing, graceful_restart_copies, keys, mock_cluster, start_teeing,
    stays_ready_through_outage, wait_sent_then_consume, Consumed,
};
use crate::common::*;
use sluicegate::demo::StandInModel;

fn start(model: std::net::SocketAddr, brokers: &str, spool: &std::path::Path) -> ProxyProcess {
    // Short, so the retry-from-spool path runs within the test's time.
    start_teeing(
        model,
        spool,
        brokers,
        &["--kafka-property", "message.timeout.ms=2000"],
    )
}

/// Waits up to `sent_within` for `n` records sent, then reads them back within 30 s.
async fn delivered(
    proxy: &ProxyProcess,
    brokers: &str,
    n: usize,
    sent_within: Duration,
) -> Vec<Consumed> {
    wait_sent_then_consume(proxy, brokers, n, sent_within, Duration::from_secs(30), &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_requests_give_n_records_in_kafka() {
    let cluster = mock_cluster();
    let brokers = cluster.bootstrap_servers();
    let model = StandInModel::spawn().await.unwrap();
    let spool = spool_dir();
    let proxy = start(model, &brokers, spool.path());
    let (ids, failed) = load(proxy.data, 200, Duration::from_secs(2)).await;
    assert_eq!(failed, 0);
    let n = ids.len();
    let got = delivered(&proxy, &brokers, n, Duration::from_secs(20)).await;
    check_contract(&got);
    assert_eq!(keys(&got), ids.iter().cloned().collect::<HashSet<_>>());
    assert_eq!(got[0].record["request"]["body"]["encoding"], "json");
    // Acknowledged segments leave the spool (the active one stays).
    assert!(proxy.metric("sluicegate_tee_lag_seconds_count") >= n as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_mid_load_loses_nothing_and_keeps_serving() {
    let cluster = mock_cluster();
    let brokers = cluster.bootstrap_servers();
    let model = StandInModel::spawn().await.unwrap();
    let spool = spool_dir();
    let proxy = start(model, &brokers, spool.path());
    let data = proxy.data;
    let traffic = tokio::spawn(async move { load(data, 100, Duration::from_secs(7)).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.broker_down(1).unwrap();
    // The outage spans more than the delivery timeout, so deliveries fail and are retried.
    let sent_during_outage = stays_ready_through_outage(&proxy, 8).await;
    cluster.broker_up(1).unwrap();
    let (ids, failed) = traffic.await.unwrap();
    assert_eq!(failed, 0, "every request succeeds through the outage");
    assert!(sent_during_outage < ids.len() as f64);
    let got = delivered(&proxy, &brokers, ids.len(), Duration::from_secs(60)).await;
    let missing = count_missing(&ids, &keys(&got));
    assert_eq!(missing, 0, "{missing} ids missing after recovery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_produce_requests_wait_in_the_spool_then_arrive() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let cluster = mock_cluster();
    let brokers = cluster.bootstrap_servers();
    // The broker refuses the next 40 produce requests (as one out of replicas would).
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 40],
    );
    let model = StandInModel::spawn().await.unwrap();
    let spool = spool_dir();
    let proxy = start(model, &brokers, spool.path());
    let (ids, failed) = load(proxy.data, 100, Duration::from_secs(2)).await;
    assert_eq!(failed, 0);
    let got = delivered(&proxy, &brokers, ids.len(), Duration::from_secs(60)).await;
    assert_eq!(keys(&got), ids.into_iter().collect::<HashSet<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_records_in_the_spool_then_restart_sends_them() {
    let cluster = mock_cluster();
    let brokers = cluster.bootstrap_servers();
    let model = StandInModel::spawn().await.unwrap();
    let spool = spool_dir();
    cluster.broker_down(1).unwrap();
    let mut proxy = start(model, &brokers, spool.path());
    let (ids, failed) = load(proxy.data, 100, Duration::from_secs(2)).await;
    assert_eq!(failed, 0);
    // Written, not sent: Kafka is down.
    proxy.wait_metric(
        "sluicegate_tee_records_spooled_total",
        ids.len() as f64,
        Duration::from_secs(10),
    );
    assert_eq!(proxy.metric("sluicegate_tee_records_sent_total"), 0.0);
    proxy.sigkill();

    cluster.broker_up(1).unwrap();
    let proxy = start(model, &brokers, spool.path());
    proxy.wait_metric(
        "sluicegate_tee_records_replayed_total",
        ids.len() as f64,
        Duration::from_secs(30),
    );
    let got = delivered(&proxy, &brokers, ids.len(), Duration::from_secs(60)).await;
    assert_eq!(
        count_missing(&ids, &keys(&got)),
        0,
        "records spooled before SIGKILL reach Kafka after restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_resends_nothing_kafka_already_has() {
    let cluster = mock_cluster();
    let model = StandInModel::spawn().await.unwrap();
    let (replayed, copies) = graceful_restart_copies(
        model,
        &cluster.bootstrap_servers(),
        &["--kafka-property", "message.timeout.ms=2000"],
    )
    .await;
    eprintln!(
        "graceful restart: {replayed} records replayed, topic holds {copies} for 201 requests"
    );
    assert_eq!(replayed, 0.0);
    assert_eq!(copies, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_kafka_will_never_accept_is_dead_lettered_and_blocks_nothing() {
    let cluster = mock_cluster();
    let brokers = cluster.bootstrap_servers();
    let model = StandInModel::spawn().await.unwrap();
    let spool = spool_dir();
    // A producer limit of 4000 bytes stands in for a broker's message.max.bytes.
    let proxy = start_teeing(
        model,
        spool.path(),
        &brokers,
        &["--kafka-property", "message.max.bytes=4000"],
    );
    let c = client();
    let big = sluicegate::demo::v2_request(200, 1);
    let (status, headers, _) = post(&c, &proxy.url("/v2/models/m/infer"), big).await;
    assert_eq!(status, 200);
    let big_id = headers["sluicegate-id"].to_str().unwrap().to_owned();
    let mut small_ids = HashSet::new();
    for i in 0..20 {
        let (status, headers, _) = post(
            &c,
            &proxy.url("/v2/models/m/infer"),
            sluicegate::demo::v2_request(1, i),
        )
        .await;
        assert_eq!(status, 200);
        small_ids.insert(headers["sluicegate-id"].to_str().unwrap().to_owned());
    }
    proxy.wait_metric(
        "sluicegate_tee_records_dead_lettered_total",
        1.0,
        Duration::from_secs(20),
    );
    let got = delivered(&proxy, &brokers, 20, Duration::from_secs(20)).await;

    let out = std::process::Command::new(BIN)
        .args(["spool", "cat", "--dead-letter"])
        .arg(spool.path())
        .output()
        .unwrap();
    let dead: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["id"], big_id.as_str());
    assert_eq!(
        keys(&got),
        small_ids,
        "the records behind it were delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_error_librdkafka_calls_fatal_rebuilds_the_producer() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let cluster = mock_cluster();
    let brokers = cluster.bootstrap_servers();
    let model = StandInModel::spawn().await.unwrap();
    let spool = spool_dir();
    let proxy = start(model, &brokers, spool.path());
    let (first, failed) = load(proxy.data, 100, Duration::from_secs(1)).await;
    assert_eq!(failed, 0);
    proxy.wait_metric(
        "sluicegate_tee_records_sent_total",
        first.len() as f64,
        Duration::from_secs(20),
    );
    // An idempotent producer told its epoch is stale cannot go on: librdkafka raises a fatal
    // error, and only a new producer (a new id) can send again.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH; 1],
    );
    let (second, failed) = load(proxy.data, 100, Duration::from_secs(1)).await;
    assert_eq!(failed, 0);
    let all = first.len() + second.len();
    let got = keys(&delivered(&proxy, &brokers, all, Duration::from_secs(60)).await);
    assert!(first.iter().chain(&second).all(|id| got.contains(id)));
    assert!(proxy.metric("sluicegate_tee_producer_rebuilds_total") >= 1.0);
}

/// The audit's partitioner (which label partition belongs with which record partition) puts
/// every key where librdkafka's producer puts it, for its default partitioner and for the
/// Java producer's (`murmur2_random`), with prediction ids and `ID:row` keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_partitions_keys_as_the_producer_does() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use sluicegate::audit::partition::Partitioner;
    let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    for (partitioner, name) in [
        (Partitioner::ConsistentRandom, "consistent_random"),
        (Partitioner::Murmur2Random, "murmur2_random"),
    ] {
        for n in [3, 7] {
            let topic = format!("labels-{name}-{n}");
            cluster.create_topic(&topic, n, 1).expect("topic");
            let producer: FutureProducer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", cluster.bootstrap_servers())
                .set("partitioner", name)
                .create()
                .unwrap();
            let keys: Vec<String> = (0..200)
                .map(|i| {
                    let id = uuid::Uuid::now_v7().to_string();
                    if i % 2 == 0 {
                        id
                    } else {
                        format!("{id}:{}", i % 9)
                    }
                })
                .collect();
            // All in flight at once (send only enqueues), then each delivery awaited.
            let sends: Vec<_> = keys
                .iter()
                .map(|key| {
                    let record = FutureRecord::to(&topic).key(key).payload("{}");
                    producer.send_result(record).map_err(|(e, _)| e).unwrap()
                })
                .collect();
            for (key, send) in keys.iter().zip(sends) {
                let delivered = send.await.unwrap().map_err(|(e, _)| e).unwrap();
                assert_eq!(
                    partitioner.partition(key.as_bytes(), n),
                    Some(delivered.partition),
                    "{name}, {n} partitions, key {key}"
                );
            }
        }
    }
}
