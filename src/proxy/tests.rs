use super::*;

/// A v2 spam route with a fixed threshold that writes its decisions into the body.
const DECIDING: &str = r#"
consumers: {header: sluicegate-consumer, declared: [mail-ingest], undeclared: refuse}
routes:
  spam:
    match: {model: spam-filter}
    protocol: v2
    score: {output: predict_proba, column: 1}
    decision: {binary: {action: spam, otherwise: ham, threshold: {fixed: 0.5}}}
    write_decisions: {}
"#;

/// A proxy under `policy` whose records go to a spool in `dir`; nothing is sent upstream.
fn proxy_with(
    policy: &str,
    dir: &std::path::Path,
) -> (Proxy, crate::tee::TeeWriter, crate::telemetry::Metrics) {
    use crate::tee::spool::{SpoolConfig, SpoolMode, SpoolWriter};
    let settings = crate::config::settings::Settings::default();
    let metrics = crate::telemetry::Metrics::new();
    let (spool, _) = SpoolWriter::open(
        SpoolConfig {
            dir: dir.to_owned(),
            max_bytes: 1 << 20,
            segment_bytes: settings.spool.segment_bytes,
            fsync_interval: settings.spool.fsync_interval,
            mode: SpoolMode::Rotate,
        },
        metrics.tee.spool.clone(),
    )
    .unwrap();
    let (tee, writer) = crate::tee::TeeWriter::spawn(
        spool,
        crate::tee::record::EncodeContext {
            instance: "test".into(),
            max_record_bytes: settings.max_record_bytes as usize,
            record_decisions: settings.record_decisions,
            inbound_tags: metrics.proxy.inbound_tags.clone(),
        },
        &settings.spool,
        metrics.tee.clone(),
    )
    .unwrap();
    let policy = crate::config::validate::parse(policy, settings.max_record_bytes).unwrap();
    let proxy = Proxy::new(
        settings.upstream.clone(),
        RequestLimits::from_settings(&settings),
        crate::policy::shared(policy, settings.max_record_bytes),
        tee,
        metrics.proxy.clone(),
    );
    (proxy, writer, metrics)
}

fn infer(consumer: &str) -> Request<()> {
    Request::post("/v2/models/spam-filter/infer?x=1")
        .header(header::HOST, "sluicegate")
        .header("sluicegate-consumer", consumer)
        .body(())
        .unwrap()
}

fn line<'a>(exposed: &'a str, prefix: &str) -> Option<&'a str> {
    exposed.lines().find(|l| l.starts_with(prefix))
}

#[tokio::test]
async fn admission_routes_counts_and_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let (proxy, writer, metrics) = proxy_with(DECIDING, dir.path());
    let admitted = proxy.admit(&infer("mail-ingest"));
    assert!(admitted.refusal.is_none());
    assert_eq!(&*admitted.compiled.as_ref().unwrap().name, "spam");
    assert_eq!(admitted.path_and_query, "/v2/models/spam-filter/infer?x=1");
    assert!(admitted.pending.is_some(), "sampled at rate 1");
    let undeclared = proxy.admit(&infer("someone"));
    assert!(matches!(
        undeclared.refusal,
        Some((ProxyError::ConsumerUndeclared, ref who)) if who == "\"someone\""
    ));
    let mut big = infer("mail-ingest");
    big.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(u64::MAX));
    assert!(matches!(
        proxy.admit(&big).refusal,
        Some((ProxyError::BodyTooLarge { .. }, _))
    ));
    let ambiguous = Request::get("/v2/models/spam-filter/%2e%2e/infer")
        .header(header::HOST, "sluicegate")
        .body(())
        .unwrap();
    let refused = proxy.admit(&ambiguous);
    assert!(refused.refusal.is_some());
    assert!(
        refused.compiled.is_none(),
        "a refused request gets no route"
    );
    drop((admitted, undeclared, refused));
    let exposed = metrics.encode();
    assert_eq!(
        line(
            &exposed,
            "sluicegate_consumer_requests_total{consumer=\"mail-ingest\",declared=\"true\"}"
        ),
        Some("sluicegate_consumer_requests_total{consumer=\"mail-ingest\",declared=\"true\"} 2")
    );
    assert!(
        line(
            &exposed,
            "sluicegate_consumer_requests_total{consumer=\"undeclared\",declared=\"false\"} 2"
        )
        .is_some(),
        "{exposed}"
    );
    writer.close();
}

