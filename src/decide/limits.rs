//! Action limits: how often one action (e.g. `spam`) may be taken on one route in a sliding
//! time window.
//!
//! A [`LimitWindow`] answers, for each decision whose model action is the limited action,
//! "would taking it now breach the limit?", records what the caller finally did, and reports
//! when a breach starts and ends so the caller can raise exactly one alert for each. What a
//! breach *does* (flag, fallback, reject) is the caller's business.
//!
//! # Semantics
//!
//! - **Decisions.** Every decision on the route counts as a decision (the denominator),
//!   whatever its action: limited-action decisions go through [`LimitWindow::decide`], all
//!   others through [`LimitWindow::record_other`].
//! - **`max_count`.** Taking the action breaches when `actions + 1 > max_count`, where
//!   `actions` is the count already in the window.
//! - **`max_fraction`.** Applies only once `decisions + 1 >= min_decisions` (this decision
//!   included); taking the action then breaches when `(actions + 1) / (decisions + 1) >
//!   max_fraction`, i.e. this decision is counted in both numerator and denominator. Because
//!   actions never exceed decisions, `max_fraction = 1.0` never breaches. A fraction of
//!   exactly the limit is allowed (the comparison is a correctly rounded division, so
//!   1 / 10 against 0.1 does not breach).
//! - **Both limits** may be set; the action breaches if either one does.
//! - **What is recorded** ([`Recorded`]): `Taken` counts as a decision and an action (the
//!   action was taken: no breach, or a breach with `flag`, so flagged actions count and keep
//!   the rate up); `NotTaken` counts as a decision only (`fallback`, and every decision of
//!   another action); `Rejected` counts as neither. A rejected decision is not an action
//!   taken, and since the request was refused with 429 the model's answer never reached the
//!   client, so it is not a decision either: a client retrying against a rejecting limit
//!   neither tightens nor loosens the fraction.
//! - **Sliding window.** The window is a ring of `buckets` time buckets of width
//!   `window / buckets`; counts are exact per bucket and expired buckets are cleared lazily
//!   when the window is next touched. The window is the current bucket plus the
//!   `buckets - 1` before it, so the edge has a granularity of one bucket: a decision stays
//!   counted for between `window - width` and `window` after it happened, and
//!   after `window` with no traffic every count is 0. (`window` is rounded down to a whole
//!   number of nanoseconds per bucket, at least 1 ns.)
//! - **Time.** `now` is passed in. Bucket 0 starts at the `now` given to
//!   [`LimitWindow::new`]; an instant earlier than the newest one seen (a racing thread, a
//!   slow caller) is counted in the newest bucket, so time never moves backwards.
//! - **Concurrency.** [`LimitWindow::decide`] checks and records in one short `Mutex`
//!   critical section, so concurrent requests cannot both slip under the same count: the
//!   count limit is exact under concurrency.
//! - **Breach state** (for alerts). The window enters breach at the first decision that
//!   breaches ([`Verdict::transition`] `Some(true)`). It leaves breach (`Some(false)`, from
//!   `decide`, `record_other` or `tick`) at the first check that
//!   1. finds a limited action would no longer breach, once at least one whole bucket has
//!      passed with no breaching decision (the last breaching decision's bucket is at least
//!      two buckets old), or
//!   2. comes after the last breaching decision has left the window (`buckets` buckets
//!      later), whatever the counts, so a breach always ends when the window has expired.
//!
//!   The hold in rule 1 keeps alerts from flapping: under steady pressure on a fraction,
//!   the rate sits at the limit and, without it, every few decisions would end a breach and
//!   the next limited action would start another. With it, a sustained breach is one start
//!   and one end. So [`Verdict::breach`] (this decision's answer) can be `false` while
//!   [`LimitWindow::in_breach`] (the alert state) is still `true`.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// The most buckets a window keeps; a larger [`LimitWindowParams::buckets`] is clamped to it
/// (policy validation should refuse it instead).
pub const MAX_BUCKETS: u32 = 65_536;

/// Buckets that must pass after the last breaching decision before a breach may end.
const BREACH_HOLD_BUCKETS: u64 = 2;

