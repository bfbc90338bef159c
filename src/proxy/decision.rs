//! The decision step of a deciding route: read the whole response, extract scores, apply the
//! threshold and the limits, and write the decisions into headers (always) and the body (if
//! the route asks). A gzip or deflate response is decoded first. A response the route cannot
//! read passes through unchanged, recorded with a decision error — never a 5xx to the client
//! because of sluicegate.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::response::Parts;
use http::Response;
use http_body::Body;
use http_body_util::BodyExt;
use serde_json::{json, Value};

use std::sync::Arc;

use super::body::{BoxError, ResponseBody, UpstreamBody, UpstreamIncoming};
use super::error::ProxyError;
use super::pending::Pending;
use super::{per_response_value, Admitted, Proxy};
use crate::config::policy::Protocol;
use crate::decide::extract::{extract, extract_v2, ExtractError, Scores, SplicePoint};
use crate::decide::{Decided, LimitOutcome, Route};
use crate::policy::Policy;
use crate::provenance::{ClaimsInput, TagClaims};
use crate::tee::alert::Alert;
use crate::tee::record::{DecisionOutcome, ReadJson};
use crate::telemetry::{AlertLabel, RouteAction, RouteMetrics};

mod grpc;

pub(super) use grpc::respond_model_infer;

pub(super) const ACTION_HEADER: HeaderName = HeaderName::from_static("sluicegate-action");
pub(super) const MODEL_ACTION_HEADER: HeaderName =
    HeaderName::from_static("sluicegate-model-action");
pub(super) const LIMIT_HEADER: HeaderName = HeaderName::from_static("sluicegate-limit");
pub(super) const THRESHOLD_HEADER: HeaderName = HeaderName::from_static("sluicegate-threshold");
pub(super) const TAG_HEADER: HeaderName = HeaderName::from_static("sluicegate-tag");
pub(super) const ROWS_HEADER: HeaderName = HeaderName::from_static("sluicegate-rows");
/// `shadow` on a shadow route's responses: decided and recorded, not applied.
pub(super) const MODE_HEADER: HeaderName = HeaderName::from_static("sluicegate-mode");
pub(super) const ACTION_COUNTS_HEADER: HeaderName =
    HeaderName::from_static("sluicegate-action-counts");
pub(super) const MODEL_ACTION_COUNTS_HEADER: HeaderName =
    HeaderName::from_static("sluicegate-model-action-counts");
pub(super) const LIMIT_COUNTS_HEADER: HeaderName =
    HeaderName::from_static("sluicegate-limit-counts");

/// The most rows the decision headers list one value per row; past it they are counted
/// instead (the per-row truth stays in the body tensor and the record).
pub(super) const MAX_PER_ROW_HEADER_ROWS: usize = 64;

/// All `sluicegate-*` headers of a decided response together stay under this many bytes, as
/// sent over HTTP/1.1 (`name: value` and CRLF): proxies in front buffer a whole response head
/// in 4 KiB by default (nginx's `proxy_buffer_size`), and the model's own headers need room.
pub(super) const HEADER_BUDGET: usize = 2048;

/// The upstream body, read whole if it fits under the limit.
pub(super) enum Collected {
    /// The body and its trailers (gRPC's status; JSON responses have none).
    Whole(Bytes, Option<http::HeaderMap>),
    /// Over the limit: what was read so far, and the rest still streaming.
    TooLarge(VecDeque<Bytes>, UpstreamIncoming),
    Broken(BoxError),
}

/// Capture, the read: the whole body, unless it is over `limit`.
pub(super) async fn collect_up_to(mut body: UpstreamIncoming, limit: u64) -> Collected {
    let mut chunks = VecDeque::new();
    let mut total = 0u64;
    let mut trailers = None;
    loop {
        match body.frame().await {
            None => break,
            Some(Err(e)) => return Collected::Broken(e),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    total += data.len() as u64;
                    chunks.push_back(data);
                    if total > limit && !body.is_end_stream() {
                        return Collected::TooLarge(chunks, body);
                    }
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            },
        }
    }
    let mut whole = Vec::with_capacity(total as usize);
    for c in chunks {
        whole.extend_from_slice(&c);
    }
    Collected::Whole(Bytes::from(whole), trailers)
}

