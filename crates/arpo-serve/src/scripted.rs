//! A deterministic stand-in [`Engine`] for tests and benchmarks of the server itself.
//!
//! It is not a model: it answers every prompt with a UI-TARS-shaped response whose click point
//! is a hash of the prompt (greedy) or drawn from the seed (sampling), one byte per token, and
//! fixed log-probs. It lets the HTTP layer, the batching scheduler and the remote policy be
//! tested with exact expected outputs, without weights.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use arpo_core::{ChatMessage, ContentPart};

use crate::engine::{
    Engine, EngineError, EngineFinish, EngineInfo, Finished, Flow, GeneratedToken, SequenceRequest,
    TokenPiece,
};

/// Token id of `<|im_end|>` in the scripted vocabulary (ids 0..=255 are the bytes).
pub const IM_END: u32 = 256;
/// Token id of `<|endoftext|>` in the scripted vocabulary.
pub const END_OF_TEXT: u32 = 257;

/// A prompt of the scripted engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptedPrompt {
    pub digest: u64,
    pub images: usize,
    pub tokens: usize,
}

/// The deterministic stand-in engine (see the module docs).
#[derive(Debug)]
pub struct ScriptedEngine {
    max_context: usize,
    step_cost: Duration,
    adapter_bytes: u64,
    state: Mutex<ScriptedState>,
}

#[derive(Debug, Default)]
struct ScriptedState {
    adapters: HashMap<String, String>,
    weights_version: u32,
    batch_sizes: Vec<usize>,
}

impl Default for ScriptedEngine {
    fn default() -> Self {
        Self::new(4096)
    }
}

impl ScriptedEngine {
    pub fn new(max_context: usize) -> Self {
        Self {
            max_context,
            step_cost: Duration::ZERO,
            adapter_bytes: 0,
            state: Mutex::new(ScriptedState::default()),
        }
    }

    /// Sleeps this long per decoding step of a batch, whatever the batch size (a decode step
    /// of a memory-bound model costs about the same for 1 or 16 sequences).
    pub fn with_step_cost(mut self, step_cost: Duration) -> Self {
        self.step_cost = step_cost;
        self
    }

    /// Reports this many bytes per loaded adapter (for the server's adapter memory bound).
    pub fn with_adapter_bytes(mut self, bytes: u64) -> Self {
        self.adapter_bytes = bytes;
        self
    }

    /// The path the adapter `name` was loaded from, as the server received it.
    pub fn adapter_path(&self, name: &str) -> Option<String> {
        self.lock().adapters.get(name).cloned()
    }

    /// The sizes of the batches `generate` was called with, in order.
    pub fn batch_sizes(&self) -> Vec<usize> {
        self.lock().batch_sizes.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ScriptedState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Image tokens of a `width`×`height` image: one per 28×28 block (at least one).
    pub fn image_tokens(width: u32, height: u32) -> usize {
        (width.div_ceil(28).max(1) as usize) * (height.div_ceil(28).max(1) as usize)
    }

    /// The full answer text for a sequence, as the scripted engine writes it.
    pub fn answer_text(
        prompt: &ScriptedPrompt,
        seed: Option<u64>,
        temperature: f64,
        adapter: Option<&str>,
        weights_version: u32,
    ) -> String {
        let mut h = prompt.digest;
        if temperature > 0.0 {
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0)
            });
            h = splitmix64(h ^ splitmix64(seed));
        }
        let x = h % 1000;
        let y = (h / 1000) % 1000;
        let adapter = adapter.map(|a| format!(" with {a}")).unwrap_or_default();
        let version = if weights_version > 0 {
            format!(" v{weights_version}")
        } else {
            String::new()
        };
        format!(
            "Thought: I see {} screenshot(s){adapter}{version}.\nAction: click(start_box='({x},{y})')",
            prompt.images
        )
    }

    /// The log-prob the scripted engine gives the `step`-th generated token.
    pub fn logprob_at(step: usize) -> f32 {
        -0.125 * ((step % 4) as f32 + 1.0)
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fnv1a(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= u64::from(*b);
        *h = h.wrapping_mul(0x0100_0000_01b3);
    }
}

impl Engine for ScriptedEngine {
    type Prompt = ScriptedPrompt;

    fn info(&self) -> EngineInfo {
        EngineInfo {
            model_source: "scripted".into(),
            device: "cpu".into(),
            max_context: self.max_context,
        }
    }

