//! `sluicegate audit`: feedback-loop, prediction-bias and action-rate reports from the record
//! stream (a Kafka topic or the spool) and training data (a topic or JSON-lines files).
//!
//! It streams: predictions and training rows are folded into counters as they are read, so a
//! topic of millions of records needs memory for the counters only. The one exception is the
//! bias report, which loads the labels (id → label) first and joins predictions against them.
//! It depends only on the record format and tag verification.
//!
//! Every row carries counts and exact integer sums, so reports of parts of a stream (by time,
//! by partition) add up to the report of the whole; rates and means beside them are derived.

mod html;
pub mod partition;
pub mod source;

pub use html::render_html;

use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

use crate::provenance::{find_tags, KeyRing};
use crate::tee::alert::{AlertEvent, ALERT_SCHEMA};
use crate::tee::record::v1::{ErrorCode, LimitOutcome, Record};
use source::Source;

/// How the report is printed (`--format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// For people.
    #[default]
    Table,
    /// For machines.
    Json,
    /// One self-contained page (inline SVG charts, no script, nothing fetched).
    Html,
}

/// What to read and how to report.
pub struct AuditOptions {
    pub predictions: Option<Source>,
    /// Training sets by the name of the model they train.
    pub training: Vec<(String, Source)>,
    pub labels: Option<Source>,
    pub keys: KeyRing,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub bucket_ms: i64,
    pub progress: bool,
}

/// The whole report.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub predictions_read: u64,
    /// Length of the action-rate buckets.
    pub bucket_ms: i64,
    pub feedback_loops: Vec<LoopRow>,
    pub bias: Vec<BiasRow>,
    pub action_rates: Vec<RateRow>,
}

/// One cell of the feedback-loop matrix: how much of `training_set` came from `producer`.
#[derive(Debug, Serialize, PartialEq)]
pub struct LoopRow {
    pub training_set: String,
    /// The model whose outputs are in the training data (`untagged` for rows with no valid tag).
    pub producer: String,
    pub rows: u64,
    pub total_rows: u64,
    pub fraction: f64,
    /// The producer is the model being trained: a direct loop. Otherwise a hidden one.
    pub direct: bool,
    /// Tags found that did not verify (forged, unknown key, malformed); never trusted.
    pub invalid_tags: u64,
}

/// Predicted action rate against the observed label rate.
#[derive(Debug, Serialize, PartialEq)]
pub struct BiasRow {
    pub route: String,
    pub model_version: String,
    pub action: String,
    pub labeled_rows: u64,
    /// Labeled rows decided `action`.
    pub predicted_rows: u64,
    /// Labeled rows whose label is `action`.
    pub observed_rows: u64,
    pub predicted_rate: f64,
    pub observed_rate: f64,
    /// predicted − observed.
    pub bias: f64,
}

/// Decisions, actions, thresholds and limit outcomes of one route in one time bucket.
#[derive(Debug, Serialize, PartialEq)]
pub struct RateRow {
    pub route: String,
    /// Start of the bucket (RFC 3339).
    pub bucket: String,
    /// Start of the bucket, in milliseconds since the Unix epoch.
    pub bucket_start_ms: i64,
    pub decisions: u64,
    /// Decisions by final action.
    pub action_counts: BTreeMap<String, u64>,
    /// `action_counts` over `decisions`.
    pub actions: BTreeMap<String, f64>,
    /// Decisions that had a threshold.
    pub thresholds: u64,
    /// Their thresholds' sum in units of 10⁻⁹, each rounded to that: an integer, so sums of
    /// parts add up exactly whatever their order.
    pub threshold_sum_nano: i64,
    /// `threshold_sum_nano` over `thresholds`.
    pub mean_threshold: Option<f64>,
    pub flagged: u64,
    pub fallback: u64,
    pub rejected_requests: u64,
    pub breaches_started: u64,
}

