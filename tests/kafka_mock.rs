//! The tee against librdkafka's in-process mock cluster: fast fault tests (broker down,
//! refused produce requests, SIGKILL with records in the spool).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::kafka::{check_contract, consume};
use common::*;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use sluicegate::demo::StandInModel;

const TOPIC: &str = "predictions";

fn mock_cluster() -> MockCluster<'static, DefaultProducerContext> {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, 3, 1).expect("topic");
    cluster
}

fn start(model: std::net::SocketAddr, brokers: &str, spool: &std::path::Path) -> ProxyProcess {
    let up = format!("http://{model}");
    ProxyProcess::start(&[
        "--upstream",
        &up,
        "--spool-dir",
        path_str(spool),
        "--kafka-brokers",
        brokers,
        "--kafka-topic",
        TOPIC,
        // Short, so the retry-from-spool path runs within the test's time.
        "--kafka-property",
        "message.timeout.ms=2000",
    ])
}

fn distinct(messages: &[common::kafka::Consumed]) -> HashSet<String> {
    messages.iter().map(|m| m.key.clone()).collect()
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
    proxy.wait_metric(
        "sluicegate_tee_records_sent_total",
        ids.len() as f64,
        Duration::from_secs(20),
    );
    let b = brokers.clone();
    let n = ids.len();
    let got =
        tokio::task::spawn_blocking(move || consume(&b, TOPIC, n, Duration::from_secs(30), &[]))
            .await
            .unwrap();
    check_contract(&got);
    assert_eq!(distinct(&got), ids.iter().cloned().collect::<HashSet<_>>());
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
    for _ in 0..8 {
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
    let sent_during_outage = proxy.metric("sluicegate_tee_records_sent_total");
    cluster.broker_up(1).unwrap();
    let (ids, failed) = traffic.await.unwrap();
    assert_eq!(failed, 0, "every request succeeds through the outage");
    assert!(sent_during_outage < ids.len() as f64);
    proxy.wait_metric(
        "sluicegate_tee_records_sent_total",
        ids.len() as f64,
        Duration::from_secs(60),
    );
    let b = brokers.clone();
    let n = ids.len();
    let got =
        tokio::task::spawn_blocking(move || consume(&b, TOPIC, n, Duration::from_secs(30), &[]))
            .await
            .unwrap();
    let got = distinct(&got);
    let missing: Vec<_> = ids.iter().filter(|id| !got.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} ids missing after recovery",
        missing.len()
    );
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
    proxy.wait_metric(
        "sluicegate_tee_records_sent_total",
        ids.len() as f64,
        Duration::from_secs(60),
    );
    let b = brokers.clone();
    let n = ids.len();
    let got =
        tokio::task::spawn_blocking(move || consume(&b, TOPIC, n, Duration::from_secs(30), &[]))
            .await
            .unwrap();
    assert_eq!(distinct(&got), ids.into_iter().collect::<HashSet<_>>());
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
    proxy.wait_metric(
        "sluicegate_tee_records_sent_total",
        ids.len() as f64,
        Duration::from_secs(60),
    );
    let b = brokers.clone();
    let n = ids.len();
    let got =
        tokio::task::spawn_blocking(move || consume(&b, TOPIC, n, Duration::from_secs(30), &[]))
            .await
            .unwrap();
    let got = distinct(&got);
    let missing = ids.iter().filter(|id| !got.contains(*id)).count();
    assert_eq!(
        missing, 0,
        "records spooled before SIGKILL reach Kafka after restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_kafka_will_never_accept_is_dead_lettered_and_blocks_nothing() {
    let cluster = mock_cluster();
    let brokers = cluster.bootstrap_servers();
    let model = StandInModel::spawn().await.unwrap();
    let spool = spool_dir();
    let up = format!("http://{model}");
    // A producer limit of 4000 bytes stands in for a broker's message.max.bytes.
    let proxy = ProxyProcess::start(&[
        "--upstream",
        &up,
        "--spool-dir",
        path_str(spool.path()),
        "--kafka-brokers",
        &brokers,
        "--kafka-topic",
        TOPIC,
        "--kafka-property",
        "message.max.bytes=4000",
    ]);
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
    proxy.wait_metric(
        "sluicegate_tee_records_sent_total",
        20.0,
        Duration::from_secs(20),
    );

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
    let b = brokers.clone();
    let got =
        tokio::task::spawn_blocking(move || consume(&b, TOPIC, 20, Duration::from_secs(30), &[]))
            .await
            .unwrap();
    assert_eq!(
        distinct(&got),
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
    proxy.wait_metric(
        "sluicegate_tee_records_sent_total",
        all as f64,
        Duration::from_secs(60),
    );
    let b = brokers.clone();
    let got =
        tokio::task::spawn_blocking(move || consume(&b, TOPIC, all, Duration::from_secs(30), &[]))
            .await
            .unwrap();
    let got = distinct(&got);
    assert!(first.iter().chain(&second).all(|id| got.contains(id)));
    assert!(proxy.metric("sluicegate_tee_producer_rebuilds_total") >= 1.0);
}
