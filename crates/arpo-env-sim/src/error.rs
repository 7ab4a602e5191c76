//! The crate's error type.

/// Everything that can go wrong in the simulated desktop.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A pyautogui program sent to `/execute` could not be accepted.
    #[error("pyautogui program rejected at byte {offset}: {reason}")]
    Program { offset: usize, reason: String },
    /// A shell command line could not be split into words.
    #[error("command line cannot be split: {reason}")]
    CommandLine { reason: String },
    /// A task's `config` is not a simulated-desktop task spec.
    #[error(
        "task {task_id} is not a simulated-desktop task: {reason}; build tasks with arpo_env_sim::Catalogue"
    )]
    BadTask { task_id: String, reason: String },
    /// A task id that the catalogue does not know.
    #[error("unknown task id {task_id}: list the ids with Catalogue::default().all()")]
    UnknownTask { task_id: String },
    /// An unsupported screen size.
    #[error(
        "screen size {width}x{height} is too small: the simulated desktop needs at least {min_width}x{min_height}"
    )]
    ScreenSize {
        width: u32,
        height: u32,
        min_width: u32,
        min_height: u32,
    },
    /// PNG encoding failed.
    #[error("png encoding failed: {0}")]
    Encode(String),
    /// An oracle step could not be resolved against the desktop (a catalogue bug).
    #[error("oracle of task {task_id} cannot be resolved: {reason}")]
    Oracle { task_id: String, reason: String },
}
