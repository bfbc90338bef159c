//! Faults: hostile clients (idle floods, slowloris, oversized and invalid requests); an
//! upstream that dies, resets, speaks garbage or stalls, then returns; SIGKILL under load; a
//! long Kafka outage; a full spool with Kafka down — the proxy stays bounded, answers what it
//! must, leaks nothing, and recovers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::common::kafka::{
    count_missing, keys, mock_cluster, start_teeing, wait_sent_then_consume,
};
use crate::common::*;
use sluicegate::demo::{v2_request, StandInModel};

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// One request on a fresh connection with a raw HTTP/1.1 text; the response's status.
fn raw_status(addr: SocketAddr, request: &[u8]) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(request);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Polls until `pid` has at most `max` file descriptors open; after 10 s panics with the count
/// and `what`.
async fn wait_fds_at_most(pid: u32, max: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds(pid) > max {
        assert!(
            Instant::now() < deadline,
            "{} file descriptors {what}",
            open_fds(pid)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the proxy's readiness until it is `ready`; panics with `what` after 5 s.
async fn wait_readiness(proxy: &ProxyProcess, ready: bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.ready() != ready {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// This process's soft limit on open files (from /proc/self/limits).
fn open_files_soft_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(1024)
}

/// The largest file-descriptor count and RSS (KiB) of `pid` seen until `done` is set.
fn sample_peaks(
    pid: u32,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(usize, u64)> {
    std::thread::spawn(move || {
        let (mut fds, mut rss) = (0, 0);
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            fds = fds.max(open_fds(pid));
            rss = rss.max(rss_kib(pid));
            std::thread::sleep(Duration::from_millis(50));
        }
        (fds, rss)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_floods_and_slowloris_stay_bounded_and_service_continues() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    // 2,000 idle connections, fewer only if this process may not open that many files (the
    // flood's sockets are this process's; the proxy holds at most --max-connections of them).
    let soft = open_files_soft_limit();
    let flood = 2000.min(soft.saturating_sub(300));
    assert!(
        flood >= 1000,
        "raise the open-files limit (ulimit -n {soft}) to at least 1300 for this test"
    );
    let model = StandInModel::spawn().await.unwrap();
    let spool = spool_dir();
    let proxy = start_proxy(
        model,
        spool.path(),
        &["--max-connections", "200", "--header-read-timeout", "1s"],
    );
    let pid = proxy.child.id();
    let data = proxy.data;
    let url = proxy.url("/v2/models/spam-filter/infer");
    // A client already connected before the flood, on one keep-alive connection.
    let kept = client();
    assert_eq!(post(&kept, &url, v2_request(1, 0)).await.0, 200);
    let base_fds = open_fds(pid);

    let done = Arc::new(AtomicBool::new(false));
    let peaks = sample_peaks(pid, done.clone());
    // 50 clients that send a header byte every 300 ms.
    let slow = std::thread::spawn(move || {
        let mut conns: Vec<TcpStream> = (0..50)
            .filter_map(|_| TcpStream::connect(data).ok())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(6);
        let mut cut = 0;
        while Instant::now() < deadline && !conns.is_empty() {
            conns.retain_mut(|c| {
                let alive = c.write_all(b"X").is_ok();
                if !alive {
                    cut += 1;
                }
                alive
            });
            std::thread::sleep(Duration::from_millis(300));
        }
        cut
    });
    // The flood: connections that send nothing, opened from 8 threads. Past the limit and the
    // listen backlog, a connect waits until the proxy cuts idle ones after the header timeout.
    let start = Instant::now();
    let openers: Vec<_> = (0..8)
        .map(|t| {
            let n = flood / 8 + usize::from(t < flood % 8);
            std::thread::spawn(move || {
                (0..n)
                    .filter_map(|_| TcpStream::connect_timeout(&data, Duration::from_secs(30)).ok())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    // The kept client is served all through the flood.
    let mut kept_worst = Duration::ZERO;
    let mut i = 1;
    while !openers.iter().all(|t| t.is_finished()) {
        let t = Instant::now();
        let (status, _, _) =
            tokio::time::timeout(Duration::from_secs(5), post(&kept, &url, v2_request(1, i)))
                .await
                .expect("the kept client is served during the flood");
        assert_eq!(status, 200);
        kept_worst = kept_worst.max(t.elapsed());
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let idle: Vec<TcpStream> = openers
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let opened_in = start.elapsed();
    assert!(
        idle.len() * 10 >= flood * 9,
        "only {} of {flood} connections opened",
        idle.len()
    );
    // A new client, while the flood's connections are still held open, gets through once
    // the connections ahead of it are cut.
    let fresh = Instant::now();
    let (status, _, _) = tokio::time::timeout(
        Duration::from_secs(15),
        post(&client(), &url, v2_request(1, 1_000_000)),
    )
    .await
    .expect("a new client is served while the flood lasts");
    assert_eq!(status, 200);
    let fresh = fresh.elapsed();
    let cut = tokio::task::spawn_blocking(move || slow.join().unwrap())
        .await
        .unwrap();
    done.store(true, Ordering::Relaxed);
    let (peak_fds, peak_rss) = peaks.join().unwrap();
    eprintln!(
        "idle flood: {} connections opened in {opened_in:?} against --max-connections 200; proxy fds {base_fds} → peak {peak_fds}, peak RSS {} MiB; kept client served {} times, worst {kept_worst:?}; a new client served in {fresh:?}; {cut} of 50 slowloris cut",
        idle.len(),
        peak_rss >> 10,
        i - 1
    );
    assert!(
        peak_fds <= base_fds + 200 + 20,
        "{peak_fds} file descriptors open (base {base_fds}, limit 200 connections)"
    );
    assert!(peak_rss < 100 << 10, "peak RSS {peak_rss} KiB");
    assert!(cut > 0, "slowloris connections are cut off");

    // The flood gone, the proxy's descriptors come back down: nothing leaked.
    drop(idle);
    drop(kept);
    wait_fds_at_most(
        pid,
        base_fds + 5,
        &format!("still open after the flood (base {base_fds})"),
    )
    .await;
    let (status, _, _) = post(&client(), &url, v2_request(1, 2)).await;
    assert_eq!(status, 200);
}

/// Reads from `conn` until the peer closes it (or 30 s pass): whether it was closed.
fn closed_by_peer(mut conn: TcpStream) -> bool {
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() != std::io::ErrorKind::WouldBlock,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_port_flood_without_a_token_stays_bounded_and_the_data_port_serves_on() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let soft = open_files_soft_limit();
    let half_heads = 2000.min(soft.saturating_sub(700));
    assert!(
        half_heads >= 1000,
        "raise the open-files limit (ulimit -n {soft}) to at least 1700 for this test"
    );
    let model = StandInModel::spawn().await.unwrap();
    let spool = spool_dir();
    let token = spool.path().join("token");
    std::fs::write(&token, "t0ken").unwrap();
    let proxy = start_proxy(
        model,
        &spool.path().join("spool"),
        &[
            "--admin-token-file",
            path_str(&token),
            "--admin-max-connections",
            "256",
            "--admin-header-timeout",
            "1s",
        ],
    );
    let (pid, admin) = (proxy.child.id(), proxy.admin);
    let url = proxy.url("/v2/models/spam-filter/infer");

    // The token is checked from the head: a body announced but never sent changes nothing.
    let put_head = |auth: &str, len: usize| {
        format!("PUT /admin/policy HTTP/1.1\r\nHost: a\r\n{auth}Content-Length: {len}\r\n\r\n")
    };
    let t = Instant::now();
    assert_eq!(raw_status(admin, put_head("", 1 << 20).as_bytes()), 401);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // Authorized, but larger than --admin-max-body: 413 before any byte of it is read.
    let auth = "Authorization: Bearer t0ken\r\n";
    assert_eq!(raw_status(admin, put_head(auth, 300 << 10).as_bytes()), 413);
    // Authorized and small, but the body never comes: 408 after the timeout.
    let t = Instant::now();
    assert_eq!(raw_status(admin, put_head(auth, 100).as_bytes()), 408);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    let (base_fds, base_rss) = (open_fds(pid), rss_kib(pid));
    let done = Arc::new(AtomicBool::new(false));
    let peaks = sample_peaks(pid, done.clone());
    let start = Instant::now();
    // 296 PUTs without a token, each announcing 1 MiB and sending 64 KiB of it, and
    // `half_heads` connections that send half a request head and wait.
    let openers: Vec<_> = (0..8)
        .map(|t| {
            let heads = half_heads / 8 + usize::from(t < half_heads % 8);
            let put = put_head("", 1 << 20);
            std::thread::spawn(move || {
                let mut conns = Vec::new();
                for i in 0..(heads + 300 / 8) {
                    let Ok(mut c) = TcpStream::connect_timeout(&admin, Duration::from_secs(30))
                    else {
                        continue;
                    };
                    let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
                    if i < 300 / 8 {
                        let _ = c.write_all(put.as_bytes());
                        let _ = c.write_all(&[b'x'; 64 << 10]);
                    } else {
                        let _ = c.write_all(b"GET /metrics HTTP/1.1\r\nHo");
                    }
                    conns.push(c);
                }
                conns
            })
        })
        .collect();
    // The data port is served all through.
    let c = client();
    let mut worst = Duration::ZERO;
    let mut served = 0;
    while !openers.iter().all(|t| t.is_finished()) {
        let t = Instant::now();
        let (status, _, _) = tokio::time::timeout(
            Duration::from_secs(5),
            post(&c, &url, v2_request(1, served)),
        )
        .await
        .expect("the data port is served during the admin flood");
        assert_eq!(status, 200);
        worst = worst.max(t.elapsed());
        served += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let conns: Vec<TcpStream> = openers
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let opened = conns.len();
    // Every one of them is cut by the proxy, none waits for the client to give up.
    let closed = tokio::task::spawn_blocking(move || {
        let per_thread = conns.len().div_ceil(8).max(1);
        let mut conns = conns;
        let mut readers = Vec::new();
        while !conns.is_empty() {
            let chunk: Vec<TcpStream> = conns.drain(..per_thread.min(conns.len())).collect();
            readers.push(std::thread::spawn(move || {
                chunk
                    .into_iter()
                    .filter(|c| closed_by_peer(c.try_clone().unwrap()))
                    .count()
            }));
        }
        readers
            .into_iter()
            .map(|r| r.join().unwrap())
            .sum::<usize>()
    })
    .await
    .unwrap();
    let all_cut_in = start.elapsed();
    done.store(true, Ordering::Relaxed);
    let (peak_fds, peak_rss) = peaks.join().unwrap();
    eprintln!(
        "admin flood: {opened} connections (296 unauthorized 1 MiB PUTs, {half_heads} half heads) against --admin-max-connections 256: {closed} cut by the proxy, all within {all_cut_in:?}; proxy fds {base_fds} → peak {peak_fds}, RSS {} → peak {} MiB; data port served {served} requests, worst {worst:?}",
        base_rss >> 10,
        peak_rss >> 10
    );
    assert_eq!(closed, opened, "every flood connection is cut by the proxy");
    assert!(
        peak_fds <= base_fds + 256 + 20,
        "{peak_fds} file descriptors (base {base_fds}, limit 256 admin connections)"
    );
    assert!(
        peak_rss < base_rss + (40 << 10),
        "RSS {base_rss} → {peak_rss} KiB"
    );
    assert!(
        worst < Duration::from_secs(1),
        "worst data-port request {worst:?}"
    );
    // The flood over, the admin port answers again.
    assert_eq!(admin_get(admin, "/healthz").0, 200);
    wait_fds_at_most(pid, base_fds + 5, "still open after the admin flood").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_and_invalid_http_are_refused_and_service_continues() {
    let model = StandInModel::spawn().await.unwrap();
    let spool = spool_dir();
    let proxy = start_proxy(model, spool.path(), &[]);
    let data = proxy.data;
    let statuses = tokio::task::spawn_blocking(move || {
        let huge = format!(
            "GET /v2/health/ready HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
            "a".repeat(100 << 10)
        );
        let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
        [
            raw_status(data, huge.as_bytes()),
            raw_status(data, many.as_bytes()),
            raw_status(data, b"BLAH / HTTP/9.9\r\n\r\n"),
            raw_status(
                data,
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage-tls-hello\r\n\r\n",
            ),
            raw_status(data, b"GET / HTTP/1.1\r\nContent-Length: -5\r\n\r\n"),
        ]
    })
    .await
    .unwrap();
    assert_eq!(statuses[0], 431, "{statuses:?}");
    assert_eq!(statuses[1], 431, "{statuses:?}");
    for s in &statuses[2..] {
        assert!(
            *s == 400 || *s == 0,
            "invalid HTTP gets 400 or a closed connection: {statuses:?}"
        );
    }
    let (status, _, _) = post(
        &client(),
        &proxy.url("/v2/models/spam-filter/infer"),
        v2_request(1, 1),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_dies_speaks_garbage_and_returns_is_survived() {
    // A port we control: first garbage, then nothing, then the real model.
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let garbage = std::net::TcpListener::bind(addr).unwrap();
    let garbage_thread = std::thread::spawn(move || {
        for conn in garbage.incoming().take(3) {
            let Ok(mut c) = conn else { continue };
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ = c.write_all(b"NOT HTTP AT ALL\r\n\r\n");
        }
    });
    let spool = spool_dir();
    let proxy = start_proxy(addr, spool.path(), &[]);
    let c = client();
    let (status, _, body) = post(&c, &proxy.url("/x"), "{}").await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("upstream_failed"));
    // Let the garbage server finish its three connections (the readiness probe takes some).
    for _ in 0..3 {
        let _ = TcpStream::connect(addr);
    }
    garbage_thread.join().unwrap();

    // Dead: 502 upstream_unavailable, not ready.
    let (status, _, body) = post(&c, &proxy.url("/x"), "{}").await;
    assert_eq!(status, 502);
    assert!(String::from_utf8_lossy(&body).contains("upstream_unavailable"));
    wait_readiness(&proxy, false, "still ready with the upstream gone").await;

    // Back: served again, ready again.
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(StandInModel::serve(listener));
    let (status, _, _) = post(
        &c,
        &proxy.url("/v2/models/spam-filter/infer"),
        v2_request(1, 1),
    )
    .await;
    assert_eq!(status, 200);
    wait_readiness(&proxy, true, "not ready again after the upstream returned").await;
}

/// What the upstream of [`faulty_upstream`] does with the next connection or request.
const NORMAL: u8 = 0;
const SLOW: u8 = 1;
const RESET: u8 = 2;
const GARBAGE: u8 = 3;

/// An upstream whose behaviour `mode` switches: it answers (one request per connection, so
/// every request meets the current mode), answers after 3 s, resets the connection, or
/// writes something that is not HTTP.
async fn faulty_upstream(
    listener: tokio::net::TcpListener,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mode = mode.clone();
        tokio::spawn(async move {
            match mode.load(Ordering::Relaxed) {
                RESET => {
                    let mut buf = [0u8; 16];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream.set_zero_linger();
                }
                GARBAGE => {
                    let mut buf = [0u8; 4096];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream.write_all(b"NOT HTTP AT ALL\r\n\r\n").await;
                }
                _ => {
                    let service = hyper::service::service_fn(move |_req| {
                        let slow = mode.load(Ordering::Relaxed) == SLOW;
                        async move {
                            if slow {
                                tokio::time::sleep(Duration::from_secs(3)).await;
                            }
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(
                                    br#"{"outputs":[]}"#,
                                )),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(false)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}

/// `n` requests, `concurrency` at a time, on a fresh client: each one's (status, error code).
async fn burst(url: &str, n: usize, concurrency: usize) -> Vec<(u16, String)> {
    let c = client();
    let mut out = Vec::with_capacity(n);
    for chunk in 0..n.div_ceil(concurrency) {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..concurrency.min(n - chunk * concurrency) {
            let (c, url) = (c.clone(), url.to_owned());
            set.spawn(async move {
                let (status, _, body) = post(&c, &url, v2_request(1, i as u64)).await;
                let code = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                (status, code)
            });
        }
        while let Some(r) = set.join_next().await {
            out.push(r.unwrap());
        }
    }
    out
}

/// The upstream resetting, speaking garbage, answering after seconds and gone, each for a
/// burst of requests: the right 502/504 every time, file descriptors back to where they were
/// and RSS barely moved afterwards, and normal service as soon as the upstream is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_leak_nothing_and_service_recovers() {
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::Arc;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mode = Arc::new(AtomicU8::new(NORMAL));
    let upstream = tokio::spawn(faulty_upstream(listener, mode.clone()));
    let spool = spool_dir();
    let proxy = start_proxy(addr, spool.path(), &["--upstream-timeout", "1s"]);
    let pid = proxy.child.id();
    let url = proxy.url("/v2/models/m/infer");
    let all = |got: &[(u16, String)], status: u16, code: &str| {
        assert!(
            got.iter().all(|(s, c)| *s == status && c == code),
            "wanted {status} {code:?}, got {:?}",
            got.iter()
                .filter(|(s, c)| *s != status || c != code)
                .take(5)
                .collect::<Vec<_>>()
        );
    };

    // Warm up, then the baseline with no client connected.
    all(&burst(&url, 200, 20).await, 200, "");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (base_fds, base_rss) = (open_fds(pid), rss_kib(pid));

    let started = Instant::now();
    let mut failed = 0;
    for (m, n, status, code) in [
        (RESET, 500, 502, "upstream_failed"),
        (GARBAGE, 500, 502, "upstream_failed"),
        // 3 s upstream against a 1 s timeout: 60 requests, 20 at a time.
        (SLOW, 60, 504, "upstream_timeout"),
    ] {
        mode.store(m, Ordering::Relaxed);
        all(&burst(&url, n, 20).await, status, code);
        failed += n;
    }
    // Gone: the listener closed, connections refused.
    mode.store(NORMAL, Ordering::Relaxed);
    upstream.abort();
    let _ = upstream.await;
    all(&burst(&url, 500, 20).await, 502, "upstream_unavailable");
    failed += 500;
    wait_readiness(&proxy, false, "still ready with the upstream gone").await;
    let during_fds = open_fds(pid);

    // Back on the same port: served at once, and ready again.
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    tokio::spawn(faulty_upstream(listener, mode.clone()));
    let back = Instant::now();
    all(&burst(&url, 1, 1).await, 200, "");
    let first_ok = back.elapsed();
    all(&burst(&url, 200, 20).await, 200, "");
    wait_readiness(&proxy, true, "not ready again after the upstream returned").await;

    // Nothing leaked: descriptors back to the baseline (the clients are gone), RSS within a
    // few MiB of it.
    wait_fds_at_most(
        pid,
        base_fds + 2,
        &format!("open after {failed} upstream failures (base {base_fds})"),
    )
    .await;
    let (end_fds, end_rss) = (open_fds(pid), rss_kib(pid));
    eprintln!(
        "upstream faults: {failed} failed requests in {:?}; proxy fds {base_fds} → {during_fds} (upstream gone) → {end_fds}, RSS {} → {} KiB; first request served {first_ok:?} after the upstream returned",
        started.elapsed(),
        base_rss,
        end_rss
    );
    assert!(
        end_rss < base_rss + (8 << 10),
        "RSS grew from {base_rss} to {end_rss} KiB over {failed} upstream failures"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_only_the_in_memory_queue() {
    let model = StandInModel::spawn().await.unwrap();
    let spool = spool_dir();
    let mut proxy = start_proxy(model, spool.path(), &[]);
    let data = proxy.data;
    let traffic = tokio::spawn(async move { load(data, 300, Duration::from_secs(3)).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // What the proxy had reported written just before the kill.
    let reported = proxy.metric("sluicegate_tee_records_spooled_total");
    proxy.sigkill();
    let (ids, _failed) = traffic.await.unwrap();
    let records = spool_records(spool.path());
    let found: std::collections::HashSet<String> = records
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        found.len() as f64 >= reported,
        "{} records in the spool, {reported} reported written before the kill",
        found.len()
    );
    // Responses the clients got whose records never reached the spool: the in-memory queue.
    let lost = ids.iter().filter(|id| !found.contains(*id)).count();
    eprintln!(
        "SIGKILL at 300 req/s: {} responses received, {} records spooled ({reported} reported before the kill), {lost} lost from the in-memory queue",
        ids.len(),
        found.len()
    );
    assert!(lost <= 300, "lost {lost}: more than a second of traffic");
}

/// Kafka stopped for 11 s (SLUICEGATE_LONG_TESTS: 60 s) during a fixed-rate run: no failed
/// request, the p99 during the outage against before it is reported, and every record is
/// delivered after recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_kafka_outage_under_load_costs_no_request_and_no_record() {
    let outage = if std::env::var_os("SLUICEGATE_LONG_TESTS").is_some() {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(11)
    };
    let cluster = mock_cluster();
    let brokers = cluster.bootstrap_servers();
    let model = StandInModel::spawn().await.unwrap();
    let spool = spool_dir();
    let proxy = start_teeing(
        model,
        spool.path(),
        &brokers,
        &["--kafka-property", "message.timeout.ms=3000"],
    );
    let data = proxy.data;
    let lead = Duration::from_secs(3);
    let run = lead + outage + Duration::from_secs(3);
    let traffic = tokio::spawn(async move { load_timed(data, 200, run).await });
    tokio::time::sleep(lead).await;
    cluster.broker_down(1).unwrap();
    tokio::time::sleep(outage).await;
    cluster.broker_up(1).unwrap();
    let runs = traffic.await.unwrap();
    let failed = runs.iter().filter(|t| t.id.is_none()).count();
    assert_eq!(
        failed, 0,
        "every request succeeds through a {outage:?} Kafka outage"
    );
    let before: Vec<&Timed> = runs.iter().filter(|t| t.at < lead).collect();
    let during: Vec<&Timed> = runs
        .iter()
        .filter(|t| t.at >= lead && t.at < lead + outage)
        .collect();
    eprintln!(
        "Kafka down {outage:?} at 200 req/s: p50 {:?} → {:?}, p99 {:?} → {:?} (before → during), {} requests during the outage",
        quantile(&before, 0.5),
        quantile(&during, 0.5),
        quantile(&before, 0.99),
        quantile(&during, 0.99),
        during.len()
    );
    let ids: Vec<String> = runs.into_iter().filter_map(|t| t.id).collect();
    let got = wait_sent_then_consume(
        &proxy,
        &brokers,
        ids.len(),
        Duration::from_secs(90),
        Duration::from_secs(60),
        &[],
    )
    .await;
    let missing = count_missing(&ids, &keys(&got));
    assert_eq!(
        missing,
        0,
        "{missing} of {} records missing after the outage",
        ids.len()
    );
}

/// Kafka down and the spool full: requests are still served; the records that reached the
/// spool are kept and delivered when Kafka returns, and the ones that did not fit are
/// dropped and counted, never the older ones; the spool takes records again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_with_kafka_down_keeps_the_oldest_and_counts_the_drops() {
    let cluster = mock_cluster();
    let brokers = cluster.bootstrap_servers();
    let model = StandInModel::spawn().await.unwrap();
    let spool = spool_dir();
    let mut extra = vec!["--kafka-property", "message.timeout.ms=2000"];
    extra.extend(SMALL_SPOOL);
    let proxy = start_teeing(model, spool.path(), &brokers, &extra);
    let c = client();
    let url = proxy.url("/v2/models/m/infer");
    let mut ids = Vec::new();
    let (status, h, _) = post(&c, &url, v2_request(4, 0)).await;
    assert_eq!(status, 200);
    ids.push(h["sluicegate-id"].to_str().unwrap().to_owned());
    proxy.wait_metric(
        "sluicegate_tee_records_sent_total",
        1.0,
        Duration::from_secs(20),
    );

    cluster.broker_down(1).unwrap();
    for i in 1..=400 {
        let (status, h, _) = post(&c, &url, v2_request(4, i)).await;
        assert_eq!(status, 200, "a full spool fails no request");
        ids.push(h["sluicegate-id"].to_str().unwrap().to_owned());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.metric("sluicegate_tee_records_spooled_total")
        + proxy.metric("sluicegate_tee_records_dropped_spool_full_total")
        < ids.len() as f64
    {
        assert!(
            Instant::now() < deadline,
            "records neither spooled nor dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let spooled = proxy.metric("sluicegate_tee_records_spooled_total") as usize;
    let dropped = proxy.metric("sluicegate_tee_records_dropped_spool_full_total") as usize;
    assert!(dropped > 0, "the 64 KiB spool filled up");
    assert_eq!(spooled + dropped, ids.len());

    cluster.broker_up(1).unwrap();
    proxy.wait_metric(
        "sluicegate_tee_records_sent_total",
        spooled as f64,
        Duration::from_secs(60),
    );
    // The spool takes records again once Kafka has them.
    for i in 1000..1050 {
        let (status, h, _) = post(&c, &url, v2_request(4, i)).await;
        assert_eq!(status, 200);
        ids.push(h["sluicegate-id"].to_str().unwrap().to_owned());
    }
    let got = keys(
        &wait_sent_then_consume(
            &proxy,
            &brokers,
            spooled + 50,
            Duration::from_secs(30),
            Duration::from_secs(30),
            &[],
        )
        .await,
    );
    // Exactly the oldest `spooled` records, then the 50 after recovery.
    let expected: std::collections::HashSet<String> = ids[..spooled]
        .iter()
        .chain(&ids[ids.len() - 50..])
        .cloned()
        .collect();
    eprintln!(
        "spool full with Kafka down: {} requests served, {spooled} records spooled and delivered after recovery, {dropped} dropped and counted, {} delivered in all",
        ids.len(),
        got.len()
    );
    assert_eq!(
        got, expected,
        "the oldest records are kept, the newest dropped"
    );
}

/// An upstream that frames its answer with chunks but also sends a stale `Content-Length`
/// (RFC 9112 §6.3: `Transfer-Encoding` overrides it): the client gets the whole body, framed
/// anew, not the body cut at the stale length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_sending_content_length_and_chunked_is_framed_by_its_chunks() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let body = r#"{"outputs":[1,2,3,4,5,6,7,8,9]}"#;
    tokio::spawn(async move {
        for _ in 0..10 {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let (first, rest) = body.split_at(10);
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\
                 Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
                 {:x}\r\n{first}\r\n{:x}\r\n{rest}\r\n0\r\n\r\n",
                first.len(),
                rest.len()
            );
            let _ = s.write_all(answer.as_bytes()).await;
            let _ = s.shutdown().await;
        }
    });
    let spool = spool_dir();
    let proxy = start_proxy(addr, spool.path(), &[]);
    let (status, headers, got) = post(&client(), &proxy.url("/v2/models/m/infer"), "{}").await;
    eprintln!(
        "stale content-length 5 beside chunked framing: the client got {} of {} bytes",
        got.len(),
        body.len()
    );
    assert_eq!(status, 200);
    assert_eq!(got, body.as_bytes(), "the whole body");
    assert!(
        headers
            .get("content-length")
            .is_none_or(|v| v.to_str().unwrap() == body.len().to_string()),
        "{headers:?}"
    );
    proxy.wait_metric(
        "sluicegate_tee_records_spooled_total",
        1.0,
        Duration::from_secs(10),
    );
    let r = &spool_records(spool.path())[0];
    assert_eq!(r["complete"], true);
    assert_eq!(r["response"]["body"]["size"], body.len());
    assert!(r["response"]["headers"].get("content-length").is_none());
}

/// Counts the requests an upstream is working on (a guard, so a reset stream counts down too).
struct InFlight(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    fn enter(count: &std::sync::Arc<std::sync::atomic::AtomicUsize>) -> InFlight {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlight(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// An h2c model server that allows 100 streams per connection, as many servers do: it reads
/// each request's body whole, then answers. Returns its address, the requests it is reading
/// and the connections that carried requests.
async fn h2_upstream_limited_to_100_streams() -> (
    SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    h2_upstream_on(listener)
}

/// [`h2_upstream_limited_to_100_streams`] on `listener`.
fn h2_upstream_on(
    listener: tokio::net::TcpListener,
) -> (
    SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let addr = listener.local_addr().unwrap();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let (count, conns) = (in_flight.clone(), connections.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (count, conns) = (count.clone(), conns.clone());
            let used = std::sync::atomic::AtomicBool::new(false);
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    if !used.swap(true, Ordering::Relaxed) {
                        conns.fetch_add(1, Ordering::Relaxed);
                    }
                    let working = InFlight::enter(&count);
                    async move {
                        use http_body_util::BodyExt;
                        let _ = req.into_body().collect().await?;
                        drop(working);
                        Ok::<_, hyper::Error>(http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(br#"{"outputs":[]}"#),
                        )))
                    }
                });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .max_concurrent_streams(100)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    (addr, in_flight, connections)
}

/// An HTTP/2 connection to `addr`, its task spawned.
async fn h2_client<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// Polls `count` until it reaches `want` or 10 s pass; returns where it got.
async fn wait_count(count: &std::sync::atomic::AtomicUsize, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = count.load(std::sync::atomic::Ordering::Relaxed);
        if now >= want || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client holding 300 streams whose bodies never end does not hold up an unrelated HTTP/2
/// client: one client connection gets at most 100 streams (`--max-concurrent-streams`), and
/// the upstream pool opens connections past the model server's 100-stream limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_http2_streams_of_one_client_do_not_hold_up_another() {
    use std::sync::atomic::Ordering;
    type Stalled = http_body_util::StreamBody<
        futures_util::stream::Pending<
            Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>,
        >,
    >;
    let (model, upstream_busy, upstream_conns) = h2_upstream_limited_to_100_streams().await;
    let spool = spool_dir();
    let proxy = start_proxy(model, spool.path(), &[]);
    let url = proxy.url("/v2/models/m/infer");

    // The client's first connection asks for 300 streams, then two more connections for 100
    // each; no request body ever ends.
    let mut stalled = tokio::task::JoinSet::new();
    let mut one_connection = 0;
    for n in [300, 100, 100] {
        let send = h2_client::<Stalled>(proxy.data).await;
        for _ in 0..n {
            let mut send = send.clone();
            let req = http::Request::post(&url)
                .header("content-type", "application/json")
                .body(http_body_util::StreamBody::new(
                    futures_util::stream::pending(),
                ))
                .unwrap();
            stalled.spawn(async move { send.send_request(req).await.map(|r| r.status()) });
        }
        if n == 300 {
            wait_count(&upstream_busy, 100).await;
            // More would show up now if the proxy let one connection have them.
            tokio::time::sleep(Duration::from_millis(300)).await;
            one_connection = upstream_busy.load(Ordering::Relaxed);
        }
    }
    let held = wait_count(&upstream_busy, 300).await;

    let mut other = h2_client::<http_body_util::Full<bytes::Bytes>>(proxy.data).await;
    let req = http::Request::post(&url)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(v2_request(
            1, 1,
        ))))
        .unwrap();
    let start = Instant::now();
    let answered = tokio::time::timeout(Duration::from_secs(5), other.send_request(req)).await;
    let took = start.elapsed();
    eprintln!(
        "stalled HTTP/2 streams: one client connection asking for 300 held {one_connection} at the model server; three connections held {held} over {} upstream connections (the model server allows 100 each); an unrelated request answered in {took:?}",
        upstream_conns.load(Ordering::Relaxed)
    );
    let resp = answered
        .expect("the unrelated request is answered while the stalled streams are held")
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(took < Duration::from_secs(1), "answered in {took:?}");
    assert_eq!(
        one_connection, 100,
        "one client connection holds 100 streams"
    );
    assert_eq!(held, 300, "every stalled stream reached the model server");
    assert!(
        stalled.try_join_next().is_none(),
        "the stalled streams are still held"
    );
    stalled.abort_all();
}

/// With `--upstream-h2-max-connections 1` the pool cannot grow: a request waits for a stream,
/// and gets one as soon as a client that held them all goes away (its streams given back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_upstream_h2_pool_gives_streams_back_when_their_client_leaves() {
    type Stalled = http_body_util::StreamBody<
        futures_util::stream::Pending<
            Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>,
        >,
    >;
    let (model, upstream_busy, _) = h2_upstream_limited_to_100_streams().await;
    let spool = spool_dir();
    let proxy = start_proxy(model, spool.path(), &["--upstream-h2-max-connections", "1"]);
    let url = proxy.url("/v2/models/m/infer");
    let mut stalled = tokio::task::JoinSet::new();
    let send = h2_client::<Stalled>(proxy.data).await;
    for _ in 0..100 {
        let mut send = send.clone();
        let req = http::Request::post(&url)
            .body(http_body_util::StreamBody::new(
                futures_util::stream::pending(),
            ))
            .unwrap();
        stalled.spawn(async move { send.send_request(req).await.map(|r| r.status()) });
    }
    assert_eq!(wait_count(&upstream_busy, 100).await, 100);

    let mut other = h2_client::<http_body_util::Full<bytes::Bytes>>(proxy.data).await;
    let req = http::Request::post(&url)
        .body(http_body_util::Full::new(bytes::Bytes::from(v2_request(
            1, 1,
        ))))
        .unwrap();
    let waiting = tokio::spawn(async move { other.send_request(req).await.map(|r| r.status()) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "no stream is free on the one connection"
    );
    stalled.abort_all();
    drop(send);
    let status = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("a stream is given back when its client leaves")
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
}

/// An HTTP/2 request while the upstream is down gets 502 `upstream_unavailable`; once the
/// upstream is back the pool opens a connection again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_h2_pool_reports_a_dead_upstream_and_recovers() {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let spool = spool_dir();
    let proxy = start_proxy(addr, spool.path(), &[]);
    let mut c = h2_client::<http_body_util::Full<bytes::Bytes>>(proxy.data).await;
    let mut ask = |i| {
        let req = http::Request::post(proxy.url("/v2/models/m/infer"))
            .body(http_body_util::Full::new(bytes::Bytes::from(v2_request(
                1, i,
            ))))
            .unwrap();
        let sent = c.send_request(req);
        async move {
            let resp = sent.await.unwrap();
            let status = resp.status().as_u16();
            use http_body_util::BodyExt;
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    for i in 0..3 {
        let (status, body) = ask(i).await;
        assert_eq!(status, 502, "{body}");
        assert!(body.contains("upstream_unavailable"), "{body}");
    }
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    h2_upstream_on(listener);
    let (status, body) = ask(3).await;
    assert_eq!(status, 200, "{body}");
}

/// One raw exchange on a fresh connection: writes `request`, optionally closes the write
/// half, reads to the end: (status, the whole answer, the time it took); status 0 when the
/// proxy closed without answering.
fn raw_exchange(addr: SocketAddr, request: &[u8], close_write: bool) -> (u16, String, Duration) {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(request);
    if close_write {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text, start.elapsed())
}

/// A client body that is malformed, cut short or stalled is the client's fault: 400
/// `client_body_error` or 408 `client_body_timeout`, counted under `source="client"`, never as
/// an upstream fault; the record is incomplete; the upstream is not left waiting for the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_body_faults_are_the_clients_not_the_upstreams() {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    // A model server on HTTP/1.1 and h2c that reads each body whole, then answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let model = listener.local_addr().unwrap();
    let busy = Arc::new(AtomicUsize::new(0));
    let count = busy.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let working = InFlight::enter(&count);
                    async move {
                        use http_body_util::BodyExt;
                        let _ = req.into_body().collect().await?;
                        drop(working);
                        Ok::<_, hyper::Error>(http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(br#"{"outputs":[]}"#),
                        )))
                    }
                });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    let spool = spool_dir();
    let proxy = start_proxy(
        model,
        spool.path(),
        &["--client-body-timeout", "500ms", "--upstream-timeout", "3s"],
    );
    let data = proxy.data;
    let head = |framing: &str| {
        format!(
            "POST /v2/models/m/infer HTTP/1.1\r\nHost: a\r\nConnection: close\r\n{framing}\r\n\r\n"
        )
    };
    let malformed = format!(
        "{}5\r\nhello\r\nZZZ\r\n\r\n",
        head("Transfer-Encoding: chunked")
    );
    let partial = format!("{}0123456789", head("Content-Length: 100"));
    let (broken, cut, stalled) = tokio::task::spawn_blocking(move || {
        (
            raw_exchange(data, malformed.as_bytes(), false),
            raw_exchange(data, partial.as_bytes(), true),
            raw_exchange(data, partial.as_bytes(), false),
        )
    })
    .await
    .unwrap();
    // HTTP/2: a stream that sends a piece of its body, then nothing.
    let mut h2 = h2_client::<http_body_util::StreamBody<_>>(data).await;
    let piece: Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible> = Ok(
        http_body::Frame::data(bytes::Bytes::from_static(b"{\"inputs\"")),
    );
    let body = futures_util::StreamExt::chain(
        futures_util::stream::iter([piece]),
        futures_util::stream::pending(),
    );
    let req = http::Request::post(proxy.url("/v2/models/m/infer"))
        .body(http_body_util::StreamBody::new(body))
        .unwrap();
    let start = Instant::now();
    let h2_status = tokio::time::timeout(Duration::from_secs(10), h2.send_request(req))
        .await
        .expect("the stalled HTTP/2 stream is answered")
        .unwrap()
        .status();
    let h2_took = start.elapsed();
    eprintln!(
        "client body faults: malformed chunked → {}; cut short → {} (0: closed); stalled → {} in {:?}; stalled over HTTP/2 → {h2_status} in {h2_took:?}",
        broken.0, cut.0, stalled.0, stalled.2
    );
    assert_eq!(broken.0, 400, "{}", broken.1);
    assert!(broken.1.contains("client_body_error"), "{}", broken.1);
    assert!(cut.0 == 400 || cut.0 == 0, "{}", cut.1);
    assert_eq!(stalled.0, 408, "{}", stalled.1);
    assert!(stalled.1.contains("client_body_timeout"), "{}", stalled.1);
    assert_eq!(h2_status, 408);
    assert_eq!(
        wait_zero(&busy).await,
        0,
        "the model server is still waiting for a body"
    );

    // Four records, each incomplete with the client's code; no upstream fault counted.
    let codes: Vec<(String, bool)> = proxy
        .spool_records_after(spool.path(), 4.0)
        .iter()
        .map(|r| {
            (
                r["error"]["code"].as_str().unwrap_or_default().to_owned(),
                r["complete"].as_bool().unwrap(),
            )
        })
        .collect();
    let mut sorted = codes.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            ("client_body_error".to_owned(), false),
            ("client_body_error".to_owned(), false),
            ("client_body_timeout".to_owned(), false),
            ("client_body_timeout".to_owned(), false),
        ],
        "{codes:?}"
    );
    let metrics = admin_get(proxy.admin, "/metrics").1;
    let errors = |source: &str| -> f64 {
        Metrics::parse(&metrics).sum_with("sluicegate_proxy_errors_total", source)
    };
    assert_eq!(errors("source=\"client\""), 4.0, "{metrics}");
    assert_eq!(errors("source=\"upstream\""), 0.0, "{metrics}");
}

/// Polls `count` until it is 0 or 5 s pass; returns where it got.
async fn wait_zero(count: &std::sync::atomic::AtomicUsize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = count.load(std::sync::atomic::Ordering::Relaxed);
        if now == 0 || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An upstream that sends its headers and a piece of its body, then nothing, holds no client:
/// after `--upstream-body-timeout` a streamed response is cut (the client sees the body fail)
/// and a response a deciding route reads whole gets 504 `upstream_body_timeout`; both records
/// say `upstream_body_timeout`, `complete: false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_body_that_stops_midway_times_out() {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let model = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|_req| async {
                let piece: Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible> =
                    Ok(http_body::Frame::data(bytes::Bytes::from_static(
                        br#"{"model_name":"spam-filter","outputs":["#,
                    )));
                let body = futures_util::StreamExt::chain(
                    futures_util::stream::iter([piece]),
                    futures_util::stream::pending(),
                );
                let mut resp = http::Response::new(http_body_util::StreamBody::new(body));
                resp.headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                Ok::<_, std::convert::Infallible>(resp)
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    let dir = spool_dir();
    let policy = write_policy(dir.path(), &spam_route("{fixed: 0.5}", "[]", ""));
    let proxy = start_with_policy(
        model,
        dir.path(),
        &policy,
        &["--upstream-body-timeout", "500ms"],
    );
    let c = client();

    // Streamed: the headers arrive, then the body fails once the upstream has been quiet.
    let req = http::Request::post(proxy.url("/v2/models/other/infer"))
        .body(http_body_util::Full::new(bytes::Bytes::from(v2_request(
            1, 1,
        ))))
        .unwrap();
    let start = Instant::now();
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .expect("the stalled response body ends");
    let streamed = start.elapsed();
    assert!(
        body.is_err(),
        "the client sees the response cut, not a complete body"
    );

    // Read whole by a deciding route: the proxy still owns the answer.
    let start = Instant::now();
    let (status, _, body) = tokio::time::timeout(
        Duration::from_secs(5),
        post(
            &c,
            &proxy.url("/v2/models/spam-filter/infer"),
            v2_request(1, 2),
        ),
    )
    .await
    .expect("the deciding route answers");
    let decided = start.elapsed();
    eprintln!(
        "upstream body stopped midway, 500 ms timeout: streamed response cut after {streamed:?}; deciding route answered {status} after {decided:?}"
    );
    assert_eq!(status, 504, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("upstream_body_timeout"));

    let records = proxy.spool_records_after(&dir.path().join("spool"), 2.0);
    assert_eq!(records.len(), 2);
    for r in &records {
        assert_eq!(r["error"]["code"], "upstream_body_timeout", "{r}");
        assert_eq!(r["complete"], false, "{r}");
    }
}

/// A `redis-server` on a loopback port, no persistence; `None` (a loud skip) when it is not
/// installed, unless SLUICEGATE_REQUIRE_REDIS_TESTS is set (tests/run.sh installs it).
struct Redis {
    port: u16,
    child: Option<std::process::Child>,
    /// Extra server arguments (TLS, a password).
    args: Vec<String>,
}

impl Redis {
    fn start(test: &str) -> Option<Redis> {
        let installed = std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !installed {
            assert!(
                std::env::var_os("SLUICEGATE_REQUIRE_REDIS_TESTS").is_none(),
                "redis-server is missing (Debian package `redis-server`; tests/run.sh installs it) and the Redis tests are required"
            );
            eprintln!(
                "\n*** SKIPPED {test}: redis-server is not installed (Debian package `redis-server`). \
                 Set SLUICEGATE_REQUIRE_REDIS_TESTS=1 to make this a failure. ***\n"
            );
            return None;
        }
        let mut redis = Redis {
            port: free_port(),
            child: None,
            args: Vec::new(),
        };
        redis.restart();
        Some(redis)
    }

    /// A server that speaks only TLS with a certificate from `tls`'s CA, asks clients for a
    /// certificate from that CA, and a password.
    fn start_tls(test: &str, tls: &TlsFiles, password: &str) -> Option<Redis> {
        let mut redis = Redis::start(test)?;
        redis.sigkill();
        let file = |p: &std::path::Path| p.to_str().unwrap().to_owned();
        redis.args = ["--port", "0", "--tls-port", &redis.port.to_string()]
            .iter()
            .map(|s| s.to_string())
            .chain([
                "--tls-cert-file".into(),
                file(&tls.server.0),
                "--tls-key-file".into(),
                file(&tls.server.1),
                "--tls-ca-cert-file".into(),
                file(&tls.ca),
                "--tls-auth-clients".into(),
                "yes".into(),
                "--requirepass".into(),
                password.into(),
            ])
            .collect();
        redis.restart();
        Some(redis)
    }

    /// (Re)starts the server on its port, empty, and waits until it accepts connections.
    fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sigkill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate it signed (PEM files).
struct TlsFiles {
    ca: std::path::PathBuf,
    server: (std::path::PathBuf, std::path::PathBuf),
    client: (std::path::PathBuf, std::path::PathBuf),
}

impl TlsFiles {
    fn make(dir: &std::path::Path) -> TlsFiles {
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .current_dir(dir)
                .args(args)
                .output()
                .expect("openssl (tests/run.sh installs it)");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509", "-days", "1", "-subj", "/CN=it-ca"],
                &ec[..],
                &["-keyout", "ca.key", "-out", "ca.pem"],
            ]
            .concat(),
        );
        for (name, usage, san) in [
            ("server", "serverAuth", "subjectAltName=IP:127.0.0.1\n"),
            ("client", "clientAuth", ""),
        ] {
            let ext = format!("{name}.ext");
            std::fs::write(
                dir.join(&ext),
                format!("basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n{san}"),
            )
            .unwrap();
            let (key, csr, pem) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
            );
            openssl(
                &[
                    &["req", "-subj", &format!("/CN={name}")],
                    &ec[..],
                    &["-keyout", &key, "-out", &csr],
                ]
                .concat(),
            );
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &ext,
                "-out",
                &pem,
            ]);
        }
        let pair = |n: &str| (dir.join(format!("{n}.pem")), dir.join(format!("{n}.key")));
        TlsFiles {
            ca: dir.join("ca.pem"),
            server: pair("server"),
            client: pair("client"),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// Every row spam; `spam` capped fleet-wide at `cap` in 10 minutes, falling back to `ham` past
/// it (so every request answers 200 and `sluicegate-limit` tells which were taken).
fn fleet_capped(cap: u64) -> String {
    spam_route(
        "{fixed: 0.0}",
        &format!("[{{action: spam, max_count: {cap}, window: 10m, on_breach: fallback, fallback: ham, scope: fleet, replicas: 3}}]"),
        "",
    )
}

/// `n` sidecars in front of `model` sharing [`fleet_capped`]`(cap)` in Redis at `url` under
/// the key prefix `prefix` (this process's id added), once each counts fleet-wide.
fn fleet_sidecars(
    model: SocketAddr,
    dir: &std::path::Path,
    url: &str,
    prefix: &str,
    cap: u64,
    n: usize,
) -> Vec<ProxyProcess> {
    let policy = dir.join(format!("{prefix}.yaml"));
    std::fs::write(&policy, fleet_capped(cap)).unwrap();
    let prefix = format!("it-{}-{prefix}", std::process::id());
    let sidecars: Vec<ProxyProcess> = (0..n)
        .map(|i| {
            let args = ["--policy", path_str(&policy), "--redis-url", url];
            let args = [&args[..], &["--redis-key-prefix", &prefix]].concat();
            start_proxy(model, &dir.join(format!("spool-{prefix}-{i}")), &args)
        })
        .collect();
    for s in &sidecars {
        wait_for("fleet counting", || {
            s.metric("sluicegate_fleet_refills_total") > 0.0
                && s.metric("sluicegate_fleet_limit_degraded") == 0.0
        });
    }
    sidecars
}

/// `n` one-row spam requests to each of `proxies` at once, `concurrency` in flight per proxy:
/// (rows taken as spam, requests that did not answer 200).
async fn spam_load(proxies: &[&ProxyProcess], n: usize, concurrency: usize) -> (usize, usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for proxy in proxies {
        for worker in 0..concurrency {
            let url = proxy.url("/v2/models/spam-filter/infer");
            let count = n / concurrency + usize::from(worker < n % concurrency);
            tasks.spawn(async move {
                let c = client();
                let (mut taken, mut failed) = (0, 0);
                for _ in 0..count {
                    let (status, headers, _) = post(&c, &url, v2_request(1, 5)).await;
                    let limit = headers.get("sluicegate-limit").map(|v| v.as_bytes());
                    match (status, limit) {
                        (200, Some(b"ok")) => taken += 1,
                        (200, Some(b"fallback")) => {}
                        _ => failed += 1,
                    }
                }
                (taken, failed)
            });
        }
    }
    let (mut taken, mut failed) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let (t, f) = r.unwrap();
        taken += t;
        failed += f;
    }
    (taken, failed)
}

/// Polls `cond` every 20 ms for up to 10 s.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn logged(proxy: &ProxyProcess, text: &str) -> bool {
    proxy.log.lock().unwrap().iter().any(|l| l.contains(text))
}

/// Three sidecars share a fleet cap of 300 in Redis under concurrent load: together they take
/// between the cap less what leases can hold back and the cap plus the documented overshoot
/// (10%). Redis killed mid-load: no request fails, every sidecar says it is degraded (metric,
/// log line); Redis back on the same port: fleet counting resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sidecars_hold_a_fleet_cap_in_redis_and_survive_its_loss() {
    let Some(mut redis) =
        Redis::start("three_sidecars_hold_a_fleet_cap_in_redis_and_survive_its_loss")
    else {
        return;
    };
    let model = StandInModel::spawn().await.unwrap();
    let dir = spool_dir();
    let url = redis.url();
    let sidecars = fleet_sidecars(model, dir.path(), &url, "shared", 300, 3);
    let all: Vec<&ProxyProcess> = sidecars.iter().collect();

    // 600 spam rows against a cap of 300: leases of 10 per sidecar, so at most 30 over.
    let (taken, failed) = spam_load(&all, 200, 8).await;
    assert_eq!(failed, 0);
    let refills: f64 = all
        .iter()
        .map(|s| s.metric("sluicegate_fleet_refills_total"))
        .sum();
    eprintln!("three sidecars took {taken} of a fleet cap of 300 in {refills} Redis calls");
    assert!(
        (270..=330).contains(&taken),
        "fleet took {taken} of a cap of 300"
    );

    // Two sidecars take a little and then hold their leases idle; the third, busy, still
    // takes the rest of the cap: the idle ones give their budget back when it starves.
    let others = fleet_sidecars(model, dir.path(), &url, "one-busy", 100, 3);
    let (idle_taken, failed) = spam_load(&[&others[0], &others[1]], 2, 1).await;
    assert_eq!((idle_taken, failed), (4, 0));
    std::thread::sleep(Duration::from_millis(100));
    // A budget given back reaches the busy one at its next poll (100 ms) after a refusal:
    // it keeps asking, one request every 20 ms, for 600 ms.
    let (mut taken, failed) = spam_load(&[&others[2]], 150, 4).await;
    assert_eq!(failed, 0);
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (more, failed) = spam_load(&[&others[2]], 1, 1).await;
        assert_eq!(failed, 0);
        taken += more;
    }
    let taken = taken + idle_taken;
    eprintln!("one busy sidecar of three: the fleet took {taken} of a cap of 100");
    assert!(
        (100..=110).contains(&taken),
        "the fleet took {taken} of 100"
    );
    drop(others);

    // Redis dies mid-load: every request still answers, and every sidecar says it degraded.
    let during = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        redis.sigkill();
        (redis, Instant::now())
    });
    let (_, failed) = spam_load(&all, 300, 4).await;
    let load_ended = Instant::now();
    let (mut redis, killed) = during.await.unwrap();
    assert!(killed < load_ended, "Redis died mid-load");
    assert_eq!(failed, 0, "no request fails while Redis is gone");
    for s in &all {
        wait_for("degraded mode", || {
            s.metric("sluicegate_fleet_limit_degraded") == 1.0
        });
        wait_for("the WARN line", || {
            logged(s, "fleet limit degraded: Redis unreachable")
        });
        assert!(s.metric("sluicegate_fleet_refills_total") > 0.0);
    }
    // Degraded, each sidecar's own window counts against 300 / 3; each already took about that.
    let (_, failed) = spam_load(&all, 20, 2).await;
    assert_eq!(failed, 0);

    redis.restart();
    for s in &all {
        wait_for("fleet counting again", || {
            s.metric("sluicegate_fleet_limit_degraded") == 0.0
        });
        wait_for("the INFO line", || {
            logged(s, "fleet limit counting fleet-wide again")
        });
    }
}

/// `scope: fleet` with no `--redis-url` starts degraded (metric, WARN) and holds each sidecar to
/// its share, cap / replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_limit_without_redis_counts_a_per_pod_share() {
    let model = StandInModel::spawn().await.unwrap();
    let dir = spool_dir();
    let policy = write_policy(dir.path(), &fleet_capped(6));
    let proxy = start_with_policy(model, dir.path(), &policy, &[]);
    wait_for("the degraded metric", || {
        proxy.metric("sluicegate_fleet_limit_degraded") == 1.0
    });
    wait_for("the WARN line", || {
        logged(&proxy, "fleet limit degraded: no --redis-url")
    });
    let (taken, failed) = spam_load(&[&proxy], 5, 1).await;
    assert_eq!((taken, failed), (2, 0), "a share of 6 / 3");
    // The breach alert says the limit was degraded.
    let records = proxy.spool_records_after(&dir.path().join("spool"), 6.0);
    let alert = records
        .iter()
        .find(|r| r["schema"] == "sluicegate.alert.v1")
        .expect("a breach alert");
    assert_eq!(alert["fleet_degraded"], true);
    assert_eq!(alert["limit"]["scope"], "fleet");
}

/// `rediss://` with the server's CA, a client certificate and a password from a file: the
/// sidecar counts fleet-wide over TLS. Without a client certificate the server refuses the
/// handshake and the limit says it is degraded (so TLS is really in the way, not skipped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_limit_counts_over_tls_with_a_client_certificate_and_a_password() {
    let dir = spool_dir();
    let tls = TlsFiles::make(dir.path());
    let Some(redis) = Redis::start_tls(
        "a_fleet_limit_counts_over_tls_with_a_client_certificate_and_a_password",
        &tls,
        "s3cret",
    ) else {
        return;
    };
    let model = StandInModel::spawn().await.unwrap();
    let policy = write_policy(dir.path(), &fleet_capped(6));
    let password = dir.path().join("redis-password");
    std::fs::write(&password, "s3cret\n").unwrap();
    let url = format!("rediss://127.0.0.1:{}/0", redis.port);
    let base = [
        "--redis-url",
        &url,
        "--redis-password-file",
        path_str(&password),
        "--redis-ca-file",
        path_str(&tls.ca),
    ];
    let client = [
        "--redis-client-cert-file",
        path_str(&tls.client.0),
        "--redis-client-key-file",
        path_str(&tls.client.1),
    ];
    let with_cert = start_with_policy(
        model,
        &dir.path().join("a"),
        &policy,
        &[&base[..], &client[..]].concat(),
    );
    let without_cert = start_with_policy(model, &dir.path().join("b"), &policy, &base);
    wait_for("fleet counting over TLS", || {
        with_cert.metric("sluicegate_fleet_refills_total") > 0.0
            && with_cert.metric("sluicegate_fleet_limit_degraded") == 0.0
    });
    // The documented bound: cap + replicas × lease (leases of max(1, 6 × 0.1 / 3) = 1).
    let (taken, failed) = spam_load(&[&with_cert], 12, 1).await;
    assert_eq!(failed, 0);
    assert!(
        (6..=9).contains(&taken),
        "{taken} taken against a fleet cap of 6, counted in Redis"
    );
    wait_for("the refused handshake to degrade the limit", || {
        without_cert.metric("sluicegate_fleet_limit_degraded") == 1.0
    });
}
