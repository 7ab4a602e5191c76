//! The tests of the cargo xtask binary, one test binary: each runs a real `cargo xtask train`.

#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

mod crash_resume;
mod dashboard_live;
