//! Fleet-scoped count limits (`scope: fleet`): one `max_count` shared by every replica,
//! counted in Redis without putting Redis on the request path.
//!
//! # Scheme
//!
//! Each pod holds a local token budget per fleet limit, leased from Redis in batches of
//! `lease` tokens by a background task ([`redis`]); the request path only touches the budget
//! under a short mutex ([`FleetGate::take`]) and never waits for the network.
//!
//! - **Redis keys.** One counter per wall-clock bucket (`window / 60` wide, aligned to the Unix
//!   epoch so every pod agrees), holding the tokens charged in that bucket; the fleet's count
//!   is the sum over the window's 60 buckets, so the window slides exactly as the pod-scoped
//!   limit's does (one bucket of granularity).
//! - **Leases.** Only a pod with traffic leases. A refill charges the pod's debt (below) and asks for `lease` more tokens; the
//!   script grants `min(ask, cap - used)` atomically. A leased token is charged in the bucket
//!   it was leased in and spent only there: at a bucket roll the unused budget is given back
//!   (so leased-but-unused tokens never make the count overshoot, they only hold it up).
//! - **Debt.** With its budget empty, a pod lets up to `lease` more actions through on credit
//!   while its refill is in flight, and charges them unconditionally at the next refill; once
//!   a refill is granted less than it asked (the fleet is at its cap) no credit is given until
//!   one is granted in full.
//!   That is the only overshoot while Redis answers: at most `lease` per pod, so at most
//!   `replicas × lease ≤ lease_fraction × cap` over the fleet (10% by default).
//! - **No stranded budget.** A pod that had to refuse marks the limit starved in Redis; every
//!   pod that sees the mark at its next refill gives its unused budget back, so a busy pod is
//!   not refused below the cap while an idle one sits on tokens (a pod with nothing due
//!   still checks every [`POLL_EVERY`] refill ticks).
//! - **Flagged actions.** An action taken past the limit (`on_breach: flag`) still counts:
//!   it is charged as debt, as the pod-scoped limit counts it.
//! - **Degraded.** When Redis cannot be reached (or no URL is set) the limit counts per pod
//!   against `cap / replicas` of the pod's own window ([`FleetGate::share`]); actions taken
//!   meanwhile are charged to Redis when it answers again (added back, in the bucket current
//!   then, at most `cap` of them).

pub mod redis;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Default `lease_fraction`: the fleet may overshoot the cap by at most this share of it.
pub const DEFAULT_LEASE_FRACTION: f64 = 0.1;

/// A pod with nothing due, or at the cap, still asks Redis once in this many plans: to see
/// a starved mark (and give its budget back), to lease what others gave back, and to notice
/// Redis gone even without traffic.
pub const POLL_EVERY: u32 = 10;

/// Woken (never waited on) by the request path when a budget runs low, so the refill task
/// runs at once instead of at its next tick: one per process, as the refill task is.
pub static REFILL_WANTED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// A fleet limit's settings (part of [`super::limits::LimitWindowParams`], so a change
/// builds a new window and gate).
#[derive(Clone, Debug, PartialEq)]
pub struct FleetParams {
    /// The fleet-wide `max_count`.
    pub cap: u64,
    /// Replicas expected; the degraded share is `cap / replicas`.
    pub replicas: u32,
    /// Tokens per lease (and the most one pod takes on credit).
    pub lease: u64,
}

impl FleetParams {
    /// Lease size so that `replicas` pods overshoot by at most `lease_fraction × cap`:
    /// `floor(cap × lease_fraction / replicas)`, at least 1.
    pub fn new(cap: u64, replicas: u32, lease_fraction: f64) -> FleetParams {
        let replicas = replicas.max(1);
        let lease = (cap as f64 * lease_fraction / f64::from(replicas)).floor();
        FleetParams {
            cap,
            replicas,
            lease: (lease as u64).max(1),
        }
    }

    /// The per-pod share used while degraded.
    pub fn share(&self) -> u64 {
        self.cap / u64::from(self.replicas)
    }
}

