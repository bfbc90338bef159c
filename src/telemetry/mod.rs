//! Metrics (Prometheus text via prometheus-client, no globals) and logging: the registry,
//! which each area registers its own metrics in (the tee's are [`crate::tee::metrics`]), and the
//! data plane's and the policy's metrics.

mod score;

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::decide::Threshold;
use crate::tee::metrics::{RouteKind, TeeMetrics};
pub use score::ScoreHistogram;

/// Labels of a proxied request. `route` comes from the policy (a bounded set); `status` is the
/// HTTP status sent to the client.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteAction {
    pub route: String,
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteActionOutcome {
    pub route: String,
    pub action: String,
    /// `flagged`, `fallback` or `rejected`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteClass {
    pub route: String,
    /// The action the threshold guards (the binary action, or the class).
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabel {
    pub route: String,
    pub action: String,
    /// `limit_breach_started` or `limit_breach_ended`.
    pub event: &'static str,
}

/// A caller: declared consumers by name, every undeclared caller as `undeclared` (the label
/// set stays bounded by the policy).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabel {
    pub consumer: String,
    pub declared: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    pub version: String,
    /// Where the policy came from: `file`, `api` (`PUT /admin/policy`) or `default`.
    pub source: &'static str,
}

/// Where a failed request's error came from: picks its status and its label here.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub kind: &'static str,
    /// `client`, `upstream` or `policy`: whose fault it was.
    pub source: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~52 s: model calls range from sub-millisecond to long generations.
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

type GaugeF64 = Gauge<f64, AtomicU64>;

/// The data plane's metrics.
#[derive(Clone, Debug)]
pub struct ProxyMetrics {
    pub requests: Family<RouteStatus, Counter>,
    /// From admission to the response head handed back (upstream time included).
    pub request_duration: Family<RouteLabel, Histogram, fn() -> Histogram>,
    pub upstream_duration: Family<RouteLabel, Histogram, fn() -> Histogram>,
    /// The score of every decided row (the argmax class's, multi-class).
    pub scores: Family<RouteLabel, ScoreHistogram>,
    pub errors: Family<ErrorLabel, Counter>,
    pub upstream_ready: Gauge,
    /// Final actions taken, per route.
    pub decisions: Family<RouteAction, Counter>,
    /// Rows whose action a limit changed or refused.
    pub limit_outcomes: Family<RouteActionOutcome, Counter>,
    /// Responses a deciding route could not read.
    pub decision_errors: Family<RouteKind, Counter>,
    /// The threshold in force.
    pub threshold: Family<RouteClass, GaugeF64>,
    /// An adaptive threshold's settings: its target action rate and its clamp.
    pub threshold_target_rate: Family<RouteClass, GaugeF64>,
    pub threshold_min: Family<RouteClass, GaugeF64>,
    pub threshold_max: Family<RouteClass, GaugeF64>,
    /// Scores an adaptive threshold judged, and those at or above it: the realized rate.
    pub threshold_scores: Family<RouteClass, Counter>,
    pub threshold_scores_at_or_above: Family<RouteClass, Counter>,
    /// 1 while a limit is in breach.
    pub limit_in_breach: Family<RouteAction, Gauge>,
    pub limit_alerts: Family<AlertLabel, Counter>,
    pub consumer_requests: Family<ConsumerLabel, Counter>,
    /// Tags found on requests: `direct` and `hidden` feedback loops, `invalid` (never trusted).
    pub inbound_tags: Family<RouteKind, Counter>,
    /// 1 while a fleet limit counts per pod (Redis unreachable or not configured).
    pub fleet_limit_degraded: Family<RouteAction, Gauge>,
    /// Fleet-limit refills sent to Redis, by result (`ok`, `error`).
    pub fleet_refills: Family<ResultLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        ProxyMetrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            upstream_duration: Family::new_with_constructor(latency_histogram),
            scores: Family::default(),
            errors: Family::default(),
            upstream_ready: Gauge::default(),
            decisions: Family::default(),
            limit_outcomes: Family::default(),
            decision_errors: Family::default(),
            threshold: Family::default(),
            threshold_target_rate: Family::default(),
            threshold_min: Family::default(),
            threshold_max: Family::default(),
            threshold_scores: Family::default(),
            threshold_scores_at_or_above: Family::default(),
            limit_in_breach: Family::default(),
            limit_alerts: Family::default(),
            consumer_requests: Family::default(),
            inbound_tags: Family::default(),
            fleet_limit_degraded: Family::default(),
            fleet_refills: Family::default(),
        }
    }
}

