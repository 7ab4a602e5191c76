//! Trainable parameter sets of a [`Qwen2Vl`]: full fine-tuning (optionally with the vision
//! tower frozen), and saving the result as an HF-layout directory.
//!
//! [`Trainable::full`] swaps each trainable weight of the model for the tensor of an f32
//! [`Var`] (the model keeps computing with it; optimizer updates are visible to the model at
//! once). Frozen weights stay plain tensors: with the vision tower frozen, no vision op is
//! tracked at all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, Var};

use super::checkpoint::{CheckpointDir, TOKENIZER_FILES, load_safetensors};
use super::optim::AdamW;
use super::score::{Episode, EpisodeScore, score_episode};
use super::{Result, TrainError};
use crate::Qwen2Vl;
use crate::nn::{LayerNorm, Linear, RmsNorm};

/// Weights file of a full checkpoint.
pub const MODEL_WEIGHTS: &str = "model.safetensors";
/// Optimizer state file saved beside the weights.
pub const OPTIMIZER_STATE: &str = "optimizer.safetensors";

/// Calls `f(name, tensor)` for every parameter of `model`, mutably, with HF names in the classic
/// spelling. The tied output projection is not visited separately (see [`retie`]).
fn visit_params(
    model: &mut Qwen2Vl,
    f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>,
) -> Result<()> {
    fn lin(
        f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>,
        n: &str,
        l: &mut Linear,
    ) -> Result<()> {
        f(&format!("{n}.weight"), &mut l.weight)?;
        if let Some(b) = l.bias.as_mut() {
            f(&format!("{n}.bias"), b)?;
        }
        Ok(())
    }
    fn ln(
        f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>,
        n: &str,
        l: &mut LayerNorm,
    ) -> Result<()> {
        f(&format!("{n}.weight"), &mut l.weight)?;
        f(&format!("{n}.bias"), &mut l.bias)
    }
    fn rms(
        f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>,
        n: &str,
        l: &mut RmsNorm,
    ) -> Result<()> {
        f(&format!("{n}.weight"), &mut l.weight)
    }
    let v = &mut model.vision;
    f("visual.patch_embed.proj.weight", &mut v.patch_embed.weight)?;
    for (i, b) in v.blocks.iter_mut().enumerate() {
        let p = format!("visual.blocks.{i}");
        ln(f, &format!("{p}.norm1"), &mut b.norm1)?;
        ln(f, &format!("{p}.norm2"), &mut b.norm2)?;
        lin(f, &format!("{p}.attn.qkv"), &mut b.qkv)?;
        lin(f, &format!("{p}.attn.proj"), &mut b.proj)?;
        lin(f, &format!("{p}.mlp.fc1"), &mut b.fc1)?;
        lin(f, &format!("{p}.mlp.fc2"), &mut b.fc2)?;
    }
    ln(f, "visual.merger.ln_q", &mut v.ln_q)?;
    lin(f, "visual.merger.mlp.0", &mut v.merger_fc1)?;
    lin(f, "visual.merger.mlp.2", &mut v.merger_fc2)?;
    let t = &mut model.text;
    f("model.embed_tokens.weight", &mut t.embed_tokens)?;
    for (i, l) in t.layers.iter_mut().enumerate() {
        let p = format!("model.layers.{i}");
        lin(f, &format!("{p}.self_attn.q_proj"), &mut l.q_proj)?;
        lin(f, &format!("{p}.self_attn.k_proj"), &mut l.k_proj)?;
        lin(f, &format!("{p}.self_attn.v_proj"), &mut l.v_proj)?;
        lin(f, &format!("{p}.self_attn.o_proj"), &mut l.o_proj)?;
        lin(f, &format!("{p}.mlp.gate_proj"), &mut l.gate_proj)?;
        lin(f, &format!("{p}.mlp.up_proj"), &mut l.up_proj)?;
        lin(f, &format!("{p}.mlp.down_proj"), &mut l.down_proj)?;
        rms(f, &format!("{p}.input_layernorm"), &mut l.input_layernorm)?;
        rms(
            f,
            &format!("{p}.post_attention_layernorm"),
            &mut l.post_attention_layernorm,
        )?;
    }
    rms(f, "model.norm", &mut t.norm)?;
    if !t.tied {
        lin(f, "lm_head", &mut t.lm_head)?;
    }
    Ok(())
}

