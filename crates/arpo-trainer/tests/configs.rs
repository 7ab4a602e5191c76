//! The shipped configs load, and carry the seed's settings.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use arpo_trainer::Config;
use arpo_trainer::config::EnvProvider;

fn configs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs")
}

#[test]
fn the_seed_mac_config_loads_with_the_seed_settings() {
    let c = Config::load(&configs_dir().join("config_uitars_2b_mac.yaml"), &[]).unwrap();
    // The values the seed guide spells out ("Key Configuration Details").
    assert!(c.algorithm.enable_replay);
    assert!(c.algorithm.disable_kl);
    assert_eq!(c.algorithm.kl_coef, 0.0);
    assert_eq!(c.worker.actor.clip_ratio_low, 0.2);
    assert_eq!(c.worker.actor.clip_ratio_high, 0.3);
    assert_eq!(c.worker.actor.global_batch_size, 2);
    assert_eq!(c.worker.rollout.temperature, 0.7);
    assert_eq!(c.worker.rollout.limit_images, 10);
    assert!(c.worker.rollout.use_external_server);
    assert_eq!(c.worker.rollout.server_url, "http://localhost:9000/v1");
    assert_eq!(c.env.num_envs, 1);
    assert_eq!(c.env.provider, EnvProvider::Vmware);
    assert_eq!(c.worker.actor.model.device, arpo_model::DeviceSpec::Cpu);
    assert_eq!(
        c.env.screen_size,
        Some(arpo_core::ScreenSize::new(1920, 1080).unwrap())
    );
    assert_eq!(c.trainer.total_episodes, 5);
    assert_eq!(c.data.max_tasks, 8);
}

#[test]
fn every_shipped_config_loads() {
    let mut n = 0;
    for entry in std::fs::read_dir(configs_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            Config::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 3, "expected the three shipped configs, found {n}");
}

#[test]
fn the_embedded_default_spells_out_every_key() {
    // Every key of the schema appears in embedded_default.yaml (so it documents them all):
    // the file, re-serialised, has the same key set as the defaults.
    let text = std::fs::read_to_string(configs_dir().join("embedded_default.yaml")).unwrap();
    let file: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let defaults: serde_yaml::Value = serde_yaml::from_str(&Config::default().to_yaml()).unwrap();
    let mut missing = Vec::new();
    keys_missing(&defaults, &file, String::new(), &mut missing);
    // Provider sections for other providers are documented in config_uitars_2b_mac.yaml.
    missing.retain(|k| !k.starts_with("env.vmware") && !k.starts_with("env.remote"));
    assert!(
        missing.is_empty(),
        "keys missing from embedded_default.yaml: {missing:?}"
    );
}

fn keys_missing(
    reference: &serde_yaml::Value,
    file: &serde_yaml::Value,
    prefix: String,
    out: &mut Vec<String>,
) {
    if let serde_yaml::Value::Mapping(m) = reference {
        for (k, v) in m {
            let key = k.as_str().unwrap_or_default();
            let path = if prefix.is_empty() {
                key.to_string()
            } else {
                format!("{prefix}.{key}")
            };
            match file.get(key) {
                Some(f) => keys_missing(v, f, path, out),
                None => out.push(path),
            }
        }
    }
}

#[test]
fn a_typo_in_a_file_names_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.yaml");
    std::fs::write(&path, "trainer:\n  save_frq: 2\n").unwrap();
    let err = Config::load(&path, &[]).unwrap_err().to_string();
    assert!(err.contains("typo.yaml"), "{err}");
    assert!(err.contains("trainer.save_frq"), "{err}");
}