impl ProxyMetrics {
    /// Publishes one of `route`'s thresholds (off the request path, by the upkeep ticker): its
    /// value, and for an adaptive one its target rate, clamp and realized counts.
    pub fn publish_threshold(&self, route: &str, class: &str, threshold: &Threshold) {
        let label = RouteClass {
            route: route.to_owned(),
            class: class.to_owned(),
        };
        self.threshold.get_or_create(&label).set(threshold.value());
        if let Threshold::Adaptive(a) = threshold {
            let p = a.params();
            self.threshold_target_rate
                .get_or_create(&label)
                .set(p.target_rate);
            self.threshold_min.get_or_create(&label).set(p.min);
            self.threshold_max.get_or_create(&label).set(p.max);
            // Totals kept by the threshold itself: a new threshold (changed settings) starts
            // again from 0, which Prometheus' rate() reads as a counter reset.
            let (judged, at_or_above) = a.realized();
            let store = |c: &Counter, v| c.inner().store(v, std::sync::atomic::Ordering::Relaxed);
            store(&self.threshold_scores.get_or_create(&label), judged);
            store(
                &self.threshold_scores_at_or_above.get_or_create(&label),
                at_or_above,
            );
        }
    }
}

/// Handles kept per key, at most this many: past it a lookup goes to the family each time
/// (correct, only slower), so a route answering many distinct statuses or actions cannot grow
/// its cache without bound.
const MAX_CACHED_HANDLES: usize = 32;

/// Handles of one family under one route, resolved on first use by the rest of their label.
#[derive(Debug)]
struct Handles<K, M> {
    cached: std::sync::RwLock<Vec<(K, M)>>,
}

impl<K: PartialEq, M: Clone> Handles<K, M> {
    fn new() -> Self {
        Handles {
            cached: std::sync::RwLock::new(Vec::new()),
        }
    }

    /// The handle whose key `matches`, resolved by `resolve` (a family lookup, building the
    /// label) only on a miss, and then kept under `key()` while there is room.
    fn get(
        &self,
        matches: impl Fn(&K) -> bool,
        key: impl FnOnce() -> K,
        resolve: impl FnOnce() -> M,
    ) -> M {
        // A poisoned lock only means a panic elsewhere mid-push: the list is still whole.
        let cached = self.cached.read().unwrap_or_else(|e| e.into_inner());
        if let Some((_, m)) = cached.iter().find(|(k, _)| matches(k)) {
            return m.clone();
        }
        drop(cached);
        let m = resolve();
        let mut cached = self.cached.write().unwrap_or_else(|e| e.into_inner());
        if cached.len() < MAX_CACHED_HANDLES && !cached.iter().any(|(k, _)| matches(k)) {
            cached.push((key(), m.clone()));
        }
        m
    }
}

/// One route's data-plane metrics, each handle resolved once (label strings built and hashed
/// on first use) and then shared: the request path updates them without allocating. Handles
/// point into the [`ProxyMetrics`] families, so `/metrics` shows the same series.
#[derive(Debug)]
pub struct RouteMetrics {
    route: String,
    families: ProxyMetrics,
    request_duration: Histogram,
    upstream_duration: Histogram,
    /// `Some` on a deciding route.
    scores: Option<ScoreHistogram>,
    requests: Handles<u16, Counter>,
    decisions: Handles<String, Counter>,
    limit_outcomes: Handles<(String, &'static str), Counter>,
    decision_errors: Handles<&'static str, Counter>,
}

impl RouteMetrics {
    /// The handles of `route`; `score_range` is the range its scores fall in, when it decides.
    pub fn new(families: &ProxyMetrics, route: &str, score_range: Option<(f64, f64)>) -> Self {
        let label = RouteLabel {
            route: route.to_owned(),
        };
        let scores = score_range.map(|(lo, hi)| {
            let h = families.scores.get_or_create(&label).clone();
            h.set_range(lo, hi);
            h
        });
        RouteMetrics {
            route: route.to_owned(),
            families: families.clone(),
            request_duration: families.request_duration.get_or_create(&label).clone(),
            upstream_duration: families.upstream_duration.get_or_create(&label).clone(),
            scores,
            requests: Handles::new(),
            decisions: Handles::new(),
            limit_outcomes: Handles::new(),
            decision_errors: Handles::new(),
        }
    }

