//! The candle UI-TARS model as the run's policy and learner.
//!
//! [`load_local`] loads one checkpoint and makes two views of the same weights: a
//! [`LocalPolicy`] for rollouts and a [`CandleLearner`] for updates. The trainable tensors are
//! shared (candle `Var`s update their storage in place), so the policy acts with the new
//! weights as soon as an update returns; nothing is copied.
//!
//! A trajectory is trained as one sequence, as in ARPO: system, instruction, the screenshots the
//! last turn's prompt carried (at most `limit_images`, older ones dropped, their responses
//! kept), and every assistant turn. The assistant turns hold the exact sampled token ids (never
//! a re-tokenization of the decoded text), and only those tokens are scored.

use std::path::{Path, PathBuf};

use arpo_core::protocol::{PromptConfig, PromptTemplate, build_messages};
use arpo_core::{ChatMessage, Role, Trajectory};
use arpo_grpo::{BatchCount, PolicyLossConfig, PolicyLossInputs, policy_loss};
use arpo_model::processor::decode_screenshot;
use arpo_model::train::checkpoint::load_safetensors;
use arpo_model::train::lora::{LoraConfig, LoraSet};
use arpo_model::train::optim::{AdamW, AdamWConfig, LrSchedule};
use arpo_model::train::score::Episode;
use arpo_model::train::trainable::{MODEL_WEIGHTS, Trainable};
use arpo_model::{ChatTokenizer, ImageProcessor, LocalPolicy, UiTars};
use candle_core::{DType, Device, Tensor};

use crate::TrainerError;
use crate::config::{Config, CoordinateMode, WarmupStyle};
use crate::learner::{Learner, Sample, UpdateStats};

fn learner_err(what: &str, e: impl Into<crate::error::BoxError>) -> TrainerError {
    TrainerError::learner(what, e)
}

/// The image preprocessing bounds of a run: `data.min_pixels`/`data.max_pixels` where set, the
/// model's `preprocessor_config.json` for the rest. The image processor of the rollout policy,
/// the learner's and the absolute-coordinate mapping all use these, so they agree on one resize.
pub fn pixel_bounds(config: &Config) -> Result<(u64, u64), TrainerError> {
    let pre = config
        .worker
        .actor
        .model
        .model_path
        .join("preprocessor_config.json");
    let model = if pre.is_file() {
        arpo_model::PreprocessorConfig::from_file(&pre)
            .map_err(|e| learner_err("reading preprocessor_config.json", e))?
    } else {
        arpo_model::PreprocessorConfig::default()
    };
    let min = config.data.min_pixels.unwrap_or(model.min_pixels);
    let max = config.data.max_pixels.unwrap_or(model.max_pixels);
    if min > max {
        return Err(TrainerError::ConfigInvalid {
            problems: vec![format!(
                "the image bounds are min_pixels {min} > max_pixels {max} (data.* over {}): set both data.min_pixels and data.max_pixels",
                pre.display()
            )],
        });
    }
    Ok((min, max))
}

/// `processor` with the run's pixel bounds ([`pixel_bounds`]).
pub fn with_pixel_bounds(mut processor: ImageProcessor, (min, max): (u64, u64)) -> ImageProcessor {
    processor.config.min_pixels = min;
    processor.config.max_pixels = max;
    processor
}

/// The rollout policy of a run without a learner (evaluation): the model of
/// `worker.actor.model`, on its device and dtype, with the run's pixel bounds and prompt.
pub fn load_policy(config: &Config) -> Result<LocalPolicy, TrainerError> {
    let m = &config.worker.actor.model;
    let device = m.device.open().map_err(|e| TrainerError::Preflight {
        problems: vec![format!("worker.actor.model.device: {e}")],
    })?;
    let spec = m.model_path.to_string_lossy().to_string();
    let mut uitars =
        UiTars::load(&spec, m.dtype.dtype(), &device).map_err(|e| TrainerError::Preflight {
            problems: vec![format!("worker.actor.model.model_path {spec}: {e}")],
        })?;
    uitars.processor = with_pixel_bounds(uitars.processor, pixel_bounds(config)?);
    let weights = config.worker.rollout.weights;
    if weights != arpo_model::RolloutWeights::F32 {
        uitars.model = uitars
            .model
            .to_rollout(weights)
            .map_err(|e| learner_err("making the rollout copy (worker.rollout.weights)", e))?;
    }
    uitars
        .model
        .set_prefix_cache_budget(prefix_cache_bytes(config));
    Ok(LocalPolicy::new(uitars, prompt_config(config)))
}

