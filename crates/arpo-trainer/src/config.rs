//! The training configuration: the seed's YAML structure (`data`, `algorithm`, `worker.actor`,
//! `worker.rollout`, `env`, `trainer`), every field with a default, unknown keys rejected with
//! their full path, values validated, and `--set a.b.c=value` overrides.
//!
//! Loading goes through a YAML tree: overrides are applied to the tree first, then the tree is
//! deserialized with [`serde_path_to_error`] so an unknown or mistyped key is reported as
//! `worker.rollout.temprature` rather than "unknown field".

use std::path::{Path, PathBuf};

use arpo_core::ScreenSize;
use arpo_model::{DTypeSpec, DeviceSpec};
use serde::{Deserialize, Serialize};

use crate::TrainerError;

pub use arpo_grpo::{AdvantageEstimator as AdvEstimator, KlEstimator as KlPenalty, LossAggMode};

/// Keys of the seed's config that this trainer does not have, each with what to do instead.
/// A config that sets one is refused with that sentence (the seed's verl keys would otherwise
/// be read and silently mean nothing).
pub const REMOVED_KEYS: &[(&str, &str)] = &[
    (
        "data.max_prompt_length",
        "the prompt is bounded by worker.rollout.limit_images (screenshots kept) and env.max_steps (turns); remove the key",
    ),
    (
        "algorithm.use_kl_loss",
        "the KL term, when on, is always in the loss: use algorithm.disable_kl and algorithm.kl_coef",
    ),
    (
        "worker.actor.micro_batch_size_per_device_for_update",
        "the learner runs one trajectory per forward/backward and accumulates over the mini-batch (memory: worker.actor.model.enable_gradient_checkpointing); remove the key",
    ),
    (
        "worker.actor.micro_batch_size_per_device_for_experience",
        "old log-probs are scored one trajectory per forward; remove the key",
    ),
    (
        "worker.actor.model.trust_remote_code",
        "no model code is ever loaded from a checkpoint (UI-TARS runs on arpo-model); remove the key",
    ),
    (
        "worker.actor.optim.strategy",
        "the optimizer is AdamW (worker.actor.optim.lr, betas, eps, weight_decay); remove the key",
    ),
    (
        "trainer.project_name",
        "runs are named by trainer.experiment_name alone (checkpoints/<name>, results/<name>); remove the key",
    ),
    (
        "trainer.n_gpus_per_node",
        "the device is worker.actor.model.device (cpu, cuda:N, metal); remove the key",
    ),
    (
        "trainer.nnodes",
        "one trainer process; scale rollouts out with worker.rollout.use_external_server and env.remote.guest_urls; remove the key",
    ),
    (
        "algorithm.replay.enabled",
        "replay is switched by algorithm.enable_replay",
    ),
    (
        "trainer.use_cpu",
        "the device is worker.actor.model.device (cpu, cuda:N, metal); remove the key",
    ),
];

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub data: DataConfig,
    pub algorithm: AlgorithmConfig,
    pub worker: WorkerConfig,
    pub env: EnvConfig,
    pub trainer: TrainerConfig,
}

/// `data`: which tasks, how many per step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Training tasks: `sim:train`, `sim:heldout` (the embedded desktop's splits) or the path of a
    /// task index (`{domain: [ids]}` JSON, or a JSON list of tasks).
    pub train_files: String,
    /// Held-out tasks for validation (same forms as `train_files`); empty: no validation set.
    pub val_files: String,
    /// Keep only the first N training tasks (the seed's 8-task subset); 0 keeps all.
    pub max_tasks: usize,
    /// Tasks per training step; each is rolled out `worker.rollout.n` times.
    pub rollout_batch_size: usize,
    /// Shuffle the task order every epoch (seeded).
    pub shuffle: bool,
    /// Seed of everything random in the run (task order, sampling, replay draws).
    pub seed: u64,
    /// Longest response in tokens (generation stops there).
    pub max_response_length: usize,
    /// Image preprocessing bounds (`smart_resize`) for the model's image processor, the learner
    /// and the absolute-coordinate mapping alike; absent: the model's `preprocessor_config.json`.
    pub max_pixels: Option<u64>,
    pub min_pixels: Option<u64>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            train_files: "sim:train".into(),
            val_files: String::new(),
            max_tasks: 0,
            rollout_batch_size: 8,
            shuffle: true,
            seed: 1,
            max_response_length: 256,
            max_pixels: None,
            min_pixels: None,
        }
    }
}

