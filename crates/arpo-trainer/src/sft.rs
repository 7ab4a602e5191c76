//! Supervised fine-tuning on the embedded desktop's oracle solutions: the base policy that RL
//! starts from (RL from scratch gets no reward; ARPO starts from UI-TARS's SFT checkpoint for the
//! same reason).
//!
//! 1. [`demonstrations`]: every task's oracle solution played on a [`SimEnv`], each step written
//!    as a UI-TARS response (`Thought: ...\nAction: ...`, points as `<|box_start|>(x,y)<|box_end|>`
//!    in the prompt's coordinate system).
//! 2. [`train_tokenizer`]: a small byte-level BPE tokenizer (the `tokenizers` crate) trained on
//!    the prompts and responses, with the Qwen2-VL special tokens; digits stay single tokens.
//! 3. [`init_model_dir`]: a tiny model of the real Qwen2-VL architecture with random weights,
//!    written in HF layout (config, tokenizer, chat template, preprocessor config).
//! 4. [`run_sft`]: the mean next-token NLL of each step's response given exactly the prompt the
//!    policy sees at that step (history, at most `limit_images` screenshots), through the same
//!    scoring and AdamW code as RL.

use std::path::{Path, PathBuf};

use arpo_core::protocol::{CoordinateSystem, PointSyntax, PromptConfig, format_response};
use arpo_core::{Action, Environment, EpisodeEnd, FinishReason, Response, Task, Trajectory, Turn};
use arpo_env_sim::{Catalogue, SimEnv};
use arpo_model::train::optim::{AdamW, AdamWConfig};
use arpo_model::train::score::Episode;
use arpo_model::train::trainable::Trainable;
use arpo_model::{ChatTokenizer, Qwen2Vl, Qwen2VlConfig};
use candle_core::{DType, Device};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::TrainerError;
use crate::model::EpisodeBuilder;

fn err(what: &str, e: impl std::fmt::Display) -> TrainerError {
    TrainerError::learner_msg(format!("sft: {what}: {e}"))
}

/// The short thought written before each demonstrated action.
pub fn thought_for(action: &Action) -> &'static str {
    match action {
        Action::Click { .. } => "I click the target.",
        Action::LeftDouble { .. } => "I double-click to open it.",
        Action::RightSingle { .. } => "I right-click for the menu.",
        Action::Hover { .. } => "I move the mouse there.",
        Action::Drag { .. } => "I drag it to the destination.",
        Action::Hotkey { .. } => "I press the shortcut.",
        Action::Press { .. } | Action::KeyDown { .. } | Action::KeyUp { .. } => "I press the key.",
        Action::Type { .. } => "I type the text.",
        Action::Scroll { .. } => "I scroll to find it.",
        Action::Wait => "I wait for the screen.",
        Action::Finished { .. } => "The task is done.",
        Action::CallUser => "This cannot be done here; I ask the user.",
    }
}

/// The oracle solution of every task, as the trajectories a perfect policy would produce
/// (responses in UI-TARS form; no token ids yet).
pub async fn demonstrations(
    tasks: &[Task],
    coordinates: &CoordinateSystem,
) -> Result<Vec<Trajectory>, TrainerError> {
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        let actions = arpo_env_sim::oracle_at(
            task,
            arpo_env_sim::DEFAULT_SIZE.0,
            arpo_env_sim::DEFAULT_SIZE.1,
        )
        .map_err(|e| err(&format!("oracle of {}", task.id), e))?;
        let mut env = SimEnv::new().with_max_steps(actions.len() + 1);
        let mut obs = env
            .reset(task)
            .await
            .map_err(|e| err(&format!("reset {}", task.id), e))?;
        let mut turns = Vec::with_capacity(actions.len());
        for action in &actions {
            let screen = (obs.screenshot.width, obs.screenshot.height);
            let text = format_response(
                thought_for(action),
                std::slice::from_ref(action),
                coordinates,
                screen,
                PointSyntax::BoxTokens,
            );
            turns.push(Turn {
                screenshot: obs.screenshot.clone(),
                response: Response {
                    text,
                    token_ids: Vec::new(),
                    logprobs: Vec::new(),
                    finish_reason: FinishReason::Stop,
                },
                actions: vec![action.clone()],
                format_error: None,
                env_error: None,
            });
            let step = env
                .step(action)
                .await
                .map_err(|e| err(&format!("oracle step of {}", task.id), e))?;
            obs = step.observation;
        }
        let eval_result = env
            .evaluate(actions.last())
            .await
            .map_err(|e| err(&format!("evaluate {}", task.id), e))?;
        out.push(Trajectory {
            task_id: task.id.clone(),
            instruction: task.instruction.clone(),
            end: match actions.last() {
                Some(Action::CallUser) => EpisodeEnd::CallUser,
                _ => EpisodeEnd::Finished,
            },
            turns,
            eval_result,
            format_reward: 0.0,
        });
    }
    Ok(out)
}

