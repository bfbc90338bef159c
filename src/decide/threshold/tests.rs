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
        println!("seed {seed}: minute, realized rate, |rate − r|/r, mean |rate − r|/r per 10 s");
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
