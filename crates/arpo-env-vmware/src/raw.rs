//! The raw pieces of an OSWorld task file that both [`crate::setup`] and [`crate::evaluate`]
//! read: a leaf module, so that `task` → `setup`/`evaluate` never loops back to `task`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A setup step as written in the JSON: `{type, parameters}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawStep {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub parameters: Value,
}