/// A body too large to decide passes through undecided, what was read first then the rest.
pub(super) fn pass_too_large(
    proxy: &Proxy,
    mut admitted: Admitted,
    parts: Parts,
    prefix: VecDeque<Bytes>,
    rest: UpstreamIncoming,
) -> Response<ResponseBody> {
    let mut pending = admitted.pending.take();
    decision_error(
        &admitted.metrics,
        &mut pending,
        "response_too_large",
        format!(
            "response larger than {} bytes; passed through undecided",
            proxy.max_decided_response
        ),
    );
    if let Some(p) = pending.as_mut() {
        for chunk in &prefix {
            p.capture_frame(&http_body::Frame::data(chunk.clone()));
        }
    }
    admitted.answered(parts.status.as_u16());
    Response::from_parts(
        parts,
        ResponseBody::Prefixed(prefix, UpstreamBody::new(rest, pending)),
    )
}

/// A deciding route's response read whole and decoded, its body in the record.
pub struct Captured {
    route: Arc<Route>,
    parts: Parts,
    bytes: Bytes,
}

/// What the decide phase made of a captured response.
pub struct Decision {
    read: Read,
    decided: Decided,
    /// Signed only for a response that goes out decided (not for a limit's 429).
    tag: Option<String>,
}

/// See [`Proxy::capture_whole`].
pub(super) fn capture_whole(
    proxy: &Proxy,
    admitted: &mut Admitted,
    route: Arc<Route>,
    mut parts: Parts,
    bytes: Bytes,
) -> Result<Captured, Box<Response<ResponseBody>>> {
    // Asked for `identity`, a server may compress all the same: decided on what it says,
    // sent on decoded (identity is acceptable to every client), recorded decoded.
    let bytes = match decode_content(&parts.headers, bytes, proxy.max_decided_response) {
        Ok(Decoded::Identity(bytes)) => bytes,
        Ok(Decoded::Decoded(bytes)) => {
            parts.headers.remove(header::CONTENT_ENCODING);
            if let Some(p) = admitted.pending.as_mut() {
                p.response_decoded();
            }
            bytes
        }
        Err((err, raw)) => {
            let mut pending = admitted.pending.take();
            decision_error(&admitted.metrics, &mut pending, err.kind(), err.to_string());
            if let Some(p) = pending.as_mut() {
                p.capture_frame(&http_body::Frame::data(raw.clone()));
            }
            admitted.answered(parts.status.as_u16());
            return Err(Box::new(finish(parts, raw, pending)));
        }
    };
    if let Some(p) = admitted.pending.as_mut() {
        p.capture_frame(&http_body::Frame::data(bytes.clone()));
    }
    Ok(Captured {
        route,
        parts,
        bytes,
    })
}

/// See [`Proxy::decide`].
pub(super) fn decide(
    proxy: &Proxy,
    admitted: &Admitted,
    captured: &Captured,
) -> Result<Decision, ExtractError> {
    let route = &*captured.route;
    let (read, scores) = read_response(route, &captured.bytes)?;
    let (model, version) = read.model();
    let (decided, tag) = decide_scores(proxy, admitted, route, &scores, model, version);
    Ok(Decision { read, decided, tag })
}

