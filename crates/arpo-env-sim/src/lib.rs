//! arpo-env-sim (work in progress: see its issue).
