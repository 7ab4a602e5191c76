//! `cargo xtask bench-episode`: one whole multi-turn episode on the UI-TARS-2B shape (random
//! weights, no download), the way a rollout runs it: every step sends the whole history to
//! `generate` again (as the seed's server and every OpenAI-style client do) and the answer
//! joins the history. Prints one JSON line with the seconds of each step, the total, the
//! prompt tokens the prefix cache served, and the peak RSS.
//!
//! The episode, token by token (the PyTorch side, `fixtures/scripts/bench_pytorch_episode.py`,
//! builds the same one): `--prompt-tokens` text tokens (the system prompt and instruction),
//! then per earlier step `k`: its screenshot (`<|vision_start|>`, the image tokens,
//! `<|vision_end|>`) unless more than `--limit-images` screenshots are newer, and its answer
//! (`<|im_start|>`, the `--response-tokens` generated tokens, `<|im_end|>`); then the current
//! screenshot. Screenshots are `--screen` pixels after Qwen2-VL's smart resize (ARPO's
//! `max_pixels` 2,116,800), each with its own random pixels; answers are greedy and exactly
//! `--response-tokens` long (no stop token).
//!
//!     cargo xtask bench-episode --screen 800x450 --steps 10 --limit-images 5
//!     cargo xtask bench-episode --screen 800x450 --steps 10 --limit-images 5 --no-cache

use std::time::Instant;

use anyhow::{Context, Result};
use arpo_core::{SamplingParams, ScreenSize};
use arpo_model::{GenerationRequest, Qwen2Vl, Qwen2VlConfig, RolloutWeights};
use candle_core::{DType, Device, Tensor};

