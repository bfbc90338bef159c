//! The hot policy: what operators change live — routes, score extraction, thresholds, limits,
//! consumers and the tee's settings. One YAML file, validated whole (`validate`), swapped
//! atomically; a request loads one snapshot and keeps it to the end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::HeaderName;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::decide::RouteTable;
use crate::provenance::{Algorithm, KeyRing};

/// The policy as written by an operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// What the tee records and how.
    #[serde(default)]
    pub tee: TeePolicy,
    /// Who may call, and how callers name themselves.
    #[serde(default)]
    pub consumers: ConsumersPolicy,
    /// Routes by stable name: the name carries threshold and limit state across reloads.
    #[serde(default)]
    pub routes: BTreeMap<String, Route>,
    /// Signed provenance tags on decided responses. Absent: responses are not tagged.
    #[serde(default)]
    pub tagging: Option<Tagging>,
}

/// How decided responses are tagged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tagging {
    /// `ed25519` (verifiers hold only the public key) or `hmac-sha256` (one shared secret).
    pub algorithm: String,
    /// The id of the key that signs: a file `<id>.ed25519` or `<id>.hmac` in the settings'
    /// tag key directory. Every key there verifies, so rotation is: add the new key, point
    /// this at it, remove the old key once its tags no longer matter.
    pub signing_key: String,
}

/// Exploration: with probability `epsilon` the action is drawn at random over the route's
/// actions instead of the thresholded one, and the record and tag say so, with the
/// propensity, so training can weight by inverse propensity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exploration {
    /// Probability of exploring, in [0, 1).
    pub epsilon: f64,
    /// A fixed seed makes the draws repeatable (tests, replays); absent, they are random.
    #[serde(default)]
    pub seed: Option<u64>,
}

/// The tee's hot settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TeePolicy {
    /// Fraction of requests recorded, in [0, 1].
    pub sample_rate: f64,
    /// Header names whose values are replaced by `[redacted]` in records (case-insensitive).
    pub redact_headers: Vec<String>,
    /// JSON pointers into request and response bodies whose values are replaced by `[redacted]`.
    pub redact_body: Vec<String>,
    /// JSON pointers whose values are replaced by `sha256:HEX` of their JSON text (joinable,
    /// not readable).
    pub hash_body: Vec<String>,
    /// Bytes of each body captured; longer bodies are recorded truncated. Never above the
    /// largest record (the settings' `max_record`).
    pub body_cap_bytes: u64,
    /// Off: bodies are not captured at all (sizes still are). Routes may override it.
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
                "x-api-key",
                "api-key",
                "x-amz-security-token",
            ]
            .map(String::from)
            .to_vec(),
            redact_body: Vec::new(),
            hash_body: Vec::new(),
            body_cap_bytes: 256 << 10,
            capture_bodies: true,
        }
    }
}

/// Callers identify themselves by a header; declared ones are listed here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumersPolicy {
    /// The header callers name themselves in.
    pub header: String,
    /// Declared consumers. Empty: nobody is declared (every caller counts as undeclared).
    pub declared: Vec<String>,
    /// What happens to a caller not in `declared`.
    pub undeclared: Undeclared,
}

impl Default for ConsumersPolicy {
    fn default() -> Self {
        ConsumersPolicy {
            header: "sluicegate-consumer".into(),
            declared: Vec::new(),
            undeclared: Undeclared::Record,
        }
    }
}

/// Treatment of undeclared consumers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Undeclared {
    /// Served, counted and recorded as undeclared.
    Record,
    /// Refused with 403.
    Refuse,
}

/// One route: which requests, how to read scores, how to decide, what to limit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Which requests this route takes.
    #[serde(rename = "match")]
    pub matcher: RouteMatch,
    /// The wire protocol, declared (never guessed from the body).
    pub protocol: Protocol,
    /// Where the scores are in the response. Required when the route decides.
    #[serde(default)]
    pub score: Option<ScoreSpec>,
    /// How scores become actions. Absent: the route only records.
    #[serde(default)]
    pub decision: Option<Decision>,
    /// Caps on how often an action is taken.
    #[serde(default)]
    pub limits: Vec<Limit>,
    /// Also write the decisions into the response body (always in headers).
    #[serde(default)]
    pub write_decisions: Option<WriteDecisions>,
    /// Overrides `tee.capture_bodies` for this route.
    #[serde(default)]
    pub capture_bodies: Option<bool>,
    /// Opt-in exploration.
    #[serde(default)]
    pub exploration: Option<Exploration>,
    /// Also write the tag into the JSON response body at this pointer (for clients that drop
    /// headers), e.g. `/sluicegate_tag`.
    #[serde(default)]
    pub tag_field: Option<String>,
}

/// A route's matcher: exactly one of the two.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Requests whose path starts with this.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Requests for this model: `/v1/models/NAME…` (TF-Serving) or `/v2/models/NAME…` (v2).
    #[serde(default)]
    pub model: Option<String>,
}

