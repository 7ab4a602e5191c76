//! The whole Qwen2-VL / Qwen2.5-VL model: vision tower + decoder, image features merged into the
//! text.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::{Qwen2VlConfig, VisionArch};
use crate::error::{ModelError, Result};
use crate::prefix_cache::PrefixCache;
use crate::rope::{RopeIndex, get_rope_index, inv_freq, mrope_cos_sin};
use crate::text::{KeyMask, TextModel};
use crate::vision::VisionTower;
use crate::weights::{CONFIG_FILE, Weights};

/// Qwen2-VL (`Qwen2VLForConditionalGeneration`) or Qwen2.5-VL
/// (`Qwen2_5_VLForConditionalGeneration`, after [`crate::config::VisionArch`]) on candle.
#[derive(Debug, Clone)]
pub struct Qwen2Vl {
    pub config: Qwen2VlConfig,
    pub vision: VisionTower,
    pub text: TextModel,
    pub(crate) inv_freq: Vec<f32>,
    /// Keys/values of prompt blocks and vision features kept between [`Qwen2Vl::generate`]
    /// calls ([`crate::prefix_cache`]); off (a budget of 0) until
    /// [`Qwen2Vl::set_prefix_cache_budget`]. Clones share it, as they share the weights.
    pub prefix_cache: std::sync::Arc<PrefixCache>,
}

