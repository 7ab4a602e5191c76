//! `cargo xtask compare`: evaluation reports side by side (e.g. base vs GRPO vs ARPO).

use std::path::PathBuf;

use anyhow::{Context, Result};
use arpo_trainer::eval::{EvalReport, compare_table, pool_by_label, runs_cell};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Reports written by `cargo xtask eval --out`; reports with the same label (one per
    /// training seed) are pooled into one row that also lists each run's rate.
    #[arg(required = true)]
    pub reports: Vec<PathBuf>,
    /// Print the table as Markdown (for the README).
    #[arg(long)]
    pub markdown: bool,
}

pub fn run(args: Args) -> Result<()> {
    let reports = args
        .reports
        .iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str::<EvalReport>(&text).with_context(|| {
                format!("{} is not a report of `cargo xtask eval --out`", p.display())
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if args.markdown {
        println!("| run | success (pooled) | 95% CI | episodes | per run (%) |");
        println!("|---|---:|---:|---:|---|");
        for g in pool_by_label(&reports) {
            let r = &g.pooled;
            println!(
                "| {} | {:.1}% | {:.1}%..{:.1}% | {} | {} |",
                r.label,
                100.0 * r.success_rate,
                100.0 * r.ci95.0,
                100.0 * r.ci95.1,
                r.episodes,
                runs_cell(&g)
            );
        }
    } else {
        print!("{}", compare_table(&reports));
    }
    Ok(())
}
