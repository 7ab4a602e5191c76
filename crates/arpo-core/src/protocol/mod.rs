//! The UI-TARS text protocol: prompts, response parsing, and actions written back as text.
//!
//! (Prompt builder and parser: being filled in by the workspace-foundation issue.)

mod resize;

pub use resize::{ResizeError, smart_resize};
