//! arpo-replay (work in progress: see its issue).
