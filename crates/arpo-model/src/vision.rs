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
use crate::nn::{LayerNorm, Linear, RmsNorm, apply_rotary, quick_gelu, silu_mul};
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
            } => down_proj.forward(&silu_mul(&gate_proj.forward(x)?, &up_proj.forward(x)?)?),
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
    let (q, k_all) = if crate::fused::usable(&[&qkv, cos, sin]) {
        (
            crate::fused::rotary_heads(&qkv, 0, cos, sin)?,
            crate::fused::rotary_heads(&qkv, 1, cos, sin)?,
        )
    } else {
        (
            rot(qkv.narrow(1, 0, 1)?.squeeze(1)?)?
                .transpose(0, 1)?
                .contiguous()?,
            rot(qkv.narrow(1, 1, 1)?.squeeze(1)?)?
                .transpose(0, 1)?
                .contiguous()?,
        )
    };
    let v = qkv
        .narrow(1, 2, 1)?
        .squeeze(1)?
        .transpose(0, 1)?
        .contiguous()?;
    // A bf16 rollout copy (`RolloutWeights::Bf16`) also takes the attention products in bf16;
    // so do the 8- and 4-bit copies where the CPU has AVX-512 BF16 (their linears already round
    // the activations to 8 bits; candle's f32 products and softmax took a quarter of their
    // vision time).
    let bf16 = fused
        && x.device().is_cpu()
        && block.qkv.quantized.as_ref().is_some_and(|w| {
            w.format() == candle_core::quantized::GgmlDType::BF16
                || crate::bf16_gemm::Bf16Kernel::best() == crate::bf16_gemm::Bf16Kernel::Avx512Bf16
        });
    let out = if bf16 {
        attend_chunks_bf16(&q, &k_all, &v, chunks, QUERY_BLOCK)?
    } else {
        attend_chunks(&q, &k_all, &v, chunks, fused, QUERY_BLOCK)?
    };
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

/// [`attend_chunks`]'s inference path with both products in bf16 ([`crate::bf16_gemm`]):
/// per head and chunk, the keys and the transposed values are packed once as bf16 "weights",
/// then each block of `query_block` query rows (pre-scaled) takes `q K^T`, a row softmax in
/// f32 ([`softmax_rows`]) and `p V` through the bf16 product (operands rounded to bf16, f32
/// accumulation). Output in f32, `[heads, n, head_dim]`.
fn attend_chunks_bf16(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    chunks: &[usize],
    query_block: usize,
) -> Result<Tensor> {
    use crate::bf16_gemm::{Bf16Kernel, Bf16Weight};
    let (h, n, d) = q.dims3()?;
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let kernel = Bf16Kernel::best();
    let block = query_block.max(1);
    let mut out = Vec::with_capacity(h * n * d);
    for head in 0..h {
        let qh = (q.get(head)?.to_dtype(DType::F32)? * f64::from(scale))?.flatten_all()?;
        let qh = qh.to_vec1::<f32>()?;
        let (kh, vh) = (k.get(head)?, v.get(head)?);
        let mut start = 0;
        for &len in chunks {
            if len == 0 {
                continue;
            }
            // x W^T with W = K [len, d] is q K^T; with W = V^T [d, len] it is p V.
            let keys = Bf16Weight::from_tensor(&kh.narrow(0, start, len)?)?;
            let values = Bf16Weight::from_tensor(&vh.narrow(0, start, len)?.t()?.contiguous()?)?;
            for r in (0..len).step_by(block) {
                let rows = block.min(len - r);
                let qr = &qh[(start + r) * d..(start + r + rows) * d];
                let mut scores = keys.matmul(qr, rows, kernel)?;
                softmax_rows(&mut scores, len)?;
                out.extend(values.matmul(&scores, rows, kernel)?);
            }
            start += len;
        }
    }
    Tensor::from_vec(out, (h, n, d), q.device())
}

/// Softmax of each row (`cols` values) of `data`, in place, in f32 with [`exp_f32`]; rows are
/// shared among candle's threads.
fn softmax_rows(data: &mut [f32], cols: usize) -> Result<()> {
    if cols == 0 {
        return Ok(());
    }
    let per_item = (1 << 16) / cols + 1;
    let items: Vec<&mut [f32]> = data.chunks_mut(per_item * cols).collect();
    crate::attention::run_parallel(
        items,
        |c| c.len(),
        || (),
        |rows, _| softmax_rows_here(rows, cols),
    )
}

/// [`softmax_rows`] on this thread, compiled for AVX-512 where the CPU has it.
#[allow(unsafe_code)]
fn softmax_rows_here(data: &mut [f32], cols: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn wide(data: &mut [f32], cols: usize) {
            softmax_rows_portable(data, cols)
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU reported AVX-512F, the only feature `wide` is compiled for.
            return unsafe { wide(data, cols) };
        }
    }
    softmax_rows_portable(data, cols)
}

/// Lanes of the reductions below: independent accumulators the compiler keeps in one vector.
const LANES: usize = 16;

