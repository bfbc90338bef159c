//! The data plane: forwards each request to the upstream model server, streams the answer
//! back, and hands a capture of both to the tee.

pub mod body;
mod decision;
pub mod error;
mod path;
mod pending;
mod pool;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use body::{
    BodyTooLarge, BoxError, ClientFault, RequestBody, RequestCapture, RequestLimits, ResponseBody,
    UpstreamBody, UpstreamIncoming,
};
use error::ProxyError;
use pending::Pending;
use pool::{H2Error, H2Pool, SendH2};

use crate::config::policy::{SharedPolicy, Undeclared};
use crate::config::settings::{Upstream, UpstreamProtocol};
use crate::tee::record::{Capture, Exchange, Message};
use crate::tee::TeeSender;
use crate::telemetry::{ConsumerLabel, ErrorLabel, ProxyMetrics, RouteLabel, RouteStatus};

/// The header carrying the prediction id that keys the record, on every response.
pub const ID_HEADER: HeaderName = HeaderName::from_static("sluicegate-id");
/// The version of the policy that handled the request.
pub const POLICY_HEADER: HeaderName = HeaderName::from_static("sluicegate-policy");

/// The only route until the policy file defines routes.
const DEFAULT_ROUTE: &str = "default";

/// What opens upstream connections: TCP in production, in memory in the benches (any
/// connector hyper-util's client takes).
pub trait UpstreamConnector:
    tower::Service<
        Uri,
        Response: hyper::rt::Read
                      + hyper::rt::Write
                      + hyper_util::client::legacy::connect::Connection
                      + Unpin
                      + Send
                      + 'static,
        Error: Into<BoxError>,
        Future: Unpin + Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<C> UpstreamConnector for C where
    C: tower::Service<
            Uri,
            Response: hyper::rt::Read
                          + hyper::rt::Write
                          + hyper_util::client::legacy::connect::Connection
                          + Unpin
                          + Send
                          + 'static,
            Error: Into<BoxError>,
            Future: Unpin + Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// A pooled HTTP/1.1 client over any connector. Its future is boxed by hyper-util already, so
/// the indirection allocates nothing more.
trait SendHttp1: Send + Sync {
    fn request(&self, req: Request<RequestBody>) -> ResponseFuture;
}

impl<C: UpstreamConnector> SendHttp1 for Client<C, RequestBody> {
    fn request(&self, req: Request<RequestBody>) -> ResponseFuture {
        Client::request(self, req)
    }
}

/// Why the upstream gave no response.
struct SendError {
    /// No connection could be opened.
    connect: bool,
    error: BoxError,
}

/// Shared state of the data plane.
pub struct Proxy {
    upstream: Upstream,
    http1: Box<dyn SendHttp1>,
    http2: Box<dyn SendH2>,
    max_request_body: u64,
    /// Largest response a deciding route reads whole (and decodes); see `decision`.
    max_decided_response: u64,
    client_body_timeout: std::time::Duration,
    policy: SharedPolicy,
    tee: TeeSender,
    metrics: ProxyMetrics,
    default_route: Arc<str>,
}

