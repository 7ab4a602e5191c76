//! `cargo xtask test-env`: the seed's `test_osworld_uitars.sh`. Runs one task on an environment
//! (a VMware VM, or a guest server by URL: an OSWorld VM managed elsewhere, or
//! `cargo xtask sim-guest`) with a model (in process, or behind an OpenAI-compatible server),
//! printing each step's response, parsed actions and timings, then the evaluation and a verdict.
//! It exits non-zero when the chain is broken (environment or model unreachable, a failed reset,
//! step or evaluation); a model that does not solve the task is a `FAIL` verdict with exit 0.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use arpo_core::protocol::{CoordinateSystem, ParseConfig, PromptConfig, parse_response};
use arpo_core::{
    Action, AgentContext, Environment, EpisodeEnd, Policy, SamplingParams, Screenshot,
};
use arpo_env_sim::Catalogue;
use arpo_env_vmware::task::RawStep;
use arpo_env_vmware::{
    EnvConfig, GuestClient, GuestConfig, OsworldEnv, OsworldTask, Vmrun, VmrunConfig,
    VmwareProvider,
};
use serde_json::Value;

/// The task run when none is given: OSWorld's own "turn off 'Dim screen when inactive'"
/// (one `execute` setup step, a `vm_command_line` getter, `exact_match`): harmless, and it
/// exercises setup, actions and an evaluator on a real OSWorld VM.
const DEFAULT_TASK: &str =
    include_str!("../../fixtures/osworld/examples/os/bedcedc4-4d72-425e-ad62-21960b11fe0d.json");
const DEFAULT_TASK_DOMAIN: &str = "os";

/// The setup step type the simulated guest loads its tasks with (`POST /setup/sim`).
const SIM_STEP: &str = "sim";

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("environment").required(true).args(["vmx", "url"])))]
#[command(group(clap::ArgGroup::new("policy").required(true).args(["server", "model"])))]
pub struct Args {
    /// A VMware VM (.vmx): reverted to --snapshot, started if needed, its guest server found by
    /// its IP (VMware Workstation Pro / Fusion Pro, `vmrun` on the PATH or --vmrun).
    #[arg(long)]
    vmx: Option<PathBuf>,
    /// A running OSWorld guest server instead of a VM: `cargo xtask sim-guest`
    /// (http://127.0.0.1:5000), or a VM's server (http://<ip>:5000). Nothing is reverted.
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
    /// With --model: the weights' precision.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    /// With --model: cpu, cuda or cuda:N (cuda needs a build with candle's cuda feature).
    #[arg(long, default_value = "cpu")]
    device: String,
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
    #[arg(long, value_parser = parse_size)]
    screen: Option<(u32, u32)>,
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
    /// Write the screenshots here (`step_NN.png`: the screen model turn NN saw; the last one is
    /// the final screen) and the episode (`episode.json`: responses, actions, timings, score).
    #[arg(long)]
    save: Option<PathBuf>,
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("expected WIDTHxHEIGHT, got {s:?}"))?;
    let w: u32 = w
        .trim()
        .parse()
        .map_err(|e| format!("bad width {w:?}: {e}"))?;
    let h: u32 = h
        .trim()
        .parse()
        .map_err(|e| format!("bad height {h:?}: {e}"))?;
    if w == 0 || h == 0 {
        return Err(format!("the screen size must not be zero, got {s:?}"));
    }
    Ok((w, h))
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

/// The precision of a local model's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    fn candle(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::Bf16 => candle_core::DType::BF16,
            Self::F16 => candle_core::DType::F16,
        }
    }
}

/// What one test episode runs with.
#[derive(Debug, Clone)]
pub struct EpisodeSettings {
    pub max_steps: usize,
    pub coords: Coords,
    pub sampling: SamplingParams,
    /// Where to write step screenshots and `episode.json`.
    pub save: Option<PathBuf>,
    /// The screen size the guest must have.
    pub screen: Option<(u32, u32)>,
    /// What to check when the environment fails (added to reset, step and evaluation errors).
    pub env_hint: String,
}