/// Runs the audit.
pub fn run(opts: &AuditOptions) -> anyhow::Result<Report> {
    let mut report = Report {
        bucket_ms: opts.bucket_ms,
        ..Report::default()
    };
    let bar = progress(opts.progress);

    // Labels first: the bias report joins predictions against them.
    let mut labels: HashMap<String, String> = HashMap::new();
    if let Some(src) = &opts.labels {
        bar.set_message("reading labels");
        src.for_each(None, &mut |bytes| {
            if let Ok(v) = serde_json::from_slice::<Value>(bytes) {
                if let (Some(id), Some(label)) = (v.get("id").and_then(Value::as_str), label_of(&v))
                {
                    labels.insert(normalize_row_id(id), label);
                }
            }
            bar.inc(1);
        })?;
    }

    if let Some(src) = &opts.predictions {
        bar.set_message("reading predictions");
        let mut rates = RateAcc::default();
        let mut bias = BiasAcc::default();
        src.for_each(opts.from_ms, &mut |bytes| {
            bar.inc(1);
            let Some(entry) = Prediction::read(bytes) else {
                return;
            };
            let Some(ms) = time_ms(entry.time()) else {
                return;
            };
            if opts.from_ms.is_some_and(|f| ms < f) || opts.to_ms.is_some_and(|t| ms >= t) {
                return;
            }
            report.predictions_read += 1;
            rates.add(&entry, ms, opts.bucket_ms);
            if let (Prediction::Record(record), false) = (&entry, labels.is_empty()) {
                bias.add(record, &labels);
            }
        })?;
        report.action_rates = rates.rows();
        report.bias = bias.rows();
    }

    for (model, src) in &opts.training {
        bar.set_message(format!("reading training set {model}"));
        let mut loops = LoopAcc::default();
        src.for_each(None, &mut |bytes| {
            bar.inc(1);
            if let Ok(row) = serde_json::from_slice::<Value>(bytes) {
                loops.add(&row, &opts.keys);
            }
        })?;
        report.feedback_loops.extend(loops.rows(model));
    }
    bar.finish_and_clear();
    Ok(report)
}

fn progress(show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg}: {pos} read ({per_sec})")
            .expect("valid template"),
    );
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

/// What the prediction stream holds: request records and, beside them, limit alerts.
enum Prediction {
    Record(Box<Record>),
    Alert(AlertEvent),
}

impl Prediction {
    /// `None` for anything else (not JSON, another schema, a record missing v1 fields).
    fn read(bytes: &[u8]) -> Option<Prediction> {
        // A record's `schema` comes first, so an alert fails to read as one at its first field.
        if let Ok(record) = serde_json::from_slice::<Record>(bytes) {
            return Some(Prediction::Record(Box::new(record)));
        }
        serde_json::from_slice::<AlertEvent>(bytes)
            .ok()
            .filter(|a| a.schema == ALERT_SCHEMA)
            .map(Prediction::Alert)
    }

    fn time(&self) -> &str {
        match self {
            Prediction::Record(r) => &r.time,
            Prediction::Alert(a) => &a.time,
        }
    }
}

fn time_ms(t: &str) -> Option<i64> {
    let st = humantime::parse_rfc3339(t).ok()?;
    st.duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as i64)
}