/// `worker.rollout.prefix_cache_mib` in bytes.
pub fn prefix_cache_bytes(config: &Config) -> usize {
    config
        .worker
        .rollout
        .prefix_cache_mib
        .saturating_mul(1 << 20)
}

/// The UI-TARS prompt of a run: OSWorld's Qwen2-VL prompt (relative 0..1000 points,
/// `call_user`) for `env.coordinates: relative`, ARPO's (absolute points) for `absolute`;
/// `worker.rollout.limit_images` screenshots at most.
pub fn prompt_config(config: &Config) -> PromptConfig {
    PromptConfig {
        template: match config.env.coordinates {
            CoordinateMode::Absolute => PromptTemplate::Arpo,
            CoordinateMode::Relative => PromptTemplate::OsworldCallUser,
        },
        limit_images: config.worker.rollout.limit_images,
        ..PromptConfig::default()
    }
}

/// The AdamW settings of a run; `total_optimizer_steps` sizes the warmup and the schedule.
pub fn adamw_config(config: &Config, total_optimizer_steps: u64) -> AdamWConfig {
    let a = &config.worker.actor;
    let warmup_steps = (a.optim.lr_warmup_ratio * total_optimizer_steps as f64).round() as u64;
    AdamWConfig {
        lr: a.optim.lr,
        beta1: a.optim.betas[0],
        beta2: a.optim.betas[1],
        eps: a.optim.eps,
        weight_decay: a.optim.weight_decay,
        max_grad_norm: (a.max_grad_norm > 0.0).then_some(a.max_grad_norm),
        warmup_steps,
        schedule: match a.optim.warmup_style {
            WarmupStyle::Constant => LrSchedule::Constant,
            // A run too short to decay after its warmup keeps the rate constant.
            WarmupStyle::Cosine if total_optimizer_steps <= warmup_steps => LrSchedule::Constant,
            WarmupStyle::Cosine => LrSchedule::Cosine {
                total_steps: total_optimizer_steps,
                min_lr_ratio: a.optim.min_lr_ratio,
            },
        },
    }
}

/// What runs after the learner's weights change (an update, a loaded checkpoint).
pub type WeightsHook = Box<dyn FnMut(&Trainable) -> Result<(), TrainerError> + Send>;

/// Turns trajectories into the token sequences the model scores.
#[derive(Debug)]
pub struct EpisodeBuilder {
    pub tokenizer: ChatTokenizer,
    pub processor: ImageProcessor,
    pub prompt: PromptConfig,
    /// Appended after a turn whose sampling stopped on the token limit (not trained).
    pub im_end_id: u32,
    pub device: Device,
}

/// An episode with the positions of each turn's sampled tokens.
#[derive(Debug, Clone)]
pub struct BuiltEpisode {
    pub episode: Episode,
    /// For each turn, the indices into `episode.input_ids` of its sampled tokens.
    pub turn_positions: Vec<Vec<usize>>,
}

impl EpisodeBuilder {
    pub fn from_dir(
        dir: &Path,
        prompt: PromptConfig,
        device: Device,
    ) -> Result<Self, TrainerError> {
        let tokenizer =
            ChatTokenizer::from_dir(dir).map_err(|e| learner_err("loading the tokenizer", e))?;
        let pre = dir.join("preprocessor_config.json");
        let processor = ImageProcessor::new(if pre.exists() {
            arpo_model::PreprocessorConfig::from_file(&pre)
                .map_err(|e| learner_err("reading preprocessor_config.json", e))?
        } else {
            arpo_model::PreprocessorConfig::default()
        });
        let im_end_id = tokenizer.im_end_id;
        Ok(Self {
            tokenizer,
            processor,
            prompt,
            im_end_id,
            device,
        })
    }

