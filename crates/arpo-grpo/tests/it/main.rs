//! The integration tests of arpo-grpo, one binary (a link of the crate per test binary is the
//! slow part of a build on few cores).

#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

mod golden;
mod properties;
