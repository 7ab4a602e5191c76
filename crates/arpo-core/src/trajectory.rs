//! Episodes: what the policy produced at each turn and how the episode ended.

use serde::{Deserialize, Serialize};

use crate::{Action, Screenshot};

/// One generated model response with the exact sampled tokens.
///
/// Training uses `token_ids` as sampled (never a re-tokenization of `text`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Response {
    /// The decoded text (special tokens removed).
    pub text: String,
    /// The sampled token ids, including the closing `<|im_end|>` when generation stopped on it.
    pub token_ids: Vec<u32>,
    /// The log-probability of each sampled token under the sampling policy
    /// (same length as `token_ids`; empty when the policy cannot report them).
    pub logprobs: Vec<f32>,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
}

/// Why generation of a response stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-turn or end-of-sequence token, or a stop string.
    #[default]
    Stop,
    /// The token limit.
    Length,
}

/// What an agent knows when it acts: the task, the screenshots so far (the last one is the
/// current screen) and its own earlier responses (one fewer than the screenshots).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentContext {
    pub instruction: String,
    pub screenshots: Vec<Screenshot>,
    pub responses: Vec<String>,
}

/// One turn of an episode: the screen the agent saw, what it answered, what was done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub screenshot: Screenshot,
    pub response: Response,
    /// The actions parsed from the response (empty when it did not parse).
    pub actions: Vec<Action>,
    /// The parse error, when the response was not a valid UI-TARS response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format_error: Option<String>,
    /// An environment error raised while executing the actions, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_error: Option<String>,
}

/// How an episode ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EpisodeEnd {
    /// The agent answered `finished`.
    Finished,
    /// The agent answered `call_user`.
    CallUser,
    /// The step limit was reached.
    MaxSteps,
    /// A response did not parse (format reward −1).
    FormatError,
    /// The environment failed and the episode could not go on.
    EnvError,
}

/// A whole episode of one task, with its evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trajectory {
    pub task_id: String,
    pub instruction: String,
    pub turns: Vec<Turn>,
    pub end: EpisodeEnd,
    /// The environment's evaluation, in [0, 1].
    pub eval_result: f64,
    /// 0, or −1 when the last response did not parse.
    pub format_reward: f64,
}

impl Trajectory {
    /// ARPO's reward: `eval_result + 0.5 * format_reward`.
    pub fn reward(&self) -> f64 {
        self.eval_result + 0.5 * self.format_reward
    }

    /// The agent's context before each turn `i` (screenshots `0..=i`, responses `0..i`).
    pub fn context_at(&self, i: usize) -> AgentContext {
        AgentContext {
            instruction: self.instruction.clone(),
            screenshots: self.turns[..=i]
                .iter()
                .map(|t| t.screenshot.clone())
                .collect(),
            responses: self.turns[..i]
                .iter()
                .map(|t| t.response.text.clone())
                .collect(),
        }
    }
}
