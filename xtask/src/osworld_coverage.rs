//! `cargo xtask osworld-coverage`: how each task of an OSWorld task set runs (natively, through
//! OSWorld's own evaluator, or not at all and why). The computation is
//! `arpo_env_vmware::coverage`; this parses the arguments and prints.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use arpo_env_vmware::coverage::{coverage, render};
use arpo_env_vmware::{EvaluatorBackend, OsworldNames};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// OSWorld's `evaluation_examples` folder (holding `examples/<domain>/<id>.json`), or a folder
    /// of `<domain>/<id>.json` files.
    #[arg(long)]
    tasks: PathBuf,
    /// An index file (`{"domain": ["task id", ...]}`, e.g. test_all.json) to count only its tasks;
    /// a relative path not found as given is looked up in --tasks. Default: every task file.
    #[arg(long)]
    index: Option<PathBuf>,
    /// Which evaluators to count on: auto (native, else OSWorld's own, desktop-env 1.0.2),
    /// native (native only) or osworld (same as auto here).
    #[arg(long, default_value = "auto")]
    evaluator: String,
    /// Print the report as JSON (every task with how it runs and why not) instead of text.
    #[arg(long)]
    json: bool,
    /// With text output, list every task with how it runs.
    #[arg(long)]
    verbose: bool,
}

pub fn run(args: Args) -> Result<()> {
    let backend: EvaluatorBackend = args
        .evaluator
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--evaluator {e}"))?;
    let names = OsworldNames::bundled();
    let osworld = (backend != EvaluatorBackend::Native).then_some(&names);
    let report = coverage(&args.tasks, args.index.as_deref(), osworld)
        .with_context(|| format!("measuring the tasks under {}", args.tasks.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report, args.verbose));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn arguments_parse_and_a_bad_evaluator_is_refused() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/osworld");
        let cli = Cli::parse_from(["x", "--tasks", fixtures.to_str().unwrap_or("."), "--json"]);
        assert!(cli.args.json && cli.args.evaluator == "auto");
        assert!(run(cli.args).is_ok());
        let cli = Cli::parse_from(["x", "--tasks", ".", "--evaluator", "python"]);
        let err = run(cli.args).expect_err("unknown evaluator");
        assert!(err.to_string().contains("auto"), "{err}");
    }
}
