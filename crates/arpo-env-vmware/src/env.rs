//! The `Environment` implementation: OSWorld's `DesktopEnv` over a VMware VM or a remote guest.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arpo_core::{Action, EnvError, Environment, Observation, Step, Task};
use async_trait::async_trait;

use crate::VmwareError;
use crate::evaluate::{Evaluator, GetterContext};
use crate::guest::{GuestClient, GuestConfig};
use crate::pyautogui::{GuestCommand, guest_command};
use crate::raw::RawStep;
use crate::setup::{SetupContext, SetupStep, check_uploads, run_steps, safe_file_name};
use crate::task::OsworldTask;
use crate::vmrun::Vmrun;
use crate::worker::{GuestSpec, OsworldNames, OsworldWorker, WorkerConfig};

/// Where the guest runs: something that can bring it to a clean state and tell its server URL.
#[async_trait]
pub trait Provider: Send + Sync + std::fmt::Debug {
    /// Brings the guest to its clean state (revert, start, wait for an IP) and returns the
    /// guest server's base URL.
    async fn prepare(&mut self) -> Result<String, VmwareError>;
    /// Freezes the guest between steps (an idle guest locks its screen during long inference).
    async fn pause(&mut self) -> Result<(), VmwareError> {
        Ok(())
    }
    async fn unpause(&mut self) -> Result<(), VmwareError> {
        Ok(())
    }
    async fn close(&mut self) -> Result<(), VmwareError> {
        Ok(())
    }
    fn describe(&self) -> String;
}

/// A VMware VM: `revertToSnapshot`, `start` (when not running), `getGuestIPAddress -wait`.
#[derive(Debug, Clone)]
pub struct VmwareProvider {
    pub vmrun: Vmrun,
    pub vmx: PathBuf,
    /// The snapshot reverted to at each reset (OSWorld: `init_state`).
    pub snapshot: String,
    /// Stop the VM on close.
    pub stop_on_close: bool,
    /// The guest server's port (OSWorld: 5000).
    pub guest_port: u16,
}

impl VmwareProvider {
    pub fn new(vmrun: Vmrun, vmx: PathBuf) -> Self {
        Self {
            vmrun,
            vmx,
            snapshot: "init_state".to_owned(),
            stop_on_close: false,
            guest_port: 5000,
        }
    }
}

#[async_trait]
impl Provider for VmwareProvider {
    async fn prepare(&mut self) -> Result<String, VmwareError> {
        self.vmrun
            .revert_to_snapshot(&self.vmx, &self.snapshot)
            .await?;
        self.vmrun.ensure_running(&self.vmx).await?;
        let ip = self.vmrun.guest_ip(&self.vmx).await?;
        let port = self.guest_port;
        Ok(match ip {
            std::net::IpAddr::V4(v4) => format!("http://{v4}:{port}"),
            std::net::IpAddr::V6(v6) => format!("http://[{v6}]:{port}"),
        })
    }

    async fn pause(&mut self) -> Result<(), VmwareError> {
        self.vmrun.pause(&self.vmx).await
    }

    async fn unpause(&mut self) -> Result<(), VmwareError> {
        self.vmrun.unpause(&self.vmx).await
    }

    async fn close(&mut self) -> Result<(), VmwareError> {
        if self.stop_on_close {
            self.vmrun.stop(&self.vmx, false).await?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("vmware {}", self.vmx.display())
    }
}

/// A guest server already running somewhere (a VM managed elsewhere, the simulated guest):
/// no vmrun, no revert; `reset` only runs the task's setup.
#[derive(Debug, Clone)]
pub struct RemoteProvider {
    pub url: String,
}

#[async_trait]
impl Provider for RemoteProvider {
    async fn prepare(&mut self) -> Result<String, VmwareError> {
        Ok(self.url.clone())
    }

