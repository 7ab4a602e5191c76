//! `cargo xtask train`: the ARPO run of a config, end to end, in this process.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use arpo_core::{Environment, Policy};
use arpo_trainer::model::{CandleLearner, load_local};
use arpo_trainer::plan::{ResumeFrom, RunPlan};
use arpo_trainer::remote::remote_policy;
use arpo_trainer::setup::{Envs, build_envs, preflight};
use arpo_trainer::{Config, Progress, Trainer};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The run's YAML config (the seed's structure; see configs/).
    #[arg(long, default_value = "configs/embedded_default.yaml")]
    pub config: PathBuf,
    /// Override a config key, e.g. `--set worker.actor.optim.lr=1e-6` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue from the latest checkpoint of the experiment, or from the `epoch_<N>` folder given.
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = "")]
    pub resume: Option<String>,
    /// No progress bar; log lines on stderr instead.
    #[arg(long)]
    pub quiet: bool,
    /// Run the pre-flight checks, print the resolved config, time two model calls at the
    /// run's screenshot size and print how long a rollout, a step and an epoch will take on
    /// this machine (with the settings that would shorten it), and stop.
    #[arg(long)]
    pub check: bool,
    /// Serve the live dashboard of this run (default 127.0.0.1:8265, loopback).
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = arpo_dashboard::DEFAULT_ADDR)]
    pub dashboard: Option<std::net::SocketAddr>,
}

/// Logs to `<logs_path>/training.log` (everything at info) and to stderr (warnings, or
/// everything with `quiet`). `RUST_LOG` overrides the file's level.
pub fn init_logging(logs_dir: &Path, quiet: bool) -> Result<()> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer, fmt};
    std::fs::create_dir_all(logs_dir)
        .with_context(|| format!("creating {}", logs_dir.display()))?;
    let path = logs_dir.join("training.log");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let file_layer = fmt::layer()
        .with_ansi(false)
        .with_writer(Arc::new(file))
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")));
    let stderr_level = if quiet { "info" } else { "warn" };
    let stderr_layer = fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(EnvFilter::new(stderr_level));
    // A second call (tests, several runs in one process) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(file_layer)
        .with(stderr_layer)
        .try_init();
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    let config = Config::load(&args.config, &args.set)?;
    let model_dir = &config.worker.actor.model.model_path;
    if let Ok(dir) = arpo_model::weights::resolve_model_dir(&model_dir.to_string_lossy()) {
        crate::tune_allocator_for(&dir);
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none()
        && std::env::var_os("CANDLE_NUM_THREADS").is_none()
        && arpo_trainer::model::prefers_sample_parallel(model_dir)
    {
        // A small model: the learner scores one sequence per core, so candle's ops stay on one
        // thread (its spinning pool would fight the workers: updates 1.6x slower, measured).
        // SAFETY: no other thread exists yet (no runtime, no logger, no candle pool).
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("RAYON_NUM_THREADS", "1")
        };
    }
    crate::pin_thread_count();
    init_logging(&config.trainer.logs_path, args.quiet)?;
    if let Some(addr) = args.dashboard {
        let addr = arpo_dashboard::serve_in_background(config.results_dir(), addr)?;
        eprintln!("dashboard: http://{addr}/");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(train(config, args))
}