/// Decides a response's `scores` on `route`, whatever the wire they came over: thresholds and
/// limits, alerts, the metrics, and the signed tag (none for a limit's rejection). `model` and
/// `version` are the response's own, if it names them.
pub(super) fn decide_scores(
    proxy: &Proxy,
    admitted: &Admitted,
    route: &Route,
    scores: &Scores,
    model: Option<String>,
    version: Option<String>,
) -> (Decided, Option<String>) {
    let policy = &*admitted.policy;
    let decided = route.decide(scores, Instant::now());
    alerts(proxy, policy, &decided);
    admitted
        .metrics
        .scores(decided.rows.iter().map(|r| r.score));

    if let Some((action, _)) = &decided.rejected {
        admitted.metrics.limit_outcomes(action, "rejected", 1);
        return (decided, None);
    }
    // Counted per distinct action, not per row: a batch of hundreds of rows takes a handful
    // of metric updates.
    let mut taken: Vec<(&str, u64)> = Vec::new();
    let mut limited: Vec<(&str, &'static str, u64)> = Vec::new();
    for row in &decided.rows {
        match taken.iter_mut().find(|(a, _)| *a == &*row.final_action) {
            Some((_, n)) => *n += 1,
            None => taken.push((&row.final_action, 1)),
        }
        if row.limit != LimitOutcome::Ok {
            let outcome = row.limit.as_str();
            match limited
                .iter_mut()
                .find(|(a, o, _)| *a == &*row.model_action && *o == outcome)
            {
                Some((_, _, n)) => *n += 1,
                None => limited.push((&row.model_action, outcome, 1)),
            }
        }
    }
    for (action, n) in taken {
        admitted.metrics.decisions(action, n);
    }
    for (action, outcome, n) in limited {
        admitted.metrics.limit_outcomes(action, outcome, n);
    }
    // A shadow route's outputs go out undecided: there is nothing to certify.
    let tag = (!route.spec.shadow)
        .then(|| sign_tag(route, policy, model, version, &decided, &admitted.id))
        .flatten();
    (decided, tag)
}

/// See [`Proxy::respond`]; counting the response is the caller's.
pub(super) fn respond(
    admitted: &mut Admitted,
    captured: Captured,
    decision: Result<Decision, ExtractError>,
) -> Response<ResponseBody> {
    let Captured {
        route,
        mut parts,
        bytes,
    } = captured;
    let policy = &*admitted.policy;
    let id = &admitted.id;
    let mut pending = admitted.pending.take();
    let Decision { read, decided, tag } = match decision {
        Ok(d) => d,
        Err(e) => {
            decision_error(&admitted.metrics, &mut pending, e.kind(), e.to_string());
            return finish(parts, bytes, pending);
        }
    };
    if let Some(p) = pending.as_mut() {
        let (model_name, model_version) = read.model();
        p.set_response_read(ReadJson {
            model_name,
            model_version,
        });
    }

    if route.spec.shadow {
        shadowed(&mut parts.headers, &route, decided, &mut pending);
        return finish(parts, bytes, pending);
    }
    if decided.rejected.is_some() {
        return respond_rejected(&route, decided, policy, id, pending, false);
    }

    decided_headers(&mut parts.headers, &decided, policy, &route, tag.as_deref());
    let tag_in_body = route.spec.tag_field.as_deref().zip(tag.as_deref());
    let writes = route.spec.write_decisions.is_some();
    let spliced = (writes && tag_in_body.is_none() && route.protocol() == Protocol::V2)
        .then(|| splice_v2_actions(&bytes, &decided, read.splice_point()))
        .flatten();
    let body = if let Some(spliced) = spliced {
        spliced
    } else if writes || tag_in_body.is_some() {
        match read.into_value(&bytes) {
            Some(mut value) => {
                if writes {
                    write_into_body(&route, &mut value, &decided, id);
                }
                if let Some((field, t)) = tag_in_body {
                    set_pointer(&mut value, field, Value::String(t.to_owned()));
                }
                Bytes::from(serde_json::to_vec(&value).expect("a JSON value serializes"))
            }
            // Read already, so valid JSON: not reached but past serde_json's nesting limit.
            None => bytes,
        }
    } else {
        bytes
    };
    if let Some(p) = pending.as_mut() {
        p.set_decision(DecisionOutcome::Made(decided.rows));
        p.set_tag(tag);
    }
    finish(parts, body, pending)
}

/// A shadow route's answer: the decisions recorded as made (a refusal the limit would have
/// made as the record's error, the status the client got beside it), the response left as
/// the model sent it but for `sluicegate-mode: shadow`.
fn shadowed(
    headers: &mut http::HeaderMap,
    route: &Route,
    decided: Decided,
    pending: &mut Option<Pending>,
) {
    headers.insert(MODE_HEADER, HeaderValue::from_static("shadow"));
    if let Some(p) = pending.as_mut() {
        if let Some((err, detail)) = limit_refusal(route, &decided) {
            let message = err.message(&format!("{detail} (shadow mode: not applied)"));
            p.set_error(err.for_record(message));
        }
        p.set_decision(DecisionOutcome::Made(decided.rows));
        p.set_shadow();
    }
}

/// The error a limit's refusal answers with, and its detail; `None` when nothing was refused.
fn limit_refusal(route: &Route, decided: &Decided) -> Option<(ProxyError, String)> {
    let (action, window) = decided.rejected.as_ref()?;
    // Retry after a minute's worth of the window, and at least a second.
    let retry_after_secs = (window.as_secs_f64() / 60.0).ceil().max(1.0) as u64;
    let detail = format!(
        "taking action {action:?} on route {} would exceed its limit",
        route.name
    );
    Some((ProxyError::LimitExceeded { retry_after_secs }, detail))
}

/// A limit refused the model's action (`decided.rejected` is set): the client gets the
/// limit's error (a gRPC status for a gRPC call), retry after a minute's worth of the window
/// and at least a second. No action was taken: the headers say so, the model's choice beside
/// it. The model answered: the record keeps that answer and says what the client got.
fn respond_rejected(
    route: &Route,
    decided: Decided,
    policy: &Policy,
    id: &HeaderValue,
    pending: Option<Pending>,
    grpc: bool,
) -> Response<ResponseBody> {
    let (err, detail) = limit_refusal(route, &decided).expect("a rejected decision");
    let message = err.message(&detail);
    let (mut resp, error) = err.answer(id, &message, message.clone(), grpc);
    decision_headers(
        resp.headers_mut(),
        &decided,
        policy,
        Counted::for_route(route),
        true,
    );
    if let Some(mut p) = pending {
        p.set_decision(DecisionOutcome::Made(decided.rows));
        p.set_error(error);
        p.set_status(resp.status().as_u16());
        p.finish_response(true, None);
    }
    resp
}

/// The tag, then the decision headers in what the budget has left, on a decided response.
fn decided_headers(
    headers: &mut http::HeaderMap,
    decided: &Decided,
    policy: &Policy,
    route: &Route,
    tag: Option<&str>,
) {
    if let Some(v) = tag.and_then(|t| per_response_value(t.to_owned())) {
        headers.insert(TAG_HEADER, v);
    }
    decision_headers(headers, decided, policy, Counted::for_route(route), false);
}

/// A response as a deciding route has read it.
enum Read {
    /// A v2 response read for its scores alone: only the route's output became numbers.
    V2 {
        model_name: Option<String>,
        model_version: Option<String>,
        splice: Option<SplicePoint>,
    },
    /// Parsed whole, because the route writes into it other than by splicing, or reads it by
    /// a path only a parsed value answers (v1, json).
    Whole(Value),
}

impl Read {
    /// The model's name and version, as the response states them (v2 does).
    fn model(&self) -> (Option<String>, Option<String>) {
        match self {
            Read::V2 {
                model_name,
                model_version,
                ..
            } => (model_name.clone(), model_version.clone()),
            Read::Whole(v) => {
                let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
                (text("model_name"), text("model_version"))
            }
        }
    }

    /// Where the v2 read found the end of `outputs`.
    fn splice_point(&self) -> Option<SplicePoint> {
        match self {
            Read::V2 { splice, .. } => *splice,
            Read::Whole(_) => None,
        }
    }

    /// The parsed value, parsing `bytes` now if they were only read for their scores.
    fn into_value(self, bytes: &[u8]) -> Option<Value> {
        match self {
            Read::Whole(v) => Some(v),
            Read::V2 { .. } => serde_json::from_slice(bytes).ok(),
        }
    }
}

/// Reads the route's scores. A v2 route that writes nothing into the body but by splicing (or
/// nothing at all) never builds a `Value` of the answer: a batch's other outputs, and every
/// number but its scores, are only scanned.
fn read_response(
    route: &Route,
    bytes: &[u8],
) -> Result<(Read, Scores), crate::decide::extract::ExtractError> {
    let spec = route
        .spec
        .score
        .as_ref()
        .expect("validated: a deciding route has a score");
    let protocol = route.protocol();
    if protocol == Protocol::V2 && route.spec.tag_field.is_none() {
        let read = extract_v2(spec, route.classes(), bytes)?;
        let meta = Read::V2 {
            model_name: read.model_name,
            model_version: read.model_version,
            splice: read.splice,
        };
        return Ok((meta, read.scores));
    }
    let value: Value =
        serde_json::from_slice(bytes).map_err(|_| crate::decide::extract::ExtractError::NotJson)?;
    let scores = extract(protocol, spec, route.classes(), &value)?;
    Ok((Read::Whole(value), scores))
}

/// The signed provenance tag of a decided response, when the policy tags.
fn sign_tag(
    route: &Route,
    policy: &Policy,
    model: Option<String>,
    version: Option<String>,
    decided: &Decided,
    id: &HeaderValue,
) -> Option<String> {
    let (key_id, algorithm) = policy.signer.as_ref()?;
    // The v2 response names its model; else the route's model matcher does.
    let model = model.or_else(|| route.spec.matcher.model.clone());
    let actions: Vec<&str> = decided.rows.iter().map(|r| &*r.final_action).collect();
    let explores = route.explorer.is_some();
    let explored: Vec<bool> = if explores {
        decided.rows.iter().map(|r| r.explored).collect()
    } else {
        Vec::new()
    };
    let propensities: Vec<f64> = decided.rows.iter().filter_map(|r| r.propensity).collect();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut claims = TagClaims::new(ClaimsInput {
        prediction_id: id.to_str().unwrap_or_default(),
        route: &route.name,
        model: model.as_deref(),
        model_version: version.as_deref(),
        policy_version: &policy.version,
        actions: &actions,
        explored: &explored,
        propensities: &propensities,
        timestamp_ms: now_ms,
    });
    policy.keys.sign(key_id, *algorithm, &mut claims)
}

/// A response body as the decision step reads it.
enum Decoded {
    /// Sent without a content coding.
    Identity(Bytes),
    /// Decoded from gzip or deflate.
    Decoded(Bytes),
}

/// Why a response's content coding could not be undone (it passes through undecided).
#[derive(Debug, thiserror::Error)]
enum DecodeError {
    #[error("content-encoding {0:?} is not one sluicegate decodes (gzip, deflate); passed through undecided")]
    Unsupported(String),
    #[error("the {0} body does not decode: {1}; passed through undecided")]
    Broken(&'static str, std::io::Error),
    #[error("response larger than {0} bytes once decoded; passed through undecided")]
    TooLarge(u64),
}

impl DecodeError {
    fn kind(&self) -> &'static str {
        match self {
            DecodeError::Unsupported(_) | DecodeError::Broken(..) => "content_encoding",
            DecodeError::TooLarge(_) => "response_too_large",
        }
    }
}

/// Undoes the response's `content-encoding` (gzip or deflate, once), decoding at most `limit`
/// bytes; on failure the body comes back as it was.
fn decode_content(
    headers: &http::HeaderMap,
    body: Bytes,
    limit: u64,
) -> Result<Decoded, (DecodeError, Bytes)> {
    use std::io::Read;
    let mut codings = Vec::new();
    for value in headers.get_all(header::CONTENT_ENCODING) {
        let Ok(text) = value.to_str() else {
            let shown = String::from_utf8_lossy(value.as_bytes()).into_owned();
            return Err((DecodeError::Unsupported(shown), body));
        };
        codings.extend(
            text.split(',')
                .map(|c| c.trim().to_ascii_lowercase())
                .filter(|c| !c.is_empty() && c != "identity"),
        );
    }
    let name = match codings.as_slice() {
        [] => return Ok(Decoded::Identity(body)),
        [c] if c == "gzip" || c == "x-gzip" => "gzip",
        [c] if c == "deflate" => "deflate",
        _ => return Err((DecodeError::Unsupported(codings.join(", ")), body)),
    };
    let read = |mut reader: Box<dyn Read + '_>| -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        // One byte past the limit tells a body at the limit from one over it.
        reader
            .by_ref()
            .take(limit.saturating_add(1))
            .read_to_end(&mut out)?;
        Ok(out)
    };
    let decoded = if name == "gzip" {
        read(Box::new(flate2::read::MultiGzDecoder::new(&body[..])))
    } else {
        // `deflate` is zlib-wrapped (RFC 9110 §8.4.1.2); some servers send it raw.
        read(Box::new(flate2::read::ZlibDecoder::new(&body[..])))
            .or_else(|_| read(Box::new(flate2::read::DeflateDecoder::new(&body[..]))))
    };
    match decoded {
        Ok(out) if out.len() as u64 > limit => Err((DecodeError::TooLarge(limit), body)),
        Ok(out) => Ok(Decoded::Decoded(Bytes::from(out))),
        Err(e) => Err((DecodeError::Broken(name, e), body)),
    }
}

