//! The Qwen2 text decoder: GQA attention with M-RoPE, SwiGLU MLP, RMSNorm.

use candle_core::{D, DType, Module, Result, Tensor};

use crate::config::TextConfig;
use crate::error::Result as ModelResult;
use crate::nn::{Linear, RmsNorm, apply_rotary};
use crate::vision::{linear_from, softmax};
use crate::weights::Weights;

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

/// Keys and values of one layer, `[batch, kv_heads, len, head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    pub k: Option<Tensor>,
    pub v: Option<Tensor>,
}

/// The KV cache of a whole decoder.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); num_layers],
        }
    }

    /// Cached length (0 when empty).
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.k.as_ref())
            .and_then(|k| k.dim(2).ok())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which keys each query of a decoder forward attends to.
///
/// Attention is causal: the `l` queries of a forward are the last `l` of its `t` keys (query
/// `i` sits at key position `t - l + i`, after a cached prefix of `t - l` keys) and see the
/// keys at or before their own position, except the key ranges `hidden[row]` of their batch
/// row (left padding, or the gap between a row's cached prefix and its new tokens). A query
/// always sees its own key, so no row is left without keys (a padding row then reads its own
/// value, which nothing reads back).
///
/// The mask is never materialised whole: attention builds it one block of query rows at a time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyMask {
    /// Per batch row, the key position ranges no query of that row sees (empty: none).
    pub hidden: Vec<Vec<std::ops::Range<usize>>>,
}

impl KeyMask {
    /// Plain causal attention (no padding).
    pub fn causal() -> Self {
        Self::default()
    }

    /// Causal attention with `pads[row]` keys of left padding per batch row.
    pub fn left_padded(pads: &[usize]) -> Self {
        Self {
            hidden: pads
                .iter()
                .map(|&p| std::iter::once(0..p).filter(|r| !r.is_empty()).collect())
                .collect(),
        }
    }

    /// The left padding of each of `batch` rows when that is all the mask hides (one range
    /// from key 0, or none, per row), else `None`.
    pub fn left_pads(&self, batch: usize) -> Option<Vec<usize>> {
        (0..batch)
            .map(|r| {
                let mut live = self
                    .hidden
                    .get(r)
                    .into_iter()
                    .flatten()
                    .filter(|h| !h.is_empty());
                match (live.next(), live.next()) {
                    (None, _) => Some(0),
                    (Some(h), None) if h.start == 0 => Some(h.end),
                    _ => None,
                }
            })
            .collect()
    }

    /// Whether no row hides any key (only the causal rule applies).
    pub fn is_causal_only(&self) -> bool {
        self.hidden.iter().all(|h| h.iter().all(|r| r.is_empty()))
    }

    /// The additive mask `[batch, 1, rows, keys]` (0 or -inf, f32) of query rows
    /// `first_row..first_row + rows` of `l` queries over the first `keys` of `t` keys.
    pub fn block(
        &self,
        batch: usize,
        (l, t): (usize, usize),
        first_row: usize,
        rows: usize,
        keys: usize,
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        let mut m = vec![f32::NEG_INFINITY; batch * rows * keys];
        for (b, block) in m.chunks_exact_mut(rows * keys).enumerate() {
            let hidden = self.hidden.get(b).map_or(&[][..], Vec::as_slice);
            for (r, row) in block.chunks_exact_mut(keys).enumerate() {
                // Causal: keys up to the query's own position, less the hidden ranges, plus
                // the query's own key.
                let p = t - l + first_row + r;
                let seen = (p + 1).min(keys);
                row[..seen].fill(0.0);
                for h in hidden {
                    let (start, end) = (h.start.min(seen), h.end.min(seen));
                    row[start..end.max(start)].fill(f32::NEG_INFINITY);
                }
                if let Some(own) = row.get_mut(p) {
                    *own = 0.0;
                }
            }
        }
        Tensor::from_vec(m, (batch, 1, rows, keys), device)
    }
}

