//! End-to-end benchmark: the same upstream (the built-in stand-in model) and the same load,
//! reached five ways, interleaved in one run:
//!
//! - `direct`: no proxy;
//! - `sluicegate-full`: `sluicegate serve` with everything on — an adaptive threshold, a limit
//!   with a fallback, decisions written into the body, Ed25519 tags (benches/e2e/policy.full.yaml)
//!   and the tee to a real Kafka-protocol broker (`tansu`, through a TCP front the bench can cut),
//!   with `--record-decisions columns` (what the docs recommend for large batches; set
//!   `E2E_RECORD_DECISIONS=rows` for the one-object-per-row form);
//! - `sluicegate-tee`: `sluicegate serve` with no policy (record everything) and the spool as sink;
//! - `nginx` and `haproxy`: plain reverse proxies with keep-alive to the upstream
//!   (xtask/src/e2e/nginx.conf, xtask/src/e2e/haproxy.cfg).
//!
//! Load is `oha` at fixed request rates with `--latency-correction` (latency from each request's
//! scheduled send time: free of coordinated omission), HTTP/1.1 keep-alive over a fixed number of
//! connections. Proxies run on CPU 0; the load, the upstream and the broker on CPU 1.
//!
//! Phases, in order (about 9 minutes with the defaults):
//! 1. warm-up of every setup at 1,000 req/s, ~1 KiB then ~16 KiB (excluded; the proxies are fresh
//!    processes, so their peak RSS after it is the RSS target's measure);
//! 2. the direct setup's closed-loop ceiling, which places the automatic rates;
//! 3. the rate rounds: every setup at every rate once per round, in a rotating order; CPU seconds
//!    (utime + stime of every thread, /proc/PID/stat) and peak RSS (VmHWM, reset through
//!    /proc/PID/clear_refs) per run; the sluicegate setups' counters from their /metrics, after
//!    their tee has drained, so a run's tee work is charged to it;
//! 4. records counted at the broker (the topic's high watermark against the records sluicegate
//!    made);
//! 5. the Kafka outage: sluicegate-full and direct in pairs at 1,000 req/s, the broker cut off
//!    for three pairs, then back; p99 with Kafka up and down, and every record counted again;
//! 6. every setup's closed-loop ceiling (last: it leaves memory and the broker at their worst).
//!
//! ```sh
//! cargo xtask e2e
//! ```
//!
//! builds sluicegate (`cargo build --release`), `oha` (xtask/install-oha.sh) and `tansu`
//! (tests/install-tansu.sh) into
//! ~/.cache/sluicegate when missing, installs nginx with apt-get when it is missing and the bench
//! runs as root (or with password-less sudo), and writes bench-results/e2e.{md,json,svg}.
//! Environment (defaults in brackets):
//!
//! | variable | meaning |
//! |---|---|
//! | `E2E_RATES` [auto] | request rates for ~1 KiB responses, e.g. `500,1000,2000`; auto: 1000, 5000 and ~45% of the direct closed-loop ceiling (near where the direct tail stops being stable) |
//! | `E2E_RATES_16K` [auto] | the same for ~16 KiB responses; auto: 1000 and ~45% of the direct closed-loop ceiling |
//! | `E2E_SECONDS` [4] | seconds per measured run |
//! | `E2E_ROUNDS` [3] | interleaved rounds (every setup at every rate once per round) |
//! | `E2E_CEILING_SECONDS` [3], `E2E_CEILING_ROUNDS` [2] | closed-loop runs that find each setup's ceiling |
//! | `E2E_WARMUP_SECONDS` [3] | excluded warm-up per setup and size, at 1,000 req/s (fresh processes: the RSS target is read after it) |
//! | `E2E_CONNECTIONS` [16] | client connections |
//! | `E2E_SIZES` [1k,16k] | response sizes |
//! | `E2E_SETUPS` [all] | a subset, e.g. `direct,sluicegate-full,nginx` |
//! | `E2E_OUTAGE` [1] | the Kafka outage phase (the broker cut off mid-run, at 1,000 req/s) |
//! | `E2E_PIN` [1] | pin with taskset |
//! | `E2E_RECORD_DECISIONS` [columns] | sluicegate-full's `--record-decisions` |
//! | `E2E_COMBINE` | `dir1,dir2,…`: no run; the targets of these runs' results as medians with their range, into `E2E_OUT/e2e-runs.md` |
//! | `E2E_OUT` [bench-results] | where results go |
//! | `E2E_OHA`, `SLUICEGATE_TANSU_BIN` | use these binaries instead of building them |

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::root;
use wire::{http, Metrics};

// The integration tests' raw HTTP client and Prometheus parser; they use parts this does not.
#[allow(dead_code)]
#[path = "../../tests/it/common/wire.rs"]
mod wire;

const TOPIC: &str = "sluicegate.records";
const ALERTS_TOPIC: &str = "sluicegate.alerts";
const INFER_PATH: &str = "/v2/models/spam-filter/infer";
const JSON: &[(&str, &str)] = &[("content-type", "application/json")];
const PROXY_CPU: &str = "0";
const REST_CPU: &str = "1";
const PCTS: [(&str, &str); 4] = [
    ("p50", "p50"),
    ("p90", "p90"),
    ("p99", "p99"),
    ("p99.9", "p99.9"),
];

// ---------------------------------------------------------------------------------------------
// Settings

struct Cfg {
    rates_1k: Option<Vec<u32>>,
    rates_16k: Option<Vec<u32>>,
    seconds: u64,
    rounds: usize,
    ceiling_seconds: u64,
    ceiling_rounds: usize,
    warmup_seconds: u64,
    connections: u32,
    sizes: Vec<String>,
    setups: Option<Vec<String>>,
    outage: bool,
    pin: bool,
    out: PathBuf,
}

fn env_str(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| default.into())
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}

fn env_rates(name: &str) -> Option<Vec<u32>> {
    let s = env_str(name, "auto");
    if s == "auto" {
        return None;
    }
    let v: Vec<u32> = s
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .filter(|&r| r > 0)
        .collect();
    (!v.is_empty()).then_some(v)
}

impl Cfg {
    fn from_env() -> Cfg {
        let out = PathBuf::from(env_str("E2E_OUT", "bench-results"));
        Cfg {
            rates_1k: env_rates("E2E_RATES"),
            rates_16k: env_rates("E2E_RATES_16K"),
            seconds: env_num("E2E_SECONDS", 4u64).max(1),
            rounds: env_num("E2E_ROUNDS", 3usize).max(1),
            ceiling_seconds: env_num("E2E_CEILING_SECONDS", 3u64).max(1),
            ceiling_rounds: env_num("E2E_CEILING_ROUNDS", 2usize),
            warmup_seconds: env_num("E2E_WARMUP_SECONDS", 3u64),
            connections: env_num("E2E_CONNECTIONS", 16u32).max(1),
            sizes: env_str("E2E_SIZES", "1k,16k")
                .split(',')
                .map(|s| s.trim().to_lowercase())
                .filter(|s| s == "1k" || s == "16k")
                .collect(),
            setups: std::env::var("E2E_SETUPS")
                .ok()
                .filter(|s| !s.trim().is_empty() && s.trim() != "all")
                .map(|s| s.split(',').map(|x| x.trim().to_owned()).collect()),
            outage: env_num("E2E_OUTAGE", 1u32) != 0,
            pin: env_num("E2E_PIN", 1u32) != 0,
            out: if out.is_absolute() {
                out
            } else {
                root().join(out)
            },
        }
    }

    /// Whether `k` is in E2E_SETUPS (direct always is).
    fn wants(&self, k: Kind) -> bool {
        self.setups
            .as_ref()
            .is_none_or(|s| k == Kind::Direct || s.iter().any(|x| x == k.name()))
    }
}

// ---------------------------------------------------------------------------------------------
// Setups

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Direct,
    Full,
    Tee,
    Nginx,
    Haproxy,
}

const ALL_KINDS: [Kind; 5] = [
    Kind::Direct,
    Kind::Full,
    Kind::Tee,
    Kind::Nginx,
    Kind::Haproxy,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Full => "sluicegate-full",
            Kind::Tee => "sluicegate-tee",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
        }
    }
    fn describe(self) -> String {
        match self {
            Kind::Direct => "no proxy: the load straight to the stand-in model".into(),
            Kind::Full => format!(
                "sluicegate: adaptive threshold, limit, decisions in the body, Ed25519 tags, tee to Kafka (tansu), `--record-decisions {}`",
                env_str("E2E_RECORD_DECISIONS", "columns")
            ),
            Kind::Tee => "sluicegate: no policy (record everything), tee to the spool only".into(),
            Kind::Nginx => "nginx: one worker, keep-alive to the upstream".into(),
            Kind::Haproxy => {
                "HAProxy: one thread, keep-alive and connection reuse to the upstream".into()
            }
        }
    }
    fn color(self) -> &'static str {
        match self {
            Kind::Direct => "#444444",
            Kind::Full => "#d62728",
            Kind::Tee => "#ff7f0e",
            Kind::Nginx => "#2ca02c",
            Kind::Haproxy => "#1f77b4",
        }
    }
    fn is_sluicegate(self) -> bool {
        matches!(self, Kind::Full | Kind::Tee)
    }
}