/// `algorithm`: advantages, KL, replay, the rollout importance weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlgorithmConfig {
    pub adv_estimator: AdvEstimator,
    /// ARPO's experience replay; `false` is plain GRPO with the run otherwise identical.
    pub enable_replay: bool,
    /// No KL term and no reference model (the reference setting). `false` needs a reference
    /// model, which the candle learner does not keep: refused at load.
    pub disable_kl: bool,
    pub kl_penalty: KlPenalty,
    pub kl_coef: f64,
    /// The replay buffer's knobs (arpo-replay's own config; the seed's names `fail_std`,
    /// `fail_mean`, `inject_per_group` are accepted). Its switch is `enable_replay`.
    pub replay: arpo_replay::ReplayConfig,
    /// Truncated importance sampling for a sampler that differs from the learner (8-bit/4-bit
    /// rollout weights, vLLM, SGLang; verl's `tis_imp_ratio_cap`): each trained token's
    /// policy-gradient term is multiplied by `min(exp(learner_old_logp − sampler_logp), cap)`.
    /// `None` (the default, ARPO's setting) is off; when set, a finite number > 0 (2 is usual).
    pub rollout_is_cap: Option<f64>,
}

impl Default for AlgorithmConfig {
    fn default() -> Self {
        Self {
            adv_estimator: AdvEstimator::Grpo,
            enable_replay: true,
            disable_kl: true,
            kl_penalty: KlPenalty::LowVarKl,
            kl_coef: 0.0,
            replay: arpo_replay::ReplayConfig::default(),
            rollout_is_cap: None,
        }
    }
}

/// `worker`: the actor (learner) and the rollout (sampler).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    pub actor: ActorConfig,
    pub rollout: RolloutConfig,
}

/// `worker.actor`: the update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActorConfig {
    /// Groups (tasks) per optimizer step; a step's `rollout_batch_size` tasks make
    /// `rollout_batch_size / global_batch_size` optimizer steps.
    pub global_batch_size: usize,
    pub max_grad_norm: f64,
    pub clip_ratio_low: f64,
    pub clip_ratio_high: f64,
    pub clip_ratio_dual: f64,
    pub loss_agg_mode: LossAggMode,
    /// Passes over each batch (the reference: 1).
    pub ppo_epochs: usize,
    pub model: ModelConfig,
    pub optim: OptimConfig,
}

impl Default for ActorConfig {
    fn default() -> Self {
        Self {
            global_batch_size: 8,
            max_grad_norm: 1.0,
            clip_ratio_low: 0.2,
            clip_ratio_high: 0.3,
            clip_ratio_dual: 3.0,
            loss_agg_mode: LossAggMode::SeqMeanTokenMean,
            ppo_epochs: 1,
            model: ModelConfig::default(),
            optim: OptimConfig::default(),
        }
    }
}

/// `worker.actor.model`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// An HF-layout directory (config.json, safetensors, tokenizer.json).
    pub model_path: PathBuf,
    /// Train the vision tower too (full fine-tuning only).
    pub freeze_vision_tower: bool,
    /// Recompute decoder layers and vision blocks in the backward pass instead of keeping their
    /// activations: much less memory for one more forward pass per update.
    pub enable_gradient_checkpointing: bool,
    /// `f32` (CPU) or `bf16` (GPU).
    pub dtype: DTypeSpec,
    /// `cpu`, `cuda`, `cuda:N` or `metal` (the latter two need a build with that feature).
    pub device: DeviceSpec,
    pub lora: LoraConfig,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            model_path: PathBuf::from("fixtures/models/uitars-tiny-base"),
            freeze_vision_tower: false,
            enable_gradient_checkpointing: false,
            dtype: DTypeSpec::F32,
            device: DeviceSpec::Cpu,
            lora: LoraConfig::default(),
        }
    }
}

/// `worker.actor.model.lora`: rank 0 means full fine-tuning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 0,
            alpha: 32.0,
            dropout: 0.0,
            target_modules: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// `worker.actor.optim`: AdamW.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    /// Fraction of the total optimizer steps spent on a linear warmup.
    pub lr_warmup_ratio: f64,
    /// The rate after the warmup (verl/EasyR1's key): `constant`, or `cosine` down to
    /// `min_lr_ratio * lr` at the run's last optimizer step.
    pub warmup_style: WarmupStyle,
    /// The cosine schedule's floor, as a fraction of `lr` (verl/EasyR1's key; unused by `constant`).
    pub min_lr_ratio: f64,
}

/// `worker.actor.optim.warmup_style`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WarmupStyle {
    Constant,
    Cosine,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-6,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 1e-2,
            lr_warmup_ratio: 0.0,
            warmup_style: WarmupStyle::Constant,
            min_lr_ratio: 0.0,
        }
    }
}

