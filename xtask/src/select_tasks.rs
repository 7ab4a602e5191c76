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
    // The solved candidates, in the set's order.
    let mut solved: Vec<(String, String)> = Vec::new();
    for task in &tasks {
        let Some(t) = report.per_task.iter().find(|t| t.task_id == task.id) else {
            continue;
        };
        if t.successes == 0 || (args.not_always && t.successes == t.attempts) {
            continue;
        }
        let domain = task.domain.clone().unwrap_or_else(|| "tasks".into());
        solved.push((domain, task.id.clone()));
    }
    let picked = pick(&solved, args.per_domain, args.first);
    let kept = picked.len();
    let mut index: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (domain, id) in picked {
        index.entry(domain).or_default().push(id);
    }
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

/// The tasks to keep from the solved ones (in the set's order): without `per_domain`, the first
/// ones; with it, at most that many of each domain, taken in rounds (the first task of every
/// domain in order of appearance, then the second, ...). `first` caps the total either way.
fn pick(
    solved: &[(String, String)],
    per_domain: Option<usize>,
    first: Option<usize>,
) -> Vec<(String, String)> {
    let cap = first.unwrap_or(usize::MAX);
    let Some(k) = per_domain else {
        return solved.iter().take(cap).cloned().collect();
    };
    let mut domains: Vec<(&str, Vec<&(String, String)>)> = Vec::new();
    for entry in solved {
        match domains.iter_mut().find(|(d, _)| *d == entry.0) {
            Some((_, v)) => v.push(entry),
            None => domains.push((&entry.0, vec![entry])),
        }
    }
    let mut out = Vec::new();
    for round in 0..k {
        for (_, entries) in &domains {
            if let Some(e) = entries.get(round)
                && out.len() < cap
            {
                out.push((*e).clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::pick;

    fn set() -> Vec<(String, String)> {
        [("a", "a1"), ("b", "b1"), ("a", "a2"), ("c", "c1"), ("a", "a3"), ("c", "c2")]
            .iter()
            .map(|(d, id)| ((*d).to_string(), (*id).to_string()))
            .collect()
    }

    fn ids(v: Vec<(String, String)>) -> Vec<String> {
        v.into_iter().map(|(_, id)| id).collect()
    }

    #[test]
    fn without_per_domain_the_first_tasks_in_order() {
        assert_eq!(ids(pick(&set(), None, Some(4))), ["a1", "b1", "a2", "c1"]);
        assert_eq!(pick(&set(), None, None).len(), 6);
    }

    #[test]
    fn per_domain_takes_rounds_across_domains() {
        assert_eq!(ids(pick(&set(), Some(1), None)), ["a1", "b1", "c1"]);
        assert_eq!(ids(pick(&set(), Some(2), Some(4))), ["a1", "b1", "c1", "a2"]);
        assert_eq!(ids(pick(&set(), Some(5), None)), ["a1", "b1", "c1", "a2", "c2", "a3"]);
    }
}
