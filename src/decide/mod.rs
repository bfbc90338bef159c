//! Decisions: scores → actions, per route, with adaptive thresholds and action limits.
//!
//! A [`RouteTable`] is built from a policy once per reload and carried in the policy snapshot.
//! Threshold estimators and limit windows live behind `Arc`s keyed by route name and settings:
//! a reload hands the same state to the new table wherever a threshold's or limit's settings did
//! not change, so a reload never resets them.

pub mod extract;
pub mod fleet;
pub mod limits;
pub mod threshold;

use std::sync::Arc;
use std::time::{Duration, Instant};

use extract::Scores;
use fleet::FleetParams;
use limits::{LimitWindow, LimitWindowParams, Recorded};
use threshold::{AdaptiveThreshold, AdaptiveThresholdParams};

use crate::config::policy::{
    AdaptiveThresholdSpec, DecisionSpec, ExplorationSpec, LimitScope, LimitSpec, OnBreach,
    PolicySpec, Protocol, RouteSpec, ThresholdSpec,
};

/// Buckets per limit window: the window slides in steps of window/60.
const LIMIT_BUCKETS: u32 = 60;
/// Buckets per adaptive-threshold window.
const THRESHOLD_BUCKETS: u32 = 10;

/// A score threshold in force: the runtime state of a [`ThresholdSpec`].
#[derive(Debug, Clone)]
pub enum Threshold {
    Fixed(f64),
    /// Shared across reloads while its settings do not change.
    Adaptive(Arc<AdaptiveThreshold>),
}

impl Threshold {
    pub fn value(&self) -> f64 {
        match self {
            Threshold::Fixed(v) => *v,
            Threshold::Adaptive(a) => a.current(),
        }
    }

    pub fn mode(&self) -> &'static str {
        match self {
            Threshold::Fixed(_) => "fixed",
            Threshold::Adaptive(_) => "adaptive",
        }
    }

    fn observe(&self, score: f64, now: Instant) {
        self.observe_all(&[score], now);
    }

    fn observe_all(&self, scores: &[f64], now: Instant) {
        if let Threshold::Adaptive(a) = self {
            a.observe_all(scores, now);
        }
    }
}

/// How a route turns scores into actions: the runtime state of a [`DecisionSpec`] (not named
/// `Decision`, which is a response's decisions in `proxy` and the record).
#[derive(Debug)]
pub enum Decider {
    Binary {
        action: Arc<str>,
        otherwise: Arc<str>,
        threshold: Threshold,
    },
    Multiclass {
        classes: Vec<Arc<str>>,
        default_action: Arc<str>,
        /// Per class, in column order; `None`: the argmax is always taken.
        thresholds: Vec<Option<Threshold>>,
    },
}

impl Decider {
    /// Every action the route can take, without repeats, in a stable order.
    pub fn actions(&self) -> Vec<Arc<str>> {
        let mut out: Vec<Arc<str>> = match self {
            Decider::Binary {
                action, otherwise, ..
            } => vec![action.clone(), otherwise.clone()],
            Decider::Multiclass {
                classes,
                default_action,
                ..
            } => classes
                .iter()
                .cloned()
                .chain(std::iter::once(default_action.clone()))
                .collect(),
        };
        let mut seen = std::collections::HashSet::new();
        out.retain(|a| seen.insert(a.clone()));
        out
    }
}

/// A limit in force: the runtime state of a [`LimitSpec`].
#[derive(Debug)]
pub struct Limit {
    pub spec: LimitSpec,
    pub window: Arc<LimitWindow>,
}

/// A route, ready for the request path: the runtime state of a [`RouteSpec`].
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    prefixes: Vec<String>,
    pub spec: RouteSpec,
    pub decider: Option<Decider>,
    pub limits: Vec<Limit>,
    /// Opt-in exploration; kept across reloads while its settings do not change, so a seeded
    /// sequence goes on.
    pub explorer: Option<Arc<Exploration>>,
}

/// Draws exploration decisions: the runtime state of an [`ExplorationSpec`].
#[derive(Debug)]
pub struct Exploration {
    pub spec: ExplorationSpec,
    rng: std::sync::Mutex<fastrand::Rng>,
}

