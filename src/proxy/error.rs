//! Errors the proxy answers itself: a stable `error` code, a human message, a status picked by
//! where the failure came from (the client or the upstream).

use http::{header, HeaderValue, Response, StatusCode};

use super::body::ResponseBody;
use crate::tee::record::ExchangeError;

/// Why the proxy, not the upstream, answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProxyError {
    /// The client's body went past the limit.
    BodyTooLarge { limit: u64 },
    /// No connection to the upstream could be opened.
    UpstreamUnavailable,
    /// The upstream closed or reset the connection, or spoke broken HTTP.
    UpstreamFailed,
    /// The upstream did not send response headers in time.
    UpstreamTimeout,
    /// The upstream stopped sending a body the proxy had to read whole (a deciding route)
    /// for `--upstream-body-timeout`.
    UpstreamBodyTimeout,
    /// The client's request could not be forwarded: its body broke off (malformed chunked
    /// framing, fewer bytes than its `content-length`, a reset stream).
    ClientBody,
    /// The client stopped sending its body for `--client-body-timeout`.
    ClientBodyTimeout,
    /// The caller is not a declared consumer and the policy refuses undeclared ones.
    ConsumerUndeclared,
    /// Taking the model's action would breach an action limit whose policy is `reject`.
    LimitExceeded { retry_after_secs: u64 },
    /// The request cannot be forwarded as it is: no or an invalid `Host`, or `CONNECT`.
    BadRequest,
    /// The path would read differently to a server that decodes it further (see `path`).
    AmbiguousPath,
}

impl ProxyError {
    pub(crate) fn status(self) -> StatusCode {
        match self {
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::UpstreamUnavailable | ProxyError::UpstreamFailed => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout | ProxyError::UpstreamBodyTimeout => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::ClientBody => StatusCode::BAD_REQUEST,
            ProxyError::ClientBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::ConsumerUndeclared => StatusCode::FORBIDDEN,
            // 429, not 503: meshes retry 503 by default, which would run the model again.
            ProxyError::LimitExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::BadRequest | ProxyError::AmbiguousPath => StatusCode::BAD_REQUEST,
        }
    }

