//! The admin port: `/metrics`, `/healthz`, `/readyz`, and the token-protected `/admin/*`
//! (reload, view or replace the policy); the upstream readiness probe; policy reloads.

pub(crate) mod fleet;
pub(crate) mod reload;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::config::settings::Upstream;
use crate::telemetry::Metrics;

/// What `/readyz` reports.
#[derive(Debug, Default)]
pub(crate) struct Readiness {
    upstream_ready: AtomicBool,
    shutting_down: AtomicBool,
}

impl Readiness {
    /// Ready: the upstream answers and no shutdown has begun. The tee plays no part: a Kafka
    /// outage must not take a fleet of model pods out of service.
    pub(crate) fn is_ready(&self) -> bool {
        self.upstream_ready.load(Ordering::Relaxed) && !self.shutting_down.load(Ordering::Relaxed)
    }

    pub(crate) fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }
}

/// Probes the upstream once a second: an HTTP GET of the ready path (2xx = ready), or a TCP
/// connect when no path is set.
pub(crate) async fn probe_upstream(
    upstream: Upstream,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut was_ready = None;
    loop {
        let ready = match &upstream.ready_path {
            Some(path) => {
                let uri = format!("http://{}{}", upstream.authority, path);
                let req = client.get(uri.parse().expect("authority and path form a URI"));
                matches!(tokio::time::timeout(Duration::from_secs(2), req).await,
                         Ok(Ok(resp)) if resp.status().is_success())
            }
            None => {
                let addr = upstream.authority.as_str().to_owned();
                matches!(
                    tokio::time::timeout(
                        Duration::from_secs(2),
                        tokio::net::TcpStream::connect(addr)
                    )
                    .await,
                    Ok(Ok(_))
                )
            }
        };
        readiness.upstream_ready.store(ready, Ordering::Relaxed);
        metrics.proxy.upstream_ready.set(ready as i64);
        if was_ready != Some(ready) {
            tracing::info!(upstream = %upstream.authority, ready, "upstream readiness changed");
            was_ready = Some(ready);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What the admin port needs.
pub(crate) struct Admin {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub reloader: Arc<reload::Reloader>,
    /// The bearer token's file, read at every call so a rotated Secret applies at once;
    /// `None` disables `/admin/*`.
    pub token_file: Option<std::path::PathBuf>,
    pub limits: AdminLimits,
    /// When a missing token file was last logged: once a minute is enough to be seen.
    token_warned: std::sync::Mutex<Option<Instant>>,
}

impl Admin {
    pub(crate) fn new(
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
        reloader: Arc<reload::Reloader>,
        token_file: Option<std::path::PathBuf>,
        limits: AdminLimits,
    ) -> Self {
        Admin {
            metrics,
            readiness,
            reloader,
            token_file,
            limits,
            token_warned: std::sync::Mutex::new(None),
        }
    }
}

/// Bounds on the admin port, so that a flood of it (it needs no token to connect) costs
/// bounded memory and leaves the data port alone.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdminLimits {
    /// Connections served at once; past it, new ones wait in the listen backlog.
    pub max_connections: usize,
    /// Largest `PUT /admin/policy` body.
    pub max_body: usize,
    /// A connection must send its request head within this, and its body within as long
    /// again.
    pub header_timeout: Duration,
}

impl AdminLimits {
    pub(crate) fn from_settings(settings: &crate::config::settings::Settings) -> Self {
        AdminLimits {
            max_connections: settings.admin_max_connections,
            max_body: settings.admin_max_body_bytes as usize,
            header_timeout: settings.admin_header_timeout,
        }
    }
}

/// Serves the admin port until the listener is dropped with the task. One request per
/// connection: an idle keep-alive connection would hold a slot with no deadline.
pub(crate) async fn serve_admin(listener: TcpListener, admin: Arc<Admin>) {
    let limits = admin.limits;
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_ADMIN_HEAD_BYTES)
        .keep_alive(false);
    loop {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let admin = admin.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let _slot = permit;
            // hyper's head timeout starts at the first byte; a silent connection is cut here.
            let mut first = [0u8; 1];
            match tokio::time::timeout(limits.header_timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let service = service_fn(move |req: Request<Incoming>| {
                let admin = admin.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(req, &admin).await) }
            });
            // Head, body and a slow reader of the answer: the whole exchange is bounded.
            let _ = tokio::time::timeout(
                limits.header_timeout * 3,
                builder.serve_connection(TokioIo::new(stream), service),
            )
            .await;
        });
    }
}

/// Largest admin request head: a token and a few headers.
const MAX_ADMIN_HEAD_BYTES: usize = 16 << 10;

