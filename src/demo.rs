//! `sluicegate demo`: the real proxy in front of a built-in stand-in model, and a story told
//! with traffic. The proxy runs in-process (the code `serve` runs) under a policy the demo
//! writes to a temporary directory: an adaptive threshold, a limit with a fallback, and
//! Ed25519 tags from a key generated there. The stages:
//!
//! 1. latency: fixed-rate traffic straight to the model, then through the proxy;
//! 2. drift: the inputs shift, the threshold follows and holds its rate where the threshold it
//!    started from would not, and the limit trips while it catches up;
//! 3. live change: the policy file is edited (the limit tightened), the reloader applies it,
//!    and the new version is in force;
//! 4. tag: one response's headers, and its tag verified with the public key alone;
//! 5. audit: a slice of the responses fed back as training data, and the audit finding it.
//!
//! Every figure comes from what the client saw (headers and bodies), and the summary
//! (`--summary-json`) names each stage's records by consumer (`sluicegate-consumer`) and
//! request index (the v2 `id`), so a test can recompute each figure from the spool.
//! The stand-in model is [`crate::testing::StandInModel`].

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::{json, Value};

use crate::audit::{self, source::Source, AuditOptions};
use crate::config::settings::{
    parse_duration_arg, KafkaSettings, Settings, DEFAULT_ALERTS_TOPIC, DEFAULT_TOPIC,
};
use crate::provenance::{self, Algorithm, KeyRing, TagClaims};
// The stand-in lives in `testing` (below every module); its old path here stays valid for the
// binary, the integration tests and the benchmarks.
pub use crate::testing::{v2_request, StandInModel};
use crate::testing::{v2_request_shifted, MODEL_NAME};

/// Options of `sluicegate demo`.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoOptions {
    /// Send the tee to Kafka instead of the spool alone.
    #[arg(long, env = "SLUICEGATE_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// How long each traffic stage drives traffic (the drift stage twice as long).
    #[arg(long, default_value = "5s", value_parser = parse_duration_arg)]
    pub duration: Duration,
    /// Requests per second.
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// Where the spool goes.
    #[arg(long, default_value = "sluicegate-demo-spool")]
    pub spool_dir: PathBuf,
    /// Also write the summary as JSON to this file (for machines: the figures and the
    /// records they were computed from).
    #[arg(long)]
    pub summary_json: Option<PathBuf>,
}

/// The route the demo's policy decides on, and its limited action.
const ROUTE: &str = "spam";
const ACTION: &str = "spam";
/// The adaptive threshold's target action rate.
const TARGET_RATE: f64 = 0.10;
/// The limit before and after the live change: above the target (it trips only while the
/// threshold catches up with a shift), then below it (it holds the rate down).
const LIMIT_BEFORE: f64 = 0.20;
const LIMIT_AFTER: f64 = 0.05;
/// How far the drift stage moves every input feature (scores rise with it).
const SHIFT: f64 = 0.5;
/// Every this-many-th drift response goes back as training data.
pub const FED_BACK_EVERY: u64 = 4;
/// The tag signing key's id.
const KEY_ID: &str = "demo";

/// The consumers (`sluicegate-consumer`) each stage's requests name, so its records can be
/// told apart in the spool.
pub const CONSUMER_LATENCY: &str = "demo-latency";
pub const CONSUMER_DRIFT: &str = "demo-drift";
pub const CONSUMER_RELOAD: &str = "demo-reload";
pub const CONSUMER_LIVE: &str = "demo-live";

const STAGES: usize = 5;

/// The demo's policy, with the `spam` limit at `max_fraction`.
fn policy_yaml(max_fraction: f64) -> String {
    format!(
        r#"# Written by `sluicegate demo`.
routes:
  {ROUTE}:
    match: {{model: {MODEL_NAME}}}
    protocol: v2
    score: {{output: predict_proba, column: 1}}
    decision:
      binary:
        action: {ACTION}
        otherwise: ham
        threshold:
          adaptive: {{target_rate: {TARGET_RATE}, window: 2s, initial: 0.9, min: 0.5, max: 0.999, max_step: 0.05, update_interval: 1s, min_samples: 100}}
    limits:
      - {{action: {ACTION}, max_fraction: {max_fraction}, window: 2s, min_decisions: 100, on_breach: fallback, fallback: ham}}
    write_decisions: {{}}
    tag_field: /sluicegate_tag
tagging: {{algorithm: ed25519, signing_key: {KEY_ID}}}
"#
    )
}

