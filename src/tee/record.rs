//! The record: one JSON object per request/response pair (schema `sluicegate.record.v1`; its
//! type is [`v1::Record`], its JSON Schema `src/tee/record.v1.schema.json` is generated from it).
//!
//! The request path only captures raw parts into an [`Exchange`], and checks the provenance
//! tags it carried ([`Exchange::check_inbound_tags`], bounded per record and per second);
//! turning it into JSON happens on the spool writer's thread, off the request path.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::{HeaderMap, HeaderName, Method};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::value::RawValue;
use sha2::Digest;

use super::spool::{EntryKind, SpoolEntry};
use crate::config::policy::{PolicySpec, Protocol, ScoreSpec};
use crate::config::settings::RecordDecisions;
use crate::decide::RowDecision;
use crate::oip;
use crate::provenance::KeyRing;

pub mod v1;

pub const RECORD_SCHEMA: &str = "sluicegate.record.v1";
const REDACTED: &str = "[redacted]";

/// A body as captured while it streamed: the first `cap` bytes and the total size.
#[derive(Clone, Debug, Default)]
pub struct Capture {
    pub bytes: Vec<u8>,
    /// Bytes that passed, captured or not.
    pub size: u64,
    cap: usize,
}

impl Capture {
    pub fn with_cap(cap: usize) -> Self {
        Capture {
            bytes: Vec::new(),
            size: 0,
            cap,
        }
    }

    /// Copies what still fits under the cap; counts everything.
    pub fn push(&mut self, chunk: &[u8]) {
        self.size += chunk.len() as u64;
        let room = self.cap.saturating_sub(self.bytes.len());
        if room > 0 {
            self.bytes
                .extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
    }

    pub fn truncated(&self) -> bool {
        (self.bytes.len() as u64) < self.size
    }

    /// The most it keeps.
    pub fn cap(&self) -> usize {
        self.cap
    }
}

/// One side of the exchange.
#[derive(Debug, Default)]
pub struct Message {
    pub headers: HeaderMap,
    pub trailers: Option<HeaderMap>,
    pub body: Capture,
}

/// Why the proxy answered a request itself, or why an exchange ended early.
#[derive(Clone, Debug, Serialize)]
pub struct ExchangeError {
    /// Stable code, the same as the `error` field of the JSON error sent to the client.
    pub code: &'static str,
    pub message: String,
    /// The gRPC status the client got, when the proxy answered a gRPC call itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
}

/// Everything captured about one request/response pair, raw.
#[derive(Debug)]
pub struct Exchange {
    pub id: String,
    pub time: SystemTime,
    pub route: Arc<str>,
    /// What the record needs of the policy in force when the request came in.
    pub record: Arc<RecordContext>,
    pub consumer: Option<String>,
    pub method: Method,
    /// The normalized path (as routed and forwarded; as sent when refused) and the query.
    pub path: String,
    pub request: Message,
    /// Status sent to the client.
    pub status: Option<u16>,
    /// `None` when the upstream never answered.
    pub response: Option<Message>,
    pub error: Option<ExchangeError>,
    pub upstream_duration: Option<Duration>,
    pub total_duration: Duration,
    /// False when the response did not finish: the client left or the upstream broke mid-body.
    pub complete: bool,
    /// Whether the consumer is declared in the policy.
    pub consumer_declared: bool,
    /// Whether bodies are captured (the policy's switch, or the route's).
    pub capture_bodies: bool,
    /// The route's decisions, or why none could be made; `None` on routes that do not decide.
    pub decision: Option<DecisionOutcome>,
    /// The provenance tag sent with the response.
    pub tag: Option<String>,
    /// The route is in shadow mode: `decision` was made but not applied.
    pub shadow: bool,
    /// Set when the decision step read the whole captured response body as JSON: the record
    /// embeds it without parsing it a second time.
    pub response_read: Option<ReadJson>,
}

/// What the tee reads of one policy: built once per policy snapshot and carried by each
/// exchange to the writer thread, so the tee never holds the policy itself.
#[derive(Clone, Debug)]
pub struct RecordContext {
    /// The policy's version and generation, as records name it.
    pub version: String,
    pub generation: u64,
    /// `tee.redact_headers`, parsed.
    pub redacted_headers: Vec<HeaderName>,
    /// `consumers.header`, parsed: a redacted one keeps the consumer id out too.
    pub consumer_header: HeaderName,
    /// `tee.redact_body` and `tee.hash_body`, parsed.
    pub body_redaction: BodyRedaction,
    /// `tee.body_cap_bytes`, clamped to what fits in a record.
    pub body_cap: usize,
    /// The keys inbound tags are verified with.
    pub keys: Arc<KeyRing>,
    /// Per route, where its scores are read (the record's `score_source`).
    pub score_sources: std::collections::BTreeMap<String, ScoreSource>,
}

/// Where a route reads its scores.
#[derive(Clone, Debug)]
pub struct ScoreSource {
    pub protocol: Protocol,
    pub score: Option<ScoreSpec>,
}

impl RecordContext {
    /// The context of `policy`, named by `version` and `generation`; `max_record_bytes` (a
    /// setting) bounds the body cap. No tag keys: the caller attaches them.
    pub fn new(
        policy: &PolicySpec,
        version: String,
        generation: u64,
        max_record_bytes: u64,
    ) -> Self {
        let tee = &policy.tee;
        RecordContext {
            version,
            generation,
            redacted_headers: tee
                .redact_headers
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).ok())
                .collect(),
            consumer_header: HeaderName::from_bytes(
                policy.consumers.header.to_ascii_lowercase().as_bytes(),
            )
            .unwrap_or(HeaderName::from_static("sluicegate-consumer")),
            body_redaction: BodyRedaction::new(&tee.redact_body, &tee.hash_body),
            body_cap: tee.body_cap_bytes.min(max_record_bytes) as usize,
            keys: Arc::default(),
            score_sources: policy
                .routes
                .iter()
                .map(|(name, route)| {
                    let source = ScoreSource {
                        protocol: route.protocol,
                        score: route.score.clone(),
                    };
                    (name.clone(), source)
                })
                .collect(),
        }
    }
}

