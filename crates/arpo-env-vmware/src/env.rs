//! The `Environment` implementation: OSWorld's `DesktopEnv` over a VMware VM or a remote guest.

use std::path::PathBuf;
use std::time::Duration;

use arpo_core::{Action, EnvError, Environment, Observation, Step, Task};
use async_trait::async_trait;

use crate::VmwareError;
use crate::evaluate::{Evaluator, GetterContext};
use crate::guest::{GuestClient, GuestConfig};
use crate::pyautogui::{GuestCommand, guest_command};
use crate::setup::{SetupContext, SetupStep, run_steps, safe_file_name};
use crate::task::OsworldTask;
use crate::vmrun::Vmrun;

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
        }
    }
}

#[derive(Debug)]
struct Episode {
    task: OsworldTask,
    evaluator: Evaluator,
    guest: GuestClient,
    setup: SetupContext,
    screen: (u32, u32),
    paused: bool,
}

/// OSWorld's `DesktopEnv` as an [`Environment`].
#[derive(Debug)]
pub struct OsworldEnv {
    provider: Box<dyn Provider>,
    config: EnvConfig,
    episode: Option<Episode>,
    screen: (u32, u32),
}

impl OsworldEnv {
    pub fn new(provider: Box<dyn Provider>, config: EnvConfig) -> Self {
        Self {
            provider,
            config,
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

    async fn try_reset(
        &mut self,
        task: &OsworldTask,
        steps: &[SetupStep],
        evaluator: &Evaluator,
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
        };
        // A clean task cache: getters of an earlier episode must not be read as this one's.
        if setup.task_cache.exists() {
            std::fs::remove_dir_all(&setup.task_cache)
                .map_err(|e| VmwareError::io("clear", &setup.task_cache, e))?;
        }
        std::fs::create_dir_all(&setup.task_cache)
            .map_err(|e| VmwareError::io("create folder", &setup.task_cache, e))?;
        run_steps(steps, &guest, &setup).await?;
        if !self.config.settle.is_zero() {
            tokio::time::sleep(self.config.settle).await;
        }
        let shot = guest.screenshot().await?;
        self.screen = (shot.width, shot.height);
        let mut episode = Episode {
            task: task.clone(),
            evaluator: evaluator.clone(),
            guest,
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
        parsed
            .check_supported()
            .map_err(|e| e.into_env_error("reset"))?;
        let steps = parsed.setup_steps().map_err(|missing| {
            VmwareError::Unsupported {
                task_id: parsed.id.clone(),
                missing,
            }
            .into_env_error("reset")
        })?;
        let evaluator = parsed.parsed_evaluator().map_err(|missing| {
            VmwareError::Unsupported {
                task_id: parsed.id.clone(),
                missing,
            }
            .into_env_error("reset")
        })?;
        let attempts = self.config.reset_attempts.max(1);
        let mut last = None;
        for attempt in 1..=attempts {
            match self.try_reset(&parsed, &steps, &evaluator).await {
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
        let ctx = GetterContext {
            guest: &ep.guest,
            setup: &ep.setup,
        };
        let last_was_fail = matches!(last_action, Some(Action::CallUser));
        let result = crate::evaluate::evaluate(&ep.evaluator, &ctx, last_was_fail).await;
        tracing::info!(task = %ep.task.id, ?result, "evaluated");
        result.map_err(|e| match e {
            VmwareError::Evaluation { .. } => EnvError::Evaluation(e.to_string()),
            other => EnvError::Evaluation(format!("environment failure while evaluating: {other}")),
        })
    }

    async fn close(&mut self) -> Result<(), EnvError> {
        self.episode = None;
        self.provider
            .close()
            .await
            .map_err(|e| e.into_env_error("close"))
    }

    fn screen_size(&self) -> (u32, u32) {
        self.screen
    }
}

/// One environment per VM (.vmx) for parallel rollouts; each has its own cache folder so that
/// parallel episodes never share files.
pub fn vmware_pool(vmrun: &Vmrun, vmxs: &[PathBuf], config: &EnvConfig) -> Vec<OsworldEnv> {
    vmxs.iter()
        .enumerate()
        .map(|(i, vmx)| {
            let mut c = config.clone();
            c.cache_dir = config.cache_dir.join(format!("env{i}"));
            OsworldEnv::vmware(vmrun.clone(), vmx.clone(), c)
        })
        .collect()
}
