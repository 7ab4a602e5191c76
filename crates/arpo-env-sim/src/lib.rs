//! The embedded simulated desktop: a deterministic, in-process stand-in for an OSWorld VM.
//!
//! An agent sees it only through screenshots and acts on it only through UI-TARS actions.
//! It has windows with title bars and menu bars, buttons, text fields, checkboxes, radio
//! groups, drop-downs, scrollable lists, sliders, modal dialogs, desktop icons (opened by
//! double click, dragged into folders, with right-click menus) and a keyboard.
//!
//! - [`Catalogue`]: task families with seeded parameters, a training and a held-out split,
//!   each task with an instruction, an evaluator ([`task::Check`]s) and an oracle solution.
//! - [`SimEnv`]: the `arpo_core::Environment`; cheap to build, one per parallel episode.
//! - [`render`]: deterministic RGB rendering with a bundled 5x7 font; PNG encoding.
//! - `guest` (feature `guest`): the OSWorld guest HTTP protocol over a simulated desktop
//!   (`cargo xtask sim-guest`), with [`pyautogui::parse_program`] for `/execute`.
//!
//! ```
//! use arpo_core::Environment;
//! use arpo_env_sim::{Catalogue, SimEnv};
//!
//! let catalogue = Catalogue::default();
//! let task = catalogue.train().into_iter().next().expect("a task");
//! let actions = catalogue.oracle(&task).expect("an oracle");
//! let mut env = SimEnv::new();
//! let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
//! rt.block_on(async {
//!     let first = env.reset(&task).await.expect("reset");
//!     assert_eq!((first.screenshot.width, first.screenshot.height), (336, 224));
//!     for a in &actions {
//!         env.step(a).await.expect("step");
//!     }
//!     assert_eq!(env.evaluate(actions.last()).await.expect("score"), 1.0);
//! });
//! ```

mod catalogue;
pub mod desktop;
mod env;
mod error;
pub mod font;
#[cfg(feature = "guest")]
pub mod guest;
pub mod pyautogui;
pub mod render;
mod session;
pub mod task;

/// The guest file a simulated task's evaluator reads its score from (`vm_file` getter).
pub const SCORE_FILE: &str = "/sim/score.txt";
/// The guest file that holds the loaded task (the simulated guest's signature).
pub const TASK_FILE: &str = "/sim/task.json";

pub use catalogue::{Catalogue, HELDOUT_PER_FAMILY, MAX_INSTANCES, TRAIN_PER_FAMILY};
pub use env::{DEFAULT_MAX_STEPS, SimEnv};
pub use error::SimError;
pub use session::{DEFAULT_SIZE, SCROLL_CLICKS, Session};
pub use task::{Check, OracleStep, Split, Target, TaskSpec};

impl Catalogue {
    /// The oracle solution of `task` at the default screen size (ends with `finished`, or
    /// `call_user` for an infeasible task).
    pub fn oracle(&self, task: &arpo_core::Task) -> Result<Vec<arpo_core::Action>, SimError> {
        oracle_at(task, DEFAULT_SIZE.0, DEFAULT_SIZE.1)
    }
}

/// The oracle solution of `task` on a `width` x `height` screen.
pub fn oracle_at(
    task: &arpo_core::Task,
    width: u32,
    height: u32,
) -> Result<Vec<arpo_core::Action>, SimError> {
    Session::from_task(task, width, height)?.oracle()
}
