//! The long tests that prove learning and the base policy's band, in one binary of their own:
//! they run a small model the way `cargo xtask train` does (its allocator, candle's ops on one
//! thread and one sequence per core), which is process-wide state the other tests must not share.

#![allow(clippy::unwrap_used)] // in tests a panic is the failure report

mod base_policy;
mod learning;

// The allocator `cargo xtask` runs with (freed memory kept for reuse: candle allocates every
// op's output afresh, and the system allocator's page faults cost more than the model here).
arpo_alloc::global_allocator!();

/// As `cargo xtask train` runs a small model: mimalloc tuned, and candle's ops on one thread
/// (set once, before any candle op of this process).
pub fn run_like_xtask() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        arpo_alloc::tune();
        // SAFETY: inside `call_once`: the tests of this binary wait here before any candle op,
        // and nothing else of the process reads the environment meanwhile.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("RAYON_NUM_THREADS", "1")
        };
    });
}
