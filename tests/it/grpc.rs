//! Guardrails on gRPC: `ModelInfer` calls decided on their model's route, on the gRPC port and
//! on the data port alike, against the stand-in model's gRPC API (typed and raw contents,
//! compressed messages), with the same state as the REST route of that model.

use std::io::{Read, Write};
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use prost::Message;
use sluicegate::oip::{self, ModelInferRequest, ModelInferResponse};
use sluicegate::testing::{grpc_request, StandInModel};

use crate::common::*;

/// A gRPC call's answer as a client sees it.
struct Answer {
    headers: HeaderMap,
    /// The message, decoded (and decompressed, if it came compressed).
    message: Option<ModelInferResponse>,
    /// The status, from the trailers or, for a Trailers-Only answer, the headers.
    status: String,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap())
    }

    /// The `sluicegate_action` tensor's values, in the form the response used.
    fn action_tensor(&self) -> Vec<String> {
        let m = self.message.as_ref().expect("a message");
        let i = m
            .outputs
            .iter()
            .position(|o| o.name == "sluicegate_action")
            .expect("the action tensor is appended");
        let t = &m.outputs[i];
        assert_eq!(
            (t.datatype.as_str(), t.shape.clone()),
            ("BYTES", vec![m.outputs[0].shape[0]])
        );
        if m.raw_output_contents.is_empty() {
            let c = t.contents.as_ref().expect("typed contents");
            c.bytes_contents
                .iter()
                .map(|b| String::from_utf8(b.clone()).unwrap())
                .collect()
        } else {
            assert!(t.contents.is_none(), "raw form: no typed contents");
            let mut raw = &m.raw_output_contents[i][..];
            let mut out = Vec::new();
            while !raw.is_empty() {
                let len = u32::from_le_bytes(raw[..4].try_into().unwrap()) as usize;
                out.push(String::from_utf8(raw[4..4 + len].to_vec()).unwrap());
                raw = &raw[4 + len..];
            }
            out
        }
    }
}

/// One unary `ModelInfer` call over h2c to `addr`; `gzip` compresses the request message.
async fn infer(addr: SocketAddr, request: &ModelInferRequest, gzip: bool) -> Answer {
    let mut send = h2c(addr).await;
    let encoded = request.encode_to_vec();
    let mut builder = Request::post(format!("http://{addr}{}", oip::MODEL_INFER_PATH))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-accept-encoding", "gzip");
    let body = if gzip {
        builder = builder.header("grpc-encoding", "gzip");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&encoded).unwrap();
        let mut framed = oip::frame(&gz.finish().unwrap()).to_vec();
        framed[0] = 1;
        Bytes::from(framed)
    } else {
        oip::frame(&encoded)
    };
    let resp = send
        .send_request(builder.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let headers = resp.headers().clone();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    let bytes = collected.to_bytes();
    let message = (!bytes.is_empty()).then(|| {
        let (compressed, m) = oip::one_message(&bytes).unwrap();
        let m = if compressed {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&m[..])
                .read_to_end(&mut out)
                .unwrap();
            Bytes::from(out)
        } else {
            m
        };
        ModelInferResponse::decode(&m[..]).unwrap()
    });
    let status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or(headers.get("grpc-status"))
        .map(|v| v.to_str().unwrap().to_owned())
        .expect("a grpc-status");
    Answer {
        headers,
        message,
        status,
    }
}

/// The stand-in model's spam score for each row of `request`, computed here.
fn expected_actions(request: &ModelInferRequest, threshold: f64) -> Vec<String> {
    let input = &request.inputs[0];
    let flat: Vec<f64> = match request.raw_input_contents.first() {
        Some(raw) => raw
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        None => input.contents.as_ref().unwrap().fp64_contents.clone(),
    };
    flat.chunks(4)
        .map(|row| {
            if StandInModel::score(row) >= threshold {
                "spam"
            } else {
                "ham"
            }
            .to_owned()
        })
        .collect()
}

