//! `cargo xtask bench-model`: prefill and decode timings of the candle model with random
//! weights of a published shape (no download); prints one JSON line.
//!
//! Shapes: `--shape 2b` (UI-TARS-2B, Qwen2-VL-2B), `--shape 1.5-7b` (UI-TARS-1.5-7B,
//! Qwen2.5-VL-7B, windowed vision attention), or a model directory (its own weights).
//! `--layers` / `--vision-depth` cut a random-weight model to fewer decoder layers / vision
//! blocks, and `--vision-only` times the vision tower alone, so that a shape too big for the
//! machine still runs in part; the JSON says what ran. Before allocating, the weights' size is
//! checked against the memory available (CPU) and a shape that cannot fit is refused with the
//! options that make it fit. `--image WxH` (e.g. `1932x1092`, a 1920x1080 screenshot after
//! ARPO's smart resize) or a square side; `--device cuda` with a `--features cuda` build.
//!
//! With `--train`: forward + backward of one episode on the 2B shape (one 448x448 image, 346
//! prompt tokens + 64 assistant tokens), LoRA (`--lora-rank`, 16 by default) or full
//! fine-tuning (`--full`); prints one JSON line with the step seconds and the peak RSS.
//! The PyTorch sides are `fixtures/scripts/bench_pytorch_{infer,train}.py` (see BENCHMARKS.md).

use std::time::Instant;

use anyhow::Result;
use arpo_core::SamplingParams;
use arpo_model::{DeviceSpec, GenerationRequest, Qwen2Vl, Qwen2VlConfig};
use candle_core::{DType, Tensor};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model shape: `2b` (UI-TARS-2B / Qwen2-VL-2B), `1.5-7b` (UI-TARS-1.5-7B / Qwen2.5-VL-7B),
    /// or a model directory (its own weights).
    #[arg(long, default_value = "2b")]
    shape: String,
    /// The input image: `WIDTHxHEIGHT` or the side of a square, in pixels (multiples of 28).
    #[arg(long, default_value = "448")]
    image: String,
    /// Tokens decoded after the first one.
    #[arg(long, default_value_t = 16)]
    decode: usize,
    /// Prompt length in tokens, image tokens included (raised to fit the image when smaller).
    #[arg(long, default_value_t = 346)]
    prompt_tokens: usize,
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Rollout weights of the linear layers: f32, bf16, q8_0 or q4k (`Qwen2Vl::to_rollout`,
    /// made from the `--dtype` model; embeddings and norms stay as they are).
    #[arg(long, default_value = "f32", conflicts_with = "train")]
    weights: String,
    /// Make the f32 model first and copy it to `--weights` (the trainer's path: `quantize_s`
    /// is what a weight sync costs; the peak RSS then includes the f32 model).
    #[arg(long)]
    from_f32: bool,
    /// Also measure the sampler/learner gap: the `--weights` copy generates, then it and the
    /// f32 model it was made from score the prompt and its tokens; prints the mean KL(sampler ||
    /// learner) over the vocabulary at the generated positions and the rollout_gap metrics
    /// of the sampled tokens (implies `--from-f32`: both models are held).
    #[arg(long, conflicts_with = "vision_only")]
    kl: bool,
    /// cpu, cuda, cuda:N or metal (a GPU needs a build with that feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Time the vision tower alone (no decoder: its weights are not even made).
    #[arg(long, conflicts_with = "train")]
    vision_only: bool,
    /// Benchmark a training step (forward + backward, f32) instead of generation.
    #[arg(long)]
    train: bool,
    /// LoRA rank of the training benchmark (decoder projections, alpha = 2 r).
    #[arg(long, default_value_t = 16, conflicts_with = "full")]
    lora_rank: usize,
    /// Train every weight instead of LoRA adapters.
    #[arg(long, requires = "train")]
    full: bool,
    /// Decoder layers (28 in both shapes; fewer to fit in memory). Random shapes only.
    #[arg(long)]
    layers: Option<usize>,
    /// Vision blocks (32 in both shapes; fewer to fit in memory). Random shapes only.
    #[arg(long)]
    vision_depth: Option<usize>,
    /// Screenshots of the training episode: a trajectory of that many turns, each a screenshot
    /// and `--assistant-tokens` trained tokens (the learner scoring a whole episode).
    #[arg(long, default_value_t = 1, requires = "train")]
    images: usize,
    /// Assistant (scored) tokens of the training episode, after the prompt (per turn).
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

/// Peak resident set of this process (VmHWM), in MB; 0 where /proc is unavailable.
pub(crate) fn peak_rss_mb() -> f64 {
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

/// `MemAvailable` of /proc/meminfo in bytes; `None` off Linux.
fn available_memory() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    })
}

