//! `sluicegate demo`: the real proxy in front of a built-in stand-in model, driven by a few
//! seconds of fixed-rate traffic. The stand-in model also serves the tests and benchmarks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::config::settings::{
    parse_duration_arg, KafkaSettings, Settings, DEFAULT_ALERTS_TOPIC, DEFAULT_TOPIC,
};

/// The stand-in model: a logistic regression over four features, served over the Open
/// Inference Protocol v2 (`/v2/models/NAME/infer`) and TF-Serving v1 (`/v1/models/NAME:predict`).
pub struct StandInModel;

/// Weights of the stand-in model (a spam score over four request features).
const WEIGHTS: [f64; 4] = [1.7, -0.9, 2.3, 0.4];
const BIAS: f64 = -1.2;
pub const MODEL_NAME: &str = "spam-filter";
pub const MODEL_VERSION: &str = "3";

impl StandInModel {
    /// P(positive) for one row; rows shorter than four features are zero-padded.
    pub fn score(row: &[f64]) -> f64 {
        let z: f64 = BIAS + row.iter().zip(WEIGHTS).map(|(x, w)| x * w).sum::<f64>();
        1.0 / (1.0 + (-z).exp())
    }

    /// Serves on `listener` until the task is dropped.
    pub async fn serve(listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service_fn(Self::handle))
                    .await;
            });
        }
    }

    /// Binds 127.0.0.1:0, serves in the background, returns the address.
    pub async fn spawn() -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(Self::serve(listener));
        Ok(addr)
    }

    async fn handle(
        req: Request<Incoming>,
    ) -> Result<
        Response<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>>,
        hyper::Error,
    > {
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        let body = req.into_body().collect().await?.to_bytes();
        let json_response = |status: StatusCode, v: Value| {
            let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
            *r.status_mut() = status;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        };
        let resp = match (method, path.as_str()) {
            (Method::GET, "/v2/health/ready" | "/v2/health/live" | "/v2") => {
                json_response(StatusCode::OK, json!({"ready": true}))
            }
            (Method::POST, p) if p.starts_with("/v2/models/") && p.ends_with("/infer") => {
                match serde_json::from_slice::<Value>(&body) {
                    Ok(v) => match Self::infer_v2(&v) {
                        Ok(out) => json_response(StatusCode::OK, out),
                        Err(e) => json_response(StatusCode::BAD_REQUEST, json!({"error": e})),
                    },
                    Err(e) => json_response(
                        StatusCode::BAD_REQUEST,
                        json!({"error": format!("invalid JSON: {e}")}),
                    ),
                }
            }
            (Method::POST, p) if p.starts_with("/v1/models/") && p.ends_with(":predict") => {
                match serde_json::from_slice::<Value>(&body) {
                    Ok(v) => match Self::predict_v1(&v) {
                        Ok(out) => json_response(StatusCode::OK, out),
                        Err(e) => json_response(StatusCode::BAD_REQUEST, json!({"error": e})),
                    },
                    Err(e) => json_response(
                        StatusCode::BAD_REQUEST,
                        json!({"error": format!("invalid JSON: {e}")}),
                    ),
                }
            }
            // A token stream, as an LLM server sends it: server-sent events, one per 20 ms.
            (Method::POST, "/generate_stream") => {
                let n: usize = std::str::from_utf8(&body)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(5)
                    .min(1000);
                let (tx, rx) =
                    tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(4);
                tokio::spawn(async move {
                    for i in 0..n {
                        let event = format!("data: {{\"token\":\"t{i}\"}}\n\n");
                        if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                });
                let stream = tokio_stream_from(rx);
                let mut r = Response::new(StreamBody::new(stream).boxed());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/event-stream"),
                );
                r
            }
            _ => json_response(StatusCode::NOT_FOUND, json!({"error": "not found"})),
        };
        Ok(resp)
    }

    /// Open Inference Protocol v2: input `features` (or the first input) of shape `[n, k]`,
    /// output `predict_proba` of shape `[n, 2]`, flat row-major.
    pub fn infer_v2(req: &Value) -> Result<Value, String> {
        let input = req["inputs"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|i| i["name"] == "features")
                    .or_else(|| a.first())
            })
            .ok_or("no inputs")?;
        let shape: Vec<usize> = input["shape"]
            .as_array()
            .ok_or("input has no shape")?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize).ok_or("bad shape"))
            .collect::<Result<_, _>>()?;
        let mut flat = Vec::new();
        flatten(&input["data"], &mut flat)?;
        let (rows, cols) = match shape.as_slice() {
            [n, k] => (*n, *k),
            [k] => (1, *k),
            _ => return Err("shape must be [n, k]".into()),
        };
        if rows * cols != flat.len() || cols == 0 {
            return Err(format!(
                "shape {shape:?} does not match {} values",
                flat.len()
            ));
        }
        let mut proba = Vec::with_capacity(rows * 2);
        for row in flat.chunks(cols) {
            let p = Self::score(row);
            proba.push(1.0 - p);
            proba.push(p);
        }
        let mut out = json!({
            "model_name": MODEL_NAME,
            "model_version": MODEL_VERSION,
            "outputs": [{"name": "predict_proba", "shape": [rows, 2], "datatype": "FP64", "data": proba}],
        });
        if let Some(id) = req.get("id") {
            out["id"] = id.clone();
        }
        Ok(out)
    }

    /// TF-Serving v1: `{"instances": [[f, …], …]}` → `{"predictions": [p, …]}`.
    pub fn predict_v1(req: &Value) -> Result<Value, String> {
        let rows = req["instances"].as_array().ok_or("no instances")?;
        let mut predictions = Vec::with_capacity(rows.len());
        for row in rows {
            let mut flat = Vec::new();
            flatten(row, &mut flat)?;
            predictions.push(Self::score(&flat));
        }
        Ok(json!({ "predictions": predictions }))
    }
}

