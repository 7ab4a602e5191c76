//! GRPO for ARPO: group-normalised advantages and the asymmetric, dual-clipped policy loss.
//!
//! Two steps of a training update, with the reference's semantics (dvlab-research/ARPO, a fork
//! of EasyR1/verl: `compute_grpo_outcome_advantage`, `compute_policy_loss`, `compute_kl`):
//!
//! 1. **Advantages** ([`group_advantages`], [`batch_advantages`]): each trajectory's scalar
//!    reward against the other rollouts of its task in the same step,
//!    `A = (r − mean) / (std + 1e-6)` with the unbiased std; Dr. GRPO (no std) and RLOO
//!    (leave-one-out baseline) as options ([`AdvantageEstimator`]).
//! 2. **Policy loss** (`policy_loss` on candle tensors, feature `candle` (default), differentiable with respect to the
//!    log-probs; [`policy_loss_slices`] on `f64` slices with its analytic gradient): per token
//!    `r = exp(logp − old_logp)`, `max(−A·r, −A·clip(r, 1 − 0.2, 1 + 0.3))`, and for `A < 0`
//!    the dual clip `min(·, −3·A)`; aggregated as `seq-mean-token-mean` (the reference) or
//!    `token-mean` ([`LossAggMode`]); an optional KL penalty to a reference policy
//!    (`kl`, `low_var_kl`); optional truncated importance sampling for a sampler that differs
//!    from the learner (`rollout_is_cap`, verl's `tis_imp_ratio_cap`: each token's term times
//!    [`rollout_is_weight`]); metrics as verl logs them ([`LossMetrics`]).
//!
//! Defaults ([`AdvantageConfig::default`], [`PolicyLossConfig::default`]) are the reference's;
//! both configs deserialize from YAML/JSON sections with every field optional.
//!
//! ```
//! # #[cfg(feature = "candle")] {
//! use arpo_grpo::{
//!     AdvantageConfig, PolicyLossConfig, PolicyLossInputs, group_advantages, policy_loss,
//! };
//! use candle_core::{Device, Tensor, Var};
//!
//! // A group of four rollouts of one task: one success.
//! let adv = group_advantages(&[1.0, 0.0, 0.0, 0.0], &AdvantageConfig::default())?;
//! assert!(adv[0] > 0.0 && adv[1] < 0.0);
//!
//! // The success's trajectory, three trained tokens. The new policy already gives its tokens
//! // a higher probability than the sampling policy: ratio e^0.1 = 1.105 (inside [0.8, 1.3]).
//! let dev = Device::Cpu;
//! let logp = Var::new(&[-0.9f32, -1.9, -0.4], &dev)?;
//! let old = Tensor::new(&[-1.0f32, -2.0, -0.5], &dev)?;
//! let a = Tensor::new(adv[0] as f32, &dev)?;
//! let mask = Tensor::new(&[1u8, 1, 1], &dev)?;
//! let inputs = PolicyLossInputs {
//!     logp: logp.as_tensor(), old_logp: &old, advantages: &a, mask: &mask,
//!     ref_logp: None, entropy: None, rollout_logp: None,
//! };
//! let out = policy_loss(&inputs, &PolicyLossConfig::default())?;
//! // Inside the clip range the loss is −A·r.
//! let expected = -adv[0] * 0.1f64.exp();
//! assert!((out.metrics.loss - expected).abs() < 1e-5);
//! assert_eq!(out.metrics.pg_clipfrac_higher, 0.0);
//! let grads = out.loss.backward()?;
//! assert!(grads.get(&logp).is_some());
//! # }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod advantage;
mod config;
mod error;
mod slices;
#[cfg(feature = "candle")]
mod tensor;

pub use advantage::{
    AdvantageConfig, AdvantageEstimator, INVALID_GROUP_STD, batch_advantages, group_advantages,
    group_advantages_into, is_invalid_group, reward_std,
};
pub use config::{BatchCount, KlEstimator, KlPenalty, LossAggMode, LossMetrics, PolicyLossConfig};
pub use error::GrpoError;
pub use slices::{
    MASKED_MEAN_EPS, SequenceInput, SliceLoss, TokenLoss, policy_loss_slices, rollout_is_weight,
    token_kl, token_policy_loss,
};
#[cfg(feature = "candle")]
pub use tensor::{PolicyLoss, PolicyLossInputs, policy_loss};
