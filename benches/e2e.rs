//! End-to-end latency: the stand-in model direct, and through `sluicegate serve` with the tee on,
//! at fixed request rates, interleaved in one run. Latency is measured from each request's
//! scheduled send time (open loop: no coordinated omission).
//!
//! Run: `cargo bench --bench e2e` (env: E2E_RATES=500,1000,2000 E2E_SECONDS=5 E2E_ROUNDS=3).
//! With `taskset` present, the proxy is pinned to CPU 0 and the model and load to CPU 1.
//! Writes a markdown table and a JSON file to bench-results/.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluicegate::demo::{drive, LoadReport};

const BIN: &str = env!("CARGO_BIN_EXE_sluicegate");

fn env_list(name: &str, default: &str) -> Vec<u32> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn spawn_pinned(cpu: &str, args: &[&str]) -> Child {
    let taskset = Command::new("taskset").arg("-V").output().is_ok();
    let mut cmd = if taskset {
        let mut c = Command::new("taskset");
        c.args(["-c", cpu, BIN]);
        c
    } else {
        Command::new(BIN)
    };
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn sluicegate")
}

fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// utime + stime of a process, in seconds (from /proc).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0 // USER_HZ is 100 on Linux
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

struct Row {
    round: u32,
    rate: u32,
    setup: &'static str,
    report: LoadReport,
    cpu_ms_per_1k: Option<f64>,
}

fn q(r: &LoadReport, p: f64) -> u64 {
    r.latency.value_at_quantile(p)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs benches without it.
    if !std::env::args().any(|a| a == "--bench") {
        println!("e2e: a benchmark; run it with `cargo bench --bench e2e`");
        return;
    }
    let rates = env_list("E2E_RATES", "500,1000,2000");
    let seconds = env_list("E2E_SECONDS", "5")[0].max(1);
    let rounds = env_list("E2E_ROUNDS", "3")[0].max(1);

    let model = free_addr();
    let mut model_proc = spawn_pinned("1", &["stand-in", "--listen", &model.to_string()]);
    wait_listening(model);
    let spool = tempfile::tempdir().unwrap();
    let (listen, admin) = (free_addr(), free_addr());
    let upstream = format!("http://{model}");
    let mut proxy_proc = spawn_pinned(
        "0",
        &[
            "serve",
            "--upstream",
            &upstream,
            "--listen",
            &listen.to_string(),
            "--admin-listen",
            &admin.to_string(),
            "--spool-dir",
            spool.path().to_str().unwrap(),
        ],
    );
    wait_listening(listen);
    let proxy_pid = proxy_proc.id();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    rt.block_on(async {
        // Warm-up, excluded: connections, page cache, allocator.
        drive(model, 500, Duration::from_secs(1), false).await;
        drive(listen, 500, Duration::from_secs(1), false).await;
        for round in 1..=rounds {
            for &rate in &rates {
                let d = drive(model, rate, Duration::from_secs(seconds as u64), false).await;
                eprintln!(
                    "round {round} rate {rate} direct: p50 {}µs p99 {}µs",
                    q(&d, 0.5),
                    q(&d, 0.99)
                );
                rows.push(Row {
                    round,
                    rate,
                    setup: "direct",
                    report: d,
                    cpu_ms_per_1k: None,
                });
                let cpu0 = cpu_seconds(proxy_pid);
                let p = drive(listen, rate, Duration::from_secs(seconds as u64), false).await;
                let cpu = (cpu_seconds(proxy_pid) - cpu0) * 1e3 / (p.sent as f64 / 1e3);
                eprintln!(
                    "round {round} rate {rate} sluicegate: p50 {}µs p99 {}µs cpu {cpu:.1} ms/1k",
                    q(&p, 0.5),
                    q(&p, 0.99)
                );
                rows.push(Row {
                    round,
                    rate,
                    setup: "sluicegate (tee to spool)",
                    report: p,
                    cpu_ms_per_1k: Some(cpu),
                });
            }
        }
    });
    let rss = peak_rss_kib(proxy_pid);
    for child in [&mut proxy_proc, &mut model_proc] {
        let _ = child.kill();
        let _ = child.wait();
    }

    // Median over rounds of each percentile, and the added latency (proxy − direct).
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let mut md = String::from(
        "| rate (req/s) | setup | p50 µs | p90 µs | p99 µs | p99.9 µs | failed | proxy CPU ms / 1k req |\n|---|---|---|---|---|---|---|---|\n",
    );
    let mut json_rows = Vec::new();
    for &rate in &rates {
        for setup in ["direct", "sluicegate (tee to spool)"] {
            let sel: Vec<&Row> = rows
                .iter()
                .filter(|r| r.rate == rate && r.setup == setup)
                .collect();
            let pct = |p: f64| median(sel.iter().map(|r| q(&r.report, p) as f64).collect());
            let failed: u64 = sel.iter().map(|r| r.report.failed).sum();
            let cpu = sel
                .iter()
                .filter_map(|r| r.cpu_ms_per_1k)
                .collect::<Vec<_>>();
            let cpu = (!cpu.is_empty()).then(|| median(cpu));
            let (p50, p90, p99, p999) = (pct(0.5), pct(0.9), pct(0.99), pct(0.999));
            md.push_str(&format!(
                "| {rate} | {setup} | {p50:.0} | {p90:.0} | {p99:.0} | {p999:.0} | {failed} | {} |\n",
                cpu.map_or("–".into(), |c| format!("{c:.1}"))
            ));
            json_rows.push(serde_json::json!({"rate": rate, "setup": setup, "p50_us": p50, "p90_us": p90, "p99_us": p99, "p999_us": p999, "failed": failed, "proxy_cpu_ms_per_1k": cpu}));
        }
        // Added latency is taken round by round (each proxied run against the direct run just
        // before it), then the median over rounds: noise between rounds cancels.
        let added = |p: f64| {
            median(
                (1..=rounds)
                    .filter_map(|round| {
                        let at = |setup: &str| {
                            rows.iter()
                                .find(|r| r.round == round && r.rate == rate && r.setup == setup)
                        };
                        Some(
                            q(&at("sluicegate (tee to spool)")?.report, p) as f64
                                - q(&at("direct")?.report, p) as f64,
                        )
                    })
                    .collect(),
            )
        };
        md.push_str(&format!(
            "| {rate} | **added by sluicegate** | **{:+.0}** | **{:+.0}** | **{:+.0}** | **{:+.0}** | | |\n",
            added(0.5),
            added(0.9),
            added(0.99),
            added(0.999)
        ));
    }
    md.push_str(&format!(
        "\n{rounds} interleaved rounds of {seconds} s per rate and setup (medians shown); proxy peak RSS {:.1} MiB.\n",
        rss as f64 / 1024.0
    ));
    println!("\n{md}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-results");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("e2e.md"), &md).unwrap();
    std::fs::write(
        dir.join("e2e.json"),
        serde_json::to_string_pretty(&serde_json::json!({"rounds": rounds, "seconds": seconds, "proxy_peak_rss_kib": rss, "rows": json_rows})).unwrap(),
    )
    .unwrap();
    println!("written to {}", dir.display());
}
