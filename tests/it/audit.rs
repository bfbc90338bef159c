//! Provenance end to end: traffic through the proxy → signed tags and records in Kafka → a
//! training file planted with known shares of tagged rows (two models, forged tags) and labels
//! with a known bias → `sluicegate audit` reports exactly those.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use crate::common::browser::{self, Rendered};
use crate::common::kafka::{consume, mock_cluster, TOPIC};
use crate::common::tansu::{self, Tansu};
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

/// A one-row request to the spam filter through `proxy` (`i` seeds its features): the answer's
/// headers and body, once it is a 200.
async fn ask_spam(c: &HttpClient, proxy: &ProxyProcess, i: u64) -> (http::HeaderMap, bytes::Bytes) {
    let url = proxy.url("/v2/models/spam-filter/infer");
    let (status, headers, body) = post(c, &url, v2_request(1, i)).await;
    assert_eq!(status, 200);
    (headers, body)
}

/// A one-row request to the ranker through `proxy`, its first feature `i` / 10.
async fn ask_ranker(
    c: &HttpClient,
    proxy: &ProxyProcess,
    i: u64,
) -> (http::HeaderMap, bytes::Bytes) {
    let body = format!(r#"{{"instances": [[{}, 0.5, 0.2, 0.1]]}}"#, i as f64 / 10.0);
    let (status, headers, resp) = post(c, &proxy.url("/v1/models/ranker:predict"), body).await;
    assert_eq!(status, 200);
    (headers, resp)
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
        let (h, _) = ask_spam(&c, &proxy, i).await;
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
        let (h, resp) = ask_ranker(&c, &proxy, i).await;
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

    // The page for people, in 100 ms buckets: all three reports, shown by a real browser.
    let mut html_args: Vec<&str> = args[..args.len() - 1].to_vec();
    html_args.extend(["html", "--bucket", "100ms"]);
    let (code, page, err) = run(&html_args);
    assert_eq!(code, 0, "{err}");
    for part in [
        "<svg",
        "Route spam",
        "Route ranker",
        "Feedback loops",
        "class=\"direct\"",
        "class=\"hidden\"",
        "Prediction bias",
    ] {
        assert!(page.contains(part), "no {part:?} in the page");
    }
    let Some(chromium) = browser::chromium() else {
        return;
    };
    let shown = show(&chromium, &page, dir.path(), 1800);
    // `SLUICEGATE_AUDIT_SCREENSHOT=docs/audit-report.png` keeps it (the one in the docs).
    if let Some(keep) = std::env::var_os("SLUICEGATE_AUDIT_SCREENSHOT") {
        std::fs::copy(&shown.png, keep).unwrap();
    }
}

/// `html` rendered by headless Chromium, 1000 pixels wide and `height` high; fails the test
/// if the page shows blank or logs anything to the console.
fn show(chromium: &Path, html: &str, dir: &Path, height: u32) -> Rendered {
    let page = dir.join("report.html");
    std::fs::write(&page, html).unwrap();
    let shown = browser::render(chromium, &page, 1000, height, &dir.join("report.png"));
    let problems = shown.problems();
    assert!(problems.is_empty(), "{problems:#?}");
    eprintln!(
        "report.html: {} of {} pixels painted, nothing on the console",
        shown.painted, shown.pixels
    );
    shown
}

#[test]
fn the_browser_check_fails_a_blank_page_and_a_console_error() {
    let Some(chromium) = browser::chromium() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let shown = |name: &str, html: &str| {
        let page = dir.path().join(format!("{name}.html"));
        std::fs::write(&page, html).unwrap();
        browser::render(
            &chromium,
            &page,
            400,
            300,
            &dir.path().join(format!("{name}.png")),
        )
    };
    let blank = shown("blank", "<!doctype html><html><body></body></html>");
    assert!(blank.console.is_empty(), "{:?}", blank.console);
    let problems = blank.problems();
    assert!(
        problems.len() == 1 && problems[0].starts_with("blank"),
        "{problems:?}"
    );
    let noisy = shown(
        "noisy",
        "<!doctype html><html><body><h1 style=\"font-size:90px\">text</h1>\
         <script>console.error(\"deliberate\")</script></body></html>",
    );
    assert!(noisy.painted * 100 > noisy.pixels, "the heading paints");
    let problems = noisy.problems();
    assert!(
        problems.len() == 1 && problems[0].contains("deliberate"),
        "{problems:?}"
    );
}

/// Names a hostile writer of records could choose: each would log to the console if it ran.
const HOSTILE: [&str; 4] = [
    "<script>console.error('route ran')</script>",
    "\"><img src=x onerror=\"console.error('version ran')\">",
    "</title><script>console.error('action ran')</script>",
    "<svg onload=console.error(1)>",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_html_report_escapes_names_from_records() {
    let model = StandInModel::spawn().await.unwrap();
    let dir = spool_dir();
    let proxy = start_tagging(model, dir.path(), &[]);
    let c = client();
    let mut tags = Vec::new();
    for i in 0..5 {
        let (h, _) = ask_spam(&c, &proxy, i).await;
        tags.push(h["sluicegate-tag"].to_str().unwrap().to_owned());
    }
    // The proxy's own records, renamed as a writer to the topic could rename them.
    let mut predictions = String::new();
    let mut labels = String::new();
    for mut r in proxy.spool_records_after(&dir.path().join("spool"), 5.0) {
        r["route"] = HOSTILE[0].into();
        r["model"]["version"] = HOSTILE[1].into();
        for d in r["decisions"].as_array_mut().unwrap() {
            d["final_action"] = HOSTILE[2].into();
        }
        predictions.push_str(&format!("{r}\n"));
        labels.push_str(&format!(
            "{}\n",
            serde_json::json!({"id": format!("{}:0", r["id"].as_str().unwrap()), "label": HOSTILE[3]})
        ));
    }
    let training: String = tags
        .iter()
        .map(|t| format!("{}\n", serde_json::json!({"sluicegate_tag": t})))
        .collect();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (predictions, labels, training) = (
        file("predictions.jsonl", &predictions),
        file("labels.jsonl", &labels),
        file("train.jsonl", &training),
    );
    // A training set named like a tag: `--training NAME=FILE`.
    let training_arg = format!("{}={}", HOSTILE[0], training.display());
    let (code, page, err) = run(&[
        "audit",
        "--predictions",
        path_str(&predictions),
        "--labels",
        path_str(&labels),
        "--training",
        &training_arg,
        "--keys",
        path_str(&dir.path().join("keys")),
        "--format",
        "html",
    ]);
    assert_eq!(code, 0, "{err}");
    for name in HOSTILE {
        assert!(!page.contains(name), "{name} is in the page raw");
    }
    let lower = page.to_lowercase();
    assert_eq!(lower.matches("<script").count(), 0);
    assert_eq!(lower.matches("<img").count(), 0);
    assert!(
        page.contains("Route &lt;script&gt;console.error(&#39;route ran&#39;)&lt;/script&gt;"),
        "the names are shown, escaped"
    );
    let Some(chromium) = browser::chromium() else {
        return;
    };
    show(&chromium, &page, dir.path(), 1200);
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

/// The Python that has the analysis recipes' packages (tests/run.sh installs it), or `None`
/// (with a loud note); required under tests/run.sh.
fn analysis_python() -> Option<std::path::PathBuf> {
    match std::env::var_os("SLUICEGATE_ANALYSIS_PYTHON") {
        Some(p) => Some(p.into()),
        None if std::env::var_os("SLUICEGATE_REQUIRE_ANALYSIS_TESTS").is_some() => {
            panic!("SLUICEGATE_ANALYSIS_PYTHON is unset; run tests/run.sh (it installs the venv)")
        }
        None => {
            eprintln!("SKIPPED: no SLUICEGATE_ANALYSIS_PYTHON (run tests/run.sh to run this test)");
            None
        }
    }
}

/// The fenced block of docs/analysis.md titled `name`, written to DIR/name.
fn recipe(name: &str, dir: &Path) -> std::path::PathBuf {
    let doc = std::fs::read_to_string(repo_path("docs/analysis.md")).unwrap();
    let fence = format!("```python title=\"{name}\"\n");
    let start = doc.find(&fence).unwrap_or_else(|| panic!("no {fence:?}")) + fence.len();
    let end = start + doc[start..].find("\n```\n").unwrap();
    let path = dir.join(name);
    std::fs::write(&path, &doc[start..=end]).unwrap();
    path
}

/// `python script args…`: its stdout, or the test fails with its stderr.
fn run_python(python: &Path, script: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(python)
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The recipes' two figures, keyed by their CSV's key columns: action rates by
/// (route, hour, action) and latency percentiles by (model, model version, percentile).
#[derive(Debug, Default)]
struct Figures {
    rates: BTreeMap<Vec<String>, f64>,
    latency: BTreeMap<Vec<String>, f64>,
}

impl Figures {
    /// As the docs define them, from the records themselves.
    fn of(records: &[serde_json::Value]) -> Figures {
        let mut decided: BTreeMap<(String, String), BTreeMap<String, u64>> = BTreeMap::new();
        let mut totals: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
        for r in records
            .iter()
            .filter(|r| r["schema"] == "sluicegate.record.v1")
        {
            let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
            let hour = format!("{}:00:00Z", &r["time"].as_str().unwrap()[..13]);
            for d in r["decisions"].as_array().into_iter().flatten() {
                *decided
                    .entry((text(&r["route"]), hour.clone()))
                    .or_default()
                    .entry(text(&d["final_action"]))
                    .or_default() += 1;
            }
            totals
                .entry((text(&r["model"]["name"]), text(&r["model"]["version"])))
                .or_default()
                .push(r["timings"]["total_ms"].as_f64().unwrap());
        }
        let mut f = Figures::default();
        for ((route, hour), actions) in decided {
            let n: u64 = actions.values().sum();
            for (action, k) in actions {
                let key = vec![route.clone(), hour.clone(), action];
                f.rates.insert(key, k as f64 / n as f64);
            }
        }
        for ((model, version), mut ms) in totals {
            ms.sort_by(f64::total_cmp);
            for (name, q) in [("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99)] {
                // Linear between the two nearest ranks, as pandas and DuckDB do by default.
                let at = q * (ms.len() - 1) as f64;
                let (lo, hi) = (ms[at.floor() as usize], ms[at.ceil() as usize]);
                let key = vec![model.clone(), version.clone(), name.into()];
                f.latency.insert(key, lo + (hi - lo) * at.fract());
            }
        }
        f
    }

    /// As a recipe printed them: two CSV tables, each followed by a blank line.
    fn printed(out: &str) -> Figures {
        let mut f = Figures::default();
        let tables: Vec<&str> = out.split("\n\n").filter(|t| !t.trim().is_empty()).collect();
        assert_eq!(tables.len(), 2, "{out}");
        for table in tables {
            let mut lines = table.lines();
            let header: Vec<&str> = lines.next().unwrap().split(',').collect();
            for line in lines {
                let cells: Vec<&str> = line.split(',').collect();
                let number = |i: usize| cells[i].parse::<f64>().unwrap();
                match header[..] {
                    ["route", "hour", "action", "rate"] => {
                        let key = cells[..3].iter().map(|c| c.to_string()).collect();
                        f.rates.insert(key, number(3));
                    }
                    ["model", "model_version", ref names @ ..] => {
                        for (i, name) in names.iter().enumerate() {
                            let key = vec![cells[0].into(), cells[1].into(), name.to_string()];
                            f.latency.insert(key, number(2 + i));
                        }
                    }
                    _ => panic!("unexpected table {header:?}"),
                }
            }
        }
        f
    }

    fn assert_same(&self, printed: &Figures, recipe: &str) {
        for (want, got, what) in [
            (&self.rates, &printed.rates, "rates"),
            (&self.latency, &printed.latency, "latency"),
        ] {
            assert_eq!(
                want.keys().collect::<Vec<_>>(),
                got.keys().collect::<Vec<_>>(),
                "{recipe}: {what}"
            );
            for (key, w) in want {
                let g = got[key];
                assert!(
                    (w - g).abs() <= 1e-9 * w.abs().max(1.0),
                    "{recipe}: {key:?}: {g} ≠ {w}"
                );
            }
        }
    }
}

/// Decided requests on both routes through `proxy`: 60 to the spam filter, 20 to the ranker.
async fn analysis_traffic(proxy: &ProxyProcess) {
    let c = client();
    for i in 0..60 {
        ask_spam(&c, proxy, i).await;
    }
    for i in 0..20 {
        ask_ranker(&c, proxy, i).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_analysis_recipes_agree_with_the_records() {
    let Some(python) = analysis_python() else {
        return;
    };
    let Some(bin) = tansu::binary() else { return };
    let port = free_port();
    let broker = Tansu::start(bin, port, port, "memory://tansu/", &std::env::temp_dir());
    broker.create_topic(TOPIC, 3);
    let model = StandInModel::spawn().await.unwrap();
    let (kafka_dir, spool_only) = (spool_dir(), spool_dir());
    let brokers = broker.brokers();
    let to_kafka = start_tagging(
        model,
        kafka_dir.path(),
        &["--kafka-brokers", &brokers, "--kafka-topic", TOPIC],
    );
    let to_spool = start_tagging(model, spool_only.path(), &[]);
    analysis_traffic(&to_kafka).await;
    analysis_traffic(&to_spool).await;

    // pandas, from the topic: against the records a consumer of our own reads there.
    to_kafka.wait_metric(
        "sluicegate_tee_records_sent_total",
        80.0,
        Duration::from_secs(30),
    );
    let topic: Vec<serde_json::Value> = consume(&brokers, TOPIC, 80, Duration::from_secs(60), &[])
        .into_iter()
        .map(|m| m.record)
        .collect();
    assert_eq!(topic.len(), 80);
    let script = recipe("kafka_pandas.py", kafka_dir.path());
    let out = run_python(&python, &script, &[&brokers, TOPIC]);
    eprintln!("kafka_pandas.py:\n{out}");
    Figures::of(&topic).assert_same(&Figures::printed(&out), "kafka_pandas.py");

    // DuckDB, over `spool cat`'s output.
    let spool = spool_only.path().join("spool");
    let records = to_spool.spool_records_after(&spool, 80.0);
    assert_eq!(records.len(), 80);
    let dump = spool_only.path().join("records.jsonl");
    let cat = std::process::Command::new(BIN)
        .args(["spool", "cat"])
        .arg(&spool)
        .stdout(std::fs::File::create(&dump).unwrap())
        .status()
        .unwrap();
    assert!(cat.success());
    let script = recipe("duckdb_sql.py", spool_only.path());
    let out = run_python(&python, &script, &[path_str(&dump)]);
    eprintln!("duckdb_sql.py:\n{out}");
    Figures::of(&records).assert_same(&Figures::printed(&out), "duckdb_sql.py");
}
