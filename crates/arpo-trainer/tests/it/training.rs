//! The training loop end to end with the row-of-buttons environment and the tabular policy:

#![allow(clippy::unwrap_used)]
//! every output file, resume after a kill, replay on and off, learning.

use std::path::Path;
use std::sync::{Arc, Mutex};

use arpo_core::{AgentContext, Policy, PolicyError, Response, SamplingParams, Task, Trajectory};
use arpo_trainer::learner::{Learner, Sample, UpdateStats};
use arpo_trainer::testing::{ButtonRow, TabularPolicy, button_task};
use arpo_trainer::{Config, Progress, Trainer, TrainerError};
use async_trait::async_trait;

fn config(dir: &Path, extra: &[&str]) -> Config {
    let mut sets: Vec<String> = vec![
        format!(
            "trainer.save_checkpoint_path={}",
            dir.join("checkpoints").display()
        ),
        format!("trainer.results_path={}", dir.join("results").display()),
        format!("trainer.logs_path={}", dir.join("logs").display()),
        "trainer.experiment_name=test".into(),
        "trainer.total_episodes=4".into(),
        "trainer.save_freq=1".into(),
        "data.rollout_batch_size=2".into(),
        "worker.actor.global_batch_size=1".into(),
        "worker.rollout.n=4".into(),
        "env.num_envs=3".into(),
        "env.max_steps=3".into(),
        "data.seed=11".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    Config::from_yaml_str("", &sets).unwrap()
}

/// SGD step of the tabular policy: large, since the loss is a mean over tokens and rollouts.
const LR: f64 = 10.0;

fn tasks() -> Vec<Task> {
    vec![
        button_task("t0", 0, 2),
        button_task("t1", 1, 2),
        button_task("t2", 2, 3),
        button_task("t3", 0, 3),
    ]
}

fn envs(n: usize) -> Vec<ButtonRow> {
    (0..n).map(|_| ButtonRow::new()).collect()
}

async fn run_fresh(
    dir: &Path,
    extra: &[&str],
    stop_after: Option<u64>,
) -> (TabularPolicy, arpo_trainer::train::RunSummary) {
    let c = config(dir, extra);
    let policy = TabularPolicy::new(LR);
    let learner = policy.clone();
    let mut t = Trainer::new(
        c.clone(),
        &policy,
        envs(c.env.num_envs),
        learner,
        tasks(),
        vec![button_task("v0", 1, 3)],
        Progress::quiet(),
    )
    .unwrap();
    t.stop_after_steps = stop_after;
    let summary = t.run().await.unwrap();
    (policy, summary)
}

/// The metrics without the wall-clock fields.
fn without_timing(v: &serde_json::Value) -> serde_json::Value {
    let mut v = v.clone();
    for key in ["steps", "epochs"] {
        if let Some(items) = v.get_mut(key).and_then(|x| x.as_array_mut()) {
            for item in items {
                if let Some(o) = item.as_object_mut() {
                    o.remove("rollout_seconds");
                    o.remove("update_seconds");
                }
            }
        }
    }
    v
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[tokio::test]
async fn a_run_writes_every_output_with_the_documented_schema() {
    let dir = tempfile::tempdir().unwrap();
    let (_, summary) = run_fresh(
        dir.path(),
        &["trainer.val_freq=2", "trainer.save_limit=2"],
        None,
    )
    .await;
    assert!(!summary.stopped_early);
    let results = dir.path().join("results/test");
    let metrics = read_json(&results.join("training_metrics.json"));
    assert_eq!(metrics["experiment"], "test");
    // 4 tasks / 2 per step = 2 steps per epoch, 4 epochs.
    assert_eq!(metrics["steps"].as_array().unwrap().len(), 8);
    assert_eq!(metrics["epochs"].as_array().unwrap().len(), 4);
    for key in [
        "avg_reward",
        "success_rate",
        "format_error_rate",
        "replay_size",
        "injected_groups",
        "invalid_groups",
        "loss",
        "pg_clipfrac_higher",
        "pg_clipfrac_lower",
        "ppo_kl",
        "entropy",
        "grad_norm",
        "lr",
        "tokens",
        "rollout_seconds",
        "update_seconds",
        "rollout_kl",
        "rollout_kl_k3",
        "rollout_ratio_max",
        "rollout_kl_tokens",
    ] {
        assert!(
            metrics["steps"][0].get(key).is_some(),
            "step metrics lack {key}"
        );
        assert!(
            metrics["epochs"][0].get(key).is_some(),
            "epoch metrics lack {key}"
        );
    }
    // Each step rolled out 2 tasks × 4 = 8 episodes of 2-token answers.
    assert_eq!(metrics["steps"][0]["rollouts"], 8);
    assert_eq!(
        metrics["steps"][0]["optimizer_steps"], 2,
        "2 groups / global_batch_size 1"
    );
    // Validation ran after epochs 2 and 4 (val_freq 2) only.
    assert!(metrics["epochs"][0].get("val_success_rate").is_none());
    assert!(metrics["epochs"][1]["val_success_rate"].is_number());
    assert!(metrics["epochs"][3]["val_success_rate"].is_number());

    let replay = read_json(&results.join("replay_buffer_stats.json"));
    assert_eq!(replay["enabled"], true);
    assert_eq!(replay["steps"], 8);
    for id in ["t0", "t1", "t2", "t3"] {
        let r = read_json(&results.join(format!("task_results/task_{id}_results.json")));
        assert_eq!(r["task_id"], id);
        // 4 epochs × 4 rollouts.
        assert_eq!(r["attempts"], 16);
        let a = &r["history"][0];
        for key in [
            "reward",
            "steps",
            "actions",
            "format_errors",
            "env_errors",
            "end",
        ] {
            assert!(a.get(key).is_some(), "attempt lacks {key}");
        }
    }
    let v = read_json(&results.join("task_results/task_v0_results.json"));
    assert_eq!(v["history"][0]["phase"], "validation");

    for f in ["training_curves.png", "training_curves.svg"] {
        let len = std::fs::metadata(results.join(f)).unwrap().len();
        assert!(len > 1000, "{f} is {len} bytes");
    }
    // save_freq 1 with save_limit 2: the last two epochs are kept.
    let ck = dir.path().join("checkpoints/test");
    let mut kept: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    assert_eq!(kept, ["epoch_2", "epoch_3"]);
    assert!(ck.join("epoch_3/trainer_state.json").is_file());
    assert!(ck.join("epoch_3/tabular_policy.json").is_file());
    assert_eq!(summary.last_checkpoint.unwrap(), ck.join("epoch_3"));
}

#[tokio::test]
async fn resuming_after_a_kill_ends_exactly_where_an_uninterrupted_run_ends() {
    let straight = tempfile::tempdir().unwrap();
    let (p_straight, _) = run_fresh(straight.path(), &[], None).await;
    let table_straight = p_straight.table.lock().unwrap().clone();

    // Kill points: in the middle of epoch 2 (step 3 of 8) and in the last epoch (step 7).
    for kill_after in [3u64, 7] {
        let dir = tempfile::tempdir().unwrap();
        let (_, first) = run_fresh(dir.path(), &[], Some(kill_after)).await;
        assert!(first.stopped_early);
        // A new process: fresh policy, resume from the latest checkpoint.
        let c = config(dir.path(), &[]);
        let policy = TabularPolicy::new(LR);
        let mut t = Trainer::new(
            c.clone(),
            &policy,
            envs(c.env.num_envs),
            policy.clone(),
            tasks(),
            vec![button_task("v0", 1, 3)],
            Progress::quiet(),
        )
        .unwrap();
        let from = t
            .resume(None)
            .unwrap()
            .expect("a checkpoint to resume from");
        assert!(
            from.ends_with(format!("epoch_{}", kill_after / 2 - 1)),
            "{}",
            from.display()
        );
        t.run().await.unwrap();

        assert_eq!(
            *policy.table.lock().unwrap(),
            table_straight,
            "final weights (kill after {kill_after})"
        );
        for f in [
            "training_metrics.json",
            "replay_buffer_stats.json",
            "task_results/task_t2_results.json",
        ] {
            let a = without_timing(&read_json(&straight.path().join("results/test").join(f)));
            let b = without_timing(&read_json(&dir.path().join("results/test").join(f)));
            assert_eq!(a, b, "{f} (kill after {kill_after})");
        }
    }
}

#[tokio::test]
async fn resume_with_nothing_saved_starts_fresh_and_a_bad_dir_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), &[]);
    let policy = TabularPolicy::new(1.0);
    let mut t = Trainer::new(
        c.clone(),
        &policy,
        envs(1),
        policy.clone(),
        tasks(),
        vec![],
        Progress::quiet(),
    )
    .unwrap();
    assert!(t.resume(None).unwrap().is_none());
    let err = t.resume(Some(dir.path())).unwrap_err();
    assert!(matches!(err, TrainerError::Resume { .. }), "{err}");
}

