//! The claims a tag carries, their compact wire form, and decoding a token into them.

use std::fmt::{self, Write as _};
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{is_valid_key_id, MAX_LISTED_ROWS, MAX_TAG_LEN, TAG_PREFIX};

/// A signature algorithm for tags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Algorithm {
    /// Ed25519: verifiers hold only the public key and cannot forge. The default.
    #[serde(rename = "ed25519")]
    Ed25519,
    /// HMAC-SHA256 with a shared secret: cheaper, but every verifier can also sign.
    #[serde(rename = "hs256", alias = "hmac-sha256")]
    HmacSha256,
}

impl Algorithm {
    /// The name used in tags and metrics: `ed25519` or `hs256`.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Ed25519 => "ed25519",
            Algorithm::HmacSha256 => "hs256",
        }
    }

    /// Length of the base64url (unpadded) signature: lets a cut-off token be told from a bad one.
    pub(super) fn encoded_signature_len(self) -> usize {
        match self {
            Algorithm::Ed25519 => 86,    // 64 bytes
            Algorithm::HmacSha256 => 43, // 32 bytes
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing an [`Algorithm`] name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown signature algorithm `{0}` (expected ed25519, hmac-sha256 or hs256)")]
pub struct UnknownAlgorithm(pub String);

impl FromStr for Algorithm {
    type Err = UnknownAlgorithm;

    /// Accepts `ed25519`, `hmac-sha256` and `hs256`, in any ASCII case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "ed25519" => Ok(Algorithm::Ed25519),
            "hmac-sha256" | "hs256" => Ok(Algorithm::HmacSha256),
            _ => Err(UnknownAlgorithm(bounded(s))),
        }
    }
}

/// Why a token was not accepted.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum TagError {
    /// Not a well-formed tag (bad base64, bad JSON, inconsistent fields, not a tag at all).
    #[error("malformed tag: {0}")]
    Malformed(String),
    /// The token ends early: a part or some signature bytes are missing.
    #[error("truncated tag")]
    Truncated,
    /// A tag of a format version this build does not read.
    #[error("unsupported tag version `{0}` (this build reads sg1)")]
    UnsupportedVersion(String),
    /// Signed with a key id that the key ring does not hold.
    #[error("unknown key id `{0}`")]
    UnknownKey(String),
    /// The signature does not match the payload: forged or altered.
    #[error("forged or altered tag: the signature does not match")]
    BadSignature,
    /// The tag claims another algorithm than its key's.
    #[error("key `{key}` is {expected}, but the tag claims {found}")]
    AlgorithmMismatch {
        /// The key id.
        key: String,
        /// The algorithm of the key in the ring.
        expected: Algorithm,
        /// The algorithm the tag claims.
        found: Algorithm,
    },
}

impl TagError {
    /// A bounded metric label: `malformed`, `truncated`, `version`, `unknown_key`, `forged` or
    /// `algorithm`.
    pub fn kind(&self) -> &'static str {
        match self {
            TagError::Malformed(_) => "malformed",
            TagError::Truncated => "truncated",
            TagError::UnsupportedVersion(_) => "version",
            TagError::UnknownKey(_) => "unknown_key",
            TagError::BadSignature => "forged",
            TagError::AlgorithmMismatch { .. } => "algorithm",
        }
    }
}

/// What a tag says (verified, or about to be signed).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TagClaims {
    /// Id of the signing key (set by [`super::KeyRing::sign`]).
    pub key_id: String,
    /// Signature algorithm (set by [`super::KeyRing::sign`]).
    pub algorithm: Algorithm,
    /// The prediction id (`sluicegate-id`).
    pub prediction_id: String,
    /// The route that decided.
    pub route: String,
    /// Model name, when known.
    pub model: Option<String>,
    /// Model version, when known.
    pub model_version: Option<String>,
    /// The policy's version.
    pub policy_version: String,
    /// Number of rows decided.
    pub rows: usize,
    /// The final actions, when rows <= MAX_LISTED_ROWS.
    pub actions: Option<Vec<String>>,
    /// Hex SHA-256 of the actions joined by '\n', when rows > MAX_LISTED_ROWS.
    pub actions_digest: Option<String>,
    /// Explored flags, one per row, when the route explores and rows <= MAX_LISTED_ROWS.
    pub explored: Vec<bool>,
    /// Propensities (6 significant digits), one per row, alongside `explored`.
    pub propensities: Vec<f64>,
    /// When the route explores and rows > MAX_LISTED_ROWS: hex SHA-256 of the explored flags
    /// and propensities (see the module docs), in place of `explored` and `propensities`.
    pub exploration_digest: Option<String>,
    /// Unix time of the decision, milliseconds.
    pub timestamp_ms: i64,
}

