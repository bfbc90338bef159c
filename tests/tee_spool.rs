//! The tee with no Kafka: the spool is the sink. Records match the JSON Schema, nothing that
//! reached the spool is lost to SIGKILL, and the spool stays within its bound.

mod common;

use std::time::Duration;

use common::*;
use sluicegate::demo::{v2_request, StandInModel};

fn schema_validator() -> jsonschema::Validator {
    let text = std::fs::read_to_string(repo_path("src/tee/record.v1.schema.json")).unwrap();
    let schema: serde_json::Value = serde_json::from_str(&text).unwrap();
    jsonschema::validator_for(&schema).expect("the schema is valid JSON Schema")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gives_one_schema_valid_record() {
    let model = StandInModel::spawn().await.unwrap();
    let spool = spool_dir();
    let proxy = start_proxy(model, spool.path(), &[]);
    let c = client();
    let n = 200;
    let mut ids = std::collections::HashSet::new();
    for i in 0..n {
        let req = http::Request::post(proxy.url("/v2/models/spam-filter/infer"))
            .header("content-type", "application/json")
            .header("authorization", "Bearer secret")
            .header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .header("x-request-id", format!("rq-{i}"))
            .header("sluicegate-consumer", "checkout")
            .body(http_body_util::Full::new(bytes::Bytes::from(v2_request(
                1 + i % 3,
                i as u64,
            ))))
            .unwrap();
        let resp = c.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        ids.insert(resp.headers()["sluicegate-id"].to_str().unwrap().to_owned());
    }
    // A request the proxy answers itself is recorded too, and validates.
    let (status, _, _) = post(&c, &proxy.url("/nope"), "{").await;
    assert_eq!(status, 404);
    proxy.wait_metric(
        "sluicegate_tee_records_spooled_total",
        (n + 1) as f64,
        Duration::from_secs(10),
    );

    let records = spool_records(spool.path());
    assert_eq!(records.len(), n + 1);
    let validator = schema_validator();
    for r in &records {
        let errors: Vec<String> = validator.iter_errors(r).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "record does not match the schema: {errors:?}\n{r}"
        );
    }
    let recorded: std::collections::HashSet<String> = records
        .iter()
        .filter(|r| r["request"]["path"] != "/nope")
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(recorded, ids, "exactly the ids the clients saw");
    let r = records
        .iter()
        .find(|r| r["request"]["path"] != "/nope")
        .unwrap();
    assert_eq!(r["request"]["headers"]["authorization"], "[redacted]");
    assert!(r["request"]["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .starts_with("00-0af7"));
    assert!(r["request"]["headers"]["x-request-id"]
        .as_str()
        .unwrap()
        .starts_with("rq-"));
    assert_eq!(r["consumer"]["id"], "checkout");
    assert!(!r["instance"].as_str().unwrap().is_empty());
    assert_eq!(r["policy"]["generation"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_nothing_that_was_reported_written() {
    let model = StandInModel::spawn().await.unwrap();
    let spool = spool_dir();
    let mut proxy = start_proxy(model, spool.path(), &[]);
    let c = client();
    let mut ids = Vec::new();
    for i in 0..300 {
        let (status, headers, _) =
            post(&c, &proxy.url("/v2/models/m/infer"), v2_request(2, i)).await;
        assert_eq!(status, 200);
        ids.push(headers["sluicegate-id"].to_str().unwrap().to_owned());
    }
    // Kill only after the proxy reports them written, as the guarantee is stated.
    proxy.wait_metric(
        "sluicegate_tee_records_spooled_total",
        300.0,
        Duration::from_secs(10),
    );
    proxy.sigkill();

    let found: std::collections::HashSet<String> = spool_records(spool.path())
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    for id in &ids {
        assert!(found.contains(id), "record {id} lost to SIGKILL");
    }

    // Restarted on the same spool, it keeps the old records and adds new ones after them.
    let proxy = start_proxy(model, spool.path(), &[]);
    let (status, _, _) = post(&c, &proxy.url("/v2/models/m/infer"), v2_request(1, 9)).await;
    assert_eq!(status, 200);
    proxy.wait_metric(
        "sluicegate_tee_records_spooled_total",
        1.0,
        Duration::from_secs(10),
    );
    assert_eq!(spool_records(spool.path()).len(), 301);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_without_kafka_rotates_out_its_oldest_segment() {
    let model = StandInModel::spawn().await.unwrap();
    let spool = spool_dir();
    let proxy = start_proxy(model, spool.path(), &SMALL_SPOOL);
    let c = client();
    let mut last = String::new();
    for i in 0..300 {
        let (status, headers, _) =
            post(&c, &proxy.url("/v2/models/m/infer"), v2_request(4, i)).await;
        assert_eq!(status, 200);
        last = headers["sluicegate-id"].to_str().unwrap().to_owned();
    }
    proxy.wait_metric(
        "sluicegate_tee_records_spooled_total",
        300.0,
        Duration::from_secs(10),
    );
    assert!(proxy.metric("sluicegate_tee_spool_segments_rotated_total") > 0.0);
    assert!(proxy.metric("sluicegate_tee_spool_bytes") <= (64 << 10) as f64 + (16 << 10) as f64);
    let records = spool_records(spool.path());
    assert!(records.len() < 300, "old records rotated out");
    assert_eq!(
        records.last().unwrap()["id"],
        last.as_str(),
        "the newest record is kept"
    );
}