/// A process the bench started: stopped (TERM, then KILL) on drop, children first.
struct Proc {
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
    /// The process and its children (nginx's workers).
    fn pids(&self) -> Vec<u32> {
        let mut v = vec![self.pid()];
        v.extend(children_of(self.pid()));
        v
    }
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
    fn stop(&mut self) {
        if !self.alive() {
            return;
        }
        let kids = children_of(self.pid());
        signal(self.pid(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && self.alive() {
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.alive() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        for k in kids {
            if Path::new(&format!("/proc/{k}")).exists() {
                signal(k, "KILL");
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let after = s.rsplit_once(')')?.1.to_owned();
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

struct Setup {
    kind: Kind,
    addr: SocketAddr,
    admin: Option<SocketAddr>,
    proc_: Option<Proc>,
}

impl Setup {
    fn pids(&self) -> Vec<u32> {
        self.proc_.as_ref().map(|p| p.pids()).unwrap_or_default()
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local addr")
}

fn have_taskset() -> bool {
    Command::new("taskset")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn command(pin: Option<&str>, program: &Path) -> Command {
    match pin {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpu]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn spawn(name: &str, mut cmd: Command, log: &Path) -> Proc {
    let err = std::fs::File::create(log).expect("log file");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    Proc { child }
}

fn wait_listening(addr: SocketAddr, what: &str, proc_: Option<&mut Proc>, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut proc_ = proc_;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        let dead = proc_.as_mut().is_some_and(|p| !p.alive());
        if dead || Instant::now() > deadline {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{what} did not come up on {addr}:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

// ---------------------------------------------------------------------------------------------
// /proc

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of processes, all their threads (live and exited), in seconds.
fn cpu_seconds(pids: &[u32], tck: f64) -> f64 {
    pids.iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<&str> = after.split_whitespace().collect();
            let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
                + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            ticks / tck
        })
        .sum()
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Resets the peak RSS (VmHWM) to the current RSS (`echo 5 > /proc/PID/clear_refs`).
fn reset_peak_rss(pids: &[u32]) -> bool {
    pids.iter()
        .all(|pid| std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok())
}

/// The largest peak RSS among the processes (for nginx: the worker), KiB.
fn peak_rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|&p| status_kib(p, "VmHWM:"))
        .max()
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// The admin port's /metrics (empty when it does not answer).
fn scrape(admin: SocketAddr) -> Metrics {
    http(admin, "GET", "/metrics", &[], b"")
        .map(|r| Metrics::parse(&String::from_utf8_lossy(&r.body)))
        .unwrap_or_default()
}

/// Cumulative histogram buckets of `name` as (upper bound, count), sorted.
fn buckets(m: &Metrics, name: &str) -> Vec<(f64, f64)> {
    let key = format!("{name}_bucket");
    let mut v: Vec<(f64, f64)> = m
        .series(&key)
        .filter_map(|(labels, c)| {
            let le = labels.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, c))
        })
        .collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// Quantile from cumulative buckets, interpolated linearly within the bucket (as Prometheus'
/// histogram_quantile does). None when empty.
fn bucket_quantile(b: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = b.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, c) in b {
        if c >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let frac = if c > prev.1 {
                (rank - prev.1) / (c - prev.1)
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, c);
    }
    Some(prev.0)
}

fn bucket_delta(a: &[(f64, f64)], b: &[(f64, f64)]) -> Vec<(f64, f64)> {
    b.iter()
        .map(|&(le, c)| {
            let before = a.iter().find(|x| x.0 == le).map_or(0.0, |x| x.1);
            (le, c - before)
        })
        .collect()
}

const TEE_COUNTERS: [&str; 9] = [
    "sluicegate_requests_total",
    "sluicegate_tee_records_queued_total",
    "sluicegate_tee_records_spooled_total",
    "sluicegate_tee_records_sent_total",
    "sluicegate_tee_records_dropped_queue_full_total",
    "sluicegate_tee_records_dropped_spool_error_total",
    "sluicegate_tee_records_dropped_spool_full_total",
    "sluicegate_tee_records_dead_lettered_total",
    "sluicegate_limit_alerts_total",
];

fn dropped(m: &Metrics) -> f64 {
    m.sum("sluicegate_tee_records_dropped_queue_full_total")
        + m.sum("sluicegate_tee_records_dropped_spool_error_total")
        + m.sum("sluicegate_tee_records_dropped_spool_full_total")
}

/// Everything queued has been spooled (or refused by the spool) and, with Kafka, everything
/// spooled acknowledged (or set aside).
fn drained(m: &Metrics, kafka: bool) -> bool {
    let queued = m.sum("sluicegate_tee_records_queued_total");
    let spooled = m.sum("sluicegate_tee_records_spooled_total");
    let refused = m.sum("sluicegate_tee_records_dropped_spool_error_total")
        + m.sum("sluicegate_tee_records_dropped_spool_full_total");
    let settled = m.sum("sluicegate_tee_records_sent_total")
        + m.sum("sluicegate_tee_records_dead_lettered_total");
    spooled + refused >= queued && (!kafka || settled >= spooled)
}

/// Waits (bounded) until the tee has nothing in flight; returns whether it got there.
fn wait_drained(admin: SocketAddr, kafka: bool, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let m = scrape(admin);
        if !m.is_empty() && drained(&m, kafka) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------------
// Tools: oha, tansu, nginx, haproxy

fn script_path(script: &str, env_override: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(env_override) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
    }
    eprintln!("e2e: {script} (builds it once into ~/.cache/sluicegate if missing)");
    let out = Command::new(root().join(script))
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("{script}: {e}"))?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if out.status.success() && p.is_file() {
        Ok(p)
    } else {
        Err(format!("{script} failed ({})", out.status))
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        .unwrap_or(false)
}

/// A Debian package's program: found, or installed with apt-get (as root, or with password-less
/// sudo), or None with a note.
fn debian_program(program: &str, package: &str) -> Option<PathBuf> {
    if let Some(p) = find_program(program) {
        return Some(p);
    }
    let sudo: &[&str] = if is_root() { &[] } else { &["sudo", "-n"] };
    eprintln!("e2e: {program} is missing; installing the Debian package {package} with apt-get");
    let run = |args: &[&str]| {
        let mut all: Vec<&str> = sudo.to_vec();
        all.extend_from_slice(args);
        Command::new(all[0])
            .args(&all[1..])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !run(&["apt-get", "install", "-y", "-q", package]) {
        run(&["apt-get", "update", "-q"]);
        run(&["apt-get", "install", "-y", "-q", package]);
    }
    let p = find_program(program);
    if p.is_none() {
        eprintln!("e2e: SKIPPED {program}: not installed and apt-get could not install {package} (run as root, or `sudo apt-get install {package}`)");
    }
    p
}

fn version_of(program: &Path, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .output()
        .map(|o| {
            let s = String::from_utf8_lossy(if o.stdout.is_empty() {
                &o.stderr
            } else {
                &o.stdout
            })
            .into_owned();
            s.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The broker, and a TCP front the bench can cut to take Kafka away without restarting tansu
// (tansu 0.6 does not take back an idempotent producer it knew before a restart).

struct Front {
    rt: tokio::runtime::Runtime,
    port: u16,
    target: SocketAddr,
    tasks: Option<tokio::task::JoinSet<()>>,
}

impl Front {
    fn start(port: u16, target: SocketAddr) -> Front {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let mut f = Front {
            rt,
            port,
            target,
            tasks: None,
        };
        f.restore();
        f
    }
    fn cut(&mut self) {
        if let Some(mut t) = self.tasks.take() {
            let _g = self.rt.enter();
            t.abort_all();
        }
    }
    fn restore(&mut self) {
        let (port, target) = (self.port, self.target);
        let tasks = self.rt.block_on(async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            let listener = loop {
                match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                    Ok(l) => break l,
                    Err(e) if Instant::now() > deadline => panic!("front on {port}: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            };
            let mut tasks = tokio::task::JoinSet::new();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            tasks.spawn(async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    let _ = inbound.set_nodelay(true);
                    if tx.send(inbound).is_err() {
                        return;
                    }
                }
            });
            tasks.spawn(async move {
                let mut conns = tokio::task::JoinSet::new();
                while let Some(mut inbound) = rx.recv().await {
                    conns.spawn(async move {
                        if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                            let _ = out.set_nodelay(true);
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                        }
                    });
                    while conns.try_join_next().is_some() {}
                }
            });
            tasks
        });
        self.tasks = Some(tasks);
    }
}

fn create_topic(tansu: &Path, port: u16, name: &str) {
    let ok = Command::new(tansu)
        .args(["topic", "create", name, "--partitions", "1"])
        .args(["--broker", &format!("tcp://127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "tansu topic create {name} failed");
}

/// Messages in a topic's single partition (its high watermark), read straight from tansu.
fn topic_count(brokers: &str, topic: &str) -> Option<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "sluicegate-e2e-count")
        .set("log_level", "3")
        .create()
        .ok()?;
    for _ in 0..5 {
        if let Ok((lo, hi)) = c.fetch_watermarks(topic, 0, Duration::from_secs(10)) {
            return Some(hi - lo);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Load: one oha run

#[derive(Clone, Debug, Default)]
struct Load {
    ok: u64,
    failed: u64,
    aborted_at_deadline: u64,
    rps: f64,
    /// Latency percentiles in µs: p50, p90, p99, p99.9.
    p: [f64; 4],
    bytes_per_response: Option<u64>,
    errors: BTreeMap<String, u64>,
}

#[allow(clippy::too_many_arguments)]
fn oha(
    oha: &Path,
    pin: Option<&str>,
    addr: SocketAddr,
    body: &Path,
    rate: Option<u32>,
    seconds: u64,
    connections: u32,
    out: &Path,
) -> Load {
    let _ = std::fs::remove_file(out);
    let mut cmd = command(pin, oha);
    cmd.args(["--no-tui", "--output-format", "json", "-o"])
        .arg(out)
        .args(["-z", &format!("{seconds}s")])
        .args(["-c", &connections.to_string()])
        .args(["--worker-threads", "1"])
        .args(["-m", "POST", "-T", "application/json", "-D"])
        .arg(body);
    if let Some(r) = rate {
        cmd.args(["-q", &r.to_string(), "--latency-correction"]);
    }
    cmd.arg(format!("http://{addr}{INFER_PATH}"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run oha");
    let deadline = Instant::now() + Duration::from_secs(seconds + 60);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("oha did not finish within {seconds} s + 60 s");
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        let mut err = String::new();
        if let Some(mut s) = child.stderr.take() {
            let _ = s.read_to_string(&mut err);
        }
        panic!("oha output is not JSON ({e}): {text:.400}\n{err}")
    });
    let mut load = Load {
        rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        bytes_per_response: v["summary"]["sizePerRequest"].as_u64(),
        ..Load::default()
    };
    for (i, (key, _)) in PCTS.iter().enumerate() {
        load.p[i] = v["latencyPercentiles"][key].as_f64().unwrap_or(f64::NAN) * 1e6;
    }
    if let Some(codes) = v["statusCodeDistribution"].as_object() {
        for (code, n) in codes {
            let n = n.as_u64().unwrap_or(0);
            if code.starts_with('2') {
                load.ok += n;
            } else {
                load.failed += n;
                *load.errors.entry(format!("status {code}")).or_default() += n;
            }
        }
    }
    if let Some(errs) = v["errorDistribution"].as_object() {
        for (e, n) in errs {
            let n = n.as_u64().unwrap_or(0);
            if e.contains("aborted due to deadline") {
                load.aborted_at_deadline += n;
            } else {
                load.failed += n;
                *load.errors.entry(e.clone()).or_default() += n;
            }
        }
    }
    load
}

// ---------------------------------------------------------------------------------------------
// Cells: one setup at one rate for one run

#[derive(Clone, Debug)]
struct Cell {
    phase: &'static str,
    round: usize,
    size: String,
    rate: Option<u32>,
    kind: Kind,
    load: Load,
    wall_s: f64,
    proxy_cpu_s: Option<f64>,
    peak_rss_kib: Option<u64>,
    upstream_cpu_s: f64,
    broker_cpu_s: Option<f64>,
    /// Deltas of the sluicegate counters over the run (after the tee drained).
    tee: Option<BTreeMap<String, f64>>,
    lag_buckets: Option<Vec<(f64, f64)>>,
    drained: Option<bool>,
}

impl Cell {
    fn cpu_ms_per_1k(&self) -> Option<f64> {
        let ok = self.load.ok as f64;
        self.proxy_cpu_s.filter(|_| ok > 0.0).map(|c| c * 1e6 / ok)
    }
    fn to_json(&self) -> Value {
        json!({
            "phase": self.phase, "round": self.round, "size": self.size, "rate": self.rate,
            "setup": self.kind.name(), "ok": self.load.ok, "failed": self.load.failed,
            "aborted_at_deadline": self.load.aborted_at_deadline, "errors": self.load.errors,
            "achieved_rps": self.load.rps, "p50_us": self.load.p[0], "p90_us": self.load.p[1],
            "p99_us": self.load.p[2], "p999_us": self.load.p[3],
            "bytes_per_response": self.load.bytes_per_response, "wall_s": self.wall_s,
            "proxy_cpu_s": self.proxy_cpu_s, "proxy_cpu_ms_per_1k": self.cpu_ms_per_1k(),
            "proxy_peak_rss_kib": self.peak_rss_kib, "upstream_cpu_s": self.upstream_cpu_s,
            "broker_cpu_s": self.broker_cpu_s, "tee": self.tee, "tee_drained": self.drained,
            "tee_lag_p99_s": self.lag_buckets.as_deref().and_then(|b| bucket_quantile(b, 0.99)),
        })
    }
}

struct Size {
    name: String,
    rows: usize,
    request_bytes: usize,
    response_bytes: usize,
    body: PathBuf,
}

/// The rows of `v2_request` whose stand-in response is closest to `target` bytes.
fn size_for(name: &str, target: usize, dir: &Path) -> Size {
    let resp_len = |rows: usize| {
        let req: Value = serde_json::from_str(&sluicegate::demo::v2_request(rows, 7)).unwrap();
        sluicegate::demo::StandInModel::infer_v2(&req)
            .expect("stand-in answers")
            .to_string()
            .len()
    };
    let mut rows = 1;
    while rows < 100_000 && resp_len(rows + 1) <= target {
        rows += 1;
    }
    if resp_len(rows + 1).abs_diff(target) < resp_len(rows).abs_diff(target) {
        rows += 1;
    }
    let body = sluicegate::demo::v2_request(rows, 7);
    let path = dir.join(format!("body-{name}.json"));
    std::fs::write(&path, &body).expect("write body");
    Size {
        name: name.into(),
        rows,
        request_bytes: body.len(),
        response_bytes: resp_len(rows),
        body: path,
    }
}

struct World {
    cfg: Cfg,
    tck: f64,
    pin_rest: Option<&'static str>,
    oha: PathBuf,
    work: PathBuf,
    setups: Vec<Setup>,
    sizes: Vec<Size>,
    upstream: Proc,
    broker: Option<Proc>,
    cells: Vec<Cell>,
    total_cells: usize,
}

impl World {
    fn setup(&self, k: Kind) -> &Setup {
        self.setups.iter().find(|s| s.kind == k).expect("setup")
    }
    fn has(&self, k: Kind) -> bool {
        self.setups.iter().any(|s| s.kind == k)
    }
    fn kinds(&self) -> Vec<Kind> {
        self.setups.iter().map(|s| s.kind).collect()
    }
    /// The median achieved rate of `k`'s closed-loop runs in `phase` at `size`.
    fn ceiling(&self, phase: &str, size: &str, k: Kind) -> Option<f64> {
        median(
            self.cells
                .iter()
                .filter(|c| c.phase == phase && c.size == size && c.kind == k)
                .map(|c| c.load.rps)
                .collect(),
        )
    }

    fn run(
        &mut self,
        phase: &'static str,
        round: usize,
        si: usize,
        kind: Kind,
        rate: Option<u32>,
        seconds: u64,
    ) -> Cell {
        let setup = self.setup(kind);
        let (addr, admin, pids) = (setup.addr, setup.admin, setup.pids());
        let broker_pids: Vec<u32> = self.broker.as_ref().map(|b| b.pids()).unwrap_or_default();
        let up_pids = self.upstream.pids();
        let measured = !pids.is_empty();
        let cpu0 = cpu_seconds(&pids, self.tck);
        let up0 = cpu_seconds(&up_pids, self.tck);
        let br0 = cpu_seconds(&broker_pids, self.tck);
        if measured {
            reset_peak_rss(&pids);
        }
        let m0 = admin.map(scrape);
        let t0 = Instant::now();
        let load = oha(
            &self.oha,
            self.pin_rest,
            addr,
            &self.sizes[si].body,
            rate,
            seconds,
            self.cfg.connections,
            &self.work.join("oha.json"),
        );
        // Let the proxy finish what the run started (the tee's records to the spool and Kafka)
        // before its CPU is read, so that work is charged to this run and not the next.
        let mut drained = None;
        if kind.is_sluicegate() && phase != "outage-down" {
            drained = Some(wait_drained(
                admin.unwrap(),
                kind == Kind::Full,
                Duration::from_secs(20),
            ));
        } else {
            std::thread::sleep(Duration::from_millis(250));
        }
        let wall_s = t0.elapsed().as_secs_f64();
        let proxy_cpu_s = measured.then(|| cpu_seconds(&pids, self.tck) - cpu0);
        let peak = measured.then(|| peak_rss_kib(&pids));
        let (tee, lag_buckets) = match (admin, m0) {
            (Some(a), Some(m0)) => {
                let m1 = scrape(a);
                let d = TEE_COUNTERS
                    .iter()
                    .map(|n| (n.to_string(), m1.sum(n) - m0.sum(n)))
                    .collect::<BTreeMap<_, _>>();
                let lag = bucket_delta(
                    &buckets(&m0, "sluicegate_tee_lag_seconds"),
                    &buckets(&m1, "sluicegate_tee_lag_seconds"),
                );
                (Some(d), Some(lag))
            }
            _ => (None, None),
        };
        let cell = Cell {
            phase,
            round,
            size: self.sizes[si].name.clone(),
            rate,
            kind,
            load,
            wall_s,
            proxy_cpu_s,
            peak_rss_kib: peak,
            upstream_cpu_s: cpu_seconds(&up_pids, self.tck) - up0,
            broker_cpu_s: (!broker_pids.is_empty())
                .then(|| cpu_seconds(&broker_pids, self.tck) - br0),
            tee,
            lag_buckets,
            drained,
        };
        let n = self.cells.len() + 1;
        eprintln!(
            "[{n:>3}/{}] {phase:<13} r{round} {:>4} {:>6} {:<16} ok {:>6} fail {:>3} {:>7.0} req/s  p50 {:>6.0} p99 {:>7.0} p99.9 {:>7.0} µs  cpu {} rss {}",
            self.total_cells,
            self.sizes[si].name,
            rate.map_or("max".into(), |r| r.to_string()),
            kind.name(),
            cell.load.ok,
            cell.load.failed,
            cell.load.rps,
            cell.load.p[0],
            cell.load.p[2],
            cell.load.p[3],
            cell.cpu_ms_per_1k().map_or("-".into(), |c| format!("{c:.0} ms/1k")),
            cell.peak_rss_kib.map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
        );
        self.cells.push(cell.clone());
        cell
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn rotate<T: Copy>(v: &[T], by: usize) -> Vec<T> {
    (0..v.len()).map(|i| v[(i + by) % v.len()]).collect()
}

// ---------------------------------------------------------------------------------------------

pub(crate) fn main() {
    if let Ok(dirs) = std::env::var("E2E_COMBINE") {
        combine(&dirs);
        return;
    }
    let sluicegate = crate::build_sluicegate();
    let cfg = Cfg::from_env();
    let started = Instant::now();
    let started_at = std::time::SystemTime::now();
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pins = Pins::choose(&cfg, ncpu);
    let tools = Tools::find(&cfg, sluicegate);

    let work_dir = tempfile::Builder::new()
        .prefix("sluicegate-e2e-")
        .tempdir()
        .expect("tempdir");
    let work = work_dir.path().to_owned();
    eprintln!("e2e: work dir {}", work.display());

    let Lab {
        upstream,
        broker,
        mut front,
        broker_port,
        setups,
    } = Lab::start(&cfg, &tools, &pins, &work);
    let (sizes, answered) = check_sizes(&cfg, &setups, &work);
    let mut world = World {
        tck: clk_tck(),
        pin_rest: pins.rest,
        oha: tools.oha.clone(),
        work: work.clone(),
        setups,
        sizes,
        upstream,
        broker,
        cells: Vec::new(),
        total_cells: 0,
        cfg,
    };
    let kinds = world.kinds();

    // Phases 1 to 6 (the module's header).
    let fresh_rss = warm_up(&world);
    let rates = place_rates(&mut world);
    let outage_cells = if world.cfg.outage && world.has(Kind::Full) {
        10
    } else {
        0
    };
    rate_rounds(&mut world, &rates, outage_cells);
    let counter = Counter::new(&world, broker_port);
    let count_point = || counter.as_ref().map(Counter::count);
    let count1 = count_point();
    if let Some(c) = &count1 {
        eprintln!("e2e: records at the broker after the rate rounds: {c}");
    }
    let (outage, count2) = if outage_cells > 0 {
        kafka_outage(&mut world, front.as_mut().unwrap(), &count_point, &count1)
    } else {
        (Value::Null, None)
    };
    ceiling_rounds(&mut world);
    let count3 = count_point();
    let kafka = kafka_healthy(&count1, &count2, &count3);

    // Run-wide facts, then stop everything.
    let rss = rss_table(&world, &fresh_rss);
    let versions = tools.versions();
    for s in &mut world.setups {
        if let Some(p) = s.proc_.as_mut() {
            p.stop();
        }
    }
    world.upstream.stop();
    drop(front);
    if let Some(b) = world.broker.as_mut() {
        b.stop();
    }

    let cfg = &world.cfg;
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':').map(|x| x.1.trim().to_owned()))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let when = started_at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let sizes_json: Vec<Value> = world
        .sizes
        .iter()
        .map(|s| {
            json!({"name": s.name, "rows": s.rows, "request_bytes": s.request_bytes,
                   "response_bytes": s.response_bytes,
                   "response_bytes_by_setup": kinds.iter().map(|k| (k.name(), answered.get(&format!("{} {}", s.name, k.name())))).collect::<BTreeMap<_, _>>()})
        })
        .collect();
    let doc = json!({
        "schema": "sluicegate.bench.e2e.v1",
        "started_unix": when,
        "duration_s": started.elapsed().as_secs_f64(),
        "machine": {"cpus": ncpu, "cpu": cpu_model, "kernel": kernel.trim(), "pinned": pins.pinned,
                    "proxy_cpu": pins.proxy, "load_upstream_broker_cpu": pins.rest},
        "config": {"seconds": cfg.seconds, "rounds": cfg.rounds, "ceiling_seconds": cfg.ceiling_seconds,
                   "ceiling_rounds": cfg.ceiling_rounds, "warmup_seconds": cfg.warmup_seconds,
                   "connections": cfg.connections, "rates": world.sizes.iter().zip(&rates).map(|(s, r)| (s.name.clone(), r.clone())).collect::<BTreeMap<_, _>>()},
        "versions": versions,
        "setups": kinds.iter().map(|k| (k.name(), k.describe())).collect::<BTreeMap<_, _>>(),
        "sizes": sizes_json,
        "ceilings": ceiling_rows(&world, &kinds),
        "rows": rate_rows(&world, &rates, &kinds),
        "kafka_healthy": kafka,
        "kafka_outage": outage,
        "rss": rss,
        "cells": world.cells.iter().map(|c| c.to_json()).collect::<Vec<_>>(),
    });
    let mut doc = doc;
    doc["targets"] = targets(&doc);
    doc["cost_model"] = cost_model(&doc);

    let md = markdown(&doc);
    println!("\n{md}");
    std::fs::create_dir_all(&cfg.out).expect("results dir");
    std::fs::write(cfg.out.join("e2e.md"), &md).unwrap();
    std::fs::write(
        cfg.out.join("e2e.json"),
        serde_json::to_string_pretty(&doc).unwrap(),
    )
    .unwrap();
    std::fs::write(cfg.out.join("e2e.svg"), svg(&doc)).unwrap();
    println!(
        "written to {} (e2e.md, e2e.json, e2e.svg) in {:.0} s",
        cfg.out.display(),
        started.elapsed().as_secs_f64()
    );
    drop(work_dir);
}

// ---------------------------------------------------------------------------------------------
// Start-up: CPUs, tools, processes

/// Proxies on one CPU, everything else (the load, the upstream, the broker, this process) on
/// the other, when there are two and taskset.
struct Pins {
    pinned: bool,
    proxy: Option<&'static str>,
    rest: Option<&'static str>,
}

impl Pins {
    fn choose(cfg: &Cfg, ncpu: usize) -> Pins {
        let pin = cfg.pin && have_taskset() && ncpu >= 2;
        if cfg.pin && !pin {
            eprintln!("e2e: not pinning (needs taskset and 2 CPUs)");
        }
        let (proxy, rest) = if pin {
            (Some(PROXY_CPU), Some(REST_CPU))
        } else {
            (None, None)
        };
        if pin {
            // The bench itself (the Kafka front, the scrapes) stays off the proxies' CPU.
            let _ = Command::new("taskset")
                .args(["-a", "-p", "-c", REST_CPU, &std::process::id().to_string()])
                .stdout(Stdio::null())
                .status();
        }
        Pins {
            pinned: pin,
            proxy,
            rest,
        }
    }
}

/// The programs the run needs; a setup whose program is missing is left out.
struct Tools {
    sluicegate: PathBuf,
    oha: PathBuf,
    tansu: Option<PathBuf>,
    nginx: Option<PathBuf>,
    haproxy: Option<PathBuf>,
}

impl Tools {
    fn find(cfg: &Cfg, sluicegate: PathBuf) -> Tools {
        let oha =
            script_path("xtask/install-oha.sh", "E2E_OHA").unwrap_or_else(|e| panic!("oha: {e}"));
        let tansu = if cfg.wants(Kind::Full) {
            match script_path("tests/install-tansu.sh", "SLUICEGATE_TANSU_BIN") {
                Ok(p) => Some(p),
                Err(e) => {
                    eprintln!("e2e: SKIPPED sluicegate-full: no tansu broker ({e})");
                    None
                }
            }
        } else {
            None
        };
        let nginx = cfg
            .wants(Kind::Nginx)
            .then(|| debian_program("nginx", "nginx"))
            .flatten();
        let haproxy = cfg
            .wants(Kind::Haproxy)
            .then(|| debian_program("haproxy", "haproxy"))
            .flatten();
        Tools {
            sluicegate,
            oha,
            tansu,
            nginx,
            haproxy,
        }
    }

    fn versions(&self) -> Value {
        json!({
            "sluicegate": version_of(&self.sluicegate, "--version"),
            "oha": version_of(&self.oha, "--version"),
            "nginx": self.nginx.as_deref().map(|p| version_of(p, "-v")),
            "haproxy": self.haproxy.as_deref().map(|p| version_of(p, "-v")),
            "tansu": self.tansu.as_deref().map(|p| p.display().to_string()),
        })
    }
}

/// Every process of the run: the upstream, the broker behind its front, and the setups.
struct Lab {
    upstream: Proc,
    broker: Option<Proc>,
    front: Option<Front>,
    broker_port: u16,
    setups: Vec<Setup>,
}

impl Lab {
    fn start(cfg: &Cfg, tools: &Tools, pins: &Pins, work: &Path) -> Lab {
        // The upstream.
        let model = free_addr();
        let mut upstream = {
            let mut c = command(pins.rest, &tools.sluicegate);
            c.args(["stand-in", "--listen", &model.to_string()])
                .env("RUST_LOG", "warn");
            spawn("stand-in", c, &work.join("stand-in.log"))
        };
        wait_listening(
            model,
            "the stand-in model",
            Some(&mut upstream),
            &work.join("stand-in.log"),
        );

        let mut setups = vec![Setup {
            kind: Kind::Direct,
            addr: model,
            admin: None,
            proc_: None,
        }];

        // The broker and its front.
        let mut broker = None;
        let mut front = None;
        let mut broker_port = 0;
        if let Some(tansu) = &tools.tansu {
            let port = free_addr().port();
            let front_port = free_addr().port();
            let mut c = command(pins.rest, tansu);
            c.arg("broker")
                .args(["--listener-url", &format!("tcp://127.0.0.1:{port}")])
                .args([
                    "--advertised-listener-url",
                    &format!("tcp://127.0.0.1:{front_port}"),
                ])
                .args(["--storage-engine", "memory://tansu/"])
                .current_dir(work);
            let mut p = spawn("tansu", c, &work.join("tansu.log"));
            let a: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            wait_listening(a, "tansu", Some(&mut p), &work.join("tansu.log"));
            create_topic(tansu, port, TOPIC);
            create_topic(tansu, port, ALERTS_TOPIC);
            front = Some(Front::start(front_port, a));
            broker = Some(p);
            broker_port = front_port;
        }

        // sluicegate, twice.
        let sluicegate = |kind: Kind, extra: Vec<String>| {
            start_sluicegate(&tools.sluicegate, pins.proxy, model, work, kind, extra)
        };
        if tools.tansu.is_some() {
            let keys = work.join("tag-keys");
            let ok = Command::new(&tools.sluicegate)
                .args(["tag", "keygen", "--id", "bench", "--dir"])
                .arg(&keys)
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "sluicegate tag keygen failed");
            let policy = root().join("benches/e2e/policy.full.yaml");
            setups.push(sluicegate(
                Kind::Full,
                vec![
                    "--policy".into(),
                    policy.display().to_string(),
                    "--tag-keys-dir".into(),
                    keys.display().to_string(),
                    "--kafka-brokers".into(),
                    format!("127.0.0.1:{broker_port}"),
                    "--kafka-topic".into(),
                    TOPIC.into(),
                    "--kafka-alerts-topic".into(),
                    ALERTS_TOPIC.into(),
                    "--record-decisions".into(),
                    env_str("E2E_RECORD_DECISIONS", "columns"),
                ],
            ));
        }
        if cfg.wants(Kind::Tee) {
            setups.push(sluicegate(Kind::Tee, vec![]));
        }
        if let Some(nginx) = &tools.nginx {
            setups.push(start_nginx(nginx, pins.proxy, model, work));
        }
        if let Some(haproxy) = &tools.haproxy {
            setups.push(start_haproxy(haproxy, pins.proxy, model, work));
        }
        setups.sort_by_key(|s| s.kind);
        Lab {
            upstream,
            broker,
            front,
            broker_port,
            setups,
        }
    }
}

fn start_sluicegate(
    bin: &Path,
    pin: Option<&str>,
    model: SocketAddr,
    work: &Path,
    kind: Kind,
    extra: Vec<String>,
) -> Setup {
    let (listen, admin) = (free_addr(), free_addr());
    let spool = work.join(format!("spool-{}", kind.name()));
    let mut c = command(pin, bin);
    c.args(["serve", "--upstream", &format!("http://{model}")])
        .args(["--listen", &listen.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .arg("--spool-dir")
        .arg(&spool)
        .args(extra)
        .env("RUST_LOG", "warn");
    let log = work.join(format!("{}.log", kind.name()));
    let mut p = spawn(kind.name(), c, &log);
    wait_listening(listen, kind.name(), Some(&mut p), &log);
    wait_listening(admin, kind.name(), Some(&mut p), &log);
    Setup {
        kind,
        addr: listen,
        admin: Some(admin),
        proc_: Some(p),
    }
}

/// A config template with its @DIR@, @LISTEN@ and @UPSTREAM@ filled in.
fn fill(template: &str, listen: SocketAddr, dir: &Path, model: SocketAddr) -> String {
    template
        .replace("@DIR@", &dir.display().to_string())
        .replace("@LISTEN@", &listen.to_string())
        .replace("@UPSTREAM@", &model.to_string())
}

fn start_nginx(nginx: &Path, pin: Option<&str>, model: SocketAddr, work: &Path) -> Setup {
    let dir = work.join("nginx");
    std::fs::create_dir_all(&dir).unwrap();
    // The workers run as `nobody` when the master is root: let them in.
    let _ = Command::new("chmod").args(["0777"]).arg(&dir).status();
    let _ = Command::new("chmod").args(["0711"]).arg(work).status();
    let listen = free_addr();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        fill(include_str!("e2e/nginx.conf"), listen, &dir, model),
    )
    .unwrap();
    let mut c = command(pin, nginx);
    c.arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(&dir)
        .arg("-e")
        .arg(dir.join("nginx-error.log"));
    let log = work.join("nginx.log");
    let mut p = spawn("nginx", c, &log);
    wait_listening(listen, "nginx", Some(&mut p), &log);
    Setup {
        kind: Kind::Nginx,
        addr: listen,
        admin: None,
        proc_: Some(p),
    }
}

fn start_haproxy(haproxy: &Path, pin: Option<&str>, model: SocketAddr, work: &Path) -> Setup {
    let listen = free_addr();
    let conf = work.join("haproxy.cfg");
    std::fs::write(
        &conf,
        fill(include_str!("e2e/haproxy.cfg"), listen, work, model),
    )
    .unwrap();
    let mut c = command(pin, haproxy);
    c.arg("-f").arg(&conf).arg("-db");
    let log = work.join("haproxy.log");
    let mut p = spawn("haproxy", c, &log);
    wait_listening(listen, "haproxy", Some(&mut p), &log);
    Setup {
        kind: Kind::Haproxy,
        addr: listen,
        admin: None,
        proc_: Some(p),
    }
}

/// The sizes, and a check that every setup answers them (and that the full setup decides and
/// tags); with each setup's response length by "SIZE SETUP".
fn check_sizes(cfg: &Cfg, setups: &[Setup], work: &Path) -> (Vec<Size>, BTreeMap<String, usize>) {
    let mut sizes = Vec::new();
    for s in &cfg.sizes {
        let target = if s == "16k" { 16 << 10 } else { 1 << 10 };
        sizes.push(size_for(
            if s == "16k" { "16KiB" } else { "1KiB" },
            target,
            work,
        ));
    }
    let mut answered = BTreeMap::new();
    for size in &sizes {
        let body = std::fs::read(&size.body).unwrap();
        for s in setups {
            let r = http(s.addr, "POST", INFER_PATH, JSON, &body)
                .unwrap_or_else(|e| panic!("{} does not answer: {e}", s.kind.name()));
            assert_eq!(r.status, 200, "{}: status {}", s.kind.name(), r.status);
            let has = |h: &str| r.headers.iter().any(|(k, _)| k == h);
            if s.kind == Kind::Full {
                assert!(has("sluicegate-tag"), "the full setup must tag");
                assert!(has("sluicegate-rows"), "the full setup must decide");
            }
            if s.kind.is_sluicegate() {
                assert!(has("sluicegate-id"));
            }
            answered.insert(format!("{} {}", size.name, s.kind.name()), r.body.len());
        }
        eprintln!(
            "e2e: {}: {} rows, request {} B, response {} B (sluicegate-full adds the decisions: {} B)",
            size.name,
            size.rows,
            size.request_bytes,
            size.response_bytes,
            answered
                .get(&format!("{} sluicegate-full", size.name))
                .map_or("-".into(), |n| n.to_string())
        );
    }
    (sizes, answered)
}

// ---------------------------------------------------------------------------------------------
// The phases

/// Peak RSS (KiB) by size and setup after the warm-up.
type FreshRss = BTreeMap<String, BTreeMap<&'static str, u64>>;

/// Phase 1, the warm-up (excluded) at 1,000 req/s: connections, pools, page cache,
/// allocators. The proxies are fresh processes here, so their peak RSS after it is the peak
/// RSS of a process that has seen 1,000 req/s of ~1 KiB (and then of ~16 KiB) and nothing else.
fn warm_up(world: &World) -> FreshRss {
    let mut fresh_rss = FreshRss::new();
    for si in 0..world.sizes.len() {
        for k in world.kinds() {
            let s = world.setup(k);
            if world.cfg.warmup_seconds > 0 {
                oha(
                    &world.oha,
                    world.pin_rest,
                    s.addr,
                    &world.sizes[si].body,
                    Some(1000),
                    world.cfg.warmup_seconds,
                    world.cfg.connections,
                    &world.work.join("warmup.json"),
                );
            }
        }
        for s in &world.setups {
            if let Some(admin) = s.admin {
                wait_drained(admin, s.kind == Kind::Full, Duration::from_secs(30));
            }
        }
        std::thread::sleep(Duration::from_millis(250));
        for s in &world.setups {
            if !s.pids().is_empty() {
                fresh_rss
                    .entry(world.sizes[si].name.clone())
                    .or_default()
                    .insert(s.kind.name(), peak_rss_kib(&s.pids()));
            }
        }
    }
    fresh_rss
}

/// Phase 2, the direct ceiling (closed loop), and the rates it places: one list per size.
fn place_rates(world: &mut World) -> Vec<Vec<u32>> {
    let nsizes = world.sizes.len();
    let ceiling_rounds = world.cfg.ceiling_rounds.max(1);
    world.total_cells = ceiling_rounds * nsizes;
    for round in 1..=ceiling_rounds {
        for si in 0..nsizes {
            let secs = world.cfg.ceiling_seconds;
            world.run("direct-ceiling", round, si, Kind::Direct, None, secs);
        }
    }
    let mut rates: Vec<Vec<u32>> = Vec::new();
    for si in 0..nsizes {
        let name = world.sizes[si].name.clone();
        let given = if name == "16KiB" {
            world.cfg.rates_16k.clone()
        } else {
            world.cfg.rates_1k.clone()
        };
        let c = world
            .ceiling("direct-ceiling", &name, Kind::Direct)
            .unwrap_or(2000.0);
        let r = given.unwrap_or_else(|| {
            // Open loop, the direct setup keeps a stable tail up to about half its closed-loop
            // ceiling; past that the load generator and the upstream, sharing one core, queue
            // (and every proxied setup with them).
            let near = ((c * 0.45) / 100.0).floor() as u32 * 100;
            let base: &[u32] = if name == "16KiB" {
                &[1000]
            } else {
                &[1000, 5000]
            };
            let mut v: Vec<u32> = base
                .iter()
                .copied()
                .filter(|&r| (r as f64) < c * 0.3)
                .collect();
            if v.is_empty() {
                v.push((near / 2).max(100));
            }
            if near > *v.last().unwrap() {
                v.push(near);
            }
            v
        });
        eprintln!("e2e: {name}: direct ceiling {c:.0} req/s; rates {r:?}");
        rates.push(r);
    }
    rates
}

/// Phase 3, the fixed-rate rounds, interleaved: every round runs every rate and setup once, in
/// an order that rotates so that no setup always follows the same one.
fn rate_rounds(world: &mut World, rates: &[Vec<u32>], outage_cells: usize) {
    let kinds = world.kinds();
    let per_round: usize = rates.iter().map(|r| r.len()).sum::<usize>() * kinds.len();
    let ceiling_cells = world.cfg.ceiling_rounds * world.sizes.len() * kinds.len();
    world.total_cells =
        world.cells.len() + per_round * world.cfg.rounds + outage_cells + ceiling_cells;
    for round in 1..=world.cfg.rounds {
        for (si, size_rates) in rates.iter().enumerate() {
            for (ri, &rate) in size_rates.iter().enumerate() {
                for k in rotate(&kinds, round + ri + si) {
                    let secs = world.cfg.seconds;
                    world.run("rate", round, si, k, Some(rate), secs);
                }
            }
        }
    }
}

/// Phase 4, the records at the broker. tansu 0.6 makes the last batch it acknowledged readable
/// only once the next one arrives, so a count is taken after two marker requests, each
/// drained: every record up to the first marker is then readable, and `expected` counts them.
struct Counter {
    admin: SocketAddr,
    brokers: String,
    addr: SocketAddr,
    marker_body: Vec<u8>,
}

impl Counter {
    /// None without the full setup or a broker.
    fn new(world: &World, broker_port: u16) -> Option<Counter> {
        let brokers = world
            .broker
            .as_ref()
            .map(|_| format!("127.0.0.1:{broker_port}"));
        let full_admin = world
            .has(Kind::Full)
            .then(|| world.setup(Kind::Full).admin.unwrap());
        let marker_addr = world.has(Kind::Full).then(|| world.setup(Kind::Full).addr);
        let marker_body = std::fs::read(&world.sizes[0].body).unwrap();
        Some(Counter {
            admin: full_admin?,
            brokers: brokers?,
            addr: marker_addr?,
            marker_body,
        })
    }

    fn count(&self) -> Value {
        let (admin, brokers, addr) = (self.admin, &self.brokers, self.addr);
        let mut drained_ok = wait_drained(admin, true, Duration::from_secs(60));
        for _ in 0..2 {
            let _ = http(addr, "POST", INFER_PATH, JSON, &self.marker_body);
            drained_ok &= wait_drained(admin, true, Duration::from_secs(30));
        }
        let m = scrape(admin);
        // Records made = handed to the queue or dropped in front of it, less the alerts (which
        // go to their own topic).
        let made = m.sum("sluicegate_tee_records_queued_total")
            + m.sum("sluicegate_tee_records_dropped_queue_full_total")
            - m.sum("sluicegate_limit_alerts_total");
        let visible = topic_count(brokers, TOPIC);
        json!({
            "drained": drained_ok,
            "records_made": made,
            "records_in_topic": visible,
            // Readable must be every record but possibly the last marker's.
            "missing": visible.map(|v| (made - 1.0 - v as f64).max(0.0)),
            "requests_answered": m.sum("sluicegate_requests_total"),
            "records_queued": m.sum("sluicegate_tee_records_queued_total"),
            "records_spooled": m.sum("sluicegate_tee_records_spooled_total"),
            "records_sent": m.sum("sluicegate_tee_records_sent_total"),
            "records_dropped": dropped(&m),
            "records_dead_lettered": m.sum("sluicegate_tee_records_dead_lettered_total"),
            "delivery_retries": m.sum("sluicegate_tee_delivery_retries_total"),
            "producer_rebuilds": m.sum("sluicegate_tee_producer_rebuilds_total"),
            "alerts_emitted": m.sum("sluicegate_limit_alerts_total"),
            "alerts_in_topic": topic_count(brokers, ALERTS_TOPIC),
            "tee_lag_p99_s": bucket_quantile(&buckets(&m, "sluicegate_tee_lag_seconds"), 0.99),
        })
    }
}

/// Records a count found missing at the broker.
fn missing(c: &Option<Value>) -> Option<f64> {
    c.as_ref().and_then(|c| c["missing"].as_f64())
}

/// Phase 5, the Kafka outage: pairs (direct, full) at 1,000 req/s with ~1 KiB, two with the
/// broker reachable, then the broker cut off (its TCP front closed) for three pairs, then back.
/// The phase's figures, and the count at the broker after it.
fn kafka_outage(
    world: &mut World,
    front: &mut Front,
    count_point: &dyn Fn() -> Option<Value>,
    count1: &Option<Value>,
) -> (Value, Option<Value>) {
    let si = 0;
    let rate = 1000;
    let secs = world.cfg.seconds;
    let admin = world.setup(Kind::Full).admin.unwrap();
    let before = scrape(admin);
    for round in 1..=2 {
        for k in rotate(&[Kind::Direct, Kind::Full], round) {
            world.run("outage-up", round, si, k, Some(rate), secs);
        }
    }
    let cut_at = Instant::now();
    front.cut();
    let mut seen_down = false;
    for round in 1..=3 {
        for k in rotate(&[Kind::Direct, Kind::Full], round) {
            world.run("outage-down", round, si, k, Some(rate), secs);
        }
        seen_down |= scrape(admin).sum("sluicegate_tee_kafka_connected") == 0.0;
    }
    let outage_s = cut_at.elapsed().as_secs_f64();
    let during = scrape(admin);
    front.restore();
    let recovered_at = Instant::now();
    let drained_ok = wait_drained(admin, true, Duration::from_secs(120));
    let recovery_s = recovered_at.elapsed().as_secs_f64();
    let count2 = count_point();
    let after = scrape(admin);
    let cells_of = |phase: &str, k: Kind| -> Vec<Cell> {
        world
            .cells
            .iter()
            .filter(|c| c.phase == phase && c.kind == k)
            .cloned()
            .collect()
    };
    let pct = |phase: &str, k: Kind, i: usize| {
        median(cells_of(phase, k).iter().map(|c| c.load.p[i]).collect())
    };
    let added = |phase: &str, i: usize| {
        let d = cells_of(phase, Kind::Direct);
        let f = cells_of(phase, Kind::Full);
        median(
            f.iter()
                .filter_map(|fc| {
                    Some(fc.load.p[i] - d.iter().find(|dc| dc.round == fc.round)?.load.p[i])
                })
                .collect(),
        )
    };
    let (up, down) = (
        pct("outage-up", Kind::Full, 2),
        pct("outage-down", Kind::Full, 2),
    );
    let (dup, ddown) = (
        pct("outage-up", Kind::Direct, 2),
        pct("outage-down", Kind::Direct, 2),
    );
    let failed: u64 = world
        .cells
        .iter()
        .filter(|c| c.phase.starts_with("outage") && c.kind == Kind::Full)
        .map(|c| c.load.failed)
        .sum();
    let change = match (up, down) {
        (Some(u), Some(d)) if u > 0.0 => Some((d - u) / u),
        _ => None,
    };
    let norm_change = match (up, down, dup, ddown) {
        (Some(u), Some(d), Some(du), Some(dd)) if u > 0.0 && dd > 0.0 && du > 0.0 => {
            Some((d / dd) / (u / du) - 1.0)
        }
        _ => None,
    };
    // Records missing at the broker are cumulative: what went missing during the phase.
    let lost = missing(&count2).map(|b| (b - missing(count1).unwrap_or(0.0)).max(0.0));
    let made = match (count1, &count2) {
        (Some(a), Some(b)) => b["records_made"]
            .as_f64()
            .zip(a["records_made"].as_f64())
            .map(|(b, a)| b - a),
        _ => None,
    };
    let outage = json!({
        "rate": rate, "size": world.sizes[si].name, "outage_s": outage_s,
        "kafka_seen_down": seen_down,
        "failed_requests": failed,
        "p50_us_kafka_up": pct("outage-up", Kind::Full, 0), "p50_us_kafka_down": pct("outage-down", Kind::Full, 0),
        "p99_us_kafka_up": up, "p99_us_kafka_down": down,
        "p999_us_kafka_up": pct("outage-up", Kind::Full, 3), "p999_us_kafka_down": pct("outage-down", Kind::Full, 3),
        "direct_p99_us_kafka_up": dup, "direct_p99_us_kafka_down": ddown,
        "added_p99_us_kafka_up": added("outage-up", 2), "added_p99_us_kafka_down": added("outage-down", 2),
        "p99_change": change,
        "p99_change_relative_to_direct": norm_change,
        "spool_backlog_bytes_at_end_of_outage": during.sum("sluicegate_tee_spool_bytes"),
        "sent_during_outage_phase": during.sum("sluicegate_tee_records_sent_total") - before.sum("sluicegate_tee_records_sent_total"),
        "recovered": drained_ok, "recovery_s": recovery_s,
        "records_made": made,
        "records_lost": lost,
        "records_dropped": dropped(&after) - dropped(&before),
        "delivery_retries": after.sum("sluicegate_tee_delivery_retries_total") - before.sum("sluicegate_tee_delivery_retries_total"),
        "producer_rebuilds": after.sum("sluicegate_tee_producer_rebuilds_total") - before.sum("sluicegate_tee_producer_rebuilds_total"),
    });
    eprintln!("e2e: outage: {outage}");
    (outage, count2)
}

/// Phase 6, the ceilings: closed loop, every setup, interleaved (last: they leave the proxies'
/// memory and the broker at their worst).
fn ceiling_rounds(world: &mut World) {
    let kinds = world.kinds();
    for round in 1..=world.cfg.ceiling_rounds {
        for si in 0..world.sizes.len() {
            for k in rotate(&kinds, round + si) {
                let secs = world.cfg.ceiling_seconds;
                world.run("ceiling", round, si, k, None, secs);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Aggregates

/// Kafka healthy: everything but the outage phase (Null without a count at the broker).
fn kafka_healthy(count1: &Option<Value>, count2: &Option<Value>, count3: &Option<Value>) -> Value {
    let (Some(c1), Some(c3)) = (count1, count3) else {
        return Value::Null;
    };
    // Missing at the broker before the outage, and missing anew after it (ceilings).
    let lost_a = missing(count1);
    let lost_b = missing(count3).map(|m| (m - missing(count2).or(lost_a).unwrap_or(0.0)).max(0.0));
    let made = c3["records_made"].as_f64().unwrap_or(0.0)
        - count2.as_ref().map_or(0.0, |c2| {
            c2["records_made"].as_f64().unwrap_or(0.0) - c1["records_made"].as_f64().unwrap_or(0.0)
        });
    let kafka = json!({
        "records_made": made,
        "records_lost": lost_a.zip(lost_b).map(|(a, b)| a + b),
        "records_lost_before_outage": lost_a,
        "records_lost_after_outage": lost_b,
        "records_missing_at_end": missing(count3),
        "after_rate_rounds": c1,
        "after_outage": count2,
        "at_end": c3,
    });
    eprintln!("e2e: Kafka healthy: {kafka}");
    kafka
}

/// Every measured setup's RSS: fresh after the warm-up, at 1,000 req/s, its peak, at the end.
fn rss_table(world: &World, fresh_rss: &FreshRss) -> BTreeMap<&'static str, Value> {
    let mut rss_table: BTreeMap<&'static str, Value> = BTreeMap::new();
    for s in &world.setups {
        if s.pids().is_empty() {
            continue;
        }
        let k = s.kind;
        let cell_peak = world
            .cells
            .iter()
            .filter(|c| c.kind == k)
            .filter_map(|c| c.peak_rss_kib)
            .max()
            .unwrap_or(0);
        let fresh = |size: &str| fresh_rss.get(size).and_then(|m| m.get(k.name())).copied();
        let run_peak = cell_peak
            .max(fresh("1KiB").unwrap_or(0))
            .max(fresh("16KiB").unwrap_or(0));
        let at_1000: Option<u64> = world
            .cells
            .iter()
            .filter(|c| c.kind == k && c.phase == "rate" && c.rate == Some(1000))
            .filter_map(|c| c.peak_rss_kib)
            .max();
        let now: u64 = s
            .pids()
            .iter()
            .map(|&p| status_kib(p, "VmRSS:"))
            .max()
            .unwrap_or(0);
        rss_table.insert(
            k.name(),
            json!({
                "fresh_after_1kib_at_1000_mib": fresh("1KiB").map(|x| x as f64 / 1024.0),
                "fresh_after_16kib_at_1000_mib": fresh("16KiB").map(|x| x as f64 / 1024.0),
                "rate_rounds_at_1000_mib": at_1000.map(|x| x as f64 / 1024.0),
                "run_peak_mib": run_peak as f64 / 1024.0,
                "at_end_mib": now as f64 / 1024.0,
            }),
        );
    }
    rss_table
}

/// The rate rounds' medians per size, rate and setup.
fn rate_rows(world: &World, rates: &[Vec<u32>], kinds: &[Kind]) -> Vec<Value> {
    let cells = &world.cells;
    let sel = |size: &str, rate: u32, k: Kind| -> Vec<&Cell> {
        cells
            .iter()
            .filter(|c| c.phase == "rate" && c.size == size && c.rate == Some(rate) && c.kind == k)
            .collect()
    };
    let mut rows = Vec::new();
    for (si, size) in world.sizes.iter().enumerate() {
        for &rate in &rates[si] {
            for &k in kinds {
                let cs = sel(&size.name, rate, k);
                let direct = sel(&size.name, rate, Kind::Direct);
                let pct: Vec<Option<f64>> = (0..4)
                    .map(|i| median(cs.iter().map(|c| c.load.p[i]).collect()))
                    .collect();
                let added: Vec<Option<f64>> = (0..4)
                    .map(|i| {
                        median(
                            cs.iter()
                                .filter_map(|c| {
                                    Some(
                                        c.load.p[i]
                                            - direct.iter().find(|d| d.round == c.round)?.load.p[i],
                                    )
                                })
                                .collect(),
                        )
                    })
                    .collect();
                let cpu = median(cs.iter().filter_map(|c| c.cpu_ms_per_1k()).collect());
                let up_cpu = median(
                    cs.iter()
                        .filter(|c| c.load.ok > 0)
                        .map(|c| c.upstream_cpu_s * 1e6 / c.load.ok as f64)
                        .collect(),
                );
                let rss = cs.iter().filter_map(|c| c.peak_rss_kib).max();
                let broker_cpu = median(
                    cs.iter()
                        .filter(|c| c.load.ok > 0)
                        .filter_map(|c| Some(c.broker_cpu_s? * 1e6 / c.load.ok as f64))
                        .collect(),
                );
                let ok: u64 = cs.iter().map(|c| c.load.ok).sum();
                let failed: u64 = cs.iter().map(|c| c.load.failed).sum();
                let achieved = median(cs.iter().map(|c| c.load.rps).collect());
                let tee = k.is_sluicegate().then(|| {
                    let mut sum: BTreeMap<String, f64> = BTreeMap::new();
                    let mut lag: Vec<(f64, f64)> = Vec::new();
                    for c in &cs {
                        for (n, v) in c.tee.iter().flatten() {
                            *sum.entry(n.clone()).or_default() += v;
                        }
                        for (i, &(le, n)) in c.lag_buckets.iter().flatten().enumerate() {
                            if lag.len() <= i {
                                lag.push((le, 0.0));
                            }
                            lag[i].1 += n;
                        }
                    }
                    let g = |n: &str| sum.get(n).copied().unwrap_or(0.0);
                    json!({
                        "requests": g("sluicegate_requests_total"),
                        "queued": g("sluicegate_tee_records_queued_total"),
                        "spooled": g("sluicegate_tee_records_spooled_total"),
                        "sent": g("sluicegate_tee_records_sent_total"),
                        "dropped": g("sluicegate_tee_records_dropped_queue_full_total") + g("sluicegate_tee_records_dropped_spool_error_total") + g("sluicegate_tee_records_dropped_spool_full_total"),
                        "dead_lettered": g("sluicegate_tee_records_dead_lettered_total"),
                        "alerts": g("sluicegate_limit_alerts_total"),
                        "lag_p99_s": if k == Kind::Full { bucket_quantile(&lag, 0.99) } else { None },
                        "all_drained": cs.iter().all(|c| c.drained != Some(false)),
                    })
                });
                rows.push(json!({
                    "size": size.name, "rate": rate, "setup": k.name(), "rounds": cs.len(),
                    "achieved_rps": achieved,
                    "p50_us": pct[0], "p90_us": pct[1], "p99_us": pct[2], "p999_us": pct[3],
                    "added_p50_us": if k == Kind::Direct { None } else { added[0] },
                    "added_p90_us": if k == Kind::Direct { None } else { added[1] },
                    "added_p99_us": if k == Kind::Direct { None } else { added[2] },
                    "added_p999_us": if k == Kind::Direct { None } else { added[3] },
                    "ok": ok, "failed": failed,
                    "proxy_cpu_ms_per_1k": cpu, "upstream_cpu_ms_per_1k": up_cpu,
                    "proxy_peak_rss_mib": rss.map(|r| r as f64 / 1024.0),
                    "broker_cpu_ms_per_1k": if k == Kind::Full { broker_cpu } else { None },
                    "tee": tee,
                }));
            }
        }
    }
    rows
}

/// The closed-loop ceilings per size and setup.
fn ceiling_rows(world: &World, kinds: &[Kind]) -> Vec<Value> {
    let mut ceilings = Vec::new();
    for size in &world.sizes {
        let direct = world.ceiling("ceiling", &size.name, Kind::Direct);
        for &k in kinds {
            let cs: Vec<&Cell> = world
                .cells
                .iter()
                .filter(|c| c.phase == "ceiling" && c.size == size.name && c.kind == k)
                .collect();
            let c = world.ceiling("ceiling", &size.name, k);
            let util = median(
                cs.iter()
                    .filter_map(|c| c.proxy_cpu_s.map(|s| s / c.wall_s.max(1e-9)))
                    .collect(),
            );
            ceilings.push(json!({
                "size": size.name, "setup": k.name(), "rps": c,
                "of_direct": match (c, direct) { (Some(c), Some(d)) if d > 0.0 => Some(c / d), _ => None },
                "proxy_cpu_utilization": util,
                "failed": cs.iter().map(|c| c.load.failed).sum::<u64>(),
            }));
        }
    }

    ceilings
}

// ---------------------------------------------------------------------------------------------
// Reports

fn fmt_opt(v: &Value, digits: usize, signed: bool) -> String {
    match v.as_f64() {
        Some(x) if signed => format!("{x:+.digits$}"),
        Some(x) => format!("{x:.digits$}"),
        None => "–".into(),
    }
}

fn markdown(doc: &Value) -> String {
    let mut md = String::new();
    let cfg = &doc["config"];
    let m = &doc["machine"];
    let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
    let pctf = |v: &Value| {
        v.as_f64()
            .map_or("–".into(), |x| format!("{:+.1}%", x * 100.0))
    };
    md.push_str(&format!(
        "# sluicegate end-to-end benchmark\n\n{} CPUs ({}), Linux {}; proxies pinned to CPU {}; load (oha), upstream (stand-in model) and broker (tansu) pinned to CPU {}. \
{} interleaved rounds of {} s per setup and rate, {} connections, HTTP/1.1 keep-alive, latency corrected for coordinated omission (`oha -q RATE --latency-correction`). \
Percentiles are medians over rounds; *added* latency is paired (setup minus direct in the same round, then the median over rounds). Run took {:.0} s.\n\n",
        m["cpus"], s(&m["cpu"]), s(&m["kernel"]),
        m["proxy_cpu"].as_str().unwrap_or("-"), m["load_upstream_broker_cpu"].as_str().unwrap_or("-"),
        cfg["rounds"], cfg["seconds"], cfg["connections"], doc["duration_s"].as_f64().unwrap_or(0.0)
    ));
    md.push_str("Setups:\n");
    for (k, v) in doc["setups"].as_object().into_iter().flatten() {
        md.push_str(&format!("- `{k}`: {}\n", s(v)));
    }
    md.push_str("\nBodies (v2 JSON from `sluicegate::demo::v2_request`):\n");
    for z in doc["sizes"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "- {}: {} rows, request {} B, response {} B from the model ({} B through sluicegate-full, which adds the decisions to the body)\n",
            s(&z["name"]), z["rows"], z["request_bytes"], z["response_bytes"],
            z["response_bytes_by_setup"]["sluicegate-full"]
        ));
    }
    for z in doc["sizes"].as_array().into_iter().flatten() {
        let size = s(&z["name"]);
        md.push_str(&format!(
            "\n## {size} responses: latency (µs) and proxy CPU\n\n| rate (req/s) | setup | achieved req/s | p50 | p90 | p99 | p99.9 | added p50 | added p90 | added p99 | added p99.9 | failed | proxy CPU ms / 1k req |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        ));
        for r in doc["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["size"] == size.as_str())
        {
            let bold = r["setup"] == "sluicegate-full";
            let b = |x: String| {
                if bold && x != "–" {
                    format!("**{x}**")
                } else {
                    x
                }
            };
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r["rate"],
                s(&r["setup"]),
                fmt_opt(&r["achieved_rps"], 0, false),
                fmt_opt(&r["p50_us"], 0, false),
                fmt_opt(&r["p90_us"], 0, false),
                fmt_opt(&r["p99_us"], 0, false),
                fmt_opt(&r["p999_us"], 0, false),
                b(fmt_opt(&r["added_p50_us"], 0, true)),
                b(fmt_opt(&r["added_p90_us"], 0, true)),
                b(fmt_opt(&r["added_p99_us"], 0, true)),
                b(fmt_opt(&r["added_p999_us"], 0, true)),
                r["failed"],
                b(fmt_opt(&r["proxy_cpu_ms_per_1k"], 1, false)),
            ));
        }
    }
    md.push_str("\n## Throughput ceiling (closed loop, same connections; the load and the upstream share CPU 1)\n\n| size | setup | req/s | of direct | proxy CPU busy |\n|---|---|---:|---:|---:|\n");
    for c in doc["ceilings"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            s(&c["size"]),
            s(&c["setup"]),
            fmt_opt(&c["rps"], 0, false),
            c["of_direct"]
                .as_f64()
                .map_or("–".into(), |x| format!("{:.0}%", x * 100.0)),
            c["proxy_cpu_utilization"]
                .as_f64()
                .map_or("–".into(), |x| format!("{:.0}%", x * 100.0)),
        ));
    }
    md.push_str("\n## Peak RSS of the proxy (MiB; VmHWM; nginx: its worker)\n\n| setup | fresh, after 1 KiB at 1,000 req/s | then after 16 KiB at 1,000 req/s | during the 1,000 req/s rounds | whole run (ceilings included) | at the end (VmRSS) |\n|---|---:|---:|---:|---:|---:|\n");
    for (k, r) in doc["rss"].as_object().into_iter().flatten() {
        md.push_str(&format!(
            "| {k} | {} | {} | {} | {} | {} |\n",
            fmt_opt(&r["fresh_after_1kib_at_1000_mib"], 1, false),
            fmt_opt(&r["fresh_after_16kib_at_1000_mib"], 1, false),
            fmt_opt(&r["rate_rounds_at_1000_mib"], 1, false),
            fmt_opt(&r["run_peak_mib"], 1, false),
            fmt_opt(&r["at_end_mib"], 1, false),
        ));
    }
    md.push_str("\n## The tee (sums over rounds)\n\n| size | rate | setup | requests | records queued | spooled | acknowledged by Kafka | dropped | tee lag p99 | broker CPU ms / 1k |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in doc["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| !r["tee"].is_null())
    {
        let t = &r["tee"];
        let full = r["setup"] == "sluicegate-full";
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            s(&r["size"]),
            r["rate"],
            s(&r["setup"]),
            fmt_opt(&t["requests"], 0, false),
            fmt_opt(&t["queued"], 0, false),
            fmt_opt(&t["spooled"], 0, false),
            if full {
                fmt_opt(&t["sent"], 0, false)
            } else {
                "– (spool sink)".into()
            },
            fmt_opt(&t["dropped"], 0, false),
            t["lag_p99_s"]
                .as_f64()
                .map_or("–".into(), |x| format!("{:.1} ms", x * 1e3)),
            if full {
                fmt_opt(&r["broker_cpu_ms_per_1k"], 1, false)
            } else {
                "–".into()
            },
        ));
    }
    let k = &doc["kafka_healthy"];
    if !k.is_null() {
        let end = &k["at_end"];
        md.push_str(&format!(
            "\nRecords counted at the broker (sluicegate-full, Kafka healthy: warm-up, rate rounds and ceilings): {} made, {} lost; \
over the whole run {} dropped, {} dead-lettered, {} delivery retries; {} limit alerts emitted, {} on the alerts topic (tansu makes the last batch of a topic readable only after the next one). \
Tee lag p99 over the warm-up and the rate rounds: {}.\n",
            fmt_opt(&k["records_made"], 0, false),
            fmt_opt(&k["records_lost"], 0, false),
            fmt_opt(&end["records_dropped"], 0, false),
            fmt_opt(&end["records_dead_lettered"], 0, false),
            fmt_opt(&end["delivery_retries"], 0, false),
            fmt_opt(&end["alerts_emitted"], 0, false),
            fmt_opt(&end["alerts_in_topic"], 0, false),
            k["after_rate_rounds"]["tee_lag_p99_s"]
                .as_f64()
                .map_or("–".into(), |x| format!("{:.0} ms", x * 1e3)),
        ));
    }
    let o = &doc["kafka_outage"];
    if !o.is_null() {
        md.push_str(&format!(
            "\n## Kafka outage ({} req/s, {}; the broker cut off for {:.0} s)\n\n| sluicegate-full | Kafka up | Kafka down | change |\n|---|---:|---:|---:|\n\
| p50 µs | {} | {} | |\n| p99 µs | {} | {} | {} |\n| p99.9 µs | {} | {} | |\n| added p99 µs (paired with direct) | {} | {} | |\n\n\
Direct p99 in the same windows: {} and {} µs (p99 change relative to direct: {}). Failed requests: {}. After the broker came back, the backlog drained in {:.1} s: {} records made during the phase, {} lost; {} delivery retries, {} producer rebuilds.\n",
            o["rate"], s(&o["size"]), o["outage_s"].as_f64().unwrap_or(0.0),
            fmt_opt(&o["p50_us_kafka_up"], 0, false), fmt_opt(&o["p50_us_kafka_down"], 0, false),
            fmt_opt(&o["p99_us_kafka_up"], 0, false), fmt_opt(&o["p99_us_kafka_down"], 0, false), pctf(&o["p99_change"]),
            fmt_opt(&o["p999_us_kafka_up"], 0, false), fmt_opt(&o["p999_us_kafka_down"], 0, false),
            fmt_opt(&o["added_p99_us_kafka_up"], 0, true), fmt_opt(&o["added_p99_us_kafka_down"], 0, true),
            fmt_opt(&o["direct_p99_us_kafka_up"], 0, false), fmt_opt(&o["direct_p99_us_kafka_down"], 0, false),
            pctf(&o["p99_change_relative_to_direct"]),
            o["failed_requests"], o["recovery_s"].as_f64().unwrap_or(0.0),
            fmt_opt(&o["records_made"], 0, false), fmt_opt(&o["records_lost"], 0, false),
            fmt_opt(&o["delivery_retries"], 0, false), fmt_opt(&o["producer_rebuilds"], 0, false),
        ));
    }
    md.push_str("\n## Targets (this run)\n\n");
    md.push_str(&targets_table(&[doc]));
    md.push_str(&cost_model_text(&doc["cost_model"]));
    md
}

/// `E2E_COMBINE=dir1,dir2,dir3`: the targets of several runs' `e2e.json`, as medians with
/// their range, written to `E2E_OUT` as `e2e-runs.md`.
fn combine(dirs: &str) {
    let docs: Vec<Value> = dirs
        .split(',')
        .map(|d| {
            let path = Path::new(d.trim()).join("e2e.json");
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let mut doc: Value = serde_json::from_str(&text).expect("e2e.json");
            // Runs written before the targets were computed this way get them now.
            doc["targets"] = targets(&doc);
            doc["cost_model"] = cost_model(&doc);
            doc
        })
        .collect();
    let refs: Vec<&Value> = docs.iter().collect();
    let mut md = format!(
        "# sluicegate end-to-end benchmark: {} runs\n\nTargets as the median of the runs, with their range.\n\n",
        docs.len()
    );
    md.push_str(&targets_table(&refs));
    md.push_str("\nCost model of each run (µs of proxy CPU per request):\n\n| run | base | per KiB | per decided row | deciding and signing |\n|---|---:|---:|---:|---:|\n");
    for (d, doc) in dirs.split(',').zip(&docs) {
        let m = &doc["cost_model"];
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            d.trim(),
            fmt_opt(&m["base_us"], 0, false),
            fmt_opt(&m["per_kib_us"], 1, false),
            fmt_opt(&m["per_decided_row_us"], 2, false),
            fmt_opt(&m["deciding_fixed_us"], 0, false)
        ));
    }
    println!("{md}");
    let out = PathBuf::from(env_str("E2E_OUT", "bench-results"));
    std::fs::create_dir_all(&out).expect("results dir");
    std::fs::write(out.join("e2e-runs.md"), md).unwrap();
}

/// A run's aggregated row for one size, rate and setup.
fn rate_row<'d>(doc: &'d Value, size: &str, rate: u64, k: Kind) -> Option<&'d Value> {
    doc["rows"]
        .as_array()?
        .iter()
        .find(|r| r["size"] == size && r["rate"].as_u64() == Some(rate) && r["setup"] == k.name())
}

/// The hot-path targets, each a figure of this run against its bound.
fn targets(doc: &Value) -> Value {
    let row = |size: &str, rate: u64, k: Kind| rate_row(doc, size, rate, k);
    let num = |v: Option<&Value>, key: &str| v.and_then(|r| r[key].as_f64());
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b.max(1e-9));
    let cpu = |size: &str, rate: u64, k: Kind| num(row(size, rate, k), "proxy_cpu_ms_per_1k");
    let ceiling = |size: &str, k: Kind| -> Option<f64> {
        doc["ceilings"]
            .as_array()?
            .iter()
            .find(|c| c["size"] == size && c["setup"] == k.name())?["rps"]
            .as_f64()
    };
    let rss = |key: &str| doc["rss"][Kind::Full.name()][key].as_f64();
    let full_16k_fast = row("16KiB", 2900, Kind::Full);
    let target = |name: &str, value: Option<f64>, unit: &str, bound: f64, at_most: bool| {
        json!({"name": name, "value": value, "unit": unit, "bound": bound, "at_most": at_most,
               "met": value.map(|v| if at_most { v <= bound } else { v >= bound })})
    };
    let added_p99 = |k: Kind| num(row("1KiB", 1000, k), "added_p99_us");
    Value::Array(vec![
        target(
            "1KiB at 1,000 req/s: sluicegate-full CPU per request, × nginx's",
            ratio(
                cpu("1KiB", 1000, Kind::Full),
                cpu("1KiB", 1000, Kind::Nginx),
            ),
            "×",
            2.0,
            true,
        ),
        target(
            "1KiB at 1,000 req/s: sluicegate-tee CPU per request, × nginx's",
            ratio(cpu("1KiB", 1000, Kind::Tee), cpu("1KiB", 1000, Kind::Nginx)),
            "×",
            1.3,
            true,
        ),
        target(
            "1KiB at 1,000 req/s: sluicegate-full added p99 minus nginx's",
            added_p99(Kind::Full)
                .zip(added_p99(Kind::Nginx))
                .map(|(a, b)| a - b),
            "µs",
            300.0,
            true,
        ),
        target(
            "16KiB at 1,000 req/s: sluicegate-full CPU per request, × nginx's",
            ratio(
                cpu("16KiB", 1000, Kind::Full),
                cpu("16KiB", 1000, Kind::Nginx),
            ),
            "×",
            3.0,
            true,
        ),
        target(
            "16KiB at 2,900 req/s: sluicegate-full p99",
            num(full_16k_fast, "p99_us"),
            "µs",
            10_000.0,
            true,
        ),
        target(
            "16KiB at 2,900 req/s: sluicegate-full failed requests",
            num(full_16k_fast, "failed"),
            "",
            0.0,
            true,
        ),
        target(
            "16KiB at 2,900 req/s: sluicegate-full records dropped from the queue",
            full_16k_fast.and_then(|r| r["tee"]["dropped"].as_f64()),
            "",
            0.0,
            true,
        ),
        target(
            "closed-loop ceiling, 1KiB: sluicegate-full, × nginx's",
            ratio(ceiling("1KiB", Kind::Full), ceiling("1KiB", Kind::Nginx)),
            "×",
            0.60,
            false,
        ),
        target(
            "closed-loop ceiling, 16KiB: sluicegate-full, × nginx's",
            ratio(ceiling("16KiB", Kind::Full), ceiling("16KiB", Kind::Nginx)),
            "×",
            0.40,
            false,
        ),
        target(
            "peak RSS, fresh sluicegate-full after 1KiB at 1,000 req/s",
            rss("fresh_after_1kib_at_1000_mib"),
            "MiB",
            32.0,
            true,
        ),
        target(
            "peak RSS, fresh sluicegate-full after 16KiB at 1,000 req/s",
            rss("fresh_after_16kib_at_1000_mib"),
            "MiB",
            32.0,
            true,
        ),
        target(
            "records lost while Kafka is healthy (counted at the broker)",
            doc["kafka_healthy"]["records_lost"].as_f64(),
            "",
            0.0,
            true,
        ),
        target(
            "records lost after the Kafka outage",
            doc["kafka_outage"]["records_lost"].as_f64(),
            "",
            0.0,
            true,
        ),
    ])
}

/// The targets of one or more runs: one run's figures, or the median of several with their
/// range (p99 and ceilings move run to run on a shared machine).
fn targets_table(docs: &[&Value]) -> String {
    let several = docs.len() > 1;
    let mut md = String::from(if several {
        "| target | bound | median (min – max) | met by the median |\n|---|---:|---:|---|\n"
    } else {
        "| target | bound | measured | met |\n|---|---:|---:|---|\n"
    });
    let Some(first) = docs.first().and_then(|d| d["targets"].as_array()) else {
        return md;
    };
    for (i, t) in first.iter().enumerate() {
        let mut values: Vec<f64> = docs
            .iter()
            .filter_map(|d| d["targets"][i]["value"].as_f64())
            .collect();
        values.sort_by(f64::total_cmp);
        let unit = t["unit"].as_str().unwrap_or("");
        let digits = if unit == "×" { 2 } else { 0 };
        let show = |x: f64| match unit {
            "×" | "" => format!("{x:.digits$}{unit}"),
            _ => format!("{x:.digits$} {unit}"),
        };
        let median = (!values.is_empty()).then(|| values[values.len() / 2]);
        let bound = t["bound"].as_f64().unwrap_or(0.0);
        let at_most = t["at_most"].as_bool().unwrap_or(true);
        let met = match median {
            Some(v) if (at_most && v <= bound) || (!at_most && v >= bound) => "yes",
            Some(_) => "**no**",
            None => "not measured",
        };
        let measured = match (median, values.first(), values.last()) {
            (Some(m), Some(lo), Some(hi)) if several => {
                format!("{} ({} – {})", show(m), show(*lo), show(*hi))
            }
            (Some(m), _, _) => show(m),
            _ => "–".into(),
        };
        md.push_str(&format!(
            "| {} | {} {} | {measured} | {met} |\n",
            t["name"].as_str().unwrap_or(""),
            if at_most { "≤" } else { "≥" },
            show(bound).trim(),
        ));
    }
    md
}

/// CPU per request ≈ base + per KiB of body + per decided row (+ the decision's fixed cost,
/// the Ed25519 signature in it), fitted to this run's figures at 1,000 req/s: sluicegate-tee
/// at the two sizes gives the base and the cost per KiB; what sluicegate-full adds on top, at
/// the two row counts, gives the cost per decided row and the fixed cost of deciding.
fn cost_model(doc: &Value) -> Value {
    let cpu = |size: &str, k: Kind| rate_row(doc, size, 1000, k)?["proxy_cpu_ms_per_1k"].as_f64();
    let size = |name: &str| -> Option<(f64, f64)> {
        let z = doc["sizes"]
            .as_array()?
            .iter()
            .find(|z| z["name"] == name)?;
        let kib = (z["request_bytes"].as_f64()? + z["response_bytes"].as_f64()?) / 1024.0;
        Some((kib, z["rows"].as_f64()?))
    };
    let fit = || -> Option<Value> {
        let ((kib1, rows1), (kib16, rows16)) = (size("1KiB")?, size("16KiB")?);
        let (tee1, tee16) = (cpu("1KiB", Kind::Tee)?, cpu("16KiB", Kind::Tee)?);
        let (full1, full16) = (cpu("1KiB", Kind::Full)?, cpu("16KiB", Kind::Full)?);
        let per_kib = (tee16 - tee1) / (kib16 - kib1);
        let base = tee1 - per_kib * kib1;
        let per_row = ((full16 - tee16) - (full1 - tee1)) / (rows16 - rows1);
        let decided = (full1 - tee1) - per_row * rows1;
        Some(
            json!({"base_us": base, "per_kib_us": per_kib, "per_decided_row_us": per_row,
                    "deciding_fixed_us": decided}),
        )
    };
    fit().unwrap_or(Value::Null)
}

fn cost_model_text(m: &Value) -> String {
    if m.is_null() {
        return String::new();
    }
    let f = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
    format!(
        "\nCost model (this run, µs of proxy CPU per request, fitted at 1,000 req/s): **{:.0} + {:.1} per KiB of request and response body + {:.2} per decided row + {:.0} for deciding and signing** (the last two on deciding routes only; they include the Kafka producer's work for the decided record, and the Ed25519 signature, ~20 µs in `cargo bench --bench components -- tag_sign`).\n",
        f("base_us"), f("per_kib_us"), f("per_decided_row_us"), f("deciding_fixed_us")
    )
}

/// Latency percentiles per setup: one panel per size and rate, percentiles on x, µs on a log
/// axis, one line per setup.
fn svg(doc: &Value) -> String {
    let rows: Vec<&Value> = doc["rows"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let mut panels: Vec<(String, u64)> = Vec::new();
    for r in &rows {
        let key = (
            r["size"].as_str().unwrap_or("").to_owned(),
            r["rate"].as_u64().unwrap_or(0),
        );
        if !panels.contains(&key) {
            panels.push(key);
        }
    }
    let setups: Vec<String> = {
        let mut seen = BTreeSet::new();
        let mut v = Vec::new();
        for k in ALL_KINDS {
            if rows.iter().any(|r| r["setup"] == k.name()) && seen.insert(k.name()) {
                v.push(k.name().to_owned());
            }
        }
        v
    };
    let color = |name: &str| {
        ALL_KINDS
            .iter()
            .find(|k| k.name() == name)
            .map_or("#000", |k| k.color())
    };
    // Each panel has its own log range (overloaded runs reach seconds).
    let range = |size: &str, rate: u64| {
        let vals: Vec<f64> = rows
            .iter()
            .filter(|r| r["size"] == size && r["rate"] == rate)
            .flat_map(|r| {
                ["p50_us", "p90_us", "p99_us", "p999_us"].map(|k| r[k].as_f64().unwrap_or(f64::NAN))
            })
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        let lo = vals.iter().copied().fold(f64::INFINITY, f64::min).max(1.0);
        let hi = vals.iter().copied().fold(0.0, f64::max).max(lo * 10.0);
        (
            10f64.powf(lo.log10().floor()),
            10f64.powf(hi.log10().ceil()),
        )
    };
    let size_names: Vec<String> = {
        let mut v: Vec<String> = Vec::new();
        for (z, _) in &panels {
            if !v.contains(z) {
                v.push(z.clone());
            }
        }
        v
    };
    let place = |pi: usize| -> (usize, usize) {
        let (z, _) = &panels[pi];
        let row = size_names.iter().position(|n| n == z).unwrap_or(0);
        let col = panels[..pi].iter().filter(|(y, _)| y == z).count();
        (row, col)
    };
    let cols = (0..panels.len()).map(|i| place(i).1 + 1).max().unwrap_or(1);
    let (pw, ph) = (300.0, 240.0);
    let (ml, mt, mb) = (60.0, 40.0, 40.0);
    let nrows = size_names.len().max(1);
    let width = cols as f64 * (pw + ml) + 20.0;
    let height = 60.0 + nrows as f64 * (ph + mt + mb) + 30.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{:.0}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">sluicegate end-to-end: latency percentiles per setup (log scale; median over {} rounds)</text>\n",
        width / 2.0, doc["config"]["rounds"]
    );
    // Legend.
    for (i, name) in setups.iter().enumerate() {
        let x = 20.0 + i as f64 * 150.0;
        s.push_str(&format!(
            "<line x1=\"{x}\" y1=\"42\" x2=\"{}\" y2=\"42\" stroke=\"{}\" stroke-width=\"3\"/><text x=\"{}\" y=\"46\">{name}</text>\n",
            x + 24.0, color(name), x + 30.0
        ));
    }
    let labels = ["p50", "p90", "p99", "p99.9"];
    let keys = ["p50_us", "p90_us", "p99_us", "p999_us"];
    for (pi, (size, rate)) in panels.iter().enumerate() {
        let (prow, pcol) = place(pi);
        let (llo, lhi) = range(size, *rate);
        let ox = 10.0 + ml + pcol as f64 * (pw + ml);
        let oy = 60.0 + mt + prow as f64 * (ph + mt + mb);
        let y = |v: f64| oy + ph - (v.log10() - llo.log10()) / (lhi.log10() - llo.log10()) * ph;
        let x = |i: usize| ox + 20.0 + i as f64 * (pw - 40.0) / 3.0;
        s.push_str(&format!(
            "<rect x=\"{ox}\" y=\"{oy}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#999\"/>\n<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"middle\" font-size=\"13\">{size} at {rate} req/s</text>\n",
            ox + pw / 2.0, oy - 8.0
        ));
        let mut d = llo;
        while d <= lhi * 1.0001 {
            for m in [1.0, 2.0, 5.0] {
                let v = d * m;
                if v < llo || v > lhi * 1.0001 {
                    continue;
                }
                let yy = y(v);
                s.push_str(&format!(
                    "<line x1=\"{ox}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"#e5e5e5\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
                    ox + pw, ox - 4.0, yy + 4.0,
                    if v >= 1e6 {
                        format!("{} s", v / 1e6)
                    } else if v >= 1000.0 {
                        format!("{} ms", v / 1000.0)
                    } else {
                        format!("{v} µs")
                    }
                ));
            }
            d *= 10.0;
        }
        for (i, l) in labels.iter().enumerate() {
            s.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{l}</text>\n",
                x(i),
                oy + ph + 16.0
            ));
        }
        for name in &setups {
            let Some(r) = rows.iter().find(|r| {
                r["size"] == size.as_str() && r["rate"] == *rate && r["setup"] == name.as_str()
            }) else {
                continue;
            };
            let pts: Vec<String> = keys
                .iter()
                .enumerate()
                .filter_map(|(i, k)| {
                    let v = r[k].as_f64().filter(|v| *v > 0.0)?;
                    Some(format!("{:.1},{:.1}", x(i), y(v.clamp(llo, lhi))))
                })
                .collect();
            s.push_str(&format!(
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"/>\n",
                pts.join(" "),
                color(name)
            ));
            for p in &pts {
                let (px, py) = p.split_once(',').unwrap();
                s.push_str(&format!(
                    "<circle cx=\"{px}\" cy=\"{py}\" r=\"2.5\" fill=\"{}\"/>\n",
                    color(name)
                ));
            }
        }
    }
    s.push_str("</svg>\n");
    s
}