/// Runs the demo and prints what happened.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let work = WorkDir::create()?;
    let summary = story(&opts, &work.0).await;
    drop(work);
    let summary = summary?;
    print!("{summary}");
    if let Some(file) = &opts.summary_json {
        std::fs::write(file, serde_json::to_vec_pretty(&summary)?)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", file.display()))?;
    }
    Ok(())
}

/// The demo's temporary directory (policy, keys, training file), removed when dropped.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("sluicegate-demo-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir)?;
        Ok(WorkDir(dir))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn story(opts: &DemoOptions, work: &Path) -> anyhow::Result<Summary> {
    // The key pair: the proxy signs with the private key; the tag is verified, and the audit
    // run, with a directory that holds the public key alone.
    let keys_dir = work.join("keys");
    let public_dir = work.join("public-keys");
    std::fs::create_dir_all(&public_dir)?;
    for path in provenance::generate_key(&keys_dir, KEY_ID, Algorithm::Ed25519)? {
        if path.extension().is_some_and(|e| e == "pub") {
            let name = path.file_name().expect("a key file has a name");
            std::fs::copy(&path, public_dir.join(name))?;
        }
    }
    let policy_file = work.join("policy.yaml");
    std::fs::write(&policy_file, policy_yaml(LIMIT_BEFORE))?;

    let model = StandInModel::spawn().await?;
    let mut settings = Settings {
        listen: "127.0.0.1:0".parse()?,
        admin_listen: "127.0.0.1:0".parse()?,
        policy: Some(policy_file.clone()),
        tag_keys_dir: Some(keys_dir),
        ..Default::default()
    };
    settings.upstream.authority = model.to_string().parse()?;
    settings.upstream.ready_path = Some("/v2/health/ready".into());
    settings.spool.dir = opts.spool_dir.clone();
    settings.kafka = opts.kafka_brokers.clone().map(|brokers| KafkaSettings {
        brokers,
        topic: DEFAULT_TOPIC.into(),
        alerts_topic: DEFAULT_ALERTS_TOPIC.into(),
        properties: Default::default(),
    });
    let running = crate::app::start(settings).await?;
    let proxy = running.data_addr;
    let admin = running.admin_addr;
    println!("stand-in model (Open Inference Protocol v2) on http://{model}");
    println!("sluicegate proxy on http://{proxy}, admin and /metrics on http://{admin}");
    println!("policy {} (route {ROUTE}: an adaptive threshold holding {ACTION} at {TARGET_RATE}, a limit of {LIMIT_BEFORE} falling back to ham, Ed25519 tags)", policy_file.display());
    println!(
        "tee sink: {}",
        match &opts.kafka_brokers {
            Some(b) => format!(
                "Kafka at {b}, topic {DEFAULT_TOPIC} (spool {})",
                opts.spool_dir.display()
            ),
            None => format!("the spool at {}", opts.spool_dir.display()),
        }
    );
    let (rate, d) = (opts.rate, opts.duration);

    stage(1, &format!("latency: {rate} requests/s for {d:?} straight to the model, then as long through sluicegate"));
    // Unmeasured: the first requests of a process pay for its warm-up (threads, connections).
    drive(
        model,
        Load::new(rate, Duration::from_millis(300), 0.0, CONSUMER_LATENCY),
    )
    .await;
    let direct = drive(model, Load::new(rate, d, 0.0, CONSUMER_LATENCY)).await;
    let proxied = drive(proxy, Load::new(rate, d, 0.0, CONSUMER_LATENCY)).await;
    println!("direct:  {}", direct.report);
    println!("proxied: {}", proxied.report);
    let latency = Latency::new(&direct.report, &proxied.report);
    println!("added by sluicegate (deciding, signing, teeing): {latency}");

    stage(
        2,
        &format!(
            "drift: every input moves by {SHIFT}, so the scores rise; {rate} requests/s for {:?}",
            d * 2
        ),
    );
    let drifted = drive(proxy, Load::new(rate, d * 2, SHIFT, CONSUMER_DRIFT)).await;
    let drift = Drift::of(&drifted.seen)?;
    println!("{drift}");
    let limit = LimitBreach::of(&drifted.seen, LIMIT_BEFORE);
    let alert = breach_alert(&opts.spool_dir, drifted.started);
    println!("{limit}");
    match &alert {
        Some(a) => println!("the breach alert, from the spool:\n{}", pretty(a)),
        None if opts.kafka_brokers.is_some() => {
            println!("(its alert went to Kafka topic {DEFAULT_ALERTS_TOPIC})")
        }
        None => println!("(no breach alert in the spool)"),
    }

    stage(3, &format!("live change: policy.yaml edited, the {ACTION} limit tightened {LIMIT_BEFORE} → {LIMIT_AFTER}, no restart"));
    let metrics_before = scrape(admin).await?;
    let version_before = drifted.last_policy().unwrap_or_default();
    let text = std::fs::read_to_string(&policy_file)?;
    let edited = text.replace(
        &format!("max_fraction: {LIMIT_BEFORE}"),
        &format!("max_fraction: {LIMIT_AFTER}"),
    );
    anyhow::ensure!(edited != text, "the demo policy has no limit to tighten");
    // Replaced by rename, as a ConfigMap update does: the reloader sees one whole file.
    let staged = work.join("policy.yaml.new");
    std::fs::write(&staged, edited)?;
    std::fs::rename(&staged, &policy_file)?;
    let edited_at = Instant::now();
    let version_after = wait_for_new_policy(proxy, &version_before).await?;
    let applied_after = edited_at.elapsed();
    let metrics_after = scrape(admin).await?;
    // The inputs stay shifted: the threshold holds its rate, now above the limit.
    let live = drive(proxy, Load::new(rate, d, SHIFT, CONSUMER_LIVE)).await;
    let change = LiveChange {
        version_before,
        version_after,
        applied_after_ms: applied_after.as_millis() as u64,
        generation_before: metrics_before.sum("sluicegate_policy_generation"),
        generation_after: metrics_after.sum("sluicegate_policy_generation"),
        requests: live.seen.len() as u64,
        under_new_version: Share::count(&live.seen, |s| {
            s.policy == metrics_version(&metrics_after)
        }),
        model_rate: Share::rows(&live.seen, |r| r.model_action == ACTION),
        delivered_rate: Share::rows(&live.seen, |r| r.action == ACTION),
        fallback_rows: Share::rows(&live.seen, |r| r.limit == "fallback").n,
    };
    println!("{change}");
    println!("the admin port's /metrics, before and after:");
    for (when, m) in [("before", &metrics_before), ("after ", &metrics_after)] {
        for line in m.lines(&["sluicegate_policy_info", "sluicegate_policy_generation"]) {
            println!("  {when}  {line}");
        }
    }

    stage(
        4,
        "tag: one response's headers, and its tag verified with the public key only",
    );
    let shown = live
        .seen
        .iter()
        .find(|s| s.tag.is_some())
        .ok_or_else(|| anyhow::anyhow!("no tagged response in the live stage"))?;
    println!("POST /v2/models/{MODEL_NAME}/infer  →");
    for (name, value) in &shown.headers {
        println!("  {name}: {value}");
    }
    let token = shown.tag.clone().unwrap_or_default();
    // What `sluicegate tag verify TOKEN --keys DIR` does.
    let public = KeyRing::load_dir(&public_dir).map_err(|errors| {
        anyhow::anyhow!(
            "{}",
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    let tag = TagCheck::of(&public, &token, &shown.id);
    println!("{tag}");

    stage(5, &format!("audit: every {FED_BACK_EVERY}th drift response fed back as training data for {MODEL_NAME}"));
    let training_file = work.join("training.jsonl");
    let planted = write_training(&training_file, &drifted.seen)?;
    // Let the writer (and Kafka) catch up, then shut down the way SIGTERM does: the audit
    // reads the whole run.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = running.metrics.clone();
    running.shutdown().await;
    let predictions = match &opts.kafka_brokers {
        Some(brokers) => format!("kafka://{brokers}/{DEFAULT_TOPIC}"),
        None => format!("spool:{}", opts.spool_dir.display()),
    };
    let audited = AuditFinding::run(predictions, &training_file, public, planted)?;
    println!("{audited}");
    anyhow::ensure!(
        audited.reported_share == audited.planted.fraction(),
        "the audit found a direct loop share of {} where {} was planted",
        audited.reported_share,
        audited.planted.fraction()
    );

    Ok(Summary {
        spool_dir: opts.spool_dir.clone(),
        latency,
        drift,
        limit: LimitSummary {
            breach: limit,
            alert,
        },
        live_change: change,
        tag,
        audit: audited,
        tee: Tee {
            queued: m.tee.queued.get(),
            spooled: m.tee.spool.spooled.get(),
            dropped: m.tee.dropped_queue_full.get(),
            sent_to_kafka: opts.kafka_brokers.as_ref().map(|_| m.tee.sent.get()),
        },
    })
}

fn stage(n: usize, title: &str) {
    println!("\n[{n}/{STAGES}] {title}");
}

fn pretty(v: &impl Serialize) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// What the demo measured, stage by stage.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub spool_dir: PathBuf,
    pub latency: Latency,
    pub drift: Drift,
    pub limit: LimitSummary,
    pub live_change: LiveChange,
    pub tag: TagCheck,
    pub audit: AuditFinding,
    pub tee: Tee,
}

/// `n` of `of`: a rate that says what it counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Share {
    pub n: u64,
    pub of: u64,
}

impl Share {
    fn fraction(self) -> f64 {
        if self.of == 0 {
            0.0
        } else {
            self.n as f64 / self.of as f64
        }
    }

    /// Responses that satisfy `f`.
    fn count(seen: &[Seen], f: impl Fn(&Seen) -> bool) -> Share {
        Share {
            n: seen.iter().filter(|s| f(s)).count() as u64,
            of: seen.len() as u64,
        }
    }

    /// Decided rows that satisfy `f`.
    fn rows<'a>(seen: impl IntoIterator<Item = &'a Seen>, f: impl Fn(&SeenRow) -> bool) -> Share {
        let mut share = Share::default();
        for row in seen.into_iter().flat_map(|s| &s.rows) {
            share.of += 1;
            share.n += u64::from(f(row));
        }
        share
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.1}% ({} of {})",
            self.fraction() * 100.0,
            self.n,
            self.of
        )
    }
}

