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
//! - **Fleet scope** ([`LimitWindowParams::fleet`]): the count check goes to a
//!   [`FleetGate`] instead of this window's count (see [`super::fleet`]); the fraction, the
//!   decisions and the breach state stay per pod. While the gate is degraded the count check
//!   is this window's own count against the per-pod share.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use super::fleet::{wall_bucket, FleetGate, FleetParams};

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
    /// `Some`: the count is fleet-wide (its cap is this, not `max_count`).
    pub fleet: Option<FleetParams>,
}

impl LimitWindowParams {
    /// Whether taking the action now breaches the fraction, given the counts in the window.
    fn fraction_breaches(&self, decisions: u64, actions: u64) -> bool {
        let actions = actions.saturating_add(1);
        let decisions = decisions.saturating_add(1);
        // A NaN limit compares false, so it never breaches rather than always.
        self.max_fraction.is_some_and(|max| {
            decisions >= self.min_decisions && actions as f64 / decisions as f64 > max
        })
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
    /// `passes` (given the window's decisions and actions) is asked only when it matters: in
    /// breach and past the hold (for a fleet limit it reads the clock and locks the gate).
    fn try_end_breach(&mut self, passes: impl FnOnce(u64, u64) -> bool) -> Option<bool> {
        if !self.in_breach {
            return None;
        }
        let since = self.head.saturating_sub(self.last_breach);
        let hold = BREACH_HOLD_BUCKETS.min(self.len());
        if since >= self.len() || (since >= hold && passes(self.decisions, self.actions)) {
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
    /// The fleet-wide count, for a fleet limit.
    gate: Option<FleetGate>,
}

/// Who holds a limited action's count to its cap.
enum CountCheck<'a> {
    /// This window's own count, against the pod's `max_count` (`None`: no count limit) or a
    /// degraded fleet limit's per-pod share.
    Local(Option<u64>),
    /// The fleet gate, in this wall-clock bucket.
    Fleet(&'a FleetGate, u64),
}

/// How a limited action's count check came out.
enum Count {
    /// Under the count; `token`: a fleet token was taken for it.
    Passes {
        token: bool,
    },
    Breaches,
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
            origin: now,
            width_nanos,
            state: Mutex::new(state),
            gate: params.fleet.clone().map(FleetGate::new),
            params,
        }
    }

    /// The fleet gate of a fleet limit (its background refill needs it).
    pub fn fleet(&self) -> Option<&FleetGate> {
        self.gate.as_ref()
    }

    /// The width of one bucket.
    pub fn bucket_width(&self) -> Duration {
        Duration::from_nanos(u64::try_from(self.width_nanos).unwrap_or(u64::MAX))
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
        self.decide_locked(&mut state, on_breach, &mut 0, self.wall_now())
    }

    /// For a decision of any other action on the route: counts it as a decision
    /// (NotTaken). Returns Some(false) if this ended a breach (the fraction fell back under
    /// the limit), else None.
    pub fn record_other(&self, now: Instant) -> Option<bool> {
        let mut state = self.lock();
        state.advance(self.bucket_of(now));
        self.record_other_locked(&mut state, self.wall_now())
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
        let mut tokens = 0;
        // One clock read for the batch, as one `now` for the window.
        let wall = self.wall_now();
        let verdicts: Vec<Verdict> = rows
            .iter()
            .map(|&limited| {
                if limited {
                    self.decide_locked(&mut state, on_breach, &mut tokens, wall)
                } else {
                    Verdict {
                        breach: false,
                        transition: self.record_other_locked(&mut state, wall),
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
            if let Some(gate) = &self.gate {
                gate.give_back(tokens);
            }
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
        let wall = self.wall_now();
        state.try_end_breach(|decisions, actions| self.passes(decisions, actions, wall))
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

    /// The wall-clock bucket now, for a fleet limit (0, unread, for any other).
    fn wall_now(&self) -> u64 {
        match self.gate {
            Some(_) => wall_bucket(SystemTime::now(), self.bucket_width()),
            None => 0,
        }
    }

    /// Who checks the count now; `wall` from [`Self::wall_now`].
    fn count_check(&self, wall: u64) -> CountCheck<'_> {
        match &self.gate {
            None => CountCheck::Local(self.params.max_count),
            Some(gate) if gate.degraded() => CountCheck::Local(Some(gate.params().share())),
            Some(gate) => CountCheck::Fleet(gate, wall),
        }
    }

    /// The count check for a limited action about to be taken; a fleet limit that passes
    /// takes its token (or, degraded, is counted against the pod's share).
    fn count(&self, state: &State, wall: u64) -> Count {
        let actions = state.actions.saturating_add(1);
        match self.count_check(wall) {
            CountCheck::Local(Some(max)) if actions > max => Count::Breaches,
            CountCheck::Local(_) => Count::Passes { token: false },
            CountCheck::Fleet(gate, bucket) if gate.take(bucket) => Count::Passes { token: true },
            CountCheck::Fleet(..) => Count::Breaches,
        }
    }

    /// Whether a limited action would not breach given the window's `decisions` and
    /// `actions` (to end a breach), taking nothing.
    fn passes(&self, decisions: u64, actions: u64, wall: u64) -> bool {
        if self.params.fraction_breaches(decisions, actions) {
            return false;
        }
        let actions = actions.saturating_add(1);
        match self.count_check(wall) {
            CountCheck::Local(cap) => cap.is_none_or(|max| actions <= max),
            CountCheck::Fleet(gate, bucket) => gate.would_pass(bucket),
        }
    }

    /// `counted` adds one per action this call counted fleet-wide (to undo a refused batch).
    fn decide_locked(
        &self,
        state: &mut State,
        on_breach: Recorded,
        counted: &mut u64,
        wall: u64,
    ) -> Verdict {
        let count = if self
            .params
            .fraction_breaches(state.decisions, state.actions)
        {
            Count::Breaches
        } else {
            self.count(state, wall)
        };
        let breach = matches!(count, Count::Breaches);
        // A fleet limit counts every action taken: one without a token (flagged past the
        // limit, or taken while degraded) is charged to the fleet as debt.
        if let Some(gate) = &self.gate {
            let taken = !breach || on_breach == Recorded::Taken;
            if taken {
                if !matches!(count, Count::Passes { token: true }) {
                    gate.charge();
                }
                *counted += 1;
            }
        }
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
                transition: state.try_end_breach(|_, _| true),
            }
        }
    }

    fn record_other_locked(&self, state: &mut State, wall: u64) -> Option<bool> {
        state.record(Recorded::NotTaken);
        state.try_end_breach(|decisions, actions| self.passes(decisions, actions, wall))
    }
}

#[cfg(test)]
mod tests;
