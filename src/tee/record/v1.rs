//! The `sluicegate.record.v1` record as one owned type: what `audit` and `spool cat` read, and
//! what `record.v1.schema.json` is generated from ([`json_schema`]).
//!
//! v1 only ever adds fields and values: unknown fields are ignored, and every enum keeps a
//! value it does not know in its `Other` variant. The schema states what the writer writes:
//! every field it always writes is required (null where the type is an `Option`).

use std::fmt;

use indexmap::IndexMap;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use super::RECORD_SCHEMA;

/// One record per request/response pair. Fields are only ever added within v1; consumers must
/// ignore fields they do not know. The Kafka key is `id`; Kafka headers sluicegate-schema and
/// sluicegate-route repeat `schema` and `route`.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[schemars(
    title = "sluicegate request/response record, v1",
    extend("$id" = RECORD_SCHEMA)
)]
pub struct Record {
    pub schema: Version,
    /// Prediction id (UUIDv7, time-ordered); also the sluicegate-id response header. Dedupe on
    /// it: delivery is at least once.
    #[schemars(length(min = 1))]
    pub id: String,
    /// When the request arrived (RFC 3339, UTC). Also the Kafka message timestamp.
    #[schemars(extend("format" = "date-time"))]
    pub time: String,
    /// POD_NAME, else HOSTNAME, else the host name.
    pub instance: String,
    pub route: String,
    pub model: Model,
    pub consumer: Consumer,
    pub policy: PolicyRef,
    pub request: Request,
    /// Null when the upstream never answered (see `error`).
    pub response: Option<Response>,
    /// Status sent to the client.
    pub status: Option<u16>,
    /// Why the proxy answered the request itself, or why the exchange ended early. On a
    /// shadow route (`shadow`), the refusal a limit would have made (the client got `status`).
    pub error: Option<ExchangeError>,
    /// False when the request or the response did not finish (client left, client body broke
    /// off or stalled, upstream broke mid-body).
    pub complete: bool,
    /// The signed provenance tag sent with the response (sluicegate-tag), when the policy tags.
    pub tag: Option<String>,
    /// Provenance tags the request carried (header sluicegate-tag, or any quoted string in its
    /// body, JSON escapes and any depth included): model outputs fed back as inputs. At most 8;
    /// at most 4 have their signature checked.
    pub inbound_tags: Vec<InboundTag>,
    /// One entry per row on a deciding route; null elsewhere, when the response could not be
    /// read (see decision_error), or when the decisions are in `decision_columns` or omitted.
    pub decisions: Option<Vec<Decision>>,
    /// Why a deciding route could not read the response (it passed through unchanged).
    pub decision_error: Option<DecisionError>,
    /// The same per-row decisions as `decisions`, stored compactly: with
    /// `--record-decisions columns`, or when one entry per row would not fit under
    /// `--max-record` even with the bodies cut. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision_columns: Option<DecisionColumns>,
    /// Rows decided but whose decisions are in neither form: the record would not fit under
    /// `--max-record` with them, even with the bodies cut and the decisions in columns.
    /// Absent when nothing was omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decisions_omitted: Option<u64>,
    /// True when the route is in shadow mode: the decisions were made, counted and recorded,
    /// but the client got the model's response as it was (no rejection, nothing written, no
    /// tag). Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<bool>,
    pub timings: Timings,
}

/// The `schema` field: always `sluicegate.record.v1`, so a record of another schema (an alert,
/// a future v2) does not read as v1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version;

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(RECORD_SCHEMA)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Version;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "{RECORD_SCHEMA:?}")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Version, E> {
                if s == RECORD_SCHEMA {
                    Ok(Version)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(s), &self))
                }
            }
        }
        d.deserialize_str(V)
    }
}