#[tokio::test]
async fn the_tabular_policy_learns_under_the_loop() {
    let dir = tempfile::tempdir().unwrap();
    let (_, summary) = run_fresh(
        dir.path(),
        &[
            "trainer.total_episodes=8",
            "trainer.save_freq=0",
            "worker.rollout.n=8",
        ],
        None,
    )
    .await;
    let e = &summary.metrics.epochs;
    let first = e[0].success_rate;
    let last = (e[6].success_rate + e[7].success_rate) / 2.0;
    let all: Vec<f64> = e.iter().map(|x| x.success_rate).collect();
    assert!(last > first + 0.3, "success {first} -> {last}: {all:?}");
    eprintln!("success per epoch: {all:?}");
}

#[tokio::test]
async fn the_sampler_learner_gap_is_logged_and_the_importance_weight_changes_the_update() {
    // The tabular policy samples from softmax(logits / T) and reports those log-probs; its
    // learner scores the same tokens at T = 1. At T = 1 the two agree (up to f32); at T = 0.5
    // they differ on every answer token.
    let run = |extra: &'static [&'static str]| async move {
        let dir = tempfile::tempdir().unwrap();
        let mut sets = vec!["trainer.total_episodes=1", "trainer.save_freq=0"];
        sets.extend_from_slice(extra);
        run_fresh(dir.path(), &sets, None).await.1.metrics.steps
    };
    let same = run(&["worker.rollout.temperature=1.0"]).await;
    for s in &same {
        assert!(
            s.rollout_kl_tokens > 0 && s.rollout_kl_tokens <= s.tokens,
            "{s:?}"
        );
        assert!(s.rollout_kl.unwrap().abs() < 1e-6, "{s:?}");
        assert!(s.rollout_kl_k3.unwrap() < 1e-9, "{s:?}");
        assert!((s.rollout_ratio_max.unwrap() - 1.0).abs() < 1e-6, "{s:?}");
        assert_eq!(s.rollout_is_weight, None, "no cap, no weight");
    }
    let plain = run(&["worker.rollout.temperature=0.5"]).await;
    let tis = run(&[
        "worker.rollout.temperature=0.5",
        "algorithm.rollout_is_cap=2",
    ])
    .await;
    for (p, t) in plain.iter().zip(&tis) {
        // Far above the T = 1 run's float noise (k3 < 1e-9, |kl| < 1e-6).
        assert!(p.rollout_kl_k3.unwrap() > 1e-5, "{p:?}");
        assert!(p.rollout_kl.unwrap() > 1e-3, "{p:?}");
        // Every answer token of the sharper sampler is off by the same few ratios, and the
        // `<|im_end|>` tokens (log-prob 0 on both sides) by none.
        assert!(p.rollout_ratio_max.unwrap() >= 1.0, "{p:?}");
        let w = t.rollout_is_weight.unwrap();
        assert!(w > 0.0 && w <= 2.0, "{t:?}");
        assert!((w - 1.0).abs() > 1e-3, "{t:?}");
    }
    // The first step rolls out the same episodes with and without the cap (same seed, same
    // table): only the weight differs, and with it the update.
    assert_eq!(plain[0].rollout_kl, tis[0].rollout_kl);
    let losses = |steps: &[arpo_trainer::metrics::StepMetrics]| -> Vec<f64> {
        steps.iter().map(|s| s.loss).collect()
    };
    assert_ne!(losses(&plain), losses(&tis));
}

