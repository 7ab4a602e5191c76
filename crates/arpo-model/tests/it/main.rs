//! The integration tests of arpo-model, one binary (a link of the crate per test binary is the
//! slow part of a build on few cores).

#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

mod attention;
mod bf16_gemm;
mod common;
mod parity;
mod policy;
mod prefix_cache;
mod preprocess;
mod properties;
mod quantized;
mod qwen25;
mod train_full;
mod train_lora;