/// `448` or `1932x1092` as (width, height).
fn parse_image(s: &str) -> Result<(usize, usize)> {
    let (w, h) = match s.split_once(['x', 'X']) {
        Some((w, h)) => (w.trim().parse()?, h.trim().parse()?),
        None => {
            let side = s.trim().parse()?;
            (side, side)
        }
    };
    anyhow::ensure!(
        w > 0 && h > 0 && w % 28 == 0 && h % 28 == 0,
        "--image {s}: width and height must be positive multiples of 28 (smart_resize's output; 1920x1080 becomes 1932x1092)"
    );
    Ok((w, h))
}

fn run_train(args: &Args) -> Result<()> {
    use crate::bench_train::{BenchMode, TrainBench, train_step_2b};
    anyhow::ensure!(
        args.shape == "2b",
        "--train benchmarks the 2b shape only (xtask's bench_train, random weights); time the 1.5-7b shape's inference without --train"
    );
    anyhow::ensure!(
        args.dtype == "f32" && args.device == "cpu",
        "--train runs in f32 on the CPU (the dtype of training on CPU)"
    );
    // A 2B learner, as `cargo xtask train` runs one (`crate::tune_allocator_for`).
    arpo_alloc::release_idle_memory();
    let (w, h) = parse_image(&args.image)?;
    let bench = TrainBench {
        mode: if args.full {
            BenchMode::Full
        } else {
            BenchMode::Lora {
                rank: args.lora_rank,
            }
        },
        layers: args.layers.unwrap_or(28),
        vision_depth: args.vision_depth.unwrap_or(32),
        image: (w, h),
        images: args.images,
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

/// The random-weight shape to build, cut as asked, and its parameter count.
fn random_shape(args: &Args) -> Result<(Qwen2VlConfig, usize)> {
    let mut config = Qwen2VlConfig::named_shape(&args.shape).ok_or_else(|| {
        anyhow::anyhow!(
            "--shape {:?}: not a model directory, and not a named shape (2b, 1.5-7b)",
            args.shape
        )
    })?;
    if let Some(n) = args.layers {
        config.text.num_hidden_layers = n;
    }
    if let Some(n) = args.vision_depth {
        anyhow::ensure!(n >= 1, "--vision-depth must be at least 1");
        config.vision.depth = n;
        // Qwen2.5-VL's full-attention blocks past the cut go with it.
        if let arpo_model::config::VisionArch::Qwen25Vl {
            fullatt_block_indexes,
            ..
        } = &mut config.vision.arch
        {
            fullatt_block_indexes.retain(|&i| i < n);
        }
    }
    let params = arpo_model::model::param_shapes(&config)
        .iter()
        .filter(|(name, _)| !args.vision_only || name.starts_with("visual."))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    Ok((config, params))
}

pub fn run(args: Args) -> Result<()> {
    if args.train {
        return run_train(&args);
    }
    let dtype = crate::predict::parse_dtype(&args.dtype)?;
    let weights: arpo_model::RolloutWeights = args.weights.parse()?;
    anyhow::ensure!(
        weights == arpo_model::RolloutWeights::F32 || dtype == DType::F32,
        "--weights {weights} is made from f32 weights: leave --dtype at f32"
    );
    let spec: DeviceSpec = args.device.parse()?;
    let device = spec.open()?;
    let (width, height) = parse_image(&args.image)?;
    let dir = std::path::Path::new(&args.shape);
    let t0 = Instant::now();
    let (model, params) = if dir.is_dir() {
        anyhow::ensure!(
            args.layers.is_none() && args.vision_depth.is_none(),
            "--layers and --vision-depth cut random-weight shapes only, not a model directory"
        );
        let model = Qwen2Vl::load(dir, dtype, &device)?;
        let params = model.parameters().iter().map(|(_, t)| t.elem_count()).sum();
        (model, params)
    } else {
        let (mut config, params) = random_shape(&args)?;
        let bytes = params as u64 * dtype.size_in_bytes() as u64;
        if spec == DeviceSpec::Cpu
            && let Some(avail) = available_memory()
        {
            // Weights plus the transient f32 copy of the largest tensor while it is made,
            // activations and the KV cache: refuse what cannot fit rather than swap or die.
            anyhow::ensure!(
                bytes as f64 <= 0.75 * avail as f64,
                "--shape {} ({}{} decoder layers, {} vision blocks) has {:.2} B parameters: {:.1} GB of {} weights, more than 3/4 of the {:.1} GB available; run a part of it (--vision-only, --layers N, --vision-depth N) or --dtype bf16",
                args.shape,
                if args.vision_only {
                    "vision tower of "
                } else {
                    ""
                },
                config.text.num_hidden_layers,
                config.vision.depth,
                params as f64 / 1e9,
                bytes as f64 / 1e9,
                args.dtype,
                avail as f64 / 1e9,
            );
        }
        if args.vision_only {
            // No decoder weights are made: a 0-layer text model with a 1-token vocabulary.
            config.text.num_hidden_layers = 0;
            config.text.vocab_size = 1;
        }
        let model = if weights == arpo_model::RolloutWeights::F32 || args.from_f32 || args.kl {
            Qwen2Vl::random(config, dtype, &device)?
        } else {
            // Quantized as drawn: the peak is the serving memory, not an f32 model's.
            Qwen2Vl::random_rollout(config, weights, &device)?
        };
        (model, params)
    };
    let init_s = t0.elapsed().as_secs_f64();
    // The f32 model stays beside its copy only to measure the gap between them.
    let learner = args.kl.then(|| model.clone());
    let (model, rollout_json) = rollout_copy(model, weights)?;
    let cfg = &model.config;
    let (gh, gw) = (
        height / cfg.vision.patch_size,
        width / cfg.vision.patch_size,
    );
    let grid = [1, gh, gw];
    let image_tokens = gh * gw / cfg.vision.spatial_merge_size.pow(2);
    let pixel_values = Tensor::randn(0f32, 1.0, (gh * gw, cfg.vision.patch_dim()), &device)?;
    let mut json = serde_json::json!({
        "impl": "arpo-rs candle",
        "shape": args.shape,
        "model_type": if cfg.is_qwen25() { "qwen2_5_vl" } else { "qwen2_vl" },
        "dtype": args.dtype,
        "device": spec.to_string(),
        "params": params,
        "weights_gb": params as f64 * dtype.size_in_bytes() as f64 / 1e9,
        "vision_blocks": cfg.vision.depth,
        "image": format!("{width}x{height}"),
        "image_tokens": image_tokens,
        "threads": candle_core::utils::get_num_threads(),
        "cpu_kernels": cpu_kernels(),
        "init_s": init_s,
    });
    if let (Some(obj), serde_json::Value::Object(more)) = (json.as_object_mut(), rollout_json) {
        obj.extend(more);
    }
    let extra = if args.vision_only {
        let start = Instant::now();
        let features = model.vision.forward(&pixel_values, &[grid], true)?;
        // Waits for the device (and checks the output is whole).
        let n = features
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        anyhow::ensure!(n.is_finite(), "the vision tower gave a non-finite sum");
        serde_json::json!({
            "part": "vision tower only",
            "vision_s": start.elapsed().as_secs_f64(),
            "features": features.dims(),
        })
    } else {
        // A prompt of the requested length: text, <|vision_start|>, image tokens,
        // <|vision_end|>, text.
        let prompt_tokens = args.prompt_tokens.max(image_tokens + 2);
        let text = prompt_tokens - image_tokens - 2;
        // Text ids below the vision placeholders (a small vocabulary's specials sit at its end).
        let text_ids = (cfg.vision_start_token_id.min(cfg.image_token_id) as usize)
            .min(cfg.text.vocab_size)
            .min(150_000);
        let filler = |i: usize| (i * 7919 % text_ids) as u32;
        let mut ids: Vec<u32> = (0..text / 2).map(filler).collect();
        ids.push(cfg.vision_start_token_id);
        ids.extend(std::iter::repeat_n(cfg.image_token_id, image_tokens));
        ids.push(
            cfg.vision_end_token_id
                .unwrap_or(cfg.vision_start_token_id + 1),
        );
        ids.extend((text / 2..text).map(filler));
        let request = GenerationRequest {
            input_ids: ids,
            pixel_values: Some(pixel_values),
            grid_thw: vec![grid],
        };
        let prompt_ids = request.input_ids.clone();
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
        serde_json::json!({
            "part": if args.layers.is_none() && args.vision_depth.is_none() {
                "whole model".to_string()
            } else {
                format!("{} decoder layers, {} vision blocks", cfg.text.num_hidden_layers, cfg.vision.depth)
            },
            "decoder_layers": cfg.text.num_hidden_layers,
            "prompt_tokens": prompt_tokens,
            "vision_s": t.vision_s,
            "prefill_s": t.prefill_s - t.vision_s,
            "first_token_s": t.prefill_s,
            "decode_tok_s": decode_tok_s,
            "decoded": out.first().map_or(0, |g| g.token_ids.len()),
            "total_s": total_s,
            "sampler_learner_gap": match (&learner, out.first()) {
                (Some(learner), Some(g)) => sampler_learner_gap(
                    &model,
                    learner,
                    &prompt_ids,
                    &g.token_ids,
                    request.pixel_values.as_ref(),
                    &request.grid_thw,
                )?,
                _ => serde_json::Value::Null,
            },
        })
    };
    if let (Some(obj), serde_json::Value::Object(more)) = (json.as_object_mut(), extra) {
        obj.extend(more);
        obj.insert("peak_rss_mb".into(), peak_rss_mb().into());
    }
    println!("{json}");
    Ok(())
}

/// `--kl`: the sampler (`rollout`) and the learner (the f32 `learner` it was made from) score
/// the prompt and the sampler's tokens; at each generated position, the KL divergence of the
/// learner's next-token distribution from the sampler's over the whole vocabulary, and the
/// trainer's rollout_gap metrics (arpo_grpo::rollout_gap) of the sampled tokens.
fn sampler_learner_gap(
    rollout: &Qwen2Vl,
    learner: &Qwen2Vl,
    prompt: &[u32],
    generated: &[u32],
    pixel_values: Option<&Tensor>,
    grid_thw: &[[usize; 3]],
) -> Result<serde_json::Value> {
    let ids: Vec<u32> = prompt.iter().chain(generated).copied().collect();
    // Row p of the logits predicts token p + 1: the generated tokens are predicted by rows
    // prompt.len() - 1 .. ids.len() - 1.
    let rows = |m: &Qwen2Vl| -> Result<Vec<Vec<f32>>> {
        let logits = m.forward(&ids, pixel_values, grid_thw)?;
        Ok(logits
            .narrow(0, prompt.len() - 1, generated.len())?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?)
    };
    let (s, l) = (rows(rollout)?, rows(learner)?);
    let log_softmax = |z: &[f32]| -> Vec<f64> {
        let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + z.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        z.iter().map(|&v| v as f64 - lse).collect()
    };
    let mut kl = Vec::new();
    let mut gap = arpo_trainer::rollout_gap::RolloutGap::default();
    for ((zs, zl), &tok) in s.iter().zip(&l).zip(generated) {
        let (ls, ll) = (log_softmax(zs), log_softmax(zl));
        kl.push(
            ls.iter()
                .zip(&ll)
                .map(|(a, b)| a.exp() * (a - b))
                .sum::<f64>(),
        );
        gap.add_token(ls[tok as usize], ll[tok as usize], None);
    }
    Ok(serde_json::json!({
        "positions": kl.len(),
        "kl_mean": kl.iter().sum::<f64>() / kl.len().max(1) as f64,
        "kl_max": kl.iter().copied().fold(0.0, f64::max),
        "rollout_kl": gap.kl(),
        "rollout_kl_k3": gap.kl_k3(),
        "rollout_ratio_max": gap.ratio_max(),
    }))
}

/// The `--weights` copy of a loaded `model` (the source is dropped; a random shape is made
/// quantized already) and what it holds, for the JSON line.
fn rollout_copy(
    model: Qwen2Vl,
    weights: arpo_model::RolloutWeights,
) -> Result<(Qwen2Vl, serde_json::Value)> {
    let start = Instant::now();
    let rollout = if model.rollout_summary().quantized == 0 {
        model.to_rollout(weights)?
    } else {
        model
    };
    let s = rollout.rollout_summary();
    let json = serde_json::json!({
        "weights": weights.to_string(),
        "quantize_s": start.elapsed().as_secs_f64(),
        "quantized_linears": s.quantized,
        "kept_linears": s.kept,
        "linear_weights_gb": s.linear_bytes as f64 / 1e9,
    });
    Ok((rollout, json))
}

/// Which of our CPU products this machine runs (they are picked at run time from its
/// features), for the record of a series.
pub(crate) fn cpu_kernels() -> serde_json::Value {
    serde_json::json!({
        "int8": format!("{:?}", arpo_model::q4_gemm::Q4Kernel::best()),
        "bf16": format!("{:?}", arpo_model::bf16_gemm::Bf16Kernel::best()),
    })
}
