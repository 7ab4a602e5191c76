//! One episode of one task with a transcript: what `cargo xtask test-env` runs (the seed's
//! `test_osworld_uitars.sh`), and the pre-flight checks around it (the guest answers, the VM
//! and its snapshot exist, the task is supported).
//!
//! The episode goes through the one engine, [`run_rollouts`], exactly as in training and
//! evaluation: same prompt, parsing, stepping, evaluation and failure handling. A
//! [`Transcript`] observer turns the engine's events into an [`Outcome`]; the caller's observer
//! sees every event too (the command prints them).

use std::path::Path;
use std::time::Duration;

use arpo_core::{Action, Environment, EpisodeEnd, Policy, SamplingParams, ScreenSize, Task};
use arpo_env_sim::Catalogue;
use arpo_env_vmware::task::RawStep;
use arpo_env_vmware::{GuestClient, GuestConfig, OsworldTask, Vmrun};
use serde::Serialize;
use serde_json::Value;

use crate::TrainerError;
use crate::rollout::{Coordinates, EnvStage, RolloutEvent, RolloutSettings, run_rollouts};

/// OSWorld's own "turn off 'Dim screen when inactive'" (one `execute` setup step, a
/// `vm_command_line` getter, `exact_match`): harmless, and it exercises setup, actions and an
/// evaluator on a real OSWorld VM. The task `cargo xtask test-env` runs when none is given.
pub const DEFAULT_TASK: &str =
    include_str!("../../../fixtures/osworld/examples/os/bedcedc4-4d72-425e-ad62-21960b11fe0d.json");
/// The domain of [`DEFAULT_TASK`].
pub const DEFAULT_TASK_DOMAIN: &str = "os";

/// The setup step type the simulated guest loads its tasks with (`POST /setup/sim`).
pub const SIM_STEP: &str = "sim";

/// What one checked episode runs with.
#[derive(Debug, Clone)]
pub struct EpisodeSettings {
    pub max_steps: usize,
    pub coordinates: Coordinates,
    pub sampling: SamplingParams,
    /// The screen size the environment must have.
    pub screen: Option<ScreenSize>,
    /// Attempts before the episode counts as broken (1 for a diagnostic: show the first failure).
    pub attempts: usize,
    /// What to check when the environment fails (added to the error).
    pub env_hint: String,
}

/// One turn as printed and saved.
#[derive(Debug, Clone, Serialize)]
pub struct TurnReport {
    pub step: usize,
    pub response: String,
    pub actions: Vec<Action>,
    pub parse_error: Option<String>,
    /// A rejected action (off screen, ...): the episode went on.
    pub rejected: Option<String>,
    pub inference_s: f64,
    pub execution_s: f64,
}

/// How an episode that ran to its evaluation went.
#[derive(Debug, Clone, Serialize)]
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

/// Collects the engine's events of one episode into an [`Outcome`].
#[derive(Debug, Default)]
pub struct Transcript {
    reset_s: f64,
    pending_inference_s: f64,
    turns: Vec<TurnReport>,
    done: Option<(EpisodeEnd, f64, f64)>,
    failure: Option<(EnvStage, String)>,
}

impl Transcript {
    /// Takes one event in.
    pub fn observe(&mut self, event: &RolloutEvent<'_>) {
        match *event {
            RolloutEvent::EpisodeStarted { seconds, .. } => {
                // A restarted episode starts its transcript over.
                *self = Self {
                    reset_s: seconds,
                    ..Self::default()
                };
            }
            RolloutEvent::Generated { seconds, .. } => self.pending_inference_s = seconds,
            RolloutEvent::TurnDone {
                turn,
                execution_seconds,
                ..
            } => self.turns.push(TurnReport {
                step: self.turns.len() + 1,
                response: turn.response.text.clone(),
                actions: turn.actions.clone(),
                parse_error: turn.format_error.clone(),
                rejected: turn.env_error.clone(),
                inference_s: std::mem::take(&mut self.pending_inference_s),
                execution_s: execution_seconds,
            }),
            RolloutEvent::EpisodeDone {
                trajectory,
                evaluate_seconds,
                ..
            } => self.done = Some((trajectory.end, trajectory.eval_result, evaluate_seconds)),
            RolloutEvent::EnvFailed { stage, error, .. } => {
                self.failure = Some((stage, error.to_owned()));
            }
            RolloutEvent::Generating { .. } | RolloutEvent::Stepped { .. } => {}
        }
    }
}

