//! The Qwen2-VL and Qwen2.5-VL vision towers: patch embedding, 2-D rotary ViT blocks,
//! PatchMerger.
//!
//! Qwen2.5-VL differs in its blocks (RMSNorm, gated SiLU MLP with biases) and in where it
//! attends: its patches are reordered window by window (windows of `window_size` pixels, in
//! merged-token units, partial at the right and bottom edges), most blocks attend within a
//! window and the blocks of `fullatt_block_indexes` within the whole image; the merged features
//! are put back in image order after the merger.

use candle_core::{D, DType, Module, Result, Tensor};

use crate::config::{VisionArch, VisionConfig};
use crate::error::Result as ModelResult;
use crate::nn::{LayerNorm, Linear, RmsNorm, apply_rotary, quick_gelu};
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

/// A vision norm: LayerNorm (Qwen2-VL) or RMSNorm (Qwen2.5-VL).
#[derive(Debug, Clone)]
pub enum VisionNorm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl Module for VisionNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Layer(n) => n.forward(x),
            Self::Rms(n) => n.forward(x),
        }
    }
}

impl VisionNorm {
    /// `(suffix, tensor)` of its parameters: `weight`, and `bias` for LayerNorm.
    pub fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        match self {
            Self::Layer(n) => vec![("weight", &n.weight), ("bias", &n.bias)],
            Self::Rms(n) => vec![("weight", &n.weight)],
        }
    }

    pub fn tensors_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        match self {
            Self::Layer(n) => vec![("weight", &mut n.weight), ("bias", &mut n.bias)],
            Self::Rms(n) => vec![("weight", &mut n.weight)],
        }
    }
}

/// A ViT block's MLP.
#[derive(Debug, Clone)]
pub enum VisionMlp {
    /// Qwen2-VL: `fc2(quick_gelu(fc1(x)))`.
    QuickGelu { fc1: Linear, fc2: Linear },
    /// Qwen2.5-VL: `down_proj(silu(gate_proj(x)) * up_proj(x))`, all with biases.
    SwiGlu {
        gate_proj: Linear,
        up_proj: Linear,
        down_proj: Linear,
    },
}

impl Module for VisionMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu { fc1, fc2 } => fc2.forward(&quick_gelu(&fc1.forward(x)?)?),
            Self::SwiGlu {
                gate_proj,
                up_proj,
                down_proj,
            } => {
                let gate = candle_nn::ops::silu(&gate_proj.forward(x)?)?;
                down_proj.forward(&(gate * up_proj.forward(x)?)?)
            }
        }
    }
}

impl VisionMlp {
    /// `(name under mlp., layer)` of its projections.
    pub fn linears(&self) -> Vec<(&'static str, &Linear)> {
        match self {
            Self::QuickGelu { fc1, fc2 } => vec![("fc1", fc1), ("fc2", fc2)],
            Self::SwiGlu {
                gate_proj,
                up_proj,
                down_proj,
            } => vec![
                ("gate_proj", gate_proj),
                ("up_proj", up_proj),
                ("down_proj", down_proj),
            ],
        }
    }

    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        match self {
            Self::QuickGelu { fc1, fc2 } => vec![("fc1", fc1), ("fc2", fc2)],
            Self::SwiGlu {
                gate_proj,
                up_proj,
                down_proj,
            } => vec![
                ("gate_proj", gate_proj),
                ("up_proj", up_proj),
                ("down_proj", down_proj),
            ],
        }
    }
}

/// One ViT block (pre-norm attention and MLP).
#[derive(Debug, Clone)]
pub struct VisionBlock {
    pub norm1: VisionNorm,
    pub norm2: VisionNorm,
    pub qkv: Linear,
    pub proj: Linear,
    pub mlp: VisionMlp,
}

/// The vision tower.
#[derive(Debug, Clone)]
pub struct VisionTower {
    pub config: VisionConfig,
    /// The Conv3d patch embedding as a Linear over flattened patches (`[embed, c*t*p*p]`).
    pub patch_embed: Linear,
    pub blocks: Vec<VisionBlock>,
    pub ln_q: VisionNorm,
    pub merger_fc1: Linear,
    pub merger_fc2: Linear,
    /// Recompute each block in the backward pass instead of keeping its activations
    /// ([`crate::train::recompute`]); only on the differentiable (not fused) path.
    pub gradient_checkpointing: bool,
}

