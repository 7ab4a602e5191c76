//! `cargo xtask select-tasks`: ARPO's task selection. Keeps the tasks the base model solves at
//! least once in K attempts (optionally not every time) and writes an index
//! `{domain: [task ids]}` that `data.train_files` reads.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};

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
}

pub fn run(args: Args) -> Result<()> {
    let config = config(&args.common)?;
    let policy = policy(&args.common, &config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = rt.block_on(run_eval(
        &args.common,
        &config,
        policy.as_ref(),
        &args.from,
        "select-tasks",
        false,
    ))?;
    let tasks = arpo_trainer::setup::load_tasks(&args.from, &config, args.common.max_tasks)?;
    let mut index: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut kept = 0usize;
    // The candidates' order, so that --first N takes the first tasks of the set.
    for task in &tasks {
        let Some(t) = report.per_task.iter().find(|t| t.task_id == task.id) else {
            continue;
        };
        let keep = t.successes > 0 && !(args.not_always && t.successes == t.attempts);
        if keep && args.first.is_none_or(|n| kept < n) {
            kept += 1;
            index
                .entry(task.domain.clone().unwrap_or_else(|| "tasks".into()))
                .or_default()
                .push(task.id.clone());
        }
    }
    print!("{}", report.table());
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&index)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "selected {kept} of {} tasks (solved at least once in {} attempts{}) -> {}",
        tasks.len(),
        args.common.attempts,
        if args.not_always { ", not every time" } else { "" },
        args.out.display()
    );
    if kept == 0 {
        anyhow::bail!("no task was solved: the base model is too weak for this set, or raise --attempts");
    }
    Ok(())
}
