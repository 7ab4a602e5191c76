//! The shipped base policy is deliberately not converged: on the embedded desktop's training
//! split it succeeds sometimes, leaving RL room. Measured here on every training task (one
//! attempt each at the validation temperature, the real `load_local` + `evaluate` path).
//!
//! The stated band is 10-40% of the training split. The full measurement behind the README
//! (`cargo xtask select-tasks --attempts 4`, 1,088 attempts) gave 9.9% (95% CI 8.3-11.8%); one
//! attempt per task has a standard error of about 1.8 points, so this test accepts 5-40%.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use arpo_trainer::Config;
use arpo_trainer::eval::evaluate;
use arpo_trainer::model::load_local;
use arpo_trainer::setup::{Envs, build_envs, load_tasks};
use arpo_trainer::train::rollout_settings;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_base_policy_solves_some_but_not_most_training_tasks() {
    crate::run_like_xtask();
    let text = std::fs::read_to_string(root().join("configs/embedded_default.yaml")).unwrap();
    let c = Config::from_yaml_str(
        &text,
        &[format!(
            "worker.actor.model.model_path={}",
            root().join("fixtures/models/uitars-tiny-base").display()
        )],
    )
    .unwrap();
    let (policy, _learner) = load_local(&c, 1).unwrap();
    let tasks = load_tasks("sim:train", &c, 0).unwrap();
    assert!(tasks.len() >= 200, "{} training tasks", tasks.len());
    let Envs::Sim(mut envs) = build_envs(&c).unwrap() else {
        panic!("the embedded default is the sim provider")
    };
    let mut settings = rollout_settings(&c, true).unwrap();
    settings.group_size = 1;
    let threshold = c.algorithm.replay.success_threshold;
    let report = evaluate(
        &policy,
        &mut envs,
        &tasks,
        &settings,
        0,
        threshold,
        "base",
        "sim:train",
        &mut |_| {},
    )
    .await
    .unwrap();
    eprintln!(
        "base policy on the training split: {}/{} = {:.1}% at temperature {}",
        report.successes,
        report.episodes,
        100.0 * report.success_rate,
        settings.sampling.temperature
    );
    assert_eq!(report.episodes, tasks.len());
    assert!(
        (0.05..=0.40).contains(&report.success_rate),
        "the base policy solves {:.1}% of the training split, outside 5-40%\n{}",
        100.0 * report.success_rate,
        report.table()
    );
}
