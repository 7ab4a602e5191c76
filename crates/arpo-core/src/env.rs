//! The `Environment` trait: a desktop an agent acts on through UI-TARS actions.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{Action, Observation, Task};

/// The result of one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub observation: Observation,
    /// The episode is over (the action was terminal, or the environment ended it).
    pub done: bool,
}

/// Errors an environment raises. [`EnvError::episode_can_continue`] tells the rollout engine
/// whether to go on with the episode or record it as an environment failure.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// The action could not be carried out (off screen, unknown key); the episode can go on.
    #[error("invalid action {action}: {reason}")]
    InvalidAction { action: String, reason: String },
    /// The task cannot run on this environment (an unsupported setup step, getter or metric).
    #[error("task {task_id} is not supported: {reason}")]
    Unsupported { task_id: String, reason: String },
    /// `step`/`evaluate` called without a task loaded by `reset`.
    #[error("no episode is running: call reset with a task first")]
    NotReset,
    /// The environment did not answer in time.
    #[error("{operation} timed out after {seconds} s: {hint}")]
    Timeout {
        operation: String,
        seconds: f64,
        hint: String,
    },
    /// The environment is unreachable or broken; it needs a reset (or a restart) before reuse.
    #[error("environment unavailable during {operation}: {reason}")]
    Unavailable { operation: String, reason: String },
    /// The evaluator failed (OSWorld scores that 0).
    #[error("evaluation failed: {0}")]
    Evaluation(String),
}

impl EnvError {
    /// Whether the episode may go on after this error (only a rejected action leaves it intact).
    pub fn episode_can_continue(&self) -> bool {
        matches!(self, Self::InvalidAction { .. })
    }
}

/// A desktop environment (a VMware VM, a remote guest, the embedded simulated desktop).
///
/// One environment runs one episode at a time; the trainer runs several in parallel.
#[async_trait]
pub trait Environment: Send {
    /// Sets the task up and returns the first observation.
    async fn reset(&mut self, task: &Task) -> Result<Observation, EnvError>;

    /// Carries out one action and returns what the screen shows after it.
    async fn step(&mut self, action: &Action) -> Result<Step, EnvError>;

    /// Scores the current episode, in [0, 1]. `last_action` is the episode's final action
    /// (OSWorld's infeasible tasks score 1 only when it was `call_user`).
    async fn evaluate(&mut self, last_action: Option<&Action>) -> Result<f64, EnvError>;

    /// Releases what the environment holds (a VM, a connection).
    async fn close(&mut self) -> Result<(), EnvError> {
        Ok(())
    }

    /// The screen size in pixels, the space `Action` coordinates live in.
    fn screen_size(&self) -> (u32, u32);
}
