//! Training UI-TARS on candle: differentiable ops, AdamW, LoRA, checkpoints.
//!
//! - [`ops`]: RMSNorm, LayerNorm, softmax, rotary embedding with analytic backward, and a
//!   frozen linear whose backward returns only the input gradient.
//! - [`optim`]: AdamW with decoupled weight decay, global grad-norm clipping, linear warmup,
//!   gradient accumulation, and a state that saves and resumes bit-for-bit.
//! - [`lora`]: LoRA adapters with PEFT's initialisation and file format, and merging.
//! - [`checkpoint`]: atomic, checksummed safetensors writes and HF-layout model directories.

pub mod checkpoint;
pub mod lora;
pub mod ops;
pub mod optim;
pub mod recompute;
pub mod score;
pub mod trainable;

use std::path::PathBuf;

/// Errors of the training path.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The model failed (shapes, inputs, loading).
    #[error("model: {0}")]
    Model(#[from] crate::ModelError),
    /// Reading or writing a file failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint file is damaged or does not match its manifest.
    #[error("corrupt checkpoint file {path}: {reason}; restore it from an earlier checkpoint")]
    Corrupt { path: PathBuf, reason: String },
    /// A configuration value is out of range.
    #[error("invalid training config: {0}")]
    Config(String),
    /// A saved state does not fit the parameters it is loaded into.
    #[error("state mismatch for {name}: {reason}")]
    Mismatch { name: String, reason: String },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, TrainError>;