/// Points a tied output projection at the (possibly replaced) embedding table.
fn retie(model: &mut Qwen2Vl) {
    if model.text.tied {
        model.text.lm_head.weight = model.text.embed_tokens.clone();
    }
}

fn is_vision(name: &str) -> bool {
    name.starts_with("visual.")
}

/// A model with its trainable parameters.
#[derive(Debug)]
pub struct Trainable {
    /// The model; trainable weights are `Var` tensors.
    pub model: Qwen2Vl,
    vars: Vec<(String, Var)>,
    freeze_vision_tower: bool,
}

impl Trainable {
    /// Full fine-tuning: every weight trainable, except the vision tower's (patch embedding and
    /// blocks; the merger stays trainable) when `freeze_vision_tower`.
    ///
    /// Trainable weights are kept in f32 (AdamW moments take the parameter's dtype).
    pub fn full(mut model: Qwen2Vl, freeze_vision_tower: bool) -> Result<Self> {
        let mut vars = Vec::new();
        visit_params(&mut model, &mut |name, t| {
            let frozen =
                freeze_vision_tower && is_vision(name) && !name.starts_with("visual.merger.");
            if frozen {
                *t = t.detach();
                return Ok(());
            }
            let var = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
            *t = var.as_tensor().clone();
            vars.push((name.to_string(), var));
            Ok(())
        })?;
        retie(&mut model);
        Ok(Self {
            model,
            vars,
            freeze_vision_tower,
        })
    }

    /// The trainable variables by name (classic HF spelling), for the optimizer.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Whether the vision tower is frozen.
    pub fn freeze_vision_tower(&self) -> bool {
        self.freeze_vision_tower
    }

    /// Scores an episode (differentiable in the trainable parameters).
    pub fn score(&self, episode: &Episode) -> Result<EpisodeScore> {
        score_episode(&self.model, episode)
    }

    /// Every weight of the model, in the checkpoint layout (`visual.patch_embed.proj.weight` as
    /// the 5-D Conv3d kernel).
    pub fn state_dict(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        let vc = &self.model.config.vision;
        for (name, t) in self.model.parameters() {
            let t = if name == "visual.patch_embed.proj.weight" {
                t.reshape((
                    vc.embed_dim,
                    vc.in_channels,
                    vc.temporal_patch_size,
                    vc.patch_size,
                    vc.patch_size,
                ))?
            } else {
                t
            };
            out.insert(name, t.detach());
        }
        Ok(out)
    }

    /// Saves an HF-layout directory at `dest` (atomically): `model.safetensors`, `config.json`
    /// and the tokenizer/processor files copied from `source_dir` (the model the run started
    /// from), plus `optimizer.safetensors` when an optimizer is given.
    pub fn save(
        &self,
        dest: &Path,
        source_dir: &Path,
        optimizer: Option<&AdamW>,
    ) -> Result<PathBuf> {
        let ck = CheckpointDir::begin(dest)?;
        ck.write_safetensors(MODEL_WEIGHTS, &self.state_dict()?, &BTreeMap::new())?;
        let copied = ck.copy_existing(source_dir, &["config.json"])?;
        if copied.is_empty() {
            return Err(TrainError::Config(format!(
                "{} has no config.json to copy into the checkpoint",
                source_dir.display()
            )));
        }
        ck.copy_existing(source_dir, TOKENIZER_FILES)?;
        if let Some(opt) = optimizer {
            let state: BTreeMap<String, Tensor> = opt.state_tensors()?.into_iter().collect();
            ck.write_safetensors(OPTIMIZER_STATE, &state, &BTreeMap::new())?;
        }
        ck.commit()
    }

    /// Loads optimizer state saved by [`Trainable::save`] into `optimizer`.
    pub fn load_optimizer(dir: &Path, optimizer: &mut AdamW) -> Result<()> {
        let state = load_safetensors(&dir.join(OPTIMIZER_STATE), &candle_core::Device::Cpu)?;
        optimizer.load_state_tensors(&state)
    }
}