/// `worker.rollout`: sampling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutConfig {
    /// Rollouts per task (the group size).
    pub n: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// -1: no top-k cut.
    pub top_k: i64,
    /// Screenshots kept in the prompt (oldest dropped, their text kept).
    pub limit_images: usize,
    /// Sample from an OpenAI-compatible server instead of the in-process model.
    pub use_external_server: bool,
    pub server_url: String,
    /// The served model name sent in requests (empty: the first model the server's
    /// `GET /v1/models` lists).
    pub server_model: String,
    /// More servers besides `server_url` (same model): requests are spread over all of them,
    /// a server that fails is retried elsewhere, and weights are pushed to each.
    pub server_urls: Vec<String>,
    /// Sent as `Authorization: Bearer <key>` to the server(s) (`serve --api-key`, vLLM's
    /// `--api-key`); unset: the `ARPO_SERVER_API_KEY` environment variable, if any.
    pub server_api_key: Option<String>,
    /// How trained weights reach the server(s): `lora_adapter` (vLLM, arpo-serve:
    /// `/v1/load_lora_adapter`), `sglang_disk` (SGLang: `/update_weights_from_disk`),
    /// `arpo_reload` (arpo-serve, full weights: `/v1/reload_weights`), `none`, or `auto`
    /// (`lora_adapter` when training LoRA, else `arpo_reload`).
    pub weight_sync: String,
    /// Automatic prefix caching of the in-process rollout model, in MiB (0: off): the keys and
    /// values of prompt blocks and the features of screenshots are kept between turns, so a
    /// turn computes only what its history does not already hold (every turn resends the
    /// whole history). Cleared after every update. `serve --prefix-cache-mib` for a server.
    /// 2048 by default: at the 2B model's 57 KB of keys and values per token, the history of
    /// one 10-screenshot 1080p episode (28k tokens) fits, and the f32 model (9 GB) with it on
    /// a 24 GB machine.
    pub prefix_cache_mib: usize,
    /// The weights the in-process rollout model reads: `f32` (the learner's own tensors),
    /// `bf16`, `q8_0` (8-bit) or `q4k` (4-bit). The learner stays f32. With LoRA the adapters
    /// are shared, f32, on top of the quantized base, so rollouts follow every update with no
    /// copy; under full fine-tuning the quantized copy is stored again from the learner after
    /// every update. `serve --weights` for a server.
    pub weights: arpo_model::RolloutWeights,
    /// Settings for validation rollouts.
    pub val_override_config: ValOverride,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        Self {
            n: 8,
            temperature: 1.0,
            top_p: 1.0,
            top_k: -1,
            limit_images: 15,
            use_external_server: false,
            server_url: "http://localhost:9000/v1".into(),
            server_model: String::new(),
            server_urls: Vec::new(),
            server_api_key: None,
            weight_sync: "auto".into(),
            prefix_cache_mib: 2048,
            weights: arpo_model::RolloutWeights::F32,
            val_override_config: ValOverride::default(),
        }
    }
}

/// `worker.rollout.val_override_config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValOverride {
    pub temperature: f64,
    pub top_p: f64,
    pub n: usize,
}

impl Default for ValOverride {
    fn default() -> Self {
        Self {
            temperature: 0.5,
            top_p: 1.0,
            n: 1,
        }
    }
}

/// Where episodes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvProvider {
    /// The embedded simulated desktop (`arpo-env-sim`).
    Sim,
    /// OSWorld VMs under VMware (`arpo-env-vmware`).
    Vmware,
    /// OSWorld guest servers reached by URL (`arpo-env-vmware`'s remote client).
    Remote,
}

/// How the model writes coordinates (`env.coordinates`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CoordinateMode {
    /// 0..1000 across the screen (UI-TARS-2B/7B on Qwen2-VL).
    #[default]
    Relative,
    /// Pixels of the smart-resized screenshot (UI-TARS-1.5 on Qwen2.5-VL).
    Absolute,
}

/// `env`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnvConfig {
    pub provider: EnvProvider,
    /// Environments running in parallel.
    pub num_envs: usize,
    /// Turns per episode.
    pub max_steps: usize,
    /// Attempts at `reset` before a rollout is dropped (and recorded).
    pub reset_retries: usize,
    /// Screen size `[width, height]`: the simulated desktop's size, and for VMware/remote the
    /// size every screenshot must have (a VM at another resolution stops the run at its first
    /// reset). Absent: the provider's default (sim), any size (VMware/remote).
    pub screen_size: Option<ScreenSize>,
    /// Coordinates the model writes: `relative` (0..1000, UI-TARS / Qwen2-VL) or `absolute`
    /// (pixels of the smart-resized image, UI-TARS-1.5 / Qwen2.5-VL).
    pub coordinates: CoordinateMode,
    pub vmware: VmwareConfig,
    pub remote: RemoteConfig,
    /// How OSWorld tasks are scored (VMware and remote providers).
    pub osworld: OsworldConfig,
}