    fn describe(&self) -> String {
        format!("remote {}", self.url)
    }
}

/// Settings of an [`OsworldEnv`].
#[derive(Debug, Clone, PartialEq)]
pub struct EnvConfig {
    pub guest: GuestConfig,
    /// Host cache: `<cache>/downloads/` (by URL, shared) and `<cache>/tasks/<task id>/`.
    pub cache_dir: PathBuf,
    /// The guest user's password (`{CLIENT_PASSWORD}`).
    pub client_password: String,
    /// Sleep after each executed action before the screenshot (OSWorld's `pause`).
    pub step_pause: Duration,
    /// How long `wait` sleeps.
    pub wait_pause: Duration,
    /// Tries of a whole reset (revert, start, IP, readiness, setup).
    pub reset_attempts: u32,
    /// How long the guest server may take to answer after the VM started.
    pub ready_timeout: Duration,
    pub ready_poll: Duration,
    /// Sleep after setup, before the first screenshot (OSWorld's run scripts sleep 60 s).
    pub settle: Duration,
    /// Pause the VM between steps (while the model thinks).
    pub pause_between_steps: bool,
    pub download_timeout: Duration,
    /// The largest file a `download` step or `cloud_file` getter may fetch (default 2 GiB).
    pub max_download_bytes: u64,
    /// OSWorld's `evaluation_examples` folder: `upload_file` may read under it (and under this
    /// env's cache folder), nowhere else.
    pub examples_dir: Option<PathBuf>,
    /// Which evaluator scores tasks, and how OSWorld's own one runs.
    pub osworld: OsworldEvaluatorConfig,
}

/// Which evaluator scores a task (`env.osworld.evaluator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvaluatorBackend {
    /// Native when every setup step, getter and metric of the task is native, else OSWorld's.
    #[default]
    Auto,
    /// Only the native evaluators: a task that needs more is refused.
    Native,
    /// OSWorld's evaluator for every task (setup steps we have natively still run natively).
    Osworld,
}

impl std::str::FromStr for EvaluatorBackend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "native" => Ok(Self::Native),
            "osworld" => Ok(Self::Osworld),
            other => Err(format!(
                "evaluator {other:?}: use auto (native when possible, else OSWorld's), native or osworld"
            )),
        }
    }
}

impl std::fmt::Display for EvaluatorBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Osworld => "osworld",
        })
    }
}

/// OSWorld's own evaluator (`env.osworld.*`).
#[derive(Debug, Clone, PartialEq)]
pub struct OsworldEvaluatorConfig {
    /// `env.osworld.evaluator`: auto | native | osworld.
    pub evaluator: EvaluatorBackend,
    /// `env.osworld.python`: the interpreter that has `desktop-env` (default `python3`).
    pub python: String,
    /// Folders put first on the worker's `PYTHONPATH`.
    pub pythonpath: Vec<PathBuf>,
    /// The longest one evaluation or setup step through the worker may take.
    pub timeout: Duration,
    /// The guest's Chrome remote debugging port (OSWorld: 9222).
    pub chromium_port: u16,
    /// The guest's VLC HTTP port (OSWorld: 8080).
    pub vlc_port: u16,
    /// The worker's working folder (see [`WorkerConfig::workdir`]); `None`: the folder holding
    /// `evaluation_examples` when `examples_dir` is set, else ours.
    pub workdir: Option<PathBuf>,
}

impl Default for OsworldEvaluatorConfig {
    fn default() -> Self {
        let worker = WorkerConfig::default();
        Self {
            evaluator: EvaluatorBackend::Auto,
            python: worker.python,
            pythonpath: worker.pythonpath,
            timeout: worker.timeout,
            chromium_port: 9222,
            vlc_port: 8080,
            workdir: None,
        }
    }
}

impl OsworldEvaluatorConfig {
    pub fn worker(&self) -> WorkerConfig {
        WorkerConfig {
            python: self.python.clone(),
            pythonpath: self.pythonpath.clone(),
            timeout: self.timeout,
            workdir: self.workdir.clone(),
            ..WorkerConfig::default()
        }
    }
}

/// A setup step and who runs it.
#[derive(Debug, Clone, PartialEq)]
enum PlannedStep {
    Native(SetupStep),
    /// Through OSWorld's `SetupController` in the worker.
    Worker(RawStep),
}