/// One action limit on one route.
#[derive(Clone, Debug, PartialEq)]
pub struct LimitWindowParams {
    /// Maximum fraction of the route's decisions that may take the action, in (0, 1].
    pub max_fraction: Option<f64>,
    /// Maximum number of actions in the window.
    pub max_count: Option<u64>,
    /// Length of the sliding window.
    pub window: Duration,
    /// Number of time buckets in the window (>= 1; 0 is treated as 1, more than
    /// [`MAX_BUCKETS`] as [`MAX_BUCKETS`]). The window edge moves one bucket at a time.
    pub buckets: u32,
    /// Decisions in the window (this one included) before `max_fraction` applies.
    pub min_decisions: u64,
}

impl LimitWindowParams {
    /// Whether taking the action now breaches, given the counts already in the window.
    fn breaches(&self, decisions: u64, actions: u64) -> bool {
        let actions = actions.saturating_add(1);
        let decisions = decisions.saturating_add(1);
        let count = self.max_count.is_some_and(|max| actions > max);
        // A NaN limit compares false, so it never breaches rather than always.
        let fraction = self.max_fraction.is_some_and(|max| {
            decisions >= self.min_decisions && actions as f64 / decisions as f64 > max
        });
        count || fraction
    }
}

/// What happened to a decision, as recorded in the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// The action was taken (no breach, or a flagged breach): a decision and an action.
    Taken,
    /// Another action was taken (a fallback, or a decision of another action): a decision.
    NotTaken,
    /// The request was refused (429): neither a decision nor an action.
    Rejected,
}

/// The answer for one decision whose model action is the limited one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Taking the action for this decision breaches the limit.
    pub breach: bool,
    /// Some(true) when this decision started a breach, Some(false) when it ended one.
    pub transition: Option<bool>,
}

/// Counts in one time bucket.
#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    decisions: u64,
    actions: u64,
}

/// Everything behind the lock.
#[derive(Debug)]
struct State {
    /// Bucket `i` lives in `ring[i % len]` while `i` is within the window.
    ring: Vec<Bucket>,
    /// The newest bucket index seen.
    head: u64,
    /// Totals over the ring, kept so a check is O(1).
    decisions: u64,
    actions: u64,
    in_breach: bool,
    /// Bucket index of the most recent breaching decision (meaningful while in breach).
    last_breach: u64,
}

impl State {
    fn len(&self) -> u64 {
        self.ring.len() as u64
    }

    /// Moves the head to bucket `index`, clearing the buckets that expire on the way, and
    /// returns the bucket now current (the head never moves back).
    fn advance(&mut self, index: u64) -> u64 {
        if index <= self.head {
            return self.head;
        }
        let len = self.len();
        if index - self.head >= len {
            self.ring.fill(Bucket::default());
            self.decisions = 0;
            self.actions = 0;
        } else {
            // At most len - 1 buckets to clear, so this stays short.
            for i in self.head + 1..=index {
                let slot = (i % len) as usize;
                if let Some(bucket) = self.ring.get_mut(slot) {
                    let old = std::mem::take(bucket);
                    self.decisions = self.decisions.saturating_sub(old.decisions);
                    self.actions = self.actions.saturating_sub(old.actions);
                }
            }
        }
        self.head = index;
        index
    }

    fn head_bucket(&mut self) -> Option<&mut Bucket> {
        let slot = (self.head % self.len()) as usize;
        self.ring.get_mut(slot)
    }

    fn record(&mut self, recorded: Recorded) {
        let (decisions, actions) = match recorded {
            Recorded::Taken => (1, 1),
            Recorded::NotTaken => (1, 0),
            Recorded::Rejected => return,
        };
        if let Some(bucket) = self.head_bucket() {
            bucket.decisions = bucket.decisions.saturating_add(decisions);
            bucket.actions = bucket.actions.saturating_add(actions);
        }
        self.decisions = self.decisions.saturating_add(decisions);
        self.actions = self.actions.saturating_add(actions);
    }

    /// Ends the breach if the rules in the module doc allow it; `passes` says whether a
    /// limited action would not breach now.
    fn try_end_breach(&mut self, passes: bool) -> Option<bool> {
        if !self.in_breach {
            return None;
        }
        let since = self.head.saturating_sub(self.last_breach);
        let hold = BREACH_HOLD_BUCKETS.min(self.len());
        if (passes && since >= hold) || since >= self.len() {
            self.in_breach = false;
            Some(false)
        } else {
            None
        }
    }
}

