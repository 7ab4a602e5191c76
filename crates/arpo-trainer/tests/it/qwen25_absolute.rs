//! UI-TARS-1.5's protocol end to end on a Qwen2.5-VL directory (`model_type: qwen2_5_vl`, the
//! tiny fixture): a config with `env.coordinates: absolute` loads it through
//! `arpo_trainer::model::load_local`; the rollout engine maps a click written in pixels of the
//! smart-resized screenshot onto the right pixel of a 1920x1080 simulated screen; the learner
//! trains those episodes; the model's own samples are scored by the learner as they were
//! sampled; and the training loop runs a step and saves a Qwen2.5-VL checkpoint.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use arpo_core::{
    Action, AgentContext, FinishReason, Point, Policy, PolicyError, Response, SamplingParams,
    Trajectory,
};
use arpo_env_sim::Catalogue;
use arpo_env_sim::desktop::WidgetKind;
use arpo_trainer::learner::{Learner, Sample};
use arpo_trainer::model::load_local;
use arpo_trainer::rollout::{Coordinates, run_rollouts};
use arpo_trainer::setup::{Envs, build_envs};
use arpo_trainer::train::rollout_settings;
use arpo_trainer::{Config, Progress, Trainer};
use async_trait::async_trait;

fn tiny_qwen25() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/tiny-qwen25vl")
}

/// "Click the blue button.": one click on the first of four coloured buttons solves it.
const TASK: &str = "sim-colour_button-train-000";

/// UI-TARS-1.5's setting at CI size: absolute coordinates on a 1920x1080 screen with the tiny
/// model's own pixel bounds (its preprocessor_config.json: 3136..31360 pixels).
fn config(extra: &[String]) -> Config {
    let mut sets = vec![
        format!("worker.actor.model.model_path={}", tiny_qwen25().display()),
        "env.coordinates=absolute".to_string(),
        "env.screen_size=[1920, 1080]".to_string(),
        "env.num_envs=2".to_string(),
        "env.max_steps=3".to_string(),
        "worker.rollout.n=2".to_string(),
        "worker.rollout.limit_images=3".to_string(),
        "worker.actor.optim.lr=1e-2".to_string(),
        "data.max_response_length=12".to_string(),
    ];
    sets.extend(extra.iter().cloned());
    Config::from_yaml_str("", &sets).unwrap()
}

fn sim_envs(c: &Config) -> Vec<arpo_env_sim::SimEnv> {
    match build_envs(c).unwrap() {
        Envs::Sim(envs) => envs,
        Envs::Osworld(_) => panic!("the sim provider is the default"),
    }
}

/// The smart resize of a 1920x1080 screenshot within 31360 pixels, by hand: rounded to
/// multiples of 28 it would be 1932x1092 (2,109,744 pixels, too many), so both sides are
/// scaled by sqrt(1920*1080/31360) = 8.1316 and floored to multiples of 28:
/// 1920/8.1316 = 236.1 -> 224, 1080/8.1316 = 132.8 -> 112. The model sees (and writes points
/// in) a 224x112 image: 16x8 patches of 14 pixels.
const RESIZED: (u32, u32) = (224, 112);

/// The task's window opens at logical (22, 5) with its content at (24, 18); the blue button is
/// the first, 26x18 at (4, 4) in the content: logical x 28..54, y 22..40. The simulated
/// desktop draws each logical pixel as 4x4 screen pixels at 1920x1080.
///
/// The click on it, in the resized image's pixels: x = 21 / 224 * 1920 = 180,
/// y = 14 / 112 * 1080 = 135 on the screen, logical (45, 33). (Read as 0..1000 it would land on
/// screen (40, 15); against a 1932x1092 resize on (21, 14): both off the button.)
const HIT: (u32, u32) = (21, 14);
const HIT_SCREEN: (f64, f64) = (180.0, 135.0);
const HIT_LOGICAL: (i32, i32) = (45, 33);
/// A click on the orange button next to it: 35 / 224 * 1920 = 300, 135: logical (75, 33).
const MISS: (u32, u32) = (35, 14);
const MISS_SCREEN: (f64, f64) = (300.0, 135.0);
const MISS_LOGICAL: (i32, i32) = (75, 33);

/// Answers in UI-TARS-1.5's format with the tiny model's token ids: in each batch the first
/// episode clicks `HIT` and the others `MISS`, then every episode answers `finished()`.
struct Scripted {
    tokenizer: arpo_model::ChatTokenizer,
    im_end: u32,
    batches: Mutex<usize>,
}

impl Scripted {
    fn text(first_in_batch: bool, turn: usize) -> String {
        let (x, y) = if first_in_batch { HIT } else { MISS };
        match turn {
            0 => format!(
                "Thought: click the button.\nAction: click(start_box='<|box_start|>({x},{y})<|box_end|>')"
            ),
            _ => "Thought: done.\nAction: finished()".to_string(),
        }
    }
}