/// Who scores the episode.
#[derive(Debug, Clone, PartialEq)]
enum Scoring {
    Native(Evaluator),
    /// OSWorld's `DesktopEnv.evaluate` in the worker, on the task's raw `evaluator`.
    Worker(serde_json::Value),
}

impl Default for EnvConfig {
    fn default() -> Self {
        Self {
            guest: GuestConfig::default(),
            cache_dir: PathBuf::from("cache"),
            client_password: "password".to_owned(),
            step_pause: Duration::from_millis(500),
            wait_pause: Duration::from_secs(2),
            reset_attempts: 5,
            ready_timeout: Duration::from_secs(300),
            ready_poll: Duration::from_secs(1),
            settle: Duration::ZERO,
            pause_between_steps: false,
            download_timeout: Duration::from_secs(600),
            max_download_bytes: 2 << 30,
            examples_dir: None,
            osworld: OsworldEvaluatorConfig::default(),
        }
    }
}

#[derive(Debug)]
struct Episode {
    task: OsworldTask,
    scoring: Scoring,
    guest: GuestClient,
    spec: GuestSpec,
    setup: SetupContext,
    screen: (u32, u32),
    paused: bool,
}

/// OSWorld's `DesktopEnv` as an [`Environment`].
#[derive(Debug)]
pub struct OsworldEnv {
    provider: Box<dyn Provider>,
    config: EnvConfig,
    worker: Arc<OsworldWorker>,
    episode: Option<Episode>,
    screen: (u32, u32),
}

impl OsworldEnv {
    pub fn new(provider: Box<dyn Provider>, config: EnvConfig) -> Self {
        let mut worker_config = config.osworld.worker();
        if worker_config.workdir.is_none() {
            // OSWorld's paths are relative to the folder that holds `evaluation_examples`.
            worker_config.workdir = config.examples_dir.as_deref().and_then(|e| {
                e.ancestors()
                    .find(|a| a.file_name().is_some_and(|n| n == "evaluation_examples"))
                    .and_then(|a| a.parent())
                    .map(|p| p.to_path_buf())
            });
        }
        let worker = OsworldWorker::new(worker_config, &config.cache_dir.join("worker"));
        Self {
            provider,
            config,
            worker: Arc::new(worker),
            episode: None,
            screen: (1920, 1080),
        }
    }

    /// An environment on a VMware VM.
    pub fn vmware(vmrun: Vmrun, vmx: PathBuf, config: EnvConfig) -> Self {
        Self::new(Box::new(VmwareProvider::new(vmrun, vmx)), config)
    }

    /// An environment on a guest server already running at `url`.
    pub fn remote(url: &str, config: EnvConfig) -> Self {
        Self::new(
            Box::new(RemoteProvider {
                url: url.trim_end_matches('/').to_owned(),
            }),
            config,
        )
    }

    pub fn describe(&self) -> String {
        self.provider.describe()
    }

    /// This environment's OSWorld evaluator worker.
    pub fn worker(&self) -> &OsworldWorker {
        &self.worker
    }

    /// Pre-flight: with `evaluator: auto | osworld`, starts the worker and checks it imports
    /// `desktop_env` (the error carries the install command); `None` with `native`.
    pub async fn check_evaluator(&self) -> Result<Option<OsworldNames>, VmwareError> {
        match self.config.osworld.evaluator {
            EvaluatorBackend::Native => Ok(None),
            _ => self.worker.hello().await.map(Some),
        }
    }