/// Wire protocols the score extraction understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// TF-Serving / KServe v1: `{"instances": …}` → `{"predictions": […]}`.
    V1,
    /// Open Inference Protocol / KServe v2: `{"inputs": …}` → `{"outputs": [{name, shape, data}]}`.
    V2,
    /// Any JSON: scores found by a JSON pointer (with `*` for the batch).
    Json,
}

/// Where a route's scores are.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreSpec {
    /// v2: the output tensor's name (e.g. `predict_proba`).
    #[serde(default)]
    pub output: Option<String>,
    /// v1 and v2, binary decisions: the column of a `[n, k]` output holding the score (e.g. 1
    /// for the positive class of `predict_proba`). Absent: the output is `[n]` or `[n, 1]`.
    #[serde(default)]
    pub column: Option<usize>,
    /// json: a JSON pointer to the score, with one `*` segment for the rows of a batch
    /// (`/results/*/score`); for multi-class, to the row's array of class scores.
    #[serde(default)]
    pub pointer: Option<String>,
    /// The range scores fall in: `[0, 1]` for probabilities (the default), wider for logits.
    /// Adaptive thresholds are most precise near its top.
    #[serde(default = "default_range")]
    pub range: [f64; 2],
}

fn default_range() -> [f64; 2] {
    [0.0, 1.0]
}

/// How scores become actions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Decision {
    /// score ≥ threshold → `action`, else `otherwise`.
    Binary {
        action: String,
        otherwise: String,
        threshold: Threshold,
    },
    /// The argmax class's action, unless its score is under that class's threshold: then
    /// `default_action`. `classes[i]` is the action of column i.
    Multiclass {
        classes: Vec<String>,
        default_action: String,
        #[serde(default)]
        thresholds: BTreeMap<String, Threshold>,
    },
}

impl Decision {
    /// Every action this decision can produce.
    pub fn actions(&self) -> Vec<&str> {
        match self {
            Decision::Binary {
                action, otherwise, ..
            } => vec![action.as_str(), otherwise.as_str()],
            Decision::Multiclass {
                classes,
                default_action,
                ..
            } => classes
                .iter()
                .map(String::as_str)
                .chain(std::iter::once(default_action.as_str()))
                .collect(),
        }
    }
}

/// A score cut-off.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Threshold {
    /// A constant.
    Fixed(f64),
    /// Moves to hold a target action rate.
    Adaptive(AdaptiveSpec),
}

/// An adaptive threshold: the (1 − target_rate) quantile of recent scores, bounded and
/// rate-limited.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveSpec {
    /// The fraction of decisions that should take the action, in (0, 1).
    pub target_rate: f64,
    /// The sliding window of scores the quantile is taken over.
    #[serde(with = "duration_text")]
    pub window: Duration,
    /// Used until `min_samples` scores have been seen.
    pub initial: f64,
    /// Lowest threshold ever published.
    pub min: f64,
    /// Highest threshold ever published.
    pub max: f64,
    /// Largest move per update.
    pub max_step: f64,
    /// How often the threshold is recomputed.
    #[serde(with = "duration_text", default = "default_update_interval")]
    pub update_interval: Duration,
    /// Scores needed in the window before the threshold adapts.
    #[serde(default = "default_min_samples")]
    pub min_samples: u64,
}

fn default_update_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_min_samples() -> u64 {
    100
}

/// A cap on how often one action is taken on a route.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// The limited action.
    pub action: String,
    /// Largest fraction of the route's decisions that may take it, in (0, 1].
    #[serde(default)]
    pub max_fraction: Option<f64>,
    /// Largest number of times it may be taken in the window.
    #[serde(default)]
    pub max_count: Option<u64>,
    /// The sliding window.
    #[serde(with = "duration_text")]
    pub window: Duration,
    /// Decisions in the window before `max_fraction` applies.
    #[serde(default)]
    pub min_decisions: u64,
    /// What a breach does.
    pub on_breach: OnBreach,
    /// The safe action used instead, with `on_breach: fallback`.
    #[serde(default)]
    pub fallback: Option<String>,
}

/// What happens when taking an action would breach its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBreach {
    /// Let it through, marked `flagged`.
    Flag,
    /// Replace it with the limit's `fallback` action.
    Fallback,
    /// Refuse the whole request with 429.
    Reject,
}

/// Where decisions go in the response body, besides the headers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteDecisions {
    /// json protocol: the pointer the array of final actions is written at. v2 adds an output
    /// tensor `sluicegate_action`; v1 adds a top-level `sluicegate` object.
    #[serde(default)]
    pub pointer: Option<String>,
}

/// Durations as text (`10s`, `5m`), both ways: the policy's canonical form stays readable in
/// `diff` and stable for the version hash.
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        crate::config::units::parse_duration(&text).ok_or_else(|| {
            serde::de::Error::custom(format!("{text:?} is not a duration (e.g. 30s, 5m, 1h)"))
        })
    }
}