#[async_trait]
impl Policy for Scripted {
    async fn act(
        &self,
        contexts: &[AgentContext],
        _sampling: &SamplingParams,
    ) -> Result<Vec<Response>, PolicyError> {
        *self.batches.lock().unwrap() += 1;
        Ok(contexts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let text = Self::text(i == 0, c.responses.len());
                let mut token_ids = self.tokenizer.encode(&text).unwrap();
                token_ids.push(self.im_end);
                Response {
                    logprobs: vec![0.0; token_ids.len()],
                    token_ids,
                    text,
                    finish_reason: FinishReason::Stop,
                }
            })
            .collect())
    }

    fn describe(&self) -> String {
        "scripted UI-TARS-1.5".into()
    }
}

fn total(logprobs: &[Vec<f32>]) -> f64 {
    logprobs.iter().flatten().map(|x| f64::from(*x)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_click_lands_on_its_screen_pixel_and_the_episodes_train() {
    let c = config(&[]);
    let (policy, mut learner) = load_local(&c, 1).unwrap();
    assert!(policy.model.model.config.is_qwen25());
    let settings = rollout_settings(&c, false).unwrap();
    assert_eq!(
        settings.coordinates,
        Coordinates::Absolute {
            min_pixels: 3136,
            max_pixels: 31_360
        }
    );
    let task = Catalogue::default().task(TASK).unwrap();
    let mut envs = sim_envs(&c);
    let scripted = Scripted {
        tokenizer: arpo_model::ChatTokenizer::from_dir(&tiny_qwen25()).unwrap(),
        im_end: learner.episodes.im_end_id,
        batches: Mutex::new(0),
    };
    let report = run_rollouts(&scripted, &mut envs, &[task], &settings, 1, &mut |_| {})
        .await
        .unwrap();
    assert!(report.dropped.is_empty(), "{:?}", report.dropped);
    let group = &report.groups[0].trajectories;
    let (hit, miss) = (&group[0], &group[1]);
    assert_eq!(
        (
            hit.turns[0].screenshot.width,
            hit.turns[0].screenshot.height
        ),
        (1920, 1080)
    );
    // The parsed actions carry the hand-computed screen pixels.
    assert_eq!(
        hit.turns[0].actions,
        vec![Action::Click {
            point: Point::new(HIT_SCREEN.0, HIT_SCREEN.1)
        }]
    );
    assert_eq!(
        miss.turns[0].actions,
        vec![Action::Click {
            point: Point::new(MISS_SCREEN.0, MISS_SCREEN.1)
        }]
    );
    // The desktops' pointers went there (rollout k ran on environment k), each pressing its
    // button once, and only the click on the blue one solved the task.
    for (env, at, button) in [(0, HIT_LOGICAL, "button0"), (1, MISS_LOGICAL, "button1")] {
        let desktop = &envs[env].session().unwrap().desktop;
        assert_eq!(desktop.pointer, at);
        let kind = &desktop.widget(button).unwrap().kind;
        assert!(
            matches!(kind, WidgetKind::Button { presses: 1, .. }),
            "{button}: {kind:?}"
        );
    }
    assert_eq!((hit.eval_result, miss.eval_result), (1.0, 0.0));
    assert!(
        hit.turns
            .iter()
            .chain(&miss.turns)
            .all(|t| t.format_error.is_none())
    );

    // The model saw the same 224x112 image the coordinates refer to, in the policy and in the
    // learner.
    let rgb = arpo_model::processor::decode_screenshot(&hit.turns[0].screenshot).unwrap();
    let seen = policy
        .model
        .processor
        .preprocess(&[rgb], &candle_core::Device::Cpu)
        .unwrap();
    let grid = [1, RESIZED.1 as usize / 14, RESIZED.0 as usize / 14];
    assert_eq!(seen.grid_thw, vec![grid]);
    let built = learner.episodes.build(hit).unwrap();
    assert_eq!(built.episode.grid_thw, vec![grid; hit.turns.len()]);

    // GRPO on rewards 1 and 0: advantages +-1/sqrt(2). One update raises the hit's log-prob
    // against the miss's.
    let before: Vec<Vec<Vec<f32>>> = [hit, miss]
        .iter()
        .map(|t| learner.old_logprobs(t).unwrap())
        .collect();
    let a = std::f64::consts::FRAC_1_SQRT_2;
    let samples: Vec<Sample> = [(hit, a), (miss, -a)]
        .into_iter()
        .zip(&before)
        .map(|((t, advantage), old)| Sample {
            trajectory: t.clone(),
            advantage,
            old_logprobs: Some(old.clone()),
            injected: false,
        })
        .collect();
    let stats = learner
        .update(&samples, &arpo_grpo::PolicyLossConfig::default(), 0)
        .unwrap();
    assert!(!stats.skipped && stats.grad_norm > 0.0, "{stats:?}");
    let sampled: usize = [hit, miss]
        .iter()
        .flat_map(|t| &t.turns)
        .map(|t| t.response.token_ids.len())
        .sum();
    assert_eq!(stats.tokens, sampled);
    let (hit_after, miss_after) = (
        learner.old_logprobs(hit).unwrap(),
        learner.old_logprobs(miss).unwrap(),
    );
    let margin = |h: &[Vec<f32>], m: &[Vec<f32>]| total(h) - total(m);
    assert!(
        margin(&hit_after, &miss_after) > margin(&before[0], &before[1]),
        "hit {} -> {}, miss {} -> {}",
        total(&before[0]),
        total(&hit_after),
        total(&before[1]),
        total(&miss_after)
    );
}

/// The tiny model's own samples: as the policy sampled them (token ids, log-probs) is how the
/// learner scores them, through the absolute setting's image bounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_qwen25_policy_samples_what_its_learner_scores() {
    let c = config(&[]);
    let (policy, mut learner) = load_local(&c, 1).unwrap();
    let settings = rollout_settings(&c, false).unwrap();
    let task = Catalogue::default().task(TASK).unwrap();
    let mut envs = sim_envs(&c);
    let report = run_rollouts(&policy, &mut envs, &[task], &settings, 7, &mut |_| {})
        .await
        .unwrap();
    let group: &[Trajectory] = &report.groups[0].trajectories;
    assert_eq!(group.len(), 2);
    for t in group {
        let first = &t.turns[0].response;
        assert!(!first.token_ids.is_empty());
        let scored = learner.old_logprobs(t).unwrap();
        assert_eq!(scored[0].len(), first.logprobs.len());
        for (a, b) in scored[0].iter().zip(&first.logprobs) {
            assert!((a - b).abs() < 1e-4, "scored {a} vs sampled {b}");
        }
    }
}

/// The training loop as `cargo xtask train` runs it, one step, with the tiny Qwen2.5-VL: the
/// checkpoint it writes is a Qwen2.5-VL directory again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qwen25_run_trains_a_step_and_saves_a_qwen25_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = |name: &str| dir.path().join(name).display().to_string();
    let c = config(&[
        format!("trainer.save_checkpoint_path={}", out("checkpoints")),
        format!("trainer.results_path={}", out("results")),
        format!("trainer.logs_path={}", out("logs")),
        "trainer.experiment_name=q25".into(),
        "trainer.total_episodes=1".into(),
        "data.rollout_batch_size=1".into(),
        "worker.actor.global_batch_size=1".into(),
    ]);
    let (policy, learner) = load_local(&c, 1).unwrap();
    let tasks = vec![Catalogue::default().task(TASK).unwrap()];
    let mut trainer = Trainer::new(
        c.clone(),
        &policy,
        sim_envs(&c),
        learner,
        tasks,
        Vec::new(),
        Progress::quiet(),
    )
    .unwrap();
    assert!(!trainer.run().await.unwrap().stopped_early);
    let metrics: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("results/q25/training_metrics.json")).unwrap(),
    )
    .unwrap();
    let steps = metrics["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0]["rollouts"], 2);
    assert!(steps[0]["tokens"].as_u64().unwrap() > 0);
    let (_, ck) = arpo_trainer::train::latest_checkpoint(&dir.path().join("checkpoints/q25"))
        .expect("a checkpoint of the epoch");
    let ck: &Path = &ck;
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "qwen2_5_vl");
    let back = arpo_model::UiTars::load_dir(ck, candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    assert!(back.model.config.is_qwen25());
}

