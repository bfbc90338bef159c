//! Provenance end to end: traffic through the proxy → signed tags and records in Kafka → a
//! training file planted with known shares of tagged rows (two models, forged tags) and labels
//! with a known bias → `sluicegate audit` reports exactly those.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::kafka::{mock_cluster, TOPIC};
use crate::common::*;
use sluicegate::demo::{v2_request, StandInModel};

const POLICY: &str = r#"
tagging: {algorithm: ed25519, signing_key: k1}
routes:
  spam:
    match: {model: spam-filter}
    protocol: v2
    score: {output: predict_proba, column: 1}
    decision:
      binary: {action: spam, otherwise: ham, threshold: {fixed: 0.5}}
  ranker:
    match: {model: ranker}
    protocol: v1
    score: {}
    decision:
      binary: {action: top, otherwise: rest, threshold: {fixed: 0.5}}
    tag_field: /sluicegate_tag
"#;

/// Makes the signing key k1 in DIR/keys, then starts the proxy in front of `model` with
/// [`POLICY`] and its spool in DIR/spool; `extra` flags follow.
fn start_tagging(
    model: std::net::SocketAddr,
    dir: &std::path::Path,
    extra: &[&str],
) -> ProxyProcess {
    let keys = dir.join("keys");
    let (code, _, err) = run(&["tag", "keygen", "--id", "k1", "--dir", path_str(&keys)]);
    assert_eq!(code, 0, "{err}");
    let policy = write_policy(dir, POLICY);
    let mut args = vec!["--tag-keys-dir", path_str(&keys)];
    args.extend_from_slice(extra);
    start_with_policy(model, dir, &policy, &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_finds_the_planted_loops_and_bias() {
    let cluster = mock_cluster();
    let brokers = cluster.bootstrap_servers();
    let model = StandInModel::spawn().await.unwrap();
    let dir = spool_dir();
    // Decisions in columns: the audit reads them as it reads one object per row (its unit
    // tests read the row form).
    let proxy = start_tagging(
        model,
        dir.path(),
        &[
            "--kafka-brokers",
            &brokers,
            "--kafka-topic",
            TOPIC,
            "--record-decisions",
            "columns",
        ],
    );
    // The auditor holds only the public key.
    let public = dir.path().join("public");
    std::fs::create_dir(&public).unwrap();
    std::fs::copy(
        dir.path().join("keys/k1.ed25519.pub"),
        public.join("k1.ed25519.pub"),
    )
    .unwrap();
    let c = client();
    let mut spam_tags = Vec::new();
    let mut spam_actions = HashMap::new();
    for i in 0..100 {
        let (s, h, _) = post(
            &c,
            &proxy.url("/v2/models/spam-filter/infer"),
            v2_request(1, i),
        )
        .await;
        assert_eq!(s, 200);
        let tag = h["sluicegate-tag"].to_str().unwrap().to_owned();
        let id = h["sluicegate-id"].to_str().unwrap().to_owned();
        spam_actions.insert(
            id.clone(),
            h["sluicegate-action"].to_str().unwrap().to_owned(),
        );
        spam_tags.push((id, tag));
    }
    let mut ranker_tags = Vec::new();
    for i in 0..20 {
        let body = format!(r#"{{"instances": [[{}, 0.5, 0.2, 0.1]]}}"#, i as f64 / 10.0);
        let (s, h, resp) = post(&c, &proxy.url("/v1/models/ranker:predict"), body).await;
        assert_eq!(s, 200);
        let tag = h["sluicegate-tag"].to_str().unwrap().to_owned();
        let v: serde_json::Value = serde_json::from_slice(&resp).unwrap();
        assert_eq!(
            v["sluicegate_tag"],
            tag.as_str(),
            "the tag is in the body too"
        );
        ranker_tags.push(tag);
    }
    // `tag verify` with the public key only.
    let (code, out, _) = run(&[
        "tag",
        "verify",
        &spam_tags[0].1,
        "--keys",
        path_str(&public),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("spam-filter"), "{out}");
    let mut forged = spam_tags[1].1.clone().into_bytes();
    let n = forged.len();
    forged[n / 2] = if forged[n / 2] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let (code, out, _) = run(&["tag", "verify", &forged, "--keys", path_str(&public)]);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("invalid"), "{out}");

    proxy.wait_metric(
        "sluicegate_tee_records_sent_total",
        120.0,
        Duration::from_secs(30),
    );

    // Training data for spam-filter: 30 of its own outputs (direct), 10 of the ranker's
    // (hidden), 5 forged, 55 untagged.
    let mut training = String::new();
    for (i, (_, tag)) in spam_tags.iter().take(30).enumerate() {
        training.push_str(&format!(
            "{{\"text\": \"mail {i}\", \"sluicegate_tag\": \"{tag}\", \"sluicegate_row\": 0}}\n"
        ));
    }
    for tag in ranker_tags.iter().take(10) {
        training.push_str(&format!("{{\"features\": {{\"upstream\": \"{tag}\"}}}}\n"));
    }
    for _ in 0..5 {
        training.push_str(&format!("{{\"sluicegate_tag\": \"{forged}\"}}\n"));
    }
    for i in 0..55 {
        training.push_str(&format!("{{\"text\": \"organic {i}\"}}\n"));
    }
    let train = dir.path().join("train.jsonl");
    std::fs::write(&train, training).unwrap();

    // Labels for the 100 spam predictions: the first 40 spam, the rest ham.
    let mut labels = String::new();
    let mut observed_spam = 0;
    for (i, (id, _)) in spam_tags.iter().enumerate() {
        let label = if i < 40 { "spam" } else { "ham" };
        observed_spam += usize::from(i < 40);
        labels.push_str(&format!("{{\"id\": \"{id}:0\", \"label\": \"{label}\"}}\n"));
    }
    let labels_file = dir.path().join("labels.jsonl");
    std::fs::write(&labels_file, labels).unwrap();
    let predicted_spam = spam_actions.values().filter(|a| *a == "spam").count();

    let predictions = format!("kafka://{brokers}/{TOPIC}");
    let training_arg = format!("spam-filter={}", train.display());
    let args = [
        "audit",
        "--predictions",
        &predictions,
        "--training",
        &training_arg,
        "--labels",
        path_str(&labels_file),
        "--keys",
        path_str(&public),
        "--format",
        "json",
    ];
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["predictions_read"], 120);
    let cell = |producer: &str| {
        report["feedback_loops"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["producer"] == producer)
            .unwrap_or_else(|| panic!("no row for {producer}: {report}"))
            .clone()
    };
    let direct = cell("spam-filter");
    assert_eq!(
        (direct["rows"].as_u64(), direct["total_rows"].as_u64()),
        (Some(30), Some(100))
    );
    assert_eq!(direct["direct"], true);
    let hidden = cell("ranker");
    assert_eq!(hidden["rows"], 10);
    assert_eq!(
        hidden["direct"], false,
        "another model's outputs: a hidden loop"
    );
    let untagged = cell("untagged");
    assert_eq!(untagged["rows"], 60);
    assert_eq!(
        untagged["invalid_tags"], 5,
        "forged tags are counted and never trusted"
    );

    let spam_bias = report["bias"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "spam" && r["action"] == "spam")
        .unwrap()
        .clone();
    assert_eq!(spam_bias["labeled_rows"], 100);
    assert_eq!(spam_bias["model_version"], "3");
    let expect = predicted_spam as f64 / 100.0 - observed_spam as f64 / 100.0;
    assert!(
        (spam_bias["bias"].as_f64().unwrap() - expect).abs() < 1e-9,
        "{spam_bias}"
    );

    let rates = report["action_rates"].as_array().unwrap();
    let spam_decisions: u64 = rates
        .iter()
        .filter(|r| r["route"] == "spam")
        .map(|r| r["decisions"].as_u64().unwrap())
        .sum();
    assert_eq!(spam_decisions, 100);

    // A second run sees the same data: no offsets were committed.
    let (_, again, _) = run(&args);
    let again: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!(again["predictions_read"], 120);

    // The gate: 40% of the rows came from models.
    let mut gated: Vec<&str> = args.to_vec();
    gated.extend(["--max-loop-fraction", "0.3"]);
    assert_eq!(run(&gated).0, 3);
    let mut open: Vec<&str> = args.to_vec();
    open.extend(["--max-loop-fraction", "0.5"]);
    assert_eq!(run(&open).0, 0);

    // The table for people.
    let (code, table, _) = run(&args[..args.len() - 2]);
    assert_eq!(code, 0);
    eprintln!("{table}");
    assert!(
        table.contains("Feedback loops") && table.contains("hidden") && table.contains("direct"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_coming_back_in_are_recorded_as_direct_or_hidden_loops() {
    let model = StandInModel::spawn().await.unwrap();
    let dir = spool_dir();
    let proxy = start_tagging(model, dir.path(), &[]);
    let c = client();
    let (_, h, _) = post(
        &c,
        &proxy.url("/v2/models/spam-filter/infer"),
        v2_request(1, 1),
    )
    .await;
    let spam_tag = h["sluicegate-tag"].to_str().unwrap().to_owned();
    let (_, h, _) = post(
        &c,
        &proxy.url("/v1/models/ranker:predict"),
        r#"{"instances": [[1, 2, 3, 4]]}"#,
    )
    .await;
    let ranker_tag = h["sluicegate-tag"].to_str().unwrap().to_owned();

    // The spam model's own output as an input (in the body): a direct loop.
    let mut body: serde_json::Value = serde_json::from_str(&v2_request(1, 2)).unwrap();
    body["parameters"] = serde_json::json!({"previous": spam_tag});
    let (_, h, _) = post(
        &c,
        &proxy.url("/v2/models/spam-filter/infer"),
        body.to_string(),
    )
    .await;
    let direct_id = h["sluicegate-id"].to_str().unwrap().to_owned();
    // The ranker's output into the spam model (in a header): a hidden loop.
    let req = http::Request::post(proxy.url("/v2/models/spam-filter/infer"))
        .header("sluicegate-tag", &ranker_tag)
        .body(http_body_util::Full::new(bytes::Bytes::from(v2_request(
            1, 3,
        ))))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let hidden_id = resp.headers()["sluicegate-id"].to_str().unwrap().to_owned();
    // A forged one: counted, never trusted.
    let forged = format!("{}x", &spam_tag[..spam_tag.len() - 1]);
    let mut body: serde_json::Value = serde_json::from_str(&v2_request(1, 4)).unwrap();
    body["parameters"] = serde_json::json!({"previous": forged});
    let (_, h, _) = post(
        &c,
        &proxy.url("/v2/models/spam-filter/infer"),
        body.to_string(),
    )
    .await;
    let forged_id = h["sluicegate-id"].to_str().unwrap().to_owned();

    let records = proxy.spool_records_after(&dir.path().join("spool"), 5.0);
    let inbound =
        |id: &str| records.iter().find(|r| r["id"] == id).unwrap()["inbound_tags"].clone();
    let d = inbound(&direct_id);
    assert_eq!(d[0]["feedback"], "direct", "{d}");
    assert_eq!(d[0]["found_in"], "body");
    assert_eq!(d[0]["model"], "spam-filter");
    let hd = inbound(&hidden_id);
    assert_eq!(hd[0]["feedback"], "hidden", "{hd}");
    assert_eq!(hd[0]["model"], "ranker");
    assert_eq!(hd[0]["found_in"], "header");
    let f = inbound(&forged_id);
    assert_eq!(f[0]["valid"], false, "{f}");
    assert!(
        f[0].get("prediction_id").is_none(),
        "an invalid tag's claims are not trusted"
    );
    let metrics = admin_get(proxy.admin, "/metrics").1;
    for kind in ["direct", "hidden", "invalid"] {
        assert!(
            metrics.contains(&format!(
                "sluicegate_inbound_tags_total{{route=\"spam\",kind=\"{kind}\"}} 1"
            )),
            "{kind}: {metrics}"
        );
    }
}

/// `n` requests to the spam route at `rate` per second, each with `body`; returns how many
/// failed.
async fn flood(proxy: &ProxyProcess, body: &str, rate: u32, n: u32) -> usize {
    let c = client();
    let url = proxy.url("/v2/models/spam-filter/infer");
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        tokio::time::sleep_until(start + interval * i).await;
        let (c, url, body) = (c.clone(), url.clone(), body.to_owned());
        tasks.push(tokio::spawn(async move {
            let req = http::Request::post(url)
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap();
            matches!(
                tokio::time::timeout(Duration::from_secs(10), c.request(req)).await,
                Ok(Ok(r)) if r.status() == 200
            )
        }));
    }
    let mut failed = 0;
    for t in tasks {
        failed += usize::from(!t.await.unwrap());
    }
    failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_forged_tags_costs_no_records() {
    let model = StandInModel::spawn().await.unwrap();
    let dir = spool_dir();
    // A short queue in front of the spool: a writer starved for time drops records at once.
    let config = dir.path().join("settings.yaml");
    std::fs::write(&config, "spool:\n  queue_records: 64\n").unwrap();
    let proxy = start_tagging(model, dir.path(), &["--config", path_str(&config)]);
    let (_, h, _) = post(
        &client(),
        &proxy.url("/v2/models/spam-filter/infer"),
        v2_request(1, 1),
    )
    .await;
    // Well-formed, signed by a key the proxy holds, the signature altered: each one costs a
    // full signature check.
    let tag = h["sluicegate-tag"].to_str().unwrap();
    let forged: Vec<String> = (0..8)
        .map(|i| {
            let mut t = tag.as_bytes().to_vec();
            let at = t.len() - 2 - i;
            t[at] = if t[at] == b'A' { b'B' } else { b'A' };
            String::from_utf8(t).unwrap()
        })
        .collect();
    let plain = v2_request(2, 7);
    let mut tagged: serde_json::Value = serde_json::from_str(&plain).unwrap();
    tagged["parameters"] = serde_json::json!({ "previous": forged });
    let tagged = tagged.to_string();

    let (rate, n) = (300, 900);
    let dropped = || proxy.metric("sluicegate_tee_records_dropped_queue_full_total");
    let failed = flood(&proxy, &plain, rate, n).await;
    assert_eq!(failed, 0);
    let without_tags = dropped();
    let failed = flood(&proxy, &tagged, rate, n).await;
    assert_eq!(failed, 0);
    proxy.wait_metric(
        "sluicegate_tee_records_spooled_total",
        f64::from(2 * n + 1) - dropped(),
        Duration::from_secs(20),
    );
    let with_tags = dropped() - without_tags;
    let metrics = scrape(proxy.admin);
    let kind =
        |k: &str| metrics.sum_with("sluicegate_inbound_tags_total", &format!("kind=\"{k}\""));
    eprintln!(
        "{n} requests at {rate}/s: {without_tags} records dropped without tags, {with_tags} with \
         8 forged tags each; tags counted: {} invalid, {} unverified",
        kind("invalid"),
        kind("unverified")
    );
    assert_eq!(without_tags, 0.0);
    assert_eq!(with_tags, 0.0, "forged tags cost records");
    assert_eq!(kind("invalid") + kind("unverified"), f64::from(8 * n));
}
