//! UI-TARS (Qwen2-VL) inference on candle, matching HF transformers.
//!
//! - [`config`]: `config.json` (flat and transformers-5 forms), preprocessor and generation configs;
//! - [`weights`]: local directories, sharded checkpoints, the Hugging Face cache (offline);
//! - [`Qwen2Vl`]: vision tower + M-RoPE decoder, with a differentiable whole-sequence
//!   [`Qwen2Vl::forward`] for training;
//! - [`nn`]: the `Linear`/`RmsNorm`/`LayerNorm` every projection and norm goes through.
//!
//! ```
//! use arpo_model::{Qwen2Vl, Qwen2VlConfig};
//! use candle_core::{DType, Device};
//!
//! # fn main() -> Result<(), arpo_model::ModelError> {
//! let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/tiny-qwen2vl");
//! let model = Qwen2Vl::load(&dir, DType::F32, &Device::Cpu)?;
//! let logits = model.forward(&[1, 2, 3], None, &[])?;
//! assert_eq!(logits.dims(), &[3, model.config.text.vocab_size]);
//! # Ok(())
//! # }
//! ```

pub mod chat;
pub mod config;
mod device;
mod error;
pub mod generate;
pub mod model;
pub mod nn;
pub mod policy;
pub mod processor;
pub mod rope;
pub mod text;
pub mod train;
pub mod vision;
pub mod weights;

pub use chat::{ChatTokenizer, TokenizedChat};
pub use config::{GenerationConfig, PreprocessorConfig, Qwen2VlConfig, TextConfig, VisionConfig};
pub use device::{DTypeSpec, DeviceOpenError, DeviceSpec, SpecError};
pub use error::{ModelError, Result};
pub use generate::{Generation, GenerationRequest, GenerationTimings};
pub use model::Qwen2Vl;
pub use policy::{LocalPolicy, StepTimings, UiTars};
pub use processor::{ImageProcessor, ProcessedImages};
pub use rope::{RopeIndex, get_rope_index};
