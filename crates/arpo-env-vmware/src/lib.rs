//! OSWorld tasks on VMware VMs.
//!
//! - [`vmrun`]: VMware's `vmrun` command line, with a timeout on every call and typed errors.

mod error;
pub mod pyautogui;
pub mod vmrun;

pub use error::VmwareError;
pub use vmrun::{HostType, Vmrun, VmrunConfig, VmrunFailure};
