//! The hot policy: what operators change live. This issue ships the built-in default (tee
//! everything, decide nothing); the policy file and its reload build on the same snapshot.

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderName;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The policy as written by an operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// What the tee records and how.
    #[serde(default)]
    pub tee: TeePolicy,
}

/// The tee's hot settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TeePolicy {
    /// Fraction of requests recorded, in [0, 1].
    pub sample_rate: f64,
    /// Header names whose values are replaced by `[redacted]` in records (case-insensitive).
    pub redact_headers: Vec<String>,
    /// Bytes of each body captured; longer bodies are recorded truncated. Never above the
    /// largest record (the settings' `max_record`).
    pub body_cap_bytes: u64,
    /// Off: bodies are not captured at all (sizes still are).
    pub capture_bodies: bool,
}

impl Default for TeePolicy {
    fn default() -> Self {
        TeePolicy {
            sample_rate: 1.0,
            redact_headers: [
                "authorization",
                "proxy-authorization",
                "cookie",
                "set-cookie",
            ]
            .map(String::from)
            .to_vec(),
            body_cap_bytes: 256 << 10,
            capture_bodies: true,
        }
    }
}

/// A validated policy ready for the request path: loaded once per request and carried.
#[derive(Debug)]
pub struct PolicySnapshot {
    pub policy: Policy,
    /// Content hash of the policy: the same text gives the same version on every pod.
    pub version: String,
    /// Reloads applied since start (0 = the policy loaded at start).
    pub generation: u64,
    /// `tee.redact_headers`, parsed once.
    pub redacted_headers: Vec<HeaderName>,
    /// `tee.body_cap_bytes`, clamped to what fits in a record.
    pub body_cap: usize,
}

impl PolicySnapshot {
    /// Builds the snapshot; `max_record_bytes` comes from the settings.
    pub fn new(policy: Policy, generation: u64, max_record_bytes: u64) -> Self {
        let canonical = serde_json::to_vec(&policy).expect("policy serializes");
        let digest = Sha256::digest(&canonical);
        let version = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        let redacted_headers = policy
            .tee
            .redact_headers
            .iter()
            .filter_map(|h| HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok())
            .collect();
        let body_cap = policy.tee.body_cap_bytes.min(max_record_bytes) as usize;
        PolicySnapshot {
            policy,
            version,
            generation,
            redacted_headers,
            body_cap,
        }
    }

    /// Whether this request is recorded (sampling).
    pub fn sampled(&self) -> bool {
        let rate = self.policy.tee.sample_rate;
        rate >= 1.0 || (rate > 0.0 && fastrand::f64() < rate)
    }
}

/// The policy in force: many readers, rare writers.
pub type SharedPolicy = Arc<ArcSwap<PolicySnapshot>>;

/// The shared handle holding the built-in default policy.
pub fn default_shared(max_record_bytes: u64) -> SharedPolicy {
    Arc::new(ArcSwap::from_pointee(PolicySnapshot::new(
        Policy::default(),
        0,
        max_record_bytes,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_a_stable_content_hash() {
        let a = PolicySnapshot::new(Policy::default(), 0, 1 << 20);
        let b = PolicySnapshot::new(Policy::default(), 3, 1 << 20);
        assert_eq!(a.version, b.version);
        assert_eq!(a.version.len(), 12);
        let mut p = Policy::default();
        p.tee.sample_rate = 0.5;
        assert_ne!(PolicySnapshot::new(p, 0, 1 << 20).version, a.version);
    }

    #[test]
    fn body_cap_never_exceeds_a_record() {
        let s = PolicySnapshot::new(Policy::default(), 0, 8192);
        assert_eq!(s.body_cap, 8192);
    }
}
