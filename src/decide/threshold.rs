//! Adaptive thresholds: turn a stream of model scores into a threshold that holds a target
//! action rate `r` ("fixed thresholds in dynamic systems", Sculley et al. 2015).
//!
//! The threshold is the `(1 − r)` quantile of the scores seen over a sliding time window, so
//! that about a fraction `r` of scores are `≥` it. It is recomputed off the hot path by
//! [`AdaptiveThreshold::update`] (a background ticker), bounded to `[min, max]` and moved at most
//! `max_step` per update; the hot path only records scores ([`AdaptiveThreshold::observe`]) and
//! reads the published value ([`AdaptiveThreshold::current`]).
//!
//! # The quantile
//!
//! For `n` window scores and target rate `r`, let `a = ⌊n·r⌋` clamped to `[1, n]`: the number of
//! scores allowed at or above the threshold. The threshold is the `a`-th largest score, i.e. the
//! score at 1-based ascending rank `n − a + 1` (= `⌈n·(1 − r)⌉ + 1` when `n·r ≥ 1`). With
//! distinct scores exactly `a` of them are `≥` it, so the realized fraction is as close to `r`
//! as possible without going above it. Equal scores cannot be split by a threshold: if scores
//! tie at the threshold all of them are `≥` it and the fraction exceeds `r` by the extra ties —
//! the alternative, jumping above the tie group, acts on nothing at all when scores saturate at
//! 1.0. If `n·r < 1` the window cannot express the rate and the largest score is the threshold
//! (keep `min_samples ≥ 1/r`). [`exact_threshold`] computes this exactly and is the test oracle.
//!
//! # Mapping scores to HdrHistogram records, and accuracy
//!
//! Each route declares a score range `[lo, hi]` (probabilities `[0, 1]`, logits e.g.
//! `[-20, 20]`). A score `s` is clamped into the range (counted as out of range if it was
//! outside) and recorded as the integer
//!
//! ```text
//! v = 1 + round((hi − s) / (hi − lo) · 10⁹)        (1 ≤ v ≤ 10⁹ + 1)
//! ```
//!
//! in a histogram with 3 significant digits. `v` measures the distance from the top of the range,
//! and HdrHistogram's precision is relative to `v`, so scores near `hi` — where thresholds for rare
//! actions sit (spam at p ≈ 0.999…) — get the finest absolute precision. With 3 significant
//! digits HdrHistogram uses 2048 sub-buckets: values below 2048 are exact and a bucket holding `v`
//! is at most `v/1024` wide. The estimator reports the top (highest score) of the bucket that holds
//! the `a`-th largest score. With `u = (hi − lo)·10⁻⁹` (one record unit in score units) and `t` the
//! exact threshold of the same window contents:
//!
//! ```text
//! −u/2  ≤  t̂ − t  ≤  (hi − t)/1024 + u          (up to f64 rounding)
//! ```
//!
//! so `|t̂ − t| ≤ (hi − t)/1024 + 10⁻⁹·(hi − lo)`, and the estimate errs upward (slightly fewer
//! actions), never more than half a unit downward. Examples: probabilities at `t = 0.5`:
//! `4.9·10⁻⁴`; `t = 0.99`: `9.8·10⁻⁶`; `t = 0.999999`: `2·10⁻⁹`. Logits in `[-20, 20]` at
//! `t = 10`: `0.0098`; `t = 0`: `0.020`; `t = −10`: `0.029`. If the threshold falls among clamped
//! scores the estimate is `lo` or `hi`.
//!
//! # Window, memory and concurrency
//!
//! The window is a ring of `buckets + 1` sub-window histograms, each covering `window / buckets`
//! (sub-window `k` holds scores with `k = ⌊(now − created) / (window / buckets)⌋`). The window at
//! `now` is the current sub-window and the `buckets − 1` before it, so it spans between
//! `window − window/buckets` and `window` of history. The extra slot is the next one to be used:
//! `update` clears expired slots, so when it runs at least once per sub-window `observe` never
//! pays for clearing a histogram. Memory per threshold: `buckets + 2` histograms (ring plus
//! update scratch) of 21 504 `u64` counters each (≈ 168 KiB), fixed at construction.
//!
//! `observe` takes only the mutex of the current sub-window: a counter increment with no
//! allocation. `update` takes each slot's mutex in turn to merge it (a scan or copy of one
//! histogram, some microseconds), so an `observe` can wait that long once per update.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Record units per score range: 10⁹ steps between `hi` and `lo`.
const UNITS: f64 = 1e9;
/// Largest record value: `1 + UNITS`.
const V_MAX: u64 = 1_000_000_001;
/// Significant digits of every histogram (relative bucket width ≤ 1/1024).
const SIGFIG: u8 = 3;
/// Relative allowance when flooring `n·r`, so that e.g. `100 × 0.29` counts as 29 although the
/// f64 product is 28.999….
const FLOOR_ALLOWANCE: f64 = 1e-12;