impl Exploration {
    fn new(spec: ExplorationSpec) -> Self {
        let rng = match spec.seed {
            Some(seed) => fastrand::Rng::with_seed(seed),
            None => fastrand::Rng::new(),
        };
        Exploration {
            spec,
            rng: std::sync::Mutex::new(rng),
        }
    }

    /// For one row: `Some(index)` of the action to take when this row explores.
    fn draw(&self, choices: usize) -> Option<usize> {
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        (rng.f64() < self.spec.epsilon).then(|| rng.usize(..choices))
    }
}

/// The limit outcome of one row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitOutcome {
    Ok,
    Flagged,
    Fallback,
}

impl LimitOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitOutcome::Ok => "ok",
            LimitOutcome::Flagged => "flagged",
            LimitOutcome::Fallback => "fallback",
        }
    }
}

/// One row's decision.
#[derive(Clone, Debug)]
pub struct RowDecision {
    /// The score the threshold was applied to (the argmax class's, multi-class).
    pub score: f64,
    /// Every class score (multi-class only).
    pub class_scores: Option<Vec<f64>>,
    /// The threshold in force for this row, if any applied.
    pub threshold: Option<f64>,
    pub threshold_mode: Option<&'static str>,
    /// What the threshold alone said.
    pub model_action: Arc<str>,
    /// What was done, after exploration and limits.
    pub final_action: Arc<str>,
    pub limit: LimitOutcome,
    /// Whether exploration drew this row's action at random.
    pub explored: bool,
    /// The probability of the action taken under the policy's randomization, when the route
    /// explores: (1 − ε)·[taken = model action] + ε / number of actions.
    pub propensity: Option<f64>,
}

/// A limit's breach starting or ending.
#[derive(Clone, Debug)]
pub struct BreachEvent {
    pub route: Arc<str>,
    pub action: String,
    pub limit_index: usize,
    pub on_breach: OnBreach,
    pub started: bool,
    pub decisions: u64,
    pub actions: u64,
    pub spec: LimitSpec,
    /// For a fleet limit: whether it counted per pod (Redis unreachable) at the event.
    pub fleet_degraded: Option<bool>,
}

/// The decisions for a whole response.
#[derive(Debug)]
pub struct Decided {
    pub rows: Vec<RowDecision>,
    /// `Some`: a `reject` limit refused the request; the limit's action and its window.
    pub rejected: Option<(String, Duration)>,
    pub events: Vec<BreachEvent>,
}

impl Route {
    /// Whether this route takes a request with `path`.
    pub fn matches(&self, path: &str) -> bool {
        self.prefixes.iter().any(|p| path.starts_with(p.as_str()))
            || self.spec.matcher.model.as_ref().is_some_and(|m| {
                path == format!("/v2/models/{m}") || path == format!("/v1/models/{m}")
            })
    }

    pub fn protocol(&self) -> Protocol {
        self.spec.protocol
    }

    /// The range the route's scores fall in, when it decides (`None` when it only records).
    pub fn score_range(&self) -> Option<(f64, f64)> {
        self.decider.as_ref().map(|_| score_range(&self.spec))
    }

    /// Number of classes for extraction: `None` for a binary route.
    pub fn classes(&self) -> Option<usize> {
        match &self.decider {
            Some(Decider::Multiclass { classes, .. }) => Some(classes.len()),
            _ => None,
        }
    }