/// Succeeds on every rollout of task "s" at step 0 (its first rollout only), fails everything after.
struct OnceThenFail {
    calls: Mutex<usize>,
}

#[async_trait]
impl Policy for OnceThenFail {
    async fn act(
        &self,
        contexts: &[AgentContext],
        _: &SamplingParams,
    ) -> Result<Vec<Response>, PolicyError> {
        let mut calls = self.calls.lock().unwrap();
        *calls += 1;
        // With one env and group size 2, calls 1-2 are the first episode of step 0.
        let first_episode = *calls <= 2;
        Ok(contexts
            .iter()
            .map(|c| {
                let text = match (first_episode, c.responses.len()) {
                    (true, 0) => "Thought: a\nAction: click(start_box='(50,500)')",
                    (true, _) => "Thought: b\nAction: finished()",
                    (false, _) => "Thought: give up\nAction: call_user()",
                };
                Response {
                    text: text.into(),
                    token_ids: vec![1, 2],
                    logprobs: vec![-1.0, 0.0],
                    finish_reason: Default::default(),
                }
            })
            .collect())
    }
    fn describe(&self) -> String {
        "once-then-fail".into()
    }
}

/// (advantage, injected, eval_result) of one sample.
type Seen = (f64, bool, f64);

/// Records what each update received.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<Vec<Seen>>>>,
}

