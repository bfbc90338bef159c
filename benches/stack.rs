//! The whole proxy per request, in memory: a hyper client sends a v2 request over a duplex
//! stream to the proxy's connection handling (`proxy::server::Connections`), `Proxy::handle`
//! forwards it through its pooled upstream client to a model server on other duplex streams
//! that answers a fixed stand-in response, and the client reads the whole answer. No sockets,
//! one keep-alive connection on each side, everything on one current-thread runtime (the tee's
//! spool writer on its own thread, as in production), so the time per request is the request
//! path's CPU cost. Setups, with the ~1 KiB and ~16 KiB bodies of the end-to-end bench:
//! - `baseline_hyper_passthrough`: a minimal proxy, a `service_fn` that rewrites the URI and
//!   calls a hyper-util legacy client (the same server builder and upstream);
//! - `sluicegate_tee`: no policy, every exchange recorded to a spool in a temporary directory
//!   (`sluicegate-tee` of the end-to-end bench);
//! - `sluicegate_full`: the end-to-end bench's full policy (adaptive threshold, a limit,
//!   decisions written into the body, Ed25519 tags) with the same tee;
//! - `baseline_hyper_passthrough_grpc`, `sluicegate_tee_grpc` and `sluicegate_full_grpc`: the
//!   same, as a gRPC `ModelInfer` call of the same rows (h2c on both sides; with everything on,
//!   the message decoded, decided, the action tensor appended).
//!
//! After each sluicegate setup it prints how many records the tee queued and dropped: drops
//! mean the spool writer could not keep up with the request path run flat out.
//!
//! Then, in `phases_<size>`, each phase of the request path alone (see `Proxy::handle`), under
//! the full policy, on the same bodies: `admit`, `forward_head` (the rewrite; the send itself
//! is hyper's, in the baseline), `capture_head`, `capture_whole` (decoding and copying the
//! whole answer into the record; its read is hyper's), `decide` (scores, threshold, limit,
//! metrics, the Ed25519 tag) and `respond` (headers, the body with the decisions spliced in).
//! Each is timed from what the phase before it produced, built outside the timing.
//!
//! Run: `cargo bench --bench stack`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use http::header::{CONTENT_TYPE, HOST};
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::client::conn::http2::SendRequest as H2SendRequest;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prost::Message as _;
use sluicegate::config::policy::PolicySpec;
use sluicegate::config::settings::{RecordDecisions, Settings};
use sluicegate::config::validate::parse;
use sluicegate::decide::Route;
use sluicegate::demo::{v2_request, StandInModel};
use sluicegate::oip;
use sluicegate::policy::{self, SharedPolicy};
use sluicegate::provenance::{generate_key, Algorithm};
use sluicegate::proxy::body::RequestLimits;
use sluicegate::proxy::server::{Connections, ListenerLimits};
use sluicegate::proxy::{Admitted, Captured, Proxy};
use sluicegate::tee::record::EncodeContext;
use sluicegate::tee::spool::{SpoolConfig, SpoolMode, SpoolWriter};
use sluicegate::tee::TeeWriter;
use sluicegate::telemetry::Metrics;
use sluicegate::testing::grpc_request;
use tokio::io::{duplex, DuplexStream};

/// The binary's allocator (src/main.rs), so the request path and the spool writer thread
/// allocate as they do in production: under glibc's malloc they contend on its arena lock
/// (futex wake-ups were 12% of the bench thread in a profile of the gRPC tee line).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Rows of the end-to-end bench's bodies: ~1 KiB and ~16 KiB v2 responses.
const SIZES: [(&str, usize); 2] = [("1KiB", 23), ("16KiB", 421)];
const PATH: &str = "/v2/models/spam-filter/infer";
/// Room for a whole 16 KiB message in each direction of a duplex stream.
const PIPE_BYTES: usize = 64 << 10;

/// One end of an in-memory connection, as hyper-util's client wants it.
struct MemoryIo(TokioIo<DuplexStream>);

impl hyper::rt::Read for MemoryIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MemoryIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Connection for MemoryIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// A connector whose every connection is a duplex stream to a fresh model server (HTTP/1.1 or
/// h2c) that reads the request and answers `response`, or `grpc_response` (one framed
/// message, then `grpc-status: 0`) to a gRPC call.
#[derive(Clone)]
struct MemoryUpstream {
    response: Bytes,
    grpc_response: Bytes,
}