/// Sends `body` whole, with a content-length that fits it; the record is complete.
fn finish(mut parts: Parts, body: Bytes, pending: Option<Pending>) -> Response<ResponseBody> {
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    if let Some(p) = pending {
        p.finish_response(true, None);
    }
    Response::from_parts(parts, ResponseBody::full(body))
}

fn decision_error(
    metrics: &RouteMetrics,
    pending: &mut Option<Pending>,
    kind: &'static str,
    message: String,
) {
    metrics.decision_error(kind);
    if let Some(p) = pending.as_mut() {
        p.set_decision(DecisionOutcome::Failed { kind, message });
    }
}

/// Breach starts and ends: a metric, a log line and an alert record each.
pub(crate) fn alerts(proxy: &Proxy, policy: &Policy, decided: &Decided) {
    for event in &decided.events {
        emit_alert(proxy, policy, event.clone());
    }
}

pub(crate) fn emit_alert(proxy: &Proxy, policy: &Policy, event: crate::decide::BreachEvent) {
    let alert = Alert::new(event, &policy.version, policy.generation);
    let e = &alert.event;
    let route = e.route.to_string();
    proxy
        .metrics
        .limit_alerts
        .get_or_create(&AlertLabel {
            route: route.clone(),
            action: e.action.clone(),
            event: alert.event_name(),
        })
        .inc();
    proxy
        .metrics
        .limit_in_breach
        .get_or_create(&RouteAction {
            route,
            action: e.action.clone(),
        })
        .set(e.started as i64);
    if e.started {
        tracing::warn!(route = %e.route, action = %e.action, on_breach = ?e.on_breach, decisions = e.decisions, actions = e.actions, "action limit breached");
    } else {
        tracing::info!(route = %e.route, action = %e.action, "action limit back under its cap");
    }
    proxy.tee.send_alert(alert);
}