impl Qwen2Vl {
    /// Loads `config.json` and the safetensors weights of a local model directory.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = Qwen2VlConfig::from_file(&dir.join(CONFIG_FILE))?;
        let weights = Weights::load_dir(dir, dtype, device)?;
        Self::from_weights(config, weights)
    }

    /// Builds the model from named tensors (either weight spelling).
    pub fn from_weights(config: Qwen2VlConfig, mut weights: Weights) -> Result<Self> {
        let vision = VisionTower::load(&config.vision, &mut weights)?;
        let text = TextModel::load(&config.text, &mut weights)?;
        let left = weights.remaining();
        if !left.is_empty() {
            tracing::warn!(count = left.len(), first = %left[0], "unused weights in the checkpoint");
        }
        let inv_freq = inv_freq(config.text.head_dim(), config.text.rope_theta);
        Ok(Self {
            config,
            vision,
            text,
            inv_freq,
            prefix_cache: std::sync::Arc::new(PrefixCache::new(0)),
        })
    }

    /// Sets the prefix cache's byte budget (0 turns caching off; entries beyond it are
    /// evicted).
    pub fn set_prefix_cache_budget(&self, bytes: usize) {
        self.prefix_cache.set_budget(bytes);
    }

    /// A model of shape `config` with N(0, 0.02) weights (unit norms): for benchmarks.
    pub fn random(config: Qwen2VlConfig, dtype: DType, device: &Device) -> Result<Self> {
        let shapes = param_shapes(&config);
        let mut map = std::collections::HashMap::new();
        for (name, shape) in shapes {
            let t = if name.contains("norm") || name.contains("ln_q") {
                if name.ends_with(".bias") {
                    Tensor::zeros(shape.as_slice(), dtype, device)?
                } else {
                    Tensor::ones(shape.as_slice(), dtype, device)?
                }
            } else {
                Tensor::randn(0f32, 0.02, shape.as_slice(), device)?.to_dtype(dtype)?
            };
            map.insert(name, t);
        }
        Self::from_weights(config, Weights::from_map(map))
    }

    /// Like [`Qwen2Vl::random`], reproducibly: N(0, 0.02) weights drawn from a ChaCha8
    /// generator seeded with `seed` (parameters in name order), norms at 1, biases at 0.
    pub fn random_seeded(
        config: Qwen2VlConfig,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        let mut shapes = param_shapes(&config);
        shapes.sort();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut map = std::collections::HashMap::new();
        for (name, shape) in shapes {
            let t = if name.contains("norm") || name.contains("ln_q") {
                if name.ends_with(".bias") {
                    Tensor::zeros(shape.as_slice(), dtype, device)?
                } else {
                    Tensor::ones(shape.as_slice(), dtype, device)?
                }
            } else if name.ends_with(".bias") {
                Tensor::zeros(shape.as_slice(), dtype, device)?
            } else {
                let n: usize = shape.iter().product();
                // Box-Muller: two uniforms in (0, 1] give one standard normal.
                let values: Vec<f32> = (0..n)
                    .map(|_| {
                        let u1: f64 = 1.0 - rng.random::<f64>();
                        let u2: f64 = rng.random::<f64>();
                        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                        (0.02 * z) as f32
                    })
                    .collect();
                Tensor::from_vec(values, shape.as_slice(), device)?.to_dtype(dtype)?
            };
            map.insert(name, t);
        }
        Self::from_weights(config, Weights::from_map(map))
    }

    pub fn device(&self) -> &Device {
        self.text.embed_tokens.device()
    }

    pub fn dtype(&self) -> DType {
        self.text.embed_tokens.dtype()
    }

    /// Every parameter as `(HF name, tensor)`, classic spelling (`model.layers.*`, `visual.*`).
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        self.vision.parameters(&mut out);
        self.text.parameters(&mut out);
        out
    }

    /// Vision features `[image tokens, hidden]` of all images.
    pub fn image_features(&self, pixel_values: &Tensor, grid_thw: &[[usize; 3]]) -> Result<Tensor> {
        Ok(self.vision.forward(pixel_values, grid_thw, false)?)
    }

    /// Whether no tensor of the vision tower is trained (LoRA on the decoder, a frozen tower).
    pub fn vision_is_frozen(&self) -> bool {
        let v = &self.vision;
        v.blocks.iter().all(|b| b.trainable_tensors().is_empty())
            && [&v.patch_embed, &v.merger_fc1, &v.merger_fc2]
                .iter()
                .all(|l| crate::nn::trainable_of_linear(l).is_empty())
            && v.ln_q.tensors().iter().all(|(_, t)| !t.is_variable())
    }

    /// Features of a frozen vision tower on the training path: no gradient can flow into it,
    /// so it runs as inference (no graph kept: ten 1920x1080 screenshots would otherwise hold
    /// every block's activations, tens of GB), one image at a time (attention never crosses
    /// images), and the result is a constant of the graph.
    fn frozen_image_features(
        &self,
        pixel_values: &Tensor,
        grid_thw: &[[usize; 3]],
    ) -> Result<Tensor> {
        let mut features = Vec::with_capacity(grid_thw.len());
        let mut row = 0;
        for g in grid_thw {
            let patches = g[0] * g[1] * g[2];
            let pv = pixel_values.narrow(0, row, patches)?;
            features.push(
                self.vision
                    .forward(&pv, std::slice::from_ref(g), true)?
                    .detach(),
            );
            row += patches;
        }
        Ok(Tensor::cat(&features, 0)?)
    }

    /// M-RoPE position ids of one sequence.
    pub fn rope_index(&self, input_ids: &[u32], grid_thw: &[[usize; 3]]) -> Result<RopeIndex> {
        get_rope_index(
            input_ids,
            self.config.image_token_id,
            grid_thw,
            self.config.vision.spatial_merge_size,
        )
    }

    /// Text embeddings `[len, hidden]` of one sequence with its image tokens replaced, in order,
    /// by the rows of `features` (a gather from `[text; features]`, so differentiable in both).
    pub fn merge_embeddings(&self, input_ids: &[u32], features: Option<&Tensor>) -> Result<Tensor> {
        let text = self.text.embed(input_ids)?;
        let n_image = input_ids
            .iter()
            .filter(|&&t| t == self.config.image_token_id)
            .count();
        let n_feat = match features {
            Some(f) => f.dim(0)?,
            None => 0,
        };
        if n_image != n_feat {
            return Err(ModelError::Input(format!(
                "the prompt has {n_image} image tokens but the images give {n_feat} features"
            )));
        }
        let Some(features) = features else {
            return Ok(text);
        };
        let len = input_ids.len() as u32;
        let mut k = 0u32;
        let idx: Vec<u32> = input_ids
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                if t == self.config.image_token_id {
                    k += 1;
                    len + k - 1
                } else {
                    i as u32
                }
            })
            .collect();
        let table = Tensor::cat(&[&text, &features.to_dtype(text.dtype())?], 0)?;
        let idx = Tensor::from_vec(idx, input_ids.len(), text.device())?;
        Ok(table.index_select(&idx, 0)?)
    }

    /// The whole-sequence forward without KV cache: logits `[len, vocab]` at every position.
    ///
    /// Built only from ops with a backward (differentiable in every parameter): the path the
    /// trainer scores episodes with. `pixel_values` `[patches, c*t*p*p]` and `grid_thw` as the
    /// image processor gives them; the image tokens of `input_ids` must match `grid_thw`.
    pub fn forward(
        &self,
        input_ids: &[u32],
        pixel_values: Option<&Tensor>,
        grid_thw: &[[usize; 3]],
    ) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, pixel_values, grid_thw, false)?;
        Ok(self.text.logits(&hidden)?.squeeze(0)?)
    }

    /// Final-normed hidden states `[1, len, hidden]` of the whole sequence.
    pub fn forward_hidden(
        &self,
        input_ids: &[u32],
        pixel_values: Option<&Tensor>,
        grid_thw: &[[usize; 3]],
        fused: bool,
    ) -> Result<Tensor> {
        if input_ids.is_empty() {
            return Err(ModelError::Input("empty input_ids".into()));
        }
        let features = match pixel_values {
            Some(pv) if !grid_thw.is_empty() && !fused && self.vision_is_frozen() => {
                Some(self.frozen_image_features(pv, grid_thw)?)
            }
            Some(pv) if !grid_thw.is_empty() => Some(self.vision.forward(pv, grid_thw, fused)?),
            _ => None,
        };
        let x = self
            .merge_embeddings(input_ids, features.as_ref())?
            .unsqueeze(0)?;
        let rope = self.rope_index(input_ids, grid_thw)?;
        let (cos, sin) = mrope_cos_sin(
            &[rope.positions],
            &self.inv_freq,
            &self.config.text.mrope_section,
            self.device(),
        )?;
        Ok(self
            .text
            .forward_hidden(&x, &cos, &sin, &KeyMask::causal(), None, fused)?)
    }
}

