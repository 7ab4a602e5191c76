//! arpo-serve (work in progress: see its issue).
