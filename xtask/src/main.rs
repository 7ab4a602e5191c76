//! `cargo xtask <command>`: the ARPO-rs command line.
//!
//! Each command lives in its own module with its own `Args`; `main` only dispatches.

use anyhow::Result;
use clap::{Parser, Subcommand};

arpo_alloc::global_allocator!();

mod bench_episode;
mod bench_gemm;
mod bench_model;
mod bench_serve;
mod bench_train;
mod compare;
mod dashboard;
mod eval;
mod osworld_coverage;
mod parse_response;
mod predict;
mod select_tasks;
mod serve;
mod sft;
mod sim_guest;
mod sim_show;
mod sweep;
mod test_env;
mod test_server;
mod train;

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "ARPO-rs: train UI-TARS GUI agents with ARPO",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run ARPO training (default: the embedded desktop and the tiny base model).
    Train(train::Args),
    /// Evaluate a model on a task split; prints success rate and writes a JSON report.
    Eval(eval::Args),
    /// Print evaluation reports side by side.
    Compare(compare::Args),
    /// ARPO vs GRPO over seeds: train each, evaluate each checkpoint, one report (resumable).
    Sweep(sweep::Args),
    /// Serve the live page of a run's curves and episodes (`results/<exp>`).
    Dashboard(dashboard::Args),
    /// ARPO task selection: keep the tasks the base model solves at least once.
    SelectTasks(select_tasks::Args),
    /// Supervised fine-tuning on oracle demonstrations of the embedded desktop.
    Sft(sft::Args),
    /// Serve a UI-TARS model over the OpenAI-compatible API.
    Serve(serve::Args),
    /// Check a running model server end to end with a real screenshot.
    TestServer(test_server::Args),
    /// Run one task on an environment (VMware VM, remote guest) with a model.
    TestEnv(test_env::Args),
    /// Parse one UI-TARS response from stdin into actions (JSON).
    ParseResponse(parse_response::Args),
    /// Run the model once on a screenshot and an instruction.
    Predict(predict::Args),
    /// Benchmark the model (prefill, decode, training step); prints JSON.
    BenchModel(bench_model::Args),
    /// Benchmark the packed bf16 product against candle's f32 matmul at the 2B shapes.
    BenchGemm(bench_gemm::Args),
    /// Benchmark a whole multi-turn episode (history resent each step, prefix cache on/off); prints JSON.
    BenchEpisode(bench_episode::Args),
    /// Benchmark the HTTP server's throughput (concurrent clients, with and without dynamic batching).
    BenchServe(bench_serve::Args),
    /// Serve the OSWorld guest HTTP protocol over the simulated desktop.
    SimGuest(sim_guest::Args),
    /// Write a simulated task's screenshots (and its oracle solution's) as PNG files.
    SimShow(sim_show::Args),
    /// Count how many tasks of an OSWorld task set are fully supported.
    OsworldCoverage(osworld_coverage::Args),
}

/// Fixes the thread count candle and our kernels use for the rest of the process: sets
/// `RAYON_NUM_THREADS` to candle's own choice when neither it nor `CANDLE_NUM_THREADS` is
/// set. The count is the same; what changes is that candle stops working it out again on every
/// matmul (`get_num_threads` reads `/proc/cpuinfo` when the variable is unset). Called while
/// the process has one thread: before any runtime or pool starts.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none()
        && std::env::var_os("CANDLE_NUM_THREADS").is_none()
    {
        let threads = candle_core::utils::get_num_threads().max(1);
        // SAFETY: called from `main` (or a command's first lines) before any other thread
        // exists: no runtime, no logger, no candle or rayon pool yet.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("RAYON_NUM_THREADS", threads.to_string())
        };
    }
}

/// After [`arpo_alloc::tune`]: a process running a model past the small-model bound
/// (`SAMPLE_PARALLEL_MAX_PARAMETERS`, by the parameters its `config.json` describes) returns
/// memory it has not reused for a second to the kernel; a small model keeps it (faster).
fn tune_allocator_for(model_dir: &std::path::Path) {
    use arpo_trainer::model::{SAMPLE_PARALLEL_MAX_PARAMETERS, estimated_parameters};
    if estimated_parameters(model_dir).is_some_and(|p| p > SAMPLE_PARALLEL_MAX_PARAMETERS) {
        arpo_alloc::release_idle_memory();
    }
}

fn main() -> Result<()> {
    arpo_alloc::tune();
    // Fault points named in `FAILPOINTS` (the crash tests stop a real run at them); none is
    // active unless that variable names it.
    let _fail_points = fail::FailScenario::setup();
    let cli = Cli::parse();
    // `train` and `sft` first choose one thread per op for small models (they pin after);
    // `sweep` only starts those commands as processes, which choose for themselves.
    if !matches!(
        cli.command,
        Command::Train(_) | Command::Sft(_) | Command::Sweep(_)
    ) {
        pin_thread_count();
    }
    match cli.command {
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Sweep(a) => sweep::run(a),
        Command::Dashboard(a) => dashboard::run(a),
        Command::SelectTasks(a) => select_tasks::run(a),
        Command::Sft(a) => sft::run(a),
        Command::Serve(a) => serve::run(a),
        Command::TestServer(a) => test_server::run(a),
        Command::TestEnv(a) => test_env::run(a),
        Command::ParseResponse(a) => parse_response::run(a),
        Command::Predict(a) => predict::run(a),
        Command::BenchModel(a) => bench_model::run(a),
        Command::BenchGemm(a) => bench_gemm::run(a),
        Command::BenchEpisode(a) => bench_episode::run(a),
        Command::BenchServe(a) => bench_serve::run(a),
        Command::SimGuest(a) => sim_guest::run(a),
        Command::SimShow(a) => sim_show::run(a),
        Command::OsworldCoverage(a) => osworld_coverage::run(a),
    }
}
