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
    missing.retain(|k| {
        !k.starts_with("env.vmware")
            && !k.starts_with("env.remote")
            && !k.starts_with("env.osworld")
    });
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

/// Every key the seed's configs carry that does nothing here is refused, naming what to use.
#[test]
fn removed_keys_are_refused_with_their_replacement() {
    for (key, instead) in arpo_trainer::config::REMOVED_KEYS {
        let err = Config::from_yaml_str("", &[format!("{key}=1")])
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{key}: {err}");
        assert!(err.contains(instead), "{key}: {err}");
    }
    let err = Config::from_yaml_str("", &["algorithm.disable_kl=false".into()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("reference model"), "{err}");
}

/// `data.max_pixels`/`min_pixels` reach the rollout policy's image processor, the learner's, and
/// the absolute-coordinate mapping; absent, all three use the model's preprocessor_config.json.
#[test]
fn pixel_bounds_reach_every_image_processor() {
    use arpo_trainer::rollout::Coordinates;
    let model = "worker.actor.model.model_path=../../fixtures/models/uitars-tiny-base";
    // The tiny base's preprocessor_config.json: shortest_edge 3136, longest_edge 100352.
    let c = Config::from_yaml_str("", &[model.into(), "env.coordinates=absolute".into()]).unwrap();
    assert_eq!(
        arpo_trainer::model::pixel_bounds(&c).unwrap(),
        (3136, 100_352)
    );
    let c = Config::from_yaml_str(
        "",
        &[
            model.into(),
            "env.coordinates=absolute".into(),
            "data.max_pixels=12544".into(),
            "data.min_pixels=784".into(),
        ],
    )
    .unwrap();
    let (policy, learner) = arpo_trainer::model::load_local(&c, 1).unwrap();
    assert_eq!(policy.model.processor.config.max_pixels, 12_544);
    assert_eq!(policy.model.processor.config.min_pixels, 784);
    assert_eq!(learner.episodes.processor.config.max_pixels, 12_544);
    assert_eq!(learner.episodes.processor.config.min_pixels, 784);
    let settings = arpo_trainer::train::rollout_settings(&c, false).unwrap();
    assert_eq!(
        settings.coordinates,
        Coordinates::Absolute {
            min_pixels: 784,
            max_pixels: 12_544
        }
    );
    // A 640x400 screenshot at 12544 pixels at most: smart_resize gives 140x84 (a multiple of 28,
    // 11760 pixels): 10x6 patches of 14, merged 2x2, = 15 image tokens, where the model's own
    // bound (100352) would give 392x224 (28x16 patches, 112 tokens).
    let img = image::RgbImage::new(640, 400);
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let shot = arpo_core::Screenshot::new(png, 640, 400);
    let rgb = arpo_model::processor::decode_screenshot(&shot).unwrap();
    let out = policy
        .model
        .processor
        .preprocess(&[rgb], &candle_core::Device::Cpu)
        .unwrap();
    let tokens: usize = out.grid_thw.iter().map(|g| g[0] * g[1] * g[2] / 4).sum();
    assert_eq!(tokens, 15);
}

/// `data.max_tasks` cuts the training tasks, not the validation set.
#[test]
fn max_tasks_cuts_training_only() {
    let c = Config::from_yaml_str(
        "",
        &[
            "data.train_files=sim:train".into(),
            "data.val_files=sim:heldout".into(),
            "data.max_tasks=3".into(),
        ],
    )
    .unwrap();
    let plan = arpo_trainer::plan::RunPlan::new(&c).unwrap();
    assert_eq!(plan.train_tasks.len(), 3);
    let all_heldout = arpo_env_sim::Catalogue::default().heldout().len();
    assert!(all_heldout > 3);
    assert_eq!(plan.val_tasks.len(), all_heldout);
}

/// `env.screen_size` becomes the size the engine checks every environment against.
#[test]
fn screen_size_is_what_the_engine_checks() {
    let c = Config::from_yaml_str("", &["env.screen_size=[1920, 1080]".into()]).unwrap();
    let s = arpo_trainer::train::rollout_settings(&c, true).unwrap();
    assert_eq!(s.expected_screen.map(|s| s.pair()), Some((1920, 1080)));
    let c = Config::from_yaml_str("", &[]).unwrap();
    assert_eq!(
        arpo_trainer::train::rollout_settings(&c, true)
            .unwrap()
            .expected_screen,
        None
    );
    assert!(Config::from_yaml_str("", &["env.screen_size=[0, 1080]".into()]).is_err());
}

/// A `load_checkpoint_path` that is not a checkpoint fails the pre-flight, before any rollout.
#[tokio::test]
async fn a_bad_load_checkpoint_path_fails_the_preflight() {
    let c = Config::from_yaml_str(
        "",
        &[
            "worker.actor.model.model_path=../../fixtures/models/uitars-tiny-base".into(),
            "trainer.load_checkpoint_path=/nonexistent/epoch_3".into(),
        ],
    )
    .unwrap();
    let err = arpo_trainer::setup::preflight(&c)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("trainer.load_checkpoint_path"), "{err}");
}