    /// Decides every row: thresholds, then limits (reject first, so a refused request
    /// counts nowhere), and reports breach starts and ends.
    pub fn decide(&self, scores: &Scores, now: Instant) -> Decided {
        let mut rows: Vec<RowDecision> =
            match (&self.decider, scores) {
                (
                    Some(Decider::Binary {
                        action,
                        otherwise,
                        threshold,
                    }),
                    Scores::Binary(s),
                ) => {
                    // One threshold for the whole batch, and its scores counted under one lock.
                    let t = threshold.value();
                    threshold.observe_all(s, now);
                    s.iter()
                        .map(|&score| {
                            let a = if score >= t { action } else { otherwise };
                            RowDecision {
                                score,
                                class_scores: None,
                                threshold: Some(t),
                                threshold_mode: Some(threshold.mode()),
                                model_action: a.clone(),
                                final_action: a.clone(),
                                limit: LimitOutcome::Ok,
                                explored: false,
                                propensity: None,
                            }
                        })
                        .collect()
                }
                (
                    Some(Decider::Multiclass {
                        classes,
                        default_action,
                        thresholds,
                    }),
                    Scores::Multi(s),
                ) => {
                    s.iter()
                        .map(|row| {
                            // Ties go to the lower column: deterministic.
                            let (best, &score) = row.iter().enumerate().fold(
                                (0, &f64::NEG_INFINITY),
                                |acc, (i, v)| if *v > *acc.1 { (i, v) } else { acc },
                            );
                            let threshold = thresholds.get(best).and_then(Option::as_ref);
                            let t = threshold.map(Threshold::value);
                            if let Some(c) = threshold {
                                c.observe(score, now);
                            }
                            let a = match t {
                                Some(t) if score < t => default_action,
                                _ => &classes[best],
                            };
                            RowDecision {
                                score,
                                class_scores: Some(row.clone()),
                                threshold: t,
                                threshold_mode: threshold.map(Threshold::mode),
                                model_action: a.clone(),
                                final_action: a.clone(),
                                limit: LimitOutcome::Ok,
                                explored: false,
                                propensity: None,
                            }
                        })
                        .collect()
                }
                _ => Vec::new(),
            };

        // Exploration comes before limits, so a limit always sees the action about to be
        // taken, and a fallback or reject is never overridden by a random draw.
        if let (Some(x), Some(d)) = (&self.explorer, &self.decider) {
            let actions = d.actions();
            let eps = x.spec.epsilon;
            for row in &mut rows {
                if let Some(i) = x.draw(actions.len()) {
                    row.final_action = actions[i].clone();
                    row.explored = true;
                }
                let same = row.final_action == row.model_action;
                row.propensity =
                    Some((1.0 - eps) * f64::from(u8::from(same)) + eps / actions.len() as f64);
            }
        }

        let mut events = Vec::new();
        let mut rejected = None;
        let order = self
            .limits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.spec.on_breach == OnBreach::Reject)
            .chain(
                self.limits
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.spec.on_breach != OnBreach::Reject),
            );
        for (index, limit) in order {
            let mask: Vec<bool> = rows
                .iter()
                .map(|r| *r.final_action == *limit.spec.action)
                .collect();
            let on_breach = match limit.spec.on_breach {
                OnBreach::Flag => Recorded::Taken,
                OnBreach::Fallback => Recorded::NotTaken,
                OnBreach::Reject => Recorded::Rejected,
            };
            let verdicts = limit.window.decide_batch(now, &mask, on_breach);
            for v in &verdicts {
                if let Some(started) = v.transition {
                    events.push(self.breach_event(index, limit, started, now));
                }
            }
            for (row, v) in rows.iter_mut().zip(&verdicts) {
                if !v.breach {
                    continue;
                }
                match limit.spec.on_breach {
                    OnBreach::Reject => {
                        rejected = Some((limit.spec.action.clone(), limit.spec.window));
                    }
                    OnBreach::Fallback => {
                        if let Some(f) = &limit.spec.fallback {
                            row.final_action = f.as_str().into();
                            row.limit = LimitOutcome::Fallback;
                        }
                    }
                    OnBreach::Flag => {
                        if row.limit == LimitOutcome::Ok {
                            row.limit = LimitOutcome::Flagged;
                        }
                    }
                }
            }
            if rejected.is_some() {
                break;
            }
        }
        Decided {
            rows,
            rejected,
            events,
        }
    }

    /// Periodic upkeep off the request path: recomputes due thresholds and ends breaches
    /// whose windows have emptied.
    pub fn tick(&self, now: Instant, events: &mut Vec<BreachEvent>) {
        for threshold in self.thresholds() {
            if let Threshold::Adaptive(a) = threshold {
                a.update_if_due(now);
            }
        }
        for (index, limit) in self.limits.iter().enumerate() {
            if let Some(started) = limit.window.tick(now) {
                events.push(self.breach_event(index, limit, started, now));
            }
        }
    }

    fn breach_event(
        &self,
        index: usize,
        limit: &Limit,
        started: bool,
        now: Instant,
    ) -> BreachEvent {
        let (decisions, actions) = limit.window.counts(now);
        BreachEvent {
            route: self.name.clone(),
            action: limit.spec.action.clone(),
            limit_index: index,
            on_breach: limit.spec.on_breach,
            started,
            decisions,
            actions,
            spec: limit.spec.clone(),
            fleet_degraded: limit.window.fleet().map(|g| g.degraded()),
        }
    }

    /// The longest window any of the route's state covers (limits, adaptive thresholds);
    /// `None` when it keeps no state worth carrying.
    fn state_window(&self) -> Option<Duration> {
        let limits = self.limits.iter().map(|l| l.spec.window);
        let thresholds = self.thresholds().into_iter().filter_map(|c| match c {
            Threshold::Adaptive(a) => Some(a.params().window),
            Threshold::Fixed(_) => None,
        });
        limits.chain(thresholds).max()
    }

    /// Every cut-off of the route with its class label (`""` for a binary route).
    pub fn thresholds(&self) -> Vec<&Threshold> {
        match &self.decider {
            Some(Decider::Binary { threshold, .. }) => vec![threshold],
            Some(Decider::Multiclass { thresholds, .. }) => thresholds.iter().flatten().collect(),
            None => Vec::new(),
        }
    }

    /// (class label, cut-off) pairs, for the threshold gauge.
    pub fn labelled_thresholds(&self) -> Vec<(&str, &Threshold)> {
        match &self.decider {
            Some(Decider::Binary {
                action, threshold, ..
            }) => vec![(&**action, threshold)],
            Some(Decider::Multiclass {
                classes,
                thresholds,
                ..
            }) => classes
                .iter()
                .zip(thresholds)
                .filter_map(|(c, t)| t.as_ref().map(|t| (&**c, t)))
                .collect(),
            None => Vec::new(),
        }
    }
}