/// Runs one episode of `task` on `env` with `policy` through the rollout engine. `observer`
/// sees every event (to print a transcript). An `Err` is a broken chain: the environment failed
/// (reset, step or evaluation) on every attempt, or the model failed.
pub async fn run_episode<E: Environment>(
    env: &mut E,
    policy: &dyn Policy,
    task: &Task,
    settings: &EpisodeSettings,
    observer: &mut dyn FnMut(&RolloutEvent<'_>),
) -> Result<Outcome, TrainerError> {
    let engine = RolloutSettings {
        group_size: 1,
        max_steps: settings.max_steps.max(1),
        reset_retries: settings.attempts.max(1),
        sampling: settings.sampling.clone(),
        coordinates: settings.coordinates,
        expected_screen: settings.screen,
    };
    let mut transcript = Transcript::default();
    let seed = settings.sampling.seed.unwrap_or(0);
    let report = run_rollouts(
        policy,
        std::slice::from_mut(env),
        std::slice::from_ref(task),
        &engine,
        seed,
        &mut |event| {
            transcript.observe(&event);
            observer(&event);
        },
    )
    .await?;
    if let Some(dropped) = report.dropped.first() {
        return Err(TrainerError::EpisodeBroken {
            task_id: task.id.clone(),
            stage: dropped.stage,
            error: dropped.error.clone(),
            hint: settings.env_hint.clone(),
        });
    }
    let Some((end, score, evaluate_s)) = transcript.done else {
        let (stage, error) = transcript
            .failure
            .unwrap_or((EnvStage::Reset, "the episode did not run".into()));
        return Err(TrainerError::EpisodeBroken {
            task_id: task.id.clone(),
            stage,
            error,
            hint: settings.env_hint.clone(),
        });
    };
    Ok(Outcome {
        task_id: task.id.clone(),
        infeasible: task.config["evaluator"]["func"] == "infeasible",
        end,
        turns: transcript.turns,
        score,
        reset_s: transcript.reset_s,
        evaluate_s,
    })
}

/// Takes the task's `sim` setup steps out (the simulated guest's own step, `POST /setup/sim`,
/// which `arpo-env-vmware` does not run) and returns their parameters.
pub fn split_sim_steps(task: &mut OsworldTask) -> Vec<Value> {
    let (sim, rest): (Vec<RawStep>, Vec<RawStep>) =
        task.config.drain(..).partition(|s| s.kind == SIM_STEP);
    task.config = rest;
    sim.into_iter().map(|s| s.parameters).collect()
}

/// A pre-flight check that failed, with what to do.
#[derive(Debug, thiserror::Error)]
#[error("{problem}: {fix}")]
pub struct CheckFailed {
    pub problem: String,
    pub fix: String,
}

fn failed(problem: impl Into<String>, fix: impl Into<String>) -> CheckFailed {
    CheckFailed {
        problem: problem.into(),
        fix: fix.into(),
    }
}

fn http_client() -> Result<reqwest::Client, CheckFailed> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| {
            failed(
                format!("cannot build an HTTP client: {e}"),
                "check the TLS setup",
            )
        })
}

/// Loads a task into the simulated guest at `url` (`POST /setup/sim`).
pub async fn load_sim_task(url: &str, parameters: &Value) -> Result<(), CheckFailed> {
    let endpoint = format!("{}/setup/sim", url.trim_end_matches('/'));
    let response = http_client()?
        .post(&endpoint)
        .json(parameters)
        .send()
        .await
        .map_err(|e| {
            failed(
                format!("POST {endpoint}: {e}"),
                "is `cargo xtask sim-guest` running there?",
            )
        })?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if !status.is_success() {
        return Err(failed(
            format!("POST {endpoint} answered {status}: {body}"),
            "the task's `sim` setup step needs the simulated guest (`cargo xtask sim-guest`), not an OSWorld VM",
        ));
    }
    Ok(())
}

/// Whether the guest is the simulated one (it serves its task as a virtual file).
pub async fn is_sim_guest(guest: &GuestClient) -> bool {
    matches!(guest.file(arpo_env_sim::TASK_FILE).await, Ok(Some(_)))
}

