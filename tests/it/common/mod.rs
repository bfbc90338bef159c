//! Test harness: the real `sluicegate` binary on 127.0.0.1:0, upstreams, a tiny admin client.
#![allow(dead_code)]

pub mod browser;
pub mod kafka;
pub mod tansu;
pub mod wire;

pub use wire::{http, Metrics};

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub const BIN: &str = env!("CARGO_BIN_EXE_sluicegate");

/// A running `sluicegate serve`.
pub struct ProxyProcess {
    pub child: Child,
    pub data: SocketAddr,
    pub admin: SocketAddr,
    /// The gRPC port, when started with `--grpc-listen`.
    pub grpc: Option<SocketAddr>,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl ProxyProcess {
    /// Starts `sluicegate serve` with `args` plus loopback listeners on free ports, and waits
    /// for it to report its addresses.
    pub fn start(args: &[&str]) -> ProxyProcess {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("SLUICEGATE_KAFKA_BROKERS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn sluicegate");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening") {
                    let _ = tx.send(line.clone());
                }
                if std::env::var_os("SLUICEGATE_TEST_LOG").is_some() {
                    eprintln!("[proxy] {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "sluicegate did not start; its log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        let field = |name: &str| -> Option<SocketAddr> {
            let start = line.find(&format!(" {name}="))? + name.len() + 2;
            line[start..].split_whitespace().next()?.parse().ok()
        };
        ProxyProcess {
            data: field("data").expect("data address"),
            admin: field("admin").expect("admin address"),
            grpc: field("grpc"),
            child,
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.data, path)
    }

    /// Sum of a metric's samples over all label sets (0 when absent).
    pub fn metric(&self, name: &str) -> f64 {
        scrape(self.admin).sum(name)
    }

    /// The records in the spool at `dir` (`spool cat`), once at least `spooled` records and
    /// alerts were spooled.
    pub fn spool_records_after(&self, dir: &Path, spooled: f64) -> Vec<serde_json::Value> {
        self.wait_metric(
            "sluicegate_tee_records_spooled_total",
            spooled,
            Duration::from_secs(10),
        );
        spool_records(dir)
    }

    pub fn ready(&self) -> bool {
        admin_get(self.admin, "/readyz").0 == 200
    }

    /// Waits until `cond` holds, polling; panics with `what` after `limit`.
    pub fn wait_metric(&self, name: &str, at_least: f64, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.metric(name);
            if v >= at_least {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{name} = {v}, wanted >= {at_least} within {limit:?}; log:\n{}",
                    self.log.lock().unwrap().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        signal(self.child.id(), "TERM");
        wait_exit(&mut self.child, Duration::from_secs(30))
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `sluicegate serve` in front of `upstream`, spooling to `spool`; `extra` flags follow.
pub fn start_proxy(upstream: SocketAddr, spool: &Path, extra: &[&str]) -> ProxyProcess {
    let up = format!("http://{upstream}");
    let mut args = vec!["--upstream", &up, "--spool-dir", path_str(spool)];
    args.extend_from_slice(extra);
    ProxyProcess::start(&args)
}

/// Flags for a spool of at most 64 KiB in 16 KiB segments: full after a few hundred records.
pub const SMALL_SPOOL: [&str; 6] = [
    "--max-record",
    "16KiB",
    "--spool-segment-bytes",
    "16KiB",
    "--spool-max-bytes",
    "64KiB",
];

/// Writes `text` to DIR/policy.yaml and returns that path.
pub fn write_policy(dir: &Path, text: &str) -> PathBuf {
    let file = dir.join("policy.yaml");
    std::fs::write(&file, text).unwrap();
    file
}

/// Starts the proxy in front of `upstream` with the policy file `policy` and its spool in
/// DIR/spool; `extra` flags follow.
pub fn start_with_policy(
    upstream: SocketAddr,
    dir: &Path,
    policy: &Path,
    extra: &[&str],
) -> ProxyProcess {
    let mut args = vec!["--policy", path_str(policy)];
    args.extend_from_slice(extra);
    start_proxy(upstream, &dir.join("spool"), &args)
}

/// A binary `spam` route on the stand-in model's `spam-filter` (YAML), with `limits` (a YAML
/// sequence) and `extra` lines appended to the route.
pub fn spam_route(threshold: &str, limits: &str, extra: &str) -> String {
    format!(
        r#"
routes:
  spam:
    match: {{model: spam-filter}}
    protocol: v2
    score: {{output: predict_proba, column: 1}}
    decision:
      binary:
        action: spam
        otherwise: ham
        threshold: {threshold}
    limits: {limits}
{extra}
"#
    )
}

/// [`spam_route`] where every row is spam (threshold 0) and at most 3 spam rows a minute are
/// taken: past that, requests are refused.
pub fn spam_capped_at_3(extra: &str) -> String {
    spam_route(
        "{fixed: 0.0}",
        "[{action: spam, max_count: 3, window: 60s, on_breach: reject}]",
        extra,
    )
}

pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(status.success());
}

pub fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// GET on the admin port: (status, body).
pub fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    admin_request(addr, "GET", path, None, "")
}

/// One request on the admin port, optionally with a bearer token: (status, body). The status
/// is 0 when the answer is not HTTP.
pub fn admin_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    match http(addr, method, path, &headers, body.as_bytes()) {
        Ok(r) => (r.status, String::from_utf8_lossy(&r.body).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => (0, String::new()),
        Err(e) => panic!("{method} {path} on {addr}: {e}"),
    }
}

/// The admin port's /metrics, parsed.
pub fn scrape(addr: SocketAddr) -> Metrics {
    Metrics::parse(&admin_get(addr, "/metrics").1)
}

/// `sluicegate spool cat DIR` parsed into JSON records.
pub fn spool_records(dir: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(BIN)
        .args(["spool", "cat"])
        .arg(dir)
        .output()
        .expect("spool cat");
    assert!(
        out.status.success(),
        "spool cat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

pub fn spool_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sluicegate-test-spool")
        .tempdir()
        .unwrap()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// `sluicegate ARGS…`: exit code, stdout, stderr.
pub fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The committed record schema, compiled.
pub fn schema_validator() -> jsonschema::Validator {
    let text = std::fs::read_to_string(repo_path("src/tee/record.v1.schema.json")).unwrap();
    let schema: serde_json::Value = serde_json::from_str(&text).unwrap();
    jsonschema::validator_for(&schema).expect("the schema is valid JSON Schema")
}

/// An h2c (prior knowledge) connection to `addr`, as gRPC clients open one.
pub async fn h2c(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    send
}

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// POSTs `body` and returns (status, headers, body).
pub async fn post(
    client: &HttpClient,
    url: &str,
    body: impl Into<Bytes>,
) -> (u16, http::HeaderMap, Bytes) {
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap();
    let resp = client.request(req).await.expect("request");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (parts.status.as_u16(), parts.headers, body)
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Fixed-rate v2 traffic to `proxy` for `duration`; returns the ids of every response and
/// how many requests failed (non-2xx or transport error).
pub async fn load(proxy: SocketAddr, rate: u32, duration: Duration) -> (Vec<String>, usize) {
    let runs = load_timed(proxy, rate, duration).await;
    let failed = runs.iter().filter(|t| t.id.is_none()).count();
    (runs.into_iter().filter_map(|t| t.id).collect(), failed)
}

/// A TCP forwarder on a fixed loopback port that can be cut and restored: a network outage
/// between the proxy and its broker, with the broker's own state untouched.
pub struct Forwarder {
    port: u16,
    target: SocketAddr,
    tasks: Option<tokio::task::JoinSet<()>>,
}

impl Forwarder {
    pub async fn start(port: u16, target: SocketAddr) -> Forwarder {
        let mut f = Forwarder {
            port,
            target,
            tasks: None,
        };
        f.restore().await;
        f
    }

    /// Closes the listener and every forwarded connection.
    pub fn cut(&mut self) {
        if let Some(mut tasks) = self.tasks.take() {
            tasks.abort_all();
        }
    }

    pub async fn restore(&mut self) {
        let listener = loop {
            // The port was just released by `cut`; binding can race its teardown.
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let target = self.target;
        let mut tasks = tokio::task::JoinSet::new();
        let (conn_tx, mut conn_rx) = tokio::sync::mpsc::unbounded_channel();
        tasks.spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let _ = conn_tx.send(inbound);
            }
        });
        // The connections' own set lives inside this task: aborting it drops them all.
        tasks.spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Some(mut inbound) = conn_rx.recv().await {
                conns.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        self.tasks = Some(tasks);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.cut();
    }
}

/// One request of a fixed-rate run: when it was scheduled (from the start), how long it took
/// from then (no coordinated omission), and its id if it succeeded.
pub struct Timed {
    pub at: Duration,
    pub latency: Duration,
    pub id: Option<String>,
}

/// Like [`load`], keeping each request's schedule and latency.
pub async fn load_timed(proxy: SocketAddr, rate: u32, duration: Duration) -> Vec<Timed> {
    let c = client();
    let total = (rate as f64 * duration.as_secs_f64()) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..total {
        let scheduled = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(scheduled).await;
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let url = format!("http://{proxy}/v2/models/spam-filter/infer");
            let body = sluicegate::demo::v2_request(1 + (i % 3) as usize, i);
            let req = http::Request::post(url)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let id = match tokio::time::timeout(Duration::from_secs(10), c.request(req)).await {
                Ok(Ok(resp)) if resp.status().is_success() => {
                    let id = resp.headers()["sluicegate-id"].to_str().unwrap().to_owned();
                    resp.into_body().collect().await.ok().map(|_| id)
                }
                _ => None,
            };
            Timed {
                at: scheduled - start,
                latency: scheduled.elapsed(),
                id,
            }
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// The q-quantile of the latencies of `runs` (0 when empty).
pub fn quantile(runs: &[&Timed], q: f64) -> Duration {
    let mut v: Vec<Duration> = runs.iter().map(|t| t.latency).collect();
    v.sort();
    v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}