/// One refill: what a pod sends to Redis, built by [`FleetGate::plan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refill {
    /// The wall-clock bucket to charge.
    pub bucket: u64,
    /// Actions already taken on credit, charged unconditionally.
    pub charge: u64,
    /// Tokens asked for.
    pub ask: u64,
    /// Unused tokens given back: (bucket they were charged in, count).
    pub returns: Vec<(u64, u64)>,
    /// This pod refused an action since its last refill.
    pub starving: bool,
}

/// What Redis answered to a [`Refill`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Granted {
    pub tokens: u64,
    /// Some pod of the fleet is starving: give unused budget back.
    pub starved: bool,
}

#[derive(Debug, Default)]
struct GateState {
    bucket: u64,
    budget: u64,
    debt: u64,
    returns: Vec<(u64, u64)>,
    refused: bool,
    /// A take was tried since the last refill: only a pod with traffic leases.
    demand: bool,
    /// Plans in a row that found nothing due, while holding budget.
    quiet: u32,
    /// The last refill got less than it asked for: the fleet is at its cap, so no credit
    /// until a refill is granted in full.
    exhausted: bool,
}

/// A pod's side of one fleet limit: its leased budget and whether Redis is reachable.
#[derive(Debug)]
pub struct FleetGate {
    params: FleetParams,
    state: Mutex<GateState>,
    degraded: AtomicBool,
}

impl FleetGate {
    /// A gate with no budget, degraded until its first refill succeeds.
    pub fn new(params: FleetParams) -> FleetGate {
        FleetGate {
            params,
            state: Mutex::new(GateState::default()),
            degraded: AtomicBool::new(true),
        }
    }

    pub fn params(&self) -> &FleetParams {
        &self.params
    }

    /// Whether the limit counts per pod (Redis unreachable or not configured).
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// Takes one token for an action about to be taken in `bucket`: from the budget, else on
    /// credit (up to `lease`). `false`: the fleet cap is reached as far as this pod knows.
    pub fn take(&self, bucket: u64) -> bool {
        let mut st = self.lock();
        roll(&mut st, bucket);
        st.demand = true;
        if !st.exhausted && st.budget.saturating_mul(2) <= self.params.lease {
            REFILL_WANTED.notify_one();
        }
        if st.budget > 0 {
            st.budget -= 1;
            true
        } else if !st.exhausted && st.debt < self.params.lease {
            st.debt += 1;
            true
        } else {
            st.refused = true;
            false
        }
    }

    /// Whether a [`take`](Self::take) would succeed now (for ending a breach), taking nothing.
    pub fn would_pass(&self, bucket: u64) -> bool {
        let mut st = self.lock();
        roll(&mut st, bucket);
        st.budget > 0 || (!st.exhausted && st.debt < self.params.lease)
    }

    /// Counts an action taken without a token (flagged past the cap, or while degraded).
    pub fn charge(&self) {
        let mut st = self.lock();
        st.debt = st.debt.saturating_add(1);
    }

    /// Undoes a [`take`](Self::take) or [`charge`](Self::charge) whose action was not taken
    /// after all (a batch refused whole).
    pub fn give_back(&self, n: u64) {
        let mut st = self.lock();
        let from_debt = n.min(st.debt);
        st.debt -= from_debt;
        st.budget += n - from_debt;
    }

    /// The refill due now, if any: debt to charge, budget to give back, a budget at or below
    /// half a lease, or a degraded gate (to try Redis again). What it carries is taken out of the gate; [`apply`](Self::apply) or
    /// [`failed`](Self::failed) must follow.
    pub fn plan(&self, bucket: u64) -> Option<Refill> {
        let mut st = self.lock();
        roll(&mut st, bucket);
        let lease = self.params.lease;
        let wants = st.demand && st.budget.saturating_mul(2) <= lease;
        // While degraded every tick tries Redis, so counting goes back to fleet-wide as soon
        // as it answers. At the cap, or quiet, a gate only polls now and then: asking a full
        // fleet at every refused action would cost a call per action.
        let due =
            (wants && !st.exhausted) || st.debt > 0 || !st.returns.is_empty() || self.degraded();
        if !due && st.quiet < POLL_EVERY {
            st.quiet += 1;
            return None;
        }
        st.quiet = 0;
        st.demand = false;
        let ask = if wants { lease } else { 0 };
        // What was taken while degraded is added back, but never more than a whole cap.
        let charge = std::mem::take(&mut st.debt).min(self.params.cap);
        Some(Refill {
            bucket: st.bucket,
            charge,
            ask,
            returns: std::mem::take(&mut st.returns),
            starving: std::mem::take(&mut st.refused),
        })
    }

