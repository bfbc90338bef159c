//! `sluicegate demo`: the real proxy in front of a built-in stand-in model, driven by a few
//! seconds of fixed-rate traffic. The stand-in model is [`crate::testing::StandInModel`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use crate::config::settings::{
    parse_duration_arg, KafkaSettings, Settings, DEFAULT_ALERTS_TOPIC, DEFAULT_TOPIC,
};
// The stand-in lives in `testing` (below every module); its old path here stays valid for the
// binary, the integration tests and the benchmarks.
pub use crate::testing::{v2_request, StandInModel};

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
