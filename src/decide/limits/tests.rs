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
        fleet: None,
    }
}

fn fraction_limit(max: f64, min_decisions: u64) -> LimitWindowParams {
    LimitWindowParams {
        max_fraction: Some(max),
        max_count: None,
        window: secs(60.0),
        buckets: 60,
        min_decisions,
        fleet: None,
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
        fleet: None,
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
        fleet: None,
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
