//! The integration tests of arpo-env-sim, one binary (a link of the crate per test binary is the
//! slow part of a build on few cores).

#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

mod catalogue;
#[cfg(feature = "guest")] // `cargo test --workspace` has it (xtask); alone: --features guest
mod guest_http;
mod properties;
mod snapshots;
