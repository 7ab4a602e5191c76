//! The integration tests of arpo-env-vmware, one binary (a link of the crate per test binary is the
//! slow part of a build on few cores).

#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

mod env_remote;
mod env_vmware;
mod evaluators;
mod pyautogui_roundtrip;
mod support;
mod tasks;
mod vmrun_fake;
