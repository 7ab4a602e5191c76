//! UI-TARS inference and training on candle, matching HF transformers: Qwen2-VL
//! (`model_type: qwen2_vl`, UI-TARS-2B/7B) and Qwen2.5-VL (`qwen2_5_vl`, UI-TARS-1.5-7B, the
//! ARPO paper's base).
//!
//! Qwen2.5-VL differs in the vision tower only: RMSNorm, a gated SiLU MLP, and attention within
//! windows of `window_size` pixels (patches reordered window by window, restored after the
//! merger) except in the `fullatt_block_indexes` blocks. Both families are checked against
//! transformers on tiny random checkpoints (`fixtures/models/tiny-qwen2vl`,
//! `fixtures/models/tiny-qwen25vl`: logits, greedy tokens, LoRA and full gradients).
//! [`Qwen2VlConfig::named_shape`] gives the published shapes (`2b`, `1.5-7b`) for benchmarks
//! with random weights (`cargo xtask bench-model --shape 1.5-7b`).
//!
//! - [`config`]: `config.json` (flat and transformers-5 forms, both families), preprocessor and
//!   generation configs;
//! - [`weights`]: local directories, sharded checkpoints, the Hugging Face cache (offline);
//! - [`Qwen2Vl`]: vision tower + M-RoPE decoder, with a differentiable whole-sequence
//!   [`Qwen2Vl::forward`] for training;
//! - [`nn`]: the `Linear`/`RmsNorm`/`LayerNorm` every projection and norm goes through;
//! - [`quantized`]: [`RolloutWeights`] (`f32`, `bf16`, `q8_0`, `q4k`) and
//!   [`Qwen2Vl::to_rollout`], the generation copy with quantized linears.
//! - [`bf16_gemm`]: the packed bf16 weight and its AVX-512 BF16 product (`bf16` rollouts).
//!
//! ```
//! use arpo_model::{Qwen2Vl, Qwen2VlConfig};
//! use candle_core::{DType, Device};
//!
//! # fn main() -> Result<(), arpo_model::ModelError> {
//! let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models");
//! let model = Qwen2Vl::load(&fixtures.join("tiny-qwen2vl"), DType::F32, &Device::Cpu)?;
//! let logits = model.forward(&[1, 2, 3], None, &[])?;
//! assert_eq!(logits.dims(), &[3, model.config.text.vocab_size]);
//!
//! // UI-TARS-1.5's architecture loads the same way.
//! let model = Qwen2Vl::load(&fixtures.join("tiny-qwen25vl"), DType::F32, &Device::Cpu)?;
//! assert!(model.config.is_qwen25());
//! # Ok(())
//! # }
//! ```

/// Declares `struct $name(())`, proof that this CPU has the listed x86-64 features: the only
/// way to make one is `$name::detect()`, which checks them at run time. Each of our kernel
/// modules reaches its `#[target_feature]` functions only through such a value. Defined before
/// the modules so that all of them see it.
#[cfg(target_arch = "x86_64")]
macro_rules! cpu_proof {
    ($(#[$doc:meta])* $vis:vis struct $name:ident: $($feature:tt),+) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy)]
        $vis struct $name(());

        impl $name {
            $vis fn detect() -> Option<Self> {
                let ok = $(is_x86_feature_detected!($feature))&&+;
                ok.then_some(Self(()))
            }
        }
    };
}

pub mod attention;
pub mod bf16_gemm;
pub mod chat;
pub mod config;
mod device;
mod error;
mod fused;
pub mod generate;
pub mod model;
pub mod nn;
pub mod policy;
pub mod prefix_cache;
pub mod processor;
pub mod q4_gemm;
pub mod q8_gemm;
pub mod quantized;
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
pub use prefix_cache::{PrefixCache, PrefixCacheStats};
pub use processor::{ImageProcessor, ProcessedImages};
pub use quantized::{RolloutSummary, RolloutWeights};
pub use rope::{RopeIndex, get_rope_index};
