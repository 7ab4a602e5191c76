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

pub mod episodes;
mod error;
pub mod run;
pub mod server;
pub mod tensorboard;

pub use episodes::{RecordedEpisode, RecordedGroup, Retention, record_episodes};
pub use error::DashboardError;
pub use server::{DEFAULT_ADDR, router, serve};
pub use tensorboard::{TensorBoardWriter, scalars_from_json};
