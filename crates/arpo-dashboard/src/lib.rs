//! Watch a run learn: a live local web page of a run's curves and episodes, the episodes a run
//! keeps on disk for it, and TensorBoard event files.
//!
//! Everything here works from a run's files (`results/<exp>/`), so the page shows a finished
//! run, a running one, or one being resumed alike:
//!
//! - [`episodes`]: [`record_episodes`] writes a step's rollout groups (screenshots as PNG, a
//!   JSON of responses, actions, rewards, advantages, replay injections) under
//!   `results/<exp>/episodes/`, with a [`Retention`] that bounds disk use.
//! - [`tensorboard`]: [`TensorBoardWriter`], event files TensorBoard (and `wandb sync
//!   --sync-tensorboard`) read: scalars per step, images.
//! - [`run`]: reading a run's files: curves (downsampled), tasks, replay statistics.
//! - [`server`]: the page and its JSON API ([`serve`], loopback by default).
//!
//! ```
//! use arpo_dashboard::{TensorBoardWriter, scalars_from_json};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let mut tb = TensorBoardWriter::create(dir.path()).unwrap();
//! let metrics = serde_json::json!({"step": 3, "success_rate": 0.25, "loss": -0.1});
//! tb.write_scalars(3, &scalars_from_json("train", &metrics)).unwrap();
//! assert!(std::fs::read_dir(dir.path()).unwrap().count() == 1);
//! ```
//!
//! In a training loop (the trainer's `Sample`s after advantages; `metrics` a step's serialized
//! `StepMetrics`):
//!
//! ```
//! use arpo_core::Trajectory;
//! use arpo_dashboard::{
//!     RecordedEpisode, RecordedGroup, Retention, TensorBoardWriter, record_episodes,
//!     scalars_from_json,
//! };
//! # struct Sample { trajectory: Trajectory, advantage: f64, injected: bool }
//! # fn main() -> Result<(), arpo_dashboard::DashboardError> {
//! # let dir = tempfile::tempdir().unwrap();
//! # let results = dir.path();
//! # let (step, resumed) = (0u64, false);
//! # let batches: Vec<Vec<Sample>> = Vec::new();
//! # let metrics = serde_json::json!({"step": 0, "success_rate": 0.5});
//! // Once, before the first step (`trainer.logger` has `tensorboard`):
//! let mut tb = TensorBoardWriter::create(&results.join("tensorboard"))?;
//! if resumed {
//!     tb.write_session_start(step)?; // the first step the resumed run writes
//! }
//! // Each step, once the groups have their advantages:
//! let groups: Vec<RecordedGroup<'_>> = batches
//!     .iter()
//!     .map(|b| RecordedGroup {
//!         episodes: b
//!             .iter()
//!             .map(|s| RecordedEpisode {
//!                 trajectory: &s.trajectory,
//!                 advantage: s.advantage,
//!                 injected: s.injected,
//!             })
//!             .collect(),
//!     })
//!     .collect();
//! record_episodes(&results.join("episodes"), step, &groups, Retention::default())?;
//! tb.write_episode_images(step, &groups, 2)?;
//! // Each step, once its metrics are known:
//! tb.write_scalars(step, &scalars_from_json("train", &metrics))?;
//! # Ok(())
//! # }
//! ```

pub mod episodes;
mod error;
pub mod run;
pub mod server;
pub mod tensorboard;

pub use episodes::{RecordedEpisode, RecordedGroup, Retention, record_episodes};
pub use error::DashboardError;
pub use server::{DEFAULT_ADDR, router, serve, serve_in_background};
pub use tensorboard::{TensorBoardWriter, scalars_from_json};