    /// A request answered with `status`, its response head `elapsed` after admission.
    pub fn request(&self, status: u16, elapsed: Duration) {
        self.request_duration.observe(elapsed.as_secs_f64());
        self.requests
            .get(
                |&s| s == status,
                || status,
                || {
                    self.families
                        .requests
                        .get_or_create(&RouteStatus {
                            route: self.route.clone(),
                            status,
                        })
                        .clone()
                },
            )
            .inc();
    }

    pub fn upstream_duration(&self, seconds: f64) {
        self.upstream_duration.observe(seconds);
    }

    /// A decided batch's scores (nothing on a route that does not decide).
    pub fn scores(&self, scores: impl Iterator<Item = f64>) {
        if let Some(h) = &self.scores {
            h.observe_all(scores);
        }
    }

    /// `n` rows took the final action `action`.
    pub fn decisions(&self, action: &str, n: u64) {
        self.decisions
            .get(
                |a| a == action,
                || action.to_owned(),
                || {
                    self.families
                        .decisions
                        .get_or_create(&RouteAction {
                            route: self.route.clone(),
                            action: action.to_owned(),
                        })
                        .clone()
                },
            )
            .inc_by(n);
    }

    /// `n` rows the model gave `action` were `outcome` by a limit.
    pub fn limit_outcomes(&self, action: &str, outcome: &'static str, n: u64) {
        self.limit_outcomes
            .get(
                |(a, o)| a == action && *o == outcome,
                || (action.to_owned(), outcome),
                || {
                    self.families
                        .limit_outcomes
                        .get_or_create(&RouteActionOutcome {
                            route: self.route.clone(),
                            action: action.to_owned(),
                            outcome,
                        })
                        .clone()
                },
            )
            .inc_by(n);
    }

