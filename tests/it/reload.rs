//! Hot reload through every source — the file (including a Kubernetes ConfigMap's `..data`
//! symlink swap), SIGHUP and the admin API — under load, valid and invalid.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;
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
    let (status, text) = admin_request(addr, method, path, token, body);
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
    let records = proxy.spool_records_after(&dir.path().join("spool"), ids.len() as f64);
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
        metrics.contains(&format!(
            "sluicegate_policy_info{{version=\"{after}\",source=\"file\"}} 1"
        )),
        "{metrics}"
    );
    assert!(
        !metrics.contains(&format!("version=\"{before}\"")),
        "the old version is no longer shown"
    );
}

/// A spam route that calls everything spam (threshold 0) and refuses the fourth in a minute.
fn capped_at_three() -> String {
    spam_route(
        "{fixed: 0.0}",
        "[{action: spam, max_count: 3, window: 1m, on_breach: reject}]",
        "",
    )
}

/// POSTs one spam-filter request: (status, sluicegate-action).
async fn infer(c: &HttpClient, proxy: &ProxyProcess) -> (u16, String) {
    let (s, h, _) = post(
        c,
        &proxy.url("/v2/models/spam-filter/infer"),
        v2_request(1, 1),
    )
    .await;
    let action = h
        .get("sluicegate-action")
        .map_or("", |v| v.to_str().unwrap())
        .to_owned();
    (s, action)
}