    /// Redis answered `refill`: the grant joins the budget (if the bucket has not rolled
    /// meanwhile) and the gate counts fleet-wide.
    pub fn apply(&self, refill: &Refill, granted: Granted) {
        let mut st = self.lock();
        if refill.ask > 0 {
            st.exhausted = granted.tokens < refill.ask;
        }
        if st.bucket == refill.bucket {
            st.budget += granted.tokens;
        } else {
            st.returns.push((refill.bucket, granted.tokens));
        }
        if granted.starved && !refill.starving && st.budget > 0 {
            let unused = std::mem::take(&mut st.budget);
            let bucket = st.bucket;
            st.returns.push((bucket, unused));
        }
        self.degraded.store(false, Ordering::Relaxed);
    }

    /// Redis did not answer `refill`: nothing of it happened, so its debt and returns go
    /// back into the gate, and the gate counts per pod until a refill succeeds. The budget is
    /// kept: it was charged in Redis and stays valid for its bucket.
    pub fn failed(&self, refill: Refill) {
        let mut st = self.lock();
        st.debt = st.debt.saturating_add(refill.charge);
        st.returns.extend(refill.returns);
        st.refused |= refill.starving;
        self.degraded.store(true, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        // Nothing under the lock panics; the counts stay usable if something did.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Moves the gate to `bucket`: a budget leased for an earlier bucket is given back, since a
/// token must be spent in the bucket it is charged in.
fn roll(st: &mut GateState, bucket: u64) {
    if bucket > st.bucket {
        if st.budget > 0 {
            let old = st.bucket;
            st.returns.push((old, std::mem::take(&mut st.budget)));
        }
        st.bucket = bucket;
    }
}

/// The wall-clock bucket of `now` for buckets `width` wide, counted from the Unix epoch so that
/// every pod (with synchronized clocks) agrees.
pub fn wall_bucket(now: SystemTime, width: Duration) -> u64 {
    let since = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let width = width.as_nanos().max(1);
    u64::try_from(since / width).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn granted(tokens: u64, starved: bool) -> Granted {
        Granted { tokens, starved }
    }

    fn gate(cap: u64, replicas: u32) -> FleetGate {
        FleetGate::new(FleetParams::new(cap, replicas, DEFAULT_LEASE_FRACTION))
    }

    #[test]
    fn lease_is_a_tenth_of_the_cap_over_the_replicas_and_at_least_one() {
        assert_eq!(FleetParams::new(300, 3, 0.1).lease, 10);
        assert_eq!(FleetParams::new(10, 3, 0.1).lease, 1);
        assert_eq!(FleetParams::new(1000, 0, 0.05).lease, 50);
        assert_eq!(FleetParams::new(100, 3, 0.1).share(), 33);
    }

    #[test]
    fn credit_is_bounded_by_one_lease_and_charged_at_the_next_refill() {
        let g = gate(300, 3);
        let taken = (0..20).filter(|_| g.take(7)).count();
        assert_eq!(
            taken, 10,
            "no budget yet: one lease on credit, then refused"
        );
        let r = g.plan(7).expect("debt and an empty budget need a refill");
        assert_eq!((r.bucket, r.charge, r.ask, r.starving), (7, 10, 10, true));
        g.apply(&r, granted(10, false));
        assert!(!g.degraded());
        assert_eq!(
            (0..20).filter(|_| g.take(7)).count(),
            20,
            "10 leased + 10 credit"
        );
        assert!(!g.take(7));
        // The fleet is full: a short grant stops the credit until a full one.
        let short = granted(3, false);
        let full = granted(10, false);
        let r = g.plan(7).unwrap();
        g.apply(&r, short);
        assert_eq!(
            (0..20).filter(|_| g.take(7)).count(),
            3,
            "no credit past the cap"
        );
        let polls: Vec<_> = (0..=POLL_EVERY).map(|_| g.plan(7)).collect();
        let (quiet, poll) = polls.split_at(POLL_EVERY as usize);
        assert!(quiet.iter().all(Option::is_none), "at the cap: only polls");
        let r = poll[0].clone().unwrap();
        assert!(r.starving);
        g.apply(&r, full);
        assert_eq!((0..30).filter(|_| g.take(7)).count(), 20);
    }

    #[test]
    fn unused_budget_goes_back_at_a_bucket_roll() {
        let g = gate(300, 3);
        let r = g.plan(1).unwrap();
        g.apply(&r, granted(10, false));
        assert!(g.take(1) && g.take(1));
        assert!(g.take(2), "a new bucket starts on credit");
        let r = g.plan(2).unwrap();
        assert_eq!(r.returns, vec![(1, 8)]);
        assert_eq!(r.charge, 1);
    }

    #[test]
    fn a_grant_for_a_bucket_that_rolled_meanwhile_is_returned() {
        let g = gate(300, 3);
        let r = g.plan(1).unwrap();
        assert!(g.take(2));
        g.apply(&r, granted(10, false));
        assert_eq!(g.plan(2).unwrap().returns, vec![(1, 10)]);
    }

    #[test]
    fn a_starved_fleet_gets_the_unused_budget_back() {
        let g = gate(300, 3);
        let r = g.plan(1).unwrap();
        g.apply(&r, granted(10, false));
        let r = g.plan(1);
        assert_eq!(r, None, "a full budget needs nothing");
        assert!(g.take(1));
        // Some other pod starves: this one hands back all it holds.
        for _ in 0..5 {
            assert!(g.take(1));
        }
        let r = g.plan(1).unwrap();
        g.apply(&r, granted(0, true));
        assert_eq!(g.plan(1).unwrap().returns, vec![(1, 4)]);
    }

    #[test]
    fn a_failed_refill_keeps_its_debt_and_degrades() {
        let g = gate(300, 3);
        assert!(g.degraded(), "degraded until Redis first answers");
        let r = g.plan(1).unwrap();
        g.apply(&r, granted(10, false));
        g.charge();
        g.charge();
        let r = g.plan(1).unwrap();
        assert_eq!(r.charge, 2);
        g.failed(r);
        assert!(g.degraded());
        g.give_back(1);
        assert_eq!(g.plan(1).unwrap().charge, 1, "undone from the debt first");
    }

    #[test]
    fn degraded_takings_added_back_are_capped_at_the_cap() {
        let g = gate(30, 3);
        for _ in 0..100 {
            g.charge();
        }
        assert_eq!(g.plan(1).unwrap().charge, 30);
    }

    #[test]
    fn only_traffic_leases_and_a_held_budget_polls_now_and_then() {
        let g = gate(300, 3);
        let nothing = granted(0, false);
        let r = g.plan(1).unwrap();
        assert_eq!(r.ask, 0, "a first probe, no traffic yet");
        g.apply(&r, nothing);
        assert_eq!(g.plan(1), None, "idle: nothing leased");
        for _ in 1..POLL_EVERY {
            assert_eq!(g.plan(1), None);
        }
        assert_eq!(g.plan(1).unwrap().ask, 0, "a poll");
        assert!(g.take(1));
        let r = g.plan(1).unwrap();
        assert_eq!((r.charge, r.ask), (1, 10));
        g.apply(&r, granted(10, false));
        for _ in 0..POLL_EVERY {
            assert_eq!(g.plan(1), None);
        }
        let poll = g.plan(1).unwrap();
        assert_eq!((poll.charge, poll.ask), (0, 0));
        g.apply(&poll, granted(0, true));
        assert_eq!(g.plan(1).unwrap().returns, vec![(1, 10)]);
    }

    #[test]
    fn wall_buckets_are_aligned_to_the_epoch() {
        let t = UNIX_EPOCH + Duration::from_secs(125);
        assert_eq!(wall_bucket(t, Duration::from_secs(60)), 2);
        assert_eq!(wall_bucket(UNIX_EPOCH, Duration::ZERO), 0);
    }
}