    fn prepare(
        &self,
        messages: &[ChatMessage],
        max_tokens: usize,
    ) -> Result<ScriptedPrompt, EngineError> {
        if messages.is_empty() {
            return Err(EngineError::InvalidInput(
                "the conversation has no messages".into(),
            ));
        }
        let mut digest = 0xcbf2_9ce4_8422_2325_u64;
        let mut tokens = 0;
        let mut images = 0;
        for m in messages {
            fnv1a(&mut digest, m.role.as_str().as_bytes());
            tokens += m.role.as_str().len() + 2;
            for part in &m.content {
                match part {
                    ContentPart::Text { text } => {
                        fnv1a(&mut digest, text.as_bytes());
                        tokens += text.len();
                    }
                    ContentPart::Image { image } => {
                        fnv1a(&mut digest, &image.bytes);
                        tokens += Self::image_tokens(image.width, image.height) + 2;
                        images += 1;
                    }
                }
            }
        }
        if tokens.saturating_add(max_tokens) > self.max_context {
            return Err(EngineError::ContextTooLong {
                prompt_tokens: tokens,
                max_tokens,
                max_context: self.max_context,
            });
        }
        Ok(ScriptedPrompt {
            digest,
            images,
            tokens,
        })
    }

    fn prompt_tokens(&self, prompt: &ScriptedPrompt) -> usize {
        prompt.tokens
    }

    fn generate(
        &self,
        batch: &[SequenceRequest<'_, ScriptedPrompt>],
        on_token: &mut dyn FnMut(usize, &GeneratedToken) -> Flow,
    ) -> Vec<Result<Finished, EngineError>> {
        let version = {
            let mut state = self.lock();
            state.batch_sizes.push(batch.len());
            state.weights_version
        };
        let mut plans = Vec::with_capacity(batch.len());
        let mut results: Vec<Option<Result<EngineFinish, EngineError>>> = vec![None; batch.len()];
        for (i, seq) in batch.iter().enumerate() {
            if let Some(name) = seq.adapter
                && !self.lock().adapters.contains_key(name)
            {
                results[i] = Some(Err(EngineError::UnknownAdapter { name: name.into() }));
            }
            let text = Self::answer_text(
                seq.prompt,
                seq.sampling.seed,
                seq.sampling.temperature,
                seq.adapter,
                version,
            );
            let mut ids: Vec<u32> = text.bytes().map(u32::from).collect();
            ids.push(IM_END);
            plans.push(ids);
        }
        let mut step = 0;
        loop {
            let mut any = false;
            for (i, seq) in batch.iter().enumerate() {
                if results[i].is_some() {
                    continue;
                }
                if step >= seq.sampling.max_tokens {
                    results[i] = Some(Ok(EngineFinish::Length));
                    continue;
                }
                let Some(&id) = plans[i].get(step) else {
                    results[i] = Some(Ok(EngineFinish::EndOfTurn));
                    continue;
                };
                any = true;
                let logprob = Self::logprob_at(step);
                let top = (0..seq.top_logprobs as u32)
                    .map(|k| {
                        if k == 0 {
                            (id, logprob)
                        } else {
                            ((id + k) % 256, logprob - k as f32)
                        }
                    })
                    .collect();
                let token = GeneratedToken { id, logprob, top };
                if on_token(i, &token) == Flow::Stop {
                    results[i] = Some(Ok(EngineFinish::Stopped));
                } else if id == IM_END {
                    results[i] = Some(Ok(EngineFinish::EndOfTurn));
                }
            }
            if !any {
                break;
            }
            step += 1;
            if !self.step_cost.is_zero() {
                std::thread::sleep(self.step_cost);
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Ok(EngineFinish::EndOfTurn)).map(Finished::from))
            .collect()
    }

    fn token_piece(&self, id: u32) -> TokenPiece {
        match id {
            0..=255 => TokenPiece {
                bytes: vec![id as u8],
                special: false,
            },
            IM_END => TokenPiece {
                bytes: b"<|im_end|>".to_vec(),
                special: true,
            },
            _ => TokenPiece {
                bytes: b"<|endoftext|>".to_vec(),
                special: true,
            },
        }
    }

    fn load_adapter(&self, name: &str, path: &Path) -> Result<(), EngineError> {
        if !path.join("adapter_config.json").is_file() {
            return Err(EngineError::Load {
                what: format!("lora adapter {name:?}"),
                path: path.display().to_string(),
                reason: "no adapter_config.json there (expected a PEFT adapter directory)".into(),
            });
        }
        self.lock()
            .adapters
            .insert(name.to_string(), path.display().to_string());
        Ok(())
    }

    fn unload_adapter(&self, name: &str) -> Result<(), EngineError> {
        match self.lock().adapters.remove(name) {
            Some(_) => Ok(()),
            None => Err(EngineError::UnknownAdapter { name: name.into() }),
        }
    }

    fn adapters(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lock().adapters.keys().cloned().collect();
        names.sort();
        names
    }

    fn adapter_bytes(&self) -> u64 {
        self.adapter_bytes
    }

    fn reload_weights(&self, path: &Path) -> Result<(), EngineError> {
        if !path.join("config.json").is_file() {
            return Err(EngineError::Load {
                what: "model weights".into(),
                path: path.display().to_string(),
                reason: "no config.json there (expected a checkpoint directory in HF layout)"
                    .into(),
            });
        }
        self.lock().weights_version += 1;
        Ok(())
    }
}