/// The Qwen2-VL special tokens, in Qwen's order.
pub const SPECIAL_TOKENS: &[&str] = &[
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
];

/// Trains a byte-level BPE tokenizer of `vocab_size` tokens (special tokens included) on
/// `texts` and writes it to `path` (`tokenizer.json`).
pub fn train_tokenizer(
    texts: &[String],
    vocab_size: usize,
    path: &Path,
) -> Result<(), TrainerError> {
    use tokenizers::models::TrainerWrapper;
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::{AddedToken, ModelWrapper, PreTokenizerWrapper, Tokenizer};

    let mut tokenizer = Tokenizer::new(ModelWrapper::BPE(BPE::default()));
    tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ]))));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials.clone())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    // Special tokens never take part in merges: train on the text around them.
    let cleaned: Vec<String> = texts
        .iter()
        .map(|t| {
            let mut s = t.clone();
            for sp in SPECIAL_TOKENS {
                s = s.replace(sp, " ");
            }
            s
        })
        .collect();
    tokenizer
        .train(&mut trainer, cleaned.iter())
        .map_err(|e| err("training the tokenizer", e))?;
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| err("adding the special tokens", e))?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| TrainerError::io(parent, e))?;
    }
    tokenizer
        .save(path, false)
        .map_err(|e| err(&format!("writing {}", path.display()), e))
}

/// The shape of the tiny model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TinyShape {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Sums to half the head dimension.
    pub mrope_section: [usize; 3],
    pub vision_embed_dim: usize,
    pub vision_depth: usize,
    pub vision_heads: usize,
    /// `max_pixels` of the image processor: 336x224 screenshots pass unresized below it.
    pub max_pixels: usize,
}

impl Default for TinyShape {
    fn default() -> Self {
        Self {
            hidden_size: 128,
            intermediate_size: 384,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            mrope_section: [4, 6, 6],
            vision_embed_dim: 96,
            vision_depth: 2,
            vision_heads: 4,
            max_pixels: 128 * 28 * 28,
        }
    }
}

