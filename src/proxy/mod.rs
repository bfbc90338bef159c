//! The data plane: forwards each request to the upstream model server, streams the answer
//! back, and hands a capture of both to the tee.
//!
//! # The request path
//!
//! [`Proxy::handle`] runs each request through five phases, each a method of [`Proxy`] with
//! its own unit test and its own line in the stack bench (`phases_<size>/…`):
//! 1. **admission** ([`Proxy::admit`]): one policy snapshot, the path normalized and routed,
//!    the id, the consumer, sampling, and every refusal made before anything is sent;
//! 2. **forward** ([`Proxy::upstream_head`], then the send within the upstream timeout; the
//!    request body streams through `body::RequestBody`, captured as it goes);
//! 3. **capture** ([`Proxy::capture_head`]: the response head recorded and stamped; then
//!    either the body streams, captured as it goes, or a deciding route reads it whole,
//!    [`Proxy::capture_whole`]);
//! 4. **decide** ([`Proxy::decide`], in `decision`): scores, thresholds, limits, alerts,
//!    metrics, the signed tag;
//! 5. **respond** ([`Proxy::respond`]): the decision in the headers and the body, or a
//!    limit's 429; the record finished (`pending`).
//!
//! Metric handles are resolved once per route and policy generation (see
//! [`crate::telemetry::RouteMetrics`]), not per request.

pub mod body;
mod decision;
pub(crate) mod error;
mod path;
mod pending;
mod pool;
pub mod server;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::Bytes;

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
use decision::Collected;
pub use decision::{Captured, Decision};
use error::ProxyError;
use pending::Pending;
use pool::{H2Error, H2Pool, SendH2};

use crate::config::policy::Undeclared;
use crate::config::settings::{Upstream, UpstreamProtocol};
use crate::decide::Route;
use crate::oip;
use crate::policy::{Policy, SharedPolicy};
use crate::tee::record::{Capture, Exchange, Message};
use crate::tee::TeeSender;
use crate::telemetry::{ConsumerLabel, ErrorLabel, ProxyMetrics, RouteMetrics};
use prometheus_client::metrics::counter::Counter;

/// The header carrying the prediction id that keys the record, on every response.
pub const ID_HEADER: HeaderName = HeaderName::from_static("sluicegate-id");
/// The version of the policy that handled the request.
pub const POLICY_HEADER: HeaderName = HeaderName::from_static("sluicegate-policy");