/// `env.osworld`: the evaluator of OSWorld tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OsworldConfig {
    /// `auto` (our native evaluator when it has every setup step, getter and metric of the
    /// task, else OSWorld's own through a Python worker), `native` (refuse tasks it lacks) or
    /// `osworld` (always OSWorld's).
    pub evaluator: arpo_env_vmware::EvaluatorBackend,
    /// The Python that has OSWorld's `desktop-env` installed (the worker's interpreter).
    pub python: String,
    /// Largest file a setup step may download, in bytes.
    pub max_download_bytes: u64,
}

impl Default for OsworldConfig {
    fn default() -> Self {
        let env = arpo_env_vmware::EnvConfig::default();
        Self {
            evaluator: env.osworld.evaluator,
            python: env.osworld.python,
            max_download_bytes: env.max_download_bytes,
        }
    }
}

impl Default for EnvConfig {
    fn default() -> Self {
        Self {
            provider: EnvProvider::Sim,
            num_envs: 4,
            max_steps: 15,
            reset_retries: 8,
            screen_size: None,
            coordinates: CoordinateMode::Relative,
            vmware: VmwareConfig::default(),
            remote: RemoteConfig::default(),
            osworld: OsworldConfig::default(),
        }
    }
}

/// `env.vmware`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VmwareConfig {
    /// The `.vmx` of each VM (one per environment; `num_envs` at most this many).
    pub vm_paths: Vec<PathBuf>,
    /// `vmrun` (looked up on PATH when bare).
    pub vmrun: String,
    /// `fusion` (macOS) or `ws` (Workstation).
    pub host_type: String,
    pub snapshot_name: String,
    pub headless: bool,
    /// Pause the VM while the model thinks (an idle guest locks its screen otherwise).
    pub pause_during_inference: bool,
    /// OSWorld task JSONs (`evaluation_examples`).
    pub examples_dir: PathBuf,
}

impl Default for VmwareConfig {
    fn default() -> Self {
        Self {
            vm_paths: Vec::new(),
            vmrun: "vmrun".into(),
            host_type: "fusion".into(),
            snapshot_name: "init_state".into(),
            headless: true,
            pause_during_inference: true,
            examples_dir: PathBuf::from("evaluation_examples"),
        }
    }
}

/// `env.remote`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RemoteConfig {
    /// Base URLs of OSWorld guest servers (`http://host:5000`), one per environment.
    pub guest_urls: Vec<String>,
}

/// A metrics sink (`trainer.logger`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Logger {
    Console,
    Jsonl,
    Tensorboard,
}

/// `trainer`: run control and outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainerConfig {
    /// Epochs over the training tasks.
    pub total_episodes: usize,
    pub experiment_name: String,
    /// Where metrics go besides `results/<exp>/training_metrics.json`: `console` (progress bar
    /// and the epoch table), `jsonl` (one line per step in `results/<exp>/metrics.jsonl`),
    /// `tensorboard` (event files under `results/<exp>/tensorboard/`).
    pub logger: Vec<Logger>,
    /// What `results/<exp>/episodes/` keeps for the dashboard.
    pub episodes: arpo_dashboard::Retention,
    /// Validate every N epochs (0 or less: never).
    pub val_freq: i64,
    pub val_before_train: bool,
    /// Save a checkpoint every N epochs (0 or less: only at the end).
    pub save_freq: i64,
    /// Checkpoints kept (0 or less: all).
    pub save_limit: i64,
    /// `checkpoints/`: checkpoints go to `<save_checkpoint_path>/<experiment_name>/epoch_<N>/`.
    pub save_checkpoint_path: PathBuf,
    /// `results/`: metrics go to `<results_path>/<experiment_name>/`.
    pub results_path: PathBuf,
    /// `logs/`: `training.log` goes there.
    pub logs_path: PathBuf,
    /// Resume from this checkpoint directory, or `latest` (the newest complete `epoch_<N>` of
    /// this experiment); empty: start fresh. `cargo xtask train --resume [DIR]` overrides it.
    pub load_checkpoint_path: String,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            total_episodes: 5,
            experiment_name: "uitars_arpo".into(),
            logger: vec![Logger::Console],
            episodes: arpo_dashboard::Retention::default(),
            val_freq: -1,
            val_before_train: false,
            save_freq: 1,
            save_limit: -1,
            save_checkpoint_path: PathBuf::from("checkpoints"),
            results_path: PathBuf::from("results"),
            logs_path: PathBuf::from("logs"),
            load_checkpoint_path: String::new(),
        }
    }
}

