//! The score histogram: a batch of rows is counted under one lock, each row placed in its
//! bucket by arithmetic (the buckets are evenly spaced over the route's score range), so a
//! 400-row batch costs one lock and no search.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Buckets over the score range; one more (`+Inf`) holds scores above it.
const BUCKETS: usize = 20;

/// Scores of decided rows in [`BUCKETS`] equal buckets over `[lo, hi]` (a score below `lo`
/// counts in the first, one above `hi` only in `+Inf`). NaN and infinite scores are not
/// counted. Unconfigured (no range yet), it shows only `+Inf`.
#[derive(Clone, Debug, Default)]
pub struct ScoreHistogram {
    inner: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// `None` until [`ScoreHistogram::set_range`].
    layout: Option<Layout>,
    /// Per bucket, not cumulative; the last is `+Inf`.
    counts: [u64; BUCKETS + 1],
    sum: f64,
    count: u64,
}

/// The buckets over `[lo, hi]`, computed once per range: a row costs a multiply and a
/// comparison or two, no division.
#[derive(Debug)]
struct Layout {
    lo: f64,
    hi: f64,
    /// Buckets per score unit.
    scale: f64,
    /// Upper bounds; the last is exactly `hi`.
    bounds: [f64; BUCKETS],
}

impl Layout {
    fn new(lo: f64, hi: f64) -> Self {
        let mut bounds = [hi; BUCKETS];
        for (i, b) in bounds.iter_mut().enumerate().take(BUCKETS - 1) {
            *b = lo + (hi - lo) * (i + 1) as f64 / BUCKETS as f64;
        }
        Layout {
            lo,
            hi,
            scale: BUCKETS as f64 / (hi - lo),
            bounds,
        }
    }

    /// The first bucket whose bound is at or above `s` (`BUCKETS`: `+Inf`): estimated, then
    /// corrected for the rounding of the estimate.
    fn bucket(&self, s: f64) -> usize {
        let est = ((s - self.lo) * self.scale).ceil() - 1.0;
        // `as` saturates (and maps NaN to 0).
        let mut i = (est.max(0.0) as usize).min(BUCKETS);
        while i < BUCKETS && s > self.bounds[i] {
            i += 1;
        }
        while i > 0 && s <= self.bounds[i - 1] {
            i -= 1;
        }
        i
    }
}

impl ScoreHistogram {
    /// Sets the score range; a different range than the one in use starts the counts again
    /// (the buckets changed: Prometheus reads it as a counter reset).
    pub fn set_range(&self, lo: f64, hi: f64) {
        let mut s = self.lock();
        if s.layout.as_ref().is_none_or(|l| (l.lo, l.hi) != (lo, hi)) {
            *s = State {
                layout: Some(Layout::new(lo, hi)),
                ..State::default()
            };
        }
    }

    /// Counts a batch's scores under one lock.
    pub fn observe_all(&self, scores: impl Iterator<Item = f64>) {
        let mut guard = self.lock();
        let s = &mut *guard;
        let Some(layout) = &s.layout else {
            return;
        };
        for v in scores.filter(|v| v.is_finite()) {
            s.counts[layout.bucket(v)] += 1;
            s.sum += v;
            s.count += 1;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere mid-update of plain counters.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl TypedMetric for ScoreHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ScoreHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (buckets, sum, count) = {
            let s = self.lock();
            let bounds = s.layout.as_ref().map_or(&[][..], |l| &l.bounds[..]);
            let buckets: Vec<(f64, u64)> = bounds
                .iter()
                .copied()
                .chain([f64::INFINITY])
                .zip(s.counts)
                .collect();
            (buckets, s.sum, s.count)
        };
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposed(h: &ScoreHistogram) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("score", "", h.clone());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn scores_fall_in_the_bucket_whose_bound_is_at_or_above_them() {
        for (lo, hi) in [(0.0, 1.0), (-20.0, 20.0), (0.1, 0.7)] {
            let l = Layout::new(lo, hi);
            assert_eq!(l.bounds[BUCKETS - 1], hi);
            for (i, &b) in l.bounds.iter().enumerate() {
                assert_eq!(l.bucket(b), i, "{b} in [{lo}, {hi}]");
                let above = b + (hi - lo) * 1e-9;
                assert_eq!(l.bucket(above), i + 1, "{above}");
            }
            assert_eq!(l.bucket(lo - 5.0), 0);
            assert_eq!(l.bucket(hi + 1.0), BUCKETS);
        }
    }

    #[test]
    fn a_batch_is_counted_row_by_row_and_exposed_cumulatively() {
        let h = ScoreHistogram::default();
        h.observe_all([0.5].into_iter());
        assert!(exposed(&h).contains("score_count 0"), "no range: nothing");
        h.set_range(0.0, 1.0);
        let batch: Vec<f64> = (0..421).map(|i| f64::from(i) / 420.0).collect();
        h.observe_all(batch.iter().copied().chain([f64::NAN, f64::INFINITY, 1.5]));
        let text = exposed(&h);
        for line in [
            "score_count 422",
            // 0.0 ..= 0.05: rows 0..=21.
            r#"score_bucket{le="0.05"} 22"#,
            r#"score_bucket{le="0.5"} 211"#,
            r#"score_bucket{le="1.0"} 421"#,
            r#"score_bucket{le="+Inf"} 422"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
        let sum: f64 = batch.iter().sum::<f64>() + 1.5;
        let shown: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("score_sum "))
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert!((shown - sum).abs() < 1e-9, "{shown} vs {sum}");

        // The same range keeps the counts; another starts them again.
        h.set_range(0.0, 1.0);
        assert!(exposed(&h).contains("score_count 422"));
        h.set_range(-20.0, 20.0);
        let text = exposed(&h);
        assert!(text.contains("score_count 0"), "{text}");
        assert!(text.contains(r#"score_bucket{le="-18.0"} 0"#), "{text}");
    }
}
