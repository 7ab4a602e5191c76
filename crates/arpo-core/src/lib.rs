//! The shared vocabulary of ARPO-rs.
//!
//! Every crate of the workspace speaks these types: an [`Action`] (the UI-TARS action space, in
//! screen pixels), an [`Observation`] (a screenshot), a [`Task`], a [`Trajectory`] of [`Turn`]s,
//! and the two traits the trainer is generic over, [`Environment`] and [`Policy`].
//!
//! The UI-TARS text protocol ([`protocol`]: prompt building, response parsing, and the inverse
//! that writes an action as model text) lives here too, not in `arpo-model`: the remote policy,
//! the environments' tools (`cargo xtask parse-response`) and the demonstrations writer all need
//! it, and none of them should have to build candle to get it.
//!
//! ```
//! use arpo_core::{Action, Point, Trajectory, EpisodeEnd};
//!
//! let click = Action::Click { point: Point::new(960.0, 540.0) };
//! assert_eq!(click.name(), "click");
//! let json = serde_json::to_string(&click).unwrap();
//! assert_eq!(json, r#"{"action":"click","point":{"x":960.0,"y":540.0}}"#);
//!
//! let episode = Trajectory {
//!     task_id: "t1".into(), instruction: "Open the menu".into(), turns: vec![],
//!     end: EpisodeEnd::FormatError, eval_result: 0.0, format_reward: -1.0,
//! };
//! assert_eq!(episode.reward(), -0.5);
//! ```

mod action;
mod chat;
mod env;
mod observation;
mod policy;
pub mod protocol;
mod screen;
mod serde_base64;
mod task;
mod trajectory;

pub use action::{Action, Point, ScrollDirection};
pub use chat::{ChatMessage, ContentPart, Role};
pub use env::{EnvError, Environment, Step};
pub use observation::{ImageFormat, Observation, Screenshot};
pub use policy::{Policy, PolicyError, SamplingParams};
pub use screen::{ScreenSize, ScreenSizeError};
pub use task::Task;
pub use trajectory::{AgentContext, EpisodeEnd, FinishReason, Response, Trajectory, Turn};
