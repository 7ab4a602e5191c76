//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid json in {path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "model type {model_type:?} in {path} is not supported: this crate runs qwen2_vl (UI-TARS-2B/7B) and qwen2_5_vl (UI-TARS-1.5)"
    )]
    UnsupportedModel { model_type: String, path: PathBuf },
    #[error("invalid config: {0}")]
    Config(String),
    #[error(
        "weight {name} is missing from the checkpoint: is this a Qwen2-VL / Qwen2.5-VL checkpoint matching its config.json?"
    )]
    MissingWeight { name: String },
    #[error(
        "weight {name} has shape {actual:?}, expected {expected:?}: does config.json match the weights?"
    )]
    WeightShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error(
        "model {repo_id} is not in the Hugging Face cache ({cache}): download it first, e.g. `huggingface-cli download {repo_id}`, or pass a local directory"
    )]
    NotCached { repo_id: String, cache: PathBuf },
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("chat template error: {0}")]
    Template(String),
    #[error("image error: {0}")]
    Image(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("cannot store {name} as {weights} rollout weights: {reason}")]
    Quantize {
        name: String,
        weights: crate::quantized::RolloutWeights,
        reason: String,
    },
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })
}