/// One turn as printed and saved.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TurnReport {
    pub step: usize,
    pub response: String,
    pub actions: Vec<Action>,
    pub parse_error: Option<String>,
    /// Rejected actions (off screen, ...): the episode went on.
    pub rejected: Vec<String>,
    pub inference_s: f64,
    pub execution_s: f64,
}

/// How an episode that ran to its evaluation went.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub task_id: String,
    /// The task is infeasible (OSWorld's `infeasible` evaluator: solved by `call_user`).
    pub infeasible: bool,
    pub end: EpisodeEnd,
    pub turns: Vec<TurnReport>,
    /// The evaluation, in [0, 1].
    pub score: f64,
    pub reset_s: f64,
    pub evaluate_s: f64,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.score >= 1.0
    }

    /// The verdict line.
    pub fn verdict(&self, max_steps: usize) -> String {
        let steps = self.turns.len();
        if self.passed() {
            return format!(
                "PASS: task {} solved (score {:.2}) in {steps} steps",
                self.task_id, self.score
            );
        }
        let why = match self.end {
            EpisodeEnd::Finished if self.infeasible => format!(
                "the agent answered finished after {steps} steps, but the task is infeasible (call_user was expected)"
            ),
            EpisodeEnd::Finished => {
                format!("the agent answered finished after {steps} steps, but the task is not done")
            }
            EpisodeEnd::CallUser => format!(
                "the agent answered call_user (infeasible) after {steps} steps, but the task is feasible"
            ),
            EpisodeEnd::MaxSteps => format!("the agent used all {max_steps} steps (--max-steps)"),
            EpisodeEnd::FormatError => {
                let error = self
                    .turns
                    .last()
                    .and_then(|t| t.parse_error.clone())
                    .unwrap_or_default();
                format!(
                    "the response at step {steps} is not a valid UI-TARS action ({error}); a random or untrained model answers noise"
                )
            }
            EpisodeEnd::EnvError => "the environment failed".to_owned(),
        };
        format!(
            "FAIL: task {} not solved (score {:.2}): {why}",
            self.task_id, self.score
        )
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn parse_config(coords: Coords, screen: (u32, u32), shot: &Screenshot) -> Result<ParseConfig> {
    let system = match coords {
        Coords::Relative => CoordinateSystem::Relative1000,
        Coords::Absolute => CoordinateSystem::uitars_absolute(shot.width, shot.height)
            .map_err(|e| anyhow!("screenshot {}x{}: {e}", shot.width, shot.height))?,
    };
    Ok(ParseConfig::new(system, screen.0, screen.1))
}

fn save_screenshot(dir: &Path, step: usize, shot: &Screenshot) -> Result<()> {
    let ext = match shot.format() {
        Some(arpo_core::ImageFormat::Jpeg) => "jpg",
        _ => "png",
    };
    let path = dir.join(format!("step_{step:02}.{ext}"));
    std::fs::write(&path, &shot.bytes).with_context(|| format!("writing {}", path.display()))
}

/// Runs one episode of `task` on `env` with `policy`, printing every step, and evaluates it.
/// An `Err` is a broken chain (reset, model, step or evaluation failed), with what to check.
pub async fn run_episode<E: Environment + ?Sized>(
    env: &mut E,
    policy: &dyn Policy,
    task: &arpo_core::Task,
    settings: &EpisodeSettings,
) -> Result<Outcome> {
    if let Some(dir) = &settings.save {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    println!("Resetting the environment (setup of task {}) ...", task.id);
    let started = Instant::now();
    let first = env
        .reset(task)
        .await
        .with_context(|| format!("reset for task {} failed: {}", task.id, settings.env_hint))?;
    let reset_s = started.elapsed().as_secs_f64();
    let screen = env.screen_size();
    println!(
        "Reset in {reset_s:.2} s; screen {}x{}",
        first.screenshot.width, first.screenshot.height
    );
    if let Some((w, h)) = settings.screen {
        if (first.screenshot.width, first.screenshot.height) != (w, h) {
            bail!(
                "the guest's screen is {}x{}, not {w}x{h} (--screen): set the VM's display resolution (OSWorld's tasks expect 1920x1080), start `cargo xtask sim-guest --size {w}x{h}`, or drop --screen",
                first.screenshot.width,
                first.screenshot.height
            );
        }
    }
    // The screen each turn saw, and the current one.
    let mut seen: Vec<Screenshot> = Vec::new();
    let mut current = first.screenshot;
    let mut responses: Vec<String> = Vec::new();
    let mut turns = Vec::new();
    let mut end = EpisodeEnd::MaxSteps;
    let mut last_action: Option<Action> = None;
    for step in 1..=settings.max_steps.max(1) {
        if let Some(dir) = &settings.save {
            save_screenshot(dir, step, &current)?;
        }
        println!();
        println!("Step {step}/{}", settings.max_steps.max(1));
        let mut screenshots = seen.clone();
        screenshots.push(current.clone());
        let context = AgentContext {
            instruction: task.instruction.clone(),
            screenshots,
            responses: responses.clone(),
        };
        let started = Instant::now();
        let response = policy
            .act(std::slice::from_ref(&context), &settings.sampling)
            .await
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("the model ({}) failed at step {step}", policy.describe()))?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("the model ({}) returned no response", policy.describe()))?;
        let inference_s = started.elapsed().as_secs_f64();
        println!(
            "  inference: {inference_s:.2} s ({} tokens, finish {:?})",
            response.token_ids.len(),
            response.finish_reason
        );
        println!("  response:\n{}", indent(&response.text));
        let mut turn = TurnReport {
            step,
            response: response.text.clone(),
            actions: Vec::new(),
            parse_error: None,
            rejected: Vec::new(),
            inference_s,
            execution_s: 0.0,
        };
        responses.push(response.text.clone());
        let parse = parse_config(settings.coords, screen, &current)?;
        seen.push(current.clone());
        let actions = match parse_response(&response.text, &parse) {
            Ok(parsed) => parsed.actions,
            Err(e) => {
                println!("  parse error: {e}");
                turn.parse_error = Some(e.to_string());
                turns.push(turn);
                end = EpisodeEnd::FormatError;
                break;
            }
        };
        for action in &actions {
            println!("  action: {}", serde_json::to_string(action)?);
        }
        turn.actions = actions.clone();
        let started = Instant::now();
        let mut terminal = None;
        for action in actions {
            if action.is_terminal() {
                terminal = Some(match action {
                    Action::CallUser => EpisodeEnd::CallUser,
                    _ => EpisodeEnd::Finished,
                });
                last_action = Some(action);
                break;
            }
            match env.step(&action).await {
                Ok(s) => {
                    current = s.observation.screenshot;
                    last_action = Some(action);
                    if s.done {
                        terminal = Some(EpisodeEnd::MaxSteps);
                        break;
                    }
                }
                Err(e) if e.episode_can_continue() => {
                    println!("  rejected: {e}");
                    turn.rejected.push(e.to_string());
                    last_action = Some(action);
                }
                Err(e) => {
                    return Err(anyhow!("{e}")).with_context(|| {
                        format!(
                            "executing {} at step {step} failed: {}",
                            action.name(),
                            settings.env_hint
                        )
                    });
                }
            }
        }
        turn.execution_s = started.elapsed().as_secs_f64();
        println!("  execution: {:.2} s", turn.execution_s);
        turns.push(turn);
        if let Some(t) = terminal {
            end = t;
            break;
        }
    }

    if let Some(dir) = &settings.save {
        save_screenshot(dir, turns.len() + 1, &current)?;
    }
    println!();
    println!(
        "Episode ended: {end:?} after {} steps; evaluating ...",
        turns.len()
    );
    let started = Instant::now();
    let score = env
        .evaluate(last_action.as_ref())
        .await
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("the evaluation failed: {}", settings.env_hint))?;
    let evaluate_s = started.elapsed().as_secs_f64();
    println!("Evaluation: score {score:.2} in {evaluate_s:.2} s");
    let outcome = Outcome {
        task_id: task.id.clone(),
        infeasible: task.config["evaluator"]["func"] == "infeasible",
        end,
        turns,
        score: if score.is_finite() {
            score.clamp(0.0, 1.0)
        } else {
            0.0
        },
        reset_s,
        evaluate_s,
    };
    if let Some(dir) = &settings.save {
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

/// Takes the task's `sim` setup steps out (the simulated guest's own step, `POST /setup/sim`,
/// which `arpo-env-vmware` does not run) and returns their parameters.
pub fn split_sim_steps(task: &mut OsworldTask) -> Vec<Value> {
    let (sim, rest): (Vec<RawStep>, Vec<RawStep>) =
        task.config.drain(..).partition(|s| s.kind == SIM_STEP);
    task.config = rest;
    sim.into_iter().map(|s| s.parameters).collect()
}

/// Loads a task into the simulated guest at `url` (`POST /setup/sim`).
pub async fn load_sim_task(url: &str, parameters: &Value) -> Result<()> {
    let endpoint = format!("{}/setup/sim", url.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("cannot build an HTTP client")?;
    let response = client
        .post(&endpoint)
        .json(parameters)
        .send()
        .await
        .with_context(|| format!("POST {endpoint}: is `cargo xtask sim-guest` running there?"))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!(
            "POST {endpoint} answered {status}: {body}: the task's `sim` setup step needs the simulated guest (`cargo xtask sim-guest`), not an OSWorld VM"
        );
    }
    Ok(())
}

/// Whether the guest is the simulated one (it serves its task as a virtual file).
async fn is_sim_guest(guest: &GuestClient) -> bool {
    matches!(
        guest.file(arpo_env_sim::guest::TASK_FILE).await,
        Ok(Some(_))
    )
}

/// The task to run, its domain, and what the source was.
struct ChosenTask {
    task: OsworldTask,
    domain: Option<String>,
    source: String,
}

fn sim_catalogue_task(id: Option<&str>) -> Result<ChosenTask> {
    let catalogue = Catalogue::default();
    let spec = match id {
        Some(id) => catalogue.spec(id).with_context(|| {
            format!("no simulated task {id:?}: list them with `cargo xtask sim-show --list`")
        })?,
        None => catalogue
            .train_specs()
            .first()
            .ok_or_else(|| anyhow!("the simulated catalogue has no tasks"))?,
    };
    let json = Catalogue::osworld_json(spec);
    let task: OsworldTask = serde_json::from_value(json)
        .with_context(|| format!("the simulated task {} as OSWorld JSON", spec.id))?;
    Ok(ChosenTask {
        task,
        domain: Some(spec.family.clone()),
        source: format!("simulated catalogue task {}", spec.id),
    })
}

fn choose_task(args: &Args, sim_guest: bool) -> Result<ChosenTask> {
    if let Some(path) = &args.task {
        let task = OsworldTask::load(path)
            .with_context(|| format!("loading the task file {}", path.display()))?;
        let domain = path
            .parent()
            .and_then(|p| p.file_name())
            .map(|d| d.to_string_lossy().into_owned());
        return Ok(ChosenTask {
            task,
            domain,
            source: path.display().to_string(),
        });
    }
    if let Some(id) = &args.sim_task {
        return sim_catalogue_task(Some(id));
    }
    if sim_guest {
        return sim_catalogue_task(None);
    }
    let task = OsworldTask::from_json(DEFAULT_TASK).context("the built-in task")?;
    Ok(ChosenTask {
        task,
        domain: Some(DEFAULT_TASK_DOMAIN.to_owned()),
        source: "built-in (OSWorld os/bedcedc4)".to_owned(),
    })
}

fn parse_device(device: &str) -> Result<candle_core::Device> {
    match device {
        "cpu" => Ok(candle_core::Device::Cpu),
        other => {
            let ordinal = match other.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| {
                        anyhow!("unknown --device {other:?}: use cpu, cuda or cuda:N")
                    })?,
                None => bail!("unknown --device {other:?}: use cpu, cuda or cuda:N"),
            };
            candle_core::Device::new_cuda(ordinal).with_context(|| {
                format!("cannot open {other} (is this a build with the cuda feature?)")
            })
        }
    }
}