/// Query rows scored at once on the inference path: a 27k-token prefill (ten 1920x1080
/// screenshots) would otherwise hold a `[heads, 27k, 27k]` f32 score tensor (35 GB for 12
/// heads); 512 rows of it hold 0.7 GB.
pub const QUERY_BLOCK: usize = 512;

/// The token-embedding table of an inference copy, in fewer bytes than f32 (the 2B model's is
/// 0.93 GB in f32). Rows come out in f32. Clones share the table, and
/// [`crate::Qwen2Vl::refresh_from`] stores it again for all of them.
#[derive(Debug, Clone)]
pub enum CompactEmbedding {
    /// `q8_0` rows of this weight: a tied model's `lm_head` itself, so the table is held once.
    Quantized(crate::quantized::QuantizedWeight),
    /// bf16 rows, widened to f32 on lookup.
    Bf16(std::sync::Arc<std::sync::RwLock<Tensor>>),
}

#[derive(Debug, Clone)]
pub struct TextModel {
    pub config: TextConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// The output projection; shares `embed_tokens` when the checkpoint ties them.
    pub lm_head: Linear,
    /// Whether `lm_head` is `embed_tokens` (no `lm_head.weight` in the checkpoint).
    pub tied: bool,
    /// In a rollout copy ([`crate::Qwen2Vl::to_rollout`]): the embedding table in a compact
    /// storage, read row by row; `embed_tokens` is then a shape-only placeholder.
    pub embed_compact: Option<CompactEmbedding>,
    /// Recompute each layer in the backward pass instead of keeping its activations
    /// ([`crate::train::recompute`]); only on the differentiable path (no cache, not fused).
    pub gradient_checkpointing: bool,
    /// Under gradient checkpointing, the MLP of a recomputed layer (position-wise) runs and is
    /// recomputed again in chunks of this many rows, so its backward holds one chunk's
    /// activations: at the 28k tokens of ten 1080p screenshots each `[len, intermediate]`
    /// tensor of the 2B model is 1 GB, a chunk's 74 MB. [`RECOMPUTE_CHUNK`] unless changed.
    pub recompute_chunk: usize,
}

/// Rows per recomputed MLP chunk ([`TextModel::recompute_chunk`]).
pub const RECOMPUTE_CHUNK: usize = 2048;

impl DecoderLayer {
    fn linears(&self) -> [&Linear; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }

    /// The layer's trained tensors: `Var` weights, biases and norms, and LoRA adapters.
    pub fn trainable_tensors(&self) -> Vec<Tensor> {
        let mut out = Vec::new();
        for l in self.linears() {
            out.extend(crate::nn::trainable_of_linear(l));
        }
        for n in [&self.input_layernorm, &self.post_attention_layernorm] {
            if n.weight.is_variable() {
                out.push(n.weight.clone());
            }
        }
        out
    }
}