/// The guest server at `url`, checked to answer a screenshot; returns it with its screen size.
pub async fn check_guest(url: &str) -> Result<(GuestClient, ScreenSize), CheckFailed> {
    let config = GuestConfig {
        request_timeout: Duration::from_secs(10),
        attempts: 2,
        backoff: Duration::from_millis(500),
        ..GuestConfig::default()
    };
    let guest = GuestClient::new(url, config).map_err(|e| {
        failed(
            format!("--url {url}: {e}"),
            "give a URL like http://127.0.0.1:5000",
        )
    })?;
    let shot = guest.screenshot().await.map_err(|e| {
        failed(
            format!("the guest server at {url} does not answer GET /screenshot ({e})"),
            "is `cargo xtask sim-guest` running there (mind --port), or is the VM's OSWorld server up (port 5000)?",
        )
    })?;
    let size = ScreenSize::new(shot.width, shot.height).map_err(|e| {
        failed(
            format!("the guest at {url} sent a screenshot of {e}"),
            "check the guest's display",
        )
    })?;
    Ok((guest, size))
}

/// Checks that vmrun works and the VM has the snapshot.
pub async fn check_vmware(vmrun: &Vmrun, vmx: &Path, snapshot: &str) -> Result<(), CheckFailed> {
    if !vmx.is_file() {
        return Err(failed(
            format!("--vmx {}: no such file", vmx.display()),
            "pass the VM's .vmx file (e.g. ~/vmware/Ubuntu/Ubuntu.vmx)",
        ));
    }
    let snapshots = vmrun.list_snapshots(vmx).await.map_err(|e| {
        failed(
            format!(
                "cannot list the snapshots of {} with {}: {e}",
                vmx.display(),
                vmrun.config().binary.display()
            ),
            "is VMware Workstation Pro / Fusion Pro installed and `vmrun` on the PATH (or --vmrun)?",
        )
    })?;
    if !snapshots.iter().any(|s| s == snapshot) {
        return Err(failed(
            format!(
                "is the VMware VM's snapshot {snapshot} present? {} has {}",
                vmx.display(),
                if snapshots.is_empty() {
                    "no snapshots".to_owned()
                } else {
                    format!("only {}", snapshots.join(", "))
                }
            ),
            format!(
                "with the VM at its clean state, create it with `vmrun -T {} snapshot {} {snapshot}` (or pass --snapshot)",
                vmrun.config().host_type.as_arg(),
                vmx.display()
            ),
        ));
    }
    Ok(())
}

/// The task to run, its domain, and where it came from.
#[derive(Debug)]
pub struct ChosenTask {
    pub task: OsworldTask,
    pub domain: Option<String>,
    pub source: String,
}

impl ChosenTask {
    /// A task file (`evaluation_examples/examples/<domain>/<id>.json`).
    pub fn from_file(path: &Path) -> Result<Self, CheckFailed> {
        let task = OsworldTask::load(path).map_err(|e| {
            failed(
                format!("loading the task file {}: {e}", path.display()),
                "pass an OSWorld task JSON",
            )
        })?;
        let domain = path
            .parent()
            .and_then(|p| p.file_name())
            .map(|d| d.to_string_lossy().into_owned());
        Ok(Self {
            task,
            domain,
            source: path.display().to_string(),
        })
    }

    /// A task of the simulated desktop's catalogue (its first training task when `id` is None),
    /// as OSWorld JSON with a `sim` setup step.
    pub fn sim(id: Option<&str>) -> Result<Self, CheckFailed> {
        let catalogue = Catalogue::default();
        let spec = match id {
            Some(id) => catalogue.spec(id).map_err(|e| {
                failed(
                    format!("no simulated task {id:?}: {e}"),
                    "list them with `cargo xtask sim-show --list`",
                )
            })?,
            None => catalogue
                .train_specs()
                .first()
                .ok_or_else(|| failed("the simulated catalogue has no tasks", "report this bug"))?,
        };
        let task: OsworldTask =
            serde_json::from_value(Catalogue::osworld_json(spec)).map_err(|e| {
                failed(
                    format!("the simulated task {} as OSWorld JSON: {e}", spec.id),
                    "report this bug",
                )
            })?;
        Ok(Self {
            task,
            domain: Some(spec.family.clone()),
            source: format!("simulated catalogue task {}", spec.id),
        })
    }

    /// OSWorld's os/bedcedc4 ([`DEFAULT_TASK`]).
    pub fn builtin() -> Result<Self, CheckFailed> {
        let task = OsworldTask::from_json(DEFAULT_TASK)
            .map_err(|e| failed(format!("the built-in task: {e}"), "report this bug"))?;
        Ok(Self {
            task,
            domain: Some(DEFAULT_TASK_DOMAIN.to_owned()),
            source: "built-in (OSWorld os/bedcedc4)".to_owned(),
        })
    }
}
