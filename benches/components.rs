//! Per-request components of the proxy, each beside a naive baseline:
//! - `tag_sign` / `tag_verify`: a provenance tag (Ed25519 and HMAC-SHA256) for 1 and 8 rows,
//!   against the same claims as compact JSON in base64url with no signature (`sg1.<payload>`,
//!   decoded with the signature ignored). The gap is the signature plus sluicegate's claim
//!   checks.
//! - `record_encode_*`: `Exchange::encode` of a v2 exchange with the ~1 KiB and ~16 KiB bodies of
//!   the end-to-end bench, as `sluicegate-tee` records it (default policy) and as
//!   `sluicegate-full` does (its policy, one decision per row, a tag), against building a
//!   `serde_json::Value` of the same record, bodies parsed, and serializing it. The baseline
//!   skips the inbound-tag search and the record size cap.
//! - `extract_v1_*` / `extract_v2_*`: `decide::extract::extract` on a TF-Serving `predictions`
//!   response and on a v2 `[n,2]` `predict_proba` output, against a hand-written walk that
//!   flattens the tensor; both with the parse of the body and on an already parsed body (the
//!   extraction alone). For v2, also `extract_v2` straight from the bytes: what the request path
//!   pays per response on a v2 route (no `Value` of the whole answer).
//!
//! Run: `cargo bench --bench components` (add `-- tag_` etc. to pick groups).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use http::{HeaderMap, Method};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sluicegate::config::policy::{PolicySpec, Protocol, ScoreSpec};
use sluicegate::config::settings::RecordDecisions;
use sluicegate::config::validate::parse;
use sluicegate::decide::extract::{extract, extract_v2, Scores};
use sluicegate::demo::{v2_request, StandInModel};
use sluicegate::policy::Policy;
use sluicegate::provenance::{
    generate_key, Algorithm, ClaimsInput, KeyRing, TagClaims, TAG_PREFIX,
};
use sluicegate::tee::record::{
    Capture, DecisionOutcome, EncodeContext, Exchange, Message, ReadJson, RECORD_SCHEMA,
};

/// Rows of the end-to-end bench's bodies: ~1 KiB and ~16 KiB v2 responses.
const SIZES: [(&str, usize); 2] = [("1KiB", 23), ("16KiB", 421)];
const ID: &str = "0190f0c4-7a1e-7b3c-9d2f-3c1b2a4d5e6f";
const POLICY_VERSION: &str = "3f9a1c0b2d4e";
const TIME_MS: i64 = 1_735_689_600_000;

fn actions(rows: usize) -> Vec<&'static str> {
    (0..rows)
        .map(|i| if i % 4 == 0 { "spam" } else { "ham" })
        .collect()
}

/// The tag's payload fields, as a plain serde struct.
#[derive(Serialize, Deserialize)]
struct NaiveClaims {
    k: String,
    alg: String,
    id: String,
    r: String,
    m: Option<String>,
    mv: Option<String>,
    p: String,
    n: usize,
    a: Vec<String>,
    t: i64,
}

fn naive_token(key: &str, actions: &[&str]) -> String {
    let claims = NaiveClaims {
        k: key.to_owned(),
        alg: "ed25519".to_owned(),
        id: ID.to_owned(),
        r: "spam".to_owned(),
        m: Some("spam-filter".to_owned()),
        mv: Some("3".to_owned()),
        p: POLICY_VERSION.to_owned(),
        n: actions.len(),
        a: actions.iter().map(|a| a.to_string()).collect(),
        t: TIME_MS,
    };
    let mut token = TAG_PREFIX.to_owned();
    URL_SAFE_NO_PAD.encode_string(serde_json::to_vec(&claims).unwrap(), &mut token);
    token
}

