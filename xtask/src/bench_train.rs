//! The training benchmark behind `cargo xtask bench-model --train`: forward + backward of one
//! episode on the UI-TARS-2B shape with random weights (no download).
//!
//! The episode matches `fixtures/scripts/bench_pytorch_train.py` (the PyTorch + PEFT side): one
//! 448x448 image (256 image tokens), 346 prompt tokens (image tokens included) + 64 assistant
//! tokens, loss = summed assistant log-prob. With `images` > 1 it is a multi-turn trajectory as
//! the learner scores one: after the prompt, each further turn adds a screenshot and
//! `assistant_tokens` more (trained) tokens.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use arpo_model::train::Result;
use arpo_model::train::lora::LoraConfig;
use arpo_model::train::score::Episode;
use arpo_model::train::trainable::Trainable;
use arpo_model::{Qwen2Vl, Qwen2VlConfig};

/// What is trained in the benchmark.
#[derive(Debug, Clone, PartialEq)]
pub enum BenchMode {
    /// LoRA of this rank on the decoder projections (alpha = 2 r, no dropout).
    Lora { rank: usize },
    /// Every weight trainable.
    Full,
}

/// Benchmark settings; [`TrainBench::default`] is the episode with LoRA r = 16.
#[derive(Debug, Clone)]
pub struct TrainBench {
    pub mode: BenchMode,
    /// Decoder layers (28 in the real model); fewer to fit a small machine.
    pub layers: usize,
    /// Vision blocks (32 in the real model).
    pub vision_depth: usize,
    /// Width and height of each screenshot in pixels (multiples of 28).
    pub image: (usize, usize),
    /// Screenshots (turns) in the trajectory.
    pub images: usize,
    pub prompt_tokens: usize,
    pub assistant_tokens: usize,
    /// Timed steps (the first is reported separately as the cold one).
    pub steps: usize,
    /// Recompute layers in the backward pass instead of keeping their activations.
    pub gradient_checkpointing: bool,
}

impl Default for TrainBench {
    fn default() -> Self {
        Self {
            mode: BenchMode::Lora { rank: 16 },
            layers: 28,
            vision_depth: 32,
            image: (448, 448),
            images: 1,
            prompt_tokens: 346,
            assistant_tokens: 64,
            steps: 2,
            gradient_checkpointing: false,
        }
    }
}

/// Measured figures of one benchmark run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainBenchReport {
    pub mode: String,
    pub layers: usize,
    pub vision_depth: usize,
    pub gradient_checkpointing: bool,
    pub tokens: usize,
    pub trainable_params: usize,
    pub init_s: f64,
    pub first_step_s: f64,
    pub best_step_s: f64,
    pub peak_rss_gb: f64,
}

/// Peak resident set of this process (VmHWM), in GB; 0 where /proc is unavailable.
pub fn peak_rss_gb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0)
}

/// Runs the benchmark on the CPU.
pub fn train_step_2b(bench: &TrainBench) -> Result<TrainBenchReport> {
    let device = Device::Cpu;
    let mut config = Qwen2VlConfig::ui_tars_2b();
    config.text.num_hidden_layers = bench.layers;
    config.vision.depth = bench.vision_depth;
    let t0 = Instant::now();
    let model = Qwen2Vl::random(config, DType::F32, &device)?;
    let mut trainable = match &bench.mode {
        BenchMode::Full => Trainable::full(model, false)?,
        BenchMode::Lora { rank } => Trainable::lora(
            model,
            LoraConfig {
                r: *rank,
                alpha: 2.0 * *rank as f64,
                dropout: 0.0,
                ..LoraConfig::default()
            },
        )?,
    };
    trainable.set_gradient_checkpointing(bench.gradient_checkpointing);
    if let Some(lora) = trainable.lora_set() {
        // B = 0 at init leaves A without gradient: give B values, as after a step.
        for a in lora.adapters().values() {
            let b = Tensor::randn(0f32, 0.01, a.b.dims(), &device)?;
            a.b.set(&b)?;
        }
    }
    let init_s = t0.elapsed().as_secs_f64();
    let cfg = &trainable.model.config;
    let (gw, gh) = (
        bench.image.0 / cfg.vision.patch_size,
        bench.image.1 / cfg.vision.patch_size,
    );
    let image_tokens = gw * gh / cfg.vision.spatial_merge_size.pow(2);
    if bench.prompt_tokens < image_tokens + 2 {
        return Err(arpo_model::train::TrainError::Config(format!(
            "prompt_tokens must hold the {image_tokens} image tokens and the vision markers"
        )));
    }
    let text = bench.prompt_tokens - image_tokens - 2;
    let filler = |i: usize| (i * 7919 % 150_000) as u32;
    let mut ids: Vec<u32> = (0..text / 2).map(filler).collect();
    ids.push(cfg.vision_start_token_id);
    ids.extend(std::iter::repeat_n(cfg.image_token_id, image_tokens));
    ids.push(
        cfg.vision_end_token_id
            .unwrap_or(cfg.vision_start_token_id + 1),
    );
    ids.extend((text / 2..text).map(filler));
    ids.extend((0..bench.assistant_tokens).map(|i| filler(10_000 + i)));
    let mut mask = vec![false; bench.prompt_tokens];
    mask.extend(std::iter::repeat_n(true, bench.assistant_tokens));
    for turn in 1..bench.images.max(1) {
        ids.push(cfg.vision_start_token_id);
        ids.extend(std::iter::repeat_n(cfg.image_token_id, image_tokens));
        ids.push(
            cfg.vision_end_token_id
                .unwrap_or(cfg.vision_start_token_id + 1),
        );
        mask.extend(std::iter::repeat_n(false, image_tokens + 2));
        ids.extend((0..bench.assistant_tokens).map(|i| filler(20_000 * turn + i)));
        mask.extend(std::iter::repeat_n(true, bench.assistant_tokens));
    }
    let images = bench.images.max(1);
    let episode = Episode {
        input_ids: ids,
        assistant_mask: mask,
        pixel_values: Some(Tensor::randn(
            0f32,
            1.0,
            (images * gw * gh, cfg.vision.patch_dim()),
            &device,
        )?),
        grid_thw: vec![[1, gh, gw]; images],
    };
    let mut times = Vec::new();
    for _ in 0..bench.steps.max(1) {
        let t = Instant::now();
        let loss = trainable.score(&episode)?.sum()?.neg()?;
        let grads = arpo_model::train::recompute::backward(&loss)?;
        times.push(t.elapsed().as_secs_f64());
        drop(grads);
    }
    let best = times
        .iter()
        .skip(usize::from(times.len() > 1))
        .copied()
        .fold(f64::INFINITY, f64::min);
    Ok(TrainBenchReport {
        mode: match &bench.mode {
            BenchMode::Full => "full".into(),
            BenchMode::Lora { rank } => format!("lora-r{rank}"),
        },
        layers: bench.layers,
        vision_depth: bench.vision_depth,
        gradient_checkpointing: bench.gradient_checkpointing,
        tokens: episode.input_ids.len(),
        trainable_params: trainable.vars().iter().map(|(_, v)| v.elem_count()).sum(),
        init_s,
        first_step_s: times[0],
        best_step_s: best,
        peak_rss_gb: peak_rss_gb(),
    })
}
