//! The [`Engine`] over the candle UI-TARS model of `arpo-model`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use arpo_core::{ChatMessage, FinishReason, SamplingParams};
use arpo_model::generate::GenerationRequest;
use arpo_model::policy::UiTars;
use arpo_model::train::lora::LoraSet;
use arpo_model::weights::{Weights, canonical_name};
use arpo_model::{ModelError, Qwen2Vl};
use candle_core::{DType, Device};

use crate::engine::{
    Engine, EngineError, EngineFinish, EngineInfo, Finished, Flow, GeneratedToken, SequenceRequest,
    TokenPiece,
};
use crate::remote::byte_level_bytes;

/// Qwen2-VL's context window when `config.json` does not say.
const DEFAULT_MAX_CONTEXT: usize = 32768;

/// A loaded UI-TARS checkpoint served by [`crate::Server`].
///
/// LoRA adapters are merged into a copy of the base weights when loaded (one copy per
/// adapter, [`Engine::adapter_bytes`] each); a full-weights reload unloads every adapter (they
/// were merged into the old weights). `top_logprobs` alternatives come from one more forward
/// pass over prompt and answer (only for sequences that ask for them): the top-k of
/// `log_softmax(logits / temperature)` at each step, vision placeholders left out as the
/// sampler leaves them out. A batch's tokens reach the server when the batch is done.
#[derive(Debug)]
pub struct ModelEngine {
    base: RwLock<UiTars>,
    adapters: RwLock<HashMap<String, Arc<Qwen2Vl>>>,
    source: String,
    device: Device,
    dtype: DType,
    max_context: usize,
    /// Token id -> (literal text, special) of the tokenizer's added tokens.
    added: HashMap<u32, (String, bool)>,
    /// Bytes of one copy of the weights (what a merged adapter takes).
    model_bytes: u64,
    /// The prefix cache budget of each loaded set of weights (base, each merged adapter).
    prefix_cache_bytes: std::sync::atomic::AtomicUsize,
    /// How the served linears are stored (`serve --weights`). Not f32: adapters are attached
    /// unmerged (f32 low-rank paths) over the shared quantized base.
    weights: arpo_model::RolloutWeights,
}

fn model_bytes(model: &Qwen2Vl) -> u64 {
    model
        .parameters()
        .iter()
        .map(|(_, t)| (t.elem_count() as u64).saturating_mul(t.dtype().size_in_bytes() as u64))
        .fold(0u64, u64::saturating_add)
}

