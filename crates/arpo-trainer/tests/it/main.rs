//! The integration tests of arpo-trainer but the long learning ones, one binary (a link of
//! the crate per test binary is the slow part of a build on few cores).

#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

mod configs;
mod embedded_run;
mod env_check;
mod model_learner;
mod qwen25_absolute;
mod rollout;
mod sft_samples;
mod sweep_report;
mod training;
