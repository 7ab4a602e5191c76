use thiserror::Error;

/// Everything that can go wrong with a replay buffer.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ReplayError {
    /// A setting is out of range.
    #[error("invalid replay config: {field} {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    /// A group holds rollouts of more than one task.
    #[error(
        "group {group} mixes tasks {first:?} and {other:?}: pass one group per task (all rollouts of one task in one step)"
    )]
    MixedGroup {
        group: usize,
        first: String,
        other: String,
    },
    /// A saved buffer does not satisfy the buffer's invariants.
    #[error("corrupt replay buffer state: {reason}; delete it to start with an empty buffer")]
    CorruptState { reason: String },
}
