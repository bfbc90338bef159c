//! The decision layers' per-request cost, each beside a naive baseline:
//! - the whole decision step on a v2 response (parse, extract, threshold, limit, re-serialize)
//!   against only parsing and re-serializing the same body;
//! - an adaptive threshold's hot path (observe + read) against recomputing the exact quantile
//!   of a window kept as a sorted vector;
//! - a limit check against a sliding window kept as a deque of timestamps, and a fleet
//!   (`scope: fleet`) count limit's local check.
//!
//! Run: `cargo bench --bench decide`.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use sluicegate::config::validate::parse;
use sluicegate::decide::extract::extract;
use sluicegate::decide::fleet::{wall_bucket, FleetParams, Granted};
use sluicegate::decide::limits::{LimitWindow, LimitWindowParams, Recorded};
use sluicegate::decide::threshold::{exact_threshold, AdaptiveThreshold, AdaptiveThresholdParams};
use sluicegate::decide::RouteTable;
use sluicegate::demo::{v2_request, StandInModel};

const POLICY: &str = r#"
routes:
  spam:
    match: {model: spam-filter}
    protocol: v2
    score: {output: predict_proba, column: 1}
    decision:
      binary:
        action: spam
        otherwise: ham
        threshold:
          adaptive: {target_rate: 0.02, window: 10m, initial: 0.9, min: 0.5, max: 0.995, max_step: 0.01}
    limits:
      - {action: spam, max_fraction: 0.05, window: 1m, min_decisions: 100, on_breach: fallback, fallback: ham}
"#;

fn decision_step(c: &mut Criterion) {
    let policy = parse(POLICY, 1 << 20).unwrap();
    let table = RouteTable::build(&policy, None, Instant::now());
    let route = table
        .route_for("/v2/models/spam-filter/infer")
        .unwrap()
        .clone();
    let req: serde_json::Value = serde_json::from_str(&v2_request(8, 1)).unwrap();
    let body = serde_json::to_vec(&StandInModel::infer_v2(&req).unwrap()).unwrap();
    let spec = route.spec.score.clone().unwrap();

    let mut g = c.benchmark_group("decision_step_v2_8_rows");
    g.bench_function("baseline_parse_and_reserialize", |b| {
        b.iter(|| {
            let v: serde_json::Value = serde_json::from_slice(black_box(&body)).unwrap();
            black_box(serde_json::to_vec(&v).unwrap())
        })
    });
    g.bench_function("sluicegate_decide", |b| {
        b.iter(|| {
            let v: serde_json::Value = serde_json::from_slice(black_box(&body)).unwrap();
            let scores = extract(route.protocol(), &spec, route.classes(), &v).unwrap();
            let decided = route.decide(&scores, Instant::now());
            black_box(&decided.rows);
            black_box(serde_json::to_vec(&v).unwrap())
        })
    });
    g.finish();
}

fn threshold(c: &mut Criterion) {
    let config = AdaptiveThresholdParams {
        target_rate: 0.02,
        window: Duration::from_secs(600),
        buckets: 10,
        initial: 0.9,
        min: 0.5,
        max: 0.995,
        max_step: 0.01,
        update_interval: Duration::from_secs(10),
        min_samples: 100,
        score_range: (0.0, 1.0),
    };
    let now = Instant::now();
    let t = AdaptiveThreshold::new(config, now);
    let mut rng = fastrand::Rng::with_seed(7);
    let mut g = c.benchmark_group("threshold_per_score");
    g.bench_function("sluicegate_observe_and_read", |b| {
        b.iter(|| {
            t.observe(black_box(rng.f64()), now);
            black_box(t.current())
        })
    });
    // Naive: keep the last 10,000 scores and recompute the exact quantile for each request.
    let mut window: VecDeque<f64> = (0..10_000).map(|_| rng.f64()).collect();
    g.bench_function("baseline_exact_quantile_of_10k", |b| {
        b.iter(|| {
            window.pop_front();
            window.push_back(rng.f64());
            let v: Vec<f64> = window.iter().copied().collect();
            black_box(exact_threshold(&v, 0.02))
        })
    });
    g.finish();
}

fn limit(c: &mut Criterion) {
    let w = LimitWindow::new(
        LimitWindowParams {
            max_fraction: Some(0.05),
            max_count: None,
            window: Duration::from_secs(60),
            buckets: 60,
            min_decisions: 100,
            fleet: None,
        },
        Instant::now(),
    );
    let mut g = c.benchmark_group("limit_per_decision");
    g.bench_function("sluicegate_decide", |b| {
        b.iter(|| black_box(w.decide(Instant::now(), Recorded::NotTaken)))
    });
    // A fleet count limit in fleet mode, its budget leased: the request path's share of
    // `scope: fleet` (the Redis refill runs in the background, once per lease).
    let fleet = LimitWindow::new(
        LimitWindowParams {
            max_fraction: None,
            max_count: Some(u64::MAX / 2),
            fleet: Some(FleetParams::new(u64::MAX / 2, 1, 0.1)),
            ..w.params().clone()
        },
        Instant::now(),
    );
    if let Some(gate) = fleet.fleet() {
        let bucket = wall_bucket(SystemTime::now(), fleet.bucket_width());
        if let Some(refill) = gate.plan(bucket) {
            let tokens = u64::MAX / 4;
            gate.apply(
                &refill,
                Granted {
                    tokens,
                    starved: false,
                },
            );
        }
    }
    g.bench_function("sluicegate_decide_fleet", |b| {
        b.iter(|| black_box(fleet.decide(Instant::now(), Recorded::NotTaken)))
    });
    // Naive: a deque of (time, taken) pruned on every call, counted by a scan.
    let mut q: VecDeque<(Instant, bool)> = VecDeque::new();
    g.bench_function("baseline_timestamp_deque", |b| {
        b.iter(|| {
            let now = Instant::now();
            while q
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(60))
            {
                q.pop_front();
            }
            let taken = q.iter().filter(|(_, a)| *a).count();
            let breach = q.len() >= 100 && (taken + 1) as f64 / (q.len() + 1) as f64 > 0.05;
            q.push_back((now, !breach));
            if q.len() > 100_000 {
                q.pop_front();
            }
            black_box(breach)
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = decision_step, threshold, limit
}
criterion_main!(benches);
