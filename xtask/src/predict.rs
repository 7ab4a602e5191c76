//! `cargo xtask predict`: run the model once on a screenshot and an instruction.

use std::time::Instant;

use anyhow::{Context, Result};
use arpo_core::protocol::{
    CoordinateSystem, ParseConfig, PromptConfig, build_messages, parse_response,
};
use arpo_core::{AgentContext, SamplingParams, Screenshot};
use arpo_model::UiTars;
use candle_core::{DType, Device};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A local model directory, or a Hugging Face repo id already in the local cache
    /// (e.g. ByteDance-Seed/UI-TARS-2B-SFT; download it first with `huggingface-cli download`).
    #[arg(long)]
    model: String,
    /// The screenshot (PNG or JPEG).
    #[arg(long)]
    image: std::path::PathBuf,
    /// The task instruction.
    #[arg(long)]
    instruction: String,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long)]
    seed: Option<u64>,
    /// Weight precision: f32 (exact) or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => anyhow::bail!("unknown --dtype {other:?}: use f32, bf16 or f16"),
    }
}

pub fn run(args: Args) -> Result<()> {
    let dtype = parse_dtype(&args.dtype)?;
    let t0 = Instant::now();
    let model = UiTars::load(&args.model, dtype, &Device::Cpu)
        .with_context(|| format!("loading {}", args.model))?;
    let load_s = t0.elapsed().as_secs_f64();
    let bytes =
        std::fs::read(&args.image).with_context(|| format!("reading {}", args.image.display()))?;
    let img = arpo_model::processor::decode_image(&bytes)?;
    let (width, height) = (img.width(), img.height());
    let context = AgentContext {
        instruction: args.instruction.clone(),
        screenshots: vec![Screenshot::new(bytes, width, height)],
        responses: vec![],
    };
    let messages = build_messages(&context, &PromptConfig::default());
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: -1,
        max_tokens: args.max_tokens,
        seed: args.seed,
    };
    let (responses, t) = model.respond(&[messages], &sampling)?;
    let response = responses
        .into_iter()
        .next()
        .context("the model returned no response")?;
    println!("response:\n{}\n", response.text);
    let parse = ParseConfig::new(CoordinateSystem::Relative1000, width, height);
    match parse_response(&response.text, &parse) {
        Ok(parsed) => println!(
            "parsed actions: {}",
            serde_json::to_string(&parsed.actions)?
        ),
        Err(e) => println!("parse error: {e}"),
    }
    let g = t.generation;
    let decode_tok_s = if g.decode_s > 0.0 {
        g.decode_steps as f64 / g.decode_s
    } else {
        0.0
    };
    println!(
        "timings: load {load_s:.2} s, image preprocess {:.3} s, vision {:.2} s, prefill (to first token) {:.2} s, decode {} tokens at {decode_tok_s:.2} tok/s, finish {:?}",
        t.preprocess_s,
        g.vision_s,
        g.prefill_s,
        response.token_ids.len(),
        response.finish_reason
    );
    Ok(())
}