async fn handle(req: Request<Incoming>, admin: &Admin) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    if path.starts_with("/admin/") {
        // The token is checked from the head: no byte of an unauthorized body is read.
        if let Some(refused) = refusal(&parts.headers, admin) {
            return refused;
        }
        let body = if parts.method == Method::PUT {
            match read_body(&parts.headers, body, admin.limits).await {
                Ok(b) => b,
                Err(refused) => return refused,
            }
        } else {
            Bytes::new()
        };
        return admin_call(&parts.method, path, &body, admin).await;
    }
    let (metrics, readiness) = (&admin.metrics, &admin.readiness);
    match (parts.method, path) {
        (Method::GET, "/metrics") => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        (Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".into()),
        (Method::GET, "/readyz") => {
            if readiness.is_ready() {
                text(StatusCode::OK, "text/plain", "ready\n".into())
            } else if readiness.shutting_down.load(Ordering::Relaxed) {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "shutting down\n".into(),
                )
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "upstream not ready\n".into(),
                )
            }
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Reads an authorized call's body: at most `max_body` bytes (a larger declared length is
/// refused before reading), within the head timeout.
async fn read_body(
    headers: &http::HeaderMap,
    body: Incoming,
    limits: AdminLimits,
) -> Result<Bytes, Response<Full<Bytes>>> {
    let too_large = || {
        json(
            StatusCode::PAYLOAD_TOO_LARGE,
            serde_json::json!({"error": "too_large", "message": format!("admin request bodies are at most {} bytes (--admin-max-body)", limits.max_body)}),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body as u64) {
        return Err(too_large());
    }
    let read = http_body_util::Limited::new(body, limits.max_body).collect();
    match tokio::time::timeout(limits.header_timeout, read).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(_)) => Err(json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "client_body_error", "message": "the request body was cut short or malformed"}),
        )),
        Err(_) => Err(json(
            StatusCode::REQUEST_TIMEOUT,
            serde_json::json!({"error": "client_body_timeout", "message": format!("the request body did not arrive within {}", humantime::format_duration(limits.header_timeout))}),
        )),
    }
}

/// Checks `authorization: Bearer TOKEN` against the token file, in constant time; the
/// response refusing the call, if it is refused.
fn refusal(headers: &http::HeaderMap, admin: &Admin) -> Option<Response<Full<Bytes>>> {
    let Some(file) = &admin.token_file else {
        return Some(json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "admin_disabled", "message": "the admin API is off: start with --admin-token-file"}),
        ));
    };
    let expected = match std::fs::read_to_string(file) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
        _ => {
            let mut warned = admin.token_warned.lock().expect("not poisoned");
            if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                *warned = Some(Instant::now());
                tracing::warn!(file = %file.display(), "cannot read the admin token file; refusing admin calls (logged once a minute)");
            }
            return Some(json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"error": "token_unavailable", "message": "the admin token file cannot be read"}),
            ));
        }
    };
    if constant_time_eq(bearer_token(headers).as_bytes(), expected.as_bytes()) {
        None
    } else {
        let mut resp = json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "unauthorized", "message": "a valid bearer token is required"}),
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        Some(resp)
    }
}

/// The token of `authorization: Bearer TOKEN`; the scheme is case-insensitive (RFC 9110
/// §11.1). Empty when there is none.
fn bearer_token(headers: &http::HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim())
}

/// Compares in constant time (`subtle`), digests rather than the tokens themselves, so timing
/// reveals neither how much of a guess was right nor the token's length.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::Digest;
    use subtle::ConstantTimeEq;
    let (a, b) = (sha2::Sha256::digest(a), sha2::Sha256::digest(b));
    a.as_slice().ct_eq(b.as_slice()).into()
}

async fn admin_call(
    method: &Method,
    path: &str,
    body: &Bytes,
    admin: &Admin,
) -> Response<Full<Bytes>> {
    let outcome = |r: Result<reload::Reloaded, crate::config::validate::PolicyErrors>| match r {
        Ok(reload::Reloaded::Applied {
            version,
            generation,
        }) => json(
            StatusCode::OK,
            serde_json::json!({"result": "applied", "version": version, "generation": generation}),
        ),
        Ok(reload::Reloaded::Unchanged { version }) => json(
            StatusCode::OK,
            serde_json::json!({"result": "unchanged", "version": version}),
        ),
        Err(errors) => json(
            StatusCode::UNPROCESSABLE_ENTITY,
            serde_json::json!({
                "error": "invalid_policy",
                "message": "the policy was refused; the policy in force keeps serving",
                "errors": errors.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            }),
        ),
    };
    match (method, path) {
        (&Method::POST, "/admin/reload") => {
            outcome(admin.reloader.reload_file(reload::Source::Api).await)
        }
        (&Method::GET, "/admin/policy") => {
            let (s, origin) = admin.reloader.current_with_origin().await;
            json(
                StatusCode::OK,
                serde_json::json!({"version": s.version, "generation": s.generation, "source": origin.as_str(), "policy": s.spec}),
            )
        }
        (&Method::PUT, "/admin/policy") => match std::str::from_utf8(body) {
            Ok(text) => outcome(admin.reloader.apply_text(text, reload::Source::Api).await),
            Err(_) => json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "not_utf8", "message": "the policy must be UTF-8 YAML or JSON"}),
            ),
        },
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not_found", "message": "admin calls: POST /admin/reload, GET /admin/policy, PUT /admin/policy"}),
        ),
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = text(status, "application/json", body.to_string());
    *r.status_mut() = status;
    r
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::{bearer_token, constant_time_eq};

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let mut h = http::HeaderMap::new();
        for (value, token) in [
            ("Bearer abc", "abc"),
            ("bearer abc", "abc"),
            ("BEARER  abc ", "abc"),
            ("Basic abc", ""),
            ("Bearerabc", ""),
        ] {
            h.insert(http::header::AUTHORIZATION, value.parse().unwrap());
            assert_eq!(bearer_token(&h), token, "{value:?}");
        }
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(!constant_time_eq(&[0u8; 256], &[]));
    }
}