impl Config {
    /// Parses YAML text, applies `overrides` (`a.b.c=value`), and validates.
    pub fn from_yaml_str(text: &str, overrides: &[String]) -> Result<Self, TrainerError> {
        let mut tree: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| TrainerError::ConfigSyntax {
                reason: e.to_string(),
            })?;
        if tree.is_null() {
            tree = serde_yaml::Value::Mapping(Default::default());
        }
        for o in overrides {
            apply_override(&mut tree, o)?;
        }
        refuse_removed_keys(&tree)?;
        let config: Config = serde_path_to_error::deserialize(tree).map_err(|e| {
            let path = e.path().to_string();
            TrainerError::ConfigKey {
                path,
                reason: e.into_inner().to_string(),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a YAML file, applies `overrides`, and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, TrainerError> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainerError::io(path, e))?;
        Self::from_yaml_str(&text, overrides).map_err(|e| e.in_file(path))
    }

    /// The configuration as YAML (what a run saves beside its results).
    pub fn to_yaml(&self) -> String {
        let Ok(mut tree) = serde_yaml::to_value(self) else {
            return String::new();
        };
        // arpo-replay's own switch; here it is `algorithm.enable_replay`.
        if let Some(serde_yaml::Value::Mapping(replay)) =
            tree.get_mut("algorithm").and_then(|a| a.get_mut("replay"))
        {
            replay.remove("enabled");
        }
        serde_yaml::to_string(&tree).unwrap_or_default()
    }

    /// Checks every value; the error lists all problems, each with the key and what is allowed.
    pub fn validate(&self) -> Result<(), TrainerError> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, msg: String| {
            if !ok {
                problems.push(msg);
            }
        };
        let d = &self.data;
        check(
            !d.train_files.trim().is_empty(),
            "data.train_files must name the training tasks (`sim:train` or a task index path)"
                .into(),
        );
        check(
            d.rollout_batch_size >= 1,
            format!(
                "data.rollout_batch_size must be at least 1 (got {})",
                d.rollout_batch_size
            ),
        );
        check(
            d.max_response_length >= 1,
            "data.max_response_length must be at least 1".into(),
        );
        if let (Some(min), Some(max)) = (d.min_pixels, d.max_pixels) {
            check(
                min <= max,
                format!("data.min_pixels ({min}) must not exceed data.max_pixels ({max})"),
            );
        }
        for (key, v) in [("min_pixels", d.min_pixels), ("max_pixels", d.max_pixels)] {
            check(
                v.is_none_or(|v| v >= 28 * 28),
                format!("data.{key} must be at least 784 (one 28x28 merged patch), got {v:?}"),
            );
        }
        let a = &self.algorithm;
        check(
            a.kl_coef >= 0.0 && a.kl_coef.is_finite(),
            format!("algorithm.kl_coef must be >= 0 (got {})", a.kl_coef),
        );
        check(
            a.disable_kl,
            "algorithm.disable_kl: false needs a reference model, which the candle learner does not keep: set algorithm.disable_kl: true (ARPO's setting)".into(),
        );
        if let Some(cap) = a.rollout_is_cap {
            check(
                cap > 0.0 && cap.is_finite(),
                format!(
                    "algorithm.rollout_is_cap must be a finite number > 0 (2 is usual), or null to turn truncated importance sampling off (got {cap})"
                ),
            );
        }
        let r = &a.replay;
        check(
            r.capacity >= 1,
            "algorithm.replay.capacity must be at least 1".into(),
        );
        check(
            (0.0..=1.0).contains(&r.success_threshold),
            format!(
                "algorithm.replay.success_threshold must be in [0, 1] (got {})",
                r.success_threshold
            ),
        );
        check(
            r.failed_std_below >= 0.0 && r.failed_mean_below.is_finite(),
            "algorithm.replay.fail_std must be >= 0 and fail_mean finite".into(),
        );
        let act = &self.worker.actor;
        check(
            act.global_batch_size >= 1,
            "worker.actor.global_batch_size must be at least 1".into(),
        );
        check(
            d.rollout_batch_size
                .is_multiple_of(act.global_batch_size.max(1)),
            format!(
                "data.rollout_batch_size ({}) must be a multiple of worker.actor.global_batch_size ({})",
                d.rollout_batch_size, act.global_batch_size
            ),
        );
        check(
            act.max_grad_norm > 0.0,
            format!(
                "worker.actor.max_grad_norm must be > 0 (got {})",
                act.max_grad_norm
            ),
        );
        check(
            (0.0..1.0).contains(&act.clip_ratio_low),
            format!(
                "worker.actor.clip_ratio_low must be in [0, 1) (got {})",
                act.clip_ratio_low
            ),
        );
        check(
            act.clip_ratio_high >= 0.0,
            format!(
                "worker.actor.clip_ratio_high must be >= 0 (got {})",
                act.clip_ratio_high
            ),
        );
        check(
            act.clip_ratio_dual > 1.0,
            format!(
                "worker.actor.clip_ratio_dual must be > 1 (got {})",
                act.clip_ratio_dual
            ),
        );
        check(
            act.ppo_epochs >= 1,
            "worker.actor.ppo_epochs must be at least 1".into(),
        );
        let m = &act.model;
        check(
            m.lora.rank == 0 || m.lora.alpha > 0.0,
            "worker.actor.model.lora.alpha must be > 0 when lora.rank > 0".into(),
        );
        check(
            (0.0..1.0).contains(&m.lora.dropout),
            "worker.actor.model.lora.dropout must be in [0, 1)".into(),
        );
        let o = &act.optim;
        check(
            o.lr > 0.0 && o.lr.is_finite(),
            format!("worker.actor.optim.lr must be > 0 (got {})", o.lr),
        );
        check(
            o.betas.iter().all(|b| (0.0..1.0).contains(b)),
            format!(
                "worker.actor.optim.betas must both be in [0, 1) (got {:?})",
                o.betas
            ),
        );
        check(
            o.weight_decay >= 0.0,
            "worker.actor.optim.weight_decay must be >= 0".into(),
        );
        check(
            (0.0..=1.0).contains(&o.lr_warmup_ratio),
            "worker.actor.optim.lr_warmup_ratio must be in [0, 1]".into(),
        );
        check(
            (0.0..=1.0).contains(&o.min_lr_ratio),
            format!(
                "worker.actor.optim.min_lr_ratio must be in [0, 1] (got {})",
                o.min_lr_ratio
            ),
        );
        let ro = &self.worker.rollout;
        check(
            ro.n >= 1,
            format!("worker.rollout.n must be at least 1 (got {})", ro.n),
        );
        check(
            ro.temperature >= 0.0,
            format!(
                "worker.rollout.temperature must be >= 0 (got {})",
                ro.temperature
            ),
        );
        check(
            ro.top_p > 0.0 && ro.top_p <= 1.0,
            format!("worker.rollout.top_p must be in (0, 1] (got {})", ro.top_p),
        );
        check(
            ro.limit_images >= 1,
            "worker.rollout.limit_images must be at least 1".into(),
        );
        check(
            !ro.use_external_server
                || ro.server_url.starts_with("http://")
                || ro.server_url.starts_with("https://"),
            format!(
                "worker.rollout.server_url must be an http(s) URL when use_external_server is true (got {:?})",
                ro.server_url
            ),
        );
        if ro.weights != arpo_model::RolloutWeights::F32 {
            check(
                !ro.use_external_server,
                format!(
                    "worker.rollout.weights {} is for the in-process rollout model: a server reads its own (serve --weights); leave it at f32",
                    ro.weights
                ),
            );
        }
        check(
            ro.val_override_config.n >= 1 && ro.val_override_config.temperature >= 0.0,
            "worker.rollout.val_override_config needs n >= 1 and temperature >= 0".into(),
        );
        let e = &self.env;
        check(
            e.num_envs >= 1,
            format!("env.num_envs must be at least 1 (got {})", e.num_envs),
        );
        check(
            e.max_steps >= 1,
            format!("env.max_steps must be at least 1 (got {})", e.max_steps),
        );
        check(
            e.reset_retries >= 1,
            "env.reset_retries must be at least 1".into(),
        );
        check(
            e.provider != EnvProvider::Vmware || !e.vmware.vm_paths.is_empty(),
            "env.vmware.vm_paths must list at least one .vmx when env.provider is vmware".into(),
        );
        check(
            e.provider != EnvProvider::Vmware || e.vmware.vm_paths.len() >= e.num_envs,
            format!(
                "env.num_envs ({}) is more than the VMs in env.vmware.vm_paths ({})",
                e.num_envs,
                e.vmware.vm_paths.len()
            ),
        );
        check(
            e.provider != EnvProvider::Remote || e.remote.guest_urls.len() >= e.num_envs,
            format!(
                "env.remote.guest_urls must list one URL per environment (num_envs {}, urls {})",
                e.num_envs,
                e.remote.guest_urls.len()
            ),
        );
        let t = &self.trainer;
        check(
            t.total_episodes >= 1,
            "trainer.total_episodes must be at least 1".into(),
        );
        check(
            !t.experiment_name.is_empty()
                && !t.experiment_name.contains(['/', '\\'])
                && t.experiment_name != ".."
                && t.experiment_name != ".",
            format!(
                "trainer.experiment_name must be a plain directory name (got {:?})",
                t.experiment_name
            ),
        );
        if problems.is_empty() {
            Ok(())
        } else {
            Err(TrainerError::ConfigInvalid { problems })
        }
    }