fn label_of(v: &Value) -> Option<String> {
    match v.get("label")? {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Labels name a row as `ID:i`; a bare `ID` is row 0.
fn normalize_row_id(id: &str) -> String {
    match crate::provenance::parse_row_ref(id) {
        Some((pid, row)) => crate::provenance::row_ref(pid, row),
        None => crate::provenance::row_ref(id, 0),
    }
}

#[derive(Default)]
struct LoopAcc {
    total: u64,
    by_producer: BTreeMap<String, u64>,
    untagged: u64,
    invalid: u64,
}

impl LoopAcc {
    fn add(&mut self, row: &Value, keys: &KeyRing) {
        self.total += 1;
        let mut producer = None;
        for token in find_tags(row, 16) {
            match keys.verify(token) {
                Ok(claims) if producer.is_none() => {
                    producer = Some(claims.model.clone().unwrap_or_else(|| claims.route.clone()))
                }
                Ok(_) => {}
                Err(_) => self.invalid += 1,
            }
        }
        match producer {
            Some(p) => *self.by_producer.entry(p).or_default() += 1,
            None => self.untagged += 1,
        }
    }

    fn rows(self, training_set: &str) -> Vec<LoopRow> {
        let total = self.total;
        let fraction = |n: u64| {
            if total == 0 {
                0.0
            } else {
                n as f64 / total as f64
            }
        };
        let mut out: Vec<LoopRow> = self
            .by_producer
            .into_iter()
            .map(|(producer, rows)| LoopRow {
                training_set: training_set.to_owned(),
                direct: producer == training_set,
                producer,
                rows,
                total_rows: total,
                fraction: fraction(rows),
                invalid_tags: 0,
            })
            .collect();
        out.push(LoopRow {
            training_set: training_set.to_owned(),
            producer: "untagged".into(),
            rows: self.untagged,
            total_rows: total,
            fraction: fraction(self.untagged),
            direct: false,
            invalid_tags: self.invalid,
        });
        out
    }
}

/// Labeled rows of one (route, model version): how many, and counts by action and by label.
#[derive(Default)]
struct BiasCell {
    rows: u64,
    predicted: BTreeMap<String, u64>,
    observed: BTreeMap<String, u64>,
}

#[derive(Default)]
struct BiasAcc {
    cells: BTreeMap<(String, String), BiasCell>,
}

impl BiasAcc {
    fn add(&mut self, record: &Record, labels: &HashMap<String, String>) {
        let Some(decisions) = record.row_decisions() else {
            return;
        };
        let version = record.model.version.as_deref().unwrap_or("unknown");
        for (i, d) in decisions.iter().enumerate() {
            let Some(label) = labels.get(&crate::provenance::row_ref(&record.id, i)) else {
                continue;
            };
            let cell = self
                .cells
                .entry((record.route.clone(), version.to_owned()))
                .or_default();
            cell.rows += 1;
            *cell.predicted.entry(d.final_action.to_owned()).or_default() += 1;
            *cell.observed.entry(label.clone()).or_default() += 1;
        }
    }

    fn rows(self) -> Vec<BiasRow> {
        let mut out = Vec::new();
        for ((route, model_version), cell) in self.cells {
            let BiasCell {
                rows: n,
                predicted,
                observed,
            } = cell;
            let mut actions: Vec<&String> = predicted.keys().chain(observed.keys()).collect();
            actions.sort();
            actions.dedup();
            let rate = |k: u64| k as f64 / n as f64;
            for action in actions {
                let predicted = predicted.get(action).copied().unwrap_or(0);
                let observed = observed.get(action).copied().unwrap_or(0);
                out.push(BiasRow {
                    route: route.clone(),
                    model_version: model_version.clone(),
                    action: action.clone(),
                    labeled_rows: n,
                    predicted_rows: predicted,
                    observed_rows: observed,
                    predicted_rate: rate(predicted),
                    observed_rate: rate(observed),
                    bias: rate(predicted) - rate(observed),
                });
            }
        }
        out
    }
}

#[derive(Default)]
struct RateCell {
    decisions: u64,
    actions: BTreeMap<String, u64>,
    threshold_sum_nano: i64,
    thresholds: u64,
    flagged: u64,
    fallback: u64,
    rejected: u64,
    breaches: u64,
}

#[derive(Default)]
struct RateAcc {
    cells: BTreeMap<(String, i64), RateCell>,
}

impl RateAcc {
    fn add(&mut self, entry: &Prediction, ms: i64, bucket_ms: i64) {
        let route = match entry {
            Prediction::Record(r) => &r.route,
            Prediction::Alert(a) => &a.route,
        };
        let bucket = ms - ms.rem_euclid(bucket_ms.max(1));
        let cell = self.cells.entry((route.clone(), bucket)).or_default();
        let record = match entry {
            Prediction::Record(r) => r,
            Prediction::Alert(a) => {
                if a.event == "limit_breach_started" {
                    cell.breaches += 1;
                }
                return;
            }
        };
        if record
            .error
            .as_ref()
            .is_some_and(|e| e.code == ErrorCode::LimitExceeded)
        {
            cell.rejected += 1;
        }
        for d in record.row_decisions().into_iter().flatten() {
            cell.decisions += 1;
            *cell.actions.entry(d.final_action.to_owned()).or_default() += 1;
            if let Some(t) = d.threshold {
                // `as` saturates (and reads NaN as 0): a wild threshold cannot wrap the sum.
                let nano = (t * 1e9).round() as i64;
                cell.threshold_sum_nano = cell.threshold_sum_nano.saturating_add(nano);
                cell.thresholds += 1;
            }
            match d.limit {
                LimitOutcome::Flagged => cell.flagged += 1,
                LimitOutcome::Fallback => cell.fallback += 1,
                _ => {}
            }
        }
    }

    fn rows(self) -> Vec<RateRow> {
        self.cells
            .into_iter()
            .map(|((route, bucket), c)| RateRow {
                route,
                bucket: humantime::format_rfc3339_seconds(
                    UNIX_EPOCH + std::time::Duration::from_millis(bucket.max(0) as u64),
                )
                .to_string(),
                bucket_start_ms: bucket,
                actions: c
                    .actions
                    .iter()
                    .map(|(a, n)| (a.clone(), *n as f64 / c.decisions.max(1) as f64))
                    .collect(),
                action_counts: c.actions,
                decisions: c.decisions,
                thresholds: c.thresholds,
                threshold_sum_nano: c.threshold_sum_nano,
                mean_threshold: (c.thresholds > 0)
                    .then(|| c.threshold_sum_nano as f64 / 1e9 / c.thresholds as f64),
                flagged: c.flagged,
                fallback: c.fallback,
                rejected_requests: c.rejected,
                breaches_started: c.breaches,
            })
            .collect()
    }
}

/// The training sets whose share of model-influenced rows exceeds `max`.
pub fn loops_over(report: &Report, max: f64) -> Vec<(String, f64)> {
    let mut by_set: BTreeMap<&str, f64> = BTreeMap::new();
    for row in &report.feedback_loops {
        if row.producer != "untagged" {
            *by_set.entry(&row.training_set).or_default() += row.fraction;
        }
    }
    by_set
        .into_iter()
        .filter(|(_, f)| *f > max)
        .map(|(s, f)| (s.to_owned(), f))
        .collect()
}

/// The report as aligned tables for people.
pub fn render_table(report: &Report) -> String {
    let mut out = String::new();
    out.push_str(&format!("predictions read: {}\n", report.predictions_read));
    if !report.feedback_loops.is_empty() {
        out.push_str("\nFeedback loops: share of each training set's rows produced by a model\n");
        out.push_str(&table(
            &[
                "training set",
                "produced by",
                "rows",
                "of",
                "fraction",
                "loop",
                "invalid tags",
            ],
            report
                .feedback_loops
                .iter()
                .map(|r| {
                    vec![
                        r.training_set.clone(),
                        r.producer.clone(),
                        r.rows.to_string(),
                        r.total_rows.to_string(),
                        format!("{:.4}", r.fraction),
                        match (r.producer.as_str(), r.direct) {
                            ("untagged", _) => "-".into(),
                            (_, true) => "direct".into(),
                            (_, false) => "hidden".into(),
                        },
                        r.invalid_tags.to_string(),
                    ]
                })
                .collect(),
        ));
    }
    if !report.bias.is_empty() {
        out.push_str("\nPrediction bias: predicted action rate against the observed label rate\n");
        out.push_str(&table(
            &[
                "route",
                "model version",
                "action",
                "labeled rows",
                "predicted",
                "observed",
                "bias",
            ],
            report
                .bias
                .iter()
                .map(|r| {
                    vec![
                        r.route.clone(),
                        r.model_version.clone(),
                        r.action.clone(),
                        r.labeled_rows.to_string(),
                        format!("{:.4}", r.predicted_rate),
                        format!("{:.4}", r.observed_rate),
                        format!("{:+.4}", r.bias),
                    ]
                })
                .collect(),
        ));
    }
    if !report.action_rates.is_empty() {
        out.push_str("\nAction rates, thresholds and limits over time\n");
        out.push_str(&table(
            &[
                "route",
                "from",
                "decisions",
                "action rates",
                "mean threshold",
                "flagged",
                "fallback",
                "rejected",
                "breaches",
            ],
            report
                .action_rates
                .iter()
                .map(|r| {
                    vec![
                        r.route.clone(),
                        r.bucket.clone(),
                        r.decisions.to_string(),
                        r.actions
                            .iter()
                            .map(|(a, f)| format!("{a} {f:.3}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        r.mean_threshold.map_or("-".into(), |t| format!("{t:.4}")),
                        r.flagged.to_string(),
                        r.fallback.to_string(),
                        r.rejected_requests.to_string(),
                        r.breaches_started.to_string(),
                    ]
                })
                .collect(),
        ));
    }
    out
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(c);
            if i + 1 < cells.len() {
                s.push_str(&" ".repeat(widths[i] - c.chars().count()));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    out.push_str(&line(widths.iter().map(|w| "-".repeat(*w)).collect()));
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

/// Parses `--from`/`--to`: RFC 3339, or a duration meaning that long ago (`24h`).
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return t
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .map_err(|_| format!("{s:?} is before 1970"));
    }
    let ago = crate::config::units::parse_duration(s)
        .ok_or_else(|| format!("{s:?}: give an RFC 3339 time or a duration ago (e.g. 24h)"))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?;
    Ok(now.saturating_sub(ago).as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::policy::{LimitSpec, OnBreach};
    use crate::decide::BreachEvent;
    use crate::tee::alert::Alert;

    fn record(id: &str, error: Option<&str>, limits: &[&str]) -> String {
        let decisions: Vec<Value> = limits
            .iter()
            .map(|limit| {
                serde_json::json!({"row": 0, "score": 0.9, "threshold": 0.5,
                    "threshold_mode": "fixed", "model_action": "spam", "final_action": "spam",
                    "limit": limit, "explored": false})
            })
            .collect();
        let body = serde_json::json!({"encoding": "none", "size": 0, "truncated": false});
        serde_json::json!({
            "schema": "sluicegate.record.v1", "id": id, "time": "2026-01-01T00:10:00.000000Z",
            "instance": "pod-0", "route": "spam", "model": {"name": "m", "version": "3"},
            "consumer": {"id": null, "declared": false},
            "policy": {"version": "p", "generation": 0},
            "request": {"method": "POST", "path": "/", "query": null, "headers": {},
                "v2_id": null, "body": body},
            "response": null, "status": 200,
            "error": error.map(|code| serde_json::json!({"code": code, "message": "m"})),
            "complete": true, "tag": null, "inbound_tags": [],
            "decisions": (!limits.is_empty()).then_some(decisions),
            "decision_error": null, "timings": {"upstream_ms": null, "total_ms": 1.0},
        })
        .to_string()
    }

    #[test]
    fn records_and_alerts_are_read_through_their_types() {
        let event = BreachEvent {
            route: "spam".into(),
            action: "spam".into(),
            limit_index: 0,
            on_breach: OnBreach::Flag,
            started: true,
            decisions: 10,
            actions: 5,
            spec: LimitSpec {
                action: "spam".into(),
                max_fraction: None,
                max_count: Some(4),
                window: std::time::Duration::from_secs(60),
                min_decisions: 0,
                on_breach: OnBreach::Flag,
                fallback: None,
                scope: Default::default(),
                replicas: None,
                lease_fraction: None,
            },
            fleet_degraded: None,
        };
        let mut alert = Alert::new(event, "p", 0);
        alert.time = UNIX_EPOCH + std::time::Duration::from_secs(1_767_226_000);
        let ctx = crate::tee::record::EncodeContext {
            instance: "pod-0".into(),
            max_record_bytes: 1 << 20,
            record_decisions: Default::default(),
            inbound_tags: Default::default(),
        };
        let alert = String::from_utf8(alert.encode(&ctx).payload).unwrap();
        let lines = [
            record("a", None, &["ok", "flagged", "fallback", "throttled"]),
            record("b", Some("limit_exceeded"), &[]),
            record("c", Some("a_code_added_later"), &[]),
            alert,
            // Neither a v1 record nor an alert: not a prediction.
            r#"{"schema":"sluicegate.record.v2","time":"2026-01-01T00:10:00Z"}"#.into(),
            "not json".into(),
        ];
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("predictions.jsonl");
        std::fs::write(&file, lines.join("\n")).unwrap();
        let report = run(&AuditOptions {
            predictions: Some(Source::File(file)),
            training: Vec::new(),
            labels: None,
            keys: KeyRing::default(),
            from_ms: None,
            to_ms: None,
            bucket_ms: 24 * 3_600_000,
            progress: false,
        })
        .unwrap();
        assert_eq!(report.predictions_read, 4);
        assert_eq!(
            report.action_rates,
            vec![RateRow {
                route: "spam".into(),
                bucket: "2026-01-01T00:00:00Z".into(),
                bucket_start_ms: 1_767_225_600_000,
                decisions: 4,
                action_counts: BTreeMap::from([("spam".into(), 4)]),
                actions: BTreeMap::from([("spam".into(), 1.0)]),
                thresholds: 4,
                threshold_sum_nano: 2_000_000_000,
                mean_threshold: Some(0.5),
                flagged: 1,
                fallback: 1,
                rejected_requests: 1,
                breaches_started: 1,
            }]
        );
    }
}