/// Each row's value written by `f`, comma-separated, in one buffer.
fn joined<T>(rows: &[T], f: impl Fn(&T, &mut String)) -> String {
    let mut out = String::with_capacity(rows.len() * 8);
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        f(r, &mut out);
    }
    out
}

/// Which counts headers a batch past [`MAX_PER_ROW_HEADER_ROWS`] carries beside
/// `sluicegate-action-counts`: each only where the route can make it differ from that one.
#[derive(Clone, Copy, Debug)]
struct Counted {
    /// `sluicegate-limit-counts`: the route has limits.
    limits: bool,
    /// `sluicegate-model-action-counts`: the route has limits or explores, so the model's
    /// action and the final one can part.
    model_actions: bool,
}

impl Counted {
    fn for_route(route: &Route) -> Self {
        let limits = !route.limits.is_empty();
        Counted {
            limits,
            model_actions: limits || route.explorer.is_some(),
        }
    }
}

/// What a header takes on the wire in HTTP/1.1: `name: value` and CRLF.
fn wire_len(name: &HeaderName, value: &str) -> usize {
    name.as_str().len() + value.len() + 4
}

/// What the `sluicegate-*` headers already in `h` take on the wire.
fn sluicegate_bytes(h: &http::HeaderMap) -> usize {
    h.iter()
        .filter(|(name, _)| name.as_str().starts_with("sluicegate-"))
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

/// `value=count` pairs, the largest count first (ties by value, bytewise), in at most `room`
/// bytes: pairs that do not fit are summed into a last `(K more)=N`.
fn counts<'a>(values: impl Iterator<Item = &'a str>, room: usize) -> String {
    // A batch holds a handful of distinct values, mostly in runs: the last one is checked
    // first, then a short scan; past `SCAN` distinct values (a class per row) an index.
    const SCAN: usize = 16;
    let mut tally: Vec<(&str, u64)> = Vec::new();
    let mut index = std::collections::HashMap::<&str, usize>::new();
    let mut last = 0;
    for v in values {
        if tally.get(last).is_some_and(|&(t, _)| t == v) {
            tally[last].1 += 1;
            continue;
        }
        let found = if tally.len() <= SCAN {
            tally.iter().position(|&(t, _)| t == v)
        } else {
            index.get(v).copied()
        };
        last = found.unwrap_or_else(|| {
            tally.push((v, 0));
            if tally.len() > SCAN {
                if index.is_empty() {
                    index.extend(tally.iter().enumerate().map(|(i, &(t, _))| (t, i)));
                } else {
                    index.insert(v, tally.len() - 1);
                }
            }
            tally.len() - 1
        });
        tally[last].1 += 1;
    }
    tally.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let pair = |v: &str, n: u64| format!("{v}={n}");
    let rest = |k: usize, n: u64| format!("({k} more)={n}");
    let mut out = String::new();
    let mut left: u64 = tally.iter().map(|(_, n)| n).sum();
    for (i, &(v, n)) in tally.iter().enumerate() {
        let sep = usize::from(!out.is_empty());
        let last = i + 1 == tally.len();
        // A pair goes in only if the marker for the pairs after it still fits too.
        let after = if last {
            0
        } else {
            1 + rest(tally.len() - i - 1, left - n).len()
        };
        if out.len() + sep + pair(v, n).len() + after > room {
            if sep == 1 {
                out.push(',');
            }
            out.push_str(&rest(tally.len() - i, left));
            return out;
        }
        if sep == 1 {
            out.push(',');
        }
        out.push_str(&pair(v, n));
        left -= n;
    }
    out
}

