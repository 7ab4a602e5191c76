//! OSWorld tasks on VMware VMs (or on any running OSWorld guest server).
//!
//! - [`vmrun`]: VMware's `vmrun` (`-T fusion` on macOS, `-T ws` elsewhere), a timeout on every
//!   call, VMware's failure output (even `Error: ...` with exit 0) as typed errors with a hint.
//! - [`guest`]: the client of OSWorld's guest HTTP server (port 5000): retries with backoff,
//!   timeouts, readiness polling, screenshots checked to be PNG/JPEG.
//! - [`pyautogui`]: `Action` → the pyautogui program the guest runs; every string an escaped
//!   Python literal.
//! - [`task`], [`setup`], [`evaluate`]: OSWorld task JSON and index files read unchanged, the
//!   setup steps, the simple getters and metrics natively; what a task needs beyond them is
//!   reported by name ([`OsworldTask::unsupported`]).
//! - [`worker`]: OSWorld's own evaluator (`desktop-env`: getters, metrics, `SetupController`) in a
//!   long-lived Python worker; `EnvConfig::osworld.evaluator` (`auto | native | osworld`) says
//!   which scores a task. Native metrics are checked against OSWorld's recorded outputs.
//! - [`coverage`]: how each task of a set runs (natively, through OSWorld's evaluator, or not at
//!   all and why); `cargo xtask osworld-coverage` prints it.
//! - [`OsworldEnv`]: the [`arpo_core::Environment`] over a [`VmwareProvider`] (revert, start, IP)
//!   or a [`RemoteProvider`] (a guest server by URL); [`vmware_pool`] / [`remote_pool`] for parallel
//!   environments, each with its own cache folder.
//!
//! ```
//! use arpo_core::{Action, Point};
//! use arpo_env_vmware::{OsworldTask, pyautogui::pyautogui_program};
//!
//! let program = pyautogui_program(&[
//!     Action::Click { point: Point::new(960.0, 540.0) },
//!     Action::Type { content: "it's done\n".into() },
//! ]);
//! assert_eq!(
//!     program,
//!     "pyautogui.click(960, 540, button='left')\n\
//!      pyautogui.write('it\\'s done', interval=0.1)\n\
//!      pyautogui.press('enter')"
//! );
//!
//! let task = OsworldTask::from_json(r#"{"id": "t", "instruction": "Open the file",
//!     "config": [{"type": "chrome_open_tabs", "parameters": {}}],
//!     "evaluator": {"func": "compare_pdfs", "result": {"type": "vm_file", "path": "/a", "dest": "a"},
//!                   "expected": {"type": "pdf_from_url", "path": "https://x", "dest": "b"}}}"#).unwrap();
//! assert_eq!(
//!     task.unsupported(),
//!     ["getter pdf_from_url", "metric compare_pdfs", "setup step chrome_open_tabs"]
//! );
//! ```

pub mod coverage;
mod env;
mod error;
pub mod evaluate;
pub mod guest;
pub mod pyautogui;
mod raw;
pub mod setup;
pub mod task;
pub mod vmrun;
pub mod worker;

pub use env::{
    EnvConfig, EvaluatorBackend, OsworldEnv, OsworldEvaluatorConfig, Provider, RemoteProvider,
    VmwareProvider, remote_pool, vmware_pool,
};
pub use error::VmwareError;
pub use guest::{GuestClient, GuestConfig};
pub use task::{IndexEntry, OsworldTask, load_index};
pub use vmrun::{HostType, Vmrun, VmrunConfig, VmrunFailure};
pub use worker::{GuestSpec, OsworldNames, OsworldWorker, WorkerConfig};