/// The sliding window of one action limit on one route, shared by all requests of the
/// route (`Send + Sync`; put it in an `Arc`).
#[derive(Debug)]
pub struct LimitWindow {
    params: LimitWindowParams,
    origin: Instant,
    width_nanos: u128,
    state: Mutex<State>,
}

impl LimitWindow {
    /// An empty window whose first bucket starts at `now`.
    pub fn new(params: LimitWindowParams, now: Instant) -> Self {
        let buckets = params.buckets.clamp(1, MAX_BUCKETS);
        let width_nanos = (params.window.as_nanos() / u128::from(buckets)).max(1);
        let state = State {
            ring: vec![Bucket::default(); buckets as usize],
            head: 0,
            decisions: 0,
            actions: 0,
            in_breach: false,
            last_breach: 0,
        };
        Self {
            params,
            origin: now,
            width_nanos,
            state: Mutex::new(state),
        }
    }

    /// The settings this window was built with (a reload whose limit is unchanged
    /// keeps the window; a changed one builds a new window).
    pub fn params(&self) -> &LimitWindowParams {
        &self.params
    }

    /// For a decision whose model action is the limited action: checks and records in one
    /// critical section. `on_breach` says what the caller will record if it breaches (Taken
    /// for flag, NotTaken for fallback, Rejected for reject); without a breach it records
    /// Taken.
    pub fn decide(&self, now: Instant, on_breach: Recorded) -> Verdict {
        let mut state = self.lock();
        state.advance(self.bucket_of(now));
        self.decide_locked(&mut state, on_breach)
    }

    /// For a decision of any other action on the route: counts it as a decision
    /// (NotTaken). Returns Some(false) if this ended a breach (the fraction fell back under
    /// the limit), else None.
    pub fn record_other(&self, now: Instant) -> Option<bool> {
        let mut state = self.lock();
        state.advance(self.bucket_of(now));
        self.record_other_locked(&mut state)
    }

    /// A whole batch in one critical section, rows in order: `true` for a row whose model
    /// action is the limited action, `false` for any other row. Returns one verdict per
    /// row (other rows never breach, but may end a breach), the same as calling
    /// [`decide`](Self::decide) or [`record_other`](Self::record_other) per row, except when
    /// `on_breach` is Rejected and some row breaches: then the whole request is refused,
    /// so none of its rows is recorded (the transitions still stand).
    pub fn decide_batch(&self, now: Instant, rows: &[bool], on_breach: Recorded) -> Vec<Verdict> {
        let mut state = self.lock();
        state.advance(self.bucket_of(now));
        // Every row lands in the head bucket, so saving it and the totals is enough to undo.
        let saved = (state.head_bucket().copied(), state.decisions, state.actions);
        let verdicts: Vec<Verdict> = rows
            .iter()
            .map(|&limited| {
                if limited {
                    self.decide_locked(&mut state, on_breach)
                } else {
                    Verdict {
                        breach: false,
                        transition: self.record_other_locked(&mut state),
                    }
                }
            })
            .collect();
        if on_breach == Recorded::Rejected && verdicts.iter().any(|v| v.breach) {
            let (bucket, decisions, actions) = saved;
            if let (Some(slot), Some(bucket)) = (state.head_bucket(), bucket) {
                *slot = bucket;
            }
            state.decisions = decisions;
            state.actions = actions;
        }
        verdicts
    }

    /// Current counts in the window: (decisions, actions).
    pub fn counts(&self, now: Instant) -> (u64, u64) {
        let mut state = self.lock();
        state.advance(self.bucket_of(now));
        (state.decisions, state.actions)
    }

    /// Whether the window is in breach (the alert state), as of the last call that took a
    /// `now`.
    pub fn in_breach(&self) -> bool {
        self.lock().in_breach
    }

    /// A periodic check (a background ticker calls it) so a breach ends even if no decision
    /// of this route arrives: returns Some(false) if the window expired enough to end the
    /// breach.
    pub fn tick(&self, now: Instant) -> Option<bool> {
        let mut state = self.lock();
        state.advance(self.bucket_of(now));
        let passes = !self.params.breaches(state.decisions, state.actions);
        state.try_end_breach(passes)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing under the lock panics, and the counts stay consistent if something did,
        // so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bucket_of(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(elapsed / self.width_nanos).unwrap_or(u64::MAX)
    }