impl TextModel {
    pub fn load(cfg: &TextConfig, w: &mut Weights) -> ModelResult<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let hd = cfg.head_dim();
        let (nq, nkv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let embed_tokens = w.take("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let norm = |w: &mut Weights, n: &str| -> ModelResult<RmsNorm> {
                Ok(RmsNorm::new(
                    w.take(&format!("{p}.{n}.weight"), &[h])?,
                    cfg.rms_norm_eps,
                ))
            };
            layers.push(DecoderLayer {
                q_proj: linear_from(w, &format!("{p}.self_attn.q_proj"), nq, h, true)?,
                k_proj: linear_from(w, &format!("{p}.self_attn.k_proj"), nkv, h, true)?,
                v_proj: linear_from(w, &format!("{p}.self_attn.v_proj"), nkv, h, true)?,
                o_proj: linear_from(w, &format!("{p}.self_attn.o_proj"), h, nq, false)?,
                gate_proj: linear_from(w, &format!("{p}.mlp.gate_proj"), i, h, false)?,
                up_proj: linear_from(w, &format!("{p}.mlp.up_proj"), i, h, false)?,
                down_proj: linear_from(w, &format!("{p}.mlp.down_proj"), h, i, false)?,
                input_layernorm: norm(w, "input_layernorm")?,
                post_attention_layernorm: norm(w, "post_attention_layernorm")?,
            });
        }
        let norm = RmsNorm::new(w.take("model.norm.weight", &[h])?, cfg.rms_norm_eps);
        // A checkpoint may carry lm_head even when tied (identical values); prefer it if present.
        let tied = !w.contains("lm_head.weight");
        let lm_head = if !tied {
            Linear::new(w.take("lm_head.weight", &[cfg.vocab_size, h])?, None)
        } else if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.clone(), None)
        } else {
            return Err(crate::ModelError::MissingWeight {
                name: "lm_head.weight".into(),
            });
        };
        Ok(Self {
            config: cfg.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            tied,
            embed_compact: None,
            gradient_checkpointing: false,
            recompute_chunk: RECOMPUTE_CHUNK,
        })
    }

    /// `(name, tensor)` of every parameter with HF names (`lm_head.weight` only when untied).
    pub fn parameters(&self, out: &mut Vec<(String, Tensor)>) {
        let lin = |out: &mut Vec<(String, Tensor)>, n: String, l: &Linear| {
            out.push((format!("{n}.weight"), l.weight.clone()));
            if let Some(b) = &l.bias {
                out.push((format!("{n}.bias"), b.clone()));
            }
        };
        out.push((
            "model.embed_tokens.weight".into(),
            self.embed_tokens.clone(),
        ));
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            lin(out, format!("{p}.self_attn.q_proj"), &l.q_proj);
            lin(out, format!("{p}.self_attn.k_proj"), &l.k_proj);
            lin(out, format!("{p}.self_attn.v_proj"), &l.v_proj);
            lin(out, format!("{p}.self_attn.o_proj"), &l.o_proj);
            lin(out, format!("{p}.mlp.gate_proj"), &l.gate_proj);
            lin(out, format!("{p}.mlp.up_proj"), &l.up_proj);
            lin(out, format!("{p}.mlp.down_proj"), &l.down_proj);
            out.push((
                format!("{p}.input_layernorm.weight"),
                l.input_layernorm.weight.clone(),
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                l.post_attention_layernorm.weight.clone(),
            ));
        }
        out.push(("model.norm.weight".into(), self.norm.weight.clone()));
        if !self.tied {
            out.push(("lm_head.weight".into(), self.lm_head.weight.clone()));
        }
    }

    /// Token embeddings `[len, hidden]` (differentiable in the embedding table unless it is
    /// stored compact).
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let idx = || Tensor::from_slice(ids, ids.len(), self.embed_tokens.device());
        match &self.embed_compact {
            Some(CompactEmbedding::Quantized(q)) => q.embedding(ids),
            Some(CompactEmbedding::Bf16(t)) => t
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .index_select(&idx()?, 0)?
                .to_dtype(DType::F32),
            None => self.embed_tokens.index_select(&idx()?, 0),
        }
    }

    /// Runs the decoder over `x` `[batch, len, hidden]`; returns the final-normed hidden states.
    ///
    /// `cos`/`sin` are `[batch, 1, len, head_dim]`; `mask` says which keys each query sees
    /// (causal over the cached keys and the new ones). With `cache` the new keys and values
    /// are appended to it.
    pub fn forward_hidden(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &KeyMask,
        mut cache: Option<&mut KvCache>,
        fused: bool,
    ) -> Result<Tensor> {
        let mut x = x.clone();
        let recompute = self.gradient_checkpointing && cache.is_none() && !fused;
        for (i, layer) in self.layers.iter().enumerate() {
            if recompute {
                let (cfg, layer_c) = (self.config.clone(), layer.clone());
                let (cos, sin, mask) = (cos.clone(), sin.clone(), mask.clone());
                let chunk = self.recompute_chunk.max(1);
                let block = crate::train::recompute::block(
                    layer.linears().into_iter().filter_map(|l| l.lora.as_ref()),
                    move |x: &Tensor| chunked_layer(&cfg, &layer_c, x, &cos, &sin, &mask, chunk),
                );
                x = crate::train::recompute::checkpoint(&x, layer.trainable_tensors(), block)?;
                continue;
            }
            let lc = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let a = attention_residual(&self.config, layer, &x, cos, sin, mask, lc, fused)?;
            x = mlp_residual(layer, &a)?;
        }
        self.norm.forward(&x)
    }

    /// Logits for hidden states `[.., hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }
}

