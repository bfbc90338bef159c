use super::*;
use crate::config::policy::version_of;

/// The record context of `policy`, as the policy snapshot builds it.
fn context(policy: &PolicySpec) -> Arc<RecordContext> {
    Arc::new(RecordContext::new(policy, version_of(policy), 0, 1 << 20))
}

fn capture(bytes: &[u8], cap: usize) -> Capture {
    let mut c = Capture::with_cap(cap);
    c.push(bytes);
    c
}

fn exchange(req: &[u8], resp: &[u8], cap: usize) -> Exchange {
    let mut rh = HeaderMap::new();
    rh.insert("content-type", "application/json".parse().unwrap());
    rh.insert("authorization", "Bearer secret".parse().unwrap());
    rh.insert("traceparent", "00-abc-def-01".parse().unwrap());
    Exchange {
        id: "id-1".into(),
        time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
        route: "default".into(),
        record: context(&PolicySpec::default()),
        consumer: Some("checkout".into()),
        method: Method::POST,
        path: "/v2/models/iris/versions/3/infer?x=1".into(),
        request: Message {
            headers: rh.clone(),
            trailers: None,
            body: capture(req, cap),
        },
        status: Some(200),
        response: Some(Message {
            headers: rh,
            trailers: None,
            body: capture(resp, cap),
        }),
        error: None,
        upstream_duration: Some(Duration::from_micros(1500)),
        total_duration: Duration::from_micros(1700),
        complete: true,
        consumer_declared: false,
        capture_bodies: true,
        decision: None,
        tag: None,
        shadow: false,
        response_read: None,
    }
}

fn ctx(max: usize) -> EncodeContext {
    EncodeContext {
        instance: "pod-0".into(),
        max_record_bytes: max,
        record_decisions: Default::default(),
        inbound_tags: Default::default(),
    }
}

fn decode(entry: &SpoolEntry) -> serde_json::Value {
    serde_json::from_slice(&entry.payload).unwrap()
}