    /// The whole trajectory as one sequence with each turn's sampled ids in its assistant slot.
    pub fn build(&self, t: &Trajectory) -> Result<BuiltEpisode, TrainerError> {
        let n = t.turns.len();
        if n == 0 {
            return Err(TrainerError::learner_msg(format!(
                "trajectory of task {} has no turns to train on",
                t.task_id
            )));
        }
        for (k, turn) in t.turns.iter().enumerate() {
            if turn.response.token_ids.is_empty() {
                return Err(TrainerError::learner_msg(format!(
                    "turn {k} of task {} has no sampled token ids: training needs a policy that reports them (a server answering logprobs with token ids)",
                    t.task_id
                )));
            }
        }
        // The last turn's prompt with every response left empty: each assistant slot is then
        // exactly `<|im_end|>`, which is swapped for the sampled ids below.
        let mut context = t.context_at(n - 1);
        context.responses = vec![String::new(); n - 1];
        let mut messages = build_messages(&context, &self.prompt);
        messages.push(ChatMessage::text(Role::Assistant, String::new()));

        let images = messages
            .iter()
            .flat_map(|m| m.images())
            .map(decode_screenshot)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| learner_err("decoding a screenshot of the trajectory", e))?;
        let (pixel_values, grid_thw, counts) = if images.is_empty() {
            (None, Vec::new(), Vec::new())
        } else {
            let p = self
                .processor
                .preprocess(&images, &self.device)
                .map_err(|e| learner_err("preprocessing screenshots", e))?;
            let counts = p.tokens_per_image(self.processor.config.merge_size);
            (Some(p.pixel_values), p.grid_thw, counts)
        };
        let chat = self
            .tokenizer
            .encode_chat(&messages, &counts, false)
            .map_err(|e| learner_err("tokenizing the trajectory", e))?;

        let mut input_ids = Vec::with_capacity(chat.ids.len() + 64 * n);
        let mut mask = Vec::with_capacity(input_ids.capacity());
        let mut turn_positions = Vec::with_capacity(n);
        let mut i = 0;
        while i < chat.ids.len() {
            if !chat.assistant_mask[i] {
                input_ids.push(chat.ids[i]);
                mask.push(false);
                i += 1;
                continue;
            }
            while i < chat.ids.len() && chat.assistant_mask[i] {
                i += 1;
            }
            let k = turn_positions.len();
            let Some(turn) = t.turns.get(k) else {
                return Err(TrainerError::learner_msg(format!(
                    "the chat template rendered more assistant turns than the trajectory of task {} has ({n})",
                    t.task_id
                )));
            };
            let ids = &turn.response.token_ids;
            let start = input_ids.len();
            input_ids.extend_from_slice(ids);
            mask.extend(std::iter::repeat_n(true, ids.len()));
            turn_positions.push((start..input_ids.len()).collect());
            if turn.response.finish_reason == arpo_core::FinishReason::Length {
                input_ids.push(self.im_end_id);
                mask.push(false);
            }
        }
        if turn_positions.len() != n {
            return Err(TrainerError::learner_msg(format!(
                "found {} assistant turns in the rendered trajectory of task {} but it has {n}",
                turn_positions.len(),
                t.task_id
            )));
        }
        Ok(BuiltEpisode {
            episode: Episode {
                input_ids,
                assistant_mask: mask,
                pixel_values,
                grid_thw,
            },
            turn_positions,
        })
    }
}

/// The [`Learner`] over a candle UI-TARS model: LoRA or full fine-tuning, AdamW.
pub struct CandleLearner {
    pub trainable: Trainable,
    pub optimizer: AdamW,
    pub episodes: EpisodeBuilder,
    /// The model the run started from (its config and tokenizer files go into checkpoints).
    pub source_dir: PathBuf,
    lora_seed: u64,
    /// Threads that score the trajectories of a batch in parallel.
    pub workers: usize,
    /// Called after each update and after a checkpoint is loaded (e.g. to push the new weights
    /// to a server, so a resumed run's first rollout samples from the restored weights).
    pub after_update: Option<WeightsHook>,
    /// The in-process rollout model's prefix cache: its keys and values were computed with
    /// the weights before an update, so every update and load clears it.
    pub rollout_cache: Option<std::sync::Arc<arpo_model::PrefixCache>>,
    /// A handle on the in-process rollout copy when it holds its own (quantized) copy of
    /// weights that full fine-tuning changes (`worker.rollout.weights` other than f32, no
    /// LoRA): stored again from the learner ([`arpo_model::Qwen2Vl::refresh_from`]) after every
    /// update and load, so the rollout policy never samples from stale weights.
    pub rollout_copy: Option<arpo_model::Qwen2Vl>,
}

