//! arpo-grpo (work in progress: see its issue).