    /// Who runs each setup step and who scores, by `env.osworld.evaluator`; what cannot run
    /// (natively, or in OSWorld's evaluator either) is refused here, before the guest is touched.
    async fn plan(&self, task: &OsworldTask) -> Result<(Vec<PlannedStep>, Scoring), VmwareError> {
        let unsupported = |missing: Vec<String>| VmwareError::Unsupported {
            task_id: task.id.clone(),
            missing,
        };
        if let Some(problem) = task.evaluator_problem() {
            return Err(problem);
        }
        let native_steps = task.setup_steps();
        let native_eval = task.parsed_evaluator();
        let backend = self.config.osworld.evaluator;
        if backend == EvaluatorBackend::Native
            || (backend == EvaluatorBackend::Auto && native_steps.is_ok() && native_eval.is_ok())
        {
            task.check_supported()?;
            let steps = native_steps.map_err(unsupported)?;
            let evaluator = native_eval.map_err(unsupported)?;
            check_uploads(&task.id, &steps)?;
            check_uploads(&task.id, &evaluator.postconfig)?;
            return Ok((
                steps.into_iter().map(PlannedStep::Native).collect(),
                Scoring::Native(evaluator),
            ));
        }
        let names = self.worker.hello().await?;
        let mut missing = Vec::new();
        let mut planned = Vec::new();
        for raw in &task.config {
            match SetupStep::parse(raw) {
                Ok(step) => planned.push(PlannedStep::Native(step)),
                Err(_) if names.has_setup_step(&raw.kind) => {
                    planned.push(PlannedStep::Worker(raw.clone()))
                }
                Err(m) => missing.push(format!("{m} (OSWorld's SetupController has none either)")),
            }
        }
        let needs = crate::evaluate::EvaluatorNames::of(&task.evaluator);
        for m in needs.metrics.iter().filter(|m| !names.has_metric(m)) {
            missing.push(format!(
                "metric {m} (not in desktop_env {})",
                names.desktop_env
            ));
        }
        for g in needs.getters.iter().filter(|g| !names.has_getter(g)) {
            missing.push(format!(
                "getter {g} (not in desktop_env {})",
                names.desktop_env
            ));
        }
        for s in needs.postconfig.iter().filter(|s| !names.has_setup_step(s)) {
            missing.push(format!(
                "setup step {s} (not in desktop_env {})",
                names.desktop_env
            ));
        }
        if !missing.is_empty() {
            return Err(unsupported(missing));
        }
        let natives: Vec<SetupStep> = planned
            .iter()
            .filter_map(|p| match p {
                PlannedStep::Native(s) => Some(s.clone()),
                PlannedStep::Worker(_) => None,
            })
            .collect();
        check_uploads(&task.id, &natives)?;
        Ok((planned, Scoring::Worker(task.evaluator.clone())))
    }

    async fn try_reset(
        &mut self,
        task: &OsworldTask,
        steps: &[PlannedStep],
        scoring: &Scoring,
    ) -> Result<Observation, VmwareError> {
        let url = self.provider.prepare().await?;
        let guest = GuestClient::new(&url, self.config.guest.clone())?;
        let first = guest
            .wait_ready(self.config.ready_timeout, self.config.ready_poll)
            .await?;
        let screen = (first.width, first.height);
        let setup = SetupContext {
            task_cache: self
                .config
                .cache_dir
                .join("tasks")
                .join(safe_file_name(&task.id)),
            download_cache: self.config.cache_dir.join("downloads"),
            client_password: self.config.client_password.clone(),
            screen,
            download_timeout: self.config.download_timeout,
            max_download_bytes: self.config.max_download_bytes,
            upload_roots: self
                .config
                .examples_dir
                .iter()
                .cloned()
                .chain([self.config.cache_dir.clone()])
                .collect(),
        };
        // A clean task cache: getters of an earlier episode must not be read as this one's.
        if setup.task_cache.exists() {
            std::fs::remove_dir_all(&setup.task_cache)
                .map_err(|e| VmwareError::io("clear", &setup.task_cache, e))?;
        }
        std::fs::create_dir_all(&setup.task_cache)
            .map_err(|e| VmwareError::io("create folder", &setup.task_cache, e))?;
        let (vm_ip, server_port) =
            GuestSpec::host_port(&url).ok_or_else(|| VmwareError::GuestProtocol {
                url: url.clone(),
                operation: "reset".into(),
                reason: "the guest URL has no host and port".into(),
            })?;
        let spec = GuestSpec {
            vm_ip,
            server_port,
            chromium_port: self.config.osworld.chromium_port,
            vlc_port: self.config.osworld.vlc_port,
            cache_dir: std::path::absolute(&setup.task_cache)
                .map_err(|e| VmwareError::io("resolve", &setup.task_cache, e))?,
            client_password: self.config.client_password.clone(),
            screen_width: screen.0,
            screen_height: screen.1,
        };
        for step in steps {
            match step {
                PlannedStep::Native(s) => {
                    run_steps(std::slice::from_ref(s), &guest, &setup).await?
                }
                PlannedStep::Worker(raw) => {
                    tracing::info!(step = %raw.kind, "setup through OSWorld's SetupController");
                    self.worker.setup_step(&spec, raw).await?;
                }
            }
        }
        if !self.config.settle.is_zero() {
            tokio::time::sleep(self.config.settle).await;
        }
        let shot = guest.screenshot().await?;
        self.screen = (shot.width, shot.height);
        let mut episode = Episode {
            task: task.clone(),
            scoring: scoring.clone(),
            guest,
            spec,
            setup,
            screen: self.screen,
            paused: false,
        };
        if self.config.pause_between_steps {
            self.provider.pause().await?;
            episode.paused = true;
        }
        self.episode = Some(episode);
        Ok(Observation::from_screenshot(shot))
    }