impl tower::Service<Uri> for MemoryUpstream {
    type Response = MemoryIo;
    type Error = io::Error;
    type Future = std::future::Ready<io::Result<MemoryIo>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (near, far) = duplex(PIPE_BYTES);
        let (response, grpc_response) = (self.response.clone(), self.grpc_response.clone());
        let service = service_fn(move |req: Request<Incoming>| {
            let (response, grpc_response) = (response.clone(), grpc_response.clone());
            async move {
                let grpc = oip::is_grpc(req.headers().get(CONTENT_TYPE));
                req.into_body().collect().await?;
                let resp = if grpc {
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    let frames = [Frame::data(grpc_response), Frame::trailers(trailers)];
                    let body = StreamBody::new(futures_util::stream::iter(
                        frames.map(Ok::<_, std::convert::Infallible>),
                    ));
                    let mut resp = Response::new(body.boxed());
                    resp.headers_mut()
                        .insert(CONTENT_TYPE, "application/grpc".parse().unwrap());
                    resp
                } else {
                    let mut resp = Response::new(Full::new(response).boxed());
                    resp.headers_mut()
                        .insert(CONTENT_TYPE, "application/json".parse().unwrap());
                    resp
                };
                Ok::<_, hyper::Error>(resp)
            }
        });
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(far), service)
                .await;
        });
        std::future::ready(Ok(MemoryIo(TokioIo::new(near))))
    }
}

async fn client_over(io: DuplexStream) -> SendRequest<Full<Bytes>> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn h2_client_over(io: DuplexStream) -> H2SendRequest<Full<Bytes>> {
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// The naive proxy: forward each request as it is, stream the answer back (over h2c to the
/// upstream when `h2`, as gRPC must go).
async fn baseline_server(upstream: MemoryUpstream, h2: bool) -> DuplexStream {
    let client: Client<MemoryUpstream, Incoming> = Client::builder(TokioExecutor::new())
        .http2_only(h2)
        .build(upstream);
    let service = service_fn(move |mut req: Request<Incoming>| {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = format!("http://model{path}").parse().unwrap();
        client.request(req)
    });
    let (near, far) = duplex(PIPE_BYTES);
    tokio::spawn(async move {
        let _ = auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(far), service)
            .await;
    });
    near
}

/// A running sluicegate: what must outlive the benchmark, and what it reports after.
struct Sluicegate {
    writer: TeeWriter,
    metrics: Arc<Metrics>,
    /// Dropping it would end the proxy's connection (a graceful shutdown).
    _graceful: GracefulShutdown,
}

impl Sluicegate {
    fn close(self, name: &str) {
        self.writer.close();
        let tee = &self.metrics.tee;
        eprintln!(
            "{name}: the tee queued {} entries (records and alerts) and dropped {} (queue full)",
            tee.queued.get(),
            tee.dropped_queue_full.get()
        );
    }
}

/// Builds the tee and the proxy as `app::start` does, with the default settings, the upstream
/// in memory and the spool in `spool_dir`.
fn proxy(
    policy: SharedPolicy,
    upstream: MemoryUpstream,
    spool_dir: &std::path::Path,
) -> (Arc<Proxy>, TeeWriter, Arc<Metrics>) {
    let settings = Settings::default();
    let metrics = Arc::new(Metrics::new());
    let (spool, _) = SpoolWriter::open(
        SpoolConfig {
            dir: spool_dir.to_owned(),
            // Bounded: a long run rotates instead of filling the disk.
            max_bytes: 256 << 20,
            segment_bytes: settings.spool.segment_bytes,
            fsync_interval: settings.spool.fsync_interval,
            mode: SpoolMode::Rotate,
        },
        metrics.tee.spool.clone(),
    )
    .unwrap();
    let (tee, writer) = TeeWriter::spawn(
        spool,
        EncodeContext {
            instance: "bench".into(),
            max_record_bytes: settings.max_record_bytes as usize,
            // As the end-to-end bench runs (what the docs recommend for large batches).
            record_decisions: RecordDecisions::Columns,
            inbound_tags: metrics.proxy.inbound_tags.clone(),
        },
        &settings.spool,
        metrics.tee.clone(),
    )
    .unwrap();
    let proxy = Arc::new(Proxy::with_connector(
        upstream,
        settings.upstream.clone(),
        RequestLimits::from_settings(&settings),
        policy,
        tee,
        metrics.proxy.clone(),
    ));
    (proxy, writer, metrics)
}

/// A running sluicegate (see [`proxy`]) serving one in-memory connection, the client's end.
async fn sluicegate(
    policy: SharedPolicy,
    upstream: MemoryUpstream,
    spool_dir: &std::path::Path,
) -> (DuplexStream, Sluicegate) {
    let settings = Settings::default();
    let (proxy, writer, metrics) = proxy(policy, upstream, spool_dir);
    tokio::spawn(proxy.clone().run_upkeep());
    let connections = Connections::new(proxy, ListenerLimits::from_settings(&settings));
    let graceful = GracefulShutdown::new();
    let watcher = graceful.watcher();
    let (near, far) = duplex(PIPE_BYTES);
    let client = "10.0.0.7:41000".parse().unwrap();
    tokio::spawn(async move { connections.serve(far, client, watcher).await });
    let running = Sluicegate {
        writer,
        metrics,
        _graceful: graceful,
    };
    (near, running)
}

