//! The `Policy` trait: a model that answers agent contexts with UI-TARS responses.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{AgentContext, Response};

/// Sampling settings for one batch of generations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: f64,
    /// 0 or less means no top-k cut.
    pub top_k: i64,
    pub max_tokens: usize,
    /// Seed of the sampler; `None` draws one.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: -1,
            max_tokens: 256,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: -1,
            max_tokens,
            seed: None,
        }
    }
}

/// Errors a policy raises.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The input cannot be turned into a prompt (an undecodable screenshot, a context too long).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The model failed while generating.
    #[error("generation failed: {0}")]
    Generation(String),
    /// A remote server could not be reached or answered an error.
    #[error("model server error: {0}")]
    Server(String),
}

/// A batched policy: N agent contexts in, N responses out, in the same order.
///
/// Implemented by the in-process candle model (`arpo-model`) and by a client of any
/// OpenAI-compatible server (`arpo-serve`).
#[async_trait]
pub trait Policy: Send + Sync {
    async fn act(
        &self,
        contexts: &[AgentContext],
        sampling: &SamplingParams,
    ) -> Result<Vec<Response>, PolicyError>;

    /// A short description for logs (model path or server URL).
    fn describe(&self) -> String;
}
