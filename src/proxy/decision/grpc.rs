//! The decision step on gRPC: a unary `ModelInfer` response read whole (its one message and
//! its trailers), decoded as protobuf, decided on the route of its model exactly as the REST
//! route of that model decides (same thresholds, limits and state), and answered with the
//! decisions and the tag as response metadata. A call that did not succeed, or whose answer
//! cannot be read, passes through unchanged (the latter with a decision error), as on REST.

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::response::Parts;
use http::Response;
use http_body::Frame;

use super::{
    collect_up_to, decide_scores, decided_headers, decision_error, pass_too_large,
    respond_rejected, shadowed, Collected,
};
use crate::config::policy::Protocol;
use crate::decide::extract::extract_grpc;
use crate::oip;
use crate::proxy::body::{ResponseBody, UpstreamBodyTimeout, UpstreamIncoming};
use crate::proxy::error::ProxyError;
use crate::proxy::pending::Pending;
use crate::proxy::{Admitted, Proxy};
use crate::tee::record::{DecisionOutcome, ReadJson};

const GRPC_STATUS: &str = "grpc-status";
const GRPC_ENCODING: &str = "grpc-encoding";

/// Reads, decides and answers a `ModelInfer` response (see the module docs).
pub(in crate::proxy) async fn respond_model_infer(
    proxy: &Proxy,
    mut admitted: Admitted,
    mut parts: Parts,
    body: UpstreamIncoming,
) -> Response<ResponseBody> {
    let (bytes, trailers) = match collect_up_to(body, proxy.max_decided_response).await {
        Collected::Whole(bytes, trailers) => (bytes, trailers),
        Collected::TooLarge(prefix, rest) => {
            return pass_too_large(proxy, admitted, parts, prefix, rest)
        }
        Collected::Broken(e) => {
            let err = if e.is::<UpstreamBodyTimeout>() {
                ProxyError::UpstreamBodyTimeout
            } else {
                ProxyError::UpstreamFailed
            };
            return proxy.fail(err, &e.to_string(), admitted);
        }
    };
    // Only a call that succeeded has an answer to decide; a failed one goes back as it came.
    let ok = trailers
        .as_ref()
        .and_then(|t| t.get(GRPC_STATUS))
        .is_some_and(|s| s == "0");
    if !ok {
        return pass(&mut admitted, parts, bytes, trailers, None);
    }
    let (message, decoded) = match read_message(&parts.headers, &bytes, proxy.max_decided_response)
    {
        Ok(read) => read,
        Err(why) => return pass(&mut admitted, parts, bytes, trailers, Some(why)),
    };
    let response = match oip::decode_response(&message) {
        Ok(r) => r,
        Err(e) => {
            let why = (
                "not_protobuf",
                format!("the gRPC message is not a ModelInferResponse: {e}"),
            );
            return pass(&mut admitted, parts, bytes, trailers, Some(why));
        }
    };
    // Routed by the request's model when the request named it; else (a compressed request)
    // by the model the response says answered.
    let route = match admitted.compiled.clone() {
        Some(route) => route,
        None => match admitted
            .policy
            .routes
            .route_for_model(&response.model_name)
            .cloned()
        {
            Some(route) => {
                proxy.set_route(&mut admitted, route.clone());
                route
            }
            None => return pass(&mut admitted, parts, bytes, trailers, None),
        },
    };
    if route.decider.is_none() || route.protocol() != Protocol::V2 {
        return pass(&mut admitted, parts, bytes, trailers, None);
    }
    let spec = route
        .spec
        .score
        .as_ref()
        .expect("validated: a deciding route has a score");
    let named = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let (model, version) = (named(&response.model_name), named(&response.model_version));
    let scores = match extract_grpc(spec, route.classes(), &response) {
        Ok(scores) => scores,
        Err(e) => {
            let why = (e.kind(), e.to_string());
            return pass(&mut admitted, parts, bytes, trailers, Some(why));
        }
    };
    let (decided, tag) = decide_scores(
        proxy,
        &admitted,
        &route,
        &scores,
        model.clone(),
        version.clone(),
    );

    let mut pending = admitted.pending.take();
    if let Some(p) = pending.as_mut() {
        record_response(p, &bytes, trailers.as_ref());
        p.set_response_read(ReadJson {
            model_name: model,
            model_version: version,
        });
    }
    if route.spec.shadow {
        shadowed(&mut parts.headers, &route, decided, &mut pending);
        admitted.answered(parts.status.as_u16());
        return finish(parts, bytes, trailers, pending);
    }
    let policy = &*admitted.policy;
    if decided.rejected.is_some() {
        let resp = respond_rejected(&route, decided, policy, &admitted.id, pending, true);
        admitted.answered(resp.status().as_u16());
        return resp;
    }

    decided_headers(&mut parts.headers, &decided, policy, &route, tag.as_deref());
    let body = if route.spec.write_decisions.is_some() {
        let actions: Vec<&str> = decided.rows.iter().map(|r| &*r.final_action).collect();
        let raw = !response.raw_output_contents.is_empty();
        // Sent uncompressed: the message is new, and a compressed flag of 0 needs no
        // `grpc-encoding` agreement with the client.
        parts.headers.remove(GRPC_ENCODING);
        oip::frame_with_action_tensor(&message, &actions, raw)
    } else if decoded {
        parts.headers.remove(GRPC_ENCODING);
        oip::frame(&message)
    } else {
        bytes
    };
    if let Some(p) = pending.as_mut() {
        p.set_decision(DecisionOutcome::Made(decided.rows));
        p.set_tag(tag);
    }
    admitted.answered(parts.status.as_u16());
    finish(parts, body, trailers, pending)
}