impl JsonSchema for Version {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Version".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "const": RECORD_SCHEMA })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Model {
    /// From the v2 response's model_name, else the request path.
    pub name: Option<String>,
    pub version: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Consumer {
    /// The caller's consumer header (sluicegate-consumer unless the policy names another); null
    /// when absent; "[redacted]" when that header is also redacted.
    pub id: Option<String>,
    pub declared: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct PolicyRef {
    /// Content hash of the policy in force.
    pub version: String,
    pub generation: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Request {
    pub method: String,
    /// The normalized path the request was routed and forwarded on (percent-encoded unreserved
    /// characters decoded); as sent when refused as ambiguous_path.
    pub path: String,
    pub query: Option<String>,
    pub headers: Headers,
    /// The Open Inference Protocol request's `id`, when present.
    pub v2_id: Option<String>,
    pub body: Body,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Response {
    pub status: u16,
    pub headers: Headers,
    pub trailers: Option<Headers>,
    pub body: Body,
}

/// Lower-case names; repeated headers joined with ', '; redacted ones read [redacted].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct Headers(pub IndexMap<String, String>);

/// A captured body.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[schemars(extend(
    "if" = { "properties": { "encoding": { "const": "none" } } },
    "then" = { "not": { "required": ["data"] } },
    "else" = { "required": ["data"] }
))]
pub struct Body {
    pub encoding: Encoding,
    /// Absent when encoding is none. Kept as the JSON text it was, numbers as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
    /// Bytes of the whole body as it passed.
    pub size: u64,
    /// True when data holds less than the whole body (a truncated JSON body is stored as text).
    pub truncated: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct ExchangeError {
    pub code: ErrorCode,
    pub message: String,
    /// The gRPC status the client got (8, `RESOURCE_EXHAUSTED`, for a limit's rejection),
    /// when the proxy answered a gRPC call itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
}

/// A provenance tag that came in with the request.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct InboundTag {
    pub found_in: FoundIn,
    pub valid: bool,
    /// direct: this model's own output; hidden: another model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback: Option<Feedback>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Why an invalid tag was not trusted; unverified: its signature was not checked (past the
    /// per-record or per-second bound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TagError>,
}

/// The decision on one row.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[schemars(transform = explored_may_be_absent)]
pub struct Decision {
    pub row: u64,
    /// The score the threshold was applied to (the argmax class's, multi-class).
    pub score: f64,
    /// Multi-class: every class score of the row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_scores: Option<Vec<f64>>,
    pub threshold: Option<f64>,
    pub threshold_mode: Option<ThresholdMode>,
    /// What the threshold alone said.
    pub model_action: String,
    /// What was done, after limits.
    pub final_action: String,
    pub limit: LimitOutcome,
    /// Exploration drew this row's action at random. Absent (false) in records of builds
    /// before exploration.
    #[serde(default)]
    pub explored: bool,
    /// Probability of the action taken under the policy's randomization (routes that explore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub propensity: Option<f64>,
}

/// `explored` is always written, but records written before it existed are still v1.
fn explored_may_be_absent(schema: &mut Schema) {
    if let Some(serde_json::Value::Array(required)) = schema.get_mut("required") {
        required.retain(|f| f != "explored");
    }
}

/// A batch's decisions by column: what row `i` of `decisions` would say is at index `i` of each
/// column (runs and codes expanded).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct DecisionColumns {
    pub rows: u64,
    /// Each row's score; null when the recorded response body holds them whole, at
    /// `score_source` (they are not repeated).
    pub score: Option<Vec<f64>>,
    /// Multi-class: every class score of each row; null when the response body holds them,
    /// and on binary routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_scores: Option<Vec<Vec<f64>>>,
    /// Where the route read the scores in the response: the route's protocol and `score` spec.
    pub score_source: ScoreSource,
    /// The threshold of each row, as runs of equal values.
    pub threshold: Vec<Run<Option<f64>>>,
    pub threshold_mode: Vec<Run<Option<ThresholdMode>>>,
    /// The distinct outcomes in the batch, in the order they first appear.
    pub outcomes: Vec<Outcome>,
    /// One character per row, `0-9a-zA-Z` in that order: the index of the row's outcome.
    pub codes: String,
    /// Each row's propensity as runs (routes that explore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub propensity: Option<Vec<Run<Option<f64>>>>,
}

/// `[value, count]`: `count` consecutive rows with this value.
pub type Run<T> = (T, u64);

/// What a row's decision came to, less its score and threshold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Outcome {
    pub model_action: String,
    pub final_action: String,
    pub limit: LimitOutcome,
    pub explored: bool,
}

/// The characters of [`DecisionColumns::codes`]: a batch holds at most 62 distinct outcomes
/// in columns (past that, its decisions are recorded one object per row).
pub const CODE_ALPHABET: &[u8; 62] =
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// Expands runs to one value per row.
pub fn expand_runs<T>(runs: &[Run<T>]) -> Vec<&T> {
    runs.iter()
        .flat_map(|(v, n)| std::iter::repeat_n(v, usize::try_from(*n).unwrap_or(usize::MAX)))
        .collect()
}

/// Where a route reads its scores: v2, the output named `output` (`column` of a `[n, k]`
/// output); v1, `predictions` (`column` of each row); json, the JSON pointer `pointer`, its `*`
/// being the row.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct ScoreSource {
    /// `v1`, `v2` or `json`.
    pub protocol: Option<String>,
    pub output: Option<String>,
    pub column: Option<u64>,
    pub pointer: Option<String>,
}

