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