/// What the decision step learned reading a response body whole, as JSON.
#[derive(Clone, Debug, Default)]
pub struct ReadJson {
    /// The v2 response's `model_name` and `model_version`.
    pub model_name: Option<String>,
    pub model_version: Option<String>,
}

/// What the decision layers made of a response.
#[derive(Debug)]
pub enum DecisionOutcome {
    Made(Vec<RowDecision>),
    /// The response could not be read (missing output, wrong shape, not JSON…): it passed
    /// through unchanged.
    Failed {
        kind: &'static str,
        message: String,
    },
}

impl Exchange {
    /// Bytes this exchange holds in memory (what bounds the queue in front of the spool).
    pub fn captured_bytes(&self) -> usize {
        self.request.body.bytes.len()
            + self.response.as_ref().map_or(0, |r| r.body.bytes.len())
            + 512
    }
}

/// What is the same for every record of this process.
#[derive(Clone, Debug)]
pub struct EncodeContext {
    pub instance: String,
    pub max_record_bytes: usize,
    pub record_decisions: RecordDecisions,
    /// Tags found on the way in, by route and kind (`direct`, `hidden`, `invalid`, `unverified`).
    pub inbound_tags: prometheus_client::metrics::family::Family<
        super::metrics::RouteKind,
        prometheus_client::metrics::counter::Counter,
    >,
}

/// Most inbound tags recorded per request (a body could carry thousands; all are counted).
const MAX_INBOUND_TAGS: usize = 8;
/// Most inbound tags whose signature is checked per request; the others are recorded and
/// counted as `unverified`.
pub const MAX_VERIFIED_TAGS: usize = 4;
/// CPU time per second that checking inbound tags may take, all requests together: a flood of
/// (forged) tags costs at most this much; past it, tags are recorded `unverified`.
pub const VERIFY_BUDGET_PER_SECOND: Duration = Duration::from_millis(100);

/// What checking inbound tags may spend, per second (see [`VERIFY_BUDGET_PER_SECOND`]).
#[derive(Debug)]
pub struct VerifyBudget {
    start: Instant,
    /// The second (since `start`) that `spent_ns` is for.
    second: AtomicU64,
    spent_ns: AtomicU64,
}

impl Default for VerifyBudget {
    fn default() -> Self {
        VerifyBudget {
            start: Instant::now(),
            second: AtomicU64::new(0),
            spent_ns: AtomicU64::new(0),
        }
    }
}

impl VerifyBudget {
    /// Runs `f` and books its time, or returns `None` when this second's budget is spent.
    /// Concurrent callers may overshoot by one call each.
    fn spend<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        let now = self.start.elapsed().as_secs();
        let second = self.second.load(Ordering::Relaxed);
        if now != second
            && self
                .second
                .compare_exchange(second, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.spent_ns.store(0, Ordering::Relaxed);
        }
        if self.spent_ns.load(Ordering::Relaxed) >= VERIFY_BUDGET_PER_SECOND.as_nanos() as u64 {
            return None;
        }
        let started = Instant::now();
        let out = f();
        let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.spent_ns.fetch_add(took, Ordering::Relaxed);
        Some(out)
    }
}

/// A tag that came in with a request: a model's output fed back as an input.
#[derive(Debug, Serialize)]
struct InboundTag {
    /// Where it was: `header` or `body`.
    found_in: &'static str,
    valid: bool,
    /// `direct` (this model's own output) or `hidden` (another model's); absent when invalid.
    #[serde(skip_serializing_if = "Option::is_none")]
    feedback: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prediction_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<String>,
    /// Why an invalid tag was not trusted (`unverified`: its signature was not checked).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
}

impl InboundTag {
    fn untrusted(found_in: &'static str, error: &'static str) -> Self {
        InboundTag {
            found_in,
            valid: false,
            feedback: None,
            prediction_id: None,
            model: None,
            route: None,
            error: Some(error),
        }
    }
}

/// The provenance tags a request carried, checked ([`Exchange::check_inbound_tags`]).
#[derive(Debug, Default)]
pub struct InboundTags(Vec<InboundTag>);

