//! The data plane end to end: the real binary between a client and an upstream on loopback.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluicegate::demo::{v2_request, StandInModel};
use tokio::net::TcpListener;

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// An upstream built from a handler, on 127.0.0.1:0, speaking HTTP/1.1 and h2c.
async fn upstream<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<BoxBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let h = handler.clone();
                    async move { Ok::<_, Infallible>(h(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn full(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into()).boxed()
}

/// Echoes the request body with the request's content type.
async fn echo(req: Request<Incoming>) -> Response<BoxBody> {
    let ct = req.headers().get("content-type").cloned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mut r = Response::new(full(body));
    if let Some(ct) = ct {
        r.headers_mut().insert("content-type", ct);
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_and_v2_json_pass_byte_for_byte_and_are_recorded() {
    let model = StandInModel::spawn().await.unwrap();
    let spool = spool_dir();
    let proxy = start_proxy(model, spool.path(), &[]);
    let c = client();

    let v2 = v2_request(3, 1);
    let direct = post(&c, &format!("http://{model}/v2/models/m/infer"), v2.clone()).await;
    let (status, headers, body) = post(&c, &proxy.url("/v2/models/m/infer"), v2.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(body, direct.2, "v2 response unchanged");
    let id = headers["sluicegate-id"].to_str().unwrap().to_owned();

    let v1 = r#"{"instances": [[1.0, 2.0, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4]]}"#;
    let direct = post(&c, &format!("http://{model}/v1/models/m:predict"), v1).await;
    let (status, _, body) = post(&c, &proxy.url("/v1/models/m:predict"), v1).await;
    assert_eq!(status, 200);
    assert_eq!(body, direct.2, "v1 response unchanged");

    let records = proxy.spool_records_after(spool.path(), 2.0);
    assert_eq!(records.len(), 2);
    let r = records.iter().find(|r| r["id"] == id.as_str()).unwrap();
    assert_eq!(r["request"]["body"]["encoding"], "json");
    let sent: serde_json::Value = serde_json::from_str(&v2).unwrap();
    assert_eq!(r["request"]["body"]["data"], sent);
    assert_eq!(r["request"]["v2_id"], "req-1");
    assert_eq!(r["model"]["name"], "spam-filter");
    assert_eq!(r["model"]["version"], "3");
    assert_eq!(r["response"]["status"], 200);
    assert_eq!(r["complete"], true);
    assert!(r["timings"]["upstream_ms"].as_f64().unwrap() > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_and_are_captured_up_to_the_cap() {
    let up = upstream(echo).await;
    let spool = spool_dir();
    let proxy = start_proxy(up, spool.path(), &[]);
    let c = client();
    // 8 MiB of varied bytes, not JSON.
    let big: Vec<u8> = (0..8 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let req = Request::post(proxy.url("/blob"))
        .header("content-type", "application/octet-stream")
        .body(Full::new(Bytes::from(big.clone())))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(body == big, "8 MiB echoed byte for byte");

    let records = proxy.spool_records_after(spool.path(), 1.0);
    let b = &records[0]["request"]["body"];
    assert_eq!(b["encoding"], "base64");
    assert_eq!(b["size"], 8 << 20);
    assert_eq!(b["truncated"], true);
    let line = serde_json::to_vec(&records[0]).unwrap();
    assert!(line.len() <= 1 << 20, "record under the 1 MiB default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_response_reaches_the_client_before_the_upstream_finishes() {
    let model = StandInModel::spawn().await.unwrap();
    let spool = spool_dir();
    let proxy = start_proxy(model, spool.path(), &[]);
    let c = client();
    // 25 events, one per 20 ms: the whole stream takes about 500 ms.
    let req = Request::post(proxy.url("/generate_stream"))
        .body(Full::new(Bytes::from("25")))
        .unwrap();
    let start = Instant::now();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let first = loop {
        let frame = body.frame().await.unwrap().unwrap();
        if let Ok(d) = frame.into_data() {
            break d;
        }
    };
    let first_at = start.elapsed();
    assert!(first.starts_with(b"data: {\"token\":\"t0\"}"));
    let mut rest = first.to_vec();
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            rest.extend_from_slice(&d);
        }
    }
    let all_at = start.elapsed();
    assert!(
        first_at + Duration::from_millis(250) < all_at,
        "first chunk at {first_at:?}, last at {all_at:?}: the proxy buffered the stream"
    );
    assert_eq!(
        String::from_utf8(rest).unwrap().matches("data:").count(),
        25
    );

    proxy.wait_metric(
        "sluicegate_tee_records_spooled_total",
        1.0,
        Duration::from_secs(10),
    );
    let r = &spool_records(spool.path())[0];
    assert_eq!(r["response"]["body"]["encoding"], "text");
    assert_eq!(r["complete"], true);
}

/// A gRPC-like upstream: h2c, `reply` as one length-prefixed message, then trailers.
async fn grpc_like_upstream(reply: &'static [u8]) -> SocketAddr {
    upstream(move |req: Request<Incoming>| async move {
        let _ = req.into_body().collect().await;
        let mut message = vec![0, 0, 0, 0, reply.len() as u8];
        message.extend_from_slice(reply);
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
            Ok(Frame::data(Bytes::from(message))),
            Ok(Frame::trailers({
                let mut t = http::HeaderMap::new();
                t.insert("grpc-status", "0".parse().unwrap());
                t.insert("grpc-message", "fine".parse().unwrap());
                t
            })),
        ];
        let mut r = Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        r
    })
    .await
}

/// One unary gRPC-like call over h2c to `addr`: the response's id header, message and trailers.
async fn grpc_call(addr: SocketAddr) -> (String, Bytes, http::HeaderMap) {
    let mut send = h2c(addr).await;
    let req = Request::post(format!("http://{addr}/pkg.Svc/Call"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x01x")))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let id = resp.headers()["sluicegate-id"].to_str().unwrap().to_owned();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers reach the client");
    (id, collected.to_bytes(), trailers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_with_trailers_passes_through() {
    let up = grpc_like_upstream(b"hi").await;
    let spool = spool_dir();
    let proxy = start_proxy(up, spool.path(), &[]);
    assert_eq!(proxy.grpc, None, "no gRPC port unless --grpc-listen");

    let (_, message, trailers) = grpc_call(proxy.data).await;
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(message, Bytes::from_static(b"\0\0\0\0\x02hi"));

    let r = &proxy.spool_records_after(spool.path(), 1.0)[0];
    assert_eq!(r["response"]["trailers"]["grpc-status"], "0");
    assert_eq!(r["response"]["body"]["encoding"], "base64");
}

/// A model server's two ports behind one sidecar: the gRPC port forwards to the gRPC upstream,
/// the data port to the REST upstream, both teed to the same spool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_port_forwards_to_its_own_upstream() {
    let rest = upstream(|_req: Request<Incoming>| async move {
        Response::new(
            Full::new(Bytes::from_static(b"rest"))
                .map_err(|e| match e {})
                .boxed(),
        )
    })
    .await;
    let grpc = grpc_like_upstream(b"grpc").await;
    let spool = spool_dir();
    let grpc_upstream = format!("http://{grpc}");
    let proxy = start_proxy(
        rest,
        spool.path(),
        &[
            "--grpc-listen",
            "127.0.0.1:0",
            "--grpc-upstream",
            &grpc_upstream,
        ],
    );
    let grpc_port = proxy.grpc.expect("the gRPC port is reported");

    let (grpc_id, message, trailers) = grpc_call(grpc_port).await;
    assert_eq!(message, Bytes::from_static(b"\0\0\0\0\x04grpc"));
    assert_eq!(trailers["grpc-status"], "0");
    let resp = client()
        .request(
            Request::get(proxy.url("/v2/health/ready"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let rest_id = resp.headers()["sluicegate-id"].to_str().unwrap().to_owned();
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "rest");

    let records = proxy.spool_records_after(spool.path(), 2.0);
    let by_id = |id: &str| {
        records
            .iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("no record {id}"))
    };
    assert_eq!(by_id(&grpc_id)["response"]["trailers"]["grpc-status"], "0");
    assert_eq!(by_id(&rest_id)["response"]["status"], 200);
    assert_eq!(
        scrape(proxy.admin).sum("sluicegate_requests_total"),
        2.0,
        "one set of metrics for both ports"
    );
}

fn error_message(body: &Bytes) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).expect("JSON error body");
    v["message"].as_str().unwrap().to_owned()
}

fn error_code(body: &Bytes) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).expect("JSON error body");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    v["error"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413_with_and_without_content_length() {
    let up = upstream(echo).await;
    let spool = spool_dir();
    let proxy = start_proxy(up, spool.path(), &["--max-request-body", "64KiB"]);
    let c = client();
    let (status, headers, body) = post(&c, &proxy.url("/x"), vec![b'a'; 65 << 10]).await;
    assert_eq!(status, 413);
    assert!(headers.contains_key("sluicegate-id"));
    assert_eq!(error_code(&body), "request_too_large");

    // Chunked, no length: the limit is enforced as it streams.
    let chunks: Vec<Result<Frame<Bytes>, Infallible>> = (0..20)
        .map(|_| Ok(Frame::data(Bytes::from(vec![b'b'; 8 << 10]))))
        .collect();
    let req = Request::post(proxy.url("/x"))
        .body(StreamBody::new(futures_util::stream::iter(chunks)))
        .unwrap();
    let chunked_client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>,
    >>();
    let resp = chunked_client.request(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(error_code(&body), "request_too_large");

    // Under the limit still passes.
    let (status, _, body) = post(&c, &proxy.url("/x"), vec![b'c'; 60 << 10]).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), 60 << 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_refused_reset_and_slow() {
    let spool = spool_dir();
    let c = client();

    // Nothing listens: 502 upstream_unavailable, and not ready.
    let closed: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let proxy = start_proxy(closed, spool.path(), &[]);
    let (status, headers, body) = post(&c, &proxy.url("/v2/models/m/infer"), "{}").await;
    assert_eq!(status, 502);
    assert!(headers.contains_key("sluicegate-id"));
    assert_eq!(error_code(&body), "upstream_unavailable");
    // A short stable message for the client; hyper's error chain stays in the record.
    assert_eq!(error_message(&body), "cannot connect to the model server");
    let recorded = proxy.spool_records_after(spool.path(), 1.0)[0]["error"]["message"].clone();
    assert!(
        recorded.as_str().unwrap().contains("refused"),
        "the cause is recorded: {recorded}"
    );
    std::thread::sleep(Duration::from_millis(1200));
    assert!(!proxy.ready(), "not ready while the upstream is down");
    drop(proxy);

    // Accepts, then resets: 502 upstream_failed.
    let resetting = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reset_addr = resetting.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        for _ in 0..50 {
            let Ok((mut s, _)) = resetting.accept().await else {
                return;
            };
            let mut buf = [0u8; 16];
            let _ = s.read(&mut buf).await;
            // RST instead of FIN: a connection reset, as a crashing server gives.
            let _ = s.set_zero_linger();
            drop(s);
        }
    });
    let spool2 = spool_dir();
    let proxy = start_proxy(reset_addr, spool2.path(), &[]);
    let (status, _, body) = post(&c, &proxy.url("/v2/models/m/infer"), "{}").await;
    assert_eq!(status, 502);
    assert_eq!(error_code(&body), "upstream_failed");
    assert_eq!(error_message(&body), "the model server failed to answer");
    drop(proxy);

    // Slow: 504 after the upstream timeout, then the proxy still serves.
    let slow = upstream(|req: Request<Incoming>| async move {
        let slow = req.uri().path() == "/slow";
        if slow {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        Response::new(full("ok"))
    })
    .await;
    let spool3 = spool_dir();
    let proxy = start_proxy(slow, spool3.path(), &["--upstream-timeout", "300ms"]);
    let start = Instant::now();
    let (status, _, body) = post(&c, &proxy.url("/slow"), "{}").await;
    assert_eq!(status, 504);
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(error_code(&body), "upstream_timeout");
    let (status, _, _) = post(&c, &proxy.url("/fast"), "{}").await;
    assert_eq!(status, 200);

    let records = proxy.spool_records_after(spool3.path(), 2.0);
    let timed_out = records.iter().find(|r| r["status"] == 504).unwrap();
    assert_eq!(timed_out["error"]["code"], "upstream_timeout");
    assert!(timed_out["response"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_passes_through_untouched_and_is_recorded_as_text() {
    let up = upstream(echo).await;
    let spool = spool_dir();
    let proxy = start_proxy(up, spool.path(), &[]);
    let c = client();
    let bad = r#"{"inputs": [1, 2,"#;
    let (status, _, body) = post(&c, &proxy.url("/v2/models/m/infer"), bad).await;
    assert_eq!(status, 200, "the proxy is not the model's validator");
    assert_eq!(body, bad.as_bytes());
    proxy.wait_metric(
        "sluicegate_tee_records_spooled_total",
        1.0,
        Duration::from_secs(10),
    );
    let r = &spool_records(spool.path())[0];
    assert_eq!(r["request"]["body"]["encoding"], "text");
    assert_eq!(r["request"]["body"]["data"], bad);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off() {
    let up = upstream(echo).await;
    let spool = spool_dir();
    let proxy = start_proxy(up, spool.path(), &["--header-read-timeout", "500ms"]);
    let data = proxy.data;
    let outcome = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(data).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"POST /x HTTP/1.1\r\nHost: a\r\n").unwrap();
        let start = Instant::now();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        (start.elapsed(), buf)
    })
    .await
    .unwrap();
    assert!(
        outcome.0 < Duration::from_secs(3),
        "connection closed after {:?}",
        outcome.0
    );
    // A connection that sends nothing at all is closed too.
    let outcome = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(data).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let start = Instant::now();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        start.elapsed()
    })
    .await
    .unwrap();
    assert!(
        outcome < Duration::from_secs(3),
        "idle connection closed after {outcome:?}"
    );
    // And the proxy still serves.
    let (status, _, _) = post(&client(), &proxy.url("/x"), "{}").await;
    assert_eq!(status, 200);
}

#[test]
fn invalid_settings_exit_64_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("settings.yaml");
    std::fs::write(&file, "listen: 127.0.0.1:0\nupstrem: http://x:1\n").unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("upstrem"), "{err}");

    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--upstream",
            "ftp://x",
            "--spool-max-bytes",
            "lots",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("upstream") && err.contains("spool.max_bytes"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_and_exits_0() {
    let slow = upstream(|_req: Request<Incoming>| async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        Response::new(full("done"))
    })
    .await;
    let spool = spool_dir();
    let mut proxy = start_proxy(slow, spool.path(), &[]);
    let c = client();
    let url = proxy.url("/x");
    let in_flight = tokio::spawn(async move { post(&c, &url, "{}").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = tokio::task::spawn_blocking(move || {
        let s = proxy.sigterm();
        (s, proxy)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "exit status {:?}", status.0);
    let (code, _, body) = in_flight.await.unwrap();
    assert_eq!(code, 200);
    assert_eq!(body, "done");
    let records = spool_records(spool.path());
    assert_eq!(
        records.len(),
        1,
        "the in-flight request's record was written before exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_normalized_path_is_forwarded_with_the_query_as_sent() {
    // Answers with the path and query it was asked for.
    let up = upstream(|req: Request<Incoming>| async move {
        let pq = req.uri().path_and_query().unwrap().to_string();
        Response::new(full(pq))
    })
    .await;
    let spool = spool_dir();
    let proxy = start_proxy(up, spool.path(), &[]);
    let c = client();
    let (status, _, body) = post(
        &c,
        &proxy.url("/v2/models/spam%2Dfilter/%69nfer?x=%2D&y=%2F"),
        "{}",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body, "/v2/models/spam-filter/infer?x=%2D&y=%2F");
    // Encodings that are not unreserved characters reach the upstream as sent.
    let (status, _, body) = post(&c, &proxy.url("/files/a%20b%C3%A9"), "{}").await;
    assert_eq!(status, 200);
    assert_eq!(body, "/files/a%20b%C3%A9");
    let (status, _, body) = post(&c, &proxy.url("/files/a%2Fb"), "{}").await;
    assert_eq!(status, 400);
    assert_eq!(error_code(&body), "ambiguous_path");
}

/// One raw HTTP/1.x exchange on a fresh connection: (status, lower-case head, body).
fn raw_exchange(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_invalid_host_and_connect_get_400_and_are_never_forwarded() {
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    let up = upstream(move |req: Request<Incoming>| {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let xff = req
            .headers()
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join(" | ");
        async move { Response::new(full(xff)) }
    })
    .await;
    let spool = spool_dir();
    let proxy = start_proxy(up, spool.path(), &[]);
    let data = proxy.data;
    let results = tokio::task::spawn_blocking(move || {
        [
            &b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
            b"GET /x HTTP/1.1\r\nHost: user@model\r\nConnection: close\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: model:port\r\nConnection: close\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        ]
        .map(|r| {
            (
                String::from_utf8_lossy(r).into_owned(),
                raw_exchange(data, r),
            )
        })
    })
    .await
    .unwrap();
    for (request, (status, head, body)) in &results {
        assert_eq!(*status, 400, "{request:?}: {head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        assert_eq!(
            error_code(&Bytes::from(body.clone())),
            "bad_request",
            "{request:?}"
        );
    }
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "none forwarded"
    );

    // HTTP/1.0 may leave Host out; every x-forwarded-for line is kept, in order.
    let (status, _, body) = tokio::task::spawn_blocking(move || {
        raw_exchange(
            data,
            b"GET /x HTTP/1.0\r\nX-Forwarded-For: 1.1.1.1, 2.2.2.2\r\nX-Forwarded-For: 3.3.3.3\r\n\r\n",
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, "1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parse_errors_hyper_answers_itself_have_no_body() {
    // Pins what docs/operating.md says of hyper's own 400 and 431: status line, no body.
    let up = upstream(echo).await;
    let spool = spool_dir();
    let proxy = start_proxy(up, spool.path(), &[]);
    let data = proxy.data;
    let (too_large, invalid) = tokio::task::spawn_blocking(move || {
        let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
        (
            raw_exchange(
                data,
                format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes(),
            ),
            raw_exchange(data, b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n"),
        )
    })
    .await
    .unwrap();
    for (want, (status, head, body)) in [(431, too_large), (400, invalid)] {
        assert_eq!(status, want, "{head}");
        assert!(head.contains("content-length: 0"), "{head}");
        assert!(!head.contains("sluicegate-id"), "{head}");
        assert_eq!(body, "");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_redacted_by_default_also_as_the_consumer_id() {
    let up = upstream(echo).await;
    let dir = spool_dir();
    let policy = write_policy(
        dir.path(),
        "consumers: {header: x-api-key, declared: [ops-key], undeclared: refuse}\n",
    );
    let proxy = start_with_policy(up, dir.path(), &policy, &[]);
    let req = Request::post(proxy.url("/v2/models/m/infer"))
        .header("x-api-key", "sk-live-1111")
        .header("api-key", "azure-2222")
        .header("x-amz-security-token", "sts-3333")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 403);
    let req = Request::post(proxy.url("/v2/models/m/infer"))
        .header("x-api-key", "ops-key")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(client().request(req).await.unwrap().status(), 200);
    let records = proxy.spool_records_after(&dir.path().join("spool"), 2.0);
    let text = serde_json::to_string(&records).unwrap();
    for secret in ["sk-live-1111", "azure-2222", "sts-3333", "ops-key"] {
        assert!(
            !text.contains(secret),
            "{secret} leaked into a record: {text}"
        );
    }
    for r in &records {
        assert_eq!(r["consumer"]["id"], "[redacted]");
        assert_eq!(r["request"]["headers"]["x-api-key"], "[redacted]");
    }
    let refused = records.iter().find(|r| r["status"] == 403).unwrap();
    assert_eq!(refused["request"]["headers"]["api-key"], "[redacted]");
    assert_eq!(
        refused["request"]["headers"]["x-amz-security-token"],
        "[redacted]"
    );
    assert_eq!(refused["error"]["code"], "consumer_undeclared");
}

/// A route's `capture_bodies` against the policy's: the record of one 200 KiB JSON echo
/// through route `quiet` (`/quiet…`), and how many records were dropped for a full queue.
/// `small_queue` sets the tee's queue to 64 KiB: a record holding the body cannot be queued.
async fn capture_through_route(
    global: bool,
    route: bool,
    small_queue: bool,
) -> (serde_json::Value, f64) {
    let up = upstream(echo).await;
    let dir = spool_dir();
    let policy = write_policy(
        dir.path(),
        &format!(
            "tee: {{capture_bodies: {global}}}\nroutes:\n  quiet:\n    match: {{path_prefix: /quiet}}\n    protocol: json\n    capture_bodies: {route}\n"
        ),
    );
    let settings = dir.path().join("settings.yaml");
    let queue = if small_queue { "64KiB" } else { "16MiB" };
    std::fs::write(&settings, format!("spool:\n  queue_bytes: {queue}\n")).unwrap();
    let proxy = start_with_policy(up, dir.path(), &policy, &["--config", path_str(&settings)]);
    let body = format!(r#"{{"pad":"{}"}}"#, "x".repeat(200 << 10));
    let (status, _, echoed) = post(&client(), &proxy.url("/quiet/x"), body.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(echoed.len(), body.len());
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.metric("sluicegate_tee_records_spooled_total")
        + proxy.metric("sluicegate_tee_records_dropped_queue_full_total")
        < 1.0
    {
        assert!(Instant::now() < deadline, "no record spooled or dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dropped = proxy.metric("sluicegate_tee_records_dropped_queue_full_total");
    let record = spool_records(&dir.path().join("spool"))
        .into_iter()
        .next()
        .unwrap_or_default();
    (record, dropped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_that_turns_capture_off_holds_no_response_body() {
    let (r, dropped) = capture_through_route(true, false, true).await;
    eprintln!("route capture off under policy on: {dropped} records dropped for a full queue");
    assert_eq!(dropped, 0.0, "the response body was held for the record");
    assert_eq!(r["response"]["body"]["encoding"], "none");
    assert_eq!(r["request"]["body"]["encoding"], "none");
    assert!(r["response"]["body"]["size"].as_u64().unwrap() > 200 << 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_that_turns_capture_on_records_the_whole_response() {
    let (r, _) = capture_through_route(false, true, false).await;
    for side in ["request", "response"] {
        let b = &r[side]["body"];
        assert_eq!(b["encoding"], "json", "{side}");
        assert_eq!(b["truncated"], false, "{side}");
        assert_eq!(
            b["data"]["pad"].as_str().unwrap().len(),
            200 << 10,
            "{side}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_records_a_request_cut_at_the_end_of_the_grace_period() {
    let stuck = upstream(|_req: Request<Incoming>| async move {
        tokio::time::sleep(Duration::from_secs(10)).await;
        Response::new(full("too late"))
    })
    .await;
    let spool = spool_dir();
    let mut proxy = start_proxy(stuck, spool.path(), &["--shutdown-grace", "300ms"]);
    let c = client();
    let req = http::Request::post(proxy.url("/x"))
        .body(http_body_util::Full::new(Bytes::from("{}")))
        .unwrap();
    let in_flight = tokio::spawn(async move { c.request(req).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let (status, proxy) = tokio::task::spawn_blocking(move || (proxy.sigterm(), proxy))
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    eprintln!("exited {:?} after SIGTERM", started.elapsed());
    assert!(in_flight.await.unwrap().is_err(), "the request was cut");
    let records = spool_records(spool.path());
    assert_eq!(records.len(), 1, "the cut request's record was written");
    assert_eq!(records[0]["complete"], false);
    assert_eq!(records[0]["error"]["code"], "shutdown", "{}", records[0]);
    let log = proxy.log.lock().unwrap().join("\n");
    assert!(!log.contains("queue full"), "{log}");
}
