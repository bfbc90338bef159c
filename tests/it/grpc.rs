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
    let policy = spam_capped_at_3("");
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

/// In shadow mode the same limit refuses nothing: the call gets the model's message as it
/// was, `sluicegate-mode: shadow` and no decisions; the record holds what would have happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_route_answers_grpc_calls_as_the_model_did() {
    let policy = spam_capped_at_3("    write_decisions: {}\n    shadow: true");
    let (proxy, dir) = proxy_with(&policy).await;
    let port = proxy.grpc.unwrap();
    let request = grpc_request(2, 5, false, &[]);
    let expected = StandInModel::infer_grpc(&request, false).unwrap();
    for _ in 0..4 {
        let answer = infer(port, &request, false).await;
        assert_eq!(answer.status, "0", "a shadow limit rejects nothing");
        assert_eq!(
            answer.message.as_ref(),
            Some(&expected),
            "the model's message"
        );
        assert_eq!(answer.header("sluicegate-mode"), "shadow");
        assert_eq!(answer.header("sluicegate-action"), "");
        assert_eq!(answer.header("sluicegate-tag"), "");
    }
    let records: Vec<_> = proxy
        .spool_records_after(&dir.path().join("spool"), 4.0)
        .into_iter()
        .filter(|r| r["schema"] == "sluicegate.record.v1")
        .collect();
    assert_eq!(records.len(), 4);
    assert!(records.iter().all(|r| r["shadow"] == true));
    let refused = records
        .iter()
        .filter(|r| r["error"]["code"] == "limit_exceeded")
        .count();
    assert_eq!(
        refused, 3,
        "the first pair fits the cap of 3, every next pair would not"
    );
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

    // The model refusing the call (Trailers-Only, no message) on a deciding route: the client
    // gets the model's status, undecided.
    let (proxy, _dir) = proxy_with(&spam_route("{fixed: 0.5}", "[]", "")).await;
    let mut no_features = grpc_request(2, 1, false, &[]);
    no_features.inputs[0].name = "other".into();
    let refused = infer(proxy.grpc.unwrap(), &no_features, false).await;
    assert_eq!(refused.status, "3", "INVALID_ARGUMENT from the model");
    assert!(refused.message.is_none());
    assert_eq!(refused.header("sluicegate-action"), "");

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

/// A real MLServer (PyPI) serving a scikit-learn `spam-filter` on loopback REST and gRPC
/// ports, from the venv tests/run.sh installs (`SLUICEGATE_MLSERVER_PYTHON`); killed on drop.
struct MlServer {
    child: std::process::Child,
    python: std::path::PathBuf,
    rest: SocketAddr,
    grpc: SocketAddr,
    _dir: tempfile::TempDir,
}