    /// A response the route could not read, for `kind`.
    pub fn decision_error(&self, kind: &'static str) {
        self.decision_errors
            .get(
                |&k| k == kind,
                || kind,
                || {
                    self.families
                        .decision_errors
                        .get_or_create(&RouteKind {
                            route: self.route.clone(),
                            kind,
                        })
                        .clone()
                },
            )
            .inc();
    }
}

/// The policy in force, for operators comparing pods.
#[derive(Clone, Debug, Default)]
pub struct PolicyMetrics {
    pub info: Family<VersionLabel, Gauge>,
    pub generation: Gauge,
    pub reload_failures: Counter,
}

impl PolicyMetrics {
    /// Shows `version`, from `source`, as the one in force (and only it).
    pub fn set_version(&self, version: &str, generation: u64, source: &'static str) {
        self.info.clear();
        self.info
            .get_or_create(&VersionLabel {
                version: version.to_owned(),
                source,
            })
            .set(1);
        self.generation.set(generation as i64);
    }
}

/// Every metric the process exports, and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    pub proxy: ProxyMetrics,
    pub tee: TeeMetrics,
    pub policy: PolicyMetrics,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Self {
        let proxy = ProxyMetrics::default();
        let tee = TeeMetrics::default();
        let policy = PolicyMetrics::default();
        let mut registry = Registry::default();
        let root = registry.sub_registry_with_prefix("sluicegate");
        root.register(
            "requests",
            "Requests answered, by route and status",
            proxy.requests.clone(),
        );
        root.register(
            "request_duration_seconds",
            "Time from a request's arrival to its response head being sent back, upstream time included",
            proxy.request_duration.clone(),
        );
        root.register(
            "score",
            "Scores of decided rows (the argmax class's, multi-class), in 20 buckets over the route's score range",
            proxy.scores.clone(),
        );
        root.register(
            "upstream_duration_seconds",
            "Time from sending the request upstream to its response headers",
            proxy.upstream_duration.clone(),
        );
        root.register(
            "proxy_errors",
            "Requests the proxy answered itself, by cause",
            proxy.errors.clone(),
        );
        root.register(
            "upstream_ready",
            "1 when the upstream answers its readiness probe",
            proxy.upstream_ready.clone(),
        );
        root.register(
            "decisions",
            "Final actions taken, by route and action",
            proxy.decisions.clone(),
        );
        root.register(
            "limit_outcomes",
            "Rows a limit flagged, replaced by its fallback, or refused",
            proxy.limit_outcomes.clone(),
        );
        root.register(
            "decision_errors",
            "Responses a deciding route could not read (passed through unchanged)",
            proxy.decision_errors.clone(),
        );
        root.register(
            "threshold",
            "The score threshold in force, by route and guarded action",
            proxy.threshold.clone(),
        );
        root.register(
            "threshold_target_rate",
            "An adaptive threshold's target action rate",
            proxy.threshold_target_rate.clone(),
        );
        root.register(
            "threshold_min",
            "The lowest value an adaptive threshold may take (its clamp)",
            proxy.threshold_min.clone(),
        );
        root.register(
            "threshold_max",
            "The highest value an adaptive threshold may take (its clamp)",
            proxy.threshold_max.clone(),
        );
        root.register(
            "threshold_scores",
            "Scores an adaptive threshold judged",
            proxy.threshold_scores.clone(),
        );
        root.register(
            "threshold_scores_at_or_above",
            "Scores at or above the adaptive threshold in force: over threshold_scores, the realized action rate",
            proxy.threshold_scores_at_or_above.clone(),
        );
        root.register(
            "limit_in_breach",
            "1 while an action limit is in breach",
            proxy.limit_in_breach.clone(),
        );
        root.register(
            "limit_alerts",
            "Limit breach starts and ends",
            proxy.limit_alerts.clone(),
        );
        root.register(
            "consumer_requests",
            "Requests by consumer (every undeclared caller shares one label)",
            proxy.consumer_requests.clone(),
        );
        root.register(
            "inbound_tags",
            "Provenance tags found on requests, by route and kind (direct, hidden, invalid)",
            proxy.inbound_tags.clone(),
        );
        root.register(
            "fleet_limit_degraded",
            "1 while a scope: fleet limit counts per pod (cap / replicas) because Redis is unreachable or not configured",
            proxy.fleet_limit_degraded.clone(),
        );
        root.register(
            "fleet_refills",
            "Fleet-limit lease refills sent to Redis, by result",
            proxy.fleet_refills.clone(),
        );
        root.register(
            "policy_info",
            "The policy version in force (value 1)",
            policy.info.clone(),
        );
        root.register(
            "policy_generation",
            "Policy reloads applied since start",
            policy.generation.clone(),
        );
        root.register(
            "policy_reload_failures",
            "Policy reloads refused (invalid policy)",
            policy.reload_failures.clone(),
        );
        tee.register(root.sub_registry_with_prefix("tee"));
        Metrics {
            proxy,
            tee,
            policy,
            registry,
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Logs to stderr; `RUST_LOG` filters (else `default`, e.g. `info`).
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_handles_update_the_exposed_series_and_stay_bounded() {
        let metrics = Metrics::new();
        let route = RouteMetrics::new(&metrics.proxy, "spam", Some((0.0, 1.0)));
        for _ in 0..2 {
            route.request(200, Duration::from_millis(3));
            route.scores([0.01, 0.99, 0.5].into_iter());
            route.decisions("ham", 5);
            route.limit_outcomes("spam", "fallback", 2);
            route.decision_error("not_json");
        }
        route.upstream_duration(0.001);
        let exposed = metrics.encode();
        for line in [
            r#"sluicegate_requests_total{route="spam",status="200"} 2"#,
            r#"sluicegate_decisions_total{route="spam",action="ham"} 10"#,
            r#"sluicegate_limit_outcomes_total{route="spam",action="spam",outcome="fallback"} 4"#,
            r#"sluicegate_decision_errors_total{route="spam",kind="not_json"} 2"#,
            r#"sluicegate_upstream_duration_seconds_count{route="spam"} 1"#,
            r#"sluicegate_request_duration_seconds_count{route="spam"} 2"#,
            r#"sluicegate_request_duration_seconds_bucket{le="0.0032",route="spam"} 2"#,
            r#"sluicegate_score_count{route="spam"} 6"#,
            r#"sluicegate_score_bucket{le="0.05",route="spam"} 2"#,
            r#"sluicegate_score_bucket{le="0.5",route="spam"} 4"#,
        ] {
            assert!(exposed.lines().any(|l| l == line), "{line}\n{exposed}");
        }

        // Past the bound every status still counts, through the family.
        for status in 100..200 {
            route.request(status, Duration::ZERO);
        }
        assert_eq!(
            route.requests.cached.read().unwrap().len(),
            MAX_CACHED_HANDLES
        );
        let exposed = metrics.encode();
        assert!(exposed
            .lines()
            .any(|l| l == r#"sluicegate_requests_total{route="spam",status="199"} 1"#));
        assert!(exposed
            .lines()
            .any(|l| l == r#"sluicegate_requests_total{route="spam",status="200"} 2"#));

        // A route that does not decide shows no score histogram.
        RouteMetrics::new(&metrics.proxy, "plain", None).scores([0.5].into_iter());
        assert!(!metrics
            .encode()
            .contains(r#"sluicegate_score_count{route="plain"}"#));
    }

    /// An adaptive threshold driven to its `max` clamp shows there, beside its settings, and
    /// its realized counts follow the scores it judged.
    #[test]
    fn an_adaptive_threshold_pinned_at_its_clamp_is_published_with_its_settings() {
        use crate::decide::threshold::{AdaptiveThreshold, AdaptiveThresholdParams};
        use std::sync::Arc;
        use std::time::Instant;
        let now = Instant::now();
        let params = AdaptiveThresholdParams {
            target_rate: 0.1,
            window: Duration::from_secs(60),
            buckets: 6,
            initial: 0.5,
            min: 0.2,
            max: 0.8,
            max_step: f64::INFINITY,
            update_interval: Duration::from_secs(1),
            min_samples: 10,
            score_range: (0.0, 1.0),
        };
        let a = Arc::new(AdaptiveThreshold::new(params, now));
        // Every score is 0.95: the (1 − 0.1) quantile is 0.95, above the clamp.
        a.observe_all(&[0.95; 100], now);
        assert_eq!(a.update(now), 0.8);
        a.observe_all(&[0.95, 0.1, f64::NAN], now);
        let metrics = Metrics::new();
        metrics
            .proxy
            .publish_threshold("spam", "spam", &Threshold::Adaptive(a));
        metrics
            .proxy
            .publish_threshold("fixed", "spam", &Threshold::Fixed(0.7));
        let exposed = metrics.encode();
        for line in [
            r#"sluicegate_threshold{route="spam",class="spam"} 0.8"#,
            r#"sluicegate_threshold_max{route="spam",class="spam"} 0.8"#,
            r#"sluicegate_threshold_min{route="spam",class="spam"} 0.2"#,
            r#"sluicegate_threshold_target_rate{route="spam",class="spam"} 0.1"#,
            // 100 at 0.5 (all above), then 0.95 and 0.1 at 0.8; the NaN is not judged.
            r#"sluicegate_threshold_scores_total{route="spam",class="spam"} 102"#,
            r#"sluicegate_threshold_scores_at_or_above_total{route="spam",class="spam"} 101"#,
            r#"sluicegate_threshold{route="fixed",class="spam"} 0.7"#,
        ] {
            assert!(
                exposed.lines().any(|l| l == line),
                "{line}
{exposed}"
            );
        }
        // A fixed threshold has no clamp or target to publish.
        assert!(!exposed.contains(r#"sluicegate_threshold_max{route="fixed""#));
    }
}
