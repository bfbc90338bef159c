//! Limit alerts: a record of their own (schema `sluicegate.alert.v1`) for each breach's start
//! and end, on the alerts topic (or in the spool beside the request records).

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::record::EncodeContext;
use super::spool::{EntryKind, SpoolEntry};
use crate::config::policy::LimitSpec;
use crate::decide::BreachEvent;

pub(crate) const ALERT_SCHEMA: &str = "sluicegate.alert.v1";

/// The fields of an alert that `audit` reads; the others are read past.
#[derive(Debug, Deserialize)]
pub(crate) struct AlertEvent {
    pub schema: String,
    pub time: String,
    pub route: String,
    /// `limit_breach_started` or `limit_breach_ended`.
    pub event: String,
}

/// One breach start or end.
#[derive(Debug)]
pub struct Alert {
    pub id: String,
    pub time: SystemTime,
    pub event: BreachEvent,
    pub policy_version: String,
    pub policy_generation: u64,
}

#[derive(Serialize)]
struct AlertView<'a> {
    schema: &'static str,
    id: &'a str,
    time: String,
    instance: &'a str,
    route: &'a str,
    event: &'static str,
    action: &'a str,
    on_breach: crate::config::policy::OnBreach,
    limit_index: usize,
    limit: &'a LimitSpec,
    window_decisions: u64,
    window_actions: u64,
    /// A fleet limit's mode at the event: true while it counts per pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet_degraded: Option<bool>,
    policy: PolicyView<'a>,
}

#[derive(Serialize)]
struct PolicyView<'a> {
    version: &'a str,
    generation: u64,
}

impl Alert {
    pub fn new(event: BreachEvent, policy_version: &str, policy_generation: u64) -> Self {
        Alert {
            id: uuid::Uuid::now_v7().to_string(),
            time: SystemTime::now(),
            event,
            policy_version: policy_version.to_owned(),
            policy_generation,
        }
    }

    pub fn event_name(&self) -> &'static str {
        if self.event.started {
            "limit_breach_started"
        } else {
            "limit_breach_ended"
        }
    }

    pub fn encode(&self, ctx: &EncodeContext) -> SpoolEntry {
        let e = &self.event;
        let view = AlertView {
            schema: ALERT_SCHEMA,
            id: &self.id,
            time: humantime::format_rfc3339_micros(self.time).to_string(),
            instance: &ctx.instance,
            route: &e.route,
            event: self.event_name(),
            action: &e.action,
            on_breach: e.on_breach,
            limit_index: e.limit_index,
            limit: &e.spec,
            window_decisions: e.decisions,
            window_actions: e.actions,
            fleet_degraded: e.fleet_degraded,
            policy: PolicyView {
                version: &self.policy_version,
                generation: self.policy_generation,
            },
        };
        SpoolEntry {
            kind: EntryKind::Alert,
            timestamp_ms: self
                .time
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
            key: self.id.clone(),
            route: e.route.to_string(),
            payload: serde_json::to_vec(&view).expect("alert serializes"),
        }
    }
}
