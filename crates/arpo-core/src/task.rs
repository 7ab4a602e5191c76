//! A task: what the agent is asked to do, and what the environment needs to set it up.

use serde::{Deserialize, Serialize};

/// A task as the trainer sees it: an id, the instruction shown to the model, and the
/// environment-specific configuration (an OSWorld task JSON, a simulated-desktop task
/// spec, ...), opaque to everything but the environment that runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Stable identifier; the replay buffer and the per-task results are keyed by it.
    pub id: String,
    /// The natural-language instruction given to the agent.
    pub instruction: String,
    /// The group the task belongs to (OSWorld's domain, a simulated task family).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Environment-specific configuration.
    #[serde(default)]
    pub config: serde_json::Value,
}

impl Task {
    pub fn new(id: impl Into<String>, instruction: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            instruction: instruction.into(),
            domain: None,
            config: serde_json::Value::Null,
        }
    }
}