    /// Whose fault it was, the `source` label of the error counter: `client`, `upstream` or
    /// `policy` (the proxy refused by its policy).
    pub(crate) fn source(self) -> &'static str {
        match self {
            ProxyError::BodyTooLarge { .. }
            | ProxyError::ClientBody
            | ProxyError::ClientBodyTimeout
            | ProxyError::BadRequest
            | ProxyError::AmbiguousPath => "client",
            ProxyError::UpstreamUnavailable
            | ProxyError::UpstreamFailed
            | ProxyError::UpstreamTimeout
            | ProxyError::UpstreamBodyTimeout => "upstream",
            ProxyError::ConsumerUndeclared | ProxyError::LimitExceeded { .. } => "policy",
        }
    }

    /// The stable code clients and dashboards match on.
    pub(crate) fn code(self) -> &'static str {
        match self {
            ProxyError::BodyTooLarge { .. } => "request_too_large",
            ProxyError::UpstreamUnavailable => "upstream_unavailable",
            ProxyError::UpstreamFailed => "upstream_failed",
            ProxyError::UpstreamTimeout => "upstream_timeout",
            ProxyError::UpstreamBodyTimeout => "upstream_body_timeout",
            ProxyError::ClientBody => "client_body_error",
            ProxyError::ClientBodyTimeout => "client_body_timeout",
            ProxyError::ConsumerUndeclared => "consumer_undeclared",
            ProxyError::LimitExceeded { .. } => "limit_exceeded",
            ProxyError::BadRequest => "bad_request",
            ProxyError::AmbiguousPath => "ambiguous_path",
        }
    }

    pub(crate) fn message(self, detail: &str) -> String {
        match self {
            ProxyError::BodyTooLarge { limit } => {
                format!("request body is larger than the {limit}-byte limit")
            }
            // The cause (hyper's error chain) stays in the log and the record: it names
            // internals, and its wording changes between versions.
            ProxyError::UpstreamUnavailable => "cannot connect to the model server".into(),
            ProxyError::UpstreamFailed => "the model server failed to answer".into(),
            ProxyError::UpstreamTimeout => {
                format!("the model server did not answer within {detail}")
            }
            ProxyError::UpstreamBodyTimeout => format!("the model server's body stalled: {detail}"),
            ProxyError::ClientBody => {
                "the request body broke off or its framing is invalid".into()
            }
            ProxyError::ClientBodyTimeout => format!("the request body stalled: {detail}"),
            ProxyError::ConsumerUndeclared => format!(
                "caller {detail} is not a declared consumer; name yourself in the consumer header, or ask for your name to be added to the policy"
            ),
            ProxyError::LimitExceeded { retry_after_secs } => format!(
                "{detail}; retry after {retry_after_secs}s"
            ),
            ProxyError::BadRequest | ProxyError::AmbiguousPath => detail.to_owned(),
        }
    }

    /// Whether `detail` is kept out of the client's message (it goes to the log and the
    /// record instead).
    pub(crate) fn detail_is_internal(self) -> bool {
        matches!(
            self,
            ProxyError::UpstreamUnavailable | ProxyError::UpstreamFailed | ProxyError::ClientBody
        )
    }

    /// The JSON response sent to the client.
    pub(crate) fn response(self, id: &HeaderValue, message: &str) -> Response<ResponseBody> {
        let body = serde_json::json!({ "error": self.code(), "message": message });
        let mut resp = Response::new(ResponseBody::full(body.to_string()));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(super::ID_HEADER, id.clone());
        if let ProxyError::LimitExceeded { retry_after_secs } = self {
            h.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        resp
    }

    pub(crate) fn for_record(self, message: String) -> ExchangeError {
        ExchangeError {
            code: self.code(),
            message,
            grpc_status: None,
        }
    }

    /// The gRPC status a gRPC client gets for this error (what gRPC's own HTTP mapping would
    /// give, made precise: a limit is `RESOURCE_EXHAUSTED`, not `UNAVAILABLE`, so a client
    /// does not retry it at once).
    pub(crate) fn grpc_status(self) -> u32 {
        match self {
            ProxyError::BodyTooLarge { .. } | ProxyError::LimitExceeded { .. } => 8,
            ProxyError::UpstreamUnavailable | ProxyError::UpstreamFailed => 14,
            ProxyError::UpstreamTimeout
            | ProxyError::UpstreamBodyTimeout
            | ProxyError::ClientBodyTimeout => 4,
            ProxyError::ClientBody | ProxyError::BadRequest | ProxyError::AmbiguousPath => 3,
            ProxyError::ConsumerUndeclared => 7,
        }
    }

    /// The answer to a gRPC call: Trailers-Only (HTTP 200, the status in the headers, no
    /// message), `grpc-message` the stable code; a limit's adds `retry-after` and
    /// `grpc-retry-pushback-ms`.
    pub(crate) fn grpc_response(self, id: &HeaderValue) -> Response<ResponseBody> {
        let mut resp = Response::new(ResponseBody::Full(None));
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from(self.grpc_status()));
        h.insert("grpc-message", HeaderValue::from_static(self.code()));
        h.insert(super::ID_HEADER, id.clone());
        if let ProxyError::LimitExceeded { retry_after_secs } = self {
            h.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            h.insert(
                "grpc-retry-pushback-ms",
                HeaderValue::from(retry_after_secs.saturating_mul(1000)),
            );
        }
        resp
    }

    /// The answer the client gets — a gRPC status for a gRPC call, else the JSON error with
    /// `message` — and the record's error, with `recorded` as its message.
    pub(crate) fn answer(
        self,
        id: &HeaderValue,
        message: &str,
        recorded: String,
        grpc: bool,
    ) -> (Response<ResponseBody>, ExchangeError) {
        if grpc {
            let error = ExchangeError {
                grpc_status: Some(self.grpc_status()),
                ..self.for_record(recorded)
            };
            (self.grpc_response(id), error)
        } else {
            (self.response(id, message), self.for_record(recorded))
        }
    }
}