/// Direct against proxied latency, from each request's scheduled send time.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub direct_p50_us: u64,
    pub direct_p99_us: u64,
    pub proxied_p50_us: u64,
    pub proxied_p99_us: u64,
    pub proxied_ok: u64,
    pub proxied_failed: u64,
}

impl Latency {
    fn new(direct: &LoadReport, proxied: &LoadReport) -> Self {
        let q = |r: &LoadReport, p| r.latency.value_at_quantile(p);
        Latency {
            direct_p50_us: q(direct, 0.5),
            direct_p99_us: q(direct, 0.99),
            proxied_p50_us: q(proxied, 0.5),
            proxied_p99_us: q(proxied, 0.99),
            proxied_ok: proxied.ok,
            proxied_failed: proxied.failed,
        }
    }
}

impl fmt::Display for Latency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let added = |a: u64, b: u64| a as i64 - b as i64;
        write!(
            f,
            "p50 {:+} µs  p99 {:+} µs",
            added(self.proxied_p50_us, self.direct_p50_us),
            added(self.proxied_p99_us, self.direct_p99_us)
        )
    }
}

/// The adaptive threshold through the shift, against the threshold it started from.
#[derive(Debug, Serialize)]
pub struct Drift {
    pub requests: u64,
    /// The threshold on the first shifted request, and on the last.
    pub threshold_before: f64,
    pub threshold_after: f64,
    pub target_rate: f64,
    /// The rows measured "after": those of the stage's second half (request index ≥ this).
    pub settled_from_index: u64,
    /// Rows whose score reached the adaptive threshold in force (the model's action).
    pub adaptive_rate: Share,
    /// Rows whose score reached `threshold_before`: what a fixed threshold would have done.
    pub fixed_rate: Share,
}