/// What [`TagClaims::new`] builds claims from: one response's decisions, by name (the
/// fields of the tag, most of them strings, are too easily swapped when positional).
#[derive(Clone, Copy, Debug, Default)]
pub struct ClaimsInput<'a> {
    /// The prediction id (`sluicegate-id`).
    pub prediction_id: &'a str,
    /// The route that decided.
    pub route: &'a str,
    pub model: Option<&'a str>,
    pub model_version: Option<&'a str>,
    /// The policy's version.
    pub policy_version: &'a str,
    /// The final action of each row.
    pub actions: &'a [&'a str],
    /// Per row, whether exploration drew it; empty when the route does not explore.
    pub explored: &'a [bool],
    /// Per row, the propensity of the action taken; empty when the route does not explore.
    pub propensities: &'a [f64],
    /// Unix time of the decision, milliseconds.
    pub timestamp_ms: i64,
}

impl TagClaims {
    /// Builds claims for `actions` (listing or digesting them), with key_id/algorithm left for
    /// `sign` to set.
    ///
    /// `explored` and `propensities` are either both empty (the route does not explore) or hold
    /// one entry per row; propensities are rounded to 6 significant digits. Claims built from
    /// inconsistent input fail [`TagClaims::validate`], so `sign` refuses them.
    pub fn new(input: ClaimsInput<'_>) -> Self {
        let ClaimsInput {
            prediction_id,
            route,
            model,
            model_version,
            policy_version,
            actions,
            explored,
            propensities,
            timestamp_ms,
        } = input;
        let rows = actions.len();
        let listed = rows <= MAX_LISTED_ROWS;
        let (listed_actions, actions_digest) = if listed {
            (Some(actions.iter().map(|a| a.to_string()).collect()), None)
        } else {
            (None, Some(digest_actions(actions)))
        };
        // Digest only input that validates; anything else stays listed so that `validate`
        // names the problem instead of a digest hiding it. The digest writes each propensity
        // at 6 significant digits itself, so the raw values go in (no rounding pass per row).
        let digest_exploration = !listed
            && !explored.is_empty()
            && explored.len() == rows
            && propensities.len() == rows
            && propensities.iter().all(|&p| {
                valid_propensity(p) || (p > 1.0 && valid_propensity(round_propensity(p)))
            });
        let (explored, propensities, exploration_digest) = if digest_exploration {
            let digest = exploration_digest(explored, propensities);
            (Vec::new(), Vec::new(), Some(digest))
        } else {
            let rounded = propensities.iter().map(|&p| round_propensity(p)).collect();
            (explored.to_vec(), rounded, None)
        };
        TagClaims {
            key_id: String::new(),
            algorithm: Algorithm::Ed25519,
            prediction_id: prediction_id.to_owned(),
            route: route.to_owned(),
            model: model.map(str::to_owned),
            model_version: model_version.map(str::to_owned),
            policy_version: policy_version.to_owned(),
            rows,
            actions: listed_actions,
            actions_digest,
            explored,
            propensities,
            exploration_digest,
            timestamp_ms,
        }
    }

    /// Whether `actions` match (listed or by digest): lets a verifier check a claimed action list.
    pub fn actions_match(&self, actions: &[&str]) -> bool {
        if actions.len() != self.rows {
            return false;
        }
        match (&self.actions, &self.actions_digest) {
            (Some(listed), _) => listed
                .iter()
                .map(String::as_str)
                .eq(actions.iter().copied()),
            (None, Some(digest)) => *digest == digest_actions(actions),
            (None, None) => false,
        }
    }

    /// Whether `explored` and `propensities` (full precision is fine) match the tag's, listed
    /// or by digest. Both empty matches a tag of a route that does not explore.
    pub fn exploration_matches(&self, explored: &[bool], propensities: &[f64]) -> bool {
        if explored.len() != propensities.len() {
            return false;
        }
        match &self.exploration_digest {
            Some(digest) => {
                explored.len() == self.rows && *digest == exploration_digest(explored, propensities)
            }
            None => {
                self.explored == explored
                    && self.propensities.len() == propensities.len()
                    && self
                        .propensities
                        .iter()
                        .zip(propensities)
                        .all(|(&mine, &theirs)| mine == round_propensity(theirs))
            }
        }
    }