/// The routes of one policy, in matching order.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// The routes in force.
    pub live: Vec<Arc<Route>>,
    /// Routes a reload removed, kept (unmatched) for their longest window: a route that comes
    /// back within it, say after a half-written policy was replaced by the whole one, gets its
    /// threshold and limit state back instead of starting empty.
    retired: Vec<Retired>,
}

#[derive(Debug)]
struct Retired {
    route: Arc<Route>,
    until: Instant,
}

impl RouteTable {
    /// Builds the table, taking over state from `previous` (its routes, and the routes it
    /// keeps retired) wherever settings did not change.
    pub fn build(policy: &PolicySpec, previous: Option<&RouteTable>, now: Instant) -> RouteTable {
        let find_old = |name: &str| {
            let t = previous?;
            t.live.iter().find(|r| &*r.name == name).or_else(|| {
                t.retired
                    .iter()
                    .find(|r| &*r.route.name == name && r.until > now)
                    .map(|r| &r.route)
            })
        };
        let live = policy
            .routes
            .iter()
            .map(|(name, spec)| Arc::new(compile(name, spec, find_old(name).map(|r| &**r), now)))
            .collect();
        let mut retired = Vec::new();
        if let Some(t) = previous {
            let removed = t.live.iter().filter_map(|r| {
                let until = now + r.state_window()?;
                Some(Retired {
                    route: r.clone(),
                    until,
                })
            });
            let still_kept = t.retired.iter().filter(|r| r.until > now).map(|r| Retired {
                route: r.route.clone(),
                until: r.until,
            });
            retired = removed
                .chain(still_kept)
                .filter(|r| !policy.routes.contains_key(&*r.route.name))
                .collect();
        }
        RouteTable { live, retired }
    }

    /// The route taking `path`, if any (validation guarantees at most one).
    pub fn route_for(&self, path: &str) -> Option<&Arc<Route>> {
        self.live.iter().find(|r| r.matches(path))
    }

    /// The route of a gRPC `ModelInfer` call for `model`: a `model:` route (`path_prefix`
    /// routes never match gRPC).
    pub fn route_for_model(&self, model: &str) -> Option<&Arc<Route>> {
        self.live
            .iter()
            .find(|r| r.spec.matcher.model.as_deref() == Some(model))
    }

    /// Whether a gRPC `ModelInfer` call can be decided at all: some `model:` route decides
    /// v2 responses.
    pub fn decides_model_infer(&self) -> bool {
        self.live.iter().any(|r| {
            r.spec.matcher.model.is_some() && r.decider.is_some() && r.protocol() == Protocol::V2
        })
    }
}

