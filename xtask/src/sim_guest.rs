//! `cargo xtask sim-guest`: the OSWorld guest HTTP protocol over the simulated desktop, so an
//! OSWorld client (ours in `arpo-env-vmware`, or OSWorld's own) can run with no VM.

use anyhow::{Context as _, Result};
use arpo_core::ScreenSize;
use arpo_env_sim::Catalogue;
use arpo_env_sim::guest::{GuestState, serve};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Port to listen on (OSWorld's guest uses 5000).
    #[arg(long, default_value_t = 5000)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Screen size, WIDTHxHEIGHT (OSWorld's VMs are 1920x1080).
    #[arg(long, default_value = "1920x1080")]
    size: ScreenSize,
    /// A task to load at start (otherwise an empty desktop until `POST /setup/sim`).
    #[arg(long)]
    task: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    let (w, h) = args.size.pair();
    let state = GuestState::new(w, h)?;
    if let Some(id) = &args.task {
        state.load(Catalogue::default().spec(id)?.clone())?;
    }
    let addr = format!("{}:{}", args.host, args.port);
    let rt = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}: is another guest running there?"))?;
        println!(
            "simulated OSWorld guest on http://{addr} ({w}x{h}); load a task with POST /setup/sim {{\"task_id\": \"...\"}}"
        );
        tokio::select! {
            r = serve(listener, state) => r.context("the guest server failed"),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}
