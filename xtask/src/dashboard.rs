//! `cargo xtask dashboard results/<exp>`: the live page of a finished or running run, from its
//! files (`arpo_dashboard`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use arpo_dashboard::run::RunDir;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The run's results directory (`results/<trainer.experiment_name>`).
    pub run: PathBuf,
    /// Where to serve the page. Loopback by default: the page shows everything the run saw;
    /// bind another interface only on purpose (e.g. `--addr 0.0.0.0:8265`).
    #[arg(long, default_value = arpo_dashboard::DEFAULT_ADDR)]
    pub addr: SocketAddr,
}

pub fn run(args: Args) -> Result<()> {
    RunDir::open(&args.run)?;
    if !args.addr.ip().is_loopback() {
        eprintln!(
            "warning: {} is reachable from other machines, and the page shows every screenshot the run kept",
            args.addr
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    println!(
        "dashboard of {}: http://{}/ (Ctrl-C to stop)",
        args.run.display(),
        args.addr
    );
    rt.block_on(arpo_dashboard::serve(args.run, args.addr))?;
    Ok(())
}
