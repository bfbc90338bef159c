//! The admin port: `/metrics`, `/healthz`, `/readyz`; and the upstream readiness probe.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::config::settings::Upstream;
use crate::telemetry::Metrics;

/// What `/readyz` reports.
#[derive(Debug, Default)]
pub struct Readiness {
    upstream_ready: AtomicBool,
    shutting_down: AtomicBool,
}

impl Readiness {
    /// Ready: the upstream answers and no shutdown has begun. The tee plays no part: a Kafka
    /// outage must not take a fleet of model pods out of service.
    pub fn is_ready(&self) -> bool {
        self.upstream_ready.load(Ordering::Relaxed) && !self.shutting_down.load(Ordering::Relaxed)
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }
}

/// Probes the upstream once a second: an HTTP GET of the ready path (2xx = ready), or a TCP
/// connect when no path is set.
pub async fn probe_upstream(upstream: Upstream, readiness: Arc<Readiness>, metrics: Arc<Metrics>) {
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

/// Serves the admin port until the listener is dropped with the task.
pub async fn serve_admin(listener: TcpListener, metrics: Arc<Metrics>, readiness: Arc<Readiness>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let metrics = metrics.clone();
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let metrics = metrics.clone();
                let readiness = readiness.clone();
                async move { Ok::<_, std::convert::Infallible>(admin(req, &metrics, &readiness).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn admin(
    req: Request<Incoming>,
    metrics: &Metrics,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    // Admin requests are tiny; read and discard whatever body came.
    let _ = http_body_util::Limited::new(body, 64 << 10).collect().await;
    match (parts.method, parts.uri.path()) {
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

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

/// Where the admin listener ended up (port 0 picks one).
pub fn local(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .expect("bound listener has an address")
}