#[tokio::test]
async fn the_forwarded_head_is_rewritten_for_the_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let (proxy, writer, _) = proxy_with(DECIDING, dir.path());
    let req = infer("mail-ingest");
    let mut admitted = proxy.admit(&req);
    let (mut parts, ()) = req.into_parts();
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    let client = "10.1.2.3:4000".parse().unwrap();
    let version = proxy.upstream_head(&mut admitted, &mut parts, client);
    assert_eq!(version, Version::HTTP_11);
    assert_eq!(
        parts.uri.to_string(),
        format!(
            "http://{}/v2/models/spam-filter/infer?x=1",
            proxy.upstream.authority
        )
    );
    assert_eq!(parts.headers["x-forwarded-host"], "sluicegate");
    assert_eq!(parts.headers["x-forwarded-for"], "10.1.2.3");
    assert_eq!(
        parts.headers[header::ACCEPT_ENCODING],
        "identity",
        "a deciding route"
    );
    assert!(parts.headers.get(header::HOST).is_none());
    assert!(parts.headers.get(header::CONNECTION).is_none());
    drop(admitted);
    writer.close();
}

#[tokio::test]
async fn capture_stamps_the_head_and_reads_only_decided_answers_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (proxy, writer, _) = proxy_with(DECIDING, dir.path());
    for (status, decides) in [(200, true), (503, false)] {
        let mut admitted = proxy.admit(&infer("mail-ingest"));
        let (mut parts, ()) = Response::builder()
            .status(status)
            .header(header::CONNECTION, "keep-alive")
            .body(())
            .unwrap()
            .into_parts();
        let route = proxy.capture_head(
            &mut admitted,
            &mut parts,
            Version::HTTP_2,
            Duration::from_millis(3),
        );
        assert_eq!(route.is_some(), decides, "{status}");
        assert_eq!(parts.version, Version::HTTP_2, "the client's version");
        assert_eq!(parts.headers[ID_HEADER], admitted.id);
        assert_eq!(parts.headers[POLICY_HEADER], *admitted.policy.version);
        assert!(parts.headers.get(header::CONNECTION).is_none());
    }
    writer.close();
}

#[tokio::test]
async fn decide_and_respond_write_the_decision_into_headers_and_body() {
    let dir = tempfile::tempdir().unwrap();
    let (proxy, writer, metrics) = proxy_with(DECIDING, dir.path());
    let request = crate::testing::v2_request(3, 7);
    let answer =
        crate::testing::StandInModel::infer_v2(&serde_json::from_str(&request).unwrap()).unwrap();
    let body = Bytes::from(serde_json::to_vec(&answer).unwrap());
    let decide = |body: Bytes| {
        let mut admitted = proxy.admit(&infer("mail-ingest"));
        let (mut parts, ()) = Response::new(()).into_parts();
        let route = proxy
            .capture_head(&mut admitted, &mut parts, Version::HTTP_11, Duration::ZERO)
            .unwrap();
        let captured = proxy
            .capture_whole(&mut admitted, route, parts, body)
            .ok()
            .unwrap();
        let decision = proxy.decide(&admitted, &captured);
        (
            decision.is_ok(),
            proxy.respond(admitted, captured, decision),
        )
    };
    let (decided, resp) = decide(body);
    assert!(decided);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["sluicegate-rows"], "3");
    let actions = resp.headers()["sluicegate-action"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(actions.split(',').count(), 3);
    let ResponseBody::Full(Some(sent)) = resp.into_body() else {
        panic!("a decided body is sent whole");
    };
    let sent: serde_json::Value = serde_json::from_slice(&sent).unwrap();
    let tensor = &sent["outputs"].as_array().unwrap().last().unwrap()["data"];
    assert_eq!(tensor.as_array().unwrap().len(), 3);

    // Not readable: passed through unchanged, counted as a decision error.
    let (decided, resp) = decide(Bytes::from_static(b"not json"));
    assert!(!decided);
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("sluicegate-action").is_none());

    let exposed = metrics.encode();
    assert!(
        line(
            &exposed,
            "sluicegate_requests_total{route=\"spam\",status=\"200\"} 2"
        )
        .is_some(),
        "{exposed}"
    );
    let decided_rows: u64 = exposed
        .lines()
        .filter(|l| l.starts_with("sluicegate_decisions_total{route=\"spam\""))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
        .sum();
    assert_eq!(decided_rows, 3);
    assert!(
        line(
            &exposed,
            "sluicegate_decision_errors_total{route=\"spam\",kind=\"not_json\"} 1"
        )
        .is_some(),
        "{exposed}"
    );
    writer.close();
}