/// The response as the upstream sent it, recorded; with `why` it could not be decided.
fn pass(
    admitted: &mut Admitted,
    parts: Parts,
    bytes: Bytes,
    trailers: Option<HeaderMap>,
    why: Option<(&'static str, String)>,
) -> Response<ResponseBody> {
    let mut pending = admitted.pending.take();
    if let Some((kind, message)) = why {
        decision_error(&admitted.metrics, &mut pending, kind, message);
    }
    if let Some(p) = pending.as_mut() {
        record_response(p, &bytes, trailers.as_ref());
    }
    admitted.answered(parts.status.as_u16());
    finish(parts, bytes, trailers, pending)
}

fn record_response(p: &mut Pending, bytes: &Bytes, trailers: Option<&HeaderMap>) {
    p.capture_frame(&Frame::data(bytes.clone()));
    if let Some(t) = trailers {
        p.capture_frame(&Frame::trailers(t.clone()));
    }
}

/// Sends the message and then the trailers; the record is complete.
fn finish(
    mut parts: Parts,
    body: Bytes,
    trailers: Option<HeaderMap>,
    pending: Option<Pending>,
) -> Response<ResponseBody> {
    parts.headers.remove(header::CONTENT_LENGTH);
    if let Some(p) = pending {
        p.finish_response(true, None);
    }
    // Nothing read at all (a Trailers-Only answer: the status is in the headers) goes back the
    // same way, the headers ending the stream: a client reads no empty message then.
    let body = (!body.is_empty()).then_some(body);
    Response::from_parts(parts, ResponseBody::WithTrailers(body, trailers))
}

/// The body's one message, decompressed if its flag says so (`grpc-encoding` gzip or
/// deflate), at most `limit` bytes; `true` when it was decompressed. Or why not, as a decision
/// error's kind and message.
fn read_message(
    headers: &HeaderMap,
    body: &Bytes,
    limit: u64,
) -> Result<(Bytes, bool), (&'static str, String)> {
    let (compressed, message) =
        oip::one_message(body).map_err(|e| ("not_protobuf", e.to_string()))?;
    if !compressed {
        return Ok((message, false));
    }
    let encoding = headers
        .get(GRPC_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity");
    match oip::decompress(encoding, &message, limit) {
        Ok(out) => Ok((Bytes::from(out), true)),
        Err(e) => {
            let kind = match e {
                oip::DecompressError::TooLarge(_) => "response_too_large",
                _ => "content_encoding",
            };
            Err((kind, format!("{e}; passed through undecided")))
        }
    }
}