/// The proxy in front of the stand-in model (REST and gRPC on one port) with `policy`, and a
/// gRPC port in front of the same model.
async fn proxy_with(policy: &str) -> (ProxyProcess, tempfile::TempDir) {
    let model = StandInModel::spawn().await.unwrap();
    let dir = spool_dir();
    let file = write_policy(dir.path(), policy);
    let upstream = format!("http://{model}");
    let proxy = start_with_policy(
        model,
        dir.path(),
        &file,
        &["--grpc-listen", "127.0.0.1:0", "--grpc-upstream", &upstream],
    );
    (proxy, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_infer_batch_gets_a_decision_per_row_in_metadata_and_in_the_response() {
    let (proxy, dir) =
        proxy_with(&spam_route("{fixed: 0.5}", "[]", "    write_decisions: {}")).await;
    let grpc_port = proxy.grpc.unwrap();
    let mut calls = 0.0;
    // Typed and raw contents (Triton answers raw), on the gRPC port and the data port.
    for (port, raw) in [(grpc_port, false), (grpc_port, true), (proxy.data, false)] {
        let flags: &[&str] = if raw { &["raw_output"] } else { &[] };
        let request = grpc_request(8, 42, raw, flags);
        let expected = expected_actions(&request, 0.5);
        assert!(expected.contains(&"spam".into()) && expected.contains(&"ham".into()));
        let answer = infer(port, &request, false).await;
        calls += 1.0;
        assert_eq!(answer.status, "0");
        assert_eq!(answer.header("sluicegate-action"), expected.join(","));
        assert_eq!(answer.header("sluicegate-rows"), "8");
        assert_eq!(answer.header("sluicegate-threshold"), ["0.5"; 8].join(","));
        assert_eq!(answer.action_tensor(), expected, "raw {raw}");
        let m = answer.message.as_ref().unwrap();
        assert_eq!(
            m.outputs[0].name, "predict_proba",
            "the model's output first, untouched"
        );
        assert_eq!(m.id, "req-42");
    }
    let records = proxy.spool_records_after(&dir.path().join("spool"), calls);
    assert_eq!(records.len(), 3);
    for r in &records {
        assert_eq!(r["route"], "spam");
        assert_eq!(r["model"]["name"], "spam-filter");
        assert_eq!(r["decisions"].as_array().unwrap().len(), 8);
        assert_eq!(r["response"]["trailers"]["grpc-status"], "0");
    }
    assert_eq!(proxy.metric("sluicegate_decisions_total"), 24.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_rejects_a_grpc_call_with_resource_exhausted() {
    let policy = spam_route(
        "{fixed: 0.0}",
        "[{action: spam, max_count: 3, window: 60s, on_breach: reject}]",
        "",
    );
    let (proxy, dir) = proxy_with(&policy).await;
    let port = proxy.grpc.unwrap();
    let request = grpc_request(1, 5, false, &[]);
    for _ in 0..3 {
        assert_eq!(infer(port, &request, false).await.status, "0");
    }
    let answer = infer(port, &request, false).await;
    // Trailers-Only: HTTP 200, the status in the headers, no message.
    assert_eq!(answer.status, "8", "RESOURCE_EXHAUSTED");
    assert!(answer.message.is_none());
    assert_eq!(answer.header("grpc-message"), "limit_exceeded");
    assert_eq!(answer.header("retry-after"), "1");
    assert_eq!(answer.header("grpc-retry-pushback-ms"), "1000");
    assert_eq!(answer.header("sluicegate-action"), "rejected");
    assert_eq!(answer.header("sluicegate-model-action"), "spam");
    let id = answer.header("sluicegate-id").to_owned();
    assert!(!id.is_empty());

    let records = proxy.spool_records_after(&dir.path().join("spool"), 4.0);
    let rejected = records.iter().find(|r| r["id"] == id.as_str()).unwrap();
    assert_eq!(rejected["error"]["code"], "limit_exceeded");
    assert_eq!(rejected["error"]["grpc_status"], 8);
    assert_eq!(rejected["decisions"][0]["final_action"], "spam");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_messages_are_decoded_and_decided_never_passed_undecided() {
    let (proxy, _dir) = proxy_with(&spam_route(
        "{fixed: 0.5}",
        "[{action: spam, max_count: 1, window: 60s, on_breach: reject}]",
        "",
    ))
    .await;
    let port = proxy.grpc.unwrap();
    // Rows chosen so every one is spam: the limit's second call must be refused whatever
    // the client compresses.
    let spam_seed = (0..200)
        .find(|&s| expected_actions(&grpc_request(1, s, false, &[]), 0.5) == ["spam"])
        .unwrap();
    let request = grpc_request(1, spam_seed, false, &["gzip_output"]);
    // A compressed request names its model only inside the compressed message: the call is
    // routed by the model the response names.
    let first = infer(port, &request, true).await;
    assert_eq!(first.status, "0");
    assert_eq!(first.header("sluicegate-action"), "spam");
    let second = infer(port, &request, true).await;
    assert_eq!(
        second.status, "8",
        "a compressed call cannot opt out of the limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_and_grpc_calls_of_one_model_move_one_adaptive_threshold() {
    let (proxy, _dir) = proxy_with(&spam_route(
        "{adaptive: {target_rate: 0.2, window: 1m, initial: 0.9, min: 0.05, max: 0.95, max_step: 0.5, update_interval: 1s, min_samples: 20}}",
        "[]",
        "",
    ))
    .await;
    let c = client();
    let grpc = proxy.grpc.unwrap();
    let threshold = |h: &str| h.split(',').next().unwrap().parse::<f64>().unwrap();
    // REST traffic alone moves the threshold off its initial value...
    for seed in 0..40 {
        let (s, _, _) = post(
            &c,
            &proxy.url("/v2/models/spam-filter/infer"),
            sluicegate::testing::v2_request(8, seed),
        )
        .await;
        assert_eq!(s, 200);
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (_, rest_headers, _) = post(
        &c,
        &proxy.url("/v2/models/spam-filter/infer"),
        sluicegate::testing::v2_request(8, 1000),
    )
    .await;
    let rest = threshold(rest_headers["sluicegate-threshold"].to_str().unwrap());
    assert_ne!(rest, 0.9, "REST traffic moved the threshold");
    // ...and a gRPC call of the same model is decided at that same value.
    let answer = infer(grpc, &grpc_request(8, 1001, false, &[]), false).await;
    assert_eq!(threshold(answer.header("sluicegate-threshold")), rest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_never_take_a_path_prefix_route_and_unreadable_answers_pass() {
    // A path-prefix route that would match every path: gRPC calls pass through undecided.
    let policy = r#"
routes:
  everything:
    match: {path_prefix: /}
    protocol: v2
    score: {output: predict_proba, column: 1}
    decision: {binary: {action: spam, otherwise: ham, threshold: {fixed: 0.5}}}
"#;
    let (proxy, _dir) = proxy_with(policy).await;
    let answer = infer(proxy.grpc.unwrap(), &grpc_request(2, 1, false, &[]), false).await;
    assert_eq!(answer.status, "0");
    assert_eq!(answer.header("sluicegate-action"), "");
    assert!(!answer.header("sluicegate-id").is_empty());

    // A model route whose output the answer lacks: passed unchanged, with a decision error.
    let (proxy, _dir) = proxy_with(
        &spam_route("{fixed: 0.5}", "[]", "")
            .replace("output: predict_proba", "output: no_such_output"),
    )
    .await;
    let answer = infer(proxy.grpc.unwrap(), &grpc_request(2, 1, false, &[]), false).await;
    assert_eq!(answer.status, "0");
    assert_eq!(answer.header("sluicegate-action"), "");
    assert_eq!(answer.message.unwrap().outputs.len(), 1);
    proxy.wait_metric(
        "sluicegate_decision_errors_total",
        1.0,
        std::time::Duration::from_secs(5),
    );
}

/// `sluicegate ARGS…`: exit code, stdout, stderr.
fn run(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_records_read_like_rest_records_and_their_tags_coming_back_are_loops() {
    let model = StandInModel::spawn().await.unwrap();
    let dir = spool_dir();
    let keys = dir.path().join("keys");
    let (code, _, err) = run(&["tag", "keygen", "--id", "k1", "--dir", path_str(&keys)]);
    assert_eq!(code, 0, "{err}");
    let policy = write_policy(
        dir.path(),
        &format!(
            "tagging: {{algorithm: ed25519, signing_key: k1}}\n{}",
            spam_route("{fixed: 0.5}", "[]", "")
        ),
    );
    let upstream = format!("http://{model}");
    let proxy = start_with_policy(
        model,
        dir.path(),
        &policy,
        &[
            "--tag-keys-dir",
            path_str(&keys),
            "--grpc-listen",
            "127.0.0.1:0",
            "--grpc-upstream",
            &upstream,
        ],
    );
    let grpc = proxy.grpc.unwrap();

    // The same rows over REST and over gRPC (raw answer).
    let (_, rest_headers, _) = post(
        &client(),
        &proxy.url("/v2/models/spam-filter/infer"),
        sluicegate::testing::v2_request(3, 7),
    )
    .await;
    let answer = infer(grpc, &grpc_request(3, 7, false, &["raw_output"]), false).await;
    let tag = answer.header("sluicegate-tag").to_owned();
    assert!(tag.starts_with("sg1."), "{tag}");
    // Its tag back as an input of the next call (a BYTES tensor): a direct loop.
    let mut fed_back = grpc_request(1, 8, false, &[]);
    fed_back.inputs.push(oip::InferInputTensor {
        name: "previous".into(),
        datatype: "BYTES".into(),
        shape: vec![1],
        contents: Some(oip::InferTensorContents {
            bytes_contents: vec![tag.clone().into_bytes()],
            ..Default::default()
        }),
        ..Default::default()
    });
    let looped = infer(grpc, &fed_back, false).await;
    assert_eq!(looped.status, "0");

    let records = proxy.spool_records_after(&dir.path().join("spool"), 3.0);
    let by_id = |h: &str| {
        records
            .iter()
            .find(|r| r["id"] == h)
            .unwrap_or_else(|| panic!("no record {h}"))
    };
    let rest = by_id(rest_headers["sluicegate-id"].to_str().unwrap());
    let grpc_record = by_id(answer.header("sluicegate-id"));
    let validator = schema_validator();
    for r in [rest, grpc_record] {
        assert!(validator.is_valid(r), "{r}");
        assert_eq!(r["model"]["name"], "spam-filter");
        assert_eq!(r["request"]["body"]["encoding"], "json");
        assert_eq!(r["response"]["body"]["encoding"], "json");
    }
    // The same answer, read back alike: REST's JSON and gRPC's raw FP64 contents.
    let outputs = |r: &serde_json::Value| r["response"]["body"]["data"]["outputs"][0].clone();
    assert_eq!(outputs(rest)["data"], outputs(grpc_record)["data"]);
    assert_eq!(outputs(grpc_record)["shape"], serde_json::json!([3, 2]));
    assert_eq!(
        grpc_record["request"]["body"]["data"]["inputs"][0]["data"],
        serde_json::from_str::<serde_json::Value>(&sluicegate::testing::v2_request(3, 7)).unwrap()
            ["inputs"][0]["data"]
    );
    assert_eq!(grpc_record["request"]["v2_id"], "req-7");
    let inbound = &by_id(looped.header("sluicegate-id"))["inbound_tags"];
    assert_eq!(inbound[0]["feedback"], "direct", "{inbound}");
    assert_eq!(inbound[0]["found_in"], "body");

    // The audit finds the loop when the gRPC answers come back as training data.
    let training = dir.path().join("train.jsonl");
    std::fs::write(
        &training,
        format!(
            "{{\"sluicegate_tag\": \"{tag}\", \"sluicegate_row\": 0}}\n{{\"text\": \"organic\"}}\n"
        ),
    )
    .unwrap();
    let spool_source = format!("spool:{}", dir.path().join("spool").display());
    let training_arg = format!("spam-filter={}", training.display());
    let (code, out, err) = run(&[
        "audit",
        "--predictions",
        &spool_source,
        "--training",
        &training_arg,
        "--keys",
        path_str(&keys),
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let row = report["feedback_loops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["producer"] == "spam-filter")
        .unwrap_or_else(|| panic!("{report}"))
        .clone();
    assert_eq!(row["direct"], true, "{report}");
    assert_eq!(row["rows"], 1, "{report}");
}