impl Drift {
    fn of(seen: &[Seen]) -> anyhow::Result<Drift> {
        let threshold = |s: Option<&Seen>| {
            s.and_then(|s| s.rows.first())
                .and_then(|r| r.threshold)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "the drift stage got no decided response (is the proxy deciding?)"
                    )
                })
        };
        let before = threshold(seen.first())?;
        let after = threshold(seen.last())?;
        let settled = &seen[seen.len() / 2..];
        let settled_from_index = settled.first().map_or(0, |s| s.index);
        Ok(Drift {
            requests: seen.len() as u64,
            threshold_before: before,
            threshold_after: after,
            target_rate: TARGET_RATE,
            settled_from_index,
            adaptive_rate: Share::rows(settled, |r| r.model_action == ACTION),
            fixed_rate: Share::rows(settled, |r| r.score >= before),
        })
    }
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "adaptive threshold: {:.4} when the inputs shifted, {:.4} at the end",
            self.threshold_before, self.threshold_after
        )?;
        write!(
            f,
            "second half, {ACTION} rate (target {}): adaptive {}; a fixed threshold at {:.4} would have acted on {}",
            self.target_rate, self.adaptive_rate, self.threshold_before, self.fixed_rate
        )
    }
}

/// The limit while the threshold catches up: the rows from the first fallback to the last.
#[derive(Debug, Serialize)]
pub struct LimitBreach {
    pub max_fraction: f64,
    /// The first and last request (index) with a row that fell back; `None`: no breach.
    pub span: Option<(u64, u64)>,
    pub fallback_rows: u64,
    /// Within the span: rows the threshold made `spam`, and rows delivered as `spam`.
    pub model_rate: Share,
    pub delivered_rate: Share,
}