impl std::fmt::Debug for CandleLearner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CandleLearner")
            .field("source_dir", &self.source_dir)
            .field("parameters", &self.trainable.vars().len())
            .field("lora", &self.trainable.lora_set().is_some())
            .finish()
    }
}

/// Models up to this many parameters train one sequence per core (each op on one thread);
/// bigger ones spread each op over the cores and take the sequences one at a time.
pub const SAMPLE_PARALLEL_MAX_PARAMETERS: u64 = 100_000_000;

/// The parameter count of the language model a checkpoint directory's `config.json` describes
/// (from its sizes: embeddings, attention and MLP of every layer; the vision tower is left out).
/// `None` when there is no such file or it lacks the sizes.
pub fn estimated_parameters(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let c = json.get("text_config").unwrap_or(&json);
    let get = |k: &str| c.get(k).and_then(serde_json::Value::as_u64);
    let (h, i, layers, vocab) = (
        get("hidden_size")?,
        get("intermediate_size")?,
        get("num_hidden_layers")?,
        get("vocab_size")?,
    );
    let heads = get("num_attention_heads").unwrap_or(1).max(1);
    let kv = get("num_key_value_heads").unwrap_or(heads);
    let kv_dim = h / heads * kv;
    let per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * i;
    Some(layers * per_layer + vocab * h)
}

/// True when a model this size trains fastest one sequence per core: it is small
/// ([`SAMPLE_PARALLEL_MAX_PARAMETERS`]) and there is more than one core. The caller then
/// keeps candle's own ops on one thread (`RAYON_NUM_THREADS=1`) before any op runs.
pub fn prefers_sample_parallel(dir: &Path) -> bool {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    cores > 1 && estimated_parameters(dir).is_some_and(|p| p <= SAMPLE_PARALLEL_MAX_PARAMETERS)
}

