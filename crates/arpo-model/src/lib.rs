//! arpo-model (work in progress: see its issue).