impl LimitBreach {
    fn of(seen: &[Seen], max_fraction: f64) -> LimitBreach {
        let fell_back = |s: &Seen| s.rows.iter().any(|r| r.limit == "fallback");
        let within = match (
            seen.iter().position(fell_back),
            seen.iter().rposition(fell_back),
        ) {
            (Some(a), Some(b)) => &seen[a..=b],
            _ => &[],
        };
        LimitBreach {
            max_fraction,
            span: within
                .first()
                .zip(within.last())
                .map(|(a, b)| (a.index, b.index)),
            fallback_rows: Share::rows(within, |r| r.limit == "fallback").n,
            model_rate: Share::rows(within, |r| r.model_action == ACTION),
            delivered_rate: Share::rows(within, |r| r.action == ACTION),
        }
    }
}

impl fmt::Display for LimitBreach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.span {
            None => write!(
                f,
                "limit ({ACTION} ≤ {} of decisions in 2s): not breached",
                self.max_fraction
            ),
            Some((a, b)) => write!(
                f,
                "limit ({ACTION} ≤ {} of decisions in 2s) breached while the threshold caught up \
                 (requests {a}–{b}): the threshold said {ACTION} on {}, the fallback (ham) took \
                 {} rows, {ACTION} delivered on {}",
                self.max_fraction, self.model_rate, self.fallback_rows, self.delivered_rate
            ),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct LimitSummary {
    #[serde(flatten)]
    pub breach: LimitBreach,
    /// The `limit_breach_started` alert this run wrote to the spool.
    pub alert: Option<Value>,
}

/// The first breach alert in the spool at or after `since`.
fn breach_alert(spool: &Path, since: SystemTime) -> Option<Value> {
    let mut found = None;
    let _ = Source::Spool(spool.to_owned()).for_each(None, &mut |bytes| {
        if found.is_some() {
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
            return;
        };
        let recent = v["time"]
            .as_str()
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
            .is_some_and(|t| t >= since);
        if v["event"] == "limit_breach_started" && recent {
            found = Some(v);
        }
    });
    found
}

/// The policy file edited, and the proof it is in force.
#[derive(Debug, Serialize)]
pub struct LiveChange {
    pub version_before: String,
    pub version_after: String,
    /// From the rename to the first response under the new version.
    pub applied_after_ms: u64,
    /// `sluicegate_policy_generation` on the admin port before the edit and after.
    pub generation_before: f64,
    pub generation_after: f64,
    pub requests: u64,
    /// Responses whose `sluicegate-policy` is the version `/metrics` reports in force.
    pub under_new_version: Share,
    pub model_rate: Share,
    pub delivered_rate: Share,
    pub fallback_rows: u64,
}

impl fmt::Display for LiveChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "applied {} ms after the edit: sluicegate-policy {} → {}",
            self.applied_after_ms, self.version_before, self.version_after
        )?;
        writeln!(
            f,
            "then {} requests: {} under the new version; the threshold said {ACTION} on {}, \
             delivered on {} (cap {LIMIT_AFTER}), {} rows fell back",
            self.requests,
            self.under_new_version,
            self.model_rate,
            self.delivered_rate,
            self.fallback_rows
        )?;
        write!(
            f,
            "sluicegate_policy_generation {} → {}",
            self.generation_before, self.generation_after
        )
    }
}

