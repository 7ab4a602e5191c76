//! `cargo xtask compare`: evaluation reports side by side (e.g. base vs GRPO vs ARPO), with the
//! training run as the unit when several reports share a label (`arpo_trainer::compare`).

use std::path::PathBuf;

use anyhow::Result;
use arpo_trainer::compare::{compare, load_reports};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Reports written by `cargo xtask eval --out`. Reports with the same label (one per
    /// training seed) form one row: mean, sd and 95% t-interval across runs, a Welch t-test
    /// against the other labels, and the pooled rate of all their episodes.
    #[arg(required = true)]
    pub reports: Vec<PathBuf>,
    /// Print the table as Markdown (for the README).
    #[arg(long)]
    pub markdown: bool,
}

pub fn run(args: Args) -> Result<()> {
    let comparison = compare(&load_reports(&args.reports)?);
    if args.markdown {
        print!("{}", comparison.markdown());
    } else {
        print!("{}", comparison.table());
    }
    Ok(())
}
