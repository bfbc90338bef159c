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

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a Markdown file's headings (outside code blocks).
fn anchors(text: &str) -> Vec<String> {
    let mut in_code = false;
    text.lines()
        .filter(|l| {
            if l.starts_with("```") {
                in_code = !in_code;
            }
            !in_code && l.starts_with('#')
        })
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect()
}

/// Every relative link in the README and docs/ points at a file that exists, and every `#anchor`
/// at a heading of its file: the manual is split across files, and a moved section must not
/// leave a dead link behind.
#[test]
fn every_relative_link_in_the_readme_and_docs_resolves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    let mut checked = 0;
    let mut dead = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for target in markdown_links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, fragment) = match target.split_once('#') {
                Some((p, f)) => (p, Some(f)),
                None => (target.as_str(), None),
            };
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(path)
            };
            checked += 1;
            if !resolved.exists() {
                dead.push(format!("{}: {target}", file.display()));
                continue;
            }
            if let Some(fragment) =
                fragment.filter(|_| resolved.extension().is_some_and(|e| e == "md"))
            {
                let heads = anchors(&std::fs::read_to_string(&resolved).unwrap());
                if !heads.iter().any(|h| h == fragment) {
                    dead.push(format!("{}: {target} (no such heading)", file.display()));
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} links found");
    assert!(dead.is_empty(), "dead links:\n{}", dead.join("\n"));
}

/// The targets of the Markdown links `[text](target)` in `text`, outside code blocks.
fn markdown_links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            match after.find(')') {
                Some(end) => {
                    out.push(after[..end].to_owned());
                    rest = &after[end + 1..];
                }
                None => break,
            }
        }
    }
    out
}

#[test]
fn check_with_the_key_dir_refuses_a_policy_serve_would_refuse() {
    use crate::common::{path_str, run, wait_exit};
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let (code, _, err) = run(&["tag", "keygen", "--id", "k1", "--dir", path_str(&keys)]);
    assert_eq!(code, 0, "{err}");
    // The same directory with the public key alone: it verifies, it cannot sign.
    let public = dir.path().join("public");
    std::fs::create_dir(&public).unwrap();
    std::fs::copy(keys.join("k1.ed25519.pub"), public.join("k1.ed25519.pub")).unwrap();
    let policy = |key: &str| {
        let file = dir.path().join(format!("policy-{key}.yaml"));
        std::fs::write(
            &file,
            format!("tagging: {{algorithm: ed25519, signing_key: {key}}}\n"),
        )
        .unwrap();
        file
    };
    let (k1, k2) = (policy("k1"), policy("k2"));
    let check = |file: &Path, keys: Option<&Path>| {
        let mut args = vec!["check", path_str(file)];
        if let Some(k) = keys {
            args.extend(["--tag-keys-dir", path_str(k)]);
        }
        run(&args)
    };
    let (code, out, _) = check(&k1, Some(&keys));
    assert_eq!(code, 0, "{out}");
    for (file, keys) in [(&k2, &keys), (&k1, &public)] {
        let (code, out, _) = check(file, Some(keys));
        assert_eq!(code, 64, "{}: {out}", file.display());
        assert!(out.contains("tagging.signing_key"), "{out}");
        // `serve` refuses to start on the same pair, with the same exit code.
        let mut serve = std::process::Command::new(env!("CARGO_BIN_EXE_sluicegate"))
            .args(["serve", "--upstream", "http://127.0.0.1:9", "--policy"])
            .arg(file)
            .arg("--tag-keys-dir")
            .arg(keys)
            .arg("--spool-dir")
            .arg(dir.path().join("spool"))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let status = wait_exit(&mut serve, std::time::Duration::from_secs(20));
        assert_eq!(status.code(), Some(64));
    }
    // Without the directory, keys are not checked (the policy is valid as written).
    assert_eq!(check(&k2, None).0, 0);
}
