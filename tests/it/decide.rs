//! Decisions through the real proxy: thresholds, limits (each breach policy), consumers,
//! unreadable responses, decisions written into the body and the record, and the metrics of an
//! adaptive threshold held at its clamp.

use std::time::Duration;

use crate::common::*;
use sluicegate::demo::{v2_request, StandInModel};

/// Starts the proxy in front of the stand-in model with `policy` (YAML).
async fn proxy_with(policy: &str) -> (ProxyProcess, tempfile::TempDir) {
    let model = StandInModel::spawn().await.unwrap();
    let dir = spool_dir();
    let file = write_policy(dir.path(), policy);
    let proxy = start_with_policy(model, dir.path(), &file, &[]);
    (proxy, dir)
}

fn header(h: &http::HeaderMap, name: &str) -> String {
    h.get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// The stand-in model's spam probability for each row of the v2 request `body`, computed
/// independently of the proxy.
fn row_scores(body: &str) -> Vec<f64> {
    let req: serde_json::Value = serde_json::from_str(body).unwrap();
    let data: Vec<f64> = req["inputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    data.chunks(4).map(StandInModel::score).collect()
}

/// The `sluicegate_action` output a deciding v2 route writes into the response body.
fn action_tensor(resp: &[u8]) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(resp).unwrap();
    v["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "sluicegate_action")
        .expect("decisions written into the body")
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v2_batch_of_n_by_2_probabilities_gives_n_correct_decisions() {
    let (proxy, dir) =
        proxy_with(&spam_route("{fixed: 0.5}", "[]", "    write_decisions: {}")).await;
    let c = client();
    let body = v2_request(8, 42);
    let (status, headers, resp) =
        post(&c, &proxy.url("/v2/models/spam-filter/infer"), body.clone()).await;
    assert_eq!(status, 200);

    let expected: Vec<&str> = row_scores(&body)
        .into_iter()
        .map(|p| if p >= 0.5 { "spam" } else { "ham" })
        .collect();
    assert!(
        expected.contains(&"spam") && expected.contains(&"ham"),
        "{expected:?}"
    );
    assert_eq!(header(&headers, "sluicegate-action"), expected.join(","));
    assert_eq!(
        header(&headers, "sluicegate-model-action"),
        expected.join(",")
    );
    assert_eq!(header(&headers, "sluicegate-limit"), ["ok"; 8].join(","));
    assert_eq!(
        header(&headers, "sluicegate-threshold"),
        ["0.5"; 8].join(",")
    );
    assert_eq!(header(&headers, "sluicegate-policy").len(), 12);

    let tensor = action_tensor(&resp);
    assert_eq!(tensor["shape"], serde_json::json!([8]));
    assert_eq!(tensor["datatype"], "BYTES");
    assert_eq!(tensor["data"], serde_json::json!(expected));

    let records = proxy.spool_records_after(&dir.path().join("spool"), 1.0);
    let r = &records[0];
    assert_eq!(r["route"], "spam");
    let decisions = r["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 8);
    assert_eq!(decisions[0]["threshold_mode"], "fixed");
    assert_eq!(decisions[3]["final_action"], expected[3]);
    // The record keeps the model's own answer, not the rewritten body.
    let outputs = r["response"]["body"]["data"]["outputs"].as_array().unwrap();
    assert!(outputs.iter().all(|o| o["name"] != "sluicegate_action"));
    assert_eq!(
        r["policy"]["version"],
        header(&headers, "sluicegate-policy").as_str()
    );
}

/// Every row is spam (threshold 0), so the limit's count decides.
fn limited(on_breach: &str) -> String {
    let fallback = if on_breach == "fallback" {
        ", fallback: ham"
    } else {
        ""
    };
    spam_route(
        "{fixed: 0.0}",
        &format!("[{{action: spam, max_count: 3, window: 2s, on_breach: {on_breach}{fallback}}}]"),
        "",
    )
}

async fn one(proxy: &ProxyProcess, c: &HttpClient) -> (u16, http::HeaderMap, bytes::Bytes) {
    post(
        c,
        &proxy.url("/v2/models/spam-filter/infer"),
        v2_request(1, 5),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flag_lets_breaches_through_marked() {
    let (proxy, _dir) = proxy_with(&limited("flag")).await;
    let c = client();
    for _ in 0..3 {
        let (s, h, _) = one(&proxy, &c).await;
        assert_eq!((s, header(&h, "sluicegate-limit")), (200, "ok".into()));
    }
    let (s, h, _) = one(&proxy, &c).await;
    assert_eq!(s, 200);
    assert_eq!(header(&h, "sluicegate-limit"), "flagged");
    assert_eq!(header(&h, "sluicegate-action"), "spam");
    assert_eq!(proxy.metric("sluicegate_limit_in_breach"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_replaces_the_action_and_the_window_expires() {
    let (proxy, dir) = proxy_with(&limited("fallback")).await;
    let c = client();
    for _ in 0..3 {
        let (_, h, _) = one(&proxy, &c).await;
        assert_eq!(header(&h, "sluicegate-action"), "spam");
    }
    let (s, h, _) = one(&proxy, &c).await;
    assert_eq!(s, 200);
    assert_eq!(header(&h, "sluicegate-action"), "ham");
    assert_eq!(header(&h, "sluicegate-model-action"), "spam");
    assert_eq!(header(&h, "sluicegate-limit"), "fallback");

    // The 2 s window slides past: the action is allowed again, and the breach ends.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, h, _) = one(&proxy, &c).await;
    assert_eq!(header(&h, "sluicegate-action"), "spam");
    assert_eq!(header(&h, "sluicegate-limit"), "ok");
    proxy.wait_metric(
        "sluicegate_limit_alerts_total",
        2.0,
        Duration::from_secs(10),
    );

    // Start and end are alert records beside the request records.
    let alerts: Vec<_> = proxy
        .spool_records_after(&dir.path().join("spool"), 7.0)
        .into_iter()
        .filter(|r| r["schema"] == "sluicegate.alert.v1")
        .collect();
    let events: Vec<&str> = alerts
        .iter()
        .map(|a| a["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["limit_breach_started", "limit_breach_ended"]);
    assert_eq!(alerts[0]["route"], "spam");
    assert_eq!(alerts[0]["action"], "spam");
    assert_eq!(alerts[0]["on_breach"], "fallback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_refuses_with_429_and_retry_after() {
    let (proxy, dir) = proxy_with(&limited("reject")).await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(one(&proxy, &c).await.0, 200);
    }
    let (s, h, body) = one(&proxy, &c).await;
    assert_eq!(s, 429);
    assert!(header(&h, "retry-after").parse::<u64>().unwrap() >= 1);
    // The client got no action; what the model wanted is beside it.
    assert_eq!(header(&h, "sluicegate-action"), "rejected");
    assert_eq!(header(&h, "sluicegate-model-action"), "spam");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "limit_exceeded");
    // A rejected decision is not an action taken: still refused, not counted up.
    assert_eq!(one(&proxy, &c).await.0, 429);
    assert_eq!(proxy.metric("sluicegate_limit_outcomes_total"), 2.0);
    // The record says why the client got no answer (the audit counts rejections by it).
    let records = proxy.spool_records_after(&dir.path().join("spool"), 5.0);
    let rejected: Vec<_> = records.iter().filter(|r| r["status"] == 429).collect();
    assert_eq!(rejected.len(), 2);
    for r in rejected {
        assert_eq!(r["error"]["code"], "limit_exceeded");
        assert!(r["error"].get("grpc_status").is_none());
    }
}

/// A shadow route decides, counts and records as an enforcing one would, but the client gets the
/// model's answer byte for byte: a limit that would reject rejects nothing, nothing is written
/// into the body, and no decision header or tag goes out; `sluicegate-mode: shadow` says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_route_decides_and_records_but_answers_as_the_model_did() {
    let policy = spam_capped_at_3("    write_decisions: {}\n    shadow: true");
    let (proxy, dir) = proxy_with(&policy).await;
    let c = client();
    let request = v2_request(1, 5);
    let expected = serde_json::to_vec(
        &StandInModel::infer_v2(&serde_json::from_str(&request).unwrap()).unwrap(),
    )
    .unwrap();
    for _ in 0..5 {
        let (s, h, body) = one(&proxy, &c).await;
        assert_eq!(s, 200, "a shadow limit rejects nothing");
        assert_eq!(body, expected, "the model's body, untouched");
        assert_eq!(header(&h, "sluicegate-mode"), "shadow");
        for name in ["sluicegate-action", "sluicegate-limit", "sluicegate-tag"] {
            assert!(!h.contains_key(name), "{name} on a shadow response");
        }
    }
    // Counted as the enforcing route would have: 3 actions taken, then 2 rejections.
    assert_eq!(proxy.metric("sluicegate_limit_outcomes_total"), 2.0);
    assert_eq!(proxy.metric("sluicegate_limit_in_breach"), 1.0);
    let records = proxy.spool_records_after(&dir.path().join("spool"), 5.0);
    let decided: Vec<_> = records
        .iter()
        .filter(|r| r["schema"] == "sluicegate.record.v1")
        .collect();
    assert_eq!(decided.len(), 5);
    for r in &decided {
        assert_eq!(r["shadow"], true);
        assert_eq!(r["status"], 200);
        assert!(r["tag"].is_null());
        assert_eq!(r["decisions"][0]["model_action"], "spam");
    }
    // The refusals the limit would have made are the records' errors, as when enforced.
    let refused: Vec<bool> = decided
        .iter()
        .map(|r| r["error"]["code"] == "limit_exceeded")
        .collect();
    assert_eq!(refused, [false, false, false, true, true]);
    assert!(decided[4]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("shadow mode: not applied"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fraction_applies_after_min_decisions() {
    // Rows alternate by the threshold: 0.0 makes every row spam; at most half may be.
    let policy = spam_route(
        "{fixed: 0.0}",
        "[{action: spam, max_fraction: 0.5, min_decisions: 4, window: 1m, on_breach: fallback, fallback: ham}]",
        "",
    );
    let (proxy, _dir) = proxy_with(&policy).await;
    let c = client();
    let (_, h, _) = post(
        &c,
        &proxy.url("/v2/models/spam-filter/infer"),
        v2_request(6, 1),
    )
    .await;
    // Rows 1-3: under min_decisions, spam. Row 4: 4/4 > 0.5 → ham; then 4/5, 4/6 → ham.
    assert_eq!(
        header(&h, "sluicegate-action"),
        "spam,spam,spam,ham,ham,ham"
    );
    assert_eq!(
        header(&h, "sluicegate-limit"),
        "ok,ok,ok,fallback,fallback,fallback"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_consumers_are_refused_when_the_policy_says_so() {
    let policy = format!(
        "consumers: {{declared: [checkout], undeclared: refuse}}\n{}",
        spam_route("{fixed: 0.5}", "[]", "")
    );
    let (proxy, _dir) = proxy_with(&policy).await;
    let c = client();
    let (s, _, body) = one(&proxy, &c).await;
    assert_eq!(s, 403);
    assert!(String::from_utf8_lossy(&body).contains("consumer_undeclared"));
    let req = http::Request::post(proxy.url("/v2/models/spam-filter/infer"))
        .header("sluicegate-consumer", "checkout")
        .body(http_body_util::Full::new(bytes::Bytes::from(v2_request(
            1, 1,
        ))))
        .unwrap();
    assert_eq!(c.request(req).await.unwrap().status(), 200);
    let metrics = admin_get(proxy.admin, "/metrics").1;
    assert!(
        metrics.contains(
            r#"sluicegate_consumer_requests_total{consumer="checkout",declared="true"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"consumer="undeclared",declared="false"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_response_passes_through_with_a_decision_error() {
    let policy = spam_route("{fixed: 0.5}", "[]", "").replace("predict_proba", "no_such_output");
    let (proxy, dir) = proxy_with(&policy).await;
    let c = client();
    let body = v2_request(2, 3);
    let (s, h, resp) = one_with(&proxy, &c, &body).await;
    assert_eq!(s, 200);
    assert!(h.get("sluicegate-action").is_none());
    let direct: serde_json::Value = serde_json::from_slice(&resp).unwrap();
    assert_eq!(direct["outputs"][0]["name"], "predict_proba", "unchanged");
    assert_eq!(proxy.metric("sluicegate_decision_errors_total"), 1.0);
    proxy.wait_metric(
        "sluicegate_tee_records_spooled_total",
        1.0,
        Duration::from_secs(10),
    );
    let r = &spool_records(&dir.path().join("spool"))[0];
    assert_eq!(r["decision_error"]["kind"], "missing");
    assert!(r["decisions"].is_null());
}

async fn one_with(
    proxy: &ProxyProcess,
    c: &HttpClient,
    body: &str,
) -> (u16, http::HeaderMap, bytes::Bytes) {
    post(
        c,
        &proxy.url("/v2/models/spam-filter/infer"),
        body.to_owned(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiclass_takes_the_argmax_unless_under_its_threshold() {
    let policy = r#"
routes:
  spam:
    match: {model: spam-filter}
    protocol: v2
    score: {output: predict_proba}
    decision:
      multiclass:
        classes: [ham, spam]
        default_action: unsure
        thresholds:
          spam: {fixed: 0.8}
"#;
    let (proxy, _dir) = proxy_with(policy).await;
    let c = client();
    let body = v2_request(8, 9);
    let (s, h, _) = one_with(&proxy, &c, &body).await;
    assert_eq!(s, 200);
    let expected: Vec<&str> = row_scores(&body)
        .into_iter()
        .map(|p| {
            if p > 1.0 - p {
                if p >= 0.8 {
                    "spam"
                } else {
                    "unsure"
                }
            } else {
                "ham"
            }
        })
        .collect();
    assert_eq!(header(&h, "sluicegate-action"), expected.join(","));
}

/// Sends `path` (a trick on the stand-in's `spam-filter`) once the route's reject limit is
/// spent by three plain requests; returns its status, headers and record.
async fn after_the_limit(path: &str) -> (u16, http::HeaderMap, serde_json::Value) {
    let policy = spam_route(
        "{fixed: 0.0}",
        "[{action: spam, max_count: 3, window: 1m, on_breach: reject}]",
        "",
    );
    let (proxy, dir) = proxy_with(&policy).await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(one(&proxy, &c).await.0, 200);
    }
    let (status, headers, _) = post(&c, &proxy.url(path), v2_request(1, 5)).await;
    proxy.wait_metric(
        "sluicegate_tee_records_spooled_total",
        4.0,
        Duration::from_secs(10),
    );
    let id = header(&headers, "sluicegate-id");
    let record = spool_records(&dir.path().join("spool"))
        .into_iter()
        .find(|r| r["id"] == id.as_str())
        .expect("the trick's record");
    (status, headers, record)
}

/// The trick reaches the route under its normalized path: the limit refuses it.
async fn assert_routed(path: &str) {
    let (status, _, r) = after_the_limit(path).await;
    eprintln!("path trick {path}: {status} on route {}", r["route"]);
    assert_eq!(status, 429, "{path} stepped around the limit");
    assert_eq!(r["route"], "spam", "{path}");
    assert_eq!(
        r["request"]["path"], "/v2/models/spam-filter/infer",
        "{path}"
    );
    assert_eq!(r["status"], 429, "{path}");
}

/// The trick is refused: 400 `ambiguous_path`, recorded as sent.
async fn assert_refused(path: &str) {
    let (status, _, r) = after_the_limit(path).await;
    eprintln!("path trick {path}: {status} {}", r["error"]["code"]);
    assert_eq!(status, 400, "{path}");
    assert_eq!(r["error"]["code"], "ambiguous_path", "{path}");
    assert_eq!(r["request"]["path"], path, "{path}");
    assert!(r["response"].is_null(), "{path} was forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_trick_encoded_hyphen_is_routed_and_limited() {
    assert_routed("/v2/models/spam%2Dfilter/infer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_trick_lower_case_encoding_is_routed_and_limited() {
    assert_routed("/v2/models/spam%2dfilter/infer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_trick_encoded_letters_are_routed_and_limited() {
    assert_routed("/v2/%6Dodels/%73pam%2Dfilte%72/infer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_trick_encoded_slash_is_refused() {
    assert_refused("/v2/models/spam-filter%2Finfer").await;
    assert_refused("/v2/models/x%2f..%2fspam-filter/infer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_trick_encoded_backslash_is_refused() {
    assert_refused("/v2/models/x%5C..%5Cspam-filter/infer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_trick_double_encoding_is_refused() {
    assert_refused("/v2/models/spam%252Dfilter/infer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_trick_encoded_nul_is_refused() {
    assert_refused("/v2/models/spam-filter%00/infer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_trick_dot_dot_segment_is_refused() {
    assert_refused("/v2/models/x/../spam-filter/infer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_trick_encoded_dot_dot_segment_is_refused() {
    assert_refused("/v2/models/x/%2e%2E/spam-filter/infer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_trick_dot_segment_is_refused() {
    assert_refused("/v2/models/./spam-filter/infer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_trick_encoded_colon_on_v1_is_refused() {
    assert_refused("/v1/models/spam-filter%3Apredict").await;
}

/// How the compressing stand-in encodes its answers.
#[derive(Clone, Copy)]
enum Compress {
    /// gzip when the request's `accept-encoding` allows it, as Triton does.
    WhenAsked,
    /// This coding (gzip or deflate) whatever was asked.
    Always(&'static str),
    /// Bytes that claim this coding but are not it.
    Broken(&'static str),
}

/// The stand-in model behind a compressing layer; each request's `accept-encoding` is kept.
async fn compressing_model(
    how: Compress,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use http_body_util::BodyExt;
    use std::io::Write;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let log = log.clone();
                    async move {
                        let accept = header(req.headers(), "accept-encoding");
                        log.lock().unwrap().push(accept.clone());
                        let body = req.into_body().collect().await?.to_bytes();
                        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        let out = StandInModel::infer_v2(&v).unwrap().to_string();
                        let coding = match how {
                            Compress::WhenAsked if accept.contains("gzip") => Some("gzip"),
                            Compress::WhenAsked => None,
                            Compress::Always(c) | Compress::Broken(c) => Some(c),
                        };
                        let body = match coding {
                            _ if matches!(how, Compress::Broken(_)) => {
                                b"\x1f\x8b\x08 not a real stream".to_vec()
                            }
                            Some("gzip") => {
                                let mut e =
                                    flate2::write::GzEncoder::new(Vec::new(), Default::default());
                                e.write_all(out.as_bytes()).unwrap();
                                e.finish().unwrap()
                            }
                            Some("deflate") => {
                                let mut e =
                                    flate2::write::ZlibEncoder::new(Vec::new(), Default::default());
                                e.write_all(out.as_bytes()).unwrap();
                                e.finish().unwrap()
                            }
                            _ => out.into_bytes(),
                        };
                        let mut resp = http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(body),
                        ));
                        resp.headers_mut()
                            .insert("content-type", "application/json".parse().unwrap());
                        if let Some(c) = coding {
                            resp.headers_mut()
                                .insert("content-encoding", c.parse().unwrap());
                        }
                        Ok::<_, hyper::Error>(resp)
                    }
                });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            });
        }
    });
    (addr, seen)
}

/// A v2 request to the proxy saying the client takes gzip.
async fn gzip_accepting(
    proxy: &ProxyProcess,
    c: &HttpClient,
) -> (u16, http::HeaderMap, bytes::Bytes) {
    use http_body_util::BodyExt;
    let req = http::Request::post(proxy.url("/v2/models/spam-filter/infer"))
        .header("content-type", "application/json")
        .header("accept-encoding", "gzip, deflate")
        .body(http_body_util::Full::new(bytes::Bytes::from(v2_request(
            2, 5,
        ))))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status.as_u16(), parts.headers, body)
}

/// A spam route whose limit allows four `spam` answers (every row is spam), writing its
/// decisions into the body.
fn compressed_policy() -> String {
    spam_route(
        "{fixed: 0.0}",
        "[{action: spam, max_count: 4, window: 1m, on_breach: reject}]",
        "    write_decisions: {}",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_server_that_compresses_when_asked_is_asked_for_identity() {
    let (model, seen) = compressing_model(Compress::WhenAsked).await;
    let dir = spool_dir();
    let file = write_policy(dir.path(), &compressed_policy());
    let proxy = start_with_policy(model, dir.path(), &file, &[]);
    let c = client();
    let (status, h, body) = gzip_accepting(&proxy, &c).await;
    assert_eq!(status, 200);
    assert_eq!(header(&h, "sluicegate-action"), "spam,spam");
    assert!(h.get("content-encoding").is_none());
    let v: serde_json::Value = serde_json::from_slice(&body).expect("a plain JSON body");
    assert_eq!(v["outputs"][1]["name"], "sluicegate_action");
    assert_eq!(seen.lock().unwrap().as_slice(), ["identity"]);
    // Routes that do not decide pass the client's accept-encoding on.
    let (status, h, _) = {
        use http_body_util::BodyExt;
        let req = http::Request::post(proxy.url("/v2/models/other/infer"))
            .header("accept-encoding", "gzip")
            .body(http_body_util::Full::new(bytes::Bytes::from(v2_request(
                1, 1,
            ))))
            .unwrap();
        let (p, b) = c.request(req).await.unwrap().into_parts();
        (p.status, p.headers, b.collect().await.unwrap().to_bytes())
    };
    assert_eq!(status, 200);
    assert_eq!(header(&h, "content-encoding"), "gzip");
    assert_eq!(seen.lock().unwrap()[1], "gzip");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_server_that_always_compresses_is_decoded_decided_and_limited() {
    for coding in ["gzip", "deflate"] {
        let (model, _) = compressing_model(Compress::Always(coding)).await;
        let dir = spool_dir();
        let file = write_policy(dir.path(), &compressed_policy());
        let proxy = start_with_policy(model, dir.path(), &file, &[]);
        let c = client();
        // Two rows of spam each: the third request would take the count to 6 > 4.
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let (status, h, body) = gzip_accepting(&proxy, &c).await;
            statuses.push(status);
            if status == 200 {
                assert_eq!(header(&h, "sluicegate-action"), "spam,spam", "{coding}");
                assert!(h.get("content-encoding").is_none(), "{coding}");
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(v["outputs"][1]["data"], serde_json::json!(["spam", "spam"]));
            }
        }
        eprintln!("always-{coding} model, 3 requests through a limit of 4 spam: {statuses:?}");
        assert_eq!(statuses, [200, 200, 429], "{coding}");
        let records = proxy.spool_records_after(&dir.path().join("spool"), 3.0);
        let r = &records[0];
        assert_eq!(r["decisions"].as_array().unwrap().len(), 2, "{coding}");
        assert_eq!(
            r["response"]["body"]["encoding"], "json",
            "{coding}: recorded decoded"
        );
        assert!(r["response"]["headers"].get("content-encoding").is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_in_a_coding_that_cannot_be_undone_gets_a_decision_error() {
    for coding in ["br", "gzip", "deflate"] {
        let (model, _) = compressing_model(Compress::Broken(coding)).await;
        let dir = spool_dir();
        let file = write_policy(dir.path(), &compressed_policy());
        let proxy = start_with_policy(model, dir.path(), &file, &[]);
        let c = client();
        let (status, h, _) = gzip_accepting(&proxy, &c).await;
        assert_eq!(
            status, 200,
            "{coding}: passed through, as an unreadable body is"
        );
        assert!(h.get("sluicegate-action").is_none());
        assert_eq!(header(&h, "content-encoding"), coding);
        assert_eq!(proxy.metric("sluicegate_decision_errors_total"), 1.0);
        proxy.wait_metric(
            "sluicegate_tee_records_spooled_total",
            1.0,
            Duration::from_secs(10),
        );
        let r = &spool_records(&dir.path().join("spool"))[0];
        assert_eq!(r["decision_error"]["kind"], "content_encoding", "{coding}");
    }
}

/// `value=count` pairs as sluicegate writes its counts headers: the largest count first, ties
/// by value.
fn counts_text(pairs: &[(&str, usize)]) -> String {
    let mut pairs: Vec<_> = pairs.iter().filter(|(_, n)| *n > 0).collect();
    pairs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let text: Vec<String> = pairs.iter().map(|(v, n)| format!("{v}={n}")).collect();
    text.join(",")
}

/// An nginx with its default buffers (`proxy_buffer_size`: one memory page, 4 KiB on x86-64,
/// for the whole response head), in front of `upstream` on 127.0.0.1:`port`, with every file
/// of its own inside `dir`. Ended when dropped.
struct Nginx {
    child: std::process::Child,
}

impl Nginx {
    /// `None` (a loud skip) when nginx is not installed, unless SLUICEGATE_REQUIRE_NGINX_TESTS
    /// or SLUICEGATE_REQUIRE_DEPLOY_TESTS is set (tests/run.sh installs it and sets the first).
    fn start(
        test: &str,
        dir: &std::path::Path,
        port: u16,
        upstream: std::net::SocketAddr,
    ) -> Option<Nginx> {
        use std::process::{Command, Stdio};
        let installed = Command::new("nginx")
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            let required = [
                "SLUICEGATE_REQUIRE_NGINX_TESTS",
                "SLUICEGATE_REQUIRE_DEPLOY_TESTS",
            ]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
            assert!(
                !required,
                "nginx is missing (Debian package `nginx`; tests/run.sh installs it) and the nginx tests are required"
            );
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIPPED {test}: nginx is not installed (Debian package `nginx`). \
                 Set SLUICEGATE_REQUIRE_NGINX_TESTS=1 to make this a failure. ***\n"
            );
            return None;
        }
        let d = dir.display();
        // Nothing about buffers is set: the point is nginx's defaults. One process, so that
        // killing it leaves no worker behind.
        let conf = format!(
            "daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://{upstream}; }}
    }}
}}
"
        );
        let file = dir.join("nginx.conf");
        std::fs::write(&file, conf).unwrap();
        let mut child = Command::new("nginx")
            .args(["-c", path_str(&file), "-p", path_str(dir), "-e"])
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let log = || std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            if let Some(status) = child.try_wait().unwrap() {
                panic!("nginx exited ({status}); its error log:\n{}", log());
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "nginx did not listen within 10 s; its error log:\n{}",
                    log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Nginx { child })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10000_row_batch_passes_through_a_default_nginx_in_front() {
    const ROWS: usize = 10_000;
    let model = StandInModel::spawn().await.unwrap();
    let dir = spool_dir();
    let keys = dir.path().join("keys");
    let out = std::process::Command::new(BIN)
        .args(["tag", "keygen", "--id", "k1", "--dir", path_str(&keys)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // Every row the model calls spam past the third falls back to ham; the answer is tagged.
    let policy = format!(
        "tagging: {{algorithm: ed25519, signing_key: k1}}\n{}",
        spam_route(
            "{fixed: 0.5}",
            "[{action: spam, max_count: 3, window: 1m, on_breach: fallback, fallback: ham}]",
            "    write_decisions: {}",
        )
    );
    let file = write_policy(dir.path(), &policy);
    let proxy = start_with_policy(
        model,
        dir.path(),
        &file,
        &["--tag-keys-dir", path_str(&keys)],
    );
    let nginx_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let Some(_nginx) = Nginx::start(
        "a_10000_row_batch_passes_through_a_default_nginx_in_front",
        nginx_dir.path(),
        port,
        proxy.data,
    ) else {
        return;
    };

    let body = v2_request(ROWS, 7);
    let spam = row_scores(&body).iter().filter(|p| **p >= 0.5).count();
    assert!(spam > 3, "the limit is crossed: {spam} spam rows");
    let c = client();
    let (status, h, resp) = post(
        &c,
        &format!("http://127.0.0.1:{port}/v2/models/spam-filter/infer"),
        body.clone(),
    )
    .await;
    let log = std::fs::read_to_string(nginx_dir.path().join("error.log")).unwrap_or_default();
    assert_eq!(status, 200, "nginx's error log:\n{log}");

    assert_eq!(header(&h, "sluicegate-rows"), ROWS.to_string());
    assert!(h.get("sluicegate-action").is_none(), "no per-row headers");
    assert!(h.get("sluicegate-threshold").is_none());
    assert_eq!(
        header(&h, "sluicegate-action-counts"),
        counts_text(&[("ham", ROWS - 3), ("spam", 3)])
    );
    assert_eq!(
        header(&h, "sluicegate-model-action-counts"),
        counts_text(&[("ham", ROWS - spam), ("spam", spam)])
    );
    assert_eq!(
        header(&h, "sluicegate-limit-counts"),
        counts_text(&[("ok", ROWS - spam + 3), ("fallback", spam - 3)])
    );
    let tag = header(&h, "sluicegate-tag");
    assert!(tag.starts_with("sg1."), "{tag}");
    let sluicegate_bytes: usize = h
        .iter()
        .filter(|(n, _)| n.as_str().starts_with("sluicegate-"))
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    let all_bytes: usize = h.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    eprintln!(
        "{ROWS} rows through nginx: {spam} spam by the model, 3 kept; sluicegate-* headers {sluicegate_bytes} bytes \
         (tag {} bytes), all headers {all_bytes} bytes, body {} bytes",
        tag.len(),
        resp.len()
    );
    assert!(sluicegate_bytes < 2048, "{h:?}");

    // The per-row truth is in the body.
    let tensor = action_tensor(&resp);
    let actions = tensor["data"].as_array().unwrap();
    assert_eq!(actions.len(), ROWS);
    assert_eq!(actions.iter().filter(|a| *a == "spam").count(), 3);

    // And in the record, under --max-record (1 MiB): a row per object would be 2.2 MB, so the
    // bodies are cut and the decisions stored in columns, scores written out. (The limit's
    // breach alert is spooled too.)
    let records = proxy.spool_records_after(&dir.path().join("spool"), 2.0);
    let r = records
        .iter()
        .find(|r| r["schema"] == "sluicegate.record.v1")
        .unwrap();
    let size = r.to_string().len();
    eprintln!("{ROWS} rows: record {size} bytes, bodies cut, decisions in columns");
    assert!(size <= 1 << 20, "{size}");
    assert!(r["decisions"].is_null() && r["decisions_omitted"].is_null());
    assert_eq!(r["response"]["body"]["truncated"], true);
    let columns = &r["decision_columns"];
    assert_eq!(columns["rows"], ROWS);
    assert_eq!(columns["score"].as_array().unwrap().len(), ROWS);
    let record: sluicegate::tee::record::v1::Record = serde_json::from_value(r.clone()).unwrap();
    let rows = record.row_decisions().unwrap();
    assert_eq!(rows.len(), ROWS);
    assert_eq!(rows.iter().filter(|d| d.final_action == "spam").count(), 3);
    assert_eq!(
        rows.iter().filter(|d| d.model_action == "spam").count(),
        spam
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_decided_response_caps_the_decided_response_and_max_request_body_does_not() {
    let c = client();
    let body = v2_request(2000, 3);
    let policy = spam_route("{fixed: 0.5}", "[]", "");

    // The request fits --max-request-body, the response is larger than it: decided all the same.
    let (proxy, _dir) = {
        let model = StandInModel::spawn().await.unwrap();
        let dir = spool_dir();
        let file = write_policy(dir.path(), &policy);
        let p = start_with_policy(model, dir.path(), &file, &["--max-request-body", "64KiB"]);
        (p, dir)
    };
    let url = proxy.url("/v2/models/spam-filter/infer");
    let (status, h, resp) = post(&c, &url, body.clone()).await;
    eprintln!(
        "2,000 rows: request {} bytes, decided response {} bytes",
        body.len(),
        resp.len()
    );
    assert!(body.len() < 64 << 10 && resp.len() > 64 << 10);
    assert_eq!(status, 200);
    assert_eq!(header(&h, "sluicegate-rows"), "2000");
    assert_eq!(proxy.metric("sluicegate_decision_errors_total"), 0.0);

    // Past --max-decided-response the response passes undecided, with a decision error.
    let model = StandInModel::spawn().await.unwrap();
    let dir = spool_dir();
    let file = write_policy(dir.path(), &policy);
    let proxy = start_with_policy(
        model,
        dir.path(),
        &file,
        &["--max-decided-response", "16KiB"],
    );
    let url = proxy.url("/v2/models/spam-filter/infer");
    let (status, h, _) = post(&c, &url, v2_request(1, 1)).await;
    assert_eq!((status, header(&h, "sluicegate-rows")), (200, "1".into()));
    let (status, h, resp) = post(&c, &url, body).await;
    assert_eq!(status, 200);
    assert!(h.get("sluicegate-rows").is_none() && h.get("sluicegate-action-counts").is_none());
    let v: serde_json::Value = serde_json::from_slice(&resp).expect("the model's answer, whole");
    assert_eq!(v["outputs"][0]["shape"], serde_json::json!([2000, 2]));
    assert_eq!(proxy.metric("sluicegate_decision_errors_total"), 1.0);
    let records = proxy.spool_records_after(&dir.path().join("spool"), 2.0);
    let r = records
        .iter()
        .find(|r| r["decision_error"].is_object())
        .unwrap();
    assert_eq!(r["decision_error"]["kind"], "response_too_large");
}

/// `sluicegate demo`, run briefly as a user runs it: every figure of its summary is recomputed
/// here from the spool's records (the typed record), stage by stage.
#[test]
fn demo_figures_match_the_spool() {
    use sluicegate::demo::{CONSUMER_DRIFT, CONSUMER_LATENCY, CONSUMER_LIVE, FED_BACK_EVERY};
    use sluicegate::tee::record::v1::{LimitOutcome, Record};

    let dir = spool_dir();
    let spool = dir.path().join("spool");
    let summary_file = dir.path().join("summary.json");
    let out = std::process::Command::new(BIN)
        .args(["demo", "--duration", "1s", "--rate", "100", "--spool-dir"])
        .arg(&spool)
        .arg("--summary-json")
        .arg(&summary_file)
        .env_remove("SLUICEGATE_KAFKA_BROKERS")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not a terminal: plain lines, no progress bars drawn over each other.
    assert!(!stdout.contains('\x1b') && !out.stderr.contains(&b'\x1b'));
    assert!(stdout.contains("what happened"), "{stdout}");
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&summary_file).unwrap()).unwrap();

    let entries = spool_records(&spool);
    let records: Vec<Record> = entries
        .iter()
        .filter(|v| v["schema"] == "sluicegate.record.v1")
        .map(|v| serde_json::from_value(v.clone()).expect("a v1 record"))
        .collect();
    // A stage's records in request order (the request index is in the v2 id, `req-N`).
    let stage = |consumer: &str| -> Vec<(u64, &Record)> {
        let mut v: Vec<(u64, &Record)> = records
            .iter()
            .filter(|r| r.consumer.id.as_deref() == Some(consumer))
            .map(|r| {
                let id = r.request.v2_id.as_deref().unwrap();
                (id.strip_prefix("req-").unwrap().parse().unwrap(), r)
            })
            .collect();
        v.sort_by_key(|(i, _)| *i);
        v
    };
    fn decisions(r: &Record) -> &[sluicegate::tee::record::v1::Decision] {
        r.decisions.as_deref().expect("decisions in rows")
    }
    // `n of of` over the rows of `recs` that satisfy `f`, as the summary writes a share.
    let share = |recs: &[&(u64, &Record)],
                 f: &dyn Fn(&sluicegate::tee::record::v1::Decision) -> bool| {
        let rows: Vec<_> = recs.iter().flat_map(|(_, r)| decisions(r)).collect();
        serde_json::json!({"n": rows.iter().filter(|d| f(d)).count(), "of": rows.len()})
    };
    let spam = |a: &str| a == "spam";

    // Latency: every proxied request was recorded.
    assert_eq!(s["latency"]["proxied_ok"], stage(CONSUMER_LATENCY).len());
    assert_eq!(s["latency"]["proxied_failed"], 0);

    // Drift: the thresholds the first and last shifted requests were decided under, and the
    // second half's rates, adaptive and fixed at the first threshold.
    let drift = stage(CONSUMER_DRIFT);
    let d = &s["drift"];
    assert_eq!(d["requests"], drift.len());
    let threshold = |r: &Record| decisions(r)[0].threshold.unwrap();
    let before = threshold(drift.first().unwrap().1);
    assert_eq!(d["threshold_before"], before);
    assert_eq!(d["threshold_after"], threshold(drift.last().unwrap().1));
    let from = d["settled_from_index"].as_u64().unwrap();
    let settled: Vec<_> = drift.iter().filter(|(i, _)| *i >= from).collect();
    assert!(settled.len() * 2 >= drift.len() - 1, "{from}");
    assert_eq!(
        d["adaptive_rate"],
        share(&settled, &|d| spam(&d.model_action))
    );
    assert_eq!(d["fixed_rate"], share(&settled, &|d| d.score >= before));

    // The limit: the rows from the first fallback to the last, and the breach alert.
    let l = &s["limit"];
    let fell_back = |r: &Record| {
        decisions(r)
            .iter()
            .any(|d| d.limit == LimitOutcome::Fallback)
    };
    let fallen: Vec<u64> = drift
        .iter()
        .filter(|(_, r)| fell_back(r))
        .map(|(i, _)| *i)
        .collect();
    match (fallen.first(), fallen.last()) {
        (Some(a), Some(b)) => {
            assert_eq!(l["span"], serde_json::json!([a, b]));
            let within: Vec<_> = drift.iter().filter(|(i, _)| a <= i && i <= b).collect();
            let fallback = share(&within, &|d| d.limit == LimitOutcome::Fallback);
            assert_eq!(l["fallback_rows"], fallback["n"]);
            assert_eq!(l["model_rate"], share(&within, &|d| spam(&d.model_action)));
            assert_eq!(
                l["delivered_rate"],
                share(&within, &|d| spam(&d.final_action))
            );
            let alert = &l["alert"];
            assert_eq!(alert["event"], "limit_breach_started");
            assert!(entries.iter().any(|e| e == alert), "{alert}");
        }
        _ => assert!(l["span"].is_null(), "{l}"),
    }

    // The live change: the versions before and after, every live record under the new one
    // and its generation, and the rates under the tightened limit.
    let c = &s["live_change"];
    assert!(drift
        .iter()
        .all(|(_, r)| c["version_before"] == r.policy.version));
    assert_ne!(c["version_before"], c["version_after"]);
    let generation = c["generation_after"].as_f64().unwrap();
    assert_eq!(generation, c["generation_before"].as_f64().unwrap() + 1.0);
    let live = stage(CONSUMER_LIVE);
    let all: Vec<_> = live.iter().collect();
    assert_eq!(c["requests"], live.len());
    let under_new = live
        .iter()
        .filter(|(_, r)| {
            c["version_after"] == r.policy.version && r.policy.generation as f64 == generation
        })
        .count();
    assert_eq!(
        c["under_new_version"],
        serde_json::json!({"n": under_new, "of": live.len()})
    );
    assert_eq!(under_new, live.len());
    assert_eq!(c["model_rate"], share(&all, &|d| spam(&d.model_action)));
    assert_eq!(c["delivered_rate"], share(&all, &|d| spam(&d.final_action)));
    assert_eq!(
        c["fallback_rows"],
        share(&all, &|d| d.limit == LimitOutcome::Fallback)["n"]
    );

    // The tag shown is the one its record holds, and it verified under the new policy.
    let t = &s["tag"];
    let id = t["prediction_id"].as_str().unwrap();
    let tagged = records
        .iter()
        .find(|r| r.id == id)
        .expect("the tagged record");
    assert_eq!(t["token"].as_str(), tagged.tag.as_deref());
    assert_eq!(t["claims"]["prediction_id"], id);
    assert_eq!(t["claims"]["policy_version"], c["version_after"]);

    // The audit: the training file held one row per drift request, and the tagged ones of
    // every FED_BACK_EVERY-th; the audit's direct share is exactly that.
    let a = &s["audit"];
    let planted = drift
        .iter()
        .filter(|(i, r)| i % FED_BACK_EVERY == 0 && r.tag.is_some())
        .count();
    assert_eq!(
        a["planted"],
        serde_json::json!({"n": planted, "of": drift.len()})
    );
    assert!(planted > 0);
    assert_eq!(a["reported_share"], planted as f64 / drift.len() as f64);
    assert_eq!(a["predictions_read"], entries.len());

    // The tee: everything in the spool, nothing dropped.
    assert_eq!(s["tee"]["spooled"], entries.len());
    assert_eq!(s["tee"]["dropped"], 0);
}

/// An adaptive threshold driven onto its `max` clamp (a target rate its scores cannot hold
/// under it): the gauges show it resting there, the realized counts follow the threshold each
/// row met, and the score and request-duration histograms count every row and request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adaptive_threshold_pinned_at_its_clamp_shows_in_the_metrics() {
    let threshold = "{adaptive: {target_rate: 0.01, window: 1m, initial: 0.2, min: 0.1, max: 0.3, max_step: 1.0, update_interval: 1s, min_samples: 20}}";
    let (proxy, _dir) = proxy_with(&spam_route(threshold, "[]", "")).await;
    let c = client();
    let url = proxy.url("/v2/models/spam-filter/infer");
    let first = v2_request(40, 1);
    assert_eq!(post(&c, &url, first.clone()).await.0, 200);

    // The top 1% of these scores is far above 0.3: the next update pins the threshold there.
    let series = r#"route="spam",class="spam""#;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while scrape(proxy.admin).sum_with("sluicegate_threshold", series) != 0.3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the threshold did not reach its max"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = v2_request(40, 2);
    assert_eq!(post(&c, &url, second.clone()).await.0, 200);

    let at_or_above = |body: &str, t: f64| row_scores(body).iter().filter(|&&s| s >= t).count();
    let above = (at_or_above(&first, 0.2) + at_or_above(&second, 0.3)) as f64;
    let scores: Vec<f64> = [row_scores(&first), row_scores(&second)].concat();
    let halves = scores.iter().filter(|&&s| s <= 0.5).count() as f64;
    // The counters are published by the next upkeep tick.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = scrape(proxy.admin);
        if m.sum_with("sluicegate_threshold_scores_total", series) == 80.0 {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "scores not published");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(m.sum_with("sluicegate_threshold_max", series), 0.3);
    assert_eq!(m.sum_with("sluicegate_threshold_min", series), 0.1);
    assert_eq!(m.sum_with("sluicegate_threshold_target_rate", series), 0.01);
    assert_eq!(
        m.sum_with("sluicegate_threshold_scores_at_or_above_total", series),
        above
    );
    let route = r#"route="spam""#;
    assert_eq!(m.sum_with("sluicegate_score_count", route), 80.0);
    assert_eq!(
        m.sum_with("sluicegate_score_bucket", r#"le="0.5",route="spam""#),
        halves
    );
    assert_eq!(
        m.sum_with("sluicegate_request_duration_seconds_count", route),
        2.0
    );
}