/// ARPO's and UI-TARS' `max_pixels` (a 1920x1080 screenshot stays 1932x1092).
const MAX_PIXELS: u64 = 2_116_800;
const MIN_PIXELS: u64 = 3_136;
const IM_START: u32 = 151_644;
const IM_END: u32 = 151_645;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Steps (model calls) of the episode.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Screenshot size before the smart resize, `WIDTHxHEIGHT`.
    #[arg(long, default_value = "800x450")]
    screen: ScreenSize,
    /// Screenshots kept in the prompt (`worker.rollout.limit_images`).
    #[arg(long, default_value_t = 5)]
    limit_images: usize,
    /// Tokens generated per step.
    #[arg(long, default_value_t = 64)]
    response_tokens: usize,
    /// Text tokens before the first screenshot (system prompt and instruction).
    #[arg(long, default_value_t = 500)]
    prompt_tokens: usize,
    /// Turn automatic prefix caching off: every step encodes every screenshot and prefills
    /// the whole history again.
    #[arg(long)]
    no_cache: bool,
    /// The prefix cache's budget in MiB.
    #[arg(long, default_value_t = 8192)]
    cache_mib: usize,
    /// Weights of the linear layers: f32, bf16, q8_0 or q4k.
    #[arg(long, default_value = "f32")]
    weights: RolloutWeights,
    /// Decoder layers (28 in the 2B shape; fewer for a quick look).
    #[arg(long)]
    layers: Option<usize>,
    /// Vision blocks (32 in the 2B shape).
    #[arg(long)]
    vision_depth: Option<usize>,
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.steps >= 1, "--steps must be at least 1");
    anyhow::ensure!(
        args.response_tokens >= 1,
        "--response-tokens must be at least 1"
    );
    let mut config = Qwen2VlConfig::named_shape("2b").context("the 2b shape")?;
    if let Some(n) = args.layers {
        config.text.num_hidden_layers = n;
    }
    if let Some(n) = args.vision_depth {
        anyhow::ensure!(n >= 1, "--vision-depth must be at least 1");
        config.vision.depth = n;
    }
    let device = Device::Cpu;
    let t0 = Instant::now();
    let model = if args.weights == RolloutWeights::F32 {
        Qwen2Vl::random(config, DType::F32, &device)?
    } else {
        Qwen2Vl::random_rollout(config, args.weights, &device)?
    };
    let init_s = t0.elapsed().as_secs_f64();
    let budget = if args.no_cache {
        0
    } else {
        args.cache_mib.saturating_mul(1 << 20)
    };
    model.set_prefix_cache_budget(budget);
    let cfg = &model.config;
    let (h, w) = arpo_core::protocol::smart_resize(
        args.screen.height,
        args.screen.width,
        28,
        MIN_PIXELS,
        MAX_PIXELS,
    )?;
    let patch = cfg.vision.patch_size;
    let grid = [1, h as usize / patch, w as usize / patch];
    let patches = grid[1] * grid[2];
    let image_tokens = patches / cfg.vision.spatial_merge_size.pow(2);
    let vision_end = cfg
        .vision_end_token_id
        .unwrap_or(cfg.vision_start_token_id + 1);
    let filler = |i: usize| (i * 7919 % 150_000) as u32;
    let prefix: Vec<u32> = (0..args.prompt_tokens).map(filler).collect();
    let screenshots: Vec<Tensor> = (0..args.steps)
        .map(|_| Tensor::randn(0f32, 1.0, (patches, cfg.vision.patch_dim()), &device))
        .collect::<candle_core::Result<_>>()?;
    let greedy = SamplingParams::greedy(args.response_tokens);
    let mut answers: Vec<Vec<u32>> = Vec::new();
    let mut steps = Vec::with_capacity(args.steps);
    let start = Instant::now();
    for step in 0..args.steps {
        let first_kept = (step + 1).saturating_sub(args.limit_images.max(1));
        let mut ids = prefix.clone();
        let mut pixels = Vec::new();
        for (k, shot) in screenshots.iter().enumerate().take(step + 1) {
            if k >= first_kept {
                ids.push(cfg.vision_start_token_id);
                ids.extend(std::iter::repeat_n(cfg.image_token_id, image_tokens));
                ids.push(vision_end);
                pixels.push(shot.clone());
            }
            if let Some(answer) = answers.get(k) {
                ids.push(IM_START);
                ids.extend_from_slice(answer);
                ids.push(IM_END);
            }
        }
        let images = pixels.len();
        let request = GenerationRequest {
            input_ids: ids,
            pixel_values: Some(Tensor::cat(&pixels, 0)?),
            grid_thw: vec![grid; images],
        };
        let prompt_tokens = request.input_ids.len();
        let t = Instant::now();
        let (mut out, timings) = model.generate(std::slice::from_ref(&request), &greedy, &[])?;
        let seconds = t.elapsed().as_secs_f64();
        let generation = out.remove(0);
        anyhow::ensure!(
            generation.token_ids.len() == args.response_tokens,
            "step {step} generated {} tokens, not {}",
            generation.token_ids.len(),
            args.response_tokens
        );
        steps.push(serde_json::json!({
            "step": step,
            "images": images,
            "prompt_tokens": prompt_tokens,
            "cached_tokens": generation.cached_tokens,
            "vision_s": timings.vision_s,
            "prefill_s": timings.prefill_s - timings.vision_s,
            "decode_s": timings.decode_s,
            "seconds": seconds,
        }));
        eprintln!(
            "step {step}: {seconds:.1} s ({images} images, {prompt_tokens} prompt tokens, {} cached)",
            generation.cached_tokens
        );
        answers.push(generation.token_ids);
    }
    let total_s = start.elapsed().as_secs_f64();
    let stats = model.prefix_cache.stats();
    println!(
        "{}",
        serde_json::json!({
            "impl": "arpo-rs candle",
            "shape": "2b",
            "weights": args.weights.to_string(),
            "cache": !args.no_cache,
            "threads": candle_core::utils::get_num_threads(),
            "cpu_kernels": crate::bench_model::cpu_kernels(),
            "screen": args.screen.to_string(),
            "resized": format!("{w}x{h}"),
            "image_tokens": image_tokens,
            "steps": args.steps,
            "limit_images": args.limit_images,
            "response_tokens": args.response_tokens,
            "prompt_tokens": args.prompt_tokens,
            "init_s": init_s,
            "total_s": total_s,
            "per_step": steps,
            "cache_stats": {
                "prompt_tokens": stats.prompt_tokens,
                "cached_tokens": stats.cached_tokens,
                "image_queries": stats.image_queries,
                "image_hits": stats.image_hits,
                "bytes": stats.bytes,
            },
            "peak_rss_mb": crate::bench_model::peak_rss_mb(),
        })
    );
    Ok(())
}