fn naive_decode(token: &str) -> NaiveClaims {
    let rest = token.strip_prefix(TAG_PREFIX).unwrap();
    let payload = rest.split('.').next().unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

fn tags(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    generate_key(dir.path(), "ed", Algorithm::Ed25519).unwrap();
    generate_key(dir.path(), "hs", Algorithm::HmacSha256).unwrap();
    let keys = KeyRing::load_dir(dir.path()).unwrap();
    // As the proxy does per response: build the claims, then sign them.
    let sign = |key: &str, alg: Algorithm, actions: &[&str]| {
        let mut claims = TagClaims::new(ClaimsInput {
            prediction_id: ID,
            route: "spam",
            model: Some("spam-filter"),
            model_version: Some("3"),
            policy_version: POLICY_VERSION,
            actions,
            timestamp_ms: TIME_MS,
            ..Default::default()
        });
        keys.sign(key, alg, &mut claims).unwrap()
    };
    let signers = [
        ("sluicegate_ed25519", "ed", Algorithm::Ed25519),
        ("sluicegate_hmac_sha256", "hs", Algorithm::HmacSha256),
    ];

    let mut g = c.benchmark_group("tag_sign");
    for rows in [1, 8] {
        let actions = actions(rows);
        for (name, key, alg) in signers {
            g.bench_with_input(BenchmarkId::new(name, rows), &actions, |b, a| {
                b.iter(|| sign(key, alg, black_box(a)))
            });
        }
        g.bench_with_input(
            BenchmarkId::new("baseline_unsigned_json_base64", rows),
            &actions,
            |b, a| b.iter(|| naive_token("ed", black_box(a))),
        );
    }
    g.finish();

    let mut g = c.benchmark_group("tag_verify");
    for rows in [1, 8] {
        let actions = actions(rows);
        for (name, key, alg) in signers {
            let token = sign(key, alg, &actions);
            g.bench_with_input(BenchmarkId::new(name, rows), &token, |b, t| {
                b.iter(|| keys.verify(black_box(t)).unwrap())
            });
        }
        // The same token, its signature ignored.
        let token = sign("ed", Algorithm::Ed25519, &actions);
        g.bench_with_input(
            BenchmarkId::new("baseline_unsigned_json_base64", rows),
            &token,
            |b, t| b.iter(|| naive_decode(black_box(t))),
        );
    }
    g.finish();
}

fn capture(bytes: &[u8], cap: usize) -> Capture {
    let mut c = Capture::with_cap(cap);
    c.push(bytes);
    c
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    pairs
        .iter()
        .map(|(k, v)| (http::HeaderName::from_static(k), v.parse().unwrap()))
        .collect()
}

/// A v2 exchange as the proxy captures it; `policy` decides whether it carries decisions.
fn exchange(rows: usize, policy: Arc<Policy>, keys: &KeyRing) -> Exchange {
    let request = v2_request(rows, 7);
    let response = StandInModel::infer_v2(&serde_json::from_str(&request).unwrap()).unwrap();
    let response = serde_json::to_vec(&response).unwrap();
    let path = "/v2/models/spam-filter/infer";
    let (decision, tag) = match policy.routes.route_for(path) {
        Some(route) => {
            let scores = extract(
                route.protocol(),
                route.spec.score.as_ref().unwrap(),
                route.classes(),
                &serde_json::from_slice(&response).unwrap(),
            )
            .unwrap();
            let decided = route.decide(&scores, Instant::now());
            let actions: Vec<&str> = decided.rows.iter().map(|r| &*r.final_action).collect();
            let mut claims = TagClaims::new(ClaimsInput {
                prediction_id: ID,
                route: "spam",
                model: Some("spam-filter"),
                model_version: Some("3"),
                policy_version: &policy.version,
                actions: &actions,
                timestamp_ms: TIME_MS,
                ..Default::default()
            });
            let tag = keys.sign("ed", Algorithm::Ed25519, &mut claims);
            (Some(DecisionOutcome::Made(decided.rows)), tag)
        }
        None => (None, None),
    };
    let cap = policy.body_cap;
    Exchange {
        id: ID.into(),
        time: SystemTime::now(),
        route: if decision.is_some() {
            "spam"
        } else {
            "default"
        }
        .into(),
        consumer: Some("mail-ingest".into()),
        method: Method::POST,
        path: path.into(),
        request: Message {
            headers: headers(&[
                ("host", "sluicegate:8080"),
                ("user-agent", "oha/1.4.5"),
                ("accept", "*/*"),
                ("content-type", "application/json"),
                ("content-length", &request.len().to_string()),
                (
                    "authorization",
                    "Bearer eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl",
                ),
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
                ("sluicegate-consumer", "mail-ingest"),
            ]),
            trailers: None,
            body: capture(request.as_bytes(), cap),
        },
        status: Some(200),
        response: Some(Message {
            headers: headers(&[
                ("content-type", "application/json"),
                ("content-length", &response.len().to_string()),
                ("date", "Wed, 01 Jan 2025 00:00:00 GMT"),
            ]),
            trailers: None,
            body: capture(&response, cap),
        }),
        error: None,
        upstream_duration: Some(Duration::from_micros(180)),
        total_duration: Duration::from_micros(240),
        complete: true,
        consumer_declared: true,
        capture_bodies: true,
        // As the decision step leaves it: the response read whole already.
        response_read: decision.is_some().then(|| ReadJson {
            model_name: Some("spam-filter".into()),
            model_version: Some("3".into()),
        }),
        decision,
        tag,
        shadow: false,
        record: policy.record.clone(),
    }
}

/// The record as a naive encoder would write it: a `Value` tree, bodies parsed.
fn naive_record(ex: &Exchange, instance: &str) -> Vec<u8> {
    let headers = |h: &HeaderMap| -> Value {
        h.keys()
            .map(|name| {
                let value = if ex.record.redacted_headers.contains(name) {
                    "[redacted]".to_owned()
                } else {
                    h.get_all(name)
                        .iter()
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                (name.as_str().to_owned(), Value::String(value))
            })
            .collect()
    };
    let body = |c: &Capture| -> (Value, Value) {
        let data: Value = serde_json::from_slice(&c.bytes).unwrap();
        let view = json!({"encoding": "json", "data": data, "size": c.size, "truncated": false});
        (view, data)
    };
    let (request_body, request_data) = body(&ex.request.body);
    let response = ex.response.as_ref().unwrap();
    let (response_body, response_data) = body(&response.body);
    let (path, query) = match ex.path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (ex.path.as_str(), None),
    };
    let decisions = match &ex.decision {
        Some(DecisionOutcome::Made(rows)) => Value::Array(
            rows.iter()
                .enumerate()
                .map(|(i, d)| {
                    json!({
                        "row": i, "score": d.score, "threshold": d.threshold,
                        "threshold_mode": d.threshold_mode, "model_action": &*d.model_action,
                        "final_action": &*d.final_action, "limit": d.limit.as_str(),
                        "explored": d.explored,
                    })
                })
                .collect(),
        ),
        _ => Value::Null,
    };
    let record = json!({
        "schema": RECORD_SCHEMA,
        "id": ex.id,
        "time": humantime::format_rfc3339_micros(ex.time).to_string(),
        "instance": instance,
        "route": &*ex.route,
        "model": {"name": response_data["model_name"], "version": response_data["model_version"]},
        "consumer": {"id": ex.consumer, "declared": ex.consumer_declared},
        "policy": {"version": ex.record.version, "generation": ex.record.generation},
        "request": {
            "method": ex.method.as_str(), "path": path, "query": query,
            "headers": headers(&ex.request.headers), "v2_id": request_data["id"],
            "body": request_body,
        },
        "response": {
            "status": ex.status, "headers": headers(&response.headers), "trailers": null,
            "body": response_body,
        },
        "status": ex.status,
        "error": null,
        "complete": ex.complete,
        "tag": ex.tag,
        "inbound_tags": [],
        "decisions": decisions,
        "decision_error": null,
        "timings": {
            "upstream_ms": ex.upstream_duration.map(|d| d.as_secs_f64() * 1e3),
            "total_ms": ex.total_duration.as_secs_f64() * 1e3,
        },
    });
    serde_json::to_vec(&record).unwrap()
}

fn records(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    generate_key(dir.path(), "ed", Algorithm::Ed25519).unwrap();
    let keys = KeyRing::load_dir(dir.path()).unwrap();
    let full = parse(include_str!("e2e/policy.full.yaml"), 1 << 20).unwrap();
    let policies = [
        (
            "tee_only",
            Arc::new(Policy::new(PolicySpec::default(), 0, 1 << 20, None)),
        ),
        ("decided", Arc::new(Policy::new(full, 0, 1 << 20, None))),
    ];
    let ctx = EncodeContext {
        instance: "sluicegate-7d9f8-abcde".into(),
        max_record_bytes: 1 << 20,
        record_decisions: Default::default(),
        inbound_tags: Default::default(),
    };
    for (size, rows) in SIZES {
        let mut g = c.benchmark_group(format!("record_encode_{size}"));
        for (setup, policy) in &policies {
            let ex = exchange(rows, policy.clone(), &keys);
            assert_eq!(ex.decision.is_some(), *setup == "decided");
            let decode = |b: &[u8]| serde_json::from_slice::<Value>(b).unwrap();
            assert_eq!(
                decode(&ex.encode(&ctx).payload),
                decode(&naive_record(&ex, &ctx.instance)),
                "the baseline writes the same record"
            );
            g.bench_function(format!("sluicegate_{setup}"), |b| {
                b.iter(|| black_box(&ex).encode(&ctx))
            });
            g.bench_function(format!("baseline_value_{setup}"), |b| {
                b.iter(|| naive_record(black_box(&ex), &ctx.instance))
            });
            if ex.decision.is_some() {
                let columns = EncodeContext {
                    record_decisions: RecordDecisions::Columns,
                    ..ctx.clone()
                };
                g.bench_function(format!("sluicegate_{setup}_in_columns"), |b| {
                    b.iter(|| black_box(&ex).encode(&columns))
                });
            }
        }
        g.finish();
    }
}

fn flatten(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flatten(x, out)),
        v => out.push(v.as_f64().unwrap()),
    }
}