/// Writes the decision headers: `sluicegate-rows` always; one value per row (action, model
/// action, limit outcome, threshold) up to [`MAX_PER_ROW_HEADER_ROWS`] rows when they fit
/// the budget (the thresholds left out when only they do not), else counts sized to fit it. `rejected`: a limit refused the request, so every
/// row's action reads `rejected`.
fn decision_headers(
    h: &mut http::HeaderMap,
    decided: &Decided,
    policy: &Policy,
    counted: Counted,
    rejected: bool,
) {
    let rows = &decided.rows;
    // Whatever the upstream sent under these names is not this decision's.
    for name in [
        ACTION_HEADER,
        MODEL_ACTION_HEADER,
        LIMIT_HEADER,
        THRESHOLD_HEADER,
        ACTION_COUNTS_HEADER,
        MODEL_ACTION_COUNTS_HEADER,
        LIMIT_COUNTS_HEADER,
    ] {
        h.remove(name);
    }
    if let Ok(v) = HeaderValue::from_str(&policy.version) {
        h.insert(super::POLICY_HEADER, v);
    }
    h.insert(ROWS_HEADER, HeaderValue::from(rows.len()));
    // Strictly under the budget.
    let room = (HEADER_BUDGET - 1).saturating_sub(sluicegate_bytes(h));
    let action = |r: &crate::decide::RowDecision, out: &mut String| {
        out.push_str(if rejected {
            "rejected"
        } else {
            &r.final_action
        })
    };

    let mut set = |name: HeaderName, value: String| {
        // An action name that is no header value (a control character) leaves its header out.
        if let Some(v) = per_response_value(value) {
            h.insert(name, v);
        }
    };
    if rows.len() <= MAX_PER_ROW_HEADER_ROWS {
        let listed = [
            (ACTION_HEADER, joined(rows, action)),
            (
                MODEL_ACTION_HEADER,
                joined(rows, |r, out| out.push_str(&r.model_action)),
            ),
            (
                LIMIT_HEADER,
                joined(rows, |r, out| out.push_str(r.limit.as_str())),
            ),
            (
                THRESHOLD_HEADER,
                joined(rows, |r, out| match r.threshold {
                    Some(t) => {
                        let _ = write!(out, "{t}");
                    }
                    None => out.push('-'),
                }),
            ),
        ];
        let size =
            |l: &[(HeaderName, String)]| l.iter().map(|(n, v)| wire_len(n, v)).sum::<usize>();
        // The thresholds, the longest values and no category, are the first to go.
        let fits = if size(&listed) <= room {
            4
        } else if size(&listed[..3]) <= room {
            3
        } else {
            0
        };
        if fits > 0 {
            for (name, value) in listed.into_iter().take(fits) {
                set(name, value);
            }
            return;
        }
    }
    type Values<'a> = Box<dyn Iterator<Item = &'a str> + 'a>;
    let finals: Values = if rejected {
        Box::new(rows.iter().map(|_| "rejected"))
    } else {
        Box::new(rows.iter().map(|r| &*r.final_action))
    };
    let mut counted_headers = vec![(ACTION_COUNTS_HEADER, finals)];
    if counted.model_actions {
        let values: Values = Box::new(rows.iter().map(|r| &*r.model_action));
        counted_headers.push((MODEL_ACTION_COUNTS_HEADER, values));
    }
    if counted.limits {
        let values: Values = Box::new(rows.iter().map(|r| r.limit.as_str()));
        counted_headers.push((LIMIT_COUNTS_HEADER, values));
    }
    // An equal share each of what is left; what one leaves unused goes to the next.
    let mut left = room;
    let n = counted_headers.len();
    for (i, (name, values)) in counted_headers.into_iter().enumerate() {
        let value = counts(
            values,
            (left / (n - i)).saturating_sub(name.as_str().len() + 4),
        );
        left = left.saturating_sub(wire_len(&name, &value));
        set(name, value);
    }
}