/// The shipped UI-TARS-1.5-7B config is ARPO's setting (examples/osworld_full_arpo.sh), and
/// its pixel bounds give ARPO's 1932x1092 image of a 1920x1080 screen to write points in.
#[test]
fn the_uitars15_gpu_config_is_arpos_setting() {
    use arpo_core::protocol::CoordinateSystem;
    use arpo_trainer::config::CoordinateMode;
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/config_uitars_7b_gpu.yaml");
    let c = Config::load(&path, &[]).unwrap();
    let r = &c.worker.rollout;
    assert_eq!((r.n, r.limit_images, r.temperature), (8, 15, 1.0));
    assert_eq!(r.val_override_config.temperature, 0.5);
    assert_eq!(c.env.max_steps, 15);
    assert_eq!(c.env.coordinates, CoordinateMode::Absolute);
    assert_eq!(c.env.screen_size.map(|s| s.pair()), Some((1920, 1080)));
    let m = &c.worker.actor.model;
    assert_eq!(m.dtype, arpo_model::DTypeSpec::Bf16);
    assert_eq!(m.device, arpo_model::DeviceSpec::Cuda(0));
    assert_eq!(m.lora.rank, 0, "ARPO fine-tunes every weight");
    assert!(!m.freeze_vision_tower && m.enable_gradient_checkpointing);
    let a = &c.worker.actor;
    assert_eq!(
        (a.clip_ratio_low, a.clip_ratio_high, a.optim.lr),
        (0.2, 0.3, 1e-6)
    );
    assert_eq!((a.global_batch_size, c.data.rollout_batch_size), (8, 16));
    assert!(c.algorithm.enable_replay && c.algorithm.disable_kl);
    let (min, max) = (c.data.min_pixels.unwrap(), c.data.max_pixels.unwrap());
    assert_eq!(
        CoordinateSystem::absolute_for_image(1920, 1080, min, max).unwrap(),
        CoordinateSystem::Absolute {
            resized_width: 1932,
            resized_height: 1092
        }
    );
}
