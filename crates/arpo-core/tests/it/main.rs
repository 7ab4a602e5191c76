//! The integration tests of arpo-core, one binary (a link of the crate per test binary is the
//! slow part of a build on few cores).

#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

mod protocol_props;
mod ui_tars_golden;