impl MlServer {
    /// `None` (a loud skip) without the venv, unless SLUICEGATE_REQUIRE_MLSERVER_TESTS is set.
    fn start(test: &str) -> Option<MlServer> {
        let Some(python) = std::env::var_os("SLUICEGATE_MLSERVER_PYTHON") else {
            assert!(
                std::env::var_os("SLUICEGATE_REQUIRE_MLSERVER_TESTS").is_none(),
                "SLUICEGATE_MLSERVER_PYTHON is unset and the MLServer tests are required (tests/run.sh installs it)"
            );
            eprintln!(
                "\n*** SKIPPED {test}: no MLServer venv (SLUICEGATE_MLSERVER_PYTHON; tests/run.sh \
                 installs one). Set SLUICEGATE_REQUIRE_MLSERVER_TESTS=1 to make this a failure. ***\n"
            );
            return None;
        };
        let python = std::path::PathBuf::from(python);
        let dir = tempfile::tempdir().unwrap();
        let (http, grpc, metrics) = (free_port(), free_port(), free_port());
        let out = oip_py(
            &python,
            &[
                "model",
                path_str(dir.path()),
                &http.to_string(),
                &grpc.to_string(),
                &metrics.to_string(),
            ],
        );
        assert!(out.is_empty(), "{out}");
        let child = std::process::Command::new(python.with_file_name("mlserver"))
            .args(["start", path_str(dir.path())])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start mlserver");
        let server = MlServer {
            child,
            python,
            rest: format!("127.0.0.1:{http}").parse().unwrap(),
            grpc: format!("127.0.0.1:{grpc}").parse().unwrap(),
            _dir: dir,
        };
        let ready = format!("http://{}/v2/health/ready", server.rest);
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_secs(60) {
            let up = std::process::Command::new("curl")
                .args(["-sf", "-o", "/dev/null", "--max-time", "1", &ready])
                .status()
                .is_ok_and(|s| s.success());
            if up {
                return Some(server);
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        panic!("MLServer did not turn ready within 60 s");
    }

    /// One ModelInfer call through MLServer's own gRPC client to `addr`.
    fn infer(&self, addr: SocketAddr, rows: usize, seed: u64, flags: &[&str]) -> serde_json::Value {
        let (addr, rows, seed) = (addr.to_string(), rows.to_string(), seed.to_string());
        let mut args = vec!["infer", &addr, &rows, &seed];
        args.extend_from_slice(flags);
        serde_json::from_str(&oip_py(&self.python, &args)).unwrap()
    }
}

impl Drop for MlServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `python tests/mlserver/oip.py ARGS…`: its standard output; panics on a failure.
fn oip_py(python: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(python)
        .arg(repo_path("tests/mlserver/oip.py"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "oip.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What a binary spam route at 0.5 decides for the `predict_proba` rows a client got.
fn expected_from(answer: &serde_json::Value) -> Vec<String> {
    let proba = answer["outputs"][0]["data"].as_array().unwrap();
    proba
        .chunks(2)
        .map(|r| {
            if r[1].as_f64().unwrap() >= 0.5 {
                "spam"
            } else {
                "ham"
            }
            .to_owned()
        })
        .collect()
}

fn action_output(answer: &serde_json::Value) -> Vec<String> {
    let outputs = answer["outputs"].as_array().unwrap();
    let t = outputs
        .iter()
        .find(|o| o["name"] == "sluicegate_action")
        .unwrap_or_else(|| panic!("no action tensor: {answer}"));
    assert_eq!(t["datatype"], "BYTES");
    t["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mlserver_and_its_own_grpc_client_through_sluicegate() {
    let test = "mlserver_and_its_own_grpc_client_through_sluicegate";
    let Some(ml) = tokio::task::spawn_blocking(move || MlServer::start(test))
        .await
        .unwrap()
    else {
        return;
    };
    let dir = spool_dir();
    let policy = write_policy(
        dir.path(),
        &spam_route(
            "{fixed: 0.5}",
            "[{action: spam, max_count: 12, window: 60s, on_breach: reject}]",
            "    write_decisions: {}",
        ),
    );
    let grpc_upstream = format!("http://{}", ml.grpc);
    let proxy = start_with_policy(
        ml.rest,
        dir.path(),
        &policy,
        &[
            "--grpc-listen",
            "127.0.0.1:0",
            "--grpc-upstream",
            &grpc_upstream,
        ],
    );
    let port = proxy.grpc.unwrap();

    // A batch of 8 rows: 8 decisions in metadata and in the response tensor.
    let answer = ml.infer(port, 8, 7, &[]);
    assert_eq!(answer["code"], "OK", "{answer}");
    let expected = expected_from(&answer);
    assert_eq!(answer["metadata"]["sluicegate-action"], expected.join(","));
    assert_eq!(answer["metadata"]["sluicegate-rows"], "8");
    assert_eq!(action_output(&answer), expected);
    let spam = expected.iter().filter(|a| *a == "spam").count();
    assert!(spam > 0 && spam <= 12, "{expected:?}");

    // The same rows over REST, through the data port: the records read alike.
    let rest_body = oip_py(&ml.python, &["rest-body", "8", "7"]);
    let (status, rest_headers, _) = post(
        &client(),
        &proxy.url("/v2/models/spam-filter/infer"),
        rest_body,
    )
    .await;
    assert_eq!(status, 200);
    let rest_id = rest_headers["sluicegate-id"].to_str().unwrap().to_owned();

    // MLServer refusing a call (Trailers-Only), for an unknown model and on the deciding route
    // (a second input its codec refuses), reaches its own client as MLServer sent it.
    for flags in [&["model=no-such-model"][..], &["tag=x"][..]] {
        let direct = ml.infer(ml.grpc, 1, 7, flags);
        let proxied = ml.infer(port, 1, 7, flags);
        assert_ne!(direct["code"], "OK", "{direct}");
        assert_eq!(proxied["code"], direct["code"], "{proxied}");
        assert_eq!(proxied["details"], direct["details"]);
    }

    // The limit: spam rows keep coming until it refuses, as RESOURCE_EXHAUSTED.
    let mut refused = None;
    for seed in 100..120 {
        let a = ml.infer(port, 8, seed, &[]);
        if a["code"] != "OK" {
            refused = Some(a);
            break;
        }
    }
    let refused = refused.expect("the limit of 12 spam actions refuses within 20 batches");
    assert_eq!(refused["code"], "RESOURCE_EXHAUSTED", "{refused}");
    assert_eq!(refused["details"], "limit_exceeded");
    assert_eq!(refused["trailing"]["retry-after"], "1");
    assert_eq!(refused["trailing"]["grpc-retry-pushback-ms"], "1000");
    let refused_id = refused["trailing"]["sluicegate-id"]
        .as_str()
        .unwrap()
        .to_owned();
    // A compressed call is refused too.
    let gz = ml.infer(port, 8, 7, &["gzip"]);
    assert_eq!(gz["code"], "RESOURCE_EXHAUSTED", "{gz}");

    let spooled = proxy.metric("sluicegate_tee_records_spooled_total");
    let records = proxy.spool_records_after(&dir.path().join("spool"), spooled.max(3.0));
    let validator = schema_validator();
    let first = records
        .iter()
        .find(|r| r["id"] == answer["metadata"]["sluicegate-id"])
        .unwrap();
    assert!(validator.is_valid(first), "{first}");
    assert_eq!(first["model"]["name"], "spam-filter");
    assert_eq!(first["response"]["body"]["encoding"], "json");
    let outputs = &first["response"]["body"]["data"]["outputs"];
    assert_eq!(outputs[0]["name"], "predict_proba");
    assert_eq!(outputs[0]["shape"], serde_json::json!([8, 2]));
    assert_eq!(outputs[0]["data"], answer["outputs"][0]["data"]);
    let rest = records
        .iter()
        .find(|r| r["id"] == rest_id.as_str())
        .unwrap();
    let numbers = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let rest_outputs = &rest["response"]["body"]["data"]["outputs"];
    assert_eq!(rest_outputs[0]["shape"], outputs[0]["shape"]);
    assert_eq!(
        numbers(&rest_outputs[0]["data"]),
        numbers(&outputs[0]["data"]),
        "the same answer, recorded alike from REST and gRPC"
    );
    assert_eq!(
        numbers(&rest["request"]["body"]["data"]["inputs"][0]["data"]),
        numbers(&first["request"]["body"]["data"]["inputs"][0]["data"])
    );
    let rejected = records
        .iter()
        .find(|r| r["id"] == refused_id.as_str())
        .unwrap();
    assert_eq!(rejected["error"]["code"], "limit_exceeded");
    assert_eq!(rejected["error"]["grpc_status"], 8);
    assert!(validator.is_valid(rejected), "{rejected}");

    // A raw_output_contents answer, as Triton sends it (built with the protobuf library),
    // is decided the same, and the action tensor goes back raw too.
    let raw_port = free_port();
    let mut raw_server = std::process::Command::new(&ml.python)
        .arg(repo_path("tests/mlserver/oip.py"))
        .args(["raw-server", &raw_port.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(raw_server.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "serving");
    let raw_upstream = format!("http://127.0.0.1:{raw_port}");
    let raw_dir = spool_dir();
    let raw_policy = write_policy(
        raw_dir.path(),
        &spam_route("{fixed: 0.5}", "[]", "    write_decisions: {}"),
    );
    let raw_proxy = start_with_policy(
        ml.rest,
        raw_dir.path(),
        &raw_policy,
        &[
            "--grpc-listen",
            "127.0.0.1:0",
            "--grpc-upstream",
            &raw_upstream,
        ],
    );
    let raw = ml.infer(raw_proxy.grpc.unwrap(), 8, 7, &[]);
    let _ = raw_server.kill();
    let _ = raw_server.wait();
    assert_eq!(raw["code"], "OK", "{raw}");
    assert_eq!(raw["raw"], true);
    let expected = expected_from(&raw);
    assert_eq!(raw["metadata"]["sluicegate-action"], expected.join(","));
    assert_eq!(action_output(&raw), expected);
}