impl Proxy {
    pub fn new(
        upstream: Upstream,
        limits: RequestLimits,
        policy: SharedPolicy,
        tee: TeeSender,
        metrics: ProxyMetrics,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(upstream.connect_timeout));
        Self::with_connector(connector, upstream, limits, policy, tee, metrics)
    }

    /// As [`Proxy::new`], reaching the upstream through `connector` instead of TCP (the
    /// benches' in-memory upstream).
    pub fn with_connector<C: UpstreamConnector>(
        connector: C,
        upstream: Upstream,
        limits: RequestLimits,
        policy: SharedPolicy,
        tee: TeeSender,
        metrics: ProxyMetrics,
    ) -> Self {
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .timer(TokioTimer::new());
        let http1 = Box::new(builder.build(connector.clone()));
        let http2 = Box::new(H2Pool::new(
            connector,
            upstream.authority.clone(),
            upstream.h2_max_connections,
        ));
        Proxy {
            upstream,
            http1,
            http2,
            max_request_body: limits.max_body,
            max_decided_response: crate::config::settings::DEFAULT_MAX_DECIDED_RESPONSE,
            client_body_timeout: limits.body_timeout,
            policy,
            tee,
            metrics,
            default_route: DEFAULT_ROUTE.into(),
        }
    }

    /// Sets the largest response a deciding route reads whole and decides (a larger one
    /// passes through undecided).
    pub fn with_max_decided_response(mut self, bytes: u64) -> Self {
        self.max_decided_response = bytes;
        self
    }

    /// Serves one request. Never fails: errors become JSON responses.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        client: SocketAddr,
    ) -> Result<Response<ResponseBody>, std::convert::Infallible> {
        let start = Instant::now();
        let time = SystemTime::now();
        // One policy snapshot for the whole request.
        let policy = self.policy.load_full();
        let malformed = malformed(&req);
        // Routed, forwarded and recorded alike: the normalized path, the query as sent.
        let normalized = path::normalize(req.uri().path());
        let path_and_query = match (&normalized, req.uri().query()) {
            (Ok(p), Some(q)) => format!("{p}?{q}"),
            // An authority-form target (`CONNECT host:port`) has no path at all.
            (Ok(p), None) if p.is_empty() => "/".to_owned(),
            (Ok(p), None) => p.clone().into_owned(),
            (Err(_), _) => req
                .uri()
                .path_and_query()
                .map_or_else(|| req.uri().path().to_owned(), |pq| pq.to_string()),
        };
        let refusal = match (malformed, normalized) {
            (Some(why), _) => Some((ProxyError::BadRequest, why.to_owned())),
            (None, Err(why)) => Some((ProxyError::AmbiguousPath, why.to_string())),
            (None, Ok(_)) => None,
        };
        // A refused request gets no route: it is answered before anything is decided.
        let compiled = match refusal {
            None => {
                let path = path_and_query.split('?').next().unwrap_or_default();
                policy.routes.route_for(path).cloned()
            }
            Some(_) => None,
        };
        let route = compiled
            .as_ref()
            .map_or_else(|| self.default_route.clone(), |r| r.name.clone());
        let id_string = uuid::Uuid::now_v7().to_string();
        let id = HeaderValue::from_str(&id_string).expect("uuid is a valid header value");
        let (mut parts, body) = req.into_parts();

        let consumer = parts
            .headers
            .get(&policy.consumer_header)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let declared = consumer.as_deref().is_some_and(|c| policy.declared(c));
        self.metrics
            .consumer_requests
            .get_or_create(&ConsumerLabel {
                consumer: match (&consumer, declared) {
                    (Some(c), true) => c.clone(),
                    _ => "undeclared".into(),
                },
                declared,
            })
            .inc();

        let sampled = policy.sampled();
        let capture_bodies = compiled
            .as_ref()
            .and_then(|r| r.spec.capture_bodies)
            .unwrap_or(policy.policy.tee.capture_bodies);
        let body_cap = if capture_bodies { policy.body_cap } else { 0 };
        let shared = Arc::new(RequestCapture {
            capture: std::sync::Mutex::new(Capture::with_cap(body_cap)),
            ..Default::default()
        });
        let mut pending = sampled.then(|| {
            Pending::new(
                self.tee.clone(),
                Exchange {
                    id: id_string,
                    time,
                    route: route.clone(),
                    policy: policy.clone(),
                    consumer: consumer.clone(),
                    method: parts.method.clone(),
                    path: path_and_query.clone(),
                    request: Message {
                        headers: parts.headers.clone(),
                        ..Default::default()
                    },
                    status: None,
                    response: None,
                    error: None,
                    upstream_duration: None,
                    total_duration: Default::default(),
                    complete: true,
                    consumer_declared: declared,
                    capture_bodies,
                    decision: None,
                    tag: None,
                },
                shared.clone(),
                start,
            )
        });

        if let Some((err, detail)) = refusal {
            return Ok(self.fail(err, &detail, &id, &route, pending));
        }
        if !declared && policy.policy.consumers.undeclared == Undeclared::Refuse {
            // The message is recorded too: a redacted consumer header stays out of it.
            let who = match consumer {
                None => "(unnamed)".to_owned(),
                Some(_) if policy.redacted_headers.contains(&policy.consumer_header) => {
                    "(redacted)".to_owned()
                }
                Some(c) => format!("{c:?}"),
            };
            return Ok(self.fail(ProxyError::ConsumerUndeclared, &who, &id, &route, pending));
        }

        let declared_len = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared_len.is_some_and(|n| n > self.max_request_body) {
            let err = ProxyError::BodyTooLarge {
                limit: self.max_request_body,
            };
            return Ok(self.fail(err, "", &id, &route, pending));
        }

        // Rewrite for the upstream: its address, its HTTP version, no hop-by-hop headers.
        let version = match self.upstream.protocol {
            UpstreamProtocol::Auto if parts.version == Version::HTTP_2 => Version::HTTP_2,
            UpstreamProtocol::Http2 => Version::HTTP_2,
            _ => Version::HTTP_11,
        };
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(self.upstream.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .expect("upstream authority and client path form a URI");
        let original_version = parts.version;
        parts.version = version;
        strip_hop_by_hop(&mut parts.headers);
        if compiled.as_ref().is_some_and(|r| r.decider.is_some()) {
            // A deciding route reads the body: ask for it uncompressed.
            parts.headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        if let Some(host) = parts.headers.remove(header::HOST) {
            parts.headers.insert("x-forwarded-host", host);
        }
        append_forwarded_for(&mut parts.headers, client);
        let limits = RequestLimits {
            max_body: self.max_request_body,
            body_timeout: self.client_body_timeout,
        };
        let body = RequestBody::new(body, limits, shared.clone(), sampled);
        let upstream_req = Request::from_parts(parts, body);

        let sent = Instant::now();
        let result =
            tokio::time::timeout(self.upstream.timeout, self.send(version, upstream_req)).await;
        let upstream_time = sent.elapsed();
        let (resp, stream) = match result {
            Ok(Ok(resp)) => resp,
            // The client's body failed first: the upstream request failed because of it.
            _ if shared.client_fault.get().is_some() => {
                let fault = shared.client_fault.get().expect("checked");
                let err = match fault {
                    ClientFault::Broken(_) => ProxyError::ClientBody,
                    ClientFault::Stalled(_) => ProxyError::ClientBodyTimeout,
                };
                return Ok(self.fail(err, &fault.to_string(), &id, &route, pending));
            }
            Ok(Err(e)) => {
                let err = if shared.too_large.load(std::sync::atomic::Ordering::Relaxed) {
                    ProxyError::BodyTooLarge {
                        limit: self.max_request_body,
                    }
                } else if e.connect {
                    ProxyError::UpstreamUnavailable
                } else if source_is::<BodyTooLarge>(&*e.error) {
                    ProxyError::BodyTooLarge {
                        limit: self.max_request_body,
                    }
                } else {
                    ProxyError::UpstreamFailed
                };
                let detail = error_chain(&*e.error);
                return Ok(self.fail(err, &detail, &id, &route, pending));
            }
            Err(_) => {
                let detail = humantime::format_duration(self.upstream.timeout).to_string();
                return Ok(self.fail(ProxyError::UpstreamTimeout, &detail, &id, &route, pending));
            }
        };

        self.metrics
            .upstream_duration
            .get_or_create(&RouteLabel {
                route: route.to_string(),
            })
            .observe(upstream_time.as_secs_f64());
        let (mut parts, body) = resp.into_parts();
        let body = UpstreamIncoming::new(body, self.upstream.body_timeout, stream);
        strip_hop_by_hop(&mut parts.headers);
        parts.version = original_version;
        if let Some(p) = pending.as_mut() {
            p.set_response(parts.status.as_u16(), upstream_time, parts.headers.clone());
        }
        parts.headers.insert(ID_HEADER, id.clone());
        parts.headers.insert(
            POLICY_HEADER,
            HeaderValue::from_str(&policy.version).expect("hex is a valid header value"),
        );
        // Only a successful answer on a deciding route is read; everything else streams.
        if let Some(r) = compiled.filter(|r| r.decider.is_some() && parts.status.is_success()) {
            let resp =
                decision::decide_response(&self, &r, &policy, parts, body, pending, &id).await;
            self.count(&route, resp.status().as_u16());
            return Ok(resp);
        }
        self.count(&route, parts.status.as_u16());
        let body = UpstreamBody::new(body, pending);
        Ok(Response::from_parts(parts, ResponseBody::Upstream(body)))
    }

    /// Sends `req` over HTTP/1.1 or from the HTTP/2 pool; the pooled stream comes back with the
    /// response, for its body to hold.
    async fn send(
        &self,
        version: Version,
        req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<Arc<pool::Stream>>), SendError> {
        if version == Version::HTTP_2 {
            match self.http2.send(req).await {
                Ok((resp, stream)) => Ok((resp, Some(stream))),
                Err(H2Error::Connect(e)) => Err(SendError {
                    connect: true,
                    error: e.to_string().into(),
                }),
                Err(H2Error::Request(e)) => Err(SendError {
                    connect: false,
                    error: e.into(),
                }),
            }
        } else {
            match self.http1.request(req).await {
                Ok(resp) => Ok((resp, None)),
                Err(e) => Err(SendError {
                    connect: e.is_connect(),
                    error: e.into(),
                }),
            }
        }
    }

    /// Upkeep off the request path, once a second: recomputes due adaptive thresholds,
    /// publishes them as gauges, and ends limit breaches whose windows have emptied.
    pub async fn run_upkeep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let policy = self.policy.load_full();
            let now = Instant::now();
            let mut events = Vec::new();
            for route in &policy.routes.routes {
                route.tick(now, &mut events);
                for (class, cutoff) in route.labelled_cutoffs() {
                    self.metrics
                        .threshold
                        .get_or_create(&crate::telemetry::RouteClass {
                            route: route.name.to_string(),
                            class: class.to_owned(),
                        })
                        .set(cutoff.value());
                }
            }
            for event in events {
                decision::emit_alert(&self, &policy, event);
            }
        }
    }

    pub(crate) fn fail(
        &self,
        err: ProxyError,
        detail: &str,
        id: &HeaderValue,
        route: &str,
        pending: Option<Pending>,
    ) -> Response<ResponseBody> {
        let message = err.message(detail);
        self.metrics
            .errors
            .get_or_create(&ErrorLabel {
                kind: err.code(),
                source: err.source(),
            })
            .inc();
        self.count(route, err.status().as_u16());
        let recorded = if err.detail_is_internal() {
            tracing::debug!(code = err.code(), id = ?id, cause = detail, "{message}");
            format!("{message}: {detail}")
        } else {
            message.clone()
        };
        if let Some(p) = pending {
            // A body that failed on either side did not arrive whole.
            let complete = !matches!(
                err,
                ProxyError::ClientBody
                    | ProxyError::ClientBodyTimeout
                    | ProxyError::UpstreamBodyTimeout
            );
            p.finish_error(err.status().as_u16(), err.for_record(recorded), complete);
        }
        err.response(id, &message)
    }

    fn count(&self, route: &str, status: u16) {
        self.metrics
            .requests
            .get_or_create(&RouteStatus {
                route: route.to_owned(),
                status,
            })
            .inc();
    }
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1). `te: trailers`
/// is kept: gRPC needs it end to end.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // A message framed by `transfer-encoding` was read by it (RFC 9112 §6.3); a
    // `content-length` beside it is stale and, forwarded, would cut the body short.
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

