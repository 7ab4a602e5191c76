//! The Qwen2-VL vision tower: patch embedding, 2-D rotary ViT blocks, PatchMerger.

use candle_core::{D, DType, Module, Result, Tensor};

use crate::config::VisionConfig;
use crate::error::Result as ModelResult;
use crate::nn::{LayerNorm, Linear, apply_rotary, quick_gelu};
use crate::weights::Weights;

/// Softmax over the last dimension: the fused kernel on inference paths, the differentiable
/// composition otherwise (the fused one has no backward in candle 0.11).
pub(crate) fn softmax(x: &Tensor, fused: bool) -> Result<Tensor> {
    if fused {
        candle_nn::ops::softmax_last_dim(x)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

/// One ViT block (pre-norm attention and MLP).
#[derive(Debug, Clone)]
pub struct VisionBlock {
    pub norm1: LayerNorm,
    pub norm2: LayerNorm,
    pub qkv: Linear,
    pub proj: Linear,
    pub fc1: Linear,
    pub fc2: Linear,
}

/// The vision tower.
#[derive(Debug, Clone)]
pub struct VisionTower {
    pub config: VisionConfig,
    /// The Conv3d patch embedding as a Linear over flattened patches (`[embed, c*t*p*p]`).
    pub patch_embed: Linear,
    pub blocks: Vec<VisionBlock>,
    pub ln_q: LayerNorm,
    pub merger_fc1: Linear,
    pub merger_fc2: Linear,
    /// Recompute each block in the backward pass instead of keeping its activations
    /// ([`crate::train::recompute`]); only on the differentiable (not fused) path.
    pub gradient_checkpointing: bool,
}

impl VisionBlock {
    /// The block's trained tensors: `Var` weights, biases and norms, and LoRA adapters.
    pub fn trainable_tensors(&self) -> Vec<Tensor> {
        let mut out = Vec::new();
        for l in [&self.qkv, &self.proj, &self.fc1, &self.fc2] {
            out.extend(crate::nn::trainable_of_linear(l));
        }
        for n in [&self.norm1, &self.norm2] {
            for t in [&n.weight, &n.bias] {
                if t.is_variable() {
                    out.push(t.clone());
                }
            }
        }
        out
    }
}

/// One ViT block: pre-norm attention and MLP, both residual.
fn block_forward(
    cfg: &VisionConfig,
    block: &VisionBlock,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    chunks: &[usize],
    fused: bool,
) -> Result<Tensor> {
    let a = attention(cfg, block, &block.norm1.forward(x)?, cos, sin, chunks, fused)?;
    let x = (x + a)?;
    let m = block
        .fc2
        .forward(&quick_gelu(&block.fc1.forward(&block.norm2.forward(&x)?)?)?)?;
    x + m
}

fn linear(w: &mut Weights, name: &str, out: usize, inp: usize, bias: bool) -> ModelResult<Linear> {
    let weight = w.take(&format!("{name}.weight"), &[out, inp])?;
    let b = if bias {
        Some(w.take(&format!("{name}.bias"), &[out])?)
    } else {
        None
    };
    Ok(Linear::new(weight, b))
}

pub(crate) fn linear_from(
    w: &mut Weights,
    name: &str,
    out: usize,
    inp: usize,
    bias: bool,
) -> ModelResult<Linear> {
    linear(w, name, out, inp, bias)
}

fn layer_norm(w: &mut Weights, name: &str, dim: usize, eps: f64) -> ModelResult<LayerNorm> {
    Ok(LayerNorm::new(
        w.take(&format!("{name}.weight"), &[dim])?,
        w.take(&format!("{name}.bias"), &[dim])?,
        eps,
    ))
}

/// Patch (h, w) coordinates in the merge-block order the image processor emits, repeated per
/// temporal frame.
pub fn vision_patch_positions(grid_thw: &[[usize; 3]], merge: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for &[t, h, w] in grid_thw {
        let mut frame = Vec::with_capacity(h * w);
        for bh in 0..h / merge {
            for bw in 0..w / merge {
                for mh in 0..merge {
                    for mw in 0..merge {
                        frame.push((bh * merge + mh, bw * merge + mw));
                    }
                }
            }
        }
        for _ in 0..t {
            out.extend_from_slice(&frame);
        }
    }
    out
}

impl VisionTower {
    pub fn load(cfg: &VisionConfig, w: &mut Weights) -> ModelResult<Self> {
        let e = cfg.embed_dim;
        let pe = w.take(
            "visual.patch_embed.proj.weight",
            &[
                e,
                cfg.in_channels,
                cfg.temporal_patch_size,
                cfg.patch_size,
                cfg.patch_size,
            ],
        )?;
        let patch_embed = Linear::new(pe.reshape((e, cfg.patch_dim()))?, None);
        let eps = cfg.layer_norm_eps;
        let mut blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let p = format!("visual.blocks.{i}");
            blocks.push(VisionBlock {
                norm1: layer_norm(w, &format!("{p}.norm1"), e, eps)?,
                norm2: layer_norm(w, &format!("{p}.norm2"), e, eps)?,
                qkv: linear(w, &format!("{p}.attn.qkv"), 3 * e, e, true)?,
                proj: linear(w, &format!("{p}.attn.proj"), e, e, true)?,
                fc1: linear(w, &format!("{p}.mlp.fc1"), cfg.mlp_dim(), e, true)?,
                fc2: linear(w, &format!("{p}.mlp.fc2"), e, cfg.mlp_dim(), true)?,
            });
        }
        let m = cfg.spatial_merge_size * cfg.spatial_merge_size;
        Ok(Self {
            config: cfg.clone(),
            patch_embed,
            blocks,
            ln_q: layer_norm(w, "visual.merger.ln_q", e, eps)?,
            merger_fc1: linear(w, "visual.merger.mlp.0", e * m, e * m, true)?,
            merger_fc2: linear(w, "visual.merger.mlp.2", cfg.hidden_size, e * m, true)?,
            gradient_checkpointing: false,
        })
    }

    /// `(name, tensor)` of every parameter, with HF names (the patch embedding is the 2-D
    /// `[embed, c*t*p*p]` view of `visual.patch_embed.proj.weight`).
    pub fn parameters(&self, out: &mut Vec<(String, Tensor)>) {
        let lin = |out: &mut Vec<(String, Tensor)>, n: String, l: &Linear| {
            out.push((format!("{n}.weight"), l.weight.clone()));
            if let Some(b) = &l.bias {
                out.push((format!("{n}.bias"), b.clone()));
            }
        };
        let ln = |out: &mut Vec<(String, Tensor)>, n: String, l: &LayerNorm| {
            out.push((format!("{n}.weight"), l.weight.clone()));
            out.push((format!("{n}.bias"), l.bias.clone()));
        };
        out.push((
            "visual.patch_embed.proj.weight".into(),
            self.patch_embed.weight.clone(),
        ));
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("visual.blocks.{i}");
            ln(out, format!("{p}.norm1"), &b.norm1);
            ln(out, format!("{p}.norm2"), &b.norm2);
            lin(out, format!("{p}.attn.qkv"), &b.qkv);
            lin(out, format!("{p}.attn.proj"), &b.proj);
            lin(out, format!("{p}.mlp.fc1"), &b.fc1);
            lin(out, format!("{p}.mlp.fc2"), &b.fc2);
        }
        ln(out, "visual.merger.ln_q".into(), &self.ln_q);
        lin(out, "visual.merger.mlp.0".into(), &self.merger_fc1);
        lin(out, "visual.merger.mlp.2".into(), &self.merger_fc2);
    }

    /// cos/sin `[N, head_dim]` of the 2-D rotary embedding for every patch.
    fn rotary(
        &self,
        grid_thw: &[[usize; 3]],
        device: &candle_core::Device,
    ) -> Result<(Tensor, Tensor)> {
        let cfg = &self.config;
        let spatial = cfg.head_dim() / 2;
        let inv: Vec<f32> = (0..spatial)
            .step_by(2)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf(i as f32 / spatial as f32))
            .collect();
        let pos = vision_patch_positions(grid_thw, cfg.spatial_merge_size);
        let hd = cfg.head_dim();
        let mut cos = Vec::with_capacity(pos.len() * hd);
        let mut sin = Vec::with_capacity(pos.len() * hd);
        for &(h, w) in &pos {
            let mut row: Vec<f32> = inv.iter().map(|f| h as f32 * f).collect();
            row.extend(inv.iter().map(|f| w as f32 * f));
            for _ in 0..2 {
                cos.extend(row.iter().map(|a| a.cos()));
                sin.extend(row.iter().map(|a| a.sin()));
            }
        }
        let n = pos.len();
        Ok((
            Tensor::from_vec(cos, (n, 1, hd), device)?,
            Tensor::from_vec(sin, (n, 1, hd), device)?,
        ))
    }

    /// Image features `[sum(t*h*w)/merge^2, hidden]` for `pixel_values` `[sum(t*h*w), patch_dim]`.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        grid_thw: &[[usize; 3]],
        fused: bool,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let n: usize = grid_thw.iter().map(|g| g[0] * g[1] * g[2]).sum();
        if pixel_values.dims() != [n, cfg.patch_dim()] {
            candle_core::bail!(
                "pixel_values has shape {:?}, expected [{n}, {}] for grid_thw {grid_thw:?}",
                pixel_values.dims(),
                cfg.patch_dim()
            );
        }
        let dtype = self.patch_embed.weight.dtype();
        let mut x = self.patch_embed.forward(&pixel_values.to_dtype(dtype)?)?;
        let (cos, sin) = self.rotary(grid_thw, x.device())?;
        // Attention is full within each frame of each image and absent across them.
        let mut chunks = Vec::new();
        for &[t, h, w] in grid_thw {
            for _ in 0..t {
                chunks.push(h * w);
            }
        }
        let recompute = self.gradient_checkpointing && !fused;
        for block in &self.blocks {
            if recompute {
                let (c, b) = (cfg.clone(), block.clone());
                let (cos, sin, chunks) = (cos.clone(), sin.clone(), chunks.clone());
                let f = crate::train::recompute::block(
                    [&block.qkv, &block.proj, &block.fc1, &block.fc2]
                        .into_iter()
                        .filter_map(|l| l.lora.as_ref()),
                    move |x: &Tensor| block_forward(&c, &b, x, &cos, &sin, &chunks, false),
                );
                x = crate::train::recompute::checkpoint(&x, block.trainable_tensors(), f)?;
            } else {
                x = block_forward(cfg, block, &x, &cos, &sin, &chunks, fused)?;
            }
        }
        let merged = self
            .ln_q
            .forward(&x)?
            .reshape((n / (cfg.spatial_merge_size * cfg.spatial_merge_size), ()))?;
        self.merger_fc2
            .forward(&self.merger_fc1.forward(&merged)?.gelu_erf()?)
    }
}