/// What [`Record::row_decisions`] gives for each row, from either form.
#[derive(Clone, Debug, PartialEq)]
pub struct RowDecision<'a> {
    pub threshold: Option<f64>,
    pub model_action: &'a str,
    pub final_action: &'a str,
    pub limit: &'a LimitOutcome,
    pub explored: bool,
}

impl Record {
    /// The decisions row by row, from `decisions` or `decision_columns`; `None` when the
    /// record has neither, or its columns do not agree with each other.
    pub fn row_decisions(&self) -> Option<Vec<RowDecision<'_>>> {
        if let Some(rows) = &self.decisions {
            return Some(
                rows.iter()
                    .map(|d| RowDecision {
                        threshold: d.threshold,
                        model_action: &d.model_action,
                        final_action: &d.final_action,
                        limit: &d.limit,
                        explored: d.explored,
                    })
                    .collect(),
            );
        }
        let c = self.decision_columns.as_ref()?;
        let threshold = expand_runs(&c.threshold);
        let rows = usize::try_from(c.rows).ok()?;
        if threshold.len() != rows || c.codes.len() != rows {
            return None;
        }
        c.codes
            .bytes()
            .zip(threshold)
            .map(|(code, &threshold)| {
                let i = CODE_ALPHABET.iter().position(|&a| a == code)?;
                let o = c.outcomes.get(i)?;
                Some(RowDecision {
                    threshold,
                    model_action: &o.model_action,
                    final_action: &o.final_action,
                    limit: &o.limit,
                    explored: o.explored,
                })
            })
            .collect()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct DecisionError {
    pub kind: DecisionErrorKind,
    pub message: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct Timings {
    /// Request sent upstream to response headers.
    pub upstream_ms: Option<f64>,
    /// Request arrival to the end of the response body.
    pub total_ms: f64,
}

/// An enum of string values that stays open: a value this build does not know reads as
/// `Other`, and the schema lists the known values without refusing others.
macro_rules! open_enum {
    ($(#[doc = $doc:literal])* $name:ident { $($variant:ident = $value:literal,)+ }) => {
        $(#[doc = $doc])*
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub enum $name {
            $($variant,)+
            /// A value added after this build.
            Other(String),
        }

        impl $name {
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $value,)+
                    Self::Other(s) => s,
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Ok(match s.as_str() {
                    $($value => Self::$variant,)+
                    _ => Self::Other(s),
                })
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                let description = [$($doc.trim()),*].join(" ");
                json_schema!({
                    "description": description,
                    "anyOf": [{ "enum": [$($value),+] }, { "type": "string" }]
                })
            }
        }
    };
}

open_enum! {
    /// Stable code, the same as the `error` field of the JSON error sent to the client.
    ErrorCode {
        RequestTooLarge = "request_too_large",
        UpstreamUnavailable = "upstream_unavailable",
        UpstreamFailed = "upstream_failed",
        UpstreamTimeout = "upstream_timeout",
        ClientBodyError = "client_body_error",
        ClientBodyTimeout = "client_body_timeout",
        UpstreamBodyError = "upstream_body_error",
        UpstreamBodyTimeout = "upstream_body_timeout",
        ClientDisconnected = "client_disconnected",
        Shutdown = "shutdown",
        ConsumerUndeclared = "consumer_undeclared",
        LimitExceeded = "limit_exceeded",
        AmbiguousPath = "ambiguous_path",
        BadRequest = "bad_request",
    }
}

open_enum! {
    /// json: `data` is the body itself, embedded as sent. text: a UTF-8 string. base64: bytes.
    /// none: capture is off.
    Encoding {
        Json = "json",
        Text = "text",
        Base64 = "base64",
        None = "none",
    }
}

open_enum! {
    /// Where the tag was: the sluicegate-tag header or the body.
    FoundIn {
        Header = "header",
        Body = "body",
    }
}

open_enum! {
    /// direct: this model's own output; hidden: another model's.
    Feedback {
        Direct = "direct",
        Hidden = "hidden",
    }
}

open_enum! {
    /// Why an invalid tag was not trusted; unverified: its signature was not checked.
    TagError {
        Malformed = "malformed",
        Truncated = "truncated",
        Version = "version",
        UnknownKey = "unknown_key",
        Forged = "forged",
        Algorithm = "algorithm",
        Unverified = "unverified",
    }
}

open_enum! {
    /// How the threshold was set.
    ThresholdMode {
        Fixed = "fixed",
        Adaptive = "adaptive",
    }
}

open_enum! {
    /// What the route's limits made of the row's action.
    LimitOutcome {
        Ok = "ok",
        Flagged = "flagged",
        Fallback = "fallback",
    }
}

open_enum! {
    /// content_encoding: the response's content coding is not gzip or deflate, or does not
    /// decode.
    DecisionErrorKind {
        NotJson = "not_json",
        Missing = "missing",
        Shape = "shape",
        NotANumber = "not_a_number",
        Empty = "empty",
        ResponseTooLarge = "response_too_large",
        ContentEncoding = "content_encoding",
    }
}

/// The JSON Schema of [`Record`], as committed in `src/tee/record.v1.schema.json`.
pub fn json_schema() -> Schema {
    // The serialize contract: a field always written is required, even an `Option` (as null).
    let mut generator = schemars::generate::SchemaSettings::draft2020_12()
        .for_serialize()
        .with_transform(schemars::transform::RecursiveTransform(unwrap_descriptions))
        .into_generator();
    generator.root_schema_for::<Record>()
}

/// Doc comments wrap at the source's line width; a description is one paragraph.
fn unwrap_descriptions(schema: &mut Schema) {
    if let Some(serde_json::Value::String(d)) = schema.get_mut("description") {
        *d = d.split('\n').map(str::trim).collect::<Vec<_>>().join(" ");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/tee/record.v1.schema.json");

    /// The committed schema is the generated one; `UPDATE_SCHEMA=1` rewrites it.
    #[test]
    fn the_committed_schema_is_generated_from_the_type() {
        let generated = serde_json::to_string_pretty(&json_schema()).unwrap() + "\n";
        if std::env::var_os("UPDATE_SCHEMA").is_some() {
            std::fs::write(SCHEMA_FILE, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(SCHEMA_FILE).unwrap();
        assert!(
            committed == generated,
            "{SCHEMA_FILE} differs from the schema generated from tee::record::v1::Record; \
             regenerate it with `UPDATE_SCHEMA=1 cargo test --lib tee::record::v1`"
        );
    }

    #[test]
    fn unknown_values_and_fields_read_and_write_back() {
        let text = r#"{"schema":"sluicegate.record.v1","id":"a","time":"2026-01-01T00:00:00Z","instance":"i","route":"r","model":{"name":null,"version":null},"consumer":{"id":null,"declared":false},"policy":{"version":"p","generation":0},"request":{"method":"POST","path":"/","query":null,"headers":{},"v2_id":null,"body":{"encoding":"zstd","size":0,"truncated":false}},"response":null,"status":503,"error":{"code":"brand_new_code","message":"m"},"complete":true,"tag":null,"inbound_tags":[{"found_in":"trailer","valid":false,"error":"revoked"}],"decisions":[{"row":0,"score":0.5,"threshold":null,"threshold_mode":"learned","model_action":"a","final_action":"a","limit":"throttled"}],"decision_error":null,"timings":{"upstream_ms":null,"total_ms":1.0},"added_later":{"x":1}}"#;
        let r: Record = serde_json::from_str(text).unwrap();
        assert_eq!(
            r.error.as_ref().unwrap().code,
            ErrorCode::Other("brand_new_code".into())
        );
        assert_eq!(r.request.body.encoding.as_str(), "zstd");
        assert_eq!(r.inbound_tags[0].found_in, FoundIn::Other("trailer".into()));
        assert_eq!(
            r.inbound_tags[0].error,
            Some(TagError::Other("revoked".into()))
        );
        let d = &r.decisions.as_ref().unwrap()[0];
        assert_eq!(d.limit, LimitOutcome::Other("throttled".into()));
        assert_eq!(
            d.threshold_mode,
            Some(ThresholdMode::Other("learned".into()))
        );
        assert!(!d.explored, "absent in older v1 records");
        let back = serde_json::to_string(&r).unwrap();
        assert!(back.contains(r#""code":"brand_new_code""#), "{back}");
        assert!(
            !back.contains("added_later"),
            "unknown fields are read past, not kept"
        );
        let known: Record =
            serde_json::from_str(&text.replace("brand_new_code", "limit_exceeded")).unwrap();
        assert_eq!(known.error.unwrap().code, ErrorCode::LimitExceeded);
    }

    #[test]
    fn another_schema_does_not_read_as_v1() {
        let err = serde_json::from_str::<Version>(r#""sluicegate.record.v2""#).unwrap_err();
        assert!(err.to_string().contains("sluicegate.record.v1"), "{err}");
        assert!(serde_json::from_str::<Version>(r#""sluicegate.record.v1""#).is_ok());
    }
}
