//! [`SimEnv`]: the simulated desktop as an `arpo_core::Environment`.

use arpo_core::{Action, EnvError, Environment, Observation, Step, Task};
use async_trait::async_trait;

use crate::SimError;
use crate::render::scale_for;
use crate::session::{DEFAULT_SIZE, Session};

/// Default step limit of an episode (OSWorld's agents use 15 or so).
pub const DEFAULT_MAX_STEPS: usize = 15;

/// The embedded desktop environment. Cheap to build: make one per parallel episode.
///
/// A rejected action (off screen, unknown key) changes nothing, is recorded in
/// [`SimEnv::rejected`], and `step` answers [`EnvError::InvalidAction`] (the episode can go on;
/// the screen is the one before the action).
#[derive(Debug, Clone)]
pub struct SimEnv {
    width: u32,
    height: u32,
    max_steps: usize,
    session: Option<Session>,
    steps: usize,
    done: bool,
}

impl Default for SimEnv {
    fn default() -> Self {
        Self {
            width: DEFAULT_SIZE.0,
            height: DEFAULT_SIZE.1,
            max_steps: DEFAULT_MAX_STEPS,
            session: None,
            steps: 0,
            done: false,
        }
    }
}

impl SimEnv {
    /// An environment with the default screen (336x224) and step limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// An environment with another screen size (at least 336x224; 1920x1080 for OSWorld-like runs).
    pub fn with_size(width: u32, height: u32) -> Result<Self, SimError> {
        scale_for(width, height)?;
        Ok(Self {
            width,
            height,
            ..Self::default()
        })
    }

    /// Sets the step limit after which `step` reports the episode done.
    pub fn with_max_steps(mut self, max_steps: usize) -> Self {
        self.max_steps = max_steps.max(1);
        self
    }

    /// The running episode, if any.
    pub fn session(&self) -> Option<&Session> {
        self.session.as_ref()
    }

    /// Actions rejected in this episode, with reasons.
    pub fn rejected(&self) -> &[String] {
        self.session.as_ref().map_or(&[], |s| s.rejected.as_slice())
    }

    /// Steps taken in this episode.
    pub fn steps(&self) -> usize {
        self.steps
    }

    fn observe(session: &mut Session) -> Result<Observation, EnvError> {
        let shot = session.screenshot().map_err(|e| EnvError::Unavailable {
            operation: "screenshot".into(),
            reason: e.to_string(),
        })?;
        Ok(Observation::from_screenshot(shot))
    }
}

#[async_trait]
impl Environment for SimEnv {
    async fn reset(&mut self, task: &Task) -> Result<Observation, EnvError> {
        let mut session = Session::from_task(task, self.width, self.height).map_err(|e| {
            EnvError::Unsupported {
                task_id: task.id.clone(),
                reason: e.to_string(),
            }
        })?;
        let obs = Self::observe(&mut session)?;
        self.session = Some(session);
        self.steps = 0;
        self.done = false;
        Ok(obs)
    }

    async fn step(&mut self, action: &Action) -> Result<Step, EnvError> {
        let session = self.session.as_mut().ok_or(EnvError::NotReset)?;
        if self.done {
            return Err(EnvError::InvalidAction {
                action: action.name().into(),
                reason: "the episode has ended: call reset with the next task".into(),
            });
        }
        self.steps += 1;
        let applied = session.apply_action(action);
        let limit = self.steps >= self.max_steps;
        if let Err(reason) = applied {
            self.done = limit;
            return Err(EnvError::InvalidAction {
                action: action.name().into(),
                reason,
            });
        }
        self.done = action.is_terminal() || limit;
        let observation = Self::observe(session)?;
        Ok(Step {
            observation,
            done: self.done,
        })
    }

    async fn evaluate(&mut self, last_action: Option<&Action>) -> Result<f64, EnvError> {
        let session = self.session.as_ref().ok_or(EnvError::NotReset)?;
        Ok(session.reward(last_action))
    }

    fn screen_size(&self) -> (u32, u32) {
        (self.width, self.height)
    }
}
