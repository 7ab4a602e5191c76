//! ARPO's experience replay: a per-task buffer of successful episodes that rescues all-failed
//! GRPO groups from zero advantages.
//!
//! With outcome rewards, a group whose rollouts all fail has zero reward spread, hence zero
//! GRPO advantage and no gradient. ARPO keeps, per task, a FIFO of up to 8 successful episodes
//! (`eval_result > 0.1`); when a group of a later step is all-failed (population std of its eval
//! results `< 0.05` and mean `< 0.2`), one stored success of that task, drawn uniformly at
//! random, replaces the group's first rollout. The step's own successes are stored after the
//! injection. [`ReplayConfig`]'s defaults are the reference's (dvlab-research/ARPO,
//! `verl/trainer/replay_buffer.py` and `apply_replay`); each choice is a field, and
//! `enabled: false` turns replay off with everything else unchanged (the reference's
//! `enable_replay` flag is read by nothing).
//!
//! The buffer is generic over the episode type: anything implementing [`Episode`]
//! (`arpo_core::Trajectory` does). Draws come from a seeded ChaCha8 RNG that is saved with the
//! buffer (serde), so a resumed run draws exactly what an uninterrupted one would.
//! [`ReplayBuffer::stats`] gives the contents of `replay_buffer_stats.json`.
//!
//! ```
//! use arpo_replay::{Episode, ReplayBuffer, ReplayConfig};
//!
//! #[derive(Clone, Debug)]
//! struct Rollout { task: String, eval: f64, name: &'static str }
//!
//! impl Episode for Rollout {
//!     fn task_id(&self) -> &str { &self.task }
//!     fn eval_result(&self) -> f64 { self.eval }
//! }
//! let r = |eval, name| Rollout { task: "t1".into(), eval, name };
//!
//! let mut buffer = ReplayBuffer::new(ReplayConfig::default(), 42)?;
//!
//! // Step 0: one success among four rollouts. Nothing is injected (the group is not all-failed
//! // and the buffer is empty); the success is stored afterwards.
//! let mut groups = vec![vec![r(0.0, "a"), r(1.0, "b"), r(0.0, "c"), r(0.0, "d")]];
//! let report = buffer.apply(&mut groups)?;
//! assert!(report.injections.is_empty());
//! assert_eq!(report.stored, 1);
//!
//! // Step 1: every rollout fails, so the stored success replaces the first one.
//! let mut groups = vec![vec![r(0.0, "e"), r(0.0, "f"), r(0.0, "g"), r(0.0, "h")]];
//! let report = buffer.apply(&mut groups)?;
//! assert_eq!(report.injections.len(), 1);
//! assert_eq!(report.injections[0].age, 1);
//! let names: Vec<_> = groups[0].iter().map(|e| e.name).collect();
//! assert_eq!(names, ["b", "f", "g", "h"]);
//!
//! let stats = buffer.stats();
//! assert_eq!((stats.tasks_with_success, stats.total_injections), (1, 1));
//! # Ok::<(), arpo_replay::ReplayError>(())
//! ```

mod buffer;
mod config;
mod error;
mod stats;

pub use buffer::{Episode, Injection, ReplayBuffer, StepReport, Stored};
pub use config::{ReplacePositions, ReplayConfig, population_mean_std};
pub use error::ReplayError;
pub use stats::{AgeSummary, ReplayStats, StepSummary};
