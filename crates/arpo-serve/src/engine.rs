//! The seam between the HTTP server and a model: "generate this batch of chat requests".
//!
//! The server never sees tensors. It asks an [`Engine`] to turn chat messages into a prepared
//! prompt (tokenize, check the context), then hands it batches of sequences and receives every
//! generated token through a callback, which can stop a sequence early (stop strings, a client
//! that went away). Adapters and weight reloads go through the same trait.

use std::path::Path;

use arpo_core::{ChatMessage, SamplingParams};

/// Errors an engine raises.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// The prompt does not fit the model's context window.
    #[error(
        "the prompt is {prompt_tokens} tokens long but the context holds {max_context} (including {max_tokens} to generate): send fewer or smaller images, or a shorter history"
    )]
    ContextTooLong {
        prompt_tokens: usize,
        max_tokens: usize,
        max_context: usize,
    },
    /// The input is not usable (an image the processor cannot read, an empty conversation).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// No adapter of that name is loaded.
    #[error("no lora adapter named {name:?} is loaded: load it with POST /v1/load_lora_adapter")]
    UnknownAdapter { name: String },
    /// An adapter or checkpoint could not be loaded from disk.
    #[error("cannot load {what} from {path}: {reason}")]
    Load {
        what: String,
        path: String,
        reason: String,
    },
    /// The operation is not offered by this engine.
    #[error("{0} is not supported by this model engine")]
    Unsupported(String),
    /// The model failed while generating.
    #[error("generation failed: {0}")]
    Generation(String),
}

/// What a client sees about the served model.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineInfo {
    /// Where the model came from (directory or repo id).
    pub model_source: String,
    /// The compute device, in words (`cpu`, `cuda:0`).
    pub device: String,
    /// The context window in tokens (prompt + generated).
    pub max_context: usize,
}

/// How a token reads: its bytes, and whether it is a special (control) token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPiece {
    /// The token's bytes; for special tokens their literal text (`<|im_end|>`).
    pub bytes: Vec<u8>,
    /// Special tokens are not part of the answer's text.
    pub special: bool,
}

/// One sequence of a batch.
#[derive(Debug)]
pub struct SequenceRequest<'a, P> {
    pub prompt: &'a P,
    pub sampling: SamplingParams,
    /// How many alternatives to report per generated token (0: only the sampled token).
    pub top_logprobs: usize,
    /// The LoRA adapter to generate with; `None` is the base weights.
    pub adapter: Option<&'a str>,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedToken {
    pub id: u32,
    /// Log-probability of `id` under the model's distribution at this step.
    pub logprob: f32,
    /// The most likely alternatives, best first (as many as asked for, when the engine can).
    pub top: Vec<(u32, f32)>,
}

/// What the callback tells the engine after a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop this sequence now (it is finished as far as the caller cares).
    Stop,
}

/// Why an engine stopped a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineFinish {
    /// End of turn / end of sequence token.
    EndOfTurn,
    /// `max_tokens` reached.
    Length,
    /// The callback asked to stop.
    Stopped,
}

/// How an engine finished a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub reason: EngineFinish,
    /// Prompt tokens served from the engine's prefix cache (`usage.prompt_tokens_details
    /// .cached_tokens`); 0 for an engine without one.
    pub cached_prompt_tokens: usize,
}

impl From<EngineFinish> for Finished {
    fn from(reason: EngineFinish) -> Self {
        Self {
            reason,
            cached_prompt_tokens: 0,
        }
    }
}

/// A model the server can serve.
///
/// `generate` is blocking (it computes) and is called from one dedicated thread; the other
/// methods may be called concurrently from request handlers and must lock what they share.
pub trait Engine: Send + Sync + 'static {
    /// A prompt after tokenization and image preprocessing.
    type Prompt: Send + Sync + 'static;

    fn info(&self) -> EngineInfo;

    /// Tokenizes the conversation (chat template + generation prompt) and preprocesses its
    /// images; fails when prompt plus `max_tokens` exceed the context.
    fn prepare(
        &self,
        messages: &[ChatMessage],
        max_tokens: usize,
    ) -> Result<Self::Prompt, EngineError>;

    /// The prompt's length in tokens (image tokens included).
    fn prompt_tokens(&self, prompt: &Self::Prompt) -> usize;

    /// Generates every sequence of the batch, calling `on_token(index_in_batch, token)` for each
    /// token as it is produced (the end-of-turn token included). Returns, per sequence, why it
    /// stopped and how much of its prompt the engine had cached.
    fn generate(
        &self,
        batch: &[SequenceRequest<'_, Self::Prompt>],
        on_token: &mut dyn FnMut(usize, &GeneratedToken) -> Flow,
    ) -> Vec<Result<Finished, EngineError>>;

    /// How token `id` reads.
    fn token_piece(&self, id: u32) -> TokenPiece;

    /// Loads a PEFT-format LoRA adapter under `name`.
    fn load_adapter(&self, name: &str, path: &Path) -> Result<(), EngineError>;

    fn unload_adapter(&self, name: &str) -> Result<(), EngineError>;

    /// The names of the loaded adapters.
    fn adapters(&self) -> Vec<String>;

    /// The memory one loaded adapter takes, in bytes (what the server's adapter bound
    /// counts); 0 when the engine does not know.
    fn adapter_bytes(&self) -> u64 {
        0
    }

    /// Replaces the base weights with those of a checkpoint directory (HF layout).
    fn reload_weights(&self, path: &Path) -> Result<(), EngineError>;
}