/// The range a route's scores fall in, as its policy declares it (`[0, 1]` by default).
fn score_range(spec: &RouteSpec) -> (f64, f64) {
    spec.score
        .as_ref()
        .map_or((0.0, 1.0), |s| (s.range[0], s.range[1]))
}

fn compile(name: &str, spec: &RouteSpec, old: Option<&Route>, now: Instant) -> Route {
    let range = score_range(spec);
    let old_thresholds: Vec<(&str, &Threshold)> =
        old.map(|o| o.labelled_thresholds()).unwrap_or_default();
    let compile_threshold = |label: &str, t: &ThresholdSpec| -> Threshold {
        match t {
            ThresholdSpec::Fixed(v) => Threshold::Fixed(*v),
            ThresholdSpec::Adaptive(spec) => {
                let params = adaptive_params(spec, range);
                // Same settings under the same label: keep the estimator and its window.
                let kept = old_thresholds.iter().find_map(|(l, c)| match c {
                    Threshold::Adaptive(a) if *l == label && *a.params() == params => {
                        Some(a.clone())
                    }
                    _ => None,
                });
                Threshold::Adaptive(
                    kept.unwrap_or_else(|| Arc::new(AdaptiveThreshold::new(params, now))),
                )
            }
        }
    };
    let decider = spec.decision.as_ref().map(|d| match d {
        DecisionSpec::Binary {
            action,
            otherwise,
            threshold,
        } => Decider::Binary {
            action: action.as_str().into(),
            otherwise: otherwise.as_str().into(),
            threshold: compile_threshold(action, threshold),
        },
        DecisionSpec::Multiclass {
            classes,
            default_action,
            thresholds,
        } => Decider::Multiclass {
            classes: classes.iter().map(|c| c.as_str().into()).collect(),
            default_action: default_action.as_str().into(),
            thresholds: classes
                .iter()
                .map(|c| thresholds.get(c).map(|t| compile_threshold(c, t)))
                .collect(),
        },
    });
    let limits = spec
        .limits
        .iter()
        .map(|l| {
            let params = LimitWindowParams {
                max_fraction: l.max_fraction,
                max_count: l.max_count,
                window: l.window,
                buckets: LIMIT_BUCKETS,
                min_decisions: l.min_decisions,
                fleet: fleet_params(l),
            };
            let kept = old.and_then(|o| {
                o.limits
                    .iter()
                    .find(|ol| ol.spec.action == l.action && *ol.window.params() == params)
                    .map(|ol| ol.window.clone())
            });
            Limit {
                spec: l.clone(),
                window: kept.unwrap_or_else(|| Arc::new(LimitWindow::new(params, now))),
            }
        })
        .collect();
    let prefixes = match (&spec.matcher.path_prefix, &spec.matcher.model) {
        (Some(p), _) => vec![p.clone()],
        (None, Some(m)) => vec![
            format!("/v1/models/{m}:"),
            format!("/v1/models/{m}/"),
            format!("/v2/models/{m}/"),
        ],
        (None, None) => Vec::new(),
    };
    let explorer = spec.exploration.as_ref().map(|x| {
        old.and_then(|o| o.explorer.clone())
            .filter(|e| e.spec == *x)
            .unwrap_or_else(|| Arc::new(Exploration::new(x.clone())))
    });
    Route {
        name: name.into(),
        prefixes,
        spec: spec.clone(),
        decider,
        limits,
        explorer,
    }
}

/// A fleet limit's parameters (validation guarantees its `max_count`).
fn fleet_params(l: &LimitSpec) -> Option<FleetParams> {
    let cap = l.max_count.filter(|_| l.scope == LimitScope::Fleet)?;
    let fraction = l.lease_fraction.unwrap_or(fleet::DEFAULT_LEASE_FRACTION);
    Some(FleetParams::new(cap, l.replicas.unwrap_or(1), fraction))
}

