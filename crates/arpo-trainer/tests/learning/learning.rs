//! The default run learns, at CI size: the shipped base policy, trained by the real loop
//! (`load_local` + the embedded desktop + `Trainer`, as `cargo xtask train` assembles them) on a
//! fixed pair of training tasks, succeeds on them clearly more often than before training.
//!
//! The reference is the base checkpoint itself, evaluated on the same tasks with the same
//! attempts, temperature and sampling seed. The pair and the budget were chosen by measuring
//! five training seeds (below), and the margin asked for is more than three standard errors of
//! the difference of the two rates and at least 20 points.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use arpo_trainer::eval::{EvalReport, evaluate};
use arpo_trainer::model::load_local;
use arpo_trainer::setup::{Envs, build_envs, load_tasks};
use arpo_trainer::train::rollout_settings;
use arpo_trainer::{Config, Progress, Trainer};

/// Tasks the base solves sometimes (about two attempts in five at temperature 0.5).
///
/// Measured with `cargo xtask` (these settings, 24 attempts per task, sampling seed 5): base
/// 39.6-45.8%; trained 91.7, 85.4, 100.0, 100.0, 97.9% (training seeds 1-5), 30 s of training
/// each. Groups of 8 for 8 epochs gave 75.0, 62.5, 100.0% (seeds 1-3); groups of 8 at lr 4e-3
/// collapsed seed 1 to 0%; groups of 16 for 8 epochs (the earlier setting) gave 70.8-100% in
/// twice the time. Another pair (colour buttons 012 and 013) gave 29.2, 16.7, 47.9% against a
/// base of 16.7%: not an effect larger than the seed-to-seed spread, so not this test.
const TASKS: &str = r#"{"colour_button": ["sim-colour_button-train-011"], "label_button": ["sim-label_button-train-002"]}"#;
const EPOCHS: usize = 10;
const GROUP: usize = 8;
const ATTEMPTS: usize = 24;
const EVAL_SEED: u64 = 5;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn config(dir: &Path) -> Config {
    let tasks = dir.join("tasks.json");
    std::fs::write(&tasks, TASKS).unwrap();
    let sets: Vec<String> = vec![
        format!(
            "worker.actor.model.model_path={}",
            root().join("fixtures/models/uitars-tiny-base").display()
        ),
        format!("trainer.save_checkpoint_path={}", dir.join("ck").display()),
        format!("trainer.results_path={}", dir.join("results").display()),
        format!("trainer.logs_path={}", dir.join("logs").display()),
        "trainer.experiment_name=learning".into(),
        format!("trainer.total_episodes={EPOCHS}"),
        "trainer.save_freq=-1".into(),
        format!("data.train_files={}", tasks.display()),
        "data.val_files=\"\"".into(),
        "data.rollout_batch_size=2".into(),
        "data.seed=1".into(),
        "worker.actor.global_batch_size=2".into(),
        format!("worker.rollout.n={GROUP}"),
        format!("env.num_envs={}", 2 * GROUP),
        "env.max_steps=3".into(),
        "worker.rollout.limit_images=3".into(),
    ];
    let text = std::fs::read_to_string(root().join("configs/embedded_default.yaml")).unwrap();
    Config::from_yaml_str(&text, &sets).unwrap()
}

async fn eval(c: &Config, policy: &arpo_model::LocalPolicy) -> EvalReport {
    let Envs::Sim(mut envs) = build_envs(c).unwrap() else {
        panic!("the embedded default is the sim provider")
    };
    let tasks = load_tasks(&c.data.train_files, c, 0).unwrap();
    let mut settings = rollout_settings(c, true).unwrap();
    settings.group_size = ATTEMPTS;
    let threshold = c.algorithm.replay.success_threshold;
    evaluate(
        policy,
        &mut envs,
        &tasks,
        &settings,
        EVAL_SEED,
        threshold,
        "learning",
        "pair",
        &mut |_| {},
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_run_beats_the_base_policy_on_its_tasks() {
    crate::run_like_xtask();
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let steps = EPOCHS as u64;
    let t0 = std::time::Instant::now();
    let (policy, learner) = load_local(&c, steps).unwrap();
    let before = eval(&c, &policy).await;
    let t_base = t0.elapsed().as_secs_f64();

    let Envs::Sim(envs) = build_envs(&c).unwrap() else {
        panic!("the embedded default is the sim provider")
    };
    let tasks = load_tasks(&c.data.train_files, &c, 0).unwrap();
    assert_eq!(tasks.len(), 2);
    let mut t = Trainer::new(
        c.clone(),
        &policy,
        envs,
        learner,
        tasks,
        Vec::new(),
        Progress::quiet(),
    )
    .unwrap();
    t.run().await.unwrap();
    drop(t);
    let t_train = t0.elapsed().as_secs_f64() - t_base;
    // The policy shares the trained weights.
    let after = eval(&c, &policy).await;

    eprintln!(
        "base {:.1}% -> trained {:.1}% (load and base eval {t_base:.1}s, training {t_train:.1}s, \
         trained eval {:.1}s)",
        100.0 * before.success_rate,
        100.0 * after.success_rate,
        t0.elapsed().as_secs_f64() - t_base - t_train
    );
    let n = (ATTEMPTS * 2) as f64;
    let (p0, p1) = (before.success_rate, after.success_rate);
    let se = (p0 * (1.0 - p0) / n + p1 * (1.0 - p1) / n).sqrt();
    assert!(
        p1 - p0 > 3.0 * se && p1 - p0 >= 0.2,
        "success on the training pair: base {:.1}% -> trained {:.1}% (3 standard errors {:.1}%)\n{}\n{}",
        100.0 * p0,
        100.0 * p1,
        300.0 * se,
        before.table(),
        after.table()
    );
}