async fn round_trip(sender: &mut SendRequest<Full<Bytes>>, body: &Bytes) -> Response<Bytes> {
    let req = Request::post(PATH)
        .header(HOST, "sluicegate")
        .header(CONTENT_TYPE, "application/json")
        .header("sluicegate-consumer", "mail-ingest")
        .body(Full::new(body.clone()))
        .unwrap();
    sender.ready().await.unwrap();
    let (parts, body) = sender.send_request(req).await.unwrap().into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Response::from_parts(parts, body)
}

/// One unary `ModelInfer` call; the answer's head, message and trailers.
async fn grpc_round_trip(
    sender: &mut H2SendRequest<Full<Bytes>>,
    message: &Bytes,
) -> (Response<Bytes>, Option<http::HeaderMap>) {
    let req = Request::post(format!("http://sluicegate{}", oip::MODEL_INFER_PATH))
        .header(CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .header("sluicegate-consumer", "mail-ingest")
        .body(Full::new(message.clone()))
        .unwrap();
    sender.ready().await.unwrap();
    let (parts, body) = sender.send_request(req).await.unwrap().into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (Response::from_parts(parts, collected.to_bytes()), trailers)
}

fn full_policy(keys: &std::path::Path) -> SharedPolicy {
    generate_key(keys, "bench", Algorithm::Ed25519).unwrap();
    let settings = Settings::default();
    let p = parse(
        include_str!("e2e/policy.full.yaml"),
        settings.max_record_bytes,
    )
    .unwrap();
    let keys = policy::load_keys(&p, Some(keys)).unwrap();
    policy::shared_with_keys(p, settings.max_record_bytes, keys)
}

fn stack(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (size, rows) in SIZES {
        let request = v2_request(rows, 7);
        let response = StandInModel::infer_v2(&serde_json::from_str(&request).unwrap()).unwrap();
        let grpc_request = grpc_request(rows, 7, false, &[]);
        let grpc_response = StandInModel::infer_grpc(&grpc_request, false).unwrap();
        let upstream = MemoryUpstream {
            response: serde_json::to_vec(&response).unwrap().into(),
            grpc_response: oip::frame(&grpc_response.encode_to_vec()),
        };
        let grpc_message = oip::frame(&grpc_request.encode_to_vec());
        let body = Bytes::from(request);
        let mut g = c.benchmark_group(format!("stack_{size}"));
        g.throughput(Throughput::Elements(1));

        let mut sender = rt
            .block_on(async { client_over(baseline_server(upstream.clone(), false).await).await });
        let resp = rt.block_on(round_trip(&mut sender, &body));
        assert_eq!(resp.body(), &upstream.response);
        g.bench_function("baseline_hyper_passthrough", |b| {
            b.iter(|| rt.block_on(round_trip(&mut sender, &body)))
        });
        drop(sender);
        let mut sender = rt.block_on(async {
            h2_client_over(baseline_server(upstream.clone(), true).await).await
        });
        let (resp, trailers) = rt.block_on(grpc_round_trip(&mut sender, &grpc_message));
        assert_eq!(resp.body(), &upstream.grpc_response);
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
        g.bench_function("baseline_hyper_passthrough_grpc", |b| {
            b.iter(|| rt.block_on(grpc_round_trip(&mut sender, &grpc_message)))
        });
        drop(sender);

        let dir = tempfile::tempdir().unwrap();
        let setups = [
            (
                "sluicegate_tee",
                policy::shared(PolicySpec::default(), Settings::default().max_record_bytes),
            ),
            ("sluicegate_full", full_policy(&dir.path().join("keys"))),
        ];
        for (name, policy) in setups {
            let (io, running) =
                rt.block_on(sluicegate(policy, upstream.clone(), &dir.path().join(name)));
            let mut sender = rt.block_on(client_over(io));
            let resp = rt.block_on(round_trip(&mut sender, &body));
            assert!(resp.status().is_success(), "{resp:?}");
            // The full policy decides and tags; the tee-only one passes the body through.
            let full = name == "sluicegate_full";
            assert_eq!(resp.headers().contains_key("sluicegate-tag"), full);
            assert_eq!(resp.body() == &upstream.response, !full);
            g.bench_function(name, |b| {
                b.iter(|| rt.block_on(round_trip(&mut sender, &body)))
            });
            drop(sender);
            running.close(&format!("stack_{size}/{name}"));
        }
        // The same setups on the same rows, as gRPC calls (h2c both sides).
        let setups = [
            (
                "sluicegate_tee_grpc",
                policy::shared(PolicySpec::default(), Settings::default().max_record_bytes),
            ),
            (
                "sluicegate_full_grpc",
                full_policy(&dir.path().join("grpc-keys")),
            ),
        ];
        for (name, policy) in setups {
            let (io, running) =
                rt.block_on(sluicegate(policy, upstream.clone(), &dir.path().join(name)));
            let mut sender = rt.block_on(h2_client_over(io));
            let (resp, trailers) = rt.block_on(grpc_round_trip(&mut sender, &grpc_message));
            assert_eq!(trailers.unwrap()["grpc-status"], "0");
            let full = name == "sluicegate_full_grpc";
            assert_eq!(resp.headers().contains_key("sluicegate-tag"), full);
            assert_eq!(resp.body() == &upstream.grpc_response, !full);
            g.bench_function(name, |b| {
                b.iter(|| rt.block_on(grpc_round_trip(&mut sender, &grpc_message)))
            });
            drop(sender);
            running.close(&format!("stack_{size}/{name}"));
        }
        g.finish();
        phases(c, &rt, size, &body, &upstream, dir.path());
    }
}

/// The request head as hyper hands it to the proxy in `round_trip`.
fn request_head(body: &Bytes) -> Request<()> {
    Request::post(PATH)
        .header(HOST, "sluicegate")
        .header(CONTENT_TYPE, "application/json")
        .header("sluicegate-consumer", "mail-ingest")
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(())
        .unwrap()
}

/// The upstream's response head as the stand-in model server sends it.
fn response_head(answer: &Bytes) -> http::response::Parts {
    Response::builder()
        .header(CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_LENGTH, answer.len())
        .header(http::header::DATE, "Mon, 30 Nov 2026 23:00:00 GMT")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

/// Each phase of the request path alone, from what the phases before it produced.
fn phases(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    size: &str,
    body: &Bytes,
    upstream: &MemoryUpstream,
    dir: &std::path::Path,
) {
    let _runtime = rt.enter();
    let policy = full_policy(&dir.join("phase-keys"));
    let (proxy, writer, metrics) = proxy(policy, upstream.clone(), &dir.join("phases"));
    let client = "10.0.0.7:41000".parse().unwrap();
    let req = request_head(body);
    let answer = &upstream.response;
    let admitted = || proxy.admit(&req);
    let head = || {
        let mut a = admitted();
        let mut parts = response_head(answer);
        let route = proxy
            .capture_head(&mut a, &mut parts, http::Version::HTTP_11, Duration::ZERO)
            .expect("the full policy decides");
        (a, route, parts)
    };
    let captured = || {
        let (mut a, route, parts) = head();
        let captured = proxy
            .capture_whole(&mut a, route, parts, answer.clone())
            .ok()
            .expect("an identity body");
        (a, captured)
    };
    type Head = (Admitted, Arc<Route>, http::response::Parts);
    type Whole = (Admitted, Captured);

    let mut g = c.benchmark_group(format!("phases_{size}"));
    g.throughput(Throughput::Elements(1));
    g.bench_function("admit", |b| b.iter_with_large_drop(admitted));
    g.bench_function("forward_head", |b| {
        b.iter_batched(
            || (admitted(), req.clone().into_parts().0),
            |(mut a, mut parts)| {
                proxy.upstream_head(&mut a, &mut parts, client);
                (a, parts)
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("capture_head", |b| {
        b.iter_batched(
            || (admitted(), response_head(answer)),
            |(mut a, mut parts)| {
                let route =
                    proxy.capture_head(&mut a, &mut parts, http::Version::HTTP_11, Duration::ZERO);
                (a, parts, route)
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("capture_whole", |b| {
        b.iter_batched(
            head,
            |(mut a, route, parts): Head| {
                let captured = proxy.capture_whole(&mut a, route, parts, answer.clone());
                (a, captured)
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("decide", |b| {
        b.iter_batched(
            captured,
            |(a, captured): Whole| {
                let decision = proxy.decide(&a, &captured);
                (a, captured, decision)
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("respond", |b| {
        b.iter_batched(
            || {
                let (a, captured) = captured();
                let decision = proxy.decide(&a, &captured);
                (a, captured, decision)
            },
            |(a, captured, decision)| proxy.respond(a, captured, decision),
            BatchSize::SmallInput,
        )
    });
    g.finish();
    writer.close();
    let tee = &metrics.tee;
    eprintln!(
        "phases_{size}: the tee queued {} entries and dropped {} (queue full)",
        tee.queued.get(),
        tee.dropped_queue_full.get()
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = stack
}
criterion_main!(benches);
