//! The allocator of ARPO-rs binaries and of the tests that run models: mimalloc, tuned for
//! candle's allocation pattern.
//!
//! candle allocates a fresh buffer for every op's output and frees it when the tensor drops:
//! tens of megabytes at a time, thousands of times per training step. The system allocator
//! returns such blocks to the kernel at once and page-faults them back in on the next
//! allocation (a quarter of an SFT step's time went to page faults under `perf`). mimalloc with
//! freed memory kept for reuse and 2 MiB pages removes that: `cargo xtask sft` 13.1 s -> 7.3 s for
//! the same 8 steps, the same results.
//!
//! Memory kept for reuse is not free for a large model, though: the transient buffers of one op
//! are rarely the sizes the next op asks for, and what stays mapped adds up. A 2B LoRA update
//! over two 1080p screenshots (6,014 tokens, 2 decoder layers, gradient checkpointing) peaked at
//! 7.28 GiB keeping everything, 5.57 GiB returning memory unused for 1 s, 5.40 GiB returning it
//! at once; the tiny model's default run is 15% slower returning it after 1 s. So a process
//! running a large model calls [`release_idle_memory`] after [`tune`].
//!
//! A binary (or test binary) installs it with [`global_allocator!`] and calls [`tune`] first:
//!
//! ```
//! arpo_alloc::global_allocator!();
//!
//! fn main() {
//!     arpo_alloc::tune();
//! }
//! ```

pub use mimalloc::MiMalloc;

/// Declares mimalloc as the global allocator of the crate it is written in (a `static` with
/// `#[global_allocator]`, which only a binary or test crate should have).
#[macro_export]
macro_rules! global_allocator {
    () => {
        #[global_allocator]
        static ARPO_GLOBAL_ALLOCATOR: $crate::MiMalloc = $crate::MiMalloc;
    };
}

/// `mi_option_purge_delay` in mimalloc 2's `mi_option_t` (include/mimalloc.h); the Rust
/// bindings name only the older options.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory that is not reused stays mapped under [`release_idle_memory`].
pub const LARGE_MODEL_PURGE_DELAY_MS: std::ffi::c_long = 1000;

fn set_option(var: &str, option: libmimalloc_sys::mi_option_t, value: std::ffi::c_long) {
    if std::env::var_os(var).is_none() {
        // SAFETY: `mi_option_set` stores an integer in mimalloc's option table; it takes no
        // pointers and is safe to call at any time.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_set(option, value)
        };
    }
}

/// For a process running a large model (billions of parameters): memory freed and not reused
/// for [`LARGE_MODEL_PURGE_DELAY_MS`] goes back to the kernel, so that peak RSS follows the
/// memory in use (see the crate docs for the measurement). Takes effect for memory freed from
/// then on; `MIMALLOC_PURGE_DELAY`, when set, still wins.
pub fn release_idle_memory() {
    set_option(
        "MIMALLOC_PURGE_DELAY",
        MI_OPTION_PURGE_DELAY,
        LARGE_MODEL_PURGE_DELAY_MS,
    );
}

/// Keeps freed memory mapped for reuse and allows large OS pages. Environment variables
/// (`MIMALLOC_PURGE_DELAY`, `MIMALLOC_ALLOW_LARGE_OS_PAGES`) still win when set.
pub fn tune() {
    set_option("MIMALLOC_PURGE_DELAY", MI_OPTION_PURGE_DELAY, -1);
    set_option(
        "MIMALLOC_ALLOW_LARGE_OS_PAGES",
        libmimalloc_sys::mi_option_large_os_pages,
        1,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn purge_delay() -> std::ffi::c_long {
        // SAFETY: reads an integer from mimalloc's option table.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY)
        }
    }

    #[test]
    fn small_models_keep_memory_and_large_ones_release_it() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return; // the variable wins by design: nothing of ours to check
        }
        tune();
        assert_eq!(purge_delay(), -1);
        release_idle_memory();
        assert_eq!(purge_delay(), LARGE_MODEL_PURGE_DELAY_MS);
    }
}
