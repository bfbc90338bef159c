//! Bodies that stream through untouched while the tee keeps a capped copy.
//!
//! [`RequestBody`] enforces the request size limit and the client's idle timeout, and captures
//! into a shared slot (the request may still be streaming when the response ends: gRPC bidi).
//! [`ResponseBody`] owns the pending record and hands it to the tee when the body ends, fails
//! or is dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::pending::Pending;
use super::pool::Stream;
use crate::oip::ModelNameScanner;
use crate::tee::record::Capture;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body went past the configured limit (the client gets 413).
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// The client's body failed: it broke off (the client gets 400) or went quiet (408). Told
/// apart from the upstream's faults, which look the same from the upstream request's side.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ClientFault {
    #[error("{0}")]
    Broken(String),
    #[error("no request body data for {}", humantime::format_duration(*.0))]
    Stalled(Duration),
}

/// The upstream sent no piece of its response body for `--upstream-body-timeout`.
#[derive(Debug, thiserror::Error)]
#[error("no response body data from the model server for {}", humantime::format_duration(*.0))]
pub struct UpstreamBodyTimeout(pub Duration);

/// What the request side shares with the pending record.
#[derive(Debug, Default)]
pub struct RequestCapture {
    pub capture: Mutex<Capture>,
    pub trailers: Mutex<Option<http::HeaderMap>>,
    pub too_large: AtomicBool,
    pub client_fault: OnceLock<ClientFault>,
    /// A gRPC `ModelInfer` request's `model_name`, once its message has streamed past whole
    /// (see [`RequestBody::scanning_model_name`]).
    pub model_name: OnceLock<String>,
}

/// Time a body has spent waiting for its sender. The clock restarts each time a wait begins,
/// so time the receiving side spent not asking for data (flow control) never counts.
pub(crate) struct IdleTimer {
    limit: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
}

impl IdleTimer {
    pub(crate) fn new(limit: Duration) -> Self {
        IdleTimer {
            limit,
            sleep: None,
            waiting: false,
        }
    }

    /// The body is pending: ready once it has been so for the limit.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.waiting {
            self.waiting = true;
            let deadline = tokio::time::Instant::now() + self.limit;
            match &mut self.sleep {
                Some(sleep) => sleep.as_mut().reset(deadline),
                // Made on the first wait only: a body that is all there never needs a timer.
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        self.sleep.as_mut().expect("armed above").as_mut().poll(cx)
    }

    /// Data came.
    fn progress(&mut self) {
        self.waiting = false;
    }
}

/// The client's request body on its way upstream.
pub struct RequestBody {
    inner: Incoming,
    limit: u64,
    seen: u64,
    /// `None` when this request is not recorded.
    capture: Option<Arc<RequestCapture>>,
    shared: Arc<RequestCapture>,
    idle: IdleTimer,
    /// The pooled HTTP/2 stream this body goes out on, given back once it is done.
    stream: Option<Arc<Stream>>,
    /// Reads a gRPC `ModelInfer` request's model name as it passes (boxed: most requests
    /// have none).
    model_name: Option<Box<ModelNameScanner>>,
}

impl RequestBody {
    pub fn new(
        inner: Incoming,
        limits: RequestLimits,
        shared: Arc<RequestCapture>,
        capture: bool,
    ) -> Self {
        RequestBody {
            inner,
            limit: limits.max_body,
            seen: 0,
            capture: capture.then(|| shared.clone()),
            shared,
            idle: IdleTimer::new(limits.body_timeout),
            stream: None,
            model_name: None,
        }
    }

    /// Reads the request's `model_name` as it streams (a gRPC `ModelInfer` call: its route
    /// is its model's), into [`RequestCapture::model_name`].
    pub fn scanning_model_name(mut self) -> Self {
        self.model_name = Some(Box::default());
        self
    }