/// Settings of an adaptive threshold.
///
/// The caller validates them: `min ≤ initial ≤ max`, `0 < target_rate < 1`, `buckets ≥ 1`,
/// `window > 0`, `max_step > 0`, `lo < hi`, all finite except `max_step`, which may be
/// infinite (no rate limit). Settings outside these never cause a panic, but the threshold they
/// produce is unspecified (a zero `window` or `buckets` is treated as 1 ns / 1 bucket).
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptiveThresholdParams {
    /// Fraction of scores that should be `≥` the threshold, in (0, 1).
    pub target_rate: f64,
    /// The sliding window the quantile is taken over.
    pub window: Duration,
    /// Number of sub-windows the window is divided into (expiry granularity).
    pub buckets: u32,
    /// Threshold published until `min_samples` scores have been in the window.
    pub initial: f64,
    /// Lowest threshold ever published.
    pub min: f64,
    /// Highest threshold ever published.
    pub max: f64,
    /// Largest move of the published threshold per update.
    pub max_step: f64,
    /// How often [`AdaptiveThreshold::update_if_due`] recomputes the threshold.
    pub update_interval: Duration,
    /// Scores needed in the window before the threshold is recomputed.
    pub min_samples: u64,
    /// `(lo, hi)`: the range scores are clamped to; precision is finest near `hi`.
    pub score_range: (f64, f64),
}

/// One sub-window of the ring.
struct Slot {
    /// Which sub-window (since `origin`) the counts belong to.
    epoch: u64,
    hist: Histogram<u64>,
}

/// One adaptive threshold: shared by all requests of a route (Arc), updated by a background ticker.
pub struct AdaptiveThreshold {
    params: AdaptiveThresholdParams,
    /// Clamp range and mapping constants, derived once from `params.score_range`.
    lo: f64,
    hi: f64,
    /// Record units per score unit, and score units per record unit.
    units_per_score: f64,
    score_per_unit: f64,
    /// Sub-window `k` covers `[origin + k·bucket_nanos, origin + (k+1)·bucket_nanos)`.
    origin: Instant,
    bucket_nanos: u64,
    /// Sub-windows in the window (`params.buckets`, at least 1).
    window_buckets: u64,
    /// `window_buckets + 1` slots, indexed by `epoch % len`.
    ring: Box<[Mutex<Slot>]>,
    /// Merge target for `update`; its mutex also serializes updates.
    scratch: Mutex<Histogram<u64>>,
    /// The threshold in force, as f64 bits.
    published: AtomicU64,
    warmed: AtomicBool,
    ignored: AtomicU64,
    out_of_range: AtomicU64,
    /// When `update_if_due` last recomputed.
    last_update: Mutex<Instant>,
}

impl fmt::Debug for AdaptiveThreshold {
    // The histograms are large; show the state an operator cares about.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveThreshold")
            .field("params", &self.params)
            .field("current", &self.current())
            .field("warmed_up", &self.warmed_up())
            .field("ignored", &self.ignored())
            .field("out_of_range", &self.out_of_range())
            .finish_non_exhaustive()
    }
}

impl AdaptiveThreshold {
    /// A threshold publishing `params.initial` (clamped to `[min, max]`), with an empty window
    /// whose sub-windows are aligned to `now`. Allocates all its memory here.
    pub fn new(params: AdaptiveThresholdParams, now: Instant) -> Self {
        let (lo, hi) = params.score_range;
        let span = hi - lo;
        let window_buckets = u64::from(params.buckets.max(1));
        let bucket_nanos = u64::try_from(params.window.as_nanos() / u128::from(window_buckets))
            .unwrap_or(u64::MAX)
            .max(1);
        let empty = empty_histogram();
        let ring = (0..=window_buckets)
            .map(|_| {
                Mutex::new(Slot {
                    epoch: 0,
                    hist: empty.clone(),
                })
            })
            .collect();
        let initial = clamp(params.initial, params.min, params.max);
        Self {
            lo,
            hi,
            units_per_score: UNITS / span,
            score_per_unit: span / UNITS,
            origin: now,
            bucket_nanos,
            window_buckets,
            ring,
            scratch: Mutex::new(empty),
            published: AtomicU64::new(initial.to_bits()),
            warmed: AtomicBool::new(false),
            ignored: AtomicU64::new(0),
            out_of_range: AtomicU64::new(0),
            last_update: Mutex::new(now),
            params,
        }
    }

    /// The settings this threshold was built with (to tell whether a reloaded policy changed it).
    pub fn params(&self) -> &AdaptiveThresholdParams {
        &self.params
    }

    /// Hot path: counts one score (NaN/inf ignored and counted).
    ///
    /// Scores outside the configured range are clamped into it and counted as out of range.
    /// `now` should be roughly monotonic; a score stamped more than a window before the newest
    /// data in its slot has already expired and is dropped.
    pub fn observe(&self, score: f64, now: Instant) {
        self.observe_all(&[score], now);
    }