impl Exchange {
    /// Finds the tags in the request (header `sluicegate-tag`, or any string in the body, JSON
    /// escapes and any nesting depth included), verifies at most [`MAX_VERIFIED_TAGS`] of them
    /// with the policy's keys within `budget`, classifies them against this exchange's model and
    /// counts every one found in `counter` (`direct`, `hidden`, `invalid`, `unverified`). Runs
    /// on the request path, so a flood of tags costs the spool writer nothing.
    /// A gRPC `ModelInfer` call.
    fn is_model_infer_grpc(&self) -> bool {
        self.path.split('?').next() == Some(oip::MODEL_INFER_PATH)
            && oip::is_grpc(self.request.headers.get(http::header::CONTENT_TYPE))
    }

    pub fn check_inbound_tags(
        &self,
        budget: &VerifyBudget,
        counter: &prometheus_client::metrics::family::Family<
            super::metrics::RouteKind,
            prometheus_client::metrics::counter::Counter,
        >,
    ) -> InboundTags {
        let headers = self.request.headers.get_all("sluicegate-tag");
        let header_total = headers.iter().count();
        let mut tokens: Vec<(&'static str, String)> = headers
            .iter()
            .take(MAX_INBOUND_TAGS)
            .map(|v| {
                (
                    "header",
                    String::from_utf8_lossy(v.as_bytes()).trim().to_owned(),
                )
            })
            .collect();
        let keep = MAX_INBOUND_TAGS.saturating_sub(tokens.len());
        let body = &self.request.body.bytes;
        let scanned = if self.is_model_infer_grpc() {
            // A tag sent back as input sits in a BYTES tensor or a string parameter.
            let encoding = self
                .request
                .headers
                .get("grpc-encoding")
                .and_then(|v| v.to_str().ok());
            let strings = oip::request_strings(encoding, body);
            crate::provenance::scan_tag_strings(strings.iter().map(Vec::as_slice), keep)
        } else {
            crate::provenance::scan_tags(body, keep)
        };
        tokens.extend(scanned.first.into_iter().map(|t| ("body", t)));
        let count = |kind: &'static str, n: usize| {
            if n > 0 {
                counter
                    .get_or_create(&super::metrics::RouteKind {
                        route: self.route.to_string(),
                        kind,
                    })
                    .inc_by(n as u64);
            }
        };
        // Found, but past the number recorded: counted only.
        count("unverified", header_total + scanned.total - tokens.len());
        let mut this_model: Option<Option<String>> = None;
        let tags = tokens
            .into_iter()
            .enumerate()
            .map(|(i, (found_in, token))| {
                let verified = if i < MAX_VERIFIED_TAGS {
                    budget.spend(|| self.record.keys.verify(&token))
                } else {
                    None
                };
                let tag = match verified {
                    None => InboundTag::untrusted(found_in, "unverified"),
                    Some(Err(e)) => InboundTag::untrusted(found_in, e.kind()),
                    Some(Ok(c)) => {
                        let this_model = this_model.get_or_insert_with(|| self.model_name());
                        let same = match (c.model.as_deref(), this_model.as_deref()) {
                            (Some(a), Some(b)) => a == b,
                            _ => c.route == *self.route,
                        };
                        InboundTag {
                            found_in,
                            valid: true,
                            feedback: Some(if same { "direct" } else { "hidden" }),
                            prediction_id: Some(c.prediction_id),
                            model: c.model,
                            route: Some(c.route),
                            error: None,
                        }
                    }
                };
                count(
                    match (tag.feedback, tag.error) {
                        (Some(feedback), _) => feedback,
                        (None, Some("unverified")) => "unverified",
                        (None, _) => "invalid",
                    },
                    1,
                );
                tag
            })
            .collect();
        InboundTags(tags)
    }

    /// The model: the v2 response's `model_name`, else the one in the request path.
    fn model_name(&self) -> Option<String> {
        match &self.response_read {
            Some(read) => read.model_name.clone(),
            None => self
                .response
                .as_ref()
                .and_then(|r| serde_json::from_slice::<Probe>(&r.body.bytes).ok())
                .and_then(|p| raw_str(p.model_name)),
        }
        .or_else(|| model_from_path(&self.path).0.map(str::to_owned))
    }
}

/// The pod name (`POD_NAME`, as the Downward API sets it), else `HOSTNAME`, else the host name.
pub fn instance_name() -> String {
    std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| gethostname::gethostname().to_string_lossy().into_owned())
}

impl Exchange {
    /// Checks the inbound tags (with a budget of its own) and encodes the record.
    pub fn encode(&self, ctx: &EncodeContext) -> SpoolEntry {
        let inbound = self.check_inbound_tags(&VerifyBudget::default(), &ctx.inbound_tags);
        self.encode_checked(ctx, &inbound)
    }

