//! `cargo xtask test-env`: the seed's `test_osworld_uitars.sh`. Runs one task on an environment
//! (a VMware VM, or a guest server by URL: an OSWorld VM managed elsewhere, or
//! `cargo xtask sim-guest`) with a model (in process, or behind an OpenAI-compatible server),
//! printing each step's response, parsed actions and timings, then the evaluation and a verdict.
//! It exits non-zero when the chain is broken (environment or model unreachable, a failed reset,
//! step or evaluation); a model that does not solve the task is a `FAIL` verdict with exit 0.
//!
//! The episode runs through the trainer's own engine (`arpo_trainer::env_check`); this file
//! parses the arguments and prints.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use arpo_core::protocol::PromptConfig;
use arpo_core::{Environment, Policy, SamplingParams, ScreenSize, Screenshot};
use arpo_env_vmware::coverage::{Runs, classify};
use arpo_env_vmware::{
    EnvConfig, EvaluatorBackend, OsworldEnv, OsworldNames, Vmrun, VmrunConfig, VmwareProvider,
};
use arpo_model::{DTypeSpec, DeviceSpec};
use arpo_trainer::env_check::{
    self, ChosenTask, EpisodeSettings, Outcome, check_guest, check_vmware, is_sim_guest,
    load_sim_task, split_sim_steps,
};
use arpo_trainer::rollout::{Coordinates, RolloutEvent};

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("environment").required(true).args(["vmx", "url"])))]
#[command(group(clap::ArgGroup::new("policy").required(true).args(["server", "model"])))]
pub struct Args {
    /// A VMware VM (.vmx): reverted to --snapshot, started if needed, its guest server found by
    /// its IP (VMware Workstation Pro / Fusion Pro, `vmrun` on the PATH or --vmrun).
    #[arg(long)]
    vmx: Option<PathBuf>,
    /// A running OSWorld guest server instead of a VM: `cargo xtask sim-guest`
    /// (http://127.0.0.1:5000), or a VM's server (`http://<ip>:5000`). Nothing is reverted.
    #[arg(long)]
    url: Option<String>,
    /// The snapshot reverted to before the task (with --vmx).
    #[arg(long, default_value = "init_state")]
    snapshot: String,
    /// The vmrun binary (default: $VMRUN, vmrun on the PATH, then VMware's install location).
    #[arg(long)]
    vmrun: Option<PathBuf>,
    /// With --vmx: the port of the guest server in the VM (OSWorld's is 5000).
    #[arg(long, default_value_t = 5000)]
    guest_port: u16,
    /// An OpenAI-compatible server's base URL (`cargo xtask serve`, vLLM, SGLang), e.g.
    /// http://localhost:9000/v1.
    #[arg(long)]
    server: Option<String>,
    /// The model name to ask the server for (default: the first one it lists).
    #[arg(long, requires = "server")]
    server_model: Option<String>,
    /// Sent to --server as `Authorization: Bearer <key>`.
    #[arg(
        long,
        env = "OPENAI_API_KEY",
        requires = "server",
        hide_env_values = true
    )]
    api_key: Option<String>,
    /// Run the model in process: a model directory (HF layout) or a Hugging Face repo id already
    /// in the local cache.
    #[arg(long)]
    model: Option<String>,
    /// With --model: the weights' precision (f32, bf16, f16).
    #[arg(long, default_value = "f32")]
    dtype: DTypeSpec,
    /// With --model: cpu, cuda, cuda:N or metal (the latter need a build with that feature).
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// An OSWorld task JSON file (`evaluation_examples/examples/<domain>/<id>.json`, or a sim
    /// task exported by `cargo xtask sim-show --export-osworld`). Default: OSWorld's os task
    /// bedcedc4 ("Dim screen when inactive" off), or on a simulated guest its first training task.
    #[arg(long, conflicts_with = "sim_task")]
    task: Option<PathBuf>,
    /// A task of the simulated desktop's catalogue by id (needs --url of `cargo xtask sim-guest`;
    /// list them with `cargo xtask sim-show --list`).
    #[arg(long, conflicts_with = "vmx")]
    sim_task: Option<String>,
    /// Most model turns before the episode stops.
    #[arg(long, default_value_t = 15)]
    max_steps: usize,
    /// The screen size the guest must have, WIDTHxHEIGHT (OSWorld's tasks expect 1920x1080);
    /// checked against the first screenshot. Default: whatever the guest has.
    #[arg(long)]
    screen: Option<ScreenSize>,
    /// How the model writes coordinates: relative (0..1000, UI-TARS-2B/7B) or absolute
    /// (smart-resized pixels, UI-TARS-1.5).
    #[arg(long, value_enum, default_value_t = Coords::Relative)]
    coords: Coords,
    /// Screenshots per prompt, the current one included.
    #[arg(long, default_value_t = 5)]
    limit_images: usize,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long)]
    seed: Option<u64>,
    /// Seconds to wait after the task's setup before the first screenshot (OSWorld's scripts
    /// wait 60 s for apps to open).
    #[arg(long, default_value_t = 0.0)]
    settle: f64,
    /// Seconds the guest server may take to answer after the reset (default: 300 with --vmx, for
    /// the VM to boot; 30 with --url).
    #[arg(long)]
    ready_timeout: Option<f64>,
    /// Seconds to wait after each action before the screenshot (OSWorld's `pause`).
    #[arg(long, default_value_t = 0.5)]
    step_pause: f64,
    /// The host cache (downloads, the task's files fetched by evaluators).
    #[arg(long, default_value = "cache")]
    cache_dir: PathBuf,
    /// How the task is scored: auto (our native evaluator when it covers the task, else
    /// OSWorld's own through a Python worker), native, or osworld.
    #[arg(long, default_value = "auto")]
    evaluator: EvaluatorBackend,
    /// The Python that has OSWorld's `desktop-env` (for the worker).
    #[arg(long, default_value = "python3")]
    python: String,
    /// Write the screenshots here (`step_NN.png`: the screen model turn NN saw; the last one is
    /// the final screen) and the episode (`episode.json`: responses, actions, timings, score).
    #[arg(long)]
    save: Option<PathBuf>,
}