/// Loads `worker.actor.model` once: the rollout policy and the learner share its weights.
pub fn load_local(
    config: &Config,
    total_optimizer_steps: u64,
) -> Result<(LocalPolicy, CandleLearner), TrainerError> {
    let m = &config.worker.actor.model;
    let device = m.device.open().map_err(|e| TrainerError::Preflight {
        problems: vec![format!("worker.actor.model.device: {e}")],
    })?;
    let dtype = m.dtype.dtype();
    let pixels = pixel_bounds(config)?;
    let spec = m.model_path.to_string_lossy().to_string();
    let uitars = UiTars::load(&spec, dtype, &device).map_err(|e| TrainerError::Preflight {
        problems: vec![format!("worker.actor.model.model_path {spec}: {e}")],
    })?;
    let UiTars {
        model,
        tokenizer,
        processor,
        stop_ids,
        dir,
    } = uitars;
    let prompt = prompt_config(config);
    let mut trainable = if m.lora.rank > 0 {
        Trainable::lora(
            model,
            LoraConfig {
                r: m.lora.rank,
                alpha: m.lora.alpha,
                dropout: m.lora.dropout,
                target_modules: m.lora.target_modules.clone(),
                include_vision: !m.freeze_vision_tower
                    && m.lora
                        .target_modules
                        .iter()
                        .any(|t| t.starts_with("visual")),
                seed: config.data.seed,
            },
        )
    } else {
        Trainable::full(model, m.freeze_vision_tower)
    }
    .map_err(|e| learner_err("setting up the trainable parameters", e))?;
    trainable.set_gradient_checkpointing(m.enable_gradient_checkpointing);
    let optimizer = AdamW::new(
        trainable.vars().to_vec(),
        adamw_config(config, total_optimizer_steps),
    )
    .map_err(|e| learner_err("optimizer", e))?;
    // The rollout copy: the learner's own tensors (f32), a quantized base under the learner's
    // LoRA adapters (shared: rollouts follow every update with no copy), or under full
    // fine-tuning a quantized copy stored again after every update (`rollout_copy`).
    let weights = config.worker.rollout.weights;
    let rollout_model = if weights == arpo_model::RolloutWeights::F32 {
        trainable.model.clone()
    } else {
        trainable
            .model
            .to_rollout(weights)
            .map_err(|e| learner_err("making the rollout copy (worker.rollout.weights)", e))?
    };
    rollout_model.set_prefix_cache_budget(prefix_cache_bytes(config));
    let rollout_cache = Some(rollout_model.prefix_cache.clone());
    let rollout_copy = (weights != arpo_model::RolloutWeights::F32
        && trainable.lora_set().is_none())
    .then(|| rollout_model.clone());
    let policy = LocalPolicy::new(
        UiTars {
            model: rollout_model,
            tokenizer,
            processor: with_pixel_bounds(processor, pixels),
            stop_ids,
            dir: dir.clone(),
        },
        prompt.clone(),
    );
    let mut episodes = EpisodeBuilder::from_dir(&dir, prompt, device)?;
    episodes.processor = with_pixel_bounds(episodes.processor, pixels);
    Ok((
        policy,
        CandleLearner {
            trainable,
            optimizer,
            episodes,
            source_dir: dir,
            lora_seed: config.data.seed,
            // One sequence per core when candle's ops run on one thread (a small model, see
            // `prefers_sample_parallel`); otherwise each op uses the cores, one sequence at a
            // time (two at once would fight over the cores and double the activations).
            workers: if candle_core::utils::get_num_threads() == 1 {
                std::thread::available_parallelism().map_or(1, usize::from)
            } else {
                1
            },
            after_update: None,
            rollout_cache,
            rollout_copy,
        },
    ))
}

impl CandleLearner {
    /// After the learner's weights changed: the in-process rollout model's cached keys and
    /// values go, and a quantized copy under full fine-tuning is stored again.
    fn rollout_follows(&self) -> Result<(), TrainerError> {
        if let Some(cache) = &self.rollout_cache {
            cache.clear();
        }
        if let Some(copy) = &self.rollout_copy {
            copy.refresh_from(&self.trainable.model)
                .map_err(|e| learner_err("storing the updated weights in the rollout copy", e))?;
        }
        Ok(())
    }

    fn per_turn(built: &BuiltEpisode, values: &[f32]) -> Vec<Vec<f32>> {
        let mut at = 0;
        built
            .turn_positions
            .iter()
            .map(|p| {
                let v = values[at..at + p.len()].to_vec();
                at += p.len();
                v
            })
            .collect()
    }
}

impl Learner for CandleLearner {
    fn old_logprobs(&mut self, trajectory: &Trajectory) -> Result<Vec<Vec<f32>>, TrainerError> {
        let built = self.episodes.build(trajectory)?;
        self.trainable.set_training(false);
        let score = self
            .trainable
            .score(&built.episode)
            .map_err(|e| learner_err("scoring", e))?;
        let values = score
            .log_probs
            .detach()
            .to_vec1::<f32>()
            .map_err(|e| learner_err("scoring", e))?;
        let expected: usize = built.turn_positions.iter().map(Vec::len).sum();
        if values.len() != expected {
            return Err(TrainerError::learner_msg(format!(
                "scored {} tokens but the trajectory has {expected} sampled tokens",
                values.len()
            )));
        }
        Ok(Self::per_turn(&built, &values))
    }

    fn old_logprobs_many(
        &mut self,
        trajectories: &[&Trajectory],
    ) -> Result<Vec<Vec<Vec<f32>>>, TrainerError> {
        let built = trajectories
            .iter()
            .map(|t| self.episodes.build(t))
            .collect::<Result<Vec<_>, _>>()?;
        self.trainable.set_training(false);
        let trainable = &self.trainable;
        let one = |b: &BuiltEpisode| -> Result<Vec<Vec<f32>>, TrainerError> {
            let score = trainable
                .score(&b.episode)
                .map_err(|e| learner_err("scoring", e))?;
            let values = score
                .log_probs
                .detach()
                .to_vec1::<f32>()
                .map_err(|e| learner_err("scoring", e))?;
            Ok(Self::per_turn(b, &values))
        };
        parallel_map(&built, self.workers, one)
    }

