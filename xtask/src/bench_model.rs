//! `cargo xtask bench-model`: prefill and decode timings of the candle model with random
//! weights of a real shape (no download); prints one JSON line.
//!
//! With `--train`: forward + backward of one episode on the 2B shape (one 448x448 image, 346
//! prompt tokens + 64 assistant tokens), LoRA (`--lora-rank`, 16 by default) or full
//! fine-tuning (`--full`); prints one JSON line with the step seconds and the peak RSS.
//! The PyTorch sides are `fixtures/scripts/bench_pytorch_{infer,train}.py` (see BENCHMARKS.md).

use std::time::Instant;

use anyhow::Result;
use arpo_core::SamplingParams;
use arpo_model::{GenerationRequest, Qwen2Vl, Qwen2VlConfig};
use candle_core::{Device, Tensor};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model shape: `2b` (UI-TARS-2B / Qwen2-VL-2B) or a model directory (its own weights).
    #[arg(long, default_value = "2b")]
    shape: String,
    /// Side of the square input image in pixels (a multiple of 28).
    #[arg(long, default_value_t = 448)]
    image: usize,
    /// Tokens decoded after the first one.
    #[arg(long, default_value_t = 16)]
    decode: usize,
    /// Prompt length in tokens, image tokens included.
    #[arg(long, default_value_t = 346)]
    prompt_tokens: usize,
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Benchmark a training step (forward + backward, f32) instead of generation.
    #[arg(long)]
    train: bool,
    /// LoRA rank of the training benchmark (decoder projections, alpha = 2 r).
    #[arg(long, default_value_t = 16, conflicts_with = "full")]
    lora_rank: usize,
    /// Train every weight instead of LoRA adapters.
    #[arg(long, requires = "train")]
    full: bool,
    /// Decoder layers of the training benchmark (28 in the real model; fewer to fit in memory).
    #[arg(long, default_value_t = 28, requires = "train")]
    layers: usize,
    /// Vision blocks of the training benchmark (32 in the real model).
    #[arg(long, default_value_t = 32, requires = "train")]
    vision_depth: usize,
    /// Assistant (scored) tokens of the training episode, after the prompt.
    #[arg(long, default_value_t = 64, requires = "train")]
    assistant_tokens: usize,
    /// Timed training steps (the first is also reported alone as the cold one).
    #[arg(long, default_value_t = 2, requires = "train")]
    steps: usize,
    /// Gradient checkpointing: recompute each layer in the backward pass instead of keeping
    /// its activations (`worker.actor.model.enable_gradient_checkpointing`).
    #[arg(long, requires = "train")]
    gradient_checkpointing: bool,
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn run_train(args: &Args) -> Result<()> {
    use arpo_model::train::bench::{BenchMode, TrainBench, train_step_2b};
    anyhow::ensure!(
        args.shape == "2b",
        "--train benchmarks the 2b shape only (random weights)"
    );
    anyhow::ensure!(
        args.dtype == "f32",
        "--train runs in f32 (the dtype of training on CPU)"
    );
    let bench = TrainBench {
        mode: if args.full {
            BenchMode::Full
        } else {
            BenchMode::Lora {
                rank: args.lora_rank,
            }
        },
        layers: args.layers,
        vision_depth: args.vision_depth,
        image: args.image,
        prompt_tokens: args.prompt_tokens,
        assistant_tokens: args.assistant_tokens,
        gradient_checkpointing: args.gradient_checkpointing,
        steps: args.steps,
    };
    let report = train_step_2b(&bench)?;
    let mut json = serde_json::to_value(&report)?;
    if let Some(obj) = json.as_object_mut() {
        obj.insert("impl".into(), "arpo-rs candle".into());
        obj.insert("shape".into(), args.shape.clone().into());
        obj.insert(
            "threads".into(),
            candle_core::utils::get_num_threads().into(),
        );
    }
    println!("{json}");
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    if args.train {
        return run_train(&args);
    }
    let dtype = crate::predict::parse_dtype(&args.dtype)?;
    let device = Device::Cpu;
    let t0 = Instant::now();
    let model = if args.shape == "2b" {
        Qwen2Vl::random(Qwen2VlConfig::ui_tars_2b(), dtype, &device)?
    } else {
        Qwen2Vl::load(std::path::Path::new(&args.shape), dtype, &device)?
    };
    let init_s = t0.elapsed().as_secs_f64();
    let cfg = &model.config;
    anyhow::ensure!(
        args.image % 28 == 0 && args.image > 0,
        "--image must be a positive multiple of 28"
    );
    let g = args.image / cfg.vision.patch_size;
    let grid = [1, g, g];
    let image_tokens = g * g / cfg.vision.spatial_merge_size.pow(2);
    anyhow::ensure!(
        args.prompt_tokens >= image_tokens + 2,
        "--prompt-tokens must hold the {image_tokens} image tokens and the vision markers"
    );
    // A prompt of the requested length: text, <|vision_start|>, image tokens, <|vision_end|>, text.
    let text = args.prompt_tokens - image_tokens - 2;
    let filler = |i: usize| (i * 7919 % 150_000) as u32;
    let mut ids: Vec<u32> = (0..text / 2).map(filler).collect();
    ids.push(cfg.vision_start_token_id);
    ids.extend(std::iter::repeat_n(cfg.image_token_id, image_tokens));
    ids.push(
        cfg.vision_end_token_id
            .unwrap_or(cfg.vision_start_token_id + 1),
    );
    ids.extend((text / 2..text).map(filler));
    let pixel_values = Tensor::randn(0f32, 1.0, (g * g, cfg.vision.patch_dim()), &device)?;
    let request = GenerationRequest {
        input_ids: ids,
        pixel_values: Some(pixel_values),
        grid_thw: vec![grid],
    };
    let start = Instant::now();
    let (out, t) = model.generate(
        std::slice::from_ref(&request),
        &SamplingParams::greedy(args.decode + 1),
        &[],
    )?;
    let total_s = start.elapsed().as_secs_f64();
    let decode_tok_s = if t.decode_s > 0.0 {
        t.decode_steps as f64 / t.decode_s
    } else {
        0.0
    };
    let json = serde_json::json!({
        "shape": args.shape,
        "dtype": args.dtype,
        "prompt_tokens": args.prompt_tokens,
        "image": args.image,
        "vision_s": t.vision_s,
        "prefill_s": t.prefill_s - t.vision_s,
        "first_token_s": t.prefill_s,
        "decode_tok_s": decode_tok_s,
        "decoded": out.first().map_or(0, |g| g.token_ids.len()),
        "total_s": total_s,
        "init_s": init_s,
        "peak_rss_mb": peak_rss_mb(),
    });
    println!("{json}");
    Ok(())
}