/// `x + attention(norm(x))`: the first half of a decoder layer (pre-norm attention, then a
/// SwiGLU MLP, both residual).
#[allow(clippy::too_many_arguments)]
fn attention_residual(
    cfg: &TextConfig,
    layer: &DecoderLayer,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &KeyMask,
    cache: Option<&mut LayerCache>,
    fused: bool,
) -> Result<Tensor> {
    let a = attention(
        cfg,
        layer,
        &layer.input_layernorm.forward(x)?,
        cos,
        sin,
        mask,
        cache,
        fused,
    )?;
    x + a
}

/// A decoder layer recomputed under gradient checkpointing, every position-wise part in
/// checkpointed chunks of `chunk` rows ([`crate::train::recompute::checkpoint`]), so that its
/// backward pass holds one chunk's activations of them at a time: the input norm, the q/k/v
/// projections and the rotary embedding per chunk; the attention core over the whole sequence
/// (memory-linear, [`crate::attention::causal_attention`]); then the output projection, the
/// residual and the MLP per chunk. Only with a mask of left padding (the learner's); otherwise,
/// and for a sequence of one chunk, [`attention_residual`] then [`chunked_mlp_residual`].
fn chunked_layer(
    cfg: &TextConfig,
    layer: &DecoderLayer,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &KeyMask,
    chunk: usize,
) -> Result<Tensor> {
    let (b, l, hidden) = x.dims3()?;
    let pads = mask.left_pads(b);
    let Some(pads) = pads.filter(|_| l > chunk) else {
        let a = attention_residual(cfg, layer, x, cos, sin, mask, None, false)?;
        return chunked_mlp_residual(layer, &a, chunk);
    };
    let (nh, nkv, hd) = cfg.heads();
    // 1. [q | k | v] per row, rotated: [batch, len, (heads + 2 kv_heads) * head_dim].
    let qkv_linears = [&layer.q_proj, &layer.k_proj, &layer.v_proj];
    let qkv = checkpointed_chunks(
        x,
        chunk,
        &trainable_of(&qkv_linears, &layer.input_layernorm),
        |start, rows| {
            let (cfg, layer_c) = (cfg.clone(), layer.clone());
            let (cos, sin) = (cos.narrow(2, start, rows)?, sin.narrow(2, start, rows)?);
            Ok(crate::train::recompute::block(
                qkv_linears.iter().filter_map(|l| l.lora.as_ref()),
                move |x: &Tensor| rotated_qkv(&cfg, &layer_c, x, &cos, &sin),
            ))
        },
    )?;
    let heads = |first: usize, n: usize| -> Result<Tensor> {
        qkv.narrow(2, first * hd, n * hd)?
            .reshape((b, l, n, hd))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (heads(0, nh)?, heads(nh, nkv)?, heads(nh + nkv, nkv)?);
    let scale = 1.0 / (hd as f64).sqrt();
    let out = crate::attention::causal_attention(&q, &k, &v, &pads, scale)?
        .transpose(1, 2)?
        .reshape((b, l, nh * hd))?;
    // 2. x + o_proj(out), then the MLP, per row: from [out | x].
    let joined = Tensor::cat(&[&out, x], 2)?;
    let rest = [
        &layer.o_proj,
        &layer.gate_proj,
        &layer.up_proj,
        &layer.down_proj,
    ];
    checkpointed_chunks(
        &joined,
        chunk,
        &trainable_of(&rest, &layer.post_attention_layernorm),
        |_, _| {
            let layer_c = layer.clone();
            Ok(crate::train::recompute::block(
                rest.iter().filter_map(|l| l.lora.as_ref()),
                move |j: &Tensor| {
                    let a = j.narrow(2, 0, nh * hd)?;
                    let x = j.narrow(2, nh * hd, hidden)?;
                    mlp_residual(&layer_c, &(x + layer_c.o_proj.forward(&a)?)?)
                },
            ))
        },
    )
}

/// The input norm, the q/k/v projections and the rotary embedding of rows `x`
/// `[batch, rows, hidden]` (`cos`/`sin` of those rows): `[batch, rows, [q | k | v]]`, as
/// [`attention`] computes them.
fn rotated_qkv(
    cfg: &TextConfig,
    layer: &DecoderLayer,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let (b, rows, _) = x.dims3()?;
    let (nh, nkv, hd) = cfg.heads();
    let h = layer.input_layernorm.forward(x)?;
    let rows_of = |t: Tensor, n: usize| t.transpose(1, 2)?.reshape((b, rows, n * hd));
    let q = rows_of(rotated_heads(&layer.q_proj, &h, nh, hd, cos, sin)?, nh)?;
    let k = rows_of(rotated_heads(&layer.k_proj, &h, nkv, hd, cos, sin)?, nkv)?;
    let v = layer.v_proj.forward(&h)?;
    Tensor::cat(&[&q, &k, &v], 2)
}

/// `proj(x)` for `x` `[batch, len, hidden]` as `heads` heads `[batch, heads, len, head_dim]`,
/// rotated by `cos`/`sin` (in f32, back in `x`'s dtype).
fn rotated_heads(
    proj: &Linear,
    x: &Tensor,
    heads: usize,
    head_dim: usize,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let (b, l, _) = x.dims3()?;
    let t = proj
        .forward(x)?
        .reshape((b, l, heads, head_dim))?
        .transpose(1, 2)?;
    apply_rotary(&t.to_dtype(DType::F32)?, cos, sin)?.to_dtype(x.dtype())
}

/// `x + mlp(norm(x))`: position-wise, so any split of the rows gives the same rows.
fn mlp_residual(layer: &DecoderLayer, x: &Tensor) -> Result<Tensor> {
    let h = layer.post_attention_layernorm.forward(x)?;
    let gate = layer.gate_proj.forward(&h)?;
    let m = layer
        .down_proj
        .forward(&crate::nn::silu_mul(&gate, &layer.up_proj.forward(&h)?)?)?;
    x + m
}

/// [`mlp_residual`] over `x` `[batch, len, hidden]` in chunks of `chunk` rows, each one
/// checkpointed ([`crate::train::recompute::checkpoint`]): nested in a recomputed layer, the
/// layer's backward pass holds one chunk's MLP activations at a time.
fn chunked_mlp_residual(layer: &DecoderLayer, x: &Tensor, chunk: usize) -> Result<Tensor> {
    if x.dim(1)? <= chunk {
        return mlp_residual(layer, x);
    }
    let mlp = [&layer.gate_proj, &layer.up_proj, &layer.down_proj];
    checkpointed_chunks(
        x,
        chunk,
        &trainable_of(&mlp, &layer.post_attention_layernorm),
        |_, _| {
            let layer_c = layer.clone();
            Ok(crate::train::recompute::block(
                mlp.iter().filter_map(|l| l.lora.as_ref()),
                move |x: &Tensor| mlp_residual(&layer_c, x),
            ))
        },
    )
}

/// `input` `[batch, len, ..]` in chunks of `chunk` rows, each one
/// [`crate::train::recompute::checkpoint`]ed with the trainable `params` of the block that
/// `block(start, rows)` makes for the rows `start..start + rows`; the chunks' outputs joined.
fn checkpointed_chunks(
    input: &Tensor,
    chunk: usize,
    params: &[Tensor],
    block: impl Fn(usize, usize) -> Result<crate::train::recompute::Block>,
) -> Result<Tensor> {
    let len = input.dim(1)?;
    let mut parts = Vec::with_capacity(len.div_ceil(chunk));
    for start in (0..len).step_by(chunk) {
        let rows = chunk.min(len - start);
        parts.push(crate::train::recompute::checkpoint(
            &input.narrow(1, start, rows)?,
            params.to_vec(),
            block(start, rows)?,
        )?);
    }
    Tensor::cat(&parts, 1)
}

/// The trainable tensors of `linears` (weights, biases or LoRA adapters) and of `norm`.
fn trainable_of(linears: &[&Linear], norm: &RmsNorm) -> Vec<Tensor> {
    let mut params: Vec<Tensor> = linears
        .iter()
        .flat_map(|l| crate::nn::trainable_of_linear(l))
        .collect();
    if norm.weight.is_variable() {
        params.push(norm.weight.clone());
    }
    params
}

#[allow(clippy::too_many_arguments)]
fn attention(
    cfg: &TextConfig,
    layer: &DecoderLayer,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    mask: &KeyMask,
    cache: Option<&mut LayerCache>,
    fused: bool,
) -> Result<Tensor> {
    let (b, l, _) = x.dims3()?;
    let (nh, nkv, hd) = cfg.heads();
    let dtype = x.dtype();
    let q = rotated_heads(&layer.q_proj, x, nh, hd, cos, sin)?;
    let k = rotated_heads(&layer.k_proj, x, nkv, hd, cos, sin)?.contiguous()?;
    let v = layer
        .v_proj
        .forward(x)?
        .reshape((b, l, nkv, hd))?
        .transpose(1, 2)?
        .contiguous()?;
    let (k, v) = match cache {
        Some(c) => {
            let k = match &c.k {
                Some(prev) => Tensor::cat(&[prev, &k], 2)?,
                None => k,
            };
            let v = match &c.v {
                Some(prev) => Tensor::cat(&[prev, &v], 2)?,
                None => v,
            };
            // Kept past this forward: on inference (`fused`) without the graph that made
            // them, which a model with trained (`Var`) weights records and would keep alive.
            let keep = |t: &Tensor| if fused { t.detach() } else { t.clone() };
            c.k = Some(keep(&k));
            c.v = Some(keep(&v));
            (k, v)
        }
        None => (k, v),
    };
    let t = k.dim(2)?;
    let rep = nh / nkv;
    let scale = 1.0 / (hd as f64).sqrt();
    let device = x.device();
    // GQA without copying keys: query heads of one KV head are stacked along the rows.
    let attend = |q: &Tensor, keys: usize, mask: Option<Tensor>| -> Result<Tensor> {
        let rows = q.dim(2)?;
        let q = q.contiguous()?.reshape((b, nkv, rep * rows, hd))?;
        let (k, v) = if keys == t {
            (k.clone(), v.clone())
        } else {
            (k.narrow(2, 0, keys)?, v.narrow(2, 0, keys)?)
        };
        let scores = (q.matmul(&k.t()?)? * scale)?.reshape((b, nh, rows, keys))?;
        let scores = scores.to_dtype(DType::F32)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(&m)?,
            None => scores,
        };
        let probs = softmax(&scores, fused)?.to_dtype(dtype)?;
        probs
            .reshape((b, nkv, rep * rows, keys))?
            .matmul(&v.contiguous()?)?
            .reshape((b, nh, rows, hd))
    };
    let needs_mask = |rows: usize| l > 1 || rows > 1 || !mask.is_causal_only();
    let left_pads = (!fused || device.is_cpu())
        .then(|| mask.left_pads(b))
        .flatten();
    let out = if let Some(pads) = left_pads {
        // Memory-linear (no [l, t] scores; see crate::attention), differentiable, and on the
        // CPU faster than the products below: prefill, decode and training alike. (Off the CPU
        // the op is the dense formula: inference there takes the query blocks below.)
        crate::attention::causal_attention(&q, &k, &v, &pads, scale)?
    } else if fused && device.is_cpu() {
        // Inference with gaps in the keys (rows of a batch with different cached prefixes):
        // each row's visible keys are gathered into one left-padded run, which is the case
        // above. Blocks of scores over the whole batch (below) held `[batch, heads, 512, t]`
        // f32 at once: gigabytes for a large batch.
        let (k, v, pads) = gather_visible_keys(&k, &v, mask)?;
        crate::attention::causal_attention(&q, &k, &v, &pads, scale)?
    } else if !fused {
        // The differentiable path with a mask other than left padding: one product over all
        // rows.
        let m = needs_mask(l)
            .then(|| mask.block(b, (l, t), 0, l, t, device))
            .transpose()?;
        attend(&q, t, m)?
    } else {
        // Inference with gaps in the keys (rows of a batch with different cached prefixes):
        // blocks of query rows, each over the keys up to its last row (the later ones are
        // masked anyway), so memory grows linearly with the length.
        let mut blocks = Vec::with_capacity(l.div_ceil(QUERY_BLOCK));
        for first in (0..l).step_by(QUERY_BLOCK) {
            let rows = QUERY_BLOCK.min(l - first);
            let keys = t - l + first + rows;
            let m = needs_mask(rows)
                .then(|| mask.block(b, (l, t), first, rows, keys, device))
                .transpose()?;
            blocks.push(attend(&q.narrow(2, first, rows)?, keys, m)?);
        }
        if blocks.len() == 1 {
            blocks.remove(0)
        } else {
            Tensor::cat(&blocks, 2)?
        }
    };
    let out = out.transpose(1, 2)?.reshape((b, l, nh * hd))?;
    layer.o_proj.forward(&out)
}