impl VisionBlock {
    /// `(name under the block, layer)` of every projection: `attn.qkv`, `attn.proj`, `mlp.*`.
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = vec![
            ("attn.qkv".to_string(), &self.qkv),
            ("attn.proj".to_string(), &self.proj),
        ];
        out.extend(
            self.mlp
                .linears()
                .into_iter()
                .map(|(n, l)| (format!("mlp.{n}"), l)),
        );
        out
    }

    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = vec![
            ("attn.qkv".to_string(), &mut self.qkv),
            ("attn.proj".to_string(), &mut self.proj),
        ];
        out.extend(
            self.mlp
                .linears_mut()
                .into_iter()
                .map(|(n, l)| (format!("mlp.{n}"), l)),
        );
        out
    }

    /// The block's trained tensors: `Var` weights, biases and norms, and LoRA adapters.
    pub fn trainable_tensors(&self) -> Vec<Tensor> {
        let mut out = Vec::new();
        for (_, l) in self.linears() {
            out.extend(crate::nn::trainable_of_linear(l));
        }
        for n in [&self.norm1, &self.norm2] {
            for (_, t) in n.tensors() {
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
    let a = attention(
        cfg,
        block,
        &block.norm1.forward(x)?,
        cos,
        sin,
        chunks,
        fused,
    )?;
    let x = (x + a)?;
    let m = block.mlp.forward(&block.norm2.forward(&x)?)?;
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

fn vision_norm(
    w: &mut Weights,
    cfg: &VisionConfig,
    name: &str,
    dim: usize,
) -> ModelResult<VisionNorm> {
    let eps = cfg.layer_norm_eps;
    let weight = w.take(&format!("{name}.weight"), &[dim])?;
    Ok(match cfg.arch {
        VisionArch::Qwen2Vl => VisionNorm::Layer(LayerNorm::new(
            weight,
            w.take(&format!("{name}.bias"), &[dim])?,
            eps,
        )),
        VisionArch::Qwen25Vl { .. } => VisionNorm::Rms(RmsNorm::new(weight, eps)),
    })
}

/// Qwen2.5-VL's window layout of a batch of images: `order[k]` is the merged token (in image
/// order, over all images) placed at position `k`, and `lengths` the number of merged tokens in
/// each window, in that order. Windows tile each frame's merged grid row-major from the top
/// left, `window` merged tokens a side; those at the right and bottom edges may be partial;
/// frames and images stay contiguous.
pub fn window_layout(
    grid_thw: &[[usize; 3]],
    merge: usize,
    window: usize,
) -> (Vec<u32>, Vec<usize>) {
    let mut order = Vec::new();
    let mut lengths = Vec::new();
    let mut base = 0usize;
    let window = window.max(1);
    for &[t, h, w] in grid_thw {
        let (gh, gw) = (h / merge, w / merge);
        for ti in 0..t {
            let frame = base + ti * gh * gw;
            for wr in (0..gh).step_by(window) {
                for wc in (0..gw).step_by(window) {
                    let (rows, cols) = (window.min(gh - wr), window.min(gw - wc));
                    for r in wr..wr + rows {
                        for c in wc..wc + cols {
                            order.push((frame + r * gw + c) as u32);
                        }
                    }
                    lengths.push(rows * cols);
                }
            }
        }
        base += t * gh * gw;
    }
    (order, lengths)
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
        let mut blocks = Vec::with_capacity(cfg.depth);
        let f = cfg.mlp_dim();
        for i in 0..cfg.depth {
            let p = format!("visual.blocks.{i}");
            let mlp = match cfg.arch {
                VisionArch::Qwen2Vl => VisionMlp::QuickGelu {
                    fc1: linear(w, &format!("{p}.mlp.fc1"), f, e, true)?,
                    fc2: linear(w, &format!("{p}.mlp.fc2"), e, f, true)?,
                },
                VisionArch::Qwen25Vl { .. } => VisionMlp::SwiGlu {
                    gate_proj: linear(w, &format!("{p}.mlp.gate_proj"), f, e, true)?,
                    up_proj: linear(w, &format!("{p}.mlp.up_proj"), f, e, true)?,
                    down_proj: linear(w, &format!("{p}.mlp.down_proj"), e, f, true)?,
                },
            };
            blocks.push(VisionBlock {
                norm1: vision_norm(w, cfg, &format!("{p}.norm1"), e)?,
                norm2: vision_norm(w, cfg, &format!("{p}.norm2"), e)?,
                qkv: linear(w, &format!("{p}.attn.qkv"), 3 * e, e, true)?,
                proj: linear(w, &format!("{p}.attn.proj"), e, e, true)?,
                mlp,
            });
        }
        let m = cfg.spatial_merge_size * cfg.spatial_merge_size;
        Ok(Self {
            config: cfg.clone(),
            patch_embed,
            blocks,
            ln_q: vision_norm(w, cfg, "visual.merger.ln_q", e)?,
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
        let ln = |out: &mut Vec<(String, Tensor)>, n: String, l: &VisionNorm| {
            for (suffix, t) in l.tensors() {
                out.push((format!("{n}.{suffix}"), t.clone()));
            }
        };
        out.push((
            "visual.patch_embed.proj.weight".into(),
            self.patch_embed.weight.clone(),
        ));
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("visual.blocks.{i}");
            ln(out, format!("{p}.norm1"), &b.norm1);
            ln(out, format!("{p}.norm2"), &b.norm2);
            for (n, l) in b.linears() {
                lin(out, format!("{p}.{n}"), l);
            }
        }
        ln(out, "visual.merger.ln_q".into(), &self.ln_q);
        lin(out, "visual.merger.mlp.0".into(), &self.merger_fc1);
        lin(out, "visual.merger.mlp.2".into(), &self.merger_fc2);
    }

    /// cos/sin `[N, 1, head_dim]` of the 2-D rotary embedding of patches at `pos` (row, col).
    fn rotary(
        &self,
        pos: &[(usize, usize)],
        device: &candle_core::Device,
    ) -> Result<(Tensor, Tensor)> {
        let cfg = &self.config;
        let spatial = cfg.head_dim() / 2;
        let inv: Vec<f32> = (0..spatial)
            .step_by(2)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf(i as f32 / spatial as f32))
            .collect();
        let hd = cfg.head_dim();
        let mut cos = Vec::with_capacity(pos.len() * hd);
        let mut sin = Vec::with_capacity(pos.len() * hd);
        for &(h, w) in pos {
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
        let merge = cfg.spatial_merge_size;
        let unit = merge * merge;
        if let Some(&[t, h, w]) = grid_thw
            .iter()
            .find(|g| g[1] % merge != 0 || g[2] % merge != 0)
        {
            candle_core::bail!("grid {t}x{h}x{w} is not a multiple of the merge size {merge}");
        }
        let dtype = self.patch_embed.weight.dtype();
        let device = pixel_values.device().clone();
        let mut x = self.patch_embed.forward(&pixel_values.to_dtype(dtype)?)?;
        let mut pos = vision_patch_positions(grid_thw, merge);
        // Attention is full within each frame of each image and absent across them.
        let mut full_chunks = Vec::new();
        for &[t, h, w] in grid_thw {
            for _ in 0..t {
                full_chunks.push(h * w);
            }
        }
        // Qwen2.5-VL: patches reordered window by window (merge units stay together).
        let mut windows = None;
        if let Some(side) = cfg.window_merged() {
            let (order, lengths) = window_layout(grid_thw, merge, side);
            let patch_order: Vec<u32> = order
                .iter()
                .flat_map(|&m| (0..unit as u32).map(move |j| m * unit as u32 + j))
                .collect();
            pos = patch_order.iter().map(|&i| pos[i as usize]).collect();
            let idx = Tensor::from_vec(patch_order, n, &device)?;
            x = x.index_select(&idx, 0)?;
            let mut restore = vec![0u32; order.len()];
            for (k, &m) in order.iter().enumerate() {
                restore[m as usize] = k as u32;
            }
            let chunks: Vec<usize> = lengths.iter().map(|l| l * unit).collect();
            windows = Some((chunks, Tensor::from_vec(restore, order.len(), &device)?));
        }
        let (cos, sin) = self.rotary(&pos, &device)?;
        let recompute = self.gradient_checkpointing && !fused;
        for (i, block) in self.blocks.iter().enumerate() {
            let chunks = match &windows {
                Some((w, _)) if cfg.windowed_block(i) => w.clone(),
                _ => full_chunks.clone(),
            };
            if recompute {
                let (c, b) = (cfg.clone(), block.clone());
                let (cos, sin) = (cos.clone(), sin.clone());
                let f = crate::train::recompute::block(
                    block
                        .linears()
                        .into_iter()
                        .filter_map(|(_, l)| l.lora.as_ref()),
                    move |x: &Tensor| block_forward(&c, &b, x, &cos, &sin, &chunks, false),
                );
                x = crate::train::recompute::checkpoint(&x, block.trainable_tensors(), f)?;
            } else {
                x = block_forward(cfg, block, &x, &cos, &sin, &chunks, fused)?;
            }
        }
        let merged = self.ln_q.forward(&x)?.reshape((n / unit, ()))?;
        let out = self
            .merger_fc2
            .forward(&self.merger_fc1.forward(&merged)?.gelu_erf()?)?;
        match &windows {
            Some((_, restore)) => out.index_select(restore, 0),
            None => Ok(out),
        }
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
    let k_all = rot(qkv.narrow(1, 1, 1)?.squeeze(1)?)?
        .transpose(0, 1)?
        .contiguous()?;
    let v = qkv
        .narrow(1, 2, 1)?
        .squeeze(1)?
        .transpose(0, 1)?
        .contiguous()?;
    let out = attend_chunks(&q, &k_all, &v, chunks, fused, QUERY_BLOCK)?;
    let out = out.transpose(0, 1)?.reshape((n, e))?;
    block.proj.forward(&out)
}

/// Query rows scored at once: a full-attention block over a 1920x1080 screenshot (10,764
/// patches, 16 heads) would otherwise hold a 7.4 GB f32 score matrix; 1024 rows hold 0.7 GB.
const QUERY_BLOCK: usize = 1024;

/// Softmax attention of `q`/`k`/`v` `[heads, n, head_dim]` within consecutive chunks of the
/// sequence (`chunks` sum to `n`). Inference (`fused`) takes the queries `query_block` rows at
/// a time (each row's softmax is its own, so the result does not depend on the block size); the
/// differentiable path is [`crate::attention::chunked_attention`].
fn attend_chunks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    chunks: &[usize],
    fused: bool,
    query_block: usize,
) -> Result<Tensor> {
    let (h, _, d) = q.dims3()?;
    let dtype = q.dtype();
    let scale = 1.0 / (d as f64).sqrt();
    if !fused {
        // Differentiable: memory-linear, keeps no block's probabilities for the backward pass.
        return crate::attention::chunked_attention(q, k, v, chunks, scale);
    }
    // Consecutive chunks of equal length (the full windows of Qwen2.5-VL, the frames of an
    // image) go through one batched product each.
    let mut outs = Vec::with_capacity(chunks.len());
    let mut start = 0;
    let mut i = 0;
    while i < chunks.len() {
        let len = chunks[i];
        let mut count = 1;
        while i + count < chunks.len() && chunks[i + count] == len {
            count += 1;
        }
        i += count;
        if len == 0 {
            continue;
        }
        let group = |t: &Tensor| -> Result<Tensor> {
            t.narrow(1, start, count * len)?
                .reshape((h, count, len, d))?
                .transpose(0, 1)?
                .contiguous()
        };
        let (qc, kc, vc) = (group(q)?, group(k)?, group(v)?);
        let kt = kc.t()?;
        let mut rows = Vec::with_capacity(len.div_ceil(query_block.max(1)));
        for r in (0..len).step_by(query_block.max(1)) {
            let qr = qc.narrow(2, r, query_block.min(len - r))?.contiguous()?;
            let scores = (qr.matmul(&kt)? * scale)?;
            let probs = softmax(&scores.to_dtype(DType::F32)?, fused)?.to_dtype(dtype)?;
            rows.push(probs.matmul(&vc)?);
        }
        let o = if rows.len() == 1 {
            rows.remove(0)
        } else {
            Tensor::cat(&rows, 2)?
        };
        outs.push(o.transpose(0, 1)?.reshape((h, count * len, d))?);
        start += count * len;
    }
    Tensor::cat(&outs, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_blocks_do_not_change_attention() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let (h, n, d) = (2, 23, 4);
        let t = |seed: f64| -> Result<Tensor> {
            let v: Vec<f32> = (0..h * n * d)
                .map(|i| ((i as f64 * 0.37 + seed).sin()) as f32)
                .collect();
            Tensor::from_vec(v, (h, n, d), &dev)
        };
        let (q, k, v) = (t(0.1)?, t(1.3)?, t(2.7)?);
        // Windows of 4, 4, 2, 2, 2, 1 merged-token units (x4 patches), then the rest.
        let chunks = [4, 4, 2, 2, 2, 1, 8];
        let whole = attend_chunks(&q, &k, &v, &chunks, false, usize::MAX)?;
        // The inference path in blocks of rows equals the differentiable one.
        for block in [1, 3, 4, usize::MAX] {
            let blocked = attend_chunks(&q, &k, &v, &chunks, true, block)?;
            let diff = (&whole - &blocked)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "query block {block}: {diff}");
        }
        // The backward pass through the blocks gives the same gradients.
        let grads = |block: usize| -> Result<Vec<Tensor>> {
            let vars = [&q, &k, &v].map(|t| candle_core::Var::from_tensor(t).expect("var"));
            let out = attend_chunks(
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
                &chunks,
                false,
                block,
            )?;
            let g = (out.sqr()?.sum_all()?).backward()?;
            Ok(vars
                .iter()
                .map(|x| g.get(x.as_tensor()).expect("gradient").clone())
                .collect())
        };
        for (a, b) in grads(usize::MAX)?.iter().zip(grads(3)?) {
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = a.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                scale > 1e-3 && diff < 1e-5 * scale.max(1.0),
                "gradient differs by {diff}"
            );
        }
        // One chunk by hand: attention within [0, 4) only sees keys 0..4.
        let first = attend_chunks(
            &q.narrow(1, 0, 4)?,
            &k.narrow(1, 0, 4)?,
            &v.narrow(1, 0, 4)?,
            &[4],
            false,
            2,
        )?;
        let diff = (whole.narrow(1, 0, 4)? - first)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6);
        Ok(())
    }

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