fn flatten(v: &Value, out: &mut Vec<f64>) -> Result<(), String> {
    match v {
        Value::Array(a) => a.iter().try_for_each(|x| flatten(x, out)),
        Value::Number(n) => {
            out.push(n.as_f64().ok_or("bad number")?);
            Ok(())
        }
        _ => Err("data must be numbers".into()),
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A v2 request body with `rows` rows of four pseudo-random features.
pub fn v2_request(rows: usize, seed: u64) -> String {
    let mut rng = fastrand::Rng::with_seed(seed);
    let data: Vec<f64> = (0..rows * 4)
        .map(|_| rng.f64() * 2.0 - 0.5)
        .map(|x| (x * 1000.0).round() / 1000.0)
        .collect();
    json!({
        "id": format!("req-{seed}"),
        "inputs": [{"name": "features", "shape": [rows, 4], "datatype": "FP64", "data": data}],
    })
    .to_string()
}

/// Options of `sluicegate demo`.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoOptions {
    /// Send the tee to Kafka instead of the spool alone.
    #[arg(long, env = "SLUICEGATE_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// How long to drive traffic.
    #[arg(long, default_value = "5s", value_parser = parse_duration_arg)]
    pub duration: Duration,
    /// Requests per second.
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// Where the spool goes.
    #[arg(long, default_value = "sluicegate-demo-spool")]
    pub spool_dir: PathBuf,
}

/// Runs the demo and prints what happened.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let model = StandInModel::spawn().await?;
    let mut settings = Settings {
        listen: "127.0.0.1:0".parse()?,
        admin_listen: "127.0.0.1:0".parse()?,
        ..Default::default()
    };
    settings.upstream.authority = model.to_string().parse()?;
    settings.upstream.ready_path = Some("/v2/health/ready".into());
    settings.spool.dir = opts.spool_dir.clone();
    settings.kafka = opts.kafka_brokers.clone().map(|brokers| KafkaSettings {
        brokers,
        topic: DEFAULT_TOPIC.into(),
        alerts_topic: DEFAULT_ALERTS_TOPIC.into(),
        properties: Default::default(),
    });
    let running = crate::app::start(settings).await?;
    let proxy = running.data_addr;
    println!("stand-in model (Open Inference Protocol v2) on http://{model}");
    println!(
        "sluicegate proxy on http://{proxy}, admin on http://{}",
        running.admin_addr
    );
    println!(
        "tee sink: {}",
        match &opts.kafka_brokers {
            Some(b) => format!(
                "Kafka at {b}, topic {DEFAULT_TOPIC} (spool {})",
                opts.spool_dir.display()
            ),
            None => format!("the spool at {}", opts.spool_dir.display()),
        }
    );

    // One request shown in full, then fixed-rate load.
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let example = v2_request(2, 7);
    let resp = client
        .request(post(proxy, "/v2/models/spam-filter/infer", example.clone()))
        .await?;
    let id = resp
        .headers()
        .get("sluicegate-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_owned();
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    println!("\nPOST /v2/models/spam-filter/infer  {example}");
    println!(
        "→ {status}  sluicegate-id: {id}\n  {}",
        String::from_utf8_lossy(&body)
    );

    println!(
        "\nDriving {} requests/s for {:?}, first straight to the model, then through sluicegate:",
        opts.rate, opts.duration
    );
    let direct = drive(model, opts.rate, opts.duration, true).await;
    let through = drive(proxy, opts.rate, opts.duration, true).await;
    println!("direct:  {direct}");
    println!("proxied: {through}");
    let added = |q: f64| {
        let d = through.latency.value_at_quantile(q) as i64
            - direct.latency.value_at_quantile(q) as i64;
        format!("{:+.0} µs", d as f64)
    };
    println!(
        "added by sluicegate, with the tee on: p50 {}  p99 {}",
        added(0.5),
        added(0.99)
    );

    // Let the writer (and Kafka) catch up, then shut down the way SIGTERM does.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = running.metrics.clone();
    running.shutdown().await;
    println!(
        "\nTee: {} records queued, {} written to the spool, {} dropped{}",
        m.tee.queued.get(),
        m.tee.spool.spooled.get(),
        m.tee.dropped_queue_full.get(),
        if opts.kafka_brokers.is_some() {
            format!(", {} acknowledged by Kafka", m.tee.sent.get())
        } else {
            String::new()
        }
    );
    if let Some(record) = find_record(&opts.spool_dir, &id) {
        println!("\nThe record of the first request (bodies shortened here, whole in the spool):");
        println!("{record}");
    }
    println!(
        "\nSee them all:  sluicegate spool cat {}   (one JSON record per line)",
        opts.spool_dir.display()
    );
    Ok(())
}

/// The record with `id`, pretty-printed with long arrays cut, if it is still in the spool
/// (with Kafka, acknowledged segments are deleted).
fn find_record(dir: &std::path::Path, id: &str) -> Option<String> {
    use crate::tee::spool::{Position, SpoolMetrics, SpoolReader};
    let mut reader = SpoolReader::open(dir, SpoolMetrics::default(), false).ok()?;
    loop {
        let batch = reader.next_batch(Position::END, 1024).ok()?;
        if batch.is_empty() {
            return None;
        }
        if let Some(e) = batch.into_iter().find(|e| e.entry.key == id) {
            let mut v: Value = serde_json::from_slice(&e.entry.payload).ok()?;
            shorten(&mut v);
            return serde_json::to_string_pretty(&v).ok();
        }
    }
}

fn shorten(v: &mut Value) {
    match v {
        Value::Array(a) if a.len() > 4 => {
            a.truncate(4);
            a.push(json!("…"));
        }
        Value::Array(a) => a.iter_mut().for_each(shorten),
        Value::Object(o) => o.values_mut().for_each(shorten),
        _ => {}
    }
}

fn post(addr: SocketAddr, path: &str, body: String) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}{path}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header("sluicegate-consumer", "demo")
        .body(Full::new(Bytes::from(body)))
        .expect("valid request")
}