fn seconds(what: &str, s: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(s)
        .map_err(|e| anyhow!("--{what} {s} is not a number of seconds: {e}"))
}

/// How the model writes coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Coords {
    /// 0..1000 across the screen (UI-TARS-2B/7B, Qwen2-VL).
    Relative,
    /// Pixels of the smart-resized screenshot (UI-TARS-1.5, Qwen2.5-VL).
    Absolute,
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn save_screenshot(dir: &Path, step: usize, shot: &Screenshot) -> Result<()> {
    let ext = match shot.format() {
        Some(arpo_core::ImageFormat::Jpeg) => "jpg",
        _ => "png",
    };
    let path = dir.join(format!("step_{step:02}.{ext}"));
    std::fs::write(&path, &shot.bytes).with_context(|| format!("writing {}", path.display()))
}

/// Prints the engine's events as a transcript and keeps the screens for `--save`.
struct Printer {
    save: Option<PathBuf>,
    max_steps: usize,
    turn: usize,
    inference_s: f64,
    tokens: usize,
    error: Option<anyhow::Error>,
}

impl Printer {
    fn event(&mut self, event: &RolloutEvent<'_>) {
        if let Err(e) = self.print(event) {
            self.error.get_or_insert(e);
        }
    }

    fn print(&mut self, event: &RolloutEvent<'_>) -> Result<()> {
        match *event {
            RolloutEvent::EpisodeStarted {
                observation,
                seconds,
                ..
            } => {
                self.turn = 0;
                let shot = &observation.screenshot;
                println!(
                    "Reset in {seconds:.2} s; screen {}x{}",
                    shot.width, shot.height
                );
            }
            RolloutEvent::Generating { .. } => {
                self.turn += 1;
                println!();
                println!("Step {}/{}", self.turn, self.max_steps);
            }
            RolloutEvent::Generated { seconds, .. } => self.inference_s = seconds,
            RolloutEvent::TurnDone {
                turn,
                observation,
                execution_seconds,
                ..
            } => {
                if let Some(dir) = &self.save {
                    save_screenshot(dir, self.turn, &turn.screenshot)?;
                    // The screen after this turn; the next turn overwrites it with the same.
                    save_screenshot(dir, self.turn + 1, &observation.screenshot)?;
                }
                self.tokens = turn.response.token_ids.len();
                println!(
                    "  inference: {:.2} s ({} tokens, finish {:?})",
                    self.inference_s, self.tokens, turn.response.finish_reason
                );
                println!("  response:\n{}", indent(&turn.response.text));
                if let Some(e) = &turn.format_error {
                    println!("  parse error: {e}");
                }
                for action in &turn.actions {
                    println!("  action: {}", serde_json::to_string(action)?);
                }
                if let Some(e) = &turn.env_error {
                    println!("  rejected: {e}");
                }
                println!("  execution: {execution_seconds:.2} s");
            }
            RolloutEvent::EnvFailed {
                stage,
                error,
                retrying,
                ..
            } => {
                println!("  environment failed at {stage}: {error}");
                if retrying {
                    println!("  restarting the episode from reset ...");
                }
            }
            RolloutEvent::EpisodeDone {
                trajectory,
                evaluate_seconds,
                ..
            } => {
                println!();
                println!(
                    "Episode ended: {:?} after {} steps; evaluation: score {:.2} in {evaluate_seconds:.2} s",
                    trajectory.end,
                    trajectory.turns.len(),
                    trajectory.eval_result
                );
            }
            RolloutEvent::Stepped { .. } => {}
        }
        Ok(())
    }
}

