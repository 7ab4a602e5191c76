//! Trainable parameter sets of a [`Qwen2Vl`]: LoRA adapters on a frozen base, or full
//! fine-tuning (optionally with the vision tower frozen); saving as an HF-layout directory or a
//! PEFT adapter.
//!
//! [`Trainable::lora`] attaches adapters to the targeted [`Linear`] layers (the model's forward
//! adds their contribution) and detaches every base weight: the frozen projections run through
//! [`super::ops::linear`], so they cost no weight gradient and have no `GradStore` entry.
//!
//! [`Trainable::full`] swaps each trainable weight of the model for the tensor of an f32
//! [`Var`] (the model keeps computing with it; optimizer updates are visible to the model at
//! once). Frozen weights stay plain tensors: with the vision tower frozen, no vision op is
//! tracked at all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, Var};

use super::checkpoint::{CheckpointDir, TOKENIZER_FILES, load_safetensors};
use super::lora::{LoraConfig, LoraSet};
use super::optim::AdamW;
use super::score::{Episode, EpisodeScore, score_episode};
use super::{Result, TrainError};
use crate::Qwen2Vl;
use crate::nn::{Linear, RmsNorm};
use crate::vision::VisionNorm;

/// The patch embedding's module name (a Conv3d in PyTorch, a Linear here).
const PATCH_EMBED: &str = "visual.patch_embed.proj";

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
        l: &mut VisionNorm,
    ) -> Result<()> {
        for (suffix, t) in l.tensors_mut() {
            f(&format!("{n}.{suffix}"), t)?;
        }
        Ok(())
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
        for (n, l) in b.linears_mut() {
            lin(f, &format!("{p}.{n}"), l)?;
        }
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

/// Calls `f(module, linear)` for every linear layer except the output projection.
fn visit_linears(
    model: &mut Qwen2Vl,
    f: &mut dyn FnMut(&str, &mut Linear) -> Result<()>,
) -> Result<()> {
    let v = &mut model.vision;
    f(PATCH_EMBED, &mut v.patch_embed)?;
    for (i, b) in v.blocks.iter_mut().enumerate() {
        let p = format!("visual.blocks.{i}");
        for (n, l) in b.linears_mut() {
            f(&format!("{p}.{n}"), l)?;
        }
    }
    f("visual.merger.mlp.0", &mut v.merger_fc1)?;
    f("visual.merger.mlp.2", &mut v.merger_fc2)?;
    for (i, l) in model.text.layers.iter_mut().enumerate() {
        let p = format!("model.layers.{i}");
        f(&format!("{p}.self_attn.q_proj"), &mut l.q_proj)?;
        f(&format!("{p}.self_attn.k_proj"), &mut l.k_proj)?;
        f(&format!("{p}.self_attn.v_proj"), &mut l.v_proj)?;
        f(&format!("{p}.self_attn.o_proj"), &mut l.o_proj)?;
        f(&format!("{p}.mlp.gate_proj"), &mut l.gate_proj)?;
        f(&format!("{p}.mlp.up_proj"), &mut l.up_proj)?;
        f(&format!("{p}.mlp.down_proj"), &mut l.down_proj)?;
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
    lora: Option<LoraSet>,
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
            lora: None,
        })
    }

    /// LoRA: fresh adapters (PEFT init, seeded by `config.seed`) on the layers `config`
    /// targets; every base weight frozen.
    pub fn lora(model: Qwen2Vl, config: LoraConfig) -> Result<Self> {
        let set = LoraSet::new(config)?;
        Self::with_lora_set(model, set, true)
    }

    /// LoRA from a PEFT adapter directory (ours or peft's), on a frozen base.
    pub fn lora_from_peft(model: Qwen2Vl, dir: &Path, seed: u64) -> Result<Self> {
        let device = model.device().clone();
        let set = LoraSet::load_peft(dir, seed, &device)?;
        Self::with_lora_set(model, set, false)
    }

    fn with_lora_set(mut model: Qwen2Vl, mut set: LoraSet, init: bool) -> Result<Self> {
        visit_params(&mut model, &mut |_, t| {
            *t = t.detach();
            Ok(())
        })?;
        retie(&mut model);
        let device = model.device().clone();
        let vc = &model.config.vision;
        // The patch embedding is a Conv3d in PyTorch (kernel == stride): PEFT's shapes on save.
        let patch_kernel = vec![
            vc.embed_dim,
            vc.in_channels,
            vc.temporal_patch_size,
            vc.patch_size,
            vc.patch_size,
        ];
        let mut attached = 0usize;
        visit_linears(&mut model, &mut |name, linear| {
            if init {
                let (out_dim, in_dim) = linear.dims();
                set.add_if_targeted(name, in_dim, out_dim, &device)?;
            }
            if name == PATCH_EMBED && set.get(name).is_some() {
                set.set_conv_kernel(name, patch_kernel.clone());
            }
            linear.lora = set.get(name).cloned();
            attached += usize::from(linear.lora.is_some());
            Ok(())
        })?;
        if attached != set.len() {
            let known: std::collections::HashSet<String> = {
                let mut k = std::collections::HashSet::new();
                visit_linears(&mut model, &mut |name, _| {
                    k.insert(name.to_string());
                    Ok(())
                })?;
                k
            };
            let missing: Vec<&String> = set
                .adapters()
                .keys()
                .filter(|m| !known.contains(*m))
                .collect();
            return Err(TrainError::Mismatch {
                name: "lora adapter".into(),
                reason: format!("modules {missing:?} are not linear layers of this model"),
            });
        }
        if set.is_empty() {
            return Err(TrainError::Config(format!(
                "no linear layer matches the lora target_modules {:?}",
                set.config().target_modules
            )));
        }
        let vars = set.vars();
        Ok(Self {
            model,
            vars,
            freeze_vision_tower: !set.config().include_vision,
            lora: Some(set),
        })
    }

    /// The LoRA adapters, when training LoRA.
    pub fn lora_set(&self) -> Option<&LoraSet> {
        self.lora.as_ref()
    }

    /// Dropout on (training) or off (scoring old log-probs, evaluation). Only LoRA has dropout.
    pub fn set_training(&self, on: bool) {
        if let Some(set) = &self.lora {
            set.set_training(on);
        }
    }

    /// A copy of the model with every adapter merged into its base weight (no adapters left).
    pub fn merged_model(&self) -> Result<Qwen2Vl> {
        let mut model = self.model.clone();
        visit_linears(&mut model, &mut |_, linear| {
            if let Some(adapter) = linear.lora.take() {
                linear.weight = adapter.merged_weight(&linear.weight)?;
            }
            Ok(())
        })?;
        Ok(model)
    }

    /// Saves the adapters in PEFT form (`adapter_model.safetensors`, `adapter_config.json`),
    /// plus `optimizer.safetensors` when an optimizer is given; atomically.
    pub fn save_adapter(
        &self,
        dest: &Path,
        base_model_name_or_path: &str,
        optimizer: Option<&AdamW>,
    ) -> Result<PathBuf> {
        let Some(set) = &self.lora else {
            return Err(TrainError::Config(
                "save_adapter needs a LoRA trainable; use save for full fine-tuning".into(),
            ));
        };
        let ck = CheckpointDir::begin(dest)?;
        set.write_peft(&ck, base_model_name_or_path)?;
        if let Some(opt) = optimizer {
            let state: BTreeMap<String, Tensor> = opt.state_tensors()?.into_iter().collect();
            ck.write_safetensors(OPTIMIZER_STATE, &state, &BTreeMap::new())?;
        }
        ck.commit()
    }

    /// The trainable variables by name (classic HF spelling), for the optimizer.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Gradient checkpointing: decoder layers and vision blocks keep only their inputs and are
    /// recomputed in the backward pass ([`super::recompute`]), trading one more forward for
    /// most of the activation memory. Losses must then go through [`super::recompute::backward`].
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.model.text.gradient_checkpointing = on;
        self.model.vision.gradient_checkpointing = on;
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
    /// With LoRA, the adapters are merged in.
    pub fn state_dict(&self) -> Result<BTreeMap<String, Tensor>> {
        let merged;
        let model = if self.lora.is_some() {
            merged = self.merged_model()?;
            &merged
        } else {
            &self.model
        };
        let mut out = BTreeMap::new();
        let vc = &model.config.vision;
        for (name, t) in model.parameters() {
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

    /// Saves an HF-layout directory at `dest` (atomically; with LoRA, the merged weights):
    /// `model.safetensors`, `config.json`
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