    async fn resume(&mut self) -> Result<(), VmwareError> {
        if let Some(ep) = self.episode.as_mut().filter(|e| e.paused) {
            self.provider.unpause().await?;
            ep.paused = false;
        }
        Ok(())
    }

    /// Ends the episode after an environment failure; the env stays usable for the next reset.
    fn fail(&mut self, operation: &str, err: VmwareError) -> EnvError {
        tracing::warn!(operation, error = %err, "episode ended by an environment failure");
        self.episode = None;
        err.into_env_error(operation)
    }
}

#[async_trait]
impl Environment for OsworldEnv {
    async fn reset(&mut self, task: &Task) -> Result<Observation, EnvError> {
        self.episode = None;
        let parsed = OsworldTask::from_task(task).map_err(|e| e.into_env_error("reset"))?;
        let (steps, scoring) = self.plan(&parsed).await.map_err(|e| match e {
            // Without OSWorld's evaluator this task cannot run here, as an unsupported one.
            VmwareError::WorkerUnavailable { .. } => EnvError::Unsupported {
                task_id: parsed.id.clone(),
                reason: format!("needs OSWorld's evaluator (not native): {e}"),
            },
            other => other.into_env_error("reset"),
        })?;
        let attempts = self.config.reset_attempts.max(1);
        let mut last = None;
        for attempt in 1..=attempts {
            match self.try_reset(&parsed, &steps, &scoring).await {
                Ok(obs) => return Ok(obs),
                Err(e) => {
                    tracing::warn!(task = %parsed.id, attempt, error = %e, "reset failed");
                    last = Some(e);
                }
            }
        }
        let err = last.map_or(EnvError::NotReset, |e| e.into_env_error("reset"));
        Err(err)
    }

    async fn step(&mut self, action: &Action) -> Result<Step, EnvError> {
        let screen = match &self.episode {
            Some(ep) => ep.screen,
            None => return Err(EnvError::NotReset),
        };
        for p in action.points() {
            if !p.x.is_finite() || !p.y.is_finite() || !p.is_inside(screen.0, screen.1) {
                return Err(EnvError::InvalidAction {
                    action: action.name().to_owned(),
                    reason: format!(
                        "point ({}, {}) is outside the {}x{} screen",
                        p.x, p.y, screen.0, screen.1
                    ),
                });
            }
        }
        if let Err(e) = self.resume().await {
            return Err(self.fail("step (unpause)", e));
        }
        let command = guest_command(action);
        let done = matches!(command, GuestCommand::Done | GuestCommand::Fail);
        let Some(guest) = self.episode.as_ref().map(|e| e.guest.clone()) else {
            return Err(EnvError::NotReset);
        };
        match command {
            GuestCommand::Code(program) => {
                match guest.execute_pyautogui(&program).await {
                    Ok(_) => {}
                    // The guest ran the program and it failed (an unknown key): OSWorld goes on.
                    Err(VmwareError::GuestStatus { status, body, .. }) => {
                        tracing::warn!(
                            status,
                            body,
                            action = action.name(),
                            "action failed in the guest"
                        );
                    }
                    Err(e) => return Err(self.fail("step", e)),
                }
                tokio::time::sleep(self.config.step_pause).await;
            }
            GuestCommand::Wait => tokio::time::sleep(self.config.wait_pause).await,
            GuestCommand::Done | GuestCommand::Fail => {}
        }
        let shot = match guest.screenshot().await {
            Ok(s) => s,
            Err(e) => return Err(self.fail("step (screenshot)", e)),
        };
        if self.config.pause_between_steps && !done {
            if let Err(e) = self.provider.pause().await {
                return Err(self.fail("step (pause)", e));
            }
            if let Some(ep) = self.episode.as_mut() {
                ep.paused = true;
            }
        }
        Ok(Step {
            observation: Observation::from_screenshot(shot),
            done,
        })
    }