/// Sends one request at a time until a response names a policy version other than `old`.
async fn wait_for_new_policy(proxy: SocketAddr, old: &str) -> anyhow::Result<String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut i = 0;
    loop {
        i += 1;
        let req = post(proxy, v2_request_shifted(1, i, SHIFT), CONSUMER_RELOAD);
        if let Ok(resp) = client.request(req).await {
            let version = header_str(resp.headers(), "sluicegate-policy");
            let _ = resp.into_body().collect().await;
            if !version.is_empty() && version != old {
                return Ok(version);
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the edited policy was not applied within 15s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `/metrics` scrape of the admin port.
struct Scrape(String);

impl Scrape {
    /// The sum of `name`'s samples.
    fn sum(&self, name: &str) -> f64 {
        self.samples(name)
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.0.lines().filter(move |l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
    }

    fn lines<'a>(&'a self, names: &'a [&'a str]) -> impl Iterator<Item = &'a str> {
        names.iter().flat_map(|n| self.samples(n))
    }
}

/// The version label of `sluicegate_policy_info`.
fn metrics_version(m: &Scrape) -> String {
    m.samples("sluicegate_policy_info")
        .find_map(|l| {
            let rest = &l[l.find("version=\"")? + 9..];
            Some(rest[..rest.find('"')?].to_owned())
        })
        .unwrap_or_default()
}

async fn scrape(admin: SocketAddr) -> anyhow::Result<Scrape> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::get(format!("http://{admin}/metrics")).body(Full::default())?;
    let body = client.request(req).await?.into_body().collect().await?;
    Ok(Scrape(
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    ))
}

/// One response's tag, verified with a key ring of public keys.
#[derive(Debug, Serialize)]
pub struct TagCheck {
    pub prediction_id: String,
    pub token: String,
    /// The claims, when it verified; else why not.
    pub claims: Option<TagClaims>,
    pub error: Option<String>,
}

impl TagCheck {
    fn of(keys: &KeyRing, token: &str, id: &str) -> TagCheck {
        let (claims, error) = match keys.verify(token) {
            Ok(c) => (Some(c), None),
            Err(e) => (None, Some(format!("{} ({})", e, e.kind()))),
        };
        TagCheck {
            prediction_id: id.to_owned(),
            token: token.to_owned(),
            claims,
            error,
        }
    }
}

impl fmt::Display for TagCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "$ sluicegate tag verify \"$TAG\" --keys public-keys/")?;
        match (&self.claims, &self.error) {
            (Some(claims), _) => write!(f, "valid\n{}", pretty(claims)),
            (None, error) => write!(f, "invalid: {}", error.as_deref().unwrap_or("?")),
        }
    }
}

/// The feedback loop planted in a training file, and what the audit made of it.
#[derive(Debug, Serialize)]
pub struct AuditFinding {
    /// The `--predictions` source.
    pub predictions: String,
    /// Rows of the training file that are the model's own tagged outputs, of all its rows.
    pub planted: Share,
    /// The audit's direct-loop fraction for the training set.
    pub reported_share: f64,
    pub predictions_read: u64,
}

impl AuditFinding {
    fn run(
        predictions: String,
        training: &Path,
        keys: KeyRing,
        planted: Share,
    ) -> anyhow::Result<AuditFinding> {
        let opts = AuditOptions {
            predictions: Some(Source::parse(&predictions).map_err(|e| anyhow::anyhow!(e))?),
            training: vec![(MODEL_NAME.to_owned(), Source::File(training.to_owned()))],
            labels: None,
            keys,
            from_ms: None,
            to_ms: None,
            bucket_ms: 3_600_000,
            progress: false,
        };
        let report = audit::run(&opts)?;
        let reported_share = report
            .feedback_loops
            .iter()
            .filter(|l| l.direct)
            .map(|l| l.fraction)
            .sum();
        Ok(AuditFinding {
            predictions,
            planted,
            reported_share,
            predictions_read: report.predictions_read,
        })
    }
}

impl fmt::Display for AuditFinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "$ sluicegate audit --predictions {} --training {MODEL_NAME}=training.jsonl --keys public-keys/",
            self.predictions
        )?;
        write!(
            f,
            "{} predictions read; training set {MODEL_NAME}: direct feedback loop {:.4} of its rows (planted: {})",
            self.predictions_read, self.reported_share, self.planted
        )
    }
}

/// Writes one training row per drift request: every [`FED_BACK_EVERY`]th is the response as
/// the model answered it (its tag included), the others the request's features alone.
/// Returns how many rows carry a tag, of all.
fn write_training(file: &Path, seen: &[Seen]) -> anyhow::Result<Share> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(file)?);
    let mut planted = Share::default();
    for s in seen {
        let fed_back = s.index % FED_BACK_EVERY == 0 && s.tag.is_some();
        let row = if fed_back {
            json!({"features": s.features, "model_output": s.body})
        } else {
            json!({"features": s.features})
        };
        planted.of += 1;
        planted.n += u64::from(fed_back);
        serde_json::to_writer(&mut out, &row)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(planted)
}

