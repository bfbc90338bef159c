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
    /// Finite scores observed, and those of them at or above the threshold in force when
    /// observed: the realized action rate, for operators to hold against `target_rate`.
    judged: AtomicU64,
    at_or_above: AtomicU64,
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
            judged: AtomicU64::new(0),
            at_or_above: AtomicU64::new(0),
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
        let threshold = self.current();
        let (mut judged, mut at_or_above) = (0, 0);
        for &score in scores {
            if !score.is_finite() {
                self.ignored.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            judged += 1;
            at_or_above += u64::from(score >= threshold);
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
        self.judged.fetch_add(judged, Ordering::Relaxed);
        self.at_or_above.fetch_add(at_or_above, Ordering::Relaxed);
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

    /// (finite scores observed, those of them at or above the threshold in force): their
    /// ratio is the realized action rate.
    pub fn realized(&self) -> (u64, u64) {
        (
            self.judged.load(Ordering::Relaxed),
            self.at_or_above.load(Ordering::Relaxed),
        )
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
mod tests;
