//! Keeps the fleet limits' local budgets filled from Redis, off the request path, and says
//! when one counts per pod instead (degraded): a metric and a log line at each change.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::decide::fleet::redis::FleetRedis;
use crate::decide::fleet::REFILL_WANTED;
use crate::policy::SharedPolicy;
use crate::telemetry::{Metrics, ResultLabel, RouteAction};

/// How often each fleet limit's budget is checked and, if due, refilled.
pub(crate) const REFILL_TICK: Duration = Duration::from_millis(10);

/// Runs the refills until cancelled. `redis: None` (no `--redis-url`): every fleet limit
/// stays degraded, which this reports once per limit.
pub(crate) async fn run(
    policy: SharedPolicy,
    mut redis: Option<FleetRedis>,
    prefix: String,
    metrics: Arc<Metrics>,
) {
    let mut tick = tokio::time::interval(REFILL_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Each limit's last reported state, so the log says each change once.
    let mut reported: HashMap<RouteAction, bool> = HashMap::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = REFILL_WANTED.notified() => {}
        }
        let policy = policy.load_full();
        for route in &policy.routes.live {
            for limit in &route.limits {
                let Some(gate) = limit.window.fleet() else {
                    continue;
                };
                let mut error = None;
                if let Some(redis) = &mut redis {
                    // The window is in the key: two limits on one action never share a count.
                    let base = format!(
                        "{prefix}:{}:{}:{}",
                        route.name,
                        limit.spec.action,
                        limit.spec.window.as_millis()
                    );
                    let width = limit.window.bucket_width();
                    let buckets = limit.window.params().buckets;
                    let result = redis.refill(&base, gate, width, buckets).await;
                    let label = if result.is_ok() { "ok" } else { "error" };
                    metrics
                        .proxy
                        .fleet_refills
                        .get_or_create(&ResultLabel { result: label })
                        .inc();
                    error = result.err();
                }
                let degraded = gate.degraded();
                let key = RouteAction {
                    route: route.name.to_string(),
                    action: limit.spec.action.clone(),
                };
                metrics
                    .proxy
                    .fleet_limit_degraded
                    .get_or_create(&key)
                    .set(i64::from(degraded));
                let before = reported.insert(key, degraded);
                if before == Some(degraded) || (before.is_none() && !degraded) {
                    continue;
                }
                let share = gate.params().share();
                let (route, action) = (&route.name, &limit.spec.action);
                if !degraded {
                    tracing::info!(%route, %action, "fleet limit counting fleet-wide again (actions taken while degraded are added back)");
                } else if redis.is_none() {
                    tracing::warn!(%route, %action, share, "fleet limit degraded: no --redis-url, counting per pod against max_count / replicas");
                } else {
                    let error = error.map(|e| e.to_string()).unwrap_or_default();
                    tracing::warn!(%route, %action, share, %error, "fleet limit degraded: Redis unreachable, counting per pod against max_count / replicas");
                }
            }
        }
    }
}
