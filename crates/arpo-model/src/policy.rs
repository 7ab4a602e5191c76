//! A loaded UI-TARS checkpoint ([`UiTars`]: model, tokenizer, image processor) and the local
//! [`Policy`] over it ([`LocalPolicy`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use arpo_core::protocol::{PromptConfig, build_messages};
use arpo_core::{AgentContext, ChatMessage, Policy, PolicyError, Response, SamplingParams};
use async_trait::async_trait;
use candle_core::{DType, Device, Tensor};

use crate::chat::ChatTokenizer;
use crate::config::{GenerationConfig, PreprocessorConfig};
use crate::error::{ModelError, Result};
use crate::generate::{GenerationRequest, GenerationTimings};
use crate::model::Qwen2Vl;
use crate::processor::{ImageProcessor, decode_screenshot};
use crate::weights::resolve_model_dir;

/// A checkpoint ready to answer chats.
#[derive(Debug)]
pub struct UiTars {
    pub model: Qwen2Vl,
    pub tokenizer: ChatTokenizer,
    pub processor: ImageProcessor,
    /// `<|im_end|>` and the config's EOS ids.
    pub stop_ids: Vec<u32>,
    pub dir: PathBuf,
}

/// Timings of one batch, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimings {
    /// Decoding and preprocessing images, tokenizing.
    pub preprocess_s: f64,
    pub generation: GenerationTimings,
}

impl UiTars {
    /// Loads a model directory or a Hugging Face repo id from the local cache (offline).
    pub fn load(model: &str, dtype: DType, device: &Device) -> Result<Self> {
        let dir = resolve_model_dir(model)?;
        Self::load_dir(&dir, dtype, device)
    }

    pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::with_model(dir, Qwen2Vl::load(dir, dtype, device)?)
    }

    /// Loads a model directory or cached repo id straight into a rollout copy in `weights`
    /// ([`Qwen2Vl::load_rollout`]: quantized as read, the f32 model never in memory).
    pub fn load_rollout(
        model: &str,
        weights: crate::RolloutWeights,
        device: &Device,
    ) -> Result<Self> {
        let dir = resolve_model_dir(model)?;
        Self::with_model(&dir, Qwen2Vl::load_rollout(&dir, weights, device)?)
    }

    /// The tokenizer, image processor and stop ids of `dir` around an already built `model`.
    fn with_model(dir: &Path, model: Qwen2Vl) -> Result<Self> {
        let tokenizer = ChatTokenizer::from_dir(dir)?;
        let pre = dir.join("preprocessor_config.json");
        let processor = ImageProcessor::new(if pre.exists() {
            PreprocessorConfig::from_file(&pre)?
        } else {
            PreprocessorConfig::default()
        });
        let mut stop_ids = vec![tokenizer.im_end_id];
        stop_ids.extend(&model.config.eos_token_ids);
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            stop_ids.extend(GenerationConfig::from_file(&gen_path)?.eos_token_ids);
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Self {
            model,
            tokenizer,
            processor,
            stop_ids,
            dir: dir.to_path_buf(),
        })
    }

    /// Decodes and preprocesses the images of `messages` and tokenizes them into one request.
    pub fn prepare(&self, messages: &[ChatMessage]) -> Result<GenerationRequest> {
        let images = messages
            .iter()
            .flat_map(|m| m.images())
            .map(decode_screenshot)
            .collect::<Result<Vec<_>>>()?;
        let (pixel_values, grid_thw, counts): (Option<Tensor>, Vec<[usize; 3]>, Vec<usize>) =
            if images.is_empty() {
                (None, Vec::new(), Vec::new())
            } else {
                let p = self.processor.preprocess(&images, self.model.device())?;
                let counts = p.tokens_per_image(self.processor.config.merge_size);
                (Some(p.pixel_values), p.grid_thw, counts)
            };
        let chat = self.tokenizer.encode_chat(messages, &counts, true)?;
        Ok(GenerationRequest {
            input_ids: chat.ids,
            pixel_values,
            grid_thw,
        })
    }

    /// Answers a batch of chats.
    pub fn respond(
        &self,
        chats: &[Vec<ChatMessage>],
        sampling: &SamplingParams,
    ) -> Result<(Vec<Response>, StepTimings)> {
        let start = Instant::now();
        let requests = chats
            .iter()
            .map(|m| self.prepare(m))
            .collect::<Result<Vec<_>>>()?;
        let preprocess_s = start.elapsed().as_secs_f64();
        let (gens, generation) = self.model.generate(&requests, sampling, &self.stop_ids)?;
        let responses = gens
            .into_iter()
            .map(|g| {
                Ok(Response {
                    text: self.tokenizer.decode(&g.token_ids)?,
                    token_ids: g.token_ids,
                    logprobs: g.logprobs,
                    finish_reason: g.finish_reason,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((
            responses,
            StepTimings {
                preprocess_s,
                generation,
            },
        ))
    }
}

/// The in-process candle policy: builds the UI-TARS prompt with
/// [`arpo_core::protocol::build_messages`] and generates with [`UiTars`].
///
/// `act` computes on the calling thread (generation is CPU/GPU-bound): call it from a
/// blocking-friendly context (`tokio::task::spawn_blocking`, a dedicated thread).
#[derive(Debug)]
pub struct LocalPolicy {
    pub model: UiTars,
    pub prompt: PromptConfig,
}

impl LocalPolicy {
    pub fn new(model: UiTars, prompt: PromptConfig) -> Self {
        Self { model, prompt }
    }
}

fn to_policy_error(e: ModelError) -> PolicyError {
    match e {
        ModelError::Image(_) | ModelError::Input(_) => PolicyError::InvalidInput(e.to_string()),
        other => PolicyError::Generation(other.to_string()),
    }
}

#[async_trait]
impl Policy for LocalPolicy {
    async fn act(
        &self,
        contexts: &[AgentContext],
        sampling: &SamplingParams,
    ) -> std::result::Result<Vec<Response>, PolicyError> {
        let chats: Vec<Vec<ChatMessage>> = contexts
            .iter()
            .map(|c| build_messages(c, &self.prompt))
            .collect();
        self.model
            .respond(&chats, sampling)
            .map(|(r, _)| r)
            .map_err(to_policy_error)
    }

    fn describe(&self) -> String {
        format!("candle UI-TARS at {}", self.model.dir.display())
    }
}