impl Learner for Recorder {
    fn old_logprobs(&mut self, t: &Trajectory) -> Result<Vec<Vec<f32>>, TrainerError> {
        Ok(t.turns
            .iter()
            .map(|turn| vec![-1.0; turn.response.token_ids.len()])
            .collect())
    }
    fn update(
        &mut self,
        mb: &[Sample],
        _: &arpo_grpo::PolicyLossConfig,
        _: u64,
    ) -> Result<UpdateStats, TrainerError> {
        self.seen.lock().unwrap().push(
            mb.iter()
                .map(|s| (s.advantage, s.injected, s.trajectory.eval_result))
                .collect(),
        );
        Ok(UpdateStats::default())
    }
    fn save(&self, _: &Path) -> Result<(), TrainerError> {
        Ok(())
    }
    fn load(&mut self, _: &Path) -> Result<(), TrainerError> {
        Ok(())
    }
    fn describe(&self) -> String {
        "recorder".into()
    }
}

async fn replay_run(enable: bool) -> (Vec<Vec<(f64, bool, f64)>>, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let c = config(
        dir.path(),
        &[
            &format!("algorithm.enable_replay={enable}"),
            "trainer.total_episodes=2",
            "data.rollout_batch_size=1",
            "worker.rollout.n=2",
            "env.num_envs=1",
        ],
    );
    let policy = OnceThenFail {
        calls: Mutex::new(0),
    };
    let rec = Recorder::default();
    let mut t = Trainer::new(
        c,
        &policy,
        envs(1),
        rec.clone(),
        vec![button_task("s", 0, 2)],
        vec![],
        Progress::quiet(),
    )
    .unwrap();
    t.run().await.unwrap();
    let seen = rec.seen.lock().unwrap().clone();
    let metrics = read_json(&dir.path().join("results/test/training_metrics.json"));
    (seen, metrics)
}

#[tokio::test]
async fn with_replay_an_all_failed_group_with_a_stored_success_gets_nonzero_advantages() {
    let (seen, metrics) = replay_run(true).await;
    assert_eq!(seen.len(), 2, "one update per step");
    // Step 0: rewards [1, 0] → GRPO advantages ±0.7071 (mean 0.5, unbiased std 0.7071).
    let s0 = &seen[0];
    assert!(
        (s0[0].0 - 0.5 / (0.5f64.sqrt() + 1e-6)).abs() < 1e-9,
        "{s0:?}"
    );
    assert!(
        (s0[1].0 + 0.5 / (0.5f64.sqrt() + 1e-6)).abs() < 1e-9,
        "{s0:?}"
    );
    // Step 1: both own rollouts fail; the stored success replaces the first one.
    let s1 = &seen[1];
    assert!(s1[0].1, "first rollout injected");
    assert_eq!(s1[0].2, 1.0);
    assert!(s1[0].0 > 0.7 && s1[1].0 < -0.7, "{s1:?}");
    assert_eq!(metrics["steps"][1]["injected_groups"], 1);
    assert_eq!(metrics["steps"][1]["invalid_groups"], 0);
    assert_eq!(metrics["steps"][1]["all_failed_groups"], 1);
}

#[tokio::test]
async fn without_replay_the_same_run_is_plain_grpo() {
    let (seen, metrics) = replay_run(false).await;
    // Step 0 is identical.
    assert!((seen[0][0].0 - 0.5 / (0.5f64.sqrt() + 1e-6)).abs() < 1e-9);
    // Step 1: nothing injected, all-failed → zero advantages, an invalid group.
    assert!(seen[1].iter().all(|s| !s.1 && s.0 == 0.0), "{:?}", seen[1]);
    assert_eq!(metrics["steps"][1]["injected_groups"], 0);
    assert_eq!(metrics["steps"][1]["invalid_groups"], 1);
    assert_eq!(metrics["steps"][1]["replay_size"], 0);
}
