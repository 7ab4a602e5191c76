//! `cargo xtask eval`: success rate of a model on a task set, with a 95% interval, a per-task
//! table and a JSON report for `cargo xtask compare`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use arpo_core::Policy;
use arpo_trainer::Config;
use arpo_trainer::eval::{EvalReport, evaluate};
use arpo_trainer::model::load_policy;
use arpo_trainer::remote::server_policy;
use arpo_trainer::rollout::RolloutEvent;
use arpo_trainer::setup::{Envs, build_envs, load_tasks};
use arpo_trainer::train::rollout_settings;

/// What `eval` and `select-tasks` share: the config, the model, the tasks.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// The run config that says which environment and settings to use.
    #[arg(long, default_value = "configs/embedded_default.yaml")]
    pub config: PathBuf,
    /// Override a config key (repeatable), e.g. `--set env.max_steps=10`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// The model: a directory (a checkpoint `epoch_<N>` too) or a cached HF repo id;
    /// default: the config's worker.actor.model.model_path.
    #[arg(long)]
    pub model: Option<String>,
    /// Roll out through an OpenAI-compatible server instead of the local model (sets
    /// worker.rollout.server_url; the config's server_urls, server_api_key and
    /// use_external_server: true do the same without this flag).
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// The model name to ask the server for (default: the config's server_model, else the
    /// first model the server lists).
    #[arg(long)]
    pub server_model: Option<String>,
    /// Attempts per task.
    #[arg(long, default_value_t = 1)]
    pub attempts: usize,
    /// Sampling temperature (default: the config's validation temperature).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Seed of the sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// At most this many tasks (0: all).
    #[arg(long, default_value_t = 0)]
    pub max_tasks: usize,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// The tasks: sim:train, sim:heldout, or a task index file.
    #[arg(long, default_value = "sim:heldout")]
    pub tasks: String,
    /// Where to write the JSON report.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The report's name in `compare` (default: the model).
    #[arg(long)]
    pub label: Option<String>,
}

/// The config with the command line's choices applied.
pub fn config(common: &Common) -> Result<Config> {
    let mut config = Config::load(&common.config, &common.set)?;
    if let Some(m) = &common.model {
        config.worker.actor.model.model_path = PathBuf::from(m);
    }
    if let Some(url) = &common.server {
        config.worker.rollout.use_external_server = true;
        config.worker.rollout.server_url = url.clone();
    }
    if let Some(model) = &common.server_model {
        config.worker.rollout.server_model = model.clone();
    }
    Ok(config)
}

/// The policy to evaluate: the local candle model or a server.
pub async fn policy(config: &Config) -> Result<Box<dyn Policy>> {
    if config.worker.rollout.use_external_server {
        return Ok(Box::new(server_policy(config).await?));
    }
    Ok(Box::new(load_policy(config)?))
}

/// Evaluates `policy` on `tasks` with `attempts` rollouts each.
pub async fn run_eval(
    common: &Common,
    config: &Config,
    policy: &dyn Policy,
    tasks_spec: &str,
    label: &str,
    quiet: bool,
) -> Result<EvalReport> {
    let tasks = load_tasks(tasks_spec, config, common.max_tasks)?;
    anyhow::ensure!(!tasks.is_empty(), "the task set {tasks_spec} is empty");
    let mut settings = rollout_settings(config, true)?;
    settings.group_size = common.attempts.max(1);
    if let Some(t) = common.temperature {
        settings.sampling.temperature = t;
    }
    let threshold = config.algorithm.replay.success_threshold;
    let total = tasks.len() * settings.group_size;
    let mut done = 0usize;
    let mut observer = |ev: RolloutEvent<'_>| {
        if let RolloutEvent::EpisodeDone { .. } = ev {
            done += 1;
            if !quiet {
                eprint!("\r{done}/{total} episodes");
            }
        }
    };
    let report = match build_envs(config)? {
        Envs::Sim(mut e) => {
            evaluate(
                policy,
                &mut e,
                &tasks,
                &settings,
                common.seed,
                threshold,
                label,
                tasks_spec,
                &mut observer,
            )
            .await?
        }
        Envs::Osworld(mut e) => {
            evaluate(
                policy,
                &mut e,
                &tasks,
                &settings,
                common.seed,
                threshold,
                label,
                tasks_spec,
                &mut observer,
            )
            .await?
        }
    };
    if !quiet {
        eprintln!();
    }
    Ok(report)
}

pub fn run(args: Args) -> Result<()> {
    let config = config(&args.common)?;
    if let Ok(dir) = arpo_model::weights::resolve_model_dir(
        &config.worker.actor.model.model_path.to_string_lossy(),
    ) {
        crate::tune_allocator_for(&dir);
    }
    let label = args.label.clone().unwrap_or_else(|| {
        args.common
            .model
            .clone()
            .unwrap_or_else(|| config.worker.actor.model.model_path.display().to_string())
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let policy = rt.block_on(policy(&config))?;
    let report = rt.block_on(run_eval(
        &args.common,
        &config,
        policy.as_ref(),
        &args.tasks,
        &label,
        false,
    ))?;
    print!("{}", report.table());
    println!(
        "(the interval counts this model's episodes as independent; to compare training runs, \
         evaluate each seed's checkpoint with one --label and use `cargo xtask compare`, which \
         takes the run as the unit)"
    );
    if let Some(out) = &args.out {
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(out, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", out.display()))?;
        eprintln!("report: {}", out.display());
    }
    Ok(())
}