/// The chat template every Qwen2-VL checkpoint ships (system default, images as
/// `<|vision_start|><|image_pad|><|vision_end|>`).
pub const CHAT_TEMPLATE: &str = "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Writes the non-weight files of a tiny Qwen2-VL checkpoint into `dir` (which must already
/// hold `tokenizer.json`): `config.json` (transformers-5 form), `preprocessor_config.json`,
/// `generation_config.json`, `tokenizer_config.json`, `chat_template.jinja`.
pub fn init_model_dir(dir: &Path, shape: &TinyShape) -> Result<Qwen2VlConfig, TrainerError> {
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
        .map_err(|e| err("reading the tokenizer", e))?;
    let id = |t: &str| {
        tok.token_to_id(t)
            .ok_or_else(|| err("tokenizer", format!("no {t} token")))
    };
    let vocab = tok.get_vocab_size(true);
    let config = serde_json::json!({
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "dtype": "float32",
        "image_token_id": id("<|image_pad|>")?,
        "video_token_id": id("<|video_pad|>")?,
        "vision_start_token_id": id("<|vision_start|>")?,
        "vision_end_token_id": id("<|vision_end|>")?,
        "tie_word_embeddings": true,
        "text_config": {
            "model_type": "qwen2_vl_text",
            "hidden_act": "silu",
            "hidden_size": shape.hidden_size,
            "intermediate_size": shape.intermediate_size,
            "num_hidden_layers": shape.num_hidden_layers,
            "num_attention_heads": shape.num_attention_heads,
            "num_key_value_heads": shape.num_key_value_heads,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "vocab_size": vocab,
            "bos_token_id": id("<|endoftext|>")?,
            "eos_token_id": id("<|im_end|>")?,
            "tie_word_embeddings": true,
            "rope_parameters": {
                "mrope_section": shape.mrope_section,
                "rope_theta": 1_000_000.0,
                "rope_type": "default"
            },
            "attention_dropout": 0.0,
            "use_cache": true,
            "use_sliding_window": false,
            "sliding_window": null,
            "max_window_layers": 80
        },
        "vision_config": {
            "model_type": "qwen2_vl_vision",
            "depth": shape.vision_depth,
            "embed_dim": shape.vision_embed_dim,
            "hidden_act": "quick_gelu",
            "hidden_size": shape.hidden_size,
            "in_channels": 3,
            "mlp_ratio": 4,
            "num_heads": shape.vision_heads,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2
        }
    });
    let preprocessor = serde_json::json!({
        "do_convert_rgb": true,
        "do_normalize": true,
        "do_rescale": true,
        "do_resize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "merge_size": 2,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "resample": 3,
        "rescale_factor": 1.0 / 255.0,
        "size": {"shortest_edge": 3136, "longest_edge": shape.max_pixels}
    });
    let generation = serde_json::json!({
        "bos_token_id": id("<|endoftext|>")?,
        "eos_token_id": [id("<|im_end|>")?, id("<|endoftext|>")?],
        "pad_token_id": id("<|endoftext|>")?,
    });
    let tokenizer_config = serde_json::json!({
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 32768,
        "tokenizer_class": "Qwen2TokenizerFast"
    });
    for (name, value) in [
        ("config.json", &config),
        ("preprocessor_config.json", &preprocessor),
        ("generation_config.json", &generation),
        ("tokenizer_config.json", &tokenizer_config),
    ] {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(value).map_err(|e| err(name, e))?;
        std::fs::write(&path, text).map_err(|e| TrainerError::io(&path, e))?;
    }
    let path = dir.join("chat_template.jinja");
    std::fs::write(&path, CHAT_TEMPLATE).map_err(|e| TrainerError::io(&path, e))?;
    Qwen2VlConfig::from_file(&dir.join("config.json")).map_err(|e| err("config.json", e))
}

/// Settings of a supervised fine-tuning run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftConfig {
    pub seed: u64,
    /// Optimizer steps.
    pub steps: usize,
    /// Samples (one step's response each) per optimizer step.
    pub batch: usize,
    pub lr: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub prompt: PromptConfig,
    /// Write the model to the output directory every this many steps too (0: only at the end).
    pub save_every: usize,
    /// Threads scoring the samples of a step in parallel.
    pub workers: usize,
}

/// One SFT sample: a trajectory (cut after its last trained turn) and the turns trained in it.
#[derive(Debug, Clone)]
pub struct SftSample {
    pub trajectory: Trajectory,
    /// Indices of the turns whose responses are trained; the others are history.
    pub trained: std::ops::Range<usize>,
}

/// Turns demonstrations into SFT samples and fills in the responses' token ids (the text
/// tokenized, then `<|im_end|>`).
///
/// While a trajectory's screenshots all fit in the prompt (`limit_images`), the prompt of every
/// step is a prefix of the whole trajectory's sequence (causal attention: a token sees only
/// what comes before it), so one sequence training every turn gives each turn exactly the
/// log-probability it has at that step: one sample per trajectory, each step's prompt encoded
/// once. Longer trajectories drop old screenshots as they go, so their steps are cut into one
/// sample per step, the prompt exactly as the policy sees it at that step.
pub fn samples(
    demos: &[Trajectory],
    tokenizer: &ChatTokenizer,
    limit_images: usize,
) -> Result<Vec<SftSample>, TrainerError> {
    let mut out = Vec::new();
    for d in demos {
        let mut t = d.clone();
        for turn in &mut t.turns {
            let mut ids = tokenizer
                .encode(&turn.response.text)
                .map_err(|e| err("tokenizing a response", e))?;
            ids.push(tokenizer.im_end_id);
            turn.response.token_ids = ids;
        }
        let n = t.turns.len();
        if n <= limit_images.max(1) {
            out.push(SftSample {
                trajectory: t,
                trained: 0..n,
            });
            continue;
        }
        for k in 0..n {
            let mut cut = t.clone();
            cut.turns.truncate(k + 1);
            out.push(SftSample {
                trajectory: cut,
                trained: k..k + 1,
            });
        }
    }
    Ok(out)
}

/// What [`run_sft`] reports per logged step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SftLog {
    pub step: usize,
    /// Mean NLL per trained token over the step's samples.
    pub nll: f64,
    pub grad_norm: f64,
    pub lr: f64,
}