/// Names and shapes of every weight of a checkpoint with this config (classic spelling; no
/// `lm_head` when tied).
pub fn param_shapes(c: &Qwen2VlConfig) -> Vec<(String, Vec<usize>)> {
    let mut v = Vec::new();
    let vc = &c.vision;
    let e = vc.embed_dim;
    v.push((
        "visual.patch_embed.proj.weight".to_string(),
        vec![
            e,
            vc.in_channels,
            vc.temporal_patch_size,
            vc.patch_size,
            vc.patch_size,
        ],
    ));
    let layer_norm = matches!(vc.arch, VisionArch::Qwen2Vl);
    let f = vc.mlp_dim();
    let mlp: &[(&str, usize, usize)] = if layer_norm {
        &[("mlp.fc1", f, e), ("mlp.fc2", e, f)]
    } else {
        &[
            ("mlp.gate_proj", f, e),
            ("mlp.up_proj", f, e),
            ("mlp.down_proj", e, f),
        ]
    };
    for i in 0..vc.depth {
        let p = format!("visual.blocks.{i}");
        for n in ["norm1", "norm2"] {
            v.push((format!("{p}.{n}.weight"), vec![e]));
            if layer_norm {
                v.push((format!("{p}.{n}.bias"), vec![e]));
            }
        }
        for &(n, o, inp) in [("attn.qkv", 3 * e, e), ("attn.proj", e, e)]
            .iter()
            .chain(mlp)
        {
            v.push((format!("{p}.{n}.weight"), vec![o, inp]));
            v.push((format!("{p}.{n}.bias"), vec![o]));
        }
    }
    let m = vc.spatial_merge_size * vc.spatial_merge_size * e;
    v.push(("visual.merger.ln_q.weight".into(), vec![e]));
    if layer_norm {
        v.push(("visual.merger.ln_q.bias".into(), vec![e]));
    }
    v.push(("visual.merger.mlp.0.weight".into(), vec![m, m]));
    v.push(("visual.merger.mlp.0.bias".into(), vec![m]));
    v.push(("visual.merger.mlp.2.weight".into(), vec![vc.hidden_size, m]));
    v.push(("visual.merger.mlp.2.bias".into(), vec![vc.hidden_size]));
    let t = &c.text;
    let (h, i) = (t.hidden_size, t.intermediate_size);
    let (nq, nkv) = (
        t.num_attention_heads * t.head_dim(),
        t.num_key_value_heads * t.head_dim(),
    );
    v.push(("model.embed_tokens.weight".into(), vec![t.vocab_size, h]));
    for l in 0..t.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (n, o, inp, bias) in [
            ("self_attn.q_proj", nq, h, true),
            ("self_attn.k_proj", nkv, h, true),
            ("self_attn.v_proj", nkv, h, true),
            ("self_attn.o_proj", h, nq, false),
            ("mlp.gate_proj", i, h, false),
            ("mlp.up_proj", i, h, false),
            ("mlp.down_proj", h, i, false),
        ] {
            v.push((format!("{p}.{n}.weight"), vec![o, inp]));
            if bias {
                v.push((format!("{p}.{n}.bias"), vec![o]));
            }
        }
        v.push((format!("{p}.input_layernorm.weight"), vec![h]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    }
    v.push(("model.norm.weight".into(), vec![h]));
    if !t.tie_word_embeddings {
        v.push(("lm_head.weight".into(), vec![t.vocab_size, h]));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(c: &Qwen2VlConfig, prefix: &str) -> usize {
        param_shapes(c)
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// The 7B shape against the published checkpoint: Qwen2.5-VL-7B-Instruct's (and so
    /// UI-TARS-1.5-7B's) `model.safetensors.index.json` gives a total_size of 16,584,333,312
    /// bytes in bf16, i.e. 8,292,166,656 parameters.
    #[test]
    fn ui_tars_15_7b_shape_has_the_published_parameter_count() {
        let c = Qwen2VlConfig::ui_tars_15_7b();
        assert_eq!(count(&c, ""), 16_584_333_312 / 2);
        assert_eq!(count(&c, "visual."), 676_550_144);
        // Qwen2.5-VL blocks: RMSNorm without bias, gated MLP with biases.
        let names: Vec<String> = param_shapes(&c).into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"visual.blocks.31.mlp.up_proj.bias".to_string()));
        assert!(
            !names
                .iter()
                .any(|n| n.ends_with("norm1.bias") || n.contains("fc1"))
        );
        assert!(names.contains(&"lm_head.weight".to_string()));
    }
}