/// What the tee did.
#[derive(Debug, Serialize)]
pub struct Tee {
    pub queued: u64,
    pub spooled: u64,
    pub dropped: u64,
    pub sent_to_kafka: Option<u64>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.drift;
        let l = &self.limit.breach;
        let c = &self.live_change;
        let a = &self.audit;
        writeln!(
            f,
            "\n── what happened ─────────────────────────────────────────────"
        )?;
        writeln!(f, "latency      added by sluicegate: {}", self.latency)?;
        writeln!(
            f,
            "drift        threshold {:.4} → {:.4}; after the shift {ACTION} on {} (target {:.0}%), \
             a fixed {:.4} would have been {}",
            d.threshold_before,
            d.threshold_after,
            d.adaptive_rate,
            d.target_rate * 100.0,
            d.threshold_before,
            d.fixed_rate
        )?;
        match l.span {
            Some(_) => writeln!(
                f,
                "limit        breached ({}): the fallback took {} rows; {ACTION} delivered on {} \
                 while the threshold said {}",
                if self.limit.alert.is_some() {
                    "alert in the spool"
                } else {
                    "alert sent"
                },
                l.fallback_rows,
                l.delivered_rate,
                l.model_rate
            )?,
            None => writeln!(f, "limit        not breached")?,
        }
        writeln!(
            f,
            "live change  limit {LIMIT_BEFORE} → {LIMIT_AFTER}, applied in {} ms without a restart \
             (policy {} → {}, generation {} → {}); {ACTION} delivered on {}",
            c.applied_after_ms,
            c.version_before,
            c.version_after,
            c.generation_before,
            c.generation_after,
            c.delivered_rate
        )?;
        writeln!(
            f,
            "tag          {} for prediction {}, verified with the public key only",
            if self.tag.claims.is_some() {
                "valid"
            } else {
                "INVALID"
            },
            self.tag.prediction_id
        )?;
        writeln!(
            f,
            "audit        direct feedback loop {:.4} reported, {:.4} planted ({} rows of {})",
            a.reported_share,
            a.planted.fraction(),
            a.planted.n,
            a.planted.of
        )?;
        write!(
            f,
            "tee          {} records queued, {} written to the spool, {} dropped",
            self.tee.queued, self.tee.spooled, self.tee.dropped
        )?;
        if let Some(sent) = self.tee.sent_to_kafka {
            write!(f, ", {sent} acknowledged by Kafka")?;
        }
        writeln!(
            f,
            "\n\nSee every record:  sluicegate spool cat {}",
            self.spool_dir.display()
        )
    }
}

/// One decided row as the client saw it: its score (the body), the rest from the headers.
#[derive(Debug, Clone)]
struct SeenRow {
    score: f64,
    threshold: Option<f64>,
    model_action: String,
    action: String,
    limit: String,
}

/// One response as the client saw it.
#[derive(Debug)]
struct Seen {
    /// The request's index in its stage (its v2 `id` is `req-INDEX`).
    index: u64,
    id: String,
    policy: String,
    tag: Option<String>,
    /// Every header, by name.
    headers: Vec<(String, String)>,
    features: Value,
    body: Value,
    rows: Vec<SeenRow>,
}

impl Seen {
    fn read(index: u64, request: &str, headers: &http::HeaderMap, body: &[u8]) -> Seen {
        let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let list = |name: &str| -> Vec<String> {
            header_str(headers, name)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        };
        // predict_proba is [n, 2], flat: column 1 is the score.
        let scores: Vec<f64> = body["outputs"]
            .as_array()
            .and_then(|o| o.iter().find(|t| t["name"] == "predict_proba"))
            .and_then(|t| t["data"].as_array())
            .map(|d| {
                d.iter()
                    .skip(1)
                    .step_by(2)
                    .filter_map(Value::as_f64)
                    .collect()
            })
            .unwrap_or_default();
        let (actions, models, limits, thresholds) = (
            list("sluicegate-action"),
            list("sluicegate-model-action"),
            list("sluicegate-limit"),
            list("sluicegate-threshold"),
        );
        let rows = (0..actions.len().min(scores.len()))
            .map(|i| SeenRow {
                score: scores[i],
                threshold: thresholds.get(i).and_then(|t| t.parse().ok()),
                model_action: models.get(i).cloned().unwrap_or_default(),
                action: actions[i].clone(),
                limit: limits.get(i).cloned().unwrap_or_default(),
            })
            .collect();
        let request: Value = serde_json::from_str(request).unwrap_or(Value::Null);
        Seen {
            index,
            id: header_str(headers, "sluicegate-id"),
            policy: header_str(headers, "sluicegate-policy"),
            tag: Some(header_str(headers, "sluicegate-tag")).filter(|t| !t.is_empty()),
            headers: {
                let mut all: Vec<(String, String)> = headers
                    .iter()
                    .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                    .collect();
                all.sort();
                all
            },
            features: request["inputs"][0]["data"].clone(),
            body,
            rows,
        }
    }
}