#[tokio::test]
async fn metric_handles_follow_the_policy_generation() {
    let dir = tempfile::tempdir().unwrap();
    let (proxy, writer, _) = proxy_with(DECIDING, dir.path());
    let first = proxy.handles(&proxy.policy.load());
    assert!(
        Arc::ptr_eq(&first, &proxy.handles(&proxy.policy.load())),
        "resolved once"
    );
    let mut names: Vec<&str> = first.routes.keys().map(|r| &**r).collect();
    names.sort_unstable();
    assert_eq!(names, ["default", "spam"]);

    // A reload that renames the route: the old route's handles go with its generation.
    let renamed = DECIDING.replace("  spam:", "  ham-or-spam:");
    let renamed = crate::config::validate::parse(&renamed, 1 << 20).unwrap();
    let old = proxy.policy.load_full();
    let next = Policy::new(renamed, 1, 1 << 20, Some(&old));
    proxy.policy.store(Arc::new(next));
    let second = proxy.handles(&proxy.policy.load());
    let mut names: Vec<&str> = second.routes.keys().map(|r| &**r).collect();
    names.sort_unstable();
    assert_eq!(names, ["default", "ham-or-spam"]);
    // A request still on the old snapshot gets its own handles, and rolls nothing back.
    assert_eq!(proxy.handles(&old).generation, 0);
    assert!(Arc::ptr_eq(&second, &proxy.handles(&proxy.policy.load())));
    writer.close();
}

#[test]
fn hop_by_hop_headers_go_and_te_trailers_stays() {
    let mut h = HeaderMap::new();
    h.insert("connection", "close, x-private".parse().unwrap());
    h.insert("x-private", "1".parse().unwrap());
    h.insert("keep-alive", "timeout=5".parse().unwrap());
    h.insert("te", "trailers".parse().unwrap());
    h.insert("content-type", "application/grpc".parse().unwrap());
    strip_hop_by_hop(&mut h);
    assert!(h.get("x-private").is_none());
    assert!(h.get("keep-alive").is_none());
    assert!(h.get("connection").is_none());
    assert_eq!(h.get("te").unwrap(), "trailers");
    assert_eq!(h.get("content-type").unwrap(), "application/grpc");

    let mut h = HeaderMap::new();
    h.insert("content-length", "5".parse().unwrap());
    strip_hop_by_hop(&mut h);
    assert_eq!(h.get("content-length").unwrap(), "5");
    h.insert("transfer-encoding", "chunked".parse().unwrap());
    strip_hop_by_hop(&mut h);
    assert!(
        h.get("content-length").is_none(),
        "stale beside chunked framing"
    );
    assert!(h.get("transfer-encoding").is_none());
}

#[test]
fn forwarded_for_appends() {
    let mut h = HeaderMap::new();
    append_forwarded_for(&mut h, "10.0.0.1:5".parse().unwrap());
    append_forwarded_for(&mut h, "127.0.0.1:5".parse().unwrap());
    assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1, 127.0.0.1");
}

#[test]
fn every_forwarded_for_header_is_kept() {
    let mut h = HeaderMap::new();
    h.append("x-forwarded-for", "1.1.1.1, 2.2.2.2".parse().unwrap());
    h.append("x-forwarded-for", "3.3.3.3".parse().unwrap());
    append_forwarded_for(&mut h, "127.0.0.1:5".parse().unwrap());
    assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    assert_eq!(
        h.get("x-forwarded-for").unwrap(),
        "1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1"
    );
}

#[test]
fn hosts_are_checked_as_rfc_9112_asks() {
    let req = |version: Version, hosts: &[&str]| {
        let mut r = Request::get("/x").version(version);
        for h in hosts {
            r = r.header(header::HOST, *h);
        }
        r.body(()).unwrap()
    };
    let v11 = Version::HTTP_11;
    for ok in [
        "model",
        "model:8080",
        "10.0.0.1:80",
        "[::1]:8090",
        "a.b-c.d",
        "",
    ] {
        assert_eq!(malformed(&req(v11, &[ok])), None, "{ok:?}");
    }
    for bad in [
        "user@model",
        "a b",
        "model:port",
        "model:",
        "model:99999",
        "model/x",
        ":80",
        "[::1",
    ] {
        assert!(malformed(&req(v11, &[bad])).is_some(), "{bad:?}");
    }
    assert!(malformed(&req(v11, &[])).is_some(), "HTTP/1.1 without Host");
    assert!(malformed(&req(v11, &["a", "a"])).is_some(), "two Hosts");
    assert_eq!(malformed(&req(Version::HTTP_10, &[])), None);
    assert_eq!(malformed(&req(Version::HTTP_2, &[])), None);
    let connect = Request::connect("model:443").body(()).unwrap();
    assert!(malformed(&connect).is_some());
}