#[test]
fn json_bodies_are_embedded_exactly_and_headers_redacted() {
    let req = br#"{"id":"r-7","inputs":[{"name":"x","data":[1.10,2e3]}]}"#;
    let resp = br#"{"model_name":"iris","model_version":"4","outputs":[]}"#;
    let entry = exchange(req, resp, 1024).encode(&ctx(1 << 20));
    assert_eq!(entry.key, "id-1");
    assert_eq!(entry.timestamp_ms, 1_700_000_000_123);
    let text = String::from_utf8(entry.payload.clone()).unwrap();
    assert!(
        text.contains(r#"[1.10,2e3]"#),
        "numbers kept as sent: {text}"
    );
    let v = decode(&entry);
    assert_eq!(v["schema"], RECORD_SCHEMA);
    assert_eq!(v["request"]["v2_id"], "r-7");
    assert_eq!(v["request"]["body"]["encoding"], "json");
    assert_eq!(v["request"]["headers"]["authorization"], REDACTED);
    assert_eq!(v["request"]["headers"]["traceparent"], "00-abc-def-01");
    assert_eq!(v["request"]["path"], "/v2/models/iris/versions/3/infer");
    assert_eq!(v["request"]["query"], "x=1");
    assert_eq!(v["model"]["name"], "iris");
    assert_eq!(
        v["model"]["version"], "4",
        "the response wins over the path"
    );
    assert_eq!(v["time"], "2023-11-14T22:13:20.123000Z");
}

#[test]
fn a_redacted_consumer_header_keeps_its_value_out_of_the_consumer_id() {
    let v = decode(&exchange(b"{}", b"{}", 1024).encode(&ctx(1 << 20)));
    assert_eq!(v["consumer"]["id"], "checkout");
    let mut p = PolicySpec::default();
    p.consumers.header = "X-Api-Key".into();
    let mut ex = exchange(b"{}", b"{}", 1024);
    ex.consumer = Some("sk-live-123".into());
    ex.record = context(&p);
    let entry = ex.encode(&ctx(1 << 20));
    assert!(!String::from_utf8_lossy(&entry.payload).contains("sk-live-123"));
    let v = decode(&entry);
    assert_eq!(v["consumer"]["id"], REDACTED);
    ex.consumer = None;
    assert!(decode(&ex.encode(&ctx(1 << 20)))["consumer"]["id"].is_null());
}

#[test]
fn malformed_truncated_and_binary_bodies() {
    let entry = exchange(b"{not json", &[0xff, 0xfe, 0x00], 1024).encode(&ctx(1 << 20));
    let v = decode(&entry);
    assert_eq!(v["request"]["body"]["encoding"], "text");
    assert_eq!(v["request"]["body"]["data"], "{not json");
    assert_eq!(v["response"]["body"]["encoding"], "base64");
    assert_eq!(v["response"]["body"]["data"], "//4A");

    let long = format!(r#"{{"inputs":"{}"}}"#, "é".repeat(100));
    let v = decode(&exchange(long.as_bytes(), b"{}", 51).encode(&ctx(1 << 20)));
    let body = &v["request"]["body"];
    assert_eq!(body["encoding"], "text");
    assert_eq!(body["truncated"], true);
    assert_eq!(body["size"], long.len());
    assert!(body["data"].as_str().unwrap().len() <= 51);
}

#[test]
fn body_fields_are_redacted_or_hashed_by_pointer() {
    let mut p = PolicySpec::default();
    p.tee.redact_body = vec!["/inputs/*/data".into()];
    p.tee.hash_body = vec!["/parameters/user".into()];
    let mut ex = exchange(
            br#"{"inputs":[{"name":"a","data":[1,2]},{"name":"b","data":[3]}],"parameters":{"user":"bob"}}"#,
            b"{not json",
            1024,
        );
    ex.record = context(&p);
    let v = decode(&ex.encode(&ctx(1 << 20)));
    let body = &v["request"]["body"];
    assert_eq!(body["encoding"], "json");
    assert_eq!(body["data"]["inputs"][0]["data"], REDACTED);
    assert_eq!(body["data"]["inputs"][1]["data"], REDACTED);
    assert_eq!(body["data"]["inputs"][0]["name"], "a");
    let hashed = body["data"]["parameters"]["user"].as_str().unwrap();
    assert!(hashed.starts_with("sha256:") && hashed.len() == 7 + 64);
    // Not JSON, so it cannot be redacted field by field: none of it is recorded.
    assert_eq!(v["response"]["body"]["encoding"], "none");
    assert!(v["response"]["body"].get("data").is_none());
}

#[test]
fn a_pointer_that_cannot_match_leaves_the_body_as_sent() {
    let mut p = PolicySpec::default();
    p.tee.hash_body = vec!["/parameters/user_id".into()];
    p.tee.redact_body = vec!["/0/secret".into()];
    let mut ex = exchange(br#"{"inputs":[1.10, 2e3]}"#, b"[1,2]", 1024);
    ex.record = context(&p);
    let entry = ex.encode(&ctx(1 << 20));
    let text = String::from_utf8(entry.payload.clone()).unwrap();
    assert!(text.contains("[1.10, 2e3]"), "kept exactly as sent: {text}");
    let v = decode(&entry);
    // `/0/secret` names the key "secret", absent from both bodies: nothing to redact.
    assert_eq!(v["response"]["body"]["encoding"], "json");
    let r = BodyRedaction::new(&["/*/0".into()], &[]);
    assert!(r.may_apply("{}"), "wildcards alone cannot be ruled out");
    let r = BodyRedaction::new(&["/a/b".into()], &[]);
    assert!(r.may_apply(r#"{"a":{"b":1}}"#));
    assert!(!r.may_apply(r#"{"c":1}"#));
    assert!(
        r.may_apply(r#"{"\u0061":{"\u0062":1}}"#),
        "escaped keys are parsed, not guessed"
    );
}

#[test]
fn records_are_cut_to_fit_the_limit() {
    let big = vec![b'a'; 200_000];
    let entry = exchange(&big, &big, 1 << 20).encode(&ctx(50_000));
    assert!(entry.payload.len() <= 50_000, "{}", entry.payload.len());
    let v = decode(&entry);
    assert_eq!(v["request"]["body"]["truncated"], true);
    assert_eq!(v["request"]["body"]["size"], 200_000);
}

/// Records the writer makes, one of each shape: every body encoding, an error, decisions
/// (multi-class, exploring), a decision error, tags, trailers, no response.
fn written_records() -> Vec<Vec<u8>> {
    let row = |limit, class_scores: Option<Vec<f64>>, propensity: Option<f64>| RowDecision {
        score: 0.8,
        class_scores,
        threshold: Some(0.5),
        threshold_mode: Some("adaptive"),
        model_action: "spam".into(),
        final_action: "ham".into(),
        limit,
        explored: propensity.is_some(),
        propensity,
    };
    let mut decided = exchange(br#"{"id":"r-1","inputs":[1.10,2e3]}"#, b"{}", 1024);
    decided.decision = Some(DecisionOutcome::Made(vec![
        row(crate::decide::LimitOutcome::Ok, None, None),
        row(
            crate::decide::LimitOutcome::Flagged,
            Some(vec![0.1, 0.8, 0.1]),
            Some(0.9),
        ),
        RowDecision {
            threshold: None,
            threshold_mode: None,
            ..row(crate::decide::LimitOutcome::Fallback, None, None)
        },
    ]));
    decided.tag = Some("sg1.e30.sig".into());
    let mut failed = exchange(b"{}", b"{not json", 1024);
    failed.decision = Some(DecisionOutcome::Failed {
        kind: "not_json",
        message: "expected value at line 1".into(),
    });
    let mut refused = exchange(br#""\u00e9 \"quoted\"""#, b"", 1024);
    refused.response = None;
    refused.status = Some(429);
    refused.upstream_duration = None;
    refused.error = Some(ExchangeError {
        code: "limit_exceeded",
        message: "the spam limit is reached".into(),
        grpc_status: None,
    });
    let mut trailed = exchange(&[0xff, 0xfe], &"é".repeat(40).into_bytes(), 51);
    trailed.response.as_mut().unwrap().trailers = Some(HeaderMap::from_iter([(
        HeaderName::from_static("grpc-status"),
        "0".parse().unwrap(),
    )]));
    trailed.complete = false;
    let mut uncaptured = exchange(b"{}", b"{}", 1024);
    uncaptured.capture_bodies = false;
    let tagged = exchange(br#"["sg1.e30.a","sg1.e30.b"]"#, b"{}", 1024);
    let columns = EncodeContext {
        record_decisions: RecordDecisions::Columns,
        ..ctx(1 << 20)
    };
    let (batch, _) = decided_batch(2000);
    let mut out: Vec<Vec<u8>> = [decided, failed, refused, trailed, uncaptured, tagged]
        .iter()
        .map(|ex| ex.encode(&ctx(1 << 20)).payload)
        .collect();
    // Columns with the scores in the body, with the scores inline (bodies cut), and the
    // decisions omitted.
    out.push(batch.encode(&columns).payload);
    out.push(batch.encode(&ctx(16_384)).payload);
    out.push(batch.encode(&ctx(4096)).payload);
    out
}

/// A decided v2 batch of `rows` rows, as the e2e bench's spam route sees it: the stand-in
/// model's answer, a few spam rows, a few limited to the fallback. Also the size of its
/// two bodies.
fn decided_batch(rows: usize) -> (Exchange, usize) {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/e2e/policy.full.yaml"
    ))
    .unwrap();
    // The bench signs with a key of its own; the record's size does not depend on it.
    let text = text.split("tagging:").next().unwrap();
    let policy = crate::config::validate::parse(text, 1 << 20).unwrap();
    let request = crate::testing::v2_request(rows, 7);
    let request_value: serde_json::Value = serde_json::from_str(&request).unwrap();
    let response = crate::testing::StandInModel::infer_v2(&request_value)
        .unwrap()
        .to_string();
    let mut ex = exchange(request.as_bytes(), response.as_bytes(), 1 << 20);
    ex.route = "spam".into();
    ex.record = context(&policy);
    ex.tag = Some(format!("sg1.{}.{}", "e".repeat(150), "s".repeat(86)));
    let scores: Vec<f64> = response_scores(&response);
    ex.decision = Some(DecisionOutcome::Made(
        scores
            .iter()
            .enumerate()
            .map(|(i, &score)| {
                let spam = score >= 0.9;
                let limited = spam && i % 3 == 0;
                let action = |spam: bool| Arc::<str>::from(if spam { "spam" } else { "ham" });
                RowDecision {
                    score,
                    class_scores: None,
                    threshold: Some(if i < rows / 2 { 0.9 } else { 0.91 }),
                    threshold_mode: Some("adaptive"),
                    model_action: action(spam),
                    final_action: action(spam && !limited),
                    limit: if limited {
                        crate::decide::LimitOutcome::Fallback
                    } else {
                        crate::decide::LimitOutcome::Ok
                    },
                    explored: false,
                    propensity: None,
                }
            })
            .collect(),
    ));
    (ex, request.len() + response.len())
}

/// Column 1 of the `predict_proba` output.
fn response_scores(response: &str) -> Vec<f64> {
    let v: serde_json::Value = serde_json::from_str(response).unwrap();
    let output = v["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "predict_proba")
        .unwrap();
    let data = output["data"].as_array().unwrap();
    data.chunks(2).map(|c| c[1].as_f64().unwrap()).collect()
}

fn typed(entry: &SpoolEntry) -> v1::Record {
    serde_json::from_slice(&entry.payload).unwrap()
}

#[test]
fn a_response_the_decision_step_read_is_embedded_without_a_second_parse() {
    let mut ex = exchange(b"{}", br#"{"model_name":"m","outputs":[]}"#, 1024);
    ex.response_read = Some(ReadJson {
        model_name: Some("from-the-read".into()),
        model_version: None,
    });
    let v = decode(&ex.encode(&ctx(1 << 20)));
    assert_eq!(v["response"]["body"]["encoding"], "json");
    assert_eq!(
        v["response"]["body"]["data"]["outputs"],
        serde_json::json!([])
    );
    // The model comes from what the read found, not from parsing the body again.
    assert_eq!(v["model"]["name"], "from-the-read");
    // Bytes a read skipped without checking their UTF-8 are not embedded as JSON.
    let mut bad = exchange(b"{}", b"{\"s\":\"\xff\"}", 1024);
    bad.response_read = Some(ReadJson::default());
    let v = decode(&bad.encode(&ctx(1 << 20)));
    assert_eq!(v["response"]["body"]["encoding"], "base64");
}

#[test]
fn a_large_batch_in_columns_costs_little_more_than_its_bodies() {
    let (batch, bodies) = decided_batch(421);
    let rows_form = batch.encode(&ctx(1 << 20));
    let columns = batch.encode(&EncodeContext {
        record_decisions: RecordDecisions::Columns,
        ..ctx(1 << 20)
    });
    let ratio = columns.payload.len() as f64 / bodies as f64;
    eprintln!(
            "421 rows: bodies {bodies} B; record with decisions in rows {} B ({:.2}x), in columns {} B ({ratio:.2}x)",
            rows_form.payload.len(),
            rows_form.payload.len() as f64 / bodies as f64,
            columns.payload.len(),
        );
    assert!(ratio <= 1.10, "{ratio}");
    let (rows_record, columns_record) = (typed(&rows_form), typed(&columns));
    assert!(rows_record.decision_columns.is_none());
    assert!(columns_record.decisions.is_none());
    assert_eq!(
        rows_record.row_decisions().unwrap(),
        columns_record.row_decisions().unwrap(),
        "the same truth in both forms"
    );
    let c = columns_record.decision_columns.as_ref().unwrap();
    assert_eq!(c.rows, 421);
    assert_eq!(c.outcomes.len(), 3, "{:?}", c.outcomes);
    assert!(
        c.score.is_none(),
        "the scores are in the recorded response body"
    );
    assert_eq!(c.score_source.output.as_deref(), Some("predict_proba"));
    assert_eq!(c.score_source.column, Some(1));
    assert_eq!(c.threshold.len(), 2, "two runs: {:?}", c.threshold);
    let in_body = response_scores(
        columns_record
            .response
            .as_ref()
            .unwrap()
            .body
            .data
            .as_ref()
            .unwrap()
            .get(),
    );
    assert_eq!(in_body.len(), 421);
    assert!(
        columns_record
            .row_decisions()
            .unwrap()
            .iter()
            .any(|d| d.final_action == "spam")
            && rows_record
                .row_decisions()
                .unwrap()
                .iter()
                .any(|d| d.model_action == "spam"),
        "the batch has both actions"
    );
}

#[test]
fn a_decided_record_over_the_limit_cuts_bodies_then_stores_columns_then_omits() {
    let (batch, _) = decided_batch(10_000);
    let whole = typed(&batch.encode(&ctx(usize::MAX)));
    assert!(whole.decisions.as_ref().is_some_and(|d| d.len() == 10_000));

    // Bodies cut, then the decisions in columns, the scores inline (the body is cut).
    let limit = 300_000;
    let entry = batch.encode(&ctx(limit));
    assert!(entry.payload.len() <= limit, "{}", entry.payload.len());
    let cut = typed(&entry);
    assert!(cut.request.body.truncated && cut.response.as_ref().unwrap().body.truncated);
    assert!(cut.decisions.is_none() && cut.decisions_omitted.is_none());
    let c = cut.decision_columns.as_ref().unwrap();
    let scores: Vec<f64> = whole
        .decisions
        .as_ref()
        .unwrap()
        .iter()
        .map(|d| d.score)
        .collect();
    assert_eq!(
        c.score.as_ref(),
        Some(&scores),
        "the scores inline, exactly"
    );
    assert_eq!(cut.row_decisions(), whole.row_decisions());

    // Too small for even the columns: omitted, and said so.
    let entry = batch.encode(&ctx(8192));
    assert!(entry.payload.len() <= 8192, "{}", entry.payload.len());
    let omitted = typed(&entry);
    assert_eq!(omitted.decisions_omitted, Some(10_000));
    assert!(omitted.decisions.is_none() && omitted.decision_columns.is_none());
    assert!(omitted.row_decisions().is_none());
    eprintln!(
            "10,000 rows: {} B whole; {} B under a 300,000 B limit (columns); {} B under 8 KiB (omitted)",
            batch.encode(&ctx(usize::MAX)).payload.len(),
            batch.encode(&ctx(limit)).payload.len(),
            entry.payload.len()
        );
}

#[test]
fn written_records_read_as_the_typed_record_and_write_back_byte_for_byte() {
    let schema: serde_json::Value =
        serde_json::from_str(include_str!("../record.v1.schema.json")).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    for payload in written_records() {
        let text = String::from_utf8(payload).unwrap();
        let record: v1::Record =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(serde_json::to_string(&record).unwrap(), text);
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| format!("{}: {e}", e.instance_path))
            .collect();
        assert!(
            errors.is_empty(),
            "{errors:?}: {}",
            &text[..text.len().min(2000)]
        );
    }
}

#[test]
fn model_from_tf_serving_and_v2_paths() {
    assert_eq!(
        model_from_path("/v1/models/half:predict"),
        (Some("half"), None)
    );
    assert_eq!(
        model_from_path("/v1/models/half/versions/2:predict"),
        (Some("half"), Some("2"))
    );
    assert_eq!(model_from_path("/v2/models/m/infer"), (Some("m"), None));
    assert_eq!(model_from_path("/other"), (None, None));
}

fn inbound_of(ex: &Exchange, ctx: &EncodeContext) -> serde_json::Value {
    decode(&ex.encode(ctx))["inbound_tags"].clone()
}

fn counted(ctx: &EncodeContext, kind: &'static str) -> u64 {
    ctx.inbound_tags
        .get_or_create(&crate::tee::metrics::RouteKind {
            route: "default".into(),
            kind,
        })
        .get()
}

#[test]
fn escaped_and_deeply_nested_tags_are_found() {
    let ctx = ctx(1 << 20);
    let escaped = br#"{"inputs": [{"data": ["\u0073g1.eyJrIjoiayJ9.c2ln"]}]}"#;
    let tags = inbound_of(&exchange(escaped, b"{}", 1 << 20), &ctx);
    assert_eq!(tags.as_array().unwrap().len(), 1, "{tags}");
    assert_eq!(tags[0]["found_in"], "body");
    assert_eq!(tags[0]["valid"], false);
    let deep = format!(
        "{}\"sg1.eyJrIjoiayJ9.c2ln\"{}",
        "[".repeat(500),
        "]".repeat(500)
    );
    // (The record of such a body is itself too deep for serde_json to read back.)
    let ex = exchange(deep.as_bytes(), b"{}", 1 << 20);
    let tags = ex.check_inbound_tags(&VerifyBudget::default(), &ctx.inbound_tags);
    assert_eq!(tags.0.len(), 1, "{tags:?}");
    assert_eq!(tags.0[0].error, Some("malformed"));
    assert_eq!(counted(&ctx, "invalid"), 2);
}

#[test]
fn tags_past_the_per_record_bounds_are_recorded_or_counted_unverified() {
    let ctx = ctx(1 << 20);
    let body =
        serde_json::to_vec(&(0..20).map(|i| format!("sg1.e30.{i}")).collect::<Vec<_>>()).unwrap();
    let tags = inbound_of(&exchange(&body, b"{}", 1 << 20), &ctx);
    let tags = tags.as_array().unwrap();
    assert_eq!(tags.len(), MAX_INBOUND_TAGS);
    let unverified = |t: &&serde_json::Value| t["error"] == "unverified";
    assert_eq!(
        tags.iter().filter(unverified).count(),
        MAX_INBOUND_TAGS - MAX_VERIFIED_TAGS
    );
    assert!(tags[..MAX_VERIFIED_TAGS]
        .iter()
        .all(|t| t["error"] == "malformed"));
    assert_eq!(counted(&ctx, "invalid"), MAX_VERIFIED_TAGS as u64);
    assert_eq!(counted(&ctx, "unverified"), 20 - MAX_VERIFIED_TAGS as u64);
}

#[test]
fn the_verification_budget_is_per_second_and_runs_out() {
    let budget = VerifyBudget::default();
    let slice = VERIFY_BUDGET_PER_SECOND / 4;
    let mut ran = 0;
    while budget.spend(|| std::thread::sleep(slice)).is_some() {
        ran += 1;
        assert!(ran <= 4, "the budget holds");
    }
    assert!(ran >= 3);
    let next_second = Duration::from_secs(1).saturating_sub(budget.start.elapsed());
    std::thread::sleep(next_second + Duration::from_millis(10));
    assert!(budget.spend(|| ()).is_some(), "a new second, a new budget");
}

/// A `ModelInfer` exchange over gRPC: the request typed, the response's FP32 output raw.
fn grpc_exchange(cap: usize) -> Exchange {
    use crate::oip::*;
    use prost::Message as _;
    let request = ModelInferRequest {
        model_name: "spam-filter".into(),
        model_version: "3".into(),
        id: "r-9".into(),
        inputs: vec![InferInputTensor {
            name: "text".into(),
            datatype: "BYTES".into(),
            shape: vec![2],
            contents: Some(InferTensorContents {
                bytes_contents: vec![b"hello".to_vec(), vec![0xff, 0x00]],
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let response = ModelInferResponse {
        model_name: "spam-filter".into(),
        model_version: "3".into(),
        id: "r-9".into(),
        outputs: vec![InferOutputTensor {
            name: "predict_proba".into(),
            datatype: "FP32".into(),
            shape: vec![2],
            ..Default::default()
        }],
        raw_output_contents: vec![[0.1f32.to_le_bytes(), 0.7f32.to_le_bytes()].concat()],
        ..Default::default()
    };
    let mut ex = exchange(
        &frame(&request.encode_to_vec()),
        &frame(&response.encode_to_vec()),
        cap,
    );
    ex.path = MODEL_INFER_PATH.into();
    for m in [&mut ex.request, ex.response.as_mut().unwrap()] {
        m.headers
            .insert("content-type", "application/grpc".parse().unwrap());
    }
    ex
}

#[test]
fn grpc_model_infer_messages_are_recorded_as_the_rest_v2_bodies_of_the_call() {
    let entry = grpc_exchange(1024).encode(&ctx(1 << 20));
    let v = decode(&entry);
    assert_eq!(v["model"]["name"], "spam-filter");
    assert_eq!(v["model"]["version"], "3");
    assert_eq!(v["request"]["v2_id"], "r-9");
    let req = &v["request"]["body"];
    assert_eq!(req["encoding"], "json");
    assert_eq!(
        req["data"],
        serde_json::json!({"id": "r-9", "inputs": [{"name": "text", "shape": [2],
            "datatype": "BYTES", "data": ["aGVsbG8=", "/wA="]}]})
    );
    let resp = &v["response"]["body"];
    assert_eq!(resp["encoding"], "json");
    // FP32 as its shortest round-trip decimal, read from the raw little-endian bytes.
    let text = String::from_utf8(entry.payload.clone()).unwrap();
    assert!(text.contains(r#""data":[0.1,0.7]"#), "{text}");
    assert_eq!(resp["data"]["model_name"], "spam-filter");
    assert_eq!(resp["data"]["outputs"][0]["datatype"], "FP32");
    // `size` counts the message as it went over the wire.
    let ex = grpc_exchange(1024);
    assert_eq!(resp["size"], ex.response.unwrap().body.size);
    // The record reads back as the typed record.
    serde_json::from_slice::<v1::Record>(&entry.payload).unwrap();

    // Cut by the capture cap: the message cannot be read, and stays base64.
    let v = decode(&grpc_exchange(20).encode(&ctx(1 << 20)));
    assert_eq!(v["request"]["body"]["encoding"], "base64");
    assert_eq!(v["request"]["body"]["truncated"], true);
    // Whole, but its JSON would pass the cap: base64 too.
    let small = grpc_exchange(1024).response.unwrap().body.bytes.len() + 2;
    let v = decode(&grpc_exchange(small).encode(&ctx(1 << 20)));
    assert_eq!(v["response"]["body"]["encoding"], "base64");
    assert_eq!(v["response"]["body"]["truncated"], false);
}

#[test]
fn a_pretty_printed_body_is_recorded_on_one_line_as_sent_otherwise() {
    let req = b"{\n  \"id\": \"r-1\",\n  \"inputs\": [{\"name\": \"a b\\n\", \"data\": [1.50, 2e3]}]\n}\n";
    let entry = exchange(req, b"{\r\n\"outputs\": []}", 1024).encode(&ctx(1 << 20));
    let text = String::from_utf8(entry.payload.clone()).unwrap();
    assert!(!text.contains('\n') && !text.contains('\r'), "{text}");
    assert!(
        text.contains(r#"{"id":"r-1","inputs":[{"name":"a b\n","data":[1.50,2e3]}]}"#),
        "numbers and strings as sent: {text}"
    );
    let v = decode(&entry);
    assert_eq!(v["request"]["body"]["encoding"], "json");
    assert_eq!(v["request"]["v2_id"], "r-1");
    assert_eq!(
        v["response"]["body"]["data"],
        serde_json::json!({"outputs": []})
    );
}
