//! Criterion benchmarks live in `benches/benches/`; this library is empty.
//!
//! - `model`: prefill and decode of the tiny fixture model (`fixtures/models/tiny-qwen2vl`);
//! - `algorithm`: `ReplayBuffer::apply` and GRPO advantages for 1,024 groups of 8;
//! - `sim`: rendered steps per second of the simulated desktop at its default size.
//!
//! Run with `cargo bench -p arpo-benches` (or `--bench sim` etc. for one). The 2B-shape
//! benchmarks against PyTorch are `cargo xtask bench-model`; see `BENCHMARKS.md`.
