//! Hot reload through every source — the file (including a Kubernetes ConfigMap's `..data`
//! symlink swap), SIGHUP and the admin API — under load, valid and invalid.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use sluicegate::demo::{v2_request, StandInModel};

const TOKEN: &str = "s3cret-token";

fn policy(threshold: &str, max_count: u64) -> String {
    spam_route(
        threshold,
        &format!("[{{action: spam, max_count: {max_count}, window: 1m, on_breach: flag}}]"),
        "",
    )
}

/// Starts the proxy in front of `model` with the policy file `policy`, its spool in DIR/spool
/// and the admin token file DIR/token holding `token`.
fn start(model: SocketAddr, dir: &Path, policy: &Path, token: &str) -> ProxyProcess {
    let file = dir.join("token");
    std::fs::write(&file, token).unwrap();
    start_with_policy(model, dir, policy, &["--admin-token-file", path_str(&file)])
}

/// A call on the admin port: (status, JSON body).
fn admin(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value) {
    let (status, text) = http10(addr, method, path, token, body);
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    (status, json)
}

fn version(addr: SocketAddr) -> String {
    admin(addr, "GET", "/admin/policy", Some(TOKEN), "").1["version"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_from_every_source_under_load_fail_no_request() {
    let model = StandInModel::spawn().await.unwrap();
    let dir = spool_dir();
    let adaptive = "{adaptive: {target_rate: 0.3, window: 1m, initial: 0.9, min: 0.05, max: 0.95, max_step: 0.5, update_interval: 1s, min_samples: 20}}";
    let a = policy(adaptive, 1_000_000);
    let b = policy(adaptive, 2_000_000);
    let file = write_policy(dir.path(), &a);
    let proxy = start(model, dir.path(), &file, &format!("{TOKEN}\n"));
    let admin_addr = proxy.admin;
    let version_a = version(admin_addr);

    // Without the token: 401, and nothing changes.
    assert_eq!(admin(admin_addr, "POST", "/admin/reload", None, "").0, 401);
    assert_eq!(
        admin(admin_addr, "POST", "/admin/reload", Some("wrong"), "").0,
        401
    );

    // Warm the adaptive threshold up so that a reset would show.
    let (ids, failed) = load(proxy.data, 200, Duration::from_secs(2)).await;
    assert_eq!(failed, 0);
    assert!(!ids.is_empty());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let warmed = proxy.metric("sluicegate_threshold");
    assert!(
        (warmed - 0.9).abs() > 0.01,
        "the threshold adapted away from its initial 0.9: {warmed}"
    );

    // The storm: SWAPS swaps (SLUICEGATE_LONG_TESTS: 1,000), paced to fit inside the load,
    // cycling through seven kinds so that every source sees valid and invalid policies.
    let swaps_wanted: u32 = if std::env::var_os("SLUICEGATE_LONG_TESTS").is_some() {
        1000
    } else {
        300
    };
    let pace = Duration::from_millis(25);
    let traffic_for = pace * swaps_wanted + Duration::from_secs(3);
    let data = proxy.data;
    let traffic = tokio::spawn(async move { load(data, 200, traffic_for).await });
    let pid = proxy.child.id();
    let file2 = file.clone();
    let (a2, b2) = (a.clone(), b.clone());
    let storm = tokio::task::spawn_blocking(move || {
        let mut versions = HashSet::new();
        // Three ways to be wrong: a refused value, broken YAML, an unknown key.
        let invalid = [
            (policy("{fixed: 0.5}", 0), "max_count"),
            (policy("{fixed: 0.5", 5), "YAML"),
            (
                format!("{}    surprise: 1\n", policy("{fixed: 0.5}", 5)),
                "unknown key",
            ),
        ];
        let mut refused_by_api = 0u32;
        // Let the load start first.
        std::thread::sleep(Duration::from_millis(500));
        let start = Instant::now();
        for i in 0..swaps_wanted {
            let next = start + pace * i;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            // Seven kinds, an odd number, so each kind gets both valid texts in turn.
            let text = if i.is_multiple_of(2) { &b2 } else { &a2 };
            let (bad, expected) = &invalid[(i as usize / 7) % invalid.len()];
            match i % 7 {
                // The file, picked up by the watch.
                0 => write_atomically(&file2, text),
                // The file, then SIGHUP.
                1 => {
                    write_atomically(&file2, text);
                    signal(pid, "HUP");
                }
                // The file, then the API's reload.
                2 => {
                    write_atomically(&file2, text);
                    let (s, v) = admin(admin_addr, "POST", "/admin/reload", Some(TOKEN), "");
                    assert_eq!(s, 200, "{v}");
                }
                // PUT, valid.
                3 => {
                    let (s, v) = admin(admin_addr, "PUT", "/admin/policy", Some(TOKEN), text);
                    assert_eq!(s, 200, "{v}");
                    versions.insert(v["version"].as_str().unwrap().to_owned());
                }
                // PUT, invalid: refused whole with its errors, the old one serves on.
                4 => {
                    let (s, v) = admin(admin_addr, "PUT", "/admin/policy", Some(TOKEN), bad);
                    assert_eq!(s, 422, "{v}");
                    assert!(v["errors"][0].as_str().unwrap().contains(expected), "{v}");
                    refused_by_api += 1;
                }
                // An invalid file, seen by the watch and by SIGHUP.
                5 => {
                    write_atomically(&file2, bad);
                    signal(pid, "HUP");
                }
                // An invalid file, then the API's reload: 422.
                _ => {
                    write_atomically(&file2, bad);
                    let (s, v) = admin(admin_addr, "POST", "/admin/reload", Some(TOKEN), "");
                    assert_eq!(s, 422, "{v}");
                    assert!(v["errors"][0].as_str().unwrap().contains(expected), "{v}");
                    refused_by_api += 1;
                }
            }
        }
        let took = start.elapsed();
        // End on a valid file so the watch settles on it.
        write_atomically(&file2, &a2);
        (versions, swaps_wanted, refused_by_api, took)
    });
    let (ids, failed) = traffic.await.unwrap();
    let (put_versions, swaps, refused_by_api, took) = storm.await.unwrap();
    eprintln!(
        "policy storm: {swaps} swaps in {took:?} under 200 req/s, {} requests, {failed} failed",
        ids.len() + failed
    );
    assert!(
        took + Duration::from_millis(500) < traffic_for,
        "the storm ({took:?}) outlasted the load ({traffic_for:?})"
    );
    assert!(swaps >= 300, "only {swaps} swaps");
    assert_eq!(failed, 0, "no request failed during {swaps} policy swaps");
    let generation = proxy.metric("sluicegate_policy_generation");
    let refused = proxy.metric("sluicegate_policy_reload_failures_total");
    eprintln!("policy storm: generation {generation}, {refused} reloads refused");
    assert!(generation >= 20.0);
    assert!(refused >= 5.0);
    assert!(
        refused >= refused_by_api as f64,
        "every refusal is counted: {refused} < {refused_by_api}"
    );

    // Every record names a policy that was valid and in force.
    let version_b = put_versions
        .iter()
        .find(|v| **v != version_a)
        .cloned()
        .unwrap();
    proxy.wait_metric(
        "sluicegate_tee_records_spooled_total",
        ids.len() as f64,
        Duration::from_secs(10),
    );
    let records = spool_records(&dir.path().join("spool"));
    let seen: HashSet<String> = records
        .iter()
        .filter(|r| r["schema"] == "sluicegate.record.v1")
        .map(|r| r["policy"]["version"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        seen.contains(&version_b),
        "some requests were decided by the second policy"
    );
    assert!(
        seen.iter().all(|v| *v == version_a || *v == version_b),
        "only valid policies decided: {seen:?}"
    );
    // The threshold's settings never changed: its estimator was never reset.
    let after = proxy.metric("sluicegate_threshold");
    assert!(
        (after - 0.9).abs() > 0.01,
        "threshold reset to its initial value: {after}"
    );
}

/// The kubelet's way: a new timestamped directory, then an atomic swap of the `..data`
/// symlink; `policy.yaml` is a symlink through `..data`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_style_update_is_picked_up_within_two_seconds() {
    use std::os::unix::fs::symlink;
    let model = StandInModel::spawn().await.unwrap();
    let dir = spool_dir();
    let cm = dir.path().join("policy");
    std::fs::create_dir(&cm).unwrap();
    let publish = |n: u32, text: &str| {
        let ts = cm.join(format!("..2026_11_28_00_00_0{n}.000"));
        std::fs::create_dir(&ts).unwrap();
        std::fs::write(ts.join("policy.yaml"), text).unwrap();
        let tmp = cm.join("..data_tmp");
        symlink(ts.file_name().unwrap(), &tmp).unwrap();
        std::fs::rename(&tmp, cm.join("..data")).unwrap();
    };
    // Threshold 0: everything is spam. Then 2: nothing is.
    publish(1, &policy("{fixed: 0.0}", 1_000_000));
    symlink("..data/policy.yaml", cm.join("policy.yaml")).unwrap();
    let proxy = start(model, dir.path(), &cm.join("policy.yaml"), TOKEN);
    let c = client();
    let action = |h: &http::HeaderMap| h["sluicegate-action"].to_str().unwrap().to_owned();
    let (_, h, _) = post(
        &c,
        &proxy.url("/v2/models/spam-filter/infer"),
        v2_request(1, 1),
    )
    .await;
    assert_eq!(action(&h), "spam");
    let before = version(proxy.admin);

    publish(2, &policy("{fixed: 2.0}", 1_000_000));
    let start = Instant::now();
    loop {
        let (_, h, _) = post(
            &c,
            &proxy.url("/v2/models/spam-filter/infer"),
            v2_request(1, 1),
        )
        .await;
        if action(&h) == "ham" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the new policy was not applied within 2s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = version(proxy.admin);
    assert_ne!(before, after);
    let metrics = admin_get(proxy.admin, "/metrics").1;
    assert!(
        metrics.contains(&format!("sluicegate_policy_info{{version=\"{after}\"}} 1")),
        "{metrics}"
    );
    assert!(
        !metrics.contains(&format!("version=\"{before}\"")),
        "the old version is no longer shown"
    );
}