    /// Encodes the record with its checked inbound tags, under the record size limit: bodies
    /// are cut first, then per-row decisions go into columns, and only then are the decisions
    /// left out (counted in `decisions_omitted`).
    pub fn encode_checked(&self, ctx: &EncodeContext, inbound: &InboundTags) -> SpoolEntry {
        let timestamp_ms = self
            .time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let redaction = &self.record.body_redaction;
        let model_infer = self.path.split('?').next() == Some(oip::MODEL_INFER_PATH);
        let request_body = Body::new(
            &self.request.body,
            &self.request.headers,
            redaction,
            false,
            model_infer.then_some(oip::Side::Request),
        );
        let response_body = self.response.as_ref().map(|r| {
            Body::new(
                &r.body,
                &r.headers,
                redaction,
                self.response_read.is_some(),
                model_infer.then_some(oip::Side::Response),
            )
        });
        let rows = match &self.decision {
            Some(DecisionOutcome::Made(rows)) => rows.as_slice(),
            _ => &[],
        };
        let columns = match ctx.record_decisions {
            _ if rows.is_empty() => None,
            RecordDecisions::Rows => None,
            RecordDecisions::Columns => Columns::new(rows),
        };
        let body_limit = request_body
            .recorded_len()
            .max(response_body.as_ref().map_or(0, Body::recorded_len));
        let mut record = RecordWriter {
            exchange: self,
            instance: &ctx.instance,
            inbound: &inbound.0,
            request_body,
            response_body,
            body_limit,
            decisions: match columns {
                Some(c) => Decisions::Columns(c),
                None => Decisions::Rows,
            },
        };
        let mut payload = Vec::with_capacity(record.body_limit * 2 + 1024);
        loop {
            payload.clear();
            record.write(&mut payload);
            if payload.len() <= ctx.max_record_bytes {
                break;
            }
            if record.body_limit > 0 {
                // Halving converges in a few rounds; JSON escaping and base64 make the encoded
                // size hard to predict from the raw size.
                record.body_limit /= 2;
                continue;
            }
            record.decisions = match record.decisions {
                _ if rows.is_empty() => break,
                Decisions::Rows => {
                    Columns::new(rows).map_or(Decisions::Omitted, Decisions::Columns)
                }
                Decisions::Columns(_) => Decisions::Omitted,
                Decisions::Omitted => break,
            };
        }
        SpoolEntry {
            kind: EntryKind::Record,
            timestamp_ms,
            key: self.id.clone(),
            route: self.route.to_string(),
            payload,
        }
    }
}

/// How the record holds the decisions of a decided response.
enum Decisions<'a> {
    /// One object per row (`decisions`).
    Rows,
    /// `decision_columns`.
    Columns(Columns<'a>),
    /// Neither: the record would not fit with them (`decisions_omitted`).
    Omitted,
}

/// Writes an [`Exchange`] as the v1 record, with bodies cut to `body_limit` bytes.
struct RecordWriter<'a> {
    exchange: &'a Exchange,
    instance: &'a str,
    inbound: &'a [InboundTag],
    request_body: Body<'a>,
    response_body: Option<Body<'a>>,
    body_limit: usize,
    decisions: Decisions<'a>,
}

#[derive(Serialize)]
struct Model<'a> {
    name: Option<&'a str>,
    version: Option<&'a str>,
}

#[derive(Serialize)]
struct RowView<'a> {
    row: usize,
    score: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    class_scores: Option<&'a [f64]>,
    threshold: Option<f64>,
    threshold_mode: Option<&'static str>,
    model_action: &'a str,
    final_action: &'a str,
    limit: &'static str,
    explored: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    propensity: Option<f64>,
}

#[derive(Serialize)]
struct DecisionErrorView<'a> {
    kind: &'static str,
    message: &'a str,
}

#[derive(Serialize)]
struct Consumer<'a> {
    id: Option<&'a str>,
    declared: bool,
}

#[derive(Serialize)]
struct PolicyRef<'a> {
    version: &'a str,
    generation: u64,
}

#[derive(Serialize)]
struct Timings {
    upstream_ms: Option<f64>,
    total_ms: f64,
}

/// The few fields read out of a JSON body (v2 request `id`, v2 response model name/version).
#[derive(serde::Deserialize, Default)]
struct Probe<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    model_name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    model_version: Option<&'a RawValue>,
}

fn raw_str(v: Option<&RawValue>) -> Option<String> {
    v.and_then(|r| serde_json::from_str::<String>(r.get()).ok())
}

/// A captured body, classified once.
struct Body<'a> {
    capture: &'a Capture,
    /// The whole body, when it is one JSON value (a gRPC `ModelInfer` message: as the REST
    /// v2 body of the same call).
    json: Option<Cow<'a, str>>,
    /// A gRPC `ModelInfer` message's id and model (its JSON moved into `json`).
    grpc: Option<oip::AsJson>,
    /// The JSON body with the policy's redactions applied (re-serialized).
    redacted: Option<String>,
    /// The policy redacts body fields: a body that cannot be redacted (not whole JSON) is
    /// not recorded at all.
    must_redact: bool,
    probe: Probe<'a>,
    binary_type: bool,
}