/// Requests every 50 ms for `d`: the statuses seen.
async fn statuses_for(c: &HttpClient, proxy: &ProxyProcess, d: Duration) -> Vec<u16> {
    let until = Instant::now() + d;
    let mut seen = Vec::new();
    while Instant::now() < until {
        seen.push(infer(c, proxy).await.0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_file_written_in_place_is_applied_only_whole_and_an_empty_one_never() {
    let model = StandInModel::spawn().await.unwrap();
    let dir = spool_dir();
    let full = capped_at_three();
    let file = write_policy(dir.path(), &full);
    let proxy = start(model, dir.path(), &file, TOKEN);
    let c = client();
    for _ in 0..3 {
        assert_eq!(infer(&c, &proxy).await, (200, "spam".into()));
    }
    assert_eq!(infer(&c, &proxy).await.0, 429, "the cap of 3 a minute");
    let version_before = version(proxy.admin);

    // `: > policy.yaml; sleep 0.6; cat full.yaml > policy.yaml`, then the same with only the
    // part before `routes:` written first. The limit must hold throughout: never a 200.
    for first in ["", "tee: {sample_rate: 1.0}\n"] {
        let f = file.clone();
        let full2 = full.clone();
        let first = first.to_owned();
        let writer = tokio::task::spawn_blocking(move || {
            std::fs::write(&f, first).unwrap();
            std::thread::sleep(Duration::from_millis(600));
            std::fs::write(&f, full2).unwrap();
        });
        let seen = statuses_for(&c, &proxy, Duration::from_millis(2500)).await;
        writer.await.unwrap();
        let served = seen.iter().filter(|s| **s == 200).count();
        eprintln!(
            "in-place rewrite: {} requests during it, {served} let through past the cap",
            seen.len()
        );
        assert!(seen.iter().all(|s| *s == 429), "{seen:?}");
    }
    assert_eq!(version(proxy.admin), version_before);
    assert_eq!(proxy.metric("sluicegate_policy_reload_failures_total"), 0.0);

    // An empty file that stays empty is refused once; the policy in force serves on.
    std::fs::write(&file, "").unwrap();
    let seen = statuses_for(&c, &proxy, Duration::from_millis(2500)).await;
    assert!(seen.iter().all(|s| *s == 429), "{seen:?}");
    assert_eq!(proxy.metric("sluicegate_policy_reload_failures_total"), 1.0);
    // So is an empty PUT body.
    let (status, body) = admin(proxy.admin, "PUT", "/admin/policy", Some(TOKEN), "");
    assert_eq!(status, 422, "{body}");
    assert!(
        body["errors"][0].as_str().unwrap().contains("empty"),
        "{body}"
    );
    assert_eq!(infer(&c, &proxy).await.0, 429);
    assert_eq!(version(proxy.admin), version_before);
}

/// Polls until a request gets `action`; panics with `what` after 5 s.
async fn until_action(c: &HttpClient, proxy: &ProxyProcess, action: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while infer(c, proxy).await.1 != action {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The source of the policy in force, from `GET /admin/policy`.
fn source(addr: SocketAddr) -> String {
    admin(addr, "GET", "/admin/policy", Some(TOKEN), "").1["source"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_put_through_the_api_holds_until_the_file_changes() {
    let model = StandInModel::spawn().await.unwrap();
    let dir = spool_dir();
    let ham = policy("{fixed: 2.0}", 1_000_000);
    let spam = policy("{fixed: 0.0}", 1_000_000);
    let file = write_policy(dir.path(), &ham);
    let proxy = start(model, dir.path(), &file, TOKEN);
    let c = client();
    assert_eq!(infer(&c, &proxy).await.1, "ham");
    assert_eq!(source(proxy.admin), "file");

    let put = || {
        let (s, v) = admin(proxy.admin, "PUT", "/admin/policy", Some(TOKEN), &spam);
        assert_eq!(s, 200, "{v}");
    };
    put();
    // Held past every watch and debounce interval, with the file untouched.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(infer(&c, &proxy).await.1, "spam");
    assert_eq!(source(proxy.admin), "api");
    let metrics = admin_get(proxy.admin, "/metrics").1;
    assert!(metrics.contains("source=\"api\"} 1"), "{metrics}");

    // SIGHUP and POST /admin/reload apply the file and end the override.
    signal(proxy.child.id(), "HUP");
    until_action(&c, &proxy, "ham", "SIGHUP did not re-apply the file").await;
    assert_eq!(source(proxy.admin), "file");
    put();
    let (s, _) = admin(proxy.admin, "POST", "/admin/reload", Some(TOKEN), "");
    assert_eq!(s, 200);
    assert_eq!(infer(&c, &proxy).await.1, "ham");
    assert_eq!(source(proxy.admin), "file");

    // A change to the file's content ends it too.
    put();
    write_atomically(&file, &policy("{fixed: 2.0}", 2_000_000));
    until_action(&c, &proxy, "ham", "the changed file was not applied").await;
    assert_eq!(source(proxy.admin), "file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_policy_is_not_reloaded_and_a_rotated_key_is() {
    let model = StandInModel::spawn().await.unwrap();
    let dir = spool_dir();
    let keys = dir.path().join("keys");
    let keygen = || {
        let out = std::process::Command::new(BIN)
            .args(["tag", "keygen", "--id", "k1", "--dir", path_str(&keys)])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    keygen();
    let tagged = format!(
        "{}tagging: {{algorithm: ed25519, signing_key: k1}}\n",
        policy("{fixed: 0.5}", 1_000_000)
    );
    let file = write_policy(dir.path(), &tagged);
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let proxy = start_with_policy(
        model,
        dir.path(),
        &file,
        &[
            "--admin-token-file",
            path_str(&token),
            "--tag-keys-dir",
            path_str(&keys),
        ],
    );

    // An invalid file is refused once, not at every look at it.
    write_atomically(&file, "routes: [");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let failures = proxy.metric("sluicegate_policy_reload_failures_total");
    eprintln!("invalid policy file left 4 s: {failures} refusals counted");
    assert_eq!(failures, 1.0);
    write_atomically(&file, &tagged);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let generation = proxy.metric("sluicegate_policy_generation");

    // A rotated key (the same id, new material) signs from the next request on, without a
    // reload of the unchanged policy.
    let old_public = dir.path().join("old");
    std::fs::create_dir(&old_public).unwrap();
    std::fs::rename(
        keys.join("k1.ed25519.pub"),
        old_public.join("k1.ed25519.pub"),
    )
    .unwrap();
    std::fs::remove_file(keys.join("k1.ed25519")).unwrap();
    keygen();
    let new_public = dir.path().join("new");
    std::fs::create_dir(&new_public).unwrap();
    std::fs::copy(
        keys.join("k1.ed25519.pub"),
        new_public.join("k1.ed25519.pub"),
    )
    .unwrap();
    let c = client();
    let verifies_with = |tag: &str, keys: &Path| {
        std::process::Command::new(BIN)
            .args(["tag", "verify", tag, "--keys", path_str(keys)])
            .output()
            .unwrap()
            .status
            .success()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, h, _) = post(
            &c,
            &proxy.url("/v2/models/spam-filter/infer"),
            v2_request(1, 1),
        )
        .await;
        let tag = h["sluicegate-tag"].to_str().unwrap().to_owned();
        if verifies_with(&tag, &new_public) {
            assert!(!verifies_with(&tag, &old_public));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotated key was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(proxy.metric("sluicegate_policy_generation"), generation);
    assert_eq!(proxy.metric("sluicegate_policy_reload_failures_total"), 1.0);
}