    async fn evaluate(&mut self, last_action: Option<&Action>) -> Result<f64, EnvError> {
        if self.episode.is_none() {
            return Err(EnvError::NotReset);
        }
        if let Err(e) = self.resume().await {
            return Err(self.fail("evaluate (unpause)", e));
        }
        let Some(ep) = self.episode.as_ref() else {
            return Err(EnvError::NotReset);
        };
        let last_was_fail = matches!(last_action, Some(Action::CallUser));
        let started = std::time::Instant::now();
        let (result, by) = match &ep.scoring {
            Scoring::Native(evaluator) => {
                let ctx = GetterContext {
                    guest: &ep.guest,
                    setup: &ep.setup,
                };
                let r = crate::evaluate::evaluate(evaluator, &ctx, last_was_fail).await;
                (r, "native")
            }
            Scoring::Worker(evaluator) => {
                let r = self
                    .worker
                    .evaluate(&ep.spec, evaluator, last_was_fail)
                    .await;
                (r, "osworld")
            }
        };
        tracing::info!(task = %ep.task.id, ?result, by, seconds = started.elapsed().as_secs_f64(), "evaluated");
        result.map_err(|e| match e {
            VmwareError::Evaluation { .. } => EnvError::Evaluation(e.to_string()),
            other => EnvError::Evaluation(format!("environment failure while evaluating: {other}")),
        })
    }

    async fn close(&mut self) -> Result<(), EnvError> {
        self.episode = None;
        self.worker.stop().await;
        self.provider
            .close()
            .await
            .map_err(|e| e.into_env_error("close"))
    }

    fn screen_size(&self) -> (u32, u32) {
        self.screen
    }
}

impl EnvConfig {
    /// The settings of the `index`-th of several parallel environments: its own cache folder
    /// `<cache_dir>/env<index>`, so that parallel episodes of one task never share files (a
    /// reset clears `tasks/<id>/`, getters write into it).
    pub fn for_env(&self, index: usize) -> EnvConfig {
        let mut c = self.clone();
        c.cache_dir = self.cache_dir.join(format!("env{index}"));
        c
    }
}

/// One environment per VM (.vmx) for parallel rollouts; each has its own cache folder
/// ([`EnvConfig::for_env`]) so that parallel episodes never share files.
pub fn vmware_pool(vmrun: &Vmrun, vmxs: &[PathBuf], config: &EnvConfig) -> Vec<OsworldEnv> {
    vmxs.iter()
        .enumerate()
        .map(|(i, vmx)| OsworldEnv::vmware(vmrun.clone(), vmx.clone(), config.for_env(i)))
        .collect()
}

/// One environment per guest server URL, each with its own cache folder
/// ([`EnvConfig::for_env`]).
pub fn remote_pool(urls: &[String], config: &EnvConfig) -> Vec<OsworldEnv> {
    urls.iter()
        .enumerate()
        .map(|(i, url)| OsworldEnv::remote(url, config.for_env(i)))
        .collect()
}
