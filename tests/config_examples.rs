//! Every example under config/ must load: a settings example that drifts from the code is a
//! trap for the operator who copies it.

use std::path::Path;

use sluicegate::config::settings::SettingsArgs;

#[test]
fn every_settings_example_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("settings") || !name.ends_with(".yaml") {
            continue;
        }
        let args = SettingsArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        let settings = args
            .resolve()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(settings.kafka.is_some(), "{name} shows the Kafka settings");
        checked += 1;
    }
    assert!(checked > 0, "no settings example found under config/");
}

#[test]
fn every_policy_example_passes_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("policy") || !name.ends_with(".yaml") {
            continue;
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluicegate"))
            .arg("check")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        checked += 1;
    }
    assert!(
        checked >= 2,
        "the spam-filter and multi-class examples are checked"
    );
}

#[test]
fn check_exits_64_with_every_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "tee: {sample_rate: 3}\nroutes:\n  r:\n    match: {model: m}\n    protocol: v1\n    limits:\n      - {action: x, max_count: 0, window: 1m, on_breach: flag}\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluicegate"))
        .arg("check")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tee.sample_rate"), "{text}");
    assert!(text.contains("routes.r.limits"), "{text}");
}

#[test]
fn diff_names_settings_not_lines() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let a = dir.join("policy.spam-filter.yaml");
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("b.yaml");
    let text = std::fs::read_to_string(&a).unwrap();
    std::fs::write(&b, text.replace("target_rate: 0.02", "target_rate: 0.05")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluicegate"))
        .args(["diff"])
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("routes.spam.decision.binary.threshold.adaptive.target_rate: 0.02 → 0.05"),
        "{text}"
    );
}
