//! The record of one exchange while it is under way. Whatever way the exchange ends — the
//! response body finishes, the proxy answers with an error, or the client goes away and the
//! future is dropped — exactly one record is handed to the tee.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use http_body::Frame;

use super::body::{BoxError, ClientFault, RequestCapture, UpstreamBodyTimeout};
use crate::tee::record::{Capture, DecisionOutcome, Exchange, ExchangeError, Message, ReadJson};
use crate::tee::TeeSender;

pub struct Pending {
    tee: TeeSender,
    // Boxed: it is large, and moves from the handler to the body to the tee queue.
    exchange: Option<Box<Exchange>>,
    request: Arc<RequestCapture>,
    start: Instant,
}

impl Pending {
    pub fn new(
        tee: TeeSender,
        exchange: Exchange,
        request: Arc<RequestCapture>,
        start: Instant,
    ) -> Self {
        Pending {
            tee,
            exchange: Some(Box::new(exchange)),
            request,
            start,
        }
    }

    /// Bytes of each body to capture (0 when the route, or else the policy, turns capture off).
    pub fn body_cap(&self) -> usize {
        self.exchange.as_ref().map_or(0, |e| {
            // The route's switch, already resolved against the policy's.
            if e.capture_bodies {
                e.record.body_cap
            } else {
                0
            }
        })
    }

    /// The upstream answered: its status and headers; the body is captured as it streams.
    pub fn set_response(&mut self, status: u16, upstream: Duration, headers: HeaderMap) {
        let cap = self.body_cap();
        if let Some(e) = self.exchange.as_mut() {
            e.status = Some(status);
            e.upstream_duration = Some(upstream);
            e.response = Some(Message {
                headers,
                trailers: None,
                body: Capture::with_cap(cap),
            });
        }
    }

    /// The response's content coding was undone before deciding: the record holds the
    /// decoded body, so its headers no longer name the coding.
    pub fn response_decoded(&mut self) {
        if let Some(resp) = self.exchange.as_mut().and_then(|e| e.response.as_mut()) {
            resp.headers.remove(http::header::CONTENT_ENCODING);
        }
    }

    /// A response frame went by.
    pub fn capture_frame(&mut self, frame: &Frame<Bytes>) {
        let Some(resp) = self.exchange.as_mut().and_then(|e| e.response.as_mut()) else {
            return;
        };
        if let Some(data) = frame.data_ref() {
            resp.body.push(data);
        } else if let Some(t) = frame.trailers_ref() {
            resp.trailers = Some(t.clone());
        }
    }

    /// The decision layers' outcome for this response.
    pub fn set_decision(&mut self, outcome: DecisionOutcome) {
        if let Some(e) = self.exchange.as_mut() {
            e.decision = Some(outcome);
        }
    }

    /// The decision step read the captured response body whole, as JSON.
    pub fn set_response_read(&mut self, read: ReadJson) {
        if let Some(e) = self.exchange.as_mut() {
            e.response_read = Some(read);
        }
    }

    /// The route is in shadow mode: the decisions recorded were not applied.
    pub fn set_shadow(&mut self) {
        if let Some(e) = self.exchange.as_mut() {
            e.shadow = true;
        }
    }

    /// The provenance tag the response carries.
    pub fn set_tag(&mut self, tag: Option<String>) {
        if let Some(e) = self.exchange.as_mut() {
            e.tag = tag;
        }
    }

    /// The status the client got, when the proxy changed it (a limit's 429).
    pub fn set_status(&mut self, status: u16) {
        if let Some(e) = self.exchange.as_mut() {
            e.status = Some(status);
        }
    }

    /// Why the proxy answered in the model's place though the model answered (a limit's
    /// rejection).
    pub fn set_error(&mut self, error: ExchangeError) {
        if let Some(e) = self.exchange.as_mut() {
            e.error = Some(error);
        }
    }

    /// The route, when it is known only once the call is under way (a gRPC call's model).
    pub fn set_route(&mut self, route: Arc<str>) {
        if let Some(e) = self.exchange.as_mut() {
            e.route = route;
        }
    }

    /// The response body ended (`complete`) or broke off.
    pub fn finish_response(mut self, complete: bool, error: Option<&BoxError>) {
        if let Some(e) = self.exchange.as_mut() {
            e.complete = complete;
            // The client's body failing mid-exchange ends the upstream's response too.
            if let Some(fault) = self.request.client_fault.get().filter(|_| !complete) {
                e.error = Some(ExchangeError {
                    code: match fault {
                        ClientFault::Broken(_) => "client_body_error",
                        ClientFault::Stalled(_) => "client_body_timeout",
                    },
                    message: fault.to_string(),
                    grpc_status: None,
                });
            } else if let Some(err) = error {
                e.error = Some(ExchangeError {
                    code: if err.is::<UpstreamBodyTimeout>() {
                        "upstream_body_timeout"
                    } else {
                        "upstream_body_error"
                    },
                    message: err.to_string(),
                    grpc_status: None,
                });
            } else if !complete {
                e.error = Some(client_gone());
            }
        }
        self.emit();
    }

    /// The proxy answered the client itself; `complete` is false when the client's request
    /// did not arrive whole.
    pub fn finish_error(mut self, status: u16, error: ExchangeError, complete: bool) {
        if let Some(e) = self.exchange.as_mut() {
            e.status = Some(status);
            e.error = Some(error);
            e.complete = complete;
        }
        self.emit();
    }

    fn emit(&mut self) {
        let Some(mut e) = self.exchange.take() else {
            return;
        };
        e.request.body = std::mem::take(&mut *self.request.capture.lock().expect("capture lock"));
        e.request.trailers = self.request.trailers.lock().expect("trailers lock").take();
        e.total_duration = self.start.elapsed();
        self.tee.send(e);
    }
}

fn client_gone() -> ExchangeError {
    ExchangeError {
        code: "client_disconnected",
        message: "the client went away before the response ended".into(),
        grpc_status: None,
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(e) = self.exchange.as_mut() {
            e.complete = false;
            e.error.get_or_insert_with(client_gone);
            self.emit();
        }
    }
}
