//! The allocator of ARPO-rs binaries and of the tests that run models: mimalloc, tuned for
//! candle's allocation pattern.
//!
//! candle allocates a fresh buffer for every op's output and frees it when the tensor drops:
//! tens of megabytes at a time, thousands of times per training step. The system allocator
//! returns such blocks to the kernel at once and page-faults them back in on the next
//! allocation (a quarter of an SFT step's time went to page faults under `perf`). mimalloc with
//! freed memory kept for reuse and 2 MiB pages removes that: `cargo xtask sft` 13.1 s -> 7.3 s for
//! the same 8 steps, the same results. Peak RSS is the high-water mark either way.
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

/// Keeps freed memory mapped for reuse and allows large OS pages. Environment variables
/// (`MIMALLOC_PURGE_DELAY`, `MIMALLOC_ALLOW_LARGE_OS_PAGES`) still win when set.
pub fn tune() {
    let set = |var: &str, option: libmimalloc_sys::mi_option_t, value: std::ffi::c_long| {
        if std::env::var_os(var).is_none() {
            // SAFETY: `mi_option_set` stores an integer in mimalloc's option table; it takes no
            // pointers and is safe to call at any time.
            #[allow(unsafe_code)]
            unsafe {
                libmimalloc_sys::mi_option_set(option, value)
            };
        }
    };
    set("MIMALLOC_PURGE_DELAY", MI_OPTION_PURGE_DELAY, -1);
    set(
        "MIMALLOC_ALLOW_LARGE_OS_PAGES",
        libmimalloc_sys::mi_option_large_os_pages,
        1,
    );
}