impl<'a> Body<'a> {
    /// `read_whole`: the decision step read these bytes as one JSON value already.
    /// `model_infer`: the exchange is a `ModelInfer` call, and this its request or response.
    fn new(
        capture: &'a Capture,
        headers: &HeaderMap,
        redaction: &BodyRedaction,
        read_whole: bool,
        model_infer: Option<oip::Side>,
    ) -> Self {
        let content_type = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let grpc_type = oip::is_grpc(headers.get(http::header::CONTENT_TYPE));
        let binary_type = grpc_type
            || content_type.starts_with("application/octet-stream")
            || content_type.starts_with("application/x-protobuf");
        // A whole OIP message reads as the REST body of the same call, so consumers and the
        // audit read both alike; one cut by the capture cap, or whose JSON would be, stays
        // base64.
        let mut grpc = model_infer
            .filter(|_| grpc_type && !capture.truncated())
            .and_then(|side| {
                let encoding = headers.get("grpc-encoding").and_then(|v| v.to_str().ok());
                oip::as_v2_json(side, encoding, &capture.bytes)
            })
            .filter(|g| g.json.len() <= capture.cap());
        let (json, probe) = if let Some(g) = grpc.as_mut() {
            (
                Some(Cow::Owned(std::mem::take(&mut g.json))),
                Probe::default(),
            )
        } else if binary_type || capture.truncated() {
            (None, Probe::default())
        } else if read_whole {
            // Its syntax was checked by that read; UTF-8 inside the strings it skipped was not.
            let text = std::str::from_utf8(&capture.bytes).ok();
            (text.map(Cow::Borrowed), Probe::default())
        } else {
            let (text, probe) = json_with_probe(&capture.bytes);
            (text.map(Cow::Borrowed), probe)
        };
        // A record is one line (`spool cat`, and JSON-lines tools after it): a body sent
        // pretty-printed goes in with its line breaks, and only those, taken out.
        let json = json.map(|text| match text {
            Cow::Borrowed(t) if memchr::memchr2(b'\n', b'\r', t.as_bytes()).is_some() => {
                Cow::Owned(without_line_breaks(t))
            }
            other => other,
        });
        // A pointer whose keys are nowhere in the body cannot match: skip the parse and
        // re-serialization it would cost (the body is recorded as sent).
        let must_redact =
            !redaction.is_empty() && json.as_deref().is_none_or(|text| redaction.may_apply(text));
        let redacted = json
            .as_deref()
            .filter(|_| must_redact)
            .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
            .map(|mut v| {
                redaction.apply(&mut v);
                v.to_string()
            });
        Body {
            capture,
            json,
            grpc,
            redacted,
            must_redact,
            probe,
            binary_type,
        }
    }

    /// Whether the record holds this body whole, as the JSON it was, with `limit` bytes
    /// of room.
    fn recorded_whole_as_json(&self, limit: usize, captured: bool) -> bool {
        captured && self.json.is_some() && !self.must_redact && self.recorded_len() <= limit
    }

    /// What the record holds of the body whole: its JSON for a gRPC message read as JSON,
    /// else its bytes.
    fn recorded_len(&self) -> usize {
        match (&self.grpc, &self.json) {
            (Some(_), Some(json)) => json.len(),
            _ => self.capture.bytes.len(),
        }
    }

    /// The message's model name and version, and id, for a gRPC message read as JSON.
    fn grpc_model(&self) -> (Option<String>, Option<String>) {
        self.grpc.as_ref().map_or((None, None), |g| {
            (g.model_name.clone(), g.model_version.clone())
        })
    }

    /// Writes the `body` object: the bytes cut to `limit`, or none when `captured` is false.
    /// `size` is always the bytes' count (a gRPC message's protobuf size).
    fn write(&self, out: &mut Vec<u8>, limit: usize, captured: bool) {
        let capture = self.capture;
        let bytes = &capture.bytes[..capture.bytes.len().min(limit)];
        // A message read as JSON is recorded whole as JSON while it fits, else as base64.
        let json_fits = self.grpc.is_none() || self.recorded_len() <= limit;
        let truncated = (bytes.len() as u64) < capture.size;
        let mut o = JsonObject::open(out);
        if !captured {
            o.field("encoding", "none");
            o.field("size", &capture.size);
            o.field("truncated", &(capture.size > 0));
            return o.close();
        }
        match (self.json.as_deref().filter(|_| json_fits), truncated) {
            (Some(_), false) if self.must_redact => match &self.redacted {
                Some(redacted) => {
                    o.field("encoding", "json");
                    o.raw("data", redacted.as_bytes());
                }
                None => o.field("encoding", "none"),
            },
            // Complete JSON goes in as it was sent (validated once, in `json_with_probe`):
            // numbers exactly as sent, no second parse.
            (Some(text), false) => {
                o.field("encoding", "json");
                o.raw("data", text.as_bytes());
            }
            // Fields must be redacted but the body is not whole JSON: record none of it.
            _ if self.must_redact => o.field("encoding", "none"),
            _ => match text_prefix(bytes, truncated).filter(|_| !self.binary_type) {
                Some(text) => {
                    o.field("encoding", "text");
                    o.field("data", text);
                }
                None => {
                    o.field("encoding", "base64");
                    o.field(
                        "data",
                        &base64::engine::general_purpose::STANDARD.encode(bytes),
                    );
                }
            },
        }
        o.field("size", &capture.size);
        o.field("truncated", &truncated);
        o.close()
    }
}