fn attention(
    cfg: &VisionConfig,
    block: &VisionBlock,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    chunks: &[usize],
    fused: bool,
) -> Result<Tensor> {
    let (n, e) = x.dims2()?;
    let (h, d) = (cfg.num_heads, cfg.head_dim());
    let qkv = block.qkv.forward(x)?.reshape((n, 3, h, d))?;
    let dtype = qkv.dtype();
    let rot = |t: Tensor| -> Result<Tensor> {
        apply_rotary(&t.to_dtype(DType::F32)?, cos, sin)?.to_dtype(dtype)
    };
    let q = rot(qkv.narrow(1, 0, 1)?.squeeze(1)?)?
        .transpose(0, 1)?
        .contiguous()?;
    let k = rot(qkv.narrow(1, 1, 1)?.squeeze(1)?)?
        .transpose(0, 1)?
        .contiguous()?;
    let v = qkv
        .narrow(1, 2, 1)?
        .squeeze(1)?
        .transpose(0, 1)?
        .contiguous()?;
    let scale = 1.0 / (d as f64).sqrt();
    let mut outs = Vec::with_capacity(chunks.len());
    let mut start = 0;
    for &len in chunks {
        let qc = q.narrow(1, start, len)?;
        let kc = k.narrow(1, start, len)?;
        let vc = v.narrow(1, start, len)?;
        let scores = (qc.matmul(&kc.t()?)? * scale)?;
        let probs = softmax(&scores.to_dtype(DType::F32)?, fused)?.to_dtype(dtype)?;
        outs.push(probs.matmul(&vc)?);
        start += len;
    }
    let out = Tensor::cat(&outs, 1)?.transpose(0, 1)?.reshape((n, e))?;
    block.proj.forward(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_positions_follow_merge_blocks() {
        // A 1x2x4 grid with merge 2: blocks (0,0),(0,1) each list their 2x2 neighbours.
        let p = vision_patch_positions(&[[1, 2, 4]], 2);
        assert_eq!(
            p,
            vec![
                (0, 0),
                (0, 1),
                (1, 0),
                (1, 1),
                (0, 2),
                (0, 3),
                (1, 2),
                (1, 3)
            ]
        );
    }
}