/// The server's first model, from `GET <base>/models`.
async fn first_server_model(base: &str, api_key: Option<&str>) -> Result<String> {
    let url = format!("{}/models", base.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("cannot build an HTTP client")?;
    let mut request = client.get(&url);
    if let Some(key) = api_key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.with_context(|| {
        format!(
            "cannot reach the model server at {base} (GET {url}): is it running? start one with `cargo xtask serve --model <dir>` (or vLLM), and pass its OpenAI base URL, e.g. http://localhost:9000/v1"
        )
    })?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!(
            "GET {url} answered {status}: {text}: is {base} the server's OpenAI base URL (ending in /v1)? or name the model with --server-model"
        );
    }
    let list: Value = serde_json::from_str(&text)
        .with_context(|| format!("GET {url} did not answer a JSON model list"))?;
    list.get("data")
        .and_then(Value::as_array)
        .and_then(|models| models.first())
        .and_then(|m| m.get("id"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("GET {url} lists no models: name one with --server-model"))
}

async fn make_policy(args: &Args, prompt: PromptConfig) -> Result<Box<dyn Policy>> {
    if let Some(base) = &args.server {
        let model = match &args.server_model {
            Some(m) => m.clone(),
            None => first_server_model(base, args.api_key.as_deref()).await?,
        };
        let mut config = arpo_serve::RemotePolicyConfig::new(base.clone(), model);
        config.api_key = args.api_key.clone();
        config.prompt = prompt;
        let policy = arpo_serve::RemotePolicy::new(config, None)
            .with_context(|| format!("--server {base}"))?;
        println!("Model:       {}", policy.describe());
        return Ok(Box::new(policy));
    }
    let Some(model) = &args.model else {
        bail!("pass --model <dir> or --server <url>");
    };
    let dtype = args.dtype.candle();
    let device = parse_device(&args.device)?;
    println!("Loading {model} ({:?}, {}) ...", dtype, args.device);
    let started = Instant::now();
    let loaded = arpo_model::UiTars::load(model, dtype, &device).with_context(|| {
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

/// Checks that the guest server at `url` answers a screenshot, with what to check when not.
async fn check_guest(url: &str) -> Result<GuestClient> {
    let config = GuestConfig {
        request_timeout: Duration::from_secs(10),
        attempts: 2,
        backoff: Duration::from_millis(500),
        ..GuestConfig::default()
    };
    let guest = GuestClient::new(url, config)
        .with_context(|| format!("--url {url} (e.g. http://127.0.0.1:5000)"))?;
    let shot = guest.screenshot().await.with_context(|| {
        format!(
            "the guest server at {url} does not answer GET /screenshot: is `cargo xtask sim-guest` running there (mind --port), or is the VM's OSWorld server up (port 5000)?"
        )
    })?;
    println!(
        "Guest:       {url} answers (screen {}x{})",
        shot.width, shot.height
    );
    Ok(guest)
}

/// Checks that vmrun works and the VM has the snapshot.
async fn check_vmware(vmrun: &Vmrun, vmx: &Path, snapshot: &str) -> Result<()> {
    if !vmx.is_file() {
        bail!(
            "--vmx {}: no such file: pass the VM's .vmx file (e.g. ~/vmware/Ubuntu/Ubuntu.vmx)",
            vmx.display()
        );
    }
    let snapshots = vmrun.list_snapshots(vmx).await.with_context(|| {
        format!(
            "cannot list the snapshots of {} with {}: is VMware Workstation Pro / Fusion Pro installed and `vmrun` on the PATH (or --vmrun)?",
            vmx.display(),
            vmrun.config().binary.display()
        )
    })?;
    if !snapshots.iter().any(|s| s == snapshot) {
        bail!(
            "is the VMware VM's snapshot {snapshot} present? {} has {}: with the VM at its clean state, create it with `vmrun -T {} snapshot {} {snapshot}` (or pass --snapshot)",
            vmx.display(),
            if snapshots.is_empty() {
                "no snapshots".to_owned()
            } else {
                format!("only {}", snapshots.join(", "))
            },
            vmrun.config().host_type.as_arg(),
            vmx.display()
        );
    }
    println!(
        "VMware:      {} (snapshot {snapshot}, vmrun {})",
        vmx.display(),
        vmrun.config().binary.display()
    );
    Ok(())
}

async fn run_async(args: Args) -> Result<()> {
    let prompt = PromptConfig {
        limit_images: args.limit_images,
        ..PromptConfig::default()
    };
    let mut settings = EpisodeSettings {
        max_steps: args.max_steps,
        coords: args.coords,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: -1,
            max_tokens: args.max_tokens,
            seed: args.seed,
        },
        save: args.save.clone(),
        screen: args.screen,
        env_hint: String::new(),
    };
    if args.max_steps == 0 {
        bail!("--max-steps must be at least 1");
    }
    let mut config = EnvConfig {
        cache_dir: args.cache_dir.clone(),
        settle: seconds("settle", args.settle)?,
        step_pause: seconds("step-pause", args.step_pause)?,
        // One try: a diagnostic shows the first failure instead of retrying past it.
        reset_attempts: 1,
        ..EnvConfig::default()
    };
    if let Some(s) = args.ready_timeout {
        config.ready_timeout = seconds("ready-timeout", s)?;
    } else if args.url.is_some() {
        config.ready_timeout = Duration::from_secs(30);
    }
    let ready_timeout = config.ready_timeout;

    // Pre-flight: the environment, then the task, then the model.
    let (mut env, sim_guest, hint) = match (&args.url, &args.vmx) {
        (Some(url), _) => {
            let guest = check_guest(url).await?;
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
    } = choose_task(&args, sim_guest)?;
    let sim_steps = split_sim_steps(&mut task);
    if !sim_steps.is_empty() && args.url.is_none() {
        bail!(
            "task {} is a simulated-desktop task (`sim` setup step): run it against `cargo xtask sim-guest` with --url",
            task.id
        );
    }
    if !sim_steps.is_empty() && !sim_guest {
        bail!(
            "task {} is a simulated-desktop task (`sim` setup step), but the guest at {} is not `cargo xtask sim-guest`",
            task.id,
            args.url.as_deref().unwrap_or_default()
        );
    }
    println!("Task:        {} ({source})", task.id);
    println!("Instruction: {}", task.instruction);
    let missing = task.unsupported();
    if !missing.is_empty() {
        bail!(
            "task {} needs what arpo-env-vmware does not support yet: {} (see `cargo xtask osworld-coverage`)",
            task.id,
            missing.join(", ")
        );
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
    let result = run_episode(&mut env, policy.as_ref(), &core_task, &settings).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use arpo_core::protocol::{PointSyntax, format_response};
    use arpo_core::{PolicyError, Response};
    use arpo_env_sim::guest::{GuestState, serve};
    use std::sync::Mutex;

    /// A policy that answers scripted texts in order (then `finished()`).
    #[derive(Debug)]
    struct Scripted(Mutex<Vec<String>>);

    #[async_trait::async_trait]
    impl Policy for Scripted {
        async fn act(
            &self,
            contexts: &[AgentContext],
            _: &SamplingParams,
        ) -> Result<Vec<Response>, PolicyError> {
            let mut queue = self
                .0
                .lock()
                .map_err(|e| PolicyError::Generation(e.to_string()))?;
            Ok(contexts
                .iter()
                .map(|_| Response {
                    text: if queue.is_empty() {
                        "Action: finished()".into()
                    } else {
                        queue.remove(0)
                    },
                    ..Response::default()
                })
                .collect())
        }

        fn describe(&self) -> String {
            "scripted".into()
        }
    }

    /// The simulated guest on a loopback port; returns its URL.
    async fn sim_guest(size: (u32, u32)) -> Result<String> {
        let state = GuestState::new(size.0, size.1)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(serve(listener, state));
        Ok(format!("http://{addr}"))
    }

    fn settings() -> EpisodeSettings {
        EpisodeSettings {
            max_steps: 10,
            coords: Coords::Relative,
            sampling: SamplingParams::greedy(64),
            save: None,
            screen: None,
            env_hint: "is the test guest up?".into(),
        }
    }

    fn env_config(cache: &Path) -> EnvConfig {
        EnvConfig {
            cache_dir: cache.to_path_buf(),
            step_pause: Duration::ZERO,
            wait_pause: Duration::ZERO,
            reset_attempts: 1,
            ready_timeout: Duration::from_secs(10),
            ready_poll: Duration::from_millis(20),
            ..EnvConfig::default()
        }
    }

    /// The sim task `id` ready for the env: its `sim` step run, the rest as an `arpo_core::Task`.
    async fn prepared(url: &str, id: &str) -> Result<(arpo_core::Task, arpo_core::Task)> {
        let mut chosen = sim_catalogue_task(Some(id))?;
        let steps = split_sim_steps(&mut chosen.task);
        assert_eq!(steps.len(), 1);
        assert!(
            chosen.task.unsupported().is_empty(),
            "{:?}",
            chosen.task.unsupported()
        );
        for p in &steps {
            load_sim_task(url, p).await?;
        }
        let sim_task = Catalogue::default().task(id)?;
        Ok((chosen.task.to_task(chosen.domain.as_deref()), sim_task))
    }

    /// Every family's first task, solved by its oracle written as UI-TARS text, passes through
    /// the whole chain: response parsing, `OsworldEnv` over HTTP, the simulated guest, the
    /// evaluator (`check_list` on the score file, or `infeasible`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oracle_answers_pass_through_the_guest_protocol() -> Result<()> {
        let size = arpo_env_sim::DEFAULT_SIZE;
        let url = sim_guest(size).await?;
        let guest = check_guest(&url).await?;
        assert!(is_sim_guest(&guest).await);
        let catalogue = Catalogue::default();
        let mut ids: Vec<String> = Vec::new();
        for family in Catalogue::families() {
            if let Some(s) = catalogue.train_specs().iter().find(|s| s.family == family) {
                ids.push(s.id.clone());
            }
        }
        assert!(ids.len() > 1);
        let cache = tempfile::tempdir()?;
        let mut env = OsworldEnv::remote(&url, env_config(cache.path()));
        let mut failed = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let (task, sim_task) = prepared(&url, id).await?;
            let oracle = arpo_env_sim::oracle_at(&sim_task, size.0, size.1)?;
            let texts = oracle
                .iter()
                .map(|a| {
                    format_response(
                        "oracle",
                        std::slice::from_ref(a),
                        &CoordinateSystem::Relative1000,
                        size,
                        PointSyntax::Plain,
                    )
                })
                .collect();
            let save = cache.path().join(format!("episode{i}"));
            let settings = EpisodeSettings {
                max_steps: oracle.len() + 2,
                save: Some(save.clone()),
                ..settings()
            };
            let outcome =
                run_episode(&mut env, &Scripted(Mutex::new(texts)), &task, &settings).await?;
            if !outcome.passed() {
                failed.push(outcome.verdict(settings.max_steps));
            }
            assert_eq!(outcome.turns.len(), oracle.len(), "{id}");
            assert!(save.join("step_01.png").is_file());
            assert!(save.join("episode.json").is_file());
        }
        assert!(failed.is_empty(), "{failed:#?}");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn noise_is_a_fail_verdict_not_a_broken_chain() -> Result<()> {
        let url = sim_guest(arpo_env_sim::DEFAULT_SIZE).await?;
        let id = Catalogue::default().train_specs()[0].id.clone();
        let (task, _) = prepared(&url, &id).await?;
        let cache = tempfile::tempdir()?;
        let mut env = OsworldEnv::remote(&url, env_config(cache.path()));
        let policy = Scripted(Mutex::new(vec!["ghjk lorem (((".into()]));
        let outcome = run_episode(&mut env, &policy, &task, &settings()).await?;
        assert_eq!(outcome.end, EpisodeEnd::FormatError);
        assert!(!outcome.passed());
        let verdict = outcome.verdict(10);
        assert!(verdict.starts_with("FAIL: task"), "{verdict}");
        assert!(verdict.contains("not a valid UI-TARS action"), "{verdict}");

        // --screen is checked against the guest's screen.
        let wrong = EpisodeSettings {
            screen: Some((1920, 1080)),
            ..settings()
        };
        let err = run_episode(&mut env, &policy, &task, &wrong)
            .await
            .expect_err("wrong screen size");
        assert!(format!("{err:#}").contains("--screen"), "{err:#}");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unreachable_guest_says_what_to_check() -> Result<()> {
        // A port that was free a moment ago: nothing listens there.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        drop(listener);
        let err = check_guest(&url).await.expect_err("nothing listens");
        assert!(
            format!("{err:#}").contains("cargo xtask sim-guest"),
            "{err:#}"
        );
        Ok(())
    }

    /// `fixtures/fake-vmrun/vmrun` (a python stand-in for VMware's vmrun) with its state in `dir`,
    /// its VMs' IP the loopback.
    #[cfg(unix)]
    fn fake_vmrun(dir: &Path) -> Result<Vmrun> {
        use std::os::unix::fs::PermissionsExt;
        let fake = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/fake-vmrun/vmrun");
        std::fs::write(dir.join("state.json"), r#"{"ip": "127.0.0.1"}"#)?;
        let wrapper = dir.join("vmrun");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nFAKE_VMRUN_DIR='{}' exec python3 '{}' \"$@\"\n",
                dir.display(),
                fake.display()
            ),
        )?;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
        Ok(Vmrun::new(VmrunConfig {
            binary: wrapper,
            host_type: arpo_env_vmware::HostType::Workstation,
            headless: true,
            timeout: Duration::from_secs(20),
            ip_timeout: Duration::from_secs(20),
        }))
    }

    #[cfg(unix)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vmware_path_with_a_fake_vmrun() -> Result<()> {
        let url = sim_guest(arpo_env_sim::DEFAULT_SIZE).await?;
        let port: u16 = url.rsplit(':').next().unwrap_or_default().parse()?;
        let dir = tempfile::tempdir()?;
        let vmrun = fake_vmrun(dir.path())?;
        let vmx = dir.path().join("Ubuntu.vmx");
        std::fs::write(&vmx, "")?;

        let err = check_vmware(&vmrun, &dir.path().join("missing.vmx"), "init_state")
            .await
            .expect_err("no vmx");
        assert!(format!("{err:#}").contains("no such file"), "{err:#}");
        let err = check_vmware(&vmrun, &vmx, "clean")
            .await
            .expect_err("no such snapshot");
        assert!(
            format!("{err:#}").contains("snapshot clean present"),
            "{err:#}"
        );
        check_vmware(&vmrun, &vmx, "init_state").await?;

        let mut provider = VmwareProvider::new(vmrun, vmx);
        provider.guest_port = port;
        let mut env = OsworldEnv::new(Box::new(provider), env_config(dir.path()));
        let task = OsworldTask::from_json(DEFAULT_TASK)?.to_task(Some(DEFAULT_TASK_DOMAIN));
        let policy = Scripted(Mutex::new(vec![
            "Thought: look\nAction: click(start_box='(500,500)')".into(),
        ]));
        let outcome = run_episode(&mut env, &policy, &task, &settings()).await?;
        assert_eq!(outcome.end, EpisodeEnd::Finished);
        assert_eq!(outcome.turns.len(), 2);
        assert_eq!(outcome.turns[0].actions.len(), 1);
        assert!(!outcome.passed(), "the simulated guest has no gsettings");
        Ok(())
    }

    #[test]
    fn tasks_are_chosen_and_split() -> Result<()> {
        let mut sim = sim_catalogue_task(None)?;
        assert_eq!(split_sim_steps(&mut sim.task).len(), 1);
        assert!(sim.task.config.is_empty());
        let builtin = OsworldTask::from_json(DEFAULT_TASK)?;
        assert!(
            builtin.unsupported().is_empty(),
            "{:?}",
            builtin.unsupported()
        );
        assert!(sim_catalogue_task(Some("no-such-task")).is_err());
        assert!(parse_size("1920x1080").is_ok());
        assert!(parse_size("0x10").is_err());
        assert!(parse_size("big").is_err());
        Ok(())
    }
}