/// Trains the model in `dir` on `samples` and writes the result back into `out` (HF layout).
/// `on_step` sees every step's log line.
pub fn run_sft(
    dir: &Path,
    out: &Path,
    samples: &[SftSample],
    config: &SftConfig,
    on_step: &mut dyn FnMut(&SftLog),
) -> Result<PathBuf, TrainerError> {
    let device = Device::Cpu;
    let model = Qwen2Vl::load(dir, DType::F32, &device).map_err(|e| err("loading the model", e))?;
    let trainable = Trainable::full(model, false).map_err(|e| err("trainable", e))?;
    let mut optimizer = AdamW::new(
        trainable.vars().to_vec(),
        AdamWConfig {
            lr: config.lr,
            weight_decay: config.weight_decay,
            max_grad_norm: (config.max_grad_norm > 0.0).then_some(config.max_grad_norm),
            warmup_steps: config.warmup_steps,
            ..AdamWConfig::default()
        },
    )
    .map_err(|e| err("optimizer", e))?;
    let builder = EpisodeBuilder::from_dir(dir, config.prompt.clone(), device)?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut order: Vec<usize> = (0..samples.len()).collect();
    let mut cursor = order.len();
    for step in 0..config.steps {
        let mut nll_sum = 0.0;
        let mut tokens = 0usize;
        let batch = config.batch.max(1);
        let mut episodes = Vec::with_capacity(batch);
        for _ in 0..batch {
            if cursor >= order.len() {
                order.shuffle(&mut rng);
                cursor = 0;
            }
            let sample = &samples[order[cursor]];
            cursor += 1;
            let mut built = builder.build(&sample.trajectory)?;
            // Responses outside the trained range are history in this prompt.
            for (k, positions) in built.turn_positions.iter().enumerate() {
                if !sample.trained.contains(&k) {
                    for &p in positions {
                        built.episode.assistant_mask[p] = false;
                    }
                }
            }
            episodes.push(built.episode);
        }
        // Samples are independent: score them on `workers` threads (candle runs small matmuls
        // on one core), then accumulate in sample order so the result does not depend on timing.
        let per_sample = |episode: &Episode| -> Result<
            (candle_core::backprop::GradStore, f64, usize),
            TrainerError,
        > {
            let score = trainable.score(episode).map_err(|e| err("scoring", e))?;
            let n = score.positions.len();
            let loss = score.mean_nll().map_err(|e| err("loss", e))?;
            let scaled = (loss / batch as f64).map_err(|e| err("loss", e))?;
            let value = scaled.to_scalar::<f32>().map_err(|e| err("loss", e))?;
            let grads =
                arpo_model::train::recompute::backward(&scaled).map_err(|e| err("backward", e))?;
            Ok((grads, f64::from(value) * batch as f64 * n as f64, n))
        };
        let workers = config.workers.clamp(1, batch);
        let chunk = batch.div_ceil(workers);
        let results: Vec<Result<Vec<_>, TrainerError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = episodes
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || part.iter().map(per_sample).collect::<Result<Vec<_>, _>>())
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(err("worker", "a scoring thread panicked")))
                })
                .collect()
        });
        for part in results {
            for (grads, nll, n) in part? {
                nll_sum += nll;
                tokens += n;
                optimizer
                    .accumulate(&grads)
                    .map_err(|e| err("accumulating", e))?;
            }
        }
        let report = optimizer.step().map_err(|e| err("optimizer step", e))?;
        on_step(&SftLog {
            step,
            nll: nll_sum / tokens.max(1) as f64,
            grad_norm: report.grad_norm,
            lr: report.lr,
        });
        if config.save_every > 0 && (step + 1) % config.save_every == 0 && step + 1 < config.steps {
            trainable
                .save(out, dir, None)
                .map_err(|e| err(&format!("saving {}", out.display()), e))?;
        }
    }
    trainable
        .save(out, dir, None)
        .map_err(|e| err(&format!("saving {}", out.display()), e))
}

/// The tasks SFT learns from: `per_family` training-split instances of every family (the
/// catalogue's training split is the first [`arpo_env_sim::TRAIN_PER_FAMILY`] of them; more
/// come from further seeds of the same training distribution, never from the held-out one).
pub fn sft_tasks(per_family: usize) -> Vec<Task> {
    Catalogue::generate(per_family, 0).train()
}
