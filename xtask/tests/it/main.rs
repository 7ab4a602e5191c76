//! The tests of the cargo xtask binary, one test binary: each runs a real `cargo xtask train`.

mod crash_resume;
mod dashboard_live;
