//! The integration tests of arpo-serve, one binary (a link of the crate per test binary is the
//! slow part of a build on few cores).

#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

mod http;
mod model_server;