    /// Hot path: [`observe`](Self::observe) for a batch's scores, all at `now`, under one lock
    /// (a 400-row batch took 400 locks).
    pub fn observe_all(&self, scores: &[f64], now: Instant) {
        let epoch = self.epoch(now);
        let Some(slot) = self.ring.get(self.slot_index(epoch)) else {
            return; // unreachable: the index is reduced modulo the ring length
        };
        let mut slot = lock(slot);
        // A whole window older than the data already here: expired on arrival (still counted
        // below when not finite or out of range).
        let expired = slot.epoch > epoch;
        if slot.epoch != epoch && !expired {
            // Normally already cleared by `update`; then this is just the epoch change.
            if !slot.hist.is_empty() {
                slot.hist.reset();
            }
            slot.epoch = epoch;
        }
        for &score in scores {
            if !score.is_finite() {
                self.ignored.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let s = if score < self.lo || score > self.hi {
                self.out_of_range.fetch_add(1, Ordering::Relaxed);
                clamp(score, self.lo, self.hi)
            } else {
                score
            };
            if !expired {
                // Cannot fail: the score is clamped into the histogram's range.
                let _ = slot.hist.record(self.record_of(s));
            }
        }
    }

    /// Hot path: the threshold in force.
    pub fn current(&self) -> f64 {
        f64::from_bits(self.published.load(Ordering::Relaxed))
    }

    /// Off the hot path: recompute the window's (1 − target_rate) quantile, move the published threshold toward it by at most max_step, clamp to [min, max], publish and return it. With fewer than min_samples scores in the window, keeps the current value (the initial one until warm-up ends).
    ///
    /// An empty window (no scores for longer than the window) also keeps the current value: a
    /// quiet route resumes with the threshold it had, since silence says nothing about how its
    /// scores are distributed. Also clears expired sub-windows so `observe` need not.
    pub fn update(&self, now: Instant) -> f64 {
        let mut scratch = lock(&self.scratch);
        let n = self.merge_window(&mut scratch, self.epoch(now));
        let current = self.current();
        if n == 0 || n < self.params.min_samples {
            return current;
        }
        self.warmed.store(true, Ordering::Relaxed);
        let Some(quantile) = self.quantile(&scratch) else {
            return current;
        };
        let next = step_toward(current, quantile, &self.params);
        self.published.store(next.to_bits(), Ordering::Relaxed);
        next
    }

    /// Off the hot path: [`update`](Self::update) when `update_interval` has passed since the
    /// last time it ran here.
    pub fn update_if_due(&self, now: Instant) {
        let mut last = lock(&self.last_update);
        if now.saturating_duration_since(*last) >= self.params.update_interval {
            *last = now;
            self.update(now);
        }
    }

    /// Scores in the window now (for metrics and warm-up).
    pub fn samples(&self, now: Instant) -> u64 {
        let epoch = self.epoch(now);
        self.ring
            .iter()
            .map(|slot| {
                let slot = lock(slot);
                if self.in_window(slot.epoch, epoch) {
                    slot.hist.len()
                } else {
                    0
                }
            })
            .fold(0u64, u64::saturating_add)
    }

    /// Whether warm-up is over (min_samples reached at least once).
    pub fn warmed_up(&self) -> bool {
        self.warmed.load(Ordering::Relaxed)
    }

    /// Scores ignored as NaN or ±inf (never recorded).
    pub fn ignored(&self) -> u64 {
        self.ignored.load(Ordering::Relaxed)
    }

    /// Scores outside `score_range`, recorded as the nearest end of the range.
    pub fn out_of_range(&self) -> u64 {
        self.out_of_range.load(Ordering::Relaxed)
    }

    /// The record for a score already clamped into `[lo, hi]`: distance from `hi` in units.
    fn record_of(&self, s: f64) -> u64 {
        let units = ((self.hi - s) * self.units_per_score).round();
        // `as` saturates (and maps NaN to 0); with the clamp any config gives a recordable value.
        (units as u64).saturating_add(1).min(V_MAX)
    }

    /// The score a record value stands for (inverse of `record_of`).
    fn score_of_record(&self, v: u64) -> f64 {
        let s = self.hi - v.saturating_sub(1) as f64 * self.score_per_unit;
        clamp(s, self.lo, self.hi)
    }

    fn epoch(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.origin);
        u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX) / self.bucket_nanos
    }

    fn slot_index(&self, epoch: u64) -> usize {
        // The remainder is below the ring length, a usize.
        (epoch % self.ring.len() as u64) as usize
    }

    /// Whether sub-window `slot_epoch` is inside the window ending in sub-window `now_epoch`.
    /// Slots newer than `now_epoch` (an `observe` racing ahead of the ticker's clock) count.
    fn in_window(&self, slot_epoch: u64, now_epoch: u64) -> bool {
        slot_epoch.saturating_add(self.window_buckets) > now_epoch
    }

    /// Merges the window into `scratch` and returns its count; clears expired slots.
    fn merge_window(&self, scratch: &mut Histogram<u64>, now_epoch: u64) -> u64 {
        scratch.reset();
        for slot in self.ring.iter() {
            let mut slot = lock(slot);
            if self.in_window(slot.epoch, now_epoch) {
                // Cannot fail: every histogram has the same bounds.
                let _ = scratch.add(&slot.hist);
            } else if !slot.hist.is_empty() {
                slot.hist.reset();
            }
        }
        scratch.len()
    }

    /// The threshold (see the module docs) over the merged window, as the top of its bucket.
    fn quantile(&self, hist: &Histogram<u64>) -> Option<f64> {
        let n = hist.len();
        if n == 0 {
            return None;
        }
        // Records ascend as scores descend: the a-th largest score is the a-th smallest record.
        let allowed = allowed_at_or_above(n, self.params.target_rate);
        let mut seen = 0u64;
        for bucket in hist.iter_recorded() {
            seen = seen.saturating_add(bucket.count_at_value());
            if seen >= allowed {
                let top = hist.lowest_equivalent(bucket.value_iterated_to());
                return Some(self.score_of_record(top));
            }
        }
        // Not reached (the counts sum to n ≥ allowed); the lowest score recorded is the answer.
        Some(self.score_of_record(hist.lowest_equivalent(hist.max())))
    }
}