/// JSON text with the whitespace between its tokens removed (valid JSON holds no raw line
/// break inside a string); numbers and strings stay exactly as sent.
fn without_line_breaks(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            in_string = c == '"';
            out.push(c);
        }
    }
    out
}

/// The body as JSON text when it is one JSON value, and the few fields read from it, in one
/// parse: reading an object into [`Probe`] validates every byte of it (unknown fields are
/// parsed and ignored) just as reading it as a raw value would.
fn json_with_probe(bytes: &[u8]) -> (Option<&str>, Probe<'_>) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return (None, Probe::default());
    };
    let starts_object = text.trim_start().starts_with('{');
    if starts_object {
        if let Ok(probe) = serde_json::from_str::<Probe>(text) {
            return (Some(text), probe);
        }
    }
    // Not an object, or one that does not read as a probe (a duplicate `id`, say): valid JSON
    // all the same?
    match serde_json::from_str::<serde::de::IgnoredAny>(text) {
        Ok(_) => (Some(text), Probe::default()),
        Err(_) => (None, Probe::default()),
    }
}

/// A JSON object written field by field into a buffer: the record is written once, straight
/// into the bytes that go to the spool, with bodies embedded as they are.
struct JsonObject<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> JsonObject<'a> {
    fn open(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        JsonObject { out, first: true }
    }

    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    /// A field serialized with serde (keys here are plain ASCII: no escaping needed).
    fn field<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) {
        self.key(key);
        serde_json::to_writer(&mut *self.out, value).expect("writing to a Vec cannot fail");
    }

    /// A field whose value is JSON text already.
    fn raw(&mut self, key: &str, json: &[u8]) {
        self.key(key);
        self.out.extend_from_slice(json);
    }

    /// A field whose value is an object written by `f`.
    fn object(&mut self, key: &str, f: impl FnOnce(&mut Vec<u8>)) {
        self.key(key);
        f(self.out);
    }

    fn close(self) {
        self.out.push(b'}');
    }
}

/// Body fields redacted or hashed in records, by JSON pointer (`*` matches every element).
#[derive(Clone, Debug, Default)]
pub struct BodyRedaction {
    redact: Vec<Vec<String>>,
    hash: Vec<Vec<String>>,
}

impl BodyRedaction {
    pub fn new(redact: &[String], hash: &[String]) -> Self {
        let parse = |ps: &[String]| {
            ps.iter()
                .map(|p| {
                    p.split('/')
                        .skip(1)
                        .map(|s| s.replace("~1", "/").replace("~0", "~"))
                        .collect()
                })
                .collect()
        };
        BodyRedaction {
            redact: parse(redact),
            hash: parse(hash),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.redact.is_empty() && self.hash.is_empty()
    }

    /// Whether some pointer may match in this JSON text: false only when, for every pointer,
    /// an object key it names does not appear in the text at all.
    fn may_apply(&self, text: &str) -> bool {
        // A key may be spelled with \u escapes, which a text search would miss.
        if text.contains("\\u") {
            return true;
        }
        self.redact.iter().chain(&self.hash).any(|path| {
            let key = path.iter().find(|seg| {
                *seg != "*" && seg.parse::<usize>().is_err() && !seg.contains(['"', '\\'])
            });
            match key {
                Some(key) => text.contains(&format!("\"{key}\"")),
                // Only wildcards and indexes: cannot tell without parsing.
                None => true,
            }
        })
    }

    fn apply(&self, v: &mut serde_json::Value) {
        for path in &self.redact {
            at(v, path, &|x| {
                *x = serde_json::Value::String(REDACTED.into())
            });
        }
        for path in &self.hash {
            at(v, path, &|x| {
                let digest = sha2::Sha256::digest(x.to_string().as_bytes());
                let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
                *x = serde_json::Value::String(format!("sha256:{hex}"));
            });
        }
    }
}

/// Applies `f` to every value at `path` (segments; `*` is every element or member).
fn at(v: &mut serde_json::Value, path: &[String], f: &dyn Fn(&mut serde_json::Value)) {
    use serde_json::Value;
    let Some((seg, rest)) = path.split_first() else {
        f(v);
        return;
    };
    match v {
        Value::Array(items) if seg == "*" => items.iter_mut().for_each(|x| at(x, rest, f)),
        Value::Object(members) if seg == "*" => members.values_mut().for_each(|x| at(x, rest, f)),
        Value::Array(items) => {
            if let Some(x) = seg.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                at(x, rest, f);
            }
        }
        Value::Object(members) => {
            if let Some(x) = members.get_mut(seg.as_str()) {
                at(x, rest, f);
            }
        }
        _ => {}
    }
}

/// The bytes as text if they are UTF-8; a truncated body may end inside a character, so up to
/// three trailing bytes may be dropped.
fn text_prefix(bytes: &[u8], truncated: bool) -> Option<&str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Some(s),
        Err(e) if truncated && e.error_len().is_none() => {
            std::str::from_utf8(&bytes[..e.valid_up_to()]).ok()
        }
        Err(_) => None,
    }
}

struct HeadersView<'a> {
    headers: &'a HeaderMap,
    redacted: &'a [HeaderName],
}