/// Why a request is refused with 400 before anything else, if it is: `CONNECT` (sluicegate is
/// a reverse proxy, not a tunnel), or a `Host` missing from HTTP/1.1, repeated, or invalid
/// (RFC 9112 §3.2).
fn malformed<B>(req: &Request<B>) -> Option<&'static str> {
    if req.method() == http::Method::CONNECT {
        return Some("CONNECT is not supported: sluicegate forwards requests, it opens no tunnels");
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if req.version() == Version::HTTP_11 => {
            Some("an HTTP/1.1 request must carry a Host header")
        }
        (None, _) => None,
        (Some(_), Some(_)) => Some("more than one Host header"),
        (Some(host), None) if !valid_host(host) => {
            Some("the Host header is not a valid host[:port]")
        }
        (Some(_), None) => None,
    }
}

/// `uri-host [":" port]`, or empty (allowed for a target without an authority).
fn valid_host(value: &HeaderValue) -> bool {
    let Ok(text) = value.to_str() else {
        return false;
    };
    if text.is_empty() {
        return true;
    }
    // An authority may hold `user@`; a Host may not.
    if text.contains('@') {
        return false;
    }
    let Ok(authority) = text.parse::<http::uri::Authority>() else {
        return false;
    };
    let host = authority.host();
    // What follows the host: nothing, or `:` and a port number.
    let port = text.strip_prefix(host).unwrap_or(text);
    !host.is_empty()
        && (port.is_empty()
            || port.strip_prefix(':').is_some_and(|p| {
                !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
            }))
}