/// A header value unique to one response (the id, the tag, a batch's decisions), marked
/// sensitive so HTTP/2 sends it "never indexed": in HPACK's dynamic table it would only evict
/// the headers that do repeat (content type, policy version, status), which both ends then
/// encode and decode again in full. `None` when it is no header value.
pub(crate) fn per_response_value(value: String) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_maybe_shared(Bytes::from(value)).ok()?;
    v.set_sensitive(true);
    Some(v)
}

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
    /// The current policy generation's metric handles (see [`Proxy::handles`]).
    handles: ArcSwapOption<MetricHandles>,
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
            handles: ArcSwapOption::empty(),
            default_route: DEFAULT_ROUTE.into(),
        }
    }

    /// Sets the largest response a deciding route reads whole and decides (a larger one
    /// passes through undecided).
    pub fn with_max_decided_response(mut self, bytes: u64) -> Self {
        self.max_decided_response = bytes;
        self
    }

    /// Serves one request. Never fails: errors become JSON responses. The phases, in order,
    /// each a method below: [`admit`](Self::admit), forward ([`upstream_head`](Self::upstream_head)
    /// and the send), capture ([`capture_head`](Self::capture_head), and for a deciding route
    /// [`capture_whole`](Self::capture_whole)), [`decide`](Self::decide),
    /// [`respond`](Self::respond).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        client: SocketAddr,
    ) -> Result<Response<ResponseBody>, std::convert::Infallible> {
        let mut admitted = self.admit(&req);
        if let Some((err, detail)) = admitted.refusal.take() {
            return Ok(self.fail(err, &detail, admitted));
        }

        let (mut parts, body) = req.into_parts();
        let original_version = self.upstream_head(&mut admitted, &mut parts, client);
        let limits = RequestLimits {
            max_body: self.max_request_body,
            body_timeout: self.client_body_timeout,
        };
        let mut body = RequestBody::new(body, limits, admitted.capture.clone(), admitted.sampled);
        if admitted.model_infer {
            body = body.scanning_model_name();
        }
        let (resp, stream, upstream_time) = match self
            .forward(&admitted, Request::from_parts(parts, body))
            .await
        {
            Ok(forwarded) => forwarded,
            Err((err, detail)) => return Ok(self.fail(err, &detail, admitted)),
        };

        let (mut parts, body) = resp.into_parts();
        let body = UpstreamIncoming::new(body, self.upstream.body_timeout, stream);
        if admitted.model_infer {
            self.route_grpc(&mut admitted);
        }
        let route = self.capture_head(&mut admitted, &mut parts, original_version, upstream_time);
        // Read whole when the model's route decides, or when the request named no model
        // (compressed) and some route could.
        let named = admitted.capture.model_name.get().is_some();
        if admitted.model_infer
            && parts.status.is_success()
            && admitted.policy.routes.decides_model_infer()
            && match &admitted.compiled {
                Some(r) => r.decider.is_some(),
                None => !named,
            }
        {
            // Decided on the gRPC message; a call whose request named no model (compressed)
            // is routed by the model its response names.
            return Ok(decision::respond_model_infer(&self, admitted, parts, body).await);
        }
        let Some(route) = route else {
            // Streams through, captured for the record as it goes.
            admitted.answered(parts.status.as_u16());
            let body = UpstreamBody::new(body, admitted.pending);
            return Ok(Response::from_parts(parts, ResponseBody::Upstream(body)));
        };
        let bytes = match decision::collect_up_to(body, self.max_decided_response).await {
            Collected::Whole(bytes, _trailers) => bytes,
            Collected::TooLarge(prefix, rest) => {
                return Ok(decision::pass_too_large(
                    &self, admitted, parts, prefix, rest,
                ))
            }
            Collected::Broken(e) => {
                let err = if e.is::<body::UpstreamBodyTimeout>() {
                    ProxyError::UpstreamBodyTimeout
                } else {
                    ProxyError::UpstreamFailed
                };
                return Ok(self.fail(err, &e.to_string(), admitted));
            }
        };
        let captured = match self.capture_whole(&mut admitted, route, parts, bytes) {
            Ok(captured) => captured,
            Err(passed) => return Ok(*passed),
        };

        let decision = self.decide(&admitted, &captured);
        Ok(self.respond(admitted, captured, decision))
    }

    /// Admission: one policy snapshot for the whole request; the path normalized, the route,
    /// the id, the consumer, and whether the exchange is recorded; and why the request is
    /// answered here instead of forwarded, if it is (malformed, an ambiguous path, an
    /// undeclared consumer the policy refuses, a declared length over the limit).
    pub fn admit<B>(&self, req: &Request<B>) -> Admitted {
        let start = Instant::now();
        let time = SystemTime::now();
        let policy = self.policy.load_full();
        let handles = self.handles(&policy);
        let malformed = malformed(req);
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
        let mut refusal = match (malformed, normalized) {
            (Some(why), _) => Some((ProxyError::BadRequest, why.to_owned())),
            (None, Err(why)) => Some((ProxyError::AmbiguousPath, why.to_string())),
            (None, Ok(_)) => None,
        };
        let path = path_and_query.split('?').next().unwrap_or_default();
        // A gRPC call is routed by its model once its message has been read (`route_grpc`):
        // `path_prefix` routes never match it.
        let grpc = oip::is_grpc(req.headers().get(header::CONTENT_TYPE));
        let model_infer = grpc && path == oip::MODEL_INFER_PATH;
        // A refused request gets no route: it is answered before anything is decided.
        let compiled = match refusal {
            None if !grpc => policy.routes.route_for(path).cloned(),
            _ => None,
        };
        let route = compiled
            .as_ref()
            .map_or_else(|| self.default_route.clone(), |r| r.name.clone());
        let metrics = handles.route(&self.metrics, &route);
        let id_string = uuid::Uuid::now_v7().to_string();
        let id = per_response_value(id_string.clone()).expect("uuid is a valid header value");
        let headers = req.headers();

        let consumer = headers
            .get(&policy.consumer_header)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let declared = consumer.as_deref().is_some_and(|c| policy.declared(c));
        handles.count_consumer(&self.metrics, consumer.as_deref().filter(|_| declared));

        let sampled = policy.sampled();
        let capture_bodies = compiled
            .as_ref()
            .and_then(|r| r.spec.capture_bodies)
            .unwrap_or(policy.spec.tee.capture_bodies);
        let body_cap = if capture_bodies { policy.body_cap } else { 0 };
        let capture = Arc::new(RequestCapture {
            capture: std::sync::Mutex::new(Capture::with_cap(body_cap)),
            ..Default::default()
        });
        let pending = sampled.then(|| {
            Pending::new(
                self.tee.clone(),
                Exchange {
                    id: id_string,
                    time,
                    route: route.clone(),
                    record: policy.record.clone(),
                    consumer: consumer.clone(),
                    method: req.method().clone(),
                    path: path_and_query.clone(),
                    request: Message {
                        headers: headers.clone(),
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
                    shadow: false,
                    response_read: None,
                },
                capture.clone(),
                start,
            )
        });

        if refusal.is_none() && !declared && policy.spec.consumers.undeclared == Undeclared::Refuse
        {
            // The message is recorded too: a redacted consumer header stays out of it.
            let who = match consumer {
                None => "(unnamed)".to_owned(),
                Some(_) if policy.redacted_headers.contains(&policy.consumer_header) => {
                    "(redacted)".to_owned()
                }
                Some(c) => format!("{c:?}"),
            };
            refusal = Some((ProxyError::ConsumerUndeclared, who));
        }
        let declared_len = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if refusal.is_none() && declared_len.is_some_and(|n| n > self.max_request_body) {
            let err = ProxyError::BodyTooLarge {
                limit: self.max_request_body,
            };
            refusal = Some((err, String::new()));
        }
        Admitted {
            policy,
            compiled,
            grpc,
            model_infer,
            metrics,
            start,
            id,
            path_and_query,
            sampled,
            capture,
            pending,
            refusal,
        }
    }

    /// Forward, the request head: rewritten for the upstream (its address, its HTTP version,
    /// no hop-by-hop headers). Returns the version the client spoke, for the response.
    pub fn upstream_head(
        &self,
        admitted: &mut Admitted,
        parts: &mut http::request::Parts,
        client: SocketAddr,
    ) -> Version {
        let version = match self.upstream.protocol {
            UpstreamProtocol::Auto if parts.version == Version::HTTP_2 => Version::HTTP_2,
            UpstreamProtocol::Http2 => Version::HTTP_2,
            _ => Version::HTTP_11,
        };
        parts.uri = Uri::builder()
            .scheme("http")
            .authority(self.upstream.authority.clone())
            .path_and_query(std::mem::take(&mut admitted.path_and_query))
            .build()
            .expect("upstream authority and client path form a URI");
        let original_version = parts.version;
        parts.version = version;
        strip_hop_by_hop(&mut parts.headers);
        if admitted
            .compiled
            .as_ref()
            .is_some_and(|r| r.decider.is_some())
        {
            // A deciding route reads the body: ask for it uncompressed.
            parts.headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        if admitted.model_infer && admitted.policy.routes.decides_model_infer() {
            // The same for a gRPC call's messages; a gzip one is decoded all the same.
            parts
                .headers
                .insert("grpc-accept-encoding", HeaderValue::from_static("identity"));
        }
        if let Some(host) = parts.headers.remove(header::HOST) {
            parts.headers.insert("x-forwarded-host", host);
        }
        append_forwarded_for(&mut parts.headers, client);
        original_version
    }

    /// Forward, the send: within the upstream timeout, to the response head. A failure is the
    /// error the client gets and its detail, blamed on the client's body when that broke first.
    async fn forward(
        &self,
        admitted: &Admitted,
        req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<Arc<pool::Stream>>, Duration), (ProxyError, String)>
    {
        let sent = Instant::now();
        let result = tokio::time::timeout(self.upstream.timeout, self.send(req)).await;
        let upstream_time = sent.elapsed();
        let shared = &admitted.capture;
        match result {
            Ok(Ok((resp, stream))) => Ok((resp, stream, upstream_time)),
            // The client's body failed first: the upstream request failed because of it.
            _ if shared.client_fault.get().is_some() => {
                let fault = shared.client_fault.get().expect("checked");
                let err = match fault {
                    ClientFault::Broken(_) => ProxyError::ClientBody,
                    ClientFault::Stalled(_) => ProxyError::ClientBodyTimeout,
                };
                Err((err, fault.to_string()))
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
                Err((err, error_chain(&*e.error)))
            }
            Err(_) => {
                let detail = humantime::format_duration(self.upstream.timeout).to_string();
                Err((ProxyError::UpstreamTimeout, detail))
            }
        }
    }

    /// Routes a gRPC `ModelInfer` call by the model its request named (read as the request
    /// streamed), once the upstream has answered: the server reads the whole message first.
    fn route_grpc(&self, admitted: &mut Admitted) {
        let Some(model) = admitted.capture.model_name.get() else {
            return;
        };
        let route = admitted.policy.routes.route_for_model(model).cloned();
        if let Some(route) = route {
            self.set_route(admitted, route);
        }
    }

    /// The route of a call whose route was known only once it was under way: its metrics
    /// and its record move to it.
    fn set_route(&self, admitted: &mut Admitted, route: Arc<Route>) {
        admitted.metrics = self
            .handles(&admitted.policy)
            .route(&self.metrics, &route.name);
        if let Some(p) = admitted.pending.as_mut() {
            p.set_route(route.name.clone());
        }
        admitted.compiled = Some(route);
    }

    /// Capture, the response head: timed, stripped of hop-by-hop headers, recorded, and
    /// stamped with the id and the policy version. Returns the route when it decides this
    /// response (a success on a deciding route), whose body is then read whole; every other
    /// body streams.
    pub fn capture_head(
        &self,
        admitted: &mut Admitted,
        parts: &mut http::response::Parts,
        original_version: Version,
        upstream_time: Duration,
    ) -> Option<Arc<Route>> {
        admitted
            .metrics
            .upstream_duration(upstream_time.as_secs_f64());
        strip_hop_by_hop(&mut parts.headers);
        parts.version = original_version;
        if let Some(p) = admitted.pending.as_mut() {
            p.set_response(parts.status.as_u16(), upstream_time, parts.headers.clone());
        }
        parts.headers.insert(ID_HEADER, admitted.id.clone());
        parts.headers.insert(
            POLICY_HEADER,
            HeaderValue::from_str(&admitted.policy.version).expect("hex is a valid header value"),
        );
        admitted
            .compiled
            .clone()
            .filter(|r| r.decider.is_some() && parts.status.is_success() && !admitted.grpc)
    }

    /// Capture, a deciding route's body read whole: decoded if the server compressed it, and
    /// copied into the record. A body that cannot be decoded passes through undecided (`Err`,
    /// boxed: the rare path pays the allocation).
    pub fn capture_whole(
        &self,
        admitted: &mut Admitted,
        route: Arc<Route>,
        parts: http::response::Parts,
        bytes: Bytes,
    ) -> Result<Captured, Box<Response<ResponseBody>>> {
        decision::capture_whole(self, admitted, route, parts, bytes)
    }

    /// Decide: the route's scores read from the captured body, thresholds and limits applied
    /// (alerts and metrics with them), the provenance tag signed.
    pub fn decide(
        &self,
        admitted: &Admitted,
        captured: &Captured,
    ) -> Result<Decision, crate::decide::extract::ExtractError> {
        decision::decide(self, admitted, captured)
    }

    /// Respond: the decision written into the headers and, if the route asks, the body (or a
    /// limit's 429); the record finished. An unreadable body passes through unchanged.
    pub fn respond(
        &self,
        mut admitted: Admitted,
        captured: Captured,
        decision: Result<Decision, crate::decide::extract::ExtractError>,
    ) -> Response<ResponseBody> {
        let resp = decision::respond(&mut admitted, captured, decision);
        admitted.answered(resp.status().as_u16());
        resp
    }

    /// The metric handles of `policy`'s routes and consumers, resolved once per policy
    /// generation: the first request under a new generation builds them for every route, and
    /// the old generation's go with it (a route a reload removed keeps no handles here).
    fn handles(&self, policy: &Policy) -> Arc<MetricHandles> {
        let current = self.handles.load_full();
        if let Some(current) = current
            .as_ref()
            .filter(|h| h.generation == policy.generation)
        {
            return current.clone();
        }
        let fresh = Arc::new(MetricHandles::new(
            &self.metrics,
            policy,
            &self.default_route,
        ));
        // Only forward: a request still holding an older snapshot does not roll it back.
        if current.is_none_or(|h| h.generation < policy.generation) {
            self.handles.store(Some(fresh.clone()));
        }
        fresh
    }

    /// Sends `req` over HTTP/1.1 or from the HTTP/2 pool; the pooled stream comes back with the
    /// response, for its body to hold.
    async fn send(
        &self,
        req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Option<Arc<pool::Stream>>), SendError> {
        if req.version() == Version::HTTP_2 {
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
    /// publishes them (with their settings and realized counts), and ends limit breaches
    /// whose windows have emptied.
    pub async fn run_upkeep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let policy = self.policy.load_full();
            let now = Instant::now();
            let mut events = Vec::new();
            for route in &policy.routes.live {
                route.tick(now, &mut events);
                for (class, threshold) in route.labelled_thresholds() {
                    self.metrics
                        .publish_threshold(&route.name, class, threshold);
                }
            }
            for event in events {
                decision::emit_alert(&self, &policy, event);
            }
        }
    }

    /// Answers the request itself with `err`, counted and recorded.
    fn fail(&self, err: ProxyError, detail: &str, admitted: Admitted) -> Response<ResponseBody> {
        let message = err.message(detail);
        self.metrics
            .errors
            .get_or_create(&ErrorLabel {
                kind: err.code(),
                source: err.source(),
            })
            .inc();
        let recorded = if err.detail_is_internal() {
            tracing::debug!(code = err.code(), id = ?admitted.id, cause = detail, "{message}");
            format!("{message}: {detail}")
        } else {
            message.clone()
        };
        // A gRPC client reads a gRPC status, not an HTTP error page.
        let (resp, record_error) = err.answer(&admitted.id, &message, recorded, admitted.grpc);
        let status = resp.status();
        admitted.answered(status.as_u16());
        if let Some(p) = admitted.pending {
            // A body that failed on either side did not arrive whole.
            let complete = !matches!(
                err,
                ProxyError::ClientBody
                    | ProxyError::ClientBodyTimeout
                    | ProxyError::UpstreamBodyTimeout
            );
            p.finish_error(status.as_u16(), record_error, complete);
        }
        resp
    }
}

/// A request as admission left it, carried through the later phases: its policy snapshot,
/// route, id and metric handles, and its record under way. Opaque: public so the stack bench
/// can time each phase.
pub struct Admitted {
    policy: Arc<Policy>,
    /// The matched route; `None` for the default route and for a refused request.
    compiled: Option<Arc<Route>>,
    /// A gRPC call: errors the proxy answers are gRPC statuses.
    grpc: bool,
    /// A gRPC `ModelInfer` call: routed by its model, decided on a `model:` route.
    model_infer: bool,
    metrics: Arc<RouteMetrics>,
    /// When admission began: the request duration runs from here.
    start: Instant,
    id: HeaderValue,
    /// Taken by [`Proxy::upstream_head`] into the upstream URI.
    path_and_query: String,
    sampled: bool,
    capture: Arc<RequestCapture>,
    pending: Option<Pending>,
    /// Why the request is answered without forwarding, if it is.
    refusal: Option<(ProxyError, String)>,
}

impl Admitted {
    /// Counts the request as answered with `status`, and how long its answer took.
    fn answered(&self, status: u16) {
        self.metrics.request(status, self.start.elapsed());
    }
}

/// The metric handles of one policy generation: each route's, and each consumer's.
struct MetricHandles {
    generation: u64,
    routes: HashMap<Arc<str>, Arc<RouteMetrics>>,
    /// Declared consumers by name; every other caller counts as `undeclared`.
    consumers: HashMap<String, Counter>,
    undeclared: Counter,
}

impl MetricHandles {
    fn new(metrics: &ProxyMetrics, policy: &Policy, default_route: &Arc<str>) -> Self {
        let routes = policy
            .routes
            .live
            .iter()
            .map(|r| (&r.name, r.score_range()))
            .chain([(default_route, None)])
            .map(|(name, range)| {
                let handles = RouteMetrics::new(metrics, name, range);
                (name.clone(), Arc::new(handles))
            })
            .collect();
        let consumer = |name: &str, declared: bool| {
            metrics
                .consumer_requests
                .get_or_create(&ConsumerLabel {
                    consumer: name.to_owned(),
                    declared,
                })
                .clone()
        };
        MetricHandles {
            generation: policy.generation,
            routes,
            consumers: policy
                .spec
                .consumers
                .declared
                .iter()
                .map(|c| (c.clone(), consumer(c, true)))
                .collect(),
            undeclared: consumer("undeclared", false),
        }
    }

    /// Every route of the generation has its handles; any other name (not reached) resolves
    /// them afresh rather than miscount.
    fn route(&self, metrics: &ProxyMetrics, route: &Arc<str>) -> Arc<RouteMetrics> {
        self.routes
            .get(route)
            .cloned()
            .unwrap_or_else(|| Arc::new(RouteMetrics::new(metrics, route, None)))
    }

    /// Counts a request from a declared consumer (`Some`), or from an undeclared caller.
    fn count_consumer(&self, metrics: &ProxyMetrics, declared: Option<&str>) {
        match declared {
            None => self.undeclared.inc(),
            Some(c) => match self.consumers.get(c) {
                Some(counter) => counter.inc(),
                None => metrics
                    .consumer_requests
                    .get_or_create(&ConsumerLabel {
                        consumer: c.to_owned(),
                        declared: true,
                    })
                    .inc(),
            },
        };
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
mod tests;