async fn train(config: Config, args: Args) -> Result<()> {
    eprintln!(
        "ARPO-rs train: experiment {} ({} on {}), config {}",
        config.trainer.experiment_name,
        config.worker.actor.model.model_path.display(),
        match config.env.provider {
            arpo_trainer::config::EnvProvider::Sim => "the embedded desktop",
            arpo_trainer::config::EnvProvider::Vmware => "VMware",
            arpo_trainer::config::EnvProvider::Remote => "remote guest servers",
        },
        args.config.display()
    );
    preflight(&config).await?;
    if args.check {
        println!("{}", config.to_yaml());
        eprintln!("pre-flight checks passed");
        if config.worker.rollout.use_external_server {
            eprintln!("rollouts run on a server: no time estimate (it measures the local model)");
        } else {
            eprintln!("timing two model calls at the run's screenshot size ...");
            let plan = RunPlan::new(&config)?;
            let policy = arpo_trainer::model::load_policy(&config)?;
            let measured = arpo_trainer::estimate::measure(&config, &policy).await?;
            let shape = arpo_trainer::estimate::RunShape::of(&config, plan.steps_per_epoch);
            print!("{}", arpo_trainer::estimate::report(&measured, &shape));
        }
        return Ok(());
    }
    let RunPlan {
        train_tasks,
        val_tasks,
        steps_per_epoch,
        total_optimizer_steps,
    } = RunPlan::new(&config)?;
    let (local, learner) = load_local(&config, total_optimizer_steps)?;
    let envs = build_envs(&config)?;
    eprintln!(
        "{} training tasks, {} held-out, {} environments, {} epochs of {} steps",
        train_tasks.len(),
        val_tasks.len(),
        envs.len(),
        config.trainer.total_episodes,
        steps_per_epoch
    );
    let resume = ResumeFrom::choose(&config, args.resume.as_deref());
    let quiet = args.quiet;
    if config.worker.rollout.use_external_server {
        let (remote, learner) = remote_policy(&config, learner).await?;
        println!(
            "Rollouts on {} (model {}), weight sync {:?}",
            remote.config().base_urls.join(", "),
            remote.config().model,
            config.worker.rollout.weight_sync
        );
        drop(local);
        run_envs(
            config,
            &remote,
            envs,
            learner,
            train_tasks,
            val_tasks,
            resume,
            quiet,
        )
        .await
    } else {
        run_envs(
            config,
            &local,
            envs,
            learner,
            train_tasks,
            val_tasks,
            resume,
            quiet,
        )
        .await
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_envs<P: Policy + ?Sized>(
    config: Config,
    policy: &P,
    envs: Envs,
    learner: CandleLearner,
    train_tasks: Vec<arpo_core::Task>,
    val_tasks: Vec<arpo_core::Task>,
    resume: ResumeFrom,
    quiet: bool,
) -> Result<()> {
    match envs {
        Envs::Sim(e) => {
            run_with(
                config,
                policy,
                e,
                learner,
                train_tasks,
                val_tasks,
                resume,
                quiet,
            )
            .await
        }
        Envs::Osworld(e) => {
            run_with(
                config,
                policy,
                e,
                learner,
                train_tasks,
                val_tasks,
                resume,
                quiet,
            )
            .await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_with<P: Policy + ?Sized, E: Environment>(
    config: Config,
    policy: &P,
    envs: Vec<E>,
    learner: CandleLearner,
    train_tasks: Vec<arpo_core::Task>,
    val_tasks: Vec<arpo_core::Task>,
    resume: ResumeFrom,
    quiet: bool,
) -> Result<()> {
    let console = config
        .trainer
        .logger
        .contains(&arpo_trainer::config::Logger::Console);
    let progress = if quiet || !console {
        Progress::quiet()
    } else {
        Progress::terminal()
    };
    let mut trainer = Trainer::new(
        config.clone(),
        policy,
        envs,
        learner,
        train_tasks,
        val_tasks,
        progress,
    )?;
    let resume_dir = match &resume {
        ResumeFrom::Fresh => None,
        ResumeFrom::Latest => trainer.resume(None)?,
        ResumeFrom::Dir(dir) => trainer.resume(Some(dir))?,
    };
    if let Some(dir) = resume_dir {
        eprintln!("resumed from {}", dir.display());
    } else if resume != ResumeFrom::Fresh {
        eprintln!("nothing to resume from: starting fresh");
    }
    let summary = trainer.run().await?;
    let results = config.results_dir();
    if !console {
        return Ok(());
    }
    println!("epoch  avg_reward  success  replay  loss");
    for e in &summary.metrics.epochs {
        println!(
            "{:>5}  {:>10.3}  {:>6.1}%  {:>6}  {:>8.4}",
            e.epoch,
            e.avg_reward,
            100.0 * e.success_rate,
            e.replay_size,
            e.loss
        );
    }
    println!(
        "metrics:     {}",
        results.join("training_metrics.json").display()
    );
    println!(
        "replay:      {}",
        results.join("replay_buffer_stats.json").display()
    );
    println!("per task:    {}", results.join("task_results").display());
    println!(
        "curves:      {}",
        results.join("training_curves.png").display()
    );
    if let Some(ck) = &summary.last_checkpoint {
        println!("checkpoint:  {}", ck.display());
    }
    println!(
        "log:         {}",
        config.trainer.logs_path.join("training.log").display()
    );
    Ok(())
}