    fn update(
        &mut self,
        minibatch: &[Sample],
        loss: &PolicyLossConfig,
        _optimizer_step: u64,
    ) -> Result<UpdateStats, TrainerError> {
        if loss.kl.is_some() {
            return Err(TrainerError::learner_msg(
                "a KL penalty needs a reference model, which the candle learner does not keep yet: set algorithm.disable_kl: true",
            ));
        }
        let built = minibatch
            .iter()
            .map(|s| self.episodes.build(&s.trajectory))
            .collect::<Result<Vec<_>, _>>()?;
        let total = BatchCount {
            sequences: minibatch.len(),
            tokens: built
                .iter()
                .map(|b| b.turn_positions.iter().map(Vec::len).sum::<usize>())
                .sum(),
        };
        self.trainable.set_training(true);
        let mut stats = UpdateStats::default();
        let device = self.episodes.device.clone();
        let trainable = &self.trainable;
        #[allow(clippy::type_complexity)] // the tuple is one sample's share of the update
        let one = |(sample, b): &(&Sample, &BuiltEpisode)| -> Result<
            Option<(
                candle_core::backprop::GradStore,
                arpo_grpo::LossMetrics,
                f64,
                usize,
                crate::rollout_gap::RolloutGap,
            )>,
            TrainerError,
        > {
            let n: usize = b.turn_positions.iter().map(Vec::len).sum();
            let old: Option<Vec<f32>> = sample
                .old_logprobs
                .as_ref()
                .map(|turns| turns.iter().flatten().copied().collect());
            if let Some(old) = &old
                && old.len() != n
            {
                return Err(TrainerError::learner_msg(format!(
                    "task {}: {} old log-probs for {n} sampled tokens",
                    sample.trajectory.task_id,
                    old.len()
                )));
            }
            let weight = loss.loss_agg_mode.micro_batch_weight(
                BatchCount {
                    sequences: 1,
                    tokens: n,
                },
                total,
            );
            if n == 0 || weight == 0.0 {
                return Ok(None);
            }
            let score = trainable
                .score(&b.episode)
                .map_err(|e| learner_err("scoring", e))?;
            let t = |r: candle_core::Result<Tensor>| r.map_err(|e| learner_err("loss inputs", e));
            let old = match old {
                Some(old) => t(Tensor::from_vec(old, n, &device))?,
                None => score.log_probs.detach(),
            };
            let (rollout, gap) = crate::rollout_gap::rollout_logp_tensor(sample, &old, loss)?;
            let adv = t(Tensor::new(sample.advantage as f32, &device))?;
            let mask = t(Tensor::ones(n, DType::U8, &device))?;
            let entropy = t(Tensor::from_vec(score.entropy.clone(), n, &device))?;
            let out = policy_loss(
                &PolicyLossInputs {
                    logp: &score.log_probs,
                    old_logp: &old,
                    advantages: &adv,
                    mask: &mask,
                    ref_logp: None,
                    entropy: Some(&entropy),
                    rollout_logp: rollout.as_ref(),
                },
                loss,
            )
            .map_err(|e| learner_err("policy loss", e))?;
            let scaled = t(out.loss.affine(weight, 0.0))?;
            let grads = arpo_model::train::recompute::backward(&scaled)
                .map_err(|e| learner_err("backward", e))?;
            Ok(Some((grads, out.metrics, weight, n, gap)))
        };
        let pairs: Vec<(&Sample, &BuiltEpisode)> = minibatch.iter().zip(&built).collect();
        // Accumulated in sample order: the result does not depend on thread timing.
        for (grads, m, weight, n, gap) in parallel_map(&pairs, self.workers, one)?
            .into_iter()
            .flatten()
        {
            self.optimizer
                .accumulate(&grads)
                .map_err(|e| learner_err("accumulating gradients", e))?;
            stats.loss += weight * m.loss;
            stats.pg_clipfrac_higher += weight * m.pg_clipfrac_higher;
            stats.pg_clipfrac_lower += weight * m.pg_clipfrac_lower;
            stats.ppo_kl += weight * m.ppo_kl;
            stats.entropy += weight * m.entropy.unwrap_or(m.entropy_estimate);
            stats.tokens += n;
            stats.rollout_gap.merge(&gap);
        }
        self.trainable.set_training(false);
        let report = self
            .optimizer
            .step()
            .map_err(|e| learner_err("optimizer step", e))?;
        stats.grad_norm = report.grad_norm;
        stats.lr = report.lr;
        stats.skipped = report.skipped;
        if report.skipped {
            tracing::warn!(
                grad_norm = report.grad_norm,
                "optimizer step skipped: the gradient norm is not finite"
            );
        }
        self.rollout_follows()?;
        if let Some(hook) = self.after_update.as_mut() {
            hook(&self.trainable)?;
        }
        Ok(stats)
    }

