//! The policy in force: the operator's policy ([`crate::config::policy`]) compiled for the
//! request path — routes with their threshold and limit state ([`crate::decide`]), tag keys
//! ([`crate::provenance`]) and what the tee needs of it ([`RecordContext`]). Swapped
//! atomically; a request loads one snapshot and keeps it to the end.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::HeaderName;

use crate::config::policy::{version_of, PolicySpec};
use crate::config::validate::{PolicyError, PolicyErrors};
use crate::decide::RouteTable;
use crate::provenance::{Algorithm, KeyRing};
use crate::tee::record::RecordContext;

/// A validated policy compiled for the request path: the runtime state of a [`PolicySpec`].
/// Each request loads one (a snapshot) and carries it to the end. The parsed tee settings are
/// read here from `record`, which builds them once.
#[derive(Debug)]
pub struct Policy {
    /// The policy as the operator wrote it.
    pub spec: PolicySpec,
    /// Content hash of the policy: the same policy gives the same version on every pod,
    /// whatever its comments or key order.
    pub version: String,
    /// Reloads applied since start (0 = the policy loaded at start).
    pub generation: u64,
    /// `tee.redact_headers`, parsed once (as in `record`).
    pub redacted_headers: Vec<HeaderName>,
    /// `tee.body_cap_bytes`, clamped to what fits in a record (as in `record`).
    pub body_cap: usize,
    /// The routes, compiled, with their threshold and limit state.
    pub routes: RouteTable,
    /// `consumers.header`, parsed once (as in `record`).
    pub consumer_header: HeaderName,
    /// What the tee reads of this policy; each exchange carries it to the writer thread.
    pub record: Arc<RecordContext>,
    /// Tag keys, read with this policy (a rotated Secret applies at the next reload).
    pub keys: Arc<KeyRing>,
    /// The key and algorithm that sign tags, when the policy tags.
    pub signer: Option<(String, Algorithm)>,
}

impl Policy {
    /// Compiles `spec`; `max_record_bytes` comes from the settings. State of thresholds and
    /// limits whose settings did not change is taken over from `previous`.
    pub fn new(
        spec: PolicySpec,
        generation: u64,
        max_record_bytes: u64,
        previous: Option<&Policy>,
    ) -> Self {
        let record = RecordContext::new(&spec, version_of(&spec), generation, max_record_bytes);
        let routes = RouteTable::build(&spec, previous.map(|p| &p.routes), Instant::now());
        Policy {
            spec,
            version: record.version.clone(),
            generation,
            redacted_headers: record.redacted_headers.clone(),
            body_cap: record.body_cap,
            routes,
            consumer_header: record.consumer_header.clone(),
            keys: record.keys.clone(),
            record: Arc::new(record),
            signer: None,
        }
    }

    /// Attaches the tag keys (checked beforehand by [`load_keys`]).
    pub fn with_keys(mut self, keys: Arc<KeyRing>) -> Self {
        self.signer = self.spec.tagging.as_ref().and_then(|t| {
            let alg = t.algorithm.parse::<Algorithm>().ok()?;
            keys.can_sign(&t.signing_key, alg)
                .then(|| (t.signing_key.clone(), alg))
        });
        // Not shared yet (the snapshot is being built): no copy is made.
        Arc::make_mut(&mut self.record).keys = keys.clone();
        self.keys = keys;
        self
    }

    /// Whether `consumer` is declared in the policy.
    pub fn declared(&self, consumer: &str) -> bool {
        self.spec.consumers.declared.iter().any(|d| d == consumer)
    }

    /// Whether this request is recorded (sampling).
    pub fn sampled(&self) -> bool {
        let rate = self.spec.tee.sample_rate;
        rate >= 1.0 || (rate > 0.0 && fastrand::f64() < rate)
    }
}

/// Loads the tag keys and checks that the policy's signing key can sign; the errors name the
/// policy key and the files.
pub fn load_keys(
    policy: &PolicySpec,
    dir: Option<&std::path::Path>,
) -> Result<Arc<KeyRing>, PolicyErrors> {
    let keys = match dir {
        Some(dir) => KeyRing::load_dir(dir).map_err(|errors| {
            PolicyErrors(
                errors
                    .into_iter()
                    .map(|e| PolicyError {
                        path: "tag keys".into(),
                        message: e.to_string(),
                    })
                    .collect(),
            )
        })?,
        None => KeyRing::default(),
    };
    if let Some(t) = &policy.tagging {
        let signs = t
            .algorithm
            .parse::<Algorithm>()
            .is_ok_and(|alg| keys.can_sign(&t.signing_key, alg));
        if !signs {
            let where_ = dir.map_or_else(
                || "no tag key directory is set (--tag-keys-dir)".to_owned(),
                |d| format!("in {}", d.display()),
            );
            return Err(PolicyErrors(vec![PolicyError {
                path: "tagging.signing_key".into(),
                message: format!(
                    "no {} key {:?} that can sign {where_}",
                    t.algorithm, t.signing_key
                ),
            }]));
        }
    }
    Ok(Arc::new(keys))
}

/// The policy in force: many readers, rare writers.
pub type SharedPolicy = Arc<ArcSwap<Policy>>;

/// The shared handle holding `policy` (the built-in default when none is given).
pub fn shared(policy: PolicySpec, max_record_bytes: u64) -> SharedPolicy {
    shared_with_keys(policy, max_record_bytes, Arc::new(KeyRing::default()))
}

/// The shared handle holding `policy`, with its tag keys.
pub fn shared_with_keys(
    policy: PolicySpec,
    max_record_bytes: u64,
    keys: Arc<KeyRing>,
) -> SharedPolicy {
    Arc::new(ArcSwap::from_pointee(
        Policy::new(policy, 0, max_record_bytes, None).with_keys(keys),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_a_stable_content_hash() {
        let a = Policy::new(PolicySpec::default(), 0, 1 << 20, None);
        let b = Policy::new(PolicySpec::default(), 3, 1 << 20, None);
        assert_eq!(a.version, b.version);
        assert_eq!(a.version.len(), 12);
        let mut p = PolicySpec::default();
        p.tee.sample_rate = 0.5;
        assert_ne!(Policy::new(p, 0, 1 << 20, None).version, a.version);
    }

    #[test]
    fn body_cap_never_exceeds_a_record() {
        let s = Policy::new(PolicySpec::default(), 0, 8192, None);
        assert_eq!(s.body_cap, 8192);
    }
}
