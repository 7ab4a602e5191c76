use thiserror::Error;

/// Everything that can go wrong computing advantages or the policy loss.
#[derive(Debug, Error)]
pub enum GrpoError {
    /// A reward is NaN or infinite: it would poison every advantage of its group.
    #[error("reward {index} is {value}: rewards must be finite (check the evaluator's output)")]
    NonFiniteReward { index: usize, value: f64 },
    /// A setting is out of range.
    #[error("invalid {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    /// Two inputs that must line up do not.
    #[error("{name} has length {got}, but {expected} was expected: {hint}")]
    LengthMismatch {
        name: &'static str,
        got: usize,
        expected: usize,
        hint: &'static str,
    },
    /// An input the configuration needs was not given.
    #[error("{name} is missing: {hint}")]
    MissingInput {
        name: &'static str,
        hint: &'static str,
    },
    /// A tensor has the wrong shape.
    #[error("{name} has shape {got:?}: {expected}")]
    BadShape {
        name: &'static str,
        got: Vec<usize>,
        expected: String,
    },
    /// A tensor has an integer dtype where floats are needed.
    #[cfg(feature = "candle")]
    #[error("log_probs has dtype {dtype:?}: pass f32, f64, bf16 or f16 log-probabilities")]
    NotFloat { dtype: candle_core::DType },
    /// The batch holds no sequence.
    #[error("empty batch: pass at least one sequence")]
    EmptyBatch,
    /// A tensor operation failed.
    #[cfg(feature = "candle")]
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}