    fn save(&self, dir: &Path) -> Result<(), TrainerError> {
        let result = if self.trainable.lora_set().is_some() {
            self.trainable.save_adapter(
                dir,
                &self.source_dir.to_string_lossy(),
                Some(&self.optimizer),
            )
        } else {
            self.trainable
                .save(dir, &self.source_dir, Some(&self.optimizer))
        };
        result
            .map(|_| ())
            .map_err(|e| learner_err(&format!("saving {}", dir.display()), e))
    }

    fn load(&mut self, dir: &Path) -> Result<(), TrainerError> {
        let err = |e: arpo_model::train::TrainError| TrainerError::Resume {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        };
        let device = self.episodes.device.clone();
        let (tensors, names): (std::collections::HashMap<String, Tensor>, &str) =
            if self.trainable.lora_set().is_some() {
                let set = LoraSet::load_peft(dir, self.lora_seed, &device).map_err(err)?;
                (
                    set.vars()
                        .into_iter()
                        .map(|(n, v)| (n, v.as_tensor().detach()))
                        .collect(),
                    "adapter",
                )
            } else {
                (
                    load_safetensors(&dir.join(MODEL_WEIGHTS), &device).map_err(err)?,
                    "model",
                )
            };
        for (name, var) in self.trainable.vars() {
            let saved = tensors.get(name).ok_or_else(|| TrainerError::Resume {
                path: dir.to_path_buf(),
                reason: format!("the saved {names} has no tensor {name}"),
            })?;
            let value = saved
                .reshape(var.shape())
                .and_then(|t| t.to_dtype(var.dtype()))
                .map_err(|e| TrainerError::Resume {
                    path: dir.to_path_buf(),
                    reason: format!("tensor {name}: {e}"),
                })?;
            var.set(&value).map_err(|e| TrainerError::Resume {
                path: dir.to_path_buf(),
                reason: format!("tensor {name}: {e}"),
            })?;
        }
        Trainable::load_optimizer(dir, &mut self.optimizer).map_err(err)?;
        // The weights changed: the rollout copy here, and one elsewhere (a server), follow
        // before any rollout.
        self.rollout_follows()?;
        if let Some(hook) = self.after_update.as_mut() {
            hook(&self.trainable)?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "candle {} of {} ({} tensors)",
            if self.trainable.lora_set().is_some() {
                "LoRA"
            } else {
                "full fine-tuning"
            },
            self.source_dir.display(),
            self.trainable.vars().len()
        )
    }
}

/// `f` over `items` on up to `workers` threads (contiguous chunks), results in item order.
fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    workers: usize,
    f: impl Fn(&T) -> Result<R, TrainerError> + Sync,
) -> Result<Vec<R>, TrainerError> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let workers = workers.clamp(1, items.len());
    if workers == 1 {
        return items.iter().map(&f).collect();
    }
    let chunk = items.len().div_ceil(workers);
    let f = &f;
    let parts: Vec<Result<Vec<R>, TrainerError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(f).collect::<Result<Vec<R>, _>>()))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(TrainerError::learner_msg("a scoring thread panicked")))
            })
            .collect()
    });
    let mut out = Vec::with_capacity(items.len());
    for p in parts {
        out.extend(p?);
    }
    Ok(out)
}