/// A validated policy ready for the request path: loaded once per request and carried.
#[derive(Debug)]
pub struct PolicySnapshot {
    pub policy: Policy,
    /// Content hash of the policy: the same policy gives the same version on every pod,
    /// whatever its comments or key order.
    pub version: String,
    /// Reloads applied since start (0 = the policy loaded at start).
    pub generation: u64,
    /// `tee.redact_headers`, parsed once.
    pub redacted_headers: Vec<HeaderName>,
    /// `tee.body_cap_bytes`, clamped to what fits in a record.
    pub body_cap: usize,
    /// The routes, compiled, with their threshold and limit state.
    pub routes: RouteTable,
    /// `consumers.header`, parsed once.
    pub consumer_header: HeaderName,
    /// `tee.redact_body` and `tee.hash_body`, parsed once.
    pub body_redaction: crate::tee::record::BodyRedaction,
    /// Tag keys, read with this policy (a rotated Secret applies at the next reload).
    pub keys: Arc<KeyRing>,
    /// The key and algorithm that sign tags, when the policy tags.
    pub signer: Option<(String, Algorithm)>,
}

impl PolicySnapshot {
    /// Builds the snapshot; `max_record_bytes` comes from the settings. State of thresholds and
    /// limits whose settings did not change is taken over from `previous`.
    pub fn new(
        policy: Policy,
        generation: u64,
        max_record_bytes: u64,
        previous: Option<&PolicySnapshot>,
    ) -> Self {
        let version = version_of(&policy);
        let redacted_headers = policy
            .tee
            .redact_headers
            .iter()
            .filter_map(|h| HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok())
            .collect();
        let body_cap = policy.tee.body_cap_bytes.min(max_record_bytes) as usize;
        let routes = RouteTable::build(&policy, previous.map(|p| &p.routes), Instant::now());
        let consumer_header =
            HeaderName::from_bytes(policy.consumers.header.to_ascii_lowercase().as_bytes())
                .unwrap_or(HeaderName::from_static("sluicegate-consumer"));
        let body_redaction =
            crate::tee::record::BodyRedaction::new(&policy.tee.redact_body, &policy.tee.hash_body);
        PolicySnapshot {
            policy,
            version,
            generation,
            redacted_headers,
            body_cap,
            routes,
            consumer_header,
            body_redaction,
            keys: Arc::new(KeyRing::default()),
            signer: None,
        }
    }

    /// Attaches the tag keys (checked beforehand by [`check_tagging`]).
    pub fn with_keys(mut self, keys: Arc<KeyRing>) -> Self {
        self.signer = self.policy.tagging.as_ref().and_then(|t| {
            let alg = t.algorithm.parse::<Algorithm>().ok()?;
            keys.can_sign(&t.signing_key, alg)
                .then(|| (t.signing_key.clone(), alg))
        });
        self.keys = keys;
        self
    }

    /// Whether `consumer` is declared in the policy.
    pub fn declared(&self, consumer: &str) -> bool {
        self.policy.consumers.declared.iter().any(|d| d == consumer)
    }

    /// Whether this request is recorded (sampling).
    pub fn sampled(&self) -> bool {
        let rate = self.policy.tee.sample_rate;
        rate >= 1.0 || (rate > 0.0 && fastrand::f64() < rate)
    }
}

/// Loads the tag keys and checks that the policy's signing key can sign; the errors name the
/// policy key and the files.
pub fn load_keys(
    policy: &Policy,
    dir: Option<&std::path::Path>,
) -> Result<Arc<KeyRing>, crate::config::validate::PolicyErrors> {
    use crate::config::validate::{PolicyError, PolicyErrors};
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

/// The policy's version: the first 12 hex digits of the SHA-256 of its canonical JSON.
pub fn version_of(policy: &Policy) -> String {
    let canonical = serde_json::to_vec(policy).expect("policy serializes");
    Sha256::digest(&canonical)[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The policy in force: many readers, rare writers.
pub type SharedPolicy = Arc<ArcSwap<PolicySnapshot>>;

/// The shared handle holding `policy` (the built-in default when none is given).
pub fn shared(policy: Policy, max_record_bytes: u64) -> SharedPolicy {
    shared_with_keys(policy, max_record_bytes, Arc::new(KeyRing::default()))
}

/// The shared handle holding `policy`, with its tag keys.
pub fn shared_with_keys(policy: Policy, max_record_bytes: u64, keys: Arc<KeyRing>) -> SharedPolicy {
    Arc::new(ArcSwap::from_pointee(
        PolicySnapshot::new(policy, 0, max_record_bytes, None).with_keys(keys),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_a_stable_content_hash() {
        let a = PolicySnapshot::new(Policy::default(), 0, 1 << 20, None);
        let b = PolicySnapshot::new(Policy::default(), 3, 1 << 20, None);
        assert_eq!(a.version, b.version);
        assert_eq!(a.version.len(), 12);
        let mut p = Policy::default();
        p.tee.sample_rate = 0.5;
        assert_ne!(PolicySnapshot::new(p, 0, 1 << 20, None).version, a.version);
    }

    #[test]
    fn body_cap_never_exceeds_a_record() {
        let s = PolicySnapshot::new(Policy::default(), 0, 8192, None);
        assert_eq!(s.body_cap, 8192);
    }
}