    pub(crate) fn hold(&mut self, stream: Arc<Stream>) {
        self.stream = Some(stream);
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let fault = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => {
                ready!(self.idle.poll_expired(cx));
                ClientFault::Stalled(self.idle.limit)
            }
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => ClientFault::Broken(super::error_chain(&e)),
            Poll::Ready(Some(Ok(frame))) => {
                self.idle.progress();
                return Poll::Ready(Some(self.pass(frame)));
            }
        };
        let fault = self.shared.client_fault.get_or_init(|| fault).clone();
        Poll::Ready(Some(Err(Box::new(fault))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl RequestBody {
    /// Counts and captures a frame from the client on its way upstream.
    fn pass(&mut self, frame: Frame<Bytes>) -> Result<Frame<Bytes>, BoxError> {
        if let Some(data) = frame.data_ref() {
            self.seen += data.len() as u64;
            if self.seen > self.limit {
                self.shared.too_large.store(true, Ordering::Relaxed);
                return Err(Box::new(BodyTooLarge { limit: self.limit }));
            }
            if let Some(c) = &self.capture {
                c.capture.lock().expect("capture lock").push(data);
            }
            if let Some(scanner) = self.model_name.as_mut() {
                scanner.feed(data);
                if scanner.finished() {
                    if let Some(name) = scanner.model_name() {
                        let _ = self.shared.model_name.set(name.to_owned());
                    }
                    self.model_name = None;
                }
            }
        } else if let (Some(t), Some(c)) = (frame.trailers_ref(), &self.capture) {
            *c.trailers.lock().expect("trailers lock") = Some(t.clone());
        }
        Ok(frame)
    }
}

/// What a client's request body may do.
#[derive(Clone, Copy, Debug)]
pub struct RequestLimits {
    /// Largest body; past it, 413.
    pub max_body: u64,
    /// Longest wait for the next piece of the body; past it, 408.
    pub body_timeout: Duration,
}

impl RequestLimits {
    pub fn from_settings(settings: &crate::config::settings::Settings) -> Self {
        RequestLimits {
            max_body: settings.max_request_body_bytes,
            body_timeout: settings.client_body_timeout,
        }
    }
}

/// The body sent to the client: the upstream's, streamed, or one the proxy wrote itself.
// The small variant is the rare error path; boxing the common one would cost an allocation.
#[allow(clippy::large_enum_variant)]
pub enum ResponseBody {
    Upstream(UpstreamBody),
    Full(Option<Bytes>),
    /// A whole body, then trailers (a decided gRPC call: its message, then its status).
    WithTrailers(Option<Bytes>, Option<http::HeaderMap>),
    /// Chunks already read (a deciding route gave up on a body too large to decide), then the
    /// rest of the upstream's body.
    Prefixed(std::collections::VecDeque<Bytes>, UpstreamBody),
}

impl ResponseBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ResponseBody::Full(Some(bytes.into()))
    }
}

/// The upstream's response body as it arrives, holding its pooled HTTP/2 stream until it is
/// done, and failing with [`UpstreamBodyTimeout`] when it goes quiet.
pub struct UpstreamIncoming {
    inner: Incoming,
    idle: IdleTimer,
    _stream: Option<Arc<Stream>>,
}

impl UpstreamIncoming {
    pub(crate) fn new(inner: Incoming, timeout: Duration, stream: Option<Arc<Stream>>) -> Self {
        UpstreamIncoming {
            inner,
            idle: IdleTimer::new(timeout),
            _stream: stream,
        }
    }
}

impl Body for UpstreamIncoming {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => {
                ready!(self.idle.poll_expired(cx));
                Poll::Ready(Some(Err(Box::new(UpstreamBodyTimeout(self.idle.limit)))))
            }
            Poll::Ready(frame) => {
                self.idle.progress();
                Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The upstream's response body, captured for the tee as it streams.
pub struct UpstreamBody {
    inner: UpstreamIncoming,
    /// `None` once the record is handed off, or when the request is not recorded.
    pending: Option<Pending>,
}

impl UpstreamBody {
    pub fn new(inner: UpstreamIncoming, pending: Option<Pending>) -> Self {
        UpstreamBody { inner, pending }
    }

    fn finish(&mut self, complete: bool, error: Option<&BoxError>) {
        if let Some(pending) = self.pending.take() {
            pending.finish_response(complete, error);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::WithTrailers(bytes, trailers) => Poll::Ready(
                bytes
                    .take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
            ResponseBody::Prefixed(prefix, up) => match prefix.pop_front() {
                Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
                None => up.poll_upstream(cx),
            },
            ResponseBody::Upstream(up) => up.poll_upstream(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Full(b) => b.is_none(),
            ResponseBody::WithTrailers(b, t) => b.is_none() && t.is_none(),
            ResponseBody::Prefixed(prefix, up) => prefix.is_empty() && up.inner.is_end_stream(),
            ResponseBody::Upstream(up) => up.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ResponseBody::Full(None) => SizeHint::with_exact(0),
            ResponseBody::WithTrailers(b, _) => {
                SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
            ResponseBody::Prefixed(..) => SizeHint::default(),
            ResponseBody::Upstream(up) => up.inner.size_hint(),
        }
    }
}

impl UpstreamBody {
    fn poll_upstream(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            None => {
                self.finish(true, None);
                Poll::Ready(None)
            }
            Some(Err(e)) => {
                self.finish(false, Some(&e));
                Poll::Ready(Some(Err(e)))
            }
            Some(Ok(frame)) => {
                if let Some(p) = self.pending.as_mut() {
                    p.capture_frame(&frame);
                }
                if self.inner.is_end_stream() {
                    self.finish(true, None);
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // The client went away (or the connection closed) before the body ended.
        self.finish(false, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls `timer` once, as a body does when its sender has nothing.
    async fn expired(timer: &mut IdleTimer) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(timer.poll_expired(cx).is_ready())).await
    }

    #[tokio::test]
    async fn the_idle_clock_runs_only_while_waiting_for_the_sender() {
        let limit = Duration::from_millis(300);
        let mut timer = IdleTimer::new(limit);
        assert!(!expired(&mut timer).await);
        timer.progress();
        // Not asked for data (flow control) for longer than the limit: that is not idleness.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!expired(&mut timer).await, "a new wait starts a new clock");
        let start = std::time::Instant::now();
        std::future::poll_fn(|cx| timer.poll_expired(cx)).await;
        assert!(start.elapsed() >= limit - Duration::from_millis(5));
    }
}