/// The v2 output tensor carrying the final action of each row. Serialized straight from the
/// rows' actions: a `Value` of it would allocate a string per row.
#[derive(serde::Serialize)]
struct ActionTensor<'a> {
    name: &'static str,
    shape: [usize; 1],
    datatype: &'static str,
    data: Vec<&'a str>,
}

fn v2_action_tensor(decided: &Decided) -> ActionTensor<'_> {
    let data: Vec<&str> = decided.rows.iter().map(|r| &*r.final_action).collect();
    ActionTensor {
        name: "sluicegate_action",
        shape: [data.len()],
        datatype: "BYTES",
        data,
    }
}

/// The v2 response with the action tensor appended to its `outputs`, everything else kept
/// byte for byte: re-serializing the whole body would cost more than deciding (float
/// formatting of every output) and would reformat the model's numbers. `at` is where the
/// score read found the end of `outputs`; without it (`outputs` not the last member) the body
/// is scanned for it. `None` when the body has no `outputs` array (the caller then falls back
/// to rewriting the parsed value).
fn splice_v2_actions(bytes: &Bytes, decided: &Decided, at: Option<SplicePoint>) -> Option<Bytes> {
    let SplicePoint { close, empty } = match at {
        Some(at) => at,
        None => find_outputs_end(bytes)?,
    };
    let tensor = serde_json::to_vec(&v2_action_tensor(decided)).expect("a tensor serializes");
    let mut out = Vec::with_capacity(bytes.len() + tensor.len() + 1);
    out.extend_from_slice(&bytes[..close]);
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(&tensor);
    out.extend_from_slice(&bytes[close..]);
    Some(Bytes::from(out))
}