/// Every `x-forwarded-for` the client sent, joined in order, then the client's address.
fn append_forwarded_for(headers: &mut HeaderMap, client: SocketAddr) {
    let mut value = String::new();
    for prev in headers.get_all("x-forwarded-for") {
        // Only visible ASCII can be joined into one valid value; anything else is not an
        // address list.
        if let Ok(prev) = prev.to_str() {
            let prev = prev.trim();
            if !prev.is_empty() {
                value.push_str(prev);
                value.push_str(", ");
            }
        }
    }
    value.push_str(&client.ip().to_string());
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert("x-forwarded-for", v);
    }
}

fn source_is<E: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.is::<E>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// `outer: inner: innermost`, so the message names the real cause (refused, reset, …).
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_te_trailers_stays() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("content-type", "application/grpc".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-private").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("connection").is_none());
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert_eq!(h.get("content-type").unwrap(), "application/grpc");

        let mut h = HeaderMap::new();
        h.insert("content-length", "5".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.get("content-length").unwrap(), "5");
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert!(
            h.get("content-length").is_none(),
            "stale beside chunked framing"
        );
        assert!(h.get("transfer-encoding").is_none());
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.1:5".parse().unwrap());
        append_forwarded_for(&mut h, "127.0.0.1:5".parse().unwrap());
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1, 127.0.0.1");
    }

    #[test]
    fn every_forwarded_for_header_is_kept() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "1.1.1.1, 2.2.2.2".parse().unwrap());
        h.append("x-forwarded-for", "3.3.3.3".parse().unwrap());
        append_forwarded_for(&mut h, "127.0.0.1:5".parse().unwrap());
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(
            h.get("x-forwarded-for").unwrap(),
            "1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1"
        );
    }

    #[test]
    fn hosts_are_checked_as_rfc_9112_asks() {
        let req = |version: Version, hosts: &[&str]| {
            let mut r = Request::get("/x").version(version);
            for h in hosts {
                r = r.header(header::HOST, *h);
            }
            r.body(()).unwrap()
        };
        let v11 = Version::HTTP_11;
        for ok in [
            "model",
            "model:8080",
            "10.0.0.1:80",
            "[::1]:8090",
            "a.b-c.d",
            "",
        ] {
            assert_eq!(malformed(&req(v11, &[ok])), None, "{ok:?}");
        }
        for bad in [
            "user@model",
            "a b",
            "model:port",
            "model:",
            "model:99999",
            "model/x",
            ":80",
            "[::1",
        ] {
            assert!(malformed(&req(v11, &[bad])).is_some(), "{bad:?}");
        }
        assert!(malformed(&req(v11, &[])).is_some(), "HTTP/1.1 without Host");
        assert!(malformed(&req(v11, &["a", "a"])).is_some(), "two Hosts");
        assert_eq!(malformed(&req(Version::HTTP_10, &[])), None);
        assert_eq!(malformed(&req(Version::HTTP_2, &[])), None);
        let connect = Request::connect("model:443").body(()).unwrap();
        assert!(malformed(&connect).is_some());
    }
}