    fn decide_locked(&self, state: &mut State, on_breach: Recorded) -> Verdict {
        let breach = self.params.breaches(state.decisions, state.actions);
        if breach {
            state.record(on_breach);
            state.last_breach = state.head;
            let started = !state.in_breach;
            state.in_breach = true;
            Verdict {
                breach,
                transition: started.then_some(true),
            }
        } else {
            state.record(Recorded::Taken);
            Verdict {
                breach,
                transition: state.try_end_breach(true),
            }
        }
    }

    fn record_other_locked(&self, state: &mut State) -> Option<bool> {
        state.record(Recorded::NotTaken);
        let passes = !self.params.breaches(state.decisions, state.actions);
        state.try_end_breach(passes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn count_limit(max: u64) -> LimitWindowParams {
        LimitWindowParams {
            max_fraction: None,
            max_count: Some(max),
            window: secs(60.0),
            buckets: 60,
            min_decisions: 0,
        }
    }

    fn fraction_limit(max: f64, min_decisions: u64) -> LimitWindowParams {
        LimitWindowParams {
            max_fraction: Some(max),
            max_count: None,
            window: secs(60.0),
            buckets: 60,
            min_decisions,
        }
    }

    #[test]
    fn count_limit_is_exact_and_a_batch_of_ten_gets_three() {
        let t0 = Instant::now();
        let w = LimitWindow::new(count_limit(3), t0);
        let ok = (0..10)
            .filter(|_| !w.decide(t0, Recorded::Rejected).breach)
            .count();
        assert_eq!(ok, 3);
        assert_eq!(w.counts(t0), (3, 3));

        // The same batch through decide_batch with fallback: rows 4..10 fall back.
        let w = LimitWindow::new(count_limit(3), t0);
        let verdicts = w.decide_batch(t0, &[true; 10], Recorded::NotTaken);
        let breaches: Vec<bool> = verdicts.iter().map(|v| v.breach).collect();
        assert_eq!(
            breaches,
            [false, false, false, true, true, true, true, true, true, true]
        );
        assert_eq!(verdicts[3].transition, Some(true));
        assert_eq!(w.counts(t0), (10, 3));
    }

    #[test]
    fn count_limit_is_exact_under_concurrency() {
        let t0 = Instant::now();
        for on_breach in [Recorded::NotTaken, Recorded::Rejected] {
            let w = LimitWindow::new(count_limit(5), t0);
            let ok: usize = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..8u32)
                    .map(|thread| {
                        let w = &w;
                        scope.spawn(move || {
                            // Instants spread over one window, never past it, so nothing
                            // expires and at most 5 may be taken in all.
                            (0..500u32)
                                .filter(|i| {
                                    let at = t0 + secs(f64::from((i * 8 + thread) % 59));
                                    !w.decide(at, on_breach).breach
                                })
                                .count()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
            });
            assert_eq!(ok, 5);
            assert_eq!(w.counts(t0 + secs(58.0)).1, 5);
            assert!(w.in_breach());
        }
    }

    #[test]
    fn fraction_waits_for_min_decisions() {
        let t0 = Instant::now();
        let w = LimitWindow::new(fraction_limit(0.5, 10), t0);
        // Nine decisions at a 100% action rate: under min_decisions, no breach.
        for _ in 0..9 {
            assert!(!w.decide(t0, Recorded::NotTaken).breach);
        }
        // The tenth counts itself: 10 decisions, 10/10 > 0.5.
        let v = w.decide(t0, Recorded::NotTaken);
        assert_eq!(
            v,
            Verdict {
                breach: true,
                transition: Some(true)
            }
        );
        assert_eq!(w.counts(t0), (10, 9));
        // Eight others: 18 decisions, 9 actions; one more action makes 10/19 > 0.5.
        for _ in 0..8 {
            assert_eq!(w.record_other(t0), None);
        }
        assert!(w.decide(t0, Recorded::NotTaken).breach);
        assert_eq!(w.counts(t0), (19, 9));
        // One more other: 20 decisions, 9 actions; 10/21 <= 0.5 passes.
        w.record_other(t0);
        assert!(!w.decide(t0, Recorded::NotTaken).breach);
        assert_eq!(w.counts(t0), (21, 10));
    }

    #[test]
    fn fraction_at_exactly_the_limit_does_not_breach() {
        let t0 = Instant::now();
        let w = LimitWindow::new(fraction_limit(0.1, 0), t0);
        for _ in 0..9 {
            w.record_other(t0);
        }
        // 1/10 is exactly 0.1.
        assert!(!w.decide(t0, Recorded::NotTaken).breach);
        // 2/11 > 0.1.
        assert!(w.decide(t0, Recorded::NotTaken).breach);
    }

    #[test]
    fn flag_counts_taken_fallback_not_taken_reject_neither() {
        let t0 = Instant::now();
        let cases = [
            (Recorded::Taken, (3, 3)),
            (Recorded::NotTaken, (3, 1)),
            (Recorded::Rejected, (1, 1)),
        ];
        for (on_breach, expected) in cases {
            let w = LimitWindow::new(count_limit(1), t0);
            assert!(!w.decide(t0, on_breach).breach);
            assert!(w.decide(t0, on_breach).breach);
            assert!(w.decide(t0, on_breach).breach);
            assert_eq!(w.counts(t0), expected, "{on_breach:?}");
        }
    }

    #[test]
    fn rejected_batch_records_none_of_its_rows() {
        let t0 = Instant::now();
        let w = LimitWindow::new(count_limit(2), t0);
        let verdicts = w.decide_batch(t0, &[true, false, true, true, false], Recorded::Rejected);
        let breaches: Vec<bool> = verdicts.iter().map(|v| v.breach).collect();
        assert_eq!(breaches, [false, false, false, true, false]);
        assert_eq!(verdicts[3].transition, Some(true));
        // The request was refused whole: nothing counted.
        assert_eq!(w.counts(t0), (0, 0));
        assert!(w.in_breach());
        // A batch that fits is recorded.
        let verdicts = w.decide_batch(t0, &[true, false], Recorded::Rejected);
        assert!(verdicts.iter().all(|v| !v.breach));
        assert_eq!(w.counts(t0), (2, 1));
    }

    #[test]
    fn window_expires_and_tick_ends_the_breach() {
        let t0 = Instant::now();
        let w = LimitWindow::new(count_limit(2), t0);
        for _ in 0..5 {
            w.decide(t0, Recorded::NotTaken);
        }
        assert!(w.in_breach());
        assert_eq!(w.tick(t0 + secs(30.0)), None);
        assert!(w.in_breach());
        // A full window later, with no traffic in between.
        assert_eq!(w.tick(t0 + secs(60.0)), Some(false));
        assert_eq!(w.counts(t0 + secs(60.0)), (0, 0));
        assert!(!w.in_breach());
        assert_eq!(w.tick(t0 + secs(61.0)), None);
    }

    #[test]
    fn tick_ends_a_breach_that_never_clears_once_the_window_has_passed() {
        // min_decisions 0 with a fraction under 1: even an empty window would breach on
        // the next action, so only the expiry rule can end it.
        let t0 = Instant::now();
        let w = LimitWindow::new(fraction_limit(0.5, 0), t0);
        assert!(w.decide(t0, Recorded::Rejected).breach);
        assert_eq!(w.tick(t0 + secs(59.0)), None);
        assert_eq!(w.tick(t0 + secs(60.0)), Some(false));
    }

    #[test]
    fn window_slides_one_bucket_at_a_time() {
        let t0 = Instant::now();
        let w = LimitWindow::new(count_limit(100), t0);
        // Bucket width is 1 s.
        w.decide(t0, Recorded::Taken); // bucket 0, at its very start
        w.decide(t0 + secs(0.5), Recorded::Taken); // bucket 0
        w.decide(t0 + secs(10.5), Recorded::Taken); // bucket 10
        w.record_other(t0 + secs(20.999)); // bucket 20
        assert_eq!(w.counts(t0 + secs(59.999)), (4, 3));
        // Bucket 60 replaces bucket 0: the decision at 0.5 s has been counted for 59.5 s,
        // the one at 0 s for exactly the window.
        assert_eq!(w.counts(t0 + secs(60.0)), (2, 1));
        assert_eq!(w.counts(t0 + secs(70.999)), (1, 0));
        assert_eq!(w.counts(t0 + secs(70.0)), (1, 0));
        assert_eq!(w.counts(t0 + secs(81.0)), (0, 0));
    }

    #[test]
    fn count_room_comes_back_as_buckets_expire() {
        let t0 = Instant::now();
        let w = LimitWindow::new(count_limit(2), t0);
        assert!(!w.decide(t0, Recorded::Rejected).breach);
        assert!(!w.decide(t0 + secs(30.0), Recorded::Rejected).breach);
        assert!(w.decide(t0 + secs(31.0), Recorded::Rejected).breach);
        assert!(w.decide(t0 + secs(59.9), Recorded::Rejected).breach);
        // The action at 0 s has left the window; the one at 30 s has not.
        let v = w.decide(t0 + secs(60.0), Recorded::Rejected);
        assert!(!v.breach);
        assert!(w.decide(t0 + secs(60.5), Recorded::Rejected).breach);
    }

    #[test]
    fn transitions_are_reported_once_each() {
        let t0 = Instant::now();
        let w = LimitWindow::new(count_limit(2), t0);
        let at = |s: f64| t0 + secs(s);
        let mut transitions = Vec::new();
        for s in 0..10 {
            let s = f64::from(s);
            transitions.extend(w.decide(at(s), Recorded::Rejected).transition);
            transitions.extend(w.record_other(at(s)));
            transitions.extend(w.tick(at(s + 0.5)));
        }
        assert_eq!(transitions, [true]);
        // No more traffic: room comes back when bucket 0 (one action) expires at 60 s.
        for s in 10..60 {
            assert_eq!(w.tick(at(f64::from(s))), None);
        }
        assert_eq!(w.tick(at(60.0)), Some(false));
        assert_eq!(w.tick(at(60.5)), None);
        // The room is used without a transition; the next breach is a new one.
        assert_eq!(
            w.decide(at(60.7), Recorded::Rejected),
            Verdict {
                breach: false,
                transition: None
            }
        );
        assert_eq!(
            w.decide(at(60.7), Recorded::Rejected).transition,
            Some(true)
        );
        assert_eq!(w.decide(at(60.7), Recorded::Rejected).transition, None);
    }

    #[test]
    fn sustained_fraction_pressure_is_one_breach_not_a_flapping_alert() {
        let t0 = Instant::now();
        let w = LimitWindow::new(fraction_limit(0.1, 20), t0);
        let mut transitions = Vec::new();
        let mut taken = 0u32;
        // 30 s at 20 decisions a second, one in five a spam, with fallback.
        for i in 0..600u32 {
            let at = t0 + Duration::from_millis(u64::from(i) * 50);
            if i % 5 == 0 {
                let v = w.decide(at, Recorded::NotTaken);
                taken += u32::from(!v.breach);
                transitions.extend(v.transition);
            } else {
                transitions.extend(w.record_other(at));
            }
        }
        assert_eq!(transitions, [true]);
        // The limit holds the taken rate near 10% (the model asked for 20%).
        let (decisions, actions) = w.counts(t0 + secs(29.99));
        assert_eq!(u64::from(taken), actions);
        assert!(actions * 10 <= decisions + 10, "{actions}/{decisions}");
        // Pressure stops: only other decisions. The breach ends once, when the hold has
        // passed and the fraction is back under the limit.
        for i in 600..800u32 {
            let at = t0 + Duration::from_millis(u64::from(i) * 50);
            transitions.extend(w.record_other(at));
        }
        assert_eq!(transitions, [true, false]);
    }

    #[test]
    fn record_other_ends_a_fraction_breach() {
        let t0 = Instant::now();
        let w = LimitWindow::new(fraction_limit(0.5, 4), t0);
        for _ in 0..3 {
            w.decide(t0, Recorded::Taken);
        }
        // 4/4 > 0.5, flagged: counts (4, 4).
        assert_eq!(w.decide(t0, Recorded::Taken).transition, Some(true));
        // Later (past the hold): 5/6, 5/7, 5/8, 5/9 breach; 5/10 passes.
        let later = t0 + secs(2.0);
        let ends: Vec<Option<bool>> = (0..6).map(|_| w.record_other(later)).collect();
        assert_eq!(ends, [None, None, None, None, Some(false), None]);
        assert_eq!(w.counts(later), (10, 4));
    }

    #[test]
    fn a_breach_does_not_end_within_the_hold() {
        let t0 = Instant::now();
        let w = LimitWindow::new(fraction_limit(0.5, 1), t0);
        // 1/1 > 0.5.
        assert!(w.decide(t0, Recorded::NotTaken).breach);
        assert!(w.in_breach());
        // Room in the same bucket: this decision passes, but the alert stays open.
        for _ in 0..4 {
            w.record_other(t0 + secs(0.5));
        }
        let v = w.decide(t0 + secs(0.5), Recorded::NotTaken);
        assert_eq!(
            v,
            Verdict {
                breach: false,
                transition: None
            }
        );
        assert!(w.in_breach());
        assert_eq!(w.tick(t0 + secs(1.5)), None);
        assert_eq!(w.tick(t0 + secs(2.0)), Some(false));
    }

    #[test]
    fn both_limits_at_once() {
        let t0 = Instant::now();
        let config = LimitWindowParams {
            max_fraction: Some(0.5),
            max_count: Some(3),
            window: secs(10.0),
            buckets: 10,
            min_decisions: 4,
        };
        let w = LimitWindow::new(config, t0);
        w.record_other(t0);
        // Fraction not yet in force (2 and 3 decisions): taken.
        assert!(!w.decide(t0, Recorded::NotTaken).breach);
        assert!(!w.decide(t0, Recorded::NotTaken).breach);
        // The fourth decision brings the fraction in: 3/4 > 0.5, though the count allows it.
        assert!(w.decide(t0, Recorded::NotTaken).breach);
        assert_eq!(w.counts(t0), (4, 2));
        // Plenty of other decisions: 3/25 and the third action fits the count.
        for _ in 0..20 {
            w.record_other(t0);
        }
        assert!(!w.decide(t0, Recorded::NotTaken).breach);
        // 4/26 is fine by the fraction, but a fourth action breaches the count.
        assert!(w.decide(t0, Recorded::NotTaken).breach);
        assert_eq!(w.counts(t0), (26, 3));
        // A window later the count has room and the fraction (1/1) is under min_decisions.
        assert!(!w.decide(t0 + secs(10.0), Recorded::NotTaken).breach);
    }

    #[test]
    fn fraction_of_one_never_breaches() {
        let t0 = Instant::now();
        let w = LimitWindow::new(fraction_limit(1.0, 0), t0);
        for i in 0..1000u32 {
            let at = t0 + Duration::from_millis(u64::from(i));
            assert!(!w.decide(at, Recorded::NotTaken).breach);
        }
        assert_eq!(w.counts(t0 + secs(1.0)), (1000, 1000));
        assert!(!w.in_breach());
    }

    #[test]
    fn odd_configs_and_backward_time_do_not_panic() {
        let t0 = Instant::now();
        let config = LimitWindowParams {
            max_fraction: Some(f64::NAN),
            max_count: None,
            window: Duration::ZERO,
            buckets: 0,
            min_decisions: 0,
        };
        let w = LimitWindow::new(config.clone(), t0 + secs(5.0));
        assert_eq!(w.params().buckets, 0);
        // Before the origin, and a NaN limit that never breaches.
        assert!(!w.decide(t0, Recorded::Taken).breach);
        assert_eq!(w.counts(t0), (1, 1));
        // One 1 ns bucket: a later instant empties it.
        assert_eq!(w.counts(t0 + secs(6.0)), (0, 0));

        // Time going backwards lands in the newest bucket.
        let w = LimitWindow::new(count_limit(10), t0);
        w.decide(t0 + secs(30.0), Recorded::Taken);
        w.decide(t0 + secs(1.0), Recorded::Taken);
        assert_eq!(w.counts(t0 + secs(89.9)), (2, 2));
        assert_eq!(w.counts(t0 + secs(90.0)), (0, 0));

        // A bucket index past u64 (1 ns buckets, 35 000 years on) saturates.
        let tiny = LimitWindowParams {
            max_count: Some(1),
            ..config
        };
        let w = LimitWindow::new(tiny, t0);
        let far = t0 + Duration::from_secs(1 << 40);
        assert!(!w.decide(far, Recorded::Taken).breach);
        assert!(w.decide(far, Recorded::Taken).breach);
        assert_eq!(w.counts(far + secs(1.0)), (2, 2));
    }
}