#[inline(always)]
fn softmax_rows_portable(data: &mut [f32], cols: usize) {
    for row in data.chunks_exact_mut(cols) {
        let mut m = [f32::NEG_INFINITY; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for c in &mut chunks {
            for (m, &x) in m.iter_mut().zip(c) {
                *m = if x > *m { x } else { *m };
            }
        }
        let mut max = chunks
            .remainder()
            .iter()
            .fold(f32::NEG_INFINITY, |a, &x| if x > a { x } else { a });
        for &x in &m {
            max = if x > max { x } else { max };
        }
        let mut sums = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (s, x) in sums.iter_mut().zip(c.iter_mut()) {
                *x = exp_f32(*x - max);
                *s += *x;
            }
        }
        let mut sum: f32 = 0.0;
        for x in chunks.into_remainder() {
            *x = exp_f32(*x - max);
            sum += *x;
        }
        sum += sums.iter().sum::<f32>();
        let inv = 1.0 / sum;
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

/// `e^x` in f32 for `x <= 0` (a softmax's shifted scores), written so that the compiler
/// vectorises it (no library call): `x = n ln2 + r` with `|r| <= ln2 / 2` (ln2 split in two
/// for an exact `n ln2`), `e^r` by its degree-6 Taylor polynomial (truncation below
/// `0.35^7 / 5040 = 1.3e-7` of the value), times `2^n` built in the exponent bits. Below
/// -87 (where `e^x` < 1.7e-38) it returns `e^-87`'s neighbourhood, not 0: a probability of
/// 1e-38 instead of less, which no sum notices.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 0.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // n is in [-126, 0]: 2^n is a normal f32, its exponent bits n + 127. They are read off
    // the bits of t = 1.5 * 2^23 + 127 + n (an integer in [2^23, 2^24), whose low mantissa
    // bits are t - 2^23 = 2^22 + 127 + n) rather than cast from n: a float-to-int `as`
    // saturates lane by lane, which the compiler does not vectorise. Wrapping ops: no
    // overflow-check branch in the dev profile.
    let t = n + 12_583_039.0;
    let biased = (t.to_bits() & 0x7f_ffff).wrapping_sub(0x40_0000);
    f32::from_bits(biased.wrapping_shl(23)) * p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bf16 products round q, k, the probabilities and v to bf16 (relative error at most
    /// `u = 2^-9` each; products of two bf16 values are exact in f32): a score moves by at most
    /// `ds = (2u + u^2) * scale * sum_i |q_i k_i|`, a probability by a factor within
    /// `exp(+-2 ds)`, and the output by at most `max|v| ((1 + u)^2 e^(2 ds) - 1)`, plus the
    /// f32 accumulation (1e-6 here).
    #[test]
    fn bf16_attention_products_stay_within_their_rounding() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let (h, n, d) = (3, 37, 8);
        let t = |seed: f64| -> Result<Tensor> {
            let v: Vec<f32> = (0..h * n * d)
                .map(|i| ((i as f64 * 0.37 + seed).sin() * 1.5) as f32)
                .collect();
            Tensor::from_vec(v, (h, n, d), &dev)
        };
        let (q, k, v) = (t(0.1)?, t(1.3)?, t(2.7)?);
        let chunks = [16, 16, 5];
        let want = attend_chunks(&q, &k, &v, &chunks, true, usize::MAX)?;
        for block in [1, 7, usize::MAX] {
            let got = attend_chunks_bf16(&q, &k, &v, &chunks, block)?;
            assert_eq!(got.dims(), want.dims());
            let scale = 1.0 / (d as f64).sqrt();
            // sum_i |q_i k_i| <= (sum |q_i|)(max |k_i|) per score: bound it over all pairs.
            let qa = q.abs()?.sum(D::Minus1)?.max_all()?.to_scalar::<f32>()? as f64;
            let ka = k.abs()?.max_all()?.to_scalar::<f32>()? as f64;
            let va = v.abs()?.max_all()?.to_scalar::<f32>()? as f64;
            let u = 2f64.powi(-9);
            let ds = (2.0 * u + u * u) * scale * qa * ka;
            let bound = va * ((1.0 + u).powi(2) * (2.0 * ds).exp() - 1.0) + 1e-6;
            let diff = (&want - &got)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
            assert!(diff <= bound, "block {block}: {diff} > {bound}");
            assert!(diff > 0.0, "bf16 rounding must show");
        }
        Ok(())
    }

    /// The vectorised exp against f64's over [-87, 0]: within 4 f32 ulps (relative 2.4e-7),
    /// exact at 0, and a row softmax of it equals candle's to 1e-6.
    #[test]
    fn fast_exp_and_softmax_match_the_reference() -> Result<()> {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let rel = ((exp_f32(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst <= 4.0 * f32::EPSILON as f64, "relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        let dev = candle_core::Device::Cpu;
        let (rows, cols) = (5, 1037);
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as f64 * 0.731).sin() * 9.0) as f32)
            .collect();
        let want =
            candle_nn::ops::softmax_last_dim(&Tensor::from_vec(v.clone(), (rows, cols), &dev)?)?;
        let mut got = v;
        softmax_rows(&mut got, cols)?;
        let got = Tensor::from_vec(got, (rows, cols), &dev)?;
        let diff = (&want - &got)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "softmax differs by {diff}");
        Ok(())
    }

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