/// Keys and values `[batch, kv_heads, t, head_dim]` with each row's visible keys (those its
/// [`KeyMask`] does not hide) moved into one run at the end, after as many padding keys as
/// make every row as long as the longest; returns them with each row's padding. (A padding
/// key repeats key 0: the padding is hidden, so its value never counts.) A query after every
/// hidden key of its row sees the same keys, in the same order, as before: with causal
/// attention over the left padding it gets the same result. (Queries before a hidden key are
/// padding positions, whose outputs nothing reads.)
fn gather_visible_keys(
    k: &Tensor,
    v: &Tensor,
    mask: &KeyMask,
) -> Result<(Tensor, Tensor, Vec<usize>)> {
    let (b, _, t, _) = k.dims4()?;
    let visible: Vec<Vec<u32>> = (0..b)
        .map(|r| {
            let hidden = mask.hidden.get(r).map_or(&[][..], Vec::as_slice);
            (0..t)
                .filter(|j| !hidden.iter().any(|h| h.contains(j)))
                .map(|j| j as u32)
                .collect()
        })
        .collect();
    let width = visible.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let pads: Vec<usize> = visible.iter().map(|idx| width - idx.len()).collect();
    // One index per row, made once for the keys and the values.
    let index = visible
        .iter()
        .zip(&pads)
        .map(|(idx, &pad)| {
            let row: Vec<u32> = std::iter::repeat_n(0, pad)
                .chain(idx.iter().copied())
                .collect();
            Tensor::from_vec(row, width, k.device())
        })
        .collect::<Result<Vec<_>>>()?;
    let gather = |x: &Tensor| -> Result<Tensor> {
        let rows = index
            .iter()
            .enumerate()
            .map(|(r, idx)| x.get(r)?.index_select(idx, 1))
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&rows, 0)
    };
    Ok((gather(k)?, gather(v)?, pads))
}

/// Picks the rows of `hidden` `[batch, len, h]` at `D::Minus2` index `pos`.
pub fn last_position(hidden: &Tensor) -> Result<Tensor> {
    let l = hidden.dim(D::Minus2)?;
    hidden.narrow(D::Minus2, l - 1, 1)
}