impl Serialize for HeadersView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.headers.keys_len()))?;
        for name in self.headers.keys() {
            if self.redacted.contains(name) {
                m.serialize_entry(name.as_str(), REDACTED)?;
                continue;
            }
            let mut joined = String::new();
            for (i, v) in self.headers.get_all(name).iter().enumerate() {
                if i > 0 {
                    joined.push_str(", ");
                }
                joined.push_str(&String::from_utf8_lossy(v.as_bytes()));
            }
            m.serialize_entry(name.as_str(), &joined)?;
        }
        m.end()
    }
}

/// Model name and version from the path: `/v2/models/NAME[/versions/V]/…` (Open Inference
/// Protocol) or `/v1/models/NAME[/versions/V]:predict` (TF-Serving).
fn model_from_path(path: &str) -> (Option<&str>, Option<&str>) {
    let path = path.split('?').next().unwrap_or("");
    let rest = path
        .strip_prefix("/v2/models/")
        .or_else(|| path.strip_prefix("/v1/models/"));
    let Some(rest) = rest else {
        return (None, None);
    };
    let mut parts = rest.split('/');
    let name = parts.next().map(|n| n.split(':').next().unwrap_or(n));
    let version = match (parts.next(), parts.next()) {
        (Some("versions"), Some(v)) => Some(v.split(':').next().unwrap_or(v)),
        _ => None,
    };
    (name.filter(|n| !n.is_empty()), version)
}

impl RecordWriter<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        let ex = self.exchange;
        let policy = &ex.record;
        let captured = ex.capture_bodies;
        let redacted = policy.redacted_headers.as_slice();

        let (path_model, path_version) = model_from_path(&ex.path);
        let probe = self.response_body.as_ref().map(|b| &b.probe);
        let (model_name, model_version) = match &ex.response_read {
            Some(read) => (read.model_name.clone(), read.model_version.clone()),
            None => match self.response_body.as_ref().map(Body::grpc_model) {
                // A gRPC message names its model; its request does when its response cannot.
                Some((name @ Some(_), version)) => (name, version),
                _ if self.request_body.grpc.is_some() => self.request_body.grpc_model(),
                _ => (
                    raw_str(probe.and_then(|p| p.model_name)),
                    raw_str(probe.and_then(|p| p.model_version)),
                ),
            },
        };
        let v2_id = raw_str(self.request_body.probe.id)
            .or_else(|| self.request_body.grpc.as_ref().and_then(|g| g.id.clone()));
        let (path, query) = match ex.path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (ex.path.as_str(), None),
        };
        let headers = |headers| HeadersView { headers, redacted };

        let mut m = JsonObject::open(out);
        m.field("schema", RECORD_SCHEMA);
        m.field("id", &ex.id);
        m.field(
            "time",
            &humantime::format_rfc3339_micros(ex.time).to_string(),
        );
        m.field("instance", self.instance);
        m.field("route", &*ex.route);
        m.field(
            "model",
            &Model {
                name: model_name.as_deref().or(path_model),
                version: model_version.as_deref().or(path_version),
            },
        );
        // The consumer header is a header like any other: redacted, its value stays out.
        let consumer_redacted = redacted.contains(&policy.consumer_header);
        m.field(
            "consumer",
            &Consumer {
                id: ex
                    .consumer
                    .as_deref()
                    .map(|c| if consumer_redacted { REDACTED } else { c }),
                declared: ex.consumer_declared,
            },
        );
        m.field(
            "policy",
            &PolicyRef {
                version: &policy.version,
                generation: policy.generation,
            },
        );
        m.object("request", |out| {
            let mut r = JsonObject::open(out);
            r.field("method", ex.method.as_str());
            r.field("path", path);
            r.field("query", &query);
            r.field("headers", &headers(&ex.request.headers));
            r.field("v2_id", &v2_id);
            r.object("body", |out| {
                self.request_body.write(out, self.body_limit, captured)
            });
            r.close();
        });
        match ex.response.as_ref().zip(self.response_body.as_ref()) {
            Some((response, body)) => m.object("response", |out| {
                let mut r = JsonObject::open(out);
                r.field("status", &ex.status.unwrap_or(0));
                r.field("headers", &headers(&response.headers));
                r.field("trailers", &response.trailers.as_ref().map(headers));
                r.object("body", |out| body.write(out, self.body_limit, captured));
                r.close();
            }),
            None => m.field("response", &()),
        }
        m.field("status", &ex.status);
        m.field("error", &ex.error);
        m.field("complete", &ex.complete);
        m.field("tag", &ex.tag);
        m.field("inbound_tags", self.inbound);
        match &ex.decision {
            Some(DecisionOutcome::Made(rows)) => {
                match &self.decisions {
                    Decisions::Rows => m.field("decisions", &RowsView(rows)),
                    Decisions::Columns(_) | Decisions::Omitted => m.field("decisions", &()),
                }
                m.field("decision_error", &());
                match &self.decisions {
                    Decisions::Rows => {}
                    Decisions::Columns(columns) => {
                        // The scores are not repeated when the response body is recorded
                        // whole: they are in it, where the route read them.
                        let scores_in_body = self
                            .response_body
                            .as_ref()
                            .is_some_and(|b| b.recorded_whole_as_json(self.body_limit, captured));
                        let source = policy.score_sources.get(&*ex.route);
                        m.object("decision_columns", |out| {
                            columns.write(out, rows, source, scores_in_body)
                        });
                    }
                    Decisions::Omitted => m.field("decisions_omitted", &rows.len()),
                }
                if ex.shadow {
                    m.field("shadow", &true);
                }
            }
            Some(DecisionOutcome::Failed { kind, message }) => {
                m.field("decisions", &());
                m.field("decision_error", &DecisionErrorView { kind, message });
            }
            None => {
                m.field("decisions", &());
                m.field("decision_error", &());
            }
        }
        m.field(
            "timings",
            &Timings {
                upstream_ms: ex.upstream_duration.map(|d| d.as_secs_f64() * 1e3),
                total_ms: ex.total_duration.as_secs_f64() * 1e3,
            },
        );
        m.close();
    }
}