/// Runs one episode with a printed transcript; writes `episode.json` with `--save`.
pub async fn run_episode<E: Environment>(
    env: &mut E,
    policy: &dyn Policy,
    task: &arpo_core::Task,
    settings: &EpisodeSettings,
    save: Option<&Path>,
) -> Result<Outcome> {
    if let Some(dir) = save {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    println!("Resetting the environment (setup of task {}) ...", task.id);
    let mut printer = Printer {
        save: save.map(Path::to_path_buf),
        max_steps: settings.max_steps,
        turn: 0,
        inference_s: 0.0,
        tokens: 0,
        error: None,
    };
    let outcome =
        env_check::run_episode(env, policy, task, settings, &mut |e| printer.event(e)).await?;
    if let Some(e) = printer.error {
        return Err(e);
    }
    if let Some(dir) = save {
        let path = dir.join("episode.json");
        std::fs::write(&path, serde_json::to_string_pretty(&outcome)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!(
            "Saved the screenshots and episode.json in {}",
            dir.display()
        );
    }
    Ok(outcome)
}

async fn make_policy(args: &Args, prompt: PromptConfig) -> Result<Box<dyn Policy>> {
    if let Some(base) = &args.server {
        // An unnamed model is the first one the server lists (GET /v1/models).
        let model = args.server_model.clone().unwrap_or_default();
        let mut config = arpo_serve::RemotePolicyConfig::new(base.clone(), model);
        config.api_key = args.api_key.clone();
        config.prompt = prompt;
        let policy = arpo_serve::RemotePolicy::new(config, None)
            .with_context(|| format!("--server {base}"))?;
        let model = policy.preflight().await.with_context(|| {
            format!(
                "the model server at {base}: is it running? start one with `cargo xtask serve --model <dir>` (or vLLM), and pass its OpenAI base URL, e.g. http://localhost:9000/v1"
            )
        })?;
        println!("Model:       {} ({model})", policy.describe());
        return Ok(Box::new(policy));
    }
    let Some(model) = &args.model else {
        bail!("pass --model <dir> or --server <url>");
    };
    let device = args.device.open()?;
    println!("Loading {model} ({}, {}) ...", args.dtype, args.device);
    let started = Instant::now();
    let loaded = arpo_model::UiTars::load(model, args.dtype.dtype(), &device).with_context(|| {
        format!(
            "cannot load the model {model}: pass a model directory (config.json, model.safetensors, tokenizer.json), or download the repo first (`huggingface-cli download <repo>`)"
        )
    })?;
    let policy = arpo_model::LocalPolicy::new(loaded, prompt);
    println!(
        "Model:       {} (loaded in {:.2} s)",
        policy.describe(),
        started.elapsed().as_secs_f64()
    );
    Ok(Box::new(policy))
}

async fn run_async(args: Args) -> Result<()> {
    if args.max_steps == 0 {
        bail!("--max-steps must be at least 1");
    }
    let prompt = PromptConfig {
        limit_images: args.limit_images,
        ..PromptConfig::default()
    };
    let mut settings = EpisodeSettings {
        max_steps: args.max_steps,
        coordinates: match args.coords {
            Coords::Relative => Coordinates::Relative,
            Coords::Absolute => {
                let p = arpo_model::PreprocessorConfig::default();
                Coordinates::Absolute {
                    min_pixels: p.min_pixels,
                    max_pixels: p.max_pixels,
                }
            }
        },
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: -1,
            max_tokens: args.max_tokens,
            seed: args.seed,
        },
        screen: args.screen,
        // One try: a diagnostic shows the first failure instead of retrying past it.
        attempts: 1,
        env_hint: String::new(),
    };
    // A task file under evaluation_examples/examples/<domain>/: uploads may read under
    // evaluation_examples, and the worker resolves OSWorld's relative paths from there.
    let examples_dir = args
        .task
        .as_ref()
        .and_then(|p| p.parent()?.parent()?.parent())
        .map(Path::to_path_buf);
    let mut config = EnvConfig {
        cache_dir: args.cache_dir.clone(),
        examples_dir: examples_dir.clone(),
        settle: seconds("settle", args.settle)?,
        step_pause: seconds("step-pause", args.step_pause)?,
        reset_attempts: 1,
        ..EnvConfig::default()
    };
    config.osworld.evaluator = args.evaluator;
    config.osworld.python = args.python.clone();
    if let Some(s) = args.ready_timeout {
        config.ready_timeout = seconds("ready-timeout", s)?;
    } else if args.url.is_some() {
        config.ready_timeout = Duration::from_secs(30);
    }
    let ready_timeout = config.ready_timeout;

    // Pre-flight: the environment, then the task, then the model.
    let (mut env, sim_guest, hint) = match (&args.url, &args.vmx) {
        (Some(url), _) => {
            let (guest, size) = check_guest(url).await?;
            println!("Guest:       {url} answers (screen {size})");
            let sim = is_sim_guest(&guest).await;
            if sim {
                println!("             (the simulated desktop of `cargo xtask sim-guest`)");
            }
            (
                OsworldEnv::remote(url, config),
                sim,
                format!("is the guest server at {url} still up?"),
            )
        }
        (None, Some(vmx)) => {
            let mut vmrun_config = VmrunConfig::default();
            if let Some(binary) = &args.vmrun {
                vmrun_config.binary = binary.clone();
            }
            let vmrun = Vmrun::new(vmrun_config);
            check_vmware(&vmrun, vmx, &args.snapshot).await?;
            println!(
                "VMware:      {} (snapshot {}, vmrun {})",
                vmx.display(),
                args.snapshot,
                vmrun.config().binary.display()
            );
            let mut provider = VmwareProvider::new(vmrun, vmx.clone());
            provider.snapshot = args.snapshot.clone();
            provider.guest_port = args.guest_port;
            (
                OsworldEnv::new(Box::new(provider), config),
                false,
                format!(
                    "does the VM's snapshot {} boot to OSWorld's guest server (port {}) with VMware Tools running? open the VM in VMware to see",
                    args.snapshot, args.guest_port
                ),
            )
        }
        (None, None) => bail!("pass --vmx <file.vmx> or --url <guest server URL>"),
    };

    let ChosenTask {
        mut task,
        domain,
        source,
    } = match (&args.task, &args.sim_task) {
        (Some(path), _) => ChosenTask::from_file(path)?,
        (None, Some(id)) => ChosenTask::sim(Some(id))?,
        (None, None) if sim_guest => ChosenTask::sim(None)?,
        (None, None) => ChosenTask::builtin()?,
    };
    let sim_steps = split_sim_steps(&mut task);
    if !sim_steps.is_empty() && !sim_guest {
        bail!(
            "task {} is a simulated-desktop task (`sim` setup step): run it against `cargo xtask sim-guest` with --url",
            task.id
        );
    }
    println!("Task:        {} ({source})", task.id);
    println!("Instruction: {}", task.instruction);
    let names = (args.evaluator != EvaluatorBackend::Native).then(OsworldNames::bundled);
    let tasks_dir = examples_dir.map(|d| d.join("examples")).unwrap_or_default();
    let (runs, _, reasons) = classify(&task, &tasks_dir, names.as_ref());
    match runs {
        Runs::Native => println!("Evaluator:   native"),
        Runs::Osworld => {
            env.check_evaluator().await.with_context(|| {
                format!(
                    "task {} needs OSWorld's own evaluator (--evaluator {})",
                    task.id, args.evaluator
                )
            })?;
            println!(
                "Evaluator:   OSWorld's desktop_env, through the worker ({})",
                args.python
            );
        }
        Runs::NotRunnable => bail!(
            "task {} cannot be scored with --evaluator {}: {} (see `cargo xtask osworld-coverage`)",
            task.id,
            args.evaluator,
            reasons.join("; ")
        ),
    }

    let policy = make_policy(&args, prompt).await?;

    if let Some(url) = &args.url {
        for parameters in &sim_steps {
            load_sim_task(url, parameters).await?;
        }
    }
    settings.env_hint = hint;
    if args.vmx.is_some() {
        println!(
            "Reverting to {}, starting the VM, waiting up to {} s for its guest server ...",
            args.snapshot,
            ready_timeout.as_secs_f64()
        );
    }
    let core_task = task.to_task(domain.as_deref());
    let result = run_episode(
        &mut env,
        policy.as_ref(),
        &core_task,
        &settings,
        args.save.as_deref(),
    )
    .await;
    if let Err(e) = env.close().await {
        eprintln!("warning: closing the environment: {e}");
    }
    let outcome = result?;
    println!();
    println!("{}", outcome.verdict(settings.max_steps));
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
    match runtime.block_on(run_async(args)) {
        Ok(()) => Ok(()),
        Err(e) => {
            // The verdict line, with every cause, on stdout like the rest of the transcript.
            println!();
            println!("FAIL: the chain is broken: {e}");
            for cause in e.chain().skip(1) {
                println!("  because: {cause}");
            }
            bail!("test-env: the chain is broken (see the FAIL line above)")
        }
    }
}