/// The naive v1 walk: every prediction as a number.
fn naive_v1(body: &Value) -> Vec<f64> {
    body["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_f64().unwrap())
        .collect()
}

/// The naive v2 walk: find the output, flatten its data, take column 1 of each row.
fn naive_v2(body: &Value) -> Vec<f64> {
    let output = body["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "predict_proba")
        .unwrap();
    let mut flat = Vec::new();
    flatten(&output["data"], &mut flat);
    let k = output["shape"][1].as_u64().unwrap() as usize;
    flat.chunks(k).map(|row| row[1]).collect()
}

fn extraction(c: &mut Criterion) {
    let spec = |output: Option<&str>, column| ScoreSpec {
        output: output.map(str::to_owned),
        column,
        pointer: None,
        range: [0.0, 1.0],
    };
    type Walk = fn(&Value) -> Vec<f64>;
    let protocols: [(&str, Protocol, ScoreSpec, Walk); 2] = [
        ("v1", Protocol::V1, spec(None, None), naive_v1),
        (
            "v2",
            Protocol::V2,
            spec(Some("predict_proba"), Some(1)),
            naive_v2,
        ),
    ];
    for (name, protocol, spec, walk) in protocols {
        for (_, rows) in SIZES {
            let request: Value = serde_json::from_str(&v2_request(rows, 7)).unwrap();
            let response = match protocol {
                Protocol::V1 => {
                    let features = request["inputs"][0]["data"].as_array().unwrap();
                    let instances: Vec<&[Value]> = features.chunks(4).collect();
                    StandInModel::predict_v1(&json!({ "instances": instances })).unwrap()
                }
                _ => StandInModel::infer_v2(&request).unwrap(),
            };
            let body = serde_json::to_vec(&response).unwrap();
            let parsed: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                extract(protocol, &spec, None, &parsed),
                Ok(Scores::Binary(walk(&parsed))),
                "the baseline finds the same scores"
            );
            let mut g = c.benchmark_group(format!("extract_{name}_{rows}_rows"));
            g.bench_function("sluicegate_parse_and_extract", |b| {
                b.iter(|| {
                    let v: Value = serde_json::from_slice(black_box(&body)).unwrap();
                    extract(protocol, &spec, None, &v).unwrap()
                })
            });
            if protocol == Protocol::V2 {
                // What the request path does for a v2 route: the scores straight from the bytes.
                g.bench_function("sluicegate_read_from_bytes", |b| {
                    b.iter(|| extract_v2(&spec, None, black_box(&body)).unwrap())
                });
            }
            g.bench_function("baseline_parse_and_walk", |b| {
                b.iter(|| walk(&serde_json::from_slice(black_box(&body)).unwrap()))
            });
            g.bench_function("sluicegate_extract", |b| {
                b.iter(|| extract(protocol, &spec, None, black_box(&parsed)).unwrap())
            });
            g.bench_function("baseline_walk", |b| b.iter(|| walk(black_box(&parsed))));
            g.finish();
        }
    }
}

/// A `ModelInfer` call's two messages as the record's REST-v2-shaped JSON (what the spool
/// writer does for a gRPC record), beside the JSON the REST call would embed as it is.
fn grpc_bodies(c: &mut Criterion) {
    use prost::Message as _;
    use sluicegate::oip::{self, Side};
    for (size, rows) in SIZES {
        let request = sluicegate::testing::grpc_request(rows, 7, false, &[]);
        let response = StandInModel::infer_grpc(&request, false).unwrap();
        let request = oip::frame(&request.encode_to_vec());
        let response = oip::frame(&response.encode_to_vec());
        let mut g = c.benchmark_group(format!("grpc_body_as_json_{size}"));
        g.bench_function("sluicegate_request", |b| {
            b.iter(|| oip::as_v2_json(Side::Request, None, black_box(&request)).unwrap())
        });
        g.bench_function("sluicegate_response", |b| {
            b.iter(|| oip::as_v2_json(Side::Response, None, black_box(&response)).unwrap())
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = tags, records, extraction, grpc_bodies
}
criterion_main!(benches);
