//! `cargo xtask sft`: the tiny UI-TARS base policy, from nothing, in one command: oracle
//! demonstrations of the embedded desktop, a tokenizer trained for them, a tiny model of the
//! real Qwen2-VL architecture, supervised fine-tuning, and its success rate on the tasks.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use arpo_core::protocol::CoordinateSystem;
use arpo_model::train::trainable::Trainable;
use arpo_model::{ChatTokenizer, Qwen2Vl};
use arpo_trainer::Config;
use arpo_trainer::model::prompt_config;
use arpo_trainer::sft::{
    SftConfig, TinyShape, demonstrations, init_model_dir, run_sft, samples, sft_tasks,
    train_tokenizer,
};
use candle_core::{DType, Device};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write the model (HF layout).
    #[arg(long, default_value = "fixtures/models/uitars-tiny-base")]
    pub out: PathBuf,
    /// The run config whose prompt (coordinates, limit_images) the model is trained for.
    #[arg(long, default_value = "configs/embedded_default.yaml")]
    pub config: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 300)]
    pub steps: usize,
    /// Samples per optimizer step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Tokenizer size, special tokens included.
    #[arg(long, default_value_t = 1024)]
    pub vocab: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue training this model instead of starting from random weights.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Training-distribution task instances per family to learn from (the training split is
    /// the first 16 of each family).
    #[arg(long, default_value_t = 48)]
    pub tasks_per_family: usize,
    /// Also write the model every this many steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Print the loss every this many steps.
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    /// Samples scored in parallel, each on one core (0: one per core). With 1, candle spreads
    /// each op over the cores instead; on small models whole samples per core is faster.
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
}

pub fn run(args: Args) -> Result<()> {
    let workers = match args.workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    if workers > 1
        && std::env::var_os("RAYON_NUM_THREADS").is_none()
        && std::env::var_os("CANDLE_NUM_THREADS").is_none()
    {
        // Each worker thread runs its own sample: candle's ops must not also fan out over the
        // cores (its spinning thread pool then fights the workers; measured 1.5x slower).
        // SAFETY: nothing else runs yet (no runtime, no thread pool exists at this point).
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("RAYON_NUM_THREADS", "1")
        };
    }
    crate::pin_thread_count();
    let config = Config::load(&args.config, &[])?;
    let prompt = prompt_config(&config);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let t0 = Instant::now();
    let tasks = sft_tasks(args.tasks_per_family);
    let demos = rt.block_on(demonstrations(&tasks, &CoordinateSystem::Relative1000))?;
    let failed: Vec<&str> = demos
        .iter()
        .filter(|d| d.eval_result < 1.0)
        .map(|d| d.task_id.as_str())
        .collect();
    anyhow::ensure!(
        failed.is_empty(),
        "oracle solutions that do not solve their task: {failed:?}"
    );
    eprintln!(
        "{} demonstrations ({} steps) from {} tasks in {:.1}s",
        demos.len(),
        demos.iter().map(|d| d.turns.len()).sum::<usize>(),
        tasks.len(),
        t0.elapsed().as_secs_f64()
    );

    let init_dir = match &args.init {
        Some(dir) => dir.clone(),
        None => {
            let staging = args.out.with_extension("staging");
            let init = args.out.with_extension("init");
            for d in [&staging, &init] {
                if d.exists() {
                    std::fs::remove_dir_all(d)
                        .with_context(|| format!("clearing {}", d.display()))?;
                }
            }
            std::fs::create_dir_all(&staging)?;
            // The tokenizer learns the text the model will read and write.
            let mut texts = vec![prompt.system.clone(), "system user assistant".to_string()];
            for d in &demos {
                texts.push(prompt.template.render(&prompt.language, &d.instruction));
                texts.extend(d.turns.iter().map(|t| t.response.text.clone()));
            }
            train_tokenizer(&texts, args.vocab, &staging.join("tokenizer.json"))?;
            let model_config = init_model_dir(&staging, &TinyShape::default())?;
            let model = Qwen2Vl::random_seeded(model_config, DType::F32, &Device::Cpu, args.seed)?;
            Trainable::full(model, false)?.save(&init, &staging, None)?;
            std::fs::remove_dir_all(&staging)?;
            init
        }
    };
    let tokenizer = ChatTokenizer::from_dir(&init_dir)?;
    let samples = samples(&demos, &tokenizer, prompt.limit_images)?;
    eprintln!(
        "{} samples; model {}; {} steps of {} samples at lr {}",
        samples.len(),
        init_dir.display(),
        args.steps,
        args.batch,
        args.lr
    );
    let sft = SftConfig {
        seed: args.seed,
        steps: args.steps,
        batch: args.batch,
        lr: args.lr,
        warmup_steps: (args.steps / 20) as u64,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        prompt,
        save_every: args.save_every,
        workers,
    };
    let t1 = Instant::now();
    let log_every = args.log_every.max(1);
    let out = run_sft(&init_dir, &args.out, &samples, &sft, &mut |l| {
        if l.step % log_every == 0 || l.step + 1 == args.steps {
            eprintln!(
                "step {:>5}  nll {:.4}  grad_norm {:.3}  lr {:.2e}  ({:.0}s)",
                l.step,
                l.nll,
                l.grad_norm,
                l.lr,
                t1.elapsed().as_secs_f64()
            );
        }
    })?;
    if args.init.is_none() {
        std::fs::remove_dir_all(&init_dir).ok();
    }
    std::fs::write(
        out.join("sft_args.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "command": "cargo xtask sft",
            "steps": args.steps,
            "batch": args.batch,
            "lr": args.lr,
            "vocab": args.vocab,
            "seed": args.seed,
            "tasks_per_family": args.tasks_per_family,
            "init": args.init,
            "config": args.config,
            "seconds": t1.elapsed().as_secs_f64(),
        }))?,
    )?;
    println!("model: {}", out.display());
    println!(
        "measure it: cargo xtask eval --model {} --tasks sim:train",
        out.display()
    );
    Ok(())
}