    /// Checks that the claims are consistent: a valid key id, a prediction id, actions listed
    /// up to [`MAX_LISTED_ROWS`] rows and digested above, exploration empty or one entry per
    /// row, propensities within [0, 1]. Signing and decoding both apply it.
    pub fn validate(&self) -> Result<(), TagError> {
        let bad = |m: &str| Err(TagError::Malformed(m.to_owned()));
        if !is_valid_key_id(&self.key_id) {
            return bad("the key id must be 1 to 64 characters of [A-Za-z0-9._-]");
        }
        if self.prediction_id.is_empty() {
            return bad("empty prediction id");
        }
        let listed = self.rows <= MAX_LISTED_ROWS;
        match (&self.actions, &self.actions_digest) {
            (Some(a), None) if listed && a.len() == self.rows => {}
            (None, Some(d)) if !listed && is_hex_digest(d) => {}
            _ => {
                return bad("actions must be listed, one per row, up to 16 rows and digested above")
            }
        }
        if self.explored.len() != self.propensities.len() {
            return bad("explored flags and propensities differ in number");
        }
        if !self.explored.is_empty() && (!listed || self.explored.len() != self.rows) {
            return bad("explored flags must be listed, one per row, up to 16 rows");
        }
        if let Some(d) = &self.exploration_digest {
            if listed || !is_hex_digest(d) {
                return bad("an exploration digest belongs only to tags of more than 16 rows");
            }
        }
        if !self.propensities.iter().all(|&p| valid_propensity(p)) {
            return bad("a propensity is not a number within [0, 1]");
        }
        Ok(())
    }

    /// The compact JSON payload (not yet base64url).
    pub(super) fn to_payload_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        let explored: String = self
            .explored
            .iter()
            .map(|&x| if x { '1' } else { '0' })
            .collect();
        let wire = WireOut {
            k: &self.key_id,
            alg: self.algorithm,
            id: &self.prediction_id,
            r: &self.route,
            m: self.model.as_deref(),
            mv: self.model_version.as_deref(),
            p: &self.policy_version,
            n: self.rows,
            a: self.actions.as_deref(),
            ad: self.actions_digest.as_deref(),
            x: &explored,
            pr: &self.propensities,
            xd: self.exploration_digest.as_deref(),
            t: self.timestamp_ms,
        };
        serde_json::to_vec(&wire)
    }
}

/// Hex SHA-256 of `actions` joined by `\n`: the `ad` field of tags of more than 16 rows.
pub fn digest_actions(actions: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for (i, action) in actions.iter().enumerate() {
        if i > 0 {
            hasher.update(b"\n");
        }
        hasher.update(action.as_bytes());
    }
    hex(&hasher.finalize())
}

/// Hex SHA-256 of `<0|1> <propensity as {:.5e}>` lines joined by `\n`: the `xd` field.
fn exploration_digest(explored: &[bool], propensities: &[f64]) -> String {
    let mut hasher = Sha256::new();
    let mut line = String::with_capacity(16);
    for (i, (&x, &p)) in explored.iter().zip(propensities).enumerate() {
        line.clear();
        if i > 0 {
            line.push('\n');
        }
        // Writing to a String cannot fail.
        let _ = write!(line, "{} {:.5e}", u8::from(x), p);
        hasher.update(line.as_bytes());
    }
    hex(&hasher.finalize())
}

/// Rounds to 6 significant digits. A short decimal is parsed back exactly by any JSON reader
/// (serde_json's default float parsing is not exact for 17-digit numbers), so a verified tag
/// holds the very numbers that were signed.
fn round_propensity(p: f64) -> f64 {
    if !p.is_finite() || p == 0.0 {
        return p;
    }
    format!("{p:.5e}").parse().unwrap_or(p)
}

fn valid_propensity(p: f64) -> bool {
    (0.0..=1.0).contains(&p)
}

fn is_hex_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// Cuts attacker-controlled text that goes into an error message to a bounded length.
fn bounded(s: &str) -> String {
    const MAX: usize = 120;
    match s.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_owned(),
    }
}

