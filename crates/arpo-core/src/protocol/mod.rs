//! The UI-TARS text protocol: prompts, response parsing, and actions written back as text.
//!
//! (Being filled in by the workspace-foundation issue.)