    /// The sampling settings of training rollouts.
    pub fn train_sampling(&self) -> arpo_core::SamplingParams {
        let r = &self.worker.rollout;
        arpo_core::SamplingParams {
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k,
            max_tokens: self.data.max_response_length,
            seed: None,
        }
    }

    /// The sampling settings of validation rollouts (`val_override_config`).
    pub fn val_sampling(&self) -> arpo_core::SamplingParams {
        let v = &self.worker.rollout.val_override_config;
        arpo_core::SamplingParams {
            temperature: v.temperature,
            top_p: v.top_p,
            top_k: self.worker.rollout.top_k,
            max_tokens: self.data.max_response_length,
            seed: None,
        }
    }

    /// `<save_checkpoint_path>/<experiment_name>`.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.trainer
            .save_checkpoint_path
            .join(&self.trainer.experiment_name)
    }

    /// `<results_path>/<experiment_name>`.
    pub fn results_dir(&self) -> PathBuf {
        self.trainer
            .results_path
            .join(&self.trainer.experiment_name)
    }
}

/// Refuses a tree that sets a key of [`REMOVED_KEYS`], naming its replacement.
fn refuse_removed_keys(tree: &serde_yaml::Value) -> Result<(), TrainerError> {
    for (path, instead) in REMOVED_KEYS {
        let mut node = Some(tree);
        for part in path.split('.') {
            node = node.and_then(|n| n.get(part));
        }
        if node.is_some() {
            return Err(TrainerError::ConfigKey {
                path: (*path).to_string(),
                reason: format!("this key does nothing here and is refused: {instead}"),
            });
        }
    }
    Ok(())
}