fn adaptive_params(a: &AdaptiveThresholdSpec, score_range: (f64, f64)) -> AdaptiveThresholdParams {
    AdaptiveThresholdParams {
        target_rate: a.target_rate,
        window: a.window,
        buckets: THRESHOLD_BUCKETS,
        initial: a.initial,
        min: a.min,
        max: a.max,
        max_step: a.max_step,
        update_interval: a.update_interval,
        min_samples: a.min_samples,
        score_range,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validate::parse;

    /// A policy with one binary route `r`, `extra` lines appended to the route.
    fn policy(extra: &str) -> PolicySpec {
        parse(
            &format!(
                r#"
routes:
  r:
    match: {{model: m}}
    protocol: v1
    decision:
      binary: {{action: spam, otherwise: ham, threshold: {{fixed: 0.5}}}}
    score: {{}}
{extra}
"#
            ),
            1 << 20,
        )
        .unwrap()
    }

    fn route(extra: &str) -> Arc<Route> {
        RouteTable::build(&policy(extra), None, Instant::now()).live[0].clone()
    }

    #[test]
    fn exploration_rate_and_propensities() {
        let r = route("    exploration: {epsilon: 0.1, seed: 7}");
        let n = 20_000;
        let scores = Scores::Binary((0..n).map(|i| if i % 2 == 0 { 0.9 } else { 0.1 }).collect());
        let d = r.decide(&scores, Instant::now());
        let explored = d.rows.iter().filter(|r| r.explored).count() as f64;
        // Binomial(n, 0.1): σ = √(n·0.1·0.9) ≈ 42; allow 4σ.
        let sigma = (n as f64 * 0.1 * 0.9).sqrt();
        assert!(
            (explored - 0.1 * n as f64).abs() < 4.0 * sigma,
            "explored {explored}"
        );
        for row in &d.rows {
            let p = row.propensity.unwrap();
            if row.final_action == row.model_action {
                assert!((p - (0.9 + 0.05)).abs() < 1e-12);
            } else {
                assert!(row.explored);
                assert!((p - 0.05).abs() < 1e-12);
            }
        }
        // About half of the explored rows keep the model's action by chance.
        let flipped = d
            .rows
            .iter()
            .filter(|r| r.final_action != r.model_action)
            .count() as f64;
        assert!((flipped - 0.05 * n as f64).abs() < 4.0 * (n as f64 * 0.05 * 0.95).sqrt());

        // Seeded: the same draws again from a fresh route.
        let again =
            route("    exploration: {epsilon: 0.1, seed: 7}").decide(&scores, Instant::now());
        let a: Vec<bool> = d.rows.iter().map(|r| r.explored).collect();
        let b: Vec<bool> = again.rows.iter().map(|r| r.explored).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn exploration_never_overrides_a_fallback() {
        let r = route(
            "    exploration: {epsilon: 0.5, seed: 1}\n    limits:\n      - {action: spam, max_count: 1, window: 1m, on_breach: fallback, fallback: ham}",
        );
        let d = r.decide(&Scores::Binary(vec![0.9; 200]), Instant::now());
        let spam = d.rows.iter().filter(|r| &*r.final_action == "spam").count();
        assert_eq!(spam, 1, "the limit holds whatever exploration drew");
        assert!(d.rows.iter().any(|r| r.explored));
    }

    #[test]
    fn a_removed_route_gets_its_state_back_within_its_window() {
        let with = |window: &str| {
            policy(&format!(
                "    limits:\n      - {{action: spam, max_count: 3, window: {window}, on_breach: fallback, fallback: ham}}"
            ))
        };
        let without = parse("routes: {}", 1 << 20).unwrap();
        let spam = |t: &RouteTable, now| {
            let d = t.live[0].decide(&Scores::Binary(vec![0.9; 2]), now);
            d.rows.iter().filter(|r| &*r.final_action == "spam").count()
        };
        let t0 = Instant::now();
        let table = RouteTable::build(&with("1m"), None, t0);
        assert_eq!(spam(&table, t0), 2);

        // Removed (a half-written file), then back: the two taken still count.
        let gone = RouteTable::build(&without, Some(&table), t0);
        assert!(gone.live.is_empty());
        let gone_again = RouteTable::build(&without, Some(&gone), t0);
        let back = RouteTable::build(&with("1m"), Some(&gone_again), t0);
        assert_eq!(spam(&back, t0), 1, "the cap of 3 holds across the removal");

        // Back only after its window: it starts afresh.
        let gone = RouteTable::build(&without, Some(&back), t0);
        let later = t0 + Duration::from_secs(61);
        let back = RouteTable::build(&with("1m"), Some(&gone), later);
        assert_eq!(spam(&back, later), 2);
        assert!(RouteTable::build(&without, Some(&gone), later)
            .retired
            .is_empty());
    }
}