/// The exact windowed quantile over a slice of scores: the test oracle, and the naive baseline
/// for benches. [`AdaptiveThreshold`] agrees with it within the accuracy stated in the module docs.
///
/// Precisely: NaN and ±inf scores are ignored; of the `n` remaining, let
/// `a = ⌊n·target_rate⌋` (with a 10⁻¹² relative allowance for f64 rounding) clamped to `[1, n]`.
/// Returns the `a`-th largest score — the score at 1-based ascending rank `n − a + 1`. With
/// distinct scores that is the smallest score `t` with at most a fraction `target_rate` of scores
/// `≥ t`; ties at `t` are all `≥ t`; if `n·target_rate < 1` it is the largest score. `None` if
/// no score is finite. Scores are not clamped to any range. O(n) time, allocates a copy.
pub fn exact_threshold(scores: &[f64], target_rate: f64) -> Option<f64> {
    let mut finite: Vec<f64> = scores.iter().copied().filter(|s| s.is_finite()).collect();
    let n = finite.len() as u64;
    if n == 0 {
        return None;
    }
    let rank = n - allowed_at_or_above(n, target_rate);
    let (_, t, _) = finite.select_nth_unstable_by(rank as usize, f64::total_cmp);
    Some(*t)
}

/// `⌊n·r⌋` clamped to `[1, n]`: how many of `n` scores may be at or above the threshold.
fn allowed_at_or_above(n: u64, r: f64) -> u64 {
    let x = n as f64 * r;
    let a = (x + x.abs() * FLOOR_ALLOWANCE).floor();
    // `as` saturates and maps NaN to 0.
    (a as u64).clamp(1, n.max(1))
}

/// Moves `current` toward `target` (clamped to `[min, max]`) by at most `max_step`.
fn step_toward(current: f64, target: f64, params: &AdaptiveThresholdParams) -> f64 {
    let target = clamp(target, params.min, params.max);
    let delta = target - current;
    let next = if delta.abs() <= params.max_step {
        target
    } else if delta > 0.0 {
        current + params.max_step
    } else {
        current - params.max_step
    };
    clamp(next, params.min, params.max)
}

/// Clamp that never panics (`f64::clamp` does when `min > max` or either is NaN).
fn clamp(x: f64, min: f64, max: f64) -> f64 {
    x.max(min).min(max)
}