/// Token ids the sampler never picks (vision placeholders), as `generate` leaves them out.
fn placeholder_ids(model: &Qwen2Vl) -> Vec<u32> {
    let c = &model.config;
    [
        Some(c.image_token_id),
        c.video_token_id,
        Some(c.vision_start_token_id),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The `k` most likely tokens of one row of logits under `log_softmax(logits / temperature)`
/// (temperature 0 read as 1, as the sampler reports log-probs), best first, ties by id;
/// `excluded` ids are left out of the list but stay in the normalisation.
pub(crate) fn top_logprobs(
    logits: &[f32],
    temperature: f64,
    k: usize,
    excluded: &[u32],
) -> Vec<(u32, f32)> {
    if k == 0 || logits.is_empty() {
        return Vec::new();
    }
    let t = if temperature > 0.0 {
        temperature as f32
    } else {
        1.0
    };
    let max = logits
        .iter()
        .map(|l| l / t)
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|l| f64::from((l / t - max).exp())).sum();
    let log_z = max + sum.ln() as f32;
    let mut order: Vec<u32> = (0..logits.len() as u32)
        .filter(|id| !excluded.contains(id))
        .collect();
    order.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    order
        .into_iter()
        .take(k)
        .map(|id| (id, logits[id as usize] / t - log_z))
        .collect()
}

/// Per generated token, its `k` alternatives: one forward over prompt + answer.
fn alternatives(
    model: &Qwen2Vl,
    prompt: &GenerationRequest,
    generated: &[u32],
    temperature: f64,
    k: usize,
) -> Result<Vec<Vec<(u32, f32)>>, EngineError> {
    if generated.is_empty() || k == 0 {
        return Ok(vec![Vec::new(); generated.len()]);
    }
    let mut ids = prompt.input_ids.clone();
    ids.extend_from_slice(&generated[..generated.len() - 1]);
    let logits = model
        .forward(&ids, prompt.pixel_values.as_ref(), &prompt.grid_thw)
        .and_then(|l| {
            Ok(l.narrow(0, prompt.input_ids.len() - 1, generated.len())?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?)
        })
        .map_err(model_error)?;
    let excluded = placeholder_ids(model);
    Ok(logits
        .iter()
        .map(|row| top_logprobs(row, temperature, k, &excluded))
        .collect())
}

fn model_error(e: ModelError) -> EngineError {
    match e {
        ModelError::Image(_) | ModelError::Input(_) => EngineError::InvalidInput(e.to_string()),
        other => EngineError::Generation(other.to_string()),
    }
}

/// `--dtype` as named on the command line (`f32`, `bf16`, `f16`).
fn parse_dtype(dtype: &str) -> Result<DType, EngineError> {
    Ok(dtype
        .parse::<arpo_model::DTypeSpec>()
        .map_err(|e| EngineError::InvalidInput(e.to_string()))?
        .dtype())
}

/// `--device` as named on the command line (`cpu`, `cuda`, `cuda:N`), opened.
fn open_device(device: &str) -> Result<Device, EngineError> {
    device
        .parse::<arpo_model::DeviceSpec>()
        .map_err(|e| EngineError::InvalidInput(e.to_string()))?
        .open()
        .map_err(|e| EngineError::InvalidInput(e.to_string()))
}

impl ModelEngine {
    /// Loads a model directory, or a Hugging Face repo id from the local cache.
    pub fn load(model: &str, dtype: DType, device: &Device) -> Result<Self, EngineError> {
        let uitars = UiTars::load(model, dtype, device).map_err(|e| EngineError::Load {
            what: "the model".into(),
            path: model.into(),
            reason: e.to_string(),
        })?;
        Ok(Self::new(uitars, model.to_string()))
    }

    /// [`Self::load`] with the dtype (`f32`, `bf16`, `f16`) and device (`cpu`, `cuda`,
    /// `cuda:N`, the latter with candle's `cuda` feature) named as on the command line.
    pub fn load_named(model: &str, dtype: &str, device: &str) -> Result<Self, EngineError> {
        Self::load(model, parse_dtype(dtype)?, &open_device(device)?)
    }

    /// [`Self::load_named`] for `serve --weights`: a non-f32 `weights` loads the checkpoint
    /// straight into the rollout format ([`UiTars::load_rollout`]), one tensor at a time, so
    /// the f32 model never sits in memory; its activations are f32, so `dtype` must be `f32`.
    pub fn load_named_as(
        model: &str,
        dtype: &str,
        device: &str,
        weights: arpo_model::RolloutWeights,
    ) -> Result<Self, EngineError> {
        if weights == arpo_model::RolloutWeights::F32 {
            return Self::load_named(model, dtype, device);
        }
        let dtype = parse_dtype(dtype)?;
        if dtype != DType::F32 {
            return Err(EngineError::InvalidInput(format!(
                "--weights {weights} stores the linears as {weights} and computes in f32: \
                 leave --dtype at f32, or serve --weights f32 --dtype {dtype:?}"
            )));
        }
        let device = open_device(device)?;
        let uitars =
            UiTars::load_rollout(model, weights, &device).map_err(|e| EngineError::Load {
                what: format!("the model as {weights}"),
                path: model.into(),
                reason: e.to_string(),
            })?;
        let mut engine = Self::new(uitars, model.to_string());
        engine.weights = weights;
        Ok(engine)
    }

    /// Serves an already loaded model.
    pub fn new(uitars: UiTars, source: String) -> Self {
        let max_context = std::fs::read(uitars.dir.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| {
                v.get("max_position_embeddings")
                    .or_else(|| v.get("text_config")?.get("max_position_embeddings"))
                    .and_then(serde_json::Value::as_u64)
            })
            .map_or(DEFAULT_MAX_CONTEXT, |n| n as usize);
        let added = uitars
            .tokenizer
            .tokenizer()
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, token)| (id, (token.content.clone(), token.special)))
            .collect();
        Self {
            model_bytes: model_bytes(&uitars.model),
            device: uitars.model.device().clone(),
            dtype: uitars.model.dtype(),
            base: RwLock::new(uitars),
            adapters: RwLock::new(HashMap::new()),
            source,
            max_context,
            added,
            prefix_cache_bytes: std::sync::atomic::AtomicUsize::new(0),
            weights: arpo_model::RolloutWeights::F32,
        }
    }

    /// Turns on automatic prefix caching ([`arpo_model::prefix_cache`]) with `bytes` per
    /// loaded set of weights (the base and each merged adapter); 0 turns it off.
    pub fn with_prefix_cache(self, bytes: usize) -> Self {
        self.prefix_cache_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
        self.base().model.set_prefix_cache_budget(bytes);
        self
    }

    /// The base weights' prefix cache statistics.
    pub fn prefix_cache_stats(&self) -> arpo_model::PrefixCacheStats {
        self.base().model.prefix_cache.stats()
    }

    fn cache_budget(&self) -> usize {
        self.prefix_cache_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn base(&self) -> std::sync::RwLockReadGuard<'_, UiTars> {
        self.base
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn adapter_map(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Qwen2Vl>>> {
        self.adapters
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn adapter_map_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Qwen2Vl>>> {
        self.adapters
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Engine for ModelEngine {
    type Prompt = GenerationRequest;

    fn info(&self) -> EngineInfo {
        EngineInfo {
            model_source: self.source.clone(),
            device: format!("{:?}", self.device).to_lowercase(),
            max_context: self.max_context,
        }
    }

    fn prepare(
        &self,
        messages: &[ChatMessage],
        max_tokens: usize,
    ) -> Result<GenerationRequest, EngineError> {
        if messages.is_empty() {
            return Err(EngineError::InvalidInput(
                "the conversation has no messages".into(),
            ));
        }
        let request = self.base().prepare(messages).map_err(model_error)?;
        if request.input_ids.len().saturating_add(max_tokens) > self.max_context {
            return Err(EngineError::ContextTooLong {
                prompt_tokens: request.input_ids.len(),
                max_tokens,
                max_context: self.max_context,
            });
        }
        Ok(request)
    }

    fn prompt_tokens(&self, prompt: &GenerationRequest) -> usize {
        prompt.input_ids.len()
    }

    fn generate(
        &self,
        batch: &[SequenceRequest<'_, GenerationRequest>],
        on_token: &mut dyn FnMut(usize, &GeneratedToken) -> Flow,
    ) -> Vec<Result<Finished, EngineError>> {
        let mut results: Vec<Option<Result<Finished, EngineError>>> = vec![None; batch.len()];
        // The model samples a whole batch with one set of settings: group the sequences by
        // settings and adapter, one `generate` per group.
        let mut groups: Vec<(SamplingParams, Option<&str>, Vec<usize>)> = Vec::new();
        for (i, seq) in batch.iter().enumerate() {
            match groups
                .iter_mut()
                .find(|(s, a, _)| *s == seq.sampling && *a == seq.adapter)
            {
                Some(group) => group.2.push(i),
                None => groups.push((seq.sampling.clone(), seq.adapter, vec![i])),
            }
        }
        let base = self.base();
        for (sampling, adapter, members) in groups {
            let adapted = match adapter {
                None => None,
                Some(name) => match self.adapter_map().get(name).cloned() {
                    Some(model) => Some(model),
                    None => {
                        for &i in &members {
                            results[i] =
                                Some(Err(EngineError::UnknownAdapter { name: name.into() }));
                        }
                        continue;
                    }
                },
            };
            let model = adapted.as_deref().unwrap_or(&base.model);
            let requests: Vec<GenerationRequest> =
                members.iter().map(|&i| batch[i].prompt.clone()).collect();
            match model.generate(&requests, &sampling, &base.stop_ids) {
                Ok((generations, _)) => {
                    for (&i, generation) in members.iter().zip(generations) {
                        let mut finish = match generation.finish_reason {
                            FinishReason::Stop => EngineFinish::EndOfTurn,
                            FinishReason::Length => EngineFinish::Length,
                        };
                        let tops = match alternatives(
                            model,
                            batch[i].prompt,
                            &generation.token_ids,
                            sampling.temperature,
                            batch[i].top_logprobs,
                        ) {
                            Ok(tops) => tops,
                            Err(e) => {
                                results[i] = Some(Err(e));
                                continue;
                            }
                        };
                        for ((&id, &logprob), top) in generation
                            .token_ids
                            .iter()
                            .zip(&generation.logprobs)
                            .zip(tops)
                        {
                            let token = GeneratedToken { id, logprob, top };
                            if on_token(i, &token) == Flow::Stop {
                                finish = EngineFinish::Stopped;
                                break;
                            }
                        }
                        results[i] = Some(Ok(Finished {
                            reason: finish,
                            cached_prompt_tokens: generation.cached_tokens,
                        }));
                    }
                }
                Err(e) => {
                    let error = model_error(e);
                    for &i in &members {
                        results[i] = Some(Err(error.clone()));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(EngineError::Generation("sequence not generated".into())))
            })
            .collect()
    }

    fn token_piece(&self, id: u32) -> TokenPiece {
        if let Some((content, special)) = self.added.get(&id) {
            return TokenPiece {
                bytes: content.clone().into_bytes(),
                special: *special,
            };
        }
        let base = self.base();
        let tokenizer = base.tokenizer.tokenizer();
        let bytes = tokenizer
            .id_to_token(id)
            .and_then(|spelled| byte_level_bytes(&spelled))
            .or_else(|| tokenizer.decode(&[id], false).ok().map(String::into_bytes))
            .unwrap_or_default();
        TokenPiece {
            bytes,
            special: false,
        }
    }

    fn load_adapter(&self, name: &str, path: &Path) -> Result<(), EngineError> {
        let load_error = |reason: String| EngineError::Load {
            what: format!("lora adapter {name:?}"),
            path: path.display().to_string(),
            reason,
        };
        let set =
            LoraSet::load_peft(path, 0, &self.device).map_err(|e| load_error(e.to_string()))?;
        let base = self.base();
        if self.weights != arpo_model::RolloutWeights::F32 {
            // A quantized base cannot take a merge: the adapters ride on it unmerged.
            let mut model = base.model.clone();
            model.prefix_cache = Arc::new(arpo_model::PrefixCache::new(self.cache_budget()));
            let mut linears: HashMap<String, &mut arpo_model::nn::Linear> =
                model.linears_mut().into_iter().collect();
            for (module, adapter) in set.adapters() {
                let weight = canonical_name(&format!("{module}.weight"));
                let linear_name = weight.strip_suffix(".weight").unwrap_or(&weight);
                let Some(linear) = linears.get_mut(linear_name) else {
                    return Err(load_error(format!(
                        "it adapts {module}, which is not a linear layer of this model: is it an adapter of this base model?"
                    )));
                };
                linear.lora = Some(adapter.clone());
            }
            drop(linears);
            drop(base);
            self.adapter_map_mut()
                .insert(name.to_string(), Arc::new(model));
            return Ok(());
        }
        let mut weights: HashMap<String, candle_core::Tensor> =
            base.model.parameters().into_iter().collect();
        for (module, adapter) in set.adapters() {
            let name = canonical_name(&format!("{module}.weight"));
            let Some(w) = weights.get(&name) else {
                return Err(load_error(format!(
                    "it adapts {module}, which this model does not have: is it an adapter of this base model?"
                )));
            };
            let merged = adapter
                .merged_weight(w)
                .map_err(|e| load_error(format!("merging into {name}: {e}")))?;
            weights.insert(name, merged);
        }
        // `parameters()` gives the patch embedding as its 2-D `[embed, c*t*p*p]` view;
        // `from_weights` reads the checkpoint's 5-D Conv3d kernel.
        let vc = &base.model.config.vision;
        if let Some(pe) = weights.get_mut("visual.patch_embed.proj.weight") {
            *pe = pe
                .reshape((
                    vc.embed_dim,
                    vc.in_channels,
                    vc.temporal_patch_size,
                    vc.patch_size,
                    vc.patch_size,
                ))
                .map_err(|e| load_error(format!("reshaping the patch embedding: {e}")))?;
        }
        let model = Qwen2Vl::from_weights(base.model.config.clone(), Weights::from_map(weights))
            .map_err(|e| load_error(e.to_string()))?;
        model.set_prefix_cache_budget(self.cache_budget());
        drop(base);
        self.adapter_map_mut()
            .insert(name.to_string(), Arc::new(model));
        Ok(())
    }

    fn unload_adapter(&self, name: &str) -> Result<(), EngineError> {
        match self.adapter_map_mut().remove(name) {
            Some(_) => Ok(()),
            None => Err(EngineError::UnknownAdapter { name: name.into() }),
        }
    }

    fn adapters(&self) -> Vec<String> {
        let mut names: Vec<String> = self.adapter_map().keys().cloned().collect();
        names.sort();
        names
    }

    fn adapter_bytes(&self) -> u64 {
        if self.weights == arpo_model::RolloutWeights::F32 {
            self.model_bytes
        } else {
            // Unmerged over the shared base: only the low-rank matrices (a few MB).
            0
        }
    }

    fn reload_weights(&self, path: &Path) -> Result<(), EngineError> {
        let load_error = |e: arpo_model::ModelError| EngineError::Load {
            what: format!("model weights as {}", self.weights),
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let model = if self.weights == arpo_model::RolloutWeights::F32 {
            Qwen2Vl::load(path, self.dtype, &self.device).map_err(load_error)?
        } else {
            // Read and quantized a tensor at a time: no f32 copy beside the one being served.
            Qwen2Vl::load_rollout(path, self.weights, &self.device).map_err(load_error)?
        };
        // New weights, new cache: nothing computed with the old ones is reused.
        model.set_prefix_cache_budget(self.cache_budget());
        let mut base = self
            .base
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        base.model = model;
        drop(base);
        self.adapter_map_mut().clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::top_logprobs;

    #[test]
    fn top_logprobs_are_the_best_of_the_whole_softmax_without_excluded_ids() {
        // logits [0, ln 2, ln 3, ln 4]: softmax = [1, 2, 3, 4] / 10.
        let logits = [0.0, 2f32.ln(), 3f32.ln(), 4f32.ln()];
        let top = top_logprobs(&logits, 0.0, 2, &[3]);
        assert_eq!(top.len(), 2);
        assert_eq!((top[0].0, top[1].0), (2, 1));
        assert!((top[0].1 - 0.3f32.ln()).abs() < 1e-6, "{top:?}");
        assert!((top[1].1 - 0.2f32.ln()).abs() < 1e-6, "{top:?}");
        // Temperature 2: softmax of logits / 2 = sqrt([1, 2, 3, 4]) / sum.
        let z: f32 = [1f32, 2.0, 3.0, 4.0].iter().map(|x| x.sqrt()).sum();
        let top = top_logprobs(&logits, 2.0, 1, &[]);
        assert_eq!(top[0].0, 3);
        assert!((top[0].1 - (2.0 / z).ln()).abs() < 1e-6, "{top:?}");
        // Ties go to the lower id; asking for more than the vocabulary gives all of it.
        let top = top_logprobs(&[1.0, 1.0, 0.0], 1.0, 10, &[]);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![0, 1, 2]);
    }
}