/// Where the top-level `outputs` array of a JSON object closes, by scanning it whole.
fn find_outputs_end(bytes: &[u8]) -> Option<SplicePoint> {
    #[derive(serde::Deserialize)]
    struct Outputs<'a> {
        #[serde(borrow)]
        outputs: &'a serde_json::value::RawValue,
    }
    let outputs = serde_json::from_slice::<Outputs>(bytes).ok()?.outputs.get();
    let inner = outputs.strip_prefix('[')?.strip_suffix(']')?;
    // The raw value borrows from the body: its last byte is the array's closing bracket.
    let close = outputs.as_ptr() as usize - bytes.as_ptr() as usize + outputs.len() - 1;
    Some(SplicePoint {
        close,
        empty: inner.trim().is_empty(),
    })
}

/// Adds the decisions to the body: a v2 output tensor, a v1 top-level object, or a pointer.
fn write_into_body(route: &Route, value: &mut Value, decided: &Decided, id: &HeaderValue) {
    let actions: Vec<&str> = decided.rows.iter().map(|r| &*r.final_action).collect();
    match route.protocol() {
        Protocol::V2 => {
            if let Some(outputs) = value.get_mut("outputs").and_then(Value::as_array_mut) {
                outputs.push(
                    serde_json::to_value(v2_action_tensor(decided))
                        .expect("a tensor of strings is a JSON value"),
                );
            }
        }
        Protocol::V1 => {
            if let Some(obj) = value.as_object_mut() {
                obj.insert(
                    "sluicegate".into(),
                    json!({
                        "id": id.to_str().unwrap_or_default(),
                        "actions": actions,
                        "model_actions": decided.rows.iter().map(|r| &*r.model_action).collect::<Vec<_>>(),
                        "limit": decided.rows.iter().map(|r| r.limit.as_str()).collect::<Vec<_>>(),
                    }),
                );
            }
        }
        Protocol::Json => {
            if let Some(pointer) = route
                .spec
                .write_decisions
                .as_ref()
                .and_then(|w| w.pointer.as_deref())
            {
                set_pointer(value, pointer, json!(actions));
            }
        }
    }
}

/// Sets the value at a JSON pointer whose parent exists and is an object.
fn set_pointer(value: &mut Value, pointer: &str, new: Value) -> bool {
    let Some((parent, key)) = pointer.rsplit_once('/') else {
        return false;
    };
    let key = key.replace("~1", "/").replace("~0", "~");
    match value.pointer_mut(parent).and_then(Value::as_object_mut) {
        Some(obj) => {
            obj.insert(key, new);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests;
