//! ARPO training for UI-TARS GUI agents: the whole run in one process.
//!
//! - [`config`]: the seed's YAML config (`data`, `algorithm`, `worker.actor`, `worker.rollout`,
//!   `env`, `trainer`), validated, with `--set` overrides.
//! - [`rollout`]: groups of `worker.rollout.n` episodes per task over `env.num_envs`
//!   environments, lock-step batched generation through any [`arpo_core::Policy`].
//! - [`learner`]: the seam to the model being trained ([`Learner`]: old log-probs, update,
//!   save, load).
//! - [`train`]: the loop: rollouts → replay (`arpo-replay`) → GRPO advantages and the clipped
//!   loss (`arpo-grpo`) → update; metrics, per-task results, curves, checkpoints, `--resume`.
//! - [`model`]: the candle UI-TARS model as the rollout policy and the learner, sharing weights.
//! - [`rollout_gap`]: how far the sampler's log-probs are from the learner's (metrics), and the
//!   truncated importance weight that corrects for it (`algorithm.rollout_is_cap`).
//! - [`setup`]: task sets, environments and the pre-flight check from a config.
//! - [`plan`]: what a run will do (task sets, steps, optimizer steps, where it resumes).
//! - [`sft`]: supervised fine-tuning on the embedded desktop's oracle solutions (the base policy).
//! - [`eval`]: success rates with a 95% Wilson interval.
//! - [`sweep`]: ARPO vs GRPO over seeds (`cargo xtask sweep`): layout, report, paired test.
//!
//! ```
//! use arpo_trainer::Config;
//!
//! let config = Config::from_yaml_str(
//!     "worker:\n  rollout:\n    n: 4\n",
//!     &["algorithm.enable_replay=false".to_string()],
//! )
//! .unwrap();
//! assert_eq!(config.worker.rollout.n, 4);
//! assert!(!config.algorithm.enable_replay);
//! assert_eq!(arpo_trainer::train::replay_config(&config).enabled, false);
//! ```

pub mod compare;
pub mod config;
pub mod curves;
pub mod env_check;
mod error;
pub mod estimate;
pub mod eval;
pub mod learner;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod progress;
pub mod remote;
pub mod rollout;
pub mod rollout_gap;
pub mod select;
pub mod setup;
pub mod sft;
pub mod sweep;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod train;

pub use config::Config;
pub use error::TrainerError;
pub use learner::{Learner, Sample, UpdateStats};
pub use progress::Progress;
pub use rollout::{RolloutReport, RolloutSettings, run_rollouts};
pub use train::{Trainer, TrainerState};