#[derive(Serialize)]
struct WireOut<'a> {
    k: &'a str,
    alg: Algorithm,
    id: &'a str,
    r: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    m: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mv: Option<&'a str>,
    p: &'a str,
    n: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    a: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ad: Option<&'a str>,
    #[serde(skip_serializing_if = "str::is_empty")]
    x: &'a str,
    #[serde(skip_serializing_if = "<[f64]>::is_empty")]
    pr: &'a [f64],
    #[serde(skip_serializing_if = "Option::is_none")]
    xd: Option<&'a str>,
    t: i64,
}

// Unknown fields are ignored (fields are only added within sg1, and the signature covers them).
#[derive(Deserialize)]
struct WireIn {
    k: String,
    alg: Algorithm,
    id: String,
    r: String,
    #[serde(default)]
    m: Option<String>,
    #[serde(default)]
    mv: Option<String>,
    p: String,
    n: usize,
    #[serde(default)]
    a: Option<Vec<String>>,
    #[serde(default)]
    ad: Option<String>,
    #[serde(default)]
    x: String,
    #[serde(default)]
    pr: Vec<f64>,
    #[serde(default)]
    xd: Option<String>,
    t: i64,
}

/// The three parts of a token, borrowed from it.
pub(super) struct Parts<'a> {
    /// `sg1.<payload>`: the bytes the signature covers.
    pub signed: &'a str,
    pub payload: &'a str,
    pub signature: &'a str,
}

/// Splits a token into its parts, classifying what is wrong with its shape.
pub(super) fn split(token: &str) -> Result<Parts<'_>, TagError> {
    if token.len() > MAX_TAG_LEN {
        return Err(TagError::Malformed(format!(
            "longer than {MAX_TAG_LEN} bytes"
        )));
    }
    let Some(rest) = token.strip_prefix(TAG_PREFIX) else {
        return Err(classify_prefix(token));
    };
    // No second dot: the signature (and maybe part of the payload) was cut off.
    let Some((payload, signature)) = rest.split_once('.') else {
        return Err(TagError::Truncated);
    };
    if payload.is_empty() || signature.is_empty() {
        return Err(TagError::Truncated);
    }
    if signature.contains('.') {
        return Err(TagError::Malformed("more than three parts".to_owned()));
    }
    Ok(Parts {
        signed: &token[..TAG_PREFIX.len() + payload.len()],
        payload,
        signature,
    })
}

/// Why a token that does not start with `sg1.` is not one.
fn classify_prefix(token: &str) -> TagError {
    if token.is_empty() {
        return TagError::Malformed("empty".to_owned());
    }
    if TAG_PREFIX.starts_with(token) {
        return TagError::Truncated;
    }
    let head = token.split('.').next().unwrap_or(token);
    let is_version = head
        .strip_prefix("sg")
        .is_some_and(|v| (1..=8).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_digit()));
    if is_version {
        TagError::UnsupportedVersion(head.to_owned())
    } else {
        TagError::Malformed("not a sluicegate tag (expected sg1.<payload>.<signature>)".to_owned())
    }
}

/// Decodes and validates the payload part.
pub(super) fn decode_payload(payload: &str) -> Result<TagClaims, TagError> {
    let json = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TagError::Malformed("the payload is not base64url".to_owned()))?;
    let wire: WireIn = serde_json::from_slice(&json).map_err(|e| match e.classify() {
        serde_json::error::Category::Eof => TagError::Truncated,
        _ => TagError::Malformed(format!("payload: {}", bounded(&e.to_string()))),
    })?;
    let explored = wire
        .x
        .bytes()
        .map(|b| match b {
            b'0' => Ok(false),
            b'1' => Ok(true),
            _ => Err(TagError::Malformed(
                "explored flags must be 0 or 1".to_owned(),
            )),
        })
        .collect::<Result<Vec<bool>, TagError>>()?;
    let claims = TagClaims {
        key_id: wire.k,
        algorithm: wire.alg,
        prediction_id: wire.id,
        route: wire.r,
        model: wire.m,
        model_version: wire.mv,
        policy_version: wire.p,
        rows: wire.n,
        actions: wire.a,
        actions_digest: wire.ad,
        explored,
        propensities: wire.pr,
        exploration_digest: wire.xd,
        timestamp_ms: wire.t,
    };
    claims.validate()?;
    Ok(claims)
}

/// Decodes without verifying (for `tag verify` to show what a bad tag claims). Never panics.
///
/// The signature part must be present but is not checked.
pub fn decode_unverified(token: &str) -> Result<TagClaims, TagError> {
    let parts = split(token)?;
    decode_payload(parts.payload)
}
