//! The hot policy as an operator writes it: routes, score extraction, thresholds, limits,
//! consumers and the tee's settings. One YAML file, validated whole (`validate`); its compiled,
//! runtime form is [`crate::policy::Policy`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The policy as written by an operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// What the tee records and how.
    #[serde(default)]
    pub tee: TeeSpec,
    /// Who may call, and how callers name themselves.
    #[serde(default)]
    pub consumers: ConsumersSpec,
    /// Routes by stable name: the name carries threshold and limit state across reloads.
    #[serde(default)]
    pub routes: BTreeMap<String, RouteSpec>,
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
pub struct ExplorationSpec {
    /// Probability of exploring, in [0, 1).
    pub epsilon: f64,
    /// A fixed seed makes the draws repeatable (tests, replays); absent, they are random.
    #[serde(default)]
    pub seed: Option<u64>,
}

/// The tee's hot settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TeeSpec {
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

impl Default for TeeSpec {
    fn default() -> Self {
        TeeSpec {
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
pub struct ConsumersSpec {
    /// The header callers name themselves in.
    pub header: String,
    /// Declared consumers. Empty: nobody is declared (every caller counts as undeclared).
    pub declared: Vec<String>,
    /// What happens to a caller not in `declared`.
    pub undeclared: Undeclared,
}

impl Default for ConsumersSpec {
    fn default() -> Self {
        ConsumersSpec {
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
pub struct RouteSpec {
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
    pub decision: Option<DecisionSpec>,
    /// Caps on how often an action is taken.
    #[serde(default)]
    pub limits: Vec<LimitSpec>,
    /// Also write the decisions into the response body (always in headers).
    #[serde(default)]
    pub write_decisions: Option<WriteDecisions>,
    /// Overrides `tee.capture_bodies` for this route.
    #[serde(default)]
    pub capture_bodies: Option<bool>,
    /// Opt-in exploration.
    #[serde(default)]
    pub exploration: Option<ExplorationSpec>,
    /// Also write the tag into the JSON response body at this pointer (for clients that drop
    /// headers), e.g. `/sluicegate_tag`.
    #[serde(default)]
    pub tag_field: Option<String>,
    /// Decide, count, record and export metrics as usual, but send the response as the model
    /// sent it: no rejection, nothing written into the body, no decision headers and no tag,
    /// `sluicegate-mode: shadow` instead; the record says `shadow: true`. To watch a new
    /// threshold or limit before enforcing it.
    #[serde(default)]
    pub shadow: bool,
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
pub enum DecisionSpec {
    /// score ≥ threshold → `action`, else `otherwise`.
    Binary {
        action: String,
        otherwise: String,
        threshold: ThresholdSpec,
    },
    /// The argmax class's action, unless its score is under that class's threshold: then
    /// `default_action`. `classes[i]` is the action of column i.
    Multiclass {
        classes: Vec<String>,
        default_action: String,
        #[serde(default)]
        thresholds: BTreeMap<String, ThresholdSpec>,
    },
}

impl DecisionSpec {
    /// Every action this decision can produce.
    pub fn actions(&self) -> Vec<&str> {
        match self {
            DecisionSpec::Binary {
                action, otherwise, ..
            } => vec![action.as_str(), otherwise.as_str()],
            DecisionSpec::Multiclass {
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
pub enum ThresholdSpec {
    /// A constant.
    Fixed(f64),
    /// Moves to hold a target action rate.
    Adaptive(AdaptiveThresholdSpec),
}

/// An adaptive threshold: the (1 − target_rate) quantile of recent scores, bounded and
/// rate-limited.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveThresholdSpec {
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
pub struct LimitSpec {
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
    /// Whose count `max_count` caps: this pod's (the default) or the whole fleet's (in Redis).
    /// Defaults are not written out, so a policy without them keeps its version hash.
    #[serde(default, skip_serializing_if = "LimitScope::is_pod")]
    pub scope: LimitScope,
    /// Replicas expected, for a fleet limit: the degraded per-pod share is `max_count /
    /// replicas`, and leases are sized by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// For a fleet limit: the most the fleet may overshoot `max_count` by, as a fraction of it
    /// (0.1 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_fraction: Option<f64>,
}

/// Whose actions a limit counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitScope {
    /// This process's: one sidecar per pod.
    #[default]
    Pod,
    /// Every replica's, counted in Redis (`--redis-url`).
    Fleet,
}

impl LimitScope {
    fn is_pod(&self) -> bool {
        *self == LimitScope::Pod
    }
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

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        crate::config::units::parse_duration(&text).ok_or_else(|| {
            serde::de::Error::custom(format!("{text:?} is not a duration (e.g. 30s, 5m, 1h)"))
        })
    }
}

/// The policy's version: the first 12 hex digits of the SHA-256 of its canonical JSON.
pub fn version_of(policy: &PolicySpec) -> String {
    let canonical = serde_json::to_vec(policy).expect("policy serializes");
    Sha256::digest(&canonical)[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
