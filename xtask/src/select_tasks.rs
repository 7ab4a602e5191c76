//! `cargo xtask select-tasks`: ARPO's task selection. Keeps the tasks the base model solves at
//! least once in K attempts (optionally not every time) and writes an index
//! `{domain: [task ids]}` that `data.train_files` reads. The selection is
//! `arpo_trainer::select`; this file parses the arguments and prints.

use std::path::PathBuf;

use anyhow::{Context, Result};

use arpo_trainer::select::select;

use crate::eval::{Common, config, policy, run_eval};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,
    /// The candidate tasks: sim:train, sim:heldout, or a task index file.
    #[arg(long, default_value = "sim:train")]
    pub from: String,
    /// Where to write the selected index.
    #[arg(long)]
    pub out: PathBuf,
    /// Drop the tasks solved in every attempt too (nothing left to learn there).
    #[arg(long)]
    pub not_always: bool,
    /// Keep only the first N selected tasks (the seed's 8-task subset: --first 8).
    #[arg(long)]
    pub first: Option<usize>,
    /// At most K tasks of each domain (task family), taken in turns across the domains: with
    /// --first, a subset that covers as many kinds of task as it can instead of the first
    /// domain's tasks only.
    #[arg(long)]
    pub per_domain: Option<usize>,
    /// Also write the evaluation of every candidate (the JSON report of `eval`) here.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let config = config(&args.common)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let policy = rt.block_on(policy(&config))?;
    let report = rt.block_on(run_eval(
        &args.common,
        &config,
        policy.as_ref(),
        &args.from,
        "select-tasks",
        false,
    ))?;
    let tasks = arpo_trainer::setup::load_tasks(&args.from, &config, args.common.max_tasks)?;
    let index = select(
        &tasks,
        &report,
        args.not_always,
        args.per_domain,
        args.first,
    );
    let kept: usize = index.values().map(Vec::len).sum();
    print!("{}", report.table());
    if let Some(path) = &args.report {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&index)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "selected {kept} of {} tasks (solved at least once in {} attempts{}) -> {}",
        tasks.len(),
        args.common.attempts,
        if args.not_always {
            ", not every time"
        } else {
            ""
        },
        args.out.display()
    );
    if kept == 0 {
        anyhow::bail!(
            "no task was solved: the base model is too weak for this set, or raise --attempts"
        );
    }
    Ok(())
}
