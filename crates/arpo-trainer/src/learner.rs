//! The learner seam: what the training loop asks of the model being trained.
//!
//! The loop owns rollouts, replay, advantages, batching, metrics and checkpoints; a [`Learner`]
//! owns the weights: it scores trajectories (old log-probs, with the current weights and no
//! gradient), runs one optimizer step on a mini-batch with the clipped policy loss, and saves or
//! loads its weights and optimizer state. After `update` returns, the policy used for rollouts
//! must act with the new weights (the in-process model shares them; a learner for a remote
//! policy pushes them to the server).

use std::path::Path;

use arpo_core::Trajectory;
use serde::{Deserialize, Serialize};

use crate::TrainerError;

/// One trajectory ready for the update.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub trajectory: Trajectory,
    /// The trajectory's advantage, given to every one of its assistant tokens.
    pub advantage: f64,
    /// Log-probs of the sampled tokens under the weights before this step's update, one vector
    /// per turn (same lengths as the turns' `token_ids`). `None` when the step is on-policy
    /// (one PPO epoch, one mini-batch, no dropout): the weights before the update are the ones
    /// the learner scores with, so it takes its own log-probs, detached, and the ratio is 1
    /// exactly. That is what recomputing them would give, without the extra forward pass.
    pub old_logprobs: Option<Vec<Vec<f32>>>,
    /// The trajectory came from the replay buffer.
    pub injected: bool,
}

/// What one optimizer step reports.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct UpdateStats {
    pub loss: f64,
    pub pg_clipfrac_higher: f64,
    pub pg_clipfrac_lower: f64,
    /// Approximate KL to the old policy.
    pub ppo_kl: f64,
    pub entropy: f64,
    pub grad_norm: f64,
    pub lr: f64,
    /// Trained (assistant) tokens.
    pub tokens: usize,
    /// The step was skipped (non-finite gradient norm).
    pub skipped: bool,
    /// The sampler/learner gap over the mini-batch's trained tokens
    /// ([`crate::rollout_gap::rollout_logp_tensor`] or [`crate::rollout_gap::sampler_logprobs`]
    /// computes it beside the loss's inputs).
    #[serde(default)]
    pub rollout_gap: crate::rollout_gap::RolloutGap,
}

/// The model being trained.
pub trait Learner: Send {
    /// Log-probs of each turn's sampled tokens under the current weights (no gradient).
    fn old_logprobs(&mut self, trajectory: &Trajectory) -> Result<Vec<Vec<f32>>, TrainerError>;

    /// [`Learner::old_logprobs`] of several trajectories (a learner may score them in parallel).
    fn old_logprobs_many(
        &mut self,
        trajectories: &[&Trajectory],
    ) -> Result<Vec<Vec<Vec<f32>>>, TrainerError> {
        trajectories.iter().map(|t| self.old_logprobs(t)).collect()
    }

    /// One optimizer step over a mini-batch: the clipped policy loss of `loss` over the
    /// samples' assistant tokens, micro-batched with gradient accumulation, grad-norm clipping,
    /// AdamW. `optimizer_step` counts optimizer steps from 0 (for the LR schedule).
    fn update(
        &mut self,
        minibatch: &[Sample],
        loss: &arpo_grpo::PolicyLossConfig,
        optimizer_step: u64,
    ) -> Result<UpdateStats, TrainerError>;

    /// Writes the weights (HF layout, or the PEFT adapter with LoRA) and the optimizer state.
    fn save(&self, dir: &Path) -> Result<(), TrainerError>;

    /// Restores what [`Learner::save`] wrote.
    fn load(&mut self, dir: &Path) -> Result<(), TrainerError>;

    /// A short description for logs.
    fn describe(&self) -> String;
}
