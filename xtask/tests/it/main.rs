//! The tests of the cargo xtask binary, one test binary: each runs a real `cargo xtask train`.

#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

mod crash_resume;
mod dashboard_live;

/// One real training run at a time: the tests tell a run parked at its fault point by its CPU
/// time standing still, which a second run competing for the 2 cores could fake.
pub static ONE_RUN_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