fn header_str(headers: &http::HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

fn post(addr: SocketAddr, body: String, consumer: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}/v2/models/{MODEL_NAME}/infer"))
        .header(header::CONTENT_TYPE, "application/json")
        .header("sluicegate-consumer", consumer)
        .body(Full::new(Bytes::from(body)))
        .expect("valid request")
}

/// What a fixed-rate run measured.
pub struct LoadReport {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub latency: hdrhistogram::Histogram<u64>,
    pub elapsed: Duration,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = |p: f64| Duration::from_micros(self.latency.value_at_quantile(p));
        write!(
            f,
            "{} requests in {:.1}s: {} ok, {} failed; latency (from the scheduled send time) \
             p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
            self.sent,
            self.elapsed.as_secs_f64(),
            self.ok,
            self.failed,
            q(0.5),
            q(0.9),
            q(0.99),
            Duration::from_micros(self.latency.max())
        )
    }
}

/// Fixed-rate traffic: `rate` requests a second for `duration`, each of 1 to 4 rows of
/// features moved by `shift`, naming `consumer`.
struct Load {
    rate: u32,
    duration: Duration,
    shift: f64,
    consumer: &'static str,
}

impl Load {
    fn new(rate: u32, duration: Duration, shift: f64, consumer: &'static str) -> Self {
        Load {
            rate,
            duration,
            shift,
            consumer,
        }
    }
}

/// A run of [`drive`]: its latency and, in request order, every response that answered.
struct Driven {
    report: LoadReport,
    seen: Vec<Seen>,
    started: SystemTime,
}

impl Driven {
    fn last_policy(&self) -> Option<String> {
        self.seen.last().map(|s| s.policy.clone())
    }
}

/// Sends v2 requests to `addr` at a fixed rate. Latency is taken from each request's
/// scheduled start, so a stall is not hidden (no coordinated omission). A progress bar shows
/// on a terminal (on stderr; none when it is not one).
async fn drive(addr: SocketAddr, load: Load) -> Driven {
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http::<Full<Bytes>>();
    let total = (load.rate as f64 * load.duration.as_secs_f64()).round() as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {pos}/{len} requests at a fixed rate [{bar:30}] {elapsed}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let hist = Arc::new(Mutex::new(
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
    ));
    let seen = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let (started, start) = (SystemTime::now(), Instant::now());
    let interval = Duration::from_secs_f64(1.0 / load.rate.max(1) as f64);
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let scheduled = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(scheduled.into()).await;
        let (client, hist, seen, bar) = (client.clone(), hist.clone(), seen.clone(), bar.clone());
        let body = v2_request_shifted(1 + (i % 4) as usize, i, load.shift);
        let req = post(addr, body.clone(), load.consumer);
        tasks.push(tokio::spawn(async move {
            let answered =
                match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
                    Ok(Ok(resp)) if resp.status().is_success() => {
                        let (parts, body) = resp.into_parts();
                        body.collect()
                            .await
                            .ok()
                            .map(|b| (parts.headers, b.to_bytes()))
                    }
                    Ok(Ok(resp)) => {
                        let _ = resp.into_body().collect().await;
                        None
                    }
                    _ => None,
                };
            let micros = scheduled.elapsed().as_micros() as u64;
            hist.lock().expect("hist").saturating_record(micros.max(1));
            if let Some((headers, bytes)) = answered {
                let s = Seen::read(i, &body, &headers, &bytes);
                seen.lock().expect("seen").push(s);
            }
            bar.inc(1);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    bar.finish_and_clear();
    let mut seen = std::mem::take(&mut *seen.lock().expect("seen"));
    seen.sort_by_key(|s| s.index);
    let ok = seen.len() as u64;
    let latency = hist.lock().expect("hist").clone();
    Driven {
        report: LoadReport {
            sent: total,
            ok,
            failed: total - ok,
            latency,
            elapsed: start.elapsed(),
        },
        seen,
        started,
    }
}