/// The `decisions` array, one object per row.
struct RowsView<'a>(&'a [RowDecision]);

impl Serialize for RowsView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().enumerate().map(|(row, d)| RowView {
            row,
            score: d.score,
            class_scores: d.class_scores.as_deref(),
            threshold: d.threshold,
            threshold_mode: d.threshold_mode,
            model_action: &d.model_action,
            final_action: &d.final_action,
            limit: d.limit.as_str(),
            explored: d.explored,
            propensity: d.propensity,
        }))
    }
}

/// A batch's decisions as `decision_columns` (see [`v1::DecisionColumns`]): one code
/// character per row for what is categorical, runs of equal values for the threshold.
struct Columns<'a> {
    outcomes: Vec<OutcomeView<'a>>,
    codes: String,
}

#[derive(Clone, Copy, PartialEq, Serialize)]
struct OutcomeView<'a> {
    model_action: &'a str,
    final_action: &'a str,
    limit: &'static str,
    explored: bool,
}

impl<'a> Columns<'a> {
    /// `None` when the batch has more distinct outcomes than there are codes.
    fn new(rows: &'a [RowDecision]) -> Option<Self> {
        let mut outcomes: Vec<OutcomeView> = Vec::new();
        let mut codes = String::with_capacity(rows.len());
        for d in rows {
            let outcome = OutcomeView {
                model_action: &d.model_action,
                final_action: &d.final_action,
                limit: d.limit.as_str(),
                explored: d.explored,
            };
            let i = match outcomes.iter().position(|o| *o == outcome) {
                Some(i) => i,
                None => {
                    outcomes.push(outcome);
                    outcomes.len() - 1
                }
            };
            codes.push(char::from(*v1::CODE_ALPHABET.get(i)?));
        }
        Some(Columns { outcomes, codes })
    }

    fn write(
        &self,
        out: &mut Vec<u8>,
        rows: &[RowDecision],
        source: Option<&ScoreSource>,
        scores_in_body: bool,
    ) {
        let mut c = JsonObject::open(out);
        c.field("rows", &rows.len());
        if scores_in_body {
            c.field("score", &());
        } else {
            c.field("score", &SeqOf(|| rows.iter().map(|d| d.score)));
            if rows.iter().any(|d| d.class_scores.is_some()) {
                c.field(
                    "class_scores",
                    &SeqOf(|| {
                        rows.iter()
                            .map(|d| d.class_scores.as_deref().unwrap_or(&[]))
                    }),
                );
            }
        }
        let spec = source.and_then(|r| r.score.as_ref());
        c.field(
            "score_source",
            &ScoreSourceView {
                protocol: source.map(|r| r.protocol),
                output: spec.and_then(|s| s.output.as_deref()),
                column: spec.and_then(|s| s.column),
                pointer: spec.and_then(|s| s.pointer.as_deref()),
            },
        );
        c.field("threshold", &runs(rows.iter().map(|d| d.threshold)));
        c.field(
            "threshold_mode",
            &runs(rows.iter().map(|d| d.threshold_mode)),
        );
        c.field("outcomes", &self.outcomes);
        c.field("codes", &self.codes);
        if rows.iter().any(|d| d.propensity.is_some()) {
            c.field("propensity", &runs(rows.iter().map(|d| d.propensity)));
        }
        c.close();
    }
}

/// Runs of equal consecutive values, `[value, count]`.
fn runs<T: PartialEq>(values: impl Iterator<Item = T>) -> Vec<(T, u64)> {
    let mut out: Vec<(T, u64)> = Vec::new();
    for v in values {
        match out.last_mut() {
            Some((last, n)) if *last == v => *n += 1,
            _ => out.push((v, 1)),
        }
    }
    out
}

#[derive(Serialize)]
struct ScoreSourceView<'a> {
    protocol: Option<Protocol>,
    output: Option<&'a str>,
    column: Option<usize>,
    pointer: Option<&'a str>,
}

/// Serializes what `items` yields as a JSON array, without collecting it first.
struct SeqOf<F>(F);

impl<F, I> Serialize for SeqOf<F>
where
    F: Fn() -> I,
    I: Iterator,
    I::Item: Serialize,
{
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq((self.0)())
    }
}

#[cfg(test)]
mod tests;