/// Applies one `a.b.c=value` override to a YAML tree; `value` is parsed as YAML
/// (`1e-6`, `true`, `[0.9, 0.99]`, `text`). Missing intermediate mappings are created; a key
/// that does not exist in the schema is then rejected by deserialization, with its path.
pub fn apply_override(tree: &mut serde_yaml::Value, spec: &str) -> Result<(), TrainerError> {
    let bad = |reason: &str| TrainerError::ConfigOverride {
        spec: spec.to_string(),
        reason: reason.to_string(),
    };
    let (key, value) = spec
        .split_once('=')
        .ok_or_else(|| bad("expected KEY=VALUE, like worker.actor.optim.lr=1e-6"))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(bad("the key must be dotted names, like trainer.save_freq"));
    }
    let value: serde_yaml::Value = serde_yaml::from_str(value)
        .map_err(|e| bad(&format!("the value is not valid YAML: {e}")))?;
    let mut node = tree;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let map = match node {
            serde_yaml::Value::Mapping(m) => m,
            serde_yaml::Value::Null => {
                *node = serde_yaml::Value::Mapping(Default::default());
                match node {
                    serde_yaml::Value::Mapping(m) => m,
                    _ => return Err(bad("internal: mapping expected")),
                }
            }
            _ => {
                return Err(bad(&format!(
                    "{} is a value, not a section",
                    parts[..i].join(".")
                )));
            }
        };
        let k = serde_yaml::Value::String((*part).to_string());
        if i + 1 == parts.len() {
            map.insert(k, value);
            return Ok(());
        }
        node = map
            .entry(k)
            .or_insert(serde_yaml::Value::Mapping(Default::default()));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn empty_yaml_gives_the_reference_defaults() {
        let c = Config::from_yaml_str("", &[]).unwrap();
        assert_eq!(c, Config::default());
        // The reference's numbers (ARPO.md).
        assert_eq!(c.worker.actor.clip_ratio_low, 0.2);
        assert_eq!(c.worker.actor.clip_ratio_high, 0.3);
        assert_eq!(c.worker.actor.clip_ratio_dual, 3.0);
        assert_eq!(c.worker.actor.optim.lr, 1e-6);
        assert_eq!(c.worker.actor.optim.weight_decay, 1e-2);
        assert_eq!(c.algorithm.replay.capacity, 8);
        assert_eq!(c.env.max_steps, 15);
        assert_eq!(c.worker.rollout.val_override_config.temperature, 0.5);
    }

    #[test]
    fn unknown_key_is_reported_with_its_full_path() {
        let err = Config::from_yaml_str("worker:\n  rollout:\n    temprature: 0.7\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("worker.rollout.temprature"), "{err}");
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn wrong_type_is_reported_with_its_path() {
        let err = Config::from_yaml_str("env:\n  num_envs: many\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("env.num_envs"), "{err}");
    }

    #[test]
    fn set_overrides_apply_and_parse_as_yaml() {
        let c = Config::from_yaml_str(
            "worker:\n  actor:\n    optim:\n      lr: 1.0e-5\n",
            &[
                "worker.actor.optim.lr=1e-6".into(),
                "algorithm.enable_replay=false".into(),
                "worker.actor.optim.betas=[0.9, 0.95]".into(),
                "trainer.experiment_name=grpo_run".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.worker.actor.optim.lr, 1e-6);
        assert!(!c.algorithm.enable_replay);
        assert_eq!(c.worker.actor.optim.betas, [0.9, 0.95]);
        assert_eq!(c.trainer.experiment_name, "grpo_run");
    }

    #[test]
    fn set_with_a_typo_names_the_key() {
        let err = Config::from_yaml_str("", &["worker.actor.optim.lrr=1e-6".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("worker.actor.optim.lrr"), "{err}");
    }

    #[test]
    fn set_without_equals_is_rejected() {
        let err = Config::from_yaml_str("", &["worker.actor.optim.lr".into()]).unwrap_err();
        assert!(matches!(err, TrainerError::ConfigOverride { .. }));
    }

    #[test]
    fn set_into_a_scalar_is_rejected() {
        // Present in the file: the override itself is refused.
        let err = Config::from_yaml_str("env:\n  num_envs: 2\n", &["env.num_envs.x=1".into()])
            .unwrap_err();
        assert!(err.to_string().contains("env.num_envs is a value"), "{err}");
        // Absent: the tree gets a section there, which deserialization refuses by path.
        let err = Config::from_yaml_str("", &["env.num_envs.x=1".into()]).unwrap_err();
        assert!(err.to_string().contains("env.num_envs"), "{err}");
    }

    #[test]
    fn validation_lists_every_problem_with_its_key() {
        let err = Config::from_yaml_str(
            "",
            &[
                "worker.rollout.n=0".into(),
                "env.num_envs=0".into(),
                "worker.rollout.top_p=1.5".into(),
            ],
        )
        .unwrap_err();
        match err {
            TrainerError::ConfigInvalid { problems } => {
                assert_eq!(problems.len(), 3, "{problems:?}");
                assert!(problems[0].starts_with("worker.rollout.n"));
            }
            other => panic!("expected ConfigInvalid, got {other}"),
        }
    }

    #[test]
    fn rollout_is_cap_is_off_by_default_accepted_when_positive_and_refused_otherwise() {
        let c = Config::from_yaml_str("", &[]).unwrap();
        assert_eq!(c.algorithm.rollout_is_cap, None);
        assert_eq!(crate::train::loss_config(&c).rollout_is_cap, None);
        let c = Config::from_yaml_str("algorithm:\n  rollout_is_cap: 2.0\n", &[]).unwrap();
        assert_eq!(c.algorithm.rollout_is_cap, Some(2.0));
        assert_eq!(crate::train::loss_config(&c).rollout_is_cap, Some(2.0));
        let c = Config::from_yaml_str(
            "algorithm:\n  rollout_is_cap: 2.0\n",
            &["algorithm.rollout_is_cap=null".into()],
        )
        .unwrap();
        assert_eq!(c.algorithm.rollout_is_cap, None);
        for bad in ["-1", "0", ".inf", ".nan"] {
            let err = Config::from_yaml_str("", &[format!("algorithm.rollout_is_cap={bad}")])
                .unwrap_err();
            match &err {
                TrainerError::ConfigInvalid { problems } => {
                    assert_eq!(problems.len(), 1, "{problems:?}");
                    assert!(
                        problems[0].starts_with("algorithm.rollout_is_cap must be"),
                        "{problems:?}"
                    );
                }
                other => panic!("{bad}: expected ConfigInvalid, got {other}"),
            }
        }
    }

    #[test]
    fn batch_sizes_must_divide() {
        let err = Config::from_yaml_str(
            "",
            &[
                "data.rollout_batch_size=3".into(),
                "worker.actor.global_batch_size=2".into(),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("must be a multiple"), "{err}");
    }

    #[test]
    fn cosine_schedule_keys_reach_the_optimizer() {
        use arpo_model::train::optim::LrSchedule;
        let c = Config::from_yaml_str(
            "",
            &[
                "worker.actor.optim.warmup_style=cosine".into(),
                "worker.actor.optim.min_lr_ratio=0.25".into(),
                "worker.actor.optim.lr_warmup_ratio=0.1".into(),
            ],
        )
        .unwrap();
        let a = crate::model::adamw_config(&c, 40);
        assert_eq!(a.warmup_steps, 4);
        assert_eq!(
            a.schedule,
            LrSchedule::Cosine {
                total_steps: 40,
                min_lr_ratio: 0.25
            }
        );
        // The default stays constant; a ratio outside [0, 1] is refused by name.
        let d = Config::from_yaml_str("", &[]).unwrap();
        assert_eq!(
            crate::model::adamw_config(&d, 40).schedule,
            LrSchedule::Constant
        );
        let err = Config::from_yaml_str("", &["worker.actor.optim.min_lr_ratio=2".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("min_lr_ratio"), "{err}");
    }

    #[test]
    fn config_round_trips_through_yaml() {
        let c = Config::from_yaml_str(
            "",
            &[
                "env.provider=vmware".into(),
                "env.vmware.vm_paths=[a.vmx]".into(),
                "env.num_envs=1".into(),
            ],
        )
        .unwrap();
        let back = Config::from_yaml_str(&c.to_yaml(), &[]).unwrap();
        assert_eq!(c, back);
    }
}