/// A poisoned lock only means another thread panicked mid-update of plain counters; keep going.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn empty_histogram() -> Histogram<u64> {
    // Constant bounds (1 ≤ 10⁹ + 1, 3 digits) that HdrHistogram accepts; the tests build one.
    Histogram::new_with_bounds(1, V_MAX, SIGFIG).expect("constant histogram bounds are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seeded generator, so the tests are repeatable.
    struct Rng(fastrand::Rng);

    impl Rng {
        fn new(seed: u64) -> Self {
            Self(fastrand::Rng::with_seed(seed))
        }

        /// Uniform in [0, 1).
        fn unit(&mut self) -> f64 {
            self.0.f64()
        }
    }

    fn params(target_rate: f64, range: (f64, f64)) -> AdaptiveThresholdParams {
        AdaptiveThresholdParams {
            target_rate,
            window: Duration::from_secs(300),
            buckets: 10,
            initial: range.0,
            min: range.0,
            max: range.1,
            max_step: f64::INFINITY,
            update_interval: Duration::from_secs(10),
            min_samples: 1,
            score_range: range,
        }
    }

    /// The stated accuracy: `(lower, upper)` bounds on `t̂ − t`, with f64 slack.
    fn error_bounds(range: (f64, f64), t: f64) -> (f64, f64) {
        let (lo, hi) = range;
        let unit = (hi - lo) / UNITS;
        let slack = 8.0 * f64::EPSILON * (hi.abs() + lo.abs()).max(1.0);
        (-unit / 2.0 - slack, (hi - t) / 1024.0 + unit + slack)
    }

    fn assert_within(range: (f64, f64), est: f64, exact: f64, what: &str) {
        let (below, above) = error_bounds(range, exact);
        let err = est - exact;
        assert!(
            err >= below && err <= above,
            "{what}: estimate {est} vs exact {exact}: error {err:e} outside [{below:e}, {above:e}]"
        );
    }

    #[test]
    fn histogram_bounds_and_size() {
        let h = empty_histogram();
        assert!(h.high() >= V_MAX);
        assert_eq!(h.distinct_values(), 21_504);
        let t = AdaptiveThreshold::new(params(0.1, (0.0, 1.0)), Instant::now());
        assert_eq!(t.ring.len(), 11);
    }

    #[test]
    fn threshold_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<AdaptiveThreshold>();
    }

    #[test]
    fn exact_threshold_definition() {
        let scores: Vec<f64> = (1..=100).map(f64::from).collect();
        // a = 2: the 2nd largest, exactly 2 scores ≥ it.
        assert_eq!(exact_threshold(&scores, 0.02), Some(99.0));
        assert_eq!(exact_threshold(&scores, 0.025), Some(99.0));
        // 100 × 0.29 is 28.999… in f64; still 29 allowed.
        assert_eq!(exact_threshold(&scores, 0.29), Some(72.0));
        assert_eq!(exact_threshold(&scores, 0.5), Some(51.0));
        // n·r < 1: the largest score.
        assert_eq!(exact_threshold(&scores, 0.001), Some(100.0));
        assert_eq!(exact_threshold(&scores, 0.999), Some(2.0));
        // Ties are not split.
        let tied = [0.1, 0.2, 1.0, 1.0, 1.0, 1.0];
        assert_eq!(exact_threshold(&tied, 0.2), Some(1.0));
        // Non-finite ignored; nothing finite → None; nonsense rates do not panic.
        assert_eq!(
            exact_threshold(&[f64::NAN, 3.0, f64::INFINITY], 0.5),
            Some(3.0)
        );
        assert_eq!(exact_threshold(&[f64::NAN, f64::NEG_INFINITY], 0.5), None);
        assert_eq!(exact_threshold(&[], 0.5), None);
        assert_eq!(exact_threshold(&scores, f64::NAN), Some(100.0));
        assert_eq!(exact_threshold(&scores, -1.0), Some(100.0));
        assert_eq!(exact_threshold(&scores, 7.0), Some(1.0));
    }

    /// The stated worst-case error, one score at a time, across the range and very close to `hi`.
    #[test]
    fn mapping_error_within_stated_bound() {
        let now = Instant::now();
        for range in [(0.0, 1.0), (-20.0, 20.0), (-1e-3, 5e-3)] {
            let (lo, hi) = range;
            let mut points: Vec<f64> = (0..=20_000)
                .map(|i| lo + (hi - lo) * f64::from(i) / 20_000.0)
                .collect();
            for k in 1..=12 {
                let d = (hi - lo) * 10f64.powi(-k);
                points.extend([hi - d, hi - 1.37 * d, hi - 3.9 * d, lo + d]);
            }
            // Every point through the estimator's arithmetic: record, bucket, top of bucket.
            let t = AdaptiveThreshold::new(params(0.5, range), now);
            let hist = empty_histogram();
            let mut worst = 0.0f64;
            for &s in &points {
                let bucket = hist.highest_equivalent(t.record_of(s));
                let est = t.score_of_record(hist.lowest_equivalent(bucket));
                assert_within(range, est, s, &format!("range {range:?}"));
                let (_, above) = error_bounds(range, s);
                worst = worst.max((est - s).abs() / above);
            }
            println!("range {range:?}: worst error / stated bound = {worst:.3}");
            // The bound is tight to within a small factor.
            assert!(worst > 0.5, "range {range:?}: worst error/bound {worst}");
            // Some of them through the public path, one score per window.
            let mut cfg = params(0.5, range);
            cfg.buckets = 1;
            for &s in points.iter().step_by(97) {
                let t = AdaptiveThreshold::new(cfg.clone(), now);
                t.observe(s, now);
                assert_within(range, t.update(now), s, &format!("range {range:?}"));
            }
        }
    }

    fn check_against_oracle(name: &str, range: (f64, f64), scores: &[f64]) {
        let now = Instant::now();
        for r in [0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.001, 0.0001] {
            let t = AdaptiveThreshold::new(params(r, range), now);
            // Spread over the window's sub-windows.
            for (i, &s) in scores.iter().enumerate() {
                t.observe(s, now + Duration::from_millis(i as u64 % 290_000));
            }
            let at = now + Duration::from_secs(295);
            assert_eq!(t.samples(at), scores.len() as u64);
            let est = t.update(at);
            let exact = exact_threshold(scores, r).unwrap_or(f64::NAN);
            assert_within(range, est, exact, &format!("{name} r={r}"));
        }
    }

    #[test]
    fn agrees_with_exact_uniform_probabilities() {
        let mut rng = Rng::new(1);
        let scores: Vec<f64> = (0..60_000).map(|_| rng.unit()).collect();
        check_against_oracle("uniform", (0.0, 1.0), &scores);
    }

    #[test]
    fn agrees_with_exact_skewed_probabilities() {
        // Spam-like: 80% ham piled near 0, 20% spam piled very near 1 (1 − u⁸ reaches 1 − 10⁻⁸),
        // where a 1 − p mapping matters most.
        let mut rng = Rng::new(2);
        let scores: Vec<f64> = (0..60_000)
            .map(|_| {
                let u = rng.unit();
                if rng.unit() < 0.8 {
                    u.powi(8)
                } else {
                    1.0 - u.powi(8)
                }
            })
            .collect();
        check_against_oracle("skewed", (0.0, 1.0), &scores);
        // Beta(5, 1)-like as well: max of five uniforms.
        let scores: Vec<f64> = (0..60_000)
            .map(|_| (0..5).map(|_| rng.unit()).fold(0.0, f64::max))
            .collect();
        check_against_oracle("beta(5,1)", (0.0, 1.0), &scores);
    }

    #[test]
    fn agrees_with_exact_logits() {
        // Roughly normal logits (Irwin–Hall), mean −4, sd 5, clipped to the range.
        let mut rng = Rng::new(3);
        let scores: Vec<f64> = (0..60_000)
            .map(|_| {
                let z = (0..12).map(|_| rng.unit()).sum::<f64>() - 6.0;
                (z * 5.0 - 4.0).clamp(-20.0, 20.0)
            })
            .collect();
        check_against_oracle("logits", (-20.0, 20.0), &scores);
    }

    #[test]
    fn agrees_with_exact_after_partial_expiry() {
        let now = Instant::now();
        let range = (0.0, 1.0);
        let t = AdaptiveThreshold::new(params(0.05, range), now);
        let mut rng = Rng::new(4);
        let old: Vec<f64> = (0..5_000).map(|_| rng.unit().powi(3)).collect();
        let new: Vec<f64> = (0..5_000).map(|_| rng.unit().sqrt()).collect();
        for &s in &old {
            t.observe(s, now); // sub-window 0
        }
        for &s in &new {
            t.observe(s, now + Duration::from_secs(150)); // sub-window 5
        }
        let mut both = old.clone();
        both.extend_from_slice(&new);
        let at = now + Duration::from_secs(299);
        assert_eq!(t.samples(at), 10_000);
        let est = t.update(at);
        assert_within(range, est, exact_threshold(&both, 0.05).unwrap(), "both");
        // Sub-window 10 starts at 300 s: sub-window 0 has left the window.
        let at = now + Duration::from_secs(300);
        assert_eq!(t.samples(at), 5_000);
        let est = t.update(at);
        assert_within(range, est, exact_threshold(&new, 0.05).unwrap(), "new only");
    }

    /// Scores for the replay: a spam filter whose score distribution shifts at 20 minutes.
    fn replay_score(rng: &mut Rng, shifted: bool) -> f64 {
        let u = rng.unit();
        if !shifted {
            // 8% spam in [0.6, 1], piled toward 1: the 98% quantile is 0.975.
            if rng.unit() < 0.08 {
                1.0 - 0.4 * u * u
            } else {
                0.6 * u * u * u
            }
        } else {
            // Drift: 15% spam, less confident (≤ 0.9): the 98% quantile is about 0.876.
            if rng.unit() < 0.15 {
                0.9 - 0.5 * u.powf(1.5)
            } else {
                0.7 * u * u
            }
        }
    }

    struct Stretch {
        start_min: u64,
        rate: f64,
        /// Mean |rate − r| over the stretch's 10-second update intervals.
        interval_mad: f64,
    }

    fn replay(seed: u64, target: f64) -> Vec<Stretch> {
        const PER_SECOND: u64 = 300;
        const MINUTES: u64 = 40;
        let start = Instant::now();
        let cfg = AdaptiveThresholdParams {
            target_rate: target,
            window: Duration::from_secs(300),
            buckets: 10,
            initial: 0.9,
            min: 0.5,
            max: 0.999,
            max_step: 0.01,
            update_interval: Duration::from_secs(10),
            min_samples: 1_000,
            score_range: (0.0, 1.0),
        };
        let t = AdaptiveThreshold::new(cfg, start);
        let mut rng = Rng::new(seed);
        let mut stretches = Vec::new();
        let (mut acted, mut total) = (0u64, 0u64);
        let (mut i_acted, mut i_total, mut mad_sum, mut intervals) = (0u64, 0u64, 0.0, 0u32);
        for second in 0..MINUTES * 60 {
            for k in 0..PER_SECOND {
                let now = start
                    + Duration::from_secs(second)
                    + Duration::from_nanos(k * 1_000_000_000 / PER_SECOND);
                let s = replay_score(&mut rng, second >= 20 * 60);
                // The threshold in force when the score arrives.
                let hit = u64::from(s >= t.current());
                t.observe(s, now);
                acted += hit;
                i_acted += hit;
                total += 1;
                i_total += 1;
            }
            if (second + 1) % 10 == 0 {
                t.update(start + Duration::from_secs(second + 1));
                mad_sum += (i_acted as f64 / i_total as f64 - target).abs();
                intervals += 1;
                (i_acted, i_total) = (0, 0);
            }
            if (second + 1) % 300 == 0 {
                stretches.push(Stretch {
                    start_min: (second + 1) / 60 - 5,
                    rate: acted as f64 / total as f64,
                    interval_mad: mad_sum / f64::from(intervals),
                });
                (acted, total, mad_sum, intervals) = (0, 0, 0.0, 0);
            }
        }
        assert!(t.warmed_up());
        stretches
    }

    /// Holds the rate through a distribution shift. Stated tolerance: over every 5-minute stretch
    /// that starts a full window after the start or the shift, |rate − r| ≤ 0.15·r (sampling
    /// noise alone is about 0.023·r per stretch at 90 000 scores).
    #[test]
    fn holds_target_rate_through_shift() {
        let target = 0.02;
        let mut steady_devs = Vec::new();
        for seed in [11, 12, 13] {
            println!(
                "seed {seed}: minute, realized rate, |rate − r|/r, mean |rate − r|/r per 10 s"
            );
            for s in replay(seed, target) {
                let dev = (s.rate - target).abs();
                let steady = s.start_min >= 5 && !(20..25).contains(&s.start_min);
                println!(
                    "  {:>2}-{:<2} {:.5} {:>6.3} {:>6.3}{}",
                    s.start_min,
                    s.start_min + 5,
                    s.rate,
                    dev / target,
                    s.interval_mad / target,
                    if steady { "" } else { "  (window filling)" }
                );
                if steady {
                    assert!(
                        dev <= 0.15 * target,
                        "seed {seed}, minutes {}..{}: rate {} vs target {target}",
                        s.start_min,
                        s.start_min + 5,
                        s.rate
                    );
                    steady_devs.push((dev, s.interval_mad));
                }
            }
        }
        let n = steady_devs.len() as f64;
        let stretch_mad = steady_devs.iter().map(|d| d.0).sum::<f64>() / n;
        let interval_mad = steady_devs.iter().map(|d| d.1).sum::<f64>() / n;
        println!(
            "tracking error (steady stretches): mean |rate − r| = {stretch_mad:.5} ({:.1}% of r) \
             per 5 min, {interval_mad:.5} ({:.1}% of r) per 10 s",
            100.0 * stretch_mad / target,
            100.0 * interval_mad / target
        );
    }

    #[test]
    fn min_max_and_max_step_respected() {
        let now = Instant::now();
        let cfg = AdaptiveThresholdParams {
            target_rate: 0.1,
            window: Duration::from_secs(60),
            buckets: 6,
            initial: 0.5,
            min: 0.3,
            max: 0.7,
            max_step: 0.05,
            update_interval: Duration::from_secs(10),
            min_samples: 10,
            score_range: (0.0, 1.0),
        };
        let t = AdaptiveThreshold::new(cfg, now);
        let mut rng = Rng::new(5);
        let mut last = t.current();
        let mut clock = now;
        let mut seen_max = false;
        let mut seen_min = false;
        // Quantile far above max (scores near 1), then far below min (near 0), then back.
        for phase in [0.99, 0.01, 0.99] {
            for _ in 0..30 {
                for _ in 0..200 {
                    t.observe(phase + (rng.unit() - 0.5) * 0.01, clock);
                }
                clock += Duration::from_secs(10);
                let next = t.update(clock);
                assert_eq!(next, t.current());
                assert!((0.3..=0.7).contains(&next), "published {next}");
                assert!((next - last).abs() <= 0.05 + 1e-12, "{last} → {next}");
                seen_max |= next == 0.7;
                seen_min |= next == 0.3;
                last = next;
            }
        }
        assert!(seen_max && seen_min);
    }

    #[test]
    fn sudden_shift_moves_at_most_max_step_per_update() {
        let now = Instant::now();
        let mut cfg = params(0.05, (0.0, 1.0));
        cfg.max_step = 0.02;
        cfg.initial = 0.5;
        cfg.window = Duration::from_secs(10);
        let t = AdaptiveThreshold::new(cfg, now);
        for _ in 0..100 {
            t.observe(0.5, now);
        }
        let first = t.update(now);
        assert!((first - 0.5).abs() < 1e-3, "{first}");
        // The old scores expire and the window's quantile jumps to 1.0 at once.
        let later = now + Duration::from_secs(20);
        for _ in 0..100 {
            t.observe(1.0, later);
        }
        let mut last = first;
        for i in 1..=30 {
            let next = t.update(later);
            let expected = (first + 0.02 * f64::from(i)).min(1.0);
            assert!(
                (next - expected).abs() < 1e-9,
                "update {i}: {next} vs {expected}"
            );
            assert!(next - last <= 0.02 + 1e-12, "{last} → {next}");
            last = next;
        }
        assert_eq!(last, 1.0);
    }

    #[test]
    fn warm_up_then_window_expiry_holds_last_value() {
        let now = Instant::now();
        let mut cfg = params(0.1, (0.0, 1.0));
        cfg.initial = 0.8;
        cfg.min_samples = 100;
        cfg.window = Duration::from_secs(60);
        cfg.buckets = 6;
        let t = AdaptiveThreshold::new(cfg, now);
        assert_eq!(t.current(), 0.8);
        assert!(!t.warmed_up());
        for i in 0..99 {
            t.observe(f64::from(i) / 1000.0, now);
        }
        assert_eq!(t.samples(now), 99);
        assert_eq!(t.update(now), 0.8, "initial value until min_samples");
        assert!(!t.warmed_up());
        t.observe(0.099, now);
        let warmed = t.update(now);
        assert!(t.warmed_up());
        assert!((warmed - 0.090).abs() < 1e-3, "{warmed}");
        // Nothing for longer than the window: empty, last value held, still warmed up.
        let idle = now + Duration::from_secs(61);
        assert_eq!(t.samples(idle), 0);
        assert_eq!(t.update(idle), warmed);
        assert_eq!(t.current(), warmed);
        assert!(t.warmed_up());
        // Resuming: held until min_samples again, then adapts.
        for _ in 0..50 {
            t.observe(0.5, idle);
        }
        assert_eq!(t.update(idle), warmed);
        for _ in 0..50 {
            t.observe(0.5, idle);
        }
        assert!((t.update(idle) - 0.5).abs() < 1e-3);
    }

    #[test]
    fn window_spans_buckets_sub_windows() {
        let now = Instant::now();
        let mut cfg = params(0.5, (0.0, 1.0));
        cfg.window = Duration::from_secs(60);
        cfg.buckets = 6;
        let t = AdaptiveThreshold::new(cfg, now);
        t.observe(0.5, now + Duration::from_secs(5));
        for (secs, expected) in [(5, 1), (59, 1), (60, 0), (600, 0)] {
            assert_eq!(
                t.samples(now + Duration::from_secs(secs)),
                expected,
                "{secs} s"
            );
        }
        // A score stamped more than a window behind newer data in its slot is dropped.
        let t = AdaptiveThreshold::new(t.params().clone(), now);
        assert_eq!(t.ring.len(), 7);
        t.observe(0.5, now + Duration::from_secs(70)); // sub-window 7, slot 0
        t.observe(0.5, now); // sub-window 0, slot 0: already expired
        assert_eq!(t.samples(now + Duration::from_secs(70)), 1);
        // Instants before creation count as the first sub-window.
        let later = Instant::now() + Duration::from_secs(1);
        let t = AdaptiveThreshold::new(t.params().clone(), later);
        t.observe(0.5, now);
        assert_eq!(t.samples(later), 1);
    }

    #[test]
    fn update_clears_expired_slots_off_the_hot_path() {
        let now = Instant::now();
        let mut cfg = params(0.5, (0.0, 1.0));
        cfg.window = Duration::from_secs(60);
        cfg.buckets = 6;
        let t = AdaptiveThreshold::new(cfg, now);
        t.observe(0.5, now);
        t.update(now + Duration::from_secs(60));
        let slot = lock(&t.ring[0]);
        assert!(slot.hist.is_empty());
    }

    #[test]
    fn non_finite_ignored_out_of_range_clamped_extremes_safe() {
        let now = Instant::now();
        let t = AdaptiveThreshold::new(params(0.5, (0.0, 1.0)), now);
        for s in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -f64::NAN] {
            t.observe(s, now);
        }
        assert_eq!(t.ignored(), 4);
        assert_eq!(t.samples(now), 0);
        assert_eq!(t.out_of_range(), 0);
        for s in [
            f64::MAX,
            -f64::MAX,
            1.5,
            -0.5,
            1.0 + f64::EPSILON,
            -f64::MIN_POSITIVE,
        ] {
            t.observe(s, now);
        }
        assert_eq!(t.out_of_range(), 6);
        // In range, not counted: -0.0, subnormals, the ends.
        for s in [
            -0.0,
            0.0,
            f64::MIN_POSITIVE / 4.0,
            5e-324,
            1.0,
            1.0 - f64::EPSILON,
        ] {
            t.observe(s, now);
        }
        assert_eq!(t.out_of_range(), 6);
        assert_eq!(t.ignored(), 4);
        assert_eq!(t.samples(now), 12);
        let v = t.update(now);
        assert!(v.is_finite() && (0.0..=1.0).contains(&v));
        // Clamped scores sit at the ends: all-high gives hi, all-low gives lo (within accuracy).
        let t = AdaptiveThreshold::new(params(0.5, (0.0, 1.0)), now);
        t.observe(f64::MAX, now);
        assert_eq!(t.update(now), 1.0);
        let t = AdaptiveThreshold::new(params(0.5, (0.0, 1.0)), now);
        t.observe(-f64::MAX, now);
        assert_within((0.0, 1.0), t.update(now), 0.0, "all below range");
        // A far-future instant does not overflow.
        let t = AdaptiveThreshold::new(params(0.5, (-20.0, 20.0)), now);
        let far = now + Duration::from_secs(1 << 40);
        t.observe(3.0, far);
        assert_eq!(t.samples(far), 1);
        assert!((t.update(far) - 3.0).abs() < 0.02);
    }

    #[test]
    fn nonsense_config_does_not_panic() {
        let now = Instant::now();
        let cfg = AdaptiveThresholdParams {
            target_rate: f64::NAN,
            window: Duration::ZERO,
            buckets: 0,
            initial: f64::NAN,
            min: 2.0,
            max: 1.0,
            max_step: -1.0,
            update_interval: Duration::ZERO,
            min_samples: 0,
            score_range: (1.0, 1.0),
        };
        for range in [(1.0, 1.0), (0.0, 1e-300), (-f64::MAX, f64::MAX), (1.0, 0.0)] {
            let t = AdaptiveThreshold::new(
                AdaptiveThresholdParams {
                    score_range: range,
                    ..cfg.clone()
                },
                now,
            );
            for s in [0.0, 1.0, 2.0, -3.0, 1e-301, f64::NAN] {
                t.observe(s, now + Duration::from_nanos(3));
            }
            let _ = t.update(now + Duration::from_secs(1));
            let _ = t.samples(now);
            let _ = format!("{t:?}");
        }
    }

    #[test]
    fn concurrent_observers_and_updater() {
        let now = Instant::now();
        let t = AdaptiveThreshold::new(params(0.1, (0.0, 1.0)), now);
        std::thread::scope(|scope| {
            for seed in 1..=2 {
                let t = &t;
                scope.spawn(move || {
                    let mut rng = Rng::new(seed);
                    for i in 0..50_000u64 {
                        t.observe(rng.unit(), now + Duration::from_micros(i * 100));
                    }
                });
            }
            scope.spawn(|| {
                for i in 0..50 {
                    t.update(now + Duration::from_millis(i * 100));
                }
            });
        });
        assert_eq!(t.samples(now + Duration::from_secs(5)), 100_000);
        let v = t.update(now + Duration::from_secs(5));
        assert!((v - 0.9).abs() < 0.01, "{v}");
    }
}