/// What a fixed-rate run measured.
pub struct LoadReport {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub latency: hdrhistogram::Histogram<u64>,
    pub elapsed: Duration,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let q = |p: f64| Duration::from_micros(self.latency.value_at_quantile(p));
        writeln!(
            f,
            "{} requests in {:.1}s: {} ok, {} failed",
            self.sent,
            self.elapsed.as_secs_f64(),
            self.ok,
            self.failed
        )?;
        write!(
            f,
            "latency (from the scheduled send time): p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
            q(0.5),
            q(0.9),
            q(0.99),
            Duration::from_micros(self.latency.max())
        )
    }
}

/// Sends v2 requests to `addr` at a fixed rate for `duration`. Latency is taken from each
/// request's scheduled start, so a stall is not hidden (no coordinated omission).
pub async fn drive(addr: SocketAddr, rate: u32, duration: Duration, progress: bool) -> LoadReport {
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http::<Full<Bytes>>();
    let total = (rate as f64 * duration.as_secs_f64()).round() as u64;
    let bar = if progress {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} driving {pos}/{len} requests at a fixed rate [{bar:30}] {elapsed}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let hist = Arc::new(std::sync::Mutex::new(
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
    ));
    let ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let scheduled = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(scheduled.into()).await;
        let (client, hist, ok, bar) = (client.clone(), hist.clone(), ok.clone(), bar.clone());
        tasks.push(tokio::spawn(async move {
            let rows = 1 + (i % 4) as usize;
            let req = post(addr, "/v2/models/spam-filter/infer", v2_request(rows, i));
            let result =
                match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
                    Ok(Ok(resp)) => {
                        let good = resp.status().is_success();
                        resp.into_body().collect().await.is_ok() && good
                    }
                    _ => false,
                };
            let micros = scheduled.elapsed().as_micros() as u64;
            hist.lock().expect("hist").saturating_record(micros.max(1));
            if result {
                ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            bar.inc(1);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    bar.finish_and_clear();
    let ok = ok.load(std::sync::atomic::Ordering::Relaxed);
    let latency = hist.lock().expect("hist").clone();
    LoadReport {
        sent: total,
        ok,
        failed: total - ok,
        latency,
        elapsed: start.elapsed(),
    }
}
