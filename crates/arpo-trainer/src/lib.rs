//! arpo-trainer (work in progress: see its issue).
